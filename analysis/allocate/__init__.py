"""Mixed-precision allocation: the best format per layer under a budget the user states.

The per-layer sweep measured s_i(c), the output noise power with only layer i in format c. If
noises add (they nearly do at 8 bits), the best map under a cost budget B is the multiple-choice
knapsack

    minimize Σ_i Σ_c s_i(c)·x_ic   s.t.  Σ_c x_ic = 1 for every layer,  Σ_ic cost_i(c)·x_ic ≤ B,

which HiGHS (scipy.optimize.milp) solves exactly in milliseconds — unlike the greedy sensitivity
orderings of AIMET AMP and friends, which can leave budget on the table. Two corrections make the
answer trustworthy:
- scores are made monotone: a format with more bits never scores worse than one with fewer
  (measurement noise at high SQNR otherwise produces absurd swaps);
- the chosen map is *measured*, and so are the next-best maps under the same budget (no-good cuts
  on the knapsack): at 4 bits and below the sum of single-layer noises under-predicts the joint
  noise, and output noise is not the task metric, so a few real evaluations pick the winner —
  judged on the task metric when labelled data is given, else on measured output noise.
Tied weights are one layer in the analysis, so they always share a format.

The package follows that line, each part importing only the ones before it:
    problem   budgets, the knapsack instance built from an analysis, a map's predicted figures
    knapsack  the exact solver (MILP), the next-best maps (no-good cuts), the extreme maps
    groups    deployment groups (fused q/k/v, gate/up, MoE experts): one decision per group
    search    `suggest`: the measured refinement and search, SQNR floors, max-drop, the Pareto front
    judging   which split judges measured maps, and whether the task metric can (imports the
              evaluator, so it is imported on its own: `analysis.allocate.judging`)
Callers import from `analysis.allocate`; the names below are re-exported for them.
"""

from analysis.allocate.groups import GroupError, default_groups, glob_groups, resolve_groups
from analysis.allocate.knapsack import extreme_picks, k_best, solve
from analysis.allocate.problem import (
    BUDGET_KINDS, COST_KINDS, KEEP_FORMATS, Budget, BudgetError, Choice, Problem, apply_groups, build_problem,
    finish_map, parse_budget,
)
from analysis.allocate.search import (
    DEFAULT_EVALUATIONS, MAX_FRONT_POINTS, FrontPoint, MeasureFn, SearchReport, Suggestion, check_front_points,
    judge_key, measured_search, pareto_front, suggest, uniform_points,
)

# Private, but the tests check the cost model and the monotone scores through them, as they did
# when the allocator was one module.
from analysis.allocate.problem import _choice, _monotone  # noqa: F401

__all__ = [
    "BUDGET_KINDS", "COST_KINDS", "Budget", "BudgetError", "Choice", "Problem", "build_problem", "finish_map",
    "parse_budget", "extreme_picks", "k_best", "solve", "FrontPoint", "MeasureFn", "Suggestion", "pareto_front",
    "MAX_FRONT_POINTS", "check_front_points",
    "suggest", "uniform_points", "GroupError", "default_groups", "glob_groups", "resolve_groups", "apply_groups",
    "KEEP_FORMATS", "DEFAULT_EVALUATIONS", "SearchReport", "judge_key", "measured_search",
]
