"""Load a data set from a sample split, a .npz/.pt/.safetensors file or a "file.py:function"."""

from __future__ import annotations

import difflib
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import MAX_DATA_BYTES
from ..data import POSITIONAL, TASKS, Dataset, NamedInputs, infer_task
from ..finite import all_finite
from .errors import LoadError, _dtype, _existing_file, _first_line, _shape
from .hf import TEXT_SUFFIXES, load_text, split_text_spec
from .tensor_files import _safetensors_load, _torch_load
from .user_code import _split_callable_spec, _user_callable

_SAVE_DATA = (
    'save plain tensors with torch.save({"inputs": x, "labels": y}, path), '
    "numpy.savez(path, inputs=x, labels=y) or safetensors.torch.save_file({...}, path)"
)
_DATA_FORMS = (
    "pass sample:<name>, a .npz/.pt/.safetensors file with key 'inputs' (or arrays named after forward's "
    "parameters, e.g. input_ids and attention_mask) and optionally 'labels', path/to/file.py:function, "
    "or a text file with --tokenizer DIR --seq-len N"
)


def load_data(spec: str, split: str = "calibration", task: str | None = None, *,
              max_samples: int | None = None, max_bytes: int = MAX_DATA_BYTES,
              tokenizer: str | None = None, seq_len: int | None = None) -> Dataset:
    """Load the data set `spec` names ("sample:<name>", a .npz/.pt/.safetensors file, "file.py:function",
    or a text file with `tokenizer` (a local Hugging Face tokenizer directory) and `seq_len`, which the
    spec may also carry in its recorded form "corpus.txt#tokenizer=DIR,seq_len=N").

    `split` ("calibration" or "evaluation") only applies to samples; a user's file is one set and the
    caller takes the first N samples. `task` defaults to the sample's task or `infer_task(labels)`.

    `max_samples`: only the first N samples are read (a .npz reads just those rows out of the zip,
    a `file.py:function` generator is stopped after them). `max_bytes` bounds what is read into
    memory: an .npz whose arrays declare more (a zip bomb), or a generator that yields more, is
    refused with one line before the memory is used.
    """
    spec = str(spec).strip()
    if task is not None and task not in TASKS:
        raise LoadError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise LoadError(f"the number of samples to read must be a positive integer, not {max_samples!r}")
    limit = _Limit(max_samples, max_bytes)
    if not spec:
        raise LoadError(f"no data given; {_DATA_FORMS}")

    recorded = split_text_spec(spec)
    if recorded is not None:
        spec, tokenizer, seq_len = recorded
    if tokenizer is not None or seq_len is not None:
        if tokenizer is None or seq_len is None:
            raise LoadError(f"text data needs both --tokenizer DIR and --seq-len N (got only "
                            f"{'--tokenizer' if tokenizer else '--seq-len'})")
        if task not in (None, "language-model"):
            raise LoadError(f"text data is next-token language modelling; drop --task {task}")
        return load_text(_existing_file(spec, "text file", _DATA_FORMS), spec, tokenizer, seq_len, max_samples,
                         max_bytes)

    if spec.startswith("sample:"):
        name = spec.removeprefix("sample:")
        inputs, labels, sample_task = _load_sample_split(name, split)
        return _finish(*limit.rows({POSITIONAL: inputs}, labels), task or sample_task, f"{name}/{split}", spec)

    function = _split_callable_spec(spec)
    if function is not None:
        inputs, labels = _data_from_function(spec, *function, limit)
        return _finish(inputs, labels, task, f"{Path(function[0]).name}:{function[1]}", spec)

    path = _existing_file(spec, "data file", _DATA_FORMS)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        tensors = _read_npz(path, spec, limit)
    elif suffix in (".pt", ".pth"):
        obj = _torch_load(path, spec, "data dict", _SAVE_DATA)
        if not isinstance(obj, Mapping):
            raise LoadError(f"{spec} holds a {type(obj).__name__}, not a dict with key 'inputs'; {_SAVE_DATA}")
        tensors = dict(obj)
    elif suffix == ".safetensors":
        tensors = _safetensors_load(path, spec)
    elif suffix == ".py":
        raise LoadError(f"{spec} is Python source: name the function that returns the batches too, as {spec}:function")
    elif suffix in TEXT_SUFFIXES:
        raise LoadError(f"{spec} is text: tokenize it with --tokenizer DIR (a local Hugging Face tokenizer directory, "
                        "e.g. the model's) and --seq-len N")
    else:
        raise LoadError(f"unsupported data file {spec} (extension {suffix or 'none'!r}); {_DATA_FORMS}")
    inputs, labels = _split_keys(tensors, spec)
    inputs = {name: _as_tensor(value, name, spec) for name, value in inputs.items()}
    labels = None if labels is None else _as_tensor(labels, "labels", spec)
    return _finish(*limit.rows(inputs, labels), task, path.name, spec)


