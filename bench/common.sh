# Shared by the bench scripts, which source it after defining `log`: the tools they install, the
# temporary directory and the processes they clean up, free loopback ports. Not run on its own.
# shellcheck shell=bash

secs() { # 10 | 10s | 2m -> seconds
    case $1 in
    *m) echo $((${1%m} * 60)) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
    esac
}

# install_missing COMMAND=PACKAGE ...: installs with apt-get the packages whose command is missing,
# and sets NGINX to nginx's path (Debian puts it in /usr/sbin, which may not be on PATH).
install_missing() {
    local pair need=()
    for pair in "$@"; do
        command -v "${pair%%=*}" >/dev/null || [[ -x /usr/sbin/${pair%%=*} ]] || need+=("${pair#*=}")
    done
    if ((${#need[@]})); then
        log "installing ${need[*]} with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
        # The Debian nginx package may start a system nginx on :80; the bench scripts do not use it.
    fi
    # shellcheck disable=SC2034 # used by the scripts that source this file
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
}

# start_tmp NAME: a temporary directory in $tmp. At exit the processes whose pids the script put
# in `pids` are stopped and the directory is removed (KEEP_TMP=1 keeps it).
start_tmp() {
    tmp=$(mktemp -d "/tmp/lfguard-$1.XXXXXX")
    pids=()
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${KEEP_TMP:-0} == 1 ]]; then log "kept $tmp"; else rm -rf "$tmp"; fi
}

free_ports() { # count -> that many free loopback ports, space-separated
    python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])' "$1"
}

# raise_fd_limit WANT: as many open files as the hard limit allows, up to WANT (`ulimit -n` tells
# what was granted). Called in the script's own shell, not in a command substitution.
raise_fd_limit() {
    local hard want=$1
    hard=$(ulimit -Hn)
    [[ $hard == unlimited ]] || ((hard >= want)) || want=$hard
    ulimit -n "$want" 2>/dev/null || true
}
