"""Quantization-aware fine-tuning: recover what a precision map loses, and never hand back worse.

`finetune_qat(model, pmap, train, calibration, validation=..., evaluation=..., config=QATConfig())`
returns a `QATResult`: the model to deploy (the fine-tuned one, or the PTQ one when fine-tuning did
not beat it on validation), FP32 / PTQ / QAT figures on held-out data, the per-epoch history and
notes. `analysis.qat.instrument` builds the training graph (fake quantization, straight-through
gradients, optional LSQ scales); `analysis.qat.loop` trains, validates and selects.
"""

from analysis.qat.loop import (
    EpochRecord,
    QATError,
    QATResult,
    Split,
    check_labels,
    finetune_qat,
    split_train_validation,
    task_loss,
)

__all__ = ["EpochRecord", "QATError", "QATResult", "Split", "check_labels", "finetune_qat",
           "split_train_validation", "task_loss"]
