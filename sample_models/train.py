"""Reproduce the bundled sample models: ``python -m sample_models.train [--only NAME]``.

Data comes only from installed packages: scikit-learn's 8x8 digits (needs scikit-learn) and the
Python standard library's own source. Seeds, splits and step counts are fixed, so a rerun on the
same torch build and thread count gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file, save_model

from . import SAMPLE_NAMES, build_model, load_model, load_split, sample_dir

SEED = 0
# CPU kernels split reductions by thread count, so the count is part of the recipe: a different
# --threads trains slightly different weights.
THREADS = 2

DIGITS_EVAL = 500  # held out for the fp32 metric
DIGITS_CALIB = 256  # drawn from the training split, as calibration data is in practice

SEQ_LEN = 64
LM_CALIB = 128
LM_EVAL = 128
# Fixed, sorted lists of stdlib modules present as single files in CPython 3.10-3.13 (~800 KB to
# train on). Evaluation uses other, whole modules so it measures generalisation, not recall.
LM_TRAIN_FILES = (
    "argparse.py", "ast.py", "base64.py", "calendar.py", "cmd.py", "contextlib.py", "csv.py",
    "dataclasses.py", "enum.py", "fractions.py", "functools.py", "gettext.py", "heapq.py", "queue.py",
    "random.py", "sched.py", "shutil.py", "tempfile.py", "textwrap.py", "threading.py", "traceback.py",
    "warnings.py", "weakref.py",
)
LM_EVAL_FILES = ("copy.py", "fnmatch.py", "glob.py", "operator.py", "string.py", "tokenize.py")


def _generator(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


# --- data -------------------------------------------------------------------------------------


def digits_splits() -> dict[str, dict[str, torch.Tensor]]:
    """Flattened digits in [0, 1], split into disjoint train/evaluation; calibration ⊂ train."""
    from sklearn.datasets import load_digits  # only the training script needs scikit-learn

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=_generator())
    ev, tr = perm[:DIGITS_EVAL], perm[DIGITS_EVAL:]
    return {
        "train": {"inputs": x[tr], "labels": y[tr]},
        "calibration": {"inputs": x[tr[:DIGITS_CALIB]], "labels": y[tr[:DIGITS_CALIB]]},
        "evaluation": {"inputs": x[ev], "labels": y[ev]},
    }


def _stdlib_bytes(names: tuple[str, ...]) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    blob = b"\n".join((root / n).read_bytes() for n in names)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(torch.int64)


def _windows(tokens: torch.Tensor, starts: torch.Tensor) -> dict[str, torch.Tensor]:
    idx = starts[:, None] + torch.arange(SEQ_LEN + 1)
    seq = tokens[idx]
    return {"inputs": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous()}


def text_splits() -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """Training byte stream, plus calibration (from it) and evaluation (other files) windows."""
    train = _stdlib_bytes(LM_TRAIN_FILES)
    held_out = _stdlib_bytes(LM_EVAL_FILES)
    calib_starts = torch.randint(0, len(train) - SEQ_LEN - 1, (LM_CALIB,), generator=_generator(1))
    # Evenly spaced, non-overlapping windows over all of the held-out text.
    eval_starts = torch.linspace(0, len(held_out) - SEQ_LEN - 1, LM_EVAL).long()
    return train, {"calibration": _windows(train, calib_starts), "evaluation": _windows(held_out, eval_starts)}


def _stdlib_text(names: tuple[str, ...]) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((root / n).read_text(encoding="utf-8") for n in names)


LLAMA_VOCAB = 512


def train_tokenizer(text: str):
    """A byte-level BPE tokenizer (512 entries) trained on the training text, offline, as a
    transformers fast tokenizer (what `AutoTokenizer.from_pretrained` loads back)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .models import import_transformers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=LLAMA_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer)
    transformers = import_transformers()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def llama_splits(tokenizer) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """Token stream of the train files, calibration windows of it, evaluation windows of the held-out files."""
    def ids(names):
        return torch.tensor(tokenizer(_stdlib_text(names), add_special_tokens=False)["input_ids"], dtype=torch.int64)

    train, held_out = ids(LM_TRAIN_FILES), ids(LM_EVAL_FILES)
    calib_starts = torch.randint(0, len(train) - SEQ_LEN - 1, (LM_CALIB,), generator=_generator(4))
    eval_starts = torch.linspace(0, len(held_out) - SEQ_LEN - 1, LM_EVAL).long()
    return train, {"calibration": _windows(train, calib_starts), "evaluation": _windows(held_out, eval_starts)}


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


