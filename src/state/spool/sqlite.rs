//! The embedded spool: one SQLite database (`spool.db`) in `delivery.spool_dir`, in WAL mode, with
//! `synchronous = FULL` for every commit that holds an accepted callback, so a callback is on disk
//! when `accept` returns; `lfguard spool` can read and change it while lfguard serves.
//!
//! Group commit: one writer thread owns the connection and takes jobs from a channel. It runs
//! every job waiting in one transaction and one fsync, then answers each: while one commit is on
//! its way to the disk the next callbacks queue up, so a burst costs a few fsyncs, not one each.
//! A job's answer is sent only after its transaction committed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::{NewCallback, Outcome, RetrySet, SpoolError, Spooled, Stats, new_id};

/// The database's file name in `delivery.spool_dir`.
pub const FILE_NAME: &str = "spool.db";

/// The most jobs in one transaction: bounds the time the first of them waits.
const MAX_BATCH: usize = 512;

/// How long a writer waits for another process (`lfguard spool`) to finish writing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the writer recounts the bytes held and the partners waiting, which another process
/// (`lfguard spool drop`, `retry`) may have changed.
const RESYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Small columns first: reading them never touches a large body's overflow pages.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS callbacks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    partner TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    size INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    dead_ms INTEGER,
    last_error TEXT,
    method TEXT NOT NULL,
    target TEXT NOT NULL,
    headers BLOB NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS waiting ON callbacks (partner, seq) WHERE dead_ms IS NULL;
";

const COLUMNS: &str = "seq, id, partner, received_ms, attempts, next_attempt_ms, dead_ms, \
                       last_error, method, target, headers, body";

