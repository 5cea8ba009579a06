//! Replay protection: a store of callback keys, each either in flight (claimed by the
//! request forwarding it) or delivered (the backend answered 2xx).
//!
//! The key is partner + signature digest, not the delivery id: the signature covers every body
//! member, while `x-lf-delivery` is unsigned and an attacker can change it freely.

pub mod memory;
pub mod redis;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This request owns the key until it settles or releases it.
    Claimed(Token),
    /// The callback was already delivered.
    Delivered,
    /// Another copy is being forwarded right now.
    InFlight,
    /// The store holds as many claims in flight as it may (memory store): try again shortly.
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDuplicate {
    #[default]
    Acknowledge,
    Reject,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplayConfig {
    pub store: StoreKind,
    /// How long a delivered callback is remembered; at least `max_age + max_skew`.
    #[serde(with = "crate::verify::duration")]
    pub window: Duration,
    /// Memory store: the most keys held (about 120 bytes each); the least recently used go first.
    pub capacity: u64,
    pub on_duplicate: OnDuplicate,
    pub redis_url: Option<String>,
    pub key_prefix: String,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            store: StoreKind::Memory,
            window: Duration::from_secs(25 * 3600),
            capacity: 50_000,
            on_duplicate: OnDuplicate::Acknowledge,
            redis_url: None,
            key_prefix: "lfguard:".into(),
        }
    }
}

impl ReplayConfig {
    /// What serde cannot check, each problem naming its key. That `window` covers
    /// `verify.max_age + verify.max_skew` is checked where both sections meet (`config`).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.capacity == 0 {
            problems.push("replay.capacity: must be greater than 0".into());
        }
        if self.store == StoreKind::Redis && self.redis_url.is_none() {
            problems.push("replay.redis_url: required when replay.store = \"redis\"".into());
        }
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("redis+unix://")
                || url.starts_with("unix://"))
        {
            problems
                .push("replay.redis_url: must start with redis://, rediss:// or unix://".into());
        }
        problems
    }
}

/// One callback: its partner and the md5 digest of its signed string (which covers every body
/// member, `partner_code` included).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub partner: String,
    pub digest: [u8; 16],
}

impl Key {
    /// A readable name for shared stores: `PREFIX` `partner` `:` hex digest.
    pub fn name(&self, prefix: &str) -> String {
        format!(
            "{prefix}{}:{}",
            self.partner,
            crate::verify::signature::hex_string(&self.digest)
        )
    }
}

/// Proves ownership of an in-flight claim, so a slow request whose claim expired cannot settle or
/// release a claim that a later copy now holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token(u128);

impl Token {
    /// Unique across processes (a random prefix drawn once) and within one (a counter), without
    /// a system call per request.
    pub fn new() -> Self {
        static PROCESS: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let process = PROCESS.get_or_init(|| {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).expect("the OS random source is available");
            u64::from_le_bytes(bytes)
        });
        let sequence = COUNTER.fetch_add(1, Ordering::Relaxed);
        Token((u128::from(*process) << 64) | u128::from(sequence))
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl Default for Token {
    fn default() -> Self {
        Self::new()
    }
}

/// The store could not be reached or answered nonsense; requests fail closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A replay store. `claim` is atomic: of concurrent claims on one key exactly one wins.
pub trait Store: Send + Sync {
    /// Claims `key` for `in_flight` unless it is delivered or already claimed.
    fn claim(
        &self,
        key: &Key,
        in_flight: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Marks a claimed key delivered for `window`, if `token` still owns it.
    fn settle(
        &self,
        key: &Key,
        token: &Token,
        window: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Frees a claimed key, if `token` still owns it, so the next copy is forwarded.
    fn release(
        &self,
        key: &Key,
        token: &Token,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Whether the store answers, for readiness.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The store chosen by `replay.store`.
pub enum AnyStore {
    Memory(memory::MemoryStore),
    Redis(redis::RedisStore),
}

impl AnyStore {
    pub fn from_config(config: &ReplayConfig) -> Result<Arc<AnyStore>, StoreError> {
        Ok(Arc::new(match config.store {
            StoreKind::Memory => AnyStore::Memory(memory::MemoryStore::new(config.capacity)),
            StoreKind::Redis => AnyStore::Redis(redis::RedisStore::new(
                config.redis_url.as_deref().unwrap_or_default(),
                &config.key_prefix,
            )?),
        }))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            AnyStore::Memory(_) => "memory",
            AnyStore::Redis(_) => "redis",
        }
    }

    /// Delivered keys and claims in flight held, and the capacity of each, where the store can
    /// tell cheaply (memory only).
    pub fn entries(&self) -> Option<((u64, u64), u64)> {
        match self {
            AnyStore::Memory(store) => Some((store.entries(), store.capacity())),
            AnyStore::Redis(_) => None,
        }
    }

    /// Releases the claims of requests that shutdown is cutting (Redis; the memory store's go
    /// with the process). Returns how many were released.
    pub async fn release_outstanding(&self) -> usize {
        match self {
            AnyStore::Memory(_) => 0,
            AnyStore::Redis(store) => store.release_outstanding().await,
        }
    }

    /// Claims refused because the store was full of claims in flight (memory only).
    pub fn refused(&self) -> u64 {
        match self {
            AnyStore::Memory(store) => store.refused(),
            AnyStore::Redis(_) => 0,
        }
    }

    /// Entries dropped for capacity before they expired (memory only).
    pub fn evictions(&self) -> u64 {
        match self {
            AnyStore::Memory(store) => store.evictions(),
            AnyStore::Redis(_) => 0,
        }
    }
}

impl Store for AnyStore {
    async fn claim(&self, key: &Key, in_flight: Duration) -> Result<Claim, StoreError> {
        match self {
            AnyStore::Memory(store) => store.claim(key, in_flight).await,
            AnyStore::Redis(store) => store.claim(key, in_flight).await,
        }
    }

    async fn settle(&self, key: &Key, token: &Token, window: Duration) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(store) => store.settle(key, token, window).await,
            AnyStore::Redis(store) => store.settle(key, token, window).await,
        }
    }

    async fn release(&self, key: &Key, token: &Token) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(store) => store.release(key, token).await,
            AnyStore::Redis(store) => store.release(key, token).await,
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(store) => store.ping().await,
            AnyStore::Redis(store) => store.ping().await,
        }
    }
}

/// An owned claim. Dropping it unsettled (the client went away, a panic, an early return)
/// releases the key in the background, so Linksfield's retry is forwarded again.
pub struct ClaimGuard {
    store: Arc<AnyStore>,
    key: Key,
    token: Option<Token>,
}

impl ClaimGuard {
    pub fn new(store: Arc<AnyStore>, key: Key, token: Token) -> Self {
        ClaimGuard {
            store,
            key,
            token: Some(token),
        }
    }

    /// The backend accepted the callback: remember it for `window`.
    pub async fn settle(mut self, window: Duration) -> Result<(), StoreError> {
        let token = self.token.take().expect("a guard is settled once");
        self.store.settle(&self.key, &token, window).await
    }

    /// The backend did not accept it: let the next copy through.
    pub async fn release(mut self) -> Result<(), StoreError> {
        let token = self.token.take().expect("a guard is released once");
        self.store.release(&self.key, &token).await
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            let store = self.store.clone();
            let key = self.key.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    match store.release(&key, &token).await {
                        Ok(()) => tracing::info!("abandoned replay claim released"),
                        Err(err) => tracing::warn!(
                            error = %err,
                            "could not release an abandoned replay claim; it expires on its own"
                        ),
                    }
                });
            }
        }
    }
}
