//! DPS device API messages (api-version 2025-07-01-preview): the register body
//! we send, response topics and bodies we read. Reading is lenient (unknown
//! fields ignored, field types checked one by one) and never panics: this is the
//! code that sees hostile input first, and it is fuzzed.

use base64::Engine as _;
use serde_json::{Map, Value};

/// Topic the device subscribes to for replies.
pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";
const RESPONSE_PREFIX: &str = "$dps/registrations/res/";

/// The TPM's public keys for a TPM registration (`TpmAttestation`): each a
/// marshalled TPM2B_PUBLIC, sent base64-encoded.
#[derive(Debug, Clone, Copy)]
pub struct TpmKeys<'a> {
    pub endorsement_key: &'a [u8],
    pub storage_root_key: &'a [u8],
}

/// Builds the JSON body of a registration (`DeviceRegistration`).
pub fn register_body(
    registration_id: &str,
    csr_base64: Option<&str>,
    payload: Option<&Value>,
    tpm: Option<TpmKeys<'_>>,
) -> Vec<u8> {
    let mut m = Map::new();
    m.insert(
        "registrationId".into(),
        Value::String(registration_id.into()),
    );
    if let Some(t) = tpm {
        let b64 = |b: &[u8]| Value::String(base64::engine::general_purpose::STANDARD.encode(b));
        let mut tm = Map::new();
        tm.insert("endorsementKey".into(), b64(t.endorsement_key));
        tm.insert("storageRootKey".into(), b64(t.storage_root_key));
        m.insert("tpm".into(), Value::Object(tm));
    }
    if let Some(csr) = csr_base64 {
        m.insert("csr".into(), Value::String(csr.into()));
    }
    if let Some(p) = payload {
        m.insert("payload".into(), p.clone());
    }
    Value::Object(m).to_string().into_bytes()
}

/// The TPM challenge in a 401 answer to a TPM registration without
/// authorization: `{"authenticationKey": "<base64 blob>"}`. None when the body
/// is anything else (a refusal).
pub fn parse_tpm_challenge(body: &[u8]) -> Option<Vec<u8>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let key = v.as_object()?.get("authenticationKey")?.as_str()?;
    let key: String = key.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(key.as_bytes())
        .ok()
        .filter(|b| !b.is_empty())
}

/// MQTT topic of a register request.
pub fn register_topic(rid: u64) -> String {
    format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}")
}

/// MQTT topic of an operation-status poll.
pub fn poll_topic(rid: u64, operation_id: &str) -> String {
    format!(
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={}",
        url_encode(operation_id)
    )
}

/// The longest wait a server may ask for; longer asks are clamped to it (a
/// retry a day later is still a retry, and no clock arithmetic can overflow).
pub const MAX_RETRY_AFTER_SECS: u64 = 24 * 60 * 60;

/// A retry-after as DPS sends it in a topic property or a header: whole or
/// fractional seconds (rounded up), clamped to [`MAX_RETRY_AFTER_SECS`].
/// Negative, non-numeric and non-finite values are ignored (None): the caller
/// then uses its own backoff.
pub fn retry_after_secs(text: &str) -> Option<u64> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: too long for a u64 is simply "very long".
        return Some(
            t.parse::<u64>()
                .map_or(MAX_RETRY_AFTER_SECS, |n| n.min(MAX_RETRY_AFTER_SECS)),
        );
    }
    let f: f64 = t.parse().ok()?;
    clamp_seconds(f)
}

/// [`retry_after_secs`] for a JSON value (`retryAfter` in an error body):
/// a number or a numeric string.
pub fn retry_after_json(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => match n.as_u64() {
            Some(u) => Some(u.min(MAX_RETRY_AFTER_SECS)),
            None => clamp_seconds(n.as_f64()?),
        },
        Value::String(s) => retry_after_secs(s),
        _ => None,
    }
}

fn clamp_seconds(f: f64) -> Option<u64> {
    if !f.is_finite() || f < 0.0 {
        return None;
    }
    // `as` saturates; the clamp keeps it within a day.
    Some((f.ceil() as u64).min(MAX_RETRY_AFTER_SECS))
}

/// A reply topic, `$dps/registrations/res/{status}/?$rid=…[&retry-after=…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseTopic {
    pub status: u16,
    pub rid: Option<String>,
    pub retry_after: Option<u64>,
}

