"""Load users' models and data sets, turning every way their files can be broken into one clear line.

Users point the tool at their own files, and what they bring is often broken: a pickled module
instead of a state dict, weights saved from a different architecture, a truncated download, a data
file with the wrong keys. Every such problem raises `LoadError` with a single-line message that
says what is wrong and how to fix it, instead of a traceback from deep inside torch.

Model specs:
    sample:<name>                 a bundled sample model (see `sample_models`)
    path/to/file.py:factory       call `factory()` from that file; weights via `weights=`
    path/to/model.pt2             a program saved with `torch.export.save`

Data specs:
    sample:<name>                 the `split` of a bundled sample
    data.npz / data.pt / data.safetensors   key "inputs" and optional key "labels"
    path/to/file.py:function      `function()` returns (or yields) batches

Trust model: .py files and .pt2 programs run code by design (the user named them). Weight and data
files are data, so they are read without unpickling arbitrary objects (`weights_only=True`,
`allow_pickle=False`): a downloaded checkpoint must never be able to run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import itertools
import logging
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import TASKS, Dataset, infer_task

__all__ = ["LoadError", "load_model", "load_data", "check_compatible", "model_fingerprint"]

_WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".pth")
_DATA_EXTENSIONS = (".npz", ".pt", ".pth", ".safetensors")
# Checkpoint dicts commonly nest the state dict under one of these keys (plain scripts, tutorials,
# training frameworks); anything else is reported rather than guessed.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model")
# DataParallel / wrapper modules prefix every key; stripped only when the model has no such prefix.
_WRAPPER_PREFIXES = ("module.", "model.")
_DATA_KEYS = ("inputs", "labels")
_MAX_NAMED = 3

_SAVE_STATE_DICT = (
    "save a plain state dict with torch.save(model.state_dict(), path) "
    "or safetensors.torch.save_file(model.state_dict(), path)"
)
_SAVE_DATA = (
    'save plain tensors with torch.save({"inputs": x, "labels": y}, path), '
    "numpy.savez(path, inputs=x, labels=y) or safetensors.torch.save_file({...}, path)"
)
_MODEL_FORMS = (
    "pass sample:<name>, path/to/file.py:factory (with --weights for the weights) or a torch.export model.pt2"
)
_DATA_FORMS = (
    "pass sample:<name>, a .npz/.pt/.safetensors file with key 'inputs' (and 'labels') or path/to/file.py:function"
)

_module_ids = itertools.count()


class LoadError(ValueError):
    """A model or data set could not be loaded; the message is one line naming the problem and the fix."""

    def __init__(self, message: str) -> None:
        # Enforce the one-line contract here, so no embedded library message can break it.
        super().__init__(" ".join(part.strip() for part in str(message).splitlines() if part.strip()))


# ---------------------------------------------------------------------------------------------
# small helpers


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


class _CaptureLog(logging.Filter):
    """Holds back a logger's records, keeping the exceptions they carry."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])
        return False


@contextlib.contextmanager
def _captured_log(name: str) -> Iterator[_CaptureLog]:
    # torch.export.load logs the real cause (with a traceback) and then raises a vague error that
    # points at "the warnings above"; the cause is captured here and put into the one-line message.
    logger = logging.getLogger(name)
    capture = _CaptureLog()
    logger.addFilter(capture)
    try:
        yield capture
    finally:
        logger.removeFilter(capture)


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


# ---------------------------------------------------------------------------------------------
# models


def load_model(spec: str, weights: str | None = None) -> nn.Module | torch.export.ExportedProgram:
    """Load the model `spec` names ("sample:<name>", "file.py:factory" or "model.pt2"), in eval mode.

    `weights` (.safetensors, .pt or .pth holding a state dict) only goes with "file.py:factory".
    Raises LoadError with a one-line message for anything wrong with the spec or the files,
    including NaN/Inf in a parameter (which leaves quantization ranges undefined).
    """
    model = _load_model(spec, weights)
    _check_finite_parameters(model, str(weights) if weights is not None else str(spec).strip())
    return model


