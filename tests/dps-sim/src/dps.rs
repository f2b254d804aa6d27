//! The simulated DPS service: register and operation-status requests in, status + JSON body
//! out, with the active faults applied. Transport independent: MQTT (`mqtt.rs`) and HTTPS
//! (`https.rs`) call the same two methods after authenticating the device. Operations live in one server-wide map, so a device may poll after it
//! reconnected, as with the real service. Never touches sockets or files.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::faults::{Fault, FaultSet};
use crate::issue::{self, CertIssuer, ChainKind, IssueError, Issued, LeafRequest, ValidCsr};
use crate::pki;

/// errorCode for an unusable request body.
pub const ERR_BAD_REQUEST: u32 = 400_004;
/// errorCode for a CSR sent with an api-version that predates certificate issuance.
pub const ERR_API_VERSION: u32 = 400_044;
/// errorCode for an unknown operation id.
pub const ERR_OPERATION_NOT_FOUND: u32 = 404_001;
/// errorCode for the `throttle` fault.
pub const ERR_THROTTLED: u32 = 429_001;
/// errorCode for the `server-error` fault.
pub const ERR_SERVER: u32 = 500_001;
/// errorCode inside the `status-failed` registrationState.
pub const ERR_ALLOCATION_FAILED: u32 = 400_207;
/// errorCode and message of the `csr-reject` fault (what DPS might say about a CSR it dislikes).
pub const ERR_CSR_REJECTED: u32 = issue::ERR_CSR_ENCODING;
pub const CSR_REJECTED_MESSAGE: &str = "The certificate signing request is not valid";

/// `retry-after` of the `retry-after-large` fault (two hours).
pub const RETRY_AFTER_LARGE: u64 = 7200;
/// Lifetime of a leaf issued under `short-lived`.
pub const SHORT_LIVED: time::Duration = time::Duration::seconds(30);
/// Size of the text field `oversize-response` adds to the final answer (beyond DPS's 96 KB).
pub const OVERSIZE_PADDING: usize = 200 * 1024;

/// First api-version that knows `csr` / `issuedCertificateChain`.
pub const CSR_API_VERSION: &str = "2025-07-01-preview";

/// Service settings from the command line.
#[derive(Debug, Clone)]
pub struct DpsConfig {
    pub assigned_hub: String,
    /// Seconds put in `retry-after` on 202 and 429 (0 allowed).
    pub retry_after: u64,
    /// Polls answered 202 `assigning` before the final 200.
    pub polls_before_assign: u32,
    /// Lifetime of issued certificates.
    pub cert_validity: Duration,
}

/// Who is asking: taken from the authenticated connection or request.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    pub registration_id: &'a str,
    pub api_version: &'a str,
    /// Fields the authentication adds to an assigned `registrationState` (e.g.
    /// `symmetricKey.enrollmentGroupId`, `tpm.authenticationKey`); taken at register time.
    pub extra: Option<&'a Map<String, Value>>,
}

/// An error answer with the usual body (`errorCode`, `trackingId`, `message`,
/// `timestampUtc`).
pub fn error_outcome(status: u16, code: u32, message: String, retry_after: Option<u64>) -> Outcome {
    Outcome::error(status, code, message, retry_after)
}

/// One answer: the status goes into the response topic, `retry_after` into its
/// `retry-after` property, `body` is the payload. The other fields are for the events file.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: Vec<u8>,
    pub operation_id: Option<String>,
    /// Body `status` (`assigning`, `assigned`, `failed`, `disabled`); `None` for errors.
    pub registration_status: Option<String>,
    pub error_code: Option<u32>,
    /// The certificate issued while producing this answer (only on the first final answer).
    pub issued: Option<Issued>,
    /// The faults that shaped this answer (and its certificate), in [`Fault::ALL`] order.
    pub faults: Vec<Fault>,
    /// Send nothing and close the connection (`drop-after-register`).
    pub drop_connection: bool,
}

impl Outcome {
    fn error(status: u16, code: u32, message: impl Into<String>, retry_after: Option<u64>) -> Self {
        let body = json!({
            "errorCode": code,
            "trackingId": uuid_like(),
            "message": message.into(),
            "timestampUtc": rfc3339(OffsetDateTime::now_utc()),
        });
        Outcome {
            status,
            retry_after,
            body: body.to_string().into_bytes(),
            operation_id: None,
            registration_status: None,
            error_code: Some(code),
            issued: None,
            faults: Vec::new(),
            drop_connection: false,
        }
    }

    /// No answer at all: the transport closes the connection.
    fn dropped(fault: Fault) -> Self {
        Outcome {
            status: 0,
            retry_after: None,
            body: Vec::new(),
            operation_id: None,
            registration_status: None,
            error_code: None,
            issued: None,
            faults: vec![fault],
            drop_connection: true,
        }
    }

    fn with_fault(mut self, fault: Fault) -> Self {
        self.faults.push(fault);
        self.faults.sort();
        self
    }

    fn with_operation(mut self, id: &str) -> Self {
        self.operation_id = Some(id.to_string());
        self
    }
}

#[derive(Debug)]
struct Operation {
    registration_id: String,
    created: OffsetDateTime,
    payload: Option<Value>,
    csr: Option<ValidCsr>,
    /// Extra `registrationState` fields from the authentication.
    extra: Option<Map<String, Value>>,
    /// Polls counted towards `polls_before_assign` (throttled polls do not count).
    polls: u32,
    poll_throttled: bool,
    /// The final answer, repeated to later polls.
    done: Option<Outcome>,
}

