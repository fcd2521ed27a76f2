"""Recover accuracy a precision map loses: quantization-aware fine-tuning, and calibration remedies.

`finetune_qat` trains a private copy of the model with the map's quantizers in the forward pass
(fake quantization with the straight-through estimator) and returns FP32 weights that quantize
better under the same map. `remedies` tries the usual calibration fixes on one sensitive layer
and measures each on the model output, with only that layer quantized.

Both measure with the simulated path (analysis.evaluate.Evaluator), so their numbers line up with
`quantlens evaluate`.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from analysis.calibration import CALIBRATION_METHODS
from analysis.data import Dataset, check_labels
from analysis.evaluate import Evaluator, check_trained
from analysis.formats import Format, fake_quantize_ste, parse_format
from analysis.graph import primary_output
from analysis.layers import FunctionSite, ModuleSite
from analysis.metrics import compare
from analysis.precision_map import PrecisionMap
from analysis.config import QuantConfig
from analysis.quantsim import quantize_weight

__all__ = ["finetune_qat", "remedies", "task_loss", "smooth_model"]


def _config(pmap: PrecisionMap | None = None, **overrides: Any) -> QuantConfig:
    """The map's quantization config (defaults without a map), with `overrides` applied."""
    return replace(pmap.quant if pmap else QuantConfig(), **overrides)


def task_loss(task: str, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy: [N, C] logits vs [N] labels (classification), [N, T, V] vs [N, T] (language model)."""
    if task in ("classification", "language-model"):
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), labels.reshape(-1).long())
    raise ValueError(f"no task loss for task {task!r}")


# --- quantization-aware fine-tuning -------------------------------------------------------------


class _FakeQuantWeight(nn.Module):
    """Parametrization: the weight as the map quantizes it forward, the identity backward (STE)."""

    def __init__(self, fmt: Format, channel_axis: int, method: str, percentile: float) -> None:
        super().__init__()
        self.fmt, self.channel_axis, self.method, self.percentile = fmt, channel_axis, method, percentile

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        quantized = quantize_weight(weight, self.fmt, self.channel_axis, self.method, self.percentile)[0]
        return fake_quantize_ste(weight, quantized.to(weight.dtype))


class _FakeQuantAct(nn.Module):
    """An activation quantizer (calibrated ranges or dynamic) with the straight-through estimator."""

    def __init__(self, act_fn) -> None:
        super().__init__()
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            quantized = self.act_fn(0, x.detach())
        return fake_quantize_ste(x, quantized)


def _param_owners(gm: nn.Module, weight: torch.Tensor) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) that holds this parameter (several when the weight is tied)."""
    owners = []
    for module_name, module in gm.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            if param is weight:
                owners.append((module, param_name))
    return owners


def _insert_act_quantizer(gm: torch.fx.GraphModule, site, quantizer: nn.Module, index: int) -> bool:
    """Route the site's activation input through `quantizer` (a new call_module node)."""
    if isinstance(site, ModuleSite) and not site.is_embedding:
        arg_index = 0
    elif isinstance(site, FunctionSite) and site.act_index is not None:
        arg_index = site.act_index
    else:
        return False  # attention projections and embeddings: inputs are not a single tensor argument
    node = site.node
    if len(node.args) <= arg_index or not isinstance(node.args[arg_index], torch.fx.Node):
        return False
    name = f"_qat_act_{index}"
    gm.add_submodule(name, quantizer)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (node.args[arg_index],))
    args = list(node.args)
    args[arg_index] = new
    node.args = tuple(args)
    return True


def _distillation_targets(train: Dataset, evaluator: Evaluator) -> torch.Tensor | None:
    """None when the task loss applies (labels); else the FP32 outputs to distil from."""
    if train.labels is not None and train.task in ("classification", "language-model"):
        return None
    return evaluator.sim.forward(train.inputs, {}).detach()


