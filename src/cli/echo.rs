//! `echo`: a small HTTP/1.1 backend that prints each request it receives (method, path and query,
//! headers, body) and answers with one status and a small JSON body, so that `serve` and `send`
//! can be tried by hand and a pipeline's failure handling tested. `demo` runs the same server as
//! its recording backend.

use std::convert::Infallible;
use std::fmt;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http::{HeaderValue, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

#[derive(Debug, Args)]
pub struct EchoArgs {
    /// Address to listen on; the default is the shipped config's upstream.url. Port 0 picks a
    /// free port (printed as "listening on ADDR").
    #[arg(long, default_value = "127.0.0.1:8081", value_name = "ADDR")]
    listen: SocketAddr,
    /// The status of every answer, e.g. 503 to see how a pipeline handles a failing backend.
    #[arg(
        long,
        default_value_t = 200,
        value_name = "CODE",
        value_parser = clap::value_parser!(u16).range(200..=599)
    )]
    status: u16,
}

/// A larger body is answered 413: echo is for trying things by hand.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Time to send the request headers; also how long an idle connection is kept.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// After a shutdown signal, connections get this long to finish their request.
const DRAIN: Duration = Duration::from_secs(2);

/// A pause after a failed accept (usually out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// One request as the backend received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// 1 for the first request the server received.
    pub number: u64,
    pub peer: SocketAddr,
    pub method: String,
    /// Path and query.
    pub target: String,
    pub version: Version,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Received {
    /// The first value of a header (names compared ignoring case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The request as text: request line, headers, a blank line and the body (lossy UTF-8).
impl fmt::Display for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} {} {:?}", self.method, self.target, self.version)?;
        for (name, value) in &self.headers {
            writeln!(f, "{name}: {value}")?;
        }
        writeln!(f)?;
        if self.body.is_empty() {
            writeln!(f, "(no body)")
        } else {
            let text = String::from_utf8_lossy(&self.body);
            write!(f, "{text}")?;
            if text.ends_with('\n') {
                Ok(())
            } else {
                writeln!(f)
            }
        }
    }
}

/// `echo`: prints `listening on ADDR`, then each request, until SIGINT or SIGTERM.
pub async fn echo(args: &EchoArgs) -> Result<(), String> {
    let status = StatusCode::from_u16(args.status).map_err(|err| err.to_string())?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", args.listen))?;
    let local = listener.local_addr().map_err(|err| err.to_string())?;
    print_flushed(&format!("listening on {local}\n"));
    let print = move |received: &Received| {
        print_flushed(&format!(
            "--- request {} from {}, answered {}\n{received}\n",
            received.number,
            received.peer,
            status.as_u16()
        ));
    };
    serve(listener, status, print, shutdown_signal()).await;
    Ok(())
}

/// Writes to stdout at once, so that a reader (a terminal, a test, `tee`) sees each request as
/// it arrives. A closed stdout is ignored: the server keeps answering.
fn print_flushed(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Serves HTTP/1.1 on `listener` until `shutdown` completes, calling `on_request` with each
/// request read whole and answering it `status`; then lets open connections finish for a moment.
pub async fn serve(
    listener: TcpListener,
    status: StatusCode,
    on_request: impl Fn(&Received) + Send + Sync + 'static,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let on_request = Arc::new(on_request);
    let numbers = Arc::new(AtomicU64::new(1));
    let mut shutdown = pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    eprintln!("lfguard echo: accept failed: {err}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let on_request = on_request.clone();
        let numbers = numbers.clone();
        let service = service_fn(move |request| {
            let number = numbers.fetch_add(1, Ordering::Relaxed);
            respond(request, number, peer, status, on_request.clone())
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A client that goes away mid-request is its own business.
            let _ = connection.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
}

async fn respond<F: Fn(&Received)>(
    request: http::Request<Incoming>,
    number: u64,
    peer: SocketAddr,
    status: StatusCode,
    on_request: Arc<F>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) => {
            eprintln!("lfguard echo: request {number} from {peer}: body not read: {err}");
            return Ok(json(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(r#"{{"request":{number},"error":"body not read"}}"#),
            ));
        }
    };
    let received = Received {
        number,
        peer,
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.to_string(), ToString::to_string),
        version: parts.version,
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.to_string(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    };
    on_request(&received);
    Ok(json(
        status,
        format!(r#"{{"request":{number},"status":{}}}"#, status.as_u16()),
    ))
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_prints_as_a_readable_block() {
        let received = Received {
            number: 1,
            peer: "127.0.0.1:4000".parse().unwrap(),
            method: "POST".into(),
            target: "/callback?a=1".into(),
            version: Version::HTTP_11,
            headers: vec![("x-lfguard-verified".into(), "true".into())],
            body: Bytes::from_static(b"{\"text\":\"\xe5\x8f\x91\xff\"}"),
        };
        assert_eq!(
            received.to_string(),
            "POST /callback?a=1 HTTP/1.1\nx-lfguard-verified: true\n\n{\"text\":\"发\u{fffd}\"}\n"
        );
        assert_eq!(received.header("X-LFGUARD-VERIFIED"), Some("true"));
        let empty = Received {
            body: Bytes::new(),
            ..received
        };
        assert!(empty.to_string().ends_with("\n\n(no body)\n"));
    }
}
