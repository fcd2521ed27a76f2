"""Test set-up shared by every test module.

PyPI's torchvision wheels are CUDA builds: beside the CPU torch this project installs, a bare
`import torchvision` fails, and so does transformers (it imports torchvision when it is installed).
quantlens' own loaders apply `analysis.compat.import_torchvision()` before running a user's code;
tests import transformers and torchvision directly, so the same guard runs here first.
"""

import importlib.util

if importlib.util.find_spec("torchvision") is not None:
    from analysis.compat import import_torchvision

    import_torchvision()