def _load_model(spec: str, weights: str | None) -> nn.Module | torch.export.ExportedProgram:
    spec = str(spec).strip()
    if not spec:
        raise LoadError(f"no model given; {_MODEL_FORMS}")
    if spec.startswith("sample:"):
        if weights is not None:
            raise LoadError(f"{spec} comes with its own weights; drop --weights {weights}")
        return _load_sample_model(spec.removeprefix("sample:"))

    factory = _split_callable_spec(spec)
    if factory is not None:
        weight_path = _check_weights_path(weights) if weights is not None else None
        model = _call_factory(spec, *factory)
        if weight_path is not None:
            _load_weights(model, weight_path, str(weights))
        # The analysis measures inference: dropout off, BatchNorm on its running statistics.
        return model.eval()

    path = _existing_file(spec, "model file", _MODEL_FORMS)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        if weights is not None:
            raise LoadError(f"{spec} is an exported program that already holds its weights; drop --weights {weights}")
        return _load_exported(path, spec)
    if suffix in _WEIGHT_EXTENSIONS or suffix in (".bin", ".ckpt"):
        raise LoadError(
            f"{spec} holds weights, not an architecture: pass the architecture as file.py:factory "
            f"and the file with --weights {spec}"
        )
    if suffix == ".py":
        raise LoadError(f"{spec} is Python source: name the function that builds the model too, as {spec}:factory")
    raise LoadError(f"unsupported model file {spec} (extension {suffix or 'none'!r}); {_MODEL_FORMS}")


def _check_finite_parameters(model: nn.Module | torch.export.ExportedProgram, shown: str) -> None:
    """NaN/Inf in a parameter (a diverged training run) leaves every quantization range undefined.

    Parameters only: buffers may hold -inf on purpose (causal attention masks)."""
    bad = []
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.device.type != "meta" and not bool(torch.isfinite(param).all()):
            nan = int(torch.isnan(param).sum())
            bad.append(f"{name} has {nan} NaN and {int((~torch.isfinite(param)).sum()) - nan} Inf of {param.numel()}")
    if bad:
        layer = bad[0].split(" ", 1)[0].rpartition(".")[0] or bad[0].split(" ", 1)[0]
        raise LoadError(
            f"the weights of {shown} hold non-finite values ({_some(bad)}), so layer {layer} cannot be quantized: "
            f"quantization ranges of NaN/Inf are undefined; fix the model or re-export its weights"
        )


def _load_sample_model(name: str) -> nn.Module:
    import sample_models

    if name not in sample_models.SAMPLE_NAMES:
        raise LoadError(f"unknown sample model {name!r}; valid names: {', '.join(sample_models.SAMPLE_NAMES)}")
    try:
        return sample_models.load_model(name)
    except Exception as exc:
        raise LoadError(
            f"sample model {name!r} could not be loaded ({_first_line(exc, 160)}); "
            f"rebuild the samples with python -m sample_models.train"
        ) from None


def _check_weights_path(weights: str) -> Path:
    path = _existing_file(str(weights), "weights file", "pass a .safetensors, .pt or .pth state dict with --weights")
    suffix = path.suffix.lower()
    if suffix not in _WEIGHT_EXTENSIONS:
        raise LoadError(
            f"weights file {weights} has unsupported extension {suffix or 'none'!r}; "
            f"use a state dict in .safetensors, .pt or .pth"
        )
    return path


def _call_factory(spec: str, file_text: str, attr: str) -> nn.Module:
    factory, path = _resolve_callable(spec, file_text, attr, "factory", _MODEL_FORMS)
    try:
        with _on_sys_path(path.parent):
            model = factory()
    except SystemExit:
        raise LoadError(f"{attr}() in {file_text} called sys.exit(); it must return the model") from None
    except Exception as exc:
        raise LoadError(f"{attr}() in {file_text} raised {_first_line(exc)}; fix the factory") from None
    if not isinstance(model, nn.Module):
        raise LoadError(
            f"{attr}() in {file_text} returned a {type(model).__name__}, not a torch.nn.Module; "
            f"return the model instance"
        )
    return model


