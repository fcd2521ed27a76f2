"""Read .pt and .safetensors files as data: tensors in plain containers, never arbitrary objects."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from .errors import LoadError, _first_line


def _torch_load(path: Path, shown: str, what: str, how_to_save: str) -> Any:
    """torch.load restricted to tensors and plain containers: a pickle can run code, so no objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if needed:
            raise LoadError(
                f"{shown} is a pickled Python object (it needs {needed.group(1)}), not a plain {what}: "
                f"pickles can run arbitrary code, so only tensors in plain dicts are accepted; {how_to_save}"
            ) from None
        raise LoadError(
            f"{shown} is not a readable PyTorch file (UnpicklingError: the pickle data is invalid); "
            f"it may be corrupt or not a torch.save file; {how_to_save}"
        ) from None
    except EOFError:
        raise LoadError(f"{shown} is empty or truncated (EOFError); re-save or re-download it") from None
    except OSError as exc:
        raise LoadError(f"cannot read {shown}: {_first_line(exc)}") from None
    except Exception as exc:
        raise LoadError(
            f"{shown} is not a readable PyTorch file ({_first_line(exc, 160)}); "
            f"it may be truncated or corrupt; re-save or re-download it"
        ) from None


def _safetensors_load(path: Path, shown: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except OSError as exc:
        raise LoadError(f"cannot read {shown}: {_first_line(exc)}") from None
    except Exception as exc:  # SafetensorError for a bad header, truncated data, unknown dtype ...
        raise LoadError(
            f"{shown} is not a valid safetensors file ({_first_line(exc, 160)}); "
            f"it may be truncated or corrupt; re-save it with safetensors.torch.save_file"
        ) from None
