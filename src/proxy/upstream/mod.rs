//! The backend: where requests go (`UpstreamTarget`) and a pool of kept-alive HTTP/1.1
//! connections to it (`Upstream`), over TLS for an `https://` URL (`tls`).
//!
//! lfguard talks to exactly one backend, so the pool is a stack of idle connections rather than
//! hyper-util's general client, which per request hashes a pool key, boxes the request future and
//! spawns a task that waits for the connection to become reusable (together a tenth of lfguard's
//! CPU under load). Here a connection goes back on the stack when its response body has been read
//! to the end, and the most recently used one is taken first, so few connections stay warm.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use serde::{Deserialize, Serialize};

use crate::telemetry::metrics::Metrics;
use crate::verify::duration::Short;

mod body;
pub mod tls;

pub use self::body::{Deadline, ResponseDeadline, UpstreamBody};
use self::tls::{TlsFiles, UpstreamTls};

/// Where requests are forwarded: `http://authority` or `https://authority`, plus an optional path
/// prefix.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    authority: Authority,
    base_path: String,
    /// `https://`: the connection speaks TLS.
    tls: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://host:port` or `https://host:port`, with an optional path prefix; the request path
    /// is appended to it.
    pub url: String,
    #[serde(with = "crate::verify::duration")]
    pub timeout: Duration,
    #[serde(with = "crate::verify::duration")]
    pub connect_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    #[serde(with = "crate::verify::duration")]
    pub pool_idle_timeout: Duration,
    /// https: PEM CAs the backend's certificate is verified against, instead of the platform's.
    pub ca_file: Option<PathBuf>,
    /// https: the name the backend's certificate must carry, sent as SNI; the URL's host when
    /// unset. `Host` is not changed by it.
    pub server_name: Option<String>,
    /// https: a PEM certificate (full chain) lfguard presents when the backend asks for one.
    pub client_cert_file: Option<PathBuf>,
    /// https: its private key.
    pub client_key_file: Option<PathBuf>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: "http://127.0.0.1:8081".into(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            pool_max_idle_per_host: 256,
            pool_idle_timeout: Duration::from_secs(90),
            ca_file: None,
            server_name: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

impl UpstreamConfig {
    /// What serde cannot check, each problem naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (key, value) in [
            ("upstream.timeout", self.timeout),
            ("upstream.connect_timeout", self.connect_timeout),
        ] {
            if value.is_zero() {
                problems.push(format!("{key}: must be greater than 0"));
            }
        }
        let target = UpstreamTarget::parse(&self.url);
        if let Err(problem) = &target {
            problems.push(format!("upstream.url: {problem}"));
        }
        if let Ok(target) = &target
            && !target.tls
        {
            for (key, set) in [
                ("upstream.ca_file", self.ca_file.is_some()),
                ("upstream.server_name", self.server_name.is_some()),
                ("upstream.client_cert_file", self.client_cert_file.is_some()),
                ("upstream.client_key_file", self.client_key_file.is_some()),
            ] {
                if set {
                    problems.push(format!("{key}: only for an https:// upstream.url"));
                }
            }
        }
        if let Some(problem) = self
            .server_name
            .as_deref()
            .and_then(tls::server_name_problem)
        {
            problems.push(problem);
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(_), None) => problems
                .push("upstream.client_key_file: required with upstream.client_cert_file".into()),
            (None, Some(_)) => problems
                .push("upstream.client_cert_file: required with upstream.client_key_file".into()),
            (Some(_), Some(_)) | (None, None) => {}
        }
        problems
    }

    /// For an https upstream, its certificate files: `Ok` with a line on each saying when it
    /// expires, or every problem (see `Config::certificates`).
    pub fn certificates(&self) -> Result<Vec<String>, Vec<String>> {
        match UpstreamTarget::parse(&self.url) {
            Ok(target) if target.tls => tls::check(&self.tls_files()),
            Ok(_) | Err(_) => Ok(Vec::new()),
        }
    }

    fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca_file: self.ca_file.clone(),
            client_cert_file: self.client_cert_file.clone(),
            client_key_file: self.client_key_file.clone(),
        }
    }
}

