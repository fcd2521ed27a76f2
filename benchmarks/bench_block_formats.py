"""Per-trial cost of a sweep in block formats (MX, NVFP4) against integer formats.

The residual CNN of bench_sweep.py (20 layers, BatchNorm folded), each format set swept from scratch
(weights quantized and, for integer activations, ranges calibrated inside the timed run; sets of one
group have equal trial counts) with the default calibration (MSE clipping for integer weights, 99.99th percentile for integer activations;
block formats need neither: their scales come from each block). Best of `--repeats` runs, format
sets alternated so machine noise hits each alike. Run: python benchmarks/bench_block_formats.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from analysis.data import Dataset
from analysis.sweep import AnalysisConfig, Sweep
from bench_sweep import ResidualCNN  # the same model as the sweep benchmark

SETS = {  # label -> (weight formats, activation formats, dynamic integer activations)
    "weights int8, int4": (("int8", "int4"), (), False),
    "weights mxfp8_e4m3, mxfp4": (("mxfp8_e4m3", "mxfp4"), (), False),
    "weights nvfp4, mxint8": (("nvfp4", "mxint8"), (), False),
    "weights + inputs int8 (static)": (("int8",), ("int8",), False),
    "weights + inputs int8 (dynamic)": (("int8",), ("int8",), True),
    "weights + inputs mxfp8_e4m3": (("mxfp8_e4m3",), ("mxfp8_e4m3",), False),
    "weights + inputs nvfp4": (("nvfp4",), ("nvfp4",), False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    data = Dataset(torch.randn(args.samples, 3, 16, 16), torch.randint(0, 10, (args.samples,)), "classification", "random")
    best: dict[str, float] = {}
    trials: dict[str, int] = {}
    for _ in range(args.repeats):
        for label, (weights, acts, dynamic) in SETS.items():
            config = AnalysisConfig(weight_formats=weights, act_formats=acts, targets=("both",) if acts else ("weights",),
                                    cumulative=False, num_samples=args.samples, dynamic_activations=dynamic)
            sweep = Sweep(model, data, config)  # preparing the model is the same for every set: not timed
            start = time.perf_counter()
            result = sweep.run()
            elapsed = time.perf_counter() - start
            trials[label] = len(result.trials)
            best[label] = min(best.get(label, float("inf")), elapsed / len(result.trials))
            print(f"{label}: {1000 * elapsed / len(result.trials):.1f} ms per trial", file=sys.stderr, flush=True)
    print(json.dumps({label: {"trials": trials[label], "ms_per_trial": round(1000 * best[label], 1)} for label in SETS},
                     indent=1))


if __name__ == "__main__":
    main()
