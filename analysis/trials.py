"""What a sweep runs and what it keeps per trial: the plan of (layer, target, format) trials, each
trial's running sums over the chunks of samples (`TrialSums`, JSON-ready through `state()`), one
chunk's sums as a data-parallel worker returns them (`ChunkPartial`), and the row the sums become
(`finish_trial`). `analysis.sweep` runs the trials; `analysis.sweep_state` checkpoints their sums."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from analysis.config import AnalysisConfig
from analysis.estimate import NoiseEstimate
from analysis.formats import Format
from analysis.layers import Layer
from analysis.metrics import ErrorAccumulator, ErrorHistogram, UpdateLog
from analysis.results import Histogram, TrialResult, trial_format

__all__ = ["ChunkPartial", "Trial", "TrialKey", "TrialSums", "finish_trial", "one_line", "plan_trials", "trial_label"]

TrialKey = tuple[str, str, str]  # Trial.key / TrialResult.key: (layer, target, format label)


@dataclass(frozen=True)
class Trial:
    layer: str
    target: str
    weight_format: Format | None
    act_format: Format | None

    @property
    def names(self) -> tuple[str | None, str | None]:
        return (
            self.weight_format.name_for("weight") if self.weight_format else None,
            self.act_format.name_for("activation") if self.act_format else None,
        )

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.layer, self.target, trial_label(self))


def plan_trials(layers: list[Layer], config: AnalysisConfig) -> list[Trial]:
    """Layer-major order, so a layer's quantized weights are computed once and reused."""
    weight_formats, act_formats = config.parsed_weight_formats(), config.parsed_act_formats()
    trials = []
    for layer in layers:
        if "weights" in config.targets:
            trials += [Trial(layer.name, "weights", wf, None) for wf in weight_formats]
        if layer.quantizable_input:
            if "activations" in config.targets:
                trials += [Trial(layer.name, "activations", None, af) for af in act_formats]
            if "both" in config.targets:
                trials += [Trial(layer.name, "both", wf, af) for wf in weight_formats for af in act_formats]
    return trials


@dataclass
class TrialSums:
    """One trial's running sums. Everything stays on the device until `finish_trial` reads it back."""

    local: ErrorAccumulator | UpdateLog  # an UpdateLog on one chunk of a data-parallel sweep
    output: ErrorAccumulator | None  # exact output metrics
    estimate: NoiseEstimate | None = None  # estimated output metrics (analysis.estimate)
    error_histogram: ErrorHistogram = field(default_factory=ErrorHistogram)
    failure: str | None = None

    def state(self) -> dict[str, Any]:
        """Plain numbers (JSON-ready, exact through `json`): what `from_state` rebuilds these sums from."""
        return {"local": self.local.state(), "output": None if self.output is None else self.output.state(),
                "estimate": None if self.estimate is None else self.estimate.state(),
                "error_histogram": self.error_histogram.state(), "failure": self.failure}

    @classmethod
    def from_state(cls, state: Any, mode: str, logits: bool) -> TrialSums:
        """The sums `state()` described, for a trial measured in output-metrics `mode`; ValueError
        (one line) for anything else."""
        keys = {"local", "output", "estimate", "error_histogram", "failure"}
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"a trial's sums need the keys {', '.join(sorted(keys))}")
        if (state["output"] is None) == (mode == "exact") or (state["estimate"] is None) == (mode == "estimated"):
            raise ValueError(f"a trial's sums are not those of output metrics {mode!r}")
        if state["failure"] is not None and not isinstance(state["failure"], str):
            raise ValueError("a trial's failure must be a message or null")
        output = None if state["output"] is None else ErrorAccumulator.from_state(state["output"])
        if output is not None and output.logits != logits:
            raise ValueError("a trial's output sums were taken with another reading of the outputs (logits)")
        return cls(ErrorAccumulator.from_state(state["local"]), output,
                   None if state["estimate"] is None else NoiseEstimate.from_state(state["estimate"]),
                   ErrorHistogram.from_state(state["error_histogram"]), state["failure"])


@dataclass(frozen=True)
class ChunkPartial:
    """One trial's sums over one chunk of samples, from fresh accumulators: what a data-parallel
    worker returns (`Sweep.chunk_partials`); `Sweep.merge_chunks` folds every chunk's, in chunk
    order, into the row `Sweep.run` writes."""

    key: tuple[str, str, str]
    local: UpdateLog
    output: UpdateLog | None  # exact output metrics
    estimate: NoiseEstimate | None  # estimated output metrics
    error_histogram: ErrorHistogram
    failure: str | None


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def trial_label(trial: Trial) -> str:
    return trial_format(trial.target, *trial.names)


def finish_trial(trial: Trial, acc: TrialSums) -> TrialResult:
    weight_name, act_name = trial.names
    if acc.failure is None:
        try:
            # Also where NaN/Inf seen by any update surfaces: the accumulators defer that check to
            # result() so that updates never wait for the device.
            local, output = acc.local.result(), acc.output.result() if acc.output is not None else None
        except Exception as exc:  # noqa: BLE001 — a trial whose sums are unusable is a failed trial
            acc.failure = one_line(exc)
    if acc.failure is not None:
        return TrialResult(trial.layer, trial.target, weight_name, act_name, error=acc.failure)
    counted = acc.error_histogram.result()
    histogram = Histogram(*counted) if counted is not None else None
    if acc.estimate is not None:
        try:
            output = acc.estimate.result()
        except Exception as exc:  # noqa: BLE001
            return TrialResult(trial.layer, trial.target, weight_name, act_name, error=one_line(exc))
    source = None if output is None else ("estimated" if acc.estimate is not None else "exact")
    return TrialResult(
        trial.layer, trial.target, weight_name, act_name,
        local=local, output=output, error_histogram=histogram, output_source=source,
    )
