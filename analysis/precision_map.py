"""The precision map: which format each layer gets, as a versioned, hand-editable JSON/YAML file.

    {"schema": "quantlens.precision-map/2",
     "model": "<fingerprint>",
     "quant": {"schema": "quantlens.quant-config/1", "weight_calibration": "mse",
               "act_calibration": "percentile", "percentile": 99.99, "granularity": null,
               "dynamic_activations": false, "fold_batchnorm": true, "num_samples": 256, "seed": 0},
     "default": {"weight": "fp32"},
     "layers": {"features.0": {"weight": "int8-sym-pc", "activation": "int8-asym-pt"},
                "classifier": {"weight": "int4-sym-g32"}},
     "groups": [["blk.0.attn.q_proj", "blk.0.attn.k_proj", "blk.0.attn.v_proj"], "blk.*.mlp.experts.*.w1"],
     "budget": {...}, "predicted": {...}, "measured": {...}, "provenance": {...}}

Format names are written fully qualified (symmetry, granularity, group size), so a map means the
same thing wherever it is read; hand-written short names ("int4", "int8") are accepted and
qualified on load with each role's default (weights symmetric per-channel, activations asymmetric
per-tensor). `quant` is the same `QuantConfig` object analysis.json carries; it decides how the
quantizers are calibrated and is read strictly. "fp32" or null leaves that side in full
precision; layers not listed take `default`.

`groups` (optional) lists layers that must share one format because a runtime runs them as one
kernel (fused q/k/v, gate/up, the experts of one MoE layer): each entry is a list of layer names
or a glob matching them. A map whose group members differ is refused on load (names) or when it is
checked against the model (globs), so every consumer — evaluate, export — honours the groups.
Maps without the key (older ones included) have no groups.

Schema 1 maps (quantlens 0.1: a free "calibration" block, bare format names) still load: their
calibration keys are mapped onto `quant` (missing keys take the 0.1 defaults, which are today's)
and their names are qualified with the granularity they named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.config import ConfigError, QuantConfig
from analysis.formats import Format, FormatError, parse_format

SCHEMA = "quantlens.precision-map/2"
LEGACY_SCHEMAS = ("quantlens.precision-map/1",)
MAX_MAP_BYTES = 16 << 20  # a map names each layer once; 16 MiB is far beyond any real model


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

    def qualified(self, granularity: str | None = None) -> "LayerPrecision":
        """The same precision with fully qualified format names."""
        weight, act = self.formats(granularity)
        return LayerPrecision(weight.qualified_name("weight") if weight else "fp32",
                              act.qualified_name("activation") if act else None)

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
    quant: QuantConfig = field(default_factory=QuantConfig)
    budget: dict[str, Any] | None = None
    predicted: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()
    provenance: dict[str, Any] | None = None  # model spec, weights file and hash, data spec
    # Layers that share one format: each a tuple of layer names, or a glob (str) matching them.
    groups: tuple[tuple[str, ...] | str, ...] = ()

    def __post_init__(self) -> None:
        # Names are stored qualified whatever the caller wrote, so equal maps compare equal.
        try:
            object.__setattr__(self, "layers", {name: p.qualified(self.quant.granularity) for name, p in self.layers.items()})
            object.__setattr__(self, "default", self.default.qualified(self.quant.granularity))
        except FormatError as exc:
            raise MapError(str(exc)) from None
        object.__setattr__(self, "groups", tuple(g if isinstance(g, str) else tuple(g) for g in self.groups))
        self._check_groups([g for g in self.groups if not isinstance(g, str)])

    def _check_groups(self, groups: list[tuple[str, ...]]) -> None:
        for group in groups:
            precisions = {self.precision(name) for name in group}
            if len(precisions) > 1:
                found = ", ".join(f"{name}={self.precision(name).weight}" for name in group[:4])
                raise MapError(f"group {', '.join(group[:3])}{', ...' if len(group) > 3 else ''} must share one format "
                               f"(a runtime runs it as one kernel) but has {found}; give its layers the same "
                               "precision or remove the group")

    def group_list(self, layer_names: list[str]) -> list[tuple[str, ...]]:
        """The map's groups as tuples of layer names, globs matched against `layer_names`."""
        from analysis.allocate.groups import GroupError, expand_groups

        try:
            return expand_groups(list(self.groups), layer_names)
        except GroupError as exc:
            raise MapError(str(exc)) from None

    def precision(self, layer: str) -> LayerPrecision:
        return self.layers.get(layer, self.default)

    def assignment(self, layer_names: list[str]) -> dict[str, tuple[Format | None, Format | None]]:
        """layer -> (weight format, activation format) for every named layer."""
        return {name: self.precision(name).formats() for name in layer_names}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "model": self.model,
            "quant": self.quant.to_dict(),
            "default": self.default.to_dict(),
            "layers": {name: p.to_dict() for name, p in self.layers.items()},
        }
        if self.groups:
            out["groups"] = [g if isinstance(g, str) else list(g) for g in self.groups]
        for key in ("budget", "predicted", "measured", "provenance"):
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
        """Write the map (YAML for .yaml/.yml, else JSON) atomically; see `runstore.write_output`
        for the checks a command runs first."""
        from analysis.runstore import write_atomic

        path = Path(path)
        text = self.dumps("yaml" if path.suffix in (".yaml", ".yml") else "json")
        write_atomic(path, lambda tmp: tmp.write_text(text))
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
        groups = self.group_list(layer_names)
        strangers = [name for group in groups for name in group if name not in layer_names]
        if strangers:
            raise MapError(f"the map's groups name layer(s) the model does not have: {', '.join(strangers[:3])}")
        self._check_groups(groups)


