//! The DPS device API: one registration attempt, from connect to an assignment
//! with an issued certificate chain. Owns the retry rules inside an attempt
//! (protocol.md §7): retry-after honoured exactly, 2 s between polls when none is
//! given, at most 5 polls in 10 s, 429 and 5xx retried with backoff, other 4xx
//! fatal, and an overall deadline; and the onboarding credential's part of the
//! conversation: a SAS token on every connection or request (symmetric key,
//! TPM) and the TPM challenge (401 with an `authenticationKey`, answered by the
//! TPM). The transports (MQTT, HTTPS) only move bytes.

mod https;
mod mqtt;
mod onboarding;
pub mod sas;
pub mod wire;

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::{self, DpsConfig};
use crate::tls::{find_rustls_error, HandshakeFailure};
use onboarding::Authorizer;
pub use onboarding::{read_key_file, CredentialError, Onboarding};
use sas::SasToken;
use wire::{Reply, ServiceError};

/// What the caller asks DPS for.
#[derive(Debug, Clone)]
pub struct RegistrationRequest {
    /// Base64 DER PKCS#10, one line.
    pub csr_base64: String,
}

/// A successful registration.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub assigned_hub: String,
    pub device_id: String,
    pub substatus: Option<String>,
    /// DER certificates as received (order not yet checked).
    pub issued_chain: Vec<Vec<u8>>,
}

/// Why a registration attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum DpsError {
    #[error("cannot reach DPS at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("the DPS server at {endpoint} is not trusted: {reason}; check [dps] trust_bundle (and the clock)")]
    ServerNotTrusted { endpoint: String, reason: String },
    #[error("DPS at {endpoint} refused the {} ({detail}): {}", .method.credential(), .method.refusal_fix())]
    AuthRefused {
        endpoint: String,
        detail: String,
        method: Method,
    },
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error("the connection to DPS broke: {reason}")]
    ConnectionLost { reason: String },
    #[error("DPS answered {0}")]
    Service(ServiceError),
    #[error("DPS refused the registration (status \"failed\"{}): {message}", .error_code.map(|c| format!(", error {c}")).unwrap_or_default())]
    Failed {
        error_code: Option<i64>,
        message: String,
    },
    #[error("DPS says the enrollment is disabled: enable it (or the device's registration) in the DPS enrollment")]
    Disabled,
    #[error("DPS sent a reply the agent cannot use: {reason}")]
    Malformed { reason: String },
    #[error("DPS assigned the device but issued no certificate chain: link the enrollment to an ADR credential policy (credentialPolicyName) and check api_version")]
    NoChain,
    #[error("no assignment within {}s{}", .after.as_secs(), .last.as_ref().map(|l| format!(" (last problem: {l})")).unwrap_or_default())]
    Timeout {
        after: Duration,
        last: Option<String>,
    },
}

impl DpsError {
    /// Whether a later attempt may succeed without anything changing on the device.
    pub fn is_transient(&self) -> bool {
        match self {
            DpsError::Unreachable { .. }
            | DpsError::ConnectionLost { .. }
            | DpsError::Timeout { .. } => true,
            DpsError::Service(e) => e.status == 429 || e.status >= 500,
            _ => false,
        }
    }

    /// The delay DPS asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DpsError::Service(e) => e.retry_after.map(Duration::from_secs),
            _ => None,
        }
    }

    /// A short machine-readable kind, for the events of the status and D-Bus.
    pub fn kind(&self) -> &'static str {
        match self {
            DpsError::Unreachable { .. } => "unreachable",
            DpsError::ServerNotTrusted { .. } => "server-not-trusted",
            DpsError::AuthRefused { .. } => "auth-refused",
            DpsError::Credential(_) => "credential",
            DpsError::ConnectionLost { .. } => "connection-lost",
            DpsError::Service(_) => "service-error",
            DpsError::Failed { .. } => "failed",
            DpsError::Disabled => "disabled",
            DpsError::Malformed { .. } => "malformed-reply",
            DpsError::NoChain => "no-chain",
            DpsError::Timeout { .. } => "timeout",
        }
    }
}

/// How the device proves itself, for messages that must say what to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    X509,
    SymmetricKey { group: bool },
    Tpm,
}

