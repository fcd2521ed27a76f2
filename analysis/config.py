"""The typed configuration that travels end to end: sweep → analysis.json → precision map → every consumer.

`QuantConfig` is everything that decides *which numbers a quantizer produces* (calibration method per
side, percentile, weight granularity for bare names, dynamic activations, BatchNorm folding, number
of calibration samples, seed). It is serialised identically in `analysis.json`, in every precision
map and in the dashboard's runs, and read back with a strict `from_dict` — an unknown or missing key
is an error, not a silent default, because a default that differs from what the run used changes
the numbers without anyone noticing.

`AnalysisConfig` adds what the *sweep* does with those quantizers (formats, targets, which views,
memory bound, device). Its quantizer fields are flat keywords for convenience; `.quant` returns them
as a `QuantConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from analysis import calibration
from analysis.formats import GRANULARITIES, Format, parse_formats

TARGETS = ("weights", "activations", "both")
# How the model-output metrics of each trial are obtained: "exact" re-runs the model after the layer,
# "estimated" carries the local error to the output to first order (analysis.estimate), "none" skips them.
OUTPUT_METRICS = ("exact", "estimated", "none")
# What runs the sweep: "graph" (a traced copy, analysis.graph), "hooks" (the eager model with forward
# hooks, analysis.hooks) or "auto" (the graph, and hooks for a model that cannot be traced faithfully).
ENGINES = ("auto", "graph", "hooks")
DEFAULT_PROJECTIONS = 2  # random projections per chunk for estimated output metrics (analysis.estimate)
DEFAULT_CACHE_BYTES = 1 << 30  # 1 GiB: comfortable on a laptop; larger data is chunked, not dropped
QUANT_SCHEMA = "quantlens.quant-config/1"
# The most data a load reads into memory at once (a zip bomb or an endless generator is refused
# before it gets there); `analysis.loading.load_data(max_bytes=...)` takes another bound.
MAX_DATA_BYTES = 2 << 30
# Within a chunk of samples, a run writes its checkpoint at most this often (seconds): a kill loses
# the trials of the last few seconds, while the state (~1 KB per unfinished trial) is not rewritten
# after every trial. Chunk ends are always written; `analysis.runs.analyze_to_directory(checkpoint_every=)`.
CHECKPOINT_SECONDS = 5.0


class ConfigError(ValueError):
    """A configuration value or serialised configuration that quantlens cannot use."""


@dataclass(frozen=True)
class QuantConfig:
    """How quantizers are calibrated. Two runs with equal QuantConfigs on the same model and data
    quantize every layer identically."""

    # MSE-searched clipping beats min-max on weights by several dB at 4 bits; percentile clipping is
    # the robust default for activations (outliers in a few calibration samples).
    weight_calibration: str = "mse"
    act_calibration: str = "percentile"
    percentile: float = 99.99
    granularity: str | None = None  # weight granularity for bare format names (None: per-channel)
    dynamic_activations: bool = False  # ranges computed at run time, per token (per sample for convs)
    fold_batchnorm: bool = True
    num_samples: int | None = 256  # calibration samples (the first N of the data)
    seed: int = 0  # for anything random (none of the default methods are)

    def __post_init__(self) -> None:
        for side, method in (("weight", self.weight_calibration), ("activation", self.act_calibration)):
            if method not in calibration.CALIBRATION_METHODS:
                raise ConfigError(f"unknown {side} calibration {method!r}; use one of "
                                  f"{', '.join(calibration.CALIBRATION_METHODS)}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)):
            raise ConfigError(f"percentile must be a number, not {self.percentile!r}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile {self.percentile} is out of range; use a value in (50, 100], e.g. 99.99")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {self.granularity!r}; use one of {', '.join(GRANULARITIES)}")
        if self.num_samples is not None and (isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int)
                                             or self.num_samples < 1):
            raise ConfigError(f"num_samples must be a positive integer or null, not {self.num_samples!r}")
        for name in ("dynamic_activations", "fold_batchnorm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, not {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"schema": QUANT_SCHEMA, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, payload: Any, where: str = "quantization config") -> "QuantConfig":
        """Strict: every field present, nothing unknown (a `schema` key is checked and dropped)."""
        if not isinstance(payload, Mapping):
            raise ConfigError(f"{where} must be an object with the fields {', '.join(_names(cls))}")
        values = dict(payload)
        schema = values.pop("schema", QUANT_SCHEMA)
        if schema != QUANT_SCHEMA:
            raise ConfigError(f"{where} has schema {schema!r}; this quantlens reads {QUANT_SCHEMA!r}")
        _check_keys(values, _names(cls), where)
        if isinstance(values["percentile"], int) and not isinstance(values["percentile"], bool):
            values["percentile"] = float(values["percentile"])
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class AnalysisConfig:
    """What to sweep and how to calibrate. Format names follow `analysis.formats.parse_format`."""

    weight_formats: tuple[str, ...] = ("int8", "int4")
    act_formats: tuple[str, ...] = ("int8",)  # empty: weight-only analysis
    targets: tuple[str, ...] = TARGETS
    granularity: str | None = None
    weight_calibration: str = "mse"
    act_calibration: str = "percentile"
    percentile: float = 99.99
    dynamic_activations: bool = False
    fold_batchnorm: bool = True
    num_samples: int | None = 256
    seed: int = 0
    output_metrics: str = "exact"  # one of OUTPUT_METRICS ("none": local metrics only, about one pass)
    estimate_projections: int = DEFAULT_PROJECTIONS
    verify: int = 0  # with "estimated": re-measure exactly the K most sensitive trials of each format
    cumulative: bool = False  # the cumulative view costs a few passes per format: only when asked
    histogram_bins: int = 128
    cache_bytes: int = DEFAULT_CACHE_BYTES
    layers: tuple[str, ...] | None = None  # restrict the sweep to these layers
    device: str = "cpu"  # where trials run; results do not depend on it beyond float rounding
    # Scale-out (analysis.distributed): worker processes, each with its own model copy, and the Ray
    # cluster they run on (None: a local one started for the run; "auto" or "host:port": an existing one).
    workers: int = 1
    ray_address: str | None = None
    engine: str = "auto"  # one of ENGINES; results do not depend on it beyond float rounding

    def __post_init__(self) -> None:
        # Lists from JSON or callers become tuples, and duplicates go: "int8,int8" is one format.
        for name in ("weight_formats", "act_formats", "targets"):
            object.__setattr__(self, name, tuple(dict.fromkeys(getattr(self, name))))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.output_metrics, bool):  # quantlens 0.1 stored a flag
            object.__setattr__(self, "output_metrics", "exact" if self.output_metrics else "none")
        if self.output_metrics not in OUTPUT_METRICS:
            raise ConfigError(f"unknown output metrics mode {self.output_metrics!r}; use one of {', '.join(OUTPUT_METRICS)}")
        for name, low in (("estimate_projections", 1), ("verify", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer of at least {low}, not {value!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; use one of {', '.join(ENGINES)}")
        if self.verify and self.output_metrics != "estimated":
            raise ConfigError("verify re-measures estimated output metrics; use it with output_metrics='estimated'")
        unknown = set(self.targets) - set(TARGETS)
        if unknown or not self.targets:
            raise ConfigError(f"unknown target(s) {sorted(unknown)}; use any of {', '.join(TARGETS)}")
        self.quant  # validates the quantizer fields
        if self.cache_bytes < 1 << 16:
            raise ConfigError("the activation cache bound is too small; allow at least 64 KiB (--cache-mb 1)")
        if self.histogram_bins < 2:
            raise ConfigError("histogram_bins must be at least 2")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers must be a positive integer, not {self.workers!r}")
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address.strip()):
            raise ConfigError(f"ray_address must be 'auto' or host:port, not {self.ray_address!r}")
        from analysis.device import resolve_device

        resolve_device(self.device)
        # Format names are canonicalised, so "INT8" and "int8" (or "int4" and "int4-pc") are one format.
        object.__setattr__(self, "weight_formats", tuple(dict.fromkeys(
            f.name_for("weight") for f in self.parsed_weight_formats())))
        object.__setattr__(self, "act_formats", tuple(dict.fromkeys(
            f.name_for("activation") for f in self.parsed_act_formats())))

    @property
    def distributed(self) -> bool:
        """Whether the sweep runs on Ray workers (analysis.distributed) rather than in this process."""
        return self.workers > 1 or self.ray_address is not None

    @property
    def quant(self) -> QuantConfig:
        return QuantConfig(**{f.name: getattr(self, f.name) for f in fields(QuantConfig)})

    @classmethod
    def from_quant(cls, quant: QuantConfig, **sweep: Any) -> "AnalysisConfig":
        return cls(**{f.name: getattr(quant, f.name) for f in fields(QuantConfig)}, **sweep)

    def with_quant(self, quant: QuantConfig) -> "AnalysisConfig":
        return replace(self, **{f.name: getattr(quant, f.name) for f in fields(QuantConfig)})

    def parsed_weight_formats(self) -> tuple[Format, ...]:
        return parse_formats(",".join(self.weight_formats), "weight", self.granularity)

    def parsed_act_formats(self) -> tuple[Format, ...]:
        return parse_formats(",".join(self.act_formats), "activation")

    def to_dict(self) -> dict[str, Any]:
        """{"quant": QuantConfig.to_dict(), <sweep fields>}: the quantizer part is the same object
        that precision maps carry."""
        quant_names = {f.name for f in fields(QuantConfig)}
        sweep = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in quant_names}
        return {"quant": self.quant.to_dict(), **sweep}

    @classmethod
    def from_dict(cls, payload: Any, where: str = "analysis config", **overrides: Any) -> "AnalysisConfig":
        if not isinstance(payload, Mapping):
            raise ConfigError(f"{where} must be an object")
        values = dict(payload)
        if "quant" not in values:
            raise ConfigError(f"{where} has no \"quant\" block (written by an older quantlens? re-run `quantlens analyze`)")
        quant = QuantConfig.from_dict(values.pop("quant"), f"{where}: quant")
        quant_names = {f.name for f in fields(QuantConfig)}
        sweep_names = [f.name for f in fields(cls) if f.name not in quant_names]
        # `device` is where a run happened, not what it computed: an older file may lack it.
        values.setdefault("device", "cpu")
        # Added after 0.1 with defaults that reproduce what older runs did.
        values.setdefault("estimate_projections", DEFAULT_PROJECTIONS)
        values.setdefault("verify", 0)
        values.setdefault("workers", 1)
        values.setdefault("ray_address", None)
        values.setdefault("engine", "auto")
        _check_keys(values, sweep_names, where)
        values.update(overrides)
        try:
            return cls.from_quant(quant, **values)
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None


# Sweep options that change memory use or speed, not numbers: a resumed run may change them.
RESULT_NEUTRAL = ("cache_bytes", "device", "workers", "ray_address", "engine")


def upgrade_config_dict(payload: Any) -> dict[str, Any]:
    """An analysis.json `config` as this version writes it. Files from quantlens 0.1 stored the
    sweep config flat (no "quant" block); their missing keys had the defaults of that version,
    which are this version's defaults, so filling them in reproduces what the run did."""
    if not isinstance(payload, Mapping):
        raise ConfigError("the analysis config must be an object; re-run `quantlens analyze`")
    if "quant" in payload:
        return dict(payload)
    quant_names = {f.name for f in fields(QuantConfig)}
    defaults = AnalysisConfig()
    quant = {name: payload.get(name, getattr(defaults, name)) for name in quant_names}
    sweep = {f.name: _plain(payload.get(f.name, getattr(defaults, f.name))) for f in fields(AnalysisConfig)
             if f.name not in quant_names}
    return {"quant": {"schema": QUANT_SCHEMA, **quant}, **sweep}


