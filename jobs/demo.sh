#!/usr/bin/env bash
# The main job for a new user: installs what is missing, builds, packs the demo data shipped in tests/shared
# (32 CC12M image captions, LLaMA-Factory's multi-turn image and video demo) with the real Qwen3 tokenizer,
# and trains a tiny Qwen3-VL-MoE on it on the CPU (jobs/configs/demo.yaml), printing progress as the loss falls.
# Run it again and it resumes from its last checkpoint (build/demo/run); `rm -rf build/demo` starts over.
# Extra arguments go to `q3vl train` (e.g. --set train.steps=300).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/jobs/setup.sh"
bash "$root/jobs/build.sh" "$root/build"
q3vl="$root/build/app/q3vl"
data="$root/tests/shared/data"
if [[ ! -f "$root/build/demo/packed/manifest.json" ]]; then
  # Small images and videos keep the demo to a few minutes on two cores.
  "$q3vl" pack --input "$data/cc12m-32/captions.jsonl" --input "$data/mllm-demo/mllm_demo.json" \
    --input "$data/mllm-demo/mllm_video_demo.json" --tokenizer "$root/tests/shared/assets/qwen3-tokenizer/tokenizer.json" \
    --out "$root/build/demo/packed" --max-len 1024 --min-pixels 4096 --max-pixels 16384 --fps 1 \
    --video-max-pixels 131072
fi
"$q3vl" train "$root/jobs/configs/demo.yaml" "$@"
