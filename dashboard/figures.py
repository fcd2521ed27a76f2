"""Figures the engine's `analysis.charts` does not (yet) have: the Pareto front and the run comparison.

Same conventions as `analysis.charts`: pure builders, its lean template and colours, every SQNR
axis says which view it is (here: model output).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from analysis.charts import COLORS, TEMPLATE, metric_label

COST_LABELS = {
    "avg-bits": "average weight bits (parameter-weighted)",
    "size-kb": "weight storage (KiB)",
    "bops": "bit operations per sample (BOPs)",
}


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def pareto_figure(front: list[dict], uniform: list[dict], kind: str, current: dict | None = None) -> go.Figure:
    """Suggested maps over a range of budgets (the front) and uniform configurations (reference points).

    Each point is a dict with "label", "cost" (in `kind`) and "sqnr" (predicted output SQNR, dB);
    `current` is the map on screen (a star).
    """
    fig = go.Figure()
    points = sorted((p for p in front if _finite(p["sqnr"])), key=lambda p: p["cost"])
    if points:
        fig.add_trace(go.Scatter(
            x=[p["cost"] for p in points], y=[p["sqnr"] for p in points], mode="lines+markers",
            name="suggested (Pareto front)", line=dict(color=COLORS[0], shape="hv"),
            marker=dict(size=9, color=COLORS[0]),
            hovertemplate="suggested map<br>cost: %{x:.4g}<br>predicted output SQNR: %{y:.1f} dB<extra></extra>",
        ))
    base = [p for p in uniform if _finite(p["sqnr"])]
    if base:
        fig.add_trace(go.Scatter(
            x=[p["cost"] for p in base], y=[p["sqnr"] for p in base], mode="markers+text", name="uniform",
            text=[p["label"].removeprefix("uniform ") for p in base],
            # Below right of a point is empty (the front is never below it); the costliest one's label
            # goes left instead of past the plot's edge.
            textposition=["middle left" if p["cost"] >= max(q["cost"] for q in base) else "bottom right" for p in base],
            marker=dict(size=13, symbol="diamond", color=COLORS[1], line=dict(width=1, color="#374151")),
            hovertemplate="%{text} everywhere<br>cost: %{x:.4g}<br>predicted output SQNR: %{y:.1f} dB<extra></extra>",
        ))
    if current is not None and _finite(current.get("sqnr")):
        fig.add_trace(go.Scatter(
            x=[current["cost"]], y=[current["sqnr"]], mode="markers", name=current.get("label", "this map"),
            marker=dict(size=18, symbol="star", color=COLORS[4], line=dict(width=1, color="#374151")),
            hovertemplate="this map<br>cost: %{x:.4g}<br>predicted output SQNR: %{y:.1f} dB<extra></extra>",
        ))
    fig.update_layout(template=TEMPLATE, title="Cost vs predicted output SQNR",
                      height=420, legend=dict(orientation="h", y=-0.22, x=0))
    fig.update_xaxes(title_text=COST_LABELS.get(kind, kind), type="log" if kind == "bops" else "linear")
    fig.update_yaxes(title_text="predicted output SQNR (dB)")
    return fig


def compare_frame(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Trials present in both runs' frames with `metric` of each and the difference (B − A)."""
    keys = ["layer", "target", "format"]
    left = a[keys + ["kind", metric]].rename(columns={metric: "A"})
    right = b[keys + [metric]].rename(columns={metric: "B"})
    merged = left.merge(right, on=keys, how="inner")
    merged["B − A"] = merged["B"].astype(float) - merged["A"].astype(float)
    return merged


def compare_figure(merged: pd.DataFrame, metric: str, label_a: str, label_b: str, top_n: int = 40) -> go.Figure:
    """A and B side by side per layer × format (largest differences first)."""
    label = metric_label(metric)
    frame = merged[merged["B − A"].apply(_finite)]
    frame = frame.reindex(frame["B − A"].abs().sort_values(ascending=False).index).head(top_n)
    rows = [f"{r.layer} · {r.target} {r.format}" for r in frame.itertuples()]
    fig = go.Figure()
    for name, column, color in ((f"A: {label_a}", "A", COLORS[0]), (f"B: {label_b}", "B", COLORS[1])):
        fig.add_trace(go.Bar(
            x=frame[column].astype(float).tolist(), y=rows, orientation="h", name=name, marker_color=color,
            customdata=frame["B − A"].astype(float).tolist(),
            hovertemplate="<b>%{y}</b><br>" + label + ": %{x:.2f}<br>B − A: %{customdata:+.2f}<extra>" + column + "</extra>",
        ))
    fig.update_layout(template=TEMPLATE, barmode="group", height=max(320, 30 * len(rows) + 160),
                      title=f"{label}: run A vs run B (largest differences first)",
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0))
    fig.update_yaxes(type="category", autorange="reversed", title_text="layer · target format")
    fig.update_xaxes(title_text=label)
    return fig


def clickable_heatmap(fig: go.Figure) -> go.Figure:
    """Make the cells of `analysis.charts.heatmap` clickable in Streamlit.

    Plotly cannot select heat-map cells (only scatter-like traces are selectable), so an invisible
    marker sits on every cell centre and takes over the hover (same text); with an unlimited hover
    distance a click anywhere in a cell selects its marker, whose y is the layer.
    """
    heat = next((t for t in fig.data if t.type == "heatmap"), None)
    if heat is None or heat.y is None or heat.x is None:
        return fig
    text = heat.text if heat.text is not None else [[""] * len(heat.x) for _ in heat.y]
    xs, ys, labels = [], [], []
    for i, layer in enumerate(heat.y):
        for j, fmt in enumerate(heat.x):
            xs.append(fmt)
            ys.append(layer)
            labels.append(text[i][j] if i < len(text) and j < len(text[i]) else "")
    template = (heat.hovertemplate or "<b>%{y}</b><br>%{x}: %{text}<extra></extra>").replace("%{text}", "%{customdata}")
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", customdata=labels, hovertemplate=template,
                             marker=dict(size=6, opacity=0), showlegend=False, name="cells"))
    heat.update(hoverinfo="skip", hovertemplate=None)
    fig.update_layout(hoverdistance=-1, clickmode="event+select")
    return fig
