"""The dashboard end to end in a real Chromium: the first-open analysis, a hand-started one, every page.

One server per module (see conftest.py); every test opens a fresh browser session on it and first waits
for a finished analysis, so the tests do not depend on their order. Analyses run in worker processes
and the browser follows them through the progress fragment, exactly as a user sees it.

Screenshots of every page go to $QUANTLENS_SCREENSHOT_DIR (default: a pytest tmp dir).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

MLP_LAYERS = ("fc1", "fc2", "fc3")
ANALYSIS_TIMEOUT_MS = 180_000  # the mlp at 64 samples takes ~5 s on an idle machine; a loaded one is slower
UI_TIMEOUT_MS = 60_000

APP = "[data-testid='stApp']"
CONNECTED = f"{APP}[data-test-connection-state='CONNECTED']"
IDLE = f"{APP}[data-test-script-state='notRunning']"
MAIN = "[data-testid='stMain']"
ERROR = "[data-testid='stAlertContentError']"
EXCEPTION = "[data-testid='stException']"

# Records every progress text the page ever shows (a MutationObserver set up before the app loads): a
# progress bar can come and go between two polls of a test, the observer cannot miss it.
WATCH_PROGRESS = """
window.__quantlensProgress = [];
new MutationObserver(() => {
  for (const el of document.querySelectorAll("[data-testid='stProgress']")) {
    const text = el.innerText.trim();
    if (text && !window.__quantlensProgress.includes(text)) window.__quantlensProgress.push(text);
  }
}).observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
"""


# --- helpers ----------------------------------------------------------------------------------------


def _expect():
    from playwright.sync_api import expect

    return expect


def wait_idle(page) -> None:
    page.wait_for_selector(CONNECTED, timeout=UI_TIMEOUT_MS)
    page.wait_for_selector(IDLE, timeout=UI_TIMEOUT_MS)


def no_exception(page) -> None:
    exceptions = page.locator(EXCEPTION)
    assert exceptions.count() == 0, exceptions.all_inner_texts()


def no_error(page) -> None:
    no_exception(page)
    errors = page.locator(ERROR)
    assert errors.count() == 0, errors.all_inner_texts()


def open_app(page, url: str) -> None:
    """Open the dashboard (Model & data) and wait until a finished analysis shows there."""
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector(CONNECTED, timeout=UI_TIMEOUT_MS)
    wait_for_results(page)


def wait_for_results(page) -> None:
    """On Model & data: wait out a running analysis until its results show."""
    main = page.locator(MAIN)
    main.get_by_role("heading", name="Model & data", level=1).wait_for(timeout=UI_TIMEOUT_MS)
    main.get_by_role("heading", name=re.compile(r"^Results: ")).wait_for(timeout=ANALYSIS_TIMEOUT_MS)
    main.locator("[data-testid='stPlotlyChart']").first.wait_for(timeout=UI_TIMEOUT_MS)
    wait_idle(page)
    no_error(page)


def go_to(page, title: str) -> None:
    """Open a page through the sidebar navigation (a client-side switch: the session is kept)."""
    page.locator("[data-testid='stSidebarNavLink']", has_text=title).click()
    page.locator(MAIN).get_by_role("heading", name=title, level=1).wait_for(timeout=UI_TIMEOUT_MS)
    wait_idle(page)


def charts_drawn(page, minimum: int) -> None:
    """At least `minimum` plotly charts in the main area, each drawn (its SVG exists)."""
    charts = page.locator(f"{MAIN} [data-testid='stPlotlyChart']")
    _expect()(charts.nth(minimum - 1)).to_be_visible(timeout=UI_TIMEOUT_MS)
    page.wait_for_function(
        """() => [...document.querySelectorAll("[data-testid='stMain'] [data-testid='stPlotlyChart']")]
                 .every(c => c.querySelector('.main-svg'))""", timeout=UI_TIMEOUT_MS)


def pick(page, label: str, option: str | re.Pattern) -> None:
    """Choose `option` in the main area's selectbox labelled `label`."""
    box = page.locator(f"{MAIN} [data-testid='stSelectbox']").filter(
        has=page.get_by_text(label, exact=True))
    box.click()
    page.get_by_role("option", name=option).first.click()


