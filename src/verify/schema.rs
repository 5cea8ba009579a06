//! Member schemas for a callback type (`[schemas.NAME]`, chosen per route). Pure: no I/O.
//!
//! The string to sign carries no JSON types and no member boundaries that a value cannot fake, so
//! the body `{"amount":100,"paid":true}` verifies under the signature of
//! `{"amount":"100","paid":"true"}`, and an object under the signature of a string of its text.
//! `ambiguity.rs` refuses what can be refused without knowing the callback type; a schema that
//! names each member and its one JSON type refuses the rest: a retyped value no longer matches,
//! and a member split off another value is a member the schema does not have.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::verify::signature::{Body, Value};

/// The JSON type of a member value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JsonType {
    String,
    Number,
    Boolean,
    Object,
    Array,
    Null,
}

impl JsonType {
    pub fn of(value: &Value<'_>) -> JsonType {
        match value {
            Value::Str(_) => JsonType::String,
            Value::Token(token) if token.starts_with(['t', 'f']) => JsonType::Boolean,
            Value::Token(_) => JsonType::Number,
            Value::Nested(text) if text.starts_with('[') => JsonType::Array,
            Value::Nested(_) => JsonType::Object,
            Value::Null => JsonType::Null,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JsonType::String => "string",
            JsonType::Number => "number",
            JsonType::Boolean => "boolean",
            JsonType::Object => "object",
            JsonType::Array => "array",
            JsonType::Null => "null",
        }
    }
}

/// One member of a schema: its type, and whether every body must have it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRule {
    #[serde(rename = "type")]
    pub kind: JsonType,
    #[serde(default = "required_by_default")]
    pub required: bool,
}

fn required_by_default() -> bool {
    true
}

/// The members a callback type has. Exactly one JSON type per member: allowing two would let a
/// value be retyped under the same signature again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Schema {
    /// Whether members the schema does not name are allowed (their types are then unchecked, and
    /// a member split off a value can hide among them).
    pub other_members: bool,
    pub members: BTreeMap<String, MemberRule>,
}

/// Why a body does not match its route's schema. Names keys (schema keys, or a body key already
/// checked to be `[A-Za-z0-9_.-]`), never values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    Missing(String),
    WrongType {
        key: String,
        expected: JsonType,
        found: JsonType,
    },
    Unexpected(String),
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::Missing(key) => write!(f, "the route's schema requires member {key}"),
            Mismatch::WrongType {
                key,
                expected,
                found,
            } => write!(
                f,
                "member {key} is a {}, the route's schema says {}",
                found.as_str(),
                expected.as_str()
            ),
            Mismatch::Unexpected(key) => {
                write!(f, "member {key} is not in the route's schema")
            }
        }
    }
}

