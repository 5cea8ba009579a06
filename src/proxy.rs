//! The request pipeline: request head → route → limit → buffer → parse → verify → freshness →
//! replay claim → deliver (forward and settle). `Proxy::handle` is the hyper service; each step is
//! a named function below it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::{ProxyBody, full};
use crate::config::{Config, OnDuplicate, RouteConfig, VerifyMode};
use crate::error::Rejection;
use crate::framing::HeadWatch;
use crate::limits::{BodyBudget, Reservation};
use crate::logging::RequestLine;
use crate::metrics::Metrics;
use crate::replay::{self, AnyStore, Claim, ClaimGuard, Store};
use crate::secrets::{SecretStore, is_partner_code};
use crate::upstream::{Deadline, Upstream};
use crate::verify::ambiguity;
use crate::verify::diagnose;
use crate::verify::freshness::{self, Staleness};
use crate::verify::signature::{self, Body, Value};

// Header names as `HeaderName`s: looking one up by `&str` parses and validates it every time.
const SIGNATURE_HEADER: HeaderName = HeaderName::from_static("x-lf-md5");
const DELIVERY_HEADER: HeaderName = HeaderName::from_static("x-lf-delivery");
/// lfguard's own headers, whatever a client sends under this prefix (`_` read as `-`).
const OWN_HEADER_PREFIX: &[u8] = b"x-lfguard-";
/// The Linksfield headers lfguard verifies.
const LINKSFIELD_HEADER_PREFIX: &[u8] = b"x-lf-";
const MAX_DELIVERY_ID_LEN: usize = 128;

/// Time an in-flight claim outlives the upstream timeout, so a claim never expires while its
/// request may still be delivered.
const CLAIM_MARGIN: Duration = Duration::from_secs(5);

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const VERIFIED: HeaderName = HeaderName::from_static("x-lfguard-verified");
const FAILURE: HeaderName = HeaderName::from_static("x-lfguard-failure");
const PARTNER_CODE: HeaderName = HeaderName::from_static("x-lfguard-partner-code");
const KEY_ID: HeaderName = HeaderName::from_static("x-lfguard-key-id");
const DELIVERY_ID: HeaderName = HeaderName::from_static("x-lfguard-delivery-id");

/// Sets a header whose value came from the request (already validated, so it always fits).
fn insert(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those we set ourselves.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Methods a `[[routes]]` pass-through forwards; others (CONNECT, TRACE, extensions) are never
/// passed through.
const PASSTHROUGH_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// The client at the other end of one connection, formatted once rather than for every request.
#[derive(Debug)]
pub struct Peer {
    ip: std::net::IpAddr,
    /// `ip:port`, as logged.
    address: String,
    /// The IP as the hop lfguard adds to `X-Forwarded-For`.
    forwarded_for: HeaderValue,
    /// What the connection's raw bytes showed about each request head (see `framing`).
    head_watch: Arc<HeadWatch>,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        Peer {
            ip: addr.ip(),
            address: addr.to_string(),
            forwarded_for: HeaderValue::from_str(&addr.ip().to_string())
                .expect("an IP address is a valid header value"),
            head_watch: Arc::default(),
        }
    }

    /// For the connection's `framing::Watched` socket.
    pub fn head_watch(&self) -> &Arc<HeadWatch> {
        &self.head_watch
    }
}

/// What lfguard learned about a request as the pipeline ran: logged, counted, and forwarded as
/// the `x-lfguard-*` headers.
#[derive(Debug, Default)]
pub struct RequestLog {
    pub partner: Option<String>,
    /// Whether `partner` is configured, i.e. may be a metrics label.
    pub partner_known: bool,
    pub delivery_id: Option<String>,
    pub key_id: Option<String>,
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
struct Record<'p> {
    proxy: &'p Proxy,
    started: Instant,
    method: Method,
    uri: Uri,
    peer: &'p Peer,
    log: RequestLog,
    emitted: bool,
}

