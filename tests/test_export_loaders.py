"""Exports load in their own tools, with the README's lines and nothing from quantlens.

Each README block ("Loading an export in its tool") is run as written, in a subprocess whose
working folder holds the exported files; the result is compared with the simulation (ORT, AIMET)
or with quantlens' own real path (torchao). AIMET's torch layout is also checked without AIMET:
against the keys its loader reads, and with an independent re-implementation of its min/max ->
scale/offset rule and both of its quantize kernels.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sample_models as sm
from analysis import export as ex
from analysis.config import QuantConfig
from analysis.data import Dataset
from analysis.formats import parse_format, to_rows
from analysis.metrics import sqnr_db
from analysis.precision_map import LayerPrecision, PrecisionMap, uniform_map

ROOT = Path(__file__).resolve().parents[1]
QUANT = QuantConfig(weight_calibration="mse", act_calibration="percentile", percentile=99.99)
# What the README block must not import: any quantlens module.
NO_QUANTLENS = ("\nimport sys as _sys\n"
                "_ours = sorted(m for m in _sys.modules if m.split('.')[0] in ('analysis', 'dashboard'))\n"
                "assert not _ours, f'imported quantlens: {_ours}'\n")


def _dataset(name):
    split = sm.load_split(name, "calibration")
    return Dataset(split["inputs"], split["labels"], "classification", name)


def readme_block(tool: str) -> str:
    """The README's python block whose first line is "# <tool>: ..."."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(f"# {tool}:")]
    assert len(found) == 1, f"README has {len(found)} python blocks for {tool}"
    return found[0]


def run_block(code: str, folder: Path, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # sample_models only: the block imports no quantlens
    proc = subprocess.run([sys.executable, "-c", code + NO_QUANTLENS], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def mlp():
    return {"model": sm.load_model("mlp"), "data": _dataset("mlp")}


@pytest.fixture(scope="module")
def cnn():
    return {"model": sm.load_model("cnn"), "data": _dataset("cnn")}


def _layers(sample):
    return ex.build_sim(PrecisionMap({}, quant=QUANT), sample["model"], sample["data"]).layer_names


# --- ONNX Runtime --------------------------------------------------------------------------------


def _run_basic(path, inputs):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # README Limitations
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])


@pytest.mark.parametrize("name, weights, bound", [("mlp", ("int8", "int4", "int8"), 65.0), ("cnn", "int8", 50.0)])
def test_ort_settings_load_with_onnxruntime_alone_and_match_the_simulation(request, tmp_path, name, weights, bound):
    pytest.importorskip("onnxruntime")
    sample = request.getfixturevalue(name)
    layers = _layers(sample)
    weights = weights if isinstance(weights, tuple) else (weights,) * len(layers)
    pmap = PrecisionMap({layer: LayerPrecision(w, "int8") for layer, w in zip(layers, weights)}, quant=QUANT)
    ex.export_map(pmap, "ort", tmp_path / f"{name}_ort.json", model=sample["model"], calibration=sample["data"],
                  dynamo=name == "mlp")
    code = readme_block("ONNX Runtime").replace("mlp", name)  # the block as written, for this sample
    run_block(code, tmp_path)

    inputs = sample["data"].inputs
    sim = ex.build_sim(pmap, sample["model"], sample["data"])
    simulated = sim.forward(inputs, pmap.assignment(sim.layer_names))
    deployed = _run_basic(tmp_path / f"{name}_qdq.onnx", inputs)
    agreement = sqnr_db(simulated, deployed)
    print(f"\n{name}: quantize_static from the README vs simulation {agreement:.1f} dB")
    assert agreement >= bound
    assert (deployed.argmax(1) == simulated.argmax(1)).float().mean() >= 0.99
    # every pinned number reached the graph: each Q/DQ scale and zero point is the file's
    import onnx

    graph = onnx.load(str(tmp_path / f"{name}_qdq.onnx")).graph
    values = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    overrides = json.loads((tmp_path / f"{name}_ort.json").read_text())["quantize_static"]["extra_options"]["TensorQuantOverrides"]
    checked = set()
    for node in graph.node:
        # inputs: QuantizeLinear(tensor); weights: stored quantized, DequantizeLinear("<name>_quantized")
        tensor = node.input[0].removesuffix("_quantized")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and tensor in overrides:
            entries = overrides[tensor]
            assert values[node.input[1]].reshape(-1).tolist() == pytest.approx([e["scale"] for e in entries], rel=1e-7)
            assert values[node.input[2]].reshape(-1).tolist() == [e["zero_point"] for e in entries]
            checked.add(tensor)
    assert checked == set(overrides)


