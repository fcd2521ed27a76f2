"""Unsupported layer types next to a Linear: the GRU / Bilinear are skipped with a reason, fc is analysed.

Both take the corpus's [N, 8] inputs (the GRU reads them as a length-1 sequence).
"""

import torch
from torch import nn


class WithGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.unsqueeze(1))
        return self.fc(out[:, -1])


class WithBilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(8, 8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bilinear(x, x)))


def make() -> nn.Module:
    torch.manual_seed(0)
    return WithGRU()


def make_bilinear() -> nn.Module:
    torch.manual_seed(0)
    return WithBilinear()
