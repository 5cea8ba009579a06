//! The request pipeline: request head → route → limit → buffer → parse → verify → freshness →
//! replay claim → deliver (forward and settle, or spool). `Proxy::handle` is the hyper service;
//! each step is a named function below it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response};
use hyper::body::Incoming;

use crate::proxy::body::ProxyBody;
use crate::proxy::error::Rejection;
use crate::proxy::limits::BodyBudget;
use crate::proxy::routes::RouteConfig;
use crate::proxy::upstream::{Upstream, UpstreamConfig};
use crate::state::replay::{self, AnyStore, OnDuplicate, ReplayConfig};
use crate::state::secrets::{Partner, SecretStore};
use crate::state::spool::{DeliveryConfig, DeliveryMode, Spool};
use crate::telemetry::metrics::Metrics;
use crate::verify::config::{VerifyConfig, VerifyMode};
use crate::verify::schema::Schema;
use crate::verify::signature::Body;

pub mod body;
mod checks;
mod delivery;
pub mod error;
pub mod framing;
mod headers;
pub mod limits;
mod peer;
mod read;
mod record;
pub mod routes;
pub mod upstream;
pub mod worker;

// The pipeline's steps, one concern a file: each extends `Proxy` (an `impl Proxy` block, which
// reaches the fields through `super::Proxy`) or holds plain functions.
use self::delivery::duplicate_response;
use self::headers::{check_head, content_kind, delivery_id, signature_header};
pub use self::peer::Peer;
use self::read::{parse_body, partner_code};
use self::record::Record;
pub use self::record::{Accepted, RequestLog};

/// What the pipeline reads of the configuration: its own sections and the two limits of
/// `[server]` that apply per request. The server builds it from the whole configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub verify: VerifyConfig,
    pub replay: ReplayConfig,
    pub delivery: DeliveryConfig,
    pub upstream: UpstreamConfig,
    pub routes: Vec<RouteConfig>,
    pub schemas: BTreeMap<String, Schema>,
    /// `server.max_body_bytes`
    pub max_body_bytes: u64,
    /// `server.body_read_timeout`
    pub body_read_timeout: Duration,
    /// `[server.tls]` is set: clients connect with TLS (`X-Forwarded-Proto: https`).
    pub https: bool,
}

pub struct Proxy {
    settings: Settings,
    secrets: Arc<ArcSwap<SecretStore>>,
    replay: Arc<AnyStore>,
    metrics: Arc<Metrics>,
    upstream: Arc<Upstream>,
    /// Where spooled callbacks are kept; `None` without `delivery.spool_dir`.
    spool: Option<Arc<Spool>>,
    /// `server.max_buffered_bytes`, shared by every request body being buffered.
    budget: Arc<BodyBudget>,
    /// Set when shutdown begins: answers carry `Connection: close`, so clients reconnect (to
    /// another replica, once the endpoint is gone) instead of reusing this connection.
    draining: Arc<AtomicBool>,
    /// Set when `server.shutdown_grace` ran out: requests dropped from then on were cut by
    /// lfguard, not by their client.
    cut: AtomicBool,
}

