"""Write the files the README's own-model commands read, into the current folder:

    net.safetensors   weights for docs/examples/net.py:build (the sample MLP's trained weights)
    calib.npz         calibration data: `inputs` (256 × 64) and class-id `labels`

    python docs/examples/make_files.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: sample_models

import sample_models  # noqa: E402

# nn.Sequential names its layers 0, 2, 4 where the sample MLP says fc1, fc2, fc3.
NAMES = {"fc1": "0", "fc2": "2", "fc3": "4"}

state = sample_models.load_model("mlp").state_dict()
save_file({f"{NAMES[k.split('.')[0]]}.{k.split('.')[1]}": v.contiguous() for k, v in state.items()}, "net.safetensors")
split = sample_models.load_split("mlp", "calibration")
np.savez("calib.npz", inputs=split["inputs"].numpy(), labels=split["labels"].numpy())
print("wrote net.safetensors and calib.npz")
