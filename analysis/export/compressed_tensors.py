"""llm-compressor / compressed-tensors: the quantization config vLLM loads, and the recipe that makes it.

The file holds `quantization_config` (compressed-tensors' `QuantizationConfig`: `config_groups`, each
with `targets` — the map's layer names, matched exactly — and `weights` / `input_activations`
QuantizationArgs, plus `ignore` for the layers the map leaves in float) and `recipe`, the same
groups as an llm-compressor `QuantizationModifier` stage (`oneshot(model, recipe=...)` quantizes and
compresses a checkpoint vLLM serves). Layers with the same formats share one group. The arguments
are those of compressed-tensors' preset schemes (W4A16, W8A8, FP8, FP8_DYNAMIC, NVFP4, NVFP4A16,
MXFP4, MXFP4A16, MXFP8, MXFP6A16 ...), so `schemes` names the preset a group equals when there is one.

What it cannot express is refused with one line naming the layer and the format: fp8_e5m2,
fp16/bf16 casts, fp4_e2m1 (per channel, `KINDS` leaves it out), MXFP6 E3M2, MXINT8, MX blocks other than 32, int16, and
non-Linear layers when the model is given (convolutions, embeddings, attention's packed in_proj).
Numbers are not carried over: llm-compressor calibrates its own scales (min/max observers).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.export.params import recipe_assignment, recipe_layers
from analysis.export.registry import ExportError, Target, register, write_json

if TYPE_CHECKING:
    from analysis.formats import Format
    from analysis.precision_map import PrecisionMap

KINDS = ("int", "float", "mx", "nvfp4", "fp32")
_LINEAR_KINDS = ("Linear", "NonDynamicallyQuantizableLinear")
_MX_SCALE = "torch.uint8"  # E8M0 exponents
_NVFP4_SCALE = "torch.float8_e4m3fn"
_MX_BITS = {"mxfp4": 4, "mxfp6_e2m3": 6, "mxfp8_e4m3": 8}  # compressed-tensors' MXFP6 is E2M3
_STRATEGY = {"per-channel": "channel", "per-tensor": "tensor", "per-group": "group"}


def _refuse(layer: str, role: str, fmt: Format, why: str) -> ExportError:
    return ExportError(f"compressed-tensors cannot express {fmt.name_for(role)} ({role} of layer {layer}): {why}; "
                       "pick another format for that layer")


def _weight_args(layer: str, fmt: Format) -> dict[str, Any]:
    if fmt.kind == "int" and fmt.bits <= 8:
        args = {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric, "strategy": _STRATEGY[fmt.granularity]}
        if fmt.granularity == "per-group":
            args["group_size"] = fmt.group_size
        return args
    if fmt.base == "fp8_e4m3":
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": _STRATEGY[fmt.granularity]}
    if fmt.kind == "nvfp4":
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                "scale_dtype": _NVFP4_SCALE}
    if fmt.base in _MX_BITS and fmt.group_size == 32:
        return {"num_bits": _MX_BITS[fmt.base], "type": "float", "symmetric": True, "group_size": 32,
                "strategy": "group", "scale_dtype": _MX_SCALE}
    raise _refuse(layer, "weight", fmt, "its schemes are int2-8, fp8 E4M3, NVFP4 and MXFP4/MXFP6 (E2M3)/MXFP8 "
                                        "with blocks of 32")


def _activation_args(layer: str, fmt: Format, dynamic: bool) -> dict[str, Any]:
    if fmt.kind == "int" and fmt.bits == 8 or fmt.base == "fp8_e4m3":
        args = {"num_bits": 8, "type": "int" if fmt.kind == "int" else "float", "symmetric": fmt.symmetric}
        # run-time ranges: per token, as quantlens' dynamic activations of Linear layers
        return {**args, "strategy": "token", "dynamic": True} if dynamic else {**args, "strategy": "tensor", "dynamic": False}
    if fmt.kind == "nvfp4":
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                "dynamic": "local", "scale_dtype": _NVFP4_SCALE, "observer": "static_minmax"}
    if fmt.base in ("mxfp4", "mxfp8_e4m3") and fmt.group_size == 32:
        return {"num_bits": _MX_BITS[fmt.base], "type": "float", "symmetric": True, "group_size": 32,
                "strategy": "group", "dynamic": True, "scale_dtype": _MX_SCALE}
    raise _refuse(layer, "activation", fmt, "its activation schemes are int8, fp8 E4M3, NVFP4, MXFP4 and MXFP8")


# compressed-tensors' preset schemes as (weight format, activation format, dynamic activations)
PRESETS: dict[str, tuple[str, str | None, bool]] = {
    "W4A16": ("int4-sym-g128", None, False), "W4A16_ASYM": ("int4-asym-g128", None, False),
    "W8A16": ("int8-sym-g128", None, False), "W8A8": ("int8-sym-pc", "int8-sym-pt", True),
    "FP8": ("fp8_e4m3-pt", "fp8_e4m3", False), "FP8_DYNAMIC": ("fp8_e4m3-pc", "fp8_e4m3", True),
    "NVFP4A16": ("nvfp4", None, False), "NVFP4": ("nvfp4", "nvfp4", False),
    "MXFP4A16": ("mxfp4", None, False), "MXFP4": ("mxfp4", "mxfp4", False),
    "MXFP8A16": ("mxfp8_e4m3", None, False), "MXFP8": ("mxfp8_e4m3", "mxfp8_e4m3", False),
    "MXFP6A16": ("mxfp6_e2m3", None, False),
}


def scheme_args(weight: Format, act: Format | None, dynamic: bool, layer: str = "?") -> dict[str, Any]:
    """{"weights", "input_activations"} QuantizationArgs (as dicts) for one layer's formats."""
    return {"weights": _weight_args(layer, weight),
            "input_activations": _activation_args(layer, act, dynamic) if act is not None else None}