#[derive(Debug, Default)]
struct State {
    operations: HashMap<String, Operation>,
    /// Registration id -> first successful registration.
    registrations: HashMap<String, OffsetDateTime>,
    throttled_registers: HashSet<String>,
    failed_registers: HashSet<String>,
    dropped_registers: HashSet<String>,
}

/// The simulated service.
#[derive(Debug)]
pub struct Dps {
    config: DpsConfig,
    issuer: CertIssuer,
    /// The middle part of operation ids, fixed per simulator run like a DPS instance.
    instance: String,
    state: Mutex<State>,
}

impl Dps {
    pub fn new(config: DpsConfig, issuer: CertIssuer) -> Self {
        Dps {
            config,
            issuer,
            instance: random_hex(8),
            state: Mutex::new(State::default()),
        }
    }

    pub fn config(&self) -> &DpsConfig {
        &self.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters for a simulator; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `PUT iotdps-register`: checks the body and the CSR, starts an operation, answers 202.
    /// Faults are tried in this order: `retry-after-large` (every register),
    /// `drop-after-register`, `throttle`, `server-error` (each once per registration id), then
    /// `csr-reject` (every register that carries a CSR).
    /// `extra-fields` then adds unknown fields to the answer.
    pub fn register(&self, ctx: RequestContext<'_>, body: &[u8], faults: &FaultSet) -> Outcome {
        with_extra_fields(self.register_answer(ctx, body, faults), faults)
    }

    fn register_answer(&self, ctx: RequestContext<'_>, body: &[u8], faults: &FaultSet) -> Outcome {
        let mut state = self.state();
        let reg_id = ctx.registration_id;

        if faults.contains(Fault::RetryAfterLarge) {
            return Outcome::error(
                429,
                ERR_THROTTLED,
                "Operations are being throttled for this registration (simulated, retry in 2 hours)",
                Some(RETRY_AFTER_LARGE),
            )
            .with_fault(Fault::RetryAfterLarge);
        }
        if faults.contains(Fault::DropAfterRegister)
            && state.dropped_registers.insert(reg_id.to_string())
        {
            return Outcome::dropped(Fault::DropAfterRegister);
        }

        if faults.contains(Fault::Throttle) && state.throttled_registers.insert(reg_id.to_string())
        {
            return Outcome::error(
                429,
                ERR_THROTTLED,
                "Operations are being throttled for this registration (simulated)",
                Some(self.config.retry_after),
            )
            .with_fault(Fault::Throttle);
        }
        if faults.contains(Fault::ServerError) && state.failed_registers.insert(reg_id.to_string())
        {
            return Outcome::error(500, ERR_SERVER, "Internal server error (simulated)", None)
                .with_fault(Fault::ServerError);
        }

        let request = match parse_registration(body, reg_id) {
            Ok(r) => r,
            Err(message) => return Outcome::error(400, ERR_BAD_REQUEST, message, None),
        };
        if faults.contains(Fault::CsrReject) && request.csr.is_some() {
            return Outcome::error(400, ERR_CSR_REJECTED, CSR_REJECTED_MESSAGE, None)
                .with_fault(Fault::CsrReject);
        }
        let csr = match &request.csr {
            None => None,
            Some(csr_b64) => {
                if !api_version_supports_csr(ctx.api_version) {
                    return Outcome::error(
                        400,
                        ERR_API_VERSION,
                        format!(
                            "csr requires api-version {CSR_API_VERSION} or later; the connection uses api-version={}",
                            ctx.api_version
                        ),
                        None,
                    );
                }
                match issue::check_csr(csr_b64, reg_id) {
                    Ok(valid) => Some(valid),
                    Err(e) => return Outcome::error(400, e.error_code(), e.to_string(), None),
                }
            }
        };

        let now = OffsetDateTime::now_utc();
        let created = *state.registrations.entry(reg_id.to_string()).or_insert(now);
        let operation_id = format!("4.{}.{}", self.instance, uuid_like());
        state.operations.insert(
            operation_id.clone(),
            Operation {
                registration_id: reg_id.to_string(),
                created,
                payload: request.payload,
                csr,
                extra: ctx.extra.cloned(),
                polls: 0,
                poll_throttled: false,
                done: None,
            },
        );
        self.assigning(&operation_id)
    }

    /// `GET iotdps-get-operationstatus`: 202 while assigning, then the final 200.
    /// `extra-fields` then adds unknown fields to the answer.
    pub fn poll(
        &self,
        ctx: RequestContext<'_>,
        operation_id: Option<&str>,
        faults: &FaultSet,
    ) -> Outcome {
        with_extra_fields(self.poll_answer(ctx, operation_id, faults), faults)
    }

    fn poll_answer(
        &self,
        ctx: RequestContext<'_>,
        operation_id: Option<&str>,
        faults: &FaultSet,
    ) -> Outcome {
        let Some(operation_id) = operation_id else {
            return Outcome::error(
                400,
                ERR_BAD_REQUEST,
                "the operation status topic has no operationId property",
                None,
            );
        };
        let mut state = self.state();
        let Some(op) = state
            .operations
            .get_mut(operation_id)
            .filter(|op| op.registration_id == ctx.registration_id)
        else {
            return Outcome::error(
                404,
                ERR_OPERATION_NOT_FOUND,
                format!(
                    "operation {operation_id:?} was not found for registration {:?}",
                    ctx.registration_id
                ),
                None,
            );
        };

        if faults.contains(Fault::Throttle) && !op.poll_throttled {
            op.poll_throttled = true;
            return Outcome::error(
                429,
                ERR_THROTTLED,
                "Operations are being throttled for this registration (simulated)",
                Some(self.config.retry_after),
            )
            .with_fault(Fault::Throttle)
            .with_operation(operation_id);
        }
        if let Some(done) = &op.done {
            let mut again = done.clone();
            again.issued = None;
            return again;
        }

        op.polls = op.polls.saturating_add(1);
        let mut needed = self.config.polls_before_assign;
        if faults.contains(Fault::SlowAssign) {
            needed = needed.max(3);
        }
        if op.polls <= needed {
            let mut out = self.assigning(operation_id);
            if faults.contains(Fault::SlowAssign) && self.config.polls_before_assign < 3 {
                out = out.with_fault(Fault::SlowAssign);
            }
            return out;
        }

        let outcome = self.finish(operation_id, op, faults);
        op.done = Some(outcome.clone());
        outcome
    }

    fn assigning(&self, operation_id: &str) -> Outcome {
        let body = json!({"operationId": operation_id, "status": "assigning"});
        Outcome {
            status: 202,
            retry_after: Some(self.config.retry_after),
            body: body.to_string().into_bytes(),
            operation_id: Some(operation_id.to_string()),
            registration_status: Some("assigning".into()),
            error_code: None,
            issued: None,
            faults: Vec::new(),
            drop_connection: false,
        }
    }

    /// Issues a leaf for `csr` with the issuance faults applied: `wrong-key-cert`,
    /// `foreign-chain` (wins over `bad-chain`), `bad-chain`, `truncated-chain`, and for the
    /// validity period `expired-cert`, else `not-yet-valid-cert`, else `short-lived`, else
    /// `--cert-validity`. Returns the faults that were applied. Also used by the hub's
    /// certificate API, which issues from the same CA.
    pub fn issue_leaf(
        &self,
        registration_id: &str,
        csr: &ValidCsr,
        faults: &FaultSet,
    ) -> Result<(Issued, Vec<Fault>), IssueError> {
        let mut applied = Vec::new();
        let mut on = |fault: Fault| {
            let active = faults.contains(fault);
            if active {
                applied.push(fault);
            }
            active
        };
        let now = pki::now_seconds();
        let (not_before, not_after) = if on(Fault::ExpiredCert) {
            (now - time::Duration::days(2), now - time::Duration::days(1))
        } else if on(Fault::NotYetValidCert) {
            (
                now + time::Duration::days(1),
                now + time::Duration::days(30),
            )
        } else if on(Fault::ShortLived) {
            (now, now + SHORT_LIVED)
        } else {
            let validity = time::Duration::try_from(self.config.cert_validity)
                .unwrap_or(time::Duration::days(30));
            (now, now + validity)
        };
        let chain = if on(Fault::ForeignChain) {
            ChainKind::Foreign
        } else if on(Fault::BadChain) {
            ChainKind::Unrelated
        } else {
            ChainKind::Real
        };
        let request = LeafRequest {
            wrong_key: on(Fault::WrongKeyCert),
            leaf_only: on(Fault::TruncatedChain),
            chain,
            ..LeafRequest::new(registration_id, &csr.spki_der, not_before, not_after)
        };
        let issued = self.issuer.issue(&request)?;
        applied.sort();
        Ok((issued, applied))
    }

    /// The final 200 (`assigned`, or `failed` / `disabled` under a fault).
    fn finish(&self, operation_id: &str, op: &Operation, faults: &FaultSet) -> Outcome {
        let now = OffsetDateTime::now_utc();
        let mut state = Map::new();
        state.insert("registrationId".into(), json!(op.registration_id));
        state.insert("createdDateTimeUtc".into(), json!(rfc3339(op.created)));

        let mut applied = Vec::new();
        let status = if faults.contains(Fault::StatusFailed) {
            applied.push(Fault::StatusFailed);
            "failed"
        } else if faults.contains(Fault::StatusDisabled) {
            applied.push(Fault::StatusDisabled);
            "disabled"
        } else {
            "assigned"
        };

        let mut issued = None;
        match status {
            "failed" => {
                state.insert("status".into(), json!("failed"));
                state.insert("errorCode".into(), json!(ERR_ALLOCATION_FAILED));
                state.insert(
                    "errorMessage".into(),
                    json!("Custom allocation failed with status code: 400"),
                );
            }
            "disabled" => {
                state.insert("status".into(), json!("disabled"));
            }
            _ => {
                if let Some(csr) = &op.csr {
                    match self.issue_leaf(&op.registration_id, csr, faults) {
                        Ok((cert, issue_faults)) => {
                            issued = Some(cert);
                            applied.extend(issue_faults);
                        }
                        Err(e) => {
                            return Outcome::error(
                                500,
                                ERR_SERVER,
                                format!("certificate issuance failed: {e}"),
                                None,
                            )
                            .with_operation(operation_id)
                        }
                    }
                }
                state.insert("assignedHub".into(), json!(self.config.assigned_hub));
                state.insert("deviceId".into(), json!(op.registration_id));
                state.insert("status".into(), json!("assigned"));
                state.insert("substatus".into(), json!("initialAssignment"));
            }
        }
        state.insert("lastUpdatedDateTimeUtc".into(), json!(rfc3339(now)));
        state.insert("etag".into(), json!(etag()));
        if status == "assigned" {
            if let Some(payload) = &op.payload {
                state.insert("payload".into(), payload.clone());
            }
            for (k, v) in op.extra.iter().flatten() {
                state.insert(k.clone(), v.clone());
            }
            if let Some(cert) = &issued {
                let chain: Vec<String> = cert.chain.iter().map(|c| STANDARD.encode(c)).collect();
                state.insert("issuedCertificateChain".into(), json!(chain));
            }
        }

        let mut body = json!({
            "operationId": operation_id,
            "status": status,
            "registrationState": Value::Object(state),
        });
        if faults.contains(Fault::OversizeResponse) {
            applied.push(Fault::OversizeResponse);
            if let Value::Object(map) = &mut body {
                map.insert(
                    "simulatorPadding".into(),
                    json!("x".repeat(OVERSIZE_PADDING)),
                );
            }
        }
        let mut body = body.to_string();
        if faults.contains(Fault::MalformedJson) {
            applied.push(Fault::MalformedJson);
            body = truncate_in_registration_state(&body);
        }
        applied.sort();
        Outcome {
            status: 200,
            retry_after: None,
            body: body.into_bytes(),
            operation_id: Some(operation_id.to_string()),
            registration_status: Some(status.to_string()),
            error_code: None,
            issued,
            faults: applied,
            drop_connection: false,
        }
    }
}

/// The fields of a `DeviceRegistration` body the simulator uses.
#[derive(Debug)]
struct Registration {
    payload: Option<Value>,
    csr: Option<String>,
}

/// Parses a register body. An empty body counts as `{}`; unknown fields are ignored.
fn parse_registration(body: &[u8], registration_id: &str) -> Result<Registration, String> {
    let text = std::str::from_utf8(body).map_err(|_| "request body is not UTF-8".to_string())?;
    let value: Value = if text.trim().is_empty() {
        Value::Object(Map::new())
    } else {
        serde_json::from_str(text).map_err(|e| format!("request body is not valid JSON: {e}"))?
    };
    let Value::Object(obj) = value else {
        return Err("request body must be a JSON object (DeviceRegistration)".into());
    };
    match obj.get("registrationId") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == registration_id => {}
        Some(Value::String(s)) => {
            return Err(format!(
                "registrationId {s:?} in the body does not match the connection's registration id {registration_id:?}"
            ))
        }
        Some(_) => return Err("registrationId must be a string".into()),
    }
    let payload = match obj.get("payload") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(_) => return Err("payload must be a JSON object".into()),
    };
    let csr = match obj.get("csr") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("csr must be a string (base64 DER PKCS#10)".into()),
    };
    Ok(Registration { payload, csr })
}

