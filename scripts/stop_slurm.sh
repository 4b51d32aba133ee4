#!/usr/bin/env bash
# Stops the one-node Slurm that scripts/start_slurm.sh started (its jobs are cancelled first).
set -uo pipefail
scancel --user="$(id -un)" 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
pkill -x slurmctld 2>/dev/null || true
echo "stop_slurm: stopped"
