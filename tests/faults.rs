//! Fault injection (issue "Hardening"): backends that refuse, reset, hang, trickle or flood;
//! Redis killed under load; lfguard itself killed with SIGKILL. In every case a callback that got
//! a 2xx from lfguard reached the backend, a failed delivery frees its replay claim so Linksfield's
//! retry gets through, and no replay is let through.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::*;

const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- raw fake backends

/// What a fake backend does with the request numbered `index` (0-based, over all connections).
/// Returns whether to keep serving the connection.
type Behaviour = dyn Fn(usize, &mut TcpStream) -> bool + Send + Sync;

/// A raw-TCP backend on 127.0.0.1:0 that records each request body and then misbehaves as told.
struct FakeBackend {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    connections: Arc<Connections>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How many connections a fake backend accepted, and how many lfguard closed.
#[derive(Default)]
struct Connections {
    counts: Mutex<(usize, usize)>,
    changed: std::sync::Condvar,
}

impl FakeBackend {
    fn start(behaviour: impl Fn(usize, &mut TcpStream) -> bool + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let behaviour: Arc<Behaviour> = Arc::new(behaviour);
        let counter = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(Connections::default());
        let thread = {
            let bodies = bodies.clone();
            let stop = stop.clone();
            let connections = connections.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut stream) = stream else { continue };
                    connections.counts.lock().unwrap().0 += 1;
                    let (bodies, behaviour, counter, connections) = (
                        bodies.clone(),
                        behaviour.clone(),
                        counter.clone(),
                        connections.clone(),
                    );
                    std::thread::spawn(move || {
                        let mut reader = BufReader::new(stream.try_clone().unwrap());
                        while let Some(body) = read_request(&mut reader) {
                            let index = counter.fetch_add(1, Ordering::SeqCst);
                            bodies.lock().unwrap().push(body);
                            if !behaviour(index, &mut stream) {
                                return;
                            }
                        }
                        // End of stream: lfguard closed the connection.
                        connections.counts.lock().unwrap().1 += 1;
                        connections.changed.notify_all();
                    });
                }
            })
        };
        FakeBackend {
            addr,
            bodies,
            connections,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn bodies(&self) -> Vec<Vec<u8>> {
        self.bodies.lock().unwrap().clone()
    }

    fn accepted_connections(&self) -> usize {
        self.connections.counts.lock().unwrap().0
    }

    /// Waits until lfguard has closed `n` connections; returns whether it did within `WAIT`.
    fn wait_closed_by_lfguard(&self, n: usize) -> bool {
        let counts = self.connections.counts.lock().unwrap();
        let (counts, _) = self
            .connections
            .changed
            .wait_timeout_while(counts, WAIT, |(_, closed)| *closed < n)
            .unwrap();
        counts.1 >= n
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request (lfguard always sends Content-Length) and returns its body; `None` at EOF.
fn read_request(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut length = 0;
    let mut first = true;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" && !first {
            break;
        }
        first = false;
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(body)
}

fn answer(stream: &mut TcpStream, body: &str) -> bool {
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).is_ok()
}

/// Closes the connection with a TCP RST (SO_LINGER 0) instead of a FIN.
fn reset(stream: &mut TcpStream) {
    socket2::SockRef::from(&*stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    // The RST goes out when the caller drops the stream (and its clones).
}

// ---------------------------------------------------------------- helpers

/// Sends a request and reads one response; `None` when the connection ends without a complete
/// one (a reset, a truncated body).
fn try_send(addr: SocketAddr, bytes: &[u8]) -> Option<Response> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(bytes).ok()?;
    read_response(&mut BufReader::new(stream))
}

fn forwarded(response: &Response) -> bool {
    response.status == 200 && response.header("x-lfguard-duplicate").is_none()
}

fn duplicate(response: &Response) -> bool {
    response.status == 200 && response.header("x-lfguard-duplicate") == Some("true")
}

fn start_against(upstream: &str, extra: &str) -> Lfguard {
    let mut config = base_config(upstream);
    merge(&mut config, extra);
    Lfguard::start_with(config, &[])
}

fn redis_config(redis: &Redis) -> String {
    format!(
        "[replay]\nstore = \"redis\"\nredis_url = \"{}\"",
        redis.url()
    )
}

/// lfguard's peak resident set size (`VmHWM`) in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

// ---------------------------------------------------------------- backend faults

