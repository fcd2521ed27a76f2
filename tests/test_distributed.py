"""The sweep sharded over Ray workers: the plan, the shipped calibration, and runs on a local cluster
that equal a single-process run byte for byte, also when a worker is killed or the driver is
interrupted and resumed."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from analysis.config import AnalysisConfig, ConfigError
from analysis.distributed import LayerWork, check_distributed, layer_costs, layer_work, plan_shards
from analysis.quantsim import QuantSim
from analysis.runs import analyze_to_directory
from analysis.sweep import Sweep, analyze
from tests.test_merge import CONFIG, Chain, data

ROOT = Path(__file__).resolve().parents[1]


# --- planning, config and the shipped calibration (no Ray needed) ----------------------------------


@pytest.mark.parametrize("costs,count,expected", [
    ({"a": 1, "b": 1, "c": 1, "d": 1}, 2, [("a", "b"), ("c", "d")]),
    ({"a": 6, "b": 1, "c": 1, "d": 1, "e": 1}, 2, [("a",), ("b", "c", "d", "e")]),  # a alone passes half
    ({"a": 1, "b": 1, "c": 100}, 3, [("a",), ("b",), ("c",)]),  # every shard keeps a layer
    ({"a": 1, "b": 2}, 5, [("a",), ("b",)]),  # no more shards than layers
    ({"a": 3, "b": 2, "c": 1}, 1, [("a", "b", "c")]),
    ({"a": 0, "b": 0, "c": 0}, 2, [("a",), ("b", "c")]),  # nothing to do still covers every layer
])
def test_shards_are_consecutive_layers_of_about_equal_cost(costs, count, expected):
    assert plan_shards(costs, count) == expected


def test_layer_costs_count_what_a_trial_reruns():
    sweep = Sweep(Chain().eval(), data(), CONFIG)
    # Multiply-accumulates per sample: a 8x16, b 16x16, c 16x16, d 16x4; five trials per layer
    # (int4, int8 weights; int8 inputs; both int4/int8, int8/int8), four of them quantize the weight.
    macs = {"a": 128, "b": 256, "c": 256, "d": 64}
    assert {layer.name: layer.macs for layer in sweep.layers} == macs
    assert sweep.sim.output_elements == 4 and len(sweep.data) == 24  # 4 logits per sample
    assert layer_work(sweep, sweep.plan())["b"] == LayerWork(trials=5, weighted=4, rerun_macs=576, weight_elements=256)
    compare = 600 * 4  # OUTPUT_COST of logits per output element, per sample
    exact = layer_costs(sweep, sweep.plan())  # each trial re-runs its layer and every later one
    assert exact == {"a": 5 * 24 * (704 + compare) + 4 * 1500 * 128, "b": 5 * 24 * (576 + compare) + 4 * 1500 * 256,
                     "c": 5 * 24 * (320 + compare) + 4 * 1500 * 256, "d": 5 * 24 * (64 + compare) + 4 * 1500 * 64}
    local = Sweep(Chain().eval(), data(), dataclasses.replace(CONFIG, output_metrics="none"))
    # the first 7 trials: a's five, b's two weight-only ones; no output comparison
    assert layer_costs(local, local.plan()[:7]) == {"a": 5 * 24 * 128 + 4 * 1500 * 128,
                                                     "b": 2 * 24 * 256 + 2 * 1500 * 256, "c": 0, "d": 0}


class _Cluster:
    """What `placement` reads of a Ray cluster: its resources and nodes."""

    def __init__(self, nodes):
        self._nodes = [{"Alive": True, "Resources": node} for node in nodes]

    def cluster_resources(self):
        return {key: sum(node["Resources"].get(key, 0) for node in self._nodes) for key in ("CPU", "GPU")}

    def nodes(self):
        return self._nodes


@pytest.mark.parametrize("workers,device,expected", [
    (4, "cuda", (4, 0.5)),  # 16 CPUs / 4; 4 workers on 2 GPUs: two share each
    (2, "cuda", (8, 1.0)),
    (3, "cuda", (5, 0.5)),  # 3 on 2 GPUs: up to two per GPU
    (1, "cpu", (8, 0.0)),  # no worker asks for more cores than one node has
])
def test_placement_splits_cores_and_gpus(workers, device, expected):
    from analysis.distributed import placement

    cluster = _Cluster([{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}])
    place = placement(cluster, AnalysisConfig(workers=workers, device=device, ray_address="auto"))
    assert (place.workers, place.cpus, place.gpus, place.device) == (workers, *expected, device)


def test_placement_refuses_what_the_cluster_cannot_run():
    from analysis.distributed import placement

    with pytest.raises(ValueError, match="no GPU"):
        placement(_Cluster([{"CPU": 4}]), AnalysisConfig(workers=2, device="cuda", ray_address="auto"))
    with pytest.raises(ValueError, match="more than the 4 CPU cores the Ray cluster has"):
        placement(_Cluster([{"CPU": 4}]), AnalysisConfig(workers=5, ray_address="auto"))


def test_workers_are_checked_and_do_not_change_what_a_resume_compares():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="workers must be a positive integer"):
            AnalysisConfig(workers=bad)
    with pytest.raises(ConfigError, match="ray_address"):
        AnalysisConfig(ray_address=" ")
    config = AnalysisConfig(workers=3, ray_address="auto")
    assert config.distributed and not AnalysisConfig().distributed
    assert AnalysisConfig.from_dict(config.to_dict()) == config
    older = AnalysisConfig().to_dict()  # written before scale-out: no workers, no ray_address
    del older["workers"], older["ray_address"]
    assert AnalysisConfig.from_dict(older) == AnalysisConfig()
    from analysis.runs import _result_config  # noqa: PLC2701 — the resume header under test

    assert _result_config(config) == _result_config(AnalysisConfig())


@pytest.mark.parametrize("changes,needle", [
    ({"device": "cuda:1"}, "name cpu or cuda"),
    ({"device": "mps"}, "name cpu or cuda"),
    ({"workers": 10_000}, "more than the"),
])
def test_what_shards_cannot_do_is_refused_in_one_line(changes, needle):
    with pytest.raises(ValueError, match=needle) as info:
        check_distributed(AnalysisConfig(**{"workers": 2, **changes}))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("workers,needle", [("0", "--workers must be at least 1"), ("999", "more than the")])
def test_the_cli_refuses_impossible_workers_before_writing(tmp_path, capsys, workers, needle):
    from analysis.cli import main

    code = main(["analyze", "sample:mlp", "--data", "sample:mlp", "--samples", "16", "--quiet", "--workers", workers,
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "run.json").exists()


def test_without_ray_the_refusal_names_the_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ValueError, match=r"pip install 'quantlens\[ray\]'"):
        check_distributed(AnalysisConfig(workers=2))


def test_adopted_activation_statistics_give_the_same_ranges_without_calibrating():
    model, ds = Chain().eval(), data()
    first = QuantSim(model, ds, CONFIG.quant)
    first.calibrate_activations([site for name in first.layer_names for site in first.sites(name)])
    second = QuantSim(model, ds, CONFIG.quant)
    captured = []
    second.cache = lambda chunk: captured.append(chunk)  # calibrating would capture activations
    second.adopt_activation_statistics(first.activation_statistics())
    int8 = CONFIG.parsed_act_formats()[0]
    for name in first.layer_names:
        assert second.activation_params(name, int8) == first.activation_params(name, int8)
    assert captured == []
    with pytest.raises(ValueError, match="another model"):
        second.adopt_activation_statistics({("nowhere", 0): next(iter(first.activation_statistics().values()))})


class _FakeRay:
    """Just enough of Ray for the dispatcher, in this process: calls run when their result is read,
    and a worker 'dies' (as Ray reports a worker whose retries ran out) on any shard holding `doomed`."""

    class exceptions:
        class RayError(Exception):
            pass

        class RayTaskError(RayError):
            pass

        class RayActorError(RayError):
            pass

    def __init__(self, doomed):
        self.doomed = doomed

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref()


class _FakeWorker:
    def __init__(self, fake, sim, config):
        self.fake, self.sim, self.config = fake, sim, config
        self.run = self.progress = self.cumulative = self  # every method is this one callable

    def options(self, **_):
        return self

    def remote(self, *args):
        if len(args) != 5:  # a progress poll
            return lambda: (0, "")
        _, layers, skip, _, _ = args

        def result():
            if self.fake.doomed in layers:
                raise self.fake.exceptions.RayActorError("The actor died unexpectedly before finishing this task.")
            return Sweep(None, None, dataclasses.replace(self.config, layers=layers), sim=self.sim).run(skip=skip)
        return result


def test_a_shard_whose_worker_cannot_be_brought_back_becomes_failed_rows_kept_out_of_the_stream():
    from analysis.distributed import _Dispatcher  # noqa: PLC2701 — the dispatch logic under test

    model, ds = Chain().eval(), data()
    single = analyze(model, ds, CONFIG)
    sweep = Sweep(model, ds, CONFIG)
    fake = _FakeRay(doomed="c")
    workers = [_FakeWorker(fake, sweep.sim, CONFIG) for _ in range(2)]
    streamed = []
    trials = sweep.plan()
    dispatcher = _Dispatcher(fake, sweep, workers, [None], layer_costs(sweep, trials), 2, trials, {}, streamed.append)
    results, cumulative = dispatcher.run()
    assert [shard for shard in dispatcher.shards] == [("a",), ("b",), ("c",), ("d",)]
    rows = {t.key: t for r in results for t in r.trials}
    assert {key for key, t in rows.items() if not t.ok} == {t.key for t in single.trials if t.layer == "c"}
    assert all("worker lost (RayActorError: The actor died" in t.error and "--resume" in t.error
               for t in rows.values() if not t.ok)
    assert [t for t in single.trials if t.layer != "c"] == sorted(streamed, key=single.trials.index)
    assert all(t.layer != "c" for t in streamed)  # a --resume runs the lost shard again
    from analysis.results import AnalysisResult

    merged = AnalysisResult.merge(*results)
    assert [t.key for t in merged.trials] == [t.key for t in single.trials] and "c" not in merged.histograms


class _Ref:
    """Stands in for a Ray object ref among a call's arguments."""


