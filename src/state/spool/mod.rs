//! The spool: verified callbacks kept durably until the backend has taken them (`[delivery]`,
//! `mode = "spool"`). This module owns the `[delivery]` section, the retry policy (a plain
//! function of the attempts made and the time), and `Spool`, which opens the store in
//! `delivery.spool_dir` (SQLite, `sqlite`) and reopens it when it could not be opened. No HTTP
//! here: the proxy writes callbacks in, and its delivery worker (`proxy::worker`) takes them out.

pub mod redis;
pub mod sqlite;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::verify::duration::Short;

pub use self::redis::RedisSpool;
pub use self::sqlite::SqliteSpool;

/// How a verified callback reaches the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// Forwarded while the sender waits; the backend's answer is the sender's answer.
    #[default]
    Forward,
    /// Stored durably, answered `200 {"status":"accepted"}`, delivered by the worker.
    Spool,
}

impl DeliveryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMode::Forward => "forward",
            DeliveryMode::Spool => "spool",
        }
    }
}

/// Where spooled callbacks are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpoolStoreKind {
    /// An SQLite database in `delivery.spool_dir`.
    #[default]
    Sqlite,
    /// Redis Streams in the replay store's Redis (`replay.redis_url`), shared by replicas.
    Redis,
}

/// The `[delivery]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// The mode of callbacks whose route and partner set none.
    pub mode: DeliveryMode,
    pub store: SpoolStoreKind,
    /// The directory of the SQLite spool; required when anything spools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool_dir: Option<PathBuf>,
    /// Bytes the spool may hold (callbacks waiting and dead letters); past it, 503 `spool_full`.
    pub max_spool_bytes: u64,
    /// A callback not delivered this long after it was accepted becomes a dead letter.
    #[serde(with = "crate::verify::duration")]
    pub max_age: Duration,
    /// Attempts after which a callback becomes a dead letter; 0: no limit but `max_age`.
    pub max_attempts: u32,
    /// Backend statuses that dead-letter a callback at once (e.g. `[400, 422]`).
    pub final_statuses: Vec<u16>,
    /// The wait after the first failed attempt; it doubles with each failure.
    #[serde(with = "crate::verify::duration")]
    pub backoff_initial: Duration,
    /// The longest wait between two attempts.
    #[serde(with = "crate::verify::duration")]
    pub backoff_max: Duration,
    /// Deliveries in progress at once (each partner has at most one: arrival order).
    pub concurrency: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            mode: DeliveryMode::Forward,
            store: SpoolStoreKind::Sqlite,
            spool_dir: None,
            max_spool_bytes: 256 * 1024 * 1024,
            max_age: Duration::from_secs(72 * 3600),
            max_attempts: 0,
            final_statuses: Vec::new(),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            concurrency: 8,
        }
    }
}