impl Schema {
    /// Checks every member of `body` against the schema (both are sorted by key: one merge pass).
    pub fn check(&self, body: &Body<'_>) -> Result<(), Mismatch> {
        let mut members = body.members().iter().peekable();
        for (name, rule) in &self.members {
            while let Some(member) =
                members.next_if(|member| member.key.as_bytes() < name.as_bytes())
            {
                if !self.other_members {
                    return Err(Mismatch::Unexpected(member.key.to_string()));
                }
            }
            match members.next_if(|member| member.key == name.as_str()) {
                Some(member) => {
                    let found = JsonType::of(&member.value);
                    if found != rule.kind {
                        return Err(Mismatch::WrongType {
                            key: name.clone(),
                            expected: rule.kind,
                            found,
                        });
                    }
                }
                None if rule.required => return Err(Mismatch::Missing(name.clone())),
                None => {}
            }
        }
        match members.next() {
            Some(member) if !self.other_members => {
                Err(Mismatch::Unexpected(member.key.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Problems that make a schema unusable, each naming its key under `at`.
    pub fn problems(&self, at: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if self.members.is_empty() {
            problems.push(format!("{at}.members: a schema names at least one member"));
        }
        for key in self.members.keys() {
            if !key.bytes().all(crate::verify::ambiguity::is_key_byte) || key.is_empty() {
                problems.push(format!(
                    "{at}.members.{key}: a member key is ASCII letters, digits, '_', '-' and '.'"
                ));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sms_uplink() -> Schema {
        let rule = |kind, required| MemberRule { kind, required };
        Schema {
            other_members: false,
            members: [
                ("imsi", rule(JsonType::String, true)),
                ("message_type", rule(JsonType::String, false)),
                ("partner_code", rule(JsonType::String, true)),
                ("received_at", rule(JsonType::String, true)),
                ("sim_id", rule(JsonType::String, true)),
                ("text_message", rule(JsonType::String, true)),
            ]
            .into_iter()
            .map(|(key, rule)| (key.to_string(), rule))
            .collect(),
        }
    }

    const UPLINK: &str = r#"{"imsi":"4600","partner_code":"P1","received_at":"1700000000000","sim_id":"8986","text_message":"hi"}"#;

    fn check(schema: &Schema, body: &str) -> Result<(), Mismatch> {
        schema.check(&Body::from_json(body.as_bytes()).expect("well-formed test body"))
    }

    #[test]
    fn the_documented_sms_uplink_matches_its_schema() {
        let schema = sms_uplink();
        assert_eq!(check(&schema, UPLINK), Ok(()));
        let binary = UPLINK.replace(r#""imsi""#, r#""message_type":"Binary","imsi""#);
        assert_eq!(check(&schema, &binary), Ok(()));
    }

    #[test]
    fn retyped_missing_and_extra_members_do_not() {
        let schema = sms_uplink();
        let cases = [
            (
                UPLINK.replace(r#""4600""#, "4600"),
                Mismatch::WrongType {
                    key: "imsi".into(),
                    expected: JsonType::String,
                    found: JsonType::Number,
                },
            ),
            (
                UPLINK.replace(r#""hi""#, r#"{"t":"hi"}"#),
                Mismatch::WrongType {
                    key: "text_message".into(),
                    expected: JsonType::String,
                    found: JsonType::Object,
                },
            ),
            (
                UPLINK.replace(r#""hi""#, "true"),
                Mismatch::WrongType {
                    key: "text_message".into(),
                    expected: JsonType::String,
                    found: JsonType::Boolean,
                },
            ),
            (
                UPLINK.replace(r#""imsi":"4600","#, ""),
                Mismatch::Missing("imsi".into()),
            ),
            (
                UPLINK.replace(r#""imsi""#, r#""aaa":"1","imsi""#),
                Mismatch::Unexpected("aaa".into()),
            ),
            (
                UPLINK.replace(r#""hi""#, r#""hi","zzz":"1""#),
                Mismatch::Unexpected("zzz".into()),
            ),
            (
                UPLINK.replace(r#""hi""#, r#""hi","text_messagf":"1""#),
                Mismatch::Unexpected("text_messagf".into()),
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(check(&schema, &body), Err(expected), "{body}");
        }
    }

    #[test]
    fn other_members_may_be_allowed() {
        let mut schema = sms_uplink();
        schema.other_members = true;
        let extra = UPLINK.replace(r#""hi""#, r#""hi","zzz":1"#);
        assert_eq!(check(&schema, &extra), Ok(()));
        let first = UPLINK.replace(r#""imsi""#, r#""aaa":[1],"imsi""#);
        assert_eq!(check(&schema, &first), Ok(()));
    }

    #[test]
    fn json_types() {
        let body = Body::from_json(
            br#"{"a":"s","b":-1.5e3,"c":true,"d":false,"e":{"x":1},"f":[1],"g":null}"#,
        )
        .unwrap();
        let types: Vec<JsonType> = body
            .members()
            .iter()
            .map(|m| JsonType::of(&m.value))
            .collect();
        use JsonType::*;
        assert_eq!(
            types,
            [String, Number, Boolean, Boolean, Object, Array, Null]
        );
    }

    /// A member as a generator writes it: its key, and its value as JSON text.
    type Written = (String, String);

    fn json_of(members: &[Written]) -> String {
        let inner: Vec<String> = members
            .iter()
            .map(|(key, value)| format!("{}:{value}", serde_json::Value::from(key.as_str())))
            .collect();
        format!("{{{}}}", inner.join(","))
    }

    fn quoted(text: &str) -> String {
        serde_json::Value::from(text).to_string()
    }

    /// The text a value has in the string to sign.
    fn signed_text(value: &str) -> String {
        match serde_json::from_str::<serde_json::Value>(value) {
            Ok(serde_json::Value::String(text)) => text,
            _ => value.to_string(),
        }
    }

    /// The schema a route would have for exactly this body's members and types.
    fn schema_of(body: &Body<'_>) -> Schema {
        Schema {
            other_members: false,
            members: body
                .members()
                .iter()
                .map(|m| {
                    let rule = MemberRule {
                        kind: JsonType::of(&m.value),
                        required: true,
                    };
                    (m.key.to_string(), rule)
                })
                .collect(),
        }
    }

    /// The restructurings of a signed body that keep its string to sign (where they apply).
    fn restructured(members: &[Written], at: usize) -> Vec<(&'static str, String, bool)> {
        let mut out = Vec::new();
        let n = members.len();
        let (key, value) = &members[at % n];
        let text = signed_text(value);
        if at + 1 < n {
            let (next_key, next_value) = &members[at + 1];
            let mut rest = members.to_vec();
            rest.remove(at + 1);
            // fold: `k=v&k2` becomes one key.
            rest[at] = (format!("{key}={text}&{next_key}"), next_value.clone());
            out.push(("fold", json_of(&rest), false));
            // absorb: the next member moves into this value.
            rest[at] = (
                key.clone(),
                quoted(&format!("{text}&{next_key}={}", signed_text(next_value))),
            );
            out.push(("absorb", json_of(&rest), false));
        }
        // split: a `&NAME=` inside the value starts a member.
        if let Some((head, tail)) = text.split_once('&')
            && let Some((name, rest_text)) = tail.split_once('=')
        {
            let mut split = members.to_vec();
            split[at % n].1 = quoted(head);
            split.insert(at % n + 1, (name.to_string(), quoted(rest_text)));
            out.push(("split", json_of(&split), false));
        }
        // retype: a string read as a number, boolean or object, and back.
        let mut retyped = members.to_vec();
        retyped[at % n].1 = if value.starts_with('"') {
            text.clone()
        } else {
            quoted(&text)
        };
        out.push(("retype", json_of(&retyped), false));
        // form: the same members, form-encoded.
        let form: Vec<String> = members
            .iter()
            .map(|(k, v)| {
                let enc = |t: &str| {
                    percent_encoding::utf8_percent_encode(t, percent_encoding::NON_ALPHANUMERIC)
                        .to_string()
                };
                format!("{}={}", enc(k), enc(&signed_text(v)))
            })
            .collect();
        out.push(("form", form.join("&"), true));
        out
    }

    fn value_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-c&=]{0,5}".prop_map(|t| quoted(&t)),
            "[0-9]{1,3}".prop_map(|t| quoted(&t)),
            "[1-9][0-9]{0,2}",
            Just("true".to_string()),
            Just(quoted("true")),
            "[a-c&=]{0,3}".prop_map(|t| format!(r#"{{"k":{}}}"#, quoted(&t))),
            "[a-c&=]{0,3}".prop_map(|t| quoted(&format!(r#"{{"k":{}}}"#, quoted(&t)))),
        ]
    }

    proptest! {
        /// No restructuring of a signed body that keeps its string to sign (and with it the
        /// signature) is admitted on a route whose schema the signed body matches, unless it is
        /// member for member the signed body.
        #[test]
        fn restructured_bodies_fail_the_route_schema(
            members in proptest::collection::btree_map("[a-e]{1,2}", value_strategy(), 1..5),
            at in 0usize..5,
        ) {
            let members: Vec<Written> = members.into_iter().collect();
            let original = json_of(&members);
            let signed = Body::from_json(original.as_bytes()).unwrap();
            let schema = schema_of(&signed);
            let canonical = signed.canonical(crate::verify::signature::NullValues::Empty);
            for (name, text, is_form) in restructured(&members, at) {
                let parsed = if is_form {
                    Body::from_form(text.as_bytes())
                } else {
                    Body::from_json(text.as_bytes())
                };
                // Where a restructuring does not apply (the text is no key, the order changes),
                // it has another signature and is not what this property is about.
                let Ok(body) = parsed else { continue };
                if body.canonical(crate::verify::signature::NullValues::Empty) != canonical {
                    continue;
                }
                let admitted = crate::verify::ambiguity::check(&body, crate::verify::signature::NestedValues::AsWritten).is_ok()
                    && schema.check(&body).is_ok();
                let same = body.members().len() == signed.members().len()
                    && body.members().iter().zip(signed.members()).all(|(a, b)| {
                        a.key == b.key && JsonType::of(&a.value) == JsonType::of(&b.value)
                    });
                prop_assert!(!admitted || same, "{name}: {original} → {text}");
            }
        }
    }
}
