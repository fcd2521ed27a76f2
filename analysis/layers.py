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

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from analysis.graph import PreparedModel

ActFn = Callable[[int, torch.Tensor], torch.Tensor]  # (activation input index, value) -> quantized value

_MODULE_KINDS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding,
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


class Site:
    """How one graph node of a layer computes its value under a quantization trial."""

    def __init__(self, layer_name: str, node: torch.fx.Node, weight: torch.Tensor) -> None:
        self.layer_name = layer_name
        self.node = node
        self.weight = weight

    def activation_inputs(self, gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The FP32 tensors activation quantization would see at this site."""
        raise NotImplementedError

    def run(self, gm: torch.fx.GraphModule, args: tuple, kwargs: dict,
            weight: torch.Tensor | None, act: ActFn | None) -> Any:
        raise NotImplementedError

    def local(self, gm: torch.fx.GraphModule, args: tuple, kwargs: dict,
              weight: torch.Tensor | None, act: ActFn | None, value: Any) -> torch.Tensor:
        """The layer's own output (what local error compares), given this site's node value."""
        return value

    def macs(self, args: tuple, kwargs: dict, value: Any) -> int:
        raise NotImplementedError


def _linear_macs(out: torch.Tensor, weight: torch.Tensor) -> int:
    return out.numel() // max(out.shape[0], 1) * weight.shape[-1] if out.dim() else 0


def _conv_macs(out: torch.Tensor, weight: torch.Tensor, transposed: bool, inp: torch.Tensor) -> int:
    if transposed:  # every input element is multiplied into (C_out/groups × kernel) outputs
        return inp.numel() // max(inp.shape[0], 1) * (weight.numel() // weight.shape[0])
    return out.numel() // max(out.shape[0], 1) * (weight.numel() // weight.shape[0])


class ModuleSite(Site):
    """A call of an nn.Linear / Conv / ConvTranspose / Embedding module."""

    def __init__(self, layer_name: str, node: torch.fx.Node, module: nn.Module) -> None:
        super().__init__(layer_name, node, module.weight)
        self.module = module
        self.is_embedding = isinstance(module, nn.Embedding)

    def activation_inputs(self, gm, args, kwargs):
        return [] if self.is_embedding else [args[0]]

    def run(self, gm, args, kwargs, weight, act):
        if act is not None and not self.is_embedding:
            args = (act(0, args[0]),) + tuple(args[1:])
        if weight is None:
            return self.module(*args, **kwargs)
        return torch.func.functional_call(self.module, {"weight": weight}, args, kwargs)

    def macs(self, args, kwargs, value):
        if self.is_embedding:
            return 0
        if isinstance(self.module, nn.Linear):
            return _linear_macs(value, self.weight)
        transposed = isinstance(self.module, nn.modules.conv._ConvTransposeNd)
        return _conv_macs(value, self.weight, transposed, args[0])


# (op) -> (activation arg index or None, weight arg index, transposed convolution?)
def _function_table() -> dict[Any, tuple[int | None, int, bool]]:
    aten = torch.ops.aten
    table: dict[Any, tuple[int | None, int, bool]] = {
        F.linear: (0, 1, False), F.conv1d: (0, 1, False), F.conv2d: (0, 1, False), F.conv3d: (0, 1, False),
        F.conv_transpose1d: (0, 1, True), F.conv_transpose2d: (0, 1, True), F.conv_transpose3d: (0, 1, True),
        F.embedding: (None, 1, False),
        aten.linear.default: (0, 1, False),
        aten.conv1d.default: (0, 1, False), aten.conv2d.default: (0, 1, False), aten.conv3d.default: (0, 1, False),
        aten.embedding.default: (None, 0, False),
    }
    for name in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        op = getattr(aten, name, None)
        if op is not None and hasattr(op, "input"):
            table[op.input] = (0, 1, True)
    return table


_FUNCTION_TABLE = _function_table()
_WEIGHT_KWARG = {F.embedding: "weight", F.linear: "weight"}


class FunctionSite(Site):
    """A functional call (F.linear, aten.conv2d, ...) whose weight argument is a model parameter."""

    def __init__(self, layer_name: str, node: torch.fx.Node, weight: torch.Tensor) -> None:
        super().__init__(layer_name, node, weight)
        self.act_index, self.weight_index, self.transposed = _FUNCTION_TABLE[node.target]

    def activation_inputs(self, gm, args, kwargs):
        return [] if self.act_index is None else [args[self.act_index]]

    def run(self, gm, args, kwargs, weight, act):
        args = list(args)
        if act is not None and self.act_index is not None:
            args[self.act_index] = act(0, args[self.act_index])
        if weight is not None:
            args[self.weight_index] = weight
        return self.node.target(*args, **kwargs)

    def macs(self, args, kwargs, value):
        if self.act_index is None:
            return 0
        name = getattr(self.node.target, "__name__", str(self.node.target))
        if "linear" in name:
            return _linear_macs(value, self.weight)
        return _conv_macs(value, self.weight, self.transposed, args[self.act_index])


class AttentionInProjSite(Site):
    """The packed query/key/value projection of nn.MultiheadAttention (its raw `in_proj_weight`).

    The projection is not a module, so hooks never see it; we run the attention module with the
    weight overridden and compute the projections themselves for the local view.
    """

    def __init__(self, layer_name: str, node: torch.fx.Node, module: nn.MultiheadAttention) -> None:
        super().__init__(layer_name, node, module.in_proj_weight)
        self.module = module

    def _qkv(self, args, kwargs) -> tuple[inspect.BoundArguments, list[torch.Tensor]]:
        bound = inspect.signature(self.module.forward).bind(*args, **kwargs)
        return bound, [bound.arguments["query"], bound.arguments["key"], bound.arguments["value"]]

    def activation_inputs(self, gm, args, kwargs):
        _, qkv = self._qkv(args, kwargs)
        distinct: list[torch.Tensor] = []
        for tensor in qkv:  # self-attention passes the same tensor three times: calibrate it once
            if not any(tensor is seen for seen in distinct):
                distinct.append(tensor)
        return distinct

    def quantized_qkv(self, args, kwargs, act):
        bound, qkv = self._qkv(args, kwargs)
        if act is None:
            return bound, qkv
        distinct = self.activation_inputs(None, args, kwargs)
        quantized = [act(i, t) for i, t in enumerate(distinct)]
        mapped = [quantized[next(i for i, d in enumerate(distinct) if d is t)] for t in qkv]
        bound.arguments["query"], bound.arguments["key"], bound.arguments["value"] = mapped
        return bound, mapped

    def run(self, gm, args, kwargs, weight, act):
        bound, _ = self.quantized_qkv(args, kwargs, act)
        if weight is None:
            return self.module(*bound.args, **bound.kwargs)
        return torch.func.functional_call(self.module, {"in_proj_weight": weight}, bound.args, bound.kwargs)

    def local(self, gm, args, kwargs, weight, act, value):
        _, (q, k, v) = self.quantized_qkv(args, kwargs, act)
        w = self.weight if weight is None else weight
        bias = self.module.in_proj_bias
        w_chunks = w.chunk(3)
        b_chunks = bias.chunk(3) if bias is not None else (None, None, None)
        parts = [F.linear(x, wc, bc).reshape(-1) for x, wc, bc in zip((q, k, v), w_chunks, b_chunks)]
        return torch.cat(parts)

    def macs(self, args, kwargs, value):
        _, qkv = self._qkv(args, kwargs)
        embed = self.module.embed_dim
        return sum(t.numel() // t.shape[0 if self.module.batch_first else 1] * embed for t in qkv)


class AttentionOutProjSite(Site):
    """The output projection of nn.MultiheadAttention.

    PyTorch calls it through `F.multi_head_attention_forward` with `out_proj.weight`, so the module
    `out_proj` never runs and its input (the attention context) is never visible. Running attention
    with an identity output projection yields exactly that context; the projection is then ours to
    quantize. Exact because the projection is the last, linear step of attention.
    """

    def __init__(self, layer_name: str, node: torch.fx.Node, module: nn.MultiheadAttention) -> None:
        super().__init__(layer_name, node, module.out_proj.weight)
        self.module = module

    def _context(self, args, kwargs) -> torch.Tensor:
        eye = torch.eye(self.module.embed_dim, dtype=self.weight.dtype, device=self.weight.device)
        zeros = torch.zeros(self.module.embed_dim, dtype=self.weight.dtype, device=self.weight.device)
        overrides = {"out_proj.weight": eye}
        if self.module.out_proj.bias is not None:
            overrides["out_proj.bias"] = zeros
        return torch.func.functional_call(self.module, overrides, args, kwargs)[0]

    def activation_inputs(self, gm, args, kwargs):
        return [self._context(args, kwargs)]

    def run(self, gm, args, kwargs, weight, act):
        if weight is None and act is None:
            return self.module(*args, **kwargs)
        reference = self.module(*args, **kwargs)
        context = self._context(args, kwargs)
        if act is not None:
            context = act(0, context)
        out = F.linear(context, self.weight if weight is None else weight, self.module.out_proj.bias)
        return (out,) + tuple(reference[1:])

    def local(self, gm, args, kwargs, weight, act, value):
        return value[0]

    def macs(self, args, kwargs, value):
        out = value[0]
        batch = out.shape[0 if self.module.batch_first else 1]
        return out.numel() // max(batch, 1) * self.module.embed_dim


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
            if isinstance(module, nn.MultiheadAttention):
                if not module._qkv_same_embed_dim:
                    continue  # reported as skipped below
                add(module.in_proj_weight, f"{node.target}.in_proj", "MultiheadAttention.in_proj",
                    lambda n, node=node, m=module: AttentionInProjSite(n, node, m),
                    bias=module.in_proj_bias, axis=0)
                add(module.out_proj.weight, f"{node.target}.out_proj", "MultiheadAttention.out_proj",
                    lambda n, node=node, m=module: AttentionOutProjSite(n, node, m),
                    bias=module.out_proj.bias, axis=0)
            elif isinstance(module, _MODULE_KINDS):
                transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
                add(module.weight, node.target, type(module).__name__,
                    lambda n, node=node, m=module: ModuleSite(n, node, m),
                    bias=getattr(module, "bias", None), axis=1 if transposed else 0,
                    embedding=isinstance(module, nn.Embedding))
        elif node.op == "call_function" and node.target in _FUNCTION_TABLE:
            _, weight_index, transposed = _FUNCTION_TABLE[node.target]
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
            bias_arg = node.args[weight_index + 1] if len(node.args) > weight_index + 1 else None
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
            if isinstance(module, nn.MultiheadAttention) and not module._qkv_same_embed_dim:
                skipped.append(SkippedLayer(name, kind, "attention with separate q/k/v projection weights is not supported yet; it stays FP32"))
            elif isinstance(module, _MODULE_KINDS + (nn.MultiheadAttention,)):
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
