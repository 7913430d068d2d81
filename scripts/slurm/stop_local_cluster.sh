#!/usr/bin/env bash
# Stop the one-node cluster started by start_local_cluster.sh: slurmd,
# slurmctld, then munged.  Jobs still running are killed with slurmd.
# With --purge, also delete slurmctld's saved state (job records) and the
# slurmd spool so the next start begins with an empty queue.
set -euo pipefail

log() { echo "[stop_local_cluster] $*" >&2; }
[[ $(id -u) -eq 0 ]] || { echo "must run as root" >&2; exit 1; }

pid_alive() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $st != Z* ]]; }
stop_pidfile() {  # stop_pidfile NAME PIDFILE
    local pid
    pid=$(cat "$2" 2>/dev/null || true)
    if [[ -z $pid ]] || ! pid_alive "$pid"; then
        log "$1 not running"; return 0
    fi
    log "stopping $1 (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do pid_alive "$pid" || return 0; sleep 0.1; done
    log "$1 (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
}

stop_pidfile slurmd /run/slurmd.pid
stop_pidfile slurmctld /run/slurmctld.pid
stop_pidfile munged /run/munge/munged.pid

if [[ ${1:-} == --purge ]]; then
    log "purging /var/spool/slurmctld and /var/spool/slurmd"
    rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
fi
