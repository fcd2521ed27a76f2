"""The measured search: from a budget to the map quantlens suggests, checked with real evaluations.

The knapsack (`analysis.allocate.knapsack`) is exact for its model, but the model is not the truth:
at 4 bits and below the sum of single-layer noises under-predicts the joint noise, and output
noise is not the task metric. So the chosen map is *measured*, and so are the next-best maps under
the same budget; a few real evaluations pick the winner, judged on the task metric when labelled
data is given, else on measured output noise. Budgets that are not costs are searched here too:
an SQNR floor by re-solving with a tightened noise limit, a task-metric drop by bisection. The
Pareto front and the uniform reference points are the same solver over a range of budgets.

This is the only part of the allocator that runs the model (through a `MeasureFn` the caller
gives), which is why it sits on top of the problem and the solver rather than inside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from analysis.allocate.knapsack import extreme_picks, k_best, solve
from analysis.allocate.problem import COST_KINDS, Budget, BudgetError, Problem, finish_map
from analysis.formats import Format
from analysis.metrics import SQNR_CAP_DB
from analysis.precision_map import PrecisionMap

MeasureFn = Callable[[dict[str, tuple[Format | None, Format | None]]], dict[str, float]]
"""Runs the model with an assignment; returns at least {"noise": output MSE vs FP32}; with labelled
data also {"metric": task metric, "drop": points lost vs FP32 (positive = worse)}."""


@dataclass
class Suggestion:
    map: PrecisionMap
    picks: list[int]
    totals: dict[str, float]
    predicted_sqnr_db: float
    measured: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    evaluations: int = 0  # real (measured) evaluations spent


def suggest(problem: Problem, budget: Budget, measure: MeasureFn | None = None, refine_trials: int = 6,
            fingerprint: str | None = None, provenance: dict | None = None) -> Suggestion:
    """The best map for `budget`; measured and corrected when `measure` is given."""
    notes: list[str] = []
    evaluations = 0
    if budget.kind in COST_KINDS:
        limit = budget.value
        picks = solve(problem, budget.kind, limit)
        if picks is None:
            picks = extreme_picks(problem, budget.kind, cheapest=True)
            floor = problem.totals(picks)[budget.kind]
            notes.append(f"budget {budget} cannot be met: the cheapest assignment already needs "
                         f"{budget.kind}={floor:.4g}; returning that cheapest map")
        measured = None
        if measure is not None:
            measured = measure(problem.assignment(picks))
            evaluations += 1
            picks, measured, spent = _refine(problem, picks, measured, budget, measure, refine_trials)
            evaluations += spent
    elif budget.kind == "min-sqnr":
        picks, measured, spent, more_notes = _noise_floor(problem, problem.noise_for_sqnr(budget.value), measure)
        evaluations += spent
        notes += more_notes
        if budget.value > SQNR_CAP_DB and not more_notes:
            # Only error-free (FP32) layers meet such a floor, and their SQNR is reported at the cap.
            notes.append(f"budget {budget} cannot be met by any quantized layer: {budget.value:g} dB is above the "
                         f"{SQNR_CAP_DB:g} dB quantlens reports for error-free output; returning the map that "
                         "comes closest (layers without error stay FP32)")
    else:  # max-drop
        if measure is None:
            raise BudgetError("a max-drop budget is judged with real evaluations: give the model and labelled --eval-data")
        picks, measured, spent, more_notes = _max_drop(problem, budget.value, measure)
        evaluations += spent
        notes += more_notes
    totals = problem.totals(picks)
    predicted = problem.predicted_sqnr(totals["noise"])
    if measured is not None and measured["noise"] > 1.05 * totals["noise"] and totals["noise"] > 0:
        notes.append(f"joint error is {measured['noise'] / totals['noise']:.2f}× the sum of single-layer errors "
                     "(noise does not add exactly at low bit widths); figures marked measured are the real ones")
    pmap = finish_map(problem, problem.to_map(picks, model=fingerprint, provenance=provenance, notes=tuple(notes)),
                      budget, measured)
    return Suggestion(pmap, picks, totals, predicted, pmap.measured, notes, evaluations)


def _judge(measured: dict[str, float]) -> tuple[float, float]:
    """Lower is better: the task-metric drop when labelled data was given, then output noise."""
    return (measured.get("drop") if measured.get("drop") is not None else 0.0, measured["noise"])


def _refine(problem: Problem, picks: list[int], measured: dict[str, float], budget: Budget,
            measure: MeasureFn, trials: int) -> tuple[list[int], dict[str, float], int]:
    """Measure the next-best maps under the same budget and keep the best measured one.

    Single-layer noises do not add exactly (least of all at ≤ 4 bits), and output noise is not the
    task metric, so among maps the additive model ranks nearly equal the measured best often is not
    the predicted best. A few real evaluations of the runners-up settle it."""
    if trials <= 0:
        return picks, measured, 0
    best, best_measured, spent = picks, measured, 0
    for candidate in k_best(problem, budget.kind, budget.value, trials + 1)[1:]:
        result = measure(problem.assignment(candidate))
        spent += 1
        if _judge(result) < _judge(best_measured):
            best, best_measured = candidate, result
    return best, best_measured, spent


def _noise_floor(problem: Problem, max_noise: float, measure: MeasureFn | None):
    """Cheapest map (in average bits) whose output noise stays under max_noise; re-solved with a
    tightened limit while the measured noise exceeds it."""
    notes: list[str] = []
    limit, spent, measured = max_noise, 0, None
    best = None
    for _ in range(4):
        picks = solve(problem, "avg-bits", limit, minimize="cost")
        if picks is None:
            break
        if measure is None:
            return picks, None, spent, notes
        measured = measure(problem.assignment(picks))
        spent += 1
        if measured["noise"] <= max_noise * 1.0001:
            return picks, measured, spent, notes
        best = (picks, measured)
        predicted = problem.totals(picks)["noise"]
        limit = limit * predicted / measured["noise"] if measured["noise"] > 0 else limit / 2
    picks = extreme_picks(problem, "avg-bits", cheapest=False)
    if best is None or solve(problem, "avg-bits", max_noise, minimize="cost") is None:
        notes.append(f"the SQNR floor cannot be met: even the most precise assignment predicts "
                     f"{problem.predicted_sqnr(problem.totals(picks)['noise']):.1f} dB; returning the most precise map")
    else:
        notes.append("the SQNR floor was not met after 4 corrections; returning the most precise map")
    if measure is not None:
        measured = measure(problem.assignment(picks))
        spent += 1
    return picks, measured, spent, notes


def _max_drop(problem: Problem, max_drop: float, measure: MeasureFn):
    """Bisect the noise limit (log scale) for the cheapest map whose measured task-metric drop fits."""
    notes: list[str] = []
    cheapest = extreme_picks(problem, "avg-bits", cheapest=True)
    hi_noise = max(problem.totals(cheapest)["noise"], 1e-30)
    lo_noise = max(hi_noise * 1e-6, 1e-30)
    spent = 0
    result = measure(problem.assignment(cheapest))
    spent += 1
    if "drop" not in result:
        raise BudgetError("a max-drop budget needs labelled evaluation data (labels for the task metric)")
    if result["drop"] <= max_drop:
        return cheapest, result, spent, notes
    best_picks, best_result = extreme_picks(problem, "avg-bits", cheapest=False), None
    best_result = measure(problem.assignment(best_picks))
    spent += 1
    if best_result["drop"] > max_drop:
        notes.append(f"no map keeps the drop within {max_drop:g} points: the most precise one loses "
                     f"{best_result['drop']:.2f}; returning it")
        return best_picks, best_result, spent, notes
    lo, hi = math.log(lo_noise), math.log(hi_noise)
    for _ in range(8):
        mid = (lo + hi) / 2
        picks = solve(problem, "avg-bits", math.exp(mid), minimize="cost")
        if picks is None:
            lo = mid
            continue
        result = measure(problem.assignment(picks))
        spent += 1
        if result["drop"] <= max_drop:
            if problem.totals(picks)["avg-bits"] <= problem.totals(best_picks)["avg-bits"]:
                best_picks, best_result = picks, result
            lo = mid
        else:
            hi = mid
    return best_picks, best_result, spent, notes


@dataclass(frozen=True)
class FrontPoint:
    label: str  # "suggested" or the uniform configuration's name
    costs: dict[str, float]
    predicted_sqnr_db: float
    measured_sqnr_db: float | None = None
    metric: float | None = None
    map: PrecisionMap | None = None


MAX_FRONT_POINTS = 200  # each point is an exact solve (and a model run when measured): minutes beyond this


def check_front_points(points: int) -> None:
    """BudgetError (one line) unless 0 <= points <= MAX_FRONT_POINTS."""
    if isinstance(points, bool) or not isinstance(points, int) or not 0 <= points <= MAX_FRONT_POINTS:
        raise BudgetError(f"--front-points {points} is out of range; use 0 (no front) to {MAX_FRONT_POINTS}")


def pareto_front(problem: Problem, kind: str = "avg-bits", points: int = 12,
                 measure: MeasureFn | None = None) -> list[FrontPoint]:
    """Suggested maps over a range of budgets (exact at each), cheapest to most precise."""
    check_front_points(points)
    low = problem.totals(extreme_picks(problem, kind, cheapest=True))[kind]
    high = problem.totals(extreme_picks(problem, kind, cheapest=False))[kind]
    seen: set[tuple[int, ...]] = set()
    front = []
    for limit in np.linspace(low, high, points):
        picks = solve(problem, kind, float(limit))
        if picks is None or tuple(picks) in seen:
            continue
        seen.add(tuple(picks))
        totals = problem.totals(picks)
        measured = measure(problem.assignment(picks)) if measure else None
        front.append(FrontPoint(
            "suggested", {k: totals[k] for k in COST_KINDS}, problem.predicted_sqnr(totals["noise"]),
            problem.predicted_sqnr(measured["noise"]) if measured else None,
            measured.get("metric") if measured else None, problem.to_map(picks),
        ))
    return front


def uniform_points(problem: Problem, measure: MeasureFn | None = None) -> list[FrontPoint]:
    """Every configuration that all layers can take, as reference points next to the front."""
    names = {c.precision for c in problem.choices[0]}
    for ch in problem.choices[1:]:
        names &= {c.precision for c in ch}
    points = []
    for precision in sorted(names, key=lambda p: (p.weight, p.activation or "")):
        picks = [next(i for i, c in enumerate(ch) if c.precision == precision) for ch in problem.choices]
        totals = problem.totals(picks)
        measured = measure(problem.assignment(picks)) if measure else None
        label = precision.weight if precision.activation is None else f"{precision.weight}/{precision.activation}"
        points.append(FrontPoint(
            f"uniform {label}", {k: totals[k] for k in COST_KINDS}, problem.predicted_sqnr(totals["noise"]),
            problem.predicted_sqnr(measured["noise"]) if measured else None,
            measured.get("metric") if measured else None, problem.to_map(picks),
        ))
    return points
