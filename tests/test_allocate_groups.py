"""Deployment groups: which layers share one format, the knapsack on groups against brute force, and
maps and exports that refuse a group split across formats."""

import itertools
import random

import pytest

from analysis.allocate import (
    Budget, BudgetError, GroupError, apply_groups, default_groups, extreme_picks, glob_groups, pareto_front,
    resolve_groups, solve, suggest,
)
from analysis.config import QuantConfig
from analysis.precision_map import LayerPrecision, MapError, PrecisionMap, map_from_dict
from tests.test_allocate import random_problem

LLAMA = [f"model.layers.{i}.{part}" for i in range(2) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]


def test_llama_names_group_qkv_and_gate_up_per_block():
    groups = default_groups(LLAMA)
    assert groups == [
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
        ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
        ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"),
        ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"),
    ]


def test_gpt2_c_attn_is_one_layer_already_and_is_not_grouped():
    names = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert default_groups(names) == []


def test_moe_experts_of_one_layer_share_a_format_per_projection():
    names = [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(2) for e in range(3)
             for p in ("gate_proj", "up_proj", "down_proj")]
    groups = default_groups(names)
    assert len(groups) == 4  # per MoE layer: gate+up of all experts, down of all experts
    first = set(groups[0])
    assert first == {f"model.layers.0.mlp.experts.{e}.{p}" for e in range(3) for p in ("gate_proj", "up_proj")}
    assert set(groups[1]) == {f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(3)}
    mixtral = [f"model.layers.0.block_sparse_moe.experts.{e}.{w}" for e in range(4) for w in ("w1", "w2", "w3")]
    assert sorted(map(len, default_groups(mixtral))) == [4, 8]  # w2 of all experts; w1+w3 of all experts


def test_custom_globs_win_over_defaults_and_no_groups_drops_defaults():
    custom = ["model.layers.0.self_attn.*"]
    groups = resolve_groups(LLAMA, defaults=True, globs=custom)
    assert groups[0] == tuple(n for n in LLAMA if n.startswith("model.layers.0.self_attn."))
    assert not any(set(g) < set(groups[0]) for g in groups[1:])  # the default q/k/v group of block 0 is absorbed
    assert len(groups) == 1 + 3  # custom + block 0 gate/up + block 1 q/k/v and gate/up
    assert resolve_groups(LLAMA, defaults=False, globs=custom) == groups[:1]
    assert resolve_groups(LLAMA, defaults=False) == []


@pytest.mark.parametrize("globs,needle", [(["nothing.*"], "matches no layer"),
                                          (["model.layers.0.*", "*.q_proj"], "disjoint")])
