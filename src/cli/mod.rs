//! The command line: the subcommands and their flags, and what they share (the secret, the body,
//! the canonicalisation flags). Each subcommand lives in its own file: `sign` (sign and verify),
//! `send`, `echo`, `demo` and `spool`; `client` is the HTTP(S) client of `send` and `demo`;
//! `main.rs` runs `serve` and `check-config`.

use std::io::Read;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::verify::signature::{Body, Encoding, NestedValues, NullValues};

pub mod client;
pub mod demo;
pub mod echo;
pub mod send;
pub mod sign;
pub mod spool;

pub use self::demo::{DemoArgs, demo};
pub use self::echo::{EchoArgs, echo};
pub use self::send::{SendArgs, send};
pub use self::sign::{SignArgs, VerifyArgs, sign, verify};
pub use self::spool::{SpoolAction, SpoolArgs, spool};

#[derive(Debug, Parser)]
#[command(
    name = "lfguard",
    version,
    about = "Verifies Linksfield callbacks before they reach your backend",
    // `lfguard --config PATH` (no subcommand) runs `serve`; a flag before a subcommand is refused
    // rather than silently ignored.
    args_conflicts_with_subcommands = true,
    after_help = "\
Examples:
  lfguard demo                                     see what lfguard accepts and refuses
  lfguard serve --config config/lfguard.toml       run the proxy
  lfguard --config config/lfguard.toml             the same (serve is the default)
  lfguard echo                                     a backend that prints what it receives
  lfguard send http://127.0.0.1:8080/callback --secret dev-only-change-me
  lfguard help sign                                the flags and examples of one subcommand"
)]
pub struct Cli {
    /// With no subcommand, lfguard runs `serve` with this configuration.
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// The subcommand to run: `serve` when none was named.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(self.config))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default when no subcommand is given).
    #[command(after_help = "\
Examples:
  lfguard serve --config config/lfguard.toml
  LFGUARD_CONFIG=/etc/lfguard/lfguard.toml lfguard serve
  LFGUARD_UPSTREAM__URL=http://127.0.0.1:3000 lfguard serve --config config/lfguard.toml
  lfguard --config config/lfguard.toml             serve is the default subcommand")]
    Serve(ConfigArg),
    /// Validate the configuration and print it with secrets redacted (exit 64 when invalid).
    #[command(after_help = "\
Examples:
  lfguard check-config --config config/lfguard.toml
  LFGUARD_UPSTREAM__TIMEOUT=10s lfguard check-config --config config/lfguard.toml
                                                   the effective config, environment applied")]
    CheckConfig(ConfigArg),
    /// Print the x-lf-md5 value of a body.
    #[command(after_help = "\
Examples:
  lfguard sign --secret dev-only-change-me '{\"partner_code\":\"P123456\",\"received_at\":\"1700000000000\"}'
  lfguard sign --secret-file /run/secrets/P123456 - < body.json
  lfguard sign --secret dev-only-change-me --explain '{\"partner_code\":\"P123456\",\"note\":null}'
                                                   the string to sign, secret masked
  lfguard sign --secret S --encoding raw --null-values skip --nested-values reserialized BODY")]
    Sign(SignArgs),
    /// Check an x-lf-md5 value against a body: exit 0 when valid, 1 when not.
    #[command(after_help = "\
Examples:
  lfguard verify --secret dev-only-change-me --signature NDQ5NDcxYjczNzEyZWQzZWI3Y2Q5OTA3ZWNiMWRmMmY= \\
      '{\"partner_code\":\"P123456\",\"received_at\":\"1700000000000\"}'
  lfguard verify --secret-file /run/secrets/P123456 --signature \"$SIG\" --explain - < body.json
  On a mismatch, verify names the settings ([verify] null_values, nested_values,
  signature_encoding) under which the signature would be valid, if any.")]
    Verify(VerifyArgs),
    /// Sign a callback as Linksfield would and POST it (N distinct ones with --count).
    #[command(after_help = "\
Examples:
  lfguard send http://127.0.0.1:8080/callback --secret dev-only-change-me
                                                   a sample SMS uplink for partner P123456
  lfguard send http://127.0.0.1:8080/callback --secret-file secret.txt - < body.json
  lfguard send http://127.0.0.1:8080/callback --secret dev-only-change-me --count 1000 --concurrency 8
                                                   a bounded load run: throughput, latency, statuses
  lfguard send https://callbacks.example.com/callback --secret-file secret.txt
                                                   over TLS, verified against the platform's roots
  lfguard send https://localhost:8443/callback --secret dev-only-change-me --ca-file ca.pem
                                                   verified against a private or test CA")]
    Send(SendArgs),
    /// Run a backend that prints every request it receives and answers 200 (or --status).
    #[command(after_help = "\
Examples:
  lfguard echo                                     on 127.0.0.1:8081, the shipped config's upstream
  lfguard echo --status 503                        see how a pipeline handles a failing backend
  lfguard echo --listen 127.0.0.1:0                any free port (printed as \"listening on ADDR\")
Try the sidecar by hand, in three terminals:
  lfguard echo
  lfguard serve --config config/lfguard.toml
  lfguard send http://127.0.0.1:8080/callback --secret dev-only-change-me")]
    Echo(EchoArgs),
    /// Show what lfguard does with five callbacks, with nothing else running.
    ///
    /// Starts a recording backend and lfguard (the shipped configuration) in-process on free
    /// loopback ports, sends a genuine, a forged, a replayed, a stale and an ambiguous callback,
    /// and prints what was sent, what lfguard answered and what the backend received. Exits 0
    /// when every callback is handled as expected, 1 otherwise.
    #[command(after_help = "\
Examples:
  lfguard demo                                     nothing else needs to run; ports are chosen free
  lfguard demo && echo 'lfguard works'             exit 0 when every row is as expected, 1 if not
  lfguard demo --cert-file fullchain.pem --key-file privkey.pem --server-name callbacks.example.com
                                                   the same over https with your certificate, verified
                                                   against the platform's roots as Linksfield would
  lfguard demo --cert-file server.crt --key-file server.key --ca-file ca.pem
                                                   a certificate of a private CA, for localhost")]
    Demo(DemoArgs),
    /// Look at and act on the spool of callbacks waiting for the backend (delivery.spool_dir).
    ///
    /// Works beside a running lfguard, which picks up a retry or a drop within a second. Exits 1
    /// when the callback named is not in the spool.
    #[command(after_help = "\
Examples:
  lfguard spool stats --config config/lfguard.toml  counts, bytes, the oldest waiting callback
  lfguard spool list --config config/lfguard.toml   every spooled callback, oldest first
  lfguard spool show ID --config config/lfguard.toml
                                                   one callback: state, last error, head and body
  lfguard spool retry --dead --config config/lfguard.toml
                                                   send every dead letter again
  lfguard spool retry ID                           one callback, now (LFGUARD_CONFIG names the file)
  lfguard spool drop ID --config config/lfguard.toml
                                                   remove one callback without delivering it")]
    Spool(SpoolArgs),
}

/// The configuration file, for `serve` and `check-config`.
#[derive(Debug, Clone, Args)]
pub struct ConfigArg {
    /// Configuration file (TOML); without one, the built-in defaults and LFGUARD_* variables.
    #[arg(long, env = crate::config::CONFIG_ENV, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct SecretArg {
    /// The partner's callback secret.
    #[arg(long, value_name = "SECRET")]
    secret: Option<String>,
    /// A file whose first non-blank line is the secret (a mounted Secret, one secret a line).
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
}

impl SecretArg {
    fn resolve(&self) -> Result<String, String> {
        match (&self.secret, &self.secret_file) {
            (Some(secret), _) => Ok(secret.clone()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|err| format!("{}: {err}", path.display()))?
                .lines()
                .map(str::trim)
                .find(|line| !line.is_empty())
                .map(str::to_string)
                .ok_or_else(|| format!("{}: holds no secret", path.display())),
            (None, None) => Err("--secret or --secret-file is required".into()),
        }
    }
}

/// How `sign` and `send` encode the digest.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SignEncoding {
    /// base64 of the 32-character lowercase hex digest, as in Linksfield's worked example.
    Hex,
    /// base64 of the 16 raw digest bytes (the formula read literally).
    Raw,
}

