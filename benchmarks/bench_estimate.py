"""Estimated vs exact output metrics: whole-process time and rank agreement, side by side in one run.

Part 1 (time a user waits for): three fresh processes on the same 20-layer residual CNN, 256 samples,
int8 + int4 weight-only — the naive sweep (one full fake-quant forward per trial, as tools without a
cached graph do), `quantlens analyze` exact and `quantlens analyze --output-metrics estimated`. Each
process imports, loads, sweeps and writes its table; wall time is measured from outside.

Part 2 (are the estimates right): per model, Spearman rank correlation of estimated vs exact output
noise over all trials, and how many of the 5 most sensitive layers per format agree — for quantlens'
projection estimate and for the gradient-only (diagonal) variant Σ_k g_k²·δ_k² that drops the cross
terms between error elements (the form gradient-sensitivity tools use).

Run: python benchmarks/bench_estimate.py [--repeats 1] [--skip-time] [--skip-rank]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from analysis.data import Dataset  # noqa: E402
from analysis.estimate import NoiseEstimate, node_difference, output_gradients  # noqa: E402
from analysis.graph import load_args  # noqa: E402
from analysis.sweep import AnalysisConfig, Sweep  # noqa: E402

SAMPLES = 256


# --- part 1: whole processes ---------------------------------------------------------------------

def residual_cnn():
    """The factory the CLI loads (weights come from --weights)."""
    from bench_sweep import ResidualCNN

    return ResidualCNN()


def naive_process(model_spec: str, weights: str, data_path: str, out: str) -> None:
    """What a user of a naive tool waits for: import, load, FP32 pass, then one full forward per trial."""
    from analysis.cli.commands import _load  # noqa: F401 — same import cost as the CLI
    from analysis.loading import load_data, load_model
    from bench_sweep import naive_sweep

    model = load_model(model_spec, weights=weights)
    data = load_data(data_path)
    config = AnalysisConfig(weight_formats=("int8", "int4"), act_formats=(), targets=("weights",),
                            weight_calibration="mse", num_samples=SAMPLES)
    sweep = Sweep(model, data, config)
    naive_sweep(sweep, sweep.plan())
    Path(out).write_text("done\n")


def time_processes(repeats: int, size: int) -> dict[str, list[float]]:
    from safetensors.torch import save_file

    work = Path(tempfile.mkdtemp(prefix="quantlens-bench-estimate-"))
    torch.manual_seed(0)
    save_file(residual_cnn().state_dict(), str(work / "weights.safetensors"))
    torch.manual_seed(1)
    np.savez(work / "data.npz", inputs=torch.randn(SAMPLES, 3, size, size).numpy(),
             labels=torch.randint(0, 10, (SAMPLES,)).numpy())
    spec = f"{ROOT / 'benchmarks' / 'bench_estimate.py'}:residual_cnn"
    common = [spec, "--weights", str(work / "weights.safetensors"), "--data", str(work / "data.npz"),
              "--samples", str(SAMPLES), "--weight-formats", "int8,int4", "--act-formats", "none",
              "--targets", "weights", "--quiet"]
    commands = {
        "naive (full forward per trial)": [sys.executable, __file__, "--naive-process", spec,
                                           str(work / "weights.safetensors"), str(work / "data.npz"), str(work / "naive.txt")],
        "quantlens exact": [sys.executable, "-m", "analysis.cli", "analyze", *common, "--out", str(work / "exact")],
        "quantlens estimated": [sys.executable, "-m", "analysis.cli", "analyze", *common, "--output-metrics",
                                "estimated", "--out", str(work / "estimated")],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):  # interleaved, so drift in machine speed hits every side alike
        for name, command in commands.items():
            started = time.perf_counter()
            subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - started)
    return times


# --- part 2: rank agreement ----------------------------------------------------------------------

def models() -> dict[str, tuple[torch.nn.Module, Dataset]]:
    import sample_models as sm
    from analysis.loading import load_data
    from bench_sweep import ResidualCNN

    out = {}
    for name in ("cnn", "transformer"):
        out[f"sample {name}"] = (sm.load_model(name), load_data(f"sample:{name}"))
    torch.manual_seed(0)
    out["20-layer residual CNN"] = (ResidualCNN().eval(), Dataset(torch.randn(SAMPLES, 3, 16, 16),
                                                                   torch.randint(0, 10, (SAMPLES,)), "classification", "random"))
    try:
        from analysis.compat import import_torchvision

        import_torchvision()  # transformers imports torchvision when installed (see analysis.compat)
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        print(f"transformers cannot be imported ({exc}): skipping the Llama-architecture model")
        return out

    class CausalLM(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids, use_cache=False).logits

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    ids = torch.randint(0, 512, (64, 32))
    out["Llama-architecture (4 layers, random init)"] = (CausalLM(LlamaForCausalLM(config)).eval(),
                                                         Dataset(ids, ids, "language-model", "random tokens"))
    return out


def diagonal_estimates(sweep: Sweep, projections: int) -> dict:
    """Σ_k g_k²·δ_k² per trial (averaged over the projections): the gradient-only variant."""
    sim = sweep.sim
    trials = sweep.plan()
    nodes = list(dict.fromkeys(s.node for layer in sweep.layers for s in sim.sites(layer.name)))
    noise = {t.key: NoiseEstimate(diagonal=True) for t in trials}
    for chunk in sim.chunks():
        cache = sim.cache(chunk)
        grads = output_gradients(sim, chunk, nodes, projections)
        for trial in trials:
            weight = sim.quantized_weight(trial.layer, trial.weight_format)
            deltas = {}
            with torch.inference_mode():
                for site in sim.sites(trial.layer):
                    args, kwargs = load_args(site.node, cache)
                    deltas[site.node] = node_difference(site.run(sim.gm, args, kwargs, weight, None), cache[site.node])
            noise[trial.key].update(grads, deltas)
    return {key: estimate.result().mse for key, estimate in noise.items()}


def rank_agreement() -> list[dict]:
    from scipy.stats import spearmanr

    rows = []
    for name, (model, data) in models().items():
        base = dict(weight_formats=("int8", "int4"), act_formats=(), targets=("weights",),
                    num_samples=min(SAMPLES, len(data)))
        started = time.perf_counter()
        exact = Sweep(model, data, AnalysisConfig(**base)).run()
        exact_s = time.perf_counter() - started
        started = time.perf_counter()
        estimate_sweep = Sweep(model, data, AnalysisConfig(**base, output_metrics="estimated"))
        estimated = estimate_sweep.run()
        estimated_s = time.perf_counter() - started
        diagonal = diagonal_estimates(estimate_sweep, estimate_sweep.config.estimate_projections)
        keys = [t.key for t in exact.trials]
        truth = {t.key: t.output.mse for t in exact.trials}
        projected = {t.key: t.output.mse for t in estimated.trials}

        def top5(values: dict, fmt: str) -> set:
            return set(sorted((k for k in keys if k[2] == fmt), key=lambda k: -values[k])[:5])

        row = {"model": name, "layers": len(exact.layers), "trials": len(keys),
               "exact_s": round(exact_s, 1), "estimated_s": round(estimated_s, 1)}
        for label, values in (("projection", projected), ("diagonal", diagonal)):
            row[f"{label}_spearman"] = round(float(spearmanr([truth[k] for k in keys], [values[k] for k in keys]).correlation), 3)
            row[f"{label}_top5"] = {fmt: len(top5(truth, fmt) & top5(values, fmt)) for fmt in ("int8", "int4")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def map_quality() -> list[dict]:
    """Maps suggested from an estimated table vs from an exact one, same budgets, both measured."""
    import math

    import sample_models as sm
    from analysis.allocate import build_problem, parse_budget, suggest
    from analysis.evaluate import Evaluator
    from analysis.loading import load_data

    rows = []
    for name in ("mlp", "cnn"):
        model, data = sm.load_model(name), load_data(f"sample:{name}")
        base = dict(weight_formats=("int8", "int4", "int2"), act_formats=(), targets=("weights",), num_samples=256)
        tables = {mode: Sweep(model, data, AnalysisConfig(**base, output_metrics=mode)).run()
                  for mode in ("exact", "estimated")}
        evaluator = Evaluator(model, data)
        signal = float(evaluator.sim.forward(data.inputs[:256], {}).double().pow(2).mean())
        for bits in (3, 4, 5, 6):
            row = {"model": f"sample {name}", "budget": f"avg-bits={bits}"}
            for mode, table in tables.items():
                choice = suggest(build_problem(table), parse_budget(f"avg-bits={bits}"), measure=evaluator.measure)
                noise = evaluator.measure(build_problem(table).assignment(choice.picks))["noise"]
                row[f"{mode}_db"] = round(10 * math.log10(signal / noise), 2) if noise > 0 else 100.0
            row["difference_db"] = round(row["estimated_db"] - row["exact_db"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--size", type=int, default=32, help="image side of the whole-process benchmark's inputs")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-rank", action="store_true")
    parser.add_argument("--skip-maps", action="store_true")
    parser.add_argument("--naive-process", nargs=4, metavar=("MODEL", "WEIGHTS", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_process:
        naive_process(*args.naive_process)
        return
    if not args.skip_time:
        times = time_processes(args.repeats, args.size)
        naive = min(times["naive (full forward per trial)"])
        print(f"whole process (best of {args.repeats}), 20-layer residual CNN, 256 samples of 3x{args.size}x{args.size}, "
              "int8+int4 weight-only:")
        for name, values in times.items():
            print(f"  {name:<32} {min(values):6.1f} s   {min(values) / naive:.2f}x naive")
    if not args.skip_rank:
        rank_agreement()
    if not args.skip_maps:
        map_quality()


if __name__ == "__main__":
    main()
