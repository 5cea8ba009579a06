#!/bin/sh
# Prints the x-lf-md5 value of a Linksfield callback body, as lfguard verifies it.
#
#   usage: sign.sh SECRET [BODY_FILE] [--raw]      (the body is read from standard input without
#                                                  BODY_FILE; --raw: base64 of the raw digest)
#
# Needs a POSIX shell, awk, sort, paste, od, tr and openssl. It signs a JSON object whose top-level
# keys and string values have no backslash escapes, as Linksfield writes its callbacks; a body with
# one is refused (exit status 2): sign it with sign.py, which decodes escapes. Numbers, true, false,
# null and nested objects and arrays are signed as lfguard signs them. It does not check that the
# body is valid JSON: lfguard does.
set -eu

usage() {
  echo "usage: sign.sh SECRET [BODY_FILE] [--raw]" >&2
  exit 2
}
raw=no secret= file= count=0
for arg in "$@"; do
  case $arg in
    --raw) raw=yes ;;
    *)
      count=$((count + 1))
      case $count in 1) secret=$arg ;; 2) file=$arg ;; *) usage ;; esac
      ;;
  esac
done
[ "$count" -ge 1 ] || usage

# One "key=value" line per top-level member, each value as it is signed: a string's text, a
# number, true or false as written, null as nothing (lfguard's default, verify.null_values =
# "empty"), an object or array as written with the whitespace outside its strings removed.
members=$(LC_ALL=C awk '
  { text = text $0 "\n" }
  END {
    n = length(text); pos = 1
    space(); expect("{"); space()
    if (ch() == "}") pos++
    else for (;;) {
      space(); key = string(); space(); expect(":"); space()
      c = ch()
      if (c == "\"") value = string()
      else if (c == "{" || c == "[") value = nested()
      else { value = token(); if (value == "null") value = "" }
      print key "=" value
      space(); c = ch(); pos++
      if (c == "}") break
      if (c != ",") fail("expected , or } after the member " key)
    }
    space()
    if (pos <= n) fail("data after the object")
  }
  function ch() { return substr(text, pos, 1) }
  function space() { while (pos <= n && index(" \t\r\n", ch()) > 0) pos++ }
  function expect(c) { if (ch() != c) fail("expected " c " at byte " pos); pos++ }
  function fail(message) { print "sign.sh: " message > "/dev/stderr"; exit 2 }
  function string(   start) {
    expect("\""); start = pos
    while (ch() != "\"") {
      if (ch() == "") fail("unterminated string")
      if (ch() == "\\") fail("a top-level key or string has an escape; sign this body with sign.py")
      pos++
    }
    pos++
    return substr(text, start, pos - 1 - start)
  }
  function nested(   out, c, depth, in_string, escaped) {
    for (;;) {
      c = ch(); pos++
      if (c == "") fail("unterminated object or array")
      if (in_string) {
        out = out c
        if (escaped) escaped = 0
        else if (c == "\\") escaped = 1
        else if (c == "\"") in_string = 0
      } else if (index(" \t\r\n", c) == 0) {
        out = out c
        if (c == "\"") in_string = 1
        else if (c == "{" || c == "[") depth++
        else if ((c == "}" || c == "]") && --depth == 0) return out
      }
    }
  }
  function token(   start) {
    start = pos
    while (pos <= n && index(" \t\r\n,}", ch()) == 0) pos++
    if (pos == start) fail("expected a value at byte " pos)
    return substr(text, start, pos - start)
  }
' ${file:+"$file"}) || exit 2

# Sorted by key bytes, joined with "&", then "&" and the secret.
canonical=$(printf '%s\n' "$members" | LC_ALL=C sort -t = -k 1,1 | paste -s -d '&' -)
if [ "$raw" = yes ]; then
  printf '%s&%s' "$canonical" "$secret" | openssl dgst -md5 -binary | openssl base64 -A
else
  printf '%s&%s' "$canonical" "$secret" | openssl dgst -md5 -binary | od -A n -v -t x1 |
    tr -d ' \n' | openssl base64 -A
fi
echo
