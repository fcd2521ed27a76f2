"""`LoadError` and the helpers every loader uses to put a problem into one line."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

# How many names a message lists before it says "(+N more)".
_MAX_NAMED = 3


class LoadError(ValueError):
    """A model or data set could not be loaded; the message is one line naming the problem and the fix."""

    def __init__(self, message: str) -> None:
        # Enforce the one-line contract here, so no embedded library message can break it.
        super().__init__(" ".join(part.strip() for part in str(message).splitlines() if part.strip()))


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """`ExcType: first line of its message`: enough to recognise the cause, short enough for one line."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # torch decorates some messages with ANSI colours
    if len(text) > limit:  # long library messages lead with the cause; keep its first sentence
        text = re.split(r"(?<=[a-z0-9)])\. ", text, maxsplit=1)[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _shape(shape: Any) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _some(names: list[str], limit: int = _MAX_NAMED) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _existing_file(text: str, what: str, forms: str) -> Path:
    """The path `text` names, which must be an existing regular file."""
    path = Path(os.path.expanduser(text))
    if not path.exists():
        raise LoadError(f"{what} {text} does not exist; check the path ({forms})")
    if path.is_dir():
        raise LoadError(f"{what} {text} is a directory, not a file; {forms}")
    if not path.is_file():
        raise LoadError(f"{what} {text} is not a regular file; {forms}")
    return path
