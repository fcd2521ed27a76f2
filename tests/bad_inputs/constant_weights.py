"""Zero-range weights: fc1's weight is one constant everywhere, fc2's is all zeros. Valid, if odd."""

import torch

from tiny import make as _tiny


def make() -> torch.nn.Module:
    model = _tiny()
    with torch.no_grad():
        model.fc1.weight.fill_(0.25)
        model.fc2.weight.zero_()
    return model
