"""Cached views of a finished analysis: tables, figures, precision allocation, evaluation, exports.

Everything is keyed by the run's key (id + analysis.json version) so it is computed once per run;
`_`-prefixed arguments are the objects themselves, left out of the cache key.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import streamlit as st

from dashboard import state

FORMAT_NONE = "none"


# --- tables and figures --------------------------------------------------------------------------


@st.cache_data(max_entries=16, ttl=3600, show_spinner=False)
def frame(run_key: str, _result: Any) -> pd.DataFrame:
    """`AnalysisResult.to_frame()`: one row per layer × target × format."""
    return _result.to_frame()


@st.cache_data(max_entries=96, ttl=900, show_spinner=False)
def figure(name: str, run_key: str, params: tuple, _build: Callable[[], Any]) -> Any:
    """A plotly figure built once per (chart, run, parameters)."""
    return _build()


def restrict(result: Any, layers: list[str] | set[str] | None) -> Any:
    """The result limited to `layers` (for the chart builders, which take a whole result)."""
    if layers is None:
        return result
    keep = set(layers)
    return replace(
        result,
        layers=tuple(layer for layer in result.layers if layer.name in keep),
        trials=tuple(t for t in result.trials if t.layer in keep),
        histograms={k: v for k, v in result.histograms.items() if k in keep},
    )


def metric_options(result: Any, table: pd.DataFrame) -> list[str]:
    """Metrics with values in this analysis, output SQNR first."""
    candidates = ["output_sqnr_db", "sqnr_db", "output_kl", "output_top1_agreement", "output_mse", "mse",
                  "cosine", "output_cosine"]
    out = [m for m in candidates if m in table and pd.to_numeric(table[m], errors="coerce").notna().any()]
    return out or ["sqnr_db"]


# --- mixed precision -----------------------------------------------------------------------------


def quant_of(result: Any) -> Any:
    """The run's QuantConfig: what every map made from it carries, and what evaluation uses."""
    from analysis.config import QuantConfig

    return QuantConfig.from_dict(result.config["quant"], "the run's quant config")


def fingerprint_of(result: Any) -> str | None:
    return result.model.get("fingerprint")


def provenance_of(result: Any) -> dict | None:
    """Where the run's model and data came from, as `quantlens suggest` records it in a map (runs
    written by analyze_to_directory keep it in analysis.json's model block)."""
    from analysis.provenance import Provenance

    return Provenance.from_dict(result.model).to_dict() or None


@st.cache_resource(max_entries=8, show_spinner=False)
def problem(run_key: str, _result: Any, groups: bool = True) -> Any:
    """The allocation problem of a run; with `groups`, the deployment groups runtimes impose (fused
    q/k/v, gate/up, one MoE layer's experts) take one decision each, as `quantlens suggest` does."""
    from analysis.allocate import apply_groups, build_problem, resolve_groups

    built = build_problem(_result)
    return apply_groups(built, resolve_groups([layer.name for layer in built.layers], defaults=groups))


@st.cache_data(max_entries=64, ttl=3600, show_spinner=False)
def suggestion(run_key: str, kind: str, value: float, _problem: Any, _result: Any) -> Any:
    """The allocator's map for a budget judged on the sweep's predictions (instant; no evaluations)."""
    from analysis.allocate import Budget, suggest

    return suggest(_problem, Budget(kind, float(value)), fingerprint=fingerprint_of(_result),
                   provenance=provenance_of(_result))


@st.cache_data(max_entries=16, ttl=3600, show_spinner=False)
def front(run_key: str, kind: str, _problem: Any) -> tuple[list[dict], list[dict]]:
    """(Pareto front, uniform points) as plain dicts: label, cost in `kind`, predicted SQNR."""
    from analysis.allocate import pareto_front, uniform_points

    def rows(points: list) -> list[dict]:
        return [{"label": p.label, "cost": p.costs[kind], "sqnr": p.predicted_sqnr_db, "costs": dict(p.costs)}
                for p in points]

    return rows(pareto_front(_problem, kind, points=16)), rows(uniform_points(_problem))


