//! Partner secrets: loaded from inline config, files, environment variables and `partners_dir`,
//! held behind an `ArcSwap` so a reload replaces the whole set at once or not at all.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::spool::DeliveryMode;
use crate::verify::config::VerifyMode;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PartnerConfig {
    /// Overrides `verify.mode` for this partner, e.g. to trial one new partner in report mode.
    pub mode: Option<VerifyMode>,
    /// Overrides `verify.require_timestamp` for this partner's callbacks (a route's setting wins).
    pub require_timestamp: Option<bool>,
    /// Overrides `delivery.mode` for this partner's callbacks (a route's setting wins).
    pub delivery: Option<DeliveryMode>,
    /// Inline secrets: for development only (a warning is logged at start).
    pub secrets: Vec<String>,
    pub secret_files: Vec<PathBuf>,
    pub secret_env: Vec<String>,
}

/// Checks the `[partners.CODE]` sections and `partners_dir`: partner codes, that a partner is
/// configured at all, and that every secret source reads (each problem naming its key).
pub fn problems(
    partners: &BTreeMap<String, PartnerConfig>,
    partners_dir: Option<&Path>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for code in partners.keys() {
        if !is_partner_code(code) {
            problems.push(format!(
                "partners.{code}: a partner code is letters, digits, '-' and '_'"
            ));
        }
    }
    if partners.is_empty() && partners_dir.is_none() {
        problems.push(
            "partners: no partner is configured (add [partners.CODE] or partners_dir)".into(),
        );
    }
    if let Err(mut secret_problems) =
        SecretStore::load(partners, partners_dir, VerifyMode::default())
    {
        problems.append(&mut secret_problems);
    }
    problems
}

/// One secret of a partner. `id` names where it came from, never what it is.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    pub id: String,
    pub secret: String,
    /// `id` as the value of the header that names it to the backend, made once rather than per
    /// request (an id is visible ASCII: a source name and a line number).
    pub id_header: http::HeaderValue,
}

impl Key {
    pub fn new(id: String, secret: String) -> Self {
        let id_header = http::HeaderValue::from_str(&id)
            .unwrap_or_else(|_| http::HeaderValue::from_static("unnamed"));
        Key {
            id,
            secret,
            id_header,
        }
    }
}

/// A configured partner: its secrets in rotation order and its overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Partner {
    pub keys: Vec<Key>,
    /// Overrides `verify.mode`.
    pub mode: Option<VerifyMode>,
    /// Overrides `verify.require_timestamp`.
    pub require_timestamp: Option<bool>,
    /// Overrides `delivery.mode`.
    pub delivery: Option<DeliveryMode>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Every configured partner's secrets, in rotation order, and the per-partner overrides (mode,
/// whether a timestamp is required): the part of the configuration that a reload replaces. A
/// request looks its partner up once (`partner`) and reads everything from the entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretStore {
    partners: BTreeMap<String, Partner>,
    default_mode: VerifyMode,
}

/// A partner code as Linksfield issues them (`P002671`); also a safe file name.
pub fn is_partner_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl SecretStore {
    /// Reads every secret source. Any problem (a missing file, an empty secret, a partner with no
    /// secret) fails the whole load, so a half-read set never replaces a good one.
    /// `default_mode` is `verify.mode`, for partners without a `mode` of their own.
    pub fn load(
        partners_config: &BTreeMap<String, PartnerConfig>,
        partners_dir: Option<&Path>,
        default_mode: VerifyMode,
    ) -> Result<SecretStore, Vec<String>> {
        let mut problems = Vec::new();
        let mut partners: BTreeMap<String, Vec<Key>> = BTreeMap::new();

        for (code, partner) in partners_config {
            let keys = partners.entry(code.clone()).or_default();
            for (i, secret) in partner.secrets.iter().enumerate() {
                match check_secret(secret) {
                    Ok(()) => keys.push(Key::new(format!("inline:{i}"), secret.clone())),
                    Err(why) => problems.push(format!("partners.{code}.secrets[{i}]: {why}")),
                }
            }
            for (i, path) in partner.secret_files.iter().enumerate() {
                let label = format!("partners.{code}.secret_files[{i}]");
                match std::fs::read_to_string(path) {
                    Ok(text) => add_lines(keys, &text, &format!("file{i}"), &label, &mut problems),
                    Err(err) => problems.push(format!("{label}: {}: {err}", path.display())),
                }
            }
            for (i, var) in partner.secret_env.iter().enumerate() {
                let label = format!("partners.{code}.secret_env[{i}]");
                match std::env::var(var) {
                    Ok(text) => {
                        add_lines(keys, &text, &format!("env:{var}"), &label, &mut problems)
                    }
                    Err(_) => {
                        problems.push(format!("{label}: environment variable {var} is not set"))
                    }
                }
            }
        }

        if let Some(dir) = partners_dir {
            load_dir(dir, &mut partners, &mut problems);
        }

        for (code, keys) in &partners {
            if keys.is_empty() && !problems.iter().any(|p| p.contains(code.as_str())) {
                problems.push(format!("partners.{code}: no secret configured"));
            }
        }
        if problems.is_empty() {
            let partners = partners
                .into_iter()
                .map(|(code, keys)| {
                    let config = partners_config.get(&code);
                    let partner = Partner {
                        keys,
                        mode: config.and_then(|config| config.mode),
                        require_timestamp: config.and_then(|config| config.require_timestamp),
                        delivery: config.and_then(|config| config.delivery),
                    };
                    (code, partner)
                })
                .collect();
            Ok(SecretStore {
                partners,
                default_mode,
            })
        } else {
            Err(problems)
        }
    }

    /// A configured partner.
    pub fn partner(&self, code: &str) -> Option<&Partner> {
        self.partners.get(code)
    }

    /// The secrets of a partner, if it is configured.
    pub fn keys(&self, code: &str) -> Option<&[Key]> {
        self.partner(code).map(|partner| partner.keys.as_slice())
    }

    /// The mode for a partner; `verify.mode` when the partner is unknown or has no override.
    pub fn mode_of(&self, partner: Option<&Partner>) -> VerifyMode {
        partner
            .and_then(|partner| partner.mode)
            .unwrap_or(self.default_mode)
    }

    pub fn contains(&self, code: &str) -> bool {
        self.partners.contains_key(code)
    }

    pub fn partner_count(&self) -> usize {
        self.partners.len()
    }
}