/// Whether `api_version` (e.g. `2025-07-01-preview`, `2026-04-01`) is at least
/// `2025-07-01-preview`. Compares the leading date; anything unparsable is refused.
pub fn api_version_supports_csr(api_version: &str) -> bool {
    let Some(date) = api_version.get(..10) else {
        return false;
    };
    let well_formed = date.bytes().enumerate().all(|(i, b)| match i {
        4 | 7 => b == b'-',
        _ => b.is_ascii_digit(),
    });
    well_formed && date >= "2025-07-01"
}

/// `extra-fields`: what a later api-version might add (`connectionProfile` is announced for
/// `2026-11-02-preview`), at the top level of every JSON object answer and in its
/// `registrationState`, so a device can show that it ignores fields it does not know. Bodies
/// that are not a JSON object (`malformed-json`) and dropped answers are left alone.
fn with_extra_fields(mut out: Outcome, faults: &FaultSet) -> Outcome {
    if !faults.contains(Fault::ExtraFields) || out.drop_connection {
        return out;
    }
    let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(&out.body) else {
        return out;
    };
    add_unknown_fields(&mut map);
    if let Some(Value::Object(state)) = map.get_mut("registrationState") {
        add_unknown_fields(state);
    }
    out.body = Value::Object(map).to_string().into_bytes();
    out.with_fault(Fault::ExtraFields)
}

