//! The shared spool for several replicas (`delivery.store = "redis"`), in the replay store's
//! Redis (`replay.redis_url`, keys under `replay.key_prefix` + `spool:`):
//!
//! - each partner's waiting callbacks are a stream, `spool:s:PARTNER`, with one consumer group
//!   (`lfguard`, created by the scripts): `XADD` on accept (acknowledged by Redis before the sender is answered);
//! - a partner is delivered by one replica at a time, the holder of its lease
//!   (`spool:lease:PARTNER`, renewed whenever the worker looks at the spool, about every second),
//!   so that its callbacks arrive in order whichever replica took them. The holder reads the
//!   stream with `XREADGROUP`, one entry at a time, and `XACK`s (and deletes) an entry once it is
//!   delivered or dead-lettered;
//! - a replica that dies stops renewing its leases; the replica that takes a lease over first
//!   takes the dead replica's pending entries with `XAUTOCLAIM`, so a callback cut mid-delivery
//!   is delivered again, with the same spool id;
//! - the attempts of a waiting callback are in `spool:r:PARTNER`, dead letters in `spool:d:ID`
//!   (listed in `spool:dead`), the bytes held in `spool:bytes`, and `spool:ids` finds a callback
//!   by its spool id.
//!
//! Every step that changes more than one key is a Lua script, so it happens whole or not at all.
//! Redis unreachable: every command fails and callbacks to spool are refused with 503 (fail
//! closed, like the replay store).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use super::sqlite::{decode_headers, encode_headers};
use super::{NewCallback, Outcome, PartnerCounts, RetrySet, SpoolError, Spooled, Stats, new_id};

/// How long a replica holds a partner's lease without renewing it: after a replica died, its
/// partners wait this long before another replica delivers them.
const LEASE: Duration = Duration::from_secs(10);

/// KEYS: bytes, stream, partners, ids. ARGV: max bytes, size, partner, spool id, received ms,
/// method, target, headers, body. The entry id, or false when the spool is full.
const ACCEPT: &str = r#"
local bytes = tonumber(redis.call('GET', KEYS[1]) or '0')
if bytes + tonumber(ARGV[2]) > tonumber(ARGV[1]) then return false end
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[2], 'lfguard', '0', 'MKSTREAM')
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[4], 'received_ms', ARGV[5],
  'size', ARGV[2], 'method', ARGV[6], 'target', ARGV[7], 'headers', ARGV[8], 'body', ARGV[9])
redis.call('INCRBY', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('HSET', KEYS[4], ARGV[4], ARGV[3] .. ' ' .. entry)
return entry
"#;

/// KEYS: stream, lease, retry state, partners. ARGV: consumer, lease ms, partner. The partner's
/// oldest waiting entry as {id, fields, retry state}; {} when it has none; false when another
/// replica holds the partner.
const HEAD: &str = r#"
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return false end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], 'lfguard', '0', 'MKSTREAM')
if not holder then
  local cursor = '0-0'
  repeat
    local claimed = redis.call('XAUTOCLAIM', KEYS[1], 'lfguard', ARGV[1], 0, cursor, 'COUNT', 100, 'JUSTID')
    cursor = claimed[1]
  until cursor == '0-0'
end
for _ = 1, 100 do
  local pending = redis.call('XPENDING', KEYS[1], 'lfguard', '-', '+', 1, ARGV[1])
  if #pending > 0 then
    local id = pending[1][1]
    local found = redis.call('XRANGE', KEYS[1], id, id)
    if #found > 0 then
      return {id, found[1][2], redis.call('HGET', KEYS[3], id) or ''}
    end
    redis.call('XACK', KEYS[1], 'lfguard', id)
  else
    local read = redis.call('XREADGROUP', 'GROUP', 'lfguard', ARGV[1], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
    if read and #read[1][2] > 0 then
      local entry = read[1][2][1]
      return {entry[1], entry[2], redis.call('HGET', KEYS[3], entry[1]) or ''}
    end
    if redis.call('XLEN', KEYS[1]) == 0 then
      redis.call('SREM', KEYS[4], ARGV[3])
    end
    return {}
  end
end
return {}
"#;

/// The value of field `name` in a stream entry's flat field list.
const FIELD: &str = r#"
local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end
"#;

/// KEYS: stream, retry state, ids, bytes. ARGV: entry id, spool id. Removes a waiting callback
/// (delivered, or dropped): 1, or 0 when it was not there.
const REMOVE: &str = r#"
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
redis.call('XACK', KEYS[1], 'lfguard', ARGV[1])
if #found == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('DECRBY', KEYS[4], tonumber(field(found[1][2], 'size')))
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[2])
return 1
"#;

