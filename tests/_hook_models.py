"""A model no tracer handles, shared by the hook-engine tests (and loadable by the CLI as
`tests/_hook_models.py:build`, with `labelled_data` saved as an .npz)."""

import torch
from torch import nn

from analysis.data import Dataset


class Branchy(nn.Module):
    """Data-dependent control flow (neither torch.fx nor torch.export can trace it), blocks in a
    ModuleList, and a layer called twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3))
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
            if h.sum() > 0:  # data-dependent: a tracer cannot follow it
                h = h * 0.5
        h = self.shared(torch.relu(self.shared(h)))
        return self.head(h)


def build() -> Branchy:
    return Branchy().eval()


def branchy_data(n=16):
    torch.manual_seed(1)
    return Dataset(torch.randn(n, 6), None, "other", "synthetic")


def labelled_data(n=48) -> Dataset:
    """Inputs with class labels: the FP32 model's own predictions, a quarter of them shifted by one
    class (so quantization can both gain and lose accuracy)."""
    inputs = branchy_data(n).inputs
    with torch.no_grad():
        labels = build()(inputs).argmax(1)
    labels[::4] = (labels[::4] + 1) % 4
    return Dataset(inputs, labels, "classification", "branchy")
