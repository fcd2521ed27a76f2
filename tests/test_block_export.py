"""Block formats at the export boundary: the existing targets refuse them in one line naming layer and
format; the compressed-tensors and ModelOpt recipes are validated with those packages' own classes
(skipped with the reason when a package is absent)."""

import json

import pytest
import torch

import sample_models
from analysis.export import ExportError, export_map, quantization_parameters, registry
from analysis.export.compressed_tensors import PRESETS, compressed_tensors_config, preset_args
from analysis.export.modelopt import modelopt_config, modelopt_quant_cfg
from analysis.precision_map import LayerPrecision, PrecisionMap


def pmap(**layers):
    return PrecisionMap({name: LayerPrecision(*value) for name, value in layers.items()})


@pytest.fixture(scope="module")
def mlp():
    return sample_models.load_model("mlp")


@pytest.mark.parametrize("target", ["aimet", "ort", "torchao", "onnx"])
@pytest.mark.parametrize("weight,act,bad,role", [("mxfp4", None, "mxfp4", "weight"), ("int8", "nvfp4", "nvfp4", "activation"),
                                                 ("fp4_e2m1", None, "fp4_e2m1", "weight")])
def test_existing_targets_refuse_block_formats_in_one_line(tmp_path, target, weight, act, bad, role):
    with pytest.raises(ExportError) as info:
        export_map(pmap(fc2=(weight, act)), target, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message and f"{bad} ({role} of layer fc2)" in message and target in message
    assert not (tmp_path / "out").exists()


def test_every_target_declares_what_it_expresses():
    classic = [t.name for t in registry.targets() if t.kinds == registry.CLASSIC_KINDS]
    assert {"aimet", "ort", "torchao", "onnx"} <= set(classic)
    block = {t.name for t in registry.targets() if t.kinds is None or "mx" in t.kinds}
    assert {"json", "yaml", "compressed-tensors", "modelopt"} <= block


def test_scale_exports_refuse_block_formats_from_the_api(mlp):
    from analysis.data import Dataset
    from analysis.quantsim import QuantSim

    sim = QuantSim(mlp, Dataset(torch.randn(8, 64, generator=torch.Generator().manual_seed(0))))
    with pytest.raises(ExportError, match=r"mxfp8_e4m3 \(weight of layer fc1\)"):
        quantization_parameters(sim, pmap(fc1=("mxfp8_e4m3", None)))


def test_block_maps_round_trip_through_json(tmp_path):
    original = pmap(fc1=("mxfp4-b16", "mxfp8_e4m3"), fc2=("nvfp4", None), fc3=("fp4_e2m1", None))
    path = export_map(original, "json", tmp_path / "map.json")
    from analysis.precision_map import load_map

    loaded = load_map(path)
    assert loaded.layers == original.layers
    assert loaded.layers["fc1"] == LayerPrecision("mxfp4-b16", "mxfp8_e4m3")
    assert loaded.layers["fc3"] == LayerPrecision("fp4_e2m1-pc", None)


# --- compressed-tensors -----------------------------------------------------------------------------


def test_compressed_tensors_groups_layers_by_scheme_and_names_presets(mlp):
    config = compressed_tensors_config(pmap(fc1=("nvfp4", "nvfp4"), fc2=("int4-g128", None), fc3=("fp32", None)), mlp)
    groups = config["quantization_config"]["config_groups"]
    assert [g["targets"] for g in groups.values()] == [["fc1"], ["fc2"]]
    assert config["schemes"] == {"group_0": "NVFP4", "group_1": "W4A16"}
    assert config["quantization_config"]["ignore"] == ["fc3"]
    assert groups["group_1"]["weights"] == {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                            "group_size": 128}
    assert config["recipe"]["quant_stage"]["quant_modifiers"]["QuantizationModifier"]["config_groups"] == groups
    same = compressed_tensors_config(pmap(fc1=("mxfp4", "mxfp4"), fc2=("mxfp4", "mxfp4")), mlp)
    assert [g["targets"] for g in same["quantization_config"]["config_groups"].values()] == [["fc1", "fc2"]]
    assert same["schemes"] == {"group_0": "MXFP4"}


@pytest.mark.parametrize("layers,match", [
    ({"fc1": ("fp8_e5m2", None)}, r"fp8_e5m2 \(weight of layer fc1\)"),
    ({"fc1": ("mxint8", None)}, r"mxint8 \(weight of layer fc1\)"),
    ({"fc1": ("mxfp4-b16", None)}, r"mxfp4-b16 \(weight of layer fc1\)"),
    ({"fc2": ("int8", "mxfp6_e2m3")}, r"mxfp6_e2m3 \(activation of layer fc2\)"),
    ({"fc1": ("int16", None)}, r"int16 \(weight of layer fc1\)"),
])
def test_compressed_tensors_refuses_what_it_cannot_express(mlp, layers, match):
    with pytest.raises(ExportError, match=match) as info:
        compressed_tensors_config(pmap(**layers), mlp)
    assert "\n" not in str(info.value)


def test_compressed_tensors_refuses_non_linear_layers_and_an_unlisted_default():
    cnn = sample_models.load_model("cnn")
    with pytest.raises(ExportError, match="layer stem.0 is Conv2d"):
        compressed_tensors_config(pmap(**{"stem.0": ("int8", None)}), cnn)
    default_mx = PrecisionMap({"fc1": LayerPrecision("int8", None)}, default=LayerPrecision("mxfp4", None))
    with pytest.raises(ExportError, match="pass the model"):
        compressed_tensors_config(default_mx)
    with pytest.raises(ExportError, match="fp4_e2m1 \\(weight of layer fc1\\)"):
        export_map(pmap(fc1=("fp4_e2m1", None)), "compressed-tensors", "unused.json")


def test_compressed_tensors_validates_and_applies_with_its_own_classes(mlp, tmp_path):
    ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed (pip install -e .[llm])")
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    # our preset arguments are compressed-tensors' own presets, field for field
    for name in PRESETS:
        ours = preset_args(name)
        for role in ("weights", "input_activations"):
            theirs = PRESET_SCHEMES[name].get(role)
            if ours[role] is None:
                assert theirs is None, (name, role)
                continue
            for key, value in ours[role].items():
                got = getattr(theirs, key)
                got = str(got) if key == "scale_dtype" else getattr(got, "value", got)
                assert got == value, (ct.__version__, name, role, key)

    path = export_map(pmap(fc1=("nvfp4", "nvfp4"), fc2=("mxfp4", None), fc3=("fp32", None)), "compressed-tensors",
                      tmp_path / "ct.json", model=mlp)
    config = QuantizationConfig.model_validate(json.loads(path.read_text())["quantization_config"])
    model = sample_models.load_model("mlp")
    apply_quantization_config(model, config)
    assert model.fc1.quantization_scheme.weights.strategy == "tensor_group"
    assert model.fc1.quantization_scheme.input_activations.dynamic == "local"
    assert model.fc2.quantization_scheme.weights.group_size == 32 and model.fc2.quantization_scheme.input_activations is None
    assert getattr(model.fc3, "quantization_scheme", None) is None


# --- ModelOpt --------------------------------------------------------------------------------------


def test_modelopt_entries_by_hand():
    cfg = modelopt_quant_cfg(pmap(fc1=("nvfp4", "nvfp4"), fc2=("mxfp6_e3m2", None), fc3=("int4-g32", "int8-sym")))
    entries = {e["quantizer_name"]: e for e in cfg["quant_cfg"]}
    assert cfg["quant_cfg"][0] == {"quantizer_name": "*", "enable": False}
    assert entries["fc1.weight_quantizer"]["cfg"] == {"num_bits": [2, 1], "block_sizes": {"-1": 16, "type": "dynamic",
                                                                                          "scale_bits": [4, 3]}}
    assert entries["fc2.weight_quantizer"]["cfg"]["num_bits"] == [3, 2]
    assert entries["fc2.weight_quantizer"]["cfg"]["block_sizes"]["scale_bits"] == [8, 0]
    assert "fc2.input_quantizer" not in entries
    assert entries["fc3.weight_quantizer"]["cfg"] == {"num_bits": 4, "block_sizes": {"-1": 32, "type": "static"}}
    assert entries["fc3.input_quantizer"]["cfg"] == {"num_bits": 8, "axis": None}
    live = modelopt_config(json.loads(json.dumps(cfg)))
    fc1 = next(e for e in live["quant_cfg"] if e["quantizer_name"] == "fc1.weight_quantizer")["cfg"]
    assert fc1["num_bits"] == (2, 1) and fc1["block_sizes"] == {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}


@pytest.mark.parametrize("layers,match", [
    ({"fc3": ("int8", "int8")}, r"int8-asym-pt \(activation of layer fc3\).*-sym"),
    # bf16 weights with a float input are the allocator's "keep" option: left unquantized (and
    # warned about, tests/test_allocate_llm.py); with a quantized input ModelOpt has no scheme
    ({"fc1": ("bf16", "int8-sym")}, r"bf16 \(weight of layer fc1\)"),
])
def test_modelopt_refuses_what_it_cannot_express(layers, match):
    with pytest.raises(ExportError, match=match):
        modelopt_quant_cfg(pmap(**layers))


def test_modelopt_validates_and_inserts_quantizers_with_its_own_classes(mlp, tmp_path):
    pytest.importorskip("modelopt", reason="nvidia-modelopt not installed (pip install -e .[llm])")
    import copy

    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.config import QuantizeConfig

    path = export_map(pmap(fc1=("nvfp4", "nvfp4"), fc2=("mxfp4", None), fc3=("fp32", None)), "modelopt",
                      tmp_path / "mo.json", model=mlp)
    config = modelopt_config(path)
    QuantizeConfig.model_validate(config)
    # insert the quantizers without calibrating (ModelOpt's MX/NVFP4 kernels need CUDA)
    quantized = mtq.quantize(copy.deepcopy(mlp), config, forward_loop=None)
    assert quantized.fc1.weight_quantizer.num_bits == (2, 1)
    assert quantized.fc1.weight_quantizer.block_sizes[-1] == 16 and quantized.fc1.input_quantizer.is_enabled
    assert quantized.fc2.weight_quantizer.block_sizes["scale_bits"] == (8, 0)
    assert not quantized.fc2.input_quantizer.is_enabled and not quantized.fc3.weight_quantizer.is_enabled
