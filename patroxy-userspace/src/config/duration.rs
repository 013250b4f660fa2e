//! Durations as the config file writes them: humantime strings ("4s", "30m", "1h30m", "250ms")
//! or a bare integer of milliseconds, HAProxy's unit-less default, so values can be copied from an
//! haproxy.cfg unchanged. Parsing happens inside deserialization so toml attaches the position of
//! the bad value to the error.
use std::{fmt, time::Duration};

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A duration read from the config; zero is accepted here and refused by validation, which knows
/// which settings may be zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dur(pub Duration);

const HINT: &str =
    "write a duration like \"4s\", \"30m\", \"1h30m\", \"250ms\" or an integer of milliseconds";

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DurVisitor)
    }
}

struct DurVisitor;

impl Visitor<'_> for DurVisitor {
    type Value = Dur;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration string or an integer of milliseconds")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| E::custom(format!("invalid duration `{s}`: {e}; {HINT}")))
    }

    fn visit_i64<E: de::Error>(self, ms: i64) -> Result<Dur, E> {
        u64::try_from(ms)
            .map(|ms| Dur(Duration::from_millis(ms)))
            .map_err(|_| E::custom(format!("invalid duration {ms}: negative; {HINT}")))
    }

    fn visit_u64<E: de::Error>(self, ms: u64) -> Result<Dur, E> {
        Ok(Dur(Duration::from_millis(ms)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct T {
        d: Dur,
    }

    fn parse(value: &str) -> Result<Duration, String> {
        toml::from_str::<T>(&format!("d = {value}"))
            .map(|t| t.d.0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_humantime_and_milliseconds() {
        assert_eq!(parse("\"4s\""), Ok(Duration::from_secs(4)));
        assert_eq!(parse("\"30m\""), Ok(Duration::from_secs(1800)));
        assert_eq!(parse("\"1h30m\""), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("\"250ms\""), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1500"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn refuses_bad_units_negative_and_other_types() {
        assert!(
            parse("\"30x\"")
                .unwrap_err()
                .contains("invalid duration `30x`")
        );
        assert!(parse("-5").unwrap_err().contains("negative"));
        assert!(parse("1.5").is_err());
        assert!(parse("true").is_err());
    }
}
