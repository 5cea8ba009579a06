//! Report-only mode and mismatch diagnostics, against the real binary.

mod support;

use lfguard::signature::{self, Body, Encoding, NestedValues, NullValues};
use support::*;

fn verifications(lfguard: &Lfguard, partner: &str, result: &str, mode: &str) -> f64 {
    let text = admin_get(lfguard.admin, "/metrics").text();
    let series = format!(
        "lfguard_verifications_total{{mode=\"{mode}\",partner=\"{partner}\",result=\"{result}\"}} "
    );
    text.lines()
        .find_map(|line| line.strip_prefix(&series)?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn report_mode_forwards_failures_marked_and_still_enforces_limits() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        "[verify]\nmode = \"report\"\n[server]\nmax_body_bytes = 2048",
    );
    let stale_body = format!(
        r#"{{"partner_code":"{PARTNER}","text_message":"old","received_at":"{}"}}"#,
        now_millis() - 3 * 86_400_000
    );
    let valid = Callback::signed(sms_body());
    let cases = [
        (
            Callback::signed_with(sms_body(), "forged", Encoding::Hex),
            "bad_signature",
        ),
        (
            Callback::signed(sms_body()).without("x-lf-md5"),
            "missing_signature",
        ),
        (Callback::signed(stale_body), "stale"),
        (valid.clone(), ""),
        (valid.with_new_delivery_id(), "replay"),
    ];
    for (callback, failure) in &cases {
        let response = lfguard.post(callback);
        assert_eq!(response.status, 200, "{failure}: {}", response.text());
        assert_eq!(
            response.header("x-lfguard-duplicate"),
            None,
            "report mode forwards replays too"
        );
    }
    let received = backend.wait_for(cases.len());
    for ((_, failure), request) in cases.iter().zip(&received) {
        if failure.is_empty() {
            assert_eq!(request.header("x-lfguard-verified"), Some("true"));
            assert_eq!(request.header("x-lfguard-failure"), None);
        } else {
            assert_eq!(
                request.header("x-lfguard-verified"),
                Some("false"),
                "{failure}"
            );
            assert_eq!(request.header("x-lfguard-failure"), Some(*failure));
            assert_eq!(request.header("x-lfguard-partner-code"), Some(PARTNER));
        }
    }
    // Limits and parsing still protect lfguard and the backend.
    let mut oversized = Callback::signed(sms_body());
    oversized.body = format!(
        r#"{{"partner_code":"{PARTNER}","t":"{}"}}"#,
        "x".repeat(4096)
    )
    .into_bytes();
    assert_eq!(lfguard.post(&oversized).code(), "body_too_large");
    let mut duplicate = Callback::signed(sms_body());
    duplicate.body = format!(r#"{{"partner_code":"{PARTNER}","a":1,"a":2}}"#).into_bytes();
    assert_eq!(lfguard.post(&duplicate).code(), "duplicate_key");
    assert_eq!(backend.count(), cases.len());
    lfguard.wait_for_logs(4, |e| e["message"] == "request" && e["code"] == "reported");
}

#[test]
fn replay_claims_are_recorded_in_report_mode_so_enforcing_starts_warm() {
    let redis = Redis::start();
    let backend = Backend::start();
    let store = format!(
        "[replay]\nstore = \"redis\"\nredis_url = \"{}\"",
        redis.url()
    );
    let callback = Callback::signed(sms_body());
    {
        let reporting = Lfguard::start(&backend, &format!("{store}\n[verify]\nmode = \"report\""));
        assert_eq!(reporting.post(&callback).status, 200);
    }
    let enforcing = Lfguard::start(&backend, &store);
    let response = enforcing.post(&callback.with_new_delivery_id());
    assert_eq!(response.header("x-lfguard-duplicate"), Some("true"));
    assert_eq!(backend.count(), 1);
}

#[test]
fn a_partner_can_be_trialled_in_report_mode_while_the_rest_are_enforced() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        "[partners.P500001]\nmode = \"report\"\nsecrets = [\"trial-secret\"]",
    );
    let trial = &format!(
        r#"{{"partner_code":"P500001","received_at":"{}","text_message":"x"}}"#,
        now_millis()
    );
    let response = lfguard.post(&Callback::signed_with(trial, "wrong", Encoding::Hex));
    assert_eq!(response.status, 200);
    assert_eq!(
        backend.wait_for(1)[0].header("x-lfguard-failure"),
        Some("bad_signature")
    );

    let enforced = lfguard.post(&Callback::signed_with(sms_body(), "wrong", Encoding::Hex));
    assert_eq!(
        (enforced.status, enforced.code().as_str()),
        (401, "bad_signature")
    );
    // An unknown partner follows the global mode.
    let unknown = lfguard.post(&Callback::signed(
        r#"{"partner_code":"P777777"}"#.to_string(),
    ));
    assert_eq!(unknown.code(), "unknown_partner");
    assert_eq!(backend.count(), 1);

    assert_eq!(
        verifications(&lfguard, "P500001", "bad_signature", "report"),
        1.0
    );
    assert_eq!(
        verifications(&lfguard, PARTNER, "bad_signature", "enforce"),
        1.0
    );
    assert_eq!(
        verifications(&lfguard, "other", "unknown_partner", "enforce"),
        1.0
    );
    assert_eq!(
        lfguard
            .post(&Callback::signed_with(trial, "trial-secret", Encoding::Raw))
            .status,
        200
    );
    assert_eq!(verifications(&lfguard, "P500001", "valid", "report"), 1.0);
}

