//! Prometheus metrics (SPEC §8). The partner label is only ever a configured partner code (or
//! `other`), so a flood of random partner codes cannot grow the series count.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::replay::AnyStore;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    code: &'static str,
    partner: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Histogram,
    upstream_duration: Histogram,
    replay_entries: Gauge,
    replay_evictions: Counter,
    secret_reloads: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lfguard");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by outcome code and partner",
            requests.clone(),
        );
        // 0.5 ms to ~16 s: a verification is microseconds, a slow backend seconds.
        let request_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers",
            request_duration.clone(),
        );
        let upstream_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "upstream_duration_seconds",
            "Time the backend took to answer",
            upstream_duration.clone(),
        );
        let replay_entries = Gauge::default();
        registry.register(
            "replay_entries",
            "Keys held by the memory replay store",
            replay_entries.clone(),
        );
        let replay_evictions = Counter::default();
        registry.register(
            "replay_evictions",
            "Replay keys dropped for capacity before their window ended",
            replay_evictions.clone(),
        );
        let secret_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "secret_reloads",
            "Secret reloads by result",
            secret_reloads.clone(),
        );
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "lfguard version", build_info);
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            replay_entries,
            replay_evictions,
            secret_reloads,
        }
    }

    /// `partner` must already be a configured partner code, or `None`.
    pub fn observe_request(
        &self,
        code: &'static str,
        partner: Option<&str>,
        elapsed: Duration,
        upstream_seconds: Option<f64>,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                code,
                partner: partner.unwrap_or("other").to_string(),
            })
            .inc();
        self.request_duration.observe(elapsed.as_secs_f64());
        if let Some(seconds) = upstream_seconds {
            self.upstream_duration.observe(seconds);
        }
    }

    pub fn secret_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.secret_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The text exposition, with the store's gauges read at scrape time.
    pub fn render(&self, store: &AnyStore) -> String {
        if let Some(entries) = store.entries() {
            self.replay_entries
                .set(i64::try_from(entries).unwrap_or(i64::MAX));
        }
        let evictions = store.evictions();
        let counted = self.replay_evictions.get();
        if evictions > counted {
            self.replay_evictions.inc_by(evictions - counted);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
