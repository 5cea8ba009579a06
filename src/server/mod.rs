//! Starting and stopping: binds both listeners, runs the accept loops, reloads secrets on SIGHUP
//! and drains gracefully on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::proxy::framing::Watched;
use crate::proxy::limits::BodyBudget;
use crate::proxy::upstream::Upstream;
use crate::proxy::worker::Worker;
use crate::proxy::{Peer, Proxy, Settings};
use crate::server::admin::Admin;
use crate::server::connections::Connections;
use crate::server::shared::Shared;
use crate::server::tls::ListenerTls;
use crate::state::replay::AnyStore;
use crate::state::spool::Spool;
use crate::telemetry::metrics::Metrics;
use crate::verify::duration::Short;

pub mod admin;
pub mod config;
pub mod connections;
pub mod reload;
pub mod shared;
pub mod signals;
pub mod tls;

/// How long the replay claims of requests cut at the end of `server.shutdown_grace` may take to
/// be released (a Redis store answers within its 2 s command timeout).
const CUT_RELEASE_TIMEOUT: Duration = Duration::from_secs(3);

/// A pause after a failed accept (usually out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The admin port serves three small GETs: hyper's smallest buffers and few headers suffice, so
/// a flood of admin connections holds little memory.
const ADMIN_MAX_BUF_BYTES: usize = 8192;
const ADMIN_MAX_HEADERS: usize = 32;
const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The addresses lfguard listens on (the ports the OS chose where the config says port 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

/// Runs lfguard until a shutdown signal, then drains. Returns once every connection closed or
/// `server.shutdown_grace` passed.
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), String> {
    start(config, config_path, None).await
}

/// `run`, sending the bound addresses on `ready` once lfguard serves: how a caller in the same
/// process (`lfguard demo`) learns its ephemeral ports without reading the logs.
pub async fn run_reporting(config: Config, ready: oneshot::Sender<Bound>) -> Result<(), String> {
    start(config, None, Some(ready)).await
}

