//! Every way lfguard refuses a request, and the one place that turns a refusal into a
//! status, a stable code and a JSON body.

use std::fmt::Write as _;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::proxy::body::{ProxyBody, full};

/// A refused request. Each variant has exactly one status and one documented code; the `String` is a
/// human-readable detail that never contains a secret or a body value. The details of
/// `UnreadableBody`, `UpstreamUnavailable` and `ReplayStoreUnavailable` are lfguard's own error
/// texts (addresses, ports, OS errors): they go to the log (`detail`), never to the caller
/// (`message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// A request head lfguard will not act on: framing two parsers could read differently
    /// (`Content-Length` with `Transfer-Encoding`), several `Host` headers, a `Connection` header
    /// naming a header lfguard relies on.
    MalformedRequest(String),
    MalformedBody(String),
    /// The body could not be read to its end (cut short, bad chunk framing).
    UnreadableBody(String),
    DuplicateKey(String),
    /// The body's string to sign also reads as another body, or the body does not match its
    /// route's schema.
    AmbiguousBody(String),
    /// None of `verify.timestamp_fields` is in the body, and a timestamp is required.
    MissingTimestamp(String),
    MissingPartner(String),
    MissingDeliveryId(String),
    MissingSignature,
    BadSignature(String),
    UnknownPartner,
    Stale(String),
    MethodNotAllowed,
    RequestTimeout,
    Replay,
    InFlight {
        retry_after_secs: u64,
    },
    BodyTooLarge {
        limit: u64,
    },
    UnsupportedMediaType,
    UpstreamUnavailable(String),
    ReplayStoreUnavailable(String),
    /// A callback to spool, and the spool cannot be opened or written.
    SpoolUnavailable(String),
    /// A callback to spool, and the spool holds `delivery.max_spool_bytes`.
    SpoolFull,
    /// The budget for buffered bodies (`server.max_buffered_bytes`) is spent.
    Overloaded,
    /// lfguard shut down (`server.shutdown_grace` ran out) before the backend answered.
    ShuttingDown,
    UpstreamTimeout,
}

