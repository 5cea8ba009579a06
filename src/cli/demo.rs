//! `demo`: what lfguard does, in one command with nothing else running. A recording backend
//! (`echo::serve`) and the real server (`server::run_reporting`: the shipped configuration on free
//! loopback ports, one partner with a secret made for this run, the memory replay store) start
//! in-process; five callbacks go through them, and a table shows what was sent, what lfguard
//! answered and what the backend received. It exits 0 only when every row is as expected, so it
//! doubles as a smoke test. No log subscriber is installed: the table is the whole output.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use clap::Args;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::cli::client::{Client, TLS_FAILED, Target, Verify};
use crate::cli::echo::{self, Received};
use crate::cli::send::{DeliveryIds, now_millis};
use crate::config::{
    Config, ListenerTlsConfig, OnDuplicate, PartnerConfig, RouteConfig, StoreKind,
};
use crate::server::{self, Bound};
use crate::verify::signature::{self, Body, Encoding, NullValues};

/// The configuration lfguard ships with; the demo changes only ports, backend, partner and route.
const SHIPPED_CONFIG: &str = include_str!("../../config/lfguard.toml");
/// The shipped config's example partner.
const PARTNER: &str = "P123456";
/// Where the callbacks go: a route checked against the shipped SMS uplink schema.
const PATH: &str = "/linksfield/sms-uplink";
const SCHEMA: &str = "sms_uplink";
/// What the forger signs with instead of the partner's secret.
const FORGED_SECRET: &str = "a-guessed-secret";
const STALE_AGE: Duration = Duration::from_secs(3 * 24 * 3600);
/// How long one callback may take; the demo fails rather than hangs.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// `demo`'s flags: with a certificate, lfguard's port speaks TLS and the callbacks go over https.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// A PEM certificate (full chain) for lfguard's port, as [server.tls] cert_file: the demo
    /// then speaks https, which checks that lfguard serves it as a client would see it.
    #[arg(long, value_name = "FILE", requires = "key_file")]
    cert_file: Option<PathBuf>,
    /// Its PEM private key, as [server.tls] key_file.
    #[arg(long, value_name = "FILE", requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// The PEM CAs the demo's client verifies the certificate against, instead of the
    /// platform's roots.
    #[arg(long, value_name = "FILE", requires = "cert_file")]
    ca_file: Option<PathBuf>,
    /// The name the certificate is verified for (and sent as SNI); the demo connects to its
    /// own lfguard on 127.0.0.1 whatever the name.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "localhost",
        requires = "cert_file"
    )]
    server_name: String,
}

/// What a row should show: lfguard's status and outcome, and whether the backend got the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expected {
    status: u16,
    outcome: &'static str,
    delivered: bool,
}

/// One callback of the demo.
struct Case {
    name: &'static str,
    /// What was sent, in words.
    sent: &'static str,
    /// Why lfguard answers as it does, in words.
    why: String,
    body: String,
    signature: String,
    delivery_id: String,
    expected: Expected,
}

/// A case with what happened to it.
struct Row {
    case: Case,
    /// lfguard's status and outcome (`forwarded`, `duplicate` or an error code), or why none came.
    answer: Result<(u16, String), String>,
    /// What the backend received while lfguard handled this callback.
    received: Vec<Received>,
}

impl Row {
    fn delivered(&self) -> Option<&Received> {
        self.received.first()
    }

    /// Whether the backend got exactly the body that was sent, marked verified.
    fn delivered_intact(&self) -> bool {
        self.received.len() == 1
            && self.received[0].body == self.case.body.as_bytes()
            && self.received[0].header("x-lfguard-verified") == Some("true")
    }

    fn as_expected(&self) -> bool {
        let expected = self.case.expected;
        let answered = matches!(&self.answer, Ok((status, outcome))
            if *status == expected.status && outcome == expected.outcome);
        let delivered = if expected.delivered {
            self.delivered_intact()
        } else {
            self.received.is_empty()
        };
        answered && delivered
    }

    fn lfguard_column(&self) -> String {
        match &self.answer {
            Ok((status, outcome)) => format!("{status} {outcome}"),
            Err(err) => format!("no answer: {err}"),
        }
    }

