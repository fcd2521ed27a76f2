"""Padding positions of language-model data do not count in any output metric: not in SQNR/MSE,
not in KL or top-1 agreement, not in the estimate — whatever the padding holds."""

import math

import pytest
import torch

import sample_models
from analysis.data import IGNORE_INDEX, Dataset
from analysis.formats import parse_format
from analysis.metrics import ErrorAccumulator
from analysis.sweep import AnalysisConfig, Sweep


def padded(garbage_seed: int) -> Dataset:
    split = sample_models.load_split("transformer", "calibration")
    inputs, labels = split["inputs"][:24].clone(), split["labels"][:24].clone()
    generator = torch.Generator().manual_seed(garbage_seed)
    inputs[::2, 40:] = torch.randint(0, 256, (12, 24), generator=generator)  # right padding: causal, so
    labels[::2, 40:] = IGNORE_INDEX                                          # earlier positions never see it
    return Dataset(inputs, labels, "language-model", "padded")


def run(data, mode="exact"):
    model = sample_models.load_model("transformer")
    config = AnalysisConfig(weight_formats=("int4",), act_formats=(), targets=("weights",), output_metrics=mode,
                            num_samples=len(data), weight_calibration="minmax")
    s = Sweep(model, data, config)
    return s, s.run()


def test_token_mask_marks_padding():
    data = padded(0)
    mask = data.token_mask()
    assert mask.shape == (24, 64) and int((~mask).sum()) == 12 * 24
    assert data.token_mask(1, 2) is None or bool(data.token_mask(1, 2).all())


@pytest.mark.parametrize("mode", ["exact", "estimated"])
def test_what_padding_holds_does_not_change_any_number(mode):
    _, first = run(padded(0), mode)
    _, second = run(padded(1), mode)
    for a, b in zip(first.trials, second.trials):
        assert a.output.sqnr_db == pytest.approx(b.output.sqnr_db, abs=1e-6), a.layer
        assert a.output.mse == pytest.approx(b.output.mse, rel=1e-6), a.layer
        if mode == "exact":
            assert a.output.kl == pytest.approx(b.output.kl, rel=1e-6, abs=1e-12)
            assert a.output.top1_agreement == b.output.top1_agreement


def test_output_metrics_count_only_valid_positions():
    data = padded(0)
    s, result = run(data)
    mask = data.token_mask()
    for trial in result.trials[:3]:
        reference = s.sim.forward(data.inputs, {}).double()[mask]
        quantized = s.sim.forward(data.inputs, {trial.layer: (parse_format(trial.weight_format), None)}).double()[mask]
        noise = float((reference - quantized).pow(2).sum())
        naive = 10 * math.log10(float(reference.pow(2).sum()) / noise)
        assert trial.output.sqnr_db == pytest.approx(min(naive, 100.0), abs=1e-3), trial.layer
        assert trial.output.mse == pytest.approx(noise / reference.numel(), rel=1e-4)
        agree = (reference.argmax(-1) == quantized.argmax(-1)).double().mean().item()
        assert trial.output.top1_agreement == pytest.approx(agree, abs=1e-9)


def test_accumulator_refuses_a_mask_that_does_not_fit():
    with pytest.raises(ValueError, match="does not cover"):
        ErrorAccumulator().update(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(3, 3, dtype=torch.bool))
