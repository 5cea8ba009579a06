#!/usr/bin/env bash
# Throughput and latency of lfguard against a plain nginx reverse proxy, a bare hyper proxy and
# the backend alone, on loopback only.
#
#   bench/compare.sh                       # 3 rounds x 10 s x 4 targets, 64 connections
#   DURATION=5s ROUNDS=1 bench/compare.sh  # quicker
#   TLS=1 bench/compare.sh                 # over TLS: lfguard and nginx ending TLS with the same
#                                          # certificate (2 rounds x 5 s by default, ~2 minutes)
#
# Environment: DURATION (per target and round, default 10s), ROUNDS (3), CONNECTIONS (64),
# WRK_THREADS (2), WARMUP (2s per target before the rounds), POOL (pre-signed requests per round,
# default max(200000, 60000 x DURATION seconds)), SEND_COUNT (20000), SEND_CONCURRENCY (64),
# STARTS (start-to-ready samples, 5), KEEP_TMP=1 keeps the temporary directory.
#
# What runs: (a) nginx answering `return 200 '{}'` (the backend), (b) nginx as a plain
# proxy_pass reverse proxy in front of it, (c) the "hyper floor" (examples/hyper_floor.rs): the same
# hyper server and lfguard upstream pool on one current-thread worker, with no verification, replay
# claim, log line or metrics, so floor vs nginx is what the HTTP stack costs and lfguard vs floor
# what lfguard's own work costs, (d) lfguard in front of the same backend with verification and
# replay protection on. All three proxies get one worker (nginx worker_processes 1, lfguard
# server.worker_threads = 1). Every round runs direct -> nginx -> floor -> lfguard with wrk and the
# same pre-signed, distinct requests (the backend, nginx and the floor ignore the signature
# headers). A body is never sent twice to lfguard: each round has its own pool, each wrk thread its
# own share of it, and lfguard's /metrics must show zero duplicates, otherwise the round is flagged.
#
# TLS=1 compares lfguard with [server.tls] and nginx with `listen ssl`, both presenting the same
# ECDSA P-256 certificate (a throwaway CA made with openssl) in front of the same nginx backend,
# one worker each: full handshakes per second with `openssl s_time -new` (one client, handshake
# only) and the server CPU each costs (from /proc/PID/stat); callbacks over kept-alive TLS
# connections (wrk, CONNECTIONS); and callbacks on a new TLS connection each (wrk with
# `Connection: close`, TLS_CLOSE_CONNECTIONS, default 16), the way a sender without keep-alive
# calls. wrk and s_time do not resume sessions: every new connection is a full handshake.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=bench/common.sh
source "$here/common.sh"

TLS=${TLS:-0}
if [[ $TLS == 1 ]]; then
    # Enough distinct bodies for a round of kept-alive TLS callbacks to lfguard.
    POOL=${POOL:-150000}
    DURATION=${DURATION:-5s}
    ROUNDS=${ROUNDS:-2}
    WARMUP=${WARMUP:-1s}
    STARTS=${STARTS:-1}
fi
TLS_CLOSE_CONNECTIONS=${TLS_CLOSE_CONNECTIONS:-16}
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
WRK_THREADS=${WRK_THREADS:-2}
WARMUP=${WARMUP:-2s}
SEND_COUNT=${SEND_COUNT:-20000}
SEND_CONCURRENCY=${SEND_CONCURRENCY:-64}
STARTS=${STARTS:-5}
DUR_S=$(secs "$DURATION")
WARM_S=$(secs "$WARMUP")
POOL=${POOL:-$((DUR_S * 60000 > 200000 ? DUR_S * 60000 : 200000))}
SECRET=bench-secret
PARTNER=P123456
unset RUST_LOG

log() { printf '[compare] %s\n' "$*" >&2; }

# --- tools -------------------------------------------------------------------------------------
install_missing nginx=nginx-light wrk=wrk python3=python3 openssl=openssl

log "building lfguard and the hyper floor (dist profile)"
(cd "$root" && cargo build --profile dist --quiet --bin lfguard --example hyper_floor)
LFGUARD=$root/target/dist/lfguard
FLOOR=$root/target/dist/examples/hyper_floor

# --- processes and cleanup ------------------------------------------------------------------------
start_tmp compare