def _local_worker(sweep, threads):
    from analysis.distributed import _LocalWorker  # noqa: PLC2701 — the driver's share, under test

    fake = _FakeRay(doomed=None)
    fake.ObjectRef = _Ref
    return _LocalWorker(fake, sweep, threads)


def test_the_driver_runs_its_share_on_its_own_simulator_on_a_thread_with_the_workers_thread_count():
    import threading

    model, ds = Chain().eval(), data()
    sweep = Sweep(model, ds, CONFIG)
    sweep.calibrate()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        local = _local_worker(sweep, threads=1)
        seen, run = [], local.worker.run

        def watched(*args):
            seen.append((torch.get_num_threads(), threading.current_thread() is threading.main_thread()))
            return run(*args)

        local.worker.run = watched
        future = local.run.remote([None, sweep.sim.chunk_size], ("b", "c"), set(), sweep.sim.activation_statistics())
        result = future.result(timeout=120)
        local.close()
        assert seen == [(1, False)]  # on its own thread, with the workers' one thread
        assert torch.get_num_threads() == 2  # the caller's count again
    finally:
        torch.set_num_threads(before)
    assert sweep.sim is local.worker.sim  # no second copy of the model
    single = analyze(model, ds, dataclasses.replace(CONFIG, layers=("b", "c")))
    assert result.trials == single.trials


