//! The state the proxy, the admin server and the signal handlers share.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::proxy::limits::BodyBudget;
use crate::proxy::upstream::Upstream;
use crate::server::connections::Connections;
use crate::server::tls::ListenerTls;
use crate::state::replay::AnyStore;
use crate::state::secrets::SecretStore;
use crate::state::spool::Spool;
use crate::telemetry::metrics::Metrics;

/// State shared by the proxy, the admin server and the signal handlers.
pub struct Shared {
    /// The configuration lfguard started with; a reload replaces only `secrets`.
    pub config: Arc<Config>,
    /// Where the configuration came from, re-read on reload.
    pub config_path: Option<PathBuf>,
    pub secrets: Arc<ArcSwap<SecretStore>>,
    pub replay: Arc<AnyStore>,
    /// The spool, when `delivery.spool_dir` is set.
    pub spool: Option<Arc<Spool>>,
    pub metrics: Arc<Metrics>,
    /// `server.max_buffered_bytes`: shared by every request body being buffered.
    pub budget: Arc<BodyBudget>,
    /// The connections of the proxy port (`server.max_connections`).
    pub proxy_connections: Arc<Connections>,
    /// The connections of the admin port (`server.admin_max_connections`).
    pub admin_connections: Arc<Connections>,
    /// `[server.tls]`: the proxy port's certificate, re-read on reload.
    pub listener_tls: Option<Arc<ListenerTls>>,
    /// The backend's connection pool, whose certificate files (https) a reload re-reads.
    pub upstream: Arc<Upstream>,
    /// Set once shutdown begins: readiness answers 503 from then on, and the proxy's answers
    /// carry `Connection: close`.
    pub draining: Arc<AtomicBool>,
}
