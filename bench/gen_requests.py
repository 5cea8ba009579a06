#!/usr/bin/env python3
"""Pre-signed Linksfield callbacks for the load scripts in bench/.

Writes one request a line, tab-separated: KIND <TAB> X-LF-MD5 <TAB> BODY, where KIND is
  v  a valid callback (a distinct body, correctly signed),
  f  a forgery: a random signature, a body altered after signing, or a signature made with a
     wrong secret (the three rotate),
  r  a replay: an exact copy (body and signature) of an earlier valid line; the load script sends
     it under a new x-lf-delivery id, as an attacker who captured it would.
Bodies are compact JSON objects with string values only, so the canonical string of the signature scheme is
simply the sorted top-level `key=value` pairs joined by `&`; `&secret` is appended and the
x-lf-md5 value is base64 of the lowercase hex md5 digest (Linksfield's worked example) or, with
--encoding raw, of the 16 raw digest bytes. Bodies never contain a tab or a newline.

Signing hundreds of thousands of bodies with `lfguard sign` one process at a time is far too slow;
this does it in-process. `--check-with PATH/TO/lfguard` cross-checks the first lines with
`lfguard sign` (and `lfguard verify` for a forgery) so the two implementations cannot drift.
"""

import argparse
import base64
import hashlib
import json
import os
import random
import subprocess
import sys
import time


def canonical(body: dict) -> str:
    return "&".join(f"{key}={body[key]}" for key in sorted(body, key=lambda k: k.encode()))


def sign(body: dict, secret: str, encoding: str) -> str:
    digest = hashlib.md5((canonical(body) + "&" + secret).encode("utf-8"))
    payload = digest.hexdigest().encode() if encoding == "hex" else digest.digest()
    return base64.b64encode(payload).decode("ascii")


MESSAGES = [
    "device status: {n}",
    "battery {n}% ok",
    "GPS fix lat=22.{n} lon=114.{n}",
    "\u8bbe\u5907\u72b6\u6001 {n}",  # non-ASCII: sent \u-escaped, signed decoded
    "alarm & reset #{n}",  # '&' and '=' inside values are signed as-is
    "k=v {n}",
]


def body_for(partner: str, tag: str, seq: int, received_at: str) -> dict:
    # Member order as Linksfield sends it (not sorted), so the verifier has to sort.
    return {
        "partner_code": partner,
        "sim_id": f"8986{seq:016d}",
        "imsi": f"46000{seq % 10**10:010d}",
        "text_message": MESSAGES[seq % len(MESSAGES)].format(n=seq) + f" [{tag}]",
        "received_at": received_at,
    }


def dump(body: dict) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=True)


def generate(args):
    rng = random.Random(args.seed)
    tag = args.tag or f"{int(time.time() * 1000):x}{os.getpid():x}"
    received_at = str(int(time.time() * 1000))
    # (signature, body text) of the valid lines so far, by line number modulo --stride, for replays
    valid = [[] for _ in range(args.stride)]
    forged_kind = 0
    for seq in range(args.count):
        draw = rng.random()
        if draw < args.forged:
            body = body_for(args.partner, tag, seq, received_at)
            if forged_kind == 0:  # a random "signature" of the right shape
                sig = base64.b64encode(rng.getrandbits(128).to_bytes(16, "big").hex().encode()).decode()
            elif forged_kind == 1:  # signed, then a member changed
                sig = sign(body, args.secret, args.encoding)
                body["text_message"] = "forged " + body["text_message"]
            else:  # signed with a secret that is not the partner's
                sig = sign(body, args.secret + "-wrong", args.encoding)
            forged_kind = (forged_kind + 1) % 3
            yield "f", sig, dump(body)
        elif draw < args.forged + args.replay and len(valid[seq % args.stride]) >= args.replay_lag[0]:
            # A copy of a valid line lagging MIN..MAX valid lines behind among the lines with the
            # same number modulo --stride (the share of one load thread): a short lag makes copies
            # that arrive while the first is in flight, a long one copies of delivered callbacks.
            low, high = args.replay_lag
            same = valid[seq % args.stride]
            sig, text = same[rng.randrange(max(0, len(same) - high), len(same) - low + 1)]
            yield "r", sig, text
        else:
            body = body_for(args.partner, tag, seq, received_at)
            sig = sign(body, args.secret, args.encoding)
            text = dump(body)
            valid[seq % args.stride].append((sig, text))
            yield "v", sig, text


