"""One map, one meaning: every surface quantizes with the map's own QuantConfig, and every consumer
refuses a model, or weights, the map or run was not made for."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from analysis.cli import main
from analysis.config import QuantConfig
from analysis.evaluate import Evaluator
from analysis.precision_map import load_map

# Deliberately not the defaults (mse / percentile / 256): a surface that falls back to defaults
# instead of the map's config measures different numbers and fails these tests.
QUANT_FLAGS = ["--weight-calibration", "minmax", "--act-calibration", "minmax", "--samples", "40"]

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))
""")


def _trained_weights(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.ReLU(), torch.nn.Linear(24, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_model")
    (root / "net.py").write_text(FACTORY)
    _trained_weights(root / "w.safetensors", seed=7)
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((96, 8)).astype(np.float32)
    labels = (inputs[:, :4].argmax(axis=1)).astype(np.int64)
    np.savez(root / "data.npz", inputs=inputs, labels=labels)
    out = root / "run"
    code = main(["analyze", f"{root / 'net.py'}:build", "--weights", str(root / "w.safetensors"), "--data",
                 str(root / "data.npz"), "--weight-formats", "int8,int4", "--act-formats", "int8", "--quiet",
                 *QUANT_FLAGS, "--out", str(out)])
    assert code == 0
    code = main(["suggest", str(out), "--budget", "avg-bits=6", "--front-points", "0"])
    assert code == 0
    return root, out


def _model(root: Path):
    from analysis.loading import load_model

    return load_model(f"{root / 'net.py'}:build", str(root / "w.safetensors"))


def _data(root: Path):
    from analysis.loading import load_data

    return load_data(str(root / "data.npz"))


def test_the_map_carries_the_runs_quant_config_and_provenance(project):
    root, out = project
    pmap = load_map(out / "map.json")
    assert pmap.quant == QuantConfig(weight_calibration="minmax", act_calibration="minmax", num_samples=40)
    assert pmap.provenance["weights"] == str((root / "w.safetensors").resolve())
    assert Path(pmap.provenance["model_spec"].rsplit(":", 1)[0]).is_absolute()


def test_cli_evaluate_measures_what_the_api_measures_with_the_maps_config(project, tmp_path):
    root, out = project
    pmap = load_map(out / "map.json")
    api = Evaluator(_model(root), _data(root), _data(root), pmap.quant).evaluate(pmap)
    # No model named: the map's provenance names it (same weights file, same hash).
    code = main(["evaluate", "--data", str(root / "data.npz"), "--map", str(out / "map.json"),
                 "--out", str(tmp_path / "eval.json")])
    assert code == 0
    cli = json.loads((tmp_path / "eval.json").read_text())[1]
    assert cli["metric"] == pytest.approx(api.metric, abs=0)
    assert cli["output"]["sqnr_db"] == pytest.approx(api.output.sqnr_db, rel=1e-12)
    # With the default config instead, the numbers differ: the test above can fail.
    other = Evaluator(_model(root), _data(root), _data(root), QuantConfig()).evaluate(pmap)
    assert other.output.sqnr_db != pytest.approx(api.output.sqnr_db, rel=1e-6)


def test_finetune_epoch_zero_reproduces_the_simulation(project):
    from analysis.finetune import finetune_qat

    root, out = project
    pmap = load_map(out / "map.json")
    data = _data(root)
    from analysis.config import QATConfig

    result = finetune_qat(_model(root), pmap, data, data, evaluation=data, config=QATConfig(epochs=0))
    api = Evaluator(_model(root), data.take(pmap.quant.num_samples), data, pmap.quant).evaluate(pmap)
    assert result.kept == "ptq" and result.qat is None
    assert result.ptq == pytest.approx(api.metric, abs=0)
    assert result.returned == pytest.approx(api.metric, abs=0)
    assert result.ptq_output_sqnr_db == pytest.approx(api.output.sqnr_db, rel=1e-9)


def test_the_dashboard_builds_the_same_map_object(project):
    from analysis.results import load_analysis
    from dashboard import derived

    _, out = project
    result = load_analysis(out)
    pmap = load_map(out / "map.json")
    table = derived.map_table(derived.problem(str(out), result), pmap)
    edited = derived.map_from_table(table, result)
    assert edited.quant == pmap.quant and edited.layers == pmap.layers and edited.model == pmap.model


@pytest.mark.parametrize("command", ["evaluate", "finetune", "export"])
def test_every_consumer_refuses_another_models_map(project, tmp_path, capsys, command):
    root, out = project
    other = tmp_path / "other.safetensors"
    _trained_weights(other, seed=8)
    argv = {"evaluate": ["evaluate", f"{root / 'net.py'}:build", "--weights", str(other), "--data",
                         str(root / "data.npz"), "--map", str(out / "map.json")],
            "finetune": ["finetune", f"{root / 'net.py'}:build", "--weights", str(other), "--data",
                         str(root / "data.npz"), "--map", str(out / "map.json"), "--epochs", "0",
                         "--out", str(tmp_path / "tuned.safetensors")],
            "export": ["export", str(out / "map.json"), "--to", "aimet", "--model", f"{root / 'net.py'}:build",
                       "--weights", str(other), "--data", str(root / "data.npz"), "--out", str(tmp_path / "enc.json")],
            }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "was made for model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "tuned.safetensors").exists() and not (tmp_path / "enc.json").exists()


def test_suggest_refuses_when_the_analysed_weights_changed(project, tmp_path, capsys):
    root, out = project
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("analysis.json", "layers.csv"):
        (copy / name).write_bytes((out / name).read_bytes())
    payload = json.loads((copy / "analysis.json").read_text())
    moved = tmp_path / "w.safetensors"
    moved.write_bytes((root / "w.safetensors").read_bytes())
    payload["model"]["weights"] = str(moved)
    (copy / "analysis.json").write_text(json.dumps(payload))
    assert main(["suggest", str(copy), "--budget", "avg-bits=6", "--front-points", "0"]) == 0  # same bytes: fine
    _trained_weights(moved, seed=9)  # the file now holds other weights
    assert main(["suggest", str(copy), "--budget", "avg-bits=6", "--front-points", "0"]) == 2
    err = capsys.readouterr().err
    assert "changed since" in err and "--weights" in err


def test_the_qdq_onnx_export_runs_the_maps_quantizers(project, tmp_path):
    import onnxruntime as ort

    from analysis.metrics import sqnr_db
    from analysis.quantsim import QuantSim

    root, out = project
    pmap = load_map(out / "map.json")
    # Model and data from the map's provenance: nothing but the map is named.
    assert main(["export", str(out / "map.json"), "--to", "onnx", "--out", str(tmp_path / "net.onnx")]) == 0
    data = _data(root)
    sim = QuantSim(_model(root), data, pmap.quant)
    simulated = sim.forward(data.inputs, pmap.assignment(sim.layer_names))
    options = ort.SessionOptions()  # unfused: see tests/test_export.py::_run_onnx for why
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), options, providers=["CPUExecutionProvider"])
    onnx_out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: data.inputs.numpy()})[0])
    assert sqnr_db(simulated, onnx_out) > 40.0
    # The same map calibrated with the defaults instead would not match as closely.
    default = QuantSim(_model(root), data, QuantConfig()).forward(data.inputs, pmap.assignment(sim.layer_names))
    assert sqnr_db(default, onnx_out) < sqnr_db(simulated, onnx_out) - 3.0
