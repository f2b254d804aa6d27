//! Wall-clock time and human durations. Owns the [`Clock`] seam (so schedules and
//! backoff are tested without sleeping), RFC 3339 formatting, and the `"7d"` /
//! `"12h"` duration syntax used in the config file and printed back the same way.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (UTC).
pub type UnixTime = i64;

/// A source of wall-clock time.
pub trait Clock: Send + Sync {
    /// Unix milliseconds.
    fn now_ms(&self) -> i64;

    /// Unix seconds.
    fn now(&self) -> UnixTime {
        self.now_ms().div_euclid(1000)
    }
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// The current wall-clock time, Unix seconds.
pub fn now() -> UnixTime {
    now_ms().div_euclid(1000)
}

/// The current wall-clock time, Unix milliseconds.
pub fn now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// Formats Unix seconds as RFC 3339 UTC, e.g. `2026-11-23T00:40:10Z`.
pub fn rfc3339(t: UnixTime) -> String {
    match time::OffsetDateTime::from_unix_timestamp(t) {
        Ok(dt) => {
            let f =
                time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
            dt.format(&f).unwrap_or_else(|_| t.to_string())
        }
        Err(_) => format!("@{t}"),
    }
}

/// A duration as written in the config file: a whole number followed by a unit,
/// `s`, `m`, `h` or `d` (`"90s"`, `"15m"`, `"12h"`, `"7d"`). Several parts may be
/// combined (`"1d12h"`). Displays back in the same syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn from_secs(s: u64) -> Self {
        HumanDuration(Duration::from_secs(s))
    }

    pub fn as_secs(self) -> u64 {
        self.0.as_secs()
    }

    /// Parses the config syntax; the error says what is accepted.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err("empty duration; write e.g. \"7d\", \"12h\", \"30m\" or \"90s\"".into());
        }
        let mut total: u64 = 0;
        let mut digits = String::new();
        for c in t.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let unit = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                _ => {
                    return Err(format!(
                        "unknown unit {c:?}; use s, m, h or d (e.g. \"7d\", \"12h\")"
                    ))
                }
            };
            let n: u64 = digits
                .parse()
                .map_err(|_| "a unit must follow a number, e.g. \"7d\"".to_string())?;
            digits.clear();
            total = n
                .checked_mul(unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| "duration is too large".to_string())?;
        }
        if !digits.is_empty() {
            return Err(format!(
                "{t:?} has no unit; write e.g. \"{digits}s\" or \"{digits}d\""
            ));
        }
        Ok(HumanDuration(Duration::from_secs(total)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = self.0.as_secs();
        if s == 0 {
            return f.write_str("0s");
        }
        for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
            if s >= n {
                write!(f, "{}{unit}", s / n)?;
                s %= n;
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        HumanDuration::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip() {
        for (s, secs) in [
            ("7d", 604_800),
            ("12h", 43_200),
            ("45s", 45),
            ("1d12h", 129_600),
            ("0s", 0),
        ] {
            let d = HumanDuration::parse(s).unwrap();
            assert_eq!(d.as_secs(), secs, "{s}");
            assert_eq!(d.to_string(), s);
        }
        assert_eq!(HumanDuration::parse("90m").unwrap().to_string(), "1h30m");
        assert_eq!(HumanDuration::parse("90s").unwrap().to_string(), "1m30s");
        for bad in ["", "7", "7w", "d", "-1d", "99999999999999999999d"] {
            assert!(HumanDuration::parse(bad).is_err(), "{bad}");
        }
        assert!(HumanDuration::parse("7").unwrap_err().contains("\"7s\""));
    }

    #[test]
    fn rfc3339_format() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_394_410), "2026-11-23T00:40:10Z");
    }
}
