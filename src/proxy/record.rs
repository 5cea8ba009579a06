//! The request log: what the pipeline learned about a request, emitted once as the request
//! line and the request metrics.

use std::time::Instant;

use http::{Method, Request, Uri};
use hyper::body::Incoming;

use super::Proxy;
use crate::proxy::error::Rejection;
use crate::proxy::peer::Peer;
use crate::telemetry::logging::RequestLine;
use crate::verify::config::VerifyMode;

/// What lfguard learned about a request as the pipeline ran: logged, counted, and forwarded as
/// the `x-lfguard-*` headers.
#[derive(Debug, Default)]
pub struct RequestLog {
    pub partner: Option<String>,
    /// Whether `partner` is configured, i.e. may be a metrics label.
    pub partner_known: bool,
    pub delivery_id: Option<String>,
    /// The id of the secret that verified the body, as the header forwarded with it.
    pub key_id: Option<http::HeaderValue>,
    pub mode: Option<VerifyMode>,
    /// The check a report-mode request failed (it was forwarded anyway).
    pub failure: Option<&'static str>,
    pub upstream_seconds: Option<f64>,
    /// The request was handed to a delivery that runs to the end whatever the client does.
    pub delivering: bool,
}

/// Emits a request's log event and metrics exactly once: when the pipeline finishes, or when
/// hyper drops the request because the client went away before the answer (code
/// `client_closed`, status 499), which can happen after the backend already received it (a
/// verified callback's delivery then carries on without the client; see `Proxy::deliver`).
pub(super) struct Record<'p> {
    pub(super) proxy: &'p Proxy,
    started: Instant,
    method: Method,
    uri: Uri,
    peer: &'p Peer,
    pub(super) log: RequestLog,
    emitted: bool,
}

impl<'p> Record<'p> {
    pub(super) fn new(proxy: &'p Proxy, request: &Request<Incoming>, peer: &'p Peer) -> Self {
        Record {
            proxy,
            started: Instant::now(),
            method: request.method().clone(),
            uri: request.uri().clone(),
            peer,
            log: RequestLog::default(),
            emitted: false,
        }
    }

    pub(super) fn emit(&mut self, code: &'static str, status: u16, reason: Option<&str>) {
        self.emitted = true;
        let elapsed = self.started.elapsed();
        let log = &self.log;
        self.proxy.metrics.observe_request(
            code,
            log.metrics_partner(),
            elapsed,
            log.upstream_seconds,
        );
        RequestLine {
            code,
            status,
            method: self.method.as_str(),
            path: self.uri.path(),
            partner: log.partner.as_deref().unwrap_or(""),
            delivery_id: log.delivery_id.as_deref().unwrap_or(""),
            key_id: log
                .key_id
                .as_ref()
                .and_then(|id| id.to_str().ok())
                .unwrap_or(""),
            failure: log.failure.unwrap_or(""),
            reason: reason.unwrap_or(""),
            peer: self.peer.address.as_str(),
            latency_ms: elapsed.as_secs_f64() * 1000.0,
        }
        .emit();
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if !self.emitted && self.proxy.cut.load(std::sync::atomic::Ordering::SeqCst) {
            // lfguard itself dropped the request: `server.shutdown_grace` ran out.
            self.emit(
                Rejection::ShuttingDown.code(),
                503,
                Some("lfguard shut down (server.shutdown_grace ran out) before the answer"),
            );
        } else if !self.emitted {
            let reason = if self.log.delivering {
                "the client closed the connection before the answer; the delivery to the backend \
                 goes on and its answer settles the replay claim"
            } else {
                "the client closed the connection before the answer"
            };
            self.emit("client_closed", 499, Some(reason));
        }
    }
}

impl RequestLog {
    /// The partner as a metrics label: only configured codes, so labels stay bounded.
    pub(super) fn metrics_partner(&self) -> Option<&str> {
        self.partner.as_deref().filter(|_| self.partner_known)
    }
}

/// The outcome code for a request lfguard did not refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    Forwarded,
    Duplicate,
    PassedThrough,
    /// Failed a check but forwarded, marked, because its partner is in report mode.
    Reported,
    /// Verified and kept in the spool for the delivery worker.
    Spooled,
}

impl Accepted {
    pub fn code(self) -> &'static str {
        match self {
            Accepted::Forwarded => "forwarded",
            Accepted::Duplicate => "duplicate",
            Accepted::PassedThrough => "passed_through",
            Accepted::Reported => "reported",
            Accepted::Spooled => "spooled",
        }
    }
}
