"""Page: win back what a precision map loses — calibration remedies and QAT on one table."""

from __future__ import annotations

import hashlib

import pandas as pd
import streamlit as st

from analysis.config import QATConfig
from analysis.precision_map import uniform_map
from analysis.qat.compare import recovery_table
from dashboard import derived, state, tables
from dashboard.markup import escape

info, result = state.require_result()
ss = st.session_state

st.title("Recover")
st.caption("For one precision map: the accuracy post-training quantization (PTQ) loses, and how much each remedy "
           "wins back — other clipping, per-channel weights, SmoothQuant, and quantization-aware fine-tuning (QAT). "
           "Every row is measured on the held-out data with the map's formats. QAT keeps the PTQ model unless "
           "fine-tuning beats it on a validation split carved from the calibration data.")

inputs = info.get_inputs()
if inputs is None:
    st.warning("This run does not record its model and data (made outside the dashboard?); analyse the model "
               "from the Model & data page to compare remedies.")
    st.stop()

layer_names = [layer.name for layer in result.layers]
choices = {}
if ss.current_maps.get(info.id) is not None:
    choices["the map on the Mixed precision page"] = ss.current_maps[info.id]
for weight, act in derived.baseline_pairs(result):
    choices[f"uniform {weight}" + (f"/{act}" if act else " (weight-only)")] = uniform_map(
        layer_names, weight, act, quant=derived.quant_of(result))
c1, c2, c3 = st.columns([3, 1, 1])
label = c1.selectbox("Map", list(choices), key="rc_map",
                     help="Choose where PTQ hurts: 4 bits and below, or the map you built on the Mixed precision page.")
epochs = int(c2.number_input("QAT epochs (at most)", min_value=0, max_value=500, value=QATConfig().epochs, key="rc_epochs",
                             help="Early stopping usually ends sooner; 0 leaves QAT out."))
lr = float(c3.number_input("QAT learning rate", min_value=1e-8, max_value=1.0, value=QATConfig().lr, format="%.1e",
                           key="rc_lr", help="Peak rate after a one-epoch warm-up, then cosine decay."))
pmap = choices[label]
digest = hashlib.sha1(pmap.dumps("json").encode()).hexdigest()[:12]
run_key = (info.id, digest, epochs, lr)
found = ss.setdefault("_rc_results", {})

if st.button("Compare remedies and QAT", type="primary", key="rc_run"):
    bar = st.progress(0.0, text="Measuring the remedies…")

    def _progress(done: int, total: int, text: str) -> None:
        bar.progress(min(done / max(total, 1), 1.0), text=f"QAT epoch {done}/{total}: {escape(text)}")

    try:
        model = state.load_model(inputs)
        calibration = state.load_data(inputs)
        evaluation = state.load_eval_data(inputs)
        with st.spinner("Measuring remedies and fine-tuning…"):
            rows, qat = recovery_table(model, pmap, calibration, evaluation,
                                       qat=QATConfig(epochs=epochs, lr=lr) if epochs else None, progress=_progress)
        found[run_key] = {"rows": rows, "summary": qat.summary() if qat else []}
    except Exception as exc:  # noqa: BLE001 — missing files, bad labels, model errors: one line
        st.error(f"Comparison failed: {escape(state.one_line(exc))}")
    bar.empty()

stored = found.get(run_key)
if stored is None:
    st.info("Press **Compare remedies and QAT** (QAT takes from seconds to minutes on a CPU).")
    st.stop()

rows = stored["rows"]
ptq, qat_row = rows[0], next((r for r in rows if r["remedy"].startswith("QAT")), None)
m1, m2, m3 = st.columns(3)
m1.metric("PTQ drop", f"{ptq['drop']:.2f} points" if ptq["drop"] is not None else "n/a",
          help="Task metric lost by the map as calibrated, against FP32, on the held-out data.")
if qat_row is not None:
    m2.metric("QAT drop", f"{qat_row['drop']:.2f} points" if qat_row["drop"] is not None else "n/a")
    m3.metric("Recovered by QAT", f"{100 * qat_row['recovered']:.0f} %" if qat_row["recovered"] is not None else "n/a",
              help="Share of the PTQ drop won back (100 %: back to FP32).")
COLUMNS = {"remedy": "remedy", "metric": "task metric", "drop": "drop (points)", "output_sqnr_db": "output SQNR (dB)",
           "recovered": "PTQ drop recovered", "note": "note"}
table = pd.DataFrame(rows)[list(COLUMNS)].rename(columns=COLUMNS)
st.dataframe(table, hide_index=True, key="rc_table", placeholder="–",
             column_config=tables.fit(table, {
                 "task metric": st.column_config.NumberColumn(format="%.2f"),
                 "drop (points)": st.column_config.NumberColumn(format="%+.2f"),
                 "output SQNR (dB)": st.column_config.NumberColumn(format="%.1f"),
                 "PTQ drop recovered": st.column_config.NumberColumn(format="percent"),
             }))
for line in stored["summary"]:
    st.caption(escape(line))  # names the data sets, which the user named
st.caption("To deploy the fine-tuned weights: `quantlens finetune` writes them with a map whose provenance names "
           "them, and `quantlens export` of that map carries them and their ranges to every toolchain.")