    fn backend_column(&self) -> String {
        match (self.delivered(), self.received.len()) {
            (None, _) => "nothing".into(),
            (Some(_), 1) if self.delivered_intact() => {
                "the body as sent, with x-lfguard-verified: true".into()
            }
            (Some(received), 1) => format!(
                "{} bytes{}, x-lfguard-verified: {}",
                received.body.len(),
                if received.body == self.case.body.as_bytes() {
                    ", the body as sent"
                } else {
                    " differing from the body sent"
                },
                received.header("x-lfguard-verified").unwrap_or("(absent)")
            ),
            (Some(_), n) => format!("{n} requests"),
        }
    }
}

/// Sends the cases one after the other, noting what the backend received for each.
async fn run_cases(
    recorded: &Mutex<Vec<Received>>,
    bound: Bound,
    secret: &str,
    on_duplicate: OnDuplicate,
    args: &DemoArgs,
) -> Result<Vec<Row>, String> {
    let uri = demo_uri(bound, args)?;
    let verify = Verify::Roots(args.ca_file.as_deref());
    let mut client = Client::new(Target::new(&uri, verify, Some(bound.proxy))?);
    let mut rows = Vec::new();
    for case in cases(secret, on_duplicate) {
        let before = recorded_lock(recorded).len();
        let answer = post(&mut client, &uri, &case).await;
        // No callback can get through a certificate the client refuses: say so once.
        if let Err(err) = &answer
            && err.starts_with(TLS_FAILED)
        {
            return Err(format!("{uri}: {err}"));
        }
        // The backend records a request before answering it, and lfguard answers only after the
        // backend did: whatever the backend got for this callback is recorded by now.
        let received = recorded_lock(recorded)[before..].to_vec();
        rows.push(Row {
            case,
            answer,
            received,
        });
    }
    Ok(rows)
}

/// Where the callbacks go: lfguard's port, as `https://NAME:PORT` when it speaks TLS.
fn demo_uri(bound: Bound, args: &DemoArgs) -> Result<Uri, String> {
    let url = match &args.cert_file {
        None => format!("http://{}{PATH}", bound.proxy),
        Some(_) => format!("https://{}:{}{PATH}", args.server_name, bound.proxy.port()),
    };
    url.parse().map_err(|err| format!("{url}: {err}"))
}

/// `demo`: `Ok(true)` when every row is as expected.
pub async fn demo(args: &DemoArgs) -> Result<bool, String> {
    let secret = demo_secret()?;

    let recorded: Arc<Mutex<Vec<Received>>> = Arc::default();
    let backend_listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|err| format!("backend: cannot listen on 127.0.0.1: {err}"))?;
    let backend = backend_listener
        .local_addr()
        .map_err(|err| format!("backend: {err}"))?;
    let record = {
        let recorded = recorded.clone();
        move |received: &Received| recorded_lock(&recorded).push(received.clone())
    };
    // Runs until the process exits with the demo's result.
    tokio::spawn(echo::serve(
        backend_listener,
        StatusCode::OK,
        record,
        std::future::pending(),
    ));

    let tls = match (&args.cert_file, &args.key_file) {
        (Some(cert_file), Some(key_file)) => Some(ListenerTlsConfig {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            client_ca_file: None,
        }),
        _ => None,
    };
    let config = demo_config(backend, &secret, tls)?;
    let on_duplicate = config.replay.on_duplicate;
    let (ready_tx, ready_rx) = oneshot::channel();
    // The server's future is not `Send`, so it runs in this task, polled beside the demo.
    let lfguard = server::run_reporting(config, ready_tx);
    let mut lfguard = pin!(lfguard);
    let bound: Bound = tokio::select! {
        ready = ready_rx => ready.map_err(|_| "lfguard stopped before it was ready".to_string())?,
        result = &mut lfguard => {
            return Err(match result {
                Err(err) => format!("lfguard did not start: {err}"),
                Ok(()) => "lfguard stopped before it was ready".into(),
            })
        }
    };
    let rows = tokio::select! {
        rows = run_cases(&recorded, bound, &secret, on_duplicate, args) => rows?,
        result = &mut lfguard => {
            return Err(format!("lfguard stopped during the demo: {result:?}"));
        }
    };
    let uri = demo_uri(bound, args)?;
    print!("{}", report(backend, bound, &uri, &rows));
    Ok(rows.iter().all(Row::as_expected))
}

