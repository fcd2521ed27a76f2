"""`quantlens suggest` with deployment groups, an evaluation budget and the judging split."""

import json
import re

import pytest

from tests.test_cli import FAST, mlp_run, run_cli  # noqa: F401 — the shared sample run and CLI helper


def test_custom_group_is_honoured_and_recorded_in_the_map(mlp_run, capsys, tmp_path):
    out = tmp_path / "map.json"
    code, text, _ = run_cli(capsys, "suggest", str(mlp_run), "--budget", "avg-bits=6", "--group", "fc[12]",
                            "--evaluations", "5", "--front-points", "0", "--out", str(out))
    assert code == 0 and "1 deployment group(s) share one format each: fc1, fc2" in text
    pmap = json.loads(out.read_text())
    assert pmap["groups"] == [["fc1", "fc2"]]
    assert pmap["layers"]["fc1"] == pmap["layers"]["fc2"]
    assert any("judged on" in note and "held-out evaluation split" in note for note in pmap["notes"])
    assert "after" in text and "evaluation(s)" in text


def test_evaluation_budget_is_kept(mlp_run, capsys, tmp_path):
    code, text, _ = run_cli(capsys, "suggest", str(mlp_run), "--budget", "avg-bits=5", "--evaluations", "3",
                            "--front-points", "0", "--out", str(tmp_path / "m.json"))
    spent = re.search(r"after (\d+) evaluation\(s\)", text)
    assert code == 0 and spent and 1 <= int(spent.group(1)) <= 3


@pytest.mark.parametrize("argv,needle", [
    (["--group", "nothing*"], "matches no layer"),
    (["--evaluations", "0"], "--evaluations 0"),
    (["--keep", "bf16"], "no bf16 trial"),
])
def test_bad_suggest_options_are_one_line_errors(mlp_run, capsys, tmp_path, argv, needle):
    code, _, err = run_cli(capsys, "suggest", str(mlp_run), "--budget", "avg-bits=5", "--no-measure",
                           "--out", str(tmp_path / "m.json"), *argv)
    lines = [l for l in err.strip().splitlines() if not l.startswith("W1")]
    assert code != 0 and len(lines) == 1 and needle in lines[0]
