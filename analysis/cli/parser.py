"""The `quantlens` argument parser: subcommands, their options and help, each bound to its command.

Built on every start (and for `--help`), so it imports only what its help text lists: the format
syntax, the calibration methods and the export targets come from the engine's registries, which
load torch but no toolchain (onnx, torchao) and no UI library (streamlit, plotly).
"""

from __future__ import annotations

import argparse

from analysis.config import ENGINES, OUTPUT_METRICS

DEFAULT_SEQ_LEN = 128
from analysis.cli.commands import (
    cmd_analyze, cmd_dashboard, cmd_evaluate, cmd_export, cmd_finetune, cmd_remedies, cmd_suggest,
)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="sample:<name> | Hugging Face model directory | torchvision:<name> | "
                        "timm:<name> (options as ?num_classes=10&key=value) | path/to/file.py:factory | model.pt2 "
                        "(with --map it may be left out: the map records its model)")
    parser.add_argument("--weights", help="state dict for a file.py:factory, torchvision or timm model "
                        "(.safetensors or .pt)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a Hugging Face model directory run the Python files it ships (off by default)")
    parser.add_argument("--data", required=True,
                        help="sample:<name> | data.npz/.pt/.safetensors (array 'inputs' or arrays named after "
                             "forward's parameters, e.g. input_ids, attention_mask; 'labels') | file.py:function | "
                             "corpus.txt with --tokenizer")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenize a text --data with this local Hugging Face tokenizer directory (default: the "
                             "model's directory when it has one); never downloaded")
    parser.add_argument("--seq-len", type=int, default=None, metavar="N",
                        help=f"tokens per sample for text data (default {DEFAULT_SEQ_LEN})")
    parser.add_argument("--task", choices=("classification", "language-model", "other"),
                        help="what the labels mean (default: inferred from their shape)")
    parser.add_argument("--samples", type=int, default=None,
                        help="calibration samples to use (default: the map's, else 256)")
    parser.add_argument("--device", default="cpu", help="where to compute: cpu, cuda, cuda:N or mps (default cpu)")


def _add_engine_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="what runs the model: graph, hooks or auto (default: the engine the analysis used, as "
                             "its map or analysis.json records it, else auto)")


