"""Models that take several inputs by name (input_ids + attention_mask, encoder + decoder ids):
loaded from one data file, bound to forward's parameters, and measured as the real model computes."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from analysis.data import Dataset, NamedInputs, call_model
from analysis.formats import parse_format
from analysis.loading import LoadError, check_compatible, load_data
from analysis.quantsim import quantize_weight
from analysis.sweep import AnalysisConfig, Sweep


class Masked(nn.Module):
    """forward(x, mask, scale=2.0): a keyword with a default stays at its default."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x, mask, scale: float = 2.0):
        h = torch.relu(self.fc1(x)) * mask.unsqueeze(-1)
        return self.fc2(h.sum(1) * scale)


def naive_output_sqnr(model: nn.Module, inputs: NamedInputs, param: str, axis: int, fmt: str) -> float:
    """Replace one weight in a copy of the real model by its fake-quantized value and run it."""
    def output(m):
        out = call_model(m, inputs)
        return (out.logits if hasattr(out, "logits") else out).detach().double()

    reference = output(model)
    quantized_model = copy.deepcopy(model)
    weight = dict(quantized_model.named_parameters())[param]
    q, _, _ = quantize_weight(weight, parse_format(fmt), axis, "minmax", 99.99)
    with torch.no_grad():
        weight.copy_(q)
    out = output(quantized_model)
    return 10 * math.log10(float(reference.pow(2).sum() / (reference - out).pow(2).sum()))


def run(model, data):
    config = AnalysisConfig(weight_formats=("int4",), act_formats=(), targets=("weights",),
                            weight_calibration="minmax", num_samples=len(data))
    s = Sweep(model, data, config)
    return s, s.run()


def check_against_real_model(model, data, s, result, tolerance=0.5):
    params = s.sim.param_names()
    checked = 0
    for trial in result.trials:
        axis = s.sim.layer(trial.layer).channel_axis
        naive = min(naive_output_sqnr(model, data.inputs, params[trial.layer], axis, "int4"), 100.0)  # the cap
        assert trial.output.sqnr_db == pytest.approx(naive, abs=tolerance), trial.layer
        checked += 1
    return checked


def test_named_arrays_in_a_file_reach_forward_by_name(tmp_path):
    rng = np.random.default_rng(0)
    mask = (rng.random((24, 5)) > 0.3).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(24, 5, 6)).astype(np.float32), mask=mask,
             labels=rng.integers(0, 3, 24))
    data = load_data(str(tmp_path / "d.npz"))
    assert isinstance(data.inputs, NamedInputs) and data.inputs.names == ("mask", "x")
    assert data.task == "classification" and len(data) == 24
    assert len(load_data(str(tmp_path / "d.npz"), max_samples=5).inputs) == 5
    model = Masked().eval()
    check_compatible(model, data)
    s, result = run(model, data)
    assert set(s.sim.layer_names) == {"fc1", "fc2"}
    assert check_against_real_model(model, data, s, result, tolerance=0.01) == 2


def test_the_mask_changes_the_numbers():
    """Binding by name, not by position: swapping which array is the mask changes the output."""
    torch.manual_seed(1)
    x, mask = torch.randn(8, 5, 6), (torch.rand(8, 5) > 0.5).float()
    model = Masked().eval()
    s, _ = run(model, Dataset(NamedInputs({"mask": mask, "x": x})))
    out = s.sim.forward(NamedInputs({"x": x, "mask": mask}))
    assert torch.allclose(out, model(x, mask), atol=1e-5)
    assert not torch.allclose(out, model(x, torch.ones_like(mask)), atol=1e-3)


def test_a_generator_may_yield_dicts(tmp_path):
    source = tmp_path / "gen.py"
    source.write_text("import torch\n\n\ndef batches():\n    torch.manual_seed(0)\n    for _ in range(3):\n"
                      "        yield {'x': torch.randn(4, 5, 6), 'mask': torch.ones(4, 5), 'labels': torch.zeros(4, dtype=torch.long)}\n")
    data = load_data(f"{source}:batches")
    assert data.inputs.names == ("mask", "x") and len(data) == 12 and data.labels.shape == (12,)


