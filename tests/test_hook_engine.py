"""The hook engine (analysis.hooks): the sweep on the eager model with forward hooks gives the graph
engine's table on models both can run, and numbers equal to a naive replace-the-weight-and-run-the-
real-model reference on models no tracer handles."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.config import ConfigError
from analysis.data import Dataset
from analysis.formats import parse_format
from analysis.graph import ModelPreparationError
from analysis.hooks import HookSim
from analysis.quantsim import QuantlensWarning, QuantSim, quantize_weight
from analysis.sweep import AnalysisConfig, Sweep
from tests._hook_models import Branchy, branchy_data


def run(model, data, engine, **overrides):
    config = dict(weight_formats=("int8", "int4"), act_formats=("int8",), num_samples=len(data), engine=engine,
                  fold_batchnorm=False)
    config.update(overrides)
    sweep = Sweep(model, data, AnalysisConfig(**config))
    return sweep, sweep.run()


def rows(result):
    out = {}
    for trial in result.trials:
        assert trial.ok, (trial.layer, trial.error)
        out[(trial.layer, trial.target, trial.weight_format, trial.act_format)] = (
            trial.local.as_dict("local_"), trial.output.as_dict("output_") if trial.output else {})
    return out


def assert_same_table(graph_result, hook_result):
    graph_rows, hook_rows = rows(graph_result), rows(hook_result)
    assert graph_rows.keys() == hook_rows.keys()
    for key, (local, output) in graph_rows.items():
        for expected, got in ((local, hook_rows[key][0]), (output, hook_rows[key][1])):
            assert expected.keys() == got.keys(), key
            for name, value in expected.items():
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    assert got[name] is None or math.isnan(got[name]), (key, name)
                else:
                    assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, name)
    assert [layer.name for layer in graph_result.layers] == [layer.name for layer in hook_result.layers]
    assert [s.name for s in graph_result.skipped] == [s.name for s in hook_result.skipped]
    if graph_result.model["source"] == "fx":  # an exported graph names parameters, not modules: its reasons are coarser
        assert [s.reason for s in graph_result.skipped] == [s.reason for s in hook_result.skipped]


def sample(name, n):
    from analysis.loading import load_data, load_model

    return load_model(f"sample:{name}"), load_data(f"sample:{name}").take(n)


@pytest.mark.parametrize("name, n, weight_formats, act_formats, targets", [
    ("mlp", 24, ("int8", "int4"), ("int8",), ("weights", "activations", "both")),
    ("cnn", 8, ("int4",), ("mxfp8_e4m3",), ("weights", "activations")),
    ("transformer", 4, ("int4",), ("int8",), ("weights", "activations")),
])
def test_both_engines_give_the_same_table_on_the_samples(name, n, weight_formats, act_formats, targets):
    model, data = sample(name, n)
    kwargs = dict(weight_formats=weight_formats, act_formats=act_formats, targets=targets)
    graph_sweep, graph_result = run(model, data, "graph", **kwargs)
    hook_sweep, hook_result = run(model, data, "hooks", **kwargs)
    assert graph_result.model["source"] == "fx" and hook_result.model["source"] == "hooks"
    assert_same_table(graph_result, hook_result)
    assert hook_result.model["weight_coverage"] == graph_result.model["weight_coverage"]
    if name == "transformer":  # its blocks are a ModuleList: trials re-run from the block of the layer
        assert hook_sweep.sim.units == ["blocks.0", "blocks.1"]


def test_both_engines_give_the_same_table_on_a_hugging_face_llama():
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (quantlens[hf])")
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1)).eval()
    ids = torch.randint(0, 64, (4, 6))
    data = Dataset(ids, ids, "language-model", "tokens")
    kwargs = dict(weight_formats=("int4",), dynamic_activations=True, targets=("weights", "activations"))
    _, graph_result = run(lm, data, "graph", **kwargs)
    hook_sweep, hook_result = run(lm, data, "hooks", **kwargs)
    assert_same_table(graph_result, hook_result)
    assert hook_sweep.sim.units == ["model.layers.0", "model.layers.1"]
    assert {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"} <= set(hook_sweep.sim.layer_names)
    assert lm.config.use_cache is True  # the private copy's cache went off, not the caller's


def naive_sqnr(model, inputs, param, fmt):
    """Replace one weight in a copy of the real model by its fake-quantized value and run it;
    also the layer's own output on its FP32 input (captured with a hook) against the quantized one."""
    reference = model(inputs).detach().double()
    quantized = copy.deepcopy(model)
    weight = dict(quantized.named_parameters())[param]
    q, _, _ = quantize_weight(weight, parse_format(fmt), 0, "minmax", 99.99)
    with torch.no_grad():
        weight.copy_(q)
    out = quantized(inputs).detach().double()
    return 10 * math.log10(float(reference.pow(2).sum() / (reference - out).pow(2).sum()))


