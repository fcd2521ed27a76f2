"""Layer names that are Markdown: a valid 8 -> 16 -> 4 MLP whose first layer is named like an image
that points at an outside host. Every surface must show the name as text: the dashboard must not
make the browser fetch http://host/x, the HTML report must not hold an <img>.
"""

import torch
from torch import nn

IMAGE_NAME = "![x](http://host/x)"


class MarkdownNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.add_module(IMAGE_NAME, nn.Linear(8, 16))
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(getattr(self, IMAGE_NAME)(x)))


def make() -> nn.Module:
    torch.manual_seed(0)
    return MarkdownNames()