impl UpstreamTarget {
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|err| format!("{err}"))?;
        let tls = match uri.scheme() {
            Some(scheme) if *scheme == Scheme::HTTP => false,
            Some(scheme) if *scheme == Scheme::HTTPS => true,
            _ => return Err("must be an http:// or https:// URL".into()),
        };
        let authority = uri.authority().cloned().ok_or("has no host")?;
        if uri.query().is_some() {
            return Err("must not have a query".into());
        }
        let base_path = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamTarget {
            authority,
            base_path,
            tls,
        })
    }

    /// The host without the brackets of an IPv6 literal: what to connect to, and the name an
    /// https backend's certificate must carry unless `upstream.server_name` says otherwise.
    fn host(&self) -> &str {
        let host = self.authority.host();
        host.strip_prefix('[')
            .and_then(|inner| inner.strip_suffix(']'))
            .unwrap_or(host)
    }

    /// Host and port to connect to.
    fn socket_host(&self) -> (&str, u16) {
        let default_port = if self.tls { 443 } else { 80 };
        (
            self.host(),
            self.authority.port_u16().unwrap_or(default_port),
        )
    }

    /// The origin-form request target on the backend: the base path, then the request's own
    /// path and query.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        let tail = path_and_query.map_or("/", PathAndQuery::as_str);
        if self.base_path.is_empty()
            && let Some(path_and_query) = path_and_query
        {
            return Uri::from(path_and_query.clone());
        }
        Uri::builder()
            .path_and_query(format!("{}{tail}", self.base_path))
            .build()
            .expect("the base path and the request path were valid separately")
    }
}

/// Idle time after which a kept-alive connection may have been closed by the backend's own
/// keep-alive timeout (commonly 2 to 75 seconds); see `Upstream::send`.
const LONG_IDLE: Duration = Duration::from_secs(1);

/// What became of the request being written on one backend connection, shared between the
/// connection's socket and the pool.
#[derive(Debug, Default)]
struct Written {
    /// Some byte of the current request reached the socket: the backend may have read it.
    any: AtomicBool,
    /// Before the first write, check that the backend has not closed the connection.
    check_open: AtomicBool,
}

impl Written {
    fn start_request(&self, check_open: bool) {
        self.any.store(false, Ordering::Relaxed);
        self.check_open.store(check_open, Ordering::Relaxed);
    }
}

/// A backend connection's socket that records whether a request was written at all, and on a
/// long-idle connection refuses to write into one the backend has already closed: a request that
/// fails with nothing written cannot have been read, so it is safe to send on a new connection.
struct WatchedStream {
    stream: TcpStream,
    written: Arc<Written>,
}

impl WatchedStream {
    /// `Err` when the backend closed (or reset) the connection: a pending end of stream seen by
    /// peeking at one byte. Only before a request's first byte, and only where asked.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.written.check_open.swap(false, Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        let mut probe = [0u8; 1];
        let mut probe = tokio::io::ReadBuf::new(&mut probe);
        match self.stream.poll_peek(cx, &mut probe) {
            Poll::Ready(Ok(0)) => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            // Nothing to read (open and quiet), or bytes hyper will deal with.
            Poll::Ready(Ok(_)) | Poll::Pending => Poll::Ready(Ok(())),
        }
    }

    fn record(&self, written: &Poll<std::io::Result<usize>>) {
        if matches!(written, Poll::Ready(Ok(n)) if *n > 0) {
            self.written.any.store(true, Ordering::Relaxed);
        }
    }
}

