//! IoT Hub's certificate API (hub api `2025-08-01-preview`, protocol.md §6.2):
//! a new operational certificate for a CSR, asked over an MQTT session made
//! with the current certificate, as an alternative to registering with DPS
//! again (`[operational] renewal_path = "hub"`). This module speaks the wire;
//! the lifecycle decides when to use it and falls back to DPS when it fails.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use super::{within, HubError, HubTarget, Session};
use crate::dps::wire::{clip, url_decode};

/// The hub api-version that has the certificate API.
pub const API_VERSION: &str = "2025-08-01-preview";
/// Certificate API replies come on this filter.
const RESPONSES: &str = "$iothub/credentials/res/#";
/// How long to wait for the certificate after the request (the 202 says the
/// operation may stay open for hours; a device that waits that long is better
/// served by DPS).
const ISSUANCE_TIMEOUT: Duration = Duration::from_secs(120);

/// Asks the hub for a certificate for `csr_base64` (base64 DER PKCS#10),
/// connecting as `target.device_id` with `tls` (the current identity). Returns
/// the DER certificates as received, leaf first; the caller checks them.
pub async fn issue_certificate(
    target: &HubTarget,
    tls: Arc<rustls::ClientConfig>,
    csr_base64: &str,
) -> Result<Vec<Vec<u8>>, HubError> {
    let mut s = Session::open(target, tls);
    let endpoint = s.endpoint.clone();
    let result = within(
        &endpoint,
        ISSUANCE_TIMEOUT,
        request(&mut s, &target.device_id, csr_base64),
    )
    .await;
    s.close().await;
    result
}

async fn request(
    s: &mut Session,
    device_id: &str,
    csr_base64: &str,
) -> Result<Vec<Vec<u8>>, HubError> {
    s.connack().await?;
    // Answers to a request published before the SUBACK are lost.
    s.subscribe(RESPONSES).await?;
    let rid = request_id();
    // `replace: "*"` supersedes a request an earlier, interrupted attempt left open.
    let body = json!({"id": device_id, "csr": csr_base64, "replace": "*"});
    s.publish(
        format!("$iothub/credentials/POST/issueCertificate/?$rid={rid}"),
        body.to_string().into_bytes(),
    )
    .await?;
    loop {
        let p = s.next_publish().await?;
        let Some((status, reply_rid)) = parse_response_topic(&p.topic) else {
            continue;
        };
        if reply_rid.as_deref() != Some(rid.as_str()) {
            continue;
        }
        match status {
            202 => log::debug!("IoT Hub {} accepted the certificate request", s.endpoint),
            200 => return parse_certificates(&p.payload).map_err(|e| s.protocol(e)),
            status => {
                return Err(HubError::CertificateRequest {
                    endpoint: s.endpoint.clone(),
                    status,
                    detail: error_detail(&p.payload),
                })
            }
        }
    }
}

/// A `$rid` the hub accepts: 4–36 characters from `[A-Za-z0-9-]`, not starting
/// or ending with `-`.
fn request_id() -> String {
    format!("dps-agent-{:08x}", rand::random::<u32>())
}

/// `$iothub/credentials/res/{status}/?$rid=…` → status and `$rid`; properties
/// in any order. None for other topics.
pub fn parse_response_topic(topic: &str) -> Option<(u16, Option<String>)> {
    let rest = topic.strip_prefix("$iothub/credentials/res/")?;
    let (status, query) = rest.split_once('/').unwrap_or((rest, ""));
    let status: u16 = status.parse().ok()?;
    let query = query.strip_prefix('?').unwrap_or(query);
    let rid = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| url_decode(k) == "$rid")
        .map(|(_, v)| url_decode(v));
    Some((status, rid))
}

/// The certificates of a 200 answer. Two shapes are seen in Microsoft's
/// clients: `{"correlationId", "certificates": [...]}` and a bare array; the
/// items are base64 DER or PEM. Both are accepted.
pub fn parse_certificates(body: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        format!(
            "the certificate answer is not JSON ({e}): {}",
            clip(&String::from_utf8_lossy(body), 120)
        )
    })?;
    let items = match &value {
        Value::Array(items) => items,
        Value::Object(o) => match o.get("certificates") {
            Some(Value::Array(items)) => items,
            _ => return Err("the certificate answer has no \"certificates\" array".into()),
        },
        _ => return Err("the certificate answer is neither an object nor an array".into()),
    };
    let mut certs = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Value::String(text) = item else {
            return Err(format!("certificate {i} of the answer is not a string"));
        };
        if text.contains("-----BEGIN") {
            let pem = text.replace("\\n", "\n");
            let found = crate::chain::certs_from_pem(&pem)
                .map_err(|e| format!("certificate {i} of the answer: {e}"))?;
            if found.is_empty() {
                return Err(format!(
                    "certificate {i} of the answer holds no certificate"
                ));
            }
            certs.extend(found);
        } else {
            let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
            if compact.is_empty() {
                return Err(format!("certificate {i} of the answer is empty"));
            }
            certs.push(
                STANDARD
                    .decode(compact)
                    .map_err(|_| format!("certificate {i} of the answer is not base64"))?,
            );
        }
    }
    if certs.is_empty() {
        return Err("the certificate answer holds no certificate".into());
    }
    Ok(certs)
}

