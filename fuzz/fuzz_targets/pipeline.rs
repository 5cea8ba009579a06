//! The verification pipeline up to the forward, without I/O (docs/verification.md, "How a request
//! is handled", steps 4-8): content type -> body reader -> `partner_code` -> canonical string -> signature check
//! against the partner's secrets under the configured encoding -> freshness -> replay key.
//!
//! Input layout: `[flags][sig_len][arrived: 4 bytes][sig_len signature bytes][body...]`.
//! - flags bit 0: form (`application/x-www-form-urlencoded`) instead of JSON;
//! - flags bits 1-2: `verify.signature_encoding` (auto, hex, raw, auto);
//! - flags bits 3-4: `verify.null_values` (empty, skip, literal, empty);
//! - flags bit 5: instead of using the signature bytes as they are, start from the *correct*
//!   signature of the body and apply the signature bytes to it as edits (replace / insert /
//!   delete / truncate), so the fuzzer explores near-misses of a valid header.
//!
//! Asserts: nothing panics; a header verifies only if it is exactly the canonical base64 of the
//! hex or raw digest of one of the secrets (no alternative spelling is accepted, and only under an
//! encoding that allows it); a signature made by `sign` always verifies, and only for its secret.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lfguard::freshness;
use lfguard::signature::{
    Body, Encoding, NullValues, Prepared, Value, decode_header, encode, hex_string, sign,
};
use libfuzzer_sys::fuzz_target;

/// The partner's secrets (rotation: any one may match).
const SECRETS: [&str; 2] = ["fuzz-secret-current", "fuzz-secret-previous"];

fn edit(mut signature: Vec<u8>, ops: &[u8]) -> Vec<u8> {
    for op in ops.chunks(2) {
        let (kind, arg) = (op[0] % 4, op.get(1).copied().unwrap_or(0));
        let at = usize::from(op[0] >> 2) % (signature.len() + 1);
        match kind {
            0 if at < signature.len() => signature[at] = arg,
            1 => signature.insert(at, arg),
            2 if at < signature.len() => {
                signature.remove(at);
            }
            3 => signature.truncate(at),
            _ => {}
        }
    }
    signature
}

fn allows(accepting: Encoding, produced: Encoding) -> bool {
    accepting == Encoding::Auto || accepting == produced
}

fuzz_target!(|data: &[u8]| {
    let [flags, sig_len, a, b, c, d, rest @ ..] = data else {
        return;
    };
    let sig_len = usize::from(*sig_len).min(rest.len());
    let (header, raw_body) = rest.split_at(sig_len);
    let form = flags & 1 == 1;
    let encoding = match (flags >> 1) & 3 {
        1 => Encoding::Hex,
        2 => Encoding::Raw,
        _ => Encoding::Auto,
    };
    let nulls = match (flags >> 3) & 3 {
        1 => NullValues::Skip,
        2 => NullValues::Literal,
        _ => NullValues::Empty,
    };
    // Arrival between 2020 and ~2156.
    let arrived = UNIX_EPOCH
        + Duration::from_secs(1_577_836_800 + u64::from(u32::from_be_bytes([*a, *b, *c, *d])));

    // Step 4: parse strictly.
    let parsed = if form {
        Body::from_form(raw_body)
    } else {
        Body::from_json(raw_body)
    };
    let Ok(body) = parsed else {
        return;
    };
    // Step 5: partner.
    let Some(Value::Str(partner)) = body.get("partner_code") else {
        return;
    };
    if partner.is_empty() {
        return;
    }
    // Step 6: verify against each secret.
    let canonical = body.canonical(nulls);
    let prepared = Prepared::new(&canonical);
    let digests = SECRETS.map(|secret| prepared.digest(secret));
    let header: Vec<u8> = if flags & 0x20 != 0 {
        let produced = if header.first().is_some_and(|b| b & 1 == 1) {
            Encoding::Raw
        } else {
            Encoding::Hex
        };
        edit(sign(&canonical, SECRETS[0], produced).into_bytes(), header)
    } else {
        header.to_vec()
    };
    let matched = decode_header(&header, encoding)
        .and_then(|claimed| digests.iter().position(|digest| claimed.matches(digest)));
    if let Some(index) = matched {
        let exact = [Encoding::Hex, Encoding::Raw].into_iter().any(|produced| {
            allows(encoding, produced) && encode(&digests[index], produced).as_bytes() == header
        });
        assert!(
            exact,
            "{:?} verified under {encoding:?} but is not an exact encoding of the digest",
            String::from_utf8_lossy(&header)
        );
    }
    // A signature made by `sign` always verifies, and only for its own secret.
    for (index, secret) in SECRETS.iter().enumerate() {
        for produced in [Encoding::Hex, Encoding::Raw] {
            let signature = sign(&canonical, secret, produced);
            match decode_header(signature.as_bytes(), encoding) {
                Some(claimed) => {
                    assert!(allows(encoding, produced));
                    assert_eq!(
                        digests.iter().position(|digest| claimed.matches(digest)),
                        Some(index)
                    );
                }
                None => assert!(!allows(encoding, produced)),
            }
        }
    }
    // Step 7: freshness of every member, read as a timestamp.
    let max_age = Duration::from_secs(24 * 3600);
    let max_skew = Duration::from_secs(300);
    for member in body.members() {
        let sent: Option<SystemTime> = freshness::parse(&member.value);
        let verdict = freshness::check(&member.value, arrived, max_age, max_skew);
        assert_eq!(
            sent.is_none(),
            verdict == Err(freshness::Staleness::Unreadable)
        );
    }
    // Step 8: the replay key.
    let digest = digests[matched.unwrap_or(0)];
    let key = format!("{partner}:{}", hex_string(&digest));
    assert_eq!(key.len(), partner.len() + 33);
});
