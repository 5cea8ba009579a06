//! The response body type shared by the proxy and admin servers: either bytes lfguard made or the
//! backend's body streamed through.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}
