"""The per-layer isolation sweep: quantize one layer at a time, measure what it costs.

How it stays fast (see benchmarks/bench_sweep.py for the figures):
1. FP32 values of every graph node are captured once per chunk of samples (by the simulator).
2. A trial re-executes only the layer's descendants, reading everything else from that cache;
   local error falls out of the same pass (the layer's node sees FP32 inputs).
3. The cache has a byte bound. Samples are split into chunks that fit; all statistics are sums
   over samples, so the chunking changes memory use, not the numbers (beyond float32 rounding).

The quantizers themselves live in `analysis.quantsim.QuantSim`; this module only decides which
trials to run and accumulates their errors.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from analysis.config import CHECKPOINT_SECONDS, AnalysisConfig
from analysis.data import Dataset
from analysis.estimate import NoiseEstimate, OutputGradients, node_difference, output_gradients
from analysis.formats import Format
from analysis.graph import load_args
from analysis.hooks import build_simulator
from analysis.layers import Layer, weight_coverage
from analysis.metrics import ErrorAccumulator, ErrorHistogram, UpdateLog
from analysis.quantsim import ProgressFn, QuantSim
from analysis.results import (
    TARGETS, AnalysisResult, CumulativeResult, Histogram, LayerHistograms, TensorHistograms, TrialResult,
)

__all__ = ["AnalysisCancelled", "AnalysisConfig", "ChunkPartial", "Sweep", "SweepState", "Trial", "analyze",
           "checkpoint_interval", "plan_trials"]

TrialKey = tuple[str, str, str]  # Trial.key / TrialResult.key: (layer, target, format label)
PHASES = ("sweep", "verify")  # the pass over every trial, then --verify's exact re-measurement


class AnalysisCancelled(RuntimeError):
    """Raised when `should_stop` asked the sweep to stop; finished trials were already reported."""


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

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.layer, self.target, _label(self))


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


@dataclass
class _Accumulators:
    """One trial's running sums. Everything stays on the device until `_finish` reads it back."""

    local: ErrorAccumulator | UpdateLog  # an UpdateLog on one chunk of a data-parallel sweep
    output: ErrorAccumulator | None  # exact output metrics
    estimate: NoiseEstimate | None = None  # estimated output metrics (analysis.estimate)
    error_histogram: ErrorHistogram = field(default_factory=ErrorHistogram)
    failure: str | None = None

    def state(self) -> dict[str, Any]:
        """Plain numbers (JSON-ready, exact through `json`): what `from_state` rebuilds these sums from."""
        return {"local": self.local.state(), "output": None if self.output is None else self.output.state(),
                "estimate": None if self.estimate is None else self.estimate.state(),
                "error_histogram": self.error_histogram.state(), "failure": self.failure}

    @classmethod
    def from_state(cls, state: Any, mode: str, logits: bool) -> _Accumulators:
        """The sums `state()` described, for a trial measured in output-metrics `mode`; ValueError
        (one line) for anything else."""
        keys = {"local", "output", "estimate", "error_histogram", "failure"}
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"a trial's sums need the keys {', '.join(sorted(keys))}")
        if (state["output"] is None) == (mode == "exact") or (state["estimate"] is None) == (mode == "estimated"):
            raise ValueError(f"a trial's sums are not those of output metrics {mode!r}")
        if state["failure"] is not None and not isinstance(state["failure"], str):
            raise ValueError("a trial's failure must be a message or null")
        output = None if state["output"] is None else ErrorAccumulator.from_state(state["output"])
        if output is not None and output.logits != logits:
            raise ValueError("a trial's output sums were taken with another reading of the outputs (logits)")
        return cls(ErrorAccumulator.from_state(state["local"]), output,
                   None if state["estimate"] is None else NoiseEstimate.from_state(state["estimate"]),
                   ErrorHistogram.from_state(state["error_histogram"]), state["failure"])