def test_ort_warns_for_layers_it_cannot_reproduce(mlp, tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    pmap = PrecisionMap({"fc1": LayerPrecision("int8", "int8"), "fc2": LayerPrecision("int4")}, quant=QUANT)
    with caplog.at_level("WARNING", logger="analysis.export.ort"):
        ex.export_map(pmap, "ort", tmp_path / "o.json", model=mlp["model"], calibration=mlp["data"], dynamo=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "analysis.export.ort"]
    assert len(messages) == 1 and "layer fc2" in messages[0] and "--to onnx" in messages[0] and "\n" not in messages[0]


def test_ort_settings_hook_gives_quantize_static_its_types():
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    import numpy as np

    text = json.dumps({"quant_format": "QDQ", "calibrate_method": "MinMax", "weight_type": "QInt4",
                       "extra_options": {"TensorQuantOverrides": {"x": [{"quant_type": "QUInt8", "scale": 0.5,
                                                                          "zero_point": 3}]}}})
    settings = json.loads(text, object_hook=ex.ort_settings_hook)
    assert settings["quant_format"] is QuantFormat.QDQ and settings["calibrate_method"] is CalibrationMethod.MinMax
    assert settings["weight_type"] is QuantType.QInt4
    entry = settings["extra_options"]["TensorQuantOverrides"]["x"][0]
    assert entry["quant_type"] is QuantType.QUInt8
    assert entry["scale"].dtype == np.float32 and float(entry["scale"]) == 0.5 and int(entry["zero_point"]) == 3


# --- torchao -------------------------------------------------------------------------------------


def test_torchao_config_loads_with_torchao_alone_and_matches_the_real_path(mlp, tmp_path):
    pytest.importorskip("torchao")
    from analysis.real import apply_real

    pmap = PrecisionMap({"fc1": LayerPrecision("int8", "int8"), "fc2": LayerPrecision("int4-g32"),
                         "fc3": LayerPrecision("int8")}, quant=QUANT)
    ex.export_map(pmap, "torchao", tmp_path / "mlp_torchao.json", model=mlp["model"])
    inputs = mlp["data"].inputs[:64]
    torch.save(inputs, tmp_path / "inputs.pt")
    code = readme_block("torchao") + (
        "\nimport torch\nwith torch.no_grad():\n"
        "    torch.save(model(torch.load('inputs.pt')), 'out.pt')\n"
        "print(type(model.fc1.weight).__name__, type(model.fc2.weight).__name__, type(model.fc3.weight).__name__)\n")
    kinds = run_block(code, tmp_path).split()
    assert kinds == ["Int8Tensor", "IntxUnpackedToInt8Tensor", "Int8Tensor"]  # all three layers quantized
    real, left = apply_real(mlp["model"], pmap)
    assert left == {}
    with torch.no_grad():
        expected = real(inputs)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


# --- AIMET: the file against aimet-torch's loader, without AIMET ---------------------------------


def _aimet_rule(entries, rows):
    """aimet-torch 2.x's documented rule, re-implemented: float32 min/max -> scale = (max - min) /
    (qmax - qmin), offset 0 (symmetric, signed grid) or round(min / scale) - qmin (unsigned grid),
    q = clamp(round(x / scale) - offset, qmin, qmax), x_hat = (q + offset) * scale. Codes by
    division and by multiplication with the float32 reciprocal (torch.fake_quantize's way)."""
    bits = entries[0]["bitwidth"]
    symmetric = entries[0]["is_symmetric"] == "True"
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    lo = torch.tensor([e["min"] for e in entries], dtype=torch.float32)
    hi = torch.tensor([e["max"] for e in entries], dtype=torch.float32)
    scale = (hi - lo) / (qmax - qmin)
    offset = torch.zeros_like(scale) if symmetric else torch.round(lo / scale) - qmin
    scale, offset = scale[:, None], offset[:, None]
    q_div = torch.clamp(torch.round(rows / scale) - offset, qmin, qmax)
    q_mul = torch.clamp(torch.round(rows * (1.0 / scale)) - offset, qmin, qmax)
    return q_div, q_mul, (q_div + offset) * scale, scale, offset


def _torch_encodings(sample, pmap):
    sim = ex.build_sim(pmap, sample["model"], sample["data"])
    return sim, json.loads(json.dumps(ex.to_aimet_encodings(sim, pmap)))


@pytest.mark.parametrize("name, weight", [("cnn", "int8"), ("cnn", "int4"), ("mlp", "int8-asym")])
def test_aimet_min_max_rebuild_our_grid_without_a_tie_flip(request, name, weight):
    sample = request.getfixturevalue(name)
    pmap = uniform_map(_layers(sample), weight, "int8", quant=QUANT)
    sim, enc = _torch_encodings(sample, pmap)
    fmt = parse_format(weight, "weight")
    naive_flips = 0
    for layer in sim.layer_names:
        entries = enc["param_encodings"][f"{layer}.weight"]
        info = sim.layer(layer)
        rows = to_rows(sim.table.weight(layer).detach().float(), fmt, info.channel_axis)
        ours = to_rows(sim.quantized_weight(layer, fmt), fmt, info.channel_axis)
        params = sim.weight_params(layer, fmt)
        our_scale, our_zp = params.scale.reshape(-1, 1), params.zero_point.reshape(-1, 1)
        our_codes = torch.round(ours / our_scale) + our_zp  # signed codes when symmetric (zero point 0)
        q_div, q_mul, rebuilt, scale, offset = _aimet_rule(entries, rows)
        assert torch.equal(q_div, our_codes) and torch.equal(q_mul, our_codes), layer  # no code flips
        torch.testing.assert_close(rebuilt, ours, rtol=1e-5, atol=0)  # scales a few float32 steps apart at most
        assert torch.equal(offset, torch.zeros_like(offset) if fmt.symmetric else -our_zp)
        assert [e["scale"] for e in entries] == scale.reshape(-1).tolist()  # the file's scale is the rebuilt one
        # what a plain min = scale·qmin, max = scale·qmax would have given (the CNN tie flips)
        qmin, qmax = (fmt.qmin, fmt.qmax) if fmt.symmetric else (0, 2**fmt.bits - 1)
        naive = [{**e, "min": float(s * (qmin - z)), "max": float(s * (qmax - z))}
                 for e, s, z in zip(entries, params.scale.reshape(-1).tolist(),
                                    (our_zp.reshape(-1) if not fmt.symmetric else torch.zeros(len(entries))).tolist())]
        n_div, n_mul, *_ = _aimet_rule(naive, rows)
        naive_flips += int((n_div != our_codes).sum() + (n_mul != our_codes).sum())
    if name == "cnn" and weight == "int8":
        assert naive_flips > 0  # the sample has ties: this test would catch a plain min/max export
    # activations: AIMET's rule on a sweep through (and past) each range is our quantizer, exactly
    act_fmt = parse_format("int8", "activation")
    for layer in sim.layer_names:
        module = enc["activation_encodings"][layer]
        assert set(module) == {"input"} and set(module["input"]) == {"0"}
        site = sim.sites(layer)[0]
        lo, hi = sim.activation_range(site, 0, act_fmt)
        x = torch.linspace(float(lo) * 1.5 - 1, float(hi) * 1.5 + 1, 4001)[None, :]
        *_, rebuilt, _, _ = _aimet_rule(module["input"]["0"], x)
        assert torch.equal(rebuilt[0], sim.activation_quantizer(site, act_fmt)(0, x[0])), layer


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), weight=st.sampled_from(["int8", "int4", "int8-asym", "int4-asym", "int2"]),
       magnitude=st.floats(1e-3, 1e3))