def metric_value(page, label: str) -> str:
    metric = page.locator(f"{MAIN} [data-testid='stMetric']").filter(has=page.get_by_text(label, exact=True))
    return metric.locator("[data-testid='stMetricValue']").inner_text().strip()


def done_runs(runs: Path) -> list[str]:
    out = []
    for meta in sorted(runs.glob("*/meta.json")) if runs.is_dir() else ():
        try:
            if json.loads(meta.read_text()).get("status") == "done":
                out.append(meta.parent.name)
        except (OSError, json.JSONDecodeError):
            pass
    return out


def screenshot(page, folder: Path, name: str) -> Path:
    """The whole main area as a PNG: the app scrolls an inner container, so the viewport is grown to fit."""
    size = page.viewport_size
    page.add_style_tag(content="[data-testid='stToastContainer'] { display: none !important; }")
    page.evaluate("document.activeElement && document.activeElement.blur()")  # no focus ring in the picture
    height = page.evaluate("""() => {
        const block = document.querySelector("[data-testid='stMainBlockContainer']");
        for (let el = block; el; el = el.parentElement) el.scrollTop = 0;  // from the top of the page
        const bottoms = [...block.children].map(c => c.getBoundingClientRect().bottom);
        return Math.ceil(Math.max(0, ...bottoms));
    }""")
    page.set_viewport_size({"width": size["width"], "height": max(720, min(int(height) + 64, 3600))})
    try:
        wait_idle(page)
        page.wait_for_timeout(800)  # plotly redraws at the new size
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), animations="disabled")
    finally:
        page.set_viewport_size(size)
    return path


# --- the flows --------------------------------------------------------------------------------------


def test_first_open_analyses_the_sample_and_shows_sensitivity(page, server, screenshot_dir):
    url, runs = server
    fresh = not done_runs(runs) and not (runs.is_dir() and any(runs.iterdir()))
    page.add_init_script(WATCH_PROGRESS)
    open_app(page, url)
    if fresh:  # this session started the analysis: its progress was on screen before the results
        progress = page.evaluate("window.__quantlensProgress")
        assert any("sample:mlp" in text for text in progress), progress
    assert done_runs(runs)

    go_to(page, "Sensitivity")
    main = page.locator(MAIN)
    _expect()(main.locator("[data-testid='stDataFrame']").first).to_be_visible(timeout=UI_TIMEOUT_MS)
    charts_drawn(page, 2)  # the bar chart and the heat map
    _expect()(main.get_by_text(re.compile(r"3 layers · 15 trials"))).to_be_visible()
    no_error(page)
    screenshot(page, screenshot_dir, "2-sensitivity")


def test_run_an_analysis_by_hand(page, server, screenshot_dir):
    url, runs = server
    page.add_init_script(WATCH_PROGRESS)
    open_app(page, url)
    before = done_runs(runs)
    main = page.locator(MAIN)

    main.get_by_text("Bundled sample", exact=True).click()
    pick(page, "Sample model", "sample:mlp")
    samples = main.locator("[data-testid='stNumberInput']").filter(
        has=page.get_by_text("Calibration samples", exact=True)).locator("input")
    samples.fill("48")  # a count no other run uses: the sidebar then shows that this run is the open one
    samples.press("Tab")
    _expect()(samples).to_have_value("48")
    main.get_by_role("button", name="Run analysis").click()

    # The page still shows the earlier results until the rerun lands: wait for the new run instead, which
    # the sidebar opens (with its sample count) once the background job has finished.
    sidebar = page.locator("[data-testid='stSidebar']")
    _expect()(sidebar.get_by_text(re.compile(r"· 48 samples"))).to_be_visible(timeout=ANALYSIS_TIMEOUT_MS)
    wait_for_results(page)
    progress = page.evaluate("window.__quantlensProgress")  # the live progress the job panel showed
    assert any(re.search(r"sample:mlp — (loading the model and data…|\d+/\d+ trials finished)", text)
               for text in progress), progress
    after = done_runs(runs)
    # every count the progress bar showed is of the trials the finished run holds
    finished = json.loads((runs / after[-1] / "meta.json").read_text())["trials"]
    counts = [tuple(map(int, m.groups())) for text in progress for m in [re.search(r"(\d+)/(\d+) trials", text)] if m]
    assert counts and all(total == finished and done <= total for done, total in counts), (counts, finished)
    assert len(after) == len(before) + 1, (before, after)
    _expect()(sidebar.get_by_text(f"All runs ({len(after)})")).to_be_visible()
    _expect()(main.get_by_text("Layers analysed")).to_be_visible()
    charts_drawn(page, 1)
    no_error(page)
    screenshot(page, screenshot_dir, "1-model-and-data")


