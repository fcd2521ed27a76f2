"""The precision map itself, as JSON or YAML (what `quantlens evaluate --map` and the API read back)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis import runstore
from analysis.export.registry import Target, register

if TYPE_CHECKING:
    from analysis.precision_map import PrecisionMap


def _export_json(pmap: PrecisionMap, out_path: Path, **_: Any) -> Path:
    text = pmap.dumps("json")
    runstore.write_atomic(out_path, lambda tmp: tmp.write_text(text))
    return out_path


def _export_yaml(pmap: PrecisionMap, out_path: Path, **_: Any) -> Path:
    text = pmap.dumps("yaml")
    runstore.write_atomic(out_path, lambda tmp: tmp.write_text(text))
    return out_path


register(Target("json", "Precision map (JSON)", "the precision map as JSON", "map.json", _export_json,
                kinds=None))
register(Target("yaml", "Precision map (YAML)", "the precision map as YAML", "map.yaml", _export_yaml,
                kinds=None))