#[test]
fn a_refusing_backend_gets_502_and_the_retry_is_forwarded_once_it_is_up() {
    let port = free_port();
    let lfguard = start_against(
        &format!("http://127.0.0.1:{port}"),
        "[upstream]\nconnect_timeout = \"1s\"",
    );
    let callback = Callback::signed(sms_body());
    let response = lfguard.post(&callback);
    assert_eq!(
        (response.status, response.code().as_str()),
        (502, "upstream_unavailable")
    );

    let backend = Backend::start_on(format!("127.0.0.1:{port}").parse().unwrap());
    let response = lfguard.post(&callback.with_new_delivery_id());
    assert!(forwarded(&response), "{response:?}");
    let received = backend.wait_for(1);
    assert_eq!(received[0].body.as_ref(), callback.body.as_slice());
    // Delivered now: the next retry stops at lfguard.
    assert!(duplicate(&lfguard.post(&callback.with_new_delivery_id())));
    assert_eq!(backend.count(), 1);
}

#[test]
fn kept_alive_backend_connections_are_reused() {
    let backend = FakeBackend::start(|_, stream| answer(stream, "{}"));
    let lfguard = start_against(&backend.url(), "");
    for _ in 0..5 {
        let response = lfguard.post(&Callback::signed(sms_body()));
        assert!(forwarded(&response), "{response:?}");
    }
    assert_eq!(backend.bodies().len(), 5);
    assert_eq!(backend.accepted_connections(), 1);
}

#[test]
fn a_backend_that_closes_each_connection_gets_every_callback() {
    let backend = FakeBackend::start(|_, stream| {
        let response = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
        let _ = stream.write_all(response.as_bytes());
        false
    });
    let lfguard = start_against(&backend.url(), "");
    for _ in 0..5 {
        let response = lfguard.post(&Callback::signed(sms_body()));
        assert!(forwarded(&response), "{response:?}");
    }
    assert_eq!(backend.bodies().len(), 5);
    assert_eq!(backend.accepted_connections(), 5);
}

/// A backend whose first connection answers one request and, idle for a while, receives the next
/// one, works on it for `work` and resets the connection. Later requests are answered.
fn reset_after_reading_the_second_request(work: Duration) -> (FakeBackend, Lfguard) {
    let backend = FakeBackend::start(move |index, stream| match index {
        1 => {
            std::thread::sleep(work);
            reset(stream);
            false
        }
        _ => answer(stream, "{}"),
    });
    let lfguard = start_against(&backend.url(), "");
    assert!(forwarded(&lfguard.post(&Callback::signed(sms_body()))));
    // The scenario itself, not synchronisation: the kept-alive connection must have been idle
    // for as long as a backend's keep-alive timeout could be.
    std::thread::sleep(Duration::from_millis(1300));
    (backend, lfguard)
}

#[test]
fn a_request_the_backend_read_is_never_sent_again_even_on_a_long_idle_connection() {
    for work in [Duration::ZERO, Duration::from_millis(500)] {
        let (backend, lfguard) = reset_after_reading_the_second_request(work);
        let callback = Callback::signed(sms_body());
        let response = lfguard.post(&callback);
        assert_eq!(
            (response.status, response.code().as_str()),
            (502, "upstream_unavailable"),
            "{work:?}"
        );
        let bodies = backend.bodies();
        assert_eq!(bodies.len(), 2, "{work:?}: sent again");
        assert_eq!(bodies[1], callback.body);
        // The claim was released: Linksfield's retry is forwarded.
        assert!(forwarded(&lfguard.post(&callback.with_new_delivery_id())));
        assert_eq!(backend.bodies().len(), 3);
    }
}

#[test]
fn a_connection_the_backend_closed_while_idle_is_not_used() {
    // The backend's keep-alive timeout: it closes each connection 300 ms after answering.
    let backend = FakeBackend::start(|_, stream| {
        answer(stream, "{}");
        std::thread::sleep(Duration::from_millis(300));
        false
    });
    let lfguard = start_against(&backend.url(), "");
    assert!(forwarded(&lfguard.post(&Callback::signed(sms_body()))));
    std::thread::sleep(Duration::from_millis(1300));
    let callback = Callback::signed(sms_body());
    assert!(forwarded(&lfguard.post(&callback)));
    let bodies = backend.bodies();
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[1], callback.body);
    assert_eq!(backend.accepted_connections(), 2);
}

