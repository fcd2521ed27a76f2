"""The README's shell command blocks run as written, top to bottom, in a fresh copy of the repository.

The copy holds the files git knows (tracked, and new ones not ignored): what a clone has, without
build outputs or earlier `out/` folders. `quantlens` is the console script `make setup` installs; here
it runs this checkout's `python -m analysis.cli` (the installed script may point at another
checkout). Left out, with the reason: the block of `make run` / `make test` (the set-up, a server
that runs until stopped, and this very suite). `quantlens dashboard` serves until stopped: it is
started on a free port instead of 8501 (which another server on the machine may hold), checked to
answer, then stopped.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINE_TIMEOUT_S = 600


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, blank lines dropped."""
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def fresh_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_parsing_of_the_blocks():
    text = "intro\n```bash\na --x \\\n    --y\n\nb  # note\n```\n```python\nc\n```\n"
    assert [commands(b) for b in bash_blocks(text)] == [["a --x      --y", "b  # note"]]


@pytest.mark.slow
def test_readme_command_blocks_run_top_to_bottom(tmp_path):
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in bash_blocks(readme) if "make run" not in b]  # the set-up and the suite itself
    lines = [line for block in blocks for line in commands(block)]
    assert any(line.startswith("quantlens analyze") for line in lines), "the command list went missing"
    clone = fresh_copy(tmp_path / "clone")
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "quantlens").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m analysis.cli \"$@\"\n")
    (shims / "python").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTLENS_")}
    env.update(PATH=f"{shims}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(clone),
               QUANTLENS_RUNS_DIR=str(tmp_path / "runs"), QUANTLENS_UPLOAD_DIR=str(tmp_path / "uploads"))
    for line in lines:
        if line.startswith("quantlens dashboard"):
            _serve_briefly(line, clone, env)
            continue
        started = time.monotonic()
        done = subprocess.run(["bash", "-c", line], check=False, cwd=clone, env=env, capture_output=True, text=True,
                              timeout=LINE_TIMEOUT_S)
        assert done.returncode == 0, f"{line}\n(exit {done.returncode} after {time.monotonic() - started:.0f} s)\n" \
                                     f"{done.stderr[-2000:]}"


def _serve_briefly(line: str, cwd: Path, env: dict) -> None:
    port = _free_port()
    line = re.sub(r"--port \d+", f"--port {port}", line)
    proc = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"{line} exited: {proc.stderr.read().decode()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5) as response:
                    if response.read().decode().strip() == "ok":
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{line}: no answer on port {port} after 120 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
