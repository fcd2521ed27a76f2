"""Hand a precision map to the tools that deploy it: AIMET encodings, ONNX Runtime overrides, QDQ ONNX.

Every number written here (weight scales and zero points per channel or group, the scale and zero
point of each quantized layer input) comes from the same `QuantSim` quantizers and calibrated
ranges that the simulation used, so a deployed model reproduces the simulated one instead of
re-calibrating with the tool's own (different) rules. Two examples of why this matters:
ONNX Runtime's symmetric int8 grid is [-127, 127] with scale absmax/127, ours (and torchao's) is
[-128, 127] with scale absmax/127.5; and our MSE/percentile clipping ranges are not what a tool's
MinMax calibration would pick.

Targets (`EXPORT_TARGETS`, dispatched by `export_map`):

- json / yaml: the precision map itself.
- aimet: AIMET encodings (schema 1.0.0, or 2.0.0 which mirrors ONNX QuantizeLinear).
- ort: ONNX Runtime `quantize_static` settings with `extra_options["TensorQuantOverrides"]`, as JSON
  (enum names as strings; `ort_quantize_kwargs` turns it back into live arguments).
- onnx: a QDQ ONNX model made by ONNX Runtime's `quantize_static` with our scales pinned.

Conventions shared by all targets: only weights and layer inputs are quantized (biases, norms and
layer outputs stay float), exactly as the simulation does; a layer that is FP32 on both sides is
"excluded". Grid conversions: AIMET's offset is minus our zero point (q_aimet = round(x/s) - offset
on [0, 2^b - 1]), so our symmetric grid [-2^(b-1), 2^(b-1) - 1] becomes offset -2^(b-1).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np
import torch

from analysis.data import Dataset
from analysis.formats import Format, scale_and_zero_point
from analysis.precision_map import PrecisionMap
from analysis.quantsim import QuantSim, guess_param_name

if TYPE_CHECKING:  # onnx is an optional dependency ("real" extra): imported only where needed
    import onnx

EXPORT_TARGETS = ("json", "yaml", "aimet", "ort", "torchao", "onnx")
ORT_OVERRIDES_SCHEMA = "quantlens.ort-overrides/1"
# ONNX ops whose second input is a layer weight: the only ops the QDQ export quantizes, so that ORT
# adds Q/DQ exactly where the simulation quantizes (a layer's input and weight) and nowhere else.
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ_MIN_OPSET = 13  # per-channel (axis) DequantizeLinear
INT4_INT16_MIN_OPSET = 21  # 4- and 16-bit QuantizeLinear/DequantizeLinear in the ONNX domain


class ExportError(ValueError):
    """A map/target combination the target cannot express; the message says what to do instead."""


# --- the simulator the numbers come from ---------------------------------------------------------


def build_sim(pmap: PrecisionMap, model: Any, calibration: Any) -> QuantSim:
    """A QuantSim over `calibration` with the map's quantization config (`pmap.quant`).

    `model`: nn.Module, torch.export program, or a `quantlens` model spec ("sample:cnn", "file.py:fn",
    "model.pt2"); `calibration`: Dataset, {"inputs", "labels"} mapping, input tensor, or a data spec.
    """
    if model is None or calibration is None:
        raise ExportError("this export target needs numbers from the model: pass the model and calibration data "
                          "(CLI: the model argument and --data)")
    if isinstance(model, str):
        from analysis.loading import load_model

        model = load_model(model)
    return QuantSim(model, _as_dataset(calibration), pmap.quant)


def _as_dataset(calibration: Any) -> Dataset:
    if isinstance(calibration, Dataset):
        return calibration
    if isinstance(calibration, str):
        from analysis.loading import load_data

        return load_data(calibration, split="calibration")
    if isinstance(calibration, torch.Tensor):
        return Dataset(calibration, name="calibration")
    if isinstance(calibration, Mapping) and "inputs" in calibration:
        from analysis.data import infer_task

        labels = calibration.get("labels")
        return Dataset(calibration["inputs"], labels, infer_task(labels), "calibration")
    raise ExportError(f"calibration data must be a Dataset, a tensor, a mapping with \"inputs\" or a data spec, "
                      f"not {type(calibration).__name__}")


# --- the numbers ----------------------------------------------------------------------------------


def _format_info(fmt: Format, role: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "format": fmt.name_for(role), "dtype": "int" if fmt.kind == "int" else "float", "base": fmt.base,
        "bits": fmt.bits, "symmetric": fmt.symmetric, "granularity": fmt.granularity,
    }
    if fmt.kind == "int":
        info.update(qmin=fmt.qmin, qmax=fmt.qmax)
    return info


def _weight_parameters(sim: QuantSim, layer_name: str, fmt: Format) -> dict[str, Any]:
    layer = sim.layer(layer_name)
    info = _format_info(fmt, "weight")
    if not fmt.scaled:  # fp16 / bf16: a plain cast, nothing to calibrate
        return info
    params = sim.weight_params(layer_name, fmt)
    info.update(
        axis=params.axis,
        group_size=fmt.group_size if fmt.granularity == "per-group" else None,
        channels=layer.weight_shape[layer.channel_axis] if layer.weight_shape else 1,
        scale=[float(s) for s in params.scale.reshape(-1).tolist()],
        zero_point=[int(z) for z in params.zero_point.reshape(-1).tolist()],
    )
    if fmt.granularity == "per-group":
        info["groups_per_channel"] = len(info["scale"]) // info["channels"]
    return info


def quantization_parameters(sim: QuantSim, pmap: PrecisionMap, *,
                            onnx_model: "onnx.ModelProto | str | Path | None" = None) -> dict[str, dict[str, Any]]:
    """Per quantized layer, the exact numbers the simulation quantizes with.

    Returns {layer: {"kind", "param", "weight_shape", "weight": {...} | None, "activations": [...]}}
    in execution order; layers FP32 on both sides are left out. A weight entry has the format
    ("format", "bits", "symmetric", "granularity", "qmin", "qmax") and, for scaled formats,
    "scale"/"zero_point" lists with one value per row of `analysis.formats.to_rows` (one per output
    channel, per group in channel-major order, or one for per-tensor) and the channel "axis". Each
    activation entry (one per site and distinct input, e.g. q/k/v of cross-attention) has "name",
    "site", "index" and a scalar "scale"/"zero_point", or "dynamic": True when ranges are computed at
    run time (then there is no scale to export).

    Activation names: the ONNX input tensor of the layer's node when `onnx_model` is given and the
    layer has one input per site, else "<layer>.input" ("<layer>.input.<i>" for the i-th distinct
    input, "<layer>@<k>.input" for the k-th call of a layer used more than once).
    """
    layer_names = sim.layer_names
    pmap.validate(layer_names)
    assignment = pmap.assignment(layer_names)
    names = sim.param_names()
    onnx_layers = match_onnx_layers(_load_onnx(onnx_model), sim, rename=False) if onnx_model is not None else {}

    result: dict[str, dict[str, Any]] = {}
    for layer in sim.layers:
        wf, af = assignment[layer.name]
        if not layer.quantizable_input:
            af = None  # embeddings: integer indices, nothing to quantize on the input side
        if wf is None and af is None:
            continue
        entry: dict[str, Any] = {
            "kind": layer.kind, "param": names[layer.name], "weight_shape": list(layer.weight_shape),
            "channel_axis": layer.channel_axis,
            "weight": _weight_parameters(sim, layer.name, wf) if wf is not None else None,
            "activations": [],
        }
        if af is not None:
            onnx_layer = onnx_layers.get(layer.name)
            params = sim.activation_params(layer.name, af)
            sites = [site.node.name for site in sim.sites(layer.name)]
            for p in params:
                k = sites.index(p.site)
                single = sum(1 for q in params if q.site == p.site) == 1
                act = _format_info(af, "activation")
                name = f"{layer.name}{f'@{k}' if k else ''}.input{f'.{p.index}' if p.index else ''}"
                if onnx_layer is not None and single and k < len(onnx_layer.activations):
                    name = onnx_layer.activations[k]
                act.update(name=name, site=p.site, index=p.index)
                if not af.scaled:  # fp16/bf16 input: a cast, no range
                    pass
                elif p.dynamic:
                    act.update(dynamic=True, per_token=p.per_token)
                else:
                    act.update(dynamic=False, scale=p.scale, zero_point=p.zero_point, range=[p.lo, p.hi])
                entry["activations"].append(act)
        result[layer.name] = entry
    return result


def excluded_layers(sim: QuantSim, pmap: PrecisionMap) -> list[str]:
    """Layers the map leaves FP32 on both sides (what tools call excluded / float fallback)."""
    assignment = pmap.assignment([layer.name for layer in sim.layers])
    return [layer.name for layer in sim.layers
            if assignment[layer.name][0] is None and (assignment[layer.name][1] is None or not layer.quantizable_input)]


def _reject_dynamic(params: dict[str, dict[str, Any]], target: str) -> None:
    for layer, entry in params.items():
        if any(act.get("dynamic") for act in entry["activations"]):
            raise ExportError(
                f"{target} cannot express dynamic (run-time) activation ranges (layer {layer}); "
                "export a map calibrated with static activation ranges, or a weight-only map")


# --- AIMET -----------------------------------------------------------------------------------------

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
    _reject_dynamic(params, "AIMET encodings")
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


# --- ONNX graph: which node is which layer ------------------------------------------------------


@dataclass
class OnnxLayer:
    """Where one analysed layer lives in an ONNX graph."""

    weight: str  # initializer name
    nodes: list[str] = field(default_factory=list)  # consuming MatMul/Gemm/Conv nodes, graph order
    activations: list[str] = field(default_factory=list)  # input tensor of each of those nodes
    axis: int = 0  # output-channel axis of the initializer
    transposed: bool = False  # the initializer holds the transpose of the PyTorch weight (MatMul)


def _load_onnx(model: "onnx.ModelProto | str | Path") -> "onnx.ModelProto":
    import onnx

    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def match_onnx_layers(model: "onnx.ModelProto", sim: QuantSim | None = None, *, rename: bool = True,
                      layer_params: dict[str, str] | None = None) -> dict[str, OnnxLayer]:
    """Map layers to the ONNX nodes consuming their weight initializer.

    With a simulator, an initializer matches a layer by name (the PyTorch parameter name, what both
    exporters keep for Gemm/Conv) or, failing that, by value: the dynamo exporter folds the transpose
    of a MatMul weight into a new constant ("val_0"); `rename` renames such initializers (in place)
    to the parameter name so overrides and encodings share one name. Without a simulator, layers are
    found by name from `layer_params` (layer -> parameter name) or, if None, from every initializer
    feeding a MatMul/Gemm/Conv ("fc1.weight" -> layer "fc1").
    """
    from onnx import numpy_helper

    graph = model.graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        if node.op_type in LAYER_OPS and len(node.input) > 1:
            consumers.setdefault(node.input[1], []).append(node)
    initializers = {init.name: init for init in graph.initializer}
    result: dict[str, OnnxLayer] = {}

    if sim is None:
        if layer_params is None:
            layer_params = {}
            for name in consumers:
                if name in initializers:
                    layer = name[: -len(".weight")] if name.endswith(".weight") else name
                    layer_params[layer] = name
        for layer, param in layer_params.items():
            if param in consumers and param in initializers:
                nodes = consumers[param]
                axis = 1 if nodes[0].op_type == "MatMul" or (nodes[0].op_type == "Gemm" and not _gemm_trans_b(nodes[0])) \
                    or nodes[0].op_type == "ConvTranspose" else 0
                result[layer] = OnnxLayer(param, [n.name for n in nodes], [n.input[0] for n in nodes], axis)
        return result

    names = sim.param_names()
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(initializers[name])
        return arrays[name]

    candidates = [name for name in consumers if name in initializers]
    for layer in sim.layers:
        w = sim.table.weight(layer.name).detach().float().numpy()
        param = names[layer.name]
        found, transposed = None, False
        order = ([param] if param in candidates else []) + [c for c in candidates if c != param]
        for name in order:
            a = array(name)
            if a.shape == w.shape and np.array_equal(a, w):
                found = name
                break
            if w.ndim == 2 and a.shape == w.T.shape and np.array_equal(a, w.T):
                found, transposed = name, True
                break
        if found is None:
            continue
        if rename and found != param and param not in initializers and param not in arrays:
            _rename_tensor(graph, found, param)
            initializers[param] = initializers.pop(found)
            consumers[param] = consumers.pop(found)
            arrays[param] = arrays.pop(found)
            candidates[candidates.index(found)] = param
            found = param
        nodes = consumers[found]
        axis = (1 - layer.channel_axis) if transposed else layer.channel_axis
        result[layer.name] = OnnxLayer(found, [n.name for n in nodes], [n.input[0] for n in nodes], axis, transposed)
    return result


def _gemm_trans_b(node: Any) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


def _rename_tensor(graph: Any, old: str, new: str) -> None:
    for init in graph.initializer:
        if init.name == old:
            init.name = new
    for value in list(graph.input) + list(graph.value_info):
        if value.name == old:
            value.name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


# --- ONNX Runtime ----------------------------------------------------------------------------------


def _ort_quant_type(info: dict[str, Any], role: str, layer: str) -> str:
    """Our format -> ORT QuantType name; ExportError for what ORT's QDQ quantizer cannot express."""
    where = f"{role} of layer {layer} ({info['format']})"
    if info["dtype"] == "float":
        raise ExportError(f"ONNX Runtime QDQ quantization has no {info['base']} type for the {where}; use int8/int4/int16 "
                          "there, or keep the layer fp32 and convert precision with onnxconverter-common")
    if info["bits"] not in (4, 8, 16):
        raise ExportError(f"ONNX Runtime QDQ supports 4-, 8- and 16-bit integers, not {info['bits']}-bit ({where}); "
                          "use int4, int8 or int16 for that layer")
    if info["granularity"] == "per-group":
        raise ExportError(f"per-group weights are not supported in the ORT/QDQ export ({where}); use per-channel "
                          "(e.g. int4 instead of int4-g32) or the AIMET export, which has PER_BLOCK encodings")
    return f"Q{'Int' if info['symmetric'] else 'UInt'}{info['bits']}"


