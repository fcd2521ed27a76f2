"""The isolation sweep: numbers match a naive re-computation, survive chunking, and rank the right layers."""

import copy
import json
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.data import Dataset
from analysis.formats import parse_format
from analysis.metrics import compare
from analysis.quantsim import quantize_weight
from analysis.sweep import AnalysisConfig, Sweep, analyze


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 4)
        self.act = nn.ReLU(inplace=True)  # in-place on purpose: must not corrupt cached activations

    def forward(self, x):
        h = self.act(self.a(x))
        h = h + self.act(self.b(h))
        return self.c(h)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        h = self.emb(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h + a)


def data(n=32):
    torch.manual_seed(1)
    x = torch.randn(n, 8)
    return Dataset(x, torch.randint(0, 4, (n,)), "classification", "synthetic")


def lm_data(n=8):
    torch.manual_seed(2)
    x = torch.randint(0, 20, (n, 6))
    return Dataset(x, torch.randint(0, 20, (n, 6)), "language-model", "tokens")


CONFIG = AnalysisConfig(weight_formats=("int4", "int8"), act_formats=("int8",), weight_calibration="minmax",
                        act_calibration="minmax", cumulative=True)


def naive_output(model, layer, fmt, x):
    """Quantize one weight in a copy of the model and run the whole thing: what a naive tool does."""
    clone = copy.deepcopy(model).eval()
    module = clone.get_submodule(layer)
    wq, _, _ = quantize_weight(module.weight, fmt, 0, "minmax", 99.99)
    module.weight.data.copy_(wq)
    with torch.no_grad():
        return clone(x)


def test_output_error_matches_a_full_naive_forward():
    model, ds = Residual(), data()
    result = analyze(model, ds, CONFIG)
    with torch.no_grad():
        reference = model.eval()(ds.inputs)
    for layer in ("a", "b", "c"):
        expected = compare(reference, naive_output(model, layer, parse_format("int4"), ds.inputs), logits=True)
        got = result.trial(layer, "weights", "int4").output
        assert got.sqnr_db == pytest.approx(expected.sqnr_db, abs=1e-4)
        assert got.kl == pytest.approx(expected.kl, rel=1e-4, abs=1e-10)


def test_local_error_uses_fp32_inputs():
    model, ds = Residual(), data()
    result = analyze(model, ds, CONFIG)
    with torch.no_grad():
        h = torch.relu(model.a(ds.inputs))
        wq, _, _ = quantize_weight(model.b.weight, parse_format("int4"), 0, "minmax", 99.99)
        expected = compare(model.b(h), F.linear(h, wq, model.b.bias))
    assert result.trial("b", "weights", "int4").local.sqnr_db == pytest.approx(expected.sqnr_db, abs=1e-4)


def test_chunking_under_a_tiny_cache_bound_gives_the_same_numbers():
    model, ds = Residual(), data(40)
    whole = analyze(model, ds, CONFIG)
    chunked_analyzer = Sweep(model, ds, dataclasses.replace(CONFIG, cache_bytes=1 << 16))
    assert len(chunked_analyzer.sim.chunks()) > 1
    chunked = chunked_analyzer.run()
    for a, b in zip(whole.trials, chunked.trials):
        assert a.key == b.key
        # per-chunk partial sums are float32: equal to ~1e-6 relative (1e-4 dB), far below what is shown
        assert a.local.sqnr_db == pytest.approx(b.local.sqnr_db, abs=1e-4)
        assert a.output.sqnr_db == pytest.approx(b.output.sqnr_db, abs=1e-4)


def test_results_are_deterministic_and_the_user_model_is_untouched():
    model, ds = Residual(), data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = analyze(model, ds, CONFIG).to_frame()
    second = analyze(model, ds, CONFIG).to_frame()
    assert first.equals(second)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.act.inplace is True


def test_planted_outlier_channel_ranks_most_sensitive_under_per_tensor():
    model, ds = Residual(), data()
    with torch.no_grad():
        model.b.weight[3] *= 50  # one output channel with a huge range
    config = AnalysisConfig(weight_formats=("int4",), act_formats=(), granularity="per-tensor",
                            weight_calibration="minmax", cumulative=False)
    frame = analyze(model, ds, config).to_frame()
    assert frame.sort_values("sqnr_db").iloc[0]["layer"] == "b"
    per_channel = analyze(model, ds, AnalysisConfig(weight_formats=("int4",), act_formats=(),
                                                    weight_calibration="minmax", cumulative=False)).to_frame()
    b_pt = frame.set_index("layer").loc["b", "sqnr_db"]
    b_pc = per_channel.set_index("layer").loc["b", "sqnr_db"]
    assert b_pc > b_pt + 5  # the outlier channel dominates signal power, so the gap is modest in dB


