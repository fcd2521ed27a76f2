"""Analysis runs on disk: results are written as trials finish, so nothing is lost to a crash.

Layout of an output directory:
    run.json       the config and model/data fingerprints, written before the first trial
    trials.jsonl   one finished trial per line, appended and flushed as it completes
    analysis.json  everything, written at the end;  layers.csv  one row per trial

`--resume` reads trials.jsonl, skips the finished trials and runs the rest; the final files are the
same bytes a clean run writes, because trials are stored losslessly (JSON floats round-trip) and
reassembled in plan order.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from analysis.data import Dataset
from analysis.results import AnalysisResult, TrialResult, _jsonable, _trial
from analysis.config import RESULT_NEUTRAL, AnalysisConfig
from analysis import provenance as provenance_mod
from analysis.quantsim import ProgressFn
from analysis.sweep import Sweep

RUN_SCHEMA = "quantlens.run/1"


class ResumeError(ValueError):
    """The directory holds a run that cannot be continued with these inputs."""


def _fingerprint(model: Any) -> str:
    from analysis.loading import model_fingerprint

    return model_fingerprint(model)


def analyze_to_directory(
    model: Any, data: Dataset, config: AnalysisConfig, out: str | Path, *, resume: bool = False,
    progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
    on_result: Callable[[TrialResult], None] | None = None,
    model_spec: str | None = None, data_spec: str | None = None, weights: str | None = None,
) -> AnalysisResult:
    """Run the sweep, streaming each finished trial to `out/trials.jsonl`, then write the final files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(model, data, config, progress=progress, should_stop=should_stop)
    header = {
        "schema": RUN_SCHEMA,
        "config": _jsonable(_result_config(config)),
        "model_fingerprint": _fingerprint(model),
        "data_fingerprint": sweep.data.fingerprint(),
    }
    # Absolute paths and the weights' content hash: a later `suggest` from any directory reloads
    # exactly this model, or refuses.
    provenance = provenance_mod.record(model_spec, weights, data_spec, model_fingerprint=header["model_fingerprint"],
                        data_fingerprint=header["data_fingerprint"])
    finished: dict[tuple[str, str, str], TrialResult] = {}
    run_file, trials_file = out / "run.json", out / "trials.jsonl"
    if resume and not run_file.exists():
        raise ResumeError(f"nothing to resume in {out}: no run.json there; drop --resume to start a new run")
    if resume:
        previous = json.loads(run_file.read_text())
        for key in ("config", "model_fingerprint", "data_fingerprint"):
            if previous.get(key) != header[key]:
                raise ResumeError(
                    f"the run in {out} was made with a different {key.replace('_', ' ')}; "
                    "drop --resume to start over, or use another --out directory"
                )
        planned = {t.key for t in sweep.plan()}
        # Only trials of this plan: a line from another run or plan is not ours to reuse.
        finished = {t.key: t for t in _read_trials(trials_file) if t.key in planned}
        # Rewrite without a line the crash cut short, so appended trials start on a clean line.
        trials_file.write_text("".join(json.dumps(_jsonable(asdict(t)), allow_nan=False) + "\n" for t in finished.values()))
    else:
        run_file.write_text(json.dumps(header, indent=1))
        trials_file.write_text("")

    with trials_file.open("a") as sink:
        def record(trial: TrialResult) -> None:
            sink.write(json.dumps(_jsonable(asdict(trial)), allow_nan=False) + "\n")
            sink.flush()
            os.fsync(sink.fileno())  # a kill -9 right after must not lose this trial
            if on_result:
                on_result(trial)

        result = sweep.run(on_result=record, skip=set(finished))

    order = {t.key: i for i, t in enumerate(sweep.plan())}
    merged = sorted([*finished.values(), *result.trials], key=lambda t: order.get(t.key, len(order)))
    result = replace(
        result,
        trials=tuple(merged),
        model={**result.model, **provenance.to_dict(), "spec": provenance.model_spec,
               "fingerprint": header["model_fingerprint"]},
        data={**result.data, "spec": provenance.data_spec},
    )
    write_outputs(result, out)
    return result


def _result_config(config: AnalysisConfig) -> dict[str, Any]:
    """The config as it decides results: options that only change memory or speed are left out,
    so a run resumed with another --cache-mb or device continues."""
    payload = config.to_dict()
    for key in RESULT_NEUTRAL:
        payload.pop(key, None)
    return payload


def write_outputs(result: AnalysisResult, out: Path) -> None:
    result.save(out / "analysis.json")
    result.to_frame().to_csv(out / "layers.csv", index=False)


def _read_trials(path: Path) -> list[TrialResult]:
    trials = []
    if not path.exists():
        return trials
    for line in path.read_text().splitlines():
        try:
            trials.append(_trial(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut short by the crash: that trial simply runs again
    return trials
