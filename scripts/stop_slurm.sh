#!/usr/bin/env bash
# Stops the one-node Slurm that scripts/start_slurm.sh started (its jobs are cancelled first) and
# waits until the daemons have exited, so a start right after it starts fresh ones. munged stays
# (other programs may use it).
set -uo pipefail
scancel --user="$(id -un)" 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
pkill -x slurmctld 2>/dev/null || true
for _ in $(seq 1 30); do
  pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || { echo "stop_slurm: stopped"; exit 0; }
  sleep 1
done
echo "stop_slurm: slurmctld/slurmd still running after 30 s" >&2
exit 1
