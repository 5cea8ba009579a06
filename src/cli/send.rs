//! `send`: signs callbacks as Linksfield would and POSTs them, one (printing the answer) or a
//! bounded load run (printing throughput, latency percentiles and statuses).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::path::PathBuf;

use bytes::Bytes;
use clap::Args;
use http::{Request, header};
use http_body_util::{BodyExt, Full};

use crate::cli::client::{Client, Target, Verify};
use crate::cli::{SecretArg, SignEncoding, is_form, parse, read_body};
use crate::verify::signature::{self, Encoding, NullValues};

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Where to POST, e.g. http://127.0.0.1:8080/callback
    #[arg(value_name = "URL")]
    url: String,
    #[command(flatten)]
    secret: SecretArg,
    /// Partner code of the sample body used when no BODY is given (the shipped config's partner).
    #[arg(long, default_value = "P123456", value_name = "CODE")]
    partner: String,
    /// How the md5 digest is encoded in x-lf-md5.
    #[arg(long, value_enum, default_value = "hex", value_name = "ENCODING")]
    encoding: SignEncoding,
    /// Number of distinct callbacks to send; above 1, a summary is printed instead of the answer.
    #[arg(long, default_value_t = 1, value_name = "N")]
    count: u64,
    /// Requests in flight at once, each on its own kept-alive connection.
    #[arg(long, default_value_t = 1, value_name = "C")]
    concurrency: u64,
    /// For an https:// URL: the PEM CAs to verify the server's certificate against, instead of
    /// the platform's roots (a private or test CA).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// For an https:// URL: do not verify the server's certificate at all. For test setups only;
    /// prints a warning.
    #[arg(long, conflicts_with = "ca_file")]
    insecure: bool,
    /// The body, or `-` for standard input; a sample SMS uplink callback received now when
    /// omitted. Signed with null values as `key=`, as Linksfield does.
    #[arg(value_name = "BODY")]
    body: Option<String>,
}

/// Linksfield's delivery ids are snowflakes: milliseconds, a worker id and a sequence.
pub(super) struct DeliveryIds {
    worker: u64,
    sequence: AtomicU64,
}

impl DeliveryIds {
    pub(super) fn new() -> Self {
        let mut bytes = [0u8; 2];
        getrandom::fill(&mut bytes).expect("the OS random source is available");
        DeliveryIds {
            worker: u64::from(u16::from_le_bytes(bytes) & 0x3ff),
            sequence: AtomicU64::new(0),
        }
    }

    pub(super) fn next(&self) -> String {
        let millis = now_millis();
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed) & 0xfff;
        ((millis << 22) | (self.worker << 12) | sequence).to_string()
    }
}

pub(super) fn now_millis() -> u64 {
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
    let verify = if args.insecure {
        eprintln!(
            "lfguard: warning: --insecure: the server's certificate is not verified; anyone on \
             the way can read and change these callbacks (for test setups only)"
        );
        Verify::Insecure
    } else {
        Verify::Roots(args.ca_file.as_deref())
    };
    let target = Target::new(&uri, verify, None)?;
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
        let response = Client::new(target)
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
        let mut client = Client::new(target.clone());
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
    use crate::verify::signature::Body;

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
