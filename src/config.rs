//! Configuration: built-in defaults < TOML file < `LFGUARD_SECTION__KEY` environment
//! variables, merged by figment, then one validation pass that reports every problem with its key.
//!
//! Each section's type lives with the module that uses it and checks itself (`problems()`); this
//! module only composes them, maps the environment and checks what spans sections.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub use crate::proxy::routes::RouteConfig;
pub use crate::proxy::upstream::UpstreamConfig;
pub use crate::server::config::{ListenerTlsConfig, ServerConfig};
pub use crate::state::replay::{OnDuplicate, ReplayConfig, StoreKind};
use crate::state::secrets;
pub use crate::state::secrets::PartnerConfig;
pub use crate::state::spool::{DeliveryConfig, DeliveryMode, SpoolPlace, SpoolStoreKind};
pub use crate::telemetry::logging::{LogConfig, LogFormat};
pub use crate::verify::config::{VerifyConfig, VerifyMode};
use crate::verify::duration::Short;
use crate::verify::schema::Schema;

mod problems;

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "LFGUARD_CONFIG";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub verify: VerifyConfig,
    pub replay: ReplayConfig,
    pub delivery: DeliveryConfig,
    pub log: LogConfig,
    pub routes: Vec<RouteConfig>,
    /// Member schemas by name, chosen per route with `schema = "NAME"`.
    pub schemas: BTreeMap<String, Schema>,
    /// A directory with one file per partner code, one secret a line (a mounted Secret).
    pub partners_dir: Option<PathBuf>,
    /// How often `partners_dir` and `secret_files` are re-read for changes (SIGHUP reloads too).
    #[serde(with = "crate::verify::duration")]
    pub reload_interval: Duration,
    pub partners: BTreeMap<String, PartnerConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            upstream: UpstreamConfig::default(),
            verify: VerifyConfig::default(),
            replay: ReplayConfig::default(),
            delivery: DeliveryConfig::default(),
            log: LogConfig::default(),
            routes: Vec::new(),
            schemas: BTreeMap::new(),
            partners_dir: None,
            reload_interval: Duration::from_secs(10),
            partners: BTreeMap::new(),
        }
    }
}

/// Every problem found in a configuration, one line each, naming its key and its source.
#[derive(Debug)]
pub struct ConfigError(pub Vec<String>);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.len() {
            1 => writeln!(f, "invalid configuration (1 problem):")?,
            count => writeln!(f, "invalid configuration ({count} problems):")?,
        }
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The figment of defaults, the file's text (when there is a file) and the environment.
fn figment(file_text: Option<&str>) -> Figment {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(text) = file_text {
        figment = figment.merge(Toml::string(text));
    }
    figment.merge(env_provider())
}

/// Top-level keys that an environment variable without `__` may set.
const TOP_LEVEL_ENV_KEYS: [&str; 2] = ["PARTNERS_DIR", "RELOAD_INTERVAL"];

/// The key that environment variable `name` sets: `LFGUARD_SECTION__KEY` → `section.key`. Keys
/// are lowercased, except a partner code (`LFGUARD_PARTNERS__P002671__SECRET_ENV`), whose case
/// is significant. Other `LFGUARD_*` variables (`LFGUARD_CONFIG`, a secret named in
/// `secret_env`) are not configuration: `None`.
fn env_key(name: &str) -> Option<String> {
    const PREFIX: &str = "LFGUARD_";
    let rest = name
        .get(..PREFIX.len())
        .filter(|prefix| prefix.eq_ignore_ascii_case(PREFIX))
        .map(|_| &name[PREFIX.len()..])?;
    if !(rest.contains("__")
        || TOP_LEVEL_ENV_KEYS
            .iter()
            .any(|top| rest.eq_ignore_ascii_case(top)))
    {
        return None;
    }
    let mut parts: Vec<String> = rest.split("__").map(str::to_string).collect();
    let is_partner = parts[0].eq_ignore_ascii_case("partners");
    for (i, part) in parts.iter_mut().enumerate() {
        if !(is_partner && i == 1) {
            *part = part.to_ascii_lowercase();
        }
    }
    Some(parts.join("."))
}

fn env_provider() -> Env {
    // `lowercase(false)` must come last: figment's `filter_map` resets it.
    Env::raw()
        .filter_map(|name| env_key(name.as_str()).map(Into::into))
        .lowercase(false)
}

/// Loads and validates: the one entry point used by `serve` and `check-config`. Every problem
/// is reported, each naming its key and where it was set.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    load_checking(path, Certificates::Check)
}