/// `Retry-After` of an `overloaded` refusal: bodies are held for milliseconds normally, and
/// slow senders are cut off after `server.body_read_timeout`.
pub const OVERLOADED_RETRY_AFTER_SECS: u64 = 2;

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::MalformedRequest(_)
            | Rejection::MalformedBody(_)
            | Rejection::UnreadableBody(_)
            | Rejection::DuplicateKey(_)
            | Rejection::AmbiguousBody(_)
            | Rejection::MissingTimestamp(_)
            | Rejection::MissingPartner(_)
            | Rejection::MissingDeliveryId(_) => StatusCode::BAD_REQUEST,
            Rejection::MissingSignature
            | Rejection::BadSignature(_)
            | Rejection::UnknownPartner
            | Rejection::Stale(_) => StatusCode::UNAUTHORIZED,
            Rejection::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Rejection::Replay | Rejection::InFlight { .. } => StatusCode::CONFLICT,
            Rejection::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Rejection::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            Rejection::ReplayStoreUnavailable(_)
            | Rejection::SpoolUnavailable(_)
            | Rejection::SpoolFull
            | Rejection::Overloaded
            | Rejection::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Whether report mode forwards the request instead: failures of the signature, body shape,
    /// freshness and replay checks. Framing, parsing and limits protect lfguard and the backend
    /// and are enforced in every mode.
    pub fn is_reportable(&self) -> bool {
        match self {
            Rejection::AmbiguousBody(_)
            | Rejection::MissingTimestamp(_)
            | Rejection::MissingPartner(_)
            | Rejection::MissingDeliveryId(_)
            | Rejection::MissingSignature
            | Rejection::BadSignature(_)
            | Rejection::UnknownPartner
            | Rejection::Stale(_)
            | Rejection::Replay
            | Rejection::InFlight { .. }
            | Rejection::ReplayStoreUnavailable(_) => true,
            Rejection::MalformedRequest(_)
            | Rejection::MalformedBody(_)
            | Rejection::UnreadableBody(_)
            | Rejection::DuplicateKey(_)
            | Rejection::MethodNotAllowed
            | Rejection::RequestTimeout
            | Rejection::BodyTooLarge { .. }
            | Rejection::UnsupportedMediaType
            | Rejection::UpstreamUnavailable(_)
            | Rejection::SpoolUnavailable(_)
            | Rejection::SpoolFull
            | Rejection::Overloaded
            | Rejection::ShuttingDown
            | Rejection::UpstreamTimeout => false,
        }
    }

    /// The stable machine-readable code of the error table in docs/verification.md, also the
    /// `code` label in logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::MalformedRequest(_) => "malformed_request",
            Rejection::MalformedBody(_) | Rejection::UnreadableBody(_) => "malformed_body",
            Rejection::DuplicateKey(_) => "duplicate_key",
            Rejection::AmbiguousBody(_) => "ambiguous_body",
            Rejection::MissingTimestamp(_) => "missing_timestamp",
            Rejection::MissingPartner(_) => "missing_partner",
            Rejection::MissingDeliveryId(_) => "missing_delivery_id",
            Rejection::MissingSignature => "missing_signature",
            Rejection::BadSignature(_) => "bad_signature",
            Rejection::UnknownPartner => "unknown_partner",
            Rejection::Stale(_) => "stale",
            Rejection::MethodNotAllowed => "method_not_allowed",
            Rejection::RequestTimeout => "request_timeout",
            Rejection::Replay => "replay",
            Rejection::InFlight { .. } => "in_flight",
            Rejection::BodyTooLarge { .. } => "body_too_large",
            Rejection::UnsupportedMediaType => "unsupported_media_type",
            Rejection::UpstreamUnavailable(_) => "upstream_unavailable",
            Rejection::ReplayStoreUnavailable(_) => "replay_store_unavailable",
            Rejection::SpoolUnavailable(_) => "spool_unavailable",
            Rejection::SpoolFull => "spool_full",
            Rejection::Overloaded => "overloaded",
            Rejection::ShuttingDown => "shutting_down",
            Rejection::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// The message for the caller: what was wrong with the request, never anything about
    /// lfguard's insides (addresses, ports, OS or library errors).
    pub fn message(&self) -> String {
        match self {
            Rejection::MalformedRequest(detail) => format!("malformed request: {detail}"),
            Rejection::MalformedBody(detail) => format!("malformed body: {detail}"),
            Rejection::UnreadableBody(_) => {
                "malformed body: the body could not be read to its end".into()
            }
            Rejection::DuplicateKey(detail) => format!("body has a {detail}"),
            Rejection::AmbiguousBody(detail) => format!("ambiguous body: {detail}"),
            Rejection::MissingTimestamp(detail) => detail.clone(),
            Rejection::MissingPartner(detail) => detail.clone(),
            Rejection::MissingDeliveryId(detail) => detail.clone(),
            Rejection::MissingSignature => "x-lf-md5 header is missing".into(),
            Rejection::BadSignature(detail) => detail.clone(),
            Rejection::UnknownPartner => "partner_code is not configured".into(),
            Rejection::Stale(detail) => detail.clone(),
            Rejection::MethodNotAllowed => "only POST callbacks are accepted".into(),
            Rejection::RequestTimeout => "request body was not received in time".into(),
            Rejection::Replay => "this callback was already delivered".into(),
            Rejection::InFlight { .. } => {
                "a copy of this callback is being delivered; retry later".into()
            }
            Rejection::BodyTooLarge { limit } => format!("body exceeds {limit} bytes"),
            Rejection::UnsupportedMediaType => {
                "content type must be application/json (or a form, where forms are accepted)".into()
            }
            Rejection::UpstreamUnavailable(_) => "backend unreachable".into(),
            Rejection::ReplayStoreUnavailable(_) => "replay store unavailable; retry later".into(),
            Rejection::SpoolUnavailable(_) => {
                "the callback could not be stored for delivery; retry later".into()
            }
            Rejection::SpoolFull => {
                "too many callbacks are waiting for the backend; retry later".into()
            }
            Rejection::Overloaded => {
                "too many request bodies are being received at once; retry later".into()
            }
            Rejection::ShuttingDown => {
                "lfguard shut down before the backend answered; retry later".into()
            }
            Rejection::UpstreamTimeout => "backend did not answer in time".into(),
        }
    }

    /// The message with lfguard's own error text where there is one: for the request's log line
    /// (`reason`), not for the caller.
    pub fn detail(&self) -> String {
        match self {
            Rejection::UnreadableBody(detail) => format!("body could not be read: {detail}"),
            Rejection::UpstreamUnavailable(detail) => format!("backend unreachable: {detail}"),
            Rejection::ReplayStoreUnavailable(detail) => {
                format!("replay store unavailable: {detail}")
            }
            Rejection::SpoolUnavailable(detail) => format!("spool unavailable: {detail}"),
            Rejection::MalformedRequest(_)
            | Rejection::MalformedBody(_)
            | Rejection::DuplicateKey(_)
            | Rejection::AmbiguousBody(_)
            | Rejection::MissingTimestamp(_)
            | Rejection::MissingPartner(_)
            | Rejection::MissingDeliveryId(_)
            | Rejection::MissingSignature
            | Rejection::BadSignature(_)
            | Rejection::UnknownPartner
            | Rejection::Stale(_)
            | Rejection::MethodNotAllowed
            | Rejection::RequestTimeout
            | Rejection::Replay
            | Rejection::InFlight { .. }
            | Rejection::BodyTooLarge { .. }
            | Rejection::UnsupportedMediaType
            | Rejection::SpoolFull
            | Rejection::Overloaded
            | Rejection::ShuttingDown
            | Rejection::UpstreamTimeout => self.message(),
        }
    }

    /// The JSON error response: `{"error":{"code":…,"message":…}}`.
    pub fn to_response(&self) -> Response<ProxyBody> {
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.message() }
        });
        let mut response = Response::new(full(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            Rejection::MethodNotAllowed => {
                headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            Rejection::InFlight { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            Rejection::ReplayStoreUnavailable(_)
            | Rejection::SpoolUnavailable(_)
            | Rejection::ShuttingDown => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            Rejection::SpoolFull => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            }
            Rejection::Overloaded => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(OVERLOADED_RETRY_AFTER_SECS),
                );
            }
            Rejection::MalformedRequest(_)
            | Rejection::MalformedBody(_)
            | Rejection::UnreadableBody(_)
            | Rejection::DuplicateKey(_)
            | Rejection::AmbiguousBody(_)
            | Rejection::MissingTimestamp(_)
            | Rejection::MissingPartner(_)
            | Rejection::MissingDeliveryId(_)
            | Rejection::MissingSignature
            | Rejection::BadSignature(_)
            | Rejection::UnknownPartner
            | Rejection::Stale(_)
            | Rejection::RequestTimeout
            | Rejection::Replay
            | Rejection::BodyTooLarge { .. }
            | Rejection::UnsupportedMediaType
            | Rejection::UpstreamUnavailable(_)
            | Rejection::UpstreamTimeout => {}
        }
        response
    }
}

