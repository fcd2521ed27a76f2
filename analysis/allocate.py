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
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from analysis import costs
from analysis.config import QuantConfig
from analysis.formats import Format, parse_format
from analysis.layers import Layer
from analysis.metrics import SQNR_CAP_DB, sqnr_from_sums
from analysis.precision_map import LayerPrecision, PrecisionMap
from analysis.results import AnalysisResult

BUDGET_KINDS = {
    "avg-bits": "parameter-weighted average weight bits",
    "size-kb": "weight storage in KiB (codes, scales, zero points, FP32 biases)",
    "bops": "bit operations per sample (MACs × weight bits × activation bits)",
    "max-drop": "largest allowed loss of the task metric, in points (judged with real evaluations)",
    "min-sqnr": "floor on the model-output SQNR in dB",
}
COST_KINDS = ("avg-bits", "size-kb", "bops")


class BudgetError(ValueError):
    """A budget the allocator cannot parse or use."""


@dataclass(frozen=True)
class Budget:
    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


def parse_budget(text: str) -> Budget:
    match = re.fullmatch(r"\s*([a-z-]+)\s*=\s*([-+0-9.eE]+)\s*", text or "")
    if not match:
        raise BudgetError(f"cannot read budget {text!r}; write KIND=VALUE with KIND one of {', '.join(BUDGET_KINDS)}, e.g. avg-bits=5.5")
    kind, value_text = match.groups()
    if kind not in BUDGET_KINDS:
        raise BudgetError(f"unknown budget kind {kind!r}; use one of {', '.join(BUDGET_KINDS)}")
    value = float(value_text)
    if not math.isfinite(value) or (kind != "min-sqnr" and value < 0):
        raise BudgetError(f"budget {text!r} needs a non-negative finite value")
    return Budget(kind, value)


@dataclass(frozen=True)
class Choice:
    """One candidate precision for one layer, with its measured noise and its costs."""

    precision: LayerPrecision
    weight: Format | None
    act: Format | None
    noise: float  # output noise power (MSE at the model output) with only this layer at this choice
    costs: dict[str, float]  # budget kind -> this layer's contribution


