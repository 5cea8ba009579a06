//! Starvation and memory limits: the budget for buffered bodies (`server.max_buffered_bytes`,
//! 503 `overloaded`), the connection caps with idle connections making room, the admin port's
//! own cap, `upstream.timeout` over the whole response, and the arithmetic that keeps the shipped
//! defaults inside the shipped pod's memory limit.

mod support;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lfguard::config::{Config, StoreKind};
use support::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The most time a client is left waiting in these tests before it counts as starved.
const PROMPTLY: Duration = Duration::from_secs(3);
/// How long the tests wait for a state they poll for (metrics, sockets) before failing.
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- helpers

/// Polls `/metrics` until `series` satisfies `check` (a readiness signal lfguard offers).
fn wait_for_metric(lfguard: &Lfguard, series: &str, check: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = metric(lfguard, series);
        if check(value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {value}; logs:\n{}",
            lfguard.logs().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A line of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Bytes that arrived on loopback sockets whose local port is `port` but that their owner has
/// not read yet (the rx_queue column of /proc/net/tcp).
fn unread_bytes(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit(':').next()?;
            let queues = fields.get(4)?;
            (u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| u64::from_str_radix(queues.split(':').nth(1)?, 16).ok())?
        })
        .sum()
}

/// Waits until lfguard has read everything sent to its proxy port.
fn wait_until_read(lfguard: &Lfguard) {
    let deadline = Instant::now() + WAIT;
    while unread_bytes(lfguard.addr.port()) > 0 {
        assert!(
            Instant::now() < deadline,
            "lfguard does not read its sockets"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A signed callback that keeps its connection open.
fn keep_alive(callback: &Callback) -> Vec<u8> {
    String::from_utf8(callback.to_bytes())
        .unwrap()
        .replace("Connection: close", "Connection: keep-alive")
        .into_bytes()
}

/// Sends a callback on a new connection and reads the answer within `PROMPTLY`, with the time
/// it took.
fn send_promptly(addr: SocketAddr, request: &[u8]) -> (Response, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PROMPTLY)).unwrap();
    stream.write_all(request).unwrap();
    let response = read_response(&mut BufReader::new(stream))
        .unwrap_or_else(|| panic!("no answer within {PROMPTLY:?}"));
    (response, started.elapsed())
}

/// Whether the peer closed `stream` (EOF or reset) within `PROMPTLY`; `false` if it is still
/// open. Reads and discards anything that arrives first.
fn closed_by_peer(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(PROMPTLY)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Whether `stream` is still open, without waiting: a read that would block.
fn still_open(stream: &mut TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let open = matches!(stream.read(&mut byte), Err(err) if err.kind() == ErrorKind::WouldBlock);
    stream.set_nonblocking(false).unwrap();
    open
}

/// A JSON callback body of about `size` bytes (a padding member).
fn sized_body(size: usize) -> String {
    let body = sms_body();
    let padding = size.saturating_sub(body.len() + 14);
    format!(
        r#"{},"padding":"{}"}}"#,
        body.trim_end_matches('}'),
        "x".repeat(padding)
    )
}

fn head(path: &str, length: usize) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: lfguard.test\r\nContent-Type: application/json\r\n\
         x-lf-md5: bm90LWNoZWNrZWQ=\r\nx-lf-delivery: 1\r\nContent-Length: {length}\r\n\r\n"
    )
    .into_bytes()
}

fn assert_overloaded(response: &Response) {
    assert_eq!(response.status, 503, "{}", response.text());
    assert_eq!(response.code(), "overloaded");
    assert_eq!(response.header("retry-after"), Some("2"));
    assert_eq!(response.header("content-type"), Some("application/json"));
}

// ---------------------------------------------------------------- memory arithmetic

