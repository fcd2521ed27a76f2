"""Call sites: running one layer at one graph node with a quantized weight or input, and composing
those runs into graph-node overrides.

A layer (see `analysis.layers`) runs at one or more graph nodes, its *sites*: a module called twice,
an embedding tied to the LM head. Each site kind knows how to run its node with a replacement weight
and an input quantizer (`run`), what its local output is (`local`), which tensors it consumes
(`activation_inputs`) and its multiply-accumulates (`macs`). To run a layer quantized, the simulator
replaces how its node computes: `compose_override` builds that function. Two layers can share one
node — nn.MultiheadAttention's packed in-projection and its output projection are both computed
inside the attention call — and then both quantizations apply in one call.

Activation quantization applies to a site's *input* (the tensor that enters the matmul), which is
what an integer kernel consumes.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

ActFn = Callable[[int, torch.Tensor], torch.Tensor]  # (activation input index, value) -> quantized value


class Site:
    """How one graph node of a layer computes its value under a quantization trial.

    `reduction_axis`: the axis of the activation input that the layer's matmul reduces over (the
    features of a linear input, the channels of a convolution's), along which block formats
    (MX, NVFP4) quantize the input in blocks at run time."""

    reduction_axis = -1

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
        if isinstance(module, nn.modules.conv._ConvNd):
            self.reduction_axis = 1

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
        # x @ W + b with W stored [in, out] (Hugging Face's Conv1D in GPT-2): the output channels are
        # the weight's axis 1, as for transposed convolutions.
        torch.addmm: (1, 2, True), aten.addmm.default: (1, 2, True),
    }
    for name in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        op = getattr(aten, name, None)
        if op is not None and hasattr(op, "input"):
            table[op.input] = (0, 1, True)
    return table


FUNCTION_TABLE = _function_table()
# Where the bias is, when it is not the argument after the weight.
FUNCTION_BIAS_INDEX = {torch.addmm: 0, torch.ops.aten.addmm.default: 0}
_WEIGHT_KWARG = {F.embedding: "weight", F.linear: "weight"}


class FunctionSite(Site):
    """A functional call (F.linear, aten.conv2d, ...) whose weight argument is a model parameter."""

    def __init__(self, layer_name: str, node: torch.fx.Node, weight: torch.Tensor) -> None:
        super().__init__(layer_name, node, weight)
        self.act_index, self.weight_index, self.transposed = FUNCTION_TABLE[node.target]
        if "conv" in getattr(node.target, "__name__", str(node.target)):
            self.reduction_axis = 1

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
        if "addmm" in name:  # [rows, in] @ [in, out], the batch flattened into rows: MACs are
            # measured on a one-sample batch (QuantSim._measure_macs), so every row is this sample's
            return value.numel() * self.weight.shape[0]
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



def compose_override(site: Site, gm: torch.fx.GraphModule, weight: Any, act: ActFn | None,
                     previous: Any) -> Callable:
    """A node override running `site` quantized; `weight` is a tensor, a zero-argument callable
    returning one (resolved when the node runs), or None; `previous` is the node's earlier override."""
    parts = list(getattr(previous, "parts", [])) + [(site, weight, act)] if previous is not None else [(site, weight, act)]

    def override(node, args, kwargs):
        resolved = [(s, w() if callable(w) else w, a) for s, w, a in parts]
        if len(resolved) == 1:
            s, w, a = resolved[0]
            return s.run(gm, args, kwargs, w, a)
        return _run_attention_pair(resolved, args, kwargs)

    override.parts = parts  # type: ignore[attr-defined]
    return override


def _run_attention_pair(parts: list, args: tuple, kwargs: dict) -> Any:
    in_part = next((p for p in parts if isinstance(p[0], AttentionInProjSite)), None)
    out_part = next((p for p in parts if isinstance(p[0], AttentionOutProjSite)), None)
    if in_part is None or out_part is None or len(parts) != 2:
        raise RuntimeError("two quantized layers share one graph node in an unsupported way")
    in_site, in_w, in_act = in_part
    out_site, out_w, out_act = out_part
    bound, _ = in_site.quantized_qkv(args, kwargs, in_act)
    module = in_site.module
    overrides = {} if in_w is None else {"in_proj_weight": in_w}
    like = out_site.weight
    # An identity output projection yields the attention context, which is ours to quantize.
    context_overrides = dict(overrides, **{"out_proj.weight": torch.eye(module.embed_dim, dtype=like.dtype,
                                                                        device=like.device)})
    if module.out_proj.bias is not None:
        context_overrides["out_proj.bias"] = torch.zeros(module.embed_dim, dtype=like.dtype, device=like.device)
    reference = torch.func.functional_call(module, overrides, bound.args, bound.kwargs)
    context = torch.func.functional_call(module, context_overrides, bound.args, bound.kwargs)[0]
    if out_act is not None:
        context = out_act(0, context)
    out = torch.nn.functional.linear(context, like if out_w is None else out_w, module.out_proj.bias)
    return (out,) + tuple(reference[1:])
