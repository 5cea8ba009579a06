//! Every problem of a configuration in one pass, one line each, naming the key and where its
//! value was set: the file and line, the environment variable, or the built-in default.
//!
//! serde stops at the first error, so the merged value tree is read again after each one: the
//! error is reported and the value it concerns removed (its default then applies), until the
//! tree reads. The checks that serde cannot make (`Config::problems`) then run on the result.
//! Lines come from the file's own TOML spans; figment keeps no positions.

use std::path::Path;

use figment::error::{Actual, Kind};
use figment::value::Value;
use serde::Deserialize;
use toml::de::{DeTable, DeValue};

use super::{Config, ConfigError};

/// The configuration file: its path as given, its text and its document with the spans of keys.
pub(super) struct File<'a> {
    path: &'a Path,
    text: &'a str,
    document: DeValue<'a>,
}

impl<'a> File<'a> {
    /// Parses `text`; a syntax error is then the one problem, with its line.
    pub(super) fn parse(path: &'a Path, text: &'a str) -> Result<Self, ConfigError> {
        match DeTable::parse(text) {
            Ok(document) => Ok(File {
                path,
                text,
                document: DeValue::Table(document.into_inner()),
            }),
            Err(err) => {
                let line = err.span().map(|span| line_at(text, span.start));
                let source = Source::File { path, line };
                Err(ConfigError(vec![format!(
                    "{source}: not valid TOML: {}",
                    one_line(err.message())
                )]))
            }
        }
    }

    /// The line of the key at `path` (of the element, for an array element), if the file sets it.
    fn line(&self, path: &[String]) -> Option<usize> {
        let mut value = &self.document;
        let mut start = None;
        for segment in path {
            let (span, child) = match value {
                DeValue::Table(table) => table
                    .iter()
                    .find(|(key, _)| key.get_ref() == segment)
                    .map(|(key, child)| (key.span(), child))?,
                DeValue::Array(array) => {
                    let child = array.get(segment.parse::<usize>().ok()?)?;
                    (child.span(), child)
                }
                DeValue::String(_)
                | DeValue::Integer(_)
                | DeValue::Float(_)
                | DeValue::Boolean(_)
                | DeValue::Datetime(_) => return None,
            };
            start = Some(span.start);
            value = child.get_ref();
        }
        start.map(|start| line_at(self.text, start))
    }
}

/// Where a value was set.
enum Source<'a> {
    File { path: &'a Path, line: Option<usize> },
    Env(String),
    Default,
}

impl std::fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File {
                path,
                line: Some(line),
            } => write!(f, "{}:{line}", path.display()),
            Source::File { path, line: None } => write!(f, "{}", path.display()),
            Source::Env(var) => f.write_str(var),
            Source::Default => f.write_str("default"),
        }
    }
}

/// The layers a value can come from, to name the one that set a key.
struct Sources<'a> {
    tree: &'a Value,
    file: Option<&'a File<'a>>,
    /// Each configuration variable of the environment, with the key path it sets.
    env: Vec<(String, Vec<String>)>,
}

impl<'a> Sources<'a> {
    /// The layer that set `path`: the environment overrides the file, which overrides the
    /// defaults. A table only the environment adds is named by a variable inside it.
    fn of(&self, path: &[String]) -> Option<Source<'a>> {
        if let Some((var, _)) = self
            .env
            .iter()
            .filter(|(_, key)| path.starts_with(key))
            .max_by_key(|(_, key)| key.len())
        {
            return Some(Source::Env(var.clone()));
        }
        if let Some(file) = self.file
            && let Some(line) = file.line(path)
        {
            return Some(Source::File {
                path: file.path,
                line: Some(line),
            });
        }
        if let Some((var, _)) = self.env.iter().find(|(_, key)| key.starts_with(path)) {
            return Some(Source::Env(var.clone()));
        }
        match find(self.tree, path) {
            Some(Value::Dict(..)) | None => None,
            Some(_) => Some(Source::Default),
        }
    }

    /// One line of the report: `key (source): message`.
    fn line(&self, key: &str, path: &[String], message: &str) -> String {
        match self.of(path) {
            Some(source) => format!("{key} ({source}): {message}"),
            None => format!("{key}: {message}"),
        }
    }
}

