"""Activation calibration: a histogram streamed over the calibration batches, and its clipping range."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .common import QuantizeFn, _check_args, _check_finite, _mse_fine_alphas
from .kl import _kl_threshold_fraction

_HIST_FILL_CHUNK = 1 << 22
_ABS_HIST_SLIVER = 1e-6


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
