#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine — munged, MariaDB, slurmdbd, slurmctld and two slurmd
# (nodes n1 and n2 on 127.0.0.1) — for the launcher's tests, CI and trying `launcher=slurm` locally.
#
#   infra/slurm/local.sh install             # Debian packages and the n1/n2 lines of /etc/hosts (root)
#   infra/slurm/local.sh start               # ready in a few seconds; prints the line below
#   eval "$(infra/slurm/local.sh env)"       # export SLURM_CONF for sbatch, srun, sacct, submitit
#   infra/slurm/local.sh status              # sinfo
#   infra/slurm/local.sh stop                # cancels jobs, stops every daemon; keeps the logs
#   infra/slurm/local.sh stop DIR...         # the same for the clusters in other state directories
#
# State (configuration, munge key, database, spool, logs) lives in $SVD_SLURM_DIR (default /tmp/svd-slurm);
# `start` wipes it, so job ids begin at 1 again. Five ports from $SVD_SLURM_PORT (default 26810): slurmctld,
# slurmdbd, MariaDB, slurmd n1, slurmd n2. Everything runs as root with accounting (submitit needs sacct to
# see that a job ended) and requeue enabled. A fixture for tests, not a deployment.
set -Eeuo pipefail # -E: the ERR trap of `start` also sees failures inside functions

PATH=$PATH:/usr/sbin:/sbin # the daemons live there; a user's PATH may lack it
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${SVD_SLURM_DIR:-/tmp/svd-slurm}
PORT=${SVD_SLURM_PORT:-26810}
CPUS=${SVD_SLURM_CPUS:-4}         # per node, declared (config_overrides): more than the machine is fine
MEMORY_MB=${SVD_SLURM_MEM_MB:-4096} # per node, declared
CLUSTER=svd
PARTITION=local
NODES=(n1 n2)
TIMEOUT=${SVD_SLURM_TIMEOUT:-60}  # seconds to wait for each daemon
declare -A LAUNCHED=()            # the daemons this start has launched so far: name → pid

CTLD_PORT=$PORT
DBD_PORT=$((PORT + 1))
MYSQL_PORT=$((PORT + 2))
MUNGE_SOCKET=$DIR/munge/munge.socket
MYSQL_SOCKET=$DIR/run/mariadb.sock
DB_PASSWORD=svd-slurm-db
export SLURM_CONF=$DIR/slurm.conf

log() { echo "local.sh: $*" >&2; }

binaries_present() {
    local binary
    for binary in slurmctld slurmd slurmdbd sinfo sbatch sacct sacctmgr munged mungekey mariadbd \
        mariadb-install-db; do
        command -v "$binary" >/dev/null || return 1
    done
}

