//! Durable delivery (`[delivery] mode = "spool"`) with the real binary: callbacks accepted while
//! the backend is down and delivered, in order per partner, once it is back; a full or
//! unavailable spool refusing with 503 and acknowledging nothing; a poisoned callback ending in
//! the dead letters without holding up the others; SIGKILL and SIGTERM with callbacks spooled;
//! the `lfguard spool` commands and `GET /spool`.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use lfguard::signature::Encoding;
use support::*;

const OTHER_PARTNER: &str = "P000002";
const OTHER_SECRET: &str = "another-partners-secret";

/// Spool mode with a short backoff, a second partner, the spool in `spool_dir`.
fn spool_config(upstream: &str, spool_dir: &Path, extra: &str) -> toml::Table {
    let mut config = base_config(upstream);
    merge(
        &mut config,
        &format!(
            r#"
            [delivery]
            mode = "spool"
            spool_dir = "{}"
            backoff_initial = "50ms"
            backoff_max = "200ms"
            [partners.{OTHER_PARTNER}]
            secrets = ["{OTHER_SECRET}"]
            "#,
            spool_dir.display()
        ),
    );
    merge(&mut config, extra);
    config
}

/// A signed callback of `partner` whose text names it and `n`.
fn callback(partner: &str, n: usize) -> Callback {
    let secret = if partner == PARTNER {
        SECRET
    } else {
        OTHER_SECRET
    };
    let body = format!(
        r#"{{"partner_code":"{partner}","sim_id":"8986","text_message":"{partner} #{n} {}","received_at":"{}"}}"#,
        delivery_id(),
        now_millis()
    );
    Callback::signed_with(body, secret, Encoding::Hex)
}

/// The number after `#` in a delivered body: its place in its partner's order.
fn number(request: &Recorded) -> usize {
    let text = String::from_utf8_lossy(&request.body);
    let after = text.split('#').nth(1).expect("a numbered callback");
    after.split(' ').next().unwrap().parse().unwrap()
}

fn partner_of(request: &Recorded) -> String {
    request
        .header("x-lfguard-partner-code")
        .unwrap()
        .to_string()
}

/// An address where nothing listens (yet): the backend is down.
fn dead_address() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

fn assert_spooled(response: &Response) -> String {
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["status"], "accepted");
    assert_eq!(response.header("x-lfguard-spooled"), Some("true"));
    response
        .header("x-lfguard-spool-id")
        .expect("the spool id")
        .to_string()
}

/// `GET /spool`, parsed.
fn spool_summary(lfguard: &Lfguard) -> serde_json::Value {
    let response = admin_get(lfguard.admin, "/spool");
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()
}

