//! Structured logs with `tracing`: JSON lines by default (one event per request), or text.
//!
//! Both are on the hot path (one event per request), so three things are done by hand:
//! - `JsonLayer` writes each event straight into a reused line buffer; tracing-subscriber's own
//!   JSON formatter builds a serde map per event and cost a tenth of lfguard's CPU under load.
//! - The request line (`RequestLine`) skips `tracing` altogether when logs are JSON: it is the
//!   same line, written field by field with its keys known in advance, at a third of the cost of
//!   an event (a visitor call and an escape scan per key). Filters still decide whether it is
//!   written, and text logs get it as an ordinary event.
//! - Lines gather in `PENDING` and reach stdout in one `write` when a runtime worker runs out of
//!   work (`flush`, installed as tokio's park hook), when `FLUSH_AT` bytes have gathered, and at
//!   once for warnings and errors. Under load that is one write per event-loop turn instead of one
//!   per request; a process killed with SIGKILL loses at most the lines of its current turn.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::{IsTerminal as _, Write as _};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::verify::json_text;
use serde::{Deserialize, Serialize};

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

impl LogConfig {
    /// What serde cannot check, each problem naming its key.
    pub fn problems(&self) -> Vec<String> {
        match EnvFilter::try_new(&self.level) {
            Ok(_) => Vec::new(),
            Err(err) => vec![format!("log.level: {err}")],
        }
    }
}

/// Buffered lines are written once this much has gathered, whatever the runtime is doing.
const FLUSH_AT: usize = 16 * 1024;

static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Set once the JSON subscriber is installed: `RequestLine` then writes its line itself.
static JSON_REQUEST_LINES: AtomicBool = AtomicBool::new(false);

/// `RUST_LOG` wins over `log.level` when set.
pub fn init(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let _ = match config.format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(JsonLayer::new(append))
            .try_init()
            .map(|()| JSON_REQUEST_LINES.store(true, Ordering::Relaxed)),
        // Colours only for a terminal: escape codes would end up in a log collector's lines.
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stdout().is_terminal())
            .with_writer(Buffered)
            .finish()
            .try_init(),
    };
}

/// Writes the buffered lines to stdout. Runs whenever a runtime worker goes idle, and at exit.
pub fn flush() {
    write_out(&mut pending());
}

fn pending() -> std::sync::MutexGuard<'static, Vec<u8>> {
    PENDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Adds lines to `PENDING`; `urgent` (warnings and errors) writes them out at once.
fn append(lines: &[u8], urgent: bool) {
    let mut pending = pending();
    pending.extend_from_slice(lines);
    if urgent || pending.len() >= FLUSH_AT {
        write_out(&mut pending);
    }
}

