"""Bundled sample models: small trained fp32 models with calibration and evaluation data.

Each sample lives in ``sample_models/<name>/`` as ``model.safetensors``, ``calibration.safetensors``,
``evaluation.safetensors`` and ``meta.json``; ``python -m sample_models.train`` rebuilds them.
"""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import load_file
from safetensors.torch import load_model as _load_weights

from .models import DigitsCNN, DigitsMLP, TinyTransformerLM, build_llama, import_transformers

__all__ = ["SAMPLE_NAMES", "HF_SAMPLES", "SPLITS", "sample_dir", "build_model", "load_model", "load_split", "load_meta"]

SAMPLE_NAMES: tuple[str, ...] = ("mlp", "cnn", "transformer", "llama")
# Samples stored as Hugging Face directories (config.json, model.safetensors, tokenizer files).
HF_SAMPLES: tuple[str, ...] = ("llama",)
SPLITS: tuple[str, ...] = ("calibration", "evaluation")

_ARCHITECTURES: dict[str, type[torch.nn.Module]] = {
    "mlp": DigitsMLP,
    "cnn": DigitsCNN,
    "transformer": TinyTransformerLM,
}
_ROOT = pathlib.Path(__file__).resolve().parent


def _check_name(name: str) -> str:
    if name not in SAMPLE_NAMES:
        raise ValueError(f"unknown sample model {name!r}; valid names: {', '.join(SAMPLE_NAMES)}")
    return name


def sample_dir(name: str) -> pathlib.Path:
    """Directory holding the files of sample ``name``."""
    return _ROOT / _check_name(name)


def build_model(name: str) -> torch.nn.Module:
    """A fresh, untrained instance of sample ``name``'s architecture."""
    if _check_name(name) in HF_SAMPLES:
        return build_llama()
    return _ARCHITECTURES[name]()


def load_model(name: str) -> torch.nn.Module:
    """A fresh instance of sample ``name`` with its trained weights, in eval mode.

    Loading is strict: a missing or unexpected key raises ``RuntimeError``. The safetensors
    helper is used because the file stores tied weights once, under one of their names.
    """
    if _check_name(name) in HF_SAMPLES:
        # The way users load theirs: from the directory, with the class its config names, offline.
        transformers = import_transformers()
        return transformers.AutoModelForCausalLM.from_pretrained(str(sample_dir(name)), local_files_only=True).eval()
    model = build_model(name)
    _load_weights(model, sample_dir(name) / "model.safetensors", strict=True)
    return model.eval()


def load_split(name: str, split: str) -> dict[str, torch.Tensor]:
    """The ``"calibration"`` or ``"evaluation"`` data of sample ``name``: ``{"inputs", "labels"}``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    path = sample_dir(name) / f"{split}.safetensors"
    tensors = load_file(path)
    if set(tensors) != {"inputs", "labels"}:
        raise RuntimeError(f"{path} holds keys {sorted(tensors)}, expected ['inputs', 'labels']")
    return tensors


def load_meta(name: str) -> dict:
    """The ``meta.json`` of sample ``name`` (task, metric, fp32_metric, input_shape, recipe, ...).

    ``input_shape`` uses -1 for the batch dimension.
    """
    return json.loads((sample_dir(name) / "meta.json").read_text(encoding="utf-8"))
