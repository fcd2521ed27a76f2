"""Plotly figure builders for an analysis: the HTML report and the dashboard draw the same charts.

Every builder is pure: an `AnalysisResult` (or pre-binned histograms) in, a `plotly.graph_objects.Figure`
out, no I/O and no Streamlit. Every SQNR axis names its view — local, output or cumulative (see
`analysis.results`) — because mixing them up is the most common misreading. Failed trials and
non-finite values are left out of bar, scatter and line charts and shown as gaps in the heat map.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.formats import FormatError, parse_format
from analysis.results import TARGETS, AnalysisResult

# A fixed colour range so the same colour means the same SQNR on every model (~6 dB per bit).
SQNR_RANGE_DB = (0.0, 60.0)
MODEL_OUTPUT = "model output"  # x category of the model's output in the cumulative chart

# Frame columns (`AnalysisResult.to_frame`) and their axis labels; local metrics carry no prefix.
METRIC_LABELS: dict[str, str] = {
    "sqnr_db": "local SQNR (dB)",
    "output_sqnr_db": "output SQNR (dB)",
    "mse": "local MSE",
    "output_mse": "output MSE",
    "cosine": "local cosine similarity",
    "output_cosine": "output cosine similarity",
    "max_abs_error": "local max |error|",
    "output_max_abs_error": "output max |error|",
    "output_kl": "output KL divergence (nats)",
    "output_top1_agreement": "output top-1 agreement",
}
_ALIASES = {"local_sqnr_db": "sqnr_db", "local_mse": "mse", "local_cosine": "cosine",
            "local_max_abs_error": "max_abs_error"}
_HIGHER_IS_BETTER = {"sqnr_db", "output_sqnr_db", "cosine", "output_cosine", "output_top1_agreement"}
_GRANULARITY_RANK = {"per-tensor": 0, "per-channel": 1, "per-group": 2}
_ROLES = {"weights": ("weight",), "activations": ("activation",), "both": ("weight", "activation")}

# plotly's default qualitative colours, then ten more (D3's) so up to 20 series stay distinct.
COLORS = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880",
          "#FF97FF", "#FECB52", "#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B",
          "#E377C2", "#7F7F7F", "#BCBD22", "#17BECF")
_TARGET_SYMBOLS = {"weights": "circle", "activations": "square", "both": "diamond"}
_TARGET_DASHES = {"weights": "solid", "activations": "dash", "both": "dashdot"}
FP32_COLOR, QUANT_COLOR, CLIP_COLOR = "#636EFA", "#EF553B", "#B22222"

# A lean template: plotly's built-in ones add ~7 KB of per-trace defaults to every figure's JSON.
TEMPLATE = go.layout.Template(layout=go.Layout(
    font=dict(family="system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif",
              size=12, color="#2a3f5f"),
    paper_bgcolor="white", plot_bgcolor="white", colorway=list(COLORS), hovermode="closest",
    xaxis=dict(gridcolor="#EBF0F8", linecolor="#C8D4E3", zerolinecolor="#C8D4E3", automargin=True),
    yaxis=dict(gridcolor="#EBF0F8", linecolor="#C8D4E3", zerolinecolor="#C8D4E3", automargin=True),
    margin=dict(l=60, r=30, t=60, b=50),
    legend=dict(bgcolor="rgba(255,255,255,0.6)"),
))


# --- helpers shared with the report and the dashboard ------------------------------------------


def metric_column(metric: str) -> str:
    """The frame column for a metric name ("local_sqnr_db" is accepted for the local "sqnr_db")."""
    column = _ALIASES.get(metric, metric)
    if column not in METRIC_LABELS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRIC_LABELS)}")
    return column


def metric_label(metric: str) -> str:
    """Axis label naming the view, e.g. "output SQNR (dB)"."""
    return METRIC_LABELS[metric_column(metric)]


def precision_key(fmt: str, target: str | None = None) -> tuple:
    """Sort key, lowest precision first: bits, then granularity (per-tensor < per-channel < per-group).

    `fmt` is a trial's format label ("int4", "int4-g32", "int4/int8" for target "both").
    """
    parts = fmt.split("/") if "/" in fmt else [fmt]
    roles = _ROLES.get(target or "", ("weight", "activation"))
    key = []
    for i, part in enumerate(parts):
        role = roles[min(i, len(roles) - 1)]
        parsed = None
        for candidate in (role, "weight", "activation"):
            try:
                parsed = parse_format(part, candidate)
                break
            except FormatError:
                continue
        if parsed is None:  # unknown label: after everything known, by name
            key.append((math.inf, 0, 0, part))
        else:
            key.append((parsed.bits, _GRANULARITY_RANK.get(parsed.granularity, 0), -(parsed.group_size or 0), part))
    return tuple(key)


def target_formats(result: AnalysisResult, target: str) -> list[str]:
    """Format labels tried for `target`, highest precision first."""
    labels = {t.format for t in result.trials if t.target == target}
    return sorted(labels, key=lambda f: precision_key(f, target), reverse=True)


def lowest_precision_format(result: AnalysisResult, target: str) -> str | None:
    """The lowest-precision format tried for `target` (None when the target was not swept)."""
    formats = target_formats(result, target)
    return formats[-1] if formats else None


def swept_targets(result: AnalysisResult) -> list[str]:
    """Targets with at least one trial, in the canonical order."""
    present = {t.target for t in result.trials}
    return [t for t in TARGETS if t in present]


def has_values(result: AnalysisResult, metric: str) -> bool:
    """Whether any trial has a finite value of `metric` (output metrics are off with --local-only)."""
    frame = result.to_frame()
    column = metric_column(metric)
    return not frame.empty and column in frame and bool(np.isfinite(frame[column].astype(float)).any())


def sensitivity_ranking(result: AnalysisResult, target: str = "weights", fmt: str | None = None,
                        metric: str = "output_sqnr_db") -> pd.DataFrame:
    """Successful trials of one target × format with a finite metric, most sensitive layer first."""
    column = metric_column(metric)
    fmt = fmt or lowest_precision_format(result, target)
    frame = result.to_frame()
    if frame.empty or fmt is None:
        return frame
    frame = frame[(frame["target"] == target) & (frame["format"] == fmt) & (frame["status"] == "ok")]
    frame = frame[np.isfinite(frame[column].astype(float))]
    ascending = column in _HIGHER_IS_BETTER
    return frame.sort_values(column, ascending=ascending, kind="stable").reset_index(drop=True)


def layer_ranking(result: AnalysisResult, metric: str = "output_sqnr_db") -> list[str]:
    """Layer names, most sensitive first: each layer's worst `metric` over its successful trials."""
    column = metric_column(metric)
    frame = result.to_frame()
    if frame.empty:
        return []
    frame = frame[(frame["status"] == "ok") & np.isfinite(frame[column].astype(float))]
    higher_better = column in _HIGHER_IS_BETTER
    worst = frame.groupby("layer", sort=False)[column].agg("min" if higher_better else "max")
    return list(worst.sort_values(ascending=higher_better, kind="stable").index)


