"""An independent, element-by-element reference for the integer fake-quantization grids.

Written in plain Python floats (float64) from the stated convention (README "Formats",
analysis/formats.py docstring), sharing no code with analysis.formats:

* the range [lo, hi] is first widened to include 0;
* symmetric: codes in [-2^(b-1), 2^(b-1) - 1], scale = max(-lo, hi) / ((2^b - 1) / 2), no zero point;
* asymmetric: codes in [0, 2^b - 1], scale = (hi - lo) / (2^b - 1), integer zero point
  round(-lo / scale) clamped to the code range;
* a zero range uses scale 1; round() is round-half-to-even;
* x_q = (clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale.

The engine computes in float32, so where x / scale (or -lo / scale) sits on a rounding tie up to
float32 precision either neighbour is right; `check_against_reference` accepts both there and only
there. (Plain floats for the grid; torch only to round the reference to the output dtype.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def _near_tie(exact: float) -> bool:
    """Whether float32 arithmetic may put `exact` (a value in code units) on either side of a .5 tie:
    its relative rounding is ~1e-7 per operation, so the window grows with the code's magnitude."""
    return abs(exact - math.floor(exact) - 0.5) < 1e-4 + abs(exact) * 1e-6


@dataclass(frozen=True)
class Grid:
    scale: float
    zero_points: tuple[int, ...]  # one, or two when -lo / scale is a tie
    qmin: int
    qmax: int


def grid(bits: int, symmetric: bool, lo: float, hi: float) -> Grid:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = max(-lo, hi) / ((2**bits - 1) / 2)
    else:
        qmin, qmax = 0, 2**bits - 1
        scale = (hi - lo) / (2**bits - 1)
    if not scale > 0:
        scale = 1.0
    if symmetric:
        return Grid(scale, (0,), qmin, qmax)
    exact = -lo / scale
    candidates = {round(exact)}
    if _near_tie(exact):
        candidates |= {math.floor(exact), math.ceil(exact)}
    return Grid(scale, tuple(sorted(min(max(z, qmin), qmax) for z in candidates)), qmin, qmax)


def candidates(value: float, g: Grid) -> list[float]:
    """Every value x may quantize to on grid g (one, or two at a rounding tie)."""
    exact = value / g.scale
    codes = {round(exact)}
    if _near_tie(exact):
        codes |= {math.floor(exact), math.ceil(exact)}
    out = []
    for zp in g.zero_points:
        for code in codes:
            out.append((min(max(code + zp, g.qmin), g.qmax) - zp) * g.scale)
    return out


def quantize(values, g: Grid, zero_point: int | None = None) -> np.ndarray:
    """Reference values (float64), ties resolved half-to-even, for one zero point."""
    zp = g.zero_points[0] if zero_point is None else zero_point
    return np.array([(min(max(round(v / g.scale) + zp, g.qmin), g.qmax) - zp) * g.scale
                     for v in np.asarray(values, dtype=np.float64).reshape(-1)]).reshape(np.shape(values))


def groups(shape: tuple[int, ...], granularity: str, axis: int = 0, group_size: int | None = None) -> np.ndarray:
    """Group id of every element: one group (per-tensor), one per index along `axis` (per-channel),
    or runs of `group_size` consecutive elements of one channel (per-group), channel elements taken
    in row-major order of the remaining axes."""
    n = int(np.prod(shape)) if shape else 1
    if granularity == "per-tensor" or not shape:
        return np.zeros(shape, dtype=np.int64)
    ids = np.zeros(shape, dtype=np.int64)
    moved = np.moveaxis(ids, axis, 0)  # a view: writes land in ids
    per_channel = n // shape[axis]
    for channel in range(shape[axis]):
        if granularity == "per-channel":
            moved[channel] = channel
        else:
            runs = np.arange(per_channel).reshape(moved[channel].shape) // group_size
            moved[channel] = channel * (per_channel // group_size + 1) + runs
    return ids


def check_against_reference(x: np.ndarray, q: np.ndarray, group_ids: np.ndarray, bits: int, symmetric: bool,
                            ranges: dict[int, tuple[float, float]] | None = None, dtype: torch.dtype = torch.float32) -> None:
    """Assert q (the engine's result, as float64) is x quantized element by element on each group's grid.

    ranges: group id -> (lo, hi); by default each group's own min / max. dtype: the engine's output
    dtype; reference values are rounded to it, and one unit of its last place is tolerated (the
    engine rounds float32 -> dtype, the reference float64 -> dtype).
    """
    finfo = torch.finfo(dtype)
    cast = lambda v: float(torch.tensor(v, dtype=torch.float64).to(dtype))  # noqa: E731
    x = np.asarray(x, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    for gid in np.unique(group_ids):
        mask = group_ids == gid
        xs, qs = x[mask], q[mask]
        lo, hi = ranges[int(gid)] if ranges is not None else (xs.min(), xs.max())
        g = grid(bits, symmetric, lo, hi)

        def allowed(value: float, grid_: Grid) -> list[float]:
            return [cast(ref) for ref in candidates(value, grid_)]

        def close(got: float, ref: float) -> bool:
            return abs(got - ref) <= g.scale * 1e-3 + abs(ref) * max(finfo.eps, 1e-6) + finfo.smallest_normal * finfo.eps

        # one zero point must explain the whole group (it is shared)
        if not any(all(any(close(got, ref) for ref in allowed(v, Grid(g.scale, (zp,), g.qmin, g.qmax)))
                       for v, got in zip(xs, qs)) for zp in g.zero_points):
            bad = [(v, got, allowed(v, g)) for v, got in zip(xs, qs)
                   if not any(close(got, ref) for ref in allowed(v, g))][:3]
            raise AssertionError(f"group {gid}: range ({lo}, {hi}), {bits} bits, symmetric={symmetric}, "
                                 f"scale {g.scale}: (x, got, allowed) {bad}")