/// KEYS: stream, retry state, ids, dead set, dead letter. ARGV: entry id, spool id, partner,
/// attempts, dead ms, error. Moves a waiting callback to the dead letters.
const BURY: &str = r#"
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
redis.call('XACK', KEYS[1], 'lfguard', ARGV[1])
if #found == 0 then return 0 end
redis.call('HSET', KEYS[5], unpack(found[1][2]))
redis.call('HSET', KEYS[5], 'partner', ARGV[3], 'attempts', ARGV[4], 'dead_ms', ARGV[5], 'last_error', ARGV[6])
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[2], 'dead')
redis.call('SADD', KEYS[4], ARGV[2])
return 1
"#;

/// KEYS: dead letter, dead set, ids, stream, partners. ARGV: spool id, partner. A dead letter
/// waits again, at the end of its partner's stream.
const REVIVE: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'id', 'received_ms', 'size', 'method', 'target', 'headers', 'body')
if not f[1] then return 0 end
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[4], 'lfguard', '0', 'MKSTREAM')
local entry = redis.call('XADD', KEYS[4], '*', 'id', f[1], 'received_ms', f[2], 'size', f[3],
  'method', f[4], 'target', f[5], 'headers', f[6], 'body', f[7])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ' ' .. entry)
redis.call('SADD', KEYS[5], ARGV[2])
return 1
"#;

/// KEYS: dead letter, dead set, ids, bytes. ARGV: spool id. Drops a dead letter.
const FORGET: &str = r#"
local size = redis.call('HGET', KEYS[1], 'size')
if not size then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('DECRBY', KEYS[4], tonumber(size))
return 1
"#;

/// KEYS: lease. ARGV: consumer. Gives a lease up, if this replica holds it.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

pub struct RedisSpool {
    connection: ConnectionManager,
    /// `replay.key_prefix` + `spool:`.
    prefix: String,
    max_bytes: u64,
    /// This replica's consumer name in the group, and the value of the leases it holds.
    consumer: String,
    accept: Script,
    head: Script,
    remove: Script,
    bury: Script,
    revive: Script,
    forget: Script,
    release: Script,
}

fn unavailable(err: impl std::fmt::Display) -> SpoolError {
    SpoolError::Unavailable(format!("spool: redis: {err}"))
}

