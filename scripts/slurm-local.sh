#!/usr/bin/env bash
# Start a single-node Slurm cluster on localhost (munged, a private MariaDB, slurmdbd,
# slurmctld, slurmd), for development and CI. Run as root. Idempotent: when the cluster is
# already up it only checks it and exits 0.
#
#   scripts/slurm-local.sh          # start (or check)
#   scripts/slurm-local-stop.sh     # stop what this script started
#
# Environment:
#   EXP_SLURM_STATE    state directory (default /var/lib/exp-slurm): database, spool, logs, PIDs
#   EXP_SLURM_DB_PORT  port of the private MariaDB on 127.0.0.1 (default 3307)
#   EXP_SLURM_TIMEOUT  seconds to wait for each daemon (default 60)
#
# The generated configs go to /etc/slurm, where the Debian packages' sbatch, sacct, scontrol
# look for them, so the client commands need no extra environment variables.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATES=$HERE/slurm
STATE=${EXP_SLURM_STATE:-/var/lib/exp-slurm}
DB_PORT=${EXP_SLURM_DB_PORT:-3307}
TIMEOUT=${EXP_SLURM_TIMEOUT:-60}
CLUSTER=exp
PARTITION=debug
CONF_DIR=/etc/slurm

PIDS=$STATE/pids        # PIDs of the daemons this script started (read by slurm-local-stop.sh)
RUN=$STATE/run          # the daemons' own PID files
LOGS=$STATE/log
DB_DIR=$STATE/mysql
DB_RUN=$STATE/mysql-run # mariadbd writes its socket and PID file here, as the mysql user
DB_SOCKET=$DB_RUN/mysqld.sock