impl From<SignEncoding> for Encoding {
    fn from(encoding: SignEncoding) -> Self {
        match encoding {
            SignEncoding::Hex => Encoding::Hex,
            SignEncoding::Raw => Encoding::Raw,
        }
    }
}

/// Which digest encodings `verify` accepts.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AcceptArg {
    /// Either: base64 of the hex digest or of the raw digest.
    Auto,
    /// Only base64 of the 32-character lowercase hex digest.
    Hex,
    /// Only base64 of the 16 raw digest bytes.
    Raw,
}

impl From<AcceptArg> for Encoding {
    fn from(encoding: AcceptArg) -> Self {
        match encoding {
            AcceptArg::Auto => Encoding::Auto,
            AcceptArg::Hex => Encoding::Hex,
            AcceptArg::Raw => Encoding::Raw,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum NullArg {
    /// `key=`: the key with an empty value (Linksfield's behaviour as documented).
    Empty,
    /// The member is left out of the string to sign.
    Skip,
    /// `key=null`: the word null.
    Literal,
}

impl From<NullArg> for NullValues {
    fn from(nulls: NullArg) -> Self {
        match nulls {
            NullArg::Empty => NullValues::Empty,
            NullArg::Skip => NullValues::Skip,
            NullArg::Literal => NullValues::Literal,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum NestedArg {
    /// The object or array as written in the body, whitespace outside strings removed.
    AsWritten,
    /// As a JSON library re-serialises it: keys sorted, numbers and escapes normalised.
    Reserialized,
}

impl From<NestedArg> for NestedValues {
    fn from(nested: NestedArg) -> Self {
        match nested {
            NestedArg::AsWritten => NestedValues::AsWritten,
            NestedArg::Reserialized => NestedValues::Reserialized,
        }
    }
}

/// How a body becomes the string to sign: the same flags, with the same defaults, on `sign` and
/// `verify`, so that what one signs the other accepts.
#[derive(Debug, Clone, Copy, Args)]
pub struct CanonicalArgs {
    /// How a JSON null member is written into the string to sign, as [verify] null_values.
    #[arg(long, value_enum, default_value = "empty", value_name = "HOW")]
    null_values: NullArg,
    /// How an object or array member is written into the string to sign, as [verify]
    /// nested_values.
    #[arg(long, value_enum, default_value = "as-written", value_name = "HOW")]
    nested_values: NestedArg,
}

impl CanonicalArgs {
    /// The string to sign without its final `&secret`.
    fn canonical(&self, body: &Body<'_>) -> String {
        body.canonical_with(self.null_values.into(), self.nested_values.into())
    }
}

/// Reads `BODY|-`.
fn read_body(arg: Option<&str>) -> Result<Vec<u8>, String> {
    match arg {
        None | Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|err| format!("reading standard input: {err}"))?;
            Ok(buf)
        }
        Some(body) => Ok(body.as_bytes().to_vec()),
    }
}

fn is_form(body: &[u8]) -> bool {
    body.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b != b'{')
}

/// A JSON body when it starts with `{`, otherwise a form.
fn parse(body: &[u8]) -> Result<Body<'_>, String> {
    let parsed = if is_form(body) {
        Body::from_form(body)
    } else {
        Body::from_json(body)
    };
    parsed.map_err(|err| err.to_string())
}

/// Shows that a secret was used without showing it.
fn mask(secret: &str) -> String {
    format!("<secret: {} chars>", secret.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every flag, argument and value has help, and every subcommand ends its help with examples.
    #[test]
    fn everything_has_help() {
        let mut cli = Cli::command();
        cli.build();
        let mut missing = Vec::new();
        for command in std::iter::once(&cli).chain(cli.get_subcommands()) {
            let name = command.get_name();
            if name != "help"
                && !command
                    .get_after_help()
                    .is_some_and(|text| text.to_string().starts_with("Examples:"))
            {
                missing.push(format!("{name}: no examples"));
            }
            for arg in command.get_arguments() {
                let id = arg.get_id();
                if arg.get_help().is_none() {
                    missing.push(format!("{name} {id}: no help"));
                }
                for value in arg.get_possible_values() {
                    if !value.is_hide_set() && value.get_help().is_none() {
                        missing.push(format!("{name} {id}={}: no help", value.get_name()));
                    }
                }
            }
        }
        assert!(missing.is_empty(), "{missing:#?}");
    }

    #[test]
    fn config_is_offered_only_where_it_is_read() {
        let cli = Cli::command();
        for command in cli.get_subcommands() {
            let has_config = command
                .get_arguments()
                .any(|arg| arg.get_long() == Some("config"));
            let reads_config = matches!(command.get_name(), "serve" | "check-config" | "spool");
            assert_eq!(has_config, reads_config, "{}", command.get_name());
        }
    }

    #[test]
    fn no_subcommand_is_serve() {
        let command = Cli::try_parse_from(["lfguard", "--config", "x.toml"])
            .unwrap()
            .into_command();
        assert!(
            matches!(&command, Command::Serve(arg) if arg.config == Some("x.toml".into())),
            "{command:?}"
        );
        assert!(Cli::try_parse_from(["lfguard", "--config", "x.toml", "sign"]).is_err());
        assert!(Cli::try_parse_from(["lfguard", "sign", "--config", "x.toml"]).is_err());
    }
}
