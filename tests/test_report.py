"""Charts carry the numbers of the analysis, and the HTML report is self-contained and escaped."""

from __future__ import annotations

import dataclasses
import html
import math
import re

import numpy as np
import plotly.graph_objects as go
import pytest

import sample_models as sm
from analysis import charts
from analysis.data import Dataset
from analysis.layers import SkippedLayer
from analysis.metrics import ErrorStats
from analysis.report import render_report, write_report
from analysis.results import AnalysisResult, CumulativeResult, load_analysis
from analysis.sweep import AnalysisConfig, analyze

HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def result() -> AnalysisResult:
    data = sm.load_split("mlp", "calibration")
    dataset = Dataset(data["inputs"], data["labels"], "classification", "mlp")
    return analyze(sm.load_model("mlp"), dataset, AnalysisConfig(num_samples=32, cumulative=True))


@pytest.fixture(scope="module")
def report_html(result, tmp_path_factory) -> str:
    path = write_report(result, tmp_path_factory.mktemp("report") / "report.html")
    assert path.exists()
    return path.read_text(encoding="utf-8")


def _rename(result: AnalysisResult, old: str, new: str) -> AnalysisResult:
    """The same analysis with layer `old` called `new` everywhere."""
    name = lambda n: new if n == old else n  # noqa: E731
    return dataclasses.replace(
        result,
        layers=tuple(dataclasses.replace(l, name=name(l.name)) for l in result.layers),
        trials=tuple(dataclasses.replace(t, layer=name(t.layer)) for t in result.trials),
        cumulative=tuple(dataclasses.replace(c, per_layer={name(k): v for k, v in c.per_layer.items()})
                         for c in result.cumulative),
        histograms={name(k): v for k, v in result.histograms.items()},
    )


def _with_failures(result: AnalysisResult) -> tuple[AnalysisResult, tuple, tuple]:
    """Fail the most sensitive int4 weight trial; give another one a NaN output SQNR."""
    frame = result.to_frame()
    w4 = frame[(frame.target == "weights") & (frame.format == "int4")].sort_values("output_sqnr_db")
    failed_key = ("weights", "int4", w4.layer.iloc[0])
    nan_key = ("weights", "int4", w4.layer.iloc[1])
    trials = []
    for t in result.trials:
        if (t.target, t.format, t.layer) == failed_key:
            t = dataclasses.replace(t, local=None, output=None, error_histogram=None,
                                    error="RuntimeError: <boom> & co")
        elif (t.target, t.format, t.layer) == nan_key:
            t = dataclasses.replace(t, output=dataclasses.replace(t.output, sqnr_db=math.nan))
        trials.append(t)
    return dataclasses.replace(result, trials=tuple(trials)), failed_key, nan_key


def _bar_values(fig: go.Figure) -> dict[str, float]:
    """layer -> bar value over all (per-kind) traces of a horizontal bar chart."""
    return {y: x for trace in fig.data for x, y in zip(trace.x, trace.y)}


# --- sensitivity bar ---------------------------------------------------------------------------


def test_sensitivity_bar_ranks_lowest_output_sqnr_first(result):
    frame = result.to_frame()
    weights = frame[frame.target == "weights"]
    lowest = min(set(weights.format), key=lambda f: int(re.search(r"\d+", f).group()))  # "int4"
    rows = weights[weights.format == lowest].sort_values("output_sqnr_db")
    fig = charts.sensitivity_bar(result)
    order = list(fig.layout.yaxis.categoryarray)
    assert order == list(rows.layer)
    assert order[0] == rows.layer.iloc[0]
    values = _bar_values(fig)
    assert values[order[0]] == pytest.approx(rows.output_sqnr_db.min())
    assert set(values) == set(rows.layer)
    assert fig.layout.xaxis.title.text == "output SQNR (dB)"
    assert {trace.name for trace in fig.data} == set(rows.kind)  # one colour per layer kind
    assert "params" in fig.data[0].hovertemplate and "local SQNR" in fig.data[0].hovertemplate


def test_sensitivity_bar_options(result):
    frame = result.to_frame()
    rows = frame[(frame.target == "weights") & (frame.format == "int8")].sort_values("sqnr_db")
    fig = charts.sensitivity_bar(result, "weights", "int8", metric="sqnr_db", top_n=2)
    assert list(fig.layout.yaxis.categoryarray) == list(rows.layer[:2])
    assert sum(len(trace.x) for trace in fig.data) == 2
    assert fig.layout.xaxis.title.text == "local SQNR (dB)"
    act = charts.sensitivity_bar(result, "activations")
    assert "int8" in act.layout.title.text
    with pytest.raises(ValueError, match="unknown metric"):
        charts.sensitivity_bar(result, metric="snr")


def test_lowest_precision_format(result):
    assert charts.lowest_precision_format(result, "weights") == "int4"
    assert charts.lowest_precision_format(result, "activations") == "int8"
    assert charts.lowest_precision_format(result, "both") == "int4/int8"
    assert charts.target_formats(result, "weights") == ["int8", "int4"]
    assert sorted(["int8", "int4-g32", "int4", "fp16"], key=charts.precision_key) == ["int4", "int4-g32", "int8", "fp16"]