@dataclass(frozen=True)
class SweepState:
    """Where a single-process sweep stands: `Sweep.run` reports one to its `checkpoint` callback
    after every chunk of samples but the last of a pass, and within a chunk after a trial (at most
    every `checkpoint_every` seconds), and continues from one given as `start`. Plain data
    (`to_dict` is JSON-ready and exact through `json`); where it is kept is the caller's business
    (`analysis.runs` keeps it in the run folder).

    phase: "sweep" (every unfinished trial) or "verify" (`--verify`'s exact re-measurement);
    chunks: the chunk boundaries it was taken with; done: chunks of that phase completed;
    trials: each unfinished trial's running sums; verified: the trials the verify phase re-measures;
    ahead: the trials whose sums already hold chunk `done` too (a state taken within that chunk),
    which a continued sweep does not run on it again."""

    phase: str
    chunks: tuple[tuple[int, int], ...]
    done: int
    trials: dict[TrialKey, dict[str, Any]]
    verified: tuple[TrialKey, ...] = ()
    ahead: tuple[TrialKey, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "chunks": [list(c) for c in self.chunks], "done": self.done,
                "trials": [[list(key), state] for key, state in self.trials.items()],
                "verified": [list(key) for key in self.verified], "ahead": [list(key) for key in self.ahead]}

    @classmethod
    def from_dict(cls, payload: Any) -> SweepState:
        """The state `to_dict` wrote (one without `ahead`, as written before states were taken within
        a chunk, has none); ValueError (one line) for anything else. The trials' sums are checked
        when a sweep restores them (`Sweep.restore`), which knows their mode."""
        keys = {"phase", "chunks", "done", "trials", "verified"}
        if not isinstance(payload, dict) or set(payload) not in (keys, keys | {"ahead"}):
            raise ValueError("not a sweep state: expected the keys phase, chunks, done, trials, verified, ahead")
        if payload["phase"] not in PHASES:
            raise ValueError(f"sweep state: phase must be one of {', '.join(PHASES)}, not {payload['phase']!r}")
        chunks, done = payload["chunks"], payload["done"]
        if not isinstance(chunks, list) or not all(_ints(c, 2) for c in chunks):
            raise ValueError("sweep state: chunks must be a list of [start, end] sample indices")
        if not _ints([done], 1):
            raise ValueError(f"sweep state: done must be a count of chunks, not {done!r}")
        trials, verified = payload["trials"], payload["verified"]
        if not isinstance(trials, list) or not all(isinstance(t, list) and len(t) == 2 and _key(t[0])
                                                   and isinstance(t[1], dict) for t in trials):
            raise ValueError("sweep state: trials must be a list of [[layer, target, format], sums]")
        ahead = payload.get("ahead", [])
        for name, value in (("verified", verified), ("ahead", ahead)):
            if not isinstance(value, list) or not all(_key(k) for k in value):
                raise ValueError(f"sweep state: {name} must be a list of [layer, target, format]")
        return cls(payload["phase"], tuple((a, b) for a, b in chunks), done,
                   {tuple(key): state for key, state in trials}, tuple(tuple(k) for k in verified),
                   tuple(tuple(k) for k in ahead))


def _ints(values: Any, length: int) -> bool:
    return (isinstance(values, list) and len(values) == length
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values))


def _key(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)


@dataclass(frozen=True)
class ChunkPartial:
    """One trial's sums over one chunk of samples, from fresh accumulators: what a data-parallel
    worker returns (`Sweep.chunk_partials`); `Sweep.merge_chunks` folds every chunk's, in chunk
    order, into the row `Sweep.run` writes."""

    key: tuple[str, str, str]
    local: UpdateLog
    output: UpdateLog | None  # exact output metrics
    estimate: NoiseEstimate | None  # estimated output metrics
    error_histogram: ErrorHistogram
    failure: str | None