# --- training ---------------------------------------------------------------------------------


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def train_classifier(model: torch.nn.Module, data: dict[str, torch.Tensor], recipe: dict) -> None:
    x, y = data["inputs"], data["labels"]
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    gen = _generator(2)
    steps_per_epoch = math.ceil(len(x) / recipe["batch_size"])
    total = recipe["epochs"] * steps_per_epoch
    model.train()
    step = 0
    for _ in range(recipe["epochs"]):
        for idx in torch.randperm(len(x), generator=gen).split(recipe["batch_size"]):
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(step, total, recipe["lr"], warmup=steps_per_epoch)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval()


def train_lm(model: torch.nn.Module, tokens: torch.Tensor, recipe: dict) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    gen = _generator(3)
    model.train()
    for step in range(recipe["steps"]):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, recipe["steps"], recipe["lr"], warmup=recipe["warmup"])
        starts = torch.randint(0, len(tokens) - SEQ_LEN - 1, (recipe["batch_size"],), generator=gen)
        batch = _windows(tokens, starts)
        logits = _logits(model(batch["inputs"]))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Clipping keeps the early, high-lr steps of the tiny LM from spiking.
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == recipe["steps"] - 1:
            print(f"  step {step:5d}  loss {loss.item():.3f}", flush=True)
    model.eval()


# --- metrics ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: str, data: dict[str, torch.Tensor]) -> float:
    """Accuracy for "classification", perplexity (exp of mean token cross-entropy) for "language-model"."""
    out = _logits(model(data["inputs"]))
    if task == "classification":
        return (out.argmax(-1) == data["labels"]).double().mean().item()
    return math.exp(F.cross_entropy(out.reshape(-1, out.shape[-1]), data["labels"].reshape(-1)).item())


# --- samples ----------------------------------------------------------------------------------

CLASSIFIER_RECIPE = {"optimizer": "AdamW", "lr": 3e-3, "weight_decay": 1e-4, "batch_size": 32,
                     "epochs": 40, "schedule": "1-epoch linear warmup, cosine decay", "loss": "cross-entropy"}
SPECS = {
    "mlp": {
        "task": "classification", "metric": "accuracy", "input_dtype": "float32", "input_shape": [-1, 64],
        "description": "MLP 64-128-64-10 (Linear+ReLU) on scikit-learn's 8x8 digits, pixels scaled to [0, 1].",
        "recipe": CLASSIFIER_RECIPE,
    },
    "cnn": {
        "task": "classification", "metric": "accuracy", "input_dtype": "float32", "input_shape": [-1, 1, 8, 8],
        "description": "CNN with BatchNorm and depthwise-separable convolutions on scikit-learn's 8x8 digits "
                       "as 1x8x8 images, pixels scaled to [0, 1].",
        "recipe": CLASSIFIER_RECIPE,
    },
    "transformer": {
        "task": "language-model", "metric": "perplexity", "input_dtype": "int64", "input_shape": [-1, SEQ_LEN],
        "description": "Causal byte-level transformer LM (2 pre-LN blocks, d_model 64, 4 heads, tied lm_head) "
                       "trained on Python standard-library source; labels are the next bytes.",
        "recipe": {"optimizer": "AdamW", "lr": 3e-3, "weight_decay": 0.01, "batch_size": 64, "steps": 2000,
                   "warmup": 100, "schedule": "linear warmup, cosine decay", "grad_clip": 1.0,
                   "loss": "next-byte cross-entropy", "seq_len": SEQ_LEN,
                   "train_files": list(LM_TRAIN_FILES), "eval_files": list(LM_EVAL_FILES)},
    },
    "llama": {
        "task": "language-model", "metric": "perplexity", "input_dtype": "int64", "input_shape": [-1, SEQ_LEN],
        "description": "Llama-architecture causal LM (transformers LlamaForCausalLM: 2 layers, hidden 64, 4 heads with "
                       "2 key/value heads, gated SiLU MLP 176, RMSNorm, rotary positions, tied embeddings) with a "
                       "512-entry byte-level BPE tokenizer, both trained on Python standard-library source; stored as "
                       "a Hugging Face directory; labels are the next tokens.",
        "recipe": {"optimizer": "AdamW", "lr": 3e-3, "weight_decay": 0.01, "batch_size": 32, "steps": 800,
                   "warmup": 50, "schedule": "linear warmup, cosine decay", "grad_clip": 1.0,
                   "loss": "next-token cross-entropy", "seq_len": SEQ_LEN, "tokenizer": f"byte-level BPE, {LLAMA_VOCAB}",
                   "train_files": list(LM_TRAIN_FILES), "eval_files": list(LM_EVAL_FILES)},
    },
}


