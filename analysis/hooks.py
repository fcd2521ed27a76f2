"""The hook engine: the isolation sweep on the user's eager model, for models no tracer handles.

When torch.fx and torch.export both fail (data-dependent control flow, key/value caches, custom
kernels, outputs that are not pytrees), or when asked (`engine="hooks"`, `--engine hooks`), the
sweep runs the model itself — a private deep copy sharing the caller's weights read-only — and sees
its layers through forward hooks.

Design: `HookSim` is a `QuantSim` whose "graph" is a synthetic one, built from one hooked FP32 pass:
each call of a quantizable module (a *site*, found with the same layer-kind registry as the graph
engine) is a `call_module` node whose arguments are placeholders holding what the call received.
Everything the sweep asks of the simulator keeps its meaning — `cache` holds every site's captured
inputs and output, `load_args(site.node, cache)` gives a site's FP32 inputs, `rerun` returns the
trial's site values and model output, `descendants` of a site are the site and the output — so the
sweep, calibration, the quantizers (`quantized_weight`, `activation_quantizer`, `overrides`) and the
site kinds are the graph engine's own objects: nothing here quantizes. What differs is execution:

- `capture` runs the model once per chunk with hooks that keep (cloned) each site's inputs and
  output, and each *unit*'s output (below);
- `rerun` runs the model again with a forward hook on each overridden site that returns the
  quantized layer's output (computed by the simulator's override from the inputs that call really
  received), and reads the model's output;
- *units*: the children of the outermost `nn.ModuleList`s (transformer blocks), each called once per
  forward. A trial skips every unit that finished before its first quantized site was called: the
  unit's forward is replaced, for that run, by its cached FP32 output. That is the suffix re-run the
  graph engine gets from its graph, at block granularity; it is checked once (every unit skipped,
  nothing quantized, must reproduce the FP32 output) and left off when a unit has side effects.

The layer table is discovered from the synthetic graph as for an fx graph (module calls are
visible), so layers, sites, skipped modules and their reasons are the graph engine's. What hooks do
not see: a weight used through a functional call (`F.linear(x, self.fc.weight)`) or a module kind
that is not registered — such modules are listed as skipped. BatchNorm is analysed unfolded (a
one-line warning says so when folding was asked for). Estimated output metrics need a graph to
differentiate through and are refused with the hook engine.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_map

from analysis.config import DEFAULT_CACHE_BYTES, ENGINES, AnalysisConfig, QuantConfig
from analysis.data import Dataset, Inputs, call_model
from analysis.graph import ModelPreparationError, PreparedModel, check_names, primary_output, private_copy
from analysis.layers import Layer, discover_layers, layer_kind_for
from analysis.quantsim import DETERMINISM_DB, QuantlensWarning, QuantSim, run_to_run_sqnr_db

__all__ = ["HookSim", "build_simulator", "engine_simulator", "module_layers"]

_BATCHNORMS = nn.modules.batchnorm._BatchNorm


@dataclass
class _SiteCall:
    """One call of a quantizable module in the discovery pass."""

    module: str
    node: torch.fx.Node
    arg_nodes: tuple[torch.fx.Node, ...]  # one placeholder per positional argument
    kwarg_nodes: dict[str, torch.fx.Node]
    units_done: int  # how many units had finished before this call
    unit: str | None  # the unit this call ran inside (None: outside every unit)


@dataclass
class _Plan:
    calls: list[_SiteCall] = field(default_factory=list)
    by_node: dict[torch.fx.Node, _SiteCall] = field(default_factory=dict)
    units: list[str] = field(default_factory=list)  # in the order they finish
    graph: torch.fx.Graph = field(default_factory=torch.fx.Graph)
    inputs_node: torch.fx.Node | None = None


def _unit_candidates(model: nn.Module) -> list[str]:
    """Children of the outermost ModuleLists, by qualified name."""
    units: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(u + ".") for u in units):
            units += [f"{name}.{child}" if name else child for child, _ in module.named_children()]
    return units


def _site_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules the layer-kind registry analyses (unsupported ones are reported by discovery)."""
    out = {}
    for name, module in model.named_modules():
        kind = layer_kind_for(module)
        if name and kind is not None and kind.unsupported(module) is None:
            out[name] = module
    return out


class _Keeper:
    """Clones of captured values, one per tensor state: q, k and v projections reading the same
    hidden state hold one copy; a tensor updated in place in between gets a new one."""

    def __init__(self) -> None:
        self.memo: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, value: Any) -> Any:
        def keep(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            key = (id(t), t._version)
            if key not in self.memo:
                self.memo[key] = (t, t.detach().clone())
            return self.memo[key][1]

        return tree_map(keep, value)


def _clone(value: Any) -> Any:
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, value)


