"""The plan for real kernels: which torchao config each layer of a precision map gets, and a copy
of the model quantized with it.

This half of `analysis.real` only decides and applies; it measures nothing (that is
`analysis.real.measure`), so the torchao export (`analysis.export.torchao`) can describe a map's
configs without the evaluation machinery. The mapping follows what torchao can actually run here.

What runs on CPU with torchao 0.18 (x86, the pip wheel without torchao's C++ CPU kernels), as probed
by `analysis.real.probe_cpu_support()`:

* `Int8WeightOnlyConfig` (Int8Tensor): int8 codes + fp32 per-row (or per-tensor / per-group) scales;
  the matmul up-casts the int8 weight to fp32 on every call (no integer GEMM).
* `Int8DynamicActivationInt8WeightConfig` (Int8Tensor): int8 per-channel weights and activations
  quantized *dynamically, per token*; a real integer GEMM (`torch._int_mm`, oneDNN).
* `IntxWeightOnlyConfig(weight_dtype=torch.int1..int8)` (IntxUnpackedToInt8Tensor): runs, but the codes
  are stored unpacked, one per int8 byte, and dequantized to fp32 on every call: int4 costs as many
  bytes as int8 and is no faster.
* `Int8DynamicActivationIntxWeightConfig` with the default UNPACKED_TO_INT8 format: runs as quantize →
  dequantize of the activations plus a dequantized weight and an fp32 matmul (a simulation inside
  torchao). Its opaque packed formats need KleidiAI (Arm) or torchao's C++ kernel library: not here.
* `Int4WeightOnlyConfig`: no packing format runs on CPU in fp32 here (PLAIN needs the mslk package,
  PLAIN_INT32 is XPU-only, TILE_PACKED_TO_4D needs CUDA and bf16, PRESHUFFLED needs CUDA), so int4
  weights use `IntxWeightOnlyConfig(torch.int4)`.

Grids match ours (analysis.formats): symmetric scale = absmax / ((2^b - 1) / 2), q ∈ [-2^(b-1),
2^(b-1) - 1]; torchao picks ranges by min/max, so the like-for-like simulation uses min/max weight
ranges and, for activations, dynamic per-token ranges (`QuantConfig.dynamic_activations`).
Convolutions, embeddings, attention's packed projections, tied weights, float formats and int16 stay
in float with the reason given.

Block formats (`_BLOCK_SPECS`): torchao's prototype MX and NVFP4 configs — MXFP8 and MXFP4 weights with
activations in the same format (`MXDynamicActivationMXWeightConfig`, blocks of 32), NVFP4 weight-only
(`NVFP4WeightOnlyConfig`) and NVFP4 weights and activations (`NVFP4DynamicActivationNVFP4WeightConfig`).
Their kernels need an NVIDIA GPU of compute capability 10.0 or newer (Blackwell) and bf16 weights, so
the plan keeps such layers in float, with that reason, on any other device (`block_kernel_reason`);
the CPU real path here always does. Other block formats (MXFP6, MXINT8, MX weight-only, block sizes
other than the hardware's) have no torchao config.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from analysis.formats import Format
from analysis.layers import Layer
from analysis.precision_map import LayerPrecision, PrecisionMap

_LINEAR_KINDS = ("Linear", "NonDynamicallyQuantizableLinear")
_torchao_import_lock = threading.Lock()


def _torchao():
    """Import torchao lazily (it takes seconds) and quietly (it logs about CUDA-only .so files)."""
    # The logger is process-wide: it is quieted only around the first import, and one thread at a
    # time, or two first imports could each restore the other's ERROR level and keep it for good.
    with _torchao_import_lock:
        logger = logging.getLogger("torchao")
        level = logger.level
        first = "torchao.quantization" not in sys.modules
        if first:
            logger.setLevel(logging.ERROR)
        try:
            import torchao
            import torchao.quantization as tq
        finally:
            if first:
                logger.setLevel(level)
    return torchao, tq


# --- the plan: which torchao config each layer gets --------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """A torchao config by class name and keyword arguments (JSON-able), plus what it runs as."""

    config: str
    kwargs: dict[str, Any]
    kernel: str
    weight: str  # quantlens format names, for the record
    activation: str | None
    module: str = "torchao.quantization"  # where the config class lives
    block: int | None = None  # block formats: the block size the input features must be a multiple of

    def build(self) -> Any:
        _, tq = _torchao()
        cls = getattr(importlib.import_module(self.module), self.config)
        kwargs = {}
        for key, value in self.kwargs.items():
            kwargs[key] = _decode(value, tq)
        return cls(**kwargs)

    def describe(self) -> dict[str, Any]:
        return {"config": self.config, **self.kwargs, "kernel": self.kernel, **({"module": self.module} if self.block else {}),
                "from": {"weight": self.weight, "activation": self.activation}}


def _decode(value: Any, tq: Any) -> Any:
    """JSON-able kwarg value -> torchao object ("torch.int4", "PerGroup(32)", "MappingType.SYMMETRIC")."""
    if isinstance(value, str):
        if value.startswith("torch."):
            return getattr(torch, value[len("torch."):])
        if value.startswith("MappingType."):
            return getattr(tq.MappingType, value.split(".", 1)[1])
        for gran in ("PerGroup", "PerAxis", "PerRow", "PerTensor"):
            if value.startswith(gran + "("):
                inner = value[len(gran) + 1:-1]
                return getattr(tq, gran)(*([int(inner)] if inner else []))
    if isinstance(value, list):
        return [_decode(v, tq) for v in value]
    return value


@dataclass
class RealPlan:
    """layer -> torchao spec for the layers that run on real kernels; layer -> reason for the rest."""

    specs: "OrderedDict[str, _Spec]" = field(default_factory=OrderedDict)
    unsupported: dict[str, str] = field(default_factory=dict)


def _weight_granularity(fmt: Format, intx: bool) -> str | None:
    if fmt.granularity == "per-channel":
        return "PerAxis(0)" if intx else "PerRow()"
    if fmt.granularity == "per-group":
        return f"PerGroup({fmt.group_size})"
    return None if intx else "PerTensor()"  # IntxWeightOnlyConfig has no per-tensor granularity


_MX_MODULE = "torchao.prototype.mx_formats"
# (weight format, activation format) qualified names -> (config, kwargs, kernel) of torchao's block configs
_BLOCK_SPECS: dict[tuple[str, str | None], tuple[str, dict[str, Any], str]] = {
    ("mxfp8_e4m3", "mxfp8_e4m3"): ("MXDynamicActivationMXWeightConfig",
                                   {"block_size": 32, "activation_dtype": "torch.float8_e4m3fn",
                                    "weight_dtype": "torch.float8_e4m3fn"}, "MXFP8 x MXFP8 GEMM, E8M0 block scales"),
    ("mxfp4", "mxfp4"): ("MXDynamicActivationMXWeightConfig",
                         {"block_size": 32, "activation_dtype": "torch.float4_e2m1fn_x2",
                          "weight_dtype": "torch.float4_e2m1fn_x2"}, "MXFP4 x MXFP4 GEMM, E8M0 block scales"),
    ("nvfp4", None): ("NVFP4WeightOnlyConfig", {"use_dynamic_per_tensor_scale": True},
                      "NVFP4 weights (E4M3 block + FP32 tensor scales), bf16 activations"),
    ("nvfp4", "nvfp4"): ("NVFP4DynamicActivationNVFP4WeightConfig",
                         {"use_dynamic_per_tensor_scale": True, "use_triton_kernel": False},
                         "NVFP4 x NVFP4 GEMM, activations quantized per block at run time"),
}


def block_kernel_reason(device: torch.device | str | None) -> str | None:
    """Why torchao's MX/NVFP4 kernels cannot run on `device` (None: they can)."""
    device = torch.device(device or "cpu")
    if device.type != "cuda":
        return f"torchao's MX/NVFP4 kernels need an NVIDIA GPU of compute capability 10.0+ (Blackwell); the real path runs on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 10:
        return f"torchao's MX/NVFP4 kernels need compute capability 10.0+ (Blackwell); {device} has {major}.{minor}"
    return None