fn write_out(pending: &mut Vec<u8>) {
    if pending.is_empty() {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    // A closed or full stdout must not stop the proxy; the lines are dropped, not kept growing.
    let _ = stdout.write_all(pending).and_then(|()| stdout.flush());
    pending.clear();
    if pending.capacity() > 4 * FLUSH_AT {
        pending.shrink_to(FLUSH_AT);
    }
}

fn is_urgent(meta: &Metadata<'_>) -> bool {
    *meta.level() <= Level::WARN
}

/// The text format's `MakeWriter` for `PENDING`.
struct Buffered;

struct BufferedLine {
    urgent: bool,
}

impl<'a> MakeWriter<'a> for Buffered {
    type Writer = BufferedLine;

    fn make_writer(&'a self) -> BufferedLine {
        BufferedLine { urgent: false }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> BufferedLine {
        BufferedLine {
            urgent: is_urgent(meta),
        }
    }
}

impl std::io::Write for BufferedLine {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        append(line, self.urgent);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

thread_local! {
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The line logged for every request (target `lfguard::request`, level INFO, message `request`).
#[derive(Debug, Clone, Copy)]
pub struct RequestLine<'a> {
    /// An outcome code from the error table: a fixed identifier, written without escaping.
    pub code: &'static str,
    pub status: u16,
    pub method: &'a str,
    pub path: &'a str,
    pub partner: &'a str,
    pub delivery_id: &'a str,
    pub key_id: &'a str,
    /// A fixed identifier like `code`, or empty.
    pub failure: &'static str,
    pub reason: &'a str,
    /// A socket address as `SocketAddr` displays it (digits, `.`, `:`, `[`, `]`, `%`): written
    /// without escaping.
    pub peer: &'a str,
    pub latency_ms: f64,
}

impl RequestLine<'_> {
    pub fn emit(&self) {
        if !tracing::enabled!(target: "lfguard::request", Level::INFO) {
            return;
        }
        if !JSON_REQUEST_LINES.load(Ordering::Relaxed) {
            return self.event();
        }
        with_line_buffer(|line| {
            self.write_json(line, SystemTime::now());
            append(line.as_bytes(), false);
        });
    }

    /// The line as a `tracing` event, for text logs (and any subscriber other than lfguard's).
    fn event(&self) {
        tracing::info!(
            target: "lfguard::request",
            code = self.code,
            status = self.status,
            method = self.method,
            path = self.path,
            partner = self.partner,
            delivery_id = self.delivery_id,
            key_id = self.key_id,
            failure = self.failure,
            reason = self.reason,
            peer = self.peer,
            latency_ms = self.latency_ms,
            "request"
        );
    }

    /// What `JsonLayer` writes for `event()`, key for key.
    fn write_json(&self, line: &mut String, now: SystemTime) {
        line.push_str("{\"timestamp\":\"");
        push_timestamp(line, now);
        line.push_str("\",\"level\":\"INFO\",\"message\":\"request\",\"code\":\"");
        line.push_str(self.code);
        line.push_str("\",\"status\":");
        line.push_str(itoa::Buffer::new().format(self.status));
        for (key, value) in [
            (",\"method\":", self.method),
            (",\"path\":", self.path),
            (",\"partner\":", self.partner),
            (",\"delivery_id\":", self.delivery_id),
            (",\"key_id\":", self.key_id),
            (",\"failure\":", self.failure),
            (",\"reason\":", self.reason),
        ] {
            line.push_str(key);
            push_json_str(line, value);
        }
        // A socket address: digits, dots, colons and brackets, nothing to escape.
        line.push_str(",\"peer\":\"");
        line.push_str(self.peer);
        line.push_str("\",\"latency_ms\":");
        push_millis(line, self.latency_ms);
        line.push_str(",\"target\":\"lfguard::request\"}\n");
    }
}

/// One JSON object per event: `timestamp`, `level`, the event's fields (including `message`) and
/// `target`, the keys of tracing-subscriber's flattened JSON. Spans are not used by lfguard.
/// Each line goes to `sink` with whether it is urgent.
pub struct JsonLayer<F> {
    sink: F,
}

impl<F: Fn(&[u8], bool) + 'static> JsonLayer<F> {
    pub fn new(sink: F) -> Self {
        JsonLayer { sink }
    }
}

impl<S: Subscriber, F: Fn(&[u8], bool) + 'static> Layer<S> for JsonLayer<F> {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        with_line_buffer(|line| {
            format_event(line, event, SystemTime::now());
            (self.sink)(line.as_bytes(), is_urgent(event.metadata()));
        });
    }
}

/// Runs `write` with this thread's line buffer, emptied. A field's Debug impl that logs would
/// find the buffer borrowed: it gets its own.
fn with_line_buffer(write: impl FnOnce(&mut String)) {
    LINE.with(|line| match line.try_borrow_mut() {
        Ok(mut line) => {
            line.clear();
            write(&mut line);
        }
        Err(_) => write(&mut String::new()),
    });
}

fn format_event(line: &mut String, event: &Event<'_>, now: SystemTime) {
    let meta = event.metadata();
    line.push_str("{\"timestamp\":\"");
    push_timestamp(line, now);
    line.push_str("\",\"level\":\"");
    line.push_str(meta.level().as_str());
    line.push('"');
    event.record(&mut JsonFields { line });
    line.push_str(",\"target\":");
    push_json_str(line, meta.target());
    line.push_str("}\n");
}

/// RFC 3339 in UTC with microseconds, e.g. `2026-11-25T13:45:12.123456Z`. The part up to the
/// second changes once a second, not once a line: it is kept per thread.
fn push_timestamp(line: &mut String, now: SystemTime) {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        let (cached_secs, up_to_second) = &mut *second;
        if *cached_secs != since_epoch.as_secs() {
            *cached_secs = since_epoch.as_secs();
            up_to_second.clear();
            push_up_to_second(up_to_second, since_epoch.as_secs());
        }
        line.push_str(up_to_second);
    });
    push_padded(line, since_epoch.subsec_micros(), 6);
    line.push('Z');
}

