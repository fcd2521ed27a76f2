"""Allocator quality: quantlens' exact knapsack vs a greedy sensitivity ordering vs exhaustive search.

For each sample model the per-layer sweep runs once; then, at every average-bits budget, we measure
(real evaluations on the held-out split) the accuracy of
  - quantlens' suggested map (exact MCKP on measured output noise, then measured swap correction),
  - a greedy ordering (AIMET-AMP style: start at the highest precision and keep lowering the layer
    whose single-layer noise grows least per bit saved until the budget is met),
  - every uniform configuration,
and compare with the exhaustive optimum (all assignments enumerated and evaluated).
Run: python benchmarks/bench_allocator.py [--models mlp cnn]
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

import sample_models
from analysis.allocate import Budget, build_problem, suggest
from analysis.data import Dataset
from analysis.evaluate import Evaluator
from analysis.sweep import AnalysisConfig, analyze

FORMATS = ("int8", "int4", "int2")


def greedy(problem, limit):
    """Lower precision step by step, cheapest noise increase per bit saved first."""
    picks = [min(range(len(ch)), key=lambda i: (ch[i].noise, -ch[i].costs["avg-bits"])) for ch in problem.choices]
    while problem.totals(picks)["avg-bits"] > limit + 1e-9:
        best = None
        for layer, ch in enumerate(problem.choices):
            current = ch[picks[layer]]
            for i, c in enumerate(ch):
                saved = current.costs["avg-bits"] - c.costs["avg-bits"]
                if saved <= 0:
                    continue
                ratio = (c.noise - current.noise) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, layer, i)
        if best is None:
            break
        picks[best[1]] = best[2]
    return picks


def run(name: str) -> dict:
    calibration = sample_models.load_split(name, "calibration")
    evaluation = sample_models.load_split(name, "evaluation")
    task = sample_models.load_meta(name)["task"]
    cal = Dataset(calibration["inputs"], calibration["labels"], task, name)
    ev = Dataset(evaluation["inputs"], evaluation["labels"], task, name)
    model = sample_models.load_model(name)
    config = AnalysisConfig(weight_formats=FORMATS, act_formats=("int8",), targets=("both",), cumulative=False)
    result = analyze(model, cal, config)
    problem = build_problem(result, allow_fp32=False)
    evaluator = Evaluator(model, cal, ev, config)
    cache: dict[tuple[int, ...], dict] = {}

    def measure_picks(picks):
        key = tuple(picks)
        if key not in cache:
            cache[key] = evaluator.measure(problem.assignment(list(picks)))
        return cache[key]

    # Exhaustive: every assignment, measured.
    space = list(itertools.product(*[range(len(ch)) for ch in problem.choices]))
    for picks in space:
        measure_picks(picks)
    exhaustive = [(problem.totals(list(p))["avg-bits"], cache[p]["metric"]) for p in space]
    costs = sorted({round(c, 6) for c, _ in exhaustive})
    budgets = np.linspace(min(costs), max(costs), 9)
    rows, spent = [], 0
    for budget in budgets:
        optimum = max(m for c, m in exhaustive if c <= budget + 1e-9)
        ours = suggest(problem, Budget("avg-bits", float(budget)), measure=lambda a: evaluator.measure(a))
        spent += ours.evaluations
        ours_metric = ours.measured["metric"]
        greedy_picks = greedy(problem, budget)
        rows.append({
            "budget_avg_bits": round(float(budget), 3),
            "exhaustive": optimum,
            "quantlens": ours_metric, "quantlens_bits": round(ours.totals["avg-bits"], 3),
            "greedy": measure_picks(greedy_picks)["metric"],
            "regret_quantlens": optimum - ours_metric,
            "regret_greedy": optimum - measure_picks(greedy_picks)["metric"],
        })
    uniform = []
    for i, fmt in enumerate(FORMATS):
        picks = [next(j for j, c in enumerate(ch) if c.precision.weight == fmt) for ch in problem.choices]
        bits = problem.totals(picks)["avg-bits"]
        metric = measure_picks(picks)["metric"]
        best_at_cost = max(r["quantlens"] for r in rows if r["quantlens_bits"] <= bits + 1e-9) if any(
            r["quantlens_bits"] <= bits + 1e-9 for r in rows) else None
        uniform.append({"uniform": f"{fmt}/int8", "avg_bits": bits, "accuracy": metric,
                        "quantlens_best_at_or_below_cost": best_at_cost})
    return {
        "model": name, "layers": len(problem.layers), "assignments_enumerated": len(space),
        "fp32_accuracy": evaluator.fp32_metric, "rows": rows, "uniform": uniform,
        "max_regret_quantlens": max(r["regret_quantlens"] for r in rows),
        "max_regret_greedy": max(r["regret_greedy"] for r in rows),
        "mean_regret_quantlens": float(np.mean([r["regret_quantlens"] for r in rows])),
        "mean_regret_greedy": float(np.mean([r["regret_greedy"] for r in rows])),
        "quantlens_evaluations_per_budget": spent / len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    args = parser.parse_args()
    print(json.dumps([run(name) for name in args.models], indent=1))


if __name__ == "__main__":
    main()
