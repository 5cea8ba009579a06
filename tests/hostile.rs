//! A hostile input corpus (issue "Hardening"): malformed, ambiguous and oversized bodies, framing
//! tricks and header games against the real binary. Every refused case must get its documented status
//! and code and reach the backend never; afterwards lfguard must still be alive and still forward a
//! valid callback. Valid-but-unusual JSON is a separate table that must arrive byte for byte.

mod support;

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine as _;
use lfguard::signature::{self, Encoding};
use support::*;

/// The default `server.max_body_bytes`.
const MAX_BODY_BYTES: usize = 262_144;

/// A partner in report mode, beside `PARTNER` (enforced).
const REPORT_PARTNER: &str = "P000777";

/// The configuration of the lfguard the tables run against: a pass-through route beside the
/// verified ones, and a partner in report mode (whose failures are forwarded marked).
fn table_config() -> String {
    format!(
        "[[routes]]\npath_prefix = \"/health\"\nverify = false\n\
         [partners.{REPORT_PARTNER}]\nsecrets = [\"report-secret\"]\nmode = \"report\"\n"
    )
}

/// How long a case may take to be answered; each one is answered in milliseconds when lfguard is
/// well.
const CASE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a refused case must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A lfguard refusal: this status and documented error code in the JSON body.
    Code(u16, &'static str),
    /// One of these lfguard refusals, where the order of two checks is not specified.
    OneOf(&'static [(u16, &'static str)]),
    /// A plain status without a JSON body (the admin port, or hyper's own framing errors).
    Status(u16),
    /// Any 4xx: framing hyper refuses before lfguard sees the request.
    ClientError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    Proxy,
    Admin,
}

struct Case {
    name: &'static str,
    port: Port,
    bytes: Vec<u8>,
    /// Half-close the connection after the bytes are written.
    close_write: bool,
    expect: Expect,
}

fn case(name: &'static str, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        name,
        port: Port::Proxy,
        bytes,
        close_write: false,
        expect,
    }
}

/// A well-formed signature value (base64 of a lowercase hex digest) that matches nothing.
fn dummy_signature() -> String {
    base64::engine::general_purpose::STANDARD.encode("0123456789abcdef0123456789abcdef")
}

/// A callback carrying `body` but signed over `as_if`: what an attacker sends when lfguard and the
/// backend might read the body as `as_if` (first-wins duplicates, BOM stripped, garbage ignored).
fn signed_as(body: impl Into<Vec<u8>>, as_if: &str) -> Callback {
    let mut callback = Callback::signed(as_if.to_string());
    callback.body = body.into();
    callback
}

/// A callback with `body`, correctly signed over it.
fn signed(body: impl Into<String>) -> Vec<u8> {
    Callback::signed(body).to_bytes()
}

/// `{"partner_code":"P002671",<rest>}` as text.
fn with_partner(rest: &str) -> String {
    format!(r#"{{"partner_code":"{PARTNER}",{rest}}}"#)
}

/// Request head with the usual callback headers plus `extra` lines (each ending in CRLF), no body.
fn head(path: &str, signature: &str, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: lfguard.test\r\nContent-Type: application/json\r\nx-lf-md5: {signature}\r\nx-lf-delivery: {}\r\n{extra}\r\n",
        delivery_id()
    )
}

/// A request that is closed by a harmless GET: if lfguard kept reading the connection after the
/// case, the sentinel gets a 405 and closes it; either way no read has to wait for a timeout.
fn with_sentinel(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.extend_from_slice(
        b"GET /sentinel HTTP/1.1\r\nHost: lfguard.test\r\nConnection: close\r\n\r\n",
    );
    bytes
}

