"""Estimated output metrics split by chunks of samples (data parallel, `--workers N`): each chunk's
partial sums, computed by another simulator, merged in chunk order give the single-process rows bit
for bit; a chunk whose worker is lost turns its layer group into failed rows kept out of the stream.
No Ray needed here; the runs on a local Ray cluster are in tests/test_distributed.py."""

import dataclasses
import sys
import threading

import pytest
import torch

from analysis.estimate import NoiseEstimate, OutputGradients
from analysis.metrics import ErrorAccumulator, UpdateLog
from analysis.sweep import Sweep, analyze
from tests.test_merge import CONFIG, Chain, data

ESTIMATED = dataclasses.replace(CONFIG, output_metrics="estimated", cache_bytes=1 << 16)  # 40 samples: 4 chunks


class Tied(Chain):
    """`b` runs twice: one layer with two sites, so each chunk updates its local sums twice."""

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h + torch.relu(self.b(h))
        h = h + torch.relu(self.b(h))
        return self.d(torch.relu(self.c(h)))


# --- the sums ---------------------------------------------------------------------------------------


def _noise_of(error: float) -> torch.Tensor:
    """(reference, quantized) of one element whose squared error is error² (exact: 0 − (−e))."""
    return torch.zeros(1), torch.tensor([-error])


def test_an_update_log_replays_each_update_where_a_merge_adds_the_parts_total():
    # Sequential float64: 1 + 1.125·2^-53 rounds up to 1 + 2^-52, and once more to 1 + 2^-51; the
    # two small updates summed first (2.25·2^-53 = 1.125·2^-52) add to 1 only 2^-52.
    small = 1.5 * 2.0**-27  # float32-exact; its square 2.25·2^-54 is exact too
    sequential, log, merged, part = ErrorAccumulator(), UpdateLog(), ErrorAccumulator(), ErrorAccumulator()
    for accumulator in (sequential, merged):
        accumulator.update(*_noise_of(1.0))
    for error in (small, small):
        sequential.update(*_noise_of(error))
        log.update(*_noise_of(error))
        part.update(*_noise_of(error))
    merged.merge(part)
    replayed = ErrorAccumulator()
    replayed.update(*_noise_of(1.0))
    log.replay(replayed)
    assert sequential.state()["noise"] == 1 + 2.0**-51
    assert merged.state()["noise"] == 1 + 2.0**-52  # what a plain merge of the chunk would give
    assert replayed.state() == sequential.state()
    assert len(log.parts) == 2 and replayed.result().count == 3


def _grads(signal: float, count: int, noise_grad: float) -> OutputGradients:
    """One chunk's gradients of one node: one sample, one projection (basis vector), one value."""
    return OutputGradients(1, True, {"node": [torch.tensor([[[noise_grad]]])]}, signal, count)


def test_merged_one_chunk_estimates_equal_one_estimate_over_the_chunks():
    chunks = [(_grads(0.1, 3, 2.0), 0.5), (_grads(0.2, 3, 1.0), 0.25), (_grads(0.3, 4, 4.0), 1.0)]
    whole = NoiseEstimate()
    merged = NoiseEstimate()
    for grads, delta in chunks:
        whole.update(grads, {"node": torch.tensor([[delta]])})
        one = NoiseEstimate()
        one.update(grads, {"node": torch.tensor([[delta]])})
        merged.merge(one)
    # by hand: noise Σ (g·δ)² = 1 + 0.0625 + 16; signal 0.1 + 0.2 + 0.3 summed in that order
    assert merged.signal == whole.signal == (0.1 + 0.2) + 0.3 and merged.count == whole.count == 10
    assert repr(merged.result()) == repr(whole.result())  # repr: every float's exact digits, NaN included
    assert merged.result().mse == whole.result().mse == pytest.approx(17.0625 / 10, rel=1e-15)
    with pytest.raises(ValueError, match="same kind"):
        merged.merge(NoiseEstimate(diagonal=True))


# --- a sweep's chunks computed apart --------------------------------------------------------------