impl<'p> Record<'p> {
    fn new(proxy: &'p Proxy, request: &Request<Incoming>, peer: &'p Peer) -> Self {
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

    fn emit(&mut self, code: &'static str, status: u16, reason: Option<&str>) {
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
            key_id: log.key_id.as_deref().unwrap_or(""),
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
        if !self.emitted && self.proxy.cut.is_cancelled() {
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
    fn metrics_partner(&self) -> Option<&str> {
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
}

impl Accepted {
    pub fn code(self) -> &'static str {
        match self {
            Accepted::Forwarded => "forwarded",
            Accepted::Duplicate => "duplicate",
            Accepted::PassedThrough => "passed_through",
            Accepted::Reported => "reported",
        }
    }
}

pub struct Proxy {
    config: Arc<Config>,
    secrets: Arc<ArcSwap<SecretStore>>,
    replay: Arc<AnyStore>,
    metrics: Arc<Metrics>,
    upstream: Arc<Upstream>,
    /// `server.max_buffered_bytes`, shared by every request body being buffered.
    budget: Arc<BodyBudget>,
    /// Set when shutdown begins: answers carry `Connection: close`, so clients reconnect (to
    /// another replica, once the endpoint is gone) instead of reusing this connection.
    draining: Arc<AtomicBool>,
    /// Cancelled when `server.shutdown_grace` ran out: deliveries still waiting for the backend
    /// stop and release their replay claims.
    cut: CancellationToken,
    /// The deliveries in progress, so that shutdown can wait for their claims to be released.
    deliveries: TaskTracker,
}

impl Proxy {
    pub fn new(
        config: Arc<Config>,
        secrets: Arc<ArcSwap<SecretStore>>,
        replay: Arc<AnyStore>,
        metrics: Arc<Metrics>,
        budget: Arc<BodyBudget>,
        draining: Arc<AtomicBool>,
    ) -> Self {
        let upstream =
            Upstream::new(&config.upstream).expect("upstream.url was validated at config load");
        Proxy {
            config,
            secrets,
            replay,
            metrics,
            upstream: Arc::new(upstream),
            budget,
            draining,
            cut: CancellationToken::new(),
            deliveries: TaskTracker::new(),
        }
    }

    /// `server.shutdown_grace` ran out: deliveries still waiting for the backend stop, release
    /// their replay claims (so that Linksfield's retry, to whichever replica, is forwarded
    /// without waiting for the claim to lapse) and answer 503 `shutting_down`. Returns once
    /// they have, or after `within`.
    pub async fn cut_deliveries(&self, within: Duration) {
        let cut = self.deliveries.len();
        self.cut.cancel();
        self.deliveries.close();
        if tokio::time::timeout(within, self.deliveries.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                deliveries = cut,
                "replay claims of cut deliveries could not all be released; they lapse on their own"
            );
        } else if cut > 0 {
            tracing::info!(
                deliveries = cut,
                "cut deliveries released their replay claims"
            );
        }
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
        // Framing and parsing protect lfguard and the backend: enforced in every mode.
        let form = content_kind(&parts.headers)?;
        if form
            && !route
                .and_then(|r| r.accept_form)
                .unwrap_or(self.config.verify.accept_form)
        {
            return Err(Rejection::UnsupportedMediaType);
        }
        let body = self.read_body(&parts, incoming, &mut held).await?;
        let parsed = parse_body(&body, form)?;
        let secrets = self.secrets.load();
        let partner = partner_code(&parsed);
        log.partner = partner.as_ref().ok().map(|code| code.to_string());
        log.partner_known = partner.as_ref().is_ok_and(|code| secrets.contains(code));
        let mode = secrets.mode_for(log.partner.as_deref());
        log.mode = Some(mode);

        // Signature, delivery id and freshness.
        let replay_key = match self.check(
            &parts.headers,
            &parsed,
            partner,
            route,
            &secrets,
            arrived,
            log,
        ) {
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
                if self.config.replay.on_duplicate == OnDuplicate::Acknowledge
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
        route: Option<&RouteConfig>,
        secrets: &SecretStore,
        arrived: SystemTime,
        log: &mut RequestLog,
    ) -> Result<replay::Key, Rejection> {
        let signature = signature_header(headers)?;
        log.delivery_id = delivery_id(headers, self.config.verify.require_delivery_id)?;
        let partner = partner?;
        // A body whose string to sign has another reading is never vouched for, whatever its
        // signature: the backend could be acting on the other reading.
        self.check_unambiguous(body, route)?;
        let (key_id, digest) = self.verify_signature(body, partner, signature, secrets)?;
        log.key_id = Some(key_id);
        let require_timestamp = route
            .and_then(|route| route.require_timestamp)
            .or_else(|| secrets.require_timestamp_for(partner))
            .unwrap_or(self.config.verify.require_timestamp);
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

    /// The route with the longest prefix matching `path`. Verified routes match ignoring ASCII
    /// case, pass-through routes exactly: a backend that routes case-insensitively must not be
    /// able to reach a schema route's handler without its schema, nor lfguard pass through more
    /// than the prefix says.
    fn route_for(&self, path: &str) -> Option<&RouteConfig> {
        self.config
            .routes
            .iter()
            .filter(|route| {
                if route.verify {
                    under_prefix_ignoring_case(path, &route.path_prefix)
                } else {
                    under_prefix(path, &route.path_prefix)
                }
            })
            .max_by_key(|route| route.path_prefix.len())
    }

    /// On a `verify = false` route: an ordinary method and a clean path (see `is_clean_path`).
    /// Anything else takes the verified path.
    fn is_passthrough(&self, parts: &Parts) -> bool {
        PASSTHROUGH_METHODS.contains(&parts.method) && is_clean_path(parts.uri.path())
    }

    /// Buffers the body within `server.max_body_bytes`, `server.body_read_timeout` and the
    /// shared `server.max_buffered_bytes`. A declared Content-Length over the limit is refused
    /// before a byte is read; one the budget cannot cover is refused (503 `overloaded`) before a
    /// byte is read too. A chunked body takes its share as it grows.
    async fn read_body<'b>(
        &'b self,
        parts: &Parts,
        incoming: Incoming,
        held: &mut Reservation<'b>,
    ) -> Result<Bytes, Rejection> {
        let limit = self.config.server.max_body_bytes;
        let declared = match parts.headers.get(header::CONTENT_LENGTH) {
            None => None,
            Some(length) => match length.to_str().ok().and_then(|l| l.parse::<u64>().ok()) {
                Some(length) if length <= limit => Some(length),
                _ => return Err(Rejection::BodyTooLarge { limit }),
            },
        };
        if let Some(length) = declared {
            held.grow(length).map_err(|_| Rejection::Overloaded)?;
        }
        let collect = collect_body(incoming, declared, limit, held);
        match tokio::time::timeout(self.config.server.body_read_timeout, collect).await {
            Err(_elapsed) => Err(Rejection::RequestTimeout),
            Ok(result) => result,
        }
    }

    /// Tries each of the partner's secrets; the matching one names the forwarded key id. On a
    /// mismatch, the documented variants are tried so that the log and metrics can say which
    /// setting would have accepted it.
    fn verify_signature(
        &self,
        body: &Body<'_>,
        partner: &str,
        signature: &HeaderValue,
        secrets: &SecretStore,
    ) -> Result<(String, [u8; 16]), Rejection> {
        let keys = secrets.keys(partner).ok_or(Rejection::UnknownPartner)?;
        let verify = &self.config.verify;
        let claimed = signature::decode_header(signature.as_bytes(), verify.signature_encoding);
        if let Some(claimed) = claimed {
            let prepared = signature::Prepared::new(
                &body.canonical_with(verify.null_values, verify.nested_values),
            );
            let matched = keys.iter().find_map(|key| {
                let digest = prepared.digest(&key.secret);
                claimed.matches(&digest).then(|| (key.id.clone(), digest))
            });
            if let Some(matched) = matched {
                return Ok(matched);
            }
        }
        let settings = diagnose::Settings {
            encoding: verify.signature_encoding,
            nulls: verify.null_values,
            nested: verify.nested_values,
        };
        let candidates: Vec<&str> = keys.iter().map(|key| key.secret.as_str()).collect();
        if let Some(variant) =
            diagnose::find_variant(body, signature.as_bytes(), &candidates, settings)
        {
            let variant = variant.name();
            tracing::warn!(partner, variant = %variant, "signature matches a variant the configuration does not accept");
            self.metrics.signature_variant(partner, &variant);
        }
        Err(Rejection::BadSignature(match claimed {
            None => "x-lf-md5 is not a base64 md5 digest in an accepted encoding".into(),
            Some(_) => "signature does not match".into(),
        }))
    }

    /// Keys and values that make the string to sign readable as another body, and the route's
    /// member schema.
    fn check_unambiguous(
        &self,
        body: &Body<'_>,
        route: Option<&RouteConfig>,
    ) -> Result<(), Rejection> {
        let verify = &self.config.verify;
        ambiguity::check(body, verify.nested_values)
            .map_err(|why| Rejection::AmbiguousBody(why.to_string()))?;
        if let Some(schema) = route
            .and_then(|route| route.schema.as_ref())
            .and_then(|name| self.config.schemas.get(name))
        {
            schema
                .check(body)
                .map_err(|why| Rejection::AmbiguousBody(why.to_string()))?;
        }
        Ok(())
    }

    fn check_freshness(
        &self,
        body: &Body<'_>,
        arrived: SystemTime,
        require_timestamp: bool,
    ) -> Result<(), Rejection> {
        let verify = &self.config.verify;
        let mut found = false;
        for field in &verify.timestamp_fields {
            let Some(value) = body.get(field) else {
                continue;
            };
            found = true;
            freshness::check(value, arrived, verify.max_age, verify.max_skew).map_err(|why| {
                Rejection::Stale(match why {
                    Staleness::Unreadable => format!("{field} is not a timestamp lfguard can read"),
                    Staleness::TooOld => format!(
                        "{field} is older than {}",
                        humantime::format_duration(verify.max_age)
                    ),
                    Staleness::TooNew => format!(
                        "{field} is more than {} in the future",
                        humantime::format_duration(verify.max_skew)
                    ),
                })
            })?;
        }
        if !found && require_timestamp {
            return Err(Rejection::MissingTimestamp(format!(
                "the body has no timestamp member ({})",
                verify.timestamp_fields.join(", ")
            )));
        }
        Ok(())
    }

    /// `Err(Replay)` for a copy of a delivered callback, `Err(InFlight)` while another copy is
    /// being forwarded.
    async fn claim(&self, replay_key: replay::Key) -> Result<ClaimGuard, Rejection> {
        let in_flight = self.config.upstream.timeout + CLAIM_MARGIN;
        let claim = self
            .replay
            .claim(&replay_key, in_flight)
            .await
            .map_err(|err| Rejection::ReplayStoreUnavailable(err.0))?;
        match claim {
            Claim::Claimed(token) => Ok(ClaimGuard::new(self.replay.clone(), replay_key, token)),
            Claim::Delivered => Err(Rejection::Replay),
            Claim::Full => Err(Rejection::ReplayStoreUnavailable(
                "the replay store holds replay.capacity claims in flight".into(),
            )),
            Claim::InFlight => Err(Rejection::InFlight {
                retry_after_secs: in_flight.as_secs().max(1),
            }),
        }
    }

    /// The request to the backend: same method, path, query and body; end-to-end headers kept;
    /// hop-by-hop and spoofed `x-lfguard-*` headers dropped; forwarding and verification headers
    /// added. The incoming header map is edited in place rather than copied.
    fn upstream_request(
        &self,
        mut parts: Parts,
        body: Bytes,
        peer: &Peer,
        verification: Option<&RequestLog>,
    ) -> Request<Full<Bytes>> {
        let headers = &mut parts.headers;
        // A client must not pass off its own x-lfguard-* headers as lfguard's verdict, also not
        // spelled with `_`, which CGI-style backends read as the same header.
        strip_hop_by_hop(headers, |name| {
            name_starts_with(name.as_str().as_bytes(), OWN_HEADER_PREFIX)
        });

        if headers.contains_key(X_FORWARDED_FOR) {
            let mut forwarded_for = String::with_capacity(64);
            for value in headers.get_all(X_FORWARDED_FOR) {
                if let Ok(value) = value.to_str() {
                    forwarded_for.push_str(value);
                    forwarded_for.push_str(", ");
                }
            }
            let _ = write!(forwarded_for, "{}", peer.ip);
            insert(headers, X_FORWARDED_FOR, &forwarded_for);
        } else {
            headers.insert(X_FORWARDED_FOR, peer.forwarded_for.clone());
        }
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        match headers.get(header::HOST).cloned() {
            Some(host) => headers.insert(X_FORWARDED_HOST, host),
            None => headers.remove(X_FORWARDED_HOST),
        };
        if let Some(facts) = verification {
            let verified = if facts.failure.is_none() {
                "true"
            } else {
                "false"
            };
            headers.insert(VERIFIED, HeaderValue::from_static(verified));
            if let Some(failure) = facts.failure {
                insert(headers, FAILURE, failure);
            }
            for (name, value) in [(PARTNER_CODE, &facts.partner), (KEY_ID, &facts.key_id)] {
                if let Some(value) = value {
                    insert(headers, name, value);
                }
            }
            // The incoming header itself (validated as visible ASCII), shared rather than copied.
            if facts.delivery_id.is_some()
                && let Some(delivery_id) = headers.get(DELIVERY_HEADER).cloned()
            {
                headers.insert(DELIVERY_ID, delivery_id);
            }
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        parts.uri = self.upstream.target().uri_for(parts.uri.path_and_query());
        parts.version = Version::HTTP_11;
        Request::from_parts(parts, Full::new(body))
    }

    /// Forwards a request that holds no replay claim (pass-through, report-mode failures). It is
    /// part of the request's own future: a client that goes away cancels it, which settles
    /// nothing because there is no claim.
    async fn send_upstream(
        &self,
        request: Request<Full<Bytes>>,
        log: &mut RequestLog,
    ) -> Result<Response<ProxyBody>, Rejection> {
        let (result, seconds) =
            exchange(&self.upstream, self.config.upstream.timeout, request).await;
        log.upstream_seconds = Some(seconds);
        result
    }

    /// Forwards a verified callback and settles its claim on the backend's answer: a 2xx makes
    /// the callback delivered; anything else (non-2xx, timeout, unreachable) frees the key so
    /// Linksfield's retry is forwarded again. Both run to the end whatever the client does: a
    /// client that hangs up (hyper then drops the request's future) hands them to a task of their
    /// own (`Detached`) instead of cutting the exchange short and freeing the claim while the
    /// backend may still accept the callback; the backend's real answer settles it, and copies
    /// meanwhile get `in_flight`. A task for every request would cost more (about 1,400
    /// instructions a request) for the rare client that leaves.
    async fn deliver(
        &self,
        request: Request<Full<Bytes>>,
        guard: ClaimGuard,
        log: &mut RequestLog,
    ) -> Result<Response<ProxyBody>, Rejection> {
        let upstream = self.upstream.clone();
        let timeout = self.config.upstream.timeout;
        let window = self.config.replay.window;
        log.delivering = true;
        let cut = self.cut.clone();
        let (result, seconds) = Detached::new(self.deliveries.track_future(async move {
            let started = Instant::now();
            let exchanged = tokio::select! {
                biased;
                exchanged = exchange(&upstream, timeout, request) => Some(exchanged),
                () = cut.cancelled() => None,
            };
            let Some((result, seconds)) = exchanged else {
                if let Err(err) = guard.release().await {
                    tracing::warn!(error = %err, "could not release the replay claim of a cut delivery");
                }
                return (
                    Err(Rejection::ShuttingDown),
                    started.elapsed().as_secs_f64(),
                );
            };
            let delivered = matches!(&result, Ok(response) if response.status().is_success());
            let settled = if delivered {
                guard.settle(window).await
            } else {
                guard.release().await
            };
            if let Err(err) = settled {
                tracing::warn!(error = %err, delivered, "could not settle the replay claim");
            }
            (result, seconds)
        }))
        .await;
        log.upstream_seconds = Some(seconds);
        result
    }
}

/// A future that runs to completion even if dropped: dropped unfinished (hyper drops the
/// request's future when the client goes away), it is handed to a task of its own, which goes on
/// from where it was.
struct Detached<F: Future + Send + 'static>(Option<Pin<Box<F>>>)
where
    F::Output: Send + 'static;

impl<F: Future + Send + 'static> Detached<F>
where
    F::Output: Send + 'static,
{
    fn new(future: F) -> Self {
        Detached(Some(Box::pin(future)))
    }
}

impl<F: Future + Send + 'static> Future for Detached<F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let future = self.0.as_mut().expect("not polled after completion");
        let output = std::task::ready!(future.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(output)
    }
}

impl<F: Future + Send + 'static> Drop for Detached<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        // Not after a panic in the future itself: it cannot be resumed.
        if let Some(future) = self.0.take()
            && !std::thread::panicking()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(future);
        }
    }
}