#[test]
fn a_request_lost_with_a_busy_connection_is_not_sent_again() {
    // Reused at once, the connection cannot have met a keep-alive timeout: the backend failed
    // while handling the request, and lfguard leaves the retry to Linksfield.
    let backend = FakeBackend::start(|index, stream| {
        if index == 0 {
            return answer(stream, "{}");
        }
        reset(stream);
        false
    });
    let lfguard = start_against(&backend.url(), "");
    assert!(forwarded(&lfguard.post(&Callback::signed(sms_body()))));
    let response = lfguard.post(&Callback::signed(sms_body()));
    assert_eq!(response.status, 502, "{response:?}");
    assert_eq!(backend.bodies().len(), 2);
}

#[test]
fn idle_backend_connections_are_closed_after_the_pool_idle_timeout() {
    let backend = FakeBackend::start(|_, stream| answer(stream, "{}"));
    let lfguard = start_against(&backend.url(), "[upstream]\npool_idle_timeout = \"1s\"");
    assert!(forwarded(&lfguard.post(&Callback::signed(sms_body()))));
    assert!(
        backend.wait_closed_by_lfguard(1),
        "lfguard kept its idle backend connection open"
    );
    // A new callback opens a new connection.
    assert!(forwarded(&lfguard.post(&Callback::signed(sms_body()))));
    assert_eq!(backend.accepted_connections(), 2);
}

#[test]
fn a_backend_reset_before_its_status_line_is_complete_gets_502_and_releases_the_claim() {
    let fake = FakeBackend::start(|index, stream| {
        if index == 0 {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Le");
            let _ = stream.flush();
            reset(stream);
            false
        } else {
            answer(stream, "ok")
        }
    });
    let lfguard = start_against(&fake.url(), "");
    let callback = Callback::signed(sms_body());
    let response = lfguard.post(&callback);
    assert_eq!(
        (response.status, response.code().as_str()),
        (502, "upstream_unavailable"),
        "{}",
        response.text()
    );

    // Linksfield's retry is forwarded, not answered as a duplicate.
    let response = lfguard.post(&callback.with_new_delivery_id());
    assert!(forwarded(&response), "{response:?}");
    assert_eq!(response.text(), "ok");
    assert_eq!(
        fake.bodies(),
        [callback.body.clone(), callback.body.clone()]
    );
    // That delivery settled the claim.
    assert!(duplicate(&lfguard.post(&callback.with_new_delivery_id())));
    assert_eq!(fake.bodies().len(), 2);
}

/// The backend sent a 2xx status and then reset in the middle of its body. The caller never gets a
/// complete answer; the backend did accept the callback (a backend 2xx marks it
/// delivered), so Linksfield's retry is acknowledged as a duplicate rather than delivered twice.
#[test]
fn a_backend_reset_in_the_middle_of_a_2xx_body_is_cut_off_for_the_caller() {
    let fake = FakeBackend::start(|index, stream| {
        if index == 0 {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial");
            let _ = stream.flush();
            std::thread::sleep(Duration::from_millis(50));
            reset(stream);
            false
        } else {
            answer(stream, "ok")
        }
    });
    let lfguard = start_against(&fake.url(), "");
    let callback = Callback::signed(sms_body());
    let response = try_send(lfguard.addr, &callback.to_bytes());
    assert!(
        response.is_none(),
        "the caller must not see a complete response: {response:?}"
    );
    lfguard.wait_for_log(|e| e["message"] == "request" && e["code"] == "forwarded");
    let response = lfguard.post(&callback.with_new_delivery_id());
    assert!(duplicate(&response), "{response:?}");
    assert_eq!(fake.bodies().len(), 1);
    // lfguard itself is fine.
    assert!(forwarded(&lfguard.post(&Callback::signed(sms_body()))));
}

/// Sends `bytes` on a new connection and closes it after `after`, whatever came back.
fn send_and_hang_up(addr: SocketAddr, bytes: &[u8], after: Duration) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(bytes).unwrap();
    std::thread::sleep(after);
    drop(stream);
}

