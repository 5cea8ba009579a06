//! Arbitrary bytes into the body readers and the canonicaliser.
//!
//! - `Body::from_json` and `Body::from_form` never panic;
//! - an accepted body has unique members in byte order, and parsing the same bytes again gives
//!   the same canonical string under every `null_values` mode;
//! - for a JSON object with a string `partner_code`, `sign(canonical, "k", enc)` verifies:
//!   `decode_header` of it matches `Prepared::new(&canonical).digest("k")` under its own encoding
//!   and `Auto`, not under the other encoding, and not with another secret;
//! - differential: whatever lfguard accepts as JSON, serde_json reads as an object with the same
//!   top-level keys and the same values (strings decoded alike, tokens and nested values equal), so
//!   a backend cannot read a forwarded body differently from the way it was verified. Numbers
//!   out of f64 range (`1e999999`), which serde_json refuses by design, are skipped.
#![no_main]

use lfguard::signature::{Body, Encoding, NullValues, Prepared, Value, decode_header, sign};
use libfuzzer_sys::fuzz_target;

const NULLS: [NullValues; 3] = [NullValues::Empty, NullValues::Skip, NullValues::Literal];

fn check_members(body: &Body<'_>) {
    let members = body.members();
    assert!(
        members
            .windows(2)
            .all(|pair| pair[0].key.as_bytes() < pair[1].key.as_bytes()),
        "members are unique and sorted by key bytes"
    );
    for member in members {
        assert_eq!(body.get(&member.key), Some(&member.value));
    }
}

fn check_signature(canonical: &str) {
    let digest = Prepared::new(canonical).digest("k");
    let other = Prepared::new(canonical).digest("k2");
    for (encoding, wrong) in [
        (Encoding::Hex, Encoding::Raw),
        (Encoding::Raw, Encoding::Hex),
    ] {
        let signature = sign(canonical, "k", encoding);
        for accept in [encoding, Encoding::Auto] {
            let claimed = decode_header(signature.as_bytes(), accept)
                .unwrap_or_else(|| panic!("own {encoding:?} signature decodes under {accept:?}"));
            assert!(
                claimed.matches(&digest),
                "own {encoding:?} signature verifies"
            );
            assert!(!claimed.matches(&other), "another secret does not verify");
        }
        assert!(decode_header(signature.as_bytes(), wrong).is_none());
    }
}

fn same_as_serde(body: &Body<'_>, data: &[u8]) {
    let parsed: serde_json::Value = match serde_json::from_slice(data) {
        Ok(value) => value,
        Err(err) if err.to_string().contains("number out of range") => return,
        Err(err) => panic!("lfguard accepted a body serde_json refuses: {err}"),
    };
    let object = parsed.as_object().expect("an accepted body is an object");
    assert_eq!(object.len(), body.members().len(), "same number of members");
    for member in body.members() {
        let theirs = object
            .get(member.key.as_ref())
            .unwrap_or_else(|| panic!("serde_json has no member {:?}", member.key));
        match (&member.value, theirs) {
            (Value::Str(ours), serde_json::Value::String(theirs)) => assert_eq!(ours, theirs),
            (Value::Null, serde_json::Value::Null) => {}
            (Value::Token(token), serde_json::Value::Bool(b)) => {
                assert_eq!(*token, if *b { "true" } else { "false" })
            }
            (Value::Token(token), serde_json::Value::Number(n)) => {
                // serde_json's default float parsing is best-effort (within an ulp or so), so
                // compare with a tolerance; the point is the same number, not the same rounding.
                let ours: f64 = token.parse().expect("a number token parses as f64");
                let theirs = n.as_f64().expect("a serde_json number is an f64");
                let scale = ours.abs().max(theirs.abs());
                assert!(
                    ours == theirs || (ours - theirs).abs() <= scale * 1e-12 || scale < 1e-300,
                    "number {token}: {ours} vs {theirs}"
                );
            }
            (
                Value::Nested(text),
                theirs @ (serde_json::Value::Object(_) | serde_json::Value::Array(_)),
            ) => {
                let again: serde_json::Value =
                    serde_json::from_str(text).expect("the signed nested text is JSON");
                assert_eq!(&again, theirs, "nested value {text}");
            }
            (ours, theirs) => panic!(
                "member {:?}: lfguard {ours:?}, serde_json {theirs}",
                member.key
            ),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = Body::from_json(data) {
        check_members(&body);
        let again = Body::from_json(data).expect("the same bytes are accepted again");
        for nulls in NULLS {
            assert_eq!(body.canonical(nulls), again.canonical(nulls));
        }
        if let Some(Value::Str(_)) = body.get("partner_code") {
            check_signature(&body.canonical(NullValues::Empty));
        }
        same_as_serde(&body, data);
    }
    if let Ok(body) = Body::from_form(data) {
        check_members(&body);
        assert!(
            body.members()
                .iter()
                .all(|m| matches!(m.value, Value::Str(_)))
        );
        let again = Body::from_form(data).expect("the same bytes are accepted again");
        let canonical = body.canonical(NullValues::Empty);
        assert_eq!(canonical, again.canonical(NullValues::Empty));
        if body.get("partner_code").is_some() {
            check_signature(&canonical);
        }
    }
});