START=$(date +%s.%N)
# fd 3: our stderr, for messages from inside checks whose own output wait_until discards.
exec 3>&2
log() { echo "slurm-local: $*" >&3; }
die() { log "ERROR: $*"; exit 1; }
elapsed() { awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

[[ $(id -u) -eq 0 ]] || die "run as root (the daemons are started as root)"

# --- helpers ---------------------------------------------------------------------------------

# alive NAME: the daemon we recorded as NAME is still running. The command name is checked
# too, so that a PID reused by an unrelated process after a reboot does not count.
alive() {
    local pid
    pid=$(cat "$PIDS/$1.pid" 2>/dev/null) || return 1
    [[ -n $pid && -d /proc/$pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]
}

# died NAME: we launched NAME and its process is gone (a start-up failure).
died() {
    local pid
    pid=$(cat "$PIDS/$1.pid" 2>/dev/null) || return 1
    [[ -n $pid && ! -d /proc/$pid ]]
}

# launch NAME LOGFILE CMD...: start CMD in the background, in its own session (so that a
# Ctrl-C or a job runner killing our process group does not take the daemon down), and
# record its PID. The wrapper shell writes its own PID and then execs the daemon, so the
# recorded PID is the daemon's whatever setsid does about forking.
launch() {
    local name=$1 logfile=$2
    shift 2
    rm -f "$PIDS/$name.pid"
    # 3>&-: the daemon must not keep this script's log descriptor (the caller's stderr pipe) open for ever
    # shellcheck disable=SC2016 # $$, $0 and $@ belong to the inner shell
    # cd /: a daemon must not keep the caller's folder (a checkout or worktree that may be deleted) as its working
    # directory, which every job step would inherit ("Unable to get current working directory")
    (cd / && exec setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PIDS/$name.pid" "$@") </dev/null >>"$logfile" 2>&1 3>&- &
}

# wait_until NAME LOGFILE DESCRIPTION CMD...: poll CMD until it succeeds. Give up with the log
# tail when daemon NAME dies or after TIMEOUT seconds.
wait_until() {
    local name=$1 logfile=$2 what=$3 deadline
    shift 3
    deadline=$(($(date +%s) + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if died "$name"; then
            log "$name exited while waiting for $what; last lines of $logfile:"
            tail -n 25 "$logfile" >&2 || true
            exit 1
        fi
        if (($(date +%s) >= deadline)); then
            log "timed out after ${TIMEOUT}s waiting for $what (node: $(node_state || echo '?')); last lines of $logfile:"
            tail -n 25 "$logfile" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
db_ping() { mariadb-admin --no-defaults --socket="$DB_SOCKET" -uroot ping; }
db_sql() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot --batch; } # SQL on stdin
dbd_answers() { sacctmgr -n -P list cluster format=cluster; }
ctld_answers() { scontrol ping | grep -q 'is UP'; }
node_state() { sinfo -h -n localhost -o %T 2>/dev/null; }
# idle, mixed, allocated, completing... but not down/drained/unknown or not responding (*).
node_ready() { node_state | grep -qxE 'idle|mixed|allocated|completing'; }
sacct_answers() { sacct -n -X -S now -o JobID; }
node_has_gpus() { sinfo -h -n localhost -o %G | grep -q 'gpu:2'; }
# A node drained by an earlier mishap (a job whose processes could not be killed: "Kill task
# failed") stays drained across restarts. This is a scratch cluster: say why, and resume it.
node_ready_or_resume() {
    local state
    state=$(node_state) || return 1
    if [[ $state == drain* ]]; then
        log "node localhost was $state ($(sinfo -h -n localhost -o %E)): resuming it"
        scontrol update NodeName=localhost State=RESUME >&3 2>&3 || true
    fi
    node_ready
}

# One line summing up the cluster, from what slurmctld itself reports.
summary() {
    local cpus mem
    cpus=$(sinfo -h -n localhost -o %c)
    mem=$(sinfo -h -n localhost -o %m)
    echo "slurm-local: up (partition $PARTITION, $cpus cpus, $mem MB) in $(elapsed) s"
}

# --- fast path: already up --------------------------------------------------------------------

# a daemon left in a deleted folder (started by an older version of this script from a removed checkout) is restarted
cwd_kept() { local pid; pid=$(cat "$PIDS/$1.pid" 2>/dev/null) && [[ $(readlink "/proc/$pid/cwd") != *"(deleted)" ]]; }

if alive mariadbd && alive slurmdbd && alive slurmctld && alive slurmd \
    && cwd_kept slurmctld && cwd_kept slurmd && munge_works && node_ready && node_has_gpus && sacct_answers >/dev/null 2>&1; then
    summary
    exit 0
fi

# The configs in /etc/slurm serve one cluster at a time: do not overwrite those of a cluster
# still running from another state dir (EXP_SLURM_STATE set differently).
if [[ -f $CONF_DIR/slurm.conf ]]; then
    other=$(sed -n 's|^StateSaveLocation=\(.*\)/spool/slurmctld$|\1|p' "$CONF_DIR/slurm.conf")
    if [[ -n $other && $other != "$STATE" ]] && PIDS=$other/pids alive slurmctld; then
        die "a local cluster with state dir $other is running; stop it first (EXP_SLURM_STATE=$other scripts/slurm-local-stop.sh)"
    fi
fi

# --- 1. packages ------------------------------------------------------------------------------

missing=()
for cmd in slurmctld slurmd slurmdbd sbatch munged mariadbd mariadb-install-db; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
done
# The MySQL accounting plugin comes as a dependency of slurmdbd; check for it all the same.
dpkg -s slurm-wlm-mysql-plugin >/dev/null 2>&1 || missing+=(slurm-wlm-mysql-plugin)
if ((${#missing[@]})); then
    log "installing Slurm, munge and MariaDB (missing: ${missing[*]})"
    mkdir -p "$LOGS"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge slurmdbd mariadb-server; } >"$LOGS/apt.log" 2>&1; then
        tail -n 25 "$LOGS/apt.log" >&2
        die "apt-get failed (full log: $LOGS/apt.log)"
    fi
fi

mkdir -p "$PIDS" "$RUN" "$LOGS" "$STATE/spool/slurmctld" "$STATE/spool/slurmd" "$CONF_DIR"

# --- 2. munge ---------------------------------------------------------------------------------

# Without systemd nobody creates /run/munge. munged refuses a key or directories that others
# can write to, hence the explicit owners and modes.
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 700 /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 600 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 711 /var/lib/munge
install -d -o munge -g munge -m 700 /var/log/munge

# A munged someone else started (an init script) serves us just as well: leave it alone.
if ! munge_works; then
    # munged runs as its own user (it checks that the key belongs to it); setpriv execs, so the
    # recorded PID stays munged's. -F: stay in the foreground so that we know its PID.
    launch munged "$LOGS/munged.out" \
        setpriv --reuid=munge --regid=munge --init-groups munged -F
    wait_until munged "$LOGS/munged.out" "munged" munge_works
fi

# --- 3. private MariaDB for slurmdbd ----------------------------------------------------------

DB_PASS_FILE=$STATE/db.secret
if [[ ! -s $DB_PASS_FILE ]]; then
    # 32 hex digits: safe to paste into SQL and a config file without quoting.
    (umask 077 && od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$DB_PASS_FILE")
fi
DB_PASS=$(cat "$DB_PASS_FILE")

install -d -o mysql -g mysql -m 755 "$DB_RUN"
if [[ ! -d $DB_DIR/mysql ]]; then
    # Initialise into a scratch directory and rename it only when complete: a half-made
    # datadir from an interrupted first start would otherwise never be initialised again.
    log "initialising MariaDB datadir $DB_DIR"
    rm -rf "$DB_DIR" "$DB_DIR.new"
    if ! mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR.new" \
        --auth-root-authentication-method=socket --skip-test-db >"$LOGS/mariadb-install-db.log" 2>&1; then
        tail -n 25 "$LOGS/mariadb-install-db.log" >&2
        die "mariadb-install-db failed"
    fi
    mv "$DB_DIR.new" "$DB_DIR"
fi

if ! alive mariadbd; then
    # --no-defaults: ignore /etc/mysql (the system server's settings, port 3306).
    # mariadbd drops to the mysql user before opening its files, so its PID file goes in a
    # mysql-owned directory and its log is the stderr we open for it (no --log-error).
    # innodb_flush_log_at_trx_commit=2: flush once a second instead of an fsync per commit
    # (~17 ms each here); slurmdbd creating its tables takes hundreds of commits. Only an OS
    # crash can lose the last second, and this is disposable CI accounting.
    # Buffer pool 512M (half the 1 GiB Slurm advises; memory is only touched as used), redo
    # log 64M, lock wait 900 s: with less, slurmdbd logs "Database settings not recommended
    # values" at every start.
    launch mariadbd "$LOGS/mariadb.log" \
        mariadbd --no-defaults --user=mysql --datadir="$DB_DIR" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --socket="$DB_SOCKET" \
        --pid-file="$DB_RUN/mariadbd.pid" \
        --skip-name-resolve --skip-log-bin \
        --innodb-buffer-pool-size=512M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900 --innodb-flush-log-at-trx-commit=2
fi
wait_until mariadbd "$LOGS/mariadb.log" "MariaDB on 127.0.0.1:$DB_PORT" db_ping

# Idempotent: (re)creates the accounting user with the current password every start.
# slurmdbd connects over TCP to 127.0.0.1, which with skip-name-resolve is its own host entry.
db_sql <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE OR REPLACE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE OR REPLACE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

# --- 4. configuration -------------------------------------------------------------------------

# `slurmd -C` prints e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2
# ThreadsPerCore=1 RealMemory=24105"; keep the topology, replace the name and the memory.
hw_line=$(slurmd -C | head -n 1)
hardware=$(tr ' ' '\n' <<<"$hw_line" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw_line")
total_mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw_line")
[[ -n $cpus && -n $total_mem ]] || die "could not parse 'slurmd -C': $hw_line"
# Headroom for the OS, MariaDB and the daemons: 10%, at least 512 MB.
headroom=$((total_mem / 10 > 512 ? total_mem / 10 : 512))
real_mem=$((total_mem - headroom))
def_mem_per_cpu=$((real_mem / cpus))

render() {
    sed -e "s|@STATE@|$STATE|g" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@PARTITION@|$PARTITION|g" \
        -e "s|@HARDWARE@|${hardware% }|g" -e "s|@REAL_MEMORY@|$real_mem|g" \
        -e "s|@DEF_MEM_PER_CPU@|$def_mem_per_cpu|g" -e "s|@DB_PORT@|$DB_PORT|g" \
        -e "s|@DB_PASS@|$DB_PASS|g" "$1"
}
# slurmdbd refuses a slurmdbd.conf that others can read (it holds the password).
(umask 077 && render "$TEMPLATES/slurmdbd.conf.in" >"$CONF_DIR/slurmdbd.conf")
chown root:root "$CONF_DIR/slurmdbd.conf"
chmod 600 "$CONF_DIR/slurmdbd.conf"
# Two fake GPU devices: gres.conf must name files that exist (a Count without File= drains the node).
for i in 0 1; do : >"$STATE/fakegpu$i"; done
echo "NodeName=localhost Name=gpu File=$STATE/fakegpu[0-1]" >"$CONF_DIR/gres.conf.new"
render "$TEMPLATES/slurm.conf.in" >"$CONF_DIR/slurm.conf.new"
# A cluster already running on another configuration (one from before the fake GPUs) is restarted on this one.
if ! cmp -s "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf" || ! cmp -s "$CONF_DIR/gres.conf.new" "$CONF_DIR/gres.conf"; then
    for name in slurmd slurmctld; do
        if alive "$name"; then
            log "configuration changed: restarting $name"
            pid=$(cat "$PIDS/$name.pid")
            kill -TERM "$pid"
            wait_gone=$(($(date +%s) + TIMEOUT))
            while [[ -d /proc/$pid ]] && (($(date +%s) < wait_gone)); do sleep 0.1; done
        fi
    done
fi
mv "$CONF_DIR/gres.conf.new" "$CONF_DIR/gres.conf"
mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"
chmod 644 "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"

# --- 5. daemons: slurmdbd, then slurmctld, then slurmd ----------------------------------------

# A daemon started from a folder since deleted hands that dead folder to every job step: restart it.
for name in slurmctld slurmd; do
    if alive "$name" && ! cwd_kept "$name"; then
        log "$name runs in a deleted folder: restarting it"
        pid=$(cat "$PIDS/$name.pid")
        kill "$pid"
        for _ in $(seq 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    fi
done

# -D: stay in the foreground, so the recorded PID is the daemon's; logs go to the files
# named in the configs, stdout/stderr (startup errors) to *.out.
if ! alive slurmdbd; then
    launch slurmdbd "$LOGS/slurmdbd.out" slurmdbd -D
fi
wait_until slurmdbd "$LOGS/slurmdbd.log" "slurmdbd" dbd_answers

# Register the cluster before slurmctld starts, so that its jobs are recorded from the first.
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
fi

if ! alive slurmctld; then
    launch slurmctld "$LOGS/slurmctld.out" slurmctld -D
fi
wait_until slurmctld "$LOGS/slurmctld.log" "slurmctld" ctld_answers

if ! alive slurmd; then
    # -N localhost: the node is called localhost whatever the machine's hostname is.
    launch slurmd "$LOGS/slurmd.out" slurmd -D -N localhost
fi
wait_until slurmd "$LOGS/slurmd.log" "node localhost to be idle" node_ready_or_resume
wait_until slurmd "$LOGS/slurmd.log" "node localhost to offer its 2 fake GPUs" node_has_gpus
wait_until slurmdbd "$LOGS/slurmdbd.log" "sacct to answer" sacct_answers

summary
