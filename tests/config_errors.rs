//! Configuration errors as the real binary reports them: every problem in one pass, one line
//! each, naming the key and where it was set; and durations echoed in one short form.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lfguard::verify::duration::{Short, parse};
use support::*;

/// The problem lines of a refused configuration, after checking the report's shape: a header
/// with the count, then one `  - ` line per problem, none doubling a backtick.
fn problems(stderr: &str) -> Vec<String> {
    let mut lines = stderr.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.starts_with("lfguard: invalid configuration ("),
        "{stderr}"
    );
    let problems: Vec<String> = lines
        .map(|line| {
            line.strip_prefix("  - ")
                .unwrap_or_else(|| panic!("not a problem line: {line:?} in\n{stderr}"))
                .to_string()
        })
        .collect();
    assert!(
        header.contains(&format!("({} problem", problems.len())),
        "{stderr}"
    );
    assert!(!stderr.contains("``"), "a doubled backtick:\n{stderr}");
    problems
}

/// The one problem line about `key`; it must name `source` and say `what`.
fn line_about<'a>(problems: &'a [String], key: &str, source: &str, what: &str) -> &'a str {
    let about: Vec<&String> = problems
        .iter()
        .filter(|line| {
            line.starts_with(&format!("{key} (")) || line.starts_with(&format!("{key}:"))
        })
        .collect();
    assert_eq!(about.len(), 1, "one line about {key} in {problems:#?}");
    let line = about[0].as_str();
    assert!(
        line.starts_with(&format!("{key} ({source}): ")),
        "{key} should name {source}: {line}"
    );
    assert!(line.contains(what), "{key} should say {what:?}: {line}");
    line
}

fn check_config(config: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    run_cli(
        &["check-config", "--config", config.to_str().unwrap()],
        None,
        env,
    )
}

#[test]
fn an_unknown_key_a_bad_url_and_a_missing_secret_file_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-secret");
    let config = write_file(
        dir.path(),
        "lfguard.toml",
        &format!(
            "[server]\n\
             listen = \"127.0.0.1:0\"\n\
             admin_listen = \"127.0.0.1:0\"\n\
             lsten = \"127.0.0.1:1\"\n\
             \n\
             [upstream]\n\
             url = \"ftp://backend.example\"\n\
             \n\
             [partners.P1]\n\
             secret_files = [\"{}\"]\n",
            missing.display()
        ),
    );
    let (code, out, err) = check_config(&config, &[]);
    assert_eq!(code, 64, "{err}");
    assert_eq!(out, "", "nothing printed as effective config");
    let problems = problems(&err);
    let at = |line: usize| format!("{}:{line}", config.display());
    line_about(&problems, "server.lsten", &at(4), "unknown key");
    line_about(
        &problems,
        "upstream.url",
        &at(7),
        "must be an http:// or https:// URL",
    );
    line_about(
        &problems,
        "partners.P1.secret_files[0]",
        &at(10),
        "No such file",
    );
    assert_eq!(problems.len(), 3, "{problems:#?}");
}

#[test]
fn environment_variables_are_named_as_the_source_beside_file_problems() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "lfguard.toml",
        "[log]\nformat = \"xml\"\n[partners.P1]\nsecrets = [\"k\"]\n",
    );
    let (code, _, err) = check_config(
        &config,
        &[
            ("LFGUARD_SERVER__LISTEN", "not-an-address"),
            ("LFGUARD_VERIFY__MAX_AGE", "soon"),
            ("LFGUARD_SERVER__BOGUS", "1"),
        ],
    );
    assert_eq!(code, 64, "{err}");
    let problems = problems(&err);
    line_about(
        &problems,
        "server.listen",
        "LFGUARD_SERVER__LISTEN",
        "invalid socket address",
    );
    line_about(
        &problems,
        "verify.max_age",
        "LFGUARD_VERIFY__MAX_AGE",
        "not a duration",
    );
    line_about(
        &problems,
        "server.bogus",
        "LFGUARD_SERVER__BOGUS",
        "unknown key",
    );
    line_about(
        &problems,
        "log.format",
        &format!("{}:2", config.display()),
        "expected one of \"json\", \"text\", found \"xml\"",
    );
    assert_eq!(problems.len(), 4, "{problems:#?}");
}

