"""The dashboard, driven headless with Streamlit's AppTest: every page, the run store, bad inputs.

Jobs run inline (QUANTLENS_SYNC_JOBS=1) so an analysis finishes inside `at.run()`; the bundled mlp
with 64 samples keeps each analysis around a second.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

import sample_models
from analysis import runstore
from dashboard import state, uploads

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
MLP_LAYERS = 3
# 3 layers × (2 weight formats + 1 activation format + 2 weight/activation pairs)
MLP_TRIALS = MLP_LAYERS * (2 + 1 + 2)


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLENS_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("QUANTLENS_UPLOAD_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv("QUANTLENS_SYNC_JOBS", "1")
    monkeypatch.setenv("QUANTLENS_DEFAULT_SAMPLE", "mlp")
    monkeypatch.setenv("QUANTLENS_DEFAULT_SAMPLES", "64")
    st.cache_data.clear()
    st.cache_resource.clear()
    state.JOBS.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()
    state.JOBS.clear()


@pytest.fixture(scope="module")
def template_runs(tmp_path_factory) -> Path:
    """A run store holding one finished mlp analysis, made once by the first-open auto start."""
    root = tmp_path_factory.mktemp("template") / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLENS_RUNS_DIR", str(root))
        mp.setenv("QUANTLENS_SYNC_JOBS", "1")
        mp.setenv("QUANTLENS_DEFAULT_SAMPLE", "mlp")
        mp.setenv("QUANTLENS_DEFAULT_SAMPLES", "64")
        at = AppTest.from_file(APP, default_timeout=120).run()
        assert not at.exception
    state.JOBS.clear()
    return root


def _open(tmp_path: Path, template: Path | None = None) -> AppTest:
    if template is not None:
        shutil.copytree(template, tmp_path / "runs")
    at = AppTest.from_file(APP, default_timeout=120).run()
    _ok(at)
    return at


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _page(at: AppTest, name: str) -> AppTest:
    at.switch_page(f"views/{name}.py").run()
    _ok(at)
    return at


def _errors(at: AppTest) -> list[str]:
    """The error boxes as the user reads them: Markdown's backslash escapes removed (names and
    messages are escaped before rendering, dashboard/markup.py)."""
    return [re.sub(r"\\(.)", r"\1", e.value) for e in at.error]


def _table(at: AppTest, column: str, without: str | None = None):
    """The table with `column` (plain st.dataframe elements do not carry their key)."""
    for frame in at.dataframe:
        value = frame.value
        if column in value and (without is None or without not in value):
            return value
    raise AssertionError(f"no table with column {column!r}")


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def _run_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir())


# --- first impression and the run store ------------------------------------------------------------


def test_first_open_analyses_the_sample_and_a_second_open_reuses_it(tmp_path):
    at = _open(tmp_path)
    runs = _run_dirs(tmp_path)
    assert len(runs) == 1
    for name in ("run.json", "trials.jsonl", "analysis.json", "layers.csv", runstore.RUN_META):
        assert (runs[0] / name).exists(), name
    meta = json.loads((runs[0] / runstore.RUN_META).read_text())
    assert meta["status"] == "done" and meta["model"] == "sample:mlp"
    assert at.session_state.run_id == runs[0].name
    assert not _errors(at)
    # the landing page shows the finished per-layer analysis
    assert at.get("plotly_chart")
    assert at.sidebar.selectbox[0].value == runs[0].name

    # a browser refresh / server restart: a new session reopens the stored run, nothing reruns
    state.JOBS.clear()
    st.cache_resource.clear()
    again = _open(tmp_path)
    assert _run_dirs(tmp_path) == runs
    assert again.session_state.run_id == runs[0].name
    _page(again, "sensitivity")
    assert len(again.dataframe(key="sens_table").value) == MLP_TRIALS


# --- the pages ---------------------------------------------------------------------------------------


def test_sensitivity_page_table_charts_filters_and_tabs(tmp_path, template_runs):
    at = _page(_open(tmp_path, template_runs), "sensitivity")
    table = at.dataframe(key="sens_table").value
    assert len(table) == MLP_TRIALS  # one row per layer × target × format
    assert set(table["layer"]) == {"fc1", "fc2", "fc3"}
    assert len(at.get("plotly_chart")) >= 2  # bar chart + heat map (the first tab)
    heat = at.get("plotly_chart")[1].proto.spec
    assert '"heatmap"' in heat

    at.text_input(key="sens_search").set_value("fc2").run()
    _ok(at)
    assert set(at.dataframe(key="sens_table").value["layer"]) == {"fc2"}
    at.text_input(key="sens_search").set_value("").run()
    at.selectbox(key="sens_target").set_value("weights").run()
    assert len(at.dataframe(key="sens_table").value) == MLP_LAYERS * 2
    at.number_input(key="sens_top_n").set_value(1).run()
    _ok(at)
    assert at.dataframe(key="sens_table").value["layer"].nunique() == 1

    for tab in ("Local vs output", "Cumulative", "Skipped & failed"):
        at.session_state["sens_view"] = tab
        at.run()
        _ok(at)
        assert not _errors(at)
    at.session_state["sens_view"] = "Cumulative"
    at.run()
    assert any('"scatter"' in c.proto.spec for c in at.get("plotly_chart"))


def test_table_columns_are_as_wide_as_their_headers_and_values(tmp_path, template_runs):
    """Every column of the sensitivity table gets a width that holds its header and its longest shown
    value (7 px a character at least), so nothing is cut to 'top…'."""
    at = _page(_open(tmp_path, template_runs), "sensitivity")
    table = at.dataframe(key="sens_table")
    config = json.loads(table.proto.columns)
    frame = table.value
    for column in frame.columns:
        entry = config.get(column) or {}
        label = entry.get("label") or column
        longest = max([len(label), *(len(str(v)) for v in frame[column] if isinstance(v, str))])
        assert isinstance(entry.get("width"), int) and entry["width"] >= 7 * longest, (column, entry, longest)


def test_layer_detail_page(tmp_path, template_runs):
    at = _open(tmp_path, template_runs)
    at.session_state["selected_layer"] = "fc2"
    _page(at, "layer_detail")
    assert at.selectbox(key="detail_layer_fc2").value == "fc2"
    assert len(at.get("plotly_chart")) == 4  # weights, activations, error, channel ranges
    rows = _table(at, "target", without="layer")
    assert len(rows) == MLP_TRIALS // MLP_LAYERS
    at.selectbox(key="detail_layer_fc2").set_value("fc3").run()
    _ok(at)
    assert at.session_state.selected_layer == "fc3"
    at.selectbox(key="detail_wfmt").set_value("int8").run()
    _ok(at)
    assert "int8 clip" in at.get("plotly_chart")[0].proto.spec


def test_mixed_precision_budget_edit_and_evaluate(tmp_path, template_runs):
    at = _page(_open(tmp_path, template_runs), "mixed_precision")
    assert not _errors(at)
    assert at.get("plotly_chart")  # the Pareto front
    assert '"uniform"' in at.get("plotly_chart")[0].proto.spec
    bits_at_6 = float(_metric(at, "Average weight bits"))
    assert bits_at_6 <= 6.0

    at.number_input(key="mp_value_avg-bits").set_value(4.5).run()
    _ok(at)
    bits_at_4 = float(_metric(at, "Average weight bits"))
    assert bits_at_4 < bits_at_6 and bits_at_4 <= 4.5

    # override one layer by hand
    editor = at.data_editor[0]
    table = editor.value
    first = table["layer"][0]
    at.session_state[editor.key] = {"edited_rows": {0: {"weight": "fp32", "activation": "none"}},
                                    "added_rows": [], "deleted_rows": []}
    at.run()
    _ok(at)
    assert not _errors(at)
    edited_bits = float(_metric(at, "Average weight bits"))
    assert edited_bits > bits_at_4
    current = at.session_state.current_maps[at.session_state.run_id]
    assert current.precision(first).weight == "fp32"

    at.button(key="mp_evaluate").click().run()
    _ok(at)
    assert not _errors(at)
    comparison = _table(at, "configuration")
    labels = list(comparison["configuration"])
    assert labels[0] == "fp32" and labels[-1] == "this map"
    assert any(label.startswith("uniform") for label in labels)
    assert {"task metric", "drop (points)", "output SQNR (dB)", "output KL", "size (KiB)", "BOPs / sample"} <= set(comparison)

    # a bad edit: one-line error, the last valid map and the evaluation survive
    at.session_state[editor.key] = {"edited_rows": {0: {"weight": "int99"}}, "added_rows": [], "deleted_rows": []}
    at.run()
    _ok(at)
    assert any("int99" in e for e in _errors(at))
    assert at.session_state.current_maps[at.session_state.run_id].precision(first).weight == "fp32"
    assert len(_table(at, "configuration")) == len(comparison)

    # an impossible budget: the allocator says so
    at.number_input(key="mp_value_avg-bits").set_value(1.0).run()
    _ok(at)
    assert any("cannot be met" in e for e in _errors(at))


def test_mixed_precision_shows_the_measured_figures_and_the_true_sample_count(tmp_path, template_runs):
    """A max-drop search shows the measured drop of the map it chose (recomputed here from a plain
    evaluation of that map); Evaluate says how many samples it really used (500 in the split, 10000 asked)."""
    from analysis.evaluate import Evaluator
    from analysis.loading import load_data, load_model

    at = _page(_open(tmp_path, template_runs), "mixed_precision")
    at.number_input(key="mp_eval_samples").set_value(10_000).run()
    at.selectbox(key="mp_kind").set_value("max-drop").run()
    at.number_input(key="mp_value_max-drop").set_value(1.0).run()
    at.button(key="mp_maxdrop_search").click().run()
    _ok(at)
    assert not _errors(at), _errors(at)
    pmap = at.session_state.current_maps[at.session_state.run_id]
    result = state.load_run_result(state.get_run(at.session_state.run_id))
    evaluation = load_data("sample:mlp", split="evaluation")
    evaluator = Evaluator(load_model("sample:mlp"), load_data("sample:mlp").take(64), evaluation,
                          state.config_from_dict(result.config).quant)
    row = evaluator.evaluate(pmap, "found").as_row()
    assert float(_metric(at, "Measured drop (points)")) == pytest.approx(row["drop"], abs=0.006)
    assert float(_metric(at, "Measured task metric")) == pytest.approx(row["value"], abs=0.006)
    assert row["drop"] <= 1.0

    at.button(key="mp_evaluate").click().run()
    _ok(at)
    shown = " ".join(c.value for c in at.caption)
    assert f"Evaluated on {len(evaluation)} samples of the evaluation split of sample:mlp" in shown, shown


def test_mixed_precision_other_budget_kinds_and_bad_map_file(tmp_path, template_runs):
    at = _page(_open(tmp_path, template_runs), "mixed_precision")
    for kind in ("size-kb", "bops", "min-sqnr"):
        at.selectbox(key="mp_kind").set_value(kind).run()
        _ok(at)
        assert not _errors(at), kind
    at.file_uploader(key="mp_map_upload").upload("map.json", b"{not json").run()
    _ok(at)
    assert any("not valid JSON" in e for e in _errors(at))
    bad_layer = {"schema": "quantlens.precision-map/1", "layers": {"nope": {"weight": "int8"}}}
    at.file_uploader(key="mp_map_upload").clear().upload("map2.json", json.dumps(bad_layer).encode()).run()
    _ok(at)
    assert any("nope" in e for e in _errors(at))


def test_map_exported_from_the_mixed_precision_page_has_budget_predicted_and_measured(tmp_path, template_runs):
    import yaml

    from analysis.allocate import build_problem
    from analysis.precision_map import map_from_dict

    at = _page(_open(tmp_path, template_runs), "mixed_precision")
    at.number_input(key="mp_value_avg-bits").set_value(4.5).run()
    editor = at.data_editor[0]
    at.session_state[editor.key] = {"edited_rows": {0: {"weight": "int8", "activation": "none"}},
                                    "added_rows": [], "deleted_rows": []}
    at.run()
    _ok(at)
    at.button(key="mp_evaluate").click().run()
    _ok(at)
    assert not _errors(at)
    shown_bits = float(_metric(at, "Average weight bits"))

    _page(at, "export")
    exported = yaml.safe_load(at.code[0].value)  # the preview of the downloadable map
    assert exported["layers"][editor.value["layer"][0]] == {"weight": "int8-sym-pc"}  # names are stored qualified
    assert exported["budget"] == {"kind": "avg-bits", "value": 4.5}
    # the same prediction the CLI and the API compute for this map, shown on the page
    result = state.load_run_result(state.get_run(at.session_state.run_id))
    engine = build_problem(result).predict(map_from_dict(exported))
    assert exported["predicted"] == {k: pytest.approx(v) for k, v in engine.items() if k != "unmeasured"}
    assert exported["predicted"]["avg-bits"] == pytest.approx(shown_bits, abs=0.01)
    # Evaluate measured exactly this map: recorded like `quantlens suggest` does
    assert {"noise", "sqnr_db", "metric", "drop"} <= set(exported["measured"])
    assert exported["provenance"]["model_spec"] == "sample:mlp"
    assert exported["provenance"]["model_fingerprint"] == exported["model"] == result.model["fingerprint"]


def test_a_map_exported_from_the_dashboard_evaluates_the_same_with_the_cli(tmp_path, template_runs, downloads):
    """The map downloaded after Evaluate (every evaluation sample) carries measured figures that
    `python -m analysis.cli evaluate --map` reproduces from the file alone."""
    import subprocess
    import sys

    at = _page(_open(tmp_path, template_runs), "mixed_precision")
    at.number_input(key="mp_eval_samples").set_value(10_000).run()  # the whole split, as the CLI evaluates
    at.number_input(key="mp_value_avg-bits").set_value(5.0).run()
    at.button(key="mp_evaluate").click().run()
    _ok(at)
    assert not _errors(at), _errors(at)
    _page(at, "export")
    name, body = downloads(at, "dl_map_json")
    exported = json.loads(body)
    assert {"budget", "predicted", "measured"} <= set(exported)
    path = tmp_path / name
    path.write_bytes(body)
    out = tmp_path / "evaluated.json"
    subprocess.run([sys.executable, "-m", "analysis.cli", "evaluate", "--data", "sample:mlp", "--map", str(path),
                    "--out", str(out)], check=True, capture_output=True, cwd=str(Path(APP).parents[1]))
    fp32, evaluated = json.loads(out.read_text())
    assert evaluated["metric"] == pytest.approx(exported["measured"]["metric"], abs=1e-9)
    assert evaluated["metric_drop"] == pytest.approx(exported["measured"]["drop"], abs=1e-9)
    assert fp32["metric"] - evaluated["metric"] == pytest.approx(exported["measured"]["drop"], abs=1e-9)


@pytest.fixture
def downloads(monkeypatch):
    """Reads what a download button would serve: records the media file manager AppTest makes for
    each run, then fetches a button's bytes from it (running a deferred (callable) download too)."""
    from streamlit.runtime.media_file_manager import MediaFileManager
    from streamlit.testing.v1 import app_test

    managers = []

    class Recording(MediaFileManager):
        def __init__(self, storage):
            super().__init__(storage)
            self.recorded_storage = storage
            managers.append(self)

    monkeypatch.setattr(app_test, "MediaFileManager", Recording)

    def fetch(at: AppTest, key: str) -> tuple[str, bytes]:
        button = next(b for b in at.get("download_button") if b.key == key)
        manager = managers[-1]
        url = button.proto.url or manager.execute_deferred(button.proto.deferred_file_id)
        stored = manager.recorded_storage.get_file(url.rsplit("/", 1)[1].split(".")[0])
        return stored.filename, stored.content

    return fetch