# --- heat map, scatter, cumulative ---------------------------------------------------------------


def test_heatmap_values_match_frame(result):
    frame = result.to_frame()
    fig = charts.heatmap(result, "weights")
    trace = fig.data[0]
    assert list(trace.y) == [layer.name for layer in result.layers]  # execution order
    assert list(trace.x) == ["int8", "int4"]
    assert (trace.zmin, trace.zmax) == (0, 60)
    for i, layer in enumerate(trace.y):
        for j, fmt in enumerate(trace.x):
            expected = frame[(frame.layer == layer) & (frame.target == "weights") & (frame.format == fmt)]
            assert trace.z[i][j] == pytest.approx(float(expected.output_sqnr_db.iloc[0]))
            assert trace.text[i][j] == f"{float(expected.output_sqnr_db.iloc[0]):.1f}"
    assert fig.layout.yaxis.autorange == "reversed"
    assert charts.heatmap(result, "weights", "sqnr_db").data[0].colorbar.title.text == "local SQNR (dB)"


def test_scatter_has_one_point_per_trial(result):
    frame = result.to_frame()
    weights = frame[frame.target == "weights"]
    fig = charts.local_vs_output_scatter(result, "weights")
    points = [trace for trace in fig.data if trace.mode == "markers"]
    assert sum(len(trace.x) for trace in points) == len(weights)
    assert fig.layout.xaxis.title.text == "local SQNR (dB)"
    assert fig.layout.yaxis.title.text == "output SQNR (dB)"
    by_layer = {(name, trace.name): (x, y) for trace in points for name, x, y in zip(trace.text, trace.x, trace.y)}
    row = weights.iloc[0]
    assert by_layer[(row.layer, row.format)] == pytest.approx((row.sqnr_db, row.output_sqnr_db))
    everything = charts.local_vs_output_scatter(result, None)
    assert sum(len(t.x) for t in everything.data if t.mode == "markers") == len(frame)


def test_cumulative_chart_lines_and_output_points(result):
    fig = charts.cumulative_chart(result)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    stars = [t for t in fig.data if t.mode == "markers"]
    assert len(lines) == len(stars) == len(result.cumulative)
    for cum, line, star in zip(result.cumulative, lines, stars):
        assert line.name == f"{cum.target} {cum.format}"
        assert list(line.x) == list(cum.per_layer)
        assert list(line.y) == pytest.approx([s.sqnr_db for s in cum.per_layer.values()])
        assert star.x == (charts.MODEL_OUTPUT,) and star.y[0] == pytest.approx(cum.output.sqnr_db)
    assert fig.layout.yaxis.title.text == "cumulative SQNR (dB)"
    assert list(fig.layout.xaxis.categoryarray) == [l.name for l in result.layers] + [charts.MODEL_OUTPUT]
    empty = charts.cumulative_chart(dataclasses.replace(result, cumulative=()))
    assert isinstance(empty, go.Figure) and not empty.data


# --- distributions -------------------------------------------------------------------------------


def test_weight_histogram_counts_and_clip_lines(result):
    layer = result.layers[0]
    hists = result.histograms[layer.name].weight
    fig = charts.histogram_figure(hists, "int4", "weights")
    fp32, quant = fig.data
    assert fp32.name == "FP32" and quant.name == "int4"
    assert sum(fp32.y) == math.prod(layer.weight_shape)
    assert sum(quant.y) == math.prod(layer.weight_shape)
    assert [s.x0 for s in fig.layout.shapes] == pytest.approx(list(hists.clip["int4"]))
    assert all(s.x0 == s.x1 and s.yref == "paper" for s in fig.layout.shapes)
    assert fig.layout.barmode == "overlay" and fig.layout.bargap == 0
    assert fig.layout.yaxis.type == "log"
    assert len(fp32.x) == len(hists.fp32.counts)  # pre-binned: one bar per bin, no raw values
    default = charts.histogram_figure(hists, None, "weights")
    assert default.data[1].name == "int4"  # lowest precision
    with pytest.raises(KeyError):
        charts.histogram_figure(hists, "int3", "weights")


def test_activation_histogram(result):
    hists = result.histograms[result.layers[0].name].activation
    fig = charts.histogram_figure(hists, "int8", "activations")
    assert sum(fig.data[0].y) == pytest.approx(sum(fig.data[1].y))
    assert [s.x0 for s in fig.layout.shapes] == pytest.approx(list(hists.clip["int8"]))