@dataclass
class Problem:
    """The knapsack: layers, their choices, and the output signal power (to convert noise to dB)."""

    layers: list[Layer]
    choices: list[list[Choice]]
    signal: float  # mean output signal power (Σref²/count)
    total_elements: int
    quant: QuantConfig = field(default_factory=QuantConfig)  # how the sweep calibrated; maps carry it
    # Output noise of every measured trial, (layer, qualified precision) -> noise: a hand-edited map
    # may pick what the allocator does not offer (weight-only int4 where it chose among weight/act pairs).
    trial_noise: dict[tuple[str, LayerPrecision], float] = field(default_factory=dict)

    def predicted_sqnr(self, noise: float) -> float:
        return sqnr_from_sums(self.signal, noise)

    def noise_for_sqnr(self, sqnr_db: float) -> float:
        return self.signal / 10 ** (sqnr_db / 10)

    def totals(self, picks: list[int]) -> dict[str, float]:
        out = {kind: 0.0 for kind in COST_KINDS}
        for layer_choices, pick in zip(self.choices, picks):
            for kind in COST_KINDS:
                out[kind] += layer_choices[pick].costs[kind]
        out["noise"] = sum(ch[p].noise for ch, p in zip(self.choices, picks))
        return out

    def to_map(self, picks: list[int], **kwargs) -> PrecisionMap:
        kwargs.setdefault("quant", self.quant)
        return PrecisionMap({layer.name: ch[p].precision for layer, ch, p in zip(self.layers, self.choices, picks)}, **kwargs)

    def assignment(self, picks: list[int]) -> dict[str, tuple[Format | None, Format | None]]:
        return {layer.name: (ch[p].weight, ch[p].act) for layer, ch, p in zip(self.layers, self.choices, picks)}

    def _offered(self, index: int, precision: LayerPrecision) -> Choice | None:
        return next((c for c in self.choices[index] if c.precision == precision), None)

    def layer_noise(self, index: int, precision: LayerPrecision) -> float | None:
        """Output noise with only layer `index` at `precision`: the allocator's (monotone) figure when
        it is one of its choices, else the sweep's trial; None when the sweep never measured it."""
        choice = self._offered(index, precision)
        if choice is not None:
            return choice.noise
        if precision.weight == "fp32" and precision.activation is None:
            return 0.0
        return self.trial_noise.get((self.layers[index].name, precision))

    def predict(self, pmap: PrecisionMap) -> dict[str, Any]:
        """The predicted figures of any map, the allocator's or a hand-edited one: its costs and the
        output SQNR if the single-layer noises add up. The SQNR is None when the sweep never measured
        some layer at its precision; those layers are listed under "unmeasured"."""
        totals = {kind: 0.0 for kind in COST_KINDS}
        noise, unmeasured = 0.0, []
        for index, layer in enumerate(self.layers):
            precision = pmap.precision(layer.name)
            # Costs as the allocator counts them, so a suggested map predicts exactly its totals.
            choice = self._offered(index, precision) or _choice(
                layer, precision, *precision.formats(), 0.0, self.total_elements)
            for kind in COST_KINDS:
                totals[kind] += choice.costs[kind]
            layer_noise = self.layer_noise(index, precision)
            if layer_noise is None:
                unmeasured.append(layer.name)
            else:
                noise += layer_noise
        sqnr = None if unmeasured else self.predicted_sqnr(noise)
        return {"output_sqnr_db": sqnr, **totals, "unmeasured": unmeasured}

    def layer_table(self, pmap: PrecisionMap) -> list[dict[str, Any]]:
        """One row per layer: its precision in `pmap` and the predicted output SQNR with only that
        layer quantized ("output_sqnr_db", None when the sweep never measured it)."""
        rows = []
        for index, layer in enumerate(self.layers):
            precision = pmap.precision(layer.name)
            noise = self.layer_noise(index, precision)
            rows.append({"layer": layer.name, "kind": layer.kind, "params": layer.params,
                         "weight": precision.weight, "activation": precision.activation,
                         "output_sqnr_db": None if noise is None else self.predicted_sqnr(noise)})
        return rows


def finish_map(problem: Problem, pmap: PrecisionMap, budget: Budget | None = None,
               measured: dict[str, float] | None = None) -> PrecisionMap:
    """`pmap` with what a map file records on every surface (CLI, dashboard, API): the budget it was
    made for (the map's own when not given), the prediction for exactly this map, and `measured`
    (a MeasureFn result, "sqnr_db" added) — None drops a measurement that was of another map."""
    predicted = problem.predict(pmap)
    if not predicted["unmeasured"]:
        del predicted["unmeasured"]
    if measured is not None and "noise" in measured and "sqnr_db" not in measured:
        measured = {**measured, "sqnr_db": problem.predicted_sqnr(measured["noise"])}
    return replace(pmap, budget={"kind": budget.kind, "value": budget.value} if budget else pmap.budget,
                   predicted=predicted, measured=measured)