/// `load` for a reload, which re-reads the certificate files by itself: a certificate that does
/// not load keeps the one in use and does not hold up the secrets.
pub fn load_for_reload(path: Option<&Path>) -> Result<Config, ConfigError> {
    load_checking(path, Certificates::Skip)
}

/// Whether loading checks the certificate files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Certificates {
    Check,
    Skip,
}

fn load_checking(path: Option<&Path>, certificates: Certificates) -> Result<Config, ConfigError> {
    let text = match path {
        Some(path) => Some(read_file(path)?),
        None => None,
    };
    let file = match (path, &text) {
        (Some(path), Some(text)) => Some(problems::File::parse(path, text)?),
        _ => None,
    };
    let tree = figment(text.as_deref()).find_value("").map_err(|err| {
        let at = path.map_or("environment".into(), |path| path.display().to_string());
        ConfigError(vec![format!("{at}: {}", err.kind)])
    })?;
    problems::check(&tree, file.as_ref(), certificates == Certificates::Check)
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError(vec![format!(
            "config file {} does not exist or is not a file",
            path.display()
        )]));
    }
    std::fs::read_to_string(path).map_err(|err| {
        ConfigError(vec![format!(
            "config file {} cannot be read: {err}",
            path.display()
        )])
    })
}

impl Config {
    /// Checks what serde cannot: ranges, relations between keys, that the secret sources are
    /// well formed and that the certificate files load. Every problem is reported, not just the
    /// first.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let mut problems = self.problems();
        problems.extend(self.certificates().err().unwrap_or_default());
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(ConfigError(problems))
        }
    }

    /// What `validate` finds, each problem as `key: message`.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = self.server.problems();
        problems.extend(self.upstream.problems());
        if self.reload_interval.is_zero() {
            problems.push("reload_interval: must be greater than 0".into());
        }
        let needed = self.verify.max_age + self.verify.max_skew;
        if self.replay.window < needed {
            problems.push(format!(
                "replay.window: {} is shorter than verify.max_age + verify.max_skew ({}); a replay \
                 could arrive after it was forgotten but while still fresh",
                Short(self.replay.window),
                Short(needed)
            ));
        }
        problems.extend(self.replay.problems());
        problems.extend(self.delivery.problems());
        if self.delivery.store == SpoolStoreKind::Redis && self.replay.redis_url.is_none() {
            problems.push(
                "delivery.store: \"redis\" keeps the spool in the replay store's Redis, and \
                 replay.redis_url is not set"
                    .into(),
            );
        }
        if !self.delivery.has_spool() && self.delivery.mode != DeliveryMode::Spool {
            let spooling = self
                .routes
                .iter()
                .enumerate()
                .filter(|(_, route)| route.delivery == Some(DeliveryMode::Spool))
                .map(|(i, _)| format!("routes[{i}]"))
                .chain(
                    self.partners
                        .iter()
                        .filter(|(_, partner)| partner.delivery == Some(DeliveryMode::Spool))
                        .map(|(code, _)| format!("partners.{code}")),
                )
                .collect::<Vec<_>>();
            if !spooling.is_empty() {
                problems.push(format!(
                    "delivery.spool_dir: required when callbacks are spooled ({} set delivery = \"spool\")",
                    spooling.join(", ")
                ));
            }
        }
        problems.extend(self.log.problems());
        problems.extend(crate::proxy::routes::problems(&self.routes, &self.schemas));
        for (name, schema) in &self.schemas {
            problems.extend(schema.problems(&format!("schemas.{name}")));
        }
        problems.extend(secrets::problems(
            &self.partners,
            self.partners_dir.as_deref(),
        ));
        problems
    }

    /// The certificate files (`[server.tls]`, the upstream's): present, readable PEM, each key
    /// matching its certificate, none expired. `Ok` with a line on each file saying when it
    /// expires (what check-config prints), or every problem, each naming its key.
    pub fn certificates(&self) -> Result<Vec<String>, Vec<String>> {
        let mut notes = Vec::new();
        let mut problems = Vec::new();
        let listener = match &self.server.tls {
            Some(files) => crate::server::tls::check(files),
            None => Ok(Vec::new()),
        };
        for checked in [listener, self.upstream.certificates()] {
            match checked {
                Ok(found) => notes.extend(found),
                Err(found) => problems.extend(found),
            }
        }
        if problems.is_empty() {
            Ok(notes)
        } else {
            Err(problems)
        }
    }

    /// Where the spool is kept: the `[delivery]` section, and the replay store's Redis.
    pub fn spool_place(&self) -> SpoolPlace {
        SpoolPlace {
            delivery: self.delivery.clone(),
            redis_url: self.replay.redis_url.clone(),
            key_prefix: self.replay.key_prefix.clone(),
        }
    }

    /// Whether `other` differs only in what a reload applies: partners, secrets and modes.
    pub fn same_apart_from_reloadable(&self, other: &Config) -> bool {
        let fixed = |config: &Config| {
            let mut copy = config.clone();
            copy.partners.clear();
            copy.partners_dir = None;
            copy.verify.mode = VerifyMode::Enforce;
            toml::to_string(&copy).unwrap_or_default()
        };
        fixed(self) == fixed(other)
    }

    /// The effective configuration as TOML with every inline secret replaced, for `check-config`.
    pub fn redacted_toml(&self) -> String {
        let mut copy = self.clone();
        for partner in copy.partners.values_mut() {
            for secret in &mut partner.secrets {
                *secret = "<redacted>".into();
            }
        }
        if let Some(url) = &mut copy.replay.redis_url {
            *url = redact_url_password(url);
        }
        toml::to_string_pretty(&copy).expect("config serializes to TOML")
    }
}

