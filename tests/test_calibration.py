"""Tests for analysis.calibration: hand-computed values, properties, errors."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import analysis.calibration.weights as weight_calibration
from analysis.calibration import CALIBRATION_METHODS, Histogram, histogram_range, weight_range
from analysis.calibration.kl import _kl_threshold_fraction

PROPS = settings(max_examples=50, deadline=None)


# ----------------------------------------------------------------------------------------------
# A tiny reference quantizer (independent of analysis.formats): uniform int grid, round half to
# even (torch.round), clamp. A zero-width range gets scale 1, as real quantizers guard it.


def int_quantizer(bits: int, symmetric: bool):
    def fn(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scale = torch.maximum(-lo, hi) / qmax
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
        levels = 2**bits - 1
        scale = (hi - lo) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.clamp(torch.round(-lo / scale), 0, levels)
        return (torch.clamp(torch.round(x / scale) + zp, 0, levels) - zp) * scale

    return fn


def sq_err(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qfn) -> torch.Tensor:
    """Per-row sum of squared quantization error, float64."""
    d = qfn(x, lo.reshape(-1, 1), hi.reshape(-1, 1)).double() - x.double()
    return (d * d).sum(dim=1)


def wr(x: torch.Tensor, method: str, symmetric: bool, bits: int = 8, **kw):
    return weight_range(x, method=method, symmetric=symmetric, quantize_fn=int_quantizer(bits, symmetric), bits=bits, **kw)


def hist_of(*batches: torch.Tensor, bins: int = 2048) -> Histogram:
    h = Histogram(bins=bins)
    for b in batches:
        h.observe_minmax(b)
    for b in batches:
        h.fill(b)
    return h


def hr(h: Histogram, method: str, symmetric: bool, bits: int = 8, **kw):
    return histogram_range(h, method=method, symmetric=symmetric, quantize_fn=int_quantizer(bits, symmetric), bits=bits, **kw)


def gaussian(n: int, seed: int = 0, sigma: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * sigma


# ----------------------------------------------------------------------------------------------
# Hand-computed values


def test_minmax_known_rows():
    x = torch.tensor([[-1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-7.0, -2.0, -1.0], [0.0, 0.0, 0.0]])
    lo, hi = wr(x, "minmax", symmetric=False)
    assert lo.dtype == hi.dtype == torch.float32 and lo.shape == hi.shape == (4,)
    # Ranges are widened to include 0: [4, 6] -> [0, 6], [-7, -1] -> [-7, 0].
    assert lo.tolist() == [-1.0, 0.0, -7.0, 0.0]
    assert hi.tolist() == [3.0, 6.0, 0.0, 0.0]
    lo, hi = wr(x, "minmax", symmetric=True)
    assert hi.tolist() == [3.0, 6.0, 7.0, 0.0]
    assert lo.tolist() == [-3.0, -6.0, -7.0, 0.0]


def test_percentile_on_known_sequence():
    x = torch.arange(0, 10001, dtype=torch.float32).unsqueeze(0)  # 0 .. 10000
    # Linear interpolation: the p-th percentile sits at position p/100 * 10000.
    lo, hi = wr(x, "percentile", symmetric=True, percentile=99.99)
    assert hi.item() == pytest.approx(9999.0) and lo.item() == -hi.item()
    lo, hi = wr(x, "percentile", symmetric=True, percentile=99.0)
    assert hi.item() == pytest.approx(9900.0)
    lo, hi = wr(x - 5000, "percentile", symmetric=False, percentile=99.99)
    assert lo.item() == pytest.approx(-4999.0) and hi.item() == pytest.approx(4999.0)
    # Asymmetric on all-positive data: the low percentile (1.0) is widened to 0.
    lo, hi = wr(x, "percentile", symmetric=False, percentile=99.99)
    assert lo.item() == 0.0 and hi.item() == pytest.approx(9999.0)
    # Between two values: 99.995% of 10000 = 9999.5.
    lo, hi = wr(x, "percentile", symmetric=True, percentile=99.995)
    assert hi.item() == pytest.approx(9999.5)


def test_percentile_matches_torch_quantile_per_row():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 301, generator=g) * torch.arange(1, 8).unsqueeze(1)
    lo, hi = wr(x, "percentile", symmetric=False, percentile=99.0)
    assert torch.allclose(hi, torch.quantile(x, 0.99, dim=1), rtol=1e-6, atol=1e-6)
    assert torch.allclose(lo, torch.quantile(x, 0.01, dim=1), rtol=1e-6, atol=1e-6)
    lo, hi = wr(x, "percentile", symmetric=True, percentile=99.0)
    assert torch.allclose(hi, torch.quantile(x.abs(), 0.99, dim=1), rtol=1e-6, atol=1e-6)


def test_percentile_row_larger_than_torch_quantile_limit():
    # torch.quantile refuses more than 2**24 elements; a per-tensor row can be bigger.
    n = 2**24 + 1
    x = torch.arange(n, dtype=torch.float32).unsqueeze(0)  # 0 .. 2**24, exact in float32
    lo, hi = wr(x, "percentile", symmetric=True, percentile=99.99)
    assert hi.item() == pytest.approx(0.9999 * (n - 1), abs=1.0)


def test_histogram_percentile_close_to_exact():
    x = gaussian(200_000, seed=2)
    h = hist_of(x[:100_000], x[100_000:])
    width = float(h.edges[1] - h.edges[0])
    for p in (99.0, 99.9, 99.99):
        lo, hi = hr(h, "percentile", symmetric=False, percentile=p)
        assert lo == pytest.approx(torch.quantile(x, 1 - p / 100).item(), abs=2 * width)
        assert hi == pytest.approx(torch.quantile(x, p / 100).item(), abs=2 * width)
        lo, hi = hr(h, "percentile", symmetric=True, percentile=p)
        assert lo == -hi
        assert hi == pytest.approx(torch.quantile(x.abs(), p / 100).item(), abs=2 * width)


def test_mse_clips_a_single_outlier():
    # 10000 N(0, 1) values and one outlier at 50, 4-bit symmetric (levels -7..7).
    # minmax: step 50/7 ~ 7.1, so (nearly) every Gaussian value rounds to 0: error ~ sum(x^2) ~ 10000.
    # Clipping at t = 5: step 5/7, rounding error ~ 10000 * (5/7)^2 / 12 ~ 425, plus (50 - 5)^2 = 2025
    # for the outlier: ~2450, so the MSE-optimal t is far below 50.
    x = torch.cat([gaussian(10_000, seed=3), torch.tensor([50.0])]).unsqueeze(0)
    q = int_quantizer(4, True)
    lo_mm, hi_mm = wr(x, "minmax", symmetric=True, bits=4)
    lo, hi = wr(x, "mse", symmetric=True, bits=4)
    assert hi_mm.item() == 50.0
    err_mm = sq_err(x, lo_mm, hi_mm, q).item()
    err = sq_err(x, lo, hi, q).item()
    g = x[0, :-1].double()
    assert err_mm >= (g[g.abs() < 50 / 14] ** 2).sum().item()  # these all round to 0
    assert hi.item() < 15.0 and lo.item() == -hi.item()
    assert err < 0.5 * err_mm
    # The histogram path finds the same kind of clip.
    lo_h, hi_h = hr(hist_of(x), "mse", symmetric=True, bits=4)
    assert hi_h < 15.0


def test_mse_on_uniform_data_is_close_to_minmax():
    # Uniform data has no tail worth clipping: any alpha < 1 saturates a slab of values.
    x = torch.linspace(-1.0, 1.0, 4097).unsqueeze(0)
    for sym in (True, False):
        lo, hi = wr(x, "mse", symmetric=sym)
        assert hi.item() >= 0.97 and lo.item() <= -0.97
        lo_h, hi_h = hr(hist_of(x[0]), "mse", symmetric=sym)
        assert hi_h >= 0.97 and lo_h <= -0.97


def test_mse_keeps_minmax_when_the_data_sits_on_the_grid():
    # Every value is a multiple of 1/127: exactly representable by 8-bit symmetric minmax (error 0);
    # any alpha < 1 clips +-1, so minmax is the unique optimum.
    x = (torch.arange(-127, 128, dtype=torch.float32) / 127).unsqueeze(0)
    lo, hi = wr(x, "mse", symmetric=True)
    assert (lo.item(), hi.item()) == (-1.0, 1.0)
    assert sq_err(x, lo, hi, int_quantizer(8, True)).item() < 1e-10  # 0 up to float rounding


def test_mse_asymmetric_scales_both_ends():
    x = torch.cat([gaussian(10_000, seed=4), torch.tensor([-40.0, 60.0])]).unsqueeze(0)
    lo, hi = wr(x, "mse", symmetric=False, bits=4)
    assert -40.0 < lo.item() < 0.0 < hi.item() < 60.0
    # Same alpha on both ends.
    assert lo.item() / -40.0 == pytest.approx(hi.item() / 60.0, rel=1e-5)


def test_entropy_on_gaussian_histogram():
    x = gaussian(200_000, seed=5)
    lo, hi = hr(hist_of(x), "entropy", symmetric=True, bits=8)
    assert 2.0 < hi < 5.0 and lo == -hi
    # An outlier at 50 sigma is clipped, and the threshold stays in the Gaussian's range.
    xo = torch.cat([x, torch.tensor([50.0])])
    lo, hi = hr(hist_of(xo), "entropy", symmetric=True, bits=8)
    assert 2.0 < hi < 6.0
    lo, hi = hr(hist_of(xo), "entropy", symmetric=False, bits=8)
    assert -6.0 < lo < -2.0 and 2.0 < hi < 6.0


def test_entropy_on_gaussian_weight_rows():
    g = torch.Generator().manual_seed(6)
    rows = torch.randn(4, 4096, generator=g)
    rows[:, 0] = 30.0  # one outlier per row
    lo, hi = wr(rows, "entropy", symmetric=True, bits=8)
    assert torch.all(hi > 2.0) and torch.all(hi < 6.0)
    assert torch.equal(lo, -hi)
    # Long rows (per-tensor) use more bins; same behaviour.
    big = torch.cat([gaussian(100_000, seed=7), torch.tensor([30.0])]).unsqueeze(0)
    lo, hi = wr(big, "entropy", symmetric=False, bits=8)
    assert 2.0 < hi.item() < 6.0 and -6.0 < lo.item() < -2.0


def _naive_kl_threshold(bins: np.ndarray, nbins: int, stride: int = 1) -> int:
    """The reference loop: NVIDIA pytorch-quantization's `_compute_amax_entropy` (start_bin = nbins)."""
    divergences, thresholds = [], []
    for i in list(range(nbins, len(bins) + 1, stride)) + ([len(bins)] if (len(bins) - nbins) % stride else []):
        new_density_counts = np.zeros(nbins, dtype=np.float64)
        space = np.linspace(0, i, num=nbins + 1)
        digitized_space = np.digitize(range(i), space) - 1
        digitized_space[bins[:i] == 0] = -1
        for idx, digitized in enumerate(digitized_space):
            if digitized != -1:
                new_density_counts[digitized] += bins[idx]
        counter = Counter(digitized_space)
        for key, val in counter.items():
            if key != -1:
                new_density_counts[key] = new_density_counts[key] / val
        new_density = np.zeros(i, dtype=np.float64)
        for idx, digitized in enumerate(digitized_space):
            if digitized != -1:
                new_density[idx] = new_density_counts[digitized]
        reference_density = np.array(bins[:i], dtype=np.float64)
        reference_density[-1] += np.sum(bins[i:])
        p = reference_density / reference_density.sum()
        q = new_density / new_density.sum()
        nz = p > 0
        kl = math.inf if np.any(q[nz] == 0) else float(np.sum(p[nz] * np.log(p[nz] / q[nz])))
        divergences.append(kl)
        thresholds.append(i)
    return thresholds[int(np.argmin(divergences))]


