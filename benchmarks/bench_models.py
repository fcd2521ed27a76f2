"""The models people bring (issue 9), run as a new user runs them: through the CLI, on files.

Each model is built from a config with random weights (transformers config classes saved with
`save_pretrained` into a model directory; `torchvision:<name>` / `timm:<name>` specs as the CLI takes
them; nothing is downloaded), its data written to a `.npz` of named arrays (token ids with an
`attention_mask` that pads part of the samples; `decoder_input_ids` for T5; images for vision), and
`python -m analysis.cli analyze MODEL --data data.npz --weight-formats int8,int4 --act-formats none`
runs in a fresh process, timed from outside. One markdown row per model: status (ok, or refused with
the CLI's one line), layers analysed / weighted layers of the model (modules owning a weight of two
or more dimensions, a tied weight counted once) and the weight coverage, the warnings and notes the
run printed, the engine, chunks, and the wall time.

T5 also gets a faithfulness check: the prepared model's FP32 output against the real model (what
quantlens' own check compares; the value is printed here), and one layer's weight-only int4 output
SQNR from the CLI (`--weight-calibration minmax`) against a naive reference: that weight replaced by
its symmetric per-output-channel int4 value in a copy of the real model, run, SQNR against FP32.

The two larger CNNs (efficientnet_b0, convnext_tiny at 64x64, 64 samples) run exact and with
`--output-metrics estimated`; for each, the chunk count and when the progress bar first showed an
ETA (seconds after the process started, and at which step).

Run: python benchmarks/bench_models.py [--only gpt2,t5,...] [--samples-large 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.compat import import_torchvision  # noqa: E402

TOKENS, TEXT_SAMPLES, VOCAB = 12, 16, 64
FORMATS = ["--weight-formats", "int8,int4", "--act-formats", "none", "--targets", "weights"]


@dataclass(frozen=True)
class Case:
    """One model as a user brings it: what `analyze` is given, and the model itself for counting."""

    model_arg: str
    data: Path
    model: nn.Module
    extra: tuple[str, ...] = ()


@dataclass
class Run:
    status: str
    seconds: float
    stdout: str
    stderr: str
    analysis: dict = field(default_factory=dict)
    eta: str = "no ETA shown"


# --- models ------------------------------------------------------------------------------------

def _tokens(path: Path, *, labels: str, pad: bool = True, decoder: bool = False) -> Path:
    """Token ids (1..VOCAB-1), an attention_mask with the last third padded on every other sample,
    and labels: next tokens (-100 on padding) for an LM, a class for a classifier, none otherwise."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (TEXT_SAMPLES, TOKENS), dtype=np.int64)
    mask = np.ones_like(ids)
    if pad:
        mask[::2, 2 * TOKENS // 3:] = 0
        ids[mask == 0] = 0
    arrays = {"input_ids": ids, "attention_mask": mask}
    if labels == "lm":
        next_tokens = np.roll(ids, -1, axis=1)
        next_tokens[:, -1] = -100
        next_tokens[np.roll(mask, -1, axis=1) == 0] = -100
        arrays["labels"] = next_tokens
    elif labels == "class":
        arrays["labels"] = rng.integers(0, 3, (TEXT_SAMPLES,), dtype=np.int64)
    if decoder:
        arrays["decoder_input_ids"] = rng.integers(1, VOCAB, (TEXT_SAMPLES, 5), dtype=np.int64)
    np.savez(path, **arrays)
    return path


def _images(path: Path, n: int, size: int) -> Path:
    np.savez(path, inputs=np.random.default_rng(0).standard_normal((n, 3, size, size), dtype=np.float32))
    return path


def _hf(make: Callable[[object], nn.Module], labels: str, decoder: bool = False) -> Callable[[Path, int], Case]:
    def build(where: Path, _samples: int) -> Case:
        import transformers

        import_torchvision()  # transformers imports torchvision when present (see analysis/compat.py)
        torch.manual_seed(0)
        model = make(transformers).eval()
        model.save_pretrained(where / "model")
        return Case(str(where / "model"), _tokens(where / "data.npz", labels=labels, decoder=decoder), model)

    return build


def _vision(spec: str, size: int, samples: int | None = None, extra: tuple[str, ...] = ()) -> Callable[[Path, int], Case]:
    def build(where: Path, large: int) -> Case:
        from analysis.loading import load_model

        n = samples or large
        return Case(spec, _images(where / "data.npz", n, size), load_model(spec), ("--samples", str(n), *extra))

    return build


# Config values as the tests build them (tests/test_hf_layers.py, tests/test_multi_input.py,
# tests/test_vision_models.py); GPT-2 gets n_positions for TOKENS.
MODELS: dict[str, Callable[[Path, int], Case]] = {
    "gpt2": _hf(lambda t: t.GPT2LMHeadModel(t.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)), "lm"),
    "gpt2-nocache": _hf(lambda t: t.GPT2LMHeadModel(t.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        use_cache=False)), "lm"),
    "llama": _hf(lambda t: t.LlamaForCausalLM(t.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1)), "lm"),
    "bert": _hf(lambda t: t.BertForSequenceClassification(t.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3)), "class"),
    "t5": _hf(lambda t: t.T5ForConditionalGeneration(t.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0)), "none", decoder=True),
    "vit_b_16": _vision("torchvision:vit_b_16?image_size=32&num_classes=10", 32, samples=8),
    "timm_mobilenetv3": _vision("timm:mobilenetv3_small_050?num_classes=10", 64, samples=16),
    "efficientnet_b0": _vision("torchvision:efficientnet_b0?num_classes=10", 64),
    "efficientnet_b0-estimated": _vision("torchvision:efficientnet_b0?num_classes=10", 64,
                                         extra=("--output-metrics", "estimated")),
    "convnext_tiny": _vision("torchvision:convnext_tiny?num_classes=10", 64),
    "convnext_tiny-estimated": _vision("torchvision:convnext_tiny?num_classes=10", 64,
                                       extra=("--output-metrics", "estimated")),
}
TRACKS_ETA = {"efficientnet_b0", "efficientnet_b0-estimated", "convnext_tiny", "convnext_tiny-estimated"}


