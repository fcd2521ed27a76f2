"""Models and a data function that misbehave on purpose (tests/test_bad_inputs.py, "hostile" part).

All wrap the corpus's tiny MLP shape (8 inputs, 4 classes), so they pair with good.npz:
    make_scalar        forward returns a scalar (the sum of the logits), not one row per sample
    make_quoted        a submodule named 'fc"1': a name torch.fx cannot put into generated code
    make_stateful      forward writes its buffers: copies the first input into one in place,
                       replaces another (a counter); BatchNorm in training mode updates its statistics
    make_training      left in training mode with an nn.Dropout (eval() makes it deterministic)
    make_random        F.dropout(training=True) in forward: random even in eval mode
    endless            a data generator that never ends (labelled batches of 4)
"""

import torch
import torch.nn.functional as F
from torch import nn

from tiny import CLASSES, IN_FEATURES, TinyMLP


class Scalar(TinyMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).sum()


class Quoted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.add_module('fc"1', nn.Linear(IN_FEATURES, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, 'fc"1')(x)


class Stateful(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(16)
        self.register_buffer("last", torch.zeros(IN_FEATURES))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last.copy_(x[0])
        self.calls = self.calls + 1
        return self.fc2(self.relu(self.norm(self.fc1(x))))


class Training(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.relu(self.fc1(x))))


class Random(TinyMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(self.relu(self.fc1(x)), 0.5, training=True))


def _seeded(cls: type) -> nn.Module:
    torch.manual_seed(0)
    return cls()


def make_scalar() -> nn.Module:
    return _seeded(Scalar)


def make_quoted() -> nn.Module:
    return _seeded(Quoted)


def make_stateful() -> nn.Module:
    return _seeded(Stateful).train()


def make_training() -> nn.Module:
    return _seeded(Training).train()


def make_random() -> nn.Module:
    return _seeded(Random)


def endless():
    generator = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(4, IN_FEATURES, generator=generator), torch.randint(0, CLASSES, (4,), generator=generator)
