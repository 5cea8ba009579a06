//! The embedded replay store: the last `capacity` delivered callbacks in an LRU map (the `lru`
//! crate), and the claims in flight beside them in a map of their own, both behind one mutex, so
//! that claim, settle and release are plain compare-and-set steps under a lock. Suits one replica;
//! several replicas need the shared Redis store.
//!
//! The two are apart because they must be bounded differently. A delivered key may be forgotten
//! for capacity (the least recently used goes, and is counted): the store then remembers exactly
//! the last `capacity` deliveries. A claim in flight must never be forgotten, or a copy sent while
//! the backend works on the first would be forwarded too; when `capacity` claims are in flight, a
//! new claim is refused (`Claim::Full`, a 503 that Linksfield retries) instead. One lock rather
//! than shards: shards each evicting on their own made the capacity inexact, and an operation
//! holds the lock for a hash lookup or two.
//!
//! Entries are keyed by the digest alone (16 bytes, no allocation): the signed string includes
//! `partner_code`, so the digest already tells partners apart. Expiry is checked when a key is
//! looked up; expired deliveries are pushed out by newer ones, and expired claims (their request
//! outlived `upstream.timeout`) are swept when the claims fill up, so memory is bounded by the
//! capacity alone and no sweeper task is needed. moka was measured first: about 430 bytes and
//! 3–4 µs per operation at capacity, and its default TinyLFU policy refuses new keys in favour of
//! old ones once full — the opposite of what a replay store needs.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lru::LruCache;

use super::{Claim, Key, Store, StoreError, Token};

type Digest = [u8; 16];