fn recorded_lock(recorded: &Mutex<Vec<Received>>) -> std::sync::MutexGuard<'_, Vec<Received>> {
    recorded
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A secret made for this run: nothing but the demo can sign for its partner.
fn demo_secret() -> Result<String, String> {
    let mut bytes = [0u8; 18];
    getrandom::fill(&mut bytes).map_err(|err| format!("the OS random source: {err}"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The shipped configuration with free loopback ports, the demo's backend, one partner with the
/// demo's secret, the memory replay store, a route checked against the SMS uplink schema, and
/// `[server.tls]` when given.
fn demo_config(
    backend: SocketAddr,
    secret: &str,
    tls: Option<ListenerTlsConfig>,
) -> Result<Config, String> {
    let mut config: Config = toml::from_str(SHIPPED_CONFIG)
        .map_err(|err| format!("the shipped config/lfguard.toml: {err}"))?;
    let free_loopback_port = SocketAddr::from(([127, 0, 0, 1], 0));
    config.server.listen = free_loopback_port;
    config.server.admin_listen = free_loopback_port;
    config.upstream.url = format!("http://{backend}");
    config.replay.store = StoreKind::Memory;
    config.server.tls = tls;
    config.partners_dir = None;
    config.partners = BTreeMap::from([(
        PARTNER.to_string(),
        PartnerConfig {
            secrets: vec![secret.to_string()],
            ..PartnerConfig::default()
        },
    )]);
    config.routes = vec![RouteConfig {
        path_prefix: PATH.into(),
        verify: true,
        schema: Some(SCHEMA.into()),
        require_timestamp: None,
        accept_form: None,
        delivery: None,
    }];
    config.validate().map_err(|err| err.to_string())
}

/// An SMS uplink callback as Linksfield sends it, members in Linksfield's order.
fn sms_uplink(sim: u32, text: &str, received_at_millis: u64) -> String {
    format!(
        r#"{{"partner_code":"{PARTNER}","sim_id":"8986022019{sim:010}","imsi":"4230001234567","text_message":{},"received_at":"{received_at_millis}"}}"#,
        serde_json::Value::from(text)
    )
}

fn sign(body: &str, secret: &str) -> String {
    let canonical = Body::from_json(body.as_bytes())
        .expect("the demo's bodies are well-formed JSON")
        .canonical(NullValues::Empty);
    signature::sign(&canonical, secret, Encoding::Hex)
}

/// The five callbacks, in order: the replay repeats the genuine one.
fn cases(secret: &str, on_duplicate: OnDuplicate) -> Vec<Case> {
    let ids = DeliveryIds::new();
    let now = now_millis();
    let stale_at = now.saturating_sub(u64::try_from(STALE_AGE.as_millis()).unwrap_or(u64::MAX));
    let genuine = sms_uplink(1, "device status: 1234", now);
    let forged = sms_uplink(2, "unlock device 2", now);
    let stale = sms_uplink(3, "device status: 1234", stale_at);
    let ambiguous = sms_uplink(4, "hi&zzz=1", now);
    let genuine_id = ids.next();
    let replay_expected = match on_duplicate {
        OnDuplicate::Acknowledge => Expected {
            status: 200,
            outcome: "duplicate",
            delivered: false,
        },
        OnDuplicate::Reject => Expected {
            status: 409,
            outcome: "replay",
            delivered: false,
        },
    };
    let replay_why = match on_duplicate {
        OnDuplicate::Acknowledge => {
            "already delivered: acknowledged (replay.on_duplicate = \"acknowledge\") so that a \
             retry stops, and not forwarded again"
        }
        OnDuplicate::Reject => "already delivered: refused (replay.on_duplicate = \"reject\")",
    };
    let refused = |status, outcome| Expected {
        status,
        outcome,
        delivered: false,
    };
    vec![
        Case {
            name: "genuine",
            sent: "signed with the partner's secret",
            why: "signature valid, received now, first delivery: forwarded, marked verified".into(),
            signature: sign(&genuine, secret),
            body: genuine.clone(),
            delivery_id: genuine_id.clone(),
            expected: Expected {
                status: 200,
                outcome: "forwarded",
                delivered: true,
            },
        },
        Case {
            name: "forged",
            sent: "another body, signed with a guessed secret",
            why: "the signature does not match the partner's secret".into(),
            signature: sign(&forged, FORGED_SECRET),
            body: forged,
            delivery_id: ids.next(),
            expected: refused(401, "bad_signature"),
        },
        Case {
            name: "replayed",
            sent: "the genuine request again, byte for byte",
            why: replay_why.into(),
            signature: sign(&genuine, secret),
            body: genuine,
            delivery_id: genuine_id,
            expected: replay_expected,
        },
        Case {
            name: "stale",
            sent: "received_at 3 days ago, correctly signed",
            why: "older than verify.max_age (24h): a captured callback cannot be replayed once \
                  the replay store has forgotten it"
                .into(),
            signature: sign(&stale, secret),
            body: stale,
            delivery_id: ids.next(),
            expected: refused(401, "stale"),
        },
        Case {
            name: "ambiguous",
            sent: "text_message \"hi&zzz=1\", correctly signed",
            why: "the string to sign also reads as a body with a member zzz=1, so the same \
                  signature would fit another body"
                .into(),
            signature: sign(&ambiguous, secret),
            body: ambiguous,
            delivery_id: ids.next(),
            expected: refused(400, "ambiguous_body"),
        },
    ]
}

/// POSTs a case as Linksfield would and reads lfguard's status and outcome.
async fn post(client: &mut Client, uri: &Uri, case: &Case) -> Result<(u16, String), String> {
    let request = Request::post(uri.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-lf-md5", &case.signature)
        .header("x-lf-delivery", &case.delivery_id)
        .body(Full::new(Bytes::from(case.body.clone())))
        .map_err(|err| err.to_string())?;
    let exchange = async {
        let response = client.request(request).await?;
        let status = response.status().as_u16();
        let duplicate = response.headers().contains_key("x-lfguard-duplicate");
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| err.to_string())?
            .to_bytes();
        Ok((status, outcome(status, duplicate, &body)))
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("none within {} s", ANSWER_TIMEOUT.as_secs()))?
}

/// `duplicate`, the error code of a refusal, or `forwarded` for the backend's own answer.
fn outcome(status: u16, duplicate: bool, body: &[u8]) -> String {
    if duplicate {
        return "duplicate".into();
    }
    let code = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|json| json["error"]["code"].as_str().map(str::to_string));
    match code {
        Some(code) => code,
        None if (200..300).contains(&status) => "forwarded".into(),
        None => "from the backend".into(),
    }
}

/// The table, the reasons, the bodies and what the backend received for the genuine callback.
fn report(backend: SocketAddr, bound: Bound, uri: &Uri, rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "lfguard demo: a recording backend on {backend} and lfguard on {} (admin {}),\n\
         running the shipped config/lfguard.toml with partner {PARTNER} (its secret made for this run),\n\
         the memory replay store, and POST {PATH} checked against schema {SCHEMA}.",
        bound.proxy, bound.admin
    );
    if uri.scheme_str() == Some("https") {
        let _ = writeln!(
            out,
            "lfguard's port speaks TLS: the callbacks go to {uri}, its certificate verified."
        );
    }
    let _ = writeln!(out);
    let header = ["case", "sent", "lfguard answered", "backend received"];
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|row| {
            [
                row.case.name.to_string(),
                row.case.sent.to_string(),
                row.lfguard_column(),
                row.backend_column(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 4], mark: &str| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        text.push_str(mark);
        text.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(header, ""));
    let rule = widths.map(|width| "-".repeat(width));
    let _ = writeln!(out, "{}", line(rule.each_ref().map(String::as_str), ""));
    for (row, cells) in rows.iter().zip(&cells) {
        let mark = if row.as_expected() {
            String::new()
        } else {
            let expected = row.case.expected;
            format!(
                "   <- NOT AS EXPECTED: expected {} {}, backend {}",
                expected.status,
                expected.outcome,
                if expected.delivered {
                    "receives the body"
                } else {
                    "receives nothing"
                }
            )
        };
        let _ = writeln!(out, "{}", line(cells.each_ref().map(String::as_str), &mark));
    }

    let name_width = rows
        .iter()
        .map(|row| row.case.name.len())
        .max()
        .unwrap_or(0);
    let _ = writeln!(out, "\nWhy:");
    for row in rows {
        let _ = writeln!(out, "  {:<name_width$}  {}", row.case.name, row.case.why);
    }
    let _ = writeln!(
        out,
        "\nBodies sent (each with Content-Type: application/json, x-lf-md5 and x-lf-delivery):"
    );
    for row in rows {
        let _ = writeln!(out, "  {:<name_width$}  {}", row.case.name, row.case.body);
    }
    if let Some(received) = rows.iter().find_map(Row::delivered) {
        let _ = writeln!(out, "\nWhat the backend received for the genuine callback:");
        for text in received.to_string().lines() {
            let _ = writeln!(out, "{}", format!("  {text}").trim_end());
        }
    }
    let expected = rows.iter().filter(|row| row.as_expected()).count();
    let _ = writeln!(
        out,
        "\n{expected} of {} callbacks handled as expected.",
        rows.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_is_the_shipped_one_on_free_ports() {
        let config = demo_config("127.0.0.1:9".parse().unwrap(), "s", None).unwrap();
        assert_eq!(config.server.listen.port(), 0);
        assert_eq!(config.server.admin_listen.port(), 0);
        assert_eq!(config.upstream.url, "http://127.0.0.1:9");
        assert!(config.schemas.contains_key(SCHEMA));
        assert_eq!(config.partners.len(), 1);
    }

    #[test]
    fn outcomes_name_what_lfguard_did() {
        let refused = br#"{"error":{"code":"stale","message":"m"}}"#;
        assert_eq!(outcome(401, false, refused), "stale");
        assert_eq!(
            outcome(200, true, br#"{"status":"duplicate"}"#),
            "duplicate"
        );
        assert_eq!(outcome(200, false, b"{}"), "forwarded");
        assert_eq!(outcome(503, false, b"busy"), "from the backend");
    }

    #[test]
    fn a_row_that_differs_from_its_expectation_is_marked() {
        let mut cases = cases("k", OnDuplicate::Acknowledge).into_iter();
        let genuine = cases.next().unwrap();
        let forged = cases.next().unwrap();
        let received = Received {
            number: 1,
            peer: "127.0.0.1:1".parse().unwrap(),
            method: "POST".into(),
            target: PATH.into(),
            version: http::Version::HTTP_11,
            headers: vec![("x-lfguard-verified".into(), "true".into())],
            body: Bytes::from(genuine.body.clone()),
        };
        let rows = [
            Row {
                case: genuine,
                answer: Ok((200, "forwarded".into())),
                received: vec![received.clone()],
            },
            Row {
                case: forged,
                answer: Ok((200, "forwarded".into())),
                received: vec![received],
            },
        ];
        assert!(rows[0].as_expected());
        assert!(!rows[1].as_expected());
        let bound = Bound {
            proxy: "127.0.0.1:2".parse().unwrap(),
            admin: "127.0.0.1:3".parse().unwrap(),
        };
        let uri: Uri = "http://127.0.0.1:2/linksfield/sms-uplink".parse().unwrap();
        let text = report("127.0.0.1:1".parse().unwrap(), bound, &uri, &rows);
        let marked: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("NOT AS EXPECTED"))
            .collect();
        assert_eq!(marked.len(), 1, "{text}");
        assert!(marked[0].starts_with("forged "), "{text}");
        assert!(marked[0].contains("expected 401 bad_signature"), "{text}");
        assert!(
            text.contains("1 of 2 callbacks handled as expected."),
            "{text}"
        );
    }

    #[test]
    fn every_case_but_the_forged_one_is_signed_with_the_secret() {
        let cases = cases("k", OnDuplicate::Acknowledge);
        assert_eq!(cases.len(), 5);
        for case in &cases {
            let genuine = sign(&case.body, "k") == case.signature;
            assert_eq!(genuine, case.name != "forged", "{}", case.name);
        }
        assert_eq!(cases[0].body, cases[2].body);
        assert_eq!(cases[0].delivery_id, cases[2].delivery_id);
    }
}
