"""Run a precision map on real low-precision CPU kernels (torchao) and measure what it delivers.

The simulated path (analysis.evaluate) fake-quantizes; this one swaps each `nn.Linear` weight for a
torchao quantized tensor and runs torchao's kernels, so the figures are what a deployment gets:
actual bytes of the quantized tensors, measured latency, and how far the real output is from the
simulated one.

What runs on CPU with torchao 0.18 (x86, the pip wheel without torchao's C++ CPU kernels), as probed
by `probe_cpu_support()`:

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
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import statistics
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import nn

from analysis import costs
from analysis.data import Dataset
from analysis.evaluate import Evaluation, Evaluator, metric_drop, task_metric
from analysis.formats import Format
from analysis.layers import Layer
from analysis.metrics import ErrorAccumulator, compare
from analysis.precision_map import LayerPrecision, PrecisionMap
from analysis.config import QuantConfig

__all__ = [
    "torchao_configs", "torchao_config_dict", "apply_real", "evaluate_real", "probe_cpu_support",
    "weight_storage_bytes", "RealPlan",
]

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

    def build(self) -> Any:
        _, tq = _torchao()
        cls = getattr(tq, self.config)
        kwargs = {}
        for key, value in self.kwargs.items():
            kwargs[key] = _decode(value, tq)
        return cls(**kwargs)

    def describe(self) -> dict[str, Any]:
        return {"config": self.config, **self.kwargs, "kernel": self.kernel,
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


def _spec_for(wf: Format | None, af: Format | None, precision: LayerPrecision) -> _Spec | str:
    """The torchao config for one (weight, activation) pair, or the reason there is none."""
    w_name, a_name = precision.weight, precision.activation
    if wf is None:
        if af is not None:
            return "torchao has no activation-only config (the weight stays float, so the layer does too)"
        return "fp32 in the map"
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


def _plan(pmap: PrecisionMap, layer_names: Sequence[str | Layer]) -> RealPlan:
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


def _discover(model: nn.Module, fold_batchnorm: bool = True) -> list[Layer]:
    from analysis.graph import prepare_model
    from analysis.layers import discover_layers

    return discover_layers(prepare_model(model, fold_batchnorm=fold_batchnorm)).layers


def apply_real(model: nn.Module, pmap: PrecisionMap, layers: list[Layer] | None = None) -> tuple[nn.Module, dict[str, str]]:
    """A quantized copy of `model` running `pmap` on torchao kernels, and {layer: reason} for every
    layer the map quantizes that stays in float. The input model is never modified."""
    _, tq = _torchao()
    layers = layers if layers is not None else _discover(model)
    plan = _plan(pmap, layers)
    quantized, _ = _float_copy(model)
    left = dict(plan.unsupported)
    modules = dict(quantized.named_modules())
    for name, spec in plan.specs.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            left[name] = f"{type(module).__name__ if module is not None else 'no module'} at {name}: torchao quantizes nn.Linear modules"
            continue
        try:
            tq.quantize_(quantized, spec.build(), filter_fn=lambda m, fqn, target=name: fqn == target)
        except Exception as exc:  # noqa: BLE001 — one layer torchao refuses must not sink the others
            left[name] = f"torchao {spec.config} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return quantized, left


def weight_storage_bytes(tensor: torch.Tensor, seen: set[int] | None = None) -> int:
    """Bytes a tensor actually holds, looking inside torchao tensor subclasses (codes, scales, zero
    points); storages already counted in `seen` count once."""
    seen = set() if seen is None else seen
    if tensor is None:
        return 0
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(weight_storage_bytes(getattr(tensor, n), seen) for n in names)
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    storage = data.untyped_storage()
    key = storage.data_ptr()
    if key in seen and key != 0:
        return 0
    seen.add(key)
    return storage.nbytes()


def _code_bits(tensor: torch.Tensor) -> int:
    """Bits per element the weight codes are stored with (int4 stored unpacked in int8 counts 8)."""
    if hasattr(tensor, "qdata"):
        return tensor.qdata.element_size() * 8
    return tensor.element_size() * 8


def _layer_bytes(model: nn.Module, layers: list[Layer]) -> tuple[float, float]:
    """(bytes, parameter-weighted code bits) of the analysed layers' weights and biases in `model`."""
    modules = dict(model.named_modules())
    seen: set[int] = set()
    total = bits = elements = 0
    for layer in layers:
        module = modules.get(layer.name)
        weight = getattr(module, "weight", None) if module is not None else None
        if weight is None:  # functional / attention layers: count them at their FP32 size
            total += layer.params * 4
            n = math.prod(layer.weight_shape)
            bits, elements = bits + 32 * n, elements + n
            continue
        total += weight_storage_bytes(weight, seen) + weight_storage_bytes(getattr(module, "bias", None), seen)
        n = math.prod(layer.weight_shape)
        bits, elements = bits + _code_bits(weight) * n, elements + n
    return float(total), bits / max(elements, 1)


