"""Exports reproduce the simulation: AIMET grids, ORT overrides, and a QDQ ONNX model that runs."""

import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample_models as sm
from analysis.config import QuantConfig
from analysis import export as ex
from analysis.export import registry
from analysis.data import Dataset
from analysis.formats import parse_format
from analysis.metrics import sqnr_db
from analysis.precision_map import LayerPrecision, PrecisionMap, load_map, uniform_map

MLP_LAYERS = ["fc1", "fc2", "fc3"]
QUANT = QuantConfig(weight_calibration="mse", act_calibration="percentile", percentile=99.99)


def _dataset(name):
    split = sm.load_split(name, "calibration")
    return Dataset(split["inputs"], split["labels"], "classification", name)


@pytest.fixture(scope="module")
def mlp():
    model = sm.load_model("mlp")
    data = _dataset("mlp")
    maps = {
        "uniform": uniform_map(MLP_LAYERS, "int8", "int8", quant=QUANT),
        "mixed": PrecisionMap({"fc1": LayerPrecision("int8", "int8"), "fc2": LayerPrecision("int4", "int8"),
                               "fc3": LayerPrecision("fp32")}, quant=QUANT),
        # weight-only fc2, and fc3 with an fp32 weight but an int8 input: both need ORT's graph patched
        "patched": PrecisionMap({"fc1": LayerPrecision("int8", "int8"), "fc2": LayerPrecision("int4"),
                                 "fc3": LayerPrecision("fp32", "int8")}, quant=QUANT),
    }
    analyzer = ex.build_sim(maps["mixed"], model, data)
    return {"model": model, "data": data, "maps": maps, "analyzer": analyzer}


@pytest.fixture(scope="module")
def mlp_onnx(mlp, tmp_path_factory):
    """One FP32 export (the default dynamo exporter) shared by every QDQ test of the mlp."""
    pytest.importorskip("onnxruntime")
    return ex.export_fp32_onnx(mlp["analyzer"], tmp_path_factory.mktemp("onnx") / "mlp_fp32.onnx")


def _fmt(pmap, layer, role):
    precision = pmap.precision(layer)
    return parse_format(precision.weight if role == "weight" else precision.activation, role)


def _aimet_dequantize(x, scale, offset, bits):
    q = torch.clamp(torch.round(x / scale) - offset, 0, 2**bits - 1)
    return (q + offset) * scale


def _rows(weight, n_rows):
    return weight.reshape(n_rows, -1)


# --- calibration settings ------------------------------------------------------------------------


def test_a_legacy_maps_calibration_block_becomes_its_quant_config():
    from analysis.precision_map import map_from_dict

    pmap = map_from_dict({"schema": "quantlens.precision-map/1", "layers": {"fc1": "int4"},
                          "calibration": {"weight": "minmax", "act_calibration": "mse", "percentile": 99.9,
                                          "granularity": "per-tensor", "dynamic_activations": True, "budget_note": 1}})
    quant = pmap.quant
    assert (quant.weight_calibration, quant.act_calibration, quant.percentile) == ("minmax", "mse", 99.9)
    assert quant.granularity == "per-tensor" and quant.dynamic_activations
    # the bare name took the granularity the old map named, and is now stored qualified
    assert pmap.layers["fc1"].weight == "int4-sym-pt"
    assert PrecisionMap({}).quant.weight_calibration == "mse"  # QuantConfig's default


# --- AIMET ---------------------------------------------------------------------------------------


