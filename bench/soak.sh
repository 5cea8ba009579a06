#!/usr/bin/env bash
# Soak: 1,000 concurrent connections through lfguard (dist profile) for DURATION with a mix of
# valid, forged and replayed callbacks, on loopback only. Exits non-zero when a check fails.
#
#   bench/soak.sh                 # 60 s
#   DURATION=20s bench/soak.sh
#
# Environment: DURATION (default 60s), CONNECTIONS (1000), WRK_THREADS (2), POOL (pre-generated
# requests, default 100000), FORGED (fraction, 0.2), REPLAY (fraction, 0.2), RSS_TOLERANCE_PCT (15:
# allowed RSS growth from the end of warm-up to the end of the run; warm-up ends a third into the run
# and not before the replay store is full, i.e. the pool's first pass is done), KEEP_TMP=1.
#
# The pool (bench/gen_requests.py) holds valid callbacks, forgeries (random signature, body altered
# after signing, wrong secret) and replays (exact copies of a valid callback 10,000-20,000 valid
# lines earlier in the same wrk thread's share of the pool, i.e. already delivered). wrk cycles
# through it, every request under a new x-lf-delivery id, so after the first pass valid lines come
# back as replays too. Each kind is POSTed to its own path (/soak/valid, /soak/forged, /soak/replay) so that lfguard's request log
# tells the outcome per kind. The backend is nginx answering 200 and logging, for every request
# that reached it, its path, x-lf-delivery, x-lf-md5 and x-lfguard-verified.
#
# Checks:
#   - per kind: valid -> 200 (forwarded, or duplicate once delivered); forged -> 401 bad_signature;
#     replay -> 200 duplicate (or forwarded / 409 in_flight if it overtook its original);
#     no other outcome, no other status seen by wrk, no socket errors;
#   - the backend saw no forgery: every request it got has x-lfguard-verified: true, a valid
#     signature and a non-forged path; no body reached it twice; it got exactly what lfguard
#     counted as forwarded;
#   - RSS: at the end of the run within RSS_TOLERANCE_PCT (+4 MiB) of the end of warm-up;
#   - file descriptors: back to the pre-load count once the clients are gone (the upstream pool's
#     idle timeout is set to 2 s here so its kept-alive backend connections close too).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=bench/common.sh
source "$here/common.sh"

DURATION=${DURATION:-60s}
CONNECTIONS=${CONNECTIONS:-1000}
WRK_THREADS=${WRK_THREADS:-2}
POOL=${POOL:-100000}
FORGED=${FORGED:-0.2}
REPLAY=${REPLAY:-0.2}
RSS_TOLERANCE_PCT=${RSS_TOLERANCE_PCT:-15}
DUR_S=$(secs "$DURATION")
SECRET=soak-secret
PARTNER=P123456
MAX_CONNECTIONS=$((CONNECTIONS + 100 > 1100 ? CONNECTIONS + 100 : 1100))
unset RUST_LOG

log() { printf '[soak] %s\n' "$*" >&2; }

install_missing nginx=nginx-light wrk=wrk python3=python3

# 1,000 client sockets, 1,000 accepted ones and up to 1,000 upstream ones, plus nginx's.
raise_fd_limit 65536
(($(ulimit -n) >= CONNECTIONS * 3 + 256)) || { log "ulimit -n is only $(ulimit -n)"; exit 1; }

log "building lfguard (dist profile)"
(cd "$root" && cargo build --profile dist --quiet --bin lfguard)
LFGUARD=$root/target/dist/lfguard

start_tmp soak

read -r BACKEND_PORT LF_PORT ADMIN_PORT < <(free_ports 3)

wait_port() {
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    log "$2 did not open port $1"
    exit 1
}
http_get() {
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1"
}
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# --- backend: nginx answering 200, logging what reaches it ----------------------------------------
mkdir -p "$tmp/backend"
cat >"$tmp/backend/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $tmp/backend/nginx.pid;
error_log $tmp/backend/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    log_format forwarded '\$request_uri \$http_x_lf_delivery \$http_x_lf_md5 \$http_x_lfguard_verified';
    access_log $tmp/backend/access.log forwarded buffer=256k flush=1s;
    client_body_temp_path $tmp/backend/body;
    proxy_temp_path $tmp/backend/proxy;
    fastcgi_temp_path $tmp/backend/fastcgi;
    uwsgi_temp_path $tmp/backend/uwsgi;
    scgi_temp_path $tmp/backend/scgi;
    keepalive_requests 10000000;
    server {
        listen 127.0.0.1:$BACKEND_PORT backlog=4096;
        location / {
            default_type application/json;
            return 200 '{}';
        }
    }
}
EOF
"$NGINX" -e "$tmp/backend/error.log" -p "$tmp/backend" -c "$tmp/backend/nginx.conf" &
pids+=($!)
wait_port "$BACKEND_PORT" "nginx backend"

