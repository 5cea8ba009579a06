//! The delivery worker: hands spooled callbacks to the backend, each exactly as it would have been
//! forwarded (method, path, headers and body as `Proxy::upstream_request` made them) plus
//! `x-lfguard-attempt: N` and the stable `x-lfguard-spool-id`.
//!
//! Each partner's callbacks go in arrival order: only a partner's oldest waiting callback is
//! tried, and only one at a time, so a partner waits behind its own failing callback until it is
//! delivered or dead-lettered, never behind another partner's. Partners go in parallel, at most
//! `delivery.concurrency` at once. A failed attempt (non-2xx, timeout, unreachable) is retried
//! after an exponential backoff with jitter (`DeliveryConfig::after_failure`) until the callback
//! is older than `delivery.max_age` or had `delivery.max_attempts`; a status in
//! `delivery.final_statuses` dead-letters it at once.
//!
//! The backend's state is logged when it changes (down, up again), not per attempt. When it
//! comes back, every waiting callback is made due at once rather than at the end of its backoff.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Version};
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::proxy::delivery::{SPOOL_ID, exchange};
use crate::proxy::upstream::Upstream;
use crate::state::spool::{
    Backend, DeliveryConfig, Next, Outcome, RetrySet, Spool, SpoolStore, Spooled, now_ms,
};
use crate::telemetry::metrics::Metrics;

const ATTEMPT: HeaderName = HeaderName::from_static("x-lfguard-attempt");

/// The longest the worker sleeps without looking at the spool: it also picks up what
/// `lfguard spool retry` changed, and a store that could not be opened.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

pub struct Worker {
    spool: Arc<Spool>,
    upstream: Arc<Upstream>,
    /// `upstream.timeout`: the same limit as a forwarded callback's.
    timeout: Duration,
    config: DeliveryConfig,
    metrics: Arc<Metrics>,
}

/// How one attempt ended, before the retry policy decides what follows.
enum Attempt {
    Delivered,
    /// The backend answered with this status.
    Refused(u16),
    /// No answer: unreachable, or not within `upstream.timeout`.
    Failed(String),
    /// What is stored cannot be sent (an unreadable header or method): dead at once.
    Unsendable(String),
}

impl Worker {
    pub fn new(
        spool: Arc<Spool>,
        upstream: Arc<Upstream>,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let config = spool.config().clone();
        Worker {
            spool,
            upstream,
            timeout,
            config,
            metrics,
        }
    }

    /// Delivers until `stop` turns true. Then starts nothing more, gives the deliveries in
    /// progress `grace` to finish, and returns; what was not delivered stays spooled for the
    /// next start.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>, grace: Duration) {
        let mut in_flight: JoinSet<()> = JoinSet::new();
        // The partner each delivery in progress is for: a partner has one at a time.
        let mut partners: HashMap<tokio::task::Id, String> = HashMap::new();
        loop {
            let mut wait = POLL_INTERVAL;
            if let Some((store, heads)) = self.heads().await {
                let now = now_ms();
                let busy: HashSet<&String> = partners.values().collect();
                let mut start = Vec::new();
                for head in heads {
                    if busy.contains(&head.callback.partner) {
                        continue;
                    }
                    if head.next_attempt_ms > now {
                        let until = Duration::from_millis((head.next_attempt_ms - now) as u64);
                        wait = wait.min(until);
                        continue;
                    }
                    if in_flight.len() + start.len() < self.config.concurrency {
                        start.push(head);
                    }
                }
                for head in start {
                    let partner = head.callback.partner.clone();
                    let worker = self.clone();
                    let store = store.clone();
                    let task = in_flight.spawn(async move { worker.deliver(&store, head).await });
                    partners.insert(task.id(), partner);
                }
            }
            tokio::select! {
                done = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                    let id = match done {
                        Some(Ok((id, ()))) => Some(id),
                        Some(Err(err)) => {
                            tracing::error!(error = %err, "a delivery failed unexpectedly; its callback stays spooled");
                            Some(err.id())
                        }
                        None => None,
                    };
                    if let Some(id) = id {
                        partners.remove(&id);
                    }
                }
                () = self.spool.accepted.notified() => {}
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
        if !in_flight.is_empty() {
            self.finish(in_flight, grace).await;
        }
        // Another replica may take over this one's partners at once (Redis).
        if let Ok(store) = self.spool.store() {
            store.let_go().await;
        }
    }

