"""The command line end to end: files written, one-line errors, kill and resume, byte-identical output."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from analysis.cli import main

FAST = ["--samples", "48", "--quiet", "--weight-formats", "int8,int4", "--act-formats", "int8"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp")
    assert main(["analyze", "sample:mlp", "--data", "sample:mlp", *FAST, "--out", str(out)]) == 0
    return out


def test_analyze_writes_the_three_outputs(mlp_run):
    frame = pd.read_csv(mlp_run / "layers.csv")
    for column in ("layer", "kind", "params", "target", "format", "sqnr_db", "mse", "cosine", "output_sqnr_db", "output_mse"):
        assert column in frame.columns
    # 3 layers × (2 weight + 1 activation + 2 both) trials
    assert len(frame) == 15 and set(frame["layer"]) == {"fc1", "fc2", "fc3"}
    payload = json.loads((mlp_run / "analysis.json").read_text())
    assert payload["config"]["quant"]["num_samples"] == 48 and "torch" in payload["versions"]
    assert payload["model"]["spec"] == "sample:mlp" and len(payload["model"]["fingerprint"]) == 16
    html = (mlp_run / "report.html").read_text()
    assert "fc1" in html and "<script" in html


def test_suggest_evaluate_export_round_trip(mlp_run, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "suggest", str(mlp_run), "--budget", "avg-bits=6", "--front-points", "4")
    assert code == 0 and "avg weight bits" in out and "Pareto front" in out
    pmap = json.loads((mlp_run / "map.json").read_text())
    assert pmap["schema"] == "quantlens.precision-map/2" and set(pmap["layers"]) == {"fc1", "fc2", "fc3"}
    assert pmap["predicted"]["avg-bits"] <= 6 + 1e-9 and "sqnr_db" in pmap["measured"]
    code, out, _ = run_cli(capsys, "evaluate", "sample:mlp", "--data", "sample:mlp", "--map", str(mlp_run / "map.json"),
                           "--out", str(tmp_path / "eval.json"))
    assert code == 0 and "accuracy" in out
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert [r["path"] for r in rows] == ["fp32", "simulated"]
    code, _, _ = run_cli(capsys, "export", str(mlp_run / "map.json"), "--to", "yaml", "--out", str(tmp_path / "map.yaml"))
    assert code == 0 and "quantlens.precision-map/2" in (tmp_path / "map.yaml").read_text()


@pytest.mark.parametrize("argv,needle", [
    (["analyze", "sample:nope", "--data", "sample:mlp", "--out", "{tmp}"], "sample"),
    (["analyze", "sample:mlp", "--data", "sample:cnn", "--out", "{tmp}"], "cannot run on the data"),
    (["analyze", "sample:mlp", "--data", "sample:mlp", "--weight-formats", "int9", "--out", "{tmp}"], "int9"),
    (["analyze", "sample:mlp", "--data", "{tmp}/missing.npz", "--out", "{tmp}"], "missing.npz"),
    (["suggest", "{tmp}", "--budget", "avg-bits=4"], "analysis"),
    (["evaluate", "sample:mlp", "--data", "sample:mlp", "--map", "{tmp}/nope.json"], "not found"),
])
def test_errors_are_one_line_and_non_zero(capsys, tmp_path, argv, needle):
    code, out, err = run_cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code != 0
    lines = [l for l in err.strip().splitlines() if not l.startswith("W1")]  # torch C++ log lines aside
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_a_real_process_exits_non_zero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "analysis.cli", "analyze", "sample:mlp", "--data", str(tmp_path / "x.npz"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "quantlens: error:" in proc.stderr


def _analyze_args(out):
    return [sys.executable, "-m", "analysis.cli", "analyze", "sample:cnn", "--data", "sample:cnn", "--samples", "64",
            "--quiet", "--weight-formats", "int8,int4,int2", "--act-formats", "int8", "--out", str(out)]


@pytest.mark.slow
def test_killed_run_resumes_to_identical_results_without_redoing_trials(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_analyze_args(clean), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_analyze_args(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials = killed / "trials.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not trials.exists() or len(trials.read_text().splitlines()) < 8):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up, as with the OOM killer
    proc.wait()
    done_before = len(trials.read_text().splitlines())
    total = len(pd.read_csv(clean / "layers.csv"))
    assert 8 <= done_before < total and not (killed / "layers.csv").exists()
    subprocess.run(_analyze_args(killed) + ["--resume"], check=True, capture_output=True, timeout=600)
    assert (killed / "layers.csv").read_bytes() == (clean / "layers.csv").read_bytes()
    # finished trials were kept, not recomputed: each trial appears once in the stream
    keys = [tuple(json.loads(l)[k] for k in ("layer", "target", "weight_format", "act_format"))
            for l in trials.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == total


def test_same_inputs_give_byte_identical_layers_csv(tmp_path):
    for name in ("a", "b"):
        assert main(["analyze", "sample:mlp", "--data", "sample:mlp", *FAST, "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "a" / "layers.csv").read_bytes() == (tmp_path / "b" / "layers.csv").read_bytes()


def test_resume_refuses_a_different_config(tmp_path, capsys):
    assert main(["analyze", "sample:mlp", "--data", "sample:mlp", *FAST, "--out", str(tmp_path)]) == 0
    code, _, err = run_cli(capsys, "analyze", "sample:mlp", "--data", "sample:mlp", "--samples", "32", "--quiet",
                           "--resume", "--out", str(tmp_path))
    assert code == 2 and "different config" in err
