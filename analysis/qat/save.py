"""A fine-tuned model as every consumer reads one: a normal weights file plus a precision map whose
provenance names that file (with its sha256) and whose fingerprint is the fine-tuned model's.

`evaluate`, `export` (AIMET, ONNX, ORT, torchao) and the dashboard reload the model a map records,
so after `save_fine_tuned` they all work on the fine-tuned weights, and recalibrate the ranges on
them, without knowing that QAT happened. The map also records what it was fine-tuned from.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.fx
from torch import nn

from analysis.evaluate import metric_drop
from analysis.precision_map import PrecisionMap
from analysis.provenance import Provenance, record
from analysis.qat.loop import QATError, QATResult


def architecture_spec(model: nn.Module, model_spec: str | None) -> str:
    """A `file.py:factory` spec that builds `model`'s architecture and takes a weights file: the
    original spec when it is one, else (sample models) the class's own source file and name."""
    if model_spec and ":" in model_spec and not model_spec.startswith("sample:") \
            and Path(model_spec.rpartition(":")[0]).suffix == ".py":
        return model_spec
    cls = type(model)
    try:
        source = inspect.getsourcefile(cls)
    except TypeError:
        source = None
    if source is None or "." in cls.__qualname__ or not _builds_without_arguments(cls):
        raise QATError(f"the fine-tuned {cls.__name__} cannot be described as file.py:factory plus a weights file "
                       "(it is not a module-level class built without arguments); save result.model yourself")
    return f"{Path(source).resolve()}:{cls.__qualname__}"


def _builds_without_arguments(cls: type) -> bool:
    try:
        inspect.signature(cls).bind()
    except (TypeError, ValueError):
        return False
    return True


def save_fine_tuned(result: QATResult, pmap: PrecisionMap, weights_path: str | Path, *,
                    model_spec: str | None, data_spec: str | None, source: Any = None) -> PrecisionMap:
    """Write `result.model`'s weights (.safetensors) and return `pmap` re-pointed at them: `model`
    is the fine-tuned model's fingerprint, `provenance` records the architecture spec, the weights
    file and its sha256, and `fine_tuned_from` (the map's previous model and weights; `source`, the
    model that was fine-tuned, gives its fingerprint when the map has none), `measured`
    the held-out figures. The reloaded file is checked against the fine-tuned model (QATError if
    it does not reproduce it). Save the returned map where you like (`.save(path)`)."""
    from safetensors.torch import save_model

    from analysis.loading import load_model, model_fingerprint

    model = result.model
    if not isinstance(model, nn.Module) or isinstance(model, torch.fx.GraphModule):
        raise QATError("the fine-tuned model is a traced graph (an exported program, or weights that do not map back "
                       "onto the model's class), so no map can reload it; use result.model directly")
    spec = architecture_spec(model, model_spec)
    weights_path = Path(weights_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(weights_path))
    fingerprint = model_fingerprint(model)
    reloaded = load_model(spec, str(weights_path))
    if model_fingerprint(reloaded) != fingerprint:
        raise QATError(f"{spec} with {weights_path} does not reload the fine-tuned model (fingerprints differ)")
    before = Provenance.from_dict(pmap.provenance)
    provenance = record(spec, str(weights_path), data_spec or before.data_spec, model_fingerprint=fingerprint).to_dict()
    provenance["fine_tuned_from"] = {k: v for k, v in {
        "model_spec": before.model_spec or model_spec, "weights": before.weights, "weights_sha256": before.weights_sha256,
        "model_fingerprint": pmap.model or before.model_fingerprint
        or (model_fingerprint(source) if source is not None else None)}.items() if v is not None}
    provenance["fine_tuning"] = {"kept": result.kept, "best_epoch": result.best_epoch, "lr": result.config.lr,
                                 "loss": result.loss, "ranges": result.config.ranges}
    measured: dict[str, Any] = {}
    if result.metric_name is not None and result.returned is not None:
        measured = {"metric": result.returned, "drop": metric_drop(result.metric_name, result.fp32, result.returned)}
    sqnr = result.qat_output_sqnr_db if result.kept == "qat" else result.ptq_output_sqnr_db
    if sqnr is not None:
        measured["sqnr_db"] = sqnr
    return replace(pmap, model=fingerprint, provenance=provenance, measured=measured or pmap.measured)