@pytest.mark.parametrize("n_levels,stride", [(2, 1), (8, 1), (16, 1), (8, 5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorized_kl_matches_reference_loop(n_levels, stride, seed):
    rng = np.random.default_rng(seed)
    b = 96
    # A decaying histogram with gaps and a far tail, the shape entropy calibration is for.
    hist = np.floor(rng.exponential(1.0, 5000) * 12).astype(int)
    hist = np.bincount(np.minimum(hist, b - 1), minlength=b).astype(np.float64)
    hist[rng.random(b) < 0.1] = 0
    hist[b - 1] = 3
    got = _kl_threshold_fraction(torch.from_numpy(hist).unsqueeze(0), n_levels, stride)[0].item()
    assert got == _naive_kl_threshold(hist, n_levels, stride) / b


def test_entropy_falls_back_to_minmax_for_few_bins():
    # Three distinct values fill three bins: nothing for the KL search to trade off.
    x = torch.tensor([0.0, 1.0, 2.0] * 100)
    assert hr(hist_of(x), "entropy", symmetric=True) == (-2.0, 2.0)
    assert hr(hist_of(x), "entropy", symmetric=False) == (0.0, 2.0)
    lo, hi = wr(x.unsqueeze(0), "entropy", symmetric=False)
    assert (lo.item(), hi.item()) == (0.0, 2.0)


def test_entropy_at_high_bit_width_is_minmax():
    x = gaussian(10_000, seed=8)
    lo, hi = hr(hist_of(x), "entropy", symmetric=True, bits=16)  # 32768 levels > 2048 bins
    assert hi == pytest.approx(float(x.abs().max()))


# ----------------------------------------------------------------------------------------------
# Chunking must not change results


def test_chunked_rows_equal_row_by_row(monkeypatch):
    monkeypatch.setattr(weight_calibration, "_MSE_CHUNK_ELEMENTS", 3 * 64)
    monkeypatch.setattr(weight_calibration, "_QUANTILE_CHUNK_ELEMENTS", 2 * 64)
    g = torch.Generator().manual_seed(9)
    rows = torch.randn(10, 64, generator=g) * torch.linspace(0.1, 10, 10).unsqueeze(1)
    rows[3, 5] = 40.0
    for method in CALIBRATION_METHODS:
        for sym in (True, False):
            lo, hi = wr(rows, method, sym)
            for r in range(rows.shape[0]):
                lo_r, hi_r = wr(rows[r : r + 1], method, sym)
                assert lo[r].item() == lo_r.item() and hi[r].item() == hi_r.item(), (method, sym, r)


def test_deterministic_and_dtype_handling():
    g = torch.Generator().manual_seed(10)
    rows = torch.randn(8, 128, generator=g)
    for method in CALIBRATION_METHODS:
        a = wr(rows, method, False)
        b = wr(rows.clone(), method, False)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        lo, hi = wr(rows.half(), method, True)
        assert lo.dtype == torch.float32 and hi.dtype == torch.float32


def test_empty_rows_tensor():
    lo, hi = wr(torch.empty(0, 16), "mse", True)
    assert lo.shape == hi.shape == (0,)


# ----------------------------------------------------------------------------------------------
# Properties

finite_f32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)
row_arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
    elements=st.one_of(finite_f32, st.sampled_from([0.0, 1.0, -1.0, 3.5])),
)


@PROPS
@given(row_arrays, st.sampled_from(CALIBRATION_METHODS), st.booleans(), st.sampled_from([4, 8]))
def test_weight_range_properties(arr, method, symmetric, bits):
    x = torch.from_numpy(arr)
    lo, hi = wr(x, method, symmetric, bits=bits, percentile=99.0)
    assert lo.shape == hi.shape == (x.shape[0],)
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    assert torch.all(lo <= 0) and torch.all(hi >= 0) and torch.all(lo <= hi)
    mn = torch.clamp(x.amin(dim=1), max=0)
    mx = torch.clamp(x.amax(dim=1), min=0)
    if symmetric:
        assert torch.equal(lo, -hi)
        t = torch.maximum(-mn, mx)
        assert torch.all(hi <= t)
        if method == "minmax":
            assert torch.equal(hi, t)
    else:
        # Never wider than the data's (0-including) range.
        assert torch.all(lo >= mn) and torch.all(hi <= mx)
        if method == "minmax":
            assert torch.equal(lo, mn) and torch.equal(hi, mx)


@PROPS
@given(row_arrays, st.booleans(), st.sampled_from([2, 4, 8]))
def test_mse_never_worse_than_minmax(arr, symmetric, bits):
    x = torch.from_numpy(arr)
    q = int_quantizer(bits, symmetric)
    err_mse = sq_err(x, *wr(x, "mse", symmetric, bits=bits), q)
    err_mm = sq_err(x, *wr(x, "minmax", symmetric, bits=bits), q)
    assert torch.all(err_mse <= err_mm * (1 + 1e-5) + 1e-9)


@PROPS
@given(
    st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32) | st.just(0.0),
    st.integers(1, 300),
    st.sampled_from(CALIBRATION_METHODS),
    st.booleans(),
)
def test_constant_rows_give_finite_ranges_containing_the_constant(c, n, method, symmetric):
    x = torch.full((2, n), c, dtype=torch.float32)
    x[1] = 0.0
    lo, hi = wr(x, method, symmetric)
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    assert lo[0].item() <= min(c, 0.0) and hi[0].item() >= max(c, 0.0)
    assert lo[1].item() == 0.0 and hi[1].item() == 0.0
    h = hist_of(x[0])
    lo_h, hi_h = hr(h, method, symmetric)
    assert math.isfinite(lo_h) and math.isfinite(hi_h)
    assert lo_h <= min(c, 0.0) and hi_h >= max(c, 0.0)


