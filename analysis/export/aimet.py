"""AIMET encodings (schema 1.0.0, or 2.0.0 which mirrors ONNX QuantizeLinear) from our quantizers.

Grid conversion: AIMET's offset is minus our zero point (q_aimet = round(x/s) - offset on
[0, 2^b - 1]), so our symmetric grid [-2^(b-1), 2^(b-1) - 1] becomes offset -2^(b-1).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.export.params import build_sim, excluded_layers, quantization_parameters, reject_dynamic
from analysis.export.registry import ExportError, Target, register, write_json

if TYPE_CHECKING:
    import onnx

    from analysis.precision_map import PrecisionMap
    from analysis.quantsim import QuantSim

_AIMET_QUANT_SCHEME = {"minmax": "post_training_tf", "percentile": "post_training_percentile",
                       "mse": "post_training_tf_enhanced", "entropy": "post_training_tf_enhanced"}
_ONNX_FLOAT_NAMES = {"fp16": "float16", "bf16": "bfloat16"}


def _aimet_check(layer: str, role: str, info: dict[str, Any]) -> None:
    if info["dtype"] == "float" and info["base"] not in _ONNX_FLOAT_NAMES:
        raise ExportError(f"AIMET encodings have no scaled {info['base']} ({role} of layer {layer}); "
                          "use an integer format or fp16/bf16 for that layer")


def _block_shape(layer: str, entry: dict[str, Any]) -> None:
    """Per-group scales map onto blocks along the input axis only when each group lies in one row of
    the weight's second axis (2-D weights, or 1x1 convolutions)."""
    shape = entry["weight_shape"]
    if entry["channel_axis"] != 0 or math.prod(shape[2:]) != 1:
        raise ExportError(f"per-group weights of layer {layer} (shape {shape}) do not map onto blocks of one axis; "
                          "use per-channel for that layer")


def to_aimet_encodings(sim: QuantSim, pmap: PrecisionMap, version: str = "1.0.0", *,
                       onnx_model: "onnx.ModelProto | str | Path | None" = None) -> dict[str, Any]:
    """AIMET encodings for the map, from our own quantizers and calibration.

    Param names are PyTorch parameter names ("fc1.weight", "attn.in_proj_weight"). Activation names
    are the layer's ONNX input tensor when `onnx_model` is given (what aimet_onnx keys encodings by),
    else "<layer>.input" (see `quantization_parameters`). Biases are not encoded: they stay float, as
    in the simulation.

    1.0.0: {"version", "activation_encodings": [...], "param_encodings": [...], "excluded_layers",
    "quantizer_args"}; integer entries carry "scale"/"offset" lists with offset = -zero_point, so a
    symmetric b-bit grid has offset -2^(b-1) and AIMET's dequantization (q + offset)·scale of
    q = clamp(round(x/scale) - offset, 0, 2^b - 1) gives our grid values exactly.
    2.0.0: {"version", "encodings": [...]} with ONNX QuantizeLinear fields ("output_dtype",
    "y_scale", "y_zero_point", "axis", "block_size"); float entries carry only "output_dtype".
    """
    if version not in ("1.0.0", "2.0.0"):
        raise ExportError(f"unknown AIMET encoding version {version!r}; use 1.0.0 or 2.0.0")
    params = quantization_parameters(sim, pmap, onnx_model=onnx_model)
    reject_dynamic(params, "AIMET encodings")
    param_encodings, activation_encodings = [], []
    for layer, entry in params.items():
        weight = entry["weight"]
        if weight is not None:
            _aimet_check(layer, "weight", weight)
            if weight["granularity"] == "per-group":
                _block_shape(layer, entry)
            param_encodings.append(_aimet_entry(entry["param"], weight, version))
        for act in entry["activations"]:
            _aimet_check(layer, "activation", act)
            activation_encodings.append(_aimet_entry(act["name"], act, version))
    if version == "2.0.0":
        return {"version": "2.0.0", "encodings": activation_encodings + param_encodings}
    return {
        "version": "1.0.0",
        "activation_encodings": activation_encodings,
        "param_encodings": param_encodings,
        "excluded_layers": excluded_layers(sim, pmap),
        "quantizer_args": _aimet_quantizer_args(sim, params),
    }


def _aimet_entry(name: str, info: dict[str, Any], version: str) -> dict[str, Any]:
    if info["dtype"] == "float":
        if version == "2.0.0":
            return {"name": name, "output_dtype": _ONNX_FLOAT_NAMES[info["base"]]}
        return {"name": name, "dtype": "FLOAT", "bw": info["bits"]}
    scales = info["scale"] if isinstance(info["scale"], list) else [info["scale"]]
    zero_points = info["zero_point"] if isinstance(info["zero_point"], list) else [info["zero_point"]]
    bits, granularity = info["bits"], info["granularity"]
    if version == "2.0.0":
        # ONNX QuantizeLinear: signed output for symmetric grids (zero point 0), unsigned otherwise.
        entry: dict[str, Any] = {"name": name, "output_dtype": f"{'int' if info['symmetric'] else 'uint'}{bits}"}
        if granularity == "per-tensor":
            entry.update(y_scale=scales[0], y_zero_point=zero_points[0])
        elif granularity == "per-channel":
            entry.update(y_scale=scales, y_zero_point=zero_points, axis=info["axis"])
        else:
            groups = info["groups_per_channel"]
            entry.update(y_scale=[scales[i:i + groups] for i in range(0, len(scales), groups)],
                         y_zero_point=[zero_points[i:i + groups] for i in range(0, len(zero_points), groups)],
                         axis=1, block_size=info["group_size"])
        return entry
    # AIMET's grid is always [0, 2^b - 1] with offset = -zero_point on our signed/unsigned grids.
    offsets = [-(2 ** (bits - 1)) if info["symmetric"] else -z for z in zero_points]
    entry = {
        "name": name, "dtype": "INT",
        "enc_type": {"per-tensor": "PER_TENSOR", "per-channel": "PER_CHANNEL", "per-group": "PER_BLOCK"}[granularity],
        "bw": bits, "is_sym": bool(info["symmetric"]), "scale": scales, "offset": offsets,
    }
    if granularity == "per-group":
        entry["block_size"] = info["group_size"]
    return entry


def _aimet_quantizer_args(sim: QuantSim, params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    weights = [e["weight"] for e in params.values() if e["weight"] is not None]
    acts = [a for e in params.values() for a in e["activations"]]

    def most_common(values: list[Any], default: Any) -> Any:
        return max(values, key=values.count) if values else default  # ties: first in execution order

    return {
        "activation_bitwidth": most_common([a["bits"] for a in acts], 8),
        "param_bitwidth": most_common([w["bits"] for w in weights], 8),
        "dtype": "int",
        "is_symmetric": most_common([w["symmetric"] for w in weights], True),
        "per_channel_quantization": any(w["granularity"] != "per-tensor" for w in weights),
        "quant_scheme": _AIMET_QUANT_SCHEME.get(sim.config.act_calibration, "post_training_tf"),
    }


def _export_aimet(pmap: PrecisionMap, out_path: Path, *, model: Any = None, calibration: Any = None,
                  version: str = "1.0.0", **_: Any) -> Path:
    sim = build_sim(pmap, model, calibration)
    return write_json(to_aimet_encodings(sim, pmap, version), out_path)


register(Target("aimet", "AIMET encodings", "AIMET encodings 1.0.0 (2.0.0 from the API)", "aimet_encodings.json",
                _export_aimet, model="required", calibration="required"))