/// One file per partner code; hidden entries are skipped because Kubernetes keeps its
/// `..data` symlink and timestamped directories beside the keys of a mounted Secret.
fn load_dir(dir: &Path, partners: &mut BTreeMap<String, Vec<Key>>, problems: &mut Vec<String>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            problems.push(format!("partners_dir: {}: {err}", dir.display()));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                problems.push(format!("partners_dir: {}: {err}", dir.display()));
                continue;
            }
        };
        let name = entry.file_name();
        let Some(code) = name.to_str() else {
            problems.push(format!(
                "partners_dir: {:?} is not a valid partner code",
                name
            ));
            continue;
        };
        if code.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // `is_file` follows symlinks, which is how a mounted Secret exposes its keys.
        if !path.is_file() {
            continue;
        }
        let label = format!("partners_dir/{code}");
        if !is_partner_code(code) {
            problems.push(format!("{label}: file name is not a partner code"));
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let keys = partners.entry(code.to_string()).or_default();
                add_lines(keys, &text, "dir", &label, problems);
            }
            Err(err) => problems.push(format!("{label}: {err}")),
        }
    }
}

/// Adds one secret per non-blank line; surrounding whitespace (and a CR) is not part of a secret.
fn add_lines(
    keys: &mut Vec<Key>,
    text: &str,
    source: &str,
    label: &str,
    problems: &mut Vec<String>,
) {
    let before = keys.len();
    for (line_no, line) in text.lines().enumerate() {
        let secret = line.trim();
        if secret.is_empty() {
            continue;
        }
        match check_secret(secret) {
            Ok(()) => keys.push(Key::new(
                format!("{source}:{}", line_no + 1),
                secret.to_string(),
            )),
            Err(why) => problems.push(format!("{label} line {}: {why}", line_no + 1)),
        }
    }
    if keys.len() == before {
        problems.push(format!("{label}: holds no secret"));
    }
}

fn check_secret(secret: &str) -> Result<(), &'static str> {
    if secret.trim().is_empty() {
        return Err("secret is empty");
    }
    if secret.chars().any(char::is_control) {
        return Err("secret contains a control character");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(partner: PartnerConfig) -> BTreeMap<String, PartnerConfig> {
        BTreeMap::from([("P1".to_string(), partner)])
    }

    fn load(partners: &BTreeMap<String, PartnerConfig>) -> Result<SecretStore, Vec<String>> {
        SecretStore::load(partners, None, VerifyMode::Enforce)
    }

    #[test]
    fn files_and_dirs_give_one_key_per_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("P2"), "old\r\n\nnew\n").unwrap();
        std::fs::write(dir.path().join(".hidden"), "x").unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let file = elsewhere.path().join("p1.secret");
        std::fs::write(&file, "  s1  \n").unwrap();
        let config = config_with(PartnerConfig {
            secrets: vec!["inline".into()],
            secret_files: vec![file],
            ..Default::default()
        });
        let store = SecretStore::load(&config, Some(dir.path()), VerifyMode::Enforce).unwrap();
        let p1: Vec<_> = store
            .keys("P1")
            .unwrap()
            .iter()
            .map(|k| (k.id.as_str(), k.secret.as_str()))
            .collect();
        assert_eq!(p1, [("inline:0", "inline"), ("file0:1", "s1")]);
        let p2: Vec<_> = store
            .keys("P2")
            .unwrap()
            .iter()
            .map(|k| (k.id.as_str(), k.secret.as_str()))
            .collect();
        assert_eq!(p2, [("dir:1", "old"), ("dir:3", "new")]);
        assert!(!store.contains(".hidden"));
    }

    #[test]
    fn every_problem_is_reported_and_no_secret_is_shown() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n \n").unwrap();
        let config = config_with(PartnerConfig {
            secrets: vec!["".into(), "good-secret".into()],
            secret_files: vec![empty, dir.path().join("missing")],
            secret_env: vec!["LFGUARD_TEST_SURELY_UNSET_VAR".into()],
            mode: None,
            require_timestamp: None,
            delivery: None,
        });
        let problems = load(&config).unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems.iter().all(|p| !p.contains("good-secret")));
    }

    #[test]
    fn partner_modes_override_the_default() {
        let mut config = config_with(PartnerConfig {
            secrets: vec!["k".into()],
            mode: Some(VerifyMode::Report),
            ..Default::default()
        });
        config.insert(
            "P2".into(),
            PartnerConfig {
                secrets: vec!["k".into()],
                ..Default::default()
            },
        );
        let store = load(&config).unwrap();
        assert_eq!(store.mode_of(store.partner("P1")), VerifyMode::Report);
        assert_eq!(store.mode_of(store.partner("P2")), VerifyMode::Enforce);
        assert_eq!(store.mode_of(None), VerifyMode::Enforce);
    }

    #[test]
    fn debug_output_redacts() {
        let key = Key::new("inline:0".into(), "hunter2".into());
        assert!(!format!("{key:?}").contains("hunter2"));
    }
}
