"""analysis.loading runs users' .py files without leaving anything behind in the process:
sys.path and sys.modules are as they were after every load, whether the user's code worked or raised."""

from __future__ import annotations

import pathlib
import sys

import pytest

from analysis.loading import LoadError, load_data, load_model

MODEL = '''
import dataclasses
from torch import nn
import layers  # a neighbour, imported as when the file runs as a script

@dataclasses.dataclass
class Config:  # dataclasses look the module up in sys.modules while the class is created
    width: int = layers.WIDTH

def make():
    return nn.Linear(2, Config().width)

def broken():
    import helpers  # a neighbour imported only when the factory runs
    raise RuntimeError("factory exploded")

def exits():
    raise SystemExit(3)
'''

DATA = '''
import torch
import layers

def batches():
    import helpers
    for _ in range(2):
        yield torch.randn(3, 2), torch.zeros(3, dtype=torch.long)

def broken():
    yield torch.randn(3, 2)
    raise OSError("disk gone")

def exits():
    raise SystemExit(3)
'''

FAILING_FILES = {
    "raising.py": "import layers\nraise RuntimeError('import exploded')\n",
    "exiting.py": "import layers\nimport sys\nsys.exit(3)\n",
    "syntax.py": "def make(:\n    pass\n",
    # Code that changes sys.path itself, then fails: the scope restores sys.path regardless.
    "path_changing.py": "import sys\nsys.path.append('/nowhere')\nsys.path = sys.path[:1]\nimport no_such_module_ql\n",
}


def write_folder(folder: pathlib.Path, width: int) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "layers.py").write_text(f"WIDTH = {width}\n")
    (folder / "helpers.py").write_text("HELP = 1\n")
    (folder / "model.py").write_text(MODEL)
    (folder / "data.py").write_text(DATA)
    for name, text in FAILING_FILES.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def folder(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = write_folder(tmp_path / "user", width=4)
    # Warm-up: torch imports some of its own submodules on first use; those may stay.
    load_model(f"{folder / 'model.py'}:make")
    load_data(f"{folder / 'data.py'}:batches")
    return folder


def process_state() -> tuple[set[str], list[str]]:
    return set(sys.modules), list(sys.path)


def test_loading_a_factory_and_a_data_function_leaves_no_trace(folder):
    before = process_state()
    model = load_model(f"{folder / 'model.py'}:make")
    data = load_data(f"{folder / 'data.py'}:batches")
    assert process_state() == before
    assert str(folder) not in sys.path_importer_cache
    # The module lives on through what it defined, without a global registry.
    assert model(data.inputs).shape == (6, 4) and type(model).__name__ == "Linear"


@pytest.mark.parametrize("spec", [
    "model.py:broken", "model.py:exits", "model.py:absent",
    "data.py:broken", "data.py:exits",
    *(f"{name}:make" for name in FAILING_FILES),
])
def test_failing_user_code_leaves_no_trace(folder, spec):
    before = process_state()
    load = load_data if spec.startswith("data.py") else load_model
    with pytest.raises(LoadError) as excinfo:
        load(f"{folder / spec}")
    assert process_state() == before
    if spec.endswith(":exits"):
        assert "called sys.exit()" in str(excinfo.value)


def test_each_folder_gets_its_own_neighbours(tmp_path):
    # Left in sys.modules, the first folder's layers.py would answer the second folder's import.
    narrow = write_folder(tmp_path / "narrow", width=3)
    wide = write_folder(tmp_path / "wide", width=7)
    assert load_model(f"{narrow / 'model.py'}:make").out_features == 3
    assert load_model(f"{wide / 'model.py'}:make").out_features == 7
    assert load_model(f"{narrow / 'model.py'}:make").out_features == 3


def test_a_folder_already_on_sys_path_keeps_its_imports(tmp_path, monkeypatch):
    # Importable without the loader, its modules are ordinary imports: only the file itself goes.
    folder = write_folder(tmp_path / "importable", width=5)
    monkeypatch.syspath_prepend(str(folder))
    assert "layers" not in sys.modules
    before = process_state()
    try:
        assert load_model(f"{folder / 'model.py'}:make").out_features == 5
        after = process_state()
        assert after[1] == before[1] and after[0] - before[0] == {"layers"}
    finally:
        sys.modules.pop("layers", None)
