"""The allocator against brute force, budgets, monotonicity, and the cost model by hand."""

import itertools
import math
import random

import pytest

from analysis import costs
from analysis.allocate import (
    Budget, BudgetError, Choice, Problem, _monotone, extreme_picks, pareto_front, parse_budget, solve, suggest,
)
from analysis.formats import parse_format
from analysis.layers import Layer
from analysis.precision_map import LayerPrecision


def layer(name, out=16, inp=32, macs=512, bias=True):
    return Layer(name, "Linear", out * inp + (out if bias else 0), (out, inp), 0, (name,), macs=macs)


def random_problem(rng, n_layers, formats=("int8", "int4", "int2")):
    layers = [layer(f"l{i}", out=rng.choice([8, 16, 32]), inp=rng.choice([16, 64])) for i in range(n_layers)]
    total = sum(costs.weight_elements(l) for l in layers)
    choices = []
    for l in layers:
        row = []
        for fmt in formats:
            f = parse_format(fmt)
            noise = rng.uniform(0.1, 1.0) * 4.0 ** (8 - f.bits) * 1e-4
            row.append(Choice(LayerPrecision(fmt), f, None, noise, {
                "avg-bits": costs.weight_elements(l) * f.bits / total,
                "size-kb": costs.weight_bytes(l, f) / 1024, "bops": float(costs.bops(l, f, None))}))
        choices.append(row)
    return Problem(layers, choices, signal=1.0, total_elements=total)


