#!/usr/bin/env bash
# A single-node Ceph object store on 127.0.0.1 — monitor, one in-memory OSD, radosgw (S3 API) — for
# integration tests and benchmarks. Unlike moto it is a real object store: ranged reads stay fast on large
# objects and conditional PUTs work, so concurrent Lance appends are safe.
#
#   infra/local/radosgw.sh install            # Debian packages (root); `start` runs it when needed
#   eval "$(infra/local/radosgw.sh start)"    # prints the AWS_* variables of the running gateway
#   infra/local/radosgw.sh stop
#
# State lives in $SVD_RGW_DIR (default /tmp/svd-rgw). Ports: $SVD_RGW_PORT (7480), $SVD_RGW_MON_PORT (6789).
# No authentication between the daemons (auth none), pool size 1, objects in memory: a test fixture, not
# a deployment. Ready in ~15 s, ~0.7 GB of memory.
set -euo pipefail

DIR=${SVD_RGW_DIR:-/tmp/svd-rgw}
RGW_PORT=${SVD_RGW_PORT:-7480}
MON_PORT=${SVD_RGW_MON_PORT:-6789}
ACCESS_KEY=svd-rgw
SECRET_KEY=svd-rgw-secret
CONF="$DIR/ceph.conf"

log() { echo "radosgw.sh: $*" >&2; }

# A failed step names itself and shows the daemons' logs: most of them write only there, and a bare exit
# status left callers (bench/loader.py) with an empty error.
failed() {
    log "failed (exit $1) at line $2: $3"
    tail -n 20 "$DIR"/log/*.log >&2 2>/dev/null || true
}
set -E
trap 'failed $? $LINENO "$BASH_COMMAND"' ERR

install() {
    command -v radosgw >/dev/null && command -v ceph-osd >/dev/null && return 0
    if [ "$(id -u)" != 0 ]; then
        log "Ceph is not installed and installing it needs root: apt-get install ceph-mon ceph-osd radosgw ceph-common"
        exit 1
    fi
    log "installing Ceph from Debian (~20 s)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        ceph-mon ceph-osd radosgw ceph-common uuid-runtime >/dev/null
}

print_env() {
    echo "export AWS_ENDPOINT_URL_S3=http://127.0.0.1:$RGW_PORT"
    echo "export AWS_ACCESS_KEY_ID=$ACCESS_KEY"
    echo "export AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
    echo "export AWS_REGION=us-east-1"
    # Ceph answers HTTP 411 to the checksummed multipart uploads newer AWS SDKs send by default.
    echo "export AWS_REQUEST_CHECKSUM_CALCULATION=WHEN_REQUIRED"
    echo "export AWS_RESPONSE_CHECKSUM_VALIDATION=WHEN_REQUIRED"
}

# Bounded: a gateway that accepts connections and never answers (its memstore OSD full, every write blocked)
# is not running; `start` then makes a fresh store instead of waiting on it forever.
answering() { curl -fsS --max-time 10 -o /dev/null "http://127.0.0.1:$RGW_PORT" 2>/dev/null; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            log "timed out waiting for $what; logs in $DIR/log"
            tail -n 20 "$DIR"/log/*.log >&2 || true
            exit 1
        fi
        sleep 0.5
    done
}

# A full memstore OSD answers reads and blocks every write (seen after ~90 minutes of test sessions on one
# store: a session's first bucket creation hung): a running gateway is kept only if a write returns in time.
writable() { timeout 10 rados -c "$CONF" -p .rgw.root put svd-write-probe "$CONF" >/dev/null 2>&1; }

start() {
    if [ -f "$DIR/ready" ] && answering && writable; then
        print_env
        return 0
    fi
    install
    stop_daemons
    rm -rf "$DIR"
    mkdir -p "$DIR"/{mon,osd/ceph-0,run,log,rgw}
    local fsid osd_uuid
    fsid=$(uuidgen)
    osd_uuid=$(uuidgen)
    cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon_host = v1:127.0.0.1:$MON_PORT
mon_initial_members = a
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_bind_msgr2 = false
ms_bind_ipv4 = true
public_addr = 127.0.0.1
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_max_pg_per_osd = 1000
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_objectstore = memstore
# The OSD's own start-up registration races its first monmap ("wrong fsid"); place it explicitly instead.
osd_crush_update_on_start = false
osd_class_update_on_start = false
memstore_device_bytes = 4294967296
osd_max_object_size = 4294967296
run_dir = $DIR/run
log_file = $DIR/log/\$name.log
admin_socket = $DIR/run/\$name.asok
pid_file = $DIR/run/\$name.pid
mon_data = $DIR/mon/\$cluster-\$id
osd_data = $DIR/osd/\$cluster-\$id
[client.rgw]
rgw_frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw_data = $DIR/rgw
rgw_dns_name = 127.0.0.1
EOF
    monmaptool --create --addv a "[v1:127.0.0.1:$MON_PORT]" --fsid "$fsid" "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" 2>>"$DIR/log/setup.log"
    ceph-mon -c "$CONF" -i a 2>>"$DIR/log/setup.log"
    wait_for 30 "the monitor" ceph -c "$CONF" --connect-timeout 2 status
    # A monitor that answers `status` may still refuse commands for a moment (EPERM); `osd new` of one uuid is
    # idempotent, so retry it.
    wait_for 30 "the monitor to take commands" ceph -c "$CONF" osd new "$osd_uuid"
    ceph -c "$CONF" osd crush add osd.0 1.0 root=default host=localhost >/dev/null 2>&1
    ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" 2>>"$DIR/log/setup.log"
    ceph-osd -c "$CONF" -i 0 2>>"$DIR/log/setup.log"
    wait_for 60 "the OSD" bash -c "ceph -c '$CONF' osd stat 2>/dev/null | grep -q '1 up'"
    radosgw -c "$CONF" -n client.rgw 2>>"$DIR/log/setup.log"
    wait_for 90 "radosgw on port $RGW_PORT" answering
    radosgw-admin -c "$CONF" user create --uid svd --display-name svd \
        --access-key "$ACCESS_KEY" --secret "$SECRET_KEY" >/dev/null
    touch "$DIR/ready"
    log "radosgw ready on http://127.0.0.1:$RGW_PORT (state in $DIR)"
    print_env
}

stop_daemons() {
    # The gateway first, and wait for each daemon to exit: a radosgw whose monitor and OSD are already gone
    # waits for them forever instead of exiting.
    local name pid
    for name in client.rgw osd.0 mon.a; do
        pid=$(cat "$DIR/run/$name.pid" 2>/dev/null) || continue
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
    done
    pkill -KILL -f -- "-c $CONF" 2>/dev/null || true
}

stop() {
    stop_daemons
    rm -rf "$DIR"
}

# One start or stop at a time per state folder: test sessions run in parallel workers, and two starts at once
# would each wipe and set up the folder. `-o`: the daemons started must not inherit (and hold) the lock.
locked() { flock -o "$DIR.lock" "$0" "$1-locked"; }

case "${1:-}" in
install) install ;;
start) locked start ;;
stop) locked stop ;;
start-locked) start ;;
stop-locked) stop ;;
env) print_env ;;
*)
    echo "usage: $0 install|start|stop|env" >&2
    exit 2
    ;;
esac
