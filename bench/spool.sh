#!/usr/bin/env bash
# Spool mode against forward mode on the same run, and how long a spool of DRAIN_COUNT callbacks
# takes to empty once the backend is back. Loopback only.
#
#   bench/spool.sh                         # 3 rounds x 10 s x 2 modes, 64 connections; 10,000 drained
#   DURATION=5s ROUNDS=1 bench/spool.sh    # quicker
#
# Environment: DURATION (per mode and round, default 10s), ROUNDS (3), CONNECTIONS (64),
# WRK_THREADS (2), POOL (pre-signed requests per round, default max(200000, 60000 x DURATION
# seconds)), DRAIN_COUNT (10000), SPOOL_PARENT (where the spools live; default target/bench-spool,
# on the repository's disk: /tmp may be a tmpfs, where an fsync costs nothing), LFGUARD (a binary
# to measure instead of building target/dist/lfguard), KEEP_TMP=1.
#
# What runs: nginx answering `return 200 '{}'` (the backend); lfguard in forward mode and lfguard in
# spool mode (SQLite spool), each with one worker thread, verification and replay protection on.
# Every round sends the same pre-signed, distinct callbacks with wrk to forward mode, then to spool
# mode, then waits until spool mode's worker has delivered what it accepted, so that its deliveries
# do not share the CPU with the next round's forward mode. Spool mode's throughput is that of
# acceptance (each callback fsynced, with group commit), measured while its worker delivers to the
# same backend. Then the drain: a third lfguard in spool mode in front of a port where nothing
# listens takes DRAIN_COUNT callbacks (`lfguard send`), the backend starts there, and the time from
# its start to an empty spool is measured (delivery.backoff_max = 1s, so lfguard notices the backend
# within a second).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=bench/common.sh
source "$here/common.sh"

DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
WRK_THREADS=${WRK_THREADS:-2}
DRAIN_COUNT=${DRAIN_COUNT:-10000}
DUR_S=$(secs "$DURATION")
POOL=${POOL:-$((DUR_S * 60000 > 200000 ? DUR_S * 60000 : 200000))}
SPOOL_PARENT=${SPOOL_PARENT:-$root/target/bench-spool}
SECRET=bench-secret
PARTNER=P123456
unset RUST_LOG

log() { printf '[spool] %s\n' "$*" >&2; }

install_missing nginx=nginx-light wrk=wrk python3=python3

if [[ -z ${LFGUARD:-} ]]; then
    log "building lfguard (dist profile)"
    (cd "$root" && cargo build --profile dist --quiet --bin lfguard)
    LFGUARD=$root/target/dist/lfguard
fi

start_tmp spool
mkdir -p "$SPOOL_PARENT"
spools=$(mktemp -d "$SPOOL_PARENT/run.XXXXXX")
trap 'cleanup; rm -rf "$spools"' EXIT

read -r BACKEND_PORT FWD_PORT FWD_ADMIN SPOOL_PORT SPOOL_ADMIN DRAIN_PORT DRAIN_ADMIN LATE_PORT < <(free_ports 8)

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

pending() { # admin port -> callbacks waiting in that lfguard's spool
    http_get "http://127.0.0.1:$1/spool" | python3 -c 'import json, sys; print(json.load(sys.stdin)["pending"])'
}

backend() { # name, port: nginx answering 200 {} on the port
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
    server {
        listen 127.0.0.1:$2 backlog=4096;
        location / {
            default_type application/json;
            return 200 '{}';
        }
    }
}
EOF
    "$NGINX" -e "$tmp/$1/error.log" -p "$tmp/$1" -c "$tmp/$1/nginx.conf" &
    pids+=($!)
    wait_port "$2" "nginx $1"
}

lfguard_config() { # file, port, admin port, upstream port, extra TOML
    cat >"$1" <<EOF
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
worker_threads = 1
max_connections = 4096

[upstream]
url = "http://127.0.0.1:$4"

[log]
level = "info"

$5

[partners.$PARTNER]
secrets = ["$SECRET"]
EOF
}

start_lfguard() { # name, config, admin port
    "$LFGUARD" serve --config "$2" >"$tmp/$1.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 200); do
        grep -q '"message":"ready"' "$tmp/$1.log" && return 0
        sleep 0.05
    done
    cat "$tmp/$1.log" >&2
    exit 1
}