def test_open_a_layer(page, server, screenshot_dir):
    url, _ = server
    open_app(page, url)
    go_to(page, "Layer detail")
    charts_drawn(page, 4)  # weights, activations, error, channel ranges

    pick(page, "Layer (execution order)", re.compile(r"^fc2\b"))
    main = page.locator(MAIN)
    _expect()(main.get_by_text("Every target × format for fc2")).to_be_visible(timeout=UI_TIMEOUT_MS)
    _expect()(main.locator(".gtitle", has_text="fc2: weights")).to_be_visible(timeout=UI_TIMEOUT_MS)
    wait_idle(page)
    charts_drawn(page, 4)
    assert metric_value(page, "Weight shape") == "64×128"
    no_error(page)
    screenshot(page, screenshot_dir, "3-layer-detail")


def test_change_the_budget_on_mixed_precision(page, server, screenshot_dir):
    url, _ = server
    open_app(page, url)
    go_to(page, "Mixed precision")
    charts_drawn(page, 1)
    bits_before = metric_value(page, "Average weight bits")
    sqnr_before = metric_value(page, "Predicted output SQNR")
    assert float(bits_before) > 4.5, bits_before  # the default budget (6 bits) keeps some int8

    budget = page.locator(f"{MAIN} [data-testid='stNumberInput']").filter(
        has=page.get_by_text("average weight bits", exact=True)).locator("input")
    budget.fill("4")
    budget.press("Enter")

    bits = page.locator(f"{MAIN} [data-testid='stMetric']").filter(
        has=page.get_by_text("Average weight bits", exact=True)).locator("[data-testid='stMetricValue']")
    _expect()(bits).to_have_text("4.00", timeout=UI_TIMEOUT_MS)  # every layer int4
    wait_idle(page)
    sqnr_after = metric_value(page, "Predicted output SQNR")
    assert sqnr_after != sqnr_before, (sqnr_before, sqnr_after)
    assert float(sqnr_after.split()[0]) < float(sqnr_before.split()[0])
    charts_drawn(page, 1)
    no_error(page)
    screenshot(page, screenshot_dir, "4-mixed-precision")


def test_download_a_precision_map(page, server, screenshot_dir, tmp_path):
    url, _ = server
    open_app(page, url)
    go_to(page, "Export & reports")
    button = page.locator(f"{MAIN} [data-testid='stDownloadButton']").filter(has_text="Precision map (JSON)")
    _expect()(button).to_be_visible(timeout=UI_TIMEOUT_MS)
    no_error(page)
    screenshot(page, screenshot_dir, "5-export")

    with page.expect_download(timeout=UI_TIMEOUT_MS) as info:
        button.locator("button").click()
    download = info.value
    assert download.suggested_filename.endswith(".precision-map.json"), download.suggested_filename
    path = tmp_path / download.suggested_filename
    download.save_as(str(path))
    payload = json.loads(path.read_text())
    assert payload["schema"] == "quantlens.precision-map/2" and payload["quant"]["schema"] == "quantlens.quant-config/1"
    assert set(MLP_LAYERS) <= set(payload["layers"]), payload["layers"]
    assert all(entry.get("weight") for entry in payload["layers"].values())
    no_exception(page)