impl RedisSpool {
    /// Builds the store without connecting: like the replay store, lfguard starts while Redis is
    /// down and refuses callbacks to spool until it answers.
    pub fn new(url: &str, key_prefix: &str, max_bytes: u64) -> Result<RedisSpool, SpoolError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection =
            ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?;
        Ok(RedisSpool {
            connection,
            prefix: format!("{key_prefix}spool:"),
            max_bytes,
            consumer: new_id(),
            accept: Script::new(ACCEPT),
            head: Script::new(HEAD),
            remove: Script::new(&format!("{FIELD}{REMOVE}")),
            bury: Script::new(BURY),
            revive: Script::new(REVIVE),
            forget: Script::new(FORGET),
            release: Script::new(RELEASE),
        })
    }

    /// Where it keeps its keys, for `lfguard spool stats`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// This process's consumer name, the value of the leases it holds.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn stream(&self, partner: &str) -> String {
        self.key(&format!("s:{partner}"))
    }

    fn retry_state(&self, partner: &str) -> String {
        self.key(&format!("r:{partner}"))
    }

    fn dead_letter(&self, id: &str) -> String {
        self.key(&format!("d:{id}"))
    }

    fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    pub async fn accept(&self, callback: NewCallback, now_ms: i64) -> Result<String, SpoolError> {
        let id = new_id();
        let size = callback.size();
        let entry: Option<String> = self
            .accept
            .key(self.key("bytes"))
            .key(self.stream(&callback.partner))
            .key(self.key("partners"))
            .key(self.key("ids"))
            .arg(self.max_bytes)
            .arg(size)
            .arg(&callback.partner)
            .arg(&id)
            .arg(now_ms)
            .arg(&callback.method)
            .arg(&callback.target)
            .arg(encode_headers(&callback.headers))
            .arg(&callback.body[..])
            .invoke_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        match entry {
            Some(_) => Ok(id),
            None => Err(SpoolError::Full),
        }
    }

    async fn partners(&self) -> Result<Vec<String>, SpoolError> {
        let mut partners: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.key("partners"))
            .query_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        partners.sort();
        Ok(partners)
    }

    /// The oldest waiting callback of each partner whose lease this replica holds (taking the
    /// leases that are free, and with them what a dead replica left pending).
    pub async fn heads(&self) -> Result<Vec<Spooled>, SpoolError> {
        let mut heads = Vec::new();
        for partner in self.partners().await? {
            let head: Value = self
                .head
                .key(self.stream(&partner))
                .key(self.key(&format!("lease:{partner}")))
                .key(self.retry_state(&partner))
                .key(self.key("partners"))
                .arg(&self.consumer)
                .arg(LEASE.as_millis() as u64)
                .arg(&partner)
                .invoke_async(&mut self.connection())
                .await
                .map_err(unavailable)?;
            if let Value::Array(parts) = head
                && let [Value::BulkString(entry), fields, state] = &parts[..]
            {
                let entry = String::from_utf8_lossy(entry).into_owned();
                heads.push(waiting(&partner, entry, &fields_of(fields), &text(state)));
            }
        }
        Ok(heads)
    }

    pub async fn record(
        &self,
        spooled: &Spooled,
        outcome: Outcome,
        now_ms: i64,
    ) -> Result<(), SpoolError> {
        let partner = &spooled.callback.partner;
        let entry = spooled.entry.as_deref().unwrap_or_default();
        let mut connection = self.connection();
        match outcome {
            Outcome::Delivered => {
                let _: i64 = self
                    .remove
                    .key(self.stream(partner))
                    .key(self.retry_state(partner))
                    .key(self.key("ids"))
                    .key(self.key("bytes"))
                    .arg(entry)
                    .arg(&spooled.id)
                    .invoke_async(&mut connection)
                    .await
                    .map_err(unavailable)?;
            }
            Outcome::Retry { at_ms, error } => {
                let state = format!("{}|{at_ms}|{error}", spooled.attempts + 1);
                let _: i64 = redis::cmd("HSET")
                    .arg(self.retry_state(partner))
                    .arg(entry)
                    .arg(state)
                    .query_async(&mut connection)
                    .await
                    .map_err(unavailable)?;
            }
            Outcome::Dead { error } => {
                let _: i64 = self
                    .bury
                    .key(self.stream(partner))
                    .key(self.retry_state(partner))
                    .key(self.key("ids"))
                    .key(self.key("dead"))
                    .key(self.dead_letter(&spooled.id))
                    .arg(entry)
                    .arg(&spooled.id)
                    .arg(partner)
                    .arg(spooled.attempts + 1)
                    .arg(now_ms)
                    .arg(error)
                    .invoke_async(&mut connection)
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }

    /// Every waiting callback of a partner, oldest first, and their retry states.
    async fn waiting_of(&self, partner: &str, limit: usize) -> Result<Vec<Spooled>, SpoolError> {
        let mut connection = self.connection();
        let entries: Value = redis::cmd("XRANGE")
            .arg(self.stream(partner))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        let states: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.retry_state(partner))
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        let Value::Array(entries) = entries else {
            return Ok(Vec::new());
        };
        Ok(entries
            .iter()
            .filter_map(|entry| match entry {
                Value::Array(parts) => match &parts[..] {
                    [id, fields] => {
                        let id = text(id);
                        let state = states.get(&id).cloned().unwrap_or_default();
                        Some(waiting(partner, id, &fields_of(fields), &state))
                    }
                    _ => None,
                },
                _ => None,
            })
            .collect())
    }

    async fn dead_letters(&self) -> Result<Vec<Spooled>, SpoolError> {
        let mut connection = self.connection();
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.key("dead"))
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        let mut dead = Vec::new();
        for id in ids {
            if let Some(letter) = self.dead_letter_of(&id).await? {
                dead.push(letter);
            }
        }
        Ok(dead)
    }

    async fn dead_letter_of(&self, id: &str) -> Result<Option<Spooled>, SpoolError> {
        let fields: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(self.dead_letter(id))
            .query_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        if fields.is_empty() {
            return Ok(None);
        }
        let number = |name: &str| {
            fields
                .get(name)
                .and_then(|value| std::str::from_utf8(value).ok()?.parse::<i64>().ok())
                .unwrap_or(0)
        };
        let partner = field_text(&fields, "partner");
        let mut letter = waiting(&partner, String::new(), &fields, "");
        letter.attempts = u32::try_from(number("attempts")).unwrap_or(0);
        letter.dead_ms = Some(number("dead_ms"));
        letter.last_error = Some(field_text(&fields, "last_error"));
        letter.entry = None;
        Ok(Some(letter))
    }

    pub async fn stats(&self) -> Result<Stats, SpoolError> {
        let mut stats = Stats {
            max_bytes: self.max_bytes,
            ..Stats::default()
        };
        for partner in self.partners().await? {
            let waiting = self.waiting_of(&partner, 1).await?;
            let count: u64 = redis::cmd("XLEN")
                .arg(self.stream(&partner))
                .query_async(&mut self.connection())
                .await
                .map_err(unavailable)?;
            if count == 0 {
                continue;
            }
            stats.pending += count;
            stats.partners.entry(partner.clone()).or_default().pending += count;
            if let Some(oldest) = waiting.first() {
                stats.oldest_pending_ms = Some(
                    stats
                        .oldest_pending_ms
                        .map_or(oldest.received_ms, |before| before.min(oldest.received_ms)),
                );
            }
        }
        for letter in self.dead_letters().await? {
            stats.dead += 1;
            let counts: &mut PartnerCounts = stats
                .partners
                .entry(letter.callback.partner.clone())
                .or_default();
            counts.dead += 1;
        }
        let bytes: Option<i64> = redis::cmd("GET")
            .arg(self.key("bytes"))
            .query_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        stats.bytes = bytes.map_or(0, |bytes| bytes.max(0) as u64);
        Ok(stats)
    }

    /// Waiting callbacks and dead letters, oldest first, at most `limit`.
    pub async fn list(&self, limit: usize) -> Result<Vec<Spooled>, SpoolError> {
        let mut all = Vec::new();
        for partner in self.partners().await? {
            all.extend(self.waiting_of(&partner, limit).await?);
        }
        all.extend(self.dead_letters().await?);
        all.sort_by(|a, b| (a.received_ms, &a.id).cmp(&(b.received_ms, &b.id)));
        all.truncate(limit);
        for spooled in &mut all {
            spooled.callback.headers.clear();
            spooled.callback.body = Bytes::new();
        }
        Ok(all)
    }

    /// Where a spool id is: `Some((partner, entry))` while waiting, `Some(("", "dead"))`.
    async fn locate(&self, id: &str) -> Result<Option<(String, String)>, SpoolError> {
        let at: Option<String> = redis::cmd("HGET")
            .arg(self.key("ids"))
            .arg(id)
            .query_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        Ok(at.map(|at| match at.split_once(' ') {
            Some((partner, entry)) => (partner.to_string(), entry.to_string()),
            None => (String::new(), at),
        }))
    }

    pub async fn get(&self, id: &str) -> Result<Option<Spooled>, SpoolError> {
        match self.locate(id).await? {
            None => Ok(None),
            Some((partner, entry)) if !partner.is_empty() => Ok(self
                .waiting_of(&partner, usize::MAX)
                .await?
                .into_iter()
                .find(|spooled| spooled.entry.as_deref() == Some(entry.as_str()))),
            Some(_) => self.dead_letter_of(id).await,
        }
    }

    pub async fn retry(&self, set: RetrySet, now_ms: i64) -> Result<u64, SpoolError> {
        match set {
            RetrySet::One(id) => match self.locate(&id).await? {
                None => Ok(0),
                Some((partner, entry)) if !partner.is_empty() => {
                    self.due_now(&partner, Some(&entry), now_ms).await
                }
                Some(_) => self.revive_one(&id).await,
            },
            RetrySet::Dead => {
                let mut revived = 0;
                for letter in self.dead_letters().await? {
                    revived += self.revive_one(&letter.id).await?;
                }
                Ok(revived)
            }
            RetrySet::Pending => {
                let mut changed = 0;
                for partner in self.partners().await? {
                    changed += self.due_now(&partner, None, now_ms).await?;
                }
                Ok(changed)
            }
        }
    }

    /// Makes a partner's waiting callbacks (or one of them) due now, their attempts kept.
    async fn due_now(
        &self,
        partner: &str,
        only: Option<&str>,
        now_ms: i64,
    ) -> Result<u64, SpoolError> {
        let mut changed = 0;
        for spooled in self.waiting_of(partner, usize::MAX).await? {
            let entry = spooled.entry.clone().unwrap_or_default();
            if only.is_some_and(|only| only != entry) {
                continue;
            }
            changed += 1;
            if spooled.attempts == 0 {
                continue;
            }
            let state = format!(
                "{}|{now_ms}|{}",
                spooled.attempts,
                spooled.last_error.unwrap_or_default()
            );
            let _: i64 = redis::cmd("HSET")
                .arg(self.retry_state(partner))
                .arg(&entry)
                .arg(state)
                .query_async(&mut self.connection())
                .await
                .map_err(unavailable)?;
        }
        Ok(changed)
    }

    async fn revive_one(&self, id: &str) -> Result<u64, SpoolError> {
        let partner: Option<String> = redis::cmd("HGET")
            .arg(self.dead_letter(id))
            .arg("partner")
            .query_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        let Some(partner) = partner else {
            return Ok(0);
        };
        let revived: u64 = self
            .revive
            .key(self.dead_letter(id))
            .key(self.key("dead"))
            .key(self.key("ids"))
            .key(self.stream(&partner))
            .key(self.key("partners"))
            .arg(id)
            .arg(&partner)
            .invoke_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        Ok(revived)
    }

    pub async fn drop_one(&self, id: &str) -> Result<bool, SpoolError> {
        let mut connection = self.connection();
        let dropped: i64 = match self.locate(id).await? {
            None => 0,
            Some((partner, entry)) if !partner.is_empty() => self
                .remove
                .key(self.stream(&partner))
                .key(self.retry_state(&partner))
                .key(self.key("ids"))
                .key(self.key("bytes"))
                .arg(entry)
                .arg(id)
                .invoke_async(&mut connection)
                .await
                .map_err(unavailable)?,
            Some(_) => self
                .forget
                .key(self.dead_letter(id))
                .key(self.key("dead"))
                .key(self.key("ids"))
                .key(self.key("bytes"))
                .arg(id)
                .invoke_async(&mut connection)
                .await
                .map_err(unavailable)?,
        };
        Ok(dropped > 0)
    }

    /// Gives up this replica's leases (at shutdown), so another replica delivers its partners at
    /// once rather than after `LEASE`.
    pub async fn release_leases(&self) {
        let Ok(partners) = self.partners().await else {
            return;
        };
        for partner in partners {
            let released: Result<i64, _> = self
                .release
                .key(self.key(&format!("lease:{partner}")))
                .arg(&self.consumer)
                .invoke_async(&mut self.connection())
                .await;
            if let Err(err) = released {
                tracing::warn!(error = %err, "could not give up a spool lease; it lapses on its own");
            }
        }
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(text) => text.clone(),
        Value::Int(number) => number.to_string(),
        _ => String::new(),
    }
}

