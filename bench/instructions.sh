#!/usr/bin/env bash
# User-space instructions per request of lfguard, of the bare hyper proxy under it
# (examples/hyper_floor) and of nginx as a plain reverse proxy, counted with callgrind (valgrind).
# Wall-clock benchmarks on a shared machine vary by +-10% from run to run; instruction counts
# barely move, so this is the figure to compare when a change is meant to save CPU per request.
#
#   bench/instructions.sh                      # 2,000 and 12,000 requests per proxy, 64 in flight
#   N1=1000 N2=6000 bench/instructions.sh      # quicker
#
# Environment: N1 (requests in the short run, default 2000), N2 (requests in the long run, 12000),
# CONCURRENCY (requests in flight from `lfguard send`, 64), KEEP_TMP=1 keeps the temporary
# directory (configs, logs, callgrind out files).
#
# What runs: a plain nginx backend answering `return 200 '{}'` (not under valgrind) and, one after
# the other, each proxy in front of it under `valgrind --tool=callgrind`: (a) nginx proxy_pass
# (worker_processes 1, master_process off, upstream keep-alive), (b) examples/hyper_floor (the same
# hyper server and upstream pool as lfguard, nothing in between), (c) lfguard with verification,
# replay protection (memory store) and the request log (level info, to a file) on, one worker
# thread. Every proxy is started twice and driven by `lfguard send` (distinct, correctly signed
# callbacks over kept-alive connections) with N1 and then N2 requests; instructions per request are
# (Ir(N2) - Ir(N1)) / (N2 - N1), which cancels start-up, the readiness probe and shutdown. Ir counts
# every thread of the proxy's process, user space only (no kernel time, no syscalls' cost).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=bench/common.sh
source "$here/common.sh"

N1=${N1:-2000}
N2=${N2:-12000}
CONCURRENCY=${CONCURRENCY:-64}
SECRET=bench-secret
PARTNER=P123456
READY_TIMEOUT_S=60
SEND_TIMEOUT_S=300
STOP_TIMEOUT_S=60
unset RUST_LOG

log() { printf '[instructions] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for v in N1 N2 CONCURRENCY; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
((N2 > N1)) || die "N2 ($N2) must be larger than N1 ($N1)"

# --- tools -------------------------------------------------------------------------------------
install_missing valgrind=valgrind nginx=nginx-light python3=python3 curl=curl

log "building lfguard and examples/hyper_floor (dist profile)"
(cd "$root" && cargo build --profile dist --quiet --bin lfguard --example hyper_floor)
LFGUARD=$root/target/dist/lfguard
HYPER_FLOOR=$root/target/dist/examples/hyper_floor

# --- processes and cleanup ------------------------------------------------------------------------
start_tmp instructions

# Enough descriptors for nginx's worker_connections; valgrind keeps a few of the top ones.
raise_fd_limit 65536

nginx_conf() { # dir, main-context directives, body of the http block
    mkdir -p "$1"
    cat >"$1/nginx.conf" <<EOF
$2
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_processes 1;
daemon off;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
$3
}
EOF
}

# --- backend (plain nginx, not measured) --------------------------------------------------------
read -r BACKEND_PORT < <(free_ports 1)
# keepalive_requests: the proxies' upstream connections are never closed by the backend mid-run,
# so no proxy pays for reconnecting (nginx's default closes a connection after 1,000 requests).
nginx_conf "$tmp/backend" "master_process on;" "    keepalive_requests 10000000;
    server {
        listen 127.0.0.1:$BACKEND_PORT backlog=4096;
        location / {
            default_type application/json;
            return 200 '{}';
        }
    }"
"$NGINX" -e "$tmp/backend/error.log" -p "$tmp/backend" -c "$tmp/backend/nginx.conf" \
    >"$tmp/backend/stdout.log" 2>&1 &
pids+=($!)

wait_http() { # url, pid, what, log file: any HTTP answer from url, while pid lives
    local deadline=$((SECONDS + READY_TIMEOUT_S)) code
    while ((SECONDS < deadline)); do
        if ! kill -0 "$2" 2>/dev/null; then
            tail -n 30 "$4" >&2 || true
            die "$3 exited before it answered on $1 (log above, from $4)"
        fi
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$1" 2>/dev/null) || true
        [[ $code =~ ^[1-5][0-9][0-9]$ ]] && return 0
        sleep 0.2
    done
    tail -n 30 "$4" >&2 || true
    die "$3 did not answer on $1 within ${READY_TIMEOUT_S}s (log above, from $4)"
}
wait_http "http://127.0.0.1:$BACKEND_PORT/" "${pids[-1]}" "nginx backend" "$tmp/backend/error.log"
log "nginx backend on 127.0.0.1:$BACKEND_PORT"