def test_aimet_1_0_0_reproduces_the_simulated_grid(mlp):
    analyzer, pmap = mlp["analyzer"], mlp["maps"]["mixed"]
    enc = json.loads(json.dumps(ex.to_aimet_encodings(analyzer, pmap, "1.0.0")))
    assert enc["version"] == "1.0.0"
    assert set(enc) >= {"activation_encodings", "param_encodings", "excluded_layers", "quantizer_args"}
    params = {e["name"]: e for e in enc["param_encodings"]}
    assert set(params) == {"fc1.weight", "fc2.weight"}  # fc3 is FP32: excluded, not encoded
    assert enc["excluded_layers"] == ["fc3"]
    for layer, bits in (("fc1", 8), ("fc2", 4)):
        e = params[f"{layer}.weight"]
        fmt = _fmt(pmap, layer, "weight")
        w = analyzer.table.weight(layer).detach()
        assert (e["dtype"], e["enc_type"], e["bw"], e["is_sym"]) == ("INT", "PER_CHANNEL", bits, True)
        assert len(e["scale"]) == len(e["offset"]) == w.shape[0]
        assert set(e["offset"]) == {-(2 ** (bits - 1))}
        scale = torch.tensor(e["scale"])[:, None]
        offset = torch.tensor(e["offset"], dtype=torch.float32)[:, None]
        rebuilt = _aimet_dequantize(w, scale, offset, bits)
        torch.testing.assert_close(rebuilt, analyzer.quantized_weight(layer, fmt), rtol=0, atol=1e-7)
    acts = {e["name"]: e for e in enc["activation_encodings"]}
    assert set(acts) == {"fc1.input", "fc2.input"}
    # Activation grid: AIMET's formula on a sweep through (and past) the range = our quantizer.
    site = analyzer.table.sites["fc2"][0]
    fmt = _fmt(pmap, "fc2", "activation")
    e = acts["fc2.input"]
    assert (e["bw"], e["is_sym"], e["enc_type"]) == (8, False, "PER_TENSOR") and e["offset"][0] <= 0
    lo, hi = analyzer.activation_range(site, 0, fmt)
    x = torch.linspace(float(lo) * 1.5 - 1, float(hi) * 1.5 + 1, 2001)
    torch.testing.assert_close(_aimet_dequantize(x, e["scale"][0], e["offset"][0], 8),
                               analyzer.activation_quantizer(site, fmt)(0, x), rtol=0, atol=1e-6)
    assert enc["quantizer_args"]["per_channel_quantization"] is True


def test_aimet_2_0_0_mirrors_quantize_linear(mlp):
    analyzer, pmap = mlp["analyzer"], mlp["maps"]["mixed"]
    enc = json.loads(json.dumps(ex.to_aimet_encodings(analyzer, pmap, "2.0.0")))
    assert enc["version"] == "2.0.0"
    by_name = {e["name"]: e for e in enc["encodings"]}
    assert "fc3.weight" not in by_name and "fc3.input" not in by_name
    for layer, dtype, (qmin, qmax) in (("fc1", "int8", (-128, 127)), ("fc2", "int4", (-8, 7))):
        e = by_name[f"{layer}.weight"]
        w = analyzer.table.weight(layer).detach()
        assert e["output_dtype"] == dtype and e["axis"] == 0 and len(e["y_scale"]) == w.shape[0]
        scale = torch.tensor(e["y_scale"])[:, None]
        zp = torch.tensor(e["y_zero_point"], dtype=torch.float32)[:, None]
        q = torch.clamp(torch.round(w / scale) + zp, qmin, qmax)
        torch.testing.assert_close((q - zp) * scale, analyzer.quantized_weight(layer, _fmt(pmap, layer, "weight")), rtol=0, atol=1e-7)
    act = by_name["fc1.input"]
    assert act["output_dtype"] == "uint8" and isinstance(act["y_scale"], float) and 0 <= act["y_zero_point"] <= 255


def test_aimet_per_group_blocks(mlp):
    pmap = uniform_map(MLP_LAYERS, "int4-g16", None, quant=QUANT)
    analyzer = mlp["analyzer"]
    v1 = ex.to_aimet_encodings(analyzer, pmap, "1.0.0")
    e = next(p for p in v1["param_encodings"] if p["name"] == "fc2.weight")  # [64, 128]: 8 blocks per row
    assert (e["enc_type"], e["block_size"], len(e["scale"])) == ("PER_BLOCK", 16, 64 * 8)
    w = analyzer.table.weight("fc2").detach()
    rebuilt = _aimet_dequantize(w.reshape(-1, 16), torch.tensor(e["scale"])[:, None],
                                torch.tensor(e["offset"], dtype=torch.float32)[:, None], 4).reshape(w.shape)
    torch.testing.assert_close(rebuilt, analyzer.quantized_weight("fc2", parse_format("int4-g16", "weight")), rtol=0, atol=1e-7)
    v2 = {x["name"]: x for x in ex.to_aimet_encodings(analyzer, pmap, "2.0.0")["encodings"]}
    block = v2["fc2.weight"]
    assert (block["axis"], block["block_size"], len(block["y_scale"]), len(block["y_scale"][0])) == (1, 16, 64, 8)


