"""What a precision choice costs: average weight bits, bytes on disk, and bit operations (BOPs).

One definition, `Format.storage` (analysis.formats.ScaleStorage): what a format stores besides its
element codes, per scale group and per tensor. Integer and fp8 scales are fp16 (plus a one-byte zero
point when asymmetric), fp4_e2m1 has an FP32 scale, MX an 8-bit E8M0 scale per block, NVFP4 an
8-bit E4M3 scale per block plus an FP32 scale per tensor.

* `effective_bits(fmt)`: element bits plus the scale bits of a group or block spread over it (MXFP4
  4.25, NVFP4 4.5, MXFP8 8.25, int4-g128 4.125, int4-g32 4.5); per-channel and per-tensor scales
  depend on the tensor's shape and are left out here (int8 per-channel is 8). Average bits and BOPs
  use it, so an allocator menu can mix block formats with intN, fp8 and bf16 at their true price.
* `weight_bits_total(layer, fmt)`: the exact bits a deployment stores for the layer: codes, every
  scale and zero point (per channel, group or block, a last partial block included) and per-tensor
  scales, plus the bias, which stays FP32 in every toolchain we target.
* BOPs follow AIMET: MACs × weight bits × activation bits (effective bits; unquantized sides at 32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from analysis.formats import Format
from analysis.layers import Layer

FP32_BITS = 32


def weight_elements(layer: Layer) -> int:
    return math.prod(layer.weight_shape)


def effective_bits(fmt: Format | None) -> float:
    """Bits per element including the scale overhead of its group or block (FP32: 32)."""
    if fmt is None or fmt.is_identity:
        return float(FP32_BITS)
    if fmt.granularity == "per-group":
        return fmt.bits + fmt.storage.per_group / fmt.group_size
    return float(fmt.bits)


def bits_label(name: str, role: str = "weight") -> str:
    """A format name with its effective bits ("mxfp4 (4.25 bits)"), for reports and pickers."""
    from analysis.formats import parse_format

    return f"{name} ({effective_bits(parse_format(name, role)):g} bits)"


def scale_count(layer: Layer, fmt: Format) -> int:
    """How many scale groups (rows of `formats.to_rows`: channels, groups or blocks) the weight has
    in this format; 0 for formats that store no scale (fp16/bf16)."""
    if not fmt.storage.per_group:
        return 0
    if fmt.granularity == "per-tensor":
        return 1
    channels = layer.weight_shape[layer.channel_axis]
    if fmt.granularity == "per-channel":
        return channels
    per_channel = weight_elements(layer) // max(channels, 1)
    return channels * math.ceil(per_channel / (fmt.group_size or per_channel))


def weight_bits_total(layer: Layer, fmt: Format | None) -> int:
    """Bits to store the layer's weight (codes + scales + zero points + tensor scales) and its FP32 bias."""
    elements = weight_elements(layer)
    bias_bits = (layer.params - elements) * FP32_BITS
    if fmt is None or fmt.is_identity:
        return elements * FP32_BITS + bias_bits
    storage = fmt.storage
    return elements * fmt.bits + scale_count(layer, fmt) * storage.per_group + storage.per_tensor + bias_bits


def weight_bytes(layer: Layer, fmt: Format | None) -> float:
    return weight_bits_total(layer, fmt) / 8


def bops(layer: Layer, weight_fmt: Format | None, act_fmt: Format | None) -> float:
    """Bit operations per sample: MACs × weight bits × activation bits (effective bits)."""
    return layer.macs * effective_bits(weight_fmt) * effective_bits(act_fmt)


@dataclass(frozen=True)
class ModelCost:
    avg_weight_bits: float  # parameter-weighted average of the weight format's effective bits
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
        bits += weight_elements(layer) * effective_bits(wf)
        size += weight_bytes(layer, wf)
        ops += bops(layer, wf, af)
    return ModelCost(bits / total_elements, size, ops)
