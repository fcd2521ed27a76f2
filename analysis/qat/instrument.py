"""The training graph of quantization-aware fine-tuning: the simulator's prepared model with the
map's quantizers in its forward pass (straight-through estimator), and the way back to plain weights.

Weights are re-quantized from the latent FP32 weights at every step, with the map's own weight
calibration ("recalibrate") or with per-row scales learned by gradient (LSQ, "lsq"). Layer inputs go
through the activation quantizers of a `QuantSim`; `TrainingGraph.use_activation_ranges` swaps in a
newly calibrated simulator's, so training always sees the ranges a deployment of the current weights
would get.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from analysis.formats import (
    Format,
    fake_quantize_ste,
    from_rows,
    scale_and_zero_point,
    to_rows,
)
from analysis.layers import FunctionSite, ModuleSite
from analysis.quantsim import QuantSim, quantize_weight

_ACT_PREFIX = "_qat_act_"
_LATENT = re.compile(r"\.parametrizations\.([^.]+)\.original$")


class WeightFakeQuant(nn.Module):
    """Parametrization: the weight as the map quantizes it (its calibration recomputed at every
    step) forward, the identity backward (STE)."""

    def __init__(self, fmt: Format, channel_axis: int, method: str, percentile: float) -> None:
        super().__init__()
        self.fmt, self.channel_axis, self.method, self.percentile = fmt, channel_axis, method, percentile

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        quantized = quantize_weight(weight, self.fmt, self.channel_axis, self.method, self.percentile)[0]
        return fake_quantize_ste(weight, quantized.to(weight.dtype))


class LSQWeight(nn.Module):
    """Parametrization with a learned step size per row of `formats.to_rows` (LSQ, Esser et al. 2020):
    q = clamp(round(w / s) + z, qmin, qmax) - z, times s; rounding passes the gradient straight
    through, and s gets its gradient scaled by 1 / sqrt(row length * qmax). Starts from the map's
    calibrated scale; integer formats only."""

    def __init__(self, weight: torch.Tensor, fmt: Format, channel_axis: int, method: str, percentile: float) -> None:
        super().__init__()
        _, lo, hi = quantize_weight(weight, fmt, channel_axis, method, percentile)
        scale, zero_point = scale_and_zero_point(fmt, lo, hi)
        self.fmt, self.channel_axis = fmt, channel_axis
        self.scale = nn.Parameter(scale.float().reshape(-1, 1).clone())
        self.register_buffer("zero_point", zero_point.float().reshape(-1, 1).clone(), persistent=False)
        row_length = to_rows(weight.detach(), fmt, channel_axis).shape[1]
        self.grad_scale = 1.0 / (row_length * max(fmt.qmax, 1)) ** 0.5

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows = to_rows(weight.float(), self.fmt, self.channel_axis)
        s = _ScaleGradient.apply(self.scale.abs().clamp_min(1e-12), self.grad_scale)  # exactly s forward
        x = rows / s + self.zero_point
        rounded = x + (x.round() - x).detach()
        q = (torch.clamp(rounded, self.fmt.qmin, self.fmt.qmax) - self.zero_point) * s
        return from_rows(q, weight, self.fmt, self.channel_axis).to(weight.dtype)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward (bit for bit); the gradient multiplied by `factor` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


class ActFakeQuant(nn.Module):
    """A layer input through the simulator's activation quantizer, straight-through backward."""

    def __init__(self, act_fn: Any, device: torch.device | None = None) -> None:
        super().__init__()
        self.act_fn, self.device = act_fn, device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            # The simulator's ranges live on its device; training runs on the CPU.
            quantized = self.act_fn(0, x.detach().to(self.device or x.device)).to(x.device)
        return fake_quantize_ste(x, quantized)


def lsq_supported(fmt: Format) -> bool:
    return fmt.kind == "int" and fmt.scaled


