"""Page 4: the best format per layer under a budget — Pareto front, editable map, real evaluation."""

from __future__ import annotations

import hashlib
import math

import streamlit as st

from analysis import charts
from analysis.allocate import BUDGET_KINDS, COST_KINDS, Budget, finish_map, suggest
from dashboard import derived, figures, state, tables
from dashboard.markup import escape

info, result = state.require_result()
ss = st.session_state

st.title("Mixed precision")
st.caption("The allocator picks each layer's format to minimise the predicted output error within a budget "
           "(exact multiple-choice knapsack over the sweep's measurements). Predictions assume the layers' "
           "errors add up; **Evaluate** measures the real thing.")

if not charts.has_values(result, "output_sqnr_db"):
    st.warning("This analysis has no output metrics, which the allocator needs; run a full analysis.")
    st.stop()

use_groups = st.toggle("Deployment groups", value=True, key="mp_groups",
                       help="Layers a runtime runs as one kernel (fused q/k/v, gate/up projections, the experts of "
                            "one MoE layer) get one format together, as `quantlens suggest` does (--no-groups there).")
prob = derived.problem(info.key, result, use_groups)
if prob.groups:
    st.caption(f"{len(prob.groups)} deployment group(s), one format each: "
               + "; ".join(escape(" + ".join(names)) for names in prob.group_names()[:6])
               + (" …" if len(prob.groups) > 6 else ""))
if not any(len(choices) > 1 for choices in prob.choices):
    st.warning("No layer has a successful quantized trial with output metrics: nothing to allocate.")
    st.stop()

# --- budget --------------------------------------------------------------------------------------

UNITS = {"avg-bits": "average weight bits", "size-kb": "weight size (KiB)", "bops": "BOPs per sample",
         "min-sqnr": "minimum output SQNR (dB)", "max-drop": "largest task-metric drop (points)"}
kinds = list(BUDGET_KINDS)
shadow = ss.setdefault("_mp_values", {})  # widget state is dropped on other pages; this is not
if "mp_kind" not in ss:
    ss["mp_kind"] = shadow.get("kind", "avg-bits")
c1, c2, c3 = st.columns([3, 2, 2])
kind = c1.selectbox("Budget", kinds, key="mp_kind", format_func=lambda k: f"{k} — {BUDGET_KINDS[k]}")
shadow["kind"] = kind
# Size and BOPs budgets only make sense for one model: those are remembered per run.
value_key = f"mp_value_{kind}" if kind not in ("size-kb", "bops") else f"mp_value_{kind}_{info.id}"
if value_key not in ss:
    ss[value_key] = float(shadow.get(value_key, derived.budget_default(kind, prob)))
step = {"avg-bits": 0.25, "min-sqnr": 1.0, "max-drop": 0.1}.get(kind) or max(ss[value_key] / 20, 1e-3)
value = float(c2.number_input(UNITS[kind], key=value_key, step=float(step),
                              min_value=None if kind == "min-sqnr" else 0.0, format="%.4g"))
shadow[value_key] = value
eval_samples = int(c3.number_input("Evaluation samples", min_value=1, max_value=1_000_000,
                                   value=int(shadow.get("eval_samples", 256)), key="mp_eval_samples",
                                   help="Samples of the evaluation data used by Evaluate and by max-drop."))
shadow["eval_samples"] = eval_samples

def measured_box(measured: dict | None, title: str) -> None:
    """The measured figures of a map (what `suggest` records as `measured`), shown as such."""
    if not measured:
        return
    st.markdown(f"**{title}** — measured, not predicted:")
    cols = st.columns(3)
    cols[0].metric("Measured output SQNR", f"{measured['sqnr_db']:.1f} dB")
    if measured.get("metric") is not None:
        cols[1].metric("Measured task metric", f"{measured['metric']:.2f}")
        cols[2].metric("Measured drop (points)", f"{measured['drop']:+.2f}")


sug = None
if kind == "max-drop":
    found = ss.setdefault("_mp_maxdrop", {})
    search_key = (info.key, value, eval_samples)
    st.caption("A max-drop budget is judged with real evaluations of the task metric (needs labelled data).")
    if st.button("Search for the cheapest map within this drop", key="mp_maxdrop_search"):
        try:
            evaluator, lock = derived.run_evaluator(info, result, eval_samples)
            with st.spinner("Evaluating candidate maps…"), lock:
                found[search_key] = suggest(prob, Budget(kind, value), measure=evaluator.measure,
                                            fingerprint=derived.fingerprint_of(result),
                                            provenance=derived.provenance_of(result))
        except Exception as exc:  # noqa: BLE001
            st.error(escape(state.one_line(exc)))
    sug = found.get(search_key)
    if sug is None:
        st.info("Press the button to search (it runs a few evaluations of the model).")
        st.stop()