def _layer_format_infos(pmap: PrecisionMap, layers: list[tuple[str, bool]]) -> dict[str, tuple[dict | None, dict | None]]:
    out = {}
    for name, quantizable_input in layers:
        wf, af = pmap.precision(name).formats()
        if not quantizable_input:
            af = None
        out[name] = (_format_info(wf, "weight") if wf else None, _format_info(af, "activation") if af else None)
    return out


def to_ort_overrides(pmap: PrecisionMap, onnx_model: "onnx.ModelProto | str | Path | None" = None, *,
                     sim: QuantSim | None = None) -> dict[str, Any]:
    """ONNX Runtime `quantize_static` settings for the map, as JSON-ready data.

    Returns {"schema", "quant_format": "QDQ", "calibrate_method": "MinMax", "activation_type",
    "weight_type", "per_channel", "min_opset", "op_types_to_quantize", "nodes_to_quantize",
    "nodes_to_exclude", "excluded_layers", "extra_options": {"TensorQuantOverrides": {...}, ...},
    "layers": {layer: {"weight", "activation", "nodes", "weight_only"}}, "notes"}.
    `quant_type` values are QuantType enum *names* ("QInt8", "QUInt8", "QInt4", ...): map them back
    with `QuantType[name]`, or call `ort_quantize_kwargs` to get arguments for `quantize_static`.

    With `sim`, every quantized weight and input carries our scale and zero point (pinned: ORT
    then reproduces the simulation instead of using its own grid, e.g. [-127, 127] for symmetric
    int8); without it, only type/symmetry/axis, and ORT calibrates the ranges itself (MinMax).
    Tensor and node names come from `onnx_model`; without it weights are keyed by PyTorch parameter
    name (what `torch.onnx.export` keeps for Gemm/Conv), activation inputs cannot be named (their
    types are listed under "layers"), and `nodes_to_exclude` is empty (see "excluded_layers").
    """
    model = _load_onnx(onnx_model) if onnx_model is not None else None
    notes: list[str] = []
    if sim is not None:
        layers = [(layer.name, layer.quantizable_input) for layer in sim.layers]
        pmap.validate([name for name, _ in layers])
        params: dict[str, dict[str, Any]] | None = quantization_parameters(sim, pmap)
        _reject_dynamic(params, "ONNX Runtime static quantization")
        names = sim.param_names()
        onnx_layers = match_onnx_layers(model, sim) if model is not None else {}
    else:
        params = None
        if model is not None:  # layers found by initializer name ("fc1.weight" -> "fc1")
            onnx_layers = match_onnx_layers(model)
            layers = [(name, True) for name in onnx_layers]
            layers += [(name, True) for name in pmap.layers if name not in onnx_layers]
        else:
            onnx_layers = {}
            layers = [(name, True) for name in pmap.layers]
            if any(f is not None for f in pmap.default.formats(None)):
                notes.append("the map's default is not fp32 and no ONNX model was given: only layers named in the map "
                             "are listed; pass the ONNX model to cover every layer")
        names = {name: onnx_layers[name].weight if name in onnx_layers else guess_param_name(name) for name, _ in layers}
    formats = _layer_format_infos(pmap, layers)
    missing_in_onnx = [name for name, _ in layers if model is not None and name not in onnx_layers
                       and (formats[name][0] or formats[name][1])]
    if missing_in_onnx:
        raise ExportError(f"layer {missing_in_onnx[0]} has no MatMul/Gemm/Conv node consuming its weight in the ONNX graph "
                          "(embeddings and fused attention are not supported by the ORT/QDQ export, and the ONNX model must be an "
                          "export of the analysed graph); keep that layer fp32 in the map")

    overrides: dict[str, list[dict[str, Any]]] = {}
    layer_info: dict[str, dict[str, Any]] = {}
    excluded: list[str] = []
    nodes_to_quantize: list[str] = []
    nodes_to_exclude: list[str] = []
    weight_types, act_types = [], []
    per_channel = False

    def put(tensor: str, value: list[dict[str, Any]], layer: str) -> None:
        if tensor in overrides and overrides[tensor] != value:
            raise ExportError(f"tensor {tensor} feeds layers quantized differently (one of them {layer}); ORT's overrides "
                              "hold one setting per tensor: give those layers the same activation format")
        overrides[tensor] = value

    for name, _ in layers:
        winfo, ainfo = formats[name]
        onnx_layer = onnx_layers.get(name)
        if winfo is None and ainfo is None:
            excluded.append(name)
            if onnx_layer is not None:
                nodes_to_exclude.extend(onnx_layer.nodes)
            continue
        entry = params.get(name) if params is not None else None
        weight_tensor = onnx_layer.weight if onnx_layer is not None else names[name]
        axis = onnx_layer.axis if onnx_layer is not None else 0
        info: dict[str, Any] = {"weight": weight_tensor, "activation": None, "weight_only": ainfo is None,
                                "weight_float": winfo is None,
                                "nodes": list(onnx_layer.nodes) if onnx_layer is not None else []}
        nodes_to_quantize.extend(info["nodes"])
        if winfo is not None:
            qtype = _ort_quant_type(winfo, "weight", name)
            weight_types.append(qtype)
            w = entry["weight"] if entry is not None else None
            if winfo["granularity"] == "per-channel":
                per_channel = True
                if w is not None:
                    channel_list = [{"scale": s, "zero_point": z} for s, z in zip(w["scale"], w["zero_point"])]
                    channel_list[0] = {"quant_type": qtype, "axis": axis, **channel_list[0]}
                    put(weight_tensor, channel_list, name)
                else:
                    put(weight_tensor, [{"quant_type": qtype, "axis": axis, "symmetric": winfo["symmetric"]}], name)
            elif w is not None:
                put(weight_tensor, [{"quant_type": qtype, "scale": w["scale"][0], "zero_point": w["zero_point"][0]}], name)
            else:
                put(weight_tensor, [{"quant_type": qtype, "symmetric": winfo["symmetric"]}], name)
        if ainfo is not None:
            qtype = _ort_quant_type(ainfo, "activation", name)
            act_types.append(qtype)
            acts = entry["activations"] if entry is not None else []
            if onnx_layer is None:
                info["activation"] = {"quant_type": qtype, "symmetric": ainfo["symmetric"]}
            else:
                tensors = onnx_layer.activations
                if len(acts) > 1 and len(acts) != len(tensors):
                    raise ExportError(f"layer {name}: {len(acts)} quantized inputs but {len(tensors)} ONNX nodes; "
                                      "this layer cannot be exported to ORT, keep its activation fp32")
                info["activation"] = tensors[0] if len(tensors) == 1 else list(tensors)
                for k, tensor in enumerate(tensors):
                    act = acts[min(k, len(acts) - 1)] if acts else None
                    if act is not None:
                        put(tensor, [{"quant_type": qtype, "scale": act["scale"], "zero_point": act["zero_point"]}], name)
                    else:
                        put(tensor, [{"quant_type": qtype, "symmetric": ainfo["symmetric"]}], name)
        layer_info[name] = info

    if any(i["weight_only"] for i in layer_info.values()):
        notes.append("weight-only layers: ORT's static QDQ quantizer also quantizes their input (MinMax, activation_type); "
                     "export_qdq_onnx removes those input Q/DQ pairs afterwards")
    if any(i["weight_float"] for i in layer_info.values()):
        notes.append("layers with an fp32 weight but a quantized input: ORT also quantizes their weight; "
                     "export_qdq_onnx restores the float weight afterwards")
    if params is None:
        notes.append("no scales pinned: ORT calibrates ranges itself (MinMax), and its symmetric int8 grid is "
                     "[-127, 127], not the simulation's [-128, 127]")
    all_types = weight_types + act_types
    needs_21 = any(t.endswith(("4", "16")) for t in all_types)
    return {
        "schema": ORT_OVERRIDES_SCHEMA,
        "quant_format": "QDQ",
        "calibrate_method": "MinMax",
        "activation_type": max(act_types, key=act_types.count) if act_types else "QUInt8",
        "weight_type": max(weight_types, key=weight_types.count) if weight_types else "QInt8",
        "per_channel": per_channel,
        "min_opset": INT4_INT16_MIN_OPSET if needs_21 else QDQ_MIN_OPSET,
        "op_types_to_quantize": list(LAYER_OPS),
        "nodes_to_quantize": nodes_to_quantize,
        "nodes_to_exclude": nodes_to_exclude,
        "excluded_layers": excluded,
        "extra_options": {
            "TensorQuantOverrides": overrides,
            # The simulation quantizes layer inputs and weights only, never a layer's output.
            "OpTypesToExcludeOutputQuantization": list(LAYER_OPS),
            # Keep our weight scales even where ORT would enlarge them to fit the int32 bias.
            "QDQDisableWeightAdjustForInt32Bias": True,
        },
        "layers": layer_info,
        "pinned_scales": params is not None,
        "notes": notes,
    }


