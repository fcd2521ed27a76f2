"""What each `quantlens` subcommand does: load what it names, call the engine, print the outcome.

One `cmd_*` function per subcommand, each taking the parsed arguments and returning an exit status;
the helpers they share (loading a model and data, picking the evaluation split, the model a map is
for) sit beside them. Separate from the parser so that building the parser, which runs on every
start and for `--help`, stays free of the engine's heavy imports: everything here imports what it
uses inside the function that uses it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable


class CLIError(Exception):
    """A problem with what the user asked for; printed as one line."""


MAX_CACHE_MB = 1 << 24  # 16 TiB: beyond any machine; larger numbers are typos


def _load(args: argparse.Namespace, split: str = "calibration"):
    if args.model is None:
        raise CLIError("name the model: sample:<name>, path/to/file.py:factory or model.pt2")
    from analysis.loading import check_compatible, load_data, load_model

    model = load_model(args.model, args.weights, trust_remote_code=getattr(args, "trust_remote_code", False))
    data = load_data(args.data, split=split, task=args.task, max_samples=args.samples)
    check_compatible(model, data)
    return model, data


def _files_read(*specs: str | None) -> tuple[str, ...]:
    """The files a command reads, from its specs ("file.py:function" reads file.py; samples none):
    an output is never written over one of them."""
    files = []
    for spec in specs:
        if spec and not str(spec).startswith("sample:"):
            head, sep, _ = str(spec).rpartition(":")
            files.append(head if sep and head.endswith(".py") else str(spec))
    return tuple(files)


def _check_output(path: str | Path, args: argparse.Namespace, *inputs: str | None) -> Path:
    """Refuse, before any work, an output that would replace an input or a file quantlens did not
    write (unless --force)."""
    from analysis.runstore import check_writable

    path = Path(path)
    check_writable(path, force=getattr(args, "force", False), inputs=_files_read(*inputs))
    return path


def _progress_bar(quiet: bool, unit: str = "trial") -> tuple[Callable[[int, int, str], None] | None, Callable[[], None]]:
    if quiet:
        return None, lambda: None
    from tqdm import tqdm

    bar: list = []

    def update(done: int, total: int, label: str) -> None:
        if not bar:
            # Shown at the first report (the sweep sends one before its first step); `initial`: a
            # resumed run starts where it left off, and its rate (so the ETA) counts only new steps.
            bar.append(tqdm(total=total, initial=done, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False))
        if bar[0].total != total:  # --verify's pass: its size is known once the sweep has chosen
            bar[0].total = total
            bar[0].refresh()
        bar[0].set_postfix_str(label[-40:], refresh=False)
        bar[0].update(done - bar[0].n)

    return update, lambda: bar[0].close() if bar else None


def cmd_analyze(args: argparse.Namespace) -> int:
    from analysis.report import write_report
    from analysis.runs import analyze_to_directory
    from analysis.config import AnalysisConfig
    from analysis.runstore import Inputs

    from analysis.runs import check_run_folder

    args.samples = 256 if args.samples is None else args.samples
    if args.samples < 1:
        raise CLIError("--samples must be at least 1")
    if not 1 <= args.cache_mb <= MAX_CACHE_MB:
        raise CLIError(f"--cache-mb {args.cache_mb} is out of range; use 1 to {MAX_CACHE_MB} (MiB)")
    if args.workers < 1:
        raise CLIError(f"--workers must be at least 1, not {args.workers}")
    if args.low_memory:
        from analysis.memory import return_freed_memory_to_the_os

        # Opt-in and only here: this process is ours for the rest of the command.
        return_freed_memory_to_the_os()
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
        output_metrics=_output_metrics(args),
        estimate_projections=args.projections,
        verify=args.verify,
        cumulative=args.cumulative,
        cache_bytes=args.cache_mb * 1024 * 1024,
        device=args.device,
        workers=args.workers,
        ray_address=args.ray,
        engine=args.engine,
    )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; name a folder for the run's files")
    if not args.resume:  # refused before the model is even loaded
        check_run_folder(out, force=args.force, inputs=_files_read(args.model, args.weights, args.data))
    model, data = _load(args)
    progress, close = _progress_bar(args.quiet)
    try:
        # The inputs go into the run's meta.json: the dashboard can then resume or evaluate this run.
        inputs = Inputs(args.model, args.data, weights=args.weights, task=args.task, label=args.model)
        result = analyze_to_directory(model, data, config, out, resume=args.resume, progress=progress, inputs=inputs,
                                      force=args.force)
    finally:
        close()
    write_report(result, out / "report.html", title=f"quantlens: {args.model}")
    frame = result.to_frame()
    failed = int((frame["status"] == "failed").sum()) if not frame.empty else 0
    _print_engine(result.model.get("engine"))
    print(f"analysed {len(result.layers)} layers ({len(result.skipped)} skipped), {len(frame)} trials"
          f"{f', {failed} failed' if failed else ''} in {result.seconds:.1f}s -> {out}/layers.csv, analysis.json, report.html")
    coverage = result.model.get("weight_coverage") or {}
    if coverage.get("total_weights") and coverage["analysed_weights"] < coverage["total_weights"]:
        print(f"note: the analysed layers hold {100 * coverage['analysed_weights'] / coverage['total_weights']:.0f} % "
              f"of the model's weight-matrix parameters ({coverage['analysed_weights']:,} of "
              f"{coverage['total_weights']:,}); the rest stay FP32 (see skipped below)")
    for cum in result.cumulative:
        if cum.error is not None:
            print(f"  cumulative view {cum.target} {cum.format} failed: {cum.error}")
    for skipped in result.skipped[:10]:
        print(f"  skipped {skipped.name} ({skipped.kind}): {skipped.reason}")
    if len(result.skipped) > 10:
        print(f"  ... and {len(result.skipped) - 10} more skipped (see analysis.json)")
    _print_most_sensitive(frame)
    return 0


def _print_engine(engine: str | None) -> None:
    if engine == "hooks":
        print("engine: hooks (your model run eagerly with forward hooks)")


def _output_metrics(args) -> str:
    if args.local_only and args.output_metrics not in (None, "none"):
        raise CLIError(f"--local-only contradicts --output-metrics {args.output_metrics}; give one of them")
    return "none" if args.local_only else (args.output_metrics or "exact")


def _print_most_sensitive(frame, top: int = 5) -> None:
    if frame.empty or "output_sqnr_db" not in frame:
        return
    ok = frame[frame["status"] == "ok"]
    column = "output_sqnr_db" if ok["output_sqnr_db"].notna().any() else "sqnr_db"
    worst = ok.sort_values(column).head(top)
    print(f"most sensitive (lowest {column}):")
    for row in worst.itertuples():
        mark = " (estimated)" if column == "output_sqnr_db" and getattr(row, "output_source", "") == "estimated" else ""
        print(f"  {row.layer:<32} {row.target:<11} {row.format:<12} {getattr(row, column):6.1f} dB{mark}")


def _eval_spec(data_spec: str | None, eval_spec: str | None) -> tuple[str | None, str]:
    """Evaluation data: given explicitly, else a sample's held-out split, else the calibration data."""
    if eval_spec:
        return eval_spec, "evaluation"
    if data_spec and data_spec.startswith("sample:"):
        return data_spec, "evaluation"
    return data_spec, "calibration"