/// What lfguard holds with nothing going on: measured 6.7–7.0 MiB (docs/performance.md, release
/// build); counted with a margin.
const BASELINE: u64 = 8 * MIB;
/// The memory replay store's cost of a key, with the map's bookkeeping (docs/verification.md,
/// "Replay stores").
const REPLAY_KEY_BYTES: u64 = 120;
/// A connection's task: hyper's connection state, the service future, the peer and the registry
/// entry.
const CONNECTION_TASK: u64 = 8 * KIB;
/// The backend connection of a request in progress: hyper's 8 KiB read buffer and 8 KiB buffer
/// for the request head (the backend is lfguard's own, its answers small).
const BACKEND_CONNECTION: u64 = 16 * KIB;
/// The admin port's hyper buffers (src/server/mod.rs `ADMIN_MAX_BUF_BYTES`).
const ADMIN_BUFFER: u64 = 8 * KIB;
/// Worker threads counted for `worker_threads = 0`: the pod's 500m CPU limit gives one.
const WORKERS_WHEN_AUTOMATIC: u64 = 2;
/// What the estimate leaves for the allocator's fragmentation and what it does not count.
const HEADROOM_PERCENT: u64 = 10;

/// The most memory lfguard can hold under `config`, item by item.
fn memory_bound(config: &Config) -> Vec<(&'static str, u64)> {
    let server = &config.server;
    let header_bytes = server.max_header_bytes as u64;
    // hyper caps both the read and the write buffer of a connection at `max_buf_size`, which
    // lfguard sets to max_header_bytes; a body that arrived with the headers is kept without a
    // copy and can pin one more read buffer while its request is forwarded.
    let per_connection = 2 * header_bytes + header_bytes + BACKEND_CONNECTION + CONNECTION_TASK;
    let per_admin_connection = 2 * ADMIN_BUFFER + CONNECTION_TASK;
    let workers = match server.worker_threads {
        0 => WORKERS_WHEN_AUTOMATIC,
        n => n as u64,
    };
    let replay = match config.replay.store {
        StoreKind::Memory => config.replay.capacity * REPLAY_KEY_BYTES,
        StoreKind::Redis => 0,
    };
    vec![
        ("baseline", BASELINE),
        ("replay store at capacity", replay),
        ("server.max_buffered_bytes", server.max_buffered_bytes),
        (
            "server.max_connections × per connection",
            server.max_connections as u64 * per_connection,
        ),
        (
            "server.admin_max_connections × per admin connection",
            server.admin_max_connections as u64 * per_admin_connection,
        ),
        // A chunked body's buffer is copied into a larger one in one go, on a worker thread.
        (
            "workers × max_body_bytes (a buffer being regrown)",
            workers * server.max_body_bytes,
        ),
    ]
}

/// `resources.limits.memory` of the lfguard container in k8s/base/deployment.yaml, in bytes.
fn pod_memory_limit() -> u64 {
    let deployment = std::fs::read_to_string(repo_file("k8s/base/deployment.yaml")).unwrap();
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut lines = deployment.lines();
    let container = lines
        .by_ref()
        .find(|line| line.trim() == "- name: lfguard")
        .expect("an lfguard container");
    let mut in_limits = false;
    for line in lines {
        if !line.trim().is_empty() && indent(line) <= indent(container) {
            break; // the next container, or the end of the list
        }
        let line = line.trim();
        if line == "limits:" {
            in_limits = true;
        } else if line == "requests:" {
            in_limits = false;
        } else if in_limits && let Some(value) = line.strip_prefix("memory:") {
            let value = value.trim();
            let (number, unit) = value.split_at(value.find(|c: char| !c.is_ascii_digit()).unwrap());
            let factor = match unit {
                "Mi" => MIB,
                "Gi" => 1024 * MIB,
                "Ki" => KIB,
                other => panic!("unexpected memory unit {other:?}"),
            };
            return number.parse::<u64>().unwrap() * factor;
        }
    }
    panic!("the lfguard container has no memory limit");
}

/// A configuration file as lfguard reads it (defaults < file), without the partner checks.
fn shipped(relative: &str) -> Config {
    use figment::providers::Format;
    figment::Figment::from(figment::providers::Serialized::defaults(Config::default()))
        .merge(figment::providers::Toml::file_exact(repo_file(relative)))
        .extract()
        .unwrap_or_else(|err| panic!("{relative}: {err}"))
}

