//! Test support: a recording backend, the real lfguard binary and a real `redis-server`, each on
//! ephemeral loopback ports and torn down in `Drop`; plus a raw HTTP/1.1 client that can send
//! exactly the bytes a test wants.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use lfguard::signature::{self, Body, Encoding, NullValues};

pub mod tls;

pub const PARTNER: &str = "P002671";
pub const SECRET: &str = "xGl64jNW4B223SSDAsddgh=n";
const START_TIMEOUT: Duration = Duration::from_secs(20);
const IO_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- files and metrics

/// A file of this repository, by its path from the repository root.
pub fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The value of one sample line in a Prometheus text exposition.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// One series' value from lfguard's `/metrics`.
pub fn metric(lfguard: &Lfguard, series: &str) -> f64 {
    let response = admin_get(lfguard.admin, "/metrics");
    assert_eq!(response.status, 200);
    let text = response.text();
    sample(&text, series).unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

// ---------------------------------------------------------------- backend

/// One request as the backend received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }
}

/// How the backend answers the next requests.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub delay: Duration,
    pub body: &'static str,
}

impl Default for Reply {
    fn default() -> Self {
        Reply {
            status: 200,
            delay: Duration::ZERO,
            body: "{}",
        }
    }
}

#[derive(Default)]
struct BackendState {
    recorded: Mutex<Vec<Recorded>>,
    arrived: Condvar,
    /// Replies used in order; the default reply once they run out.
    script: Mutex<VecDeque<Reply>>,
    default_reply: Mutex<Reply>,
    handshake_failures: Mutex<Vec<String>>,
    /// Connections served (for a TLS backend, those whose handshake completed).
    connections: std::sync::atomic::AtomicUsize,
    /// Bodies containing the text get the status, whatever else is scripted (a poisoned callback).
    refused: Mutex<Vec<(String, u16)>>,
}

