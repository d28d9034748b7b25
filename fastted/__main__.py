"""``python -m fastted``: the ``fastted`` command."""
import sys

from fastted.cli import main

sys.exit(main())
