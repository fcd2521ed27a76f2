"""MAC counts recorded on `result.layers`, against numbers worked out by hand.

Convention (analysis.layers.Layer.macs, measured by the sweep on one calibration sample): multiply-
accumulates *per sample*, i.e. for one item of the batch dimension; for a transposed convolution,
every input element times (C_out / groups x kernel elements) — the scatter form, which also counts
products that land in the cropped (padded) border.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from analysis.costs import bops
from analysis.data import Dataset
from analysis.formats import parse_format
from analysis.sweep import AnalysisConfig, analyze

CONFIG = AnalysisConfig(weight_formats=("int8",), act_formats=(), weight_calibration="minmax",
                        output_metrics=False, cumulative=False, histogram_bins=8)


def _layer_macs(model: nn.Module, sample_shape: tuple[int, ...], n: int = 3) -> dict[str, int]:
    torch.manual_seed(0)
    data = Dataset(torch.randn(n, *sample_shape))
    return {layer.name: layer.macs for layer in analyze(model, data, CONFIG).layers}


CASES = {
    # Linear on [B, T=5, F=8]: each of 5 tokens x 16 outputs takes 8 MACs: 5*16*8 = 640.
    # then Linear 16 -> 3 on the same 5 tokens: 5*3*16 = 240.
    "linear-3d": (nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 3)), (5, 8), {"0": 640, "1": 240}),
    # Linear on [B, 12]: 7 outputs x 12 inputs = 84.
    "linear-2d": (nn.Sequential(nn.Linear(12, 7)), (12,), {"0": 84}),
    # Conv2d 4 -> 8, 3x3, groups=2, padding 1 on 4x6x6: output 8x6x6 = 288 values, each sums
    # C_in/groups * 3*3 = 2*9 = 18 products: 288*18 = 5184.
    # Depthwise Conv2d 8 -> 8, 3x3, groups=8, stride 2, padding 1 on 8x6x6: output side
    # floor((6 + 2 - 3) / 2) + 1 = 3, so 8x3x3 = 72 values of 1*9 products: 72*9 = 648.
    "conv2d-grouped-depthwise": (
        nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)),
        (4, 6, 6), {"0": 5184, "1": 648}),
    # Conv1d 3 -> 6, kernel 5, stride 2, padding 2 on 3x20: length floor((20 + 4 - 5) / 2) + 1 = 10,
    # so 6x10 = 60 values of 3*5 = 15 products: 900.
    "conv1d-stride-padding": (nn.Sequential(nn.Conv1d(3, 6, 5, stride=2, padding=2)), (3, 20), {"0": 900}),
    # ConvTranspose2d 4 -> 2, 3x3, stride 2, padding 1, output_padding 1 on 4x5x5 (output 2x10x10):
    # each of the 4*5*5 = 100 input values is multiplied into C_out/groups * 3*3 = 2*9 = 18 outputs: 1800.
    # With groups=2 (4 -> 6): each input value reaches 6/2 * 9 = 27 outputs: 100*27 = 2700.
    "conv-transpose2d": (
        nn.Sequential(nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)), (4, 5, 5), {"0": 1800}),
    "conv-transpose2d-grouped": (nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1,
                                                          groups=2)), (4, 5, 5), {"0": 2700}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_macs_per_sample_match_hand_counts(case):
    model, sample_shape, expected = CASES[case]
    assert _layer_macs(model.eval(), sample_shape) == expected


def test_macs_are_per_sample_not_per_batch():
    model, sample_shape, expected = CASES["conv2d-grouped-depthwise"]
    assert _layer_macs(model.eval(), sample_shape, n=1) == _layer_macs(model.eval(), sample_shape, n=9) == expected


def test_bops_use_the_recorded_macs():
    model, sample_shape, _ = CASES["conv1d-stride-padding"]
    torch.manual_seed(0)
    layer = analyze(model.eval(), Dataset(torch.randn(2, *sample_shape)), CONFIG).layers[0]
    # 900 MACs x 4-bit weights x 8-bit activations
    assert bops(layer, parse_format("int4", "weight"), parse_format("int8", "activation")) == 900 * 4 * 8
    assert bops(layer, None, None) == 900 * 32 * 32
