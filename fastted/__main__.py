"""``python -m fastted``: the ``fastted`` command."""

import sys

from fastted.train.cli import command

sys.exit(command())