/// Hashes a digest by its first eight bytes. They are already uniform: md5 output that only a
/// holder of the partner's secret gets into the store (keys are claimed after verification), so
/// SipHash's flood resistance would buy nothing for a fifth of the store's cost.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut first = [0u8; 8];
        let n = bytes.len().min(8);
        first[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(first);
    }

    /// The length prefix of the digest array: the same for every key.
    fn write_usize(&mut self, _length: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

type ByDigest = BuildHasherDefault<DigestHasher>;

struct Claims {
    /// Delivered keys and when each may be forgotten.
    delivered: LruCache<Digest, Instant, ByDigest>,
    /// Keys being forwarded: the owner's token and when the claim lapses.
    in_flight: HashMap<Digest, (Token, Instant), ByDigest>,
}

pub struct MemoryStore {
    claims: Mutex<Claims>,
    capacity: usize,
    evictions: AtomicU64,
    refused: AtomicU64,
}

impl MemoryStore {
    /// Remembers the last `capacity` deliveries (at least one) and holds at most `capacity`
    /// claims in flight.
    pub fn new(capacity: u64) -> Self {
        let capacity = usize::try_from(capacity)
            .ok()
            .and_then(NonZeroUsize::new)
            .unwrap_or(NonZeroUsize::MIN);
        MemoryStore {
            claims: Mutex::new(Claims {
                delivered: LruCache::with_hasher(capacity, ByDigest::default()),
                in_flight: HashMap::default(),
            }),
            capacity: capacity.get(),
            evictions: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Delivered keys held (including expired ones not yet pushed out) and claims in flight.
    pub fn entries(&self) -> (u64, u64) {
        let claims = self.lock();
        (claims.delivered.len() as u64, claims.in_flight.len() as u64)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity as u64
    }

    /// Delivered keys forgotten for capacity before they expired.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Claims refused because `capacity` claims were in flight.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Claims> {
        // A panic while locked cannot leave an entry half-written (entries are `Copy` values
        // replaced whole), so a poisoned lock is still safe to use.
        self.claims
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Removes `key`'s claim if `token` still owns it; whether it did.
    fn take_claim(claims: &mut Claims, key: &Key, token: &Token) -> bool {
        let owned = claims
            .in_flight
            .get(&key.digest)
            .is_some_and(|(owner, _)| owner == token);
        if owned {
            claims.in_flight.remove(&key.digest);
        }
        owned
    }
}

impl Store for MemoryStore {
    async fn claim(&self, key: &Key, in_flight: Duration) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut claims = self.lock();
        match claims.delivered.get(&key.digest) {
            Some(&expires) if expires > now => return Ok(Claim::Delivered),
            Some(_) => {
                claims.delivered.pop(&key.digest);
            }
            None => {}
        }
        if let Some(&(_, expires)) = claims.in_flight.get(&key.digest) {
            if expires > now {
                return Ok(Claim::InFlight);
            }
            claims.in_flight.remove(&key.digest);
        }
        if claims.in_flight.len() >= self.capacity {
            claims.in_flight.retain(|_, (_, expires)| *expires > now);
            if claims.in_flight.len() >= self.capacity {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Ok(Claim::Full);
            }
        }
        let token = Token::new();
        claims
            .in_flight
            .insert(key.digest, (token, now + in_flight));
        Ok(Claim::Claimed(token))
    }

    async fn settle(&self, key: &Key, token: &Token, window: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut claims = self.lock();
        if Self::take_claim(&mut claims, key, token)
            && let Some((pushed_out, expires)) = claims.delivered.push(key.digest, now + window)
            && pushed_out != key.digest
            && expires > now
        {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn release(&self, key: &Key, token: &Token) -> Result<(), StoreError> {
        Self::take_claim(&mut self.lock(), key, token);
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
        let digest = crate::verify::signature::Prepared::new(name).digest("");
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

    async fn deliver(store: &MemoryStore, name: &str) {
        let Claim::Claimed(token) = store.claim(&key(name), LONG).await.unwrap() else {
            panic!("{name} is new");
        };
        store.settle(&key(name), &token, LONG).await.unwrap();
    }

    #[tokio::test]
    async fn exactly_the_last_capacity_deliveries_are_remembered() {
        for capacity in [1u64, 17, 100] {
            let store = MemoryStore::new(capacity);
            for i in 0..capacity * 3 {
                deliver(&store, &format!("k{i}")).await;
            }
            assert_eq!(store.entries(), (capacity, 0));
            assert_eq!(store.evictions(), capacity * 2);
            // Checking from the oldest remembered (a check counts as a use).
            for i in capacity * 2..capacity * 3 {
                assert_eq!(
                    store.claim(&key(&format!("k{i}")), LONG).await.unwrap(),
                    Claim::Delivered,
                    "capacity {capacity}: k{i} forgotten"
                );
            }
            assert!(matches!(
                store
                    .claim(&key(&format!("k{}", capacity * 2 - 1)), LONG)
                    .await
                    .unwrap(),
                Claim::Claimed(_)
            ));
        }
    }

    #[tokio::test]
    async fn a_claim_in_flight_is_never_evicted_and_a_full_store_refuses() {
        let store = MemoryStore::new(1);
        let Claim::Claimed(a) = store.claim(&key("a"), LONG).await.unwrap() else {
            panic!("a is new");
        };
        assert_eq!(store.claim(&key("b"), LONG).await.unwrap(), Claim::Full);
        assert_eq!(store.refused(), 1);
        assert_eq!(store.claim(&key("a"), LONG).await.unwrap(), Claim::InFlight);
        store.settle(&key("a"), &a, LONG).await.unwrap();
        // Settled, the claim's room is free; the delivery stays until a newer one pushes it out.
        deliver(&store, "b").await;
        assert_eq!(store.evictions(), 1);
        assert_eq!(
            store.claim(&key("b"), LONG).await.unwrap(),
            Claim::Delivered
        );
    }

    #[tokio::test]
    async fn lapsed_claims_make_room() {
        let store = MemoryStore::new(2);
        for name in ["a", "b"] {
            assert!(matches!(
                store
                    .claim(&key(name), Duration::from_millis(10))
                    .await
                    .unwrap(),
                Claim::Claimed(_)
            ));
        }
        assert_eq!(store.claim(&key("c"), LONG).await.unwrap(), Claim::Full);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(matches!(
            store.claim(&key("c"), LONG).await.unwrap(),
            Claim::Claimed(_)
        ));
        assert_eq!(store.entries(), (0, 1));
    }
}
