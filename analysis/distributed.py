"""The per-layer sweep fanned out over worker processes, GPUs or machines with Ray.

Each trial quantizes one layer and reads every other in FP32, so the sweep splits by layer with no
communication between the parts. `run_distributed` is what `Sweep.run` calls when
`AnalysisConfig.workers > 1` or `ray_address` is set (`quantlens analyze --workers N`, `--ray auto`):

1. This process (the driver) prepared the model once, on the CPU, for the `Sweep` it was given. It
   plans the trials and calibrates the analysed layers' inputs once; every worker takes those
   histograms (`QuantSim.adopt_activation_statistics`), so every shard quantizes with the ranges a
   single-process run computes.
2. Ray actors receive the model and data once (one copy in Ray's object store) and build their own
   simulator once — started (`Cluster`) before the driver prepares its own copy, so their start-up
   overlaps that preparation — on the device Ray assigns them (`num_gpus` per worker with `device="cuda"`), with
   `cores // N` intra-op threads each, so N workers never oversubscribe the cores. On this machine's
   own cluster with CPU workers (`--workers N`, no `--ray`) the driver is one of the N
   (`_LocalWorker`: its simulator, on a thread, while it dispatches): N − 1 actors, one process
   start and one model copy fewer. Joining a cluster (`--ray`), or with GPUs, it only dispatches.
3. The layers are cut into shards of about equal cost (contiguous in execution order, a few per
   worker, the most expensive first; `layer_costs` counts the multiply-accumulates a trial re-runs,
   its output comparison and its weight's quantization); an idle worker takes the next shard. A finished shard's
   trials go to `on_result` (trials.jsonl) as it finishes: `--resume` after the driver dies loses
   at most the shards that were running.
4. Shards merge with `AnalysisResult.merge`: the table is the one a single-process run writes with
   the same number of intra-op threads, byte for byte (float32 kernels sum in a different order
   with another thread count: then the numbers differ in the last bits, ~1e-5 relative).

Estimated output metrics split by samples instead (data parallel, `_ChunkDispatcher`): a chunk's
forward with autograd and backward passes are shared by every layer's trials, so the work items are
the driver's chunks of samples (times layer groups, only when there are fewer chunks than workers).
A worker returns each trial's sums for its chunk (`Sweep.chunk_partials`); the driver replays them in
chunk order (`Sweep.merge_chunks`), the additions one process makes, so the table is byte-identical
again. Later chunks bin their error histograms on the first chunk's edges, read from its answer (a
nested object ref). Rows stream when every chunk is merged; `--verify K` then re-measures its trials
exactly as layer shards.

Faults: a worker process that dies (killed, out of memory) is restarted by Ray and its shard run
again (`max_restarts`, `max_task_retries`); a shard that fails even so becomes failed rows naming
the reason, which are not written to trials.jsonl, so `--resume` runs them again. Ctrl-C (or the
sweep's `should_stop`) kills the workers, stops the driver's own share at its next trial step and
stops a local cluster started for the run.

What does not scale: each worker prepares the model and captures the FP32 activations itself (one
forward per chunk of samples per shard), and the driver calibrates alone before the shards start
(while the actors start).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import torch

from analysis.config import AnalysisConfig
from analysis.quantsim import QuantlensWarning
from analysis.results import AnalysisResult, TrialResult

if TYPE_CHECKING:
    from analysis.sweep import Sweep
    from analysis.trials import Trial

__all__ = ["Cluster", "LayerWork", "Placement", "ShardWorker", "check_distributed", "layer_costs", "layer_work",
           "plan_shards", "run_distributed"]

SHARDS_PER_WORKER = 2  # more: finer load balance and less lost to a driver crash; each re-captures every chunk (FP32 pass)
RETRIES = 2  # times Ray restarts a dead worker and re-runs its shard
POLL_SECONDS = 0.5  # how often the driver collects progress and checks for a stop
LOCAL_POLL_SECONDS = 0.05  # how soon the driver notices its own item finished (its core waits until then)
INSTALL_HINT = "pip install 'quantlens[ray]'"


@dataclass(frozen=True)
class Placement:
    """What each of `workers` actors asks Ray for, and the device its simulator uses."""

    workers: int
    cpus: int  # per worker, also its intra-op threads
    gpus: float  # per worker (a fraction when several share one GPU)
    device: str


def check_distributed(config: AnalysisConfig) -> None:
    """ValueError (one line) for a distributed sweep that cannot run, before anything is written."""
    if config.device not in ("cpu", "cuda"):
        raise ValueError(f"--device {config.device} with --workers/--ray: name cpu or cuda; Ray gives each worker "
                         "its own GPU")
    if config.ray_address is None and config.workers > local_cores():
        raise ValueError(f"--workers {config.workers} is more than the {local_cores()} CPU cores this machine has; "
                         f"use at most {local_cores()} (each worker needs a core)")
    _ray()


def local_cores() -> int:
    """The cores this process may run on (a local cluster gets all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError(f"--workers/--ray run the sweep on Ray, which is not installed; {INSTALL_HINT}") from None
    return ray


# --- planning ----------------------------------------------------------------------------------


# What a trial costs besides the multiply-accumulates it re-runs, in multiply-accumulate equivalents
# (fitted by benchmarks/fit_shard_costs.py: per-layer trial times of a GPT at one intra-op thread
# against these three terms). Counting MACs alone under-costs the late layers of a language model,
# whose trials re-run little but each compare a [tokens, vocabulary] output, by up to half: the
# shards holding them ran longest, the other workers waited.
OUTPUT_COST = {True: 600.0, False: 100.0}  # per output element and sample: logits (float64 softmax, KL, top-1) or not
WEIGHT_COST = 1500.0  # per weight element, once per trial that quantizes weights (the range search)


@dataclass(frozen=True)
class LayerWork:
    """What one layer's trials do, the terms `layer_costs` weighs (benchmarks/fit_shard_costs.py
    fits its constants on them)."""

    trials: int
    weighted: int  # of those, the trials that quantize the layer's weight
    rerun_macs: int  # multiply-accumulates a trial re-runs per sample
    weight_elements: int


def layer_work(sweep: "Sweep", trials: list["Trial"]) -> dict[str, LayerWork]:
    """Each analysed layer's `LayerWork`, in execution order: a trial re-runs the layer and, with
    exact output metrics, every layer after it."""
    sim = sweep.sim
    exact = sweep.config.output_metrics == "exact"
    counts: dict[str, int] = {}
    weighted: dict[str, int] = {}
    for trial in trials:
        counts[trial.layer] = counts.get(trial.layer, 0) + 1
        weighted[trial.layer] = weighted.get(trial.layer, 0) + (trial.weight_format is not None)
    weight_of_node = {site.node: max(1, layer.macs) for layer in sim.layers for site in sim.sites(layer.name)}
    work = {}
    for layer in sweep.layers:
        nodes = [site.node for site in sim.sites(layer.name)]
        if exact:
            nodes = sim.prepared.descendants(nodes)
        weight = sim.table.weight(layer.name)
        work[layer.name] = LayerWork(counts.get(layer.name, 0), weighted.get(layer.name, 0),
                                     sum(weight_of_node.get(node, 0) for node in nodes) or 1,
                                     weight.numel() if weight is not None else 0)
    return work


def layer_costs(sweep: "Sweep", trials: list["Trial"]) -> dict[str, float]:
    """Relative cost of each analysed layer's trials, in execution order, in multiply-accumulate
    equivalents over the data: per trial, the multiply-accumulates it re-runs per sample and, with
    exact output metrics, the comparison of the model's output per sample (`OUTPUT_COST` per
    element); and the quantization of its weight, once (`WEIGHT_COST` per element)."""
    sim = sweep.sim
    samples = len(sim.data)
    exact = sweep.config.output_metrics == "exact"
    compare = OUTPUT_COST[bool(sim.data.logits)] * sim.output_elements if exact else 0.0
    return {name: float(w.trials * samples * (w.rerun_macs + compare) + w.weighted * WEIGHT_COST * w.weight_elements)
            for name, w in layer_work(sweep, trials).items()}


def plan_shards(costs: dict[str, float], count: int) -> list[tuple[str, ...]]:
    """At most `count` shards of consecutive layers (in the order of `costs`) whose costs are about
    equal: a shard ends where the running total crosses the next multiple of total / count, and
    every shard holds at least one layer."""
    names = list(costs)
    count = max(1, min(count, len(names)))
    total = sum(costs.values())
    shards: list[tuple[str, ...]] = []
    current: list[str] = []
    running = 0.0
    for index, name in enumerate(names):
        current.append(name)
        running += costs[name]
        shards_left = count - len(shards) - 1  # after closing this one
        layers_left = len(names) - index - 1
        if shards_left and layers_left and (running >= total * (len(shards) + 1) / count
                                            or layers_left == shards_left):
            shards.append(tuple(current))
            current = []
    if current:
        shards.append(tuple(current))
    return shards


def placement(ray: Any, config: AnalysisConfig) -> Placement:
    """Split the cluster's CPUs (and GPUs, for device cuda) between the workers; refuse a number of
    workers the cluster cannot run at once."""
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 0))
    node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    if config.workers > cpus:
        where = "this machine has" if config.ray_address is None else "the Ray cluster has"
        raise ValueError(f"--workers {config.workers} is more than the {cpus} CPU cores {where}; "
                         f"use at most {cpus} (each worker needs a core)")
    per_worker = max(1, min(cpus // config.workers, max(node_cpus, default=1)))
    gpus = 0.0
    if config.device == "cuda":
        available = float(resources.get("GPU", 0))
        if available < 1:
            raise ValueError("--device cuda: the Ray cluster has no GPU; use --device cpu, or a cluster with GPUs")
        share = -(-config.workers // int(available))  # workers per GPU, rounded up
        gpus = 1.0 if share <= 1 else 1.0 / share
    return Placement(config.workers, per_worker, gpus, config.device)


# --- the worker ----------------------------------------------------------------------------------


class ShardWorker:
    """One worker process (a Ray actor): its own model copy and simulator, built once; runs shards."""

    def __init__(self, config: AnalysisConfig, threads: int, sim: Any = None) -> None:
        """sim: a simulator already built (the driver's own, `_LocalWorker`): no load, and the
        threads are set by the thread that runs the calls, not here."""
        if sim is None:
            torch.set_num_threads(threads)
        self.threads = threads
        self.config = replace(config, workers=1, ray_address=None, cumulative=False, layers=None)
        self.sim = sim
        self.own_chunk_size = 0 if sim is None else sim.chunk_size
        self.status: tuple[int, str] = (0, "")
        self.should_stop: Callable[[], bool] | None = None  # the driver's own worker: its stop

    def load(self, payload: list) -> dict[str, Any]:
        """Build the simulator from payload[0], a ref to (model, data), unless built: the first call
        after a start or a restart (the ref is wrapped in a list so that only this call reads it).
        payload[1], when there (every call once the driver has planned): the driver's chunk size."""
        if self.sim is None:
            import ray

            from analysis.sweep import Sweep

            if importlib.util.find_spec("torchvision") is not None:
                # Unpickling a model may import transformers, which imports torchvision: its wheel
                # built for another torch must not fail that import (see analysis.compat).
                from analysis.compat import import_torchvision

                import_torchvision()
            model, data = ray.get(payload[0])
            self.sim = Sweep(model, data, self.config).sim
            self.own_chunk_size = self.sim.chunk_size
        if len(payload) > 1:
            # The driver's chunks (the same samples per FP32 capture, so the same sums), unless this
            # device has room for fewer.
            self.sim.chunk_size = min(self.own_chunk_size, payload[1])
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(self.sim.device),
                "threads": self.threads}

    def progress(self) -> tuple[int, str]:
        """(trial steps done in the current shard, the layer of the last one)."""
        return self.status

    def _step(self, done: int, total: int, layer: str) -> None:
        self.status = (done, layer)

    def run(self, payload: list, layers: tuple[str, ...], skip: set, statistics: dict,
            exact: bool = False) -> AnalysisResult:
        """The trials of `layers` not in `skip`; exact: with exact output metrics (re-measuring
        estimated trials for --verify)."""
        from analysis.sweep import Sweep

        self.load(payload)
        self.sim.adopt_activation_statistics(statistics)
        self.status = (0, "")
        config = replace(self.config, layers=layers)
        if exact:
            config = replace(config, output_metrics="exact", verify=0)
        return Sweep(None, None, config, progress=self._step, should_stop=self.should_stop, sim=self.sim).run(skip=skip)

    def run_chunk(self, payload: list, analysed: tuple[str, ...] | None, chunk: tuple[int, int],
                  group: tuple[str, ...], skip: set, statistics: dict, first: list | None,
                  histograms: bool) -> tuple[list, dict | None] | None:
        """One chunk of samples for the trials of `group` (data parallel, estimated output metrics):
        its FP32 capture, backward passes and every trial's local replay, as partial sums
        (`Sweep.chunk_partials`). `first`: [ref to the first chunk's answer for this group], whose
        error-histogram bounds every later chunk bins on; None when the first chunk was lost.
        histograms: also the group's weight and activation histograms (on its last chunk)."""
        import ray

        from analysis.sweep import Sweep

        self.load(payload)
        self.sim.adopt_activation_statistics(statistics)
        self.status = (0, "")
        sweep = Sweep(None, None, replace(self.config, layers=analysed), should_stop=self.should_stop, sim=self.sim)
        members = set(group)
        trials = [t for t in sweep.plan() if t.layer in members and t.key not in skip]
        bounds = None
        if first is not None:
            try:
                bounds = {part.key: part.error_histogram.bound for part in ray.get(first[0])[0]}
            except ray.exceptions.RayError:  # the first chunk's worker was lost: so is this group
                return None
        partials = sweep.chunk_partials(chunk, trials, bounds, progress=self._step)
        if not histograms:
            return partials, None
        return partials, sweep.histograms([layer for layer in sweep.layers if layer.name in members])

    def cumulative(self, payload: list, layers: tuple[str, ...] | None, statistics: dict) -> list:
        from analysis.sweep import Sweep

        self.load(payload)
        self.sim.adopt_activation_statistics(statistics)
        return Sweep(None, None, replace(self.config, layers=layers), sim=self.sim).cumulative_view()


class _LocalWorker:
    """The driver's own share of a run on a local cluster of CPU workers (`--workers N` is the
    driver and N − 1 actors): a `ShardWorker` on the simulator the driver prepared and calibrated
    anyway — no process to start, no model to load, no extra copy in memory. Its calls run one at a
    time on a thread of this process while the main thread dispatches, with the workers' intra-op
    thread count (set on that thread, restored for the caller's own work when it closes). Mirrors an
    actor handle: `worker.run.remote(...)` returns a `Future`; Ray object refs among the arguments
    are read first, as Ray reads an actor call's arguments."""

    def __init__(self, ray: Any, sweep: "Sweep", threads: int) -> None:
        self.ray = ray
        self.worker = ShardWorker(sweep.config, threads, sim=sweep.sim)
        self._stop = threading.Event()
        self.worker.should_stop = self._stop.is_set
        self._saved_threads = torch.get_num_threads()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="quantlens-driver-shard")
        self.run, self.run_chunk = _LocalMethod(self, "run"), _LocalMethod(self, "run_chunk")

    @property
    def status(self) -> tuple[int, str]:
        return self.worker.status

    def submit(self, method: str, args: tuple) -> Future:
        def call() -> Any:
            torch.set_num_threads(self.worker.threads)  # per thread under OpenMP: on the thread that computes
            resolved = [self.ray.get(arg) if isinstance(arg, self.ray.ObjectRef) else arg for arg in args]
            return getattr(self.worker, method)(*resolved)
        return self._executor.submit(call)

    def close(self) -> None:
        """Stop the running call at its next trial step, wait for it, and give the caller its thread
        count back; safe to call twice."""
        self._stop.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._saved_threads)


