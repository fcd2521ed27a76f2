"""Differential tests: the sweep's activation trials against an independent, naive implementation.

test_sweep.py checks weight-only trials against a full naive forward. Here the same is done for
activation-only, weight+activation ("both") and dynamic-activation trials. The naive side shares no
code with the engine beyond the model itself:

* a deep copy of the model, with the one layer wrapped by a forward pre-hook that fake-quantizes its
  input (and, for "both", with its weight replaced by a fake-quantized copy), then the *whole* model
  run on every sample;
* activation ranges computed here: static "minmax" calibration is the min / max of the layer's FP32
  input over all calibration samples; dynamic ranges are per token (rows of the last dimension) for
  nn.Linear inputs and per sample for convolution inputs;
* the integer grids written from their stated definition (README "Formats", analysis/formats.py
  docstring), in float64: the range is first widened to include 0;
  asymmetric: q in [0, 2^b - 1], scale = (hi - lo) / (2^b - 1), zero point = round(-lo / scale)
  clamped to the code range, x_q = (clamp(round(x / scale) + zp, 0, 2^b - 1) - zp) * scale;
  symmetric (weights, per output channel): q in [-2^(b-1), 2^(b-1) - 1], scale = absmax / ((2^b - 1) / 2);
* SQNR = 10 log10(sum ref^2 / sum (ref - q)^2) over all samples, MSE and KL in float64, here.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from analysis.data import Dataset
from analysis.sweep import AnalysisConfig, analyze

TOLERANCE_DB = 0.05
WEIGHT_FORMATS = ("int4",)
ACT_FORMATS = ("int8", "int4")


# --- models and data ---------------------------------------------------------------------------


def positive_absmax_rows(model: nn.Module) -> nn.Module:
    """Flip the sign of every weight row (output channel) whose largest-magnitude element is negative.

    With scale = absmax / ((2^b - 1) / 2) a row's absmax element lands exactly on code +-(2^b - 1) / 2,
    a rounding tie. On the positive side both neighbours clamp to the same code; on the negative side
    the tie goes to -2^(b-1) or -2^(b-1) + 1 depending on the last float32 bit of the scale (both are
    equally close, so neither is wrong). Positive absmax elements keep the comparison free of ties.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                rows = module.weight.reshape(module.weight.shape[0], -1)
                peak = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))
                module.weight.mul_(torch.sign(peak).reshape(-1, *([1] * (module.weight.dim() - 1))))
    return model


class ResidualMLP(nn.Module):
    """Token-wise MLP with a residual connection: inputs [N, T, 8] -> [N, T, 4]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = h + torch.tanh(self.mid(h))
        return self.out(h)


class SmallConvNet(nn.Module):
    """Conv2d stem, a depthwise conv (groups = channels) on a residual branch, a grouped 1x1 conv,
    global average pooling and a linear classifier: inputs [N, 3, 8, 8] -> logits [N, 5]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 12, 1, groups=4)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + torch.relu(self.dw(h))
        h = torch.relu(self.grouped(h))
        return self.fc(h.mean(dim=(2, 3)))


def mlp_case():
    torch.manual_seed(1)
    # Every token gets its own magnitude, so per-token, per-sample and per-tensor ranges all differ.
    x = torch.randn(24, 5, 8) * torch.empty(24, 5, 1).uniform_(0.1, 3.0)
    return positive_absmax_rows(ResidualMLP()).eval(), Dataset(x, None, "other", "tokens")


def conv_case():
    torch.manual_seed(2)
    x = torch.randn(20, 3, 8, 8) * torch.empty(20, 1, 1, 1).uniform_(0.2, 3.0)
    return positive_absmax_rows(SmallConvNet()).eval(), Dataset(x, torch.randint(0, 5, (20,)), "classification", "images")


CASES = {"mlp": mlp_case, "conv": conv_case}
LAYERS = {"mlp": ("inp", "mid", "out"), "conv": ("stem", "dw", "grouped", "fc")}


# --- the naive reference -------------------------------------------------------------------------


