#!/usr/bin/env bash
# Builds the GPU check's binaries on a CPU machine with the CUDA toolkit (as on a cluster's login node):
# q3vl_cuda_tests and q3vl_cuda_bench into BUILD_DIR (default build-gpu/), for sm_90a, with a portable host
# instruction set (the GPU node's CPU is not this one), stripped so that they travel small.
# Usage: jobs/gpu/build.sh [BUILD_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${1:-$root/build-gpu}
cmake -S "$root" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DQ3VL_CUDA=ON -DQ3VL_SIMD=AVX2 -DQ3VL_BENCHMARKS=ON \
  > "$dir.configure.log" 2>&1 || { cat "$dir.configure.log"; exit 1; }
cmake --build "$dir" -j "$(nproc)" --target q3vl_cuda_tests q3vl_cuda_bench
strip "$dir/tests/cuda/q3vl_cuda_tests" "$dir/tests/cuda/q3vl_cuda_bench"
ls -la "$dir/tests/cuda/q3vl_cuda_tests" "$dir/tests/cuda/q3vl_cuda_bench"
