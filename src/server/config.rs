//! The `[server]` section: listeners, limits and shutdown timing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_body_bytes: u64,
    /// Limit for receiving a request's headers; also how long an idle keep-alive connection
    /// is kept, since hyper starts this timer whenever it waits for the next request.
    #[serde(with = "crate::verify::duration")]
    pub header_read_timeout: Duration,
    #[serde(with = "crate::verify::duration")]
    pub body_read_timeout: Duration,
    /// Connections served at once on the proxy port. At the cap, the connection idle the longest
    /// (between requests, or still sending its headers) is closed for a new one; connections
    /// with a request in progress are never closed for that.
    pub max_connections: usize,
    /// The same for the admin port, counted separately so that neither starves the other.
    pub admin_max_connections: usize,
    /// Bytes of request bodies buffered at once, over all connections; past it, 503 overloaded.
    pub max_buffered_bytes: u64,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// After SIGTERM, how long lfguard keeps accepting and serving (with `Connection: close`)
    /// while readiness already fails, so that load balancers and kube-proxy stop routing to it
    /// before it stops accepting.
    #[serde(with = "crate::verify::duration")]
    pub drain_delay: Duration,
    /// Then, how long requests in progress get to finish.
    #[serde(with = "crate::verify::duration")]
    pub shutdown_grace: Duration,
    /// Tokio worker threads; 0 means one per core.
    pub worker_threads: usize,
    /// `[server.tls]`: the proxy port speaks TLS. Without it, plain HTTP (the sidecar's case,
    /// with TLS ended in front of lfguard).
    pub tls: Option<ListenerTlsConfig>,
}

/// `[server.tls]`: the certificate the proxy port presents, and whom it asks for one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// PEM: the server certificate first, then the intermediates (a full chain).
    pub cert_file: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM: the CAs whose client certificates are accepted; set, every client must present one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".parse().expect("literal address"),
            admin_listen: "0.0.0.0:9090".parse().expect("literal address"),
            max_body_bytes: 256 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(15),
            // With the body budget and the baseline these fit the 64 MiB memory limit of the
            // shipped pod (k8s/base) with room; tests/limits.rs checks the arithmetic.
            max_connections: 384,
            admin_max_connections: 64,
            max_buffered_bytes: 8 * 1024 * 1024,
            max_headers: 64,
            max_header_bytes: 16 * 1024,
            drain_delay: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(20),
            worker_threads: 0,
            tls: None,
        }
    }
}

impl ServerConfig {
    /// What serde cannot check, each problem naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.max_body_bytes == 0 {
            problems.push("server.max_body_bytes: must be greater than 0".into());
        }
        for (key, value) in [
            ("server.header_read_timeout", self.header_read_timeout),
            ("server.body_read_timeout", self.body_read_timeout),
        ] {
            if value.is_zero() {
                problems.push(format!("{key}: must be greater than 0"));
            }
        }
        if self.max_connections == 0 {
            problems.push("server.max_connections: must be greater than 0".into());
        }
        if self.admin_max_connections == 0 {
            problems.push("server.admin_max_connections: must be greater than 0".into());
        }
        if self.max_buffered_bytes == 0 {
            problems.push("server.max_buffered_bytes: must be greater than 0".into());
        } else if self.max_buffered_bytes < self.max_body_bytes {
            problems.push(format!(
                "server.max_buffered_bytes: {} is less than server.max_body_bytes ({}); a body \
                 of the largest allowed size could never be buffered",
                self.max_buffered_bytes, self.max_body_bytes
            ));
        }
        if self.max_headers == 0 {
            problems.push("server.max_headers: must be greater than 0".into());
        }
        if self.max_header_bytes < 8192 {
            problems.push("server.max_header_bytes: must be at least 8192".into());
        }
        problems
    }
}