def budget_default(kind: str, prob: Any) -> float:
    """A sensible starting value per budget kind: halfway between the cheapest and the most precise map."""
    from analysis.allocate import COST_KINDS, extreme_picks

    if kind == "avg-bits":
        return 6.0
    if kind == "min-sqnr":
        return 30.0
    if kind == "max-drop":
        return 1.0
    if kind in COST_KINDS:
        low = prob.totals(extreme_picks(prob, kind, cheapest=True))[kind]
        high = prob.totals(extreme_picks(prob, kind, cheapest=False))[kind]
        value = low + (high - low) / 3
        digits = max(0, 2 - int(math.floor(math.log10(value)))) if value > 0 else 0
        return float(round(value, digits))
    return 0.0


def format_choices(result: Any) -> tuple[list[str], list[str]]:
    """(weight options, activation options) for the map editor: analysed formats plus full precision."""
    from analysis.charts import precision_key

    weights = sorted({t.weight_format for t in result.trials if t.weight_format},
                     key=lambda f: precision_key(f, "weights"), reverse=True)
    acts = sorted({t.act_format for t in result.trials if t.act_format},
                  key=lambda f: precision_key(f, "activations"), reverse=True)
    return ["fp32", *weights], [FORMAT_NONE, *acts]


def map_table(prob: Any, pmap: Any) -> pd.DataFrame:
    """One editable row per layer: its weight and activation format in `pmap`, and the engine's
    prediction with only that layer quantized."""
    rows = [{"layer": row["layer"], "kind": row["kind"], "params": row["params"], "weight": row["weight"] or "fp32",
             "activation": row["activation"] or FORMAT_NONE, "SQNR alone (dB)": row["output_sqnr_db"]}
            for row in prob.layer_table(pmap)]
    return pd.DataFrame(rows)


def same_precisions(a: Any, b: Any, names: list[str]) -> bool:
    """Whether two maps give every named layer the same formats (a map listing every layer and one
    relying on its default can be the same map)."""
    return all(a.precision(name) == b.precision(name) for name in names)


def map_from_table(table: pd.DataFrame, result: Any, notes: tuple[str, ...] = ()) -> Any:
    """The edited table as a validated PrecisionMap (MapError with one line for a bad edit)."""
    from analysis.precision_map import LayerPrecision, MapError, PrecisionMap

    layers: dict[str, dict] = {}
    for row in table.itertuples(index=False):
        weight = getattr(row, "weight")
        act = getattr(row, "activation")
        if weight is None or (isinstance(weight, float) and math.isnan(weight)) or str(weight).strip() == "":
            raise MapError(f"layer {row.layer!r} has no weight format; pick one (fp32 keeps it in full precision)")
        act = None if act is None or (isinstance(act, float) and math.isnan(act)) or str(act) in ("", FORMAT_NONE) else str(act)
        layers[str(row.layer)] = {"weight": str(weight).strip(), **({"activation": act} if act else {})}
    names = {layer.name for layer in result.layers}
    no_input = {layer.name for layer in result.layers if not layer.quantizable_input}
    for name, value in layers.items():
        if name not in names:
            raise MapError(f"the map names layer {name!r}, which the analysis does not have")
        if name in no_input and value.get("activation"):
            raise MapError(f"layer {name!r} takes integer indices (an embedding): its activation must be 'none'")
    return PrecisionMap({name: LayerPrecision(v["weight"], v.get("activation")) for name, v in layers.items()},
                        model=fingerprint_of(result), quant=quant_of(result), notes=tuple(notes),
                        provenance=provenance_of(result))


def load_map_upload(data: bytes, name: str, result: Any) -> Any:
    """A precision map file (JSON or YAML) uploaded by the user, checked against this analysis: read
    by the engine's `loads_map`, which refuses what `quantlens --map` refuses (YAML aliases, files
    over 16 MiB)."""
    from analysis.precision_map import MapError, loads_map

    if not name.lower().endswith((".json", ".yaml", ".yml")):
        raise MapError(f"{name} is not a precision map file; upload a .json or .yaml map")
    pmap = loads_map(data, name, yaml_text=name.lower().endswith((".yaml", ".yml")))
    pmap.validate([layer.name for layer in result.layers], fingerprint_of(result))
    return pmap


# --- evaluation ----------------------------------------------------------------------------------


def baseline_pairs(result: Any) -> tuple[tuple[str, str | None], ...]:
    """Uniform configurations to compare against: every analysed weight format with the first
    analysed activation format (weight-only when activations were not analysed)."""
    weights = tuple(result.config.get("weight_formats") or ())
    acts = tuple(result.config.get("act_formats") or ())
    return tuple((w, acts[0] if acts else None) for w in weights)[:6]


