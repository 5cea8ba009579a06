//! The embedded replay store: a bounded moka cache with a per-entry lifetime. Suits one replica;
//! several replicas need the shared Redis store. Entries are keyed by the digest alone (16 bytes,
//! no allocation): the signed string includes `partner_code`, so the digest already tells
//! partners apart.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use super::{Claim, Key, Store, StoreError, Token};

type Digest = [u8; 16];

#[derive(Debug, Clone)]
struct Entry {
    state: State,
    ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    InFlight(Token),
    Delivered,
}

/// Each entry lives for the lifetime it was written with: in-flight claims briefly, delivered
/// keys for the replay window.
struct EntryLifetime;

impl Expiry<Digest, Entry> for EntryLifetime {
    fn expire_after_create(&self, _key: &Digest, entry: &Entry, _at: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &Digest,
        entry: &Entry,
        _at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

pub struct MemoryStore {
    cache: Cache<Digest, Entry>,
    evictions: Arc<AtomicU64>,
}

impl MemoryStore {
    pub fn new(capacity: u64) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counter = evictions.clone();
        // LRU, not moka's default TinyLFU: every key is seen about once, and TinyLFU would then
        // refuse to admit new keys over old ones once the cache is full, forgetting exactly the
        // callbacks most likely to be replayed next.
        let cache = Cache::builder()
            .max_capacity(capacity)
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(EntryLifetime)
            .eviction_listener(move |_key, _entry, cause| {
                if cause == RemovalCause::Size {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        MemoryStore { cache, evictions }
    }

    pub fn entries(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Replaces the entry only while `token` owns it.
    fn if_owner(&self, key: &Key, token: &Token, replacement: Op<Entry>) {
        let mut replacement = Some(replacement);
        self.cache
            .entry(key.digest)
            .and_compute_with(|existing| match existing {
                Some(entry) if entry.value().state == State::InFlight(*token) => {
                    replacement.take().expect("called once")
                }
                _ => Op::Nop,
            });
    }
}

impl Store for MemoryStore {
    async fn claim(&self, key: &Key, in_flight: Duration) -> Result<Claim, StoreError> {
        let token = Token::new();
        let mut outcome = Claim::Claimed(token);
        self.cache
            .entry(key.digest)
            .and_compute_with(|existing| match existing {
                None => Op::Put(Entry {
                    state: State::InFlight(token),
                    ttl: in_flight,
                }),
                Some(entry) => {
                    outcome = match entry.value().state {
                        State::Delivered => Claim::Delivered,
                        State::InFlight(_) => Claim::InFlight,
                    };
                    Op::Nop
                }
            });
        Ok(outcome)
    }

    async fn settle(&self, key: &Key, token: &Token, window: Duration) -> Result<(), StoreError> {
        self.if_owner(
            key,
            token,
            Op::Put(Entry {
                state: State::Delivered,
                ttl: window,
            }),
        );
        Ok(())
    }

    async fn release(&self, key: &Key, token: &Token) -> Result<(), StoreError> {
        self.if_owner(key, token, Op::Remove);
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    fn key(name: &str) -> Key {
        let digest = crate::signature::Prepared::new(name).digest("");
        Key {
            partner: "P1".into(),
            digest,
        }
    }

    #[tokio::test]
    async fn claim_settle_release_lifecycle() {
        let store = MemoryStore::new(100);
        let Claim::Claimed(first) = store.claim(&key("k"), LONG).await.unwrap() else {
            panic!("first claim wins");
        };
        assert_eq!(store.claim(&key("k"), LONG).await.unwrap(), Claim::InFlight);
        store.release(&key("k"), &first).await.unwrap();
        let Claim::Claimed(second) = store.claim(&key("k"), LONG).await.unwrap() else {
            panic!("released key can be claimed again");
        };
        store.settle(&key("k"), &first, LONG).await.unwrap();
        assert_eq!(
            store.claim(&key("k"), LONG).await.unwrap(),
            Claim::InFlight,
            "a stale token changes nothing"
        );
        store.settle(&key("k"), &second, LONG).await.unwrap();
        assert_eq!(
            store.claim(&key("k"), LONG).await.unwrap(),
            Claim::Delivered
        );
        store.release(&key("k"), &second).await.unwrap();
        assert_eq!(
            store.claim(&key("k"), LONG).await.unwrap(),
            Claim::Delivered,
            "release never forgets a delivery"
        );
    }

    #[tokio::test]
    async fn in_flight_claims_expire() {
        let store = MemoryStore::new(100);
        assert!(matches!(
            store
                .claim(&key("k"), Duration::from_millis(20))
                .await
                .unwrap(),
            Claim::Claimed(_)
        ));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(matches!(
            store.claim(&key("k"), LONG).await.unwrap(),
            Claim::Claimed(_)
        ));
    }

    #[tokio::test]
    async fn capacity_bounds_entries_and_counts_evictions() {
        let store = MemoryStore::new(50);
        for i in 0..500 {
            let key = key(&format!("k{i}"));
            if let Claim::Claimed(token) = store.claim(&key, LONG).await.unwrap() {
                store.settle(&key, &token, LONG).await.unwrap();
            }
        }
        assert!(store.entries() <= 50, "{}", store.entries());
        assert!(store.evictions() > 0);
        // At capacity the oldest keys go, and the newest are still caught as replays.
        assert_eq!(
            store.claim(&key("k499"), LONG).await.unwrap(),
            Claim::Delivered
        );
        assert!(matches!(
            store.claim(&key("k0"), LONG).await.unwrap(),
            Claim::Claimed(_)
        ));
    }
}