impl tokio::io::AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Err(err)) = self.poll_closed(cx) {
            return Poll::Ready(Err(err));
        }
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.record(&written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Err(err)) = self.poll_closed(cx) {
            return Poll::Ready(Err(err));
        }
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.record(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A pooled connection's sender and what its socket recorded.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    written: Arc<Written>,
}

/// Why the backend did not answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {authority}: {reason}")]
    Connect { authority: String, reason: String },
    #[error("connection to {authority} timed out after {}", Short(*after))]
    ConnectTimeout { authority: String, after: Duration },
    #[error("TLS handshake with {authority} failed: {reason}")]
    Handshake { authority: String, reason: String },
    #[error("{0}")]
    Exchange(String),
}

struct IdleConnection {
    connection: Connection,
    since: Instant,
}

pub struct Upstream {
    target: UpstreamTarget,
    /// For an https target.
    tls: Option<UpstreamTls>,
    /// Where handshake failures and certificate expiries are counted (`with_metrics`).
    metrics: Option<Arc<Metrics>>,
    connect_timeout: Duration,
    max_idle: usize,
    idle_timeout: Duration,
    /// Most recently used last.
    idle: Mutex<Vec<IdleConnection>>,
}

impl Upstream {
    /// The pool for `[upstream]`; for an https URL its certificate files are read here.
    pub fn new(config: &UpstreamConfig) -> Result<Self, String> {
        let target = UpstreamTarget::parse(&config.url)?;
        let tls = match target.tls {
            true => {
                let name = config.server_name.as_deref().unwrap_or(target.host());
                Some(UpstreamTls::load(name, config.tls_files()).map_err(|p| p.join("; "))?)
            }
            false => None,
        };
        Ok(Upstream {
            target,
            tls,
            metrics: None,
            connect_timeout: config.connect_timeout,
            max_idle: config.pool_max_idle_per_host,
            idle_timeout: config.pool_idle_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Counts TLS handshake failures and shows certificate expiries in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        if let Some(tls) = &self.tls {
            metrics.tls_reloads_start(tls::ROLE);
            if let Some(not_after) = tls.client_not_after() {
                metrics.tls_certificate_expiry(tls::CLIENT_ROLE, not_after);
            }
        }
        self.metrics = Some(metrics);
        self
    }

    pub fn target(&self) -> &UpstreamTarget {
        &self.target
    }

    /// Re-reads the certificate files of an https upstream (a reload): new connections use the
    /// new ones; ones that do not load keep those in use, logged and counted once.
    pub fn reload_tls(&self, trigger: &'static str, explicit: bool) {
        let Some(tls) = &self.tls else { return };
        let reloaded = tls.reload(explicit);
        if let Some(metrics) = &self.metrics
            && let Ok(Some(_)) | Err(_) = &reloaded
        {
            metrics.tls_certificate_reload(tls::ROLE, reloaded.is_ok());
        }
        match reloaded {
            Ok(None) => {}
            Ok(Some(client_not_after)) => {
                if let (Some(metrics), Some(not_after)) = (&self.metrics, client_not_after) {
                    metrics.tls_certificate_expiry(tls::CLIENT_ROLE, not_after);
                }
                tracing::info!(trigger, "upstream certificate files reloaded");
            }
            Err(problems) => tracing::error!(
                trigger,
                problems = %problems.join("; "),
                "upstream certificate reload failed; keeping the files in use"
            ),
        }
    }

    /// Sends a request whose URI is already in origin form.
    ///
    /// A kept-alive connection can be closed by the backend (its keep-alive timeout, a restart)
    /// just as lfguard picks it. On a connection idle for `LONG_IDLE` or more (where backends'
    /// idle timeouts fall), lfguard checks before writing that the backend has not closed it; a
    /// request that then fails with not one byte written cannot have been read by the backend,
    /// and is sent once more on a new connection rather than answered 502, which would delay the
    /// callback until Linksfield's retry hours later. A request that went out is never sent
    /// again, however it failed: the backend may have acted on it. Busy connections, reused
    /// within moments, skip the check and the copy it needs.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        if !request.headers().contains_key(header::HOST) {
            let host = HeaderValue::from_str(self.target.authority.as_str())
                .expect("an authority is a valid header value");
            request.headers_mut().insert(header::HOST, host);
        }
        while let Some((mut connection, idle_for)) = self.checkout() {
            if connection.sender.ready().await.is_err() {
                continue;
            }
            let long_idle = idle_for >= LONG_IDLE;
            connection.written.start_request(long_idle);
            let copy = long_idle.then(|| copy_of(&request));
            match connection.sender.try_send_request(request).await {
                Ok(response) => return Ok(self.response(response, connection)),
                Err(mut err) => match (err.take_message(), copy) {
                    (Some(unsent), _) => request = unsent,
                    (None, Some(copy)) if !connection.written.any.load(Ordering::Relaxed) => {
                        tracing::info!(error = %err.error(), "a kept-alive backend connection was closed before the request was written; sending it on a new one");
                        request = copy;
                        break;
                    }
                    (None, _) => return Err(exchange_error(err.error())),
                },
            }
        }
        let mut connection = self.connect().await?;
        match connection.sender.try_send_request(request).await {
            Ok(response) => Ok(self.response(response, connection)),
            Err(err) => Err(exchange_error(err.error())),
        }
    }

