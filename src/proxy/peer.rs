//! The client at the other end of one connection.

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;

use crate::proxy::framing::HeadWatch;

/// The client at the other end of one connection, formatted once rather than for every request.
#[derive(Debug)]
pub struct Peer {
    pub(super) ip: std::net::IpAddr,
    /// `ip:port`, as logged.
    pub(super) address: String,
    /// The IP as the hop lfguard adds to `X-Forwarded-For`.
    pub(super) forwarded_for: HeaderValue,
    /// What the connection's raw bytes showed about each request head (see `framing`).
    pub(super) head_watch: Arc<HeadWatch>,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        Peer {
            ip: addr.ip(),
            address: addr.to_string(),
            forwarded_for: HeaderValue::from_str(&addr.ip().to_string())
                .expect("an IP address is a valid header value"),
            head_watch: Arc::default(),
        }
    }

    /// For the connection's `framing::Watched` socket.
    pub fn head_watch(&self) -> &Arc<HeadWatch> {
        &self.head_watch
    }
}