impl DeliveryConfig {
    /// What serde cannot check, each problem naming its key. That `spool_dir` is set when a
    /// route or partner spools is checked where the sections meet (`config`).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (key, value) in [
            ("delivery.max_age", self.max_age),
            ("delivery.backoff_initial", self.backoff_initial),
            ("delivery.backoff_max", self.backoff_max),
        ] {
            if value.is_zero() {
                problems.push(format!("{key}: must be greater than 0"));
            }
        }
        if self.backoff_max < self.backoff_initial {
            problems.push(format!(
                "delivery.backoff_max: {} is shorter than delivery.backoff_initial ({})",
                Short(self.backoff_max),
                Short(self.backoff_initial)
            ));
        }
        if self.max_spool_bytes == 0 {
            problems.push("delivery.max_spool_bytes: must be greater than 0".into());
        }
        if self.concurrency == 0 {
            problems.push("delivery.concurrency: must be greater than 0".into());
        }
        for status in &self.final_statuses {
            if !(400..=599).contains(status) {
                problems.push(format!(
                    "delivery.final_statuses: {status} is not an error status (400 to 599)"
                ));
            }
        }
        if self.mode == DeliveryMode::Spool
            && self.store == SpoolStoreKind::Sqlite
            && self.spool_dir.is_none()
        {
            problems.push(
                "delivery.spool_dir: required when delivery.mode = \"spool\" (a directory that \
                 outlives the process, e.g. an emptyDir volume)"
                    .into(),
            );
        }
        problems
    }

    /// Whether lfguard has a spool: an SQLite one where `spool_dir` is set, a Redis one where
    /// `store = "redis"`.
    pub fn has_spool(&self) -> bool {
        match self.store {
            SpoolStoreKind::Sqlite => self.spool_dir.is_some(),
            SpoolStoreKind::Redis => true,
        }
    }

    /// What becomes of a callback whose attempt number `attempt` (from 1) failed at `now_ms`:
    /// a dead letter when `status` is final, when it was the last attempt allowed, or when the
    /// callback is older than `max_age`; otherwise a retry after the backoff for that attempt,
    /// scaled by `jitter` (from 0.5 to 1.0, drawn by the caller).
    pub fn after_failure(
        &self,
        attempt: u32,
        received_ms: i64,
        now_ms: i64,
        status: Option<u16>,
        jitter: f64,
    ) -> Next {
        if status.is_some_and(|status| self.final_statuses.contains(&status)) {
            return Next::Dead;
        }
        if self.max_attempts > 0 && attempt >= self.max_attempts {
            return Next::Dead;
        }
        let age = Duration::from_millis(u64::try_from(now_ms - received_ms).unwrap_or(0));
        if age >= self.max_age {
            return Next::Dead;
        }
        let doubled = self
            .backoff_initial
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(30));
        let wait = doubled
            .min(self.backoff_max)
            .mul_f64(jitter.clamp(0.5, 1.0));
        // Never past the moment the callback becomes too old to try.
        let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
        Next::Retry {
            at_ms: now_ms.saturating_add(wait_ms),
        }
    }
}

/// What the retry policy decided after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Retry { at_ms: i64 },
    Dead,
}

/// A callback to keep: the request as it will be sent to the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCallback {
    pub partner: String,
    pub method: String,
    /// The request's path and query as the sender sent them (the backend's base path is added
    /// when it is delivered, so a changed `upstream.url` applies).
    pub target: String,
    /// The headers as forwarded: end-to-end headers, the forwarding and verification headers.
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
}

impl NewCallback {
    /// The bytes it counts against `delivery.max_spool_bytes`.
    pub fn size(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.len() + 4)
            .sum();
        (ROW_OVERHEAD + self.partner.len() + self.method.len() + self.target.len())
            .saturating_add(headers)
            .saturating_add(self.body.len()) as u64
    }
}

/// What a row costs beyond its text and bytes (ids, times, counters, the index entry).
const ROW_OVERHEAD: usize = 128;

/// A spooled callback, as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spooled {
    /// Arrival order in the store (SQLite).
    pub seq: i64,
    /// Its stream entry (Redis).
    pub entry: Option<String>,
    /// Stable across attempts and restarts: the backend may deduplicate on it.
    pub id: String,
    pub callback: NewCallback,
    pub received_ms: i64,
    /// Attempts made and answered (or timed out) so far.
    pub attempts: u32,
    pub next_attempt_ms: i64,
    pub last_error: Option<String>,
    /// When it became a dead letter, if it did.
    pub dead_ms: Option<i64>,
}

/// How one attempt ended, recorded by `record`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The backend took it (2xx): the callback leaves the spool.
    Delivered,
    /// Another attempt at `at_ms`; `error` says why this one failed.
    Retry { at_ms: i64, error: String },
    /// A dead letter, kept for an operator (`lfguard spool retry` or `drop`).
    Dead { error: String },
}

/// The counts of one partner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PartnerCounts {
    pub pending: u64,
    pub dead: u64,
}