/// A sender that hangs up while the backend is still answering must not get the callback
/// delivered again: hyper drops the request's future when the client goes away, and the claim
/// used to be released with it, so the next copy was forwarded too (four deliveries of three
/// hung-up copies and one normal one). Once the request has gone to the backend, the exchange
/// runs to the end and the backend's answer settles the claim.
#[test]
fn a_sender_that_hangs_up_does_not_get_its_callback_delivered_twice() {
    let backend = Backend::start();
    backend.set_reply(Reply {
        delay: Duration::from_millis(1500),
        ..Reply::default()
    });
    let lfguard = Lfguard::start(&backend, "");
    let callback = Callback::signed(sms_body());
    let hang_up = Duration::from_millis(400);
    send_and_hang_up(lfguard.addr, &callback.to_bytes(), hang_up);
    backend.wait_for(1);
    let gone = lfguard.wait_for_log(|e| e["message"] == "request" && e["code"] == "client_closed");
    assert_eq!(gone["status"], 499, "{gone}");
    assert!(
        gone["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("settles the replay claim")),
        "{gone}"
    );
    // Linksfield's copies, hung up on as well, while the first is still with the backend.
    for _ in 0..2 {
        send_and_hang_up(
            lfguard.addr,
            &callback.with_new_delivery_id().to_bytes(),
            hang_up,
        );
    }
    // A copy waits while the first is in flight (409 in_flight), and is a duplicate once the
    // backend's 2xx settled it.
    let response = post_once_settled(&lfguard, &callback);
    assert!(duplicate(&response), "{response:?}");
    let received = backend.requests();
    assert_eq!(received.len(), 1, "delivered more than once");
    assert_eq!(received[0].body.as_ref(), callback.body.as_slice());
    assert_eq!(received[0].header("x-lfguard-verified"), Some("true"));
}

/// A copy of `callback`, sent again while lfguard answers 409 `in_flight`: the answer it gets once
/// the delivery that a hung-up sender left behind has settled (lfguard logs nothing when it does).
fn post_once_settled(lfguard: &Lfguard, callback: &Callback) -> Response {
    let deadline = Instant::now() + WAIT;
    loop {
        let response = lfguard.post(&callback.with_new_delivery_id());
        if response.status == 409 && response.code() == "in_flight" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        return response;
    }
}

/// The other half: a sender that hangs up on a delivery the backend refuses still frees the
/// claim (on the backend's real answer), so the next copy is forwarded.
#[test]
fn a_sender_that_hangs_up_on_a_refused_delivery_gets_the_retry_through() {
    let backend = Backend::start();
    backend.script([Reply {
        status: 503,
        delay: Duration::from_millis(1000),
        ..Reply::default()
    }]);
    let lfguard = Lfguard::start(&backend, "");
    let callback = Callback::signed(sms_body());
    send_and_hang_up(
        lfguard.addr,
        &callback.to_bytes(),
        Duration::from_millis(300),
    );
    backend.wait_for(1);
    let response = post_once_settled(&lfguard, &callback);
    assert!(forwarded(&response), "{response:?}");
    assert_eq!(backend.count(), 2);
    assert!(duplicate(&lfguard.post(&callback.with_new_delivery_id())));
    assert_eq!(backend.count(), 2);
}

#[test]
fn a_hanging_backend_gets_504_and_releases_the_claim() {
    let fake = FakeBackend::start(|index, stream| {
        if index == 0 {
            // Never answer; hold the connection until lfguard gives up on it.
            let mut sink = [0u8; 1024];
            while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
            false
        } else {
            answer(stream, "ok")
        }
    });
    let lfguard = start_against(&fake.url(), "[upstream]\ntimeout = \"500ms\"");
    let callback = Callback::signed(sms_body());
    let started = Instant::now();
    let response = lfguard.post(&callback);
    let elapsed = started.elapsed();
    assert_eq!(
        (response.status, response.code().as_str()),
        (504, "upstream_timeout")
    );
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );

    let response = lfguard.post(&callback.with_new_delivery_id());
    assert!(forwarded(&response), "claim not released: {response:?}");
    assert_eq!(fake.bodies().len(), 2);
    assert!(duplicate(&lfguard.post(&callback.with_new_delivery_id())));
    assert_eq!(fake.bodies().len(), 2);
}

