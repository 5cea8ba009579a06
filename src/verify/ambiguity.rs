//! Bodies whose string to sign could also be read as another body's. Pure: no I/O, no clock.
//!
//! Linksfield joins members as `k=v&k=v&…&secret` with no escaping and without the JSON type of a
//! value, so different bodies can share one string to sign, and with it one signature and one
//! replay key. A reading of a string to sign is a choice of the `&` that start members: every
//! `&NAME=` whose `NAME` is a possible key, with the keys in ascending order. lfguard admits a body
//! only if no value contains `&NAME=` with `NAME` sorting after the value's own key. Then at most
//! one reading of any string to sign is admitted: where two readings first differ, one starts a
//! member `NAME` after key `k` (so `NAME > k`) and the other keeps that `&NAME=` inside `k`'s
//! value, which this rule refuses. It catches
//!
//! - **fold**: a key that contains `=` or `&` (`"received_at=1700000000000&sim_id": "…"` signs as
//!   two members); keys are limited to `[A-Za-z0-9_.-]`, all a callback uses;
//! - **absorb**: a value that swallows the next members (`"note": "hello&notify=true"` signs like
//!   `"note": "hello", "notify": "true"`);
//! - **shift**: a boundary moved between neighbours (`{"a":"x&c=y","b":"z"}` and
//!   `{"a":"x","c":"y&b=z"}` share `a=x&c=y&b=z`; only the second is admitted). Bounding `NAME`
//!   by the next key as well, as first proposed, would admit both.
//!
//! What remains is the type of a value (a string retyped as a number or boolean, an object
//! replaced by the text of it, `null` and `""` under `null_values = "empty"`) and, from a refused
//! body, a split into an admitted one. Only a member schema closes those: see `schema.rs`.

use std::borrow::Cow;

use crate::verify::signature::{Body, NestedValues, Value};

/// Why a body is ambiguous. The message names the key (bounded, checked to be harmless) but
/// never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ambiguity {
    /// A key with a character outside `[A-Za-z0-9_.-]`, or an empty key.
    Key,
    /// The value of this key reads as an extra member of the string to sign.
    HiddenMember { key: String },
}

impl std::fmt::Display for Ambiguity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ambiguity::Key => f.write_str(
                "a member key has a character other than ASCII letters, digits, '_', '-' or '.'",
            ),
            Ambiguity::HiddenMember { key } => write!(
                f,
                "the value of {key} contains '&NAME=' that the string to sign also reads as \
                 another member"
            ),
        }
    }
}

/// The bytes a member key may have, as a table: the check runs on every key of every callback.
const KEY_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        table[byte] = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.';
        byte += 1;
    }
    table
};

/// Whether `byte` may appear in a member key.
pub fn is_key_byte(byte: u8) -> bool {
    KEY_BYTES[usize::from(byte)]
}

fn is_key(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(is_key_byte)
}

/// Refuses a body whose string to sign (with nested values written as configured) could also be read
/// as another admitted body.
pub fn check(body: &Body<'_>, nested: NestedValues) -> Result<(), Ambiguity> {
    let members = body.members();
    if !members.iter().all(|member| is_key(&member.key)) {
        return Err(Ambiguity::Key);
    }
    if !body.may_contain_ampersand() {
        return Ok(());
    }
    for member in members {
        let text: Cow<'_, str> = match &member.value {
            Value::Str(text) => Cow::Borrowed(text),
            Value::Nested(text) => match nested {
                NestedValues::AsWritten => Cow::Borrowed(text.as_str()),
                NestedValues::Reserialized => serde_json::from_str::<serde_json::Value>(text)
                    .map_or(Cow::Borrowed(text.as_str()), |value| {
                        Cow::Owned(value.to_string())
                    }),
            },
            // Numbers, booleans and null (in any `null_values` form) are written without `&`.
            Value::Token(_) | Value::Null => continue,
        };
        if hides_member(&text, &member.key) {
            return Err(Ambiguity::HiddenMember {
                key: member.key.to_string(),
            });
        }
    }
    Ok(())
}

