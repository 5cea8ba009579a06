//! Signature mismatch diagnostics. Linksfield's documents leave the null and nested
//! forms and the digest encoding open; when a signature fails, the documented variants are tried
//! and the one that matches is named by the configuration keys that would accept it. Only that
//! name leaves this module: never the secret, the string to sign or a body value. Pure.

use crate::verify::signature::{self, Body, Claimed, Encoding, NestedValues, NullValues};

/// The canonicalisation and encoding lfguard is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub encoding: Encoding,
    pub nulls: NullValues,
    pub nested: NestedValues,
}

/// A variant that matched: each field is `Some` where it differs from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Variant {
    pub encoding: Option<Encoding>,
    pub nulls: Option<NullValues>,
    pub nested: Option<NestedValues>,
}

impl Variant {
    /// A stable label, e.g. `null_values=skip,signature_encoding=raw`, for logs and metrics.
    pub fn name(&self) -> String {
        self.settings()
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The `[verify]` lines that would make lfguard accept this variant.
    pub fn config_fix(&self) -> String {
        self.settings()
            .iter()
            .map(|(key, value)| format!("{key} = \"{value}\""))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn settings(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        if let Some(nulls) = self.nulls {
            out.push((
                "null_values",
                match nulls {
                    NullValues::Empty => "empty",
                    NullValues::Skip => "skip",
                    NullValues::Literal => "literal",
                },
            ));
        }
        if let Some(nested) = self.nested {
            out.push((
                "nested_values",
                match nested {
                    NestedValues::AsWritten => "as_written",
                    NestedValues::Reserialized => "reserialized",
                },
            ));
        }
        if let Some(encoding) = self.encoding {
            out.push((
                "signature_encoding",
                match encoding {
                    Encoding::Auto => "auto",
                    Encoding::Hex => "hex",
                    Encoding::Raw => "raw",
                },
            ));
        }
        out
    }
}

/// Tries every documented variant other than the configured one against each secret.
pub fn find_variant(
    body: &Body<'_>,
    header: &[u8],
    secrets: &[&str],
    configured: Settings,
) -> Option<Variant> {
    let claimed = signature::decode_header(header, Encoding::Auto)?;
    let encoding_allowed = matches!(
        (configured.encoding, claimed),
        (Encoding::Auto, _) | (Encoding::Hex, Claimed::Hex(_)) | (Encoding::Raw, Claimed::Raw(_))
    );
    let encoding = (!encoding_allowed).then_some(match claimed {
        Claimed::Hex(_) => Encoding::Hex,
        Claimed::Raw(_) => Encoding::Raw,
    });
    let (has_null, has_nested) = body.has_null_or_nested();
    let null_options: &[NullValues] = if has_null {
        &[NullValues::Empty, NullValues::Skip, NullValues::Literal]
    } else {
        &[NullValues::Empty]
    };
    let nested_options: &[NestedValues] = if has_nested {
        &[NestedValues::AsWritten, NestedValues::Reserialized]
    } else {
        &[NestedValues::AsWritten]
    };
    for &nulls in null_options {
        for &nested in nested_options {
            let nulls = if has_null { nulls } else { configured.nulls };
            let nested = if has_nested {
                nested
            } else {
                configured.nested
            };
            if nulls == configured.nulls && nested == configured.nested && encoding.is_none() {
                continue;
            }
            let prepared = signature::Prepared::new(&body.canonical_with(nulls, nested));
            if secrets
                .iter()
                .any(|secret| claimed.matches(&prepared.digest(secret)))
            {
                return Some(Variant {
                    encoding,
                    nulls: (nulls != configured.nulls).then_some(nulls),
                    nested: (nested != configured.nested).then_some(nested),
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: Settings = Settings {
        encoding: Encoding::Auto,
        nulls: NullValues::Empty,
        nested: NestedValues::AsWritten,
    };

    fn signed(body: &Body<'_>, nulls: NullValues, nested: NestedValues, enc: Encoding) -> String {
        signature::sign(&body.canonical_with(nulls, nested), "k", enc)
    }

    #[test]
    fn names_the_variant_that_matched() {
        let body = Body::from_json(br#"{"a":null,"m":{ "z":1.50 },"p":"P1"}"#).unwrap();
        let cases = [
            (
                NullValues::Skip,
                NestedValues::AsWritten,
                "null_values=skip",
            ),
            (
                NullValues::Literal,
                NestedValues::AsWritten,
                "null_values=literal",
            ),
            (
                NullValues::Empty,
                NestedValues::Reserialized,
                "nested_values=reserialized",
            ),
            (
                NullValues::Skip,
                NestedValues::Reserialized,
                "null_values=skip,nested_values=reserialized",
            ),
        ];
        for (nulls, nested, expected) in cases {
            let header = signed(&body, nulls, nested, Encoding::Hex);
            let variant = find_variant(&body, header.as_bytes(), &["other", "k"], DEFAULTS);
            assert_eq!(variant.map(|v| v.name()).as_deref(), Some(expected));
        }
        let fix = Variant {
            nulls: Some(NullValues::Skip),
            ..Variant::default()
        };
        assert_eq!(fix.config_fix(), "null_values = \"skip\"");
    }

    #[test]
    fn a_pinned_encoding_is_reported_as_the_variant() {
        let body = Body::from_json(br#"{"p":"P1"}"#).unwrap();
        let raw = signed(
            &body,
            NullValues::Empty,
            NestedValues::AsWritten,
            Encoding::Raw,
        );
        let pinned = Settings {
            encoding: Encoding::Hex,
            ..DEFAULTS
        };
        let variant = find_variant(&body, raw.as_bytes(), &["k"], pinned).unwrap();
        assert_eq!(variant.name(), "signature_encoding=raw");
    }

    #[test]
    fn nothing_matches_without_the_secret() {
        let body = Body::from_json(br#"{"a":null,"p":"P1"}"#).unwrap();
        let header = signed(
            &body,
            NullValues::Skip,
            NestedValues::AsWritten,
            Encoding::Hex,
        );
        assert_eq!(
            find_variant(&body, header.as_bytes(), &["wrong"], DEFAULTS),
            None
        );
        assert_eq!(find_variant(&body, b"garbage", &["k"], DEFAULTS), None);
    }
}
