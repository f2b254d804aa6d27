//! Every number a server sends, in every place it can arrive (issue 15):
//! retry-after as a DPS topic property (`dps::wire::parse_response_topic`), as
//! an HTTP `Retry-After` header value and as `retryAfter` in an error body
//! (`parse_error_body`, `retry_after_json`), all through
//! `dps::wire::retry_after_secs`; `operationExpires` and the registration
//! dates of a reply (`parse_reply`); `errorCode`; the twin `$version`
//! (`hub::parse_twin_response`); and certificate dates, as the renewal
//! schedule (`lifecycle::schedule`) and the messages (`clock::rfc3339`) see
//! them.
//!
//! Input: the text of one number as a server would send it ("0", "-1", "abc",
//! "18446744073709551615", "1e30", ...). The same bytes, read as little-endian
//! i64 words, also give a certificate's notBefore/notAfter, its arrival time,
//! the current time, a jitter draw and a policy, so the schedule sees every
//! date, extremes included.
//!
//! Properties: nothing panics and every result is deterministic; a retry-after
//! is the number of seconds the text says, rounded up, clamped to
//! `MAX_RETRY_AFTER_SECS` (24 h), and None when negative, non-numeric or not
//! finite, the same whether it came in a topic, a header, a JSON number or a
//! JSON string; `operationExpires` and the registration dates never change a
//! reply; a schedule is never before its floor (10 s after arrival at least),
//! its jitter stays within the cap, `floor_binds` and `due` agree with it; a
//! retry delay with a retry-after is at most a day (or the configured cap) and
//! is the retry-after itself when that is at least the cap.
#![no_main]

use std::time::Duration;

use dps_agent::clock::rfc3339;
use dps_agent::dps::wire::{
    parse_error_body, parse_reply, parse_response_topic, retry_after_json, retry_after_secs,
    url_encode, Reply, MAX_RETRY_AFTER_SECS,
};
use dps_agent::dps::DpsError;
use dps_agent::hub::parse_twin_response;
use dps_agent::lifecycle::schedule::{
    due, earliest_renewal, floor_binds, retry_delay, schedule, start_of, window, Due, FailureKind,
    Policy, MIN_RENEWAL_INTERVAL_MS,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

const MAX: u64 = MAX_RETRY_AFTER_SECS;
const DAY: Duration = Duration::from_secs(MAX_RETRY_AFTER_SECS);
/// A current time (2026-05-28) and the range of dates an X.509 certificate can
/// carry (1950-01-01 to 9999-12-31T23:59:59Z).
const NOW: i64 = 1_780_000_000;
const X509_FIRST: i64 = -631_152_000;
const X509_LAST: i64 = 253_402_300_799;

/// The shipped config's policy (`config/config.toml`): 7d, 6h, 1h, 5m.
const SHIPPED: Policy = Policy {
    renew_before_ms: 7 * 86_400_000,
    jitter_max_ms: 6 * 3_600_000,
    retry_max_ms: 3_600_000,
    skew_ms: 300_000,
};

/// What a retry-after text means, written from the documented contract rather
/// than from the code: whole seconds (any number of digits, a long one is
/// simply "very long"), or a decimal number rounded up; at most a day;
/// negative, non-numeric and non-finite values mean nothing.
fn expected_secs(text: &str) -> Option<u64> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        let digits = t.trim_start_matches('0');
        return Some(if digits.len() > 6 {
            MAX
        } else {
            digits.parse::<u64>().unwrap_or(0).min(MAX)
        });
    }
    let f: f64 = t.parse().ok()?;
    if !f.is_finite() || f < 0.0 {
        None
    } else if f >= MAX as f64 {
        Some(MAX)
    } else {
        Some(f.ceil() as u64)
    }
}

/// The meaning of a JSON `retryAfter`: a number means what its text means, a
/// string what its content means, anything else nothing.
fn expected_json(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => expected_secs(&n.to_string()),
        Value::String(s) => expected_secs(s),
        _ => None,
    }
}