    /// At shutdown: the deliveries in progress get `grace` to finish; those still running then
    /// are dropped, and their callbacks stay spooled.
    async fn finish(&self, mut in_flight: JoinSet<()>, grace: Duration) {
        tracing::info!(
            deliveries = in_flight.len(),
            "waiting for deliveries in progress"
        );
        let finished = tokio::time::timeout(grace, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                deliveries = in_flight.len(),
                "shutdown grace ended with deliveries in progress; their callbacks stay spooled and are delivered again after the restart"
            );
            in_flight.abort_all();
        }
    }

    /// The open store and each partner's oldest waiting callback; `None` (logged once per
    /// error) when the store cannot be read.
    async fn heads(&self) -> Option<(Arc<SpoolStore>, Vec<Spooled>)> {
        let heads = match self.spool.store() {
            Ok(store) => store.heads().await.map(|heads| (store, heads)),
            Err(err) => Err(err),
        };
        match heads {
            Ok(heads) => Some(heads),
            Err(err) => {
                tracing::warn!(error = %err, "the spool cannot be read; delivery waits");
                None
            }
        }
    }

    /// One attempt at one callback, and its outcome recorded.
    async fn deliver(&self, store: &SpoolStore, spooled: Spooled) {
        let attempt = spooled.attempts + 1;
        let result = match self.request(&spooled, attempt) {
            Ok(request) => self.send(request).await,
            Err(why) => Attempt::Unsendable(why),
        };
        let now = now_ms();
        let outcome = match result {
            Attempt::Delivered => {
                self.backend(Backend::Up, "", store).await;
                Outcome::Delivered
            }
            Attempt::Refused(status) => {
                let error = format!("the backend answered {status}");
                let state = if status >= 500 {
                    Backend::Down
                } else {
                    Backend::Up
                };
                self.backend(state, &error, store).await;
                self.after_failure(&spooled, attempt, now, Some(status), error)
            }
            Attempt::Failed(error) => {
                self.backend(Backend::Down, &error, store).await;
                self.after_failure(&spooled, attempt, now, None, error)
            }
            Attempt::Unsendable(error) => Outcome::Dead { error },
        };
        let result = match &outcome {
            Outcome::Delivered => "delivered",
            Outcome::Retry { .. } => "retried",
            Outcome::Dead { error } => {
                tracing::warn!(
                    spool_id = %spooled.id,
                    partner = %spooled.callback.partner,
                    attempts = attempt,
                    error = %error,
                    "callback dead-lettered; `lfguard spool retry` sends it again"
                );
                "dead_lettered"
            }
        };
        let ended = !matches!(outcome, Outcome::Retry { .. });
        self.metrics
            .spool_delivery(result, ended.then_some(attempt));
        if let Err(err) = store.record(&spooled, outcome, now).await {
            // Not recorded: the callback is tried again, and may reach the backend twice (with
            // the same spool id).
            tracing::warn!(spool_id = %spooled.id, error = %err, "could not record a delivery attempt");
        }
    }

    fn after_failure(
        &self,
        spooled: &Spooled,
        attempt: u32,
        now: i64,
        status: Option<u16>,
        error: String,
    ) -> Outcome {
        match self
            .config
            .after_failure(attempt, spooled.received_ms, now, status, jitter())
        {
            Next::Retry { at_ms } => Outcome::Retry { at_ms, error },
            Next::Dead => Outcome::Dead { error },
        }
    }

    /// The request as it was stored, to the backend's current address, with the attempt number
    /// and the spool id.
    fn request(&self, spooled: &Spooled, attempt: u32) -> Result<Request<Full<Bytes>>, String> {
        let callback = &spooled.callback;
        let method = Method::from_str(&callback.method)
            .map_err(|_| format!("stored method {:?} is not valid", callback.method))?;
        let target = PathAndQuery::from_str(&callback.target)
            .map_err(|_| format!("stored path {:?} is not valid", callback.target))?;
        let mut request = Request::new(Full::new(callback.body.clone()));
        *request.method_mut() = method;
        *request.uri_mut() = self.upstream.target().uri_for(Some(&target));
        *request.version_mut() = Version::HTTP_11;
        let headers = request.headers_mut();
        for (name, value) in &callback.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("stored header name {name:?} is not valid"))?;
            let value = HeaderValue::from_maybe_shared(value.clone())
                .map_err(|_| format!("stored value of {name} is not valid"))?;
            headers.append(name, value);
        }
        headers.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from(callback.body.len()),
        );
        headers.insert(ATTEMPT, HeaderValue::from(attempt));
        let id = HeaderValue::from_str(&spooled.id)
            .map_err(|_| format!("stored id {:?} is not valid", spooled.id))?;
        headers.insert(SPOOL_ID, id);
        Ok(request)
    }

    /// Sends within `upstream.timeout` and reads the answer to its end (so the connection is
    /// kept for the next one). A 2xx head is a delivery, whatever happens to its body.
    async fn send(&self, request: Request<Full<Bytes>>) -> Attempt {
        let (result, seconds) = exchange(&self.upstream, self.timeout, request).await;
        self.metrics.observe_upstream(seconds);
        match result {
            Ok(response) => {
                let status = response.status();
                let _ = response.into_body().collect().await;
                if status.is_success() {
                    Attempt::Delivered
                } else {
                    Attempt::Refused(status.as_u16())
                }
            }
            Err(rejection) => Attempt::Failed(rejection.detail()),
        }
    }

    /// Logs the backend's state when it changes. Back up: every waiting callback is due now.
    async fn backend(&self, state: Backend, error: &str, store: &SpoolStore) {
        let before = self.spool.set_backend(state);
        self.metrics.spool_backend(state == Backend::Up);
        match (before, state) {
            (Backend::Up | Backend::Unknown, Backend::Down) => tracing::warn!(
                error,
                "backend down: spooled callbacks wait until it answers"
            ),
            (Backend::Down, Backend::Up) => {
                tracing::info!("backend up again: delivering spooled callbacks");
                if let Err(err) = store.retry(RetrySet::Pending, now_ms()).await {
                    tracing::warn!(error = %err, "could not make the waiting callbacks due");
                }
            }
            (Backend::Unknown, Backend::Up)
            | (Backend::Up, Backend::Up)
            | (Backend::Down, Backend::Down)
            | (_, Backend::Unknown) => {}
        }
    }
}

/// A factor from 0.5 to 1.0 for the backoff, so that callbacks that failed together are not all
/// retried at the same moment.
fn jitter() -> f64 {
    let random = getrandom::u32().unwrap_or(u32::MAX / 2);
    0.5 + f64::from(random) / f64::from(u32::MAX) / 2.0
}
