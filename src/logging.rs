//! Structured logs with `tracing`: JSON lines by default (one event per request), or text.
//!
//! Both are on the hot path (one event per request), so two things are done by hand:
//! - `JsonLines` writes each event straight into tracing's line buffer; tracing-subscriber's own
//!   JSON layer builds a serde map per event and cost a tenth of lfguard's CPU under load.
//! - Lines gather in `PENDING` and reach stdout in one `write` when a runtime worker runs out of
//!   work (`flush`, installed as tokio's park hook), when `FLUSH_AT` bytes have gathered, and at
//!   once for warnings and errors. Under load that is one write per event-loop turn instead of one
//!   per request; a process killed with SIGKILL loses at most the lines of its current turn.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{LogConfig, LogFormat};

/// Buffered lines are written once this much has gathered, whatever the runtime is doing.
const FLUSH_AT: usize = 16 * 1024;

static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// `RUST_LOG` wins over `log.level` when set.
pub fn init(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Buffered);
    let _ = match config.format {
        LogFormat::Json => builder.event_format(JsonLines).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Writes the buffered lines to stdout. Runs whenever a runtime worker goes idle, and at exit.
pub fn flush() {
    let mut pending = PENDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    write_out(&mut pending);
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

/// The `MakeWriter` for `PENDING`: warnings and errors are written through at once.
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
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

impl std::io::Write for BufferedLine {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut pending = PENDING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pending.extend_from_slice(line);
        if self.urgent || pending.len() >= FLUSH_AT {
            write_out(&mut pending);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One JSON object per event: `timestamp`, `level`, the event's fields (including `message`) and
/// `target`, the same keys as tracing-subscriber's flattened JSON. Spans are not used by lfguard.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut writer, SystemTime::now())?;
        write!(writer, "\",\"level\":\"{}\"", meta.level())?;
        let mut fields = JsonFields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        write_json_str(&mut writer, meta.target())?;
        writer.write_str("}\n")
    }
}

/// RFC 3339 in UTC with microseconds, e.g. `2026-11-25T13:45:12.123456Z`.
fn write_timestamp(out: &mut impl fmt::Write, now: SystemTime) -> fmt::Result {
    use chrono::{Datelike as _, Timelike as _};
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX);
    let time = chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default();
    write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        time.year(),
        time.month(),
        time.day(),
        time.hour(),
        time.minute(),
        time.second(),
        since_epoch.subsec_micros()
    )
}

/// Appends `,"name":value` for each field of an event.
struct JsonFields<'w, W> {
    out: &'w mut W,
    result: fmt::Result,
}

impl<W: fmt::Write> JsonFields<'_, W> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            self.out.write_char(',')?;
            write_json_str(self.out, field.name())?;
            self.out.write_char(':')?;
            value(self.out)
        })();
    }
}

impl<W: fmt::Write> Visit for JsonFields<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out| write_json_str(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| {
            out.write_char('"')?;
            write!(JsonEscaped(out), "{value:?}")?;
            out.write_char('"')
        });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, |out| {
            if value.is_finite() {
                write!(out, "{value}")
            } else {
                out.write_str("null")
            }
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field, |out| {
            out.write_char('"')?;
            write!(JsonEscaped(out), "{value}")?;
            out.write_char('"')
        });
    }
}

fn write_json_str(out: &mut impl fmt::Write, value: &str) -> fmt::Result {
    out.write_char('"')?;
    JsonEscaped(out).write_str(value)?;
    out.write_char('"')
}

/// Escapes what it is given as the inside of a JSON string (RFC 8259 §7).
struct JsonEscaped<'w, W>(&'w mut W);

impl<W: fmt::Write> fmt::Write for JsonEscaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut plain_from = 0;
        for (at, byte) in text.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x00..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&text[plain_from..at])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain_from = at + 1;
        }
        self.0.write_str(&text[plain_from..])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    /// Collects what a subscriber using `JsonLines` writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn json_lines(emit: impl FnOnce()) -> Vec<Value> {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_writer(move || writer.clone())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
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
        let request = &lines[0];
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
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["message"], "line\nbreak");
        assert_eq!(lines[1]["what"], "\"quoted\"");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let mut out = String::new();
        let at = UNIX_EPOCH + std::time::Duration::new(1_795_000_000, 123_456_789);
        write_timestamp(&mut out, at).unwrap();
        assert_eq!(out, "2026-11-18T11:06:40.123456Z");
    }

    proptest! {
        #[test]
        fn any_string_survives_escaping(text in any::<String>()) {
            let mut out = String::new();
            write_json_str(&mut out, &text).unwrap();
            let read: String = serde_json::from_str(&out).unwrap();
            prop_assert_eq!(read, text);
        }
    }
}
