"""Error metrics between an FP32 reference and its quantized counterpart.

Everything is accumulated as sums over all calibration samples and only turned into ratios at the
end: SQNR = 10·log10(Σref² / Σ(ref − q)²) over the whole set, the ONNX Runtime / torchao definition,
not a mean of per-batch ratios (which over-weights quiet batches). KL is computed per row
(distribution) in float64 and averaged over all rows. Because the sums are additive, a sweep that
splits samples into chunks to bound memory gives the same numbers as one that does not (up to
float32 rounding of each chunk's partial sum, ~1e-6 relative).

The running sums are float64 tensors on the data's device (the CPU for MPS, which has no float64)
and are read back to Python numbers only by `result()` and `state()`: an update queues kernels and
never waits for them, so a GPU sweep does not synchronise with the host per batch. For the same
reason the NaN/Inf check is recorded on the device and raised by `result()`.

Accumulators are shardable: `state()` is a dict of plain numbers (JSON-ready, exact through
`json`), `from_state` rebuilds the accumulator, and `merge` adds another one in. Accumulating batches
A then B in one accumulator equals accumulating them in two and merging: exactly for counts and the
maximum error, and to float64 summation order for the sums (relative 1e-12 for any realistic number
of shards; exact for two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# When the error is exactly zero SQNR is infinite; report a finite cap (ONNX Runtime reports ~100 dB)
# so tables sort and JSON stays valid.
SQNR_CAP_DB = 100.0
NONFINITE = "the compared tensors contain NaN or Inf; the model produced non-finite values"


def sqnr_db(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB over all elements."""
    acc = ErrorAccumulator()
    acc.update(reference, quantized)
    return acc.result().sqnr_db


def sqnr_from_sums(signal_power: float, noise_power: float) -> float:
    if noise_power <= 0.0:
        return SQNR_CAP_DB
    if signal_power <= 0.0:
        return -SQNR_CAP_DB
    return min(SQNR_CAP_DB, max(-SQNR_CAP_DB, 10.0 * math.log10(signal_power / noise_power)))


@dataclass(frozen=True)
class ErrorStats:
    """Tensor-level error of one comparison. Ratios are over all samples at once."""

    sqnr_db: float
    mse: float
    cosine: float
    max_abs_error: float
    count: int
    kl: float | None = None  # mean KL(P_fp32 ‖ P_quant) in nats over samples (tokens for LMs)
    top1_agreement: float | None = None  # fraction of samples (tokens) with the same argmax

    def as_dict(self, prefix: str = "") -> dict[str, float | None]:
        return {
            f"{prefix}sqnr_db": self.sqnr_db,
            f"{prefix}mse": self.mse,
            f"{prefix}cosine": self.cosine,
            f"{prefix}max_abs_error": self.max_abs_error,
            f"{prefix}kl": self.kl,
            f"{prefix}top1_agreement": self.top1_agreement,
        }


def _max_abs(t: torch.Tensor) -> torch.Tensor:
    """max |t| of a non-empty tensor (NaN when t holds one), from one aminmax pass."""
    low, high = torch.aminmax(t)
    return torch.maximum(high, -low)