def test_export_page_downloads_hold_the_run(tmp_path, template_runs, downloads):
    import pandas as pd
    import yaml

    from analysis.costs import model_cost
    from analysis.precision_map import map_from_dict
    from analysis.results import load_analysis

    at = _page(_open(tmp_path, template_runs), "export")
    assert not _errors(at)
    files = {key: downloads(at, key) for key in ("dl_map_json", "dl_map_yaml", "dl_report", "dl_csv", "dl_analysis")}
    assert {key: name for key, (name, _) in files.items()} == {
        "dl_map_json": "sample-mlp.precision-map.json", "dl_map_yaml": "sample-mlp.precision-map.yaml",
        "dl_report": "sample-mlp.report.html", "dl_csv": "sample-mlp.layers.csv",
        "dl_analysis": "sample-mlp.analysis.json"}

    # analysis.json reloads to this run: the mlp's layers, every trial, the 64 samples it was given
    saved = tmp_path / "analysis.json"
    saved.write_bytes(files["dl_analysis"][1])
    result = load_analysis(saved)
    assert [layer.name for layer in result.layers] == ["fc1", "fc2", "fc3"]
    assert len(result.trials) == MLP_TRIALS and result.data["samples"] == 64

    # layers.csv: one row per trial, with the same numbers
    table = pd.read_csv(io.BytesIO(files["dl_csv"][1]))
    assert len(table) == MLP_TRIALS
    for row in table.itertuples():
        assert row.output_sqnr_db == pytest.approx(result.trial(row.layer, row.target, row.format).output.sqnr_db)

    # the precision map: JSON and YAML say the same, it covers the layers and meets the page's budget
    as_json = json.loads(files["dl_map_json"][1])
    assert yaml.safe_load(files["dl_map_yaml"][1]) == as_json
    pmap = map_from_dict(as_json)
    assert as_json["budget"] == {"kind": "avg-bits", "value": 6.0} and as_json["predicted"]["avg-bits"] <= 6.0
    names = [layer.name for layer in result.layers]
    pmap.validate(names)
    assert set(as_json["layers"]) == set(names)
    assert model_cost(list(result.layers), pmap.assignment(names)).avg_weight_bits <= 6.0

    # the report is the full page for this run, not a placeholder
    report = files["dl_report"][1].decode()
    assert report.startswith("<!DOCTYPE html>") and "quantlens: sample:mlp" in report
    assert all(name in report for name in names)