def _names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _check_keys(values: Mapping[str, Any], expected: list[str], where: str) -> None:
    unknown = sorted(set(values) - set(expected))
    missing = [name for name in expected if name not in values]
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {', '.join(unknown)}; expected {', '.join(expected)}")
    if missing:
        raise ConfigError(f"{where} is missing {', '.join(missing)}; expected all of {', '.join(expected)}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


QAT_RANGES = ("recalibrate", "lsq")


@dataclass(frozen=True)
class QATConfig:
    """How quantization-aware fine-tuning trains (`analysis.qat.finetune_qat`). The quantizers
    themselves are the map's (`QuantConfig`); this only says how the weights are moved.

    Defaults measured on the sample CNN and MLP (benchmarks/bench_qat.py): a learning rate about
    1/30 of the models' training rate, one warm-up epoch then cosine decay, early stopping on the
    validation split, and the best checkpoint kept — epoch 0 (the PTQ weights) included."""

    epochs: int = 30  # at most; early stopping usually ends sooner
    lr: float = 1e-4
    warmup_epochs: int = 1  # linear warm-up, then cosine decay to 0 over the remaining epochs
    batch_size: int = 32
    weight_decay: float = 0.0
    patience: int = 8  # epochs without a better validation score before stopping (0: never stop early)
    validation_fraction: float = 0.2  # carved from the training data when no validation set is given
    freeze_bn_after: int = 2  # unfolded BatchNorm (fold_batchnorm=False maps) updates its statistics this many epochs
    ranges: str = "recalibrate"  # weight ranges: the map's calibration at every step, or LSQ-learned scales
    loss: str = "distill"  # "distill": KL to the FP32 model's outputs; "task": cross-entropy with the labels
    keep: str = "best"  # "best": best validation checkpoint, epoch 0 (PTQ) included; "last": the final epoch
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "warmup_epochs", "batch_size", "patience", "freeze_bn_after", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "batch_size" else 0):
                raise ConfigError(f"QAT {name.replace('_', ' ')} must be an integer >= "
                                  f"{1 if name == 'batch_size' else 0}, not {value!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                    or value == float("inf") or (name == "lr" and value == 0):
                raise ConfigError(f"QAT {name.replace('_', ' ')} must be a finite number "
                                  f"{'> 0' if name == 'lr' else '>= 0'}, not {value!r}")
        if not isinstance(self.validation_fraction, (int, float)) or not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(f"QAT validation fraction must be in (0, 1), not {self.validation_fraction!r}")
        if self.ranges not in QAT_RANGES:
            raise ConfigError(f"unknown QAT ranges {self.ranges!r}; use one of {', '.join(QAT_RANGES)}")
        if self.loss not in ("distill", "task"):
            raise ConfigError(f"unknown QAT loss {self.loss!r}; use distill or task")
        if self.keep not in ("best", "last"):
            raise ConfigError(f"unknown QAT keep {self.keep!r}; use best or last")
