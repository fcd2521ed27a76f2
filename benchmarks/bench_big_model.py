"""A ~100M-parameter GPT-style (or, with --arch llama, Hugging Face Llama) model through the full
weight-only int8/int4 sweep on this machine.

Reports wall time, peak RSS, and the memory criterion: peak < 3 × FP32 model size + the activation
cache bound. Random initialisation (the numbers are about time and memory, not accuracy).
Run: python benchmarks/bench_big_model.py [--arch gpt|llama] [--blocks 12] [--cache-mb 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn

from analysis.data import Dataset
from analysis.memory import return_freed_memory_to_the_os
from analysis.sweep import AnalysisConfig, analyze


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape[0], x.shape[1], x.shape[2]
        q, k, v = self.qkv(self.ln1(x)).split(dim, dim=2)
        shape = (batch, tokens, self.heads, dim // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 16384, dim: int = 768, blocks: int = 12, heads: int = 12, context: int = 128) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(blocks)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tokens.weight  # tied, as in GPT-2
        self.register_buffer("position_ids", torch.arange(context), persistent=False)

    def forward(self, idx):
        x = self.tokens(idx) + self.positions(self.position_ids[: idx.shape[1]])
        return self.head(self.ln(self.blocks(x)))


def build(arch: str, blocks: int, context: int) -> nn.Module:
    if arch == "gpt":
        return GPT(blocks=blocks, context=context).eval()
    from analysis.compat import import_torchvision

    import_torchvision()  # transformers imports torchvision when installed (see analysis.compat)
    import transformers

    config = transformers.LlamaConfig(vocab_size=16384, hidden_size=768, intermediate_size=2304,
                                      num_hidden_layers=blocks, num_attention_heads=12, num_key_value_heads=4,
                                      max_position_embeddings=max(context, 128), tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", choices=("gpt", "llama"), default="gpt",
                        help="llama: transformers' LlamaForCausalLM from a config (hidden 768, 12 heads / 4 key-value "
                             "heads, gated MLP 2304, tied embeddings: 95M parameters at 12 blocks), default config "
                             "(use_cache on: quantlens turns it off on its copy)")
    parser.add_argument("--engine", choices=("auto", "graph", "hooks"), default="auto")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--cache-mb", type=int, default=1024)
    parser.add_argument("--output-metrics", choices=("exact", "estimated", "both"), default="exact",
                        help="both: one fresh process per mode, side by side, with their rank agreement")
    parser.add_argument("--table", help=argparse.SUPPRESS)  # where a child process writes its layers.csv
    args = parser.parse_args()
    if args.output_metrics == "both":
        compare_modes(args)
        return
    # This process is ours, as the CLI's is: freed activation buffers go back to the OS (see analysis.memory).
    return_freed_memory_to_the_os()
    torch.manual_seed(0)
    baseline = peak_rss_mb()
    model = build(args.arch, args.blocks, args.tokens)
    params = sum(p.numel() for p in model.parameters())
    fp32_mb = params * 4 / 2**20
    idx = torch.randint(0, 16384, (args.sequences, args.tokens))
    data = Dataset(idx, torch.roll(idx, -1, dims=1), "language-model", "random tokens")
    config = AnalysisConfig(weight_formats=("int8", "int4"), act_formats=(), targets=("weights",),
                            cache_bytes=args.cache_mb << 20, num_samples=args.sequences,
                            output_metrics=args.output_metrics, engine=args.engine)
    after_model = peak_rss_mb()
    start = time.perf_counter()
    result = analyze(model, data, config)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    frame = result.to_frame()
    if args.table:
        frame.to_csv(args.table, index=False)
    worst = frame.sort_values("output_sqnr_db").iloc[0]
    print(json.dumps({
        "arch": args.arch, "engine": args.engine, "output_metrics": args.output_metrics,
        "parameters_m": round(params / 1e6, 1), "fp32_model_mb": round(fp32_mb), "layers": len(result.layers),
        "trials": len(result.trials), "chunks": result.data["chunks"], "sweep_seconds": round(seconds, 1),
        "peak_rss_mb": round(peak), "rss_before_model_mb": round(baseline), "rss_with_model_mb": round(after_model),
        "bound_mb": round(3 * fp32_mb + args.cache_mb), "within_bound": peak < 3 * fp32_mb + args.cache_mb,
        "most_sensitive": f"{worst['layer']} {worst['format']} {worst['output_sqnr_db']:.1f} dB",
    }, indent=1))


def compare_modes(args: argparse.Namespace) -> None:
    """Exact and estimated sweeps of the same model, each in its own process (peak RSS is per
    process), then the estimate's rank agreement with the exact table."""
    import subprocess
    import sys
    import tempfile

    import pandas as pd
    from scipy.stats import spearmanr

    work = tempfile.mkdtemp(prefix="quantlens-bench-big-")
    reports = {}
    for mode in ("exact", "estimated"):
        table = f"{work}/{mode}.csv"
        out = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--engine", args.engine,
                              "--blocks", str(args.blocks), "--sequences", str(args.sequences),
                              "--tokens", str(args.tokens), "--cache-mb", str(args.cache_mb), "--output-metrics", mode,
                              "--table", table], check=True, capture_output=True, text=True).stdout
        reports[mode] = json.loads(out[out.index("{"):])
        print(json.dumps(reports[mode], indent=1), flush=True)
    exact, estimated = (pd.read_csv(f"{work}/{mode}.csv").set_index(["layer", "format"]) for mode in ("exact", "estimated"))
    joined = exact[["output_mse"]].join(estimated[["output_mse"]].rename(columns={"output_mse": "output_mse_estimated"}))
    print(json.dumps({
        "estimated_over_exact_time": round(reports["estimated"]["sweep_seconds"] / reports["exact"]["sweep_seconds"], 3),
        "spearman_output_noise": round(float(spearmanr(joined["output_mse"], joined["output_mse_estimated"]).correlation), 3),
    }, indent=1))


if __name__ == "__main__":
    main()
