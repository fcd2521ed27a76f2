"""Estimated output metrics (analysis.estimate): checked against a naive Jacobian computation and
against the exact sweep, plus the output_source column and --verify."""

import math

import pytest
import torch
from torch import nn

from analysis.cli import main
from analysis.config import AnalysisConfig, ConfigError
from analysis.data import Dataset
from analysis.estimate import NoiseEstimate, node_difference, output_gradients
from analysis.results import AnalysisResult
from analysis.sweep import Sweep


class Classifier(nn.Module):
    """Two hidden layers, then a linear head: everything after `head` is linear (nothing)."""


    def __init__(self, outlier: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(12, 32)
        self.b = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)
        if outlier:  # one huge weight in b that the FP32 function barely notices (its input is
            # scaled down): int4's step in that row, 40/7.5, zeroes every other weight of the row.
            with torch.no_grad():
                self.a.weight[5] *= 0.01
                self.a.bias[5] *= 0.01
                self.b.weight[3, 5] = 40.0

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.relu(self.a(x)))))


def classification_data(n=256):
    torch.manual_seed(1)
    return Dataset(torch.randn(n, 12), torch.randint(0, 10, (n,)), "classification", "synthetic")


def sweep(model, data, **overrides):
    config = AnalysisConfig(weight_formats=("int8", "int4"), act_formats=("int8",), targets=("weights", "activations"),
                            weight_calibration="minmax", num_samples=len(data), **overrides)
    return Sweep(model, data, config).run()


def output_noise(result: AnalysisResult) -> dict:
    return {t.key: t.output.mse for t in result.trials}


def test_estimate_equals_a_naive_jacobian_computation():
    """With as many basis vectors as outputs the estimate is ‖J·δ‖² exactly: compare with J built by
    torch.autograd.functional.jacobian per sample, applied to the local error by hand."""
    model, data = Classifier().eval(), classification_data(24)
    result = sweep(model, data, output_metrics="estimated", estimate_projections=10)
    x = data.inputs
    with torch.no_grad():
        h_a = torch.relu(model.a(x))
        y_b = model.b(h_a)
        scale = model.b.weight.abs().amax(dim=1, keepdim=True) / 7.5  # int4 symmetric per channel, minmax
        wq = torch.clamp(torch.round(model.b.weight / scale), -8, 7) * scale
        delta = nn.functional.linear(h_a, wq, model.b.bias) - y_b
    noise = diagonal = 0.0
    for s in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda y: model.head(torch.tanh(y)), y_b[s])  # [10, 32]
        noise += float((jac @ delta[s]).pow(2).sum())
        diagonal += float((jac.pow(2) @ delta[s].pow(2)).sum())  # the gradient-only variant: no cross terms
    estimated = result.trial("b", "weights", "int4").output
    assert estimated.mse == pytest.approx(noise / (len(x) * 10), rel=1e-4)
    assert diagonal != pytest.approx(noise, rel=0.01)  # the two estimators really differ here

    sim = Sweep(model, data, AnalysisConfig(weight_formats=("int4",), act_formats=(), targets=("weights",),
                                            weight_calibration="minmax", num_samples=len(data))).sim
    node = sim.sites("b")[0].node
    grads = output_gradients(sim, (0, len(x)), [node], projections=10)
    cache = sim.cache((0, len(x)))
    variant = NoiseEstimate(diagonal=True)
    variant.update(grads, {node: node_difference(nn.functional.linear(h_a, wq, model.b.bias), cache[node])})
    assert variant.result().mse == pytest.approx(diagonal / (len(x) * 10), rel=1e-4)
    assert math.isnan(estimated.cosine) and math.isnan(estimated.max_abs_error)  # not invented
    assert estimated.kl is None


def test_estimate_is_exact_where_the_rest_of_the_model_is_linear():
    """As many projections as logits: basis vectors, no sampling error, and the head is the output."""
    model, data = Classifier().eval(), classification_data()
    exact = output_noise(sweep(model, data))
    estimated = output_noise(sweep(model, data, output_metrics="estimated", estimate_projections=10))
    for key in [k for k in exact if k[0] == "head"]:
        assert estimated[key] == pytest.approx(exact[key], rel=1e-4), key


def test_random_projections_stay_within_their_sampling_error():
    """Eight Rademacher projections: relative standard error about sqrt(2 / (K·N)) = 3 % on 256
    samples, so every one of the 12 trials lands within 20 % (≥ 4 sigma) of the exact value. (With
    the default two, measured over 12 seeds: 4–9 % per trial, the worst of 12 trials up to 23 %.)"""
    model, data = Classifier().eval(), classification_data()
    exact = output_noise(sweep(model, data))
    estimated = output_noise(sweep(model, data, output_metrics="estimated", estimate_projections=8))
    for key in exact:
        assert estimated[key] == pytest.approx(exact[key], rel=0.2), key


