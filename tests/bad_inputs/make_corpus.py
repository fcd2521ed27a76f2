"""Write the bad-input corpus next to this file: small (a few KB), deterministic, commit-friendly.

    python tests/bad_inputs/make_corpus.py

Every file is a fixed function of fixed seeds, so re-running it rewrites identical bytes (the test
suite checks that). The model factories are hand-written sources, not generated:
    tiny.py:make / make_other      the valid 8 -> 16 -> 4 MLP (and a different one, for a foreign map)
    no_layers.py:make              only LayerNorm and ReLU: nothing to quantize
    unsupported.py:make / make_bilinear   a GRU / an nn.Bilinear next to a Linear
    nan_weights.py:make / make_inf a NaN in fc1.weight / an Inf in fc2.weight
    nan_activations.py:make        finite weights, NaN activations (sqrt of a negative)
    constant_weights.py:make       fc1.weight one constant, fc2.weight all zeros
    markdown_names.py:make         a valid MLP whose first layer is named ![x](http://host/x)

Data files pair with `tiny.py:make` (inputs [N, 8] float32, labels [N] class ids in 0..3):
    good.npz                       24 labelled samples (the valid reference, and a fuzzing seed)
    good.safetensors / good.pt     tiny.make()'s state dict (valid weights; fuzzing seeds)
    good_data.pt / good_data.safetensors   the good.npz samples in the other data containers
    truncated.safetensors          good.safetensors cut in half
    truncated.npz                  good.npz cut in half
    random_bytes.pt2               2 KiB of random bytes named like an exported program
    random_bytes.pt                2 KiB of random bytes named like a state dict
    text_as.npz                    a text file renamed to .npz (a file of the wrong kind)
    weights_as_data.safetensors    a state dict given as data (no 'inputs' key)
    pickled_module.pt              torch.save(model): a pickled module, not a state dict
    empty_inputs.npz               inputs of shape (0, 8)
    single_sample.npz              one labelled sample (valid)
    constant_inputs.npz            every input is 0.5 (zero-range activations; valid)
    nan_inputs.npz                 inputs with NaN and Inf in them
    wrong_shape.npz                inputs [N, 5] for a model that takes [N, 8]
    int_inputs_for_float_model.npz integer inputs for a float model
    no_labels.npz                  inputs only: no task metric, no max-drop budget
    map_other_model.json           a valid precision map made for tiny.make_other()
    map_unknown_format.json        a precision map naming format "fp4_e2m1"
    map_yaml_aliases.yaml          a 9-level YAML alias bomb (a few hundred bytes, 10^9 values expanded)
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))  # the repository root, for `analysis`

import tiny  # noqa: E402

SAMPLES = 24


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return _zip_deterministic(buffer.getvalue())


def _zip_deterministic(data: bytes) -> bytes:
    """np.savez stamps entries with the current time; rewrite them with a fixed date."""
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=(2024, 1, 1, 0, 0, 0))
            fixed.external_attr = 0o644 << 16
            dst.writestr(fixed, src.read(info.filename))
    return out.getvalue()


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _random_bytes(seed: int, n: int = 2048) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _good_samples() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((SAMPLES, tiny.IN_FEATURES)).astype(np.float32)
    labels = rng.integers(0, tiny.CLASSES, SAMPLES).astype(np.int64)
    return inputs, labels


def _map(model: torch.nn.Module, layers: dict) -> str:
    from analysis.loading import model_fingerprint

    payload = {"schema": "quantlens.precision-map/1", "model": model_fingerprint(model),
               "default": {"weight": "fp32"}, "calibration": {}, "layers": layers}
    return json.dumps(payload, indent=2) + "\n"


def corpus() -> dict[str, bytes]:
    """File name -> content."""
    inputs, labels = _good_samples()
    state = {k: v.contiguous() for k, v in tiny.make().state_dict().items()}
    weights = safetensors_bytes(state)
    good = _npz(inputs=inputs, labels=labels)
    nan_inputs = inputs.copy()
    nan_inputs[2, 3] = np.nan
    nan_inputs[5, 0] = np.inf
    files = {
        "good.npz": good,
        "good.safetensors": weights,
        "good.pt": _torch_bytes(state),
        "good_data.pt": _torch_bytes({"inputs": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}),
        "good_data.safetensors": safetensors_bytes({"inputs": torch.from_numpy(inputs),
                                                    "labels": torch.from_numpy(labels)}),
        "truncated.safetensors": weights[: len(weights) // 2],
        "truncated.npz": good[: len(good) // 2],
        "random_bytes.pt2": _random_bytes(1),
        "random_bytes.pt": _random_bytes(2),
        "text_as.npz": b"label,pixel0,pixel1\n3,0.25,0.5\n1,0.75,0.0\n" * 8,
        "weights_as_data.safetensors": weights,
        "pickled_module.pt": _torch_bytes(tiny.make()),
        "empty_inputs.npz": _npz(inputs=np.zeros((0, tiny.IN_FEATURES), np.float32), labels=np.zeros(0, np.int64)),
        "single_sample.npz": _npz(inputs=inputs[:1], labels=labels[:1]),
        "constant_inputs.npz": _npz(inputs=np.full_like(inputs, 0.5), labels=labels),
        "nan_inputs.npz": _npz(inputs=nan_inputs, labels=labels),
        "wrong_shape.npz": _npz(inputs=inputs[:, :5].copy(), labels=labels),
        "int_inputs_for_float_model.npz": _npz(inputs=(inputs * 10).astype(np.int64), labels=labels),
        "no_labels.npz": _npz(inputs=inputs),
        "map_other_model.json": _map(tiny.make_other(), {"fc1": {"weight": "int8"}, "fc2": {"weight": "int4"}}).encode(),
        "map_unknown_format.json": _map(tiny.make(), {"fc1": {"weight": "fp4_e2m1"}}).encode(),
    }
    files["map_yaml_aliases.yaml"] = _alias_bomb().encode()
    return files


def _alias_bomb(levels: int = 9) -> str:
    """Each anchor lists the previous one ten times: 10**levels strings once expanded."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]")
    lines.append(f"layers: *a{levels}")
    return "\n".join(lines) + "\n"


def main() -> None:
    for name, content in corpus().items():
        (HERE / name).write_bytes(content)
    total = sum(len(c) for c in corpus().values())
    print(f"wrote {len(corpus())} files ({total / 1024:.1f} KiB) to {HERE}")


if __name__ == "__main__":
    main()
