//! The documentation's examples, run. The Python and shell signers of `docs/examples/` against
//! `lfguard verify`; the worked example of docs/verification.md; every `sh` block of the pages
//! that have runnable ones, as a reader would type it (on free ports instead of the shipped ones);
//! the TOML examples of docs/configuration.md through `check-config`; and the reference pages
//! against the code: every configuration key, error code and metric documented, every link
//! pointing at a file and heading that exist, every included file identical to its copy.
//!
//! A `sh` block runs as one `sh -e` script, in a temporary directory shared by the blocks of a page.
//! `cargo run --release --` (or `lfguard` at the start of a line) becomes the binary under test,
//! `config/lfguard.toml` a copy of it on the free ports, and `docs/examples/` the repository's
//! directory. An HTML comment right above a block says how to run it, items separated by `;`:
//! - `<!-- test: background 8080 9090 -->` starts it in the background and waits until it
//!   listens on those (shipped) ports; it is stopped when the page is done;
//! - `exit N` (default 0); `stdout TEXT` and `stderr TEXT`: the output contains TEXT (for a
//!   background block, checked when the page is done);
//! - `<!-- include: PATH -->`: the block is a copy of that file, not a command.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lfguard::error::Rejection;
use lfguard::signature::{self, Body, NullValues};
use support::*;

/// The shipped configuration's ports: proxy, admin, backend.
const SHIPPED_PORTS: [u16; 3] = [8080, 9090, 8081];
/// The development partner and secret of `config/lfguard.toml`.
const DEV_PARTNER: &str = "P123456";
const DEV_SECRET: &str = "dev-only-change-me";
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_file(relative)).unwrap_or_else(|err| panic!("{relative}: {err}"))
}

// ---------------------------------------------------------------- Markdown

/// A fenced code block of a Markdown page.
#[derive(Debug, Clone)]
struct Block {
    lang: String,
    text: String,
    /// The HTML comment right above the block (`test: …` or `include: …`), if any.
    marker: Option<String>,
    /// Line of the opening fence, from 1.
    line: usize,
}

fn blocks(page: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = page.lines().enumerate();
    let mut marker = None;
    while let Some((n, line)) = lines.next() {
        let trimmed = line.trim_start();
        if let Some(lang) = trimmed.strip_prefix("```") {
            // A block in a list item is indented; its lines lose that indentation.
            let indent = line.len() - trimmed.len();
            let mut text = String::new();
            for (_, line) in lines.by_ref() {
                if line.trim() == "```" {
                    break;
                }
                text.push_str(line.get(indent..).unwrap_or_else(|| line.trim_start()));
                text.push('\n');
            }
            out.push(Block {
                lang: lang.trim().to_string(),
                text,
                marker: marker.take(),
                line: n + 1,
            });
        } else if let Some(comment) = trimmed
            .strip_prefix("<!--")
            .and_then(|rest| rest.trim_end().strip_suffix("-->"))
        {
            marker = Some(comment.trim().to_string());
        } else if !trimmed.is_empty() {
            marker = None;
        }
    }
    out
}

/// How to run a block, from its `<!-- test: … -->` comment.
#[derive(Debug, Default)]
struct Expect {
    background: Option<Vec<u16>>,
    exit: i32,
    stdout: Vec<String>,
    stderr: Vec<String>,
}

impl Block {
    fn included_file(&self) -> Option<&str> {
        self.marker
            .as_deref()?
            .strip_prefix("include:")
            .map(str::trim)
    }

    fn expect(&self) -> Expect {
        let mut expect = Expect::default();
        let Some(spec) = self.marker.as_deref().and_then(|m| m.strip_prefix("test:")) else {
            return expect;
        };
        for item in spec.split(';').map(str::trim).filter(|i| !i.is_empty()) {
            let (word, rest) = item.split_once(' ').unwrap_or((item, ""));
            match word {
                "background" => {
                    expect.background = Some(
                        rest.split_whitespace()
                            .map(|port| port.parse().expect("a port"))
                            .collect(),
                    )
                }
                "exit" => expect.exit = rest.trim().parse().expect("an exit status"),
                "stdout" => expect.stdout.push(rest.trim().to_string()),
                "stderr" => expect.stderr.push(rest.trim().to_string()),
                other => panic!("line {}: unknown test marker item {other:?}", self.line),
            }
        }
        expect
    }

    /// Whether it runs `lfguard demo` or `lfguard echo`.
    fn needs_demo_or_echo(&self) -> bool {
        self.text.contains("-- demo") || self.text.contains("-- echo")
    }
}

// ---------------------------------------------------------------- running a page

/// A block running in the background, stopped (with its process group) on drop.
struct Background {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    expect: Expect,
    at: String,
}

