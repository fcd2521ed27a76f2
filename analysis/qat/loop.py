"""Quantization-aware fine-tuning that never returns something worse than it was given.

`finetune_qat` trains on a training split, scores every epoch on a separate validation split with
exactly the quantizers a deployment of those weights gets (a fresh `QuantSim` over the calibration
data: the map's weight calibration of the new weights, activation ranges recalibrated), keeps the
best checkpoint — epoch 0, the post-training-quantized model as given, included — and reports FP32,
PTQ and QAT side by side on held-out data.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from analysis.config import QATConfig
from analysis.data import Dataset, call_model
from analysis.data import check_labels as data_check_labels
from analysis.evaluate import Evaluator, metric_drop, task_metric
from analysis.graph import primary_output
from analysis.precision_map import PrecisionMap
from analysis.provenance import Provenance, engine_for
from analysis.qat.instrument import TrainingGraph, instrument, unfold_into
from analysis.quantsim import QuantSim

ProgressFn = Callable[[int, int, str], None]
LABELLED_TASKS = ("classification", "language-model")


class QATError(ValueError):
    """Inputs quantization-aware fine-tuning cannot use; the message says what to change."""


def task_loss(task: str, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy: [N, C] logits vs [N] labels (classification), [N, T, V] vs [N, T] (language model)."""
    if task in LABELLED_TASKS:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), labels.reshape(-1).long())
    raise ValueError(f"no task loss for task {task!r}")


def distillation_loss(output: torch.Tensor, teacher: torch.Tensor, logits: bool) -> torch.Tensor:
    """KL(P_teacher || P_output) per sample (per token) for logits, else MSE to the teacher's output."""
    if not logits:
        return F.mse_loss(output, teacher)
    classes = output.shape[-1]
    return F.kl_div(F.log_softmax(output.reshape(-1, classes), -1), F.log_softmax(teacher.reshape(-1, classes), -1),
                    log_target=True, reduction="batchmean")


def check_labels(data: Dataset, output: torch.Tensor) -> None:
    """The engine's label check (`analysis.data.check_labels`), raised as a QATError."""
    try:
        data_check_labels(data, output)
    except ValueError as exc:
        raise QATError(str(exc)) from None


@dataclass(frozen=True)
class Split:
    """A training set and a validation set; `*_index` are rows of the data they were carved from
    (None when the validation set was given separately)."""

    train: Dataset
    validation: Dataset
    source: str  # how the validation set came about, for the output
    train_index: torch.Tensor | None = None
    validation_index: torch.Tensor | None = None


def split_train_validation(data: Dataset, fraction: float, seed: int = 0) -> Split:
    """Carve a validation set from `data`: a seeded permutation, `fraction` of it (at least one
    sample) for validation and the rest for training — disjoint by construction."""
    n = len(data)
    if n < 2:
        raise QATError(f"{data.name} has {n} sample; QAT needs at least 2 to carve a validation split "
                       "(or pass a separate validation set)")
    n_val = min(n - 1, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_index, train_index = order[:n_val].sort().values, order[n_val:].sort().values

    def subset(index: torch.Tensor, name: str) -> Dataset:
        labels = None if data.labels is None else data.labels[index]
        return Dataset(data.inputs[index], labels, data.task, name)

    return Split(subset(train_index, f"{data.name} (training part)"), subset(val_index, f"{data.name} (validation part)"),
                 f"{n_val} of the {n} training samples held out for validation (seeded split, {round(100 * n_val / n)} %)",
                 train_index, val_index)


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 0: the model as given (PTQ)
    lr: float | None  # learning rate at the end of the epoch
    train_loss: float | None
    val_metric: float | None  # task metric on the validation split under the map (None without labels)
    val_loss: float  # task loss (or MSE to the FP32 output) on the validation split under the map
    seconds: float


@dataclass(frozen=True)
class QATResult:
    """What `finetune_qat` did. Held-out figures (`fp32`, `ptq`, `qat`, `returned`) are the task
    metric on the evaluation data under the map; `qat` is the best fine-tuned checkpoint (None when
    no epoch finished), `returned` the model handed back (`kept` says which)."""

    model: Any = field(repr=False)
    kept: str  # "qat" or "ptq"
    metric_name: str | None
    fp32: float | None
    ptq: float | None
    qat: float | None
    returned: float | None
    ptq_output_sqnr_db: float | None
    qat_output_sqnr_db: float | None
    best_epoch: int
    stopped: str  # "completed", "early stop" or "diverged"
    history: tuple[EpochRecord, ...]
    train_samples: int
    validation_samples: int
    evaluation_samples: int
    validation_source: str
    loss: str
    quantized_layers: int
    config: QATConfig
    notes: tuple[str, ...]
    seconds: float

    @property
    def ptq_drop(self) -> float | None:
        return metric_drop(self.metric_name, self.fp32, self.ptq)

    @property
    def recovered(self) -> float | None:
        """Share of the PTQ drop the fine-tuned checkpoint won back on held-out data (1.0 = FP32)."""
        drop, qat_drop = self.ptq_drop, metric_drop(self.metric_name, self.fp32, self.qat)
        if drop is None or qat_drop is None or drop <= 0:
            return None
        return (drop - qat_drop) / drop

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(replace(self, model=None)).items() if k != "model"}
        out.update(ptq_drop=self.ptq_drop, recovered=self.recovered, config=asdict(self.config))
        return out

    def summary(self) -> list[str]:
        """The result in a few lines (CLI, dashboard)."""
        name = self.metric_name or "output MSE"

        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.2f}"

        lines = [f"{name} on {self.evaluation_samples} held-out samples: FP32 {fmt(self.fp32)}, PTQ {fmt(self.ptq)}, "
                 f"QAT {fmt(self.qat)}" + (f" (best epoch {self.best_epoch})" if self.kept == "qat" else ""),
                 (f"trained on {self.train_samples} samples, selected on {self.validation_samples}: "
                  f"{self.validation_source}; {len(self.history) - 1} epoch(s), {self.stopped}, {self.seconds:.1f}s")]
        if self.recovered is not None:
            lines.append(f"QAT recovered {100 * self.recovered:.0f} % of the {self.ptq_drop:.2f}-point PTQ drop")
        lines.extend(self.notes)
        return lines


