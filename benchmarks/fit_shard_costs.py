"""Where the constants of `analysis.distributed.layer_costs` come from: a sweep of a GPT (one
intra-op thread, exact output metrics, weight-only int8/int4) timed trial by trial, at two data
sizes, then a least-squares fit of each layer's time to the three things a trial does:

    seconds ≈ a · (multiply-accumulates re-run, over the samples)
            + b · (trials × samples)          — one comparison of the model's output per sample
            + c · (trials × weight elements)  — quantizing the layer's weight once (range search)

b / (a · output elements per sample) and c / a are OUTPUT_COST (logits) and WEIGHT_COST in
multiply-accumulate equivalents. The report also says how far each layer's time is from its share
under the planner's costs and under multiply-accumulates alone (what the planner counted before):
a shard's run time is off by as much as its layers' costs are.
Run: python benchmarks/fit_shard_costs.py [--blocks 4] [--sequences 4 16] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--sequences", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    import numpy as np
    import torch

    from analysis.data import Dataset
    from analysis.distributed import OUTPUT_COST, WEIGHT_COST, layer_costs, layer_work
    from analysis.sweep import AnalysisConfig, Sweep
    from bench_big_model import GPT

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(blocks=args.blocks, context=args.tokens).eval()
    rows, planned, elements = [], {}, 0
    for samples in args.sequences:  # several data sizes: per-sample costs apart from per-trial ones
        idx = torch.randint(0, 16384, (samples, args.tokens))
        data = Dataset(idx, torch.roll(idx, -1, dims=1), "language-model", "random tokens")
        config = AnalysisConfig(weight_formats=("int8", "int4"), act_formats=(), targets=("weights",),
                                num_samples=samples)
        sweep = Sweep(model, data, config)
        sim, trials = sweep.sim, sweep.plan()
        elements = sim.output_elements
        planned[samples] = layer_costs(sweep, trials)
        work = layer_work(sweep, trials)
        # One sweep, timed trial step by trial step (the progress callback follows each): what a
        # shard runs. The first layer's steps also hold each chunk's FP32 capture, shared by every
        # trial, so that layer is left out of the fit.
        spent: dict[str, float] = {}
        last = [time.perf_counter()]

        def step(done: int, total: int, layer: str) -> None:
            now = time.perf_counter()
            if layer:
                spent[layer] = spent.get(layer, 0.0) + now - last[0]
            last[0] = now

        Sweep(None, None, config, progress=step, sim=sim).run()
        for layer in sweep.layers[1:]:
            w = work[layer.name]
            rows.append({"samples": samples, "chunks": len(sim.chunks()), "layer": layer.name, "seconds": spent[layer.name],
                         "rerun_macs": w.rerun_macs * samples * w.trials, "trial_samples": w.trials * samples,
                         "weight_elements": w.weighted * w.weight_elements})
    matrix = np.array([[r["rerun_macs"], r["trial_samples"], r["weight_elements"]] for r in rows], dtype=float)
    seconds = np.array([r["seconds"] for r in rows])
    (a, b, c), *_ = np.linalg.lstsq(matrix, seconds, rcond=None)

    def worst(costs: dict[str, float], samples: int) -> float:
        """Largest |time the costs give a layer − its time| / its time, the run's total shared out by cost."""
        mine = [r for r in rows if r["samples"] == samples]
        total = sum(r["seconds"] for r in mine)
        share = sum(costs[r["layer"]] for r in mine)
        return max(abs(costs[r["layer"]] / share * total - r["seconds"]) / r["seconds"] for r in mine)

    print(json.dumps({
        "blocks": args.blocks, "sequences": args.sequences, "tokens": args.tokens, "output_elements": elements,
        "gmac_per_second": round(1 / a / 1e9, 1),
        "fitted_output_cost": round(b / a / elements), "used_output_cost": OUTPUT_COST[True],
        "fitted_weight_cost": round(c / a), "used_weight_cost": WEIGHT_COST,
        "fit_worst_error": round(float(np.max(np.abs(matrix @ np.array([a, b, c]) - seconds) / seconds)), 3),
        "planner_worst_error": {n: round(worst(planned[n], n), 3) for n in args.sequences},
        "macs_only_worst_error": {n: round(worst({r["layer"]: r["rerun_macs"] for r in rows if r["samples"] == n}, n), 3)
                                  for n in args.sequences},
        "layers": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }, indent=1))


if __name__ == "__main__":
    main()