/// Parses a reply topic. Properties may come in any order and are URL-decoded.
/// Returns None for topics that are not DPS replies.
pub fn parse_response_topic(topic: &str) -> Option<ResponseTopic> {
    let rest = topic.strip_prefix(RESPONSE_PREFIX)?;
    let (status, query) = match rest.split_once('/') {
        Some((s, q)) => (s, q.strip_prefix('?').unwrap_or(q)),
        None => (rest, ""),
    };
    let status: u16 = status.parse().ok()?;
    let mut out = ResponseTopic {
        status,
        rid: None,
        retry_after: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = url_decode(k);
        let v = url_decode(v);
        match k.as_str() {
            "$rid" => out.rid = Some(v),
            "retry-after" => out.retry_after = retry_after_secs(&v),
            _ => {}
        }
    }
    Some(out)
}

/// What a reply means.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Still assigning; poll `operation_id` later.
    Assigning {
        operation_id: String,
        retry_after: Option<u64>,
    },
    /// Done: the device is assigned.
    Assigned(Box<RegistrationState>),
    /// Done: DPS refused the registration (`status: failed`).
    Failed {
        error_code: Option<i64>,
        message: String,
    },
    /// Done: the enrollment is disabled.
    Disabled,
    /// An error status with DPS's error body.
    Error(ServiceError),
}

/// `registrationState` of an assigned registration, as far as the agent uses it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RegistrationState {
    pub registration_id: Option<String>,
    pub assigned_hub: String,
    pub device_id: String,
    pub substatus: Option<String>,
    /// DER of each certificate of `issuedCertificateChain`, in the order received.
    /// None when the field is absent or null.
    pub issued_chain: Option<Vec<Vec<u8>>>,
    pub payload: Option<Value>,
    /// `tpm.authenticationKey` (decoded): the key a TPM device signs its IoT
    /// Hub SAS tokens with. None when absent or not base64.
    pub tpm_authentication_key: Option<Vec<u8>>,
}

/// A DPS error (`ProvisioningServiceErrorDetails`) with the status it came with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceError {
    pub status: u16,
    pub error_code: Option<i64>,
    pub message: Option<String>,
    pub tracking_id: Option<String>,
    pub retry_after: Option<u64>,
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "status {}", self.status)?;
        if let Some(c) = self.error_code {
            write!(f, ", error {c}")?;
        }
        if let Some(m) = &self.message {
            write!(f, ": {}", clip(m, 300))?;
        }
        if let Some(t) = &self.tracking_id {
            write!(f, " (tracking id {})", clip(t, 80))?;
        }
        Ok(())
    }
}

/// Interprets a reply's status, retry-after and body.
pub fn parse_reply(status: u16, retry_after: Option<u64>, body: &[u8]) -> Result<Reply, String> {
    if !(200..300).contains(&status) {
        return Ok(Reply::Error(parse_error_body(status, retry_after, body)));
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the reply is not JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "the reply is not a JSON object".to_string())?;
    let operation_id = str_field(obj, "operationId")?;
    let reg_state = match obj.get("registrationState") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => return Err("registrationState is not an object".into()),
    };
    let op_status = str_field(obj, "status")?.or_else(|| {
        reg_state
            .and_then(|m| m.get("status"))
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    match op_status.as_deref() {
        Some("assigning") | Some("unassigned") => Ok(Reply::Assigning {
            operation_id: operation_id
                .filter(|s| !s.is_empty())
                .ok_or_else(|| "an \"assigning\" reply has no operationId".to_string())?,
            retry_after,
        }),
        Some("assigned") => {
            let m = reg_state
                .ok_or_else(|| "an \"assigned\" reply has no registrationState".to_string())?;
            Ok(Reply::Assigned(Box::new(parse_registration_state(m)?)))
        }
        Some("failed") => Ok(Reply::Failed {
            error_code: reg_state.and_then(|m| int_field(m, "errorCode")),
            message: reg_state
                .and_then(|m| m.get("errorMessage"))
                .and_then(Value::as_str)
                .map(|s| clip(s, 300))
                .unwrap_or_else(|| "no error message".into()),
        }),
        Some("disabled") => Ok(Reply::Disabled),
        Some(other) => Err(format!("unknown registration status {:?}", clip(other, 40))),
        None if status == 202 => Ok(Reply::Assigning {
            operation_id: operation_id
                .filter(|s| !s.is_empty())
                .ok_or_else(|| "a 202 reply has no operationId".to_string())?,
            retry_after,
        }),
        None => Err("the reply has no status".into()),
    }
}

fn parse_registration_state(m: &Map<String, Value>) -> Result<RegistrationState, String> {
    let assigned_hub = str_field(m, "assignedHub")?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| "an assigned registration has no assignedHub".to_string())?;
    let device_id = str_field(m, "deviceId")?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| "an assigned registration has no deviceId".to_string())?;
    if !is_host_name(&assigned_hub) {
        return Err(format!(
            "assignedHub {:?} is not a host name",
            clip(&assigned_hub, 80)
        ));
    }
    if device_id.len() > 128 || device_id.chars().any(|c| c.is_control() || c == '/') {
        return Err(format!(
            "deviceId {:?} is not a valid device id",
            clip(&device_id, 80)
        ));
    }
    let issued_chain = match m.get("issuedCertificateChain") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    item.as_str()
                        .ok_or_else(|| format!("issuedCertificateChain[{i}] is not a string"))
                        .and_then(|s| {
                            decode_cert(s).map_err(|e| format!("issuedCertificateChain[{i}]: {e}"))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err("issuedCertificateChain is not an array".into()),
    };
    Ok(RegistrationState {
        registration_id: str_field(m, "registrationId")?,
        assigned_hub,
        device_id,
        substatus: str_field(m, "substatus")?,
        issued_chain,
        payload: m.get("payload").filter(|v| !v.is_null()).cloned(),
        tpm_authentication_key: m
            .get("tpm")
            .and_then(|t| serde_json::to_vec(t).ok())
            .and_then(|t| parse_tpm_challenge(&t)),
    })
}

