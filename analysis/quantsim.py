"""The quantization simulator: one object that runs a model under any precision assignment.

`QuantSim(model, data, quant_config)` is built once: it prepares a private copy of the model (one
trace, one BatchNorm fold), discovers the layers, and calibrates weight and activation quantizers
on `data` lazily, caching what it computed. Every surface — the sweep, evaluation, export,
fine-tuning, remedies, the real-kernel path, the dashboard — quantizes through it, so a map means
the same numbers everywhere. Its public accessors (`weight_params`, `activation_params`) are what
exporters write.

An *assignment* maps a layer name to (weight format, activation format); None leaves that side in
float.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from analysis import calibration
from analysis.config import DEFAULT_CACHE_BYTES, QuantConfig
from analysis.data import Dataset, Inputs, call_model, samples_differ
from analysis.device import free_memory_bytes, resolve_device
from analysis.formats import (
    Format, block_quantize, check_finite, dynamic_quantize, from_rows, quantize_with_range, scale_and_zero_point,
    to_rows,
)
from analysis.graph import (
    ModelPreparationError, PreparedModel, bind_inputs, capture, check_batch_output, load_args, prepare_model, primary_output, rerun,
    tensor_bytes, unchanged,
)
from analysis.layers import ActFn, Layer, LayerTable, ModuleSite, Site, discover_layers
from analysis.sites import compose_override

Assignment = dict[str, tuple[Format | None, Format | None]]
# Quantized weights are rebuilt from cached per-row ranges on demand; only this many bytes of them
# stay materialized, so a big model never holds a second full copy per format.
WEIGHT_CACHE_BYTES = 64 << 20


@dataclass(frozen=True)
class WeightParams:
    """What a weight quantizer computed: per-row clipping range and the grid it implies.

    Rows follow `analysis.formats.to_rows`: one per output channel (per-channel), per group in
    channel-major order (per-group), or one (per-tensor). Unscaled formats (fp16/bf16) have no rows.
    """

    layer: str
    format: Format
    axis: int | None  # the channel axis of the weight (None: per-tensor)
    lo: torch.Tensor | None
    hi: torch.Tensor | None
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None


@dataclass(frozen=True)
class ActivationParams:
    """One quantized input of one call site of a layer. `dynamic`: ranges come from the tensor at
    run time (then lo/hi/scale are None); `per_token` says along what (block formats: whether the
    blocks run along the last dimension rather than channels)."""

    layer: str
    site: str  # the graph node's name
    index: int  # which distinct input of the site (q/k/v of cross-attention are 0, 1, 2)
    format: Format
    dynamic: bool
    per_token: bool
    lo: float | None = None
    hi: float | None = None
    scale: float | None = None
    zero_point: int | None = None


def quantize_weight(weight: torch.Tensor, fmt: Format, channel_axis: int, method: str,
                    percentile: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake-quantized weight plus the per-row (lo, hi) clipping range that produced it."""
    w = weight.detach().float()
    if fmt.is_identity:
        return weight.detach(), w.min().reshape(1), w.max().reshape(1)
    check_finite(w, "weight")
    rows = to_rows(w, fmt, channel_axis)
    if fmt.scaled:  # a calibrated range; block formats take their scales from each row (block) below
        lo, hi = calibration.weight_range(
            rows, method=method, symmetric=fmt.symmetric or fmt.kind == "float",
            quantize_fn=lambda v, l, h: quantize_with_range(v, fmt, l, h), percentile=percentile, bits=fmt.bits,
        )
    else:
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    quantized = quantize_with_range(rows, fmt, lo[:, None], hi[:, None])
    return from_rows(quantized, w, fmt, channel_axis).to(weight.dtype), lo, hi


def activation_range(hist: calibration.Histogram, fmt: Format, method: str, percentile: float) -> tuple[float, float]:
    if not fmt.scaled:
        return hist.min, hist.max
    return calibration.histogram_range(
        hist, method=method, symmetric=fmt.symmetric or fmt.kind == "float",
        quantize_fn=lambda v, l, h: quantize_with_range(v, fmt, l, h), percentile=percentile, bits=fmt.bits,
    )