# --- bad inputs keep earlier results -------------------------------------------------------------------


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_bad_uploads_show_one_line_errors_and_keep_results(tmp_path, template_runs):
    at = _open(tmp_path, template_runs)
    run_id = at.session_state.run_id
    at.radio(key="md_source").set_value("upload").run()
    _ok(at)

    factory = tmp_path / "net.py"
    factory.write_text("from sample_models.models import DigitsMLP\n\ndef build():\n    return DigitsMLP()\n")
    calib = sample_models.load_split("mlp", "calibration")
    good_data = _npz(inputs=calib["inputs"].numpy()[:32], labels=calib["labels"].numpy()[:32])
    weights = io.BytesIO()
    torch.save(sample_models.load_model("mlp").state_dict(), weights)
    pickled = io.BytesIO()
    torch.save(sample_models.load_model("mlp"), pickled)

    cases = [
        # (model file, factory, trust, data file, expected part of the message)
        (("broken.pt2", b"not a zip"), "", True, ("calib.npz", good_data), "not a torch.export archive"),
        (("broken.pt2", b"not a zip"), "", False, ("calib.npz", good_data), "I trust this code"),
        (("model.onnx", b"x"), "", True, ("calib.npz", good_data), "not a supported model file"),
        (("weights.pt", weights.getvalue()), f"{factory}:build", True, ("calib.npz", b"garbage"), "calib.npz"),
        (("weights.pt", weights.getvalue()), f"{factory}:build", True,
         ("calib.npz", _npz(inputs=np.zeros((4, 7), np.float32))), "cannot run on the data"),
        (("weights.pt", pickled.getvalue()), f"{factory}:build", True, ("calib.npz", good_data), "pickled"),
        (None, f"{tmp_path / 'missing.py'}:build", True, ("calib.npz", good_data), "does not exist"),
        (None, f"{factory}:build", True, None, "upload calibration data"),
    ]
    for model_file, factory_spec, trust, data_file, expected in cases:
        at.text_input(key="md_factory").set_value(factory_spec)
        at.checkbox(key="md_trust").set_value(trust)
        uploader = at.file_uploader(key="md_model_file").clear()
        if model_file:
            uploader.upload(*model_file)
        uploader = at.file_uploader(key="md_calib_file").clear()
        if data_file:
            uploader.upload(*data_file)
        at.button(key="md_run").click().run()
        _ok(at)
        errors = _errors(at)
        assert len(errors) == 1 and expected in errors[0], (expected, errors)
        assert "\n" not in errors[0] and "Traceback" not in errors[0]
        assert at.session_state.run_id == run_id  # the earlier results stay selected
    assert len(_run_dirs(tmp_path)) == 1  # nothing half-made in the run store
    _page(at, "sensitivity")
    assert len(at.dataframe(key="sens_table").value) == MLP_TRIALS


