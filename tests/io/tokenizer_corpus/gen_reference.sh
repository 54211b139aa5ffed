#!/usr/bin/env bash
# Regenerates the tokenizer reference (reference.json and the two tiny tokenizers) with the Hugging Face
# `tokenizers` package at the pinned version, installed from PyPI into a throwaway virtual environment.
# Usage: tests/io/tokenizer_corpus/gen_reference.sh [QWEN3_TOKENIZER_JSON]
# (default: the shared Qwen3 asset, ../shared/assets/qwen3-tokenizer/tokenizer.json beside the repo).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
qwen=${1:-$root/../shared/assets/qwen3-tokenizer/tokenizer.json}
venv=${Q3VL_TOKREF_VENV:-${TMPDIR:-/tmp}/q3vl-tokref-venv}
pinned=0.22.1

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "$("$venv/bin/python" -c 'import tokenizers; print(tokenizers.__version__)' 2>/dev/null)" != "$pinned" ]; then
  "$venv/bin/pip" install --quiet "tokenizers==$pinned"
fi
"$venv/bin/python" "$here/gen_reference.py" --qwen3 "$qwen" --out "$here"
