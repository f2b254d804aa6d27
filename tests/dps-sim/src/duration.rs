//! Human durations for the command line (`30s`, `15m`, `12h`, `30d`). A value prints back
//! exactly as it is written, so errors and events show what the user typed.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A whole number of seconds, minutes, hours or days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration {
    amount: u64,
    unit: Unit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Seconds,
    Minutes,
    Hours,
    Days,
}

impl Unit {
    fn suffix(self) -> &'static str {
        match self {
            Unit::Seconds => "s",
            Unit::Minutes => "m",
            Unit::Hours => "h",
            Unit::Days => "d",
        }
    }

    fn seconds(self) -> u64 {
        match self {
            Unit::Seconds => 1,
            Unit::Minutes => 60,
            Unit::Hours => 3600,
            Unit::Days => 86_400,
        }
    }
}

impl HumanDuration {
    pub fn as_duration(self) -> Duration {
        Duration::from_secs(self.as_secs())
    }

    pub fn as_secs(self) -> u64 {
        // Parsing guarantees this does not overflow.
        self.amount.saturating_mul(self.unit.seconds())
    }
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason}; write a whole number followed by s, m, h or d, e.g. 30s, 15m, 12h, 30d")]
pub struct DurationError {
    pub input: String,
    pub reason: &'static str,
}

/// Longest accepted duration: 100 years, far beyond any certificate the tests need.
const MAX_SECS: u64 = 100 * 366 * 86_400;

impl FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| DurationError {
            input: s.to_string(),
            reason,
        };
        let text = s.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| err("the unit is missing"))?;
        let (digits, suffix) = text.split_at(split);
        if digits.is_empty() {
            return Err(err("the number is missing"));
        }
        let unit = match suffix {
            "s" => Unit::Seconds,
            "m" => Unit::Minutes,
            "h" => Unit::Hours,
            "d" => Unit::Days,
            _ => return Err(err("unknown unit")),
        };
        let amount: u64 = digits.parse().map_err(|_| err("the number is too large"))?;
        if amount == 0 {
            return Err(err("the duration must be greater than zero"));
        }
        match amount.checked_mul(unit.seconds()) {
            Some(secs) if secs <= MAX_SECS => Ok(HumanDuration { amount, unit }),
            _ => Err(err("longer than 100 years")),
        }
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.amount, self.unit.suffix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit_and_prints_back() {
        for (text, secs) in [
            ("30s", 30),
            ("15m", 900),
            ("12h", 43_200),
            ("30d", 2_592_000),
        ] {
            let d: HumanDuration = text.parse().unwrap();
            assert_eq!(d.as_secs(), secs, "{text}");
            assert_eq!(d.to_string(), text);
            assert_eq!(d.as_duration(), Duration::from_secs(secs));
        }
    }

    #[test]
    fn refuses_bad_input() {
        for text in [
            "",
            "30",
            "d",
            "0s",
            "-5s",
            "1.5h",
            "5 m",
            "5min",
            "10y",
            "1e3s",
            "99999999999d",
        ] {
            let e = text.parse::<HumanDuration>().unwrap_err();
            assert!(e.to_string().contains("e.g. 30s"), "{text}: {e}");
        }
    }
}