def test_bad_globs_are_one_line_errors(globs, needle):
    with pytest.raises(GroupError) as info:
        glob_groups(LLAMA, globs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def grouped_problem(seed):
    rng = random.Random(seed)
    problem = random_problem(rng, rng.randint(4, 7))
    names = [layer.name for layer in problem.layers]
    shuffled = rng.sample(names, len(names))
    groups = [tuple(shuffled[:2]), tuple(shuffled[2:4])] if len(names) >= 6 else [tuple(shuffled[:3])]
    return rng, apply_groups(problem, groups)


def consistent(problem, picks):
    return all(len({picks[i] for i in group}) == 1 for group in problem.groups)


@pytest.mark.parametrize("seed", range(10))
def test_knapsack_on_groups_matches_brute_force_over_group_consistent_maps(seed):
    rng, problem = grouped_problem(seed)
    kind = rng.choice(["avg-bits", "size-kb", "bops"])
    low = problem.totals(extreme_picks(problem, kind, True))[kind]
    high = problem.totals(extreme_picks(problem, kind, False))[kind]
    limit = rng.uniform(low, high)
    picks = solve(problem, kind, limit)
    space = [list(p) for p in itertools.product(*[range(len(ch)) for ch in problem.choices])]
    feasible = [p for p in space if consistent(problem, p) and problem.totals(p)[kind] <= limit + 1e-9]
    assert consistent(problem, picks)
    assert problem.totals(picks)[kind] <= limit + 1e-6
    assert problem.totals(picks)["noise"] == pytest.approx(min(problem.totals(p)["noise"] for p in feasible), rel=1e-6)
    for cheapest in (True, False):
        assert consistent(problem, extreme_picks(problem, kind, cheapest))


def test_suggestion_search_and_front_keep_groups_together():
    _, problem = grouped_problem(3)
    limit = (problem.totals(extreme_picks(problem, "avg-bits", True))["avg-bits"]
             + problem.totals(extreme_picks(problem, "avg-bits", False))["avg-bits"]) / 2
    seen = []

    def measure(assignment):  # non-additive, so the measured search moves
        picks = [next(i for i, c in enumerate(ch) if (c.weight, c.act) == assignment[l.name])
                 for l, ch in zip(problem.layers, problem.choices)]
        seen.append(picks)
        return {"noise": problem.totals(picks)["noise"] * (1 + picks.count(2))}

    suggestion = suggest(problem, Budget("avg-bits", limit), measure=measure, evaluations=20)
    assert seen and all(consistent(problem, p) for p in seen)
    assert suggestion.groups == problem.group_names()
    assert [tuple(g) for g in suggestion.map.groups] == problem.group_names()
    for point in pareto_front(problem, "avg-bits", points=8, measure=measure):
        names = point.map.groups
        assert names and all(len({point.map.precision(n) for n in g}) == 1 for g in names)


def test_a_group_without_a_shared_precision_is_refused():
    problem = random_problem(random.Random(0), 3)
    problem.choices[1] = [c for c in problem.choices[1] if c.precision.weight.startswith("int8")]
    problem.choices[0] = [c for c in problem.choices[0] if c.precision.weight.startswith("int4")]
    with pytest.raises(BudgetError, match="no precision all its layers"):
        apply_groups(problem, [("l0", "l1")])


def test_map_groups_round_trip_and_old_maps_load():
    pmap = PrecisionMap({"a.q_proj": LayerPrecision("int4"), "a.k_proj": LayerPrecision("int4")},
                        groups=(("a.q_proj", "a.k_proj"), "b.*"))
    again = map_from_dict(pmap.to_dict())
    assert again == pmap and again.groups == (("a.q_proj", "a.k_proj"), "b.*")
    old = map_from_dict({k: v for k, v in pmap.to_dict().items() if k != "groups"})
    assert old.groups == ()


def test_a_map_whose_group_members_differ_is_refused():
    payload = PrecisionMap({"a.q_proj": LayerPrecision("int4"), "a.k_proj": LayerPrecision("int8")}).to_dict()
    with pytest.raises(MapError, match="must share one format") as info:
        map_from_dict({**payload, "groups": [["a.q_proj", "a.k_proj"]]})
    assert "\n" not in str(info.value)
    # A glob group is checked against the model's layers (what every consumer calls).
    globbed = map_from_dict({**payload, "groups": ["a.*"]})
    with pytest.raises(MapError, match="must share one format"):
        globbed.validate(["a.q_proj", "a.k_proj", "b"])
    with pytest.raises(MapError, match="matches no layer"):
        map_from_dict({**payload, "layers": {}, "groups": ["z.*"]}).validate(["a.q_proj"])


def test_exports_refuse_a_map_that_splits_a_group():
    import torch

    from analysis.export.compressed_tensors import compressed_tensors_config
    from analysis.export.modelopt import modelopt_quant_cfg

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    split = PrecisionMap({"0": LayerPrecision("int4"), "1": LayerPrecision("int8")}, quant=QuantConfig(),
                         groups=("*",))
    for export in (compressed_tensors_config, modelopt_quant_cfg):
        with pytest.raises(MapError, match="must share one format"):
            export(split, model)
    together = PrecisionMap({"0": LayerPrecision("int4"), "1": LayerPrecision("int4")}, groups=("*",))
    assert compressed_tensors_config(together, model) and modelopt_quant_cfg(together, model)
