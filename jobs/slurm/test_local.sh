#!/usr/bin/env bash
# The batch scripts on a real one-node Slurm (jobs/slurm/local_cluster.sh): cpu-test.sbatch must pass, and the
# training chain of gpu-train.sbatch (run on CPUs) must stop at a checkpoint on the warning signal, requeue
# itself, resume, and after two requeues end with the same model and optimizer state, bit for bit, as an
# uninterrupted run of the same steps.
#
#   bash jobs/slurm/test_local.sh BUILD_DIR     (q3vl, q3vl-pack, q3vl_parallel_tests, q3vl_compare_runs built)
#
# The warning is what slurmctld sends at `--signal=B:USR1@N` before the time limit: USR1 to the batch shell only.
# Slurm checks time limits every 30 s and a job's time limit is in minutes, so to keep the test short and its
# windows independent of the machine's speed the test sends that same signal itself with
# `scancel --batch --signal=USR1` once a start has trained a step; the chain is also submitted with
# --time=00:02:00 --signal=B:USR1@50, so a start that runs long gets Slurm's own warning.
#
# Environment: Q3VL_CTEST_REGEX and Q3VL_TRAIN_STEPS (cpu-test.sbatch's CTest cases, default the Comm suite's,
# and its training steps, default 6), Q3VL_SLURM_DIR (the cluster's state folder). A cluster that was already
# running is used and left running; one started here is stopped at the end. Prints PASS, or FAIL with the logs
# and a non-zero exit status.
set -euo pipefail

(($# == 1)) || { echo "usage: bash jobs/slurm/test_local.sh BUILD_DIR" >&2; exit 2; }
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "$1" && pwd)
for exe in app/q3vl app/q3vl-pack tests/q3vl_parallel_tests tests/q3vl_compare_runs; do
  [[ -x "$build/$exe" ]] || { echo "test_local: $build/$exe is missing; build it first" >&2; exit 2; }
done
work=$build/slurm-local
cluster=(bash "$root/jobs/slurm/local_cluster.sh")
export SLURM_CONF=${Q3VL_SLURM_DIR:-/tmp/q3vl-slurm}/slurm.conf
# Enough steps that the second start is still training when its warning arrives, on a fast machine too.
steps=16

started_here=0
logs=()
finish() {
  local rc=$?
  if ((rc != 0)); then
    local f
    for f in "${logs[@]}" "$(dirname "$SLURM_CONF")/log/slurmctld.log" "$(dirname "$SLURM_CONF")/log/slurmd.log"; do
      [[ -f "$f" ]] && { echo "---- last lines of $f"; tail -n 40 "$f"; }
    done
    echo "test_local: FAIL"
  fi
  if ((started_here)); then "${cluster[@]}" stop || true; fi
  exit "$rc"
}
trap finish EXIT
fail() { echo "test_local: $*" >&2; exit 1; }

# Field $2 of `scontrol show job $1` (JobState, ExitCode, Restarts, ...).
job_field() { scontrol -o show job "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }

# Waits up to $2 seconds for job $1 to end; fails unless it ended COMPLETED with exit code 0:0.
wait_job_done() {
  local job=$1 limit=$2 state='' t
  for ((t = 0; t < limit; t += 2)); do
    state=$(job_field "$job" JobState)
    case "$state" in
      COMPLETED) [[ $(job_field "$job" ExitCode) == 0:0 ]] && return 0; break ;;
      FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED) break ;;
    esac
    sleep 2
  done
  fail "job $job is $state (exit code $(job_field "$job" ExitCode)) after ${t} s, expected COMPLETED with 0:0"
}

# Waits up to $3 seconds for file $1 to hold $2 or more lines matching the extended regex $4.
wait_for_lines() {
  local file=$1 count=$2 limit=$3 regex=$4 t n
  for ((t = 0; t < 2 * limit; ++t)); do
    n=$(grep -cE "$regex" "$file" 2>/dev/null) || true
    ((${n:-0} >= count)) && return 0
    sleep 0.5
  done
  fail "after ${limit} s $file has fewer than $count lines matching '$regex'"
}

if ! "${cluster[@]}" status > /dev/null 2>&1; then
  started_here=1
  "${cluster[@]}" start
fi
cpus=$(sinfo -h -N -o '%c' | head -n 1)
((cpus >= 2)) || fail "the node has $cpus CPU; the test runs 2 ranks"
rm -rf "$work"
mkdir -p "$work"

