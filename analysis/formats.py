"""Number formats and fake quantization (quantize, then dequantize back to float32).

A `Format` is what a user names on the command line or in a precision map ("int4", "int8-asym",
"int4-g32", "fp8_e4m3", "fp4_e2m1", "mxfp4", "nvfp4", "fp32"). What a bare name means depends on
the role it plays, because deployment toolchains quantize weights and activations differently:
weights default to symmetric per-output-channel, activations to asymmetric per-tensor.
`parse_format` applies those defaults and `Format.name_for(role)` writes the shortest name that
parses back to the same format.

Integer grid (stated, because at 4 bits the common conventions differ by up to ~3 dB):
PyTorch / torchao convention, q in [-2^(b-1), 2^(b-1)-1] with scale = absmax / ((2^b - 1) / 2) for
symmetric formats; q in [0, 2^b - 1] with an integer zero point for asymmetric ones. Matching
torchao keeps the simulated path and the real int8/int4 kernels in agreement.

Small floats (`ElementType`: FP4 E2M1, FP6 E2M3/E3M2, FP8 E4M3/E5M2) round to nearest, ties to
even, keep subnormals and saturate at the largest normal. `fp4_e2m1` is FP4 with one FP32 scale per
channel (weights) or tensor (activations), calibrated like fp8: scale = clipping range / 6 (absmax / 6
with min/max calibration). Block formats scale each block of consecutive elements along the
reduction dimension from the block itself, so they need no calibrated range (`Format.scaled` is
False for them) and quantize activations at run time (`Format.block_scaled`, `block_quantize`):

* OCP MX v1.0 (`mxfp8_e4m3`, `mxfp8_e5m2`, `mxfp6_e2m3`, `mxfp6_e3m2`, `mxfp4`, `mxint8`): blocks of
  32 (`-b<size>` overrides) share an E8M0 scale 2^s, s = floor(log2(block absmax)) − emax of the
  element type, clamped to [−127, 127]; elements = element_type(v / 2^s). MXINT8 elements are
  int8 codes with an implicit 2^−6 scale, clamped to ±127.
* NVFP4 (`nvfp4`): FP4 E2M1 elements in blocks of 16; a per-tensor FP32 scale g = tensor absmax /
  (6·448) and per block an FP8 E4M3 scale s = E4M3(block absmax / 6 / g); elements = E2M1(v / (s·g)).
  A block whose E4M3 scale underflows to zero decodes to zero. For weights the tensor is the whole
  weight; activations take g per token (per row along the reduction dimension), so a result never
  depends on how samples are batched.

A weight's blocks are the rows of `to_rows` (consecutive elements of one output channel along in·kh·kw);
a last partial block is zero-padded, which leaves its absmax, and so its own scale, unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from analysis.finite import all_finite

ROLES = ("weight", "activation")
GRANULARITIES = ("per-tensor", "per-channel", "per-group")

_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
_FLOAT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8_e4m3": 8, "fp8_e5m2": 8}
# fp8 needs a scale (its range is tiny); fp16/bf16 are plain casts, as on real hardware.
_SCALED_FLOATS = ("fp8_e4m3", "fp8_e5m2")
INT_BITS = tuple(range(2, 9)) + (16,)

_INT_RE = re.compile(r"^(u?)int(\d+)((?:-[a-z0-9]+)*)$")
_GRANULARITY_SUFFIX = {"pt": "per-tensor", "pc": "per-channel"}


class FormatError(ValueError):
    """A format name or option that quantlens does not understand."""


# --- element types -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ElementType:
    """A sign-magnitude element type: `exponent_bits`/`mantissa_bits`/`bias` as in IEEE (subnormals
    below exponent 1 − bias), saturating at `max_normal`. exponent_bits = 0 is fixed point: codes ×
    2^−mantissa_bits (MXINT8's int8 with an implicit 2^−6). `dtype`: a torch dtype that rounds the
    same way once clamped (faster than the generic rounding)."""

    name: str
    bits: int
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_normal: float
    dtype: torch.dtype | None = None

    @property
    def emax(self) -> int:
        """floor(log2(max_normal)): the exponent of the largest normal (OCP MX's emax_elem)."""
        return math.frexp(self.max_normal)[1] - 1


ELEMENT_TYPES: dict[str, ElementType] = {e.name: e for e in (
    ElementType("fp4_e2m1", 4, 2, 1, 1, 6.0),
    ElementType("fp6_e2m3", 6, 2, 3, 1, 7.5),
    ElementType("fp6_e3m2", 6, 3, 2, 3, 28.0),
    ElementType("fp8_e4m3", 8, 4, 3, 7, 448.0, torch.float8_e4m3fn),
    ElementType("fp8_e5m2", 8, 5, 2, 15, 57344.0, torch.float8_e5m2),
    ElementType("int8", 8, 0, 6, 1, 127 / 64),
)}


def round_to_element(x: torch.Tensor, element: ElementType) -> torch.Tensor:
    """x rounded to the nearest value of `element` (ties to even), saturating at ±max_normal."""
    if element.dtype is not None:
        # Casting past the fp8 range gives NaN for e4m3fn: clamp first (saturating cast).
        return x.clamp(-element.max_normal, element.max_normal).to(element.dtype).to(x.dtype)
    magnitude = x.abs().float().contiguous()
    # Values in [2^e, 2^(e+1)) have steps of 2^(e - mantissa bits); below the smallest normal
    # exponent (1 - bias) the step stays that of the subnormals. 2^e is the value with its mantissa
    # bits cleared (exact and cheaper than frexp/ldexp; the input is finite, and float32 subnormals
    # clear to 0, below every element type's subnormal step).
    smallest = 2.0 ** (1 - element.bias)
    if element.exponent_bits == 0:  # fixed point: one step everywhere
        step: torch.Tensor | float = smallest * 2.0 ** -element.mantissa_bits
    else:
        step = (magnitude.view(torch.int32) & 0x7F800000).view(torch.float32)
        step = step.clamp_(min=smallest).mul_(2.0 ** -element.mantissa_bits)
    rounded = magnitude.div_(step).round_().mul_(step).clamp_(max=element.max_normal)
    return torch.copysign(rounded, x.float()).to(x.dtype)


@dataclass(frozen=True)
class ScaleStorage:
    """The bits a format stores besides its element codes: per scale group (one row of `to_rows`:
    its scale, plus a zero point when asymmetric) and once per tensor. Costs read only this."""

    per_group: int = 0
    per_tensor: int = 0


FP16_SCALE_BITS = 16  # integer and fp8 scales are counted as fp16, as deployment files store them
ZERO_POINT_BITS = 8


@dataclass(frozen=True)
class Format:
    """One number format with everything needed to quantize a tensor to it.

    kind is "int" (uniform integer grid), "float" (a cast, scaled for fp8), "fp4" (FP4 E2M1 with a
    calibrated scale), "mx" / "nvfp4" (block formats: `group_size` is the block size) or "fp32"
    (identity: the layer stays in full precision, which a mixed-precision map may choose).
    """

    kind: str
    bits: int
    base: str  # "int4", "fp8_e4m3", "fp32", ...
    symmetric: bool = True
    granularity: str = "per-tensor"
    group_size: int | None = None

    @property
    def is_identity(self) -> bool:
        return self.kind == "fp32"

    @property
    def scaled(self) -> bool:
        """Whether the format's scale comes from a calibrated range (int, fp8, fp4_e2m1). Block formats
        take their scales from each block of the tensor itself, fp16/bf16 have none: no range search."""
        return self.kind in ("int", "fp4") or self.base in _SCALED_FLOATS

    @property
    def block_scaled(self) -> bool:
        """Whether scales come from each block of the tensor at run time (MX, NVFP4): activations in
        such formats are quantized per block along the reduction dimension, never calibrated."""
        return family_of(self).quantize_blocks is not None

    @property
    def storage(self) -> "ScaleStorage":
        """The bits this format stores besides its element codes (see `ScaleStorage`)."""
        return family_of(self).storage(self)

    def name_for(self, role: str) -> str:
        """Shortest name that `parse_format(name, role)` maps back to this format."""
        if self.block_scaled:
            return self.qualified_name(role)
        if self.kind not in ("int", "fp4") and not (self.base in _SCALED_FLOATS and role == "weight"):
            return self.base
        default_sym, default_gran = _role_defaults(role)
        name = self.base
        if self.kind == "int" and self.symmetric != default_sym:
            name += "-sym" if self.symmetric else "-asym"
        if self.granularity == "per-group":
            name += f"-g{self.group_size}"
        elif self.granularity != default_gran:
            name += "-pc" if self.granularity == "per-channel" else "-pt"
        return name

    def qualified_name(self, role: str) -> str:
        """The fully qualified name (symmetry, granularity, group size all spelled out), which
        parses to this format in either role and whatever the defaults: what maps store."""
        if self.kind == "int":
            sym = "sym" if self.symmetric else "asym"
            gran = f"g{self.group_size}" if self.granularity == "per-group" else (
                "pc" if self.granularity == "per-channel" else "pt")
            return f"{self.base}-{sym}-{gran}"
        if self.block_scaled:
            default = FAMILIES[self.kind].block_sizes[0]
            return self.base if self.group_size == default else f"{self.base}-b{self.group_size}"
        if self.scaled:
            return f"{self.base}-{'pc' if self.granularity == 'per-channel' else 'pt'}"
        return self.base

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def _role_defaults(role: str) -> tuple[bool, str]:
    if role == "weight":
        return True, "per-channel"
    if role == "activation":
        return False, "per-tensor"
    raise FormatError(f"unknown role {role!r}; use 'weight' or 'activation'")


# --- the format registry --------------------------------------------------------------------------
#
# A family of formats (integers, floats, block formats ...) is one registered `FormatFamily`: how its
# names parse, how it fake-quantizes, and the (scale, zero point) exporters write. Adding a family is
# one `register_family(...)` call; parsing, the sweep, maps, the CLI's help and the dashboard's
# pickers all read the registry.


@dataclass(frozen=True)
class FormatFamily:
    """`quantize(x, fmt, lo, hi)` fake-quantizes rows of x with per-row ranges (block families: the
    rows are blocks and only max(−lo, hi) is read). Block families also give `quantize_blocks(blocks,
    absmax, fmt)` on [..., n_blocks, block] with absmax [..., n_blocks, 1] (tensor-level scales are
    taken over the last two dimensions) and `block_sizes` (the default first)."""

    kind: str  # the Format.kind its formats carry
    parse: Callable[[str, str, str | None, str], "Format | None"]  # (name, role, granularity, text) -> None if not ours
    quantize: Callable[[torch.Tensor, "Format", torch.Tensor, torch.Tensor], torch.Tensor]
    scale_and_zero_point: Callable[["Format", torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    syntax: str  # one phrase for error messages and help
    examples: dict[str, tuple[str, ...]]  # role -> names offered in pickers, most useful first
    storage: Callable[["Format"], ScaleStorage] = lambda fmt: ScaleStorage()
    quantize_blocks: Callable[[torch.Tensor, torch.Tensor, "Format"], torch.Tensor] | None = None
    block_sizes: tuple[int, ...] = ()


FAMILIES: dict[str, FormatFamily] = {}


def register_family(family: FormatFamily) -> FormatFamily:
    FAMILIES[family.kind] = family
    return family


def family_of(fmt: "Format") -> FormatFamily:
    return FAMILIES[fmt.kind]


def format_syntax() -> str:
    """Every registered family's syntax, for help texts and errors."""
    return "; ".join(family.syntax for family in FAMILIES.values())


def example_formats(role: str) -> tuple[str, ...]:
    """Names to offer for a role (dashboard pickers, CLI help), from every registered family."""
    _role_defaults(role)
    return tuple(name for family in FAMILIES.values() for name in family.examples.get(role, ()))


def parse_format(text: str, role: str = "weight", granularity: str | None = None) -> Format:
    """Parse a format name such as "int8", "int4-g32", "int8-asym-pt", "fp8_e4m3" or "fp32".

    `granularity` (from a command-line default) applies when the name carries no suffix.
    """
    name = str(text).strip().lower()
    _role_defaults(role)
    if granularity is not None and granularity not in GRANULARITIES:
        raise FormatError(
            f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}"
        )
    for family in FAMILIES.values():
        fmt = family.parse(name, role, granularity, str(text))
        if fmt is not None:
            return fmt
    raise FormatError(f"unknown format {text!r}; use {format_syntax()}")


def _parse_float(name: str, role: str, granularity: str | None, text: str) -> Format | None:
    default_sym, default_gran = _role_defaults(role)
    float_base, _, float_suffix = name.partition("-")
    if float_base in _SCALED_FLOATS and float_suffix in _GRANULARITY_SUFFIX:
        gran = _GRANULARITY_SUFFIX[float_suffix]
        if role == "activation" and gran != "per-tensor":
            raise FormatError(f"activation format {text!r} must be per-tensor")
        return Format("float", _FLOAT_BITS[float_base], float_base, True, gran)
    if name not in _FLOAT_BITS or name == "fp32":
        return None
    gran = granularity or default_gran
    if name not in _SCALED_FLOATS or gran == "per-group":
        gran = "per-tensor" if name not in _SCALED_FLOATS else default_gran
    return Format("float", _FLOAT_BITS[name], name, True, gran)


def _parse_identity(name: str, role: str, granularity: str | None, text: str) -> Format | None:
    return Format("fp32", 32, "fp32") if name == "fp32" else None


def _parse_int(name: str, role: str, granularity: str | None, text: str) -> Format | None:
    match = _INT_RE.match(name)
    if not match:
        return None
    default_sym, default_gran = _role_defaults(role)
    unsigned, bits_text, suffix_text = match.groups()
    bits = int(bits_text)
    if bits not in INT_BITS:
        raise FormatError(f"unsupported bit width in {text!r}; integer formats take 2..8 or 16 bits")
    symmetric = False if unsigned else default_sym
    gran, group = granularity or default_gran, None
    for suffix in filter(None, suffix_text.split("-")):
        if suffix in ("sym", "asym"):
            symmetric = suffix == "sym"
        elif suffix in _GRANULARITY_SUFFIX:
            gran = _GRANULARITY_SUFFIX[suffix]
        elif re.fullmatch(r"g\d+", suffix) and int(suffix[1:]) > 0:
            gran, group = "per-group", int(suffix[1:])
        else:
            raise FormatError(
                f"unknown option {suffix!r} in format {text!r}; options are -sym, -asym, "
                "-pt (per-tensor), -pc (per-channel), -g<size> (per-group)"
            )
    if gran == "per-group" and group is None:
        group = 32  # the common choice of int4 weight-only kernels
    if role == "activation" and gran != "per-tensor":
        raise FormatError(
            f"activation format {text!r} must be per-tensor; per-channel and per-group scales "
            "apply to weights (use dynamic activations for per-token ranges)"
        )
    return Format("int", bits, f"int{bits}", symmetric, gran, group)


def parse_formats(text: str, role: str, granularity: str | None = None) -> tuple[Format, ...]:
    """Parse a comma-separated list; "none" or "" gives an empty tuple (e.g. weight-only)."""
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(parse_format(part, role, granularity) for part in text.split(",") if part.strip())


# --- fake quantization -------------------------------------------------------------------------


def check_finite(x: torch.Tensor, what: str) -> None:
    if not all_finite(x):
        raise ValueError(f"{what} contains NaN or Inf; quantization ranges are undefined, fix the model or data first")


def quantize_with_range(x: torch.Tensor, fmt: Format, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Fake-quantize x onto fmt's grid spanning [lo, hi] (lo, hi broadcast against x)."""
    return family_of(fmt).quantize(x, fmt, lo, hi)


def _quantize_identity(x: torch.Tensor, fmt: Format, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return x


def _quantize_int(x: torch.Tensor, fmt: Format, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    if x.dtype in (torch.float16, torch.bfloat16):
        # the grid's arithmetic in float32: hi − lo of a wide fp16 range overflows fp16
        return _quantize_int(x.float(), fmt, lo.float(), hi.float()).to(x.dtype)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if fmt.symmetric:
        scale = torch.maximum(-lo, hi) / ((2**fmt.bits - 1) / 2)
        zero_point = None
    else:
        scale = (hi - lo) / (2**fmt.bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not fmt.symmetric:
        zero_point = torch.clamp(torch.round(-lo / scale), fmt.qmin, fmt.qmax)
    if torch.is_grad_enabled() and x.requires_grad:
        q = torch.round(x / scale)
        if zero_point is not None:
            q = q + zero_point
        q = torch.clamp(q, fmt.qmin, fmt.qmax)
        return (q - zero_point) * scale if zero_point is not None else q * scale
    # One fresh tensor, then in place: range searches call this ~20 times per weight, and each
    # extra full-size temporary costs as much as the arithmetic.
    q = x / scale
    q.round_()
    if zero_point is not None:
        q.add_(zero_point)
    q.clamp_(fmt.qmin, fmt.qmax)
    if zero_point is not None:
        q.sub_(zero_point)
    return q.mul_(scale)


def _quantize_float(x: torch.Tensor, fmt: Format, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    if not fmt.scaled:
        # Saturate rather than overflow to inf: what a careful deployment cast does.
        dtype = _FLOAT_DTYPES[fmt.base]
        finfo_max = torch.finfo(dtype).max
        return torch.clamp(x, -finfo_max, finfo_max).to(dtype).to(x.dtype)
    element = ELEMENT_TYPES[fmt.base]
    scale = torch.maximum(-lo, hi).abs() / element.max_normal
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return round_to_element(x / scale, element) * scale


def scale_and_zero_point(fmt: Format, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scale, zero_point) that `quantize_with_range` uses, for exporters."""
    compute = family_of(fmt).scale_and_zero_point
    if compute is None:
        raise FormatError(f"{fmt.base} has no scale or zero point to export")
    return compute(fmt, lo, hi)


def _float_scale(fmt: Format, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = torch.maximum(-lo, hi) / ELEMENT_TYPES[fmt.base].max_normal
    return torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scale)


def _int_scale(fmt: Format, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if fmt.symmetric:
        scale = torch.maximum(-lo, hi) / ((2**fmt.bits - 1) / 2)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    scale = (hi - lo) / (2**fmt.bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.clamp(torch.round(-lo / scale), fmt.qmin, fmt.qmax)


def to_rows(w: torch.Tensor, fmt: Format, channel_axis: int = 0) -> torch.Tensor:
    """Reshape a weight so each row is one quantization group of fmt's granularity.

    Per-group formats group consecutive input elements of one output channel; a row length that the
    group size does not divide is zero-padded (zero is exact on every grid, so padding changes
    nothing).
    """
    if fmt.granularity == "per-tensor" or w.dim() == 0:
        return w.reshape(1, -1)
    rows = w.movedim(channel_axis, 0).reshape(w.shape[channel_axis], -1)
    if fmt.granularity == "per-channel":
        return rows
    group = fmt.group_size or rows.shape[1]
    pad = (-rows.shape[1]) % group
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(-1, group)


def from_rows(rows: torch.Tensor, like: torch.Tensor, fmt: Format, channel_axis: int = 0) -> torch.Tensor:
    """Inverse of `to_rows`."""
    if fmt.granularity == "per-tensor" or like.dim() == 0:
        return rows.reshape(like.shape)
    moved_shape = like.movedim(channel_axis, 0).shape
    per_channel = rows.reshape(moved_shape[0], -1)[:, : like.numel() // moved_shape[0]]
    return per_channel.reshape(moved_shape).movedim(0, channel_axis)


def dynamic_quantize(x: torch.Tensor, fmt: Format, per_token: bool) -> torch.Tensor:
    """Quantize with ranges taken from x itself at run time (PyTorch's dynamic quantization).

    per_token: one range per row of the last dimension (torchao's int8 dynamic activations); else one
    range per sample. Either way the result does not depend on how samples are batched.
    """
    if fmt.is_identity:
        return x
    if fmt.block_scaled:  # blocks along the reduction dimension: features (tokens) or channels (samples)
        return block_quantize(x, fmt, -1 if per_token else 1)
    rows = x.reshape(-1, x.shape[-1]) if per_token else x.reshape(x.shape[0], -1)
    lo = rows.amin(dim=1, keepdim=True)
    hi = rows.amax(dim=1, keepdim=True)
    if fmt.symmetric or fmt.kind == "float":
        hi = torch.maximum(-lo, hi)
        lo = -hi
    return quantize_with_range(rows, fmt, lo, hi).reshape(x.shape)


# --- block formats: OCP MX and NVFP4 -------------------------------------------------------------

MX_ELEMENTS = {"mxfp8_e4m3": "fp8_e4m3", "mxfp8_e5m2": "fp8_e5m2", "mxfp6_e2m3": "fp6_e2m3",
               "mxfp6_e3m2": "fp6_e3m2", "mxfp4": "fp4_e2m1", "mxint8": "int8"}
MX_BLOCK_SIZES = (32, 8, 16, 64, 128, 256)  # OCP MX v1.0 fixes 32; the others for experiments
E8M0_MIN, E8M0_MAX = -127, 127
NVFP4_BLOCK = 16
NVFP4_TENSOR_DIVISOR = 6.0 * 448.0  # FP4 max normal × FP8 E4M3 max normal


def block_element(fmt: Format) -> ElementType:
    """The element type of a block format (or of fp4_e2m1)."""
    return ELEMENT_TYPES[MX_ELEMENTS.get(fmt.base, "fp4_e2m1")]


def mx_shared_exponent(absmax: torch.Tensor, element: ElementType) -> torch.Tensor:
    """OCP MX's shared exponent per block: floor(log2(absmax)) − emax, clamped to E8M0's range
    (an all-zero block gets the smallest scale)."""
    shared = torch.frexp(absmax)[1] - 1 - element.emax
    shared = torch.where(absmax > 0, shared, torch.full_like(shared, E8M0_MIN))
    return shared.clamp_(E8M0_MIN, E8M0_MAX)


def _mx_blocks(blocks: torch.Tensor, absmax: torch.Tensor, fmt: Format) -> torch.Tensor:
    element = block_element(fmt)
    shared = mx_shared_exponent(absmax, element)
    # Powers of two: v · 2^−s and back are exact, even where 2^−127 is a float32 subnormal.
    return torch.ldexp(round_to_element(torch.ldexp(blocks, -shared), element), shared)


def nvfp4_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-tensor FP32 scale g over the last two dimensions, per-block E4M3 scale s): the block's
    effective scale is s·g."""
    tensor_scale = absmax.amax(dim=(-2, -1), keepdim=True) / NVFP4_TENSOR_DIVISOR
    tensor_scale = torch.where(tensor_scale > 0, tensor_scale, torch.ones_like(tensor_scale))
    return tensor_scale, round_to_element(absmax / 6.0 / tensor_scale, ELEMENT_TYPES["fp8_e4m3"])


def _nvfp4_blocks(blocks: torch.Tensor, absmax: torch.Tensor, fmt: Format) -> torch.Tensor:
    tensor_scale, block_scale = nvfp4_scales(absmax)
    scale = block_scale * tensor_scale
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = round_to_element(blocks / safe, ELEMENT_TYPES["fp4_e2m1"]) * safe
    return torch.where(scale > 0, quantized, torch.zeros_like(quantized))


def _check_block_absmax(absmax: torch.Tensor, fmt: Format) -> None:
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError(f"a tensor quantized to {fmt.base} contains NaN or Inf; block scales are undefined, "
                         "fix the model or data first")


def _quantize_block_rows(x: torch.Tensor, fmt: Format, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Rows of x are blocks (a weight's `to_rows`), lo/hi their ranges; tensor scales span all rows."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return _quantize_block_rows(x.float(), fmt, lo.float(), hi.float()).to(x.dtype)
    absmax = torch.maximum(-lo, hi).abs().expand(x.shape[0], 1)
    _check_block_absmax(absmax, fmt)
    return family_of(fmt).quantize_blocks(x[None], absmax[None], fmt)[0]


def block_quantize(x: torch.Tensor, fmt: Format, axis: int = -1) -> torch.Tensor:
    """Quantize x in fmt's blocks along `axis` (the reduction dimension), with scales taken from x
    at run time, as block-format hardware quantizes activations. A last partial block gets its own
    scale (zero padding leaves its absmax unchanged); NVFP4's tensor scale is per row along `axis`."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return block_quantize(x.float(), fmt, axis).to(x.dtype)
    moved = x.movedim(axis, -1)
    length, block = moved.shape[-1], fmt.group_size
    rows = moved.reshape(-1, length)
    pad = (-length) % block
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    blocks = rows.reshape(rows.shape[0], -1, block)
    absmax = blocks.abs().amax(dim=-1, keepdim=True)
    _check_block_absmax(absmax, fmt)
    quantized = family_of(fmt).quantize_blocks(blocks, absmax, fmt).reshape(rows.shape)[:, :length]
    return quantized.reshape(moved.shape).movedim(-1, axis)


def _block_parser(kind: str, bases: tuple[str, ...], sizes: tuple[int, ...]) -> Callable:
    def parse(name: str, role: str, granularity: str | None, text: str) -> Format | None:
        _role_defaults(role)
        base, _, suffix = name.partition("-")
        if base not in bases:
            return None
        size = sizes[0]
        if suffix:
            match = re.fullmatch(r"b(\d+)", suffix)
            if match is None or int(match.group(1)) not in sizes:
                raise FormatError(f"unknown option {suffix!r} in format {text!r}; {base} takes -b<block size> with "
                                  f"size {' or '.join(map(str, sizes))} (default {sizes[0]})")
            size = int(match.group(1))
        return Format(kind, block_element(Format(kind, 0, base)).bits, base, True, "per-group", size)

    return parse


def _parse_fp4(name: str, role: str, granularity: str | None, text: str) -> Format | None:
    base, _, suffix = name.partition("-")
    if base != "fp4_e2m1":
        return None
    _, default_gran = _role_defaults(role)
    if suffix and suffix not in _GRANULARITY_SUFFIX:
        raise FormatError(f"unknown option {suffix!r} in format {text!r}; fp4_e2m1 takes -pc (per-channel) or "
                          "-pt (per-tensor); for blocks use mxfp4 or nvfp4")
    gran = _GRANULARITY_SUFFIX.get(suffix) or (granularity if granularity in _GRANULARITY_SUFFIX.values() else default_gran)
    if role == "activation" and gran != "per-tensor":
        raise FormatError(f"activation format {text!r} must be per-tensor")
    return Format("fp4", 4, "fp4_e2m1", True, gran)


def _quantize_fp4(x: torch.Tensor, fmt: Format, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    scale, _ = _float_scale(fmt, lo, hi)
    return round_to_element(x / scale, ELEMENT_TYPES["fp4_e2m1"]) * scale


def _int_storage(fmt: Format) -> ScaleStorage:
    return ScaleStorage(FP16_SCALE_BITS + (0 if fmt.symmetric else ZERO_POINT_BITS))


def fake_quantize_ste(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the forward value is quantized, the gradient passes unchanged."""
    return x + (quantized - x).detach()


# Registration order is parse order (and the order pickers list names in).
register_family(FormatFamily(
    "int", _parse_int, _quantize_int, _int_scale,
    "intN (N in 2..8 or 16, e.g. int4, int8-asym, int4-g32)",
    {"weight": ("int8", "int6", "int4", "int4-g32", "int4-g128", "int3", "int2"), "activation": ("int8", "int16")},
    _int_storage,
))
register_family(FormatFamily(
    "float", _parse_float, _quantize_float, _float_scale, "fp16, bf16, fp8_e4m3, fp8_e5m2",
    {"weight": ("fp8_e4m3", "fp8_e5m2", "fp16", "bf16"), "activation": ("fp8_e4m3",)},
    lambda fmt: ScaleStorage(FP16_SCALE_BITS if fmt.scaled else 0),
))
register_family(FormatFamily(
    "fp4", _parse_fp4, _quantize_fp4, _float_scale, "fp4_e2m1 (FP4 with an FP32 scale per channel, -pt per tensor)",
    {"weight": ("fp4_e2m1",), "activation": ("fp4_e2m1",)}, lambda fmt: ScaleStorage(32),
))
register_family(FormatFamily(
    "mx", _block_parser("mx", tuple(MX_ELEMENTS), MX_BLOCK_SIZES), _quantize_block_rows, None,
    "OCP MX " + ", ".join(MX_ELEMENTS) + " (E8M0 scale per block of 32; -b16 etc. overrides)",
    {"weight": ("mxfp8_e4m3", "mxfp6_e2m3", "mxfp4", "mxint8"), "activation": ("mxfp8_e4m3", "mxfp4")},
    lambda fmt: ScaleStorage(8), _mx_blocks, MX_BLOCK_SIZES,
))
register_family(FormatFamily(
    "nvfp4", _block_parser("nvfp4", ("nvfp4",), (NVFP4_BLOCK,)), _quantize_block_rows, None,
    "nvfp4 (FP4 E2M1, FP8 E4M3 scale per block of 16, FP32 per tensor)",
    {"weight": ("nvfp4",), "activation": ("nvfp4",)}, lambda fmt: ScaleStorage(8, 32), _nvfp4_blocks, (NVFP4_BLOCK,),
))
register_family(FormatFamily("fp32", _parse_identity, _quantize_identity, None, "fp32 (keep in float)", {}))