# Schema 1's calibration block: its keys (short and long forms) -> QuantConfig fields.
_LEGACY_CALIBRATION_KEYS = {
    "weight_calibration": "weight_calibration", "weight": "weight_calibration",
    "act_calibration": "act_calibration", "activation": "act_calibration",
    "activation_calibration": "act_calibration",
    "percentile": "percentile", "granularity": "granularity",
    "dynamic_activations": "dynamic_activations", "dynamic": "dynamic_activations",
    "fold_batchnorm": "fold_batchnorm", "num_samples": "num_samples", "samples": "num_samples",
}


def _legacy_quant(calibration: Any, source: str) -> QuantConfig:
    if not isinstance(calibration, dict):
        raise MapError(f"{source}: \"calibration\" must be an object")
    values: dict[str, Any] = {}
    for key, value in calibration.items():
        target = _LEGACY_CALIBRATION_KEYS.get(key)
        if target is not None and value is not None:
            values[target] = value
    if isinstance(values.get("percentile"), int) and not isinstance(values.get("percentile"), bool):
        values["percentile"] = float(values["percentile"])
    try:
        return QuantConfig(**values)
    except (ConfigError, TypeError) as exc:
        raise MapError(f"{source}: calibration: {exc}") from None


def map_from_dict(payload: Any, source: str = "precision map") -> PrecisionMap:
    if not isinstance(payload, dict):
        raise MapError(f"{source} must be a JSON/YAML object with a \"layers\" mapping")
    schema = payload.get("schema")
    if schema not in (SCHEMA, *LEGACY_SCHEMAS):
        raise MapError(f"{source} has schema {schema!r}; expected {SCHEMA!r} (was it written by another tool?)")
    known = {"schema", "model", "default", "layers", "budget", "predicted", "measured", "notes", "provenance", "groups",
             "quant" if schema == SCHEMA else "calibration"}
    unknown = sorted(set(payload) - known)
    if unknown:
        raise MapError(f"{source} has unknown key(s) {', '.join(map(str, unknown))}; "
                       f"a {schema} map has {', '.join(sorted(known))}")
    if schema == SCHEMA:
        try:
            quant = QuantConfig.from_dict(payload.get("quant"), f"{source}: quant")
        except ConfigError as exc:
            raise MapError(str(exc)) from None
    else:
        quant = _legacy_quant(payload.get("calibration") or {}, source)
    layers_payload = payload.get("layers")
    if not isinstance(layers_payload, dict):
        raise MapError(f"{source} needs a \"layers\" object mapping layer names to formats")
    layers = {str(name): _layer(value, f"layer {name!r}", quant.granularity) for name, value in layers_payload.items()}
    default = _layer(payload.get("default", {"weight": "fp32"}), "default", quant.granularity)
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise MapError(f"{source}: \"model\" must be the model's fingerprint (a string) or null")
    extras = {}
    for key in ("budget", "predicted", "measured", "provenance"):
        value = payload.get(key)
        if value is not None and not isinstance(value, dict):
            raise MapError(f"{source}: \"{key}\" must be an object or null")
        extras[key] = value
    notes = payload.get("notes") or ()
    if not isinstance(notes, (list, tuple)) or not all(isinstance(n, str) for n in notes):
        raise MapError(f"{source}: \"notes\" must be a list of strings")
    groups = payload.get("groups") or ()
    if not isinstance(groups, (list, tuple)) or not all(
            isinstance(g, str) or (isinstance(g, (list, tuple)) and all(isinstance(n, str) for n in g)) for g in groups):
        raise MapError(f"{source}: \"groups\" must be a list whose entries are lists of layer names or glob strings")
    return PrecisionMap(layers=layers, model=model, default=default, quant=quant, notes=tuple(notes),
                        groups=tuple(groups), **extras)