/// A stream entry's flat field list as a map.
fn fields_of(value: &Value) -> HashMap<String, Vec<u8>> {
    let mut fields = HashMap::new();
    if let Value::Array(flat) = value {
        for pair in flat.chunks(2) {
            if let [name, Value::BulkString(value)] = pair {
                fields.insert(text(name), value.clone());
            }
        }
    }
    fields
}

fn field_text(fields: &HashMap<String, Vec<u8>>, name: &str) -> String {
    fields
        .get(name)
        .map(|value| String::from_utf8_lossy(value).into_owned())
        .unwrap_or_default()
}

/// A waiting callback from its stream entry and retry state (`attempts|next ms|error`).
fn waiting(
    partner: &str,
    entry: String,
    fields: &HashMap<String, Vec<u8>>,
    state: &str,
) -> Spooled {
    let number = |name: &str| field_text(fields, name).parse::<i64>().unwrap_or(0);
    let mut state = state.splitn(3, '|');
    let attempts = state.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let received_ms = number("received_ms");
    let next_attempt_ms = state
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(received_ms);
    let last_error = state.next().map(str::to_string);
    Spooled {
        seq: 0,
        entry: Some(entry),
        id: field_text(fields, "id"),
        received_ms,
        attempts,
        next_attempt_ms,
        last_error,
        dead_ms: None,
        callback: NewCallback {
            partner: partner.to_string(),
            method: field_text(fields, "method"),
            target: field_text(fields, "target"),
            headers: decode_headers(fields.get("headers").map_or(&[][..], Vec::as_slice)),
            body: Bytes::from(fields.get("body").cloned().unwrap_or_default()),
        },
    }
}