def _load_exported(path: Path, shown: str) -> torch.export.ExportedProgram:
    # Random bytes and cut-off downloads fail here with the plainest message.
    if not zipfile.is_zipfile(path):
        raise LoadError(
            f"{shown} is not a torch.export archive (not a zip file; truncated or corrupt?); "
            f"re-create it with torch.export.save(torch.export.export(model, args), path)"
        )
    with _captured_log("torch.export") as log:
        try:
            program = torch.export.load(path)
        except Exception as exc:
            cause = log.errors[0] if log.errors else exc
            raise LoadError(
                f"{shown} could not be loaded as an exported program ({_first_line(cause, 160)}); "
                f"it may be truncated, corrupt or from another torch version; re-create it with "
                f"torch.export.save(torch.export.export(model, args), path) "
                f"using torch {torch.__version__.split('+')[0]}"
            ) from None
    if not isinstance(program, torch.export.ExportedProgram):
        raise LoadError(
            f"{shown} holds a {type(program).__name__}, not an exported program; save one with torch.export.save"
        )
    return program


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


# ---------------------------------------------------------------------------------------------
# data


def load_data(spec: str, split: str = "calibration", task: str | None = None) -> Dataset:
    """Load the data set `spec` names ("sample:<name>", a .npz/.pt/.safetensors file or "file.py:function").

    `split` ("calibration" or "evaluation") only applies to samples; a user's file is one set and the
    caller takes the first N samples. `task` defaults to the sample's task or `infer_task(labels)`.
    """
    spec = str(spec).strip()
    if task is not None and task not in TASKS:
        raise LoadError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if not spec:
        raise LoadError(f"no data given; {_DATA_FORMS}")

    if spec.startswith("sample:"):
        name = spec.removeprefix("sample:")
        inputs, labels, sample_task = _load_sample_split(name, split)
        return _finish(inputs, labels, task or sample_task, f"{name}/{split}", spec)

    function = _split_callable_spec(spec)
    if function is not None:
        inputs, labels = _data_from_function(spec, *function)
        return _finish(inputs, labels, task, f"{Path(function[0]).name}:{function[1]}", spec)

    path = _existing_file(spec, "data file", _DATA_FORMS)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        tensors = _read_npz(path, spec)
    elif suffix in (".pt", ".pth"):
        obj = _torch_load(path, spec, "data dict", _SAVE_DATA)
        if not isinstance(obj, Mapping):
            raise LoadError(f"{spec} holds a {type(obj).__name__}, not a dict with key 'inputs'; {_SAVE_DATA}")
        tensors = dict(obj)
    elif suffix == ".safetensors":
        tensors = _safetensors_load(path, spec)
    elif suffix == ".py":
        raise LoadError(f"{spec} is Python source: name the function that returns the batches too, as {spec}:function")
    else:
        raise LoadError(f"unsupported data file {spec} (extension {suffix or 'none'!r}); {_DATA_FORMS}")
    inputs, labels = _split_keys(tensors, spec)
    inputs = _as_tensor(inputs, "inputs", spec)
    labels = None if labels is None else _as_tensor(labels, "labels", spec)
    return _finish(inputs, labels, task, path.name, spec)


