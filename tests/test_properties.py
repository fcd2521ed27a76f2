"""Property tests (hypothesis) for the metrics and the quantizers, across shapes and dtypes.

test_metrics.py checks each metric against hand-computed values and test_formats.py the 1-D
float32 grid; here the claims are general: SQNR ignores a common scale and falls as noise grows,
cosine stays in [-1, 1], KL is non-negative and zero only for equal distributions, and the
quantizers keep shape and dtype, stay finite, are idempotent on their own ranges, never use
more than 2^b values per quantization group and give, element by element, the values of an
independent reference grid (tests/_grid_reference.py, plain Python floats) — for
float16/bfloat16/float32 tensors of up to 4-D, per-tensor, per-channel and per-group.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from analysis.formats import dynamic_quantize, from_rows, parse_format, quantize_with_range, to_rows
from analysis.metrics import SQNR_CAP_DB, compare, sqnr_db
from analysis.quantsim import quantize_weight
from tests import _grid_reference as ref

PROPS = settings(max_examples=40, deadline=None, derandomize=True)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def vectors(min_size=2, max_size=64, bound=1e3):
    bound = float(np.float32(bound))  # hypothesis wants float32-representable bounds
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)
    return arrays(np.float32, st.integers(min_size, max_size), elements=elements).map(torch.from_numpy)


@st.composite
def signal_and_noise(draw, min_relative=1e-2):
    """A reference with real signal, and noise at least `min_relative` of it (float32 can tell them apart)."""
    ref = draw(vectors())
    noise = draw(arrays(np.float32, len(ref), elements=st.floats(-1, 1, width=32))).copy()
    if not np.any(np.abs(noise) > 0.1):
        noise[0] = 1.0
    if float(ref.abs().max()) < 1e-3:
        ref = ref + 1.0
    level = draw(st.floats(min_relative, 1.0)) * float(ref.abs().max())
    return ref, torch.from_numpy(noise) * level


# --- metrics -------------------------------------------------------------------------------------------


@PROPS
@given(pair=signal_and_noise(), k=st.integers(-30, 30))
def test_sqnr_is_exactly_invariant_to_a_power_of_two_scale(pair, k):
    ref, noise = pair
    q = ref + noise
    c = 2.0**k  # exact in floating point: any change would be the metric's, not rounding's
    assert sqnr_db(ref * c, q * c) == pytest.approx(sqnr_db(ref, q), abs=1e-9)


@PROPS
@given(pair=signal_and_noise(), c=st.floats(1e-3, 1e3))
def test_sqnr_is_invariant_to_any_positive_scale(pair, c):
    ref, noise = pair
    q = ref + noise
    assert sqnr_db(ref * c, q * c) == pytest.approx(sqnr_db(ref, q), abs=1e-3)


@PROPS
@given(pair=signal_and_noise(min_relative=1e-3), growth=st.floats(1.1, 100.0))
def test_sqnr_falls_as_the_noise_grows(pair, growth):
    ref, noise = pair
    quiet, loud = sqnr_db(ref, ref + noise), sqnr_db(ref, ref + noise * growth)
    assert loud < quiet or loud == quiet == -SQNR_CAP_DB
    # the expected 20·log10(growth) dB, up to float32 rounding of ref + noise
    if -SQNR_CAP_DB < loud and quiet < SQNR_CAP_DB:
        assert quiet - loud == pytest.approx(20 * math.log10(growth), abs=0.05)


@PROPS
@given(ref=vectors(bound=1e6), q=vectors(bound=1e6))
def test_cosine_is_in_range_and_everything_is_finite(ref, q):
    n = min(len(ref), len(q))
    stats = compare(ref[:n], q[:n])
    # up to float32 rounding: the strict bound is the xfail below
    assert -1.0 - 1e-6 <= stats.cosine <= 1.0 + 1e-6
    assert all(math.isfinite(v) for v in (stats.sqnr_db, stats.mse, stats.cosine, stats.max_abs_error))
    assert -SQNR_CAP_DB <= stats.sqnr_db <= SQNR_CAP_DB


@pytest.mark.parametrize("ref,q", [
    ([1.0, 1.0], [-4097.0, -4097.0]),  # found by the property above: cosine -1.00000003
    ([3.0, 4.0], [3.003, 4.004]),  # q = 1.001·ref: cosine 1.00000004
], ids=["anti-parallel", "parallel"])
def test_cosine_never_leaves_minus_one_to_one(ref, q):
    cosine = compare(torch.tensor(ref), torch.tensor(q)).cosine
    assert -1.0 <= cosine <= 1.0, repr(cosine)


@st.composite
def logits(draw, spread=5.0):
    rows, classes = draw(st.integers(1, 6)), draw(st.integers(2, 12))
    values = draw(arrays(np.float64, (rows, classes), elements=st.floats(-spread, spread)))
    return torch.from_numpy(values.astype(np.float32))


@PROPS
@given(ref=logits(), q=logits())
def test_kl_is_non_negative_and_top1_agreement_a_fraction(ref, q):
    n, c = min(len(ref), len(q)), min(ref.shape[1], q.shape[1])
    stats = compare(ref[:n, :c], q[:n, :c], logits=True)
    assert stats.kl >= 0.0 and math.isfinite(stats.kl)
    assert 0.0 <= stats.top1_agreement <= 1.0
    assert stats.top1_agreement * n == pytest.approx(round(stats.top1_agreement * n))


@PROPS
@given(ref=logits(), shift=st.floats(-50, 50), row=st.integers(0, 5), col=st.integers(0, 11),
       delta=st.floats(0.5, 5.0), sign=st.sampled_from([-1.0, 1.0]))
def test_kl_is_zero_exactly_for_equal_distributions(ref, shift, row, col, delta, sign):
    assert compare(ref, ref.clone(), logits=True).kl == 0.0
    # a constant shift per row keeps the distribution: KL ~ 0 although the logits differ
    assert compare(ref, ref + shift, logits=True).kl == pytest.approx(0.0, abs=1e-9)
    changed = ref.clone()
    changed[row % len(ref), col % ref.shape[1]] += sign * delta
    assert compare(ref, changed, logits=True).kl > 1e-9


def test_top1_agreement_counts_rows_not_elements():
    ref = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    assert compare(ref, ref[[1, 0]], logits=True).top1_agreement == 0.0
    assert compare(ref, ref * 2, logits=True).top1_agreement == 1.0


@PROPS
@given(ref=vectors(bound=1e12), q=vectors(bound=1e12), tiny=st.booleans())
def test_metrics_are_finite_for_large_and_small_mixed_sign_values(ref, q, tiny):
    n = min(len(ref), len(q))
    scale = 1e-12 if tiny else 1.0
    stats = compare(ref[:n] * scale, q[:n] * scale, logits=True)
    for value in (stats.sqnr_db, stats.mse, stats.cosine, stats.max_abs_error, stats.kl, stats.top1_agreement):
        assert math.isfinite(value)


@pytest.mark.parametrize("magnitude", [1e30, 1e-30])
def test_metrics_at_extreme_magnitudes(magnitude):
    ref = torch.tensor([1.0, -2.0, 3.0, -0.5]) * magnitude
    stats = compare(ref, ref * 2)  # the error equals the signal: 0 dB
    assert math.isfinite(stats.mse) and math.isfinite(stats.cosine)
    assert stats.sqnr_db == pytest.approx(0.0, abs=1e-3) and stats.cosine == pytest.approx(1.0)


# --- quantizers ----------------------------------------------------------------------------------------


@st.composite
def weight_tensors(draw, dtype_names=tuple(DTYPES)):
    """Up to 4-D tensors: random values, constant rows, zeros and outliers, in one of the float dtypes."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    elements = st.one_of(st.floats(-100, 100, width=32, allow_subnormal=False), st.just(0.0), st.just(2.5))
    values = draw(arrays(np.float32, shape, elements=elements))
    dtype = DTYPES[draw(st.sampled_from(dtype_names))]
    return torch.from_numpy(values).to(dtype)


