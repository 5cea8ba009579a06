//! Freshness of a callback's signed timestamp. Pure: the caller passes the time the
//! request arrived, so a slow request is judged by when Linksfield sent it, not by our delays.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, NaiveDateTime};

use crate::verify::signature::Value;

/// Why a timestamp was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staleness {
    Unreadable,
    TooOld,
    TooNew,
}

/// Epoch values with at least this many digits are milliseconds: 10^11 seconds is the year 5138,
/// 10^11 milliseconds is 1973.
const MILLIS_DIGITS: usize = 12;

/// Reads a timestamp member: epoch ms or s (string or number), RFC 3339,
/// `YYYY-MM-DDTHHMMSS` or `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn parse(value: &Value<'_>) -> Option<SystemTime> {
    let text: &str = match value {
        Value::Str(s) => s,
        Value::Token(t) => t,
        Value::Nested(_) | Value::Null => return None,
    };
    let text = text.trim();
    if let Some(number) = digits(text) {
        let since_epoch = if text.len() >= MILLIS_DIGITS {
            Duration::from_millis(number)
        } else {
            Duration::from_secs(number)
        };
        return UNIX_EPOCH.checked_add(since_epoch);
    }
    let seconds_and_nanos = if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        (at.timestamp(), at.timestamp_subsec_nanos())
    } else {
        let naive = ["%Y-%m-%dT%H%M%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"]
            .iter()
            .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())?
            .and_utc();
        (naive.timestamp(), naive.timestamp_subsec_nanos())
    };
    let (seconds, nanos) = seconds_and_nanos;
    let seconds = u64::try_from(seconds).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

/// A number written in ASCII digits only (the common case, read in one pass); `None` for anything
/// else, an empty text, or a number beyond `u64` (which no timestamp is).
fn digits(text: &str) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.bytes().try_fold(0u64, |number, byte| {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        number.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Checks `sent` against the arrival time.
pub fn check(
    value: &Value<'_>,
    arrived: SystemTime,
    max_age: Duration,
    max_skew: Duration,
) -> Result<(), Staleness> {
    let sent = parse(value).ok_or(Staleness::Unreadable)?;
    match arrived.duration_since(sent) {
        Ok(age) if age > max_age => Err(Staleness::TooOld),
        Ok(_) => Ok(()),
        Err(ahead) if ahead.duration() > max_skew => Err(Staleness::TooNew),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn s(text: &str) -> Value<'_> {
        Value::Str(Cow::Borrowed(text))
    }

    #[test]
    fn every_accepted_format() {
        // 2022-01-17T02:06:00Z, the seed's example instant.
        let expected = at(1_642_385_160);
        for value in [
            s("1642385160000"),
            Value::Token("1642385160000"),
            s("1642385160"),
            Value::Token("1642385160"),
            s("2022-01-17T02:06:00Z"),
            s("2022-01-17T10:06:00+08:00"),
            s("2022-01-17T020600"),
            s("2022-01-17 02:06:00"),
            s("2022-01-17T02:06:00"),
        ] {
            assert_eq!(parse(&value), Some(expected), "{value:?}");
        }
        assert_eq!(
            parse(&s("2022-01-17T02:06:00.250Z")),
            Some(expected + Duration::from_millis(250))
        );
    }

    #[test]
    fn unreadable_values() {
        for value in [
            s(""),
            s("yesterday"),
            s("2022-13-01 00:00:00"),
            s("-1642385160"),
            Value::Token("1.5"),
            Value::Token("true"),
            Value::Null,
            Value::Nested("{}".into()),
            s("99999999999999999999999"),
        ] {
            assert_eq!(parse(&value), None, "{value:?}");
        }
    }

    #[test]
    fn window_edges() {
        let arrived = at(1_000_000);
        let hour = Duration::from_secs(3600);
        let minute = Duration::from_secs(60);
        let check_at =
            |sent: u64| check(&Value::Token(&sent.to_string()), arrived, hour, minute).map(|_| ());
        let ok: Result<(), Staleness> = Ok(());
        assert_eq!(check_at(1_000_000), ok);
        assert_eq!(check_at(1_000_000 - 3600), ok);
        assert_eq!(check_at(1_000_000 - 3601), Err(Staleness::TooOld));
        assert_eq!(check_at(1_000_060), ok);
        assert_eq!(check_at(1_000_061), Err(Staleness::TooNew));
    }
}