def _model_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(weight_storage_bytes(t, seen) for t in tensors)


# --- evaluation -------------------------------------------------------------------------------


def _forward(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    from analysis.graph import primary_output

    with torch.inference_mode():
        return torch.cat([primary_output(model(inputs[i:i + batch_size])) for i in range(0, len(inputs), batch_size)])


def _time_pair(models: list[nn.Module], inputs: torch.Tensor, batch_size: int, warmup: int, repeats: int) -> list[float]:
    """Median seconds for one pass over `inputs`, per model; runs interleaved so that load drifting on
    a shared machine hits every model alike."""
    for _ in range(warmup):
        for model in models:
            _forward(model, inputs, batch_size)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for index, model in enumerate(models):
            started = time.perf_counter()
            _forward(model, inputs, batch_size)
            times[index].append(time.perf_counter() - started)
    return [statistics.median(t) for t in times]


@contextlib.contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[int]:
    """torch's intra-op thread count set to `threads` inside the block (None: left as it is), and
    the caller's count put back on every way out: the setting is process-wide, so a timing run
    must not leave the caller's own work on a different number of threads."""
    saved = torch.get_num_threads()
    if threads is None or threads == saved:
        yield saved  # nothing changed, so nothing to put back (set_num_threads also resets MKL/OpenMP)
        return
    try:
        torch.set_num_threads(threads)
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)


def _sim_config(pmap: PrecisionMap, matched: bool) -> QuantConfig:
    if matched:  # what torchao does: min/max weight ranges, dynamic per-token activations
        return replace(pmap.quant, weight_calibration="minmax", dynamic_activations=True, fold_batchnorm=True)
    return pmap.quant


