"""A private, traced copy of the user's model that can be run node by node.

Why a graph and not hooks: the isolation sweep has to answer "what does the model output when only
this layer is quantized?" for every layer × format. Running the whole model for each trial wastes
the half of the network that sits before the layer. With an FX graph we cache every node's FP32
value once and, for a trial, re-execute only the nodes that depend on the quantized layer.

The copy is ours to change: BatchNorm is folded into the preceding convolution (as deployment
toolchains do) and in-place ops are made out-of-place, because an in-place ReLU during a trial would
silently overwrite a cached FP32 activation that later trials read.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from analysis.data import POSITIONAL, Inputs, NamedInputs


class ModelPreparationError(ValueError):
    """The model cannot be traced or prepared for analysis."""


_INPLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}
_INPLACE_FUNCTIONS = {torch.relu_: torch.relu, torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh}


@dataclass
class PreparedModel:
    """The traced copy plus what the sweep needs to know about its graph."""

    graph_module: torch.fx.GraphModule
    source: str  # "fx" (symbolic trace of an eager model) or "export" (torch.export program)
    nodes: list[torch.fx.Node] = field(default_factory=list)
    folded_batchnorms: tuple[str, ...] = ()
    # The eager copy before tracing: a traced GraphModule keeps only the submodules its graph calls,
    # and we must still report the ones it dropped.
    eager: nn.Module | None = None

    def __post_init__(self) -> None:
        self.nodes = list(self.graph_module.graph.nodes)
        self.index = {node: i for i, node in enumerate(self.nodes)}
        self.output_node = next(n for n in self.nodes if n.op == "output")

    def descendants(self, roots: Iterable[torch.fx.Node]) -> list[torch.fx.Node]:
        """Every node whose value depends on any root (roots included), in execution order."""
        seen: set[torch.fx.Node] = set()
        stack = list(roots)
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            stack.extend(node.users)
        return sorted(seen, key=self.index.__getitem__)


def prepare_model(
    model: nn.Module | torch.export.ExportedProgram, fold_batchnorm: bool = True,
    example_inputs: Inputs | None = None, share_weights: bool = False,
) -> PreparedModel:
    """Trace a private copy of `model`; the caller's model is never modified.

    Eager models are traced with torch.fx (module calls stay visible, so BatchNorm can be folded and
    layers keep their module types). Models fx cannot trace (shape-dependent Python, e.g. slicing a
    mask by `x.shape[1]`; most Hugging Face models) fall back to torch.export with a dynamic batch
    dimension when `example_inputs` (a tensor or `NamedInputs`, as the data set holds them) are given.

    share_weights: the copy reuses the caller's parameter tensors instead of duplicating them (a
    100M-parameter model then costs its size once, not twice). Only for callers that never write to
    weights, such as the sweep; fine-tuning must not share. Buffers are always copied: a forward
    may write to them (a counter, a cache), and the caller's model must not change.

    The copy is put in eval mode whatever mode the caller's model is in (dropout off, BatchNorm on
    its running statistics); the caller's model keeps its mode.
    """
    if isinstance(model, torch.export.ExportedProgram):
        return _prepare_exported(model)
    if not isinstance(model, nn.Module):
        raise ModelPreparationError(
            f"expected a torch.nn.Module or a torch.export program, got {type(model).__name__}"
        )
    check_names(model)
    private = private_copy(model, share_weights)
    folded: tuple[str, ...] = ()
    try:
        if fold_batchnorm:
            graph_module, folded = _fold_batchnorm(private)
        else:
            graph_module = torch.fx.symbolic_trace(private)
    except Exception as fx_error:  # noqa: BLE001 — tracing failures come in every exception type
        if example_inputs is None:
            raise ModelPreparationError(f"could not trace the model with torch.fx ({_first_line(fx_error)}); "
                                        "export it with torch.export and pass the .pt2 file instead") from None
        try:
            exported = _export(private, example_inputs)
        except Exception as export_error:  # noqa: BLE001
            raise ModelPreparationError(
                f"could not trace the model: torch.fx said {_first_line(fx_error)}; torch.export said "
                f"{_first_line(export_error)}; make forward() traceable (no data-dependent Python control flow)"
            ) from None
        prepared = _prepare_exported(exported)
        prepared.eager = private
        return prepared
    _make_out_of_place(graph_module)
    return PreparedModel(graph_module, "fx", folded_batchnorms=folded, eager=private)


def private_copy(model: nn.Module, share_weights: bool = False) -> nn.Module:
    """The copy of `model` that analysis runs (never the caller's): deep-copied (parameters shared
    when `share_weights`), in eval mode, Hugging Face key/value caches off, in-place modules made
    out of place. Used by `prepare_model` and by the hook engine (`analysis.hooks`)."""
    memo: dict[int, object] = {}
    if share_weights:
        memo = {id(t): t for t in model.parameters()}
    private = copy.deepcopy(model, memo).eval()
    for module in private.modules():
        hf_config = getattr(module, "config", None)
        if getattr(hf_config, "use_cache", False) is True:
            # Hugging Face models return a key/value cache by default: analysis never reads it, and a
            # cache object is not something a traced graph can return. The copy's config is private
            # (encoder-decoders give their decoder stack a config of its own, hence every module).
            hf_config.use_cache = False
    for module in private.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return private


def _export(model: nn.Module, example: Inputs) -> torch.export.ExportedProgram:
    """torch.export with every input's batch dimension dynamic (chunks have other sizes)."""
    args, kwargs = example.call_arguments() if isinstance(example, NamedInputs) else ((example,), {})
    try:
        names = list(inspect.signature(model.forward).bind(*args, **kwargs).arguments)
    except TypeError as exc:
        raise ModelPreparationError(f"the data's inputs do not fit the model's forward ({exc}); name the input "
                                    "arrays after forward's parameters") from None
    dynamic = {name: {0: torch.export.Dim.AUTO} for name in names}
    with contextlib.redirect_stderr(io.StringIO()):  # a failed export prints its whole graph; our error is one line
        return torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic)


