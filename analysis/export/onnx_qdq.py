"""A QDQ ONNX model of the map, made by ONNX Runtime's `quantize_static` with our numbers pinned."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from analysis.export.onnx_graph import export_fp32_onnx
from analysis.export.ort import INT4_INT16_MIN_OPSET, QDQ_MIN_OPSET, ort_quant_type, ort_quantize_kwargs, to_ort_overrides
from analysis.export.params import build_sim, quantization_parameters, reject_dynamic
from analysis.export.registry import ExportError, Target, register

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import torch

    from analysis.precision_map import PrecisionMap
    from analysis.quantsim import QuantSim


class _Reader:
    """onnxruntime CalibrationDataReader over our calibration inputs (ORT still runs calibration,
    even though our overrides pin every range it would use)."""

    def __init__(self, input_name: str, inputs: torch.Tensor, batch: int) -> None:
        self.batches = [inputs[i:i + batch].numpy() for i in range(0, len(inputs), batch)]
        self.input_name = input_name
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0

    def __len__(self) -> int:
        return len(self.batches)


def export_qdq_onnx(model: Any, sim: QuantSim, pmap: PrecisionMap, path: str | Path, opset: int = 21, *,
                    fp32_onnx: str | Path | None = None, dynamo: bool = True) -> Path:
    """A QDQ ONNX model of the map, made by ONNX Runtime's `quantize_static` with our numbers pinned.

    Steps: export FP32 ONNX (`export_fp32_onnx`, or reuse `fp32_onnx`, which must come from the same
    analysed graph); map layers to nodes via their weight initializers; quantize with
    `to_ort_overrides(..., sim=sim)`: every weight's per-channel (or per-tensor) scale and
    zero point and every quantized input's scale/zero point are pinned through TensorQuantOverrides,
    so ORT's MinMax calibration decides nothing; only the map's quantized layers are touched
    (`nodes_to_quantize`; FP32 layers in `nodes_to_exclude`). Biases become int32 with scale
    input_scale x weight_scale, as ORT's kernels expect (error far below the int8 noise).
    Weight-only layers and fp32-weight layers then get their float input/weight back.

    Unsupported (ExportError): fp8/fp16/bf16 formats, bit widths other than 4/8/16, per-group
    weights, dynamic activations, and 4/16-bit types below opset 21.
    """
    import onnx
    from onnxruntime.quantization import quantize_static

    path = Path(path)
    if opset < QDQ_MIN_OPSET:
        raise ExportError(f"QDQ export needs opset >= {QDQ_MIN_OPSET} (per-channel DequantizeLinear); got {opset}")
    params = quantization_parameters(sim, pmap)
    reject_dynamic(params, "a static QDQ ONNX model")
    for layer, entry in params.items():  # fail before the slow export
        if entry["weight"] is not None:
            ort_quant_type(entry["weight"], "weight", layer)
        for act in entry["activations"]:
            ort_quant_type(act, "activation", layer)
            if opset < INT4_INT16_MIN_OPSET and act["bits"] != 8:
                raise ExportError(f"{act['bits']}-bit QDQ needs opset >= 21 (layer {layer}); pass opset=21")
        if entry["weight"] is not None and opset < INT4_INT16_MIN_OPSET and entry["weight"]["bits"] != 8:
            raise ExportError(f"{entry['weight']['bits']}-bit QDQ needs opset >= 21 (layer {layer}); pass opset=21")

    with tempfile.TemporaryDirectory(prefix="quantlens-onnx-") as tmp:
        if fp32_onnx is None:
            fp32_onnx = export_fp32_onnx(sim, Path(tmp) / "fp32.onnx", opset, model=model, dynamo=dynamo)
        fp32 = onnx.load(str(fp32_onnx))
        overrides = to_ort_overrides(pmap, fp32, sim=sim)  # also renames folded MatMul weights
        prepared = Path(tmp) / "prepared.onnx"
        onnx.save(fp32, str(prepared))
        graph_inputs = {i.name for i in fp32.graph.initializer}
        input_name = next(i.name for i in fp32.graph.input if i.name not in graph_inputs)
        kwargs = ort_quantize_kwargs(overrides)
        if not kwargs["nodes_to_quantize"]:
            onnx.save(fp32, str(path))  # nothing quantized: the FP32 model is the answer
            return path
        reader = _Reader(input_name, sim.data.inputs, 64)
        with _without_ort_notes():
            quantize_static(str(prepared), str(path), reader, **kwargs)
        quantized = onnx.load(str(path))
        _restore_float_inputs(quantized, fp32, overrides)
        onnx.save(quantized, str(path))
    return path


class _DropOrtNotes(logging.Filter):
    """Drops the records below ERROR that onnxruntime.quantization's own files log."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.prefix = os.path.join(directory, "")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(self.prefix)


