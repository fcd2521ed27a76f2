"""Runs over several chunks of samples resume from their checkpoint (checkpoint.json), not from
scratch: written at every chunk's end and within a chunk (at most every `checkpoint_every` seconds),
it lets a resumed run skip the chunks done and, in the running chunk, the trials done with it.
Stopped anywhere (mid-chunk, in the last chunk with some trials finished, in --verify's pass) and
resumed, a run writes the same layers.csv bytes as one never stopped and runs only the trial steps
left; a checkpoint that is not this run's, or not readable, is said so in one line and not used."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch

from analysis import runstore
from analysis.cli import main
from analysis.estimate import NoiseEstimate
from analysis.loading import load_data, load_model
from analysis.metrics import ErrorAccumulator
from analysis.runs import CHECKPOINT_FILE, analyze_to_directory
from analysis.runstore import Inputs
from analysis.sweep import AnalysisCancelled, AnalysisConfig, SweepState

SAMPLES = 16
INPUTS = Inputs("sample:mlp", "sample:mlp", label="sample:mlp")
# 1 MiB holds 5 samples of the MLP (exact: 4 chunks of 16 samples); the estimate hands its simulator
# 3/(3 + projections) of the bound, so it gets 5/3 MiB for the same chunks.
MODES = {
    "exact": {"output_metrics": "exact", "cache_bytes": 1 << 20},
    "estimated": {"output_metrics": "estimated", "verify": 2, "cache_bytes": (5 << 20) // 3},
}
TRIALS = 15  # 3 layers × (int8, int4 weights; int8 activations; both)
CHUNKS = 4


def _config(mode: str, **changes) -> AnalysisConfig:
    return AnalysisConfig(**{"weight_formats": ("int8", "int4"), "act_formats": ("int8",), "num_samples": SAMPLES,
                             **MODES[mode], **changes})


def _run(out: Path, config: AnalysisConfig, **kwargs):
    """Run (or resume) into `out`: the progress reports (done, total) and the warnings about checkpoints."""
    steps: list[tuple[int, int]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analyze_to_directory(load_model("sample:mlp"), load_data("sample:mlp", max_samples=SAMPLES), config, out,
                             progress=lambda done, total, _: steps.append((done, total)), inputs=INPUTS, **kwargs)
    return steps, [str(w.message) for w in caught if "checkpoint" in str(w.message)]


def _stopped(out: Path, config: AnalysisConfig, after: int, every: float = math.inf) -> None:
    """The run stopped (as Cancel or Ctrl-C stops it) before its trial step number `after` + 1; it
    wrote its checkpoint within chunks at most every `every` seconds (inf: at chunk ends only)."""
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > after

    with pytest.raises(AnalysisCancelled):
        analyze_to_directory(load_model("sample:mlp"), load_data("sample:mlp", max_samples=SAMPLES), config, out,
                             should_stop=stop, inputs=INPUTS, checkpoint_every=every)


def _checkpoint(out: Path) -> dict:
    return json.loads((out / CHECKPOINT_FILE).read_text())


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """layers.csv of an uninterrupted run, per mode."""
    root = tmp_path_factory.mktemp("clean")
    out = {}
    for mode in MODES:
        steps, said = _run(root / mode, _config(mode))
        assert not said and not (root / mode / CHECKPOINT_FILE).exists()
        assert steps[0] == (0, steps[0][1]) and steps[-1][0] == steps[-1][1]  # the size of the job up front
        out[mode] = (root / mode / "layers.csv").read_bytes()
    return out


@pytest.fixture(scope="module")
def stopped_exact(tmp_path_factory) -> Path:
    """An exact run stopped in its third chunk after 4 of its trials, its checkpoint written after
    every trial: it holds chunks 1 and 2, and chunk 3 for those 4 trials."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    _stopped(out, _config("exact"), after=2 * TRIALS + 4, every=0)
    assert _checkpoint(out)["state"]["done"] == 2 and len(_checkpoint(out)["state"]["ahead"]) == 4
    return out


