//! TLS both ways, against the real binary: lfguard's proxy port with `[server.tls]` (real clients:
//! curl and `openssl s_client` where installed, a rustls client, `lfguard send`), certificate
//! rotation and bad replacements, client certificates, and https backends. Every certificate is
//! made here (tests/support/tls.rs).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::tls::*;
use support::*;

/// lfguard with `[server.tls]` on `identity` (written into its directory as `server.crt` and
/// `server.key`), and `extra` TOML.
fn start_tls(backend: &Backend, identity: &Issued, extra: &str) -> Lfguard {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = identity.write(dir.path(), "server");
    start_tls_files(backend, dir, &cert, &key, extra)
}

fn start_tls_files(
    backend: &Backend,
    dir: tempfile::TempDir,
    cert: &Path,
    key: &Path,
    extra: &str,
) -> Lfguard {
    let mut config = base_config(&backend.url());
    merge(
        &mut config,
        &format!(
            "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    merge(&mut config, extra);
    let config_path = dir.path().join("lfguard.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    Lfguard::spawn(dir, config_path, &[])
}

/// The request bytes of a signed callback, written to a file for curl and openssl.
fn callback_files(dir: &Path, callback: &Callback) -> (std::path::PathBuf, Vec<String>) {
    let body = write_file(
        dir,
        "body.json",
        std::str::from_utf8(&callback.body).unwrap(),
    );
    let headers = callback
        .headers
        .iter()
        .flat_map(|(name, value)| ["-H".to_string(), format!("{name}: {value}")])
        .collect();
    (body, headers)
}

fn verified_and_forwarded(backend: &Backend, callback: &Callback) {
    let received = backend
        .requests()
        .into_iter()
        .find(|r| r.body == callback.body)
        .expect("the backend received the callback");
    assert_eq!(received.header("x-lfguard-verified"), Some("true"));
    assert_eq!(received.header("x-forwarded-proto"), Some("https"));
}

#[test]
fn a_rustls_client_curl_and_openssl_are_verified_and_forwarded_over_tls() {
    let root = Ca::new("lfguard test root");
    let intermediate = root.intermediate("lfguard test intermediate");
    let identity = intermediate.server();
    let backend = Backend::start();
    let lfguard = start_tls(&backend, &identity, "");

    // The full chain is presented: a client trusting only the root verifies it.
    let config = client_config(&root.pem(), None);
    let mut connection = TlsConnection::open(lfguard.addr, config).unwrap();
    assert_eq!(connection.serial(), identity.serial);
    assert_eq!(connection.alpn().as_deref(), Some(&b"http/1.1"[..]));
    let callback = Callback::signed(sms_body());
    let response = connection.exchange(&callback.to_bytes()).unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    verified_and_forwarded(&backend, &callback);

    let dir = tempfile::tempdir().unwrap();
    let root_file = write_pem(dir.path(), "root.pem", &root.pem());
    let port = lfguard.addr.port();
    if have("curl", "the curl handshake") {
        let callback = Callback::signed(sms_body());
        let (body, headers) = callback_files(dir.path(), &callback);
        let output = Command::new("curl")
            .args(["--silent", "--show-error", "--fail", "--http1.1"])
            .arg("--cacert")
            .arg(&root_file)
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .args(headers)
            .arg("--data-binary")
            .arg(format!("@{}", body.display()))
            .arg(format!("https://localhost:{port}/callback/sms"))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        verified_and_forwarded(&backend, &callback);
    }
    if have("openssl", "the openssl s_client handshake") {
        let callback = Callback::signed(sms_body());
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-verify_return_error",
                "-alpn",
                "http/1.1",
            ])
            .args(["-connect", &format!("127.0.0.1:{port}")])
            .args(["-servername", "localhost", "-verify_hostname", "localhost"])
            .arg("-CAfile")
            .arg(&root_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&callback.to_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let answer = String::from_utf8_lossy(&output.stdout);
        assert!(
            answer.starts_with("HTTP/1.1 200 "),
            "openssl s_client: {answer}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        verified_and_forwarded(&backend, &callback);
    }
}

#[test]
fn lfguard_send_speaks_https_with_a_ca_file() {
    let root = Ca::new("lfguard test root");
    let backend = Backend::start();
    let lfguard = start_tls(&backend, &root.server(), "");
    let dir = tempfile::tempdir().unwrap();
    let root_file = write_pem(dir.path(), "root.pem", &root.pem());
    let url = format!("https://localhost:{}/callback", lfguard.addr.port());
    let (code, out, err) = run_cli(
        &[
            "send",
            &url,
            "--secret",
            SECRET,
            "--partner",
            PARTNER,
            "--ca-file",
            root_file.to_str().unwrap(),
        ],
        None,
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("200\n"), "{out}");
    let received = backend.wait_for(1);
    assert_eq!(received[0].header("x-lfguard-verified"), Some("true"));

    // Without the CA, the platform's roots do not know the certificate.
    let (code, _, err) = run_cli(&["send", &url, "--secret", SECRET], None, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("UnknownIssuer") || err.contains("unknown issuer"),
        "{err}"
    );

    // --insecure skips verification and says so.
    let (code, out, err) = run_cli(
        &[
            "send",
            &url,
            "--secret",
            SECRET,
            "--partner",
            PARTNER,
            "--insecure",
        ],
        None,
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("warning: --insecure"), "{err}");
    assert_eq!(backend.count(), 2);
}

#[test]
fn tls_1_1_and_plain_http_to_the_tls_port_are_refused() {
    let root = Ca::new("lfguard test root");
    let backend = Backend::start();
    let lfguard = start_tls(&backend, &root.server(), "");
    let failures = |reason: &str| {
        let text = admin_get(lfguard.admin, "/metrics").text();
        sample(
            &text,
            &format!(
                "lfguard_tls_handshake_failures_total{{reason=\"{reason}\",role=\"listener\"}}"
            ),
        )
        .unwrap_or(0.0)
    };

    // Plain HTTP: a 400 saying so, and nothing forwarded.
    let response = Callback::signed(sms_body()).send(lfguard.addr);
    assert_eq!(response.status, 400);
    assert!(
        response.text().contains("speaks TLS"),
        "{}",
        response.text()
    );
    assert_eq!(failures("not_tls"), 1.0);

    if have("openssl", "the TLS 1.1 handshake") {
        let output = Command::new("openssl")
            .args(["s_client", "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"])
            .args(["-connect", &lfguard.addr.to_string()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!output.status.success(), "a TLS 1.1 handshake succeeded");
        // lfguard refused it (rather than openssl refusing to offer it).
        assert_eq!(failures("incompatible"), 1.0);
    }
    if have("curl", "curl over TLS 1.1") {
        let output = Command::new("curl")
            .args(["--silent", "--insecure", "--tlsv1.1", "--tls-max", "1.1"])
            .arg(format!("https://{}/", lfguard.addr))
            .output()
            .unwrap();
        assert!(!output.status.success(), "curl got through with TLS 1.1");
    }
    assert_eq!(backend.count(), 0);
}

#[test]
fn a_request_head_with_both_framings_is_still_refused_over_tls() {
    let root = Ca::new("lfguard test root");
    let backend = Backend::start();
    let lfguard = start_tls(&backend, &root.server(), "");
    let callback = Callback::signed(sms_body());
    let mut bytes = format!(
        "POST /callback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-lf-md5: {}\r\nx-lf-delivery: {}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        callback.header("x-lf-md5").unwrap(),
        callback.header("x-lf-delivery").unwrap(),
        callback.body.len(),
        callback.body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&callback.body);
    bytes.extend_from_slice(b"\r\n0\r\n\r\n");
    let mut connection =
        TlsConnection::open(lfguard.addr, client_config(&root.pem(), None)).unwrap();
    let response = connection.exchange(&bytes).unwrap();
    assert_eq!(response.status, 400, "{}", response.text());
    assert_eq!(backend.count(), 0);
}

#[test]
fn client_certificates_are_required_when_a_client_ca_is_set() {
    let root = Ca::new("lfguard test root");
    let clients = Ca::new("partner gateway CA");
    let backend = Backend::start();
    let dir = tempfile::tempdir().unwrap();
    let client_ca = write_pem(dir.path(), "clients.pem", &clients.pem());
    let lfguard = start_tls(
        &backend,
        &root.server(),
        &format!(
            "[server.tls]\nclient_ca_file = {:?}",
            client_ca.display().to_string()
        ),
    );
    let callback = Callback::signed(sms_body());

    // Without a certificate: the handshake (or, in TLS 1.3, the first read) fails.
    let refused = TlsConnection::open(lfguard.addr, client_config(&root.pem(), None))
        .ok()
        .and_then(|mut connection| connection.exchange(&callback.to_bytes()));
    assert!(refused.is_none(), "{refused:?}");
    // With one of another CA: refused too.
    let stranger = root.client("stranger");
    let refused = TlsConnection::open(lfguard.addr, client_config(&root.pem(), Some(&stranger)))
        .ok()
        .and_then(|mut connection| connection.exchange(&callback.to_bytes()));
    assert!(refused.is_none(), "{refused:?}");
    assert_eq!(backend.count(), 0);
    let text = admin_get(lfguard.admin, "/metrics").text();
    assert_eq!(
        sample(
            &text,
            "lfguard_tls_handshake_failures_total{reason=\"no_certificate\",role=\"listener\"}"
        ),
        Some(1.0),
        "{text}"
    );

    let gateway = clients.client("gateway");
    let mut connection =
        TlsConnection::open(lfguard.addr, client_config(&root.pem(), Some(&gateway))).unwrap();
    let response = connection.exchange(&callback.to_bytes()).unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    verified_and_forwarded(&backend, &callback);

    if have("curl", "curl with a client certificate") {
        let root_file = write_pem(dir.path(), "root.pem", &root.pem());
        let (cert, key) = gateway.write(dir.path(), "gateway");
        let port = lfguard.addr.port();
        let curl = |with_certificate: bool| {
            let mut command = Command::new("curl");
            command
                .args([
                    "--silent",
                    "--output",
                    "/dev/null",
                    "--write-out",
                    "%{http_code}",
                ])
                .arg("--cacert")
                .arg(&root_file)
                .args(["--resolve", &format!("localhost:{port}:127.0.0.1")]);
            if with_certificate {
                command.arg("--cert").arg(&cert).arg("--key").arg(&key);
            }
            let output = command
                .arg(format!("https://localhost:{port}/callback"))
                .output()
                .unwrap();
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        // GET: lfguard's own 405 shows the request got through the handshake.
        assert_eq!(curl(true), "405");
        assert_eq!(curl(false), "000");
    }
}

/// The layout of a mounted Kubernetes Secret of type kubernetes.io/tls: `tls.crt` and `tls.key`
/// are links into `..data`, a link to a timestamped directory swapped atomically on update.
struct MountedTlsSecret {
    root: std::path::PathBuf,
    generation: u32,
}

impl MountedTlsSecret {
    fn new(root: &Path, identity: &Issued) -> MountedTlsSecret {
        let mut mounted = MountedTlsSecret {
            root: root.to_path_buf(),
            generation: 0,
        };
        mounted.update(&identity.cert_pem, &identity.key_pem);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), root.join(name)).unwrap();
        }
        mounted
    }

    fn update(&mut self, cert_pem: &str, key_pem: &str) {
        self.generation += 1;
        let version = format!("..2026_11_25_{}", self.generation);
        let dir = self.root.join(&version);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("tls.crt"), cert_pem).unwrap();
        std::fs::write(dir.join("tls.key"), key_pem).unwrap();
        let staging = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &staging).unwrap();
        std::fs::rename(&staging, self.root.join("..data")).unwrap();
    }

    fn cert(&self) -> std::path::PathBuf {
        self.root.join("tls.crt")
    }

    fn key(&self) -> std::path::PathBuf {
        self.root.join("tls.key")
    }
}

