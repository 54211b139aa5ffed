#!/usr/bin/env bash
# Regenerates the media reference under tests/io/media_reference/: builds a virtual environment with the pinned
# transformers + Pillow + PyAV stack from PyPI (no torch), then runs generate.py.
# Usage: tests/io/media_reference/generate.sh [VENV_DIR]   (default: build/media-venv in the repository root)
set -euo pipefail

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd -- "$here/../../.." && pwd)"
venv="${1:-$root/build/media-venv}"

if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$here/requirements.txt"
exec "$venv/bin/python" "$here/generate.py" --out "$here" --data "$root/../shared/data"
