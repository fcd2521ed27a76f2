"""ONNX graphs of the analysed model: the FP32 export, and which node consumes which layer's weight.

Shared by the ORT overrides (tensor names), the QDQ export and the AIMET activation names.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.data import NamedInputs
from analysis.export.registry import ExportError

if TYPE_CHECKING:  # onnx is an optional dependency ("real" extra); torch/numpy load on first use
    import numpy as np
    import onnx
    import torch

    from analysis.quantsim import QuantSim

# ONNX ops whose second input is a layer weight: the only ops the QDQ export quantizes, so that ORT
# adds Q/DQ exactly where the simulation quantizes (a layer's input and weight) and nowhere else.
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class OnnxLayer:
    """Where one analysed layer lives in an ONNX graph."""

    weight: str  # initializer name
    nodes: list[str] = field(default_factory=list)  # consuming MatMul/Gemm/Conv nodes, graph order
    activations: list[str] = field(default_factory=list)  # input tensor of each of those nodes
    axis: int = 0  # output-channel axis of the initializer
    transposed: bool = False  # the initializer holds the transpose of the PyTorch weight (MatMul)


def load_onnx(model: "onnx.ModelProto | str | Path") -> "onnx.ModelProto":
    import onnx

    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def match_onnx_layers(model: "onnx.ModelProto", sim: QuantSim | None = None, *, rename: bool = True,
                      layer_params: dict[str, str] | None = None) -> dict[str, OnnxLayer]:
    """Map layers to the ONNX nodes consuming their weight initializer.

    With a simulator, an initializer matches a layer by name (the PyTorch parameter name, what both
    exporters keep for Gemm/Conv) or, failing that, by value: the dynamo exporter folds the transpose
    of a MatMul weight into a new constant ("val_0"); `rename` renames such initializers (in place)
    to the parameter name so overrides and encodings share one name. Without a simulator, layers are
    found by name from `layer_params` (layer -> parameter name) or, if None, from every initializer
    feeding a MatMul/Gemm/Conv ("fc1.weight" -> layer "fc1").
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        if node.op_type in LAYER_OPS and len(node.input) > 1:
            consumers.setdefault(node.input[1], []).append(node)
    initializers = {init.name: init for init in graph.initializer}
    result: dict[str, OnnxLayer] = {}

    if sim is None:
        if layer_params is None:
            layer_params = {}
            for name in consumers:
                if name in initializers:
                    layer = name[: -len(".weight")] if name.endswith(".weight") else name
                    layer_params[layer] = name
        for layer, param in layer_params.items():
            if param in consumers and param in initializers:
                nodes = consumers[param]
                axis = 1 if nodes[0].op_type == "MatMul" or (nodes[0].op_type == "Gemm" and not _gemm_trans_b(nodes[0])) \
                    or nodes[0].op_type == "ConvTranspose" else 0
                result[layer] = OnnxLayer(param, [n.name for n in nodes], [n.input[0] for n in nodes], axis)
        return result

    names = sim.param_names()
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(initializers[name])
        return arrays[name]

    candidates = [name for name in consumers if name in initializers]
    for layer in sim.layers:
        w = sim.table.weight(layer.name).detach().float().numpy()
        param = names[layer.name]
        found, transposed = None, False
        order = ([param] if param in candidates else []) + [c for c in candidates if c != param]
        for name in order:
            a = array(name)
            if a.shape == w.shape and np.array_equal(a, w):
                found = name
                break
            if w.ndim == 2 and a.shape == w.T.shape and np.array_equal(a, w.T):
                found, transposed = name, True
                break
        if found is None:
            continue
        if rename and found != param and param not in initializers and param not in arrays:
            _rename_tensor(graph, found, param)
            initializers[param] = initializers.pop(found)
            consumers[param] = consumers.pop(found)
            arrays[param] = arrays.pop(found)
            candidates[candidates.index(found)] = param
            found = param
        nodes = consumers[found]
        axis = (1 - layer.channel_axis) if transposed else layer.channel_axis
        result[layer.name] = OnnxLayer(found, [n.name for n in nodes], [n.input[0] for n in nodes], axis, transposed)
    return result