raise_fd_limit 1048576
backend backend "$BACKEND_PORT"
lfguard_config "$tmp/forward.toml" "$FWD_PORT" "$FWD_ADMIN" "$BACKEND_PORT" ""
lfguard_config "$tmp/spool.toml" "$SPOOL_PORT" "$SPOOL_ADMIN" "$BACKEND_PORT" "[delivery]
mode = \"spool\"
spool_dir = \"$spools/load\""
lfguard_config "$tmp/drain.toml" "$DRAIN_PORT" "$DRAIN_ADMIN" "$LATE_PORT" "[delivery]
mode = \"spool\"
spool_dir = \"$spools/drain\"
backoff_max = \"1s\""
start_lfguard forward "$tmp/forward.toml"
start_lfguard spool "$tmp/spool.toml"
start_lfguard drain "$tmp/drain.toml"

# --- request pools and the wrk script (as bench/compare.sh) ----------------------------------------
gen_pool() { # file, lines, tag
    python3 "$here/gen_requests.py" --count "$2" --secret "$SECRET" --partner "$PARTNER" \
        --tag "$3" --out "$1" 2>&1 | sed 's/^/[spool] /' >&2
}

wrk_script() { # pool file, tag -> script path
    local script="$tmp/$2.lua"
    cat >"$script" <<EOF
local pool_file, tag, nthreads = "$1", "$2", $WRK_THREADS
local created = 0
function setup(thread)
    thread:set("tid", created)
    created = created + 1
end
sigs, bodies, n, i, sent = {}, {}, 0, 0, 0
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
end
function request()
    i = i + 1
    if i > n then i = 1 end
    sent = sent + 1
    return wrk.format("POST", "/callback", {
        ["Content-Type"] = "application/json",
        ["x-lf-md5"] = sigs[i],
        ["x-lf-delivery"] = tag .. "-" .. tid .. "-" .. sent,
    }, bodies[i])
end
EOF
    echo "$script"
}

parse_wrk() { # wrk output -> req/s p99_ms non2xx socket_errors
    python3 - "$1" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
def ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
print(f"{rps:.1f} {ms(*p99.groups()):.3f} {int(non2xx.group(1)) if non2xx else 0} "
      f"{sum(map(int, errors.groups())) if errors else 0}")
EOF
}

outcomes() { # admin port -> "code=count ..." of lfguard_requests_total
    http_get "http://127.0.0.1:$1/metrics" |
        awk -F'[{}"]' '$1 == "lfguard_requests_total" {split($0, v, " "); c[$3] += v[2]} END {for (k in c) printf "%s=%d ", k, c[k]}'
}

declare -A URL=([forward]="http://127.0.0.1:$FWD_PORT" [spool]="http://127.0.0.1:$SPOOL_PORT")
results=$tmp/results.tsv
: >"$results"
problems=()

log "warm-up"
gen_pool "$tmp/warm.pool" 120000 "warm-$$"
warm=$(wrk_script "$tmp/warm.pool" "warm-$$")
for mode in forward spool; do
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d2s -s "$warm" "${URL[$mode]}" >/dev/null 2>&1
done

for round in $(seq 1 "$ROUNDS"); do
    tag="r$round-$$-$(date +%s)"
    gen_pool "$tmp/$tag.pool" "$POOL" "$tag"
    script=$(wrk_script "$tmp/$tag.pool" "$tag")
    for mode in forward spool; do
        # The spool's worker delivers the previous round's backlog first, alone.
        started=$(date +%s.%N)
        while (($(pending "$SPOOL_ADMIN") > 0)); do sleep 0.1; done
        waited=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$started" "$(date +%s.%N)")
        wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DUR_S}s" --latency -s "$script" "${URL[$mode]}" >"$tmp/round$round-$mode.txt" 2>&1
        read -r rps p99 non2xx errors < <(parse_wrk "$tmp/round$round-$mode.txt")
        log "round $round  $(printf '%-8s' "$mode") $(printf '%10.1f' "$rps") req/s  p99 $(printf '%8.3f' "$p99") ms  non-2xx $non2xx  socket errors $errors  (waited ${waited}s for the spool to empty)"
        ((non2xx == 0 && errors == 0)) || problems+=("round $round $mode: $non2xx non-2xx answers, $errors socket errors")
        printf '%s\t%s\t%s\t%s\n' "$round" "$mode" "$rps" "$p99" >>"$results"
    done
    rm -f "$tmp/$tag.pool"
