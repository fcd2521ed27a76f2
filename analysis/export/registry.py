"""Export targets: one small record per target, and `export_map`, which dispatches through them.

The CLI's `export --to` choices and help, the dashboard's toolchain downloads and `export_map` all
read this registry, so a new target is one module in this package that calls `register(...)`.
Importing this module (and the target modules, which import their heavy dependencies — torch,
numpy, onnx, onnxruntime, torchao — inside the functions that use them) stays cheap: the CLI lists
the targets on every start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from analysis import runstore

if TYPE_CHECKING:
    from analysis.precision_map import PrecisionMap

NEEDS = ("none", "optional", "required")
# The format kinds (analysis.formats families) the scale/zero-point toolchain files were written for;
# block formats (mx, nvfp4) and fp4_e2m1 only go to targets that list them.
CLASSIC_KINDS = ("int", "float", "fp32")


class ExportError(ValueError):
    """A map/target combination the target cannot express; the message says what to do instead."""


@dataclass(frozen=True)
class Target:
    """One export target.

    `write(pmap, out_path, *, model, calibration, **options) -> Path` writes the file(s) and returns
    the path of the main one. `model` / `calibration`: whether the writer reads the model and
    calibration data ("none", "optional": used when given, "required": `export_map` refuses without).
    `filename`: the default output file name (its suffix is the file type written). Targets that
    read calibration data carry calibrated numbers: the dashboard offers those as toolchain files
    (the map itself has its own download buttons). `kinds`: the format kinds the file can express
    (None: any); `export_map` refuses a map with another kind, naming the layer and the format.
    """

    name: str  # the `--to` value
    label: str  # short human name: dashboard button, tables
    description: str  # one line: what the file is, for `--help`
    filename: str
    write: Callable[..., Path]
    model: str = "none"
    calibration: str = "none"
    kinds: tuple[str, ...] | None = CLASSIC_KINDS

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.lower() or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ExportError(f"export target name {self.name!r} must be lowercase letters, digits, - or _")
        for what in ("model", "calibration"):
            if getattr(self, what) not in NEEDS:
                raise ExportError(f"export target {self.name}: {what}={getattr(self, what)!r}; use one of {', '.join(NEEDS)}")

    @property
    def suffix(self) -> str:
        return Path(self.filename).suffix

    @property
    def uses_model(self) -> bool:
        return self.model != "none"

    @property
    def uses_calibration(self) -> bool:
        return self.calibration != "none"


_TARGETS: dict[str, Target] = {}  # registration order: the order the CLI and the dashboard list them


def register(target: Target, *, replace: bool = False) -> Target:
    """Add `target`; a second target under the same name is refused unless `replace`."""
    if target.name in _TARGETS and not replace and _TARGETS[target.name] != target:
        raise ExportError(f"export target {target.name!r} is already registered; pick another name or pass replace=True")
    _TARGETS[target.name] = target
    return target


def unregister(name: str) -> None:
    """Remove a target (tests, plugins replacing a built-in); unknown names are ignored."""
    _TARGETS.pop(name, None)


def get(name: str) -> Target:
    """The target called `name` (case-insensitive); ExportError naming the valid ones otherwise."""
    key = str(name).lower()
    if key not in _TARGETS:
        raise ExportError(f"unknown export target {key!r}; use one of {', '.join(_TARGETS)}")
    return _TARGETS[key]


def targets() -> tuple[Target, ...]:
    return tuple(_TARGETS.values())


def names() -> tuple[str, ...]:
    return tuple(_TARGETS)


def help_text() -> str:
    """`--to` help: each target with its description (argparse expands %, hence the escaping)."""
    return "; ".join(f"{t.name}: {t.description}" for t in _TARGETS.values()).replace("%", "%%")


def need_text(need: str) -> str:
    """Which targets read `need` ("model" or "calibration"), for `--model`/`--data` help."""
    required = [t.name for t in _TARGETS.values() if getattr(t, need) == "required"]
    optional = [t.name for t in _TARGETS.values() if getattr(t, need) == "optional"]
    parts = ([f"needed for {', '.join(required)}"] if required else []) + \
        ([f"used by {', '.join(optional)} when given"] if optional else [])
    return "; ".join(parts) or "no target reads it"


def write_json(data: Any, out_path: Path) -> Path:
    """The one JSON layout every JSON target writes (indent 2, key order as built)."""
    text = json.dumps(data, indent=2)
    runstore.write_atomic(out_path, lambda tmp: tmp.write_text(text))
    return out_path


def refuse_inexpressible(pmap: PrecisionMap, kinds: tuple[str, ...], what: str) -> None:
    """Refuse, in one line naming the layer and the format, a map whose formats `what` cannot express
    (a format kind outside `kinds`). The one check for every target (`Target.kinds`)."""
    entries = list(pmap.layers.items()) + [("(the map's default)", pmap.default)]
    for layer, precision in entries:
        for role, fmt in zip(("weight", "activation"), precision.formats(pmap.quant.granularity)):
            if fmt is not None and fmt.kind not in kinds:
                raise ExportError(f"{what} cannot express {fmt.name_for(role)} ({role} of layer {layer}); "
                                  "pick another format for that layer or another export target")


def export_map(pmap: PrecisionMap, target: str, out_path: str | Path, *, model: Any = None,
               calibration: Any = None, **options: Any) -> Path:
    """Write `pmap` for `target` (one of `names()`) to `out_path`; returns the path written.

    The target's writer gets `model`, `calibration` and `options`; a target that requires the model
    or the data is refused without them. json/yaml need nothing else; aimet and onnx (and ort with
    pinned scales) build a QuantSim from `model` + `calibration` with the map's quantization config.
    `options`: `version` ("1.0.0" or "2.0.0") for aimet, `opset` and `dynamo` for onnx/ort.
    """
    entry = get(target)
    if entry.kinds is not None:
        refuse_inexpressible(pmap, entry.kinds, f"export target {entry.name!r}")
    needs = {"the model": (entry.model, model), "calibration data": (entry.calibration, calibration)}
    missing = [what for what, (need, given) in needs.items() if need == "required" and given is None]
    if missing:
        raise ExportError(f"export target {entry.name!r} needs numbers from the model: pass {' and '.join(missing)} "
                          "(model=/calibration=; CLI: --model and --data)")
    out_path = Path(out_path)
    if out_path.parent and not out_path.parent.exists():
        out_path.parent.mkdir(parents=True, exist_ok=True)
    return entry.write(pmap, out_path, model=model, calibration=calibration, **options)
