"""What every calibration method shares: the method names, the quantizer's signature, the MSE
search grid and the argument checks."""

from __future__ import annotations

import numbers
from typing import Callable

import numpy as np
import torch

from analysis.finite import all_finite

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
    if not all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{what} contains NaN or Inf ({bad} of {x.numel()} values); "
            "check the model's weights/activations"
        )


def _mse_fine_alphas() -> np.ndarray:
    n = int(round((1.0 - _MSE_ALPHA_MIN) / _MSE_FINE_STEP)) + 1
    return np.round(np.linspace(_MSE_ALPHA_MIN, 1.0, n), 10)
