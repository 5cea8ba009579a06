//! Black-box tests of verification and forwarding against the real binary.

mod support;

use std::time::Duration;

use lfguard::signature::Encoding;
use support::*;

#[test]
fn valid_callback_arrives_byte_identical_with_verification_headers() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "");
    // Whitespace, escapes and key order must survive untouched.
    let body = format!(
        "{{ \"text_message\" : \"\\u53d1\\u9001 1.50\",\n \"partner_code\":\"{PARTNER}\", \"usage\": 1.50, \"received_at\":\"{}\" }}",
        now_millis()
    );
    let callback = Callback::signed(body.clone()).with("X-Custom", "kept");
    let response = lfguard.post(&callback);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.header("x-backend"),
        Some("recorded"),
        "backend response relayed"
    );
    assert_eq!(response.text(), "{}");

    let received = backend.wait_for(1).remove(0);
    assert_eq!(received.method, "POST");
    assert_eq!(received.uri, "/callback/sms?source=lf");
    assert_eq!(received.body.as_ref(), body.as_bytes());
    assert_eq!(received.header("x-lf-md5"), callback.header("x-lf-md5"));
    assert_eq!(
        received.header("x-lf-delivery"),
        callback.header("x-lf-delivery")
    );
    assert_eq!(received.header("x-custom"), Some("kept"));
    assert_eq!(received.header("content-type"), Some("application/json"));
    assert_eq!(received.header("x-lfguard-verified"), Some("true"));
    assert_eq!(received.header("x-lfguard-partner-code"), Some(PARTNER));
    assert_eq!(
        received.header("x-lfguard-delivery-id"),
        callback.header("x-lf-delivery")
    );
    assert_eq!(received.header("x-lfguard-key-id"), Some("inline:0"));
    assert_eq!(received.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(received.header("x-forwarded-proto"), Some("http"));
    assert_eq!(received.header("x-forwarded-host"), Some("lfguard.test"));
    assert_eq!(
        received.header("content-length"),
        Some(body.len().to_string().as_str())
    );
}

#[test]
fn an_http_1_0_request_without_host_reaches_the_backend_with_the_upstream_host() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "");
    let callback = Callback::signed(sms_body());
    let request = format!(
        "POST /callback HTTP/1.0\r\nContent-Type: application/json\r\nx-lf-md5: {}\r\nx-lf-delivery: {}\r\nContent-Length: {}\r\n\r\n{}",
        callback.header("x-lf-md5").unwrap(),
        callback.header("x-lf-delivery").unwrap(),
        callback.body.len(),
        String::from_utf8_lossy(&callback.body),
    );
    let response = send_raw(lfguard.addr, request.as_bytes());
    assert_eq!(response.status, 200, "{response:?}");
    let received = backend.wait_for(1).remove(0);
    let upstream_host = backend.addr.to_string();
    assert_eq!(received.header("host"), Some(upstream_host.as_str()));
    assert_eq!(received.header("x-forwarded-host"), None);
}

#[test]
fn both_digest_encodings_are_accepted_under_auto_and_only_one_when_pinned() {
    let backend = Backend::start();
    let auto = Lfguard::start(&backend, "");
    for encoding in [Encoding::Hex, Encoding::Raw] {
        let response = auto.post(&Callback::signed_with(sms_body(), SECRET, encoding));
        assert_eq!(response.status, 200, "{encoding:?}: {}", response.text());
    }
    assert_eq!(backend.count(), 2);

    for (pinned, refused) in [("hex", Encoding::Raw), ("raw", Encoding::Hex)] {
        let lfguard = Lfguard::start(
            &backend,
            &format!("[verify]\nsignature_encoding = \"{pinned}\""),
        );
        let accepted = if pinned == "hex" {
            Encoding::Hex
        } else {
            Encoding::Raw
        };
        assert_eq!(
            lfguard
                .post(&Callback::signed_with(sms_body(), SECRET, accepted))
                .status,
            200
        );
        let response = lfguard.post(&Callback::signed_with(sms_body(), SECRET, refused));
        assert_eq!(
            (response.status, response.code().as_str()),
            (401, "bad_signature")
        );
    }
    assert_eq!(backend.count(), 4);
}

