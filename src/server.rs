//! Starting and stopping: binds both listeners, runs the accept loops, reloads secrets on SIGHUP
//! and drains gracefully on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::admin::Admin;
use crate::config::Config;
use crate::framing::Watched;
use crate::metrics::Metrics;
use crate::proxy::{Peer, Proxy};
use crate::replay::AnyStore;
use crate::secrets::{self, SecretStore};

/// A pause after a failed accept (usually out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// State shared by the proxy, the admin server and the signal handlers.
pub struct Shared {
    /// The configuration lfguard started with; a reload replaces only `secrets`.
    pub config: Arc<Config>,
    /// Where the configuration came from, re-read on reload.
    pub config_path: Option<PathBuf>,
    pub secrets: Arc<ArcSwap<SecretStore>>,
    pub replay: Arc<AnyStore>,
    pub metrics: Arc<Metrics>,
    /// Set once shutdown begins: readiness answers 503 from then on.
    pub draining: AtomicBool,
}

/// Runs lfguard until a shutdown signal, then drains. Returns once every connection closed or
/// `server.shutdown_grace` passed.
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), String> {
    let config = Arc::new(config);
    let secrets = SecretStore::load(&config).map_err(|problems| problems.join("; "))?;
    for (code, partner) in &config.partners {
        if !partner.secrets.is_empty() {
            tracing::warn!(partner = %code, "inline secrets in the config file are for development only; use secret_files, secret_env or partners_dir");
        }
    }
    let shared = Arc::new(Shared {
        secrets: Arc::new(ArcSwap::from_pointee(secrets)),
        replay: AnyStore::from_config(&config).map_err(|err| err.0)?,
        metrics: Arc::new(Metrics::new()),
        draining: AtomicBool::new(false),
        config: config.clone(),
        config_path,
    });

    let proxy_listener = bind(config.server.listen, "proxy").await?;
    let admin_listener = bind(config.server.admin_listen, "admin").await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let admin = Arc::new(Admin::new(shared.clone()));
    let admin_task = tokio::spawn(serve_admin(admin_listener, admin));
    let reloader = tokio::spawn(secrets::watch(shared.clone(), stop_rx.clone()));
    let signals = tokio::spawn(handle_signals(shared.clone(), stop_tx));

    let proxy = Arc::new(Proxy::new(
        config.clone(),
        shared.secrets.clone(),
        shared.replay.clone(),
        shared.metrics.clone(),
    ));
    let idle_closer = tokio::spawn(proxy.upstream().clone().close_idle_connections());
    tracing::info!(
        partners = shared.secrets.load().partner_count(),
        replay_store = shared.replay.kind(),
        upstream = %config.upstream.url,
        "ready"
    );
    serve_proxy(proxy_listener, proxy, &config, stop_rx).await;
    signals.abort();
    idle_closer.abort();
    reloader.abort();
    admin_task.abort();
    tracing::info!("stopped");
    Ok(())
}

async fn bind(addr: SocketAddr, name: &'static str) -> Result<TcpListener, String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|err| format!("cannot listen on {addr} ({name}): {err}"))?;
    let local = listener
        .local_addr()
        .map_err(|err| format!("{name} listener: {err}"))?;
    // Tests and scripts read this event to learn an ephemeral port.
    tracing::info!(listener = name, addr = %local, "listening");
    Ok(listener)
}

fn http1_builder(config: &Config) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.server.header_read_timeout)
        .max_buf_size(config.server.max_header_bytes)
        .max_headers(config.server.max_headers)
        .keep_alive(true);
    builder
}

/// Accepts until `stop` turns true. At most `server.max_connections` connections are served at
/// once; further ones wait in the listen backlog rather than being dropped.
async fn serve_proxy(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    config: &Config,
    mut stop: watch::Receiver<bool>,
) {
    let builder = http1_builder(config);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(config.server.max_connections));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let client = Arc::new(Peer::new(peer));
        let stream = Watched::new(
            stream,
            client.head_watch().clone(),
            config.server.max_header_bytes,
        );
        let service = service_fn(move |request| proxy.clone().handle(request, client.clone()));
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, peer = %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let grace = config.server.shutdown_grace;
    tracing::info!(connections = graceful.count(), grace = %humantime::format_duration(grace), "draining");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace ended with requests still in flight");
    }
}

/// Runs until aborted: it keeps answering (readiness 503) while the proxy drains.
async fn serve_admin(listener: TcpListener, admin: Arc<Admin>) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "admin accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let admin = admin.clone();
        let service = service_fn(move |request| admin.clone().handle(request));
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

/// SIGTERM/SIGINT: readiness turns 503 and the proxy drains; a second one exits at once.
/// SIGHUP: reload the secrets.
async fn handle_signals(shared: Arc<Shared>, stop: watch::Sender<bool>) {
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
                secrets::reload(&shared, "SIGHUP");
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