def test_the_device_picker_offers_this_machine_and_the_run_records_the_choice(tmp_path, template_runs):
    at = _open(tmp_path, template_runs)
    expected = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        expected.append("mps")
    assert at.selectbox(key="md_device").options == expected
    at.selectbox(key="md_device").set_value(expected[-1])
    at.number_input(key="md_samples").set_value(16)
    at.button(key="md_run").click().run()
    _ok(at)
    assert not _errors(at), _errors(at)
    assert state.get_run(at.session_state.run_id).config["device"] == expected[-1]


def test_upload_the_model_code_behind_the_trust_switch(tmp_path, template_runs, monkeypatch):
    """The .py that builds the model is uploaded with the weights: refused until 'I trust this code' is
    ticked, then analysed from the upload folder. A relative server path is taken from the folder the
    dashboard was started in, which the page names."""
    at = _open(tmp_path, template_runs)
    at.radio(key="md_source").set_value("upload").run()
    calib = sample_models.load_split("mlp", "calibration")
    weights = io.BytesIO()
    torch.save(sample_models.load_model("mlp").state_dict(), weights)
    code_text = b"from sample_models.models import DigitsMLP\n\n\ndef build():\n    return DigitsMLP()\n"
    at.file_uploader(key="md_factory_file").upload("net.py", code_text)
    at.text_input(key="md_factory").set_value("build")
    at.file_uploader(key="md_model_file").upload("weights.pt", weights.getvalue())
    at.file_uploader(key="md_calib_file").upload(
        "calib.npz", _npz(inputs=calib["inputs"].numpy()[:32], labels=calib["labels"].numpy()[:32]))
    at.button(key="md_run").click().run()
    _ok(at)
    assert len(_errors(at)) == 1 and "net.py is Python code" in _errors(at)[0] and "I trust this code" in _errors(at)[0]
    assert len(_run_dirs(tmp_path)) == 1

    at.checkbox(key="md_trust").set_value(True)
    at.button(key="md_run").click().run()
    _ok(at)
    assert not _errors(at), _errors(at)
    info = state.get_run(at.session_state.run_id)
    assert info.done and info.model == "net.py:build + weights.pt"
    spec = info.get_inputs().model_spec
    assert spec.endswith("/net.py:build") and Path(spec.rpartition(":")[0]).read_bytes() == code_text
    assert uploads.is_upload(Path(spec.rpartition(":")[0]))

    # a path on the server, relative: from the dashboard's folder, which the page states
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "net.py").write_bytes(code_text)
    monkeypatch.chdir(tmp_path)
    at.file_uploader(key="md_factory_file").clear()
    at.text_input(key="md_factory").set_value("models/net.py:build")
    at.button(key="md_run").click().run()  # a form: its fields change with the click that submits it
    _ok(at)
    assert any(str(tmp_path) in c.value for c in at.caption)
    assert not _errors(at), _errors(at)
    info = state.get_run(at.session_state.run_id)
    assert info.done and info.get_inputs().model_spec == f"{tmp_path / 'models' / 'net.py'}:build"