/// `: errorCode 409004, "message", trackingId …` from an error body, clipped
/// and free of control characters; empty when the body says nothing useful.
fn error_detail(body: &[u8]) -> String {
    let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(body) else {
        return String::new();
    };
    let mut parts = Vec::new();
    if let Some(code) = o.get("errorCode").filter(|v| !v.is_null()) {
        parts.push(format!("errorCode {}", clip(&value_text(code), 20)));
    }
    if let Some(Value::String(m)) = o.get("message") {
        parts.push(format!("{:?}", clip(m, 200)));
    }
    if let Some(Value::String(t)) = o.get("trackingId") {
        parts.push(format!("trackingId {}", clip(t, 80)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(": {}", parts.join(", "))
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_topics() {
        assert_eq!(
            parse_response_topic("$iothub/credentials/res/202/?$rid=dps-agent-1"),
            Some((202, Some("dps-agent-1".into())))
        );
        assert_eq!(
            parse_response_topic("$iothub/credentials/res/200/?x=1&$rid=r-2"),
            Some((200, Some("r-2".into())))
        );
        assert_eq!(
            parse_response_topic("$iothub/credentials/res/409"),
            Some((409, None))
        );
        assert_eq!(parse_response_topic("$iothub/twin/res/200/?$rid=1"), None);
        assert_eq!(parse_response_topic("$iothub/credentials/res/ok/"), None);
    }

    #[test]
    fn request_ids_are_what_the_hub_accepts() {
        for _ in 0..100 {
            let rid = request_id();
            assert!((4..=36).contains(&rid.len()), "{rid}");
            assert!(rid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
            assert!(!rid.starts_with('-') && !rid.ends_with('-'));
        }
    }

    fn der(n: u8) -> Vec<u8> {
        vec![0x30, 0x03, 0x02, 0x01, n]
    }

    #[test]
    fn both_answer_shapes_and_both_encodings() {
        let b64 = |n| STANDARD.encode(der(n));
        let object = json!({"correlationId": "c", "certificates": [b64(1), b64(2)]});
        assert_eq!(
            parse_certificates(object.to_string().as_bytes()).unwrap(),
            vec![der(1), der(2)]
        );
        let array = json!([b64(3)]);
        assert_eq!(
            parse_certificates(array.to_string().as_bytes()).unwrap(),
            vec![der(3)]
        );
        // PEM items, with real or escaped newlines; base64 with line breaks.
        let pem = |n| {
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                b64(n)
            )
        };
        let pems = json!({"certificates": [pem(4), pem(5).replace('\n', "\\n")]});
        assert_eq!(
            parse_certificates(pems.to_string().as_bytes()).unwrap(),
            vec![der(4), der(5)]
        );
        let wrapped = format!("{}\n{}", &b64(6)[..4], &b64(6)[4..]);
        assert_eq!(
            parse_certificates(json!([wrapped]).to_string().as_bytes()).unwrap(),
            vec![der(6)]
        );
    }

    #[test]
    fn bad_answers_say_what_is_wrong() {
        for (body, expect) in [
            (&b"not json"[..], "not JSON"),
            (b"{}", "no \"certificates\" array"),
            (b"[]", "holds no certificate"),
            (b"[1]", "certificate 0 of the answer is not a string"),
            (b"[\"%%%\"]", "certificate 0 of the answer is not base64"),
            (b"[\" \"]", "certificate 0 of the answer is empty"),
            (b"\"x\"", "neither an object nor an array"),
        ] {
            let e = parse_certificates(body).unwrap_err();
            assert!(e.contains(expect), "{e}");
        }
    }

    #[test]
    fn error_details_are_clipped_and_named() {
        let body = json!({
            "errorCode": 409004,
            "message": "another request is active",
            "trackingId": "t-1",
            "info": {"correlationId": "c"}
        });
        assert_eq!(
            error_detail(body.to_string().as_bytes()),
            ": errorCode 409004, \"another request is active\", trackingId t-1"
        );
        assert_eq!(error_detail(b"oops"), "");
        let long = json!({"message": "\u{1b}[31m".repeat(100)});
        assert!(error_detail(long.to_string().as_bytes()).len() < 260);
    }
}
