#!/usr/bin/env bash
# The CPU training benchmark: packs the 7 cc12m-32 captions whose images are 512 x 512 into one 2,096-token
# sequence (build/bench/packed, once), trains jobs/bench/bench-moe.yaml on 2 OpenMP threads, and prints the
# median tokens/s, GFLOP/s, MFU and step time over the steps after the 2 warm-up steps, the fastest step
# (the least disturbed on a shared machine), the peak RSS and how much of the 2 cores the run got.
# The summary also goes to build/bench/q3vl_summary.json, which jobs/bench/hf_train_step.py reads for its ratio.
# Usage: jobs/bench/run.sh [--set key=value ...]   (passed to q3vl train; Q3VL=path/to/q3vl, default build/app/q3vl)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
q3vl=${Q3VL:-$root/build/app/q3vl}
bench=$root/build/bench
data=$root/tests/shared/data/cc12m-32
warmup_steps=2
[[ -x "$q3vl" ]] || { echo "run.sh: no q3vl binary at $q3vl; build it (bash jobs/build.sh) or set Q3VL" >&2; exit 1; }

if [[ ! -f "$bench/packed/manifest.json" ]]; then
  mkdir -p "$bench"
  python3 "$root/jobs/bench/select_512px.py" "$data/captions.jsonl" "$bench/captions-512px.jsonl"
  "$q3vl" pack --input "$bench/captions-512px.jsonl" --tokenizer "$root/tests/shared/assets/qwen3-tokenizer/tokenizer.json" \
    --out "$bench/packed" --max-len 2096 --quiet
fi
python3 - "$bench/packed/manifest.json" <<'EOF'
import json, sys
shards = json.load(open(sys.argv[1]))["shards"]
sequences = sum(s["sequences"] for s in shards)
if sequences != 1:
    sys.exit(f"run.sh: {sys.argv[1]} holds {sequences} packed sequences, expected the one every step trains")
EOF

# A fresh output folder: metrics.jsonl is appended to, and the run must start from step 0.
rm -rf "$bench/run" "$bench/q3vl_time.txt"
export OMP_NUM_THREADS=2
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
train=("$q3vl" train "$root/jobs/bench/bench-moe.yaml" "$@")
# GNU time, where installed, gives the CPU time of the whole run: how much of the 2 cores it got on a shared machine.
if [[ -x /usr/bin/time ]]; then /usr/bin/time -o "$bench/q3vl_time.txt" -f '%e %U %S' "${train[@]}"; else "${train[@]}"; fi

python3 - "$bench/run/metrics.jsonl" "$bench/q3vl_summary.json" "$warmup_steps" "$load_before" "$bench/q3vl_time.txt" <<'EOF'
import json, os, statistics, sys
metrics_path, summary_path, warmup, load_before, time_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
records = [json.loads(line) for line in open(metrics_path)]
start = next(r for r in records if r["event"] == "start")
steps = [r for r in records if r["event"] == "step"]
timed = [r for r in steps if r["step"] > warmup]
if not timed:
    sys.exit(f"run.sh: {metrics_path} has no step after the {warmup} warm-up steps")
# Every step trains the same batch, so the rates follow from the median step time and the step's FLOPs.
step_s = statistics.median(r["step_s"] for r in timed)
step_flops = timed[0]["gflops"] * timed[0]["step_s"] * 1e9
peak_gflops = start["peak_gflops"]
summary = {
    "parameters": start["parameters"],
    "tokens_per_step": timed[0]["tokens"],
    "target_tokens_per_step": timed[0]["target_tokens"],
    "warmup_steps": warmup,
    "timed_steps": len(timed),
    "step_s": step_s,
    "step_s_min": min(r["step_s"] for r in timed),
    "tokens_per_s": timed[0]["tokens"] / step_s,
    "gflops": step_flops / step_s / 1e9,
    "mfu": step_flops / step_s / 1e9 / peak_gflops if peak_gflops > 0 else 0.0,
    "peak_gflops": peak_gflops,
    "peak_source": start["peak_source"],
    "step_flops": step_flops,
    "peak_rss_bytes": max(r["peak_rss_bytes"] for r in steps),
    "losses": [r["loss"] for r in steps],
    "omp_threads": 2,
    "load_average_before": [float(v) for v in load_before.split()],
    "load_average_after": list(os.getloadavg()),
}
if os.path.exists(time_path):
    wall, user, system = (float(v) for v in open(time_path).read().split()[-3:])
    summary["cpu_cores_used_whole_run"] = (user + system) / wall
json.dump(summary, open(summary_path, "w"), indent=2)
print(f"q3vl bench-moe, {summary['tokens_per_step']} tokens/step, median of steps {warmup + 1}-{steps[-1]['step']}: "
      f"{summary['tokens_per_s']:.1f} tokens/s, {summary['gflops']:.2f} GFLOP/s (MFU {100 * summary['mfu']:.1f}%), "
      f"step {summary['step_s']:.3f} s (fastest {summary['step_s_min']:.3f} s), peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB -> {summary_path}")
print(f"load average before {load_before}, after {' '.join(f'{v:.2f}' for v in summary['load_average_after'])}"
      + (f"; the run used {summary['cpu_cores_used_whole_run']:.2f} of 2 cores" if "cpu_cores_used_whole_run" in summary else ""))
EOF