def _evaluator(model, data_spec: str, eval_spec: str | None, task: str | None, config, device: str = "cpu",
               engine: str = "auto"):
    from analysis.evaluate import Evaluator
    from analysis.loading import check_compatible, load_data

    calibration = load_data(data_spec, split="calibration", task=task, max_samples=config.num_samples)
    check_compatible(model, calibration)
    spec, split = _eval_spec(data_spec, eval_spec)
    evaluation = load_data(spec, split=split, task=task) if spec else calibration
    return Evaluator(model, calibration, evaluation, config, device=device, engine=engine)


def cmd_suggest(args: argparse.Namespace) -> int:
    from analysis.allocate import DEFAULT_EVALUATIONS, apply_groups, build_problem, parse_budget, resolve_groups, suggest
    from analysis.config import QuantConfig
    from analysis.loading import load_model
    from analysis.provenance import Provenance, check_model, engine_for, weights_to_load
    from analysis.results import load_analysis

    from analysis.allocate import check_front_points

    budget = parse_budget(args.budget)
    check_front_points(args.front_points)
    out = Path(args.out) if args.out else Path(args.analysis) / "map.json"
    analysis_files = [str(Path(args.analysis) / name) for name in ("analysis.json", "run.json", "trials.jsonl",
                                                                 "layers.csv", "report.html", "meta.json")]
    read = (args.analysis, *analysis_files, args.eval_data, args.weights)
    _check_output(out, args, *read)  # before any model runs: a hand-edited map is not replaced
    if args.front_points > 0:
        _check_output(_front_path(out), args, *read)
    evaluations = DEFAULT_EVALUATIONS if args.evaluations is None else args.evaluations
    if evaluations < 1:
        raise CLIError(f"--evaluations {evaluations} is too small; give at least 1 (the chosen map is always measured)")
    result = load_analysis(args.analysis)
    problem = build_problem(result, allow_fp32=not args.no_fp32, keep=args.keep)
    names = [layer.name for layer in problem.layers]
    problem = apply_groups(problem, resolve_groups(names, defaults=not args.no_groups, globs=args.group))
    quant = QuantConfig.from_dict(result.config["quant"], f"{args.analysis}: quant")
    provenance = Provenance.of_result(result)
    evaluator = None
    model_spec, data_spec = provenance.model_spec, provenance.data_spec
    if not args.no_measure or budget.kind == "max-drop":
        if not model_spec or not data_spec:
            raise CLIError("this analysis does not record its model and data; pass --no-measure "
                           "(max-drop budgets need them: re-run analyze with the CLI)")
        weights = weights_to_load(provenance, args.weights, f"the analysis in {args.analysis}")
        model = load_model(model_spec, weights)
        check_model(provenance.model_fingerprint, model, f"the analysis in {args.analysis}",
                    "pass the --weights the analysis used, or re-run `quantlens analyze`")
        evaluator = _evaluator(model, data_spec, args.eval_data, result.data.get("task"), quant,
                               engine=engine_for(args.engine, provenance))
        _print_engine(evaluator.sim.engine)
    judge = None
    if evaluator is not None:
        from analysis.allocate.judging import judging

        split = "eval-data" if args.eval_data else _eval_spec(data_spec, None)[1]
        judge = judging(evaluator, split, problem.signal)
    measure = judge.measure if judge else None
    suggestion = suggest(problem, budget, measure=measure, fingerprint=provenance.model_fingerprint,
                         provenance=provenance.to_dict(), evaluations=evaluations,
                         use_metric=judge.use_metric if judge else True,
                         judged_on=judge.judged_on if judge else None, extra_notes=judge.notes if judge else ())
    from analysis.runstore import write_output

    text = suggestion.map.dumps("yaml" if out.suffix in (".yaml", ".yml") else "json")
    write_output(out, lambda tmp: tmp.write_text(text), force=True)  # checked before the search
    totals = suggestion.totals
    print(f"map for {budget}: avg weight bits {totals['avg-bits']:.2f}, {totals['size-kb']:.1f} KiB, "
          f"{totals['bops']:.3g} BOPs; predicted output SQNR {suggestion.predicted_sqnr_db:.1f} dB -> {out}")
    if suggestion.measured:
        measured = suggestion.measured
        extra = f", {evaluator.metric_name} {measured['metric']:.2f} (drop {measured['drop']:+.2f})" if "metric" in measured else ""
        print(f"measured: output SQNR {measured['sqnr_db']:.1f} dB{extra} after {suggestion.evaluations} evaluation(s)")
    if suggestion.groups:
        shown = "; ".join(", ".join(group) for group in suggestion.groups[:3])
        more = f" (+{len(suggestion.groups) - 3} more)" if len(suggestion.groups) > 3 else ""
        print(f"{len(suggestion.groups)} deployment group(s) share one format each: {shown}{more}")
    for note in suggestion.notes:
        print(f"note: {note}")
    if args.front_points > 0:
        from analysis.allocate import pareto_front, uniform_points

        front = pareto_front(problem, budget.kind if budget.kind in ("avg-bits", "size-kb", "bops") else "avg-bits",
                             args.front_points, measure, use_metric=judge.use_metric if judge else True)
        rows = front + uniform_points(problem, measure)
        _write_front(rows, _front_path(out))
    return 0