/// Sends to the backend within `timeout` and relays its answer, streaming the body. Also returns
/// the seconds the backend took.
async fn exchange(
    upstream: &Arc<Upstream>,
    timeout: Duration,
    request: Request<Full<Bytes>>,
) -> (Result<Response<ProxyBody>, Rejection>, f64) {
    let started = Instant::now();
    // One deadline for the whole exchange: the head, then the body (`Deadline`).
    let mut deadline = Box::pin(tokio::time::sleep(timeout));
    let result = tokio::select! {
        biased;
        result = upstream.send(request) => Some(result),
        () = deadline.as_mut() => None,
    };
    let seconds = started.elapsed().as_secs_f64();
    let response = match result {
        None => return (Err(Rejection::UpstreamTimeout), seconds),
        Some(Err(err)) => {
            return (
                Err(Rejection::UpstreamUnavailable(err.to_string())),
                seconds,
            );
        }
        Some(Ok(response)) => response,
    };
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, |_| false);
    // lfguard speaks HTTP/1.1 to its client whatever the backend spoke.
    parts.version = Version::HTTP_11;
    let body = Deadline::new(body, deadline, timeout);
    (Ok(Response::from_parts(parts, body.boxed())), seconds)
}

/// Request heads refused on every route before a body is read, because lfguard and a backend (or
/// another proxy on the way) could act on them differently:
/// - `Content-Length` together with `Transfer-Encoding` (the request-smuggling shape; hyper
///   frames it by the chunked coding and drops `Content-Length` from the map, so the connection's
///   own scanner says so);
/// - several `Host` headers (RFC 9112 §3.2 requires 400);
/// - a `Connection` header naming a header lfguard relies on or that frames the message: lfguard
///   would drop it as hop-by-hop after checking it (`Connection: x-lf-md5, host` stripped the
///   signature and `Host` from a verified request).
fn check_head(headers: &HeaderMap, peer: &Peer) -> Result<(), Rejection> {
    if peer.head_watch.next_request_is_ambiguous() {
        return Err(Rejection::MalformedRequest(
            "Content-Length together with Transfer-Encoding".into(),
        ));
    }
    if headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err(Rejection::MalformedRequest("several Host headers".into()));
    }
    // CGI and WSGI backends merge `x_lf_md5` with `x-lf-md5` (both are `HTTP_X_LF_MD5`): the
    // backend could check a signature, or frame a body, other than the one lfguard checked.
    if headers.keys().any(|name| {
        let name = name.as_str().as_bytes();
        name.contains(&b'_') && is_protected(name) && !name_starts_with(name, OWN_HEADER_PREFIX)
    }) {
        return Err(Rejection::MalformedRequest(
            "a header spelled with '_' that a backend reads as Host, Content-Type, \
             Content-Length, Transfer-Encoding or an x-lf-* header"
                .into(),
        ));
    }
    if headers.contains_key(header::CONNECTION)
        && connection_tokens(headers).any(|name| is_protected(name.as_bytes()))
    {
        return Err(Rejection::MalformedRequest(
            "Connection names Host, Content-Type, Content-Length, Transfer-Encoding or an x-lf-* \
             or x-lfguard-* header"
                .into(),
        ));
    }
    Ok(())
}

