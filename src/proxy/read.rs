//! Reading a request body: buffered within its limits, then parsed and its partner found.

use bytes::{BufMut, Bytes, BytesMut};
use http::header;
use http::request::Parts;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::Proxy;
use crate::proxy::error::{Rejection, error_chain};
use crate::proxy::limits::Reservation;
use crate::state::secrets::is_partner_code;
use crate::verify::signature::{self, Body, Value};

impl Proxy {
    /// Buffers the body within `server.max_body_bytes`, `server.body_read_timeout` and the
    /// shared `server.max_buffered_bytes`. A declared Content-Length over the limit is refused
    /// before a byte is read; one the budget cannot cover is refused (503 `overloaded`) before a
    /// byte is read too. A chunked body takes its share as it grows.
    pub(super) async fn read_body<'b>(
        &'b self,
        parts: &Parts,
        incoming: Incoming,
        held: &mut Reservation<'b>,
    ) -> Result<Bytes, Rejection> {
        let limit = self.settings.max_body_bytes;
        let declared = match parts.headers.get(header::CONTENT_LENGTH) {
            None => None,
            Some(length) => match length.to_str().ok().and_then(|l| l.parse::<u64>().ok()) {
                Some(length) if length <= limit => Some(length),
                _ => return Err(Rejection::BodyTooLarge { limit }),
            },
        };
        if let Some(length) = declared {
            held.grow(length).map_err(|_| Rejection::Overloaded)?;
        }
        let collect = collect_body(incoming, declared, limit, held);
        match tokio::time::timeout(self.settings.body_read_timeout, collect).await {
            Err(_elapsed) => Err(Rejection::RequestTimeout),
            Ok(result) => result,
        }
    }
}

/// Reads a body's frames into one buffer. Each frame is copied out as it arrives, so that hyper
/// can reuse its read buffer: a frame kept as it is would pin the whole buffer it was cut from,
/// 8 KiB or more even for the one byte of a slow sender's packet. A body that arrives as one
/// frame (the usual case: it came with the headers) is kept without a copy.
///
/// A declared body was reserved in full already and gets a buffer of exactly its length. A
/// chunked one reserves its buffer's capacity, which grows to twice its size (at most to the
/// body limit) each time it fills.
pub(super) async fn collect_body(
    mut incoming: Incoming,
    declared: Option<u64>,
    limit: u64,
    held: &mut Reservation<'_>,
) -> Result<Bytes, Rejection> {
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    let mut received: u64 = 0;
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|err| Rejection::UnreadableBody(error_chain(&err)))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        received += data.len() as u64;
        if received > limit {
            return Err(Rejection::BodyTooLarge { limit });
        }
        if declared.is_none() && held.bytes() < received {
            // Chunked: the first frame is held as it came; later ones in a buffer of reserved
            // capacity.
            let needed = if first.is_none() && joined.is_empty() {
                received
            } else {
                received.max(joined.capacity() as u64 * 2).min(limit)
            };
            held.grow(needed - held.bytes())
                .map_err(|_| Rejection::Overloaded)?;
        }
        if first.is_none() && joined.is_empty() {
            first = Some(data);
            continue;
        }
        if let Some(first) = first.take() {
            let capacity = declared.unwrap_or(held.bytes());
            joined = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(usize::MAX));
            joined.put(first);
        } else if joined.capacity() - joined.len() < data.len() {
            // Grown by hand to exactly the reserved capacity (`reserve` may round it up).
            let mut grown =
                BytesMut::with_capacity(usize::try_from(held.bytes()).unwrap_or(usize::MAX));
            grown.put(joined);
            joined = grown;
        }
        joined.put(data);
    }
    Ok(match first {
        Some(first) => first,
        None => joined.freeze(),
    })
}

pub(super) fn parse_body(body: &[u8], form: bool) -> Result<Body<'_>, Rejection> {
    let parsed = if form {
        Body::from_form(body)
    } else {
        Body::from_json(body)
    };
    parsed.map_err(|err| match err {
        signature::BodyError::Malformed(reason) => Rejection::MalformedBody(reason),
        duplicate @ signature::BodyError::DuplicateKey(_) => {
            Rejection::DuplicateKey(duplicate.to_string())
        }
    })
}

pub(super) fn partner_code<'b>(body: &'b Body<'_>) -> Result<&'b str, Rejection> {
    match body.get("partner_code") {
        None => Err(Rejection::MissingPartner("partner_code is missing".into())),
        Some(Value::Str(code)) if code.is_empty() => {
            Err(Rejection::MissingPartner("partner_code is empty".into()))
        }
        Some(Value::Str(code)) if is_partner_code(code) => Ok(code),
        Some(Value::Str(_)) => Err(Rejection::UnknownPartner),
        Some(_) => Err(Rejection::MissingPartner(
            "partner_code must be a string".into(),
        )),
    }
}
