"""Find the quantizable layers of a prepared model, and run one of them with a quantized weight or input.

A *layer* is one weight tensor that gets one format: an `nn.Linear`, a convolution, an embedding, one
of the two projections inside `nn.MultiheadAttention`, or a functional call (`F.linear(x, self.w)`,
an exported program's `aten.linear`) whose weight is a model parameter. A layer can execute at
several graph nodes — a module called twice, or an embedding whose weight is tied to the LM head — and
each such place is a *site*. Everything that holds weights but is not analysed is reported as a
`SkippedLayer` with the reason, never silently dropped.

Activation quantization applies to a layer's *input* (the tensor that enters the matmul), which is
what an integer kernel consumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
from torch import nn

from analysis.graph import PreparedModel

from analysis.sites import (  # noqa: F401 — re-exported: the site kinds are part of the layer table's API
    FUNCTION_BIAS_INDEX, FUNCTION_TABLE, ActFn, AttentionInProjSite, AttentionOutProjSite, FunctionSite, ModuleSite, Site,
)

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
if hasattr(nn, "RMSNorm"):
    _NORMS = _NORMS + (nn.RMSNorm,)


@dataclass(frozen=True)
class Layer:
    """One quantizable weight and where it runs."""

    name: str  # module qualified name; "<mha>.in_proj" for attention's packed QKV weight
    kind: str  # "Linear", "Conv2d", "Embedding", "MultiheadAttention.in_proj", ...
    params: int  # weight + bias elements, counted once however often the weight is shared
    weight_shape: tuple[int, ...]
    channel_axis: int  # the output-channel axis of the weight (1 for transposed convolutions)
    sites: tuple[str, ...]  # graph node names where the layer executes
    aliases: tuple[str, ...] = ()  # other module names that share (tie) this weight
    quantizable_input: bool = True  # False for embeddings: their inputs are integer indices
    macs: int = 0  # multiply-accumulates per sample, measured on the calibration data


@dataclass(frozen=True)
class SkippedLayer:
    name: str
    kind: str
    reason: str


# --- the layer-kind registry ----------------------------------------------------------------------
#
# A module type becomes layers through a registered `LayerKind`; supporting a new kind of module is
# one `register_layer_kind(...)` call (in any module imported before discovery), not an edit here.


@dataclass(frozen=True)
class Found:
    """One weight a module contributes: the tensor (identity ties shared weights), the layer name,
    its kind, how to build its site at a node, the bias, the output-channel axis, and whether its
    input is integer indices (embeddings)."""

    weight: torch.Tensor
    name: str
    kind: str
    site: Callable[[str], Site]
    bias: torch.Tensor | None = None
    axis: int = 0
    embedding: bool = False


@dataclass(frozen=True)
class LayerKind:
    name: str
    matches: Callable[[nn.Module], bool]
    discover: Callable[[torch.fx.Node, nn.Module], list[Found]]
    # Why a matching module is not analysed (None: it is); reported as a skipped layer.
    unsupported: Callable[[nn.Module], str | None] = lambda module: None


LAYER_KINDS: list[LayerKind] = []


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Add (or replace, by name) a layer kind; later registrations are tried first."""
    LAYER_KINDS[:] = [k for k in LAYER_KINDS if k.name != kind.name]
    LAYER_KINDS.insert(0, kind)
    return kind


def layer_kind_for(module: nn.Module) -> LayerKind | None:
    return next((kind for kind in LAYER_KINDS if kind.matches(module)), None)


_STANDARD_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding,
)


def _standard(node: torch.fx.Node, module: nn.Module) -> list[Found]:
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    return [Found(module.weight, node.target, type(module).__name__,
                  lambda n, node=node, m=module: ModuleSite(n, node, m), getattr(module, "bias", None),
                  1 if transposed else 0, isinstance(module, nn.Embedding))]


def _attention(node: torch.fx.Node, module: nn.Module) -> list[Found]:
    if not module._qkv_same_embed_dim:
        return []  # reported as skipped (see `unsupported`)
    return [
        Found(module.in_proj_weight, f"{node.target}.in_proj", "MultiheadAttention.in_proj",
              lambda n, node=node, m=module: AttentionInProjSite(n, node, m), module.in_proj_bias),
        Found(module.out_proj.weight, f"{node.target}.out_proj", "MultiheadAttention.out_proj",
              lambda n, node=node, m=module: AttentionOutProjSite(n, node, m), module.out_proj.bias),
    ]