def _layer(value: Any, where: str, granularity: str | None = None) -> LayerPrecision:
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
    try:
        return LayerPrecision(weight, activation).qualified(granularity)
    except FormatError as exc:
        raise MapError(f"{where}: {exc}") from None


def load_map(path: str | Path) -> PrecisionMap:
    path = Path(path)
    if not path.exists():
        raise MapError(f"precision map {path} not found")
    if not path.is_file():  # a FIFO or device would hang or never end
        raise MapError(f"precision map {path} is not a regular file")
    size = path.stat().st_size
    if size > MAX_MAP_BYTES:
        raise MapError(f"precision map {path} is {size >> 20} MiB; a map is at most {MAX_MAP_BYTES >> 20} MiB")
    from analysis.runstore import FileSafetyError, read_regular

    try:
        text = read_regular(path, "precision map", MAX_MAP_BYTES)
    except FileSafetyError as exc:  # swapped for a FIFO or device since the checks above
        raise MapError(str(exc)) from None
    return loads_map(text, str(path), yaml_text=path.suffix in (".yaml", ".yml"))


def loads_map(data: bytes | str, source: str, yaml_text: bool = False) -> PrecisionMap:
    """A map from the contents of a file (an upload, say) named `source` in messages: at most
    MAX_MAP_BYTES, YAML without aliases when `yaml_text`, else JSON."""
    if isinstance(data, str):
        data = data.encode()
    if len(data) > MAX_MAP_BYTES:
        raise MapError(f"precision map {source} is {len(data) >> 20} MiB; a map is at most {MAX_MAP_BYTES >> 20} MiB")
    text = data.decode("utf-8", errors="replace")
    try:
        if yaml_text:
            import yaml

            # Aliases let a few hundred bytes expand to gigabytes; a hand-written map never needs them.
            if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
                raise MapError(f"{source} uses YAML aliases (*name); write each value out instead")
            payload = yaml.safe_load(text)
        else:
            payload = json.loads(text)
    except MapError:
        raise
    except Exception as exc:  # noqa: BLE001 — json and yaml raise different types
        raise MapError(f"{source} is not valid {'YAML' if yaml_text else 'JSON'}: {str(exc).splitlines()[0]}") from None
    return map_from_dict(payload, source)


def uniform_map(layer_names: list[str], weight: str, activation: str | None, **kwargs: Any) -> PrecisionMap:
    return PrecisionMap({name: LayerPrecision(weight, activation) for name in layer_names}, **kwargs)