#[test]
fn a_body_signed_with_nulls_skipped_is_reported_as_that_variant() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "");
    let body =
        format!(r#"{{"partner_code":"{PARTNER}","note":null,"text_message":"secret-ish text"}}"#);
    let parsed = Body::from_json(body.as_bytes()).unwrap();
    let skipped = signature::sign(
        &parsed.canonical_with(NullValues::Skip, NestedValues::AsWritten),
        SECRET,
        Encoding::Hex,
    );
    let callback = Callback::signed(body.clone()).replacing("x-lf-md5", &skipped);
    assert_eq!(lfguard.post(&callback).code(), "bad_signature");
    let event = lfguard.wait_for_log(|e| e["variant"].is_string());
    assert_eq!(event["variant"], "null_values=skip");
    assert_eq!(event["partner"], PARTNER);
    let text = admin_get(lfguard.admin, "/metrics").text();
    assert!(
        text.contains(&format!("lfguard_signature_variants_total{{partner=\"{PARTNER}\",variant=\"null_values=skip\"}} 1")),
        "{text}"
    );
    for event in lfguard.events() {
        let line = event.to_string();
        assert!(
            !line.contains(SECRET) && !line.contains("secret-ish text") && !line.contains(&skipped),
            "{line}"
        );
    }
    assert_eq!(backend.count(), 0);
}

#[test]
fn verify_explain_names_the_variant_and_never_prints_the_secret() {
    let body = r#"{"partner_code":"P1","note":null,"meta":{ "b": 1.50 }}"#;
    let parsed = Body::from_json(body.as_bytes()).unwrap();
    let secret = "very-private-secret";
    let skipped = signature::sign(
        &parsed.canonical_with(NullValues::Skip, NestedValues::Reserialized),
        secret,
        Encoding::Raw,
    );
    let (code, out, _) = run_cli(
        &[
            "verify",
            "--secret",
            secret,
            "--signature",
            &skipped,
            "--explain",
            "--encoding",
            "hex",
            body,
        ],
        None,
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        out.contains("string to sign: meta={\"b\":1.50}&note=&partner_code=P1&<secret: 19 chars>"),
        "{out}"
    );
    assert!(
        out.contains("null_values=skip,nested_values=reserialized,signature_encoding=raw"),
        "{out}"
    );
    assert!(out.contains("null_values = \"skip\""), "{out}");
    assert!(!out.contains(secret), "{out}");
    let (code, out, _) = run_cli(
        &[
            "verify",
            "--secret",
            secret,
            "--signature",
            &skipped,
            "--null-values",
            "skip",
            "--nested-values",
            "reserialized",
            body,
        ],
        None,
        &[],
    );
    assert_eq!(code, 0, "{out}");
}

#[test]
fn mode_switches_to_enforce_on_reload_without_a_restart() {
    let backend = Backend::start();
    let mut config = base_config(&backend.url());
    merge(
        &mut config,
        "reload_interval = \"1h\"\n[verify]\nmode = \"report\"",
    );
    let lfguard = Lfguard::start_with(config.clone(), &[]);
    let forged = || Callback::signed_with(sms_body(), "forged", Encoding::Hex);
    assert_eq!(lfguard.post(&forged()).status, 200);

    merge(&mut config, "[verify]\nmode = \"enforce\"");
    std::fs::write(&lfguard.config_path, toml::to_string(&config).unwrap()).unwrap();
    lfguard.signal("HUP");
    lfguard.wait_for_log(|e| e["message"] == "secrets reloaded" && e["trigger"] == "SIGHUP");
    assert_eq!(lfguard.post(&forged()).code(), "bad_signature");
    assert_eq!(backend.count(), 1);

    // A change that needs a restart is not applied, and lfguard says so.
    merge(&mut config, "[upstream]\ntimeout = \"9s\"");
    std::fs::write(&lfguard.config_path, toml::to_string(&config).unwrap()).unwrap();
    lfguard.signal("HUP");
    lfguard.wait_for_log(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("next restart"))
    });
}

#[test]
fn a_config_file_change_is_picked_up_by_polling() {
    let backend = Backend::start();
    let mut config = base_config(&backend.url());
    merge(&mut config, "reload_interval = \"100ms\"");
    let lfguard = Lfguard::start_with(config.clone(), &[]);
    let trial = &format!(
        r#"{{"partner_code":"P600001","received_at":"{}","text_message":"x"}}"#,
        now_millis()
    );
    assert_eq!(
        lfguard
            .post(&Callback::signed_with(trial, "k6", Encoding::Hex))
            .code(),
        "unknown_partner"
    );
    merge(&mut config, "[partners.P600001]\nsecrets = [\"k6\"]");
    std::fs::write(&lfguard.config_path, toml::to_string(&config).unwrap()).unwrap();
    lfguard.wait_for_log(|e| e["message"] == "secrets reloaded" && e["trigger"] == "file change");
    assert_eq!(
        lfguard
            .post(&Callback::signed_with(trial, "k6", Encoding::Hex))
            .status,
        200
    );
}
