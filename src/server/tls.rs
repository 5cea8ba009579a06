//! TLS on the proxy port (`[server.tls]`): rustls' configuration built from the certificate
//! files (TLS 1.3 and 1.2, ALPN `http/1.1`, client certificates when `client_ca_file` is set), the
//! handshake of each accepted connection, and re-reading the files when they change.
//!
//! The handshake runs in the connection's own task, on its slot of `server.max_connections`
//! (closed like an idle connection when the cap needs room) and within
//! `server.header_read_timeout`. Its decrypted stream is what `framing::Watched` and hyper read.
//! A reload builds a new rustls configuration and swaps it in whole: connections already open
//! keep the one they were accepted with, new ones get the new certificate; a pair that fails to
//! load keeps the one in use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::sign::SingleCertAndKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::server::config::ListenerTlsConfig;
use crate::state::certs::{self, Contents, FileWatch, Leaf, PairFile, Reloaded};
use crate::telemetry::metrics::Metrics;

/// The metrics' label for the proxy port's TLS.
pub const ROLE: &str = "listener";

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// TLS sessions remembered for resumption.
const SESSION_CACHE_SIZE: usize = 1024;

/// What a client speaking plain HTTP to the TLS port gets before the connection closes.
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n\
Content-Length: 43\r\nConnection: close\r\n\r\nthis port speaks TLS: use https:// instead\n";

/// What is read and discarded of a plain HTTP request before closing, so that the client reads
/// the answer rather than a reset.
const PLAIN_HTTP_DRAIN_BYTES: usize = 64 * 1024;