def check_with(binary: str, lines, secret: str):
    """Cross-checks a few generated signatures against the lfguard CLI."""
    checked = 0
    for kind, sig, text in lines:
        if kind == "v" and checked < 3:
            out = subprocess.run(
                [binary, "sign", "--secret", secret, text],
                check=True, capture_output=True, text=True,
            ).stdout.strip()
            if out != sig:
                sys.exit(f"gen_requests: signature mismatch with `lfguard sign` for {text}: {sig} != {out}")
            checked += 1
        if kind == "f":
            rc = subprocess.run(
                [binary, "verify", "--secret", secret, "--signature", sig, text],
                capture_output=True,
            ).returncode
            if rc != 1:
                sys.exit(f"gen_requests: `lfguard verify` did not reject a forgery: {text}")
    if checked == 0:
        sys.exit("gen_requests: no valid line to check")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200_000, help="lines to write (default 200000)")
    parser.add_argument("--secret", default="bench-secret")
    parser.add_argument("--partner", default="P123456")
    parser.add_argument("--forged", type=float, default=0.0, help="fraction of forgeries (0..1)")
    parser.add_argument("--replay", type=float, default=0.0, help="fraction of replays (0..1)")
    parser.add_argument("--replay-lag", default="1,1000", metavar="MIN,MAX",
                        help="a replay copies a valid line MIN..MAX valid lines back (default 1,1000)")
    parser.add_argument("--stride", type=int, default=1,
                        help="replays copy only lines with the same number modulo STRIDE: set it to the"
                        " number of load threads that split the pool by line number (default 1)")
    parser.add_argument("--encoding", choices=["hex", "raw"], default="hex")
    parser.add_argument("--tag", default="", help="makes bodies distinct from other runs (default: time+pid)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="-", help="output file (default stdout)")
    parser.add_argument("--valid-sigs", help="also write the signatures of valid lines here, one a line")
    parser.add_argument("--check-with", metavar="LFGUARD", help="cross-check with `LFGUARD sign`/`verify`")
    args = parser.parse_args()
    try:
        args.replay_lag = tuple(int(v) for v in args.replay_lag.split(","))
        assert len(args.replay_lag) == 2 and 1 <= args.replay_lag[0] <= args.replay_lag[1]
    except (ValueError, AssertionError):
        parser.error("--replay-lag takes MIN,MAX with 1 <= MIN <= MAX")
    if args.stride < 1:
        parser.error("--stride must be at least 1")
    if not (0 <= args.forged <= 1 and 0 <= args.replay <= 1 and args.forged + args.replay <= 1):
        parser.error("--forged and --replay must be fractions adding up to at most 1")

    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="ascii", buffering=1 << 20)
    sigs = open(args.valid_sigs, "w", encoding="ascii") if args.valid_sigs else None
    counts = {"v": 0, "f": 0, "r": 0}
    head = []
    for kind, sig, text in generate(args):
        counts[kind] += 1
        out.write(f"{kind}\t{sig}\t{text}\n")
        if sigs and kind == "v":
            sigs.write(sig + "\n")
        if args.check_with and len(head) < 64:
            head.append((kind, sig, text))
    if out is not sys.stdout:
        out.close()
    if sigs:
        sigs.close()
    if args.check_with:
        check_with(args.check_with, head, args.secret)
    print(
        f"gen_requests: {args.count} lines: {counts['v']} valid, {counts['f']} forged, {counts['r']} replays"
        + (" (cross-checked with lfguard sign/verify)" if args.check_with else ""),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
