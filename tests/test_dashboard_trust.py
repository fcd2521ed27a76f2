"""The dashboard's trust boundary: which hosts it answers, where uploads go and when they are used,
what code it runs, how it renders names it did not choose, and Cancel then Resume.

Each security case is tested the way an attacker would meet it: a real server subprocess with a
foreign `Host` header, folders and files planted before the dashboard writes, a run in the store
that names code nobody vouched for in this session, a layer named like a Markdown image.
"""

from __future__ import annotations

import base64
import hashlib
import html
import http.client
import io
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_strategies
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from analysis import runstore
from analysis.precision_map import MAX_MAP_BYTES, MapError, loads_map
from dashboard import hosts, launch, state, uploads
from dashboard.markup import code, escape
from tests.test_dashboard import APP, MLP_TRIALS, _env, _errors, _ok, _open, _page, _run_dirs  # noqa: F401 (_env: autouse)

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
sys.path.insert(0, str(CORPUS))
from markdown_names import IMAGE_NAME  # noqa: E402


# --- DNS rebinding: the Host check ------------------------------------------------------------------


@pytest.mark.parametrize(("header", "name"), [
    ("localhost:8501", "localhost"),
    ("LOCALHOST", "localhost"),
    ("localhost.:8501", "localhost"),
    ("127.0.0.1:8501", "127.0.0.1"),
    ("[::1]:8501", "::1"),
    ("::1", "::1"),
    ("evil.example:8501", "evil.example"),
    ("localhost:", None),  # a colon without a port
    ("localhost:85x", None),
    ("[::1]junk", None),
    ("evil example", None),
    ("", None),
    (None, None),
])
def test_host_name_of_a_header(header, name):
    assert hosts.host_name(header) == name