def float64_home(device: torch.device) -> torch.device:
    """Where float64 sums for data on `device` live: the same device, except MPS (no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


_SUMS = ("signal", "noise", "dot", "quant_power")
# |values| in [2^-20, 2^20]: squares summed over up to 2^60 elements stay inside float32's range
# (and well above its smallest normal), so no normalisation is needed there.
_SAFE_LOW, _SAFE_HIGH = 2.0**-20, 2.0**20
_STATE_KEYS = ("logits", "count", "distributions", *_SUMS, "max_abs", "kl_sum", "agree", "nonfinite")


class ErrorAccumulator:
    """Running sums for `ErrorStats`; `update` once per batch (or chunk), `result` at the end.

    With `logits=True` the last dimension is read as logits over classes (vocabulary) and KL and
    top-1 agreement are accumulated too, one distribution per position of the other dimensions.
    """

    def __init__(self, logits: bool = False) -> None:
        self.logits = logits
        self.count = 0  # element and row counts are known on the host without reading the device
        self.distributions = 0
        # Device tensors, created by the first update on its data's device (see `float64_home`).
        self._sums: torch.Tensor | None = None  # float64 [Σref², Σ(ref − q)², Σref·q, Σq²]
        self._max_abs: torch.Tensor | None = None  # float64 scalar
        self._kl_sum: torch.Tensor | None = None  # float64 scalar
        self._agree: torch.Tensor | None = None  # int64 scalar
        self._nonfinite: torch.Tensor | None = None  # bool scalar: some update saw NaN or Inf

    def update(self, reference: torch.Tensor, quantized: torch.Tensor, mask: torch.Tensor | None = None,
               histogram: "ErrorHistogram | None" = None) -> None:
        """`mask`: booleans over the leading dimensions of the outputs (e.g. [N, T] token positions of
        [N, T, V] logits); only the positions it marks are compared (padding is not).

        `histogram`: also count the errors (quantized − reference) of the compared positions there,
        from the error tensor this update computes anyway (on wide layers the comparison is memory-
        bound: one error tensor instead of two, and no second pass for its peak)."""
        if reference.shape != quantized.shape:
            raise ValueError(f"cannot compare tensors of shapes {tuple(reference.shape)} and {tuple(quantized.shape)}")
        if mask is not None:
            if tuple(mask.shape) != tuple(reference.shape[:mask.dim()]):
                raise ValueError(f"a mask of shape {tuple(mask.shape)} does not cover outputs of shape "
                                 f"{tuple(reference.shape)}")
            mask = mask.to(reference.device)
            reference, quantized = reference[mask], quantized[mask]
        if reference.numel() == 0:
            return
        home = float64_home(reference.device)
        self._place(home)
        # Element-wise work stays in float32 (converting whole activations to float64 costs as much
        # as the convolutions that produced them); torch reduces with cascaded partial sums, and
        # each batch's partial sum is accumulated here in float64. Every step below is a tensor
        # operation: nothing waits for the device.
        ref = reference.detach().reshape(-1).float()
        q = quantized.detach().reshape(-1).float()
        # Normalise by a power of two (exact) so squares neither overflow at 1e30 nor underflow at
        # 1e-30: unit = 2^floor(log2(peak)), which is 2^(e − 1) for peak = m·2^e with m in [0.5, 1).
        # vector_norm(inf) is max |x| without a temporary |x| tensor.
        # max |x| from aminmax: one pass, ~5× faster on CPU than vector_norm(x, inf). |q| ≤ |ref| + |q − ref|,
        # and the peak only chooses a power-of-two unit, so that bound serves as q's peak.
        err = q - ref
        ref_peak, err_peak = _max_abs(ref), _max_abs(err)
        peak = ref_peak + err_peak
        finite = torch.isfinite(peak)
        _, exponent = torch.frexp(peak)
        one = torch.ones_like(peak)
        unit = torch.where(finite & (peak > 0), torch.ldexp(one, exponent - 1), one)
        if ref.device.type == "cpu":
            # On the CPU reading the peak costs nothing; in the usual range squares are safe in
            # float32 and dividing two full tensors by the unit (the costliest step) can go.
            if bool(finite) and _SAFE_LOW < float(peak) < _SAFE_HIGH:
                unit = one
            else:
                ref, q, err = ref / unit, q / unit, err / unit
        else:  # on an accelerator nothing waits for the device: always normalise
            ref, q, err = ref / unit, q / unit, err / unit
        unit64 = unit.to(home).double()
        dots = torch.stack([torch.dot(ref, ref), torch.dot(err, err), torch.dot(ref, q), torch.dot(q, q)])
        # Out-of-place updates: the sweep updates under inference_mode and outside it, and an
        # in-place write to a tensor created in the other mode is an error.
        self._sums = self._sums + dots.to(home).double() * (unit64 * unit64)
        self._max_abs = torch.maximum(self._max_abs, err_peak.to(home).double())
        if histogram is not None:
            if unit is one:  # err holds the true errors and is ours: binned in place
                histogram.update(err, peak=err_peak, scratch=True)
            else:  # normalised (extreme ranges, accelerators): bin the true errors
                histogram.update(quantized.detach().float() - reference.detach().float())
        self._nonfinite = self._nonfinite | ~finite.to(home)
        self.count += ref.numel()
        if self.logits:
            ref_rows = reference.detach().reshape(-1, reference.shape[-1])
            q_rows = quantized.detach().reshape(-1, reference.shape[-1])
            # float64 for the KL of nearly equal distributions, in row blocks of ~1M values so a
            # language model's [tokens, vocabulary] logits never exist twice in float64.
            step = max(1, (1 << 20) // max(ref_rows.shape[1], 1))
            for start in range(0, ref_rows.shape[0], step):
                log_p = torch.log_softmax(ref_rows[start:start + step].to(home).double(), dim=-1)
                log_q = torch.log_softmax(q_rows[start:start + step].to(home).double(), dim=-1)
                self._kl_sum = self._kl_sum + (log_p.exp() * (log_p - log_q)).sum()
                self._agree = self._agree + (log_p.argmax(-1) == log_q.argmax(-1)).sum()
            self.distributions += ref_rows.shape[0]

    def _place(self, home: torch.device) -> None:
        """Create the sums on `home`, or move them there once (an accumulator follows its data)."""
        if self._sums is None:
            self._sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=home)
            self._max_abs = torch.zeros((), dtype=torch.float64, device=home)
            self._kl_sum = torch.zeros((), dtype=torch.float64, device=home)
            self._agree = torch.zeros((), dtype=torch.int64, device=home)
            self._nonfinite = torch.zeros((), dtype=torch.bool, device=home)
        elif self._sums.device != home:
            self._sums, self._max_abs, self._kl_sum, self._agree, self._nonfinite = (
                t.to(home) for t in (self._sums, self._max_abs, self._kl_sum, self._agree, self._nonfinite))

    def _numbers(self) -> dict[str, Any]:
        """The device sums as Python numbers, read back in one transfer."""
        if self._sums is None:
            return {**{name: 0.0 for name in _SUMS}, "max_abs": 0.0, "kl_sum": 0.0, "agree": 0, "nonfinite": False}
        # agree and the flag travel as float64: exact for counts below 2^53
        values = torch.cat([self._sums, self._max_abs.reshape(1), self._kl_sum.reshape(1),
                            self._agree.double().reshape(1), self._nonfinite.double().reshape(1)]).tolist()
        numbers: dict[str, Any] = dict(zip(_SUMS, values[:4]))
        numbers.update(max_abs=values[4], kl_sum=values[5], agree=int(values[6]), nonfinite=bool(values[7]))
        return numbers

    def result(self) -> ErrorStats:
        if self.count == 0:
            raise ValueError("no samples were compared; the data set is empty")
        n = self._numbers()
        if n["nonfinite"]:
            raise ValueError(NONFINITE)
        signal, quant_power = n["signal"], n["quant_power"]
        denom = math.sqrt(signal * quant_power)
        if denom > 0:
            cosine = max(-1.0, min(1.0, n["dot"] / denom))  # float rounding can step past ±1
        else:  # both all-zero counts as identical; one all-zero as orthogonal
            cosine = 1.0 if signal == quant_power else 0.0
        kl = top1 = None
        if self.logits and self.distributions:
            kl = max(0.0, n["kl_sum"] / self.distributions)
            top1 = n["agree"] / self.distributions
        return ErrorStats(
            sqnr_db=sqnr_from_sums(signal, n["noise"]),
            mse=n["noise"] / self.count,
            cosine=cosine,
            max_abs_error=n["max_abs"],
            count=self.count,
            kl=kl,
            top1_agreement=top1,
        )

    # --- shards ----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Plain numbers (JSON-ready) from which `from_state` rebuilds this accumulator exactly."""
        numbers = self._numbers()
        if numbers["nonfinite"]:
            # The sums of a comparison that saw NaN/Inf are meaningless (result() refuses them);
            # zeros keep the state strict JSON, and the flag survives.
            numbers.update({name: 0.0 for name in (*_SUMS, "max_abs", "kl_sum")}, agree=0)
        return {"logits": self.logits, "count": self.count, "distributions": self.distributions, **numbers}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ErrorAccumulator":
        """The accumulator `state()` described; its sums live on the CPU until an update moves them."""
        if not isinstance(state, dict) or set(state) != set(_STATE_KEYS):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not an ErrorAccumulator state (keys {keys}); expected the keys "
                             f"{', '.join(_STATE_KEYS)} as written by ErrorAccumulator.state()")
        for key in ("logits", "nonfinite"):
            if not isinstance(state[key], bool):
                raise ValueError(f"ErrorAccumulator state: {key} must be true or false, not {state[key]!r}")
        for key in ("count", "distributions", "agree"):
            if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
                raise ValueError(f"ErrorAccumulator state: {key} must be a non-negative integer, not {state[key]!r}")
        for key in (*_SUMS, "max_abs", "kl_sum"):
            if isinstance(state[key], bool) or not isinstance(state[key], (int, float)):
                raise ValueError(f"ErrorAccumulator state: {key} must be a number, not {state[key]!r}")
        acc = cls(logits=state["logits"])
        acc.count, acc.distributions = state["count"], state["distributions"]
        if acc.count or state["nonfinite"]:
            acc._sums = torch.tensor([float(state[name]) for name in _SUMS], dtype=torch.float64)
            acc._max_abs = torch.tensor(float(state["max_abs"]), dtype=torch.float64)
            acc._kl_sum = torch.tensor(float(state["kl_sum"]), dtype=torch.float64)
            acc._agree = torch.tensor(state["agree"], dtype=torch.int64)
            acc._nonfinite = torch.tensor(state["nonfinite"])
        return acc

    def merge(self, other: "ErrorAccumulator") -> None:
        """Add `other`'s samples into this accumulator (in place; `other` is left as it was)."""
        if not isinstance(other, ErrorAccumulator):
            raise TypeError(f"can only merge an ErrorAccumulator, not {type(other).__name__}")
        if other.logits != self.logits:
            raise ValueError(f"cannot merge an accumulator with logits={other.logits} into one with "
                             f"logits={self.logits}; shards of one comparison must use the same setting")
        if other._sums is not None:
            home = self._sums.device if self._sums is not None else other._sums.device
            self._place(home)
            self._sums = self._sums + other._sums.to(home)
            self._max_abs = torch.maximum(self._max_abs, other._max_abs.to(home))
            self._kl_sum = self._kl_sum + other._kl_sum.to(home)
            self._agree = self._agree + other._agree.to(home)
            self._nonfinite = self._nonfinite | other._nonfinite.to(home)
        self.count += other.count
        self.distributions += other.distributions


