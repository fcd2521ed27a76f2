"""What a precision choice costs: average weight bits, bytes on disk, and bit operations (BOPs).

Bytes count what a deployment actually stores: the integer codes *and* their scales (fp16) and zero
points (one byte, asymmetric formats), since per-channel and per-group scales add up at small groups.
Biases stay FP32 in every toolchain we target and are counted at 4 bytes each.
BOPs follow AIMET: MACs × weight bits × activation bits, with unquantized activations at 32 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from analysis.formats import Format
from analysis.layers import Layer

SCALE_BITS = 16
ZERO_POINT_BITS = 8
FP32_BITS = 32


def weight_elements(layer: Layer) -> int:
    return math.prod(layer.weight_shape)


def scale_count(layer: Layer, fmt: Format) -> int:
    """How many (scale, zero point) pairs the weight needs in this format."""
    if not fmt.scaled:
        return 0
    if fmt.granularity == "per-tensor":
        return 1
    channels = layer.weight_shape[layer.channel_axis]
    if fmt.granularity == "per-channel":
        return channels
    per_channel = weight_elements(layer) // max(channels, 1)
    return channels * math.ceil(per_channel / (fmt.group_size or per_channel))


def weight_bits_total(layer: Layer, fmt: Format | None) -> int:
    """Bits to store the layer's weight (codes + scales + zero points) and its FP32 bias."""
    elements = weight_elements(layer)
    bias_bits = (layer.params - elements) * FP32_BITS
    if fmt is None or fmt.is_identity:
        return elements * FP32_BITS + bias_bits
    scales = scale_count(layer, fmt)
    zero_points = scales if (fmt.kind == "int" and not fmt.symmetric) else 0
    return elements * fmt.bits + scales * SCALE_BITS + zero_points * ZERO_POINT_BITS + bias_bits


def weight_bytes(layer: Layer, fmt: Format | None) -> float:
    return weight_bits_total(layer, fmt) / 8


def bops(layer: Layer, weight_fmt: Format | None, act_fmt: Format | None) -> int:
    """Bit operations per sample: MACs × weight bits × activation bits."""
    w_bits = weight_fmt.bits if weight_fmt is not None else FP32_BITS
    a_bits = act_fmt.bits if act_fmt is not None else FP32_BITS
    return layer.macs * w_bits * a_bits


@dataclass(frozen=True)
class ModelCost:
    avg_weight_bits: float  # parameter-weighted average of the weight format's bits (no scales)
    weight_bytes: float  # codes + scales + zero points + FP32 biases of all analysed layers
    bops: float  # per sample

    def as_dict(self) -> dict[str, float]:
        return {"avg_weight_bits": self.avg_weight_bits, "weight_bytes": self.weight_bytes, "bops": self.bops}


def model_cost(layers: list[Layer], assignment: dict[str, tuple[Format | None, Format | None]]) -> ModelCost:
    """Cost of all `layers` under `assignment` (layer -> (weight format, activation format));
    a layer missing from the assignment stays FP32."""
    total_elements = sum(weight_elements(layer) for layer in layers) or 1
    bits = size = ops = 0.0
    for layer in layers:
        wf, af = assignment.get(layer.name, (None, None))
        bits += weight_elements(layer) * (wf.bits if wf is not None else FP32_BITS)
        size += weight_bytes(layer, wf)
        ops += bops(layer, wf, af)
    return ModelCost(bits / total_elements, size, ops)
