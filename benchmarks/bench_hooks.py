"""The hook engine against the graph engine, and what block re-runs save.

A Llama-architecture causal LM built from a config (transformers, random init; default 8 blocks,
hidden 64), 16 sequences of 64 tokens, weight-only int8 + int4 with exact output metrics, swept
three ways in one process (times include preparing the simulator: tracing, calibration), interleaved over `--repeats` rounds (best time kept):

- graph: the traced copy (torch.export for this model), re-executing each layer's descendants;
- hooks: the eager model with forward hooks, each trial re-run from the block holding its layer;
- hooks, whole model: the same with block re-runs off (every trial runs the whole model).

Also checks that the three tables agree (largest difference in output SQNR, dB).

Run: python benchmarks/bench_hooks.py [--layers 8] [--hidden 64] [--repeats 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.data import Dataset  # noqa: E402
from analysis.hooks import HookSim  # noqa: E402
from analysis.quantsim import QuantSim  # noqa: E402
from analysis.sweep import AnalysisConfig, Sweep  # noqa: E402


def build(layers: int, hidden: int) -> torch.nn.Module:
    from analysis.compat import import_torchvision

    import_torchvision()  # transformers imports torchvision when installed (a CUDA wheel needs the guard)
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build(args.layers, args.hidden)
    ids = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(1))
    data = Dataset(ids, ids, "language-model", "tokens")
    config = AnalysisConfig(weight_formats=("int8", "int4"), act_formats=(), targets=("weights",),
                            num_samples=len(data))
    makers = {
        "graph": lambda: QuantSim(model, data, config.quant),
        "hooks (block re-runs)": lambda: HookSim(model, data, config.quant),
        "hooks (whole model)": lambda: HookSim(model, data, config.quant, block_reruns=False),
    }
    best: dict[str, float] = {}
    tables: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, make in makers.items():
            started = time.perf_counter()
            sim = make()
            result = Sweep(model, data, config, sim=sim).run()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
            tables[name] = {t.key if hasattr(t, "key") else (t.layer, t.weight_format): t.output.sqnr_db
                            for t in result.trials}
    trials = len(tables["graph"])
    print(f"Llama-architecture, {args.layers} blocks, hidden {args.hidden}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; {trials} trials")
    print("| engine | sweep time (s) | vs graph |")
    print("|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.1f} | {seconds / best['graph']:.2f}x |")
    worst = max(abs(tables[name][key] - tables["graph"][key]) for name in tables for key in tables["graph"])
    print(f"largest output-SQNR difference from the graph engine: {worst:.2e} dB")


if __name__ == "__main__":
    main()
