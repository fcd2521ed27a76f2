"""`python -m analysis.cli ...`: the `quantlens` console script, for when it is not installed
(the Makefile and the tests run the CLI this way, as a process of its own)."""

import sys

from analysis.cli import entry

sys.exit(entry())
