"""A naive reference for the small-float, MX and NVFP4 formats, element by element in plain Python.

Written from the definitions (README "Formats", OCP MX v1.0, NVIDIA's NVFP4 recipe), sharing no code
with analysis.formats, and computed differently: an element type is the sorted list of every value
its codes represent (enumerated from exponent/mantissa fields), rounding picks the nearest list entry
with ties going to the even code, and exponents are found by comparing with powers of two.

* element types: sign + exponent + mantissa, bias b: code (e, m) is m/2^M · 2^(1−b) for e = 0
  (subnormals) and (1 + m/2^M) · 2^(e−b) otherwise, every code up to the largest normal (E4M3's
  NaN code and E5M2's inf/NaN codes are above it); MXINT8's element is k · 2^−6, k = 0..127.
  Values beyond the largest normal saturate.
* MX: per block, X = 2^clamp(floor(log2(absmax)) − emax, −127, 127), element(v / X) · X.
* NVFP4 (float32 arithmetic, as deployed): g = T / 2688 (T the absmax over the tensor, or over the
  row for activations; 1 if zero), s = E4M3(float32(absmax / 6) / g), scale = float32(s · g),
  elements E2M1(v / scale) · scale; a zero scale decodes to zero.
* fp4_e2m1: scale = float32(absmax / 6) per row, E2M1(v / scale) · scale.
"""

from __future__ import annotations

import bisect

import numpy as np

F32 = np.float32


def element_values(exponent_bits: int, mantissa_bits: int, bias: int, max_normal: float) -> list[float]:
    if exponent_bits == 0:  # fixed point
        return [k / 2**mantissa_bits for k in range(int(max_normal * 2**mantissa_bits) + 1)]
    values = []
    for e in range(2**exponent_bits):
        for m in range(2**mantissa_bits):
            fraction = m / 2**mantissa_bits
            v = fraction * 2.0 ** (1 - bias) if e == 0 else (1 + fraction) * 2.0 ** (e - bias)
            if v <= max_normal:
                values.append(v)
    return values


ELEMENTS = {
    "fp4_e2m1": element_values(2, 1, 1, 6.0),
    "fp6_e2m3": element_values(2, 3, 1, 7.5),
    "fp6_e3m2": element_values(3, 2, 3, 28.0),
    "fp8_e4m3": element_values(4, 3, 7, 448.0),
    "fp8_e5m2": element_values(5, 2, 15, 57344.0),
    "int8": element_values(0, 6, 1, 127 / 64),
}
EMAX = {"fp4_e2m1": 2, "fp6_e2m3": 2, "fp6_e3m2": 4, "fp8_e4m3": 8, "fp8_e5m2": 15, "int8": 0}
MX = {"mxfp8_e4m3": "fp8_e4m3", "mxfp8_e5m2": "fp8_e5m2", "mxfp6_e2m3": "fp6_e2m3", "mxfp6_e3m2": "fp6_e3m2",
      "mxfp4": "fp4_e2m1", "mxint8": "int8"}


def round_element(v: float, element: str) -> float:
    values = ELEMENTS[element]
    a = abs(v)
    if a >= values[-1]:
        q = values[-1]
    else:
        i = bisect.bisect_right(values, a) - 1  # values[i] <= a < values[i + 1]
        below, above = values[i], values[i + 1]
        if a - below < above - a:
            q = below
        elif above - a < a - below:
            q = above
        else:
            q = below if i % 2 == 0 else above  # a tie: the even code
    return -q if v < 0 else q


def floor_log2(a: float) -> int:
    e = 0
    while 2.0**e > a:
        e -= 1
    while 2.0 ** (e + 1) <= a:
        e += 1
    return e


def mx_block(values: list[float], base: str) -> list[float]:
    element = MX[base]
    absmax = max(abs(v) for v in values)
    if absmax == 0:
        return [0.0 for _ in values]
    shared = min(127, max(-127, floor_log2(absmax) - EMAX[element]))
    x = 2.0**shared
    return [round_element(v / x, element) * x for v in values]


def nvfp4_blocks(blocks: list[list[float]], tensor_absmax: float) -> list[list[float]]:
    g = F32(tensor_absmax) / F32(6 * 448)
    if g == 0:
        g = F32(1)
    out = []
    for block in blocks:
        absmax = max(abs(v) for v in block)
        s = round_element(float((F32(absmax) / F32(6)) / g), "fp8_e4m3")
        scale = F32(s) * g
        if scale == 0:
            out.append([0.0 for _ in block])
        else:
            out.append([float(F32(round_element(float(F32(v) / scale), "fp4_e2m1")) * scale) for v in block])
    return out


def split_blocks(row: list[float], size: int) -> list[list[float]]:
    return [row[i:i + size] for i in range(0, len(row), size)]


def quantize_rows(rows: list[list[float]], name: str, block: int, tensor_wide: bool) -> list[list[float]]:
    """Each row blocked along itself (a weight's output channel, or an activation's token/pixel).
    tensor_wide: NVFP4's tensor scale over all rows (weights) rather than per row (activations)."""
    if name == "fp4_e2m1":
        out = []
        for row in rows:
            scale = F32(max(abs(v) for v in row)) / F32(6)
            scale = scale if scale > 0 else F32(1)
            out.append([float(F32(round_element(float(F32(v) / scale), "fp4_e2m1")) * scale) for v in row])
        return out
    if name == "nvfp4":
        everything = max(abs(v) for row in rows for v in row)
        return [sum(nvfp4_blocks(split_blocks(row, block), everything if tensor_wide else max(abs(v) for v in row)), [])
                for row in rows]
    return [sum((mx_block(b, name) for b in split_blocks(row, block)), []) for row in rows]


def quantize_weight(w: np.ndarray, name: str, block: int) -> np.ndarray:
    """A weight [out, ...]: rows are output channels flattened along the reduction dimensions."""
    rows = w.reshape(w.shape[0], -1).astype(np.float64).tolist()
    return np.array(quantize_rows(rows, name, block, tensor_wide=True), dtype=np.float32).reshape(w.shape)


def quantize_activation(x: np.ndarray, name: str, block: int, axis: int) -> np.ndarray:
    moved = np.moveaxis(x, axis, -1)
    rows = moved.reshape(-1, moved.shape[-1]).astype(np.float64).tolist()
    out = np.array(quantize_rows(rows, name, block, tensor_wide=False), dtype=np.float32).reshape(moved.shape)
    return np.moveaxis(out, -1, axis)