install() {
    if ! binaries_present; then
        if [ "$(id -u)" != 0 ]; then
            log "Slurm is not installed and installing it needs root:" \
                "apt-get install slurm-wlm slurmdbd munge mariadb-server"
            exit 1
        fi
        log "installing Slurm, munge and MariaDB from Debian (~30 s)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurm-wlm slurmdbd munge mariadb-server >/dev/null
    fi
    # The fake node names must resolve: jobs use the first one as MASTER_ADDR.
    if [ "$(getent hosts "${NODES[@]}" | wc -l)" -lt ${#NODES[@]} ]; then
        if [ "$(id -u)" != 0 ]; then
            log "the node names ${NODES[*]} do not resolve; add '127.0.0.1 ${NODES[*]}' to /etc/hosts (root)"
            exit 1
        fi
        [ -z "$(tail -c 1 /etc/hosts)" ] || echo >>/etc/hosts # the last line may lack its newline
        echo "127.0.0.1 ${NODES[*]}" >>/etc/hosts
    fi
}

print_env() {
    echo "export SLURM_CONF=$SLURM_CONF"
}

# render TEMPLATE OUTPUT: fill the @NAME@ placeholders of a template in this directory.
render() {
    sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$(hostname)|g" -e "s|@CLUSTER@|$CLUSTER|g" \
        -e "s|@PARTITION@|$PARTITION|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" \
        -e "s|@MYSQL_PORT@|$MYSQL_PORT|g" -e "s|@MUNGE_SOCKET@|$MUNGE_SOCKET|g" \
        -e "s|@DB_PASSWORD@|$DB_PASSWORD|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEMORY_MB@|$MEMORY_MB|g" \
        -e "s|@NODE1@|${NODES[0]}|g" -e "s|@NODE2@|${NODES[1]}|g" \
        -e "s|@NODE1_PORT@|$((PORT + 3))|g" -e "s|@NODE2_PORT@|$((PORT + 4))|g" \
        "$HERE/$1" >"$2"
    if grep -q '@[A-Z0-9_]*@' "$2"; then
        log "unfilled placeholder in $2: $(grep -o '@[A-Z0-9_]*@' "$2" | head -n 1)"
        exit 1
    fi
}

# wait_for WHAT LOG COMMAND...: retry COMMAND until it succeeds. Gives up, naming the log to read, when a
# daemon this start launched has exited (a port in use, a bad setting) or after $TIMEOUT s. Whether a daemon
# lives is asked of the pid `launch` got from the shell, never of a pid file: munged deletes and rewrites its
# own while it starts, and a read at that moment (likely on a loaded machine) looked like an exit.
wait_for() {
    local what=$1 logfile=$2 deadline=$((SECONDS + TIMEOUT)) name
    shift 2
    until "$@" >/dev/null 2>&1; do
        for name in "${!LAUNCHED[@]}"; do
            if ! kill -0 "${LAUNCHED[$name]}" 2>/dev/null; then
                logfile=$DIR/log/$name.log
                [ -s "$logfile" ] || logfile=$DIR/log/$name.out
                log "$name exited while waiting for $what; read $logfile"
                tail -n 5 "$logfile" >&2
                exit 1
            fi
        done
        if [ $SECONDS -ge "$deadline" ]; then
            log "timed out after ${TIMEOUT}s waiting for $what; read $logfile"
            tail -n 15 "$logfile" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.2
    done
}

# launch NAME COMMAND...: run a daemon in the foreground of a new session, its output in log/NAME.out and its
# pid in run/NAME.pid at once: a start that fails half-way can then stop even the daemon that is still
# starting. Only this script writes run/NAME.pid; the daemons write their own pid files in daemon-pid/
# (deleting and rewriting them while they start), which nothing here reads. No terminal and no inherited pipe,
# so a caller capturing our output (pytest's subprocess.run) is not held open by it.
launch() {
    local name=$1
    shift
    setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
    LAUNCHED[$name]=$!
    echo $! >"$DIR/run/$name.pid"
}

nodes_idle() {
    [ "$(sinfo -h -N -p "$PARTITION" -t idle -o '%N' | sort -u | wc -l)" -eq ${#NODES[@]} ]
}

cluster_registered() {  # slurmctld has told slurmdbd where it listens, so sacct and requeue accounting work
    [ -n "$(sacctmgr -n -P list cluster "$CLUSTER" format=ControlHost)" ] && sacct -n -a >/dev/null
}

running() { [ -f "$DIR/ready" ] && timeout 5 sinfo -h >/dev/null 2>&1; }

start() {
    if running; then
        log "already running (state in $DIR)"
        print_env
        return 0
    fi
    install
    stop_daemons
    # A step that fails says which; a start that fails stops what it started.
    trap 'log "failed: $BASH_COMMAND"' ERR
    trap 'start_failed $?' EXIT
    rm -rf "$DIR"
    mkdir -p "$DIR"/{ctld,run,daemon-pid,log,munge} "${NODES[@]/#/$DIR/spool/}"
    chmod 755 "$DIR/munge" # munged refuses a socket directory others can write to
    render slurm.conf.in "$DIR/slurm.conf"
    render cgroup.conf.in "$DIR/cgroup.conf"
    render slurmdbd.conf.in "$DIR/slurmdbd.conf"
    chmod 600 "$DIR/slurmdbd.conf" # slurmdbd refuses a readable one: it holds the database password

    mungekey -c -k "$DIR/munge/munge.key"
    # --force: munged wants every directory above its socket open to all users, which a private temporary
    # directory (pytest's) is not; every client here is root, so that check protects no one.
    launch munged munged --foreground --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/daemon-pid/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_for munged "$DIR/log/munged.log" bash -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'"

    mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root --skip-test-db \
        --auth-root-authentication-method=socket >>"$DIR/log/mariadb-install-db.out" 2>&1
    launch mariadbd mariadbd --no-defaults --datadir="$DIR/mysql" --user=root --bind-address=127.0.0.1 \
        --port="$MYSQL_PORT" --socket="$MYSQL_SOCKET" --pid-file="$DIR/daemon-pid/mariadbd.pid" \
        --log-error="$DIR/log/mariadbd.log" --skip-name-resolve --innodb-buffer-pool-size=64M
    wait_for MariaDB "$DIR/log/mariadbd.log" mariadb-admin --no-defaults --socket="$MYSQL_SOCKET" ping
    mariadb --no-defaults --socket="$MYSQL_SOCKET" -u root <<EOF
CREATE DATABASE slurm_acct_db;
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF

    launch slurmdbd slurmdbd -D
    wait_for slurmdbd "$DIR/log/slurmdbd.log" sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    launch slurmctld slurmctld -D -i
    local node
    for node in "${NODES[@]}"; do
        launch "slurmd-$node" slurmd -D -N "$node"
    done
    wait_for "slurmd ${NODES[*]} to be idle" "$DIR/log/slurmd-${NODES[0]}.log (and slurmctld.log)" nodes_idle
    wait_for "slurmctld to register with slurmdbd" "$DIR/log/slurmctld.log (and slurmdbd.log)" \
        cluster_registered
    touch "$DIR/ready"
    trap - ERR EXIT
    log "Slurm cluster '$CLUSTER' ready: partition $PARTITION, nodes ${NODES[*]} (state in $DIR)"
    print_env
}

start_failed() {
    [ "$1" = 0 ] && return
    trap - ERR
    log "start failed; stopping the daemons it started (their logs stay in $DIR/log)"
    stop_daemons
}

# stop_pids PIDFILE...: SIGTERM to each daemon at once, wait up to 10 s for all of them, then SIGKILL. A pid
# whose process is not the daemon its file names (run/slurmd-n1.pid: slurmd) is left alone: pids get reused.
stop_pids() {
    local pids="" file pid daemon
    for file in "$@"; do
        pid=$(cat "$file" 2>/dev/null) || continue
        daemon=$(basename "$file" .pid)
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${daemon%%-*}" ] || continue
        kill "$pid" 2>/dev/null && pids="$pids $pid"
    done
    for _ in $(seq 50); do
        for pid in $pids; do
            kill -0 "$pid" 2>/dev/null || pids=${pids/ $pid/}
        done
        [ -z "$pids" ] && return 0
        sleep 0.2
    done
    log "killing daemons that ignored SIGTERM:$pids"
    # shellcheck disable=SC2086 # one argument per pid
    kill -KILL $pids 2>/dev/null || true
}

# stepd_tree: the slurmstepd processes of this cluster (they hold its slurmd log open) and their children.
stepd_tree() {
    local pid children
    for pid in $(pgrep -x slurmstepd); do
        ls -l "/proc/$pid/fd" 2>/dev/null | grep -q -- "-> $DIR/log/" || continue
        children=$pid
        while [ -n "$children" ]; do
            echo "$children"
            children=$(pgrep -P "$(echo "$children" | paste -sd,)" || true)
        done
    done
}

stop_daemons() {
    [ -d "$DIR/run" ] || return 0
    # Jobs first, while slurmd can still end their steps: a slurmstepd outlives its slurmd.
    local jobs
    if kill -0 "$(cat "$DIR/run/slurmctld.pid" 2>/dev/null)" 2>/dev/null; then
        jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086 # one argument per job id
            timeout 10 scancel $jobs 2>/dev/null || true
            for _ in $(seq 50); do
                [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    # All at once: the next start wipes the state, so nothing needs to be handed over in order.
    local node daemons=("$DIR"/run/{slurmctld,slurmdbd,mariadbd,munged}.pid)
    for node in "${NODES[@]}"; do
        daemons+=("$DIR/run/slurmd-$node.pid")
    done
    stop_pids "${daemons[@]}"
    rm -f "${daemons[@]}" # a later stop must not signal whatever process reuses one of these pids
    # Steps whose job could not be cancelled (slurmctld already gone) would run on forever.
    local leftovers
    leftovers=$(stepd_tree)
    if [ -n "$leftovers" ]; then
        log "killing job steps left running: $(echo "$leftovers" | paste -sd ' ')"
        # shellcheck disable=SC2086 # one argument per pid
        kill -KILL $leftovers 2>/dev/null || true
    fi
    rm -f "$DIR/ready"
}

# stop [DIR...]: the cluster in $DIR, or those in the state directories given (CI's cleanup names the test
# fixture's too).
stop() {
    local dir
    for dir in "${@:-$DIR}"; do
        DIR=$dir
        SLURM_CONF=$dir/slurm.conf
        stop_daemons
    done
}

status() {
    if ! running; then
        log "not running (state in $DIR)"
        exit 1
    fi
    sinfo
}

case "${1:-}" in
install) install ;;
start) start ;;
stop) stop "${@:2}" ;;
status) status ;;
env) print_env ;;
*)
    echo "usage: $0 install|start|stop [STATE_DIR...]|status|env" >&2
    exit 2
    ;;
esac