/// The serial of the certificate `openssl s_client` is shown, or `None` without openssl.
fn openssl_serial(addr: std::net::SocketAddr) -> Option<String> {
    if !have("openssl", "comparing serials with openssl") {
        return None;
    }
    let shown = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    x509.stdin.take().unwrap().write_all(&shown.stdout).unwrap();
    let output = x509.wait_with_output().unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    Some(text.trim().strip_prefix("serial=").unwrap().to_string())
}

#[test]
fn a_rotated_certificate_serves_new_connections_while_kept_alive_ones_go_on() {
    let root = Ca::new("lfguard test root");
    let first = root.server();
    let second = root.server();
    assert_ne!(first.serial, second.serial);
    let backend = Backend::start();
    let dir = tempfile::tempdir().unwrap();
    let secret_dir = dir.path().join("tls");
    std::fs::create_dir(&secret_dir).unwrap();
    let mut mounted = MountedTlsSecret::new(&secret_dir, &first);
    let lfguard = start_tls_files(
        &backend,
        dir,
        &mounted.cert(),
        &mounted.key(),
        "reload_interval = \"100ms\"",
    );
    let config = client_config(&root.pem(), None);
    let mut kept = TlsConnection::open(lfguard.addr, config.clone()).unwrap();
    assert_eq!(kept.serial(), first.serial);
    let response = kept
        .exchange(&kept_alive(&Callback::signed(sms_body())))
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        openssl_serial(lfguard.addr).unwrap_or(first.serial.clone()),
        first.serial
    );

    mounted.update(&second.cert_pem, &second.key_pem);
    let reloaded = lfguard.wait_for_log(|e| e["message"] == "listener certificate reloaded");
    assert_eq!(reloaded["serial"], second.serial.as_str());
    assert_eq!(reloaded["trigger"], "file change");

    // The kept-alive connection goes on with the certificate it was opened with.
    let response = kept
        .exchange(&Callback::signed(sms_body()).to_bytes())
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(kept.serial(), first.serial);
    // A new connection sees the new certificate.
    let fresh = TlsConnection::open(lfguard.addr, config).unwrap();
    assert_eq!(fresh.serial(), second.serial);
    assert_eq!(
        openssl_serial(lfguard.addr).unwrap_or(second.serial.clone()),
        second.serial
    );
    let text = admin_get(lfguard.admin, "/metrics").text();
    assert_eq!(
        sample(
            &text,
            "lfguard_tls_certificate_expiry_timestamp_seconds{role=\"listener\"}"
        ),
        Some(second.not_after as f64)
    );
    assert_eq!(
        sample(
            &text,
            "lfguard_tls_certificate_reloads_total{result=\"success\",role=\"listener\"}"
        ),
        Some(1.0)
    );
    assert_eq!(backend.count(), 2);
}