def test_upload_a_state_dict_with_factory_runs(tmp_path, template_runs):
    at = _open(tmp_path, template_runs)
    at.radio(key="md_source").set_value("upload").run()
    factory = tmp_path / "net.py"
    factory.write_text("from sample_models.models import DigitsMLP\n\ndef build():\n    return DigitsMLP()\n")
    calib = sample_models.load_split("mlp", "calibration")
    weights = io.BytesIO()
    torch.save(sample_models.load_model("mlp").state_dict(), weights)
    at.text_input(key="md_factory").set_value(f"{factory}:build")
    at.checkbox(key="md_trust").set_value(True)
    at.file_uploader(key="md_model_file").upload("weights.pt", weights.getvalue())
    at.file_uploader(key="md_calib_file").upload(
        "calib.npz", _npz(inputs=calib["inputs"].numpy()[:48], labels=calib["labels"].numpy()[:48]))
    at.multiselect(key="md_acts").set_value(["none"])
    at.radio(key="md_output").set_value("estimated (fast)")
    at.button(key="md_run").click().run()
    _ok(at)
    assert not _errors(at)
    assert len(_run_dirs(tmp_path)) == 2
    info = state.get_run(at.session_state.run_id)
    assert info.done and "weights.pt" in info.model
    _page(at, "sensitivity")
    table = at.dataframe(key="sens_table").value
    assert len(table) == MLP_LAYERS * 2  # weight-only: int8, int4
    assert set(table["output_source"]) == {"estimated"}  # estimated output metrics are marked as such