def _load_sample_split(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    import sample_models

    if name not in sample_models.SAMPLE_NAMES:
        raise LoadError(f"unknown sample {name!r}; valid names: {', '.join(sample_models.SAMPLE_NAMES)}")
    splits = getattr(sample_models, "SPLITS", ("calibration", "evaluation"))
    if split not in splits:
        raise LoadError(f"unknown split {split!r}; valid splits: {', '.join(splits)}")
    try:
        tensors = sample_models.load_split(name, split)
        sample_task = sample_models.load_meta(name)["task"]
    except Exception as exc:
        raise LoadError(
            f"the {split} data of sample {name!r} could not be loaded ({_first_line(exc, 160)}); "
            f"rebuild the samples with python -m sample_models.train"
        ) from None
    return tensors["inputs"], tensors.get("labels"), sample_task


def _read_npz(path: Path, shown: str) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            head = handle.read(6)
    except OSError as exc:
        raise LoadError(f"cannot read {shown}: {_first_line(exc)}") from None
    # np.load reads anything that is neither a zip nor a .npy header as a pickle, so a text file (or
    # random bytes) would be refused as "pickled data"; only a real pickle (protocol >= 2) is called one.
    if head and not head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY", b"\x80")):
        kind = "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "bytes"
        raise LoadError(
            f"{shown} is not a .npz archive (it starts with {kind}, not a zip header: a file of another kind, "
            f"or corrupt); {_SAVE_DATA}"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as exc:  # a pickle renamed to .npz: refused, since pickles can run code
        raise LoadError(
            f"{shown} holds pickled data ({_first_line(exc, 120)}), which is refused because pickles can run code; "
            f"{_SAVE_DATA}"
        ) from None
    except Exception as exc:
        raise LoadError(
            f"{shown} is not a readable .npz archive ({_first_line(exc, 160)}); it may be truncated or corrupt"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise LoadError(f"{shown} holds a single array, not a .npz archive with key 'inputs'; {_SAVE_DATA}")
    tensors: dict[str, Any] = {}
    with archive:
        for key in archive.files:
            try:
                tensors[key] = archive[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise LoadError(
                        f"{shown} stores {key!r} as a pickled object array, which is refused because pickles "
                        f"can run code; store numeric arrays, "
                        f"e.g. np.savez(path, {key}=np.asarray(x, dtype=np.float32))"
                    ) from None
                raise LoadError(f"{shown}: array {key!r} cannot be read ({_first_line(exc, 160)})") from None
            except Exception as exc:
                raise LoadError(
                    f"{shown}: array {key!r} cannot be read ({_first_line(exc, 160)}); "
                    f"the file may be truncated or corrupt"
                ) from None
    return tensors


def _split_keys(tensors: Mapping[str, Any], shown: str) -> tuple[Any, Any]:
    # Strict on purpose: a misspelt "label" would otherwise silently drop the labels (and the task metric).
    found = sorted(map(str, tensors))
    listing = ", ".join(repr(k) for k in found) if found else "none"
    if "inputs" not in tensors:
        raise LoadError(
            f"{shown} has no key 'inputs' (keys found: {listing}); "
            f"store the inputs under 'inputs' and labels under 'labels'"
        )
    extra = [k for k in found if k not in _DATA_KEYS]
    if extra:
        raise LoadError(
            f"{shown} has unexpected keys {', '.join(repr(k) for k in extra)} (keys found: {listing}); "
            f"only 'inputs' and optionally 'labels' are read"
        )
    return tensors["inputs"], tensors.get("labels")


def _as_tensor(value: Any, what: str, shown: str) -> torch.Tensor:
    """Numpy arrays and tensors to a CPU tensor; float64 becomes float32 (the models run in fp32)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise LoadError(f"{shown}: {what} have numpy dtype {value.dtype}, not numbers; store a numeric array")
        if value.dtype.kind == "u" and value.dtype.itemsize > 1:
            value = value.astype(np.int64)  # torch has little support for uint16/32/64
        tensor = torch.from_numpy(np.array(value, copy=True, order="C"))
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
    else:
        raise LoadError(f"{shown}: {what} is a {type(value).__name__}, not a tensor or array")
    if tensor.dtype == torch.float64:
        tensor = tensor.to(torch.float32)
    return tensor


def _data_from_function(spec: str, file_text: str, attr: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    function, path = _resolve_callable(spec, file_text, attr, "function", _DATA_FORMS)
    inputs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        with _on_sys_path(path.parent):
            result = function()
            if result is None:
                raise LoadError(f"{attr}() in {file_text} returned None; it must return or yield batches")
            # A single tensor or dict is one batch; iterating a tensor would split it into samples.
            batches = [result] if isinstance(result, (torch.Tensor, np.ndarray, Mapping)) else result
            try:
                iterator = iter(batches)
            except TypeError:
                raise LoadError(
                    f"{attr}() in {file_text} returned a {type(result).__name__}, not an iterable of batches"
                ) from None
            for index, batch in enumerate(iterator):
                x, y = _parse_batch(batch, index, spec)
                if index and (y is None) != (not labels):
                    this, first = ("has no", "has") if y is None else ("has", "has none")
                    raise LoadError(
                        f"{spec}: batch {index} {this} labels but batch 0 {first}; give every batch labels or none"
                    )
                inputs.append(x)
                if y is not None:
                    labels.append(y)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(
            f"{attr}() in {file_text} raised {_first_line(exc)} while producing batches; fix the function"
        ) from None
    if not inputs:
        raise LoadError(f"{spec} has no samples: {attr}() produced no batches")
    return _concat(inputs, "inputs", spec), (_concat(labels, "labels", spec) if labels else None)


def _parse_batch(batch: Any, index: int, spec: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        x, y = _split_keys(batch, f"{spec} batch {index}")
    elif isinstance(batch, (tuple, list)):
        if len(batch) not in (1, 2):
            raise LoadError(
                f"{spec}: batch {index} has {len(batch)} items; a batch is inputs, (inputs, labels) or a dict"
            )
        x, y = batch[0], (batch[1] if len(batch) == 2 else None)
    else:
        x, y = batch, None
    where = f"{spec} batch {index}"
    x = _as_tensor(x, "inputs", where)
    if isinstance(y, (int, float, list)):
        y = torch.as_tensor(y)
    y = None if y is None else _as_tensor(y, "labels", where)
    for name, tensor in (("inputs", x), ("labels", y)):
        if tensor is not None and tensor.dim() == 0:
            raise LoadError(
                f"{where}: {name} are a scalar; batches need a leading batch dimension "
                f"(yield batches, not single samples)"
            )
    return x, y


def _concat(parts: list[torch.Tensor], what: str, spec: str) -> torch.Tensor:
    first = tuple(parts[0].shape[1:])
    for index, part in enumerate(parts):
        if tuple(part.shape[1:]) != first:
            raise LoadError(
                f"{spec}: batch {index} {what} have shape {_shape(part.shape)} "
                f"but batch 0 had {_shape(parts[0].shape)}; "
                f"all batches must agree after the batch dimension"
            )
    return torch.cat(parts, dim=0)


def _finish(inputs: torch.Tensor, labels: torch.Tensor | None, task: str | None, name: str, shown: str) -> Dataset:
    """Validate inputs and labels, settle the task, and build the Dataset."""
    if inputs.dtype == torch.bool or inputs.is_complex() or not (inputs.is_floating_point() or _is_integer(inputs)):
        raise LoadError(
            f"{shown}: inputs have dtype {_dtype(inputs.dtype)}; use floating-point values or integer token ids"
        )
    if inputs.dim() == 0:
        raise LoadError(f"{shown}: inputs are a scalar; store samples along dimension 0")
    if len(inputs) == 0:
        raise LoadError(f"{shown} has no samples: inputs have shape {_shape(inputs.shape)}")
    _check_finite(inputs, "inputs", shown)

    if labels is not None:
        if labels.dim() == 0:
            raise LoadError(f"{shown}: labels are a scalar; store one label per sample along dimension 0")
        if len(labels) != len(inputs):
            raise LoadError(f"{shown} has {len(inputs)} inputs but {len(labels)} labels; they must pair up one to one")
        if labels.is_floating_point():
            _check_finite(labels, "labels", shown)
        elif labels.dtype == torch.bool or labels.is_complex() or not _is_integer(labels):
            raise LoadError(
                f"{shown}: labels have dtype {_dtype(labels.dtype)}; use integer class ids (or floats for regression)"
            )
        else:
            labels = labels.to(torch.int64)  # cross-entropy and accuracy want int64 class ids

    task = task or infer_task(labels)
    if labels is not None and task in ("classification", "language-model"):
        need = 1 if task == "classification" else 2
        if labels.is_floating_point():
            raise LoadError(
                f"{shown}: labels are {_dtype(labels.dtype)} but task {task!r} needs integer ids; "
                f"store them as integers or use task 'other'"
            )
        if labels.dim() != need:
            layout = "[N] class ids" if need == 1 else "[N, T] next-token ids"
            raise LoadError(f"{shown}: labels have shape {_shape(labels.shape)} but task {task!r} needs {layout}")
    try:
        return Dataset(inputs, labels, task, name)
    except ValueError as exc:
        raise LoadError(f"{shown}: {exc}") from None


def _is_integer(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype != torch.bool


def _check_finite(tensor: torch.Tensor, what: str, shown: str) -> None:
    if not tensor.is_floating_point():
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        nan = int(torch.isnan(tensor).sum())
        raise LoadError(
            f"{shown}: {what} hold {bad} non-finite values ({nan} NaN, {bad - nan} Inf) out of {tensor.numel()}; "
            f"clean them or drop those samples"
        )


# ---------------------------------------------------------------------------------------------
# checks on the pair


def check_compatible(model: nn.Module | torch.export.ExportedProgram, data: Dataset) -> None:
    """Run the model on the first sample; LoadError if it fails or gives no floating-point output."""
    module = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    sample = data.inputs[:1]
    described = f"input of shape {_shape(sample.shape)} dtype {_dtype(sample.dtype)} from {data.name}"
    try:
        with torch.inference_mode():
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
