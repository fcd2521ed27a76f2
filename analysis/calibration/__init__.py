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

Modules: `weights` (`weight_range`), `histogram` (`Histogram`, `histogram_range`), `kl` (the
entropy method's threshold search, shared by both), `common` (method names, argument checks).
"""

from __future__ import annotations

from .common import CALIBRATION_METHODS, QuantizeFn
from .histogram import Histogram, histogram_range
from .weights import weight_range

__all__ = ["CALIBRATION_METHODS", "Histogram", "QuantizeFn", "histogram_range", "weight_range"]
