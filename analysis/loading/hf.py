"""Hugging Face models and text, as users have them on disk: a model directory (config.json +
*.safetensors) and a tokenizer directory, both read locally — quantlens never contacts a hub.

A model directory is loaded with the transformers class its config names (`architectures`), in the
checkpoint's own dtype; `trust_remote_code` stays off, so a directory whose architecture lives in
its own Python files is refused with one line instead of running them. Text becomes causal-LM
blocks: `seq_len` tokens of input ids, and as labels the same tokens shifted by one (the next-token
ids the model is scored on).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import Dataset, NamedInputs
from .errors import LoadError, _first_line

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_TEXT_SPEC = re.compile(r"^(?P<path>.+)#tokenizer=(?P<tokenizer>.+),seq_len=(?P<seq_len>\d+)$")
TEXT_SUFFIXES = (".txt", ".text", ".md")


def is_model_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def has_tokenizer(path: str | Path) -> bool:
    return Path(path).is_dir() and any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def _transformers(why: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never a download, whatever a config points at
    try:
        from analysis.compat import import_torchvision

        try:
            import_torchvision()  # transformers imports torchvision when it is installed
        except ImportError:
            pass
        import transformers
    except ImportError:
        raise LoadError(f"{why} needs the transformers package; install quantlens[hf] "
                        "(pip install 'transformers>=4.45')") from None
    return transformers


def load_model_dir(path: str | Path, shown: str, trust_remote_code: bool = False) -> nn.Module:
    """The model in a local Hugging Face directory, in eval mode and its checkpoint's dtype."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"{shown}/config.json cannot be read ({_first_line(exc)}); it must be the model's JSON config") from None
    if not isinstance(config, dict):
        raise LoadError(f"{shown}/config.json holds a {type(config).__name__}, not a model config")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise LoadError(f"{shown} has a config.json but no weights (model.safetensors); save the model with "
                        "model.save_pretrained(directory)")
    transformers = _transformers(f"the Hugging Face model in {shown}")
    architectures = config.get("architectures") or []
    if "auto_map" in config and not trust_remote_code:
        raise LoadError(f"{shown} defines its architecture in its own Python files (auto_map); quantlens does not run "
                        "them unless you pass --trust-remote-code (only for code you trust)")
    cls = next((getattr(transformers, name) for name in architectures if hasattr(transformers, name)), None)
    if cls is None:
        if not architectures:
            cls = transformers.AutoModel
        elif not trust_remote_code:
            raise LoadError(f"{shown}: architecture {architectures[0]!r} is not in transformers "
                            f"{transformers.__version__}; upgrade transformers, or pass --trust-remote-code if the "
                            "directory ships its own code")
        else:
            cls = transformers.AutoModelForCausalLM
    try:
        model = cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code,
                                    dtype="auto")
    except Exception as exc:  # noqa: BLE001 — a bad checkpoint fails in many ways
        raise LoadError(f"{shown} could not be loaded with transformers.{cls.__name__} ({_first_line(exc, 200)}); "
                        "check that the directory holds a complete save_pretrained() checkpoint") from None
    return model.eval()


def split_text_spec(spec: str) -> tuple[str, str, int] | None:
    """("corpus.txt", tokenizer dir, seq_len) for the recorded form "corpus.txt#tokenizer=DIR,seq_len=N"."""
    match = _TEXT_SPEC.match(spec)
    if match is None:
        return None
    return match["path"], match["tokenizer"], int(match["seq_len"])


def text_spec(path: str, tokenizer: str, seq_len: int) -> str:
    """The data spec a run records for text tokenized with `tokenizer` into `seq_len`-token blocks."""
    return f"{path}#tokenizer={Path(tokenizer).resolve()},seq_len={seq_len}"


def load_text(path: Path, shown: str, tokenizer_dir: str, seq_len: int, max_samples: int | None,
              max_bytes: int) -> Dataset:
    """Blocks of `seq_len` tokens from a UTF-8 text file, with next-token labels.

    Only as much text is tokenized as `max_samples` blocks need (read in pieces that end at a line
    break); all of it otherwise, refused once the token ids would pass `max_bytes`."""
    if seq_len < 2 or seq_len > 1 << 16:
        raise LoadError(f"--seq-len {seq_len} is out of range; use 2 to 65536 tokens per sample")
    tokenizer = load_tokenizer(tokenizer_dir)
    need = None if max_samples is None else max_samples * seq_len + 1
    ids: list[int] = []
    try:
        with path.open("r", encoding="utf-8") as handle:
            while need is None or len(ids) < need:
                piece = handle.read(1 << 20)
                if not piece:
                    break
                piece += handle.readline()  # a piece ends at a line break, so no word is cut in two
                ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
                if 8 * len(ids) > max_bytes:
                    raise LoadError(f"{shown}: the tokens need more than the {max_bytes >> 20} MiB limit on data read "
                                    "at once; pass --samples N (only the text N samples need is read)")
    except UnicodeDecodeError as exc:
        raise LoadError(f"{shown} is not UTF-8 text ({_first_line(exc)}); pass a UTF-8 text file") from None
    except OSError as exc:
        raise LoadError(f"cannot read {shown}: {_first_line(exc)}") from None
    blocks = (len(ids) - 1) // seq_len
    if blocks < 1:
        raise LoadError(f"{shown} holds {len(ids)} tokens, fewer than one sample of --seq-len {seq_len} (+1 for the "
                        "next-token label); use more text or a shorter --seq-len")
    if max_samples is not None:
        blocks = min(blocks, max_samples)
    tokens = torch.tensor(ids[: blocks * seq_len + 1], dtype=torch.int64)
    inputs = tokens[:-1].reshape(blocks, seq_len)
    labels = tokens[1:].reshape(blocks, seq_len)
    return Dataset(NamedInputs({"input_ids": inputs}), labels, "language-model",
                   f"{path.name} ({blocks}×{seq_len} tokens)")


def load_tokenizer(directory: str) -> Any:
    where = Path(directory)
    if not where.is_dir():
        raise LoadError(f"tokenizer directory {directory} does not exist; pass --tokenizer with a local directory "
                        "holding tokenizer.json (e.g. the model's directory) — quantlens never downloads one")
    if not has_tokenizer(where):
        raise LoadError(f"{directory} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer "
                        "there with tokenizer.save_pretrained(directory)")
    transformers = _transformers("tokenizing text")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise LoadError(f"the tokenizer in {directory} could not be loaded ({_first_line(exc, 200)})") from None
