#!/usr/bin/env bash
# Rewrites a lock (default constraints.txt) from what the environment of $PYTHON holds (run after its tests
# passed there): scripts/lock.sh [FILE]. Its comment lines are kept, with the date and Python restamped.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
out="${1:-constraints.txt}"
python_version=$("$PYTHON" -c 'import platform; print(platform.python_version())')
{
    sed -n '/^#/p' "$out" | sed -E "s/on [0-9]{4}-[0-9]{2}-[0-9]{2}: Python [0-9.]+/on $(date +%Y-%m-%d): Python $python_version/"
    # The CPU build's local label (+cpu) is left out: the constraint then also admits the same release's CUDA build.
    "$PYTHON" -m pip freeze --exclude-editable | grep -v '^fastted' | sed -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$/\1/'
} > "$out.new"
mv "$out.new" "$out"
echo "lock: $out from $("$PYTHON" -c 'import sys; print(sys.prefix)')"
