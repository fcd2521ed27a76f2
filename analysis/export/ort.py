"""ONNX Runtime `quantize_static` settings: TensorQuantOverrides with our scales pinned, as JSON.

Pinning matters: ORT's symmetric int8 grid is [-127, 127] with scale absmax/127, ours (and
torchao's) is [-128, 127] with scale absmax/127.5, and our MSE/percentile clipping ranges are not
what ORT's MinMax calibration would pick.

The file's "quantize_static" object is exactly `quantize_static`'s keyword arguments once JSON's
types are turned into ORT's: enum names into QuantType/QuantFormat/CalibrationMethod (keys in
`ORT_ENUM_KEYS`), override "scale"/"zero_point" into numpy arrays. `ort_settings_hook` does that as
a `json.load` object_hook, and the README shows the same few lines written with onnxruntime and
numpy only, so deploying the file needs no quantlens.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.export.onnx_graph import LAYER_OPS, export_fp32_onnx, load_onnx, match_onnx_layers
from analysis.export.params import build_sim, format_info, quantization_parameters, reject_dynamic
from analysis.export.registry import ExportError, Target, register, write_json

if TYPE_CHECKING:
    import onnx

    from analysis.precision_map import PrecisionMap
    from analysis.quantsim import QuantSim

ORT_OVERRIDES_SCHEMA = "quantlens.ort-overrides/2"
# JSON keys whose values are ORT enum names, and the onnxruntime.quantization enum each names.
ORT_ENUM_KEYS = {"quant_type": "QuantType", "activation_type": "QuantType", "weight_type": "QuantType",
                 "quant_format": "QuantFormat", "calibrate_method": "CalibrationMethod"}
QDQ_MIN_OPSET = 13  # per-channel (axis) DequantizeLinear
INT4_INT16_MIN_OPSET = 21  # 4- and 16-bit QuantizeLinear/DequantizeLinear in the ONNX domain


def ort_quant_type(info: dict[str, Any], role: str, layer: str) -> str:
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
        out[name] = (format_info(wf, "weight") if wf else None, format_info(af, "activation") if af else None)
    return out


def to_ort_overrides(pmap: PrecisionMap, onnx_model: "onnx.ModelProto | str | Path | None" = None, *,
                     sim: QuantSim | None = None) -> dict[str, Any]:
    """ONNX Runtime `quantize_static` settings for the map, as JSON-ready data.

    Returns {"schema", "quantize_static": {"quant_format": "QDQ", "calibrate_method": "MinMax",
    "activation_type", "weight_type", "per_channel", "op_types_to_quantize", "nodes_to_quantize",
    "nodes_to_exclude", "extra_options": {"TensorQuantOverrides": {...}, ...}}, "inputs" (the ONNX
    model's input names), "min_opset", "excluded_layers", "layers": {layer: {"weight",
    "activation", "nodes", "weight_only"}}, "pinned_scales", "notes"}. Enum values are *names*
    ("QInt8", "QUInt8", "QInt4", ...): read the file with `ort_settings_hook` (or the README's
    loader), or call `ort_quantize_kwargs`, to get arguments for `quantize_static`.

    With `sim`, every quantized weight and input carries our scale and zero point (pinned: ORT
    then reproduces the simulation instead of using its own grid, e.g. [-127, 127] for symmetric
    int8); without it, only type/symmetry/axis, and ORT calibrates the ranges itself (MinMax).
    Tensor and node names come from `onnx_model`; without it weights are keyed by PyTorch parameter
    name (what `torch.onnx.export` keeps for Gemm/Conv), activation inputs cannot be named (their
    types are listed under "layers"), and `nodes_to_exclude` is empty (see "excluded_layers").
    """
    model = load_onnx(onnx_model) if onnx_model is not None else None
    notes: list[str] = []
    if sim is not None:
        layers = [(layer.name, layer.quantizable_input) for layer in sim.layers]
        pmap.validate([name for name, _ in layers])
        params: dict[str, dict[str, Any]] | None = quantization_parameters(sim, pmap)
        reject_dynamic(params, "ONNX Runtime static quantization")
        names = sim.param_names()
        onnx_layers = match_onnx_layers(model, sim) if model is not None else {}
    else:
        from analysis.quantsim import guess_param_name

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
            qtype = ort_quant_type(winfo, "weight", name)
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
            qtype = ort_quant_type(ainfo, "activation", name)
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
        "quantize_static": {
            "quant_format": "QDQ",
            "calibrate_method": "MinMax",
            "activation_type": max(act_types, key=act_types.count) if act_types else "QUInt8",
            "weight_type": max(weight_types, key=weight_types.count) if weight_types else "QInt8",
            "per_channel": per_channel,
            "op_types_to_quantize": list(LAYER_OPS),
            "nodes_to_quantize": nodes_to_quantize or None,
            "nodes_to_exclude": nodes_to_exclude or None,
            "extra_options": {
                "TensorQuantOverrides": overrides,
                # The simulation quantizes layer inputs and weights only, never a layer's output.
                "OpTypesToExcludeOutputQuantization": list(LAYER_OPS),
                # Keep our weight scales even where ORT would enlarge them to fit the int32 bias.
                "QDQDisableWeightAdjustForInt32Bias": True,
            },
        },
        "inputs": _graph_inputs(model) if model is not None else [],
        "min_opset": INT4_INT16_MIN_OPSET if needs_21 else QDQ_MIN_OPSET,
        "excluded_layers": excluded,
        "layers": layer_info,
        "pinned_scales": params is not None,
        "notes": notes,
    }


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    """The model's data inputs (older exporters also list initializers as graph inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def ort_settings_hook(obj: dict[str, Any]) -> dict[str, Any]:
    """`json.load(..., object_hook=ort_settings_hook)`: enum names -> ORT enums, pinned scales ->
    float32 arrays and zero points -> integer arrays (what `quantize_static` requires of overrides)."""
    import numpy as np
    import onnxruntime.quantization as ortq

    obj = {key: getattr(ortq, ORT_ENUM_KEYS[key])[value] if key in ORT_ENUM_KEYS and isinstance(value, str) else value
           for key, value in obj.items()}
    if "scale" in obj and "zero_point" in obj:
        obj.update(scale=np.array(obj["scale"], dtype=np.float32), zero_point=np.array(obj["zero_point"]))
    return obj


