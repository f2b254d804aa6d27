//! When to renew and when to retry: pure functions of the certificate's dates,
//! the policy and the current time (passed in, never read here), so every rule
//! has a fast deterministic test.
//!
//! Renewal: at `notAfter − min(renew_before, lifetime/3)` minus a random jitter
//! of up to `min(renew_jitter, lifetime/20)`. A certificate already past that
//! point, expired, or not yet valid beyond the allowed skew is renewed at once.
//! Retries: exponential backoff with full jitter up to the cap; DPS's
//! retry-after wins; a fatal answer waits the cap rather than looping.

use std::time::Duration;

use crate::config::OperationalConfig;

use crate::store::lifecycle::Schedule;

/// Longest retry-after honoured (a bogus value cannot park the device for a year).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// First retry delay after a transient failure (or `retry_max` if smaller).
const FIRST_RETRY: Duration = Duration::from_secs(10);

/// The renewal and retry policy, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub renew_before_ms: i64,
    pub jitter_max_ms: i64,
    pub retry_max_ms: i64,
    pub skew_ms: i64,
}

impl Policy {
    pub fn from_config(o: &OperationalConfig) -> Policy {
        let ms = |d: crate::clock::HumanDuration| (d.as_secs() as i64).saturating_mul(1000);
        Policy {
            renew_before_ms: ms(o.renew_before),
            jitter_max_ms: ms(o.renew_jitter),
            retry_max_ms: ms(o.retry_max).max(1000),
            skew_ms: ms(o.max_clock_skew),
        }
    }
}

/// The renewal point before jitter, and the largest jitter, for a certificate.
pub fn window(not_before: i64, not_after: i64, p: &Policy) -> (i64, i64) {
    let lifetime_ms = (not_after - not_before).max(0).saturating_mul(1000);
    let before = p.renew_before_ms.min(lifetime_ms / 3);
    let jitter_cap = p.jitter_max_ms.min(lifetime_ms / 20).max(0);
    (not_after.saturating_mul(1000) - before, jitter_cap)
}

/// The schedule of a certificate; `draw(cap)` returns a jitter in `0..=cap`.
pub fn schedule(
    thumbprint: &str,
    not_before: i64,
    not_after: i64,
    p: &Policy,
    draw: impl FnOnce(i64) -> i64,
) -> Schedule {
    let (base, cap) = window(not_before, not_after, p);
    let jitter = draw(cap).clamp(0, cap);
    Schedule {
        thumbprint: thumbprint.to_string(),
        renew_at_ms: base - jitter,
        jitter_ms: jitter,
    }
}

/// A uniformly random jitter in `0..=cap`.
pub fn random_jitter(cap: i64) -> i64 {
    if cap <= 0 {
        0
    } else {
        rand::random_range(0..=cap)
    }
}

/// Why a certificate must be renewed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Its renewal time has come.
    Scheduled,
    /// It has expired.
    Expired,
    /// Its notBefore is further in the future than the allowed skew.
    NotYetValid,
}

/// Whether a certificate is due for renewal at `now_ms`.
pub fn due(
    now_ms: i64,
    not_before: i64,
    not_after: i64,
    renew_at_ms: i64,
    p: &Policy,
) -> Option<Due> {
    if now_ms >= not_after.saturating_mul(1000) {
        Some(Due::Expired)
    } else if not_before.saturating_mul(1000) > now_ms + p.skew_ms {
        Some(Due::NotYetValid)
    } else if now_ms >= renew_at_ms {
        Some(Due::Scheduled)
    } else {
        None
    }
}

/// How an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A retry may work by itself (network, throttling, server errors).
    Transient,
    /// Something must change first (credentials refused, enrollment disabled,
    /// a bad certificate issued): retry slowly, at the cap.
    Fatal,
}

/// The delay before the next attempt after `failures` consecutive failures
/// (counting this one). `draw(lo, hi)` returns a value in `lo..=hi`.
pub fn retry_delay(
    failures: u32,
    kind: FailureKind,
    retry_after: Option<Duration>,
    p: &Policy,
    draw: impl FnOnce(i64, i64) -> i64,
) -> Duration {
    if let Some(ra) = retry_after {
        return ra.min(MAX_RETRY_AFTER);
    }
    let cap = p.retry_max_ms.max(1);
    let ceiling = match kind {
        FailureKind::Fatal => cap,
        FailureKind::Transient => {
            let first = (FIRST_RETRY.as_millis() as i64).min(cap);
            let factor = 1i64
                .checked_shl(failures.saturating_sub(1).min(30))
                .unwrap_or(i64::MAX);
            first.saturating_mul(factor).min(cap)
        }
    };
    // Full jitter, with a floor of a tenth so a retry is never immediate; a
    // fatal answer waits at least half the cap.
    let lo = match kind {
        FailureKind::Fatal => ceiling / 2,
        FailureKind::Transient => ceiling / 10,
    };
    Duration::from_millis(draw(lo, ceiling).clamp(lo, ceiling).max(1) as u64)
}

