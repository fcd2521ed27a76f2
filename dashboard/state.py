"""Dashboard state: cached loaders, the run store as the pages see it, and session state.

Heavy work never reruns on a widget change:
- models and data sets are loaded once per (spec, file digest) with `st.cache_resource` (shared by all
  sessions, so never mutated: the engine works on its own copy);
- an analysis runs as a background job (`dashboard.jobs`) that pages poll; this module loads and
  checks its inputs and hands them over;
- every analysis is a folder in the run store (`analysis.runstore`, in `QUANTLENS_RUNS_DIR`, default
  `~/.quantlens/runs`), written by `analysis.runs.analyze_to_directory` like a CLI run, so results
  survive a browser refresh or a server restart and reopen instantly.

Settings come from the environment (`dashboard.settings`, which lists the variables). Pages import
everything they need from here: the settings, `Job` and the job registry are re-exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from analysis import runstore
from analysis.calibration import CALIBRATION_METHODS as _CALIBRATION_METHODS
from analysis.formats import example_formats
from analysis.runstore import Inputs, RunInfo
from dashboard import jobs, uploads
from dashboard.jobs import JOBS, Job, running_job_for
from dashboard.markup import escape
from dashboard.settings import autostart_enabled, default_sample, default_samples, one_line, runs_dir, upload_dir

# Not used here, re-exported: the pages read the settings through `state`, and the tests create a
# run for a hand-made Job with `_config_json`, as they did when the jobs lived in this module.
from dashboard.jobs import config_json as _config_json  # noqa: F401
from dashboard.settings import sync_jobs  # noqa: F401


# Pickers read the engine's registries, so a newly registered format family shows up here.
WEIGHT_FORMAT_CHOICES = example_formats("weight")
ACT_FORMAT_CHOICES = example_formats("activation") + ("none",)


def format_label(role: str):
    """Picker label for a format name: the name with its effective bits ("mxfp4 (4.25 bits)"); a
    typed name that does not parse is shown as typed (the form reports it when submitted)."""
    from analysis.costs import bits_label

    def label(name: str) -> str:
        try:
            return bits_label(name, role)
        except ValueError:
            return name

    return label
CALIBRATION_METHODS = tuple(sorted(_CALIBRATION_METHODS, key=lambda m: m != "mse"))  # mse first: the default
GRANULARITIES = ("per-channel", "per-tensor", "per-group")
TASK_CHOICES = ("auto", "classification", "language-model", "other")
MODEL_UPLOAD_TYPES = ("pt2", "safetensors", "pt", "pth")
DATA_UPLOAD_TYPES = ("npz", "pt", "pth", "safetensors", "txt")


# --- inputs: what a run analyses ------------------------------------------------------------------


def sample_inputs(name: str) -> Inputs:
    spec = f"sample:{name}"
    return Inputs(spec, spec, label=spec, data_label=f"{spec} (calibration split)")


def available_samples() -> dict[str, str | None]:
    """Bundled samples -> None when usable, else why not (e.g. the transformer still training)."""
    try:
        import sample_models
    except Exception as exc:  # noqa: BLE001
        return {"?": f"sample models unavailable ({one_line(exc)})"}
    out: dict[str, str | None] = {}
    for name in sample_models.SAMPLE_NAMES:
        folder = sample_models.sample_dir(name)
        missing = [f for f in ("model.safetensors", "calibration.safetensors", "evaluation.safetensors", "meta.json")
                   if not (folder / f).is_file()]
        out[name] = None if not missing else "not built yet (still training?)"
    return out


def spec_digest(spec: str | None) -> str:
    """A cheap cache key for the files behind a spec (size and mtime): a changed file is reloaded."""
    if not spec:
        return ""
    if spec.startswith("sample:"):
        try:
            import sample_models

            folder = sample_models.sample_dir(spec.removeprefix("sample:"))
        except Exception:  # noqa: BLE001 — unknown names fail in the loader, with its message
            return "unknown-sample"
        return "|".join(f"{p.name}:{runstore.file_stamp(p)}" for p in sorted(folder.glob("*")) if p.is_file())
    head, sep, _ = spec.rpartition(":")
    if sep and head.lower().endswith(".py"):
        return runstore.file_stamp(Path(head).expanduser())
    return runstore.file_stamp(Path(spec).expanduser())


def available_workers() -> int:
    """The most worker processes an analysis may run in here: the cores this server may use."""
    from analysis.distributed import local_cores

    return local_cores()


def available_devices() -> list[str]:
    """Where this server can run an analysis: cpu, each CUDA device, mps."""
    import torch

    devices = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    return devices + (["mps"] if mps is not None and mps.is_available() else [])


def server_path(path: str) -> Path:
    """A path the user typed for a file on the server, made absolute from the folder the dashboard
    was started in (the worker processes run elsewhere, and a run records absolute paths)."""
    return Path(path).expanduser().absolute()


def save_upload(uploaded: Any) -> Path:
    """Write an uploaded file to the private upload folder (`dashboard.uploads`); returns its path."""
    return uploads.save(uploaded.name, uploaded.getvalue())


def trusted_code() -> uploads.TrustedCode:
    """The code files this browser session named with "I trust this code"."""
    return st.session_state.setdefault("trusted_code", uploads.TrustedCode())


def trust_code(spec: str) -> None:
    trusted_code().trust(spec)


def untrusted_code(inputs: Inputs) -> list[str]:
    """The specs of `inputs` that run Python code this session has not trusted (or that changed)."""
    return [spec for spec in (inputs.model_spec, inputs.data_spec, inputs.eval_spec)
            if uploads.code_file(spec) is not None and spec not in trusted_code()]


def file_of(spec: str) -> str:
    """The file a data spec reads: a tokenized text spec ("corpus.txt#tokenizer=DIR,seq_len=N") reads
    its text file."""
    from analysis.loading.hf import split_text_spec

    text = split_text_spec(spec)
    return text[0] if text else spec


def _checked_spec(spec: str | None) -> None:
    """Before loading `spec`: its code trusted in this session, an uploaded file unchanged."""
    if not spec or spec.startswith("sample:"):
        return
    trusted_code().check(spec)
    uploads.verify(uploads.code_file(spec) or file_of(spec))


# --- cached loaders (shared by all sessions: never mutate what they return) -----------------------


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def _cached_model(spec: str, weights: str | None, digest: str) -> Any:
    from analysis.loading import load_model

    return load_model(spec, weights)


@st.cache_resource(max_entries=8, show_spinner=False)
def _cached_data(spec: str, split: str, task: str | None, digest: str) -> Any:
    from analysis.loading import load_data

    return load_data(spec, split=split, task=task)


@st.cache_resource(max_entries=8, show_spinner=False)
def _checked_pair(model_key: tuple, data_key: tuple, _model: Any, _data: Any) -> bool:
    from analysis.loading import check_compatible

    check_compatible(_model, _data)
    return True


def load_model(inputs: Inputs) -> Any:
    _checked_spec(inputs.model_spec)
    _checked_spec(inputs.weights)
    return _cached_model(inputs.model_spec, inputs.weights,
                         spec_digest(inputs.model_spec) + "|" + spec_digest(inputs.weights))


def load_data(inputs: Inputs) -> Any:
    _checked_spec(inputs.data_spec)
    return _cached_data(inputs.data_spec, "calibration", inputs.task, spec_digest(inputs.data_spec))


def load_eval_data(inputs: Inputs) -> Any:
    spec, split = inputs.eval_source()
    _checked_spec(spec)
    return _cached_data(spec, split, inputs.task, spec_digest(spec))


def load_checked(inputs: Inputs) -> tuple[Any, Any]:
    """Model and calibration data, checked to run together (LoadError otherwise)."""
    model, data = load_model(inputs), load_data(inputs)
    _checked_pair((inputs.model_spec, inputs.weights, spec_digest(inputs.model_spec), spec_digest(inputs.weights)),
                  (inputs.data_spec, inputs.task, spec_digest(inputs.data_spec)), model, data)
    return model, data


@st.cache_resource(max_entries=8, show_spinner=False)
def _cached_result(path: str, stamp: str) -> Any:
    from analysis.results import load_analysis

    return load_analysis(path)


# --- the run store (analysis.runstore, in QUANTLENS_RUNS_DIR) ---------------------------------------


def list_runs() -> list[RunInfo]:
    return runstore.list_runs(runs_dir(), jobs.own_jobs())


def get_run(run_id: str | None) -> RunInfo | None:
    return runstore.get_run(runs_dir(), run_id, jobs.own_jobs())


def delete_run(run_id: str) -> None:
    runstore.delete_run(runs_dir(), run_id, jobs.own_jobs())


def load_run_result(info: RunInfo) -> Any:
    """The AnalysisResult of a finished run (cached per analysis.json version)."""
    if not info.done:
        raise ValueError(f"run {info.id} has no results ({info.status})")
    if not (info.path / "analysis.json").is_file():  # a FIFO or device would hang the page
        raise ValueError(f"run {info.id}: analysis.json is not a regular file; delete the run or re-run the analysis")
    return _cached_result(str(info.path), info.stamp)


# --- starting analyses (the jobs themselves are dashboard.jobs) ----------------------------------


def start_job(inputs: Inputs, config: Any, resume_run: RunInfo | None = None) -> Job:
    """Load (cached), check, and start an analysis; inline when QUANTLENS_SYNC_JOBS is set.

    Raises LoadError/ValueError for bad inputs before anything is written. If the very same analysis
    is already running (another tab, the first-open auto start), that job is returned instead.
    """
    existing = running_job_for(inputs, config) if resume_run is None else None
    if existing is not None:
        return existing
    model, data = load_checked(inputs)
    if resume_run is not None:
        latest = get_run(resume_run.id)
        if latest is None or latest.status == "running":
            raise ValueError(f"run {resume_run.id} is gone or still being analysed; pick it again in the run list")
    return jobs.start(inputs, config, model, data, resume_run, expect=_checked_files(inputs))


def _checked_files(inputs: Inputs) -> dict[str, str]:
    """The code and uploaded files of `inputs`, checked just now, with their sha256: the worker
    process refuses to load one that changed before it got to it."""
    files: dict[str, str] = {}
    for spec in (inputs.model_spec, inputs.weights, inputs.data_spec, inputs.eval_spec):
        if not spec or spec.startswith("sample:"):
            continue
        code = uploads.code_file(spec)
        path = code or Path(file_of(spec)).expanduser().absolute()
        if path.is_file() and (code is not None or uploads.is_upload(path)):
            files[str(path)] = uploads.sha256_of(path)
    return files


def config_from_dict(payload: dict, **overrides: Any) -> Any:
    """The AnalysisConfig a run stored (strict; runs of quantlens 0.1 are upgraded)."""
    from analysis.config import AnalysisConfig, upgrade_config_dict

    return AnalysisConfig.from_dict(upgrade_config_dict(payload), "the run's config", **overrides)


# --- session ------------------------------------------------------------------------------------


def init_session() -> None:
    ss = st.session_state
    ss.setdefault("run_id", None)
    ss.setdefault("job_id", None)
    ss.setdefault("selected_layer", None)
    ss.setdefault("current_maps", {})  # run id -> PrecisionMap edited on the mixed-precision page
    ss.setdefault("evaluations", {})  # run id -> comparison table
    ss.setdefault("notices", [])
    if ss.run_id is not None and get_run(ss.run_id) is None:
        ss.run_id = None  # deleted meanwhile
    if ss.run_id is None:
        latest = next((r for r in list_runs() if r.done), None)
        ss.run_id = latest.id if latest else None


def session_job() -> Job | None:
    job_id = st.session_state.get("job_id")
    return JOBS.get(job_id) if job_id else None


def any_job_running() -> bool:
    job = session_job()
    return job is not None and job.running


def attach_job(job: Job) -> None:
    st.session_state.job_id = job.id
    acknowledge_job()


def acknowledge_job() -> None:
    """A finished job: select its run (done) or keep the earlier results and say why (failed)."""
    job = session_job()
    if job is None or job.running:
        return
    st.session_state.job_id = None
    if job.phase == "done":
        select_run(job.id)
        meta = job.meta()
        st.session_state.notices.append(("success", f"Analysis of {escape(job.inputs.label)} finished: "
                                         f"{meta.get('layers')} layers, {meta.get('trials')} trials."))
    elif job.phase == "failed":
        st.session_state.notices.append(("error", f"Analysis of {escape(job.inputs.label)} failed: {escape(job.error)}"))
    elif job.trials or job.resume:
        st.session_state.notices.append(("info", f"Analysis of {escape(job.inputs.label)} was cancelled; "
                                         "its finished trials are kept (resume it from the sidebar)."))
    else:
        st.session_state.notices.append(("info", f"Analysis of {escape(job.inputs.label)} was cancelled before any "
                                         "trial finished (resume it from the sidebar to start it again)."))


def select_run(run_id: str | None) -> None:
    st.session_state.run_id = run_id


def maybe_autostart() -> None:
    """First open with no finished run in the store (empty, or only runs that are interrupted, failed
    or another process's): analyse the bundled sample so results appear in seconds. With a finished
    run, `init_session` has opened the newest one."""
    ss = st.session_state
    if ss.get("_autostart_checked"):
        return
    ss["_autostart_checked"] = True
    if session_job() is not None:
        return
    running = jobs.running_jobs()
    if running:  # another tab (or a closed one) is analysing: follow it instead of showing nothing
        ss.job_id = running[-1].id
        return
    if not autostart_enabled() or any(r.done for r in list_runs()):
        return
    samples = available_samples()
    usable = [n for n, why in samples.items() if why is None]
    name = default_sample() if samples.get(default_sample(), "missing") is None else (usable or [None])[0]
    if name is None:
        return
    from analysis.config import AnalysisConfig

    config = AnalysisConfig(weight_formats=("int8", "int4"), act_formats=("int8",), num_samples=default_samples(),
                            cumulative=True)
    attach_job(start_job(sample_inputs(name), config))


def current_run() -> RunInfo | None:
    return get_run(st.session_state.get("run_id"))


def current_result() -> tuple[RunInfo, Any] | None:
    info = current_run()
    if info is None or not info.done:
        return None
    return info, load_run_result(info)


def require_result() -> tuple[RunInfo, Any]:
    """The selected finished run and its result, or a message and st.stop()."""
    info = current_run()
    if info is None:
        if any_job_running():
            st.info("The analysis is running; results appear here when it finishes (progress in the sidebar).")
        else:
            st.info("No analysis yet: start one on the **Model & data** page.")
        st.stop()
    if not info.done:
        why = f": {escape(info.error)}" if info.error else ""
        st.warning(f"Run {escape(info.id)} has no results ({info.status}{why}). Pick a finished run in the sidebar.")
        st.stop()
    try:
        return info, load_run_result(info)
    except Exception as exc:  # noqa: BLE001 — a corrupt analysis.json must not take the page down
        st.error(f"Cannot open run {escape(info.id)}: {escape(one_line(exc))}")
        st.stop()
    raise AssertionError("unreachable")