read -r BACKEND_PORT NGINX_PORT FLOOR_PORT LF_PORT ADMIN_PORT < <(free_ports 5)

# The certificate both TLS endpoints present (TLS=1): a CA and a server certificate it signed.
if [[ $TLS == 1 ]]; then
    mkdir -p "$tmp/tls"
    (
        cd "$tmp/tls"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
            -subj "/CN=bench CA" -keyout ca.key -out ca.pem 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
            -keyout key.pem -out server.csr 2>/dev/null
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile server.ext -out cert.pem 2>/dev/null
    )
fi

wait_port() { # port, what
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    log "$2 did not open port $1"
    exit 1
}

http_get() { # url -> body on stdout, fails unless 200
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1"
}

nginx_conf() { # name, body of the http block
    mkdir -p "$tmp/$1"
    cat >"$tmp/$1/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $tmp/$1/nginx.pid;
error_log $tmp/$1/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $tmp/$1/body;
    proxy_temp_path $tmp/$1/proxy;
    fastcgi_temp_path $tmp/$1/fastcgi;
    uwsgi_temp_path $tmp/$1/uwsgi;
    scgi_temp_path $tmp/$1/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
$2
}
EOF
}

nginx_conf backend "    server {
        listen 127.0.0.1:$BACKEND_PORT backlog=4096;
        location / {
            default_type application/json;
            return 200 '{}';
        }
    }"