/// Whether `value` contains `&NAME=` with `NAME` a possible key sorting after `key` (byte
/// order): a place where another reading of the string to sign starts a member.
fn hides_member(value: &str, key: &str) -> bool {
    let bytes = value.as_bytes();
    for amp in memchr::memchr_iter(b'&', bytes) {
        let start = amp + 1;
        let Some(len) = memchr::memchr(b'=', &bytes[start..]) else {
            // No `=` after this `&`, so none after any later one either.
            return false;
        };
        let name = &value[start..start + len];
        if is_key(name) && name.as_bytes() > key.as_bytes() {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::signature::NullValues;
    use proptest::prelude::*;

    fn check_json(body: &str) -> Result<(), Ambiguity> {
        check(
            &Body::from_json(body.as_bytes()).expect("well-formed test body"),
            NestedValues::AsWritten,
        )
    }

    #[test]
    fn keys_outside_the_callback_alphabet_are_refused() {
        for body in [
            r#"{"partner_code":"P1","received_at=1700000000000&sim_id":"x"}"#,
            r#"{"a b":"x"}"#,
            r#"{"":"x"}"#,
            r#"{"a\u0000":"x"}"#,
            r#"{"ключ":"x"}"#,
            r#"{"a=b":"x"}"#,
            r#"{"a&b":"x"}"#,
        ] {
            assert_eq!(check_json(body), Err(Ambiguity::Key), "{body}");
        }
        assert_eq!(
            check_json(r#"{"Partner-Code.v2_x":"1","a":{"any key":1}}"#),
            Ok(())
        );
    }

    #[test]
    fn a_value_that_reads_as_a_later_member_is_refused() {
        let hidden = |key: &str| {
            Err(Ambiguity::HiddenMember {
                key: key.to_string(),
            })
        };
        // (body, expected)
        let cases = [
            (r#"{"note":"hello&notify=true"}"#, hidden("note")),
            (r#"{"a":"x&b=y","c":"z"}"#, hidden("a")),
            // After the next key too: `{"a":"x","d":"y&c=z"}` shares its string to sign.
            (r#"{"a":"x&d=y","c":"z"}"#, hidden("a")),
            // Before or equal to the value's own key: no reading starts a member there.
            (r#"{"m":"x&a=y"}"#, Ok(())),
            (r#"{"a":"x&a=y"}"#, Ok(())),
            (r#"{"a":"x","d":"y&c=z"}"#, Ok(())),
            // Not a key: a reading that split there would have a key lfguard refuses.
            (r#"{"a":"x&b b=y"}"#, Ok(())),
            (r#"{"a":"x&=y"}"#, Ok(())),
            (r#"{"a":"x&b"}"#, Ok(())),
            (r#"{"a":"x=&"}"#, Ok(())),
            // The second `&` is the one that reads as a member.
            (r#"{"a":"x&&b=y"}"#, hidden("a")),
            (r#"{"a":"x&!&b=y"}"#, hidden("a")),
            // Inside an object value as written.
            (r#"{"a":{"k":"x&b=y"},"c":1}"#, hidden("a")),
            (r#"{"a":1,"b":"x&c=1"}"#, hidden("b")),
            (r#"{"text_message":"device status: 1234 & more"}"#, Ok(())),
            (r#"{"text_message":"see https://x.test/?a=1&b=2"}"#, Ok(())),
        ];
        for (body, expected) in cases {
            assert_eq!(check_json(body), expected, "{body}");
        }
    }

    /// Every reading of `signed` (a string to sign without the secret) as a body of string
    /// members with strictly ascending keys: each a choice of the `&NAME=` that start members.
    fn readings(signed: &str) -> Vec<Vec<(String, String)>> {
        let starts: Vec<usize> = std::iter::once(0)
            .chain(signed.match_indices('&').map(|(i, _)| i + 1).filter(|&i| {
                signed[i..]
                    .find('=')
                    .is_some_and(|e| is_key(&signed[i..i + e]))
            }))
            .collect();
        let mut out = Vec::new();
        // Start 0 is always a member; each later start is taken or not.
        for mask in 0u32..(1 << (starts.len() - 1)) {
            let chosen: Vec<usize> = std::iter::once(0)
                .chain((1..starts.len()).filter(|i| mask & (1 << (i - 1)) != 0))
                .map(|i| starts[i])
                .collect();
            let members: Vec<(String, String)> = chosen
                .iter()
                .enumerate()
                .map(|(n, &start)| {
                    let end = chosen.get(n + 1).map_or(signed.len(), |&next| next - 1);
                    let (key, value) = signed[start..end].split_once('=').unwrap_or(("", ""));
                    (key.to_string(), value.to_string())
                })
                .collect();
            if members.windows(2).all(|w| w[0].0 < w[1].0) {
                out.push(members);
            }
        }
        out
    }

    fn as_json(members: &[(String, String)]) -> String {
        let object: serde_json::Map<String, serde_json::Value> = members
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        serde_json::Value::Object(object).to_string()
    }

    proptest! {
        /// The guarantee the module promises: of all the bodies that share a string to sign,
        /// lfguard admits at most one (types aside, which only a schema fixes).
        #[test]
        fn at_most_one_reading_of_a_string_to_sign_is_admitted(
            members in proptest::collection::btree_map("[a-d]{1,2}", "[a-d&=]{0,6}", 1..5),
        ) {
            let body = as_json(&members.into_iter().collect::<Vec<_>>());
            let parsed = Body::from_json(body.as_bytes()).unwrap();
            let signed = parsed.canonical(NullValues::Empty);
            let all = readings(&signed);
            prop_assume!(all.len() <= 64);
            let admitted: Vec<String> = all
                .iter()
                .map(|reading| as_json(reading))
                .filter(|json| check_json(json).is_ok())
                .collect();
            prop_assert!(admitted.len() <= 1, "{signed}: {admitted:?}");
        }
    }
}
