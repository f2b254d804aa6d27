//! Retry delays: exponential backoff with full jitter (a random delay between 0
//! and the current ceiling, the ceiling doubling up to a cap), so a fleet that
//! failed together does not retry together. A server's retry-after always wins.

use std::time::Duration;

/// Exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    /// Starts at `base`, doubling per failure, never above `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base: base.max(Duration::from_millis(1)),
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// The ceiling for the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u64.checked_shl(self.failures.min(40)).unwrap_or(u64::MAX);
        let ms = (self.base.as_millis() as u64).saturating_mul(factor);
        Duration::from_millis(ms).min(self.cap)
    }

    /// Records a failure and returns how long to wait: uniformly random in
    /// `[ceiling/10, ceiling]` (a small floor so a retry is never immediate).
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let hi = ceiling.as_millis() as u64;
        let lo = hi / 10;
        Duration::from_millis(if hi > lo {
            rand::random_range(lo..=hi)
        } else {
            hi
        })
    }

    /// Number of failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Forgets past failures (after a success).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_stays_within_bounds() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut ceilings = Vec::new();
        for _ in 0..50 {
            let c = b.ceiling();
            let d = b.next_delay();
            assert!(d <= c, "{d:?} > {c:?}");
            assert!(d >= c / 10, "{d:?} below floor of {c:?}");
            ceilings.push(c.as_secs());
        }
        assert_eq!(&ceilings[..7], &[1, 2, 4, 8, 16, 32, 60]);
        assert!(ceilings.iter().all(|&c| c <= 60));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
            seen.insert(b.next_delay().as_millis());
        }
        assert!(seen.len() > 10, "delays should differ: {seen:?}");
    }
}
