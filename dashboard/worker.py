"""The process that runs one dashboard analysis: `python -m dashboard.worker RUN_FOLDER [--resume]`.

The dashboard server starts one worker per analysis (`dashboard.jobs`), so the sweep never shares an
interpreter (and its GIL) with the pages that watch it. The worker reads what to analyse from the
run folder's meta.json (the inputs and config `analysis.runstore.create_run` recorded), loads the
model and data as `quantlens analyze` does, and runs the CLI's engine call,
`analysis.runs.analyze_to_directory`, into the folder: trials stream to trials.jsonl, the status
goes to meta.json, and report.html is written at the end. Progress (trial steps done of the total, the current layer) is added to meta.json
at most once a second; pages poll those two files.

Cancel is SIGTERM: the sweep stops after the trial in progress and the run is marked cancelled
(finished trials kept). A worker whose server went away stops the same way. `--expect PATH=SHA256`
(repeatable) names files the server checked before starting it (code the user trusted, uploads):
the worker refuses to load one whose content changed since.

No Streamlit here. `run` is also what the server calls inline when QUANTLENS_SYNC_JOBS is set.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from analysis import runstore

PROGRESS_EVERY_S = 1.0


class _ProgressWriter:
    """The sweep's progress callback: records (steps done, steps total, label) in meta.json, at
    most once every PROGRESS_EVERY_S (and always the last step)."""

    def __init__(self, path: Path) -> None:
        self.path, self.last = path, 0.0

    def __call__(self, done: int, total: int, label: str) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S and done < total:
            return
        self.last = now
        runstore.write_meta(self.path, progress={"done": done, "total": total, "label": label})


def report_title(inputs: Any) -> str:
    """The title of a run's report.html (the CLI's, with the run's label)."""
    return f"quantlens: {inputs.label or inputs.model_spec}"


def check_expected(expected: dict[str, str]) -> None:
    """Refuse (one line) a file whose sha256 is no longer the one the server checked."""
    from dashboard.uploads import sha256_of

    for name, digest in expected.items():
        path = Path(name)
        if not path.is_file() or sha256_of(path) != digest:
            raise ValueError(f"{path.name} changed after the dashboard checked it; upload or trust it again")


def load_inputs(path: Path) -> tuple[Any, Any, Any, Any]:
    """(inputs, config, model, data) of the run in `path`, loaded as `quantlens analyze` loads them."""
    from analysis.config import AnalysisConfig, upgrade_config_dict
    from analysis.loading import check_compatible, load_data, load_model

    meta = runstore.read_meta(path)
    inputs = runstore.inputs_from_dict(meta.get("inputs"))
    if inputs is None:
        raise ValueError(f"run {path.name} does not record its model and data; start a new analysis")
    config = AnalysisConfig.from_dict(upgrade_config_dict(meta.get("config") or {}), "the run's config")
    model = load_model(inputs.model_spec, inputs.weights)
    data = load_data(inputs.data_spec, split="calibration", task=inputs.task, max_samples=config.quant.num_samples)
    check_compatible(model, data)
    return inputs, config, model, data


def run(path: str | Path, *, resume: bool = False, should_stop: Callable[[], bool] | None = None,
        loaded: tuple[Any, Any, Any, Any] | None = None) -> Any:
    """Analyse the run in `path` (its meta.json names inputs and config); returns the AnalysisResult.

    `loaded`: (inputs, config, model, data) already loaded (the inline mode); else loaded here.
    Failures are recorded in meta.json (status failed, one-line error) and raised; a cancel
    (`should_stop`) ends with status cancelled and AnalysisCancelled raised."""
    from analysis.report import write_report
    from analysis.runs import analyze_to_directory
    from analysis.sweep import AnalysisCancelled

    from dashboard.settings import one_line

    path, started = Path(path), time.time()
    runstore.mark_running(path)  # this process owns the run now (the server created its record)
    try:
        inputs, config, model, data = loaded if loaded is not None else load_inputs(path)
        if should_stop is not None and should_stop():
            raise AnalysisCancelled("cancelled before the sweep started")
        result = analyze_to_directory(model, data, config, path, resume=resume, progress=_ProgressWriter(path),
                                      should_stop=should_stop, inputs=inputs)
        # as `quantlens analyze` does: the Export page then serves the file instead of building it
        write_report(result, path / "report.html", title=report_title(inputs))
        # meta.json's seconds: the whole job as the user waited for it, loading included
        runstore.write_meta(path, seconds=round(time.time() - started, 2))
        return result
    except AnalysisCancelled:
        runstore.write_meta(path, status="cancelled", error="cancelled by the user")
        raise
    except Exception as exc:
        runstore.write_meta(path, status="failed", error=one_line(exc))
        raise


def _stop_flag() -> Callable[[], bool]:
    """True once SIGTERM arrived (Cancel) or the server that started this worker is gone."""
    stop = threading.Event()
    parent = os.getppid()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return lambda: stop.is_set() or os.getppid() != parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboard.worker", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the run folder (meta.json names the inputs and config)")
    parser.add_argument("--resume", action="store_true", help="continue the trials already in the folder")
    parser.add_argument("--expect", action="append", default=[], metavar="PATH=SHA256",
                        help="a file the server checked, with the sha256 it must still have")
    args = parser.parse_args(argv)
    from analysis.sweep import AnalysisCancelled

    from dashboard.settings import one_line

    should_stop = _stop_flag()
    path = Path(args.folder)
    try:
        check_expected(dict(item.rsplit("=", 1) for item in args.expect))
        run(path, resume=args.resume, should_stop=should_stop)
    except AnalysisCancelled:
        return 3
    except Exception as exc:  # noqa: BLE001 — recorded in meta.json; one line for the server's log
        if runstore.read_meta(path).get("status") != "failed":
            runstore.write_meta(path, status="failed", error=one_line(exc))
        print(f"quantlens worker: {one_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
