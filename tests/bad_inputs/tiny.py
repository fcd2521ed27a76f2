"""The corpus's valid model: a tiny MLP (8 -> 16 -> 4) the bad data files are paired with."""

import torch
from torch import nn

IN_FEATURES = 8
CLASSES = 4


class TinyMLP(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def make() -> nn.Module:
    torch.manual_seed(0)
    return TinyMLP()


def make_other() -> nn.Module:
    """A different model (other widths, other weights): what map_other_model.json was made for."""
    torch.manual_seed(1)
    return TinyMLP(hidden=12)