def preset_args(name: str) -> dict[str, Any]:
    from analysis.formats import parse_format

    weight, act, dynamic = PRESETS[name]
    return scheme_args(parse_format(weight), parse_format(act, "activation") if act else None, dynamic, name)


def compressed_tensors_config(pmap: PrecisionMap, model: Any = None, engine: str | None = None) -> dict[str, Any]:
    """{"quantization_config", "recipe", "schemes"} for the map; with `model` (nn.Module or spec) every
    analysed layer is covered and non-Linear ones are refused (see `params.recipe_layers`, also for
    `engine`)."""
    layers = recipe_layers(pmap, model, engine)
    pmap.validate([name for name, _ in layers])
    assignment = recipe_assignment(pmap, [name for name, _ in layers])
    groups: OrderedDict[str, dict[str, Any]] = OrderedDict()
    ignore = []
    for name, kind in layers:
        weight, act = assignment[name]
        if weight is None and act is None:
            ignore.append(name)
            continue
        if (kind is not None and kind not in _LINEAR_KINDS) or name.endswith(".in_proj"):
            raise ExportError(f"compressed-tensors quantizes Linear modules; layer {name} is "
                              f"{kind or 'an attention packed in_proj'}: leave it fp32 in the map")
        if weight is None:
            raise ExportError(f"compressed-tensors has no activation-only scheme (layer {name}); give it a weight format")
        scheme = scheme_args(weight, act, pmap.quant.dynamic_activations, name)
        key = repr(scheme)
        if key not in groups:
            groups[key] = {"targets": [], **scheme}
        groups[key]["targets"].append(name)
    config_groups = {f"group_{i}": group for i, group in enumerate(groups.values())}
    presets = {name: preset_args(name) for name in PRESETS}
    schemes = {group_name: next((name for name, args in presets.items()
                                 if args == {"weights": group["weights"], "input_activations": group["input_activations"]}),
                                None)
               for group_name, group in config_groups.items()}
    return {
        "quantization_config": {"quant_method": "compressed-tensors", "config_groups": config_groups, "ignore": ignore},
        "recipe": {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {"config_groups": config_groups,
                                                                                "ignore": ignore}}}},
        "schemes": schemes,
    }


def _export(pmap: PrecisionMap, out_path: Path, *, model: Any = None, engine: str | None = None, **_: Any) -> Path:
    return write_json(compressed_tensors_config(pmap, model, engine), out_path)


register(Target("compressed-tensors", "llm-compressor recipe",
                "llm-compressor recipe + compressed-tensors quantization_config (config_groups vLLM loads)",
                "compressed_tensors.json", _export, model="optional", kinds=KINDS))
