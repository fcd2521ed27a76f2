"""Range calibration: choose the clipping range [lo, hi] a quantizer maps onto its grid.

Two callers:

* weights: `weight_range(rows, ...)` on a 2-D tensor whose rows are the quantization groups
  (per-tensor = 1 row, per-channel = one row per output channel, per-group = one row per group);
  it returns one (lo, hi) per row.
* activations: a streamed `Histogram` (pass 1: `observe_minmax` over every batch; pass 2: `fill`
  over every batch with the edges fixed by pass 1), then `histogram_range(hist, ...)`.

Methods (`CALIBRATION_METHODS`):

* "minmax": the exact data range.
* "percentile": the p-th percentile (symmetric: of |x|; asymmetric: (100-p)-th and p-th of x).
* "mse": the clipping that minimizes sum((x - quantize_fn(x, lo, hi))**2) over candidate ranges
  alpha * minmax, alpha in [0.1, 1] (asymmetric: lo and hi scaled by the same alpha). alpha = 1 is
  always a candidate, so it is never worse than minmax under the objective it evaluates
  (histograms: the error at bin centres weighted by counts).
* "entropy": TensorRT's KL-divergence threshold search on the histogram of |x| with
  2**(bits-1) quantization levels; asymmetric clips [min, max] to [-t, t].

Every range contains 0 (lo <= 0 <= hi): quantization grids must represent zero exactly (padding,
ReLU zeros). symmetric=True gives [-t, t]. An all-zero row gives (0, 0); the quantizer guards the
zero scale (analysis.formats does). The grid itself always comes from the caller's `quantize_fn`,
so the same search works for int grids of any width, symmetric or not, and for float8.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "percentile", "mse", "entropy")

QuantizeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""quantize_fn(values, lo, hi) -> fake-quantized values.

values is [n_rows, k]; lo and hi are [n_rows, 1] and broadcast against it.
"""

# MSE search grid: alpha in [0.1, 1] in steps of 0.01 (91 candidates). Histograms are cheap, so
# they search the whole grid. Weights search it coarse-to-fine, because every candidate is a full
# pass of quantize_fn over the tensor: steps of 0.1, then +-0.05, then +-0.02/0.04, then +-0.01
# around each row's best so far: 18 passes instead of 91 (exact when the error is unimodal in
# alpha, and never worse than minmax regardless).
_MSE_ALPHA_MIN = 0.1
_MSE_FINE_STEP = 0.01
_MSE_SEARCH_LEVELS: tuple[tuple[float, ...], ...] = (
    (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1),  # absolute alphas (1.0 is evaluated first)
    (-0.05, 0.05),  # offsets from the best so far
    (-0.04, -0.02, 0.02, 0.04),
    (-0.01, 0.01),
)

# Elements per chunk in the weight MSE search: small enough that a chunk stays in cache across
# the 18 candidate passes (the search is memory-bound otherwise) and that memory stays bounded.
_MSE_CHUNK_ELEMENTS = 1 << 19

# torch.kthvalue copies its input; chunk rows so a [n_rows, k] percentile never needs more than
# a few copies of this many elements.
_QUANTILE_CHUNK_ELEMENTS = 1 << 24

# Per-row |x| histograms for weight entropy calibration: TensorRT's 2048 bins (the lowest threshold
# is n_levels bins, so bins must be well above the 128 levels of 8 bits for clipping to be
# possible at all), but only ~128 thresholds per row, evenly strided, to keep thousands of rows
# affordable. Activations (one histogram) try every threshold.
_WEIGHT_ENTROPY_BINS = 2048
_WEIGHT_ENTROPY_THRESHOLDS = 128
_KL_CHUNK_ELEMENTS = 1 << 20  # [rows, thresholds, levels] doubles per chunk of the KL search
_HIST_FILL_CHUNK = 1 << 22
_ABS_HIST_SLIVER = 1e-6


# ----------------------------------------------------------------------------------------------
# Validation


def _check_method(method: str) -> None:
    if method not in CALIBRATION_METHODS:
        raise ValueError(
            f"unknown calibration method {method!r}; valid methods: {', '.join(CALIBRATION_METHODS)}"
        )


def _check_args(method: str, percentile: float, bits: int) -> None:
    _check_method(method)
    # p < 50 would put the asymmetric lower percentile above the upper one.
    if not (isinstance(percentile, numbers.Real) and 50.0 <= float(percentile) <= 100.0):
        raise ValueError(f"percentile must be in [50, 100], got {percentile!r}")
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 32:
        raise ValueError(f"bits must be an integer in [2, 32], got {bits!r}")


