"""Run a user's Python file: parse "file.py:name" specs, import the file, call what it names.

Importing and calling happen inside a scope that leaves the process as it found it: the file's
folder is on `sys.path`, and the file registered in `sys.modules`, only while its code runs.
Whoever needs the module afterwards holds it through what it defined (the model's class, the
function's globals), not through a global registry.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import itertools
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import LoadError, _existing_file, _first_line, _some

_module_ids = itertools.count()
# One scope at a time: a scope changes process-wide state (sys.path, sys.modules), so two at once
# (two dashboard sessions loading models) would import from each other's folders and undo each
# other's clean-up. Re-entrant, in case a user's factory itself loads a model.
_scope_lock = threading.RLock()


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
def _user_callable(spec: str, file_text: str, attr: str, role: str, forms: str) -> Iterator[Callable[[], Any]]:
    """Import `file_text` and yield its (possibly dotted) attribute `attr`, checked to be callable
    without arguments. Call it inside the with-block: only there can its code import its neighbours."""
    path = _existing_file(file_text, "Python file", forms)
    # A unique name: two files may share a stem, and every load is a fresh module.
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_quantlens_user_{stem}_{next(_module_ids)}"
    with _user_code_scope(path.parent):
        try:
            module = _import_file(path, file_text, name)
            yield _callable_attribute(module, spec, file_text, attr, role)
        finally:
            sys.modules.pop(name, None)


@contextlib.contextmanager
def _user_code_scope(directory: Path) -> Iterator[None]:
    """The file's folder first on sys.path while the block runs, so that the file imports its
    neighbours ("from layers import Block") as it would when run as a script. Afterwards sys.path is
    restored (also when the user's code changed it or raised) and the modules imported from that
    folder are forgotten: left in sys.modules, the next model's own layers.py in another folder would
    silently resolve to this one's, and a long-running process would keep every user's modules."""
    folder = directory.resolve()
    entry = str(folder)
    with _scope_lock:
        path_list = sys.path
        saved_path = list(path_list)
        # A folder already importable from keeps its imports, as any import from it would.
        already_on_path = any(_folder_of_entry(item) == folder for item in saved_path)
        saved_modules = set(sys.modules)
        path_list.insert(0, entry)
        try:
            yield
        finally:
            path_list[:] = saved_path
            sys.path = path_list  # in case the user's code rebound sys.path itself
            if entry not in saved_path:
                sys.path_importer_cache.pop(entry, None)  # the finder cached for our entry goes with it
            if not already_on_path:
                for name in [n for n in list(sys.modules) if n not in saved_modules]:
                    top = name.partition(".")[0]
                    if top not in saved_modules and folder in _folders_of(sys.modules.get(top)):
                        sys.modules.pop(name, None)


def _folder_of_entry(entry: object) -> Path | None:
    if not isinstance(entry, str):
        return None
    try:
        return Path(entry or os.curdir).resolve()  # "" on sys.path means the working directory
    except (OSError, RuntimeError):
        return None


def _folders_of(module: ModuleType | None) -> set[Path]:
    """The sys.path folders a top-level module was found in: the folder holding its file or, for a
    package, the folder holding the package's folder (several for a namespace package)."""
    spec = getattr(module, "__spec__", None)
    if spec is None:
        return set()
    if spec.submodule_search_locations is not None:
        places = [Path(p).parent for p in spec.submodule_search_locations]
    elif spec.origin and spec.has_location:
        places = [Path(spec.origin).parent]
    else:
        return set()  # built-in or frozen: not from any folder
    folders = set()
    for place in places:
        with contextlib.suppress(OSError, RuntimeError):
            folders.add(place.resolve())
    return folders


def _import_file(path: Path, shown: str, name: str) -> ModuleType:
    """Import a user's .py file as module `name` (inside a `_user_code_scope`)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot import {shown}: Python does not recognise it as a module; use a .py file")
    module = importlib.util.module_from_spec(spec)
    # A user's `import torchvision` (or transformers', or timm's) must not fail because the installed
    # wheel was built for another torch (see analysis.compat); guarded, not imported: most models
    # never import it, and importing it costs seconds.
    from analysis.compat import guard_torchvision_import

    guard_torchvision_import()
    # Registered while it runs: dataclasses and typing look a class's module up by name while the
    # class is created (dataclasses fails on an unregistered one); `_user_callable` unregisters it.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        where = f"line {exc.lineno}" if exc.lineno else "somewhere"
        raise LoadError(
            f"{shown} has a {type(exc).__name__} at {where}: {exc.msg}; fix the file and try again"
        ) from None
    except SystemExit:
        raise LoadError(
            f"{shown} called sys.exit() while being imported; put script code under if __name__ == '__main__':"
        ) from None
    except Exception as exc:
        raise LoadError(f"importing {shown} failed with {_first_line(exc)}; fix the file or its imports") from None
    return module


def _callable_attribute(module: ModuleType, spec: str, file_text: str, attr: str, role: str) -> Callable[[], Any]:
    """The module's (possibly dotted) attribute `attr`, checked to be callable without arguments."""
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
    return target