#[test]
fn the_shipped_limits_fit_the_pod_memory_limit() {
    let limit = pod_memory_limit();
    let allowed = limit / 100 * (100 - HEADROOM_PERCENT);
    for (name, config) in [
        ("Config::default()", Config::default()),
        ("config/lfguard.toml", shipped("config/lfguard.toml")),
        ("k8s/base/lfguard.toml", shipped("k8s/base/lfguard.toml")),
    ] {
        let items = memory_bound(&config);
        let total: u64 = items.iter().map(|(_, bytes)| bytes).sum();
        let breakdown: String = items
            .iter()
            .map(|(item, bytes)| format!("\n  {item}: {:.1} MiB", *bytes as f64 / MIB as f64))
            .collect();
        assert!(
            total <= allowed,
            "{name}: lfguard may hold {:.1} MiB, more than {:.1} MiB ({HEADROOM_PERCENT}% below the \
             pod's {} MiB limit):{breakdown}",
            total as f64 / MIB as f64,
            allowed as f64 / MIB as f64,
            limit / MIB
        );
        assert!(config.server.max_buffered_bytes >= config.server.max_body_bytes);
        eprintln!(
            "{name}: at most {:.1} MiB of the pod's {} MiB:{breakdown}",
            total as f64 / MIB as f64,
            limit / MIB
        );
    }
}

// ---------------------------------------------------------------- body budget

/// Hundreds of clients each declare a large body and send all of it but one byte. Only as many
/// as the budget covers are buffered; the others are refused before their bodies are read, so
/// lfguard's memory stays bounded, smaller callbacks still fit in the rest of the budget, and
/// everything works again once the holders go away.
#[test]
fn large_bodies_beyond_the_budget_get_503_overloaded_and_memory_stays_bounded() {
    const CLIENTS: usize = 300;
    const LENGTH: usize = 250 * 1024;
    const BUDGET: u64 = 2 * MIB;
    let holders_expected = (BUDGET / LENGTH as u64) as usize;
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        &format!(
            "[server]\nmax_connections = 1024\nmax_buffered_bytes = {BUDGET}\n\
             body_read_timeout = \"60s\""
        ),
    );
    assert_eq!(
        metric(&lfguard, "lfguard_buffered_body_bytes_limit"),
        BUDGET as f64
    );
    let rss_before = status_kib(lfguard.pid(), "VmRSS");

    // Every client sends its headers; lfguard reserves a declared body before reading it.
    let started = Instant::now();
    let mut clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| {
            let mut stream = TcpStream::connect(lfguard.addr).unwrap();
            stream.write_all(&head("/callback", LENGTH)).unwrap();
            stream
        })
        .collect();
    let refused = CLIENTS - holders_expected;
    lfguard.wait_for_logs(refused, |e| {
        e["message"] == "request" && e["code"] == "overloaded" && e["status"] == 503
    });
    // The refused ones have their answer; the holders do not.
    let mut holders = Vec::new();
    for stream in clients.drain(..) {
        stream.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let answered =
            !matches!(stream.peek(&mut byte), Err(err) if err.kind() == ErrorKind::WouldBlock);
        stream.set_nonblocking(false).unwrap();
        if answered {
            stream.set_read_timeout(Some(PROMPTLY)).unwrap();
            let response = read_response(&mut BufReader::new(stream)).unwrap();
            assert_overloaded(&response);
        } else {
            holders.push(stream);
        }
    }
    assert_eq!(holders.len(), holders_expected);
    for holder in &mut holders {
        holder.write_all(&vec![b' '; LENGTH - 1]).unwrap();
    }
    wait_until_read(&lfguard);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        metric(&lfguard, "lfguard_buffered_body_bytes"),
        (holders_expected * LENGTH) as f64
    );
    let rss_holding = status_kib(lfguard.pid(), "VmRSS");
    let grown_mib = rss_holding.saturating_sub(rss_before) as f64 / 1024.0;
    let unbounded_mib = (CLIENTS * LENGTH) as f64 / MIB as f64;
    eprintln!(
        "RSS {rss_before} KiB before, {rss_holding} KiB while {} bodies are held",
        holders.len()
    );
    assert!(
        grown_mib < 16.0,
        "lfguard's RSS grew by {grown_mib:.1} MiB ({rss_before} → {rss_holding} KiB); without \
         the budget the bodies alone would take {unbounded_mib:.0} MiB"
    );

    // A callback that fits in what is left of the budget is forwarded meanwhile; one that does
    // not is refused.
    let (small, _) = send_promptly(lfguard.addr, &Callback::signed(sms_body()).to_bytes());
    assert_eq!(small.status, 200, "{}", small.text());
    let too_big = Callback::signed(sized_body(100 * 1024));
    let (refused_response, _) = send_promptly(lfguard.addr, &too_big.to_bytes());
    assert_overloaded(&refused_response);
    assert_eq!(backend.count(), 1);

    // The holders go away: their shares come back and the large callback is forwarded.
    drop(holders);
    wait_for_metric(&lfguard, "lfguard_buffered_body_bytes", |held| held == 0.0);
    let (response, _) = send_promptly(lfguard.addr, &too_big.to_bytes());
    assert_eq!(response.status, 200, "{}", response.text());
    let received = backend.wait_for(2);
    assert_eq!(
        received.len(),
        2,
        "the backend received nothing from the holders"
    );
    assert_eq!(received[1].body.as_ref(), too_big.body.as_slice());
}

