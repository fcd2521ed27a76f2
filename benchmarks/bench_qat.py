"""PTQ vs QAT on the sample CNN and MLP, where PTQ hurts: FP32, PTQ and QAT accuracy on held-out data.

Maps: uniform int4 weights / int8 activations, and a mixed int2/int4-weight map (int8 activations)
suggested by quantlens for a 3-bit average (its refinement judged on the calibration split, never on
the held-out one). QAT runs with the defaults (`QATConfig()`): it trains on the calibration split the
CLI uses (256 samples; 20 % of them carved out for validation) and is judged on the 500 held-out
evaluation samples. An ablation on the mixed maps measures the alternatives the defaults were chosen
against: LSQ-learned weight scales instead of recalibrated ranges, and cross-entropy on the labels
instead of distillation from the FP32 model. One thread; times are wall-clock on this machine.

Run: python benchmarks/bench_qat.py [--models mlp cnn] [--no-ablation] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

import sample_models
from analysis.allocate import build_problem, parse_budget, suggest
from analysis.config import QATConfig
from analysis.data import Dataset
from analysis.evaluate import Evaluator
from analysis.precision_map import PrecisionMap, uniform_map
from analysis.qat import finetune_qat
from analysis.sweep import AnalysisConfig, analyze


def _data(name: str, split: str) -> Dataset:
    raw = sample_models.load_split(name, split)
    return Dataset(raw["inputs"], raw["labels"], sample_models.load_meta(name)["task"], f"{name} {split}")


def maps(model, calibration: Dataset) -> dict[str, PrecisionMap]:
    sweep = AnalysisConfig(weight_formats=("int4", "int2"), act_formats=("int8",), targets=("both",), cumulative=False)
    result = analyze(model, calibration, sweep)
    judge = Evaluator(model, calibration, calibration, sweep.quant)  # the allocator never sees held-out data
    mixed = suggest(build_problem(result, allow_fp32=False), parse_budget("avg-bits=3"), measure=judge.measure)
    return {"W4A8 uniform": uniform_map(judge.layer_names, "int4", "int8"),
            f"W2/W4 A8 mixed ({mixed.totals['avg-bits']:.2f} bits)": mixed.map}


def run(name: str, ablation: bool) -> list[dict]:
    model = sample_models.load_model(name)
    calibration, evaluation = _data(name, "calibration"), _data(name, "evaluation")
    rows = []
    variants = {"default": QATConfig()}
    for label, pmap in maps(model, calibration).items():
        chosen = dict(variants)
        if ablation and "mixed" in label:
            chosen.update({"LSQ weight scales": replace(QATConfig(), ranges="lsq"),
                           "cross-entropy loss": replace(QATConfig(), loss="task")})
        for variant, config in chosen.items():
            started = time.perf_counter()
            result = finetune_qat(model, pmap, calibration, calibration, evaluation=evaluation, config=config)
            rows.append({"model": name, "map": label, "variant": variant, "fp32": result.fp32, "ptq": result.ptq,
                         "qat": result.qat, "returned": result.returned, "kept": result.kept,
                         "recovered": result.recovered, "best_epoch": result.best_epoch,
                         "epochs": len(result.history) - 1, "seconds": time.perf_counter() - started})
            print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict) -> str:
    recovered = "n/a" if row["recovered"] is None else f"{100 * row['recovered']:.0f} %"
    return (f"| {row['model'].upper()} | {row['map']} | {row['variant']} | {row['fp32']:.1f} | {row['ptq']:.1f} | "
            f"{row['qat']:.1f} | {recovered} | {row['kept']} (epoch {row['best_epoch']} of {row['epochs']}) | "
            f"{row['seconds']:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=["cnn", "mlp"])
    parser.add_argument("--no-ablation", action="store_true", help="only the default configuration")
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | map | QAT variant | FP32 % | PTQ % | QAT % | PTQ drop recovered | returned | time |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [row for name in args.models for row in run(name, not args.no_ablation)]
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
