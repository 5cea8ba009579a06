//! Replay protection, every case run against both stores: the embedded memory store and
//! a real `redis-server`.

mod support;

use std::time::Duration;

use support::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Memory,
    Redis,
}

/// lfguard in front of `backend` with the given store (and its Redis, kept alive by the caller).
fn start(store: Store, backend: &Backend, extra: &str) -> (Lfguard, Option<Redis>) {
    start_on(store, &backend.url(), extra)
}

/// The same in front of any upstream URL, e.g. one where no backend listens yet.
fn start_on(store: Store, upstream: &str, extra: &str) -> (Lfguard, Option<Redis>) {
    let redis = (store == Store::Redis).then(Redis::start);
    let mut config = base_config(upstream);
    if let Some(redis) = &redis {
        merge(
            &mut config,
            &format!(
                "[replay]\nstore = \"redis\"\nredis_url = \"{}\"",
                redis.url()
            ),
        );
    }
    merge(&mut config, extra);
    (Lfguard::start_with(config, &[]), redis)
}

/// Runs a case once per store.
macro_rules! both_stores {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[test]
            fn memory() {
                super::$case(super::Store::Memory)
            }
            #[test]
            fn redis() {
                super::$case(super::Store::Redis)
            }
        }
    )*};
}

both_stores!(
    replay_under_a_new_delivery_id_is_not_forwarded,
    a_client_that_goes_away_leaves_the_claim_to_the_backend_answer,
    reject_policy_answers_409,
    retry_after_a_backend_failure_is_forwarded_again,
    retry_after_the_backend_was_down_is_forwarded,
    concurrent_copies_are_forwarded_once,
    a_copy_in_flight_gets_409_with_retry_after,
    stale_and_future_timestamps_are_refused_in_every_format,
);

fn replay_under_a_new_delivery_id_is_not_forwarded(store: Store) {
    let backend = Backend::start();
    let (lfguard, _redis) = start(store, &backend, "");
    let original = Callback::signed(sms_body());
    assert_eq!(lfguard.post(&original).status, 200);

    for copy in [original.clone(), original.with_new_delivery_id()] {
        let response = lfguard.post(&copy);
        assert_eq!(response.status, 200);
        assert_eq!(response.header("x-lfguard-duplicate"), Some("true"));
        assert_eq!(response.json()["status"], "duplicate");
    }
    assert_eq!(backend.count(), 1);
    lfguard.wait_for_logs(2, |e| e["code"] == "duplicate");
}

fn reject_policy_answers_409(store: Store) {
    let backend = Backend::start();
    let (lfguard, _redis) = start(store, &backend, "[replay]\non_duplicate = \"reject\"");
    let original = Callback::signed(sms_body());
    assert_eq!(lfguard.post(&original).status, 200);
    let response = lfguard.post(&original.with_new_delivery_id());
    assert_eq!((response.status, response.code().as_str()), (409, "replay"));
    assert_eq!(backend.count(), 1);
}

fn retry_after_a_backend_failure_is_forwarded_again(store: Store) {
    let backend = Backend::start();
    backend.script([Reply {
        status: 500,
        ..Reply::default()
    }]);
    let (lfguard, _redis) = start(store, &backend, "");
    let callback = Callback::signed(sms_body());
    assert_eq!(lfguard.post(&callback).status, 500);
    // Linksfield retries (every 6 hours for usage alerts) with a new delivery id.
    assert_eq!(lfguard.post(&callback.with_new_delivery_id()).status, 200);
    assert_eq!(backend.count(), 2);
    // Once delivered, the next retry stops at lfguard.
    let response = lfguard.post(&callback.with_new_delivery_id());
    assert_eq!(response.header("x-lfguard-duplicate"), Some("true"));
    assert_eq!(backend.count(), 2);
}

fn retry_after_the_backend_was_down_is_forwarded(store: Store) {
    let port = free_port();
    let (lfguard, _redis) = start_on(store, &format!("http://127.0.0.1:{port}"), "");
    let callback = Callback::signed(sms_body());
    let response = lfguard.post(&callback);
    assert_eq!(
        (response.status, response.code().as_str()),
        (502, "upstream_unavailable")
    );

    let backend = Backend::start_on(format!("127.0.0.1:{port}").parse().unwrap());
    assert_eq!(lfguard.post(&callback.with_new_delivery_id()).status, 200);
    assert_eq!(backend.count(), 1);
}