def finetune_qat(model: nn.Module, pmap: PrecisionMap, train: Dataset, calibration: Dataset, *,
                 evaluation: Dataset | None = None, epochs: int = 3, lr: float = 1e-4, batch_size: int = 64,
                 seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Quantization-aware fine-tuning under `pmap`; returns (fine-tuned FP32 copy, report).

    The forward pass uses the map's fake-quantized weights (re-quantized from the latent FP32 weights
    at every step, with the map's weight calibration) and fake-quantized layer inputs (ranges
    calibrated on `calibration` before training, or dynamic if the map says so); gradients pass
    straight through. The loss is the task's cross-entropy (distillation to the FP32 outputs with
    MSE when `train` has no labels). Deterministic for a given seed. The input model is untouched.

    The report's "before"/"after" are the simulated metric under `pmap` on `evaluation` (held-out
    data; `calibration` when not given), the copy re-calibrated on `calibration` for "after".
    The copy has the model's class when it has no BatchNorm; otherwise it is the traced model with
    BatchNorm folded (the analysis folds it too, so the map's layer names still apply).
    """
    if epochs < 0 or lr <= 0 or batch_size < 1:
        raise ValueError("epochs must be >= 0, lr > 0 and batch_size >= 1")
    evaluation = evaluation or calibration
    config = _config(pmap)
    before_eval = Evaluator(model, calibration, evaluation, config)
    pmap.validate(before_eval.layer_names)
    before = before_eval.evaluate(pmap, "before QAT")
    sim = before_eval.sim  # calibrated activation ranges live here
    assignment = pmap.assignment(before_eval.layer_names)

    # The simulator's own prepared graph, copied with private weights: same trace, same BatchNorm
    # fold, and sites that pair with the simulator's by node name.
    prepared, table = sim.trainable_copy()
    gm = prepared.graph_module
    notes: list[str] = []
    parametrized: list[tuple[nn.Module, str]] = []
    inserted = 0
    for layer in table.layers:
        wf, af = assignment.get(layer.name, (None, None))
        if wf is not None:
            for owner, attr in _param_owners(gm, table.weight(layer.name)):
                parametrize.register_parametrization(
                    owner, attr, _FakeQuantWeight(wf, layer.channel_axis, config.weight_calibration, config.percentile))
                parametrized.append((owner, attr))
        if af is not None and layer.quantizable_input:
            theirs_by_node = {site.node.name: site for site in sim.sites(layer.name)}
            for mine in table.sites[layer.name]:
                act_fn = sim.activation_quantizer(theirs_by_node[mine.node.name], af)
                if not _insert_act_quantizer(gm, mine, _FakeQuantAct(act_fn), inserted):
                    notes.append(f"{layer.name}: input quantization not simulated during training "
                                 f"({type(mine).__name__})")
                else:
                    inserted += 1
    gm.recompile()

    check_labels(train, before_eval.reference)
    targets = _distillation_targets(train, before_eval)
    loss_name = "cross-entropy" if targets is None else "mse-to-fp32"
    curve: list[float] = []
    steps = 0
    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator: fork_rng(devices=[]) saves and restores just that one, while
        # torch.manual_seed would also reseed (and leave reseeded) every accelerator's.
        torch.random.default_generator.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        gm.train()
        for module in gm.modules():  # unfolded norms keep their running statistics
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        params = [p for p in gm.parameters() if p.requires_grad and p.is_floating_point()]
        optimizer = torch.optim.Adam(params, lr=lr)
        n = len(train)
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            total, count = 0.0, 0
            for start in range(0, n, batch_size):
                index = order[start:start + batch_size]
                output = primary_output(gm(train.inputs[index]))
                if targets is None:
                    loss = task_loss(train.task, output, train.labels[index])
                else:
                    loss = F.mse_loss(output, targets[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                check_trained(gm, lr)
                total += float(loss.detach()) * len(index)
                count += len(index)
                steps += 1
            curve.append(total / max(count, 1))
    gm.eval()

    # Back to a plain FP32 model: latent weights kept, quantizer nodes removed.
    for owner, attr in parametrized:
        if parametrize.is_parametrized(owner, attr):
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_qat_act_"):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for index in range(inserted):
        gm.delete_submodule(f"_qat_act_{index}")
    gm.recompile()
    tuned = _as_model(model, gm, prepared.folded_batchnorms)

    after_eval = Evaluator(tuned, calibration, evaluation, config)
    after = after_eval.evaluate(pmap, "after QAT")
    report = {
        "metric": before.metric_name,
        "before": before.metric,
        "after": after.metric,
        "fp32": before_eval.fp32_metric,
        "fp32_after": after_eval.fp32_metric,
        "before_output_sqnr_db": before.output.sqnr_db if before.output else None,
        "after_output_sqnr_db": after.output.sqnr_db if after.output else None,
        "epochs": epochs,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "loss": loss_name,
        "loss_curve": curve,
        "train_samples": len(train),
        "evaluation_samples": len(evaluation),
        "quantized_layers": sum(1 for wf, af in assignment.values() if wf is not None or af is not None),
        "folded_batchnorms": list(prepared.folded_batchnorms),
        "notes": notes,
    }
    return tuned, report


def _as_model(model: Any, gm: torch.fx.GraphModule, folded: tuple[str, ...]) -> nn.Module:
    """The user's model class with the trained weights when the graph kept its parameters' names."""
    if folded or not isinstance(model, nn.Module):
        return gm
    tuned = copy.deepcopy(model).eval()
    trained = dict(gm.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, param in tuned.named_parameters(remove_duplicate=False):
            if name in trained and trained[name].shape == param.shape:
                param.copy_(trained[name])
    return tuned


# --- calibration remedies ------------------------------------------------------------------------


def _fold_copy(model: nn.Module) -> nn.Module:
    private = copy.deepcopy(model).eval()
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in private.modules()):
        from torch.fx.experimental.optimization import fuse

        return fuse(private, inplace=True)
    return torch.fx.symbolic_trace(private)


def smooth_model(model: nn.Module, layer: str, inputs: torch.Tensor, alpha: float = 0.5) -> tuple[torch.fx.GraphModule, torch.Tensor]:
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
                gm(inputs[start:start + 256])
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
