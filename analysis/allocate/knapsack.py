"""The exact knapsack solver: the least-noise (or cheapest) map of an allocation `Problem`.

HiGHS (scipy.optimize.milp) solves the multiple-choice knapsack exactly in milliseconds, unlike
the greedy sensitivity orderings of AIMET AMP and friends, which can leave budget on the table.
No-good cuts give the next-best maps under the same budget (`k_best`), which the measured search
evaluates when single-layer noises stop adding up.

Kept apart from `analysis.allocate.search` so the solver stays a pure function of the problem:
it knows nothing of measurements or budgets' meanings, and the search builds on it, never the
other way round.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from analysis.allocate.problem import Problem


def solve(problem: Problem, kind: str, limit: float, minimize: str = "noise",
          exclude: list[list[int]] | None = None, weights: list[float] | None = None,
          fixed: dict[int, int] | None = None) -> list[int] | None:
    """Exact solution of the knapsack. minimize="noise": least noise with cost ≤ limit;
    minimize="cost": cheapest (in `kind`) with noise ≤ limit. `exclude`: assignments that may not be
    returned (no-good cuts, for the next-best solutions). `weights`: a factor per layer on its noise
    (the measured search's interaction correction); `fixed`: layer -> pick it must keep. Members of
    a deployment group always get the same pick. None when infeasible."""
    sizes = [len(ch) for ch in problem.choices]
    n = sum(sizes)
    factors = weights if weights is not None else [1.0] * len(sizes)
    noise = np.array([c.noise * f for ch, f in zip(problem.choices, factors) for c in ch])
    cost = np.array([c.costs[kind] for ch in problem.choices for c in ch])
    # Scale both rows to O(1): HiGHS tolerances are absolute, and noises can be 1e-12.
    noise_scale = max(float(noise.max()), 1e-30)
    cost_scale = max(float(np.abs(cost).max()), 1e-30)
    one_each = np.zeros((len(sizes), n))
    start = 0
    for row, size in enumerate(sizes):
        one_each[row, start:start + size] = 1
        start += size
    constraints = [LinearConstraint(one_each, 1, 1)]
    if minimize == "noise":
        objective = noise / noise_scale
        # a tiny cost tie-break: among equally noisy maps prefer the cheaper one
        objective = objective + 1e-9 * cost / cost_scale
        constraints.append(LinearConstraint(cost[None, :] / cost_scale, -np.inf, limit / cost_scale + 1e-9))
    else:
        objective = cost / cost_scale + 1e-9 * noise / noise_scale
        constraints.append(LinearConstraint(noise[None, :] / noise_scale, -np.inf, limit / noise_scale + 1e-9))
    offsets = np.cumsum([0] + sizes[:-1])
    for group in problem.groups:  # x[member, c] = x[first, c]: one decision per group
        for member in group[1:]:
            tie = np.zeros((sizes[group[0]], n))
            for c in range(sizes[group[0]]):
                tie[c, offsets[group[0]] + c] = 1
                tie[c, offsets[member] + c] = -1
            constraints.append(LinearConstraint(tie, 0, 0))
    lower, upper = np.zeros(n), np.ones(n)
    for layer, pick in (fixed or {}).items():
        upper[offsets[layer]:offsets[layer] + sizes[layer]] = 0
        upper[offsets[layer] + pick] = lower[offsets[layer] + pick] = 1
    for picks in exclude or ():
        cut = np.zeros((1, n))
        cut[0, offsets + np.asarray(picks)] = 1
        constraints.append(LinearConstraint(cut, -np.inf, len(sizes) - 1))
    res = milp(objective, constraints=constraints, integrality=np.ones(n), bounds=Bounds(lower, upper))
    if res.x is None or res.status != 0:
        return None
    picks, start = [], 0
    for size in sizes:
        picks.append(int(np.argmax(res.x[start:start + size])))
        start += size
    return picks


def extreme_picks(problem: Problem, kind: str, cheapest: bool) -> list[int]:
    """Per layer, its cheapest choice in `kind` (cheapest=True) or its least noisy one: the two ends
    of every budget range, and the fallback when a budget cannot be met."""
    picks = [0] * len(problem.choices)
    for unit in problem.units():
        cost = lambda i: problem.unit_cost(unit, i, kind)  # noqa: E731
        noise = lambda i: problem.unit_noise(unit, i)  # noqa: E731
        key = (lambda i: (cost(i), noise(i))) if cheapest else (lambda i: (noise(i), cost(i)))
        best = min(range(len(problem.choices[unit[0]])), key=key)
        for index in unit:
            picks[index] = best
    return picks


def k_best(problem: Problem, kind: str, limit: float, k: int) -> list[list[int]]:
    """The k assignments with the least predicted noise under the budget, best first."""
    found: list[list[int]] = []
    while len(found) < k:
        picks = solve(problem, kind, limit, exclude=found)
        if picks is None:
            break
        found.append(picks)
    return found