def _block_spec(wf: Format, af: Format | None, precision: LayerPrecision) -> _Spec | str:
    key = (wf.qualified_name("weight"), af.qualified_name("activation") if af is not None else None)
    if key not in _BLOCK_SPECS:
        offered = ", ".join(f"{w}/{a or 'none'}" for w, a in _BLOCK_SPECS)
        return f"{key[0]} weights with {key[1] or 'float'} activations: torchao's block configs are (weight/activation) {offered}"
    config, kwargs, kernel = _BLOCK_SPECS[key]
    return _Spec(config, kwargs, kernel, precision.weight, precision.activation, _MX_MODULE, wf.group_size)


def _spec_for(wf: Format | None, af: Format | None, precision: LayerPrecision) -> _Spec | str:
    """The torchao config for one (weight, activation) pair, or the reason there is none."""
    w_name, a_name = precision.weight, precision.activation
    if wf is None:
        if af is not None:
            return "torchao has no activation-only config (the weight stays float, so the layer does too)"
        return "fp32 in the map"
    if wf.block_scaled or (af is not None and af.block_scaled):
        return _block_spec(wf, af, precision)
    if wf.kind != "int":
        return (f"weight format {wf.base}: torchao's float8 configs need CUDA; fp16/bf16 are plain casts "
                "(not a torchao quantization config)")
    if wf.bits > 8:
        return f"weight format int{wf.bits}: torchao's integer weight configs take 1..8 bits"
    if af is not None and (af.kind != "int" or af.bits != 8):
        return f"activation format {af.base}: torchao's CPU configs quantize activations only to int8 (dynamic)"
    mapping = "MappingType.SYMMETRIC" if wf.symmetric else "MappingType.ASYMMETRIC"
    dtype = f"torch.int{wf.bits}"
    if af is None:
        if wf.bits == 8 and wf.symmetric:
            return _Spec("Int8WeightOnlyConfig", {"granularity": _weight_granularity(wf, False),
                                                  "set_inductor_config": False},
                         "int8 codes; weight up-cast to fp32 per call, fp32 matmul", w_name, a_name)
        gran = _weight_granularity(wf, True)
        if gran is None:
            return f"weight format {w_name}: IntxWeightOnlyConfig supports per-channel and per-group scales, not per-tensor"
        return _Spec("IntxWeightOnlyConfig", {"weight_dtype": dtype, "granularity": gran, "mapping_type": mapping},
                     f"int{wf.bits} codes stored unpacked in int8; dequantized to fp32 per call", w_name, a_name)
    # weight + int8 activation: torchao's activations are dynamic, per token
    act_mapping = "MappingType.SYMMETRIC" if af.symmetric else "MappingType.ASYMMETRIC"
    if wf.bits == 8 and wf.symmetric and wf.granularity in ("per-channel", "per-tensor"):
        w_gran = _weight_granularity(wf, False)
        return _Spec("Int8DynamicActivationInt8WeightConfig",
                     {"granularity": ["PerRow()", w_gran], "act_mapping_type": act_mapping, "set_inductor_config": False},
                     "int8 x int8 GEMM (torch._int_mm); activations quantized per token at run time", w_name, a_name)
    if not af.symmetric:
        gran = _weight_granularity(wf, True)
        if gran is None:
            return f"weight format {w_name}: Int8DynamicActivationIntxWeightConfig supports per-channel and per-group scales, not per-tensor"
        return _Spec("Int8DynamicActivationIntxWeightConfig",
                     {"weight_dtype": dtype, "weight_granularity": gran, "weight_mapping_type": mapping,
                      "act_mapping_type": act_mapping},
                     "activations quantize-dequantized per token, weight dequantized; fp32 matmul (unpacked int8 storage)",
                     w_name, a_name)
    return (f"{w_name} weights with symmetric {af.base} activations: torchao's CPU configs pair symmetric "
            "activations only with int8 per-channel/per-tensor weights")