/// Chunked bodies and pass-through routes draw on the same budget: a chunked upload that holds
/// part of it leaves less for callbacks, and its share grows with its buffer.
#[test]
fn chunked_bodies_and_pass_through_routes_share_the_budget() {
    const LIMIT: usize = 64 * 1024;
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        &format!(
            "[server]\nmax_body_bytes = {LIMIT}\nmax_buffered_bytes = {LIMIT}\n\
             [[routes]]\npath_prefix = \"/upload\"\nverify = false"
        ),
    );
    let mut upload = TcpStream::connect(lfguard.addr).unwrap();
    upload
        .write_all(
            b"POST /upload/file HTTP/1.1\r\nHost: lfguard.test\r\nTransfer-Encoding: chunked\r\n\
              Connection: close\r\n\r\n",
        )
        .unwrap();
    let chunk = |size: usize| {
        let mut bytes = format!("{size:x}\r\n").into_bytes();
        bytes.extend(std::iter::repeat_n(b'u', size));
        bytes.extend_from_slice(b"\r\n");
        bytes
    };
    upload.write_all(&chunk(30_000)).unwrap();
    let held = wait_for_metric(&lfguard, "lfguard_buffered_body_bytes", |held| {
        held >= 30_000.0
    });
    assert!(
        held <= 60_000.0,
        "a buffer at most twice what it holds: {held}"
    );

    let big = Callback::signed(sized_body(40_000));
    assert_overloaded(&send_promptly(lfguard.addr, &big.to_bytes()).0);
    let small = Callback::signed(sms_body());
    assert_eq!(send_promptly(lfguard.addr, &small.to_bytes()).0.status, 200);

    // The upload grows to the body limit and takes the whole budget.
    upload.write_all(&chunk(LIMIT - 30_000)).unwrap();
    wait_for_metric(&lfguard, "lfguard_buffered_body_bytes", |held| {
        held == LIMIT as f64
    });
    assert_overloaded(&send_promptly(lfguard.addr, &Callback::signed(sms_body()).to_bytes()).0);

    upload.write_all(b"0\r\n\r\n").unwrap();
    upload.set_read_timeout(Some(PROMPTLY)).unwrap();
    let uploaded = read_response(&mut BufReader::new(upload)).unwrap();
    assert_eq!(uploaded.status, 200);
    wait_for_metric(&lfguard, "lfguard_buffered_body_bytes", |held| held == 0.0);
    assert_eq!(send_promptly(lfguard.addr, &big.to_bytes()).0.status, 200);

    let received = backend.wait_for(3);
    assert_eq!(received[1].uri, "/upload/file");
    assert_eq!(received[1].body.len(), LIMIT);
    assert!(received[1].body.iter().all(|&b| b == b'u'));
    assert_eq!(received[2].body.as_ref(), big.body.as_slice());
}

// ---------------------------------------------------------------- connection cap