def test_aimet_rejects_what_it_cannot_express(mlp):
    for pmap, words in ((PrecisionMap({"fc1": LayerPrecision("fp8_e4m3")}), "fp8_e4m3"),
                        (PrecisionMap({"fc1": LayerPrecision("int8", "int8")}, quant=QuantConfig(dynamic_activations=True)), "dynamic")):
        analyzer = mlp["analyzer"] if not pmap.quant.dynamic_activations else ex.build_sim(pmap, mlp["model"], mlp["data"])
        with pytest.raises(ValueError, match=words) as info:
            ex.to_aimet_encodings(analyzer, pmap, "1.0.0")
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="use one of torch, 1.0.0, 2.0.0"):
        ex.to_aimet_encodings(mlp["analyzer"], mlp["maps"]["mixed"], "3.0")


def test_fp16_layers_are_float_entries(mlp):
    pmap = PrecisionMap({"fc1": LayerPrecision("fp16", "fp16"), "fc2": LayerPrecision("int8")})
    v1 = ex.to_aimet_encodings(mlp["analyzer"], pmap, "1.0.0")
    assert {"name": "fc1.weight", "dtype": "FLOAT", "bw": 16} in v1["param_encodings"]
    assert {"name": "fc1.input", "dtype": "FLOAT", "bw": 16} in v1["activation_encodings"]
    v2 = ex.to_aimet_encodings(mlp["analyzer"], pmap, "2.0.0")
    assert {"name": "fc1.weight", "output_dtype": "float16"} in v2["encodings"]


# --- ONNX Runtime overrides ----------------------------------------------------------------------


def test_ort_overrides_round_trip(mlp, mlp_onnx):
    from onnxruntime.quantization import QuantType

    pmap = mlp["maps"]["mixed"]
    for kwargs in ({}, {"sim": mlp["analyzer"]}, {"onnx_model": mlp_onnx, "sim": mlp["analyzer"]}):
        data = json.loads(json.dumps(ex.to_ort_overrides(pmap, **kwargs)))
        settings = data["quantize_static"]
        overrides = settings["extra_options"]["TensorQuantOverrides"]
        types = {entry["quant_type"] for entries in overrides.values() for entry in entries if "quant_type" in entry}
        assert all(isinstance(QuantType[name], QuantType) for name in types | {settings["activation_type"], settings["weight_type"]})
        assert data["excluded_layers"] == ["fc3"] and "fc3.weight" not in overrides
        assert overrides["fc1.weight"][0]["quant_type"] == "QInt8" and overrides["fc2.weight"][0]["quant_type"] == "QInt4"
        assert data["min_opset"] == 21  # int4 in the map
        pinned = "sim" in kwargs
        assert data["pinned_scales"] is pinned
        assert ("scale" in overrides["fc1.weight"][0]) is pinned
        if pinned:  # one dict per output channel, and the grid they pin is the simulated weight
            for layer, (qmin, qmax) in (("fc1", (-128, 127)), ("fc2", (-8, 7))):
                channels = overrides[f"{layer}.weight"]
                w = mlp["analyzer"].table.weight(layer).detach()
                assert len(channels) == w.shape[0] and channels[0]["axis"] == 0
                scale = torch.tensor([c["scale"] for c in channels])[:, None]
                zp = torch.tensor([c["zero_point"] for c in channels], dtype=torch.float32)[:, None]
                q = torch.clamp(torch.round(w / scale) + zp, qmin, qmax)  # ONNX QuantizeLinear, per axis 0
                torch.testing.assert_close((q - zp) * scale, mlp["analyzer"].quantized_weight(layer, _fmt(pmap, layer, "weight")),
                                           rtol=0, atol=1e-7)
        live = ex.ort_quantize_kwargs(data)
        assert live["weight_type"] is QuantType.QInt8
        assert all(isinstance(e["quant_type"], QuantType) for v in live["extra_options"]["TensorQuantOverrides"].values()
                   for e in v if "quant_type" in e)
        if "onnx_model" in kwargs:
            assert len(settings["nodes_to_exclude"]) == 1  # fc3's Gemm
            assert data["layers"]["fc1"]["activation"] in overrides  # the Gemm's input tensor, pinned
            assert len(settings["nodes_to_quantize"]) == 2 and data["inputs"] == ["x"]