def fake_quant_asym(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric integer grid over [lo, hi] widened to include 0, in float64."""
    x, lo, hi = x.double(), lo.double(), hi.double()
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return (torch.clamp(torch.round(x / scale) + zero_point, 0, qmax) - zero_point) * scale


def fake_quant_weight_sym_per_channel(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel (axis 0) grid with min-max (absmax) ranges, in float64."""
    rows = w.detach().double().reshape(w.shape[0], -1)
    absmax = rows.abs().amax(dim=1, keepdim=True)
    scale = absmax / ((2**bits - 1) / 2)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(rows / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
    return q.reshape(w.shape).float()


def dynamic_fake_quant(x: torch.Tensor, module: nn.Module, bits: int) -> torch.Tensor:
    """Ranges from x itself: one per token (row of the last dim) for Linear, one per sample for convs."""
    rows = x.reshape(-1, x.shape[-1]) if isinstance(module, nn.Linear) else x.reshape(x.shape[0], -1)
    lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    return fake_quant_asym(rows, lo, hi, bits).reshape(x.shape).float()


def layer_inputs(model: nn.Module, inputs: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """The FP32 input of each named layer over all samples."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: seen.__setitem__(name, args[0].detach().clone())) for name in names]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def quantized_copy(model, layer, weight_bits, act_bits, act_range, dynamic) -> nn.Module:
    """A copy of the model whose `layer` runs with a fake-quantized input and/or weight."""
    clone = copy.deepcopy(model).eval()
    module = clone.get_submodule(layer)
    if weight_bits is not None:
        module.weight.data = fake_quant_weight_sym_per_channel(module.weight, weight_bits)
    if act_bits is not None:
        def quantize_input(mod, args):
            x = args[0]
            if dynamic:
                q = dynamic_fake_quant(x, mod, act_bits)
            else:
                q = fake_quant_asym(x, *act_range, act_bits).float()
            return (q,) + tuple(args[1:])

        module.register_forward_pre_hook(quantize_input)
    return clone


def naive_stats(reference: torch.Tensor, quantized: torch.Tensor, logits: bool) -> dict[str, float]:
    ref, q = reference.double(), quantized.double()
    noise = float(((ref - q) ** 2).sum())
    stats = {"sqnr_db": 10 * math.log10(float((ref**2).sum()) / noise), "mse": noise / ref.numel()}
    if logits:
        log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(q, -1)
        stats["kl"] = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    return stats


def naive_trial(model, data, layer, weight_bits, act_bits, dynamic, fp32_inputs):
    """(local, output) statistics of quantizing `layer` alone, the naive way."""
    x = fp32_inputs[layer]
    act_range = (x.min(), x.max())  # minmax calibration: the range over all calibration samples
    clone = quantized_copy(model, layer, weight_bits, act_bits, act_range, dynamic)
    with torch.no_grad():
        reference_out, quantized_out = model(data.inputs), clone(data.inputs)
        # local view: the layer alone, fed its FP32 input
        reference_local = model.get_submodule(layer)(x)
        quantized_local = clone.get_submodule(layer)(x)
    return (naive_stats(reference_local, quantized_local, False),
            naive_stats(reference_out, quantized_out, data.logits))


# --- the comparison ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[(case, dynamic) for case in CASES for dynamic in (False, True)],
                ids=lambda p: f"{p[0]}-{'dynamic' if p[1] else 'static'}")
def swept(request):
    case, dynamic = request.param
    model, data = CASES[case]()
    config = AnalysisConfig(weight_formats=WEIGHT_FORMATS, act_formats=ACT_FORMATS, weight_calibration="minmax",
                            act_calibration="minmax", dynamic_activations=dynamic, cumulative=False,
                            num_samples=None)
    result = analyze(model, data, config)
    return case, dynamic, model, data, result, layer_inputs(model, data.inputs, LAYERS[case])


def _trials():
    acts = [("activations", None, int(a[3:]), a) for a in ACT_FORMATS]
    both = [("both", int(w[3:]), int(a[3:]), f"{w}/{a}") for w in WEIGHT_FORMATS for a in ACT_FORMATS]
    return acts + both


@pytest.mark.parametrize("target, weight_bits, act_bits, label", _trials(), ids=[t[3] for t in _trials()])
def test_activation_trials_match_a_naive_full_forward(swept, target, weight_bits, act_bits, label):
    case, dynamic, model, data, result, fp32_inputs = swept
    for layer in LAYERS[case]:
        trial = result.trial(layer, target, label)
        assert trial.ok, trial.error
        local, output = naive_trial(model, data, layer, weight_bits, act_bits, dynamic, fp32_inputs)
        where = f"{case} {'dynamic' if dynamic else 'static'} {layer} {target} {label}"
        # keep the comparison meaningful: neither error-free (capped) nor pure noise
        assert 3.0 < output["sqnr_db"] < 90.0 and 3.0 < local["sqnr_db"] < 90.0, (where, local, output)
        assert trial.output.sqnr_db == pytest.approx(output["sqnr_db"], abs=TOLERANCE_DB), where
        assert trial.local.sqnr_db == pytest.approx(local["sqnr_db"], abs=TOLERANCE_DB), where
        assert trial.output.mse == pytest.approx(output["mse"], rel=1e-3), where
        assert trial.local.mse == pytest.approx(local["mse"], rel=1e-3), where
        if data.logits:
            assert trial.output.kl == pytest.approx(output["kl"], rel=1e-3, abs=1e-9), where


def test_weight_trials_match_the_same_naive_reference(swept):
    """The reference's weight grid agrees with the weight-only trials (so "both" mismatches are about
    the activation side)."""
    case, dynamic, model, data, result, fp32_inputs = swept
    for layer in LAYERS[case]:
        local, output = naive_trial(model, data, layer, 4, None, dynamic, fp32_inputs)
        trial = result.trial(layer, "weights", "int4")
        assert trial.output.sqnr_db == pytest.approx(output["sqnr_db"], abs=TOLERANCE_DB), layer
        assert trial.local.sqnr_db == pytest.approx(local["sqnr_db"], abs=TOLERANCE_DB), layer


def test_the_reference_tells_the_range_conventions_apart():
    """Guard on the reference itself: on these data the alternative conventions give clearly different
    numbers, so a sweep using the wrong one cannot pass the comparison above by accident."""
    model, data = mlp_case()
    fp32 = layer_inputs(model, data.inputs, ["mid"])["mid"]
    module = model.mid
    with torch.no_grad():
        ref = module(fp32)
        per_token = module(dynamic_fake_quant(fp32, module, 4))
        rows = fp32.reshape(len(fp32), -1)
        per_sample = module(fake_quant_asym(rows, rows.amin(1, keepdim=True), rows.amax(1, keepdim=True), 4)
                            .reshape(fp32.shape).float())
        per_tensor = module(fake_quant_asym(fp32, fp32.min(), fp32.max(), 4).float())
    sqnrs = [naive_stats(ref, q, False)["sqnr_db"] for q in (per_token, per_sample, per_tensor)]
    assert sqnrs[0] > sqnrs[1] + 1.0 and sqnrs[1] > sqnrs[2] + 0.5, sqnrs
