"""torchao per-layer configs (FqnToConfig) for the map, as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.export.registry import Target, register, write_json

if TYPE_CHECKING:
    from analysis.precision_map import PrecisionMap


def _export_torchao(pmap: PrecisionMap, out_path: Path, *, model: Any = None, **_: Any) -> Path:
    """torchao per-layer configs (FqnToConfig) as JSON; with the model, non-Linear layers are named
    with the reason they stay float."""
    from analysis.real import analysed_layers, torchao_config_dict

    if isinstance(model, str):
        from analysis.loading import load_model

        model = load_model(model)
    layers = analysed_layers(model) if model is not None else list(pmap.layers)
    return write_json(torchao_config_dict(pmap, layers), out_path)


register(Target("torchao", "torchao configs", "torchao per-layer configs (FqnToConfig)", "torchao_config.json",
                _export_torchao, model="optional"))
