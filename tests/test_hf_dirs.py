"""Hugging Face models and text as users have them on disk: a model directory, a tokenizer
directory and a text file — loaded locally, analysed, and the run's data spec reloads the same samples."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (quantlens[hf])")

from analysis.cli import main  # noqa: E402
from analysis.data import NamedInputs  # noqa: E402
from analysis.loading import LoadError, load_data, load_model  # noqa: E402

TEXT = "".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))


def tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT.splitlines(keepends=True), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    return fast


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GPT-2 with its tokenizer, saved as users have it (config.json, model.safetensors, tokenizer.json)."""
    where = tmp_path_factory.mktemp("gpt2")
    tokenizer = tokenizer_dir(where)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(where)
    tokenizer.save_pretrained(where)
    (where / "corpus.txt").write_text(TEXT)
    return where


def test_model_directory_loads_with_its_config_class_in_eval_mode(model_dir):
    model = load_model(str(model_dir))
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    with pytest.raises(LoadError, match="own weights; drop --weights"):
        load_model(str(model_dir), "w.safetensors")


def test_text_becomes_next_token_blocks(model_dir):
    data = load_data(str(model_dir / "corpus.txt"), tokenizer=str(model_dir), seq_len=16, max_samples=5)
    assert isinstance(data.inputs, NamedInputs) and data.inputs.names == ("input_ids",)
    ids = data.inputs.tensors["input_ids"]
    assert ids.shape == (5, 16) and data.labels.shape == (5, 16) and data.task == "language-model"
    # labels are the inputs shifted by one token, across block boundaries too
    flat_ids, flat_labels = ids.reshape(-1), data.labels.reshape(-1)
    assert torch.equal(flat_ids[1:], flat_labels[:-1])
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    expected = tokenizer(TEXT, add_special_tokens=False)["input_ids"][:16]
    assert ids[0].tolist() == expected


def test_text_spec_round_trips(model_dir):
    from analysis.loading.hf import text_spec

    spec = text_spec(str(model_dir / "corpus.txt"), str(model_dir), 16)
    again = load_data(spec, max_samples=4)
    direct = load_data(str(model_dir / "corpus.txt"), tokenizer=str(model_dir), seq_len=16, max_samples=4)
    assert again.fingerprint() == direct.fingerprint()


@pytest.mark.parametrize("case, match", [
    ("no-tokenizer", "is text: tokenize it with --tokenizer DIR"),
    ("missing-dir", "tokenizer directory .* does not exist"),
    ("only-seq-len", "needs both --tokenizer DIR and --seq-len N"),
    ("too-short", "fewer than one sample of --seq-len 60000"),
])
def test_text_errors_are_one_line(model_dir, tmp_path, case, match):
    corpus = str(model_dir / "corpus.txt")
    calls = {
        "no-tokenizer": lambda: load_data(corpus),
        "missing-dir": lambda: load_data(corpus, tokenizer=str(tmp_path / "nope"), seq_len=8),
        "only-seq-len": lambda: load_data(corpus, seq_len=8),
        "too-short": lambda: load_data(corpus, tokenizer=str(model_dir), seq_len=60000),
    }
    with pytest.raises(LoadError, match=match) as excinfo:
        calls[case]()
    assert "\n" not in str(excinfo.value)


def test_directories_that_are_not_models_are_refused(tmp_path):
    with pytest.raises(LoadError, match="without config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(LoadError, match="no weights"):
        load_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Custom"], "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(LoadError, match="--trust-remote-code"):
        load_model(str(tmp_path))


def test_cli_analyses_a_model_directory_on_text_and_suggest_reloads_the_data(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    # the model directory's tokenizer is used for a text --data without --tokenizer
    assert main(["analyze", str(model_dir), "--data", str(model_dir / "corpus.txt"), "--seq-len", "16",
                 "--samples", "8", "--weight-formats", "int8,int4", "--act-formats", "none", "--quiet",
                 "--out", str(out)]) == 0
    import csv

    with (out / "layers.csv").open() as handle:
        layers = {row["layer"] for row in csv.DictReader(handle)}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "lm_head"} <= layers
    analysis = json.loads((out / "analysis.json").read_text())
    assert "#tokenizer=" in json.dumps(analysis)  # the recorded data spec carries the tokenization
    assert main(["suggest", str(out), "--budget", "avg-bits=6", "--front-points", "0"]) == 0
    assert "measured: output SQNR" in capsys.readouterr().out