def test_closing_the_drivers_share_stops_its_running_shard_at_the_next_trial():
    import threading

    from analysis.sweep import AnalysisCancelled

    sweep = Sweep(Chain().eval(), data(), CONFIG)
    local = _local_worker(sweep, threads=1)
    started, step = threading.Event(), local.worker._step

    def slow_step(done, total, layer):
        step(done, total, layer)
        started.set()
        time.sleep(0.2)

    local.worker._step = slow_step
    future = local.run.remote([None, sweep.sim.chunk_size], None, set(), sweep.sim.activation_statistics())
    assert started.wait(60)
    local.close()  # returns once the shard has stopped
    assert future.done()
    with pytest.raises(AnalysisCancelled):
        future.result()
    assert local.worker.status[0] < len(sweep.plan()) * len(sweep.sim.chunks())


# --- on a local Ray cluster -------------------------------------------------------------------------

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'quantlens[ray]' runs these tests")


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module: 2 CPUs, so 2 workers of one intra-op thread each."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Each of the 2 workers runs one intra-op thread; the single-process reference does too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cnn():
    import sample_models
    from analysis.data import Dataset

    split = sample_models.load_split("cnn", "calibration")
    return sample_models.load_model("cnn"), Dataset(split["inputs"][:48], split["labels"][:48], "classification", "cnn")


