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
    map_unknown_format.json        a precision map naming format "fp3_e1m1"
    map_yaml_aliases.yaml          a 9-level YAML alias bomb (a few hundred bytes, 10^9 values expanded)
    bad_labels.npz                 good.npz with two labels outside the 4 classes (99 and -1)
    fp8_inputs.safetensors         good.npz's inputs stored as float8_e4m3fn (and its labels)
    map_notes_number.json          a map whose "notes" is the number 5
    map_percentile_text.json       a map whose quant.percentile is the string "abc"
The misbehaving models of hostile.py are hand-written too.

Too big to commit, written at test time by `zip_bomb` below: an .npz of a few MB whose arrays
decompress to gigabytes.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
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
    bad_labels = labels.copy()
    bad_labels[0], bad_labels[1] = 99, -1
    quant = {"schema": "quantlens.quant-config/1", "weight_calibration": "mse", "act_calibration": "percentile",
             "percentile": "abc", "granularity": None, "dynamic_activations": False, "fold_batchnorm": True,
             "num_samples": 24, "seed": 0}
    percentile_text = {"schema": "quantlens.precision-map/2", "model": None, "quant": quant,
                       "default": {"weight": "fp32"}, "layers": {"fc1": {"weight": "int8"}}}
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
        "map_unknown_format.json": _map(tiny.make(), {"fc1": {"weight": "fp3_e1m1"}}).encode(),
        "bad_labels.npz": _npz(inputs=inputs, labels=bad_labels),
        "fp8_inputs.safetensors": safetensors_bytes({"inputs": torch.from_numpy(inputs).to(torch.float8_e4m3fn),
                                                     "labels": torch.from_numpy(labels)}),
        "map_notes_number.json": json.dumps({**json.loads(_map(tiny.make(), {"fc1": {"weight": "int8"}})),
                                             "notes": 5}, indent=2).encode() + b"\n",
        "map_percentile_text.json": json.dumps(percentile_text, indent=2).encode() + b"\n",
    }
    files["map_yaml_aliases.yaml"] = _alias_bomb().encode()
    return files


def _crc32_after_zeros(crc: int, count: int) -> int:
    """zlib.crc32(bytes(count), crc) in microseconds instead of seconds per GiB. Zero bytes move the
    inner CRC register linearly (register' = M·register over GF(2), M one byte's shift), and
    zlib.crc32 inverts the register before and after: so apply M**count to ~crc, squaring M."""
    def apply(matrix: list[int], vector: int) -> int:
        out = 0
        for bit, column in enumerate(matrix):
            if vector >> bit & 1:
                out ^= column
        return out

    mask = 0xFFFFFFFF
    matrix = [~zlib.crc32(b"\0", ~(1 << bit) & mask) & mask for bit in range(32)]  # M: columns M·e_bit
    register = ~crc & mask
    while count:
        if count & 1:
            register = apply(matrix, register)
        matrix = [apply(matrix, column) for column in matrix]
        count >>= 1
    return ~register & mask


def zip_bomb(path: str | Path, rows: int = 3 << 25, features: int = tiny.IN_FEATURES) -> Path:
    """An .npz whose `inputs` ([rows, features] float32 zeros: 3 GiB by default) and `labels`
    ([rows] int64 zeros) are a few MB on disk. Written without ever holding the arrays: one
    deflated block of zeros is repeated (full flushes make the blocks identical)."""
    chunk = np.zeros(16 << 20, np.uint8).tobytes()
    members = []
    for name, dtype, shape in (("inputs", "<f4", (rows, features)), ("labels", "<i8", (rows,))):
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False, "shape": shape})
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        assert size % len(chunk) == 0, "rows must make whole 16 MiB chunks"
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        first = deflate.compress(header.getvalue()) + deflate.flush(zlib.Z_FULL_FLUSH)
        block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
        assert deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH) == block
        crc = _crc32_after_zeros(zlib.crc32(header.getvalue()), size)
        data = first + block * (size // len(chunk)) + deflate.flush()
        members.append((f"{name}.npy".encode(), crc, data, len(header.getvalue()) + size))
    out, central = io.BytesIO(), io.BytesIO()
    for name, crc, data, size in members:
        offset = out.tell()
        fields = struct.pack("<HHHHHIII", 20, 0, 8, 0, 0x5821, crc, len(data), size)  # version, flags, deflate, date
        out.write(b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name + data)
        central.write(b"PK\x01\x02" + struct.pack("<H", 20) + fields
                      + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0o644 << 16, offset) + name)
    start = out.tell()
    out.write(central.getvalue())
    out.write(b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(members), len(members), len(central.getvalue()),
                                           start, 0))
    Path(path).write_bytes(out.getvalue())
    return Path(path)
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
