#!/usr/bin/env bash
# The main job for a new user: installs what is missing, builds, and runs q3vl's self-check (a tiny
# Qwen3-VL-MoE-shaped layer stack forward and backward, with timings) until the trainer exists.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/jobs/setup.sh"
bash "$root/jobs/build.sh" "$root/build"
"$root/build/app/q3vl" selfcheck "$@"
