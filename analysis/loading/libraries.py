"""Models named by a library's own name: "torchvision:resnet18", "timm:mobilenetv3_small_050?num_classes=10".

A *model library* builds an architecture from its name and constructor options. quantlens never
downloads: the library is asked for the architecture only (torchvision `weights=None`, timm
`pretrained=False`), options that would fetch or read weights are refused, and trained weights come
from a local state dict passed with `--weights`, as for `file.py:factory`.

Spec form: `<library>:<name>[?key=value&key=value...]`. Values are read as integers, floats,
`true`/`false`/`none`, and otherwise kept as strings; they are passed to the constructor as keyword
arguments (`num_classes`, `image_size` for torchvision's ViTs, `img_size` for timm's, `width_mult`, ...).

Random initialisation runs under a fixed seed with the caller's random state restored afterwards,
so one spec always gives the same weights (on one torch and library version): `suggest`, `evaluate`
and `export` can rebuild the model a run analysed and find the fingerprint it recorded.

Supporting another library is one `register_model_library(...)` call.
"""

from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import LoadError, _first_line

# The seed random initialisation runs under (see the module doc).
INIT_SEED = 0


@dataclass(frozen=True)
class ModelLibrary:
    """A library that builds models by name.

    `names()` lists what `build` accepts; `refuse(name)` says why a listed model cannot be analysed
    (None: it can); `build(name, options)` returns the architecture with random weights; `refused`
    are option names that would download or read weights, refused with a pointer to `--weights`."""

    prefix: str
    extra: str  # the pip extra that installs it
    load: Callable[[], Any]  # imports the library (ImportError when absent)
    names: Callable[[Any], list[str]]
    build: Callable[[Any, str, dict[str, Any]], nn.Module]
    refuse: Callable[[Any, str], str | None] = lambda library, name: None
    refused: tuple[str, ...] = ()


MODEL_LIBRARIES: dict[str, ModelLibrary] = {}


def register_model_library(library: ModelLibrary) -> ModelLibrary:
    """Add (or replace, by prefix) a model library."""
    MODEL_LIBRARIES[library.prefix] = library
    return library


def library_spec(spec: str) -> tuple[ModelLibrary, str, dict[str, Any]] | None:
    """(library, model name, options) when `spec` names a model of a registered library, else None.
    LoadError (one line) for a malformed name or option."""
    prefix, sep, rest = str(spec).strip().partition(":")
    library = MODEL_LIBRARIES.get(prefix)
    if not sep or library is None:
        return None
    name, _, query = rest.partition("?")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise LoadError(f"{spec} names no {prefix} model; write {prefix}:<model name>, optionally with "
                        f"constructor options: {prefix}:resnet18?num_classes=10")
    return library, name, _parse_options(spec, query)


def is_library_spec(spec: str | None) -> bool:
    """Whether `spec` names a registered library's model (it is a name, not a path)."""
    prefix, sep, _ = str(spec or "").strip().partition(":")
    return bool(sep) and prefix in MODEL_LIBRARIES


def _parse_options(spec: str, query: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in query.split("&") if query else ():
        key, eq, text = item.partition("=")
        if not eq or not key.isidentifier():
            raise LoadError(f"option {item!r} in {spec} is not key=value; write options as "
                            f"?num_classes=10&key=value (keys are the constructor's argument names)")
        if key in options:
            raise LoadError(f"option {key} is given twice in {spec}; keep one")
        options[key] = _option_value(text)
    return options


def _option_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build_library_model(spec: str, library: ModelLibrary, name: str, options: dict[str, Any]) -> nn.Module:
    """Build `name` with random weights under INIT_SEED; LoadError (one line) for whatever goes wrong."""
    try:
        module = library.load()
    except ImportError as exc:
        raise LoadError(f"{spec} needs {library.prefix}, which is not importable here ({_first_line(exc, 120)}); "
                        f'install it with pip install -e ".[{library.extra}]"') from None
    names = library.names(module)
    base = name.partition(".")[0]
    if name not in names and base in names:
        raise LoadError(f"{name} names pretrained weights ({name.partition('.')[2]}), and quantlens never downloads; "
                        f"use {library.prefix}:{base} with a local state dict in --weights")
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"see {library.prefix}'s list of models"
        raise LoadError(f"{library.prefix} has no model {name!r}; {hint}")
    reason = library.refuse(module, name)
    if reason is not None:
        raise LoadError(reason)
    bad = [key for key in options if key in library.refused]
    if bad:
        raise LoadError(f"option {bad[0]} in {spec} would download or read weights, and quantlens never downloads; "
                        f"drop it and pass a local state dict with --weights")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        try:
            model = library.build(module, name, options)
        except Exception as exc:  # noqa: BLE001 — constructors fail in every exception type
            raise LoadError(f"{library.prefix} could not build {name} with options {options or 'none'} "
                            f"({_first_line(exc, 200)}); check the option names and values") from None
    if not isinstance(model, nn.Module):
        raise LoadError(f"{library.prefix} returned a {type(model).__name__} for {name}, not a torch.nn.Module")
    return model


# --- torchvision ---------------------------------------------------------------------------------

# Model families whose forward takes something other than one image batch, or that are quantized already.
_TORCHVISION_FAMILIES_REFUSED = {
    "detection": "a detection model (it takes a list of images and returns boxes); quantlens analyses models "
                 "that map a tensor batch to a tensor",
    "optical_flow": "an optical-flow model (it takes two image batches); quantlens analyses one-input models",
    "quantization": "an already quantized model; analyse its float version (drop the quantized_ prefix)",
}


def _torchvision_load() -> Any:
    from analysis.compat import import_torchvision

    return import_torchvision()


def _torchvision_refuse(torchvision: Any, name: str) -> str | None:
    for family, reason in _TORCHVISION_FAMILIES_REFUSED.items():
        if name in torchvision.models.list_models(module=getattr(torchvision.models, family)):
            return f"torchvision:{name} is {reason}"
    return None


def _torchvision_build(torchvision: Any, name: str, options: dict[str, Any]) -> nn.Module:
    builder = torchvision.models.get_model_builder(name)
    no_download = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        no_download["weights_backbone"] = None  # segmentation models default to an ImageNet backbone
    return builder(**no_download, **options)


register_model_library(ModelLibrary(
    prefix="torchvision", extra="vision", load=_torchvision_load,
    names=lambda torchvision: torchvision.models.list_models(),
    build=_torchvision_build, refuse=_torchvision_refuse,
    refused=("weights", "weights_backbone", "pretrained", "pretrained_backbone"),
))


# --- timm ----------------------------------------------------------------------------------------


def _timm_load() -> Any:
    from analysis.compat import import_timm

    return import_timm()


register_model_library(ModelLibrary(
    prefix="timm", extra="vision", load=_timm_load,
    names=lambda timm: timm.list_models(),
    build=lambda timm, name, options: timm.create_model(name, pretrained=False, **options),
    refused=("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"),
))