# (mode, steps before the stop, seconds between checkpoints within a chunk, phase and chunks done in
# the checkpoint, trials of the running chunk done in it, trials already in trials.jsonl)
STOPS = [
    ("exact", 2 * TRIALS + 4, math.inf, "sweep", 2, 0, 0),  # mid-chunk, checkpoints at chunk ends: after chunk 2
    ("exact", 2 * TRIALS + 4, 0, "sweep", 2, 4, 0),  # ... and after every trial: 4 trials hold chunk 3 already
    ("exact", 3 * TRIALS + 6, 0, "sweep", 3, 0, 6),  # in the last chunk: 6 trials finished, 9 continue from chunk 3
    ("estimated", TRIALS + 3, math.inf, "sweep", 1, 0, 0),
    ("estimated", 5, 0, "sweep", 0, 5, 0),  # within the first chunk
    ("estimated", TRIALS + 3, 0, "sweep", 1, 3, 0),
    ("estimated", 3 * TRIALS + 9, 0, "sweep", 3, 0, 9),  # --verify must still choose among all 15 estimates
    ("estimated", 4 * TRIALS + 10 + 3, math.inf, "verify", 1, 0, TRIALS),  # in --verify's pass (10 trials), chunk 2
    ("estimated", 4 * TRIALS + 10 + 3, 0, "verify", 1, 3, TRIALS),
    ("estimated", 4 * TRIALS + 30 + 4, 0, "verify", 3, 4, TRIALS),  # its last chunk: nothing reported yet
]


@pytest.mark.parametrize("mode,after,every,phase,done,ahead,finished", STOPS)
def test_a_stopped_run_resumes_where_it_stopped_to_identical_results(tmp_path, clean, mode, after, every, phase, done,
                                                                     ahead, finished):
    out = tmp_path / "run"
    _stopped(out, _config(mode), after, every)
    state = _checkpoint(out)["state"]
    assert (state["phase"], state["done"], len(state["chunks"])) == (phase, done, CHUNKS)
    # The trials that hold the running chunk already: the first ones of the pass, in the order they ran.
    assert state["ahead"] == [key for key, _ in state["trials"]][:ahead]
    assert len((out / "trials.jsonl").read_text().splitlines()) == finished
    assert runstore.read_run(out).status == "cancelled"
    steps, said = _run(out, _config(mode), resume=True)
    assert not said
    assert (out / "layers.csv").read_bytes() == clean[mode]
    assert not (out / CHECKPOINT_FILE).exists()
    assert runstore.read_run(out).status == "done"
    # Progress starts where the run left off, and only the steps left are run: the checkpoint's
    # chunks and the running chunk's trials done are not run (nor counted) again.
    first, total = steps[0]
    if phase == "sweep":
        assert first == done * (TRIALS - finished) + ahead and first > 0
    else:
        assert first == done * 10 + ahead and total == CHUNKS * 10  # --verify 2 × 5 format labels
    assert steps[-1] == (total, total) and len(steps) == total - first + 1


def test_resuming_a_finished_run_measures_nothing_again(tmp_path, clean):
    out = tmp_path / "run"
    _run(out, _config("estimated"))
    rows = (out / "trials.jsonl").read_text()
    assert len(rows.splitlines()) == TRIALS + 10  # the estimates, then --verify's 2 × 5 measurements
    steps, said = _run(out, _config("estimated"), resume=True)
    assert not said and [done for done, _ in steps] == [0]  # no trial step ran
    assert (out / "trials.jsonl").read_text() == rows and (out / "layers.csv").read_bytes() == clean["estimated"]


def test_a_checkpoint_of_other_chunks_is_not_used_and_said_so(tmp_path, stopped_exact):
    out = tmp_path / "run"
    shutil.copytree(stopped_exact, out)
    other = _config("exact", cache_bytes=2 << 20)  # result-neutral, so --resume continues, but other chunks
    reference = tmp_path / "reference"
    _run(reference, other)
    steps, said = _run(out, other, resume=True)
    assert len(said) == 1 and "other chunks of samples" in said[0] and "--cache-mb" in said[0] and "\n" not in said[0]
    assert steps[0][0] == 0  # from the first chunk
    assert (out / "layers.csv").read_bytes() == (reference / "layers.csv").read_bytes()
    assert not (out / CHECKPOINT_FILE).exists()


def _mangle_identity(payload: dict) -> None:
    payload["run"]["header"] = "0" * 64


def _mangle_sums(payload: dict) -> None:
    payload["state"]["trials"][0][1]["local"]["count"] = "many"


def _drop_a_trial(payload: dict) -> None:
    del payload["state"]["trials"][-1]


def _huge_number(payload: dict) -> None:
    payload["state"]["trials"][0][1]["error_histogram"]["bins"] = 10**400


