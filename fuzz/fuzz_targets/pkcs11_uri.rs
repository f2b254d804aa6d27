//! The RFC 7512 parser (`keys::pkcs11::Pkcs11Uri::parse`) and the key URI
//! check every configured or stored key name goes through (`keys::KeyUri::parse`).
//! Properties: never panics; deterministic; an accepted URI prints to text that
//! parses back to the same URI (with the PIN replaced by `REDACTED`) and prints
//! the same again; the printed (Display, Debug, redacted) forms do not depend on
//! the PIN at all; a PIN put into any input never shows in a printed URI or in
//! an error message, of either parser.
#![no_main]

use dps_agent::keys::pkcs11::{Pkcs11Uri, QueryAttr};
use dps_agent::keys::{Backend, KeyUri};
use libfuzzer_sys::fuzz_target;

const SCHEME: &str = "pkcs11:";
const PIN_ATTR: &str = "pin-value";
/// Stands for a PIN in the inputs this target makes.
const MARK: &str = "PINMARK";

/// `s` with the value of every attribute named `pin-value` (in the path or in
/// the query, split the way RFC 7512 splits them) replaced by `with`. None when
/// `s` is not a pkcs11: URI.
fn replace_pins(s: &str, with: &str) -> Option<String> {
    let rest = match s.get(..SCHEME.len()) {
        Some(p) if p.eq_ignore_ascii_case(SCHEME) => &s[SCHEME.len()..],
        _ => return None,
    };
    let attrs = |component: &str, sep: char| -> String {
        component
            .split(sep)
            .map(|part| match part.split_once('=') {
                Some((PIN_ATTR, _)) => format!("{PIN_ATTR}={with}"),
                _ => part.to_string(),
            })
            .collect::<Vec<_>>()
            .join(&sep.to_string())
    };
    let mut out = s[..SCHEME.len()].to_string();
    match rest.split_once('?') {
        Some((path, query)) => {
            out.push_str(&attrs(path, ';'));
            out.push('?');
            out.push_str(&attrs(query, '&'));
        }
        None => out.push_str(&attrs(rest, ';')),
    }
    Some(out)
}

/// Percent-decodes what decodes, keeps the rest (to see whether an input
/// already spells the marker).
fn lossy_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let Some(v) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn printed(u: &Pkcs11Uri) -> [String; 3] {
    [u.to_string(), format!("{u:?}"), u.to_redacted_string()]
}

fn check_pkcs11(s: &str) {
    let parsed = Pkcs11Uri::parse(s);
    assert_eq!(parsed, Pkcs11Uri::parse(s), "not deterministic");
    let Ok(uri) = parsed else {
        return;
    };
    let shown = uri.to_string();
    assert_eq!(shown, uri.to_redacted_string());
    assert_eq!(format!("{uri:?}"), format!("Pkcs11Uri({shown})"));
    assert_eq!(uri.query_text(&QueryAttr::PinValue), None);
    // Display/parse round trip.
    let back = Pkcs11Uri::parse(&shown)
        .unwrap_or_else(|e| panic!("{s:?} prints as {shown:?}, which does not parse: {e}"));
    assert_eq!(back.to_string(), shown, "printing is not stable");
    match uri.pin_value() {
        None => assert_eq!(back, uri, "{s:?} -> {shown:?}"),
        Some(_) => assert_eq!(back.pin_value(), Some(&b"REDACTED"[..])),
    }
    // The printed forms do not depend on the PIN: the same URI with another
    // PIN prints the same, and equals what the printed text parses to.
    let other = replace_pins(s, "REDACTED").expect("a parsed URI has the scheme");
    let other = Pkcs11Uri::parse(&other)
        .unwrap_or_else(|e| panic!("{s:?} with another PIN ({other:?}) does not parse: {e}"));
    assert_eq!(
        printed(&other),
        printed(&uri),
        "the printed form depends on the PIN"
    );
    assert_eq!(other, back);
}

fn check_key_uri(s: &str) {
    let Ok(k) = KeyUri::parse(s) else {
        return;
    };
    assert_eq!(k.as_str(), s);
    assert_eq!(k.to_string(), k.redacted());
    assert_eq!(format!("{k:?}"), format!("KeyUri({})", k.redacted()));
    assert!(KeyUri::parse(k.as_str()).is_ok_and(|again| again == k));
    let backend = match s.split_once(':').map(|(scheme, _)| scheme) {
        Some("tpm") => Backend::Tpm,
        Some("pkcs11") => Backend::Pkcs11,
        _ => Backend::File,
    };
    assert_eq!(k.backend(), backend);
    if let Some(p) = k.path() {
        assert!(p.is_absolute());
    }
    // The redacted form does not depend on the PIN.
    if let Some(other) = replace_pins(s, "REDACTED") {
        if let Ok(other) = KeyUri::parse(&other) {
            assert_eq!(
                other.redacted(),
                k.redacted(),
                "{s:?}: the redacted key URI depends on the PIN"
            );
        }
    }
}

/// The input with a marked PIN as its first query attribute: the marker shows
/// in nothing either parser prints, accepted or refused.
fn check_marked_pin(s: &str) {
    if !s.starts_with(SCHEME) || s.contains(MARK) || lossy_decode(s).contains(MARK) {
        return;
    }
    let rest = &s[SCHEME.len()..];
    let marked = match rest.split_once('?') {
        Some((path, "")) => format!("{SCHEME}{path}?{PIN_ATTR}={MARK}"),
        Some((path, query)) => format!("{SCHEME}{path}?{PIN_ATTR}={MARK}&{query}"),
        None => format!("{SCHEME}{rest}?{PIN_ATTR}={MARK}"),
    };
    match Pkcs11Uri::parse(&marked) {
        Ok(u) => {
            for shown in printed(&u) {
                assert!(!shown.contains(MARK), "the PIN shows: {shown}");
            }
        }
        Err(e) => assert!(!e.to_string().contains(MARK), "the PIN shows: {e}"),
    }
    match KeyUri::parse(&marked) {
        Ok(k) => {
            for shown in [k.to_string(), format!("{k:?}"), k.redacted()] {
                assert!(!shown.contains(MARK), "the PIN shows: {shown}");
            }
        }
        Err(e) => assert!(!e.to_string().contains(MARK), "the PIN shows: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    check_pkcs11(s);
    check_key_uri(s);
    check_marked_pin(s);
});
