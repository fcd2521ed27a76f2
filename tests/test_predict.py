"""A map's predicted figures (Problem.predict / layer_table / finish_map) against hand-computed values."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from analysis.allocate import Budget, Problem, _choice, build_problem, finish_map, suggest
from analysis.formats import parse_format
from analysis.layers import Layer
from analysis.precision_map import LayerPrecision, PrecisionMap

# Two Linear layers with biases: a is 2×4 (8 weights, 8 MACs), b is 1×2 (2 weights, 2 MACs).
A = Layer("a", "Linear", 8 + 2, (2, 4), 0, ("a",), macs=8)
B = Layer("b", "Linear", 2 + 1, (1, 2), 0, ("b",), macs=2)
TOTAL = 10  # weight elements of both


def _option(layer: Layer, weight: str, noise: float):
    fmt = None if weight == "fp32" else parse_format(weight, "weight")
    # build_problem names precisions fully qualified, as maps do ("int8" -> "int8-sym-pc")
    return _choice(layer, LayerPrecision(weight).qualified(), fmt, None, noise, TOTAL)


@pytest.fixture
def tiny() -> Problem:
    choices = [[_option(A, "int8", 1e-4), _option(A, "int4", 1e-3), _option(A, "fp32", 0.0)],
               [_option(B, "int8", 2e-4), _option(B, "fp32", 0.0)]]
    # b at int4 was measured by the sweep but is not one of the allocator's choices
    return Problem([A, B], choices, signal=1.0, total_elements=TOTAL,
                   trial_noise={("b", LayerPrecision("int4").qualified()): 5e-3})


def _map(**layers: str) -> PrecisionMap:
    return PrecisionMap({name: LayerPrecision(weight) for name, weight in layers.items()})


def test_predict_a_map_of_the_allocators_choices(tiny):
    got = tiny.predict(_map(a="int4", b="int8"))
    # noise 1e-3 + 2e-4 against signal 1; SQNR = 10·log10(1 / 1.2e-3)
    assert got["output_sqnr_db"] == pytest.approx(10 * math.log10(1 / 1.2e-3))
    assert got["avg-bits"] == pytest.approx((8 * 4 + 2 * 8) / 10)
    # per-channel symmetric: codes + one fp16 scale per output channel + FP32 biases, in bits
    a_bits = 8 * 4 + 2 * 16 + 2 * 32
    b_bits = 2 * 8 + 1 * 16 + 1 * 32
    assert got["size-kb"] == pytest.approx((a_bits + b_bits) / 8 / 1024)
    assert got["bops"] == pytest.approx(8 * 4 * 32 + 2 * 8 * 32)  # activations unquantized: 32 bits
    assert got["unmeasured"] == []


def test_predict_uses_the_sweeps_trial_and_the_default(tiny):
    got = tiny.predict(_map(b="int4"))  # a takes the map's default: fp32
    assert got["output_sqnr_db"] == pytest.approx(10 * math.log10(1 / 5e-3))
    assert got["avg-bits"] == pytest.approx((8 * 32 + 2 * 4) / 10)
    assert got["size-kb"] == pytest.approx((8 * 32 + 2 * 32 + 2 * 4 + 16 + 32) / 8 / 1024)
    assert got["bops"] == pytest.approx(8 * 32 * 32 + 2 * 4 * 32)
    fp32 = tiny.predict(_map())
    assert fp32["output_sqnr_db"] == 100.0 and fp32["avg-bits"] == 32


def test_a_format_the_sweep_never_measured_has_no_sqnr(tiny):
    got = tiny.predict(_map(a="int8", b="int2"))
    assert got["output_sqnr_db"] is None and got["unmeasured"] == ["b"]
    assert got["avg-bits"] == pytest.approx((8 * 8 + 2 * 2) / 10)  # costs are known all the same
    rows = tiny.layer_table(_map(a="int8", b="int2"))
    assert [(r["layer"], r["weight"], r["activation"]) for r in rows] == [("a", "int8-sym-pc", None),
                                                                         ("b", "int2-sym-pc", None)]
    assert rows[0]["output_sqnr_db"] == pytest.approx(40.0) and rows[1]["output_sqnr_db"] is None
    assert rows[0]["params"] == 10 and rows[0]["kind"] == "Linear"


def test_finish_map_records_budget_prediction_and_measurement(tiny):
    pmap = _map(a="int4", b="int8")
    done = finish_map(tiny, pmap, Budget("avg-bits", 5.0), measured={"noise": 1e-2, "metric": 90.0, "drop": 1.5})
    assert done.layers == pmap.layers
    assert done.budget == {"kind": "avg-bits", "value": 5.0}
    assert set(done.predicted) == {"output_sqnr_db", "avg-bits", "size-kb", "bops"}  # "unmeasured" only when some are
    assert done.predicted["output_sqnr_db"] == pytest.approx(10 * math.log10(1 / 1.2e-3))
    assert done.measured == {"noise": 1e-2, "metric": 90.0, "drop": 1.5, "sqnr_db": pytest.approx(20.0)}
    # re-finished after an edit: the budget stays, the measurement (of the old map) goes
    edited = finish_map(tiny, _map(a="int8", b="int2"), measured=None)
    again = finish_map(tiny, PrecisionMap(edited.layers, budget=done.budget))
    assert again.budget == done.budget and again.measured is None
    assert again.predicted["output_sqnr_db"] is None and again.predicted["unmeasured"] == ["b"]
    assert "predicted" in again.to_dict() and "measured" not in again.to_dict()


@pytest.mark.parametrize("seed", range(4))
def test_a_suggested_map_predicts_exactly_its_totals(seed):
    from tests.test_allocate import random_problem

    problem = random_problem(random.Random(seed), 5)
    problem.choices = [[replace(c, precision=c.precision.qualified()) for c in ch] for ch in problem.choices]
    sug = suggest(problem, Budget("avg-bits", 4.0))
    assert sug.map.predicted == {k: v for k, v in problem.predict(sug.map).items() if k != "unmeasured"}
    assert sug.map.predicted["output_sqnr_db"] == sug.predicted_sqnr_db
    assert sug.map.budget == {"kind": "avg-bits", "value": 4.0}


def test_a_real_analysis_predicts_weight_only_maps_from_its_trials():
    from analysis.loading import load_data, load_model
    from analysis.sweep import AnalysisConfig, analyze

    result = analyze(load_model("sample:mlp"), load_data("sample:mlp"),
                     AnalysisConfig(weight_formats=("int8", "int4"), act_formats=("int8",), num_samples=32))
    problem = build_problem(result)
    # the allocator chooses among weight/activation pairs; weight-only int4 is a sweep trial
    assert all(c.precision.activation is not None or c.precision.weight == "fp32" for ch in problem.choices for c in ch)
    names = [layer.name for layer in result.layers]
    trial = next(t for t in result.trials if t.layer == names[0] and t.target == "weights" and t.weight_format == "int4")
    got = problem.predict(PrecisionMap({names[0]: LayerPrecision("int4")}))
    assert got["unmeasured"] == []
    assert got["output_sqnr_db"] == pytest.approx(problem.predicted_sqnr(trial.output.mse))
