//! Signals: SIGTERM/SIGINT start the drain, SIGHUP reloads the secrets.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use crate::server::reload;
use crate::server::shared::Shared;

/// SIGTERM/SIGINT: readiness turns 503 and the proxy drains; a second one exits at once.
/// SIGHUP: reload the secrets.
pub async fn handle_signals(shared: Arc<Shared>, stop: watch::Sender<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
            _ = hup.recv() => {
                reload::reload(&shared, "SIGHUP");
                continue;
            }
        }
        if shared.draining.swap(true, Ordering::SeqCst) {
            tracing::warn!("second shutdown signal: exiting now");
            std::process::exit(1);
        }
        tracing::info!("shutdown signal: draining");
        let _ = stop.send(true);
    }
}
