"""What runs is the user's model: in-place updates keep their meaning, a graph that would compute
something else is refused, and an output that ignores its input is flagged."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from analysis.cli import main
from analysis.config import QuantConfig
from analysis.data import Dataset
from analysis.formats import parse_format
from analysis.graph import ModelPreparationError
from analysis.quantsim import QuantlensWarning, QuantSim, quantize_weight
from analysis.sweep import AnalysisConfig, Sweep


class SliceAssign(nn.Module):
    """Slice assignment, masked_fill_ and copy_ on an intermediate (what T5's masks do): fx cannot
    trace the assignment, torch.export can, and its readers must see the updated value."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        h[:, 0] = 0.0
        h.masked_fill_(h < -0.5, -0.5)
        g = torch.empty_like(h)
        g.copy_(h * 2)
        return self.b(g + h)


def data(n=16):
    torch.manual_seed(1)
    return Dataset(torch.randn(n, 6), None, "other", "synthetic")


def test_in_place_updates_keep_their_meaning():
    model, d = SliceAssign().eval(), data()
    sweep = Sweep(model, d, AnalysisConfig(weight_formats=("int4",), act_formats=(), targets=("weights",),
                                           weight_calibration="minmax", num_samples=len(d)))
    result = sweep.run()
    reference = model(d.inputs).detach().double()
    for trial in result.trials:
        quantized = copy.deepcopy(model)
        weight = getattr(quantized, trial.layer).weight
        q, _, _ = quantize_weight(weight, parse_format("int4"), 0, "minmax", 99.99)
        with torch.no_grad():
            weight.copy_(q)
        out = quantized(d.inputs).detach().double()
        naive = 10 * math.log10(float(reference.pow(2).sum() / (reference - out).pow(2).sum()))
        assert trial.output.sqnr_db == pytest.approx(naive, abs=0.01), trial.layer


class PositionSlice(nn.Module):
    """A buffer sliced by the input's length (fx cannot trace it; torch.export can) and only pure ops."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 8)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        return torch.relu(self.a(x)) * self.scale[: x.shape[1] + 2]


def test_functionalisation_only_when_something_writes_in_place(monkeypatch):
    """Re-tracing to functionalise costs seconds on big models: it runs for a program with in-place
    ops, whose readers need it, and is skipped for a pure one, which runs the same either way."""
    from analysis import graph

    calls = []
    original = torch.export.ExportedProgram.run_decompositions
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    for model, mutates in ((SliceAssign().eval(), True), (PositionSlice().eval(), False)):
        calls.clear()
        program = graph._export(model, data(4).inputs)
        assert graph._may_mutate(program) is mutates
        sim = QuantSim(model, data(), QuantConfig(num_samples=16))
        assert sim.prepared.source == "export"
        assert len(calls) == (1 if mutates else 0), type(model).__name__
        # the graph that runs gives the model's own output either way
        with torch.no_grad():
            expected = model(data().inputs)
        got = sim.output_of(sim.cache((0, 16)))
        assert torch.allclose(got, expected, atol=1e-6)


def test_a_graph_that_computes_something_else_is_refused(monkeypatch):
    """Break the prepared graph on purpose (drop the functionalisation that keeps in-place updates
    right): the comparison with the user's own forward must refuse it."""
    import analysis.graph as graph

    original = graph.torch.export.ExportedProgram.run_decompositions
    monkeypatch.setattr(graph.torch.export.ExportedProgram, "run_decompositions", lambda self, *a, **k: self)
    try:
        with pytest.raises(ModelPreparationError, match="computes something other than your model"):
            QuantSim(SliceAssign().eval(), data(), QuantConfig(num_samples=16))
    finally:
        monkeypatch.setattr(graph.torch.export.ExportedProgram, "run_decompositions", original)


class ZeroHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_constant_output_is_flagged(tmp_path, capsys):
    with pytest.warns(QuantlensWarning, match="same for every input"):
        QuantSim(ZeroHead().eval(), data(), QuantConfig(num_samples=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantlensWarning)
        QuantSim(SliceAssign().eval(), data(), QuantConfig(num_samples=16))  # a normal model: no warning
        QuantSim(ZeroHead().eval(), Dataset(torch.ones(4, 6), None, "other", "same"), QuantConfig(num_samples=4))

    factory = tmp_path / "zero.py"
    factory.write_text("import torch\nfrom torch import nn\n\n\ndef build():\n"
                       "    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))\n"
                       "    nn.init.zeros_(m[2].weight)\n    nn.init.zeros_(m[2].bias)\n    return m\n")
    import numpy as np

    np.savez(tmp_path / "x.npz", inputs=np.random.default_rng(0).normal(size=(16, 6)).astype("float32"))
    assert main(["analyze", f"{factory}:build", "--data", str(tmp_path / "x.npz"), "--act-formats", "none",
                 "--quiet", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "quantlens: warning: the model's output is the same for every input" in err
    assert len([line for line in err.splitlines() if "same for every input" in line]) == 1


class NoisyHead(nn.Module):
    """Noise added in forward, small enough to pass a loose comparison but not the 60 dB bar."""

    def __init__(self, noise: float):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 8)
        self.noise = noise

    def forward(self, x):
        y = self.a(x)
        return y + self.noise * torch.randn_like(y)


def _graph_runs(monkeypatch) -> list:
    calls: list = []
    original = QuantSim.capture
    monkeypatch.setattr(QuantSim, "capture", lambda self, inputs: calls.append(len(inputs)) or original(self, inputs))
    return calls


def test_a_faithful_model_is_run_once_by_the_checks_a_random_one_twice(monkeypatch):
    """Agreement with the user's own forward implies run-to-run agreement (a random forward differs
    between any two runs), so the second graph run is only made when that comparison fails — and
    then it still names randomness, not the graph, as the cause."""
    calls = _graph_runs(monkeypatch)
    QuantSim(SliceAssign().eval(), data(), QuantConfig(num_samples=16))
    assert calls.count(2) == 1  # the checks' batch of 2 samples; the chunk planning captures 1
    calls.clear()
    with pytest.raises(ModelPreparationError, match="two FP32 runs of the model on the same input disagree"):
        QuantSim(NoisyHead(1e-2).eval(), data(), QuantConfig(num_samples=16))
    assert calls.count(2) == 2
    calls.clear()
    QuantSim(NoisyHead(0.0).eval(), data(), QuantConfig(num_samples=16))  # the same model, not random: accepted
    assert calls.count(2) == 1