class _AsIfNoHandler(logging.Handler):
    """Does what logging does for a record no handler takes (hand it to `logging.lastResort`), so a
    root logger without handlers behaves as before while it holds this one."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.lastResort is not None and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)


@contextlib.contextmanager
def _without_ort_notes() -> Iterator[None]:
    """Hide the notes ORT's quantizer logs on every call ("consider pre-processing", ...) without
    changing the root logger's level or handlers, which belong to the application.

    onnxruntime.quantization logs through the root logger itself (`logging.warning(...)`), so there
    is no ORT logger to quieten: for the duration of the call, a filter on the root logger drops
    records below ERROR whose source file is in onnxruntime/quantization; everything else logged
    meanwhile (other threads included) passes. `logging.warning()` also runs `basicConfig()` (a
    stderr handler on the root, for good) when the root has no handler: a stand-in handler that
    behaves like "no handler" prevents that, and is removed afterwards.
    """
    import onnxruntime.quantization

    root = logging.getLogger()
    notes = _DropOrtNotes(os.path.dirname(onnxruntime.quantization.__file__))
    stand_in = _AsIfNoHandler() if not root.handlers else None
    root.addFilter(notes)
    if stand_in is not None:
        root.addHandler(stand_in)
    try:
        yield
    finally:
        root.removeFilter(notes)
        if stand_in is not None:
            root.removeHandler(stand_in)


def _restore_float_inputs(model: "onnx.ModelProto", fp32: "onnx.ModelProto", overrides: dict[str, Any]) -> None:
    """Give weight-only layers their float input back, and fp32-weight layers their float weight,
    by bypassing the Q/DQ pair ORT inserted; Q/DQ nodes and initializers left unused are removed."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    by_name = {node.name: node for node in graph.node}
    float_inits = {init.name: init for init in fp32.graph.initializer}
    have_inits = {init.name for init in graph.initializer}

    def source_of(tensor: str) -> str:
        dq = producers.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return tensor
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return q.input[0]
        return dq.input[0]

    changed = False
    for layer, info in overrides["layers"].items():
        for node_name in info["nodes"]:
            node = by_name.get(node_name)
            if node is None:
                continue
            if info["weight_only"]:
                node.input[0] = source_of(node.input[0])
                changed = True
            if info["weight_float"]:
                weight = info["weight"]
                node.input[1] = weight
                if weight not in have_inits:
                    graph.initializer.append(copy.deepcopy(float_inits[weight]))
                    have_inits.add(weight)
                changed = True
    if changed:
        _prune(graph)


def _prune(graph: Any) -> None:
    """Drop nodes whose outputs nobody reads (repeatedly), then unused initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {name for node in graph.node for name in node.input}
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = outputs | {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _export_onnx(pmap: PrecisionMap, out_path: Path, *, model: Any = None, calibration: Any = None,
                 opset: int = 21, dynamo: bool = True, engine: str | None = None, **_: Any) -> Path:
    sim = build_sim(pmap, model, calibration, engine)
    return export_qdq_onnx(model if not isinstance(model, str) else None, sim, pmap, out_path, opset, dynamo=dynamo)


register(Target("onnx", "QDQ ONNX model", "QDQ ONNX model (ONNX Runtime quantize_static, our scales pinned)",
                "model.qdq.onnx", _export_onnx, model="required", calibration="required"))