/// Reads the merged `tree` into a `Config` and checks it, reporting every problem; with
/// `certificates`, the certificate files too.
pub(super) fn check(
    tree: &Value,
    file: Option<&File<'_>>,
    certificates: bool,
) -> Result<Config, ConfigError> {
    let sources = Sources {
        tree,
        file,
        env: env_vars(),
    };
    let mut lines = Vec::new();
    // Values that could not be read and were removed: the checks below see their defaults
    // instead, and complaints about those would only repeat the problem.
    let mut removed: Vec<Vec<String>> = Vec::new();
    let mut remaining = tree.clone();
    let config = loop {
        let err = match Config::deserialize(&remaining) {
            Ok(config) => break Some(config),
            Err(err) => err,
        };
        let mut key = err.path.clone();
        if let Kind::MissingField(field) = &err.kind {
            key.push(field.to_string());
        }
        if let Kind::DuplicateField(field) = &err.kind {
            key.push(field.to_string());
        }
        let message = describe(&err.kind, find(tree, &err.path), is_secret(&key));
        lines.push(sources.line(&display(tree, &key), &err.path, &message));
        match remove(&mut remaining, &err.path) {
            // An unknown key was never read: without it, the configuration means the same.
            Some(_) if matches!(err.kind, Kind::UnknownField(..)) => {}
            Some(path) => removed.push(path),
            None => break None,
        }
    };
    let Some(config) = config else {
        return Err(ConfigError(lines));
    };
    let mut problems = config.problems();
    if certificates {
        problems.extend(config.certificates().err().unwrap_or_default());
    }
    for problem in problems {
        let Some((key, message)) = problem.split_once(": ") else {
            lines.push(problem);
            continue;
        };
        let path = parse_key(key);
        let follows_from_removal = removed
            .iter()
            .any(|gone| path.starts_with(gone) || gone.starts_with(&path));
        if !follows_from_removal {
            lines.push(sources.line(key, &path, message));
        }
    }
    if lines.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError(lines))
    }
}

/// serde's error as one line, without doubling the backticks serde's own texts already have.
fn describe(kind: &Kind, value: Option<&Value>, secret: bool) -> String {
    let found = |actual: &Actual| match actual {
        _ if secret => "a value (not shown: it may be a secret)".to_string(),
        Actual::Seq => "an array".to_string(),
        Actual::Map => "a table".to_string(),
        other => other.to_string(),
    };
    // serde's names for what TOML and the environment call arrays and tables.
    let expected = |expected: &str| match expected {
        "a sequence" => "an array".to_string(),
        "a map" => "a table".to_string(),
        _ if expected.starts_with("struct ") => "a table".to_string(),
        other => other.to_string(),
    };
    match kind {
        Kind::Message(message) => match value {
            Some(Value::String(_, text)) if !secret => format!("{message} (found {text:?})"),
            _ => message.clone(),
        },
        Kind::InvalidType(actual, wanted) | Kind::InvalidValue(actual, wanted) => {
            format!("expected {}, found {}", expected(wanted), found(actual))
        }
        Kind::InvalidLength(length, wanted) => {
            format!("expected {}, found {length} elements", expected(wanted))
        }
        Kind::UnknownVariant(variant, expected) => {
            let expected: Vec<String> = expected.iter().map(|name| format!("{name:?}")).collect();
            format!("expected one of {}, found {variant:?}", expected.join(", "))
        }
        Kind::UnknownField(_, expected) => {
            format!("unknown key (known here: {})", expected.join(", "))
        }
        Kind::MissingField(_) => "required, and not set".to_string(),
        Kind::DuplicateField(_) => "set twice".to_string(),
        Kind::ISizeOutOfRange(number) => format!("{number} is out of range"),
        Kind::USizeOutOfRange(number) => format!("{number} is out of range"),
        Kind::Unsupported(actual) => format!("unsupported value: {}", found(actual)),
        Kind::UnsupportedKey(actual, wanted) => {
            format!(
                "unsupported key: expected {wanted}, found {}",
                found(actual)
            )
        }
    }
}

/// Inline secrets (`partners.CODE.secrets`) are never printed, not even when mistyped.
fn is_secret(path: &[String]) -> bool {
    matches!(path, [partners, _, secrets, ..] if partners == "partners" && secrets == "secrets")
}

/// The value at `path`: table keys, and array indices as decimal numbers.
fn find<'v>(tree: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(tree, |value, segment| match value {
        Value::Dict(_, dict) => dict.get(segment),
        Value::Array(_, items) => items.get(segment.parse::<usize>().ok()?),
        _ => None,
    })
}

/// Removes the value at `path` so that its default applies, and returns the path removed. An
/// array element is not removed (the indices after it would change): the array is, unless
/// something inside the element can be. `None` when nothing could be removed.
fn remove(value: &mut Value, path: &[String]) -> Option<Vec<String>> {
    let (first, rest) = path.split_first()?;
    let inner = match value {
        Value::Dict(_, dict) => match dict.get_mut(first).and_then(|child| remove(child, rest)) {
            Some(inner) => Some(inner),
            None => return dict.remove(first).map(|_| vec![first.clone()]),
        },
        Value::Array(_, items) => first
            .parse::<usize>()
            .ok()
            .and_then(|index| items.get_mut(index))
            .and_then(|item| remove(item, rest)),
        _ => None,
    };
    inner.map(|inner| std::iter::once(first.clone()).chain(inner).collect())
}

/// `path` written as the configuration's keys are: `routes[0].schema`, `partners.P1.secrets`.
fn display(tree: &Value, path: &[String]) -> String {
    let mut written = String::new();
    let mut value = Some(tree);
    for segment in path {
        match value {
            Some(Value::Array(..)) => written.push_str(&format!("[{segment}]")),
            _ if written.is_empty() => written.push_str(segment),
            _ => written.push_str(&format!(".{segment}")),
        }
        value = value.and_then(|value| find(value, std::slice::from_ref(segment)));
    }
    written
}