# --- lfguard ----------------------------------------------------------------------------------------
cat >"$tmp/lfguard.toml" <<EOF
[server]
listen = "127.0.0.1:$LF_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
max_connections = $MAX_CONNECTIONS

[upstream]
url = "http://127.0.0.1:$BACKEND_PORT"
# Short, so that idle kept-alive backend connections are closed before the descriptor check.
pool_idle_timeout = "2s"

[replay]
store = "memory"
capacity = 1000000

[log]
# Request events (path, code, status) are kept: the per-kind check reads them.
level = "warn,lfguard::server=info,lfguard::request=info"

[partners.$PARTNER]
secrets = ["$SECRET"]
EOF
"$LFGUARD" serve --config "$tmp/lfguard.toml" >"$tmp/lfguard.log" 2>&1 &
LF_PID=$!
pids+=("$LF_PID")
for _ in $(seq 1 200); do
    grep -q '"message":"ready"' "$tmp/lfguard.log" && break
    kill -0 "$LF_PID" 2>/dev/null || { cat "$tmp/lfguard.log" >&2; exit 1; }
    sleep 0.05
done
http_get "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null

# --- pool and wrk script ------------------------------------------------------------------------------
python3 "$here/gen_requests.py" --count "$POOL" --secret "$SECRET" --partner "$PARTNER" \
    --forged "$FORGED" --replay "$REPLAY" --replay-lag 10000,20000 --stride "$WRK_THREADS" --out "$tmp/pool.txt" \
    --valid-sigs "$tmp/valid.sigs" --check-with "$LFGUARD" 2>&1 | sed 's/^/[soak] /' >&2

cat >"$tmp/soak.lua" <<EOF
local pool_file, nthreads = "$tmp/pool.txt", $WRK_THREADS
local paths = { v = "/soak/valid", f = "/soak/forged", r = "/soak/replay" }
local threads, created = {}, 0
function setup(thread)
    thread:set("tid", created)
    created = created + 1
    table.insert(threads, thread)
end
kinds, sigs, bodies, n, i, sent = {}, {}, {}, 0, 0, 0
sent_v, sent_f, sent_r, wraps = 0, 0, 0, 0
s200, s401, s409, s_other = 0, 0, 0, 0
function init(args)
    local line_no = 0
    for line in io.lines(pool_file) do
        if line_no % nthreads == tid then
            local kind, sig, body = line:match("^(%a)\t([^\t]+)\t(.*)$")
            n = n + 1
            kinds[n], sigs[n], bodies[n] = kind, sig, body
        end
        line_no = line_no + 1
    end
    assert(n > 0, "empty request pool")
end
function request()
    i = i + 1
    if i > n then i, wraps = 1, wraps + 1 end
    sent = sent + 1
    local kind = kinds[i]
    if kind == "v" then sent_v = sent_v + 1 elseif kind == "f" then sent_f = sent_f + 1 else sent_r = sent_r + 1 end
    return wrk.format("POST", paths[kind], {
        ["Content-Type"] = "application/json",
        ["x-lf-md5"] = sigs[i],
        ["x-lf-delivery"] = kind .. "-" .. tid .. "-" .. sent,
    }, bodies[i])
end
function response(status, headers, body)
    if status == 200 then s200 = s200 + 1
    elseif status == 401 then s401 = s401 + 1
    elseif status == 409 then s409 = s409 + 1
    else s_other = s_other + 1 end
end
function done(summary, latency, requests)
    local t = { sent_v = 0, sent_f = 0, sent_r = 0, wraps = 0, s200 = 0, s401 = 0, s409 = 0, s_other = 0 }
    for _, thread in ipairs(threads) do
        for k, v in pairs(t) do t[k] = v + thread:get(k) end
    end
    io.write(string.format("wrk-sent: valid %d forged %d replay %d (pool passes %d)\n",
        t.sent_v, t.sent_f, t.sent_r, t.wraps))
    io.write(string.format("wrk-status: 200 %d 401 %d 409 %d other %d\n", t.s200, t.s401, t.s409, t.s_other))
end
EOF

# --- run --------------------------------------------------------------------------------------------
sleep 1
FD_BEFORE=$(fds "$LF_PID")
RSS_IDLE=$(rss_kb "$LF_PID")
log "lfguard pid $LF_PID: idle RSS $((RSS_IDLE / 1024)) MiB, $FD_BEFORE fds; $CONNECTIONS connections for ${DUR_S}s"

