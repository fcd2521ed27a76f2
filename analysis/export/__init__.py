"""Hand a precision map to the tools that deploy it: AIMET encodings, ONNX Runtime overrides, QDQ ONNX.

Every number written here (weight scales and zero points per channel or group, the scale and zero
point of each quantized layer input) comes from the same `QuantSim` quantizers and calibrated
ranges that the simulation used, so a deployed model reproduces the simulated one instead of
re-calibrating with the tool's own (different) rules. Two examples of why this matters:
ONNX Runtime's symmetric int8 grid is [-127, 127] with scale absmax/127, ours (and torchao's) is
[-128, 127] with scale absmax/127.5; and our MSE/percentile clipping ranges are not what a tool's
MinMax calibration would pick.

Targets (`registry.targets()`, dispatched by `export_map`; one module each, registering itself):

- json / yaml (`mapfile`): the precision map itself.
- aimet (`aimet`): AIMET encodings: by default what aimet-torch 2.x's `load_encodings` reads (with
  min/max it rebuilds our grid from) plus a quantsim config; 1.0.0 and 2.0.0 from the API.
- ort (`ort`): ONNX Runtime `quantize_static` keyword arguments with
  `extra_options["TensorQuantOverrides"]`, as JSON (enum names as strings; `ort_settings_hook` or
  the README's onnxruntime-only loader turns them back into live arguments).
- torchao (`torchao`): torchao's own serialisation (`config_to_dict`) of a per-layer `FqnToConfig`.
- onnx (`onnx_qdq`): a QDQ ONNX model made by ONNX Runtime's `quantize_static` with our scales pinned.
- compressed-tensors (`compressed_tensors`): an llm-compressor recipe and the compressed-tensors
  `quantization_config` (config_groups vLLM loads); formats only, no numbers.
- modelopt (`modelopt`): an NVIDIA ModelOpt `mtq.quantize` config (per-quantizer `quant_cfg`).

Each target declares the format kinds it expresses (`Target.kinds`); `export_map` refuses the others
in one line naming the layer and the format (block formats only go to the recipe targets and the map).

Shared: `params` (the simulator and the numbers it quantizes with), `onnx_graph` (the FP32 ONNX
export and which node is which layer), `registry` (the targets and `export_map`).

Conventions shared by all targets: only weights and layer inputs are quantized (biases, norms and
layer outputs stay float), exactly as the simulation does; a layer that is FP32 on both sides is
"excluded".
"""

from __future__ import annotations

import importlib
import pkgutil

from analysis.export import registry
from analysis.export.params import build_sim, excluded_layers, format_info, quantization_parameters
from analysis.export.registry import ExportError, Target, export_map, register
from analysis.export.onnx_graph import LAYER_OPS, OnnxLayer, export_fp32_onnx, load_onnx, match_onnx_layers
# The built-in targets, imported in the order the CLI and the dashboard list them.
from analysis.export import mapfile  # noqa: F401 — json, yaml
from analysis.export.aimet import (
    AIMET_LAYOUTS, aimet_config_path, aimet_min_max, aimet_quantsim_config, aimet_rebuilt_grid, to_aimet_encodings,
)
from analysis.export.ort import (
    INT4_INT16_MIN_OPSET, ORT_ENUM_KEYS, ORT_OVERRIDES_SCHEMA, QDQ_MIN_OPSET, ort_quant_type, ort_quantize_kwargs,
    ort_settings_hook, to_ort_overrides,
)
from analysis.export.torchao import TORCHAO_EXPORT_SCHEMA, to_torchao_export
from analysis.export.onnx_qdq import export_qdq_onnx

# Any other module here is a target that registers itself on import: a new target is one file,
# listed by the CLI and the dashboard without a list to update.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module

__all__ = [
    "AIMET_LAYOUTS", "ExportError", "INT4_INT16_MIN_OPSET", "LAYER_OPS", "ORT_ENUM_KEYS", "ORT_OVERRIDES_SCHEMA",
    "OnnxLayer", "QDQ_MIN_OPSET", "TORCHAO_EXPORT_SCHEMA", "Target", "aimet_config_path", "aimet_min_max",
    "aimet_quantsim_config", "aimet_rebuilt_grid", "build_sim", "excluded_layers", "export_fp32_onnx", "export_map",
    "export_qdq_onnx", "format_info", "load_onnx", "match_onnx_layers", "ort_quant_type", "ort_quantize_kwargs",
    "ort_settings_hook", "quantization_parameters", "register", "registry", "to_aimet_encodings", "to_ort_overrides",
    "to_torchao_export",
]
