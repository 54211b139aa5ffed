#!/usr/bin/env bash
# The GPU check, run on a GPU node from binaries built elsewhere by jobs/gpu/build.sh (nothing is built here):
# every `gpu` test with a GPU required (a skip fails), the same tests under compute-sanitizer's memcheck
# (out-of-bounds and misaligned accesses, small shapes), then the per-layer benchmarks; full logs go to
# LOG_DIR, and one table is printed last. Exit status: non-zero when a test fails.
# Usage: jobs/gpu/check.sh [--no-bench] [BUILD_DIR] [LOG_DIR]
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bench=1
if [ "${1:-}" = "--no-bench" ]; then
  bench=0
  shift
fi
dir=${1:-$root/build-gpu}
logs=${2:-${OUT:-$root/build-gpu-logs}}
mkdir -p "$logs"
bin="$dir/tests/cuda"
export Q3VL_REQUIRE_GPU=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$logs/gpu.txt"

echo "== gpu tests"
"$bin/q3vl_cuda_tests" --gtest_output="xml:$logs/tests.xml" > "$logs/tests.log" 2>&1
tests_rc=$?
grep -E '^\[  (FAILED|  OK|SKIPPED) ' "$logs/tests.log" | grep -v '  OK ' | head -40
tail -3 "$logs/tests.log"

sanitizer_rc=0
if command -v compute-sanitizer > /dev/null; then
  echo "== gpu tests under compute-sanitizer memcheck"
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 "$bin/q3vl_cuda_tests" \
    > "$logs/memcheck.log" 2>&1
  sanitizer_rc=$?
  grep -E 'ERROR SUMMARY|Invalid|FAILED' "$logs/memcheck.log" | head -20
fi

bench_rc=0
if ((bench)); then
  echo "== benchmarks"
  "$bin/q3vl_cuda_bench" --benchmark_out="$logs/bench.json" --benchmark_out_format=json > "$logs/bench.log" 2>&1
  bench_rc=$?
  tail -5 "$logs/bench.log"
fi

python3 "$root/jobs/gpu/bench_table.py" "$logs/tests.xml" "$logs/bench.json"
echo "tests rc=$tests_rc memcheck rc=$sanitizer_rc bench rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$sanitizer_rc" -eq 0 ]