/// Polls `GET /spool` until `done` holds (the store's own state has no push signal).
fn wait_for_spool(
    lfguard: &Lfguard,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let summary = spool_summary(lfguard);
        if done(&summary) {
            return summary;
        }
        assert!(Instant::now() < deadline, "the spool stayed at {summary}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spool_cli(lfguard: &Lfguard, args: &[&str]) -> (i32, String, String) {
    let config = lfguard.config_path.to_str().unwrap();
    let mut all = vec!["spool"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", config]);
    run_cli(&all, None, &[])
}

#[test]
fn callbacks_wait_while_the_backend_is_down_then_arrive_in_order_per_partner() {
    let spool_dir = tempfile::tempdir().unwrap();
    let address = dead_address();
    let lfguard = Lfguard::start_with(
        spool_config(&format!("http://{address}"), spool_dir.path(), ""),
        &[],
    );
    let mut ids = Vec::new();
    let mut sent = Vec::new();
    for n in 0..15 {
        for partner in [PARTNER, OTHER_PARTNER] {
            let callback = callback(partner, n);
            ids.push(assert_spooled(&lfguard.post(&callback)));
            sent.push(callback);
        }
    }
    // Down, once, and still ready: taking callbacks while the backend is away is the point.
    lfguard.wait_for_log(|event| {
        event["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("backend down")
    });
    assert_eq!(admin_get(lfguard.admin, "/readyz").status, 200);
    let summary = spool_summary(&lfguard);
    assert_eq!(summary["pending"], 30, "{summary}");
    assert_eq!(summary["backend"], "down", "{summary}");

    let backend = Backend::start_on(address);
    let received = backend.wait_for(30);
    for partner in [PARTNER, OTHER_PARTNER] {
        let order: Vec<usize> = received
            .iter()
            .filter(|r| partner_of(r) == partner)
            .map(number)
            .collect();
        assert_eq!(order, (0..15).collect::<Vec<_>>(), "{partner}");
    }
    // Each as it would have been forwarded, plus the attempt and the spool id.
    for callback in &sent {
        let delivered = received
            .iter()
            .find(|r| r.body == callback.body)
            .expect("every accepted callback is delivered");
        assert_eq!(delivered.method, "POST");
        assert_eq!(delivered.uri, "/callback/sms?source=lf");
        assert_eq!(delivered.header("x-lfguard-verified"), Some("true"));
        assert_eq!(delivered.header("x-lf-md5"), callback.header("x-lf-md5"));
        assert_eq!(
            delivered.header("x-lfguard-delivery-id"),
            callback.header("x-lf-delivery")
        );
        assert_eq!(delivered.header("content-type"), Some("application/json"));
        let attempt: u32 = delivered
            .header("x-lfguard-attempt")
            .unwrap()
            .parse()
            .unwrap();
        assert!(attempt >= 1);
    }
    let mut delivered_ids: Vec<&str> = received
        .iter()
        .map(|r| r.header("x-lfguard-spool-id").unwrap())
        .collect();
    delivered_ids.sort();
    ids.sort();
    assert_eq!(delivered_ids, ids);

    wait_for_spool(&lfguard, |summary| summary["pending"] == 0);
    lfguard.wait_for_log(|event| {
        event["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("backend up")
    });
    let changes = lfguard
        .events()
        .iter()
        .filter(|event| {
            event["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("backend ")
        })
        .count();
    assert_eq!(
        changes, 2,
        "one line when it went down, one when it came back"
    );
    assert_eq!(
        metric(
            &lfguard,
            "lfguard_spool_deliveries_total{result=\"delivered\"}"
        ),
        30.0
    );
    assert!(
        metric(
            &lfguard,
            "lfguard_spool_deliveries_total{result=\"retried\"}"
        ) >= 1.0
    );
    assert_eq!(metric(&lfguard, "lfguard_spool_depth"), 0.0);
    assert_eq!(
        metric(
            &lfguard,
            "lfguard_requests_total{code=\"spooled\",partner=\"P002671\"}"
        ),
        15.0
    );
}

#[test]
fn a_copy_of_a_spooled_callback_is_a_duplicate_and_forward_mode_routes_still_forward() {
    let spool_dir = tempfile::tempdir().unwrap();
    let backend = Backend::start();
    let lfguard = Lfguard::start_with(
        spool_config(
            &backend.url(),
            spool_dir.path(),
            r#"
            [[routes]]
            path_prefix = "/direct"
            delivery = "forward"
            "#,
        ),
        &[],
    );
    let first = callback(PARTNER, 1);
    assert_spooled(&lfguard.post(&first));
    let copy = lfguard.post(&first.with_new_delivery_id());
    assert_eq!(copy.status, 200);
    assert_eq!(copy.json()["status"], "duplicate");
    let mut direct = callback(PARTNER, 2);
    direct.path = "/direct/x".into();
    let forwarded = lfguard.post(&direct);
    assert_eq!(forwarded.status, 200);
    assert_eq!(forwarded.header("x-backend"), Some("recorded"));
    assert_eq!(forwarded.header("x-lfguard-spooled"), None);
    let received = backend.wait_for(2);
    let spooled = received.iter().find(|r| r.body == first.body).unwrap();
    assert_eq!(spooled.header("x-lfguard-attempt"), Some("1"));
    let direct = received.iter().find(|r| r.uri == "/direct/x").unwrap();
    assert_eq!(direct.header("x-lfguard-spool-id"), None);
    wait_for_spool(&lfguard, |summary| summary["pending"] == 0);
    assert_eq!(backend.count(), 2, "the copy was not delivered");
}

#[test]
fn a_partner_may_spool_while_the_others_forward() {
    let spool_dir = tempfile::tempdir().unwrap();
    let backend = Backend::start();
    let mut config = spool_config(&backend.url(), spool_dir.path(), "");
    merge(
        &mut config,
        &format!(
            "[delivery]\nmode = \"forward\"\n[partners.{OTHER_PARTNER}]\ndelivery = \"spool\""
        ),
    );
    let lfguard = Lfguard::start_with(config, &[]);
    let forwarded = lfguard.post(&callback(PARTNER, 1));
    assert_eq!(forwarded.header("x-backend"), Some("recorded"));
    assert_spooled(&lfguard.post(&callback(OTHER_PARTNER, 1)));
    backend.wait_for(2);
}

#[test]
fn an_unavailable_spool_refuses_with_503_and_acknowledges_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the spool's parent directory should be: the spool cannot be created.
    let blocker = write_file(dir.path(), "blocker", "not a directory");
    let spool_dir = blocker.join("spool");
    let backend = Backend::start();
    let lfguard = Lfguard::start_with(spool_config(&backend.url(), &spool_dir, ""), &[]);
    let first = callback(PARTNER, 1);
    let refused = lfguard.post(&first);
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.code(), "spool_unavailable");
    assert_eq!(refused.header("retry-after"), Some("5"));
    assert!(!refused.text().contains("blocker"), "no path in the answer");
    let ready = admin_get(lfguard.admin, "/readyz");
    assert_eq!(ready.status, 503);
    assert!(ready.text().starts_with("spool:"), "{}", ready.text());

    // Once the directory can be made, the same callback is taken: its claim was released.
    std::fs::remove_file(&blocker).unwrap();
    std::fs::create_dir(&blocker).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let accepted = loop {
        let response = lfguard.post(&first.with_new_delivery_id());
        if response.status != 503 || Instant::now() > deadline {
            break response;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_spooled(&accepted);
    assert_eq!(backend.wait_for(1)[0].body, first.body);
}

#[test]
fn a_full_spool_refuses_with_503_and_acknowledges_nothing() {
    let spool_dir = tempfile::tempdir().unwrap();
    let address = dead_address();
    let lfguard = Lfguard::start_with(
        spool_config(
            &format!("http://{address}"),
            spool_dir.path(),
            "[delivery]\nmax_spool_bytes = 2000",
        ),
        &[],
    );
    let mut accepted = Vec::new();
    let refused = loop {
        let callback = callback(PARTNER, accepted.len());
        let response = lfguard.post(&callback);
        if response.status != 200 {
            break (callback, response);
        }
        accepted.push(callback);
        assert!(accepted.len() < 10, "max_spool_bytes is not enforced");
    };
    assert!(!accepted.is_empty());
    assert_eq!(refused.1.status, 503);
    assert_eq!(refused.1.code(), "spool_full");
    assert!(refused.1.header("retry-after").is_some());
    assert_eq!(metric(&lfguard, "lfguard_spool_bytes_limit"), 2000.0);
    // Once the backend took the others, the refused callback is accepted: nothing of it stayed.
    let backend = Backend::start_on(address);
    backend.wait_for(accepted.len());
    wait_for_spool(&lfguard, |summary| summary["pending"] == 0);
    assert_spooled(&lfguard.post(&refused.0.with_new_delivery_id()));
    let received = backend.wait_for(accepted.len() + 1);
    assert_eq!(received.last().unwrap().body, refused.0.body);
}

#[test]
fn a_poisoned_callback_ends_in_the_dead_letters_without_holding_up_the_others() {
    let spool_dir = tempfile::tempdir().unwrap();
    let backend = Backend::start();
    backend.refuse_bodies_with("poison", 400);
    let lfguard = Lfguard::start_with(
        spool_config(
            &backend.url(),
            spool_dir.path(),
            "[delivery]\nmax_attempts = 3",
        ),
        &[],
    );
    let body = format!(
        r#"{{"partner_code":"{PARTNER}","text_message":"poison #0","received_at":"{}"}}"#,
        now_millis()
    );
    let poisoned = Callback::signed(body);
    let poisoned_id = assert_spooled(&lfguard.post(&poisoned));
    for n in 1..4 {
        assert_spooled(&lfguard.post(&callback(PARTNER, n)));
        assert_spooled(&lfguard.post(&callback(OTHER_PARTNER, n)));
    }
    // Three attempts at the poisoned one, then its partner's others, in order.
    let received = backend.wait_for(3 + 6);
    let mine: Vec<&Recorded> = received
        .iter()
        .filter(|r| partner_of(r) == PARTNER)
        .collect();
    let attempts: Vec<&str> = mine[..3]
        .iter()
        .map(|r| r.header("x-lfguard-attempt").unwrap())
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    assert!(
        mine[..3]
            .iter()
            .all(|r| r.header("x-lfguard-spool-id") == Some(&poisoned_id))
    );
    assert_eq!(
        mine[3..].iter().map(|r| number(r)).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let summary = wait_for_spool(&lfguard, |summary| summary["pending"] == 0);
    assert_eq!(summary["dead_letters"], 1, "{summary}");
    assert_eq!(summary["partners"][PARTNER]["dead"], 1, "{summary}");
    lfguard.wait_for_log(|event| {
        event["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("callback dead-lettered")
            && event["spool_id"] == poisoned_id.as_str()
    });
    assert_eq!(metric(&lfguard, "lfguard_spool_dead_letters"), 1.0);
    assert_eq!(
        metric(
            &lfguard,
            "lfguard_spool_deliveries_total{result=\"dead_lettered\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&lfguard, "lfguard_spool_delivery_attempts_count"),
        7.0
    );

    // The operator's view and hand.
    let (code, list, err) = spool_cli(&lfguard, &["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        list.contains(&poisoned_id) && list.contains("dead"),
        "{list}"
    );
    let (code, shown, _) = spool_cli(&lfguard, &["show", &poisoned_id]);
    assert_eq!(code, 0);
    assert!(shown.contains("the backend answered 400"), "{shown}");
    assert!(shown.contains("poison #0"), "{shown}");
    let (code, stats, _) = spool_cli(&lfguard, &["stats"]);
    assert_eq!(code, 0);
    assert!(stats.contains("dead letters: 1"), "{stats}");
    // Retried by hand once the backend takes it: delivered, attempt numbers counted anew.
    backend.stop_refusing();
    let (code, out, err) = spool_cli(&lfguard, &["retry", "--dead"]);
    assert_eq!((code, out.trim()), (0, "1 callback due now"), "{err}");
    let (code, _, _) = spool_cli(&lfguard, &["retry", "--dead"]);
    assert_eq!(code, 0);
    let received = backend.wait_for(10);
    assert_eq!(
        received[9].header("x-lfguard-spool-id"),
        Some(poisoned_id.as_str())
    );
    assert_eq!(received[9].header("x-lfguard-attempt"), Some("1"));
}

#[test]
fn after_a_sigkill_mid_delivery_every_accepted_callback_is_delivered_after_the_restart() {
    let spool_dir = tempfile::tempdir().unwrap();
    let backend = Backend::start();
    // The first delivery hangs: lfguard is killed while the backend holds it.
    backend.script([Reply {
        delay: Duration::from_secs(30),
        ..Reply::default()
    }]);
    let config = spool_config(&backend.url(), spool_dir.path(), "");
    let mut lfguard = Lfguard::start_with(config.clone(), &[]);
    let mut accepted = Vec::new();
    for n in 0..5 {
        let callback = callback(PARTNER, n);
        accepted.push((assert_spooled(&lfguard.post(&callback)), callback));
    }
    let cut = backend.wait_for(1)[0].clone();
    assert_eq!(
        cut.header("x-lfguard-spool-id"),
        Some(accepted[0].0.as_str())
    );
    lfguard.signal("KILL");
    lfguard.wait_exit();

    let restarted = Lfguard::start_with(config, &[]);
    backend.wait_for(1 + accepted.len());
    wait_for_spool(&restarted, |summary| summary["pending"] == 0);
    let received = backend.requests();
    for (id, callback) in &accepted {
        let copies: Vec<&Recorded> = received
            .iter()
            .filter(|r| r.header("x-lfguard-spool-id") == Some(id.as_str()))
            .collect();
        assert!(!copies.is_empty(), "{id} was never delivered");
        assert!(copies.iter().all(|copy| copy.body == callback.body));
    }
    // The cut one again, with its spool id, then the others in order.
    assert_eq!(
        received[1].header("x-lfguard-spool-id"),
        Some(accepted[0].0.as_str())
    );
    let order: Vec<usize> = received[1..].iter().map(number).collect();
    assert_eq!(order, [0, 1, 2, 3, 4]);
}

#[test]
fn on_sigterm_the_delivery_in_progress_finishes_and_the_rest_stay_spooled() {
    let spool_dir = tempfile::tempdir().unwrap();
    let backend = Backend::start();
    backend.script([Reply {
        delay: Duration::from_millis(1500),
        ..Reply::default()
    }]);
    let config = spool_config(
        &backend.url(),
        spool_dir.path(),
        "[server]\ndrain_delay = \"0s\"\nshutdown_grace = \"10s\"",
    );
    let mut lfguard = Lfguard::start_with(config.clone(), &[]);
    for n in 0..3 {
        assert_spooled(&lfguard.post(&callback(PARTNER, n)));
    }
    backend.wait_for(1);
    lfguard.signal("TERM");
    assert_eq!(lfguard.wait_exit(), Some(0));
    assert_eq!(backend.count(), 1, "no delivery starts after SIGTERM");
    lfguard.wait_for_log(|event| event["message"] == "waiting for deliveries in progress");
    let (code, stats, err) = spool_cli(&lfguard, &["stats"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stats.contains("waiting: 2"),
        "the finished one left the spool:\n{stats}"
    );

    let _restarted = Lfguard::start_with(config, &[]);
    let received = backend.wait_for(3);
    assert_eq!(received.iter().map(number).collect::<Vec<_>>(), [0, 1, 2]);
}

#[test]
fn the_spool_commands_show_retry_and_drop_callbacks() {
    let spool_dir = tempfile::tempdir().unwrap();
    let address = dead_address();
    let lfguard = Lfguard::start_with(
        spool_config(&format!("http://{address}"), spool_dir.path(), ""),
        &[],
    );
    let kept = assert_spooled(&lfguard.post(&callback(PARTNER, 0)));
    let dropped = assert_spooled(&lfguard.post(&callback(OTHER_PARTNER, 0)));
    let (code, stats, err) = spool_cli(&lfguard, &["stats"]);
    assert_eq!(code, 0, "{err}");
    assert!(stats.contains("waiting: 2"), "{stats}");
    assert!(
        stats.contains(&format!("partner {OTHER_PARTNER}: 1 waiting, 0 dead")),
        "{stats}"
    );
    let (code, shown, _) = spool_cli(&lfguard, &["show", &kept]);
    assert_eq!(code, 0);
    assert!(shown.contains("state: waiting"), "{shown}");
    assert!(
        shown.contains("POST /callback/sms?source=lf HTTP/1.1"),
        "{shown}"
    );
    assert!(shown.contains("x-lfguard-verified: true"), "{shown}");
    assert!(!shown.contains(SECRET), "{shown}");

    let (code, out, _) = spool_cli(&lfguard, &["drop", &dropped]);
    assert_eq!(
        (code, out.trim().to_string()),
        (0, format!("dropped {dropped}"))
    );
    let (code, _, err) = spool_cli(&lfguard, &["drop", &dropped]);
    assert_eq!(code, 1);
    assert!(err.contains("no callback"), "{err}");
    let (code, _, _) = spool_cli(&lfguard, &["show", "no-such-id"]);
    assert_eq!(code, 1);
    let (code, _, _) = spool_cli(&lfguard, &["retry", "no-such-id"]);
    assert_eq!(code, 1);

    // The backend back: `retry` skips the backoff rather than waiting for it.
    let backend = Backend::start_on(address);
    let (code, out, _) = spool_cli(&lfguard, &["retry"]);
    assert_eq!((code, out.trim()), (0, "1 callback due now"));
    let received = backend.wait_for(1);
    assert_eq!(
        received[0].header("x-lfguard-spool-id"),
        Some(kept.as_str())
    );
    wait_for_spool(&lfguard, |summary| summary["pending"] == 0);
    assert_eq!(
        backend.count(),
        1,
        "the dropped callback was never delivered"
    );

    // Without a spool configured, or where lfguard never made one.
    let (code, _, err) = run_cli(
        &[
            "spool",
            "stats",
            "--config",
            lfguard.config_path.to_str().unwrap(),
        ],
        None,
        &[("LFGUARD_DELIVERY__SPOOL_DIR", "/nonexistent/spool")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("does not exist"), "{err}");
}

/// The Redis spool's settings: the replay store and the spool in `redis`.
fn redis_spool_config(upstream: &str, redis: &Redis) -> toml::Table {
    let unused = tempfile::tempdir().unwrap();
    let mut config = spool_config(upstream, unused.path(), "");
    let delivery = config["delivery"].as_table_mut().unwrap();
    delivery.remove("spool_dir");
    delivery.insert("store".into(), "redis".into());
    merge(
        &mut config,
        &format!(
            "[replay]\nstore = \"redis\"\nredis_url = \"{}\"",
            redis.url()
        ),
    );
    config
}

/// The consumer name a replica logged when it opened the Redis spool.
fn consumer_of(lfguard: &Lfguard) -> String {
    let event = lfguard.wait_for_log(|event| event["message"] == "spool open");
    let store = event["store"].as_str().unwrap().to_string();
    store
        .split("consumer ")
        .nth(1)
        .unwrap()
        .trim_end_matches(')')
        .to_string()
}

fn redis_get(redis: &Redis, key: &str) -> String {
    let output = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "GET", key])
        .output()
        .expect("redis-cli is installed with redis-server");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn with_the_redis_store_a_replica_takes_over_when_the_other_dies_mid_delivery() {
    let redis = Redis::start();
    let backend = Backend::start();
    backend.script([Reply {
        delay: Duration::from_secs(60),
        ..Reply::default()
    }]);
    let config = redis_spool_config(&backend.url(), &redis);
    let mut replicas = [
        Lfguard::start_with(config.clone(), &[]),
        Lfguard::start_with(config, &[]),
    ];
    let consumers = [consumer_of(&replicas[0]), consumer_of(&replicas[1])];
    // Callbacks of one partner, taken by either replica: delivered by one, in order.
    let mut accepted = Vec::new();
    for n in 0..6 {
        let callback = callback(PARTNER, n);
        accepted.push((assert_spooled(&replicas[n % 2].post(&callback)), callback));
    }
    let cut = backend.wait_for(1)[0].clone();
    assert_eq!(
        cut.header("x-lfguard-spool-id"),
        Some(accepted[0].0.as_str())
    );
    let holder = redis_get(&redis, &format!("lfguard:spool:lease:{PARTNER}"));
    let dead = consumers
        .iter()
        .position(|consumer| *consumer == holder)
        .expect("one replica holds the partner");
    replicas[dead].signal("KILL");
    replicas[dead].wait_exit();

    // The other takes the lease once it lapses, and with it the cut delivery.
    let survivor = &replicas[1 - dead];
    backend.wait_for(1 + accepted.len());
    wait_for_spool(survivor, |summary| summary["pending"] == 0);
    let received = backend.requests();
    for (id, callback) in &accepted {
        let copies: Vec<&Recorded> = received
            .iter()
            .filter(|r| r.header("x-lfguard-spool-id") == Some(id.as_str()))
            .collect();
        assert!(!copies.is_empty(), "{id} was never delivered");
        assert!(copies.iter().all(|copy| copy.body == callback.body));
    }
    assert_eq!(
        received[1].header("x-lfguard-spool-id"),
        Some(accepted[0].0.as_str())
    );
    let order: Vec<usize> = received[1..].iter().map(number).collect();
    assert_eq!(order, [0, 1, 2, 3, 4, 5]);
    assert_eq!(
        redis_get(&redis, &format!("lfguard:spool:lease:{PARTNER}")),
        consumers[1 - dead]
    );
    let (code, stats, err) = spool_cli(survivor, &["stats"]);
    assert_eq!(code, 0, "{err}");
    assert!(stats.contains("store: redis"), "{stats}");
    assert!(stats.contains("waiting: 0"), "{stats}");
}

#[test]
fn the_redis_store_keeps_dead_letters_and_fails_closed() {
    let mut redis = Redis::start();
    let backend = Backend::start();
    backend.refuse_bodies_with("poison", 422);
    let mut config = redis_spool_config(&backend.url(), &redis);
    merge(
        &mut config,
        "[replay]\nstore = \"memory\"\n[delivery]\nfinal_statuses = [422]",
    );
    let lfguard = Lfguard::start_with(config, &[]);
    let body = format!(
        r#"{{"partner_code":"{PARTNER}","text_message":"poison #0","received_at":"{}"}}"#,
        now_millis()
    );
    let poisoned = assert_spooled(&lfguard.post(&Callback::signed(body)));
    assert_spooled(&lfguard.post(&callback(PARTNER, 1)));
    let received = backend.wait_for(2);
    assert_eq!(
        number(&received[1]),
        1,
        "the dead letter did not hold up the next"
    );
    let summary = wait_for_spool(&lfguard, |summary| {
        summary["dead_letters"] == 1 && summary["pending"] == 0
    });
    assert_eq!(summary["store"], "redis");
    assert_eq!(summary["partners"][PARTNER]["dead"], 1, "{summary}");
    let (code, shown, err) = spool_cli(&lfguard, &["show", &poisoned]);
    assert_eq!(code, 0, "{err}");
    assert!(
        shown.contains("state: dead") && shown.contains("poison #0"),
        "{shown}"
    );
    backend.stop_refusing();
    let (code, out, _) = spool_cli(&lfguard, &["retry", &poisoned]);
    assert_eq!((code, out.trim()), (0, "1 callback due now"));
    let received = backend.wait_for(3);
    assert_eq!(
        received[2].header("x-lfguard-spool-id"),
        Some(poisoned.as_str())
    );
    wait_for_spool(&lfguard, |summary| {
        summary["dead_letters"] == 0 && summary["pending"] == 0
    });

    // Redis gone: nothing is acknowledged.
    redis.stop();
    let refused = lfguard.post(&callback(PARTNER, 2));
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.code(), "spool_unavailable");
    assert_eq!(backend.count(), 3);
}
