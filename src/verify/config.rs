//! The `[verify]` section: how signatures are checked and what counts as fresh.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::verify::signature::{Encoding, NestedValues, NullValues};

/// `enforce` refuses what fails verification; `report` forwards it marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    #[default]
    Enforce,
    Report,
}

impl VerifyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMode::Enforce => "enforce",
            VerifyMode::Report => "report",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifyConfig {
    /// Reloaded on SIGHUP and when the config file changes.
    pub mode: VerifyMode,
    pub signature_encoding: Encoding,
    pub null_values: NullValues,
    pub nested_values: NestedValues,
    pub require_delivery_id: bool,
    pub timestamp_fields: Vec<String>,
    /// Refuse (400 `missing_timestamp`) a body with none of `timestamp_fields`: without one, a
    /// capture replays once `replay.window` has passed. Overridable per partner and route.
    pub require_timestamp: bool,
    /// Accept `application/x-www-form-urlencoded` bodies. Linksfield sends JSON, and a form
    /// re-encoding of a JSON callback verifies under its signature. Overridable per route.
    pub accept_form: bool,
    #[serde(with = "crate::verify::duration")]
    pub max_age: Duration,
    #[serde(with = "crate::verify::duration")]
    pub max_skew: Duration,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            mode: VerifyMode::Enforce,
            signature_encoding: Encoding::Auto,
            null_values: NullValues::Empty,
            nested_values: NestedValues::AsWritten,
            require_delivery_id: true,
            timestamp_fields: vec!["received_at".into()],
            require_timestamp: true,
            accept_form: false,
            max_age: Duration::from_secs(24 * 3600),
            max_skew: Duration::from_secs(5 * 60),
        }
    }
}