# Characters torch.fx cannot put into the Python it generates from module names (it quotes them).
_UNTRACEABLE = ('"', "\\")


def check_names(model: nn.Module) -> None:
    """ModelPreparationError (one line) for a module, parameter or buffer name tracing cannot handle."""
    names = [name for name, _ in model.named_modules()]
    names += [name for name, _ in model.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in model.named_buffers(remove_duplicate=False)]
    for name in names:
        bad = [c for c in name if c in _UNTRACEABLE or ord(c) < 32]
        if bad:
            raise ModelPreparationError(
                f"the model has a submodule or tensor named {name!r}: its character {bad[0]!r} breaks the code "
                "torch.fx and torch.export generate; rename it (letters, digits, _ and - are safe)")


@contextlib.contextmanager
def unchanged(module: nn.Module) -> Iterator[nn.Module]:
    """Run the caller's own module for a moment without changing it: in eval mode, and with every
    buffer and training flag restored afterwards (a forward may update a counter, a cache or
    BatchNorm statistics in place, or replace a buffer)."""
    modes = [(m, m.training) for m in module.modules()]
    saved = [(owner, name, buffer, None if buffer is None else buffer.detach().clone())
             for owner in module.modules() for name, buffer in owner._buffers.items()]
    module.eval()
    try:
        yield module
    finally:
        with torch.no_grad():
            for owner, name, buffer, value in saved:
                if buffer is not None and buffer.shape == value.shape:
                    buffer.copy_(value)  # written in place: the same tensor, as the caller's references expect
                owner._buffers[name] = buffer  # replaced by the forward: the original goes back
        for m, training in modes:
            m.training = training


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _may_mutate(program: torch.export.ExportedProgram) -> bool:
    """Whether `program` may write to a tensor in place: an op whose schema mutates an argument, a
    buffer update in its signature, or anything that is not a plain ATen op or Python operator
    (higher-order ops and submodules hide their bodies' ops) — anything unsure counts as mutating."""
    signature = program.graph_signature
    if getattr(signature, "buffers_to_mutate", None) or getattr(signature, "user_inputs_to_mutate", None):
        return True
    for node in program.graph.nodes:
        if node.op == "call_module":
            return True
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            if target._schema.is_mutable:
                return True
        elif getattr(target, "__module__", None) != "_operator":
            return True
    return False