#[test]
fn a_bad_replacement_keeps_the_certificate_in_use_until_a_good_one_arrives() {
    let root = Ca::new("lfguard test root");
    let first = root.server();
    let second = root.server();
    let backend = Backend::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = first.write(dir.path(), "server");
    let lfguard = start_tls_files(&backend, dir, &cert, &key, "reload_interval = \"100ms\"");
    let config = client_config(&root.pem(), None);
    let metric =
        |series: &str| sample(&admin_get(lfguard.admin, "/metrics").text(), series).unwrap_or(0.0);
    let failures = "lfguard_tls_certificate_reloads_total{result=\"failure\",role=\"listener\"}";
    assert_eq!(metric(failures), 0.0);

    // The new certificate with the old key: they do not belong together.
    std::fs::write(&cert, &second.cert_pem).unwrap();
    let failed = lfguard.wait_for_log(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("listener certificate reload failed"))
    });
    assert!(
        failed["problems"]
            .as_str()
            .unwrap()
            .contains("server.tls.key_file: is not the key of the certificate"),
        "{failed}"
    );
    assert_eq!(metric(failures), 1.0);
    let still = TlsConnection::open(lfguard.addr, config.clone()).unwrap();
    assert_eq!(still.serial(), first.serial);
    assert_eq!(admin_get(lfguard.admin, "/readyz").status, 200);

    // The key follows, and SIGHUP applies the pair at once.
    std::fs::write(&key, &second.key_pem).unwrap();
    lfguard.signal("HUP");
    lfguard.wait_for_log(|e| {
        e["message"] == "listener certificate reloaded" && e["serial"] == second.serial.as_str()
    });
    assert_eq!(
        TlsConnection::open(lfguard.addr, config).unwrap().serial(),
        second.serial
    );
    // Reported once, not on every poll.
    assert_eq!(metric(failures), 1.0);
}

