"""What the standalone benchmark scripts (scale_memory.py, checkpoint_hashing.py) put in their result files: the
versions they ran on, and the file itself."""

from __future__ import annotations

import json
import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def versions(*packages: str) -> dict:
    """Python's version, this clone's short commit (None outside a git checkout) and each package's version."""
    from importlib.metadata import version

    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "python": platform.python_version(),
        "fastted_commit": commit.stdout.strip() or None,
        **{name: version(name) for name in packages},
    }


def write(path: str, result: dict) -> None:
    """``result`` as indented JSON at ``path`` (its folder made)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