/// What the spool holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub pending: u64,
    pub dead: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// When the oldest callback still waiting was accepted (ms since the epoch).
    pub oldest_pending_ms: Option<i64>,
    pub partners: BTreeMap<String, PartnerCounts>,
}

/// Which callbacks `retry` makes due now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetrySet {
    /// One callback, waiting or dead, by its id.
    One(String),
    /// Every dead letter.
    Dead,
    /// Every callback waiting for its next attempt.
    Pending,
}

/// Why the spool did not take a callback. Either way nothing is acknowledged: the sender gets
/// 503 and retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolError {
    /// The store cannot be opened or written (directory, disk, database).
    Unavailable(String),
    /// It holds `delivery.max_spool_bytes`.
    Full,
}

impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpoolError::Unavailable(why) => f.write_str(why),
            SpoolError::Full => f.write_str("the spool holds delivery.max_spool_bytes"),
        }
    }
}

/// Milliseconds since the epoch, the spool's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

/// A new spool id: 32 hex digits, unique across processes (a random prefix drawn once) and
/// within one (a counter).
pub fn new_id() -> String {
    static PROCESS: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let process = PROCESS.get_or_init(|| {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("the OS random source is available");
        u64::from_le_bytes(bytes)
    });
    let sequence = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{process:016x}{sequence:016x}")
}

/// How often opening a store that failed to open is tried again, at most.
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// The store `delivery.store` names, opened.
pub enum SpoolStore {
    Sqlite(SqliteSpool),
    /// Boxed: its connection manager and scripts are ten times the size of an SQLite handle.
    Redis(Box<RedisSpool>),
}

impl SpoolStore {
    /// Where the callbacks are: the database file, or the Redis key prefix.
    pub fn describe(&self) -> String {
        match self {
            SpoolStore::Sqlite(store) => format!("sqlite ({})", store.path().display()),
            SpoolStore::Redis(store) => format!(
                "redis (keys {}*, consumer {})",
                store.prefix(),
                store.consumer()
            ),
        }
    }

    pub async fn accept(&self, callback: NewCallback, now_ms: i64) -> Result<String, SpoolError> {
        match self {
            SpoolStore::Sqlite(store) => store.accept(callback, now_ms).await,
            SpoolStore::Redis(store) => store.accept(callback, now_ms).await,
        }
    }

    /// The oldest waiting callback of each partner this process may deliver now (with Redis,
    /// those whose lease it holds).
    pub async fn heads(&self) -> Result<Vec<Spooled>, SpoolError> {
        match self {
            SpoolStore::Sqlite(store) => store.heads().await,
            SpoolStore::Redis(store) => store.heads().await,
        }
    }

    pub async fn record(
        &self,
        spooled: &Spooled,
        outcome: Outcome,
        now_ms: i64,
    ) -> Result<(), SpoolError> {
        match self {
            SpoolStore::Sqlite(store) => store.record(spooled.seq, outcome, now_ms).await,
            SpoolStore::Redis(store) => store.record(spooled, outcome, now_ms).await,
        }
    }

    pub async fn stats(&self) -> Result<Stats, SpoolError> {
        match self {
            SpoolStore::Sqlite(store) => store.stats().await,
            SpoolStore::Redis(store) => store.stats().await,
        }
    }

