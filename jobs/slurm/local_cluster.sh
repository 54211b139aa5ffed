#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing the batch scripts with the real sbatch/srun/scontrol
# (jobs/slurm/README.md, "A Slurm cluster on one machine"):
#
#   bash jobs/slurm/local_cluster.sh start|stop|status
#   export SLURM_CONF=${Q3VL_SLURM_DIR:-/tmp/q3vl-slurm}/slurm.conf    # then sbatch, srun, squeue use it
#
# `start` installs Debian's slurmd, slurmctld, slurm-client and munge when they are missing (apt-get, as root or
# through sudo), writes everything into one state folder, Q3VL_SLURM_DIR (default /tmp/q3vl-slurm): slurm.conf
# for this host with the CPUs and memory `slurmd -C` reports, a munge key, spool folders and logs. It starts
# munged, slurmctld and slurmd there as the calling user and waits until the node is idle. Nothing under
# /etc/slurm or /etc/munge is read or changed, and the ports (Q3VL_SLURM_PORT and the next one, default
# 6917-6918) are not the standard 6817-6818, so a real Slurm on the machine is left alone. The settings work
# without cgroups and without systemd (containers): process tracking by /proc, no task plugin. Requeueing is
# allowed, and a requeued job may start again 5 s after its requeue (cred_expire; Slurm's default is 120 s).
# `stop` cancels the cluster's jobs and ends the three daemons; `status` prints sinfo and squeue.
set -euo pipefail

dir=${Q3VL_SLURM_DIR:-/tmp/q3vl-slurm}
port=${Q3VL_SLURM_PORT:-6917}
conf=$dir/slurm.conf
export SLURM_CONF=$conf
node=$(hostname -s)
user=$(id -un)

die() { echo "local_cluster: $*" >&2; exit 1; }

# Prints the pid in pid file $1 when that process is alive.
live_pid() {
  local pid
  [[ -f "$1" ]] || return 1
  pid=$(<"$1")
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

install_packages() {
  local missing=() p
  for p in slurmd slurmctld slurm-client munge; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  command -v apt-get > /dev/null || die "Slurm is not installed and there is no apt-get: install slurmd, slurmctld," \
    "the Slurm client commands and munge with this system's package manager"
  echo "local_cluster: installing ${missing[*]}"
  local sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  # The packages' own service start is refused without systemd, which is fine: the daemons run from here.
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

write_config() {
  local hw
  # "NodeName=x CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=..".
  hw=$(slurmd -C | head -n 1)
  [[ $hw == NodeName=*CPUs=*RealMemory=* ]] || die "unexpected output of slurmd -C: $hw"
  hw=${hw#NodeName=* }
  cat > "$conf" <<EOF
# One-node test cluster written by jobs/slurm/local_cluster.sh; SLURM_CONF points here.
ClusterName=q3vl-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/slurmd
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups (containers, machines without a writable cgroup tree): processes tracked through /proc, tasks
# bound to their CPUs with sched_setaffinity.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
# Every CPU (hardware thread) is a schedulable unit; memory is not tracked.
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# A requeued job is tried again within seconds, not at the next minute's scheduling pass.
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
NodeName=$node NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  # munged requires its socket's folders to be searchable by everyone (clients of any user connect to it).
  mkdir -p "$dir/munge"
  chmod 755 "$dir/munge"
  if [[ ! -f "$dir/munge/munge.key" ]]; then
    (umask 077 && head -c 1024 /dev/urandom > "$dir/munge/munge.key")
  fi
  chmod 400 "$dir/munge/munge.key"
  munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
    --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" ||
    die "munged did not start; its log: $(tail -n 5 "$dir/munge/munged.log" 2>/dev/null)"
}

wait_for_idle() {
  local state='' i
  for ((i = 0; i < 60; ++i)); do
    state=$(sinfo -h -N -n "$node" -o '%T' 2>/dev/null || true)
    [[ $state == idle ]] && return 0
    sleep 1
  done
  echo "local_cluster: node $node is '${state:-unreachable}' after 60 s, not idle" >&2
  tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  return 1
}

start() {
  if live_pid "$dir/slurmctld.pid" > /dev/null; then
    echo "local_cluster: already running in $dir"
    wait_for_idle
    return
  fi
  install_packages
  # A fresh state each start: no job of an earlier cluster comes back.
  rm -rf "$dir/ctld" "$dir/slurmd" "$dir/log"
  mkdir -p "$dir/ctld" "$dir/slurmd" "$dir/log"
  chmod 755 "$dir"
  write_config
  live_pid "$dir/munge/munged.pid" > /dev/null || start_munge
  slurmctld -f "$conf" || die "slurmctld did not start: $(tail -n 20 "$dir/log/slurmctld.log" 2>/dev/null)"
  slurmd -f "$conf" -N "$node" || die "slurmd did not start: $(tail -n 20 "$dir/log/slurmd.log" 2>/dev/null)"
  wait_for_idle
  echo "local_cluster: node $node idle ($(sinfo -h -N -o '%c CPUs, %m MB')); export SLURM_CONF=$conf"
}

# Sends TERM to the daemon of pid file $1 and waits up to 20 s for it to end.
stop_daemon() {
  local pid i
  pid=$(live_pid "$1") || return 0
  kill "$pid"
  for ((i = 0; i < 40; ++i)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  echo "local_cluster: $1 ($pid) still running after 20 s; sending KILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
}

stop() {
  if live_pid "$dir/slurmctld.pid" > /dev/null; then
    local jobs i
    jobs=$(squeue -h -o '%i' 2>/dev/null || true)
    if [[ -n "$jobs" ]]; then
      # shellcheck disable=SC2086  # one job id per word
      scancel $jobs || true
      for ((i = 0; i < 30; ++i)); do
        [[ -z "$(squeue -h -o '%i' 2>/dev/null || true)" ]] && break
        sleep 1
      done
    fi
  fi
  stop_daemon "$dir/slurmd.pid"
  stop_daemon "$dir/slurmctld.pid"
  stop_daemon "$dir/munge/munged.pid"
  echo "local_cluster: stopped ($dir kept: logs in $dir/log)"
}

status() {
  local name pid
  for name in munge/munged slurmctld slurmd; do
    if pid=$(live_pid "$dir/$name.pid"); then echo "${name#*/}: running ($pid)"; else echo "${name#*/}: not running"; fi
  done
  live_pid "$dir/slurmctld.pid" > /dev/null || return 1
  sinfo
  squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status   (state in \$Q3VL_SLURM_DIR, default /tmp/q3vl-slurm)" >&2; exit 2 ;;
esac
