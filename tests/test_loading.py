"""analysis.loading: users' broken files must give one-line LoadErrors that name the problem."""

from __future__ import annotations

import os
import pathlib
import random
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from analysis.data import Dataset
from analysis.loading import LoadError, check_compatible, load_data, load_model, model_fingerprint

SAMPLES = pathlib.Path(__file__).resolve().parents[1] / "sample_models"
needs_sample = pytest.mark.skipif(
    not (SAMPLES / "mlp" / "model.safetensors").exists(), reason="sample_models/mlp not built yet"
)

FACTORY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

def make():
    torch.manual_seed(0)
    return Net()

def make_wide():
    return Net(hidden=16)

def make_with_arg(hidden):
    return Net(hidden)

def broken():
    raise RuntimeError("factory exploded")

def not_a_module():
    return {"fc": 1}
'''


def message(excinfo: pytest.ExceptionInfo) -> str:
    """The LoadError's message, checked to be one non-empty line without a traceback in it."""
    text = str(excinfo.value)
    assert text and "\n" not in text and "Traceback" not in text, text
    assert excinfo.value.__suppress_context__ or excinfo.value.__cause__ is None
    return text


@pytest.fixture
def factory_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "net.py"
    path.write_text(FACTORY)
    return path


def reference_net(factory_file: pathlib.Path) -> nn.Module:
    return load_model(f"{factory_file}:make")


# ----------------------------------------------------------------------------------------------
# models: good cases


def test_factory_with_safetensors_weights_loads_and_runs(factory_file, tmp_path):
    trained = reference_net(factory_file)
    with torch.no_grad():
        trained.fc2.bias.fill_(0.5)
    weights = tmp_path / "w.safetensors"
    save_file(trained.state_dict(), weights)

    model = load_model(f"{factory_file}:make", weights=str(weights))
    assert isinstance(model, nn.Module) and not model.training
    assert torch.equal(model.fc2.bias, torch.full((3,), 0.5))
    x = torch.randn(2, 4)
    assert torch.allclose(model(x), trained(x))


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_pt_state_dict_loads(factory_file, tmp_path, suffix):
    trained = reference_net(factory_file)
    with torch.no_grad():
        trained.fc1.weight.mul_(3)
    path = tmp_path / f"w{suffix}"
    torch.save(trained.state_dict(), path)
    model = load_model(f"{factory_file}:make", weights=str(path))
    assert torch.equal(model.fc1.weight, trained.fc1.weight)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_pt_checkpoint_nesting_is_accepted(factory_file, tmp_path, key):
    trained = reference_net(factory_file)
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, key: trained.state_dict(), "optimizer": {"lr": 0.1}}, path)
    model = load_model(f"{factory_file}:make", weights=str(path))
    assert torch.equal(model.fc2.weight, trained.fc2.weight)


def test_dataparallel_prefix_is_stripped(factory_file, tmp_path):
    trained = reference_net(factory_file)
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, path)
    model = load_model(f"{factory_file}:make", weights=str(path))
    assert torch.equal(model.fc1.bias, trained.fc1.bias)


def test_tied_weights_saved_once_are_filled(tmp_path):
    (tmp_path / "tied.py").write_text(textwrap.dedent("""
        from torch import nn
        class Tied(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(5, 4)
                self.head = nn.Linear(4, 5, bias=False)
                self.head.weight = self.emb.weight
            def forward(self, x):
                return self.head(self.emb(x))
        def make():
            return Tied()
    """))
    weights = tmp_path / "tied.safetensors"
    save_file({"emb.weight": torch.ones(5, 4)}, weights)
    model = load_model(f"{tmp_path / 'tied.py'}:make", weights=str(weights))
    assert torch.equal(model.head.weight, torch.ones(5, 4))


def test_factory_may_import_its_neighbours_and_dirs_may_hold_colons(tmp_path):
    folder = tmp_path / "run:2"
    folder.mkdir()
    (folder / "layers.py").write_text("from torch import nn\ndef block():\n    return nn.Linear(2, 2)\n")
    (folder / "model.py").write_text("import layers\ndef build():\n    return layers.block()\n")
    model = load_model(f"{folder / 'model.py'}:build")
    assert isinstance(model, nn.Linear)


def test_pt2_round_trip(factory_file, tmp_path):
    net = reference_net(factory_file)
    program = torch.export.export(net, (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = load_model(str(path))
    assert isinstance(loaded, torch.export.ExportedProgram)
    x = torch.randn(3, 4)
    assert torch.allclose(loaded.module()(x), net(x))
    # The exported program's state dict keeps the module's names, so the fingerprints agree.
    assert model_fingerprint(loaded) == model_fingerprint(net)
    check_compatible(loaded, Dataset(torch.randn(5, 4)))


@needs_sample
def test_sample_model_and_data():
    model = load_model("sample:mlp")
    data = load_data("sample:mlp", "evaluation")
    assert data.task == "classification" and data.name == "mlp/evaluation"
    assert data.labels is not None and data.labels.dtype == torch.int64
    check_compatible(model, data)
    assert model_fingerprint(model) == model_fingerprint(load_model("sample:mlp"))


# ----------------------------------------------------------------------------------------------
# models: refused


class PickledNet(nn.Module):
    """The factory's architecture, importable by name so that torch.save can pickle it whole (the
    factory's own class lives in a module the loader does not register)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)


def test_pickled_module_is_refused_with_explanation(factory_file, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(PickledNet(), path)
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{factory_file}:make", weights=str(path))
    text = message(excinfo)
    assert "whole.pt" in text and "pickle" in text and "run arbitrary code" in text
    assert "PickledNet" in text  # names the class the pickle wanted to build
    assert "torch.save(model.state_dict(), path)" in text and "safetensors" in text


class _Malicious:
    """Unpickling this opens (creates) the marker file: what a hostile checkpoint could do."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_never_runs(factory_file, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"fc1.weight": _Malicious(marker)}, path)
    assert not marker.exists()
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{factory_file}:make", weights=str(path))
    text = message(excinfo)
    assert "evil.pt" in text and "pickle" in text and "open" in text
    assert not marker.exists()
    # The same file given as data is refused the same way.
    with pytest.raises(LoadError) as excinfo:
        load_data(str(path))
    assert "pickle" in message(excinfo)
    assert not marker.exists()
    # control: the payload is live, so the checks above could fail
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_and_unexpected_keys_are_named(factory_file, tmp_path):
    state = reference_net(factory_file).state_dict()
    del state["fc1.weight"]
    state["foo.bar"] = torch.zeros(1)
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{factory_file}:make", weights=str(path))
    text = message(excinfo)
    assert "do not fit the model" in text
    assert "missing fc1.weight" in text and "unexpected foo.bar" in text


def test_shape_mismatch_is_named(factory_file, tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(load_model(f"{factory_file}:make_wide").state_dict(), path)
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{factory_file}:make", weights=str(path))
    text = message(excinfo)
    assert "fc2.weight has shape (3, 16) in the file but (3, 8) in the model" in text
    assert "fc1.weight has shape (16, 4) in the file but (8, 4) in the model" in text


def test_many_missing_keys_are_capped(tmp_path):
    (tmp_path / "big.py").write_text(
        "from torch import nn\ndef make():\n    return nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])\n"
    )
    path = tmp_path / "empty.safetensors"
    save_file({"other": torch.zeros(1)}, path)
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{tmp_path / 'big.py'}:make", weights=str(path))
    text = message(excinfo)
    assert "missing 0.weight, 0.bias, 1.weight (+5 more)" in text and "unexpected other" in text


def test_checkpoint_without_known_nesting_lists_keys(factory_file, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 1, "weights": reference_net(factory_file).state_dict()}, path)
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{factory_file}:make", weights=str(path))
    text = message(excinfo)
    assert "checkpoint" in text and "epoch" in text and "weights" in text


def test_truncated_safetensors(factory_file, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(reference_net(factory_file).state_dict(), path)
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{factory_file}:make", weights=str(path))
    text = message(excinfo)
    assert "w.safetensors is not a valid safetensors file" in text and "SafetensorError" in text


# Seeded bytes, not os.urandom: xdist workers must collect the same parameter ids.
@pytest.mark.parametrize("content", [b"", b"\x00" * 3, random.Random(0).randbytes(64) + b"\xff" * 8],
                         ids=["empty", "three-zeros", "random-bytes"])
def test_garbage_safetensors_header(factory_file, tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{factory_file}:make", weights=str(path))
    assert "not a valid safetensors file" in message(excinfo)


@pytest.mark.parametrize("kind", ["truncated", "random", "empty"])
def test_corrupt_pt(factory_file, tmp_path, kind):
    path = tmp_path / "w.pt"
    torch.save(reference_net(factory_file).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "random": b"\x80\x02" + os.urandom(200), "empty": b""}[kind])
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{factory_file}:make", weights=str(path))
    text = message(excinfo)
    assert "w.pt" in text and ("corrupt" in text or "truncated" in text)


def test_pt2_random_bytes(tmp_path, caplog):
    path = tmp_path / "model.pt2"
    path.write_bytes(os.urandom(256))
    with pytest.raises(LoadError) as excinfo:
        load_model(str(path))
    text = message(excinfo)
    assert "model.pt2 is not a torch.export archive" in text and "torch.export.save" in text
    assert "Traceback" not in caplog.text


def test_pt2_refusals(factory_file, tmp_path, caplog):
    net = reference_net(factory_file)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(1, 4),)), path)
    with pytest.raises(LoadError) as excinfo:
        load_model(str(path), weights="w.pt")
    assert "already holds its weights" in message(excinfo)
    # Still a zip, but cut short: torch's real cause is reported instead of "see the warnings above".
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(LoadError) as excinfo:
        load_model(str(path))
    text = message(excinfo)
    assert "model.pt2 could not be loaded as an exported program" in text and "PytorchStreamReader" in text
    # A torch.save file renamed to .pt2 is a zip without the export archive's records.
    torch.save(net.state_dict(), path)
    with pytest.raises(LoadError) as excinfo:
        load_model(str(path))
    assert "could not be loaded as an exported program" in message(excinfo)
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("name", ["w.pt", "w.safetensors", "w.pth"])
def test_weights_file_given_as_model(factory_file, tmp_path, name):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(reference_net(factory_file).state_dict(), path)
    else:
        torch.save(reference_net(factory_file).state_dict(), path)
    with pytest.raises(LoadError) as excinfo:
        load_model(str(path))
    text = message(excinfo)
    assert f"{name} holds weights, not an architecture" in text
    assert "file.py:factory" in text and "--weights" in text


def test_missing_file_directory_and_extension(tmp_path, factory_file):
    with pytest.raises(LoadError) as excinfo:
        load_model(str(tmp_path / "nope.pt2"))
    assert "nope.pt2 does not exist" in message(excinfo)
    with pytest.raises(LoadError) as excinfo:
        load_model(str(tmp_path))
    assert "is a directory" in message(excinfo)
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(LoadError) as excinfo:
        load_model(str(tmp_path / "model.onnx"))
    text = message(excinfo)
    assert "unsupported model file" in text and "'.onnx'" in text and "sample:<name>" in text
    with pytest.raises(LoadError) as excinfo:
        load_model(str(tmp_path / "missing.py") + ":make")
    assert "missing.py does not exist" in message(excinfo)
    with pytest.raises(LoadError) as excinfo:
        load_model(str(factory_file))
    assert "name the function" in message(excinfo)
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{factory_file}:make", weights=str(tmp_path / "nope.safetensors"))
    assert "weights file" in message(excinfo) and "does not exist" in str(excinfo.value)
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{factory_file}:make", weights=str(tmp_path / "w.onnx"))
    assert "unsupported extension '.onnx'" in message(excinfo)


def test_unknown_sample_lists_names():
    with pytest.raises(LoadError) as excinfo:
        load_model("sample:resnet")
    text = message(excinfo)
    assert "'resnet'" in text and "mlp" in text and "cnn" in text
    with pytest.raises(LoadError) as excinfo:
        load_data("sample:resnet")
    assert "mlp" in message(excinfo)


def test_missing_factory_lists_what_the_file_defines(factory_file):
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{factory_file}:build")
    text = message(excinfo)
    assert "has no factory 'build'" in text and "make" in text and "Net" in text


def test_factory_raising(factory_file):
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{factory_file}:broken")
    text = message(excinfo)
    assert "broken()" in text and "RuntimeError: factory exploded" in text


def test_factory_needing_arguments(factory_file):
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{factory_file}:make_with_arg")
    assert "needs arguments (hidden)" in message(excinfo)


def test_factory_returning_non_module(factory_file):
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{factory_file}:not_a_module")
    assert "returned a dict, not a torch.nn.Module" in message(excinfo)


def test_syntax_error_and_failing_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def make(:\n    pass\n")
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{bad}:make")
    text = message(excinfo)
    assert "bad.py" in text and "SyntaxError at line 1" in text
    broken = tmp_path / "imports.py"
    broken.write_text("import no_such_module_for_quantlens\n")
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{broken}:make")
    assert "ModuleNotFoundError" in message(excinfo) and "no_such_module_for_quantlens" in str(excinfo.value)


def test_loaderror_is_a_valueerror_and_flattens_lines():
    assert issubclass(LoadError, ValueError)
    assert str(LoadError("a\n  b\n\nc")) == "a b c"


# ----------------------------------------------------------------------------------------------
# data


def test_npz_data_with_labels_infers_classification(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, inputs=np.random.rand(10, 4), labels=np.arange(10, dtype=np.int32) % 3)
    data = load_data(str(path))
    assert data.inputs.dtype == torch.float32 and data.inputs.shape == (10, 4)
    assert data.labels.dtype == torch.int64 and data.task == "classification" and data.name == "calib.npz"


def test_pt_data_language_model_and_split_ignored(tmp_path):
    path = tmp_path / "tokens.pt"
    torch.save({"inputs": torch.randint(0, 50, (6, 8)), "labels": torch.randint(0, 50, (6, 8))}, path)
    data = load_data(str(path), split="evaluation")
    assert data.task == "language-model" and data.inputs.dtype == torch.int64 and len(data) == 6


def test_safetensors_data_without_labels(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"inputs": torch.randn(5, 3, dtype=torch.float64)}, path)
    data = load_data(str(path))
    assert data.labels is None and data.task == "other" and data.inputs.dtype == torch.float32


def test_explicit_task_and_regression_labels(tmp_path):
    path = tmp_path / "reg.npz"
    np.savez(path, inputs=np.random.rand(4, 2).astype(np.float32), labels=np.random.rand(4))
    assert load_data(str(path)).task == "other"
    with pytest.raises(LoadError) as excinfo:
        load_data(str(path), task="classification")
    assert "needs integer ids" in message(excinfo)
    with pytest.raises(LoadError) as excinfo:
        load_data(str(path), task="segmentation")
    assert "unknown task 'segmentation'" in message(excinfo)


def test_python_function_data(tmp_path):
    (tmp_path / "batches.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch
        def tuples():
            for i in range(3):
                yield torch.randn(4, 2), torch.full((4,), i)
        def dicts():
            return [{"inputs": np.ones((2, 2)), "labels": np.zeros(2, dtype=np.int64)}] * 2
        def plain():
            return [torch.randn(3, 2), torch.randn(1, 2)]
        def single():
            return torch.randn(5, 2)
        def nothing():
            return iter(())
        def mixed():
            return [(torch.randn(2, 2), torch.zeros(2, dtype=torch.long)), torch.randn(2, 2)]
        def ragged():
            return [torch.randn(2, 2), torch.randn(2, 3)]
        def boom():
            yield torch.randn(2, 2)
            raise OSError("disk gone")
    """))
    spec = str(tmp_path / "batches.py")
    data = load_data(f"{spec}:tuples")
    assert len(data) == 12 and data.task == "classification" and data.labels.tolist()[-1] == 2
    assert data.name == "batches.py:tuples"
    data = load_data(f"{spec}:dicts")
    assert len(data) == 4 and data.inputs.dtype == torch.float32 and data.task == "classification"
    data = load_data(f"{spec}:plain")
    assert len(data) == 4 and data.labels is None
    assert len(load_data(f"{spec}:single")) == 5  # a bare tensor is one batch, not five
    for name, expected in [
        ("nothing", "has no samples"),
        ("mixed", "batch 1 has no labels but batch 0 has"),
        ("ragged", "batch 1 inputs have shape (2, 3) but batch 0 had (2, 2)"),
        ("boom", "raised OSError: disk gone"),
        ("absent", "has no function 'absent'"),
    ]:
        with pytest.raises(LoadError) as excinfo:
            load_data(f"{spec}:{name}")
        assert expected in message(excinfo), name


def test_arrays_are_passed_by_name_and_checked_against_forward(tmp_path):
    # Every array but 'labels' is an input passed to forward under its name: x and y here.
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 2), dtype=np.float32), y=np.zeros(2, dtype=np.float32))
    data = load_data(str(path))
    assert data.inputs.names == ("x", "y") and data.labels is None
    with pytest.raises(LoadError) as excinfo:
        check_compatible(nn.Linear(2, 3), data)  # forward(input): no parameter x
    text = message(excinfo)
    assert "input array 'x'" in text and "no parameter of that name" in text and "(it takes input)" in text


def test_no_input_arrays_lists_keys_found(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, labels=np.zeros(2, dtype=np.int64))
    with pytest.raises(LoadError) as excinfo:
        load_data(str(path))
    assert "no input arrays (keys found: 'labels')" in message(excinfo)


def test_misspelt_labels_key_is_not_silently_dropped(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"inputs": torch.zeros(2, 2), "label": torch.zeros(2, dtype=torch.long)}, path)
    with pytest.raises(LoadError) as excinfo:
        load_data(str(path))
    assert "has key 'label'; did you mean 'labels'?" in message(excinfo)


def test_label_count_mismatch(tmp_path):
    path = tmp_path / "d.pt"
    torch.save({"inputs": torch.zeros(5, 2), "labels": torch.zeros(4, dtype=torch.long)}, path)
    with pytest.raises(LoadError) as excinfo:
        load_data(str(path))
    assert "has 5 inputs but 4 labels" in message(excinfo)


def test_empty_inputs(tmp_path):
    path = tmp_path / "empty.npz"
    np.savez(path, inputs=np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(LoadError) as excinfo:
        load_data(str(path))
    text = message(excinfo)
    assert "empty.npz has no samples" in text


def test_nan_inputs_are_counted(tmp_path):
    x = np.zeros((4, 3), dtype=np.float32)
    x[0, 0] = np.nan
    x[1, 1] = np.inf
    x[2, 2] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, inputs=x)
    with pytest.raises(LoadError) as excinfo:
        load_data(str(path))
    text = message(excinfo)
    assert "nan.npz" in text and "3 non-finite values (2 NaN, 1 Inf)" in text


def test_pickled_npz_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "obj.npz"
    np.savez(path, inputs=np.array([_Malicious(marker)], dtype=object))
    with pytest.raises(LoadError) as excinfo:
        load_data(str(path))
    text = message(excinfo)
    assert "obj.npz" in text and "'inputs'" in text and "pickled object array" in text
    assert not marker.exists()
    np.load(path, allow_pickle=True)["inputs"]  # control: unpickling it does run the payload
    assert marker.exists()


def test_bad_data_dtypes_and_containers(tmp_path):
    path = tmp_path / "bool.pt"
    torch.save({"inputs": torch.ones(2, 2, dtype=torch.bool)}, path)
    with pytest.raises(LoadError) as excinfo:
        load_data(str(path))
    assert "dtype bool" in message(excinfo)
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2, 2), path)
    with pytest.raises(LoadError) as excinfo:
        load_data(str(path))
    assert "holds a Tensor, not a dict" in message(excinfo)
    path = tmp_path / "data.csv"
    path.write_text("1,2\n")
    with pytest.raises(LoadError) as excinfo:
        load_data(str(path))
    assert "unsupported data file" in message(excinfo)


# ----------------------------------------------------------------------------------------------
# compatibility and fingerprints


def test_check_compatible_wrong_shape_is_one_line(factory_file):
    model = reference_net(factory_file)
    check_compatible(model, Dataset(torch.randn(3, 4)))
    with pytest.raises(LoadError) as excinfo:
        check_compatible(model, Dataset(torch.randn(3, 5), name="wide.npz"))
    text = message(excinfo)
    assert text.startswith("the model cannot run on the data: input of shape (1, 5) dtype float32")
    assert "failed with RuntimeError: mat1 and mat2 shapes cannot be multiplied" in text
    assert "check that the data matches the model's expected input" in text


def test_check_compatible_needs_a_float_output():
    class Argmax(nn.Module):
        def forward(self, x):
            return {"ids": x.argmax(-1)}

    with pytest.raises(LoadError) as excinfo:
        check_compatible(Argmax(), Dataset(torch.randn(2, 3)))
    assert "no floating-point tensor" in message(excinfo)


def test_fingerprint_stable_and_sensitive(factory_file, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(reference_net(factory_file).state_dict(), path)
    first = load_model(f"{factory_file}:make", weights=str(path))
    second = load_model(f"{factory_file}:make", weights=str(path))
    assert model_fingerprint(first) == model_fingerprint(second)
    assert len(model_fingerprint(first)) == 16 and int(model_fingerprint(first), 16) >= 0
    with torch.no_grad():
        second.fc1.weight[0, 0] += 1e-3
    assert model_fingerprint(first) != model_fingerprint(second)
    assert model_fingerprint(first) != model_fingerprint(first.to(torch.bfloat16))
