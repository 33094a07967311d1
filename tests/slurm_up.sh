#!/usr/bin/env bash
# A one-node Slurm cluster on loopback, for tests/test_slurm.py (recipe: docs/slurm.md of the
# project's shared notes). Needs root; installs slurm-wlm and munge with apt-get if missing.
#
#   tests/slurm_up.sh start DIR [CTLD_PORT SLURMD_PORT]   config, state and logs in DIR
#   tests/slurm_up.sh stop DIR                            stops what `start` started, by pid
#
# Slurm's config lives in DIR/slurm.conf (clients find it through SLURM_CONF=DIR/slurm.conf),
# so nothing under /etc/slurm changes; munge keeps its default key and socket.
set -euo pipefail

cmd=${1:?usage: slurm_up.sh start|stop DIR}
dir=${2:?usage: slurm_up.sh start|stop DIR}

stop() {
  for name in slurmd slurmctld munged; do
    f="$dir/$name.pid"
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "unknown command $cmd" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "slurm_up.sh: needs root (it starts slurmctld, slurmd, munged)" >&2; exit 1; }

ctld_port=${3:-6817}
slurmd_port=${4:-6818}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "slurm_up.sh: no slurmctld/munged and no apt-get" >&2; exit 1; }
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) \
    >"$dir/apt.log" 2>&1 || { echo "slurm_up.sh: apt-get install failed, see $dir/apt.log" >&2; exit 1; }
fi

# munge: a key, its folders, and a running munged (reused if one already answers)
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  install -d -m 700 -o munge -g munge /etc/munge
  install -d -m 755 -o munge -g munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  munged --force
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$dir/munged.pid"
  (munge -n | unmunge) >/dev/null || { echo "slurm_up.sh: munge does not work" >&2; exit 1; }
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mib=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
cat >"$dir/slurm.conf" <<EOF
ClusterName=calibjob-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.daemon.pid
SlurmdPidFile=$dir/slurmd.daemon.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

export SLURM_CONF="$dir/slurm.conf"
slurmctld -D -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 &
echo $! >"$dir/slurmctld.pid"
slurmd -D -f "$SLURM_CONF" >"$dir/log/slurmd.out" 2>&1 &
echo $! >"$dir/slurmd.pid"

for _ in $(seq 120); do
  if sinfo -h -o %T 2>/dev/null | grep -qx idle; then echo "slurm up: $SLURM_CONF"; exit 0; fi
  sleep 0.5
done
echo "slurm_up.sh: the node did not become idle in 60 s; sinfo says: $(sinfo 2>&1 | tail -2)" >&2
tail -5 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
stop
exit 1