value_lists = st.lists(finite_f32, min_size=1, max_size=200)


@PROPS
@given(value_lists, value_lists, st.integers(1, 64))
def test_histogram_batches_equal_concatenation(a, b, bins):
    ta, tb = torch.tensor(a), torch.tensor(b)
    h2 = hist_of(ta, tb, bins=bins)
    h1 = hist_of(torch.cat([ta, tb]), bins=bins)
    assert h2.n_filled == h2.n_observed == len(a) + len(b)
    assert float(h2.counts.sum()) == len(a) + len(b)
    assert np.array_equal(h1.edges, h2.edges)
    assert np.array_equal(h1.counts, h2.counts)
    assert h2.min == min(a + b) and h2.max == max(a + b)
    assert h2.edges[0] == min(min(a + b), 0.0)
    if max(a + b) != 0.0 or min(a + b) != 0.0:  # all zeros: any positive width
        assert h2.edges[-1] == max(max(a + b), 0.0)


@PROPS
@given(value_lists, st.sampled_from(CALIBRATION_METHODS), st.booleans(), st.sampled_from([4, 8]))
def test_histogram_range_properties(a, method, symmetric, bits):
    x = torch.tensor(a)
    lo, hi = hr(hist_of(x, bins=128), method, symmetric, bits=bits, percentile=99.0)
    assert math.isfinite(lo) and math.isfinite(hi)
    assert lo <= 0.0 <= hi
    mn, mx = min(min(a), 0.0), max(max(a), 0.0)
    if symmetric:
        assert lo == -hi and hi <= max(-mn, mx) * (1 + 1e-6)
    else:
        assert mn * (1 + 1e-6) <= lo and hi <= mx * (1 + 1e-6)
    if method == "minmax":
        assert (lo, hi) == ((-max(-mn, mx), max(-mn, mx)) if symmetric else (mn, mx))


