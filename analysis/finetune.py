"""Recover accuracy a precision map loses: calibration remedies, and (re-exported from
`analysis.qat`) quantization-aware fine-tuning.

`remedies` tries the usual calibration fixes on one sensitive layer and measures each on the model
output, with only that layer quantized; `finetune_qat` (see `analysis.qat`) trains under the whole
map and keeps the PTQ model unless fine-tuning beats it. Both measure with the simulated path
(analysis.evaluate.Evaluator), so their numbers line up with `quantlens evaluate`.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
import torch.fx
from torch import nn

from analysis.calibration import CALIBRATION_METHODS
from analysis.config import QuantConfig
from analysis.data import Dataset, Inputs, call_model
from analysis.evaluate import Evaluator
from analysis.formats import Format, parse_format
from analysis.metrics import compare
from analysis.precision_map import PrecisionMap
from analysis.qat import finetune_qat, task_loss

__all__ = ["finetune_qat", "remedies", "task_loss", "smooth_model"]


def _config(pmap: PrecisionMap | None = None, **overrides: Any) -> QuantConfig:
    """The map's quantization config (defaults without a map), with `overrides` applied."""
    return replace(pmap.quant if pmap else QuantConfig(), **overrides)


# --- calibration remedies ------------------------------------------------------------------------


def _fold_copy(model: nn.Module) -> nn.Module:
    private = copy.deepcopy(model).eval()
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in private.modules()):
        from torch.fx.experimental.optimization import fuse

        return fuse(private, inplace=True)
    return torch.fx.symbolic_trace(private)


def smooth_model(model: nn.Module, layer: str, inputs: Inputs, alpha: float = 0.5) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """SmoothQuant migration for one Linear (or groups=1 convolution) layer: a traced copy in which the
    layer's input is divided by s and its weight's input columns multiplied by s, with
    s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (X on `inputs`). Exact in FP32; it moves outliers from
    the activation into the weight. Returns (model, s)."""
    gm = _fold_copy(model)
    module = dict(gm.named_modules()).get(layer)
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer]
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or not nodes:
        raise ValueError(f"SmoothQuant needs an nn.Linear or convolution module called in the graph; {layer!r} is not")
    is_conv = not isinstance(module, nn.Linear)
    if is_conv and module.groups != 1:
        raise ValueError(f"SmoothQuant on a grouped convolution ({layer!r}, groups={module.groups}) would mix channels")
    amax: list[torch.Tensor] = []

    def observe(mod, args):
        x = args[0].detach().abs()
        dims = [d for d in range(x.dim()) if d != (1 if is_conv else x.dim() - 1)]
        amax.append(x.amax(dim=dims))

    handle = module.register_forward_pre_hook(observe)
    try:
        with torch.inference_mode():
            for start in range(0, len(inputs), 256):
                call_model(gm, inputs[start:start + 256])
    finally:
        handle.remove()
    x_max = torch.stack(amax).amax(dim=0).float()
    weight = module.weight.detach()
    w_dims = [d for d in range(weight.dim()) if d != 1]
    w_max = weight.abs().amax(dim=w_dims).float()
    s = x_max.pow(alpha) / w_max.pow(1.0 - alpha)
    s = torch.where((x_max > 0) & (w_max > 0) & torch.isfinite(s), s, torch.ones_like(s)).clamp(1e-5, 1e5)
    shape = [1] * weight.dim()
    shape[1] = -1
    with torch.no_grad():
        module.weight.mul_(s.reshape(shape).to(weight.dtype))
    buffer_name = "_smoothquant_" + layer.replace(".", "_")
    inv_shape = [-1] if not is_conv else [1, -1] + [1] * (weight.dim() - 2)
    gm.register_buffer(buffer_name, (1.0 / s).reshape(inv_shape).to(weight.dtype))
    for node in nodes:
        with gm.graph.inserting_before(node):
            inv = gm.graph.get_attr(buffer_name)
            scaled = gm.graph.call_function(torch.mul, (node.args[0], inv))
        node.args = (scaled,) + tuple(node.args[1:])
    gm.recompile()
    return gm, s


