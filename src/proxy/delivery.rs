//! Delivery: the replay claim, the request to the backend, the exchange, and the settling of the
//! claim, run to the end even when the client goes away (`Detached`); or, in spool mode, the
//! callback written to the spool and the claim settled once it is on disk.

use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};

use super::Proxy;
use crate::proxy::body::{ProxyBody, full};
use crate::proxy::error::Rejection;
use crate::proxy::headers::{
    DELIVERY_HEADER, DELIVERY_ID, FAILURE, KEY_ID, OWN_HEADER_PREFIX, PARTNER_CODE, VERIFIED,
    X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, insert, name_starts_with,
    strip_hop_by_hop,
};
use crate::proxy::peer::Peer;
use crate::proxy::record::RequestLog;
use crate::proxy::routes::RouteConfig;
use crate::proxy::upstream::{Deadline, Upstream};
use crate::state::replay::{self, Claim, ClaimGuard, Store};
use crate::state::secrets::Partner;
use crate::state::spool::{DeliveryMode, NewCallback, SpoolError};

/// The header of the spooled-callback answer, and of each delivery of a spooled callback.
pub(super) const SPOOL_ID: HeaderName = HeaderName::from_static("x-lfguard-spool-id");

/// Time an in-flight claim outlives the upstream timeout, so a claim never expires while its
/// request may still be delivered.
const CLAIM_MARGIN: Duration = Duration::from_secs(5);

impl Proxy {
    /// `Err(Replay)` for a copy of a delivered callback, `Err(InFlight)` while another copy is
    /// being forwarded.
    pub(super) async fn claim(&self, replay_key: replay::Key) -> Result<ClaimGuard, Rejection> {
        let in_flight = self.settings.upstream.timeout + CLAIM_MARGIN;
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
    pub(super) fn upstream_request(
        &self,
        mut parts: Parts,
        body: Bytes,
        peer: &Peer,
        verification: Option<&RequestLog>,
    ) -> Request<Full<Bytes>> {
        let headers = &mut parts.headers;
        // Room for the headers added below at once: the map would otherwise grow (and rehash)
        // as they are added one by one.
        headers.reserve(7);
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
        let proto = if self.settings.https { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
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
            if let Some(partner) = &facts.partner {
                insert(headers, PARTNER_CODE, partner);
            }
            if let Some(key_id) = &facts.key_id {
                headers.insert(KEY_ID, key_id.clone());
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
    pub(super) async fn send_upstream(
        &self,
        request: Request<Full<Bytes>>,
        log: &mut RequestLog,
    ) -> Result<Response<ProxyBody>, Rejection> {
        let (result, seconds) =
            exchange(&self.upstream, self.settings.upstream.timeout, request).await;
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
    pub(super) async fn deliver(
        &self,
        request: Request<Full<Bytes>>,
        guard: ClaimGuard,
        log: &mut RequestLog,
    ) -> Result<Response<ProxyBody>, Rejection> {
        let upstream = self.upstream.clone();
        let timeout = self.settings.upstream.timeout;
        let window = self.settings.replay.window;
        log.delivering = true;
        let (result, seconds) = Detached::new(async move {
            let (result, seconds) = exchange(&upstream, timeout, request).await;
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
        })
        .await;
        log.upstream_seconds = Some(seconds);
        result
    }
}

impl Proxy {
    /// How this callback reaches the backend: its route's `delivery`, else its partner's, else
    /// `delivery.mode`.
    pub(super) fn delivery_mode(
        &self,
        route: Option<&RouteConfig>,
        partner: Option<&Partner>,
    ) -> DeliveryMode {
        route
            .and_then(|route| route.delivery)
            .or_else(|| partner.and_then(|partner| partner.delivery))
            .unwrap_or(self.settings.delivery.mode)
    }

    /// Spool mode: writes the callback, as it would be forwarded, to the spool, and answers
    /// `200 {"status":"accepted"}` once it is on disk. Its replay claim is settled as delivered
    /// then (the callback is lfguard's to deliver; a copy is a duplicate). If the spool cannot
    /// take it, the claim is released and the sender gets 503: nothing was acknowledged. The
    /// write and the settling run to the end even if the sender hangs up (`Detached`), so that an
    /// accepted callback always has its claim settled.
    pub(super) async fn spool(
        &self,
        parts: Parts,
        body: Bytes,
        peer: &Peer,
        guard: ClaimGuard,
        log: &mut RequestLog,
    ) -> Result<Response<ProxyBody>, Rejection> {
        let Some(spool) = self.spool.clone() else {
            return Err(Rejection::SpoolUnavailable(
                "delivery.spool_dir is not set".into(),
            ));
        };
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |target| target.as_str())
            .to_string();
        let request = self.upstream_request(parts, body.clone(), peer, Some(log));
        let callback = NewCallback {
            partner: log.partner.clone().unwrap_or_default(),
            method: request.method().as_str().to_string(),
            target,
            headers: request
                .headers()
                .iter()
                .filter(|(name, _)| *name != header::CONTENT_LENGTH)
                .map(|(name, value)| {
                    (
                        name.as_str().to_string(),
                        Bytes::copy_from_slice(value.as_bytes()),
                    )
                })
                .collect(),
            body,
        };
        let window = self.settings.replay.window;
        let accepted = Detached::new(async move {
            let accepted = spool.accept(callback).await;
            let settled = match &accepted {
                Ok(_) => guard.settle(window).await,
                Err(_) => guard.release().await,
            };
            if let Err(err) = settled {
                tracing::warn!(error = %err, spooled = accepted.is_ok(), "could not settle the replay claim");
            }
            accepted
        })
        .await;
        match accepted {
            Ok(id) => Ok(accepted_response(&id)),
            Err(SpoolError::Full) => Err(Rejection::SpoolFull),
            Err(SpoolError::Unavailable(why)) => Err(Rejection::SpoolUnavailable(why)),
        }
    }
}

/// A future that runs to completion even if dropped: dropped unfinished (hyper drops the
/// request's future when the client goes away), it is handed to a task of its own, which goes on
/// from where it was.
pub(super) struct Detached<F: Future + Send + 'static>(Option<Pin<Box<F>>>)
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
pub(super) async fn exchange(
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

pub(super) fn duplicate_response() -> Response<ProxyBody> {
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

fn accepted_response(id: &str) -> Response<ProxyBody> {
    let mut response = Response::new(full(r#"{"status":"accepted"}"#));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        HeaderName::from_static("x-lfguard-spooled"),
        HeaderValue::from_static("true"),
    );
    insert(headers, SPOOL_ID, id);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