def test_aimet_min_max_property_every_code_survives_aimets_rule(seed, weight, magnitude):
    """For any weight (ties included: the absmax defines the scale), the written min/max give back
    every integer code of our grid under AIMET's rule, by division and by reciprocal."""
    from analysis.formats import quantize_with_range, scale_and_zero_point

    fmt = parse_format(weight, "weight")
    rows = torch.randn(6, 40, generator=torch.Generator().manual_seed(seed)) * magnitude
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    scale, zero_point = scale_and_zero_point(fmt, lo, hi)
    ours = quantize_with_range(rows, fmt, lo[:, None], hi[:, None])
    our_codes = torch.round(ours / scale[:, None]) + zero_point[:, None]
    lo_a, hi_a, rebuilt = ex.aimet_min_max(scale, zero_point, fmt.bits, fmt.symmetric, rows)
    entries = [{"min": float(a), "max": float(b), "bitwidth": fmt.bits, "is_symmetric": str(fmt.symmetric)}
               for a, b in zip(lo_a.tolist(), hi_a.tolist())]
    q_div, q_mul, dequantized, aimet_scale, _ = _aimet_rule(entries, rows)
    assert torch.equal(q_div, our_codes) and torch.equal(q_mul, our_codes)
    assert torch.equal(aimet_scale.reshape(-1), rebuilt)
    torch.testing.assert_close(dequantized, ours, rtol=1e-5, atol=0)


