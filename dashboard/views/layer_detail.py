"""Page 3: one layer up close — value distributions, clipping ranges, error, channel ranges, all numbers."""

from __future__ import annotations

import streamlit as st

from analysis import charts
from dashboard import derived, state, tables
from dashboard.markup import escape

info, result = state.require_result()
table = derived.frame(info.key, result)
names = [layer.name for layer in result.layers]

st.title("Layer detail")
if not names:
    st.warning("This analysis has no layers.")
    st.stop()

metric = "output_sqnr_db" if charts.has_values(result, "output_sqnr_db") else "sqnr_db"
ranking = charts.layer_ranking(result, metric)
selected = st.session_state.get("selected_layer")
if selected not in names:
    selected = ranking[0] if ranking else names[0]
    st.session_state.selected_layer = selected
picker_key = f"detail_layer_{selected}"  # a layer selected on another page gets a fresh widget


def _on_layer() -> None:
    st.session_state.selected_layer = st.session_state.get(picker_key)


rank = {name: i + 1 for i, name in enumerate(ranking)}
layer_name = st.selectbox(
    "Layer (execution order)", names, index=names.index(selected), key=picker_key, on_change=_on_layer,
    format_func=lambda n: f"{n}  (#{rank[n]} most sensitive)" if n in rank else n,
)
layer = result.layer(layer_name)

m1, m2, m3, m4, m5 = st.columns(5)
m1.metric("Kind", layer.kind)
m2.metric("Parameters", f"{layer.params:,}")
m3.metric("Weight shape", "×".join(map(str, layer.weight_shape)))
m4.metric("MACs / sample", f"{layer.macs:,}")
m5.metric("Sensitivity rank", f"#{rank[layer_name]} of {len(names)}" if layer_name in rank else "–")
if layer.aliases:
    st.caption(f"Shares its weight with: {escape(', '.join(layer.aliases))}")
if not layer.quantizable_input:
    st.caption("Its input is integer indices (an embedding): only the weight is quantized.")

hists = result.histograms.get(layer_name)
rows = table[table["layer"] == layer_name]

col1, col2 = st.columns(2)
with col1:
    if hists is None:
        st.info("No histograms were recorded for this layer.")
    else:
        weight_formats = sorted(hists.weight.quantized, key=charts.precision_key)
        if weight_formats:
            wfmt = st.selectbox("Weight format", weight_formats, key="detail_wfmt",
                                help="Lowest precision first; dashed lines are the clipping range.")
        else:
            wfmt = None
        fig = derived.figure("w-hist", info.key, (layer_name, wfmt), lambda: charts.histogram_figure(
            hists.weight, wfmt, f"{layer_name}: weights, FP32 vs {wfmt or 'quantized'}"))
        st.plotly_chart(fig, key="detail_weight_hist")
with col2:
    if hists is not None and hists.activation is not None:
        act_formats = sorted(hists.activation.quantized, key=charts.precision_key)
        afmt = st.selectbox("Activation format", act_formats, key="detail_afmt") if act_formats else None
        fig = derived.figure("a-hist", info.key, (layer_name, afmt), lambda: charts.histogram_figure(
            hists.activation, afmt, f"{layer_name}: input activations, FP32 vs {afmt or 'quantized'}"))
        st.plotly_chart(fig, key="detail_act_hist")
    elif hists is not None:
        st.info("No activation histogram: activations were not analysed, or this layer's input is not quantizable.")

col3, col4 = st.columns(2)
with col3:
    trials = [t for t in result.trials if t.layer == layer_name]
    if trials:
        labels = [f"{t.target} · {t.format}" for t in trials]
        default = next((i for i, t in enumerate(trials) if t.target == "weights"), 0)
        lowest = [i for i, t in enumerate(trials) if t.target == trials[default].target]
        default = min(lowest, key=lambda i: charts.precision_key(trials[i].format, trials[i].target))
        choice = st.selectbox("Error of trial", range(len(trials)), index=default, key=f"detail_trial_{layer_name}",
                              format_func=lambda i: labels[i])
        trial = trials[choice]
        fig = derived.figure("e-hist", info.key, (layer_name, trial.target, trial.format),
                             lambda: charts.error_histogram_figure(trial))
        st.plotly_chart(fig, key="detail_error_hist")
with col4:
    if hists is not None:
        fig = derived.figure("channels", info.key, (layer_name,), lambda: charts.channel_range_figure(
            hists, f"{layer_name}: FP32 weight range per output channel"))
        st.plotly_chart(fig, key="detail_channels")

st.markdown(f"**Every target × format for {escape(layer_name)}**")
columns = [c for c in ["target", "format", "sqnr_db", "output_sqnr_db", "output_kl", "output_top1_agreement",
                       "cosine", "output_cosine", "mse", "output_mse", "max_abs_error", "output_max_abs_error",
                       "status", "error"] if c in rows]
st.dataframe(rows[columns], hide_index=True, key="detail_table", placeholder="–", column_config=tables.fit(rows[columns], {
    "sqnr_db": st.column_config.NumberColumn("local SQNR (dB)", format="%.2f"),
    "output_sqnr_db": st.column_config.NumberColumn("output SQNR (dB)", format="%.2f"),
    "output_kl": st.column_config.NumberColumn("output KL", format="%.3e"),
    "output_top1_agreement": st.column_config.NumberColumn("top-1 agreement", format="percent"),
}))
