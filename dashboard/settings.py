"""Dashboard settings read from the environment, and the one-line error message a user sees.

Plain functions with no Streamlit in them, read at call time (tests change the environment between
cases): both the session state (`dashboard.state`) and the background jobs (`dashboard.jobs`) need
them, and the jobs must not import Streamlit.

Environment:
    QUANTLENS_RUNS_DIR          where runs are kept (default ~/.quantlens/runs)
    QUANTLENS_SYNC_JOBS=1       run analyses inline in the script run (tests)
    QUANTLENS_DEFAULT_SAMPLE    bundled sample analysed on first open (default cnn)
    QUANTLENS_DEFAULT_SAMPLES   calibration samples of a new analysis (default 256)
    QUANTLENS_AUTOSTART=0       do not analyse the bundled sample on first open
    QUANTLENS_UPLOAD_DIR        where uploaded files are written (default: a private per-user folder,
                                see `dashboard.uploads`)
    QUANTLENS_ALLOWED_HOSTS     extra host names the server answers, comma-separated (see
                                `dashboard.hosts`; `quantlens dashboard --allow-host` sets it)
"""

from __future__ import annotations

import os
from pathlib import Path


def runs_dir() -> Path:
    return Path(os.environ.get("QUANTLENS_RUNS_DIR") or "~/.quantlens/runs").expanduser()


def sync_jobs() -> bool:
    return os.environ.get("QUANTLENS_SYNC_JOBS", "").strip().lower() not in ("", "0", "false", "no")


def autostart_enabled() -> bool:
    return os.environ.get("QUANTLENS_AUTOSTART", "1").strip().lower() not in ("0", "false", "no")


def default_sample() -> str:
    return os.environ.get("QUANTLENS_DEFAULT_SAMPLE", "cnn").strip() or "cnn"


def default_samples() -> int:
    try:
        return max(1, int(os.environ.get("QUANTLENS_DEFAULT_SAMPLES", "256")))
    except ValueError:
        return 256


def upload_dir() -> Path:
    """Where uploads go (dashboard.uploads makes it private and checks it before every use)."""
    return Path(os.environ.get("QUANTLENS_UPLOAD_DIR") or "~/.quantlens/uploads").expanduser()


def extra_allowed_hosts() -> tuple[str, ...]:
    return tuple(name.strip() for name in os.environ.get("QUANTLENS_ALLOWED_HOSTS", "").split(",") if name.strip())


def one_line(exc: BaseException) -> str:
    """The message a user sees: one line, library noise removed; unexpected errors name their type."""
    from analysis.loading import LoadError

    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    if isinstance(exc, (LoadError, ValueError, KeyError, FileNotFoundError)) and text:
        return text.strip("'\"") if isinstance(exc, KeyError) else text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