/// An error and its causes, for the log.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let _ = write!(message, ": {cause}");
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_spec_status() {
        let all = [
            (
                Rejection::MalformedRequest(String::new()),
                400,
                "malformed_request",
            ),
            (
                Rejection::MalformedBody(String::new()),
                400,
                "malformed_body",
            ),
            (
                Rejection::UnreadableBody(String::new()),
                400,
                "malformed_body",
            ),
            (Rejection::DuplicateKey(String::new()), 400, "duplicate_key"),
            (
                Rejection::AmbiguousBody(String::new()),
                400,
                "ambiguous_body",
            ),
            (
                Rejection::MissingTimestamp(String::new()),
                400,
                "missing_timestamp",
            ),
            (
                Rejection::MissingPartner(String::new()),
                400,
                "missing_partner",
            ),
            (
                Rejection::MissingDeliveryId(String::new()),
                400,
                "missing_delivery_id",
            ),
            (Rejection::MissingSignature, 401, "missing_signature"),
            (Rejection::BadSignature(String::new()), 401, "bad_signature"),
            (Rejection::UnknownPartner, 401, "unknown_partner"),
            (Rejection::Stale(String::new()), 401, "stale"),
            (Rejection::MethodNotAllowed, 405, "method_not_allowed"),
            (Rejection::RequestTimeout, 408, "request_timeout"),
            (Rejection::Replay, 409, "replay"),
            (
                Rejection::InFlight {
                    retry_after_secs: 1,
                },
                409,
                "in_flight",
            ),
            (Rejection::BodyTooLarge { limit: 1 }, 413, "body_too_large"),
            (
                Rejection::UnsupportedMediaType,
                415,
                "unsupported_media_type",
            ),
            (
                Rejection::UpstreamUnavailable(String::new()),
                502,
                "upstream_unavailable",
            ),
            (
                Rejection::ReplayStoreUnavailable(String::new()),
                503,
                "replay_store_unavailable",
            ),
            (Rejection::Overloaded, 503, "overloaded"),
            (Rejection::ShuttingDown, 503, "shutting_down"),
            (Rejection::UpstreamTimeout, 504, "upstream_timeout"),
        ];
        for (rejection, status, code) in all {
            assert_eq!(rejection.status().as_u16(), status, "{code}");
            assert_eq!(rejection.code(), code);
            assert_eq!(rejection.to_response().status().as_u16(), status);
        }
        let overloaded = Rejection::Overloaded.to_response();
        assert_eq!(
            overloaded.headers()[header::RETRY_AFTER],
            OVERLOADED_RETRY_AFTER_SECS.to_string()
        );
        assert!(!Rejection::Overloaded.is_reportable());
    }

    #[test]
    fn request_level_refusals_are_enforced_in_report_mode() {
        assert!(!Rejection::MalformedRequest(String::new()).is_reportable());
        assert!(!Rejection::UnreadableBody(String::new()).is_reportable());
    }

    /// lfguard's own error texts reach the log line, never the caller.
    #[test]
    fn internal_details_stay_out_of_messages() {
        let inside = "cannot connect to 127.0.0.1:18099: Connection refused (os error 111)";
        for rejection in [
            Rejection::UpstreamUnavailable(inside.into()),
            Rejection::ReplayStoreUnavailable(inside.into()),
            Rejection::SpoolUnavailable(inside.into()),
            Rejection::UnreadableBody(inside.into()),
        ] {
            assert!(!rejection.message().contains("127.0.0.1"), "{rejection:?}");
            assert!(rejection.detail().contains(inside), "{rejection:?}");
        }
        let public = Rejection::MalformedRequest("several Host headers".into());
        assert_eq!(public.detail(), public.message());
    }
}
