"""Check that a loaded model runs on a loaded data set and gives a floating-point output."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..data import Dataset, check_labels
from ..graph import check_batch_output, unchanged
from .errors import LoadError, _dtype, _first_line, _shape


def check_compatible(model: nn.Module | torch.export.ExportedProgram, data: Dataset) -> None:
    """Run the model on the first sample; LoadError if it fails or gives no floating-point output."""
    module = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    sample = data.inputs[:1]
    described = f"input of shape {_shape(sample.shape)} dtype {_dtype(sample.dtype)} from {data.name}"
    try:
        # The caller's model itself: in eval mode, with its buffers and mode restored afterwards (a
        # program's module() is a fresh copy each time, and refuses eval()).
        guard = contextlib.nullcontext() if isinstance(model, torch.export.ExportedProgram) else unchanged(module)
        with guard, torch.inference_mode():
            output = module(sample)
    except Exception as exc:
        hint = "check that the data matches the model's expected input"
        if isinstance(model, torch.export.ExportedProgram):
            hint += (
                " (an exported program only takes the shapes it was exported for: "
                "export with a dynamic batch dimension)"
            )
        raise LoadError(
            f"the model cannot run on the data: {described} failed with {_first_line(exc)}; {hint}"
        ) from None
    first = _first_float(output)
    if first is None:
        raise LoadError(
            f"the model's output on the data has no floating-point tensor (it returned a {type(output).__name__}); "
            f"the analysis compares floating-point outputs such as logits"
        )
    try:
        check_batch_output(first, len(sample))
        check_labels(data, first)
    except ValueError as exc:
        raise LoadError(str(exc)) from None
    bad = int((~torch.isfinite(first)).sum())
    if bad:
        nan = int(torch.isnan(first).sum())
        raise LoadError(
            f"the model's output on {described} holds {bad} non-finite values ({nan} NaN, {bad - nan} Inf) "
            f"of {first.numel()}: its activations overflow or hit an undefined operation (log/sqrt of a "
            f"negative, 0/0), so quantization error cannot be measured; fix the model or its inputs"
        )


def _first_float(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        found = _first_float(value)
        if found is not None:
            return found
    return None