def test_allowed_hosts_are_loopback_the_bound_address_and_the_named_ones():
    assert hosts.allowed_hosts("127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    assert hosts.allowed_hosts("0.0.0.0") == {"localhost", "127.0.0.1", "::1"}  # a wildcard names no host
    assert hosts.allowed_hosts("10.1.2.3", ["Box.LAN"]) == {"localhost", "127.0.0.1", "::1", "10.1.2.3", "box.lan"}
    assert hosts.is_allowed("box.lan:8501", hosts.allowed_hosts("0.0.0.0", ["box.lan"]))
    assert not hosts.is_allowed("evil.box.lan", hosts.allowed_hosts("0.0.0.0", ["box.lan"]))
    for bad in ("*.lan", "box.lan:8501", "http://box.lan", "a b"):
        with pytest.raises(ValueError, match="--allow-host"):
            hosts.check_host_name(bad)


def test_cli_refuses_a_bad_allow_host_in_one_line(capsys, monkeypatch):
    from analysis.cli import main

    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: pytest.fail("the server must not start"))
    assert main(["dashboard", "--allow-host", "*.example"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("quantlens: error: --allow-host '*.example'"), err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(port: int, host: str, path: str = "/", websocket: bool = False) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Host": host}
    if websocket:  # a browser's handshake, Origin matching the Host as a rebinding page's would
        headers.update({"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), "Origin": f"http://{host}"})
    try:
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def test_server_answers_only_allowed_hosts_over_http_and_websocket(tmp_path, monkeypatch):
    """The launcher's server: 403 for `Host: evil.example` on pages, health and the WebSocket; 200 /
    101 for localhost, the bound address and an --allow-host name."""
    port = _free_port()
    monkeypatch.delenv("QUANTLENS_ALLOWED_HOSTS", raising=False)
    env = launch.environment(["box.lan"])
    env.update(QUANTLENS_AUTOSTART="0")
    server = subprocess.Popen(launch.command(port), env=env, cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _request(port, f"localhost:{port}", "/_stcore/health") == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, server.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the dashboard did not come up within 60 s"
            time.sleep(0.3)
        for host in ("evil.example", f"evil.example:{port}", f"localhost.evil.example:{port}"):
            assert _request(port, host) == 403, host
            assert _request(port, host, "/_stcore/health") == 403, host
            assert _request(port, host, "/_stcore/stream", websocket=True) == 403, host
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"box.lan:{port}"):
            assert _request(port, host) == 200, host
            assert _request(port, host, "/_stcore/stream", websocket=True) == 101, host
    finally:
        server.terminate()
        try:
            output = server.communicate(timeout=20)[0].decode()
        except subprocess.TimeoutExpired:
            server.kill()
            output = server.communicate()[0].decode()
    assert "refused a request for Host 'evil.example'" in output  # one line in the server's log


# --- uploads: a private folder, written fresh, verified by hash ----------------------------------------


def test_default_upload_folder_is_private_and_in_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("QUANTLENS_UPLOAD_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = uploads.save("calib.npz", b"data")
    root = tmp_path / "home" / ".quantlens" / "uploads"
    assert path.parent.parent == root and path.read_bytes() == b"data"
    for folder in (root, path.parent):
        info = os.lstat(folder)
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


def _plant_open_folder(path: Path) -> None:
    path.mkdir()
    path.chmod(0o777)


def _plant_link(path: Path) -> None:
    target = path.parent / "elsewhere"
    target.mkdir(mode=0o700)
    path.symlink_to(target)


def _plant_foreign_folder(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("planting a folder owned by another user needs root")
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)


@pytest.mark.parametrize(("plant", "message"), [
    (_plant_open_folder, "open to other users"),
    (_plant_link, "not a folder"),
    (_plant_foreign_folder, "belongs to user id 65534"),
])
def test_an_upload_folder_planted_by_someone_else_is_refused(tmp_path, monkeypatch, plant, message):
    root = tmp_path / "shared" / "uploads"
    root.parent.mkdir()
    plant(root)
    monkeypatch.setenv("QUANTLENS_UPLOAD_DIR", str(root))
    with pytest.raises(uploads.UploadError, match=message):
        uploads.save("model.pt2", b"the real program")
    assert not any(p.is_file() for p in root.rglob("*"))  # nothing written into it


def test_a_planted_file_of_the_same_size_is_replaced_not_reused(tmp_path):
    data = b"the real program bytes"
    digest = hashlib.sha256(data).hexdigest()
    folder = uploads.private_dir(uploads.upload_root() / digest[:16])
    planted = folder / "model.pt2"
    planted.write_bytes(b"X" * len(data))  # what the old code kept: same name, same size
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    (folder / "calib.npz").symlink_to(victim)  # a link where an upload will go

    assert uploads.save("model.pt2", data).read_bytes() == data
    written = uploads.save("calib.npz", b"npz bytes")
    assert not written.is_symlink() and written.read_bytes() == b"npz bytes"
    assert victim.read_text() == "untouched"
    uploads.verify(planted)  # ours now


def test_a_file_this_process_did_not_write_or_that_changed_is_refused(tmp_path):
    stranger = uploads.private_dir(uploads.upload_root() / "0123456789abcdef") / "model.pt2"
    stranger.write_bytes(b"planted")
    with pytest.raises(uploads.UploadError, match="not uploaded to this dashboard process"):
        uploads.verify(stranger)
    ours = uploads.save("calib.npz", b"first")
    uploads.verify(ours)
    ours.write_bytes(b"other")
    with pytest.raises(uploads.UploadError, match="changed after it was uploaded"):
        uploads.verify(ours)
    uploads.verify(tmp_path / "elsewhere.npz")  # outside the upload folder: the loader's business


def _labelled_npz(n: int = 32) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, inputs=rng.standard_normal((n, 8)).astype(np.float32), labels=rng.integers(0, 4, n))
    return buffer.getvalue()


def test_dashboard_upload_into_an_open_folder_is_refused_in_one_line(tmp_path, monkeypatch):
    _plant_open_folder(tmp_path / "open")
    monkeypatch.setenv("QUANTLENS_UPLOAD_DIR", str(tmp_path / "open"))
    monkeypatch.setenv("QUANTLENS_AUTOSTART", "0")
    at = _open(tmp_path)
    at.radio(key="md_source").set_value("upload").run()
    at.text_input(key="md_factory").set_value(f"{CORPUS / 'tiny.py'}:make")
    at.checkbox(key="md_trust").set_value(True)
    at.file_uploader(key="md_calib_file").upload("calib.npz", _labelled_npz())
    at.button(key="md_run").click().run()
    _ok(at)
    errors = _errors(at)
    assert len(errors) == 1 and "open to other users" in errors[0], errors
    assert not (tmp_path / "runs").exists() or not _run_dirs(tmp_path)


# --- code: loaded only when named in this session with "I trust this code" ----------------------------


FACTORY = """import pathlib
import torch
from torch import nn

def build():
    pathlib.Path(__file__).with_name("ran").write_text("the factory ran")
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
"""


def _stored_run(tmp_path: Path, inputs: runstore.Inputs, status: str = "cancelled") -> str:
    from analysis.config import AnalysisConfig

    config = AnalysisConfig(num_samples=32, weight_formats=("int8",), act_formats=())
    run_id, path = runstore.create_run(state.runs_dir(), inputs, state._config_json(config))
    runstore.write_meta(path, status=status)
    return run_id


def _select(at: AppTest, run_id: str) -> AppTest:
    at.session_state.run_id = run_id
    at.run()
    _ok(at)
    return at


def test_a_stored_run_naming_code_runs_nothing_until_trusted_in_this_session(tmp_path):
    """A run folder (copied in, or from an earlier session) names a factory: Resume refuses until the
    user ticks the sidebar's trust box for it; then it runs."""
    factory = tmp_path / "net.py"
    factory.write_text(FACTORY)
    data = tmp_path / "calib.npz"
    data.write_bytes(_labelled_npz())
    run_id = _stored_run(tmp_path, runstore.Inputs(f"{factory}:build", str(data), label="net"))

    at = _select(_open(tmp_path), run_id)
    at.button(key="resume_run").click().run()
    _ok(at)
    errors = _errors(at)
    assert len(errors) == 1 and "runs Python code and was not named in this session" in errors[0], errors
    assert not (tmp_path / "ran").exists()  # not imported, not called
    assert state.get_run(run_id).status == "cancelled"

    at.checkbox(key=f"trust_run_{run_id}").check().run()
    _ok(at)
    at.button(key="resume_run").click().run()
    _ok(at)
    assert (tmp_path / "ran").exists() and state.get_run(run_id).status == "done"



def test_trusted_code_is_refused_once_it_changes(tmp_path):
    factory = tmp_path / "net.py"
    factory.write_text(FACTORY)
    trusted = uploads.TrustedCode()
    with pytest.raises(uploads.UploadError, match="not named in this session"):
        trusted.check(f"{factory}:build")
    trusted.trust(f"{factory}:build")
    trusted.check(f"{factory}:build")
    assert f"{factory}:build" in trusted and "sample:mlp" in trusted  # samples are not user code
    factory.write_text(FACTORY + "# edited\n")
    with pytest.raises(uploads.UploadError, match="changed since you trusted it"):
        trusted.check(f"{factory}:build")


def test_a_pt2_in_the_upload_folder_that_this_process_did_not_write_is_never_loaded(tmp_path):
    """The planted-.pt2 attack: a run naming a program in the upload folder. Even with the trust box
    ticked, the dashboard refuses a file it did not write in this process."""
    planted = uploads.private_dir(uploads.upload_root() / "0123456789abcdef") / "model.pt2"
    planted.write_bytes((CORPUS / "random_bytes.pt2").read_bytes())
    run_id = _stored_run(tmp_path, runstore.Inputs(str(planted), str(CORPUS / "good.npz"), label="model.pt2"))
    at = _select(_open(tmp_path), run_id)
    at.checkbox(key=f"trust_run_{run_id}").check().run()
    _ok(at)
    errors = _errors(at)
    assert len(errors) == 1 and "not uploaded to this dashboard process" in errors[0], errors
    assert at.checkbox(key=f"trust_run_{run_id}").value is False  # not trusted, not shown as ticked
    at.button(key="resume_run").click().run()
    _ok(at)
    assert any("not named in this session" in e for e in _errors(at)), _errors(at)
    assert state.get_run(run_id).status == "cancelled"


def test_the_trust_switch_says_what_runs_code(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLENS_AUTOSTART", "0")
    at = _open(tmp_path)
    at.radio(key="md_source").set_value("upload").run()
    assert ".pt2 programs and .py files run Python code" in at.checkbox(key="md_trust").label
    assert any("runs Python that torch generates" in c.value and "only from a file you name here" in c.value
               for c in at.caption)


# --- Markdown in names ------------------------------------------------------------------------------


_MD = MarkdownIt("commonmark").enable("table").enable("strikethrough")


def _rendered_markdown(at: AppTest) -> list[str]:
    """Every string of the page that Streamlit renders as Markdown: bodies, captions, alerts,
    toasts, progress texts, labels and help texts."""
    texts = []

    def walk(node) -> None:
        proto = getattr(node, "proto", None)
        for name in ("body", "label", "text", "help"):
            value = getattr(proto, name, None) if proto is not None else None
            if isinstance(value, str) and value:
                texts.append(value)
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at.main)
    walk(at.sidebar)
    texts += [toast.value for toast in at.toast]
    return texts


def _links_and_images(text: str) -> list[str]:
    found = []
    for token in _MD.parse(text):
        for inline in [token, *(token.children or [])]:
            if inline.type in ("image", "link_open", "html_inline", "html_block", "autolink"):
                found.append(f"{inline.type} in {text!r}")
    if "http://" in text or "www." in text:  # GFM turns bare URLs into links
        found.append(f"bare URL in {text!r}")
    return found


def test_escape_is_literal_markdown():
    for raw in (IMAGE_NAME, "[a](http://x)", "<img src=http://x>", "**b** _c_ `d` $e$ :red[f] :material/home:",
                "a\nb", "www.evil.example", "# h", "| t |"):
        html = _MD.render(escape(raw))
        assert not _links_and_images(escape(raw)), raw
        assert "<img" not in html and "<a " not in html and "<strong>" not in html and "<code>" not in html
    assert _MD.render(escape(IMAGE_NAME)).strip() == f"<p>{IMAGE_NAME}</p>"  # shown exactly as written
    assert _MD.render(escape("a\nb")).strip() == "<p>a b</p>"
    assert code("/runs/x") == "`/runs/x`" and code("a`b") == escape("a`b")


_TEXT = st_strategies.lists(st_strategies.one_of(
    st_strategies.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
    st_strategies.sampled_from(list("![]()<>*_`~$:|#+-=.\\&/ \t") + [
        "http://", "www.", ":red[", ":material/", "&amp;", "    ", "![x](", "](http://h/x)", "<img ", "1. "]),
), max_size=40).map("".join)


@settings(max_examples=150, deadline=None)
@given(_TEXT)
def test_escaped_text_renders_as_itself_and_nothing_else(text):
    """Any one-line text, escaped, renders (CommonMark) to exactly that text, trimmed, in one
    paragraph: no link, image, HTML, emphasis, code or heading."""
    rendered = _MD.render(escape(text)).strip()
    expected = text.strip()
    if not expected:
        assert rendered == ""
        return
    assert rendered.startswith("<p>") and rendered.endswith("</p>"), rendered
    assert html.unescape(rendered[3:-4]) == expected
    assert not _links_and_images(escape(text))


def test_names_that_are_markdown_render_as_text_on_every_page(tmp_path, monkeypatch):
    """A layer named ![x](http://host/x), a data file named like a link: no page produces an image
    or a link from them (the browser would fetch http://host/x on every view)."""
    monkeypatch.setenv("QUANTLENS_AUTOSTART", "0")
    at = _open(tmp_path)
    at.radio(key="md_source").set_value("upload").run()
    at.text_input(key="md_factory").set_value(f"{CORPUS / 'markdown_names.py'}:make")
    at.checkbox(key="md_trust").set_value(True)
    at.file_uploader(key="md_calib_file").upload("[d](http://host/d).npz", (CORPUS / "good.npz").read_bytes())
    at.multiselect(key="md_weights").set_value(["int8"])
    at.button(key="md_run").click().run()
    _ok(at)
    assert not _errors(at), _errors(at)
    assert state.current_run() is not None or at.session_state.run_id

    seen: list[str] = []
    for page in ("model_data", "sensitivity", "layer_detail", "mixed_precision", "recover", "export"):
        at.session_state.selected_layer = IMAGE_NAME
        _page(at, page)
        seen += _rendered_markdown(at)
    offending = [hit for text in seen for hit in _links_and_images(text)]
    assert not offending, offending
    shown = " ".join(_MD.render(text) for text in seen)
    assert IMAGE_NAME in shown and "[d](http://host/d).npz" in shown  # present, as text


# --- Cancel, then Resume ------------------------------------------------------------------------------


def test_cancel_then_resume_finishes_the_run_and_keeps_trials(tmp_path, monkeypatch):
    """Cancel pressed during the run (trials kept): Resume in the sidebar finishes the run with every
    trial, running only the rest."""
    from analysis.loading import load_data, load_model
    from analysis.sweep import AnalysisConfig
    from tests.test_dashboard import StopAfter

    monkeypatch.setenv("QUANTLENS_AUTOSTART", "0")  # the cancelled run is the one to land on
    inputs, config = state.sample_inputs("mlp"), AnalysisConfig(num_samples=64)
    run_id, path = runstore.create_run(state.runs_dir(), inputs, state._config_json(config))
    job = state.Job(run_id, path, inputs, config, load_model("sample:mlp"), load_data("sample:mlp"))
    job.stop = StopAfter(job, 3)
    job.run()
    assert job.phase == "cancelled" and state.get_run(run_id).status == "cancelled"
    kept = len(job.trials)
    assert kept == 3

    state.JOBS[run_id] = job
    at = _open(tmp_path)
    at.session_state.job_id = run_id  # the session that pressed Cancel
    _select(at, run_id)
    assert len(_run_dirs(tmp_path)) == 1
    notice = "was cancelled; its finished trials are kept (resume it from the sidebar)"
    assert any(notice in i.value for i in at.info), [i.value for i in at.info]
    at.button(key="resume_run").click().run()
    _ok(at)
    assert not _errors(at), _errors(at)
    assert state.get_run(run_id).status == "done" and at.session_state.run_id == run_id
    resumed = state.JOBS[run_id]
    assert resumed.phase == "done" and len(resumed.trials) == MLP_TRIALS
    assert resumed.meta()["progress"]["total"] == MLP_TRIALS - kept  # only the rest ran (64 samples: one chunk)
    _page(at, "sensitivity")
    assert len(at.dataframe(key="sens_table").value) == MLP_TRIALS


# --- maps and run files opened from the dashboard obey the CLI's refusals -------------------------------


def test_map_uploads_are_read_by_the_engine(tmp_path):
    from dashboard import derived

    with pytest.raises(MapError, match="YAML aliases"):
        derived.load_map_upload((CORPUS / "map_yaml_aliases.yaml").read_bytes(), "bomb.yaml", None)
    big = b'{"layers": {}, "pad": "' + b"x" * MAX_MAP_BYTES + b'"}'
    with pytest.raises(MapError, match="at most 16 MiB"):
        derived.load_map_upload(big, "big.json", None)
    with pytest.raises(MapError, match="at most 16 MiB"):
        loads_map(big, "big.json")


def test_fifos_in_place_of_run_files_do_not_hang_the_dashboard(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLENS_AUTOSTART", "0")
    store = tmp_path / "runs"
    (store / "20240101-000000-fifo-meta").mkdir(parents=True)
    os.mkfifo(store / "20240101-000000-fifo-meta" / "meta.json")
    (store / "20240101-000000-fifo-meta" / "run.json").write_text("{}")
    fifo_result = store / "20240102-000000-fifo-analysis"
    fifo_result.mkdir()
    runstore.write_json_atomic(fifo_result / "meta.json", {"status": "done", "model": "m", "created": 1.0})
    os.mkfifo(fifo_result / "analysis.json")

    at = AppTest.from_file(APP, default_timeout=60).run()
    _ok(at)
    assert {r.id for r in state.list_runs()} == {"20240101-000000-fifo-meta", "20240102-000000-fifo-analysis"}
    _select(at, fifo_result.name)
    _page(at, "sensitivity")
    assert any("analysis.json is not a regular file" in e for e in _errors(at)), _errors(at)
