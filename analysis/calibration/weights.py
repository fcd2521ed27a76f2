"""Weight calibration: a clipping range per row of a [n_rows, n_elements] tensor of quantization groups."""

from __future__ import annotations

import math

import torch

from .common import _MSE_ALPHA_MIN, _MSE_SEARCH_LEVELS, QuantizeFn, _check_args, _check_finite
from .kl import _kl_threshold_fraction

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
