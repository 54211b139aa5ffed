#!/usr/bin/env bash
# Regenerates tests/golden/pack_reference/reference.json: builds a virtual environment with the pinned transformers +
# tokenizers + Pillow + PyAV + Jinja2 stack from PyPI (no torch), then runs generate.py on tests/shared/data.
# Usage: tests/golden/pack_reference/generate.sh [VENV_DIR]
#   (default VENV_DIR: build/pack-reference-venv in the repository root)
set -euo pipefail

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd -- "$here/../../.." && pwd)"
venv="${1:-$root/build/pack-reference-venv}"

if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$here/requirements.txt"
exec "$venv/bin/python" "$here/generate.py" --out "$here" --data "$root/tests/shared/data" \
  --tokenizer "$root/tests/shared/assets/qwen3-tokenizer/tokenizer.json"