    /// Closes connections idle for longer than `upstream.pool_idle_timeout`, checking every
    /// second; runs until the process ends.
    pub async fn close_idle_connections(self: Arc<Self>) {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let timeout = self.idle_timeout;
            self.idle_connections().retain(|idle| {
                idle.since.elapsed() < timeout && !idle.connection.sender.is_closed()
            });
        }
    }

    fn idle_connections(&self) -> std::sync::MutexGuard<'_, Vec<IdleConnection>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently used open connection and how long it has been idle.
    fn checkout(&self) -> Option<(Connection, Duration)> {
        let mut idle = self.idle_connections();
        while let Some(pooled) = idle.pop() {
            let idle_for = pooled.since.elapsed();
            if !pooled.connection.sender.is_closed() && idle_for < self.idle_timeout {
                return Some((pooled.connection, idle_for));
            }
        }
        None
    }

    fn checkin(&self, connection: Connection) {
        if connection.sender.is_closed() {
            return;
        }
        let mut idle = self.idle_connections();
        if idle.len() < self.max_idle {
            idle.push(IdleConnection {
                connection,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Connection, UpstreamError> {
        let authority = &self.target.authority;
        let connecting = TcpStream::connect(self.target.socket_host());
        let stream = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_elapsed) => {
                return Err(UpstreamError::ConnectTimeout {
                    authority: authority.to_string(),
                    after: self.connect_timeout,
                });
            }
            Ok(Err(err)) => {
                return Err(UpstreamError::Connect {
                    authority: authority.to_string(),
                    reason: err.to_string(),
                });
            }
            Ok(Ok(stream)) => stream,
        };
        // Requests and answers are small and written whole; do not wait to coalesce them.
        let _ = stream.set_nodelay(true);
        let written = Arc::new(Written::default());
        let stream = WatchedStream {
            stream,
            written: written.clone(),
        };
        let sender = match &self.tls {
            None => handshake(stream).await?,
            // TLS runs over the watched socket, so that "not one byte written" and the check
            // for a closed connection still see the bytes on the wire. Boxed: inline, the TLS
            // handshake's state would enlarge every request's future, which is moved as a whole.
            Some(tls) => Box::pin(self.connect_tls(tls, stream, authority)).await?,
        };
        Ok(Connection { sender, written })
    }

    async fn connect_tls(
        &self,
        tls: &UpstreamTls,
        stream: WatchedStream,
        authority: &Authority,
    ) -> Result<SendRequest<Full<Bytes>>, UpstreamError> {
        let connecting = tokio::time::timeout(self.connect_timeout, tls.connect(stream));
        let (stream, not_after) = match connecting.await {
            Err(_elapsed) => {
                self.count_failure("timeout");
                return Err(UpstreamError::ConnectTimeout {
                    authority: authority.to_string(),
                    after: self.connect_timeout,
                });
            }
            Ok(Err(failure)) => {
                self.count_failure(failure.reason);
                return Err(UpstreamError::Handshake {
                    authority: authority.to_string(),
                    reason: failure.message,
                });
            }
            Ok(Ok(connected)) => connected,
        };
        if let (Some(metrics), Some(not_after)) = (&self.metrics, not_after) {
            metrics.tls_certificate_expiry(tls::ROLE, not_after);
        }
        handshake(stream).await
    }

    fn count_failure(&self, reason: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics.tls_handshake_failure(tls::ROLE, reason);
        }
    }

    fn response(
        self: &Arc<Self>,
        response: Response<Incoming>,
        connection: Connection,
    ) -> Response<UpstreamBody> {
        response.map(|body| UpstreamBody {
            body,
            reuse: Some((self.clone(), connection)),
        })
    }
}

