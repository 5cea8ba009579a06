#!/usr/bin/env python3
"""Prints the x-lf-md5 value of a Linksfield callback body, as lfguard verifies it.

usage: sign.py SECRET [BODY_FILE] [--raw]
The body is read from BODY_FILE, or from standard input. Python 3.8 or later, standard library only.

json.loads() cannot be used as is: it turns 1.50 into 1.5 and re-spaces nested values, and the
signature covers numbers and nested values exactly as written. So each top-level value is decoded
only to find where it ends, and signed as its text in the body.
"""
import base64
import hashlib
import json
import sys

WHITESPACE = " \t\n\r"


def skip(text, i):
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def without_whitespace(raw):
    """A nested value as written, with the whitespace outside its strings removed."""
    out, in_string, escaped = [], False, False
    for ch in raw:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch in WHITESPACE:
            continue
        elif ch == '"':
            in_string = True
        out.append(ch)
    return "".join(out)


def members(text):
    """(key, signed text) of each top-level member; None for null."""
    decoder, out = json.JSONDecoder(), []
    i = skip(text, 0)
    if text[i : i + 1] != "{":
        sys.exit("sign.py: the body is not a JSON object")
    i = skip(text, i + 1)
    while text[i : i + 1] != "}":
        key, i = decoder.raw_decode(text, i)
        i = skip(text, i)
        if not isinstance(key, str) or text[i : i + 1] != ":":
            sys.exit("sign.py: the body is not a JSON object")
        start = skip(text, i + 1)
        value, i = decoder.raw_decode(text, start)
        raw = text[start:i]
        if isinstance(value, str):
            signed = value  # the decoded text: no quotes, no escapes
        elif isinstance(value, (dict, list)):
            signed = without_whitespace(raw)
        elif value is None:
            signed = None
        else:
            signed = raw  # numbers, true and false: the token as written
        out.append((key, signed))
        i = skip(text, i)
        if text[i : i + 1] == ",":
            i = skip(text, i + 1)
    return out


def sign(body, secret, raw=False):
    pairs = sorted(members(body), key=lambda member: member[0].encode())
    # null is signed as "key=" (lfguard's default, verify.null_values = "empty").
    canonical = "&".join(f"{key}={'' if value is None else value}" for key, value in pairs)
    digest = hashlib.md5(f"{canonical}&{secret}".encode()).digest()
    return base64.b64encode(digest if raw else digest.hex().encode()).decode()


if __name__ == "__main__":
    args = [arg for arg in sys.argv[1:] if arg != "--raw"]
    if len(args) not in (1, 2):
        sys.exit("usage: sign.py SECRET [BODY_FILE] [--raw]")
    body = open(args[1], encoding="utf-8").read() if len(args) == 2 else sys.stdin.read()
    try:
        print(sign(body, args[0], raw="--raw" in sys.argv))
    except ValueError as err:  # json.JSONDecodeError
        sys.exit(f"sign.py: the body is not JSON: {err}")
