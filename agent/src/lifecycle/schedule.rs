//! When to renew and when to retry: pure functions of the certificate's dates,
//! the policy and the current time (passed in, never read here), so every rule
//! has a fast deterministic test.
//!
//! Renewal: at `notAfter − min(renew_before, left/3)` minus a random jitter of
//! up to `min(renew_jitter, left/20)`, where `left` is the validity left when
//! the certificate arrived (CAs backdate `notBefore`; what counts is what is
//! left). A certificate already past that point, expired, or not yet valid
//! beyond the allowed skew is renewed at once, but never sooner than a floor
//! after it arrived: half of `left`, at least [`MIN_RENEWAL_INTERVAL_MS`], so
//! no answer of a CA can make a renewal storm.
//! Retries: exponential backoff with full jitter up to the cap; DPS's
//! retry-after wins; a fatal answer waits the cap rather than looping.

use std::time::Duration;

use crate::config::OperationalConfig;

use crate::store::lifecycle::Schedule;

/// Longest retry-after honoured (a bogus value cannot park the device for a year).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// First retry delay after a transient failure (or `retry_max` if smaller).
const FIRST_RETRY: Duration = Duration::from_secs(10);
/// The least time between receiving a certificate and the renewal it causes.
pub const MIN_RENEWAL_INTERVAL_MS: i64 = 10_000;

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

/// Where a certificate's validity starts counting for the schedule: its
/// `notBefore`, or the time it arrived if that is later (a backdated one).
pub fn start_of(not_before: i64, not_after: i64, issued_at: i64) -> i64 {
    not_before.max(issued_at.min(not_after))
}

/// The renewal point before jitter, and the largest jitter, for a certificate
/// whose validity counts from `start` (see [`start_of`]).
pub fn window(start: i64, not_after: i64, p: &Policy) -> (i64, i64) {
    let lifetime_ms = not_after.saturating_sub(start).max(0).saturating_mul(1000);
    let before = p.renew_before_ms.min(lifetime_ms / 3);
    let jitter_cap = p.jitter_max_ms.min(lifetime_ms / 20).max(0);
    (
        not_after.saturating_mul(1000).saturating_sub(before),
        jitter_cap,
    )
}

/// The earliest time (ms) a certificate that arrived at `issued_at` may be
/// renewed: half the validity it had left, and at least 10 s.
pub fn earliest_renewal(issued_at: i64, not_after: i64) -> i64 {
    let left_ms = not_after
        .saturating_sub(issued_at)
        .max(0)
        .saturating_mul(1000);
    issued_at
        .saturating_mul(1000)
        .saturating_add((left_ms / 2).max(MIN_RENEWAL_INTERVAL_MS))
}

/// The schedule of a certificate that arrived at `issued_at`; `draw(cap)`
/// returns a jitter in `0..=cap`. Never earlier than [`earliest_renewal`].
pub fn schedule(
    thumbprint: &str,
    not_before: i64,
    not_after: i64,
    issued_at: i64,
    p: &Policy,
    draw: impl FnOnce(i64) -> i64,
) -> Schedule {
    let (base, cap) = window(start_of(not_before, not_after, issued_at), not_after, p);
    let jitter = draw(cap).clamp(0, cap);
    Schedule {
        thumbprint: thumbprint.to_string(),
        renew_at_ms: base
            .saturating_sub(jitter)
            .max(earliest_renewal(issued_at, not_after)),
        jitter_ms: jitter,
    }
}

