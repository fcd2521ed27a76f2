"""Background analyses: the `Job` that runs one, and this server's registry of them.

Each analysis runs in a worker process (`python -m dashboard.worker RUN_FOLDER`, see
`dashboard.worker`) that writes its run folder in the run store (`analysis.runstore`) exactly as
`quantlens analyze` does: trials stream to trials.jsonl, status and progress go to meta.json. The
server's `Job` only reads those two files (re-read when their size or mtime changes), so the pages
that watch a run cannot slow it down, and its results outlive the server. Cancel terminates the
worker (SIGTERM: it stops after the trial in progress; killed if it has not stopped
`KILL_AFTER_S` later) and the run is marked cancelled, its finished trials kept.
`QUANTLENS_SYNC_JOBS=1` runs the same `dashboard.worker.run` inline instead (tests, where no
browser polls).

No Streamlit here: the jobs are plain data reached by every session of the server, apart from the
per-session state (`dashboard.state`), which loads and checks the model and data before a job starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from analysis import runstore
from analysis.runstore import Inputs, RunInfo
from dashboard.settings import one_line, runs_dir, sync_jobs

KILL_AFTER_S = 20.0  # a worker that ignores Cancel this long is killed
_ROOT = Path(__file__).resolve().parent.parent  # on the worker's PYTHONPATH (a plain checkout works too)


class Job:
    """One analysis in its run folder: started by `start`, watched through meta.json and trials.jsonl.

    `phase` is queued, running, done, failed or cancelled; `stop` is set by Cancel (the inline mode's
    `should_stop`). `model` and `data` are only kept for the inline mode.
    """

    def __init__(self, run_id: str, path: Path, inputs: Inputs, config: Any, model: Any = None, data: Any = None,
                 resume: bool = False, reopened: bool = False) -> None:
        self.id = run_id
        self.path = path
        self.inputs = inputs
        self.config = config
        self.resume = resume  # continue the trials in `path`
        self.reopened = reopened or resume  # `path` is a stored run (kept, marked failed, on failure)
        self._model, self._data = model, data
        self.proc: subprocess.Popen | None = None
        self.stop = threading.Event()
        self.cancelled_at: float | None = None
        self.error: str | None = None
        self.started = time.time()
        self.finished: float | None = None
        self._outcome: str | None = None  # done, failed, cancelled once the worker is over
        self._meta: tuple[str, dict] = ("", {})
        self._trials: tuple[str, list] = ("", [])
        self._lock = threading.Lock()

    # --- what the worker wrote (re-read only when the file changed) ---

    def meta(self) -> dict:
        stamp = runstore.file_stamp(self.path / runstore.RUN_META)
        if stamp != self._meta[0]:
            self._meta = (stamp, runstore.read_meta(self.path))
        return self._meta[1]

    @property
    def trials(self) -> list:
        """The trials finished so far (trials.jsonl), one per trial."""
        from analysis.runs import TRIALS_FILE, read_trials

        stamp = runstore.file_stamp(self.path / TRIALS_FILE)
        if stamp != self._trials[0]:
            try:
                self._trials = (stamp, read_trials(self.path))
            except (OSError, ValueError):
                self._trials = (stamp, [])
        return self._trials[1]

    @property
    def planned(self) -> int | None:
        """Trials in the run's plan (meta.json, once the sweep started): what the finished run holds."""
        planned = self.meta().get("planned")
        return planned if isinstance(planned, int) else None

    @property
    def done(self) -> int:
        """Trial steps done (a trial takes one step per chunk of samples)."""
        return int((self.meta().get("progress") or {}).get("done") or 0)

    @property
    def total(self) -> int:
        return int((self.meta().get("progress") or {}).get("total") or 0)

    # --- state ---

    @property
    def phase(self) -> str:
        with self._lock:
            if self._outcome is None and self.proc is not None:
                self._watch_process()
            if self._outcome is not None:
                return self._outcome
            return "running" if self.proc is not None or self.meta().get("planned") is not None else "queued"

    @property
    def running(self) -> bool:
        return self.phase in ("queued", "running")

    @property
    def fraction(self) -> float:
        if self.phase == "done":
            return 1.0
        steps = self.done / self.total if self.total else 0.0  # written at most once a second
        finished = len(self.trials) / self.planned if self.planned else 0.0  # a trial's last chunk
        return min(1.0, max(steps, finished))

    def describe(self) -> str:
        phase = self.phase
        if phase in ("queued", "running"):
            planned = self.planned
            if planned is None:
                return "loading the model and data…"
            label = (self.meta().get("progress") or {}).get("label") or ""
            finished = len(self.trials)
            if finished >= planned:
                return f"{finished}/{planned} trials finished · writing the results"
            return f"{finished}/{planned} trials finished" + (f" · {label}" if label else "")
        if phase == "done":
            seconds = self.meta().get("seconds")
            return f"finished in {seconds if seconds is not None else (self.finished or 0) - self.started:.1f} s"
        if phase == "cancelled":
            return "cancelled"
        return f"failed: {self.error}"

    def cancel(self) -> None:
        """Stop the analysis: the worker gets SIGTERM (killed after KILL_AFTER_S if still there)."""
        self.stop.set()
        self.cancelled_at = self.cancelled_at or time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def _watch_process(self) -> None:
        """Reap the worker once it exits and settle the outcome from meta.json (under the lock)."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is None:
            if self.cancelled_at is not None and time.monotonic() - self.cancelled_at > KILL_AFTER_S:
                self.proc.kill()
            return
        status = self.meta().get("status")
        if status not in ("done", "failed", "cancelled"):  # killed before it could say so
            if self.stop.is_set():
                runstore.write_meta(self.path, status="cancelled", error="cancelled by the user")
            else:
                runstore.write_meta(self.path, status="failed",
                                    error=f"the analysis process ended unexpectedly (exit status {code})")
        self._settle(runstore.read_meta(self.path))

    def _settle(self, meta: dict) -> None:
        self._meta = ("", {})
        status = meta.get("status")
        self._outcome = status if status in ("done", "failed", "cancelled") else "failed"
        self.finished = time.time()
        self._model = self._data = None  # the cached originals stay cached; drop our references
        if self._outcome == "failed":
            self.error = meta.get("error") or "failed"
            if not self.reopened and not self.trials:  # failed before any result: leave nothing half-made
                shutil.rmtree(self.path, ignore_errors=True)

    # --- running ---

    def spawn(self, expect: dict[str, str]) -> None:
        """Start the worker process; `expect`: files (path -> sha256) it must find unchanged."""
        command = [sys.executable, "-m", "dashboard.worker", str(self.path)]
        command += ["--resume"] if self.resume else []
        for name, digest in expect.items():
            command += ["--expect", f"{name}={digest}"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
        with open(self.path / ".worker.log", "ab") as log:  # the worker's stderr: tracebacks of crashes
            self.proc = subprocess.Popen(command, cwd=str(_ROOT), env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)

    def run(self) -> None:
        """The inline mode: the worker's own `run`, in this thread, on the model and data given."""
        from dashboard import worker

        try:
            worker.run(self.path, resume=self.resume, should_stop=self.stop.is_set,
                       loaded=(self.inputs, self.config, self._model, self._data))
        except Exception as exc:  # noqa: BLE001 — recorded in meta.json by the worker; the app stays up
            if runstore.read_meta(self.path).get("status") not in ("failed", "cancelled"):
                runstore.write_meta(self.path, status="failed", error=one_line(exc))
        with self._lock:
            self._settle(runstore.read_meta(self.path))


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
    """Runs this server is analysing now (its workers): one recorded as this process's but not here
    lost its job (the server restarted)."""
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


