"""The engine's run store: create, list, read CLI run folders, tell interrupted runs from live ones, delete."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import runstore
from analysis.cli import main
from analysis.runstore import Inputs

INPUTS = Inputs("sample:mlp", "sample:mlp", label="sample:mlp", data_label="sample:mlp (calibration split)")
CONFIG = {"weight_formats": ["int8", "int4"], "act_formats": ["int8"], "quant": {"num_samples": 48}}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """A run folder written by `quantlens analyze --out`, inside a store folder."""
    store = tmp_path_factory.mktemp("store")
    out = store / "from-cli"
    args = ["analyze", "sample:mlp", "--data", "sample:mlp", "--samples", "48", "--quiet",
            "--weight-formats", "int8,int4", "--act-formats", "int8", "--out", str(out)]
    assert main(args) == 0
    return out


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_create_list_and_finish(tmp_path):
    run_id, path = runstore.create_run(tmp_path, INPUTS, CONFIG)
    assert path == tmp_path / run_id and "sample-mlp" in run_id
    info = runstore.get_run(tmp_path, run_id)
    assert info.status == "running" and not info.foreign and info.pid == os.getpid()
    assert info.model == "sample:mlp" and info.config == CONFIG and info.get_inputs() == INPUTS
    assert info.formats_summary() == "W int8,int4 · A int8 · 48 samples"

    # a second run, finished: newest first, and only done with its analysis.json present
    later_id, later = runstore.create_run(tmp_path, INPUTS, CONFIG)
    runstore.write_meta(later, created=info.created + 10, status="done", layers=3, trials=15)
    assert runstore.get_run(tmp_path, later_id).status == "interrupted"
    (later / "analysis.json").write_text("{}")
    runs = runstore.list_runs(tmp_path)
    assert [r.id for r in runs] == [later_id, run_id]
    assert runs[0].done and runs[0].layers == 3 and runs[0].title().startswith("sample:mlp · ")
    labels = runstore.run_labels(runs)
    assert len(set(labels.values())) == 2  # told apart even with the same model and minute

    meta = json.loads((later / runstore.RUN_META).read_text())
    assert meta["schema"] == runstore.META_SCHEMA and meta["trials"] == 15
    assert not [p for p in later.iterdir() if p.name.startswith(".")]  # no temp files left behind
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / ".hidden").mkdir()
    assert len(runstore.list_runs(tmp_path)) == 2
    assert runstore.list_runs(tmp_path / "missing") == []


def test_a_cli_run_folder_is_a_run(cli_run):
    info = runstore.read_run(cli_run)
    assert info.done and info.id == "from-cli" and info.model == "sample:mlp"
    assert info.layers == 3 and info.trials == 15 and info.seconds is not None
    assert info.config["weight_formats"] == ["int8", "int4"] and info.config["quant"]["num_samples"] == 48
    assert info.get_inputs() == Inputs("sample:mlp", "sample:mlp", label="sample:mlp")
    assert (cli_run / "report.html").exists()
    # ... and, sitting in a store, it is listed and opened like a dashboard run
    assert [r.id for r in runstore.list_runs(cli_run.parent)] == ["from-cli"]
    assert runstore.get_run(cli_run.parent, "from-cli").stamp == info.stamp


def test_older_folders_without_or_with_dashboard_meta_still_open(tmp_path, cli_run):
    legacy_cli = tmp_path / "old-cli"
    legacy_cli.mkdir()
    for name in ("run.json", "analysis.json"):
        (legacy_cli / name).write_bytes((cli_run / name).read_bytes())
    info = runstore.read_run(legacy_cli)
    assert info.done and info.config["quant"]["num_samples"] == 48 and info.get_inputs() is None

    half_done = tmp_path / "old-cli-killed"
    half_done.mkdir()
    (half_done / "run.json").write_bytes((cli_run / "run.json").read_bytes())
    assert runstore.read_run(half_done).status == "interrupted"

    old_dashboard = tmp_path / "20240101-000000-sample-mlp-abcd"
    old_dashboard.mkdir()
    (old_dashboard / "analysis.json").write_text("{}")
    (old_dashboard / runstore.RUN_META).write_text(json.dumps({
        "schema": "quantlens.dashboard-run/1", "id": old_dashboard.name, "created": 5.0, "status": "done",
        "model": "sample:mlp", "data": "d", "inputs": {**INPUTS.__dict__, "dropped_later": 1},
        "config": {"weight_formats": ["int8"], "act_formats": [], "num_samples": 32}}))  # 0.1: flat config
    info = runstore.read_run(old_dashboard)
    assert info.done and info.created == 5.0 and info.get_inputs() == INPUTS
    assert info.formats_summary() == "W int8 · A none · 32 samples"

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / runstore.RUN_META).write_text("{cut sh")
    (tmp_path / "broken" / "run.json").write_text("{}")
    assert runstore.read_run(tmp_path / "broken").status == "interrupted"


@pytest.mark.parametrize("owner, expected", [
    ({}, "interrupted"),  # written before owners were recorded
    ({"pid": "dead"}, "interrupted"),  # a process that has exited
    ({"pid": "alive"}, "running"),  # another process on this machine, still at it
    ({"pid": 1234, "host": "some-other-machine"}, "running"),  # cannot be checked: left alone
])
def test_running_is_believed_only_while_its_process_lives(tmp_path, owner, expected):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid = {"dead": _dead_pid(), "alive": sleeper.pid}.get(owner.get("pid"), owner.get("pid"))
        run_id, path = runstore.new_run_dir(tmp_path, "x")
        runstore.write_meta(path, status="running", created=1.0,
                            **({"pid": pid, "host": owner.get("host", socket.gethostname())} if owner else {}))
        info = runstore.get_run(tmp_path, run_id)
        assert info.status == expected
        assert info.foreign == (expected == "running")
        if expected == "running":
            with pytest.raises(ValueError, match="still being analysed"):
                runstore.delete_run(tmp_path, run_id)
        else:
            runstore.delete_run(tmp_path, run_id)
            assert not path.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_this_process_runs_only_what_it_says(tmp_path):
    run_id, _ = runstore.create_run(tmp_path, INPUTS, CONFIG)
    assert runstore.get_run(tmp_path, run_id).status == "running"  # no job list given: trusted
    assert runstore.get_run(tmp_path, run_id, own_jobs={run_id}).status == "running"
    assert runstore.get_run(tmp_path, run_id, own_jobs=set()).status == "interrupted"  # its thread died
    with pytest.raises(ValueError, match="cancel it first"):
        runstore.delete_run(tmp_path, run_id, own_jobs={run_id})
    runstore.delete_run(tmp_path, run_id, own_jobs=set())
    assert runstore.list_runs(tmp_path) == []


def test_delete_only_inside_the_store(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "analysis.json").write_text("{}")
    for bad in ("../precious", "missing", str(outside)):
        with pytest.raises(ValueError, match="no run") as err:
            runstore.delete_run(store, bad)
        assert "\n" not in str(err.value)
        assert runstore.get_run(store, bad) is None
    assert outside.exists()


def test_analyze_to_directory_records_a_cancelled_run(tmp_path):
    from analysis.loading import load_data, load_model
    from analysis.runs import analyze_to_directory
    from analysis.sweep import AnalysisCancelled, AnalysisConfig

    calls = []

    def stop_after_two() -> bool:
        calls.append(1)
        return len(calls) > 2

    config = AnalysisConfig(weight_formats=("int8",), act_formats=(), num_samples=32)
    with pytest.raises(AnalysisCancelled):
        analyze_to_directory(load_model("sample:mlp"), load_data("sample:mlp"), config, tmp_path / "run",
                             should_stop=stop_after_two, inputs=INPUTS)
    info = runstore.read_run(tmp_path / "run")
    assert info.status == "cancelled" and info.error and info.get_inputs() == INPUTS
    assert info.config["weight_formats"] == ["int8"]


def test_a_folder_another_live_process_writes_is_not_touched(tmp_path):
    from analysis.loading import load_data, load_model
    from analysis.runs import ResumeError, analyze_to_directory
    from analysis.sweep import AnalysisConfig

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runstore.write_meta(tmp_path, status="running", pid=sleeper.pid, host=socket.gethostname())
        (tmp_path / "trials.jsonl").write_text("precious\n")
        for resume in (False, True):
            with pytest.raises(ResumeError, match=f"process {sleeper.pid}"):
                analyze_to_directory(load_model("sample:mlp"), load_data("sample:mlp"),
                                     AnalysisConfig(num_samples=16), tmp_path, resume=resume)
        assert (tmp_path / "trials.jsonl").read_text() == "precious\n"
    finally:
        sleeper.kill()
        sleeper.wait()
