//! The command line: check-config, sign, verify and send, run as the real binary.

mod support;

use support::*;

const SEED_BODY: &str = r#"{"partner_code":"P002671","sim_id":"89000000000001","imsi":"8900000000000010","text_message":"device status: 1234","received_at":"2022-01-19T201101"}"#;

#[test]
fn sign_matches_the_shared_vectors_and_verify_round_trips() {
    let (code, out, _) = run_cli(&["sign", "--secret", SECRET, SEED_BODY], None, &[]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "MWExNWQ3YTY0YTNhNDU5YWY3N2M2NjE4YjlhMGE3NzM=");
    let (code, out, _) = run_cli(
        &["sign", "--secret", SECRET, "--encoding", "raw", "-"],
        Some(SEED_BODY.as_bytes()),
        &[],
    );
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "GhXXpko6RZr3fGYYuaCncw==");

    for signature in [
        "MWExNWQ3YTY0YTNhNDU5YWY3N2M2NjE4YjlhMGE3NzM=",
        "GhXXpko6RZr3fGYYuaCncw==",
    ] {
        let (code, out, _) = run_cli(
            &[
                "verify",
                "--secret",
                SECRET,
                "--signature",
                signature,
                SEED_BODY,
            ],
            None,
            &[],
        );
        assert_eq!(code, 0, "{out}");
        assert!(out.starts_with("valid"), "{out}");
    }
    let tampered = SEED_BODY.replace("1234", "1235");
    let (code, out, _) = run_cli(
        &[
            "verify",
            "--secret",
            SECRET,
            "--signature",
            "GhXXpko6RZr3fGYYuaCncw==",
            &tampered,
        ],
        None,
        &[],
    );
    assert_eq!(code, 1);
    assert!(out.contains("does not match"), "{out}");
    let (code, out, _) = run_cli(
        &[
            "verify",
            "--secret",
            SECRET,
            "--signature",
            "nonsense",
            SEED_BODY,
        ],
        None,
        &[],
    );
    assert_eq!(code, 1);
    assert!(out.contains("not base64"), "{out}");
}

#[test]
fn sign_reads_the_secret_from_a_file_and_explain_masks_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "secret", &format!("\n{SECRET}\n"));
    let file = file.to_str().unwrap();
    let (code, out, _) = run_cli(&["sign", "--secret-file", file, SEED_BODY], None, &[]);
    assert_eq!(
        (code, out.trim()),
        (0, "MWExNWQ3YTY0YTNhNDU5YWY3N2M2NjE4YjlhMGE3NzM=")
    );
    let (code, out, _) = run_cli(
        &["sign", "--secret-file", file, "--explain", SEED_BODY],
        None,
        &[],
    );
    assert_eq!(code, 0);
    assert!(out.starts_with("imsi=8900000000000010&partner_code=P002671&received_at=2022-01-19T201101&sim_id=89000000000001&text_message=device status: 1234&"), "{out}");
    assert!(!out.contains(SECRET), "the secret is masked: {out}");
}

#[test]
fn sign_refuses_bodies_lfguard_would_refuse() {
    let (code, _, err) = run_cli(&["sign", "--secret", "k", r#"{"a":1,"a":2}"#], None, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("duplicate key"), "{err}");
    let (code, _, err) = run_cli(&["sign", "k"], None, &[]);
    assert_ne!(code, 0, "a secret is required: {err}");
}

#[test]
fn check_config_prints_the_effective_config_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "lfguard.toml",
        "[partners.P1]\nsecrets = [\"super-secret-value\"]\n[replay]\nredis_url = \"redis://user:redis-password@127.0.0.1:6379\"\n",
    );
    let (code, out, _) = run_cli(
        &["check-config", "--config", config.to_str().unwrap()],
        None,
        &[("LFGUARD_UPSTREAM__TIMEOUT", "7s")],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("super-secret-value") && !out.contains("redis-password"),
        "{out}"
    );
    assert!(out.contains("<redacted>"));
    assert!(
        out.contains("timeout = \"7s\""),
        "env override applied: {out}"
    );
    // LFGUARD_CONFIG names the file when --config is absent.
    let (code, out, _) = run_cli(
        &["check-config"],
        None,
        &[("LFGUARD_CONFIG", config.to_str().unwrap())],
    );
    assert_eq!(code, 0);
    assert!(out.contains("[partners.P1]"), "{out}");
}

#[test]
fn the_shipped_config_is_valid() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/lfguard.toml");
    let (code, out, err) = run_cli(&["check-config", "--config", shipped], None, &[]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn invalid_config_exits_64_naming_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "bad.toml",
        "[server]\nmax_body_bytes = 0\n[upstream]\nurl = \"https://example.com\"\n[replay]\nwindow = \"1h\"\n[partners.P1]\nsecrets = [\"\"]\n",
    );
    let (code, _, err) = run_cli(
        &["check-config", "--config", config.to_str().unwrap()],
        None,
        &[],
    );
    assert_eq!(code, 64);
    for key in [
        "server.max_body_bytes",
        "upstream.url",
        "replay.window",
        "partners.P1.secrets[0]",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    let typo = write_file(
        dir.path(),
        "typo.toml",
        "[upstream]\nurl = \"http://127.0.0.1:1\"\ntimeout = \"soon\"\n[partners.P1]\nsecrets=[\"k\"]\n",
    );
    let (code, _, err) = run_cli(
        &["check-config", "--config", typo.to_str().unwrap()],
        None,
        &[],
    );
    assert_eq!(code, 64);
    assert!(err.contains("upstream.timeout"), "{err}");
    let (code, _, err) = run_cli(
        &["serve", "--config", "/nonexistent/lfguard.toml"],
        None,
        &[],
    );
    assert_eq!(code, 64);
    assert!(err.contains("/nonexistent/lfguard.toml"), "{err}");
    let (code, _, err) = run_cli(
        &["check-config", "--config", typo.to_str().unwrap()],
        None,
        &[("LFGUARD_SERVER__LISTEN", "not-an-address")],
    );
    assert_eq!(code, 64);
    assert!(err.contains("server.listen"), "{err}");
}

#[test]
fn send_delivers_one_signed_callback_through_lfguard() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "");
    let url = format!("http://{}/callback", lfguard.addr);
    let (code, out, err) = run_cli(
        &["send", &url, "--secret", SECRET, "--partner", PARTNER],
        None,
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("200"), "{out}");
    let received = backend.wait_for(1).remove(0);
    assert_eq!(received.header("x-lfguard-verified"), Some("true"));
    assert!(
        received
            .header("x-lf-delivery")
            .unwrap()
            .parse::<u64>()
            .is_ok(),
        "snowflake delivery id"
    );

    let (code, out, _) = run_cli(
        &["send", &url, "--secret", "wrong", "--partner", PARTNER],
        None,
        &[],
    );
    assert_eq!(code, 1);
    assert!(out.starts_with("401"), "{out}");
    assert_eq!(backend.count(), 1);
}

#[test]
fn send_count_sends_distinct_callbacks_and_reports_percentiles() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "");
    let url = format!("http://{}/callback", lfguard.addr);
    let body = format!(
        r#"{{"partner_code":"{PARTNER}","received_at":"{}","text_message":"load"}}"#,
        now_millis()
    );
    let (code, out, err) = run_cli(
        &[
            "send",
            &url,
            "--secret",
            SECRET,
            "--count",
            "40",
            "--concurrency",
            "4",
            &body,
        ],
        None,
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("status:     200=40"), "{out}");
    assert!(out.contains("p99"), "{out}");
    assert_eq!(
        backend.count(),
        40,
        "every callback is distinct, so none is a replay"
    );
}
