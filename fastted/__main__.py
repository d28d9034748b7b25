"""``python -m fastted``: the ``fastted`` command."""
import sys

from fastted.cli import command

sys.exit(command())
