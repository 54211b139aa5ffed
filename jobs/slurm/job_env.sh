# shellcheck shell=bash
# Sourced by the batch scripts of jobs/slurm after they have set `root` (the repository): the site hook, then
# the OpenMP settings of the ranks (jobs/slurm/README.md, "Site setup").
#
# Site hook: the file Q3VL_SITE_ENV names (it must exist), else jobs/slurm/site.sh when there is one (git ignores
# it), is sourced in the batch shell before anything runs: `module load` lines, a conda or spack environment,
# exports such as Q3VL_MPI. The ranks inherit its environment through srun.

# shellcheck disable=SC2154  # root is the including script's
site_env=
if [[ -n "${Q3VL_SITE_ENV:-}" ]]; then
  [[ -f "$Q3VL_SITE_ENV" ]] || { echo "q3vl job: Q3VL_SITE_ENV=$Q3VL_SITE_ENV is not a file" >&2; exit 2; }
  site_env=$Q3VL_SITE_ENV
elif [[ -f "$root/jobs/slurm/site.sh" ]]; then
  site_env=$root/jobs/slurm/site.sh
fi
if [[ -n "$site_env" ]]; then
  echo "q3vl job: sourcing the site environment $site_env"
  # Module systems' scripts read unset variables and return non-zero statuses; the job's strict mode resumes after.
  set +eu
  # shellcheck source=/dev/null
  source "$site_env"
  site_rc=$?
  set -eu
  ((site_rc == 0)) || { echo "q3vl job: $site_env returned status $site_rc" >&2; exit 2; }
fi

# Each rank runs --cpus-per-task OpenMP threads, one per core of its own CPU set (srun binds every task to its
# CPUs), kept next to each other; a user's or the site's choice wins.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export OMP_PROC_BIND=${OMP_PROC_BIND:-close}
export OMP_PLACES=${OMP_PLACES:-cores}
echo "q3vl job: OMP_NUM_THREADS=$OMP_NUM_THREADS OMP_PROC_BIND=$OMP_PROC_BIND OMP_PLACES=$OMP_PLACES"