def test_bad_upload_shows_an_error_and_keeps_results(page, server, tmp_path):
    url, runs = server
    factory = tmp_path / "net.py"
    factory.write_text("from sample_models.models import DigitsMLP\n\n\ndef build():\n    return DigitsMLP()\n")
    open_app(page, url)
    before = sorted(p.name for p in runs.iterdir())
    main = page.locator(MAIN)

    main.get_by_text("Bring your own", exact=True).click()
    factory_input = main.locator("[data-testid='stTextInput']").filter(
        has=page.get_by_text(re.compile(r"^Function that returns the model"))).locator("input")
    factory_input.fill(f"{factory}:build")
    factory_input.press("Tab")
    main.locator("[data-testid='stCheckbox']").filter(has_text="I trust this code").locator("label").click()
    calibration = main.locator("[data-testid='stFileUploader']").filter(
        has=page.get_by_text(re.compile(r"^Calibration data")))
    calibration.locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(files=[{
        "name": "calib.npz", "mimeType": "application/octet-stream",
        "buffer": b"just some text, renamed to look like a numpy archive\n"}])
    _expect()(calibration.get_by_text("calib.npz")).to_be_visible(timeout=UI_TIMEOUT_MS)
    _expect()(factory_input).to_have_value(f"{factory}:build")
    main.get_by_role("button", name="Run analysis").click()

    error = main.locator(ERROR)
    _expect()(error.first).to_be_visible(timeout=UI_TIMEOUT_MS)
    _expect()(error.first).to_contain_text("calib.npz")
    wait_idle(page)
    no_exception(page)
    assert sorted(p.name for p in runs.iterdir()) == before  # nothing written for a bad input

    go_to(page, "Sensitivity")
    _expect()(main.locator("[data-testid='stDataFrame']").first).to_be_visible(timeout=UI_TIMEOUT_MS)
    charts_drawn(page, 2)
    no_error(page)


# The page open while an analysis runs must not slow it: the worker process runs the CLI's engine call.
RATIO_LIMIT = 2.0  # generous: catches the old 4.6× slowdown; the ≤ 1.2× target is measured in benchmarks/bench_dashboard.py (README)
RATIO_SAMPLE, RATIO_SAMPLES = "cnn", 256


def run_sample_from_the_page(page, runs: Path, sample: str, samples: int) -> float:
    """Start the bundled `sample` analysis (form defaults, `samples` calibration samples) on Model &
    data and return the seconds from the click until its results show, the page watching throughout."""
    main = page.locator(MAIN)
    main.get_by_text("Bundled sample", exact=True).click()
    pick(page, "Sample model", f"sample:{sample}")
    count = main.locator("[data-testid='stNumberInput']").filter(
        has=page.get_by_text("Calibration samples", exact=True)).locator("input")
    count.fill(str(samples))
    count.press("Tab")
    _expect()(count).to_have_value(str(samples))
    wait_idle(page)
    before = set(done_runs(runs))
    started = time.perf_counter()
    main.get_by_role("button", name="Run analysis").click()
    main.get_by_role("heading", name="Analysis in progress").wait_for(timeout=UI_TIMEOUT_MS)
    main.get_by_role("heading", name=f"Results: sample:{sample}").wait_for(timeout=ANALYSIS_TIMEOUT_MS)
    seconds = time.perf_counter() - started
    assert len(set(done_runs(runs)) - before) == 1
    return seconds


def run_sample_with_the_cli(sample: str, samples: int, out: Path) -> float:
    """The same analysis as the page's form defaults, with `python -m analysis.cli analyze`."""
    command = [sys.executable, "-m", "analysis.cli", "analyze", f"sample:{sample}", "--data", f"sample:{sample}",
               "--samples", str(samples), "--weight-formats", "int8,int4", "--act-formats", "int8", "--cumulative",
               "--out", str(out), "--quiet"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=str(Path(__file__).resolve().parents[2]))
    return time.perf_counter() - started


def test_watching_the_page_does_not_slow_the_analysis(page, server, tmp_path):
    url, runs = server
    open_app(page, url)
    page_s = run_sample_from_the_page(page, runs, RATIO_SAMPLE, RATIO_SAMPLES)
    no_error(page)
    cli_s = run_sample_with_the_cli(RATIO_SAMPLE, RATIO_SAMPLES, tmp_path / "cli")
    assert page_s <= RATIO_LIMIT * cli_s, f"page open {page_s:.1f} s vs CLI {cli_s:.1f} s"


