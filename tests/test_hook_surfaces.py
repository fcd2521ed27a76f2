"""Every command on a model only the hook engine runs: analyze -> suggest -> evaluate -> export (and
the real kernels), through the API and the CLI, with the engine the analysis used; numbers equal to
the graph engine's on a model both run and to a naive reference on one only hooks run; what needs a
graph (ONNX, fine-tuning) refused in one line."""

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch

from analysis.allocate import build_problem, parse_budget, suggest
from analysis.allocate.judging import judging
from analysis.cli import main
from analysis.config import AnalysisConfig, QATConfig, QuantConfig
from analysis.evaluate import Evaluator
from analysis.export import ExportError, build_sim, export_map, quantization_parameters
from analysis.formats import parse_format
from analysis.hooks import HookSim, module_layers
from analysis.loading import load_data, load_model
from analysis.precision_map import LayerPrecision, PrecisionMap
from analysis.provenance import Provenance
from analysis.qat import QATError, finetune_qat
from analysis.quantsim import QuantlensWarning, QuantSim, quantize_weight
from analysis.real import analysed_layers
from analysis.sweep import Sweep
from tests._hook_models import build, labelled_data

BRANCHY_LAYERS = ["inp", "blocks.0.0", "blocks.1.0", "blocks.2.0", "shared", "head"]


def naive_output(model, inputs, pmap):
    """The map applied by hand: each named layer's weight replaced, in a copy of the eager model, by its
    fake-quantized value (weight-only maps), then the model run as written."""
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for layer, precision in pmap.layers.items():
            fmt = parse_format(precision.weight, "weight")
            if fmt.is_identity:
                continue
            weight = quantized.get_submodule(layer).weight
            q, _, _ = quantize_weight(weight, fmt, 0, pmap.quant.weight_calibration, pmap.quant.percentile)
            weight.copy_(q)
        return quantized(inputs)


def sqnr_db(reference, output):
    reference, output = reference.double(), output.double()
    return 10 * math.log10(float(reference.pow(2).sum() / (reference - output).pow(2).sum()))


@pytest.fixture(scope="module")
def branchy_flow():
    """analyze (auto: falls back to hooks) -> suggest with real evaluations, through the API."""
    model, data = build(), labelled_data()
    config = AnalysisConfig(weight_formats=("int8", "int4"), act_formats=(), targets=("weights",),
                            num_samples=len(data), fold_batchnorm=False)
    with pytest.warns(QuantlensWarning, match="hook engine"):
        result = Sweep(model, data, config).run()
    provenance = Provenance.of_result(result)
    evaluator = Evaluator(model, data, data, QuantConfig.from_dict(result.config["quant"]), engine=provenance.engine)
    problem = build_problem(result)
    judge = judging(evaluator, "calibration", problem.signal)
    suggestion = suggest(problem, parse_budget("avg-bits=6"), measure=judge.measure, provenance=provenance.to_dict(),
                         evaluations=4, use_metric=judge.use_metric)
    return model, data, result, evaluator, suggestion


def test_the_analysis_records_the_engine_it_used_and_suggest_measures_with_it(branchy_flow):
    _, _, result, evaluator, suggestion = branchy_flow
    assert result.model["engine"] == "hooks" and Provenance.of_result(result).engine == "hooks"
    assert isinstance(evaluator.sim, HookSim)
    pmap = suggestion.map
    assert pmap.provenance["engine"] == "hooks"
    bits = {parse_format(p.weight, "weight").bits for p in pmap.layers.values()}
    assert 4 in bits  # something is quantized to 4 bits at a 6-bit average
    assert suggestion.measured and math.isfinite(suggestion.measured["sqnr_db"])


def test_a_map_evaluated_with_hooks_is_really_quantized_and_matches_a_naive_application(branchy_flow):
    model, data, _, evaluator, suggestion = branchy_flow
    pmap = suggestion.map
    evaluation = evaluator.evaluate(pmap)
    fp32 = evaluator.evaluate(PrecisionMap({}, quant=pmap.quant))
    assert fp32.output.mse == 0.0  # FP32 reads the metrics' ceiling (100 dB)
    assert math.isfinite(evaluation.output.sqnr_db) and evaluation.output.sqnr_db < fp32.output.sqnr_db
    with torch.no_grad():
        naive = sqnr_db(model(data.inputs), naive_output(model, data.inputs, pmap))
    assert evaluation.output.sqnr_db == pytest.approx(naive, rel=1e-4)
    # the figure suggest wrote into the map is this evaluation's (judged on the same data)
    assert suggestion.measured["sqnr_db"] == pytest.approx(evaluation.output.sqnr_db, rel=1e-4)