else:
    try:
        sug = derived.suggestion(info.key, kind, value, prob, result)
    except Exception as exc:  # noqa: BLE001 — e.g. an impossible budget the allocator refuses
        st.error(escape(state.one_line(exc)))
        st.stop()

# --- the map: suggested, or loaded from a file, then edited by hand -----------------------------------

loaded = ss.setdefault("_mp_loaded", {})  # run id -> (file name, map dict)
with st.expander("Load a precision map from a file (JSON / YAML)"):
    upload = st.file_uploader("Precision map (.json, .yaml)", key="mp_map_upload")
    if upload is not None and ss.get("_mp_loaded_file") != upload.file_id:
        ss["_mp_loaded_file"] = upload.file_id
        try:
            pmap_loaded = derived.load_map_upload(upload.getvalue(), upload.name, result)
            loaded[info.id] = (upload.name, pmap_loaded.to_dict())
        except Exception as exc:  # noqa: BLE001
            st.error(escape(state.one_line(exc)))
    if info.id in loaded and st.button("Back to the suggested map", key="mp_unload"):
        loaded.pop(info.id, None)
        st.rerun()

from analysis.precision_map import map_from_dict  # noqa: E402

if info.id in loaded:
    source_name, source_dict = loaded[info.id]
    base_map = map_from_dict(source_dict, source_name)
    editor_key = f"mp_editor_{info.id}_file_{hashlib.sha1(str(source_dict).encode()).hexdigest()[:8]}"
    st.caption(f"Showing the map loaded from **{escape(source_name)}**.")
else:
    base_map = sug.map
    editor_key = f"mp_editor_{info.id}_{kind}_{value:g}"

for note in sug.notes if info.id not in loaded else ():
    # An impossible budget is a bad input: said as an error (the allocator still shows its closest map).
    (st.error if "cannot be met" in note or "not met" in note else st.warning)(f"Allocator: {escape(note)}")

weight_options, act_options = derived.format_choices(result)
base_table = derived.map_table(prob, base_map)
weight_options += [w for w in base_table["weight"].unique() if w not in weight_options]
act_options += [a for a in base_table["activation"].unique() if a not in act_options]

metrics_box = st.container()  # filled below, once the edited map is known
left, right = st.columns([1, 1], gap="medium")
with left:
    st.markdown("**Precision map** — change a layer's format in the table to override the allocator")
    edited = st.data_editor(
        base_table, key=editor_key, hide_index=True, num_rows="fixed",
        disabled=["layer", "kind", "params", "SQNR alone (dB)"],
        height=min(38 + 35 * len(base_table), 520),
        # The editable formats first: in a half-width column the last columns scroll out of view.
        column_order=["layer", "weight", "activation", "SQNR alone (dB)", "kind", "params"],
        column_config=tables.fit(base_table, {
            "weight": st.column_config.SelectboxColumn("weight", options=weight_options, required=True),
            "activation": st.column_config.SelectboxColumn("activation", options=act_options, required=True),
            "params": st.column_config.NumberColumn(format="compact"),
            "SQNR alone (dB)": st.column_config.NumberColumn(
                format="%.1f", help="Predicted model-output SQNR with only this layer at this choice"),
        }),
    )
    try:
        pmap = derived.map_from_table(edited, result, notes=tuple(base_map.notes))
    except Exception as exc:  # noqa: BLE001 — a bad edit: say why, keep the last valid map
        st.error(f"Map edit not applied: {escape(state.one_line(exc))}")
        pmap = ss.current_maps.get(info.id) or base_map
    changed = [name for name in pmap.layers if pmap.precision(name) != base_map.precision(name)]
    if changed:
        st.caption(f"{len(changed)} layer(s) changed by hand: {escape(', '.join(changed[:6]))}"
                   + (" …" if len(changed) > 6 else ""))

# The map as it is exported: the same budget / predicted / measured fields as `quantlens suggest`
# writes. A measurement is kept only while it is of exactly this map.
layer_names = [layer.name for layer in result.layers]
stored = ss.evaluations.get(info.id)


def _measured_for(candidate):
    if base_map.measured and derived.same_precisions(candidate, base_map, layer_names):
        return base_map.measured
    if stored and stored.get("measured") and derived.same_precisions(candidate, stored["map"], layer_names):
        return stored["measured"]
    return None


map_budget = None if info.id in loaded else Budget(kind, value)  # a loaded map keeps its own budget
pmap = finish_map(prob, pmap, map_budget, _measured_for(pmap))
ss.current_maps[info.id] = pmap
summary = pmap.predicted
base_summary = prob.predict(base_map)
unmeasured = summary.get("unmeasured") or []


def _delta(key: str, spec: str) -> str | None:
    a, b = summary.get(key), base_summary.get(key)
    if a is None or b is None or not changed or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
        return None
    return format(a - b, spec)