/// The path of a key as the checks write it: `routes[0].schema` → `routes`, `0`, `schema`.
fn parse_key(key: &str) -> Vec<String> {
    key.split(['.', '[', ']'])
        .filter(|segment| !segment.is_empty())
        .map(str::to_string)
        .collect()
}

/// The configuration variables of the environment, each with the key path it sets.
fn env_vars() -> Vec<(String, Vec<String>)> {
    std::env::vars_os()
        .filter_map(|(name, _)| {
            let name = name.to_str()?.trim().to_string();
            let key = super::env_key(&name)?;
            let path = key.split('.').map(str::to_string).collect();
            Some((name, path))
        })
        .collect()
}

/// The 1-based line of byte `offset` in `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&byte| byte == b'\n')
        .count()
        + 1
}

/// A message on one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(key: &str) -> Vec<String> {
        parse_key(key)
    }

    const TEXT: &str = "\
top = 1
[server]
listen = \"x\"

[[routes]]
path_prefix = \"/a\"

[[routes]]
path_prefix = \"/b\"
schema = \"s\"

[partners.P1]
secret_files = [
  \"/one\",
  \"/two\",
]
[schemas.s]
members.imsi = { type = \"string\" }
";

    #[test]
    fn the_file_gives_the_line_of_each_key() {
        let file = File::parse(Path::new("f.toml"), TEXT).unwrap();
        for (key, line) in [
            ("top", 1),
            ("server", 2),
            ("server.listen", 3),
            ("routes[1].schema", 10),
            ("partners.P1", 12),
            ("partners.P1.secret_files[1]", 15),
            ("schemas.s.members.imsi.type", 18),
        ] {
            assert_eq!(file.line(&path(key)), Some(line), "{key}");
        }
        assert_eq!(
            file.line(&path("routes[0]")).map(|line| line > 4),
            Some(true)
        );
        assert_eq!(file.line(&path("server.admin_listen")), None);
        assert_eq!(file.line(&path("routes[2]")), None);
    }

    #[test]
    fn a_syntax_error_is_one_line_with_its_line_number() {
        let err = File::parse(Path::new("f.toml"), "a = 1\nb = \n")
            .err()
            .unwrap();
        assert_eq!(err.0.len(), 1);
        assert!(err.0[0].starts_with("f.toml:2: not valid TOML: "), "{err}");
        assert!(!err.0[0].contains('\n'));
    }

    #[test]
    fn keys_are_written_with_array_indices() {
        let tree: Value = figment::Figment::from(figment::providers::Serialized::defaults(
            toml::from_str::<toml::Table>(TEXT).unwrap(),
        ))
        .extract()
        .unwrap();
        for key in [
            "routes[1].schema",
            "partners.P1.secret_files[0]",
            "server.listen",
        ] {
            assert_eq!(display(&tree, &path(key)), key);
            assert!(find(&tree, &path(key)).is_some(), "{key}");
        }
    }

    #[test]
    fn removing_keeps_array_indices() {
        let mut tree: Value = figment::Figment::from(figment::providers::Serialized::defaults(
            toml::from_str::<toml::Table>(TEXT).unwrap(),
        ))
        .extract()
        .unwrap();
        assert_eq!(
            remove(&mut tree, &path("routes[1].schema")),
            Some(path("routes.1.schema"))
        );
        assert!(find(&tree, &path("routes[1].path_prefix")).is_some());
        assert!(find(&tree, &path("routes[1].schema")).is_none());
        // An element itself: its whole array goes.
        assert_eq!(
            remove(&mut tree, &path("partners.P1.secret_files[0]")),
            Some(path("partners.P1.secret_files"))
        );
        assert!(find(&tree, &path("partners.P1.secret_files")).is_none());
        assert!(find(&tree, &path("partners.P1")).is_some());
        assert_eq!(remove(&mut tree, &[]), None);
        assert_eq!(remove(&mut tree, &path("nothing.here")), None);
    }

    #[test]
    fn inline_secrets_are_never_shown() {
        let message = describe(
            &Kind::InvalidType(Actual::Str("hunter2".into()), "a sequence".into()),
            None,
            is_secret(&path("partners.P1.secrets")),
        );
        assert!(!message.contains("hunter2"), "{message}");
        assert!(!is_secret(&path("partners.P1.secret_files")));
    }

    #[test]
    fn no_message_doubles_backticks() {
        for kind in [
            Kind::UnknownField("bogus".into(), &["listen", "admin_listen"]),
            Kind::UnknownVariant("xml".into(), &["json", "text"]),
            Kind::InvalidType(Actual::Unsigned(5), "a string".into()),
            Kind::MissingField("path_prefix".into()),
        ] {
            let message = describe(&kind, None, false);
            assert!(!message.contains("``"), "{message}");
            assert!(!message.contains("`one of"), "{message}");
        }
        assert_eq!(
            describe(
                &Kind::UnknownVariant("xml".into(), &["json", "text"]),
                None,
                false
            ),
            "expected one of \"json\", \"text\", found \"xml\""
        );
    }
}
