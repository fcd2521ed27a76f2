"""Remedies and QAT for one precision map, measured the same way and side by side.

`recovery_table` evaluates the map as post-training quantized (the baseline), then each calibration
remedy applied to the whole map — other weight / activation clipping, per-channel weights where the
map has per-tensor ones, SmoothQuant on every eligible layer — and quantization-aware fine-tuning:
the task metric and the output SQNR on held-out data, and the share of the PTQ drop each one wins
back. Rows that cannot apply say why instead of a number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from torch import nn

from analysis.calibration import CALIBRATION_METHODS
from analysis.config import QATConfig, QuantConfig
from analysis.data import Dataset
from analysis.evaluate import Evaluation, Evaluator, metric_drop
from analysis.precision_map import LayerPrecision, PrecisionMap
from analysis.qat.loop import ProgressFn, QATResult, finetune_qat


def _row(remedy: str, evaluation: Evaluation | None, fp32: float | None, ptq: float | None, **extra: Any) -> dict[str, Any]:
    if evaluation is None:
        return _figures(remedy, None, None, None, fp32, ptq, **extra)
    return _figures(remedy, evaluation.metric_name, evaluation.metric,
                    evaluation.output.sqnr_db if evaluation.output else None, fp32, ptq, **extra)


def _figures(remedy: str, name: str | None, metric: float | None, sqnr: float | None, fp32: float | None,
             ptq: float | None, **extra: Any) -> dict[str, Any]:
    drop, ptq_drop = metric_drop(name, fp32, metric), metric_drop(name, fp32, ptq)
    recovered = (ptq_drop - drop) / ptq_drop if drop is not None and ptq_drop and ptq_drop > 0 else None
    return {"remedy": remedy, "metric": metric, "drop": drop, "output_sqnr_db": sqnr, "recovered": recovered,
            "note": "", **extra}


def _per_channel(pmap: PrecisionMap) -> PrecisionMap | None:
    """The map with per-tensor weights made per-channel (None when it has none)."""
    layers, changed = {}, False
    for name, precision in pmap.layers.items():
        weight = precision.weight
        if weight and weight.endswith("-pt"):
            weight, changed = weight[: -len("-pt")] + "-pc", True
        layers[name] = LayerPrecision(weight, precision.activation)
    return replace(pmap, layers=layers) if changed else None


def _smoothed(model: Any, pmap: PrecisionMap, calibration: Dataset, layer_names: list[str]) -> tuple[nn.Module, list[str]]:
    """SmoothQuant migration (alpha 0.5) on every Linear / groups=1 convolution whose weight and
    input the map both quantize; the layers it applied to."""
    from analysis.finetune import smooth_model

    smoothed, applied = model, []
    for name in layer_names:
        weight, act = pmap.precision(name).formats()
        if weight is None or act is None:
            continue
        try:
            smoothed, _ = smooth_model(smoothed, name, calibration.inputs)
            applied.append(name)
        except ValueError:
            continue  # not a Linear / plain convolution: SmoothQuant does not apply there
    return smoothed, applied


def recovery_table(model: Any, pmap: PrecisionMap, calibration: Dataset, evaluation: Dataset, *,
                   train: Dataset | None = None, qat: QATConfig | None = None,
                   progress: ProgressFn | None = None,
                   on_row: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[dict[str, Any]], QATResult | None]:
    """Rows {"remedy", "metric", "drop", "output_sqnr_db", "recovered", "note"} for the map as PTQ,
    each remedy and QAT (`qat` None: no QAT row), all on `evaluation`; and the QAT result. `train`
    defaults to `calibration`. `recovered` is the share of the PTQ drop won back (1.0: FP32)."""
    base = Evaluator(model, calibration, evaluation, pmap.quant)
    pmap.validate(base.layer_names)
    ptq = base.evaluate(pmap, "PTQ")
    fp32, ptq_metric = base.fp32_metric, ptq.metric
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row:
            on_row(row)

    add(_row("PTQ (the map as calibrated)", ptq, fp32, ptq_metric, note=f"FP32: {fp32:.2f}" if fp32 is not None else ""))

    def remedy(name: str, quant: QuantConfig, candidate: PrecisionMap, target: Any = model, note: str = "") -> None:
        try:
            evaluator = Evaluator(target, calibration, evaluation, quant)
            add(_row(name, evaluator.evaluate(replace(candidate, quant=quant), name), fp32, ptq_metric, note=note))
        except Exception as exc:  # noqa: BLE001 — a remedy that fails is reported, not fatal
            add(_row(name, None, fp32, ptq_metric, note=f"not applicable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"))

    quantizes_inputs = any(pmap.precision(n).formats()[1] is not None for n in base.layer_names)
    for method in CALIBRATION_METHODS:
        if method != pmap.quant.weight_calibration:
            remedy(f"weight clipping: {method}", replace(pmap.quant, weight_calibration=method), pmap)
    if quantizes_inputs:
        for method in CALIBRATION_METHODS:
            if method != pmap.quant.act_calibration:
                remedy(f"activation clipping: {method}", replace(pmap.quant, act_calibration=method), pmap)
    per_channel = _per_channel(pmap)
    if per_channel is not None:
        remedy("per-channel weights", pmap.quant, per_channel)
    if quantizes_inputs and isinstance(model, nn.Module):
        smoothed, applied = _smoothed(model, pmap, calibration, base.layer_names)
        if applied:
            remedy("SmoothQuant (alpha 0.5)", pmap.quant, pmap, smoothed, note=f"on {', '.join(applied)}")
        else:
            add(_row("SmoothQuant (alpha 0.5)", None, fp32, ptq_metric, note="not applicable: no Linear or plain "
                     "convolution with both weight and input quantized"))
    result = None
    if qat is not None:
        result = finetune_qat(model, pmap, train or calibration, calibration, evaluation=evaluation, config=qat,
                              progress=progress)
        # The model QAT hands back: the fine-tuned one, or the PTQ one when fine-tuning did not beat it.
        sqnr = result.qat_output_sqnr_db if result.kept == "qat" else result.ptq_output_sqnr_db
        label = (f"QAT (best epoch {result.best_epoch} of {len(result.history) - 1})" if result.kept == "qat"
                 else f"QAT (no better than PTQ in {len(result.history) - 1} epochs: PTQ kept)")
        add(_figures(label, result.metric_name, result.returned, sqnr, fp32, ptq_metric,
                     note="; ".join([result.validation_source, *result.notes])))
    return rows, result
