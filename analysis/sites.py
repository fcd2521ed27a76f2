"""Composing quantized call sites into graph-node overrides.

A layer runs at one or more graph nodes (its *sites*, see `analysis.layers`). To run a layer
quantized, the simulator replaces how its node computes: `compose_override` builds that function.
Two layers can share one node — nn.MultiheadAttention's packed in-projection and its output
projection are both computed inside the attention call — and then both quantizations apply in one
call.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from analysis.layers import ActFn, AttentionInProjSite, AttentionOutProjSite, Site


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
