//! Structured logs with `tracing`: JSON lines by default (one event per request), or text.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// `RUST_LOG` wins over `log.level` when set.
pub fn init(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let _ = match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
