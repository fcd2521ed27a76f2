"""The allocation problem: budgets, each layer's choices with their measured noise and costs, and
the predicted figures of any map.

The per-layer sweep measured s_i(c), the output noise power with only layer i in format c. If
noises add (they nearly do at 8 bits), the best map under a cost budget B is the multiple-choice
knapsack

    minimize Σ_i Σ_c s_i(c)·x_ic   s.t.  Σ_c x_ic = 1 for every layer,  Σ_ic cost_i(c)·x_ic ≤ B.

This module builds that instance from an analysis (`build_problem`) and answers what it predicts
for a map (`Problem.predict`), which the dashboard also needs for hand-edited maps. It is separate
from the solver (`analysis.allocate.knapsack`) and the measured search (`analysis.allocate.search`)
because both of those, and every surface that shows a map, read it: it imports neither.

Scores are made monotone here: a format with more bits never scores worse than one with fewer
(measurement noise at high SQNR otherwise produces absurd swaps). Tied weights are one layer in the
analysis, so they always share a format.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from analysis import costs
from analysis.config import QuantConfig
from analysis.formats import Format, parse_format
from analysis.layers import Layer
from analysis.metrics import sqnr_from_sums
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
MAX_SQNR_BUDGET_DB = 1000.0  # 10**(dB/10) overflows a float past ~3080 dB; anything beyond 100 is unmeetable anyway


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
    try:
        value = float(value_text)
    except ValueError:
        raise BudgetError(f"cannot read the number in budget {text!r}; write KIND=VALUE, e.g. avg-bits=5.5") from None
    if not math.isfinite(value) or (kind != "min-sqnr" and value < 0):
        raise BudgetError(f"budget {text!r} needs a non-negative finite value")
    if kind == "min-sqnr" and abs(value) > MAX_SQNR_BUDGET_DB:
        raise BudgetError(f"budget {text!r} is out of range: an SQNR floor lies within ±{MAX_SQNR_BUDGET_DB:.0f} dB "
                          "(measured SQNR is capped at 100 dB)")
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
    # Deployment groups (indices into `layers`, two or more each): their members offer the same
    # precisions in the same order, and every map gives them the same pick (`apply_groups`).
    groups: tuple[tuple[int, ...], ...] = ()

    def units(self) -> list[tuple[int, ...]]:
        """The decisions the allocator makes: each group, and each layer in no group on its own, in
        model order (by first layer)."""
        grouped = {index for group in self.groups for index in group}
        units = [tuple(group) for group in self.groups] + [(i,) for i in range(len(self.layers)) if i not in grouped]
        return sorted(units, key=lambda unit: unit[0])

    def group_names(self) -> list[tuple[str, ...]]:
        return [tuple(self.layers[i].name for i in group) for group in self.groups]

    def unit_noise(self, unit: tuple[int, ...], pick: int) -> float:
        return sum(self.choices[i][pick].noise for i in unit)

    def unit_cost(self, unit: tuple[int, ...], pick: int, kind: str) -> float:
        return sum(self.choices[i][pick].costs[kind] for i in unit)

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
        kwargs.setdefault("groups", tuple(self.group_names()))
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


def apply_groups(problem: Problem, groups: list[tuple[str, ...]]) -> Problem:
    """`problem` with one decision per group: each member keeps only the precisions every member
    offers, in one order, so a group's members always take the same pick. BudgetError (one line)
    when a group's members share no precision or a name is not an analysed layer."""
    index = {layer.name: i for i, layer in enumerate(problem.layers)}
    choices = list(problem.choices)
    found = []
    for group in groups:
        missing = [name for name in group if name not in index]
        if missing:
            raise BudgetError(f"group member {missing[0]} is not an analysed layer; drop it from the group")
        members = tuple(sorted(index[name] for name in group))
        if len(members) < 2:
            continue
        shared = [c.precision for c in choices[members[0]]]
        for i in members[1:]:
            offered = {c.precision for c in choices[i]}
            shared = [p for p in shared if p in offered]
        if not shared:
            raise BudgetError(f"group {', '.join(group[:3])} has no precision all its layers were analysed in; "
                              "re-run analyze with formats they share, or pass --no-groups")
        for i in members:
            by_precision = {c.precision: c for c in choices[i]}
            choices[i] = [by_precision[p] for p in shared]
        found.append(members)
    return replace(problem, choices=choices, groups=tuple(problem.groups) + tuple(found))


KEEP_FORMATS = ("fp32", "bf16", "fp16")  # what a layer the allocator does not quantize is kept in


def build_problem(result: AnalysisResult, allow_fp32: bool = True, keep: str = "fp32") -> Problem:
    """Choices per layer from the sweep: weight×activation pairs when activations were analysed
    (activations stay quantized), weight-only otherwise, plus a "keep" fallback: FP32, or bf16/fp16
    weights for models deployed in half precision (costed at 16 bits, with the noise the sweep
    measured for that format — BudgetError when it was not analysed)."""
    if keep not in KEEP_FORMATS:
        raise BudgetError(f"cannot keep layers in {keep!r}; use one of {', '.join(KEEP_FORMATS)}")
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
        if keep != "fp32":
            precision = LayerPrecision(keep, None).qualified(granularity)
            noise = trial_noise.get((layer.name, precision))
            if noise is None:
                raise BudgetError(f"layer {layer.name} has no {keep} trial to keep it in; re-run analyze with "
                                  f"{keep} among --weight-formats (its noise is measured, not assumed)")
            if all(c.precision != precision for c in layer_choices):
                layer_choices.append(_choice(layer, precision, parse_format(keep, "weight"), None, noise, total_elements))
        elif allow_fp32 or not layer_choices:
            layer_choices.append(_choice(layer, LayerPrecision("fp32", None), None, None, 0.0, total_elements))
        layers.append(layer)
        choices.append(_monotone(layer_choices))
    if not layers:
        raise BudgetError("the analysis has no layers to allocate precision to")
    signal = float(np.median(signals)) if signals else 1.0
    return Problem(layers, choices, signal, total_elements, quant, trial_noise)


def _choice(layer: Layer, precision: LayerPrecision, weight: Format | None, act: Format | None,
            noise: float, total_elements: int) -> Choice:
    return Choice(precision, weight, act, noise, {
        "avg-bits": costs.weight_elements(layer) * costs.effective_bits(weight) / total_elements,
        "size-kb": costs.weight_bytes(layer, weight) / 1024,
        "bops": float(costs.bops(layer, weight, act)),
    })


def _bits(choice: Choice) -> tuple[float, float]:
    return costs.effective_bits(choice.weight), costs.effective_bits(choice.act)


def _family(choice: Choice) -> tuple[str | None, str | None]:
    return tuple(fmt.kind if fmt is not None and not fmt.is_identity else None  # type: ignore[return-value]
                 for fmt in (choice.weight, choice.act))


def _comparable(richer: Choice, poorer: Choice) -> bool:
    """Bits order noise only within one format family per side (fp32 aside): int4 says nothing about
    mxfp4 or fp4_e2m1 at the same or fewer bits."""
    return all(p is None or r is None or p == r for r, p in zip(_family(richer), _family(poorer)))


def _monotone(choices: list[Choice]) -> list[Choice]:
    """A choice with at least as many (effective) bits on both sides never has more noise than a
    poorer one of the same format families."""
    out = []
    for choice in choices:
        w, a = _bits(choice)
        dominated = [c.noise for c in choices
                     if _bits(c)[0] <= w and _bits(c)[1] <= a and _comparable(choice, c)]
        out.append(Choice(choice.precision, choice.weight, choice.act, min(dominated), choice.costs))
    return out