def _gemm_trans_b(node: Any) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


def _rename_tensor(graph: Any, old: str, new: str) -> None:
    for init in graph.initializer:
        if init.name == old:
            init.name = new
    for value in list(graph.input) + list(graph.value_info):
        if value.name == old:
            value.name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


@functools.cache
def _wrapper_class() -> type[torch.nn.Module]:
    """The wrapper the TorchScript fallback exports, made on first use so that importing this module
    does not import torch."""
    import torch

    class _Wrapped(torch.nn.Module):
        """The TorchScript exporter reads `model.graph` as a TorchScript graph; an fx GraphModule's own
        `graph` attribute confuses it, so the fallback exports a thin wrapper."""

        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args: Any) -> Any:
            return self.module(*args)

    return _Wrapped


def _exported(module: Any, example: tuple, batch: Any) -> Any:
    """The hook engine's eager model as a torch.export program, or ExportError in one line (what
    torch prints about the failed graph is held back: the refusal names what to do)."""
    import contextlib
    import io
    import logging

    import torch

    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return torch.export.export(module, example, dynamic_shapes=({0: batch},))
    except Exception as exc:  # noqa: BLE001 — torch.export's reasons are many; its type names them
        raise ExportError(f"ONNX needs a graph of the model, and torch.export cannot capture this one "
                          f"({type(exc).__name__}); the hook engine runs it eagerly, which ONNX cannot: make forward "
                          "exportable (torch.cond for data-dependent branches), or export --to aimet, torchao, "
                          "compressed-tensors or modelopt") from None
    finally:
        shapes_log.setLevel(level)


def export_fp32_onnx(sim: QuantSim, path: str | Path, opset: int = 21, *, model: Any = None,
                     dynamo: bool = True) -> Path:
    """FP32 ONNX of the analysed graph, batch dimension dynamic.

    The analysed graph module is exported (not the original model) so that BatchNorm is folded
    exactly as in the analysis: the weights ONNX Runtime quantizes are the ones we calibrated.
    `dynamo=True` (torch.export based, torch's default) is tried first; the TorchScript exporter is
    the fallback. `model` is exported instead only if the graph module cannot be. A hook-engine
    simulator's model (`sim.engine == "hooks"`) is exported with torch.export only, and refused in one
    line when it cannot be captured (TorchScript's tracer would keep only the branches taken).
    """
    import torch

    path = Path(path)
    if isinstance(sim.data.inputs, NamedInputs):
        raise ExportError(
            f"ONNX export takes one input tensor, but the data passes {', '.join(sim.data.inputs.names)} by name; "
            "export a single-input wrapper of the model, or use another export target (torchao, compressed-tensors, "
            "modelopt, aimet)")
    example = (sim.data.inputs[:2],)
    errors = []
    batch = torch.export.Dim("batch")
    # The hook engine's model is not a graph: only torch.export captures it faithfully or fails;
    # TorchScript's tracer would record the branches the example took, silently.
    hooks = sim.engine == "hooks"
    sources: list[Any] = [_exported(sim.gm, example, batch)] if hooks else [sim.gm] + ([model] if model is not None else [])
    for source in sources:
        if dynamo or hooks:
            try:
                torch.onnx.export(source, example, str(path), dynamo=True, opset_version=opset,
                                  dynamic_shapes=None if hooks else ({0: batch},), verbose=False)
                return path
            except Exception as exc:  # noqa: BLE001 — fall back to the TorchScript exporter
                errors.append(f"dynamo: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if isinstance(source, torch.nn.Module) and not hooks:
            try:
                torch.onnx.export(_wrapper_class()(source), example, str(path), dynamo=False, opset_version=opset,
                                  input_names=["x"], output_names=["output"],
                                  dynamic_axes={"x": {0: "batch"}, "output": {0: "batch"}})
                return path
            except Exception as exc:  # noqa: BLE001
                errors.append(f"torchscript: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise ExportError(f"could not export the model to ONNX ({'; '.join(errors)})")
