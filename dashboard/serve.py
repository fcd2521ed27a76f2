"""The dashboard as `quantlens dashboard` serves it: `dashboard/app.py` behind the Host check.

`streamlit run dashboard/serve.py` finds the `st.App` below and serves it with uvicorn; the
`HostGuard` middleware (`dashboard.hosts`) runs before Streamlit's own on every HTTP request and
WebSocket handshake. `streamlit run dashboard/app.py` would serve the same pages without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # a plain checkout, as in app.py
    sys.path.insert(0, _ROOT)

from dashboard.hosts import HostGuard  # noqa: E402

app = st.App(str(Path(__file__).resolve().parent / "app.py"), middleware=[Middleware(HostGuard)])
