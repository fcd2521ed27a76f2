"""The bundled sample models load strictly, compute what their weights define (checked against an
independent forward), reach a good fp32 metric, and trace."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import sample_models
from analysis.data import Dataset
from analysis.evaluate import Evaluator
from sample_models import SAMPLE_NAMES, build_model, load_meta, load_model, load_split, sample_dir

# Output shape of one sample (batch dim excluded), per model.
OUT_SHAPES = {"mlp": (10,), "cnn": (10,), "transformer": (64, 256), "llama": (64, 512)}
HF = set(sample_models.HF_SAMPLES)


def logits(output):
    """Hugging Face models return a ModelOutput; its logits are the output compared."""
    return output.logits if hasattr(output, "logits") else output


@pytest.fixture(scope="module", params=SAMPLE_NAMES)
def sample(request):
    name = request.param
    return name, load_model(name), load_meta(name)


def _metric(task: str, out: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy (fraction) or perplexity, in float64."""
    if task == "classification":
        return (out.argmax(-1) == labels).double().mean().item()
    log_probs = torch.log_softmax(out.double(), -1)
    nll = -log_probs.gather(-1, labels.unsqueeze(-1)).mean()
    return math.exp(nll.item())


# --- independent forwards ------------------------------------------------------------------------
# Written from the architectures' descriptions (meta.json "description", README), on the raw tensors of
# model.safetensors, in float64 and with no nn.Module: what the shipped model must compute, whatever
# sample_models.models and its loader do.


def _weights(name: str) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(sample_dir(name) / "model.safetensors").items()}


def _linear(x, w, b=None):
    return x @ w.T + (0 if b is None else b)


def _layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _mlp_reference(w, x):
    # 64 -> 128 -> 64 -> 10, ReLU between
    h = torch.clamp(_linear(x, w["fc1.weight"], w["fc1.bias"]), min=0)
    h = torch.clamp(_linear(h, w["fc2.weight"], w["fc2.bias"]), min=0)
    return _linear(h, w["fc3.weight"], w["fc3.bias"])