#[test]
fn a_trickling_backend_within_the_timeout_is_relayed_completely_and_settled() {
    let body: String = (0..40).map(|i| format!("line {i:02}\n")).collect();
    let response_bytes = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Slow: yes\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    let pieces = response_bytes.len().div_ceil(16);
    let fake = FakeBackend::start(move |_, stream| {
        for piece in response_bytes.chunks(16) {
            if stream.write_all(piece).is_err() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        true
    });
    let lfguard = start_against(&fake.url(), "[upstream]\ntimeout = \"3s\"");
    let callback = Callback::signed(sms_body());
    let started = Instant::now();
    let response = lfguard.post(&callback);
    let elapsed = started.elapsed();
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("x-slow"), Some("yes"));
    assert_eq!(response.text(), body);
    assert!(
        elapsed >= Duration::from_millis(20 * pieces as u64),
        "the backend did trickle: {elapsed:?}"
    );
    // Settled as delivered.
    let response = lfguard.post(&callback.with_new_delivery_id());
    assert!(duplicate(&response), "{response:?}");
    assert_eq!(fake.bodies().len(), 1);
}

#[test]
fn a_50_mib_response_is_streamed_through_with_bounded_memory() {
    const SIZE: usize = 50 * 1024 * 1024;
    const PIECE: usize = 64 * 1024;
    let pattern: Vec<u8> = (0..SIZE + PIECE).map(|i| (i % 251) as u8).collect();
    let pattern = Arc::new(pattern);
    let fake = {
        let pattern = pattern.clone();
        FakeBackend::start(move |index, stream| {
            if index == 0 {
                return answer(stream, "warm-up");
            }
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n");
            if stream.write_all(head.as_bytes()).is_err() {
                return false;
            }
            let mut sent = 0;
            while sent < SIZE {
                let n = PIECE.min(SIZE - sent);
                if stream.write_all(&pattern[sent..sent + n]).is_err() {
                    return false;
                }
                sent += n;
            }
            true
        })
    };
    let lfguard = start_against(&fake.url(), "");
    assert!(forwarded(&lfguard.post(&Callback::signed(sms_body()))));
    let before = peak_rss_kib(lfguard.pid());

    let callback = Callback::signed(sms_body());
    let mut stream = TcpStream::connect(lfguard.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(&callback.to_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    let mut content_length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse::<usize>().ok();
        }
    }
    assert_eq!(content_length, Some(SIZE));
    // Read more slowly than the backend writes, so that lfguard would have to hold the body if
    // it did not apply backpressure.
    let mut received = 0;
    let mut buf = vec![0u8; PIECE];
    while received < SIZE {
        if received % (1024 * 1024) < PIECE {
            std::thread::sleep(Duration::from_millis(5));
        }
        let n = reader.read(&mut buf).unwrap();
        assert!(n > 0, "body ended after {received} of {SIZE} bytes");
        assert!(
            buf[..n] == pattern[received..received + n],
            "body differs at {received}"
        );
        received += n;
    }
    assert_eq!(received, SIZE);

    let after = peak_rss_kib(lfguard.pid());
    let grown_mib = after.saturating_sub(before) as f64 / 1024.0;
    assert!(
        grown_mib < 40.0,
        "lfguard's peak RSS grew by {grown_mib:.1} MiB ({before} → {after} KiB) for a 50 MiB body"
    );
    // Settled as delivered.
    lfguard.wait_for_logs(2, |e| e["message"] == "request" && e["code"] == "forwarded");
    let response = lfguard.post(&callback.with_new_delivery_id());
    assert!(duplicate(&response), "{response:?}");
    assert_eq!(fake.bodies().len(), 2);
}

// ---------------------------------------------------------------- Redis and lfguard faults

/// A callback and what lfguard answered (`None`: no complete answer).
type Sent = (Callback, Option<Response>);

