"""Run a user's Python file: parse "file.py:name" specs, import the file, find the callable."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import itertools
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import LoadError, _existing_file, _first_line, _some

_module_ids = itertools.count()


def _split_callable_spec(spec: str) -> tuple[str, str] | None:
    """("file.py", "attr") for "file.py:attr", splitting on the LAST colon so directories may hold colons."""
    head, sep, attr = spec.rpartition(":")
    if not sep or not head.lower().endswith(".py"):
        return None
    if Path(os.path.expanduser(spec)).exists():
        return None  # a real file whose name happens to contain ".py:" wins over the spec syntax
    if not attr:
        raise LoadError(f"{spec} names no function after the colon; write {head}:function_name")
    if not all(part.isidentifier() for part in attr.split(".")):
        raise LoadError(f"{attr!r} in {spec} is not a Python name; write {head}:function_name")
    return head, attr


@contextlib.contextmanager
def _on_sys_path(directory: Path) -> Iterator[None]:
    # A user's model file usually imports its neighbours ("from layers import Block"), as it would
    # when run as a script; the directory is on sys.path only while the file is imported and called.
    entry = str(directory.resolve())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _import_file(path: Path, shown: str) -> ModuleType:
    """Import a user's .py file under a unique module name (two files may share a stem)."""
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_quantlens_user_{stem}_{next(_module_ids)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot import {shown}: Python does not recognise it as a module; use a .py file")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses, typing and pickling look the module up by name.
    sys.modules[name] = module
    try:
        with _on_sys_path(path.parent):
            spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[name]
        where = f"line {exc.lineno}" if exc.lineno else "somewhere"
        raise LoadError(
            f"{shown} has a {type(exc).__name__} at {where}: {exc.msg}; fix the file and try again"
        ) from None
    except SystemExit:
        del sys.modules[name]
        raise LoadError(
            f"{shown} called sys.exit() while being imported; put script code under if __name__ == '__main__':"
        ) from None
    except Exception as exc:
        del sys.modules[name]
        raise LoadError(f"importing {shown} failed with {_first_line(exc)}; fix the file or its imports") from None
    return module


def _resolve_callable(spec: str, file_text: str, attr: str, role: str, forms: str) -> tuple[Any, Path]:
    """Import `file_text` and return its (possibly dotted) attribute `attr`, checked to be callable."""
    path = _existing_file(file_text, "Python file", forms)
    module = _import_file(path, file_text)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            defined = sorted(
                n for n, v in vars(module).items()
                if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
            )
            hint = f"it defines {_some(defined, 8)}" if defined else "it defines no functions or classes"
            raise LoadError(f"{file_text} has no {role} {attr!r}; {hint}")
        target = getattr(target, part)
    if not callable(target):
        raise LoadError(f"{spec}: {attr} is a {type(target).__name__}, not a function; name a {role} to call")
    try:
        required = [
            p.name for p in inspect.signature(target).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
    except (TypeError, ValueError):  # builtins and some C types have no signature; just call them
        required = []
    if required:
        raise LoadError(
            f"{spec} needs arguments ({', '.join(required)}) but is called with none; "
            f"add a wrapper such as def make(): return {attr}(...) and name that"
        )
    return target, path
