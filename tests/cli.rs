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
        "[server]\nmax_body_bytes = 0\n[upstream]\nurl = \"ftp://example.com\"\n[replay]\nwindow = \"1h\"\n[partners.P1]\nsecrets = [\"\"]\n",
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

/// A body whose string to sign differs under every canonicalisation setting: a null, and a
/// nested object with a number and keys that re-serialisation reorders.
const CANONICAL_BODY: &str = r#"{"partner_code":"P002671","note":null,"meta":{"z":1.50, "a":"\u00e9"},"received_at":"1700000000000"}"#;

#[test]
fn sign_and_verify_agree_for_every_canonicalisation() {
    let mut signatures = std::collections::BTreeSet::new();
    for encoding in ["hex", "raw"] {
        for nulls in ["empty", "skip", "literal"] {
            for nested in ["as-written", "reserialized"] {
                let flags = [
                    "--encoding",
                    encoding,
                    "--null-values",
                    nulls,
                    "--nested-values",
                    nested,
                ];
                let mut sign = vec!["sign", "--secret", SECRET];
                sign.extend(flags);
                sign.push(CANONICAL_BODY);
                let (code, out, err) = run_cli(&sign, None, &[]);
                assert_eq!(code, 0, "{flags:?}: {err}");
                let signature = out.trim().to_string();
                assert!(
                    signatures.insert(signature.clone()),
                    "{flags:?} signs like another combination"
                );
                let mut verify = vec!["verify", "--secret", SECRET, "--signature", &signature];
                verify.extend(flags);
                verify.push(CANONICAL_BODY);
                let (code, out, _) = run_cli(&verify, None, &[]);
                assert_eq!(code, 0, "{flags:?}: {out}");
                assert!(out.starts_with(&format!("valid ({encoding}")), "{out}");
                // The same signature under the default settings fails and names the settings.
                if (nulls, nested) != ("empty", "as-written") {
                    let (code, out, _) = run_cli(
                        &[
                            "verify",
                            "--secret",
                            SECRET,
                            "--signature",
                            &signature,
                            CANONICAL_BODY,
                        ],
                        None,
                        &[],
                    );
                    assert_eq!(code, 1, "{flags:?}: {out}");
                    assert!(out.contains("but valid with"), "{flags:?}: {out}");
                }
            }
        }
    }
    assert_eq!(signatures.len(), 12);
}

#[test]
fn config_is_offered_only_on_serve_and_check_config() {
    for args in [
        &["sign", "--secret", "k", "--config", "x.toml", "{}"][..],
        &[
            "verify",
            "--secret",
            "k",
            "--signature",
            "x",
            "--config",
            "x.toml",
        ],
        &[
            "send",
            "http://127.0.0.1:1/",
            "--secret",
            "k",
            "--config",
            "x.toml",
        ],
        &["--config", "x.toml", "sign", "--secret", "k", "{}"],
    ] {
        let (code, _, err) = run_cli(args, None, &[]);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.contains("--config"), "{args:?}: {err}");
    }
    // LFGUARD_CONFIG (set in the image) does not disturb the other subcommands.
    let (code, out, err) = run_cli(
        &["sign", "--secret", SECRET, SEED_BODY],
        None,
        &[("LFGUARD_CONFIG", "/nonexistent/lfguard.toml")],
    );
    assert_eq!(
        (code, out.trim()),
        (0, "MWExNWQ3YTY0YTNhNDU5YWY3N2M2NjE4YjlhMGE3NzM="),
        "{err}"
    );
    // `lfguard --config PATH` with no subcommand is `serve` (the benchmarks and the image use it):
    // it reads the file, here a missing one.
    let (code, _, err) = run_cli(&["--config", "/nonexistent/lfguard.toml"], None, &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("/nonexistent/lfguard.toml"), "{err}");
}

#[test]
fn lfguard_without_a_subcommand_serves() {
    let backend = Backend::start();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("lfguard.toml");
    std::fs::write(
        &config_path,
        toml::to_string(&base_config(&backend.url())).unwrap(),
    )
    .unwrap();
    let lfguard = Lfguard::spawn_with(dir, config_path, &[], &[]);
    assert_eq!(lfguard.post(&Callback::signed(sms_body())).status, 200);
    assert_eq!(backend.count(), 1);
}

