"""Robustness: every file in tests/bad_inputs/ through the Python API, the CLI and the dashboard.

One table (`CASES`) names each bad input and the fragment its one-line message must contain; the
three surfaces run it where they apply:
- API: load_model / load_data / check_compatible / analyze (what the CLI calls), or the map,
  format and allocator functions; errors are one-line LoadError / ValueError;
- CLI: `main(argv)` exits non-zero with exactly one line on stderr and no traceback;
- dashboard (AppTest): one `st.error` box, and the earlier results stay selected.
Valid-but-odd inputs (a single sample, constant tensors, unsupported layers next to supported
ones) must analyse to finite numbers (or the documented SQNR cap), not error.

The corpus is written by tests/bad_inputs/make_corpus.py; `test_corpus_matches_its_generator`
keeps the committed files and the generator in step.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import math
import os
import shutil
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.cli import main
from analysis.loading import LoadError, check_compatible, load_data, load_model
from analysis.metrics import SQNR_CAP_DB
from analysis.sweep import AnalysisConfig, analyze

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
SAMPLES = 24
FAST = ["--samples", str(SAMPLES), "--quiet", "--weight-formats", "int8,int4", "--act-formats", "int8"]
CONFIG = AnalysisConfig(num_samples=SAMPLES, weight_formats=("int8", "int4"), act_formats=("int8",), cumulative=True)


def corpus(name: str) -> str:
    return str(CORPUS / name)


def model_spec(spec: str) -> str:
    """A corpus-relative model spec ("tiny.py:make", "random_bytes.pt2") made absolute."""
    head, sep, attr = spec.partition(":")
    return corpus(head) + sep + attr


# --- the table ---------------------------------------------------------------------------------------

SEE_MAX_DROP = "labels in the dashboard: covered by the max-drop row (its Evaluate table leaves the metric blank)"

@dataclass(frozen=True)
class Case:
    """One bad input. `kind` picks what each surface does with it:

    load      load the model and data, check they fit, analyse (error expected unless `expect` is "")
    format    analyse with `formats` as the weight formats
    map       apply the precision map `data` to the model
    budget    allocate under the budget `data` on a finished analysis (closest map + a note)
    max-drop  allocate under max-drop=1 judged on the unlabelled `data`
    evaluate  evaluate uniform baselines on the unlabelled `data`
    """

    id: str
    kind: str
    model: str = "tiny.py:make"  # corpus-relative spec
    data: str = "good.npz"
    expect: str = ""  # fragment of the one-line message ("" for a valid input that must analyse)
    weights: str | None = None
    formats: tuple[str, ...] = ()
    skipped: str | None = None  # a valid model: this layer is reported skipped with this reason fragment
    warning: str = ""  # a valid input the CLI must flag with one "quantlens: warning:" line containing this
    xfail: dict[str, str] = field(default_factory=dict)  # surface -> reason (strict xfail)
    skip: dict[str, str] = field(default_factory=dict)  # surface -> why the surface does not apply

    @property
    def ok(self) -> bool:
        return self.expect == ""


CASES = [
    # truncated / corrupt model files, and files of the wrong kind
    Case("truncated-weights", "load", weights="truncated.safetensors", expect="truncated or corrupt"),
    Case("random-bytes-weights", "load", weights="random_bytes.pt", expect="not a readable PyTorch file"),
    Case("random-bytes-pt2", "load", model="random_bytes.pt2", expect="not a torch.export archive"),
    Case("pickled-module-as-weights", "load", weights="pickled_module.pt", expect="pickled Python object"),
    # truncated / corrupt / wrong-kind data files
    Case("truncated-data", "load", data="truncated.npz", expect="truncated or corrupt"),
    Case("text-as-npz", "load", data="text_as.npz", expect="not a .npz archive"),
    Case("weights-as-data", "load", data="weights_as_data.safetensors", expect="cannot be a parameter name of forward"),
    # data that does not fit the model, or has nothing in it
    Case("wrong-shape", "load", data="wrong_shape.npz", expect="cannot run on the data"),
    Case("int-inputs-for-float-model", "load", data="int_inputs_for_float_model.npz", expect="dtype int64"),
    Case("empty-data", "load", data="empty_inputs.npz", expect="no samples"),
    Case("nan-inputs", "load", data="nan_inputs.npz", expect="1 NaN, 1 Inf"),
    # non-finite weights and activations: one line naming the layer
    Case("nan-weights", "load", model="nan_weights.py:make", expect="fc1.weight has 1 NaN"),
    Case("inf-weights", "load", model="nan_weights.py:make_inf", expect="fc2.weight has 0 NaN and 1 Inf"),
    Case("nan-activations", "load", model="nan_activations.py:make", expect="non-finite values"),
    Case("no-quantizable-layers", "load", model="no_layers.py:make", expect="no quantizable layers"),
    # valid inputs that are easy to get wrong: must analyse to finite numbers
    Case("single-sample", "load", data="single_sample.npz"),
    Case("constant-inputs", "load", data="constant_inputs.npz"),
    Case("constant-weights", "load", model="constant_weights.py:make",  # fc2 all zeros: the output is its bias
         warning="the model's output is the same for every input"),
    Case("gru-next-to-linear", "load", model="unsupported.py:make", skipped="gru:unsupported layer type GRU"),
    Case("bilinear-next-to-linear", "load", model="unsupported.py:make_bilinear",
         skipped="bilinear:unsupported layer type Bilinear"),
    # names and maps
    Case("unknown-format-name", "format", formats=("fp3_e1m1",), expect="unknown format 'fp3_e1m1'"),
    Case("map-for-another-model", "map", data="map_other_model.json", expect="made for model"),
    Case("map-unknown-format", "map", data="map_unknown_format.json", expect="unknown format 'fp3_e1m1'"),
    Case("map-yaml-alias-bomb", "map", data="map_yaml_aliases.yaml", expect="YAML aliases"),
    # hostile names: analysed like any other (tests/test_dashboard_trust.py checks they render as text)
    Case("markdown-layer-name", "load", model="markdown_names.py:make"),
    # budgets that cannot be met: the closest map, and a note saying so
    Case("budget-avg-bits-1", "budget", data="avg-bits=1", expect="cannot be met"),
    Case("budget-min-sqnr-200", "budget", data="min-sqnr=200", expect="cannot be met"),
    # labels missing where a metric needs them
    Case("max-drop-without-labels", "max-drop", data="no_labels.npz", expect="labelled"),
    Case("evaluate-without-labels", "evaluate", data="no_labels.npz", expect="labels",
         skip={"dashboard": SEE_MAX_DROP}),
    # hostile inputs (issue 12): models that misbehave, labels and data the model cannot score, maps
    # written to hurt; the memory-bound and file cases follow the table
    Case("labels-outside-classes", "load", data="bad_labels.npz", expect="outside the model's 4 classes"),
    Case("fp8-inputs", "load", data="fp8_inputs.safetensors"),
    Case("scalar-output", "load", model="hostile.py:make_scalar", expect="not one row per sample"),
    Case("untraceable-name", "load", model="hostile.py:make_quoted", expect="breaks the code torch.fx"),
    Case("random-forward", "load", model="hostile.py:make_random", expect="two FP32 runs"),
    Case("training-mode-dropout", "load", model="hostile.py:make_training"),
    Case("forward-writes-buffers", "load", model="hostile.py:make_stateful"),
    Case("map-notes-number", "map", data="map_notes_number.json", expect='"notes" must be a list'),
    Case("map-percentile-text", "map", data="map_percentile_text.json", expect="percentile must be a number"),
]
# Found once the engine has the model traced, not by the loaders (so not a LoadError).
FOUND_BY_THE_ENGINE = {"no-quantizable-layers", "untraceable-name", "random-forward"}


def params(surface: str) -> list:
    out = []
    for case in CASES:
        marks = []
        if surface in case.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=case.xfail[surface]))
        if surface in case.skip:
            marks.append(pytest.mark.skip(reason=case.skip[surface]))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


# --- shared checks -------------------------------------------------------------------------------------


def one_line(text: str) -> str:
    assert text and "\n" not in text.strip() and "Traceback" not in text, text
    return text


def assert_finite_result(frame: pd.DataFrame) -> None:
    """Every trial ran, and every metric is a finite number within the documented SQNR cap."""
    assert len(frame) and (frame["status"] == "ok").all(), frame.get("error")
    for column in ("sqnr_db", "output_sqnr_db", "mse", "cosine", "output_mse", "output_kl", "output_top1_agreement"):
        if column in frame:
            values = pd.to_numeric(frame[column], errors="coerce").dropna().to_numpy()
            assert np.isfinite(values).all(), (column, values)
    for column in ("sqnr_db", "output_sqnr_db"):
        assert frame[column].between(-SQNR_CAP_DB, SQNR_CAP_DB).all(), frame[column]


def assert_skipped(skipped: list[dict], case: Case) -> None:
    name, reason = case.skipped.split(":", 1)
    assert any(s["name"] == name and reason in s["reason"] for s in skipped), skipped


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished CLI analysis of tiny.py:make on good.npz (for the map, budget and label cases)."""
    out = tmp_path_factory.mktemp("tiny_run")
    assert main(["analyze", model_spec("tiny.py:make"), "--data", corpus("good.npz"), *FAST, "--out", str(out)]) == 0
    return out


