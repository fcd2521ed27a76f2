"""Error metrics between an FP32 reference and its quantized counterpart.

Everything is accumulated as sums over all calibration samples and only turned into ratios at the
end: SQNR = 10·log10(Σref² / Σ(ref − q)²) over the whole set, the ONNX Runtime / torchao definition,
not a mean of per-batch ratios (which over-weights quiet batches). Because the sums are additive, a
sweep that splits samples into chunks to bound memory gives the same numbers as one that does not
(up to float32 rounding of each chunk's partial sum, ~1e-6 relative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# When the error is exactly zero SQNR is infinite; report a finite cap (ONNX Runtime reports ~100 dB)
# so tables sort and JSON stays valid.
SQNR_CAP_DB = 100.0


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


class ErrorAccumulator:
    """Running sums for `ErrorStats`; `update` once per batch (or chunk), `result` at the end.

    With `logits=True` the last dimension is read as logits over classes (vocabulary) and KL and
    top-1 agreement are accumulated too, one distribution per position of the other dimensions.
    """

    def __init__(self, logits: bool = False) -> None:
        self.logits = logits
        self.signal = 0.0
        self.noise = 0.0
        self.dot = 0.0
        self.quant_power = 0.0
        self.max_abs = 0.0
        self.count = 0
        self.kl_sum = 0.0
        self.agree = 0
        self.distributions = 0

    def update(self, reference: torch.Tensor, quantized: torch.Tensor) -> None:
        if reference.shape != quantized.shape:
            raise ValueError(f"cannot compare tensors of shapes {tuple(reference.shape)} and {tuple(quantized.shape)}")
        # Element-wise work stays in float32 (converting whole activations to float64 costs as much
        # as the convolutions that produced them); torch reduces with cascaded partial sums, and
        # each batch's partial sum is accumulated here in Python floats (float64).
        ref = reference.detach().reshape(-1).float()
        q = quantized.detach().reshape(-1).float()
        # Normalise by a power of two (exact) so squares neither overflow at 1e30 nor underflow at 1e-30;
        # the sums are scaled back in Python floats.
        peak = float(torch.maximum(ref.abs().max(), q.abs().max())) if ref.numel() else 0.0
        if not math.isfinite(peak):
            raise ValueError("the compared tensors contain NaN or Inf; the model produced non-finite values")
        unit = 2.0 ** math.floor(math.log2(peak)) if peak > 0 else 1.0
        ref, q = ref / unit, q / unit
        err = ref - q
        self.signal += float(torch.dot(ref, ref)) * unit * unit
        self.noise += float(torch.dot(err, err)) * unit * unit
        self.dot += float(torch.dot(ref, q)) * unit * unit
        self.quant_power += float(torch.dot(q, q)) * unit * unit
        if err.numel():
            self.max_abs = max(self.max_abs, float(err.abs().max()) * unit)
        self.count += ref.numel()
        if self.logits:
            ref_rows = reference.detach().reshape(-1, reference.shape[-1])
            q_rows = quantized.detach().reshape(-1, reference.shape[-1])
            # float64 for the KL of nearly equal distributions, in row blocks of ~1M values so a
            # language model's [tokens, vocabulary] logits never exist twice in float64.
            step = max(1, (1 << 20) // max(ref_rows.shape[1], 1))
            for start in range(0, ref_rows.shape[0], step):
                log_p = torch.log_softmax(ref_rows[start:start + step].double(), dim=-1)
                log_q = torch.log_softmax(q_rows[start:start + step].double(), dim=-1)
                self.kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
                self.agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
            self.distributions += ref_rows.shape[0]

    def result(self) -> ErrorStats:
        if self.count == 0:
            raise ValueError("no samples were compared; the data set is empty")
        denom = math.sqrt(self.signal * self.quant_power)
        if denom > 0:
            cosine = max(-1.0, min(1.0, self.dot / denom))  # float rounding can step past ±1
        else:  # both all-zero counts as identical; one all-zero as orthogonal
            cosine = 1.0 if self.signal == self.quant_power else 0.0
        kl = top1 = None
        if self.logits and self.distributions:
            kl = max(0.0, self.kl_sum / self.distributions)
            top1 = self.agree / self.distributions
        return ErrorStats(
            sqnr_db=sqnr_from_sums(self.signal, self.noise),
            mse=self.noise / self.count,
            cosine=cosine,
            max_abs_error=self.max_abs,
            count=self.count,
            kl=kl,
            top1_agreement=top1,
        )


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
