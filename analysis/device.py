"""Where the engine computes: "cpu", "cuda", "cuda:N" or "mps".

The simulator moves its private copy of the model, the calibration data and every cache to this
device; metrics are accumulated in float64 on the same device and read back once per trial, so a
GPU run needs no host synchronisation per element. Nothing here touches a user's model.
"""

from __future__ import annotations

import re

import torch

_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


class DeviceError(ValueError):
    """A device name that is malformed or not available on this machine."""


def resolve_device(name: str | torch.device | None, *, check_available: bool = False) -> torch.device:
    """Parse a device name; with `check_available`, refuse one this machine does not have."""
    if name is None:
        return torch.device("cpu")
    if isinstance(name, torch.device):
        text = str(name)
    else:
        text = str(name).strip().lower()
    if not _DEVICE_RE.match(text):
        raise DeviceError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps")
    device = torch.device(text)
    if check_available:
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceError(f"device {text} asked for but CUDA is not available here; use --device cpu")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise DeviceError(f"device {text} does not exist: this machine has "
                                  f"{torch.cuda.device_count()} CUDA device(s)")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError("device mps asked for but Apple's MPS backend is not available here; use --device cpu")
    return device


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory on an accelerator (None on the CPU: the caller uses its own bound)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (timing on a GPU measures nothing without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