fn check_retry_after_text(text: &str) {
    let want = expected_secs(text);
    let got = retry_after_secs(text);
    assert_eq!(got, want, "retry-after {text:?}");
    assert_eq!(got, retry_after_secs(text), "not deterministic");
    assert!(got.is_none_or(|s| s <= MAX), "{got:?} above the clamp");
    // Padding does not change it.
    assert_eq!(retry_after_secs(&format!(" \t{text} ")), want, "{text:?}");

    // As a topic property, URL-encoded the way a server may send it.
    let topic = format!(
        "$dps/registrations/res/429/?$rid=1&retry-after={}",
        url_encode(text)
    );
    let t = parse_response_topic(&topic).expect("a 429 reply topic");
    assert_eq!((t.status, t.rid.as_deref()), (429, Some("1")), "{topic}");
    assert_eq!(t.retry_after, want, "{topic}");
    // As written, when nothing in it needs encoding.
    if !text.contains(['&', '%', '+', '#']) {
        let topic = format!("$dps/registrations/res/429/?retry-after={text}&$rid=1");
        let t = parse_response_topic(&topic).expect("a 429 reply topic");
        assert_eq!(t.retry_after, want, "{topic}");
    }

    // As an HTTP header value: `dps::https` takes `HeaderValue::to_str` (only
    // visible ASCII, space and tab), trims it, drops an empty one and calls
    // `retry_after_secs`; that function is private, its steps are these.
    if text
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        let header = Some(text.trim())
            .filter(|v| !v.is_empty())
            .and_then(retry_after_secs);
        assert_eq!(header, want, "Retry-After: {text:?}");
    }

    // As a JSON string in an error body.
    let body = json!({"errorCode": 429001, "retryAfter": text}).to_string();
    let e = parse_error_body(429, None, body.as_bytes());
    assert_eq!(e.retry_after, want, "{body}");
    assert_eq!(e.error_code, Some(429001), "{body}");
    // A retry-after from the topic or header wins over the body's.
    let e = parse_error_body(429, Some(7), body.as_bytes());
    assert_eq!(e.retry_after, Some(7), "{body}");

    // What the DPS client hands to the scheduler.
    let e = parse_error_body(429, want, b"");
    let ra = DpsError::Service(e).retry_after();
    assert_eq!(ra, want.map(Duration::from_secs));
    assert!(ra.is_none_or(|d| d <= DAY), "{ra:?}");
}

/// `text` as a raw JSON value (a number, a string, null, ...), when it is one.
fn check_json_value(text: &str, v: &Value) {
    let want = expected_json(v);
    assert_eq!(retry_after_json(v), want, "retryAfter {text}");
    assert!(want.is_none_or(|s| s <= MAX));
    let body = format!("{{\"errorCode\": 429001, \"retryAfter\": {text}}}");
    let e = parse_error_body(429, None, body.as_bytes());
    assert_eq!(e.retry_after, want, "{body}");
    assert_eq!(e, parse_error_body(429, None, body.as_bytes()));

    // errorCode: an integer is taken as it is, anything else is no code.
    let body = format!("{{\"errorCode\": {text}}}");
    let e = parse_error_body(400, None, body.as_bytes());
    let code = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse::<i64>().ok(),
        _ => None,
    };
    assert_eq!(e.error_code, code, "{body}");
}

/// `operationExpires` and the dates of a registration are not used: whatever
/// their value (`raw` is JSON text), the reply means what it means without them.
fn check_operation_expires(raw: &str, retry_after: Option<u64>) {
    let assigning = format!(
        "{{\"operationId\": \"op\", \"status\": \"assigning\", \"operationExpires\": {raw}}}"
    );
    let want = Ok(Reply::Assigning {
        operation_id: "op".into(),
        retry_after,
    });
    for status in [200, 202] {
        let r = parse_reply(status, retry_after, assigning.as_bytes());
        assert_eq!(r, want, "{status} {assigning}");
    }
    let state = |dates: &str| {
        format!(
            "{{\"operationId\": \"op\", \"status\": \"assigned\"{dates}, \"registrationState\": \
             {{\"registrationId\": \"r\", \"assignedHub\": \"hub.example.net\", \
             \"deviceId\": \"d\", \"status\": \"assigned\"{dates}}}}}"
        )
    };
    let plain = parse_reply(200, retry_after, state("").as_bytes());
    assert!(matches!(plain, Ok(Reply::Assigned(_))), "{plain:?}");
    let with = state(&format!(
        ", \"operationExpires\": {raw}, \"createdDateTimeUtc\": {raw}, \
         \"lastUpdatedDateTimeUtc\": {raw}"
    ));
    assert_eq!(
        parse_reply(200, retry_after, with.as_bytes()),
        plain,
        "{with}"
    );
}

