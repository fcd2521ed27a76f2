"""Sweep speed: quantlens' suffix re-execution vs the naive one-full-forward-per-trial approach.

Both sides share the same prepared model, quantized weights and metric code, so the ratio isolates
the execution strategy. Run: python benchmarks/bench_sweep.py [--samples 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from analysis.data import Dataset
from analysis.graph import bind_inputs, capture, primary_output, rerun
from analysis.metrics import ErrorAccumulator
from analysis.sweep import AnalysisConfig, Sweep


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResidualCNN(nn.Module):
    """stem + 9 residual blocks (2 convs each) + classifier = 20 quantizable layers."""

    def __init__(self, channels: int = 32, blocks: int = 9, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def naive_sweep(sweep: Sweep, trials) -> None:
    """What tools without a cached graph do: a full fake-quant forward for every layer × format."""
    analyzer = sweep.sim
    prepared = analyzer.prepared
    nodes = [n for n in prepared.nodes if n.op != "placeholder"]
    inputs = analyzer.data.inputs
    reference = capture(prepared, inputs)  # the FP32 pass, once
    ref_out = primary_output(reference[prepared.output_node])
    for trial in trials:
        sites = analyzer.table.sites[trial.layer]
        weight = analyzer.quantized_weight(trial.layer, trial.weight_format)
        overrides = {s.node: (lambda node, a, k, s=s: s.run(analyzer.gm, a, k, weight, None)) for s in sites}
        env = rerun(prepared, bind_inputs(prepared, inputs), nodes, overrides)
        local, output = ErrorAccumulator(), ErrorAccumulator(logits=True)
        for site in sites:
            local.update(reference[site.node], env[site.node])
        output.update(ref_out, primary_output(env[prepared.output_node]))
        local.result(), output.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    data = Dataset(torch.randn(args.samples, 3, 16, 16), torch.randint(0, 10, (args.samples,)), "classification", "random")
    config = AnalysisConfig(weight_formats=("int8", "int4"), act_formats=(), targets=("weights",),
                            weight_calibration="minmax", cumulative=False, num_samples=args.samples)
    sweep = Sweep(model, data, config)
    trials = sweep.plan()
    for trial in trials:  # quantize every weight up front: both sides reuse them
        sweep.sim.quantized_weight(trial.layer, trial.weight_format)
    ours, naive = [], []
    for _ in range(args.repeats):  # interleaved so machine noise hits both sides alike
        start = time.perf_counter()
        sweep.sim.release_cache()
        sweep.run()
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        naive_sweep(sweep, trials)
        naive.append(time.perf_counter() - start)
    result = {
        "layers": len(sweep.layers), "trials": len(trials), "samples": args.samples,
        "quantlens_s": min(ours), "naive_s": min(naive), "ratio": min(ours) / min(naive),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