def kind_colors(result: AnalysisResult) -> dict[str, str]:
    """One colour per layer kind, stable across every chart of the same analysis."""
    kinds = dict.fromkeys(layer.kind for layer in result.layers)
    return {kind: COLORS[i % len(COLORS)] for i, kind in enumerate(kinds)}


def config_colors(result: AnalysisResult) -> dict[tuple[str, str], str]:
    """One colour per (target, format) configuration, shared by the scatter and the cumulative chart."""
    configs = [(t, f) for t in swept_targets(result) for f in target_formats(result, t)]
    configs += [(c.target, c.format) for c in result.cumulative if (c.target, c.format) not in configs]
    return {config: COLORS[i % len(COLORS)] for i, config in enumerate(configs)}


def _empty(title: str, message: str, height: int = 260) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font=dict(size=14, color="#6b7280"))
    fig.update_layout(template=TEMPLATE, title=title, height=height,
                      xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


def _finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(float(value))


def _or_none(values: Iterable[Any]) -> list[float | None]:
    return [float(v) if _finite(v) else None for v in values]


def _log_dtick(counts: Iterable[float]) -> Any:
    """Log-axis ticks: 1-2-5 labels over a short range, decades over a long one (no clutter)."""
    peak = max((float(c) for c in counts), default=0.0)
    return "D2" if peak < 100 else 1


def _fmt(value: Any, spec: str = ".1f") -> str:
    return format(float(value), spec) if _finite(value) else "–"


# --- per-layer sensitivity ---------------------------------------------------------------------


def sensitivity_bar(result: AnalysisResult, target: str = "weights", fmt: str | None = None,
                    metric: str = "output_sqnr_db", top_n: int | None = None) -> go.Figure:
    """Per-layer bars of `metric` for one target × format, most sensitive first, coloured by layer kind.

    `fmt=None` picks the lowest-precision format of the target; `top_n` keeps only the most
    sensitive layers (models with hundreds of layers).
    """
    column = metric_column(metric)
    label = metric_label(column)
    fmt = fmt or lowest_precision_format(result, target)
    title = f"Sensitivity: {target} in {fmt} (lower {label} = more sensitive)" if column in _HIGHER_IS_BETTER \
        else f"Sensitivity: {target} in {fmt} ({label}, higher = more sensitive)"
    frame = sensitivity_ranking(result, target, fmt, column)
    if fmt is None or frame.empty:
        return _empty(title, f"no successful {target} trials with a {label}")
    if top_n is not None and len(frame) > top_n:
        title += f" — {top_n} of {len(frame)} layers"
        frame = frame.head(top_n)
    order = [str(name) for name in frame["layer"]]
    fig = go.Figure()
    colors = kind_colors(result)
    for kind in dict.fromkeys(frame["kind"]):
        group = frame[frame["kind"] == kind]
        custom = np.array([
            [str(row.layer), str(row.kind), f"{int(row.params):,}", _fmt(row.sqnr_db), _fmt(row.output_sqnr_db)]
            for row in group.itertuples()
        ], dtype=object)
        fig.add_trace(go.Bar(
            x=_or_none(group[column]), y=[str(name) for name in group["layer"]], orientation="h", name=str(kind),
            marker_color=colors.get(kind, COLORS[0]), customdata=custom,
            hovertemplate=("<b>%{customdata[0]}</b><br>kind: %{customdata[1]}<br>params: %{customdata[2]}"
                           f"<br>{target} {fmt}"
                           "<br>local SQNR: %{customdata[3]} dB<br>output SQNR: %{customdata[4]} dB<extra></extra>"),
        ))
    fig.update_layout(
        template=TEMPLATE, title=title, barmode="overlay", legend_title_text="layer kind",
        height=max(300, 24 * len(order) + 140),
    )
    fig.update_yaxes(title_text="layer", type="category", categoryorder="array", categoryarray=order,
                     autorange="reversed")
    fig.update_xaxes(title_text=label)
    return fig


def heatmap(result: AnalysisResult, target: str = "weights", metric: str = "output_sqnr_db") -> go.Figure:
    """Layer × format heat map of `metric`: layers in execution order, formats highest precision first.

    SQNR metrics use a fixed 0–60 dB colour range (red = low) so colours compare across models;
    failed trials are gaps labelled "failed".
    """
    column = metric_column(metric)
    label = metric_label(column)
    title = f"{label} per layer and format ({target})"
    frame = result.to_frame()
    if frame.empty or not (frame["target"] == target).any():
        return _empty(title, f"no {target} trials")
    frame = frame[frame["target"] == target]
    formats = target_formats(result, target)
    layers = list(dict.fromkeys(str(name) for name in frame["layer"]))  # to_frame is in execution order
    cells = {(str(row.layer), str(row.format)): row for row in frame.itertuples()}
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    for layer in layers:
        z_row, text_row = [], []
        for fmt in formats:
            row = cells.get((layer, fmt))
            value = getattr(row, column) if row is not None else None
            if row is not None and row.status == "ok" and _finite(value):
                z_row.append(float(value))
                text_row.append(format(float(value), ".1f") if "sqnr" in column else format(float(value), ".3g"))
            else:
                z_row.append(None)
                text_row.append("failed" if row is not None and row.status != "ok" else "")
        z.append(z_row)
        text.append(text_row)
    if "sqnr" in column:
        zmin, zmax = SQNR_RANGE_DB
    elif column in ("output_top1_agreement", "cosine", "output_cosine"):
        zmin, zmax = 0.0, 1.0
    else:
        zmin = zmax = None
    colorscale = "RdYlGn" if column in _HIGHER_IS_BETTER else "RdYlGn_r"
    fig = go.Figure(go.Heatmap(
        z=z, x=formats, y=layers, text=text, texttemplate="%{text}", colorscale=colorscale,
        zmin=zmin, zmax=zmax, hoverongaps=False, xgap=1, ygap=1,
        colorbar=dict(title=dict(text=label, side="right")),
        hovertemplate="<b>%{y}</b><br>format: %{x}<br>" + label + ": %{text}<extra></extra>",
    ))
    fig.update_layout(template=TEMPLATE, title=dict(text=title, y=0.98, yanchor="top"),
                      height=max(300, 26 * len(layers) + 170), margin=dict(t=100))
    fig.update_xaxes(type="category", side="top")
    fig.update_yaxes(title_text="layer (execution order)", type="category", autorange="reversed")
    return fig


def local_vs_output_scatter(result: AnalysisResult, target: str | None = "weights") -> go.Figure:
    """Local vs output SQNR, one point per layer × format (target=None: all targets).

    Points below the diagonal are layers whose error grows on the way to the output.
    """
    title = "Local vs output SQNR" + (f" ({target})" if target else "")
    frame = result.to_frame()
    if not frame.empty:
        frame = frame[frame["status"] == "ok"]
        if target is not None:
            frame = frame[frame["target"] == target]
        frame = frame[np.isfinite(frame["sqnr_db"].astype(float)) & np.isfinite(frame["output_sqnr_db"].astype(float))]
    if frame.empty:
        return _empty(title, "no trials with both local and output SQNR")
    fig = go.Figure()
    colors = config_colors(result)
    targets = [t for t in TARGETS if t in set(frame["target"])]
    for tgt in targets:
        for fmt in target_formats(result, tgt):
            group = frame[(frame["target"] == tgt) & (frame["format"] == fmt)]
            if group.empty:
                continue
            name = fmt if target is not None else f"{tgt} {fmt}"
            fig.add_trace(go.Scatter(
                x=group["sqnr_db"].astype(float).tolist(), y=group["output_sqnr_db"].astype(float).tolist(),
                mode="markers", name=name, text=[str(n) for n in group["layer"]],
                marker=dict(size=9, color=colors.get((tgt, fmt), COLORS[0]), symbol=_TARGET_SYMBOLS.get(tgt, "circle"),
                            opacity=0.85, line=dict(width=0.5, color="white")),
                hovertemplate=(f"<b>%{{text}}</b><br>{tgt} {fmt}<br>local SQNR: %{{x:.1f}} dB"
                               "<br>output SQNR: %{y:.1f} dB<extra></extra>"),
            ))
    values = np.concatenate([frame["sqnr_db"].astype(float), frame["output_sqnr_db"].astype(float)])
    lo, hi = float(values.min()), float(values.max())
    pad = max(1.0, 0.05 * (hi - lo))
    fig.add_trace(go.Scatter(x=[lo - pad, hi + pad], y=[lo - pad, hi + pad], mode="lines", name="output = local",
                             line=dict(color="#9ca3af", dash="dot", width=1), hoverinfo="skip"))
    fig.update_layout(template=TEMPLATE, title=title, height=480, legend_title_text="format")
    fig.update_xaxes(title_text="local SQNR (dB)")
    fig.update_yaxes(title_text="output SQNR (dB)")
    return fig


def cumulative_chart(result: AnalysisResult, target: str | None = None) -> go.Figure:
    """Cumulative SQNR along the depth, one line per uniform configuration, plus the model output point.

    x is the layer in execution order; every analysed layer is quantized at once.
    """
    title = "Cumulative SQNR along the depth (all layers quantized)"
    runs = [c for c in result.cumulative if c.error is None and (target is None or c.target == target)]
    if not runs:
        return _empty(title, "no cumulative analysis (run with cumulative enabled)")
    order = {layer.name: i for i, layer in enumerate(result.layers)}
    names = sorted({name for c in runs for name in c.per_layer}, key=lambda n: order.get(n, len(order)))
    categories = [str(n) for n in names] + [MODEL_OUTPUT]
    fig = go.Figure()
    colors = config_colors(result)
    for i, cum in enumerate(runs):
        color = colors.get((cum.target, cum.format), COLORS[i % len(COLORS)])
        label = f"{cum.target} {cum.format}"
        points = [(str(n), s.sqnr_db) for n, s in cum.per_layer.items() if _finite(s.sqnr_db)]
        fig.add_trace(go.Scatter(
            x=[p[0] for p in points], y=[float(p[1]) for p in points], mode="lines+markers", name=label,
            legendgroup=label, line=dict(color=color, dash=_TARGET_DASHES.get(cum.target, "solid")),
            marker=dict(size=6, color=color),
            hovertemplate=f"<b>%{{x}}</b><br>{label}<br>cumulative SQNR: %{{y:.1f}} dB<extra></extra>",
        ))
        if _finite(cum.output.sqnr_db):
            extra = ""
            if _finite(cum.output.top1_agreement):
                extra = f"<br>top-1 agreement: {100 * cum.output.top1_agreement:.1f}%"
            fig.add_trace(go.Scatter(
                x=[MODEL_OUTPUT], y=[float(cum.output.sqnr_db)], mode="markers", name=f"{label} (model output)",
                legendgroup=label, showlegend=False, marker=dict(size=13, symbol="star", color=color,
                                                                 line=dict(width=1, color="#374151")),
                hovertemplate=f"<b>model output</b><br>{label}<br>cumulative SQNR: %{{y:.1f}} dB{extra}<extra></extra>",
            ))
    legend: dict[str, Any] = dict(title_text="configuration")
    if len(runs) > 6:  # many configurations: a legend below the plot instead of a scrolling column
        legend.update(orientation="h", y=-0.25, yanchor="top", x=0, xanchor="left")
    fig.update_layout(template=TEMPLATE, title=title, height=460 if len(runs) <= 6 else 560, legend=legend)
    fig.update_xaxes(title_text="layer (execution order)", type="category", categoryorder="array",
                     categoryarray=categories)
    fig.update_yaxes(title_text="cumulative SQNR (dB)")
    return fig


# --- distributions -----------------------------------------------------------------------------


# The distribution figures live in their own module; re-exported here so `charts.<figure>` keeps working.
from analysis.histogram_charts import (  # noqa: E402,F401  (after the helpers they import)
    channel_range_figure, error_histogram_figure, histogram_figure,
)