/// The names a `Connection` header lists.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Headers no `Connection` header may declare hop-by-hop.
fn is_protected(name: &[u8]) -> bool {
    [
        &b"host"[..],
        b"content-type",
        b"content-length",
        b"transfer-encoding",
    ]
    .iter()
    .any(|protected| same_name(name, protected))
        || name_starts_with(name, LINKSFIELD_HEADER_PREFIX)
        || name_starts_with(name, OWN_HEADER_PREFIX)
}

/// Compares a header name with a lowercase name, ignoring ASCII case and reading `_` as `-`:
/// CGI and WSGI backends (`HTTP_X_LF_MD5`) see `x_lf_md5` and `x-lf-md5` as one header.
fn same_name(name: &[u8], lowercase: &[u8]) -> bool {
    name.len() == lowercase.len()
        && name
            .iter()
            .zip(lowercase)
            .all(|(&n, &l)| n.to_ascii_lowercase() == l || (n == b'_' && l == b'-'))
}

fn name_starts_with(name: &[u8], lowercase_prefix: &[u8]) -> bool {
    name.len() >= lowercase_prefix.len()
        && same_name(&name[..lowercase_prefix.len()], lowercase_prefix)
}

/// An error and its causes, for the log.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let _ = write!(message, ": {cause}");
        source = cause.source();
    }
    message
}

