"""What an analysis produces, and how it is written to and read back from disk.

Three views of error, labelled everywhere because peer tools mix them up:
- local: only this layer quantized, FP32 inputs, measured at the layer's own output;
- output: only this layer quantized, measured at the model's output;
- cumulative: every layer quantized, measured at each layer's output along the depth.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.config import TARGETS, upgrade_config_dict  # noqa: F401 — TARGETS is re-exported
from analysis.layers import Layer, SkippedLayer
from analysis.metrics import ErrorStats

SCHEMA = "quantlens.analysis/1"


@dataclass(frozen=True)
class Histogram:
    """Pre-binned counts with shared edges (len(edges) == len(counts) + 1)."""

    edges: tuple[float, ...]
    counts: tuple[float, ...]


@dataclass(frozen=True)
class TensorHistograms:
    """FP32 vs quantized value distribution of one tensor, per format, with each format's clipping range."""

    fp32: Histogram
    quantized: dict[str, tuple[float, ...]]  # format name -> counts on fp32's edges
    clip: dict[str, tuple[float, float]]  # format name -> (lo, hi); per-channel formats: the widest channel


@dataclass(frozen=True)
class LayerHistograms:
    weight: TensorHistograms
    activation: TensorHistograms | None = None  # the layer's input, over all calibration samples
    channel_min: tuple[float, ...] = ()  # FP32 weight range of each output channel
    channel_max: tuple[float, ...] = ()


def trial_format(target: str, weight_format: str | None, act_format: str | None) -> str:
    """The label a table shows: "int4" for one side, "int4/int8" (weight/activation) for both."""
    if target == "both":
        return f"{weight_format}/{act_format}"
    return weight_format if target == "weights" else act_format  # type: ignore[return-value]


@dataclass(frozen=True)
class TrialResult:
    """One layer × target × format trial."""

    layer: str
    target: str  # "weights", "activations" or "both"
    weight_format: str | None
    act_format: str | None
    local: ErrorStats | None = None
    output: ErrorStats | None = None
    error: str | None = None  # why the trial failed (the sweep went on)
    error_histogram: Histogram | None = None  # local error (quantized − FP32) at the layer output
    output_source: str | None = None  # "exact" (measured) or "estimated" (analysis.estimate); None: no output metrics

    @property
    def format(self) -> str:
        return trial_format(self.target, self.weight_format, self.act_format)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.layer, self.target, self.format)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class CumulativeResult:
    """Every layer quantized with one uniform configuration."""

    target: str
    weight_format: str | None
    act_format: str | None
    per_layer: dict[str, ErrorStats]  # layer -> error at its output, in execution order
    output: ErrorStats | None  # None when the configuration failed (then `error` says why)
    error: str | None = None

    @property
    def format(self) -> str:
        return trial_format(self.target, self.weight_format, self.act_format)