def _front_path(map_path: Path) -> Path:
    return map_path.with_name(map_path.stem + "_front.csv")


def _write_front(points, path: Path) -> None:
    import pandas as pd

    from analysis.runstore import write_output

    frame = pd.DataFrame([{"label": p.label, **p.costs, "predicted_sqnr_db": p.predicted_sqnr_db,
                           "measured_sqnr_db": p.measured_sqnr_db, "metric": p.metric} for p in points])
    write_output(path, lambda tmp: frame.to_csv(tmp, index=False), force=True)  # checked before the search
    print(f"Pareto front ({len(points)} points, uniform baselines included) -> {path}")
    with pd.option_context("display.width", 120, "display.max_columns", 10, "display.float_format", "{:.4g}".format):
        print(frame.drop(columns=["bops"]).to_string(index=False))


def _map_model(args: argparse.Namespace, pmap, what: str):
    """The model a map is applied to: the one named, else the one the map records; checked against
    the map's fingerprint either way."""
    from analysis.loading import load_model
    from analysis.provenance import Provenance, check_model, weights_to_load

    recorded = Provenance.from_dict(pmap.provenance) if pmap is not None else Provenance()
    spec = getattr(args, "model", None) or recorded.model_spec
    if spec is None:
        raise CLIError(f"{what} needs the model: name it (and --weights for a file.py:factory model)")
    same_model = pmap is not None and (getattr(args, "model", None) is None or recorded.model_spec == spec)
    weights = weights_to_load(recorded, args.weights, what) if same_model else args.weights
    model = load_model(spec, weights)
    if pmap is not None:
        check_model(pmap.model, model, what, "pass the model (and --weights) the map was made for, "
                    "or remove the map's \"model\" field to force it")
    return model