/// The cap is taken by idle keep-alive connections and by connections that sent half a header
/// line (which would hold their slot for `header_read_timeout`): a new callback is still served
/// at once, each new connection closing the one idle the longest.
#[test]
fn idle_and_slow_header_connections_make_room_for_a_callback() {
    const CAP: usize = 8;
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        &format!("[server]\nmax_connections = {CAP}\nheader_read_timeout = \"60s\""),
    );
    let mut idle = Vec::new();
    for _ in 0..CAP / 2 {
        let mut stream = TcpStream::connect(lfguard.addr).unwrap();
        stream.set_read_timeout(Some(PROMPTLY)).unwrap();
        stream
            .write_all(&keep_alive(&Callback::signed(sms_body())))
            .unwrap();
        let response = read_response(&mut BufReader::new(stream.try_clone().unwrap())).unwrap();
        assert_eq!(response.status, 200);
        idle.push(stream);
    }
    let mut slow = Vec::new();
    for _ in 0..CAP / 2 {
        let mut stream = TcpStream::connect(lfguard.addr).unwrap();
        stream
            .write_all(b"POST /callback HTTP/1.1\r\nHost: lfguard.test\r\nX-Half: abc")
            .unwrap();
        slow.push(stream);
    }
    wait_for_metric(
        &lfguard,
        "lfguard_connections{listener=\"proxy\"}",
        |open| open == CAP as f64,
    );
    wait_until_read(&lfguard);

    let callback = Callback::signed(sms_body());
    let (response, took) = send_promptly(lfguard.addr, &callback.to_bytes());
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(took < PROMPTLY, "{took:?}");
    assert_eq!(backend.wait_for(CAP / 2 + 1).len(), CAP / 2 + 1);
    // The connection idle the longest made room: the first kept-alive one.
    assert!(closed_by_peer(&mut idle[0]));
    assert!(still_open(&mut slow[CAP / 2 - 1]));

    // That one closed its connection after the answer. Further callbacks that keep theirs open
    // are served as promptly, each (once the cap is reached again) closing the next idlest
    // connection: the kept-alive ones first, then those still sending their headers.
    let mut kept = Vec::new();
    for _ in 0..CAP {
        let started = Instant::now();
        let mut stream = TcpStream::connect(lfguard.addr).unwrap();
        stream.set_read_timeout(Some(PROMPTLY)).unwrap();
        stream
            .write_all(&keep_alive(&Callback::signed(sms_body())))
            .unwrap();
        let response = read_response(&mut BufReader::new(stream.try_clone().unwrap())).unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        assert!(started.elapsed() < PROMPTLY, "{:?}", started.elapsed());
        kept.push(stream);
    }
    assert_eq!(
        metric(
            &lfguard,
            "lfguard_connections_shed_total{listener=\"proxy\"}"
        ),
        CAP as f64
    );
    for stream in idle.iter_mut().chain(slow.iter_mut()) {
        assert!(closed_by_peer(stream));
    }
    for stream in &mut kept {
        assert!(still_open(stream));
    }
    assert_eq!(backend.count(), CAP / 2 + 1 + CAP);
    lfguard.wait_for_log(|e| e["message"] == "request" && e["code"] == "forwarded");
}

/// Connections in the middle of a request (the backend is slow to answer; a body still
/// arriving) are never closed to make room; an idle one is.
#[test]
fn a_connection_with_a_request_in_progress_is_never_shed() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "[server]\nmax_connections = 3");
    backend.script([Reply {
        delay: Duration::from_millis(1500),
        ..Reply::default()
    }]);
    // Waiting for the backend's answer.
    let mut waiting = TcpStream::connect(lfguard.addr).unwrap();
    waiting
        .write_all(&Callback::signed(sms_body()).to_bytes())
        .unwrap();
    backend.wait_for(1);
    // Sending its body: headers and half of it.
    let uploading_callback = Callback::signed(sms_body());
    let uploading_bytes = uploading_callback.to_bytes();
    let half = uploading_bytes.len() - uploading_callback.body.len() / 2;
    let mut uploading = TcpStream::connect(lfguard.addr).unwrap();
    uploading.write_all(&uploading_bytes[..half]).unwrap();
    // Idle after a request.
    let mut idle = TcpStream::connect(lfguard.addr).unwrap();
    idle.set_read_timeout(Some(PROMPTLY)).unwrap();
    idle.write_all(&keep_alive(&Callback::signed(sms_body())))
        .unwrap();
    assert_eq!(
        read_response(&mut BufReader::new(idle.try_clone().unwrap()))
            .unwrap()
            .status,
        200
    );
    wait_until_read(&lfguard);

    let (response, took) = send_promptly(lfguard.addr, &Callback::signed(sms_body()).to_bytes());
    assert_eq!(response.status, 200);
    assert!(took < PROMPTLY, "{took:?}");
    assert!(closed_by_peer(&mut idle), "the idle connection made room");

    uploading.write_all(&uploading_bytes[half..]).unwrap();
    uploading.set_read_timeout(Some(PROMPTLY)).unwrap();
    let uploaded = read_response(&mut BufReader::new(uploading)).expect("not cut off");
    assert_eq!(uploaded.status, 200);
    waiting.set_read_timeout(Some(WAIT)).unwrap();
    let answered = read_response(&mut BufReader::new(waiting)).expect("not cut off");
    assert_eq!(answered.status, 200);
    assert_eq!(
        metric(
            &lfguard,
            "lfguard_connections_shed_total{listener=\"proxy\"}"
        ),
        1.0
    );
    assert_eq!(backend.count(), 4);
}