/// `callback` as raw bytes with its body sent in the chunked coding (one chunk) and the head's
/// `extra` lines (each ending in CRLF) added.
fn chunked(callback: &Callback, extra: &str) -> Vec<u8> {
    let mut bytes = format!(
        "{} {} HTTP/1.1\r\nHost: lfguard.test\r\n",
        callback.method, callback.path
    )
    .into_bytes();
    for (name, value) in &callback.headers {
        bytes.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    bytes.extend_from_slice(
        format!("{extra}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    if !callback.body.is_empty() {
        bytes.extend_from_slice(format!("{:x}\r\n", callback.body.len()).as_bytes());
        bytes.extend_from_slice(&callback.body);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    bytes
}

/// A request without a body to the pass-through route, with `extra` header lines.
fn passthrough(method: &str, path: &str, extra: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\nHost: lfguard.test\r\n{extra}Connection: close\r\n\r\n")
        .into_bytes()
}

/// A callback of the report-mode partner with a signature that does not match: forwarded
/// marked `bad_signature`, unless refused for a reason report mode does not waive.
fn reported_callback() -> Callback {
    let body = format!(
        r#"{{"partner_code":"{REPORT_PARTNER}","text_message":"report {}","received_at":"{}"}}"#,
        delivery_id(),
        now_millis()
    );
    Callback::signed_with(body, "not-the-report-secret", Encoding::Hex)
}

/// A valid signed callback as raw request bytes, kept alive (no `Connection: close`): the request
/// a smuggling attempt tries to slip past lfguard.
fn smuggled_request() -> Vec<u8> {
    let text = String::from_utf8(Callback::signed(sms_body()).to_bytes()).unwrap();
    text.replacen("Connection: close\r\n", "", 1).into_bytes()
}

/// Writes `bytes` from a second thread (lfguard may answer before reading them all, and may close
/// the connection on the unread rest) and reads every response until the connection closes.
fn exchange(addr: SocketAddr, bytes: &[u8], close_write: bool) -> Vec<Response> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(CASE_TIMEOUT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let bytes = bytes.to_vec();
    let writing = std::thread::spawn(move || {
        let _ = writer.write_all(&bytes);
        if close_write {
            let _ = writer.shutdown(Shutdown::Write);
        }
    });
    let mut reader = BufReader::new(stream);
    let mut responses = Vec::new();
    while let Some(response) = read_response(&mut reader) {
        responses.push(response);
    }
    let _ = reader.get_ref().shutdown(Shutdown::Both);
    writing.join().unwrap();
    responses
}

fn check(case: &Case, responses: &[Response]) {
    let name = case.name;
    let first = responses
        .first()
        .unwrap_or_else(|| panic!("{name}: no response at all"));
    match case.expect {
        Expect::Code(status, code) => {
            assert_eq!(
                (first.status, first.code().as_str()),
                (status, code),
                "{name}: {}",
                first.text()
            );
            assert_eq!(
                first.header("content-type"),
                Some("application/json"),
                "{name}"
            );
        }
        Expect::OneOf(allowed) => {
            let got = (first.status, first.code());
            assert!(
                allowed
                    .iter()
                    .any(|&(status, code)| got == (status, code.to_string())),
                "{name}: {got:?} is none of {allowed:?}"
            );
        }
        Expect::Status(status) => assert_eq!(first.status, status, "{name}: {}", first.text()),
        Expect::ClientError => assert!(
            (400..500).contains(&first.status),
            "{name}: {} {}",
            first.status,
            first.text()
        ),
    }
    for response in responses {
        assert!(
            !(200..300).contains(&response.status),
            "{name}: something on this connection was accepted: {responses:?}"
        );
    }
}

/// The refused corpus. Bodies are built so that a lenient parser would accept them: most are
/// signed over the reading an attacker hopes the backend will make.
fn refused_cases() -> Vec<Case> {
    let dummy = dummy_signature();
    let raw_with = |signature: &str, body: &[u8]| {
        let mut bytes = head(
            "/callback/hostile",
            signature,
            &format!("Content-Length: {}\r\nConnection: close\r\n", body.len()),
        )
        .into_bytes();
        bytes.extend_from_slice(body);
        bytes
    };
    let raw = |body: &[u8]| raw_with(&dummy, body);
    let valid_body = sms_body();
    let valid = Callback::signed(valid_body.clone());
    let valid_signature = valid.header("x-lf-md5").unwrap().to_string();
    let valid_with_signatures = |signatures: &[(&str, &str)]| {
        let mut callback = valid.clone().without("x-lf-md5");
        for (name, value) in signatures {
            callback = callback.with(name, value);
        }
        callback.to_bytes()
    };
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);

    let first_wins = with_partner(r#""amount":"1""#);
    let deep = |open: &str, close: &str, depth: usize| {
        with_partner(&format!(
            r#""deep":{}{}"#,
            open.repeat(depth),
            close.repeat(depth)
        ))
    };
    let partner_body = |value: &str| format!(r#"{{"partner_code":{value},"text_message":"x"}}"#);
    let long_partner = format!("\"P{}\"", "7".repeat(10 * 1024));

    vec![
        // ---- duplicate keys, compared after unescaping, at any depth
        case(
            "duplicate key at the top level",
            signed_as(with_partner(r#""amount":"1","amount":"1000""#), &first_wins).to_bytes(),
            Expect::Code(400, "duplicate_key"),
        ),
        case(
            "duplicate partner_code (the backend may read the other one)",
            signed_as(
                format!(r#"{{"partner_code":"{PARTNER}","amount":"1","partner_code":"P999999"}}"#),
                &first_wins,
            )
            .to_bytes(),
            Expect::Code(400, "duplicate_key"),
        ),
        case(
            "duplicate key in a nested object",
            signed_as(
                with_partner(r#""amount":"1","meta":{"x":1,"y":2,"x":3}"#),
                &with_partner(r#""amount":"1","meta":{"x":1,"y":2}"#),
            )
            .to_bytes(),
            Expect::Code(400, "duplicate_key"),
        ),
        case(
            "duplicate key in an object inside an array, three levels down",
            raw(with_partner(r#""list":[1,{"a":{"b":true,"b":false}}]"#).as_bytes()),
            Expect::Code(400, "duplicate_key"),
        ),
        case(
            "keys differing only by a \\u escape (top level)",
            signed_as(
                with_partner(r#""a":"1","\u0061":"2""#),
                &with_partner(r#""a":"1""#),
            )
            .to_bytes(),
            Expect::Code(400, "duplicate_key"),
        ),
        case(
            "partner_code spelled with a \\u escape as a second partner_code",
            raw(
                format!(r#"{{"partner_code":"{PARTNER}","partner\u005fcode":"P999999"}}"#)
                    .as_bytes(),
            ),
            Expect::Code(400, "duplicate_key"),
        ),
        case(
            "keys differing only by \\u escapes (nested, both escaped differently)",
            raw(with_partner(r#""meta":{"\u0041b":1,"A\u0062":2}"#).as_bytes()),
            Expect::Code(400, "duplicate_key"),
        ),
        case(
            "keys differing only by a surrogate-pair escape vs the raw character",
            raw(with_partner("\"\u{1F600}\":1,\"\\ud83d\\ude00\":2").as_bytes()),
            Expect::Code(400, "duplicate_key"),
        ),
        // ---- UTF-8
        case(
            "overlong UTF-8 '/' (C0 AF) in a value",
            raw(b"{\"partner_code\":\"P002671\",\"path\":\"..\xc0\xafetc\"}"),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "overlong UTF-8 NUL (C0 80) in a key",
            raw(b"{\"partner_code\":\"P002671\",\"a\xc0\x80\":\"1\"}"),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "three-byte overlong (E0 80 AF)",
            raw(b"{\"partner_code\":\"P002671\",\"a\":\"\xe0\x80\xaf\"}"),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "invalid UTF-8 byte FF",
            raw(b"{\"partner_code\":\"P002671\",\"a\":\"\xff\"}"),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "truncated multi-byte sequence before the closing quote",
            raw(b"{\"partner_code\":\"P002671\",\"a\":\"\xe5\x8f\"}"),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "UTF-8-encoded surrogate (ED A0 80, CESU-8)",
            raw(b"{\"partner_code\":\"P002671\",\"a\":\"\xed\xa0\x80\"}"),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "invalid UTF-8 outside any string (between members)",
            raw(b"{\"partner_code\":\"P002671\",\xc2\xa0\"a\":1}"),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "code point above U+10FFFF (F4 90 80 80)",
            raw(b"{\"partner_code\":\"P002671\",\"a\":\"\xf4\x90\x80\x80\"}"),
            Expect::Code(400, "malformed_body"),
        ),
        // ---- escapes
        case(
            "lone high surrogate escape",
            raw(with_partner(r#""a":"\ud800""#).as_bytes()),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "lone low surrogate escape",
            raw(with_partner(r#""a":"\udc00""#).as_bytes()),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "high surrogate followed by a non-surrogate escape",
            raw(with_partner(r#""a":"\ud800\u0041""#).as_bytes()),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "reversed surrogate pair",
            raw(with_partner(r#""a":"\ude00\ud83d""#).as_bytes()),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "lone surrogate in a key",
            raw(with_partner(r#""\udfff":1"#).as_bytes()),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "lone surrogate in a nested string",
            raw(with_partner(r#""meta":["\ud800"]"#).as_bytes()),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "invalid escape \\x41",
            raw(with_partner(r#""a":"\x41""#).as_bytes()),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "truncated \\u escape at the end of the body",
            raw(br#"{"partner_code":"P002671","a":"\u00"#),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "raw control character in a string",
            raw(b"{\"partner_code\":\"P002671\",\"a\":\"x\x01y\"}"),
            Expect::Code(400, "malformed_body"),
        ),
        // ---- nesting
        case(
            "10k-deep arrays",
            raw(deep("[", "]", 10_000).as_bytes()),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "10k-deep objects",
            raw(deep("{\"a\":", "}", 10_000).as_bytes()),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "10k unclosed brackets",
            raw(with_partner(&format!(r#""deep":{}"#, "[".repeat(10_000))).as_bytes()),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "nesting one deeper than 64, signed over its canonical form",
            {
                let canonical = format!(
                    "deep={}{}&partner_code={PARTNER}",
                    "[".repeat(65),
                    "]".repeat(65)
                );
                let signature = signature::sign(&canonical, SECRET, Encoding::Hex);
                raw_with(&signature, deep("[", "]", 65).as_bytes())
            },
            Expect::Code(400, "malformed_body"),
        ),
        // ---- framing of the JSON text
        case(
            "trailing garbage",
            signed_as(format!("{valid_body} x"), &valid_body).to_bytes(),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "a second object after the first",
            signed_as(format!("{valid_body}{valid_body}"), &valid_body).to_bytes(),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "a NUL byte after the object",
            signed_as(format!("{valid_body}\0"), &valid_body).to_bytes(),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "a stray closing bracket after the object",
            signed_as(format!("{valid_body}]"), &valid_body).to_bytes(),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "UTF-8 BOM before the object",
            signed_as(
                [&b"\xef\xbb\xbf"[..], valid_body.as_bytes()].concat(),
                &valid_body,
            )
            .to_bytes(),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "empty body",
            raw_with(&valid_signature, b""),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "whitespace-only body",
            raw(b" \r\n\t "),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "a JSON string instead of an object",
            raw(br#""partner_code=P002671""#),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "a leading comma in the object",
            raw(br#"{,"partner_code":"P002671"}"#),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "a trailing comma in the object",
            raw(br#"{"partner_code":"P002671",}"#),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "NaN and Infinity are not JSON",
            raw(with_partner(r#""a":NaN,"b":Infinity"#).as_bytes()),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "a number with a leading zero",
            raw(with_partner(r#""a":0123"#).as_bytes()),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "a number with a plus sign",
            raw(with_partner(r#""a":+1"#).as_bytes()),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "single-quoted strings",
            raw(b"{'partner_code':'P002671'}"),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "a comment inside the object",
            raw(with_partner(r#"/* x */"a":1"#).as_bytes()),
            Expect::Code(400, "malformed_body"),
        ),
        // ---- signature headers
        case(
            "x-lf-md5 twice, differing only in name case (both valid)",
            valid_with_signatures(&[
                ("X-LF-MD5", &valid_signature),
                ("x-lf-md5", &valid_signature),
            ]),
            Expect::Code(401, "bad_signature"),
        ),
        case(
            "three x-lf-md5 headers, the valid one first",
            valid_with_signatures(&[
                ("x-lf-md5", &valid_signature),
                ("x-lf-md5", &dummy),
                ("X-Lf-Md5", &dummy),
            ]),
            Expect::Code(401, "bad_signature"),
        ),
        case(
            "two signatures folded into one header value",
            valid_with_signatures(&[("x-lf-md5", &format!("{valid_signature}, {dummy}"))]),
            Expect::Code(401, "bad_signature"),
        ),
        case(
            "a signature of the wrong length (3 bytes)",
            valid_with_signatures(&[("x-lf-md5", "AAAA")]),
            Expect::Code(401, "bad_signature"),
        ),
        case(
            "a signature of 15 bytes",
            valid_with_signatures(&[("x-lf-md5", &b64(&[7; 15]))]),
            Expect::Code(401, "bad_signature"),
        ),
        case(
            "a signature of 17 bytes",
            valid_with_signatures(&[("x-lf-md5", &b64(&[7; 17]))]),
            Expect::Code(401, "bad_signature"),
        ),
        case(
            "a signature of 33 bytes",
            valid_with_signatures(&[("x-lf-md5", &b64(&[b'a'; 33]))]),
            Expect::Code(401, "bad_signature"),
        ),
        case(
            "a 10 KB signature",
            valid_with_signatures(&[("x-lf-md5", &"A".repeat(10 * 1024))]),
            Expect::Code(401, "bad_signature"),
        ),
        case(
            "a signature that is not base64",
            valid_with_signatures(&[("x-lf-md5", "!!!!not*base64!!!!!!!==")]),
            Expect::Code(401, "bad_signature"),
        ),
        case(
            "the hex digest itself, not base64 of it",
            valid_with_signatures(&[(
                "x-lf-md5",
                &String::from_utf8(
                    base64::engine::general_purpose::STANDARD
                        .decode(&valid_signature)
                        .unwrap(),
                )
                .unwrap(),
            )]),
            Expect::Code(401, "bad_signature"),
        ),
        case(
            "base64 of the uppercase hex digest",
            valid_with_signatures(&[(
                "x-lf-md5",
                &b64(&base64::engine::general_purpose::STANDARD
                    .decode(&valid_signature)
                    .unwrap()
                    .to_ascii_uppercase()),
            )]),
            Expect::Code(401, "bad_signature"),
        ),
        // ---- partner_code
        case(
            "partner_code a number",
            signed(partner_body("2671")),
            Expect::Code(400, "missing_partner"),
        ),
        case(
            "partner_code an array",
            signed(partner_body(r#"["P002671"]"#)),
            Expect::Code(400, "missing_partner"),
        ),
        case(
            "partner_code an object",
            signed(partner_body(r#"{"code":"P002671"}"#)),
            Expect::Code(400, "missing_partner"),
        ),
        case(
            "partner_code null",
            signed(partner_body("null")),
            Expect::Code(400, "missing_partner"),
        ),
        case(
            "partner_code true",
            signed(partner_body("true")),
            Expect::Code(400, "missing_partner"),
        ),
        case(
            "partner_code empty",
            signed(partner_body(r#""""#)),
            Expect::Code(400, "missing_partner"),
        ),
        case(
            "partner_code 10 KB long",
            signed(partner_body(&long_partner)),
            Expect::Code(401, "unknown_partner"),
        ),
        case(
            "partner_code with a path separator",
            signed(partner_body(r#""../P002671""#)),
            Expect::Code(401, "unknown_partner"),
        ),
        case(
            "partner_code with a trailing NUL escape",
            signed(partner_body(r#""P002671\u0000""#)),
            Expect::Code(401, "unknown_partner"),
        ),
        case(
            "partner_code differing only in case",
            signed(partner_body(r#""p002671""#)),
            Expect::Code(401, "unknown_partner"),
        ),
        // ---- sizes and timing
        case(
            "Content-Length larger than the body sent (connection kept open)",
            {
                let mut bytes = head(
                    "/callback/hostile",
                    &valid_signature,
                    &format!(
                        "Content-Length: {}\r\nConnection: close\r\n",
                        valid_body.len() + 100
                    ),
                )
                .into_bytes();
                bytes.extend_from_slice(valid_body.as_bytes());
                bytes
            },
            Expect::Code(408, "request_timeout"),
        ),
        Case {
            close_write: true,
            ..case(
                "Content-Length larger than the body sent, then the write half closed",
                {
                    let mut bytes = head(
                        "/callback/hostile",
                        &valid_signature,
                        &format!(
                            "Content-Length: {}\r\nConnection: close\r\n",
                            valid_body.len() + 100
                        ),
                    )
                    .into_bytes();
                    bytes.extend_from_slice(valid_body.as_bytes());
                    bytes
                },
                Expect::Code(400, "malformed_body"),
            )
        },
        case(
            "Content-Length one over the limit, refused before the body is sent",
            head(
                "/callback/hostile",
                &valid_signature,
                &format!("Content-Length: {}\r\n", MAX_BODY_BYTES + 1),
            )
            .into_bytes(),
            Expect::Code(413, "body_too_large"),
        ),
        case(
            "Content-Length over the limit with Expect: 100-continue gets 413, not 100",
            head(
                "/callback/hostile",
                &valid_signature,
                &format!(
                    "Content-Length: {}\r\nExpect: 100-continue\r\n",
                    10 * MAX_BODY_BYTES
                ),
            )
            .into_bytes(),
            Expect::Code(413, "body_too_large"),
        ),
        case(
            "Content-Length over the limit, body sent anyway",
            {
                let body = with_partner(&format!(r#""pad":"{}""#, "x".repeat(MAX_BODY_BYTES)));
                signed(body)
            },
            Expect::Code(413, "body_too_large"),
        ),
        case("chunked body beyond the limit", chunked_over_limit(), {
            Expect::Code(413, "body_too_large")
        }),
        case(
            "chunked body beyond the limit in one huge chunk",
            {
                let mut bytes = head(
                    "/callback/hostile",
                    &valid_signature,
                    "Transfer-Encoding: chunked\r\nConnection: close\r\n",
                )
                .into_bytes();
                let chunk = " ".repeat(MAX_BODY_BYTES + 1);
                bytes.extend_from_slice(
                    format!("{:x}\r\n{chunk}\r\n0\r\n\r\n", chunk.len()).as_bytes(),
                );
                bytes
            },
            Expect::Code(413, "body_too_large"),
        ),
        // ---- request smuggling: a valid signed callback hidden in the body must never be read
        //      as a request of its own.
        case(
            "Content-Length then Transfer-Encoding (CL.TE), smuggled request after an empty chunked body",
            {
                let mut bytes = head(
                    "/callback/hostile",
                    &dummy,
                    "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                )
                .into_bytes();
                bytes.extend_from_slice(b"0\r\n\r\n");
                bytes.extend_from_slice(&smuggled_request());
                with_sentinel(bytes)
            },
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "Transfer-Encoding then Content-Length (TE.CL), smuggled request inside the chunk",
            {
                let smuggled = smuggled_request();
                let mut bytes = head(
                    "/callback/hostile",
                    &dummy,
                    "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                )
                .into_bytes();
                bytes.extend_from_slice(format!("{:x}\r\n", smuggled.len()).as_bytes());
                bytes.extend_from_slice(&smuggled);
                bytes.extend_from_slice(b"\r\n0\r\n\r\n");
                bytes.extend_from_slice(&smuggled_request());
                with_sentinel(bytes)
            },
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "Transfer-Encoding that is not chunked, with Content-Length",
            {
                let smuggled = smuggled_request();
                let mut bytes = head(
                    "/callback/hostile",
                    &dummy,
                    &format!(
                        "Content-Length: {}\r\nTransfer-Encoding: identity\r\n",
                        smuggled.len()
                    ),
                )
                .into_bytes();
                bytes.extend_from_slice(&smuggled);
                with_sentinel(bytes)
            },
            Expect::ClientError,
        ),
        case(
            "Transfer-Encoding: chunked, identity (chunked not last)",
            {
                let mut bytes = head(
                    "/callback/hostile",
                    &dummy,
                    "Transfer-Encoding: chunked, identity\r\n",
                )
                .into_bytes();
                bytes.extend_from_slice(b"0\r\n\r\n");
                bytes.extend_from_slice(&smuggled_request());
                with_sentinel(bytes)
            },
            Expect::ClientError,
        ),
        case(
            "two Content-Length headers that disagree",
            {
                let smuggled = smuggled_request();
                let mut bytes = head(
                    "/callback/hostile",
                    &dummy,
                    &format!(
                        "Content-Length: 0\r\nContent-Length: {}\r\n",
                        smuggled.len()
                    ),
                )
                .into_bytes();
                bytes.extend_from_slice(&smuggled);
                with_sentinel(bytes)
            },
            Expect::ClientError,
        ),
        case(
            "a Content-Length that is not a number",
            {
                let mut bytes =
                    head("/callback/hostile", &dummy, "Content-Length: +0x10\r\n").into_bytes();
                bytes.extend_from_slice(&smuggled_request());
                with_sentinel(bytes)
            },
            Expect::ClientError,
        ),
        case(
            "a space before the colon of Transfer-Encoding",
            {
                let mut bytes = head(
                    "/callback/hostile",
                    &dummy,
                    "Content-Length: 0\r\nTransfer-Encoding : chunked\r\n",
                )
                .into_bytes();
                bytes.extend_from_slice(b"0\r\n\r\n");
                bytes.extend_from_slice(&smuggled_request());
                with_sentinel(bytes)
            },
            Expect::ClientError,
        ),
        case(
            "a request refused before its body is read (415) carries a request in its body",
            {
                let smuggled = smuggled_request();
                let mut bytes = format!(
                    "POST /callback/hostile HTTP/1.1\r\nHost: lfguard.test\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                    smuggled.len()
                )
                .into_bytes();
                bytes.extend_from_slice(&smuggled);
                with_sentinel(bytes)
            },
            Expect::Code(415, "unsupported_media_type"),
        ),
        case(
            "a request without a signature carries a request in its body",
            {
                let smuggled = smuggled_request();
                let mut bytes = format!(
                    "POST /callback/hostile HTTP/1.1\r\nHost: lfguard.test\r\nContent-Type: application/json\r\nx-lf-delivery: 1\r\nContent-Length: {}\r\n\r\n",
                    smuggled.len()
                )
                .into_bytes();
                bytes.extend_from_slice(&smuggled);
                with_sentinel(bytes)
            },
            // Which check comes first is the pipeline's choice; either refusal is a documented one.
            Expect::OneOf(&[(401, "missing_signature"), (400, "malformed_body")]),
        ),
        case(
            "a GET with a chunked body carrying a request",
            {
                let smuggled = smuggled_request();
                let mut bytes = format!(
                    "GET /callback/hostile HTTP/1.1\r\nHost: lfguard.test\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
                    smuggled.len()
                )
                .into_bytes();
                bytes.extend_from_slice(&smuggled);
                bytes.extend_from_slice(b"\r\n0\r\n\r\n");
                with_sentinel(bytes)
            },
            Expect::Code(405, "method_not_allowed"),
        ),
        case(
            "Content-Length over the limit whose 'body' is a request",
            {
                let mut bytes = head(
                    "/callback/hostile",
                    &valid_signature,
                    &format!("Content-Length: {}\r\n", MAX_BODY_BYTES + 1),
                )
                .into_bytes();
                bytes.extend_from_slice(&smuggled_request());
                with_sentinel(bytes)
            },
            Expect::Code(413, "body_too_large"),
        ),
        case(
            "an HTTP/1.0 POST without Content-Length whose bytes are a request",
            {
                let mut bytes = format!(
                    "POST /callback/hostile HTTP/1.0\r\nHost: lfguard.test\r\nContent-Type: application/json\r\nx-lf-md5: {valid_signature}\r\nx-lf-delivery: 1\r\n\r\n"
                )
                .into_bytes();
                bytes.extend_from_slice(&smuggled_request());
                with_sentinel(bytes)
            },
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "an HTTP/1.0 POST with Transfer-Encoding",
            {
                let mut bytes = format!(
                    "POST /callback/hostile HTTP/1.0\r\nHost: lfguard.test\r\nContent-Type: application/json\r\nx-lf-md5: {valid_signature}\r\nx-lf-delivery: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                .into_bytes();
                bytes.extend_from_slice(
                    format!("{:x}\r\n{valid_body}\r\n0\r\n\r\n", valid_body.len()).as_bytes(),
                );
                bytes
            },
            Expect::ClientError,
        ),
        // ---- framing and head fields lfguard refuses itself (400 malformed_request), on every
        //      route and in report mode, before reading a body
        case(
            "Content-Length then Transfer-Encoding on a correctly signed callback",
            chunked(
                &Callback::signed(sms_body()),
                &format!("Content-Length: {}\r\n", valid_body.len()),
            ),
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "Transfer-Encoding then Content-Length on a correctly signed callback",
            {
                let text = String::from_utf8(chunked(&Callback::signed(sms_body()), "")).unwrap();
                text.replacen(
                    "Transfer-Encoding: chunked\r\n",
                    "Transfer-Encoding: chunked\r\nContent-Length: 7\r\n",
                    1,
                )
                .into_bytes()
            },
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "Content-Length with Transfer-Encoding on the pass-through route",
            {
                let mut bytes = passthrough(
                    "POST",
                    "/health/live",
                    "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
                );
                bytes.extend_from_slice(b"3\r\nabc\r\n0\r\n\r\n");
                bytes
            },
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "Content-Length with Transfer-Encoding from a partner in report mode",
            chunked(&reported_callback(), "Content-Length: 2\r\n"),
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "x_lf_md5 beside x-lf-md5 (CGI and WSGI read both as HTTP_X_LF_MD5)",
            Callback::signed(sms_body())
                .with("x_lf_md5", &dummy)
                .to_bytes(),
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "X_LF_DELIVERY beside x-lf-delivery",
            Callback::signed(sms_body())
                .with("X_LF_DELIVERY", "1")
                .to_bytes(),
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "content_length on the pass-through route",
            passthrough("GET", "/health/live", "content_length: 99\r\n"),
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "two Host headers on a correctly signed callback",
            Callback::signed(sms_body())
                .with("Host", "backend.internal")
                .to_bytes(),
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "two Host headers on the pass-through route",
            passthrough("GET", "/health/live", "Host: admin.internal\r\n"),
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "two Host headers from a partner in report mode",
            reported_callback().with("Host", "backend.internal").to_bytes(),
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "Connection naming Content-Type, x-lf-md5, x-lf-delivery and Host on a signed callback",
            Callback::signed(sms_body())
                .with("Connection", "content-type, x-lf-md5, x-lf-delivery, host")
                .to_bytes(),
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "Connection naming x_lf_md5 (CGI reads it as x-lf-md5)",
            Callback::signed(sms_body())
                .with("Connection", "keep-alive, X_LF_MD5")
                .to_bytes(),
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "Connection naming x-lfguard-verified",
            Callback::signed(sms_body())
                .with("Connection", "X-LFGuard-Verified")
                .to_bytes(),
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "Connection naming Content-Length",
            Callback::signed(sms_body())
                .with("Connection", "Content-Length")
                .to_bytes(),
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "Connection naming Transfer-Encoding, in a second Connection header",
            Callback::signed(sms_body())
                .with("Connection", "keep-alive")
                .with("Connection", "transfer-encoding")
                .to_bytes(),
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "Connection naming Host on the pass-through route",
            passthrough("GET", "/health/live", "Connection: keep-alive, host\r\n"),
            Expect::Code(400, "malformed_request"),
        ),
        case(
            "Connection naming x-lf-delivery from a partner in report mode",
            reported_callback()
                .with("Connection", "x-lf-delivery")
                .to_bytes(),
            Expect::Code(400, "malformed_request"),
        ),
        // ---- only ordinary methods and clean paths pass through unverified; anything else
        //      takes the verified path (405 unless POST)
        case(
            "CONNECT on the pass-through route",
            passthrough("CONNECT", "/health", ""),
            Expect::Code(405, "method_not_allowed"),
        ),
        case(
            "TRACE on the pass-through route",
            passthrough("TRACE", "/health/live", ""),
            Expect::Code(405, "method_not_allowed"),
        ),
        case(
            "an extension method on the pass-through route",
            passthrough("PROPFIND", "/health/live", ""),
            Expect::Code(405, "method_not_allowed"),
        ),
        case(
            "a ..; segment (Tomcat and Spring read /health/..;/admin as /admin)",
            passthrough("GET", "/health/..;/admin", ""),
            Expect::Code(405, "method_not_allowed"),
        ),
        case(
            "a path parameter on the pass-through prefix",
            passthrough("GET", "/health/live;jsessionid=1", ""),
            Expect::Code(405, "method_not_allowed"),
        ),
        case(
            "a percent-encoded ; in a pass-through path",
            passthrough("GET", "/health/%3B/admin", ""),
            Expect::Code(405, "method_not_allowed"),
        ),
        case(
            "a percent-encoded / in a pass-through path",
            passthrough("GET", "/health/x%2Fadmin", ""),
            Expect::Code(405, "method_not_allowed"),
        ),
        case(
            "a percent-encoded backslash in a pass-through path",
            passthrough("GET", "/health/x%5cadmin", ""),
            Expect::Code(405, "method_not_allowed"),
        ),
        case(
            "a double-encoded dot segment in a pass-through path",
            passthrough("GET", "/health/%252e%252e/admin", ""),
            Expect::Code(405, "method_not_allowed"),
        ),
        case(
            "a percent-encoded NUL in a pass-through path",
            passthrough("GET", "/health/live%00.json", ""),
            Expect::Code(405, "method_not_allowed"),
        ),
        case(
            "percent-encoded non-ASCII in a pass-through path",
            passthrough("GET", "/health/%C3%A9", ""),
            Expect::Code(405, "method_not_allowed"),
        ),
        case(
            "an unsigned POST to /health/..;/callback takes the verified path",
            {
                let mut callback =
                    Callback::signed(sms_body()).replacing("x-lf-md5", &dummy_signature());
                callback.path = "/health/..;/callback/sms".into();
                callback.to_bytes()
            },
            Expect::Code(401, "bad_signature"),
        ),
        // ---- header limits
        case(
            "100 headers",
            {
                let extra: String = (0..100).map(|i| format!("X-Pad-{i}: {i}\r\n")).collect();
                let mut bytes = head("/callback/hostile", &valid_signature, &extra).into_bytes();
                bytes.extend_from_slice(valid_body.as_bytes());
                bytes
            },
            Expect::Status(431),
        ),
        case(
            "a 20 KB header block",
            {
                let extra = format!("X-Pad: {}\r\n", "p".repeat(20 * 1024));
                let mut bytes = head("/callback/hostile", &valid_signature, &extra).into_bytes();
                bytes.extend_from_slice(valid_body.as_bytes());
                bytes
            },
            Expect::Status(431),
        ),
        case(
            "several x-lf-delivery headers",
            valid.clone().with("X-LF-Delivery", "2").to_bytes(),
            Expect::Code(400, "missing_delivery_id"),
        ),
        case(
            "an x-lf-delivery of 129 characters",
            valid
                .clone()
                .replacing("x-lf-delivery", &"9".repeat(129))
                .to_bytes(),
            Expect::Code(400, "missing_delivery_id"),
        ),
        // ---- form bodies are held to the same rules
        case(
            "form: duplicate field",
            form(&format!("partner_code={PARTNER}&amount=1&amount=1000"), &format!("partner_code={PARTNER}&amount=1")),
            Expect::Code(400, "duplicate_key"),
        ),
        case(
            "form: partner_code twice, once percent-encoded",
            form(&format!("partner_code={PARTNER}&partner%5Fcode=P999999"), &format!("partner_code={PARTNER}")),
            Expect::Code(400, "duplicate_key"),
        ),
        case(
            "form: keys differing only by '+' vs %20",
            form(&format!("partner_code={PARTNER}&a+b=1&a%20b=2"), &format!("partner_code={PARTNER}&a+b=1")),
            Expect::Code(400, "duplicate_key"),
        ),
        case(
            "form: percent-encoded overlong UTF-8",
            form(&format!("partner_code={PARTNER}&path=..%C0%AFetc"), &format!("partner_code={PARTNER}")),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "form: a field with an empty name",
            form(&format!("partner_code={PARTNER}&=x"), &format!("partner_code={PARTNER}")),
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "form: only separators",
            form("&&&", &format!("partner_code={PARTNER}")),
            Expect::Code(400, "malformed_body"),
        ),
        // ---- header bytes
        case(
            "an obs-folded x-lf-md5 header",
            {
                let mut bytes = format!(
                    "POST /callback/hostile HTTP/1.1\r\nHost: lfguard.test\r\nContent-Type: application/json\r\nx-lf-md5: {dummy}\r\n {valid_signature}\r\nx-lf-delivery: 1\r\nContent-Length: {}\r\n\r\n",
                    valid_body.len()
                )
                .into_bytes();
                bytes.extend_from_slice(valid_body.as_bytes());
                bytes.extend_from_slice(&smuggled_request());
                with_sentinel(bytes)
            },
            Expect::ClientError,
        ),
        case(
            "a NUL byte in a header value",
            {
                let mut bytes = format!(
                    "POST /callback/hostile HTTP/1.1\r\nHost: lfguard.test\r\nContent-Type: application/json\r\nx-lf-md5: {valid_signature}\0\r\nx-lf-delivery: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    valid_body.len()
                )
                .into_bytes();
                bytes.extend_from_slice(valid_body.as_bytes());
                bytes
            },
            Expect::ClientError,
        ),
        case(
            "a non-ASCII x-lf-delivery",
            {
                let mut bytes = format!(
                    "POST /callback/hostile HTTP/1.1\r\nHost: lfguard.test\r\nContent-Type: application/json\r\nx-lf-md5: {valid_signature}\r\nx-lf-delivery: 12@@34\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    valid_body.len()
                )
                .into_bytes();
                // The format string cannot hold raw bytes: patch them in.
                let at = bytes.windows(2).position(|w| w == b"@@").unwrap();
                bytes.splice(at..at + 2, [0xff, 0xfe]);
                bytes.extend_from_slice(valid_body.as_bytes());
                bytes
            },
            Expect::Code(400, "missing_delivery_id"),
        ),
        case(
            "a chunk size that overflows 64 bits",
            {
                let mut bytes = head(
                    "/callback/hostile",
                    &valid_signature,
                    "Transfer-Encoding: chunked\r\nConnection: close\r\n",
                )
                .into_bytes();
                bytes.extend_from_slice(b"fffffffffffffffffff\r\n{}\r\n0\r\n\r\n");
                bytes
            },
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "a chunk size that is not hex",
            {
                let mut bytes = head(
                    "/callback/hostile",
                    &valid_signature,
                    "Transfer-Encoding: chunked\r\nConnection: close\r\n",
                )
                .into_bytes();
                bytes.extend_from_slice(b"zz\r\n{}\r\n0\r\n\r\n");
                bytes.extend_from_slice(&smuggled_request());
                bytes
            },
            Expect::Code(400, "malformed_body"),
        ),
        case(
            "a 100 KB request target",
            format!(
                "POST /{} HTTP/1.1\r\nHost: lfguard.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                "a".repeat(100 * 1024)
            )
            .into_bytes(),
            Expect::ClientError,
        ),
        case(
            "a JSON body declared with a non-UTF-8 charset",
            valid
                .clone()
                .replacing("Content-Type", "application/json; charset=utf-16")
                .to_bytes(),
            Expect::Code(415, "unsupported_media_type"),
        ),
        // ---- the two listeners do not serve each other's paths
        Case {
            port: Port::Admin,
            ..case(
                "a signed callback sent to the admin port",
                valid.to_bytes(),
                Expect::Status(404),
            )
        },
        Case {
            port: Port::Admin,
            ..case(
                "a signed callback to /metrics on the admin port",
                {
                    let mut callback = valid.clone();
                    callback.path = "/metrics".into();
                    callback.to_bytes()
                },
                Expect::Status(405),
            )
        },
        case(
            "GET /metrics on the proxy port",
            b"GET /metrics HTTP/1.1\r\nHost: lfguard.test\r\nConnection: close\r\n\r\n".to_vec(),
            Expect::Code(405, "method_not_allowed"),
        ),
        case(
            "GET /healthz on the proxy port",
            b"GET /healthz HTTP/1.1\r\nHost: lfguard.test\r\nConnection: close\r\n\r\n".to_vec(),
            Expect::Code(405, "method_not_allowed"),
        ),
    ]
}

/// A form-encoded callback carrying `body`, signed over the form `as_if`.
fn form(body: &str, as_if: &str) -> Vec<u8> {
    Callback {
        method: "POST".into(),
        path: "/callback/form".into(),
        headers: vec![
            (
                "Content-Type".into(),
                "application/x-www-form-urlencoded".into(),
            ),
            (
                "x-lf-md5".into(),
                sign_body(as_if.as_bytes(), SECRET, Encoding::Hex),
            ),
            ("x-lf-delivery".into(), delivery_id()),
        ],
        body: body.as_bytes().to_vec(),
    }
    .to_bytes()
}

/// A chunked body of 64 KiB chunks that passes `max_body_bytes` by one chunk.
fn chunked_over_limit() -> Vec<u8> {
    let mut bytes = head(
        "/callback/hostile",
        &dummy_signature(),
        "Transfer-Encoding: chunked\r\nConnection: close\r\n",
    )
    .into_bytes();
    let chunk = " ".repeat(64 * 1024);
    for _ in 0..=MAX_BODY_BYTES / chunk.len() {
        bytes.extend_from_slice(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes());
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    bytes
}

#[test]
fn hostile_requests_are_refused_and_lfguard_keeps_serving() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        &format!(
            "{}[server]\nbody_read_timeout = \"300ms\"\nheader_read_timeout = \"3s\"\n[verify]\naccept_form = true",
            table_config()
        ),
    );
    let cases = refused_cases();
    let mut refusals: BTreeMap<&str, usize> = BTreeMap::new();
    for case in &cases {
        let addr = match case.port {
            Port::Proxy => lfguard.addr,
            Port::Admin => lfguard.admin,
        };
        let started = Instant::now();
        let responses = exchange(addr, &case.bytes, case.close_write);
        check(case, &responses);
        assert!(
            started.elapsed() < CASE_TIMEOUT,
            "{}: took {:?}",
            case.name,
            started.elapsed()
        );
        assert_eq!(backend.count(), 0, "{}: forwarded", case.name);
        if let Expect::Code(_, code) = case.expect {
            *refusals.entry(code).or_default() += 1;
        }
    }
    // Each lfguard refusal was logged as a request with its code.
    for (code, count) in refusals {
        lfguard.wait_for_logs(count, |e| e["message"] == "request" && e["code"] == code);
    }
    assert!(
        !lfguard
            .logs()
            .iter()
            .any(|line| line.contains(&"7".repeat(1024))),
        "the 10 KB partner_code was logged"
    );

    // Still alive, still ready, still forwarding.
    assert_eq!(admin_get(lfguard.admin, "/healthz").status, 200);
    assert_eq!(admin_get(lfguard.admin, "/readyz").status, 200);
    let callback = Callback::signed(sms_body());
    let response = lfguard.post(&callback);
    assert_eq!(response.status, 200, "{}", response.text());
    let received = backend.wait_for(1);
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body.as_ref(), callback.body.as_slice());
}

#[test]
fn unusual_but_valid_json_is_forwarded_byte_for_byte() {
    let backend = Backend::start();
    // These bodies test the JSON reader, not freshness.
    let lfguard = Lfguard::start(&backend, "[verify]\nrequire_timestamp = false");
    let accepted: Vec<(&str, Callback)> = vec![
        (
            "1e999999",
            Callback::signed(with_partner(r#""usage":1e999999"#)),
        ),
        (
            "-1e-999999",
            Callback::signed(with_partner(r#""usage":-1e-999999"#)),
        ),
        ("-0", Callback::signed(with_partner(r#""usage":-0"#))),
        (
            "-0.0E+0",
            Callback::signed(with_partner(r#""usage":-0.0E+0"#)),
        ),
        (
            "a 40-digit integer",
            Callback::signed(with_partner(
                r#""usage":1234567890123456789012345678901234567890"#,
            )),
        ),
        (
            "numbers inside nested values",
            Callback::signed(with_partner(r#""meta":{"n":[-0,1e999999,0.10]}"#)),
        ),
        (
            "an escaped NUL and a surrogate pair",
            Callback::signed(with_partner(r#""text_message":"a\u0000b \ud83d\ude00""#)),
        ),
        (
            "keys that differ only by case",
            Callback::signed(with_partner(r#""Amount":"1","amount":"2""#)),
        ),
        (
            "64-deep nesting",
            Callback::signed(with_partner(&format!(
                r#""deep":{}{}"#,
                "[".repeat(64),
                "]".repeat(64)
            ))),
        ),
        ("signature header name in mixed case", {
            let callback = Callback::signed(sms_body());
            let signature = callback.header("x-lf-md5").unwrap().to_string();
            callback.without("x-lf-md5").with("X-Lf-MD5", &signature)
        }),
        (
            "raw digest encoding",
            Callback::signed_with(sms_body(), SECRET, Encoding::Raw),
        ),
    ];
    for (name, callback) in &accepted {
        let response = lfguard.post(callback);
        assert_eq!(
            (response.status, response.header("x-lfguard-duplicate")),
            (200, None),
            "{name}: {}",
            response.text()
        );
    }
    let received = backend.wait_for(accepted.len());
    assert_eq!(received.len(), accepted.len());
    for ((name, callback), received) in accepted.iter().zip(&received) {
        assert_eq!(
            received.body.as_ref(),
            callback.body.as_slice(),
            "{name}: body changed"
        );
        assert_eq!(
            received.header("x-lfguard-verified"),
            Some("true"),
            "{name}"
        );
    }
}

/// Header names and values, sorted.
type Headers = Vec<(String, String)>;

/// The headers a request reaches the backend with whose names, read as CGI and WSGI backends read
/// them (case ignored, `_` as `-`), start with `x-lfguard-`.
fn lfguard_headers(received: &Recorded) -> Headers {
    let mut own: Headers = received
        .headers
        .iter()
        .filter(|(name, _)| {
            name.to_ascii_lowercase()
                .replace('_', "-")
                .starts_with("x-lfguard-")
        })
        .cloned()
        .collect();
    own.sort();
    own
}

/// Requests that are forwarded, carrying spoofed `x-lfguard-*` headers (also spelled with `_`, as
/// CGI and WSGI backends read `X_LFGUARD_VERIFIED` as `X-Lfguard-Verified`): the backend must
/// receive exactly lfguard's own headers, on the verified path, in report mode and on a
/// pass-through route.
#[test]
fn spoofed_lfguard_headers_in_any_spelling_never_reach_the_backend() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, &table_config());
    let spoof = |callback: Callback| {
        callback
            .with("x_lfguard_verified", "true")
            .with("X_LFGUARD_PARTNER_CODE", "P000001")
            .with("x-lfguard_key-id", "forged")
            .with("x_lfguard-failure", "none")
            .with("X-Lfguard-Verified", "true")
    };
    let verified = spoof(Callback::signed(sms_body()));
    let reported = spoof(reported_callback());
    let delivery = |callback: &Callback| callback.header("x-lf-delivery").unwrap().to_string();
    let own = |pairs: &[(&str, &str)]| {
        let mut pairs: Headers = pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        pairs.sort();
        pairs
    };
    let rows: Vec<(&str, Vec<u8>, Headers)> = vec![
        (
            "a verified callback",
            verified.to_bytes(),
            own(&[
                ("x-lfguard-verified", "true"),
                ("x-lfguard-partner-code", PARTNER),
                ("x-lfguard-key-id", "inline:0"),
                ("x-lfguard-delivery-id", &delivery(&verified)),
            ]),
        ),
        (
            "a callback forwarded marked in report mode",
            reported.to_bytes(),
            own(&[
                ("x-lfguard-verified", "false"),
                ("x-lfguard-failure", "bad_signature"),
                ("x-lfguard-partner-code", REPORT_PARTNER),
                ("x-lfguard-delivery-id", &delivery(&reported)),
            ]),
        ),
        (
            "a GET on the pass-through route",
            passthrough(
                "GET",
                "/health/live",
                "x_lfguard_verified: true\r\nX-LFGUARD-VERIFIED: true\r\nx-lfguard_partner_code: P002671\r\n",
            ),
            Vec::new(),
        ),
        (
            "a POST on the pass-through route",
            {
                let mut callback = spoof(Callback::signed(sms_body()));
                callback.path = "/health".into();
                callback.to_bytes()
            },
            Vec::new(),
        ),
    ];
    for (at, (name, bytes, expected)) in rows.iter().enumerate() {
        let responses = exchange(lfguard.addr, bytes, false);
        assert_eq!(
            responses.first().map(|r| r.status),
            Some(200),
            "{name}: {responses:?}"
        );
        let received = backend.wait_for(at + 1).remove(at);
        assert_eq!(&lfguard_headers(&received), expected, "{name}");
    }
}

/// hyper reads a request with both `Content-Length` and `Transfer-Encoding` by its chunked
/// framing and drops `Content-Length` from the header map; lfguard still finds it, also behind
/// other requests on a kept-alive connection, and refuses just that one.
#[test]
fn ambiguous_framing_behind_a_pipelined_callback_is_refused() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "");
    let first = Callback::signed(sms_body());
    let chunked_first = Callback::signed(sms_body());
    let mut bytes = String::from_utf8(first.to_bytes())
        .unwrap()
        .replacen("Connection: close\r\n", "", 1)
        .into_bytes();
    // A plainly chunked callback in between, kept alive too.
    bytes.extend_from_slice(
        &String::from_utf8(chunked(&chunked_first, ""))
            .unwrap()
            .replacen("Connection: close\r\n", "", 1)
            .into_bytes(),
    );
    bytes.extend_from_slice(&chunked(
        &Callback::signed(sms_body()),
        "Content-Length: 5\r\n",
    ));
    let responses = exchange(lfguard.addr, &bytes, false);
    let answers: Vec<(u16, String)> = responses
        .iter()
        .map(|r| {
            let code = if r.status == 200 {
                String::new()
            } else {
                r.code()
            };
            (r.status, code)
        })
        .collect();
    assert_eq!(
        answers,
        [
            (200, String::new()),
            (200, String::new()),
            (400, "malformed_request".to_string())
        ]
    );
    let received = backend.wait_for(2);
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].body.as_ref(), first.body.as_slice());
    assert_eq!(received[1].body.as_ref(), chunked_first.body.as_slice());
}

#[test]
fn a_100k_member_object_is_verified_quickly() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        "[server]\nmax_body_bytes = 8388608\n[verify]\nrequire_timestamp = false",
    );
    let members: String = (0..100_000).map(|i| format!(r#","m{i:06}":{i}"#)).collect();
    let body = format!(r#"{{"partner_code":"{PARTNER}"{members}}}"#);
    assert!(body.len() > MAX_BODY_BYTES, "needs the raised limit");
    let good = Callback::signed(body.clone());

    let timed = |callback: &Callback| {
        let started = Instant::now();
        let response = lfguard.post(callback);
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
        response
    };
    // A duplicate at the very end, spelled with an escape.
    let duplicate = signed_as(
        format!(r#"{},"\u006d000001":7}}"#, &body[..body.len() - 1]),
        &body,
    );
    let response = timed(&duplicate);
    assert_eq!(
        (response.status, response.code().as_str()),
        (400, "duplicate_key"),
        "{}",
        response.text()
    );
    // A 100k-member nested object with a duplicate.
    let nested = signed_as(
        format!(r#"{{"partner_code":"{PARTNER}","meta":{{"x":0{members},"m000000":1}}}}"#),
        &body,
    );
    let response = timed(&nested);
    assert_eq!(
        (response.status, response.code().as_str()),
        (400, "duplicate_key")
    );
    // Forged.
    let forged = good.clone().replacing("x-lf-md5", &dummy_signature());
    let response = timed(&forged);
    assert_eq!(
        (response.status, response.code().as_str()),
        (401, "bad_signature")
    );
    assert_eq!(backend.count(), 0);
    // Correctly signed: verified and forwarded unchanged.
    let response = timed(&good);
    assert_eq!(response.status, 200, "{}", response.text());
    let received = backend.wait_for(1);
    assert_eq!(received[0].body.len(), body.len());
    assert!(received[0].body.as_ref() == body.as_bytes());
}

#[test]
fn an_http_1_0_callback_is_forwarded_and_answered() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "");
    let callback = Callback::signed(sms_body());
    let text = String::from_utf8(callback.to_bytes()).unwrap();
    let request = text
        .replacen("HTTP/1.1", "HTTP/1.0", 1)
        .replacen("Connection: close\r\n", "", 1);
    let responses = exchange(lfguard.addr, request.as_bytes(), false);
    assert_eq!(responses.len(), 1, "{responses:?}");
    assert_eq!(responses[0].status, 200, "{}", responses[0].text());
    assert_eq!(responses[0].text(), "{}");
    let received = backend.wait_for(1);
    assert_eq!(received[0].body.as_ref(), callback.body.as_slice());
    assert_eq!(received[0].header("x-lfguard-verified"), Some("true"));
}

/// Two requests written back to back on one connection, the second closing it.
fn pipelined(first: &Callback, second: &Callback) -> Vec<u8> {
    let mut bytes = String::from_utf8(first.to_bytes())
        .unwrap()
        .replacen("Connection: close\r\n", "", 1)
        .into_bytes();
    bytes.extend_from_slice(&second.to_bytes());
    bytes
}

#[test]
fn pipelined_callbacks_are_answered_in_order() {
    let backend = Backend::start();
    backend.script([
        Reply {
            body: "first",
            ..Reply::default()
        },
        Reply {
            body: "second",
            ..Reply::default()
        },
    ]);
    let lfguard = Lfguard::start(&backend, "");
    let first = Callback::signed(sms_body());
    let second = Callback::signed(sms_body());
    let responses = exchange(lfguard.addr, &pipelined(&first, &second), false);
    let answers: Vec<(u16, String)> = responses.iter().map(|r| (r.status, r.text())).collect();
    assert_eq!(
        answers,
        [(200, "first".to_string()), (200, "second".to_string())]
    );
    let received = backend.wait_for(2);
    assert_eq!(received[0].body.as_ref(), first.body.as_slice());
    assert_eq!(received[1].body.as_ref(), second.body.as_slice());
}

#[test]
fn a_forged_callback_pipelined_behind_a_valid_one_is_not_forwarded() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "");
    let valid = Callback::signed(sms_body());
    let forged = Callback::signed_with(sms_body(), "not-the-secret", Encoding::Hex);
    let responses = exchange(lfguard.addr, &pipelined(&valid, &forged), false);
    assert_eq!(responses.len(), 2, "{responses:?}");
    assert_eq!(responses[0].status, 200);
    assert_eq!(
        (responses[1].status, responses[1].code().as_str()),
        (401, "bad_signature")
    );
    // A replay of the valid one pipelined behind a forged one: refused as a duplicate, and a
    // fresh valid callback behind a forged one is forwarded.
    let fresh = Callback::signed(sms_body());
    let responses = exchange(
        lfguard.addr,
        &pipelined(&forged, &valid.with_new_delivery_id()),
        false,
    );
    assert_eq!(responses.len(), 2, "{responses:?}");
    assert_eq!(responses[0].status, 401);
    assert_eq!(responses[1].header("x-lfguard-duplicate"), Some("true"));
    let responses = exchange(lfguard.addr, &pipelined(&forged, &fresh), false);
    assert_eq!(
        responses.iter().map(|r| r.status).collect::<Vec<_>>(),
        [401, 200]
    );
    let received = backend.wait_for(2);
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].body.as_ref(), valid.body.as_slice());
    assert_eq!(received[1].body.as_ref(), fresh.body.as_slice());
}

/// A `[[routes]]` prefix passed through unverified (e.g. a backend's own health page)
/// must not cover paths that leave it through dot segments: a backend that normalises
/// `/health/../callback` serves `/callback`, so lfguard would forward an unsigned callback to it.
#[test]
fn dot_segments_do_not_escape_an_unverified_route() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        "[[routes]]\npath_prefix = \"/health\"\nverify = false",
    );
    let forged = Callback::signed(sms_body()).replacing("x-lf-md5", &dummy_signature());
    let mut escaped = Vec::new();
    for path in [
        "/health/../callback/sms",
        "/health/./../callback/sms",
        "/health/%2e%2e/callback/sms",
        "/health/%2E%2E/callback/sms",
        "/health/.%2e/callback/sms",
    ] {
        let mut request = forged.clone();
        request.path = path.into();
        let responses = exchange(lfguard.addr, &request.to_bytes(), false);
        let status = responses.first().map(|r| r.status);
        if !matches!(status, Some(400..=499)) {
            escaped.push(format!("{path} → {status:?}"));
        }
    }
    let forwarded: Vec<String> = backend.requests().into_iter().map(|r| r.uri).collect();
    assert!(
        escaped.is_empty() && forwarded.is_empty(),
        "an unsigned callback escaped the unverified prefix: answered {escaped:?}; the backend received {forwarded:?}"
    );
    // The backend's own health page still passes through.
    let health = send_raw(
        lfguard.addr,
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(health.status, 200);
    assert_eq!(backend.count(), 1);
}