def evaluate_real(model: nn.Module, calibration: Dataset, evaluation: Dataset | None, pmap: PrecisionMap,
                  label: str = "map (real)", *, batch_size: int = 256, warmup: int = 2, repeats: int = 7,
                  threads: int | None = None) -> Evaluation:
    """Run `pmap` on torchao's CPU kernels and measure it (path="real").

    Task metric and output error vs FP32 on `evaluation`; actual bytes of the analysed layers' stored
    tensors (torchao internals included); latency per sample as the median of `repeats` timed passes
    over the evaluation data after `warmup` passes, interleaved with the same passes of the FP32 copy
    (`threads` pins torch's intra-op threads while timing: on a busy machine more threads than free
    cores makes timings bimodal).
    extra: sim_vs_real_sqnr_db (the real output against the like-for-like simulation: min/max weights,
    dynamic per-token activations, only the layers that really run quantized),
    sim_map_vs_real_sqnr_db (against the simulation with the map's own calibration), FP32 latency and
    bytes for ratios, and the layers left in float with their reasons.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer (or None for torch's setting), got {threads!r}")
    evaluation = evaluation or calibration
    evaluator = Evaluator(model, calibration, evaluation, _sim_config(pmap, matched=True))
    layers = evaluator.layers
    plan = _plan(pmap, layers)
    quantized, left = apply_real(model, pmap, layers)
    fp32_copy, folded = _float_copy(model)
    full = pmap.assignment(evaluator.layer_names)
    real_assignment = {name: full[name] for name in plan.specs if name not in left}

    inputs = evaluation.inputs
    real_out = _forward(quantized, inputs, batch_size)
    reference = evaluator.reference
    acc = ErrorAccumulator(evaluation.logits)
    acc.update(reference, real_out)
    name, value = task_metric(evaluation.task, real_out, evaluation.labels)

    simulated = evaluator.sim.forward(inputs, real_assignment)
    extra: dict[str, Any] = {"sim_vs_real_sqnr_db": compare(simulated, real_out).sqnr_db}
    map_config = _sim_config(pmap, matched=False)
    if map_config != evaluator.config:
        map_sim = Evaluator(model, calibration, evaluation, map_config).sim.forward(inputs, pmap.assignment(evaluator.layer_names))
        extra["sim_map_vs_real_sqnr_db"] = compare(map_sim, real_out).sqnr_db

    with _intra_op_threads(threads) as used_threads:
        fp32_seconds, real_seconds = _time_pair([fp32_copy, quantized], inputs, batch_size, warmup, repeats)
    real_bytes, code_bits = _layer_bytes(quantized, layers)
    fp32_bytes, _ = _layer_bytes(fp32_copy, layers)
    cost = {"avg_weight_bits": code_bits, "weight_bytes": real_bytes,
            "bops": costs.model_cost(layers, real_assignment).bops}
    extra.update({
        "fp32_weight_bytes": fp32_bytes,
        "size_ratio_vs_fp32": fp32_bytes / real_bytes if real_bytes else None,
        "model_bytes": _model_bytes(quantized),
        "fp32_model_bytes": _model_bytes(fp32_copy),
        "fp32_latency_ms_per_sample": 1000 * fp32_seconds / len(inputs),
        "speedup_vs_fp32": fp32_seconds / real_seconds if real_seconds > 0 else None,
        "latency_batch_size": batch_size,
        "threads": used_threads,
        "real_layers": {n: plan.specs[n].config for n in real_assignment if n in plan.specs},
        "left_in_float": dict(left),
    })
    notes = [f"torchao {_torchao()[0].__version__} CPU kernels; latency: median of {repeats} passes "
             f"(batch {batch_size}, {used_threads} threads) after {warmup} warm-up passes"]
    if folded:
        notes.append(f"BatchNorm folded before quantizing: {', '.join(folded)}")
    if any("Intx" in plan.specs[n].config for n in real_assignment):
        notes.append("torchao's Intx configs store sub-8-bit codes unpacked, one per int8 byte: no size gain over int8 on CPU")
    if any(af is not None for _, af in real_assignment.values()):
        notes.append("activations are quantized dynamically per token by torchao (the simulated comparison does the same)")
    if left:
        notes.append(f"{len(left)} layer(s) left in float: " + "; ".join(f"{k}: {v}" for k, v in list(left.items())[:3])
                     + (" ..." if len(left) > 3 else ""))
    if extra["speedup_vs_fp32"] is not None and extra["speedup_vs_fp32"] < 1.0:
        notes.append(f"the quantized model is slower than FP32 on this CPU ({extra['speedup_vs_fp32']:.2f}x)")
    return Evaluation(
        label, "real", name, value, metric_drop(name, evaluator.fp32_metric, value), acc.result(), cost,
        1000 * real_seconds / len(inputs), notes=tuple(notes), extra=extra,
    )


def probe_cpu_support(in_features: int = 64, out_features: int = 32) -> dict[str, str]:
    """Which torchao configs quantize and run a small fp32 nn.Linear on this machine: {config: "ok" | error}."""
    _, tq = _torchao()
    candidates: dict[str, Any] = {
        "Int8WeightOnlyConfig": lambda: tq.Int8WeightOnlyConfig(set_inductor_config=False),
        "Int8DynamicActivationInt8WeightConfig": lambda: tq.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
        "IntxWeightOnlyConfig(int4, PerGroup(32))": lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(32)),
        "IntxWeightOnlyConfig(int4, PerAxis(0))": lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerAxis(0)),
        "Int8DynamicActivationIntxWeightConfig(int4)": lambda: tq.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4),
    }
    from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

    for fmt in Int4PackingFormat:
        candidates[f"Int4WeightOnlyConfig({fmt.value})"] = (
            lambda fmt=fmt: tq.Int4WeightOnlyConfig(group_size=32, int4_packing_format=fmt, set_inductor_config=False))
    # Seeded from a generator of its own: a probe must not move the caller's global RNG stream.
    generator = torch.Generator().manual_seed(0)
    base = nn.utils.skip_init(nn.Linear, in_features, out_features)  # nn.Linear's init draws globally
    bound = 1 / math.sqrt(in_features)
    with torch.no_grad():
        base.weight.uniform_(-bound, bound, generator=generator)
        base.bias.uniform_(-bound, bound, generator=generator)
    x = torch.randn(4, in_features, generator=generator)
    result = {}
    for name, make in candidates.items():
        linear = copy.deepcopy(base)
        try:
            tq.quantize_(linear, make())
            with torch.inference_mode():
                linear(x)
            result[name] = "ok"
        except Exception as exc:  # noqa: BLE001
            result[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    return result
