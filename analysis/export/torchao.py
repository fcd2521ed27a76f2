"""torchao per-layer configs for the map, serialised with torchao's own config serialisation.

The file holds `torchao.core.config.config_to_dict(FqnToConfig({layer: config}))` under "config",
so torchao alone loads it: `quantize_(model, config_from_dict(data["config"]), filter_fn=None)`.
Beside it, for people: each layer's config in short form with the kernel it runs on ("layers"),
and the layers that stay float with the reason ("unsupported").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from analysis.export.registry import Target, register, write_json

if TYPE_CHECKING:
    from analysis.layers import Layer
    from analysis.precision_map import PrecisionMap

TORCHAO_EXPORT_SCHEMA = "quantlens.torchao-configs/2"


def to_torchao_export(pmap: PrecisionMap, layers: Sequence[str | Layer]) -> dict[str, Any]:
    """JSON-ready data: {"schema", "config": config_to_dict(FqnToConfig), "layers", "unsupported",
    "notes", "torchao_version", "torch_version"}. The configs are the ones quantlens' own real path
    (`analysis.real.apply_real`) applies, layer by layer; pass `Layer` objects (`analysed_layers`)
    so convolutions, embeddings and tied weights are listed as unsupported instead of configured."""
    from analysis.real import torchao_config_dict, torchao_configs

    described = torchao_config_dict(pmap, layers)  # first: imports torchao quietly
    configs = torchao_configs(pmap, layers)
    import torchao.quantization as tq
    from torchao.core.config import config_to_dict

    # FqnToConfig; torchao releases before it have ModuleFqnToConfig, which takes the same dict
    fqn_to_config = getattr(tq, "FqnToConfig", None) or tq.ModuleFqnToConfig

    return {
        "schema": TORCHAO_EXPORT_SCHEMA,
        "config": config_to_dict(fqn_to_config(dict(configs))),
        "layers": described["layers"],
        "unsupported": described["unsupported"],
        "notes": described["notes"],
        "torchao_version": described["torchao_version"],
        "torch_version": described["torch_version"],
    }


def _export_torchao(pmap: PrecisionMap, out_path: Path, *, model: Any = None, engine: str | None = None,
                    **_: Any) -> Path:
    """With the model, non-Linear layers are named with the reason they stay float."""
    from analysis.export.params import model_layers

    layers = model_layers(pmap, model, engine) if model is not None else list(pmap.layers)
    return write_json(to_torchao_export(pmap, layers), out_path)


register(Target("torchao", "torchao configs",
                "torchao FqnToConfig serialised with torchao's config_to_dict (load with config_from_dict)",
                "torchao_config.json", _export_torchao, model="optional"))
