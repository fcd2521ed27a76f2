"""A self-contained HTML report of an analysis: one file that opens offline and can be mailed around.

plotly.js is embedded once (with the first figure); everything else is inline HTML and CSS, and
every string that comes from the model or the user (layer names, reasons, specs) is HTML-escaped.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import plotly.graph_objects as go

from analysis import charts, costs, runstore
from analysis.results import AnalysisResult

DEFAULT_TOP_LAYERS = 12  # layers that get histogram sections (each adds ~4 small figures)
DEFAULT_TABLE_ROWS = 15  # rows of each "most sensitive layers" table
DEFAULT_BAR_LAYERS = 40  # bars in each sensitivity chart

_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png"}}

_CSS = """
:root { --fg:#1f2937; --muted:#6b7280; --line:#e5e7eb; --accent:#2563eb; --bg:#f9fafb; }
* { box-sizing: border-box; }
body { margin:0; font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color:var(--fg); background:var(--bg); line-height:1.45; }
header { background:#111827; color:#f9fafb; padding:20px 32px; }
header h1 { margin:0 0 4px 0; font-size:1.6rem; }
header .sub { color:#d1d5db; font-size:0.95rem; }
nav { background:white; border-bottom:1px solid var(--line); padding:8px 32px; font-size:0.9rem;
      position:sticky; top:0; z-index:10; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; }
main { padding:8px 32px 40px 32px; max-width:1400px; }
section { background:white; border:1px solid var(--line); border-radius:8px; padding:16px 20px; margin:16px 0; }
h2 { margin:0 0 8px 0; font-size:1.25rem; }
h3 { margin:16px 0 6px 0; font-size:1.05rem; }
h4 { margin:10px 0 4px 0; font-size:0.95rem; }
table { border-collapse:collapse; font-size:0.85rem; margin:8px 0; }
th, td { border-bottom:1px solid var(--line); padding:4px 10px; text-align:left; vertical-align:top; }
th { background:#f3f4f6; font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:0.85em; }
.grid { display:grid; grid-template-columns: repeat(auto-fit, minmax(540px, 1fr)); gap:8px 16px; }
.kv { display:grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap:0 24px; }
.muted { color:var(--muted); }
.bad { color:#b91c1c; font-weight:600; }
.note { background:#eff6ff; border-left:4px solid var(--accent); padding:8px 12px; margin:8px 0; }
.layer { border-top:1px solid var(--line); padding-top:8px; margin-top:12px; }
footer { color:var(--muted); font-size:0.8rem; padding:0 32px 24px 32px; }
"""

_HOW_TO_READ = """
<ul>
<li><b>SQNR</b> (signal-to-quantization-noise ratio, dB) = 10·log10(Σ reference² / Σ error²) over all
samples. <b>Higher is better.</b> Each bit of precision is worth about <b>6 dB</b>: int8 typically gives
40–50 dB, int4 about 20–25 dB; below ~20 dB at the model output, predictions start to change.</li>
<li><b>local SQNR</b>: only this layer is quantized, it receives FP32 inputs, and the error is measured at
the layer's own output. It tells how well the format fits the layer's values.</li>
<li><b>output SQNR</b>: only this layer is quantized, the error is measured at the <i>model's</i> output.
It tells what the layer costs the model — the number to rank layers by. A layer with poor local but good
output SQNR is one the rest of the network forgives, and vice versa.</li>
<li><b>cumulative SQNR</b>: <i>every</i> layer is quantized at once with one configuration, and the error
is measured at each layer's output along the depth: how error builds up through the network.</li>
<li><b>output KL</b> and <b>top-1 agreement</b> compare the model's predicted distributions (FP32 vs
quantized) for classification and language models.</li>
<li>Targets: <b>weights</b> (weight-only quantization), <b>activations</b> (the layer's input), <b>both</b>
(formats written weight/activation, e.g. <code>int4/int8</code>).</li>
</ul>
"""


def write_report(result: AnalysisResult, path: str | Path, title: str | None = None, *,
                 top_layers: int = DEFAULT_TOP_LAYERS) -> Path:
    """Write a single self-contained HTML report of `result` to `path` and return the path.

    `top_layers` bounds how many of the most sensitive layers get histogram sections (file size).
    """
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        path = path / "report.html" if path.is_dir() else path
    path.parent.mkdir(parents=True, exist_ok=True)
    page = render_report(result, title, top_layers=top_layers)
    # Atomic: a full disk leaves the previous report (or none), never a truncated one that looks whole.
    runstore.write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def render_report(result: AnalysisResult, title: str | None = None, *,
                  top_layers: int = DEFAULT_TOP_LAYERS) -> str:
    """The report as an HTML string (see `write_report`)."""
    embed = _Embedder()
    title = title or f"quantlens report: {_model_name(result)}"
    metric = "output_sqnr_db" if charts.has_values(result, "output_sqnr_db") else "sqnr_db"
    sections = [
        ("overview", "Overview", _overview(result)),
        ("how-to-read", "How to read this", _HOW_TO_READ),
        ("sensitivity", "Sensitivity ranking", _sensitivity(result, metric, embed)),
        ("heatmap", "Layer × format", _heatmaps(result, metric, embed)),
        ("scatter", "Local vs output", _scatter(result, embed)),
        ("cumulative", "Cumulative error", _cumulative(result, embed)),
        ("layers", "Layer details", _layer_details(result, metric, top_layers, embed)),
        ("skipped", "Skipped layers", _skipped(result)),
        ("failed", "Failed trials", _failed(result)),
    ]
    nav = " ".join(f'<a href="#{anchor}">{html.escape(name)}</a>' for anchor, name, _ in sections)
    body = "\n".join(
        f'<section id="{anchor}"><h2>{html.escape(name)}</h2>\n{content}\n</section>' for anchor, name, content in sections
    )
    version = html.escape(str(result.versions.get("quantlens", "")))
    generated = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    subtitle = " · ".join(html.escape(part) for part in _subtitle(result))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>{html.escape(title)}</h1><div class="sub">{subtitle}</div></header>
<nav>{nav}</nav>
<main>
{body}
</main>
<footer>Generated by quantlens {version} on {generated}. Self-contained: opens offline.</footer>
</body>
</html>
"""


# --- plumbing ----------------------------------------------------------------------------------


class _Embedder:
    """Turns figures into HTML fragments; the first one carries plotly.js, the rest reuse it."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, fig: go.Figure) -> str:
        include = self.count == 0
        self.count += 1
        return fig.to_html(full_html=False, include_plotlyjs=include, config=_PLOTLY_CONFIG,
                           default_width="100%", default_height=f"{fig.layout.height or 450}px")


def _e(value: Any) -> str:
    """Escaped display text of a value."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else html.escape(f"{value:.4g}")
    if isinstance(value, (list, tuple)):
        return html.escape(", ".join(str(v) for v in value)) if value else "none"
    if isinstance(value, dict):
        return html.escape(", ".join(f"{k}={v}" for k, v in value.items())) if value else "none"
    return html.escape(str(value))


def _num(value: Any, spec: str) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "–"
    return html.escape(format(number, spec)) if math.isfinite(number) else "–"


def _table(headers: list[str] | None, rows: Iterable[list[str]], numeric: Iterable[int] = ()) -> str:
    """`rows` hold already-escaped cell HTML; headers are escaped here (None: no header row)."""
    numeric = set(numeric)
    if headers is None:
        return "<table><tbody>" + "\n".join(
            "<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</tbody></table>"
    head = "".join(f'<th class="num">{html.escape(h)}</th>' if i in numeric else f"<th>{html.escape(h)}</th>"
                   for i, h in enumerate(headers))
    body = "\n".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(title: str, pairs: list[tuple[str, Any]]) -> str:
    rows = [[f"<b>{html.escape(k)}</b>", _e(v)] for k, v in pairs]
    return f"<div><h3>{html.escape(title)}</h3>{_table(None, rows)}</div>"


def _model_name(result: AnalysisResult) -> str:
    for key in ("name", "spec"):
        if result.model.get(key):
            return str(result.model[key])
    return "model"


def _subtitle(result: AnalysisResult) -> list[str]:
    parts = [f"{len(result.layers)} layers analysed"]
    if result.data.get("samples") is not None:
        parts.append(f"{result.data['samples']} samples")
    if result.data.get("task"):
        parts.append(str(result.data["task"]))
    if result.data.get("spec"):
        parts.append(f"data: {result.data['spec']}")
    return parts


# --- sections ----------------------------------------------------------------------------------


def _overview(result: AnalysisResult) -> str:
    cfg = {**result.config, **result.config.get("quant", {})}
    model_pairs: list[tuple[str, Any]] = [("name / spec", result.model.get("spec") or result.model.get("name"))]
    model_pairs += [("source", result.model.get("source")),
                    ("folded batchnorms", result.model.get("folded_batchnorms"))]
    model_pairs += [(k.replace("_", " "), v) for k, v in result.model.items()
                    if k not in ("spec", "name", "source", "folded_batchnorms")]
    model_pairs += [("layers analysed", len(result.layers)), ("layers skipped", len(result.skipped)),
                    ("parameters analysed", f"{sum(l.params for l in result.layers):,}")]
    data_pairs = [(k.replace("_", " "), v) for k, v in result.data.items()]
    config_pairs = [
        ("weight formats (effective bits)", [costs.bits_label(n, "weight") for n in cfg.get("weight_formats") or ()]),
        ("activation formats (effective bits)", [costs.bits_label(n, "activation") for n in cfg.get("act_formats") or ()]),
        ("targets", cfg.get("targets")),
        ("weight granularity", cfg.get("granularity") or "per-channel (default)"),
        ("weight calibration", cfg.get("weight_calibration")),
        ("activation calibration", "dynamic (per token / per sample)" if cfg.get("dynamic_activations")
         else cfg.get("act_calibration")),
        ("percentile", cfg.get("percentile")),
        ("fold batchnorm", cfg.get("fold_batchnorm")),
        ("samples requested", cfg.get("num_samples")),
        ("output metrics", cfg.get("output_metrics")),
        ("cumulative", cfg.get("cumulative")),
    ]
    shown = {"weight_formats", "act_formats", "targets", "granularity", "weight_calibration", "act_calibration",
             "dynamic_activations", "percentile", "fold_batchnorm", "num_samples", "output_metrics", "cumulative"}
    config_pairs += [(k.replace("_", " "), v) for k, v in cfg.items() if k not in shown]
    version_pairs = list(result.versions.items()) + [("analysis time", f"{result.seconds:.1f} s")]

    ok = sum(t.ok for t in result.trials)
    failed = len(result.trials) - ok
    summary = [f"<li>{len(result.trials)} trials: {ok} succeeded"
               + (f', <span class="bad">{failed} failed</span> (see <a href="#failed">Failed trials</a>)' if failed else "")
               + "</li>"]
    for cum in result.cumulative:
        if cum.error is not None:
            summary.append(f"<li>all layers {_e(cum.target)} {_e(cum.format)}: "
                           f'<span class="bad">failed</span> ({_e(cum.error)})</li>')
            continue
        extra = ""
        if cum.output.top1_agreement is not None:
            extra = f", top-1 agreement {_num(100 * cum.output.top1_agreement, '.1f')}%"
        summary.append(f"<li>all layers {_e(cum.target)} in <b>{_e(cum.format)}</b>: model output SQNR "
                       f"<b>{_num(cum.output.sqnr_db, '.1f')} dB</b>{extra}</li>")
    return (f"<ul>{''.join(summary)}</ul>"
            f'<div class="kv">{_kv("Model", model_pairs)}{_kv("Data", data_pairs)}'
            f'{_kv("Configuration", config_pairs)}{_kv("Versions", version_pairs)}</div>')


def _sensitivity(result: AnalysisResult, metric: str, embed: _Embedder) -> str:
    targets = charts.swept_targets(result)
    if not targets:
        return '<p class="muted">No trials were run.</p>'
    parts = [f'<p>Each layer is quantized on its own; layers are ranked by <b>{html.escape(charts.metric_label(metric))}</b> '
             "in the lowest-precision format of each target (lower = more sensitive). Hover a bar for details.</p>"]
    if metric != "output_sqnr_db":
        parts.append('<p class="note">Output metrics were not computed for this analysis; the ranking uses local SQNR.</p>')
    elif any(t.output_source == "estimated" for t in result.trials):
        parts.append('<p class="note">Output figures marked (est.) are first-order estimates from one backward pass per '
                     "projection, not measurements; unmarked ones were measured.</p>")
    for target in targets:
        fmt = charts.lowest_precision_format(result, target)
        ranking = charts.sensitivity_ranking(result, target, fmt, metric)
        parts.append(f"<h3>{html.escape(target)} in {html.escape(str(fmt))}</h3>")
        parts.append(embed(charts.sensitivity_bar(result, target, fmt, metric, top_n=DEFAULT_BAR_LAYERS)))
        parts.append(_ranking_table(ranking.head(DEFAULT_TABLE_ROWS)))
    return "\n".join(parts)


def _ranking_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return '<p class="muted">No successful trials.</p>'
    headers = ["#", "layer", "kind", "params", "target", "format", "local SQNR (dB)", "output SQNR (dB)",
               "output KL", "top-1 agreement"]
    rows = []
    for i, row in enumerate(frame.itertuples(), start=1):
        top1 = row.output_top1_agreement
        rows.append([
            str(i), f'<span class="mono">{_e(row.layer)}</span>', _e(row.kind), _num(row.params, ",.0f"),
            _e(row.target), _e(row.format), _num(row.sqnr_db, ".1f"),
            _num(row.output_sqnr_db, ".1f") + (" (est.)" if getattr(row, "output_source", "") == "estimated"
                                               and _finite(row.output_sqnr_db) else ""),
            _num(row.output_kl, ".3g"), _num(100 * float(top1), ".1f") + "%" if _finite(top1) else "–",
        ])
    return _table(headers, rows, numeric=(0, 3, 6, 7, 8, 9))


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _heatmaps(result: AnalysisResult, metric: str, embed: _Embedder) -> str:
    targets = charts.swept_targets(result)
    if not targets:
        return '<p class="muted">No trials were run.</p>'
    parts = [f"<p>{html.escape(charts.metric_label(metric))} of every layer (rows, execution order) in every format "
             "(columns). The colour scale is fixed at 0–60 dB, so colours compare across models: "
             "red cells are the alarming ones.</p>"]
    for target in targets:
        parts.append(embed(charts.heatmap(result, target, metric)))
    return "\n".join(parts)


def _scatter(result: AnalysisResult, embed: _Embedder) -> str:
    if not charts.has_values(result, "output_sqnr_db"):
        return '<p class="muted">Output metrics were not computed for this analysis.</p>'
    return ("<p>Points below the dotted diagonal lose more at the model output than at the layer itself "
            "(error amplified downstream); points above are forgiven by the rest of the network.</p>"
            + embed(charts.local_vs_output_scatter(result, target=None)))


def _cumulative(result: AnalysisResult, embed: _Embedder) -> str:
    if not result.cumulative:
        return '<p class="muted">The cumulative analysis was not run.</p>'
    failed = [c for c in result.cumulative if c.error is not None]
    notes = "".join(f'<p class="muted">Configuration {html.escape(c.target)} {html.escape(c.format)} failed: '
                    f"{html.escape(c.error)}</p>" for c in failed)
    return ("<p>Every layer quantized at once with one uniform configuration; each point is the SQNR at that "
            "layer's output, the star the model output.</p>" + notes + embed(charts.cumulative_chart(result)))


def _layer_details(result: AnalysisResult, metric: str, top_layers: int, embed: _Embedder) -> str:
    ranked = [name for name in charts.layer_ranking(result, metric) if name in result.histograms]
    ranked += [layer.name for layer in result.layers if layer.name in result.histograms and layer.name not in ranked]
    chosen = ranked[:max(0, top_layers)]
    if not chosen:
        return '<p class="muted">No histograms were recorded.</p>'
    weight_fmt = charts.lowest_precision_format(result, "weights")
    act_fmt = charts.lowest_precision_format(result, "activations")
    parts = [f"<p>The {len(chosen)} most sensitive layers (of {len(result.layers)}): FP32 vs quantized value "
             "distributions with the clipping range of the lowest-precision format (dashed lines; values "
             "outside are clipped), each output channel's weight range, and the local error distribution.</p>"]
    for rank, name in enumerate(chosen, start=1):
        hists = result.histograms[name]
        layer = result.layer(name)
        info = (f"{_e(layer.kind)} · {layer.params:,} params · weight shape {_e('×'.join(map(str, layer.weight_shape)))}"
                + (f" · shared with {_e(layer.aliases)}" if layer.aliases else ""))
        figures = []
        fmt = weight_fmt if weight_fmt in hists.weight.quantized else None
        figures.append(embed(charts.histogram_figure(hists.weight, fmt, f"{name}: weights (FP32 vs {fmt or 'quantized'})")))
        if hists.activation is not None:
            afmt = act_fmt if act_fmt in hists.activation.quantized else None
            figures.append(embed(charts.histogram_figure(
                hists.activation, afmt, f"{name}: input activations (FP32 vs {afmt or 'quantized'})")))
        if hists.channel_min:
            figures.append(embed(charts.channel_range_figure(hists, f"{name}: FP32 weight range per output channel")))
        trial = next((t for t in result.trials if t.layer == name and t.target == "weights" and t.format == weight_fmt
                      and t.error_histogram is not None), None)
        if trial is not None:
            figures.append(embed(charts.error_histogram_figure(trial)))
        parts.append(f'<div class="layer"><h3>{rank}. <span class="mono">{html.escape(name)}</span></h3>'
                     f'<div class="muted">{info}</div><div class="grid">{"".join(figures)}</div></div>')
    return "\n".join(parts)


def _skipped(result: AnalysisResult) -> str:
    if not result.skipped:
        return "<p>None: every weight-holding module was analysed.</p>"
    rows = [[f'<span class="mono">{_e(s.name)}</span>', _e(s.kind), _e(s.reason)] for s in result.skipped]
    return "<p>Modules that hold weights but were not analysed, and why.</p>" + _table(["module", "kind", "reason"], rows)


def _failed(result: AnalysisResult) -> str:
    failed = [t for t in result.trials if not t.ok]
    failed_cum = [c for c in result.cumulative if c.error is not None]
    if not failed and not failed_cum:
        return "<p>None: every trial succeeded.</p>"
    parts = []
    if failed:
        rows = [[f'<span class="mono">{_e(t.layer)}</span>', _e(t.target), _e(t.format), _e(t.error)] for t in failed]
        parts.append("<p>These trials raised an error; the sweep went on without them.</p>"
                     + _table(["layer", "target", "format", "reason"], rows))
    if failed_cum:
        rows = [[_e(c.target), _e(c.format), _e(c.error)] for c in failed_cum]
        parts.append("<h3>Cumulative configurations</h3>" + _table(["target", "format", "reason"], rows))
    return "\n".join(parts)