def _quant_for(pmap, samples: int | None):
    from dataclasses import replace

    from analysis.config import QuantConfig

    quant = pmap.quant if pmap is not None else QuantConfig()
    return replace(quant, num_samples=samples) if samples is not None else quant


def cmd_evaluate(args: argparse.Namespace) -> int:
    from analysis.precision_map import load_map
    from analysis.provenance import Provenance, engine_for

    if args.out:
        _check_output(args.out, args, args.map, args.model, args.weights, args.data, args.eval_data)
    pmap = load_map(args.map) if args.map else None
    model = _map_model(args, pmap, f"the map {args.map}")
    config = _quant_for(pmap, args.samples)
    recorded = Provenance.from_dict(pmap.provenance) if pmap is not None else Provenance()
    evaluator = _evaluator(model, args.data, args.eval_data, args.task, config, args.device,
                           engine=engine_for(args.engine, recorded))
    _print_engine(evaluator.sim.engine)
    if pmap is not None:
        pmap.validate(evaluator.layer_names)
        evaluations = [evaluator.fp32(), evaluator.evaluate(pmap, label=Path(args.map).name)]
    else:
        evaluations = evaluator.baselines()
    if args.real:
        from analysis.real import evaluate_real

        for pmap_real, label in ([(pmap, Path(args.map).name)] if pmap else _uniform_real(evaluator)):
            evaluations.append(evaluate_real(model, evaluator.calibration, evaluator.evaluation, pmap_real,
                                             label=f"{label} (real)", engine=evaluator.sim.engine))
    _print_evaluations(evaluations)
    if evaluator.evaluation.labels is None:
        print("note: the evaluation data has no labels, so no task metric (accuracy / perplexity) was computed; "
              "pass labelled --eval-data for it")
    if args.out:
        from analysis.runstore import write_output

        text = json.dumps([e.to_dict() for e in evaluations], indent=1, default=str)
        write_output(args.out, lambda tmp: tmp.write_text(text), force=True)  # checked before the run
        print(f"-> {args.out}")
    return 0


def _uniform_real(evaluator):
    from analysis.precision_map import uniform_map

    return [(uniform_map(evaluator.layer_names, "int8", None), "uniform int8 (weight-only)"),
            (uniform_map(evaluator.layer_names, "int8", "int8"), "uniform int8/int8")]


def _print_evaluations(evaluations) -> None:
    import pandas as pd

    frame = pd.DataFrame([e.as_row() for e in evaluations])
    keep = [c for c in ("label", "path", "metric", "value", "drop", "output_sqnr_db", "output_kl", "top1_agreement",
                        "avg_weight_bits", "weight_bytes", "latency_ms_per_sample", "sim_vs_real_sqnr_db") if c in frame]
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(frame[keep].to_string(index=False))