def test_aimet_min_max_refuses_a_scale_aimet_cannot_hold():
    with pytest.raises(ex.ExportError, match="channel 0 of the weight of layer fc1") as info:
        ex.aimet_min_max(torch.tensor([1e-9, 0.01]), torch.zeros(2), 8, True,
                         torch.tensor([[1e-7, -1e-7], [0.5, -1.0]]), what="the weight of layer fc1")
    assert "\n" not in str(info.value) and "fp32" in str(info.value)


def test_aimet_file_has_what_aimet_torch_load_encodings_reads(cnn):
    layers = _layers(cnn)
    pmap = PrecisionMap({layer: LayerPrecision("int8", "int8") if layer != "fc" else LayerPrecision("fp32")
                         for layer in layers}, quant=QUANT)
    _, enc = _torch_encodings(cnn, pmap)
    # QuantizationSimModel._load_encodings_impl: dicts under these two keys, keyed by parameter / module name
    assert isinstance(enc["param_encodings"], dict) and isinstance(enc["activation_encodings"], dict)
    model = cnn["model"]
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    assert set(enc["param_encodings"]) == {f"{layer}.weight" for layer in layers if layer != "fc"} <= set(params)
    assert set(enc["activation_encodings"]) == {layer for layer in layers if layer != "fc"} <= set(modules)
    assert enc["excluded_layers"] == ["fc"]
    for name, entries in enc["param_encodings"].items():
        # one entry per output channel (the per-channel quantizer's shape), with the keys
        # AffineQuantizerBase.set_legacy_encodings reads; is_symmetric is a string, as AIMET writes it
        assert isinstance(entries, list) and len(entries) == params[name].shape[0]
        for entry in entries:
            assert set(entry) == {"min", "max", "scale", "offset", "bitwidth", "dtype", "is_symmetric"}
            assert entry["bitwidth"] == 8 and entry["dtype"] == "int" and entry["is_symmetric"] == "True"
            assert entry["offset"] == -128 and entry["min"] < 0 < entry["max"]
    for module, encoding in enc["activation_encodings"].items():
        (entry,) = encoding["input"]["0"]
        assert entry["is_symmetric"] == "False" and entry["bitwidth"] == 8 and entry["offset"] <= 0
    # the quantsim config: only settings aimet-torch's config importer accepts
    config = ex.aimet_quantsim_config(enc)
    assert set(config) == {"defaults", "params", "op_type", "supergroups", "model_input", "model_output"}
    assert config["defaults"]["ops"] == {"is_output_quantized": "True"}  # the only default AIMET allows
    assert config["defaults"]["per_channel_quantization"] == "True" and config["params"]["bias"] == {"is_quantized": "False"}
    assert all(v.get("is_input_quantized", "True") == "True" for v in config["op_type"].values())
    assert {"Gemm", "Conv"} <= {op for op, v in config["op_type"].items() if v.get("is_input_quantized") == "True"}
    assert config["op_type"]["Flatten"] == {"is_output_quantized": "True"}  # see aimet.py: no conflicting setting


