//! The shared replay store for several replicas. The claim is one atomic `SET NX PX`; settle and
//! release are Lua compare-and-set scripts guarded by the owner's token, so a request whose claim
//! expired cannot overwrite the claim of a later copy. The connection manager reconnects on its
//! own, so lfguard recovers without a restart when Redis comes back.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use super::{Claim, Key, Store, StoreError, Token};

const DELIVERED: &str = "delivered";
const IN_FLIGHT_PREFIX: &str = "inflight:";

/// `KEYS[1]` → `ARGV[2]` with lifetime `ARGV[3]` ms, if it still holds `ARGV[1]`.
const REPLACE_IF_OWNER: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"#;

/// Deletes `KEYS[1]` if it still holds `ARGV[1]`.
const DELETE_IF_OWNER: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

pub struct RedisStore {
    connection: ConnectionManager,
    prefix: String,
    settle_script: Script,
    release_script: Script,
}

impl RedisStore {
    /// Builds the store without connecting: lfguard starts (not ready) while Redis is down.
    pub fn new(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|err| StoreError(format!("replay.redis_url: {err}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|err| StoreError(format!("redis: {err}")))?;
        Ok(RedisStore {
            connection,
            prefix: prefix.to_string(),
            settle_script: Script::new(REPLACE_IF_OWNER),
            release_script: Script::new(DELETE_IF_OWNER),
        })
    }

    fn name(&self, key: &Key) -> String {
        key.name(&self.prefix)
    }
}

fn unavailable(err: redis::RedisError) -> StoreError {
    StoreError(format!("redis: {err}"))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Store for RedisStore {
    async fn claim(&self, key: &Key, in_flight: Duration) -> Result<Claim, StoreError> {
        let key = self.name(key);
        let token = Token::new();
        let owned = format!("{IN_FLIGHT_PREFIX}{token}");
        let mut connection = self.connection.clone();
        // A key can expire between a failed SET and the GET; then claiming again is correct.
        for _ in 0..3 {
            let set: Value = redis::cmd("SET")
                .arg(&key)
                .arg(&owned)
                .arg("NX")
                .arg("PX")
                .arg(millis(in_flight))
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            if matches!(set, Value::Okay) {
                return Ok(Claim::Claimed(token));
            }
            let current: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            match current.as_deref() {
                Some(DELIVERED) => return Ok(Claim::Delivered),
                Some(value) if value.starts_with(IN_FLIGHT_PREFIX) => return Ok(Claim::InFlight),
                Some(_) => return Err(StoreError(format!("redis: unexpected value at {key}"))),
                None => continue,
            }
        }
        Err(StoreError(format!(
            "redis: {key} kept changing during the claim"
        )))
    }

    async fn settle(&self, key: &Key, token: &Token, window: Duration) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: i64 = self
            .settle_script
            .key(self.name(key))
            .arg(format!("{IN_FLIGHT_PREFIX}{token}"))
            .arg(DELIVERED)
            .arg(millis(window))
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn release(&self, key: &Key, token: &Token) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: i64 = self
            .release_script
            .key(self.name(key))
            .arg(format!("{IN_FLIGHT_PREFIX}{token}"))
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