def test_corrupt_run_in_the_store_is_reported(tmp_path, template_runs):
    shutil.copytree(template_runs, tmp_path / "runs")
    run = _run_dirs(tmp_path)[0]
    (run / "analysis.json").write_text("{broken")
    at = AppTest.from_file(APP, default_timeout=120).run()
    _ok(at)
    _page(at, "sensitivity")
    assert any("not valid JSON" in e for e in _errors(at))


# --- compare -------------------------------------------------------------------------------------


def test_compare_two_runs(tmp_path, template_runs):
    at = _open(tmp_path, template_runs)
    first = at.session_state.run_id
    at.multiselect(key="md_weights").set_value(["int8", "int2"])
    at.button(key="md_run").click().run()
    _ok(at)
    assert not _errors(at)
    second = at.session_state.run_id
    assert second != first and len(_run_dirs(tmp_path)) == 2

    _page(at, "sensitivity")
    at.session_state["sens_view"] = "Compare runs"
    at.run()
    _ok(at)
    assert at.selectbox(key="sens_compare_run").value == first
    merged = _table(at, "B − A")
    # common trials: int8 weights, int8 activations, int8/int8 both, for each layer
    assert len(merged) == MLP_LAYERS * 3
    assert "B − A" in merged
    assert any("run A vs run B" in c.proto.spec for c in at.get("plotly_chart"))

    # the sidebar switches runs; the selection survives page changes
    at.sidebar.selectbox[0].set_value(first).run()
    _ok(at)
    assert at.session_state.run_id == first
    _page(at, "export")
    assert at.session_state.run_id == first


# --- launcher --------------------------------------------------------------------------------------


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def test_launch_serves_the_dashboard_on_the_address_and_port_asked_for(monkeypatch):
    """`quantlens dashboard --port P --address A` starts a server that answers on A:P and only there."""
    import socket
    import subprocess
    import time
    import urllib.request

    from dashboard import launch

    address = "127.0.0.2"  # loopback too, but not the default: a server on 127.0.0.1 or 0.0.0.0 is caught
    try:
        port = _free_port(address)
    except OSError:  # e.g. macOS only configures 127.0.0.1 by default
        pytest.skip(f"cannot bind {address} on this machine")
    seen = {}

    def serve_and_probe(cmd, env=None):
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://{address}:{port}/_stcore/health", timeout=2) as reply:
                        seen["health"] = reply.read().decode()
                    break
                except OSError:
                    assert server.poll() is None, server.stderr.read().decode()[-2000:]
                    assert time.monotonic() < deadline, "the dashboard did not come up within 60 s"
                    time.sleep(0.2)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                seen["other_address"] = "answered"
            except OSError:
                seen["other_address"] = "refused"
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        return 0

    monkeypatch.setattr(launch.subprocess, "call", serve_and_probe)
    assert launch.main(port=port, address=address) == 0
    assert seen["health"] == "ok"
    assert seen["other_address"] == "refused"  # bound to the address asked for, not every interface


# --- cancel and resume ---------------------------------------------------------------------------


class StopAfter:
    """A job's stop flag that trips once `n` trials are in the run's trials.jsonl (Cancel pressed
    mid-run; the sweep checks it before every trial)."""

    def __init__(self, job: state.Job, n: int) -> None:
        self.job, self.n, self.pressed = job, n, False

    def is_set(self) -> bool:
        self.pressed = self.pressed or len(self.job.trials) >= self.n
        return self.pressed

    def set(self) -> None:
        self.pressed = True


def test_cancelled_run_is_kept_and_resumes(tmp_path, monkeypatch):
    from analysis.loading import load_data, load_model
    from analysis.sweep import AnalysisConfig

    monkeypatch.setenv("QUANTLENS_AUTOSTART", "0")  # alone in the store: the cancelled run opens
    inputs, config = state.sample_inputs("mlp"), AnalysisConfig(num_samples=64)
    run_id, path = runstore.create_run(state.runs_dir(), inputs, state._config_json(config))
    job = state.Job(run_id, path, inputs, config, load_model("sample:mlp"), load_data("sample:mlp"))
    job.stop = StopAfter(job, 5)
    job.run()
    assert job.phase == "cancelled" and len(job.trials) == 5
    assert state.get_run(run_id).status == "cancelled"

    at = AppTest.from_file(APP, default_timeout=120).run()
    _ok(at)
    assert len(_run_dirs(tmp_path)) == 1
    _page(at, "sensitivity")
    assert any("cancelled" in w.value for w in at.warning)
    at.button(key="resume_run").click().run()
    _ok(at)
    assert state.get_run(run_id).status == "done"
    assert at.session_state.run_id == run_id
    assert len(at.dataframe(key="sens_table").value) == MLP_TRIALS


