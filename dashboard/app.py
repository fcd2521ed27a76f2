"""quantlens dashboard entry point: `streamlit run dashboard/app.py` (or `quantlens dashboard`).

Thin by design: pages parse what the user asks for, call `analysis`, and display the result.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# `streamlit run dashboard/app.py` puts dashboard/ on sys.path, not the repository root; an
# editable install makes `analysis` importable anyway, this covers a plain checkout.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from dashboard import state, widgets  # noqa: E402
from dashboard.markup import escape  # noqa: E402

st.set_page_config(layout="wide", page_title="quantlens", page_icon=":material/troubleshoot:")

PAGES = [
    st.Page("views/model_data.py", title="Model & data", icon=":material/upload_file:", default=True),
    st.Page("views/sensitivity.py", title="Sensitivity", icon=":material/bar_chart:"),
    st.Page("views/layer_detail.py", title="Layer detail", icon=":material/zoom_in:"),
    st.Page("views/mixed_precision.py", title="Mixed precision", icon=":material/tune:"),
    st.Page("views/recover.py", title="Recover", icon=":material/healing:"),
    st.Page("views/export.py", title="Export & reports", icon=":material/download:"),
]


def main() -> None:
    state.init_session()
    state.acknowledge_job()
    try:
        state.maybe_autostart()
    except Exception as exc:  # noqa: BLE001 — a broken sample must not stop the app
        st.session_state.notices.append(("error", f"Could not analyse the bundled sample: {escape(state.one_line(exc))}"))
    page = st.navigation(PAGES)
    widgets.sidebar()
    widgets.notices()
    try:
        page.run()
    except Exception as exc:  # noqa: BLE001 — one line, never a traceback; session results are kept
        st.error(f"This page hit a problem: {escape(state.one_line(exc))}")


main()