# nginx keeps as many idle upstream connections as there are clients (as lfguard's pool can), so
# it does not open and close backend connections under load.
nginx_conf proxy "    upstream backend {
        server 127.0.0.1:$BACKEND_PORT;
        keepalive $((CONNECTIONS > 64 ? CONNECTIONS : 64));
    }
    server {
        listen 127.0.0.1:$NGINX_PORT $([[ $TLS == 1 ]] && echo ssl) backlog=4096;
        $([[ $TLS == 1 ]] && echo "ssl_certificate $tmp/tls/cert.pem; ssl_certificate_key $tmp/tls/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;")
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"

cat >"$tmp/lfguard.toml" <<EOF
# lfguard for the comparison: one worker thread, verification and replay protection on.
[server]
listen = "127.0.0.1:$LF_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
worker_threads = 1
max_connections = 4096

[upstream]
url = "http://127.0.0.1:$BACKEND_PORT"

[replay]
# The shipped default: the LRU store fills up within seconds here and then evicts as it would in
# production, so peak RSS is what a default deployment reaches.
store = "memory"
capacity = 50000

[log]
# The shipped default: one JSON event per request (to a file here).
level = "info"

[partners.$PARTNER]
secrets = ["$SECRET"]
EOF
if [[ $TLS == 1 ]]; then
    cat >>"$tmp/lfguard.toml" <<EOF

[server.tls]
cert_file = "$tmp/tls/cert.pem"
key_file = "$tmp/tls/key.pem"
EOF
fi

raise_fd_limit 1048576

"$NGINX" -e "$tmp/backend/error.log" -p "$tmp/backend" -c "$tmp/backend/nginx.conf" &
pids+=($!)
wait_port "$BACKEND_PORT" "nginx backend"
"$NGINX" -e "$tmp/proxy/error.log" -p "$tmp/proxy" -c "$tmp/proxy/nginx.conf" &
NGINX_PROXY_PID=$!
pids+=("$NGINX_PROXY_PID")
wait_port "$NGINX_PORT" "nginx proxy"
"$FLOOR" "127.0.0.1:$FLOOR_PORT" "http://127.0.0.1:$BACKEND_PORT" >"$tmp/floor.log" 2>&1 &
pids+=($!)
wait_port "$FLOOR_PORT" "hyper floor"

# --- lfguard start-to-ready ---------------------------------------------------------------------
log "measuring lfguard start-to-ready ($STARTS starts)"
python3 - "$LFGUARD" "$tmp/lfguard.toml" "$ADMIN_PORT" "$STARTS" >"$tmp/startup.txt" <<'EOF'
import signal, subprocess, sys, time, urllib.request
binary, config, admin, starts = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ready_ms, readyz_ms = [], []
for _ in range(starts):
    t0 = time.perf_counter()
    proc = subprocess.Popen([binary, "serve", "--config", config], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if '"message":"ready"' in line:
            ready_ms.append((time.perf_counter() - t0) * 1000)
            break
    else:
        sys.exit("lfguard exited before it was ready")
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1).status == 200:
                readyz_ms.append((time.perf_counter() - t0) * 1000)
                break
        except Exception:
            time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    proc.wait(timeout=30)
ready_ms.sort(); readyz_ms.sort()
print(f"{ready_ms[len(ready_ms)//2]:.1f} {readyz_ms[len(readyz_ms)//2]:.1f} {ready_ms[0]:.1f} {ready_ms[-1]:.1f}")
EOF
read -r READY_MS READYZ_MS READY_MIN READY_MAX <"$tmp/startup.txt"
log "start-to-ready: ready log line ${READY_MS} ms (median; min $READY_MIN, max $READY_MAX), /readyz 200 ${READYZ_MS} ms"

"$LFGUARD" serve --config "$tmp/lfguard.toml" >"$tmp/lfguard.log" 2>&1 &
LF_PID=$!
pids+=("$LF_PID")
for _ in $(seq 1 200); do
    grep -q '"message":"ready"' "$tmp/lfguard.log" && break
    kill -0 "$LF_PID" 2>/dev/null || { cat "$tmp/lfguard.log" >&2; exit 1; }
    sleep 0.05
done
http_get "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null
sleep 1
IDLE_RSS_KB=$(awk '/^VmRSS:/ {print $2}' "/proc/$LF_PID/status")
log "lfguard ready (pid $LF_PID), idle RSS $((IDLE_RSS_KB / 1024)) MiB"

# --- request pools and the wrk script -------------------------------------------------------------
gen_pool() { # file, lines, tag
    python3 "$here/gen_requests.py" --count "$2" --secret "$SECRET" --partner "$PARTNER" \
        --tag "$3" --out "$1" ${4:+--check-with "$LFGUARD"} 2>&1 | sed 's/^/[compare] /' >&2
}

wrk_script() { # pool file, tag[, close] -> script path; with `close`, Connection: close
    local script="$tmp/$2.lua"
    local close_header=""
    [[ ${3:-} == close ]] && close_header='["Connection"] = "close",'
    cat >"$script" <<EOF
-- Cycles through pre-signed requests; each wrk thread takes every ${WRK_THREADS}th line of the pool.
local pool_file, tag, nthreads = "$1", "$2", $WRK_THREADS
local threads, created = {}, 0
function setup(thread)
    thread:set("tid", created)
    created = created + 1
    table.insert(threads, thread)
end
sigs, bodies, n, i, wraps, sent = {}, {}, 0, 0, 0, 0
function init(args)
    local line_no = 0
    for line in io.lines(pool_file) do
        if line_no % nthreads == tid then
            local sig, body = line:match("^%a\t([^\t]+)\t(.*)$")
            n = n + 1
            sigs[n], bodies[n] = sig, body
        end
        line_no = line_no + 1
    end
    assert(n > 0, "empty request pool")
end
function request()
    i = i + 1
    if i > n then i, wraps = 1, wraps + 1 end
    sent = sent + 1
    return wrk.format("POST", "/callback", {
        ["Content-Type"] = "application/json",
        ["x-lf-md5"] = sigs[i],
        ["x-lf-delivery"] = tag .. "-" .. tid .. "-" .. sent,
        $close_header
    }, bodies[i])
end
function done(summary, latency, requests)
    local w, s, lines = 0, 0, 0
    for _, t in ipairs(threads) do
        w, s, lines = w + t:get("wraps"), s + t:get("sent"), lines + t:get("n")
    end
    io.write(string.format("pool: %d lines, %d requests built, pool wrapped %d times\n", lines, s, w))
end
EOF
    echo "$script"
}

metric() { # metrics text file, code -> value
    awk -v code="$2" '$1 ~ "^lfguard_requests_total\\{" && index($1, "code=\"" code "\"") {s += $2} END {print s + 0}' "$1"
}
metric_other() { # everything but forwarded
    awk '$1 ~ /^lfguard_requests_total\{/ && !index($1, "code=\"forwarded\"") {s += $2} END {print s + 0}' "$1"
}

# Parses wrk output into: req/s p99_ms non2xx socket_errors wraps
parse_wrk() {
    python3 - "$1" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
def ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
wraps = re.search(r"pool wrapped (\d+) times", text)
print(f"{rps:.1f} {ms(*p99.groups()):.3f} {int(non2xx.group(1)) if non2xx else 0} "
      f"{sum(map(int, errors.groups())) if errors else 0} {int(wraps.group(1)) if wraps else 0}")
EOF
}

# --- over TLS (TLS=1) ------------------------------------------------------------------------------
cpu_ticks() { # pid... -> their user + system clock ticks
    local pid total=0
    for pid in "$@"; do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
    done
    echo "$total"
}

tls_compare() {
    local -A url=([nginx]="https://127.0.0.1:$NGINX_PORT" [lfguard]="https://127.0.0.1:$LF_PORT")
    local -A port=([nginx]=$NGINX_PORT [lfguard]=$LF_PORT)
    local -A server=([nginx]="$(pgrep -P "$NGINX_PROXY_PID" | tr '\n' ' ')" [lfguard]=$LF_PID)
    local tick_ms=$((1000 / $(getconf CLK_TCK)))
    local round target mode tag script t0 t1 before after n rps p99 non2xx errors wraps lines clients close
    local tls_results=$tmp/tls-results.tsv
    : >"$tls_results"
    for round in $(seq 1 "$ROUNDS"); do
        for target in nginx lfguard; do
            # Full handshakes, one client at a time, nothing sent after them.
            before=$(cpu_ticks ${server[$target]})
            t0=$EPOCHREALTIME
            openssl s_time -connect "127.0.0.1:${port[$target]}" -new -time "$DUR_S" \
                >"$tmp/stime-$round-$target.txt" 2>&1
            t1=$EPOCHREALTIME
            after=$(cpu_ticks ${server[$target]})
            n=$(awk '/connections in .* real seconds/ {print $1}' "$tmp/stime-$round-$target.txt")
            [[ -n $n && $n -gt 0 ]] || { cat "$tmp/stime-$round-$target.txt" >&2; exit 1; }
            printf '%s\t%s\thandshake\t%s\t%s\n' "$round" "$target" \
                "$(python3 -c "print(f'{$n / ($t1 - $t0):.1f}')")" \
                "$(python3 -c "print(f'{($after - $before) * $tick_ms / $n:.3f}')")" >>"$tls_results"
            log "round $round $(printf '%-8s' "$target") $n full handshakes in $(python3 -c "print(f'{$t1 - $t0:.1f}')") s, server CPU $(((after - before) * tick_ms)) ms"
        done
        for mode in keepalive close; do
            # One pool per round and mode, sent to nginx first and then to lfguard, which thus
            # never gets a body twice.
            tag="tls-$mode-r$round-$$"
            if [[ $mode == keepalive ]]; then lines=$POOL clients=$CONNECTIONS close=""; else
                lines=$((POOL / 4)) clients=$TLS_CLOSE_CONNECTIONS close=close
            fi
            gen_pool "$tmp/$tag.pool" "$lines" "$tag"
            script=$(wrk_script "$tmp/$tag.pool" "$tag" "$close")
            for target in nginx lfguard; do
                if [[ $target == lfguard ]]; then
                    http_get "http://127.0.0.1:$ADMIN_PORT/metrics" >"$tmp/m-before.txt"
                fi
                wrk -t"$WRK_THREADS" -c"$clients" -d"${DUR_S}s" --latency -s "$script" "${url[$target]}" \
                    >"$tmp/tls-$round-$target-$mode.txt" 2>&1
                read -r rps p99 non2xx errors wraps < <(parse_wrk "$tmp/tls-$round-$target-$mode.txt")
                printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$target" "$mode" "$rps" "$p99" >>"$tls_results"
                log "round $round $(printf '%-8s %-9s' "$target" "$mode") $(printf '%10.1f' "$rps") req/s  p99 $(printf '%8.3f' "$p99") ms  non-2xx $non2xx  socket errors $errors"
                if [[ $target == lfguard ]]; then
                    sleep 0.5
                    http_get "http://127.0.0.1:$ADMIN_PORT/metrics" >"$tmp/m-after.txt"
                    dup=$(($(metric "$tmp/m-after.txt" duplicate) - $(metric "$tmp/m-before.txt" duplicate)))
                    other=$(($(metric_other "$tmp/m-after.txt") - $(metric_other "$tmp/m-before.txt")))
                    ((dup == 0 && other == 0)) || problems+=("round $round lfguard $mode: $dup duplicates, $other other outcomes")
                    ((wraps == 0)) || problems+=("round $round lfguard $mode: the pool wrapped (raise POOL)")
                fi
                # With Connection: close, wrk counts the connections the server closes as errors.
                if ((non2xx > 0)) || { [[ -z $close ]] && ((errors > 0)); }; then
                    problems+=("round $round $target $mode: $non2xx non-2xx, $errors socket errors")
                fi
            done
            rm -f "$tmp/$tag.pool"
        done
    done
    http_get "http://127.0.0.1:$ADMIN_PORT/metrics" >"$tmp/m-end.txt"
    local failed
    # s_time closes as soon as its side of the handshake is done, which in TLS 1.3 is before the
    # server has read the client's Finished: lfguard counts those as `closed`. Nothing else fails.
    failed=$(awk '$1 ~ /^lfguard_tls_handshake_failures_total\{/ && !index($1, "reason=\"closed\"") {s += $2} END {print s + 0}' "$tmp/m-end.txt")
    ((failed == 0)) || problems+=("lfguard counted $failed failed handshakes")

    cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
    echo
    echo "## lfguard vs nginx over TLS ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo "Machine: $(nproc) CPUs, ${cpu:-unknown CPU}; wrk $(wrk -v 2>&1 | awk 'NR==1 {print $2}'), nginx $("$NGINX" -v 2>&1 | sed 's|.*/||'), $(openssl version | awk '{print $1, $2}')."
    echo "Both end TLS with the same ECDSA P-256 certificate (TLS 1.3 negotiated), one worker each, in front of the same"
    echo "nginx backend; $ROUNDS interleaved rounds of ${DUR_S}s per measurement. Handshakes: openssl s_time -new, one client,"
    echo "handshake only; CPU is the server's user + system time over the handshakes it completed. Kept-alive: wrk -c$CONNECTIONS;"
    echo "new connection per callback: wrk -c$TLS_CLOSE_CONNECTIONS with Connection: close. lfguard verifies each callback"
    echo "and claims its replay key (distinct pre-signed bodies), nginx only proxies them."
    echo
    python3 - "$tls_results" <<'PY'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
def med(target, kind, column):
    values = [float(r[column]) for r in rows if r[1] == target and r[2] == kind]
    return statistics.median(values), values
print("| measurement | nginx | lfguard | lfguard / nginx |")
print("|---|---:|---:|---:|")
for label, kind, column, fmt in [
    ("full handshakes/s, one client", "handshake", 3, "{:,.0f}"),
    ("server CPU per handshake, ms", "handshake", 4, "{:.3f}"),
    ("kept-alive callbacks, req/s", "keepalive", 3, "{:,.0f}"),
    ("kept-alive callbacks, p99 ms", "keepalive", 4, "{:.2f}"),
    ("new TLS connection per callback, req/s", "close", 3, "{:,.0f}"),
    ("new TLS connection per callback, p99 ms", "close", 4, "{:.2f}"),
]:
    (n, nv), (l, lv) = med("nginx", kind, column), med("lfguard", kind, column)
    rounds = lambda vs: ", ".join(fmt.format(v) for v in vs)
    print(f"| {label} | {fmt.format(n)} ({rounds(nv)}) | {fmt.format(l)} ({rounds(lv)}) | {l / n:.2f} |")
PY
    if ((${#problems[@]})); then
        echo
        echo "### Problems"
        printf -- '- %s\n' "${problems[@]}"
        return 1
    fi
}

if [[ $TLS == 1 ]]; then
    problems=()
    tls_compare
    exit $?
fi

declare -A URL=(
    [direct]="http://127.0.0.1:$BACKEND_PORT"
    [nginx]="http://127.0.0.1:$NGINX_PORT"
    [floor]="http://127.0.0.1:$FLOOR_PORT"
    [lfguard]="http://127.0.0.1:$LF_PORT"
)
TARGETS=(direct nginx floor lfguard)
results=$tmp/results.tsv
: >"$results"
problems=()

run_wrk() { # target, seconds, script, output
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$2s" --latency -s "$3" "${URL[$1]}" >"$4" 2>&1
}

log "warm-up: ${WARM_S}s per target"
gen_pool "$tmp/warm.pool" "$((WARM_S * 60000 > 50000 ? WARM_S * 60000 : 50000))" "warm-$$" check
warm_script=$(wrk_script "$tmp/warm.pool" "warm-$$")
for target in "${TARGETS[@]}"; do
    run_wrk "$target" "$WARM_S" "$warm_script" "$tmp/warm-$target.txt"
done

for round in $(seq 1 "$ROUNDS"); do
    tag="r$round-$$-$(date +%s)"
    gen_pool "$tmp/$tag.pool" "$POOL" "$tag"
    script=$(wrk_script "$tmp/$tag.pool" "$tag")
    for target in "${TARGETS[@]}"; do
        [[ $target == lfguard ]] && http_get "http://127.0.0.1:$ADMIN_PORT/metrics" >"$tmp/m-before.txt"
        run_wrk "$target" "$DUR_S" "$script" "$tmp/round$round-$target.txt"
        read -r rps p99 non2xx errors wraps < <(parse_wrk "$tmp/round$round-$target.txt")
        line="round $round  $(printf '%-8s' "$target") $(printf '%10.1f' "$rps") req/s  p99 $(printf '%8.3f' "$p99") ms  non-2xx $non2xx  socket errors $errors"
        if [[ $target == lfguard ]]; then
            sleep 0.5
            http_get "http://127.0.0.1:$ADMIN_PORT/metrics" >"$tmp/m-after.txt"
            fwd=$(($(metric "$tmp/m-after.txt" forwarded) - $(metric "$tmp/m-before.txt" forwarded)))
            dup=$(($(metric "$tmp/m-after.txt" duplicate) - $(metric "$tmp/m-before.txt" duplicate)))
            other=$(($(metric_other "$tmp/m-after.txt") - $(metric_other "$tmp/m-before.txt")))
            keys=$(awk '$1 == "lfguard_replay_entries" {print $2}' "$tmp/m-after.txt")
            rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$LF_PID/status")
            line+="  | lfguard: forwarded $fwd, duplicate $dup, other outcomes $other; RSS $((rss / 1024)) MiB with $keys replay keys"
            ((dup == 0 && other == 0)) || problems+=("round $round: lfguard saw $dup duplicates and $other other outcomes (pool too small? raise POOL)")
        fi
        # Only lfguard remembers bodies; a wrapped pool would turn its requests into cheap duplicates.
        [[ $target != lfguard ]] || ((wraps == 0)) || problems+=("round $round: the request pool wrapped $wraps times under lfguard (raise POOL)")
        ((wraps == 0)) || line+="  (pool wrapped $wraps times)"
        ((non2xx == 0 && errors == 0)) || problems+=("round $round $target: $non2xx non-2xx responses, $errors socket errors")
        printf '%s\t%s\t%s\t%s\n' "$round" "$target" "$rps" "$p99" >>"$results"
        log "$line"
    done
    rm -f "$tmp/$tag.pool"
done
PEAK_RSS_KB=$(awk '/^VmHWM:/ {print $2}' "/proc/$LF_PID/status")
END_RSS_KB=$(awk '/^VmRSS:/ {print $2}' "/proc/$LF_PID/status")
http_get "http://127.0.0.1:$ADMIN_PORT/metrics" >"$tmp/m-end.txt"
REPLAY_ENTRIES=$(awk '$1 == "lfguard_replay_entries" {print $2}' "$tmp/m-end.txt")

# --- lfguard send (the project's own load generator) --------------------------------------------------
send_out=$tmp/send.txt
: >"$send_out"
for target in lfguard nginx; do
    {
        echo "lfguard send --count $SEND_COUNT --concurrency $SEND_CONCURRENCY -> $target"
        "$LFGUARD" send "${URL[$target]}/callback" --secret "$SECRET" --partner "$PARTNER" \
            --count "$SEND_COUNT" --concurrency "$SEND_CONCURRENCY" | sed 's/^/    /' ||
            echo "    (send exited non-zero: not every answer was 2xx)"
    } >>"$send_out"
done

# --- report ----------------------------------------------------------------------------------------
cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
echo
echo "## lfguard vs nginx vs hyper floor vs direct ($(date -u +%Y-%m-%dT%H:%MZ))"
echo
echo "Machine: $(nproc) CPUs, ${cpu:-unknown CPU}, $(awk '/^MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM;" \
    "wrk $(wrk -v 2>&1 | awk 'NR==1 {print $2}'), nginx $("$NGINX" -v 2>&1 | sed 's|.*/||')."
echo "Load: wrk -t$WRK_THREADS -c$CONNECTIONS -d${DUR_S}s --latency, $ROUNDS interleaved rounds (direct -> nginx -> floor -> lfguard)," \
    "POST /callback with distinct pre-signed SMS callbacks ($POOL per round; lfguard never gets a body twice," \
    "the faster runs through direct, nginx and the floor may cycle through the pool, which they cannot tell)."
echo "The hyper floor (examples/hyper_floor.rs) is lfguard's HTTP stack alone: the same hyper server and upstream pool" \
    "on one current-thread worker, with no verification, replay claim, log line or metrics. floor / nginx is what the" \
    "HTTP stack costs against nginx; lfguard / floor is what lfguard's own per-request work costs."
echo "All three proxies run one worker (nginx worker_processes 1, the floor's current-thread runtime, lfguard" \
    "server.worker_threads = 1); the backend is nginx (1 worker, return 200 '{}'); upstream keep-alive pools on all three." \
    "lfguard verifies signatures and claims replay keys (memory store, default capacity 50000) and logs one JSON event" \
    "per request (default level info, to a file); nginx runs with access_log off."
echo "All processes (wrk, backend, proxies) share the machine's $(nproc) cores."
echo
python3 - "$results" "$PEAK_RSS_KB" "$IDLE_RSS_KB" "$END_RSS_KB" "$READY_MS" "$READYZ_MS" "${REPLAY_ENTRIES:-?}" <<'EOF'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
peak, idle, end = (int(v) / 1024 for v in sys.argv[2:5])
ready, readyz, entries = sys.argv[5], sys.argv[6], sys.argv[7]
med = {}
print("| target | req/s (median) | p99 ms (median) | req/s per round | p99 ms per round |")
print("|---|---:|---:|---|---|")
labels = {"floor": "hyper floor"}
for target in ["direct", "nginx", "floor", "lfguard"]:
    rps = [float(r[2]) for r in rows if r[1] == target]
    p99 = [float(r[3]) for r in rows if r[1] == target]
    med[target] = (statistics.median(rps), statistics.median(p99))
    print(f"| {labels.get(target, target)} | {med[target][0]:,.0f} | {med[target][1]:.2f} | "
          f"{', '.join(f'{v:,.0f}' for v in rps)} | {', '.join(f'{v:.2f}' for v in p99)} |")
print()
print("| ratio | throughput | p99 |")
print("|---|---:|---:|")
for a, b in [("lfguard", "nginx"), ("lfguard", "floor"), ("floor", "nginx"), ("lfguard", "direct")]:
    print(f"| {a} / {b} | {med[a][0] / med[b][0]:.2f} | {med[a][1] / med[b][1]:.2f} |")
print()
print("| lfguard | value |")
print("|---|---:|")
print(f"| peak RSS under load (VmHWM) | {peak:.1f} MiB |")
print(f"| RSS after the rounds ({entries} replay keys held) | {end:.1f} MiB |")
if entries.isdigit() and int(entries):
    print(f"| of which per replay key, (RSS after - idle) / keys | {(end - idle) * 1048576 / int(entries):.0f} bytes |")
print(f"| idle RSS (after start, before load) | {idle:.1f} MiB |")
print(f"| start-to-ready, `ready` log line (median) | {ready} ms |")
print(f"| start-to-ready, /readyz 200 (median) | {readyz} ms |")
EOF
echo
echo "### lfguard send (signs each callback; nginx just proxies them)"
echo
echo '```'
cat "$send_out"
echo '```'
if ((${#problems[@]})); then
    echo
    echo "### Problems"
    printf -- '- %s\n' "${problems[@]}"
    exit 1
fi
