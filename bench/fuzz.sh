#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (libFuzzer, AddressSanitizer, debug assertions on).
#
#   bench/fuzz.sh                          # each target for 180 s
#   FUZZ_SECONDS=60 bench/fuzz.sh canonical
#
# Environment: FUZZ_SECONDS (per target, default 180), FUZZ_ARGS (extra libFuzzer flags).
# Arguments: the targets to run (default: all of canonical, pipeline).
#
# Installs the nightly toolchain (rustup, minimal profile) and cargo-fuzz when missing. Each target
# fuzzes a work corpus under fuzz/corpus/TARGET (git-ignored) seeded from fuzz/seeds/canonical/; the
# pipeline target's seeds are the same bodies behind its 6-byte header (flags, signature length,
# arrival time), in JSON/form and exact-signature variants. A crash leaves its input in
# fuzz/artifacts/TARGET/ (git-ignored); it is printed here and the script exits non-zero.
# Reproduce one with: cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
FUZZ_SECONDS=${FUZZ_SECONDS:-180}
targets=("$@")
((${#targets[@]})) || targets=(canonical pipeline)

log() { printf '[fuzz] %s\n' "$*" >&2; }

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

cd "$root"
# Resolve the fuzz crate's dependencies to the versions the project pins.
[[ -f fuzz/Cargo.lock ]] || cp Cargo.lock fuzz/Cargo.lock

seed_corpus() { # target
    local dir=fuzz/corpus/$1
    mkdir -p "$dir"
    case $1 in
    pipeline)
        python3 - fuzz/seeds/canonical "$dir" <<'EOF'
import hashlib, os, sys
seeds, out = sys.argv[1], sys.argv[2]
arrived = (1_642_385_160 - 1_577_836_800).to_bytes(4, "big")  # the seeds' timestamps
for name in sorted(os.listdir(seeds)):
    body = open(os.path.join(seeds, name), "rb").read()
    form = 1 if name.endswith(".txt") else 0
    # Layout: [flags][sig_len][arrived: 4][signature bytes][body] (see pipeline.rs).
    variants = [
        (form, b""),                                  # no signature
        (form | 0x20, b""),                           # the exact hex signature
        (form | 0x20, b"\x63"),                       # the exact raw signature (odd first
                                                      # byte; 0x63 truncates at the end: no-op)
        (form | 0x02, b"AAAAAAAAAAAAAAAAAAAAAA=="),   # a raw-length header under encoding = hex
        (form | 0x20 | 0x08, b"\x00A"),               # hex signature, first byte replaced; nulls skip
    ]
    for flags, header in variants:
        v = bytes([flags, len(header)]) + arrived + header + body
        open(os.path.join(out, hashlib.sha1(v).hexdigest()), "wb").write(v)
EOF
        ;;
    *) cp -n fuzz/seeds/canonical/* "$dir/" ;;
    esac
}

status=0
summary=()
for target in "${targets[@]}"; do
    log "building $target"
    cargo +nightly fuzz build "$target" 2>&1 | tail -n 3 >&2
    seed_corpus "$target"
    mkdir -p "fuzz/artifacts/$target"
    out=fuzz/artifacts/$target/last-run.log
    log "fuzzing $target for ${FUZZ_SECONDS}s (corpus fuzz/corpus/$target: $(find "fuzz/corpus/$target" -type f | wc -l) inputs)"
    before=$(find "fuzz/artifacts/$target" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | sort)
    rc=0
    # shellcheck disable=SC2086
    cargo +nightly fuzz run "$target" -- -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 \
        ${FUZZ_ARGS:-} >"$out" 2>&1 || rc=$?
    execs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$out" | tail -1)
    rate=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+).*/\1/p' "$out" | tail -1)
    rss=$(sed -nE 's/^stat::peak_rss_mb: *([0-9]+).*/\1/p' "$out" | tail -1)
    last=$(grep -E '^#[0-9]+' "$out" | tail -1 || true)
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
    corp=$(sed -nE 's/.* corp: ([0-9]+\/[0-9]+[a-zA-Z]*).*/\1/p' <<<"$last")
    line="$target: ${execs:-?} execs in ${FUZZ_SECONDS}s, ${rate:-?} exec/s, cov ${cov:-?}, ft ${ft:-?}, corpus ${corp:-?}, peak RSS ${rss:-?} MB"
    after=$(find "fuzz/artifacts/$target" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | sort)
    new=$(comm -13 <(echo "$before") <(echo "$after") | sed '/^$/d')
    if ((rc != 0)) || [[ -n $new ]]; then
        status=1
        line+=" -- FAILED (exit $rc)"
        echo "=== $target failed; the end of libFuzzer's output:"
        grep -vE '^#[0-9]+' "$out" | tail -n 40
        for artifact in $new; do
            echo "--- input $artifact ($(stat -c %s "$artifact") bytes), as a Rust byte string:"
            python3 -c 'import sys; d = open(sys.argv[1], "rb").read(); print("b\"" + "".join(chr(c) if 32 <= c < 127 and c not in (34, 92) else "\\x%02x" % c for c in d[:2000]) + "\"")' "$artifact"
        done
    else
        line+=", no crash"
    fi
    summary+=("$line")
    log "$line"
done

echo
echo "## fuzz summary (FUZZ_SECONDS=$FUZZ_SECONDS, $(nproc) CPUs, $(rustup run nightly rustc --version))"
printf -- '- %s\n' "${summary[@]}"
exit "$status"
