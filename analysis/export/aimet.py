"""AIMET encodings from our quantizers, in the layout each AIMET tool reads.

- "torch" (default): what aimet-torch 2.x's `QuantizationSimModel.load_encodings` reads (the layout
  of the `<prefix>_torch.encodings` file its `sim.export()` writes): parameter encodings keyed by
  PyTorch parameter name, a list with one entry per output channel; activation encodings keyed by
  module name, `{"input": {"0": [...]}}`. aimet-torch rebuilds every quantizer from each entry's
  `min`/`max` (float32: scale = (max - min) / (qmax - qmin)), ignoring the written scale and
  offset, so `aimet_min_max` picks float32 ranges from which that rule gives back our grid. A
  companion quantsim config (`aimet_quantsim_config`) makes the quantizers the file fills.
- "1.0.0": the list layout of the `<prefix>.encodings` file `sim.export()` writes for on-target
  tools (QNN converters' quantization overrides); names are ONNX tensor names when an ONNX model
  is given. scale/offset as we quantize; no min/max to rebuild from.
- "2.0.0": the layout of `sim.onnx.export()`, mirroring ONNX QuantizeLinear.

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
    import torch

    from analysis.precision_map import PrecisionMap
    from analysis.quantsim import QuantSim

AIMET_LAYOUTS = ("torch", "1.0.0", "2.0.0")
_AIMET_QUANT_SCHEME = {"minmax": "post_training_tf", "percentile": "post_training_percentile",
                       "mse": "post_training_tf_enhanced", "entropy": "post_training_tf_enhanced"}
_ONNX_FLOAT_NAMES = {"fp16": "float16", "bf16": "bfloat16"}
# Modules aimet-torch 2.x wraps with one input quantizer and a "weight" parameter quantizer, and the
# ONNX op types its quantsim config names them by.
_TORCH_MODULE_KINDS = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1d", "Conv2d", "Conv3d",
                       "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Embedding")
_CONFIG_OP_TYPES = ("Gemm", "MatMul", "Conv", "ConvTranspose")
# ONNX op types aimet-torch treats as grid-preserving: unless the config names them, it switches their
# outputs off, which for a module op also switches off the next layer's input quantizer, and then
# refuses the config ("Conflicting tensor quantizer settings") when that layer's input is switched on.
_GRID_PRESERVING_OP_TYPES = ("Col2Im", "Compress", "DepthToSpace", "Dropout", "Expand", "Flatten", "Gather",
                             "GatherElements", "GatherND", "Identity", "MaxPool", "MaxRoiPool", "NonZero", "Pad",
                             "ReduceMax", "ReduceMin", "Reshape", "Slice", "SpaceToDepth", "Split",
                             "SplitToSequence", "Squeeze", "Tile", "TopK", "Transpose", "Unsqueeze")
_RANGE_STEPS = 16  # float32 steps of the scale tried on each side when choosing min/max


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


# --- min/max from which aimet-torch rebuilds our grid ------------------------------------------


def _grid(bits: int, symmetric: bool) -> tuple[int, int]:
    """aimet-torch's integer grid: signed when symmetric, unsigned otherwise."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def aimet_rebuilt_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) aimet-torch 2.x computes from float32 encoding min/max (`set_range`): scale =
    (max - min) / (qmax - qmin) in float32, at least its minimum scale; offset 0 when symmetric,
    else round(min / scale) - qmin clamped to [-qmax, -qmin]."""
    import torch

    qmin, qmax = _grid(bits, symmetric)
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    scale = ((hi - lo) / (qmax - qmin)).abs().clamp_min(min(float(torch.finfo(torch.float32).eps), 0.01 / (qmax - qmin)))
    if symmetric:
        return scale, torch.zeros_like(scale)
    return scale, torch.clamp(torch.round(lo / scale) - qmin, -qmax, -qmin)


def _codes(rows: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, ...]:
    """Integer codes by division and by multiplication with the float32 reciprocal (what
    torch.fake_quantize_* do, and aimet-torch calls them when no gradient is needed), and each
    element's distance to the nearest rounding boundary between two codes of the grid."""
    import torch

    u = rows / scale[:, None] - offset[:, None]
    by_division = torch.clamp(torch.round(u), qmin, qmax)
    by_reciprocal = torch.clamp(torch.round(rows * (1.0 / scale)[:, None]) - offset[:, None], qmin, qmax)
    boundary = (torch.floor(u) + 0.5).clamp(qmin + 0.5, qmax - 0.5)
    return by_division, by_reciprocal, (u - boundary).abs().amin(dim=1)


