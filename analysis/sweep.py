"""The per-layer isolation sweep: quantize one layer at a time, measure what it costs.

How it stays fast (see benchmarks/bench_sweep.py for the figures):
1. FP32 values of every graph node are captured once per chunk of samples.
2. A trial re-executes only the layer's descendants, reading everything else from that cache;
   local error falls out of the same pass (the layer's node sees FP32 inputs).
3. The cache has a byte bound. Samples are split into chunks that fit; all statistics are sums
   over samples, so the chunking changes memory use, not the numbers (beyond float32 rounding).
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from analysis import calibration
from analysis.data import Dataset
from analysis.formats import (
    Format, check_finite, dynamic_quantize, from_rows, parse_formats, quantize_with_range, to_rows,
)
from analysis.graph import (
    PreparedModel, capture, load_args, prepare_model, primary_output, rerun, tensor_bytes,
)
from analysis.layers import ActFn, Layer, LayerTable, ModuleSite, Site, discover_layers
from analysis.metrics import ErrorAccumulator
from analysis.results import (
    TARGETS, AnalysisResult, CumulativeResult, Histogram, LayerHistograms, TensorHistograms, TrialResult,
)

from collections import OrderedDict

DEFAULT_CACHE_BYTES = 1 << 30  # 1 GiB: comfortable on a laptop; larger data is chunked, not dropped
ProgressFn = Callable[[int, int, str], None]
# Quantized weights are rebuilt from cached per-row ranges on demand; only this many bytes of them
# stay materialized, so a big model never holds a second full copy per format.
WEIGHT_CACHE_BYTES = 64 << 20


def _return_freed_memory_to_the_os() -> None:
    """Make glibc serve big allocations with mmap, so freed activations leave the process.

    glibc raises its mmap threshold after large blocks are freed (up to 32 MiB), after which
    activation-sized buffers come from the heap and stay in RSS when freed: a chunked sweep then
    grows far past its cache bound. Fixing the threshold turns that adaptation off. Linux/glibc
    only; elsewhere this does nothing.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass


class AnalysisCancelled(RuntimeError):
    """Raised when `should_stop` asked the sweep to stop; finished trials were already reported."""


@dataclass(frozen=True)
class AnalysisConfig:
    """What to sweep and how to calibrate. Format names follow `analysis.formats.parse_format`."""

    weight_formats: tuple[str, ...] = ("int8", "int4")
    act_formats: tuple[str, ...] = ("int8",)  # empty: weight-only analysis
    targets: tuple[str, ...] = TARGETS
    granularity: str | None = None  # weight granularity for names without a suffix (default per-channel)
    # MSE-searched clipping beats min-max on weights by several dB at 4 bits; percentile clipping is
    # the robust default for activations (outliers in a few calibration samples).
    weight_calibration: str = "mse"
    act_calibration: str = "percentile"
    percentile: float = 99.99
    dynamic_activations: bool = False  # ranges computed at run time, per token (per sample for convs)
    fold_batchnorm: bool = True
    num_samples: int | None = 256
    output_metrics: bool = True  # False: local metrics only (about one forward pass in total)
    cumulative: bool = True
    histogram_bins: int = 128
    cache_bytes: int = DEFAULT_CACHE_BYTES
    layers: tuple[str, ...] | None = None  # restrict the sweep to these layers

    def __post_init__(self) -> None:
        unknown = set(self.targets) - set(TARGETS)
        if unknown or not self.targets:
            raise ValueError(f"unknown target(s) {sorted(unknown)}; use any of {', '.join(TARGETS)}")
        for method in (self.weight_calibration, self.act_calibration):
            if method not in calibration.CALIBRATION_METHODS:
                raise ValueError(
                    f"unknown calibration {method!r}; use one of {', '.join(calibration.CALIBRATION_METHODS)}"
                )
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile {self.percentile} is out of range; use a value in (50, 100], e.g. 99.99")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError("num_samples must be at least 1")
        if self.cache_bytes < 1 << 16:
            raise ValueError("cache_bytes is too small; allow at least 64 KiB")
        self.parsed_weight_formats()
        self.parsed_act_formats()

    def parsed_weight_formats(self) -> tuple[Format, ...]:
        return parse_formats(",".join(self.weight_formats), "weight", self.granularity)

    def parsed_act_formats(self) -> tuple[Format, ...]:
        return parse_formats(",".join(self.act_formats), "activation")


