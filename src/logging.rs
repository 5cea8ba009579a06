//! Structured logs with `tracing`: JSON lines by default (one event per request), or text.
//!
//! Events are written to stdout by a background thread, so a slow log pipe (a busy container
//! runtime) never stalls request handling until its buffer of lines is full; then the request
//! path waits rather than dropping events.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Lines buffered between the request path and the writer thread.
const BUFFERED_LINES: usize = 4096;

/// `RUST_LOG` wins over `log.level` when set. Keep the guard until exit: dropping it flushes.
pub fn init(config: &LogConfig) -> WorkerGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("lfguard-log")
        .finish(std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    guard
}