def aimet_min_max(scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool,
                  rows: torch.Tensor | None = None, *, what: str = "this quantizer",
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 (min, max, rebuilt scale) per row such that aimet-torch's rule (`aimet_rebuilt_grid`)
    gives back our grid: the same offset, and a scale within a few float32 steps of ours.

    Without `rows`, the rebuilt scale is ours exactly where a float32 range gives it, else the
    nearest. With `rows` (the weight, one row per scale as `formats.to_rows`), every element must
    keep its integer code under both of aimet-torch's kernels, and among the scales that do, the
    one that keeps every element furthest from a rounding boundary (up to a few float32 steps of the
    largest code) is taken: a weight of ours that sits exactly on a tie (the channel's absmax lands
    on -2^(b-1) + 0.5 in our grid's units) then rounds the same way in AIMET, also after a
    BatchNorm fold that differs from ours in the last bit. A row no candidate scale rebuilds
    (one below aimet-torch's minimum scale) raises ExportError naming `what`.
    """
    import torch

    qmin, qmax = _grid(bits, symmetric)
    ours = scale.to(torch.float32).reshape(-1)
    offset = torch.zeros_like(ours) if symmetric else -zero_point.to(torch.float32).reshape(-1)
    wanted_codes = None
    if rows is not None:
        rows = rows.to(torch.float32)
        wanted_codes = torch.clamp(torch.round(rows / ours[:, None]) - offset[:, None], qmin, qmax)
    target_margin = 4 * 2.0 ** (bits - 1 - 23)  # four float32 steps at the largest code
    best_lo = best_hi = best_scale = None
    best_score = torch.full_like(ours, -math.inf)
    up, down = ours.clone(), ours.clone()
    candidates = [ours]
    for _ in range(_RANGE_STEPS):
        down = torch.nextafter(down, torch.zeros_like(down))
        up = torch.nextafter(up, torch.full_like(up, math.inf))
        candidates += [down, up]
    for t in candidates:  # ordered by distance from our scale: ties keep the nearer one
        lo = (offset + qmin) * t
        hi = (offset + qmax) * t
        rebuilt, rebuilt_offset = aimet_rebuilt_grid(lo, hi, bits, symmetric)
        valid = rebuilt_offset == offset
        if rows is None:
            score = -(rebuilt - ours).abs() / ours.clamp_min(torch.finfo(torch.float32).tiny)
        else:
            by_division, by_reciprocal, margin = _codes(rows, rebuilt, rebuilt_offset, qmin, qmax)
            valid &= (by_division == wanted_codes).all(dim=1) & (by_reciprocal == wanted_codes).all(dim=1)
            score = margin.clamp_max(target_margin)
        score = torch.where(valid, score, torch.full_like(score, -math.inf))
        better = score > best_score
        if best_lo is None:
            best_lo, best_hi, best_scale = lo.clone(), hi.clone(), rebuilt.clone()
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
        best_scale = torch.where(better, rebuilt, best_scale)
        best_score = torch.where(better, score, best_score)
        if bool((best_score >= (target_margin if rows is not None else 0.0)).all()):
            break  # no later (further) candidate can beat these
    if torch.isinf(best_score).any():
        bad = int(torch.nonzero(torch.isinf(best_score))[0])
        raise ExportError(f"no float32 min/max lets aimet-torch rebuild channel {bad} of {what} ({bits}-bit, scale "
                          f"{float(ours[bad]):.3g}; AIMET's smallest scale is ~1.2e-07): keep that layer at higher "
                          "precision or fp32")
    return best_lo, best_hi, best_scale


def to_aimet_encodings(sim: QuantSim, pmap: PrecisionMap, version: str = "torch", *,
                       onnx_model: "onnx.ModelProto | str | Path | None" = None) -> dict[str, Any]:
    """AIMET encodings for the map, from our own quantizers and calibration (layouts: module doc).

    Param names are PyTorch parameter names ("fc1.weight", "attn.in_proj_weight"). Biases are not
    encoded: they stay float, as in the simulation.

    torch: {"version": "0.6.1", "activation_encodings": {module: {"input": {"0": [entry]}}},
    "param_encodings": {param: [entry per channel]}, "excluded_layers", "quantizer_args"}, each
    entry {"min", "max", "scale", "offset", "bitwidth", "dtype": "int", "is_symmetric": "True" |
    "False"} with min/max from `aimet_min_max` and the scale aimet-torch rebuilds from them. Only
    what aimet-torch's quantsim can hold is accepted (ExportError otherwise): integer formats on
    Linear/Conv/ConvTranspose/Embedding modules, one calibrated input per module, per-channel or
    per-tensor weights (one of the two for the whole map: the quantsim config sets it globally).
    1.0.0: {"version", "activation_encodings": [...], "param_encodings": [...], "excluded_layers",
    "quantizer_args"}; activation names are the layer's ONNX input tensor when `onnx_model` is
    given, else "<layer>.input" (see `quantization_parameters`); integer entries carry
    "scale"/"offset" lists with offset = -zero_point, so a symmetric b-bit grid has offset
    -2^(b-1) and AIMET's dequantization (q + offset)·scale of q = clamp(round(x/scale) - offset, 0,
    2^b - 1) gives our grid values exactly.
    2.0.0: {"version", "encodings": [...]} with ONNX QuantizeLinear fields ("output_dtype",
    "y_scale", "y_zero_point", "axis", "block_size"); float entries carry only "output_dtype".
    """
    if version not in AIMET_LAYOUTS:
        raise ExportError(f"unknown AIMET encoding version {version!r}; use one of {', '.join(AIMET_LAYOUTS)}")
    params = quantization_parameters(sim, pmap, onnx_model=onnx_model)
    reject_dynamic(params, "AIMET encodings")
    if version == "torch":
        return _torch_encodings(sim, pmap, params)
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


def _torch_check(layer: str, role: str, info: dict[str, Any]) -> None:
    if info["dtype"] == "float":
        raise ExportError(f"aimet-torch's quantsim builds integer quantizers from its config, not {info['base']} "
                          f"({role} of layer {layer}); use an integer format there, or encodings 1.0.0 (version='1.0.0')")
    if info["granularity"] == "per-group":
        raise ExportError(f"per-group {role} of layer {layer}: aimet-torch's quantsim config cannot create block "
                          "quantizers; use per-channel there, or encodings 1.0.0 (PER_BLOCK, version='1.0.0')")


def _legacy_entries(info: dict[str, Any], rows: torch.Tensor | None, what: str) -> list[dict[str, Any]]:
    """aimet-torch's per-quantizer entries (one per channel) for one weight or input."""
    import torch

    scales = info["scale"] if isinstance(info["scale"], list) else [info["scale"]]
    zero_points = info["zero_point"] if isinstance(info["zero_point"], list) else [info["zero_point"]]
    bits, symmetric = info["bits"], bool(info["symmetric"])
    lo, hi, rebuilt = aimet_min_max(torch.tensor(scales, dtype=torch.float32),
                                    torch.tensor(zero_points, dtype=torch.float32), bits, symmetric, rows, what=what)
    qmin = _grid(bits, symmetric)[0]
    return [{"min": float(a), "max": float(b), "scale": float(s), "offset": qmin if symmetric else -int(z),
             "bitwidth": bits, "dtype": "int", "is_symmetric": str(symmetric)}
            for a, b, s, z in zip(lo.tolist(), hi.tolist(), rebuilt.tolist(), zero_points)]


def _torch_encodings(sim: QuantSim, pmap: PrecisionMap, params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from analysis.formats import to_rows

    assignment = pmap.assignment(sim.layer_names)
    param_encodings: dict[str, list[dict[str, Any]]] = {}
    activation_encodings: dict[str, dict[str, Any]] = {}
    granularities: dict[str, str] = {}
    for layer, entry in params.items():
        info = sim.layer(layer)
        module, _, attribute = entry["param"].rpartition(".")
        if info.kind not in _TORCH_MODULE_KINDS or attribute != "weight" or info.aliases:
            raise ExportError(f"layer {layer} ({info.kind}) is not a module aimet-torch quantizes through one "
                              "'weight' and one input; keep it fp32 in the map, or export encodings 1.0.0 (version='1.0.0')")
        weight = entry["weight"]
        if weight is not None:
            _torch_check(layer, "weight", weight)
            granularities.setdefault(weight["granularity"], layer)
            rows = to_rows(sim.table.weight(layer).detach().float(), assignment[layer][0], info.channel_axis)
            param_encodings[entry["param"]] = _legacy_entries(weight, rows, f"the weight of layer {layer}")
        acts = entry["activations"]
        if len(acts) > 1:
            raise ExportError(f"layer {layer} has {len(acts)} calibrated inputs (it runs more than once, or takes several); "
                              "aimet-torch has one input quantizer per module: give it an fp32 activation in the map")
        if acts:
            _torch_check(layer, "activation", acts[0])
            activation_encodings[module] = {"input": {"0": _legacy_entries(acts[0], None, f"the input of layer {layer}")}}
    if len(granularities) > 1:
        raise ExportError(f"the map mixes per-channel and per-tensor weights ({granularities.get('per-tensor')} is "
                          "per-tensor); aimet-torch's quantsim config sets one for every layer: use one granularity, "
                          "or encodings 1.0.0 (version='1.0.0')")
    return {
        "version": "0.6.1",
        "activation_encodings": activation_encodings,
        "param_encodings": param_encodings,
        "excluded_layers": excluded_layers(sim, pmap),
        "quantizer_args": _aimet_quantizer_args(sim, params),
    }


def aimet_quantsim_config(encodings: dict[str, Any]) -> dict[str, Any]:
    """The aimet-torch quantsim config (`config_file=`) that creates the quantizers `encodings`
    (torch layout) fills: weights (per-channel when the encodings are), and the inputs of
    Linear/Conv/ConvTranspose modules. AIMET's config cannot switch layer outputs off by default
    (it refuses is_output_quantized "False" in "defaults"), so it also makes output quantizers (the
    grid-preserving op types are named with outputs on, or AIMET's own default for them would
    switch the next layer's input off and conflict with ours):
    `load_encodings(..., partial=False)` removes every quantizer the file does not fill, which
    leaves exactly our placement."""
    weights = list(encodings["param_encodings"].values())
    per_channel = any(len(entries) > 1 for entries in weights)
    symmetric = [entries[0]["is_symmetric"] for entries in weights]
    return {
        "defaults": {
            "ops": {"is_output_quantized": "True"},
            "params": {"is_quantized": "True",
                       "is_symmetric": max(symmetric, key=symmetric.count) if symmetric else "True"},
            "strict_symmetric": "False",
            "unsigned_symmetric": "False",
            "per_channel_quantization": str(per_channel),
        },
        "params": {"bias": {"is_quantized": "False"}},
        "op_type": {**{op: {"is_output_quantized": "True"} for op in _GRID_PRESERVING_OP_TYPES},
                    **{op: {"is_input_quantized": "True"} for op in _CONFIG_OP_TYPES}},
        "supergroups": [],
        "model_input": {},
        "model_output": {},
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


def aimet_config_path(out_path: Path) -> Path:
    """Where the torch layout's companion quantsim config goes: "<name>.quantsim_config.json"."""
    return out_path.with_name(f"{out_path.stem}.quantsim_config.json")


def _export_aimet(pmap: PrecisionMap, out_path: Path, *, model: Any = None, calibration: Any = None,
                  version: str = "torch", engine: str | None = None, **_: Any) -> Path:
    sim = build_sim(pmap, model, calibration, engine)
    encodings = to_aimet_encodings(sim, pmap, version)
    if version == "torch":
        write_json(aimet_quantsim_config(encodings), aimet_config_path(out_path))
    return write_json(encodings, out_path)


register(Target("aimet", "AIMET encodings",
                "aimet-torch encodings for QuantizationSimModel.load_encodings, with the quantsim config beside them "
                "(1.0.0/2.0.0 from the API)", "aimet_encodings.json",
                _export_aimet, model="required", calibration="required"))
