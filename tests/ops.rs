//! Operations: admin endpoints, metrics, secret reload, limits and graceful
//! shutdown, against the real binary.

mod support;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use lfguard::signature::Encoding;
use support::*;

fn metrics(lfguard: &Lfguard) -> String {
    let response = admin_get(lfguard.admin, "/metrics");
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    response.text()
}

#[test]
fn admin_endpoints_answer_and_metrics_pass_promtool() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "");
    assert_eq!(admin_get(lfguard.admin, "/healthz").status, 200);
    assert_eq!(admin_get(lfguard.admin, "/readyz").status, 200);
    assert_eq!(admin_get(lfguard.admin, "/nope").status, 404);
    let posted = send_raw(
        lfguard.admin,
        b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(posted.status, 405);
    // The proxy paths are not served on the admin port, and the admin paths are not on the proxy.
    assert_eq!(Callback::signed(sms_body()).send(lfguard.admin).status, 404);
    assert_eq!(admin_get(lfguard.addr, "/metrics").status, 405);
    assert_eq!(backend.count(), 0);

    lfguard.post(&Callback::signed(sms_body()));
    let text = metrics(&lfguard);
    promtool_check_metrics(&text);
    assert_eq!(
        sample(&text, "lfguard_build_info{version=\"0.1.0\"}"),
        Some(1.0)
    );
    // The standard process collector, so the usual dashboards work.
    for series in [
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "process_threads",
    ] {
        assert!(
            text.contains(&format!("# TYPE {series} ")),
            "no {series} in /metrics:\n{text}"
        );
    }
    let positive = |series: &str| {
        let value = sample(&text, series).unwrap_or_else(|| panic!("no {series} sample"));
        assert!(value > 0.0, "{series} = {value}");
        value
    };
    assert!(positive("process_resident_memory_bytes") > 1_000_000.0);
    assert!(positive("process_open_fds") <= positive("process_max_fds"));
    let now = now_millis() as f64 / 1000.0;
    let started = positive("process_start_time_seconds");
    assert!(
        started <= now && now - started < 600.0,
        "lfguard started {started}, now {now}"
    );
}

