"""torchvision / timm import beside the CPU torch (analysis.compat)."""

import importlib.util

import pytest
import torch

from analysis.compat import import_timm, import_torchvision


def test_torchvision_model_runs():
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (extra: vision)")
    torchvision = import_torchvision()
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert import_torchvision() is torchvision  # a second call is a plain import


def test_timm_model_runs():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (extra: vision)")
    timm = import_timm()
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_user_code_gets_the_guard_without_paying_for_torchvision(tmp_path):
    """In a fresh process (no conftest import): loading a user's file that does not use torchvision
    leaves it unimported; one that does imports it through the guard (the CUDA-built wheel beside a
    CPU torch would otherwise fail) and gets torchvision's own module spec."""
    import subprocess
    import sys

    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (extra: vision)")
    (tmp_path / "plain.py").write_text("import torch\ndef build():\n    return torch.nn.Linear(2, 2)\n")
    (tmp_path / "vision.py").write_text("from torchvision.models import resnet18\n"
                                        "def build():\n    return resnet18(num_classes=3)\n")
    script = (
        "import sys\nfrom analysis.loading import load_model\n"
        f"load_model({str(tmp_path / 'plain.py')!r} + ':build')\n"
        "print('torchvision' in sys.modules)\n"
        f"m = load_model({str(tmp_path / 'vision.py')!r} + ':build')\n"
        "import torchvision\n"
        "print(type(m).__name__, torchvision.__spec__.origin.endswith('__init__.py'))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["False", "ResNet True"]