def weighted_layers(model: nn.Module) -> int:
    """Weights of two or more dimensions (linear, conv, Conv1D, embedding, attention's in_proj_weight),
    a weight shared by two modules (tied embeddings) counted once; position embeddings and class
    tokens (not named weight) left out."""
    weights = {id(p) for name, p in model.named_parameters(remove_duplicate=False)
               if name.endswith("weight") and p.dim() >= 2}
    return len(weights)


# --- the CLI, from outside ----------------------------------------------------------------------

_ETA = re.compile(r"(\d+)/(\d+) \[[\d:]+<(\d[\d:]*),")


def run_cli(args: list[str], track_eta: bool) -> Run:
    """`python -m analysis.cli analyze ...` in a fresh process; stderr read as it comes, so when the
    progress bar first showed an ETA (and what it said then and at 10 % of the steps) is known."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "analysis.cli", "analyze", *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    etas: list[tuple[float, int, int, str]] = []  # (seconds, step, steps, ETA as shown)
    err = bytearray()
    for chunk in iter(lambda: process.stderr.read1(4096), b""):
        err += chunk
        if track_eta:
            etas += [(time.perf_counter() - start, int(m.group(1)), int(m.group(2)), m.group(3))
                     for m in _ETA.finditer(chunk.decode("utf-8", "replace"))]
    stdout = process.stdout.read().decode()
    process.wait()
    seconds = time.perf_counter() - start
    out = Path(args[args.index("--out") + 1])
    analysis = json.loads((out / "analysis.json").read_text()) if (out / "analysis.json").exists() else {}
    return Run("ok" if process.returncode == 0 else f"exit {process.returncode}", seconds, stdout,
               err.decode("utf-8", "replace"), analysis, _eta_summary(etas, seconds))


def _eta_summary(etas: list[tuple[float, int, int, str]], seconds: float) -> str:
    """The first ETA shown and the one at 10 % of the steps, each beside the time that was really left."""
    if not etas:
        return "no ETA shown"
    first = etas[0]
    tenth = next((e for e in etas if e[1] >= e[2] / 10), etas[-1])
    return "; ".join(f"ETA {eta} at {at:.0f} s (step {step}/{steps}; really {seconds - at:.0f} s left)"
                     for at, step, steps, eta in dict.fromkeys([first, tenth]))


def _said(run: Run) -> list[str]:
    """quantlens' warnings and notes as the run printed them (one line each); other libraries'
    deprecation warnings and progress bars left out."""
    lines = [line.strip() for text in (run.stderr, run.stdout) for line in re.split(r"[\r\n]", text)]
    return [line for line in lines if line.startswith(("quantlens: warning:", "note:", "engine:"))]


def row(name: str, case: Case, run: Run) -> str:
    expected = weighted_layers(case.model)
    if run.status != "ok":
        last = [line for line in re.split(r"[\r\n]", run.stderr) if line.strip()]
        return f"| {name} | refused ({run.status}): {last[-1] if last else '?'} | – | – | – | {run.seconds:.1f} s |"
    model = run.analysis.get("model", {})
    coverage = model.get("weight_coverage") or {}
    share = (f", {100 * coverage['analysed_weights'] / coverage['total_weights']:.0f} % of weights"
             if coverage.get("total_weights") else "")
    folded = model.get("folded_batchnorms") or []
    batchnorms = sum("BatchNorm" in type(m).__name__ for m in case.model.modules())
    notes = _said(run)
    if batchnorms:
        notes.append(f"BatchNorm folded {len(folded)} of {batchnorms}")
    chunks = run.analysis.get("data", {}).get("chunks")
    timing = f"{run.seconds:.1f} s, {chunks} chunks" + (f", {run.eta}" if name in TRACKS_ETA else "")
    return (f"| {name} | ok | {len(run.analysis.get('layers', []))} / {expected}{share} | "
            f"{'; '.join(notes) or '–'} | {model.get('engine')} | {timing} |")


# --- T5: is what runs the real model? ---------------------------------------------------------

def naive_int4_output_sqnr(model: nn.Module, inputs: dict[str, torch.Tensor], param: str) -> float:
    """Symmetric int4 per output channel in a copy of the model, on the grid analysis/formats.py states
    (PyTorch / torchao: scale = absmax / 7.5, q = clamp(round(w / scale), -8, 7))."""
    with torch.no_grad():
        reference = model(**inputs).logits.double()
        quantized = copy.deepcopy(model)
        weight = dict(quantized.named_parameters())[param]
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7.5
        weight.copy_(torch.clamp(torch.round(weight / scale), -8, 7) * scale)
        out = quantized(**inputs).logits.double()
    return 10 * math.log10(float(reference.pow(2).sum() / (reference - out).pow(2).sum()))


def t5_faithfulness(case: Case, where: Path) -> list[str]:
    from analysis.loading import load_data, load_model
    from analysis.quantsim import QuantSim, run_to_run_sqnr_db
    from analysis.config import QuantConfig

    model = load_model(case.model_arg)
    data = load_data(str(case.data))
    inputs = {name: torch.as_tensor(array) for name, array in np.load(case.data).items()}
    sim = QuantSim(model, data, QuantConfig(num_samples=len(data)))
    with torch.no_grad():
        agreement = run_to_run_sqnr_db(model(**inputs).logits, sim.forward(data.inputs))
    layer = "encoder.block.0.layer.0.SelfAttention.q"
    run = run_cli([case.model_arg, "--data", str(case.data), "--weight-formats", "int4", "--act-formats", "none",
                   "--targets", "weights", "--weight-calibration", "minmax", "--quiet", "--out",
                   str(where / "t5_minmax")], track_eta=False)
    import pandas as pd

    table = pd.read_csv(where / "t5_minmax" / "layers.csv")
    measured = float(table[(table["layer"] == layer) & (table["format"] == "int4")]["output_sqnr_db"].iloc[0])
    naive = naive_int4_output_sqnr(model, inputs, layer + ".weight")
    return [f"T5 prepared model vs real model, FP32 output: {agreement:.1f} dB SQNR "
            f"(quantlens refuses below 60 dB; the CLI run {'passed' if run.status == 'ok' else 'failed'} that check)",
            f"T5 {layer} int4 (minmax, per channel) output SQNR: quantlens {measured:.2f} dB, naive copy "
            f"{naive:.2f} dB, difference {abs(measured - naive):.2f} dB"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument("--samples-large", type=int, default=64,
                        help="samples for efficientnet_b0 / convnext_tiny (64x64 images)")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",")] if args.only else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"bench_models: unknown model {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; weight-only "
          f"{FORMATS[1]}, default calibration and exact output metrics unless the row says estimated")
    print("| model | status | layers analysed / weighted layers | warnings and notes printed | engine | wall time |")
    print("|---|---|---|---|---|---|")
    extra_lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            where = Path(tmp) / name
            where.mkdir()
            case = MODELS[name](where, args.samples_large)
            quiet = () if name in TRACKS_ETA else ("--quiet",)
            run = run_cli([case.model_arg, "--data", str(case.data), *FORMATS, *case.extra, *quiet,
                           "--out", str(where / "out")], track_eta=name in TRACKS_ETA)
            print(row(name, case, run), flush=True)
            if name == "t5" and run.status == "ok":
                extra_lines += t5_faithfulness(case, where)
    for line in extra_lines:
        print(line)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