/// A uniformly random value in `lo..=hi`.
pub fn random_between(lo: i64, hi: i64) -> i64 {
    if hi <= lo {
        lo
    } else {
        rand::random_range(lo..=hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3600;
    const D: i64 = 86_400;

    fn policy() -> Policy {
        Policy {
            renew_before_ms: 7 * D * 1000,
            jitter_max_ms: 6 * H * 1000,
            retry_max_ms: H * 1000,
            skew_ms: 300_000,
        }
    }

    /// (renewal point before jitter, jitter cap) relative to notAfter, in seconds.
    fn rel(lifetime: i64) -> (i64, i64) {
        let (base, cap) = window(0, lifetime, &policy());
        ((lifetime * 1000 - base) / 1000, cap / 1000)
    }

    #[test]
    fn formula_for_1_7_30_90_day_certificates() {
        // 1 day: a third of the lifetime (8 h) before expiry, jitter up to 1/20 (72 min).
        assert_eq!(rel(D), (8 * H, 72 * 60));
        // 7 days: a third (56 h), jitter capped by renew_jitter (6 h).
        assert_eq!(rel(7 * D), (56 * H, 6 * H));
        // 30 and 90 days: renew_before (7 d), jitter 6 h.
        assert_eq!(rel(30 * D), (7 * D, 6 * H));
        assert_eq!(rel(90 * D), (7 * D, 6 * H));
    }

    #[test]
    fn jitter_only_moves_renewal_earlier() {
        let p = policy();
        let s = schedule("T", 0, 30 * D, &p, |cap| cap);
        assert_eq!(s.renew_at_ms, (23 * D - 6 * H) * 1000);
        assert_eq!(s.jitter_ms, 6 * H * 1000);
        let s = schedule("T", 0, 30 * D, &p, |_| 0);
        assert_eq!(s.renew_at_ms, 23 * D * 1000);
        // a draw outside the range is clamped
        let s = schedule("T", 0, 30 * D, &p, |_| -5);
        assert_eq!(s.jitter_ms, 0);
        for _ in 0..100 {
            let s = schedule("T", 0, D, &p, random_jitter);
            assert!((0..=72 * 60 * 1000).contains(&s.jitter_ms));
        }
    }

    #[test]
    fn short_lived_certificates_scale_down() {
        // 30 s: renew 10 s before expiry, jitter up to 1.5 s.
        let (base, cap) = window(100, 130, &policy());
        assert_eq!((base, cap), (120_000, 1_500));
        // degenerate dates never produce a renewal time after expiry
        let (base, cap) = window(200, 100, &policy());
        assert_eq!((base, cap), (100_000, 0));
    }

    #[test]
    fn due_rules_and_skew() {
        let p = policy();
        let (nb, na) = (1000, 1000 + 30 * D);
        let renew_at = (na - 7 * D) * 1000;
        assert_eq!(due(nb * 1000, nb, na, renew_at, &p), None);
        assert_eq!(due(renew_at - 1, nb, na, renew_at, &p), None);
        assert_eq!(due(renew_at, nb, na, renew_at, &p), Some(Due::Scheduled));
        assert_eq!(due(na * 1000, nb, na, renew_at, &p), Some(Due::Expired));
        // notBefore 4 minutes ahead: within the 5-minute skew
        assert_eq!(due((nb - 240) * 1000, nb, na, renew_at, &p), None);
        // 10 minutes ahead: beyond it
        assert_eq!(
            due((nb - 600) * 1000, nb, na, renew_at, &p),
            Some(Due::NotYetValid)
        );
    }

    #[test]
    fn backoff_bounds() {
        let p = policy();
        let hi = |n, k| retry_delay(n, k, None, &p, |_, hi| hi).as_secs();
        let lo = |n, k| retry_delay(n, k, None, &p, |lo, _| lo).as_secs();
        assert_eq!(hi(1, FailureKind::Transient), 10);
        assert_eq!(lo(1, FailureKind::Transient), 1);
        assert_eq!(hi(2, FailureKind::Transient), 20);
        assert_eq!(hi(5, FailureKind::Transient), 160);
        assert_eq!(hi(9, FailureKind::Transient), 2560);
        assert_eq!(hi(10, FailureKind::Transient), 3600);
        assert_eq!(hi(60, FailureKind::Transient), 3600);
        // fatal answers wait between half the cap and the cap, from the first failure
        assert_eq!(hi(1, FailureKind::Fatal), 3600);
        assert_eq!(lo(1, FailureKind::Fatal), 1800);
        for n in 1..40 {
            let d = retry_delay(n, FailureKind::Transient, None, &p, random_between);
            assert!(d <= Duration::from_secs(3600) && d >= Duration::from_millis(1000));
        }
    }

    #[test]
    fn retry_after_wins_but_is_bounded() {
        let p = policy();
        let d = retry_delay(
            1,
            FailureKind::Transient,
            Some(Duration::from_secs(7200)),
            &p,
            |_, h| h,
        );
        assert_eq!(
            d,
            Duration::from_secs(7200),
            "retry-after beyond the cap is honoured"
        );
        let d = retry_delay(
            1,
            FailureKind::Transient,
            Some(Duration::from_secs(10 * D as u64)),
            &p,
            |_, h| h,
        );
        assert_eq!(d, MAX_RETRY_AFTER);
    }

    #[test]
    fn small_caps_for_tests_and_labs() {
        let p = Policy {
            retry_max_ms: 3000,
            ..policy()
        };
        assert_eq!(
            retry_delay(1, FailureKind::Transient, None, &p, |_, h| h),
            Duration::from_secs(3)
        );
        assert_eq!(
            retry_delay(1, FailureKind::Fatal, None, &p, |l, _| l),
            Duration::from_millis(1500)
        );
    }
}
