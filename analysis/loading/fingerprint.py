"""A short, stable hash of a model's weights, to recognise the model a precision map was made for."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn


def model_fingerprint(model: nn.Module | torch.export.ExportedProgram) -> str:
    """16 hex chars of sha256 over the state dict's (name, shape, dtype, bytes), sorted by name.

    Lets a precision map made for one model be recognised as such. An exported program hashes
    its `state_dict`, which uses the original module's names, so it matches the module it came from.
    """
    if isinstance(model, torch.export.ExportedProgram):
        state = model.state_dict
    elif isinstance(model, nn.Module):
        state = model.state_dict()
    else:
        raise TypeError(f"model_fingerprint needs an nn.Module or ExportedProgram, not {type(model).__name__}")
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + b"\0")
        _feed(digest, state[name])
    return digest.hexdigest()[:16]


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        if tensor.is_quantized:  # quantized models keep scales beside the integer payload
            digest.update(repr(("q", tensor.qscheme())).encode())
            if tensor.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                digest.update(repr((tensor.q_scale(), tensor.q_zero_point())).encode())
            else:
                _feed(digest, tensor.q_per_channel_scales())
                _feed(digest, tensor.q_per_channel_zero_points())
            tensor = tensor.int_repr()
        digest.update(repr((tuple(tensor.shape), str(value.dtype))).encode())
        # Through uint8 so every dtype (bfloat16, float8 ...) hashes without a numpy equivalent.
        raw = tensor.reshape(-1).view(torch.uint8) if tensor.dim() else tensor.reshape(1).view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    elif isinstance(value, (tuple, list)):
        digest.update(f"seq{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(repr(value).encode())