@pytest.mark.parametrize("layers, words", [
    ({"fc1": LayerPrecision("fp16")}, "fp16"),
    ({"fc1": LayerPrecision("int4-g32")}, "per-group"),
    ({"fc1": LayerPrecision("int8"), "fc2": LayerPrecision("int8-pt")}, "mixes per-channel and per-tensor"),
])
def test_aimet_torch_layout_refuses_what_aimet_torch_cannot_hold(mlp, layers, words):
    pmap = PrecisionMap(layers, quant=QUANT)
    sim = ex.build_sim(pmap, mlp["model"], mlp["data"])
    with pytest.raises(ex.ExportError, match=words) as info:
        ex.to_aimet_encodings(sim, pmap)
    assert "\n" not in str(info.value) and "1.0.0" in str(info.value)
    if "per-channel" in words:  # the list layout holds a mix
        assert {e["enc_type"] for e in ex.to_aimet_encodings(sim, pmap, "1.0.0")["param_encodings"]} == {
            "PER_CHANNEL", "PER_TENSOR"}


def test_aimet_export_writes_the_config_beside_the_encodings(mlp, tmp_path):
    pmap = uniform_map(["fc1", "fc2", "fc3"], "int8", "int8", quant=QUANT)
    path = ex.export_map(pmap, "aimet", tmp_path / "enc.json", model=mlp["model"], calibration=mlp["data"])
    config = json.loads(ex.aimet_config_path(path).read_text())
    assert ex.aimet_config_path(path).name == "enc.quantsim_config.json"
    assert config == ex.aimet_quantsim_config(json.loads(path.read_text()))
    ex.export_map(pmap, "aimet", tmp_path / "v1.json", model=mlp["model"], calibration=mlp["data"], version="1.0.0")
    assert not (tmp_path / "v1.quantsim_config.json").exists()  # the config belongs to the torch layout


# --- AIMET itself --------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("aimet_torch") is None,
                    reason="aimet_torch is not installed (pip install aimet-torch, in its own environment: it pins torch)")
@pytest.mark.parametrize("weight, bound", [("int8", 60.0), ("int4", 60.0)])
def test_aimet_torch_loads_the_encodings_and_matches_the_simulation(cnn, tmp_path, weight, bound):
    pmap = uniform_map(_layers(cnn), weight, "int8", quant=QUANT)
    ex.export_map(pmap, "aimet", tmp_path / "cnn_encodings.json", model=cnn["model"], calibration=cnn["data"])
    inputs = cnn["data"].inputs
    torch.save(inputs, tmp_path / "inputs.pt")
    code = readme_block("AIMET") + ("\nwith torch.no_grad():\n"
                                    "    torch.save(sim.model(torch.load('inputs.pt')), 'out.pt')\n")
    run_block(code, tmp_path, timeout=600)
    sim = ex.build_sim(pmap, cnn["model"], cnn["data"])
    simulated = sim.forward(inputs, pmap.assignment(sim.layer_names))
    aimet_out = torch.load(tmp_path / "out.pt")
    agreement = sqnr_db(simulated, aimet_out)
    print(f"\ncnn {weight}/int8: aimet-torch vs simulation {agreement:.1f} dB")
    assert agreement >= bound
    assert (aimet_out.argmax(1) == simulated.argmax(1)).float().mean() >= 0.99
