"""A calibration / evaluation data set: inputs, optional labels, and the task they imply."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Union

import torch

TASKS = ("classification", "language-model", "other")
IGNORE_INDEX = -100  # torch's cross-entropy skips these token labels (padding); perplexity does too


POSITIONAL = "inputs"  # the one name passed to forward positionally; every other name is a keyword


@dataclass(frozen=True)
class NamedInputs:
    """Several tensors per sample (samples along dimension 0 of each), passed to `forward` by name:
    `model(inputs, **rest)` when a tensor is named "inputs", else `model(**tensors)` — e.g.
    input_ids + attention_mask for a Hugging Face model. Behaves like a tensor where the engine
    needs it to: `len`, slicing along samples, `.to(device)`, `.nbytes`."""

    tensors: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        if not self.tensors:
            raise ValueError("no input tensors given; a data set needs at least one")
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))
        lengths = {name: (len(t) if t.dim() else 0) for name, t in self.tensors.items()}
        if any(t.dim() == 0 for t in self.tensors.values()) or len(set(lengths.values())) != 1:
            shown = ", ".join(f"{name}: {n}" for name, n in lengths.items())
            raise ValueError(f"input tensors must hold the same number of samples along dimension 0 ({shown})")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.tensors)

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: Any) -> "NamedInputs":
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return NamedInputs({name: t[index] for name, t in self.tensors.items()})

    def to(self, device: Any) -> "NamedInputs":
        return NamedInputs({name: t.to(device) for name, t in self.tensors.items()})

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def call_arguments(self) -> tuple[tuple, dict]:
        """(args, kwargs) for forward."""
        kwargs = dict(self.tensors)
        positional = kwargs.pop(POSITIONAL, None)
        return ((positional,) if positional is not None else ()), kwargs


Inputs = Union[torch.Tensor, NamedInputs]


def call_model(model: Any, inputs: Inputs) -> Any:
    """Run `model` (a module, a GraphModule, any callable) on a data set's inputs."""
    if isinstance(inputs, NamedInputs):
        args, kwargs = inputs.call_arguments()
        return model(*args, **kwargs)
    return model(inputs)


def input_tensors(inputs: Inputs) -> dict[str, torch.Tensor]:
    """Every input tensor by name (a plain tensor is "inputs")."""
    return dict(inputs.tensors) if isinstance(inputs, NamedInputs) else {POSITIONAL: inputs}


def samples_differ(inputs: Inputs, i: int, j: int) -> bool:
    """Whether samples i and j differ in any input tensor."""
    return any(not torch.equal(t[i], t[j]) for t in input_tensors(inputs).values())


@dataclass(frozen=True)
class Dataset:
    """Samples along dimension 0 of `inputs` (one tensor, or several named ones: `NamedInputs`);
    `labels` (if any) align with them.

    task: "classification" (labels [N], outputs [N, C] logits), "language-model" (labels [N, T] next
    tokens, outputs [N, T, V] logits) or "other" (no logit metrics, no task metric).
    """

    inputs: Inputs
    labels: torch.Tensor | None = None
    task: str = "other"
    name: str = "data"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; use one of {', '.join(TASKS)}")
        if (isinstance(self.inputs, torch.Tensor) and self.inputs.dim() == 0) or len(self.inputs) == 0:
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

    def token_mask(self, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        """For language models, [n, T] booleans of the positions of samples start..stop that count in
        every output metric: not padding (labels = IGNORE_INDEX, or attention_mask = 0). None when all
        count (or for other tasks)."""
        if self.task != "language-model":
            return None
        mask = None
        if self.labels is not None and self.labels.dim() == 2:
            mask = self.labels[start:stop] != IGNORE_INDEX
        attention = self.inputs.tensors.get("attention_mask") if isinstance(self.inputs, NamedInputs) else None
        if attention is not None and attention.dim() == 2:
            valid = attention[start:stop] != 0
            mask = valid if mask is None else mask & valid
        return None if mask is None or bool(mask.all()) else mask

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        named = isinstance(self.inputs, NamedInputs)
        for name, tensor in [*input_tensors(self.inputs).items(), ("labels", self.labels)]:
            if tensor is not None:
                if named:  # a single tensor hashes as it always did: stored runs keep their provenance
                    digest.update(name.encode())
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
