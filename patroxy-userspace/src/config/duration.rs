//! Durations as the config file writes them: humantime strings ("4s", "30m", "1h30m", "250ms")
//! or a bare integer of milliseconds, HAProxy's unit-less default, so values can be copied from an
//! haproxy.cfg unchanged. Parsing happens inside deserialization so toml attaches the position of
//! the bad value to the error.
use std::{fmt, time::Duration};

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A duration read from the config; zero is accepted here and refused by validation, which knows
/// which settings may be zero and how short each may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dur(pub Duration);

/// The longest duration accepted anywhere: 2^31-1 ms (24.8 days), HAProxy's own limit. Without
/// one, "3000000000000000h" parsed and then overflowed every deadline computed from it (a panic
/// in each client session, or in the checker).
pub(crate) const MAX: Duration = Duration::from_millis(i32::MAX as u64);

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
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| E::custom(format!("invalid duration `{s}`: {e}; {HINT}")))?;
        at_most_max(d, format_args!("`{s}`"))
    }

    fn visit_i64<E: de::Error>(self, ms: i64) -> Result<Dur, E> {
        let ms = u64::try_from(ms)
            .map_err(|_| E::custom(format!("invalid duration {ms}: negative; {HINT}")))?;
        self.visit_u64(ms)
    }

    fn visit_u64<E: de::Error>(self, ms: u64) -> Result<Dur, E> {
        at_most_max(Duration::from_millis(ms), ms)
    }
}

fn at_most_max<E: de::Error>(d: Duration, written: impl fmt::Display) -> Result<Dur, E> {
    if d > MAX {
        return Err(E::custom(format!(
            "invalid duration {written}: longer than the most, {} (2^31-1 ms, as in HAProxy)",
            humantime::format_duration(MAX)
        )));
    }
    Ok(Dur(d))
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

    #[test]
    fn refuses_what_would_overflow_a_deadline() {
        assert_eq!(
            parse("2147483647"),
            Ok(Duration::from_millis(2_147_483_647))
        );
        assert_eq!(
            parse("\"24days 20h 31m 23s 647ms\""),
            Ok(Duration::from_millis(2_147_483_647))
        );
        for too_long in ["2147483648", "\"25d\"", "\"3000000000000000h\""] {
            let err = parse(too_long).unwrap_err();
            assert!(err.contains("longer than the most"), "{too_long}: {err}");
        }
    }
}