def test_cancel_stops_the_worker_process_and_keeps_its_trials(tmp_path, monkeypatch):
    """A real worker process (no QUANTLENS_SYNC_JOBS): Cancel once its first trials are in; the process
    ends, the run is marked cancelled and keeps the trials it finished, fewer than planned."""
    import time

    from analysis.sweep import AnalysisConfig
    from dashboard import jobs

    monkeypatch.delenv("QUANTLENS_SYNC_JOBS")
    config = AnalysisConfig(weight_formats=("int8", "int4", "int3"), act_formats=("int8",), num_samples=64)
    job = jobs.start(state.sample_inputs("transformer"), config, None, None)
    deadline = time.monotonic() + 240
    while not job.trials and job.running:
        assert time.monotonic() < deadline, "no trial finished in 240 s"
        time.sleep(0.2)
    assert job.running and job.proc is not None
    job.cancel()
    while job.running:
        assert time.monotonic() < deadline + jobs.KILL_AFTER_S, "the worker did not stop"
        time.sleep(0.2)
    assert job.phase == "cancelled" and job.proc.returncode is not None
    info = state.get_run(job.id)
    assert info.status == "cancelled"
    assert 0 < len(job.trials) < job.planned


def test_a_store_without_finished_runs_starts_the_sample_and_marks_the_others(tmp_path):
    """A fresh user whose store holds only an interrupted run (another process's, gone) and a run
    another live process is analysing lands on a new sample analysis, not on either of them."""
    import os
    import socket

    store = tmp_path / "runs"
    _, interrupted = runstore.new_run_dir(store, "old")
    runstore.write_meta(interrupted, status="running", pid=2**22 + 7, host=socket.gethostname(), created=1.0,
                        model="old-model")  # a pid that does not exist: interrupted
    _, foreign = runstore.new_run_dir(store, "cli")
    runstore.write_meta(foreign, status="running", pid=os.getppid(), host=socket.gethostname(), created=2.0,
                        model="cli-model")  # alive, not this process: another quantlens
    at = _open(tmp_path)
    info = state.get_run(at.session_state.run_id)
    assert info is not None and info.done and info.model == "sample:mlp"
    assert len(_run_dirs(tmp_path)) == 3

    for run, expected in ((interrupted, "interrupted: the process analysing it stopped"),
                          (foreign, "being analysed by another process")):
        state.select_run(run.name)
        at.session_state.run_id = run.name
        at.run()
        _ok(at)
        shown = " ".join(c.value for c in at.sidebar.caption)
        assert expected in shown, shown


