"""Analysis runs on disk: results are written as trials finish, so nothing is lost to a crash.

Layout of an output directory:
    run.json       the config and model/data fingerprints, written before the first trial
    trials.jsonl   one finished trial per line, appended and flushed as it completes
    analysis.json  everything, written at the end;  layers.csv  one row per trial

    meta.json      status (running, done, failed, cancelled, interrupted), owner process, labels,
                   inputs: the record `analysis.runstore` reads, so a CLI run and a dashboard run are
                   the same kind of folder

    checkpoint.json  while a run over several chunks of samples is under way: the sweep's state
                   (`analysis.sweep.SweepState`: every unfinished trial's running sums, plain JSON
                   numbers, and which trials already hold the running chunk), with what it belongs
                   to; rewritten at every chunk's end and within a chunk at most every
                   `checkpoint_every` seconds (5); removed when the run is done

`--resume` reads trials.jsonl, skips the finished trials and continues the rest where the checkpoint
left them (the running chunk's FP32 values are computed again, its trials done are not re-run; from
the first chunk when there is no checkpoint, or it is not this run's: said in one line); the final
files are the same bytes a clean run writes, because trials and sums are stored losslessly (JSON
floats round-trip), each trial's sums are added in chunk order, and trials are reassembled in plan
order. Every whole-file write is a temp file renamed over the old one, so a
crash mid-write leaves the previous version, never half a file.

The folder is locked while a run writes into it (a second analysis into the same --out is refused,
not mixed in), everything is validated before the first byte is written, and a folder that is not
a run (no run.json or meta.json of quantlens') holding files of those names is refused unless
`force` (see `check_run_folder`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from analysis import provenance as provenance_mod
from analysis import runstore
from analysis.config import CHECKPOINT_SECONDS, RESULT_NEUTRAL, AnalysisConfig
from analysis.data import Dataset
from analysis.quantsim import ProgressFn, QuantlensWarning
from analysis.results import AnalysisResult, TrialResult, _jsonable, _trial
from analysis.runstore import Inputs
from analysis.sweep import AnalysisCancelled, Sweep
from analysis.sweep_state import SweepState, checkpoint_interval

RUN_SCHEMA = "quantlens.run/1"
# What a run folder holds (report.html: the CLI's report); trials.jsonl is appended, so it is
# quantlens' own exactly when run.json is.
RUN_FILES = ("run.json", "analysis.json", "layers.csv", "report.html", runstore.RUN_META)
TRIALS_FILE = "trials.jsonl"
CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_SCHEMA = "quantlens.checkpoint/1"


class ResumeError(ValueError):
    """The directory holds a run that cannot be continued (or replaced) with these inputs now."""


def _fingerprint(model: Any) -> str:
    from analysis.loading import model_fingerprint

    return model_fingerprint(model)


def analyze_to_directory(
    model: Any, data: Dataset, config: AnalysisConfig, out: str | Path, *, resume: bool = False,
    progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
    on_result: Callable[[TrialResult], None] | None = None,
    model_spec: str | None = None, data_spec: str | None = None, weights: str | None = None,
    inputs: Inputs | None = None, force: bool = False, checkpoint_every: float = CHECKPOINT_SECONDS,
) -> AnalysisResult:
    """Run the sweep, streaming each finished trial to `out/trials.jsonl`, then write the final files.

    `inputs` (specs of the model and data, recorded in meta.json) lets the run be resumed or
    evaluated from another surface; model_spec/data_spec/weights default to its specs. `force`
    replaces files in `out` that quantlens did not write. `checkpoint_every`: the least seconds
    between two writes of checkpoint.json within a chunk of samples (0: after every trial); a chunk's
    end is always written."""
    checkpoint_every = checkpoint_interval(checkpoint_every)
    if inputs is not None:
        model_spec, data_spec = model_spec or inputs.model_spec, data_spec or inputs.data_spec
        weights = weights or inputs.weights
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ResumeError(f"--out {out} is a file, not a folder; name a folder for the run's files")
    out.mkdir(parents=True, exist_ok=True)
    with runstore.locked(out, f"the run folder {out}"):
        return _analyze_locked(model, data, config, out, resume, progress, should_stop, on_result,
                               model_spec, data_spec, weights, inputs, force, checkpoint_every)


def check_run_folder(out: str | Path, *, force: bool = False, inputs: tuple = ()) -> None:
    """Refuse (one line) a fresh run into `out` where a file of a run's name exists that quantlens
    did not write, unless `force`; `inputs` are files the run reads (never written over)."""
    out = Path(out)
    ours = is_run_folder(out)  # its files are quantlens' own: a re-run replaces them
    for name in (*RUN_FILES, TRIALS_FILE, CHECKPOINT_FILE):  # a directory, FIFO or one of the inputs is refused even so
        runstore.check_writable(out / name, force=force or ours, inputs=inputs)


def is_run_folder(out: str | Path) -> bool:
    """Whether `out` holds a quantlens run: a run.json or meta.json that quantlens wrote (by schema)."""
    out = Path(out)
    if runstore.read_meta(out).get("schema") in (runstore.META_SCHEMA, "quantlens.dashboard-run/1"):
        return True
    try:
        header = json.loads(runstore.read_regular(out / "run.json", "run header", 16 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and header.get("schema") == RUN_SCHEMA


def _analyze_locked(model: Any, data: Dataset, config: AnalysisConfig, out: Path, resume: bool,
                    progress: ProgressFn | None, should_stop: Callable[[], bool] | None,
                    on_result: Callable[[TrialResult], None] | None, model_spec: str | None,
                    data_spec: str | None, weights: str | None, inputs: Inputs | None,
                    force: bool, checkpoint_every: float) -> AnalysisResult:
    current = runstore.read_run(out)
    if current is not None and current.foreign:  # two writers would interleave their trials
        raise ResumeError(f"{out} is being analysed by process {current.pid} on {current.host}; "
                          "wait for it to finish, or use another --out directory")
    sweep = Sweep(model, data, config, progress=progress, should_stop=should_stop)
    try:  # a distributed sweep's workers run from here: stopped whatever happens before, in or after the run
        return _analyze_sweep(sweep, model, config, out, resume, on_result, model_spec, data_spec, weights, inputs,
                              force, checkpoint_every)
    finally:
        sweep.close()


def _analyze_sweep(sweep: Sweep, model: Any, config: AnalysisConfig, out: Path, resume: bool,
                   on_result: Callable[[TrialResult], None] | None, model_spec: str | None,
                   data_spec: str | None, weights: str | None, inputs: Inputs | None,
                   force: bool, checkpoint_every: float) -> AnalysisResult:
    sweep.check_runnable()  # everything is validated before the first byte is written
    header = {
        "schema": RUN_SCHEMA,
        "config": _jsonable(_result_config(config)),
        "model_fingerprint": _fingerprint(model),
        "data_fingerprint": sweep.data.fingerprint(),
    }
    # Absolute paths and the weights' content hash: a later `suggest` from any directory reloads
    # exactly this model, or refuses.
    provenance = provenance_mod.record(model_spec, weights, data_spec, model_fingerprint=header["model_fingerprint"],
                        data_fingerprint=header["data_fingerprint"])
    finished: dict[tuple[str, str, str], TrialResult] = {}
    run_file, trials_file = out / "run.json", out / "trials.jsonl"
    if resume and not run_file.exists():
        raise ResumeError(f"nothing to resume in {out}: no run.json there; drop --resume to start a new run")
    if resume:
        try:
            previous = json.loads(runstore.read_regular(run_file, "run header", 16 << 20))
        except json.JSONDecodeError:
            raise ResumeError(f"{run_file} is not valid JSON; drop --resume to start over") from None
        if not isinstance(previous, dict):
            raise ResumeError(f"{run_file} is not a quantlens run header; drop --resume to start over")
        for key in ("config", "model_fingerprint", "data_fingerprint"):
            if previous.get(key) != header[key]:
                raise ResumeError(
                    f"the run in {out} was made with a different {key.replace('_', ' ')}; "
                    "drop --resume to start over, or use another --out directory"
                )
        planned = {t.key for t in sweep.plan()}
        # Only trials of this plan: a line from another run or plan is not ours to reuse.
        rows = [t for t in _read_trials(trials_file) if t.key in planned]
        finished = {t.key: t for t in rows}  # the last row of a trial (--verify's, when re-measured)
        first = {t.key: t for t in reversed(rows)}  # its first row: what --verify chose by
        kept = [t for t in rows if t is first[t.key] or t is finished[t.key]]  # (what Sweep.run's earlier= reads)
        # Rewrite without a line the crash cut short, so appended trials start on a clean line.
        runstore.write_atomic(trials_file, lambda tmp: tmp.write_text(
            "".join(json.dumps(_jsonable(asdict(t)), allow_nan=False) + "\n" for t in kept)))
        start = _read_checkpoint(out, sweep, header, set(finished))
    else:
        check_run_folder(out, force=force)
        runstore.write_json_atomic(run_file, header)
        runstore.write_atomic(trials_file, lambda tmp: tmp.write_text(""))
        _remove_checkpoint(out)  # an earlier run's in a reused folder
        kept, start = [], None
    _mark_started(out, config, resume, inputs, provenance, planned=len(sweep.plan()))
    started = time.time()
    try:
        with trials_file.open("a") as sink:
            def record(trial: TrialResult) -> None:
                sink.write(json.dumps(_jsonable(asdict(trial)), allow_nan=False) + "\n")
                sink.flush()
                os.fsync(sink.fileno())  # a kill -9 right after must not lose this trial
                if on_result:
                    on_result(trial)

            def save(state: SweepState) -> None:
                payload = {"schema": CHECKPOINT_SCHEMA, "run": _run_identity(header, sweep), "state": state.to_dict()}
                runstore.write_atomic(out / CHECKPOINT_FILE, lambda tmp: tmp.write_text(json.dumps(payload)))

            # Something else in the checkpoint's place (said when resuming) is left alone: no checkpoints then.
            keep = not (out / CHECKPOINT_FILE).exists() or (out / CHECKPOINT_FILE).is_file()
            result = sweep.run(on_result=record, skip=set(finished), earlier=kept,
                               checkpoint=save if keep else None, start=start, checkpoint_every=checkpoint_every)

        order = {t.key: i for i, t in enumerate(sweep.plan())}
        # A trial this run reported again (re-measured by --verify) replaces its earlier row.
        latest = {**finished, **{t.key: t for t in result.trials}}
        merged = sorted(latest.values(), key=lambda t: order.get(t.key, len(order)))
        result = replace(
            result,
            trials=tuple(merged),
            model={**result.model, **provenance.to_dict(), "spec": provenance.model_spec,
                   "fingerprint": header["model_fingerprint"]},
            data={**result.data, "spec": provenance.data_spec},
        )
        write_outputs(result, out)
        _remove_checkpoint(out)
    except AnalysisCancelled:
        runstore.write_meta(out, status="cancelled", error="cancelled by the user")
        raise
    except KeyboardInterrupt:
        runstore.write_meta(out, status="interrupted", error="interrupted (Ctrl-C)")
        raise
    except Exception as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        runstore.write_meta(out, status="failed", error=f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
        raise
    runstore.write_meta(out, status="done", error=None, seconds=round(time.time() - started, 2),
                        layers=len(result.layers), trials=len(result.trials))
    return result


def _run_identity(header: dict[str, Any], sweep: Sweep) -> dict[str, str]:
    """What a checkpoint belongs to: the run (run.json's config, model and data) and its plan."""
    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    return {"header": digest(header), "plan": digest([list(t.key) for t in sweep.plan()])}


def _read_checkpoint(out: Path, sweep: Sweep, header: dict[str, Any], finished: set) -> SweepState | None:
    """The checkpoint in `out` when it is this run's and fits its sweep; else None, said in one line
    (a checkpoint is never trusted: a run folder may come from anyone, see README's trust model)."""
    path = out / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        if sweep.config.distributed:
            raise ValueError("a run over workers resumes from finished trials only")
        if not path.is_file():
            raise ValueError("it is not a regular file; remove it to have this folder keep checkpoints")
        try:
            payload = json.loads(runstore.read_regular(path, "checkpoint"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(payload, dict) or payload.get("schema") != CHECKPOINT_SCHEMA:
            raise ValueError("not a quantlens checkpoint")
        if payload.get("run") != _run_identity(header, sweep):
            raise ValueError("it belongs to another run: other config, model, data or plan")
        state = SweepState.from_dict(payload.get("state"))
        sweep.restore(state, finished)  # the chunk boundaries and every trial's sums, checked
    except (OSError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(f"the checkpoint {path} is not used ({reason}); the unfinished trials start again from the "
                      "first chunk of samples", QuantlensWarning, stacklevel=3)
        return None
    return state


def _remove_checkpoint(out: Path) -> None:
    path = out / CHECKPOINT_FILE
    if path.is_symlink() or path.is_file():  # anything else in its place is not quantlens' (and never read)
        path.unlink(missing_ok=True)


def _result_config(config: AnalysisConfig) -> dict[str, Any]:
    """The config as it decides results: options that only change memory or speed are left out,
    so a run resumed with another --cache-mb or device continues."""
    payload = config.to_dict()
    for key in RESULT_NEUTRAL:
        payload.pop(key, None)
    return payload


def _mark_started(out: Path, config: AnalysisConfig, resume: bool, inputs: Inputs | None,
                  provenance: provenance_mod.Provenance, planned: int) -> None:
    """meta.json for a run that starts now: running, owned by this process, with its labels and the
    number of trials its plan holds (`planned`: what a progress display counts finished trials of)."""
    meta = runstore.read_meta(out)
    # The dashboard creates the record (labels, creation time) before its quick local pass; a
    # leftover from an earlier run in a reused --out folder is replaced instead.
    prepared = resume or (meta.get("status") == "running" and meta.get("pid") == os.getpid())
    # The whole config (cache size and device too): what a resume from the dashboard starts with.
    updates: dict[str, Any] = {"id": out.name, "config": _jsonable(config.to_dict()), "seconds": None,
                               "layers": None, "trials": None, "planned": planned}
    if not prepared or not meta.get("created"):
        updates["created"] = time.time()
    if inputs is not None:
        # Recorded with absolute paths (as provenance has them): resumable from any directory.
        recorded = replace(inputs, model_spec=provenance.model_spec or inputs.model_spec,
                           data_spec=provenance.data_spec or inputs.data_spec, weights=provenance.weights,
                           eval_spec=provenance_mod.absolute_spec(inputs.eval_spec))
        updates.update(inputs=asdict(recorded), model=inputs.label or inputs.model_spec,
                       data=inputs.data_label or inputs.data_spec)
    elif not prepared or not meta.get("model"):
        updates.update(model=provenance.model_spec or out.name, data=provenance.data_spec or "", inputs=None)
    runstore.mark_running(out, **updates)


def write_outputs(result: AnalysisResult, out: Path) -> None:
    runstore.write_atomic(out / "analysis.json", result.save)
    runstore.write_atomic(out / "layers.csv", lambda tmp: result.to_frame().to_csv(tmp, index=False))


def read_trials(out: str | Path) -> list[TrialResult]:
    """The trials a run in `out` has finished so far (its trials.jsonl, also while it runs), one per
    trial in the order they finished: a trial reported again (verified by `--verify`) keeps its last row."""
    latest = {t.key: t for t in _read_trials(Path(out) / TRIALS_FILE)}
    return list(latest.values())


def _read_trials(path: Path) -> list[TrialResult]:
    trials = []
    if not path.exists():
        return trials
    for line in runstore.read_regular(path, "trials file").splitlines():
        try:
            trials.append(_trial(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut short by the crash: that trial simply runs again
    return trials
