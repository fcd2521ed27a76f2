"""Load a model from a sample name, a library's model name ("torchvision:resnet18", "timm:..."), a
"file.py:factory" (plus weights) or a torch.export program."""

from __future__ import annotations

import contextlib
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..finite import all_finite
from .errors import LoadError, _existing_file, _first_line, _some
from .hf import is_model_dir, load_model_dir
from .libraries import build_library_model, library_spec
from .user_code import _split_callable_spec, _user_callable
from .weights import _WEIGHT_EXTENSIONS, _check_weights_path, _load_weights

_MODEL_FORMS = (
    "pass sample:<name>, a Hugging Face model directory (config.json + model.safetensors), torchvision:<name> or "
    "timm:<name> (options as ?num_classes=10), path/to/file.py:factory (with --weights for the weights) or a "
    "torch.export model.pt2"
)


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


def load_model(spec: str, weights: str | None = None, *,
               trust_remote_code: bool = False) -> nn.Module | torch.export.ExportedProgram:
    """Load the model `spec` names ("sample:<name>", a Hugging Face model directory, "torchvision:<name>",
    "timm:<name>", "file.py:factory" or "model.pt2"), in eval mode.

    `weights` (.safetensors, .pt or .pth holding a state dict) goes with "file.py:factory" and library
    models (see `analysis.loading.libraries`).
    `trust_remote_code`: let a Hugging Face directory run the Python files it ships (off by default).
    Raises LoadError with a one-line message for anything wrong with the spec or the files,
    including NaN/Inf in a parameter (which leaves quantization ranges undefined).
    """
    model = _load_model(spec, weights, trust_remote_code)
    _check_finite_parameters(model, str(weights) if weights is not None else str(spec).strip())
    return model


def _load_model(spec: str, weights: str | None, trust_remote_code: bool) -> nn.Module | torch.export.ExportedProgram:
    spec = str(spec).strip()
    if not spec:
        raise LoadError(f"no model given; {_MODEL_FORMS}")
    if is_model_dir(spec):
        if weights is not None:
            raise LoadError(f"{spec} is a Hugging Face model directory with its own weights; drop --weights {weights}")
        return load_model_dir(spec, spec, trust_remote_code)
    if Path(spec).is_dir():
        raise LoadError(f"{spec} is a directory without config.json, not a Hugging Face model directory; "
                        f"{_MODEL_FORMS}")
    if spec.startswith("sample:"):
        if weights is not None:
            raise LoadError(f"{spec} comes with its own weights; drop --weights {weights}")
        return _load_sample_model(spec.removeprefix("sample:"))

    library = library_spec(spec)
    factory = _split_callable_spec(spec) if library is None else None
    if library is not None or factory is not None:
        weight_path = _check_weights_path(weights) if weights is not None else None
        model = build_library_model(spec, *library) if library is not None else _call_factory(spec, *factory)
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
        if param.is_floating_point() and param.device.type != "meta" and not all_finite(param):
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


def _call_factory(spec: str, file_text: str, attr: str) -> nn.Module:
    with _user_callable(spec, file_text, attr, "factory", _MODEL_FORMS) as factory:
        try:
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
