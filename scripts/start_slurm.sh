#!/usr/bin/env bash
# A one-node Slurm on this machine, for the launcher=slurm tests (and for trying the launcher out).
#
#   bash scripts/start_slurm.sh      installs slurm-wlm and munge when missing (Debian, as root),
#                                    writes /etc/slurm/slurm.conf for this machine, starts munged,
#                                    slurmctld and slurmd, and waits until the node is idle
#   bash scripts/stop_slurm.sh       stops them again
#
# Idempotent: a healthy running cluster is left as it is; a node left down or drained is resumed.
# Exits 0 when `sinfo` shows the node idle, 1 (with the daemons' logs) when it does not come up.
set -euo pipefail

log() { echo "start_slurm: $*"; }
SECONDS=0
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm

if [ "$(id -u)" != 0 ]; then
  echo "start_slurm: needs root (it installs packages and starts daemons)" >&2
  exit 2
fi

# The node's state as sinfo prints it: a trailing '*' means slurmd is not responding, so 'idle*'
# (seen right after slurmctld starts, before slurmd registers) is not up yet.
node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n 1; }
# Up: idle, or busy with jobs (a re-run while tests run must not wait for them to end)
node_up() { case "$1" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac; }

if pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && node_up "$(node_state)"; then
  log "already running, node $(node_state) (${SECONDS} s)"
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: a key, and the daemon
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
chmod 0700 /etc/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  pkill -x munged 2>/dev/null || true
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force
  else
    /usr/sbin/munged --force
  fi
fi

# slurm.conf for this machine: its name, cores and memory as slurmd sees them
HOST=$(hostname -s)
NODE_LINE=$(slurmd -C | head -n 1 | sed -E 's/ UpTime=.*//')
REAL_MEMORY=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$NODE_LINE")
NODE_LINE=$(sed -E "s/RealMemory=[0-9]+/RealMemory=$(( REAL_MEMORY * 9 / 10 ))/" <<<"$NODE_LINE")
mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS"
cat >"$CONF.new" <<CONF
# Written by normlab's scripts/start_slurm.sh: a one-node cluster for tests.
ClusterName=normlab
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
JobRequeue=1
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MessageTimeout=10
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
$NODE_LINE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
changed=1
if [ -f "$CONF" ] && cmp -s "$CONF" "$CONF.new"; then changed=0; fi
mv "$CONF.new" "$CONF"

if [ "$changed" = 1 ]; then
  # a new configuration: restart both, after the old ones have exited (a dying slurmctld still
  # holds its port and would make the new one fail)
  pkill -x slurmctld 2>/dev/null || true
  pkill -x slurmd 2>/dev/null || true
  for _ in $(seq 1 30); do
    pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break
    sleep 1
  done
fi
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd

for _ in $(seq 1 90); do
  state=$(node_state || true)
  if node_up "$state"; then
    log "node $HOST $state (${SECONDS} s)"
    exit 0
  fi
  case "$state" in
    # left down or drained by an earlier run (a killed slurmd, a failed job's node)
    down* | drain* | fail*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done

echo "start_slurm: the node did not become idle in 90 s (state: ${state:-none})" >&2
sinfo -N -l >&2 || true
tail -n 30 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
exit 1
