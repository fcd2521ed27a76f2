"""The precision map: which format each layer gets, as a versioned, hand-editable JSON/YAML file.

    {"schema": "quantlens.precision-map/1",
     "model": "<fingerprint>",
     "default": {"weight": "fp32", "activation": null},
     "calibration": {"weight": "mse", "activation": "percentile", "percentile": 99.99, ...},
     "layers": {"features.0": {"weight": "int8", "activation": "int8"},
                "classifier": {"weight": "int4"}},
     "budget": {...}, "predicted": {...}, "measured": {...}}

Formats use quantlens names (see analysis.formats): a weight "int4" is per-channel symmetric, an
activation "int8" per-tensor asymmetric; "fp32" or null leaves that side in full precision. Layers
not listed take `default`. Loading validates everything a hand edit can break.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from analysis.formats import Format, FormatError, parse_format

SCHEMA = "quantlens.precision-map/1"


class MapError(ValueError):
    """A precision map that is malformed or does not fit the model."""


@dataclass(frozen=True)
class LayerPrecision:
    weight: str = "fp32"
    activation: str | None = None  # None: the input stays in float

    def formats(self, granularity: str | None = None) -> tuple[Format | None, Format | None]:
        weight = parse_format(self.weight, "weight", granularity)
        act = parse_format(self.activation, "activation") if self.activation else None
        return (None if weight.is_identity else weight, None if act is None or act.is_identity else act)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weight": self.weight}
        if self.activation is not None:
            out["activation"] = self.activation
        return out


@dataclass(frozen=True)
class PrecisionMap:
    layers: dict[str, LayerPrecision]
    model: str | None = None  # fingerprint of the model the map was made for
    default: LayerPrecision = field(default_factory=LayerPrecision)
    calibration: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] | None = None
    predicted: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()

    def precision(self, layer: str) -> LayerPrecision:
        return self.layers.get(layer, self.default)

    def assignment(self, layer_names: list[str]) -> dict[str, tuple[Format | None, Format | None]]:
        """layer -> (weight format, activation format) for every named layer."""
        granularity = self.calibration.get("granularity")
        return {name: self.precision(name).formats(granularity) for name in layer_names}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "model": self.model,
            "default": self.default.to_dict(),
            "calibration": dict(self.calibration),
            "layers": {name: p.to_dict() for name, p in self.layers.items()},
        }
        for key in ("budget", "predicted", "measured"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def dumps(self, fmt: str = "json") -> str:
        if fmt == "yaml":
            import yaml

            return yaml.safe_dump(self.to_dict(), sort_keys=False)
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.dumps("yaml" if path.suffix in (".yaml", ".yml") else "json"))
        return path

    def validate(self, layer_names: list[str], fingerprint: str | None = None) -> None:
        """Raise MapError if the map names unknown layers or was made for another model."""
        if fingerprint is not None and self.model is not None and self.model != fingerprint:
            raise MapError(
                f"this precision map was made for model {self.model}, not {fingerprint}; "
                "re-run `quantlens suggest` on this model's analysis (or remove the \"model\" field to force it)"
            )
        unknown = [name for name in self.layers if name not in layer_names]
        if unknown:
            hint = ", ".join(layer_names[:5]) + (", ..." if len(layer_names) > 5 else "")
            raise MapError(f"the map names layer(s) the model does not have: {', '.join(unknown[:3])}; the model's layers are {hint}")


def map_from_dict(payload: Any, source: str = "precision map") -> PrecisionMap:
    if not isinstance(payload, dict):
        raise MapError(f"{source} must be a JSON/YAML object with a \"layers\" mapping")
    schema = payload.get("schema")
    if schema != SCHEMA:
        raise MapError(f"{source} has schema {schema!r}; expected {SCHEMA!r} (was it written by another tool?)")
    layers_payload = payload.get("layers")
    if not isinstance(layers_payload, dict):
        raise MapError(f"{source} needs a \"layers\" object mapping layer names to formats")
    layers = {str(name): _layer(value, f"layer {name!r}") for name, value in layers_payload.items()}
    default = _layer(payload.get("default", {"weight": "fp32"}), "default")
    calibration = payload.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise MapError(f"{source}: \"calibration\" must be an object")
    return PrecisionMap(
        layers=layers, model=payload.get("model"), default=default, calibration=calibration,
        budget=payload.get("budget"), predicted=payload.get("predicted"), measured=payload.get("measured"),
        notes=tuple(payload.get("notes") or ()),
    )


def _layer(value: Any, where: str) -> LayerPrecision:
    if isinstance(value, str):  # shorthand: "int4" means weight int4, activation float
        value = {"weight": value}
    if not isinstance(value, dict):
        raise MapError(f"{where} must be a format name or an object with \"weight\" and optional \"activation\"")
    unknown_keys = set(value) - {"weight", "activation"}
    if unknown_keys:
        raise MapError(f"{where} has unknown key(s) {sorted(unknown_keys)}; use \"weight\" and \"activation\"")
    weight = str(value.get("weight", "fp32"))
    activation = value.get("activation")
    activation = None if activation in (None, "none", "fp32") else str(activation)
    precision = LayerPrecision(weight, activation)
    try:
        precision.formats()
    except FormatError as exc:
        raise MapError(f"{where}: {exc}") from None
    return precision


def load_map(path: str | Path) -> PrecisionMap:
    path = Path(path)
    if not path.exists():
        raise MapError(f"precision map {path} not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            payload = yaml.safe_load(text)
        else:
            payload = json.loads(text)
    except Exception as exc:  # noqa: BLE001 — json and yaml raise different types
        raise MapError(f"{path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {str(exc).splitlines()[0]}") from None
    return map_from_dict(payload, str(path))


def uniform_map(layer_names: list[str], weight: str, activation: str | None, **kwargs: Any) -> PrecisionMap:
    return PrecisionMap({name: LayerPrecision(weight, activation) for name in layer_names}, **kwargs)