/// Headers that `Connection` declares hop-by-hop for this message. `keep-alive` and `close`, the
/// usual values, name no header that is not already dropped.
fn listed_in_connection(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| {
            !name.eq_ignore_ascii_case("keep-alive") && !name.eq_ignore_ascii_case("close")
        })
        .filter_map(|name| HeaderName::try_from(name).ok())
        .collect()
}

/// Removes the hop-by-hop headers and those `also` names. One pass over the names a message has
/// (usually none or one to remove) rather than a lookup for each name that could be there.
fn strip_hop_by_hop(headers: &mut HeaderMap, also: impl Fn(&HeaderName) -> bool) {
    let listed = listed_in_connection(headers);
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| HOP_BY_HOP.contains(name) || listed.contains(name) || also(name))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// `/health` covers `/health` and `/health/...`, not `/healthX` (a prefix ending in `/` covers
/// what follows it).
fn under_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn under_prefix_ignoring_case(path: &str, prefix: &str) -> bool {
    let (path, prefix) = (path.as_bytes(), prefix.as_bytes());
    path.len() >= prefix.len()
        && path[..prefix.len()].eq_ignore_ascii_case(prefix)
        && (prefix.ends_with(b"/") || path.len() == prefix.len() || path[prefix.len()] == b'/')
}

