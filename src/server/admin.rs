//! The admin listener (`server.admin_listen`):
//! - `GET /healthz` — 200 while the process runs;
//! - `GET /readyz` — 200 when secrets are loaded, the replay store answers and the listener's
//!   certificate (with `[server.tls]`) has not expired, 503 otherwise and from the moment
//!   shutdown begins;
//! - `GET /metrics` — Prometheus text format.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::proxy::body::{ProxyBody, full};
use crate::server::shared::Shared;
use crate::state::replay::Store;
use crate::telemetry::metrics::Figures;

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
                let mut response = text(StatusCode::OK, self.render_metrics());
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            (_, "/healthz" | "/readyz" | "/metrics") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: the admin port serves /healthz, /readyz and /metrics\n",
            ),
        };
        Ok(response)
    }

    /// The metrics, with the figures of the budget, the listeners and the store read now.
    fn render_metrics(&self) -> String {
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
        })
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

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