def _prepare_exported(program: torch.export.ExportedProgram) -> PreparedModel:
    # ep.module() builds a fresh GraphModule with parameters as attributes. Its shape guards pin
    # the batch size used at export time; we run other batch sizes (chunks), so they go.
    # Functionalised first when something in it can write in place: in-place updates (slice
    # assignment, copy_, masked_fill_) become out-of-place operations whose users read the updated
    # value; rewriting them one by one (as for fx graphs) would leave later readers with the value
    # from before the update. A graph of pure ops runs the same either way, and functionalising
    # re-traces the whole program (4.6 s of a 100M GPT's 18 s set-up), so it is skipped there.
    if _may_mutate(program):
        try:
            program = program.run_decompositions({})
        except Exception:  # noqa: BLE001 — an unfunctionalisable program runs as exported; the faithfulness check guards it
            pass
    graph_module = program.module()
    for owner in graph_module.modules():  # the program's own buffers must not see a forward's writes
        for name, buffer in list(owner._buffers.items()):
            if buffer is not None:
                owner._buffers[name] = buffer.clone()
    for node in list(graph_module.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph_module.graph.erase_node(node)
    graph_module.graph.eliminate_dead_code()
    _make_out_of_place(graph_module)
    return PreparedModel(graph_module, "export")


def _fold_batchnorm(model: nn.Module) -> tuple[torch.fx.GraphModule, tuple[str, ...]]:
    """Fold eval-mode BatchNorm into the conv/linear that feeds only it (torch's own fuser does the math),
    then the BatchNorm subclasses that tracing runs through (timm's norm + activation modules)."""
    from torch.fx.experimental.optimization import fuse

    traced = torch.fx.symbolic_trace(model)
    batchnorms = {
        n.target for n in traced.graph.nodes
        if n.op == "call_module" and isinstance(traced.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
    }
    fused = fuse(traced, inplace=True, no_trace=True)
    remaining = {
        n.target for n in fused.graph.nodes
        if n.op == "call_module" and isinstance(fused.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
    }
    folded = (batchnorms - remaining) | set(_fold_functional_batchnorm(fused, model))
    return fused, tuple(sorted(folded))


# Attributes of a tensor that say nothing about its values: a node reading only these (timm asserts
# `x.ndim == 4` on a convolution's output) still holds after the convolution's output changes.
_SHAPE_ATTRIBUTES = frozenset({"ndim", "shape", "dtype", "device"})
_SHAPE_METHODS = frozenset({"dim", "size"})
_FOLDABLE_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _fold_functional_batchnorm(gm: torch.fx.GraphModule, model: nn.Module) -> list[str]:
    """Fold BatchNorm modules that tracing ran through into the convolution feeding them; returns their names.

    torch.fx traces a BatchNorm subclass from outside torch.nn (timm's `BatchNormAct2d`: BatchNorm,
    then dropout and an activation, in one module) as an `F.batch_norm` call on the module's own
    buffers, followed by its activation's module call. Deployment folds the normalisation into the
    convolution and keeps the activation; so does this: the convolution gets the folded weight and
    bias, the `F.batch_norm` node goes, and the activation now reads the convolution directly.
    Folded only where that is exact: eval-mode statistics of a `_BatchNorm` module, on the output
    of a plain convolution that nothing else reads (shape checks aside). `model` is what `gm` was
    traced from: a traced module keeps only the tensors of the modules tracing ran through."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    signature = inspect.signature(F.batch_norm)
    folded: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.batch_norm:
            continue
        try:
            bound = signature.bind(*node.args, **node.kwargs)
        except TypeError:
            continue
        bound.apply_defaults()
        arguments = bound.arguments
        conv_node, stats = arguments["input"], arguments["running_mean"]
        if not (isinstance(conv_node, torch.fx.Node) and conv_node.op == "call_module"
                and isinstance(stats, torch.fx.Node) and stats.op == "get_attr"):
            continue
        conv = gm.get_submodule(conv_node.target)
        owner = stats.target.rpartition(".")[0]
        bn = _submodule(model, owner)
        if not (isinstance(conv, _FOLDABLE_CONVS) and isinstance(bn, nn.modules.batchnorm._BatchNorm)
                and arguments["training"] is False and arguments["eps"] == bn.eps
                and bn.running_mean is not None and bn.running_var is not None
                and conv.out_channels == bn.num_features
                and all(_reads(arguments[key], gm, getattr(bn, attr))
                        for key, attr in (("running_mean", "running_mean"), ("running_var", "running_var"),
                                          ("weight", "weight"), ("bias", "bias")))
                and all(user is node or _reads_shape_only(user) for user in conv_node.users)):
            continue
        _replace_module(gm, conv_node.target, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
        for argument in (arguments["running_mean"], arguments["running_var"], arguments["weight"], arguments["bias"]):
            if isinstance(argument, torch.fx.Node) and not argument.users:
                gm.graph.erase_node(argument)
        folded.append(owner)
    if folded:
        gm.recompile()
    return folded


def _reads(argument: Any, gm: torch.fx.GraphModule, tensor: torch.Tensor | None) -> bool:
    """Whether a batch_norm argument is exactly `tensor` (None for None)."""
    if tensor is None:
        return argument is None
    return isinstance(argument, torch.fx.Node) and argument.op == "get_attr" and _fetch_attr(gm, argument.target) is tensor


def _reads_shape_only(node: torch.fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _SHAPE_ATTRIBUTES
    return node.op == "call_method" and node.target in _SHAPE_METHODS


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else None
    except AttributeError:
        return None


def _replace_module(gm: torch.fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _make_out_of_place(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function":
            if node.target in _INPLACE_OPERATORS:
                node.target = _INPLACE_OPERATORS[node.target]
            elif node.target in _INPLACE_FUNCTIONS:
                node.target = _INPLACE_FUNCTIONS[node.target]
            elif isinstance(node.target, torch._ops.OpOverload):
                node.target = _out_of_place_aten(node.target)
            if node.kwargs.get("inplace") is True:
                node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
            if hasattr(torch.Tensor, node.target[:-1]):
                node.target = node.target[:-1]
    gm.recompile()


def _out_of_place_aten(op: torch._ops.OpOverload) -> torch._ops.OpOverload:
    """aten.relu_.default -> aten.relu.default (exported training graphs keep in-place ops)."""
    name = op.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_"):
        return op
    packet = getattr(torch.ops.aten, name[:-1], None)
    return getattr(packet, op._overloadname, op) if packet is not None else op


# --- execution ---------------------------------------------------------------------------------

Env = dict[torch.fx.Node, Any]
NodeOverride = Callable[[torch.fx.Node, tuple, dict], Any]


def load_args(node: torch.fx.Node, env: Env, fallback: Env | None = None) -> tuple[tuple, dict]:
    def lookup(n: torch.fx.Node) -> Any:
        if n in env:
            return env[n]
        if fallback is not None:
            return fallback[n]
        raise KeyError(n.name)

    args = torch.fx.node.map_arg(node.args, lookup)
    kwargs = torch.fx.node.map_arg(node.kwargs, lookup)
    return args, kwargs


def run_node(gm: torch.fx.GraphModule, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "get_attr":
        return _fetch_attr(gm, node.target)
    if node.op == "output":
        return args[0]
    raise ModelPreparationError(f"cannot execute graph node {node.name} of kind {node.op}")


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def placeholders(prepared: PreparedModel) -> list[torch.fx.Node]:
    return [n for n in prepared.nodes if n.op == "placeholder"]


def bind_inputs(prepared: PreparedModel, inputs: Inputs) -> Env:
    """The graph's placeholders bound to a batch: a plain tensor (or the tensor named "inputs") is
    forward's first argument; every other named tensor goes to the parameter of its name; a
    parameter the data does not provide takes its default."""
    holders = placeholders(prepared)
    named = dict(inputs.tensors) if isinstance(inputs, NamedInputs) else {POSITIONAL: inputs}
    env: Env = {}
    positional = named.pop(POSITIONAL, None)
    if positional is not None:
        if not holders:
            raise ModelPreparationError("the model's forward takes no inputs but the data provides some")
        env[holders[0]] = positional
    by_name = {str(h.target).lstrip("*"): h for h in holders if h not in env}
    unknown = [name for name in named if name not in by_name]
    if unknown:
        takes = ", ".join(by_name) or "nothing else"
        raise ModelPreparationError(
            f"the model's forward has no parameter {unknown[0]!r} (it takes {takes}); name the data's input arrays "
            "after forward's parameters")
    for name, value in named.items():
        env[by_name[name]] = value
    for holder in holders:
        if holder not in env:
            if not holder.args:
                raise ModelPreparationError(
                    f"the model's forward needs input {str(holder.target)!r}, which the data does not provide; add an "
                    f"array named {str(holder.target)!r} to the data")
            env[holder] = holder.args[0]
    return env


@torch.inference_mode()
def capture(prepared: PreparedModel, inputs: Inputs) -> Env:
    """Run the graph once and keep every node's value (the FP32 cache for one chunk)."""
    env: Env = bind_inputs(prepared, inputs)
    for node in prepared.nodes:
        if node.op == "placeholder":
            continue
        args, kwargs = load_args(node, env)
        env[node] = run_node(prepared.graph_module, node, args, kwargs)
    return env


@torch.inference_mode()
def rerun(
    prepared: PreparedModel,
    cache: Env,
    nodes: list[torch.fx.Node],
    overrides: dict[torch.fx.Node, NodeOverride],
) -> Env:
    """Re-execute `nodes` (in order) reading everything else from `cache`; `overrides` replace
    how particular nodes compute their value. Returns the recomputed values only."""
    env: Env = {}
    gm = prepared.graph_module
    for node in nodes:
        args, kwargs = load_args(node, env, cache)
        override = overrides.get(node)
        env[node] = override(node, args, kwargs) if override else run_node(gm, node, args, kwargs)
    return env


def primary_output(value: Any) -> torch.Tensor:
    """The tensor we compare at the model output: the first floating tensor of (possibly nested) outputs."""
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise ModelPreparationError("the model returns no floating-point tensor to compare")


def check_batch_output(output: torch.Tensor, batch: int) -> None:
    """ModelPreparationError (one line) unless `output` has one row per input sample (dimension 0):
    per-sample errors and metrics are computed along it."""
    if output.dim() == 0 or output.shape[0] != batch:
        shape = "a scalar" if output.dim() == 0 else f"shape {tuple(output.shape)}"
        raise ModelPreparationError(
            f"the model's output for a batch of {batch} sample(s) is {shape}, not one row per sample; return "
            "outputs with the batch along dimension 0 (e.g. logits [N, classes]), not a sum or a single value")


def tensor_bytes(values: Iterable[Any]) -> int:
    total = 0
    seen: set[int] = set()
    for value in values:
        leaves, _ = torch.utils._pytree.tree_flatten(value)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and not isinstance(leaf, nn.Parameter):
                key = leaf.untyped_storage().data_ptr()
                if key not in seen:  # views share storage: count it once
                    seen.add(key)
                    total += leaf.untyped_storage().nbytes()
    return total
