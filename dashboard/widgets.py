"""Pieces drawn on every page: the sidebar (run store, job progress) and one-shot notices."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import runstore
from dashboard import state, tables
from dashboard.markup import code, escape

POLL_SECONDS = 2.0  # the job's two small files are re-read at most this often; the sweep runs elsewhere
STREAM_ROWS = 15


# --- job progress ----------------------------------------------------------------------------------


def job_panel(where: str, detailed: bool = False) -> None:
    """Progress of this session's analysis, polled every POLL_SECONDS while it runs (the worker
    process writes it to the run folder; nothing here competes with it)."""
    job = state.session_job()
    if job is None:
        return
    every = POLL_SECONDS if job.running and not state.sync_jobs() else None
    st.fragment(run_every=every)(_job_body)(where, detailed)


def progress_text(job: state.Job) -> str:
    return f"**{escape(job.inputs.label)}** — {escape(job.describe())}"


def _job_body(where: str, detailed: bool) -> None:
    job = state.session_job()
    if job is None:
        return
    if not job.running:
        st.rerun()  # the whole app: the finished run gets selected and every page refreshed
    st.progress(job.fraction, text=progress_text(job))
    st.button("Cancel analysis", key=f"cancel_job_{where}", on_click=job.cancel, disabled=job.stop.is_set(),
              help="Stops the analysis process after its current trial; finished trials are kept and the run "
                   "can be resumed.")
    if detailed:
        trials = job.trials
        if trials:
            table = streamed_table(trials)
            st.caption(f"{len(trials)} of {job.planned} trials finished; the {min(STREAM_ROWS, len(table))} "
                       "with the lowest output SQNR so far:")
            st.dataframe(table.head(STREAM_ROWS), hide_index=True, key=f"stream_{where}",
                         column_config=tables.fit(table.head(STREAM_ROWS)))


def streamed_table(trials: list) -> pd.DataFrame:
    """The finished trials of a running analysis, lowest output SQNR first (local SQNR when the run
    has no output metrics); `output metrics` says whether a row's output figures are exact or estimated."""
    rows = [{
        "layer": t.layer, "target": t.target, "format": t.format,
        "local SQNR (dB)": t.local.sqnr_db if t.local else None,
        "output SQNR (dB)": t.output.sqnr_db if t.output else None,
        "output metrics": t.output_source or "—",
        "status": "ok" if t.ok else f"failed: {t.error}",
    } for t in trials]
    frame = pd.DataFrame(rows)
    by = "output SQNR (dB)" if frame["output SQNR (dB)"].notna().any() else "local SQNR (dB)"
    return frame.sort_values(by, na_position="last")


# --- sidebar -------------------------------------------------------------------------------------


def _on_pick(key: str) -> None:
    state.select_run(st.session_state.get(key))


def _delete(run_id: str) -> None:
    try:
        state.delete_run(run_id)
    except Exception as exc:  # noqa: BLE001
        st.session_state.notices.append(("error", f"Cannot delete run {escape(run_id)}: {escape(state.one_line(exc))}"))
        return
    st.session_state.evaluations.pop(run_id, None)
    st.session_state.current_maps.pop(run_id, None)
    latest = next((r for r in state.list_runs() if r.done), None)
    state.select_run(latest.id if latest else None)
    st.session_state.notices.append(("info", f"Deleted run {escape(run_id)}."))


def _resume(run_id: str) -> None:
    info = state.get_run(run_id)
    try:
        inputs = info.get_inputs() if info else None
        if info is None or inputs is None:
            raise ValueError("this run does not record its model and data, so it cannot be resumed")
        job = state.start_job(inputs, state.config_from_dict(info.config), resume_run=info)
    except Exception as exc:  # noqa: BLE001
        st.session_state.notices.append(("error", f"Cannot resume run {escape(run_id)}: {escape(state.one_line(exc))}"))
        return
    state.attach_job(job)


def _trust(run_id: str, key: str) -> None:
    info = state.get_run(run_id)
    inputs = info.get_inputs() if info else None
    if not st.session_state.get(key) or inputs is None:
        return
    try:
        for spec in state.untrusted_code(inputs):
            state.trust_code(spec)
    except Exception as exc:  # noqa: BLE001 — e.g. an upload from before a restart
        st.session_state[key] = False  # not trusted: the box must not look ticked
        st.session_state.notices.append(("error", f"Cannot trust run {escape(run_id)}'s code: "
                                         f"{escape(state.one_line(exc))}"))