# Once a second: time, RSS (kB), open descriptors, replay keys held.
python3 - "$LF_PID" "http://127.0.0.1:$ADMIN_PORT/metrics" >"$tmp/samples.txt" 2>/dev/null <<'EOF' &
import os, re, sys, time, urllib.request
pid, url = sys.argv[1], sys.argv[2]
while os.path.exists(f"/proc/{pid}"):
    try:
        rss = re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        metrics = urllib.request.urlopen(url, timeout=2).read().decode()
        keys = re.search(r"^lfguard_replay_entries (\d+)", metrics, re.M).group(1)
        print(f"{time.time():.3f} {rss} {fds} {keys}", flush=True)
    except Exception:
        pass
    time.sleep(1)
EOF
SAMPLER=$!
pids+=("$SAMPLER")
START=$(date +%s.%N)
wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DUR_S}s" --latency -s "$tmp/soak.lua" \
    "http://127.0.0.1:$LF_PORT" >"$tmp/wrk.txt" 2>&1 || { cat "$tmp/wrk.txt" >&2; exit 1; }
END=$(date +%s.%N)
RSS_END=$(rss_kb "$LF_PID")
RSS_PEAK=$(awk '/^VmHWM:/ {print $2}' "/proc/$LF_PID/status")

# Connections close: wait for the descriptor count to come back (at most 30 s).
FD_AFTER=$(fds "$LF_PID")
for _ in $(seq 1 60); do
    FD_AFTER=$(fds "$LF_PID")
    ((FD_AFTER <= FD_BEFORE)) && break
    sleep 0.5
done
RSS_AFTER=$(rss_kb "$LF_PID")
kill "$SAMPLER" 2>/dev/null || true
sleep 1.5 # nginx flushes its access log buffer every second
http_get "http://127.0.0.1:$ADMIN_PORT/metrics" >"$tmp/metrics.txt"

cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
echo
echo "## lfguard soak ($(date -u +%Y-%m-%dT%H:%MZ))"
echo
echo "Machine: $(nproc) CPUs, ${cpu:-unknown CPU}. wrk -t$WRK_THREADS -c$CONNECTIONS -d${DUR_S}s against lfguard" \
    "(dist profile, worker_threads = one per core, max_connections = $MAX_CONNECTIONS, memory replay store), backend nginx 200."
echo "Pool: $POOL pre-generated requests (forged fraction $FORGED, replay fraction $REPLAY), cycled; every request a new delivery id."
echo
echo '```'
sed -n '/Latency Distribution/,$p' "$tmp/wrk.txt" | grep -v '^Transfer'
echo '```'
echo
python3 - "$tmp" "$START" "$END" "$RSS_IDLE" "$RSS_END" "$RSS_PEAK" "$RSS_AFTER" "$FD_BEFORE" "$FD_AFTER" "$RSS_TOLERANCE_PCT" "$CONNECTIONS" <<'EOF'
import collections, json, re, sys
tmp = sys.argv[1]
start, end = float(sys.argv[2]), float(sys.argv[3])
rss_idle, rss_end, rss_peak, rss_after, fd_before, fd_after, tolerance = map(int, sys.argv[4:11])
failures = []
MiB = 1024.0

# Outcome per kind, from lfguard's request events.
by_kind = collections.defaultdict(collections.Counter)
kind_of = {"/soak/valid": "valid", "/soak/forged": "forged", "/soak/replay": "replay"}
with open(f"{tmp}/lfguard.log", errors="replace") as f:
    for line in f:
        if '"message":"request"' not in line:
            continue
        event = json.loads(line)
        by_kind[kind_of.get(event.get("path"), "other path")][(event["status"], event["code"])] += 1
allowed = {
    "valid": {(200, "forwarded"), (200, "duplicate")},
    "forged": {(401, "bad_signature")},
    "replay": {(200, "duplicate"), (200, "forwarded"), (409, "in_flight")},
}
print("| kind | requests | outcomes (status code: count) | unexpected |")
print("|---|---:|---|---:|")
for kind in ["valid", "forged", "replay"] + sorted(set(by_kind) - set(allowed)):
    outcomes = by_kind.get(kind, collections.Counter())
    bad = sum(n for key, n in outcomes.items() if key not in allowed.get(kind, set()))
    text = ", ".join(f"{s} {c}: {n}" for (s, c), n in sorted(outcomes.items())) or "-"
    print(f"| {kind} | {sum(outcomes.values())} | {text} | {bad} |")
    if bad:
        failures.append(f"{bad} unexpected outcomes for {kind} requests")
    if kind in allowed and not outcomes:
        failures.append(f"no {kind} request was served")
print()

# What wrk saw.
wrk = open(f"{tmp}/wrk.txt").read()
status = dict(zip(["200", "401", "409", "other"], map(int, re.search(
    r"wrk-status: 200 (\d+) 401 (\d+) 409 (\d+) other (\d+)", wrk).groups())))
