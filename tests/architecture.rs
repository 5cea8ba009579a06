//! The layers of `src/` point only down, and no modules import each other in a circle.
//!
//! Reads every `src/**/*.rs` file, collects its `crate::…` paths (in `use` declarations and in
//! code), resolves each to the module it names and checks the edge against the table below. A
//! new module must be added to the table, with its layer, or this test fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first: a module may import from its own layer and the layers below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Layer {
    /// The pure core: no I/O, no clock, no tokio.
    Verify,
    /// Secrets, the replay store and the spool.
    State,
    /// The request log and the metrics, fed plain values.
    Telemetry,
    /// The HTTP pipeline and the upstream pool.
    Proxy,
    /// Listeners, connections, signals, reload, admin; `config` composes the sections.
    Server,
    /// The command line.
    Cli,
}

use Layer::*;

/// Every module of the crate and its layer (`lib.rs`, the root, only declares and re-exports).
const LAYERS: &[(&str, Layer)] = &[
    ("verify", Verify),
    ("verify::ambiguity", Verify),
    ("verify::config", Verify),
    ("verify::diagnose", Verify),
    ("verify::duration", Verify),
    ("verify::freshness", Verify),
    ("verify::json_text", Verify),
    ("verify::schema", Verify),
    ("verify::signature", Verify),
    ("verify::signature::reader", Verify),
    ("state", State),
    ("state::certs", State),
    ("state::replay", State),
    ("state::replay::memory", State),
    ("state::replay::redis", State),
    ("state::secrets", State),
    ("state::spool", State),
    ("state::spool::redis", State),
    ("state::spool::sqlite", State),
    ("telemetry", Telemetry),
    ("telemetry::logging", Telemetry),
    ("telemetry::metrics", Telemetry),
    ("proxy", Proxy),
    ("proxy::body", Proxy),
    ("proxy::checks", Proxy),
    ("proxy::delivery", Proxy),
    ("proxy::error", Proxy),
    ("proxy::framing", Proxy),
    ("proxy::headers", Proxy),
    ("proxy::limits", Proxy),
    ("proxy::peer", Proxy),
    ("proxy::read", Proxy),
    ("proxy::record", Proxy),
    ("proxy::routes", Proxy),
    ("proxy::upstream", Proxy),
    ("proxy::upstream::body", Proxy),
    ("proxy::upstream::tls", Proxy),
    ("proxy::worker", Proxy),
    ("server", Server),
    ("server::admin", Server),
    ("server::config", Server),
    ("server::connections", Server),
    ("server::reload", Server),
    ("server::shared", Server),
    ("server::signals", Server),
    ("server::tls", Server),
    ("config", Server),
    ("config::problems", Server),
    ("cli", Cli),
    ("cli::client", Cli),
    ("cli::demo", Cli),
    ("cli::echo", Cli),
    ("cli::send", Cli),
    ("cli::sign", Cli),
    ("cli::spool", Cli),
];