class UpdateLog:
    """Stands in for an `ErrorAccumulator` on one part of the data: keeps each update as its own
    accumulator, so that `replay` into an accumulator holding the earlier parts performs the same
    float64 additions, in the same order, as one accumulator updated with everything would. The sums
    then agree bit for bit (a merged accumulator adds a part's total at once, which differs in the last
    bits when the part had several updates). Exact for every sum except KL over several row blocks in
    one update (a language model's logits), which an update itself sums first."""

    def __init__(self, logits: bool = False) -> None:
        self.logits = logits
        self.parts: list[ErrorAccumulator] = []

    def update(self, reference: torch.Tensor, quantized: torch.Tensor, mask: torch.Tensor | None = None,
               histogram: "ErrorHistogram | None" = None) -> None:
        part = ErrorAccumulator(self.logits)
        part.update(reference, quantized, mask, histogram=histogram)
        self.parts.append(part)

    def replay(self, into: ErrorAccumulator) -> None:
        """Apply the logged updates to `into`, in the order they came."""
        for part in self.parts:
            into.merge(part)


class ErrorHistogram:
    """Counts of an error tensor (quantized − reference) in `bins` equal bins over [−bound, bound].

    The first update fixes the bound (1.25 × its largest |value|: headroom for later chunks and
    tied sites; reading it is the only device read, once per histogram); later values outside it are
    clipped into the end bins. Counts stay a float64 tensor on the data's device until `result()`.

    Merging needs equal edges: counts cannot be re-binned exactly, and the bound depends on which
    chunk came first. Shards of one trial's data therefore start from the first shard's edges:
    `ErrorHistogram(bins, bound=first.bound)`.
    """

    def __init__(self, bins: int = 64, bound: float | None = None) -> None:
        if bins < 1:
            raise ValueError(f"an error histogram needs at least one bin, not {bins}")
        if bound is not None and not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"an error histogram bound must be a positive finite number, not {bound!r}")
        self.bins = bins
        self.bound = bound
        self._counts: torch.Tensor | None = None

    def update(self, error: torch.Tensor, *, peak: torch.Tensor | None = None, scratch: bool = False) -> None:
        """`peak`: max |error| when the caller has it already; `scratch`: the caller gives `error` up,
        so it is binned in place (no temporary the size of the layer's output)."""
        values = error.detach().reshape(-1).float()
        if self.bound is None:
            if peak is None:
                peak = _max_abs(values) if values.numel() else torch.zeros(())
            peak = float(peak)
            if not math.isfinite(peak):
                raise ValueError(NONFINITE)
            self.bound = peak * 1.25 if peak > 0 else 1e-12
        home = float64_home(values.device)
        if self._counts is None:
            self._counts = torch.zeros(self.bins, dtype=torch.float64, device=home)
        # Bin index floor((v − lo) · bins / (hi − lo)), out-of-range values clipped into the end bins
        # (as clamping before torch.histc would). Clamped to [0, bins − 1] first, truncation to an
        # integer is the floor; int32 indices and binning the caller's scratch tensor in place make
        # this ~20 % cheaper than int64 indices in a temporary, and bincount beats histc on CPU.
        own = scratch and values.data_ptr() == error.data_ptr()
        shifted = values.sub_(-self.bound) if own else values + self.bound
        index = shifted.mul_(self.bins / (2 * self.bound)).clamp_(0, self.bins - 1)
        index = index.to(torch.int32).clamp_(0, self.bins - 1)  # NaN (flagged by ErrorAccumulator) lands in a bin, not an error
        counts = torch.bincount(index, minlength=self.bins)
        self._counts = self._counts.to(home) + counts.to(home).double()

    @property
    def edges(self) -> tuple[float, ...] | None:
        if self.bound is None:
            return None
        return tuple(np.linspace(-self.bound, self.bound, self.bins + 1).tolist())

    def result(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(edges, counts) with len(edges) == len(counts) + 1, or None before the first update."""
        if self.bound is None:
            return None
        counts = self._counts.tolist() if self._counts is not None else [0.0] * self.bins
        return self.edges, tuple(counts)  # type: ignore[return-value]

    def state(self) -> dict[str, Any]:
        """Plain numbers (JSON-ready): bins, bound (None before the first update) and counts."""
        counts = self._counts.tolist() if self._counts is not None else [0.0] * self.bins
        return {"bins": self.bins, "bound": self.bound, "counts": counts}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ErrorHistogram":
        if not isinstance(state, dict) or set(state) != {"bins", "bound", "counts"}:
            raise ValueError("not an ErrorHistogram state; expected the keys bins, bound, counts "
                             "as written by ErrorHistogram.state()")
        if isinstance(state["bins"], bool) or not isinstance(state["bins"], int) or len(state["counts"]) != state["bins"]:
            raise ValueError(f"ErrorHistogram state: {len(state['counts'])} counts for {state['bins']!r} bins; "
                             "bins must be an integer equal to the number of counts")
        histogram = cls(state["bins"], state["bound"])
        histogram._counts = torch.tensor([float(c) for c in state["counts"]], dtype=torch.float64)
        return histogram

    def merge(self, other: "ErrorHistogram") -> None:
        """Add `other`'s counts (in place). Both must have the same edges, or one must be empty."""
        if not isinstance(other, ErrorHistogram):
            raise TypeError(f"can only merge an ErrorHistogram, not {type(other).__name__}")
        if other.bound is None:
            return
        if self.bound is None:  # nothing counted here yet: take the other's edges and counts
            self.bins, self.bound = other.bins, other.bound
            self._counts = None if other._counts is None else other._counts.clone()
            return
        if (self.bins, self.bound) != (other.bins, other.bound):
            raise ValueError(f"cannot merge error histograms with different edges ({self.bins} bins over "
                             f"±{self.bound!r} vs {other.bins} over ±{other.bound!r}); start every data shard "
                             "of a trial with the first shard's bound: ErrorHistogram(bins, bound=...)")
        if other._counts is None:
            return
        if self._counts is None:
            self._counts = other._counts.clone()
        else:
            self._counts = self._counts + other._counts.to(self._counts.device)


def compare(reference: torch.Tensor, quantized: torch.Tensor, logits: bool = False) -> ErrorStats:
    """One-shot comparison of two tensors."""
    acc = ErrorAccumulator(logits=logits)
    acc.update(reference, quantized)
    return acc.result()


# Conversions so users can line our numbers up with other tools' (see README, "Metrics").
def sqnr_db_to_linear(db: float) -> float:
    """Linear power ratio (Sony MCT, Google AI Edge Quantizer)."""
    return 10.0 ** (db / 10.0)


def sqnr_db_to_normalized_l2(db: float) -> float:
    """‖x − x̂‖ / ‖x‖ (PyTorch numeric suite's normalized L2 error)."""
    return 10.0 ** (-db / 20.0)


# --- task metrics ------------------------------------------------------------------------------


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy; logits [N, C] (or [..., C]) against integer labels of the leading shape."""
    predictions = logits.argmax(dim=-1)
    if predictions.shape != labels.shape:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match predictions of shape {tuple(predictions.shape)}"
        )
    return float((predictions == labels).float().mean())


def perplexity(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """exp(mean token cross-entropy); logits [N, T, V], labels [N, T]."""
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1).long()
    )
    return float(torch.exp(loss))