#[test]
fn rotation_accepts_every_secret_and_names_the_one_that_matched() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        &format!("[partners.{PARTNER}]\nsecrets = [\"old-secret\", \"new-secret\"]"),
    );
    assert_eq!(
        lfguard
            .post(&Callback::signed_with(
                sms_body(),
                "new-secret",
                Encoding::Hex
            ))
            .status,
        200
    );
    assert_eq!(
        lfguard
            .post(&Callback::signed_with(
                sms_body(),
                "old-secret",
                Encoding::Raw
            ))
            .status,
        200
    );
    let received = backend.wait_for(2);
    assert_eq!(received[0].header("x-lfguard-key-id"), Some("inline:1"));
    assert_eq!(received[1].header("x-lfguard-key-id"), Some("inline:0"));
    let response = lfguard.post(&Callback::signed_with(sms_body(), SECRET, Encoding::Hex));
    assert_eq!(response.code(), "bad_signature");
    for event in lfguard.events() {
        let line = event.to_string();
        assert!(
            !line.contains("old-secret") && !line.contains("new-secret"),
            "secret in log: {line}"
        );
    }
}

/// Each rejection owned by the core, with its status and code; the backend must see none.
#[test]
fn every_rejection_has_its_code_and_forwards_nothing() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "[server]\nmax_body_bytes = 4096");
    let valid = || Callback::signed(sms_body());
    let with_body = |body: &[u8]| {
        let mut callback = valid();
        callback.body = body.to_vec();
        callback
    };
    let signed_body = |body: &str| Callback::signed(body.to_string());
    let cases: Vec<(&str, Callback, u16, &str)> = vec![
        ("empty body", with_body(b""), 400, "malformed_body"),
        ("not an object", with_body(b"[1,2]"), 400, "malformed_body"),
        (
            "trailing data",
            with_body(format!("{} x", sms_body()).as_bytes()),
            400,
            "malformed_body",
        ),
        (
            "truncated",
            with_body(b"{\"partner_code\":\"P002671\""),
            400,
            "malformed_body",
        ),
        (
            "invalid utf-8",
            with_body(b"{\"partner_code\":\"P002671\",\"t\":\"\xff\"}"),
            400,
            "malformed_body",
        ),
        (
            "the seed's own malformed example",
            with_body(b"{\"message_type\":\"Binary\"\n\"text_message\":\"x\"}"),
            400,
            "malformed_body",
        ),
        (
            "duplicate key",
            with_body(
                format!(r#"{{"partner_code":"{PARTNER}","text_message":"a","text_message":"b"}}"#)
                    .as_bytes(),
            ),
            400,
            "duplicate_key",
        ),
        (
            "no partner_code",
            signed_body(r#"{"sim_id":"1"}"#),
            400,
            "missing_partner",
        ),
        (
            "numeric partner_code",
            signed_body(r#"{"partner_code":2671}"#),
            400,
            "missing_partner",
        ),
        (
            "empty partner_code",
            signed_body(r#"{"partner_code":""}"#),
            400,
            "missing_partner",
        ),
        (
            "no delivery id",
            valid().without("x-lf-delivery"),
            400,
            "missing_delivery_id",
        ),
        (
            "no signature",
            valid().without("x-lf-md5"),
            401,
            "missing_signature",
        ),
        (
            "forged signature",
            valid().replacing("x-lf-md5", "GhXXpko6RZr3fGYYuaCncw=="),
            401,
            "bad_signature",
        ),
        (
            "signature of the wrong length",
            valid().replacing("x-lf-md5", "AAAA"),
            401,
            "bad_signature",
        ),
        (
            "two signatures",
            valid().with("X-LF-MD5", "GhXXpko6RZr3fGYYuaCncw=="),
            401,
            "bad_signature",
        ),
        (
            "unknown partner",
            signed_body(r#"{"partner_code":"P999999","text_message":"x"}"#),
            401,
            "unknown_partner",
        ),
        ("GET", valid().method("GET"), 405, "method_not_allowed"),
        ("PUT", valid().method("PUT"), 405, "method_not_allowed"),
        (
            "body over the limit",
            with_body(
                format!(
                    r#"{{"partner_code":"{PARTNER}","t":"{}"}}"#,
                    "x".repeat(5000)
                )
                .as_bytes(),
            ),
            413,
            "body_too_large",
        ),
        (
            "text/plain",
            valid().replacing("Content-Type", "text/plain"),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            valid().without("Content-Type"),
            415,
            "unsupported_media_type",
        ),
    ];
    for (name, callback, status, code) in cases {
        let response = lfguard.post(&callback);
        assert_eq!(
            (response.status, response.code()),
            (status, code.to_string()),
            "{name}: {}",
            response.text()
        );
        assert_eq!(
            response.header("content-type"),
            Some("application/json"),
            "{name}"
        );
    }
    assert_eq!(backend.count(), 0, "nothing may be forwarded");
    lfguard.wait_for_logs(21, |e| {
        e["message"] == "request" && e["status"].as_u64() >= Some(400)
    });
}

#[test]
fn chunked_body_over_the_limit_is_refused_while_reading() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "[server]\nmax_body_bytes = 1024");
    let callback = Callback::signed(sms_body());
    let mut request = format!("POST /cb HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-lf-md5: {}\r\nx-lf-delivery: 1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n", callback.header("x-lf-md5").unwrap()).into_bytes();
    for _ in 0..4 {
        request.extend_from_slice(format!("200\r\n{}\r\n", "a".repeat(512)).as_bytes());
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let response = send_raw(lfguard.addr, &request);
    assert_eq!(
        (response.status, response.code().as_str()),
        (413, "body_too_large")
    );
    assert_eq!(backend.count(), 0);
}

#[test]
fn slow_drip_body_times_out_while_others_are_served() {
    use std::io::Write;
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "[server]\nbody_read_timeout = \"300ms\"");
    let mut slow = std::net::TcpStream::connect(lfguard.addr).unwrap();
    let callback = Callback::signed(sms_body());
    let head = String::from_utf8(callback.to_bytes()).unwrap();
    let head_end = head.find("\r\n\r\n").unwrap() + 4;
    slow.write_all(&callback.to_bytes()[..head_end + 3])
        .unwrap();
    // Another client is served while the slow one dribbles.
    assert_eq!(lfguard.post(&Callback::signed(sms_body())).status, 200);
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let response = read_response(&mut std::io::BufReader::new(slow)).expect("a 408");
    assert_eq!(response.status, 408);
    assert_eq!(response.code(), "request_timeout");
    assert_eq!(backend.count(), 1);
}

#[test]
fn spoofed_lfguard_headers_are_replaced() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "");
    let callback = Callback::signed(sms_body())
        .with("X-LFGuard-Verified", "true")
        .with("x-lfguard-partner-code", "P000001")
        .with("x-lfguard-key-id", "forged")
        .with("x-lfguard-failure", "none");
    assert_eq!(lfguard.post(&callback).status, 200);
    let received = backend.wait_for(1).remove(0);
    assert_eq!(received.header_count("x-lfguard-verified"), 1);
    assert_eq!(received.header("x-lfguard-partner-code"), Some(PARTNER));
    assert_eq!(received.header("x-lfguard-key-id"), Some("inline:0"));
    assert_eq!(received.header("x-lfguard-failure"), None);

    // A forged request carrying a spoofed header is still refused.
    let forged = Callback::signed_with(sms_body(), "wrong", Encoding::Hex)
        .with("x-lfguard-verified", "true");
    assert_eq!(lfguard.post(&forged).status, 401);
    assert_eq!(backend.count(), 1);
}

