//! Durations as lfguard reads and writes them. Read in humantime's syntax (`15s`, `1h 30m`,
//! `1day 1h`); written everywhere (effective config, messages, logs) in one short form: hours,
//! minutes, seconds, milliseconds, microseconds and nanoseconds, largest first, no spaces, zero
//! parts left out (`25h`, `1m30s`, `1s500ms`). The short form reads back to the same duration.
//!
//! Use as `#[serde(with = "crate::verify::duration")]` on a `Duration` field.

use std::fmt;
use std::time::Duration;

use serde::{Deserializer, Serializer, de};

/// The units of the short form, largest first, in nanoseconds. Hours are the largest: a day is
/// written `24h`, so the shipped values (`24h`, `25h`) read back as written.
const UNITS: [(&str, u128); 6] = [
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Displays a duration in the short form: `Short(Duration::from_secs(90))` is `1m30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short(pub Duration);

impl fmt::Display for Short {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0.as_nanos();
        if rest == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in UNITS {
            let count = rest / size;
            if count > 0 {
                write!(f, "{count}{unit}")?;
                rest -= count * size;
            }
        }
        Ok(())
    }
}

/// Reads a duration as a configuration value is written: `90s`, `1m30s`, `1h 30m`, `1day 1h`.
pub fn parse(text: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(text)
}

/// Serde: writes the short form.
pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&Short(*duration))
}

/// Serde: reads a string in humantime's syntax.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    struct Visitor;

    impl de::Visitor<'_> for Visitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"90s\", \"5m\" or \"25h\"")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            parse(text).map_err(|err| {
                E::custom(format_args!(
                    "not a duration ({err}); write durations like \"90s\", \"5m\" or \"25h\""
                ))
            })
        }
    }

    deserializer.deserialize_str(Visitor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_short_form_puts_the_largest_units_first() {
        for (duration, written) in [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(25 * 3600), "25h"),
            (Duration::from_secs(24 * 3600 + 300), "24h5m"),
            (Duration::from_secs(5400), "1h30m"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1500), "1s500ms"),
            (Duration::from_secs(3601), "1h1s"),
            (Duration::new(1, 1), "1s1ns"),
            (Duration::from_micros(2), "2us"),
        ] {
            assert_eq!(Short(duration).to_string(), written);
        }
    }

    #[test]
    fn what_users_write_reads_as_expected() {
        for (written, seconds) in [
            ("1day 1h", 25 * 3600),
            ("25h", 25 * 3600),
            ("90s", 90),
            ("1h 30m", 5400),
            ("1h30m", 5400),
        ] {
            assert_eq!(
                parse(written),
                Ok(Duration::from_secs(seconds)),
                "{written}"
            );
        }
        assert!(parse("soon").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn serde_writes_the_short_form_and_reads_it_back() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Holder {
            #[serde(with = "super")]
            window: Duration,
        }
        let holder: Holder = toml::from_str("window = \"1day 1h\"").unwrap();
        assert_eq!(holder.window, Duration::from_secs(25 * 3600));
        let written = toml::to_string(&holder).unwrap();
        assert_eq!(written.trim(), "window = \"25h\"");
        assert_eq!(toml::from_str::<Holder>(&written).unwrap(), holder);
        let err = toml::from_str::<Holder>("window = \"soon\"").unwrap_err();
        assert!(err.message().contains("not a duration"), "{err}");
        let err = toml::from_str::<Holder>("window = 30").unwrap_err();
        assert!(err.message().contains("a duration such as"), "{err}");
    }

    proptest! {
        /// Up to about 30 years with nanoseconds (within humantime's u64 nanoseconds).
        #[test]
        fn the_short_form_reads_back_to_the_same_duration(
            secs in 0u64..1_000_000_000,
            nanos in 0u32..1_000_000_000,
        ) {
            let duration = Duration::new(secs, nanos);
            let written = Short(duration).to_string();
            prop_assert_eq!(parse(&written), Ok(duration), "{}", written);
        }

        #[test]
        fn whole_seconds_read_back_too(secs in 0u64..u64::MAX / 3_600) {
            let duration = Duration::from_secs(secs);
            let written = Short(duration).to_string();
            prop_assert_eq!(parse(&written), Ok(duration), "{}", written);
        }
    }
}
