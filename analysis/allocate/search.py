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


DEFAULT_EVALUATIONS = 40  # real evaluations `suggest` may spend on a cost budget (--evaluations)
DEFAULT_PATIENCE = 12  # the measured search stops after this many evaluations without a better map
FRONT_REPAIR_EVALUATIONS = 6  # per front point that measured worse than a cheaper one


@dataclass(frozen=True)
class SearchReport:
    """What the measured search did: the knapsack map's predicted and measured SQNR, the returned
    map's measured SQNR, what it gained, the evaluations it spent and why it stopped."""

    predicted_sqnr_db: float  # the knapsack map, if single-layer noises added up
    knapsack_sqnr_db: float  # the knapsack map, measured
    measured_sqnr_db: float  # the returned map, measured
    evaluations: int  # all real evaluations, the knapsack map's included
    stopped: str  # "evaluations" (budget spent), "patience" (no gain for a while), "exhausted" (no move left)
    judged_on: str  # what decided between maps
    knapsack_drop: float | None = None  # task-metric drop of the knapsack map, when judged on it
    measured_drop: float | None = None  # ... and of the returned map

    @property
    def gain_db(self) -> float:
        return self.measured_sqnr_db - self.knapsack_sqnr_db

    def as_dict(self) -> dict[str, float | int | str]:
        return {"predicted_sqnr_db": self.predicted_sqnr_db, "knapsack_sqnr_db": self.knapsack_sqnr_db,
                "measured_sqnr_db": self.measured_sqnr_db, "gain_db": self.gain_db,
                "evaluations": self.evaluations, "stopped": self.stopped, "judged_on": self.judged_on,
                "knapsack_drop": self.knapsack_drop, "measured_drop": self.measured_drop}


@dataclass
class Suggestion:
    map: PrecisionMap
    picks: list[int]
    totals: dict[str, float]
    predicted_sqnr_db: float
    measured: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    evaluations: int = 0  # real (measured) evaluations spent
    groups: list[tuple[str, ...]] = field(default_factory=list)  # layers that got one decision together
    search: SearchReport | None = None  # cost budgets with a MeasureFn


def suggest(problem: Problem, budget: Budget, measure: MeasureFn | None = None, refine_trials: int = 6,
            fingerprint: str | None = None, provenance: dict | None = None,
            evaluations: int = DEFAULT_EVALUATIONS, patience: int = DEFAULT_PATIENCE,
            use_metric: bool = True, judged_on: str | None = None, extra_notes: tuple[str, ...] = ()) -> Suggestion:
    """The best map for `budget`; measured and corrected when `measure` is given.

    For cost budgets at most `evaluations` real evaluations are spent: the knapsack map, its
    runners-up (`refine_trials`), then exchange moves judged on measurements (`measured_search`),
    stopping after `patience` evaluations without a better map. `use_metric`=False judges on output
    noise alone (the task metric is saturated or not discriminating); `judged_on` describes the
    yardstick for the report; `extra_notes` (e.g. which split judged) go into the map's notes."""
    notes: list[str] = list(extra_notes) if measure is not None else []
    search = None
    if evaluations < 1:
        raise BudgetError(f"--evaluations {evaluations} is too small; the chosen map needs at least 1")
    judged_on = judged_on or ("task metric, then output noise" if use_metric else "output noise")
    evaluations_spent = 0
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
            start, start_measured = picks, measure(problem.assignment(picks))
            ledger = {tuple(picks): start_measured}
            picks, measured, spent = _refine(problem, picks, start_measured, budget, measure,
                                             min(refine_trials, evaluations - 1), use_metric, ledger)
            picks, measured, more, stopped = measured_search(
                problem, picks, measured, budget.kind, budget.value, measure, evaluations - 1 - spent,
                patience, use_metric, ledger)
            evaluations_spent = 1 + spent + more
            drops = (start_measured.get("drop"), measured.get("drop")) if use_metric else (None, None)
            search = SearchReport(problem.predicted_sqnr(problem.totals(start)["noise"]),
                                  problem.predicted_sqnr(start_measured["noise"]),
                                  problem.predicted_sqnr(measured["noise"]), evaluations_spent, stopped, judged_on,
                                  *drops)
    elif budget.kind == "min-sqnr":
        picks, measured, spent, more_notes = _noise_floor(problem, problem.noise_for_sqnr(budget.value), measure)
        evaluations_spent += spent
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
        evaluations_spent += spent
        notes += more_notes
    totals = problem.totals(picks)
    predicted = problem.predicted_sqnr(totals["noise"])
    if measured is not None and measured["noise"] > 1.05 * totals["noise"] and totals["noise"] > 0:
        notes.append(f"joint error is {measured['noise'] / totals['noise']:.2f}× the sum of single-layer errors "
                     "(noise does not add exactly at low bit widths); figures marked measured are the real ones")
    if search is not None and search.evaluations > 1:
        notes.append(f"measured search: predicted {search.predicted_sqnr_db:.1f} dB, knapsack map measured "
                     f"{search.knapsack_sqnr_db:.1f} dB, returned map {search.measured_sqnr_db:.1f} dB "
                     f"({search.gain_db:+.2f} dB)"
                     + (f", task-metric drop {search.knapsack_drop:+.2f} -> {search.measured_drop:+.2f}"
                        if search.knapsack_drop is not None and search.measured_drop is not None else "")
                     + f" after {search.evaluations} evaluation(s), stopped: {search.stopped}; "
                     f"judged on {search.judged_on}")
    pmap = finish_map(problem, problem.to_map(picks, model=fingerprint, provenance=provenance, notes=tuple(notes)),
                      budget, measured)
    return Suggestion(pmap, picks, totals, predicted, pmap.measured, notes, evaluations_spent,
                      problem.group_names(), search)