def _not_linear_reason(kind: str) -> str:
    base = f"{kind}: torchao's CPU configs target nn.Linear modules"
    if kind.startswith("Conv"):
        return base + " (IntxWeightOnlyConfig's conv2d path scales per output channel and input block, not per output channel as analysed; no integer conv kernel)"
    if kind.startswith("MultiheadAttention"):
        return base + " (nn.MultiheadAttention uses its projection weights directly, not through nn.Linear)"
    if "Embedding" in kind:
        return base + " (embeddings are lookups, not matmuls)"
    return base + " (this weight is used by a functional call, not an nn.Linear module)"


def _layers_of(layer_names: Sequence[str | Layer]) -> list[tuple[str, Layer | None]]:
    return [(item.name, item) if isinstance(item, Layer) else (str(item), None) for item in layer_names]


def _plan(pmap: PrecisionMap, layer_names: Sequence[str | Layer], device: torch.device | str | None = None) -> RealPlan:
    """`device`: where the real kernels would run (block formats need a Blackwell GPU; None: only
    the formats are checked, as for the torchao export's description)."""
    layers = _layers_of(layer_names)
    pmap.validate([name for name, _ in layers])
    assignment = pmap.assignment([name for name, _ in layers])
    plan = RealPlan()
    for name, layer in layers:
        wf, af = assignment[name]
        if wf is None and af is None:
            continue  # float in the map: nothing to report
        if layer is not None:
            if layer.kind not in _LINEAR_KINDS:
                plan.unsupported[name] = _not_linear_reason(layer.kind)
                continue
            if layer.aliases:
                plan.unsupported[name] = (f"weight tied to {', '.join(layer.aliases)}: swapping it for one use "
                                          "would store a second copy")
                continue
            if af is not None and not layer.quantizable_input:
                af = None
        precision = pmap.precision(name)
        spec = _spec_for(wf, af, precision)
        if isinstance(spec, str):
            plan.unsupported[name] = spec
            continue
        if spec.block is not None:
            reason = block_kernel_reason(device) if device is not None else None
            if reason is not None:
                plan.unsupported[name] = f"{precision.weight}: {reason}"
                continue
        if layer is not None and wf is not None and wf.granularity == "per-group":
            in_features = math.prod(layer.weight_shape[1:])
            if in_features % (wf.group_size or 1):
                plan.unsupported[name] = (f"group size {wf.group_size} does not divide the {in_features} input "
                                          "features (torchao needs whole groups)")
                continue
        plan.specs[name] = spec
    return plan