def _check_finite(x: torch.Tensor, what: str) -> None:
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{what} contains NaN or Inf ({bad} of {x.numel()} values); "
            "check the model's weights/activations"
        )


# ----------------------------------------------------------------------------------------------
# Weights


def weight_range(
    rows: torch.Tensor,
    *,
    method: str,
    symmetric: bool,
    quantize_fn: QuantizeFn,
    percentile: float = 99.99,
    bits: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping range of a [n_rows, n_elements] tensor of quantization groups.

    Returns (lo, hi), float32 tensors of shape [n_rows] on rows' device, lo <= 0 <= hi.
    `bits` is used by "entropy" only (2**(bits-1) levels); `percentile` by "percentile" only.
    """
    _check_args(method, percentile, bits)
    if rows.dim() != 2:
        raise ValueError(f"rows must be 2-D [n_rows, n_elements], got shape {tuple(rows.shape)}")
    n_rows, k = rows.shape
    if k == 0 and n_rows > 0:
        raise ValueError("rows has no elements per row; nothing to calibrate")
    x = rows.detach().to(torch.float32)
    _check_finite(x, "weight tensor")
    if n_rows == 0:
        empty = torch.empty(0, dtype=torch.float32, device=x.device)
        return empty, empty.clone()

    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    mn = torch.minimum(x.amin(dim=1), zero)
    mx = torch.maximum(x.amax(dim=1), zero)

    if method == "minmax":
        if symmetric:
            t = torch.maximum(-mn, mx)
            lo, hi = -t, t
        else:
            lo, hi = mn, mx
    elif method == "percentile":
        lo, hi = _weight_percentile(x, symmetric, float(percentile), mn, mx)
    elif method == "mse":
        lo, hi = _weight_mse(x, symmetric, quantize_fn, mn, mx)
    else:
        lo, hi = _weight_entropy(x, symmetric, bits, mn, mx)

    return lo.contiguous(), hi.contiguous()


def _row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """q-quantile of each row with linear interpolation (torch.quantile's default), float32 [n_rows].

    torch.kthvalue instead of torch.quantile: quantile refuses inputs over 2**24 elements (a
    per-tensor row of an embedding table is bigger), and selection is O(n) where quantile sorts.
    """
    n_rows, k = x.shape
    pos = q * (k - 1)
    i0 = min(int(math.floor(pos)), k - 1)
    frac = pos - i0
    i1 = min(i0 + 1, k - 1)
    out = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    step = max(1, _QUANTILE_CHUNK_ELEMENTS // k)
    for start in range(0, n_rows, step):
        chunk = x[start : start + step]
        v0 = chunk.kthvalue(i0 + 1, dim=1).values.double()
        if frac > 0 and i1 != i0:
            v1 = chunk.kthvalue(i1 + 1, dim=1).values.double()
            v0 = v0 + (v1 - v0) * frac
        out[start : start + step] = v0.float()
    return out


def _weight_percentile(
    x: torch.Tensor, symmetric: bool, p: float, mn: torch.Tensor, mx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if symmetric:
        t = torch.minimum(_row_quantile(x.abs(), p / 100.0), torch.maximum(-mn, mx))
        return -t, t
    # Clamp to the 0-including minmax range: a percentile of all-positive data is positive.
    lo = torch.clamp(_row_quantile(x, (100.0 - p) / 100.0), min=mn, max=torch.zeros_like(mn))
    hi = torch.clamp(_row_quantile(x, p / 100.0), min=torch.zeros_like(mx), max=mx)
    return lo, hi


def _mse_fine_alphas() -> np.ndarray:
    n = int(round((1.0 - _MSE_ALPHA_MIN) / _MSE_FINE_STEP)) + 1
    return np.round(np.linspace(_MSE_ALPHA_MIN, 1.0, n), 10)


def _weight_mse(
    x: torch.Tensor,
    symmetric: bool,
    quantize_fn: QuantizeFn,
    mn: torch.Tensor,
    mx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, k = x.shape
    if symmetric:
        t = torch.maximum(-mn, mx)
        base_lo, base_hi = -t, t
    else:
        base_lo, base_hi = mn, mx

    best_alpha = torch.ones(n_rows, dtype=torch.float64, device=x.device)
    step = max(1, _MSE_CHUNK_ELEMENTS // k)
    for start in range(0, n_rows, step):
        sl = slice(start, start + step)
        xc = x[sl]
        blo = base_lo[sl].double()
        bhi = base_hi[sl].double()

        def err_for(alpha: torch.Tensor) -> torch.Tensor:
            lo = (alpha * blo).float().unsqueeze(1)
            hi = (alpha * bhi).float().unsqueeze(1)
            d = quantize_fn(xc, lo, hi).to(torch.float32) - xc
            # vector_norm: one fused pass for the sum of squares (the search is memory-bound).
            e = torch.linalg.vector_norm(d, dim=1).double().square()
            # A candidate the quantizer cannot handle (NaN) is simply never chosen.
            return torch.nan_to_num(e, nan=math.inf)

        # alpha = 1 first: later candidates replace the best only when strictly better, so ties
        # keep the unclipped range and the result is never worse than minmax.
        best_a = torch.ones(xc.shape[0], dtype=torch.float64, device=x.device)
        best_e = err_for(best_a)
        for level, offsets in enumerate(_MSE_SEARCH_LEVELS):
            centre = best_a.clone()
            for off in offsets:
                a = centre + off if level else torch.full_like(centre, off)
                a = torch.clamp(a, _MSE_ALPHA_MIN, 1.0).round(decimals=6)
                e = err_for(a)
                better = e < best_e
                best_e = torch.where(better, e, best_e)
                best_a = torch.where(better, a, best_a)
        best_alpha[sl] = best_a

    lo = (best_alpha * base_lo.double()).float()
    hi = (best_alpha * base_hi.double()).float()
    return lo, hi


def _weight_entropy(
    x: torch.Tensor, symmetric: bool, bits: int, mn: torch.Tensor, mx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, k = x.shape
    absmax = torch.maximum(-mn, mx)
    bins = _WEIGHT_ENTROPY_BINS
    n_levels = 2 ** (bits - 1)
    stride = max(1, (bins - n_levels) // _WEIGHT_ENTROPY_THRESHOLDS)
    t = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    # Per-row |x| histograms, batched: bin index + row offset, one bincount per chunk of rows.
    step = max(1, min(_QUANTILE_CHUNK_ELEMENTS // k, (1 << 22) // bins))
    for start in range(0, n_rows, step):
        xc = x[start : start + step].abs().double()
        am = absmax[start : start + step].double()
        r = xc.shape[0]
        scale = torch.where(am > 0, bins / am, torch.ones_like(am)).unsqueeze(1)
        idx = torch.clamp((xc * scale).floor_().long(), 0, bins - 1)
        idx += torch.arange(r, device=x.device).unsqueeze(1) * bins
        hist = torch.bincount(idx.reshape(-1), minlength=r * bins).reshape(r, bins).double()
        frac = _kl_threshold_fraction(hist, n_levels, stride)
        t[start : start + step] = (frac * am).float()
    t = torch.minimum(t, absmax)
    if symmetric:
        return -t, t
    return torch.maximum(mn, -t), torch.minimum(mx, t)


# ----------------------------------------------------------------------------------------------
# KL-divergence (entropy) threshold search


def _xlogx(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v > 0, v * torch.log(torch.where(v > 0, v, torch.ones_like(v))), torch.zeros_like(v))


def _kl_threshold_fraction(hist: torch.Tensor, n_levels: int, stride: int = 1) -> torch.Tensor:
    """Entropy (KL-divergence) calibration on histograms of |x|, vectorized over rows and thresholds.

    hist: [R, B] float64 counts of |x| over [0, absmax] in B equal bins. Same objective as NVIDIA's
    TensorRT calibrator (pytorch-quantization / ModelOpt `_compute_amax_entropy`): for a threshold of
    i bins (i = n_levels .. B, every `stride`-th, B always included), the reference p is hist[:i]
    with the clipped mass folded into bin i-1; the candidate q merges hist[:i] into n_levels
    equal-width groups and spreads each group's mass evenly over its nonzero bins; the threshold
    minimizes KL(p || q) (infinite where p > 0 but q == 0: outliers folded into an empty bin).
    Returns the threshold as a fraction of absmax ([R], float64; 1.0 where there is nothing to
    choose).

    The reference loops over thresholds and bins in Python; here every group sum is a difference of
    cumulative sums: O(n_levels) per threshold instead of O(B).
    """
    r_all, b = hist.shape
    dev = hist.device
    result = torch.ones(r_all, dtype=torch.float64, device=dev)
    if n_levels >= b:
        return result  # no threshold below absmax leaves room for n_levels bins
    # Data on at most n_levels distinct bins is represented about as well unclipped, and the KL
    # curve is degenerate there (a constant row has zero divergence at every threshold).
    active = (hist > 0).sum(dim=1) > n_levels
    if not bool(active.any()):
        return result
    h = hist[active]
    zeros_col = torch.zeros(h.shape[0], 1, dtype=torch.float64, device=dev)
    c = torch.cat([zeros_col, h.cumsum(dim=1)], dim=1)  # c[:, k] = sum h[:, :k]
    cnz = torch.cat([zeros_col, (h > 0).double().cumsum(dim=1)], dim=1)
    chl = torch.cat([zeros_col, _xlogx(h).cumsum(dim=1)], dim=1)
    n = c[:, -1:]  # total from the same cumsum, so nothing is "clipped" at i = B

    i = torch.arange(n_levels, b + 1, stride, device=dev)
    if int(i[-1]) != b:
        i = torch.cat([i, torch.tensor([b], device=dev)])
    # Group g of threshold i holds bins k with floor(k * n_levels / i) == g, i.e. it starts at
    # ceil(g * i / n_levels) (integer arithmetic: the reference's np.digitize on linspace edges).
    g = torch.arange(n_levels + 1, device=dev)
    starts = (g.unsqueeze(0) * i.unsqueeze(1) + n_levels - 1) // n_levels  # [T, n_levels + 1]

    flat = starts.reshape(-1)
    kl = torch.empty(h.shape[0], i.numel(), dtype=torch.float64, device=dev)
    step = max(1, _KL_CHUNK_ELEMENTS // flat.numel())
    for lo in range(0, h.shape[0], step):
        sl = slice(lo, lo + step)
        cs, nn, hs = c[sl], n[sl], h[sl]
        r = cs.shape[0]
        # [r, T, n_levels]: mass and nonzero-bin count of each group of each threshold.
        q_sum = cs.index_select(1, flat).view(r, *starts.shape).diff(dim=2)
        q_nz = cnz[sl].index_select(1, flat).view(r, *starts.shape).diff(dim=2)
        # log of q on the group's nonzero bins; empty groups get a finite value times zero mass.
        log_q = q_sum.clamp(min=1e-300).log_().sub_(q_nz.clamp_(min=1.0).log_())
        # sum_k p_k log q_k: p == hist below bin i-1, whose extra (outlier) mass sits in the last group.
        b_sum = torch.linalg.vecdot(q_sum, log_q, dim=2)
        outliers = nn - cs[:, i]
        b_sum += outliers * log_q[:, :, -1]
        h_last = hs[:, i - 1]
        a_sum = chl[sl][:, i - 1] + _xlogx(h_last + outliers)  # sum_k p_k log p_k
        # Normalized: P = p / N, Q = q / sum(q), and sum(q) = mass below the threshold.
        kl_chunk = (a_sum - b_sum) / nn - torch.log(nn) + torch.log(cs[:, i])
        kl[sl] = torch.where((outliers > 0) & (h_last == 0), torch.full_like(kl_chunk, math.inf), kl_chunk)
    best = torch.argmin(kl, dim=1)  # first minimum: ties go to the tighter threshold, as in the reference
    result[active] = i[best].double() / b
    return result


# ----------------------------------------------------------------------------------------------
# Activations: streamed histogram


@dataclass(eq=False)  # arrays inside: field-wise == would be ambiguous
class Histogram:
    """Streaming histogram of one tensor's calibration values.

    Pass 1: `observe_minmax(x)` for every batch (tracks min, max and count).
    Pass 2: `fill(x)` for every batch; the edges are fixed on the first fill to `bins` equal bins
    spanning [min(min, 0), max(max, 0)], so every batch is binned the same way and filling batch by
    batch equals filling their concatenation. Values outside the pass-1 range (a caller whose two
    passes saw different data) are counted in the end bins.
    """

    bins: int = 2048
    _min: float = field(default=math.inf, init=False, repr=False)
    _max: float = field(default=-math.inf, init=False, repr=False)
    _n_observed: int = field(default=0, init=False, repr=False)
    _edges: np.ndarray | None = field(default=None, init=False, repr=False)
    _counts: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 1:
            raise ValueError(f"bins must be a positive integer, got {self.bins!r}")

    def observe_minmax(self, x: torch.Tensor) -> None:
        """Pass 1: widen the tracked range by one batch."""
        if self._edges is not None:
            raise RuntimeError("observe_minmax() after fill(): the edges are already fixed")
        if x.numel() == 0:
            return
        x = x.detach()
        _check_finite(x, "activation tensor")
        self._min = min(self._min, float(x.min()))
        self._max = max(self._max, float(x.max()))
        self._n_observed += x.numel()

    def fill(self, x: torch.Tensor) -> None:
        """Pass 2: add one batch to the counts."""
        if self._n_observed == 0:
            raise ValueError("histogram is empty: call observe_minmax() on every batch before fill()")
        if self._edges is None:
            self._edges = self._make_edges()
            self._counts = np.zeros(self.bins, dtype=np.float64)
        if x.numel() == 0:
            return
        x = x.detach()
        _check_finite(x, "activation tensor")
        lo, hi = float(self._edges[0]), float(self._edges[-1])
        scale = self.bins / (hi - lo)
        flat = x.reshape(-1)
        for start in range(0, flat.numel(), _HIST_FILL_CHUNK):
            v = flat[start : start + _HIST_FILL_CHUNK].double()
            # float64 so the bin of a value never depends on the dtype or batch it came in.
            idx = torch.clamp(((v - lo) * scale).floor_(), 0, self.bins - 1).long()
            self._counts += torch.bincount(idx, minlength=self.bins).cpu().numpy()

    def merge(self, other: Histogram) -> None:
        """Add another histogram of the same tensor (e.g. from another worker) into this one.

        Before filling, min/max/count are combined; once filled, both must share the same edges.
        """
        if self.bins != other.bins:
            raise ValueError(f"cannot merge histograms with {self.bins} and {other.bins} bins")
        if self._edges is None and other._edges is None:
            self._min = min(self._min, other._min)
            self._max = max(self._max, other._max)
            self._n_observed += other._n_observed
            return
        if self._edges is None or other._edges is None or not np.array_equal(self._edges, other._edges):
            raise ValueError("cannot merge filled histograms with different edges; merge before fill()")
        assert self._counts is not None and other._counts is not None
        self._counts = self._counts + other._counts
        self._n_observed += other._n_observed

    def _make_edges(self) -> np.ndarray:
        lo = min(self._min, 0.0)
        hi = max(self._max, 0.0)
        if hi == lo:  # all zeros: any positive width; ranges come from min/max, not the edges
            hi = lo + 1.0
        return np.linspace(lo, hi, self.bins + 1)

    @property
    def edges(self) -> np.ndarray:
        """Bin edges (float64, bins + 1); fixed by the first fill()."""
        if self._edges is not None:
            return self._edges.copy()
        if self._n_observed == 0:
            raise ValueError("histogram is empty: no values observed, so it has no edges yet")
        return self._make_edges()

    @property
    def counts(self) -> np.ndarray:
        """Counts per bin (float64, bins); zeros before the first fill()."""
        if self._counts is None:
            return np.zeros(self.bins, dtype=np.float64)
        return self._counts.copy()

    @property
    def min(self) -> float:
        """Smallest value observed (+inf before any)."""
        return self._min

    @property
    def max(self) -> float:
        """Largest value observed (-inf before any)."""
        return self._max

    @property
    def n_observed(self) -> int:
        """Number of values seen by observe_minmax()."""
        return self._n_observed

    @property
    def n_filled(self) -> int:
        """Number of values counted by fill()."""
        return 0 if self._counts is None else int(round(float(self._counts.sum())))


def _cumulative(edges: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cumulative count at each edge (values uniform within each bin between edges)."""
    return np.concatenate([[0.0], np.cumsum(counts)])


def _inverse_cdf(xs: np.ndarray, cum: np.ndarray, target: float) -> float:
    """x where the piecewise-linear cumulative count (xs, cum) first reaches target."""
    k = int(np.searchsorted(cum, target, side="left"))
    if k <= 0:
        return float(xs[0])
    if k >= len(xs):
        return float(xs[-1])
    c0, c1 = cum[k - 1], cum[k]
    frac = 0.0 if c1 <= c0 else (target - c0) / (c1 - c0)
    return float(xs[k - 1] + (xs[k] - xs[k - 1]) * frac)


def _abs_cumulative(edges: np.ndarray, cum: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Count of |x| <= t for each t in ts, from the signed histogram (uniform within bins)."""
    return np.interp(ts, edges, cum) - np.interp(-ts, edges, cum)


def _abs_histogram(edges: np.ndarray, counts: np.ndarray, absmax: float, bins: int) -> np.ndarray:
    """Re-bin the signed histogram into `bins` equal bins of |x| over [0, absmax]."""
    cum = _cumulative(edges, counts)
    ts = np.linspace(0.0, absmax, bins + 1)
    f = _abs_cumulative(edges, cum, ts)
    f[-1] = cum[-1]  # everything is within absmax
    out = np.diff(f)
    # Rounding in the interpolation leaves slivers (~1e-12 counts) in bins that hold nothing; the
    # KL search counts nonzero bins, so they would matter. Real masses here are fractions of counts.
    out[out < _ABS_HIST_SLIVER] = 0.0
    return out


def histogram_range(
    hist: Histogram,
    *,
    method: str,
    symmetric: bool,
    quantize_fn: QuantizeFn,
    percentile: float = 99.99,
    bits: int = 8,
) -> tuple[float, float]:
    """Clipping range (lo, hi) of the values streamed into `hist`, lo <= 0 <= hi.

    "minmax" needs only pass 1 (observe_minmax); the other methods need the filled counts.
    """
    _check_args(method, percentile, bits)
    if hist.n_observed == 0:
        raise ValueError("histogram is empty: no values were observed; run calibration data through it first")
    mn = min(hist.min, 0.0)
    mx = max(hist.max, 0.0)
    absmax = max(-mn, mx)

    def done(lo: float, hi: float) -> tuple[float, float]:
        if symmetric:
            t = min(max(-lo, hi), absmax)
            return -t, t
        return max(min(lo, 0.0), mn), min(max(hi, 0.0), mx)

    # Constant data has no distribution to clip (and bin interpolation would land inside the
    # constant's bin, excluding the constant itself).
    if method == "minmax" or hist.min == hist.max:
        return done(mn, mx)
    counts = hist.counts
    total = float(counts.sum())
    if total <= 0:
        raise ValueError("histogram has no filled values: call fill() on every batch after observe_minmax()")
    edges = hist.edges
    p = float(percentile) / 100.0

    if method == "percentile":
        cum = _cumulative(edges, counts)
        if symmetric:
            # |x| cdf is piecewise linear with breakpoints at |edges|: invert it on those.
            ts = np.unique(np.concatenate([[0.0], np.abs(edges)]))
            ts = ts[ts <= absmax]
            if ts[-1] < absmax:
                ts = np.append(ts, absmax)
            t = _inverse_cdf(ts, _abs_cumulative(edges, cum, ts), p * total)
            return done(-t, t)
        return done(_inverse_cdf(edges, cum, (1.0 - p) * total), _inverse_cdf(edges, cum, p * total))

    if method == "mse":
        return done(*_histogram_mse(edges, counts, symmetric, quantize_fn, mn, mx))

    # entropy
    abs_hist = torch.from_numpy(_abs_histogram(edges, counts, absmax, hist.bins)).unsqueeze(0)
    t = float(_kl_threshold_fraction(abs_hist, 2 ** (bits - 1))[0]) * absmax
    if symmetric:
        return done(-t, t)
    return done(max(mn, -t), min(mx, t))


def _histogram_mse(
    edges: np.ndarray,
    counts: np.ndarray,
    symmetric: bool,
    quantize_fn: QuantizeFn,
    mn: float,
    mx: float,
) -> tuple[float, float]:
    """MSE search on bin centres weighted by counts; all candidates in one quantize_fn call."""
    keep = counts > 0
    centres = torch.from_numpy(((edges[:-1] + edges[1:]) / 2)[keep]).float()
    weights = torch.from_numpy(counts[keep])
    alphas = _mse_fine_alphas()[::-1].copy()  # alpha = 1 first: argmin keeps it on ties
    if symmetric:
        t = max(-mn, mx)
        base_lo, base_hi = -t, t
    else:
        base_lo, base_hi = mn, mx
    a = torch.from_numpy(alphas).unsqueeze(1)
    lo = (a * base_lo).float()
    hi = (a * base_hi).float()
    values = centres.unsqueeze(0).expand(len(alphas), -1).contiguous()
    d = quantize_fn(values, lo, hi).to(torch.float32).double() - values.double()
    err = torch.nan_to_num((d * d * weights).sum(dim=1), nan=math.inf)
    best = int(torch.argmin(err))
    return float(lo[best, 0]), float(hi[best, 0])