# --- one measured run ---------------------------------------------------------------------------------
# Starts the target under callgrind, waits for it, sends `count` callbacks, stops it with SIGTERM
# and sets IR to the Ir total from the callgrind out file. Runs in this shell (not in a command
# substitution) so that the cleanup trap knows the valgrind pid.
IR=
measure() { # target, count
    local target=$1 count=$2 dir port admin_port vg_pid out send_rc=0 requests statuses ir p
    dir=$tmp/$target-$count
    mkdir -p "$dir"
    out=$dir/callgrind.out
    read -r port admin_port < <(free_ports 2)
    local cmd=()
    case $target in
    nginx)
        nginx_conf "$dir" "master_process off;" "    upstream be {
        server 127.0.0.1:$BACKEND_PORT;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"
        cmd=("$NGINX" -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf")
        ;;
    hyper_floor)
        cmd=("$HYPER_FLOOR" "127.0.0.1:$port" "http://127.0.0.1:$BACKEND_PORT")
        ;;
    lfguard)
        cat >"$dir/lfguard.toml" <<EOF
# lfguard for the instruction count: one worker thread, verification and replay protection on.
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin_port"
worker_threads = 1

[upstream]
url = "http://127.0.0.1:$BACKEND_PORT"

[replay]
capacity = 50000

[log]
# The shipped default: one JSON event per request (to a file here).
level = "info"

[partners.$PARTNER]
secrets = ["$SECRET"]
EOF
        cmd=("$LFGUARD" --config "$dir/lfguard.toml")
        ;;
    *) die "unknown target $target" ;;
    esac

    valgrind --tool=callgrind --callgrind-out-file="$out" "${cmd[@]}" >"$dir/stdout.log" 2>"$dir/valgrind.log" &
    vg_pid=$!
    pids+=("$vg_pid")
    wait_http "http://127.0.0.1:$port/" "$vg_pid" "$target under callgrind" "$dir/valgrind.log"

    timeout "$SEND_TIMEOUT_S" "$LFGUARD" send "http://127.0.0.1:$port/callback" --secret "$SECRET" \
        --partner "$PARTNER" --count "$count" --concurrency "$CONCURRENCY" >"$dir/send.txt" 2>&1 || send_rc=$?
    requests=$(awk '$1 == "requests:" {print $2}' "$dir/send.txt")
    statuses=$(awk '$1 == "status:" {$1 = ""; sub(/^ +/, ""); print}' "$dir/send.txt")
    if ((send_rc != 0)) || [[ $requests != "$count" || $statuses != "200=$count" ]]; then
        sed 's/^/    /' "$dir/send.txt" >&2
        die "$target: lfguard send exited $send_rc, $requests requests, status ${statuses:-?} (want 200=$count)"
    fi

    kill -TERM "$vg_pid"
    local deadline=$((SECONDS + STOP_TIMEOUT_S))
    while kill -0 "$vg_pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$vg_pid" 2>/dev/null; then
        kill -KILL "$vg_pid" 2>/dev/null || true
        wait "$vg_pid" 2>/dev/null || true
        die "$target did not exit within ${STOP_TIMEOUT_S}s of SIGTERM"
    fi
    wait "$vg_pid" 2>/dev/null || true
    local keep=()
    for p in "${pids[@]}"; do [[ $p == "$vg_pid" ]] || keep+=("$p"); done
    pids=("${keep[@]}")

    [[ -s $out ]] || { tail -n 30 "$dir/valgrind.log" >&2; die "$target: callgrind wrote no $out"; }
    ir=$(awk '$1 == "summary:" {print $2}' "$out")
    [[ $ir =~ ^[0-9]+$ ]] || die "$target: no summary line in $out"
    log "$(printf '%-11s %6d requests: Ir %15s  (%s)' "$target" "$count" "$ir" \
        "$(awk '$1 == "throughput:" {print $2, $3}' "$dir/send.txt")")"
    IR=$ir
}

TARGETS=(nginx hyper_floor lfguard)
results=$tmp/results.tsv
: >"$results"
started=$SECONDS
for target in "${TARGETS[@]}"; do
    log "$target: $N1 then $N2 requests under callgrind"
    measure "$target" "$N1"
    ir1=$IR
    measure "$target" "$N2"
    ir2=$IR
    printf '%s\t%s\t%s\n' "$target" "$ir1" "$ir2" >>"$results"
done
log "measured in $((SECONDS - started)) s"

# --- report ----------------------------------------------------------------------------------------
echo
python3 - "$results" "$N1" "$N2" <<'EOF'
import sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
n1, n2 = int(sys.argv[2]), int(sys.argv[3])
names = {
    "nginx": "nginx proxy_pass",
    "hyper_floor": "hyper floor (examples/hyper_floor)",
    "lfguard": "lfguard (verify + replay + log)",
}
per = {target: (int(ir2) - int(ir1)) / (n2 - n1) for target, ir1, ir2 in rows}
print("| proxy (one worker) | instructions per request | vs nginx |")
print("|---|---:|---:|")
for target, _, _ in rows:
    print(f"| {names[target]} | {per[target]:,.0f} | {per[target] / per['nginx']:.2f}× |")
EOF
echo
echo "Instructions per request = (Ir($N2 requests) - Ir($N1 requests)) / $((N2 - N1)), user space of the" \
    "proxy's process only, counted by $(valgrind --version) --tool=callgrind; load: lfguard send," \
    "--concurrency $CONCURRENCY, distinct signed callbacks over kept-alive connections; backend: nginx" \
    "return 200 '{}' ($("$NGINX" -v 2>&1 | sed 's|.*/||'))."
