"""Distribution figures: FP32 vs quantized histograms with clipping ranges, local error histograms,
per-channel weight ranges. Pure plotly, no I/O (see `analysis.charts` for the sensitivity views)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from analysis.charts import (
    CLIP_COLOR, FP32_COLOR, QUANT_COLOR, TEMPLATE, _empty, _finite, _log_dtick, precision_key,
)
from analysis.results import LayerHistograms, TensorHistograms, TrialResult


def histogram_figure(hists: TensorHistograms, fmt: str | None, title: str) -> go.Figure:
    """FP32 vs quantized value counts (already binned) on a log axis, with the format's clipping range.

    `fmt=None` picks the lowest-precision format in `hists`; with no quantized formats, FP32 only.
    """
    edges = np.asarray(hists.fp32.edges, dtype=float)
    centers = (edges[:-1] + edges[1:]) / 2
    widths = np.diff(edges)
    if fmt is None and hists.quantized:
        fmt = sorted(hists.quantized, key=precision_key)[0]
    if fmt is not None and fmt not in hists.quantized:
        raise KeyError(f"no histogram for format {fmt!r}; formats are {', '.join(hists.quantized) or 'none'}")
    fig = go.Figure()
    fig.add_trace(go.Bar(x=centers.tolist(), y=[float(c) for c in hists.fp32.counts], width=widths.tolist(),
                         name="FP32", marker_color=FP32_COLOR, opacity=0.55,
                         hovertemplate="value ≈ %{x:.4g}<br>FP32 count: %{y:,.0f}<extra></extra>"))
    if fmt is not None:
        fig.add_trace(go.Bar(x=centers.tolist(), y=[float(c) for c in hists.quantized[fmt]], width=widths.tolist(),
                             name=fmt, marker_color=QUANT_COLOR, opacity=0.55,
                             hovertemplate=f"value ≈ %{{x:.4g}}<br>{fmt} count: %{{y:,.0f}}<extra></extra>"))
    # Vertical lines at the clipping range; built as plain shapes (what `add_vline` makes, minus its
    # per-call cost, which dominates a report with dozens of histograms).
    shapes, annotations = [], []
    clip = hists.clip.get(fmt) if fmt is not None else None
    for value, anchor in zip(clip or (), ("right", "left")):
        if _finite(value):
            shapes.append(dict(type="line", xref="x", yref="paper", x0=float(value), x1=float(value), y0=0, y1=1,
                               line=dict(color=CLIP_COLOR, dash="dash", width=1.5)))
            annotations.append(dict(x=float(value), xref="x", y=1, yref="paper", yanchor="top", xanchor=anchor,
                                    text=f"{fmt} clip {float(value):.3g}", showarrow=False,
                                    font=dict(size=10, color=CLIP_COLOR)))
    fig.update_layout(template=TEMPLATE, title=title, barmode="overlay", bargap=0, height=320,
                      shapes=shapes, annotations=annotations,
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"))
    fig.update_xaxes(title_text="value")
    peak = [*hists.fp32.counts, *(hists.quantized[fmt] if fmt is not None else ())]
    fig.update_yaxes(title_text="count (log)", type="log", dtick=_log_dtick(peak))
    return fig


def error_histogram_figure(trial: TrialResult) -> go.Figure:
    """Distribution of the local error (quantized − FP32) at the layer's output, on a log axis."""
    title = f"{trial.layer}: local error, {trial.target} in {trial.format}"
    hist = trial.error_histogram
    if hist is None:
        reason = f"trial failed: {trial.error}" if trial.error else "no error histogram recorded"
        return _empty(title, reason)
    edges = np.asarray(hist.edges, dtype=float)
    fig = go.Figure(go.Bar(
        x=((edges[:-1] + edges[1:]) / 2).tolist(), y=[float(c) for c in hist.counts], width=np.diff(edges).tolist(),
        marker_color=QUANT_COLOR, opacity=0.75, name="error",
        hovertemplate="error ≈ %{x:.3g}<br>count: %{y:,.0f}<extra></extra>",
    ))
    fig.update_layout(template=TEMPLATE, title=title, bargap=0, height=320, showlegend=False)
    fig.update_xaxes(title_text="local error (quantized − FP32)")
    fig.update_yaxes(title_text="count (log)", type="log", dtick=_log_dtick(hist.counts))
    return fig


def channel_range_figure(layer_hists: LayerHistograms, title: str) -> go.Figure:
    """FP32 weight range [min, max] of each output channel as floating bars.

    Channels far wider than the rest dominate a per-tensor scale; per-channel scales absorb them.
    """
    lo = np.asarray(layer_hists.channel_min, dtype=float)
    hi = np.asarray(layer_hists.channel_max, dtype=float)
    if lo.size == 0 or lo.size != hi.size:
        return _empty(title, "no per-channel ranges recorded")
    channels = np.arange(lo.size)
    fig = go.Figure(go.Bar(
        x=channels.tolist(), y=(hi - lo).tolist(), base=lo.tolist(), name="FP32 weight range",
        marker_color=FP32_COLOR, opacity=0.8, customdata=np.stack([lo, hi], axis=1).tolist(),
        hovertemplate="channel %{x}<br>min: %{customdata[0]:.4g}<br>max: %{customdata[1]:.4g}<extra></extra>",
    ))
    fig.add_hline(y=0, line=dict(color="#9ca3af", width=1))
    fig.update_layout(template=TEMPLATE, title=title, bargap=0.1 if lo.size < 64 else 0, height=320,
                      showlegend=False)
    fig.update_xaxes(title_text="output channel")
    fig.update_yaxes(title_text="FP32 weight value")
    return fig