def test_a_generator_changing_its_input_names_is_refused(tmp_path):
    source = tmp_path / "gen.py"
    source.write_text("import torch\n\n\ndef batches():\n    yield {'x': torch.randn(4, 6)}\n"
                      "    yield {'x': torch.randn(4, 6), 'mask': torch.ones(4)}\n")
    with pytest.raises(LoadError, match="every batch needs the same input names"):
        load_data(f"{source}:batches")


def test_arrays_of_different_lengths_are_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 6), np.float32), mask=np.ones((3, 5), np.float32))
    with pytest.raises(LoadError, match=r"different numbers of samples \(mask: 3, x: 4\)"):
        load_data(str(tmp_path / "d.npz"))


def test_a_missing_required_input_is_one_line(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 5, 6), np.float32), scale=np.ones(4, np.float32))
    data = load_data(str(tmp_path / "d.npz"))
    with pytest.raises(Exception, match="needs input 'mask'"):
        Sweep(Masked().eval(), data, AnalysisConfig(weight_formats=("int8",), act_formats=(), targets=("weights",)))


transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (quantlens[hf])")


def test_bert_with_padding_masks_matches_the_real_model():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(1, 64, (12, 10))
    mask = torch.ones(12, 10, dtype=torch.long)
    mask[::2, 6:] = 0  # padded samples: what the padding holds must not matter
    ids[::2, 6:] = 0
    data = Dataset(NamedInputs({"input_ids": ids, "attention_mask": mask}), torch.randint(0, 3, (12,)),
                   "classification", "tokens")
    s, result = run(model, data)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears <= set(s.sim.layer_names)
    assert check_against_real_model(model, data, s, result) >= len(linears)
    # the mask is really used: without it the real model and the simulator both give another output
    ones = torch.ones_like(mask)
    unmasked = s.sim.forward(NamedInputs({"input_ids": ids, "attention_mask": ones}))
    with torch.no_grad():
        assert torch.allclose(unmasked, model(input_ids=ids, attention_mask=ones).logits, atol=1e-6)
        assert torch.allclose(s.sim.forward(data.inputs), model(input_ids=ids, attention_mask=mask).logits, atol=1e-6)
    assert not torch.equal(unmasked, s.sim.forward(data.inputs))


def test_t5_encoder_decoder_with_in_place_updates_matches_the_real_model():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                   num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = torch.randint(1, 64, (8, 7))
    decoder_ids = torch.randint(1, 64, (8, 5))
    data = Dataset(NamedInputs({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                "decoder_input_ids": decoder_ids}), None, "other", "t5")
    s, result = run(model, data)
    q_layers = [name for name in s.sim.layer_names if name.endswith(("SelfAttention.q", "SelfAttention.k"))]
    assert len(q_layers) == 4
    assert check_against_real_model(model, data, s, result) == len(result.trials)


def test_qwen2_causal_lm_matches_the_real_model():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, 64, (6, 10))
    data = Dataset(NamedInputs({"input_ids": ids}), torch.roll(ids, -1, 1), "language-model", "tokens")
    s, result = run(model, data)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears <= set(s.sim.layer_names)  # q/k/v (with biases in Qwen2), o, gate/up/down, lm_head
    assert check_against_real_model(model, data, s, result) >= len(linears)


def test_hugging_face_vit_on_pixel_values_matches_the_real_model():
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    model = transformers.ViTForImageClassification(config).eval()
    data = Dataset(NamedInputs({"pixel_values": torch.randn(8, 3, 16, 16)}), None, "other", "images")
    s, result = run(model, data)
    weighted = {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert weighted <= set(s.sim.layer_names)  # the patch embedding convolution too
    assert check_against_real_model(model, data, s, result) >= len(weighted)


def test_a_bfloat16_model_is_analysed_in_its_own_dtype():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 64, (4, 8))
    s, result = run(model, Dataset(NamedInputs({"input_ids": ids}), None, "other", "tokens"))
    assert s.sim.table.weight("lm_head").dtype == torch.bfloat16
    assert s.sim.quantized_weight("lm_head", parse_format("int4")).dtype == torch.bfloat16
    reference = s.sim.forward(NamedInputs({"input_ids": ids}))
    assert reference.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(reference, model(input_ids=ids).logits)
    assert all(trial.output is not None and trial.output.sqnr_db < 100 for trial in result.trials)
