"""NVIDIA ModelOpt: a `mtq.quantize` config (`quant_cfg` + `algorithm`) with one entry per quantizer.

The list starts by disabling every quantizer ("*"), then enables `<layer>.weight_quantizer` and
`<layer>.input_quantizer` of each layer the map quantizes (later entries override earlier ones, as in
ModelOpt's own presets): integers as `num_bits` N with `axis` 0 (per channel), None (per tensor) or
static `block_sizes` (per group); floats as `num_bits` (E, M); MX as dynamic blocks with E8M0
scales (`scale_bits` (8, 0)), NVFP4 as dynamic blocks of 16 with E4M3 scales (`scale_bits` (4, 3)).
Static activation ranges are calibrated by ModelOpt ("algorithm": "max"); with dynamic activations
(`quant.dynamic_activations`) the input quantizers are dynamic per token. JSON has no tuples or
integer keys: `modelopt_config` turns the file back into the dict `mtq.quantize` takes.

Refused with one line naming the layer and the format: asymmetric integers (ModelOpt's integer
quantizers are symmetric), fp16/bf16 casts, fp4_e2m1 (per channel, `KINDS` leaves it out), and the packed in_proj of
nn.MultiheadAttention (not a module with its own quantizers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.export.params import recipe_assignment, recipe_layers
from analysis.export.registry import ExportError, Target, register, write_json

if TYPE_CHECKING:
    from analysis.formats import Format
    from analysis.precision_map import PrecisionMap

KINDS = ("int", "float", "mx", "nvfp4", "fp32")
_FLOAT_BITS = {"fp8_e4m3": [4, 3], "fp8_e5m2": [5, 2]}
_MX_BITS = {"mxfp8_e4m3": [4, 3], "mxfp8_e5m2": [5, 2], "mxfp6_e2m3": [2, 3], "mxfp6_e3m2": [3, 2],
            "mxfp4": [2, 1], "mxint8": 8}


def _quantizer_cfg(layer: str, role: str, fmt: Format, dynamic: bool) -> dict[str, Any]:
    if fmt.kind == "mx":
        return {"num_bits": _MX_BITS[fmt.base], "block_sizes": {"-1": fmt.group_size, "type": "dynamic", "scale_bits": [8, 0]}}
    if fmt.kind == "nvfp4":
        return {"num_bits": [2, 1], "block_sizes": {"-1": 16, "type": "dynamic", "scale_bits": [4, 3]}}
    if fmt.kind == "int" and fmt.symmetric or fmt.base in _FLOAT_BITS:
        cfg: dict[str, Any] = {"num_bits": fmt.bits if fmt.kind == "int" else _FLOAT_BITS[fmt.base]}
        if fmt.granularity == "per-group":
            cfg["block_sizes"] = {"-1": fmt.group_size, "type": "static"}
        else:
            cfg["axis"] = 0 if fmt.granularity == "per-channel" else None
        if role == "activation" and dynamic:
            cfg.update(axis=None, type="dynamic", block_sizes={"-1": None})
        return cfg
    why = ("ModelOpt's integer quantizers are symmetric: use the -sym variant" if fmt.kind == "int"
           else "no ModelOpt quantizer matches it")
    raise ExportError(f"ModelOpt cannot express {fmt.qualified_name(role)} ({role} of layer {layer}): {why}")


def modelopt_quant_cfg(pmap: PrecisionMap, model: Any = None, engine: str | None = None) -> dict[str, Any]:
    """The ModelOpt config for the map, JSON-able (see `modelopt_config` for the live dict); with
    `model` (nn.Module or spec) every analysed layer is covered (see `params.recipe_layers`, also
    for `engine`)."""
    layer_names = [name for name, _ in recipe_layers(pmap, model, engine)]
    pmap.validate(layer_names)
    assignment = recipe_assignment(pmap, layer_names)
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for name in layer_names:
        weight, act = assignment[name]
        if (weight is not None or act is not None) and name.endswith(".in_proj"):
            raise ExportError(f"ModelOpt cannot quantize layer {name} (nn.MultiheadAttention's packed in_proj has no "
                              "quantizer of its own): leave it fp32 in the map")
        for role, quantizer, fmt in (("weight", "weight_quantizer", weight), ("activation", "input_quantizer", act)):
            if fmt is not None:
                entries.append({"quantizer_name": f"{name}.{quantizer}",
                                "cfg": _quantizer_cfg(name, role, fmt, pmap.quant.dynamic_activations)})
    return {"quant_cfg": entries, "algorithm": "max"}


def modelopt_config(path_or_dict: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The exported file as the dict `mtq.quantize(model, config, forward_loop)` takes: lists back to
    tuples (`num_bits`, `scale_bits`) and block-size keys back to integers."""
    data = path_or_dict if isinstance(path_or_dict, dict) else json.loads(Path(path_or_dict).read_text())

    def live(cfg: dict[str, Any]) -> dict[str, Any]:
        out = dict(cfg)
        if isinstance(out.get("num_bits"), list):
            out["num_bits"] = tuple(out["num_bits"])
        if out.get("block_sizes") is not None:
            out["block_sizes"] = {(int(k) if k.lstrip("-").isdigit() else k): (tuple(v) if isinstance(v, list) else v)
                                  for k, v in out["block_sizes"].items()}
        return out

    return {**data, "quant_cfg": [{**entry, **({"cfg": live(entry["cfg"])} if "cfg" in entry else {})}
                                  for entry in data["quant_cfg"]]}


def _export(pmap: PrecisionMap, out_path: Path, *, model: Any = None, engine: str | None = None, **_: Any) -> Path:
    return write_json(modelopt_quant_cfg(pmap, model, engine), out_path)


register(Target("modelopt", "ModelOpt quant_cfg", "NVIDIA ModelOpt mtq.quantize config (per-layer quant_cfg)",
                "modelopt_quant_cfg.json", _export, model="optional", kinds=KINDS))