def test_exports_of_a_hooks_map_carry_the_hook_engines_numbers(branchy_flow, tmp_path):
    model, data, _, _, suggestion = branchy_flow
    pmap = suggestion.map
    path = export_map(pmap, "aimet", tmp_path / "enc.json", model=model, calibration=data)
    params = json.loads(path.read_text())["param_encodings"]
    for layer, precision in pmap.layers.items():
        fmt = parse_format(precision.weight, "weight")
        if fmt.is_identity:
            assert f"{layer}.weight" not in params
            continue
        weight = model.get_submodule(layer).weight.detach()
        _, lo, hi = quantize_weight(weight, fmt, 0, pmap.quant.weight_calibration, pmap.quant.percentile)
        encodings = params[f"{layer}.weight"]
        assert len(encodings) == weight.shape[0] and encodings[0]["bitwidth"] == fmt.bits
        for row, enc in enumerate(encodings):  # AIMET's scale, (max - min) / (2^bits - 1), is ours
            assert enc["max"] - enc["min"] == pytest.approx(float(hi[row] - lo[row]), rel=1e-5)
    for target in ("torchao", "compressed-tensors", "modelopt"):  # layers listed from the modules, no tracing
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            export_map(pmap, target, tmp_path / f"{target}.json", model=model)
    torchao = json.loads((tmp_path / "torchao.json").read_text())
    quantized = [name for name, p in pmap.layers.items() if not parse_format(p.weight, "weight").is_identity]
    assert sorted(torchao["layers"]) == sorted(quantized)
    ort = json.loads(export_map(pmap, "ort", tmp_path / "types.json").read_text())  # no model: types only
    assert ort["pinned_scales"] is False


def test_what_needs_a_graph_is_refused_in_one_line(branchy_flow, tmp_path):
    model, data, _, _, suggestion = branchy_flow
    pmap = suggestion.map
    for target in ("onnx", "ort"):
        with pytest.raises(ExportError, match="torch.export cannot capture this one .*export --to aimet") as info:
            export_map(pmap, target, tmp_path / f"m.{target}", model=model, calibration=data)
        assert "\n" not in str(info.value)
        assert not list(tmp_path.glob("*.onnx"))
    with pytest.raises(QATError, match="runs on the hook engine .* make forward traceable") as info:
        finetune_qat(model, pmap, data, data, config=QATConfig(epochs=1))
    assert "\n" not in str(info.value)


def test_the_real_kernel_path_runs_the_hook_engines_simulation(branchy_flow):
    model, data, _, _, suggestion = branchy_flow
    from analysis.real import evaluate_real

    real = evaluate_real(model, data, data, suggestion.map, repeats=1, warmup=0)
    assert math.isfinite(real.output.sqnr_db) and real.extra["sim_vs_real_sqnr_db"] > 30
    assert "BatchNorm" not in " ".join(real.notes)


def test_module_layers_are_the_layers_the_hook_engine_finds():
    model, data = build(), labelled_data(8)
    sim = HookSim(model, data, QuantConfig(num_samples=8))
    listed = module_layers(model)
    assert sorted((l.name, l.kind, l.weight_shape) for l in listed) == \
        sorted((l.name, l.kind, l.weight_shape) for l in sim.layers)
    assert [l.name for l in analysed_layers(model, engine="hooks")] == BRANCHY_LAYERS
    with pytest.warns(QuantlensWarning, match="cannot trace this model .* as the hook engine sees them"):
        assert [l.name for l in analysed_layers(model)] == BRANCHY_LAYERS
    with pytest.raises(Exception, match="could not trace"):
        analysed_layers(model, engine="graph")


# --- the same map, both engines, on a model both run ---------------------------------------------


@pytest.fixture(scope="module")
def mlp_both():
    model = load_model("sample:mlp")
    data = load_data("sample:mlp", "calibration").take(64)
    pmap = PrecisionMap({"fc1": LayerPrecision("int4", "int8"), "fc2": LayerPrecision("int8", "int8"),
                         "fc3": LayerPrecision("int4", None)}, quant=QuantConfig(num_samples=64))
    return model, data, pmap


def test_both_engines_measure_the_same_map_alike(mlp_both):
    model, data, pmap = mlp_both
    graph = Evaluator(model, data, data, pmap.quant, engine="graph")
    hooks = Evaluator(model, data, data, pmap.quant, engine="hooks")
    assert type(graph.sim) is QuantSim and isinstance(hooks.sim, HookSim)
    by_graph, by_hooks = graph.evaluate(pmap), hooks.evaluate(pmap)
    assert math.isfinite(by_hooks.output.sqnr_db) and by_hooks.output.sqnr_db < 60
    assert by_hooks.output.sqnr_db == pytest.approx(by_graph.output.sqnr_db, rel=1e-4)
    assert by_hooks.metric == pytest.approx(by_graph.metric, abs=1e-9)


