//! The Linksfield signature: parse a callback body into its top-level members, build the
//! canonical string, sign it and verify an `x-lf-md5` value. Pure: no I/O, no clock.
//!
//! The JSON reader is our own rather than serde_json's because the signature depends on details a
//! general parser throws away: number tokens exactly as written (`1.50`), nested values as written,
//! and duplicate keys, which serde_json silently collapses. It validates strictly so that the backend
//! can never read a forwarded body differently from the way it was verified.

use std::borrow::Cow;

use base64::Engine as _;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

mod reader;

use self::reader::JsonReader;

/// Deeper nesting than this is refused; no Linksfield callback comes close, and the bound keeps
/// the recursive reader's stack use small for hostile input.
pub const MAX_DEPTH: usize = 64;

/// How a `null` member is written into the string to sign (`verify.null_values`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NullValues {
    /// `key=`
    #[default]
    Empty,
    /// The member is left out.
    Skip,
    /// `key=null`
    Literal,
}

/// Which digest encodings `x-lf-md5` may use (`verify.signature_encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Either of the two below.
    #[default]
    Auto,
    /// base64 of the 32-character lowercase hex digest (the documents' worked example).
    Hex,
    /// base64 of the 16 raw digest bytes (the formula read literally).
    Raw,
}

/// How an object or array member is written into the string to sign (`verify.nested_values`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NestedValues {
    /// As written in the body, whitespace outside strings removed.
    #[default]
    AsWritten,
    /// Re-serialised by a JSON library: keys sorted, numbers and escapes normalised.
    Reserialized,
}

/// Why a body cannot be verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Not one well-formed JSON object (or form), with the reason.
    Malformed(String),
    /// The same key twice in one object, at any depth (keys compared after unescaping).
    DuplicateKey(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Malformed(reason) => f.write_str(reason),
            BodyError::DuplicateKey(key) => write!(f, "duplicate key {:?}", shorten(key)),
        }
    }
}

/// Keeps error messages bounded when an attacker sends a huge key.
fn shorten(key: &str) -> Cow<'_, str> {
    const LIMIT: usize = 64;
    match key.char_indices().nth(LIMIT) {
        Some((cut, _)) => Cow::Owned(format!("{}…", &key[..cut])),
        None => Cow::Borrowed(key),
    }
}

fn malformed(reason: impl Into<String>) -> BodyError {
    BodyError::Malformed(reason.into())
}

/// A top-level member value, kept in the form the signature needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// A JSON string (or a form value), unescaped.
    Str(Cow<'a, str>),
    /// A number, `true` or `false`: the token as written.
    Token(&'a str),
    /// An object or array as written, whitespace outside strings removed.
    Nested(String),
    Null,
}

/// One top-level member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member<'a> {
    pub key: Cow<'a, str>,
    pub value: Value<'a>,
}

/// A verified-to-be-well-formed body: its top-level members sorted by key bytes, unique.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body<'a> {
    members: Vec<Member<'a>>,
    /// Whether a decoded value may contain `&`: false when the bytes as received have neither
    /// `&` nor an escape, which lets the ambiguity check skip reading every value.
    may_contain_ampersand: bool,
}

impl<'a> Body<'a> {
    /// Parses a JSON object body.
    pub fn from_json(bytes: &'a [u8]) -> Result<Self, BodyError> {
        let text = std::str::from_utf8(bytes).map_err(|_| malformed("body is not valid UTF-8"))?;
        let members = JsonReader::new(text).top_level_object()?;
        let mut body = Self::from_members(members)?;
        body.may_contain_ampersand = memchr::memchr2(b'&', b'\\', bytes).is_some();
        Ok(body)
    }

