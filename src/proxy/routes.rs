//! Routes (`[[routes]]`): their configuration, which prefix a path falls under, and which paths
//! and methods may pass through unverified.

use std::collections::BTreeMap;

use http::Method;
use http::request::Parts;
use serde::{Deserialize, Serialize};

use super::Proxy;
use super::error::Rejection;
use crate::state::spool::DeliveryMode;
use crate::verify::schema::Schema;

/// A path prefix with its own rules: passed through without verification (`verify = false`, e.g.
/// a backend's health page), or verified with a member schema and its own overrides. The longest
/// matching prefix decides.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub path_prefix: String,
    #[serde(default = "verify_by_default")]
    pub verify: bool,
    /// The name of a `[schemas.NAME]` that bodies on this route must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_timestamp: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_form: Option<bool>,
    /// Overrides `delivery.mode` for callbacks on this route (and a partner's `delivery`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryMode>,
}

fn verify_by_default() -> bool {
    true
}

/// Checks the `[[routes]]`, each problem naming its key; `schemas` are the configured ones.
pub fn problems(routes: &[RouteConfig], schemas: &BTreeMap<String, Schema>) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        if !route.path_prefix.starts_with('/') {
            problems.push(format!("routes[{i}].path_prefix: must start with '/'"));
        }
        if !route.verify {
            for (key, set) in [
                ("schema", route.schema.is_some()),
                ("require_timestamp", route.require_timestamp.is_some()),
                ("accept_form", route.accept_form.is_some()),
                ("delivery", route.delivery.is_some()),
            ] {
                if set {
                    problems.push(format!(
                        "routes[{i}].{key}: applies to verified routes only, and this route \
                         has verify = false"
                    ));
                }
            }
        }
        if let Some(name) = &route.schema
            && !schemas.contains_key(name)
        {
            problems.push(format!(
                "routes[{i}].schema: no [schemas.{name}] is configured"
            ));
        }
        if routes[..i]
            .iter()
            .any(|other| other.path_prefix == route.path_prefix)
        {
            problems.push(format!(
                "routes[{i}].path_prefix: {} is configured twice",
                route.path_prefix
            ));
        }
    }
    problems
}

/// Methods a `[[routes]]` pass-through forwards; others (CONNECT, TRACE, extensions) are never
/// passed through.
pub(super) const PASSTHROUGH_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

impl Proxy {
    /// The route with the longest prefix matching `path`. Verified routes match ignoring ASCII
    /// case, pass-through routes exactly: a backend that routes case-insensitively must not be
    /// able to reach a schema route's handler without its schema, nor lfguard pass through more
    /// than the prefix says.
    pub(super) fn route_for(&self, path: &str) -> Option<&RouteConfig> {
        self.settings
            .routes
            .iter()
            .filter(|route| {
                if route.verify {
                    under_prefix_ignoring_case(path, &route.path_prefix)
                } else {
                    under_prefix(path, &route.path_prefix)
                }
            })
            .max_by_key(|route| route.path_prefix.len())
    }

    /// With member schemas configured, a callback's path must be plain: no percent-encoding at
    /// all, no `//`, nothing `is_clean_path` refuses. A backend that decodes `%73` or collapses
    /// `//` would route `/callbacks/%73ms-uplink` to the SMS uplink's handler while lfguard
    /// matched it to no schema route.
    pub(super) fn check_schema_path(&self, path: &str) -> Result<(), Rejection> {
        let schemas = self
            .settings
            .routes
            .iter()
            .any(|route| route.schema.is_some());
        if schemas && (path.contains('%') || path.contains("//") || !is_clean_path(path)) {
            return Err(Rejection::MalformedRequest(
                "with member schemas configured, a callback's path must be plain (no \
                 percent-encoding, path parameters, dot or empty segments)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// On a `verify = false` route: an ordinary method and a clean path (see `is_clean_path`).
    /// Anything else takes the verified path.
    pub(super) fn is_passthrough(&self, parts: &Parts) -> bool {
        PASSTHROUGH_METHODS.contains(&parts.method) && is_clean_path(parts.uri.path())
    }
}

/// `/health` covers `/health` and `/health/...`, not `/healthX` (a prefix ending in `/` covers
/// what follows it).
pub(super) fn under_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

pub(super) fn under_prefix_ignoring_case(path: &str, prefix: &str) -> bool {
    let (path, prefix) = (path.as_bytes(), prefix.as_bytes());
    path.len() >= prefix.len()
        && path[..prefix.len()].eq_ignore_ascii_case(prefix)
        && (prefix.ends_with(b"/") || path.len() == prefix.len() || path[prefix.len()] == b'/')
}

/// Whether a path may pass through unverified: one that every backend reads as lfguard does.
/// Refused: `.` and `..` segments; `;` (path parameters: Tomcat and Spring read
/// `/health/..;/admin` as `/admin`); `\`; percent-encoded `.`, `/`, `\`, `;` and `%` (double
/// encoding such as `%252e`); control characters (NUL) and non-ASCII, raw or encoded; a `%` not
/// followed by two hex digits. A backend that normalises such a path could serve a verified
/// route through an unverified prefix (`/health/../callback`).
pub(super) fn is_clean_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        let byte = if byte == b'%' {
            let decoded = bytes
                .get(at + 1..at + 3)
                .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok());
            match decoded {
                Some(b'.' | b'/' | b'%') | None => return false,
                Some(decoded) => {
                    at += 3;
                    decoded
                }
            }
        } else {
            at += 1;
            byte
        };
        if matches!(byte, b';' | b'\\') || !(b' '..0x7f).contains(&byte) {
            return false;
        }
    }
    !path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_prefixes_match_whole_segments() {
        assert!(under_prefix("/health", "/health"));
        assert!(under_prefix("/health/live", "/health"));
        assert!(!under_prefix("/healthx", "/health"));
        assert!(under_prefix("/static/x", "/static/"));
    }

    /// Paths a pass-through route may forward unverified, and those it must not.
    #[test]
    fn clean_paths() {
        let table = [
            ("/health", true),
            ("/health/live", true),
            ("/health/live.json", true),
            ("/health/...x", true),
            ("/health/a%20b", true),
            ("/health/%41%7e", true),
            ("/health/x-y_z~1", true),
            // dot segments, raw or behind encodings
            ("/health/../callback", false),
            ("/health/./x", false),
            ("/health/..", false),
            ("/health/.", false),
            ("/health/%2e%2e/callback", false),
            ("/health/%2E./x", false),
            ("/health/.%2e/x", false),
            ("/health%2f..%2fcallback", false),
            ("/health\\..\\callback", false),
            // path parameters (Tomcat/Spring: /health/..;/admin is /admin)
            ("/health/..;/admin", false),
            ("/health;jsessionid=1", false),
            ("/health/%3b/admin", false),
            ("/health/%3B", false),
            // encoded separators
            ("/health%2Fadmin", false),
            ("/health%5cadmin", false),
            ("/health%5C..%5Cadmin", false),
            ("/health\\admin", false),
            // double encoding
            ("/health/%252e%252e/admin", false),
            ("/health/%25", false),
            ("/health/100%", false),
            ("/health/%2", false),
            ("/health/%zz", false),
            ("/health/%+f", false),
            // NUL, controls, non-ASCII
            ("/health/%00", false),
            ("/health/%0a", false),
            ("/health/%7f", false),
            ("/health/%c3%a9", false),
            ("/health/\u{e9}", false),
        ];
        for (path, clean) in table {
            assert_eq!(is_clean_path(path), clean, "{path}");
        }
    }
}