def test_toolchain_exports(tmp_path, template_runs, downloads):
    pytest.importorskip("analysis.export")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import zipfile

    from analysis.formats import parse_format

    at = _page(_open(tmp_path, template_runs), "export")
    at.button(key="dl_prepare").click().run()
    _ok(at)
    errors = _errors(at)
    assert not errors, errors
    pmap = json.loads(downloads(at, "dl_map_json")[1])["layers"]
    quantized = {name: entry for name, entry in pmap.items() if not parse_format(entry["weight"]).is_identity}
    assert quantized and len(quantized) < len(pmap)  # the 6-bit suggestion keeps one layer in FP32
    bits = {name: parse_format(entry["weight"]).bits for name, entry in quantized.items()}

    # AIMET encodings (aimet-torch's load_encodings layout) and their quantsim config, zipped: one
    # weight encoding per quantized layer at its bit width, one entry per channel; inputs by module
    name, content = downloads(at, "dl_tool_aimet")
    assert name == "sample-mlp.aimet_encodings.zip"
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        assert set(archive.namelist()) == {"aimet_encodings.json", "aimet_encodings.quantsim_config.json"}
        aimet = json.loads(archive.read("aimet_encodings.json"))
    params = aimet["param_encodings"]
    assert {n: e[0]["bitwidth"] for n, e in params.items()} == {f"{n}.weight": b for n, b in bits.items()}
    out_features = {name: module.out_features for name, module in sample_models.load_model("mlp").named_children()
                    if isinstance(module, torch.nn.Linear)}
    assert all(len(params[f"{n}.weight"]) == out_features[n] for n in bits)
    assert {n: e["input"]["0"][0]["bitwidth"] for n, e in aimet["activation_encodings"].items()} == {
        n: parse_format(e["activation"], "activation").bits for n, e in quantized.items()}

    # ONNX Runtime overrides: the FP32 layers are excluded, the others carry their weight type
    name, content = downloads(at, "dl_tool_ort")
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        overrides = json.loads(archive.read("ort_overrides.json"))
        assert {"ort_overrides.onnx"} <= set(archive.namelist())
    assert set(overrides["excluded_layers"]) == set(pmap) - set(quantized)
    tensors = overrides["quantize_static"]["extra_options"]["TensorQuantOverrides"]
    assert {n: tensors[f"{n}.weight"][0]["quant_type"] for n in bits} == {n: f"QInt{b}" for n, b in bits.items()}

    # the QDQ model runs and behaves like the FP32 model it quantizes
    name, content = downloads(at, "dl_tool_onnx")
    ops = [node.op_type for node in onnx.load_from_string(content).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    session = ort.InferenceSession(content, providers=["CPUExecutionProvider"])
    inputs = sample_models.load_split("mlp", "evaluation")["inputs"][:200]
    quantized_out = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    with torch.no_grad():
        fp32_out = sample_models.load_model("mlp")(inputs).numpy()
    assert quantized_out.shape == fp32_out.shape
    assert float((quantized_out.argmax(1) == fp32_out.argmax(1)).mean()) > 0.9
    assert not np.allclose(quantized_out, fp32_out, atol=1e-4)  # really quantized


def test_a_hugging_face_folder_on_the_server_with_uploaded_text(tmp_path, template_runs):
    """The bundled Llama folder named as a server path, calibration text uploaded: tokenized with the
    folder's own tokenizer into samples of the chosen length, analysed without any trust switch (no
    user code runs), and the run records the tokenized data spec."""
    pytest.importorskip("transformers", reason="transformers is an optional extra (quantlens[hf])")
    at = _open(tmp_path, template_runs)
    at.radio(key="md_source").set_value("upload").run()
    at.text_input(key="md_hf_dir").set_value(str(sample_models.sample_dir("llama")))
    at.number_input(key="md_seq_len").set_value(32)
    at.number_input(key="md_samples").set_value(8)
    at.file_uploader(key="md_calib_file").upload("corpus.txt", ("def add(a, b):\n    return a + b\n" * 80).encode())
    at.button(key="md_run").click().run()
    _ok(at)
    assert not _errors(at), _errors(at)
    info = state.get_run(at.session_state.run_id)
    assert info.done and info.model == "llama"
    spec = info.get_inputs().data_spec
    assert spec.endswith(f"#tokenizer={sample_models.sample_dir('llama')},seq_len=32")
    # a folder that is not a model is refused in one line
    at.text_input(key="md_hf_dir").set_value(str(tmp_path))
    at.button(key="md_run").click().run()
    assert len(_errors(at)) == 1 and "not a Hugging Face model folder" in _errors(at)[0]


def test_the_mixed_precision_page_decides_once_per_deployment_group():
    """q/k/v and gate/up of a Llama are one decision each (as `quantlens suggest` makes them), unless
    the toggle turns groups off."""
    pytest.importorskip("transformers", reason="transformers is an optional extra (quantlens[hf])")
    from analysis.allocate import Budget, suggest
    from analysis.data import Dataset
    from analysis.sweep import AnalysisConfig, analyze
    from dashboard import derived

    model = sample_models.load_model("llama")
    split = sample_models.load_split("llama", "calibration")
    result = analyze(model, Dataset(split["inputs"][:4], split["labels"][:4], "language-model", "llama"),
                     AnalysisConfig(weight_formats=("int8", "int4"), act_formats=(), targets=("weights",)))
    grouped, free = derived.problem("llama-groups", result, True), derived.problem("llama-groups", result, False)
    names = grouped.group_names()
    assert ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj") in names
    assert ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj") in names and not free.groups
    pmap = suggest(grouped, Budget("avg-bits", 6.0)).map
    for group in names:
        assert len({str(pmap.layers[name].weight) for name in group}) == 1, group


def _sidebar_details(at: AppTest) -> str:
    return "\n".join(caption.value for caption in at.sidebar.caption)


def test_the_workers_number_offers_this_machines_cores_and_defaults_to_one_process(tmp_path, template_runs):
    from analysis.distributed import local_cores

    at = _open(tmp_path, template_runs)
    workers = at.number_input(key="md_workers")
    assert (workers.value, workers.min, workers.max) == (1, 1, local_cores())
    assert "1 process" in _sidebar_details(at)  # the template run: one process


def test_workers_without_ray_are_refused_in_one_line_before_anything_is_written(tmp_path, template_runs,
                                                                               monkeypatch):
    import builtins

    from analysis.distributed import local_cores

    if local_cores() < 2:
        pytest.skip("two worker processes need two cores")
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    at = _open(tmp_path, template_runs)
    run_id = at.session_state.run_id
    monkeypatch.setattr(builtins, "__import__", no_ray)
    at.number_input(key="md_workers").set_value(2)
    at.button(key="md_run").click().run()
    _ok(at)
    errors = _errors(at)
    assert len(errors) == 1 and "pip install 'quantlens[ray]'" in errors[0] and "\n" not in errors[0], errors
    assert at.session_state.run_id == run_id and len(_run_dirs(tmp_path)) == 1


@pytest.mark.slow
def test_a_run_with_two_workers_records_them_and_shows_how_it_was_split(tmp_path, template_runs):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'quantlens[ray]' runs this test")
    from analysis.distributed import local_cores

    if local_cores() < 2:
        pytest.skip("two worker processes need two cores")
    at = _open(tmp_path, template_runs)
    at.number_input(key="md_workers").set_value(2)
    at.radio(key="md_output").set_value("estimated (fast)")
    at.number_input(key="md_samples").set_value(16)
    at.button(key="md_run").click().run()
    _ok(at)
    assert not _errors(at), _errors(at)
    info = state.get_run(at.session_state.run_id)
    assert info.status == "done" and info.config["workers"] == 2 and info.config["output_metrics"] == "estimated"
    assert info.trials == MLP_TRIALS
    assert "2 workers, split by chunks of samples" in _sidebar_details(at)