register_layer_kind(LayerKind("linear/conv/embedding", lambda m: isinstance(m, _STANDARD_MODULES), _standard))
register_layer_kind(LayerKind(
    "multihead-attention", lambda m: isinstance(m, nn.MultiheadAttention), _attention,
    unsupported=lambda m: None if m._qkv_same_embed_dim else
    "attention with separate q/k/v projection weights is not supported yet; it stays FP32"))


@dataclass
class LayerTable:
    """Discovery result: layers in execution order, their sites, and what was skipped."""

    layers: list[Layer]
    sites: dict[str, list[Site]]  # layer name -> sites in execution order
    skipped: list[SkippedLayer]

    def weight(self, layer: str) -> torch.Tensor:
        return self.sites[layer][0].weight


def _owner_and_param(target: str) -> tuple[str, str]:
    owner, _, param = target.rpartition(".")
    return owner, param


def _layer_name_for_param(target: str) -> str:
    owner, param = _owner_and_param(target)
    if param == "weight":
        return owner or target
    base = param[: -len("_weight")] if param.endswith("_weight") else param
    return f"{owner}.{base}" if owner else base


def _kind_from_meta(node: torch.fx.Node, owner: str, fallback: str) -> str:
    """The module type that made this op in an exported graph (its nn_module_stack), if it is the owner."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, type_name = list(stack.values())[-1]
        if path.split("@")[0] != owner:
            return fallback
        name = getattr(type_name, "__name__", str(type_name)).rsplit(".", 1)[-1]
        return name.strip("'>")
    return fallback


def discover_layers(prepared: PreparedModel) -> LayerTable:
    """Every quantizable weight of the prepared model, in execution order, plus what was skipped."""
    gm = prepared.graph_module
    sites_by_weight: dict[int, list[Site]] = {}
    names_by_weight: dict[int, list[str]] = {}
    kinds: dict[int, str] = {}
    extra: dict[int, dict[str, Any]] = {}
    used_modules: set[str] = set()
    used_params: set[str] = set()

    def add(key_tensor: torch.Tensor, name: str, kind: str, site_factory: Callable[[str], Site], **info: Any) -> None:
        key = key_tensor.untyped_storage().data_ptr() if key_tensor.numel() else id(key_tensor)
        names = names_by_weight.setdefault(key, [])
        if name not in names:
            names.append(name)
        canonical = names[0]
        site = site_factory(canonical)
        sites_by_weight.setdefault(key, []).append(site)
        kinds.setdefault(key, kind)
        extra.setdefault(key, info)
        if kinds[key] != kind and "(tied)" not in kinds[key]:
            kinds[key] = f"{kinds[key]}+{kind} (tied)"

    for node in prepared.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            used_modules.add(node.target)
            kind = layer_kind_for(module)
            for found in kind.discover(node, module) if kind is not None else ():
                add(found.weight, found.name, found.kind, found.site, bias=found.bias, axis=found.axis,
                    embedding=found.embedding)
        elif node.op == "call_function" and node.target in FUNCTION_TABLE:
            _, weight_index, transposed = FUNCTION_TABLE[node.target]
            weight_arg = node.args[weight_index] if len(node.args) > weight_index else node.kwargs.get("weight")
            if not (isinstance(weight_arg, torch.fx.Node) and weight_arg.op == "get_attr"):
                continue  # the weight is computed, not a parameter: nothing to assign a format to
            weight = gm.get_parameter(weight_arg.target) if _is_param(gm, weight_arg.target) else None
            if weight is None:
                continue
            used_params.add(weight_arg.target)
            op_name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            owner, _ = _owner_and_param(weight_arg.target)
            kind = _kind_from_meta(node, owner, op_name)
            bias = None
            bias_index = FUNCTION_BIAS_INDEX.get(node.target, weight_index + 1)
            bias_arg = node.args[bias_index] if len(node.args) > bias_index else None
            if isinstance(bias_arg, torch.fx.Node) and bias_arg.op == "get_attr" and _is_param(gm, bias_arg.target):
                bias = gm.get_parameter(bias_arg.target)
                used_params.add(bias_arg.target)
            add(weight, _layer_name_for_param(weight_arg.target), kind,
                lambda n, node=node, w=weight: FunctionSite(n, node, w),
                bias=bias, axis=1 if transposed else 0, embedding="embedding" in op_name)

    layers: list[Layer] = []
    sites: dict[str, list[Site]] = {}
    for key, site_list in sites_by_weight.items():
        names = names_by_weight[key]
        info = extra[key]
        weight = site_list[0].weight
        bias = info.get("bias")
        layers.append(Layer(
            name=names[0],
            kind=kinds[key],
            params=weight.numel() + (bias.numel() if bias is not None else 0),
            weight_shape=tuple(weight.shape),
            channel_axis=info.get("axis", 0),
            sites=tuple(s.node.name for s in site_list),
            aliases=tuple(names[1:]),
            quantizable_input=not all(_site_is_embedding(s) for s in site_list),
        ))
        sites[names[0]] = site_list
    # Execution order: by the first site's position in the graph.
    node_index = {n.name: i for i, n in enumerate(prepared.nodes)}
    layers.sort(key=lambda layer: node_index[layer.sites[0]])
    return LayerTable(layers, sites, _skipped(prepared, layers, used_modules, used_params))


def _site_is_embedding(site: Site) -> bool:
    if isinstance(site, ModuleSite):
        return site.is_embedding
    if isinstance(site, FunctionSite):
        return site.act_index is None
    return False


def _is_param(gm: torch.fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _skipped(prepared: PreparedModel, layers: list[Layer], used_modules: set[str], used_params: set[str]) -> list[SkippedLayer]:
    gm = prepared.graph_module
    analysed = {layer.name for layer in layers} | {a for layer in layers for a in layer.aliases}
    analysed_weights = {id(prepared_weight) for prepared_weight in _layer_weights(prepared, layers)}
    skipped: list[SkippedLayer] = []
    for name in prepared.folded_batchnorms:
        skipped.append(SkippedLayer(name, "BatchNorm", "folded into the preceding convolution"))
    if prepared.source == "fx":
        gm_params = dict(gm.named_parameters(remove_duplicate=False))
        for name, module in (prepared.eager or gm).named_modules():
            if not name or name in analysed or name in prepared.folded_batchnorms:
                continue
            own_params = [gm_params.get(f"{name}.{p}", t) for p, t in module.named_parameters(recurse=False)]
            kind = type(module).__name__
            layer_kind = layer_kind_for(module)
            reason = layer_kind.unsupported(module) if layer_kind is not None else None
            if reason is not None:
                skipped.append(SkippedLayer(name, kind, reason))
            elif layer_kind is not None:
                if name not in used_modules and not any(id(p) in analysed_weights for p in own_params):
                    skipped.append(SkippedLayer(name, kind, "never called in forward (no graph node uses it)"))
            elif own_params and not any(id(p) in analysed_weights for p in own_params):
                if isinstance(module, _NORMS):
                    skipped.append(SkippedLayer(name, kind, "normalisation layer: stays FP32, as in deployment toolchains"))
                elif name.rpartition(".")[0] + ".in_proj" not in analysed:
                    skipped.append(SkippedLayer(name, kind, f"unsupported layer type {kind}: its weights stay FP32"))
    else:
        owners: dict[str, list[str]] = {}
        for target, param in gm.named_parameters():
            if id(param) in analysed_weights or target in used_params:
                continue
            owner, _ = _owner_and_param(target)
            owners.setdefault(owner, []).append(target)
        for owner in owners:
            skipped.append(SkippedLayer(owner, "parameter", "used by an operation quantlens does not quantize; stays FP32"))
    return skipped


def _layer_weights(prepared: PreparedModel, layers: list[Layer]) -> list[torch.Tensor]:
    """Parameters of analysed layers: their weights ("attn.in_proj_weight" included) and biases."""
    names = {layer.name for layer in layers} | {a for layer in layers for a in layer.aliases}
    return [param for name, param in prepared.graph_module.named_parameters(remove_duplicate=False)
            if _owner_and_param(name)[0] in names or _layer_name_for_param(name) in names]


def weight_coverage(table: LayerTable, gm: torch.nn.Module) -> dict[str, int]:
    """How much of the model's weight matrices (parameters of two or more dimensions: linear, conv,
    embedding and attention weights; norms and biases are vectors) the layer table can analyse, so a
    run on a model quantlens only partly understands says so. Tied weights count once. A property of
    the model, not of a run (a run restricted with `layers` records that in its config)."""
    total = sum(p.numel() for p in {id(p): p for p in gm.parameters()}.values() if p.dim() >= 2)
    analysed = sum({id(table.weight(layer.name)): table.weight(layer.name).numel() for layer in table.layers}.values())
    return {"analysed_weights": int(analysed), "total_weights": int(total)}