class Sweep:
    """The isolation sweep over a `QuantSim`; `run` performs it."""

    def __init__(self, model: Any, data: Dataset, config: AnalysisConfig | None = None, *,
                 progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
                 sim: QuantSim | None = None) -> None:
        self.config = config or AnalysisConfig()
        self.model = model  # what a distributed run sends its workers
        self.progress = progress
        self.should_stop = should_stop
        cache_bytes = self.config.cache_bytes
        if self.config.output_metrics == "estimated":
            # The estimate holds, per chunk, the FP32 cache and K output gradients of every analysed
            # layer (each the cache's size); one forward's autograd state is mostly the cached values
            # themselves (saved tensors are not copies), and no suffix is re-run. The simulator gives
            # its cache a third of what it is handed, so handing it 3/(3 + K) of the bound gives the
            # cache 1/(3 + K), the gradients K/(3 + K) and leaves 2/(3 + K) for the backward's
            # transient buffers and the trials' temporaries — the bound holds (on a GPU too, where the
            # simulator also caps chunks at half the free memory) with chunks 2.4× larger (K = 2) than
            # a flat 1/(2 + K) share of a third: fewer, larger chunks cost less per trial.
            cache_bytes = max(1 << 16, cache_bytes * 3 // (3 + self.config.estimate_projections))
        # A distributed sweep's own simulator only plans and calibrates (on the CPU); its workers
        # place their copies on config.device (analysis.distributed).
        device = "cpu" if self.config.distributed else self.config.device
        if sim is None:  # the engine choice: graph, hooks, or the graph falling back to hooks
            sim = build_simulator(model, data, self.config, cache_bytes=cache_bytes, device=device)
        self.sim = sim
        if self.config.layers is not None:
            unknown = set(self.config.layers) - set(self.sim.layer_names)
            if unknown:
                raise ValueError(f"unknown layer(s) {sorted(unknown)[:3]}; see `quantlens analyze` output for names")

    @property
    def data(self) -> Dataset:
        return self.sim.data

    @property
    def layers(self) -> list[Layer]:
        if self.config.layers is None:
            return self.sim.layers
        return [layer for layer in self.sim.layers if layer.name in self.config.layers]

    def plan(self) -> list[Trial]:
        return plan_trials(self.layers, self.config)

    def check_runnable(self) -> None:
        """ValueError (one line) when `run` would have nothing to do: no formats, or no layers."""
        if not self.config.weight_formats and not self.config.act_formats:
            raise ValueError("nothing to sweep: give at least one weight or activation format")
        if self.config.distributed:
            from analysis.distributed import check_distributed

            check_distributed(self.config)
        if not self.layers:
            skipped = ", ".join(f"{s.name} ({s.kind})" for s in self.sim.table.skipped[:4]) or "none"
            raise ValueError(f"the model has no quantizable layers (Linear, Conv, Embedding, attention projections); "
                             f"modules with weights that were skipped: {skipped}")

    def calibrate(self) -> None:
        """Calibrate the inputs of the analysed layers (when activation formats are swept)."""
        if self.config.act_formats:
            self.sim.calibrate_activations([s for layer in self.layers if layer.quantizable_input
                                            for s in self.sim.sites(layer.name)])

    def run(self, on_result: Callable[[TrialResult], None] | None = None,
            skip: set[TrialKey] | None = None, *, earlier: Iterable[TrialResult] = (),
            checkpoint: Callable[[SweepState], None] | None = None, start: SweepState | None = None,
            checkpoint_every: float = CHECKPOINT_SECONDS) -> AnalysisResult:
        """The sweep. `on_result` receives each trial as it finishes; `skip`: keys of trials finished
        earlier, not run again, and `earlier` the rows they reported, in order (a trial `--verify`
        re-measured has two: the estimate, then the measurement). `--verify` chooses from their
        estimates and this run's, and re-measures those not measured yet (reported and returned again).

        `checkpoint` is called with the sweep's state after every completed chunk of samples but the
        last of a pass, and within a chunk after a trial once `checkpoint_every` seconds have passed
        since it was last called (0: after every trial; not in the sweep's last chunk, where each
        trial is reported as it finishes); `start` continues from such a state, running a chunk's
        trials that its sums do not hold yet (ValueError, one line, when it does not fit: see
        `restore`). A distributed sweep resumes from finished trials only and takes no `start`; it
        calls no `checkpoint`."""
        self.check_runnable()
        saver = _Checkpoints(checkpoint, checkpoint_every)
        if self.config.distributed:  # the same sweep over Ray workers (by layer, or by chunk when estimated)
            if start is not None:
                raise ValueError("a sweep over workers resumes from finished trials, not from a chunk "
                                 "checkpoint; pass no start state")
            from analysis.distributed import run_distributed

            return run_distributed(self, on_result=on_result, skip=skip)
        sim = self.sim
        started = time.perf_counter()
        layers = self.layers
        plan = self.plan()
        skip = set(skip or ())
        trials = [t for t in plan if t.key not in skip]
        known: dict[TrialKey, TrialResult] = {}  # each earlier trial's first row: what --verify chooses by
        measured = set()  # earlier trials --verify already re-measured (a second row)
        for row in earlier:
            if row.key not in skip:
                continue
            if row.key in known:
                measured.add(row.key)
            else:
                known[row.key] = row
        restored = self.restore(start, skip) if start is not None else {}
        self.calibrate()
        chunks = sim.chunks()
        mode = self.config.output_metrics
        first = 0 if start is None else (start.done if start.phase == "sweep" else len(chunks))
        by_key = {t.key: t for t in plan}
        chosen = [by_key[key] for key in start.verified] if start is not None and start.phase == "verify" else None
        if chosen is not None:
            verify = len(chosen)
        else:
            verify = self.verification_budget([t for t in plan if t.key in known or t.key not in skip])
        accumulators = {id(t): restored.get(t.key) or self._accumulators(mode) for t in trials}
        descendants = self._descendants(layers)
        perturbed = self._perturbed()
        results: list[TrialResult] = []
        progress = _Progress((len(trials) + verify) * len(chunks), self.progress, self.should_stop)
        # The trials whose sums already hold the chunk the state was taken in (in plan order).
        ahead = [t.key for t in (trials if chosen is None else chosen) if start is not None and t.key in start.ahead]
        # Reported before the first trial, from where this run starts (a resumed run: its chunks
        # done, and its trials ahead), so a progress display shows the size of the job up front.
        progress.start(first * len(trials) + (start.done * verify if chosen is not None else 0) + len(ahead))

        def finish(trial: Trial) -> None:
            results.append(_finish(trial, accumulators[id(trial)]))
            if on_result:  # streamed as each trial finishes (a killed run resumes from here)
                on_result(results[-1])

        def state(done: int, ran: list[TrialKey]) -> SweepState:
            return SweepState("sweep", tuple(chunks), done, {t.key: accumulators[id(t)].state() for t in trials},
                              ahead=tuple(ran))

        for chunk_index in range(first, len(chunks) if trials else 0):
            last = chunk_index == len(chunks) - 1
            ran = ahead if chunk_index == first else []  # trials done with this chunk, in the order they ran
            todo = [t for t in trials if t.key not in set(ran)]
            after = finish if last else saver.within(ran, len(trials), lambda c=chunk_index, r=ran: state(c, r))
            self._chunk_pass(chunks[chunk_index], todo, accumulators, descendants, perturbed, progress, after)
            if not last:
                saver.report(lambda c=chunk_index: state(c + 1, []))
        if verify:  # verified rows are reported again, now exact; a reader keeps the last row per trial
            if chosen is None:
                rows = {**known, **{r.key: r for r in results}}
                estimated = [rows[t.key] for t in plan if t.key in rows]
                chosen = [by_key[estimated[i].key] for i in self.verification_choice(estimated)
                          if estimated[i].key not in measured]
                restored, first_verify, ahead = {}, 0, []
            else:  # continued from a state of the verify pass (the sweep's ahead were its trials)
                first_verify = start.done
            verified = self._verify(chosen, restored, (first_verify, ahead), descendants, progress, on_result, saver)
            order = {t.key: i for i, t in enumerate(plan)}
            results = sorted({**{r.key: r for r in results}, **{r.key: r for r in verified}}.values(),
                             key=lambda r: order[r.key])
        cumulative = self._cumulative(layers) if self.config.cumulative else ()
        return self.result(results, cumulative, self.histograms(layers), time.perf_counter() - started)

    def restore(self, state: SweepState, skip: set[TrialKey] | None = None) -> dict[TrialKey, _Accumulators]:
        """The running sums `state` holds, checked against this sweep with the trials in `skip`
        finished: ValueError (one line, saying what differs) when it is not a state of this sweep's
        chunks, plan and output metrics."""
        if not isinstance(state, SweepState):
            raise TypeError(f"a sweep continues from a SweepState, not {type(state).__name__}")
        chunks = tuple(self.sim.chunks())
        if state.chunks != chunks:
            raise ValueError(f"it was taken with other chunks of samples ({len(state.chunks)} chunks, now "
                             f"{len(chunks)} of up to {self.sim.chunk_size}): the cache bound (--cache-mb), device "
                             "or sample count differs")
        if state.done >= len(chunks) or state.phase not in PHASES:
            raise ValueError(f"it says {state.done} of {len(chunks)} chunks of the {state.phase!r} pass are done, "
                             "which no sweep writes")
        plan = {t.key for t in self.plan()}
        unfinished = plan - set(skip or ())
        if set(state.trials) - plan:
            raise ValueError("it holds trials that are not in this run's plan")
        if set(state.ahead) - set(state.trials):
            raise ValueError("it names trials as done with its running chunk that it holds no sums of")
        if state.phase == "sweep":
            missing = unfinished - set(state.trials)
            if missing:
                raise ValueError(f"it lacks the sums of {len(missing)} unfinished trial(s), e.g. {min(missing)}")
            mode, keys = self.config.output_metrics, sorted(unfinished)
        else:
            if self.config.output_metrics != "estimated" or not self.config.verify:
                raise ValueError("it is a state of --verify's pass, which this run does not make")
            if unfinished:
                raise ValueError(f"it is a state of --verify's pass, but {len(unfinished)} trial(s) are not finished")
            if not set(state.verified) <= plan or set(state.trials) != set(state.verified):
                raise ValueError("its verified trials are not this run's or lack their sums")
            mode, keys = "exact", list(state.verified)
        restored = {}
        for key in keys:
            try:
                restored[key] = _Accumulators.from_state(state.trials[key], mode, self.data.logits)
            except (ValueError, TypeError, OverflowError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ValueError(f"the sums of trial {'/'.join(key)} are unusable: {reason}") from None
        return restored

    def result(self, trials: list[TrialResult], cumulative: Any, histograms: dict[str, LayerHistograms],
               seconds: float) -> AnalysisResult:
        """The sweep's result from its rows, cumulative view and histograms (what `run` returns)."""
        sim = self.sim
        return AnalysisResult(
            config=self.config.to_dict(),
            layers=tuple(sim.layers),
            skipped=tuple(sim.table.skipped),
            trials=tuple(trials),
            cumulative=tuple(cumulative),
            histograms=histograms,
            model={"source": sim.prepared.source, "engine": sim.engine, "folded_batchnorms": list(sim.prepared.folded_batchnorms),
                   "weight_coverage": weight_coverage(sim.table, sim.gm)},
            data={"samples": len(self.data), "task": self.data.task, "fingerprint": self.data.fingerprint(),
                  "chunks": len(sim.chunks())},
            versions=versions(),
            seconds=seconds,
        )

    def _descendants(self, layers: list[Layer]) -> dict[str, list]:
        """The nodes a trial of each layer re-runs for exact output metrics."""
        sim = self.sim
        return {layer.name: sim.prepared.descendants([s.node for s in sim.sites(layer.name)]) for layer in layers}

    def _perturbed(self) -> list:
        """The nodes whose output gradients the estimate takes: every analysed layer's (the same set
        wherever a chunk runs, so the backward pass is the same)."""
        return list(dict.fromkeys(s.node for layer in self.layers for s in self.sim.sites(layer.name)))

    def _chunk_pass(self, chunk: tuple[int, int], trials: list[Trial], accumulators: dict, descendants: dict,
                    perturbed: list, progress: "_Progress", finished: Callable[[Trial], None] | None = None) -> None:
        """Every trial on one chunk of samples, into its accumulators; `finished(trial)` after each."""
        sim = self.sim
        grads = None
        if self.config.output_metrics == "estimated":  # its forward with autograd doubles as the FP32 capture
            grads = self._gradients(chunk, perturbed)
            cache = sim.adopt_cache(chunk, grads.values)
            grads.values = None
        else:
            cache = sim.cache(chunk)
        reference_out = sim.output_of(cache)
        mask = sim.output_mask(chunk)
        local_refs: dict[str, list[torch.Tensor]] = {}
        for trial in trials:
            progress.check()
            acc = accumulators[id(trial)]
            if acc.failure is None:
                try:
                    self._run_trial(trial, cache, reference_out, descendants[trial.layer], local_refs, acc, grads,
                                    mask=mask)
                except Exception as exc:  # noqa: BLE001 — one failing layer must not end the sweep
                    acc.failure = _one_line(exc)
            progress.step(trial.layer)
            if finished is not None:
                finished(trial)

    # data parallel: chunks of samples computed apart, merged in chunk order -------------------

    def chunk_partials(self, chunk: tuple[int, int], trials: list[Trial], bounds: dict | None = None,
                       progress: ProgressFn | None = None) -> list[ChunkPartial]:
        """`trials` (of this sweep's plan) on one chunk of `self.sim.chunks()`, each from fresh sums:
        one chunk's share of `run`, for a worker of a data-parallel sweep. `bounds`: each trial's
        error-histogram bound from the first chunk's partials (`ChunkPartial.error_histogram.bound`),
        so every chunk bins on the edges a single run fixes on its first chunk."""
        mode, bounds = self.config.output_metrics, bounds or {}
        logits = self.data.logits
        accumulators = {id(t): _Accumulators(UpdateLog(), UpdateLog(logits) if mode == "exact" else None,
                                             NoiseEstimate() if mode == "estimated" else None,
                                             ErrorHistogram(bound=bounds.get(t.key))) for t in trials}
        layers = [layer for layer in self.layers if layer.name in {t.layer for t in trials}]
        descendants = self._descendants(layers) if mode == "exact" else {layer.name: [] for layer in layers}
        self._chunk_pass(chunk, trials, accumulators, descendants, self._perturbed(),
                         _Progress(len(trials), progress, self.should_stop))
        return [ChunkPartial(t.key, a.local, a.output, a.estimate, a.error_histogram, a.failure)
                for t in trials for a in (accumulators[id(t)],)]

    def merge_chunks(self, trials: list[Trial], chunks: list[dict[tuple[str, str, str], ChunkPartial]]) -> list[TrialResult]:
        """The rows of `trials` from their `chunk_partials` of every chunk, given in chunk order (one
        dict by trial key per chunk). Each trial's sums are replayed chunk after chunk, the additions
        `run` makes in the order it makes them: the rows are `run`'s bit for bit. A trial that failed
        on a chunk is failed with the first such chunk's reason, as `run` reports it."""
        results = []
        for trial in trials:
            acc = self._accumulators(self.config.output_metrics)
            for partials in chunks:
                part = partials[trial.key]
                if part.failure is not None:
                    acc.failure = part.failure
                    break
                try:
                    part.local.replay(acc.local)
                    if acc.output is not None and part.output is not None:
                        part.output.replay(acc.output)
                    if acc.estimate is not None and part.estimate is not None:
                        acc.estimate.merge(part.estimate)
                    acc.error_histogram.merge(part.error_histogram)
                except ValueError as exc:
                    acc.failure = _one_line(exc)
                    break
            results.append(_finish(trial, acc))
        return results

    def verification_choice(self, results: list[TrialResult]) -> list[int]:
        """Indices into `results` (estimated rows, in plan order) that `--verify K` re-measures: the
        K rows of each format label whose estimated output noise is largest."""
        by_label: dict[tuple[str, str], list[int]] = {}
        for index, result in enumerate(results):
            if result.ok and result.output is not None:
                by_label.setdefault((result.target, result.format), []).append(index)
        return sorted(index for indices in by_label.values()
                      for index in sorted(indices, key=lambda i: -results[i].output.mse)[:self.config.verify])

    def _accumulators(self, mode: str) -> _Accumulators:
        logits = self.data.logits
        return _Accumulators(ErrorAccumulator(), ErrorAccumulator(logits) if mode == "exact" else None,
                             NoiseEstimate() if mode == "estimated" else None)

    def _gradients(self, chunk: tuple[int, int], nodes: list) -> OutputGradients:
        try:
            return output_gradients(self.sim, chunk, nodes, self.config.estimate_projections, self.config.seed,
                                    keep_values=True)
        except Exception as exc:  # noqa: BLE001 — say which mode needs what, not a bare autograd error
            raise ValueError(f"estimated output metrics need a backward pass through the model, which failed "
                             f"({_one_line(exc)}); use --output-metrics exact") from None

    def verification_budget(self, trials: list[Trial]) -> int:
        """How many trials `--verify K` re-measures: K per format label (fewer where a label has fewer)."""
        if self.config.output_metrics != "estimated" or not self.config.verify:
            return 0
        per_label: dict[tuple[str, str], int] = {}
        for trial in trials:
            per_label[(trial.target, _label(trial))] = per_label.get((trial.target, _label(trial)), 0) + 1
        return sum(min(n, self.config.verify) for n in per_label.values())

    def _verify(self, chosen: list[Trial], restored: dict[TrialKey, _Accumulators],
                where: tuple[int, list[TrialKey]], descendants: dict, progress: "_Progress",
                on_result: Callable[[TrialResult], None] | None, saver: "_Checkpoints") -> list[TrialResult]:
        """Re-measure the `chosen` trials exactly, from chunk `first` on (`where` = (first, the trials
        whose sums in `restored` hold that chunk already; the sums of the chunks before it are there
        too)); their rows become `exact`. Nothing is reported before the last trial of the last
        chunk, so its state is saved within every chunk, the last one included."""
        first, ahead = where
        sim = self.sim
        chunks = sim.chunks()
        if not chosen:  # every trial of the budget failed: nothing to re-measure
            progress.total = progress.done
            return []
        accumulators = {t.key: restored.get(t.key) or self._accumulators("exact") for t in chosen}
        # The budget counted every trial of a label; failed trials are not re-measured.
        progress.total = progress.done + len(chosen) * (len(chunks) - first) - len(ahead)

        def state(done: int, ran: list[TrialKey]) -> SweepState:
            return SweepState("verify", tuple(chunks), done, {t.key: accumulators[t.key].state() for t in chosen},
                              tuple(t.key for t in chosen), tuple(ran))

        for chunk_index in range(first, len(chunks)):
            cache = sim.cache(chunks[chunk_index])
            reference_out = sim.output_of(cache)
            mask = sim.output_mask(chunks[chunk_index])
            local_refs: dict[str, list[torch.Tensor]] = {}
            ran = ahead if chunk_index == first else []
            after = saver.within(ran, len(chosen), lambda c=chunk_index, r=ran: state(c, r))
            for trial in [t for t in chosen if t.key not in set(ran)]:
                progress.check()
                acc = accumulators[trial.key]
                if acc.failure is None:
                    try:
                        self._run_trial(trial, cache, reference_out, descendants[trial.layer], local_refs, acc, None,
                                        mask=mask)
                    except Exception as exc:  # noqa: BLE001
                        acc.failure = _one_line(exc)
                progress.step(trial.layer)
                after(trial)
            if chunk_index < len(chunks) - 1:
                saver.report(lambda c=chunk_index: state(c + 1, []))
        out = [_finish(trial, accumulators[trial.key]) for trial in chosen]
        if on_result:
            for result in out:
                on_result(result)
        return out

    def _run_trial(self, trial: Trial, cache: dict, reference_out: torch.Tensor,
                   affected: list, local_refs: dict[str, list[torch.Tensor]], acc: _Accumulators,
                   grads: OutputGradients | None = None, mask: torch.Tensor | None = None) -> None:
        """One trial on one chunk. `mask`: the chunk's output positions that count (padding does not)."""
        sim = self.sim
        sites = sim.sites(trial.layer)
        weight = sim.quantized_weight(trial.layer, trial.weight_format)
        acts = [sim.activation_quantizer(site, trial.act_format) for site in sites]
        if trial.layer not in local_refs:
            local_refs.clear()  # keep only the current layer's references
            local_refs[trial.layer] = []
            for site in sites:
                args, kwargs = load_args(site.node, cache)
                with torch.inference_mode():
                    local_refs[trial.layer].append(site.local(sim.gm, args, kwargs, None, None, cache[site.node]))
        env: dict = {}
        if acc.output is not None:
            env = sim.rerun(cache, affected, sim.overrides({trial.layer: (trial.weight_format, trial.act_format)}))
            acc.output.update(reference_out, sim.output_of(env), mask)
        deltas: dict = {}
        with torch.inference_mode():
            for site, act, reference in zip(sites, acts, local_refs[trial.layer]):
                args, kwargs = load_args(site.node, cache)  # local error: FP32 inputs, always
                inputs_changed = any(n in env for n in site.node.all_input_nodes)
                value = env[site.node] if site.node in env and not inputs_changed else site.run(sim.gm, args, kwargs, weight, act)
                local = site.local(sim.gm, args, kwargs, weight, act, value)
                acc.local.update(reference, local, histogram=acc.error_histogram)
                if acc.estimate is not None:
                    deltas[site.node] = node_difference(value, cache[site.node])
        if acc.estimate is not None and grads is not None:
            acc.estimate.update(grads, deltas)

    def cumulative_view(self) -> list[CumulativeResult]:
        """The cumulative view of the analysed layers (what `run` adds with `cumulative=True`)."""
        return self._cumulative(self.layers)

    def _cumulative(self, layers: list[Layer]) -> list[CumulativeResult]:
        """Every analysed layer quantized at once, per uniform configuration. A configuration that
        fails is kept as a record with its error (never dropped in silence)."""
        sim = self.sim
        configs = {(t.target, t.weight_format, t.act_format) for t in plan_trials(layers, self.config)}
        results = []
        for target, wf, af in sorted(configs, key=lambda c: (TARGETS.index(c[0]), str(c[1]), str(c[2]))):
            assignment = {
                layer.name: (wf, af if layer.quantizable_input else None) for layer in layers
                if wf is not None or layer.quantizable_input
            }
            per_layer = {name: ErrorAccumulator() for name in assignment}
            output = ErrorAccumulator(self.data.logits)
            failure = None
            try:
                overrides = sim.overrides(assignment)
                nodes = [n for n in sim.prepared.nodes if n.op != "placeholder"]
                for chunk in sim.chunks():
                    cache = sim.cache(chunk)
                    env = sim.rerun(cache, nodes, overrides)
                    output.update(sim.output_of(cache), sim.output_of(env), sim.output_mask(chunk))
                    with torch.inference_mode():
                        for name, (lwf, laf) in assignment.items():
                            for site in sim.sites(name):
                                fp_args, fp_kwargs = load_args(site.node, cache)
                                q_args, q_kwargs = load_args(site.node, env, cache)
                                reference = site.local(sim.gm, fp_args, fp_kwargs, None, None, cache[site.node])
                                quantized = site.local(sim.gm, q_args, q_kwargs, sim.quantized_weight(name, lwf),
                                                       sim.activation_quantizer(site, laf), env[site.node])
                                per_layer[name].update(reference, quantized)
                per_layer_stats, output_stats = {name: acc.result() for name, acc in per_layer.items()}, output.result()
            except Exception as exc:  # noqa: BLE001
                failure = _one_line(exc)
                per_layer_stats, output_stats = {}, None
            results.append(CumulativeResult(
                target, wf.name_for("weight") if wf else None, af.name_for("activation") if af else None,
                per_layer_stats, output_stats, error=failure,
            ))
        return results

    # histograms -----------------------------------------------------------------------------

    def histograms(self, layers: list[Layer]) -> dict[str, LayerHistograms]:
        sim = self.sim
        bins = self.config.histogram_bins
        out = {}
        for layer in layers:
            w = sim.table.weight(layer.name).detach().float()
            lo, hi = float(w.min()), float(w.max())
            if lo == hi:
                lo, hi = lo - 0.5, hi + 0.5
            edges = np.linspace(lo, hi, bins + 1)
            fp32 = np.histogram(w.cpu().numpy(), bins=edges)[0]
            quantized, clip = {}, {}
            for wf in self.config.parsed_weight_formats():
                wq = sim.quantized_weight(layer.name, wf)
                wlo, whi = sim.weight_range(layer.name, wf)
                name = wf.name_for("weight")
                quantized[name] = tuple(np.histogram(np.clip(wq.float().cpu().numpy(), lo, hi), bins=edges)[0].astype(float))
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
        sim = self.sim
        site = sim.sites(layer.name)[0]
        hist = sim.activation_histogram(site, 0)
        if hist is None or not layer.quantizable_input:
            return None
        fine_edges, fine_counts = np.asarray(hist.edges), np.asarray(hist.counts)
        edges = np.linspace(fine_edges[0], fine_edges[-1], bins + 1)
        centers = torch.tensor((fine_edges[:-1] + fine_edges[1:]) / 2, dtype=torch.float32, device=sim.device)
        fp32 = np.histogram(centers.cpu().numpy(), bins=edges, weights=fine_counts)[0]
        quantized, clip = {}, {}
        for af in self.config.parsed_act_formats():
            if af.block_scaled:  # a value's scale depends on its block's neighbours: bin centres cannot stand in
                continue
            name = af.name_for("activation")
            # Moving each fine bin's count to where its centre quantizes to: exact up to 1/2048 of the range.
            q_centers = sim.activation_quantizer(site, af)(0, centers).cpu().numpy()
            quantized[name] = tuple(np.histogram(np.clip(q_centers, edges[0], edges[-1]), bins=edges, weights=fine_counts)[0])
            if af.scaled and not sim.config.dynamic_activations:
                lo, hi = sim.activation_range(site, 0, af)
                clip[name] = (float(lo), float(hi))
            else:
                clip[name] = (float(fine_edges[0]), float(fine_edges[-1]))
        return TensorHistograms(Histogram(tuple(edges), tuple(fp32.astype(float))), quantized, clip)


def checkpoint_interval(seconds: Any) -> float:
    """`seconds` as the least time between two checkpoints within a chunk (`Sweep.run`'s
    `checkpoint_every`); ValueError (one line) unless it is a number ≥ 0."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise ValueError(f"checkpoint_every must be a number of seconds >= 0 (0: after every trial), not {seconds!r}")
    return float(seconds)


class _Checkpoints:
    """When `Sweep.run` hands its state to its `checkpoint` callback: at the end of a chunk
    (`report`), and within one after a trial once `every` seconds have passed since it last did
    (`within`), so a kill loses the trials of those seconds while big runs are not rewritten after
    every trial."""

    def __init__(self, callback: Callable[[SweepState], None] | None, every: float) -> None:
        self.callback, self.every = callback, checkpoint_interval(every)
        self.last = time.monotonic()

    def report(self, state: Callable[[], SweepState]) -> None:
        if self.callback is not None:
            self.callback(state())
            self.last = time.monotonic()

    def within(self, ran: list[TrialKey], total: int, state: Callable[[], SweepState]) -> Callable[[Trial], None]:
        """What to call after each trial of a chunk of `total` trials: it adds the trial to `ran` (the
        chunk's trials done) and, while some are left (a chunk's end is reported anyway), reports
        `state()` when due."""
        def after(trial: Trial) -> None:
            ran.append(trial.key)
            if len(ran) < total and self.callback is not None and time.monotonic() - self.last >= self.every:
                self.report(state)

        return after


class _Progress:
    """Counts trial steps for the progress callback and honours `should_stop` between them."""

    def __init__(self, total: int, callback: ProgressFn | None, should_stop: Callable[[], bool] | None) -> None:
        self.total, self.done = total, 0
        self.callback, self.should_stop = callback, should_stop

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise AnalysisCancelled(f"stopped after {self.done} of {self.total} trials")

    def start(self, done: int) -> None:
        """Where the sweep starts (steps already done by the run it continues), reported once."""
        self.done = done
        if self.callback:
            self.callback(self.done, self.total, "")

    def step(self, layer: str) -> None:
        self.done += 1
        if self.callback:
            self.callback(self.done, self.total, layer)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _label(trial: Trial) -> str:
    from analysis.results import trial_format

    return trial_format(trial.target, *trial.names)


def _finish(trial: Trial, acc: _Accumulators) -> TrialResult:
    weight_name, act_name = trial.names
    if acc.failure is None:
        try:
            # Also where NaN/Inf seen by any update surfaces: the accumulators defer that check to
            # result() so that updates never wait for the device.
            local, output = acc.local.result(), acc.output.result() if acc.output is not None else None
        except Exception as exc:  # noqa: BLE001 — a trial whose sums are unusable is a failed trial
            acc.failure = _one_line(exc)
    if acc.failure is not None:
        return TrialResult(trial.layer, trial.target, weight_name, act_name, error=acc.failure)
    counted = acc.error_histogram.result()
    histogram = Histogram(*counted) if counted is not None else None
    if acc.estimate is not None:
        try:
            output = acc.estimate.result()
        except Exception as exc:  # noqa: BLE001
            return TrialResult(trial.layer, trial.target, weight_name, act_name, error=_one_line(exc))
    source = None if output is None else ("estimated" if acc.estimate is not None else "exact")
    return TrialResult(
        trial.layer, trial.target, weight_name, act_name,
        local=local, output=output, error_histogram=histogram, output_source=source,
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
    return Sweep(model, data, config, progress=progress, should_stop=should_stop).run(on_result=on_result)