impl Proxy {
    /// `upstream` is the pool for `settings.upstream` (`Upstream::new`); the rest is shared
    /// with the server (admin, reload, the delivery worker).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        upstream: Arc<Upstream>,
        secrets: Arc<ArcSwap<SecretStore>>,
        replay: Arc<AnyStore>,
        spool: Option<Arc<Spool>>,
        metrics: Arc<Metrics>,
        budget: Arc<BodyBudget>,
        draining: Arc<AtomicBool>,
    ) -> Self {
        Proxy {
            settings,
            secrets,
            replay,
            metrics,
            upstream,
            spool,
            budget,
            draining,
            cut: AtomicBool::new(false),
        }
    }

    /// `server.shutdown_grace` ran out: the requests still in progress are about to be dropped
    /// with the process, and are logged as cut by lfguard (`shutting_down`).
    pub fn mark_cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// The service: runs the pipeline and answers refusals; `Record` emits the request's one log
    /// event and its metrics.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: Arc<Peer>,
    ) -> Result<Response<ProxyBody>, std::convert::Infallible> {
        let arrived = SystemTime::now();
        let mut record = Record::new(&self, &request, &peer);
        let (response, code, reason) = match self
            .pipeline(request, &peer, arrived, &mut record.log)
            .await
        {
            Ok((response, accepted)) => (response, accepted.code(), None),
            Err(rejection) => (
                rejection.to_response(),
                rejection.code(),
                Some(rejection.detail()),
            ),
        };
        let mut response = response;
        if self.draining.load(Ordering::Relaxed) {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        record.emit(code, response.status().as_u16(), reason.as_deref());
        Ok(response)
    }

    async fn pipeline(
        &self,
        request: Request<Incoming>,
        peer: &Peer,
        arrived: SystemTime,
        log: &mut RequestLog,
    ) -> Result<(Response<ProxyBody>, Accepted), Rejection> {
        let (parts, incoming) = request.into_parts();
        // Heads that lfguard and the backend could read differently: refused on every route.
        check_head(&parts.headers, peer)?;
        // The body's share of `server.max_buffered_bytes`, held until this request is finished
        // with (answered, refused, or dropped because the client went away).
        let mut held = self.budget.reservation();

        // Operators may pass a backend's own pages (health, status) through unverified; other
        // routes may carry a member schema and their own overrides.
        let route = self.route_for(parts.uri.path());
        if route.is_some_and(|route| !route.verify) && self.is_passthrough(&parts) {
            let body = self.read_body(&parts, incoming, &mut held).await?;
            let forward = self.upstream_request(parts, body, peer, None);
            let response = self.send_upstream(forward, log).await?;
            return Ok((response, Accepted::PassedThrough));
        }
        if parts.method != Method::POST {
            return Err(Rejection::MethodNotAllowed);
        }
        // A schema binds only if lfguard sees the path the backend routes on.
        self.check_schema_path(parts.uri.path())?;
        // Framing and parsing protect lfguard and the backend: enforced in every mode.
        let form = content_kind(&parts.headers)?;
        if form
            && !route
                .and_then(|r| r.accept_form)
                .unwrap_or(self.settings.verify.accept_form)
        {
            return Err(Rejection::UnsupportedMediaType);
        }
        let body = self.read_body(&parts, incoming, &mut held).await?;
        let parsed = parse_body(&body, form)?;
        let secrets = self.secrets.load();
        let partner = partner_code(&parsed);
        let entry = partner.as_ref().ok().and_then(|code| secrets.partner(code));
        log.partner = partner.as_ref().ok().map(|code| code.to_string());
        log.partner_known = entry.is_some();
        let mode = secrets.mode_of(entry);
        log.mode = Some(mode);

        // Signature, delivery id and freshness.
        let replay_key =
            match self.check(&parts.headers, &parsed, partner, entry, route, arrived, log) {
                Ok(replay_key) => replay_key,
                Err(rejection) => {
                    return self
                        .refuse_or_report(rejection, parts, body, peer, log)
                        .await;
                }
            };

        // Replay claim: the first copy owns the key until the backend has answered. A copy of a
        // delivered callback is acknowledged without forwarding, unless policy says otherwise.
        let guard = match self.claim(replay_key).await {
            Ok(guard) => guard,
            Err(Rejection::Replay)
                if self.settings.replay.on_duplicate == OnDuplicate::Acknowledge
                    && mode == VerifyMode::Enforce =>
            {
                self.count_verification(log, Rejection::Replay.code());
                return Ok((duplicate_response(), Accepted::Duplicate));
            }
            Err(rejection) => {
                return self
                    .refuse_or_report(rejection, parts, body, peer, log)
                    .await;
            }
        };
        self.count_verification(log, "valid");

        // Spool mode: once the callback is on disk it is ours to deliver, so the sender gets its
        // answer now and the delivery worker (`worker`) hands it to the backend when it can.
        if self.delivery_mode(route, entry) == DeliveryMode::Spool {
            let response = self.spool(parts, body, peer, guard, log).await?;
            return Ok((response, Accepted::Spooled));
        }

        // Deliver: forward, and settle the claim on the backend's answer, which runs to the end
        // even if the client hangs up.
        let forward = self.upstream_request(parts, body, peer, Some(log));
        let response = self.deliver(forward, guard, log).await?;
        Ok((response, Accepted::Forwarded))
    }

    /// The checks that report mode may waive. Returns the replay key.
    #[allow(clippy::too_many_arguments)]
    fn check(
        &self,
        headers: &HeaderMap,
        body: &Body<'_>,
        partner: Result<&str, Rejection>,
        entry: Option<&Partner>,
        route: Option<&RouteConfig>,
        arrived: SystemTime,
        log: &mut RequestLog,
    ) -> Result<replay::Key, Rejection> {
        let signature = signature_header(headers)?;
        log.delivery_id = delivery_id(headers, self.settings.verify.require_delivery_id)?;
        let partner = partner?;
        // A body whose string to sign has another reading is never vouched for, whatever its
        // signature: the backend could be acting on the other reading.
        self.check_unambiguous(body, route)?;
        let entry = entry.ok_or(Rejection::UnknownPartner)?;
        let (key, digest) = self.verify_signature(body, partner, signature, &entry.keys)?;
        log.key_id = Some(key.id_header.clone());
        let require_timestamp = route
            .and_then(|route| route.require_timestamp)
            .or(entry.require_timestamp)
            .unwrap_or(self.settings.verify.require_timestamp);
        self.check_freshness(body, arrived, require_timestamp)?;
        Ok(replay::Key {
            partner: partner.to_string(),
            digest,
        })
    }

    /// Refuses, or in report mode forwards the request marked with the failed check. Replay
    /// claims are not taken for such requests: only verified callbacks are remembered.
    async fn refuse_or_report(
        &self,
        rejection: Rejection,
        parts: Parts,
        body: Bytes,
        peer: &Peer,
        log: &mut RequestLog,
    ) -> Result<(Response<ProxyBody>, Accepted), Rejection> {
        if !rejection.is_reportable() {
            return Err(rejection);
        }
        self.count_verification(log, rejection.code());
        if log.mode != Some(VerifyMode::Report) {
            return Err(rejection);
        }
        log.failure = Some(rejection.code());
        let forward = self.upstream_request(parts, body, peer, Some(log));
        let response = self.send_upstream(forward, log).await?;
        Ok((response, Accepted::Reported))
    }

    fn count_verification(&self, log: &RequestLog, result: &'static str) {
        let mode = log.mode.unwrap_or_default();
        self.metrics
            .verification(log.metrics_partner(), result, mode.as_str());
    }
}