def _cnn_reference(w, x):
    # conv (no bias) -> BatchNorm (running statistics) -> ReLU blocks; the depthwise ones have one
    # group per channel, dw2 has stride 2; then global average pool and a linear classifier
    for block, stride in (("stem", 1), ("dw1", 1), ("pw1", 1), ("dw2", 2), ("pw2", 1)):
        kernel = w[f"{block}.0.weight"]
        groups = x.shape[1] // kernel.shape[1]
        x = F.conv2d(x, kernel, stride=stride, padding=kernel.shape[-1] // 2, groups=groups)
        mean, var = w[f"{block}.1.running_mean"], w[f"{block}.1.running_var"]
        scale, shift = w[f"{block}.1.weight"], w[f"{block}.1.bias"]
        x = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * scale[:, None, None] + shift[:, None, None]
        x = torch.clamp(x, min=0)
    return _linear(x.mean(dim=(2, 3)), w["fc.weight"], w["fc.bias"])


def _transformer_reference(w, tokens, n_heads=4):
    # token + position embeddings; pre-LN blocks x + attn(ln1 x), x + fc2(gelu(fc1(ln2 x))) with causal
    # multi-head self-attention; final LayerNorm; the LM head is the token embedding (tied)
    emb = w["tok_emb.weight"] if "tok_emb.weight" in w else w["lm_head.weight"]
    n, t = tokens.shape
    x = emb[tokens] + w["pos_emb.weight"][:t]
    causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    block = 0
    while f"blocks.{block}.ln1.weight" in w:
        p = lambda name: w[f"blocks.{block}.{name}"]  # noqa: E731
        h = _layer_norm(x, p("ln1.weight"), p("ln1.bias"))
        q, k, v = _linear(h, p("attn.in_proj_weight"), p("attn.in_proj_bias")).chunk(3, dim=-1)
        d = q.shape[-1] // n_heads
        q, k, v = (z.reshape(n, t, n_heads, d).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        attended = torch.softmax(scores.masked_fill(causal, float("-inf")), -1) @ v
        x = x + _linear(attended.transpose(1, 2).reshape(n, t, -1), p("attn.out_proj.weight"), p("attn.out_proj.bias"))
        h = _linear(_layer_norm(x, p("ln2.weight"), p("ln2.bias")), p("fc1.weight"), p("fc1.bias"))
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + _linear(h, p("fc2.weight"), p("fc2.bias"))
        block += 1
    assert block == 2
    return _linear(_layer_norm(x, w["ln_f.weight"], w["ln_f.bias"]), emb)


def _rms_norm(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _llama_reference(w, tokens, n_heads=4, n_kv=2, theta=10000.0):
    # Llama: RMSNorm pre-norm blocks; rotary positions (pairs i and i + d/2 rotated by pos·θ^(-2i/d));
    # grouped-query causal attention (each key/value head serves n_heads / n_kv query heads);
    # gated MLP down(silu(gate x) · up x); final RMSNorm; head tied to the embedding
    emb = w["model.embed_tokens.weight"]
    n, t = tokens.shape
    x = emb[tokens]
    d = x.shape[-1] // n_heads
    angles = torch.arange(t, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cos(angles), torch.sin(angles)

    def rotate(z):  # z [n, heads, t, d]
        a, b = z[..., : d // 2], z[..., d // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    block = 0
    while f"model.layers.{block}.input_layernorm.weight" in w:
        p = lambda name: w[f"model.layers.{block}.{name}"]  # noqa: E731
        h = _rms_norm(x, p("input_layernorm.weight"))
        q = _linear(h, p("self_attn.q_proj.weight")).reshape(n, t, n_heads, d).transpose(1, 2)
        k = _linear(h, p("self_attn.k_proj.weight")).reshape(n, t, n_kv, d).transpose(1, 2)
        v = _linear(h, p("self_attn.v_proj.weight")).reshape(n, t, n_kv, d).transpose(1, 2)
        q, k = rotate(q), rotate(k)
        k, v = k.repeat_interleave(n_heads // n_kv, dim=1), v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        attended = torch.softmax(scores.masked_fill(causal, float("-inf")), -1) @ v
        x = x + _linear(attended.transpose(1, 2).reshape(n, t, -1), p("self_attn.o_proj.weight"))
        h = _rms_norm(x, p("post_attention_layernorm.weight"))
        gate = _linear(h, p("mlp.gate_proj.weight"))
        x = x + _linear(gate * torch.sigmoid(gate) * _linear(h, p("mlp.up_proj.weight")), p("mlp.down_proj.weight"))
        block += 1
    assert block == 2
    return _linear(_rms_norm(x, w["model.norm.weight"]), emb)


REFERENCES = {"mlp": _mlp_reference, "cnn": _cnn_reference, "transformer": _transformer_reference,
              "llama": _llama_reference}


def _reference_logits(name: str, inputs: torch.Tensor) -> torch.Tensor:
    return REFERENCES[name](_weights(name), inputs if not inputs.is_floating_point() else inputs.double())


def test_files_present_and_small():
    for name in SAMPLE_NAMES:
        for file in ("model.safetensors", "calibration.safetensors", "evaluation.safetensors", "meta.json"):
            path = sample_dir(name) / file
            assert path.is_file(), path
            assert path.stat().st_size < 2_000_000, path
    for name in HF:  # the form users bring: a directory transformers loads, with its tokenizer
        assert (sample_dir(name) / "config.json").is_file() and (sample_dir(name) / "tokenizer.json").is_file()


def test_meta_fields(sample):
    name, _, meta = sample
    keys = {"name", "task", "metric", "fp32_metric", "description", "input_shape", "input_dtype", "train_recipe"}
    assert keys <= set(meta)
    assert meta["name"] == name
    assert (meta["task"], meta["metric"]) in {("classification", "accuracy"), ("language-model", "perplexity")}


def test_splits_match_meta(sample):
    name, _, meta = sample
    calib, evaluation = load_split(name, "calibration"), load_split(name, "evaluation")
    for data in (calib, evaluation):
        assert list(data["inputs"].shape[1:]) == meta["input_shape"][1:]
        assert data["inputs"].dtype == getattr(torch, meta["input_dtype"])
        assert data["labels"].dtype == torch.int64
        assert len(data["inputs"]) == len(data["labels"])
    # Evaluation is a held-out split: no evaluation sample also appears in calibration.
    calib_rows = {tuple(r.tolist()) for r in calib["inputs"].reshape(len(calib["inputs"]), -1)}
    eval_rows = [tuple(r.tolist()) for r in evaluation["inputs"].reshape(len(evaluation["inputs"]), -1)]
    assert not any(r in calib_rows for r in eval_rows)


def test_output_shape_and_fp32_metric(sample):
    """The loaded model computes what its weights define, and that is a good model: its metric is
    recomputed here from an independent float64 forward of the raw weights, not read from meta.json."""
    name, model, meta = sample
    data = load_split(name, "evaluation")
    with torch.no_grad():
        out = logits(model(data["inputs"]))
    assert out.shape == (len(data["inputs"]), *OUT_SHAPES[name])
    reference = _reference_logits(name, data["inputs"])
    torch.testing.assert_close(out.double(), reference, rtol=1e-4, atol=1e-4)
    expected = _metric(meta["task"], reference, data["labels"])
    assert _metric(meta["task"], out, data["labels"]) == pytest.approx(expected, rel=1e-4, abs=1e-3)
    if meta["task"] == "classification":
        assert expected > 0.9
    elif name in HF:
        assert expected < 40.0  # a 512-token BPE model that learned something (uniform guessing: 512)
    else:
        assert expected < 8.0  # a byte-level model that learned something (uniform guessing: 256)
    # the engine's FP32 evaluation (traced, BatchNorm folded) reports the same number, in its units
    # (on the first 64 samples, to stay fast)
    dataset = Dataset(data["inputs"], data["labels"], meta["task"], name)
    engine = Evaluator(model, dataset.take(16), dataset.take(64)).fp32_metric
    subset = _metric(meta["task"], reference[:64], data["labels"][:64])
    assert engine == pytest.approx(subset * 100 if meta["task"] == "classification" else subset, rel=1e-4)
    # and meta.json documents that number
    assert meta["fp32_metric"] == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_load_model_is_fresh_eval_and_strict(sample):
    name, model, _ = sample
    assert not model.training
    other = load_model(name)
    assert other is not model
    assert all(a is not b for a, b in zip(model.parameters(), other.parameters()))
    assert type(build_model(name)) is type(model)


def test_tied_lm_head_shared_after_load():
    model = load_model("transformer")
    assert model.lm_head.weight is model.tok_emb.weight


def test_strict_loading_rejects_mismatch(monkeypatch):
    # A transformer file offered to the MLP architecture must fail loudly, not load partially.
    monkeypatch.setattr(sample_models, "sample_dir", lambda name: sample_dir("transformer"))
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
        load_model("mlp")


def test_fx_and_export_trace(sample):
    name, model, _ = sample
    example = load_split(name, "calibration")["inputs"][:2]
    with torch.no_grad():
        expected = logits(model(example))
    if name in HF:  # Hugging Face models: torch.export (what quantlens uses for them; fx cannot trace them)
        exported = torch.export.export(model, (example,), kwargs={"use_cache": False})
        torch.testing.assert_close(logits(exported.module()(example, use_cache=False)), expected)
        return
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(example), expected)
    exported = torch.export.export(model, (example,))
    torch.testing.assert_close(exported.module()(example), expected)
    if name == "transformer":  # the fx graph must still trim the causal mask to shorter inputs
        short = example[:, :17]
        with torch.no_grad():
            torch.testing.assert_close(traced(short), model(short))


@pytest.mark.parametrize("fn", [sample_dir, build_model, load_model, load_meta, lambda n: load_split(n, "evaluation")])
def test_unknown_name_raises(fn):
    with pytest.raises(ValueError, match="valid names: mlp, cnn, transformer, llama"):
        fn("resnet")


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="valid splits: calibration, evaluation"):
        load_split("mlp", "train")


def test_llama_sample_is_analysable_from_its_directory_and_on_text(tmp_path):
    """sample:llama and the same directory passed as a path give the same model; text tokenized with
    the directory's own tokenizer is a valid data set for it."""
    from analysis.loading import load_data
    from analysis.loading import load_model as load_user_model

    by_name, by_path = load_user_model("sample:llama"), load_user_model(str(sample_dir("llama")))
    assert all(torch.equal(a, b) for a, b in zip(by_name.state_dict().values(), by_path.state_dict().values()))
    (tmp_path / "corpus.txt").write_text("def add(a, b):\n    return a + b\n" * 200)
    data = load_data(str(tmp_path / "corpus.txt"), tokenizer=str(sample_dir("llama")), seq_len=32, max_samples=4)
    with torch.no_grad():
        out = logits(by_path(**data.inputs.tensors))
    assert out.shape == (4, 32, 512)