    /// Parses an `application/x-www-form-urlencoded` body (`+` is a space, `%XX` decoded, UTF-8).
    pub fn from_form(bytes: &'a [u8]) -> Result<Self, BodyError> {
        let mut members = Vec::new();
        for pair in bytes.split(|&b| b == b'&').filter(|pair| !pair.is_empty()) {
            let (key, value) = match pair.iter().position(|&b| b == b'=') {
                Some(eq) => (&pair[..eq], &pair[eq + 1..]),
                None => (pair, &b""[..]),
            };
            let key = form_decode(key)?;
            if key.is_empty() {
                return Err(malformed("form field with an empty name"));
            }
            members.push(Member {
                key,
                value: Value::Str(form_decode(value)?),
            });
        }
        if members.is_empty() {
            return Err(malformed("form body has no fields"));
        }
        Self::from_members(members)
    }

    fn from_members(mut members: Vec<Member<'a>>) -> Result<Self, BodyError> {
        members.sort_unstable_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
        if let Some(pair) = members.windows(2).find(|pair| pair[0].key == pair[1].key) {
            return Err(BodyError::DuplicateKey(pair[0].key.to_string()));
        }
        Ok(Body {
            members,
            may_contain_ampersand: true,
        })
    }

    /// The value of a top-level member.
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.members
            .binary_search_by(|m| m.key.as_bytes().cmp(key.as_bytes()))
            .ok()
            .map(|i| &self.members[i].value)
    }

    /// Whether any member is `null` or nested, i.e. whether the null and nested variants can
    /// change the string to sign.
    pub fn has_null_or_nested(&self) -> (bool, bool) {
        self.members
            .iter()
            .fold((false, false), |(null, nested), m| {
                (
                    null || m.value == Value::Null,
                    nested || matches!(m.value, Value::Nested(_)),
                )
            })
    }

    /// The members in signing order.
    pub fn members(&self) -> &[Member<'a>] {
        &self.members
    }

    /// False when no value can contain `&` (see the field).
    pub fn may_contain_ampersand(&self) -> bool {
        self.may_contain_ampersand
    }

    /// The string to sign without its final `&secret`.
    pub fn canonical(&self, nulls: NullValues) -> String {
        self.canonical_with(nulls, NestedValues::AsWritten)
    }

    /// The string to sign under any of the documented variants.
    pub fn canonical_with(&self, nulls: NullValues, nested: NestedValues) -> String {
        let mut out = String::with_capacity(256);
        for member in &self.members {
            let reserialized;
            let text: &str = match &member.value {
                Value::Str(s) => s,
                Value::Token(t) => t,
                Value::Nested(n) => match nested {
                    NestedValues::AsWritten => n,
                    NestedValues::Reserialized => {
                        reserialized = reserialize(n);
                        reserialized.as_deref().unwrap_or(n)
                    }
                },
                Value::Null => match nulls {
                    NullValues::Empty => "",
                    NullValues::Skip => continue,
                    NullValues::Literal => "null",
                },
            };
            if !out.is_empty() {
                out.push('&');
            }
            out.push_str(&member.key);
            out.push('=');
            out.push_str(text);
        }
        out
    }
}

/// A nested value as a generic JSON library prints it: keys sorted, numbers normalised, strings
/// unescaped where JSON allows. `None` where serde_json cannot represent it (`1e999999`).
fn reserialize(nested: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(nested)
        .ok()
        .map(|value| value.to_string())
}

fn form_decode(raw: &[u8]) -> Result<Cow<'_, str>, BodyError> {
    let plus_free: Cow<'_, [u8]> = if raw.contains(&b'+') {
        Cow::Owned(
            raw.iter()
                .map(|&b| if b == b'+' { b' ' } else { b })
                .collect(),
        )
    } else {
        Cow::Borrowed(raw)
    };
    let decoded: Vec<u8> = percent_encoding::percent_decode(&plus_free).collect();
    if decoded.as_slice() == raw {
        let text = std::str::from_utf8(raw).map_err(|_| malformed("form body is not UTF-8"))?;
        return Ok(Cow::Borrowed(text));
    }
    String::from_utf8(decoded)
        .map(Cow::Owned)
        .map_err(|_| malformed("form field is not UTF-8 after decoding"))
}

