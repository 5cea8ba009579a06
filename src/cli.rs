//! The command line: `serve` (default), `check-config`, `sign`, `verify`, `send`.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::verify::diagnose;
use crate::verify::signature::{self, Body, Encoding, NestedValues, NullValues};

#[derive(Debug, Parser)]
#[command(
    name = "lfguard",
    version,
    about = "Verifies Linksfield callbacks before they reach your backend"
)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, env = crate::config::CONFIG_ENV, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Serve,
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig,
    /// Print the x-lf-md5 value of a body.
    Sign(SignArgs),
    /// Check an x-lf-md5 value against a body: exit 0 when valid, 1 when not.
    Verify(VerifyArgs),
    /// Sign a callback as Linksfield would and POST it (N distinct ones with --count).
    Send(SendArgs),
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct SecretArg {
    /// The partner's callback secret.
    #[arg(long)]
    secret: Option<String>,
    /// A file whose first non-blank line is the secret.
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

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SignEncoding {
    /// base64 of the lowercase hex digest, as in Linksfield's worked example.
    Hex,
    /// base64 of the raw 16-byte digest.
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

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum NullArg {
    Empty,
    Skip,
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

#[derive(Debug, Args)]
pub struct SignArgs {
    #[command(flatten)]
    secret: SecretArg,
    /// Print the string to sign, with the secret masked, instead of the signature.
    #[arg(long)]
    explain: bool,
    #[arg(long, value_enum, default_value = "hex")]
    encoding: SignEncoding,
    #[arg(long, value_enum, default_value = "empty")]
    null_values: NullArg,
    /// The body, or `-` (the default) for standard input. JSON when it starts with `{`,
    /// otherwise form-urlencoded.
    body: Option<String>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    secret: SecretArg,
    /// The x-lf-md5 value.
    #[arg(long)]
    signature: String,
    /// Which digest encodings to accept, as `verify.signature_encoding`.
    #[arg(long, value_enum, default_value = "auto")]
    encoding: AcceptArg,
    #[arg(long, value_enum, default_value = "empty")]
    null_values: NullArg,
    #[arg(long, value_enum, default_value = "as-written")]
    nested_values: NestedArg,
    /// Also print the string to sign, with the secret masked.
    #[arg(long)]
    explain: bool,
    /// The body, or `-` (the default) for standard input.
    body: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AcceptArg {
    Auto,
    Hex,
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
pub enum NestedArg {
    AsWritten,
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

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Where to POST, e.g. http://127.0.0.1:8080/callback
    url: String,
    #[command(flatten)]
    secret: SecretArg,
    /// Partner code of the sample body used when no BODY is given.
    #[arg(long, default_value = "P123456")]
    partner: String,
    #[arg(long, value_enum, default_value = "hex")]
    encoding: SignEncoding,
    /// Number of distinct callbacks to send.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Requests in flight at once, each on its own kept-alive connection.
    #[arg(long, default_value_t = 1)]
    concurrency: u64,
    /// The body, or `-` for standard input; a sample SMS uplink callback when omitted.
    body: Option<String>,
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

fn parse(body: &[u8]) -> Result<Body<'_>, String> {
    let parsed = if is_form(body) {
        Body::from_form(body)
    } else {
        Body::from_json(body)
    };
    parsed.map_err(|err| err.to_string())
}

/// `sign`: prints the signature, or with `--explain` the string to sign with the secret masked.
pub fn sign(args: &SignArgs) -> Result<(), String> {
    let secret = args.secret.resolve()?;
    let raw = read_body(args.body.as_deref())?;
    let canonical = parse(&raw)?.canonical(args.null_values.into());
    if args.explain {
        println!("{}", signature::string_to_sign(&canonical, &mask(&secret)));
    } else {
        println!(
            "{}",
            signature::sign(&canonical, &secret, args.encoding.into())
        );
    }
    Ok(())
}

/// Shows that a secret was used without showing it.
fn mask(secret: &str) -> String {
    format!("<secret: {} chars>", secret.chars().count())
}

/// `verify`: `Ok(true)` when the signature matches. On a mismatch, the documented variants are
/// tried and the settings that would accept the body are printed.
pub fn verify(args: &VerifyArgs) -> Result<bool, String> {
    let secret = args.secret.resolve()?;
    let raw = read_body(args.body.as_deref())?;
    let body = parse(&raw)?;
    let settings = diagnose::Settings {
        encoding: args.encoding.into(),
        nulls: args.null_values.into(),
        nested: args.nested_values.into(),
    };
    let canonical = body.canonical_with(settings.nulls, settings.nested);
    if args.explain {
        println!(
            "string to sign: {}",
            signature::string_to_sign(&canonical, &mask(&secret))
        );
    }
    // lfguard refuses such a body whatever its signature, so `verify` does too.
    if let Err(why) = crate::verify::ambiguity::check(&body, settings.nested) {
        println!("invalid: ambiguous body: {why}");
        return Ok(false);
    }
    let header = args.signature.trim().as_bytes();
    if let Some(claimed) = signature::decode_header(header, settings.encoding)
        && claimed.matches(&signature::Prepared::new(&canonical).digest(&secret))
    {
        let encoding = match claimed {
            signature::Claimed::Raw(_) => "raw",
            signature::Claimed::Hex(_) => "hex",
        };
        println!("valid ({encoding} digest encoding)");
        return Ok(true);
    }
    if signature::decode_header(header, Encoding::Auto).is_none() {
        println!("invalid: the signature is not base64 of an md5 digest (hex or raw)");
        return Ok(false);
    }
    match diagnose::find_variant(&body, header, &[secret.as_str()], settings) {
        Some(variant) => println!(
            "invalid with these settings, but valid with {}; to accept it, set in [verify]:\n{}",
            variant.name(),
            variant.config_fix()
        ),
        None => println!(
            "invalid: the signature does not match this body and secret under any documented variant"
        ),
    }
    Ok(false)
}

/// Linksfield's delivery ids are snowflakes: milliseconds, a worker id and a sequence.
struct DeliveryIds {
    worker: u64,
    sequence: AtomicU64,
}

impl DeliveryIds {
    fn new() -> Self {
        let mut bytes = [0u8; 2];
        getrandom::fill(&mut bytes).expect("the OS random source is available");
        DeliveryIds {
            worker: u64::from(u16::from_le_bytes(bytes) & 0x3ff),
            sequence: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        let millis = now_millis();
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed) & 0xfff;
        ((millis << 22) | (self.worker << 12) | sequence).to_string()
    }
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn sample_body(partner: &str, sequence: u64) -> Vec<u8> {
    serde_json::json!({
        "partner_code": partner,
        "sim_id": format!("8986022019{sequence:010}"),
        "imsi": "4230001234567",
        "text_message": "device status: 1234",
        "received_at": now_millis().to_string(),
    })
    .to_string()
    .into_bytes()
}

/// With `--count` above 1 each copy of a given body gets a distinct `lfguard_seq` member, so the
/// copies are distinct callbacks rather than replays.
fn distinct(template: &[u8], run: u64, sequence: u64) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(template).map_err(|_| "body is not UTF-8".to_string())?;
    let rest = text
        .trim_start()
        .strip_prefix('{')
        .ok_or("--count needs a JSON object body")?;
    let separator = if rest.trim_start().starts_with('}') {
        ""
    } else {
        ","
    };
    Ok(format!("{{\"lfguard_seq\":\"{run}-{sequence}\"{separator}{rest}").into_bytes())
}

/// `send`: one callback (printing the answer) or a bounded load run (printing a summary).
pub async fn send(args: &SendArgs) -> Result<bool, String> {
    let secret = Arc::new(args.secret.resolve()?);
    let uri: http::Uri = args
        .url
        .parse()
        .map_err(|err| format!("{}: {err}", args.url))?;
    let template = match args.body.as_deref() {
        Some(body) => Some(read_body(Some(body))?),
        None => None,
    };
    if let Some(body) = &template {
        parse(body)?;
    }
    let count = args.count.max(1);
    let ids = Arc::new(DeliveryIds::new());
    let run = now_millis();
    let build = move |sequence: u64| -> Result<Vec<u8>, String> {
        match (&template, count) {
            (None, _) => Ok(sample_body(&args.partner, sequence)),
            (Some(body), 1) => Ok(body.clone()),
            (Some(body), _) => distinct(body, run, sequence),
        }
    };
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::try_from(args.concurrency).unwrap_or(usize::MAX))
        .build_http();
    let encoding: Encoding = args.encoding.into();
    let request_for = |body: Vec<u8>| -> Result<Request<Full<Bytes>>, String> {
        let form = is_form(&body);
        let parsed = parse(&body)?;
        let signature = signature::sign(&parsed.canonical(NullValues::Empty), &secret, encoding);
        let content_type = if form {
            "application/x-www-form-urlencoded"
        } else {
            "application/json"
        };
        Request::post(uri.clone())
            .header(header::CONTENT_TYPE, content_type)
            .header("x-lf-md5", signature)
            .header("x-lf-delivery", ids.next())
            .body(Full::new(Bytes::from(body)))
            .map_err(|err| err.to_string())
    };

    if count == 1 {
        let response = client
            .request(request_for(build(0)?)?)
            .await
            .map_err(|err| format!("{}: {err}", args.url))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| err.to_string())?
            .to_bytes();
        println!("{}", status.as_u16());
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(status.is_success());
    }

    let requests: Vec<Request<Full<Bytes>>> = (0..count)
        .map(|i| build(i).and_then(&request_for))
        .collect::<Result<_, _>>()?;
    let queue = Arc::new(std::sync::Mutex::new(requests));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.clamp(1, count) {
        let queue = queue.clone();
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            let mut samples: Vec<(Option<u16>, Duration)> = Vec::new();
            loop {
                let Some(request) = queue.lock().expect("queue lock").pop() else {
                    break;
                };
                let sent = Instant::now();
                let status = match client.request(request).await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let _ = response.into_body().collect().await;
                        Some(status)
                    }
                    Err(_) => None,
                };
                samples.push((status, sent.elapsed()));
            }
            samples
        }));
    }
    let mut samples = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for worker in workers {
        samples.extend(worker.await.map_err(|err| err.to_string())?);
    }
    let elapsed = started.elapsed();
    print_summary(&samples, elapsed);
    Ok(samples
        .iter()
        .all(|(status, _)| status.is_some_and(|s| (200..300).contains(&s))))
}