def build_problem(result: AnalysisResult, allow_fp32: bool = True) -> Problem:
    """Choices per layer from the sweep: weight×activation pairs when activations were analysed
    (activations stay quantized), weight-only otherwise, plus FP32 as a fallback."""
    quant = QuantConfig.from_dict(result.config["quant"], "the analysis' quant config")
    granularity = quant.granularity
    has_both = any(t.target == "both" for t in result.trials)
    target = "both" if has_both else "weights"
    layers, choices, signals, trial_noise = [], [], [], {}
    total_elements = sum(costs.weight_elements(layer) for layer in result.layers) or 1
    for layer in result.layers:
        layer_choices = []
        trials = [t for t in result.trials if t.layer == layer.name and t.ok and t.output is not None]
        # Layers without quantizable inputs (embeddings) have no "both" trials: use their weight trials.
        picked = [t for t in trials if t.target == target] or [t for t in trials if t.target == "weights"]
        for trial in trials:
            precision = LayerPrecision(trial.weight_format or "fp32", trial.act_format).qualified(granularity)
            trial_noise[(layer.name, precision)] = trial.output.mse
        for trial in picked:
            weight = parse_format(trial.weight_format, "weight", granularity) if trial.weight_format else None
            act = parse_format(trial.act_format, "activation") if trial.act_format else None
            precision = LayerPrecision(trial.weight_format or "fp32", trial.act_format).qualified(granularity)
            layer_choices.append(_choice(layer, precision, weight, act, trial.output.mse, total_elements))
            if trial.output.mse > 0 and trial.output.sqnr_db < 99:
                signals.append(trial.output.mse * 10 ** (trial.output.sqnr_db / 10))
        if allow_fp32 or not layer_choices:
            layer_choices.append(_choice(layer, LayerPrecision("fp32", None), None, None, 0.0, total_elements))
        layers.append(layer)
        choices.append(_monotone(layer_choices))
    if not layers:
        raise BudgetError("the analysis has no layers to allocate precision to")
    signal = float(np.median(signals)) if signals else 1.0
    return Problem(layers, choices, signal, total_elements, quant, trial_noise)


def _choice(layer: Layer, precision: LayerPrecision, weight: Format | None, act: Format | None,
            noise: float, total_elements: int) -> Choice:
    w_bits = weight.bits if weight is not None else costs.FP32_BITS
    return Choice(precision, weight, act, noise, {
        "avg-bits": costs.weight_elements(layer) * w_bits / total_elements,
        "size-kb": costs.weight_bytes(layer, weight) / 1024,
        "bops": float(costs.bops(layer, weight, act)),
    })


def _bits(choice: Choice) -> tuple[int, int]:
    return (choice.weight.bits if choice.weight else 32, choice.act.bits if choice.act else 32)


def _monotone(choices: list[Choice]) -> list[Choice]:
    """A choice with at least as many bits on both sides never has more noise than a poorer one."""
    out = []
    for choice in choices:
        w, a = _bits(choice)
        dominated = [c.noise for c in choices if _bits(c)[0] <= w and _bits(c)[1] <= a]
        out.append(Choice(choice.precision, choice.weight, choice.act, min(dominated), choice.costs))
    return out


def solve(problem: Problem, kind: str, limit: float, minimize: str = "noise",
          exclude: list[list[int]] | None = None) -> list[int] | None:
    """Exact solution of the knapsack. minimize="noise": least noise with cost ≤ limit;
    minimize="cost": cheapest (in `kind`) with noise ≤ limit. `exclude`: assignments that may not be
    returned (no-good cuts, for the next-best solutions). None when infeasible."""
    sizes = [len(ch) for ch in problem.choices]
    n = sum(sizes)
    noise = np.array([c.noise for ch in problem.choices for c in ch])
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
    for picks in exclude or ():
        cut = np.zeros((1, n))
        cut[0, offsets + np.asarray(picks)] = 1
        constraints.append(LinearConstraint(cut, -np.inf, len(sizes) - 1))
    res = milp(objective, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1))
    if res.x is None or res.status != 0:
        return None
    picks, start = [], 0
    for size in sizes:
        picks.append(int(np.argmax(res.x[start:start + size])))
        start += size
    return picks


def extreme_picks(problem: Problem, kind: str, cheapest: bool) -> list[int]:
    key = (lambda c: (c.costs[kind], c.noise)) if cheapest else (lambda c: (c.noise, c.costs[kind]))
    return [min(range(len(ch)), key=lambda i: key(ch[i])) for ch in problem.choices]


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


def k_best(problem: Problem, kind: str, limit: float, k: int) -> list[list[int]]:
    """The k assignments with the least predicted noise under the budget, best first."""
    found: list[list[int]] = []
    while len(found) < k:
        picks = solve(problem, kind, limit, exclude=found)
        if picks is None:
            break
        found.append(picks)
    return found


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


def pareto_front(problem: Problem, kind: str = "avg-bits", points: int = 12,
                 measure: MeasureFn | None = None) -> list[FrontPoint]:
    """Suggested maps over a range of budgets (exact at each), cheapest to most precise."""
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