def test_error_histogram_and_channel_ranges(result):
    trial = result.trial(result.layers[0].name, "weights", "int4")
    fig = charts.error_histogram_figure(trial)
    assert sum(fig.data[0].y) == trial.local.count
    assert fig.layout.yaxis.type == "log"
    failed = dataclasses.replace(trial, local=None, output=None, error_histogram=None, error="ValueError: nope")
    assert "nope" in charts.error_histogram_figure(failed).layout.annotations[0].text

    layer = result.layers[0]
    lh = result.histograms[layer.name]
    ranges = charts.channel_range_figure(lh, "ranges")
    bar = ranges.data[0]
    assert len(bar.x) == layer.weight_shape[layer.channel_axis]
    assert list(bar.base) == pytest.approx(list(lh.channel_min))
    assert list(np.add(bar.base, bar.y)) == pytest.approx(list(lh.channel_max))


# --- failed and NaN trials ---------------------------------------------------------------------


def test_charts_skip_failed_and_nan_trials(result):
    broken, failed_key, nan_key = _with_failures(result)
    bar = charts.sensitivity_bar(broken)
    values = _bar_values(bar)
    assert failed_key[2] not in values and nan_key[2] not in values
    assert len(values) == len(result.layers) - 2

    heat = charts.heatmap(broken).data[0]
    i = list(heat.y).index(failed_key[2])
    j = list(heat.x).index("int4")
    assert heat.z[i][j] is None and heat.text[i][j] == "failed"
    k = list(heat.y).index(nan_key[2])
    assert heat.z[k][j] is None

    scatter = charts.local_vs_output_scatter(broken)
    names = [n for t in scatter.data if t.mode == "markers" for n in t.text]
    assert len(names) == 2 * len(result.layers) - 2

    nan_cum = dataclasses.replace(result.cumulative[0], per_layer={
        k: (dataclasses.replace(v, sqnr_db=math.nan) if i == 0 else v)
        for i, (k, v) in enumerate(result.cumulative[0].per_layer.items())
    })
    failed_cum = CumulativeResult("weights", "int2", None, {}, ErrorStats(math.nan, math.nan, math.nan, math.nan, 0),
                                  error="RuntimeError: cumulative <bad>")
    cum = charts.cumulative_chart(dataclasses.replace(result, cumulative=(nan_cum, failed_cum)))
    assert len(cum.data[0].x) == len(result.layers) - 1
    assert len(cum.data) == 2  # the failed configuration is left out

    page = render_report(dataclasses.replace(broken, cumulative=(nan_cum, failed_cum)), top_layers=1)
    assert html.escape("RuntimeError: <boom> & co") in page and "<boom>" not in page
    assert html.escape("RuntimeError: cumulative <bad>") in page


def test_local_only_analysis_uses_local_sqnr(result):
    local_only = dataclasses.replace(result, trials=tuple(dataclasses.replace(t, output=None) for t in result.trials))
    fig = charts.sensitivity_bar(local_only)
    assert not fig.data  # no output SQNR: an explanatory empty figure, not an exception
    page = render_report(local_only, top_layers=1)
    assert "ranking uses local SQNR" in page


# --- the report ----------------------------------------------------------------------------------


def test_report_is_offline_and_embeds_plotly_once(report_html):
    assert report_html.startswith("<!DOCTYPE html>")
    external = re.findall(r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*["']?(?:https?:)?//""",
                          report_html, flags=re.I)
    assert external == []
    assert report_html.count("* plotly.js v") == 1
    assert report_html.count('class="plotly-graph-div"') > 10
    assert len(report_html.encode()) < 7_000_000


def test_report_contents(result, report_html):
    for layer in result.layers:
        assert html.escape(layer.name) in report_html
    for text in ("How to read this", "local SQNR", "output SQNR", "cumulative SQNR", "6 dB",
                 "Skipped layers", "Failed trials", "int4/int8", "percentile", "classification",
                 result.versions["torch"], "top-1 agreement", "output KL"):
        assert text in report_html, text
    assert f"{result.layers[0].params:,}" in report_html


def test_report_escapes_hostile_names(result, tmp_path):
    hostile = _rename(result, result.layers[1].name, HOSTILE)
    hostile = dataclasses.replace(hostile, skipped=(SkippedLayer("<img src=x onerror=alert(2)>", "Custom",
                                                                 "unsupported <b>module</b> & friends"),),
                                  model={**hostile.model, "spec": "<iframe>evil.py</iframe>"})
    path = write_report(hostile, tmp_path / "hostile.html", title="<h1>title</h1>", top_layers=2)
    page = path.read_text(encoding="utf-8")
    assert HOSTILE not in page
    assert html.escape(HOSTILE) in page
    assert "<img src=x" not in page and html.escape("<img src=x onerror=alert(2)>") in page
    assert html.escape("unsupported <b>module</b> & friends") in page
    assert "<iframe>" not in page and "<h1>title</h1>" not in page
    assert "alert(1)" in page  # the layer is still shown, just escaped


def test_report_from_saved_json_and_directory_path(result, tmp_path):
    saved = load_analysis(result.save(tmp_path / "analysis.json"))
    path = write_report(saved, tmp_path, title="round trip", top_layers=1)
    assert path == tmp_path / "report.html" and path.stat().st_size > 1_000_000
