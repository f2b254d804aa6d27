//! `chain::certs_from_pem`: PEM bundles (the bootstrap chain, the stored chain).
//! Properties: never panics; deterministic; what it reads, written back with
//! `certs_to_pem`, reads back to the same DER; every block it read had a
//! BEGIN line; an input without a CERTIFICATE block gives no certificates.
#![no_main]

use dps_agent::chain::{certs_from_pem, certs_to_pem};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(pem) = std::str::from_utf8(data) else {
        return;
    };
    let result = certs_from_pem(pem);
    assert_eq!(result, certs_from_pem(pem), "not deterministic");
    match result {
        Ok(certs) => {
            let begins = pem
                .lines()
                .filter(|l| l.trim() == "-----BEGIN CERTIFICATE-----")
                .count();
            assert!(
                certs.len() <= begins,
                "{} certificates from {begins} BEGIN lines",
                certs.len()
            );
            let again = certs_to_pem(&certs);
            assert_eq!(certs_from_pem(&again).as_ref(), Ok(&certs));
            assert_eq!(certs_to_pem(&certs_from_pem(&again).unwrap()), again);
        }
        Err(e) => {
            assert!(!e.is_empty());
            assert!(!e.chars().any(char::is_control), "{e:?}");
        }
    }
});