def cmd_finetune(args: argparse.Namespace) -> int:
    from analysis.config import QATConfig
    from analysis.loading import check_compatible, load_data
    from analysis.precision_map import load_map
    from analysis.provenance import Provenance
    from analysis.qat import finetune_qat
    from analysis.qat.save import architecture_spec, save_fine_tuned
    from torch import nn

    read = (args.map, args.model, args.weights, args.data, args.train_data, args.val_data, args.eval_data)
    map_out = Path(args.out_map) if args.out_map else Path(args.out).with_suffix(".map.json")
    _check_output(args.out, args, *read)
    _check_output(map_out, args, *read)
    pmap = load_map(args.map)
    model = _map_model(args, pmap, f"the map {args.map}")
    recorded = Provenance.from_dict(pmap.provenance)
    model_spec = getattr(args, "model", None) or recorded.model_spec
    if not isinstance(model, nn.Module):
        raise CLIError(f"{model_spec} is an exported program, which holds its weights: finetune writes a weights file "
                       "for a file.py:factory or sample model; fine-tune from Python (analysis.qat.finetune_qat)")
    architecture_spec(model, model_spec)  # refuse before training what could not be saved after it
    samples = _quant_for(pmap, args.samples).num_samples
    calibration = load_data(args.data, split="calibration", task=args.task, max_samples=samples)
    check_compatible(model, calibration)
    train = load_data(args.train_data, task=args.task) if args.train_data else calibration
    validation = load_data(args.val_data, task=args.task) if args.val_data else None
    spec, split = _eval_spec(args.data, args.eval_data)
    evaluation = load_data(spec, split=split, task=args.task)
    defaults = QATConfig()
    config = QATConfig(**{name: getattr(args, name) if getattr(args, name) is not None else getattr(defaults, name)
                          for name in ("epochs", "lr", "batch_size", "patience", "ranges", "loss", "keep")})
    update, close = _progress_bar(args.quiet, unit="epoch")
    try:
        result = finetune_qat(model, pmap, train, calibration, validation=validation, evaluation=evaluation,
                              config=config, progress=update, device=args.device, engine=args.engine)
    finally:
        close()
    for line in result.summary():
        print(line)
    tuned_map = save_fine_tuned(result, pmap, args.out, model_spec=model_spec, data_spec=args.data, source=model)
    tuned_map.save(map_out)
    kept = "fine-tuned" if result.kept == "qat" else "PTQ (unchanged)"
    print(f"{kept} weights -> {args.out}; map for them -> {map_out} "
          f"(evaluate / export it: quantlens export {map_out} --to aimet --out ...)")
    return 0


def cmd_remedies(args: argparse.Namespace) -> int:
    import pandas as pd

    from analysis.finetune import remedies
    from analysis.loading import check_compatible, load_data, load_model

    if args.model is None:
        raise CLIError("name the model: sample:<name>, path/to/file.py:factory or model.pt2")
    model = load_model(args.model, args.weights, trust_remote_code=getattr(args, "trust_remote_code", False))
    calibration = load_data(args.data, split="calibration", task=args.task, max_samples=args.samples)
    check_compatible(model, calibration)
    spec, split = _eval_spec(args.data, args.eval_data)
    evaluation = load_data(spec, split=split, task=args.task)
    rows = remedies(model, calibration, evaluation, args.layer, args.weight_format, args.act_format)
    with pd.option_context("display.width", 160, "display.max_colwidth", 70, "display.float_format", "{:.2f}".format):
        print(pd.DataFrame(rows).drop(columns=["note"], errors="ignore").to_string(index=False, na_rep=""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from analysis.export import export_map, registry
    from analysis.loading import load_data
    from analysis.precision_map import load_map
    from analysis.runstore import record_written

    from analysis.provenance import Provenance

    _check_output(args.out, args, args.map, args.model, args.weights, args.data)
    pmap = load_map(args.map)
    recorded = Provenance.from_dict(pmap.provenance)
    target = registry.get(args.to)
    # The model and data the map records are loaded only for targets that read them.
    model = (_map_model(args, pmap, f"the map {args.map}")
             if target.uses_model and (args.model or recorded.model_spec) else None)
    data_spec = args.data or (recorded.data_spec if target.uses_calibration else None)
    calibration = load_data(data_spec, split="calibration", max_samples=pmap.quant.num_samples) if data_spec else None
    path = export_map(pmap, args.to, Path(args.out), model=model, calibration=calibration, engine=args.engine)
    record_written(path)  # a later export may replace it without --force
    print(f"wrote {args.to} -> {path}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise CLIError(f"--port {args.port} is not a TCP port; use 1 to 65535 (default 8501)")
    from dashboard.launch import main as launch

    return launch(port=args.port, address=args.address, allow_hosts=args.allow_host)