/// A certificate as base64 DER, or PEM (accepted too, since some service
/// answers PEM-wrap the elements).
fn decode_cert(s: &str) -> Result<Vec<u8>, String> {
    let body: String = if s.contains("-----BEGIN") {
        s.lines().filter(|l| !l.starts_with("-----")).collect()
    } else {
        s.chars().filter(|c| !c.is_whitespace()).collect()
    };
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .map_err(|e| format!("not base64: {e}"))?;
    if der.is_empty() {
        return Err("empty certificate".into());
    }
    Ok(der)
}

/// Reads an error body; anything unreadable still gives the status.
pub fn parse_error_body(status: u16, retry_after: Option<u64>, body: &[u8]) -> ServiceError {
    let mut e = ServiceError {
        status,
        retry_after,
        ..Default::default()
    };
    if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) {
        e.error_code = int_field(&m, "errorCode").or_else(|| int_field(&m, "code"));
        e.message = m
            .get("message")
            .or_else(|| m.get("errorMessage"))
            .and_then(Value::as_str)
            .map(|s| clip(s, 300));
        e.tracking_id = m
            .get("trackingId")
            .and_then(Value::as_str)
            .map(|s| clip(s, 80));
        if e.retry_after.is_none() {
            e.retry_after = m.get("retryAfter").and_then(retry_after_json);
        }
    } else if !body.is_empty() {
        e.message = Some(clip(&String::from_utf8_lossy(body), 200));
    }
    e
}

fn str_field(m: &Map<String, Value>, k: &str) -> Result<Option<String>, String> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{k} is not a string")),
    }
}

fn int_field(m: &Map<String, Value>, k: &str) -> Option<i64> {
    match m.get(k)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn is_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '[' | ']'))
}

