#!/usr/bin/env bash
# Creates a new, empty virtual environment at $1 (removing what was there) and prints its python. The
# Makefile's install stamp of that environment goes too, so `make ... PYTHON=<it>` installs into it anew.
#   FASTTED_BASE_PYTHON   the interpreter to create it with (default python3)
set -euo pipefail
dir="$1"
rm -rf "$dir"
"${FASTTED_BASE_PYTHON:-python3}" -m venv "$dir"
python="$(cd "$dir" && pwd)/bin/python"
stamp=$("$python" -c "import sys; print(sys.prefix.replace('/', '_'))")
rm -f "$(dirname "$0")/../.make/installed-$stamp"
echo "$python"