@st.composite
def weight_formats(draw, max_bits=8):
    bits = draw(st.integers(2, max_bits))
    symmetric = draw(st.booleans())
    granularity = draw(st.sampled_from(["per-tensor", "per-channel", "per-group"]))
    name = f"int{bits}-{'sym' if symmetric else 'asym'}"
    if granularity == "per-group":
        return parse_format(f"{name}-g{draw(st.sampled_from([2, 4, 8]))}", "weight")
    return parse_format(name, "weight", granularity)


def _groups_within_bits(q: torch.Tensor, fmt, axis: int) -> None:
    rows = to_rows(q.float(), fmt, axis)
    for row in rows:
        assert len(torch.unique(row)) <= 2**fmt.bits


def _normal_float32_scales(x: torch.Tensor) -> bool:
    """Whether every non-zero |x| is at least 1e-30, so each group's float32 scale is a normal number
    and the float64 reference applies (an underflowing scale hits the engine's "zero scale -> 1" guard)."""
    magnitudes = x.float().abs()
    return bool(((magnitudes == 0) | (magnitudes >= 1e-30)).all())


def _max_bits(dtype: torch.dtype) -> int:
    # bfloat16 holds 8 significant bits: code·scale of an 8-bit grid is not representable in it, so a
    # second pass can move by a step. Up to 6 bits (codes < 64) the grid survives the rounding.
    return 6 if dtype == torch.bfloat16 else 8