class _LocalMethod:
    def __init__(self, owner: _LocalWorker, name: str) -> None:
        self.owner, self.name = owner, name

    def remote(self, *args: Any) -> Future:
        return self.owner.submit(self.name, args)


# --- the driver ----------------------------------------------------------------------------------


def run_distributed(sweep: "Sweep", on_result: Callable[[TrialResult], None] | None = None,
                    skip: set[tuple[str, str, str]] | None = None) -> AnalysisResult:
    """`sweep.run` on Ray workers (see the module docstring): the same result, with `seconds` the
    wall time. Connects to `config.ray_address`, or starts a local cluster for the run and stops it
    after."""
    config = sweep.config
    started = time.perf_counter()
    cluster = sweep.cluster if sweep.cluster is not None else Cluster(sweep.model, sweep.data, config)
    ray, local = cluster.ray, None
    try:
        # Every call from here on carries the driver's chunk size too (a restarted worker reads it again).
        payload = [cluster.payload[0], sweep.sim.chunk_size]
        sweep.calibrate()  # once, while the workers load the model
        statistics = ray.put(sweep.sim.activation_statistics())
        if cluster.local:  # the driver takes a worker's share itself, first: it is ready before any actor
            local = _LocalWorker(ray, sweep, cluster.place.cpus)
        actors = ([local] if local else []) + cluster.actors
        trials = [t for t in sweep.plan() if not skip or t.key not in skip]
        if config.output_metrics == "estimated":  # data parallel: the backward passes are shared by all layers
            merged, cumulative = _data_parallel(ray, sweep, actors, payload, cluster.place.workers, trials, statistics,
                                                on_result)
        else:
            results, cumulative = _Dispatcher(ray, sweep, actors, payload, layer_costs(sweep, trials),
                                              cluster.place.workers, trials, statistics, on_result).run()
            merged = AnalysisResult.merge(*results)
    finally:
        if local is not None:
            local.close()
        cluster.close()
    recorded = config.to_dict()
    if config.cumulative and cumulative is None:
        recorded["cumulative"] = False
        warnings.warn("the cumulative view was lost with its worker and is left out; rerun with --cumulative "
                      "to compute it", QuantlensWarning, stacklevel=2)
    return replace(merged, config=recorded, cumulative=tuple(cumulative or ()), seconds=time.perf_counter() - started)