async fn start(
    config: Config,
    config_path: Option<PathBuf>,
    ready: Option<oneshot::Sender<Bound>>,
) -> Result<(), String> {
    let config = Arc::new(config);
    let secrets = reload::secrets_of(&config).map_err(|problems| problems.join("; "))?;
    for (code, partner) in &config.partners {
        if !partner.secrets.is_empty() {
            tracing::warn!(partner = %code, "inline secrets in the config file are for development only; use secret_files, secret_env or partners_dir");
        }
    }
    let metrics = Arc::new(Metrics::new());
    let listener_tls = match &config.server.tls {
        Some(files) => Some(Arc::new(
            ListenerTls::load(files, config.server.header_read_timeout, metrics.clone())
                .map_err(|problems| problems.join("; "))?,
        )),
        None => None,
    };
    let upstream = Arc::new(
        Upstream::new(&config.upstream)
            .map_err(|err| format!("upstream: {err}"))?
            .with_metrics(metrics.clone()),
    );
    let shared = Arc::new(Shared {
        secrets: Arc::new(ArcSwap::from_pointee(secrets)),
        replay: AnyStore::from_config(&config.replay).map_err(|err| err.0)?,
        // Opened whenever a directory is configured, so that a reload may turn spooling on for
        // a partner; a spool that cannot be opened yet is tried again when it is needed.
        spool: config
            .delivery
            .has_spool()
            .then(|| Arc::new(Spool::new(config.spool_place()))),
        budget: Arc::new(BodyBudget::new(config.server.max_buffered_bytes)),
        proxy_connections: Connections::new(
            "proxy",
            config.server.max_connections,
            metrics.connections_shed("proxy"),
        ),
        admin_connections: Connections::new(
            "admin",
            config.server.admin_max_connections,
            metrics.connections_shed("admin"),
        ),
        metrics,
        listener_tls,
        upstream: upstream.clone(),
        draining: Arc::new(AtomicBool::new(false)),
        config: config.clone(),
        config_path,
    });

    let proxy_listener = bind(config.server.listen, "proxy", config.server.tls.is_some()).await?;
    let admin_listener = bind(config.server.admin_listen, "admin", false).await?;
    let bound = Bound {
        proxy: local_addr(&proxy_listener, "proxy")?,
        admin: local_addr(&admin_listener, "admin")?,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let admin = Arc::new(Admin::new(shared.clone()));
    let admin_task = tokio::spawn(serve_admin(
        admin_listener,
        admin,
        shared.admin_connections.clone(),
    ));
    let reloader = tokio::spawn(reload::watch(shared.clone(), stop_rx.clone()));
    let signals = tokio::spawn(signals::handle_signals(shared.clone(), stop_tx));

    let proxy = Arc::new(Proxy::new(
        proxy_settings(&config),
        upstream,
        shared.secrets.clone(),
        shared.replay.clone(),
        shared.spool.clone(),
        shared.metrics.clone(),
        shared.budget.clone(),
        shared.draining.clone(),
    ));
    // Delivers spooled callbacks; on shutdown, those in progress get `server.shutdown_grace`.
    let worker = shared.spool.clone().map(|spool| {
        let worker = Arc::new(Worker::new(
            spool,
            proxy.upstream().clone(),
            config.upstream.timeout,
            shared.metrics.clone(),
        ));
        tokio::spawn(worker.run(stop_rx.clone(), config.server.shutdown_grace))
    });
    let idle_closer = tokio::spawn(proxy.upstream().clone().close_idle_connections());
    tracing::info!(
        partners = shared.secrets.load().partner_count(),
        replay_store = shared.replay.kind(),
        spool = shared.spool.as_ref().map_or("none", |spool| spool.kind()),
        upstream = %config.upstream.url,
        "ready"
    );
    if let Some(ready) = ready {
        let _ = ready.send(bound);
    }
    serve_proxy(
        proxy_listener,
        proxy,
        shared.proxy_connections.clone(),
        shared.replay.clone(),
        shared.listener_tls.clone(),
        &config,
        stop_rx,
    )
    .await;
    if let Some(worker) = worker {
        let _ = worker.await;
    }
    signals.abort();
    idle_closer.abort();
    reloader.abort();
    admin_task.abort();
    tracing::info!("stopped");
    Ok(())
}

/// The sections the pipeline reads, and the per-request limits of `[server]`.
fn proxy_settings(config: &Config) -> Settings {
    Settings {
        verify: config.verify.clone(),
        replay: config.replay.clone(),
        delivery: config.delivery.clone(),
        upstream: config.upstream.clone(),
        routes: config.routes.clone(),
        schemas: config.schemas.clone(),
        max_body_bytes: config.server.max_body_bytes,
        body_read_timeout: config.server.body_read_timeout,
        https: config.server.tls.is_some(),
    }
}

async fn bind(addr: SocketAddr, name: &'static str, tls: bool) -> Result<TcpListener, String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|err| format!("cannot listen on {addr} ({name}): {err}"))?;
    let local = local_addr(&listener, name)?;
    // Tests and scripts read this event to learn an ephemeral port.
    tracing::info!(listener = name, addr = %local, tls, "listening");
    Ok(listener)
}

fn local_addr(listener: &TcpListener, name: &'static str) -> Result<SocketAddr, String> {
    listener
        .local_addr()
        .map_err(|err| format!("{name} listener: {err}"))
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
/// once: at the cap the connection idle the longest makes room for a new one, and if every
/// connection has a request in progress the new one waits (and those after it wait in the
/// listen backlog). Then drains: each connection finishes its request and closes.
async fn serve_proxy(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    connections: Arc<Connections>,
    replay: Arc<AnyStore>,
    tls: Option<Arc<ListenerTls>>,
    config: &Config,
    mut stop: watch::Receiver<bool>,
) {
    let builder = Arc::new(http1_builder(config));
    // Each connection's task holds a sender; `recv` answers `None` once all of them ended.
    let (live, mut drained) = mpsc::channel::<()>(1);
    // After the shutdown signal, accepting goes on until `server.drain_delay` has passed:
    // readiness fails already, but the endpoint takes a while to leave every load balancer and
    // kube-proxy, which route new connections here meanwhile.
    let delay = config.server.drain_delay;
    let (close_tx, mut close) = watch::channel(false);
    let delayed = tokio::spawn(async move {
        let _ = stop.wait_for(|stop| *stop).await;
        tracing::info!(drain_delay = %Short(delay), "still accepting while the endpoint is removed");
        tokio::time::sleep(delay).await;
        let _ = close_tx.send(true);
    });
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = close.wait_for(|close| *close) => break,
        };
        let connection = tokio::select! {
            connection = connections.admit() => connection,
            _ = close.wait_for(|close| *close) => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let client = Arc::new(Peer::new(peer));
        let watch = client.head_watch().clone();
        let max_header_bytes = config.server.max_header_bytes;
        let handler = move |request| proxy.clone().handle(request, client.clone());
        let builder = builder.clone();
        let live = live.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    let stream = Watched::new(stream, watch, max_header_bytes);
                    connection.serve(stream, &builder, handler).await;
                }
                // The handshake holds the connection's slot; the scanner reads the decrypted
                // bytes, as hyper does. Boxed: the TLS state would make every connection's task
                // several kilobytes larger, which tokio copies when it spawns it.
                Some(tls) => {
                    Box::pin(async move {
                        if let Some(Some(stream)) =
                            connection.opening(tls.accept(stream, peer)).await
                        {
                            let stream = Watched::new(stream, watch, max_header_bytes);
                            connection.serve(stream, &builder, handler).await;
                        }
                    })
                    .await
                }
            }
            drop(live);
        });
    }
    delayed.abort();
    drop(listener);
    connections.stop_all();
    drop(live);
    let grace = config.server.shutdown_grace;
    tracing::info!(connections = connections.open(), grace = %Short(grace), "draining");
    if tokio::time::timeout(grace, drained.recv()).await.is_err() {
        tracing::warn!("shutdown grace ended with requests still in flight");
        // They are dropped with the process: logged as cut by lfguard, and their replay claims
        // released so that Linksfield's retry is forwarded at once (here after a restart, or by
        // another replica) instead of waiting for the claims to lapse.
        proxy.mark_cut();
        match tokio::time::timeout(CUT_RELEASE_TIMEOUT, replay.release_outstanding()).await {
            Ok(released) => {
                tracing::info!(released, "replay claims of cut requests released");
            }
            Err(_) => tracing::warn!(
                "replay claims of cut requests could not all be released; they lapse on their own"
            ),
        }
    }
}

/// Runs until aborted: it keeps answering (readiness 503) while the proxy drains. At most
/// `server.admin_max_connections` connections, made room for like the proxy's.
async fn serve_admin(listener: TcpListener, admin: Arc<Admin>, connections: Arc<Connections>) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_READ_TIMEOUT)
        .max_buf_size(ADMIN_MAX_BUF_BYTES)
        .max_headers(ADMIN_MAX_HEADERS);
    let builder = Arc::new(builder);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "admin accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let connection = connections.admit().await;
        let admin = admin.clone();
        let handler = move |request| admin.clone().handle(request);
        let builder = builder.clone();
        tokio::spawn(async move {
            connection.serve(stream, &builder, handler).await;
        });
    }
}