@PROPS
@given(x=weight_tensors(), data=st.data())
def test_fake_quantization_keeps_shape_dtype_and_is_idempotent(x, data):
    fmt = data.draw(weight_formats(max_bits=_max_bits(x.dtype)))
    axis = data.draw(st.integers(0, x.dim() - 1))
    rows = to_rows(x, fmt, axis)
    lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)

    def fake_quantize(t: torch.Tensor) -> torch.Tensor:
        return from_rows(quantize_with_range(to_rows(t, fmt, axis), fmt, lo, hi), t, fmt, axis)

    q = fake_quantize(x)
    assert q.shape == x.shape and q.dtype == x.dtype
    assert torch.isfinite(q).all()
    assert torch.equal(fake_quantize(q), q)
    _groups_within_bits(q, fmt, axis)
    # and the values are the stated grid's, element by element, with groups built independently
    group_ids = ref.groups(tuple(x.shape), fmt.granularity, axis, fmt.group_size)
    if _normal_float32_scales(x):
        ref.check_against_reference(x.double().numpy(), q.double().numpy(), group_ids, fmt.bits, fmt.symmetric,
                                    dtype=x.dtype)


def _weight_quantizer_properties(x: torch.Tensor, fmt, method: str) -> None:
    axis = 0
    q, lo, hi = quantize_weight(x, fmt, axis, method, 99.0)
    assert q.shape == x.shape and torch.isfinite(q).all()
    if method == "minmax" and _normal_float32_scales(x):  # ranges known independently: each group's min / max
        group_ids = ref.groups(tuple(x.shape), fmt.granularity, axis, fmt.group_size)
        ref.check_against_reference(x.double().numpy(), q.double().numpy(), group_ids, fmt.bits, fmt.symmetric,
                                    dtype=x.dtype)
    _groups_within_bits(q, fmt, axis)
    again = from_rows(quantize_with_range(to_rows(q.float(), fmt, axis), fmt, lo[:, None], hi[:, None]),
                      q.float(), fmt, axis)
    # idempotent on its own calibrated ranges, once back in the weight's dtype
    assert torch.equal(again.to(q.dtype), q)
    assert q.dtype == x.dtype


@PROPS
@given(x=weight_tensors(dtype_names=("float32",)), data=st.data())
def test_calibrated_weight_quantizer_float32(x, data):
    fmt = data.draw(weight_formats())
    _weight_quantizer_properties(x, fmt, data.draw(st.sampled_from(["mse", "percentile"])))
    _weight_quantizer_properties(x, fmt, "minmax")  # every example: the one with a reference


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_calibrated_weight_quantizer_keeps_a_half_precision_dtype(dtype):
    x = torch.randn(4, 6).to(DTYPES[dtype])
    _weight_quantizer_properties(x, parse_format("int4", "weight"), "minmax")


@PROPS
@given(x=weight_tensors(), bits=st.integers(2, 8), symmetric=st.booleans(), per_token=st.booleans())
def test_dynamic_quantization_keeps_shape_dtype_and_bits_per_row(x, bits, symmetric, per_token):
    fmt = parse_format(f"int{bits}-{'sym' if symmetric else 'asym'}", "activation")
    q = dynamic_quantize(x, fmt, per_token)
    assert q.shape == x.shape and q.dtype == x.dtype and torch.isfinite(q).all()
    rows = q.reshape(-1, q.shape[-1]) if per_token else q.reshape(q.shape[0], -1)
    assert all(len(torch.unique(row)) <= 2**bits for row in rows.float())
    # each row (token, or sample) on the grid of its own range
    shape = tuple(x.shape)
    group_ids = (np.arange(int(np.prod(shape))) // (shape[-1] if per_token else int(np.prod(shape[1:])))).reshape(shape)
    if _normal_float32_scales(x):
        ref.check_against_reference(x.double().numpy(), q.double().numpy(), group_ids, bits, symmetric,
                                    dtype=x.dtype)


@pytest.mark.parametrize("dynamic", [False, True])
def test_float16_activation_with_a_wide_range_stays_finite(dynamic):
    x = torch.tensor([[-40000.0, 40000.0, 3.0]], dtype=torch.float16)
    fmt = parse_format("int8", "activation")
    q = dynamic_quantize(x, fmt, True) if dynamic else quantize_with_range(x, fmt, x.min(), x.max())
    assert torch.isfinite(q).all()