def test_activation_names_follow_the_onnx_graph(mlp, mlp_onnx):
    enc = ex.to_aimet_encodings(mlp["analyzer"], mlp["maps"]["uniform"], "1.0.0", onnx_model=mlp_onnx)
    names = [e["name"] for e in enc["activation_encodings"]]
    assert names[0] == "x" and len(names) == 3 and not any(n.endswith(".input") for n in names)


@pytest.mark.parametrize("weight, words", [("fp8_e4m3", "fp8_e4m3"), ("int4-g32", "per-group"), ("int6", "6-bit")])
def test_ort_rejects_unsupported_formats(weight, words):
    with pytest.raises(ValueError, match=words) as info:
        ex.to_ort_overrides(PrecisionMap({"fc1": LayerPrecision(weight)}))
    assert "\n" not in str(info.value) and "use" in str(info.value)


# --- QDQ ONNX ------------------------------------------------------------------------------------


def _run_onnx(path, inputs):
    import onnxruntime as ort

    # Basic optimisations only: on x86 CPUs with AVX2 but no VNNI (this machine), ORT's fused
    # U8S8 int8 GEMM saturates 16-bit intermediate sums (its documented VPMADDUBSW caveat) and
    # drifts to ~24 dB from the model's own QDQ arithmetic; unfused, the graph's numbers show.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])


def _op_types(path):
    import onnx

    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("name, bound", [("uniform", 40.0), ("mixed", 40.0), ("patched", 40.0)])
def test_qdq_onnx_matches_the_simulation(mlp, mlp_onnx, tmp_path, name, bound):
    analyzer, pmap = mlp["analyzer"], mlp["maps"][name]
    path = ex.export_qdq_onnx(mlp["model"], analyzer, pmap, tmp_path / f"{name}.onnx", opset=21, fp32_onnx=mlp_onnx)
    ops = _op_types(path)
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inputs = mlp["data"].inputs
    onnx_out = _run_onnx(path, inputs)
    simulated = analyzer.forward(inputs, pmap.assignment(MLP_LAYERS))
    fp32 = analyzer.forward(inputs, {})
    agreement = sqnr_db(simulated, onnx_out)
    print(f"\n{name}: ONNX vs simulation {agreement:.1f} dB; vs FP32: ONNX {sqnr_db(fp32, onnx_out):.1f} dB, "
          f"simulation {sqnr_db(fp32, simulated):.1f} dB")
    assert agreement >= max(bound, 25.0)
    assert abs(sqnr_db(fp32, onnx_out) - sqnr_db(fp32, simulated)) < 0.5
    if name == "patched":
        import onnx

        graph = onnx.load(str(path)).graph
        producers = {out: node.op_type for node in graph.node for out in node.output}
        gemms = [node for node in graph.node if node.op_type == "Gemm"]
        assert producers.get(gemms[1].input[0]) != "DequantizeLinear"  # fc2: weight-only, float input
        assert gemms[2].input[1] in {init.name for init in graph.initializer}  # fc3: float weight