def _chunk_rows(model, ds, config, skip=frozenset()):
    """The rows merged from each chunk's partials, every chunk on its own simulator (as a worker)."""
    driver = Sweep(model, ds, config)
    driver.calibrate()
    statistics = driver.sim.activation_statistics()
    trials = [t for t in driver.plan() if t.key not in skip]
    partials = []
    for chunk in driver.sim.chunks():
        worker = Sweep(model, ds, config)
        worker.sim.adopt_activation_statistics(statistics)
        bounds = {p.key: p.error_histogram.bound for p in partials[0].values()} if partials else None
        partials.append({p.key: p for p in worker.chunk_partials(chunk, trials, bounds)})
    rows = driver.merge_chunks(trials, partials)
    return driver, rows, driver.result(rows, (), driver.histograms(driver.layers), 0.0)


@pytest.mark.parametrize("model", [Chain(), Tied()], ids=["chain", "tied-sites"])
def test_chunks_computed_apart_merge_into_the_single_process_rows(model):
    model, ds = model.eval(), data(40)
    single = analyze(model, ds, ESTIMATED)
    assert single.data["chunks"] == 4 and single.to_frame()["output_source"].eq("estimated").all()
    _, _, merged = _chunk_rows(model, ds, ESTIMATED)
    assert merged.to_frame().to_csv(index=False) == single.to_frame().to_csv(index=False)
    assert merged.to_json_dict()["trials"] == single.to_json_dict()["trials"]  # error histograms too
    assert merged.to_json_dict()["histograms"] == single.to_json_dict()["histograms"]


def test_later_chunks_bin_on_the_first_chunks_bounds():
    model, ds = Chain().eval(), data(40)
    driver = Sweep(model, ds, ESTIMATED)
    driver.calibrate()
    trials, (first, second) = driver.plan(), driver.sim.chunks()[:2]
    own = {p.key: p for p in driver.chunk_partials(second, trials)}  # no bounds: its own peak decides
    given = {p.key: p for p in driver.chunk_partials(first, trials)}
    bounds = {key: p.error_histogram.bound for key, p in given.items()}
    bound_by_first = {p.key: p for p in driver.chunk_partials(second, trials, bounds)}
    assert all(bound_by_first[key].error_histogram.bound == bounds[key] for key in bounds)
    assert any(own[key].error_histogram.bound != bounds[key] for key in bounds)
    mixed = driver.merge_chunks(trials[:1], [given, own])[0]  # edges that differ cannot merge: said per row
    assert not mixed.ok and "different edges" in mixed.error


def test_a_trial_failing_on_a_later_chunk_fails_with_that_chunks_reason():
    model, ds = Chain().eval(), data(40)
    driver = Sweep(model, ds, ESTIMATED)
    driver.calibrate()
    trials, chunks = driver.plan(), driver.sim.chunks()
    partials = [{p.key: p for p in driver.chunk_partials(chunk, trials)} for chunk in chunks[:1]]
    bounds = {key: p.error_histogram.bound for key, p in partials[0].items()}
    for chunk in chunks[1:]:
        partials.append({p.key: p for p in driver.chunk_partials(chunk, trials, bounds)})
    broken = trials[3].key
    partials[2][broken] = dataclasses.replace(partials[2][broken], failure="RuntimeError: chunk 2 broke")
    rows = driver.merge_chunks(trials, partials)
    assert rows[3].error == "RuntimeError: chunk 2 broke"
    assert all(row.ok for index, row in enumerate(rows) if index != 3)


# --- the chunk dispatcher with workers that die (in this process) --------------------------------


class _FakeRay:
    """Just enough of Ray: calls run when their result is read (a nested ref too), and a worker
    'dies' (as Ray reports a worker whose retries ran out) on any chunk item in `doomed`."""

    class exceptions:
        class RayError(Exception):
            pass

        class RayTaskError(RayError):
            pass

        class RayActorError(RayError):
            pass

    def __init__(self, doomed):
        self.doomed = doomed  # {(chunk index, a layer of the group)}

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref()


class _Method:
    def __init__(self, call):
        self.call = call

    def options(self, **_):
        return self

    def remote(self, *args):
        return lambda: self.call(*args)


