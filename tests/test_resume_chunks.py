"""Runs over several chunks of samples resume from the last completed chunk (checkpoint.json), not
from scratch: stopped anywhere (mid-chunk, in the last chunk with some trials finished, in
--verify's pass) and resumed, a run writes the same layers.csv bytes as one never stopped; a
checkpoint that is not this run's, or not readable, is said so in one line and not used."""

from __future__ import annotations

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
    steps: list[tuple[int, int]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analyze_to_directory(load_model("sample:mlp"), load_data("sample:mlp", max_samples=SAMPLES), config, out,
                             progress=lambda done, total, _: steps.append((done, total)), inputs=INPUTS, **kwargs)
    return steps, [str(w.message) for w in caught if "checkpoint" in str(w.message)]


def _stopped(out: Path, config: AnalysisConfig, after: int) -> None:
    """The run stopped (as Cancel or Ctrl-C stops it) before its trial step number `after` + 1."""
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > after

    with pytest.raises(AnalysisCancelled):
        analyze_to_directory(load_model("sample:mlp"), load_data("sample:mlp", max_samples=SAMPLES), config, out,
                             should_stop=stop, inputs=INPUTS)


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
    """An exact run stopped in its third chunk: its checkpoint holds chunks 1 and 2."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    _stopped(out, _config("exact"), after=2 * TRIALS + 4)
    return out


# (mode, steps before the stop, phase and chunks done in the checkpoint, trials already in trials.jsonl)
STOPS = [
    ("exact", 2 * TRIALS + 4, "sweep", 2, 0),  # mid-chunk: the checkpoint after chunk 2
    ("exact", 3 * TRIALS + 6, "sweep", 3, 6),  # in the last chunk: 6 trials finished, 9 continue from chunk 3
    ("estimated", TRIALS + 3, "sweep", 1, 0),
    ("estimated", 3 * TRIALS + 9, "sweep", 3, 9),  # --verify must still choose among all 15 estimates
    ("estimated", 4 * TRIALS + 10 + 3, "verify", 1, TRIALS),  # in --verify's pass (10 trials), its second chunk
]


@pytest.mark.parametrize("mode,after,phase,done,finished", STOPS)
def test_a_stopped_run_resumes_from_its_last_chunk_to_identical_results(tmp_path, clean, mode, after, phase, done,
                                                                        finished):
    out = tmp_path / "run"
    _stopped(out, _config(mode), after)
    state = _checkpoint(out)["state"]
    assert (state["phase"], state["done"], len(state["chunks"])) == (phase, done, CHUNKS)
    assert len((out / "trials.jsonl").read_text().splitlines()) == finished
    assert runstore.read_run(out).status == "cancelled"
    steps, said = _run(out, _config(mode), resume=True)
    assert not said
    assert (out / "layers.csv").read_bytes() == clean[mode]
    assert not (out / CHECKPOINT_FILE).exists()
    assert runstore.read_run(out).status == "done"
    # Progress starts where the run left off: the checkpoint's chunks are not run (nor counted) again.
    first, total = steps[0]
    if phase == "sweep":
        assert first == done * (TRIALS - finished) and first > 0
    else:
        assert first == done * 10 and total == CHUNKS * 10  # --verify 2 × 5 format labels
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


@pytest.mark.parametrize("mangle,reason", [
    (_mangle_identity, "belongs to another run"),
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


def test_a_checkpoint_is_written_whole_after_every_chunk_but_the_last(tmp_path, monkeypatch):
    written = []
    original = runstore.write_atomic

    def spy(path, write):
        original(path, write)
        if Path(path).name == CHECKPOINT_FILE:  # the whole file is there once the write returns
            written.append(json.loads(Path(path).read_text())["state"]["done"])

    monkeypatch.setattr(runstore, "write_atomic", spy)
    _run(tmp_path / "run", _config("exact"))
    assert written == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        [".quantlens.lock", "analysis.json", "layers.csv", "meta.json", "run.json", "trials.jsonl"])  # no temp file left


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
                       (("fc1", "weights", "int8"),))
    assert SweepState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


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