fn add_unknown_fields(m: &mut Map<String, Value>) {
    m.insert(
        "connectionProfile".into(),
        json!({"protocol": "mqtt5", "hostName": "future.example.net", "port": 8883}),
    );
    m.insert(
        "futureField".into(),
        json!({"enabled": true, "items": [1, "two", null, {"three": 3.0}]}),
    );
}

/// The request body as the events file shows it: parsed JSON, or the raw text.
pub fn body_for_event(body: &[u8]) -> Value {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => v,
        Err(_) => Value::String(String::from_utf8_lossy(body).into_owned()),
    }
}

/// Cuts a serialized body a little after the start of `registrationState`, so it is
/// certainly not valid JSON.
fn truncate_in_registration_state(body: &str) -> String {
    let cut = body
        .find("\"registrationState\"")
        .map(|i| i + "\"registrationState\":{\"registrationId\":\"".len())
        .unwrap_or(body.len() / 2)
        .min(body.len());
    let mut end = cut;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    body[..end].to_string()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// A random version-4 UUID in the usual 8-4-4-4-12 form.
pub fn uuid_like() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// DPS etags are base64 of a quoted GUID.
fn etag() -> String {
    STANDARD.encode(format!("\"{}\"", uuid_like()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData,
        PKCS_ECDSA_P384_SHA384,
    };

    const REG: &str = "gw-0001";

    fn ctx() -> RequestContext<'static> {
        RequestContext {
            registration_id: REG,
            api_version: CSR_API_VERSION,
            extra: None,
        }
    }

    fn service(pba: u32) -> (tempfile::TempDir, Dps) {
        let dir = tempfile::tempdir().unwrap();
        pki::generate(dir.path(), &[], false).unwrap();
        let dps = Dps::new(
            DpsConfig {
                assigned_hub: "localhost".into(),
                retry_after: 2,
                polls_before_assign: pba,
                cert_validity: Duration::from_secs(3600),
            },
            CertIssuer::load(dir.path()).unwrap(),
        );
        (dir, dps)
    }

    fn csr(cn: &str) -> String {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        STANDARD.encode(p.serialize_request(&key).unwrap().der())
    }

    fn json_body(o: &Outcome) -> Value {
        serde_json::from_slice(&o.body).unwrap()
    }

    fn none() -> FaultSet {
        FaultSet::default()
    }

    #[test]
    fn register_poll_assigned_with_chain() {
        let (_d, dps) = service(1);
        let body = json!({"registrationId": REG, "csr": csr(REG), "payload": {"a": 1}});
        let r = dps.register(ctx(), body.to_string().as_bytes(), &none());
        assert_eq!(r.status, 202);
        assert_eq!(r.retry_after, Some(2));
        let op = r.operation_id.clone().unwrap();
        assert!(op.starts_with("4.") && op.len() == 2 + 16 + 1 + 36, "{op}");
        assert_eq!(json_body(&r)["status"], "assigning");

        let p1 = dps.poll(ctx(), Some(&op), &none());
        assert_eq!((p1.status, p1.retry_after), (202, Some(2)));
        let p2 = dps.poll(ctx(), Some(&op), &none());
        assert_eq!((p2.status, p2.retry_after), (200, None));
        assert!(p2.issued.is_some());
        let b = json_body(&p2);
        assert_eq!(b["status"], "assigned");
        assert_eq!(b["operationId"], op.as_str());
        let rs = &b["registrationState"];
        assert_eq!(rs["deviceId"], REG);
        assert_eq!(rs["assignedHub"], "localhost");
        assert_eq!(rs["substatus"], "initialAssignment");
        assert_eq!(rs["payload"], json!({"a": 1}));
        assert_eq!(rs["issuedCertificateChain"].as_array().unwrap().len(), 3);

        // Polling again repeats the answer without issuing again.
        let p3 = dps.poll(ctx(), Some(&op), &none());
        assert_eq!(p3.status, 200);
        assert!(p3.issued.is_none());
        assert_eq!(json_body(&p3), b);
    }

    #[test]
    fn no_csr_no_chain_and_zero_polls() {
        let (_d, dps) = service(0);
        let r = dps.register(ctx(), b"", &none());
        assert_eq!(r.status, 202);
        let p = dps.poll(ctx(), r.operation_id.as_deref(), &none());
        assert_eq!(p.status, 200);
        let b = json_body(&p);
        assert!(b["registrationState"]
            .get("issuedCertificateChain")
            .is_none());
        assert!(b["registrationState"].get("payload").is_none());
    }

    #[test]
    fn bad_bodies_get_400004() {
        let (_d, dps) = service(1);
        for body in [
            &b"{not json"[..],
            b"[1,2]",
            br#"{"registrationId":"other"}"#,
            br#"{"registrationId":5}"#,
            br#"{"payload":"x"}"#,
            br#"{"csr":42}"#,
        ] {
            let r = dps.register(ctx(), body, &none());
            assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(body));
            let b = json_body(&r);
            assert_eq!(b["errorCode"], ERR_BAD_REQUEST);
            assert!(b["trackingId"].as_str().unwrap().len() == 36);
            assert!(b["timestampUtc"].as_str().unwrap().ends_with('Z'));
        }
        // Unknown fields are ignored.
        let r = dps.register(ctx(), br#"{"registrationId":"gw-0001","x":{}}"#, &none());
        assert_eq!(r.status, 202);
    }

    #[test]
    fn csr_errors_and_old_api_version() {
        let (_d, dps) = service(1);
        let body = json!({"csr": csr("someone-else")}).to_string();
        let r = dps.register(ctx(), body.as_bytes(), &none());
        assert_eq!(r.status, 400);
        assert_eq!(r.error_code, Some(issue::ERR_CSR_SUBJECT));

        let old = RequestContext {
            registration_id: REG,
            api_version: "2021-06-01",
            extra: None,
        };
        let body = json!({"csr": csr(REG)}).to_string();
        let r = dps.register(old, body.as_bytes(), &none());
        assert_eq!(r.status, 400);
        assert_eq!(r.error_code, Some(ERR_API_VERSION));
        // Without a CSR an old api-version is fine.
        assert_eq!(dps.register(old, b"{}", &none()).status, 202);
    }

    #[test]
    fn unknown_or_foreign_operation_is_404() {
        let (_d, dps) = service(1);
        let p = dps.poll(ctx(), Some("4.0.nope"), &none());
        assert_eq!(p.status, 404);
        assert_eq!(p.error_code, Some(ERR_OPERATION_NOT_FOUND));
        let r = dps.register(ctx(), b"{}", &none());
        let other = RequestContext {
            registration_id: "gw-0002",
            api_version: CSR_API_VERSION,
            extra: None,
        };
        assert_eq!(
            dps.poll(other, r.operation_id.as_deref(), &none()).status,
            404
        );
        assert_eq!(dps.poll(ctx(), None, &none()).status, 400);
    }

    #[test]
    fn throttle_first_register_and_first_poll() {
        let (_d, dps) = service(0);
        let f = FaultSet::new([Fault::Throttle]);
        let r = dps.register(ctx(), b"{}", &f);
        assert_eq!((r.status, r.retry_after), (429, Some(2)));
        assert_eq!(json_body(&r)["errorCode"], ERR_THROTTLED);
        let r = dps.register(ctx(), b"{}", &f);
        assert_eq!(r.status, 202);
        let op = r.operation_id.unwrap();
        let p = dps.poll(ctx(), Some(&op), &f);
        assert_eq!((p.status, p.retry_after), (429, Some(2)));
        assert_eq!(p.operation_id.as_deref(), Some(op.as_str()));
        assert_eq!(dps.poll(ctx(), Some(&op), &f).status, 200);
    }

    #[test]
    fn server_error_first_register_only() {
        let (_d, dps) = service(1);
        let f = FaultSet::new([Fault::ServerError]);
        let r = dps.register(ctx(), b"{}", &f);
        assert_eq!((r.status, r.retry_after), (500, None));
        assert_eq!(json_body(&r)["errorCode"], ERR_SERVER);
        assert_eq!(dps.register(ctx(), b"{}", &f).status, 202);
    }

    #[test]
    fn slow_assign_needs_three_polls() {
        let (_d, dps) = service(1);
        let f = FaultSet::new([Fault::SlowAssign]);
        let op = dps.register(ctx(), b"{}", &f).operation_id.unwrap();
        for _ in 0..3 {
            assert_eq!(dps.poll(ctx(), Some(&op), &f).status, 202);
        }
        assert_eq!(dps.poll(ctx(), Some(&op), &f).status, 200);
    }

    #[test]
    fn failed_and_disabled_have_no_chain() {
        let (_d, dps) = service(0);
        let body = json!({"csr": csr(REG)}).to_string();
        let f = FaultSet::new([Fault::StatusFailed]);
        let op = dps
            .register(ctx(), body.as_bytes(), &f)
            .operation_id
            .unwrap();
        let p = dps.poll(ctx(), Some(&op), &f);
        assert_eq!(p.status, 200);
        assert!(p.issued.is_none());
        let b = json_body(&p);
        assert_eq!(b["status"], "failed");
        assert_eq!(b["registrationState"]["status"], "failed");
        assert_eq!(b["registrationState"]["errorCode"], ERR_ALLOCATION_FAILED);
        assert!(b["registrationState"]
            .get("issuedCertificateChain")
            .is_none());

        let f = FaultSet::new([Fault::StatusDisabled]);
        let op = dps
            .register(ctx(), body.as_bytes(), &f)
            .operation_id
            .unwrap();
        let b = json_body(&dps.poll(ctx(), Some(&op), &f));
        assert_eq!(b["status"], "disabled");
        assert!(b["registrationState"]
            .get("issuedCertificateChain")
            .is_none());
    }

    #[test]
    fn malformed_json_is_cut_in_registration_state() {
        let (_d, dps) = service(0);
        let f = FaultSet::new([Fault::MalformedJson]);
        let op = dps.register(ctx(), b"{}", &f).operation_id.unwrap();
        let p = dps.poll(ctx(), Some(&op), &f);
        assert_eq!(p.status, 200);
        assert!(serde_json::from_slice::<Value>(&p.body).is_err());
        let text = String::from_utf8(p.body).unwrap();
        assert!(text.contains("\"registrationState\":{"), "{text}");
        assert_eq!(p.faults, vec![Fault::MalformedJson]);
    }

    fn csr_and_key(cn: &str) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        let csr = STANDARD.encode(p.serialize_request(&key).unwrap().der());
        (key, csr)
    }

    /// Registers with a fresh CSR and polls to the final answer with `faults` on. Returns the
    /// PKI dir, the CSR key, the final answer and the chain it carries (DER).
    fn final_under(faults: &[Fault]) -> (tempfile::TempDir, KeyPair, Outcome, Vec<Vec<u8>>) {
        let (dir, dps) = service(0);
        let f = FaultSet::new(faults.iter().copied());
        let (key, csr) = csr_and_key(REG);
        let body = json!({"csr": csr}).to_string();
        let r = dps.register(ctx(), body.as_bytes(), &f);
        assert_eq!(r.status, 202);
        let p = dps.poll(ctx(), r.operation_id.as_deref(), &f);
        assert_eq!(p.status, 200);
        let b = json_body(&p);
        let chain = b["registrationState"]["issuedCertificateChain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| STANDARD.decode(c.as_str().unwrap()).unwrap())
            .collect();
        (dir, key, p, chain)
    }

    fn parse(der: &[u8]) -> x509_parser::certificate::X509Certificate<'_> {
        x509_parser::parse_x509_certificate(der).unwrap().1
    }

    fn real(dir: &tempfile::TempDir, stem: &str) -> Vec<u8> {
        pki::load_cert(&pki::cert_file(dir.path(), stem))
            .unwrap()
            .to_vec()
    }

    /// Whether `chain` (leaf first) verifies for client auth up to `root` (webpki, now).
    fn verifies_to(chain: &[Vec<u8>], root: &[u8]) -> bool {
        use rustls::pki_types::{CertificateDer, UnixTime};
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(root.to_vec())).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let certs: Vec<CertificateDer<'static>> = chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        verifier
            .verify_client_cert(&certs[0], &certs[1..], UnixTime::now())
            .is_ok()
    }

    #[test]
    fn no_fault_chain_verifies_to_the_issuing_root() {
        let (dir, key, p, chain) = final_under(&[]);
        assert!(p.faults.is_empty());
        assert!(verifies_to(&chain, &real(&dir, pki::ISSUING_ROOT)));
        assert_eq!(
            parse(&chain[0]).public_key().raw,
            key.subject_public_key_info().as_slice()
        );
    }

    #[test]
    fn wrong_key_cert_leaf_key_is_not_the_csr_key() {
        let (dir, key, p, chain) = final_under(&[Fault::WrongKeyCert]);
        assert_eq!(p.faults, vec![Fault::WrongKeyCert]);
        let leaf = parse(&chain[0]);
        assert_ne!(
            leaf.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        assert_eq!(leaf.subject().to_string(), format!("CN={REG}"));
        // Otherwise a perfectly good chain.
        assert!(verifies_to(&chain, &real(&dir, pki::ISSUING_ROOT)));
        let issued = p.issued.unwrap();
        assert_eq!(
            issued.csr_spki_sha256,
            issue::sha256_hex(&key.subject_public_key_info())
        );
        assert_ne!(issued.leaf_spki_sha256, issued.csr_spki_sha256);
    }

    #[test]
    fn bad_chain_leaf_issuer_is_not_in_the_chain() {
        let (dir, key, p, chain) = final_under(&[Fault::BadChain]);
        assert_eq!(p.faults, vec![Fault::BadChain]);
        assert_eq!(chain.len(), 3);
        let leaf = parse(&chain[0]);
        let real_ca_der = real(&dir, pki::ISSUING_CA);
        let real_ca = parse(&real_ca_der);
        assert_eq!(leaf.issuer(), real_ca.subject());
        assert!(leaf.verify_signature(Some(real_ca.public_key())).is_ok());
        assert_eq!(
            leaf.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        for other in &chain[1..] {
            let other = parse(other);
            assert_ne!(other.subject(), leaf.issuer());
            assert!(other.subject().to_string().contains("Unrelated"));
        }
        assert!(!verifies_to(&chain, &real(&dir, pki::ISSUING_ROOT)));
        assert!(!verifies_to(&chain, &chain[2]));
    }

    #[test]
    fn foreign_chain_verifies_to_its_own_root_only() {
        let (dir, key, p, chain) = final_under(&[Fault::ForeignChain]);
        assert_eq!(p.faults, vec![Fault::ForeignChain]);
        assert_eq!(chain.len(), 3);
        let leaf = parse(&chain[0]);
        assert_eq!(leaf.subject().to_string(), format!("CN={REG}"));
        assert_eq!(
            leaf.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        assert_eq!(
            parse(&chain[2]).subject().to_string(),
            format!("CN={}", issue::FOREIGN_ROOT_CN)
        );
        assert!(verifies_to(&chain, &chain[2]));
        assert!(!verifies_to(&chain, &real(&dir, pki::ISSUING_ROOT)));
        // Not even the hub's anchor (the issuing CA) accepts it.
        assert!(!verifies_to(&chain, &real(&dir, pki::ISSUING_CA)));
    }

    #[test]
    fn expired_and_not_yet_valid_dates() {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let (_d, _k, p, chain) = final_under(&[Fault::ExpiredCert]);
        assert_eq!(p.faults, vec![Fault::ExpiredCert]);
        let v = parse(&chain[0]).validity().clone();
        assert!((v.not_before.timestamp() - (now - 2 * 86_400)).abs() <= 2);
        assert!((v.not_after.timestamp() - (now - 86_400)).abs() <= 2);

        let (_d, _k, p, chain) = final_under(&[Fault::NotYetValidCert]);
        assert_eq!(p.faults, vec![Fault::NotYetValidCert]);
        let v = parse(&chain[0]).validity().clone();
        assert!((v.not_before.timestamp() - (now + 86_400)).abs() <= 2);
        assert!((v.not_after.timestamp() - (now + 30 * 86_400)).abs() <= 2);

        // expired-cert wins when both are on.
        let (_d, _k, p, _chain) = final_under(&[Fault::NotYetValidCert, Fault::ExpiredCert]);
        assert_eq!(p.faults, vec![Fault::ExpiredCert]);
        assert!(p.issued.unwrap().not_after.unix_timestamp() < now);
    }

    #[test]
    fn short_lived_overrides_cert_validity() {
        let (_d, _k, p, chain) = final_under(&[Fault::ShortLived]);
        assert_eq!(p.faults, vec![Fault::ShortLived]);
        let v = parse(&chain[0]).validity().clone();
        assert_eq!(v.not_after.timestamp() - v.not_before.timestamp(), 30);
    }

    #[test]
    fn truncated_chain_holds_only_the_leaf_and_faults_combine() {
        let (_d, key, p, chain) = final_under(&[Fault::TruncatedChain, Fault::ExpiredCert]);
        assert_eq!(p.faults, vec![Fault::ExpiredCert, Fault::TruncatedChain]);
        assert_eq!(chain.len(), 1);
        assert_eq!(
            parse(&chain[0]).public_key().raw,
            key.subject_public_key_info().as_slice()
        );
    }

    #[test]
    fn retry_after_large_on_every_register() {
        let (_d, dps) = service(0);
        let f = FaultSet::new([Fault::RetryAfterLarge, Fault::Throttle]);
        for _ in 0..3 {
            let r = dps.register(ctx(), b"{}", &f);
            assert_eq!((r.status, r.retry_after), (429, Some(RETRY_AFTER_LARGE)));
            assert_eq!(r.error_code, Some(ERR_THROTTLED));
            assert_eq!(r.faults, vec![Fault::RetryAfterLarge]);
        }
        // Switched off: the next register goes through (throttle still has its one 429).
        assert_eq!(dps.register(ctx(), b"{}", &none()).status, 202);
    }

    #[test]
    fn drop_after_register_once_per_registration_id() {
        let (_d, dps) = service(0);
        let f = FaultSet::new([Fault::DropAfterRegister]);
        let r = dps.register(ctx(), b"{}", &f);
        assert!(r.drop_connection);
        assert!(r.body.is_empty());
        assert_eq!(r.faults, vec![Fault::DropAfterRegister]);
        let again = dps.register(ctx(), b"{}", &f);
        assert!(!again.drop_connection);
        assert_eq!(again.status, 202);
        let other = RequestContext {
            registration_id: "gw-0002",
            api_version: CSR_API_VERSION,
            extra: None,
        };
        assert!(dps.register(other, b"{}", &f).drop_connection);
        // Polls are never dropped.
        let p = dps.poll(ctx(), again.operation_id.as_deref(), &f);
        assert_eq!((p.status, p.drop_connection), (200, false));
    }

    #[test]
    fn oversize_response_is_valid_json_beyond_96k() {
        let (_d, _k, p, chain) = final_under(&[Fault::OversizeResponse]);
        assert_eq!(p.faults, vec![Fault::OversizeResponse]);
        assert!(
            p.body.len() > 96 * 1024 + OVERSIZE_PADDING / 2,
            "{}",
            p.body.len()
        );
        assert!(p.body.len() > 200 * 1024);
        let b = json_body(&p);
        assert_eq!(b["status"], "assigned");
        assert_eq!(
            b["simulatorPadding"].as_str().unwrap().len(),
            OVERSIZE_PADDING
        );
        assert_eq!(chain.len(), 3);
    }

    #[test]
    fn csr_reject_only_when_a_csr_is_sent() {
        let (_d, dps) = service(0);
        let f = FaultSet::new([Fault::CsrReject]);
        let body = json!({"csr": csr(REG)}).to_string();
        for _ in 0..2 {
            let r = dps.register(ctx(), body.as_bytes(), &f);
            assert_eq!(r.status, 400);
            assert_eq!(r.error_code, Some(400_040));
            assert_eq!(r.faults, vec![Fault::CsrReject]);
            let b = json_body(&r);
            assert_eq!(b["errorCode"], 400_040);
            assert_eq!(b["message"], "The certificate signing request is not valid");
        }
        let r = dps.register(ctx(), b"{}", &f);
        assert_eq!(r.status, 202);
        assert!(r.faults.is_empty());
    }

    #[test]
    fn extra_fields_everywhere_and_nothing_else_changes() {
        let (_dir, dps) = service(0);
        let faults = FaultSet::new([Fault::ExtraFields]);
        let a = dps.register(ctx(), br#"{"registrationId":"gw-0001"}"#, &faults);
        assert_eq!(a.status, 202);
        assert_eq!(a.faults, vec![Fault::ExtraFields]);
        let body = json_body(&a);
        assert_eq!(body["status"], "assigning");
        assert_eq!(body["futureField"]["enabled"], true);
        assert_eq!(body["connectionProfile"]["port"], 8883);
        let op = a.operation_id.clone().unwrap();
        let done = dps.poll(ctx(), Some(&op), &faults);
        let body = json_body(&done);
        assert_eq!(body["status"], "assigned");
        assert_eq!(body["registrationState"]["deviceId"], REG);
        assert!(body["registrationState"]["futureField"].is_object());
        assert!(body["connectionProfile"].is_object());
        // Errors too; dropped answers stay dropped.
        let err = dps.poll(ctx(), None, &faults);
        assert_eq!(err.status, 400);
        assert!(json_body(&err)["futureField"].is_object());
        let both = FaultSet::new([Fault::ExtraFields, Fault::DropAfterRegister]);
        assert!(dps.register(ctx(), b"{}", &both).drop_connection);
    }

    #[test]
    fn api_versions() {
        assert!(api_version_supports_csr("2025-07-01-preview"));
        assert!(api_version_supports_csr("2026-04-01"));
        assert!(!api_version_supports_csr("2021-06-01"));
        assert!(!api_version_supports_csr("2019-03-31"));
        assert!(!api_version_supports_csr("latest"));
        assert!(!api_version_supports_csr("2025-7-1"));
    }

    #[test]
    fn uuid_shape() {
        let u = uuid_like();
        assert_eq!(u.len(), 36);
        assert_eq!(u.matches('-').count(), 4);
        assert_eq!(&u[14..15], "4");
    }
}