/// Whether a path may pass through unverified: one that every backend reads as lfguard does.
/// Refused: `.` and `..` segments; `;` (path parameters: Tomcat and Spring read
/// `/health/..;/admin` as `/admin`); `\`; percent-encoded `.`, `/`, `\`, `;` and `%` (double
/// encoding such as `%252e`); control characters (NUL) and non-ASCII, raw or encoded; a `%` not
/// followed by two hex digits. A backend that normalises such a path could serve a verified
/// route through an unverified prefix (`/health/../callback`).
fn is_clean_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        let byte = if byte == b'%' {
            let decoded = bytes
                .get(at + 1..at + 3)
                .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok());
            match decoded {
                Some(b'.' | b'/' | b'%') | None => return false,
                Some(decoded) => {
                    at += 3;
                    decoded
                }
            }
        } else {
            at += 1;
            byte
        };
        if matches!(byte, b';' | b'\\') || !(b' '..0x7f).contains(&byte) {
            return false;
        }
    }
    !path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
}

/// `true` for a form body, `false` for JSON; anything else (or two Content-Type headers, which
/// lfguard and the backend might read differently) is refused.
fn content_kind(headers: &HeaderMap) -> Result<bool, Rejection> {
    if headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(Rejection::UnsupportedMediaType);
    }
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or(Rejection::UnsupportedMediaType)?;
    let mut params = value.split(';');
    let essence = params.next().unwrap_or("").trim();
    for param in params {
        if let Some((name, charset)) = param.split_once('=')
            && name.trim().eq_ignore_ascii_case("charset")
            && !charset
                .trim()
                .trim_matches('"')
                .eq_ignore_ascii_case("utf-8")
        {
            return Err(Rejection::UnsupportedMediaType);
        }
    }
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(false)
    } else if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Ok(true)
    } else {
        Err(Rejection::UnsupportedMediaType)
    }
}