def test_attention_projections_and_tied_embedding_are_layers():
    model, ds = TinyLM(), lm_data()
    result = analyze(model, ds, CONFIG)
    names = [layer.name for layer in result.layers]
    assert names == ["emb", "attn.in_proj", "attn.out_proj"]
    tied = result.layer("emb")
    assert tied.aliases == ("head",) and len(tied.sites) == 2 and "tied" in tied.kind
    # Activation trials of the tied layer quantize the head's input (the embedding's input is indices).
    assert result.trial("emb", "activations", "int8").ok
    assert result.trial("attn.out_proj", "activations", "int8").ok
    assert all(t.ok for t in result.trials), [t.error for t in result.trials if not t.ok]
    # Output error of the out_proj trial equals running attention with that weight swapped in.
    wq, _, _ = quantize_weight(model.attn.out_proj.weight, parse_format("int4"), 0, "minmax", 99.99)
    clone = copy.deepcopy(model)
    clone.attn.out_proj.weight.data.copy_(wq)
    with torch.no_grad():
        expected = compare(model(ds.inputs), clone(ds.inputs), logits=True)
    got = result.trial("attn.out_proj", "weights", "int4").output
    assert got.sqnr_db == pytest.approx(expected.sqnr_db, abs=1e-3)


def test_an_untied_embedding_gets_no_activation_trials():
    model = TinyLM()
    model.head.weight = nn.Parameter(model.emb.weight.detach().clone())
    result = analyze(model, lm_data(), CONFIG)
    assert {t.target for t in result.trials if t.layer == "emb"} == {"weights"}
    assert result.trial("head", "activations", "int8").ok


def test_exported_program_is_analysed_like_the_eager_model():
    model, ds = Residual(), data()
    exported = torch.export.export(model.eval(), (ds.inputs[:2],))
    eager = analyze(model, ds, CONFIG)
    traced = analyze(exported, ds, CONFIG)
    assert [l.name for l in traced.layers] == ["a", "b", "c"]
    for layer in ("a", "b", "c"):
        assert traced.trial(layer, "weights", "int4").output.sqnr_db == pytest.approx(
            eager.trial(layer, "weights", "int4").output.sqnr_db, abs=1e-3)


def test_cumulative_output_matches_the_fully_quantized_model():
    model, ds = Residual(), data()
    result = analyze(model, ds, CONFIG)
    cum = next(c for c in result.cumulative if c.target == "weights" and c.format == "int4")
    clone = copy.deepcopy(model).eval()
    for name in ("a", "b", "c"):
        module = clone.get_submodule(name)
        module.weight.data.copy_(quantize_weight(module.weight, parse_format("int4"), 0, "minmax", 99.99)[0])
    with torch.no_grad():
        expected = compare(model(ds.inputs), clone(ds.inputs), logits=True)
    assert cum.output.sqnr_db == pytest.approx(expected.sqnr_db, abs=1e-3)
    assert list(cum.per_layer) == ["a", "b", "c"]


class DiagonalChain(nn.Module):
    """Four bias-free Linear layers with positive diagonal weights: every weight row has one non-zero."""

    def __init__(self, depth=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(depth))
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                layer.weight.copy_(torch.diag(torch.linspace(0.5, 1.5, 8) * (i + 1)))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_cumulative_error_grows_along_depth():
    # int4 symmetric per channel, min-max: a row's only non-zero d is its absmax, so scale = d / 7.5
    # and d sits at code 7.5, which clamps to 7: every layer multiplies its output by exactly r = 14/15.
    # With all layers quantized, layer k's output is r^k times the FP32 one and its SQNR is
    # -20 log10(1 - r^k): the error compounds with depth (23.5, 17.8, 14.6, 12.4 dB).
    config = AnalysisConfig(weight_formats=("int4",), act_formats=(), targets=("weights",),
                            weight_calibration="minmax", cumulative=True)
    result = analyze(DiagonalChain(), data(), config)
    cum = next(c for c in result.cumulative if c.target == "weights" and c.format == "int4")
    names = [f"layers.{k}" for k in range(4)]
    assert list(cum.per_layer) == names
    r = 14 / 15
    expected = [-20 * math.log10(1 - r ** (k + 1)) for k in range(4)]
    got = [cum.per_layer[name].sqnr_db for name in names]
    assert got == pytest.approx(expected, abs=1e-3)
    assert all(deeper < shallower - 2.0 for shallower, deeper in zip(got, got[1:]))
    assert cum.output.sqnr_db == pytest.approx(expected[-1], abs=1e-3)
    # isolation, by contrast, does not compound: each layer alone costs one factor r
    for name in names:
        assert result.trial(name, "weights", "int4").local.sqnr_db == pytest.approx(expected[0], abs=1e-3)


