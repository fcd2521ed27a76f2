"""The per-layer isolation sweep: quantize one layer at a time, measure what it costs.

How it stays fast (see benchmarks/bench_sweep.py for the figures):
1. FP32 values of every graph node are captured once per chunk of samples (by the simulator).
2. A trial re-executes only the layer's descendants, reading everything else from that cache;
   local error falls out of the same pass (the layer's node sees FP32 inputs).
3. The cache has a byte bound. Samples are split into chunks that fit; all statistics are sums
   over samples, so the chunking changes memory use, not the numbers (beyond float32 rounding).

The quantizers themselves live in `analysis.quantsim.QuantSim`; this module only runs the trials
over the chunks and accumulates their errors. What a trial is and the sums it keeps:
`analysis.trials`; the state a resumed run continues from: `analysis.sweep_state`; the cumulative
view and the per-layer histograms a result carries: `analysis.cumulative`, `analysis.layer_histograms`.
"""

from __future__ import annotations

import platform
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch

from analysis.config import CHECKPOINT_SECONDS, AnalysisConfig
from analysis.cumulative import cumulative_view
from analysis.data import Dataset
from analysis.estimate import NoiseEstimate, OutputGradients, node_difference, output_gradients
from analysis.graph import load_args
from analysis.hooks import build_simulator
from analysis.layer_histograms import layer_histograms
from analysis.layers import Layer, weight_coverage
from analysis.metrics import ErrorAccumulator, ErrorHistogram, UpdateLog
from analysis.quantsim import ProgressFn, QuantSim
from analysis.results import AnalysisResult, CumulativeResult, LayerHistograms, TrialResult
from analysis.sweep_state import PHASES, Checkpoints, SweepState, checkpoint_interval
from analysis.trials import ChunkPartial, Trial, TrialKey, TrialSums, finish_trial, one_line, plan_trials, trial_label

# The sweep's public names; its state and trials are defined in analysis.sweep_state and
# analysis.trials and re-exported here, where callers have always found them.
__all__ = ["AnalysisCancelled", "AnalysisConfig", "ChunkPartial", "Sweep", "SweepState", "Trial", "analyze",
           "checkpoint_interval", "plan_trials"]


class AnalysisCancelled(RuntimeError):
    """Raised when `should_stop` asked the sweep to stop; finished trials were already reported."""


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
        self.cluster = None  # a distributed sweep's Ray workers (analysis.distributed.Cluster)
        if self.config.distributed and sim is None:
            from analysis.distributed import Cluster

            # Started before this process prepares its own copy, so that the workers' start-up
            # (Python, torch, Ray, each preparing its copy) runs while it does: that preparation
            # is otherwise a serial stretch of every distributed run (≈ 20 s of a 100M model's).
            self.cluster = Cluster(model, data.take(self.config.num_samples), self.config)
        try:
            if sim is None:  # the engine choice: graph, hooks, or the graph falling back to hooks
                sim = build_simulator(model, data, self.config, cache_bytes=cache_bytes, device=device)
            self.sim = sim
            if self.config.layers is not None:
                unknown = set(self.config.layers) - set(self.sim.layer_names)
                if unknown:
                    raise ValueError(f"unknown layer(s) {sorted(unknown)[:3]}; see `quantlens analyze` output for names")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the Ray workers a distributed sweep started (`run` does when it ends; call this for a
        sweep that will not run). Nothing to do otherwise; safe to call twice."""
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

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
        if self.config.distributed:  # the same sweep over Ray workers (by layer, or by chunk when estimated)
            try:
                self.check_runnable()
                if start is not None:
                    raise ValueError("a sweep over workers resumes from finished trials, not from a chunk "
                                     "checkpoint; pass no start state")
                from analysis.distributed import run_distributed

                return run_distributed(self, on_result=on_result, skip=skip)
            finally:
                self.close()
        self.check_runnable()
        saver = Checkpoints(checkpoint, checkpoint_every)
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
            results.append(finish_trial(trial, accumulators[id(trial)]))
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

    def restore(self, state: SweepState, skip: set[TrialKey] | None = None) -> dict[TrialKey, TrialSums]:
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
                restored[key] = TrialSums.from_state(state.trials[key], mode, self.data.logits)
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
                    perturbed: list, progress: _Progress, finished: Callable[[Trial], None] | None = None) -> None:
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
                    acc.failure = one_line(exc)
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
        accumulators = {id(t): TrialSums(UpdateLog(), UpdateLog(logits) if mode == "exact" else None,
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
                    acc.failure = one_line(exc)
                    break
            results.append(finish_trial(trial, acc))
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

    def _accumulators(self, mode: str) -> TrialSums:
        logits = self.data.logits
        return TrialSums(ErrorAccumulator(), ErrorAccumulator(logits) if mode == "exact" else None,
                             NoiseEstimate() if mode == "estimated" else None)

    def _gradients(self, chunk: tuple[int, int], nodes: list) -> OutputGradients:
        try:
            return output_gradients(self.sim, chunk, nodes, self.config.estimate_projections, self.config.seed,
                                    keep_values=True)
        except Exception as exc:  # noqa: BLE001 — say which mode needs what, not a bare autograd error
            raise ValueError(f"estimated output metrics need a backward pass through the model, which failed "
                             f"({one_line(exc)}); use --output-metrics exact") from None

    def verification_budget(self, trials: list[Trial]) -> int:
        """How many trials `--verify K` re-measures: K per format label (fewer where a label has fewer)."""
        if self.config.output_metrics != "estimated" or not self.config.verify:
            return 0
        per_label: dict[tuple[str, str], int] = {}
        for trial in trials:
            per_label[(trial.target, trial_label(trial))] = per_label.get((trial.target, trial_label(trial)), 0) + 1
        return sum(min(n, self.config.verify) for n in per_label.values())

    def _verify(self, chosen: list[Trial], restored: dict[TrialKey, TrialSums],
                where: tuple[int, list[TrialKey]], descendants: dict, progress: _Progress,
                on_result: Callable[[TrialResult], None] | None, saver: Checkpoints) -> list[TrialResult]:
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
                        acc.failure = one_line(exc)
                progress.step(trial.layer)
                after(trial)
            if chunk_index < len(chunks) - 1:
                saver.report(lambda c=chunk_index: state(c + 1, []))
        out = [finish_trial(trial, accumulators[trial.key]) for trial in chosen]
        if on_result:
            for result in out:
                on_result(result)
        return out

    def _run_trial(self, trial: Trial, cache: dict, reference_out: torch.Tensor,
                   affected: list, local_refs: dict[str, list[torch.Tensor]], acc: TrialSums,
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
        return cumulative_view(self.sim, layers, self.config)

    def histograms(self, layers: list[Layer]) -> dict[str, LayerHistograms]:
        """Each of `layers`' weight (FP32 and per weight format) and input histograms with clipping ranges."""
        return layer_histograms(self.sim, layers, self.config)


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
