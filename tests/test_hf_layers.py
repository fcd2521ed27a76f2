"""Layers as Hugging Face writes them: GPT-2's Conv1D (x @ W + b with W stored [in, out]), checked
against a naive reference that replaces the weight in the real model and runs it."""

import math

import pytest
import torch
from torch import nn

from analysis.data import Dataset
from analysis.formats import parse_format
from analysis.quantsim import quantize_weight
from analysis.sweep import AnalysisConfig, Sweep


class AddmmLayer(nn.Module):
    """The Conv1D pattern without transformers: weight [in, out], torch.addmm in forward."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(shape)


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = AddmmLayer(16, 48)
        self.down = AddmmLayer(48, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def naive_output_sqnr(model: nn.Module, inputs: torch.Tensor, param: str, axis: int, fmt: str) -> float:
    """Replace one weight in a copy of the real model by its fake-quantized value and run it."""
    import copy

    reference = model(inputs).detach().double()
    quantized_model = copy.deepcopy(model)
    weight = dict(quantized_model.named_parameters())[param]
    q, _, _ = quantize_weight(weight, parse_format(fmt), axis, "minmax", 99.99)
    with torch.no_grad():
        weight.copy_(q)
    out = quantized_model(inputs).detach().double()
    return 10 * math.log10(float(reference.pow(2).sum() / (reference - out).pow(2).sum()))


def sweep(model, data):
    config = AnalysisConfig(weight_formats=("int4",), act_formats=(), targets=("weights",),
                            weight_calibration="minmax", num_samples=len(data))
    return Sweep(model, data, config)


def test_addmm_weights_are_layers_quantized_per_output_column():
    model = Mixer().eval()
    torch.manual_seed(1)
    data = Dataset(torch.randn(32, 5, 16), None, "other", "synthetic")
    s = sweep(model, data)
    result = s.run()
    layers = {layer.name: layer for layer in s.layers}
    assert set(layers) == {"up", "down"}
    assert layers["up"].channel_axis == 1 and layers["up"].weight_shape == (16, 48)
    assert layers["up"].macs == 5 * 16 * 48  # per sample: 5 tokens × in × out
    params = s.sim.param_names()
    for trial in result.trials:
        naive = naive_output_sqnr(model, data.inputs, params[trial.layer], 1, "int4")
        assert trial.output.sqnr_db == pytest.approx(naive, abs=0.01), trial.layer


def test_gpt2_conv1d_layers_are_all_analysed_and_match_the_real_model():
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (quantlens[hf])")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    lm = transformers.GPT2LMHeadModel(config).eval()

    class Logits(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids, use_cache=False).logits

    model = Logits(lm).eval()
    ids = torch.randint(0, 64, (12, 8))
    s = sweep(model, Dataset(ids, ids, "language-model", "tokens"))
    result = s.run()
    conv1d = [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"]
    assert len(conv1d) == 8 and set(conv1d) <= set(s.sim.layer_names)
    params = s.sim.param_names()
    for trial in result.trials:
        if trial.layer in conv1d:
            naive = naive_output_sqnr(model, ids, params[trial.layer], 1, "int4")
            assert trial.output.sqnr_db == pytest.approx(naive, abs=0.5), trial.layer


def test_hugging_face_causal_lms_run_with_their_default_config_and_are_left_alone():
    """use_cache=True is the default; the analysis turns it off on its private copy only."""
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (quantlens[hf])")
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).eval()
    assert lm.config.use_cache is True
    ids = torch.randint(0, 64, (6, 8))
    s = sweep(lm, Dataset(ids, ids, "language-model", "tokens"))
    s.run()
    names = set(s.sim.layer_names)
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "lm_head"} <= names
    assert lm.config.use_cache is True


def test_a_run_that_covers_part_of_the_weights_says_so(tmp_path, capsys):
    """nn.Bilinear is not analysed: the CLI says which share of the weight matrices the run covers."""
    import numpy as np

    from analysis.cli import main

    factory = tmp_path / "partial.py"
    factory.write_text("import torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n"
                       "    def __init__(self):\n        super().__init__()\n        torch.manual_seed(0)\n"
                       "        self.fc = nn.Linear(6, 8)\n        self.bi = nn.Bilinear(8, 8, 4)\n\n"
                       "    def forward(self, x):\n        h = self.fc(x)\n        return self.bi(h, h)\n\n\n"
                       "def build():\n    return Net()\n")
    np.savez(tmp_path / "x.npz", inputs=np.random.default_rng(0).normal(size=(16, 6)).astype("float32"))
    assert main(["analyze", f"{factory}:build", "--data", str(tmp_path / "x.npz"), "--act-formats", "none",
                 "--quiet", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    # fc: 6·8 = 48 weights analysed; bi: 8·8·4 = 256 not: 48 of 304 = 16 %
    assert "note: the analysed layers hold 16 % of the model's weight-matrix parameters (48 of 304)" in out
    import json

    coverage = json.loads((tmp_path / "out" / "analysis.json").read_text())["model"]["weight_coverage"]
    assert coverage == {"analysed_weights": 48, "total_weights": 304}