CNN_CONFIG = AnalysisConfig(weight_formats=("int8", "int4"), act_formats=("int8",), num_samples=48, histogram_bins=16)


@pytest.mark.slow
@pytest.mark.parametrize("changes", [
    {"cumulative": True},
    # data parallel: 48 samples in 6 chunks, split over the workers; --verify re-measures on them
    {"output_metrics": "estimated", "cache_bytes": 5 << 20, "verify": 2},
], ids=["exact", "estimated"])
def test_two_workers_write_the_single_process_table(cluster, one_thread, tmp_path, changes):
    model, ds = _cnn()
    config = dataclasses.replace(CNN_CONFIG, **changes)
    single = analyze_to_directory(model, ds, config, tmp_path / "single")
    steps, streamed, actors = [], [], set()

    def progress(done, total, layer):
        steps.append((done, total))
        actors.update(_shard_workers())

    shards = analyze_to_directory(model, ds, dataclasses.replace(config, workers=2), tmp_path / "two",
                                  progress=progress, on_result=streamed.append)
    assert len(actors) == 1  # --workers 2 on this machine: the driver and one actor
    assert (tmp_path / "two" / "layers.csv").read_bytes() == (tmp_path / "single" / "layers.csv").read_bytes()
    saved, reference = shards.to_json_dict(), single.to_json_dict()  # NaN as null: estimated rows hold NaN
    assert saved["trials"] == reference["trials"] and saved["histograms"] == reference["histograms"]
    assert shards.cumulative == single.cumulative  # computed on one worker with every layer
    assert {k: v for k, v in shards.config.items() if k != "workers"} == \
        {k: v for k, v in single.config.items() if k != "workers"} and shards.config["workers"] == 2
    # every trial streamed once, as its shard finished (verified ones again, now exact); progress
    # counted all of them, never backwards
    verified = sum(t.output_source == "exact" for t in single.trials) if config.verify else 0
    assert verified == (2 * len({(t.target, t.format) for t in single.trials}) if config.verify else 0)
    assert sorted(t.key for t in streamed) == sorted([t.key for t in single.trials] + [
        t.key for t in single.trials if config.verify and t.output_source == "exact"])
    lines = (tmp_path / "two" / "trials.jsonl").read_text().splitlines()
    assert len(lines) == len(single.trials) + verified
    total = (len(single.trials) + verified) * single.data["chunks"]
    assert steps and steps[-1] == (total, total) and all(a[0] <= b[0] for a, b in zip(steps, steps[1:]))


