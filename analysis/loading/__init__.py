"""Load users' models and data sets, turning every way their files can be broken into one clear line.

Users point the tool at their own files, and what they bring is often broken: a pickled module
instead of a state dict, weights saved from a different architecture, a truncated download, a data
file with the wrong keys. Every such problem raises `LoadError` with a single-line message that
says what is wrong and how to fix it, instead of a traceback from deep inside torch.

Model specs:
    sample:<name>                 a bundled sample model (see `sample_models`)
    path/to/file.py:factory       call `factory()` from that file; weights via `weights=`
    path/to/model.pt2             a program saved with `torch.export.save`

Data specs:
    sample:<name>                 the `split` of a bundled sample
    data.npz / data.pt / data.safetensors   key "inputs" and optional key "labels"
    path/to/file.py:function      `function()` returns (or yields) batches

Trust model: .py files and .pt2 programs run code by design (the user named them). Weight and data
files are data, so they are read without unpickling arbitrary objects (`weights_only=True`,
`allow_pickle=False`): a downloaded checkpoint must never be able to run code.

Modules: `models` (model specs), `weights` (state dicts), `datasets` (data specs), `user_code`
(importing and calling a user's .py file), `tensor_files` (safe .pt / .safetensors reads),
`compatible` (does the model run on the data), `fingerprint` (which model a map was made for),
`errors` (`LoadError` and its one-line formatting).
"""

from __future__ import annotations

from .compatible import check_compatible
from .datasets import load_data
from .errors import LoadError
from .fingerprint import model_fingerprint

# _call_factory is not public: tests build a factory's model with it, skipping load_model's checks.
from .models import _call_factory, load_model  # noqa: F401

__all__ = ["LoadError", "check_compatible", "load_data", "load_model", "model_fingerprint"]