/// Exactly one `x-lf-md5`: two could be read differently by lfguard and a backend that checks
/// the signature itself.
fn signature_header(headers: &HeaderMap) -> Result<&HeaderValue, Rejection> {
    let mut values = headers.get_all(SIGNATURE_HEADER).iter();
    match (values.next(), values.next()) {
        (None, _) => Err(Rejection::MissingSignature),
        (Some(value), None) if value.is_empty() => Err(Rejection::MissingSignature),
        (Some(value), None) => Ok(value),
        (Some(_), Some(_)) => Err(Rejection::BadSignature("several x-lf-md5 headers".into())),
    }
}

fn delivery_id(headers: &HeaderMap, required: bool) -> Result<Option<String>, Rejection> {
    let mut values = headers.get_all(DELIVERY_HEADER).iter();
    let value = match (values.next(), values.next()) {
        (Some(_), Some(_)) => {
            return Err(Rejection::MissingDeliveryId(
                "several x-lf-delivery headers".into(),
            ));
        }
        (value, _) => value.filter(|v| !v.is_empty()),
    };
    let Some(value) = value else {
        return if required {
            Err(Rejection::MissingDeliveryId(
                "x-lf-delivery header is missing".into(),
            ))
        } else {
            Ok(None)
        };
    };
    match value.to_str() {
        Ok(id) if id.len() <= MAX_DELIVERY_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(id.to_string()))
        }
        _ => Err(Rejection::MissingDeliveryId(format!(
            "x-lf-delivery must be at most {MAX_DELIVERY_ID_LEN} visible ASCII characters"
        ))),
    }
}

/// Reads a body's frames into one buffer. Each frame is copied out as it arrives, so that hyper
/// can reuse its read buffer: a frame kept as it is would pin the whole buffer it was cut from,
/// 8 KiB or more even for the one byte of a slow sender's packet. A body that arrives as one
/// frame (the usual case: it came with the headers) is kept without a copy.
///
/// A declared body was reserved in full already and gets a buffer of exactly its length. A
/// chunked one reserves its buffer's capacity, which grows to twice its size (at most to the
/// body limit) each time it fills.
async fn collect_body(
    mut incoming: Incoming,
    declared: Option<u64>,
    limit: u64,
    held: &mut Reservation<'_>,
) -> Result<Bytes, Rejection> {
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    let mut received: u64 = 0;
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|err| Rejection::UnreadableBody(error_chain(&err)))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        received += data.len() as u64;
        if received > limit {
            return Err(Rejection::BodyTooLarge { limit });
        }
        if declared.is_none() && held.bytes() < received {
            // Chunked: the first frame is held as it came; later ones in a buffer of reserved
            // capacity.
            let needed = if first.is_none() && joined.is_empty() {
                received
            } else {
                received.max(joined.capacity() as u64 * 2).min(limit)
            };
            held.grow(needed - held.bytes())
                .map_err(|_| Rejection::Overloaded)?;
        }
        if first.is_none() && joined.is_empty() {
            first = Some(data);
            continue;
        }
        if let Some(first) = first.take() {
            let capacity = declared.unwrap_or(held.bytes());
            joined = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(usize::MAX));
            joined.put(first);
        } else if joined.capacity() - joined.len() < data.len() {
            // Grown by hand to exactly the reserved capacity (`reserve` may round it up).
            let mut grown =
                BytesMut::with_capacity(usize::try_from(held.bytes()).unwrap_or(usize::MAX));
            grown.put(joined);
            joined = grown;
        }
        joined.put(data);
    }
    Ok(match first {
        Some(first) => first,
        None => joined.freeze(),
    })
}

fn parse_body(body: &[u8], form: bool) -> Result<Body<'_>, Rejection> {
    let parsed = if form {
        Body::from_form(body)
    } else {
        Body::from_json(body)
    };
    parsed.map_err(|err| match err {
        signature::BodyError::Malformed(reason) => Rejection::MalformedBody(reason),
        duplicate @ signature::BodyError::DuplicateKey(_) => {
            Rejection::DuplicateKey(duplicate.to_string())
        }
    })
}

fn partner_code<'b>(body: &'b Body<'_>) -> Result<&'b str, Rejection> {
    match body.get("partner_code") {
        None => Err(Rejection::MissingPartner("partner_code is missing".into())),
        Some(Value::Str(code)) if code.is_empty() => {
            Err(Rejection::MissingPartner("partner_code is empty".into()))
        }
        Some(Value::Str(code)) if is_partner_code(code) => Ok(code),
        Some(Value::Str(_)) => Err(Rejection::UnknownPartner),
        Some(_) => Err(Rejection::MissingPartner(
            "partner_code must be a string".into(),
        )),
    }
}

