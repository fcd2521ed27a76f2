"""Finite weights, non-finite activations: sqrt of a negative pre-activation gives NaN inside the model."""

import torch

from tiny import make as _tiny


class SqrtMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        inner = _tiny()
        self.fc1, self.fc2 = inner.fc1, inner.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sqrt(self.fc1(x)))  # NaN wherever fc1's output is negative


def make() -> torch.nn.Module:
    return SqrtMLP()