#[test]
fn a_stalled_handshake_holds_a_connection_slot_and_times_out() {
    let root = Ca::new("lfguard test root");
    let backend = Backend::start();
    let lfguard = start_tls(
        &backend,
        &root.server(),
        "[server]\nmax_connections = 1\nheader_read_timeout = \"1s\"",
    );
    // A client that connects and says nothing holds the one slot ...
    let mut stalled = TcpStream::connect(lfguard.addr).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let open = |lfguard: &Lfguard| {
        let text = admin_get(lfguard.admin, "/metrics").text();
        sample(&text, "lfguard_connections{listener=\"proxy\"}").unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open(&lfguard) < 1.0 {
        assert!(std::time::Instant::now() < deadline, "never admitted");
        std::thread::yield_now();
    }
    // ... until the handshake timeout closes it.
    let mut buf = [0u8; 1];
    let started = std::time::Instant::now();
    assert_eq!(stalled.read(&mut buf).unwrap_or(0), 0);
    assert!(started.elapsed() < Duration::from_secs(10));
    let text = admin_get(lfguard.admin, "/metrics").text();
    assert_eq!(
        sample(
            &text,
            "lfguard_tls_handshake_failures_total{reason=\"timeout\",role=\"listener\"}"
        ),
        Some(1.0)
    );

    // At the cap, a connection still in its handshake is closed for a new one, like an idle one.
    let mut stalled = TcpStream::connect(lfguard.addr).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open(&lfguard) < 1.0 {
        assert!(std::time::Instant::now() < deadline, "never admitted");
        std::thread::yield_now();
    }
    let mut connection =
        TlsConnection::open(lfguard.addr, client_config(&root.pem(), None)).unwrap();
    assert_eq!(stalled.read(&mut buf).unwrap_or(0), 0);
    let response = connection
        .exchange(&Callback::signed(sms_body()).to_bytes())
        .unwrap();
    assert_eq!(response.status, 200);
    let text = admin_get(lfguard.admin, "/metrics").text();
    assert_eq!(
        sample(&text, "lfguard_connections_shed_total{listener=\"proxy\"}"),
        Some(1.0)
    );
}

#[test]
fn readiness_fails_once_the_listener_certificate_expires() {
    let root = Ca::new("lfguard test root");
    let now = now_millis() as i64 / 1000;
    // Valid for a few seconds more: long enough to start, short enough to wait for.
    let identity = root.server_valid(now - 3600, now + 4);
    let backend = Backend::start();
    let lfguard = start_tls(&backend, &identity, "");
    if now_millis() as i64 / 1000 < identity.not_after {
        let ready = admin_get(lfguard.admin, "/readyz");
        if now_millis() as i64 / 1000 < identity.not_after {
            assert_eq!(ready.status, 200, "{}", ready.text());
        }
    } else {
        println!("the machine took too long to start lfguard to see it ready first");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let unready = loop {
        let response = admin_get(lfguard.admin, "/readyz");
        if response.status == 503 {
            break response;
        }
        assert!(std::time::Instant::now() < deadline, "still ready");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        unready.text().contains("listener certificate expired"),
        "{}",
        unready.text()
    );
}

// ---------------------------------------------------------------- https backends

/// lfguard (plain HTTP) in front of `backend` with `upstream` TOML lines in `[upstream]`.
fn start_before_https(backend_url: &str, upstream: &str) -> Lfguard {
    let mut config = base_config(backend_url);
    merge(&mut config, &format!("[upstream]\n{upstream}"));
    Lfguard::start_with(config, &[])
}

fn upstream_failures(lfguard: &Lfguard, reason: &str) -> f64 {
    let text = admin_get(lfguard.admin, "/metrics").text();
    sample(
        &text,
        &format!("lfguard_tls_handshake_failures_total{{reason=\"{reason}\",role=\"upstream\"}}"),
    )
    .unwrap_or(0.0)
}

#[test]
fn an_https_backend_with_a_private_ca_gets_callbacks_on_kept_alive_connections() {
    let private = Ca::new("backend private CA");
    let identity = private.intermediate("backend issuing CA").server();
    let backend = Backend::start_tls(BackendTls::new(&identity, None));
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_pem(dir.path(), "private-ca.pem", &private.pem());
    let lfguard = start_before_https(
        &backend.url(),
        &format!("ca_file = {:?}", ca_file.display().to_string()),
    );
    for _ in 0..3 {
        let callback = Callback::signed(sms_body());
        let response = lfguard.post(&callback);
        assert_eq!(response.status, 200, "{}", response.text());
        let received = backend
            .requests()
            .into_iter()
            .find(|r| r.body == callback.body)
            .unwrap();
        assert_eq!(received.header("x-lfguard-verified"), Some("true"));
        // `Host` is the caller's, as over http.
        assert_eq!(received.header("host"), Some("lfguard.test"));
    }
    assert_eq!(backend.connections(), 1, "one kept-alive connection");
    let text = admin_get(lfguard.admin, "/metrics").text();
    assert_eq!(
        sample(
            &text,
            "lfguard_tls_certificate_expiry_timestamp_seconds{role=\"upstream\"}"
        ),
        Some(identity.not_after as f64)
    );
}

#[test]
fn an_https_backend_whose_certificate_is_not_trusted_gets_502_with_the_reason_logged() {
    let private = Ca::new("backend private CA");
    let backend = Backend::start_tls(BackendTls::new(&private.server(), None));
    let dir = tempfile::tempdir().unwrap();
    let other = write_pem(dir.path(), "other-ca.pem", &Ca::new("another CA").pem());
    let lfguard = start_before_https(
        &backend.url(),
        &format!("ca_file = {:?}", other.display().to_string()),
    );
    let callback = Callback::signed(sms_body());
    let response = lfguard.post(&callback);
    assert_eq!(
        (response.status, response.code().as_str()),
        (502, "upstream_unavailable")
    );
    // The caller learns nothing inside; the log says why.
    assert!(
        !response.text().contains("certificate"),
        "{}",
        response.text()
    );
    let event = lfguard.wait_for_log(|e| e["code"] == "upstream_unavailable");
    assert!(
        event["reason"].as_str().unwrap().contains("UnknownIssuer"),
        "{event}"
    );
    assert_eq!(upstream_failures(&lfguard, "unknown_issuer"), 1.0);
    assert_eq!(backend.count(), 0);
    // The claim was released: the retry is forwarded once the backend is trusted (not here).
    assert_eq!(lfguard.post(&callback.with_new_delivery_id()).status, 502);
}

#[test]
fn the_verified_name_can_differ_from_the_url_host() {
    let private = Ca::new("backend private CA");
    let backend = Backend::start_tls(BackendTls::new(&private.server(), None));
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_pem(dir.path(), "private-ca.pem", &private.pem());
    let ca = format!("ca_file = {:?}", ca_file.display().to_string());
    // Reached by an address, verified as the name its certificate has.
    let url = format!("https://127.0.0.1:{}", backend.addr.port());
    let lfguard = start_before_https(&url, &format!("{ca}\nserver_name = \"localhost\""));
    assert_eq!(lfguard.post(&Callback::signed(sms_body())).status, 200);
    let lfguard = start_before_https(&url, &format!("{ca}\nserver_name = \"backend.example\""));
    assert_eq!(lfguard.post(&Callback::signed(sms_body())).status, 502);
    assert_eq!(upstream_failures(&lfguard, "name_mismatch"), 1.0);
    assert_eq!(backend.count(), 1);
}

#[test]
fn an_https_backend_requiring_a_client_certificate_gets_lfguards() {
    let private = Ca::new("backend private CA");
    let clients = Ca::new("backend client CA");
    let backend = Backend::start_tls(BackendTls::new(&private.server(), Some(&clients)));
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_pem(dir.path(), "private-ca.pem", &private.pem());
    let ca = format!("ca_file = {:?}", ca_file.display().to_string());

    let without = start_before_https(&backend.url(), &ca);
    assert_eq!(without.post(&Callback::signed(sms_body())).status, 502);
    assert_eq!(backend.count(), 0);
    assert!(!backend.handshake_failures().is_empty());

    let identity = clients.client("lfguard");
    let (cert, key) = identity.write(dir.path(), "lfguard-client");
    let with = start_before_https(
        &backend.url(),
        &format!(
            "{ca}\nclient_cert_file = {:?}\nclient_key_file = {:?}",
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    let callback = Callback::signed(sms_body());
    assert_eq!(with.post(&callback).status, 200);
    assert_eq!(backend.requests()[0].body, callback.body);
    let text = admin_get(with.admin, "/metrics").text();
    assert_eq!(
        sample(
            &text,
            "lfguard_tls_certificate_expiry_timestamp_seconds{role=\"upstream_client\"}"
        ),
        Some(identity.not_after as f64)
    );
}

#[test]
fn a_tls_backend_connection_closed_while_idle_is_not_used() {
    let private = Ca::new("backend private CA");
    let mut tls = BackendTls::new(&private.server(), None);
    // The backend's keep-alive timeout.
    tls.idle_timeout = Some(Duration::from_millis(300));
    let backend = Backend::start_tls(tls);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_pem(dir.path(), "private-ca.pem", &private.pem());
    let lfguard = start_before_https(
        &backend.url(),
        &format!("ca_file = {:?}", ca_file.display().to_string()),
    );
    assert_eq!(lfguard.post(&Callback::signed(sms_body())).status, 200);
    // The scenario, not synchronisation: idle past the backend's keep-alive timeout.
    std::thread::sleep(Duration::from_millis(1300));
    let callback = Callback::signed(sms_body());
    assert_eq!(lfguard.post(&callback).status, 200);
    assert_eq!(backend.count(), 2);
    assert_eq!(backend.connections(), 2);
}

#[test]
fn lfguards_client_certificate_is_reloaded_when_its_files_change() {
    let private = Ca::new("backend private CA");
    let clients = Ca::new("backend client CA");
    let backend = Backend::start_tls(BackendTls::new(&private.server(), Some(&clients)));
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_pem(dir.path(), "private-ca.pem", &private.pem());
    let now = now_millis() as i64 / 1000;
    let first = clients.client_until("lfguard", now + 10 * 86_400);
    let second = clients.client_until("lfguard", now + 20 * 86_400);
    let (cert, key) = first.write(dir.path(), "client");
    let mut config = base_config(&backend.url());
    merge(
        &mut config,
        &format!(
            "reload_interval = \"100ms\"\n[upstream]\nca_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {:?}",
            ca_file.display().to_string(),
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    let lfguard = Lfguard::start_with(config, &[]);
    assert_eq!(lfguard.post(&Callback::signed(sms_body())).status, 200);
    let expiry = |lfguard: &Lfguard| {
        let text = admin_get(lfguard.admin, "/metrics").text();
        sample(
            &text,
            "lfguard_tls_certificate_expiry_timestamp_seconds{role=\"upstream_client\"}",
        )
    };
    assert_eq!(expiry(&lfguard), Some(first.not_after as f64));

    second.write(dir.path(), "client");
    lfguard.wait_for_log(|e| e["message"] == "upstream certificate files reloaded");
    assert_eq!(expiry(&lfguard), Some(second.not_after as f64));
    assert_eq!(lfguard.post(&Callback::signed(sms_body())).status, 200);
    assert_eq!(backend.count(), 2);
}

// ---------------------------------------------------------------- check-config and metrics

fn check_config(config: &Path) -> (i32, String, String) {
    run_cli(
        &["check-config", "--config", config.to_str().unwrap()],
        None,
        &[],
    )
}

#[test]
fn check_config_loads_the_certificate_files_and_says_when_each_expires() {
    let root = Ca::new("lfguard test root");
    let identity = root.intermediate("issuing").server();
    let clients = root.client("lfguard");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = identity.write(dir.path(), "server");
    let (client_cert, client_key) = clients.write(dir.path(), "client");
    let ca = write_pem(dir.path(), "ca.pem", &root.pem());
    let config = write_file(
        dir.path(),
        "lfguard.toml",
        &format!(
            "[server.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nclient_ca_file = {ca:?}\n\
             [upstream]\nurl = \"https://backend.example:8443\"\nca_file = {ca:?}\n\
             client_cert_file = {client_cert:?}\nclient_key_file = {client_key:?}\n\
             [partners.P1]\nsecrets = [\"s\"]\n"
        ),
    );
    let (code, out, err) = check_config(&config);
    assert_eq!(code, 0, "{err}");
    for expected in [
        format!(
            "# server.tls.cert_file: {}: serial {}, expires ",
            cert.display(),
            identity.serial
        ),
        format!(
            "# server.tls.client_ca_file: {}: 1 CA certificate(s)",
            ca.display()
        ),
        format!(
            "# upstream.ca_file: {}: the first CA to expire expires ",
            ca.display()
        ),
        format!(
            "# upstream.client_cert_file: {}: serial {}, expires ",
            client_cert.display(),
            clients.serial
        ),
    ] {
        assert!(out.contains(&expected), "no {expected:?} in\n{out}");
    }
    assert!(
        out.contains(", in 29 days\n") || out.contains(", in 30 days\n"),
        "{out}"
    );
    // Still the effective configuration as TOML.
    let effective: toml::Table = out.parse().unwrap();
    assert_eq!(
        effective["server"]["tls"]["cert_file"].as_str(),
        Some(cert.to_str().unwrap())
    );
}

#[test]
fn check_config_reports_every_certificate_problem_with_its_key_and_line() {
    let root = Ca::new("lfguard test root");
    let now = now_millis() as i64 / 1000;
    let expired = root.server_valid(now - 10 * 86_400, now - 86_400);
    let dir = tempfile::tempdir().unwrap();
    let (expired_cert, expired_key) = expired.write(dir.path(), "expired");
    let (_, other_key) = root.client("other").write(dir.path(), "other");
    let (client_cert, _) = root.client("lfguard").write(dir.path(), "client");
    let not_pem = write_file(dir.path(), "not.pem", "hello\n");
    let missing = dir.path().join("missing.pem");
    let config = write_file(
        dir.path(),
        "lfguard.toml",
        &format!(
            "[server.tls]\n\
             cert_file = {expired_cert:?}\n\
             key_file = {expired_key:?}\n\
             client_ca_file = {missing:?}\n\
             [upstream]\n\
             url = \"https://backend.example\"\n\
             ca_file = {not_pem:?}\n\
             client_cert_file = {client_cert:?}\n\
             client_key_file = {other_key:?}\n\
             [partners.P1]\n\
             secrets = [\"s\"]\n"
        ),
    );
    let (code, out, err) = check_config(&config);
    assert_eq!((code, out.as_str()), (64, ""), "{err}");
    let at = |line: usize| format!("{}:{line}", config.display());
    let about = |key: &str, line: usize, what: &str| {
        let prefix = format!("  - {key} ({}): ", at(line));
        assert!(
            err.lines()
                .any(|l| l.starts_with(&prefix) && l.contains(what)),
            "no line {prefix}…{what}… in\n{err}"
        );
    };
    about("server.tls.cert_file", 2, "the certificate expired ");
    about("server.tls.client_ca_file", 4, "No such file");
    about("upstream.ca_file", 7, "holds no PEM certificate");
    about(
        "upstream.client_key_file",
        9,
        "is not the key of the certificate",
    );
    assert!(
        err.starts_with("lfguard: invalid configuration (4 problems)"),
        "{err}"
    );

    // serve refuses the same, having started nothing.
    let (code, _, err) = run_cli(&["serve", "--config", config.to_str().unwrap()], None, &[]);
    assert_eq!(code, 64, "{err}");

    // Settings of https only, with an http backend.
    let config = write_file(
        dir.path(),
        "http.toml",
        "[upstream]\nurl = \"http://127.0.0.1:8081\"\nserver_name = \"backend\"\n\
         client_cert_file = \"/x\"\n[partners.P1]\nsecrets = [\"s\"]\n",
    );
    let (code, _, err) = check_config(&config);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("upstream.server_name ("), "{err}");
    assert!(err.contains(": only for an https:// upstream.url"), "{err}");
    assert!(
        err.contains("upstream.client_key_file: required with upstream.client_cert_file")
            || err.contains(
                "upstream.client_key_file (default): required with upstream.client_cert_file"
            ),
        "{err}"
    );
}

#[test]
fn tls_metrics_pass_promtool() {
    let root = Ca::new("lfguard test root");
    let backend = Backend::start();
    let lfguard = start_tls(&backend, &root.server(), "");
    // A TCP check that connects and closes (a load balancer's) is no failed handshake.
    drop(TcpStream::connect(lfguard.addr).unwrap());
    // A plain HTTP request and a good callback, so that the labelled series exist.
    assert_eq!(Callback::signed(sms_body()).send(lfguard.addr).status, 400);
    let mut connection =
        TlsConnection::open(lfguard.addr, client_config(&root.pem(), None)).unwrap();
    assert_eq!(
        connection
            .exchange(&Callback::signed(sms_body()).to_bytes())
            .unwrap()
            .status,
        200
    );
    let text = admin_get(lfguard.admin, "/metrics").text();
    for series in [
        "lfguard_tls_certificate_expiry_timestamp_seconds{role=\"listener\"}",
        "lfguard_tls_handshake_failures_total{reason=\"not_tls\",role=\"listener\"}",
        "lfguard_tls_certificate_reloads_total{result=\"failure\",role=\"listener\"}",
    ] {
        assert!(sample(&text, series).is_some(), "no {series} in\n{text}");
    }
    assert!(!text.contains("reason=\"closed\""), "{text}");
    promtool_check_metrics(&text);
}

#[test]
fn lfguard_demo_speaks_https_with_a_given_certificate() {
    let root = Ca::new("lfguard test root");
    let identity = root.intermediate("issuing").server();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = identity.write(dir.path(), "server");
    let root_file = write_pem(dir.path(), "root.pem", &root.pem());
    let demo = |extra: &[&str]| {
        let mut args = vec![
            "demo",
            "--cert-file",
            cert.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run_cli(&args, None, &[])
    };
    let (code, out, err) = demo(&["--ca-file", root_file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("lfguard's port speaks TLS: the callbacks go to https://localhost:"),
        "{out}"
    );
    assert!(
        out.contains("5 of 5 callbacks handled as expected."),
        "{out}"
    );
    // A name the certificate does not carry: no callback gets through.
    let (code, out, err) = demo(&[
        "--ca-file",
        root_file.to_str().unwrap(),
        "--server-name",
        "callbacks.example.com",
    ]);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(
        err.starts_with("lfguard: https://callbacks.example.com:"),
        "{err}"
    );
    assert!(
        err.contains(
            "TLS handshake failed: invalid peer certificate: certificate not valid for name"
        ),
        "{err}"
    );
}

#[test]
fn the_certbot_deploy_hook_hands_lfguard_the_renewed_certificate() {
    let root = Ca::new("lfguard test root");
    let first = root.server();
    let renewed = root.server();
    let backend = Backend::start();
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir(&tls_dir).unwrap();
    let cert = write_pem(&tls_dir, "fullchain.pem", &first.cert_pem);
    let key = write_pem(&tls_dir, "privkey.pem", &first.key_pem);
    // Only the hook's reload can apply it.
    let lfguard = start_tls_files(&backend, dir, &cert, &key, "reload_interval = \"1h\"");
    let lineage = tempfile::tempdir().unwrap();
    write_pem(lineage.path(), "fullchain.pem", &renewed.cert_pem);
    write_pem(lineage.path(), "privkey.pem", &renewed.key_pem);
    let group = Command::new("id").arg("-gn").output().unwrap();
    let group = String::from_utf8(group.stdout).unwrap();
    let output = Command::new("sh")
        .arg(repo_file("docs/examples/certbot-deploy-hook.sh"))
        .env("RENEWED_LINEAGE", lineage.path())
        .env("LFGUARD_TLS_DIR", &tls_dir)
        .env("LFGUARD_TLS_GROUP", group.trim())
        .env("LFGUARD_RELOAD", format!("kill -HUP {}", lfguard.pid()))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reloaded = lfguard.wait_for_log(|e| e["message"] == "listener certificate reloaded");
    assert_eq!(reloaded["trigger"], "SIGHUP");
    assert_eq!(reloaded["serial"], renewed.serial.as_str());
    let fresh = TlsConnection::open(lfguard.addr, client_config(&root.pem(), None)).unwrap();
    assert_eq!(fresh.serial(), renewed.serial);
    use std::os::unix::fs::PermissionsExt;
    for name in ["fullchain.pem", "privkey.pem"] {
        let mode = std::fs::metadata(tls_dir.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640, "{name}");
    }
    assert!(!tls_dir.join(".privkey.pem.new").exists());
    // Without RENEWED_LINEAGE it refuses to run.
    let output = Command::new("sh")
        .arg(repo_file("docs/examples/certbot-deploy-hook.sh"))
        .env_remove("RENEWED_LINEAGE")
        .output()
        .unwrap();
    assert!(!output.status.success());
}
