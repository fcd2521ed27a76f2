"""Accuracy recovery: QAT under a harsh map, and measured calibration remedies."""

from __future__ import annotations

import copy

import pytest
import torch

import sample_models as sm
from analysis.config import QuantConfig
from analysis.data import Dataset
from analysis.loading import load_data
from analysis.finetune import finetune_qat, remedies
from analysis.precision_map import LayerPrecision, PrecisionMap

MLP_LAYERS = ["fc1", "fc2", "fc3"]


def _data(split: str, n: int | None = None) -> Dataset:
    return load_data("sample:mlp", split).take(n)


@pytest.fixture(scope="module")
def mlp():
    return sm.load_model("mlp")


def _harsh_map() -> PrecisionMap:
    # int2 per-tensor weights with min/max ranges: simulated accuracy falls from ~98% to ~89%
    return PrecisionMap({n: LayerPrecision("int2-pt") for n in MLP_LAYERS},
                        quant=QuantConfig(weight_calibration="minmax"))


def test_qat_recovers_accuracy_and_leaves_the_model_alone(mlp):
    train, held_out = _data("calibration"), _data("evaluation")
    before_state = {k: v.clone() for k, v in mlp.state_dict().items()}
    tuned, report = finetune_qat(mlp, _harsh_map(), train, train, evaluation=held_out,
                                 epochs=2, lr=1e-3, batch_size=32, seed=0)
    assert report["fp32"] - report["before"] > 5.0  # the map clearly hurts
    assert report["after"] >= report["before"] + 3.0  # measured: 89.4 -> 95.2
    assert report["epochs"] == 2 and len(report["loss_curve"]) == 2
    assert report["loss_curve"][1] < report["loss_curve"][0]
    assert type(tuned) is type(mlp)
    assert not torch.equal(tuned.fc1.weight, mlp.fc1.weight)
    assert all(torch.equal(before_state[k], v) for k, v in mlp.state_dict().items())


def test_qat_is_deterministic_for_a_seed(mlp):
    train, held_out = _data("calibration", 64), _data("evaluation", 100)
    pmap = PrecisionMap({n: LayerPrecision("int3", "int8") for n in MLP_LAYERS},
                        quant=QuantConfig(weight_calibration="minmax"))
    runs = [finetune_qat(mlp, pmap, train, train, evaluation=held_out, epochs=1, lr=1e-3, batch_size=16, seed=3)
            for _ in range(2)]
    (a, ra), (b, rb) = runs
    assert ra["loss_curve"] == rb["loss_curve"] and ra["after"] == rb["after"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _planted(model: torch.nn.Module) -> torch.nn.Module:
    """Same FP32 function, but fc2 gets an outlier input channel (x50) and an outlier output row (x20)."""
    planted = copy.deepcopy(model)
    with torch.no_grad():
        planted.fc1.weight[5] *= 50
        planted.fc1.bias[5] *= 50
        planted.fc2.weight[:, 5] /= 50
        planted.fc2.weight[7] *= 20
        planted.fc2.bias[7] *= 20
        planted.fc3.weight[:, 7] /= 20
    return planted


def test_remedies_find_smoothquant_and_per_channel(mlp):
    model = _planted(mlp)
    calibration, evaluation = _data("calibration", 128), _data("evaluation", 200)
    x = evaluation.inputs
    assert torch.allclose(model(x), mlp(x), atol=1e-4)
    entries = remedies(model, calibration, evaluation, "fc2", "int8-pt", "int8")
    by_name = {e["remedy"]: e for e in entries}
    assert by_name["baseline"]["gain_db"] == 0.0
    smooth = next(e for e in entries if e["remedy"].startswith("SmoothQuant"))
    assert smooth["gain_db"] > 3.0  # measured ~+20 dB: the outlier channel moves into the weight
    assert by_name["per-channel weights"]["gain_db"] > 0.0
    measured = [e["output_sqnr_db"] for e in entries if e["output_sqnr_db"] is not None]
    assert measured == sorted(measured, reverse=True)
    assert {"remedy", "output_sqnr_db", "gain_db"} <= set(entries[0])


def test_remedies_reject_an_unknown_layer(mlp):
    with pytest.raises(ValueError, match="unknown layer"):
        remedies(mlp, _data("calibration", 32), None, "nope", "int8")
