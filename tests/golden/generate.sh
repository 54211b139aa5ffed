#!/usr/bin/env bash
# Regenerates the Hugging Face golden fixtures under tests/golden/: builds a virtual environment with the pinned
# torch/transformers stack from PyPI, then runs generate.py (fixtures/, hf_param_counts.json, hf_timing.json).
# Usage: tests/golden/generate.sh [VENV_DIR]   (default: build/golden-venv in the repository root)
set -euo pipefail

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd -- "$here/../.." && pwd)"
venv="${1:-$root/build/golden-venv}"

if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

pip_install -r "$here/requirements.txt"

# torch from PyPI is the CUDA build and would pull about 3 GB of CUDA wheels. The fixtures only need the CPU, so
# torch goes in without dependencies; its CUDA libraries then only have to be loadable, not usable. Try the
# lightest setup that imports, in order: the system CUDA alone, plus the few link-only wheels, plus everything.
pip_install --no-deps -r "$here/requirements-torch.txt"
torch_imports() { "$py" -c 'import torch; torch.ones(1)' >/dev/null 2>&1; }
if ! torch_imports; then
  echo "golden: torch does not load with the system CUDA libraries; adding link-only CUDA wheels" >&2
  pip_install --no-deps -r "$here/requirements-torch-cudalibs.txt"
fi
if ! torch_imports; then
  echo "golden: torch still does not load; installing torch with all of its dependencies" >&2
  pip_install -r "$here/requirements-torch.txt"
fi
torch_imports || { echo "golden: cannot import torch from $venv" >&2; exit 1; }

cd "$root"
exec "$py" "$here/generate.py" --out "$here"