class HookSim(QuantSim):
    """A `QuantSim` that runs the user's eager model with forward hooks instead of a traced graph
    (see the module docstring). Same constructor, same quantizers, same results."""

    source = "hooks"
    engine = "hooks"

    def __init__(self, *args: Any, block_reruns: bool = True, **kwargs: Any) -> None:
        """`block_reruns=False`: every trial re-runs the whole model (the same numbers, slower)."""
        super().__init__(*args, **kwargs)
        # Discovered as an fx graph is (module calls visible); reported as what ran.
        self.prepared.source = self.source
        self.gm = self.prepared.eager  # the whole model: parameter names and weight coverage read it
        self._units_ok = block_reruns and bool(self._plan.units) and self._check_unit_skipping()

    # preparation --------------------------------------------------------------------------------

    def prepare(self, model: Any, example: Inputs) -> PreparedModel:
        if not isinstance(model, nn.Module):
            raise ModelPreparationError(f"the hook engine runs an nn.Module; got {type(model).__name__} "
                                        "(a torch.export program already is a graph: use --engine graph)")
        check_names(model)  # the stand-in graph's code names the modules too
        moves = self._moves(model)
        private = private_copy(model, share_weights=not moves)
        if moves:
            private.to(self.device)
        if self.config.fold_batchnorm and any(isinstance(m, _BATCHNORMS) for m in private.modules()):
            warnings.warn("the hook engine analyses BatchNorm unfolded (convolution weights as the model stores "
                          "them, not folded as deployment does); pass --no-fold-batchnorm to accept, or use "
                          "--engine graph on a traceable model", QuantlensWarning, stacklevel=3)
        self._private = private
        self._sites = _site_modules(private)
        self._plan = self._discover(private, example.to(self.device))
        gm = torch.fx.GraphModule(private, self._plan.graph, class_name="HookedModel")
        return PreparedModel(gm, "fx", eager=private)

    def _discover(self, model: nn.Module, example: Inputs) -> _Plan:
        """One hooked FP32 pass: every site call becomes a call_module node of a synthetic graph."""
        plan = _Plan()
        graph = plan.graph
        plan.inputs_node = graph.placeholder("model_inputs")
        candidates = _unit_candidates(model)
        unit_calls: dict[str, int] = dict.fromkeys(candidates, 0)
        running: list[str] = []
        counter = [0]

        def site_hook(name: str):
            def hook(module, args, kwargs, output):
                k = counter[0]
                counter[0] += 1
                arg_nodes = tuple(graph.placeholder(f"s{k}_arg{i}") for i in range(len(args)))
                kwarg_nodes = {key: graph.placeholder(f"s{k}_kw_{key}") for key in kwargs}
                node = graph.call_module(name, arg_nodes, kwarg_nodes)
                call = _SiteCall(name, node, arg_nodes, kwarg_nodes, len(plan.units), running[-1] if running else None)
                plan.calls.append(call)
                plan.by_node[node] = call
            return hook

        def unit_pre(name: str):
            def hook(module, args):
                unit_calls[name] += 1
                running.append(name)
            return hook

        def unit_post(name: str):
            def hook(module, args, output):
                running.pop()
                plan.units.append(name)
            return hook

        handles = [m.register_forward_hook(site_hook(n), with_kwargs=True) for n, m in self._sites.items()]
        for name in candidates:
            unit = model.get_submodule(name)
            handles += [unit.register_forward_pre_hook(unit_pre(name)), unit.register_forward_hook(unit_post(name))]
        try:
            with torch.no_grad():
                call_model(model, example)
        except Exception as exc:  # noqa: BLE001 — the model's own error, in one line
            raise ModelPreparationError(f"the model failed on the first batch ({type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        finally:
            for handle in handles:
                handle.remove()
        if any(count != 1 for count in unit_calls.values()) or len(set(plan.units)) != len(plan.units):
            plan.units = []  # a block called twice (or not at all) cannot be replaced by one cached output
            for call in plan.calls:
                call.units_done, call.unit = 0, None
        graph.output(tuple(call.node for call in plan.calls))
        return plan

    def _check_unit_skipping(self) -> bool:
        """Skipping every unit (their cached outputs instead) must give the FP32 output again."""
        n = min(2, len(self.data))
        cache = self.capture(self._inputs(0, n))
        with torch.no_grad():
            skipped = self._run(cache[self._plan.inputs_node], {}, cache, skip=len(self._plan.units))
        return run_to_run_sqnr_db(self.output_of(cache), primary_output(skipped)) >= DETERMINISM_DB * 2

    # execution ----------------------------------------------------------------------------------

    @property
    def units(self) -> list[str]:
        """The blocks a trial may skip (empty: every trial re-runs the whole model)."""
        return list(self._plan.units) if self._units_ok else []

    def capture(self, inputs: Inputs) -> dict:
        """Run the model once; keep every site's inputs and output, every unit's output, the output."""
        env: dict = {self._plan.inputs_node: inputs}
        keep = _Keeper()
        expected = self._calls_by_module(skip=0)
        seen: dict[str, int] = dict.fromkeys(expected, 0)

        def site_hook(name: str):
            def hook(module, args, kwargs, output):
                call = self._next_call(name, expected, seen)
                for node, value in zip(call.arg_nodes, args):
                    env[node] = keep(value)
                for key, node in call.kwarg_nodes.items():
                    env[node] = keep(kwargs.get(key))
                env[call.node] = keep(output)
            return hook

        def unit_hook(name: str):
            def hook(module, args, output):
                env[("unit", name)] = _clone(output)
            return hook

        handles = [m.register_forward_hook(site_hook(n), with_kwargs=True) for n, m in self._sites.items()
                   if n in expected]
        handles += [self._private.get_submodule(u).register_forward_hook(unit_hook(u)) for u in self._plan.units]
        try:
            with torch.no_grad():
                output = call_model(self._private, inputs)
        finally:
            for handle in handles:
                handle.remove()
        self._check_all_called(expected, seen)
        env[self.prepared.output_node] = output
        return env

    def rerun(self, cache: dict, nodes: list, overrides: dict) -> dict:
        """The model re-run on the chunk with each overridden site's output replaced by its override's
        (`nodes` is what a graph would re-execute; here the model runs from the first unit that
        depends on an overridden site). Returns the overridden sites' values, the inputs of those
        called after another override (they may have changed) and the model output."""
        skip = min((self._plan.by_node[node].units_done for node in overrides), default=0) if self._units_ok else 0
        env: dict = {}
        with torch.no_grad():
            output = self._run(cache[self._plan.inputs_node], overrides, cache, skip, env)
        env[self.prepared.output_node] = output
        return env

    def forward(self, inputs: Inputs, assignment: dict | None = None) -> torch.Tensor:
        assignment = assignment or {}
        self.calibrate_assignment(assignment)
        overrides = self.overrides(assignment)
        outputs = []
        with torch.no_grad():
            for start in range(0, len(inputs), self.chunk_size):
                batch = inputs[start:start + self.chunk_size].to(self.device)
                outputs.append(primary_output(self._run(batch, overrides, None, 0)).detach())
        return torch.cat(outputs)

    def trainable_copy(self):
        raise ModelPreparationError("fine-tuning needs a traced model; the hook engine only analyses "
                                    "(make forward traceable to fine-tune it)")

    def _calls_by_module(self, skip: int) -> dict[str, list[_SiteCall]]:
        """Each site module's calls in order, without those inside the first `skip` finished units."""
        skipped = set(self._plan.units[:skip])
        out: dict[str, list[_SiteCall]] = {}
        for call in self._plan.calls:
            if call.unit is None or call.unit not in skipped:
                out.setdefault(call.module, []).append(call)
        return out

    @staticmethod
    def _next_call(name: str, expected: dict, seen: dict) -> _SiteCall:
        index = seen[name]
        seen[name] += 1
        if index >= len(expected[name]):
            raise ModelPreparationError(
                f"layer {name} ran more often on this batch than on the first ({len(expected[name])}); the hook engine "
                "needs the same layer calls for every batch (forward must not choose which layers run from the data)")
        return expected[name][index]

    @staticmethod
    def _check_all_called(expected: dict, seen: dict) -> None:
        for name, calls in expected.items():
            if seen[name] != len(calls):
                raise ModelPreparationError(
                    f"layer {name} ran {seen[name]} time(s) on this batch but {len(calls)} on the first; the hook engine "
                    "needs the same layer calls for every batch (forward must not choose which layers run from the data)")

    def _run(self, inputs: Inputs, overrides: dict, cache: dict | None, skip: int, env: dict | None = None) -> Any:
        """One forward of the private model: overridden sites return their override's value, and
        the first `skip` finished units return their cached output without running."""
        modules = {self._plan.by_node[node].module for node in overrides}
        expected = {name: calls for name, calls in self._calls_by_module(skip).items() if name in modules}
        seen = dict.fromkeys(expected, 0)
        fired, inside = [False], [False]

        def site_hook(name: str):
            def hook(module, args, kwargs, output):
                if inside[0]:  # the override itself calls the module (with its quantized weight)
                    return None
                call = self._next_call(name, expected, seen)
                override = overrides.get(call.node)
                if override is None:
                    return None
                if env is not None and fired[0]:  # an earlier quantized site may have changed these inputs
                    for node, value in zip(call.arg_nodes, args):
                        env[node] = _clone(value)
                    for key, node in call.kwarg_nodes.items():
                        env[node] = _clone(kwargs.get(key))
                fired[0] = inside[0] = True
                try:
                    value = override(call.node, args, kwargs)
                finally:
                    inside[0] = False
                if env is not None:
                    env[call.node] = _clone(value)  # the model may update its copy in place
                return value
            return hook

        handles = [self._private.get_submodule(n).register_forward_hook(site_hook(n), with_kwargs=True)
                   for n in expected]
        skipped = [self._private.get_submodule(u) for u in self._plan.units[:skip]]
        try:
            for unit_name, unit in zip(self._plan.units, skipped):
                cached = cache[("unit", unit_name)]
                unit.forward = lambda *a, cached=cached, **k: _clone(cached)
            output = call_model(self._private, inputs)
        finally:
            for handle in handles:
                handle.remove()
            for unit in skipped:
                del unit.forward
        self._check_all_called(expected, seen)
        return output


def module_layers(model: nn.Module) -> list[Layer]:
    """The layers the hook engine analyses in `model`, found from its module tree without running it
    (no data at hand: the recipe and torchao exports): every module of a registered layer kind, with
    its kind and tied weights, in definition order rather than execution order. A module forward
    never calls is listed too (a discovery pass would leave it out)."""
    graph = torch.fx.Graph()
    for name in _site_modules(model):
        graph.call_module(name, (graph.placeholder(f"{name.replace('.', '_')}_input"),))
    graph.output(None)
    gm = torch.fx.GraphModule(model, graph, class_name="ModuleTree")
    return discover_layers(PreparedModel(gm, "hooks", eager=model)).layers


def build_simulator(model: Any, data: Dataset, config: AnalysisConfig, *, cache_bytes: int,
                    device: str | None = None) -> QuantSim:
    """The sweep's simulator for `config.engine` (see `engine_simulator`); estimated output metrics
    need a graph, so the hook engine is refused with them (and "auto" does not fall back)."""
    if config.engine not in ENGINES:
        raise ValueError(f"unknown engine {config.engine!r}; use one of {', '.join(ENGINES)}")
    if config.engine == "hooks" and config.output_metrics == "estimated":
        raise ValueError("estimated output metrics differentiate through a traced graph, which the hook engine "
                         "does not have; use --output-metrics exact (or none) with --engine hooks")
    return engine_simulator(model, data, config.quant, engine="graph" if config.output_metrics == "estimated"
                            else config.engine, device=device or config.device, cache_bytes=cache_bytes)


def engine_simulator(model: Any, data: Dataset, quant: QuantConfig | None = None, *, engine: str = "auto",
                     device: str | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES) -> QuantSim:
    """The simulator for `engine`: "graph" (a traced copy), "hooks" (the eager model with hooks), or
    "auto" — the graph, and the hook engine when the model cannot be prepared as a graph (tracing
    fails, or the traced graph does not compute the model's output), with a one-line warning.
    Every surface that quantizes a model (sweep, evaluation, export, real kernels) builds its
    simulator here, so a model only the hook engine runs works everywhere the analysis did."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    quant = quant or QuantConfig()
    kwargs = {"device": device, "cache_bytes": cache_bytes}
    if engine == "graph":
        return QuantSim(model, data, quant, **kwargs)
    if engine == "hooks":
        return HookSim(model, data, quant, **kwargs)
    try:
        return QuantSim(model, data, quant, **kwargs)
    except ModelPreparationError as graph_error:
        if not isinstance(model, nn.Module):
            raise
        reason = str(graph_error).splitlines()[0] if str(graph_error) else type(graph_error).__name__
        try:
            sim = HookSim(model, data, quant, **kwargs)
        except ModelPreparationError as hook_error:  # both say why: the graph's reason first
            raise ModelPreparationError(f"{reason}; the hook engine could not run it either: {hook_error}") from None
        warnings.warn(f"the graph engine cannot run this model ({reason}); analysing it with the hook engine "
                      "(your model run eagerly with forward hooks: same metrics, whole-block re-runs)",
                      QuantlensWarning, stacklevel=3)
        return sim