def ort_quantize_kwargs(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `onnxruntime.quantization.quantize_static` from `to_ort_overrides` data
    (also after a JSON round trip): the file's "quantize_static" object read through
    `ort_settings_hook`, as the README's loader reads it."""
    import json

    return json.loads(json.dumps(overrides["quantize_static"]), object_hook=ort_settings_hook)


def _export_ort(pmap: PrecisionMap, out_path: Path, *, model: Any = None, calibration: Any = None,
                opset: int = 21, dynamo: bool = True, engine: str | None = None, **_: Any) -> Path:
    """With model + calibration: pinned scales, and the FP32 ONNX model the tensor names refer to is
    written next to the JSON (<out>.onnx). Without: types only, keyed by PyTorch parameter names."""
    if model is None or calibration is None:
        return write_json(to_ort_overrides(pmap), out_path)
    sim = build_sim(pmap, model, calibration, engine)
    onnx_path = out_path.with_suffix(".onnx") if out_path.suffix != ".onnx" else out_path.with_suffix(".fp32.onnx")
    export_fp32_onnx(sim, onnx_path, opset, model=model if not isinstance(model, str) else None, dynamo=dynamo)
    import onnx

    fp32 = onnx.load(str(onnx_path))
    overrides = to_ort_overrides(pmap, fp32, sim=sim)
    onnx.save(fp32, str(onnx_path))  # initializers may have been renamed to parameter names
    partial = [name for name, info in overrides["layers"].items() if info["weight_only"] or info["weight_float"]]
    if partial:
        logging.getLogger(__name__).warning(
            "ORT's quantize_static quantizes both the input and the weight of layer%s %s, which the map quantizes on one "
            "side only; the file will not reproduce the simulation there: export --to onnx for the exact model",
            "s" if len(partial) > 1 else "", ", ".join(partial))
    return write_json({"schema": overrides.pop("schema"), "model": onnx_path.name, **overrides}, out_path)


register(Target("ort", "ONNX Runtime overrides + FP32 ONNX",
                "ONNX Runtime TensorQuantOverrides (with the model and data: scales pinned, the FP32 ONNX alongside)",
                "ort_overrides.json", _export_ort, model="optional", calibration="optional"))