class _FakeActor:
    """The real ShardWorker's code on a simulator built here; Ray calls become plain calls."""

    def __init__(self, fake, sim, config):
        from analysis.distributed import ShardWorker

        self.worker = ShardWorker(config, torch.get_num_threads())
        self.worker.sim, self.worker.own_chunk_size = sim, sim.chunk_size
        self.fake = fake
        self.run_chunk = _Method(self._chunk)
        self.progress = _Method(self.worker.progress)
        self.cumulative = _Method(self.worker.cumulative)

    def _chunk(self, payload, analysed, chunk, group, *rest):
        index = self.worker.sim.chunks().index(chunk)
        if any((index, layer) in self.fake.doomed for layer in group):
            raise self.fake.exceptions.RayActorError("The actor died unexpectedly before finishing this task.")
        return self.worker.run_chunk(payload, analysed, chunk, group, *rest)


def _exact(rows) -> list[str]:
    """Rows as text that differs when any number differs in any bit (repr of a float is exact; NaN,
    which estimated rows hold for cosine, compares equal as text)."""
    return [repr(row) for row in rows]


def _dispatch(monkeypatch, config, workers, doomed):
    from analysis.distributed import _ChunkDispatcher  # noqa: PLC2701 — the dispatch logic under test

    fake = _FakeRay(doomed)
    monkeypatch.setitem(sys.modules, "ray", fake)  # the worker reads the first chunk's bounds through it
    model, ds = Chain().eval(), data(40)
    sweep = Sweep(model, ds, config)
    sweep.calibrate()
    actors = [_FakeActor(fake, sweep.sim, config) for _ in range(workers)]
    dispatcher = _ChunkDispatcher(fake, sweep, actors, [None], workers, sweep.plan(), sweep.sim.activation_statistics(),
                                  total=len(sweep.plan()) * len(sweep.sim.chunks()))
    return dispatcher, dispatcher.run(), analyze(model, ds, config)


def test_chunks_on_workers_merge_into_the_single_process_table(monkeypatch):
    dispatcher, (rows, histograms, _), single = _dispatch(monkeypatch, ESTIMATED, 2, set())
    assert dispatcher.groups == [("a", "b", "c", "d")]  # 4 chunks for 2 workers: one group, the chunks split
    assert _exact(rows) == _exact(single.trials)
    assert histograms == single.histograms


def test_fewer_chunks_than_workers_split_the_layers_too(monkeypatch):
    one_chunk = dataclasses.replace(ESTIMATED, cache_bytes=CONFIG.cache_bytes)
    dispatcher, (rows, _, _), single = _dispatch(monkeypatch, one_chunk, 2, set())
    assert len(dispatcher.chunks) == 1 and len(dispatcher.groups) == 2
    assert sorted(layer for group in dispatcher.groups for layer in group) == ["a", "b", "c", "d"]
    assert _exact(rows) == _exact(single.trials)


@pytest.mark.parametrize("lost_chunk", [0, 2], ids=["first-chunk", "later-chunk"])
def test_a_lost_chunk_fails_its_group_and_nothing_else(monkeypatch, lost_chunk):
    # 4 chunks, 8 workers: 2 groups of layers; the group holding c loses one chunk
    dispatcher, (rows, _, _), single = _dispatch(monkeypatch, ESTIMATED, 8, {(lost_chunk, "c")})
    lost_group = next(group for group in dispatcher.groups if "c" in group)
    assert len(dispatcher.groups) == 2
    failed = {r.key for r in rows if not r.ok}
    assert failed == dispatcher.lost == {t.key for t in single.trials if t.layer in lost_group}
    start, stop = dispatcher.chunks[lost_chunk]  # (24, 36) for the later chunk
    assert all(f"worker lost on samples {start}–{stop - 1} (RayActorError: The actor died" in r.error
               and "--resume" in r.error for r in rows if not r.ok)
    assert _exact(r for r in rows if r.ok) == _exact(t for t in single.trials if t.layer not in lost_group)