done
while (($(pending "$SPOOL_ADMIN") > 0)); do sleep 0.1; done
FORWARD_OUTCOMES=$(outcomes "$FWD_ADMIN")
SPOOL_OUTCOMES=$(outcomes "$SPOOL_ADMIN")
SPOOL_DELIVERED=$(http_get "http://127.0.0.1:$SPOOL_ADMIN/metrics" | awk '$1 == "lfguard_spool_deliveries_total{result=\"delivered\"}" {print $2}')

# --- the drain -------------------------------------------------------------------------------------------
log "drain: $DRAIN_COUNT callbacks into a spool whose backend is down"
"$LFGUARD" send "http://127.0.0.1:$DRAIN_PORT/callback" --secret "$SECRET" --partner "$PARTNER" \
    --count "$DRAIN_COUNT" --concurrency 64 >"$tmp/drain-send.txt"
grep -q "200=$DRAIN_COUNT" "$tmp/drain-send.txt" || problems+=("drain: not every callback was accepted: $(tr '\n' ' ' <"$tmp/drain-send.txt")")
ACCEPT_RATE=$(awk '/^throughput:/ {print $2}' "$tmp/drain-send.txt")
WAITING=$(pending "$DRAIN_ADMIN")
log "drain: $WAITING callbacks waiting; starting the backend"
t0=$(date +%s.%N)
backend late "$LATE_PORT"
while (($(pending "$DRAIN_ADMIN") > 0)); do sleep 0.05; done
t1=$(date +%s.%N)
DRAIN_S=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$t1")
log "drain: empty ${DRAIN_S}s after the backend started"
FS=$(df -T "$spools" | awk 'NR == 2 {print $2}')

# --- report ----------------------------------------------------------------------------------------
cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
echo
echo "## spool mode vs forward mode ($(date -u +%Y-%m-%dT%H:%MZ))"
echo
echo "Machine: $(nproc) CPUs, ${cpu:-unknown CPU}; the spools on $FS. Load: wrk -t$WRK_THREADS -c$CONNECTIONS -d${DUR_S}s --latency," \
    "$ROUNDS rounds of forward then spool with the same distinct pre-signed callbacks ($POOL per round), one partner;" \
    "each lfguard one worker thread; backend nginx return 200 '{}'."
echo
python3 - "$results" "$DRAIN_COUNT" "$WAITING" "$DRAIN_S" "$ACCEPT_RATE" <<'EOF'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
count, waiting, drain, accept = sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
med = {}
print("| mode | req/s (median) | p99 ms (median) | req/s per round | p99 ms per round |")
print("|---|---:|---:|---|---|")
for mode in ["forward", "spool"]:
    rps = [float(r[2]) for r in rows if r[1] == mode]
    p99 = [float(r[3]) for r in rows if r[1] == mode]
    med[mode] = (statistics.median(rps), statistics.median(p99))
    print(f"| {mode} | {med[mode][0]:,.0f} | {med[mode][1]:.2f} | "
          f"{', '.join(f'{v:,.0f}' for v in rps)} | {', '.join(f'{v:.2f}' for v in p99)} |")
print()
print(f"spool / forward: throughput {med['spool'][0] / med['forward'][0]:.2f}, p99 {med['spool'][1] / med['forward'][1]:.2f}")
print()
print(f"Drain: {waiting} of {count} callbacks waiting (accepted at {accept} req/s by `lfguard send`, backend down);"
      f" the spool was empty {drain:.2f} s after the backend started ({int(waiting) / drain:,.0f} deliveries/s).")
EOF
echo
echo "Outcomes: forward lfguard: $FORWARD_OUTCOMES; spool lfguard: $SPOOL_OUTCOMES(delivered ${SPOOL_DELIVERED:-?})"
if ((${#problems[@]})); then
    echo
    echo "### Problems"
    printf -- '- %s\n' "${problems[@]}"
    exit 1
fi
