"""Measuring a map on real torchao kernels: what a deployment gets, against FP32 and the simulation.

`evaluate_real` applies the plan (`analysis.real.plan`) and measures the result: the task metric
and output error, the actual bytes of the quantized tensors (looking inside torchao's tensor
subclasses), latency timed interleaved with an FP32 copy, and how far the real output is from the
like-for-like simulation. `probe_cpu_support` reports which torchao configs run on this machine at
all. Kept apart from the plan because only this half runs models, times them and changes
process-wide settings (torch's thread count, for the duration of a timing run).
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from analysis import costs
from analysis.config import QuantConfig
from analysis.data import Dataset, Inputs, call_model
from analysis.evaluate import Evaluation, Evaluator, metric_drop, task_metric
from analysis.provenance import Provenance, engine_for
from analysis.layers import Layer
from analysis.metrics import ErrorAccumulator, compare
from analysis.precision_map import PrecisionMap
from analysis.real.plan import _plan, _torchao, apply_real, simulator_float_copy


# --- storage ----------------------------------------------------------------------------------


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


def _forward(model: nn.Module, inputs: Inputs, batch_size: int) -> torch.Tensor:
    from analysis.graph import primary_output

    with torch.inference_mode():
        return torch.cat([primary_output(call_model(model, inputs[i:i + batch_size]))
                          for i in range(0, len(inputs), batch_size)])


def _time_pair(models: list[nn.Module], inputs: Inputs, batch_size: int, warmup: int, repeats: int) -> list[float]:
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
                  threads: int | None = None, engine: str | None = None) -> Evaluation:
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
    `engine` (analysis.config.ENGINES): what runs the simulation; None: the engine the map's analysis
    used (its provenance), else "auto". With the hook engine BatchNorm stays unfolded on both paths.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer (or None for torch's setting), got {threads!r}")
    evaluation = evaluation or calibration
    engine = engine_for(engine, Provenance.from_dict(pmap.provenance))
    evaluator = Evaluator(model, calibration, evaluation, _sim_config(pmap, matched=True), engine=engine)
    layers = evaluator.layers
    plan = _plan(pmap, layers)
    # Both copies come from the simulator's prepared graph: one trace, one BatchNorm fold for
    # simulated and real paths alike.
    quantized, left = apply_real(model, pmap, layers, base=simulator_float_copy(evaluator.sim, model)[0])
    fp32_copy, folded = simulator_float_copy(evaluator.sim, model)
    full = pmap.assignment(evaluator.layer_names)
    real_assignment = {name: full[name] for name in plan.specs if name not in left}

    inputs = evaluation.inputs
    real_out = _forward(quantized, inputs, batch_size)
    reference = evaluator.reference
    acc = ErrorAccumulator(evaluation.logits)
    acc.update(reference, real_out, evaluation.token_mask())
    name, value = task_metric(evaluation.task, real_out, evaluation.labels)

    simulated = evaluator.sim.forward(inputs, real_assignment)
    extra: dict[str, Any] = {"sim_vs_real_sqnr_db": compare(simulated, real_out).sqnr_db}
    map_config = _sim_config(pmap, matched=False)
    if map_config != evaluator.config:
        map_sim = Evaluator(model, calibration, evaluation, map_config, engine=evaluator.sim.engine).sim.forward(inputs, pmap.assignment(evaluator.layer_names))
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
