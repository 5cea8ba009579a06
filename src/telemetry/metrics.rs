//! Prometheus metrics in the Prometheus text format. The partner label is only ever a
//! configured partner code (or `other`), so a flood of random partner codes cannot grow the
//! series count. On Linux the standard `process_*` series (resident memory, CPU seconds, open
//! and max file descriptors, start time, threads) come from the prometheus crate's collector.

use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder, exponential_buckets,
};

/// The figures `render` reads at scrape time from the parts that own them (the body budget, the
/// listeners, the replay store), passed in as plain values.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures<'a> {
    pub buffered_body_bytes: u64,
    pub buffered_body_bytes_limit: u64,
    /// Per listener: its name, the connections open and the most it serves at once.
    pub listeners: &'a [(&'a str, usize, usize)],
    /// Memory store: (delivered, in flight) and capacity; `None` for a shared store.
    pub replay_entries: Option<((u64, u64), u64)>,
    pub replay_evictions: u64,
    pub replay_refused: u64,
    /// What the spool holds, when lfguard has one and it could be read.
    pub spool: Option<SpoolFigures>,
}

/// The spool's figures at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpoolFigures {
    /// Callbacks waiting for delivery.
    pub pending: u64,
    pub dead_letters: u64,
    pub bytes: u64,
    pub bytes_limit: u64,
    /// Seconds since the oldest waiting callback was accepted (0 when none waits).
    pub oldest_age_seconds: f64,
}

/// The label value for requests whose partner is missing or not configured.
pub const OTHER_PARTNER: &str = "other";

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: Histogram,
    upstream_duration: Histogram,
    replay_entries: IntGauge,
    replay_in_flight: IntGauge,
    replay_capacity: IntGauge,
    replay_evictions: IntCounter,
    replay_refused: IntCounter,
    secret_reloads: IntCounterVec,
    verifications: IntCounterVec,
    signature_variants: IntCounterVec,
    buffered_body_bytes: IntGauge,
    buffered_body_bytes_limit: IntGauge,
    connections: IntGaugeVec,
    connections_limit: IntGaugeVec,
    connections_shed: IntCounterVec,
    tls_certificate_expiry: IntGaugeVec,
    tls_handshake_failures: IntCounterVec,
    tls_certificate_reloads: IntCounterVec,
    spool_depth: IntGauge,
    spool_dead_letters: IntGauge,
    spool_bytes: IntGauge,
    spool_bytes_limit: IntGauge,
    spool_oldest_age: Gauge,
    spool_deliveries: IntCounterVec,
    spool_attempts: Histogram,
    spool_backend_up: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// 0.5 ms to ~16 s: a verification takes microseconds, a slow backend seconds.
fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.0005, 2.0, 16).expect("valid bucket parameters")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "lfguard_requests_total",
                "Requests by outcome code and partner",
            ),
            &["code", "partner"],
        )
        .expect("valid metric");
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "lfguard_request_duration_seconds",
                "Time from a request's arrival to its response headers",
            )
            .buckets(latency_buckets()),
        )
        .expect("valid metric");
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "lfguard_upstream_duration_seconds",
                "Time the backend took to answer",
            )
            .buckets(latency_buckets()),
        )
        .expect("valid metric");
        let replay_entries = IntGauge::new(
            "lfguard_replay_entries",
            "Delivered keys held by the memory replay store",
        )
        .expect("valid metric");
        let replay_in_flight = IntGauge::new(
            "lfguard_replay_in_flight",
            "Claims in flight held by the memory replay store",
        )
        .expect("valid metric");
        let replay_capacity = IntGauge::new(
            "lfguard_replay_capacity",
            "replay.capacity: delivered keys the memory store remembers, and claims it holds",
        )
        .expect("valid metric");
        let replay_evictions = IntCounter::new(
            "lfguard_replay_evictions_total",
            "Delivered keys dropped for capacity before their window ended",
        )
        .expect("valid metric");
        let replay_refused = IntCounter::new(
            "lfguard_replay_claims_refused_total",
            "Claims refused (503) because replay.capacity claims were in flight",
        )
        .expect("valid metric");
        let secret_reloads = IntCounterVec::new(
            Opts::new("lfguard_secret_reloads_total", "Secret reloads by result"),
            &["result"],
        )
        .expect("valid metric");
        let verifications = IntCounterVec::new(
            Opts::new(
                "lfguard_verifications_total",
                "Verification results (valid, or the failed check's code) by partner and mode",
            ),
            &["partner", "result", "mode"],
        )
        .expect("valid metric");
        let signature_variants = IntCounterVec::new(
            Opts::new(
                "lfguard_signature_variants_total",
                "Signature mismatches that a documented variant (named by its settings) would accept",
            ),
            &["partner", "variant"],
        )
        .expect("valid metric");
        let buffered_body_bytes = IntGauge::new(
            "lfguard_buffered_body_bytes",
            "Bytes of request bodies being buffered (counted against server.max_buffered_bytes)",
        )
        .expect("valid metric");
        let buffered_body_bytes_limit = IntGauge::new(
            "lfguard_buffered_body_bytes_limit",
            "server.max_buffered_bytes: past it requests are refused with 503 overloaded",
        )
        .expect("valid metric");
        let connections = IntGaugeVec::new(
            Opts::new(
                "lfguard_connections",
                "Connections being served, by listener",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let connections_limit = IntGaugeVec::new(
            Opts::new(
                "lfguard_connections_limit",
                "The connection cap of each listener (server.max_connections, server.admin_max_connections)",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let connections_shed = IntCounterVec::new(
            Opts::new(
                "lfguard_connections_shed_total",
                "Idle connections closed at the connection cap to make room for a new one",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let tls_certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "lfguard_tls_certificate_expiry_timestamp_seconds",
                "When a certificate in use expires (Unix time), by role: listener (the proxy port's), \
                 upstream (the backend's, as last presented), upstream_client (lfguard's to the backend)",
            ),
            &["role"],
        )
        .expect("valid metric");
        let tls_handshake_failures = IntCounterVec::new(
            Opts::new(
                "lfguard_tls_handshake_failures_total",
                "Failed TLS handshakes by role (listener, upstream) and reason",
            ),
            &["role", "reason"],
        )
        .expect("valid metric");
        let tls_certificate_reloads = IntCounterVec::new(
            Opts::new(
                "lfguard_tls_certificate_reloads_total",
                "Certificates re-read after their files changed, by role and result (a failure keeps the one in use)",
            ),
            &["role", "result"],
        )
        .expect("valid metric");
        let spool_depth = IntGauge::new(
            "lfguard_spool_depth",
            "Spooled callbacks waiting for delivery to the backend",
        )
        .expect("valid metric");
        let spool_dead_letters = IntGauge::new(
            "lfguard_spool_dead_letters",
            "Spooled callbacks given up on (dead letters), kept until retried or dropped",
        )
        .expect("valid metric");
        let spool_bytes = IntGauge::new(
            "lfguard_spool_bytes",
            "Bytes the spool holds (waiting callbacks and dead letters)",
        )
        .expect("valid metric");
        let spool_bytes_limit = IntGauge::new(
            "lfguard_spool_bytes_limit",
            "delivery.max_spool_bytes: past it callbacks to spool are refused with 503 spool_full",
        )
        .expect("valid metric");
        let spool_oldest_age = Gauge::new(
            "lfguard_spool_oldest_age_seconds",
            "Age of the oldest spooled callback waiting for delivery (0 when none waits)",
        )
        .expect("valid metric");
        let spool_deliveries = IntCounterVec::new(
            Opts::new(
                "lfguard_spool_deliveries_total",
                "Delivery attempts of spooled callbacks by result (delivered, retried, dead_lettered)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let spool_attempts = Histogram::with_opts(
            HistogramOpts::new(
                "lfguard_spool_delivery_attempts",
                "Attempts a spooled callback took, counted when it was delivered or dead-lettered",
            )
            .buckets(vec![1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0]),
        )
        .expect("valid metric");
        let spool_backend_up = IntGauge::new(
            "lfguard_spool_backend_up",
            "1 when the last delivery of a spooled callback found the backend answering, else 0",
        )
        .expect("valid metric");
        for result in ["delivered", "retried", "dead_lettered"] {
            spool_deliveries.with_label_values(&[result]);
        }
        let build_info = IntGaugeVec::new(
            Opts::new("lfguard_build_info", "The running lfguard version"),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for result in ["success", "failure"] {
            secret_reloads.with_label_values(&[result]);
        }
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(replay_entries.clone()),
            Box::new(replay_in_flight.clone()),
            Box::new(replay_capacity.clone()),
            Box::new(replay_evictions.clone()),
            Box::new(replay_refused.clone()),
            Box::new(secret_reloads.clone()),
            Box::new(verifications.clone()),
            Box::new(signature_variants.clone()),
            Box::new(buffered_body_bytes.clone()),
            Box::new(buffered_body_bytes_limit.clone()),
            Box::new(connections.clone()),
            Box::new(connections_limit.clone()),
            Box::new(connections_shed.clone()),
            Box::new(tls_certificate_expiry.clone()),
            Box::new(tls_handshake_failures.clone()),
            Box::new(tls_certificate_reloads.clone()),
            Box::new(spool_depth.clone()),
            Box::new(spool_dead_letters.clone()),
            Box::new(spool_bytes.clone()),
            Box::new(spool_bytes_limit.clone()),
            Box::new(spool_oldest_age.clone()),
            Box::new(spool_deliveries.clone()),
            Box::new(spool_attempts.clone()),
            Box::new(spool_backend_up.clone()),
            Box::new(build_info),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        // Read from /proc at scrape time, so the usual process dashboards and alerts work.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metric names are unique");
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            replay_entries,
            replay_in_flight,
            replay_capacity,
            replay_evictions,
            replay_refused,
            secret_reloads,
            verifications,
            signature_variants,
            buffered_body_bytes,
            buffered_body_bytes_limit,
            connections,
            connections_limit,
            connections_shed,
            tls_certificate_expiry,
            tls_handshake_failures,
            tls_certificate_reloads,
            spool_depth,
            spool_dead_letters,
            spool_bytes,
            spool_bytes_limit,
            spool_oldest_age,
            spool_deliveries,
            spool_attempts,
            spool_backend_up,
        }
    }

    /// A role (`listener`, `upstream`, `upstream_client`) uses a certificate expiring at `unix`.
    pub fn tls_certificate_expiry(&self, role: &str, unix: i64) {
        self.tls_certificate_expiry
            .with_label_values(&[role])
            .set(unix);
    }

    /// A TLS handshake of `role` (`listener`, `upstream`) failed for `reason`.
    pub fn tls_handshake_failure(&self, role: &str, reason: &str) {
        self.tls_handshake_failures
            .with_label_values(&[role, reason])
            .inc();
    }

    /// A role's certificate files changed and were re-read: `ok` when the new ones are in use.
    pub fn tls_certificate_reload(&self, role: &str, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.tls_certificate_reloads
            .with_label_values(&[role, result])
            .inc();
    }

    /// Shows a role's reload counters at 0 from the start, so that an alert on failures has a
    /// series to compare against.
    pub fn tls_reloads_start(&self, role: &str) {
        for result in ["success", "failure"] {
            self.tls_certificate_reloads
                .with_label_values(&[role, result]);
        }
    }

    /// One delivery attempt of a spooled callback: `result` is `delivered`, `retried` or
    /// `dead_lettered`; `attempts` the attempts it took, once it left the queue.
    pub fn spool_delivery(&self, result: &str, attempts: Option<u32>) {
        self.spool_deliveries.with_label_values(&[result]).inc();
        if let Some(attempts) = attempts {
            self.spool_attempts.observe(f64::from(attempts));
        }
    }

    pub fn spool_backend(&self, up: bool) {
        self.spool_backend_up.set(i64::from(up));
    }

    /// The seconds one exchange with the backend took (a delivery of a spooled callback).
    pub fn observe_upstream(&self, seconds: f64) {
        self.upstream_duration.observe(seconds);
    }

    /// The counter of connections a listener closed to make room (`Connections` increments it).
    pub fn connections_shed(&self, listener: &str) -> IntCounter {
        self.connections_shed.with_label_values(&[listener])
    }

    /// `partner` must already be a configured partner code, or `None`.
    pub fn verification(&self, partner: Option<&str>, result: &str, mode: &str) {
        self.verifications
            .with_label_values(&[partner.unwrap_or(OTHER_PARTNER), result, mode])
            .inc();
    }

    /// `partner` is a configured partner code (a variant is only found with its secrets).
    pub fn signature_variant(&self, partner: &str, variant: &str) {
        self.signature_variants
            .with_label_values(&[partner, variant])
            .inc();
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
            .with_label_values(&[code, partner.unwrap_or(OTHER_PARTNER)])
            .inc();
        self.request_duration.observe(elapsed.as_secs_f64());
        if let Some(seconds) = upstream_seconds {
            self.upstream_duration.observe(seconds);
        }
    }

    pub fn secret_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.secret_reloads.with_label_values(&[result]).inc();
    }

    /// The text exposition, with the store's, the body budget's and the listeners' figures read
    /// at scrape time.
    pub fn render(&self, figures: &Figures<'_>) -> String {
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.buffered_body_bytes
            .set(gauge(figures.buffered_body_bytes));
        self.buffered_body_bytes_limit
            .set(gauge(figures.buffered_body_bytes_limit));
        for &(listener, open, cap) in figures.listeners {
            self.connections
                .with_label_values(&[listener])
                .set(gauge(open as u64));
            self.connections_limit
                .with_label_values(&[listener])
                .set(gauge(cap as u64));
        }
        if let Some(((delivered, in_flight), capacity)) = figures.replay_entries {
            self.replay_entries.set(gauge(delivered));
            self.replay_in_flight.set(gauge(in_flight));
            self.replay_capacity.set(gauge(capacity));
        }
        if let Some(spool) = figures.spool {
            self.spool_depth.set(gauge(spool.pending));
            self.spool_dead_letters.set(gauge(spool.dead_letters));
            self.spool_bytes.set(gauge(spool.bytes));
            self.spool_bytes_limit.set(gauge(spool.bytes_limit));
            self.spool_oldest_age.set(spool.oldest_age_seconds);
        }
        for (counter, total) in [
            (&self.replay_evictions, figures.replay_evictions),
            (&self.replay_refused, figures.replay_refused),
        ] {
            let counted = counter.get();
            if total > counted {
                counter.inc_by(total - counted);
            }
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to memory cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