def remedies(model: nn.Module, calibration: Dataset, evaluation: Dataset | None, layer: str,
             weight_format: str | None, act_format: str | None = None, *, alpha: float = 0.5,
             group_size: int = 32) -> list[dict[str, Any]]:
    """Try calibration remedies for one layer and measure each: output SQNR vs FP32 on `evaluation`
    with only `layer` quantized in (weight_format, act_format). Entries {"remedy", "output_sqnr_db",
    "gain_db", ...} best first; "gain_db" is relative to the baseline entry (per-channel weights with
    MSE clipping, percentile activations, BatchNorm folded: the analysis defaults, with the format as
    named). Remedies that do not apply to the layer are listed last with a "reason" and no SQNR."""
    evaluation = evaluation or calibration
    base_config = _config()
    base = Evaluator(model, calibration, evaluation, base_config)
    if layer not in base.layer_names:
        hint = ", ".join(base.layer_names[:6]) + (", ..." if len(base.layer_names) > 6 else "")
        raise ValueError(f"unknown layer {layer!r}; the model's layers are {hint}")
    info = next(l for l in base.layers if l.name == layer)
    wf = parse_format(weight_format, "weight") if weight_format else None
    wf = None if wf is not None and wf.is_identity else wf
    af = parse_format(act_format, "activation") if act_format and info.quantizable_input else None
    af = None if af is not None and af.is_identity else af
    if wf is None and af is None:
        raise ValueError("give a weight and/or activation format to quantize the layer with")
    reference = base.reference
    entries: list[dict[str, Any]] = []

    def record(remedy: str, evaluator: Evaluator | None, w: Format | None, a: Format | None, **extra: Any) -> None:
        entry: dict[str, Any] = {"remedy": remedy,
                                 "weight_format": w.name_for("weight") if w else None,
                                 "act_format": a.name_for("activation") if a else None}
        try:
            ev = evaluator or base
            out = ev.sim.forward(ev.evaluation.inputs, {layer: (w, a)})
            entry["output_sqnr_db"] = compare(reference, out).sqnr_db  # always against the original FP32
        except Exception as exc:  # noqa: BLE001 — a remedy that fails is reported, not fatal
            entry.update(output_sqnr_db=None, reason=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        entry.update(extra)
        entries.append(entry)

    record("baseline", base, wf, af)
    if wf is not None and wf.scaled:
        alternatives = {
            "per-tensor weights": replace(wf, granularity="per-tensor", group_size=None),
            "per-channel weights": replace(wf, granularity="per-channel", group_size=None),
            f"per-group weights (g{group_size})": replace(wf, granularity="per-group", group_size=group_size),
        }
        for remedy, alt in alternatives.items():
            if alt != wf:
                record(remedy, base, alt, af)
        for method in CALIBRATION_METHODS:
            if method != base_config.weight_calibration:
                record(f"weight clipping: {method}", Evaluator(model, calibration, evaluation, _config(weight_calibration=method)), wf, af)
    if af is not None:
        for method in CALIBRATION_METHODS:
            if method != base_config.act_calibration:
                record(f"activation clipping: {method}",
                       Evaluator(model, calibration, evaluation, _config(act_calibration=method)), wf, af)
        record("dynamic activations (per token; per sample for convolutions)", Evaluator(model, calibration, evaluation, _config(dynamic_activations=True)), wf, af)
    try:
        smoothed, s = smooth_model(model, layer, calibration.inputs, alpha)
        record(f"SmoothQuant migration (alpha={alpha})", Evaluator(smoothed, calibration, evaluation, base_config), wf, af,
               max_scale=float(s.max()), min_scale=float(s.min()),
               deploy="fold 1/s into the op producing the layer's input (exact for norms and positive-homogeneous activations)")
    except Exception as exc:  # noqa: BLE001
        entries.append({"remedy": f"SmoothQuant migration (alpha={alpha})", "output_sqnr_db": None,
                        "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        fold_off = Evaluator(model, calibration, evaluation, _config(fold_batchnorm=False))
        if layer in fold_off.layer_names:
            record("BatchNorm folding off", fold_off, wf, af)

    baseline = entries[0]["output_sqnr_db"]
    for entry in entries:
        sqnr = entry.get("output_sqnr_db")
        entry["gain_db"] = None if sqnr is None or baseline is None else sqnr - baseline
    return sorted(entries, key=lambda e: (e.get("output_sqnr_db") is None, -(e.get("output_sqnr_db") or 0.0)))