impl Method {
    /// What DPS refused.
    pub fn credential(self) -> &'static str {
        match self {
            Method::X509 => "bootstrap credential",
            Method::SymmetricKey { .. } => "symmetric key (SAS token)",
            Method::Tpm => "TPM attestation",
        }
    }

    /// What to check when DPS refuses it.
    pub fn refusal_fix(self) -> &'static str {
        match self {
            Method::X509 => "check that the enrollment trusts the CA that issued the bootstrap certificate and that its CN is the registration id",
            Method::SymmetricKey { group: false } => "check that [dps.attestation] key_file holds the individual enrollment's primary or secondary key, that [dps] registration_id is the enrolled one, and that the device clock is right (tokens are valid for 5 minutes)",
            Method::SymmetricKey { group: true } => "check that [dps.attestation] key_file holds the enrollment group's primary or secondary key (the device key is derived from it and registration_id), that the group is enabled, and that the device clock is right (tokens are valid for 5 minutes)",
            Method::Tpm => "check that DPS has an individual enrollment for this TPM's endorsement key with this registration id (`dps-agent tpm ek` prints both)",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::X509 => "x509",
            Method::SymmetricKey { group: false } => "symmetric_key (individual)",
            Method::SymmetricKey { group: true } => "symmetric_key (group)",
            Method::Tpm => "tpm",
        })
    }
}

/// One operation of the device API, whatever the transport.
#[derive(Debug, Clone, Copy)]
enum Op<'a> {
    Register { body: &'a [u8] },
    Poll { operation_id: &'a str },
}

/// A request: the operation and the SAS token that authorizes it, if any
/// (HTTPS sends it as `Authorization`; MQTT uses it as the password of a
/// new connection).
#[derive(Debug, Clone, Copy)]
struct Request<'a> {
    op: Op<'a>,
    auth: Option<&'a SasToken>,
}

/// A reply, before interpretation.
#[derive(Debug, Clone, Default)]
struct RawReply {
    status: u16,
    retry_after: Option<u64>,
    body: Vec<u8>,
    /// `x-ms-error-code` (HTTPS only).
    error_code: Option<String>,
}

impl RawReply {
    /// What the reply means; an error code in a header completes the body's.
    fn interpret(&self) -> Result<Reply, String> {
        let mut reply = wire::parse_reply(self.status, self.retry_after, &self.body)?;
        if let (Reply::Error(e), Some(code)) = (&mut reply, &self.error_code) {
            if e.error_code.is_none() {
                match code.trim().parse() {
                    Ok(n) => e.error_code = Some(n),
                    Err(_) if e.message.is_none() => e.message = Some(wire::clip(code, 100)),
                    Err(_) => {}
                }
            }
        }
        Ok(reply)
    }
}

/// The transport of one attempt.
enum Connection {
    Mqtt(Box<mqtt::MqttTransport>),
    Https(https::HttpsTransport),
}

impl Connection {
    async fn request(&mut self, request: Request<'_>) -> Result<RawReply, DpsError> {
        match self {
            Connection::Mqtt(t) => t.request(request).await,
            Connection::Https(t) => t.request(request).await,
        }
    }

    async fn close(&mut self) {
        match self {
            Connection::Mqtt(t) => t.close().await,
            Connection::Https(t) => t.close().await,
        }
    }
}

/// Default wait between polls when DPS gives no retry-after.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Connection failures tolerated inside one attempt before giving up on it.
const MAX_CONNECT_FAILURES: u32 = 3;

/// Registers with DPS: connects, sends the registration with the CSR, polls
/// until a final answer, and returns the assignment. `onboarding` carries the
/// onboarding credential (see [`Onboarding`]).
pub async fn register(
    cfg: &DpsConfig,
    onboarding: &Onboarding,
    request: &RegistrationRequest,
) -> Result<Assignment, DpsError> {
    let body = wire::register_body(
        &cfg.registration_id,
        Some(&request.csr_base64),
        cfg.payload.as_ref(),
        onboarding.tpm_keys(),
    );
    let method = onboarding.method();
    let tls = onboarding.tls();
    let mut transport = match cfg.transport {
        config::Transport::Mqtt => {
            Connection::Mqtt(Box::new(mqtt::MqttTransport::new(cfg, tls, method)))
        }
        config::Transport::Https => Connection::Https(https::HttpsTransport::new(cfg, tls, method)),
    };
    let mut auth = onboarding.authorizer(cfg);
    let now = Instant::now();
    let deadline = now
        .checked_add(cfg.attempt_timeout)
        .unwrap_or(now + Duration::from_secs(24 * 3600));
    let attempt = Attempt {
        endpoint: cfg.endpoint.to_string(),
        method,
        deadline,
        budget: cfg.attempt_timeout,
    };
    let result = run_attempt(&mut transport, &mut auth, &body, &attempt).await;
    transport.close().await;
    result
}

/// The fixed facts of one attempt.
struct Attempt {
    endpoint: String,
    method: Method,
    deadline: Instant,
    budget: Duration,
}