fn concurrent_copies_are_forwarded_once(store: Store) {
    let backend = Backend::start();
    // The first copy stays in flight long enough for the others to meet its claim.
    backend.set_reply(Reply {
        delay: Duration::from_millis(300),
        ..Reply::default()
    });
    let (lfguard, _redis) = start(store, &backend, "");
    let callback = Callback::signed(sms_body());
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
    let responses: Vec<Response> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let copy = callback.with_new_delivery_id();
                let barrier = barrier.clone();
                let addr = lfguard.addr;
                scope.spawn(move || {
                    barrier.wait();
                    copy.send(addr)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let forwarded = responses
        .iter()
        .filter(|r| r.status == 200 && r.header("x-lfguard-duplicate").is_none())
        .count();
    assert_eq!(forwarded, 1, "{responses:?}");
    for response in &responses {
        let duplicate = response.status == 200 && response.header("x-lfguard-duplicate").is_some();
        let in_flight = response.status == 409 && response.code() == "in_flight";
        let first = response.status == 200 && response.header("x-lfguard-duplicate").is_none();
        assert!(duplicate || in_flight || first, "{response:?}");
    }
    assert_eq!(backend.count(), 1);
}

fn a_copy_in_flight_gets_409_with_retry_after(store: Store) {
    let backend = Backend::start();
    backend.set_reply(Reply {
        delay: Duration::from_secs(2),
        ..Reply::default()
    });
    let (lfguard, _redis) = start(store, &backend, "[upstream]\ntimeout = \"10s\"");
    let callback = Callback::signed(sms_body());
    let addr = lfguard.addr;
    let first = {
        let callback = callback.clone();
        std::thread::spawn(move || callback.send(addr))
    };
    backend.wait_for(1);
    let response = lfguard.post(&callback.with_new_delivery_id());
    assert_eq!(
        (response.status, response.code().as_str()),
        (409, "in_flight")
    );
    let retry_after: u64 = response.header("retry-after").unwrap().parse().unwrap();
    assert!(
        retry_after >= 10,
        "retry after the claim can have expired: {retry_after}"
    );
    assert_eq!(first.join().unwrap().status, 200);
    assert_eq!(backend.count(), 1);
}

fn stale_and_future_timestamps_are_refused_in_every_format(store: Store) {
    let backend = Backend::start();
    let (lfguard, _redis) = start(
        store,
        &backend,
        "[verify]\nmax_age = \"1h\"\nmax_skew = \"5m\"\n[replay]\nwindow = \"2h\"",
    );
    let now = now_millis() / 1000;
    type Format = fn(u64) -> String;
    let formats: [(&str, Format); 5] = [
        ("epoch ms", |s| format!("\"{}\"", s * 1000)),
        ("epoch s", |s| s.to_string()),
        ("rfc3339", |s| format!("\"{}\"", rfc3339(s))),
        ("compact", |s| {
            format!("\"{}\"", rfc3339(s).replace(':', "").trim_end_matches('Z'))
        }),
        ("spaced", |s| {
            format!("\"{}\"", rfc3339(s).replace('T', " ").trim_end_matches('Z'))
        }),
    ];
    for (name, format) in formats {
        for (offset, expected) in [(-7200i64, 401), (3600, 401), (-60, 200), (120, 200)] {
            let at = now.checked_add_signed(offset).unwrap();
            let body = format!(
                r#"{{"partner_code":"{PARTNER}","text_message":"{name} {offset}","received_at":{}}}"#,
                format(at)
            );
            let response = lfguard.post(&Callback::signed(body.clone()));
            assert_eq!(
                response.status,
                expected,
                "{name} {offset}: {body} → {}",
                response.text()
            );
            if expected == 401 {
                assert_eq!(response.code(), "stale");
            }
        }
    }
    let unreadable = format!(r#"{{"partner_code":"{PARTNER}","received_at":"yesterday"}}"#);
    assert_eq!(lfguard.post(&Callback::signed(unreadable)).code(), "stale");
    let without = format!(r#"{{"partner_code":"{PARTNER}","text_message":"no timestamp"}}"#);
    let response = lfguard.post(&Callback::signed(without));
    assert_eq!(
        (response.status, response.code().as_str()),
        (400, "missing_timestamp"),
        "no timestamp member: refused by default"
    );
    assert_eq!(backend.count(), 10);
}

/// `YYYY-MM-DDTHH:MM:SSZ` for epoch seconds, without a date crate in the tests.
fn rfc3339(epoch: u64) -> String {
    let days = epoch / 86_400;
    let secs = epoch % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[test]
fn two_lfguards_sharing_redis_catch_a_replay_sent_to_the_other() {
    let redis = Redis::start();
    let backend = Backend::start();
    let shared = format!(
        "[replay]\nstore = \"redis\"\nredis_url = \"{}\"",
        redis.url()
    );
    let first = Lfguard::start(&backend, &shared);
    let second = Lfguard::start(&backend, &shared);
    let callback = Callback::signed(sms_body());
    assert_eq!(first.post(&callback).status, 200);
    let response = second.post(&callback.with_new_delivery_id());
    assert_eq!(response.header("x-lfguard-duplicate"), Some("true"));
    assert_eq!(backend.count(), 1);
}

#[test]
fn redis_down_fails_closed_and_recovers_without_restart() {
    let mut redis = Redis::start();
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        &format!(
            "[replay]\nstore = \"redis\"\nredis_url = \"{}\"",
            redis.url()
        ),
    );
    assert_eq!(lfguard.post(&Callback::signed(sms_body())).status, 200);
    assert_eq!(admin_get(lfguard.admin, "/readyz").status, 200);

    redis.stop();
    let response = lfguard.post(&Callback::signed(sms_body()));
    assert_eq!(
        (response.status, response.code().as_str()),
        (503, "replay_store_unavailable")
    );
    // Where the store lives and how it failed go to the log, not to the caller.
    assert_eq!(
        response.json()["error"]["message"],
        "replay store unavailable; retry later"
    );
    assert_eq!(admin_get(lfguard.admin, "/readyz").status, 503);
    assert_eq!(
        backend.count(),
        1,
        "fail closed: nothing forwarded without the store"
    );

    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let callback = Callback::signed(sms_body());
    loop {
        let response = lfguard.post(&callback.with_new_delivery_id());
        if response.status == 200 {
            break;
        }
        assert_eq!(response.status, 503, "{}", response.text());
        assert!(
            std::time::Instant::now() < deadline,
            "lfguard did not reconnect to redis"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(admin_get(lfguard.admin, "/readyz").status, 200);
    assert_eq!(backend.count(), 2);
}

#[test]
fn lfguard_starts_not_ready_while_redis_is_down_and_becomes_ready() {
    let mut redis = Redis::start();
    redis.stop();
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        &format!(
            "[replay]\nstore = \"redis\"\nredis_url = \"{}\"",
            redis.url()
        ),
    );
    assert_eq!(admin_get(lfguard.admin, "/readyz").status, 503);
    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while admin_get(lfguard.admin, "/readyz").status != 200 {
        assert!(std::time::Instant::now() < deadline, "never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_claim_is_keyed_by_partner_and_signature_not_delivery_id() {
    let backend = Backend::start();
    let (lfguard, _redis) = start(Store::Memory, &backend, "");
    // Same delivery id, different bodies: two distinct callbacks, both forwarded.
    let first = Callback::signed(sms_body());
    let second = Callback::signed(sms_body())
        .replacing("x-lf-delivery", first.header("x-lf-delivery").unwrap());
    assert_eq!(lfguard.post(&first).status, 200);
    let response = lfguard.post(&second);
    assert_eq!(
        (response.status, response.header("x-lfguard-duplicate")),
        (200, None)
    );
    assert_eq!(backend.count(), 2);
}

/// A client that goes away once its callback is with the backend does not free the claim: the
/// exchange completes and the backend's answer settles it, with either store.
fn a_client_that_goes_away_leaves_the_claim_to_the_backend_answer(store: Store) {
    use std::io::Write;
    let backend = Backend::start();
    backend.script([Reply {
        delay: Duration::from_millis(500),
        ..Reply::default()
    }]);
    let (lfguard, _redis) = start(store, &backend, "");
    let callback = Callback::signed(sms_body());
    let mut client = std::net::TcpStream::connect(lfguard.addr).unwrap();
    client.write_all(&callback.to_bytes()).unwrap();
    backend.wait_for(1);
    drop(client);
    let closed =
        lfguard.wait_for_log(|e| e["message"] == "request" && e["code"] == "client_closed");
    assert_eq!(closed["status"], 499);
    assert_eq!(
        closed["delivery_id"],
        callback.header("x-lf-delivery").unwrap()
    );
    // Linksfield's retry waits while the backend still has the first (409 in_flight), and is a
    // duplicate once the backend's 2xx settled it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let response = loop {
        let response = lfguard.post(&callback.with_new_delivery_id());
        if response.status == 409 && std::time::Instant::now() < deadline {
            assert_eq!(response.code(), "in_flight");
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        break response;
    };
    assert_eq!(
        (response.status, response.header("x-lfguard-duplicate")),
        (200, Some("true")),
        "{}",
        response.text()
    );
    assert_eq!(backend.count(), 1);
    assert!(
        !lfguard
            .logs()
            .iter()
            .any(|line| line.contains("abandoned replay claim released")),
        "the claim was released when the client went away"
    );
}

/// `rediss://` is accepted: TLS is set up (here the handshake fails against a plain server, so the
/// store is unavailable) without the process failing.
#[test]
fn a_tls_redis_url_is_accepted_and_fails_closed_when_tls_fails() {
    let redis = Redis::start();
    let backend = Backend::start();
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let lfguard = Lfguard::start(
        &backend,
        &format!("[replay]\nstore = \"redis\"\nredis_url = \"{url}\""),
    );
    let response = lfguard.post(&Callback::signed(sms_body()));
    assert_eq!(
        (response.status, response.code().as_str()),
        (503, "replay_store_unavailable")
    );
    assert_eq!(
        admin_get(lfguard.admin, "/healthz").status,
        200,
        "still running"
    );
    assert_eq!(backend.count(), 0);
}

#[test]
fn deployments_with_different_key_prefixes_share_a_redis_without_sharing_keys() {
    let redis = Redis::start();
    let backend = Backend::start();
    let with_prefix = |prefix: &str| {
        Lfguard::start(
            &backend,
            &format!(
                "[replay]\nstore = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"",
                redis.url()
            ),
        )
    };
    let blue = with_prefix("blue:");
    let green = with_prefix("green:");
    let callback = Callback::signed(sms_body());
    assert_eq!(blue.post(&callback).status, 200);
    let other = green.post(&callback.with_new_delivery_id());
    assert_eq!(
        (other.status, other.header("x-lfguard-duplicate")),
        (200, None)
    );
    let same = blue.post(&callback.with_new_delivery_id());
    assert_eq!(same.header("x-lfguard-duplicate"), Some("true"));
    assert_eq!(backend.count(), 2);
}

#[test]
fn a_full_memory_store_refuses_new_claims_rather_than_evict_one_in_flight() {
    let backend = Backend::start();
    backend.script([Reply {
        delay: Duration::from_secs(2),
        ..Reply::default()
    }]);
    let (lfguard, _) = start(
        Store::Memory,
        &backend,
        "[replay]\ncapacity = 1\n[upstream]\ntimeout = \"10s\"",
    );
    let a = Callback::signed(sms_body());
    let addr = lfguard.addr;
    let first = {
        let a = a.clone();
        std::thread::spawn(move || a.send(addr))
    };
    backend.wait_for(1);
    let b = Callback::signed(sms_body());
    let refused = lfguard.post(&b);
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (503, "replay_store_unavailable")
    );
    assert!(refused.header("retry-after").is_some());
    let copy = lfguard.post(&a.with_new_delivery_id());
    assert_eq!((copy.status, copy.code().as_str()), (409, "in_flight"));
    assert_eq!(first.join().unwrap().status, 200);
    // The claim settled, B is taken now; A reached the backend once.
    assert_eq!(lfguard.post(&b).status, 200);
    let received = backend.requests();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].body.as_ref(), a.body.as_slice());
    assert_eq!(received[1].body.as_ref(), b.body.as_slice());
    assert_eq!(metric(&lfguard, "lfguard_replay_claims_refused_total"), 1.0);
    assert_eq!(metric(&lfguard, "lfguard_replay_evictions_total"), 1.0);
}

#[test]
fn many_callbacks_in_flight_with_copies_are_each_delivered_at_most_once() {
    const CALLBACKS: usize = 150;
    let backend = Backend::start();
    backend.set_reply(Reply {
        delay: Duration::from_millis(1500),
        ..Reply::default()
    });
    let (lfguard, _) = start(Store::Memory, &backend, "[replay]\ncapacity = 100");
    let callbacks: Vec<Callback> = (0..CALLBACKS)
        .map(|_| Callback::signed(sms_body()))
        .collect();
    let addr = lfguard.addr;
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let originals: Vec<_> = callbacks
            .iter()
            .map(|c| scope.spawn(move || c.send(addr).status))
            .collect();
        // Copies while the first hundred are in flight.
        backend.wait_for(100);
        let copies: Vec<_> = callbacks
            .iter()
            .map(|c| {
                let copy = c.with_new_delivery_id();
                scope.spawn(move || copy.send(addr).status)
            })
            .collect();
        originals
            .into_iter()
            .chain(copies)
            .map(|h| h.join().unwrap())
            .collect()
    });
    assert!(
        statuses.iter().all(|s| [200, 409, 503].contains(s)),
        "{statuses:?}"
    );
    let received = backend.requests();
    for callback in &callbacks {
        let copies = received
            .iter()
            .filter(|r| r.body.as_ref() == callback.body.as_slice())
            .count();
        assert!(copies <= 1, "delivered {copies} times");
    }
    assert!(received.len() >= 100, "{}", received.len());
}

#[test]
fn the_memory_store_remembers_exactly_the_last_capacity_deliveries() {
    const CAPACITY: usize = 17;
    let backend = Backend::start();
    let (lfguard, _) = start(
        Store::Memory,
        &backend,
        &format!("[replay]\ncapacity = {CAPACITY}"),
    );
    let callbacks: Vec<Callback> = (0..2 * CAPACITY)
        .map(|_| Callback::signed(sms_body()))
        .collect();
    for callback in &callbacks {
        assert_eq!(lfguard.post(callback).status, 200);
    }
    assert_eq!(metric(&lfguard, "lfguard_replay_entries"), CAPACITY as f64);
    assert_eq!(metric(&lfguard, "lfguard_replay_capacity"), CAPACITY as f64);
    assert_eq!(
        metric(&lfguard, "lfguard_replay_evictions_total"),
        CAPACITY as f64
    );
    for callback in &callbacks[CAPACITY..] {
        let response = lfguard.post(&callback.with_new_delivery_id());
        assert_eq!(response.header("x-lfguard-duplicate"), Some("true"));
    }
    // One further back was forgotten (and is within its freshness window, so forwarded again).
    let forgotten = lfguard.post(&callbacks[CAPACITY - 1].with_new_delivery_id());
    assert_eq!(forgotten.header("x-lfguard-duplicate"), None);
    assert_eq!(backend.count(), 2 * CAPACITY + 1);
}

#[test]
fn the_first_callback_after_a_redis_restart_is_delivered() {
    let backend = Backend::start();
    let (lfguard, redis) = start(Store::Redis, &backend, "");
    let mut redis = redis.unwrap();
    assert_eq!(lfguard.post(&Callback::signed(sms_body())).status, 200);
    // No readiness probe touches the connection in between: the callback meets it dropped.
    redis.stop();
    redis.restart();
    let response = lfguard.post(&Callback::signed(sms_body()));
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(backend.count(), 2);
}

#[test]
fn a_claim_that_timed_out_while_redis_hung_does_not_block_the_retry() {
    let backend = Backend::start();
    let (lfguard, redis) = start(Store::Redis, &backend, "");
    let redis = redis.unwrap();
    assert_eq!(lfguard.post(&Callback::signed(sms_body())).status, 200);
    let callback = Callback::signed(sms_body());
    redis.pause(true);
    let refused = lfguard.post(&callback);
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (503, "replay_store_unavailable")
    );
    // Redis executes the queued claim when it resumes; lfguard then releases it.
    redis.pause(false);
    lfguard.wait_for_log(|e| e["message"] == "released a replay claim left by a timed-out command");
    let retry = lfguard.post(&callback.with_new_delivery_id());
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert_eq!(retry.header("x-lfguard-duplicate"), None);
    assert_eq!(backend.count(), 2);
}