def build_parser() -> argparse.ArgumentParser:
    from analysis.calibration import CALIBRATION_METHODS
    from analysis.formats import format_syntax

    parser = argparse.ArgumentParser(prog="quantlens", description=(
        "Which layers lose precision, what it costs, and what precision each layer should get."))
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    analyze = sub.add_parser("analyze", help="per-layer isolation sweep: local, output and cumulative error")
    _add_model_args(analyze)
    analyze.add_argument("--weight-formats", default="int8,int4",
                         help=f"comma-separated; formats: {format_syntax()}")
    analyze.add_argument("--act-formats", default="int8", help="comma-separated, or 'none' for weight-only")
    analyze.add_argument("--targets", default="weights,activations,both", help="any of weights,activations,both")
    analyze.add_argument("--granularity", choices=("per-channel", "per-tensor", "per-group"),
                         help="weight granularity for format names without a suffix (default per-channel)")
    analyze.add_argument("--calibration", choices=CALIBRATION_METHODS,
                         help="range calibration for weights and activations (default: mse for weights, percentile for activations)")
    analyze.add_argument("--weight-calibration", choices=CALIBRATION_METHODS)
    analyze.add_argument("--act-calibration", choices=CALIBRATION_METHODS)
    analyze.add_argument("--percentile", type=float, default=99.99)
    analyze.add_argument("--dynamic", action="store_true", help="dynamic activation ranges (computed at run time)")
    analyze.add_argument("--no-fold-batchnorm", action="store_true", help="analyse BatchNorm unfolded")
    analyze.add_argument("--output-metrics", choices=OUTPUT_METRICS, default=None,
                         help="model-output metrics per trial: exact (re-run the model after the layer; default), "
                              "estimated (first-order estimate from one backward pass per projection: much faster, "
                              "marked 'estimated'), none (local metrics only)")
    analyze.add_argument("--local-only", action="store_true", help="same as --output-metrics none")
    analyze.add_argument("--verify", type=int, default=0, metavar="K",
                         help="with --output-metrics estimated: re-measure exactly the K most sensitive trials of each format")
    analyze.add_argument("--projections", type=int, default=2, metavar="K",
                         help="random projections per chunk for estimated output metrics (more: less sampling noise, "
                              "one backward pass each)")
    analyze.add_argument("--engine", choices=ENGINES, default="auto",
                         help="what runs the sweep: graph (a traced copy of the model), hooks (your model run eagerly "
                              "with forward hooks: for models no tracer handles; exact output metrics only), auto "
                              "(graph, falling back to hooks with a note when the model cannot be traced; default)")
    analyze.add_argument("--cumulative", action="store_true",
                         help="also the cumulative view: every layer quantized at once, per format (a few passes each)")
    analyze.add_argument("--cache-mb", type=int, default=1024, help="bound on the activation cache (MiB)")
    analyze.add_argument("--low-memory", action="store_true",
                         help="return freed activation buffers to the OS (glibc): keeps the process near its "
                              "cache bound on big models, but every large allocation then costs page faults "
                              "(≈1.6x slower on small models)")
    analyze.add_argument("--workers", type=int, default=1, metavar="N",
                         help="run the sweep in N worker processes on Ray (pip install 'quantlens[ray]'), one model "
                              "copy each, the CPU cores split between them (on this machine this process is one of "
                              "the N); split by layer, or by chunks of samples with --output-metrics estimated; "
                              "results equal a single-process run")
    analyze.add_argument("--ray", metavar="ADDRESS", default=None,
                         help="run the workers on an existing Ray cluster: 'auto' or host:port (with --device cuda, "
                              "each worker gets a GPU)")
    analyze.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    analyze.add_argument("--quiet", action="store_true", help="no progress bar")
    analyze.add_argument("--out", required=True, help="output directory (layers.csv, analysis.json, report.html)")
    analyze.add_argument("--force", action="store_true",
                         help="replace files in --out that quantlens did not write (by default they are never overwritten)")
    analyze.set_defaults(func=cmd_analyze)

    suggest = sub.add_parser("suggest", help="mixed-precision map under a budget, with the Pareto front")
    suggest.add_argument("analysis", help="an analysis directory (the --out of `quantlens analyze`)")
    suggest.add_argument("--budget", required=True, help="avg-bits=5.5 | size-kb=120 | bops=1e9 | max-drop=0.5 | min-sqnr=30")
    suggest.add_argument("--out", help="write the map here (.json or .yaml; default: ANALYSIS/map.json)")
    suggest.add_argument("--no-fp32", action="store_true", help="never leave a layer in FP32")
    suggest.add_argument("--no-measure", action="store_true", help="trust the additive prediction; no model runs")
    suggest.add_argument("--eval-data", help="labelled data for max-drop and the front's task metric (default: the sample's evaluation split)")
    suggest.add_argument("--weights", help="weights for a file.py:factory model, as given to analyze")
    suggest.add_argument("--front-points", type=int, default=12, help="budgets on the Pareto front (0: none; at most 200)")
    suggest.add_argument("--evaluations", type=int, default=None, metavar="N",
                         help="real evaluations the measured search may spend on a cost budget (default 40); "
                              "it stops sooner when it stops gaining")
    suggest.add_argument("--no-groups", action="store_true",
                         help="no default deployment groups (fused q/k/v, gate/up, MoE experts share one format by default)")
    suggest.add_argument("--group", action="append", default=[], metavar="GLOB",
                         help="layers matching GLOB share one format (repeatable; one group per glob), e.g. 'blocks.0.*'")
    suggest.add_argument("--keep", choices=("fp32", "bf16", "fp16"), default="fp32",
                         help="what a layer left unquantized is kept in (bf16/fp16: analyse that format too)")
    suggest.add_argument("--force", action="store_true",
                         help="replace a map (or front CSV) that quantlens did not write or that was edited since")
    _add_engine_arg(suggest)
    suggest.set_defaults(func=cmd_suggest)

    evaluate = sub.add_parser("evaluate", help="apply a map (or uniform baselines) and measure it")
    _add_model_args(evaluate)
    evaluate.add_argument("--map", help="precision map (.json/.yaml); without it: FP32 and uniform baselines")
    evaluate.add_argument("--eval-data", help="labelled evaluation data (default: the sample's evaluation split, else --data)")
    evaluate.add_argument("--real", action="store_true", help="also run on real low-precision kernels (torchao)")
    evaluate.add_argument("--out", help="write the results as JSON here")
    evaluate.add_argument("--force", action="store_true",
                         help="replace an --out file that quantlens did not write")
    _add_engine_arg(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    finetune = sub.add_parser("finetune", help="quantization-aware fine-tuning under a map; keeps the PTQ model "
                              "unless fine-tuning beats it on a validation split")
    _add_model_args(finetune)
    finetune.add_argument("--map", required=True, help="precision map to train under")
    finetune.add_argument("--train-data", help="labelled training data (default: --data's calibration split)")
    finetune.add_argument("--val-data", help="validation data to select the checkpoint on "
                          "(default: 20%% carved from the training data)")
    finetune.add_argument("--eval-data", help="held-out data for FP32 / PTQ / QAT (default: the sample's evaluation split)")
    finetune.add_argument("--epochs", type=int, help="at most this many epochs; early stopping ends sooner (default 30)")
    finetune.add_argument("--lr", type=float, help="peak learning rate, after a one-epoch warm-up (default 1e-4)")
    finetune.add_argument("--batch-size", type=int, help="default 32")
    finetune.add_argument("--patience", type=int, help="stop after this many epochs without a better validation "
                          "score (0: never; default 8)")
    finetune.add_argument("--loss", choices=("distill", "task"), help="distill: KL to the FP32 model (default); "
                          "task: cross-entropy with the labels")
    finetune.add_argument("--ranges", choices=("recalibrate", "lsq"), help="weight ranges during training: the map's "
                          "calibration at every step (default) or LSQ-learned scales")
    finetune.add_argument("--keep", choices=("best", "last"), help="best: the best validation checkpoint, the PTQ "
                          "model included (default); last: the last epoch")
    finetune.add_argument("--quiet", action="store_true", help="no progress bar")
    finetune.add_argument("--out", required=True, help="write the fine-tuned weights (.safetensors)")
    finetune.add_argument("--out-map", help="write the map for the fine-tuned weights (default: OUT with .map.json)")
    finetune.add_argument("--force", action="store_true",
                         help="replace an --out or --out-map file that quantlens did not write")
    _add_engine_arg(finetune)
    finetune.set_defaults(func=cmd_finetune)

    remedy = sub.add_parser("remedies", help="try calibration remedies on one sensitive layer, each measured")
    _add_model_args(remedy)
    remedy.add_argument("--layer", required=True)
    remedy.add_argument("--weight-format", default="int4")
    remedy.add_argument("--act-format", help="e.g. int8 (default: weights only)")
    remedy.add_argument("--eval-data")
    remedy.set_defaults(func=cmd_remedies)

    from analysis.export import registry as exports  # light: target modules import their toolchains on use

    export = sub.add_parser("export", help="write a precision map in another tool's format")
    export.add_argument("map", help="precision map (.json/.yaml)")
    export.add_argument("--to", required=True, choices=exports.names(), help=exports.help_text())
    export.add_argument("--model", help=f"the model ({exports.need_text('model')})")
    export.add_argument("--weights", help="weights for a file.py:factory model")
    export.add_argument("--data", help=f"calibration data ({exports.need_text('calibration')})")
    export.add_argument("--out", required=True, help="output file")
    export.add_argument("--force", action="store_true",
                         help="replace an --out file that quantlens did not write")
    _add_engine_arg(export)
    export.set_defaults(func=cmd_export)

    dashboard = sub.add_parser("dashboard", help="open the interactive dashboard (Streamlit) on 127.0.0.1")
    dashboard.add_argument("--port", type=int, default=8501)
    dashboard.add_argument("--address", default="127.0.0.1", help="bind address (default: this machine only)")
    dashboard.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                           help="also answer requests for this host name (repeatable); by default only "
                           "localhost, the loopback addresses and --address are answered")
    dashboard.set_defaults(func=cmd_dashboard)
    return parser