sent = re.search(r"wrk-sent: .*", wrk).group(0)
errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", wrk)
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", wrk).group(1))
print(f"- wrk: {rps:,.0f} req/s; {sent}; statuses seen: {status}; "
      f"socket errors: {errors.group(0) if errors else 'none'}")
if status["other"]:
    failures.append(f"wrk saw {status['other']} responses with an unexpected status")
if errors and sum(map(int, errors.groups())):
    failures.append(f"wrk reported {errors.group(0)}")

# lfguard's own counters.
codes = collections.Counter()
for line in open(f"{tmp}/metrics.txt"):
    m = re.match(r'lfguard_requests_total\{code="([^"]+)",partner="[^"]*"\} (\d+)', line)
    if m:
        codes[m.group(1)] += int(m.group(2))
print(f"- lfguard_requests_total by code: {dict(sorted(codes.items()))}")
unexpected_codes = {c: n for c, n in codes.items() if c not in {"forwarded", "duplicate", "in_flight", "bad_signature"} and n}
if unexpected_codes:
    failures.append(f"lfguard counted unexpected outcomes {unexpected_codes}")

# What reached the backend.
valid = set(open(f"{tmp}/valid.sigs").read().split())
lines = open(f"{tmp}/backend/access.log").read().splitlines()
forgeries, seen, twice = 0, set(), 0
for line in lines:
    uri, delivery, md5, verified = (line.split(" ") + ["-"] * 4)[:4]
    if verified != "true" or md5 not in valid or uri == "/soak/forged" or delivery.startswith("f-"):
        forgeries += 1
    if md5 in seen:
        twice += 1
    seen.add(md5)
print(f"- backend received {len(lines)} requests ({len(seen)} distinct signatures); "
      f"forwarded forgeries: {forgeries}; bodies forwarded twice: {twice}")
if forgeries:
    failures.append(f"{forgeries} forged requests reached the backend")
if twice:
    failures.append(f"{twice} bodies reached the backend twice")
# When wrk stops, requests still being forwarded lose their client: lfguard drops them (the claim
# is released, nothing is counted or logged), but the backend may already have logged them.
excess = len(lines) - codes["forwarded"]
if excess:
    print(f"- {excess} requests reached the backend but are not counted as forwarded by lfguard "
          "(their client went away while they were forwarded, when wrk stopped)")
if not 0 <= excess <= int(sys.argv[11]):
    failures.append(f"backend got {len(lines)} requests, lfguard counted {codes['forwarded']} forwarded")

# Memory and descriptors.
samples = [tuple(map(float, l.split())) for l in open(f"{tmp}/samples.txt") if len(l.split()) == 4]
during = [s for s in samples if start <= s[0] <= end]
# Warm-up ends a third into the run, and not before the replay store stopped growing (the first
# pass through the pool delivered every valid body): from then on memory should stay flat.
full = int(re.search(r"^lfguard_replay_entries (\d+)", open(f"{tmp}/metrics.txt").read(), re.M).group(1))
warm = next((s for s in during if s[0] >= start + (end - start) / 3 and s[3] >= 0.995 * full), None)
if warm is None or warm[0] > end - (end - start) / 6:
    failures.append("the run is too short to judge RSS: the replay store was still filling late in the run"
                    " (raise DURATION or lower POOL)")
rss_warm = int(warm[1]) if warm else rss_end
limit = rss_warm * (1 + tolerance / 100) + 4 * 1024
fd_peak = int(max((s[2] for s in during), default=fd_after))
series = ", ".join(f"{s[1] / MiB:.0f}" for s in during[:: max(1, len(during) // 12)])
print(f"- RSS: idle {rss_idle / MiB:.1f} MiB -> after warm-up ("
      + (f"t+{warm[0] - start:.0f}s, {int(warm[3])} replay keys) " if warm else "not reached) ")
      + f"{rss_warm / MiB:.1f} MiB -> end of load {rss_end / MiB:.1f} MiB (peak {rss_peak / MiB:.1f}, "
      f"after the connections closed {rss_after / MiB:.1f}); bound {limit / MiB:.1f} MiB; series MiB: {series}")
if rss_end > limit:
    failures.append(f"RSS grew from {rss_warm / MiB:.1f} to {rss_end / MiB:.1f} MiB after warm-up")
print(f"- file descriptors: {fd_before} before, {fd_peak} at peak, {fd_after} after the run")
if fd_after > fd_before:
    failures.append(f"{fd_after - fd_before} file descriptors not released")

print()
if failures:
    print("FAIL:")
    for f in failures:
        print(f"  - {f}")
    sys.exit(1)
print("PASS: every check held")
EOF