/// A job for the writer: runs inside the batch's transaction and returns what to do once the
/// transaction committed (or failed to). A durable job's batch is committed with an fsync.
struct Job {
    durable: bool,
    run: Run,
}
type Run = Box<dyn FnOnce(&Transaction<'_>, &mut Counts) -> Done + Send>;
type Done = Box<dyn FnOnce(Result<(), SpoolError>) + Send>;

/// What the writer keeps in memory to answer without scanning the table.
struct Counts {
    bytes: u64,
    max_bytes: u64,
    /// Partners with callbacks waiting (a superset: one found empty is removed).
    partners: BTreeSet<String>,
    resynced: Instant,
}

pub struct SqliteSpool {
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
}

fn unavailable(err: impl std::fmt::Display) -> SpoolError {
    SpoolError::Unavailable(format!("spool: {err}"))
}

impl SqliteSpool {
    /// Opens (creating the directory and the database when missing) the spool in `dir`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<SqliteSpool, SpoolError> {
        std::fs::create_dir_all(dir)
            .map_err(|err| unavailable(format_args!("{}: {err}", dir.display())))?;
        Self::open_file(&dir.join(FILE_NAME), max_bytes)
    }

    /// Opens the spool in `dir` only if it exists (for `lfguard spool`, which must not create
    /// one where lfguard never wrote).
    pub fn open_existing(dir: &Path, max_bytes: u64) -> Result<SqliteSpool, SpoolError> {
        let path = dir.join(FILE_NAME);
        if !path.is_file() {
            return Err(unavailable(format_args!(
                "{} does not exist (lfguard creates it when it starts with delivery.spool_dir set)",
                path.display()
            )));
        }
        Self::open_file(&path, max_bytes)
    }

    fn open_file(path: &Path, max_bytes: u64) -> Result<SqliteSpool, SpoolError> {
        let at = |err: rusqlite::Error| unavailable(format_args!("{}: {err}", path.display()));
        let connection = Connection::open(path).map_err(at)?;
        connection.busy_timeout(BUSY_TIMEOUT).map_err(at)?;
        let mode: String = connection
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(at)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(unavailable(format_args!(
                "{}: the journal mode is {mode}, not WAL",
                path.display()
            )));
        }
        connection
            .execute_batch("PRAGMA synchronous = FULL;")
            .map_err(at)?;
        connection.execute_batch(SCHEMA).map_err(at)?;
        let mut counts = Counts {
            bytes: 0,
            max_bytes,
            partners: BTreeSet::new(),
            resynced: Instant::now(),
        };
        counts.resync(&connection).map_err(at)?;
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("lfguard-spool".into())
            .spawn(move || write(connection, queue, counts))
            .map_err(unavailable)?;
        Ok(SqliteSpool {
            jobs,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `op` in the writer's next transaction; its result once that transaction committed,
    /// on disk (fsync) when `durable`.
    async fn run<T: Send + 'static>(
        &self,
        durable: bool,
        op: impl FnOnce(&Transaction<'_>, &mut Counts) -> Result<T, SpoolError> + Send + 'static,
    ) -> Result<T, SpoolError> {
        let (answer, answered) = oneshot::channel();
        let job = Job {
            durable,
            run: Box::new(move |transaction, counts| {
                let result = op(transaction, counts);
                Box::new(move |committed| {
                    let _ = answer.send(committed.and(result));
                })
            }),
        };
        self.jobs
            .send(job)
            .map_err(|_| unavailable("the spool's writer stopped"))?;
        answered
            .await
            .map_err(|_| unavailable("the spool's writer stopped"))?
    }

    /// Keeps a callback received at `now_ms`; `Ok(id)` once it is on disk.
    pub async fn accept(&self, callback: NewCallback, now_ms: i64) -> Result<String, SpoolError> {
        self.run(true, move |transaction, counts| {
            let size = callback.size();
            if counts.bytes.saturating_add(size) > counts.max_bytes {
                return Err(SpoolError::Full);
            }
            let id = new_id();
            transaction
                .prepare_cached(
                    "INSERT INTO callbacks (id, partner, received_ms, size, attempts, \
                     next_attempt_ms, method, target, headers, body) \
                     VALUES (?1, ?2, ?3, ?4, 0, ?3, ?5, ?6, ?7, ?8)",
                )
                .and_then(|mut insert| {
                    insert.execute(params![
                        id,
                        callback.partner,
                        now_ms,
                        size as i64,
                        callback.method,
                        callback.target,
                        encode_headers(&callback.headers),
                        &callback.body[..],
                    ])
                })
                .map_err(unavailable)?;
            counts.bytes += size;
            counts.partners.insert(callback.partner);
            Ok(id)
        })
        .await
    }

    /// The oldest waiting callback of each partner (due or not): the only one of its partner that
    /// may be delivered now, so that each partner's callbacks arrive in order.
    pub async fn heads(&self) -> Result<Vec<Spooled>, SpoolError> {
        self.run(false, |transaction, counts| {
            if counts.resynced.elapsed() >= RESYNC_INTERVAL {
                counts.resync(transaction).map_err(unavailable)?;
            }
            let mut statement = transaction
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM callbacks WHERE partner = ?1 AND dead_ms IS NULL \
                     ORDER BY seq LIMIT 1"
                ))
                .map_err(unavailable)?;
            let mut heads = Vec::new();
            let mut empty = Vec::new();
            for partner in &counts.partners {
                match statement
                    .query_row([partner], spooled)
                    .optional()
                    .map_err(unavailable)?
                {
                    Some(head) => heads.push(head),
                    None => empty.push(partner.clone()),
                }
            }
            for partner in empty {
                counts.partners.remove(&partner);
            }
            Ok(heads)
        })
        .await
    }

    /// Records how an attempt at callback `seq` ended. A callback dropped meanwhile (by
    /// `lfguard spool drop`) stays dropped.
    pub async fn record(&self, seq: i64, outcome: Outcome, now_ms: i64) -> Result<(), SpoolError> {
        self.run(false, move |transaction, counts| {
            match outcome {
                Outcome::Delivered => {
                    let size: Option<i64> = transaction
                        .prepare_cached("DELETE FROM callbacks WHERE seq = ?1 RETURNING size")
                        .and_then(|mut delete| delete.query_row([seq], |row| row.get(0)))
                        .optional()
                        .map_err(unavailable)?;
                    counts.bytes = counts
                        .bytes
                        .saturating_sub(size.map_or(0, |size| size as u64));
                }
                Outcome::Retry { at_ms, error } => {
                    transaction
                        .prepare_cached(
                            "UPDATE callbacks SET attempts = attempts + 1, next_attempt_ms = ?2, \
                             last_error = ?3 WHERE seq = ?1 AND dead_ms IS NULL",
                        )
                        .and_then(|mut update| update.execute(params![seq, at_ms, error]))
                        .map_err(unavailable)?;
                }
                Outcome::Dead { error } => {
                    transaction
                        .execute(
                            "UPDATE callbacks SET attempts = attempts + 1, dead_ms = ?2, \
                             last_error = ?3 WHERE seq = ?1 AND dead_ms IS NULL",
                            params![seq, now_ms, error],
                        )
                        .map_err(unavailable)?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Counts by partner and state, the bytes held and the oldest waiting callback.
    pub async fn stats(&self) -> Result<Stats, SpoolError> {
        self.run(false, |transaction, counts| {
            let mut stats = Stats {
                max_bytes: counts.max_bytes,
                ..Stats::default()
            };
            let mut statement = transaction
                .prepare_cached(
                    "SELECT partner, dead_ms IS NOT NULL, COUNT(*), SUM(size), MIN(received_ms) \
                     FROM callbacks GROUP BY partner, dead_ms IS NOT NULL",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, bool>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, i64>(3)?,
                        row.get::<_, i64>(4)?,
                    ))
                })
                .map_err(unavailable)?;
            for row in rows {
                let (partner, dead, count, bytes, oldest) = row.map_err(unavailable)?;
                let (count, bytes) = (count as u64, bytes as u64);
                let partner = stats.partners.entry(partner).or_default();
                stats.bytes += bytes;
                if dead {
                    partner.dead += count;
                    stats.dead += count;
                } else {
                    partner.pending += count;
                    stats.pending += count;
                    stats.oldest_pending_ms = Some(
                        stats
                            .oldest_pending_ms
                            .map_or(oldest, |before| before.min(oldest)),
                    );
                }
            }
            Ok(stats)
        })
        .await
    }

    /// Every callback held, in arrival order, without their headers and bodies; at most `limit`.
    pub async fn list(&self, limit: usize) -> Result<Vec<Spooled>, SpoolError> {
        self.run(false, move |transaction, _| {
            let mut statement = transaction
                .prepare_cached(
                    "SELECT seq, id, partner, received_ms, attempts, next_attempt_ms, dead_ms, \
                     last_error, method, target, x'', x'' FROM callbacks ORDER BY seq LIMIT ?1",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map([limit as i64], spooled)
                .map_err(unavailable)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
        })
        .await
    }

    /// One callback, whole, by its id.
    pub async fn get(&self, id: &str) -> Result<Option<Spooled>, SpoolError> {
        let id = id.to_string();
        self.run(false, move |transaction, _| {
            transaction
                .query_row(
                    &format!("SELECT {COLUMNS} FROM callbacks WHERE id = ?1"),
                    [id],
                    spooled,
                )
                .optional()
                .map_err(unavailable)
        })
        .await
    }

    /// Makes callbacks due now: a dead letter waits again, with its attempts counted from zero.
    /// Returns how many.
    pub async fn retry(&self, set: RetrySet, now_ms: i64) -> Result<u64, SpoolError> {
        self.run(true, move |transaction, counts| {
            let changed = match &set {
                RetrySet::One(id) => transaction.execute(
                    "UPDATE callbacks SET dead_ms = NULL, attempts = 0, next_attempt_ms = ?1 \
                     WHERE id = ?2",
                    params![now_ms, id],
                ),
                RetrySet::Dead => transaction.execute(
                    "UPDATE callbacks SET dead_ms = NULL, attempts = 0, next_attempt_ms = ?1 \
                     WHERE dead_ms IS NOT NULL",
                    params![now_ms],
                ),
                RetrySet::Pending => transaction.execute(
                    "UPDATE callbacks SET next_attempt_ms = ?1 WHERE dead_ms IS NULL",
                    params![now_ms],
                ),
            }
            .map_err(unavailable)?;
            if changed > 0 {
                counts.resync(transaction).map_err(unavailable)?;
            }
            Ok(changed as u64)
        })
        .await
    }

    /// Removes one callback, waiting or dead, without delivering it. Whether it was there.
    pub async fn drop_one(&self, id: &str) -> Result<bool, SpoolError> {
        let id = id.to_string();
        self.run(true, move |transaction, counts| {
            let size: Option<i64> = transaction
                .query_row(
                    "DELETE FROM callbacks WHERE id = ?1 RETURNING size",
                    [id],
                    |row| row.get(0),
                )
                .optional()
                .map_err(unavailable)?;
            counts.bytes = counts
                .bytes
                .saturating_sub(size.map_or(0, |size| size as u64));
            Ok(size.is_some())
        })
        .await
    }
}

impl Counts {
    fn resync(&mut self, connection: &Connection) -> rusqlite::Result<()> {
        self.bytes =
            connection.query_row("SELECT COALESCE(SUM(size), 0) FROM callbacks", [], |row| {
                row.get::<_, i64>(0)
            })? as u64;
        let mut statement = connection
            .prepare_cached("SELECT DISTINCT partner FROM callbacks WHERE dead_ms IS NULL")?;
        self.partners = statement
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        self.resynced = Instant::now();
        Ok(())
    }
}

/// The writer thread: until every `SqliteSpool` handle is gone, takes the jobs waiting (at least
/// one), runs them in one transaction, commits, and answers each.
///
/// A batch with a durable job (an accepted callback, an operator's change) commits with
/// `synchronous = FULL`: on disk before anyone is answered. A batch of delivery bookkeeping only
/// (a callback delivered, an attempt failed) and reads commits with `NORMAL`: in WAL mode that
/// survives a crash of lfguard, and only a crash of the machine before the next fsync can undo
/// it, which delivers a callback once more (with the same spool id) and loses none.
fn write(mut connection: Connection, queue: mpsc::Receiver<Job>, mut counts: Counts) {
    let mut synchronous_full = true;
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(|job| job.durable);
        if durable != synchronous_full {
            let pragma = if durable {
                "PRAGMA synchronous = FULL"
            } else {
                "PRAGMA synchronous = NORMAL"
            };
            match connection.execute_batch(pragma) {
                Ok(()) => synchronous_full = durable,
                Err(err) => tracing::warn!(error = %err, "the spool could not set {pragma}"),
            }
        }
        let transaction = match connection.transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Ok(transaction) => transaction,
            Err(err) => {
                // The jobs are dropped unrun: each caller is answered that the spool is
                // unavailable.
                tracing::warn!(error = %err, "the spool could not begin a transaction");
                drop(batch);
                continue;
            }
        };
        let done: Vec<Done> = batch
            .into_iter()
            .map(|job| (job.run)(&transaction, &mut counts))
            .collect();
        let committed = transaction.commit().map_err(unavailable);
        if committed.is_err() {
            // Rolled back: what the jobs counted did not happen.
            if let Err(err) = counts.resync(&connection) {
                tracing::warn!(error = %err, "the spool could not recount what it holds");
            }
        }
        for done in done {
            done(committed.clone());
        }
    }
}

/// A row of `COLUMNS` as a `Spooled`.
fn spooled(row: &rusqlite::Row<'_>) -> rusqlite::Result<Spooled> {
    let headers: Vec<u8> = row.get(10)?;
    let body: Vec<u8> = row.get(11)?;
    Ok(Spooled {
        seq: row.get(0)?,
        entry: None,
        id: row.get(1)?,
        received_ms: row.get(3)?,
        attempts: row.get(4)?,
        next_attempt_ms: row.get(5)?,
        dead_ms: row.get(6)?,
        last_error: row.get(7)?,
        callback: NewCallback {
            partner: row.get(2)?,
            method: row.get(8)?,
            target: row.get(9)?,
            headers: decode_headers(&headers),
            body: Bytes::from(body),
        },
    })
}

/// Headers as in an HTTP/1.1 head, `name: value` lines ending in CRLF (a value holds no CR or
/// LF): readable in the database and in `lfguard spool show`.
pub(super) fn encode_headers(headers: &[(String, Bytes)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out
}

pub(super) fn decode_headers(encoded: &[u8]) -> Vec<(String, Bytes)> {
    let mut headers = Vec::new();
    let mut rest = encoded;
    while let Some(end) = rest.windows(2).position(|pair| pair == b"\r\n") {
        let line = &rest[..end];
        rest = &rest[end + 2..];
        if let Some(colon) = line.windows(2).position(|pair| pair == b": ") {
            headers.push((
                String::from_utf8_lossy(&line[..colon]).into_owned(),
                Bytes::copy_from_slice(&line[colon + 2..]),
            ));
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::spool::PartnerCounts;

    fn callback(partner: &str, n: usize) -> NewCallback {
        NewCallback {
            partner: partner.into(),
            method: "POST".into(),
            target: format!("/callback?n={n}"),
            headers: vec![
                (
                    "content-type".into(),
                    Bytes::from_static(b"application/json"),
                ),
                ("x-odd".into(), Bytes::from_static(b"caf\xe9: a")),
            ],
            body: Bytes::from(format!("{{\"n\":{n}}}")),
        }
    }

    #[test]
    fn headers_read_back_as_written() {
        let headers = callback("P", 1).headers;
        assert_eq!(decode_headers(&encode_headers(&headers)), headers);
    }

    #[tokio::test]
    async fn callbacks_come_back_in_order_per_partner_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let spool = SqliteSpool::open(dir.path(), 1 << 20).unwrap();
        let mut ids = Vec::new();
        for n in 0..3 {
            ids.push(spool.accept(callback("A", n), 1000).await.unwrap());
            spool.accept(callback("B", n), 1000).await.unwrap();
        }
        let heads = spool.heads().await.unwrap();
        assert_eq!(heads.len(), 2);
        assert_eq!(heads[0].id, ids[0]);
        assert_eq!(heads[0].callback, callback("A", 0));
        spool
            .record(heads[0].seq, Outcome::Delivered, 2000)
            .await
            .unwrap();
        spool
            .record(
                heads[1].seq,
                Outcome::Dead {
                    error: "400".into(),
                },
                2000,
            )
            .await
            .unwrap();
        drop(spool);

        let spool = SqliteSpool::open(dir.path(), 1 << 20).unwrap();
        let heads = spool.heads().await.unwrap();
        assert_eq!(
            heads
                .iter()
                .map(|h| h.callback.target.as_str())
                .collect::<Vec<_>>(),
            ["/callback?n=1", "/callback?n=1"]
        );
        assert_eq!(heads[0].id, ids[1]);
        let stats = spool.stats().await.unwrap();
        assert_eq!((stats.pending, stats.dead), (4, 1));
        assert_eq!(
            stats.partners["B"],
            PartnerCounts {
                pending: 2,
                dead: 1
            }
        );
        assert_eq!(stats.oldest_pending_ms, Some(1000));
        assert_eq!(spool.retry(RetrySet::Dead, 3000).await.unwrap(), 1);
        let heads = spool.heads().await.unwrap();
        assert_eq!(
            heads[1].callback.target, "/callback?n=0",
            "back at its place"
        );
        assert_eq!(heads[1].attempts, 0);
    }

    #[tokio::test]
    async fn a_full_spool_refuses_and_frees_room_as_callbacks_leave() {
        let dir = tempfile::tempdir().unwrap();
        let size = callback("A", 1).size();
        let spool = SqliteSpool::open(dir.path(), size * 2).unwrap();
        spool.accept(callback("A", 1), 1).await.unwrap();
        let second = spool.accept(callback("A", 2), 1).await.unwrap();
        assert_eq!(
            spool.accept(callback("A", 3), 1).await,
            Err(SpoolError::Full)
        );
        assert!(spool.drop_one(&second).await.unwrap());
        assert!(!spool.drop_one(&second).await.unwrap());
        spool.accept(callback("A", 3), 1).await.unwrap();
        assert_eq!(spool.stats().await.unwrap().bytes, size * 2);
    }

    #[tokio::test]
    async fn concurrent_accepts_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let spool = std::sync::Arc::new(SqliteSpool::open(dir.path(), 1 << 30).unwrap());
        let tasks: Vec<_> = (0..200)
            .map(|n| {
                let spool = spool.clone();
                tokio::spawn(async move { spool.accept(callback("A", n), 1).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(spool.stats().await.unwrap().pending, 200);
    }

    /// One step of a random history: what lfguard, the worker, an operator or a crash does.
    #[derive(Debug, Clone)]
    enum Step {
        Accept(usize),
        /// The head of a partner (index into the heads) delivered.
        Deliver(usize),
        /// The head of a partner failed: retried later, or dead-lettered.
        Fail(usize, bool),
        RetryDead,
        DropOldest,
        /// The process goes away and the spool is opened again.
        Crash,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..3usize).prop_map(Step::Accept),
            3 => (0..3usize).prop_map(Step::Deliver),
            2 => ((0..3usize), any::<bool>()).prop_map(|(i, dead)| Step::Fail(i, dead)),
            1 => Just(Step::RetryDead),
            1 => Just(Step::DropOldest),
            1 => Just(Step::Crash),
        ]
    }

    /// The model: every callback held, in arrival order, with its partner, its number and
    /// whether it is dead.
    #[derive(Debug, Default)]
    struct Model {
        held: Vec<(String, usize, bool)>,
    }

    impl Model {
        /// Each partner's oldest waiting callback, by partner.
        fn heads(&self) -> Vec<(String, usize)> {
            let mut heads: Vec<(String, usize)> = Vec::new();
            for (partner, n, dead) in &self.held {
                if !dead && !heads.iter().any(|(p, _)| p == partner) {
                    heads.push((partner.clone(), *n));
                }
            }
            heads.sort();
            heads
        }
    }

    fn number(spooled: &Spooled) -> usize {
        spooled.callback.target["/callback?n=".len()..]
            .parse()
            .unwrap()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Whatever happens in whatever order, the store holds what the model holds, gives each
        /// partner's oldest waiting callback as its head, and loses nothing across a reopen.
        #[test]
        fn the_store_agrees_with_a_model(steps in proptest::collection::vec(step(), 1..40)) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let mut spool = SqliteSpool::open(dir.path(), 1 << 30).unwrap();
            let mut model = Model::default();
            let mut next = 0;
            for step in steps {
                let heads = runtime.block_on(spool.heads()).unwrap();
                let mut sorted: Vec<&Spooled> = heads.iter().collect();
                sorted.sort_by_key(|h| h.callback.partner.clone());
                match step {
                    Step::Accept(partner) => {
                        let partner = format!("P{partner}");
                        runtime.block_on(spool.accept(callback(&partner, next), 1)).unwrap();
                        model.held.push((partner, next, false));
                        next += 1;
                    }
                    Step::Deliver(i) | Step::Fail(i, _) if i >= sorted.len() => {}
                    Step::Deliver(i) => {
                        let head = sorted[i];
                        runtime.block_on(spool.record(head.seq, Outcome::Delivered, 2)).unwrap();
                        let n = number(head);
                        model.held.retain(|(_, held, _)| *held != n);
                    }
                    Step::Fail(i, dead) => {
                        let head = sorted[i];
                        let outcome = if dead {
                            Outcome::Dead { error: "no".into() }
                        } else {
                            Outcome::Retry { at_ms: 5, error: "later".into() }
                        };
                        runtime.block_on(spool.record(head.seq, outcome, 2)).unwrap();
                        let n = number(head);
                        for held in &mut model.held {
                            if held.1 == n {
                                held.2 = dead;
                            }
                        }
                    }
                    Step::RetryDead => {
                        let dead = model.held.iter().filter(|h| h.2).count() as u64;
                        proptest::prop_assert_eq!(
                            runtime.block_on(spool.retry(RetrySet::Dead, 3)).unwrap(),
                            dead
                        );
                        for held in &mut model.held {
                            held.2 = false;
                        }
                    }
                    Step::DropOldest => {
                        let listed = runtime.block_on(spool.list(1)).unwrap();
                        if let Some(oldest) = listed.first() {
                            proptest::prop_assert!(runtime.block_on(spool.drop_one(&oldest.id)).unwrap());
                            model.held.remove(0);
                        }
                    }
                    Step::Crash => {
                        drop(spool);
                        spool = SqliteSpool::open(dir.path(), 1 << 30).unwrap();
                    }
                }
                let heads = runtime.block_on(spool.heads()).unwrap();
                let mut found: Vec<(String, usize)> = heads
                    .iter()
                    .map(|h| (h.callback.partner.clone(), number(h)))
                    .collect();
                found.sort();
                proptest::prop_assert_eq!(&found, &model.heads());
                let listed: Vec<(String, usize, bool)> = runtime
                    .block_on(spool.list(1000))
                    .unwrap()
                    .iter()
                    .map(|h| (h.callback.partner.clone(), number(h), h.dead_ms.is_some()))
                    .collect();
                proptest::prop_assert_eq!(&listed, &model.held);
                let stats = runtime.block_on(spool.stats()).unwrap();
                let size = callback("P0", 0).size();
                proptest::prop_assert_eq!(stats.pending + stats.dead, model.held.len() as u64);
                // Bodies differ in length by their number's digits only.
                proptest::prop_assert!(stats.bytes >= size * model.held.len() as u64);
            }
        }
    }
}
