#!/bin/sh
# certbot deploy hook: hands lfguard a renewed certificate and has it re-read it (docs/tls.md).
# Install as /etc/letsencrypt/renewal-hooks/deploy/lfguard.sh, mode 0755. certbot runs it after
# each renewal with RENEWED_LINEAGE=/etc/letsencrypt/live/NAME; run it once by hand the same way.
#
# certbot keeps the private key readable by root only. The hook copies the full chain and the
# key into LFGUARD_TLS_DIR (default /etc/lfguard/tls), owned by root and readable by the group
# LFGUARD_TLS_GROUP (default lfguard-tls), which the service joins (SupplementaryGroups= in
# config/lfguard-tls.conf). Each file is written beside its place and renamed into it, so lfguard
# never reads half a file; it re-reads both on the reload (LFGUARD_RELOAD, default
# `systemctl reload lfguard`, which sends SIGHUP), and within reload_interval without it.
set -eu

: "${RENEWED_LINEAGE:?certbot sets RENEWED_LINEAGE to the renewed certificate's directory}"
dir=${LFGUARD_TLS_DIR:-/etc/lfguard/tls}
group=${LFGUARD_TLS_GROUP:-lfguard-tls}
reload=${LFGUARD_RELOAD:-systemctl reload lfguard}

for name in fullchain.pem privkey.pem; do
    cp "$RENEWED_LINEAGE/$name" "$dir/.$name.new"
    chgrp "$group" "$dir/.$name.new"
    chmod 0640 "$dir/.$name.new"
    mv -f "$dir/.$name.new" "$dir/$name"
done
$reload