#[test]
fn unknown_keys_inside_partners_routes_and_schemas_are_reported_with_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "lfguard.toml",
        "[partners.P1]\n\
         secrets = [\"k\"]\n\
         secret_file = [\"/typo\"]\n\
         \n\
         [[routes]]\n\
         path_prefix = \"/health\"\n\
         verify = false\n\
         \n\
         [[routes]]\n\
         path_prefix = \"/sms\"\n\
         shema = \"sms\"\n\
         \n\
         [schemas.sms]\n\
         members.imsi = { type = \"string\", requird = false }\n",
    );
    let (code, _, err) = check_config(&config, &[]);
    assert_eq!(code, 64, "{err}");
    let problems = problems(&err);
    let at = |line: usize| format!("{}:{line}", config.display());
    line_about(&problems, "partners.P1.secret_file", &at(3), "unknown key");
    line_about(&problems, "routes[1].shema", &at(11), "unknown key");
    line_about(
        &problems,
        "schemas.sms.members.imsi.requird",
        &at(14),
        "unknown key",
    );
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems[1].contains("known here: path_prefix, verify, schema"),
        "the keys that exist are listed: {}",
        problems[1]
    );
}

#[test]
fn serve_starts_nothing_when_the_configuration_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_file(
        dir.path(),
        "lfguard.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\n\
             max_conections = 5\n[upstream]\nurl = \"http://127.0.0.1:1\"\n\
             timeout = \"1 fortnight\"\n[partners.P1]\nsecrets = [\"k\"]\n"
        ),
    );
    let mut child = Command::new(binary())
        .args(["serve", "--config", config.to_str().unwrap()])
        .env_remove("LFGUARD_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("lfguard serve kept running on an invalid configuration");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert_eq!(output.status.code(), Some(64), "{err}");
    assert_eq!(out, "", "no log line: nothing started");
    let problems = problems(&err);
    line_about(
        &problems,
        "server.max_conections",
        &format!("{}:4", config.display()),
        "unknown key",
    );
    line_about(
        &problems,
        "upstream.timeout",
        &format!("{}:7", config.display()),
        "not a duration",
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on server.listen"
    );
}

#[test]
fn check_config_on_the_shipped_config_prints_durations_in_the_short_form() {
    let (code, out, err) = check_config(&repo_file("config/lfguard.toml"), &[]);
    assert_eq!(code, 0, "{err}");
    for expected in [
        "reload_interval = \"10s\"",
        "max_age = \"24h\"",
        "max_skew = \"5m\"",
        "window = \"25h\"",
        "pool_idle_timeout = \"1m30s\"",
    ] {
        assert!(out.contains(expected), "{expected} missing from:\n{out}");
    }
    let mut durations = 0;
    for line in out.lines() {
        let Some((key, value)) = line.split_once(" = \"") else {
            continue;
        };
        let value = value.trim_end_matches('"');
        if let Ok(duration) = parse(value) {
            durations += 1;
            assert_eq!(
                Short(duration).to_string(),
                value,
                "{key} is not in the short form"
            );
        }
    }
    assert!(durations >= 11, "{durations} durations found in:\n{out}");
}

#[test]
fn durations_written_longhand_are_echoed_in_the_short_form() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "lfguard.toml",
        "[verify]\nmax_age = \"1day 1h\"\n[replay]\nwindow = \"2days\"\n\
         [partners.P1]\nsecrets = [\"k\"]\n",
    );
    let (code, out, err) = check_config(&config, &[("LFGUARD_UPSTREAM__TIMEOUT", "1min 30sec")]);
    assert_eq!(code, 0, "{err}");
    for expected in [
        "max_age = \"25h\"",
        "window = \"48h\"",
        "timeout = \"1m30s\"",
    ] {
        assert!(out.contains(expected), "{expected} missing from:\n{out}");
    }

    // Messages use the same form: the window check, and a stale callback's reason.
    let (code, _, err) = check_config(&config, &[("LFGUARD_REPLAY__WINDOW", "1day")]);
    assert_eq!(code, 64);
    line_about(
        &problems(&err),
        "replay.window",
        "LFGUARD_REPLAY__WINDOW",
        "24h is shorter than verify.max_age + verify.max_skew (25h5m)",
    );
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        "[verify]\nmax_age = \"1day 1h\"\n[replay]\nwindow = \"2days\"",
    );
    let three_days_ago = now_millis() - 3 * 24 * 3600 * 1000;
    let body = format!(
        r#"{{"partner_code":"{PARTNER}","text_message":"old","received_at":"{three_days_ago}"}}"#
    );
    let response = lfguard.post(&Callback::signed(body));
    assert_eq!(response.code(), "stale");
    assert_eq!(
        response.json()["error"]["message"],
        "received_at is older than 25h"
    );
    assert_eq!(backend.count(), 0);
}