/// Shortens text from the network before it goes into a message.
pub fn clip(s: &str, max: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() <= max {
        clean
    } else {
        let mut t: String = clean.chars().take(max).collect();
        t.push('…');
        t
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (and `+` as space); invalid escapes are kept as written.
pub fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every form of retry-after a server may send, extremes included.
    #[test]
    fn retry_after_values_are_clamped_or_ignored_never_trusted() {
        let max = MAX_RETRY_AFTER_SECS;
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            (" 7 ", Some(7)),
            ("2.5", Some(3)),
            ("86400", Some(max)),
            ("86401", Some(max)),
            ("18446744073709551615", Some(max)),
            ("18446744073709551616", Some(max)),
            ("1000000000000000000000000000000", Some(max)),
            ("1e30", Some(max)),
            ("-1", None),
            ("-18446744073709551615", None),
            ("-0.5", None),
            ("abc", None),
            ("", None),
            ("NaN", None),
            ("inf", None),
            ("Wed, 21 Oct 2026 07:28:00 GMT", None),
        ];
        for (text, want) in cases {
            assert_eq!(retry_after_secs(text), *want, "{text:?}");
            let topic = format!("$dps/registrations/res/429/?$rid=1&retry-after={text}");
            if !text.contains([' ', '&']) {
                let t = parse_response_topic(&topic).unwrap();
                assert_eq!(t.retry_after, *want, "{topic}");
            }
        }
        let json: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("-5", None),
            ("2.01", Some(3)),
            ("18446744073709551615", Some(max)),
            ("1e30", Some(max)),
            ("-1e30", None),
            ("\"30\"", Some(30)),
            ("\"x\"", None),
            ("null", None),
            ("[1]", None),
        ];
        for (v, want) in json {
            let body = format!("{{\"errorCode\": 429001, \"retryAfter\": {v}}}");
            let e = parse_error_body(429, None, body.as_bytes());
            assert_eq!(e.retry_after, *want, "{body}");
        }
    }

    /// `operationExpires` is not used: no value of it changes or breaks a reply.
    #[test]
    fn operation_expires_of_any_value_is_ignored() {
        for v in [
            "\"2026-12-04T13:00:00Z\"",
            "0",
            "-1",
            "18446744073709551615",
            "1e30",
            "\"not a date\"",
            "null",
        ] {
            let body = format!(
                "{{\"operationId\": \"op\", \"status\": \"assigning\", \"operationExpires\": {v}}}"
            );
            let r = parse_reply(202, None, body.as_bytes());
            assert_eq!(
                r,
                Ok(Reply::Assigning {
                    operation_id: "op".into(),
                    retry_after: None
                }),
                "{body}"
            );
        }
    }

    #[test]
    fn topic_properties_in_any_order() {
        let want = ResponseTopic {
            status: 202,
            rid: Some("7".into()),
            retry_after: Some(3),
        };
        for t in [
            "$dps/registrations/res/202/?$rid=7&retry-after=3",
            "$dps/registrations/res/202/?retry-after=3&$rid=7",
            "$dps/registrations/res/202/?%24rid=7&retry-after=3",
            "$dps/registrations/res/202/?retry-after=3&foo=bar&$rid=7",
        ] {
            assert_eq!(parse_response_topic(t), Some(want.clone()), "{t}");
        }
        let t = parse_response_topic("$dps/registrations/res/200/?$rid=1").unwrap();
        assert_eq!((t.status, t.retry_after), (200, None));
        assert_eq!(
            parse_response_topic("$dps/registrations/res/429/?$rid=a%20b&retry-after=0")
                .unwrap()
                .rid
                .as_deref(),
            Some("a b")
        );
        assert!(parse_response_topic("$iothub/twin/res/200/?$rid=1").is_none());
        assert!(parse_response_topic("$dps/registrations/res/abc/?$rid=1").is_none());
        assert!(parse_response_topic("$dps/registrations/res/").is_none());
    }

    #[test]
    fn url_coding() {
        assert_eq!(url_encode("4.abc/def=g"), "4.abc%2Fdef%3Dg");
        assert_eq!(url_decode("%2F%3d%zz%"), "/=%zz%");
        assert_eq!(
            url_decode(&url_encode("dps-agent/0.1 ü")),
            "dps-agent/0.1 ü"
        );
    }

    #[test]
    fn register_body_shape() {
        let p = serde_json::json!({"modelId": "dtmi:x;1"});
        let b: Value =
            serde_json::from_slice(&register_body("gw-1", Some("QUJD"), Some(&p), None)).unwrap();
        assert_eq!(
            b,
            serde_json::json!({"registrationId": "gw-1", "csr": "QUJD", "payload": {"modelId": "dtmi:x;1"}})
        );
        let b: Value = serde_json::from_slice(&register_body("gw-1", None, None, None)).unwrap();
        assert_eq!(b, serde_json::json!({"registrationId": "gw-1"}));
        let tpm = TpmKeys {
            endorsement_key: b"EK",
            storage_root_key: b"SRK",
        };
        let b: Value =
            serde_json::from_slice(&register_body("gw-1", Some("QUJD"), None, Some(tpm))).unwrap();
        assert_eq!(
            b,
            serde_json::json!({"registrationId": "gw-1", "csr": "QUJD",
                "tpm": {"endorsementKey": "RUs=", "storageRootKey": "U1JL"}})
        );
    }

    #[test]
    fn tpm_challenge_and_assigned_auth_key() {
        assert_eq!(
            parse_tpm_challenge(br#"{"authenticationKey":"QUJD\nREVG"}"#),
            Some(b"ABCDEF".to_vec())
        );
        for body in [
            &br#"{"errorCode":401002,"message":"unknown EK"}"#[..],
            br#"{"authenticationKey":""}"#,
            br#"{"authenticationKey":"%%"}"#,
            br#"{"authenticationKey":5}"#,
            b"[]",
            b"",
        ] {
            assert_eq!(
                parse_tpm_challenge(body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let body = serde_json::json!({"operationId": "o", "status": "assigned", "registrationState": {
            "assignedHub": "h", "deviceId": "d", "tpm": {"authenticationKey": "QUJD"}}});
        let Reply::Assigned(s) = parse_reply(200, None, body.to_string().as_bytes()).unwrap()
        else {
            panic!()
        };
        assert_eq!(s.tpm_authentication_key, Some(b"ABC".to_vec()));
    }

    #[test]
    fn assigning_and_assigned() {
        let r = parse_reply(
            202,
            Some(2),
            br#"{"operationId":"4.x.y","status":"assigning"}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Reply::Assigning {
                operation_id: "4.x.y".into(),
                retry_after: Some(2)
            }
        );
        let body = serde_json::json!({
            "operationId": "4.x.y", "status": "assigned", "somethingNew": {"a": 1},
            "registrationState": {
                "registrationId": "gw-1", "assignedHub": "hub.example.net", "deviceId": "gw-1",
                "status": "assigned", "substatus": "initialAssignment", "connectionProfile": {},
                "issuedCertificateChain": ["QUJD", "-----BEGIN CERTIFICATE-----\nREVG\n-----END CERTIFICATE-----"]
            }
        });
        match parse_reply(200, None, body.to_string().as_bytes()).unwrap() {
            Reply::Assigned(s) => {
                assert_eq!(s.assigned_hub, "hub.example.net");
                assert_eq!(s.device_id, "gw-1");
                assert_eq!(s.issued_chain, Some(vec![b"ABC".to_vec(), b"DEF".to_vec()]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn terminal_statuses() {
        let r = parse_reply(
            200,
            None,
            br#"{"operationId":"o","status":"failed","registrationState":{"status":"failed","errorCode":400207,"errorMessage":"Custom allocation failed"}}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Reply::Failed {
                error_code: Some(400207),
                message: "Custom allocation failed".into()
            }
        );
        let r = parse_reply(200, None, br#"{"operationId":"o","status":"disabled"}"#).unwrap();
        assert_eq!(r, Reply::Disabled);
    }

    #[test]
    fn errors_keep_code_message_and_tracking_id() {
        let r = parse_reply(
            401,
            None,
            br#"{"errorCode":401002,"trackingId":"abc","message":"The certificate is not trusted","timestampUtc":"x"}"#,
        )
        .unwrap();
        let Reply::Error(e) = r else { panic!() };
        assert_eq!(e.error_code, Some(401002));
        assert_eq!(
            e.to_string(),
            "status 401, error 401002: The certificate is not trusted (tracking id abc)"
        );
        let Reply::Error(e) = parse_reply(500, None, b"<html>oops</html>").unwrap() else {
            panic!()
        };
        assert_eq!(e.message.as_deref(), Some("<html>oops</html>"));
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        for body in [
            &b"{\"operationId\": \"4.x\", \"status\": \"assigned\", \"registrationState\": {"[..],
            b"[]",
            b"{\"status\": 5}",
            b"{\"status\":\"assigned\"}",
            b"{\"status\":\"assigned\",\"registrationState\":{\"assignedHub\":\"h\"}}",
            b"{\"status\":\"assigned\",\"registrationState\":{\"assignedHub\":\"h x\",\"deviceId\":\"d\"}}",
            b"{\"status\":\"assigned\",\"registrationState\":{\"assignedHub\":\"h\",\"deviceId\":\"d\",\"issuedCertificateChain\":[1]}}",
            b"{\"status\":\"assigned\",\"registrationState\":{\"assignedHub\":\"h\",\"deviceId\":\"d\",\"issuedCertificateChain\":\"x\"}}",
            b"{\"status\":\"assigning\"}",
            b"{\"status\":\"weird\"}",
            b"\xff\xfe",
        ] {
            assert!(parse_reply(200, None, body).is_err(), "{}", String::from_utf8_lossy(body));
        }
        // A 202 without a status needs an operation id to poll, as "assigning"
        // does: an empty one is none (the fuzz target dps_reply checks this).
        for body in [
            &br#"{"operationId":""}"#[..],
            br#"{"operationId":null}"#,
            b"{}",
        ] {
            let err = parse_reply(202, Some(1), body).unwrap_err();
            assert!(err.contains("no operationId"), "{err}");
        }
    }

    #[test]
    fn absent_or_null_chain() {
        let r = parse_reply(200, None, br#"{"status":"assigned","registrationState":{"assignedHub":"h","deviceId":"d","issuedCertificateChain":null}}"#).unwrap();
        let Reply::Assigned(s) = r else { panic!() };
        assert_eq!(s.issued_chain, None);
    }
}
