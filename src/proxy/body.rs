//! The response body type shared by the proxy and admin servers: either bytes lfguard made or the
//! backend's body streamed through.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};

/// Why a streamed body ended early: the backend's connection failed, or it did not finish within
/// `upstream.timeout`.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

pub type ProxyBody = BoxBody<Bytes, BodyError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}
