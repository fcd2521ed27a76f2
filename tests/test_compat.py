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
