"""Start the dashboard server: `quantlens dashboard` calls `main`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


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


def main(port: int = 8501, address: str = "127.0.0.1") -> int:
    """Run the dashboard until interrupted; returns streamlit's exit status."""
    print(f"quantlens dashboard on http://{address}:{port} (Ctrl+C to stop)", file=sys.stderr)
    try:
        return subprocess.call(command(port, address))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
