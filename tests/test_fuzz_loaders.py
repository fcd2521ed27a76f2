"""Mutation fuzzing of the loaders: a damaged file gives a LoadError, never another exception or a hang.

Valid seeds (a .safetensors and a .pt state dict, .npz / .pt / .safetensors data sets and a .pt2
program) are mutated byte-wise: bit flips, truncation, insertion, splicing in a piece of another
seed, overwriting a run of bytes. `load_model` / `load_data` must either succeed or raise
`LoadError` (a one-line message). Pickles must never run: the malicious variants would create a
marker file, which must never appear.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis.loading import LoadError, load_data, load_model

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
FACTORY = f"{CORPUS / 'tiny.py'}:make"
SECONDS_PER_EXAMPLE = 20  # a hang guard, far above what any example takes
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

SEEDS = {
    "weights.safetensors": CORPUS / "good.safetensors",
    "weights.pt": CORPUS / "good.pt",
    "data.npz": CORPUS / "good.npz",
    "data.pt": CORPUS / "good_data.pt",
    "data.safetensors": CORPUS / "good_data.safetensors",
}


class Hang(Exception):
    pass


@contextlib.contextmanager
def no_hang(seconds: int = SECONDS_PER_EXAMPLE):
    def alarm(signum, frame):
        raise Hang(f"a loader ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@st.composite
def mutated(draw, seed: bytes, donors: tuple[bytes, ...] = ()) -> bytes:
    """`seed` with one to three byte-level mutations."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "splice", "overwrite"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "splice":
            donor = draw(st.sampled_from(donors or (seed,)))
            start = draw(st.integers(0, max(len(donor) - 1, 0)))
            data[at:at + draw(st.integers(0, 64))] = donor[start:start + draw(st.integers(1, 256))]
        elif op == "overwrite" and data:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(chunk)] = chunk
    return bytes(data)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="quantlens-fuzz-") as folder:
        yield Path(folder)


def _load(kind: str, path: Path) -> None:
    """Succeed or raise LoadError; anything else fails the test."""
    try:
        with no_hang():
            if kind == "weights":
                load_model(FACTORY, str(path))
            elif kind == "pt2":
                load_model(str(path))
            else:
                load_data(str(path))
    except LoadError as exc:
        text = str(exc)
        assert text and "\n" not in text and "Traceback" not in text, text


DONORS = tuple(p.read_bytes() for p in SEEDS.values())


@pytest.mark.parametrize("name", list(SEEDS))
def test_valid_seeds_load(name):
    path = SEEDS[name]
    if name.startswith("weights"):
        load_model(FACTORY, str(path))
    else:
        assert len(load_data(str(path))) == 24


def _fuzz(name: str):
    seed = SEEDS[name].read_bytes()

    @FUZZ
    @given(content=mutated(seed, DONORS))
    def run(workdir, content):
        path = workdir / f"fuzz_{name}"  # the seed's extension picks the reader
        path.write_bytes(content)
        _load(name.split(".")[0], path)

    return run


@pytest.mark.parametrize("name", list(SEEDS))
def test_mutated_files_load_or_raise_loaderror(name, workdir):
    _fuzz(name)(workdir)


# --- exported programs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def program_bytes() -> bytes:
    """A valid .pt2 of the corpus's tiny MLP, exported with the installed torch (archives are version-bound)."""
    program = torch.export.export(load_model(FACTORY), (torch.randn(2, 8),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def test_mutated_pt2_loads_or_raises_loaderror(program_bytes, workdir):
    (workdir / "good.pt2").write_bytes(program_bytes)
    load_model(str(workdir / "good.pt2"))  # the seed itself is valid

    @settings(FUZZ, max_examples=25)
    @given(content=mutated(program_bytes))
    def run(content):
        path = workdir / "fuzz.pt2"
        path.write_bytes(content)
        _load("pt2", path)

    run()


@st.composite
def mutated_zip_member(draw, archive: bytes) -> bytes:
    """A .pt2 whose zip structure stays valid but one member's content is damaged (gets past is_zipfile)."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    names = source.namelist()
    victim = draw(st.sampled_from(names))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for name in names:
            content = source.read(name)
            target.writestr(name, draw(mutated(content)) if name == victim else content)
    return out.getvalue()


def test_pt2_with_a_damaged_member_loads_or_raises_loaderror(program_bytes, workdir):
    @settings(FUZZ, max_examples=25)
    @given(content=mutated_zip_member(program_bytes))
    def run(content):
        path = workdir / "member.pt2"
        path.write_bytes(content)
        _load("pt2", path)

    run()


# --- pickles never run ---------------------------------------------------------------------------------


class _Payload:
    """Unpickling this calls open(marker, "w"): creating the marker proves code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_variants(marker: Path) -> dict[str, bytes]:
    payload = _Payload(str(marker))
    state = {"fc1.weight": torch.zeros(16, 8), "evil": payload}
    with_torch = io.BytesIO()
    torch.save(state, with_torch)
    legacy = io.BytesIO()
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    data = io.BytesIO()
    torch.save({"inputs": torch.zeros(4, 8), "labels": payload}, data)
    return {
        "weights.pt": with_torch.getvalue(),
        "legacy_weights.pt": legacy.getvalue(),
        "raw_pickle_weights.pth": pickle.dumps(state, protocol=2),
        "data.pt": data.getvalue(),
        "raw_pickle_data.npz": pickle.dumps({"inputs": payload}, protocol=4),
    }


def test_malicious_pickles_never_run(workdir):
    marker = workdir / "PWNED"
    variants = _malicious_variants(marker)
    assert not marker.exists()
    for name, content in variants.items():
        path = workdir / f"evil_{name}"
        path.write_bytes(content)
        with pytest.raises(LoadError, match="pickle"):
            if "weights" in name:
                load_model(FACTORY, str(path))
            else:
                load_data(str(path))
        assert not marker.exists(), name


def test_the_malicious_payloads_are_live(workdir):
    """Control for the two tests around it: unpickled without safeguards, every variant runs its
    payload, so "the marker was never created" means the loaders refused it."""
    marker = workdir / "PWNED_CONTROL"
    for name, content in _malicious_variants(marker).items():
        path = workdir / f"control_{name}"
        path.write_bytes(content)
        if name.startswith("raw_pickle"):
            pickle.loads(content)
        else:
            torch.load(path, weights_only=False)
        assert marker.exists(), name
        os.remove(marker)


def test_mutated_malicious_pickles_never_run(workdir):
    marker = workdir / "PWNED_MUTATED"
    variants = _malicious_variants(marker)
    names = sorted(variants)

    @settings(FUZZ, max_examples=40)
    @given(name=st.sampled_from(names), data=st.data())
    def run(name, data):
        content = data.draw(mutated(variants[name], tuple(variants.values())))
        path = workdir / f"evil_mutated_{name}"
        path.write_bytes(content)
        _load("weights" if "weights" in name else "data", path)
        assert not marker.exists(), name

    run()
    assert not marker.exists()
    with contextlib.suppress(FileNotFoundError):
        os.remove(marker)