def test_qdq_onnx_cnn_with_folded_batchnorm(tmp_path):
    pytest.importorskip("onnxruntime")
    model, data = sm.load_model("cnn"), _dataset("cnn")
    pmap = PrecisionMap({"stem.0": LayerPrecision("int8", "int8"), "dw1.0": LayerPrecision("int8", "int8"),
                         "pw1.0": LayerPrecision("int4", "int8"), "dw2.0": LayerPrecision("int8", "int8"),
                         "pw2.0": LayerPrecision("int8", "int8"), "fc": LayerPrecision("fp32")},
                        quant=QUANT)
    analyzer = ex.build_sim(pmap, model, data)
    # The TorchScript exporter here (the dynamo one is covered by the mlp): also keeps the test fast.
    path = ex.export_qdq_onnx(model, analyzer, pmap, tmp_path / "cnn.onnx", dynamo=False)
    ops = _op_types(path)
    assert "BatchNormalization" not in ops and ops.count("Conv") == 5 and "QuantizeLinear" in ops
    names = [layer.name for layer in analyzer.table.layers]
    simulated = analyzer.forward(data.inputs, pmap.assignment(names))
    onnx_out = _run_onnx(path, data.inputs)
    fp32 = analyzer.forward(data.inputs, {})
    agreement = sqnr_db(simulated, onnx_out)
    print(f"\ncnn mixed: ONNX vs simulation {agreement:.1f} dB; vs FP32: ONNX {sqnr_db(fp32, onnx_out):.1f} dB, "
          f"simulation {sqnr_db(fp32, simulated):.1f} dB")
    assert agreement >= 35.0
    assert abs(sqnr_db(fp32, onnx_out) - sqnr_db(fp32, simulated)) < 0.5


def test_qdq_rejects_before_exporting(mlp, tmp_path):
    pytest.importorskip("onnxruntime")
    cases = [(PrecisionMap({"fc1": LayerPrecision("int4-g32")}), "per-group"),
             (PrecisionMap({"fc1": LayerPrecision("fp8_e4m3")}), "fp8"),
             (uniform_map(MLP_LAYERS, "int4", "int8"), "opset >= 21")]
    for pmap, words in cases:
        with pytest.raises(ValueError, match=words) as info:
            ex.export_qdq_onnx(mlp["model"], mlp["analyzer"], pmap, tmp_path / "x.onnx", opset=17)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "x.onnx").exists()


