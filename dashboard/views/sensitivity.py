"""Page 2: which layers are sensitive — table, bar chart, heat map, local vs output, cumulative, compare."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analysis import charts, runstore
from dashboard import derived, figures, state, tables
from dashboard.markup import escape

info, result = state.require_result()
table = derived.frame(info.key, result)
layer_names = [layer.name for layer in result.layers]

st.title("Sensitivity")
st.caption(f"Run **{escape(info.model)}** on {escape(info.data)} · {len(result.layers)} layers · {len(table)} trials. "
           "Local = the layer's own output with FP32 inputs; output = the model's output with only this layer "
           "quantized; cumulative = every layer quantized at once.")

if table.empty:
    st.warning("This analysis has no trials.")
    st.stop()


# --- selection -> layer detail -------------------------------------------------------------------


def _points(key: str) -> list:
    value = st.session_state.get(key)
    if value is None:
        return []
    selection = value.get("selection") if isinstance(value, dict) else getattr(value, "selection", None)
    if selection is None:
        return []
    points = selection.get("points") if isinstance(selection, dict) else getattr(selection, "points", None)
    return list(points or [])


def _select_from_chart(key: str) -> None:
    for point in _points(key):
        for field in ("y", "x"):
            name = point.get(field) if isinstance(point, dict) else None
            if isinstance(name, str) and name in layer_names:
                st.session_state.selected_layer = name
                return


def _select_from_table() -> None:
    value = st.session_state.get("sens_table")
    selection = getattr(value, "selection", None) or (value or {}).get("selection", {})
    rows = selection.get("rows") if isinstance(selection, dict) else getattr(selection, "rows", [])
    shown = st.session_state.get("_sens_rows", [])
    if rows and rows[0] < len(shown):
        st.session_state.selected_layer = shown[rows[0]]


# --- filters -------------------------------------------------------------------------------------

metrics = derived.metric_options(result, table)
targets = charts.swept_targets(result)
all_formats = sorted(table["format"].unique(), key=lambda f: charts.precision_key(f))
# Filters outlive a change of run: drop what the newly opened run does not have.
if any(f not in all_formats for f in st.session_state.get("sens_formats", [])):
    st.session_state["sens_formats"] = [f for f in st.session_state["sens_formats"] if f in all_formats]
if st.session_state.get("sens_top_n", 0) > max(1, len(layer_names)):
    st.session_state["sens_top_n"] = len(layer_names)
c1, c2, c3, c4, c5 = st.columns([3, 2, 3, 2, 2])
search = c1.text_input("Search layers", key="sens_search", placeholder="part of a layer name")
target = c2.selectbox("Target", ["all", *targets], key="sens_target")
formats = c3.multiselect("Formats", all_formats, key="sens_formats", placeholder="all formats")
metric = c4.selectbox("Rank by", metrics, key="sens_metric", format_func=charts.metric_label)
default_top = min(len(layer_names), 40)
top_n = int(c5.number_input("Top-N layers (0 = all)", min_value=0, max_value=max(1, len(layer_names)),
                            value=default_top, key="sens_top_n"))

view = table
if search.strip():
    view = view[view["layer"].str.contains(search.strip(), case=False, regex=False)]
if target != "all":
    view = view[view["target"] == target]
if formats:
    view = view[view["format"].isin(formats)]
values = pd.to_numeric(view[metric], errors="coerce")
higher_better = metric in ("sqnr_db", "output_sqnr_db", "cosine", "output_cosine", "output_top1_agreement")
ranked = (view.assign(_v=values).dropna(subset=["_v"]).groupby("layer", sort=False)["_v"]
          .agg("min" if higher_better else "max").sort_values(ascending=higher_better))
ranking = list(ranked.index) + [n for n in dict.fromkeys(view["layer"]) if n not in ranked.index]
shown_layers = ranking[:top_n] if top_n else ranking
view = view[view["layer"].isin(shown_layers)]
view = view.assign(_v=pd.to_numeric(view[metric], errors="coerce")).sort_values(
    "_v", ascending=higher_better, na_position="last", kind="stable").drop(columns="_v")
subset = derived.restrict(result, shown_layers)
filter_key = (search.strip().lower(), target, tuple(formats), metric, top_n)

if search.strip() and view.empty:
    st.warning(f"No layer matches {escape(repr(search.strip()))}.")

# --- table + bar chart ----------------------------------------------------------------------------

left, right = st.columns([3, 2], gap="medium")
with left:
    st.markdown(f"**{len(view)} trials** · {len(shown_layers)} of {len(layer_names)} layers · "
                "most sensitive first; click a header to sort, a row to inspect the layer")
    estimated = "output_source" in view and (view["output_source"] == "estimated").any()
    if estimated:
        st.caption("Output metrics in rows marked *estimated* are first-order estimates (one backward pass per "
                   "projection), not measurements; rows marked *exact* were measured.")
    columns = ["layer", "target", "format", metric, "output_sqnr_db", "output_source" if estimated else None,
               "sqnr_db", "output_kl",
               "output_top1_agreement", "kind", "cosine", "mse", "params", "macs", "status", "error"]
    columns = [c for c in dict.fromkeys(columns) if c is not None and c in view]
    st.session_state["_sens_rows"] = list(view["layer"])
    st.dataframe(
        view[columns], hide_index=True, height=min(38 + 35 * max(len(view), 1), 560), key="sens_table",
        on_select=_select_from_table, selection_mode="single-row", placeholder="–",
        column_config=tables.fit(view[columns], {
            "sqnr_db": st.column_config.NumberColumn("local SQNR (dB)", format="%.1f"),
            "output_sqnr_db": st.column_config.NumberColumn("output SQNR (dB)", format="%.1f"),
            "output_source": st.column_config.TextColumn("output", help="exact: measured; estimated: first-order estimate"),
            "output_kl": st.column_config.NumberColumn("output KL", format="%.2e"),
            "output_top1_agreement": st.column_config.NumberColumn("top-1 agreement", format="percent"),
            "cosine": st.column_config.NumberColumn("local cosine", format="%.5f"),
            "mse": st.column_config.NumberColumn("local MSE", format="%.2e"),
            "params": st.column_config.NumberColumn("params", format="localized"),
            "macs": st.column_config.NumberColumn("MACs / sample", format="localized"),
        }),
    )
with right:
    bar_targets = targets if target == "all" else [target]
    b1, b2 = st.columns(2)
    bar_target = b1.selectbox("Bar chart target", bar_targets, key="sens_bar_target")
    bar_formats = charts.target_formats(result, bar_target)
    if formats:
        bar_formats = [f for f in bar_formats if f in formats] or bar_formats
    bar_fmt = b2.selectbox("Bar chart format", bar_formats, index=len(bar_formats) - 1, key="sens_bar_fmt",
                           help="Defaults to the lowest precision tried.")
    fig = derived.figure("bar", info.key, filter_key + (bar_target, bar_fmt), lambda: charts.sensitivity_bar(
        subset, bar_target, bar_fmt, metric, top_n=top_n or None))
    # A narrow column: the title's parenthesis goes on a second line instead of being cut off.
    fig.update_layout(title=dict(text=(fig.layout.title.text or "").replace(" (", "<br>(", 1), font_size=13),
                      margin=dict(t=76))
    st.plotly_chart(fig, key="sens_bar", on_select=lambda: _select_from_chart("sens_bar"),
                    selection_mode="points")

selected = st.session_state.get("selected_layer")
if selected in layer_names:
    s1, s2 = st.columns([3, 1])
    s1.info(f"Selected layer: **{escape(selected)}** (click a bar, a heat-map cell or a table row to change it)")
    s2.page_link("views/layer_detail.py", label="Open in Layer detail →", icon=":material/zoom_in:")

# --- more views (only the open tab is computed) ----------------------------------------------------

tab_names = ["Heat map", "Local vs output", "Cumulative", "Skipped & failed", "Compare runs"]
tabs = st.tabs(tab_names, key="sens_view", on_change="rerun")

with tabs[0]:
    if tabs[0].open:
        heat_target = st.selectbox("Heat map target", targets, key="sens_heat_target")
        fig = derived.figure("heat", info.key, filter_key + (heat_target,), lambda: figures.clickable_heatmap(
            charts.heatmap(subset, heat_target, metric)))
        st.plotly_chart(fig, key="sens_heat", on_select=lambda: _select_from_chart("sens_heat"),
                        selection_mode="points")

with tabs[1]:
    if tabs[1].open:
        if charts.has_values(result, "output_sqnr_db"):
            fig = derived.figure("scatter", info.key, filter_key, lambda: charts.local_vs_output_scatter(
                subset, target=None if target == "all" else target))
            st.plotly_chart(fig, key="sens_scatter")
            st.caption("Below the diagonal: error grows on the way to the output; above: the network forgives it.")
        else:
            st.info("Output metrics were not computed for this analysis.")

with tabs[2]:
    if tabs[2].open:
        if result.cumulative:
            fig = derived.figure("cumulative", info.key, (target,), lambda: charts.cumulative_chart(
                result, None if target == "all" else target))
            st.plotly_chart(fig, key="sens_cumulative")
            cum = result.cumulative_frame()
            outputs = cum[cum["layer"] == "<model output>"][["target", "format", "sqnr_db", "kl", "top1_agreement"]]
            st.markdown("**Model output with every layer quantized**")
            st.dataframe(outputs.rename(columns={"sqnr_db": "output SQNR (dB)", "kl": "output KL",
                                                 "top1_agreement": "top-1 agreement"}),
                         hide_index=True, key="sens_cum_table")
        else:
            st.info("The cumulative analysis was not run for this analysis.")
        failed_cum = [c for c in result.cumulative if c.error]
        if failed_cum:
            st.warning("Failed cumulative configurations: " + "; ".join(f"{escape(c.format)}: {escape(c.error)}" for c in failed_cum))

with tabs[3]:
    if tabs[3].open:
        st.markdown("**Skipped layers** — hold weights but were not analysed")
        skipped = result.skipped_frame()
        if skipped.empty:
            st.caption("None: every weight-holding module was analysed.")
        else:
            st.dataframe(skipped, hide_index=True, key="sens_skipped")
        st.markdown("**Failed trials** — the sweep went on without them")
        failed = table[table["status"] == "failed"][["layer", "target", "format", "error"]]
        if failed.empty:
            st.caption("None: every trial succeeded.")
        else:
            st.dataframe(failed, hide_index=True, key="sens_failed")

with tabs[4]:
    if tabs[4].open:
        others = [r for r in state.list_runs() if r.done and r.id != info.id]
        if not others:
            st.info("Only one finished run: analyse another model or configuration to compare with this one.")
        else:
            by_id = {r.id: r for r in others}
            other_labels = runstore.run_labels(others, detailed=True)
            other_id = st.selectbox("Compare with (B)", list(by_id), key="sens_compare_run",
                                    format_func=lambda i: other_labels.get(i, i))
            other = by_id[other_id]
            try:
                other_result = state.load_run_result(other)
            except Exception as exc:  # noqa: BLE001
                st.error(f"Cannot open run {escape(other.id)}: {escape(state.one_line(exc))}")
                st.stop()
            other_table = derived.frame(other.key, other_result)
            compare_metric = metric if metric in other_table else "sqnr_db"
            merged = figures.compare_frame(table, other_table, compare_metric)
            st.caption(f"A = this run ({escape(info.title())}), B = {escape(other.title())}; {charts.metric_label(compare_metric)}; "
                       "rows are the layer × target × format trials both runs have.")
            if merged.empty:
                st.warning("The two runs share no layer × target × format trials (different models or formats).")
            else:
                if search.strip():
                    merged = merged[merged["layer"].str.contains(search.strip(), case=False, regex=False)]
                diff = merged["B − A"].astype(float)
                k1, k2, k3 = st.columns(3)
                k1.metric("Common trials", len(merged))
                k2.metric("Mean B − A", f"{np.nanmean(diff):+.2f}" if len(diff) and diff.notna().any() else "–")
                k3.metric("Largest |B − A|", f"{np.nanmax(diff.abs()):.2f}" if len(diff) and diff.notna().any() else "–")
                st.dataframe(merged.rename(columns={"A": f"A {compare_metric}", "B": f"B {compare_metric}"}),
                             hide_index=True, key="sens_compare_table", placeholder="–",
                             column_config={c: st.column_config.NumberColumn(format="%.2f")
                                            for c in (f"A {compare_metric}", f"B {compare_metric}", "B − A")})
                fig = figures.compare_figure(merged, compare_metric, info.model, other.model, top_n=top_n or 40)
                st.plotly_chart(fig, key="sens_compare_chart")
