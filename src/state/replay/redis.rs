//! The shared replay store for several replicas. The claim is one atomic `SET NX PX`; settle and
//! release are Lua compare-and-set scripts guarded by the owner's token, so a request whose claim
//! expired cannot overwrite the claim of a later copy. The connection manager reconnects on its
//! own, so lfguard recovers without a restart when Redis comes back; a command that meets the
//! dropped connection of a restarted Redis is sent once more on the new one rather than failing
//! the callback it was for. A claim whose command timed out (Redis hung) may still be executed
//! when Redis resumes, and would then hold the key for nothing: it is released by its token in the
//! background, once Redis answers again.

use std::collections::HashMap;
use std::sync::Mutex;
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

/// How often a claim left by a timed-out command is tried to be released while Redis is silent.
const RELEASE_RETRY: Duration = Duration::from_millis(250);

pub struct RedisStore {
    connection: ConnectionManager,
    prefix: String,
    settle_script: Script,
    release_script: Script,
    /// Claims granted and not yet settled or released (key name → owner token), so that a
    /// shutdown that cuts their requests can release them rather than leave them to lapse.
    outstanding: Mutex<HashMap<String, Token>>,
}

/// Whether an error means the connection was lost before the command was answered, so that the
/// connection manager's new connection should be tried once. A timeout is not: Redis may be hung
/// and retrying would only double the wait.
fn connection_lost(err: &redis::RedisError) -> bool {
    !err.is_timeout()
        && (err.is_connection_dropped() || err.is_io_error() || err.is_unrecoverable_error())
}

/// Runs `command`, and once more if the connection had been lost (a restarted Redis).
async fn with_reconnect<T: redis::FromRedisValue>(
    connection: &mut ConnectionManager,
    command: &redis::Cmd,
) -> Result<T, redis::RedisError> {
    match command.query_async(connection).await {
        Err(err) if connection_lost(&err) => command.query_async(connection).await,
        result => result,
    }
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
            outstanding: Mutex::default(),
        })
    }

    fn name(&self, key: &Key) -> String {
        key.name(&self.prefix)
    }

    fn outstanding(&self) -> std::sync::MutexGuard<'_, HashMap<String, Token>> {
        self.outstanding
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Releases every claim granted and not yet settled or released: the requests holding them
    /// are being cut at shutdown. Returns how many were released.
    pub async fn release_outstanding(&self) -> usize {
        let claims: Vec<(String, Token)> = self.outstanding().drain().collect();
        let mut released = 0;
        let mut connection = self.connection.clone();
        for (key, token) in claims {
            let deleted: Result<i64, _> = self
                .release_script
                .key(&key)
                .arg(format!("{IN_FLIGHT_PREFIX}{token}"))
                .invoke_async(&mut connection)
                .await;
            match deleted {
                Ok(deleted) => released += usize::try_from(deleted).unwrap_or(0),
                Err(err) => {
                    tracing::warn!(error = %err, "could not release a replay claim at shutdown; it lapses on its own")
                }
            }
        }
        released
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

impl RedisStore {
    async fn try_claim(
        &self,
        key: &str,
        owned: &str,
        token: Token,
        in_flight: Duration,
    ) -> Result<Claim, StoreError> {
        let mut connection = self.connection.clone();
        let mut set = redis::cmd("SET");
        set.arg(key)
            .arg(owned)
            .arg("NX")
            .arg("PX")
            .arg(millis(in_flight));
        let mut get = redis::cmd("GET");
        get.arg(key);
        // A key can expire between a failed SET and the GET; then claiming again is correct.
        for _ in 0..3 {
            let reply: Value = with_reconnect(&mut connection, &set)
                .await
                .map_err(unavailable)?;
            if matches!(reply, Value::Okay) {
                return Ok(Claim::Claimed(token));
            }
            let current: Option<String> = with_reconnect(&mut connection, &get)
                .await
                .map_err(unavailable)?;
            match current.as_deref() {
                Some(DELIVERED) => return Ok(Claim::Delivered),
                // Our own SET went through although its answer was lost with the connection.
                Some(value) if value == owned => return Ok(Claim::Claimed(token)),
                Some(value) if value.starts_with(IN_FLIGHT_PREFIX) => return Ok(Claim::InFlight),
                Some(_) => return Err(StoreError(format!("redis: unexpected value at {key}"))),
                None => continue,
            }
        }
        Err(StoreError(format!(
            "redis: {key} kept changing during the claim"
        )))
    }

    /// Deletes the claim `owned` at `key` once Redis answers, trying until the claim would have
    /// lapsed anyway.
    fn release_when_answered(&self, key: String, owned: String, in_flight: Duration) {
        let mut connection = self.connection.clone();
        let script = self.release_script.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let deadline = tokio::time::Instant::now() + in_flight;
            loop {
                let released: Result<i64, _> = script
                    .key(&key)
                    .arg(&owned)
                    .invoke_async(&mut connection)
                    .await;
                match released {
                    Ok(deleted) => {
                        if deleted > 0 {
                            tracing::info!("released a replay claim left by a timed-out command");
                        }
                        return;
                    }
                    Err(_) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(RELEASE_RETRY).await;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "a replay claim left by a timed-out command could not be released; it lapses on its own");
                        return;
                    }
                }
            }
        });
    }
}

impl Store for RedisStore {
    async fn claim(&self, key: &Key, in_flight: Duration) -> Result<Claim, StoreError> {
        let key = self.name(key);
        let token = Token::new();
        let owned = format!("{IN_FLIGHT_PREFIX}{token}");
        let claimed = self.try_claim(&key, &owned, token, in_flight).await;
        if let Ok(Claim::Claimed(token)) = &claimed {
            self.outstanding().insert(key, *token);
            return claimed;
        }
        if claimed.is_err() {
            // The SET may still be executed (or may have been, its answer lost): the callback is
            // refused, so nothing must hold its key.
            self.release_when_answered(key, owned, in_flight);
        }
        claimed
    }

    async fn settle(&self, key: &Key, token: &Token, window: Duration) -> Result<(), StoreError> {
        let name = self.name(key);
        let mut connection = self.connection.clone();
        let mut invocation = self.settle_script.key(&name);
        invocation
            .arg(format!("{IN_FLIGHT_PREFIX}{token}"))
            .arg(DELIVERED)
            .arg(millis(window));
        let settled: Result<i64, _> = match invocation.invoke_async(&mut connection).await {
            Err(err) if connection_lost(&err) => invocation.invoke_async(&mut connection).await,
            result => result,
        };
        settled.map_err(unavailable)?;
        self.outstanding().remove(&name);
        Ok(())
    }

    async fn release(&self, key: &Key, token: &Token) -> Result<(), StoreError> {
        let name = self.name(key);
        let mut connection = self.connection.clone();
        let mut invocation = self.release_script.key(&name);
        invocation.arg(format!("{IN_FLIGHT_PREFIX}{token}"));
        let released: Result<i64, _> = match invocation.invoke_async(&mut connection).await {
            Err(err) if connection_lost(&err) => invocation.invoke_async(&mut connection).await,
            result => result,
        };
        released.map_err(unavailable)?;
        self.outstanding().remove(&name);
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        with_reconnect::<String>(&mut connection, &redis::cmd("PING"))
            .await
            .map(drop)
            .map_err(unavailable)
    }
}