/// `2026-11-25T13:45:12.`
fn push_up_to_second(line: &mut String, secs: u64) {
    use chrono::{Datelike as _, Timelike as _};
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    let time = chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default();
    let parts = [
        (time.year().unsigned_abs(), 4, '-'),
        (time.month(), 2, '-'),
        (time.day(), 2, 'T'),
        (time.hour(), 2, ':'),
        (time.minute(), 2, ':'),
        (time.second(), 2, '.'),
    ];
    for (value, width, separator) in parts {
        push_padded(line, value, width);
        line.push(separator);
    }
}

/// `value` in decimal with leading zeros up to `width` digits.
fn push_padded(line: &mut String, value: u32, width: usize) {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(value);
    for _ in digits.len()..width {
        line.push('0');
    }
    line.push_str(digits);
}

/// Appends `,"name":value` for each field of an event.
struct JsonFields<'l> {
    line: &'l mut String,
}

impl JsonFields<'_> {
    fn key(&mut self, field: &Field) {
        self.line.push(',');
        push_json_str(self.line, field.name());
        self.line.push(':');
    }

    fn display(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        self.key(field);
        self.line.push('"');
        let _ = JsonEscaped(self.line).write_fmt(value);
        self.line.push('"');
    }
}

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        push_json_str(self.line, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.display(field, format_args!("{value:?}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.display(field, format_args!("{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        push_f64(self.line, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        self.line.push_str(itoa::Buffer::new().format(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        self.line.push_str(itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.line.push_str(if value { "true" } else { "false" });
    }
}

/// JSON has no NaN or infinity: those are written as `null`.
fn push_f64(line: &mut String, value: f64) {
    if value.is_finite() {
        line.push_str(ryu::Buffer::new().format_finite(value));
    } else {
        line.push_str("null");
    }
}

/// Milliseconds to the microsecond, written with integer formatting: the shortest-float printer
/// costs several times as much on every request line.
fn push_millis(line: &mut String, millis: f64) {
    if !(millis.is_finite() && (0.0..1e12).contains(&millis)) {
        return push_f64(line, millis);
    }
    let micros = (millis * 1000.0).round() as u64;
    line.push_str(itoa::Buffer::new().format(micros / 1000));
    let fraction = micros % 1000;
    line.push('.');
    if fraction < 100 {
        line.push('0');
    }
    if fraction < 10 {
        line.push('0');
    }
    line.push_str(itoa::Buffer::new().format(fraction));
}

fn push_json_str(line: &mut String, value: &str) {
    line.push('"');
    let _ = JsonEscaped(line).write_str(value);
    line.push('"');
}

/// Escapes what it is given as the inside of a JSON string (RFC 8259 §7).
struct JsonEscaped<'l>(&'l mut String);

impl fmt::Write for JsonEscaped<'_> {
    fn write_str(&mut self, mut text: &str) -> fmt::Result {
        loop {
            let plain = json_text::plain_prefix_len(text.as_bytes());
            self.0.push_str(&text[..plain]);
            let Some(&byte) = text.as_bytes().get(plain) else {
                return Ok(());
            };
            match byte {
                b'"' => self.0.push_str("\\\""),
                b'\\' => self.0.push_str("\\\\"),
                b'\n' => self.0.push_str("\\n"),
                b'\r' => self.0.push_str("\\r"),
                b'\t' => self.0.push_str("\\t"),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    self.0.push_str("\\u00");
                    self.0.push(char::from(HEX[usize::from(byte >> 4)]));
                    self.0.push(char::from(HEX[usize::from(byte & 0xf)]));
                }
            }
            // The byte escaped is ASCII, so the rest starts on a character boundary.
            text = &text[plain + 1..];
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    #[test]
    fn milliseconds_are_written_to_the_microsecond() {
        for (millis, written) in [
            (0.0, "0.000"),
            (0.125, "0.125"),
            (1.0005, "1.001"),
            (42.25, "42.250"),
            (1234.5678, "1234.568"),
            (0.0004, "0.000"),
            (-1.5, "-1.5"),
            (f64::NAN, "null"),
        ] {
            let mut line = String::new();
            push_millis(&mut line, millis);
            assert_eq!(line, written, "{millis}");
        }
    }

    /// The lines a `JsonLayer` produces for the events `emit` sends, with their urgency.
    fn json_lines(emit: impl FnOnce()) -> Vec<(Value, bool)> {
        let captured = Arc::new(Mutex::new(Vec::new()));
        let sink = captured.clone();
        let layer = JsonLayer::new(move |line: &[u8], urgent| {
            let line = std::str::from_utf8(line).unwrap();
            assert!(
                line.ends_with('\n') && line.matches('\n').count() == 1,
                "{line}"
            );
            let value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            sink.lock().unwrap().push((value, urgent));
        });
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), emit);
        Arc::try_unwrap(captured).unwrap().into_inner().unwrap()
    }

    #[test]
    fn events_are_json_objects_with_typed_fields() {
        let error = std::io::Error::other("disk \"full\"");
        let lines = json_lines(|| {
            tracing::info!(
                target: "lfguard::request",
                code = "forwarded",
                status = 200u16,
                offset = -3i64,
                latency_ms = 0.25,
                ratio = f64::NAN,
                kept = true,
                path = %"/cb?x=\"1\"",
                error = &error as &(dyn std::error::Error + 'static),
                "request"
            );
            tracing::warn!(what = ?"quoted", "line\nbreak");
        });
        assert_eq!(lines.len(), 2);
        let (request, urgent) = &lines[0];
        assert!(!urgent);
        assert_eq!(request["level"], "INFO");
        assert_eq!(request["target"], "lfguard::request");
        assert_eq!(request["message"], "request");
        assert_eq!(request["code"], "forwarded");
        assert_eq!(request["status"], 200);
        assert_eq!(request["offset"], -3);
        assert_eq!(request["latency_ms"], 0.25);
        assert_eq!(request["ratio"], Value::Null);
        assert_eq!(request["kept"], true);
        assert_eq!(request["path"], "/cb?x=\"1\"");
        assert_eq!(request["error"], "disk \"full\"");
        let timestamp = request["timestamp"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(timestamp).is_ok(),
            "{timestamp}"
        );
        let (warning, urgent) = &lines[1];
        assert!(urgent);
        assert_eq!(warning["level"], "WARN");
        assert_eq!(warning["message"], "line\nbreak");
        assert_eq!(warning["what"], "\"quoted\"");
    }

    #[test]
    fn the_request_line_is_the_event_json_layer_writes() {
        let request = RequestLine {
            code: "rejected_signature",
            status: 401,
            method: "POST",
            path: "/cb/\"quoted\"\\",
            partner: "P1",
            delivery_id: "d\u{1}-\u{e9}",
            key_id: "",
            failure: "",
            reason: "x-lf-md5 does not match\n",
            peer: "[::1]:4000",
            latency_ms: 0.125,
        };
        let mut line = String::new();
        request.write_json(&mut line, SystemTime::now());
        assert!(line.ends_with("}\n") && line.matches('\n').count() == 1);
        let written: Value = serde_json::from_str(&line).unwrap();
        let events = json_lines(|| request.event());
        let (event, urgent) = &events[0];
        assert!(!urgent);
        let keys =
            |value: &Value| -> Vec<String> { value.as_object().unwrap().keys().cloned().collect() };
        assert_eq!(keys(&written), keys(event));
        for key in keys(event).iter().filter(|key| *key != "timestamp") {
            assert_eq!(written[key], event[key], "{key}");
        }
        assert_eq!(written["path"], "/cb/\"quoted\"\\");
        assert_eq!(written["latency_ms"], 0.125);
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let mut out = String::new();
        let at = UNIX_EPOCH + std::time::Duration::new(1_795_000_000, 123_456_789);
        push_timestamp(&mut out, at);
        assert_eq!(out, "2026-11-18T11:06:40.123456Z");
        // The same second again, then the next one, a minute later and an hour earlier.
        for (secs, micros, expected) in [
            (1_795_000_000, 7, "2026-11-18T11:06:40.000007Z"),
            (1_795_000_001, 999_999, "2026-11-18T11:06:41.999999Z"),
            (1_795_000_060, 0, "2026-11-18T11:07:40.000000Z"),
            (1_794_996_400, 10, "2026-11-18T10:06:40.000010Z"),
        ] {
            out.clear();
            let at = UNIX_EPOCH + std::time::Duration::new(secs, micros * 1000);
            push_timestamp(&mut out, at);
            assert_eq!(out, expected);
        }
    }

    proptest! {
        #[test]
        fn any_string_survives_escaping(text in any::<String>()) {
            let mut out = String::new();
            push_json_str(&mut out, &text);
            let read: String = serde_json::from_str(&out).unwrap();
            prop_assert_eq!(read, text);
        }

        #[test]
        fn strings_dense_in_escapes_survive(text in "[\"\\\\\\x00-\\x1f a-z\\x7f\u{e9}\u{1f600}]{0,40}") {
            let mut out = String::new();
            push_json_str(&mut out, &text);
            let read: String = serde_json::from_str(&out).unwrap();
            prop_assert_eq!(read, text);
        }
    }
}