/// The transport-independent request/poll loop.
async fn run_attempt(
    transport: &mut Connection,
    auth: &mut Authorizer<'_>,
    body: &[u8],
    attempt: &Attempt,
) -> Result<Assignment, DpsError> {
    let (deadline, budget) = (attempt.deadline, attempt.budget);
    let mut operation: Option<String> = None;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut polls = PollLimiter::new(5, Duration::from_secs(10));
    let mut connect_failures = 0u32;
    loop {
        let op = match &operation {
            None => Op::Register { body },
            Some(op) => {
                polls.wait().await;
                Op::Poll { operation_id: op }
            }
        };
        let exchange = async {
            let token = auth.token().await?;
            let reply = transport
                .request(Request {
                    op,
                    auth: token.as_ref(),
                })
                .await;
            Ok::<_, DpsError>(reply)
        };
        let outcome = match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(DpsError::Timeout {
                    after: budget,
                    last: None,
                })
            }
        };
        if let Ok(raw) = &outcome {
            // TPM attestation: the first registration is answered 401 with the
            // key to activate; then the registration is sent again, signed.
            if raw.status == 401
                && matches!(op, Op::Register { .. })
                && auth.accept_challenge(&raw.body).await?
            {
                continue;
            }
        }
        let (wait, problem) = match outcome {
            Ok(raw) => match raw.interpret() {
                Ok(Reply::Assigning {
                    operation_id,
                    retry_after,
                }) => {
                    log::debug!(
                        "DPS: operation {operation_id} assigning; next poll in {}s",
                        retry_after.unwrap_or(2)
                    );
                    operation = Some(operation_id);
                    backoff.reset();
                    connect_failures = 0;
                    (
                        retry_after
                            .map(Duration::from_secs)
                            .unwrap_or(DEFAULT_POLL_INTERVAL),
                        None,
                    )
                }
                Ok(Reply::Assigned(state)) => {
                    if let Some(key) = &state.tpm_authentication_key {
                        auth.accept_assigned_key(key).await;
                    }
                    return assignment(*state);
                }
                Ok(Reply::Failed {
                    error_code,
                    message,
                }) => {
                    return Err(DpsError::Failed {
                        error_code,
                        message,
                    })
                }
                Ok(Reply::Disabled) => return Err(DpsError::Disabled),
                Ok(Reply::Error(e)) if e.status == 429 || e.status >= 500 => {
                    connect_failures = 0;
                    // A registration is retried no sooner than the backoff
                    // allows, whatever retry-after says (0 would spin: the
                    // poll limit covers polls only). One backoff draw per
                    // failure either way.
                    let wait = match e.retry_after.map(Duration::from_secs) {
                        Some(ra) if operation.is_none() => ra.max(backoff.next_delay()),
                        Some(ra) => ra,
                        None => backoff.next_delay(),
                    };
                    log::info!("DPS: {e}; retrying in {}s", wait.as_secs_f32());
                    (wait, Some(DpsError::Service(e)))
                }
                Ok(Reply::Error(e)) if e.status == 401 => {
                    return Err(DpsError::AuthRefused {
                        endpoint: attempt.endpoint.clone(),
                        detail: e.to_string(),
                        method: attempt.method,
                    })
                }
                Ok(Reply::Error(e)) => return Err(DpsError::Service(e)),
                Err(reason) => return Err(DpsError::Malformed { reason }),
            },
            Err(e) if e.is_transient() => {
                // No answer at all (no route, no name, refused, dropped): a few
                // in a row end the attempt, so the failure is recorded and shown
                // (status, D-Bus) instead of retried silently until the deadline.
                if matches!(
                    e,
                    DpsError::Unreachable { .. } | DpsError::ConnectionLost { .. }
                ) {
                    connect_failures += 1;
                    if connect_failures >= MAX_CONNECT_FAILURES {
                        return Err(e);
                    }
                }
                let wait = backoff.next_delay();
                log::info!("DPS: {e}; retrying in {:.1}s", wait.as_secs_f32());
                (wait, Some(e))
            }
            Err(e) => return Err(e),
        };
        if Instant::now()
            .checked_add(wait)
            .is_none_or(|wake| wake > deadline)
        {
            // Do not sleep past the deadline: hand the problem (and DPS's
            // retry-after) to the caller, who schedules the next attempt.
            return Err(match problem {
                Some(e) => e,
                None => DpsError::Timeout {
                    after: budget,
                    last: Some(format!("DPS asked to wait {}s", wait.as_secs())),
                },
            });
        }
        tokio::time::sleep(wait).await;
    }
}