@pytest.mark.slow
def test_a_cancelled_distributed_run_resumes_on_the_workers(cluster, one_thread, tmp_path):
    from analysis.sweep import AnalysisCancelled

    model, ds = _cnn()
    single = analyze_to_directory(model, ds, CNN_CONFIG, tmp_path / "single")
    config, out, streamed = dataclasses.replace(CNN_CONFIG, workers=2), tmp_path / "two", []
    with pytest.raises(AnalysisCancelled):  # stopped once the first shard is in trials.jsonl
        analyze_to_directory(model, ds, config, out, on_result=streamed.append, should_stop=lambda: bool(streamed))
    kept = (out / "trials.jsonl").read_text().splitlines()
    assert 0 < len(kept) < len(single.trials) and json.loads((out / "meta.json").read_text())["status"] == "cancelled"
    resumed = []
    analyze_to_directory(model, ds, config, out, resume=True, on_result=resumed.append)
    assert (out / "layers.csv").read_bytes() == (tmp_path / "single" / "layers.csv").read_bytes()
    assert len(resumed) == len(single.trials) - len(kept)  # the shards skip what was kept


def _shard_workers() -> dict[int, str]:
    """pid -> title of this machine's Ray processes running the ShardWorker actor."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::ShardWorker"):
                found[int(entry.name)] = title
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc (Linux)")
def test_a_worker_killed_mid_shard_is_restarted_and_its_shard_retried(cluster, one_thread):
    model, ds = _cnn()
    config = dataclasses.replace(CNN_CONFIG, weight_formats=("int8", "int4", "int2"))
    single = analyze(model, ds, config)
    killed = []

    def kill_a_busy_worker(done, total, layer):
        workers = sorted(_shard_workers())
        # Trials have started and more shards wait in the queue than workers: both are running one.
        if not killed and 0 < done < total // 2 and workers:
            os.kill(workers[0], signal.SIGKILL)  # as the OOM killer would
            killed.append(workers[0])

    # Through the cluster's address, as on a cluster of machines: the driver only dispatches and both
    # workers are actors (with `--workers 2` alone the driver is one of the two, and runs its first
    # shard while the actor still loads the model: the actor may start its shard after half the run).
    address = ray.get_runtime_context().gcs_address
    shards = analyze(model, ds, dataclasses.replace(config, ray_address=address, workers=2), progress=kill_a_busy_worker)
    assert killed, "no worker was caught in the first half of the run; the test did not exercise a kill"
    assert killed[0] not in _shard_workers()
    assert all(t.ok for t in shards.trials)
    assert shards.to_frame().to_csv(index=False) == single.to_frame().to_csv(index=False)


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "analysis.cli", "analyze", "sample:cnn", "--data", "sample:cnn", "--samples", "64",
            "--quiet", "--weight-formats", "int8,int4,int2", "--act-formats", "int8", "--out", str(out), *extra]


# 3× the samples: the Ctrl-C must land while shards are still running, also on a loaded machine
# (with 64 samples the last shards could finish before the signal was handled; the run exited 0).
MORE = ("--samples", "192")


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_a_resume_finishes_the_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # the workers' one thread each
    subprocess.run(_cli(tmp_path / "single", *MORE), check=True, capture_output=True, timeout=600, env=env, cwd=ROOT)
    out = tmp_path / "two"
    before = set(_shard_workers())
    proc = subprocess.Popen(_cli(out, "--workers", "2", *MORE), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    trials = out / "trials.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and (not trials.exists() or not trials.read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C in the driver, after its first shard was written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "--resume" in err
    assert json.loads((out / "meta.json").read_text())["status"] == "interrupted"
    kept = len(trials.read_text().splitlines())
    total = len((tmp_path / "single" / "layers.csv").read_text().splitlines()) - 1
    assert 0 < kept < total and not (out / "layers.csv").exists()
    gone = time.time() + 60  # the run's workers are gone (Ray reaps them within seconds; a loaded machine is slower)
    while time.time() < gone and not set(_shard_workers()) <= before:
        time.sleep(0.5)
    assert set(_shard_workers()) <= before
    # --workers only changes where trials run: one process continues what two began.
    done = subprocess.run(_cli(out, "--resume", *MORE), capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert (out / "layers.csv").read_bytes() == (tmp_path / "single" / "layers.csv").read_bytes()
    lines = trials.read_text().splitlines()  # the kept trials were not run again
    assert len(lines) == total and len({json.dumps(json.loads(l), sort_keys=True) for l in lines}) == total