def test_both_engines_export_the_same_numbers(mlp_both, tmp_path):
    model, data, pmap = mlp_both
    graph = quantization_parameters(build_sim(pmap, model, data, "graph"), pmap)
    hooks = quantization_parameters(build_sim(pmap, model, data, "hooks"), pmap)
    assert graph.keys() == hooks.keys()
    for layer, entry in graph.items():
        assert entry["weight"] == hooks[layer]["weight"], layer
        for a, b in zip(entry["activations"], hooks[layer]["activations"], strict=True):
            assert (a["scale"], a["zero_point"]) == pytest.approx((b["scale"], b["zero_point"]), rel=1e-6), layer
    files = {}
    for engine in ("graph", "hooks"):  # ORT: the hook engine's eager model goes through torch.export
        path = export_map(pmap, "ort", tmp_path / engine / "ort.json", model=model, calibration=data, engine=engine)
        files[engine] = json.loads(path.read_text())["quantize_static"]["extra_options"]["TensorQuantOverrides"]
    assert files["graph"].keys() == files["hooks"].keys()
    for tensor, settings in files["graph"].items():
        assert len(settings) == len(files["hooks"][tensor]), tensor
        for a, b in zip(settings, files["hooks"][tensor]):
            assert a.keys() == b.keys(), tensor
            for key, value in a.items():
                assert b[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), (tensor, key)


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_flow_on_a_model_only_hooks_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from pathlib import Path

    source = Path(__file__).with_name("_hook_models.py")
    data = labelled_data()
    np.savez(tmp_path / "data.npz", inputs=data.inputs.numpy(), labels=data.labels.numpy())
    model_spec, data_spec = f"{source}:build", str(tmp_path / "data.npz")
    assert main(["analyze", model_spec, "--data", data_spec, "--act-formats", "none", "--no-fold-batchnorm",
                 "--targets", "weights", "--quiet", "--out", "run"]) == 0
    assert "engine: hooks" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "analysis.json").read_text())["model"]["engine"] == "hooks"

    assert main(["suggest", "run", "--budget", "avg-bits=6", "--evaluations", "3", "--front-points", "0"]) == 0
    out = capsys.readouterr().out
    assert "engine: hooks" in out  # suggest measured its maps with the engine the analysis used
    measured = float(out.split("measured: output SQNR ")[1].split(" dB")[0])
    pmap = json.loads((tmp_path / "run" / "map.json").read_text())
    assert pmap["provenance"]["engine"] == "hooks"

    assert main(["evaluate", "--data", data_spec, "--map", "run/map.json", "--out", "eval.json"]) == 0
    assert "engine: hooks" in capsys.readouterr().out
    evaluated = {e["label"]: e for e in json.loads((tmp_path / "eval.json").read_text())}
    sqnr = evaluated["map.json"]["output"]["sqnr_db"]
    assert math.isfinite(sqnr) and sqnr == pytest.approx(measured, abs=0.05)  # suggest prints one decimal

    assert main(["export", "run/map.json", "--to", "aimet", "--out", "enc.json"]) == 0
    assert (tmp_path / "enc.json").exists()
    assert main(["export", "run/map.json", "--to", "torchao", "--out", "torchao.json"]) == 0
    capsys.readouterr()

    assert main(["export", "run/map.json", "--to", "ort", "--out", "ort.json"]) != 0
    err = capsys.readouterr().err.strip()
    assert "torch.export cannot capture this one" in err and len(err.splitlines()) == 1
    assert main(["finetune", "--data", data_spec, "--map", "run/map.json", "--quiet", "--out", "t.safetensors"]) != 0
    err = capsys.readouterr().err.strip()
    assert "hook engine" in err and len(err.splitlines()) == 1 and not (tmp_path / "t.safetensors").exists()
    # --engine overrides what the map records: the graph engine cannot trace this model
    assert main(["evaluate", "--data", data_spec, "--map", "run/map.json", "--engine", "graph"]) != 0
    err = capsys.readouterr().err.strip()
    assert "could not trace" in err and len(err.splitlines()) == 1


def test_the_engine_a_command_uses():
    class Result:  # an analysis.json written before the engine was recorded: its source says it
        def __init__(self, model):
            self.model, self.data = model, {}

    assert Provenance.of_result(Result({"source": "hooks"})).engine == "hooks"
    assert Provenance.of_result(Result({"source": "export"})).engine == "graph"
    assert Provenance.of_result(Result({"source": "hooks", "engine": "graph"})).engine == "graph"
    assert Provenance.of_result(Result({})).engine is None
    from analysis.provenance import engine_for

    assert engine_for(None, Provenance(engine="hooks")) == "hooks"  # reused
    assert engine_for("graph", Provenance(engine="hooks")) == "graph"  # --engine overrides
    assert engine_for(None, Provenance()) == "auto"  # nothing recorded