fn print_summary(samples: &[(Option<u16>, Duration)], elapsed: Duration) {
    let mut latencies: Vec<Duration> = samples.iter().map(|(_, d)| *d).collect();
    latencies.sort_unstable();
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        latencies[rank.clamp(1, latencies.len()) - 1].as_secs_f64() * 1000.0
    };
    let mut by_status: std::collections::BTreeMap<String, u64> = Default::default();
    for (status, _) in samples {
        let key = status.map_or_else(|| "error".to_string(), |s| s.to_string());
        *by_status.entry(key).or_default() += 1;
    }
    println!("requests:   {}", samples.len());
    println!("elapsed:    {:.3} s", elapsed.as_secs_f64());
    println!(
        "throughput: {:.1} req/s",
        samples.len() as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
    );
    println!(
        "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
        percentile(50.0),
        percentile(90.0),
        percentile(99.0),
        percentile(100.0)
    );
    let statuses: Vec<String> = by_status.iter().map(|(s, n)| format!("{s}={n}")).collect();
    println!("status:     {}", statuses.join(" "));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_bodies_stay_valid_objects() {
        let a = distinct(br#"{"partner_code":"P1"}"#, 7, 1).unwrap();
        let b = distinct(br#" { } "#, 7, 2).unwrap();
        assert!(Body::from_json(&a).is_ok());
        assert!(Body::from_json(&b).is_ok());
        assert_ne!(a, distinct(br#"{"partner_code":"P1"}"#, 7, 2).unwrap());
    }

    #[test]
    fn delivery_ids_are_unique_numbers() {
        let ids = DeliveryIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert!(a.parse::<u64>().is_ok());
    }
}
