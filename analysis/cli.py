"""`quantlens` command line: parse, call the engine, print. No analysis logic lives here.

Every user error ends as one line on stderr and a non-zero exit, never a traceback (`--debug`
shows it when you do want one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A problem with what the user asked for; printed as one line."""


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="sample:<name> | path/to/file.py:factory | model.pt2")
    parser.add_argument("--weights", help="state dict for a file.py:factory model (.safetensors or .pt)")
    parser.add_argument("--data", required=True,
                        help="sample:<name> | data.npz/.pt/.safetensors (keys inputs, labels) | file.py:function")
    parser.add_argument("--task", choices=("classification", "language-model", "other"),
                        help="what the labels mean (default: inferred from their shape)")
    parser.add_argument("--samples", type=int, default=256, help="calibration samples to use (default 256)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantlens", description=(
        "Which layers lose precision, what it costs, and what precision each layer should get."))
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    analyze = sub.add_parser("analyze", help="per-layer isolation sweep: local, output and cumulative error")
    _add_model_args(analyze)
    analyze.add_argument("--weight-formats", default="int8,int4", help="comma-separated, e.g. int8,int4,int4-g32,fp8_e4m3")
    analyze.add_argument("--act-formats", default="int8", help="comma-separated, or 'none' for weight-only")
    analyze.add_argument("--targets", default="weights,activations,both", help="any of weights,activations,both")
    analyze.add_argument("--granularity", choices=("per-channel", "per-tensor", "per-group"),
                         help="weight granularity for format names without a suffix (default per-channel)")
    analyze.add_argument("--calibration", choices=("minmax", "percentile", "mse", "entropy"),
                         help="range calibration for weights and activations (default: mse for weights, percentile for activations)")
    analyze.add_argument("--weight-calibration", choices=("minmax", "percentile", "mse", "entropy"))
    analyze.add_argument("--act-calibration", choices=("minmax", "percentile", "mse", "entropy"))
    analyze.add_argument("--percentile", type=float, default=99.99)
    analyze.add_argument("--dynamic", action="store_true", help="dynamic activation ranges (computed at run time)")
    analyze.add_argument("--no-fold-batchnorm", action="store_true", help="analyse BatchNorm unfolded")
    analyze.add_argument("--local-only", action="store_true", help="skip output metrics (fast)")
    analyze.add_argument("--cache-mb", type=int, default=1024, help="bound on the activation cache (MiB)")
    analyze.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    analyze.add_argument("--quiet", action="store_true", help="no progress bar")
    analyze.add_argument("--out", required=True, help="output directory (layers.csv, analysis.json, report.html)")
    analyze.set_defaults(func=cmd_analyze)
    return parser


def _load(args: argparse.Namespace, split: str = "calibration"):
    from analysis.loading import check_compatible, load_data, load_model

    model = load_model(args.model, args.weights)
    data = load_data(args.data, split=split, task=args.task)
    check_compatible(model, data)
    return model, data


def _progress_bar(quiet: bool) -> tuple[Callable[[int, int, str], None] | None, Callable[[], None]]:
    if quiet:
        return None, lambda: None
    from tqdm import tqdm

    bar: list = []

    def update(done: int, total: int, label: str) -> None:
        if not bar:
            bar.append(tqdm(total=total, unit="trial", file=sys.stderr, dynamic_ncols=True, leave=False))
        bar[0].set_postfix_str(label[-30:], refresh=False)
        bar[0].update(done - bar[0].n)

    return update, lambda: bar[0].close() if bar else None


def cmd_analyze(args: argparse.Namespace) -> int:
    from analysis.report import write_report
    from analysis.runs import analyze_to_directory
    from analysis.sweep import AnalysisConfig

    if args.samples < 1:
        raise CLIError("--samples must be at least 1")
    config = AnalysisConfig(
        weight_formats=tuple(f.strip() for f in args.weight_formats.split(",") if f.strip() and f.strip().lower() != "none"),
        act_formats=tuple(f.strip() for f in args.act_formats.split(",") if f.strip() and f.strip().lower() != "none"),
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        granularity=args.granularity,
        weight_calibration=args.weight_calibration or args.calibration or "mse",
        act_calibration=args.act_calibration or args.calibration or "percentile",
        percentile=args.percentile,
        dynamic_activations=args.dynamic,
        fold_batchnorm=not args.no_fold_batchnorm,
        num_samples=args.samples,
        output_metrics=not args.local_only,
        cache_bytes=args.cache_mb * 1024 * 1024,
    )
    model, data = _load(args)
    progress, close = _progress_bar(args.quiet)
    out = Path(args.out)
    try:
        result = analyze_to_directory(model, data, config, out, resume=args.resume, progress=progress,
                                      model_spec=args.model, data_spec=args.data)
    finally:
        close()
    write_report(result, out / "report.html", title=f"quantlens: {args.model}")
    frame = result.to_frame()
    failed = int((frame["status"] == "failed").sum()) if not frame.empty else 0
    print(f"analysed {len(result.layers)} layers ({len(result.skipped)} skipped), {len(frame)} trials"
          f"{f', {failed} failed' if failed else ''} in {result.seconds:.1f}s -> {out}/layers.csv, analysis.json, report.html")
    _print_most_sensitive(frame)
    return 0


def _print_most_sensitive(frame, top: int = 5) -> None:
    if frame.empty or "output_sqnr_db" not in frame:
        return
    ok = frame[frame["status"] == "ok"]
    column = "output_sqnr_db" if ok["output_sqnr_db"].notna().any() else "sqnr_db"
    worst = ok.sort_values(column).head(top)
    print(f"most sensitive (lowest {column}):")
    for row in worst.itertuples():
        print(f"  {row.layer:<32} {row.target:<11} {row.format:<12} {getattr(row, column):6.1f} dB")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("quantlens: interrupted; finished trials are saved — rerun with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 — the one place every error becomes one line
        if args.debug:
            raise
        print(f"quantlens: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    known = ("CLIError", "LoadError", "FormatError", "ModelPreparationError", "ValueError", "FileNotFoundError",
             "MapError", "BudgetError", "KeyError")
    if type(exc).__name__ not in known and not isinstance(exc, (ValueError, FileNotFoundError)):
        return f"{type(exc).__name__}: {text} (run with --debug for the traceback)"
    return text.strip("'\"") if isinstance(exc, KeyError) else text


if __name__ == "__main__":
    sys.exit(main())