/// A certificate valid from `nb` to `na` (Unix seconds) that arrived at
/// `issued`, checked at `now_ms`, with a jitter draw of `draw`.
fn check_schedule(nb: i64, na: i64, issued: i64, now_ms: i64, draw: i64, p: &Policy) {
    let earliest = earliest_renewal(issued, na);
    let issued_ms = issued.saturating_mul(1000);
    let na_ms = na.saturating_mul(1000);
    assert!(
        earliest >= issued_ms.saturating_add(MIN_RENEWAL_INTERVAL_MS),
        "floor {earliest} under 10 s after arrival {issued}"
    );
    let start = start_of(nb, na, issued);
    assert!(start >= nb, "start {start} before notBefore {nb}");
    if nb <= issued && issued <= na {
        assert_eq!(start, issued);
    }
    let (base, cap) = window(start, na, p);
    assert!(
        (0..=p.jitter_max_ms.max(0)).contains(&cap),
        "jitter cap {cap}"
    );
    assert!(base <= na_ms, "renewal point {base} after expiry {na_ms}");
    // Never more than a third of the lifetime before expiry (dates small
    // enough for the arithmetic to be exact).
    let small = |x: i64| x.unsigned_abs() < 1_000_000_000_000_000;
    if small(start) && small(na) && p.renew_before_ms >= 0 {
        let life_ms = (na - start).max(0) * 1000;
        assert!(
            base >= na_ms - life_ms / 3,
            "renewal {base} earlier than a third of {life_ms} ms before {na_ms}"
        );
    }
    let s = schedule("T", nb, na, issued, p, |c| {
        assert_eq!(c, cap, "draw asked for another cap");
        draw
    });
    assert_eq!(
        s,
        schedule("T", nb, na, issued, p, |_| draw),
        "not deterministic"
    );
    assert_eq!(s.thumbprint, "T");
    assert!(
        (0..=cap).contains(&s.jitter_ms),
        "jitter {} over {cap}",
        s.jitter_ms
    );
    assert!(
        s.renew_at_ms >= earliest,
        "{s:?} before the floor {earliest}"
    );
    assert!(
        s.renew_at_ms <= base.max(earliest),
        "{s:?} later than the renewal point {base}"
    );
    let binds = floor_binds(nb, na, issued, p);
    let latest = schedule("T", nb, na, issued, p, |c| c);
    if binds {
        assert_eq!(latest.renew_at_ms, earliest, "floor_binds but {latest:?}");
    } else {
        assert_eq!(latest.renew_at_ms, base.saturating_sub(cap), "{latest:?}");
    }

    // due: nothing before the floor; at its time a renewal is due; each
    // reason is true of the dates.
    let at = |now: i64| due(now, nb, na, s.renew_at_ms, earliest, p);
    assert!(at(s.renew_at_ms).is_some(), "{s:?} not due at its own time");
    for now in [now_ms, earliest.saturating_sub(1), i64::MIN, i64::MAX] {
        let d = at(now);
        assert_eq!(d, at(now), "not deterministic");
        if now < earliest {
            assert_eq!(d, None, "due at {now}, before the floor {earliest}");
            continue;
        }
        match d {
            Some(Due::Expired) => assert!(now >= na_ms),
            Some(Due::NotYetValid) => {
                assert!(nb.saturating_mul(1000) > now.saturating_add(p.skew_ms))
            }
            Some(Due::Scheduled) => assert!(now >= s.renew_at_ms),
            None => assert!(now < s.renew_at_ms && now < na_ms, "{now} {s:?}"),
        }
    }
}

/// The delay the scheduler waits after a failure that came with `retry_after`.
fn check_retry_delay(retry_after: Option<Duration>, p: &Policy) {
    let cap = Duration::from_millis(p.retry_max_ms.max(1) as u64);
    for failures in [0, 1, 2, 31, u32::MAX] {
        for kind in [FailureKind::Transient, FailureKind::Fatal] {
            let d = retry_delay(failures, kind, retry_after, p, |_, hi| hi);
            assert_eq!(d, retry_delay(failures, kind, retry_after, p, |_, hi| hi));
            assert!(d >= Duration::from_millis(1), "{d:?}");
            assert!(d <= DAY.max(cap), "{d:?} for retry-after {retry_after:?}");
            if let Some(ra) = retry_after {
                // Never below the backoff's floor, whatever the draw.
                assert_eq!(d, retry_delay(failures, kind, retry_after, p, |lo, _| lo));
                if ra >= cap && cap <= DAY {
                    assert_eq!(d, ra.min(DAY), "retry-after {ra:?} not honoured");
                }
            }
        }
    }
}

