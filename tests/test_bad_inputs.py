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
import shutil
import sys
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
    Case("weights-as-data", "load", data="weights_as_data.safetensors", expect="no key 'inputs'"),
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
    Case("constant-weights", "load", model="constant_weights.py:make"),
    Case("gru-next-to-linear", "load", model="unsupported.py:make", skipped="gru:unsupported layer type GRU"),
    Case("bilinear-next-to-linear", "load", model="unsupported.py:make_bilinear",
         skipped="bilinear:unsupported layer type Bilinear"),
    # names and maps
    Case("unknown-format-name", "format", formats=("fp4_e2m1",), expect="unknown format 'fp4_e2m1'"),
    Case("map-for-another-model", "map", data="map_other_model.json", expect="made for model"),
    Case("map-unknown-format", "map", data="map_unknown_format.json", expect="unknown format 'fp4_e2m1'"),
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
]


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
    if case.kind == "load" and not case.xfail and case.id != "no-quantizable-layers":
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
        assert code == 0 and not lines, stderr
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