@PROPS
@given(value_lists, st.booleans(), st.sampled_from([2, 4, 8]))
def test_histogram_mse_never_worse_than_minmax(a, symmetric, bits):
    # The histogram objective: error at bin centres, weighted by counts.
    h = hist_of(torch.tensor(a), bins=64)
    centres = torch.from_numpy((h.edges[:-1] + h.edges[1:]) / 2).float().unsqueeze(0)
    weights = torch.from_numpy(h.counts)
    q = int_quantizer(bits, symmetric)

    def err(lo: float, hi: float) -> float:
        d = q(centres, torch.tensor([[lo]]), torch.tensor([[hi]])).double() - centres.double()
        return float((d[0] ** 2 * weights).sum())

    mse = hr(h, "mse", symmetric, bits=bits)
    assert err(*mse) <= err(*hr(h, "minmax", symmetric, bits=bits)) * (1 + 1e-6) + 1e-9


def test_histogram_bins_known_values():
    h = hist_of(torch.tensor([-1.0, -0.4, 0.1, 0.6, 1.0, 0.9]), bins=4)
    assert h.edges.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert h.counts.tolist() == [1.0, 1.0, 1.0, 3.0]  # the right edge belongs to the last bin
    # All-positive data: the edges still start at 0.
    h = hist_of(torch.tensor([2.0, 3.0, 4.0]), bins=2)
    assert h.edges.tolist() == [0.0, 2.0, 4.0] and h.counts.tolist() == [0.0, 3.0]