def start(inputs: Inputs, config: Any, model: Any, data: Any, resume_run: RunInfo | None = None,
          expect: dict[str, str] | None = None) -> Job:
    """Register and start a job on a checked model and data: a new run in the run store, or
    `resume_run` continued; inline (on `model` and `data`) when QUANTLENS_SYNC_JOBS is set, else in
    a worker process that loads them itself (`expect`: files it must find unchanged, path -> sha256)."""
    inline = sync_jobs()
    # Under the lock: a run marked running by this server is interrupted unless it is in JOBS.
    with _JOBS_LOCK:
        if resume_run is not None:
            run_id, path = resume_run.id, resume_run.path
            runstore.mark_running(path, progress=None)
        else:
            run_id, path = runstore.create_run(runs_dir(), inputs, config_json(config))
        # A run cancelled before its sweep began has no trials to continue: it starts again in its folder.
        job = Job(run_id, path, inputs, config, model if inline else None, data if inline else None,
                  resume=resume_run is not None and resume_run.started, reopened=resume_run is not None)
        _prune_jobs()
        JOBS[run_id] = job
        if not inline:
            try:
                job.spawn(expect or {})
            except OSError as exc:
                runstore.write_meta(path, status="failed", error=f"cannot start the analysis process: {one_line(exc)}")
                with job._lock:
                    job._settle(runstore.read_meta(path))
    if inline:
        job.run()
    return job