#[test]
fn hop_by_hop_headers_are_dropped_and_forwarded_for_appended() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "");
    let callback = Callback::signed(sms_body())
        .with("Keep-Alive", "timeout=5")
        .with("X-Drop-Me", "1")
        .with("Connection", "X-Drop-Me")
        .with("Proxy-Authorization", "Basic eA==")
        .with("X-Forwarded-For", "203.0.113.9")
        .with("X-Forwarded-Proto", "https");
    assert_eq!(lfguard.post(&callback).status, 200);
    let received = backend.wait_for(1).remove(0);
    for dropped in ["keep-alive", "x-drop-me", "proxy-authorization"] {
        assert_eq!(received.header(dropped), None, "{dropped}");
    }
    assert_eq!(
        received.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(received.header("x-forwarded-proto"), Some("http"));
}

#[test]
fn form_bodies_and_canonical_edge_cases_verify_end_to_end() {
    let backend = Backend::start();
    // These bodies test the canonical string, not freshness.
    let lfguard = Lfguard::start(
        &backend,
        "[verify]\naccept_form = true\nrequire_timestamp = false",
    );
    let form = format!("partner_code={PARTNER}&text_message=form+body%21&sim_id=8986");
    let signature = sign_body(form.as_bytes(), SECRET, Encoding::Raw);
    let callback = Callback {
        method: "POST".into(),
        path: "/form".into(),
        headers: vec![
            (
                "Content-Type".into(),
                "application/x-www-form-urlencoded".into(),
            ),
            ("x-lf-md5".into(), signature),
            ("x-lf-delivery".into(), delivery_id()),
        ],
        body: form.clone().into_bytes(),
    };
    assert_eq!(lfguard.post(&callback).status, 200);
    // Numbers as written, escapes decoded, null empty, nested compacted.
    let json = format!(
        r#"{{"partner_code":"{PARTNER}","usage_mb":1.50,"big":1e3,"note":null,"meta":{{ "z": 1.50, "a": [1, "s p"] }},"text_message":"\u53d1 \"q\""}}"#
    );
    assert_eq!(lfguard.post(&Callback::signed(json.clone())).status, 200);
    let received = backend.wait_for(2);
    assert_eq!(received[0].body.as_ref(), form.as_bytes());
    assert_eq!(received[1].body.as_ref(), json.as_bytes());
}