def test_corpus_matches_its_generator(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the generator puts its folder on sys.path
    spec = importlib.util.spec_from_file_location("_make_corpus", CORPUS / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    files = module.corpus()
    stale = [name for name, content in files.items()
             if not (CORPUS / name).exists() or (CORPUS / name).read_bytes() != content]
    assert not stale, f"re-run python tests/bad_inputs/make_corpus.py: {stale}"
    assert all(len(content) < 8 * 1024 for content in files.values())  # commit-friendly


# --- the Python API ------------------------------------------------------------------------------------


def _api(case: Case, tiny_run: Path):
    """Run the case through the library; returns what it produced (raises on a bad input)."""
    from analysis.allocate import build_problem, parse_budget, suggest
    from analysis.evaluate import Evaluator
    from analysis.loading import model_fingerprint
    from analysis.precision_map import load_map
    from analysis.results import load_analysis

    if case.kind == "load":
        model = load_model(model_spec(case.model), corpus(case.weights) if case.weights else None)
        data = load_data(corpus(case.data))
        check_compatible(model, data)
        return analyze(model, data, CONFIG)
    if case.kind == "format":
        return AnalysisConfig(weight_formats=case.formats)
    model = load_model(model_spec(case.model))
    if case.kind == "map":
        pmap = load_map(corpus(case.data))
        result = load_analysis(tiny_run)
        pmap.validate([layer.name for layer in result.layers], model_fingerprint(model))
        return pmap
    result = load_analysis(tiny_run)
    if case.kind == "budget":
        return suggest(build_problem(result), parse_budget(case.data))
    evaluator = Evaluator(model, load_data(corpus(case.data)), config=AnalysisConfig(
        weight_formats=(), act_formats=(), cumulative=False))
    if case.kind == "max-drop":
        return suggest(build_problem(result), parse_budget("max-drop=1"), measure=evaluator.measure)
    return evaluator.baselines()


@pytest.mark.parametrize("case", params("api"))
def test_api(case: Case, tiny_run):
    if case.kind == "budget":  # not an error: the closest map, with a note
        suggestion = _api(case, tiny_run)
        assert suggestion.map.layers and any(case.expect in note for note in suggestion.notes), suggestion.notes
        assert all("\n" not in note for note in suggestion.notes)
        return
    if case.kind == "evaluate":  # no labels: no task metric, but the output error is still measured
        rows = _api(case, tiny_run)
        assert all(r.metric_name is None and r.metric is None for r in rows)
        assert all(math.isfinite(r.output.sqnr_db) for r in rows[1:])
        return
    if case.ok:
        result = _api(case, tiny_run)
        assert_finite_result(result.to_frame())
        assert all(math.isfinite(c.output.sqnr_db) for c in result.cumulative)
        if case.skipped:
            assert [layer.name for layer in result.layers] == ["fc"]
            assert_skipped(result.skipped_frame().to_dict("records"), case)
        return
    with pytest.raises(ValueError) as info:  # LoadError, FormatError, MapError, BudgetError are ValueErrors
        _api(case, tiny_run)
    assert case.expect in one_line(str(info.value))
    # the loaders raise LoadError; "no layers" is only known once the engine has looked at the graph
    if case.kind == "load" and not case.xfail and case.id not in FOUND_BY_THE_ENGINE:
        assert isinstance(info.value, LoadError)


# --- the CLI ----------------------------------------------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _cli_argv(case: Case, tiny_run: Path, out: Path) -> list[str]:
    model = model_spec(case.model)
    weights = ["--weights", corpus(case.weights)] if case.weights else []
    if case.kind in ("load", "format"):
        formats = ["--weight-formats", ",".join(case.formats)] if case.formats else []
        return ["analyze", model, *weights, "--data", corpus(case.data), *FAST, *formats, "--out", str(out)]
    if case.kind == "map":
        return ["evaluate", model, "--data", corpus("good.npz"), "--map", corpus(case.data), "--samples", "24"]
    if case.kind == "budget":
        out.mkdir()
        return ["suggest", str(tiny_run), "--budget", case.data, "--front-points", "0", "--out", str(out / "map.json")]
    if case.kind == "evaluate":
        return ["evaluate", model, "--data", corpus(case.data), "--samples", "24"]
    # max-drop: the analysis recorded unlabelled data; its evaluation split is that same data
    assert run_cli("analyze", model, "--data", corpus(case.data), *FAST, "--out", str(out))[0] == 0
    return ["suggest", str(out), "--budget", "max-drop=1", "--front-points", "0"]


@pytest.mark.parametrize("case", params("cli"))
def test_cli(case: Case, tiny_run, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(*_cli_argv(case, tiny_run, out))
    lines = [line for line in stderr.strip().splitlines() if line.strip() and not line.startswith("W1")]
    if case.kind in ("budget", "evaluate") or case.ok:
        warnings = [line for line in lines if line.startswith("quantlens: warning: ")]
        assert code == 0 and len(warnings) == len(lines), stderr
        assert [case.warning in line for line in warnings] == ([True] if case.warning else []), stderr
        if case.kind == "budget":
            notes = [line for line in stdout.splitlines() if line.startswith("note:")]
            assert any(case.expect in line for line in notes), stdout
            pmap = json.loads((out / "map.json").read_text())  # the closest map is still written
            assert set(pmap["layers"]) == {"fc1", "fc2"} and pmap["notes"]
        elif case.kind == "evaluate":
            assert case.expect in stdout  # say why the task-metric column is empty
        else:
            assert_finite_result(pd.read_csv(out / "layers.csv"))
            payload = json.loads((out / "analysis.json").read_text())
            if case.skipped:
                assert stdout.startswith("analysed 1 layers (1 skipped)")
                assert_skipped(payload["skipped"], case)
                assert case.skipped.split(":", 1)[1] in (out / "report.html").read_text()
        return
    assert code == 2, (code, stdout)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("quantlens: error: ") and case.expect in lines[0], lines[0]
    assert "--debug" not in lines[0]  # a known error, not an unexpected exception type


# --- the dashboard ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template_runs(tmp_path_factory):
    """A run store with one finished sample:mlp analysis (the dashboard's first-open auto start)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from dashboard import state

    root = tmp_path_factory.mktemp("bad_inputs_template") / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLENS_RUNS_DIR", str(root))
        mp.setenv("QUANTLENS_SYNC_JOBS", "1")
        mp.setenv("QUANTLENS_DEFAULT_SAMPLE", "mlp")
        mp.setenv("QUANTLENS_DEFAULT_SAMPLES", "32")
        st.cache_data.clear()
        st.cache_resource.clear()
        at = AppTest.from_file(APP, default_timeout=120).run()
        assert not at.exception and at.session_state.run_id
        run_id = at.session_state.run_id
    state.JOBS.clear()
    yield root, run_id
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture
def dashboard(tmp_path, monkeypatch, template_runs):
    """A fresh session on a copy of the template store, the mlp run selected."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from dashboard import state

    root, run_id = template_runs
    shutil.copytree(root, tmp_path / "runs")
    monkeypatch.setenv("QUANTLENS_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("QUANTLENS_UPLOAD_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv("QUANTLENS_SYNC_JOBS", "1")
    monkeypatch.setenv("QUANTLENS_DEFAULT_SAMPLE", "mlp")
    monkeypatch.setenv("QUANTLENS_DEFAULT_SAMPLES", "32")
    # Streamlit's caches stay warm between cases (loaded models are keyed by file size and mtime);
    # the jobs registry does not: a finished job of another case must not be picked up.
    state.JOBS.clear()
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception and at.session_state.run_id == run_id
    yield at
    state.JOBS.clear()


def _ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _errors(at) -> list[str]:
    """The error boxes as the user reads them: Markdown's backslash escapes removed (names and
    messages are escaped before rendering, dashboard/markup.py)."""
    return [re.sub(r"\\(.)", r"\1", e.value) for e in at.error]


def _upload_and_run(at, case: Case, data: str | None = None) -> None:
    """Model & data page, "Bring your own": factory / model file / data file, then Run."""
    at.radio(key="md_source").set_value("upload").run()
    head = case.model.partition(":")[0]
    is_program = head.endswith(".pt2")
    at.text_input(key="md_factory").set_value("" if is_program else model_spec(case.model))
    at.checkbox(key="md_trust").set_value(True)
    uploader = at.file_uploader(key="md_model_file").clear()
    model_file = head if is_program else case.weights
    if model_file:
        uploader.upload(model_file, (CORPUS / model_file).read_bytes())
    data = data or case.data
    at.file_uploader(key="md_calib_file").clear().upload(data, (CORPUS / data).read_bytes())
    if case.formats:
        at.multiselect(key="md_weights").set_value(list(case.formats))
    at.button(key="md_run").click().run()
    _ok(at)


def _runs(at) -> list[str]:
    from dashboard import state

    return [r.id for r in state.list_runs()]


@pytest.mark.parametrize("case", params("dashboard"))
def test_dashboard(case: Case, dashboard):
    from dashboard import state

    at = dashboard
    before_id, before_runs = at.session_state.run_id, _runs(at)
    if case.kind in ("load", "format"):
        _upload_and_run(at, case)
    elif case.kind == "map":
        at.switch_page("views/mixed_precision.py").run()
        _ok(at)
        at.file_uploader(key="mp_map_upload").upload(case.data, (CORPUS / case.data).read_bytes()).run()
    elif case.kind == "budget":
        kind, value = case.data.split("=")
        at.switch_page("views/mixed_precision.py").run()
        at.selectbox(key="mp_kind").set_value(kind).run()
        at.number_input(key=f"mp_value_{kind}").set_value(float(value)).run()
    elif case.kind == "max-drop":
        _upload_and_run(at, Case("labels", "load"), data=case.data)  # an unlabelled run: fine by itself
        assert not _errors(at) and at.session_state.run_id not in before_runs
        before_id, before_runs = at.session_state.run_id, _runs(at)
        at.switch_page("views/mixed_precision.py").run()
        at.selectbox(key="mp_kind").set_value("max-drop").run()
        at.button(key="mp_maxdrop_search").click().run()
    _ok(at)
    errors = _errors(at)

    if case.ok:
        assert not errors, errors
        info = state.get_run(at.session_state.run_id)
        assert info.done and info.id not in before_runs  # the new run finished and is selected
        result = state.load_run_result(info)
        assert_finite_result(result.to_frame())
        if case.skipped:
            assert [m.value for m in at.metric if m.label == "Skipped"] == ["1"]
            at.switch_page("views/sensitivity.py").run()
            at.session_state["sens_view"] = "Skipped & failed"
            at.run()
            _ok(at)
            # (a plain st.dataframe does not carry its key in AppTest: found by its columns)
            tables = [t.value for t in at.dataframe if "reason" in t.value]
            assert len(tables) == 1
            assert_skipped(tables[0].to_dict("records"), case)
        return

    assert len(errors) == 1 and case.expect in errors[0], (case.expect, errors)
    one_line(errors[0])
    # the session is intact: the earlier results stay selected, nothing half-made in the run store
    assert at.session_state.run_id == before_id and _runs(at) == before_runs
    if case.kind == "budget":  # the closest map is still shown, ready to edit
        assert at.data_editor and len(at.data_editor[0].value) == 3
    at.switch_page("views/sensitivity.py").run()
    _ok(at)
    assert not _errors(at) and len(at.dataframe(key="sens_table").value)


# --- beyond the table: the engine called directly, without the loaders' checks --------------------------


def _factory(spec: str):
    """The factory's model as a user of the library would build it: without load_model's checks."""
    from analysis.loading import _call_factory

    head, _, attr = spec.partition(":")
    return _call_factory(model_spec(spec), corpus(head), attr)


def test_analyze_names_the_layer_whose_weight_is_nan():
    model = _factory("nan_weights.py:make")
    with pytest.raises(ValueError) as info:
        analyze(model, load_data(corpus("good.npz")), CONFIG)
    assert "fc1" in one_line(str(info.value))


def test_weight_only_analyze_names_the_layer_whose_weight_is_inf():
    model = _factory("nan_weights.py:make_inf")
    with pytest.raises(ValueError) as info:
        analyze(model, load_data(corpus("good.npz")), AnalysisConfig(num_samples=SAMPLES, act_formats=()))
    assert "fc2" in one_line(str(info.value))


def test_weight_only_analyze_of_nan_activations_is_not_reported_as_minus_100_db():
    model = _factory("nan_activations.py:make")
    data = load_data(corpus("good.npz"))
    try:
        result = analyze(model, data, AnalysisConfig(num_samples=SAMPLES, act_formats=()))
    except ValueError as exc:
        assert "NaN" in one_line(str(exc))
        return
    frame = result.to_frame()
    assert (frame["status"] == "failed").all() or frame["sqnr_db"].isna().all(), frame[["layer", "sqnr_db"]]


def test_finiteness_check_ignores_an_inf_attention_mask_buffer(tmp_path):
    """The finiteness check looks at parameters only: a -inf causal mask buffer is fine."""
    (tmp_path / "masked.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(4, 4)\n"
        "        self.register_buffer('mask', torch.triu(torch.full((4, 4), float('-inf')), 1))\n"
        "    def forward(self, x):\n"
        "        return self.fc(x)\n"
        "def make():\n    return M()\n")
    model = load_model(f"{tmp_path / 'masked.py'}:make")
    assert int(np.isinf(model.mask.numpy()).sum()) == 6


def test_a_float16_model_analyses():
    from analysis.data import Dataset

    model = load_model(model_spec("tiny.py:make")).half()
    data = load_data(corpus("good.npz"))
    half = Dataset(data.inputs.half(), data.labels, data.task, data.name)
    frame = analyze(model, half, CONFIG).to_frame()
    assert (frame["status"] == "ok").all(), frame["error"].dropna().unique()


def test_bfloat16_data_can_be_fingerprinted(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"inputs": torch.randn(4, 8).to(torch.bfloat16)}, tmp_path / "bf16.safetensors")
    data = load_data(str(tmp_path / "bf16.safetensors"))  # loads fine
    assert len(data.fingerprint()) == 16


# --- hostile inputs beyond the table (issue 12): memory bounds, files, runs, messages -----------------

ROOT = CORPUS.parent.parent


def _bounded(script: str, headroom_mb: int = 1536, timeout: int = 600) -> dict:
    """Run `script` in a fresh Python whose address space is capped at what it holds after its
    imports plus `headroom_mb`: reading a bomb whole then fails with MemoryError instead of
    swapping the machine. The script's last stdout line is JSON."""
    prelude = (
        "import json, resource, sys\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(CORPUS)!r}]\n"
        "import torch, pandas, analysis.cli, analysis.cli.commands, analysis.loading, analysis.report, analysis.runs\n"
        "torch.set_num_threads(1)\n"
        "size = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024\n"
        f"limit = size + ({headroom_mb} << 20)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
    )
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", prelude + script], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _within(seconds: float, fn, *args):
    """fn(*args) in a thread that must finish in time: a FIFO or /dev/zero read would never end."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 — re-raised in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds}s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _fails(code_out_err: tuple[int, str, str], fragment: str) -> str:
    code, _, err = code_out_err
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("W1")]
    assert code != 0 and len(lines) == 1 and fragment in lines[0], (code, err)
    return one_line(lines[0])


@pytest.mark.slow  # a fresh interpreter, two small analyses: ~40 s on the 2-core machine
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the address-space cap reads /proc/self/status")
def test_zip_bomb_and_endless_generator_stay_within_a_memory_bound(tmp_path):
    """A 3.7 MB .npz declaring 3.75 GiB, and a generator that never ends, under a 1.5 GiB address
    space cap: only the samples asked for are read; without a sample count both are refused."""
    spec = importlib.util.spec_from_file_location("_make_corpus", CORPUS / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bomb = module.zip_bomb(tmp_path / "bomb.npz")
    assert bomb.stat().st_size < 8 << 20
    endless = corpus("hostile.py") + ":endless"
    script = f"""
from analysis.cli import main
from analysis.loading import LoadError, load_data
out = {{}}
data = load_data({str(bomb)!r}, max_samples=16)
out["bomb_rows"], out["bomb_labels"], out["bomb_sum"] = len(data), len(data.labels), float(data.inputs.abs().sum())
try:
    load_data({str(bomb)!r})
    out["bomb_whole"] = "read"
except LoadError as exc:
    out["bomb_whole"] = str(exc)
out["endless_rows"] = len(load_data({endless!r}, max_samples=16))
try:
    load_data({endless!r}, max_bytes=1 << 20)
    out["endless_whole"] = "read"
except LoadError as exc:
    out["endless_whole"] = str(exc)
fast = ["--samples", "16", "--quiet", "--weight-formats", "int8", "--act-formats", "int8"]
out["cli_bomb"] = main(["analyze", {model_spec("tiny.py:make")!r}, "--data", {str(bomb)!r}, *fast,
                        "--out", {str(tmp_path / "bomb_run")!r}])
out["cli_endless"] = main(["analyze", {model_spec("tiny.py:make")!r}, "--data", {endless!r}, *fast,
                           "--out", {str(tmp_path / "endless_run")!r}])
print(json.dumps(out))
"""
    out = _bounded(script)
    assert (out["bomb_rows"], out["bomb_labels"], out["bomb_sum"]) == (16, 16, 0.0)
    assert "3.0 GiB" in one_line(out["bomb_whole"]) and "limit" in out["bomb_whole"] and "--samples" in out["bomb_whole"]
    assert out["endless_rows"] == 16
    assert "endless() yielded so far" in one_line(out["endless_whole"]) and "--samples" in out["endless_whole"]
    assert out["cli_bomb"] == 0 and out["cli_endless"] == 0
    assert len(pd.read_csv(tmp_path / "bomb_run" / "layers.csv")) == 2 * 3


def test_a_corrupt_npz_member_size_is_refused_before_reading(tmp_path):
    """The zip entry must hold exactly what the .npy header declares (a lying header is not read)."""
    import zipfile

    good = zipfile.ZipFile(corpus("good.npz"))
    path = tmp_path / "lying.npz"
    with zipfile.ZipFile(path, "w") as out:
        out.writestr("inputs.npy", good.read("inputs.npy")[:-32])
    with pytest.raises(LoadError) as info:
        load_data(str(path))
    assert "zip entry holds" in one_line(str(info.value)) and "truncated or corrupt" in str(info.value)


def test_npz_reads_the_first_samples_exactly(tmp_path):
    """A naive reference: np.load and slice, for C and Fortran order."""
    rng = np.random.default_rng(3)
    inputs, labels = rng.standard_normal((40, 3, 5)).astype(np.float32), rng.integers(0, 4, 40)
    for order in ("C", "F"):
        np.savez(tmp_path / f"{order}.npz", inputs=np.asarray(inputs, order=order), labels=labels)
        data = load_data(str(tmp_path / f"{order}.npz"), max_samples=7)
        assert np.array_equal(data.inputs.numpy(), inputs[:7]) and np.array_equal(data.labels.numpy(), labels[:7])
        assert np.array_equal(load_data(str(tmp_path / f"{order}.npz")).inputs.numpy(), inputs)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_fifos_and_devices_as_maps_or_run_files_are_refused_not_read(tiny_run, tmp_path):
    fifo, zero = tmp_path / "map.json", tmp_path / "zero.yaml"
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    for bad in (fifo, zero):
        _fails(_within(60, run_cli, "evaluate", model_spec("tiny.py:make"), "--data", corpus("good.npz"),
                       "--map", str(bad), "--samples", "24"), "not a regular file")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "analysis.json").unlink()
    os.mkfifo(run / "analysis.json")
    _fails(_within(60, run_cli, "suggest", str(run), "--budget", "avg-bits=6", "--no-measure", "--front-points", "0",
                   "--out", str(tmp_path / "m.json")), "not a regular file")
    (run / "trials.jsonl").unlink()
    (run / "trials.jsonl").symlink_to("/dev/zero")
    _fails(_within(60, run_cli, "analyze", model_spec("tiny.py:make"), "--data", corpus("good.npz"), *FAST,
                   "--resume", "--out", str(run)), "not a regular file")
    (run / "meta.json").unlink()
    os.mkfifo(run / "meta.json")
    from analysis import runstore

    assert _within(30, runstore.read_run, run) is not None  # listed, not hung on


def test_front_points_are_capped_before_any_work(tiny_run, tmp_path):
    message = _fails(run_cli("suggest", str(tiny_run), "--budget", "avg-bits=6", "--no-measure",
                             "--front-points", "100000", "--out", str(tmp_path / "m.json")), "out of range")
    assert "200" in message and not (tmp_path / "m.json").exists()


def test_a_second_analysis_into_a_locked_folder_is_refused(tmp_path):
    from analysis import runstore

    out = tmp_path / "run"
    out.mkdir()
    with runstore.locked(out):  # as another process analysing into it holds it
        _fails(run_cli("analyze", model_spec("tiny.py:make"), "--data", corpus("good.npz"), *FAST, "--out", str(out)),
               "in use by another quantlens process")
    assert not (out / "run.json").exists() and not (out / "trials.jsonl").exists()
    assert run_cli("analyze", model_spec("tiny.py:make"), "--data", corpus("good.npz"), *FAST, "--out", str(out))[0] == 0


def test_resume_keeps_only_trials_of_the_current_plan_and_ignores_cache_mb(tmp_path):
    out = tmp_path / "run"
    args = ["analyze", model_spec("tiny.py:make"), "--data", corpus("good.npz"), "--samples", "24", "--quiet",
            "--weight-formats", "int8,int8,INT8", "--act-formats", "none", "--out", str(out)]
    assert run_cli(*args)[0] == 0
    clean = (out / "layers.csv").read_bytes()
    frame = pd.read_csv(out / "layers.csv")
    assert list(frame["format"]) == ["int8", "int8"] and list(frame["layer"]) == ["fc1", "fc2"]  # one trial each
    lines = (out / "trials.jsonl").read_text().splitlines()
    foreign = json.loads(lines[1])
    foreign["weight_format"] = "int2-sym-pc"  # a trial of another plan
    (out / "trials.jsonl").write_text(lines[0] + "\n" + json.dumps(foreign) + "\n")
    assert run_cli(*args, "--resume", "--cache-mb", "2")[0] == 0
    assert (out / "layers.csv").read_bytes() == clean
    assert "int2" not in (out / "trials.jsonl").read_text()


def test_a_rerun_that_fails_validation_leaves_the_run_untouched(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {name: (run / name).read_bytes() for name in ("run.json", "trials.jsonl", "analysis.json", "meta.json")}
    _fails(run_cli("analyze", model_spec("no_layers.py:make"), "--data", corpus("good.npz"), *FAST, "--out", str(run)),
           "no quantizable layers")
    _fails(run_cli("analyze", model_spec("tiny.py:make"), "--data", corpus("good.npz"), "--samples", "24", "--quiet",
                   "--weight-formats", "none", "--act-formats", "none", "--out", str(run)), "nothing to sweep")
    assert {name: (run / name).read_bytes() for name in before} == before


def test_outputs_never_replace_files_quantlens_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "layers.csv").write_text("my,own\n")
    analyze_args = ["analyze", model_spec("tiny.py:make"), "--data", corpus("good.npz"), *FAST, "--out", str(out)]
    message = _fails(run_cli(*analyze_args), "--force")
    assert "layers.csv" in message and "not written by quantlens" in message
    assert (out / "layers.csv").read_text() == "my,own\n" and not (out / "run.json").exists()
    assert run_cli(*analyze_args, "--force")[0] == 0 and "my,own" not in (out / "layers.csv").read_text()
    assert run_cli(*analyze_args)[0] == 0  # its own files: replaced without --force

    suggest_args = ["suggest", str(out), "--budget", "avg-bits=6", "--no-measure", "--front-points", "2"]
    assert run_cli(*suggest_args)[0] == 0 and run_cli(*suggest_args)[0] == 0
    pmap = out / "map.json"
    edited = json.loads(pmap.read_text())
    edited["layers"]["fc1"] = {"weight": "int4-sym-pc"}
    pmap.write_text(json.dumps(edited))
    assert "map.json" in _fails(run_cli(*suggest_args), "edited since")
    assert json.loads(pmap.read_text()) == edited
    assert run_cli(*suggest_args, "--force")[0] == 0 and json.loads(pmap.read_text()) != edited

    kept = pmap.read_bytes()
    for extra in ((), ("--force",)):  # never over its own input, forced or not
        _fails(run_cli("export", str(pmap), "--to", "yaml", "--out", str(pmap), *extra), "is also an input")
    assert pmap.read_bytes() == kept
    assert run_cli("export", str(pmap), "--to", "yaml", "--out", str(tmp_path / "m.yaml"))[0] == 0
    assert run_cli("export", str(pmap), "--to", "yaml", "--out", str(tmp_path / "m.yaml"))[0] == 0  # its own


def test_a_failed_write_keeps_the_previous_file_and_names_it(tiny_run, tmp_path, monkeypatch):
    import errno

    from analysis import runstore
    from analysis.report import write_report
    from analysis.results import load_analysis

    report = tmp_path / "report.html"
    write_report(load_analysis(tiny_run), report)
    complete = report.read_bytes()

    def full_disk(self, text, *args, **kwargs):
        with open(self, "w") as handle:
            handle.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(runstore.FileSafetyError) as info:
        write_report(load_analysis(tiny_run), report)
    monkeypatch.undo()
    assert str(report) in one_line(str(info.value)) and os.strerror(errno.ENOSPC) in str(info.value)
    assert report.read_bytes() == complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temp file left


def test_labels_outside_the_classes_are_refused_by_every_command_that_uses_them(tiny_run):
    from analysis.allocate import build_problem, parse_budget, suggest
    from analysis.evaluate import Evaluator
    from analysis.config import QATConfig
    from analysis.finetune import finetune_qat
    from analysis.precision_map import uniform_map
    from analysis.results import load_analysis

    model, good, bad = _factory("tiny.py:make"), load_data(corpus("good.npz")), load_data(corpus("bad_labels.npz"))
    for make in (lambda: Evaluator(model, good, bad),
                 lambda: suggest(build_problem(load_analysis(tiny_run)), parse_budget("max-drop=1"),
                                 measure=Evaluator(model, bad).measure),
                 lambda: finetune_qat(model, uniform_map(["fc1", "fc2"], "int4", None), bad, good,
                                      config=QATConfig(epochs=1))):
        with pytest.raises(ValueError) as info:
            make()
        assert "2 label(s) outside the model's 4 classes (ids 0..3): -1, 99" in one_line(str(info.value))


def test_finetune_divergence_names_the_learning_rate():
    """Divergence is the learning rate's fault, said in one line, and the PTQ model comes back."""
    from analysis.config import QATConfig
    from analysis.finetune import finetune_qat
    from analysis.precision_map import uniform_map

    model, good = _factory("tiny.py:make"), load_data(corpus("good.npz"))
    result = finetune_qat(model, uniform_map(["fc1", "fc2"], "int8", None), good, good,
                          config=QATConfig(epochs=3, lr=1e30))
    notes = [note for note in result.notes if "diverged" in note]
    assert result.kept == "ptq" and len(notes) == 1 and "\n" not in notes[0]
    assert "1e+30" in notes[0] and "--lr" in notes[0] and "model or data" not in notes[0]


def test_the_callers_model_keeps_its_buffers_and_mode():
    import torch

    from analysis.evaluate import Evaluator

    model, data = _factory("hostile.py:make_stateful"), load_data(corpus("good.npz"))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    check_compatible(model, data)
    assert_finite_result(analyze(model, data, CONFIG).to_frame())
    Evaluator(model, data).baselines()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before), \
        [k for k in before if not torch.equal(after[k], before[k])]
    assert all(module.training for module in model.modules())


def test_training_mode_is_analysed_as_eval_mode_on_a_private_copy():
    trained, evaluated = _factory("hostile.py:make_training"), _factory("hostile.py:make_training").eval()
    data = load_data(corpus("good.npz"))
    columns = ["layer", "target", "format", "sqnr_db", "output_sqnr_db"]
    frames = [analyze(m, data, CONFIG).to_frame()[columns] for m in (trained, evaluated)]
    pd.testing.assert_frame_equal(*frames)
    assert trained.training and trained.drop.training


def test_messages_are_one_line_without_internal_names(tiny_run, tmp_path, monkeypatch):
    tiny, good = model_spec("tiny.py:make"), corpus("good.npz")
    _fails(run_cli("suggest", str(tiny_run), "--budget", "min-sqnr=1e308", "--no-measure", "--front-points", "0",
                   "--out", str(tmp_path / "m.json")), "is out of range")
    _fails(run_cli("dashboard", "--port", "99999"), "--port 99999 is not a TCP port")
    message = _fails(run_cli("analyze", tiny, "--data", good, *FAST, "--cache-mb", "0", "--out", str(tmp_path / "o")),
                     "--cache-mb")
    assert "cache_bytes" not in message
    # Ctrl-C: only analyze has --resume
    import analysis.evaluate
    import analysis.quantsim

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(analysis.evaluate.Evaluator, "baselines", interrupted)
    monkeypatch.setattr(analysis.evaluate.Evaluator, "measure", interrupted)
    monkeypatch.setattr(analysis.quantsim.QuantSim, "forward", interrupted)  # suggest's judging measures with it
    for argv in (("evaluate", tiny, "--data", good, "--samples", "24"),
                 ("suggest", str(tiny_run), "--budget", "avg-bits=6", "--front-points", "0", "--out", str(tmp_path / "n.json"))):
        code, _, err = run_cli(*argv)
        assert code == 130 and "has no --resume" in one_line(err.strip()) and "rerun" not in err
    monkeypatch.setattr("analysis.runs.Sweep.run", interrupted)
    code, _, err = run_cli("analyze", tiny, "--data", good, *FAST, "--out", str(tmp_path / "p"))
    assert code == 130 and "--resume" in one_line(err.strip()) and str(tmp_path / "p") in err


def test_label_check_counts_by_hand_and_lets_padding_through():
    import torch

    from analysis.data import Dataset, check_labels

    logits = torch.zeros(3, 4, 5)  # 5 vocabulary entries
    check_labels(Dataset(torch.zeros(3, 4), torch.tensor([[0, 4, -100, 1]] * 3), "language-model"), logits)
    with pytest.raises(ValueError) as info:
        check_labels(Dataset(torch.zeros(3, 4), torch.tensor([[0, 5, -100, -1]] * 3), "language-model"), logits)
    assert "6 label(s) outside the model's 5 vocabulary entries (ids 0..4): -1, 5" in one_line(str(info.value))
    with pytest.raises(ValueError, match="1 label"):  # -100 is no padding marker for a classifier
        check_labels(Dataset(torch.zeros(2, 4), torch.tensor([3, -100]), "classification"), torch.zeros(2, 4))
    check_labels(Dataset(torch.zeros(2, 4), torch.tensor([3.5, -7.0]), "other"), torch.zeros(2, 4))  # not class ids


def test_map_text_from_an_upload_is_read_with_the_file_rules():
    from analysis.precision_map import MAX_MAP_BYTES, MapError, loads_map

    with pytest.raises(MapError, match="YAML aliases"):
        loads_map((CORPUS / "map_yaml_aliases.yaml").read_text(), "upload.yaml", yaml_text=True)
    with pytest.raises(MapError, match="a map is at most 16 MiB"):
        loads_map(" " * (MAX_MAP_BYTES + 1), "upload.json")
    assert loads_map((CORPUS / "map_unknown_format.json").read_text().replace("fp3_e1m1", "int4"), "upload.json") \
        .layers["fc1"].weight == "int4-sym-pc"
