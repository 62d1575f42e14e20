#!/usr/bin/env bash
# Bring up a real one-node SLURM cluster on this machine (for CI and local testing of
# `snakemake --profile profiles/slurm-ci`). Idempotent: safe to run again; it reinstalls
# nothing that is there, rewrites slurm.conf only when it changed, starts only the
# daemons that are not running, and always ends by waiting until the node is idle.
#
#   sudo .ci/slurm-up.sh        # (as root) then: LAMDAGENT_REQUIRE_SLURM=1 pytest -m slurm
#   .ci/slurm-down.sh           # stop the daemons again
#
# What it sets up (Debian 12 / SLURM 22.05, measured: up in ~20 s as root):
#   munge (auth), slurmctld + slurmd on 127.0.0.1, one partition `ci` with this machine
#   as its only node (CPUs and RealMemory taken from the machine, no GPU), no cgroups
#   (proctrack/linuxproc, task/none), no accounting storage (so `sacct` does not work:
#   the CI profile polls with `squeue`, which needs MinJobAge >= 3 x the executor
#   plugin's init_seconds_before_status_checks, see profiles/slurm-ci/config.yaml).
#
# Environment knobs (all optional):
#   SLURM_UP_TIMEOUT   seconds to wait for the node to become idle (default 120)
#   SLURM_PARTITION    partition name (default ci; profiles/slurm-ci/config.yaml names it)
#   SLURM_MIN_JOB_AGE  MinJobAge in seconds (default 300)
set -euo pipefail

TIMEOUT=${SLURM_UP_TIMEOUT:-120}
PARTITION=${SLURM_PARTITION:-ci}
MIN_JOB_AGE=${SLURM_MIN_JOB_AGE:-300}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
RUN_DIR=/run/slurm
T0=$(date +%s)

log() { echo "[slurm-up $(($(date +%s) - T0))s] $*"; }
die() {
    echo "[slurm-up] ERROR: $*" >&2
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        if [ -f "$f" ]; then echo "----- last lines of $f -----" >&2; tail -n 25 "$f" >&2; fi
    done
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages, writes /etc/slurm, starts daemons)"

# --- 1. packages -------------------------------------------------------------------
need_install=0
for bin in slurmctld slurmd sbatch sinfo squeue munged; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need_install=1
done
if [ "$need_install" -eq 1 ]; then
    log "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # apt-get update only when the package lists are missing (fresh containers).
    if ! apt-cache show slurmctld >/dev/null 2>&1; then
        apt-get update -qq >/dev/null || die "apt-get update failed"
    fi
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || die "apt-get install slurmctld slurmd slurm-client munge failed"
fi
export PATH="$PATH:/usr/sbin:/sbin"

# --- 2. host name must resolve to 127.0.0.1 ----------------------------------------------
HOST=$(hostname -s)
if [ "$(getent ahostsv4 "$HOST" 2>/dev/null | awk 'NR==1{print $1}')" != "127.0.0.1" ]; then
    log "making $HOST resolve to 127.0.0.1 (/etc/hosts)"
    # Put the line first (the first match wins); rewrite in place (in containers /etc/hosts is a bind mount).
    hosts_now=$(cat /etc/hosts)
    printf '127.0.0.1 %s\n%s\n' "$HOST" "$hosts_now" >/etc/hosts
fi

# --- 3. slurm.conf -------------------------------------------------------------------
CPUS=$(nproc --all)
MEM_TOTAL_MB=$(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo)
# Leave a little slack: slurmd drains the node if RealMemory exceeds what it measures.
REAL_MEM=$((MEM_TOTAL_MB * 95 / 100))
mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$RUN_DIR"
new_conf=$(mktemp)
cat >"$new_conf" <<EOF
# Written by lamdagent .ci/slurm-up.sh: a one-node CI cluster on 127.0.0.1. Do not edit by hand.
ClusterName=lamdagent-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroups here (containers, CI runners): plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: sacct cannot answer, status is polled with squeue (slurm-status-command: squeue).
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# squeue must still see finished jobs when Snakemake polls: the SLURM executor plugin uses
# squeue only if MinJobAge >= 3 x init_seconds_before_status_checks (else falls back to sacct).
MinJobAge=$MIN_JOB_AGE
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Accept the node as configured even if slurmd measures slightly different hardware.
SlurmdParameters=config_overrides
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
Waittime=0
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
conf_changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    install -m 0644 "$new_conf" "$CONF"
    conf_changed=1
    log "wrote $CONF (node $HOST: CPUs=$CPUS RealMemory=$REAL_MEM, partition $PARTITION)"
fi
rm -f "$new_conf"
# The Debian package's cgroup.conf is not needed (no cgroup plugins are configured).

# --- 4. daemons ------------------------------------------------------------------------
running() { pgrep -x "$1" >/dev/null 2>&1; }
stop() {  # stop a daemon started earlier by this script, by the pid in its pid file
    local name=$1 pidfile=$2 pid
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    if running "$name"; then
        die "a $name not started by this script is running (pid $(pgrep -x "$name" | tr '\n' ' ')); stop it first"
    fi
}

# Under systemd (e.g. a full VM), apt's postinst may have started the units with no config
# yet; stop them and run the daemons ourselves so both environments behave the same.
if [ -d /run/systemd/system ]; then
    systemctl stop slurmd slurmctld munge >/dev/null 2>&1 || true
fi

if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --force >/dev/null
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! running munged || ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    stop munged /run/munge/munged.pid
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged || die "munged did not start"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n | unmunge >/dev/null || die "munge does not work (munge -n | unmunge)"
fi

if [ "$conf_changed" -eq 1 ]; then
    # A new configuration: restart whatever runs with the old one.
    stop slurmd "$RUN_DIR/slurmd.pid"
    stop slurmctld "$RUN_DIR/slurmctld.pid"
fi
if ! running slurmctld; then
    log "starting slurmctld"
    # -c: start from a clean state (no jobs left over from an earlier CI cluster).
    slurmctld -c || die "slurmctld did not start"
fi
if ! running slurmd; then
    log "starting slurmd"
    slurmd || die "slurmd did not start"
fi

# --- 5. wait until the node is idle ----------------------------------------------------
deadline=$((T0 + TIMEOUT))
state=""
while :; do
    state=$(sinfo -h -n "$HOST" -p "$PARTITION" -o '%T' 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle | mixed | allocated) break ;;
        down* | drain* | drained* | fail*)
            # e.g. after a restart ("Node unexpectedly rebooted"): put it back in service.
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        sinfo -N -l >&2 2>/dev/null || true
        scontrol show node "$HOST" >&2 2>/dev/null || true
        die "node $HOST not idle after ${TIMEOUT}s (sinfo state: '${state:-no answer from slurmctld}')"
    fi
    sleep 1
done

log "SLURM is up: node $HOST is $state in partition $PARTITION"
echo "  $(sinfo --version)   $(munged --version 2>&1 | head -n 1)"
echo "  slurmctld: $(slurmctld -V)   slurmd: $(slurmd -V)"
sinfo
scontrol show config | grep -E '^(MinJobAge|SelectType |AccountingStorageType|ProctrackType|TaskPlugin) '
