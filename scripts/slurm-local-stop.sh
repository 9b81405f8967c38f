#!/usr/bin/env bash
# Stop the local Slurm cluster started by scripts/slurm-local.sh. Only the daemons that script
# started are stopped, by the PIDs it recorded in the state dir, in reverse start order, and
# we wait for each to exit. Idempotent: nothing recorded or nothing running is not an error.
# A munged that was already running before slurm-local.sh (not recorded) is left alone.
#
# Environment: EXP_SLURM_STATE (default /var/lib/exp-slurm), EXP_SLURM_STOP_TIMEOUT (default 30 s
# per daemon before SIGKILL).
set -euo pipefail

STATE=${EXP_SLURM_STATE:-/var/lib/exp-slurm}
PIDS=$STATE/pids
TIMEOUT=${EXP_SLURM_STOP_TIMEOUT:-30}

log() { echo "slurm-local-stop: $*" >&2; }

# stop NAME: SIGTERM the recorded PID, wait for it to go, SIGKILL as a last resort.
stop() {
    local name=$1 pidfile=$PIDS/$1.pid pid deadline
    pid=$(cat "$pidfile" 2>/dev/null) || return 0
    # Check the command name as well: after a reboot the PID may belong to something else.
    if [[ -z $pid || ! -d /proc/$pid || $(cat "/proc/$pid/comm" 2>/dev/null) != "$name" ]]; then
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    # MariaDB flushes InnoDB and slurmctld saves its state on SIGTERM: give them time.
    deadline=$(($(date +%s) + TIMEOUT))
    while [[ -d /proc/$pid ]]; do
        if (($(date +%s) >= deadline)); then
            log "$name (pid $pid) still running after ${TIMEOUT}s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            deadline=$(($(date +%s) + 5))
            while [[ -d /proc/$pid ]] && (($(date +%s) < deadline)); do sleep 0.1; done
            break
        fi
        sleep 0.1
    done
    rm -f "$pidfile"
    log "stopped $name (pid $pid)"
}

# Reverse of the start order: the node, the controller, accounting, its database, munge.
for name in slurmd slurmctld slurmdbd mariadbd munged; do
    stop "$name"
done
