"""Page 5: take the results away — precision map (JSON / YAML), HTML report, CSV, toolchain files."""

from __future__ import annotations

import re

import streamlit as st

from dashboard import derived, state
from dashboard.markup import code, escape

info, result = state.require_result()
ss = st.session_state

st.title("Export & reports")
slug = re.sub(r"[^A-Za-z0-9]+", "-", info.model).strip("-").lower() or "model"

# --- the precision map -----------------------------------------------------------------------------

pmap = ss.current_maps.get(info.id)
if pmap is not None:
    st.markdown("**Precision map** — the one on the *Mixed precision* page (with your edits).")
else:
    try:
        prob = derived.problem(info.key, result)
        pmap = derived.suggestion(info.key, "avg-bits", 6.0, prob, result).map
        st.markdown("**Precision map** — the allocator's suggestion for an average of 6 weight bits "
                    "(choose another budget or edit it on the *Mixed precision* page).")
    except Exception as exc:  # noqa: BLE001 — e.g. a local-only analysis has nothing to allocate with
        st.info(f"No precision map for this run: {escape(state.one_line(exc))}")

if pmap is not None:
    c1, c2 = st.columns(2)
    c1.download_button("Precision map (JSON)", pmap.dumps("json"), file_name=f"{slug}.precision-map.json",
                       mime="application/json", key="dl_map_json", icon=":material/description:", width="stretch",
                       on_click="ignore")
    c2.download_button("Precision map (YAML)", pmap.dumps("yaml"), file_name=f"{slug}.precision-map.yaml",
                       mime="application/x-yaml", key="dl_map_yaml", icon=":material/description:", width="stretch",
                       on_click="ignore")
    with st.expander("Preview the map"):
        st.code(pmap.dumps("yaml"), language="yaml")

# --- the analysis ----------------------------------------------------------------------------------

st.markdown("**Analysis**")
# Every download holds its bytes (no callables: a deferred file is dropped by the next rerun, so a
# second click within a second of the first got nothing) and does not rerun the page when clicked.
stored_report = info.path / "report.html"
report = (stored_report.read_bytes() if stored_report.is_file()
          else derived.report_html(info.key, f"quantlens: {info.model}", result))
csv_path = info.path / "layers.csv"
table = csv_path.read_bytes() if csv_path.is_file() else derived.frame(info.key, result).to_csv(index=False).encode()
c3, c4, c5 = st.columns(3)
c3.download_button("Per-layer report (HTML)", report, file_name=f"{slug}.report.html", mime="text/html",
                   key="dl_report", icon=":material/analytics:", width="stretch", on_click="ignore",
                   help="Self-contained: opens offline, charts included.")
c4.download_button("layers.csv", table, file_name=f"{slug}.layers.csv", mime="text/csv", key="dl_csv",
                   icon=":material/table:", width="stretch", on_click="ignore")
c5.download_button("analysis.json", (info.path / "analysis.json").read_bytes(), file_name=f"{slug}.analysis.json",
                   mime="application/json", key="dl_analysis", icon=":material/data_object:", width="stretch",
                   on_click="ignore", help="Everything, reloadable with analysis.results.load_analysis.")
st.caption(f"The run folder on the server: {code(info.path)}")

# --- toolchain files (analysis.export) -------------------------------------------------------------

st.markdown("**Toolchain files**")
targets, why_not = derived.toolchain_targets()
if why_not:
    st.caption(f"AIMET encodings and ONNX Runtime overrides: {escape(why_not)}.")
elif pmap is None:
    st.caption("Needs a precision map.")
else:
    st.caption("Scales and zero points pinned to the ones the analysis calibrated, so the deployed model "
               "reproduces the simulated one. Built from the run's model and calibration data (a few seconds).")
    built = ss.setdefault("_toolchain", {})
    build_key = (info.key, pmap.dumps("json"))
    if st.button("Prepare toolchain files", key="dl_prepare"):
        inputs = info.get_inputs()
        files: dict[str, tuple] = {}
        try:
            if inputs is None:
                raise ValueError("this run does not record its model and data (made outside the dashboard?)")
            model, calibration = state.load_model(inputs), state.load_data(inputs)
        except Exception as exc:  # noqa: BLE001 — e.g. uploaded files gone after a restart
            st.error(f"Cannot load the run's model: {escape(state.one_line(exc))}")
        else:
            with st.spinner("Exporting…"):
                for target, label, filename in targets:
                    try:
                        files[target] = ("ok", *derived.toolchain_file(target, filename, pmap, model, calibration))
                    except Exception as exc:  # noqa: BLE001 — one target failing leaves the others
                        files[target] = ("error", state.one_line(exc))
            built.clear()  # keep only the latest set (they can be large)
            built[build_key] = files
    files = built.get(build_key)
    if files:
        columns = st.columns(len(targets))
        for column, (target, label, _) in zip(columns, targets):
            entry = files.get(target)
            if entry is None:
                continue
            if entry[0] == "ok":
                column.download_button(label, entry[1], file_name=f"{slug}.{entry[2]}", key=f"dl_tool_{target}",
                                       icon=":material/extension:", width="stretch", on_click="ignore")
            else:
                column.error(f"{label}: {escape(entry[1])}")
    elif built:
        st.caption("The map changed since the files were prepared: prepare them again.")