@dataclass(frozen=True)
class Trial:
    layer: str
    target: str
    weight_format: Format | None
    act_format: Format | None

    @property
    def names(self) -> tuple[str | None, str | None]:
        return (
            self.weight_format.name_for("weight") if self.weight_format else None,
            self.act_format.name_for("activation") if self.act_format else None,
        )


def plan_trials(layers: list[Layer], config: AnalysisConfig) -> list[Trial]:
    """Layer-major order, so a layer's quantized weights are computed once and reused."""
    weight_formats, act_formats = config.parsed_weight_formats(), config.parsed_act_formats()
    trials = []
    for layer in layers:
        if "weights" in config.targets:
            trials += [Trial(layer.name, "weights", wf, None) for wf in weight_formats]
        if layer.quantizable_input:
            if "activations" in config.targets:
                trials += [Trial(layer.name, "activations", None, af) for af in act_formats]
            if "both" in config.targets:
                trials += [Trial(layer.name, "both", wf, af) for wf in weight_formats for af in act_formats]
    return trials


# --- quantizers bound to calibrated ranges ------------------------------------------------------


def quantize_weight(weight: torch.Tensor, fmt: Format, channel_axis: int, method: str,
                    percentile: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake-quantized weight plus the per-row (lo, hi) clipping range that produced it."""
    w = weight.detach().float()
    if fmt.is_identity:
        return weight.detach(), w.min().reshape(1), w.max().reshape(1)
    check_finite(w, "weight")
    rows = to_rows(w, fmt, channel_axis)
    if fmt.scaled:
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


def _per_token(site: Site) -> bool:
    """Dynamic ranges: per token for matmul inputs (torchao's convention), per sample for convolutions."""
    return not (isinstance(site, ModuleSite) and not isinstance(site.module, torch.nn.Linear) and not site.is_embedding)


# --- the sweep ---------------------------------------------------------------------------------


@dataclass
class _Accumulators:
    local: ErrorAccumulator
    output: ErrorAccumulator | None
    error_edges: np.ndarray | None = None
    error_counts: np.ndarray | None = None
    failure: str | None = None


@dataclass
class Analyzer:
    """Holds the prepared model and calibration state; `run` performs the sweep.

    Exposed (not just `analyze`) so that mixed-precision evaluation reuses the very same quantizers
    and calibrated ranges the sweep measured with.
    """

    model: Any
    data: Dataset
    config: AnalysisConfig = field(default_factory=AnalysisConfig)
    progress: ProgressFn | None = None
    should_stop: Callable[[], bool] | None = None

    def __post_init__(self) -> None:
        _return_freed_memory_to_the_os()
        self.data = self.data.take(self.config.num_samples)
        self.prepared: PreparedModel = prepare_model(self.model, fold_batchnorm=self.config.fold_batchnorm,
                                                     example_inputs=(self.data.inputs[:2],), share_weights=True)
        self.table: LayerTable = discover_layers(self.prepared)
        if self.config.layers is not None:
            unknown = set(self.config.layers) - {layer.name for layer in self.table.layers}
            if unknown:
                raise ValueError(f"unknown layer(s) {sorted(unknown)[:3]}; see `quantlens analyze` output for names")
        self.gm = self.prepared.graph_module
        for layer in self.table.layers:  # before calibration, which would blame the next layer's input
            check_finite(self.table.weight(layer.name).detach(), f"the weight of layer {layer.name}")
        self.chunk_size = self._plan_chunks()
        self._act_hists: dict[tuple[str, int], calibration.Histogram] = {}
        self._act_ranges: dict[tuple[str, int, Format], tuple[torch.Tensor, torch.Tensor]] = {}
        self._weight_ranges: dict[tuple[str, Format], tuple[torch.Tensor, torch.Tensor]] = {}
        self._weight_lru: OrderedDict[tuple[str, Format], torch.Tensor] = OrderedDict()
        self._weight_lru_bytes = 0
        self._chunk_cache: tuple[int, dict] | None = None

    # chunks ---------------------------------------------------------------------------------

    def _plan_chunks(self) -> int:
        env = capture(self.prepared, (self.data.inputs[:1],))
        self._measure_macs(env)
        per_sample = max(1, tensor_bytes(env.values()))
        # A third of the bound for the FP32 cache, a third for what a trial recomputes, a third for
        # temporaries (metrics, calibration, the per-sample estimate missing kernel workspaces).
        return max(1, min(len(self.data), self.config.cache_bytes // (3 * per_sample)))

    def chunks(self) -> list[tuple[int, int]]:
        n = len(self.data)
        return [(start, min(n, start + self.chunk_size)) for start in range(0, n, self.chunk_size)]

    def cache(self, chunk: tuple[int, int]) -> dict:
        """FP32 values of every node for one chunk; the last one is kept (one chunk fits by design)."""
        if self._chunk_cache is not None and self._chunk_cache[0] == chunk[0]:
            return self._chunk_cache[1]
        self._chunk_cache = None  # free the old chunk before computing the next
        env = capture(self.prepared, (self.data.inputs[chunk[0]:chunk[1]],))
        self._chunk_cache = (chunk[0], env)
        return env

    def _measure_macs(self, env: dict) -> None:
        layers = []
        for layer in self.table.layers:
            macs = 0
            for site in self.table.sites[layer.name]:
                args, kwargs = load_args(site.node, env)
                macs += site.macs(args, kwargs, env[site.node])
            layers.append(replace(layer, macs=int(macs)))
        self.table.layers = layers

    @property
    def layers(self) -> list[Layer]:
        if self.config.layers is None:
            return self.table.layers
        return [layer for layer in self.table.layers if layer.name in self.config.layers]

    # quantizers -----------------------------------------------------------------------------

    def weight(self, layer: str, fmt: Format | None) -> torch.Tensor | None:
        """The layer's weight fake-quantized to fmt (None: leave it FP32)."""
        if fmt is None:
            return None
        key = (layer, fmt)
        cached = self._weight_lru.get(key)
        if cached is not None:
            self._weight_lru.move_to_end(key)
            return cached
        info = next(l for l in self.table.layers if l.name == layer)
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
            self.weight(layer, fmt)
        return self._weight_ranges[(layer, fmt)]

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

    def act_fn(self, site: Site, fmt: Format | None) -> ActFn | None:
        if fmt is None:
            return None
        if self.config.dynamic_activations:
            per_token = _per_token(site)
            return lambda index, x: dynamic_quantize(x, fmt, per_token)

        def quantize(index: int, x: torch.Tensor) -> torch.Tensor:
            key = (site.node.name, index, fmt)
            if key not in self._act_ranges:
                lo, hi = activation_range(self._act_hists[(site.node.name, index)], fmt,
                                          self.config.act_calibration, self.config.percentile)
                self._act_ranges[key] = (torch.tensor(lo), torch.tensor(hi))
            lo, hi = self._act_ranges[key]
            return quantize_with_range(x, fmt, lo, hi)

        return quantize

    def overrides(self, assignments: dict[str, tuple[Format | None, Format | None]]) -> dict:
        """Node overrides that run each assigned layer with its (weight, activation) formats."""
        result = {}
        for name, (wf, af) in assignments.items():
            # Resolved when the node runs, so a fully quantized model never holds every weight at once.
            weight = (lambda name=name, wf=wf: self.weight(name, wf)) if wf is not None else None
            for site in self.table.sites[name]:
                act = self.act_fn(site, af)
                previous = result.get(site.node)
                result[site.node] = _compose(site, self.gm, weight, act, previous)
        return result

    # the sweep ------------------------------------------------------------------------------

    def forward(self, inputs: torch.Tensor,
                assignments: dict[str, tuple[Format | None, Format | None]]) -> torch.Tensor:
        """The model's primary output on any inputs with `assignments` quantized (FP32 if empty),
        using the quantizers and activation ranges calibrated on this analyzer's data."""
        sites = [s for name, (_, af) in assignments.items() if af is not None for s in self.table.sites[name]]
        self.calibrate_activations(sites)
        overrides = self.overrides(assignments)
        nodes = [n for n in self.prepared.nodes if n.op != "placeholder"]
        holder = next(n for n in self.prepared.nodes if n.op == "placeholder")
        outputs = []
        for start in range(0, len(inputs), self.chunk_size):
            env = rerun(self.prepared, {holder: inputs[start:start + self.chunk_size]}, nodes, overrides)
            outputs.append(primary_output(env[self.prepared.output_node]))
        return torch.cat(outputs)

    def run(self, on_result: Callable[[TrialResult], None] | None = None,
            skip: set[tuple[str, str, str]] | None = None) -> AnalysisResult:
        if not self.config.weight_formats and not self.config.act_formats:
            raise ValueError("nothing to sweep: give at least one weight or activation format")
        if not self.layers:
            skipped = ", ".join(f"{s.name} ({s.kind})" for s in self.table.skipped[:4]) or "none"
            raise ValueError(f"the model has no quantizable layers (Linear, Conv, Embedding, attention projections); "
                             f"modules with weights that were skipped: {skipped}")
        started = time.perf_counter()
        layers = self.layers
        trials = [t for t in plan_trials(layers, self.config)
                  if not skip or (t.layer, t.target, _label(t)) not in skip]
        needs_act = [s for layer in layers for s in self.table.sites[layer.name]
                     if layer.quantizable_input and self.config.act_formats]
        self.calibrate_activations(needs_act)
        chunks = self.chunks()
        total = len(trials) * len(chunks)
        accumulators = {id(t): _Accumulators(ErrorAccumulator(), ErrorAccumulator(self.data.logits) if self.config.output_metrics else None) for t in trials}
        descendants = {layer.name: self.prepared.descendants([s.node for s in self.table.sites[layer.name]]) for layer in layers}
        done = 0
        results: list[TrialResult] = []
        for chunk_index, chunk in enumerate(chunks):
            cache = self.cache(chunk)
            reference_out = primary_output(cache[self.prepared.output_node])
            local_refs: dict[str, list[torch.Tensor]] = {}
            for trial in trials:
                if self.should_stop is not None and self.should_stop():
                    raise AnalysisCancelled(f"stopped after {done} of {total} trials")
                acc = accumulators[id(trial)]
                if acc.failure is None:
                    try:
                        self._run_trial(trial, cache, reference_out, descendants[trial.layer], local_refs, acc)
                    except Exception as exc:  # noqa: BLE001 — one failing layer must not end the sweep
                        acc.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                done += 1
                if self.progress:
                    self.progress(done, total, trial.layer)
                if chunk_index == len(chunks) - 1:
                    result = _finish(trial, acc)
                    results.append(result)
                    if on_result:
                        on_result(result)
        cumulative = self._cumulative(layers) if self.config.cumulative else ()
        return AnalysisResult(
            config=asdict(self.config),
            layers=tuple(self.table.layers),
            skipped=tuple(self.table.skipped),
            trials=tuple(results),
            cumulative=tuple(cumulative),
            histograms=self.histograms(layers),
            model={"source": self.prepared.source, "folded_batchnorms": list(self.prepared.folded_batchnorms)},
            data={"samples": len(self.data), "task": self.data.task, "fingerprint": self.data.fingerprint(),
                  "chunks": len(chunks)},
            versions=versions(),
            seconds=time.perf_counter() - started,
        )

    def _run_trial(self, trial: Trial, cache: dict, reference_out: torch.Tensor,
                   affected: list, local_refs: dict[str, list[torch.Tensor]], acc: _Accumulators) -> None:
        sites = self.table.sites[trial.layer]
        weight = self.weight(trial.layer, trial.weight_format)
        acts = [self.act_fn(site, trial.act_format) for site in sites]
        if trial.layer not in local_refs:
            local_refs.clear()  # keep only the current layer's references
            local_refs[trial.layer] = []
            for site in sites:
                args, kwargs = load_args(site.node, cache)
                with torch.inference_mode():
                    local_refs[trial.layer].append(site.local(self.gm, args, kwargs, None, None, cache[site.node]))
        env: dict = {}
        if acc.output is not None:
            overrides = {site.node: _compose(site, self.gm, weight, act, None) for site, act in zip(sites, acts)}
            env = rerun(self.prepared, cache, affected, overrides)
            acc.output.update(reference_out, primary_output(env[self.prepared.output_node]))
        with torch.inference_mode():
            for site, act, reference in zip(sites, acts, local_refs[trial.layer]):
                args, kwargs = load_args(site.node, cache)  # local error: FP32 inputs, always
                inputs_changed = any(n in env for n in site.node.all_input_nodes)
                value = env[site.node] if site.node in env and not inputs_changed else site.run(self.gm, args, kwargs, weight, act)
                local = site.local(self.gm, args, kwargs, weight, act, value)
                acc.local.update(reference, local)
                _update_error_histogram(acc, (local - reference).detach().float())

    def _cumulative(self, layers: list[Layer]) -> list[CumulativeResult]:
        """Every analysed layer quantized at once, per uniform configuration."""
        configs = {(t.target, t.weight_format, t.act_format) for t in plan_trials(layers, self.config)}
        results = []
        for target, wf, af in sorted(configs, key=lambda c: (TARGETS.index(c[0]), str(c[1]), str(c[2]))):
            assignments = {
                layer.name: (wf, af if layer.quantizable_input else None) for layer in layers
                if wf is not None or layer.quantizable_input
            }
            per_layer = {name: ErrorAccumulator() for name in assignments}
            output = ErrorAccumulator(self.data.logits)
            failure = None
            try:
                for chunk in self.chunks():
                    cache = self.cache(chunk)
                    env = rerun(self.prepared, cache, [n for n in self.prepared.nodes if n.op != "placeholder"],
                                self.overrides(assignments))
                    output.update(primary_output(cache[self.prepared.output_node]), primary_output(env[self.prepared.output_node]))
                    with torch.inference_mode():
                        for name, (lwf, laf) in assignments.items():
                            for site in self.table.sites[name]:
                                fp_args, fp_kwargs = load_args(site.node, cache)
                                q_args, q_kwargs = load_args(site.node, env, cache)
                                reference = site.local(self.gm, fp_args, fp_kwargs, None, None, cache[site.node])
                                quantized = site.local(self.gm, q_args, q_kwargs, self.weight(name, lwf),
                                                       self.act_fn(site, laf), env[site.node])
                                per_layer[name].update(reference, quantized)
            except Exception as exc:  # noqa: BLE001
                failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if failure is None:
                results.append(CumulativeResult(
                    target, wf.name_for("weight") if wf else None, af.name_for("activation") if af else None,
                    {name: acc.result() for name, acc in per_layer.items()}, output.result(),
                ))
        return results

    # histograms -----------------------------------------------------------------------------

    def histograms(self, layers: list[Layer]) -> dict[str, LayerHistograms]:
        bins = self.config.histogram_bins
        out = {}
        for layer in layers:
            w = self.table.weight(layer.name).detach().float()
            lo, hi = float(w.min()), float(w.max())
            if lo == hi:
                lo, hi = lo - 0.5, hi + 0.5
            edges = np.linspace(lo, hi, bins + 1)
            fp32 = np.histogram(w.numpy(), bins=edges)[0]
            quantized, clip = {}, {}
            for wf in self.config.parsed_weight_formats():
                wq = self.weight(layer.name, wf)
                wlo, whi = self.weight_range(layer.name, wf)
                name = wf.name_for("weight")
                quantized[name] = tuple(np.histogram(np.clip(wq.numpy(), lo, hi), bins=edges)[0].astype(float))
                clip[name] = (float(wlo.min()), float(whi.max()))
            rows = w.movedim(layer.channel_axis, 0).reshape(w.shape[layer.channel_axis], -1) if w.dim() > 1 else w.reshape(1, -1)
            out[layer.name] = LayerHistograms(
                weight=TensorHistograms(Histogram(tuple(edges), tuple(fp32.astype(float))), quantized, clip),
                activation=self._activation_histogram(layer, bins),
                channel_min=tuple(rows.amin(dim=1).tolist()),
                channel_max=tuple(rows.amax(dim=1).tolist()),
            )
        return out

    def _activation_histogram(self, layer: Layer, bins: int) -> TensorHistograms | None:
        site = self.table.sites[layer.name][0]
        hist = self._act_hists.get((site.node.name, 0))
        if hist is None or not layer.quantizable_input:
            return None
        fine_edges, fine_counts = np.asarray(hist.edges), np.asarray(hist.counts)
        edges = np.linspace(fine_edges[0], fine_edges[-1], bins + 1)
        centers = torch.tensor((fine_edges[:-1] + fine_edges[1:]) / 2, dtype=torch.float32)
        fp32 = np.histogram(centers.numpy(), bins=edges, weights=fine_counts)[0]
        quantized, clip = {}, {}
        for af in self.config.parsed_act_formats():
            name = af.name_for("activation")
            # Moving each fine bin's count to where its centre quantizes to: exact up to 1/2048 of the range.
            q_centers = self.act_fn(site, af)(0, centers).numpy()
            quantized[name] = tuple(np.histogram(np.clip(q_centers, edges[0], edges[-1]), bins=edges, weights=fine_counts)[0])
            rng = self._act_ranges.get((site.node.name, 0, af))
            clip[name] = (float(rng[0]), float(rng[1])) if rng else (float(fine_edges[0]), float(fine_edges[-1]))
        return TensorHistograms(Histogram(tuple(edges), tuple(fp32.astype(float))), quantized, clip)


def _compose(site: Site, gm: torch.fx.GraphModule, weight: torch.Tensor | None, act: ActFn | None, previous: Any) -> Callable:
    """A node override running `site` quantized. Two layers can share a node (attention's two
    projections): then both quantizations apply in one call."""
    if previous is not None and hasattr(previous, "parts"):
        parts = previous.parts + [(site, weight, act)]
    else:
        parts = [(site, weight, act)]

    def override(node, args, kwargs):
        resolved = [(s, w() if callable(w) else w, a) for s, w, a in parts]
        if len(resolved) == 1:
            s, w, a = resolved[0]
            return s.run(gm, args, kwargs, w, a)
        return _run_attention_pair(resolved, gm, args, kwargs)

    override.parts = parts  # type: ignore[attr-defined]
    return override


def _run_attention_pair(parts: list, gm, args, kwargs) -> Any:
    from analysis.layers import AttentionInProjSite, AttentionOutProjSite

    in_part = next((p for p in parts if isinstance(p[0], AttentionInProjSite)), None)
    out_part = next((p for p in parts if isinstance(p[0], AttentionOutProjSite)), None)
    if in_part is None or out_part is None:
        raise RuntimeError("two quantized layers share one graph node in an unsupported way")
    in_site, in_w, in_act = in_part
    out_site, out_w, out_act = out_part
    bound, _ = in_site._quantized_qkv(args, kwargs, in_act)
    module = in_site.module
    overrides = {} if in_w is None else {"in_proj_weight": in_w}
    eye = torch.eye(module.embed_dim, dtype=out_site.weight.dtype)
    context_overrides = dict(overrides, **{"out_proj.weight": eye})
    if module.out_proj.bias is not None:
        context_overrides["out_proj.bias"] = torch.zeros(module.embed_dim, dtype=eye.dtype)
    reference = torch.func.functional_call(module, overrides, bound.args, bound.kwargs)
    context = torch.func.functional_call(module, context_overrides, bound.args, bound.kwargs)[0]
    if out_act is not None:
        context = out_act(0, context)
    out = torch.nn.functional.linear(context, out_site.weight if out_w is None else out_w, module.out_proj.bias)
    return (out,) + tuple(reference[1:])


def _label(trial: Trial) -> str:
    from analysis.results import trial_format

    return trial_format(trial.target, *trial.names)


def _update_error_histogram(acc: _Accumulators, error: torch.Tensor, bins: int = 64) -> None:
    values = error.reshape(-1)
    if acc.error_edges is None:  # the first chunk fixes the edges; later chunks clip into them
        bound = float(values.abs().max()) if values.numel() else 0.0
        bound = bound * 1.25 if bound > 0 else 1e-12  # headroom for later chunks and tied sites
        acc.error_edges = np.linspace(-bound, bound, bins + 1)
        acc.error_counts = np.zeros(bins)
    lo, hi = float(acc.error_edges[0]), float(acc.error_edges[-1])
    acc.error_counts += torch.histc(values.clamp(lo, hi), bins=bins, min=lo, max=hi).double().numpy()


def _finish(trial: Trial, acc: _Accumulators) -> TrialResult:
    weight_name, act_name = trial.names
    if acc.failure is not None:
        return TrialResult(trial.layer, trial.target, weight_name, act_name, error=acc.failure)
    histogram = None
    if acc.error_edges is not None:
        histogram = Histogram(tuple(acc.error_edges.tolist()), tuple(acc.error_counts.tolist()))
    return TrialResult(
        trial.layer, trial.target, weight_name, act_name,
        local=acc.local.result(), output=acc.output.result() if acc.output is not None else None,
        error_histogram=histogram,
    )


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        quantlens_version = version("quantlens")
    except PackageNotFoundError:
        quantlens_version = "unknown"
    return {"quantlens": quantlens_version, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def analyze(model: Any, data: Dataset, config: AnalysisConfig | None = None, *,
            progress: ProgressFn | None = None, on_result: Callable[[TrialResult], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> AnalysisResult:
    """Quantize each layer in isolation in each format and measure local and output error.

    `model` is an `nn.Module` (never modified) or a `torch.export.ExportedProgram`; `data` supplies
    calibration samples. `on_result` receives each finished trial as it completes.
    """
    analyzer = Analyzer(model, data, config or AnalysisConfig(), progress, should_stop)
    return analyzer.run(on_result=on_result)
