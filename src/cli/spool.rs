//! `lfguard spool stats | list | show ID | retry [ID|--dead] | drop ID`: the spool of the
//! configuration (`delivery.spool_dir`), read and changed beside a running lfguard (SQLite's WAL
//! lets both use it at once; the running lfguard picks up a change within a second).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::state::spool::{RetrySet, Spooled, now_ms};
use crate::verify::duration::Short;

#[derive(Debug, Args)]
pub struct SpoolArgs {
    /// Configuration file (TOML) whose delivery.spool_dir names the spool, as for serve.
    #[arg(long, global = true, env = crate::config::CONFIG_ENV, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub action: SpoolAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum SpoolAction {
    /// Counts: callbacks waiting, dead letters, bytes held, the oldest waiting, per partner.
    Stats,
    /// The spooled callbacks, oldest first: id, partner, state, attempts, age, path, last error.
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 1000, value_name = "N")]
        limit: usize,
    },
    /// One callback whole: its state, the request's head and body.
    Show {
        /// The spool id (as in `list`, and the x-lfguard-spool-id header).
        id: String,
    },
    /// Make callbacks due now: one by id, every dead letter (--dead), or every waiting one.
    Retry {
        /// The spool id of one callback, waiting or dead.
        id: Option<String>,
        /// Every dead letter (their attempts are counted anew).
        #[arg(long, conflicts_with = "id")]
        dead: bool,
    },
    /// Remove one callback, waiting or dead, without delivering it.
    Drop {
        /// The spool id.
        id: String,
    },
}

/// Runs a spool command; `Ok(false)` (exit 1) when the callback named is not in the spool.
pub async fn spool(args: &SpoolArgs, config: &Config) -> Result<bool, String> {
    if !config.delivery.has_spool() {
        return Err(
            "delivery.spool_dir is not set in this configuration: there is no spool".into(),
        );
    }
    let store = config
        .spool_place()
        .open(false)
        .map_err(|err| err.to_string())?;
    let now = now_ms();
    match &args.action {
        SpoolAction::Stats => {
            let stats = store.stats().await.map_err(|err| err.to_string())?;
            let mut out = format!("store: {}\n", store.describe());
            let _ = writeln!(out, "waiting: {}", stats.pending);
            let _ = writeln!(out, "dead letters: {}", stats.dead);
            let _ = writeln!(out, "bytes: {} of {}", stats.bytes, stats.max_bytes);
            if let Some(oldest) = stats.oldest_pending_ms {
                let _ = writeln!(out, "oldest waiting: {} old", age(now, oldest));
            }
            for (partner, counts) in &stats.partners {
                let _ = writeln!(
                    out,
                    "partner {partner}: {} waiting, {} dead",
                    counts.pending, counts.dead
                );
            }
            print!("{out}");
            Ok(true)
        }
        SpoolAction::List { limit } => {
            let callbacks = store.list(*limit).await.map_err(|err| err.to_string())?;
            let mut out = String::from("ID\tPARTNER\tSTATE\tATTEMPTS\tAGE\tPATH\tLAST ERROR\n");
            for spooled in &callbacks {
                let _ = writeln!(
                    out,
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    spooled.id,
                    spooled.callback.partner,
                    state(spooled),
                    spooled.attempts,
                    age(now, spooled.received_ms),
                    spooled.callback.target,
                    spooled.last_error.as_deref().unwrap_or("-"),
                );
            }
            print!("{out}");
            Ok(true)
        }
        SpoolAction::Show { id } => {
            let Some(spooled) = store.get(id).await.map_err(|err| err.to_string())? else {
                eprintln!("lfguard: no callback {id} in the spool");
                return Ok(false);
            };
            print!("{}", show(&spooled, now));
            Ok(true)
        }
        SpoolAction::Retry { id, dead } => {
            let set = match (id, dead) {
                (Some(id), _) => RetrySet::One(id.clone()),
                (None, true) => RetrySet::Dead,
                (None, false) => RetrySet::Pending,
            };
            let changed = store.retry(set, now).await.map_err(|err| err.to_string())?;
            if id.is_some() && changed == 0 {
                eprintln!(
                    "lfguard: no callback {} in the spool",
                    id.as_deref().unwrap_or("")
                );
                return Ok(false);
            }
            let noun = if changed == 1 {
                "callback"
            } else {
                "callbacks"
            };
            println!("{changed} {noun} due now");
            Ok(true)
        }
        SpoolAction::Drop { id } => {
            if store.drop_one(id).await.map_err(|err| err.to_string())? {
                println!("dropped {id}");
                Ok(true)
            } else {
                eprintln!("lfguard: no callback {id} in the spool");
                Ok(false)
            }
        }
    }
}

fn state(spooled: &Spooled) -> &'static str {
    if spooled.dead_ms.is_some() {
        "dead"
    } else {
        "waiting"
    }
}

/// `1m30s`, to the second.
fn age(now_ms: i64, then_ms: i64) -> Short {
    let seconds = u64::try_from((now_ms - then_ms) / 1000).unwrap_or(0);
    Short(Duration::from_secs(seconds))
}

/// The callback's state, then its request as the backend receives it (without the attempt
/// number and the spool id, added per attempt), the body as text where it is UTF-8.
fn show(spooled: &Spooled, now: i64) -> String {
    let callback = &spooled.callback;
    let mut out = String::new();
    let _ = writeln!(out, "id: {}", spooled.id);
    let _ = writeln!(out, "partner: {}", callback.partner);
    let _ = writeln!(out, "state: {}", state(spooled));
    let _ = writeln!(out, "accepted: {} ago", age(now, spooled.received_ms));
    let _ = writeln!(out, "attempts: {}", spooled.attempts);
    if spooled.dead_ms.is_none() {
        let wait = Duration::from_millis(u64::try_from(spooled.next_attempt_ms - now).unwrap_or(0));
        let _ = writeln!(out, "next attempt: in {}", Short(wait));
    }
    if let Some(error) = &spooled.last_error {
        let _ = writeln!(out, "last error: {error}");
    }
    let _ = writeln!(out, "\n{} {} HTTP/1.1", callback.method, callback.target);
    for (name, value) in &callback.headers {
        let _ = writeln!(out, "{name}: {}", String::from_utf8_lossy(value));
    }
    let _ = writeln!(out, "\n{}", String::from_utf8_lossy(&callback.body));
    out
}