/// Modules that must not reach for I/O, a clock or tokio, whatever they import.
const PURE: &[&str] = &["verify"];
const IMPURE: &[&str] = &[
    "tokio",
    "std::fs",
    "std::net",
    "std::env",
    "SystemTime::now",
    "Instant::now",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/` but the crate roots, with its module path.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                found.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&src(), &mut files);
    let mut modules = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(src()).expect("under src/");
        let mut parts: Vec<String> = relative
            .iter()
            .map(|part| part.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        if parts.last().is_some_and(|last| last == "mod") {
            parts.pop();
        }
        if parts == ["lib"] || parts == ["main"] {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("a source file is readable");
        modules.insert(parts.join("::"), text);
    }
    modules
}

/// The code of a file without its comment lines (doc comments name paths in prose).
fn code(text: &str) -> String {
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths after each `prefix` (`crate::`, `super::`, `self::`), up to the first segment that
/// is not a lowercase module-like name: `crate::proxy::limits::{BodyBudget, …}` gives
/// `["proxy", "limits"]`.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `lfguard_crate::` or the like
        }
        let mut segments = Vec::new();
        let mut tail = rest;
        loop {
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            if end == 0 {
                break;
            }
            segments.push(tail[..end].to_string());
            match tail[end..].strip_prefix("::") {
                Some(next) => tail = next,
                None => break,
            }
        }
        paths.push(segments);
    }
    paths
}

fn crate_paths(code: &str) -> Vec<Vec<String>> {
    paths_after(code, "crate::")
}

/// `self::` and `super::` paths outside the file's test module, as paths from the crate root.
/// (In a `mod tests` block, `super` is the file's own module.)
fn relative_paths(module: &str, code: &str) -> Vec<Vec<String>> {
    let code = code.split("#[cfg(test)]").next().unwrap_or_default();
    let own: Vec<String> = module.split("::").map(str::to_string).collect();
    // A folder's `mod.rs` is the folder module itself, so its `super` is the folder's parent.
    let parent = own[..own.len() - 1].to_vec();
    let mut paths = Vec::new();
    for (prefix, base) in [("self::", &own), ("super::", &parent)] {
        for segments in paths_after(code, prefix) {
            let mut path = base.clone();
            path.extend(segments);
            if !path.is_empty() {
                paths.push(path);
            }
        }
    }
    paths
}

/// The longest known module that `segments` starts with.
fn resolve(segments: &[String], known: &BTreeSet<&str>) -> Option<String> {
    (1..=segments.len())
        .rev()
        .map(|n| segments[..n].join("::"))
        .find(|candidate| known.contains(candidate.as_str()))
}

/// Every edge `from → to` between two different modules: `crate::` paths anywhere, `self::` and
/// `super::` paths outside test modules.
fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let known: BTreeSet<&str> = modules.keys().map(String::as_str).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut unresolved = Vec::new();
    for (module, text) in &modules {
        let code = code(text);
        for segments in crate_paths(&code) {
            match resolve(&segments, &known) {
                Some(target) if &target != module => {
                    edges.entry(module.clone()).or_default().insert(target);
                }
                Some(_) => {}
                None => unresolved.push(format!("{module}: crate::{}", segments.join("::"))),
            }
        }
        for segments in relative_paths(module, &code) {
            if let Some(target) = resolve(&segments, &known)
                && &target != module
            {
                edges.entry(module.clone()).or_default().insert(target);
            }
        }
    }
    assert!(
        unresolved.is_empty(),
        "paths that name no module (use the layered path, e.g. crate::verify::signature, not an \
         old re-export such as crate::signature):\n  {}",
        unresolved.join("\n  ")
    );
    edges
}

fn layer_of(module: &str) -> Layer {
    LAYERS
        .iter()
        .find(|(name, _)| *name == module)
        .map(|(_, layer)| *layer)
        .unwrap_or_else(|| {
            panic!("module {module} has no layer: add it to LAYERS in tests/architecture.rs")
        })
}

#[test]
fn every_module_has_a_layer_and_every_entry_a_module() {
    let modules = modules();
    let missing: Vec<&String> = modules
        .keys()
        .filter(|module| !LAYERS.iter().any(|(name, _)| name == module))
        .collect();
    assert!(
        missing.is_empty(),
        "modules with no layer; add each to LAYERS in tests/architecture.rs: {missing:?}"
    );
    let stale: Vec<&str> = LAYERS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !modules.contains_key(*name))
        .collect();
    assert!(
        stale.is_empty(),
        "LAYERS names modules that no longer exist: {stale:?}"
    );
}

#[test]
fn imports_point_only_down() {
    let mut upward = Vec::new();
    for (from, targets) in edges() {
        for to in targets {
            let (from_layer, to_layer) = (layer_of(&from), layer_of(&to));
            if to_layer > from_layer {
                upward.push(format!(
                    "{from} ({from_layer:?}) imports {to} ({to_layer:?})"
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports from a higher layer; pass plain values down or expose a function the upper \
         layer calls instead:\n  {}",
        upward.join("\n  ")
    );
}

#[test]
fn no_modules_import_each_other_in_a_circle() {
    let edges = edges();
    // Depth-first search; a module met again while still on the stack closes a circle.
    fn visit(
        module: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        circles: &mut Vec<String>,
    ) {
        if let Some(at) = stack.iter().position(|m| m == module) {
            let mut circle = stack[at..].to_vec();
            circle.push(module.to_string());
            circles.push(circle.join(" → "));
            return;
        }
        if !done.insert(module.to_string()) {
            return;
        }
        stack.push(module.to_string());
        // A file that extends its folder module's types (`impl Proxy` in proxy/checks.rs names
        // `super::Proxy`) is part of that module: an edge to an ancestor closes no circle.
        let into_ancestor = |next: &String| module.starts_with(&format!("{next}::"));
        for next in edges.get(module).into_iter().flatten() {
            if into_ancestor(next) {
                continue;
            }
            visit(next, edges, stack, done, circles);
        }
        stack.pop();
    }
    let mut circles = Vec::new();
    let mut done = BTreeSet::new();
    for module in edges.keys() {
        visit(module, &edges, &mut Vec::new(), &mut done, &mut circles);
    }
    assert!(
        circles.is_empty(),
        "modules that import each other in a circle:\n  {}",
        circles.join("\n  ")
    );
}

#[test]
fn the_core_does_no_io() {
    let mut found = Vec::new();
    for (module, text) in modules() {
        if !PURE
            .iter()
            .any(|pure| module == *pure || module.starts_with(&format!("{pure}::")))
        {
            continue;
        }
        let code = code(&text);
        for impure in IMPURE {
            if code.contains(impure) {
                found.push(format!("{module} uses {impure}"));
            }
        }
    }
    assert!(
        found.is_empty(),
        "the pure core does I/O or reads a clock:\n  {}",
        found.join("\n  ")
    );
}

/// The checker itself: a path names the module it starts with, an alias names none.
#[test]
fn paths_resolve_to_the_longest_module() {
    let known: BTreeSet<&str> = ["proxy", "proxy::limits", "verify::signature"].into();
    let table = [
        (
            "use crate::proxy::limits::{BodyBudget, Reservation};",
            Some("proxy::limits"),
        ),
        ("use crate::proxy::{Peer, Proxy};", Some("proxy")),
        (
            "crate::verify::signature::hex_string(&d)",
            Some("verify::signature"),
        ),
        ("use crate::signature::Body;", None),
    ];
    for (line, expected) in table {
        let paths = crate_paths(line);
        assert_eq!(paths.len(), 1, "{line}");
        assert_eq!(resolve(&paths[0], &known).as_deref(), expected, "{line}");
    }
    assert!(crate_paths(&code("// crate::x")).is_empty());
    let relative = relative_paths(
        "proxy::checks",
        "use super::Proxy;\nuse self::inner::f;\n#[cfg(test)]\nmod tests { use super::*; }",
    );
    let expected: Vec<Vec<String>> = [&["proxy", "checks", "inner", "f"][..], &["proxy"][..]]
        .iter()
        .map(|path| path.iter().map(|s| s.to_string()).collect())
        .collect();
    assert_eq!(relative, expected);
}
