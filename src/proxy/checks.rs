//! The checks on a parsed body: the signature, ambiguity and the schema, and freshness.

use std::time::SystemTime;

use http::HeaderValue;

use super::Proxy;
use crate::proxy::error::Rejection;
use crate::proxy::routes::RouteConfig;
use crate::state::secrets::Key;
use crate::verify::duration::Short;
use crate::verify::freshness::{self, Staleness};
use crate::verify::signature::{self, Body};
use crate::verify::{ambiguity, diagnose};

impl Proxy {
    /// Tries each of the partner's secrets; the matching one names the forwarded key id. On a
    /// mismatch, the documented variants are tried so that the log and metrics can say which
    /// setting would have accepted it.
    pub(super) fn verify_signature<'k>(
        &self,
        body: &Body<'_>,
        partner: &str,
        signature: &HeaderValue,
        keys: &'k [Key],
    ) -> Result<(&'k Key, [u8; 16]), Rejection> {
        let verify = &self.settings.verify;
        let claimed = signature::decode_header(signature.as_bytes(), verify.signature_encoding);
        if let Some(claimed) = claimed {
            let prepared = signature::Prepared::new(
                &body.canonical_with(verify.null_values, verify.nested_values),
            );
            let matched = keys.iter().find_map(|key| {
                let digest = prepared.digest(&key.secret);
                claimed.matches(&digest).then_some((key, digest))
            });
            if let Some(matched) = matched {
                return Ok(matched);
            }
        }
        let settings = diagnose::Settings {
            encoding: verify.signature_encoding,
            nulls: verify.null_values,
            nested: verify.nested_values,
        };
        let candidates: Vec<&str> = keys.iter().map(|key| key.secret.as_str()).collect();
        if let Some(variant) =
            diagnose::find_variant(body, signature.as_bytes(), &candidates, settings)
        {
            let variant = variant.name();
            tracing::warn!(partner, variant = %variant, "signature matches a variant the configuration does not accept");
            self.metrics.signature_variant(partner, &variant);
        }
        Err(Rejection::BadSignature(match claimed {
            None => "x-lf-md5 is not a base64 md5 digest in an accepted encoding".into(),
            Some(_) => "signature does not match".into(),
        }))
    }

    /// Keys and values that make the string to sign readable as another body, and the route's
    /// member schema.
    pub(super) fn check_unambiguous(
        &self,
        body: &Body<'_>,
        route: Option<&RouteConfig>,
    ) -> Result<(), Rejection> {
        let verify = &self.settings.verify;
        ambiguity::check(body, verify.nested_values)
            .map_err(|why| Rejection::AmbiguousBody(why.to_string()))?;
        if let Some(schema) = route
            .and_then(|route| route.schema.as_ref())
            .and_then(|name| self.settings.schemas.get(name))
        {
            schema
                .check(body)
                .map_err(|why| Rejection::AmbiguousBody(why.to_string()))?;
        }
        Ok(())
    }

    pub(super) fn check_freshness(
        &self,
        body: &Body<'_>,
        arrived: SystemTime,
        require_timestamp: bool,
    ) -> Result<(), Rejection> {
        let verify = &self.settings.verify;
        let mut found = false;
        for field in &verify.timestamp_fields {
            let Some(value) = body.get(field) else {
                continue;
            };
            found = true;
            freshness::check(value, arrived, verify.max_age, verify.max_skew).map_err(|why| {
                Rejection::Stale(match why {
                    Staleness::Unreadable => format!("{field} is not a timestamp lfguard can read"),
                    Staleness::TooOld => format!("{field} is older than {}", Short(verify.max_age)),
                    Staleness::TooNew => format!(
                        "{field} is more than {} in the future",
                        Short(verify.max_skew)
                    ),
                })
            })?;
        }
        if !found && require_timestamp {
            return Err(Rejection::MissingTimestamp(format!(
                "the body has no timestamp member ({})",
                verify.timestamp_fields.join(", ")
            )));
        }
        Ok(())
    }
}