/// The proxy port's TLS: the configuration new connections get, and the files it came from.
pub struct ListenerTls {
    current: ArcSwap<ServerConfig>,
    /// `notAfter` of the certificate in use.
    not_after: AtomicI64,
    watch: FileWatch,
    handshake_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// The files of `[server.tls]`, named by their keys: the certificate, its key, and the client
/// CAs when set.
fn files_of(config: &ListenerTlsConfig) -> Vec<(&'static str, PathBuf)> {
    let mut files = vec![
        ("server.tls.cert_file", config.cert_file.clone()),
        ("server.tls.key_file", config.key_file.clone()),
    ];
    if let Some(client_ca) = &config.client_ca_file {
        files.push(("server.tls.client_ca_file", client_ca.clone()));
    }
    files
}

/// What `build` makes of the files: the configuration, the certificate it presents and the
/// earliest expiry among the client CAs.
struct Built {
    config: ServerConfig,
    leaf: Leaf,
    client_ca: Option<(usize, Leaf)>,
}

/// rustls' configuration of the files' `contents` (in the order of `files_of`); every problem,
/// each naming its key. Each has a session cache of its own: after a rotation no client resumes
/// a session of the old certificate, every new connection is shown the new one.
fn build(contents: &Contents, now: i64) -> Result<Built, Vec<String>> {
    let mut problems = Vec::new();
    let pair = certs::certified_key(&contents[0], &contents[1], now).map_err(|(file, err)| {
        let key = match file {
            PairFile::Cert => "server.tls.cert_file",
            PairFile::Key => "server.tls.key_file",
        };
        problems.push(format!("{key}: {err}"));
    });
    let client_ca = contents
        .get(2)
        .map(|pem| certs::parse_roots(pem))
        .transpose()
        .map_err(|err| problems.push(format!("server.tls.client_ca_file: {err}")));
    let (Ok((certified, leaf)), Ok(client_ca)) = (pair, client_ca) else {
        return Err(problems);
    };
    let provider = certs::provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(certs::PROTOCOL_VERSIONS)
        .map_err(|err| vec![format!("server.tls: {err}")])?;
    let (builder, client_ca) = match client_ca {
        None => (builder.with_no_client_auth(), None),
        Some((roots, earliest)) => {
            let count = roots.len();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|err| vec![format!("server.tls.client_ca_file: {err}")])?;
            (
                builder.with_client_cert_verifier(verifier),
                Some((count, earliest)),
            )
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![certs::ALPN_HTTP11.to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    Ok(Built {
        config,
        leaf,
        client_ca,
    })
}

/// For `check-config`: the problems of `[server.tls]`'s files, or a line on each saying when it
/// expires.
pub fn check(files: &ListenerTlsConfig) -> Result<Vec<String>, Vec<String>> {
    let now = certs::unix_now();
    let built = certs::check_all(&files_of(files), |contents| build(contents, now))?;
    let mut notes = vec![format!(
        "server.tls.cert_file: {}: serial {}, {}",
        files.cert_file.display(),
        built.leaf.serial,
        built.leaf.expiry(now)
    )];
    if let (Some(path), Some((count, earliest))) = (&files.client_ca_file, built.client_ca) {
        notes.push(format!(
            "server.tls.client_ca_file: {}: {count} CA certificate(s), the first to expire {}",
            path.display(),
            earliest.expiry(now)
        ));
    }
    Ok(notes)
}

impl ListenerTls {
    /// Reads the files; every problem, each naming its key.
    pub fn load(
        files: &ListenerTlsConfig,
        handshake_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Vec<String>> {
        let (watch, built) = FileWatch::start(files_of(files), |contents| {
            build(contents, certs::unix_now())
        })?;
        metrics.tls_certificate_expiry(ROLE, built.leaf.not_after);
        metrics.tls_reloads_start(ROLE);
        tracing::info!(
            serial = %built.leaf.serial,
            not_after = %certs::date(built.leaf.not_after),
            client_certificates = files.client_ca_file.is_some(),
            "listener certificate loaded"
        );
        Ok(ListenerTls {
            current: ArcSwap::from_pointee(built.config),
            not_after: AtomicI64::new(built.leaf.not_after),
            watch,
            handshake_timeout,
            metrics,
        })
    }

    /// `Err` with the reason while the certificate in use is not valid (it expired and no valid
    /// one replaced it): readiness fails then.
    pub fn valid_now(&self) -> Result<(), String> {
        let not_after = self.not_after.load(Ordering::Relaxed);
        if certs::unix_now() > not_after {
            return Err(format!(
                "the listener certificate expired {}",
                certs::date(not_after)
            ));
        }
        Ok(())
    }

    /// Re-reads the files and swaps in a new configuration when they changed and load. A pair
    /// that does not load keeps the one in use; it is logged and counted once (see
    /// `FileWatch::reload`; SIGHUP is `explicit`).
    pub fn reload(&self, trigger: &'static str, explicit: bool) {
        match self
            .watch
            .reload(explicit, |contents| build(contents, certs::unix_now()))
        {
            Reloaded::Unchanged | Reloaded::Pending => {}
            Reloaded::Applied(built) => {
                self.current.store(Arc::new(built.config));
                self.not_after
                    .store(built.leaf.not_after, Ordering::Relaxed);
                self.metrics
                    .tls_certificate_expiry(ROLE, built.leaf.not_after);
                self.metrics.tls_certificate_reload(ROLE, true);
                tracing::info!(
                    trigger,
                    serial = %built.leaf.serial,
                    not_after = %certs::date(built.leaf.not_after),
                    "listener certificate reloaded"
                );
            }
            Reloaded::Failed(problems) => {
                tracing::error!(
                    trigger,
                    problems = %problems.join("; "),
                    "listener certificate reload failed; keeping the certificate in use"
                );
                self.metrics.tls_certificate_reload(ROLE, false);
            }
        }
    }

    /// The handshake of an accepted connection within `server.header_read_timeout`: the
    /// decrypted stream, or `None` when it failed (counted by reason).
    pub async fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<TlsStream<TcpStream>> {
        let config = self.current.load_full();
        let handshake = async {
            let mut first = [0u8; 1];
            match stream.peek(&mut first).await {
                // Closed before sending anything (a TCP health check): no handshake to count.
                Ok(0) => return Ok(Err(None)),
                Err(_) => return Err("closed"),
                Ok(_) => {}
            }
            if first[0] != TLS_HANDSHAKE_RECORD {
                return Ok(Err(Some((stream, first[0]))));
            }
            TlsAcceptor::from(config)
                .accept(stream)
                .await
                .map(Ok)
                .map_err(|err| certs::failure_reason(&err))
        };
        let (mut stream, first) =
            match tokio::time::timeout(self.handshake_timeout, handshake).await {
                Ok(Ok(Ok(stream))) => return Some(stream),
                Ok(Ok(Err(Some(not_tls)))) => not_tls,
                Ok(Ok(Err(None))) => return None,
                Ok(Err(reason)) => {
                    self.failed(peer, reason);
                    return None;
                }
                Err(_elapsed) => {
                    self.failed(peer, "timeout");
                    return None;
                }
            };
        // Counted before a client speaking plain HTTP reads that this port speaks TLS.
        self.failed(peer, "not_tls");
        if first.is_ascii_uppercase() {
            let _ =
                tokio::time::timeout(self.handshake_timeout, refuse_plain_http(&mut stream)).await;
        }
        None
    }

    fn failed(&self, peer: SocketAddr, reason: &'static str) {
        self.metrics.tls_handshake_failure(ROLE, reason);
        tracing::debug!(peer = %peer, reason, "TLS handshake failed");
    }
}

/// Answers 400 and closes: the write side first, then what the client sent is read and
/// discarded until it closes too, so that its request still unread does not turn the close into
/// a reset that would lose the answer.
async fn refuse_plain_http(stream: &mut TcpStream) {
    if stream.write_all(PLAIN_HTTP_ANSWER).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut discarded = 0;
    let mut buf = [0u8; 4096];
    while discarded < PLAIN_HTTP_DRAIN_BYTES {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => discarded += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_to_plain_http_is_one_whole_response() {
        let text = std::str::from_utf8(PLAIN_HTTP_ANSWER).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("Content-Length: "))
            .unwrap();
        assert_eq!(length.parse::<usize>().unwrap(), body.len());
        assert!(head.starts_with("HTTP/1.1 400 "));
    }
}