@dataclass(frozen=True)
class AnalysisResult:
    config: dict[str, Any]
    layers: tuple[Layer, ...]
    skipped: tuple[SkippedLayer, ...]
    trials: tuple[TrialResult, ...]
    cumulative: tuple[CumulativeResult, ...] = ()
    histograms: dict[str, LayerHistograms] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)  # spec, fingerprint, source, folded batchnorms
    data: dict[str, Any] = field(default_factory=dict)  # spec, fingerprint, samples, task
    versions: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers are {', '.join(l.name for l in self.layers[:8])}...")

    def trial(self, layer: str, target: str, fmt: str) -> TrialResult:
        for trial in self.trials:
            if trial.key == (layer, target, fmt):
                return trial
        raise KeyError(f"no trial for layer {layer!r}, target {target!r}, format {fmt!r}")

    def to_frame(self) -> pd.DataFrame:
        """One row per layer × target × format: what layers.csv holds."""
        by_name = {layer.name: layer for layer in self.layers}
        order = {layer.name: i for i, layer in enumerate(self.layers)}
        rows = []
        for trial in self.trials:
            layer = by_name[trial.layer]
            row: dict[str, Any] = {
                "layer": trial.layer,
                "kind": layer.kind,
                "params": layer.params,
                "macs": layer.macs,
                "target": trial.target,
                "format": trial.format,
                "weight_format": trial.weight_format or "",
                "act_format": trial.act_format or "",
            }
            for prefix, stats in (("", trial.local), ("output_", trial.output)):
                values = stats.as_dict(prefix) if stats else ErrorStats(math.nan, math.nan, math.nan, math.nan, 0).as_dict(prefix)
                row.update({k: v for k, v in values.items() if not (prefix == "" and k in ("kl", "top1_agreement"))})
            row["output_source"] = trial.output_source or ""
            row["status"] = "ok" if trial.ok else "failed"
            row["error"] = trial.error or ""
            row["_order"] = order[trial.layer]
            rows.append(row)
        frame = pd.DataFrame(rows)
        if frame.empty:
            return frame
        return frame.sort_values(["_order", "target", "format"], kind="stable").drop(columns="_order").reset_index(drop=True)

    def cumulative_frame(self) -> pd.DataFrame:
        rows = []
        for cum in self.cumulative:
            if cum.output is None:
                continue
            for depth, (name, stats) in enumerate(cum.per_layer.items()):
                rows.append({"target": cum.target, "format": cum.format, "depth": depth, "layer": name,
                             **stats.as_dict()})
            rows.append({"target": cum.target, "format": cum.format, "depth": len(cum.per_layer),
                         "layer": "<model output>", **cum.output.as_dict()})
        return pd.DataFrame(rows)

    def skipped_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(s) for s in self.skipped], columns=["name", "kind", "reason"])

    # --- shards ----------------------------------------------------------------------------------

    @classmethod
    def merge(cls, *results: "AnalysisResult", drop_cumulative: bool = False) -> "AnalysisResult":
        """One result from the results of disjoint layer subsets (`AnalysisConfig(layers=...)`) of
        one configuration, model and data: what a single run over their union reports.

        Each trial is computed from its own layer only, so the merged trials are the single run's
        trials, in its order (layer-major in execution order, then the plan order within a layer).
        The config differs from the shards' only in `layers` (None when the shards cover every
        layer, as a full run writes); `seconds` is the shards' sum (compute time, not wall time).

        Cumulative views quantize every analysed layer at once, so a shard's view covers only its
        own layers and no set of shards adds up to the full one. Results that carry them are refused,
        unless `drop_cumulative=True`: then they are left out and the merged config says
        `cumulative: false`. Run a full cumulative pass separately if it is needed.
        """
        if not results:
            raise ValueError("nothing to merge: pass at least one AnalysisResult")
        if len(results) == 1:
            return results[0]
        first = results[0]
        for index, other in enumerate(results[1:], start=2):
            for what, a, b in (
                ("config", _without_layers(first.config), _without_layers(other.config)),
                ("model", first.model, other.model),
                ("data", first.data, other.data),
                ("versions", first.versions, other.versions),
            ):
                found = _difference(_jsonable(a), _jsonable(b), what)
                if found is not None:
                    raise ValueError(f"cannot merge: {found} differs between result 1 and result {index}; "
                                     "merge only shards of one configuration, model and data")
            if other.layers != first.layers:
                raise ValueError(f"cannot merge: the layer tables of result 1 and result {index} differ; "
                                 "shards must come from the same model")
            if other.skipped != first.skipped:
                raise ValueError(f"cannot merge: the skipped modules of result 1 and result {index} differ; "
                                 "shards must come from the same model")
        carrying = [i for i, r in enumerate(results, start=1) if r.cumulative]
        if carrying and not drop_cumulative:
            raise ValueError(f"cannot merge cumulative views (in result(s) {', '.join(map(str, carrying))}): "
                             "each quantizes only its shard's layers; run shards with cumulative=False "
                             "(--no-cumulative) or pass drop_cumulative=True")

        names = [layer.name for layer in first.layers]
        order = {name: i for i, name in enumerate(names)}
        owner: dict[str, int] = {}
        for index, result in enumerate(results, start=1):
            shard = result.config.get("layers")
            for name in names if shard is None else shard:
                if name not in order:
                    raise ValueError(f"cannot merge: result {index} analysed layer {name!r}, which is not in "
                                     "the model's layer table")
                if name in owner:
                    raise ValueError(f"cannot merge: layer {name!r} is in result {owner[name]} and result {index}; "
                                     "shards must analyse disjoint layer subsets")
                owner[name] = index
            for name in [t.layer for t in result.trials] + list(result.histograms):
                if owner.get(name) != index:
                    raise ValueError(f"cannot merge: result {index} holds results for layer {name!r}, "
                                     "which its config.layers does not name; was the file edited?")

        config = dict(first.config)
        covered = sorted(owner, key=order.__getitem__)
        config["layers"] = None if len(covered) == len(names) else covered
        if drop_cumulative:
            config["cumulative"] = False
        # A stable sort keeps each layer's trials in plan order (each layer comes from one shard).
        trials = sorted((t for r in results for t in r.trials), key=lambda t: order[t.layer])
        histograms = {name: hist for r in results for name, hist in r.histograms.items()}
        histograms = {name: histograms[name] for name in sorted(histograms, key=order.__getitem__)}
        return cls(
            config=config,
            layers=first.layers,
            skipped=first.skipped,
            trials=tuple(trials),
            cumulative=(),
            histograms=histograms,
            model=first.model,
            data=first.data,
            versions=first.versions,
            seconds=sum(r.seconds for r in results),
        )

    # --- serialisation ---------------------------------------------------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        return _jsonable({
            "schema": SCHEMA,
            "config": self.config,
            "model": self.model,
            "data": self.data,
            "versions": self.versions,
            "seconds": self.seconds,
            "layers": [asdict(layer) for layer in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
            "trials": [asdict(t) for t in self.trials],
            "cumulative": [asdict(c) for c in self.cumulative],
            "histograms": {name: asdict(h) for name, h in self.histograms.items()},
        })

    @classmethod
    def from_json_dict(cls, payload: dict[str, Any]) -> "AnalysisResult":
        if payload.get("schema") != SCHEMA:
            raise ValueError(
                f"not a quantlens analysis (schema {payload.get('schema')!r}, expected {SCHEMA!r}); "
                "run `quantlens analyze` to produce one"
            )
        return cls(
            config=upgrade_config_dict(payload["config"]),
            layers=tuple(_build(Layer, d) for d in payload["layers"]),
            skipped=tuple(SkippedLayer(**d) for d in payload["skipped"]),
            trials=tuple(_trial(d) for d in payload["trials"]),
            cumulative=tuple(
                CumulativeResult(
                    target=d["target"], weight_format=d["weight_format"], act_format=d["act_format"],
                    per_layer={k: _stats(v) for k, v in d["per_layer"].items()},
                    output=_stats(d["output"]), error=d.get("error"),
                )
                for d in payload.get("cumulative", [])
            ),
            histograms={name: _layer_histograms(d) for name, d in payload.get("histograms", {}).items()},
            model=payload.get("model", {}),
            data=payload.get("data", {}),
            versions=payload.get("versions", {}),
            seconds=payload.get("seconds", 0.0),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json_dict(), indent=1, allow_nan=False))
        return path


