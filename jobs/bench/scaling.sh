#!/usr/bin/env bash
# Step-time scaling of the CPU benchmark over ranks: bench-moe (jobs/bench/bench-moe.yaml) trained with one
# 2,096-token sequence (7 documents, 7 x 512 x 512 images) per rank and step on 1, 2 and 4 MPI ranks under
# FSDP (weak scaling: the global batch grows with the ranks), plus expert parallelism on 2 and 4 ranks.
# Every layout runs `steps` steps; the median step time after 1 warm-up step and the tokens/s over all ranks
# are printed and written to build/bench/scaling.json.
# This machine has 2 cores: 1 rank uses 2 OpenMP threads, 2 ranks 1 thread each, and 4 ranks share the 2 cores
# (1 thread each, oversubscribed), so beyond 2 ranks the numbers show the cost of the layout, not a speed-up.
# Usage: jobs/bench/scaling.sh [steps]   (Q3VL=path/to/q3vl, default build/app/q3vl)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
q3vl=${Q3VL:-$root/build/app/q3vl}
bench=$root/build/bench
steps=${1:-4}
data=$root/tests/shared/data/cc12m-32
[[ -x "$q3vl" ]] || { echo "scaling.sh: no q3vl binary at $q3vl; build it (bash jobs/build.sh) or set Q3VL" >&2; exit 1; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# 4 copies of the benchmark's sequence: the same 7 samples packed 4 times, one sequence per rank and step.
if [[ ! -f "$bench/packed4/manifest.json" ]]; then
  mkdir -p "$bench"
  python3 "$root/jobs/bench/select_512px.py" "$data/captions.jsonl" "$bench/captions-512px-x4.jsonl" 4
  "$q3vl" pack --input "$bench/captions-512px-x4.jsonl" --tokenizer "$root/tests/shared/assets/qwen3-tokenizer/tokenizer.json" \
    --out "$bench/packed4" --max-len 2096 --quiet
fi

run() {  # name ranks threads parallel-settings...
  local name=$1 ranks=$2 threads=$3
  shift 3
  rm -rf "$bench/scaling/$name"
  local cmd=("$q3vl" train "$root/jobs/bench/bench-moe.yaml" --set data.dir="$bench/packed4" --set train.steps="$steps"
             --set output_dir="$bench/scaling/$name" "$@")
  if [[ $ranks == 1 ]]; then
    OMP_NUM_THREADS=$threads "${cmd[@]}" >/dev/null
  else
    OMP_NUM_THREADS=$threads mpiexec --oversubscribe -n "$ranks" -x OMP_NUM_THREADS "${cmd[@]}" >/dev/null
  fi
}
run ranks1 1 2
run fsdp2 2 1 --set parallel.fsdp=2
run fsdp4 4 1 --set parallel.fsdp=4
run ep2 2 1 --set parallel.ep=2
run ep4 4 1 --set parallel.ep=4

python3 - "$bench/scaling" "$bench/scaling.json" <<'PY'
import json, os, statistics, sys
root, out = sys.argv[1], sys.argv[2]
rows = []
for name, ranks in [("ranks1", 1), ("fsdp2", 2), ("fsdp4", 4), ("ep2", 2), ("ep4", 4)]:
    records = [json.loads(line) for line in open(os.path.join(root, name, "metrics.jsonl"))]
    steps = [r for r in records if r["event"] == "step" and r["step"] > 1]
    memory = [r for r in records if r["event"] == "memory"]
    step_s = statistics.median(r["step_s"] for r in steps)
    rows.append({"layout": name, "ranks": ranks, "step_s": step_s, "tokens_per_step": steps[0]["tokens"],
                 "tokens_per_s": steps[0]["tokens"] / step_s,
                 "tracked_bytes_per_rank": max(m["total_bytes"] for m in memory),
                 "peak_rss_bytes_rank0": max(r["peak_rss_bytes"] for r in steps)})
base = rows[0]["tokens_per_s"]
for r in rows:
    r["tokens_per_s_vs_1_rank"] = r["tokens_per_s"] / base
    print(f"{r['layout']:7s} {r['ranks']} ranks: step {r['step_s']:.2f} s, {r['tokens_per_step']} tokens/step, "
          f"{r['tokens_per_s']:.1f} tokens/s ({r['tokens_per_s_vs_1_rank']:.2f}x 1 rank), "
          f"tracked memory/rank {r['tracked_bytes_per_rank'] / 2**30:.2f} GiB, rank-0 peak RSS {r['peak_rss_bytes_rank0'] / 2**30:.2f} GiB")
json.dump(rows, open(out, "w"), indent=2)
PY