def judge_key(measured: dict[str, float], use_metric: bool = True) -> tuple[float, float]:
    """Lower is better: the task-metric drop when labelled data was given (and `use_metric`), then
    output noise."""
    drop = measured.get("drop") if use_metric else None
    return (drop if drop is not None else 0.0, measured["noise"])


def _refine(problem: Problem, picks: list[int], measured: dict[str, float], budget: Budget,
            measure: MeasureFn, trials: int, use_metric: bool = True,
            ledger: dict | None = None) -> tuple[list[int], dict[str, float], int]:
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
        if ledger is not None:
            ledger[tuple(candidate)] = result
        if judge_key(result, use_metric) < judge_key(best_measured, use_metric):
            best, best_measured = candidate, result
    return best, best_measured, spent


def measured_search(problem: Problem, picks: list[int], measured: dict[str, float], kind: str, limit: float,
                    measure: MeasureFn, evaluations: int, patience: int = DEFAULT_PATIENCE,
                    use_metric: bool = True, ledger: dict | None = None,
                    ) -> tuple[list[int], dict[str, float], int, str]:
    """Local search on *measured* maps from `picks` (already measured as `measured`), for when
    single-layer noises do not add up.

    Moves are exchanges within the budget (`kind` ≤ `limit`): raise one decision (a layer or a
    deployment group) and lower others to pay for it, lower one and spend what it frees, swap a pair,
    or re-solve the knapsack. They are ranked by a corrected model — each decision's single-layer
    noise times an in-context factor fitted (ridge, towards the measured joint/sum ratio) to every
    measured difference between maps, so interactions seen in measurements steer the next proposal —
    and the best unmeasured one is measured. A map is accepted only when it measures better
    (`judge_key`). At most `evaluations` measurements; stops early after `patience` without a better
    map, or when every move has been measured. Returns (picks, measured, evaluations spent, why it
    stopped)."""
    units = problem.units()
    ledger = {} if ledger is None else ledger
    ledger.setdefault(tuple(picks), measured)
    best, best_measured = list(picks), measured
    additive = problem.totals(best)["noise"]
    ratio = best_measured["noise"] / additive if additive > 0 else 1.0
    factors = np.full(len(units), max(ratio, 1e-6))
    observations: list[tuple[np.ndarray, float]] = []
    for other, result in ledger.items():  # what is already measured (the runners-up) informs the model
        if list(other) != best:
            observations.append((_unit_delta(problem, units, best, list(other)), result["noise"] - best_measured["noise"]))
    factors = _fit_factors(observations, ratio, len(units)) if observations else factors
    spent, since_gain, stopped = 0, 0, "evaluations"
    while spent < evaluations:
        candidates = [c for c in _moves(problem, units, best, kind, limit, factors) if tuple(c) not in ledger]
        if not candidates:
            stopped = "exhausted"
            break
        scores = [float(factors @ _unit_noise(problem, units, c)) for c in candidates]
        candidate = candidates[int(np.argmin(scores))]
        result = measure(problem.assignment(candidate))
        spent += 1
        ledger[tuple(candidate)] = result
        # observations are kept relative to the current best
        observations.append((_unit_delta(problem, units, best, candidate), result["noise"] - best_measured["noise"]))
        if judge_key(result, use_metric) < judge_key(best_measured, use_metric):
            shift = _unit_delta(problem, units, best, candidate)
            observations = [(x - shift, y - (result["noise"] - best_measured["noise"])) for x, y in observations]
            best, best_measured, since_gain = candidate, result, 0
        else:
            since_gain += 1
        factors = _fit_factors(observations, ratio, len(units))
        if since_gain >= patience:
            stopped = "patience"
            break
    return best, best_measured, spent, stopped


