//! Request heads: the checks made before a body is read, the hop-by-hop headers stripped, and the
//! Linksfield headers read.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::proxy::error::Rejection;
use crate::proxy::peer::Peer;

// Header names as `HeaderName`s: looking one up by `&str` parses and validates it every time.
pub(super) const SIGNATURE_HEADER: HeaderName = HeaderName::from_static("x-lf-md5");
pub(super) const DELIVERY_HEADER: HeaderName = HeaderName::from_static("x-lf-delivery");
/// lfguard's own headers, whatever a client sends under this prefix (`_` read as `-`).
pub(super) const OWN_HEADER_PREFIX: &[u8] = b"x-lfguard-";
/// The Linksfield headers lfguard verifies.
pub(super) const LINKSFIELD_HEADER_PREFIX: &[u8] = b"x-lf-";
pub(super) const MAX_DELIVERY_ID_LEN: usize = 128;

pub(super) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(super) const VERIFIED: HeaderName = HeaderName::from_static("x-lfguard-verified");
pub(super) const FAILURE: HeaderName = HeaderName::from_static("x-lfguard-failure");
pub(super) const PARTNER_CODE: HeaderName = HeaderName::from_static("x-lfguard-partner-code");
pub(super) const KEY_ID: HeaderName = HeaderName::from_static("x-lfguard-key-id");
pub(super) const DELIVERY_ID: HeaderName = HeaderName::from_static("x-lfguard-delivery-id");

/// Sets a header whose value came from the request (already validated, so it always fits).
pub(super) fn insert(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// Request heads refused on every route before a body is read, because lfguard and a backend (or
/// another proxy on the way) could act on them differently:
/// - `Content-Length` together with `Transfer-Encoding` (the request-smuggling shape; hyper
///   frames it by the chunked coding and drops `Content-Length` from the map, so the connection's
///   own scanner says so);
/// - several `Host` headers (RFC 9112 §3.2 requires 400);
/// - a `Connection` header naming a header lfguard relies on or that frames the message: lfguard
///   would drop it as hop-by-hop after checking it (`Connection: x-lf-md5, host` stripped the
///   signature and `Host` from a verified request).
pub(super) fn check_head(headers: &HeaderMap, peer: &Peer) -> Result<(), Rejection> {
    if peer.head_watch.next_request_is_ambiguous() {
        return Err(Rejection::MalformedRequest(
            "Content-Length together with Transfer-Encoding".into(),
        ));
    }
    // One pass over the header lines instead of a map lookup per question: every request comes
    // through here.
    let mut hosts = 0;
    let mut connection = false;
    for (name, _) in headers {
        if *name == header::HOST {
            hosts += 1;
        } else if *name == header::CONNECTION {
            connection = true;
        } else if underscored_protected(name.as_str().as_bytes()) {
            // CGI and WSGI backends merge `x_lf_md5` with `x-lf-md5` (both are
            // `HTTP_X_LF_MD5`): the backend could check a signature, or frame a body, other than
            // the one lfguard checked.
            return Err(Rejection::MalformedRequest(
                "a header spelled with '_' that a backend reads as Host, Content-Type, \
                 Content-Length, Transfer-Encoding or an x-lf-* header"
                    .into(),
            ));
        }
    }
    if hosts > 1 {
        return Err(Rejection::MalformedRequest("several Host headers".into()));
    }
    if connection && connection_tokens(headers).any(|name| is_protected(name.as_bytes())) {
        return Err(Rejection::MalformedRequest(
            "Connection names Host, Content-Type, Content-Length, Transfer-Encoding or an x-lf-* \
             or x-lfguard-* header"
                .into(),
        ));
    }
    Ok(())
}

/// A name with `_` that a CGI-style backend reads as a protected header (lfguard's own
/// `x-lfguard-*` headers excepted: those are stripped). Names of other lengths and initials are
/// passed over before their bytes are looked at.
fn underscored_protected(name: &[u8]) -> bool {
    let may_be_protected = match name.len() {
        4 | 12 | 14 | 17 => true,
        len => len >= LINKSFIELD_HEADER_PREFIX.len() && name[0].eq_ignore_ascii_case(&b'x'),
    };
    may_be_protected
        && name.contains(&b'_')
        && is_protected(name)
        && !name_starts_with(name, OWN_HEADER_PREFIX)
}

/// The names a `Connection` header lists.
pub(super) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Headers no `Connection` header may declare hop-by-hop.
pub(super) fn is_protected(name: &[u8]) -> bool {
    [
        &b"host"[..],
        b"content-type",
        b"content-length",
        b"transfer-encoding",
    ]
    .iter()
    .any(|protected| same_name(name, protected))
        || name_starts_with(name, LINKSFIELD_HEADER_PREFIX)
        || name_starts_with(name, OWN_HEADER_PREFIX)
}

/// Compares a header name with a lowercase name, ignoring ASCII case and reading `_` as `-`:
/// CGI and WSGI backends (`HTTP_X_LF_MD5`) see `x_lf_md5` and `x-lf-md5` as one header.
pub(super) fn same_name(name: &[u8], lowercase: &[u8]) -> bool {
    name.len() == lowercase.len()
        && name
            .iter()
            .zip(lowercase)
            .all(|(&n, &l)| n.to_ascii_lowercase() == l || (n == b'_' && l == b'-'))
}

pub(super) fn name_starts_with(name: &[u8], lowercase_prefix: &[u8]) -> bool {
    name.len() >= lowercase_prefix.len()
        && same_name(&name[..lowercase_prefix.len()], lowercase_prefix)
}

/// Headers that `Connection` declares hop-by-hop for this message. `keep-alive` and `close`, the
/// usual values, name no header that is not already dropped.
pub(super) fn listed_in_connection(headers: &HeaderMap) -> Vec<HeaderName> {
    connection_tokens(headers)
        .filter(|name| {
            !name.eq_ignore_ascii_case("keep-alive") && !name.eq_ignore_ascii_case("close")
        })
        .filter_map(|name| HeaderName::try_from(name).ok())
        .collect()
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1). Matched by text: a `match`
/// on a string tests the length first, cheaper than comparing with each name in turn.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Removes the hop-by-hop headers and those `also` names. A pass over the names a message has
/// finds the first to remove (usually none, or `Connection`); only a `Connection` header makes the
/// names it lists worth collecting.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, also: impl Fn(&HeaderName) -> bool) {
    let listed = if headers.contains_key(header::CONNECTION) {
        listed_in_connection(headers)
    } else {
        Vec::new()
    };
    while let Some(doomed) = headers
        .keys()
        .find(|name| is_hop_by_hop(name) || also(name) || listed.contains(name))
        .cloned()
    {
        headers.remove(doomed);
    }
}

