"""Background analyses: the `Job` that runs one, and this server's registry of them.

An analysis runs in a background thread (`Job`) that writes progress and finished trials into a
plain object; pages poll it from an `st.fragment(run_every=...)`; `QUANTLENS_SYNC_JOBS=1` runs it
inline instead (tests, where no browser polls). Each job writes its run folder in the run store
(`analysis.runstore`) as a CLI run would, so its results outlive the server.

No Streamlit here: the jobs are threads and plain data, reached by every session of the server,
so they live apart from the per-session state (`dashboard.state`), which loads the model and data
(Streamlit-cached) and hands them to `start`.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from analysis import runstore
from analysis.runstore import Inputs, RunInfo
from dashboard.settings import one_line, runs_dir, sync_jobs


class Job:
    """One analysis: a local-only pass (fast, shown first), then the full run into the run store.

    The worker thread only writes plain attributes; pages read them. `stop` is what `should_stop`
    reads; Cancel sets it.
    """

    def __init__(self, run_id: str, path: Path, inputs: Inputs, config: Any, model: Any, data: Any,
                 resume: bool = False, reopened: bool = False) -> None:
        self.id = run_id
        self.path = path
        self.inputs = inputs
        self.config = config
        self.resume = resume  # continue the trials in `path`
        self.reopened = reopened or resume  # `path` is a stored run (kept, marked failed, on failure)
        self._model, self._data = model, data
        self.phase = "queued"  # queued, local, full, done, failed, cancelled
        self.done = 0
        self.total = 0
        self.label = ""
        self.local_result: Any = None
        self.trials: list[Any] = []
        self.result: Any = None
        self.error: str | None = None
        self.stop = threading.Event()
        self.started = time.time()
        self.finished: float | None = None
        self.thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.phase in ("queued", "local", "full")

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    def describe(self) -> str:
        if self.phase == "queued":
            return "starting…"
        if self.phase == "local":
            return f"1/2 local metrics: {self.done}/{self.total} trials" + (f" · {self.label}" if self.label else "")
        if self.phase == "full":
            return f"2/2 output metrics: {self.done}/{self.total} trials" + (f" · {self.label}" if self.label else "")
        if self.phase == "done":
            return f"finished in {(self.finished or time.time()) - self.started:.1f} s"
        if self.phase == "cancelled":
            return "cancelled"
        return f"failed: {self.error}"

    def _progress(self, done: int, total: int, label: str) -> None:
        self.done, self.total, self.label = done, total, label

    def cancel(self) -> None:
        self.stop.set()

    def run(self) -> None:
        from analysis.runs import analyze_to_directory
        from analysis.sweep import AnalysisCancelled, analyze

        try:
            if not self.resume:
                self.phase = "local"
                local = replace(self.config, output_metrics="none", cumulative=False)
                self.local_result = analyze(self._model, self._data, local, progress=self._progress,
                                            should_stop=self.stop.is_set)
            self.phase, self.done, self.total = "full", 0, 0
            # Streams each trial to trials.jsonl and records the run's status in meta.json.
            self.result = analyze_to_directory(
                self._model, self._data, self.config, self.path, resume=self.resume, progress=self._progress,
                should_stop=self.stop.is_set, on_result=self.trials.append, inputs=self.inputs,
            )
            runstore.write_meta(self.path, seconds=round(time.time() - self.started, 2))  # with the local pass
            self.phase = "done"
        except AnalysisCancelled:  # also during the local pass, before the engine wrote anything
            runstore.write_meta(self.path, status="cancelled", error="cancelled by the user")
            self.phase = "cancelled"
        except Exception as exc:  # noqa: BLE001 — the job reports, the app stays up
            self.error = one_line(exc)
            if self.trials or self.reopened:
                runstore.write_meta(self.path, status="failed", error=self.error)
            else:  # failed before any result (e.g. no quantizable layers): leave nothing half-made
                shutil.rmtree(self.path, ignore_errors=True)
            self.phase = "failed"
        finally:
            self.finished = time.time()
            self._model = self._data = None  # the cached originals stay cached; drop our references


# --- the registry: this server's jobs, shared by all its sessions ---------------------------------

JOBS: dict[str, Job] = {}
_JOBS_LOCK = threading.Lock()
_MAX_FINISHED_JOBS = 6


def _prune_jobs() -> None:
    finished = sorted((j for j in JOBS.values() if not j.running), key=lambda j: j.finished or 0)
    for job in finished[:-_MAX_FINISHED_JOBS]:
        JOBS.pop(job.id, None)


def config_json(config: Any) -> dict:
    """The AnalysisConfig as a new run's meta.json records it."""
    from analysis.results import _jsonable

    return _jsonable(config.to_dict())


def own_jobs() -> set[str]:
    """Runs this server is analysing now: one recorded as ours but not here lost its thread."""
    with _JOBS_LOCK:
        return {job.id for job in JOBS.values() if job.running}


def running_jobs() -> list[Job]:
    """The jobs still running, oldest first."""
    with _JOBS_LOCK:
        return sorted((j for j in JOBS.values() if j.running), key=lambda j: j.started)


def running_job_for(inputs: Inputs, config: Any) -> Job | None:
    with _JOBS_LOCK:
        for job in JOBS.values():
            if job.running and job.inputs == inputs and job.config == config:
                return job
    return None


def start(inputs: Inputs, config: Any, model: Any, data: Any, resume_run: RunInfo | None = None) -> Job:
    """Register and start a job on a loaded, checked model and data: a new run in the run store, or
    `resume_run` continued; inline when QUANTLENS_SYNC_JOBS is set, else in a daemon thread."""
    # Under the lock: a run marked running by this server is interrupted unless it is in JOBS.
    with _JOBS_LOCK:
        if resume_run is not None:
            run_id, path = resume_run.id, resume_run.path
            runstore.mark_running(path)
        else:
            run_id, path = runstore.create_run(runs_dir(), inputs, config_json(config))
        # A run cancelled in its local-only first pass has no trials to continue: it starts again
        # in its own folder.
        job = Job(run_id, path, inputs, config, model, data, resume=resume_run is not None and resume_run.started,
                  reopened=resume_run is not None)
        _prune_jobs()
        JOBS[run_id] = job
    if sync_jobs():
        job.run()
    else:
        job.thread = threading.Thread(target=job.run, name=f"quantlens-{run_id}", daemon=True)
        job.thread.start()
    return job