def refuse_hook_engine(engine: str) -> None:
    """QATError (one line) for the hook engine: training needs a graph to instrument."""
    if engine == "hooks":
        raise QATError("fine-tuning trains a traced (torch.fx) copy of the model, and this model runs on the hook engine "
                       "(its analysis could not trace it, or --engine hooks): make forward traceable (no data-dependent "
                       "branches) and analyse it with --engine graph, or fine-tune it with your own training loop")


def finetune_qat(model: Any, pmap: PrecisionMap, train: Dataset, calibration: Dataset, *,
                 validation: Dataset | None = None, evaluation: Dataset | None = None,
                 config: QATConfig | None = None, progress: ProgressFn | None = None,
                 device: str | None = None, engine: str | None = None) -> QATResult:
    """Quantization-aware fine-tuning under `pmap`; never returns a model that scored worse than PTQ
    on the validation split (with `config.keep == "best"`, the default).

    Training: the map's fake-quantized weights (re-quantized from the latent FP32 weights at every
    step, with the map's calibration or LSQ-learned scales, `config.ranges`) and layer inputs
    (ranges recalibrated after every epoch on `calibration`), straight-through gradients, Adam with
    a linear warm-up then cosine decay, early stopping after `config.patience` epochs without a
    better validation score. The loss is cross-entropy with labels, else MSE to the FP32 outputs.
    Unfolded BatchNorm (maps with fold_batchnorm false) updates its statistics for
    `config.freeze_bn_after` epochs, then freezes; folded BatchNorm (the default) is frozen and
    folded from the start, as in the deployed graph, and unfolded into the model's own modules at
    the end so that the weights load into its class.

    Validation: `validation`, or a split carved from `train` (stated in the result). Epoch 0 is
    the model as given. An epoch whose loss or weights become non-finite stops training
    ("diverged"), and the best earlier checkpoint is kept. `evaluation` (held-out; default:
    `calibration`) gives the FP32 / PTQ / QAT figures. `device` places the simulators (every
    evaluation); training itself runs on the CPU. The input model is never modified.

    Training runs a traced (torch.fx) copy of the model: a model only the hook engine runs
    (`engine` "hooks", or None and the map's analysis ran on it) is refused in one line.
    """
    config = config or QATConfig()
    started = time.perf_counter()
    notes: list[str] = []
    if validation is None:
        split = split_train_validation(train, config.validation_fraction, config.seed)
    else:
        split = Split(train, validation, f"validation set {validation.name} given separately")
    evaluation = evaluation or calibration
    quant = pmap.quant
    refuse_hook_engine(engine_for(engine, Provenance.from_dict(pmap.provenance)))
    base_sim = QuantSim(model, calibration, quant, device=device)
    pmap.validate(base_sim.layer_names)
    assignment = pmap.assignment(base_sim.layer_names)
    quantized = sum(1 for wf, af in assignment.values() if wf is not None or af is not None)
    if quantized == 0:
        raise QATError("the map quantizes no layer, so there is nothing for QAT to recover; give a map with quantized layers")

    fp32_train = base_sim.forward(split.train.inputs[:2], {})
    for data in (split.train, split.validation):
        check_labels(data, fp32_train)
    labelled = split.train.labels is not None and split.train.task in LABELLED_TASKS
    distill = config.loss == "distill" or not labelled
    logits = split.train.task in LABELLED_TASKS
    targets = base_sim.forward(split.train.inputs, {}).detach().cpu() if distill else None
    val_targets = base_sim.forward(split.validation.inputs, {}).detach().cpu() if distill else None

    def loss_of(output: torch.Tensor, index: torch.Tensor | None, data: Dataset, teacher: torch.Tensor | None) -> torch.Tensor:
        if teacher is None:
            return task_loss(data.task, output, data.labels if index is None else data.labels[index])
        teacher = teacher if index is None else teacher[index]
        return distillation_loss(output, teacher, logits)

    def score(sim: QuantSim) -> tuple[float | None, float]:
        with torch.no_grad():
            output = sim.forward(split.validation.inputs, assignment).cpu()
        loss = float(loss_of(output, None, split.validation, val_targets))
        if labelled:
            return task_metric(split.validation.task, output, split.validation.labels)[1], loss
        return None, loss

    def better(a: EpochRecord, b: EpochRecord) -> bool:
        """a beats b: a better metric, or the same metric and a lower loss."""
        if a.val_metric is not None and b.val_metric is not None and a.val_metric != b.val_metric:
            lower_is_better = split.validation.task == "language-model"
            return (a.val_metric < b.val_metric) if lower_is_better else (a.val_metric > b.val_metric)
        return a.val_loss < b.val_loss

    metric0, loss0 = score(base_sim)
    history = [EpochRecord(0, None, None, metric0, loss0, time.perf_counter() - started)]
    graph = instrument(base_sim, assignment, config.ranges)
    notes.extend(graph.notes)
    best = history[0]
    best_trained: tuple[EpochRecord, dict[str, torch.Tensor]] | None = None
    stopped = "completed"
    loss_label = "KL" if distill and logits else "MSE" if distill else "CE"

    def describe(record: EpochRecord) -> str:
        metric = f"{_fmt(record.val_metric)} " if record.val_metric is not None else ""
        return f"{metric}{loss_label} {_fmt(record.val_loss)}"

    if progress:
        progress(0, config.epochs, f"val {describe(history[0])} (PTQ)")

    n = len(split.train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = max(1, config.epochs * steps_per_epoch)
    warmup = min(config.warmup_epochs * steps_per_epoch, total_steps)

    def lr_at(step: int) -> float:  # step counts from 1
        if step <= warmup:
            return config.lr * step / max(warmup, 1)
        return 0.5 * config.lr * (1 + math.cos(math.pi * (step - warmup) / max(total_steps - warmup, 1)))

    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator: fork_rng(devices=[]) saves and restores just that one, while
        # torch.manual_seed would also reseed (and leave reseeded) every accelerator's.
        torch.random.default_generator.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        params = [p for p in graph.gm.parameters() if p.requires_grad and p.is_floating_point()]
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        step = 0
        for epoch in range(1, config.epochs + 1):
            epoch_started = time.perf_counter()
            graph.gm.train()
            for norm in graph.norms():
                norm.train(epoch <= config.freeze_bn_after)
            order = torch.randperm(n, generator=generator)
            total, diverged = 0.0, None
            for start in range(0, n, config.batch_size):
                index = order[start:start + config.batch_size]
                step += 1
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                output = primary_output(call_model(graph.gm, split.train.inputs[index]))
                loss = loss_of(output, index, split.train, targets)
                if not torch.isfinite(loss):
                    diverged = f"the training loss became {float(loss)} at epoch {epoch}"
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(index)
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    diverged = f"the weights became non-finite at epoch {epoch}"
                    break
            graph.gm.eval()
            if diverged is None:
                state = graph.latent_state()
                try:  # finite steps can still leave weights whose outputs overflow
                    sim = _candidate_sim(model, graph, state, calibration, quant, base_sim)
                    metric, val_loss = score(sim)
                except ValueError as exc:  # non-finite weights or outputs, in one line
                    diverged = f"the fine-tuned model could not be evaluated at epoch {epoch}: {str(exc).splitlines()[0]}"
                else:
                    if not math.isfinite(val_loss):
                        diverged = f"the validation loss became {val_loss} at epoch {epoch}"
            if diverged is not None:
                stopped = "diverged"
                notes.append(f"training diverged ({diverged}) with learning rate {config.lr:g}: the model and the data "
                             f"evaluated fine at epoch 0, the step is too large; kept epoch {best.epoch}; try --lr {min(config.lr / 10, QATConfig().lr):g}")
                break
            graph.use_activation_ranges(sim)  # the next epoch trains with the ranges these weights get
            record = EpochRecord(epoch, lr_at(step), total / n, metric, val_loss, time.perf_counter() - epoch_started)
            history.append(record)
            if best_trained is None or better(record, best_trained[0]):
                best_trained = (record, state)
            if better(record, best):
                best = record
            if progress:
                progress(epoch, config.epochs, f"val {describe(record)}, best @ {best.epoch}")
            if config.patience and epoch - max(best.epoch, best_trained[0].epoch) >= config.patience:
                stopped = "early stop"
                break

    if config.keep == "last" and best_trained is not None and stopped != "diverged":
        last_state = graph.latent_state()
        chosen_state, kept_epoch = last_state, history[-1].epoch
    elif best.epoch > 0 and best_trained is not None:
        chosen_state, kept_epoch = best_trained[1], best.epoch
    else:
        chosen_state, kept_epoch = None, 0
    if kept_epoch == 0:
        if best_trained is not None and stopped != "diverged":
            notes.append(f"QAT did not beat PTQ on the validation split (best fine-tuned epoch {best_trained[0].epoch}: "
                         f"{describe(best_trained[0])} vs {describe(history[0])}); returning the PTQ weights "
                         "unchanged (keep=\"last\" returns the fine-tuned ones)")
        returned_model = copy.deepcopy(model)
    else:
        returned_model = _as_model(model, graph, chosen_state, notes)

    held_out = Evaluator(model, calibration, evaluation, quant, sim=base_sim)
    ptq = held_out.evaluate(pmap, "PTQ")
    qat = None
    if best_trained is not None:
        tuned_state = chosen_state if kept_epoch > 0 else best_trained[1]
        qat = Evaluator(None, calibration, evaluation, quant, sim=_candidate_sim(
            model, graph, tuned_state, calibration, quant, base_sim)).evaluate(pmap, "QAT")
    returned = qat if kept_epoch > 0 else ptq
    if qat is not None and kept_epoch > 0 and held_out.metric_name is not None \
            and (metric_drop(held_out.metric_name, ptq.metric, qat.metric) or 0.0) > 0:
        notes.append(f"warning: the fine-tuned model scored better than PTQ on validation but worse on the held-out "
                     f"data ({qat.metric:.2f} vs {ptq.metric:.2f}); the validation split may be too small")
    return QATResult(
        model=returned_model, kept="qat" if kept_epoch > 0 else "ptq", metric_name=held_out.metric_name,
        fp32=held_out.fp32_metric, ptq=ptq.metric, qat=None if qat is None else qat.metric, returned=returned.metric,
        ptq_output_sqnr_db=ptq.output.sqnr_db if ptq.output else None,
        qat_output_sqnr_db=qat.output.sqnr_db if qat is not None and qat.output else None,
        best_epoch=kept_epoch, stopped=stopped, history=tuple(history), train_samples=len(split.train),
        validation_samples=len(split.validation), evaluation_samples=len(held_out.evaluation),
        validation_source=split.source,
        loss=("KL to the FP32 outputs" if logits else "MSE to the FP32 outputs") if distill else "cross-entropy",
        quantized_layers=quantized, config=config, notes=tuple(notes), seconds=time.perf_counter() - started,
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _candidate_sim(model: Any, graph: TrainingGraph, state: dict[str, torch.Tensor], calibration: Dataset,
                   quant: Any, base: QuantSim) -> QuantSim:
    """The simulator a deployment of these weights gets: the model as it will be handed back (its
    own class when the weights map onto it), prepared and calibrated afresh (on `base`'s device)."""
    sim = QuantSim(_as_model(model, graph, state, []), calibration, quant, device=base.device)
    layer_names = base.layer_names
    if sim.layer_names != layer_names:
        raise QATError("the fine-tuned weights do not map back onto the model's layers "
                       f"({', '.join(sorted(set(layer_names) ^ set(sim.layer_names))[:4])} differ); "
                       "QAT cannot measure them the way a deployment would")
    return sim


def _as_model(model: Any, graph: TrainingGraph, state: dict[str, torch.Tensor], notes: list[str]) -> nn.Module:
    """The fine-tuned weights in the user's own model class when they map onto it (BatchNorm
    unfolded back into its modules), else the traced graph."""
    tuned = graph.model_with(state)
    if not isinstance(model, nn.Module):
        notes.append("the model is an exported program: the fine-tuned model is returned as a traced graph")
        return tuned
    try:
        mine = unfold_into(model, tuned, graph.folded_batchnorms)
    except (ValueError, KeyError, RuntimeError) as exc:
        notes.append(f"the fine-tuned weights do not map back onto {type(model).__name__} ({exc}); "
                     "returned as a traced graph")
        return tuned
    return mine