def test_histogram_matches_numpy():
    x = gaussian(50_000, seed=13) * 3 + 1
    h = hist_of(x[:20_000], x[20_000:], bins=300)
    ref, _ = np.histogram(x.double().numpy(), bins=h.edges)
    assert np.array_equal(h.counts, ref.astype(np.float64))


def test_histogram_merge():
    x, y = gaussian(1000, seed=11), gaussian(500, seed=12) + 3
    h = Histogram(bins=64)
    ha, hb = Histogram(bins=64), Histogram(bins=64)
    ha.observe_minmax(x)
    hb.observe_minmax(y)
    ha.merge(hb)
    ha.fill(x)
    ha.fill(y)
    h = hist_of(x, y, bins=64)
    assert np.array_equal(ha.counts, h.counts) and ha.n_observed == h.n_observed
    with pytest.raises(ValueError, match="bins"):
        ha.merge(Histogram(bins=32))


# ----------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_inf_rejected(bad):
    x = torch.randn(3, 8)
    x[1, 2] = bad
    for method in CALIBRATION_METHODS:
        with pytest.raises(ValueError, match="NaN or Inf.*check the model's weights/activations"):
            wr(x, method, True)
    h = Histogram()
    with pytest.raises(ValueError, match="NaN or Inf"):
        h.observe_minmax(x)
    h.observe_minmax(torch.ones(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        h.fill(x)


def test_unknown_method():
    with pytest.raises(ValueError, match="minmax, percentile, mse, entropy"):
        wr(torch.ones(1, 4), "kl", True)
    with pytest.raises(ValueError, match="unknown calibration method"):
        hr(hist_of(torch.ones(4)), "max", False)


def test_empty_histogram():
    with pytest.raises(ValueError, match="empty"):
        hr(Histogram(), "minmax", True)
    h = Histogram()
    h.observe_minmax(torch.empty(0))
    with pytest.raises(ValueError, match="empty"):
        hr(h, "percentile", False)
    with pytest.raises(ValueError, match="empty"):
        Histogram().fill(torch.ones(3))
    # Observed but never filled: minmax works, the others need the counts.
    h.observe_minmax(torch.tensor([-1.0, 2.0]))
    assert hr(h, "minmax", False) == (-1.0, 2.0)
    with pytest.raises(ValueError, match="fill"):
        hr(h, "mse", False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        wr(torch.ones(4), "minmax", True)
    with pytest.raises(ValueError, match="percentile"):
        wr(torch.ones(1, 4), "percentile", True, percentile=101.0)
    with pytest.raises(ValueError, match="bits"):
        wr(torch.ones(1, 4), "entropy", True, bits=1)
    with pytest.raises(ValueError, match="bins"):
        Histogram(bins=0)
    h = hist_of(torch.ones(3))
    with pytest.raises(RuntimeError, match="fixed"):
        h.observe_minmax(torch.ones(3))