#[test]
fn upstream_failures_answer_502_and_504() {
    let backend = Backend::start();
    let port = free_port();
    let dead = format!("http://127.0.0.1:{port}");
    let mut config = base_config(&dead);
    merge(&mut config, "[upstream]\nconnect_timeout = \"1s\"");
    let unreachable = Lfguard::start_with(config, &[]);
    let response = unreachable.post(&Callback::signed(sms_body()));
    assert_eq!(
        (response.status, response.code().as_str()),
        (502, "upstream_unavailable")
    );
    // The caller learns nothing about lfguard's insides; the log line has the detail.
    let text = response.text();
    for inside in [
        "127.0.0.1",
        &port.to_string(),
        "os error",
        "refused",
        "connect",
    ] {
        assert!(!text.contains(inside), "{inside:?} in {text}");
    }
    let event = unreachable.wait_for_log(|e| e["message"] == "request" && e["status"] == 502);
    let reason = event["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("127.0.0.1:{port}")) && reason.contains("os error"),
        "{event}"
    );

    backend.set_reply(Reply {
        delay: Duration::from_secs(3),
        ..Reply::default()
    });
    let slow = Lfguard::start(&backend, "[upstream]\ntimeout = \"200ms\"");
    let response = slow.post(&Callback::signed(sms_body()));
    assert_eq!(
        (response.status, response.code().as_str()),
        (504, "upstream_timeout")
    );
}

#[test]
fn backend_errors_are_relayed_unchanged() {
    let backend = Backend::start();
    backend.set_reply(Reply {
        status: 500,
        body: "backend broke",
        ..Reply::default()
    });
    let lfguard = Lfguard::start(&backend, "");
    let response = lfguard.post(&Callback::signed(sms_body()));
    assert_eq!(response.status, 500);
    assert_eq!(response.text(), "backend broke");
}

#[test]
fn unverified_routes_pass_through_and_other_methods_are_refused() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        "[[routes]]\npath_prefix = \"/health\"\nverify = false",
    );
    let health = send_raw(lfguard.addr, b"GET /health/live HTTP/1.1\r\nHost: x\r\nx-lfguard-verified: true\r\nConnection: close\r\n\r\n");
    assert_eq!(health.status, 200);
    let received = backend.wait_for(1).remove(0);
    assert_eq!(received.uri, "/health/live");
    assert_eq!(
        received.header("x-lfguard-verified"),
        None,
        "passed-through requests are not marked verified"
    );
    let other = send_raw(
        lfguard.addr,
        b"GET /callback HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(
        (other.status, other.code().as_str()),
        (405, "method_not_allowed")
    );
    assert_eq!(other.header("allow"), Some("POST"));
    assert_eq!(backend.count(), 1);
}