class _Once:
    """A fake ref read from two threads (the dispatcher's and the driver's own worker's): computed
    once, under a lock, as a Ray object is."""

    def __init__(self, call):
        self.call, self.lock, self.value = call, threading.Lock(), None

    def __call__(self):
        with self.lock:
            if self.call is not None:
                self.value, self.call = self.call(), None
            return self.value


def test_the_drivers_own_share_shares_its_first_chunk_through_ray_and_the_table_is_the_same(monkeypatch):
    from analysis.distributed import _ChunkDispatcher, _LocalWorker  # noqa: PLC2701 — under test

    fake = _FakeRay(set())
    fake.ObjectRef = _Once
    put = []
    fake.put = lambda value: put.append(value) or _Once(lambda: value)
    monkeypatch.setitem(sys.modules, "ray", fake)
    model, ds = Chain().eval(), data(40)
    sweep = Sweep(model, ds, ESTIMATED)
    sweep.calibrate()
    actor = _FakeActor(fake, Sweep(model, ds, ESTIMATED).sim, ESTIMATED)  # its own copy, as a process has
    actor.run_chunk = _Method(actor._chunk)
    actor.run_chunk.remote = lambda *args: _Once(lambda: actor._chunk(*args))
    local = _LocalWorker(fake, sweep, torch.get_num_threads())
    taken = []
    run_chunk = local.worker.run_chunk
    local.worker.run_chunk = lambda payload, analysed, chunk, *rest: taken.append(chunk) or run_chunk(
        payload, analysed, chunk, *rest)
    statistics = sweep.sim.activation_statistics()
    dispatcher = _ChunkDispatcher(fake, sweep, [local, actor], [None, sweep.sim.chunk_size], 2, sweep.plan(),
                                  statistics, total=len(sweep.plan()) * len(sweep.sim.chunks()))
    try:
        rows, histograms, _ = dispatcher.run()
    finally:
        local.close()
    single = analyze(model, ds, ESTIMATED)
    assert _exact(rows) == _exact(single.trials) and histograms == single.histograms
    chunks = sweep.sim.chunks()
    # It is ready first, so it takes the first chunk; its answer goes to Ray's store, where the
    # actor's later chunks read their error-histogram edges from.
    assert len(chunks) == 4 and taken[0] == chunks[0] and len(put) == 1


def test_losing_every_group_is_one_line(monkeypatch):
    with pytest.raises(RuntimeError, match="every chunk of the data-parallel sweep was lost") as info:
        _dispatch(monkeypatch, ESTIMATED, 2, {(1, "a")})
    assert "\n" not in str(info.value)


class _RecordingCluster:
    """Stands in for analysis.distributed.Cluster: records when it starts and stops."""

    events: list = []

    def __init__(self, model, data, config):
        self.samples = len(data)
        _RecordingCluster.events.append(("start", len(data)))

    def close(self):
        _RecordingCluster.events.append(("close",))


def test_workers_start_before_the_driver_prepares_and_stop_when_it_fails(monkeypatch):
    """The workers' start-up overlaps the driver's preparation (they are started first, with the
    samples the run uses); a preparation that fails stops them, and so does closing a sweep that
    never runs."""
    import analysis.distributed
    import analysis.sweep
    from analysis.graph import ModelPreparationError

    events = _RecordingCluster.events
    events.clear()
    monkeypatch.setattr(analysis.distributed, "Cluster", _RecordingCluster)
    real_build = analysis.sweep.build_simulator

    def build(*args, **kwargs):
        events.append(("prepare",))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(analysis.sweep, "build_simulator", build)
    config = dataclasses.replace(CONFIG, workers=2, num_samples=16)
    sweep = Sweep(Chain().eval(), data(40), config)
    assert events == [("start", 16), ("prepare",)]
    sweep.close()
    sweep.close()  # twice is harmless
    assert events[2:] == [("close",)]

    events.clear()

    def broken(*args, **kwargs):
        events.append(("prepare",))
        raise ModelPreparationError("could not trace the model")

    monkeypatch.setattr(analysis.sweep, "build_simulator", broken)
    with pytest.raises(ModelPreparationError):
        Sweep(Chain().eval(), data(40), config)
    assert events == [("start", 16), ("prepare",), ("close",)]