class Cluster:
    """Ray and the worker actors of one distributed sweep: connected (or a local cluster started),
    the model and data put in the object store once, and every worker told to load them. `Sweep`
    starts one before it prepares its own copy of the model, so the workers' start-up overlaps that
    preparation; `close` kills the workers and stops a cluster it started."""

    def __init__(self, model: Any, data: Any, config: AnalysisConfig) -> None:
        check_distributed(config)
        self.ray = ray = _ray()
        self.actors: list = []
        self.local = False
        self.own = _connect(ray, config)
        try:
            self.place = place = placement(ray, config)
            # On a local cluster of CPU workers the driver is one of them (`_LocalWorker`); on a
            # cluster it joins (perhaps from a laptop) or with GPUs it only dispatches.
            self.local = config.ray_address is None and place.device == "cpu"
            try:
                self.payload = [ray.put((model, data))]
            except Exception as exc:  # noqa: BLE001 — whatever the pickler met, say what it means
                raise ValueError(f"the model or data cannot be sent to the workers ({_one_line(exc)}); run without "
                                 "--workers/--ray, or make the model picklable") from None
            remote = ray.remote(num_cpus=place.cpus, num_gpus=place.gpus, max_restarts=RETRIES,
                                max_task_retries=RETRIES, concurrency_groups={"progress": 1})(ShardWorker)
            worker_config = replace(config, device=place.device)
            self.actors = [remote.remote(worker_config, place.cpus) for _ in range(place.workers - self.local)]
            for actor in self.actors:  # queued first on each worker: it loads the model while the driver prepares
                actor.load.remote(self.payload)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill the workers and stop the cluster if this started it; safe to call twice."""
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors = []
        if self.own:
            self.ray.shutdown()
            self.own = False


def _connect(ray: Any, config: AnalysisConfig) -> bool:
    """Join the cluster the config names, or start a local one; True when this call started Ray
    (then the caller stops it). A process already connected (a test, a notebook) stays connected."""
    import logging

    if ray.is_initialized():
        return False
    # Workers import the driver's quantlens (a local cluster shares this machine's files).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    common = {"log_to_driver": False, "logging_level": logging.ERROR}
    if config.ray_address is not None:
        try:
            ray.init(address=config.ray_address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ValueError(f"cannot connect to the Ray cluster at {config.ray_address!r} "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); start it with "
                             "`ray start --head` or pass its address") from None
        return True
    # "local": a new cluster of this machine's cores, even where RAY_ADDRESS or a `ray start` names another.
    ray.init(address="local", num_cpus=local_cores(), include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}}, **common)
    return True


class _Queue:
    """Hands work items to idle workers in order, collects finished ones, polls progress, and
    records an item whose worker could not be brought back as failed; subclasses say what an item
    is (`_submit`) and what its answer means (`_collected`). Progress is reported as `offset` plus
    the steps done, out of `total`."""

    def __init__(self, ray: Any, sweep: "Sweep", actors: list, payload: list, statistics: Any,
                 steps: dict, offset: int = 0, total: int | None = None) -> None:
        self.ray, self.sweep, self.actors, self.payload, self.statistics = ray, sweep, actors, payload, statistics
        self.steps = steps  # item -> its trial steps (trials × chunks)
        self.offset = offset
        self.total = offset + sum(steps.values()) if total is None else total
        self.finished_steps = 0
        self.live: dict[int, tuple[int, str]] = {}  # worker -> its progress in the running item
        self.label = ""  # the layer a worker reported last
        self.reported = 0  # never backwards, also when a killed worker's item starts again
        self.polled = float("-inf")  # when the actors were last asked for their progress

    def _order(self) -> list:
        raise NotImplementedError

    def _submit(self, actor: Any, item: Any) -> Any:
        raise NotImplementedError

    def _collected(self, item: Any, value: Any) -> None:
        """A finished item's answer, as it arrives."""

    def dispatch(self, cumulative: bool = False) -> tuple[dict, dict[Any, str], list | None]:
        """Run every item: (answers by item, reasons by failed item, the cumulative view — None when
        it was lost, [] when not asked for)."""
        ray = self.ray
        queue: deque = deque(self._order())
        if cumulative:
            queue.appendleft("cumulative")  # the longest single item: started first
        idle = list(range(len(self.actors)))
        pending: dict = {}  # ObjectRef (an actor's item) or Future (the driver's own) -> (worker, item)
        results: dict = {}
        failures: dict[Any, str] = {}
        view: list | None = []
        while queue or pending:
            self._check_stop()
            assigned = True
            while assigned:  # again after a pass that assigned: an item may need another's submission first
                assigned = False
                for worker in list(idle):
                    item = next((item for item in queue if self._takes(worker, item)), None)
                    if item is None:
                        continue
                    queue.remove(item)
                    idle.remove(worker)
                    assigned = True
                    actor = self.actors[worker]
                    if item == "cumulative":
                        ref = actor.cumulative.remote(self.payload, self.sweep.config.layers, self.statistics)
                    else:
                        ref = self._submit(actor, item)
                        self.live[worker] = (0, "")
                    pending[ref] = (worker, item)
            if not pending:  # every worker that could take what is left is gone: it fails
                for item in queue:
                    if item == "cumulative":
                        view = None
                    else:
                        failures[item] = "no worker left (all died)"
                break
            for ref in self._wait(pending):
                worker, item = pending.pop(ref)
                self.live.pop(worker, None)
                try:
                    value = ref.result() if isinstance(ref, Future) else ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the sweep itself raised: as a single run would
                    cause = getattr(exc, "cause", None)
                    raise cause if isinstance(cause, Exception) else exc from None
                except ray.exceptions.RayError as exc:  # the worker died and retries ran out
                    reason = _one_line(exc)
                    if item == "cumulative":
                        view = None  # lost: the merged config then says it was not computed
                    else:
                        failures[item] = reason
                    if not isinstance(exc, ray.exceptions.RayActorError):
                        idle.append(worker)
                    continue
                idle.append(worker)
                if item == "cumulative":
                    view = value
                    continue
                results[item] = value
                self.finished_steps += self.steps[item]
                self._collected(item, value)
            self._poll_progress(pending)
        return results, failures, view

    def _takes(self, worker: int, item: Any) -> bool:
        """Whether `worker` may run `item`. The driver's own worker leaves the cumulative view to an
        actor: it is one long call that cannot stop midway, and a stop must not wait for it."""
        return not (item == "cumulative" and isinstance(self.actors[worker], _LocalWorker))

    def _wait(self, pending: dict) -> list:
        """The pending items that are done, waiting up to POLL_SECONDS for one (LOCAL_POLL_SECONDS
        while the driver computes one itself: Ray's wait does not see a Future finish)."""
        futures = [ref for ref in pending if isinstance(ref, Future)]
        refs = [ref for ref in pending if not isinstance(ref, Future)]
        done = [future for future in futures if future.done()]
        if done:
            return done
        if refs:
            done, _ = self.ray.wait(refs, num_returns=1, timeout=LOCAL_POLL_SECONDS if futures else POLL_SECONDS)
            return done + [future for future in futures if future.done()]
        wait_for_futures(futures, timeout=POLL_SECONDS, return_when="FIRST_COMPLETED")
        return [future for future in futures if future.done()]

    def _check_stop(self) -> None:
        from analysis.sweep import AnalysisCancelled

        if self.sweep.should_stop is not None and self.sweep.should_stop():
            raise AnalysisCancelled(f"stopped after {self.offset + self._done()} of {self.total} trials")

    def _done(self) -> int:
        return self.finished_steps + sum(done for done, _ in self.live.values())

    def _poll_progress(self, pending: dict) -> None:
        if self.sweep.progress is None:
            return
        ray = self.ray
        for worker in self.live:
            if isinstance(self.actors[worker], _LocalWorker):  # the driver's own: read, not asked
                self.live[worker] = self.actors[worker].status
                self.label = self.live[worker][1] or self.label
        # The actors are asked at most every POLL_SECONDS (the loop turns faster while the driver
        # computes an item itself); the count is reported every turn.
        now = time.monotonic()
        remote = [worker for worker in self.live if not isinstance(self.actors[worker], _LocalWorker)]
        if remote and now - self.polled >= POLL_SECONDS:
            self.polled = now
            polls = {self.actors[worker].progress.options(concurrency_group="progress").remote(): worker
                     for worker in remote}
            answered, _ = ray.wait(list(polls), num_returns=len(polls), timeout=POLL_SECONDS)
            for ref in answered:
                try:
                    done, layer = ray.get(ref)
                except ray.exceptions.RayError:
                    continue  # a dead worker reports nothing; its item is retried or failed
                if polls[ref] in self.live:
                    self.live[polls[ref]] = (done, layer)
                    self.label = layer or self.label
        self.reported = max(self.reported, min(self.offset + self._done(), self.total))
        self.sweep.progress(self.reported, self.total, self.label)