@contextlib.contextmanager
def _root_logger_as(handlers, level):
    """The root logger with exactly these handlers and level for a while; the list object is kept
    (pytest's own logging handlers are removed from it later)."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers[:] = handlers
    root.setLevel(level)
    try:
        yield root
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_qdq_export_leaves_the_root_logger_alone(mlp, mlp_onnx, tmp_path, monkeypatch, capsys):
    import onnxruntime.quantization as ortq

    ort_dir = os.path.join(os.path.dirname(ortq.__file__), "")
    real_quantize = ortq.quantize_static

    def quantize_and_log(*args, **kwargs):  # someone else logs while ORT runs: that must still pass
        logging.getLogger().warning("not from ORT")
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(ortq, "quantize_static", quantize_and_log)
    records = []
    keep = logging.Handler()
    keep.emit = records.append
    filters = list(logging.getLogger().filters)
    with _root_logger_as([keep], logging.INFO) as root:
        ex.export_qdq_onnx(mlp["model"], mlp["analyzer"], mlp["maps"]["uniform"], tmp_path / "a.onnx", fp32_onnx=mlp_onnx)
        assert root.level == logging.INFO and root.handlers == [keep] and root.filters == filters
    assert "not from ORT" in [r.getMessage() for r in records]
    assert not [r for r in records if r.pathname.startswith(ort_dir)]  # its "consider pre-processing" notes
    # A bare root (a CLI process): ORT's logging.warning() must not basicConfig() a handler onto it,
    # and what others log meanwhile reaches stderr as it would with no handler.
    capsys.readouterr()
    with _root_logger_as([], logging.WARNING) as root:
        ex.export_qdq_onnx(mlp["model"], mlp["analyzer"], mlp["maps"]["uniform"], tmp_path / "b.onnx", fp32_onnx=mlp_onnx)
        assert root.handlers == [] and root.level == logging.WARNING and root.filters == filters
    err = capsys.readouterr().err
    assert "not from ORT" in err and "pre-processing" not in err


# --- export_map ----------------------------------------------------------------------------------


@pytest.mark.parametrize("target, suffix", [("json", ".json"), ("yaml", ".yaml")])
def test_export_map_round_trips(mlp, tmp_path, target, suffix):
    pmap = PrecisionMap(dict(mlp["maps"]["mixed"].layers), model="abc123", quant=QUANT,
                        budget={"kind": "size", "value": 0.5}, notes=("hand-edited",))
    path = ex.export_map(pmap, target, tmp_path / f"map{suffix}")
    assert load_map(path).to_dict() == pmap.to_dict()


def test_export_map_aimet_and_ort(mlp, tmp_path):
    split = sm.load_split("mlp", "calibration")
    pmap = mlp["maps"]["mixed"]
    path = ex.export_map(pmap, "aimet", tmp_path / "enc.json", model=mlp["model"], calibration=split)
    assert json.loads(path.read_text())["version"] == "0.6.1"  # aimet-torch's load_encodings layout
    assert "per_channel_quantization" in json.loads((tmp_path / "enc.quantsim_config.json").read_text())["defaults"]
    path = ex.export_map(pmap, "aimet", tmp_path / "enc2.json", model=mlp["model"], calibration=split, version="2.0.0")
    assert json.loads(path.read_text())["version"] == "2.0.0"
    names_only = json.loads(ex.export_map(pmap, "ort", tmp_path / "ort.json").read_text())
    assert names_only["pinned_scales"] is False and names_only["excluded_layers"] == ["fc3"]
    if importlib.util.find_spec("onnxruntime") is not None:  # pinned: the FP32 model is written alongside
        import onnx

        pinned = json.loads(ex.export_map(pmap, "ort", tmp_path / "ort_pinned.json", model=mlp["model"],
                                          calibration=split, dynamo=False).read_text())
        graph = onnx.load(str(tmp_path / pinned["model"])).graph
        tensors = {i.name for i in graph.initializer} | {out for n in graph.node for out in n.output} | {i.name for i in graph.input}
        assert pinned["pinned_scales"] and set(pinned["quantize_static"]["extra_options"]["TensorQuantOverrides"]) <= tensors
    with pytest.raises(ValueError, match="model and calibration"):
        ex.export_map(pmap, "onnx", tmp_path / "m.onnx")


def test_export_map_unknown_target(mlp, tmp_path):
    with pytest.raises(ValueError, match="unknown export target 'tflite'") as info:
        ex.export_map(mlp["maps"]["mixed"], "tflite", tmp_path / "x")
    assert "\n" not in str(info.value) and "json" in str(info.value)


def test_torchao_target_names_a_config_per_linear_layer(tmp_path):
    import sample_models

    pmap = PrecisionMap({"fc1": LayerPrecision("int8"), "fc2": LayerPrecision("int4-g32"), "fc3": LayerPrecision("fp32")})
    path = ex.export_map(pmap, "torchao", tmp_path / "torchao.json", model=sample_models.load_model("mlp"))
    payload = json.loads(path.read_text())
    assert payload["schema"] == ex.TORCHAO_EXPORT_SCHEMA and payload["config"]["_type"] == "FqnToConfig"
    assert payload["config"]["_data"]["fqn_to_config"]["fc1"]["_type"] == "Int8WeightOnlyConfig"
    assert payload["layers"]["fc1"]["config"] == "Int8WeightOnlyConfig"
    assert "fc3" not in payload["layers"] and "fc3" not in payload["config"]["_data"]["fqn_to_config"]


# --- the registry --------------------------------------------------------------------------------


def _cli_export_action(parser, option):
    from argparse import _SubParsersAction

    sub = next(a for a in parser._actions if isinstance(a, _SubParsersAction))
    return next(a for a in sub.choices["export"]._actions if option in a.option_strings)


def test_every_registered_target_is_a_cli_choice():
    from analysis.cli import build_parser

    action = _cli_export_action(build_parser(), "--to")
    assert tuple(action.choices) == registry.names() == ("json", "yaml", "aimet", "ort", "torchao", "onnx",
                                                         "compressed-tensors", "modelopt")
    assert all(f"{t.name}: {t.description}" in action.help for t in registry.targets())
    for target in registry.targets():
        assert target.suffix and target.filename.endswith(target.suffix) and "\n" not in target.description


def test_unknown_target_is_refused_in_one_line_naming_the_valid_ones(capsys):
    from analysis.cli import main

    with pytest.raises(ex.ExportError) as info:
        registry.get("tflite")
    assert str(info.value) == f"unknown export target 'tflite'; use one of {', '.join(registry.names())}"
    with pytest.raises(SystemExit):
        main(["export", "map.json", "--to", "tflite", "--out", "x"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


@pytest.fixture
def csv_target():
    """A target registered by the test (as a new target module would), removed afterwards."""
    calls = []

    def write(pmap, out_path, *, model=None, calibration=None, **options):
        calls.append({"model": model, "calibration": calibration, **options})
        out_path.write_text("layer,weight\n" + "".join(f"{n},{p.weight}\n" for n, p in pmap.layers.items()))
        return out_path

    target = registry.register(ex.Target("csv", "CSV table", "one row per layer", "map.csv", write, model="optional"))
    yield target, calls
    registry.unregister("csv")


def test_a_registered_target_is_exported_through_export_map_and_the_cli(csv_target, tmp_path, capsys):
    from analysis.cli import build_parser, main

    target, calls = csv_target
    pmap = PrecisionMap({"fc1": LayerPrecision("int8")})
    path = ex.export_map(pmap, "CSV", tmp_path / "deep" / "map.csv", dialect="excel")
    assert path.read_text() == "layer,weight\nfc1,int8-sym-pc\n"
    assert calls == [{"model": None, "calibration": None, "dialect": "excel"}]
    assert "csv" in _cli_export_action(build_parser(), "--to").choices
    (tmp_path / "map.json").write_text(pmap.dumps("json"))
    assert main(["export", str(tmp_path / "map.json"), "--to", "csv", "--out", str(tmp_path / "cli.csv")]) == 0
    assert (tmp_path / "cli.csv").read_text() == path.read_text() and "wrote csv" in capsys.readouterr().out
    with pytest.raises(ex.ExportError, match="already registered"):
        registry.register(ex.Target("csv", "other", "other", "x.csv", lambda *a, **k: None))


def test_the_dashboard_offers_the_targets_that_carry_calibrated_numbers(csv_target):
    from dashboard.derived import toolchain_targets

    target, _ = csv_target
    assert [t[0] for t in toolchain_targets()[0]] == ["aimet", "ort", "onnx"]  # json/yaml/torchao: no calibration
    registry.register(ex.Target(**{**vars(target), "calibration": "optional"}), replace=True)
    assert toolchain_targets() == ([("aimet", "AIMET encodings", "aimet_encodings.json"),
                                    ("ort", "ONNX Runtime overrides + FP32 ONNX", "ort_overrides.json"),
                                    ("onnx", "QDQ ONNX model", "model.qdq.onnx"), ("csv", "CSV table", "map.csv")], None)


def test_a_target_needing_the_model_is_refused_without_it(csv_target, tmp_path):
    target, calls = csv_target
    registry.register(ex.Target(**{**vars(target), "model": "required", "calibration": "required"}), replace=True)
    with pytest.raises(ex.ExportError) as info:
        ex.export_map(PrecisionMap({}), "csv", tmp_path / "map.csv", model=torch.nn.Linear(2, 2))
    assert str(info.value).startswith("export target 'csv' needs numbers from the model: pass calibration data")
    assert calls == [] and not (tmp_path / "map.csv").exists()
    with pytest.raises(ex.ExportError, match="model='maybe'; use one of none, optional, required"):
        ex.Target("bad", "bad", "bad", "x.json", lambda *a, **k: None, model="maybe")


def test_listing_the_targets_imports_no_toolchain():
    """The CLI builds its parser (and so lists the targets) on every start: no onnx, onnxruntime or
    torchao. (torch is loaded: the format and calibration registries the parser's help reads live
    beside the torch code that implements them.)"""
    code = ("import sys; from analysis.cli import build_parser; build_parser(); "
            "print(' '.join(m for m in ('onnx', 'onnxruntime', 'torchao', 'streamlit', 'plotly') if m in sys.modules))")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == ""