/// The md5 state after the canonical string and the `&` separator: each candidate secret is
/// appended to a clone, so several secrets cost one pass over the body.
#[derive(Clone)]
pub struct Prepared {
    state: Md5,
}

impl Prepared {
    pub fn new(canonical: &str) -> Self {
        let mut state = Md5::new();
        state.update(canonical.as_bytes());
        state.update(b"&");
        Prepared { state }
    }

    /// The raw md5 digest of `canonical&secret`.
    pub fn digest(&self, secret: &str) -> [u8; 16] {
        let mut state = self.state.clone();
        state.update(secret.as_bytes());
        state.finalize().into()
    }
}

/// The `x-lf-md5` value for a digest.
pub fn encode(digest: &[u8; 16], encoding: Encoding) -> String {
    let engine = base64::engine::general_purpose::STANDARD;
    match encoding {
        Encoding::Raw => engine.encode(digest),
        Encoding::Hex | Encoding::Auto => engine.encode(hex(digest)),
    }
}

/// Signs a canonical string with a secret, as Linksfield does.
pub fn sign(canonical: &str, secret: &str, encoding: Encoding) -> String {
    encode(&Prepared::new(canonical).digest(secret), encoding)
}

/// The full string to sign, for `sign --explain` and tests: canonical, `&`, secret.
pub fn string_to_sign(canonical: &str, secret: &str) -> String {
    format!("{canonical}&{secret}")
}

fn hex(digest: &[u8; 16]) -> [u8; 32] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (i, byte) in digest.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(byte >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(byte & 0x0f)];
    }
    out
}

/// The lowercase hex form of a digest, used as the replay key.
pub fn hex_string(digest: &[u8; 16]) -> String {
    String::from_utf8(hex(digest).to_vec()).expect("hex digits are ASCII")
}

/// A decoded `x-lf-md5` header: which encoding it claims by its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    Raw([u8; 16]),
    Hex([u8; 32]),
}

/// Decodes an `x-lf-md5` value; `None` when it cannot be an md5 digest in any accepted encoding.
pub fn decode_header(value: &[u8], encoding: Encoding) -> Option<Claimed> {
    let engine = base64::engine::general_purpose::STANDARD;
    let mut buf = [0u8; 33];
    // A 32-byte payload is 44 base64 characters; refuse longer input before decoding.
    if value.len() > 44 {
        return None;
    }
    let len = engine.decode_slice(value, &mut buf).ok()?;
    match (len, encoding) {
        (16, Encoding::Raw | Encoding::Auto) => {
            Some(Claimed::Raw(buf[..16].try_into().expect("16 bytes")))
        }
        (32, Encoding::Hex | Encoding::Auto) => {
            Some(Claimed::Hex(buf[..32].try_into().expect("32 bytes")))
        }
        _ => None,
    }
}

