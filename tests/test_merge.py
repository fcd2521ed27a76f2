"""Results of disjoint layer subsets merge into exactly what one run over all layers reports."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from analysis.data import Dataset
from analysis.results import AnalysisResult
from analysis.sweep import AnalysisConfig, analyze


class Chain(nn.Module):
    """Four linears with a skip, so output error of one layer flows through the others."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)
        self.d = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h + torch.relu(self.b(h))
        return self.d(torch.relu(self.c(h)))


def data(n=24, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    return Dataset(x, torch.randint(0, 4, (n,), generator=generator), "classification", "synthetic")


CONFIG = AnalysisConfig(weight_formats=("int4", "int8"), act_formats=("int8",), weight_calibration="minmax",
                        act_calibration="minmax", cumulative=False, histogram_bins=16)


@pytest.fixture(scope="module")
def runs():
    model, ds = Chain().eval(), data()
    full = analyze(model, ds, CONFIG)
    # interleaved subsets, given out of execution order: the merge must restore the run's order
    first = analyze(model, ds, dataclasses.replace(CONFIG, layers=("c", "a")))
    second = analyze(model, ds, dataclasses.replace(CONFIG, layers=("b", "d")))
    return model, ds, full, first, second


def _without_seconds(result: AnalysisResult) -> dict:
    payload = result.to_json_dict()
    payload.pop("seconds")
    return payload


def test_merging_disjoint_shards_equals_one_full_run(runs):
    _, _, full, first, second = runs
    for merged in (AnalysisResult.merge(first, second), AnalysisResult.merge(second, first)):
        assert merged.to_frame().to_csv(index=False) == full.to_frame().to_csv(index=False)
        assert [t.key for t in merged.trials] == [t.key for t in full.trials]  # the single run's order
        assert merged.trials == full.trials  # every number, error histograms included
        assert list(merged.histograms) == list(full.histograms) and merged.histograms == full.histograms
        assert merged.config == full.config and merged.config["layers"] is None
        assert _without_seconds(merged) == _without_seconds(full)
        assert merged.seconds == pytest.approx(first.seconds + second.seconds)


def test_merge_reads_saved_shards_and_keeps_a_partial_union_as_a_layer_list(runs, tmp_path):
    _, _, full, first, second = runs
    loaded = [AnalysisResult.from_json_dict(json.loads(json.dumps(r.to_json_dict()))) for r in (first, second)]
    merged = AnalysisResult.merge(*loaded)
    assert merged.to_frame().to_csv(index=False) == full.to_frame().to_csv(index=False)
    merged.save(tmp_path / "analysis.json")  # strict JSON
    model, ds = runs[0], runs[1]
    only_b = analyze(model, ds, dataclasses.replace(CONFIG, layers=("b",)))
    partial = AnalysisResult.merge(first, only_b)
    assert partial.config["layers"] == ["a", "b", "c"]  # execution order, as the sweep runs them
    assert [t.layer for t in partial.trials] == [t.layer for t in full.trials if t.layer != "d"]
    assert AnalysisResult.merge(first) is first


def test_overlapping_shards_are_refused(runs):
    model, ds, full, first, _ = runs
    overlapping = analyze(model, ds, dataclasses.replace(CONFIG, layers=("a", "b")))
    with pytest.raises(ValueError, match="layer 'a' is in result 1 and result 2; shards must analyse disjoint"):
        AnalysisResult.merge(first, overlapping)
    with pytest.raises(ValueError, match="disjoint"):
        AnalysisResult.merge(full, first)
    with pytest.raises(ValueError, match="nothing to merge"):
        AnalysisResult.merge()


def test_mismatched_shards_are_refused_naming_what_differs(runs):
    model, ds, _, first, second = runs
    other_formats = analyze(model, ds, dataclasses.replace(CONFIG, layers=("b", "d"), weight_formats=("int8",)))
    with pytest.raises(ValueError, match=r"^cannot merge: config\.weight_formats \(\['int4', 'int8'\] vs \['int8'\]\)"):
        AnalysisResult.merge(first, other_formats)
    other_quant = analyze(model, ds, dataclasses.replace(CONFIG, layers=("b", "d"), percentile=99.9))
    with pytest.raises(ValueError, match=r"config\.quant\.percentile \(99\.99 vs 99\.9\) differs"):
        AnalysisResult.merge(first, other_quant)
    other_data = analyze(model, data(seed=2), dataclasses.replace(CONFIG, layers=("b", "d")))
    with pytest.raises(ValueError, match=r"data\.fingerprint"):
        AnalysisResult.merge(first, other_data)
    other_model = dataclasses.replace(second, model={**second.model, "fingerprint": "elsewhere"})
    with pytest.raises(ValueError, match=r"model\.fingerprint \(present in only one\)"):
        AnalysisResult.merge(first, other_model)
    renamed = dataclasses.replace(second, layers=second.layers[::-1])
    with pytest.raises(ValueError, match="layer tables"):
        AnalysisResult.merge(first, renamed)
    for bad in (dataclasses.replace(second, trials=first.trials[:1] + second.trials),
                dataclasses.replace(second, config={**second.config, "layers": ["b", "e"]})):
        with pytest.raises(ValueError, match="cannot merge: result 2"):
            AnalysisResult.merge(first, bad)


def test_cumulative_views_are_refused_or_dropped(runs):
    model, ds, full, _, _ = runs
    config = dataclasses.replace(CONFIG, cumulative=True)
    shards = [analyze(model, ds, dataclasses.replace(config, layers=layers)) for layers in (("a", "b"), ("c", "d"))]
    assert all(s.cumulative for s in shards)
    with pytest.raises(ValueError, match=r"cannot merge cumulative views \(in result\(s\) 1, 2\)"):
        AnalysisResult.merge(*shards)
    merged = AnalysisResult.merge(*shards, drop_cumulative=True)
    assert merged.cumulative == () and merged.config["cumulative"] is False
    assert merged.to_frame().to_csv(index=False) == full.to_frame().to_csv(index=False)