def test_a_failing_layer_is_marked_and_the_sweep_goes_on(monkeypatch):
    model, ds = Residual(), data()
    analyzer = Sweep(model, ds, CONFIG)
    site = analyzer.sim.table.sites["b"][0]
    original = site.run

    def broken(gm, args, kwargs, weight, act):
        if weight is not None:
            raise FloatingPointError("simulated kernel failure")
        return original(gm, args, kwargs, weight, act)

    monkeypatch.setattr(site, "run", broken)
    result = analyzer.run()
    failed = [t for t in result.trials if not t.ok]
    assert failed and all(t.layer == "b" and "simulated kernel failure" in t.error for t in failed)
    assert result.trial("c", "weights", "int4").ok


def test_histograms_hold_every_weight_and_clip_ranges():
    model, ds = Residual(), data()
    result = analyze(model, ds, CONFIG)
    hists = result.histograms["b"]
    assert sum(hists.weight.fp32.counts) == model.b.weight.numel()
    assert sum(hists.weight.quantized["int4"]) == model.b.weight.numel()
    # min-max calibration, symmetric per channel: row r is clipped to [-absmax_r, absmax_r], so the
    # widest clip over all rows is +-(largest |w| of the whole weight)
    absmax = float(model.b.weight.abs().max())
    for fmt in ("int8", "int4"):
        assert hists.weight.clip[fmt] == pytest.approx((-absmax, absmax), rel=1e-6), fmt
    assert hists.activation is not None and sum(hists.activation.fp32.counts) == 32 * 16
    # activations, min-max: b's input is relu(a(x)), so its range is [0, max over all samples]
    with torch.no_grad():
        b_input = torch.relu(model.a(ds.inputs))
    assert hists.activation.clip["int8"] == pytest.approx((0.0, float(b_input.max())), rel=1e-6)
    assert len(hists.channel_min) == 16


def test_config_errors_are_one_line():
    for kwargs in ({"targets": ("weird",)}, {"weight_calibration": "magic"}, {"weight_formats": ("int9",)},
                   {"percentile": 10.0}):
        with pytest.raises(ValueError) as info:
            AnalysisConfig(**kwargs)
        assert "\n" not in str(info.value)


class ShapeDependent(nn.Module):
    """Slices a buffer by the input's length: fx cannot trace this, torch.export can."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 32), persistent=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x * self.scale[: x.shape[1]])


def test_untraceable_models_fall_back_to_torch_export():
    result = analyze(ShapeDependent(), data(), CONFIG)
    assert result.model["source"] == "export"
    assert [layer.name for layer in result.layers] == ["fc"] and all(t.ok for t in result.trials)


def test_shared_weights_are_never_written_even_with_batchnorm_folding():
    import sample_models
    from analysis.evaluate import Evaluator
    from analysis.precision_map import uniform_map

    model = sample_models.load_model("cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    split = sample_models.load_split("cnn", "calibration")
    ds = Dataset(split["inputs"][:32], split["labels"][:32], "classification", "cnn")
    result = analyze(model, ds, AnalysisConfig(weight_formats=("int4",), act_formats=("int8",), num_samples=32))
    evaluator = Evaluator(model, ds)
    evaluator.evaluate(uniform_map([l.name for l in result.layers], "int4", "int8"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_failing_cumulative_configuration_is_recorded_not_dropped(monkeypatch):
    model, ds = Residual(), data()
    sweep = Sweep(model, ds, CONFIG)
    real_overrides = sweep.sim.overrides

    def overrides(assignment):
        # Only the cumulative view quantizes every layer at once.
        if len(assignment) == 3 and all(wf is not None and wf.bits == 4 and af is None for wf, af in assignment.values()):
            raise RuntimeError("simulated failure of the int4 cumulative run")
        return real_overrides(assignment)

    monkeypatch.setattr(sweep.sim, "overrides", overrides)
    result = sweep.run()
    failed = [c for c in result.cumulative if c.error is not None]
    assert [(c.target, c.format) for c in failed] == [("weights", "int4")]
    assert "simulated failure" in failed[0].error and failed[0].output is None
    ok = [c for c in result.cumulative if c.error is None]
    assert ok and all(c.output is not None for c in ok)
    again = type(result).from_json_dict(json.loads(json.dumps(result.to_json_dict())))
    assert [c.error for c in again.cumulative] == [c.error for c in result.cumulative]
    assert ("weights", "int4") not in set(zip(result.cumulative_frame()["target"], result.cumulative_frame()["format"]))