/// HTTP/1.1 on a connected backend socket; its connection task runs until it closes.
async fn handshake<S>(stream: S) -> Result<SendRequest<Full<Bytes>>, UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|err| exchange_error(&err))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "upstream connection ended");
        }
    });
    Ok(sender)
}

fn copy_of(request: &Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// hyper's errors say "client error (Connect)" first; the causes say what happened.
fn exchange_error(err: &hyper::Error) -> UpstreamError {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    UpstreamError::Exchange(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        let target = UpstreamTarget::parse("http://127.0.0.1:8081/base/").unwrap();
        let pq = PathAndQuery::from_static("/cb?x=1");
        assert_eq!(target.uri_for(Some(&pq)).to_string(), "/base/cb?x=1");
        assert_eq!(target.uri_for(None).to_string(), "/base/");
        let root = UpstreamTarget::parse("http://127.0.0.1:8081").unwrap();
        assert_eq!(root.uri_for(Some(&pq)).to_string(), "/cb?x=1");
        assert_eq!(root.uri_for(None).to_string(), "/");
        assert!(UpstreamTarget::parse("https://example.com").unwrap().tls);
        assert!(UpstreamTarget::parse("ftp://example.com").is_err());
        assert!(UpstreamTarget::parse("127.0.0.1:80").is_err());
        assert!(UpstreamTarget::parse("http://127.0.0.1:80/?q=1").is_err());
        let socket = |url: &str| {
            let target = UpstreamTarget::parse(url).unwrap();
            let (host, port) = target.socket_host();
            (host.to_string(), port)
        };
        assert_eq!(socket("http://[::1]:8081"), ("::1".to_string(), 8081));
        assert_eq!(socket("http://backend"), ("backend".to_string(), 80));
        assert_eq!(socket("http://127.0.0.1:9"), ("127.0.0.1".to_string(), 9));
        assert_eq!(socket("https://backend"), ("backend".to_string(), 443));
    }

    #[tokio::test]
    async fn a_write_into_a_connection_the_backend_closed_is_refused_unwritten() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (mut backend, _) = accepted.unwrap();
        let written = Arc::new(Written::default());
        let mut stream = WatchedStream {
            stream: client.unwrap(),
            written: written.clone(),
        };
        // Open: the check passes and the write is recorded.
        written.start_request(true);
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(written.any.load(Ordering::Relaxed));
        // The backend closes (its keep-alive timeout) before the next request.
        backend.shutdown().await.unwrap();
        drop(backend);
        stream.stream.readable().await.unwrap();
        written.start_request(true);
        let err = stream
            .write_all(b"POST / HTTP/1.1\r\n\r\n")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
        assert!(!written.any.load(Ordering::Relaxed), "nothing was written");
    }
}