/// The subcommands `lfguard --help` lists.
fn subcommands() -> Vec<String> {
    let (code, out, _) = run_cli(&["--help"], None, &[]);
    assert_eq!(code, 0);
    let listed: Vec<String> = out
        .split("Commands:\n")
        .nth(1)
        .expect("a Commands section")
        .lines()
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect();
    assert!(listed.len() >= 5, "{out}");
    listed
}

#[test]
fn every_flag_argument_and_value_has_help_and_every_subcommand_examples() {
    let mut commands = subcommands();
    commands.push(String::new());
    let mut missing = Vec::new();
    for command in &commands {
        let mut args: Vec<&str> = Vec::new();
        if !command.is_empty() {
            args.push(command);
        }
        args.push("--help");
        let (code, out, _) = run_cli(&args, None, &[]);
        assert_eq!(code, 0, "{args:?}");
        if !out.contains("\nExamples:\n  lfguard ") {
            missing.push(format!("{command}: no examples"));
        }
        // Each flag or argument starts a line indented 2 or 6, followed by its help on the same
        // line or on the next, indented 10; a value of a list is `- name: help`.
        let lines: Vec<&str> = out.lines().collect();
        let sections = ["Arguments:", "Options:"];
        let mut in_section = false;
        for (i, line) in lines.iter().enumerate() {
            if sections.contains(line) {
                in_section = true;
                continue;
            }
            if !line.starts_with(' ') && !line.is_empty() {
                in_section = false;
            }
            if !in_section {
                continue;
            }
            let indent = line.len() - line.trim_start().len();
            if indent == 2 || indent == 6 {
                // `--flag <V>  help` on one line, or the help on the next lines (indented 10).
                let helpful = |text: &str| {
                    let text = text.trim();
                    !text.is_empty() && !text.starts_with('[') && !text.starts_with("Possible")
                };
                let same_line = line
                    .trim()
                    .split_once("  ")
                    .is_some_and(|(_, help)| helpful(help));
                let next_line = lines
                    .get(i + 1)
                    .is_some_and(|next| next.starts_with(&" ".repeat(10)) && helpful(next));
                if !(same_line || next_line) {
                    missing.push(format!("{command}: {}", line.trim()));
                }
            }
            if let Some(value) = line.trim().strip_prefix("- ") {
                let help = value.split_once(':').map(|(_, help)| help.trim());
                if help.is_none_or(str::is_empty) {
                    missing.push(format!("{command}: value {value}"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "{missing:#?}");
}

#[test]
fn echo_prints_what_serve_forwards_from_send() {
    let mut echo = Echo::start(&[]);
    let lfguard = Lfguard::start_with(base_config(&echo.url()), &[]);
    let url = format!("http://{}/linksfield/sms-uplink?source=test", lfguard.addr);
    let body = sms_body();
    let (code, out, err) = run_cli(&["send", &url, "--secret", SECRET, &body], None, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("200\n"), "{out}");
    assert!(
        out.contains(r#"{"request":1,"status":200}"#),
        "echo's answer: {out}"
    );
    let printed = echo.wait_for_output(|text| text.contains(&body));
    for expected in [
        "--- request 1 from 127.0.0.1:",
        ", answered 200\n",
        "\nPOST /linksfield/sms-uplink?source=test HTTP/1.1\n",
        "\ncontent-type: application/json\n",
        "\nx-lfguard-verified: true\n",
        &format!("\nx-lfguard-partner-code: {PARTNER}\n"),
        &format!("\n\n{body}\n"),
    ] {
        assert!(
            printed.contains(expected),
            "{expected:?} not in:\n{printed}"
        );
    }
    echo.signal("TERM");
    assert_eq!(echo.wait_exit(), Some(0), "echo exits cleanly on SIGTERM");
}

#[test]
fn echo_status_is_what_the_pipeline_sees() {
    let echo = Echo::start(&["--status", "503"]);
    let lfguard = Lfguard::start_with(base_config(&echo.url()), &[]);
    let url = format!("http://{}/callback", lfguard.addr);
    let (code, out, _) = run_cli(
        &["send", &url, "--secret", SECRET, "--partner", PARTNER],
        None,
        &[],
    );
    assert_eq!(code, 1, "a 503 is a failure for send: {out}");
    assert!(out.starts_with("503\n"), "{out}");
    assert!(out.contains(r#""status":503"#), "echo's own answer: {out}");
    let printed = echo.wait_for_output(|text| text.contains("x-lfguard-verified: true"));
    assert!(printed.contains(", answered 503\n"), "{printed}");
    // Straight to echo, without lfguard: the same status, and the request printed as received.
    let (code, out, _) = run_cli(
        &["send", &format!("{}/direct", echo.url()), "--secret", "k"],
        None,
        &[],
    );
    assert_eq!((code, out.lines().next()), (1, Some("503")), "{out}");
    let printed = echo.wait_for_output(|text| text.contains("--- request 2 "));
    assert!(printed.contains("\nPOST /direct HTTP/1.1\n"), "{printed}");
}

#[test]
fn echo_refuses_a_status_that_is_not_a_final_http_status() {
    for status in ["99", "1000", "abc"] {
        let (code, _, err) = run_cli(&["echo", "--status", status], None, &[]);
        assert_eq!(code, 2, "{status}: {err}");
        assert!(err.contains("--status"), "{err}");
    }
}

#[test]
fn demo_shows_each_kind_of_callback_handled_as_expected() {
    let (code, out, err) = run_cli(&["demo"], None, &[("RUST_LOG", "debug")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.is_empty(), "nothing on stderr: {err}");
    assert!(
        !out.lines()
            .any(|line| line.trim_start().starts_with("{\"") && line.contains("\"level\"")),
        "no log lines in the table: {out}"
    );
    // The table: a header, a rule of dashes per column, then one row per callback.
    let lines: Vec<&str> = out.lines().collect();
    let header = lines
        .iter()
        .position(|line| line.starts_with("case "))
        .unwrap_or_else(|| panic!("no table header in:\n{out}"));
    let rule = lines[header + 1];
    let mut starts = vec![0];
    starts.extend(rule.match_indices("  -").map(|(at, _)| at + 2));
    assert_eq!(starts.len(), 4, "four columns: {rule}");
    let cells = |line: &str| -> Vec<String> {
        (0..starts.len())
            .map(|i| {
                let end = starts.get(i + 1).copied().unwrap_or(line.len());
                line.get(starts[i]..end.min(line.len()))
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(
        cells(lines[header]),
        ["case", "sent", "lfguard answered", "backend received"]
    );
    let rows: Vec<Vec<String>> = lines[header + 2..header + 7]
        .iter()
        .map(|l| cells(l))
        .collect();
    let expected = [
        ("genuine", "200 forwarded"),
        ("forged", "401 bad_signature"),
        // The shipped config acknowledges a copy of a delivered callback (on_duplicate).
        ("replayed", "200 duplicate"),
        ("stale", "401 stale"),
        ("ambiguous", "400 ambiguous_body"),
    ];
    for (row, (case, answer)) in rows.iter().zip(expected) {
        assert_eq!((row[0].as_str(), row[2].as_str()), (case, answer), "{out}");
        if case == "genuine" {
            assert_eq!(
                row[3], "the body as sent, with x-lfguard-verified: true",
                "{out}"
            );
        } else {
            assert_eq!(row[3], "nothing", "{case}: {out}");
        }
        assert!(!row[1].is_empty(), "what was sent: {out}");
    }
    assert!(
        lines.get(header + 7).is_none_or(|line| line.is_empty()),
        "five rows: {out}"
    );
    assert!(out.contains("text_message \"hi&zzz=1\""), "{out}");
    assert!(
        out.contains(r#""text_message":"hi&zzz=1""#),
        "the ambiguous body: {out}"
    );
    let backend_block = out
        .split("What the backend received for the genuine callback:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no backend block: {out}"));
    assert!(
        backend_block.contains("\n  x-lfguard-verified: true\n"),
        "{backend_block}"
    );
    assert!(
        out.trim_end()
            .ends_with("5 of 5 callbacks handled as expected."),
        "{out}"
    );
}

#[test]
fn send_names_why_it_could_not_connect() {
    let url = format!("http://127.0.0.1:{}/callback", free_port());
    let (code, out, err) = run_cli(&["send", &url, "--secret", SECRET], None, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(err.starts_with(&format!("lfguard: {url}: ")), "{err}");
    assert!(
        err.contains("refused"),
        "the cause, not just 'client error': {err}"
    );
}
