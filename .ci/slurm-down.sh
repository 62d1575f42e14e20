#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by .ci/slurm-up.sh (slurmd, slurmctld, munged),
# each by the pid in its pid file. Idempotent: a daemon that is not running is skipped.
# Leaves the packages, /etc/slurm/slurm.conf and the logs under /var/log/slurm in place.
set -uo pipefail

stop() {  # name pidfile
    local name=$1 pidfile=$2 pid
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        echo "[slurm-down] $name: not running"
        rm -f "$pidfile"
        return 0
    fi
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "[slurm-down] $name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    echo "[slurm-down] $name (pid $pid) stopped"
}

# Jobs still running would be orphaned by slurmd going away: cancel them first.
if command -v scancel >/dev/null 2>&1 && [ -f /run/slurm/slurmctld.pid ]; then
    timeout 10 scancel --user="$(id -un)" >/dev/null 2>&1 || true
fi
stop slurmd /run/slurm/slurmd.pid
stop slurmctld /run/slurm/slurmctld.pid
stop munged /run/munge/munged.pid