echo "== cpu-test.sbatch on 2 ranks"
logs+=("$work/cpu-test.out")
# Its MPI CTest cases, dp_mpi_* the longest, ran in the Release pass already; here the Comm cases show that
# mpiexec works inside an allocation, and 6 training steps (4, then resumed to 6) keep the job short.
job=$(cd "$root" && Q3VL_CTEST_REGEX=${Q3VL_CTEST_REGEX-^parallel_(comm_[0-9]ranks|abort_all)$} \
  Q3VL_TRAIN_STEPS=${Q3VL_TRAIN_STEPS:-6} sbatch --parsable --ntasks=2 --cpus-per-task=1 \
  --output="$work/cpu-test.out" --export="ALL,Q3VL_ROOT=$root,Q3VL_BUILD=$build" jobs/slurm/cpu-test.sbatch)
wait_job_done "$job" 420
grep -q "cpu-test: all passed" "$work/cpu-test.out" || fail "cpu-test job $job did not print 'cpu-test: all passed'"
echo "cpu-test job $job passed"

echo "== training chain: gpu-train.sbatch on 2 CPU ranks, $steps steps, stopped and requeued twice"
"$build/app/q3vl" pack --input "$root/tests/shared/data/cc12m-32/captions.jsonl" \
  --tokenizer "$root/tests/shared/assets/qwen3-tokenizer/tokenizer.json" --out "$work/packed" --max-len 160 \
  --min-pixels 4096 --max-pixels 4096 --quiet
# The same command for the chain and the uninterrupted reference; only the output folder differs.
submit_train() {
  local name=$1
  shift
  (cd "$root" && sbatch --parsable --job-name="q3vl-$name" --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 \
    --gpus-per-node=0 --output="$work/$name.out" --export="ALL,Q3VL_ROOT=$root,Q3VL=$build/app/q3vl" "$@" \
    jobs/slurm/gpu-train.sbatch tests/app/dp_equivalence.yaml --set "data.dir=$work/packed" \
    --set "output_dir=$work/$name" --set data.sequences_per_batch=1 --set parallel.dp=2 \
    --set "train.steps=$steps" --set checkpoint.resume=auto --set logging.expert_health_every=0)
}
logs+=("$work/chain.out")
job=$(submit_train chain --time=00:02:00 --signal=B:USR1@50)
# Progress lines start with the wall-clock time ("2026-12-04 20:29:19 step 4/16 | ...").
step_line='^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:]{8} step [0-9]+/'
for start in 1 2; do
  # Once this start has trained a step of its own (a step line more than when it began) it gets the warning.
  wait_for_lines "$work/chain.out" 1 180 "^gpu-train: job $job start $start "
  before=$(grep -cE "$step_line" "$work/chain.out" || true)
  wait_for_lines "$work/chain.out" $((before + 1)) 180 "$step_line"
  echo "start $start trained a step; sending the warning (USR1 to the batch shell)"
  scancel --batch --signal=USR1 "$job"
  wait_for_lines "$work/chain.out" "$start" 120 "^gpu-train: stopped early after a checkpoint; requeueing job $job"
done
wait_job_done "$job" 300
restarts=$(job_field "$job" Restarts)
echo "chain job $job: $restarts restarts"
((restarts >= 2)) || fail "job $job was restarted $restarts times, expected at least 2"
(($(grep -c "stop requested: saved step" "$work/chain.out") >= 2)) || fail "q3vl did not report two signalled stops"
grep -q "^gpu-train: training finished" "$work/chain.out" || fail "the chain's last start did not finish training"

logs+=("$work/reference.out")
job=$(submit_train reference --time=00:10:00)
wait_job_done "$job" 300
grep -q "^gpu-train: training finished" "$work/reference.out" || fail "the reference run did not finish training"
(($(grep -c "^gpu-train: job $job start" "$work/reference.out") == 1)) || fail "the reference run was interrupted"

echo "== chain against the uninterrupted run"
final=checkpoints/step-$(printf '%08d' "$steps")
for f in model/model.safetensors optimizer.safetensors trainer_state.json; do
  cmp "$work/chain/$final/$f" "$work/reference/$final/$f" || fail "$final/$f differs from the uninterrupted run's"
  echo "$final/$f: identical"
done
# Every step's loss too (the chain's metrics.jsonl holds the steps of all its starts).
"$build/tests/q3vl_compare_runs" "$work/reference" "$work/chain" --rtol 0
echo "test_local: PASS"