def load_analysis(path: str | Path) -> AnalysisResult:
    """Read an analysis.json (or the directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "analysis.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; point at the --out directory of `quantlens analyze`")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-run the analysis") from None
    return AnalysisResult.from_json_dict(payload)


def _jsonable(value: Any) -> Any:
    """Tuples to lists, non-finite floats to None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _without_layers(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "layers"}


def _difference(a: Any, b: Any, where: str) -> str | None:
    """Where two JSON-like values first differ, e.g. "config.quant.percentile (99.99 vs 99.9)"."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if key not in a or key not in b:
                return f"{where}.{key} (present in only one)"
            found = _difference(a[key], b[key], f"{where}.{key}")
            if found is not None:
                return found
        return None
    if a == b:
        return None
    return f"{where} ({_short(a)} vs {_short(b)})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _build(cls: type, payload: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in payload.items() if k in names}
    return cls(**values)


def _stats(payload: dict[str, Any] | None) -> ErrorStats | None:
    if payload is None:
        return None
    values = {k: (math.nan if v is None and k in ("sqnr_db", "mse", "cosine", "max_abs_error") else v) for k, v in payload.items()}
    return ErrorStats(**values)


def _histogram(payload: dict[str, Any] | None) -> Histogram | None:
    return None if payload is None else Histogram(tuple(payload["edges"]), tuple(payload["counts"]))


def _trial(payload: dict[str, Any]) -> TrialResult:
    return TrialResult(
        layer=payload["layer"], target=payload["target"],
        weight_format=payload["weight_format"], act_format=payload["act_format"],
        local=_stats(payload["local"]), output=_stats(payload["output"]), error=payload.get("error"),
        error_histogram=_histogram(payload.get("error_histogram")),
        # Files from before estimates existed hold measured output metrics only.
        output_source=payload.get("output_source", "exact" if payload["output"] is not None else None),
    )


def _tensor_histograms(payload: dict[str, Any] | None) -> TensorHistograms | None:
    if payload is None:
        return None
    return TensorHistograms(
        fp32=_histogram(payload["fp32"]),  # type: ignore[arg-type]
        quantized={k: tuple(v) for k, v in payload["quantized"].items()},
        clip={k: (v[0], v[1]) for k, v in payload["clip"].items()},
    )


def _layer_histograms(payload: dict[str, Any]) -> LayerHistograms:
    return LayerHistograms(
        weight=_tensor_histograms(payload["weight"]),  # type: ignore[arg-type]
        activation=_tensor_histograms(payload.get("activation")),
        channel_min=tuple(payload.get("channel_min", ())),
        channel_max=tuple(payload.get("channel_max", ())),
    )