class _Dispatcher(_Queue):
    """Layer shards: hands shards to idle workers (the most expensive first), reports a finished
    shard's trials as it finishes, and turns a shard whose worker could not be brought back into
    failed rows. exact: the trials are measured with exact output metrics (--verify)."""

    def __init__(self, ray: Any, sweep: "Sweep", actors: list, payload: list, costs: dict[str, float], workers: int,
                 trials: list["Trial"], statistics: Any, on_result: Callable[[TrialResult], None] | None,
                 exact: bool = False, offset: int = 0, total: int | None = None) -> None:
        self.on_result, self.exact = on_result, exact
        self.shards = shards = plan_shards(costs, workers * SHARDS_PER_WORKER)
        self.costs = [sum(costs[name] for name in shard) for shard in shards]
        self.trials = {shard: [t for t in trials if t.layer in set(shard)] for shard in shards}
        self.skip = {shard: {t.key for t in sweep.plan() if t.layer in set(shard)} - {t.key for t in self.trials[shard]}
                     for shard in shards}
        chunks = len(sweep.sim.chunks())
        steps = {index: len(self.trials[shard]) * chunks for index, shard in enumerate(shards)}
        super().__init__(ray, sweep, actors, payload, statistics, steps, offset, total)

    def _order(self) -> list:
        # The most expensive shards first, so the last ones to finish are short.
        return sorted(range(len(self.shards)), key=lambda i: -self.costs[i])

    def _submit(self, actor: Any, item: int) -> Any:
        shard = self.shards[item]
        return actor.run.remote(self.payload, shard, self.skip[shard], self.statistics, self.exact)

    def _collected(self, item: int, value: AnalysisResult) -> None:
        if self.on_result:
            for trial in value.trials:
                self.on_result(trial)

    def run(self) -> tuple[list[AnalysisResult], list | None]:
        results, failures, cumulative = self.dispatch(cumulative=self.sweep.config.cumulative and not self.exact)
        return self._with_failures(results, failures), cumulative

    def _with_failures(self, results: dict[int, AnalysisResult], failures: dict[int, str]) -> list[AnalysisResult]:
        """The shards' results in shard order, a failed shard as a result of failed rows (no
        histograms), so the merged table says which trials were lost and why."""
        if not results:
            raise RuntimeError(f"every shard of the distributed sweep failed ({_reasons(failures)}); check the "
                               "workers' memory, or run without --workers")
        template = next(iter(results.values()))
        out = []
        for index, shard in enumerate(self.shards):
            if index in results:
                out.append(results[index])
                continue
            reason = f"worker lost ({failures[index]}); rerun with --resume to retry"
            rows = tuple(TrialResult(t.layer, t.target, *t.names, error=reason) for t in self.trials[shard])
            out.append(replace(template, config={**template.config, "layers": list(shard)}, trials=rows, histograms={}))
        return out