/// A TLS failure as the DPS error that says what to do: an untrusted server,
/// a refused client certificate, or just no handshake.
fn classify_tls(tls: rustls::Error, endpoint: &str, method: Method) -> DpsError {
    let endpoint = endpoint.to_string();
    match crate::tls::handshake_failure(&tls) {
        HandshakeFailure::ServerNotTrusted(reason) => {
            DpsError::ServerNotTrusted { endpoint, reason }
        }
        HandshakeFailure::ClientRefused(detail) => DpsError::AuthRefused {
            endpoint,
            detail,
            method,
        },
        HandshakeFailure::Other(reason) => DpsError::Unreachable { endpoint, reason },
    }
}

fn assignment(state: wire::RegistrationState) -> Result<Assignment, DpsError> {
    let issued_chain = match state.issued_chain {
        Some(c) if !c.is_empty() => c,
        _ => return Err(DpsError::NoChain),
    };
    Ok(Assignment {
        assigned_hub: state.assigned_hub,
        device_id: state.device_id,
        substatus: state.substatus,
        issued_chain,
    })
}

/// Keeps polls under DPS's limit of `max` per `window` per device.
struct PollLimiter {
    max: usize,
    window: Duration,
    recent: VecDeque<Instant>,
}

impl PollLimiter {
    fn new(max: usize, window: Duration) -> Self {
        PollLimiter {
            max,
            window,
            recent: VecDeque::new(),
        }
    }

    /// How long to wait before the next poll at time `now`.
    fn delay_at(&mut self, now: Instant) -> Duration {
        while self
            .recent
            .front()
            .is_some_and(|&t| now.duration_since(t) >= self.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() < self.max {
            return Duration::ZERO;
        }
        let oldest = self.recent.front().copied().unwrap_or(now);
        (oldest + self.window).saturating_duration_since(now)
    }

    async fn wait(&mut self) {
        let d = self.delay_at(Instant::now());
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        self.recent.push_back(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_limiter_allows_five_per_ten_seconds() {
        let mut l = PollLimiter::new(5, Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(l.delay_at(t0 + Duration::from_millis(i)), Duration::ZERO);
            l.recent.push_back(t0 + Duration::from_millis(i));
        }
        let d = l.delay_at(t0 + Duration::from_secs(1));
        assert_eq!(d, Duration::from_secs(9));
        assert_eq!(l.delay_at(t0 + Duration::from_secs(10)), Duration::ZERO);
    }

    #[test]
    fn header_error_code_completes_the_body() {
        let raw = RawReply {
            status: 401,
            body: br#"{"message":"bad sig"}"#.to_vec(),
            error_code: Some("401002".into()),
            ..Default::default()
        };
        let Ok(Reply::Error(e)) = raw.interpret() else {
            panic!()
        };
        assert_eq!(
            (e.error_code, e.message.as_deref()),
            (Some(401002), Some("bad sig"))
        );
        // The body wins over the header; a non-numeric header fills an empty message.
        let raw = RawReply {
            status: 404,
            body: br#"{"errorCode":404201}"#.to_vec(),
            error_code: Some("404001".into()),
            ..Default::default()
        };
        let Ok(Reply::Error(e)) = raw.interpret() else {
            panic!()
        };
        assert_eq!(e.error_code, Some(404201));
        let raw = RawReply {
            status: 400,
            error_code: Some("DeviceNotFound".into()),
            ..Default::default()
        };
        let Ok(Reply::Error(e)) = raw.interpret() else {
            panic!()
        };
        assert_eq!(e.message.as_deref(), Some("DeviceNotFound"));
    }

    #[test]
    fn refusals_name_the_credential_and_the_fix() {
        let e = |method| {
            DpsError::AuthRefused {
                endpoint: "dps:443".into(),
                detail: "status 401".into(),
                method,
            }
            .to_string()
        };
        assert_eq!(e(Method::X509), "DPS at dps:443 refused the bootstrap credential (status 401): check that the enrollment trusts the CA that issued the bootstrap certificate and that its CN is the registration id");
        assert!(e(Method::SymmetricKey { group: true })
            .contains("enrollment group's primary or secondary key"));
        assert!(e(Method::SymmetricKey { group: false }).contains("device clock"));
        assert!(e(Method::Tpm).contains("dps-agent tpm ek"));
    }

    #[test]
    fn transient_classification() {
        let svc = |status| {
            DpsError::Service(ServiceError {
                status,
                retry_after: Some(7),
                ..Default::default()
            })
        };
        assert!(svc(429).is_transient());
        assert!(svc(503).is_transient());
        assert!(!svc(401).is_transient());
        assert!(!svc(400).is_transient());
        assert_eq!(svc(429).retry_after(), Some(Duration::from_secs(7)));
        assert!(!DpsError::Disabled.is_transient());
        assert!(!DpsError::NoChain.is_transient());
    }
}