class _Limit:
    """How many samples, and how many bytes, a load may read."""

    def __init__(self, samples: int | None, max_bytes: int) -> None:
        self.samples, self.max_bytes = samples, max_bytes

    def rows(self, inputs: dict[str, Any], labels: Any) -> tuple[dict[str, Any], Any]:
        """The first `samples` rows of every input and of the labels (each cut only where it has rows)."""
        if self.samples is None:
            return inputs, labels
        if labels is not None and getattr(labels, "ndim", 0):
            labels = labels[: self.samples]
        return {name: value[: self.samples] if getattr(value, "ndim", 0) else value
                for name, value in inputs.items()}, labels

    def too_big(self, shown: str, what: str, size: int, fix: str) -> LoadError:
        return LoadError(
            f"{shown}: {what} need {_size(size)} in memory, over the {_size(self.max_bytes)} limit on data read "
            f"at once; {fix}"
        )


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


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


def _read_npz(path: Path, shown: str, limit: _Limit) -> dict[str, Any]:
    """The arrays of an .npz, reading only what is needed: each member's .npy header is parsed out
    of the zip first, its declared size checked against the zip entry and the memory limit, and only
    the first `limit.samples` rows are decompressed (np.load would inflate every array whole)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(6)
    except OSError as exc:
        raise LoadError(f"cannot read {shown}: {_first_line(exc)}") from None
    # A pickle renamed to .npz is refused (pickles can run code); a bare .npy is one array, not an
    # archive; anything else that is not a zip is a file of another kind.
    if head.startswith(b"\x80"):
        raise LoadError(
            f"{shown} holds pickled data, which is refused because pickles can run code; {_SAVE_DATA}"
        )
    if head.startswith(b"\x93NUMPY"):
        raise LoadError(f"{shown} holds a single array, not a .npz archive with key 'inputs'; {_SAVE_DATA}")
    if head and not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        kind = "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "bytes"
        raise LoadError(
            f"{shown} is not a .npz archive (it starts with {kind}, not a zip header: a file of another kind, "
            f"or corrupt); {_SAVE_DATA}"
        )
    try:
        archive = zipfile.ZipFile(path)
    except Exception as exc:  # BadZipFile, a truncated central directory, ...
        raise LoadError(
            f"{shown} is not a readable .npz archive ({_first_line(exc, 160)}); it may be truncated or corrupt"
        ) from None
    with archive:
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
        _split_keys(members, shown)  # refuses unknown keys before anything is decompressed
        budget = limit.max_bytes
        tensors: dict[str, Any] = {}
        for key, member in members.items():
            tensors[key] = _read_npy_member(archive, member, key, shown, limit, budget)
            budget -= tensors[key].nbytes
    return tensors


_READ_CHUNK = 16 << 20


def _read_npy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, shown: str, limit: _Limit,
                     budget: int) -> np.ndarray:
    corrupt = "the file may be truncated or corrupt"
    try:
        with archive.open(info) as stream:
            version = np.lib.format.read_magic(stream)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(stream)
            if dtype.hasobject:
                raise LoadError(
                    f"{shown} stores {key!r} as a pickled object array, which is refused because pickles "
                    f"can run code; store numeric arrays, e.g. np.savez(path, {key}=np.asarray(x, dtype=np.float32))"
                )
            declared = math.prod(shape) * dtype.itemsize
            if info.file_size != stream.tell() + declared:
                raise LoadError(
                    f"{shown}: array {key!r} declares shape {_shape(shape)} of {dtype} ({declared} bytes) but its "
                    f"zip entry holds {info.file_size - stream.tell()} bytes; {corrupt}"
                )
            rows = shape[0] if shape else 1
            take = rows if limit.samples is None or not shape else min(rows, limit.samples)
            if fortran and len(shape) > 1:
                take = rows  # column-major rows are not contiguous: the whole array is read, then cut
            shape_read = (take, *shape[1:]) if shape else ()
            need = math.prod(shape_read) * dtype.itemsize
            if need > budget:
                raise limit.too_big(shown, f"{take} samples of {key!r} ({_shape(shape_read)} {dtype})", need,
                                    "pass --samples N (only the first N samples are read) or split the file")
            raw = np.empty(need, dtype=np.uint8)
            view, done = memoryview(raw), 0
            while done < need:
                got = stream.readinto(view[done: done + _READ_CHUNK])
                if not got:
                    raise LoadError(f"{shown}: array {key!r} ends after {done} of {need} bytes; {corrupt}")
                done += got
    except LoadError:
        raise
    except Exception as exc:  # noqa: BLE001 — bad headers, inflate errors, encrypted or unknown compression
        raise LoadError(f"{shown}: array {key!r} cannot be read ({_first_line(exc, 160)}); {corrupt}") from None
    array = raw.view(dtype).reshape(shape_read, order="F" if fortran else "C")
    return array[: limit.samples] if limit.samples is not None and shape else array


def _split_keys(tensors: Mapping[str, Any], shown: str) -> tuple[dict[str, Any], Any]:
    """(inputs by name, labels): every key but 'labels' is an input, passed to forward under its name
    ('inputs' positionally)."""
    found = sorted(map(str, tensors))
    listing = ", ".join(repr(k) for k in found) if found else "none"
    names = [k for k in found if k != "labels"]
    if not names:
        raise LoadError(
            f"{shown} has no input arrays (keys found: {listing}); store the inputs under 'inputs' (or under the "
            f"names of forward's parameters) and labels under 'labels'"
        )
    for name in names:
        # Strict on purpose: a misspelt "label" would otherwise be passed to forward, or drop the labels.
        if difflib.get_close_matches(name.lower(), ["labels"], n=1, cutoff=0.75):
            raise LoadError(f"{shown} has key {name!r}; did you mean 'labels'? (keys found: {listing})")
        if not name.isidentifier():
            raise LoadError(
                f"{shown} has key {name!r}, which cannot be a parameter name of forward (keys found: {listing}); "
                f"name input arrays after forward's parameters, e.g. 'inputs' or 'input_ids'"
            )
    return {name: tensors[name] for name in names}, tensors.get("labels")


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
    if tensor.dtype == torch.float64 or tensor.dtype in _FLOAT8:
        # float64: the models run in fp32. float8: torch computes almost nothing in it (not even
        # isfinite); float32 holds every float8 value exactly.
        tensor = tensor.to(torch.float32)
    return tensor


_FLOAT8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                                                    "float8_e8m0fnu") if hasattr(torch, name))


def _data_from_function(spec: str, file_text: str, attr: str,
                        limit: _Limit) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    inputs: list[dict[str, torch.Tensor]] = []
    labels: list[torch.Tensor] = []
    samples = held = 0
    with _user_callable(spec, file_text, attr, "function", _DATA_FORMS) as function:
        try:
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
                if index and set(x) != set(inputs[0]):
                    raise LoadError(f"{spec}: batch {index} has inputs {', '.join(sorted(x))} but batch 0 had "
                                    f"{', '.join(sorted(inputs[0]))}; every batch needs the same input names")
                if index and (y is None) != (not labels):
                    this, first = ("has no", "has") if y is None else ("has", "has none")
                    raise LoadError(
                        f"{spec}: batch {index} {this} labels but batch 0 {first}; give every batch labels or none"
                    )
                inputs.append(x)
                if y is not None:
                    labels.append(y)
                lengths = {len(t) for t in x.values()} | ({len(y)} if y is not None else set())
                if len(lengths) > 1:
                    raise LoadError(f"{spec}: batch {index} has inputs and labels of different lengths "
                                    f"({', '.join(map(str, sorted(lengths)))}); each needs one row per sample")
                samples += len(next(iter(x.values())))
                held += sum(t.nbytes for t in x.values()) + (0 if y is None else y.nbytes)
                if limit.samples is not None and samples >= limit.samples:
                    break  # an endless generator stops here; it is closed below
                if held > limit.max_bytes:
                    raise limit.too_big(spec, f"the {samples} samples {attr}() yielded so far", held,
                                        "pass --samples N (reading stops after N samples) or yield fewer batches")
            close = getattr(iterator, "close", None)
            if callable(close):
                close()
        except LoadError:
            raise
        except SystemExit:  # not an Exception: it would end the CLI or the dashboard's server
            raise LoadError(f"{attr}() in {file_text} called sys.exit(); it must return or yield batches") from None
        except Exception as exc:
            raise LoadError(
                f"{attr}() in {file_text} raised {_first_line(exc)} while producing batches; fix the function"
            ) from None
    if not inputs:
        raise LoadError(f"{spec} has no samples: {attr}() produced no batches")
    joined = {name: _concat([batch[name] for batch in inputs], name, spec) for name in inputs[0]}
    return limit.rows(joined, _concat(labels, "labels", spec) if labels else None)


def _parse_batch(batch: Any, index: int, spec: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    where = f"{spec} batch {index}"
    if isinstance(batch, Mapping):
        named, y = _split_keys(batch, where)
    elif isinstance(batch, (tuple, list)):
        if len(batch) not in (1, 2):
            raise LoadError(
                f"{spec}: batch {index} has {len(batch)} items; a batch is inputs, (inputs, labels) or a dict"
            )
        named, y = {POSITIONAL: batch[0]}, (batch[1] if len(batch) == 2 else None)
    else:
        named, y = {POSITIONAL: batch}, None
    x = {name: _as_tensor(value, name, where) for name, value in named.items()}
    if isinstance(y, (int, float, list)):
        y = torch.as_tensor(y)
    y = None if y is None else _as_tensor(y, "labels", where)
    for name, tensor in (*x.items(), ("labels", y)):
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


def _finish(inputs: dict[str, torch.Tensor], labels: torch.Tensor | None, task: str | None, name: str,
            shown: str) -> Dataset:
    """Validate inputs and labels, settle the task, and build the Dataset (a lone 'inputs' array stays a
    plain tensor; several arrays become `NamedInputs`)."""
    for key, tensor in inputs.items():
        what = "inputs" if key == POSITIONAL else f"input {key!r}"
        mask = key != POSITIONAL and tensor.dtype == torch.bool  # boolean attention masks are inputs too
        if not mask and (tensor.dtype == torch.bool or tensor.is_complex()
                         or not (tensor.is_floating_point() or _is_integer(tensor))):
            raise LoadError(
                f"{shown}: {what} {'have' if key == POSITIONAL else 'has'} dtype {_dtype(tensor.dtype)}; use "
                "floating-point values or integer token ids"
            )
        if tensor.dim() == 0:
            raise LoadError(f"{shown}: {what} {'are' if key == POSITIONAL else 'is'} a scalar; store samples along "
                            "dimension 0")
        if len(tensor) == 0:
            raise LoadError(f"{shown} has no samples: {what} {'have' if key == POSITIONAL else 'has'} shape "
                            f"{_shape(tensor.shape)}")
        _check_finite(tensor, what, shown)
    lengths = {key: len(t) for key, t in inputs.items()}
    if len(set(lengths.values())) > 1:
        shown_lengths = ", ".join(f"{key}: {n}" for key, n in lengths.items())
        raise LoadError(f"{shown}: the input arrays hold different numbers of samples ({shown_lengths}); each needs "
                        "one row per sample")
    samples = next(iter(lengths.values()))

    if labels is not None:
        if labels.dim() == 0:
            raise LoadError(f"{shown}: labels are a scalar; store one label per sample along dimension 0")
        if len(labels) != samples:
            raise LoadError(f"{shown} has {samples} inputs but {len(labels)} labels; they must pair up one to one")
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
    value = inputs[POSITIONAL] if list(inputs) == [POSITIONAL] else NamedInputs(inputs)
    try:
        return Dataset(value, labels, task, name)
    except ValueError as exc:
        raise LoadError(f"{shown}: {exc}") from None


def _is_integer(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype != torch.bool


def _check_finite(tensor: torch.Tensor, what: str, shown: str) -> None:
    if all_finite(tensor):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        nan = int(torch.isnan(tensor).sum())
        raise LoadError(
            f"{shown}: {what} hold {bad} non-finite values ({nan} NaN, {bad - nan} Inf) out of {tensor.numel()}; "
            f"clean them or drop those samples"
        )
