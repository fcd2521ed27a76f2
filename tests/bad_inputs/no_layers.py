"""A model with nothing to quantize: only ReLU and LayerNorm (a normalisation layer stays FP32)."""

import torch
from torch import nn


class NoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(x))


def make() -> nn.Module:
    torch.manual_seed(0)
    return NoLayers()
