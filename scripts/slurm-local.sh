#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the `--launcher slurm` tests and for trying a sweep
# without a real cluster. Debian packages (slurmctld, slurmd, slurm-client, munge); run as root.
#
#   scripts/slurm-local.sh install   apt-get the packages if sbatch is missing
#   scripts/slurm-local.sh start     write the configs, start munged, slurmctld, slurmd; wait idle
#   scripts/slurm-local.sh stop      stop the daemons this script started
#
# The configuration is the smallest that runs jobs in a container without systemd or a writable
# cgroup tree: process tracking by /proc (proctrack/linuxproc), no task binding (task/none), no
# accounting database (so no sacct: job states come from squeue while Slurm remembers the job).
set -euo pipefail

state=/run/sequel-slurm
conf=/etc/slurm/slurm.conf

install() {
  if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
     && command -v munged >/dev/null; then
    return
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  # Slurm refuses a node that reports less memory than configured: leave headroom.
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$state"
  cat >"$conf" <<EOF
# Written by scripts/slurm-local.sh: a one-node cluster on $host.
ClusterName=sequel-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# A cancelled task's processes get SIGTERM, then SIGKILL this many seconds later.
KillWait=5
# Finished jobs stay visible to squeue this long (there is no accounting database).
MinJobAge=600
# A requeued job waits this long before it may start again: the previous run's credential must
# expire first (a start forced earlier is killed with "Job credential revoked"). 120 s by
# default; 10 s keeps the requeue test short.
AuthInfo=cred_expire=10
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  # Slurm 22.05 reads cgroup.conf even with cgroups unused; an empty one stops a warning.
  [ -f /etc/slurm/cgroup.conf ] || echo "CgroupPlugin=autodetect" >/etc/slurm/cgroup.conf
}

start() {
  install
  write_conf
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  # munge -n asks the daemon for a credential: only a live munged answers (a pgrep would also
  # match a zombie left by an earlier stop).
  if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
  fi
  # Clean state: jobs of an earlier session must not come back.
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
  /usr/sbin/slurmctld -i
  /usr/sbin/slurmd
  local i
  for i in $(seq 1 60); do
    if sinfo -h -o '%t' 2>/dev/null | grep -qx idle; then
      echo "slurm-local: node $(hostname -s) idle ($(nproc) CPUs)"
      return
    fi
    sleep 1
  done
  echo "slurm-local: the node did not become idle in 60 s; sinfo says:" >&2
  sinfo -N -l >&2 || true
  tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  exit 1
}

# Signal the daemon whose pid is in $1 and wait (up to 10 s) for it to exit.
stop_pid() {
  local pid i
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    # A daemon whose parent never reaps it stays a zombie: gone for our purposes.
    if ! kill -0 "$pid" 2>/dev/null || grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; then
      break
    fi
    sleep 0.2
  done
  rm -f "$1"
}

stop() {
  stop_pid "$state/slurmd.pid"
  stop_pid "$state/slurmctld.pid"
  stop_pid /run/munge/munged.pid
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
