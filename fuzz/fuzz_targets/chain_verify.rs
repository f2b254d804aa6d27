//! `chain::verify` over a list of DER blobs chosen by the fuzzer.
//! Input: one flag byte (bit 0: require_issuer; bits 1-2: expected common name:
//! none, the CN of the chosen certificate, or "gw-0001"), one byte choosing the
//! blob whose SubjectPublicKeyInfo is expected (the blob's own bytes when it is
//! not a certificate), 8 bytes of `now` (big-endian Unix seconds), then the
//! blobs separated by `SEP`.
//! Properties: never panics; deterministic; on Ok, `certs[0]` is a received
//! certificate holding the expected key, every certificate returned was
//! received, dates and common name hold, the thumbprint is the leaf's, and
//! verifying the returned chain again gives the same chain with nothing ignored;
//! the PEM form reads back to the same DER.
#![no_main]

use dps_agent::chain::{certs_from_pem, spki_of, thumbprint, verify, Expectations};
use libfuzzer_sys::fuzz_target;
use x509_cert::der::Decode;
use x509_cert::Certificate;

/// Separates the DER blobs in the input.
const SEP: &[u8] = b"8<--8<";
const SKEW: u64 = 300;

fn split(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(i) = data.windows(SEP.len()).position(|w| w == SEP) {
        out.push(data[..i].to_vec());
        data = &data[i + SEP.len()..];
    }
    out.push(data.to_vec());
    out
}

fn common_name(der: &[u8]) -> Option<String> {
    dps_agent::chain::common_name(&Certificate::from_der(der).ok()?)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let flags = data[0];
    let chosen = data[1] as usize;
    let now = i64::from_be_bytes(data[2..10].try_into().unwrap());
    let blobs = split(&data[10..]);
    let chosen = &blobs[chosen % blobs.len()];
    let spki = spki_of(chosen).unwrap_or_else(|| chosen.clone());
    let cn = match (flags >> 1) & 3 {
        1 => common_name(chosen),
        2 => Some("gw-0001".to_string()),
        _ => None,
    };
    let want = Expectations {
        leaf_spki: &spki,
        common_name: cn.as_deref(),
        now,
        max_skew_secs: SKEW,
        require_issuer: flags & 1 == 1,
    };
    let result = verify(&blobs, &want);
    assert_eq!(result, verify(&blobs, &want), "not deterministic");
    let Ok(v) = result else {
        return;
    };

    // The leaf comes first and holds the expected key.
    assert!(!v.certs.is_empty());
    assert_eq!(spki_of(&v.certs[0]).as_deref(), Some(&spki[..]));
    assert_eq!(v.thumbprint, thumbprint(&v.certs[0]));
    if let Some(cn) = &cn {
        assert_eq!(common_name(&v.certs[0]).as_ref(), Some(cn));
    }
    // Nothing was made up: every certificate was received, the rest is counted.
    for c in &v.certs {
        assert!(blobs.contains(c), "a certificate that was not received");
    }
    assert_eq!(v.certs.len() + v.ignored, blobs.len());
    if want.require_issuer {
        assert!(
            v.certs.len() >= 2 || v.ends_in_root,
            "the leaf has no issuer"
        );
    }
    // Dates.
    assert!(now < v.not_after, "expired");
    assert!(
        v.not_before <= now.saturating_add(SKEW as i64),
        "not yet valid"
    );
    // What is presented is the chain less a root.
    let presented = v.presented();
    assert!(!presented.is_empty() && v.certs.starts_with(presented));
    // The checked chain passes again, unchanged.
    let again = verify(&v.certs, &want).expect("the verified chain does not verify again");
    assert_eq!(again.certs, v.certs);
    assert_eq!(again.ignored, 0);
    assert_eq!(again.ends_in_root, v.ends_in_root);
    // The PEM form reads back.
    assert_eq!(certs_from_pem(&v.to_pem()).as_ref(), Ok(&v.certs));
});
