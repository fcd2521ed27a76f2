"""Start the dashboard server: `quantlens dashboard` calls `main`.

The server runs `dashboard/serve.py`: the pages of `dashboard/app.py` behind the Host check of
`dashboard.hosts` (DNS rebinding), which answers localhost, the bound address and the names given
with `allow_hosts` (`--allow-host`) or QUANTLENS_ALLOWED_HOSTS.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from dashboard.hosts import check_host_name
from dashboard.settings import extra_allowed_hosts

APP = Path(__file__).resolve().parent / "serve.py"


def command(port: int = 8501, address: str = "127.0.0.1") -> list[str]:
    """The streamlit command line (server options on the command line: a config.toml inside the
    package is not read, streamlit only reads the working directory's)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", str(address),
        "--server.port", str(int(port)),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--server.maxUploadSize", "200",
        "--server.enableXsrfProtection", "true",
        "--client.toolbarMode", "minimal",  # no "Deploy" button: this is a local tool
    ]


def environment(allow_hosts: Iterable[str] = ()) -> dict[str, str]:
    """The server's environment: QUANTLENS_ALLOWED_HOSTS extended with `allow_hosts` (checked:
    ValueError, one line, for anything that is not a host name or IP address)."""
    names = [check_host_name(name) for name in (*extra_allowed_hosts(), *allow_hosts)]
    env = dict(os.environ)
    if names:
        env["QUANTLENS_ALLOWED_HOSTS"] = ",".join(dict.fromkeys(names))
    return env


def main(port: int = 8501, address: str = "127.0.0.1", allow_hosts: Iterable[str] = ()) -> int:
    """Run the dashboard until interrupted; returns streamlit's exit status."""
    import streamlit as st

    if not hasattr(st, "App"):  # serve.py needs st.App to put the Host check in front of the pages
        raise ValueError(f"streamlit {st.__version__} cannot serve the dashboard behind its Host check; "
                         "upgrade it: pip install -U 'streamlit>=1.67'")
    env = environment(allow_hosts)
    print(f"quantlens dashboard on http://{address}:{port} (Ctrl+C to stop)", file=sys.stderr)
    try:
        return subprocess.call(command(port, address), env=env)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