def build_sample(name: str) -> float:
    """Train sample ``name``, write its files, and return the fp32 metric measured from them."""
    spec = SPECS[name]
    torch.manual_seed(SEED)  # weight init
    model = build_model(name)
    tokenizer = None
    if name == "llama":
        tokenizer = train_tokenizer(_stdlib_text(LM_TRAIN_FILES))
        tokens, splits = llama_splits(tokenizer)
        train_lm(model, tokens, spec["recipe"])
        split_note = (f"train: random {SEQ_LEN}-token windows of the train files; calibration: {LM_CALIB} "
                      f"windows of them; evaluation: {LM_EVAL} evenly spaced windows of the held-out eval files")
    elif name == "transformer":
        tokens, splits = text_splits()
        train_lm(model, tokens, spec["recipe"])
        split_note = (f"train: random {SEQ_LEN}-byte windows of the train files; calibration: {LM_CALIB} "
                      f"windows of them; evaluation: {LM_EVAL} evenly spaced windows of the held-out eval files")
    else:
        splits = digits_splits()
        if name == "cnn":
            splits = {k: {"inputs": v["inputs"].reshape(-1, 1, 8, 8), "labels": v["labels"]} for k, v in splits.items()}
        train_classifier(model, splits["train"], spec["recipe"])
        split_note = (f"seeded permutation of the 1797 digits: {DIGITS_EVAL} evaluation, the rest train; "
                      f"calibration is the first {DIGITS_CALIB} train samples")

    out = sample_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:  # a Hugging Face directory: config.json, model.safetensors, tokenizer files
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    else:
        save_model(model, str(out / "model.safetensors"))  # handles the tied transformer weight
    for split in ("calibration", "evaluation"):
        save_file(splits[split], str(out / f"{split}.safetensors"))

    # Measure from the files just written, so meta.json describes exactly what ships.
    metric = evaluate(load_model(name), spec["task"], load_split(name, "evaluation"))
    meta = {
        "name": name, "task": spec["task"], "metric": spec["metric"], "fp32_metric": metric,
        "description": spec["description"], "input_shape": spec["input_shape"], "input_dtype": spec["input_dtype"],
        "train_recipe": {**spec["recipe"], "seed": SEED, "threads": torch.get_num_threads(), "splits": split_note,
                         "torch": torch.__version__},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return metric


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=SAMPLE_NAMES, help="rebuild one sample only")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"torch CPU threads (default {THREADS}, as shipped; on a busy machine 1 can be "
                             "several times faster, but the weights then differ slightly)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    for name in [args.only] if args.only else SAMPLE_NAMES:
        start = time.perf_counter()
        print(f"{name}: training", flush=True)
        metric = build_sample(name)
        params = sum(p.numel() for p in build_model(name).parameters())  # parameters() dedups the tie
        print(f"{name}: {SPECS[name]['metric']} {metric:.4f}, {params} parameters, "
              f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