with metrics_box:
    m1, m2, m3, m4 = st.columns(4)
    sqnr = summary["output_sqnr_db"]
    m1.metric("Predicted output SQNR", f"{sqnr:.1f} dB" if sqnr is not None else "n/a",
              delta=_delta("output_sqnr_db", "+.1f"), help="From the sweep, assuming layer errors add up.")
    m2.metric("Average weight bits", f"{summary['avg-bits']:.2f}", delta=_delta("avg-bits", "+.2f"),
              delta_color="inverse")
    m3.metric("Weight size", f"{summary['size-kb']:.1f} KiB", delta=_delta("size-kb", "+.1f"), delta_color="inverse")
    m4.metric("BOPs / sample", f"{summary['bops']:.3g}")
    measured_box(pmap.measured, "This map")
    if unmeasured:
        st.caption("No prediction: the sweep never measured "
                   + ", ".join(unmeasured[:4]) + " at the chosen format(s). Evaluate to measure.")

with right:
    x_kind = kind if kind in COST_KINDS else "avg-bits"
    front_points, uniform = derived.front(info.key, x_kind, prob)

    def _use_point() -> None:
        for point in (ss.get("mp_pareto") or {}).get("selection", {}).get("points", []):
            if kind in COST_KINDS and point.get("curve_number") == 0 and isinstance(point.get("x"), (int, float)):
                ss[value_key] = float(point["x"])
                shadow[value_key] = float(point["x"])
                return

    current = {"cost": summary[x_kind], "sqnr": summary["output_sqnr_db"], "label": "this map"}
    st.plotly_chart(figures.pareto_figure(front_points, uniform, x_kind, current), key="mp_pareto",
                    on_select=_use_point, selection_mode="points")
    st.caption("Front: the allocator's best map at each budget; diamonds: one format everywhere; star: the map "
               "on the left." + (" Click a front point to use its budget." if kind in COST_KINDS else ""))

# --- evaluation ----------------------------------------------------------------------------------

st.subheader("Evaluate")
inputs = info.get_inputs()
if inputs is not None:
    spec, split = inputs.eval_source()
    where = f"the {split} split of {spec}" if spec.startswith("sample:") else "the uploaded evaluation data"
    st.caption(f"Runs FP32, the uniform baselines ({', '.join(f'{w}/{a}' if a else w for w, a in derived.baseline_pairs(result))}) "
               f"and this map on the first {eval_samples} samples of {where} (all of it if it holds fewer), with "
               "the quantizers and ranges the sweep calibrated (simulated quantization).")
if st.button("Evaluate this map", type="primary", key="mp_evaluate"):
    try:
        evaluator, lock = derived.run_evaluator(info, result, eval_samples)
        rows = derived.baseline_rows(info.key, eval_samples, derived.baseline_pairs(result), evaluator, lock)
        with st.spinner("Evaluating this map…"), lock:
            row = evaluator.evaluate(pmap, "this map").as_row()
            # What `quantlens suggest` records as measured: output noise on the calibration data,
            # and the task metric's drop with labelled data.
            measured = evaluator.measure(pmap.assignment(evaluator.layer_names))
        stored = ss.evaluations[info.id] = {"rows": [*rows, row], "map": pmap, "measured": measured,
                                            "samples": len(evaluator.evaluation), "where": where}
        pmap = ss.current_maps[info.id] = finish_map(prob, pmap, map_budget, measured)
    except Exception as exc:  # noqa: BLE001 — missing files, unknown layers, model errors: one line
        st.error(f"Evaluation failed: {escape(state.one_line(exc))}")
    else:
        st.rerun()  # the measured figures go next to the predicted ones at the top
if stored:
    if stored.get("where"):
        st.caption(f"Evaluated on {stored['samples']} samples of {stored['where']}.")
    evaluation = derived.evaluation_table(stored["rows"])
    st.dataframe(evaluation, hide_index=True, key="mp_eval_table", placeholder="–",
                 column_config=tables.fit(evaluation, {
                     "value": st.column_config.NumberColumn(format="%.2f"),
                     "drop (points)": st.column_config.NumberColumn(format="%+.2f"),
                     "output SQNR (dB)": st.column_config.NumberColumn(format="%.1f"),
                     "output KL": st.column_config.NumberColumn(format="%.2e"),
                     "top-1 agreement": st.column_config.NumberColumn(format="percent"),
                     "avg weight bits": st.column_config.NumberColumn(format="%.2f"),
                     "size (KiB)": st.column_config.NumberColumn(format="%.1f"),
                     "BOPs / sample": st.column_config.NumberColumn(format="compact"),
                     "ms / sample (simulated)": st.column_config.NumberColumn(format="%.3f"),
                 }))
    if not derived.same_precisions(stored["map"], pmap, layer_names):
        st.caption("The map has changed since this evaluation: press Evaluate again to measure it.")