    pub async fn list(&self, limit: usize) -> Result<Vec<Spooled>, SpoolError> {
        match self {
            SpoolStore::Sqlite(store) => store.list(limit).await,
            SpoolStore::Redis(store) => store.list(limit).await,
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<Spooled>, SpoolError> {
        match self {
            SpoolStore::Sqlite(store) => store.get(id).await,
            SpoolStore::Redis(store) => store.get(id).await,
        }
    }

    pub async fn retry(&self, set: RetrySet, now_ms: i64) -> Result<u64, SpoolError> {
        match self {
            SpoolStore::Sqlite(store) => store.retry(set, now_ms).await,
            SpoolStore::Redis(store) => store.retry(set, now_ms).await,
        }
    }

    pub async fn drop_one(&self, id: &str) -> Result<bool, SpoolError> {
        match self {
            SpoolStore::Sqlite(store) => store.drop_one(id).await,
            SpoolStore::Redis(store) => store.drop_one(id).await,
        }
    }

    /// At shutdown: what this process holds for others to take over (Redis leases).
    pub async fn let_go(&self) {
        match self {
            SpoolStore::Sqlite(_) => {}
            SpoolStore::Redis(store) => store.release_leases().await,
        }
    }
}

/// Where the spool's store is, from the configuration: the `[delivery]` section, and for Redis
/// the replay store's `redis_url` and `key_prefix`.
#[derive(Debug, Clone)]
pub struct SpoolPlace {
    pub delivery: DeliveryConfig,
    pub redis_url: Option<String>,
    pub key_prefix: String,
}

impl SpoolPlace {
    /// Opens the store: SQLite creating its directory when `create`, else only if it exists
    /// (`lfguard spool` must not create one where lfguard never wrote).
    pub fn open(&self, create: bool) -> Result<SpoolStore, SpoolError> {
        match self.delivery.store {
            SpoolStoreKind::Sqlite => {
                let dir = self.delivery.spool_dir.as_deref().ok_or_else(|| {
                    SpoolError::Unavailable("delivery.spool_dir is not set".into())
                })?;
                let max_bytes = self.delivery.max_spool_bytes;
                let store = if create {
                    SqliteSpool::open(dir, max_bytes)?
                } else {
                    SqliteSpool::open_existing(dir, max_bytes)?
                };
                Ok(SpoolStore::Sqlite(store))
            }
            SpoolStoreKind::Redis => {
                let url = self
                    .redis_url
                    .as_deref()
                    .ok_or_else(|| SpoolError::Unavailable("replay.redis_url is not set".into()))?;
                Ok(SpoolStore::Redis(Box::new(RedisSpool::new(
                    url,
                    &self.key_prefix,
                    self.delivery.max_spool_bytes,
                )?)))
            }
        }
    }
}

/// The spool of a running lfguard: the store once it opened, and what wakes the delivery worker.
pub struct Spool {
    place: SpoolPlace,
    store: Mutex<Opened>,
    /// Notified when a callback is accepted, so the worker need not poll for it.
    pub accepted: Notify,
    /// What the last delivery attempt showed of the backend (`Backend` as a number).
    backend: AtomicU8,
}

/// The backend as the delivery worker last found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// No attempt was made yet.
    Unknown = 0,
    /// It answered the last attempt (with anything but a 5xx).
    Up = 1,
    /// The last attempt found it unreachable, silent or answering 5xx.
    Down = 2,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Unknown => "unknown",
            Backend::Up => "up",
            Backend::Down => "down",
        }
    }
}

struct Opened {
    store: Option<Arc<SpoolStore>>,
    tried: Option<Instant>,
    error: String,
}

impl Spool {
    /// Opens the store. One that cannot be opened now (an SQLite directory that cannot be
    /// created, a full disk) is tried again when a callback needs it; meanwhile spooled callbacks
    /// are refused with 503 and readiness fails. A Redis store connects on first use.
    pub fn new(place: SpoolPlace) -> Spool {
        let spool = Spool {
            place,
            store: Mutex::new(Opened {
                store: None,
                tried: None,
                error: String::new(),
            }),
            accepted: Notify::new(),
            backend: AtomicU8::new(Backend::Unknown as u8),
        };
        if let Err(err) = spool.store() {
            tracing::error!(error = %err, "the spool cannot be opened; spooled callbacks are refused with 503 until it can");
        }
        spool
    }

    pub fn config(&self) -> &DeliveryConfig {
        &self.place.delivery
    }