def _unit_noise(problem: Problem, units: list[tuple[int, ...]], picks: list[int]) -> np.ndarray:
    return np.array([problem.unit_noise(unit, picks[unit[0]]) for unit in units])


def _unit_delta(problem: Problem, units, base: list[int], other: list[int]) -> np.ndarray:
    return _unit_noise(problem, units, other) - _unit_noise(problem, units, base)


def _fit_factors(observations: list[tuple[np.ndarray, float]], prior: float, size: int) -> np.ndarray:
    """Per-decision factors r minimising Σ (Δmeasured − Δs·r)² + λ·scale²·Σ (r − prior)²: the
    single-layer table corrected by what measured maps showed, shrunk towards the joint/sum ratio."""
    x = np.array([o[0] for o in observations]).reshape(len(observations), size)
    y = np.array([o[1] for o in observations])
    scale = float(np.sqrt(np.mean(x ** 2))) or 1.0
    penalty = 0.5 * scale * np.eye(size)
    a = np.vstack([x, penalty])
    b = np.concatenate([y, penalty @ np.full(size, prior)])
    factors = np.linalg.lstsq(a, b, rcond=None)[0]
    return np.clip(factors, 0.05 * prior, 50 * prior)


def _moves(problem: Problem, units: list[tuple[int, ...]], picks: list[int], kind: str, limit: float,
           factors: np.ndarray) -> list[list[int]]:
    """Exchange moves from `picks` that fit the budget, each as a full pick list."""
    sizes = [len(problem.choices[unit[0]]) for unit in units]
    noise = [[factors[u] * problem.unit_noise(unit, c) for c in range(sizes[u])] for u, unit in enumerate(units)]
    cost = [[problem.unit_cost(unit, c, kind) for c in range(sizes[u])] for u, unit in enumerate(units)]
    current = [picks[unit[0]] for unit in units]
    total = sum(cost[u][current[u]] for u in range(len(units)))
    slack = limit + 1e-9 * max(abs(limit), 1.0)
    out: list[list[int]] = []

    def emit(decisions: list[int]) -> None:
        full = list(picks)
        for u, unit in enumerate(units):
            for index in unit:
                full[index] = decisions[u]
        out.append(full)

    def repair(decisions: list[int], spent: float, frozen: int) -> None:
        """Lower other decisions, least corrected noise added per unit of cost saved first, until
        the budget fits; then spend what is left where it removes the most noise per cost."""
        while spent > slack:
            options = [((noise[v][c] - noise[v][decisions[v]]) / (cost[v][decisions[v]] - cost[v][c]), v, c)
                       for v in range(len(units)) if v != frozen for c in range(sizes[v])
                       if cost[v][c] < cost[v][decisions[v]]]
            if not options:
                return
            _, v, c = min(options)
            spent += cost[v][c] - cost[v][decisions[v]]
            decisions[v] = c
        while True:
            options = [((noise[v][c] - noise[v][decisions[v]]) / (cost[v][c] - cost[v][decisions[v]]), v, c)
                       for v in range(len(units)) if v != frozen for c in range(sizes[v])
                       if cost[v][c] > cost[v][decisions[v]] and spent + cost[v][c] - cost[v][decisions[v]] <= slack
                       and noise[v][c] < noise[v][decisions[v]]]
            if not options:
                break
            _, v, c = min(options)
            spent += cost[v][c] - cost[v][decisions[v]]
            decisions[v] = c
        emit(decisions)

    for u in range(len(units)):
        for c in range(sizes[u]):
            if c == current[u]:
                continue
            decisions = list(current)
            decisions[u] = c
            repair(decisions, total - cost[u][current[u]] + cost[u][c], u)
            for v in range(len(units)):  # plain pair swaps: u to c, v one step the other way
                if v == u:
                    continue
                for d in range(sizes[v]):
                    if d == current[v]:
                        continue
                    swapped = list(current)
                    swapped[u], swapped[v] = c, d
                    spent = total - cost[u][current[u]] + cost[u][c] - cost[v][current[v]] + cost[v][d]
                    if spent <= slack:
                        emit(swapped)
    layer_factors = [1.0] * len(problem.layers)
    for u, unit in enumerate(units):
        for index in unit:
            layer_factors[index] = float(factors[u])
    resolved = solve(problem, kind, limit, weights=layer_factors)
    if resolved is not None:
        out.append(resolved)
    return out


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
                 measure: MeasureFn | None = None, use_metric: bool = True,
                 repair_evaluations: int = FRONT_REPAIR_EVALUATIONS) -> list[FrontPoint]:
    """Suggested maps over a range of budgets (exact at each), cheapest to most precise.

    Measured, the front is made monotone in measured quality (`judge_key`): a point that measures
    worse than a cheaper one is replaced by a measured search started from that cheaper map under
    the point's own budget (at most `repair_evaluations` evaluations), which keeps the cheaper map
    when nothing better is found — so a costlier point never measures worse than a cheaper one."""
    check_front_points(points)
    low = problem.totals(extreme_picks(problem, kind, cheapest=True))[kind]
    high = problem.totals(extreme_picks(problem, kind, cheapest=False))[kind]
    seen: set[tuple[int, ...]] = set()
    front = []
    ledger: dict[tuple[int, ...], dict[str, float]] = {}
    best: tuple[list[int], dict[str, float]] | None = None  # the best measured map so far (cheaper budgets)
    keys: list[tuple[float, float]] = []
    for limit in np.linspace(low, high, points):
        picks = solve(problem, kind, float(limit))
        if picks is None or tuple(picks) in seen:
            continue
        measured = None
        if measure is not None:
            measured = ledger.get(tuple(picks)) or measure(problem.assignment(picks))
            ledger[tuple(picks)] = measured
            if best is not None and judge_key(measured, use_metric) > judge_key(best[1], use_metric):
                picks, measured, _, _ = measured_search(problem, list(best[0]), best[1], kind, float(limit), measure,
                                                        repair_evaluations, repair_evaluations, use_metric, ledger)
                if tuple(picks) in seen:
                    continue
            best = (picks, measured)
        seen.add(tuple(picks))
        totals = problem.totals(picks)
        front.append(FrontPoint(
            "suggested", {k: totals[k] for k in COST_KINDS}, problem.predicted_sqnr(totals["noise"]),
            problem.predicted_sqnr(measured["noise"]) if measured else None,
            measured.get("metric") if measured else None, problem.to_map(picks),
        ))
        if measured is not None:
            keys.append(judge_key(measured, use_metric))
    if keys:  # a repaired point can come out cheaper than an earlier one: drop what it dominates
        keep = [i for i, p in enumerate(front)
                if not any(q.costs[kind] <= p.costs[kind] and keys[j] < keys[i] for j, q in enumerate(front) if j != i)]
        front = [front[i] for i in keep]
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