#[test]
fn metrics_count_outcomes_per_configured_partner_only() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "");
    assert_eq!(lfguard.post(&Callback::signed(sms_body())).status, 200);
    assert_eq!(
        lfguard
            .post(&Callback::signed_with(sms_body(), "forged", Encoding::Hex))
            .status,
        401
    );
    for i in 0..20 {
        let body = format!(r#"{{"partner_code":"P9{i:05}","text_message":"x"}}"#);
        assert_eq!(
            lfguard.post(&Callback::signed(body)).code(),
            "unknown_partner"
        );
    }
    let text = metrics(&lfguard);
    assert_eq!(
        sample(
            &text,
            &format!("lfguard_requests_total{{code=\"forwarded\",partner=\"{PARTNER}\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!("lfguard_requests_total{{code=\"bad_signature\",partner=\"{PARTNER}\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "lfguard_requests_total{code=\"unknown_partner\",partner=\"other\"}"
        ),
        Some(20.0)
    );
    assert!(
        !text.contains("P900001"),
        "random partner codes never become labels"
    );
    assert_eq!(
        sample(&text, "lfguard_request_duration_seconds_count"),
        Some(22.0)
    );
    assert_eq!(
        sample(&text, "lfguard_upstream_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(sample(&text, "lfguard_replay_entries"), Some(1.0));
}

#[test]
fn replay_evictions_are_counted() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "[replay]\ncapacity = 5");
    for _ in 0..40 {
        assert_eq!(lfguard.post(&Callback::signed(sms_body())).status, 200);
    }
    let text = metrics(&lfguard);
    assert!(
        sample(&text, "lfguard_replay_evictions_total").unwrap() > 0.0,
        "{text}"
    );
    assert!(
        sample(&text, "lfguard_replay_entries").unwrap() <= 5.0,
        "{text}"
    );
}

/// Lays out a directory the way Kubernetes mounts a Secret: `P…` → `..data/P…`, and
/// `..data` → a timestamped directory that is swapped atomically on update.
struct MountedSecret {
    root: std::path::PathBuf,
    generation: u32,
}

impl MountedSecret {
    fn new(root: &std::path::Path, partner: &str, secret: &str) -> MountedSecret {
        let mut mounted = MountedSecret {
            root: root.to_path_buf(),
            generation: 0,
        };
        mounted.update(partner, secret);
        std::os::unix::fs::symlink(format!("..data/{partner}"), root.join(partner)).unwrap();
        mounted
    }

    fn update(&mut self, partner: &str, secret: &str) {
        self.generation += 1;
        let version = format!("..2026_11_25_{}", self.generation);
        std::fs::create_dir(self.root.join(&version)).unwrap();
        std::fs::write(
            self.root.join(&version).join(partner),
            format!("{secret}\n"),
        )
        .unwrap();
        let staging = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &staging).unwrap();
        std::fs::rename(&staging, self.root.join("..data")).unwrap();
    }
}

#[test]
fn a_secret_swapped_through_a_symlink_is_picked_up_without_a_restart() {
    let backend = Backend::start();
    let dir = tempfile::tempdir().unwrap();
    let mut mounted = MountedSecret::new(dir.path(), "P300001", "first-secret");
    let mut config = base_config(&backend.url());
    merge(
        &mut config,
        &format!(
            "partners_dir = {:?}\nreload_interval = \"100ms\"",
            dir.path().display().to_string()
        ),
    );
    let lfguard = Lfguard::start_with(config, &[]);
    let body = || {
        format!(
            r#"{{"partner_code":"P300001","received_at":"{}","text_message":"{}"}}"#,
            now_millis(),
            delivery_id()
        )
    };
    assert_eq!(
        lfguard
            .post(&Callback::signed_with(
                body(),
                "first-secret",
                Encoding::Hex
            ))
            .status,
        200
    );

    mounted.update("P300001", "second-secret");
    lfguard.wait_for_log(|e| e["message"] == "secrets reloaded" && e["trigger"] == "file change");
    assert_eq!(
        lfguard
            .post(&Callback::signed_with(
                body(),
                "second-secret",
                Encoding::Hex
            ))
            .status,
        200
    );
    assert_eq!(
        lfguard
            .post(&Callback::signed_with(
                body(),
                "first-secret",
                Encoding::Hex
            ))
            .code(),
        "bad_signature"
    );
    assert_eq!(
        sample(
            &metrics(&lfguard),
            "lfguard_secret_reloads_total{result=\"success\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn sighup_removes_a_revoked_secret_and_a_broken_reload_keeps_the_last_good_set() {
    let backend = Backend::start();
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "p4.secret", "old-secret\nnew-secret\n");
    let mut config = base_config(&backend.url());
    merge(
        &mut config,
        &format!(
            "reload_interval = \"1h\"\n[partners.P400001]\nsecret_files = [{:?}]",
            file.display().to_string()
        ),
    );
    let lfguard = Lfguard::start_with(config, &[]);
    let body = || {
        format!(
            r#"{{"partner_code":"P400001","received_at":"{}","text_message":"{}"}}"#,
            now_millis(),
            delivery_id()
        )
    };
    assert_eq!(
        lfguard
            .post(&Callback::signed_with(body(), "old-secret", Encoding::Hex))
            .status,
        200
    );

    std::fs::write(&file, "new-secret\n").unwrap();
    lfguard.signal("HUP");
    lfguard.wait_for_log(|e| e["message"] == "secrets reloaded" && e["trigger"] == "SIGHUP");
    assert_eq!(
        lfguard
            .post(&Callback::signed_with(body(), "old-secret", Encoding::Hex))
            .code(),
        "bad_signature"
    );
    assert_eq!(
        lfguard
            .post(&Callback::signed_with(body(), "new-secret", Encoding::Hex))
            .status,
        200
    );

    std::fs::write(&file, "\n").unwrap();
    lfguard.signal("HUP");
    let failure = lfguard.wait_for_log(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("secret reload failed"))
    });
    assert!(
        failure["problems"]
            .as_str()
            .unwrap()
            .contains("holds no secret"),
        "{failure}"
    );
    assert_eq!(
        lfguard
            .post(&Callback::signed_with(body(), "new-secret", Encoding::Hex))
            .status,
        200,
        "last good set kept"
    );
    let text = metrics(&lfguard);
    assert_eq!(
        sample(&text, "lfguard_secret_reloads_total{result=\"failure\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "lfguard_secret_reloads_total{result=\"success\"}"),
        Some(1.0)
    );
    assert_eq!(admin_get(lfguard.admin, "/readyz").status, 200);
    for event in lfguard.events() {
        assert!(!event.to_string().contains("new-secret"), "{event}");
    }
}

#[test]
fn sigterm_lets_an_in_flight_request_finish_and_exits_zero() {
    let backend = Backend::start();
    backend.set_reply(Reply {
        delay: Duration::from_millis(800),
        ..Reply::default()
    });
    let mut lfguard = Lfguard::start(&backend, "[server]\nshutdown_grace = \"10s\"");
    let addr = lfguard.addr;
    let in_flight = std::thread::spawn(move || Callback::signed(sms_body()).send(addr));
    backend.wait_for(1);
    lfguard.signal("TERM");
    lfguard.wait_for_log(|e| e["message"] == "shutdown signal: draining");
    assert_eq!(
        admin_get(lfguard.admin, "/readyz").status,
        503,
        "not ready while draining"
    );
    assert_eq!(
        admin_get(lfguard.admin, "/healthz").status,
        200,
        "still alive while draining"
    );
    let response = in_flight.join().unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(lfguard.wait_exit(), Some(0));
    assert!(
        TcpStream::connect(addr).is_err(),
        "no new connections after shutdown"
    );
}

#[test]
fn a_second_signal_exits_at_once() {
    let backend = Backend::start();
    backend.set_reply(Reply {
        delay: Duration::from_secs(10),
        ..Reply::default()
    });
    let mut lfguard = Lfguard::start(
        &backend,
        "[server]\nshutdown_grace = \"30s\"\n[upstream]\ntimeout = \"20s\"",
    );
    let addr = lfguard.addr;
    let _in_flight = std::thread::spawn(move || Callback::signed(sms_body()).send(addr));
    backend.wait_for(1);
    lfguard.signal("TERM");
    lfguard.wait_for_log(|e| e["message"] == "shutdown signal: draining");
    lfguard.signal("INT");
    assert_eq!(lfguard.wait_exit(), Some(1));
}

#[test]
fn too_many_or_too_large_headers_get_431() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "[server]\nmax_headers = 20");
    let mut callback = Callback::signed(sms_body());
    for i in 0..30 {
        callback = callback.with(&format!("x-extra-{i}"), "1");
    }
    assert_eq!(lfguard.post(&callback).status, 431);
    let huge = Callback::signed(sms_body()).with("x-huge", &"a".repeat(20_000));
    assert_eq!(lfguard.post(&huge).status, 431);
    assert_eq!(backend.count(), 0);
}

/// At the cap an idle connection makes room for a new one (tests/limits.rs), but one with a
/// request in progress never does: then the new connection waits for a free slot.
#[test]
fn connections_beyond_the_limit_wait_while_every_slot_is_busy() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "[server]\nmax_connections = 1");
    // The first client holds the only slot with a request the backend is slow to answer.
    backend.script([Reply {
        delay: Duration::from_millis(1500),
        ..Reply::default()
    }]);
    let mut holder = TcpStream::connect(lfguard.addr).unwrap();
    holder
        .write_all(&Callback::signed(sms_body()).to_bytes())
        .unwrap();
    holder
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    backend.wait_for(1);

    let mut waiting = TcpStream::connect(lfguard.addr).expect("the kernel queues it");
    waiting
        .write_all(&Callback::signed(sms_body()).to_bytes())
        .unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    let early = waiting.read(&mut byte);
    assert!(early.is_err(), "served while the only slot was busy");

    let first = read_response(&mut BufReader::new(holder)).expect("the busy one is not cut off");
    assert_eq!(first.status, 200);
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let response =
        read_response(&mut BufReader::new(waiting)).expect("served once the slot is free");
    assert_eq!(response.status, 200);
    assert_eq!(backend.count(), 2);
}