def naive_local_sqnr(model, inputs, layer, fmt):
    module = model.get_submodule(layer)
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    with torch.no_grad():
        model(inputs)
    handle.remove()
    q, _, _ = quantize_weight(module.weight, parse_format(fmt), 0, "minmax", 99.99)
    signal = sum(float(o.double().pow(2).sum()) for _, o in seen)
    noise = sum(float((F.linear(x, q.detach(), module.bias).detach().double() - o.double()).pow(2).sum()) for x, o in seen)
    return 10 * math.log10(signal / noise)


def test_a_model_no_tracer_handles_is_refused_by_the_graph_engine_and_measured_by_hooks():
    model, data = Branchy().eval(), branchy_data()
    with pytest.raises(ModelPreparationError, match="could not trace"):
        QuantSim(model, data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sweep, result = run(model, data, "hooks", weight_formats=("int4",), act_formats=(), targets=("weights",),
                        weight_calibration="minmax")
    assert [layer.name for layer in result.layers] == ["inp", "blocks.0.0", "blocks.1.0", "blocks.2.0", "shared", "head"]
    assert sweep.sim.layer("shared").sites == ("shared", "shared_1")  # called twice: two sites, one weight
    for trial in result.trials:
        assert trial.output.sqnr_db == pytest.approx(naive_sqnr(model, data.inputs, f"{trial.layer}.weight", "int4"),
                                                     abs=0.01), trial.layer
        assert trial.local.sqnr_db == pytest.approx(naive_local_sqnr(model, data.inputs, trial.layer, "int4"),
                                                    abs=0.01), trial.layer
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the caller's model is untouched


def test_auto_falls_back_to_hooks_with_one_warning_and_graph_alone_refuses():
    model, data = Branchy().eval(), branchy_data()
    with pytest.warns(QuantlensWarning, match="cannot run this model .* hook engine"):
        sweep = Sweep(model, data, AnalysisConfig(num_samples=len(data), engine="auto"))
    assert isinstance(sweep.sim, HookSim)
    with pytest.raises(ModelPreparationError, match="could not trace"):
        Sweep(model, data, AnalysisConfig(num_samples=len(data), engine="graph"))
    wrong_width = Dataset(torch.randn(4, 5), None, "other", "synthetic")
    with pytest.raises(ModelPreparationError, match="could not trace .*; the hook engine could not run it either: "
                       "the model failed on the first batch") as info:  # both fail: both reasons, one line
        Sweep(model, wrong_width, AnalysisConfig(num_samples=4))
    assert "\n" not in str(info.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a traceable model takes the graph, silently
        assert type(Sweep(nn.Linear(6, 3), data, AnalysisConfig(num_samples=len(data))).sim) is QuantSim


def test_block_re_runs_start_at_the_block_of_the_layer():
    """A trial runs only the blocks from the one containing its layer onwards; blocks before it
    give their cached FP32 output. Counted on the sweep's private copy."""
    model, data = Branchy().eval(), branchy_data(8)
    config = AnalysisConfig(weight_formats=("int4",), act_formats=(), targets=("weights",), num_samples=len(data),
                            engine="hooks")
    sweep = Sweep(model, data, config)
    assert sweep.sim.units == ["blocks.0", "blocks.1", "blocks.2"]
    sim = sweep.sim
    cache = sim.cache((0, len(data)))
    calls = {name: 0 for name in sim.units}
    for name in calls:  # the block's insides: a skipped block's own hooks still fire, its forward does not run
        sim.prepared.eager.get_submodule(f"{name}.1").register_forward_pre_hook(
            lambda m, a, name=name: calls.__setitem__(name, calls[name] + 1))
    sim.rerun(cache, [], sim.overrides({"blocks.2.0": (parse_format("int4"), None)}))
    assert calls == {"blocks.0": 0, "blocks.1": 0, "blocks.2": 1}
    sim.rerun(cache, [], sim.overrides({"head": (parse_format("int4"), None)}))
    assert calls == {"blocks.0": 0, "blocks.1": 0, "blocks.2": 1}  # nothing after the blocks needs them
    sim.rerun(cache, [], sim.overrides({"inp": (parse_format("int4"), None)}))
    assert calls == {"blocks.0": 1, "blocks.1": 1, "blocks.2": 2}


class InPlaceBlock(nn.Module):
    """A block that writes its result into its input and returns nothing useful: skipping it with
    a cached output would lose the write, so block re-runs must be left off."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, h):
        h.add_(self.fc(h))
        return None


class InPlaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(InPlaceBlock() for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = x.clone()
        for block in self.blocks:
            block(h)
        return self.head(h)


def test_blocks_with_side_effects_are_re_run_and_numbers_stay_right():
    model, data = InPlaceNet().eval(), Dataset(torch.randn(8, 8), None, "other", "synthetic")
    sweep, result = run(model, data, "hooks", weight_formats=("int4",), act_formats=(), targets=("weights",),
                        weight_calibration="minmax")
    assert sweep.sim.units == []
    for trial in result.trials:
        assert trial.output.sqnr_db == pytest.approx(naive_sqnr(model, data.inputs, f"{trial.layer}.weight", "int4"),
                                                     abs=0.01), trial.layer


class Gated(nn.Module):
    """Which layer runs depends on the data: the hook engine needs the same calls in every batch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) if x[0, 0] > 0 else self.b(x)


def gated_data():
    inputs = torch.randn(8, 4)
    inputs[0, 0], inputs[4, 0] = 1.0, -1.0
    return Dataset(inputs, None, "other", "synthetic")


def test_layer_calls_that_change_between_batches_are_refused_in_one_line():
    data = gated_data()
    with pytest.raises(ModelPreparationError, match="same layer calls for every batch") as info:
        Sweep(Gated().eval(), data, AnalysisConfig(num_samples=8, engine="hooks", cache_bytes=1 << 16)).sim.cache((4, 8))
    assert "\n" not in str(info.value)


def test_what_the_hook_engine_cannot_do_is_refused():
    data = branchy_data()
    with pytest.raises(ValueError, match="estimated output metrics .* hook engine"):
        Sweep(Branchy(), data, AnalysisConfig(num_samples=16, engine="hooks", output_metrics="estimated"))
    with pytest.raises(ConfigError, match="unknown engine"):
        AnalysisConfig(engine="fast")
    exported = torch.export.export(nn.Linear(6, 3), (torch.randn(2, 6),))
    with pytest.raises(ModelPreparationError, match="hook engine runs an nn.Module"):
        HookSim(exported, data)
    with pytest.warns(QuantlensWarning, match="BatchNorm unfolded"):
        HookSim(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)), data)


