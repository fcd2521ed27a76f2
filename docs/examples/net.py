"""An example of your own model for `quantlens analyze docs/examples/net.py:build --weights ...`.

`build` returns the architecture with fresh layers; quantlens loads the weights file into it. This
one is the bundled sample MLP's architecture, so the weights `make_files.py` writes fit it.
"""

from torch import nn


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
