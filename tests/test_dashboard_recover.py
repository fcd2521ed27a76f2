"""The Recover page, driven headless with Streamlit's AppTest: remedies and QAT on one table."""

from __future__ import annotations

import pytest

from tests.test_dashboard import _env, _errors, _ok, _open, _page, _table, template_runs  # noqa: F401 — fixtures


def test_recover_compares_remedies_and_qat_for_a_chosen_map(tmp_path, template_runs):  # noqa: F811
    at = _page(_open(tmp_path, template_runs), "recover")
    assert not _errors(at)
    options = at.selectbox(key="rc_map").options
    assert "uniform int4/int8" in options
    at.selectbox(key="rc_map").set_value("uniform int4/int8")
    at.number_input(key="rc_epochs").set_value(2)
    at.number_input(key="rc_lr").set_value(1e-3)
    at.button(key="rc_run").click().run(timeout=300)
    _ok(at)
    assert not _errors(at)
    table = _table(at, "PTQ drop recovered")
    remedies = list(table["remedy"])
    assert remedies[0].startswith("PTQ") and remedies[-1].startswith("QAT")
    assert any(r.startswith("weight clipping") for r in remedies) and "SmoothQuant (alpha 0.5)" in remedies
    ptq, qat = table.iloc[0], table.iloc[-1]
    assert ptq["PTQ drop recovered"] == pytest.approx(0.0) and ptq["drop (points)"] > 0
    # Keep-best: the QAT row never ends below PTQ, and its share is computed from the two drops.
    assert qat["task metric"] >= ptq["task metric"]
    assert qat["PTQ drop recovered"] == pytest.approx((ptq["drop (points)"] - qat["drop (points)"]) / ptq["drop (points)"])
    labels = {m.label: m.value for m in at.metric}
    assert labels["PTQ drop"] == f"{ptq['drop (points)']:.2f} points"
    assert any("held out for validation" in c.value for c in at.caption)
