"""Deployment groups: layers a runtime executes as one kernel, so they must share one format.

Fused attention runs q, k and v as one GEMM (GPT-2's `c_attn` is already one layer), gated MLPs fuse
gate and up, and a mixture-of-experts layer runs the same projection of all its experts as one
grouped GEMM. The allocator makes one decision per group: `default_groups(names)` finds the known
patterns by layer name, `glob_groups(names, globs)` makes one group of the layers each glob matches
(a custom group wins over a default one), and `resolve_groups` combines the two the way `suggest`
does (`--no-groups` drops the defaults, `--group GLOB` adds custom ones).

A group is a tuple of layer names in model order; only groups of two or more layers are returned.
"""

from __future__ import annotations

import fnmatch
import re

# (pattern, replacement): layers whose names rewrite to the same key form one group. Applied in
# order, each to the previous result, so the experts of one MoE layer and their gate/up
# projections collapse into one key.
DEFAULT_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"^(.*\.experts)\.\d+\.(.*)$", r"\1.*.\2"),  # the experts of one MoE layer: one grouped GEMM
    (r"^(.*)\.(q_proj|k_proj|v_proj)$", r"\1.{q,k,v}_proj"),  # fused QKV (Llama, Mistral, Qwen, OPT)
    (r"^(.*)\.(query|key|value)$", r"\1.{query,key,value}"),  # fused QKV (BERT-style names)
    (r"^(.*)\.(gate_proj|up_proj)$", r"\1.{gate,up}_proj"),  # fused gate/up of a gated MLP
    (r"^(.*\.experts\.\*)\.(w1|w3)$", r"\1.{w1,w3}"),  # Mixtral experts: w1 = gate, w3 = up
)


class GroupError(ValueError):
    """A group specification that cannot be used (one line)."""


def group_key(name: str) -> str:
    """The name with every default pattern applied: layers with equal keys belong together."""
    key = name
    for pattern, replacement in DEFAULT_PATTERNS:
        key = re.sub(pattern, replacement, key)
    return key


def default_groups(layer_names: list[str]) -> list[tuple[str, ...]]:
    """The groups the known fused-kernel patterns impose on these layers (model order kept)."""
    by_key: dict[str, list[str]] = {}
    for name in layer_names:
        by_key.setdefault(group_key(name), []).append(name)
    return [tuple(members) for members in by_key.values() if len(members) > 1]


def glob_groups(layer_names: list[str], globs: list[str] | tuple[str, ...]) -> list[tuple[str, ...]]:
    """One group per glob: the layers it matches. A glob matching no layer, or a layer matched by two
    globs, is refused."""
    groups, owner = [], {}
    for glob in globs:
        members = tuple(name for name in layer_names if fnmatch.fnmatchcase(name, glob))
        if not members:
            hint = ", ".join(layer_names[:4]) + (", ..." if len(layer_names) > 4 else "")
            raise GroupError(f"group {glob!r} matches no layer; layer names look like {hint}")
        for name in members:
            if name in owner:
                raise GroupError(f"layer {name} is matched by groups {owner[name]!r} and {glob!r}; "
                                 "make the globs disjoint")
            owner[name] = glob
        if len(members) > 1:
            groups.append(members)
    return groups


def resolve_groups(layer_names: list[str], defaults: bool = True,
                   globs: list[str] | tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Custom groups (one per glob) plus, unless `defaults` is False, the default groups of the
    layers no glob claimed."""
    custom = glob_groups(layer_names, globs)
    claimed = {name for group in custom for name in group}
    if not defaults:
        return custom
    rest = [name for name in layer_names if name not in claimed]
    return custom + default_groups(rest)


def expand_groups(entries: list, layer_names: list[str]) -> list[tuple[str, ...]]:
    """A map's `groups` (each a list of layer names or a glob string) as tuples of layer names."""
    out = []
    for entry in entries:
        if isinstance(entry, str):
            out.extend(glob_groups(layer_names, [entry]))
        else:
            out.append(tuple(entry))
    return out
