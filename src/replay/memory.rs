//! The embedded replay store: a bounded LRU map (the `lru` crate) split into shards, each behind
//! its own mutex, so that claim, settle and release are plain compare-and-set steps under a lock.
//! Suits one replica; several replicas need the shared Redis store.
//!
//! Entries are keyed by the digest alone (16 bytes, no allocation): the signed string includes
//! `partner_code`, so the digest already tells partners apart. Expiry is checked when a key is
//! looked up; expired entries are pushed out by newer ones, so memory is bounded by the capacity
//! alone and no sweeper is needed. moka was measured first: about 430 bytes and 3–4 µs per
//! operation at capacity (a fifth of lfguard's CPU under load), and its default TinyLFU policy
//! refuses new keys in favour of old ones once full — the opposite of what a replay store needs.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lru::LruCache;

use super::{Claim, Key, Store, StoreError, Token};

type Digest = [u8; 16];

/// Enough shards that concurrent requests rarely meet on one lock.
const MAX_SHARDS: u64 = 16;

#[derive(Debug, Clone, Copy)]
struct Entry {
    state: State,
    expires: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight(Token),
    Delivered,
}

pub struct MemoryStore {
    shards: Vec<Mutex<LruCache<Digest, Entry>>>,
    evictions: AtomicU64,
}

impl MemoryStore {
    /// Holds at most `capacity` keys in all (at least one).
    pub fn new(capacity: u64) -> Self {
        let shards = capacity.clamp(1, MAX_SHARDS);
        let per_shard = usize::try_from(capacity.max(1) / shards)
            .ok()
            .and_then(NonZeroUsize::new)
            .unwrap_or(NonZeroUsize::MIN);
        MemoryStore {
            shards: (0..shards)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
            evictions: AtomicU64::new(0),
        }
    }

    /// Keys held, including expired ones not yet pushed out.
    pub fn entries(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| lock(shard).len() as u64)
            .sum()
    }

    /// Keys pushed out for capacity before they expired.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn shard(&self, digest: &Digest) -> MutexGuard<'_, LruCache<Digest, Entry>> {
        lock(&self.shards[usize::from(digest[0]) % self.shards.len()])
    }

    /// Applies `change` to the entry only while `token` owns it.
    fn if_owner(
        &self,
        key: &Key,
        token: &Token,
        change: impl FnOnce(&mut LruCache<Digest, Entry>),
    ) {
        let mut shard = self.shard(&key.digest);
        if shard
            .peek(&key.digest)
            .is_some_and(|entry| entry.state == State::InFlight(*token))
        {
            change(&mut shard);
        }
    }
}

/// A panic while a shard was locked cannot leave an entry half-written (entries are `Copy`
/// values replaced whole), so a poisoned lock is still safe to use.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Store for MemoryStore {
    async fn claim(&self, key: &Key, in_flight: Duration) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(&key.digest);
        if let Some(entry) = shard.get(&key.digest)
            && entry.expires > now
        {
            return Ok(match entry.state {
                State::Delivered => Claim::Delivered,
                State::InFlight(_) => Claim::InFlight,
            });
        }
        let token = Token::new();
        let entry = Entry {
            state: State::InFlight(token),
            expires: now + in_flight,
        };
        if let Some((pushed_out, old)) = shard.push(key.digest, entry)
            && pushed_out != key.digest
            && old.expires > now
        {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Claim::Claimed(token))
    }

    async fn settle(&self, key: &Key, token: &Token, window: Duration) -> Result<(), StoreError> {
        self.if_owner(key, token, |shard| {
            let delivered = Entry {
                state: State::Delivered,
                expires: Instant::now() + window,
            };
            shard.put(key.digest, delivered);
        });
        Ok(())
    }

    async fn release(&self, key: &Key, token: &Token) -> Result<(), StoreError> {
        self.if_owner(key, token, |shard| {
            shard.pop(&key.digest);
        });
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
