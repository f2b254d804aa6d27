//! The DPS device API: one registration attempt, from connect to an assignment
//! with an issued certificate chain. Owns the retry rules inside an attempt
//! (protocol.md §7): retry-after honoured exactly, 2 s between polls when none is
//! given, at most 5 polls in 10 s, 429 and 5xx retried with backoff, other 4xx
//! fatal, and an overall deadline. The transport (MQTT now) only moves bytes.

mod mqtt;
pub mod wire;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::DpsConfig;
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
    #[error("DPS at {endpoint} refused the bootstrap credential ({detail}): check that the enrollment trusts the CA that issued the bootstrap certificate and that its CN is the registration id")]
    AuthRefused { endpoint: String, detail: String },
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

/// One request of the device API, whatever the transport.
#[derive(Debug, Clone, Copy)]
enum Request<'a> {
    Register { body: &'a [u8] },
    Poll { operation_id: &'a str },
}

/// A reply, before interpretation.
#[derive(Debug, Clone)]
struct RawReply {
    status: u16,
    retry_after: Option<u64>,
    body: Vec<u8>,
}

/// Default wait between polls when DPS gives no retry-after.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Connection failures tolerated inside one attempt before giving up on it.
const MAX_CONNECT_FAILURES: u32 = 3;

/// Registers with DPS: connects, sends the registration with the CSR, polls
/// until a final answer, and returns the assignment. `tls` carries the bootstrap
/// identity (X.509 attestation).
pub async fn register(
    cfg: &DpsConfig,
    tls: Arc<rustls::ClientConfig>,
    request: &RegistrationRequest,
) -> Result<Assignment, DpsError> {
    let body = wire::register_body(
        &cfg.registration_id,
        Some(&request.csr_base64),
        cfg.payload.as_ref(),
    );
    let mut transport = mqtt::MqttTransport::new(cfg, tls);
    let deadline = Instant::now() + cfg.attempt_timeout;
    let result = run_attempt(&mut transport, &body, deadline, cfg.attempt_timeout).await;
    transport.close().await;
    result
}

/// The transport-independent request/poll loop.
async fn run_attempt(
    transport: &mut mqtt::MqttTransport,
    body: &[u8],
    deadline: Instant,
    budget: Duration,
) -> Result<Assignment, DpsError> {
    let mut operation: Option<String> = None;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut polls = PollLimiter::new(5, Duration::from_secs(10));
    let mut connect_failures = 0u32;
    loop {
        let request = match &operation {
            None => Request::Register { body },
            Some(op) => {
                polls.wait().await;
                Request::Poll { operation_id: op }
            }
        };
        let outcome = match tokio::time::timeout_at(deadline, transport.request(request)).await {
            Ok(r) => r,
            Err(_) => {
                return Err(DpsError::Timeout {
                    after: budget,
                    last: None,
                })
            }
        };
        let (wait, problem) = match outcome {
            Ok(raw) => match wire::parse_reply(raw.status, raw.retry_after, &raw.body) {
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
                Ok(Reply::Assigned(state)) => return assignment(*state),
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
                    let wait = e
                        .retry_after
                        .map(Duration::from_secs)
                        .unwrap_or_else(|| backoff.next_delay());
                    log::info!("DPS: {e}; retrying in {}s", wait.as_secs_f32());
                    (wait, Some(DpsError::Service(e)))
                }
                Ok(Reply::Error(e)) => return Err(DpsError::Service(e)),
                Err(reason) => return Err(DpsError::Malformed { reason }),
            },
            Err(e) if e.is_transient() => {
                if matches!(e, DpsError::Unreachable { .. }) {
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
        if Instant::now() + wait > deadline {
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