#[test]
fn slow_headers_are_cut_off_while_others_are_served() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "[server]\nheader_read_timeout = \"300ms\"");
    let mut slow = TcpStream::connect(lfguard.addr).unwrap();
    slow.write_all(b"POST /callback HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    assert_eq!(lfguard.post(&Callback::signed(sms_body())).status, 200);
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let closed = slow.read_to_end(&mut answer);
    assert!(
        closed.is_ok(),
        "the connection is closed, not left hanging: {closed:?}"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert_eq!(backend.count(), 1);
}

/// `log.format = "text"` goes through the same buffered stdout as JSON: each line must still
/// come out while lfguard is idle, everything before it exits, and without terminal colours when
/// stdout is not a terminal.
#[test]
fn text_logs_come_out_while_idle_and_at_exit_without_colours() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let backend = Backend::start();
    let mut config = base_config(&backend.url());
    merge(&mut config, "[log]\nformat = \"text\"");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lfguard.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    /// Kills lfguard if the test fails, so that it does not outlive the test.
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Running(
        Command::new(binary())
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    let stdout = child.0.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    let next_line_with = |needle: &str| loop {
        let Ok(line) = line_rx.recv_timeout(Duration::from_secs(20)) else {
            panic!("no line with {needle} came out");
        };
        assert!(!line.contains('\u{1b}'), "terminal escape codes: {line:?}");
        assert!(
            serde_json::from_str::<serde_json::Value>(&line).is_err(),
            "a JSON line in text format: {line}"
        );
        if line.contains(needle) {
            return line;
        }
    };
    let listening = next_line_with("listener=\"proxy\"");
    let addr: std::net::SocketAddr = listening
        .split("addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    next_line_with("ready");

    // One request while lfguard is otherwise idle: its line arrives without further traffic.
    let callback = Callback::signed(sms_body());
    assert_eq!(callback.send(addr).status, 200);
    let line = next_line_with(" request ");
    assert!(line.contains("code=\"forwarded\""), "{line}");
    assert!(line.contains("INFO"), "{line}");

    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    next_line_with("stopped");
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
}

/// The request line is written without a `tracing` event when logs are JSON; the log filter must
/// still decide whether it is written.
#[test]
fn the_log_filter_can_turn_request_lines_off() {
    let backend = Backend::start();
    let mut lfguard = Lfguard::start_with(
        base_config(&backend.url()),
        &[("RUST_LOG", "info,lfguard::request=off")],
    );
    let callback = Callback::signed(sms_body());
    assert_eq!(lfguard.post(&callback).status, 200);
    assert_eq!(backend.count(), 1);
    lfguard.signal("TERM");
    lfguard.wait_for_log(|event| event["message"] == "stopped");
    assert_eq!(lfguard.wait_exit(), Some(0));
    let events = lfguard.events();
    assert!(
        events.iter().any(|event| event["message"] == "ready"),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|event| event["message"] == "request"),
        "{events:?}"
    );
}

/// What one kept-alive sender saw while lfguard shut down.
#[derive(Debug, Default)]
struct SenderLog {
    statuses: Vec<u16>,
    /// Answers that told the sender to close the connection.
    closes: usize,
    /// Connections lfguard ended before the status line of a request sent on them.
    eof_without_status: usize,
    refused: usize,
}

/// Sends distinct callbacks over kept-alive connections until `stop`, reconnecting whenever an
/// answer says `Connection: close`.
fn kept_alive_sender(
    addr: std::net::SocketAddr,
    stop: &std::sync::atomic::AtomicBool,
) -> SenderLog {
    use std::sync::atomic::Ordering;
    let mut log = SenderLog::default();
    'connect: while !stop.load(Ordering::SeqCst) {
        let Ok(stream) = TcpStream::connect(addr) else {
            log.refused += 1;
            continue;
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        while !stop.load(Ordering::SeqCst) {
            let request = String::from_utf8(Callback::signed(sms_body()).to_bytes())
                .unwrap()
                .replace("Connection: close\r\n", "");
            if writer.write_all(request.as_bytes()).is_err() {
                log.eof_without_status += 1;
                continue 'connect;
            }
            match read_response(&mut reader) {
                None => {
                    log.eof_without_status += 1;
                    continue 'connect;
                }
                Some(response) => {
                    log.statuses.push(response.status);
                    if response
                        .header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                    {
                        log.closes += 1;
                        continue 'connect;
                    }
                }
            }
        }
    }
    log
}

#[test]
fn sigterm_under_load_keeps_serving_through_the_drain_delay_and_cuts_no_request() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const SENDERS: usize = 50;
    let backend = Backend::start();
    let mut lfguard = Lfguard::start(
        &backend,
        "[server]\ndrain_delay = \"2s\"\nshutdown_grace = \"10s\"",
    );
    let addr = lfguard.addr;
    let stop = AtomicBool::new(false);
    let logs: Vec<SenderLog> = std::thread::scope(|scope| {
        let senders: Vec<_> = (0..SENDERS)
            .map(|_| scope.spawn(|| kept_alive_sender(addr, &stop)))
            .collect();
        backend.wait_for(2 * SENDERS);
        lfguard.signal("TERM");
        lfguard.wait_for_log(|e| e["message"] == "still accepting while the endpoint is removed");
        assert_eq!(admin_get(lfguard.admin, "/readyz").status, 503);
        // The scenario, not synchronisation: senders go on for half the drain delay, as clients
        // do while the endpoint is being removed from load balancers.
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::SeqCst);
        senders.into_iter().map(|s| s.join().unwrap()).collect()
    });
    assert_eq!(lfguard.wait_exit(), Some(0));
    let statuses: Vec<u16> = logs.iter().flat_map(|l| l.statuses.clone()).collect();
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(logs.iter().map(|l| l.eof_without_status).sum::<usize>(), 0);
    assert_eq!(logs.iter().map(|l| l.refused).sum::<usize>(), 0);
    // Every sender was told to reconnect during the delay, and did.
    assert!(logs.iter().all(|l| l.closes >= 1), "{logs:?}");
    assert_eq!(backend.count(), statuses.len());
}