@st.cache_resource(max_entries=2, show_spinner="Calibrating the evaluator (once per run)…")
def evaluator(run_key: str, inputs_json: str, config_json: str, eval_samples: int,
              engine: str = "auto") -> tuple[Any, threading.Lock]:
    """An Evaluator with the run's calibration settings and engine, on the run's model and evaluation data.

    Shared by sessions (calibration runs once); the lock serialises its use."""
    from analysis.evaluate import Evaluator

    inputs = state.Inputs(**json.loads(inputs_json))
    model = state.load_model(inputs)
    calibration = state.load_data(inputs)
    evaluation = state.load_eval_data(inputs).take(eval_samples)
    config = state.config_from_dict(json.loads(config_json)).quant
    return Evaluator(model, calibration, evaluation, config, engine=engine), threading.Lock()


def run_evaluator(info: state.RunInfo, result: Any, eval_samples: int) -> tuple[Any, threading.Lock]:
    inputs = info.get_inputs()
    if inputs is None:
        raise ValueError("this run does not record its model and data (made outside the dashboard?); "
                         "analyse the model from the Model & data page to evaluate maps")
    from dataclasses import asdict

    from analysis.provenance import Provenance, engine_for

    return evaluator(info.key, json.dumps(asdict(inputs), sort_keys=True),
                     json.dumps(result.config, sort_keys=True, default=str), int(eval_samples),
                     engine_for(None, Provenance.of_result(result)))


@st.cache_data(max_entries=8, ttl=3600, show_spinner="Evaluating FP32 and the uniform baselines…")
def baseline_rows(run_key: str, eval_samples: int, pairs: tuple, _evaluator: Any, _lock: Any) -> list[dict]:
    with _lock:
        return [e.as_row() for e in _evaluator.baselines(pairs)]


EVAL_COLUMNS = {
    "label": "configuration", "metric": "task metric", "value": "value", "drop": "drop (points)",
    "output_sqnr_db": "output SQNR (dB)", "output_kl": "output KL", "top1_agreement": "top-1 agreement",
    "avg_weight_bits": "avg weight bits", "size_kib": "size (KiB)", "bops": "BOPs / sample",
    "latency_ms_per_sample": "ms / sample (simulated)",
}


def evaluation_table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    if "weight_bytes" in table:
        table["size_kib"] = table["weight_bytes"].astype(float) / 1024
    columns = [c for c in EVAL_COLUMNS if c in table]
    return table[columns].rename(columns=EVAL_COLUMNS)


# --- exports -------------------------------------------------------------------------------------


@st.cache_data(max_entries=4, ttl=3600, show_spinner=False)
def report_html(run_key: str, title: str, _result: Any) -> bytes:
    from analysis.report import write_report

    with tempfile.TemporaryDirectory() as tmp:
        path = write_report(_result, Path(tmp) / "report.html", title=title)
        return Path(path).read_bytes()


def toolchain_targets() -> tuple[list[tuple[str, str, str]], str | None]:
    """The toolchain exports the export registry offers as (target, button label, file name), or why
    there are none. Those are the targets that read calibration data: they carry calibrated numbers
    (the map itself has its own download buttons)."""
    try:
        from analysis.export import registry
    except ImportError:
        return [], "analysis.export is not available in this version"
    except Exception as exc:  # noqa: BLE001 — a half-written module must not break the page
        return [], f"analysis.export could not be imported ({state.one_line(exc)})"
    targets = [(t.name, t.label, t.filename) for t in registry.targets() if t.uses_calibration]
    if not targets:
        return [], "analysis.export offers no AIMET / ONNX Runtime export"
    return targets, None


def toolchain_file(target: str, filename: str, pmap: Any, model: Any, calibration: Any) -> tuple[bytes, str]:
    """`analysis.export.export_map` into a scratch folder; several files (a model and its external
    data, overrides and the ONNX model they name) come back as one zip. Returns (bytes, file name)."""
    import copy
    import zipfile
    from io import BytesIO

    from analysis.export import export_map

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # The cached model is shared by every session: the exporters get a private copy.
        export_map(pmap, target, folder / filename, model=copy.deepcopy(model), calibration=calibration)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if len(files) == 1:
            return files[0].read_bytes(), files[0].name
        buffer = BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in files:
                archive.write(path, path.relative_to(folder).as_posix())
        return buffer.getvalue(), Path(filename).stem.split(".")[0] + ".zip"
