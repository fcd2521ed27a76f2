"""Apply a precision map and evaluate it: task metric, output error vs FP32, size and speed.

The simulated path runs exactly the quantizers and calibrated ranges the sweep measured with (the
same `QuantSim` configuration), so a map's evaluation and its prediction are comparable. The real path
(analysis.real) runs the same map on torchao's low-precision CPU kernels.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from analysis import costs
from analysis.data import Dataset, check_labels
from analysis.finite import all_finite
from analysis.formats import Format
from analysis.metrics import ErrorAccumulator, ErrorStats, accuracy, perplexity
from analysis.precision_map import PrecisionMap, uniform_map
from analysis.config import QuantConfig
from analysis.hooks import engine_simulator
from analysis.quantsim import QuantSim

DEFAULT_BASELINES = (("int8", "int8"), ("int4", "int8"), ("int8", None), ("int4", None))


def task_metric(task: str, logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[str | None, float | None]:
    """(name, value): accuracy in % for classifiers, perplexity for language models."""
    if labels is None:
        return None, None
    if task == "classification":
        return "accuracy", 100.0 * accuracy(logits, labels)
    if task == "language-model":
        return "perplexity", perplexity(logits, labels)
    return None, None


def metric_drop(name: str | None, reference: float | None, value: float | None) -> float | None:
    """Points lost (positive = worse): accuracy falls, perplexity rises."""
    if name is None or reference is None or value is None:
        return None
    return reference - value if name == "accuracy" else value - reference


@dataclass(frozen=True)
class Evaluation:
    label: str
    path: str  # "fp32", "simulated" or "real"
    metric_name: str | None
    metric: float | None
    metric_drop: float | None
    output: ErrorStats | None  # vs FP32 on the evaluation data
    cost: dict[str, float]
    latency_ms_per_sample: float
    notes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def as_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"label": self.label, "path": self.path, "metric": self.metric_name,
                               "value": self.metric, "drop": self.metric_drop}
        if self.output is not None:
            row.update({"output_sqnr_db": self.output.sqnr_db, "output_kl": self.output.kl,
                        "top1_agreement": self.output.top1_agreement})
        row.update(self.cost)
        row["latency_ms_per_sample"] = self.latency_ms_per_sample
        row.update(self.extra)
        return row

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Evaluator:
    """Calibrates once on calibration data; evaluates any number of maps on evaluation data.

    `engine`: what runs the model (analysis.config.ENGINES; `analysis.hooks.engine_simulator`):
    pass the engine the analysis used (`Provenance.engine`) so a model only the hook engine runs
    is evaluated with it too."""

    def __init__(self, model: Any, calibration: Dataset, evaluation: Dataset | None = None,
                 config: QuantConfig | None = None, *, device: str | None = None,
                 sim: QuantSim | None = None, engine: str = "auto") -> None:
        self.sim = sim or engine_simulator(model, calibration, config or QuantConfig(), engine=engine, device=device)
        self.config = self.sim.config
        self.calibration = self.sim.data
        self.evaluation = evaluation or calibration
        self.layers = self.sim.layers
        self.layer_names = [layer.name for layer in self.layers]
        started = time.perf_counter()
        self.reference = self.sim.forward(self.evaluation.inputs, {})
        self.fp32_seconds = time.perf_counter() - started
        check_labels(self.evaluation, self.reference)  # before any metric is computed with them
        self.metric_name, self.fp32_metric = task_metric(self.evaluation.task, self.reference,
                                                         _on(self.evaluation.labels, self.reference))
        self._calibration_reference: torch.Tensor | None = None

    def fp32(self) -> Evaluation:
        cost = costs.model_cost(self.layers, {}).as_dict()
        return Evaluation("fp32", "fp32", self.metric_name, self.fp32_metric, 0.0 if self.metric_name else None,
                          None, cost, 1000 * self.fp32_seconds / len(self.evaluation))

    def evaluate(self, pmap: PrecisionMap, label: str = "map") -> Evaluation:
        pmap.validate(self.layer_names)
        assignment = pmap.assignment(self.layer_names)
        self.sim.forward(self.evaluation.inputs[:1], assignment)  # calibrates; keeps it out of the timing
        started = time.perf_counter()
        output = self.sim.forward(self.evaluation.inputs, assignment)
        seconds = time.perf_counter() - started
        acc = ErrorAccumulator(self.evaluation.logits)
        acc.update(self.reference, output, self.evaluation.token_mask())
        name, value = task_metric(self.evaluation.task, output, _on(self.evaluation.labels, output))
        return Evaluation(
            label, "simulated", name, value, metric_drop(name, self.fp32_metric, value), acc.result(),
            costs.model_cost(self.layers, assignment).as_dict(), 1000 * seconds / len(self.evaluation),
            notes=("simulated (fake quantization): latency is not deployment speed",),
        )

    def baselines(self, pairs: tuple[tuple[str, str | None], ...] = DEFAULT_BASELINES) -> list[Evaluation]:
        results = [self.fp32()]
        for weight, act in pairs:
            label = f"uniform {weight}" + (f"/{act}" if act else " (weight-only)")
            results.append(self.evaluate(uniform_map(self.layer_names, weight, act), label))
        return results

    def measure(self, assignment: dict[str, tuple[Format | None, Format | None]]) -> dict[str, float]:
        """The allocator's yardstick: output noise on the calibration data (what the sweep measured
        on), plus the task metric and its drop on the evaluation data when it has labels."""
        if self._calibration_reference is None:
            self._calibration_reference = self.sim.forward(self.calibration.inputs, {})
        output = self.sim.forward(self.calibration.inputs, assignment)
        difference = output.double() - self._calibration_reference.double()
        mask = self.calibration.token_mask()
        if mask is not None:  # padding positions are not scored
            difference = difference[mask.to(difference.device)]
        noise = float((difference ** 2).mean())
        result = {"noise": noise}
        if self.evaluation.labels is not None and self.metric_name is not None:
            eval_output = self.sim.forward(self.evaluation.inputs, assignment)
            _, value = task_metric(self.evaluation.task, eval_output, _on(self.evaluation.labels, eval_output))
            result["metric"] = value
            result["drop"] = metric_drop(self.metric_name, self.fp32_metric, value)
        return result


def check_trained(model: torch.nn.Module, lr: float) -> None:
    """ValueError (one line) when training left a parameter non-finite: the optimisation diverged,
    which at a valid start is the learning rate's doing, not the model's or the data's."""
    for name, param in model.named_parameters():
        if not all_finite(param):
            raise ValueError(f"fine-tuning diverged: parameter {name} became NaN/Inf during training with learning "
                             f"rate {lr:g}; lower --lr (the default is 1e-4)")


def _on(labels: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if labels is None else labels.to(like.device)