def test_planted_outlier_layer_ranks_first_in_both():
    model, data = Classifier(outlier=True).eval(), classification_data()
    exact = output_noise(sweep(model, data))
    estimated = output_noise(sweep(model, data, output_metrics="estimated"))
    int4 = [k for k in exact if k[1] == "weights" and k[2] == "int4"]
    assert max(int4, key=exact.get)[0] == "b"
    assert max(int4, key=estimated.get)[0] == "b"


def test_local_metrics_do_not_depend_on_the_output_mode():
    """The estimate's forward with autograd doubles as the FP32 cache: local numbers must be the
    exact mode's, bit for bit."""
    model, data = Classifier().eval(), classification_data(48)
    exact = {t.key: t.local for t in sweep(model, data).trials}
    estimated = {t.key: t.local for t in sweep(model, data, output_metrics="estimated").trials}
    assert exact == estimated


def test_output_source_column_says_how_each_row_was_obtained(tmp_path):
    model, data = Classifier().eval(), classification_data(32)
    for mode, expected in (("exact", {"exact"}), ("estimated", {"estimated"}), ("none", {""})):
        frame = sweep(model, data, output_metrics=mode).to_frame()
        assert set(frame["output_source"]) == expected, mode
    result = sweep(model, data, output_metrics="estimated")
    path = result.save(tmp_path / "analysis.json")
    from analysis.results import load_analysis

    assert {t.output_source for t in load_analysis(path).trials} == {"estimated"}


def test_verify_turns_exactly_the_k_most_sensitive_rows_per_format_exact():
    model, data = Classifier(outlier=True).eval(), classification_data(64)
    estimated = sweep(model, data, output_metrics="estimated")
    verified = sweep(model, data, output_metrics="estimated", verify=1)
    exact = {t.key: t for t in sweep(model, data).trials}
    labels = {(t.target, t.format) for t in estimated.trials}
    for target, fmt in labels:
        rows = [t for t in estimated.trials if (t.target, t.format) == (target, fmt)]
        top = max(rows, key=lambda t: t.output.mse).key
        checked = [t for t in verified.trials if (t.target, t.format) == (target, fmt) and t.output_source == "exact"]
        assert [t.key for t in checked] == [top]
        assert checked[0].output.mse == pytest.approx(exact[top].output.mse, rel=1e-9)
    assert sum(t.output_source == "exact" for t in verified.trials) == len(labels)


def test_config_modes_and_legacy_flag():
    assert AnalysisConfig(output_metrics=True).output_metrics == "exact"
    assert AnalysisConfig(output_metrics=False).output_metrics == "none"
    with pytest.raises(ConfigError, match="estimated"):
        AnalysisConfig(verify=3)
    with pytest.raises(ConfigError, match="output metrics mode"):
        AnalysisConfig(output_metrics="guess")
    with pytest.raises(ConfigError, match="estimate_projections"):
        AnalysisConfig(output_metrics="estimated", estimate_projections=0)


def test_cli_estimated_run_marks_rows(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["analyze", "sample:mlp", "--data", "sample:mlp", "--samples", "64", "--act-formats", "none",
                 "--output-metrics", "estimated", "--verify", "1", "--quiet", "--out", str(out)])
    assert code == 0
    text = (out / "layers.csv").read_text()
    assert "estimated" in text and ",exact," in text
    assert main(["analyze", "sample:mlp", "--data", "sample:mlp", "--local-only", "--output-metrics", "exact",
                 "--out", str(tmp_path / "x")]) != 0
    assert "contradicts" in capsys.readouterr().err


def test_rademacher_vectors_are_fair_independent_signs():
    """Each entry ±1 with probability ½, entries uncorrelated (E[r·rᵀ] = I is what the estimate
    rests on), the same vector for the same generator state."""
    from analysis.estimate import rademacher

    r = rademacher((4000, 13), torch.Generator().manual_seed(0))
    assert r.shape == (4000, 13) and r.dtype == torch.float32
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(r.mean())) < 0.02  # 52 000 signs: standard error 0.0044
    second_moment = (r.T @ r) / r.shape[0]  # ≈ I: off-diagonal standard error 1/sqrt(4000) = 0.016
    assert torch.allclose(second_moment.diagonal(), torch.ones(13))
    assert (second_moment - torch.eye(13)).abs().max() < 0.08
    assert torch.equal(r, rademacher((4000, 13), torch.Generator().manual_seed(0)))
    assert rademacher((3,), torch.Generator().manual_seed(0)).shape == (3,)  # fewer entries than a byte's bits
