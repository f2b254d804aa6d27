//! IoT Hub's certificate API answers (`hub::credentials`): the reply topic and
//! the 200 body. Properties: never panics; deterministic; a parsed topic keeps
//! its status and `$rid` when rendered again the way the hub writes it; an
//! accepted body gives at least one certificate, each non-empty, and the same
//! certificates again when sent back as a bare array of base64 items (the
//! other shape Microsoft's clients accept).
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use dps_agent::dps::wire::url_encode;
use dps_agent::hub::credentials::{parse_certificates, parse_response_topic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first line is the topic, the rest the body.
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (topic, body) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    if let Ok(topic) = std::str::from_utf8(topic) {
        let parsed = parse_response_topic(topic);
        assert_eq!(parsed, parse_response_topic(topic), "not deterministic");
        if let Some((status, rid)) = parsed {
            let mut again = format!("$iothub/credentials/res/{status}/");
            if let Some(rid) = &rid {
                again.push_str(&format!("?$rid={}", url_encode(rid)));
            }
            assert_eq!(
                parse_response_topic(&again),
                Some((status, rid)),
                "{again:?}"
            );
        }
    }
    let first = parse_certificates(body);
    assert_eq!(first, parse_certificates(body), "not deterministic");
    if let Ok(certs) = first {
        assert!(
            !certs.is_empty() && certs.iter().all(|c| !c.is_empty()),
            "{certs:?}"
        );
        let array: Vec<String> = certs.iter().map(|c| STANDARD.encode(c)).collect();
        let body = serde_json::to_vec(&array).unwrap();
        assert_eq!(parse_certificates(&body).as_ref(), Ok(&certs));
    }
});
