#!/usr/bin/env bash
# Checks q3vl's Hugging Face export against transformers (check_export.py): pack, train tiny-moe a few steps with
# an f32 export, convert to bf16 and f16, then from_pretrained, files, config and logits of each export; then the
# same for two square-expert variants of tiny-moe, which must be exported in transformers' layout.
# Usage: tests/golden/check_export.sh [--keep] [--work DIR] [--samples N] [--steps N]
# Environment: VENV (default build/golden-venv, made by tests/golden/generate.sh), Q3VL (default build/app/q3vl).
set -euo pipefail

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd -- "$here/../.." && pwd)"
venv="${VENV:-$root/build/golden-venv}"
q3vl="${Q3VL:-$root/build/app/q3vl}"

fail() { echo "check_export: $*" >&2; exit 1; }
[[ -x "$venv/bin/python" ]] || fail "no Python venv at $venv (tests/golden/generate.sh makes it)"
[[ -x "$q3vl" ]] || fail "no q3vl executable at $q3vl (build it with jobs/build.sh, or set Q3VL)"
exec "$venv/bin/python" "$here/check_export.py" --q3vl "$q3vl" "$@"
