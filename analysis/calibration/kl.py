"""Entropy calibration's search: the clipping threshold that minimizes KL(p || q) on |x| histograms."""

from __future__ import annotations

import math

import torch

_KL_CHUNK_ELEMENTS = 1 << 20  # [rows, thresholds, levels] doubles per chunk of the KL search


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