def per_token(site: Site) -> bool:
    """Dynamic ranges: per token for matmul inputs (torchao's convention), per sample for convolutions."""
    return not (isinstance(site, ModuleSite) and not isinstance(site.module, torch.nn.Linear) and not site.is_embedding)


# Two FP32 runs of a deterministic model agree bit for bit on a CPU and to ~120 dB or more on a GPU
# (non-deterministic reductions); dropout or noise in forward gives a few dB.
DETERMINISM_DB = 60.0
# The prepared graph against the user's own eager model on the same batch: BatchNorm folding and a
# different operation order cost float rounding (≥ 100 dB in float32); a graph that lost part of
# forward (an in-place update, a data-dependent branch) is off by tens of dB.
FAITHFUL_DB = 60.0


class QuantlensWarning(UserWarning):
    """Something the numbers should be read with (the CLI prints it as one line)."""


def run_to_run_sqnr_db(first: torch.Tensor, second: torch.Tensor) -> float:
    """SQNR (dB) of `second` against `first`: inf when identical (NaN in the same places counts as
    the same), -inf when they differ in where they are finite."""
    first, second = first.detach().cpu(), second.detach().cpu()  # float64 sums (MPS has no float64)
    finite = torch.isfinite(first)
    if not torch.equal(finite, torch.isfinite(second)):
        return float("-inf")
    a, b = first[finite].double(), second[finite].double()
    noise = float(((a - b) ** 2).sum())
    if noise == 0.0:
        return float("inf")
    signal = float((a ** 2).sum())
    return 10.0 * math.log10(signal / noise) if signal > 0 else float("-inf")


