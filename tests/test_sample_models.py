"""The bundled sample models load strictly, reproduce their recorded fp32 metric, and trace."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sample_models
from sample_models import SAMPLE_NAMES, build_model, load_meta, load_model, load_split, sample_dir

# Output shape of one sample (batch dim excluded), per model.
OUT_SHAPES = {"mlp": (10,), "cnn": (10,), "transformer": (64, 256)}


@pytest.fixture(scope="module", params=SAMPLE_NAMES)
def sample(request):
    name = request.param
    return name, load_model(name), load_meta(name)


def _metric(task: str, out: torch.Tensor, labels: torch.Tensor) -> float:
    if task == "classification":
        return (out.argmax(-1) == labels).double().mean().item()
    return math.exp(F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1)).item())


def test_files_present_and_small():
    for name in SAMPLE_NAMES:
        for file in ("model.safetensors", "calibration.safetensors", "evaluation.safetensors", "meta.json"):
            path = sample_dir(name) / file
            assert path.is_file(), path
            assert path.stat().st_size < 2_000_000, path


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
    name, model, meta = sample
    data = load_split(name, "evaluation")
    with torch.no_grad():
        out = model(data["inputs"])
    assert out.shape == (len(data["inputs"]), *OUT_SHAPES[name])
    metric = _metric(meta["task"], out, data["labels"])
    assert metric == pytest.approx(meta["fp32_metric"], rel=1e-4, abs=1e-3)
    if meta["task"] == "classification":
        assert metric > 0.9
    else:
        assert metric < 8.0


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
        expected = model(example)
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
    with pytest.raises(ValueError, match="valid names: mlp, cnn, transformer"):
        fn("resnet")


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="valid splits: calibration, evaluation"):
        load_split("mlp", "train")