def _param_owners(gm: nn.Module, weight: torch.Tensor) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) that holds this parameter (several when the weight is tied)."""
    return [(module, name) for _, module in gm.named_modules(remove_duplicate=False)
            for name, param in module.named_parameters(recurse=False) if param is weight]


def _insert(gm: torch.fx.GraphModule, site: Any, quantizer: nn.Module, name: str) -> bool:
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
    gm.add_submodule(name, quantizer)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (node.args[arg_index],))
    node.args = tuple(new if i == arg_index else a for i, a in enumerate(node.args))
    return True


@dataclass
class TrainingGraph:
    """The graph being trained, a clean copy of the same graph (no quantizers) to load checkpoints
    into, and the activation quantizers by (layer, site node name)."""

    gm: torch.fx.GraphModule
    clean: torch.fx.GraphModule
    folded_batchnorms: tuple[str, ...]
    act_quantizers: dict[tuple[str, str], tuple[ActFakeQuant, Format]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def use_activation_ranges(self, sim: QuantSim) -> None:
        """Quantize layer inputs with `sim`'s calibrated ranges from now on."""
        for (layer, node_name), (quantizer, fmt) in self.act_quantizers.items():
            sites = sim.sites(layer)
            site = next((s for s in sites if s.node.name == node_name), None)
            if site is None:  # a re-traced graph may rename nodes; sites keep their order
                index = [name for (l, name) in self.act_quantizers if l == layer].index(node_name)
                site = sites[index]
            quantizer.act_fn, quantizer.device = sim.activation_quantizer(site, fmt), sim.device

    def latent_state(self) -> dict[str, torch.Tensor]:
        """The FP32 weights being trained (and buffers), under the clean graph's names."""
        state: dict[str, torch.Tensor] = {}
        for name, param in self.gm.named_parameters(remove_duplicate=False):
            if name.startswith(_ACT_PREFIX) or (".parametrizations." in name and not _LATENT.search(name)):
                continue  # learned scales belong to the quantizers, not to the model
            state[_LATENT.sub(r".\1", name)] = param.detach().clone()
        for name, buffer in self.gm.named_buffers(remove_duplicate=False):
            if not name.startswith(_ACT_PREFIX) and ".parametrizations." not in name:
                state[name] = buffer.detach().clone()
        return state

    def model_with(self, state: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
        """A plain copy of the graph (no quantizers) holding `state`."""
        model = copy.deepcopy(self.clean)
        model.load_state_dict(state, strict=True)
        return model.eval()

    def norms(self) -> list[nn.Module]:
        """BatchNorms that were not folded (maps with fold_batchnorm false)."""
        return [m for m in self.gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def instrument(sim: QuantSim, assignment: dict[str, tuple[Format | None, Format | None]], ranges: str) -> TrainingGraph:
    """A trainable copy of `sim`'s prepared model with the assignment's quantizers in its forward."""
    prepared, table = sim.trainable_copy()
    gm = prepared.graph_module
    graph = TrainingGraph(gm, copy.deepcopy(gm), prepared.folded_batchnorms)
    config = sim.config
    for layer in table.layers:
        wf, af = assignment.get(layer.name, (None, None))
        if wf is not None:
            weight = table.weight(layer.name)
            use_lsq = ranges == "lsq" and lsq_supported(wf)
            if ranges == "lsq" and not use_lsq:
                graph.notes.append(f"{layer.name}: {wf.name_for('weight')} has no integer step to learn; "
                                   "its range is recalibrated at every step instead")
            quantizer = (LSQWeight(weight, wf, layer.channel_axis, config.weight_calibration, config.percentile)
                         if use_lsq else
                         WeightFakeQuant(wf, layer.channel_axis, config.weight_calibration, config.percentile))
            owners = _param_owners(gm, weight)
            for owner, attr in owners:
                # Tied weights share one quantizer, so one learned scale.
                parametrize.register_parametrization(owner, attr, quantizer)
        if af is not None and layer.quantizable_input:
            for site in table.sites[layer.name]:
                quantizer = ActFakeQuant(None)
                if _insert(gm, site, quantizer, f"{_ACT_PREFIX}{len(graph.act_quantizers)}"):
                    graph.act_quantizers[(layer.name, site.node.name)] = (quantizer, af)
                else:
                    graph.notes.append(f"{layer.name}: input quantization not simulated during training "
                                       f"({type(site).__name__}); it is in every evaluation")
    gm.recompile()
    graph.use_activation_ranges(sim)
    return graph


def unfold_into(model: nn.Module, tuned: nn.Module, folded: tuple[str, ...]) -> nn.Module:
    """A copy of `model` (its own class) holding `tuned`'s weights, where `tuned` is the traced
    graph with the BatchNorms `folded` folded into their convolutions: each such convolution gets
    the folded weight and each BatchNorm becomes the identity plus the folded bias (mean 0,
    variance 1 - eps, scale 1), which folds back to exactly the trained numbers. Parameters and
    buffers are copied by name; ValueError if the graph's names do not match the model's."""
    result = copy.deepcopy(model).eval()
    trained = {**dict(tuned.named_parameters(remove_duplicate=False)), **dict(tuned.named_buffers())}
    pairs = _conv_bn_pairs(model, folded)
    own = {**dict(result.named_parameters(remove_duplicate=False)), **dict(result.named_buffers())}
    modules = dict(result.named_modules())
    with torch.no_grad():
        for name, tensor in own.items():
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            if owner in folded:
                continue
            if name in trained and trained[name].shape == tensor.shape:
                tensor.copy_(trained[name])
            elif owner not in pairs:
                raise ValueError(f"the fine-tuned graph has no tensor {name!r} of shape {tuple(tensor.shape)}")
        for conv_name, bn_name in pairs.items():
            conv, bn = modules[conv_name], modules[bn_name]
            bias = trained[f"{conv_name}.bias"]
            conv.weight.copy_(trained[f"{conv_name}.weight"])
            if conv.bias is not None:
                conv.bias.zero_()
            bn.running_mean.zero_()
            eps = torch.tensor(bn.eps, dtype=bn.running_var.dtype)
            bn.running_var.fill_(float(torch.tensor(1.0, dtype=eps.dtype) - eps))
            if bn.weight is not None:
                bn.weight.fill_(1.0)
            if bn.bias is not None:
                bn.bias.copy_(bias)
            elif bool(bias.abs().max() > 0):
                raise ValueError(f"BatchNorm {bn_name} has no bias to hold the folded one")
    return result


def _conv_bn_pairs(model: nn.Module, folded: tuple[str, ...]) -> dict[str, str]:
    """{convolution: BatchNorm} for the folded BatchNorms: called as modules (torch.nn's own), or
    traced through as an `F.batch_norm` on the module's buffers (timm's `BatchNormAct2d`, folded
    the same way by the analysis, `analysis.graph`)."""
    if not folded:
        return {}
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    signature = inspect.signature(F.batch_norm)
    pairs = {}
    for node in traced.graph.nodes:
        source, norm = None, None
        if node.op == "call_module" and node.target in folded:
            source, norm = node.args[0], str(node.target)
        elif node.op == "call_function" and node.target is F.batch_norm:
            arguments = signature.bind(*node.args, **node.kwargs).arguments
            stats = arguments.get("running_mean")
            if isinstance(stats, torch.fx.Node) and stats.op == "get_attr":
                source, norm = arguments["input"], str(stats.target).rpartition(".")[0]
        if norm in folded and isinstance(source, torch.fx.Node) and source.op == "call_module":
            pairs[str(source.target)] = norm
    if len(pairs) != len(folded):
        missing = sorted(set(folded) - set(pairs.values()))
        raise ValueError(f"could not pair every folded BatchNorm with its convolution ({', '.join(missing[:3])})")
    return pairs