#[test]
fn redis_killed_and_restarted_under_load_loses_nothing_and_delivers_nothing_twice() {
    let mut redis = Redis::start();
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, &redis_config(&redis));
    let addr = lfguard.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let sender = {
        let (stop, results) = (stop.clone(), results.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let callback = Callback::signed(sms_body());
                let response = try_send(addr, &callback.to_bytes());
                results.lock().unwrap().push((callback, response));
            }
        })
    };
    let unavailable = |e: &serde_json::Value| {
        e["message"] == "request" && e["code"] == "replay_store_unavailable"
    };
    backend.wait_for(20);
    redis.stop();
    lfguard.wait_for_logs(30, unavailable);
    redis.restart();
    // Wait until deliveries flow again after the restart.
    let delivered_before = backend.count();
    backend.wait_for(delivered_before + 50);
    stop.store(true, Ordering::SeqCst);
    sender.join().unwrap();

    let results = std::mem::take(&mut *results.lock().unwrap());
    let mut to_retry = Vec::new();
    for (callback, response) in &results {
        let response = response.as_ref().expect("lfguard answered every request");
        match response.status {
            200 => assert!(forwarded(response), "{response:?}"),
            503 => {
                assert_eq!(response.code(), "replay_store_unavailable");
                to_retry.push(callback.clone());
            }
            other => panic!("unexpected {other}: {}", response.text()),
        }
    }
    assert!(!to_retry.is_empty(), "Redis was down for some callbacks");

    // Linksfield retries the refused ones once Redis is back: each is delivered.
    for callback in &to_retry {
        let deadline = Instant::now() + WAIT;
        loop {
            let response = lfguard.post(&callback.with_new_delivery_id());
            if response.status == 200 {
                assert!(forwarded(&response), "{response:?}");
                break;
            }
            assert_eq!(response.status, 503, "{}", response.text());
            assert!(Instant::now() < deadline, "Redis never came back");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // And a replay of those (delivered with Redis up) is not forwarded again.
    for callback in to_retry.iter().take(5) {
        assert!(duplicate(&lfguard.post(&callback.with_new_delivery_id())));
    }

    let mut delivered: HashMap<Vec<u8>, usize> = HashMap::new();
    for request in backend.requests() {
        *delivered.entry(request.body.to_vec()).or_default() += 1;
    }
    for (callback, _) in &results {
        assert_eq!(
            delivered.get(&callback.body).copied().unwrap_or(0),
            1,
            "{} delivered a wrong number of times",
            String::from_utf8_lossy(&callback.body)
        );
    }
    assert_eq!(backend.count(), results.len(), "nothing else was delivered");
}

#[test]
fn sigkill_and_restart_on_redis_keeps_delivered_and_in_flight_claims() {
    let redis = Redis::start();
    let backend = Backend::start();
    // The first callback is answered at once; the second hangs at the backend while lfguard is
    // killed.
    backend.script([
        Reply::default(),
        Reply {
            delay: Duration::from_secs(3),
            ..Reply::default()
        },
    ]);
    let config = format!("{}\n[upstream]\ntimeout = \"1s\"", redis_config(&redis));
    let mut first = Lfguard::start(&backend, &config);

    let delivered = Callback::signed(sms_body());
    assert!(forwarded(&first.post(&delivered)));
    let in_flight = Callback::signed(sms_body());
    let pending = {
        let (addr, bytes) = (first.addr, in_flight.to_bytes());
        std::thread::spawn(move || try_send(addr, &bytes))
    };
    backend.wait_for(2);
    let claimed_at = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &first.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(first.wait_exit(), None, "killed by a signal");
    let answer = pending.join().unwrap();
    assert!(answer.is_none(), "a killed lfguard answered: {answer:?}");

    let second = Lfguard::start(&backend, &config);
    // Delivered before the kill: still a duplicate.
    assert!(duplicate(&second.post(&delivered.with_new_delivery_id())));
    // In flight at the kill: its claim holds until upstream.timeout + 5 s have passed.
    let response = second.post(&in_flight.with_new_delivery_id());
    assert_eq!(
        (response.status, response.code().as_str()),
        (409, "in_flight"),
        "{}",
        response.text()
    );
    assert!(response.header("retry-after").is_some());
    let deadline = claimed_at + Duration::from_secs(15);
    let retried = loop {
        let response = second.post(&in_flight.with_new_delivery_id());
        if response.status == 200 {
            break response;
        }
        assert_eq!(
            (response.status, response.code().as_str()),
            (409, "in_flight"),
            "{}",
            response.text()
        );
        assert!(
            Instant::now() < deadline,
            "the in-flight claim never expired"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(forwarded(&retried), "{retried:?}");
    let waited = claimed_at.elapsed();
    assert!(
        waited >= Duration::from_secs(5),
        "the claim expired after {waited:?}, before upstream.timeout + 5 s"
    );

    // Exactly: the delivered one once, the in-flight one at the kill and once after the expiry.
    let bodies: Vec<_> = backend.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    assert_eq!(bodies[0].as_ref(), delivered.body.as_slice());
    assert_eq!(bodies[1].as_ref(), in_flight.body.as_slice());
    assert_eq!(bodies[2].as_ref(), in_flight.body.as_slice());
    // No replay of either gets through any more.
    assert!(duplicate(&second.post(&in_flight.with_new_delivery_id())));
    assert!(duplicate(&second.post(&delivered.with_new_delivery_id())));
    assert_eq!(backend.count(), 3);
}