fn duplicate_response() -> Response<ProxyBody> {
    let mut response = Response::new(full(r#"{"status":"duplicate"}"#));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        HeaderName::from_static("x-lfguard-duplicate"),
        HeaderValue::from_static("true"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            content_kind(&headers)
        };
        assert_eq!(with("application/json"), Ok(false));
        assert_eq!(with("Application/JSON; charset=UTF-8"), Ok(false));
        assert_eq!(with("application/x-www-form-urlencoded"), Ok(true));
        assert_eq!(
            with("application/json; charset=gbk"),
            Err(Rejection::UnsupportedMediaType)
        );
        assert_eq!(with("text/plain"), Err(Rejection::UnsupportedMediaType));
        assert_eq!(
            content_kind(&HeaderMap::new()),
            Err(Rejection::UnsupportedMediaType)
        );
    }

    #[test]
    fn passthrough_prefixes_match_whole_segments() {
        assert!(under_prefix("/health", "/health"));
        assert!(under_prefix("/health/live", "/health"));
        assert!(!under_prefix("/healthx", "/health"));
        assert!(under_prefix("/static/x", "/static/"));
    }

    #[tokio::test]
    async fn a_dropped_delivery_goes_on_in_a_task_of_its_own() {
        assert_eq!(Detached::new(async { 7 }).await, 7);
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let mut delivery = Box::pin(Detached::new(async move {
            let _ = wait.await;
            let _ = done.send(());
        }));
        // Started, then dropped half-way, as when hyper drops a request's future.
        let started = tokio::time::timeout(Duration::from_millis(20), &mut delivery).await;
        assert!(started.is_err());
        drop(delivery);
        go.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .expect("the delivery finished")
            .expect("and reported it");
    }

    /// Paths a pass-through route may forward unverified, and those it must not.
    #[test]
    fn clean_paths() {
        let table = [
            ("/health", true),
            ("/health/live", true),
            ("/health/live.json", true),
            ("/health/...x", true),
            ("/health/a%20b", true),
            ("/health/%41%7e", true),
            ("/health/x-y_z~1", true),
            // dot segments, raw or behind encodings
            ("/health/../callback", false),
            ("/health/./x", false),
            ("/health/..", false),
            ("/health/.", false),
            ("/health/%2e%2e/callback", false),
            ("/health/%2E./x", false),
            ("/health/.%2e/x", false),
            ("/health%2f..%2fcallback", false),
            ("/health\\..\\callback", false),
            // path parameters (Tomcat/Spring: /health/..;/admin is /admin)
            ("/health/..;/admin", false),
            ("/health;jsessionid=1", false),
            ("/health/%3b/admin", false),
            ("/health/%3B", false),
            // encoded separators
            ("/health%2Fadmin", false),
            ("/health%5cadmin", false),
            ("/health%5C..%5Cadmin", false),
            ("/health\\admin", false),
            // double encoding
            ("/health/%252e%252e/admin", false),
            ("/health/%25", false),
            ("/health/100%", false),
            ("/health/%2", false),
            ("/health/%zz", false),
            ("/health/%+f", false),
            // NUL, controls, non-ASCII
            ("/health/%00", false),
            ("/health/%0a", false),
            ("/health/%7f", false),
            ("/health/%c3%a9", false),
            ("/health/\u{e9}", false),
        ];
        for (path, clean) in table {
            assert_eq!(is_clean_path(path), clean, "{path}");
        }
    }

    #[test]
    fn own_and_protected_header_names() {
        for (name, own) in [
            ("x-lfguard-verified", true),
            ("x_lfguard_verified", true),
            ("x-lfguard_key-id", true),
            ("X_LFGUARD_PARTNER_CODE", true),
            ("x-lfguard", false),
            ("x-lfguardverified", false),
            ("x-lf-md5", false),
        ] {
            assert_eq!(
                name_starts_with(name.as_bytes(), OWN_HEADER_PREFIX),
                own,
                "{name}"
            );
        }
        for (name, protected) in [
            ("Host", true),
            ("content-type", true),
            ("Content_Length", true),
            ("transfer-encoding", true),
            ("x-lf-md5", true),
            ("X_LF_DELIVERY", true),
            ("x-lfguard-verified", true),
            ("x_lfguard_anything", true),
            ("keep-alive", false),
            ("close", false),
            ("upgrade", false),
            ("x-drop-me", false),
            ("x-lfx", false),
            ("hostname", false),
        ] {
            assert_eq!(is_protected(name.as_bytes()), protected, "{name}");
        }
    }
}