/// Whether the floor of [`earliest_renewal`] decides the schedule of this
/// certificate: the CA issues certificates whose validity left is shorter
/// than the renewal window (worth a warning, once per certificate).
pub fn floor_binds(not_before: i64, not_after: i64, issued_at: i64, p: &Policy) -> bool {
    let (base, cap) = window(start_of(not_before, not_after, issued_at), not_after, p);
    base.saturating_sub(cap) < earliest_renewal(issued_at, not_after)
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

/// Whether a certificate is due for renewal at `now_ms`. Before
/// `earliest_ms` (see [`earliest_renewal`]) nothing is due, whatever the dates.
pub fn due(
    now_ms: i64,
    not_before: i64,
    not_after: i64,
    renew_at_ms: i64,
    earliest_ms: i64,
    p: &Policy,
) -> Option<Due> {
    if now_ms < earliest_ms {
        None
    } else if now_ms >= not_after.saturating_mul(1000) {
        Some(Due::Expired)
    } else if not_before.saturating_mul(1000) > now_ms.saturating_add(p.skew_ms) {
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
    if let Some(ra) = retry_after {
        // Honoured, bounded, and never below the backoff's floor (a
        // retry-after of 0 must not make the next attempt immediate).
        return ra
            .min(MAX_RETRY_AFTER)
            .max(Duration::from_millis(lo.max(1) as u64));
    }
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
        let s = schedule("T", 0, 30 * D, 0, &p, |cap| cap);
        assert_eq!(s.renew_at_ms, (23 * D - 6 * H) * 1000);
        assert_eq!(s.jitter_ms, 6 * H * 1000);
        let s = schedule("T", 0, 30 * D, 0, &p, |_| 0);
        assert_eq!(s.renew_at_ms, 23 * D * 1000);
        // a draw outside the range is clamped
        let s = schedule("T", 0, 30 * D, 0, &p, |_| -5);
        assert_eq!(s.jitter_ms, 0);
        for _ in 0..100 {
            let s = schedule("T", 0, D, 0, &p, random_jitter);
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
        let e = i64::MIN;
        assert_eq!(due(nb * 1000, nb, na, renew_at, e, &p), None);
        assert_eq!(due(renew_at - 1, nb, na, renew_at, e, &p), None);
        assert_eq!(due(renew_at, nb, na, renew_at, e, &p), Some(Due::Scheduled));
        assert_eq!(due(na * 1000, nb, na, renew_at, e, &p), Some(Due::Expired));
        // notBefore 4 minutes ahead: within the 5-minute skew
        assert_eq!(due((nb - 240) * 1000, nb, na, renew_at, e, &p), None);
        // 10 minutes ahead: beyond it
        assert_eq!(
            due((nb - 600) * 1000, nb, na, renew_at, e, &p),
            Some(Due::NotYetValid)
        );
        // Before the floor nothing is due, not even an expired certificate.
        let floor = na * 1000 + 1;
        assert_eq!(due(na * 1000, nb, na, renew_at, floor, &p), None);
        assert_eq!(due(floor, nb, na, renew_at, floor, &p), Some(Due::Expired));
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
        // 0 (or any value under the backoff's floor) waits the floor.
        for (failures, floor) in [(1, 1), (2, 2), (5, 16), (30, 360)] {
            let d = retry_delay(
                failures,
                FailureKind::Transient,
                Some(Duration::ZERO),
                &p,
                |_, h| h,
            );
            assert_eq!(d, Duration::from_secs(floor), "{failures}");
        }
        let d = retry_delay(1, FailureKind::Fatal, Some(Duration::ZERO), &p, |_, h| h);
        assert_eq!(d, Duration::from_secs(1800));
        let d = retry_delay(1, FailureKind::Transient, Some(Duration::MAX), &p, |_, h| h);
        assert_eq!(d, MAX_RETRY_AFTER);
    }

    /// Defect 7 of issue 15: a CA that backdates notBefore (valid from 60 s
    /// ago to 30 s from now) made the agent renew at once, again and again.
    #[test]
    fn a_backdated_certificate_is_scheduled_from_what_is_left_with_a_floor() {
        let p = policy();
        let now = 1_000_000;
        let (nb, na) = (now - 60, now + 30);
        for draw in [0, i64::MAX] {
            let s = schedule("T", nb, na, now, &p, |_| draw);
            // A third of the 30 s left before expiry, less up to 1.5 s of
            // jitter; not at once, and not before the floor (half of it).
            assert!(
                ((now + 18) * 1000 + 500..=(now + 20) * 1000).contains(&s.renew_at_ms),
                "{s:?}"
            );
            let earliest = earliest_renewal(now, na);
            for t in [now, now + 1, now + 14] {
                assert_eq!(
                    due(t * 1000, nb, na, s.renew_at_ms, earliest, &p),
                    None,
                    "{t}"
                );
            }
            assert_eq!(
                due(s.renew_at_ms, nb, na, s.renew_at_ms, earliest, &p),
                Some(Due::Scheduled)
            );
            assert_eq!(
                due((now + 30) * 1000, nb, na, s.renew_at_ms, earliest, &p),
                Some(Due::Expired)
            );
        }
        // Already expired on arrival: nothing before the 10 s minimum.
        let (nb, na) = (now - 60, now - 1);
        assert!(floor_binds(nb, na, now, &p));
        let s = schedule("T", nb, na, now, &p, |_| 0);
        assert_eq!(s.renew_at_ms, now * 1000 + MIN_RENEWAL_INTERVAL_MS);
        let earliest = earliest_renewal(now, na);
        assert_eq!(
            due((now + 9) * 1000, nb, na, s.renew_at_ms, earliest, &p),
            None
        );
        assert_eq!(
            due((now + 10) * 1000, nb, na, s.renew_at_ms, earliest, &p),
            Some(Due::Expired)
        );
        // 30-day certificate backdated by 29 days: one day left; renewal a
        // third of it before expiry (not at once), and the floor is half a day.
        let (nb, na) = (now - 29 * D, now + D);
        let s = schedule("T", nb, na, now, &p, |_| 0);
        assert_eq!(s.renew_at_ms, (na - 8 * H) * 1000);
        assert!(!floor_binds(nb, na, now, &p));
        assert_eq!(earliest_renewal(now, na), (now + D / 2) * 1000);
        // Normal certificates never meet the floor.
        for life in [D, 7 * D, 30 * D, 90 * D, 120] {
            assert!(!floor_binds(now, now + life, now, &p), "{life}");
        }
        // A certificate from the future counts from its notBefore.
        assert_eq!(start_of(now + 100, now + 200, now), now + 100);
        // Extreme dates neither panic nor schedule before the floor.
        for (nb, na) in [
            (i64::MIN, i64::MAX),
            (i64::MAX, i64::MIN),
            (0, 0),
            (-1, 253_402_300_799),
        ] {
            let s = schedule("T", nb, na, now, &p, |c| c);
            assert!(
                s.renew_at_ms >= now * 1000 + MIN_RENEWAL_INTERVAL_MS,
                "{nb} {na}"
            );
            let _ = due(0, nb, na, s.renew_at_ms, earliest_renewal(now, na), &p);
        }
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