#[test]
fn when_the_grace_runs_out_cut_deliveries_release_their_claims_and_are_logged_as_such() {
    let redis = Redis::start();
    let backend = Backend::start();
    backend.script([Reply {
        delay: Duration::from_secs(8),
        ..Reply::default()
    }]);
    let store = format!(
        "[replay]\nstore = \"redis\"\nredis_url = \"{}\"\n[server]\ndrain_delay = \"0s\"\nshutdown_grace = \"1s\"",
        redis.url()
    );
    let mut lfguard = Lfguard::start(&backend, &store);
    let callback = Callback::signed(sms_body());
    let addr = lfguard.addr;
    let sender = {
        let callback = callback.clone();
        std::thread::spawn(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.write_all(&callback.to_bytes()).unwrap();
            read_response(&mut BufReader::new(stream))
        })
    };
    backend.wait_for(1);
    lfguard.signal("TERM");
    assert_eq!(lfguard.wait_exit(), Some(0));
    let cut = lfguard
        .events()
        .into_iter()
        .find(|e| e["message"] == "request")
        .expect("the cut request is logged");
    assert_eq!(cut["code"], "shutting_down", "{cut}");
    assert_eq!(cut["status"], 503);
    assert!(
        lfguard
            .events()
            .iter()
            .any(|e| e["message"] == "replay claims of cut requests released"
                && e["released"] == 1),
        "{:?}",
        lfguard.logs()
    );
    // The sender's connection ends with the process (no answer), or it got 503 shutting_down.
    let answer = sender.join().unwrap();
    assert!(
        answer
            .as_ref()
            .is_none_or(|answer| answer.code() == "shutting_down"),
        "{answer:?}"
    );

    // The retry, to a restarted (or another) lfguard, is forwarded at once: the claim is gone.
    let restarted = Lfguard::start(&backend, &store);
    let retry = restarted.post(&callback.with_new_delivery_id());
    assert_eq!(
        (retry.status, retry.header("x-lfguard-duplicate")),
        (200, None),
        "{}",
        retry.text()
    );
    assert_eq!(backend.count(), 2);
}