    pub fn kind(&self) -> &'static str {
        match self.place.delivery.store {
            SpoolStoreKind::Sqlite => "sqlite",
            SpoolStoreKind::Redis => "redis",
        }
    }

    /// The open store, opening it if it is not yet (at most once per `REOPEN_INTERVAL`).
    pub fn store(&self) -> Result<Arc<SpoolStore>, SpoolError> {
        let mut opened = self
            .store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(store) = &opened.store {
            return Ok(store.clone());
        }
        if opened
            .tried
            .is_some_and(|tried| tried.elapsed() < REOPEN_INTERVAL)
        {
            return Err(SpoolError::Unavailable(opened.error.clone()));
        }
        opened.tried = Some(Instant::now());
        match self.place.open(true) {
            Ok(store) => {
                let store = Arc::new(store);
                tracing::info!(store = %store.describe(), "spool open");
                opened.store = Some(store.clone());
                Ok(store)
            }
            Err(err) => {
                opened.error = err.to_string();
                Err(err)
            }
        }
    }

    pub fn backend(&self) -> Backend {
        match self.backend.load(Ordering::Relaxed) {
            1 => Backend::Up,
            2 => Backend::Down,
            _ => Backend::Unknown,
        }
    }

    /// Records what an attempt showed of the backend; returns the state before.
    pub fn set_backend(&self, backend: Backend) -> Backend {
        match self.backend.swap(backend as u8, Ordering::Relaxed) {
            1 => Backend::Up,
            2 => Backend::Down,
            _ => Backend::Unknown,
        }
    }

    /// Keeps a callback; `Ok` once it is durably written. Returns its spool id.
    pub async fn accept(&self, callback: NewCallback) -> Result<String, SpoolError> {
        let id = self.store()?.accept(callback, now_ms()).await?;
        self.accepted.notify_one();
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_cap_and_the_policy_ends_in_dead_letters() {
        let config = DeliveryConfig {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
            max_age: Duration::from_secs(3600),
            final_statuses: vec![422],
            ..DeliveryConfig::default()
        };
        let at = |attempt, jitter| match config.after_failure(attempt, 0, 1000, Some(500), jitter) {
            Next::Retry { at_ms } => at_ms - 1000,
            Next::Dead => -1,
        };
        assert_eq!(
            [1, 2, 3, 4, 5, 40].map(|attempt| at(attempt, 1.0)),
            [1000, 2000, 4000, 8000, 10000, 10000]
        );
        assert_eq!(at(3, 0.5), 2000);
        assert_eq!(at(3, 0.0), 2000, "jitter is at least one half");
        assert_eq!(
            config.after_failure(1, 0, 1000, Some(422), 1.0),
            Next::Dead,
            "a final status"
        );
        assert_eq!(
            config.after_failure(1, 0, 3_600_000, None, 1.0),
            Next::Dead,
            "older than max_age"
        );
        let limited = DeliveryConfig {
            max_attempts: 3,
            ..config.clone()
        };
        assert!(matches!(
            limited.after_failure(2, 0, 1000, None, 1.0),
            Next::Retry { .. }
        ));
        assert_eq!(limited.after_failure(3, 0, 1000, None, 1.0), Next::Dead);
    }

    #[test]
    fn problems_name_their_keys() {
        let config = DeliveryConfig {
            mode: DeliveryMode::Spool,
            backoff_initial: Duration::from_secs(10),
            backoff_max: Duration::from_secs(1),
            concurrency: 0,
            final_statuses: vec![200, 400],
            ..DeliveryConfig::default()
        };
        let problems = config.problems();
        for key in [
            "delivery.spool_dir:",
            "delivery.backoff_max:",
            "delivery.concurrency:",
            "delivery.final_statuses: 200",
        ] {
            assert!(problems.iter().any(|p| p.starts_with(key)), "{problems:?}");
        }
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(DeliveryConfig::default().problems().is_empty());
    }

    #[test]
    fn ids_are_unique() {
        let ids: std::collections::BTreeSet<String> = (0..1000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|id| id.len() == 32));
    }
}