/// `true` for a form body, `false` for JSON; anything else (or two Content-Type headers, which
/// lfguard and the backend might read differently) is refused.
pub(super) fn content_kind(headers: &HeaderMap) -> Result<bool, Rejection> {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(Rejection::UnsupportedMediaType);
    };
    // What Linksfield sends, decided without splitting parameters.
    if value.as_bytes().eq_ignore_ascii_case(b"application/json") {
        return Ok(false);
    }
    let value = value
        .to_str()
        .map_err(|_| Rejection::UnsupportedMediaType)?;
    let mut params = value.split(';');
    let essence = params.next().unwrap_or("").trim();
    for param in params {
        if let Some((name, charset)) = param.split_once('=')
            && name.trim().eq_ignore_ascii_case("charset")
            && !charset
                .trim()
                .trim_matches('"')
                .eq_ignore_ascii_case("utf-8")
        {
            return Err(Rejection::UnsupportedMediaType);
        }
    }
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(false)
    } else if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Ok(true)
    } else {
        Err(Rejection::UnsupportedMediaType)
    }
}

/// Exactly one `x-lf-md5`: two could be read differently by lfguard and a backend that checks
/// the signature itself.
pub(super) fn signature_header(headers: &HeaderMap) -> Result<&HeaderValue, Rejection> {
    let mut values = headers.get_all(SIGNATURE_HEADER).iter();
    match (values.next(), values.next()) {
        (None, _) => Err(Rejection::MissingSignature),
        (Some(value), None) if value.is_empty() => Err(Rejection::MissingSignature),
        (Some(value), None) => Ok(value),
        (Some(_), Some(_)) => Err(Rejection::BadSignature("several x-lf-md5 headers".into())),
    }
}

pub(super) fn delivery_id(
    headers: &HeaderMap,
    required: bool,
) -> Result<Option<String>, Rejection> {
    let mut values = headers.get_all(DELIVERY_HEADER).iter();
    let value = match (values.next(), values.next()) {
        (Some(_), Some(_)) => {
            return Err(Rejection::MissingDeliveryId(
                "several x-lf-delivery headers".into(),
            ));
        }
        (value, _) => value.filter(|v| !v.is_empty()),
    };
    let Some(value) = value else {
        return if required {
            Err(Rejection::MissingDeliveryId(
                "x-lf-delivery header is missing".into(),
            ))
        } else {
            Ok(None)
        };
    };
    match value.to_str() {
        Ok(id) if id.len() <= MAX_DELIVERY_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(id.to_string()))
        }
        _ => Err(Rejection::MissingDeliveryId(format!(
            "x-lf-delivery must be at most {MAX_DELIVERY_ID_LEN} visible ASCII characters"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            content_kind(&headers)
        };
        assert_eq!(with("application/json"), Ok(false));
        assert_eq!(with("Application/JSON; charset=UTF-8"), Ok(false));
        assert_eq!(with("application/x-www-form-urlencoded"), Ok(true));
        assert_eq!(
            with("application/json; charset=gbk"),
            Err(Rejection::UnsupportedMediaType)
        );
        assert_eq!(with("text/plain"), Err(Rejection::UnsupportedMediaType));
        assert_eq!(
            content_kind(&HeaderMap::new()),
            Err(Rejection::UnsupportedMediaType)
        );
    }

    #[test]
    fn own_and_protected_header_names() {
        for (name, own) in [
            ("x-lfguard-verified", true),
            ("x_lfguard_verified", true),
            ("x-lfguard_key-id", true),
            ("X_LFGUARD_PARTNER_CODE", true),
            ("x-lfguard", false),
            ("x-lfguardverified", false),
            ("x-lf-md5", false),
        ] {
            assert_eq!(
                name_starts_with(name.as_bytes(), OWN_HEADER_PREFIX),
                own,
                "{name}"
            );
        }
        for (name, protected) in [
            ("Host", true),
            ("content-type", true),
            ("Content_Length", true),
            ("transfer-encoding", true),
            ("x-lf-md5", true),
            ("X_LF_DELIVERY", true),
            ("x-lfguard-verified", true),
            ("x_lfguard_anything", true),
            ("keep-alive", false),
            ("close", false),
            ("upgrade", false),
            ("x-drop-me", false),
            ("x-lfx", false),
            ("hostname", false),
        ] {
            assert_eq!(is_protected(name.as_bytes()), protected, "{name}");
        }
    }
}