class QuantSim:
    """A prepared model with calibrated quantizers; runs under any assignment. Never writes the
    caller's model: it works on a private traced copy that shares the caller's weight tensors
    read-only (or copies them when they must move to another device)."""

    engine = "graph"  # what runs it (analysis.config.ENGINES); analysis.hooks.HookSim: "hooks"

    def __init__(self, model: Any, data: Dataset, config: QuantConfig | None = None, *,
                 device: str | torch.device | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.config = config or QuantConfig()
        self.device = resolve_device(device, check_available=True)
        self.cache_bytes = cache_bytes
        self.data = data.take(self.config.num_samples)
        example = self.data.inputs[:2]
        self.prepared: PreparedModel = self.prepare(model, example)
        self.gm = self.prepared.graph_module
        self.table: LayerTable = discover_layers(self.prepared)
        for layer in self.table.layers:  # before calibration, which would blame the next layer's input
            check_finite(self.table.weight(layer.name).detach(), f"the weight of layer {layer.name}")
        self._by_name = {layer.name: layer for layer in self.table.layers}
        self._act_hists: dict[tuple[str, int], calibration.Histogram] = {}
        self._act_ranges: dict[tuple[str, int, Format], tuple[torch.Tensor, torch.Tensor]] = {}
        self._weight_ranges: dict[tuple[str, Format], tuple[torch.Tensor, torch.Tensor]] = {}
        self._weight_lru: OrderedDict[tuple[str, Format], torch.Tensor] = OrderedDict()
        self._weight_lru_bytes = 0
        self._chunk_cache: tuple[int, dict] | None = None
        self._check_forward()
        self.chunk_size = self._plan_chunks()

    def prepare(self, model: Any, example: Inputs) -> PreparedModel:
        """The private copy that runs (here a traced graph; `analysis.hooks.HookSim` runs the eager
        model instead): called once, by the constructor."""
        prepared = prepare_model(model, fold_batchnorm=self.config.fold_batchnorm, example_inputs=example,
                                 share_weights=not self._moves(model))
        if self._moves(model):
            prepared.graph_module.to(self.device)  # a private deep copy: moving it is safe
        return prepared

    def capture(self, inputs: Inputs) -> dict:
        """One FP32 pass over `inputs` keeping every value the trials read (the graph's nodes)."""
        return capture(self.prepared, inputs)

    def _moves(self, model: Any) -> bool:
        if isinstance(model, torch.nn.Module):
            first = next(iter(model.parameters()), None)
            return first is not None and first.device != self.device
        return self.device.type != "cpu"

    # layers ---------------------------------------------------------------------------------

    @property
    def layers(self) -> list[Layer]:
        return self.table.layers

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.table.layers]

    def layer(self, name: str) -> Layer:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown layer {name!r}; the model's layers are {', '.join(self.layer_names[:5])}, ...") from None

    def sites(self, name: str) -> list[Site]:
        return self.table.sites[name]

    def trainable_copy(self) -> tuple[PreparedModel, LayerTable]:
        """The prepared model deep-copied with its own weights (for training), and its layer table.
        Node names are kept by the copy, so its sites pair with this simulator's by `site.node.name`."""
        gm = copy.deepcopy(self.gm).to("cpu") if self.device.type != "cpu" else copy.deepcopy(self.gm)
        prepared = PreparedModel(gm, self.prepared.source, folded_batchnorms=self.prepared.folded_batchnorms,
                                 eager=self.prepared.eager)
        return prepared, discover_layers(prepared)

    def param_names(self) -> dict[str, str]:
        """Layer -> PyTorch parameter name of its weight ("fc1.weight", "attn.in_proj_weight"),
        taken from the prepared graph, so BatchNorm-folded convolutions keep their module's name."""
        by_tensor: dict[int, str] = {}
        for name, param in self.gm.named_parameters(remove_duplicate=False):
            by_tensor.setdefault(id(param), name)
        return {layer.name: by_tensor.get(id(self.table.weight(layer.name)), guess_param_name(layer.name))
                for layer in self.table.layers}

    def _check_forward(self) -> None:
        """The FP32 model must give one output row per sample, and the same output twice for the
        same input: quantization error is measured against that output, so a random one (dropout
        forced on, noise, sampling) would be reported as error, or hide it. And what runs must be the
        user's model (`_faithful_agreement`).

        A second run of the prepared graph is only needed when the user's own forward is not there to
        compare with, or disagrees: two runs of a random forward differ whichever code runs them, so
        agreement with the user's run at FAITHFUL_DB already says the graph is deterministic at
        DETERMINISM_DB (≤ FAITHFUL_DB). Skipping that run saves a forward in every process that
        prepares the model (each worker of a distributed sweep too)."""
        n = min(2, len(self.data))
        first = self.output_of(self.capture(self._inputs(0, n)))
        check_batch_output(first, n)
        faithful = self._faithful_agreement(first, n)
        if faithful is None or faithful < FAITHFUL_DB:
            second = self.output_of(self.capture(self._inputs(0, n)))
            agreement = run_to_run_sqnr_db(first, second)
            if agreement < DETERMINISM_DB:
                raise ModelPreparationError(
                    f"two FP32 runs of the model on the same input disagree ({agreement:.1f} dB SQNR between them): "
                    "its forward is random even in eval mode (dropout with training=True, added noise, sampling), so "
                    "quantization error cannot be told from that randomness; make forward deterministic in eval mode")
        if faithful is not None and faithful < FAITHFUL_DB:
            raise ModelPreparationError(
                f"the traced model ({self.prepared.source}) computes something other than your model: their FP32 "
                f"outputs differ ({faithful:.1f} dB SQNR) on the first batch, so its numbers would be wrong; this "
                "happens when forward updates tensors in place or branches on data — refusing rather than reporting "
                "them (export the model with torch.export and pass the .pt2, or make those steps out of place)")
        if self._constant_output(first, self.data.inputs[:n]):
            warnings.warn(
                "the model's output is the same for every input checked (a constant or all-zero output: an "
                "untrained or zero-initialised head?): every trial will read near 100 dB; check the model and "
                "weights", QuantlensWarning, stacklevel=2)

    def _faithful_agreement(self, traced: torch.Tensor, n: int) -> float | None:
        """SQNR (dB) of the prepared graph's FP32 output against the user's own forward (on the
        private copy, every buffer and mode restored) on the same batch; None for a torch.export
        program, which is already the graph that runs."""
        eager = self.prepared.eager
        if not isinstance(eager, torch.nn.Module):
            return None
        first_param = next(iter(eager.parameters()), None)
        where = first_param.device if first_param is not None else torch.device("cpu")
        with unchanged(eager), torch.inference_mode():
            real = primary_output(call_model(eager, self.data.inputs[:n].to(where)))
        return run_to_run_sqnr_db(real.float(), traced.to(real.device).float())

    @staticmethod
    def _constant_output(output: torch.Tensor, inputs: Inputs) -> bool:
        """Different inputs, identical outputs."""
        return (output.shape[0] >= 2 and samples_differ(inputs, 0, 1)
                and bool((output == output[:1]).all()))

    # chunks ---------------------------------------------------------------------------------

    def _plan_chunks(self) -> int:
        env = self.capture(self._inputs(0, 1))
        self._measure_macs(env)
        self.output_elements = self.output_of(env).numel()  # per sample: what each output comparison reads
        per_sample = max(1, tensor_bytes(env.values()))
        bound = self.cache_bytes
        free = free_memory_bytes(self.device)
        if free is not None:  # on an accelerator the device's free memory bounds the cache too
            bound = min(bound, free // 2)
        # A third of the bound for the FP32 cache, a third for what a trial recomputes, a third for
        # temporaries (metrics, calibration, the per-sample estimate missing kernel workspaces).
        return max(1, min(len(self.data), bound // (3 * per_sample)))

    def _inputs(self, start: int, stop: int) -> Inputs:
        return self.data.inputs[start:stop].to(self.device)

    def chunks(self) -> list[tuple[int, int]]:
        n = len(self.data)
        return [(start, min(n, start + self.chunk_size)) for start in range(0, n, self.chunk_size)]

    def cache(self, chunk: tuple[int, int]) -> dict:
        """FP32 values of every node for one chunk; the last one is kept (one chunk fits by design)."""
        if self._chunk_cache is not None and self._chunk_cache[0] == chunk[0]:
            return self._chunk_cache[1]
        self._chunk_cache = None  # free the old chunk before computing the next
        env = self.capture(self._inputs(*chunk))
        self._chunk_cache = (chunk[0], env)
        return env

    def adopt_cache(self, chunk: tuple[int, int], values: dict) -> dict:
        """Use `values` (every node's FP32 value for this chunk, e.g. from the estimate's forward with
        autograd, which computes exactly what `cache` would) as the chunk's cache."""
        missing = [n.name for n in self.prepared.nodes if n not in values]
        if missing:
            raise ValueError(f"values for chunk {chunk} lack graph node(s) {', '.join(missing[:3])}; pass a full capture")
        self._chunk_cache = (chunk[0], values)
        return values

    def output_mask(self, chunk: tuple[int, int]) -> torch.Tensor | None:
        """The output positions of a chunk that count in output metrics (`Dataset.token_mask`:
        language-model padding does not), on the simulator's device; None when all count."""
        mask = self.data.token_mask(*chunk)
        return None if mask is None else mask.to(self.device)

    def release_cache(self) -> None:
        self._chunk_cache = None

    def _measure_macs(self, env: dict) -> None:
        layers = []
        for layer in self.table.layers:
            macs = 0
            for site in self.table.sites[layer.name]:
                args, kwargs = load_args(site.node, env)
                macs += site.macs(args, kwargs, env[site.node])
            layers.append(replace(layer, macs=int(macs)))
        self.table.layers = layers
        self._by_name = {layer.name: layer for layer in layers}

    # weights --------------------------------------------------------------------------------

    def quantized_weight(self, layer: str, fmt: Format | None) -> torch.Tensor | None:
        """The layer's weight fake-quantized to fmt (None: leave it in float)."""
        if fmt is None:
            return None
        key = (layer, fmt)
        cached = self._weight_lru.get(key)
        if cached is not None:
            self._weight_lru.move_to_end(key)
            return cached
        info = self.layer(layer)
        weight = self.table.weight(layer)
        if key in self._weight_ranges:
            lo, hi = self._weight_ranges[key]
            w = weight.detach().float()
            rows = to_rows(w, fmt, info.channel_axis)
            quantized = from_rows(quantize_with_range(rows, fmt, lo[:, None], hi[:, None]), w, fmt,
                                  info.channel_axis).to(weight.dtype)
        else:
            quantized, lo, hi = quantize_weight(weight, fmt, info.channel_axis, self.config.weight_calibration,
                                                self.config.percentile)
            self._weight_ranges[key] = (lo, hi)
        self._weight_lru[key] = quantized
        self._weight_lru_bytes += quantized.numel() * quantized.element_size()
        while self._weight_lru_bytes > WEIGHT_CACHE_BYTES and len(self._weight_lru) > 1:
            _, evicted = self._weight_lru.popitem(last=False)
            self._weight_lru_bytes -= evicted.numel() * evicted.element_size()
        return quantized

    def weight_range(self, layer: str, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (lo, hi) clipping range of the layer's weight in fmt (rows as `formats.to_rows`)."""
        if (layer, fmt) not in self._weight_ranges:
            self.quantized_weight(layer, fmt)
        return self._weight_ranges[(layer, fmt)]

    def weight_params(self, layer: str, fmt: Format) -> WeightParams:
        info = self.layer(layer)
        axis = None if fmt.granularity == "per-tensor" else info.channel_axis
        if not fmt.scaled:
            return WeightParams(layer, fmt, axis, None, None, None, None)
        lo, hi = self.weight_range(layer, fmt)
        scale, zero_point = scale_and_zero_point(fmt, lo, hi)
        return WeightParams(layer, fmt, axis, lo, hi, scale, zero_point)

    # activations ------------------------------------------------------------------------------

    def calibrate_activations(self, sites: list[Site]) -> None:
        """Two passes over all samples: min/max, then a fixed-edge histogram (exact under chunking)."""
        if self.config.dynamic_activations:
            return
        todo = [s for s in sites if (s.node.name, 0) not in self._act_hists]
        if not todo:
            return
        hists: dict[tuple[str, int], calibration.Histogram] = {}
        for phase in ("observe_minmax", "fill"):
            for chunk in self.chunks():
                env = self.cache(chunk)
                for site in todo:
                    args, kwargs = load_args(site.node, env)
                    with torch.inference_mode():
                        values = site.activation_inputs(self.gm, args, kwargs)
                    for index, value in enumerate(values):
                        if phase == "observe_minmax":
                            check_finite(value, f"input activation of layer {site.layer_name}")
                        hist = hists.setdefault((site.node.name, index), calibration.Histogram())
                        getattr(hist, phase)(value.detach().float())
        self._act_hists.update(hists)

    def calibrate_assignment(self, assignment: Assignment) -> None:
        """Calibrate the inputs the assignment quantizes with static ranges (block formats have none)."""
        self.calibrate_activations([s for name, (_, af) in assignment.items() if af is not None and not af.block_scaled
                                    for s in self.table.sites[name]])

    def activation_statistics(self) -> dict[tuple[str, int], calibration.Histogram]:
        """The calibrated input histograms so far, by (graph node name, input index): everything
        static activation ranges are computed from. Another simulator of the same model and data
        takes them with `adopt_activation_statistics` instead of calibrating again (the shards of a
        distributed sweep all quantize with the ranges calibrated once)."""
        return dict(self._act_hists)

    def adopt_activation_statistics(self, statistics: dict[tuple[str, int], calibration.Histogram]) -> None:
        """Use histograms from `activation_statistics` of a simulator of the same model and data."""
        nodes = {node.name for node in self.prepared.nodes}
        unknown = sorted({name for name, _ in statistics} - nodes)
        if unknown:
            raise ValueError(f"activation statistics name graph node(s) {', '.join(unknown[:3])} that this model "
                             "does not have; they come from another model")
        self._act_hists.update(statistics)
        self._act_ranges = {key: value for key, value in self._act_ranges.items() if key[:2] not in statistics}

    def activation_indices(self, site: Site) -> list[int]:
        """The distinct inputs of a site that are quantized (calibrated ones; [0] before calibration)."""
        return sorted(i for (node, i) in self._act_hists if node == site.node.name) or [0]

    def activation_histogram(self, site: Site, index: int = 0) -> calibration.Histogram | None:
        return self._act_hists.get((site.node.name, index))

    def activation_range(self, site: Site, index: int, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
        key = (site.node.name, index, fmt)
        if key not in self._act_ranges:
            if (site.node.name, index) not in self._act_hists:
                self.calibrate_activations([site])
            lo, hi = activation_range(self._act_hists[(site.node.name, index)], fmt,
                                      self.config.act_calibration, self.config.percentile)
            self._act_ranges[key] = (torch.tensor(lo, device=self.device), torch.tensor(hi, device=self.device))
        return self._act_ranges[key]

    def activation_params(self, layer: str, fmt: Format) -> list[ActivationParams]:
        """One entry per call site and distinct input of the layer, in site order."""
        out = []
        sites = self.table.sites[layer]
        dynamic = self.config.dynamic_activations or fmt.block_scaled
        if not dynamic:
            self.calibrate_activations(sites)
        for site in sites:
            for index in self.activation_indices(site):
                if not fmt.scaled or dynamic:
                    out.append(ActivationParams(layer, site.node.name, index, fmt, dynamic and (fmt.scaled or fmt.block_scaled),
                                                site.reduction_axis == -1 if fmt.block_scaled else per_token(site)))
                    continue
                lo, hi = self.activation_range(site, index, fmt)
                scale, zero_point = scale_and_zero_point(fmt, lo.reshape(1), hi.reshape(1))
                out.append(ActivationParams(layer, site.node.name, index, fmt, False, per_token(site),
                                            float(lo), float(hi), float(scale[0]), int(zero_point[0])))
        return out

    def activation_quantizer(self, site: Site, fmt: Format | None) -> ActFn | None:
        """A function (input index, tensor) -> fake-quantized tensor for the site's inputs."""
        if fmt is None:
            return None
        if fmt.block_scaled:  # scales from each block of the input, along what the layer reduces over
            return lambda index, x: block_quantize(x, fmt, site.reduction_axis)
        if self.config.dynamic_activations:
            token = per_token(site)
            return lambda index, x: dynamic_quantize(x, fmt, token)

        def quantize(index: int, x: torch.Tensor) -> torch.Tensor:
            lo, hi = self.activation_range(site, index, fmt)
            return quantize_with_range(x, fmt, lo, hi)

        return quantize

    # running --------------------------------------------------------------------------------

    def overrides(self, assignment: Assignment) -> dict:
        """Node overrides that run each assigned layer with its (weight, activation) formats."""
        result: dict = {}
        for name, (wf, af) in assignment.items():
            # Resolved when the node runs, so a fully quantized model never holds every weight at once.
            weight = (lambda name=name, wf=wf: self.quantized_weight(name, wf)) if wf is not None else None
            for site in self.table.sites[name]:
                act = self.activation_quantizer(site, af)
                result[site.node] = compose_override(site, self.gm, weight, act, result.get(site.node))
        return result

    def forward(self, inputs: Inputs, assignment: Assignment | None = None) -> torch.Tensor:
        """The model's primary output on any inputs with `assignment` quantized (float if empty),
        using the quantizers calibrated on this simulator's data. Returned on the simulator's device."""
        assignment = assignment or {}
        self.calibrate_assignment(assignment)
        overrides = self.overrides(assignment)
        nodes = [n for n in self.prepared.nodes if n.op != "placeholder"]
        outputs = []
        for start in range(0, len(inputs), self.chunk_size):
            batch = inputs[start:start + self.chunk_size].to(self.device)
            env = rerun(self.prepared, bind_inputs(self.prepared, batch), nodes, overrides)
            outputs.append(primary_output(env[self.prepared.output_node]))
        return torch.cat(outputs)

    def rerun(self, cache: dict, nodes: list, overrides: dict) -> dict:
        """Re-execute `nodes` (with `overrides` from `self.overrides`) reading everything else from
        `cache` (see `analysis.graph.rerun`)."""
        return rerun(self.prepared, cache, nodes, overrides)

    def output_of(self, env: dict) -> torch.Tensor:
        return primary_output(env[self.prepared.output_node])


def guess_param_name(layer: str) -> str:
    """The parameter name a layer name implies when no model is at hand."""
    if layer.endswith(".in_proj"):
        return layer[: -len(".in_proj")] + ".in_proj_weight"
    return f"{layer}.weight"


ProgressFn = Callable[[int, int, str], None]
