"""Load a state dict (.safetensors, .pt, .pth) into a model, naming every key or shape that does not fit."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import _MAX_NAMED, LoadError, _existing_file, _first_line, _shape, _some
from .tensor_files import _safetensors_load, _torch_load

_WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".pth")
# Checkpoint dicts commonly nest the state dict under one of these keys (plain scripts, tutorials,
# training frameworks); anything else is reported rather than guessed.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model")
# DataParallel / wrapper modules prefix every key; stripped only when the model has no such prefix.
_WRAPPER_PREFIXES = ("module.", "model.")

_SAVE_STATE_DICT = (
    "save a plain state dict with torch.save(model.state_dict(), path) "
    "or safetensors.torch.save_file(model.state_dict(), path)"
)


def _check_weights_path(weights: str) -> Path:
    path = _existing_file(str(weights), "weights file", "pass a .safetensors, .pt or .pth state dict with --weights")
    suffix = path.suffix.lower()
    if suffix not in _WEIGHT_EXTENSIONS:
        raise LoadError(
            f"weights file {weights} has unsupported extension {suffix or 'none'!r}; "
            f"use a state dict in .safetensors, .pt or .pth"
        )
    return path


def _read_state_dict(path: Path, shown: str) -> dict[str, Any]:
    if path.suffix.lower() == ".safetensors":
        return dict(_safetensors_load(path, shown))
    obj = _torch_load(path, shown, "state dict", _SAVE_STATE_DICT)
    if not isinstance(obj, Mapping):
        raise LoadError(f"{shown} holds a {type(obj).__name__}, not a state dict; {_SAVE_STATE_DICT}")
    if any(isinstance(v, Mapping) for v in obj.values()):
        # A training checkpoint ({"epoch": ..., "state_dict": {...}, "optimizer": {...}}).
        for key in _NESTING_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and not any(isinstance(v, Mapping) for v in inner.values()):
                return dict(inner)
        raise LoadError(
            f"{shown} is a checkpoint with keys {_some(sorted(map(str, obj)), 6)}, but none of "
            f"{', '.join(_NESTING_KEYS)} holds the weights; {_SAVE_STATE_DICT}"
        )
    return dict(obj)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """For each state-dict name, the other names of the same tensor (tied weights)."""
    by_tensor: dict[int, list[str]] = {}
    named = itertools.chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
    )
    for name, tensor in named:
        by_tensor.setdefault(id(tensor), []).append(name)
    return {name: [n for n in names if n != name] for names in by_tensor.values() for name in names}


def _load_weights(model: nn.Module, path: Path, shown: str) -> None:
    """Strict load_state_dict, with mismatches reported by name rather than as torch's wall of text."""
    state = _read_state_dict(path, shown)
    expected = model.state_dict()

    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
            break

    # Tied weights are often saved once (safetensors refuses shared tensors); fill the other names.
    aliases = _aliases(model)
    for name in expected:
        if name not in state:
            present = next((a for a in aliases.get(name, ()) if a in state), None)
            if present is not None:
                state[name] = state[present]

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} has shape {_shape(state[k].shape)} in the file but {_shape(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and isinstance(v, torch.Tensor) and isinstance(state[k], torch.Tensor)
        and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if shapes:
        more = f" (+{len(shapes) - _MAX_NAMED} more)" if len(shapes) > _MAX_NAMED else ""
        problems.append("; ".join(shapes[:_MAX_NAMED]) + more)
    if problems:
        raise LoadError(
            f"weights in {shown} do not fit the model: {'; '.join(problems)}; "
            f"check that the factory builds the architecture the weights were saved from"
        )
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise LoadError(f"weights in {shown} do not fit the model: {_first_line(exc)}") from None
