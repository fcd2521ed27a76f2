"""Number formats and fake quantization (quantize, then dequantize back to float32).

A `Format` is what a user names on the command line or in a precision map ("int4", "int8-asym",
"int4-g32", "fp8_e4m3", "fp32"). What a bare name means depends on the role it plays, because
deployment toolchains quantize weights and activations differently: weights default to symmetric
per-output-channel, activations to asymmetric per-tensor. `parse_format` applies those defaults and
`Format.name_for(role)` writes the shortest name that parses back to the same format.

Integer grid (stated, because at 4 bits the common conventions differ by up to ~3 dB):
PyTorch / torchao convention, q in [-2^(b-1), 2^(b-1)-1] with scale = absmax / ((2^b - 1) / 2) for
symmetric formats; q in [0, 2^b - 1] with an integer zero point for asymmetric ones. Matching
torchao keeps the simulated path and the real int8/int4 kernels in agreement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

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


@dataclass(frozen=True)
class Format:
    """One number format with everything needed to quantize a tensor to it.

    kind is "int" (uniform integer grid), "float" (a cast, scaled for fp8) or "fp32" (identity:
    the layer stays in full precision, which a mixed-precision map may choose).
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
        """Whether the format carries a scale (and so a calibrated range)."""
        return self.kind == "int" or self.base in _SCALED_FLOATS

    def name_for(self, role: str) -> str:
        """Shortest name that `parse_format(name, role)` maps back to this format."""
        if self.kind != "int" and not (self.base in _SCALED_FLOATS and role == "weight"):
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
        if self.base in _SCALED_FLOATS:
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
    kind: str  # the Format.kind its formats carry
    parse: Callable[[str, str, str | None, str], "Format | None"]  # (name, role, granularity, text) -> None if not ours
    quantize: Callable[[torch.Tensor, "Format", torch.Tensor, torch.Tensor], torch.Tensor]
    scale_and_zero_point: Callable[["Format", torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    syntax: str  # one phrase for error messages and help
    examples: dict[str, tuple[str, ...]]  # role -> names offered in pickers, most useful first


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
    if not torch.isfinite(x).all():
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
    dtype = _FLOAT_DTYPES[fmt.base]
    finfo_max = torch.finfo(dtype).max
    if fmt.base not in _SCALED_FLOATS:
        # Saturate rather than overflow to inf: what a careful deployment cast does.
        return torch.clamp(x, -finfo_max, finfo_max).to(dtype).to(x.dtype)
    absmax = torch.maximum(-lo, hi).abs()
    scale = absmax / finfo_max
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # Casting past the fp8 range gives NaN for e4m3fn: clamp first (saturating cast).
    scaled = torch.clamp(x / scale, -finfo_max, finfo_max)
    return scaled.to(dtype).to(x.dtype) * scale


def scale_and_zero_point(fmt: Format, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scale, zero_point) that `quantize_with_range` uses, for exporters."""
    compute = family_of(fmt).scale_and_zero_point
    if compute is None:
        raise FormatError(f"{fmt.base} has no scale or zero point to export")
    return compute(fmt, lo, hi)


def _float_scale(fmt: Format, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = torch.maximum(-lo, hi) / torch.finfo(_FLOAT_DTYPES[fmt.base]).max
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
    rows = x.reshape(-1, x.shape[-1]) if per_token else x.reshape(x.shape[0], -1)
    lo = rows.amin(dim=1, keepdim=True)
    hi = rows.amax(dim=1, keepdim=True)
    if fmt.symmetric or fmt.kind == "float":
        hi = torch.maximum(-lo, hi)
        lo = -hi
    return quantize_with_range(rows, fmt, lo, hi).reshape(x.shape)


def fake_quantize_ste(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the forward value is quantized, the gradient passes unchanged."""
    return x + (quantized - x).detach()


# Registration order is parse order (and the order pickers list names in).
register_family(FormatFamily(
    "int", _parse_int, _quantize_int, _int_scale,
    "intN (N in 2..8 or 16, e.g. int4, int8-asym, int4-g32)",
    {"weight": ("int8", "int6", "int4", "int4-g32", "int4-g128", "int3", "int2"), "activation": ("int8", "int16")},
))
register_family(FormatFamily(
    "float", _parse_float, _quantize_float, _float_scale, "fp16, bf16, fp8_e4m3, fp8_e5m2",
    {"weight": ("fp8_e4m3", "fp8_e5m2", "fp16", "bf16"), "activation": ("fp8_e4m3",)},
))
register_family(FormatFamily("fp32", _parse_identity, _quantize_identity, None, "fp32 (keep in float)", {}))
