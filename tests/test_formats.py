"""Quantizer invariants (hypothesis) checked against an independent element-wise reference grid
(tests/_grid_reference.py), hand-computed grids, and the format-name grammar."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from analysis.formats import (
    FormatError, dynamic_quantize, from_rows, parse_format, parse_formats, quantize_with_range,
    scale_and_zero_point, to_rows,
)
from tests import _grid_reference as ref

INT_NAMES = [f"int{b}" for b in (2, 3, 4, 5, 6, 7, 8, 16)]
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


def tensors(min_size=1, max_size=64):
    return arrays("float32", st.integers(min_size, max_size), elements=finite).map(torch.from_numpy)


# For comparisons with the float64 reference: magnitudes of 0 or at least 1e-30, so every grid's
# float32 scale is a normal number (a range so narrow that the scale underflows float32 is handled
# by the guard "zero scale -> 1", which a float64 reference does not reproduce).
_TINY = float(np.float32(1e-30))
grid_magnitudes = st.one_of(st.just(0.0), st.floats(_TINY, 1e4, width=32), st.floats(-1e4, -_TINY, width=32))


def _range(x):
    return x.min().reshape(1), x.max().reshape(1)


@settings(max_examples=60, deadline=None)
@given(x=arrays("float32", st.integers(1, 64), elements=grid_magnitudes).map(torch.from_numpy),
       name=st.sampled_from(INT_NAMES), symmetric=st.booleans())
def test_quantize_with_range_matches_an_elementwise_reference(x, name, symmetric):
    fmt = parse_format(name + ("-sym" if symmetric else "-asym"), "weight", "per-tensor")
    q = quantize_with_range(x, fmt, *_range(x))
    ref.check_against_reference(x.numpy(), q.numpy(), np.zeros(len(x), dtype=np.int64), fmt.bits, symmetric)


@settings(max_examples=60, deadline=None)
@given(x=tensors(), name=st.sampled_from(INT_NAMES), symmetric=st.booleans())
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(x, name, symmetric):
    fmt = parse_format(name + ("-sym" if symmetric else "-asym"), "weight", "per-tensor")
    lo, hi = _range(x)
    q = quantize_with_range(x, fmt, lo, hi)
    step = ref.grid(fmt.bits, symmetric, float(lo), float(hi)).scale  # the step of the stated grid
    # inside the range nothing clips: at most half a step, plus float32 rounding of about one ulp of |x|
    assert torch.all((q - x).abs() <= step / 2 * (1 + 1e-5) + x.abs() * 1e-6 + 1e-30)


@settings(max_examples=60, deadline=None)
@given(lo=grid_magnitudes.map(lambda v: -abs(v)), hi=grid_magnitudes.map(abs), name=st.sampled_from(INT_NAMES),
       symmetric=st.booleans())
def test_exported_scale_and_zero_point_are_the_stated_grid(lo, hi, name, symmetric):
    fmt = parse_format(name + ("-sym" if symmetric else "-asym"), "weight", "per-tensor")
    scale, zero_point = scale_and_zero_point(fmt, torch.tensor(lo), torch.tensor(hi))
    expected = ref.grid(fmt.bits, symmetric, lo, hi)
    assert float(scale) == pytest.approx(expected.scale, rel=1e-6)
    assert int(zero_point) in expected.zero_points


@settings(max_examples=60, deadline=None)
@given(x=tensors(), name=st.sampled_from(INT_NAMES + ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"]), symmetric=st.booleans())
def test_quantization_is_idempotent(x, name, symmetric):
    suffix = ("-sym" if symmetric else "-asym") if name.startswith("int") else ""
    fmt = parse_format(name + suffix, "weight", "per-tensor")
    lo, hi = _range(x)
    once = quantize_with_range(x, fmt, lo, hi)
    twice = quantize_with_range(once, fmt, lo, hi)
    torch.testing.assert_close(twice, once, rtol=1e-6, atol=1e-6 * float(x.abs().max() + 1))


@settings(max_examples=60, deadline=None)
@given(x=arrays("float32", st.integers(1, 64), elements=grid_magnitudes).map(torch.from_numpy),
       bits=st.sampled_from([2, 4, 8]), symmetric=st.booleans())
def test_values_land_on_the_integer_grid(x, bits, symmetric):
    fmt = parse_format(f"int{bits}-{'sym' if symmetric else 'asym'}", "weight", "per-tensor")
    lo, hi = _range(x)
    q = quantize_with_range(x, fmt, lo, hi).double()
    g = ref.grid(bits, symmetric, float(lo), float(hi))  # the stated grid, not the code's own scale
    for zp in g.zero_points:  # two candidates only when -lo / scale is a rounding tie
        codes = q / g.scale + zp
        if torch.allclose(codes, codes.round(), atol=1e-3) and g.qmin <= codes.round().min() <= codes.round().max() <= g.qmax:
            break
    else:
        raise AssertionError(f"values off the {fmt.bits}-bit grid of step {g.scale}: {q[:8].tolist()}")
    assert len(torch.unique(q)) <= 2**bits


@settings(max_examples=40, deadline=None)
@given(value=finite, n=st.integers(1, 16), name=st.sampled_from(["int8", "int4", "int8-asym", "int2-asym"]))
def test_constant_tensors_are_finite_and_zero_is_exact(value, n, name):
    x = torch.full((n,), value)
    fmt = parse_format(name, "weight", "per-tensor")
    q = quantize_with_range(x, fmt, *_range(x))
    assert torch.isfinite(q).all()
    zeros = torch.zeros(n)
    assert torch.equal(quantize_with_range(zeros, fmt, *_range(zeros)), zeros)


def test_symmetric_int8_matches_hand_computed_grid():
    # absmax 2.55 -> scale 2.55 / 127.5 = 0.02; 1.001 -> code 50 -> 1.0; -2.55 -> -127.5 rounds to -128 -> -2.56
    x = torch.tensor([1.001, -2.55, 0.0, 2.55])
    q = quantize_with_range(x, parse_format("int8", "weight", "per-tensor"), torch.tensor(-2.55), torch.tensor(2.55))
    torch.testing.assert_close(q, torch.tensor([1.0, -2.56, 0.0, 2.54]))


def test_asymmetric_uint8_matches_hand_computed_grid():
    # range [0, 2.55] -> scale 0.01, zero point 0; 1.234 -> 123 -> 1.23; 3.0 clips to 2.55
    x = torch.tensor([1.234, 3.0, -1.0])
    q = quantize_with_range(x, parse_format("int8", "activation"), torch.tensor(0.0), torch.tensor(2.55))
    torch.testing.assert_close(q, torch.tensor([1.23, 2.55, 0.0]))


def test_fp8_saturates_instead_of_producing_nan():
    x = torch.tensor([1e6, -1e6, 1.0])
    fmt = parse_format("fp8_e4m3", "weight", "per-tensor")
    q = quantize_with_range(x, fmt, torch.tensor(-10.0), torch.tensor(10.0))
    assert torch.isfinite(q).all() and q[0] == pytest.approx(10.0, rel=0.07)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 6), inner=st.integers(1, 40), group=st.sampled_from([4, 8, 32]),
       gran=st.sampled_from(["per-tensor", "per-channel", "per-group"]), axis=st.sampled_from([0, 1]))
def test_rows_round_trip_for_every_granularity(out, inner, group, gran, axis):
    w = torch.randn(out, inner, 3) if axis == 0 else torch.randn(inner, out, 3)
    name = f"int4-g{group}" if gran == "per-group" else "int4"
    fmt = parse_format(name, "weight", None if gran == "per-group" else gran)
    rows = to_rows(w, fmt, axis)
    if gran == "per-group":
        assert rows.shape[1] == group
    torch.testing.assert_close(from_rows(rows, w, fmt, axis), w)


def test_per_channel_beats_per_tensor_on_a_planted_outlier_channel():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * 0.1
    w[3] *= 100
    errors = {}
    for gran in ("per-tensor", "per-channel"):
        fmt = parse_format("int4", "weight", gran)
        rows = to_rows(w, fmt)
        q = from_rows(quantize_with_range(rows, fmt, rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)), w, fmt)
        errors[gran] = float(((q - w)[torch.arange(16) != 3] ** 2).mean())
    assert errors["per-channel"] * 20 < errors["per-tensor"]


def test_dynamic_quantization_does_not_depend_on_batching():
    x = torch.randn(6, 5, 8)
    fmt = parse_format("int8", "activation")
    whole = dynamic_quantize(x, fmt, per_token=True)
    parts = torch.cat([dynamic_quantize(x[:2], fmt, True), dynamic_quantize(x[2:], fmt, True)])
    torch.testing.assert_close(whole, parts)


@pytest.mark.parametrize("text,role,expected", [
    ("int4", "weight", ("int", 4, True, "per-channel", None)),
    ("int8", "activation", ("int", 8, False, "per-tensor", None)),
    ("int4-g64", "weight", ("int", 4, True, "per-group", 64)),
    ("int8-asym-pt", "weight", ("int", 8, False, "per-tensor", None)),
    ("uint8", "activation", ("int", 8, False, "per-tensor", None)),
    ("INT16", "weight", ("int", 16, True, "per-channel", None)),
])
def test_format_names_follow_role_defaults(text, role, expected):
    fmt = parse_format(text, role)
    assert (fmt.kind, fmt.bits, fmt.symmetric, fmt.granularity, fmt.group_size) == expected
    assert parse_format(fmt.name_for(role), role) == fmt


@pytest.mark.parametrize("text,role", [("int9", "weight"), ("int1", "weight"), ("float8", "weight"),
                                       ("int8-g0", "weight"), ("int8-foo", "weight"), ("int8-pc", "activation")])
def test_bad_format_names_get_a_clear_error(text, role):
    with pytest.raises(FormatError) as info:
        parse_format(text, role)
    assert "\n" not in str(info.value) and (text.split("-")[0] in str(info.value) or "activation" in str(info.value))


def test_format_lists_and_none():
    assert parse_formats("none", "activation") == ()
    assert [f.name_for("weight") for f in parse_formats("int8, int4-g32,fp32", "weight")] == ["int8", "int4-g32", "fp32"]


def test_six_db_per_bit_on_uniform_data():
    x = torch.rand(200_000) * 2 - 1
    sqnrs = []
    for bits in (4, 6, 8):
        fmt = parse_format(f"int{bits}", "weight", "per-tensor")
        q = quantize_with_range(x, fmt, torch.tensor(-1.0), torch.tensor(1.0))
        sqnrs.append(10 * math.log10(float((x**2).sum() / ((x - q) ** 2).sum())))
    assert all(abs((b - a) / 2 - 6.02) < 0.3 for a, b in zip(sqnrs, sqnrs[1:]))
