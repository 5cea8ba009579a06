//! The admin listener (`server.admin_listen`):
//! - `GET /healthz` — 200 while the process runs;
//! - `GET /readyz` — 200 when secrets are loaded, the replay store answers, the spool (if
//!   configured) is open and the listener's certificate (with `[server.tls]`) has not expired,
//!   503 otherwise and from the moment shutdown begins. A backend that is down does not make
//!   lfguard unready in spool mode: taking callbacks then is the point;
//! - `GET /metrics` — Prometheus text format;
//! - `GET /spool` — what the spool holds, as JSON (read-only; `lfguard spool` changes it).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::proxy::body::{ProxyBody, full};
use crate::server::shared::Shared;
use crate::state::replay::Store;
use crate::state::spool::{Spool, Stats, now_ms};
use crate::telemetry::metrics::{Figures, SpoolFigures};

/// A readiness probe must answer even when Redis hangs.
const STORE_PING_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Admin {
    shared: Arc<Shared>,
}

impl Admin {
    pub fn new(shared: Arc<Shared>) -> Self {
        Admin { shared }
    }

    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, std::convert::Infallible> {
        let response = match (request.method(), request.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET | &Method::HEAD, "/readyz") => self.readiness().await,
            (&Method::GET | &Method::HEAD, "/metrics") => {
                let spool = self.spool_stats().await.and_then(Result::ok);
                let mut response = text(StatusCode::OK, self.render_metrics(spool.as_ref()));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            (&Method::GET | &Method::HEAD, "/spool") => self.spool_summary().await,
            (_, "/healthz" | "/readyz" | "/metrics" | "/spool") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: the admin port serves /healthz, /readyz, /metrics and /spool\n",
            ),
        };
        Ok(response)
    }

    /// The metrics, with the figures of the budget, the listeners and the store read now.
    fn render_metrics(&self, spool: Option<&Stats>) -> String {
        let shared = &self.shared;
        let listeners = [
            ("proxy", &shared.proxy_connections),
            ("admin", &shared.admin_connections),
        ]
        .map(|(name, connections)| (name, connections.open(), connections.cap()));
        shared.metrics.render(&Figures {
            buffered_body_bytes: shared.budget.held(),
            buffered_body_bytes_limit: shared.budget.limit(),
            listeners: &listeners,
            replay_entries: shared.replay.entries(),
            replay_evictions: shared.replay.evictions(),
            replay_refused: shared.replay.refused(),
            spool: spool.map(|stats| SpoolFigures {
                pending: stats.pending,
                dead_letters: stats.dead,
                bytes: stats.bytes,
                bytes_limit: stats.max_bytes,
                oldest_age_seconds: oldest_age_seconds(stats),
            }),
        })
    }

    /// The spool's counts; `None` without a spool.
    async fn spool_stats(&self) -> Option<Result<Stats, String>> {
        let spool: &Spool = self.shared.spool.as_deref()?;
        let stats = match spool.store() {
            Ok(store) => store.stats().await.map_err(|err| err.to_string()),
            Err(err) => Err(err.to_string()),
        };
        Some(stats)
    }

    /// `GET /spool`: the store, the backend as the worker last found it, and the counts.
    async fn spool_summary(&self) -> Response<ProxyBody> {
        let Some(spool) = self.shared.spool.as_deref() else {
            return json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "no spool: delivery.spool_dir is not set"}),
            );
        };
        let mut summary = serde_json::json!({
            "store": spool.kind(),
            "backend": spool.backend().as_str(),
        });
        match self.spool_stats().await {
            Some(Ok(stats)) => {
                summary["pending"] = stats.pending.into();
                summary["dead_letters"] = stats.dead.into();
                summary["bytes"] = stats.bytes.into();
                summary["max_bytes"] = stats.max_bytes.into();
                summary["oldest_pending_age_seconds"] = oldest_age_seconds(&stats).into();
                summary["partners"] = serde_json::to_value(&stats.partners).unwrap_or_default();
                json(StatusCode::OK, summary)
            }
            Some(Err(err)) => {
                summary["error"] = err.into();
                json(StatusCode::SERVICE_UNAVAILABLE, summary)
            }
            None => json(StatusCode::NOT_FOUND, summary),
        }
    }

    async fn readiness(&self) -> Response<ProxyBody> {
        if self.shared.draining.load(Ordering::SeqCst) {
            return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
        }
        if let Some(Err(reason)) = self.shared.listener_tls.as_ref().map(|tls| tls.valid_now()) {
            return text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"));
        }
        if self.shared.secrets.load().partner_count() == 0 {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no partner secrets loaded\n",
            );
        }
        if let Some(spool) = &self.shared.spool
            && let Err(err) = spool.store()
        {
            return text(StatusCode::SERVICE_UNAVAILABLE, format!("spool: {err}\n"));
        }
        match tokio::time::timeout(STORE_PING_TIMEOUT, self.shared.replay.ping()).await {
            Ok(Ok(())) => text(StatusCode::OK, "ready\n"),
            Ok(Err(err)) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("replay store: {err}\n"),
            ),
            Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "replay store: no answer\n"),
        }
    }
}

fn oldest_age_seconds(stats: &Stats) -> f64 {
    stats
        .oldest_pending_ms
        .map_or(0.0, |oldest| (now_ms() - oldest).max(0) as f64 / 1000.0)
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<ProxyBody> {
    let mut response = text(status, format!("{value}\n"));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