/// The admin port has its own cap: a flood of idle admin connections neither keeps probes out
/// nor holds more than the cap's file descriptors, and a full proxy port does not affect it.
#[test]
fn the_admin_port_has_its_own_cap_and_stays_reachable() {
    const ADMIN_CAP: usize = 4;
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        &format!("[server]\nmax_connections = 2\nadmin_max_connections = {ADMIN_CAP}"),
    );
    assert_eq!(
        metric(&lfguard, "lfguard_connections_limit{listener=\"admin\"}"),
        ADMIN_CAP as f64
    );
    // The proxy port full of requests in progress.
    backend.set_reply(Reply {
        delay: Duration::from_secs(2),
        ..Reply::default()
    });
    let busy: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut stream = TcpStream::connect(lfguard.addr).unwrap();
            stream
                .write_all(&Callback::signed(sms_body()).to_bytes())
                .unwrap();
            stream
        })
        .collect();
    backend.wait_for(2);

    let fds_before = open_fds(lfguard.pid());
    let mut flood = Vec::new();
    for i in 0..100 {
        let mut stream = TcpStream::connect(lfguard.admin).unwrap();
        if i % 2 == 0 {
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: a")
                .unwrap();
        }
        flood.push(stream);
    }
    let started = Instant::now();
    let health = admin_get(lfguard.admin, "/healthz");
    assert_eq!(health.status, 200);
    assert!(started.elapsed() < PROMPTLY, "{:?}", started.elapsed());
    let shed = metric(
        &lfguard,
        "lfguard_connections_shed_total{listener=\"admin\"}",
    );
    assert!(shed >= 90.0, "{shed}");
    // Closed connections give their descriptors back: at most the cap stays open.
    let deadline = Instant::now() + WAIT;
    while open_fds(lfguard.pid()) > fds_before + ADMIN_CAP {
        assert!(
            Instant::now() < deadline,
            "{} file descriptors open, {fds_before} before the flood",
            open_fds(lfguard.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        metric(
            &lfguard,
            "lfguard_connections_shed_total{listener=\"proxy\"}"
        ),
        0.0
    );
    for stream in busy {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        assert_eq!(
            read_response(&mut BufReader::new(stream)).unwrap().status,
            200
        );
    }
}

// ---------------------------------------------------------------- upstream.timeout

/// A backend that answers the `n`-th request (from 0) as `behaviour` says.
struct StallingBackend {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl StallingBackend {
    fn start(behaviour: fn(usize, &mut TcpStream)) -> StallingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    loop {
                        let mut length = 0;
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if let Some((name, value)) = line.split_once(':')
                                && name.eq_ignore_ascii_case("content-length")
                            {
                                length = value.trim().parse().unwrap();
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; length];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        behaviour(counter.fetch_add(1, Ordering::SeqCst), &mut stream);
                    }
                });
            }
        });
        StallingBackend { addr, requests }
    }
}