/// Serves one backend connection; with `idle_timeout`, a kept-alive connection idle that long
/// is closed (a backend's keep-alive timeout).
async fn serve_backend<S>(stream: S, state: Arc<BackendState>, idle_timeout: Option<Duration>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    state
        .connections
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let service = service_fn(move |request| record(state.clone(), request));
    let mut builder = http1::Builder::new();
    if let Some(idle) = idle_timeout {
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(idle);
    }
    let _ = builder
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// A real HTTP backend that records every request it receives.
pub struct Backend {
    pub addr: SocketAddr,
    scheme: &'static str,
    state: Arc<BackendState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    pub fn start() -> Backend {
        Backend::start_on("127.0.0.1:0".parse().unwrap())
    }

    /// Starts on a given address (to bring a backend "back up" where lfguard expects it).
    pub fn start_on(addr: SocketAddr) -> Backend {
        Backend::start_serving(addr, None)
    }

    /// A backend speaking TLS (see `tls::BackendTls`); its `url` is `https://localhost:PORT`.
    pub fn start_tls(tls: tls::BackendTls) -> Backend {
        Backend::start_serving("127.0.0.1:0".parse().unwrap(), Some(tls))
    }

    fn start_serving(addr: SocketAddr, tls: Option<tls::BackendTls>) -> Backend {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let state = Arc::new(BackendState::default());
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread_state = state.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let (stream, _) = tokio::select! {
                        accepted = listener.accept() => accepted.unwrap(),
                        _ = &mut stop_rx => break,
                    };
                    let state = thread_state.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let Some(tls) = tls else {
                            serve_backend(stream, state, None).await;
                            return;
                        };
                        match tls.acceptor().accept(stream).await {
                            Ok(stream) => serve_backend(stream, state, tls.idle_timeout).await,
                            Err(err) => state
                                .handshake_failures
                                .lock()
                                .unwrap()
                                .push(err.to_string()),
                        }
                    });
                }
            });
        });
        let addr = addr_rx
            .recv_timeout(START_TIMEOUT)
            .expect("backend started");
        Backend {
            addr,
            scheme,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` for a TLS backend.
    pub fn url(&self) -> String {
        match self.scheme {
            "https" => format!("https://localhost:{}", self.addr.port()),
            _ => format!("http://{}", self.addr),
        }
    }

    /// Connections served so far.
    pub fn connections(&self) -> usize {
        self.state
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// What failed TLS handshakes said (a TLS backend's).
    pub fn handshake_failures(&self) -> Vec<String> {
        self.state.handshake_failures.lock().unwrap().clone()
    }

    pub fn set_reply(&self, reply: Reply) {
        *self.state.default_reply.lock().unwrap() = reply;
    }

    /// Answers `status` to every request whose body contains `text`.
    pub fn refuse_bodies_with(&self, text: &str, status: u16) {
        self.state
            .refused
            .lock()
            .unwrap()
            .push((text.to_string(), status));
    }

    /// Forgets every `refuse_bodies_with`.
    pub fn stop_refusing(&self) {
        self.state.refused.lock().unwrap().clear();
    }

    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.recorded.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.state.recorded.lock().unwrap().len()
    }

    /// Waits until at least `n` requests arrived (a readiness signal, not a sleep).
    pub fn wait_for(&self, n: usize) -> Vec<Recorded> {
        let guard = self.state.recorded.lock().unwrap();
        let (guard, timeout) = self
            .state
            .arrived
            .wait_timeout_while(guard, IO_TIMEOUT, |recorded| recorded.len() < n)
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "backend got {} requests, expected {n}",
            guard.len()
        );
        guard.clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn record(
    state: Arc<BackendState>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    let refused = state
        .refused
        .lock()
        .unwrap()
        .iter()
        .find(|(text, _)| contains_bytes(&body, text.as_bytes()))
        .map(|&(_, status)| Reply {
            status,
            ..Reply::default()
        });
    let reply = refused.unwrap_or_else(|| {
        let scripted = state.script.lock().unwrap().pop_front();
        scripted.unwrap_or_else(|| state.default_reply.lock().unwrap().clone())
    });
    {
        let mut recorded = state.recorded.lock().unwrap();
        recorded.push(Recorded {
            method: parts.method.to_string(),
            uri: parts.uri.to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body,
        });
        state.arrived.notify_all();
    }
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut response = hyper::Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = hyper::StatusCode::from_u16(reply.status).unwrap();
    response
        .headers_mut()
        .insert("x-backend", "recorded".parse().unwrap());
    Ok(response)
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

// ---------------------------------------------------------------- lfguard

/// A running `lfguard serve` process, its addresses and its log lines (parsed as JSON).
pub struct Lfguard {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    log_arrived: Arc<Condvar>,
}

/// The config every test starts from: loopback ephemeral ports, one partner, the given backend.
pub fn base_config(upstream: &str) -> toml::Table {
    toml::from_str(&format!(
        r#"
        [server]
        listen = "127.0.0.1:0"
        admin_listen = "127.0.0.1:0"
        [upstream]
        url = "{upstream}"
        timeout = "5s"
        [log]
        level = "info"
        [partners.{PARTNER}]
        secrets = ["{SECRET}"]
        "#
    ))
    .unwrap()
}

/// Merges `extra` (TOML text) into `base`, table by table.
pub fn merge(base: &mut toml::Table, extra: &str) {
    let extra: toml::Table = toml::from_str(extra).expect("test TOML parses");
    merge_tables(base, extra);
}

fn merge_tables(base: &mut toml::Table, extra: toml::Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(more)) => {
                merge_tables(existing, more)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_lfguard")
}

impl Lfguard {
    /// Starts lfguard in front of `backend` with `extra` TOML merged into the base config.
    pub fn start(backend: &Backend, extra: &str) -> Lfguard {
        let mut config = base_config(&backend.url());
        merge(&mut config, extra);
        Lfguard::start_with(config, &[])
    }

    pub fn start_with(config: toml::Table, env: &[(&str, &str)]) -> Lfguard {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("lfguard.toml");
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        Lfguard::spawn(dir, config_path, env)
    }

    /// Starts on an existing config file (kept in `dir`).
    pub fn spawn(dir: tempfile::TempDir, config_path: PathBuf, env: &[(&str, &str)]) -> Lfguard {
        Lfguard::spawn_with(dir, config_path, &["serve"], env)
    }

    /// `spawn` with `leading` arguments before `--config PATH` (`&[]`: no subcommand).
    pub fn spawn_with(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        leading: &[&str],
        env: &[(&str, &str)],
    ) -> Lfguard {
        let mut command = Command::new(binary());
        command
            .args(leading)
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("lfguard starts");
        let stdout = child.stdout.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let log_arrived = Arc::new(Condvar::new());
        let (addr_tx, addr_rx) = mpsc::channel::<(String, SocketAddr)>();
        {
            let logs = logs.clone();
            let log_arrived = log_arrived.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line)
                        && event["message"] == "listening"
                    {
                        let addr = event["addr"].as_str().unwrap().parse().unwrap();
                        let _ =
                            addr_tx.send((event["listener"].as_str().unwrap().to_string(), addr));
                    }
                    logs.lock().unwrap().push(line);
                    log_arrived.notify_all();
                }
            });
        }
        let mut proxy = None;
        let mut admin = None;
        while proxy.is_none() || admin.is_none() {
            match addr_rx.recv_timeout(START_TIMEOUT) {
                Ok((name, addr)) if name == "proxy" => proxy = Some(addr),
                Ok((_, addr)) => admin = Some(addr),
                Err(_) => {
                    let _ = child.kill();
                    let logs = logs.lock().unwrap().join("\n");
                    panic!("lfguard did not start listening; logs:\n{logs}");
                }
            }
        }
        let lfguard = Lfguard {
            addr: proxy.unwrap(),
            admin: admin.unwrap(),
            dir,
            config_path,
            child,
            logs,
            log_arrived,
        };
        lfguard.wait_for_log(|event| event["message"] == "ready");
        lfguard
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Log events parsed as JSON; panics on a line that is not JSON.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.logs()
            .iter()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|_| panic!("log line is not JSON: {line}"))
            })
            .collect()
    }

    /// Waits until at least `n` log events match `predicate`.
    pub fn wait_for_logs(&self, n: usize, predicate: impl Fn(&serde_json::Value) -> bool) {
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        let mut logs = self.logs.lock().unwrap();
        loop {
            let matching = logs
                .iter()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter(|event| predicate(event))
                .count();
            if matching >= n {
                return;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero(),
                "{matching} matching log events, expected {n}; logs:\n{}",
                logs.join("\n")
            );
            logs = self.log_arrived.wait_timeout(logs, left).unwrap().0;
        }
    }

    /// Waits for a log event matching `predicate` and returns it.
    pub fn wait_for_log(
        &self,
        predicate: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        let mut logs = self.logs.lock().unwrap();
        loop {
            if let Some(event) = logs
                .iter()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .find(|event| predicate(event))
            {
                return event;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero(),
                "no matching log event; logs:\n{}",
                logs.join("\n")
            );
            logs = self.log_arrived.wait_timeout(logs, left).unwrap().0;
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(std::time::Instant::now() < deadline, "lfguard did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn post(&self, request: &Callback) -> Response {
        request.send(self.addr)
    }
}

impl Drop for Lfguard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- lfguard echo

/// A running `lfguard echo` process: its address and what it printed.
pub struct Echo {
    pub addr: SocketAddr,
    child: Child,
    output: Arc<(Mutex<String>, Condvar)>,
}

impl Echo {
    /// Starts `lfguard echo --listen 127.0.0.1:0` with `extra` arguments and waits for its
    /// `listening on ADDR` line.
    pub fn start(extra: &[&str]) -> Echo {
        let mut child = Command::new(binary())
            .args(["echo", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("lfguard echo starts");
        let stdout = child.stdout.take().unwrap();
        let output = Arc::new((Mutex::new(String::new()), Condvar::new()));
        {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let (text, arrived) = &*output;
                    let mut text = text.lock().unwrap();
                    text.push_str(&line);
                    text.push('\n');
                    arrived.notify_all();
                }
            });
        }
        let mut echo = Echo {
            addr: "0.0.0.0:0".parse().unwrap(),
            child,
            output,
        };
        let printed = echo.wait_for_output(|text| text.contains('\n'));
        echo.addr = printed
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("listening on "))
            .unwrap_or_else(|| panic!("no 'listening on ADDR' line: {printed}"))
            .parse()
            .unwrap();
        echo
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.output.0.lock().unwrap().clone()
    }

    /// Waits until what was printed satisfies `done`, and returns it.
    pub fn wait_for_output(&self, done: impl Fn(&str) -> bool) -> String {
        let (text, arrived) = &*self.output;
        let guard = text.lock().unwrap();
        let (guard, timeout) = arrived
            .wait_timeout_while(guard, IO_TIMEOUT, |text| !done(text))
            .unwrap();
        assert!(!timeout.timed_out(), "lfguard echo printed only:\n{guard}");
        guard.clone()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "lfguard echo did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- redis

/// A real `redis-server` on an ephemeral port, with no persistence.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let mut redis = Redis {
            port,
            child: None,
            dir,
        };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis is already running");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                if stream.write_all(b"PING\r\n").is_ok() {
                    let mut buf = [0u8; 7];
                    if stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n" {
                        return;
                    }
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP / SIGCONT: a Redis that hangs without closing its connections, and resumes.
    pub fn pause(&self, paused: bool) {
        let pid = self.child.as_ref().expect("redis is running").id();
        let signal = if paused { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port that was free a moment ago, for servers (redis) that cannot report an ephemeral one.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------- client

/// A response read off the wire.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("body is not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The error code.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends raw bytes on a fresh connection and reads one response.
pub fn send_raw(addr: SocketAddr, request: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.write_all(request).unwrap();
    read_response(&mut BufReader::new(stream)).expect("a response")
}

/// Reads one HTTP/1.1 response (Content-Length, chunked, or until close).
pub fn read_response(reader: &mut impl BufRead) -> Option<Response> {
    let mut status_line = String::new();
    if reader.read_line(&mut status_line).ok()? == 0 {
        return None;
    }
    let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(length) = find("content-length") {
        body.resize(length.parse().ok()?, 0);
        reader.read_exact(&mut body).ok()?;
    } else if find("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if status != 204 && status != 304 {
        reader.read_to_end(&mut body).ok()?;
    }
    Some(Response {
        status,
        headers,
        body,
    })
}

/// A callback to send: body, headers and path, signed unless a test says otherwise.
#[derive(Debug, Clone)]
pub struct Callback {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A fresh, unique SMS uplink body for `PARTNER` received now.
pub fn sms_body() -> String {
    let n = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        r#"{{"partner_code":"{PARTNER}","sim_id":"89860220190123456789","imsi":"4230001234567","text_message":"发送短信内容 {n}-{}","received_at":"{}"}}"#,
        std::process::id(),
        now_millis()
    )
}

pub fn sign_body(body: &[u8], secret: &str, encoding: Encoding) -> String {
    let parsed = if body.first() == Some(&b'{') {
        Body::from_json(body)
    } else {
        Body::from_form(body)
    };
    signature::sign(
        &parsed.unwrap().canonical(NullValues::Empty),
        secret,
        encoding,
    )
}

pub fn delivery_id() -> String {
    format!(
        "{}{:06}",
        now_millis(),
        SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

impl Callback {
    /// A JSON callback signed with `SECRET` (hex encoding) and a new delivery id.
    pub fn signed(body: impl Into<String>) -> Callback {
        Callback::signed_with(body, SECRET, Encoding::Hex)
    }

    pub fn signed_with(body: impl Into<String>, secret: &str, encoding: Encoding) -> Callback {
        let body: String = body.into();
        let signature = sign_body(body.as_bytes(), secret, encoding);
        Callback {
            method: "POST".into(),
            path: "/callback/sms?source=lf".into(),
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("x-lf-md5".into(), signature),
                ("x-lf-delivery".into(), delivery_id()),
            ],
            body: body.into_bytes(),
        }
    }

    /// Same body and signature under a new delivery id: what a replaying attacker sends.
    pub fn with_new_delivery_id(&self) -> Callback {
        self.clone()
            .without("x-lf-delivery")
            .with("x-lf-delivery", &delivery_id())
    }

    pub fn with(mut self, name: &str, value: &str) -> Callback {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn without(mut self, name: &str) -> Callback {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self
    }

    pub fn replacing(self, name: &str, value: &str) -> Callback {
        self.without(name).with(name, value)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn method(mut self, method: &str) -> Callback {
        self.method = method.into();
        self
    }

    /// The request bytes, with Content-Length and `Connection: close`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: lfguard.test\r\n",
            self.method, self.path
        )
        .into_bytes();
        for (name, value) in &self.headers {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        out.extend_from_slice(
            format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n",
                self.body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(&self.body);
        out
    }

    pub fn send(&self, addr: SocketAddr) -> Response {
        send_raw(addr, &self.to_bytes())
    }
}

/// GET on the admin port.
pub fn admin_get(addr: SocketAddr, path: &str) -> Response {
    send_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// Runs a command of the binary with arguments and stdin; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(binary());
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.env_remove("LFGUARD_CONFIG");
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap();
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(bytes) = stdin {
            input.write_all(bytes).unwrap();
        }
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub fn write_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// Whether a tool an optional test needs is installed (it only has to start); prints why the test
/// is skipped when not.
pub fn have(tool: &str, test: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        println!("skipping {test}: {tool} is not installed");
    }
    found
}

/// `promtool check metrics` accepts `text` (promtool is in the Debian package prometheus, which
/// scripts/test installs).
pub fn promtool_check_metrics(text: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus; scripts/test installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
