"""Which data judges the allocator's candidate maps, and on what.

A map chosen by real evaluations is only as general as the split that judged it. `judging` turns an
`Evaluator` into the MeasureFn the search uses, measured on one split — the held-out evaluation
data when there is one (`--eval-data`, or a sample's evaluation split), else the calibration data
the sweep used, which the notes then say — and decides whether the task metric can judge at all:
when it is saturated on that split (FP32 accuracy 100 %), every map ties on it, so maps are judged
on output noise and the notes say so.

Output noise is reported in the sweep's units: the noise on the judging split is rescaled by the
ratio of the sweep's output signal power to that split's, so `Problem.predicted_sqnr(noise)` is the
SQNR on the judging split.
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.allocate.search import MeasureFn
from analysis.evaluate import Evaluator, metric_drop, task_metric

SPLIT_LABELS = {
    "eval-data": "the --eval-data split",
    "evaluation": "the sample's held-out evaluation split",
    "calibration": "the calibration data the sweep used",
}


@dataclass(frozen=True)
class Judging:
    measure: MeasureFn
    split: str  # one of SPLIT_LABELS
    use_metric: bool  # False: the task metric is absent or saturated; judged on output noise
    notes: tuple[str, ...]

    @property
    def judged_on(self) -> str:
        what = "task metric, then output noise" if self.use_metric else "output noise"
        return f"{what} on {SPLIT_LABELS[self.split]}"


def is_saturated(metric_name: str | None, fp32_metric: float | None) -> bool:
    """True when no quantized map can score better than another on this metric's top end: FP32
    accuracy of 100 % (a drop can then only be 0 or worse, and most maps tie at 0)."""
    return metric_name == "accuracy" and fp32_metric is not None and fp32_metric >= 100.0 - 1e-9


def judging(evaluator: Evaluator, split: str, signal: float) -> Judging:
    """A MeasureFn on `evaluator.evaluation` (the `split` it came from), with noise in units of the
    sweep's output `signal` power, and what it judges on."""
    if split not in SPLIT_LABELS:
        raise ValueError(f"unknown judging split {split!r}; use one of {', '.join(SPLIT_LABELS)}")
    data = evaluator.evaluation
    reference = evaluator.reference.double()
    split_signal = float((reference ** 2).mean()) or 1.0
    labels = data.labels.to(evaluator.reference.device) if data.labels is not None else None
    has_metric = labels is not None and evaluator.metric_name is not None

    mask = data.token_mask()  # language-model padding is not judged
    if mask is not None:
        mask = mask.to(reference.device)
        split_signal = float((reference[mask] ** 2).mean()) or 1.0

    def measure(assignment):
        output = evaluator.sim.forward(data.inputs, assignment)
        difference = output.double() - reference
        noise = float(((difference if mask is None else difference[mask]) ** 2).mean()) * signal / split_signal
        result = {"noise": noise}
        if has_metric:
            name, value = task_metric(data.task, output, labels)
            result["metric"] = value
            result["drop"] = metric_drop(name, evaluator.fp32_metric, value)
        return result

    notes = []
    if split == "calibration":
        notes.append("maps were judged on the calibration data the sweep used (no held-out split): pass "
                     "--eval-data so the choice is judged on data it was not fitted to")
    saturated = has_metric and is_saturated(evaluator.metric_name, evaluator.fp32_metric)
    if saturated:
        notes.append(f"the task metric is saturated on {SPLIT_LABELS[split]} (FP32 {evaluator.metric_name} "
                     f"{evaluator.fp32_metric:.1f} %): every map ties on it, so maps were judged on output noise")
    return Judging(measure, split, has_metric and not saturated, tuple(notes))
