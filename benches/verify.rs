//! The verification hot path (parse + canonicalise + md5 + compare) for a typical SMS callback
//! and a 16 KiB one, and the memory replay store's claim/settle.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use lfguard::replay::memory::MemoryStore;
use lfguard::replay::{Claim, Key, Store};
use lfguard::signature::{self, Body, Encoding, NullValues};

const SECRET: &str = "xGl64jNW4B223SSDAsddgh=n";

fn sms_body() -> String {
    // 250 bytes, the shape of Linksfield's SMS uplink callback.
    let body = r#"{"partner_code":"P002671","sim_id":"89860220190123456789","imsi":"4230001234567","message_type":"Text","text_message":"device status: 1234, battery 87%, signal -71 dBm, temp 23.5C, location cell 4601-22-1234, ok","received_at":"1642385160000"}"#;
    assert!((230..=270).contains(&body.len()), "{}", body.len());
    body.to_string()
}

fn large_body() -> String {
    let mut members = vec![r#""partner_code":"P002671""#.to_string()];
    let mut i = 0;
    while members.iter().map(String::len).sum::<usize>() < 16 * 1024 - 64 {
        members.push(format!(
            r#""field_{i:04}":"value {i} \u53d1 with some text""#
        ));
        i += 1;
    }
    format!("{{{}}}", members.join(","))
}

/// What the proxy does per request: parse, canonicalise, hash, compare.
fn verify(body: &[u8], header: &[u8]) -> bool {
    let parsed = Body::from_json(body).expect("valid body");
    let claimed = signature::decode_header(header, Encoding::Auto).expect("valid header");
    let prepared = signature::Prepared::new(&parsed.canonical(NullValues::Empty));
    claimed.matches(&prepared.digest(SECRET))
}

fn bench_verify(c: &mut Criterion) {
    for (name, body) in [
        ("verify_sms_250b", sms_body()),
        ("verify_16kib", large_body()),
    ] {
        let canonical = Body::from_json(body.as_bytes())
            .unwrap()
            .canonical(NullValues::Empty);
        let header = signature::sign(&canonical, SECRET, Encoding::Hex);
        assert!(verify(body.as_bytes(), header.as_bytes()));
        c.bench_function(name, |b| {
            b.iter(|| verify(black_box(body.as_bytes()), black_box(header.as_bytes())))
        });
    }
}

fn bench_replay(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = MemoryStore::new(1_000_000);
    let window = Duration::from_secs(3600);
    let mut n = 0u64;
    c.bench_function("memory_claim_settle", |b| {
        b.iter(|| {
            n += 1;
            let key = Key {
                partner: "P002671".into(),
                digest: n.to_le_bytes().repeat(2).try_into().unwrap(),
            };
            runtime.block_on(async {
                let Claim::Claimed(token) = store.claim(&key, window).await.unwrap() else {
                    panic!("fresh key");
                };
                store.settle(&key, &token, window).await.unwrap();
            });
        })
    });
}

criterion_group!(benches, bench_verify, bench_replay);
criterion_main!(benches);