impl Background {
    fn output(&self) -> (String, String) {
        (
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        )
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // The whole group: `sh` and what it started.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// Runs the `sh` blocks of pages as a reader would, on free ports instead of the shipped ones.
struct Session {
    dir: tempfile::TempDir,
    /// Each shipped port and the free one used instead.
    ports: Vec<(u16, u16)>,
    config: PathBuf,
    background: Vec<Background>,
    runs: usize,
}

impl Session {
    fn new() -> Session {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = SHIPPED_PORTS.iter().map(|&p| (p, free_port())).collect();
        let mut config = read("config/lfguard.toml");
        for (shipped, port) in &ports {
            let from = format!(":{shipped}\"");
            assert!(
                config.contains(&from),
                "config/lfguard.toml uses port {shipped}"
            );
            config = config.replace(&from, &format!(":{port}\""));
        }
        let config_path = dir.path().join("lfguard.toml");
        std::fs::write(&config_path, config).unwrap();
        Session {
            dir,
            ports,
            config: config_path,
            background: Vec::new(),
            runs: 0,
        }
    }

    /// The free port used for a shipped one.
    fn port(&self, shipped: u16) -> u16 {
        self.ports.iter().find(|(s, _)| *s == shipped).unwrap().1
    }

    /// A recording backend where the shipped configuration expects the backend.
    fn backend(&self) -> Backend {
        Backend::start_on(format!("127.0.0.1:{}", self.port(8081)).parse().unwrap())
    }

    /// The script a reader types, for this machine.
    fn localise(&self, text: &str) -> String {
        let binary = format!("'{}'", binary());
        let examples = format!("{}/", repo_file("docs/examples").display());
        let mut script: String = text
            .lines()
            .map(|line| match line.strip_prefix("lfguard ") {
                Some(rest) => format!("{binary} {rest}\n"),
                None => format!("{line}\n"),
            })
            .collect();
        script = script
            .replace("cargo run --release --", &binary)
            .replace("config/lfguard.toml", &self.config.display().to_string())
            .replace("docs/examples/", &examples);
        for (shipped, port) in &self.ports {
            script = script.replace(&format!(":{shipped}"), &format!(":{port}"));
        }
        script
    }

    fn command(&self, script: &str) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-ec")
            .arg(script)
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        for (key, _) in std::env::vars() {
            if key.starts_with("LFGUARD_") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command
    }

    /// Starts `lfguard serve` on the shipped configuration, as a reader's other terminal would.
    fn serve(&mut self) {
        let block = Block {
            lang: "sh".into(),
            text: "cargo run --release -- serve --config config/lfguard.toml\n".into(),
            marker: Some("test: background 8080 9090".into()),
            line: 0,
        };
        self.run("(the test's lfguard serve)", &block);
    }

    fn run(&mut self, page: &str, block: &Block) {
        let expect = block.expect();
        let script = self.localise(&block.text);
        let at = format!("{page}:{}", block.line);
        self.runs += 1;
        let stdout = self.dir.path().join(format!("stdout.{}", self.runs));
        let stderr = self.dir.path().join(format!("stderr.{}", self.runs));
        let mut command = self.command(&script);
        command
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        if let Some(ports) = &expect.background {
            command.process_group(0);
            let ports: Vec<u16> = ports.iter().map(|&p| self.port(p)).collect();
            let mut background = Background {
                child: command.spawn().unwrap(),
                stdout,
                stderr,
                expect,
                at,
            };
            let deadline = Instant::now() + START_TIMEOUT;
            for port in ports {
                while TcpStream::connect(("127.0.0.1", port)).is_err() {
                    let exited = background.child.try_wait().unwrap();
                    if exited.is_some() || Instant::now() > deadline {
                        let (out, err) = background.output();
                        panic!(
                            "{}: does not listen on {port} ({exited:?})\n{script}\nstdout:\n{out}\nstderr:\n{err}",
                            background.at
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            self.background.push(background);
            return;
        }
        let mut child = command.spawn().unwrap();
        let deadline = Instant::now() + START_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{at}: still running after {START_TIMEOUT:?}\n{script}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = std::fs::read_to_string(&stdout).unwrap();
        let err = std::fs::read_to_string(&stderr).unwrap();
        let report = format!("{at}\n{script}\nstdout:\n{out}\nstderr:\n{err}");
        assert_eq!(status.code(), Some(expect.exit), "exit status: {report}");
        for text in &expect.stdout {
            assert!(
                out.contains(text.as_str()),
                "stdout lacks {text:?}: {report}"
            );
        }
        for text in &expect.stderr {
            assert!(
                err.contains(text.as_str()),
                "stderr lacks {text:?}: {report}"
            );
        }
    }

    /// Runs the page's `sh` blocks that `filter` selects, in order, then checks the output of
    /// those left running in the background and stops them.
    fn run_page(&mut self, page: &str, filter: impl Fn(&Block) -> bool) -> usize {
        let text = read(page);
        let selected: Vec<Block> = blocks(&text)
            .into_iter()
            .filter(|b| b.lang == "sh" && b.included_file().is_none() && filter(b))
            .collect();
        for block in &selected {
            self.run(page, block);
        }
        for background in self.background.drain(..) {
            let (out, err) = background.output();
            for text in &background.expect.stdout {
                assert!(
                    out.contains(text.as_str()),
                    "{}: stdout lacks {text:?}\nstdout:\n{out}\nstderr:\n{err}",
                    background.at
                );
            }
        }
        selected.len()
    }
}

// ---------------------------------------------------------------- the signers

/// Bodies the signers must sign as lfguard does: numbers as written, nested values as written,
/// null, booleans, raw and escaped Unicode, byte-order sorting, odd whitespace.
const SIGNER_BODIES: &[&str] = &[
    r#"{"partner_code":"P123456","sim_id":"89860220190000000001","imsi":"4230001234567","text_message":"device status: 1234","received_at":"2022-01-19T201101"}"#,
    r#"{"partner_code":"P1","amount":1.50,"big":1e3,"neg":-0.0,"small":2.5E-3,"count":42,"ok":true,"off":false,"none":null,"empty":""}"#,
    r#"{"partner_code":"P1","data":{ "b" : [1.50, 2e-3, "x y", {"c" : null}], "a" : "\u53d1 \" \\ }" },"list":[ ],"received_at":1700000000000}"#,
    r#"{"partner_code":"P1","text_message":"发送 ✓ émoji 😀 Ωmega","received_at":"2022-01-19 20:11:01"}"#,
    r#"{"b":"1","a.b":"2","a":"3","A":"4","a_b":"5","a-b":"6","partner_code":"P1"}"#,
    "\t{\r\n  \"partner_code\" :\t\"P1\" ,\r\n  \"nested\" : {\r\n    \"k\" : [ 1 , 2 ]\r\n  }\r\n}\r\n",
    "{}",
];

/// Bodies only the Python signer takes: escapes in top-level keys and strings.
const ESCAPED_BODIES: &[&str] = &[
    r#"{"partner_code":"P1","text_message":"\u53d1\u9001 \"quoted\" \\ \/ \t \ud83d\ude00"}"#,
    r#"{"partner\u005fcode":"P1","note":"line\nbreak"}"#,
];

/// Runs a signer on a body (standard input); `(exit status, stdout, stderr)`.
fn run_signer(program: &[&str], body: &str, raw: bool) -> (i32, String, String) {
    let mut command = Command::new(program[0]);
    command.args(&program[1..]).arg(DEV_SECRET);
    if raw {
        command.arg("--raw");
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), body.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap().trim().to_string(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The signer signs `body` as `lfguard sign` does, and `lfguard verify` accepts both encodings.
fn assert_signs_like_lfguard(program: &[&str], body: &str) {
    let (code, expected, err) = run_cli(
        &["sign", "--secret", DEV_SECRET, "-"],
        Some(body.as_bytes()),
        &[],
    );
    assert_eq!(code, 0, "lfguard sign: {err}");
    for raw in [false, true] {
        let (code, signed, err) = run_signer(program, body, raw);
        assert_eq!(code, 0, "{program:?} on {body}: {err}");
        if !raw {
            assert_eq!(signed, expected.trim(), "{program:?} on {body}");
        }
        let (code, out, _) = run_cli(
            &[
                "verify",
                "--secret",
                DEV_SECRET,
                "--signature",
                &signed,
                "-",
            ],
            Some(body.as_bytes()),
            &[],
        );
        assert_eq!(
            code, 0,
            "lfguard verify refuses {program:?}'s {signed} for {body}: {out}"
        );
        let encoding = if raw { "raw" } else { "hex" };
        assert!(
            out.contains(&format!("valid ({encoding} digest encoding)")),
            "{out}"
        );
    }
}

#[test]
fn the_python_signer_agrees_with_lfguard_verify() {
    if !have("python3", "the Python signer test") {
        return;
    }
    let signer = repo_file("docs/examples/sign.py");
    let program = ["python3", signer.to_str().unwrap()];
    for body in SIGNER_BODIES.iter().chain(ESCAPED_BODIES) {
        assert_signs_like_lfguard(&program, body);
    }
}

#[test]
fn the_shell_signer_agrees_with_lfguard_verify() {
    if !have("openssl", "the shell signer test") {
        return;
    }
    let signer = repo_file("docs/examples/sign.sh");
    let program = ["sh", signer.to_str().unwrap()];
    for body in SIGNER_BODIES {
        assert_signs_like_lfguard(&program, body);
    }
    // What it cannot decode, it refuses rather than signing it wrongly.
    for body in ESCAPED_BODIES {
        let (code, out, err) = run_signer(&program, body, false);
        assert_eq!((code, out.as_str()), (2, ""), "{body}: {err}");
        assert!(err.contains("sign.py"), "{err}");
    }
}

#[test]
fn the_worked_example_and_its_curl_signature_are_right() {
    let page = read("docs/verification.md");
    let field = |label: &str| -> String {
        page.lines()
            .find_map(|line| line.strip_prefix(label))
            .unwrap_or_else(|| panic!("docs/verification.md has no `{label}` line"))
            .trim()
            .to_string()
    };
    let (string_to_sign, md5_hex, header) = (
        field("string to sign"),
        field("md5 (hex)"),
        field("x-lf-md5 "),
    );
    let found = blocks(&page);
    let body = found
        .iter()
        .find_map(|b| b.text.strip_prefix("cat > body.json <<'EOF'\n"))
        .and_then(|rest| rest.strip_suffix("EOF\n"))
        .expect("the worked example writes body.json")
        .trim_end();
    let curl = found
        .iter()
        .find(|b| b.text.starts_with("curl") && b.text.contains("@body.json"))
        .expect("the worked example's curl");
    assert!(
        curl.text.contains(&format!("'x-lf-md5: {header}'")),
        "{}",
        curl.text
    );

    let canonical = Body::from_json(body.as_bytes())
        .unwrap()
        .canonical(NullValues::Empty);
    assert_eq!(
        string_to_sign,
        signature::string_to_sign(&canonical, DEV_SECRET)
    );
    let digest = signature::Prepared::new(&canonical).digest(DEV_SECRET);
    assert_eq!(md5_hex, signature::hex_string(&digest));
    assert_eq!(
        header,
        signature::sign(&canonical, DEV_SECRET, lfguard::signature::Encoding::Hex)
    );
    let (code, signed, _) = run_cli(&["sign", "--secret", DEV_SECRET, body], None, &[]);
    assert_eq!((code, signed.trim()), (0, header.as_str()));
    assert!(body.contains(&format!("\"partner_code\":\"{DEV_PARTNER}\"")));
}

// ---------------------------------------------------------------- pages run as written

#[test]
fn getting_started_runs_with_a_stand_in_for_echo() {
    let mut session = Session::new();
    let backend = session.backend();
    let ran = session.run_page("docs/getting-started.md", |block| {
        !block.needs_demo_or_echo()
    });
    assert!(ran >= 5, "{ran} blocks");
    // The sample callback and the first copy of the replayed one reached the backend.
    let received = backend.requests();
    assert_eq!(received.len(), 2, "{received:?}");
    assert!(
        received
            .iter()
            .all(|r| r.header("x-lfguard-verified") == Some("true"))
    );
}

#[test]
fn getting_started_runs_as_written() {
    let ran = Session::new().run_page("docs/getting-started.md", |_| true);
    assert!(ran >= 7, "{ran} blocks");
}

#[test]
fn the_readme_commands_are_those_getting_started_runs() {
    let started: BTreeSet<String> = blocks(&read("docs/getting-started.md"))
        .iter()
        .filter(|b| b.lang == "sh")
        .flat_map(|b| b.text.lines().map(str::to_string).collect::<Vec<_>>())
        .collect();
    let mut commands = 0;
    for block in blocks(&read("README.md")).iter().filter(|b| b.lang == "sh") {
        for line in block.text.lines().filter(|l| !l.trim().is_empty()) {
            // scripts/test is what CI runs (.ci/run).
            if line != "scripts/test" {
                assert!(
                    started.contains(line),
                    "README runs `{line}`, getting-started does not"
                );
                commands += 1;
            }
        }
    }
    assert!(commands >= 4, "{commands} commands in README.md");
}

#[test]
fn verification_examples_run() {
    if !have("python3", "the verification examples")
        || !have("openssl", "the verification examples")
    {
        return;
    }
    let mut session = Session::new();
    let backend = session.backend();
    session.serve();
    let ran = session.run_page("docs/verification.md", |_| true);
    assert!(ran >= 6, "{ran} blocks");
    assert_eq!(
        backend.count(),
        1,
        "only the freshly signed callback is forwarded"
    );
}

#[test]
fn configuration_examples_run() {
    let ran = Session::new().run_page("docs/configuration.md", |_| true);
    assert!(ran >= 2, "{ran} blocks");
}

#[test]
fn command_line_examples_run() {
    let mut session = Session::new();
    let _backend = session.backend();
    session.serve();
    let ran = session.run_page("docs/cli.md", |block| !block.needs_demo_or_echo());
    assert!(ran >= 3, "{ran} blocks");
}

#[test]
fn tls_examples_run_up_to_the_steps_for_a_real_host() {
    if !have("openssl", "the TLS examples") || !have("curl", "the TLS examples") {
        return;
    }
    // What follows "Try it on one machine" installs on a real host (certbot, systemctl): the hook
    // is run by tests/tls.rs, the drop-in checked by systemd-analyze, the TOML by check-config.
    let page = read("docs/tls.md");
    let host_steps = page
        .lines()
        .position(|line| line.starts_with("## lfguard on :443"))
        .expect("docs/tls.md has the :443 section")
        + 1;
    let mut session = Session::new();
    let backend = session.backend();
    let ran = session.run_page("docs/tls.md", |block| block.line < host_steps);
    assert!(ran >= 6, "{ran} blocks");
    let received = backend.requests();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].header("x-lfguard-verified"), Some("true"));
    assert_eq!(received[0].header("x-forwarded-proto"), Some("https"));
}

#[test]
fn delivery_examples_run() {
    let ran = Session::new().run_page("docs/delivery.md", |_| true);
    assert!(ran >= 7, "{ran} blocks");
}

#[test]
fn operations_examples_run() {
    let ran = Session::new().run_page("docs/operations.md", |_| true);
    assert!(ran >= 1, "{ran} blocks");
}

// ---------------------------------------------------------------- configuration

/// Makes a documented configuration checkable here: its secret files and directories become
/// temporary ones, its secret variables are set, and a partner is added when it has none.
/// Returns the file and the environment to check it with.
fn checkable(example: &str, dir: &Path) -> (PathBuf, Vec<(String, String)>) {
    let mut table: toml::Table = example.parse().unwrap_or_else(|e| panic!("{e}\n{example}"));
    let mut env = Vec::new();
    if table.contains_key("partners_dir") {
        let partners = dir.join("partners");
        std::fs::create_dir_all(&partners).unwrap();
        std::fs::write(partners.join(DEV_PARTNER), "a-secret\n").unwrap();
        table.insert("partners_dir".into(), partners.display().to_string().into());
    }
    certificates_for(&mut table, dir);
    let mut files = 0;
    if let Some(toml::Value::Table(partners)) = table.get_mut("partners") {
        for (code, partner) in partners.iter_mut() {
            let partner = partner.as_table_mut().unwrap();
            if let Some(toml::Value::Array(paths)) = partner.get_mut("secret_files") {
                for path in paths.iter_mut() {
                    files += 1;
                    let file = dir.join(format!("secret{files}"));
                    std::fs::write(&file, format!("secret-of-{code}\n")).unwrap();
                    *path = file.display().to_string().into();
                }
            }
            if let Some(toml::Value::Array(names)) = partner.get("secret_env") {
                for name in names {
                    env.push((
                        name.as_str().unwrap().to_string(),
                        format!("secret-of-{code}"),
                    ));
                }
            }
        }
    } else if !table.contains_key("partners_dir") {
        let mut partner = toml::Table::new();
        partner.insert("secrets".into(), vec![toml::Value::from(DEV_SECRET)].into());
        let mut partners = toml::Table::new();
        partners.insert(DEV_PARTNER.into(), partner.into());
        table.insert("partners".into(), partners.into());
    }
    let path = dir.join("example.toml");
    std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
    (path, env)
}

/// Certificate files made here for the ones a documented configuration names (`[server.tls]`,
/// the upstream's), so that check-config can load them.
fn certificates_for(table: &mut toml::Table, dir: &Path) {
    use support::tls::{Ca, write_pem};
    let ca = Ca::new("docs example CA");
    let (server_cert, server_key) = ca.server().write(dir, "server");
    let (client_cert, client_key) = ca.client("lfguard").write(dir, "client");
    let ca_file = write_pem(dir, "ca.pem", &ca.pem());
    let made = [
        ("server", "tls", "cert_file", &server_cert),
        ("server", "tls", "key_file", &server_key),
        ("server", "tls", "client_ca_file", &ca_file),
        ("upstream", "", "ca_file", &ca_file),
        ("upstream", "", "client_cert_file", &client_cert),
        ("upstream", "", "client_key_file", &client_key),
    ];
    for (section, sub, key, path) in made {
        let Some(toml::Value::Table(mut at)) = table.get(section).cloned() else {
            continue;
        };
        let target = if sub.is_empty() {
            Some(&mut at)
        } else {
            match at.get_mut(sub) {
                Some(toml::Value::Table(inner)) => Some(inner),
                _ => None,
            }
        };
        if let Some(target) = target
            && target.contains_key(key)
        {
            target.insert(key.into(), path.display().to_string().into());
            table.insert(section.into(), at.into());
        }
    }
}

/// `check-config` on a documented configuration: its effective configuration.
fn check_example(example: &str) -> toml::Table {
    let dir = tempfile::tempdir().unwrap();
    let (path, env) = checkable(example, dir.path());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_cli(
        &["check-config", "--config", path.to_str().unwrap()],
        None,
        &env,
    );
    assert_eq!(code, 0, "check-config refuses\n{example}\n{err}");
    out.parse()
        .unwrap_or_else(|e| panic!("check-config prints TOML: {e}\n{out}"))
}

#[test]
fn every_toml_example_passes_check_config() {
    let mut checked = 0;
    for page in pages() {
        for block in blocks(&read(&page)).iter().filter(|b| b.lang == "toml") {
            let effective = std::panic::catch_unwind(|| check_example(&block.text));
            assert!(effective.is_ok(), "{page}:{}", block.line);
            checked += 1;
        }
    }
    assert!(checked >= 7, "{checked} TOML examples");
}

#[test]
fn the_systemd_unit_is_valid() {
    if !have("systemd-analyze", "the systemd unit test") {
        return;
    }
    // As installed: the binary at the path the unit names.
    let dir = tempfile::tempdir().unwrap();
    let unit = read("config/lfguard.service").replace("/usr/local/bin/lfguard", binary());
    let path = write_file(dir.path(), "lfguard.service", &unit);
    let verify = || {
        let output = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success() && err.trim().is_empty(),
            "systemd-analyze verify: {err}"
        );
    };
    verify();
    // With the drop-in of docs/tls.md, which systemd-analyze reads from beside the unit.
    let drop_ins = dir.path().join("lfguard.service.d");
    std::fs::create_dir(&drop_ins).unwrap();
    std::fs::write(drop_ins.join("tls.conf"), read("config/lfguard-tls.conf")).unwrap();
    verify();
    std::fs::write(drop_ins.join("broken.conf"), "[Service]\nNoSuchKey=1\n").unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("NoSuchKey"),
        "systemd-analyze reads the drop-ins beside the unit"
    );
}

/// Captures the field names a derived `Deserialize` asks for, whatever its serde attributes.
struct FieldNames;

#[derive(Debug)]
struct Fields(Vec<&'static str>);

impl std::fmt::Display for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::error::Error for Fields {}

impl serde::de::Error for Fields {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Fields(Vec::new())
    }
}

impl<'de> serde::Deserializer<'de> for FieldNames {
    type Error = Fields;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Fields> {
        Err(Fields(Vec::new()))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Fields> {
        Err(Fields(fields.to_vec()))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

fn fields_of<T: for<'de> serde::Deserialize<'de>>() -> Vec<&'static str> {
    match T::deserialize(FieldNames) {
        Err(Fields(fields)) if !fields.is_empty() => fields,
        _ => panic!("{} is not a struct", std::any::type_name::<T>()),
    }
}

/// Every key lfguard accepts, as docs/configuration.md names it.
fn every_key() -> BTreeSet<String> {
    use lfguard::config::*;
    let sections: BTreeMap<&str, Vec<&str>> = BTreeMap::from([
        ("server", fields_of::<ServerConfig>()),
        ("upstream", fields_of::<UpstreamConfig>()),
        ("verify", fields_of::<VerifyConfig>()),
        ("replay", fields_of::<ReplayConfig>()),
        ("delivery", fields_of::<DeliveryConfig>()),
        ("log", fields_of::<LogConfig>()),
        ("routes[]", fields_of::<RouteConfig>()),
        ("schemas.NAME", fields_of::<lfguard::schema::Schema>()),
        ("partners.CODE", fields_of::<PartnerConfig>()),
    ]);
    let mut keys = BTreeSet::new();
    for top in fields_of::<Config>() {
        let section = match top {
            "routes" => "routes[]",
            "schemas" => "schemas.NAME",
            "partners" => "partners.CODE",
            other => other,
        };
        match sections.get(section) {
            Some(fields) => keys.extend(fields.iter().map(|f| format!("{section}.{f}"))),
            None => {
                keys.insert(top.to_string());
            }
        }
    }
    // `[server.tls]` is a table of its own.
    keys.remove("server.tls");
    for field in fields_of::<ListenerTlsConfig>() {
        keys.insert(format!("server.tls.{field}"));
    }
    // A schema's members are tables of their own.
    keys.remove("schemas.NAME.members");
    for field in fields_of::<lfguard::schema::MemberRule>() {
        keys.insert(format!("schemas.NAME.members.KEY.{field}"));
    }
    keys
}

/// `routes.0.verify` → `routes[].verify`, `partners.P1.mode` → `partners.CODE.mode`, …
fn documented_name(path: &[String]) -> String {
    let mut name: Vec<String> = path.to_vec();
    match name[0].as_str() {
        "routes" if name.len() > 1 => {
            name.remove(1);
            name[0] = "routes[]".into();
        }
        "partners" if name.len() > 1 => name[1] = "CODE".into(),
        "schemas" if name.len() > 1 => {
            name[1] = "NAME".into();
            if name.len() > 3 && name[2] == "members" {
                name[3] = "KEY".into();
            }
        }
        _ => {}
    }
    name.join(".")
}

fn leaf_keys(value: &toml::Value, path: &mut Vec<String>, out: &mut BTreeSet<String>) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                path.push(key.clone());
                leaf_keys(value, path, out);
                path.pop();
            }
        }
        // `routes = []`: no route, so no route keys.
        toml::Value::Array(items) if items.is_empty() && path.len() == 1 => {}
        toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
            for (i, item) in items.iter().enumerate() {
                path.push(i.to_string());
                leaf_keys(item, path, out);
                path.pop();
            }
        }
        _ => {
            out.insert(documented_name(path));
        }
    }
}

#[test]
fn every_configuration_key_is_documented_with_its_environment_variable() {
    let page = read("docs/configuration.md");
    let keys = every_key();
    // The derivation itself: check-config's effective configuration of the documented examples
    // (which have routes, schemas and partners) names no key the types do not have.
    let mut effective = BTreeSet::new();
    for block in blocks(&page).iter().filter(|b| b.lang == "toml") {
        leaf_keys(
            &check_example(&block.text).into(),
            &mut Vec::new(),
            &mut effective,
        );
    }
    let unknown: Vec<_> = effective.difference(&keys).collect();
    assert!(
        unknown.is_empty(),
        "keys not derived from the types: {unknown:?}"
    );

    let mut missing = Vec::new();
    for key in &keys {
        if !page.contains(&format!("| `{key}` |")) {
            missing.push(key.clone());
        }
        // Sections and top-level keys can be set from the environment; routes and schemas not.
        if !key.starts_with("routes[]") && !key.starts_with("schemas.") {
            let variable = match key.split_once('.') {
                Some((section, rest)) => format!("LFGUARD_{section}__{}", rest.replace('.', "__")),
                None => format!("LFGUARD_{key}"),
            }
            .to_uppercase();
            if !page.contains(&format!("`{variable}`")) {
                missing.push(variable);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document {missing:?}"
    );
}

#[test]
fn the_documented_defaults_are_the_defaults() {
    let page = read("docs/configuration.md");
    let defaults: toml::Value = toml::Value::try_from(lfguard::config::Config::default()).unwrap();
    let mut checked = 0;
    for line in page.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `section.key` | `default` | … |
        let [_, key, default, ..] = cells[..] else {
            continue;
        };
        let (Some(key), Some(default)) = (
            key.strip_prefix('`').and_then(|k| k.strip_suffix('`')),
            default.strip_prefix('`').and_then(|d| d.strip_suffix('`')),
        ) else {
            continue;
        };
        if key.contains("[]") || key.contains("NAME") || key.contains("CODE") {
            continue;
        }
        let value = key
            .split('.')
            .try_fold(&defaults, |value, part| value.get(part))
            .unwrap_or_else(|| panic!("docs/configuration.md: {key} has no default in Config"));
        let shown = match value {
            toml::Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        assert_eq!(
            normalised_duration(&shown),
            normalised_duration(default),
            "docs/configuration.md: default of {key}"
        );
        checked += 1;
    }
    assert!(checked >= 30, "{checked} defaults checked");
}

/// Durations compared by their length, whatever the spelling (`25h`, `1day 1h`).
fn normalised_duration(text: &str) -> String {
    match humantime::parse_duration(text) {
        Ok(duration) if text.chars().any(|c| c.is_ascii_alphabetic()) => {
            format!("{}s", duration.as_secs_f64())
        }
        _ => text.replace(' ', ""),
    }
}

// ---------------------------------------------------------------- reference pages and the code

#[test]
fn every_error_code_is_in_the_error_table() {
    let page = read("docs/verification.md");
    let all = [
        Rejection::MalformedRequest(String::new()),
        Rejection::MalformedBody(String::new()),
        Rejection::UnreadableBody(String::new()),
        Rejection::DuplicateKey(String::new()),
        Rejection::AmbiguousBody(String::new()),
        Rejection::MissingTimestamp(String::new()),
        Rejection::MissingPartner(String::new()),
        Rejection::MissingDeliveryId(String::new()),
        Rejection::MissingSignature,
        Rejection::BadSignature(String::new()),
        Rejection::UnknownPartner,
        Rejection::Stale(String::new()),
        Rejection::MethodNotAllowed,
        Rejection::RequestTimeout,
        Rejection::Replay,
        Rejection::InFlight {
            retry_after_secs: 1,
        },
        Rejection::BodyTooLarge { limit: 1 },
        Rejection::UnsupportedMediaType,
        Rejection::UpstreamUnavailable(String::new()),
        Rejection::ReplayStoreUnavailable(String::new()),
        Rejection::SpoolUnavailable(String::new()),
        Rejection::SpoolFull,
        Rejection::Overloaded,
        Rejection::ShuttingDown,
        Rejection::UpstreamTimeout,
    ];
    for rejection in &all {
        // A new variant fails to compile here until it is listed above.
        match rejection {
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
            | Rejection::MethodNotAllowed
            | Rejection::RequestTimeout
            | Rejection::Replay
            | Rejection::InFlight { .. }
            | Rejection::BodyTooLarge { .. }
            | Rejection::UnsupportedMediaType
            | Rejection::UpstreamUnavailable(_)
            | Rejection::ReplayStoreUnavailable(_)
            | Rejection::SpoolUnavailable(_)
            | Rejection::SpoolFull
            | Rejection::Overloaded
            | Rejection::ShuttingDown
            | Rejection::UpstreamTimeout => {}
        }
        let row = format!(
            "| {} | `{}` |",
            rejection.status().as_u16(),
            rejection.code()
        );
        assert!(page.contains(&row), "docs/verification.md has no row {row}");
    }
}

/// The metric names lfguard registers (`src/telemetry/metrics.rs`) and those its `/metrics`
/// shows (a labelled series only once counted), a histogram's series under its base name.
fn exposed_metrics() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = read("src/telemetry/metrics.rs")
        .split('"')
        .filter(|word| word.starts_with("lfguard_") && !word.contains(' '))
        .map(str::to_string)
        .collect();
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "");
    let metrics = admin_get(lfguard.admin, "/metrics").text();
    names.extend(
        metrics
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_string),
    );
    names
}