def test_downloads_clicked_in_quick_succession_all_arrive(page, server, tmp_path):
    """Three download buttons clicked back to back (well within a second): each file arrives whole."""
    url, _ = server
    open_app(page, url)
    go_to(page, "Export & reports")
    arrived = []
    page.on("download", lambda download: arrived.append(download))
    labels = ("Per-layer report (HTML)", "layers.csv", "Precision map (JSON)")
    buttons = [page.locator(f"{MAIN} [data-testid='stDownloadButton']").get_by_role("button", name=label)
               for label in labels]
    for button in buttons:
        _expect()(button).to_be_visible(timeout=UI_TIMEOUT_MS)
    for button in buttons:
        button.click()
    deadline = time.monotonic() + 30
    while len(arrived) < len(labels) and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    names = sorted(d.suggested_filename for d in arrived)
    assert [n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in names] == \
        sorted(["report.html", "layers.csv", "precision-map.json"]), names
    bodies = {}
    for download in arrived:
        assert download.failure() is None, (download.suggested_filename, download.failure())
        path = tmp_path / download.suggested_filename
        download.save_as(str(path))
        bodies[path.suffix] = path.read_bytes()
        assert bodies[path.suffix], download.suggested_filename
    # all three describe the run on show (whichever an earlier test left selected): its layers
    assert bodies[".csv"].splitlines()[0].startswith(b"layer,")
    layers = {line.split(b",", 1)[0].decode() for line in bodies[".csv"].splitlines()[1:] if line}
    assert layers
    assert bodies[".html"].startswith(b"<!DOCTYPE html>") and all(n.encode() in bodies[".html"] for n in layers)
    assert layers <= set(json.loads(bodies[".json"])["layers"])
    no_exception(page)


def test_upload_the_model_code_and_run_it_behind_the_trust_switch(page, server, tmp_path):
    """Weights, the .py that builds the model and calibration data uploaded in the browser: refused
    until 'I trust this code' is ticked, then analysed."""
    import io

    import numpy as np
    import torch

    import sample_models

    url, runs = server
    open_app(page, url)
    before = set(done_runs(runs))
    main = page.locator(MAIN)
    main.get_by_text("Bring your own", exact=True).click()

    def upload(label: str, name: str, body: bytes) -> None:
        box = main.locator("[data-testid='stFileUploader']").filter(has=page.get_by_text(re.compile(f"^{label}")))
        box.locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(
            files=[{"name": name, "mimeType": "application/octet-stream", "buffer": body}])
        _expect()(box.get_by_text(name)).to_be_visible(timeout=UI_TIMEOUT_MS)

    weights = io.BytesIO()
    torch.save(sample_models.load_model("mlp").state_dict(), weights)
    split = sample_models.load_split("mlp", "calibration")
    data = io.BytesIO()
    np.savez(data, inputs=split["inputs"].numpy()[:48], labels=split["labels"].numpy()[:48])
    upload("Model file", "weights.pt", weights.getvalue())
    upload("Code that builds the model", "net.py",
           b"from sample_models.models import DigitsMLP\n\n\ndef build():\n    return DigitsMLP()\n")
    upload("Calibration data", "calib.npz", data.getvalue())
    function = main.locator("[data-testid='stTextInput']").filter(
        has=page.get_by_text(re.compile(r"^Function that returns the model"))).locator("input")
    function.fill("build")
    function.press("Tab")
    main.get_by_role("button", name="Run analysis").click()
    error = main.locator(ERROR)
    _expect()(error.first).to_contain_text("I trust this code", timeout=UI_TIMEOUT_MS)
    assert set(done_runs(runs)) == before

    main.locator("[data-testid='stCheckbox']").filter(has_text="I trust this code").locator("label").click()
    main.get_by_role("button", name="Run analysis").click()
    main.get_by_role("heading", name="Results: net.py:build + weights.pt").wait_for(timeout=ANALYSIS_TIMEOUT_MS)
    wait_idle(page)
    no_error(page)
    new = set(done_runs(runs)) - before
    assert len(new) == 1
    meta = json.loads((runs / new.pop() / "meta.json").read_text())
    assert meta["inputs"]["model_spec"].endswith("/net.py:build") and meta["trials"] == 15