def _other_plan(payload: dict) -> None:
    payload["run"]["plan"] = "0" * 64


def _ahead_without_sums(payload: dict) -> None:
    payload["state"]["ahead"].append(payload["state"]["trials"].pop()[0])


def _ahead_not_keys(payload: dict) -> None:
    payload["state"]["ahead"] = ["fc1"]


@pytest.mark.parametrize("mangle,reason", [
    (_mangle_identity, "belongs to another run"),
    (_other_plan, "belongs to another run"),
    (_ahead_without_sums, "holds no sums of"),
    (_ahead_not_keys, "ahead must be a list of [layer, target, format]"),
    (_mangle_sums, "count must be a non-negative integer"),
    (_drop_a_trial, "lacks the sums of 1 unfinished trial"),
    (_huge_number, "unusable"),
    ("truncated", "not valid JSON"),
    ("text", "not valid JSON"),
    ("not a file", "not a regular file"),
])
def test_a_checkpoint_that_is_not_this_runs_or_is_corrupt_is_not_trusted(tmp_path, clean, stopped_exact, mangle,
                                                                         reason):
    out = tmp_path / "run"
    shutil.copytree(stopped_exact, out)
    path = out / CHECKPOINT_FILE
    if mangle == "truncated":
        path.write_text(path.read_text()[:len(path.read_text()) // 2])
    elif mangle == "text":
        path.write_bytes(b"\x00garbage")
    elif mangle == "not a file":
        path.unlink()
        path.mkdir()
    else:
        payload = json.loads(path.read_text())
        mangle(payload)
        path.write_text(json.dumps(payload))
    steps, said = _run(out, _config("exact"), resume=True)
    assert len(said) == 1 and reason in said[0] and "start again from the first chunk" in said[0]
    assert "\n" not in said[0] and steps[0][0] == 0
    assert (out / "layers.csv").read_bytes() == clean["exact"]
    assert runstore.read_run(out).status == "done"
    assert path.is_dir() if mangle == "not a file" else not path.exists()  # what is not quantlens' is left


def test_a_checkpoint_written_mid_chunk_by_a_run_of_another_plan_is_not_used(tmp_path, clean, stopped_exact):
    other = tmp_path / "other"  # the same model and data, int8 weights only: 9 trials, not 15
    _stopped(other, _config("exact", weight_formats=("int8",)), after=2 * 9 + 3, every=0)
    assert (_checkpoint(other)["state"]["done"], len(_checkpoint(other)["state"]["ahead"])) == (2, 3)
    out = tmp_path / "run"
    shutil.copytree(stopped_exact, out)
    shutil.copy(other / CHECKPOINT_FILE, out / CHECKPOINT_FILE)
    steps, said = _run(out, _config("exact"), resume=True)
    assert len(said) == 1 and "belongs to another run" in said[0] and "start again from the first chunk" in said[0]
    assert "\n" not in said[0] and steps[0] == (0, CHUNKS * TRIALS) and len(steps) == CHUNKS * TRIALS + 1
    assert (out / "layers.csv").read_bytes() == clean["exact"]


def test_the_cli_resume_says_in_one_line_why_a_checkpoint_is_not_used(tmp_path, stopped_exact, capsys):
    out = tmp_path / "run"
    shutil.copytree(stopped_exact, out)
    argv = ["analyze", "sample:mlp", "--data", "sample:mlp", "--samples", str(SAMPLES), "--weight-formats", "int8,int4",
            "--act-formats", "int8", "--cache-mb", "2", "--resume", "--out", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "checkpoint" in line]
    assert len(lines) == 1 and lines[0].startswith("quantlens: warning: the checkpoint") and "Traceback" not in err
    assert not (out / CHECKPOINT_FILE).exists()
    # The progress bar showed the whole job before the first trial finished.
    assert f"0/{TRIALS * 2}" in err  # --cache-mb 2: 2 chunks of 16 samples


def test_a_fresh_run_into_the_folder_drops_an_old_checkpoint(tmp_path, clean, stopped_exact):
    out = tmp_path / "run"
    shutil.copytree(stopped_exact, out)
    runs = runstore.list_runs(tmp_path)
    assert [(r.id, r.status) for r in runs] == [("run", "cancelled")]  # a checkpoint does not disturb the store
    _, said = _run(out, _config("exact"))
    assert not said and not (out / CHECKPOINT_FILE).exists()
    assert (out / "layers.csv").read_bytes() == clean["exact"]
    assert [(r.id, r.status) for r in runstore.list_runs(tmp_path)] == [("run", "done")]


def _spy_on_checkpoints(monkeypatch) -> list[tuple[float, int, int]]:
    """Each checkpoint.json write, once the whole file is there: (time, chunks done, trials ahead)."""
    written = []
    original = runstore.write_atomic

    def spy(path, write):
        original(path, write)
        if Path(path).name == CHECKPOINT_FILE:
            state = json.loads(Path(path).read_text())["state"]
            written.append((time.monotonic(), state["done"], len(state["ahead"])))

    monkeypatch.setattr(runstore, "write_atomic", spy)
    return written


def test_a_checkpoint_is_written_whole_after_every_chunk_but_the_last(tmp_path, monkeypatch):
    written = _spy_on_checkpoints(monkeypatch)
    _run(tmp_path / "run", _config("exact"), checkpoint_every=math.inf)
    assert [(done, ahead) for _, done, ahead in written] == [(1, 0), (2, 0), (3, 0)]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        [".quantlens.lock", "analysis.json", "layers.csv", "meta.json", "run.json", "trials.jsonl"])  # no temp file left


def test_with_no_throttle_a_checkpoint_follows_every_trial_of_every_chunk_but_the_last(tmp_path, monkeypatch, clean):
    written = _spy_on_checkpoints(monkeypatch)
    _run(tmp_path / "run", _config("exact"), checkpoint_every=0)
    # Within chunk k: after each of its first 14 trials (k, 1..14); after its 15th, the chunk's end (k + 1, 0).
    assert [(done, ahead) for _, done, ahead in written] == [
        (k + n // TRIALS, n % TRIALS) for k in range(CHUNKS - 1) for n in range(1, TRIALS + 1)]
    assert (tmp_path / "run" / "layers.csv").read_bytes() == clean["exact"]  # saving the state changes no sum


def test_within_a_chunk_the_checkpoint_is_written_at_most_every_so_many_seconds(tmp_path, monkeypatch):
    written = _spy_on_checkpoints(monkeypatch)
    every = 0.2
    analyze_to_directory(load_model("sample:mlp"), load_data("sample:mlp", max_samples=SAMPLES), _config("exact"),
                         tmp_path / "run", progress=lambda *_: time.sleep(0.05), inputs=INPUTS, checkpoint_every=every)
    assert [(done, ahead) for _, done, ahead in written if not ahead] == [(1, 0), (2, 0), (3, 0)]  # chunk ends: all
    # A chunk takes ≥ 15 × 0.05 s: some writes within each chunk but the last, none closer than `every`
    # to the write before it (a chunk's end included), so far fewer than one per trial.
    within = [(at, done) for at, done, ahead in written if ahead]
    assert sorted({done for _, done in within}) == list(range(CHUNKS - 1))
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(written) if b[2]]
    assert min(gaps) >= every and len(within) < (CHUNKS - 1) * (TRIALS - 1) // 2


@pytest.mark.parametrize("every", [-1, math.nan, "5", True])
def test_a_checkpoint_interval_that_is_not_seconds_is_refused_before_anything_is_written(tmp_path, every):
    with pytest.raises(ValueError, match="checkpoint_every must be a number of seconds") as err:
        _run(tmp_path / "run", _config("exact"), checkpoint_every=every)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


# --- the accumulators' state ------------------------------------------------------------------------


def _grads(seed: int):
    from analysis.estimate import OutputGradients

    g = torch.Generator().manual_seed(seed)
    return OutputGradients(samples=3, exact=False, grads={"n": [torch.randn(2, 3, 4, generator=g)]},
                           signal=float(torch.rand(1, generator=g)) * 10, count=12)


def test_a_noise_estimate_continues_from_its_state_to_the_same_bits():
    deltas = [{"n": torch.randn(3, 4, generator=torch.Generator().manual_seed(10 + i))} for i in range(4)]
    whole = NoiseEstimate()
    for i, delta in enumerate(deltas):
        whole.update(_grads(i), delta)
    resumed = NoiseEstimate()
    for i, delta in enumerate(deltas[:2]):
        resumed.update(_grads(i), delta)
    resumed = NoiseEstimate.from_state(json.loads(json.dumps(resumed.state())))
    for i, delta in enumerate(deltas[2:], start=2):
        resumed.update(_grads(i), delta)
    assert repr(resumed.result()) == repr(whole.result())  # float reprs are exact; cosine is NaN in both
    # The sums against a naive computation: Σ over chunks of Σ_ks (gᵀδ)² / K, signal and count summed.
    noise = sum(float(((_grads(i).grads["n"][0] * d["n"]).sum(-1) ** 2).sum()) / 2 for i, d in enumerate(deltas))
    assert math.isclose(resumed.result().mse, noise / 48, rel_tol=1e-6)


@pytest.mark.parametrize("state,needle", [
    ({"diagonal": False, "signal": 1.0, "count": 3}, "keys"),
    ({"diagonal": "no", "signal": 1.0, "count": 3, "pending": []}, "diagonal"),
    ({"diagonal": False, "signal": 1.0, "count": -3, "pending": []}, "count"),
    ({"diagonal": False, "signal": 1.0, "count": 3, "pending": ["x"]}, "pending"),
    ([1, 2], "keys"),
])
def test_a_noise_estimate_state_that_is_not_one_is_refused_in_one_line(state, needle):
    with pytest.raises(ValueError, match=needle) as err:
        NoiseEstimate.from_state(state)
    assert "\n" not in str(err.value)


def test_an_error_accumulator_continues_from_its_json_state_to_the_same_bits():
    g = torch.Generator().manual_seed(3)
    pairs = [(torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)) for _ in range(3)]
    whole, first = ErrorAccumulator(logits=True), ErrorAccumulator(logits=True)
    for ref, q in pairs:
        whole.update(ref, q)
    first.update(*pairs[0])
    resumed = ErrorAccumulator.from_state(json.loads(json.dumps(first.state())))
    for ref, q in pairs[1:]:
        resumed.update(ref, q)
    assert resumed.result() == whole.result()


@pytest.mark.parametrize("payload,needle", [
    ({"phase": "sweep"}, "expected the keys"),
    ({"phase": "later", "chunks": [], "done": 0, "trials": [], "verified": []}, "phase"),
    ({"phase": "sweep", "chunks": [[0, -5]], "done": 0, "trials": [], "verified": []}, "chunks"),
    ({"phase": "sweep", "chunks": [[0, 5]], "done": True, "trials": [], "verified": []}, "done"),
    ({"phase": "sweep", "chunks": [[0, 5]], "done": 0, "trials": [["fc1", {}]], "verified": []}, "trials"),
    ({"phase": "verify", "chunks": [[0, 5]], "done": 0, "trials": [], "verified": [["fc1", 2, "x"]]}, "verified"),
])
def test_a_sweep_state_that_is_not_one_is_refused_in_one_line(payload, needle):
    with pytest.raises(ValueError, match=needle) as err:
        SweepState.from_dict(payload)
    assert "\n" not in str(err.value)


def test_a_sweep_state_round_trips_through_json():
    state = SweepState("verify", ((0, 5), (5, 8)), 1, {("fc1", "weights", "int8"): {"a": 0.1 + 0.2}},
                       (("fc1", "weights", "int8"),), (("fc1", "weights", "int8"),))
    assert SweepState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    # A state written before states were taken within a chunk has no `ahead`: none of its trials are.
    earlier = {key: value for key, value in state.to_dict().items() if key != "ahead"}
    assert SweepState.from_dict(earlier) == SweepState(*[getattr(state, f) for f in ("phase", "chunks", "done",
                                                                                     "trials", "verified")])


def test_the_progress_bar_of_a_resumed_run_starts_where_it_left_off(capsys):
    from analysis.cli.commands import _progress_bar

    update, close = _progress_bar(quiet=False)
    update(30, 60, "")  # the sweep's first report: 2 of 4 chunks of 15 trials were done before
    time.sleep(0.2)  # tqdm redraws at most every 0.1 s
    update(31, 60, "fc1")
    update(31, 70, "fc1")  # --verify's pass resizes the job
    close()
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "| 30/60" in err and "| 31/70" in err and "| 0/60" not in err
    # The rate (so the ETA) counts the one step taken in ≥ 0.2 s, not the 30 done before.
    rate = float(re.search(r"\| 31/60 \[[^,]*, *([\d.]+)trial/s", err).group(1))
    assert rate <= 5.5
