"""The map on real torchao CPU kernels: it runs, agrees with the simulation, and is smaller."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("torchao")

import sample_models as sm
from analysis import real
from analysis.data import Dataset
from analysis.loading import load_data
from analysis.precision_map import LayerPrecision, PrecisionMap, uniform_map

MLP_LAYERS = ["fc1", "fc2", "fc3"]


def _data(name: str, split: str, n: int | None = None) -> Dataset:
    return load_data(f"sample:{name}", split).take(n)


@pytest.fixture(scope="module")
def mlp():
    return sm.load_model("mlp")


@pytest.fixture(scope="module")
def mlp_data():
    return _data("mlp", "calibration", 128), _data("mlp", "evaluation", 300)


@pytest.fixture(scope="module")
def int8_eval(mlp, mlp_data):
    calibration, evaluation = mlp_data
    return real.evaluate_real(mlp, calibration, evaluation, uniform_map(MLP_LAYERS, "int8", None),
                              label="int8 (real)", warmup=1, repeats=3)


def _is_torchao(tensor) -> bool:
    return type(tensor).__module__.startswith("torchao")


def test_int8_weight_only_runs_on_torchao_kernels(mlp, int8_eval):
    quantized, left = real.apply_real(mlp, uniform_map(MLP_LAYERS, "int8", None))
    assert left == {}
    assert all(_is_torchao(getattr(quantized, name).weight) for name in MLP_LAYERS)
    assert int8_eval.path == "real"
    assert int8_eval.extra["real_layers"] == {name: "Int8WeightOnlyConfig" for name in MLP_LAYERS}
    assert int8_eval.metric_drop is not None and abs(int8_eval.metric_drop) <= 1.0
    assert int8_eval.output.sqnr_db > 35.0
    assert int8_eval.latency_ms_per_sample > 0 and int8_eval.extra["fp32_latency_ms_per_sample"] > 0


def test_real_output_agrees_with_simulation(int8_eval):
    # measured: ~68 dB (differences are rounding ties at the extreme code)
    assert int8_eval.extra["sim_vs_real_sqnr_db"] >= 30.0


def test_mixed_map_dynamic_int8_and_int4_agree_with_simulation(mlp, mlp_data):
    calibration, evaluation = mlp_data
    pmap = PrecisionMap({"fc1": LayerPrecision("int8", "int8"), "fc2": LayerPrecision("int4-g32"),
                         "fc3": LayerPrecision("int4")})
    result = real.evaluate_real(mlp, calibration, evaluation, pmap, warmup=0, repeats=1)
    assert result.extra["real_layers"] == {"fc1": "Int8DynamicActivationInt8WeightConfig",
                                           "fc2": "IntxWeightOnlyConfig", "fc3": "IntxWeightOnlyConfig"}
    # measured ~38-40 dB: torchao and we round a few exact .5 ties of the row maximum differently
    assert result.extra["sim_vs_real_sqnr_db"] >= 30.0
    assert result.output.sqnr_db > 15.0


def test_real_weights_are_about_four_times_smaller(mlp, int8_eval):
    fp32 = sum(getattr(mlp, n).weight.numel() * 4 for n in MLP_LAYERS)
    quantized, _ = real.apply_real(mlp, uniform_map(MLP_LAYERS, "int8", None))
    seen: set[int] = set()
    weights = sum(real.weight_storage_bytes(getattr(quantized, n).weight, seen) for n in MLP_LAYERS)
    assert 3.5 < fp32 / weights <= 4.0  # int8 codes plus per-row scales and zero points
    # with the FP32 biases the analysed layers shrink a little less
    assert 3.3 < int8_eval.extra["size_ratio_vs_fp32"] < 4.0
    assert int8_eval.cost["weight_bytes"] < int8_eval.extra["fp32_weight_bytes"]
    assert int8_eval.cost["avg_weight_bits"] == 8.0


def test_input_model_untouched(mlp):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    real.apply_real(mlp, uniform_map(MLP_LAYERS, "int4-g32", None))
    after = mlp.state_dict()
    assert all(type(p) is torch.nn.Parameter for p in mlp.parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_cnn_convolutions_stay_float_with_a_reason():
    model = sm.load_model("cnn")
    layers = real.analysed_layers(model)
    names = [layer.name for layer in layers]
    quantized, left = real.apply_real(model, uniform_map(names, "int8", None), layers)
    convs = [layer.name for layer in layers if layer.kind.startswith("Conv")]
    assert convs and set(left) == set(convs)
    assert all("Conv" in left[name] and "nn.Linear" in left[name] for name in convs)
    assert _is_torchao(quantized.get_submodule("fc").weight)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in quantized.modules())  # folded first


def test_config_dict_is_json_and_names_each_layer(mlp):
    pmap = PrecisionMap({"fc1": LayerPrecision("int8"), "fc2": LayerPrecision("int4-g32"),
                         "fc3": LayerPrecision("int8", "int8")})
    layers = real.analysed_layers(mlp)
    payload = json.loads(json.dumps(real.torchao_config_dict(pmap, layers)))
    assert payload["format"] == "torchao.FqnToConfig" and payload["torchao_version"]
    configs = {name: entry["config"] for name, entry in payload["layers"].items()}
    assert configs == {"fc1": "Int8WeightOnlyConfig", "fc2": "IntxWeightOnlyConfig",
                       "fc3": "Int8DynamicActivationInt8WeightConfig"}
    assert payload["layers"]["fc2"]["weight_dtype"] == "torch.int4"
    assert payload["layers"]["fc2"]["granularity"] == "PerGroup(32)"
    assert payload["unsupported"] == {}

    # the config objects drive torchao directly
    from torchao.quantization import FqnToConfig, quantize_

    objects = real.torchao_configs(pmap, layers)
    assert {name: type(c).__name__ for name, c in objects.items()} == configs
    copy_ = sm.load_model("mlp")
    quantize_(copy_, FqnToConfig(objects), filter_fn=None)
    assert all(_is_torchao(getattr(copy_, n).weight) for n in MLP_LAYERS)


def test_formats_without_a_cpu_kernel_are_reported(mlp):
    pmap = PrecisionMap({"fc1": LayerPrecision("fp8_e4m3"), "fc2": LayerPrecision("int16"),
                         "fc3": LayerPrecision("int4-pt")})
    quantized, left = real.apply_real(mlp, pmap)
    assert set(left) == set(MLP_LAYERS)
    assert "CUDA" in left["fc1"] and "1..8 bits" in left["fc2"] and "per-tensor" in left["fc3"]
    assert not any(_is_torchao(getattr(quantized, n).weight) for n in MLP_LAYERS)
    assert math.isfinite(float(quantized(torch.zeros(1, 64)).sum()))


# --- no global side effects ------------------------------------------------------------------------


def test_probe_leaves_the_global_rng_alone():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    support = real.probe_cpu_support()
    assert support["Int8WeightOnlyConfig"] == "ok"
    assert torch.equal(torch.get_rng_state(), state)


def test_timing_threads_are_put_back(mlp, mlp_data, monkeypatch):
    calibration, evaluation = mlp_data
    before = torch.get_num_threads()
    pinned = 1 if before != 1 else 2
    result = real.evaluate_real(mlp, calibration.take(16), evaluation.take(16), uniform_map(MLP_LAYERS, "int8", None),
                                warmup=0, repeats=1, threads=pinned)
    assert result.extra["threads"] == pinned and torch.get_num_threads() == before

    def fail(*args, **kwargs):
        raise RuntimeError("timing failed")

    monkeypatch.setattr(real.measure, "_time_pair", fail)  # where evaluate_real looks it up
    with pytest.raises(RuntimeError, match="timing failed"):
        real.evaluate_real(mlp, calibration.take(16), evaluation.take(16), uniform_map(MLP_LAYERS, "int8", None),
                           warmup=0, repeats=1, threads=pinned)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        real.evaluate_real(mlp, calibration, evaluation, uniform_map(MLP_LAYERS, "int8", None), threads=0)