@pytest.mark.parametrize("seed", range(12))
def test_solver_matches_brute_force_on_random_instances(seed):
    rng = random.Random(seed)
    problem = random_problem(rng, rng.randint(2, 6))
    kind = rng.choice(["avg-bits", "size-kb", "bops"])
    low = problem.totals(extreme_picks(problem, kind, True))[kind]
    high = problem.totals(extreme_picks(problem, kind, False))[kind]
    limit = rng.uniform(low, high)
    picks = solve(problem, kind, limit)
    space = itertools.product(*[range(len(ch)) for ch in problem.choices])
    feasible = [p for p in space if problem.totals(list(p))[kind] <= limit + 1e-9]
    best = min(problem.totals(list(p))["noise"] for p in feasible)
    assert problem.totals(picks)[kind] <= limit + 1e-6
    assert problem.totals(picks)["noise"] == pytest.approx(best, rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_noise_floor_gives_the_cheapest_map_under_the_floor(seed):
    rng = random.Random(100 + seed)
    problem = random_problem(rng, 4)
    limit = rng.uniform(1e-4, 5e-3)
    picks = solve(problem, "avg-bits", limit, minimize="cost")
    space = list(itertools.product(*[range(len(ch)) for ch in problem.choices]))
    feasible = [p for p in space if problem.totals(list(p))["noise"] <= limit]
    if not feasible:
        assert picks is None
        return
    cheapest = min(problem.totals(list(p))["avg-bits"] for p in feasible)
    assert problem.totals(picks)["avg-bits"] == pytest.approx(cheapest)


def test_monotone_scores_never_reward_fewer_bits():
    l = layer("a")
    mk = lambda fmt, noise: Choice(LayerPrecision(fmt), parse_format(fmt), None, noise, {})
    fixed = _monotone([mk("int8", 0.5), mk("int4", 0.2), mk("int2", 0.9)])  # int8 measured worse than int4
    noise = {c.precision.weight: c.noise for c in fixed}
    assert noise == {"int8": 0.2, "int4": 0.2, "int2": 0.9}


def test_budget_that_cannot_be_met_returns_the_cheapest_map_and_says_why():
    problem = random_problem(random.Random(1), 3)
    suggestion = suggest(problem, Budget("avg-bits", 1.0))
    assert suggestion.totals["avg-bits"] == pytest.approx(2.0)
    assert any("cannot be met" in note for note in suggestion.notes)


def test_measured_refinement_replaces_a_map_whose_joint_error_is_underpredicted():
    problem = random_problem(random.Random(3), 3)
    limit = problem.totals(extreme_picks(problem, "avg-bits", True))["avg-bits"] + 2.0
    chosen = solve(problem, "avg-bits", limit)

    def measure(assignment):  # the chosen map interacts badly: 50× its additive noise
        picks = [next(i for i, c in enumerate(ch) if (c.weight, c.act) == assignment[l.name])
                 for l, ch in zip(problem.layers, problem.choices)]
        noise = problem.totals(picks)["noise"]
        return {"noise": noise * (50.0 if picks == chosen else 1.0)}

    suggestion = suggest(problem, Budget("avg-bits", limit), measure=measure)
    assert suggestion.picks != chosen and suggestion.evaluations > 1
    assert suggestion.totals["avg-bits"] <= limit + 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_k_best_lists_the_best_feasible_maps_in_order(seed):
    from analysis.allocate import k_best

    rng = random.Random(200 + seed)
    problem = random_problem(rng, 4)
    limit = problem.totals(extreme_picks(problem, "avg-bits", True))["avg-bits"] + 3.0
    found = k_best(problem, "avg-bits", limit, 5)
    space = itertools.product(*[range(len(ch)) for ch in problem.choices])
    feasible = sorted(problem.totals(list(p))["noise"] for p in space if problem.totals(list(p))["avg-bits"] <= limit + 1e-9)
    assert [problem.totals(p)["noise"] for p in found] == pytest.approx(feasible[:5], rel=1e-6)
    assert len({tuple(p) for p in found}) == len(found)


def test_refinement_prefers_the_smaller_metric_drop_over_smaller_noise():
    problem = random_problem(random.Random(9), 3)
    limit = problem.totals(extreme_picks(problem, "avg-bits", True))["avg-bits"] + 2.0
    best = solve(problem, "avg-bits", limit)

    def measure(assignment):  # the least-noise map happens to lose the most accuracy
        picks = [next(i for i, c in enumerate(ch) if (c.weight, c.act) == assignment[l.name])
                 for l, ch in zip(problem.layers, problem.choices)]
        return {"noise": problem.totals(picks)["noise"], "drop": 2.0 if picks == best else 0.5}

    suggestion = suggest(problem, Budget("avg-bits", limit), measure=measure)
    assert suggestion.picks != best and suggestion.measured["drop"] == 0.5


def test_pareto_front_is_monotone_in_cost_and_noise():
    problem = random_problem(random.Random(5), 5)
    front = pareto_front(problem, "avg-bits", points=10)
    bits = [p.costs["avg-bits"] for p in front]
    sqnr = [p.predicted_sqnr_db for p in front]
    assert bits == sorted(bits) and sqnr == sorted(sqnr) and len(front) >= 3


@pytest.mark.parametrize("text,kind,value", [("avg-bits=5.5", "avg-bits", 5.5), ("size-kb = 120", "size-kb", 120.0),
                                             ("bops=1e9", "bops", 1e9), ("min-sqnr=-3", "min-sqnr", -3.0)])
def test_budgets_parse(text, kind, value):
    assert parse_budget(text) == Budget(kind, value)


@pytest.mark.parametrize("text", ["avg-bitz=4", "avg-bits", "avg-bits=-1", "size-kb=nan", ""])
def test_bad_budgets_are_one_line_errors(text):
    with pytest.raises(BudgetError) as info:
        parse_budget(text)
    assert "\n" not in str(info.value)


def test_costs_by_hand():
    l = layer("fc", out=4, inp=8, macs=32)  # 32 weights + 4 biases
    int4 = parse_format("int4")  # per-channel symmetric: 4 fp16 scales
    assert costs.weight_bits_total(l, int4) == 32 * 4 + 4 * 16 + 4 * 32
    asym = parse_format("int8-asym")  # + 4 one-byte zero points
    assert costs.weight_bits_total(l, asym) == 32 * 8 + 4 * 16 + 4 * 8 + 4 * 32
    grouped = parse_format("int4-g4")  # 8 groups of 4
    assert costs.scale_count(l, grouped) == 8
    assert costs.weight_bytes(l, None) == (32 + 4) * 4
    assert costs.bops(l, int4, parse_format("int8", "activation")) == 32 * 4 * 8
    total = costs.model_cost([l, layer("g", out=4, inp=8)], {"fc": (int4, None)})
    assert total.avg_weight_bits == pytest.approx((32 * 4 + 32 * 32) / 64)