fn check_dates_text(n: i64, p: &Policy) {
    let values = [
        n,
        n.saturating_neg(),
        n.saturating_add(1),
        0,
        -1,
        NOW,
        X509_FIRST,
        X509_LAST,
        i64::MIN,
        i64::MAX,
    ];
    for &nb in &values {
        for &na in &values {
            for issued in [NOW, n] {
                check_schedule(nb, na, issued, n.saturating_mul(1000), n, p);
            }
        }
    }
}

fn check_rfc3339(t: i64) {
    let s = rfc3339(t);
    assert_eq!(s, rfc3339(t));
    if (-62_135_596_800..=X509_LAST).contains(&t) {
        // 0001-01-01 to 9999-12-31: a date, as in the chain errors.
        assert_eq!(s.len(), 20, "{t}: {s:?}");
        assert!(s.ends_with('Z') && s.as_bytes()[10] == b'T', "{t}: {s:?}");
    } else {
        assert!(!s.is_empty() && s.is_ascii() && !s.contains(char::is_control));
    }
}

/// The input as one integer, the way a date or a count would be read:
/// saturated to i64, or a finite decimal cut to an integer.
fn as_i64(text: &str) -> Option<i64> {
    let t = text.trim();
    if let Ok(n) = t.parse::<i128>() {
        return Some(n.clamp(i64::MIN as i128, i64::MAX as i128) as i64);
    }
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        // Beyond i128: as far as it goes.
        return Some(if t.starts_with('-') {
            i64::MIN
        } else {
            i64::MAX
        });
    }
    t.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(|f| f as i64)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_retry_after_text(text);
        if let Ok(v) = serde_json::from_str::<Value>(text) {
            check_json_value(text, &v);
            check_operation_expires(text, expected_secs(text));
        }
        check_operation_expires(&json!(text).to_string(), None);

        // The twin's $version: a u64 as written, or nothing.
        let topic = format!("$iothub/twin/res/204/?$rid=1&$version={}", url_encode(text));
        let t = parse_twin_response(&topic).expect("a twin topic");
        assert_eq!(t.version, text.parse::<u64>().ok(), "{topic}");

        let secs = retry_after_secs(text).map(Duration::from_secs);
        check_retry_delay(secs, &SHIPPED);
        // Unclamped, as a caller that forgot the clamp would pass it.
        if let Ok(raw) = text.trim().parse::<u64>() {
            check_retry_delay(Some(Duration::from_secs(raw)), &SHIPPED);
        }
        if let Some(n) = as_i64(text) {
            check_rfc3339(n);
            check_dates_text(n, &SHIPPED);
        }
    }

    // The raw bytes as i64 words: dates, times, a draw and a policy.
    let word = |i: usize, default: i64| {
        data.get(i * 8..)
            .filter(|r| !r.is_empty())
            .map(|r| {
                let mut b = [0u8; 8];
                let k = r.len().min(8);
                b[..k].copy_from_slice(&r[..k]);
                i64::from_le_bytes(b)
            })
            .unwrap_or(default)
    };
    // Config durations: zero up to a century, retry_max at least 1 s (as
    // `Policy::from_config` makes it).
    let century_ms = 100 * 365 * 86_400_000i64;
    let dur = |w: i64| w.rem_euclid(century_ms);
    let p = Policy {
        renew_before_ms: dur(word(5, SHIPPED.renew_before_ms)),
        jitter_max_ms: dur(word(6, SHIPPED.jitter_max_ms)),
        retry_max_ms: dur(word(7, SHIPPED.retry_max_ms)).max(1000),
        skew_ms: dur(word(8, SHIPPED.skew_ms)),
    };
    let (nb, na, issued) = (word(0, NOW), word(1, NOW + 30 * 86_400), word(2, NOW));
    let (now_ms, draw) = (word(3, NOW * 1000), word(4, 0));
    for policy in [&SHIPPED, &p] {
        check_schedule(nb, na, issued, now_ms, draw, policy);
        check_retry_delay(Some(Duration::from_secs(word(9, 0) as u64)), policy);
        check_retry_delay(None, policy);
    }
    for t in [nb, na, issued] {
        check_rfc3339(t);
    }
});
