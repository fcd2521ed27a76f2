"""A calibration / evaluation data set: inputs, optional labels, and the task they imply."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

TASKS = ("classification", "language-model", "other")
IGNORE_INDEX = -100  # torch's cross-entropy skips these token labels (padding); perplexity does too


@dataclass(frozen=True)
class Dataset:
    """Samples along dimension 0 of `inputs`; `labels` (if any) align with them.

    task: "classification" (labels [N], outputs [N, C] logits), "language-model" (labels [N, T] next
    tokens, outputs [N, T, V] logits) or "other" (no logit metrics, no task metric).
    """

    inputs: torch.Tensor
    labels: torch.Tensor | None = None
    task: str = "other"
    name: str = "data"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; use one of {', '.join(TASKS)}")
        if self.inputs.dim() == 0 or len(self.inputs) == 0:
            raise ValueError(f"data set {self.name!r} is empty; provide at least one sample")
        if self.labels is not None and len(self.labels) != len(self.inputs):
            raise ValueError(
                f"data set {self.name!r} has {len(self.inputs)} inputs but {len(self.labels)} labels; they must pair up"
            )

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def logits(self) -> bool:
        """Whether model outputs are logits (so KL and top-1 agreement make sense)."""
        return self.task in ("classification", "language-model")

    def take(self, n: int | None) -> "Dataset":
        """The first n samples (all if n is None): deterministic, no shuffling."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError("the number of samples must be at least 1")
        labels = None if self.labels is None else self.labels[:n]
        return Dataset(self.inputs[:n], labels, self.task, self.name)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for tensor in (self.inputs, self.labels):
            if tensor is not None:
                digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
                # raw bytes: bfloat16 (and other dtypes numpy lacks) hash the same way as the rest
                digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


def infer_task(labels: torch.Tensor | None) -> str:
    """Integer labels of shape [N] mean classification; [N, T] mean next-token language modelling."""
    if labels is None or labels.is_floating_point():
        return "other"
    if labels.dim() == 1:
        return "classification"
    if labels.dim() == 2:
        return "language-model"
    return "other"


def check_labels(data: Dataset, output: torch.Tensor) -> None:
    """ValueError (one line) when class-id labels fall outside the model's output: `output` is the
    model's logits on any samples ([..., C] for C classes or vocabulary entries). Out-of-range ids
    would be scored as always wrong (accuracy) or crash the loss (cross-entropy)."""
    if data.labels is None or data.task not in ("classification", "language-model") or output.dim() == 0:
        return
    classes = int(output.shape[-1])
    labels = data.labels
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"the labels of data set {data.name!r} are {labels.dtype}, not class indices; give integer "
                         f"labels in [0, {classes}), or pass --task other if they are not class ids")
    outside = (labels < 0) | (labels >= classes)
    if data.task == "language-model":  # cross-entropy's ignore_index: padding, not scored
        outside &= labels != IGNORE_INDEX
    bad = labels[outside]
    if bad.numel():
        shown = ", ".join(str(int(v)) for v in torch.unique(bad)[:3]) + (", ..." if torch.unique(bad).numel() > 3 else "")
        what = "classes" if data.task == "classification" else "vocabulary entries"
        raise ValueError(
            f"data set {data.name!r} has {bad.numel()} label(s) outside the model's {classes} {what} "
            f"(ids 0..{classes - 1}): {shown}; fix the labels, or pass --task other if they are not class ids")
