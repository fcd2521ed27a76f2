"""The numbers every toolchain export writes, taken from the simulator that produced the analysis.

`build_sim` makes the `QuantSim` (the map's `QuantConfig` over the calibration data), and
`quantization_parameters` reads its quantizers: per-channel/group weight scales and zero points,
and the scale and zero point of each quantized layer input. The targets only change the layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from analysis.export.onnx_graph import load_onnx, match_onnx_layers
from analysis.export.registry import CLASSIC_KINDS, ExportError, refuse_inexpressible

if TYPE_CHECKING:  # torch and the simulator load on first use: the CLI lists targets without them
    import onnx

    from analysis.data import Dataset
    from analysis.formats import Format
    from analysis.precision_map import PrecisionMap
    from analysis.quantsim import QuantSim


def build_sim(pmap: PrecisionMap, model: Any, calibration: Any, engine: str | None = None) -> QuantSim:
    """A simulator over `calibration` with the map's quantization config (`pmap.quant`).

    `model`: nn.Module, torch.export program, or a `quantlens` model spec ("sample:cnn", "file.py:fn",
    "model.pt2"); `calibration`: Dataset, {"inputs", "labels"} mapping, input tensor, or a data spec.
    `engine` (analysis.config.ENGINES): None runs the engine the map's analysis used (its provenance),
    else "auto" — so a model only the hook engine runs is exported from the hook engine's numbers.
    """
    if model is None or calibration is None:
        raise ExportError("this export target needs numbers from the model: pass the model and calibration data "
                          "(CLI: --model and --data)")
    from analysis.hooks import engine_simulator
    from analysis.provenance import Provenance, engine_for

    if isinstance(model, str):
        from analysis.loading import load_model

        model = load_model(model)
    return engine_simulator(model, _as_dataset(calibration), pmap.quant,
                            engine=engine_for(engine, Provenance.from_dict(pmap.provenance)))


def _as_dataset(calibration: Any) -> Dataset:
    import torch

    from analysis.data import Dataset

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


def format_info(fmt: Format, role: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "format": fmt.name_for(role), "dtype": "int" if fmt.kind == "int" else "float", "base": fmt.base,
        "bits": fmt.bits, "symmetric": fmt.symmetric, "granularity": fmt.granularity,
    }
    if fmt.kind == "int":
        info.update(qmin=fmt.qmin, qmax=fmt.qmax)
    return info


def _weight_parameters(sim: QuantSim, layer_name: str, fmt: Format) -> dict[str, Any]:
    layer = sim.layer(layer_name)
    info = format_info(fmt, "weight")
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
    # block formats carry no calibrated scale or zero point (theirs are computed per block at run time)
    refuse_inexpressible(pmap, CLASSIC_KINDS, "scale and zero-point exports (AIMET, ORT, QDQ ONNX)")
    assignment = pmap.assignment(layer_names)
    names = sim.param_names()
    onnx_layers = match_onnx_layers(load_onnx(onnx_model), sim, rename=False) if onnx_model is not None else {}

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
                act = format_info(af, "activation")
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


def recipe_layers(pmap: PrecisionMap, model: Any = None, engine: str | None = None) -> list[tuple[str, str | None]]:
    """(name, kind) of every layer a recipe export (compressed-tensors, ModelOpt) covers: the model's
    analysed layers when it is given (an nn.Module or a model spec), else the layers the map names
    with kind None, refused when the map's default would quantize layers it does not name.
    `engine`: as for `build_sim` (None: the one the map's analysis used)."""
    if model is not None:
        return [(layer.name, layer.kind) for layer in model_layers(pmap, model, engine)]
    weight, act = pmap.default.formats(pmap.quant.granularity)
    if (weight is not None and not weight.is_identity) or act is not None:
        raise ExportError("the map's default quantizes layers it does not name: pass the model (model=; CLI: --model) "
                          "so that every layer can be listed")
    return [(name, None) for name in pmap.layers]


def model_layers(pmap: PrecisionMap, model: Any, engine: str | None = None) -> list[Any]:
    """The analysed layers of `model` (an nn.Module or a model spec) as the engine the map's analysis
    used sees them (`engine` overrides it; see `analysis.real.analysed_layers`), without data."""
    from analysis.provenance import Provenance, engine_for
    from analysis.real import analysed_layers

    if isinstance(model, str):
        from analysis.loading import load_model

        model = load_model(model)
    return analysed_layers(model, engine=engine_for(engine, Provenance.from_dict(pmap.provenance)))


HALF_PRECISION = ("bf16", "fp16")  # what a recipe export leaves to the checkpoint's dtype


def recipe_assignment(pmap: PrecisionMap, layer_names: list[str]) -> dict[str, tuple[Any, Any]]:
    """The map's assignment for a recipe export, with layers it keeps in half precision (bf16/fp16
    weights, float input: the allocator's "keep" option for LLMs) left unquantized: recipes carry
    quantization schemes, not dtypes, so those layers run in the checkpoint's dtype. Says so in one
    warning line naming them."""
    import warnings

    from analysis.quantsim import QuantlensWarning

    assignment = pmap.assignment(layer_names)
    kept = [name for name, (weight, act) in assignment.items() if weight is not None and act is None and weight.base in HALF_PRECISION]
    if kept:
        dtypes = sorted({assignment[name][0].base for name in kept})
        warnings.warn(f"{len(kept)} layer(s) kept in {'/'.join(dtypes)} ({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''}) "
                      f"are left unquantized in the recipe: load the model in {'/'.join(dtypes)} so they run in it",
                      QuantlensWarning, stacklevel=3)
    return {name: ((None, None) if name in kept else value) for name, value in assignment.items()}


def excluded_layers(sim: QuantSim, pmap: PrecisionMap) -> list[str]:
    """Layers the map leaves FP32 on both sides (what tools call excluded / float fallback)."""
    assignment = pmap.assignment([layer.name for layer in sim.layers])
    return [layer.name for layer in sim.layers
            if assignment[layer.name][0] is None and (assignment[layer.name][1] is None or not layer.quantizable_input)]


def reject_dynamic(params: dict[str, dict[str, Any]], target: str) -> None:
    for layer, entry in params.items():
        if any(act.get("dynamic") for act in entry["activations"]):
            raise ExportError(
                f"{target} cannot express dynamic (run-time) activation ranges (layer {layer}); "
                "export a map calibrated with static activation ranges, or a weight-only map")
