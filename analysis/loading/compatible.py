"""Check that a loaded model runs on a loaded data set and gives a floating-point output."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..data import POSITIONAL, Dataset, NamedInputs, call_model, check_labels, input_tensors
from ..graph import check_batch_output, unchanged
from .errors import LoadError, _dtype, _first_line, _shape


def check_compatible(model: nn.Module | torch.export.ExportedProgram, data: Dataset) -> None:
    """Run the model on the first sample; LoadError if it fails or gives no floating-point output."""
    module = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    sample = data.inputs[:1]
    described = "input " + ", ".join(
        f"{'' if name == POSITIONAL else name + ' '}of shape {_shape(t.shape)} dtype {_dtype(t.dtype)}"
        for name, t in input_tensors(sample).items()) + f" from {data.name}"
    if isinstance(sample, NamedInputs):
        _check_names(module, sample, data.name)
    try:
        # The caller's model itself: in eval mode, with its buffers and mode restored afterwards (a
        # program's module() is a fresh copy each time, and refuses eval()).
        guard = contextlib.nullcontext() if isinstance(model, torch.export.ExportedProgram) else unchanged(module)
        with guard, torch.inference_mode():
            output = call_model(module, sample)
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


def _check_names(module: Any, inputs: NamedInputs, shown: str) -> None:
    """LoadError naming the first input array forward has no parameter for (when forward's signature
    is readable and takes no **kwargs)."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    keywords = [name for name, p in parameters.items()
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for name in inputs.names:
        if name != POSITIONAL and name not in keywords:
            raise LoadError(
                f"the data {shown} has an input array {name!r} but the model's forward has no parameter of that name "
                f"(it takes {', '.join(keywords) or 'no named parameters'}); name the arrays after forward's "
                f"parameters, use 'inputs' for the first one, and 'labels' for labels")