def torchao_configs(pmap: PrecisionMap, layer_names: Sequence[str | Layer]) -> dict[str, Any]:
    """fqn -> torchao config object, ready for `quantize_(model, FqnToConfig(...), filter_fn=None)`.

    Pass `Layer` objects (e.g. `Evaluator(...).layers`) rather than names to also leave out the layers
    torchao cannot take (convolutions, embeddings, tied weights); with bare names only the formats are
    checked and `apply_real` rejects non-Linear modules itself.
    """
    return OrderedDict((name, spec.build()) for name, spec in _plan(pmap, layer_names).specs.items())


def torchao_config_dict(pmap: PrecisionMap, layer_names: Sequence[str | Layer]) -> dict[str, Any]:
    """A JSON-able description of the same plan: each layer's config class and its keyword arguments
    (dtypes as "torch.int4", granularities as "PerGroup(32)"), plus the layers left in float and why."""
    torchao, _ = _torchao()
    plan = _plan(pmap, layer_names)
    return {
        "format": "torchao.FqnToConfig",
        "torchao_version": getattr(torchao, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "layers": {name: spec.describe() for name, spec in plan.specs.items()},
        "unsupported": dict(plan.unsupported),
        "notes": [
            "activations: torchao quantizes them dynamically per token, not with the map's calibrated static ranges",
            "weights: torchao picks ranges by min/max (no MSE/percentile clipping)",
        ],
    }


# --- applying the plan ------------------------------------------------------------------------


def _float_copy(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """A private eval-mode copy, with BatchNorm folded (as the analysis does) when the model has any."""
    if isinstance(model, torch.export.ExportedProgram):
        raise TypeError("real kernels need an eager nn.Module (torchao swaps nn.Linear weights); "
                        "pass the model itself rather than its exported program")
    private = copy.deepcopy(model).eval()
    batchnorms = [name for name, m in private.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not batchnorms:
        return private, ()
    from torch.fx.experimental.optimization import fuse

    fused = fuse(private, inplace=True)
    remaining = {name for name, m in fused.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    return fused.eval(), tuple(sorted(set(batchnorms) - remaining))


def analysed_layers(model: nn.Module, fold_batchnorm: bool = True, engine: str = "auto") -> list[Layer]:
    """The layers the analysis finds in `model`, with their kinds and ties: what the plan needs to
    leave convolutions, embeddings and tied weights in float when only the model is at hand.
    `engine` (analysis.config.ENGINES): "hooks" lists them from the module tree as the hook engine
    sees them (`analysis.hooks.module_layers`); "auto" does so, with a one-line warning, for an
    nn.Module that cannot be traced."""
    import warnings

    from analysis.graph import ModelPreparationError, prepare_model
    from analysis.hooks import module_layers
    from analysis.layers import discover_layers
    from analysis.quantsim import QuantlensWarning

    if engine == "hooks" and isinstance(model, nn.Module):
        return module_layers(model)
    try:
        return discover_layers(prepare_model(model, fold_batchnorm=fold_batchnorm)).layers
    except ModelPreparationError as exc:
        if engine == "graph" or not isinstance(model, nn.Module):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(f"the graph engine cannot trace this model ({reason}); its layers are listed from its modules, "
                      "as the hook engine sees them", QuantlensWarning, stacklevel=2)
        return module_layers(model)


def simulator_float_copy(sim: Any, model: Any) -> tuple[nn.Module, tuple[str, ...]]:
    """A private float model for torchao from the simulator's own prepared graph (the same trace and
    BatchNorm fold the sweep measured), or an eager copy when the simulator runs an exported
    program (no nn.Linear modules for torchao to swap there)."""
    if sim.prepared.source == "fx":
        prepared, _ = sim.trainable_copy()
        return prepared.graph_module.eval(), tuple(prepared.folded_batchnorms)
    if sim.engine == "hooks":  # the eager model, BatchNorm unfolded as the hook engine analyses it
        return copy.deepcopy(model).eval(), ()
    return _float_copy(model)


def apply_real(model: nn.Module, pmap: PrecisionMap, layers: list[Layer] | None = None, *,
               base: nn.Module | None = None) -> tuple[nn.Module, dict[str, str]]:
    """A quantized copy of `model` running `pmap` on torchao kernels, and {layer: reason} for every
    layer the map quantizes that stays in float. The input model is never modified; `base`, a private
    float copy (e.g. `simulator_float_copy`), is quantized in place instead when given."""
    _, tq = _torchao()
    layers = layers if layers is not None else analysed_layers(model)
    quantized = base if base is not None else _float_copy(model)[0]
    first = next(iter(quantized.parameters()), None)
    plan = _plan(pmap, layers, first.device if first is not None else "cpu")
    left = dict(plan.unsupported)
    modules = dict(quantized.named_modules())
    for name, spec in plan.specs.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            left[name] = f"{type(module).__name__ if module is not None else 'no module'} at {name}: torchao quantizes nn.Linear modules"
            continue
        if spec.block is not None and module.weight.dtype != torch.bfloat16:
            left[name] = f"torchao's MX/NVFP4 configs take bf16 weights; {name} is {module.weight.dtype} (load the model in bf16)"
            continue
        try:
            tq.quantize_(quantized, spec.build(), filter_fn=lambda m, fqn, target=name: fqn == target)
        except Exception as exc:  # noqa: BLE001 — one layer torchao refuses must not sink the others
            left[name] = f"torchao {spec.config} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return quantized, left