/// The backend sends its head and the start of its body, then stalls (the first request) or
/// trickles a byte every 100 ms (the second): either way the response is cut off at
/// `upstream.timeout` after the request was sent, and lfguard keeps serving.
#[test]
fn a_response_body_that_does_not_finish_within_upstream_timeout_is_cut_off() {
    const LENGTH: usize = 1000;
    let backend = StallingBackend::start(|index, stream| {
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {LENGTH}\r\n\r\n");
        let _ = stream.write_all(head.as_bytes());
        match index {
            0 => {
                let _ = stream.write_all(&[b'a'; 10]);
                std::thread::sleep(Duration::from_secs(30));
            }
            1 => {
                for _ in 0..LENGTH {
                    if stream.write_all(b"b").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            _ => {
                let _ = stream.write_all(&[b'c'; LENGTH]);
            }
        }
    });
    let lfguard = Lfguard::start_with(
        {
            let mut config = base_config(&format!("http://{}", backend.addr));
            merge(&mut config, "[upstream]\ntimeout = \"1s\"");
            config
        },
        &[],
    );
    for (round, at_least) in [(0, 10), (1, 1)] {
        let started = Instant::now();
        let mut stream = TcpStream::connect(lfguard.addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream
            .write_all(&Callback::signed(sms_body()).to_bytes())
            .unwrap();
        let mut received = Vec::new();
        // EOF or a reset: either way the response ends, incomplete.
        let _ = stream.read_to_end(&mut received);
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&received);
        assert!(text.starts_with("HTTP/1.1 200"), "round {round}: {text}");
        let body = &received[text.find("\r\n\r\n").unwrap() + 4..];
        assert!(
            body.len() >= at_least && body.len() < LENGTH,
            "round {round}: {} body bytes",
            body.len()
        );
        assert!(
            took >= Duration::from_millis(900) && took < PROMPTLY,
            "round {round}: cut off after {took:?}"
        );
    }
    lfguard.wait_for_logs(2, |e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("did not finish within upstream.timeout"))
    });
    // lfguard keeps serving.
    let (response, _) = send_promptly(lfguard.addr, &Callback::signed(sms_body()).to_bytes());
    assert_eq!(response.status, 200);
    assert_eq!(response.body, vec![b'c'; LENGTH]);
    assert_eq!(backend.requests.load(Ordering::SeqCst), 3);
}

// ---------------------------------------------------------------- shutdown

/// On SIGTERM, once `server.drain_delay` has passed, kept-alive idle connections are closed at
/// once and one that has not sent its first request yet gets `server.header_read_timeout` to
/// send it, while a request in progress finishes: the drain does not wait for idle connections
/// to time out.
#[test]
fn shutdown_closes_idle_connections_and_lets_requests_in_progress_finish() {
    let backend = Backend::start();
    let mut lfguard = Lfguard::start(
        &backend,
        "[server]\nheader_read_timeout = \"2s\"\nshutdown_grace = \"10s\"\ndrain_delay = \"500ms\"",
    );
    let mut idle = TcpStream::connect(lfguard.addr).unwrap();
    idle.set_read_timeout(Some(PROMPTLY)).unwrap();
    idle.write_all(&keep_alive(&Callback::signed(sms_body())))
        .unwrap();
    let first = read_response(&mut BufReader::new(idle.try_clone().unwrap())).unwrap();
    assert_eq!(first.status, 200);
    let mut slow = TcpStream::connect(lfguard.addr).unwrap();
    slow.write_all(b"POST /callback HTTP/1.1\r\nHost: lfguard.test\r\nX-Half: abc")
        .unwrap();

    backend.set_reply(Reply {
        delay: Duration::from_millis(800),
        ..Reply::default()
    });
    let addr = lfguard.addr;
    let in_flight = std::thread::spawn(move || Callback::signed(sms_body()).send(addr));
    backend.wait_for(2);
    let signalled = Instant::now();
    lfguard.signal("TERM");
    assert!(closed_by_peer(&mut idle), "the idle connection is closed");
    assert!(
        signalled.elapsed() >= Duration::from_millis(500),
        "closed before the drain delay"
    );
    assert!(closed_by_peer(&mut slow), "the slow one is closed");
    let response = in_flight.join().unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(lfguard.wait_exit(), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "exited {:?} after SIGTERM",
        signalled.elapsed()
    );
    assert!(
        !lfguard
            .logs()
            .iter()
            .any(|line| line.contains("shutdown grace ended")),
        "the drain waited for the idle connection"
    );
}
