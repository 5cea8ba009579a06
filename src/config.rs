//! Configuration: built-in defaults < TOML file < `LFGUARD_SECTION__KEY` environment
//! variables, merged by figment, then one validation pass that reports every problem with its key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::verify::schema::Schema;
use crate::verify::signature::{Encoding, NestedValues, NullValues};

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "LFGUARD_CONFIG";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub verify: VerifyConfig,
    pub replay: ReplayConfig,
    pub log: LogConfig,
    pub routes: Vec<RouteConfig>,
    /// Member schemas by name, chosen per route with `schema = "NAME"`.
    pub schemas: BTreeMap<String, Schema>,
    /// A directory with one file per partner code, one secret a line (a mounted Secret).
    pub partners_dir: Option<PathBuf>,
    /// How often `partners_dir` and `secret_files` are re-read for changes (SIGHUP reloads too).
    #[serde(with = "humantime_serde")]
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
            log: LogConfig::default(),
            routes: Vec::new(),
            schemas: BTreeMap::new(),
            partners_dir: None,
            reload_interval: Duration::from_secs(10),
            partners: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_body_bytes: u64,
    /// Limit for receiving a request's headers; also how long an idle keep-alive connection
    /// is kept, since hyper starts this timer whenever it waits for the next request.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Connections served at once on the proxy port. At the cap, the connection idle the longest
    /// (between requests, or still sending its headers) is closed for a new one; connections
    /// with a request in progress are never closed for that.
    pub max_connections: usize,
    /// The same for the admin port, counted separately so that neither starves the other.
    pub admin_max_connections: usize,
    /// Bytes of request bodies buffered at once, over all connections; past it, 503 overloaded.
    pub max_buffered_bytes: u64,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// After SIGTERM, how long lfguard keeps accepting and serving (with `Connection: close`)
    /// while readiness already fails, so that load balancers and kube-proxy stop routing to it
    /// before it stops accepting.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Then, how long requests in progress get to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Tokio worker threads; 0 means one per core.
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".parse().expect("literal address"),
            admin_listen: "0.0.0.0:9090".parse().expect("literal address"),
            max_body_bytes: 256 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(15),
            // With the body budget and the baseline these fit the 64 MiB memory limit of the
            // shipped pod (k8s/base) with room; tests/limits.rs checks the arithmetic.
            max_connections: 384,
            admin_max_connections: 64,
            max_buffered_bytes: 8 * 1024 * 1024,
            max_headers: 64,
            max_header_bytes: 16 * 1024,
            drain_delay: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(20),
            worker_threads: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://host:port` with an optional path prefix; the request path is appended to it.
    pub url: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: "http://127.0.0.1:8081".into(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            pool_max_idle_per_host: 256,
            pool_idle_timeout: Duration::from_secs(90),
        }
    }
}

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
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    #[serde(with = "humantime_serde")]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDuplicate {
    #[default]
    Acknowledge,
    Reject,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplayConfig {
    pub store: StoreKind,
    /// How long a delivered callback is remembered; at least `max_age + max_skew`.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Memory store: the most keys held (about 120 bytes each); the least recently used go first.
    pub capacity: u64,
    pub on_duplicate: OnDuplicate,
    pub redis_url: Option<String>,
    pub key_prefix: String,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            store: StoreKind::Memory,
            window: Duration::from_secs(25 * 3600),
            capacity: 50_000,
            on_duplicate: OnDuplicate::Acknowledge,
            redis_url: None,
            key_prefix: "lfguard:".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `lfguard=debug`); `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

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
}

fn verify_by_default() -> bool {
    true
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PartnerConfig {
    /// Overrides `verify.mode` for this partner, e.g. to trial one new partner in report mode.
    pub mode: Option<VerifyMode>,
    /// Overrides `verify.require_timestamp` for this partner's callbacks (a route's setting wins).
    pub require_timestamp: Option<bool>,
    /// Inline secrets: for development only (a warning is logged at start).
    pub secrets: Vec<String>,
    pub secret_files: Vec<PathBuf>,
    pub secret_env: Vec<String>,
}

/// Every problem found in a configuration, each naming its key.
#[derive(Debug)]
pub struct ConfigError(pub Vec<String>);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "invalid configuration:")?;
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The figment of defaults, the file (when given) and the environment.
pub fn figment(path: Option<&Path>) -> Figment {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = path {
        figment = figment.merge(Toml::file_exact(path));
    }
    figment.merge(env_provider())
}

/// Top-level keys that an environment variable without `__` may set.
const TOP_LEVEL_ENV_KEYS: [&str; 2] = ["PARTNERS_DIR", "RELOAD_INTERVAL"];

/// `LFGUARD_SECTION__KEY` → `section.key`. Keys are lowercased, except a partner code
/// (`LFGUARD_PARTNERS__P002671__SECRET_ENV`), whose case is significant. Other `LFGUARD_*`
/// variables (`LFGUARD_CONFIG`, a secret named in `secret_env`) are not configuration.
fn env_provider() -> Env {
    // `lowercase(false)` must come last: figment's `filter` and `map` reset it.
    Env::prefixed("LFGUARD_")
        .filter(|key| {
            key.as_str().contains("__")
                || TOP_LEVEL_ENV_KEYS
                    .iter()
                    .any(|top| key.as_str().eq_ignore_ascii_case(top))
        })
        .map(|key| {
            let mut parts: Vec<String> = key.as_str().split("__").map(str::to_string).collect();
            let is_partner = parts[0].eq_ignore_ascii_case("partners");
            for (i, part) in parts.iter_mut().enumerate() {
                if !(is_partner && i == 1) {
                    *part = part.to_ascii_lowercase();
                }
            }
            parts.join(".").into()
        })
        .lowercase(false)
}

/// Loads and validates: the one entry point used by `serve` and `check-config`.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    if let Some(path) = path
        && !path.is_file()
    {
        return Err(ConfigError(vec![format!(
            "config file {} does not exist or is not a file",
            path.display()
        )]));
    }
    let config: Config = figment(path).extract().map_err(|err| {
        ConfigError(
            err.into_iter()
                .map(|e| {
                    let key = e.path.join(".");
                    if key.is_empty() {
                        e.to_string()
                    } else {
                        format!("{key}: {}", e.kind)
                    }
                })
                .collect(),
        )
    })?;
    config.validate()
}

impl Config {
    /// Checks what serde cannot: ranges, relations between keys, and that the secret sources are
    /// well formed. Every problem is reported, not just the first.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let server = &self.server;
        if server.max_body_bytes == 0 {
            problems.push("server.max_body_bytes: must be greater than 0".into());
        }
        for (key, value) in [
            ("server.header_read_timeout", server.header_read_timeout),
            ("server.body_read_timeout", server.body_read_timeout),
            ("upstream.timeout", self.upstream.timeout),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("reload_interval", self.reload_interval),
        ] {
            if value.is_zero() {
                problems.push(format!("{key}: must be greater than 0"));
            }
        }
        if server.max_connections == 0 {
            problems.push("server.max_connections: must be greater than 0".into());
        }
        if server.admin_max_connections == 0 {
            problems.push("server.admin_max_connections: must be greater than 0".into());
        }
        if server.max_buffered_bytes == 0 {
            problems.push("server.max_buffered_bytes: must be greater than 0".into());
        } else if server.max_buffered_bytes < server.max_body_bytes {
            problems.push(format!(
                "server.max_buffered_bytes: {} is less than server.max_body_bytes ({}); a body \
                 of the largest allowed size could never be buffered",
                server.max_buffered_bytes, server.max_body_bytes
            ));
        }
        if server.max_headers == 0 {
            problems.push("server.max_headers: must be greater than 0".into());
        }
        if server.max_header_bytes < 8192 {
            problems.push("server.max_header_bytes: must be at least 8192".into());
        }
        if let Err(problem) = crate::upstream::UpstreamTarget::parse(&self.upstream.url) {
            problems.push(format!("upstream.url: {problem}"));
        }
        let needed = self.verify.max_age + self.verify.max_skew;
        if self.replay.window < needed {
            problems.push(format!(
                "replay.window: {} is shorter than verify.max_age + verify.max_skew ({}); a replay \
                 could arrive after it was forgotten but while still fresh",
                humantime::format_duration(self.replay.window),
                humantime::format_duration(needed)
            ));
        }
        if self.replay.capacity == 0 {
            problems.push("replay.capacity: must be greater than 0".into());
        }
        if self.replay.store == StoreKind::Redis && self.replay.redis_url.is_none() {
            problems.push("replay.redis_url: required when replay.store = \"redis\"".into());
        }
        if let Some(url) = &self.replay.redis_url
            && !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("redis+unix://")
                || url.starts_with("unix://"))
        {
            problems
                .push("replay.redis_url: must start with redis://, rediss:// or unix://".into());
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problems.push(format!("log.level: {err}"));
        }
        for (i, route) in self.routes.iter().enumerate() {
            if !route.path_prefix.starts_with('/') {
                problems.push(format!("routes[{i}].path_prefix: must start with '/'"));
            }
            if !route.verify {
                for (key, set) in [
                    ("schema", route.schema.is_some()),
                    ("require_timestamp", route.require_timestamp.is_some()),
                    ("accept_form", route.accept_form.is_some()),
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
                && !self.schemas.contains_key(name)
            {
                problems.push(format!(
                    "routes[{i}].schema: no [schemas.{name}] is configured"
                ));
            }
            if self.routes[..i]
                .iter()
                .any(|other| other.path_prefix == route.path_prefix)
            {
                problems.push(format!(
                    "routes[{i}].path_prefix: {} is configured twice",
                    route.path_prefix
                ));
            }
        }
        for (name, schema) in &self.schemas {
            problems.extend(schema.problems(&format!("schemas.{name}")));
        }
        for code in self.partners.keys() {
            if !crate::secrets::is_partner_code(code) {
                problems.push(format!(
                    "partners.{code}: a partner code is letters, digits, '-' and '_'"
                ));
            }
        }
        if self.partners.is_empty() && self.partners_dir.is_none() {
            problems.push(
                "partners: no partner is configured (add [partners.CODE] or partners_dir)".into(),
            );
        }
        if let Err(mut secret_problems) = crate::secrets::SecretStore::load(&self) {
            problems.append(&mut secret_problems);
        }
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(ConfigError(problems))
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

    #[test]
    fn window_shorter_than_freshness_is_refused() {
        let mut config = Config::default();
        config.partners.insert(
            "P1".into(),
            PartnerConfig {
                secrets: vec!["k".into()],
                ..Default::default()
            },
        );
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
    fn defaults_are_consistent() {
        let defaults = Config::default();
        assert!(defaults.replay.window >= defaults.verify.max_age + defaults.verify.max_skew);
        assert!(defaults.server.max_buffered_bytes >= defaults.server.max_body_bytes);
    }

    #[test]
    fn the_body_budget_must_hold_one_body_of_the_largest_size() {
        let mut config = Config::default();
        config.partners.insert(
            "P1".into(),
            PartnerConfig {
                secrets: vec!["k".into()],
                ..Default::default()
            },
        );
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