#[test]
fn every_metric_is_documented_and_every_alert_names_real_ones() {
    let exposed = exposed_metrics();
    let page = read("docs/operations.md");
    for name in exposed.iter().filter(|n| n.starts_with("lfguard_")) {
        assert!(
            page.contains(&format!("`{name}`")),
            "docs/operations.md does not document {name}"
        );
    }
    let alerts = read("docs/examples/alerts.yaml");
    for text in [page.as_str(), alerts.as_str()] {
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("lfguard_") && word != "lfguard_seq" {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| word.strip_suffix(suffix))
                    .filter(|base| exposed.contains(*base))
                    .unwrap_or(word);
                assert!(
                    exposed.contains(base),
                    "{word} is not a metric lfguard exposes"
                );
            }
        }
    }
}

#[test]
fn the_alert_rules_are_valid_prometheus_rules() {
    if !have("promtool", "the alert rules test") {
        return;
    }
    let output = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo_file("docs/examples/alerts.yaml"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---------------------------------------------------------------- the pages themselves

/// README.md and every page of docs/.
fn pages() -> Vec<String> {
    let mut pages = vec!["README.md".to_string()];
    for entry in std::fs::read_dir(repo_file("docs")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".md") {
            pages.push(format!("docs/{name}"));
        }
    }
    pages.sort();
    pages
}

#[test]
fn included_files_are_copied_exactly() {
    let mut included = 0;
    for page in pages() {
        for block in blocks(&read(&page)) {
            if let Some(file) = block.included_file() {
                assert_eq!(
                    block.text,
                    read(file),
                    "{page}:{} is not {file} as it is",
                    block.line
                );
                included += 1;
            }
        }
    }
    assert!(included >= 3, "{included} included files");
}

/// A page without its code blocks.
fn prose(page: &str) -> String {
    let mut in_code = false;
    let mut out = String::new();
    for line in page.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// GitHub's anchor of a heading: lowercase, punctuation dropped, spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(page: &str) -> BTreeSet<String> {
    prose(page)
        .lines()
        .filter(|line| line.starts_with('#'))
        .map(|line| anchor(line.trim_start_matches('#')))
        .collect()
}

#[test]
fn links_point_at_files_and_headings_that_exist() {
    let mut links = 0;
    for page in pages() {
        let text = prose(&read(&page));
        let base = Path::new(&page).parent().unwrap();
        for target in text
            .split("](")
            .skip(1)
            .filter_map(|rest| rest.split(')').next())
        {
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (file, fragment) = target.split_once('#').unwrap_or((target, ""));
            let linked = if file.is_empty() {
                page.clone()
            } else {
                base.join(file).to_str().unwrap().to_string()
            };
            assert!(
                repo_file(&linked).exists(),
                "{page}: link to {target}: no such file"
            );
            if !fragment.is_empty() {
                assert!(
                    anchors(&read(&linked)).contains(fragment),
                    "{page}: link to {target}: no such heading"
                );
            }
            links += 1;
        }
    }
    assert!(links >= 30, "{links} links");
}

#[test]
fn no_file_cites_the_internal_specification() {
    // Built from parts so that this file does not name it either.
    let forbidden = [format!("SPEC{}", ".md"), format!("..{}shared/", '/')];
    let mut stack = vec![repo_file("")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap();
            if name == "target" || name.starts_with('.') && name != ".ci" {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(text) = std::fs::read_to_string(&path) {
                for word in &forbidden {
                    assert!(
                        !text.contains(word.as_str()),
                        "{} mentions {word}",
                        path.display()
                    );
                }
            }
        }
    }
}