#[test]
fn secrets_come_from_files_directories_and_the_environment() {
    let backend = Backend::start();
    let dir = tempfile::tempdir().unwrap();
    let partners = dir.path().join("partners");
    std::fs::create_dir(&partners).unwrap();
    write_file(&partners, "P100001", "dir-secret-old\ndir-secret-new\n");
    let file = write_file(dir.path(), "p2.secret", "file-secret\n");
    let mut config = base_config(&backend.url());
    merge(
        &mut config,
        &format!(
            "partners_dir = {:?}\n[partners.P100002]\nsecret_files = [{:?}]\n[partners.P100003]\nsecret_env = [\"LFGUARD_TEST_P3_SECRET\"]",
            partners.display().to_string(),
            file.display().to_string()
        ),
    );
    let lfguard = Lfguard::start_with(config, &[("LFGUARD_TEST_P3_SECRET", "env-secret")]);
    for (partner, secret, key_id) in [
        ("P100001", "dir-secret-new", "dir:2"),
        ("P100002", "file-secret", "file0:1"),
        ("P100003", "env-secret", "env:LFGUARD_TEST_P3_SECRET:1"),
    ] {
        let body = format!(
            r#"{{"partner_code":"{partner}","received_at":"{}","text_message":"x"}}"#,
            now_millis()
        );
        let response = lfguard.post(&Callback::signed_with(body, secret, Encoding::Hex));
        assert_eq!(response.status, 200, "{partner}: {}", response.text());
        let received = backend.requests();
        assert_eq!(
            received.last().unwrap().header("x-lfguard-key-id"),
            Some(key_id)
        );
    }
}

#[test]
fn environment_overrides_the_file() {
    let backend = Backend::start();
    let mut config = base_config("http://127.0.0.1:9");
    merge(&mut config, "[verify]\nsignature_encoding = \"raw\"");
    let lfguard = Lfguard::start_with(
        config,
        &[
            ("LFGUARD_UPSTREAM__URL", &backend.url()),
            ("LFGUARD_VERIFY__SIGNATURE_ENCODING", "hex"),
            (
                "LFGUARD_PARTNERS__P200001__SECRET_ENV",
                "[LFGUARD_TEST_ENV_SECRET]",
            ),
            ("LFGUARD_TEST_ENV_SECRET", "from-env"),
        ],
    );
    let body = format!(
        r#"{{"partner_code":"P200001","received_at":"{}","text_message":"x"}}"#,
        now_millis()
    );
    let response = lfguard.post(&Callback::signed_with(body, "from-env", Encoding::Hex));
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(backend.count(), 1);
}

#[test]
fn logs_are_json_with_one_event_per_request_and_no_secrets_or_message_text() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "");
    let callback = Callback::signed(sms_body());
    assert_eq!(lfguard.post(&callback).status, 200);
    assert_eq!(
        lfguard
            .post(&Callback::signed_with(sms_body(), "wrong", Encoding::Hex))
            .status,
        401
    );
    let event = lfguard.wait_for_log(|e| e["message"] == "request" && e["code"] == "forwarded");
    assert_eq!(event["partner"], PARTNER);
    assert_eq!(
        event["delivery_id"],
        callback.header("x-lf-delivery").unwrap()
    );
    assert_eq!(event["status"], 200);
    assert!(event["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(event["latency_ms"].as_f64().is_some());
    let refused =
        lfguard.wait_for_log(|e| e["message"] == "request" && e["code"] == "bad_signature");
    assert_eq!(refused["reason"], "signature does not match");
    let per_request = lfguard
        .events()
        .iter()
        .filter(|e| e["target"] == "lfguard::request")
        .count();
    assert_eq!(per_request, 2, "exactly one event per request");
    for event in lfguard.events() {
        let line = event.to_string();
        assert!(!line.contains(SECRET), "secret in log: {line}");
        assert!(
            !line.contains("发送短信内容"),
            "message text in log: {line}"
        );
        assert!(
            !line.contains(callback.header("x-lf-md5").unwrap()),
            "signature in log: {line}"
        );
    }
}