def sidebar() -> None:
    with st.sidebar:
        job_panel("sidebar")
        st.markdown("#### Runs")
        runs = state.list_runs()
        if not runs:
            st.caption(f"No runs yet. Finished analyses are kept in {code(state.runs_dir())}.")
            return
        by_id = {r.id: r for r in runs}
        labels = runstore.run_labels(runs)
        current = st.session_state.get("run_id")
        if current not in by_id:
            current = next((r.id for r in runs if r.done), runs[0].id)
            state.select_run(current)
        # Keyed by the selection: a run chosen elsewhere (a finished job, a deletion) gives a fresh
        # widget showing it, instead of fighting the value the browser still holds.
        picker_key = f"run_picker_{current}_{by_id[current].status}"
        st.selectbox("Open a run", list(by_id), index=list(by_id).index(current), key=picker_key,
                     on_change=_on_pick, args=(picker_key,),
                     format_func=lambda i: labels.get(i, i),
                     help="Every analysis is saved on disk and reopens after a refresh or a restart.")
        info = by_id[current]
        details = [f"**model** {escape(info.model)}", f"**data** {escape(info.data)}", escape(info.formats_summary()),
                   escape(info.workers_summary()),
                   f"{info.when} · {info.status}" + (f" · took {info.seconds:.1f} s" if info.seconds else "")]
        if info.layers:
            details.append(f"{info.layers} layers · {info.trials} trials")
        details.extend(run_status_lines(info))
        st.caption("  \n".join(details))
        with st.expander(f"All runs ({len(runs)})"):
            st.dataframe(pd.DataFrame([{"time": r.when, "model": r.model, "data": r.data, "status": r.status}
                                       for r in runs]), hide_index=True, key="runs_table")
        with st.expander("Manage this run"):
            running = state.any_job_running()
            inputs = info.get_inputs()
            code_specs = state.untrusted_code(inputs) if inputs is not None else []
            if code_specs:  # resuming, evaluating or exporting loads it, and loading runs it
                trust_key = f"trust_run_{info.id}"
                st.checkbox(f"I trust this code: {escape(', '.join(code_specs))}", key=trust_key, value=False,
                            on_change=_trust, args=(info.id, trust_key),
                            help="This run's model or data is Python code (.py or .pt2); the dashboard runs it "
                                 "only once you vouch for it in this session.")
            if info.status in ("interrupted", "cancelled", "failed") and info.inputs:
                st.button("Resume this run", key="resume_run", on_click=_resume, args=(info.id,), disabled=running,
                          help="Runs only the trials that did not finish.")
            st.button("Delete this run", key="delete_run", on_click=_delete, args=(info.id,),
                      disabled=info.status == "running")
            st.caption(f"Run store: {code(state.runs_dir())}")


def run_status_lines(info: state.RunInfo) -> list[str]:
    """What a run that is not simply finished is: whose process analyses it, or why it stopped."""
    if info.status == "running":
        if info.id in state.jobs.own_jobs():
            return [f"being analysed by this dashboard (worker process {info.pid})"]
        # e.g. a `quantlens analyze` writing into the store, or another dashboard server sharing it
        return [f"⚠ being analysed by another process ({info.pid} on {escape(info.host)}: a CLI run or another "
                "dashboard); it opens here when it is done"]
    if info.status == "interrupted":
        return ["⚠ interrupted: the process analysing it stopped before it finished (a closed server, a crash); "
                "its finished trials are kept: resume it in *Manage this run*"]
    if info.error and not info.done:
        return [f"⚠ {escape(info.error)}"]
    return []


def notices() -> None:
    """Messages left by callbacks and finished jobs, shown once."""
    pending, st.session_state.notices = list(st.session_state.notices), []
    for kind, text in pending:
        if kind == "success":
            st.toast(text, icon=":material/check_circle:")
        elif kind == "error":
            st.error(text)
        else:
            st.info(text)