class _ChunkDispatcher(_Queue):
    """Data parallel (estimated output metrics): items are (chunk, layer group), chunk-major, so the
    first chunk of every group starts first; a later chunk's worker bins its error histograms on
    the first chunk's bounds (it waits for them after its backward passes if they are not in yet).
    There is one group unless there are fewer chunks than workers: then the layers are cut into
    groups of about equal cost, and each group's items repeat their chunk's backward passes."""

    def __init__(self, ray: Any, sweep: "Sweep", actors: list, payload: list, workers: int, trials: list["Trial"],
                 statistics: Any, total: int) -> None:
        self.chunks = sweep.sim.chunks()
        self.groups = plan_shards(layer_costs(sweep, trials), -(-workers // len(self.chunks)))
        self.trials = {group: [t for t in trials if t.layer in set(group)] for group in self.groups}
        self.trial_order = trials
        self.skip = {t.key for t in sweep.plan()} - {t.key for t in trials}
        self.first: dict[int, Any] = {}  # group -> the ref of its first chunk's answer
        self.lost: set[tuple[str, str, str]] = set()  # keys of trials whose group lost a chunk
        steps = {(c, g): len(self.trials[group]) for c in range(len(self.chunks)) for g, group in enumerate(self.groups)}
        super().__init__(ray, sweep, actors, payload, statistics, steps, 0, total)

    def _order(self) -> list:
        return list(self.steps)  # chunk-major: (0, every group), (1, every group), ...

    def _takes(self, worker: int, item: Any) -> bool:
        if item == "cumulative":
            return super()._takes(worker, item)
        chunk, group = item
        # A later chunk reads its group's first chunk's answer as a Ray object: an actor's call
        # (its ref), or the driver's own answer once it is in and put in Ray's store.
        return chunk == 0 or (group in self.first and not isinstance(self.first[group], Future))

    def _submit(self, actor: Any, item: tuple[int, int]) -> Any:
        chunk, group = item
        first = None if chunk == 0 else [self.first[group]]
        ref = actor.run_chunk.remote(self.payload, self.sweep.config.layers, self.chunks[chunk], self.groups[group],
                                     self.skip, self.statistics, first, chunk == len(self.chunks) - 1)
        if chunk == 0:
            self.first[group] = ref
        return ref

    def _collected(self, item: Any, value: Any) -> None:
        chunk, group = item
        if chunk == 0 and isinstance(self.first[group], Future):  # the driver's own: now readable by every worker
            self.first[group] = self.ray.put(value)

    def run(self) -> tuple[list[TrialResult], dict, list | None]:
        """The rows of every trial in plan order (merged in chunk order; a group that lost a chunk
        as failed rows) and the groups' histograms, in layer order."""
        answers, failures, cumulative = self.dispatch(cumulative=self.sweep.config.cumulative)
        for item, value in answers.items():
            if value is None:  # its worker could not read the first chunk's bounds
                failures[item] = failures.get((0, item[1]), "the first chunk was lost")
        rows: dict = {}
        histograms: dict = {}
        lost_groups = 0
        for g, group in enumerate(self.groups):
            lost = sorted(item for item in failures if item[1] == g)
            if lost:
                lost_groups += 1
                start, stop = self.chunks[lost[0][0]]
                reason = (f"worker lost on samples {start}–{stop - 1} ({failures[lost[0]]}); rerun with --resume "
                          "to retry")
                for t in self.trials[group]:
                    rows[t.key] = TrialResult(t.layer, t.target, *t.names, error=reason)
                    self.lost.add(t.key)
                continue
            partials = [{part.key: part for part in answers[(c, g)][0]} for c in range(len(self.chunks))]
            for t, row in zip(self.trials[group], self.sweep.merge_chunks(self.trials[group], partials)):
                rows[t.key] = row
            histograms.update(answers[(len(self.chunks) - 1, g)][1])
        if lost_groups == len(self.groups):
            raise RuntimeError(f"every chunk of the data-parallel sweep was lost ({_reasons(failures)}); check "
                               "the workers' memory, or run without --workers")
        in_layer_order = {layer.name: histograms[layer.name] for layer in self.sweep.layers if layer.name in histograms}
        return [rows[t.key] for t in self.trial_order], in_layer_order, cumulative


def _data_parallel(ray: Any, sweep: "Sweep", actors: list, payload: list, workers: int, trials: list["Trial"],
                   statistics: Any, on_result: Callable[[TrialResult], None] | None) -> tuple[AnalysisResult, list | None]:
    """Estimated output metrics over workers by chunks of samples (`_ChunkDispatcher`), then
    `--verify K` as layer shards measured exactly. A trial finishes only with its last chunk, so
    rows reach `on_result` when every chunk is merged; verified rows follow as their shards finish."""
    chunks = len(sweep.sim.chunks())
    budget = sweep.verification_budget(trials)
    dispatcher = _ChunkDispatcher(ray, sweep, actors, payload, workers, trials, statistics,
                                  total=(len(trials) + budget) * chunks)
    rows, histograms, cumulative = dispatcher.run()
    if on_result:
        for row in rows:
            if row.key not in dispatcher.lost:  # kept out of trials.jsonl: --resume runs them again
                on_result(row)
    if budget:
        rows = _verify(ray, sweep, actors, payload, workers, trials, rows, statistics, on_result,
                       offset=len(trials) * chunks)
    return sweep.result(rows, (), histograms, 0.0), cumulative


def _verify(ray: Any, sweep: "Sweep", actors: list, payload: list, workers: int, trials: list["Trial"],
            rows: list[TrialResult], statistics: Any, on_result: Callable[[TrialResult], None] | None,
            offset: int) -> list[TrialResult]:
    """`--verify K` on the workers: the chosen trials re-measured exactly, as layer shards; their
    rows become exact. A shard lost with its worker leaves its rows estimated, with a warning."""
    chosen = [trials[index] for index in sweep.verification_choice(rows)]
    if not chosen:
        return rows
    costs = {name: cost for name, cost in layer_costs(sweep, chosen).items() if cost}
    chunks = len(sweep.sim.chunks())
    dispatcher = _Dispatcher(ray, sweep, actors, payload, costs, workers, chosen, statistics, on_result,
                             exact=True, offset=offset, total=offset + len(chosen) * chunks)
    results, failures, _ = dispatcher.dispatch()
    exact = {row.key: row for result in results.values() for row in result.trials}
    if failures:
        lost = sum(len(dispatcher.trials[dispatcher.shards[index]]) for index in failures)
        warnings.warn(f"--verify: {lost} trial(s) were not re-measured ({_reasons(failures)}); their rows stay "
                      "estimated; rerun to verify them", QuantlensWarning, stacklevel=3)
    return [exact.get(row.key, row) for row in rows]


def _reasons(failures: dict) -> str:
    return "; ".join(sorted(set(failures.values())))[:300]


def _one_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