/// `redis://user:pass@host` → `redis://user:<redacted>@host`.
fn redact_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    format!(
        "{}://{user}:<redacted>@{}",
        &url[..scheme_end],
        &rest[at + 1..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_password_is_redacted() {
        assert_eq!(
            redact_url_password("redis://u:p4ss@h:6379/0"),
            "redis://u:<redacted>@h:6379/0"
        );
        assert_eq!(redact_url_password("redis://h:6379"), "redis://h:6379");
    }

    /// The defaults with the one partner a configuration needs to be valid.
    fn with_one_partner() -> Config {
        let mut config = Config::default();
        config.partners.insert(
            "P1".into(),
            PartnerConfig {
                secrets: vec!["k".into()],
                ..Default::default()
            },
        );
        config
    }

    #[test]
    fn window_shorter_than_freshness_is_refused() {
        let mut config = with_one_partner();
        config.replay.window = Duration::from_secs(3600);
        let err = config.clone().validate().unwrap_err();
        assert!(
            err.0.iter().any(|p| p.starts_with("replay.window")),
            "{err}"
        );
        config.replay.window = Duration::from_secs(24 * 3600 + 300);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn a_spool_needs_a_place() {
        let mut config = with_one_partner();
        config.routes.push(RouteConfig {
            path_prefix: "/sms".into(),
            verify: true,
            schema: None,
            require_timestamp: None,
            accept_form: None,
            delivery: Some(DeliveryMode::Spool),
        });
        let found = config.clone().validate().unwrap_err().0;
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("delivery.spool_dir: required") && p.contains("routes[0]")),
            "{found:?}"
        );
        config.delivery.store = SpoolStoreKind::Redis;
        let found = config.clone().validate().unwrap_err().0;
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("delivery.store:"), "{found:?}");
        config.replay.redis_url = Some("redis://127.0.0.1:6379".into());
        assert!(config.validate().is_ok());
    }

    #[test]
    fn defaults_are_consistent() {
        let defaults = Config::default();
        assert!(defaults.replay.window >= defaults.verify.max_age + defaults.verify.max_skew);
        assert!(defaults.server.max_buffered_bytes >= defaults.server.max_body_bytes);
    }

    #[test]
    fn the_body_budget_must_hold_one_body_of_the_largest_size() {
        let mut config = with_one_partner();
        let problems = |config: &Config| config.clone().validate().err().map(|err| err.0);
        config.server.max_buffered_bytes = config.server.max_body_bytes - 1;
        let found = problems(&config).unwrap();
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("server.max_buffered_bytes: 262143 is less than")),
            "{found:?}"
        );
        config.server.max_buffered_bytes = 0;
        config.server.admin_max_connections = 0;
        let found = problems(&config).unwrap();
        assert!(
            found.contains(&"server.max_buffered_bytes: must be greater than 0".to_string()),
            "{found:?}"
        );
        assert!(
            found.contains(&"server.admin_max_connections: must be greater than 0".to_string()),
            "{found:?}"
        );
        config.server.max_buffered_bytes = config.server.max_body_bytes;
        config.server.admin_max_connections = 1;
        assert!(problems(&config).is_none());
    }
}
