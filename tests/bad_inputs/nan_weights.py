"""The corpus's tiny MLP with a non-finite value planted in fc1's weight (a diverged training run)."""

import math

import torch

from tiny import make as _tiny  # a factory may import its neighbours


def make() -> torch.nn.Module:
    model = _tiny()
    with torch.no_grad():
        model.fc1.weight[3, 5] = math.nan
    return model


def make_inf() -> torch.nn.Module:
    model = _tiny()
    with torch.no_grad():
        model.fc2.weight[1, 2] = math.inf
    return model