impl Claimed {
    /// Constant-time comparison with a computed digest.
    pub fn matches(&self, digest: &[u8; 16]) -> bool {
        match self {
            Claimed::Raw(raw) => raw.ct_eq(digest).into(),
            Claimed::Hex(text) => text.ct_eq(&hex(digest)).into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn canonical(body: &str, nulls: NullValues) -> Result<String, BodyError> {
        Body::from_json(body.as_bytes()).map(|b| b.canonical(nulls))
    }

    /// The vectors computed by an independent implementation of the signature scheme.
    #[test]
    fn shared_vectors() {
        let raw = include_str!("../../../tests/data/signatures.json");
        let vectors: Vec<serde_json::Value> = serde_json::from_str(raw).unwrap();
        assert!(vectors.len() >= 12);
        for v in &vectors {
            let name = v["name"].as_str().unwrap();
            let secret = v["secret"].as_str().unwrap();
            let body = match (v.get("body"), v.get("body_form")) {
                (Some(json), _) => {
                    let nulls = match v["null_values"].as_str().unwrap() {
                        "empty" => NullValues::Empty,
                        "skip" => NullValues::Skip,
                        "literal" => NullValues::Literal,
                        other => panic!("{name}: unknown null_values {other}"),
                    };
                    Body::from_json(json.as_str().unwrap().as_bytes())
                        .unwrap()
                        .canonical(nulls)
                }
                (None, Some(form)) => Body::from_form(form.as_str().unwrap().as_bytes())
                    .unwrap()
                    .canonical(NullValues::Empty),
                (None, None) => panic!("{name}: no body"),
            };
            assert_eq!(
                string_to_sign(&body, secret),
                v["string_to_sign"].as_str().unwrap(),
                "{name}"
            );
            let hex_sig = v["x_lf_md5_hex"].as_str().unwrap();
            let raw_sig = v["x_lf_md5_raw"].as_str().unwrap();
            assert_eq!(sign(&body, secret, Encoding::Hex), hex_sig, "{name}");
            assert_eq!(sign(&body, secret, Encoding::Raw), raw_sig, "{name}");
            let digest = Prepared::new(&body).digest(secret);
            for (sig, enc, ok) in [
                (hex_sig, Encoding::Auto, true),
                (raw_sig, Encoding::Auto, true),
                (hex_sig, Encoding::Hex, true),
                (raw_sig, Encoding::Raw, true),
            ] {
                let claimed = decode_header(sig.as_bytes(), enc).unwrap();
                assert_eq!(claimed.matches(&digest), ok, "{name} {enc:?}");
            }
            assert!(decode_header(hex_sig.as_bytes(), Encoding::Raw).is_none());
            assert!(decode_header(raw_sig.as_bytes(), Encoding::Hex).is_none());
        }
    }

    #[test]
    fn canonical_table() {
        use NullValues::*;
        let cases: &[(&str, NullValues, &str)] = &[
            (r#"{"b":"2","a":"1"}"#, Empty, "a=1&b=2"),
            (r#"{"n":1.50,"m":-0,"e":1E+2}"#, Empty, "e=1E+2&m=-0&n=1.50"),
            (r#"{"big":1e999999}"#, Empty, "big=1e999999"),
            (r#"{"s":"\u53d1"}"#, Empty, "s=发"),
            (r#"{"s":"\ud83d\ude00"}"#, Empty, "s=😀"),
            (r#"{"s":"a\/b\\c"}"#, Empty, "s=a/b\\c"),
            (r#"{"s":""}"#, Empty, "s="),
            (r#"{"x":null,"y":"1"}"#, Empty, "x=&y=1"),
            (r#"{"x":null,"y":"1"}"#, Skip, "y=1"),
            (r#"{"x":null,"y":"1"}"#, Literal, "x=null&y=1"),
            (
                r#"{"o":{ "b" : [ 1 , "x y" , null ] , "a":{} }}"#,
                Empty,
                r#"o={"b":[1,"x y",null],"a":{}}"#,
            ),
            (r#"{"o":["\u0041"]}"#, Empty, r#"o=["\u0041"]"#),
            (r#"{"t":true,"f":false}"#, Empty, "f=false&t=true"),
            ("{}", Empty, ""),
            (" \r\n\t{\"a\":\"1\"}\n", Empty, "a=1"),
        ];
        for (body, nulls, expected) in cases {
            assert_eq!(canonical(body, *nulls).unwrap(), *expected, "{body}");
        }
    }

    #[test]
    fn rejections_table() {
        let dup = |k: &str| Err(BodyError::DuplicateKey(k.to_string()));
        let cases: Vec<(&[u8], Result<(), BodyError>)> = vec![
            (br#"{"a":"1","a":"2"}"#, dup("a")),
            (br#"{"a":"1","\u0061":"2"}"#, dup("a")),
            (br#"{"o":{"k":1,"k":2}}"#, dup("k")),
            (br#"{"o":[{"k":1,"k":2}]}"#, dup("k")),
        ];
        for (body, expected) in cases {
            assert_eq!(Body::from_json(body).map(|_| ()), expected);
        }
        let malformed_bodies: &[&[u8]] = &[
            b"",
            b"   ",
            b"[]",
            b"\"s\"",
            b"1",
            b"null",
            b"{\"a\":1} x",
            b"{\"a\":1}{}",
            b"\xef\xbb\xbf{\"a\":1}",
            b"{\"a\":\"\xff\"}",
            b"{\"a\":\"\xc0\xaf\"}",
            b"{\"a\":\"\\ud800\"}",
            b"{\"a\":\"\\udc00x\"}",
            b"{\"a\":\"\\ud800\\u0041\"}",
            b"{\"a\":01}",
            b"{\"a\":1.}",
            b"{\"a\":.5}",
            b"{\"a\":1e}",
            b"{\"a\":+1}",
            b"{\"a\":NaN}",
            b"{\"a\":nul}",
            b"{\"a\":\"x}",
            b"{\"a\":\"tab\there\"}",
            b"{\"a\":\"\\x\"}",
            b"{\"a\":1,}",
            b"{,}",
            b"{\"a\" 1}",
            b"{a:1}",
            b"{\"a\":[1,]}",
            b"{\"a\":{\"b\":1",
        ];
        for body in malformed_bodies {
            assert!(
                matches!(Body::from_json(body), Err(BodyError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(matches!(
            Body::from_json(deep.as_bytes()),
            Err(BodyError::Malformed(_))
        ));
        let at_limit = format!(
            "{{\"a\":{}{}}}",
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        assert!(Body::from_json(at_limit.as_bytes()).is_ok());
    }

    #[test]
    fn large_object_is_linearithmic_and_unique() {
        let members: Vec<String> = (0..100_000).map(|i| format!("\"k{i}\":{i}")).collect();
        let body = format!("{{{}}}", members.join(","));
        assert_eq!(
            Body::from_json(body.as_bytes()).unwrap().members().len(),
            100_000
        );
    }

    #[test]
    fn nested_values_can_be_reserialized() {
        let body = Body::from_json(br#"{"m":{ "z": 1.50, "a": ["\u0041"] },"n":null}"#).unwrap();
        assert_eq!(
            body.canonical_with(NullValues::Skip, NestedValues::Reserialized),
            r#"m={"a":["A"],"z":1.5}"#
        );
        assert_eq!(body.has_null_or_nested(), (true, true));
        let huge = Body::from_json(br#"{"m":[1e999999]}"#).unwrap();
        assert_eq!(
            huge.canonical_with(NullValues::Empty, NestedValues::Reserialized),
            "m=[1e999999]",
            "unrepresentable values stay as written"
        );
    }

    #[test]
    fn form_bodies() {
        let body = Body::from_form(b"b=x%20y&a=1+2&c=%E5%8F%91&d").unwrap();
        assert_eq!(body.canonical(NullValues::Empty), "a=1 2&b=x y&c=发&d=");
        assert_eq!(
            Body::from_form(b"a=1&a=2"),
            Err(BodyError::DuplicateKey("a".into()))
        );
        assert!(matches!(
            Body::from_form(b"a=%FF"),
            Err(BodyError::Malformed(_))
        ));
        assert!(matches!(Body::from_form(b""), Err(BodyError::Malformed(_))));
        assert!(matches!(
            Body::from_form(b"=1"),
            Err(BodyError::Malformed(_))
        ));
    }

    #[test]
    fn header_decoding() {
        let digest = Prepared::new("a=1").digest("k");
        assert!(decode_header(b"", Encoding::Auto).is_none());
        assert!(decode_header(b"not base64!", Encoding::Auto).is_none());
        assert!(decode_header(b"AAAA", Encoding::Auto).is_none());
        let long = "A".repeat(200);
        assert!(decode_header(long.as_bytes(), Encoding::Auto).is_none());
        let wrong = decode_header(b"AAAAAAAAAAAAAAAAAAAAAA==", Encoding::Auto).unwrap();
        assert!(!wrong.matches(&digest));
        let upper = encode(&digest, Encoding::Hex);
        let upper_hex = base64::engine::general_purpose::STANDARD
            .encode(hex_string(&digest).to_ascii_uppercase());
        assert_ne!(upper, upper_hex);
        let claimed = decode_header(upper_hex.as_bytes(), Encoding::Auto).unwrap();
        assert!(
            !claimed.matches(&digest),
            "the hex digest is lowercase, as in Linksfield's example (docs/verification.md)"
        );
    }

    proptest! {
        #[test]
        fn member_order_does_not_change_the_signature(
            entries in proptest::collection::btree_map("[a-zA-Z_]{1,8}", "[ -~\u{4e00}-\u{4e10}]{0,12}", 1..12),
            seed in any::<u64>(),
        ) {
            let mut pairs: Vec<(String, String)> = entries.into_iter().collect();
            let ordered = serde_json::to_string(&pairs.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()).unwrap();
            let mut state = seed;
            for i in (1..pairs.len()).rev() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                pairs.swap(i, (state >> 33) as usize % (i + 1));
            }
            let shuffled = format!("{{{}}}", pairs.iter().map(|(k, v)| format!(
                "{}:{}", serde_json::to_string(k).unwrap(), serde_json::to_string(v).unwrap()
            )).collect::<Vec<_>>().join(" , "));
            let a = canonical(&ordered, NullValues::Empty).unwrap();
            let b = canonical(&shuffled, NullValues::Empty).unwrap();
            prop_assert_eq!(sign(&a, "k", Encoding::Raw), sign(&b, "k", Encoding::Raw));
        }

        /// Any object the reader accepts signs and then verifies, in both encodings, and a
        /// one-character change to a value changes the signature.
        #[test]
        fn every_accepted_object_signs_and_verifies(
            members in proptest::collection::vec(("[a-z_]{1,6}", prop_oneof![
                Just("1.50".to_string()), Just("-0".to_string()), Just("1e999999".to_string()),
                Just("null".to_string()), Just("true".to_string()), Just(r#""\u53d1 \"q\"""#.to_string()),
                Just(r#"{ "n": [1, "x y", {}] }"#.to_string()), "[a-zA-Z0-9 .:,_&=-]{0,10}".prop_map(|s| format!("\"{s}\"")),
            ]), 1..8),
            nulls in prop_oneof![Just(NullValues::Empty), Just(NullValues::Skip), Just(NullValues::Literal)],
        ) {
            let body = format!("{{{}}}", members.iter()
                .map(|(k, v)| format!("\"{k}\" : {v}")).collect::<Vec<_>>().join(",\n"));
            let Ok(parsed) = Body::from_json(body.as_bytes()) else {
                // Only duplicate keys are refused here.
                prop_assert!(matches!(Body::from_json(body.as_bytes()), Err(BodyError::DuplicateKey(_))));
                return Ok(());
            };
            let canonical = parsed.canonical(nulls);
            let digest = Prepared::new(&canonical).digest("secret");
            for encoding in [Encoding::Hex, Encoding::Raw] {
                let header = sign(&canonical, "secret", encoding);
                prop_assert!(decode_header(header.as_bytes(), Encoding::Auto).unwrap().matches(&digest));
            }
            let changed = Prepared::new(&format!("{canonical}x")).digest("secret");
            prop_assert_ne!(changed, digest);
        }

        #[test]
        fn reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Body::from_json(&bytes);
            let _ = Body::from_form(&bytes);
        }

        #[test]
        fn strings_round_trip_through_serde_json(text in "\\PC{0,40}") {
            let body = serde_json::json!({ "s": text }).to_string();
            let parsed = Body::from_json(body.as_bytes()).unwrap();
            prop_assert_eq!(parsed.get("s"), Some(&Value::Str(Cow::Borrowed(text.as_str()))));
        }
    }
}