def test_the_simulator_forward_runs_an_assignment_like_the_graph_engine():
    model, data = sample("mlp", 16)
    assignment = {"fc1": (parse_format("int4"), parse_format("int8")), "fc3": (parse_format("int8"), None)}
    graph = QuantSim(model, data).forward(data.inputs, assignment)
    hooks = HookSim(model, data).forward(data.inputs, assignment)
    assert torch.allclose(graph, hooks, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(hooks, HookSim(model, data).forward(data.inputs), rtol=1e-3)


def test_cli_engine_flag(tmp_path, capsys):
    import numpy as np

    from analysis.cli import main

    source = tmp_path / "net.py"
    source.write_text("import torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n"
                      "    def __init__(self):\n        super().__init__()\n        torch.manual_seed(0)\n"
                      "        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)\n\n"
                      "    def forward(self, x):\n        h = self.a(x)\n        if h.sum() > 0:\n            h = -h\n"
                      "        return self.b(h)\n\n\ndef build():\n    return Net()\n")
    np.savez(tmp_path / "data.npz", inputs=np.random.default_rng(0).standard_normal((16, 6)).astype("float32"))
    common = [f"{source}:build", "--data", str(tmp_path / "data.npz"), "--act-formats", "none", "--quiet"]
    assert main(["analyze", *common, "--engine", "hooks", "--out", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert "engine: hooks" in out and "analysed 2 layers" in out
    assert main(["analyze", *common, "--engine", "graph", "--out", str(tmp_path / "g")]) != 0
    assert "could not trace the model" in capsys.readouterr().err