def ort_quantize_kwargs(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `onnxruntime.quantization.quantize_static` from `to_ort_overrides` data
    (also after a JSON round trip): enum names become QuantType/QuantFormat/CalibrationMethod, pinned
    scales become float32 arrays and zero points arrays of the quantized type, as ORT requires."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization.quant_utils import ONNX_TYPE_TO_NP_TYPE

    tensor_overrides: dict[str, list[dict[str, Any]]] = {}
    for tensor, entries in overrides["extra_options"].get("TensorQuantOverrides", {}).items():
        qtype = QuantType[entries[0]["quant_type"]] if entries and "quant_type" in entries[0] else None
        converted = []
        for entry in entries:
            item = dict(entry)
            if "quant_type" in item:
                item["quant_type"] = QuantType[item["quant_type"]]
            if "scale" in item:
                zp_dtype = ONNX_TYPE_TO_NP_TYPE[(qtype or QuantType[overrides["activation_type"]]).tensor_type]
                item["scale"] = np.array(item["scale"], dtype=np.float32)
                item["zero_point"] = np.array(item["zero_point"], dtype=zp_dtype)
            converted.append(item)
        tensor_overrides[tensor] = converted
    extra = dict(overrides["extra_options"], TensorQuantOverrides=tensor_overrides)
    return {
        "quant_format": QuantFormat[overrides.get("quant_format", "QDQ")],
        "calibrate_method": CalibrationMethod[overrides.get("calibrate_method", "MinMax")],
        "activation_type": QuantType[overrides["activation_type"]],
        "weight_type": QuantType[overrides["weight_type"]],
        "per_channel": bool(overrides["per_channel"]),
        "op_types_to_quantize": list(overrides["op_types_to_quantize"]),
        "nodes_to_quantize": list(overrides["nodes_to_quantize"]) or None,
        "nodes_to_exclude": list(overrides["nodes_to_exclude"]) or None,
        "extra_options": extra,
    }


# --- QDQ ONNX ----------------------------------------------------------------------------------


class _Wrapped(torch.nn.Module):
    """The TorchScript exporter reads `model.graph` as a TorchScript graph; an fx GraphModule's own
    `graph` attribute confuses it, so the fallback exports a thin wrapper."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any) -> Any:
        return self.module(*args)


def export_fp32_onnx(sim: QuantSim, path: str | Path, opset: int = 21, *, model: Any = None,
                     dynamo: bool = True) -> Path:
    """FP32 ONNX of the analysed graph, batch dimension dynamic.

    The analysed graph module is exported (not the original model) so that BatchNorm is folded
    exactly as in the analysis: the weights ONNX Runtime quantizes are the ones we calibrated.
    `dynamo=True` (torch.export based, torch's default) is tried first; the TorchScript exporter is
    the fallback. `model` is exported instead only if the graph module cannot be.
    """
    path = Path(path)
    example = (sim.data.inputs[:2],)
    errors = []
    sources = [sim.gm] + ([model] if model is not None else [])
    for source in sources:
        if dynamo:
            try:
                batch = torch.export.Dim("batch")
                torch.onnx.export(source, example, str(path), dynamo=True, opset_version=opset,
                                  dynamic_shapes=({0: batch},), verbose=False)
                return path
            except Exception as exc:  # noqa: BLE001 — fall back to the TorchScript exporter
                errors.append(f"dynamo: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if isinstance(source, torch.nn.Module):
            try:
                torch.onnx.export(_Wrapped(source), example, str(path), dynamo=False, opset_version=opset,
                                  input_names=["x"], output_names=["output"],
                                  dynamic_axes={"x": {0: "batch"}, "output": {0: "batch"}})
                return path
            except Exception as exc:  # noqa: BLE001
                errors.append(f"torchscript: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise ExportError(f"could not export the model to ONNX ({'; '.join(errors)})")


class _Reader:
    """onnxruntime CalibrationDataReader over our calibration inputs (ORT still runs calibration,
    even though our overrides pin every range it would use)."""

    def __init__(self, input_name: str, inputs: torch.Tensor, batch: int) -> None:
        self.batches = [inputs[i:i + batch].numpy() for i in range(0, len(inputs), batch)]
        self.input_name = input_name
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0

    def __len__(self) -> int:
        return len(self.batches)


def export_qdq_onnx(model: Any, sim: QuantSim, pmap: PrecisionMap, path: str | Path, opset: int = 21, *,
                    fp32_onnx: str | Path | None = None, dynamo: bool = True) -> Path:
    """A QDQ ONNX model of the map, made by ONNX Runtime's `quantize_static` with our numbers pinned.

    Steps: export FP32 ONNX (`export_fp32_onnx`, or reuse `fp32_onnx`, which must come from the same
    analysed graph); map layers to nodes via their weight initializers; quantize with
    `to_ort_overrides(..., sim=sim)`: every weight's per-channel (or per-tensor) scale and
    zero point and every quantized input's scale/zero point are pinned through TensorQuantOverrides,
    so ORT's MinMax calibration decides nothing; only the map's quantized layers are touched
    (`nodes_to_quantize`; FP32 layers in `nodes_to_exclude`). Biases become int32 with scale
    input_scale x weight_scale, as ORT's kernels expect (error far below the int8 noise).
    Weight-only layers and fp32-weight layers then get their float input/weight back.

    Unsupported (ExportError): fp8/fp16/bf16 formats, bit widths other than 4/8/16, per-group
    weights, dynamic activations, and 4/16-bit types below opset 21.
    """
    import onnx
    from onnxruntime.quantization import quantize_static

    path = Path(path)
    if opset < QDQ_MIN_OPSET:
        raise ExportError(f"QDQ export needs opset >= {QDQ_MIN_OPSET} (per-channel DequantizeLinear); got {opset}")
    params = quantization_parameters(sim, pmap)
    _reject_dynamic(params, "a static QDQ ONNX model")
    for layer, entry in params.items():  # fail before the slow export
        if entry["weight"] is not None:
            _ort_quant_type(entry["weight"], "weight", layer)
        for act in entry["activations"]:
            _ort_quant_type(act, "activation", layer)
            if opset < INT4_INT16_MIN_OPSET and act["bits"] != 8:
                raise ExportError(f"{act['bits']}-bit QDQ needs opset >= 21 (layer {layer}); pass opset=21")
        if entry["weight"] is not None and opset < INT4_INT16_MIN_OPSET and entry["weight"]["bits"] != 8:
            raise ExportError(f"{entry['weight']['bits']}-bit QDQ needs opset >= 21 (layer {layer}); pass opset=21")

    with tempfile.TemporaryDirectory(prefix="quantlens-onnx-") as tmp:
        if fp32_onnx is None:
            fp32_onnx = export_fp32_onnx(sim, Path(tmp) / "fp32.onnx", opset, model=model, dynamo=dynamo)
        fp32 = onnx.load(str(fp32_onnx))
        overrides = to_ort_overrides(pmap, fp32, sim=sim)  # also renames folded MatMul weights
        prepared = Path(tmp) / "prepared.onnx"
        onnx.save(fp32, str(prepared))
        graph_inputs = {i.name for i in fp32.graph.initializer}
        input_name = next(i.name for i in fp32.graph.input if i.name not in graph_inputs)
        kwargs = ort_quantize_kwargs(overrides)
        if not kwargs["nodes_to_quantize"]:
            onnx.save(fp32, str(path))  # nothing quantized: the FP32 model is the answer
            return path
        reader = _Reader(input_name, sim.data.inputs, 64)
        with _quiet_root_logger():  # ORT logs a "consider pre-processing" hint on every call
            quantize_static(str(prepared), str(path), reader, **kwargs)
        quantized = onnx.load(str(path))
        _restore_float_inputs(quantized, fp32, overrides)
        onnx.save(quantized, str(path))
    return path


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _restore_float_inputs(model: "onnx.ModelProto", fp32: "onnx.ModelProto", overrides: dict[str, Any]) -> None:
    """Give weight-only layers their float input back, and fp32-weight layers their float weight,
    by bypassing the Q/DQ pair ORT inserted; Q/DQ nodes and initializers left unused are removed."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    by_name = {node.name: node for node in graph.node}
    float_inits = {init.name: init for init in fp32.graph.initializer}
    have_inits = {init.name for init in graph.initializer}

    def source_of(tensor: str) -> str:
        dq = producers.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return tensor
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return q.input[0]
        return dq.input[0]

    changed = False
    for layer, info in overrides["layers"].items():
        for node_name in info["nodes"]:
            node = by_name.get(node_name)
            if node is None:
                continue
            if info["weight_only"]:
                node.input[0] = source_of(node.input[0])
                changed = True
            if info["weight_float"]:
                weight = info["weight"]
                node.input[1] = weight
                if weight not in have_inits:
                    graph.initializer.append(copy.deepcopy(float_inits[weight]))
                    have_inits.add(weight)
                changed = True
    if changed:
        _prune(graph)


def _prune(graph: Any) -> None:
    """Drop nodes whose outputs nobody reads (repeatedly), then unused initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {name for node in graph.node for name in node.input}
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = outputs | {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


# --- the CLI entry point -------------------------------------------------------------------------


def _write_json(data: Any, out_path: Path) -> Path:
    out_path.write_text(json.dumps(data, indent=2))
    return out_path


def _export_json(pmap: PrecisionMap, out_path: Path, **_: Any) -> Path:
    out_path.write_text(pmap.dumps("json"))
    return out_path


def _export_yaml(pmap: PrecisionMap, out_path: Path, **_: Any) -> Path:
    out_path.write_text(pmap.dumps("yaml"))
    return out_path


def _export_aimet(pmap: PrecisionMap, out_path: Path, *, model: Any = None, calibration: Any = None,
                  version: str = "1.0.0", **_: Any) -> Path:
    sim = build_sim(pmap, model, calibration)
    return _write_json(to_aimet_encodings(sim, pmap, version), out_path)


def _export_ort(pmap: PrecisionMap, out_path: Path, *, model: Any = None, calibration: Any = None,
                opset: int = 21, dynamo: bool = True, **_: Any) -> Path:
    """With model + calibration: pinned scales, and the FP32 ONNX model the tensor names refer to is
    written next to the JSON (<out>.onnx). Without: types only, keyed by PyTorch parameter names."""
    if model is None or calibration is None:
        return _write_json(to_ort_overrides(pmap), out_path)
    sim = build_sim(pmap, model, calibration)
    onnx_path = out_path.with_suffix(".onnx") if out_path.suffix != ".onnx" else out_path.with_suffix(".fp32.onnx")
    export_fp32_onnx(sim, onnx_path, opset, model=model if not isinstance(model, str) else None, dynamo=dynamo)
    import onnx

    fp32 = onnx.load(str(onnx_path))
    overrides = to_ort_overrides(pmap, fp32, sim=sim)
    onnx.save(fp32, str(onnx_path))  # initializers may have been renamed to parameter names
    overrides["model"] = onnx_path.name
    return _write_json(overrides, out_path)


def _export_onnx(pmap: PrecisionMap, out_path: Path, *, model: Any = None, calibration: Any = None,
                 opset: int = 21, dynamo: bool = True, **_: Any) -> Path:
    sim = build_sim(pmap, model, calibration)
    return export_qdq_onnx(model if not isinstance(model, str) else None, sim, pmap, out_path, opset, dynamo=dynamo)


def _export_torchao(pmap: PrecisionMap, out_path: Path, *, model: Any = None, **_: Any) -> Path:
    """torchao per-layer configs (FqnToConfig) as JSON; with the model, non-Linear layers are named
    with the reason they stay float."""
    from analysis.real import _discover, torchao_config_dict

    if isinstance(model, str):
        from analysis.loading import load_model

        model = load_model(model)
    layers = _discover(model) if model is not None else list(pmap.layers)
    return _write_json(torchao_config_dict(pmap, layers), out_path)


# target -> writer(pmap, out_path, *, model, calibration, **options)
EXPORTERS: dict[str, Callable[..., Path]] = {
    "json": _export_json,
    "yaml": _export_yaml,
    "aimet": _export_aimet,
    "ort": _export_ort,
    "torchao": _export_torchao,
    "onnx": _export_onnx,
}


def export_map(pmap: PrecisionMap, target: str, out_path: str | Path, *, model: Any = None,
               calibration: Any = None, **options: Any) -> Path:
    """Write `pmap` for `target` (one of EXPORTERS) to `out_path`; returns the path written.

    json/yaml need nothing else; aimet and onnx (and ort with pinned scales) build a QuantSim from
    `model` + `calibration` with the map's calibration settings. `options`: `version` ("1.0.0" or
    "2.0.0") for aimet, `opset` and `dynamo` for onnx/ort.
    """
    target = str(target).lower()
    if target not in EXPORTERS:
        raise ExportError(f"unknown export target {target!r}; use one of {', '.join(EXPORTERS)}")
    out_path = Path(out_path)
    if out_path.parent and not out_path.parent.exists():
        out_path.parent.mkdir(parents=True, exist_ok=True)
    return EXPORTERS[target](pmap, out_path, model=model, calibration=calibration, **options)


assert set(EXPORT_TARGETS) == set(EXPORTERS), "EXPORT_TARGETS and EXPORTERS must list the same targets"
