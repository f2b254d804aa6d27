//! The agent's lifecycle: getting an operational identity and keeping it. Owns
//! the state machine (`Unprovisioned → Provisioning → Provisioned → Renewing →
//! Provisioned`, plus `Failed` with a retry time), the rotation flow (pending
//! key → CSR → DPS, or IoT Hub's certificate API with `renewal_path = "hub"` →
//! chain checks → hub gate → commit → old key deleted), crash recovery, and
//! every decision about errors the layers below return.
//!
//! Crash safety rests on one rule: `identity.json` is the commit point, and a
//! key is deleted only when the committed identity does not use it (and, after
//! a commit whose directory sync failed, only once the next start has settled
//! which identity survived). A restart after a crash at any instant therefore
//! keeps the committed identity and removes whatever an interrupted renewal
//! left behind. Past the commit point nothing is undone: a failure to write a
//! derived file or the lifecycle record is logged and repaired later.
//!
//! The identity in use and the lifecycle record live in memory and are saved
//! to the store; a failed save never loses a backoff (it stays in memory) and
//! never hides the identity loaded at start.

pub mod daemon;
pub mod schedule;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::bootstrap::{self, BootstrapError};
use crate::chain::{self, ChainError, Expectations};
use crate::clock::{rfc3339, Clock, SystemClock};
use crate::config::{Attestation, Config, RenewalPath};
use crate::csr::{Csr, CsrError};
use crate::dps::{self, DpsError, RegistrationRequest};
use crate::hub::{self, CertificateReport, HubError, HubTarget};
use crate::keys::{KeyError, KeySettings, KeyStore, KeyUri, Keys};
use crate::status::Status;
use crate::store::lifecycle::{LifecycleState, Pending, Phase, StateError};
use crate::store::{Identity, Store, StoreError};
use crate::tls::{self, TlsError};
use schedule::{Due, FailureKind, Policy};

/// Names of operational keys start with this; nothing else is ever deleted.
const OPERATIONAL_KEY_PREFIX: &str = "op-";

/// Whether a key URI names an operational key this agent made.
fn is_operational_key(uri: &KeyUri) -> bool {
    let s = uri.as_str();
    let last = s.rsplit(['/', ';', ':', '=']).next().unwrap_or(s);
    last.starts_with(OPERATIONAL_KEY_PREFIX)
        || s.contains(&format!("object={OPERATIONAL_KEY_PREFIX}"))
}

/// At the start of a process: a backoff after a local failure (see
/// [`ProvisionError::is_local`]) ends now, so the restart that follows a fix
/// retries at once. A backoff after a server's answer stays.
fn retry_a_local_failure_now(record: &mut LifecycleState, now_ms: i64) {
    if record.failure_local && record.next_attempt_ms.is_some_and(|t| t > now_ms) {
        log::info!(
            "the last attempt failed on this machine ({}); retrying at once instead of at the scheduled time",
            record.last_error.as_deref().unwrap_or("no detail")
        );
        record.next_attempt_ms = Some(now_ms);
    }
}

/// Why an attempt failed. The committed identity (if any) is untouched in
/// every case.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error("operational key: {0}")]
    Key(#[from] KeyError),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("registration failed: {0}")]
    Dps(#[from] DpsError),
    #[error("the issued certificate chain was refused: {0}")]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the new certificate was not committed: {0}")]
    Hub(#[from] HubError),
    #[error("stopped before the attempt finished")]
    Interrupted,
}

impl ProvisionError {
    /// Whether retrying later, unchanged, may work.
    pub fn is_transient(&self) -> bool {
        match self {
            ProvisionError::Dps(e) => e.is_transient(),
            ProvisionError::Interrupted | ProvisionError::Hub(_) => true,
            _ => false,
        }
    }

    /// Whether the failure was on this machine (configuration, a file, a key,
    /// a device, the disk) rather than an answer from DPS or the hub. Only
    /// such a failure is retried at once by a new process: a crash loop must
    /// not hammer DPS, but an owner who fixed the config and restarted the
    /// service should not wait half an hour.
    pub fn is_local(&self) -> bool {
        match self {
            ProvisionError::Bootstrap(_)
            | ProvisionError::Key(_)
            | ProvisionError::Csr(_)
            | ProvisionError::Tls(_)
            | ProvisionError::Store(_)
            | ProvisionError::State(_) => true,
            ProvisionError::Dps(e) => matches!(
                e,
                DpsError::Credential(_) | DpsError::ServerNotTrusted { .. }
            ),
            ProvisionError::Chain(_) | ProvisionError::Hub(_) | ProvisionError::Interrupted => {
                false
            }
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProvisionError::Dps(e) => e.retry_after(),
            _ => None,
        }
    }

    fn failure_kind(&self) -> FailureKind {
        if self.is_transient() {
            FailureKind::Transient
        } else {
            FailureKind::Fatal
        }
    }
}

/// What the daemon should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Provision or renew now.
    Attempt(Reason),
    /// Nothing until this time (Unix milliseconds).
    WaitUntil(i64),
}

/// Why an attempt is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NoIdentity,
    Due(Due),
    Retry,
    Requested,
}

impl Reason {
    fn describe(self) -> &'static str {
        match self {
            Reason::NoIdentity => "no usable identity",
            Reason::Due(Due::Scheduled) => "renewal time reached",
            Reason::Due(Due::Expired) => "the certificate has expired",
            Reason::Due(Due::NotYetValid) => {
                "the certificate is not yet valid (clock or certificate problem)"
            }
            Reason::Retry => "retrying after a failure",
            Reason::Requested => "renewal requested",
        }
    }
}

/// The agent: configuration, state directory, key stores, clock and the
/// persisted lifecycle record. Shared between the daemon loop and the bus.
pub struct Agent {
    config: Config,
    store: Store,
    backends: Keys,
    keys: Arc<dyn KeyStore>,
    clock: Arc<dyn Clock>,
    policy: Policy,
    record: Mutex<LifecycleState>,
    /// The committed identity, as loaded at open or committed since.
    current: Mutex<Option<Identity>>,
    status: watch::Sender<Status>,
}

impl Agent {
    /// Opens the state directory and the operational key store, and resolves
    /// what a crash may have left half done.
    pub fn open(config: Config) -> Result<Agent, ProvisionError> {
        Agent::open_with_clock(config, Arc::new(SystemClock))
    }

    pub fn open_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Agent, ProvisionError> {
        let store = Store::open(&config.state.dir)?;
        let backends = Keys::new(KeySettings::from_config(&config));
        let keys = backends.store(config.operational.key_backend)?;
        let mut record = LifecycleState::load(store.dir())?;
        retry_a_local_failure_now(&mut record, clock.now_ms());
        let identity = store.load_identity()?;
        let policy = Policy::from_config(&config.operational);
        let (status, _) = watch::channel(Status::build(
            &config.dps.registration_id,
            identity.as_ref(),
            &record,
            &store.chain_path(),
            clock.now(),
        ));
        let agent = Agent {
            config,
            store,
            backends,
            keys,
            clock,
            policy,
            record: Mutex::new(record),
            current: Mutex::new(identity),
            status,
        };
        agent.recover()?;
        Ok(agent)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The current status; `subscribe()` on the returned channel to follow it.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    fn record(&self) -> std::sync::MutexGuard<'_, LifecycleState> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The committed identity (none before the first provisioning).
    fn current(&self) -> Option<Identity> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The committed identity if it belongs to the configured registration id.
    fn current_for_registration(&self) -> Option<Identity> {
        self.current()
            .filter(|id| id.registration_id == self.config.dps.registration_id)
    }

    /// Applies `f` to the record in memory, publishes the new status, then
    /// saves it. A failed save is returned; the change holds in memory all the
    /// same (so a backoff is kept even when the disk refuses it).
    fn update(&self, f: impl FnOnce(&mut LifecycleState)) -> Result<(), StateError> {
        let mut r = self.record();
        f(&mut r);
        let snapshot = r.clone();
        drop(r);
        self.publish(&snapshot);
        snapshot.save(self.store.dir())
    }

    /// [`Agent::update`] for changes that need not stop what follows when
    /// they cannot be saved: the failure is logged (at priority err) instead.
    fn update_or_log(&self, what: &str, f: impl FnOnce(&mut LifecycleState)) {
        if let Err(e) = self.update(f) {
            log::error!("cannot save the lifecycle record ({what}): {e}; it holds in memory until a save succeeds");
        }
    }

    fn publish(&self, record: &LifecycleState) {
        let identity = self.current();
        let mut status = Status::build(
            &self.config.dps.registration_id,
            identity.as_ref(),
            record,
            &self.store.chain_path(),
            self.clock.now(),
        );
        status.source = "daemon".into();
        self.status.send_replace(status);
    }

    /// Resolves a renewal a crash interrupted: the committed identity wins,
    /// and every operational key it does not use is deleted (the pending key
    /// of a rolled-back renewal, or the old key of a committed one).
    fn recover(&self) -> Result<(), ProvisionError> {
        let identity = self.current();
        let pending = self.record().pending.clone();
        if let Some(p) = &pending {
            let committed = identity
                .as_ref()
                .is_some_and(|id| Some(&id.key_uri) == p.uri.as_ref());
            log::warn!(
                "a renewal started at {} was interrupted; {}",
                rfc3339(p.started_at),
                if committed {
                    "its identity was committed: finishing it"
                } else {
                    "it never committed: rolling it back"
                }
            );
        }
        if let Some(id) = &identity {
            // A crash (or a failed write) between the commit and the export
            // leaves an old export; the identity is in use all the same.
            self.export_or_log(id);
        }
        self.delete_unused_keys(identity.as_ref().map(|id| &id.key_uri));
        let has_identity = identity.is_some();
        self.update_or_log("after recovery", |r| {
            r.pending = None;
            if matches!(
                r.phase,
                Phase::Renewing | Phase::Provisioning | Phase::Unprovisioned
            ) {
                r.phase = if has_identity {
                    Phase::Provisioned
                } else {
                    Phase::Unprovisioned
                };
            }
        });
        Ok(())
    }

    /// Rewrites `operational-chain.pem` from the identity if it differs,
    /// logging (not returning) a failure: the export is derived, and the
    /// identity stays the current one whatever happens to it.
    fn export_or_log(&self, id: &Identity) {
        if let Err(e) = self.store.export_chain(id) {
            log::error!("{e}; local apps read an outdated chain until it can be rewritten");
        }
    }

    /// The stored identity if it can be used now: it exists, belongs to the
    /// configured registration id, is within its validity and its key opens.
    pub fn usable_identity(&self) -> Result<Option<Identity>, ProvisionError> {
        let Some(id) = self.current() else {
            return Ok(None);
        };
        if id.registration_id != self.config.dps.registration_id {
            log::warn!(
                "the stored identity is for registration id {} but the config says {}; provisioning again",
                id.registration_id,
                self.config.dps.registration_id
            );
            return Ok(None);
        }
        if !id.is_valid_at(self.clock.now()) {
            return Ok(None);
        }
        if let Err(e) = self.keys.open(&id.key_uri) {
            log::warn!("the stored identity's key cannot be used ({e}); provisioning again");
            return Ok(None);
        }
        self.export_or_log(&id);
        Ok(Some(id))
    }

    /// Decides what to do now. Persists a renewal schedule for a certificate
    /// that has none yet (the jitter is drawn once per certificate).
    pub fn next_step(&self) -> Result<NextStep, ProvisionError> {
        let now_ms = self.clock.now_ms();
        let retry_at = self.record().next_attempt_ms.filter(|&t| t > now_ms);
        let identity = match self.current_for_registration() {
            Some(id) => id,
            None => {
                return Ok(match retry_at {
                    Some(t) => NextStep::WaitUntil(t),
                    None => NextStep::Attempt(Reason::NoIdentity),
                })
            }
        };
        let earliest = schedule::earliest_renewal(identity.issued_at, identity.not_after);
        // A schedule saved by an older version may lie before the floor.
        let renew_at = self.ensure_schedule(&identity).max(earliest);
        if let Some(t) = retry_at {
            return Ok(NextStep::WaitUntil(t));
        }
        if self.record().failures > 0 && self.record().next_attempt_ms.is_some() {
            return Ok(NextStep::Attempt(Reason::Retry));
        }
        Ok(
            match schedule::due(
                now_ms,
                identity.not_before,
                identity.not_after,
                renew_at,
                earliest,
                &self.policy,
            ) {
                Some(why) => NextStep::Attempt(Reason::Due(why)),
                None => NextStep::WaitUntil(renew_at),
            },
        )
    }

    /// The renewal time of `identity`, drawing and saving it the first time.
    fn ensure_schedule(&self, identity: &Identity) -> i64 {
        if let Some(s) = self.record().schedule.as_ref() {
            if s.thumbprint == identity.thumbprint {
                return s.renew_at_ms;
            }
        }
        let s = schedule::schedule(
            &identity.thumbprint,
            identity.not_before,
            identity.not_after,
            identity.issued_at,
            &self.policy,
            schedule::random_jitter,
        );
        let at = s.renew_at_ms;
        self.update_or_log("the renewal schedule", |r| r.schedule = Some(s));
        at
    }

    /// One provisioning or renewal attempt. On success the new identity is
    /// committed and returned; on failure the failure is recorded (with the
    /// time of the next attempt) and the committed identity stays in use.
    pub async fn attempt(&self, reason: Reason) -> Result<Identity, ProvisionError> {
        let current = self.usable_identity().unwrap_or_else(|e| {
            log::warn!("cannot read the stored identity: {e}");
            None
        });
        let phase = if current.is_some() {
            Phase::Renewing
        } else {
            Phase::Provisioning
        };
        log::info!(
            "{} ({}): {}",
            if phase == Phase::Renewing {
                "renewing"
            } else {
                "provisioning"
            },
            reason.describe(),
            match &current {
                Some(id) => format!(
                    "the current certificate is valid until {}",
                    rfc3339(id.not_after)
                ),
                None => "no identity is in use".into(),
            }
        );
        // Every failure, saving the phase included, is recorded and backs off.
        let result = match self.update(|r| r.phase = phase) {
            Ok(()) => self.rotate(current.as_ref()).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = &result {
            self.record_failure(e, current.is_some());
        }
        result
    }

    fn record_failure(&self, e: &ProvisionError, has_identity: bool) {
        let now_ms = self.clock.now_ms();
        let failures = self.record().failures.saturating_add(1);
        let delay = schedule::retry_delay(
            failures,
            e.failure_kind(),
            e.retry_after(),
            &self.policy,
            schedule::random_between,
        );
        let next = now_ms.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
        let shown = self.status.borrow().clone();
        crate::logging::event(
            if has_identity {
                crate::logging::Event::RenewalFailed
            } else {
                crate::logging::Event::ProvisioningFailed
            },
            &crate::logging::Fields {
                registration_id: Some(&self.config.dps.registration_id),
                device_id: shown.device_id.as_deref(),
                assigned_hub: shown.assigned_hub.as_deref(),
                not_after: shown.not_after,
                thumbprint: shown.thumbprint.as_deref(),
                next_renewal: Some(next.div_euclid(1000)),
            },
            format_args!(
                "{} failed: {e}; {}; next attempt at {} (in {}s)",
                if has_identity {
                    "renewal"
                } else {
                    "provisioning"
                },
                if has_identity {
                    "the current identity stays in use"
                } else {
                    "the device has no identity yet"
                },
                rfc3339(next.div_euclid(1000)),
                delay.as_secs()
            ),
        );
        let message = e.to_string();
        let local = e.is_local();
        self.update_or_log("the failure", |r| {
            r.phase = Phase::Failed;
            r.failures = failures;
            r.last_error = Some(message);
            r.next_attempt_ms = Some(next);
            r.failure_local = local;
            r.pending = None;
        });
    }

    /// The rotation flow: a key (fresh unless `rotate_key = false`), a CSR,
    /// IoT Hub's certificate API (with `renewal_path = "hub"` and a current
    /// identity) or else DPS, the chain checks, then the commit. Any failure
    /// before the commit deletes the new key and leaves the committed identity
    /// as it was.
    async fn rotate(&self, current: Option<&Identity>) -> Result<Identity, ProvisionError> {
        let cfg = &self.config;
        let reuse = match current {
            Some(id) if !cfg.operational.rotate_key => Some(id.key_uri.clone()),
            _ => None,
        };
        let key_uri = match reuse {
            Some(uri) => uri,
            None => self.generate_pending_key().await?,
        };
        let result = self.obtain_and_commit(&key_uri, current).await;
        if result.is_err() && Some(&key_uri) != current.map(|c| &c.key_uri) {
            self.delete_uncommitted_key(&key_uri);
        }
        result
    }

    /// Deletes the key of an attempt that did not commit (already gone is fine).
    fn delete_uncommitted_key(&self, uri: &KeyUri) {
        match self.keys.delete(uri) {
            Ok(()) | Err(KeyError::NotFound { .. }) => {}
            Err(e) => log::warn!("could not delete the unused key {uri}: {e}"),
        }
    }

    async fn obtain_and_commit(
        &self,
        key_uri: &KeyUri,
        current: Option<&Identity>,
    ) -> Result<Identity, ProvisionError> {
        if let Some(cur) =
            current.filter(|_| self.config.operational.renewal_path == RenewalPath::Hub)
        {
            match self.renew_at_hub(key_uri, cur).await {
                Ok(identity) => return Ok(identity),
                Err(e) => log::warn!(
                    "renewal through IoT Hub {} failed: {e}; registering with DPS instead",
                    cur.assigned_hub
                ),
            }
        }
        let onboarding = self.bootstrap_tls()?;
        self.register_and_commit(key_uri, onboarding, current).await
    }

    /// Renews through the assigned hub's certificate API, connecting with the
    /// current identity. The device keeps its hub and device id.
    async fn renew_at_hub(
        &self,
        key_uri: &KeyUri,
        cur: &Identity,
    ) -> Result<Identity, ProvisionError> {
        let key = self.keys.open(key_uri)?;
        let csr = Csr::build(key.as_ref(), &cur.device_id)?;
        let target = HubTarget {
            host: cur.assigned_hub.clone(),
            port: self.config.hub.port,
            device_id: cur.device_id.clone(),
            api_version: hub::credentials::API_VERSION.to_string(),
        };
        log::info!(
            "asking IoT Hub {} for a certificate for device {} (certificate API, api-version {})",
            target.host,
            target.device_id,
            target.api_version
        );
        let tls = self.current_hub_tls(cur)?;
        let issued_chain =
            hub::credentials::issue_certificate(&target, tls, &csr.to_base64()).await?;
        let assignment = dps::Assignment {
            assigned_hub: cur.assigned_hub.clone(),
            device_id: cur.device_id.clone(),
            substatus: None,
            issued_chain,
        };
        self.check_prove_commit(key_uri, key, assignment, &cur.device_id, Some(cur))
            .await
    }

    /// A TLS client configuration presenting the committed identity (its chain
    /// without the root, its key).
    fn current_hub_tls(&self, cur: &Identity) -> Result<Arc<rustls::ClientConfig>, ProvisionError> {
        let key = self.keys.open(&cur.key_uri)?;
        let chain = crate::chain::certs_from_pem(&cur.chain_pem).unwrap_or_default();
        let (presented, _root) = crate::chain::split_root(&chain);
        Ok(tls::client_config(
            &self.config.dps.trust_bundle,
            Some(hub::identity(presented.to_vec(), key)),
        )?)
    }

    /// The TLS configuration that presents the bootstrap credential.
    fn bootstrap_tls(&self) -> Result<dps::Onboarding, ProvisionError> {
        let cfg = &self.config;
        match &cfg.dps.attestation {
            Attestation::X509 {
                identity_cert,
                identity_key,
            } => {
                let key = self
                    .backends
                    .open(identity_key)
                    .map_err(BootstrapError::Key)?;
                let boot = bootstrap::load(
                    identity_cert,
                    key,
                    &cfg.dps.registration_id,
                    self.clock.now(),
                    cfg.operational.max_clock_skew.as_secs(),
                )?;
                Ok(dps::Onboarding::x509(tls::client_config(
                    &cfg.dps.trust_bundle,
                    Some(boot.identity),
                )?))
            }
            Attestation::SymmetricKey { .. } | Attestation::Tpm => {
                Ok(dps::Onboarding::prepare(&cfg.dps, &self.backends)?)
            }
        }
    }

    /// Records the intent, then makes the key (so a crash leaves a trace).
    async fn generate_pending_key(&self) -> Result<KeyUri, ProvisionError> {
        let now = self.clock.now();
        let name = format!(
            "{OPERATIONAL_KEY_PREFIX}{}-{:016x}",
            rfc3339(now).replace([':', '-'], ""),
            // 64 random bits: two keys made in the same second never share a name.
            rand::random::<u64>()
        );
        self.update(|r| {
            r.pending = Some(Pending {
                name: name.clone(),
                uri: None,
                started_at: now,
            })
        })?;
        let keys = self.keys.clone();
        let algorithm = self.config.operational.key_algorithm;
        let n = name.clone();
        let uri = tokio::task::spawn_blocking(move || keys.generate(&n, algorithm))
            .await
            .map_err(|e| KeyError::Sign {
                uri: name.clone(),
                reason: format!("key generation did not finish: {e}"),
            })??;
        self.update(|r| {
            if let Some(p) = r.pending.as_mut() {
                p.uri = Some(uri.clone());
            }
        })?;
        log::info!("made operational key {uri} ({algorithm})");
        Ok(uri)
    }

    async fn register_and_commit(
        &self,
        key_uri: &KeyUri,
        onboarding: dps::Onboarding,
        current: Option<&Identity>,
    ) -> Result<Identity, ProvisionError> {
        let cfg = &self.config;
        let key = self.keys.open(key_uri)?;
        let csr = Csr::build(key.as_ref(), &cfg.dps.registration_id)?;
        log::info!(
            "registering {} with DPS {} (id scope {}, {})",
            cfg.dps.registration_id,
            cfg.dps.endpoint,
            cfg.dps.id_scope,
            cfg.dps.transport.name()
        );
        let assignment = dps::register(
            &cfg.dps,
            &onboarding,
            &RegistrationRequest {
                csr_base64: csr.to_base64(),
            },
        )
        .await?;
        self.check_prove_commit(key_uri, key, assignment, &cfg.dps.registration_id, current)
            .await
    }

    /// The checks of an issued chain (leaf holds `key`, CN `common_name`,
    /// signatures, dates, anchored), the hub gate and twin report, then the
    /// commit.
    async fn check_prove_commit(
        &self,
        key_uri: &KeyUri,
        key: Arc<dyn crate::keys::Key>,
        assignment: dps::Assignment,
        common_name: &str,
        current: Option<&Identity>,
    ) -> Result<Identity, ProvisionError> {
        let cfg = &self.config;
        let now = self.clock.now();
        let verified = chain::verify(
            &assignment.issued_chain,
            &Expectations {
                leaf_spki: key.public_key_der(),
                common_name: Some(common_name),
                now,
                max_skew_secs: cfg.operational.max_clock_skew.as_secs(),
                require_issuer: true,
            },
        )?;
        if verified.ignored > 0 {
            log::warn!(
                "DPS sent {} certificate(s) that are not part of the leaf's chain; ignored",
                verified.ignored
            );
        }
        chain::check_anchored(&verified, &self.issuer_anchors()?)?;
        if let Some(old) = current {
            if old.assigned_hub != assignment.assigned_hub || old.device_id != assignment.device_id
            {
                log::warn!(
                    "DPS moved the device: {} on {} is now {} on {}",
                    old.device_id,
                    old.assigned_hub,
                    assignment.device_id,
                    assignment.assigned_hub
                );
            }
        }

        // The renewal time is drawn now so the twin can report it.
        let schedule = schedule::schedule(
            &verified.thumbprint,
            verified.not_before,
            verified.not_after,
            now,
            &self.policy,
            schedule::random_jitter,
        );
        if schedule::floor_binds(verified.not_before, verified.not_after, now, &self.policy) {
            log::warn!(
                "the CA issued a certificate with only {}s of validity left (notBefore {}, notAfter {}), less than the renewal window needs; renewing no sooner than {} so that short certificates cannot cause a renewal storm",
                verified.not_after.saturating_sub(now).max(0),
                rfc3339(verified.not_before),
                rfc3339(verified.not_after),
                rfc3339(schedule.renew_at_ms.div_euclid(1000))
            );
        }
        self.prove_at_hub(&assignment, &verified, key.clone(), &schedule, now, current)
            .await?;

        // The commit: nothing below awaits, so a stop request cannot split it.
        let final_uri = self.keys.commit(key_uri)?;
        let reused = current.is_some_and(|c| c.key_uri == final_uri);
        let identity = Identity {
            version: Identity::VERSION,
            registration_id: cfg.dps.registration_id.clone(),
            device_id: assignment.device_id,
            assigned_hub: assignment.assigned_hub,
            key_uri: final_uri,
            not_before: verified.not_before,
            not_after: verified.not_after,
            issued_at: now,
            thumbprint: verified.thumbprint.clone(),
            subject: verified.subject.clone(),
            issuer: verified.issuer.clone(),
            chain_pem: verified.to_pem(),
        };
        let commit = match self.store.commit_identity(&identity) {
            Ok(c) => c,
            Err(e) => {
                // Not committed: the old identity is whole and in use. The
                // key was relabelled by `keys.commit` (PKCS#11), so the
                // caller's delete of the pending name would miss it.
                if &identity.key_uri != key_uri && !reused {
                    self.delete_uncommitted_key(&identity.key_uri);
                }
                return Err(e.into());
            }
        };
        // Past the point of no return: from here on nothing fails the attempt.
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(identity.clone());
        for problem in &commit.problems {
            log::error!("the new identity is committed, but {problem}; it is repaired at the next start or renewal");
        }
        if commit.durable {
            // Old keys go before the new state is announced, so whoever sees
            // "provisioned" sees one key.
            self.delete_unused_keys(Some(&identity.key_uri));
        } else {
            log::warn!("keeping the previous identity's key until the next start: the commit may not survive a power cut");
        }
        let (renew_at, jitter_ms) = (schedule.renew_at_ms, schedule.jitter_ms);
        self.update_or_log("after the commit", |r| {
            r.phase = Phase::Provisioned;
            r.pending = None;
            r.failures = 0;
            r.failure_local = false;
            r.last_error = None;
            r.next_attempt_ms = None;
            r.last_renewal = Some(now);
            r.renewals += 1;
            r.schedule = Some(schedule);
        });
        crate::logging::event(
            if current.is_some() {
                crate::logging::Event::Renewed
            } else {
                crate::logging::Event::Provisioned
            },
            &crate::logging::Fields {
                registration_id: Some(&identity.registration_id),
                device_id: Some(&identity.device_id),
                assigned_hub: Some(&identity.assigned_hub),
                not_after: Some(identity.not_after),
                thumbprint: Some(&identity.thumbprint),
                next_renewal: Some(renew_at.div_euclid(1000)),
            },
            format_args!(
                "{}: device {} on hub {}, certificate {} valid until {}; next renewal at {} (jitter {} ms)",
                if current.is_some() {
                    "renewed"
                } else {
                    "provisioned"
                },
                identity.device_id,
                identity.assigned_hub,
                identity.thumbprint,
                rfc3339(identity.not_after),
                rfc3339(renew_at.div_euclid(1000)),
                jitter_ms
            ),
        );
        Ok(identity)
    }

    /// The CAs a new chain must lead to ([`chain::check_anchored`]): `[operational]
    /// issuer_trust`, else the top of the stored identity's chain, expired or not: its
    /// self-signed root, or, for a chain stored without its root, the issuing CA itself
    /// (stricter: a rotated issuing CA then needs `issuer_trust`). None before the first
    /// provisioning, which trusts what DPS issues.
    fn issuer_anchors(&self) -> Result<Vec<Vec<u8>>, ChainError> {
        if let Some(path) = &self.config.operational.issuer_trust {
            let bad = |reason: String| ChainError::IssuerTrust {
                path: path.display().to_string(),
                reason,
            };
            let pem = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
            let certs = chain::certs_from_pem(&pem).map_err(bad)?;
            if certs.is_empty() {
                return Err(bad("holds no CERTIFICATE block".into()));
            }
            return Ok(certs);
        }
        Ok(self
            .current_for_registration()
            .and_then(|id| chain::certs_from_pem(&id.chain_pem).ok())
            .and_then(|mut certs| certs.pop())
            .into_iter()
            .collect())
    }

    /// The commit gate: connects to the assigned hub with the new identity
    /// (CONNACK 0 proves the hub accepts it) and reports the certificate in the
    /// twin. A refusal or an unreachable hub blocks the commit while a usable
    /// identity exists; with none to protect, the new one is committed anyway
    /// (it can only be better than nothing). A failed twin report never blocks.
    async fn prove_at_hub(
        &self,
        assignment: &dps::Assignment,
        verified: &chain::VerifiedChain,
        key: Arc<dyn crate::keys::Key>,
        schedule: &crate::store::lifecycle::Schedule,
        now: i64,
        current: Option<&Identity>,
    ) -> Result<(), ProvisionError> {
        let hub_cfg = &self.config.hub;
        if !hub_cfg.verify_new_certificate && !hub_cfg.report_twin {
            return Ok(());
        }
        let target = HubTarget {
            host: assignment.assigned_hub.clone(),
            port: hub_cfg.port,
            device_id: assignment.device_id.clone(),
            api_version: hub_cfg.api_version.clone(),
        };
        let report = hub_cfg.report_twin.then(|| CertificateReport {
            valid_from: rfc3339(verified.not_before),
            valid_until: rfc3339(verified.not_after),
            issued_at: rfc3339(now),
            thumbprint: verified.thumbprint.clone(),
            renew_at: rfc3339(schedule.renew_at_ms.div_euclid(1000)),
        });
        let tls = tls::client_config(
            &self.config.dps.trust_bundle,
            Some(hub::identity(verified.presented().to_vec(), key)),
        )?;
        let outcome = hub::check(&target, tls, report.as_ref()).await;
        match outcome {
            Ok(o) => {
                if let Some(e) = &o.twin_error {
                    log::warn!("the certificate was accepted by IoT Hub {} but the twin report failed: {e}", target.host);
                } else if let Some(v) = o.twin_version {
                    log::info!("IoT Hub {} accepted the certificate; twin reported properties at version {v}", target.host);
                } else {
                    log::info!("IoT Hub {} accepted the certificate", target.host);
                }
                Ok(())
            }
            Err(e) if !hub_cfg.verify_new_certificate => {
                log::warn!("could not report the certificate in the twin: {e}");
                Ok(())
            }
            Err(e) if current.is_none() => {
                log::warn!(
                    "{e}; committing the new identity anyway: there is no other one to keep"
                );
                Ok(())
            }
            Err(e) => {
                if e.is_refusal() {
                    if let Some(cur) = current {
                        self.check_current_at_hub(cur, &target).await;
                    }
                }
                Err(e.into())
            }
        }
    }

    /// After the hub refused a new certificate: does it still take the current
    /// one? If not, say so loudly; the next attempt registers with DPS again.
    async fn check_current_at_hub(&self, cur: &Identity, new_target: &HubTarget) {
        let target = HubTarget {
            host: cur.assigned_hub.clone(),
            device_id: cur.device_id.clone(),
            ..new_target.clone()
        };
        let tls = match self.current_hub_tls(cur) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("cannot test the current identity at the hub: {e}");
                return;
            }
        };
        match hub::check(&target, tls, None).await {
            Ok(_) => log::info!("IoT Hub {} still accepts the current certificate; keeping it", target.host),
            Err(e) if e.is_refusal() => log::error!(
                "IoT Hub {} refuses the current certificate as well ({e}); provisioning again through DPS at the next attempt",
                target.host
            ),
            Err(e) => log::warn!("could not test the current certificate at the hub: {e}"),
        }
    }

    /// Deletes operational keys this agent made that `keep` is not (left over
    /// from earlier identities or interrupted attempts). With no identity, all
    /// of them go.
    fn delete_unused_keys(&self, keep: Option<&KeyUri>) {
        match self.keys.list() {
            Ok(all) => {
                for uri in all
                    .into_iter()
                    .filter(|u| Some(u) != keep && is_operational_key(u))
                {
                    match self.keys.delete(&uri) {
                        Ok(()) => log::info!("deleted unused key {uri}"),
                        Err(e) => log::warn!("could not delete unused key {uri}: {e}"),
                    }
                }
            }
            Err(e) => log::warn!("could not list operational keys: {e}"),
        }
    }

    /// Forgets the failure record so the next step is an immediate attempt
    /// (a renewal requested by an admin).
    pub fn clear_backoff(&self) {
        self.update_or_log("a renewal request", |r| r.next_attempt_ms = None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_operational_keys_are_deletable() {
        let k = |s: &str| KeyUri::parse(s).unwrap();
        assert!(is_operational_key(&k(
            "file:/var/lib/dps-agent/keys/op-20261123T0000Z-ab12.key"
        )));
        assert!(is_operational_key(&k(
            "tpm:/var/lib/dps-agent/keys/op-1.tss2.pem"
        )));
        assert!(is_operational_key(&k(
            "pkcs11:token=t;object=op-1.pending;type=private"
        )));
        assert!(!is_operational_key(&k(
            "file:/etc/dps-agent/bootstrap/device.key"
        )));
        assert!(!is_operational_key(&k(
            "pkcs11:token=t;object=device;type=private"
        )));
        assert!(!is_operational_key(&k("tpm:handle=0x81000101")));
    }

    #[test]
    fn failures_here_are_local_and_answers_from_servers_are_not() {
        let missing = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let local = [
            ProvisionError::Bootstrap(BootstrapError::Read {
                path: "/etc/dps-agent/bootstrap/device.pem".into(),
                source: missing(),
            }),
            ProvisionError::Key(KeyError::NotFound {
                uri: "tpm:handle=0x81000101".into(),
                hint: String::new(),
            }),
            ProvisionError::State(StateError::Io {
                path: "/var/lib/dps-agent/lifecycle.json".into(),
                action: "write",
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            }),
            ProvisionError::Dps(DpsError::Credential(crate::dps::CredentialError::KeyFile {
                path: "/etc/dps-agent/dps.key".into(),
                problem: "cannot be read".into(),
                fix: "put it there".into(),
            })),
        ];
        for e in &local {
            assert!(e.is_local(), "{e}");
        }
        let remote = [
            ProvisionError::Dps(DpsError::Disabled),
            ProvisionError::Dps(DpsError::Unreachable {
                endpoint: "global.azure-devices-provisioning.net".into(),
                reason: "dns".into(),
            }),
            ProvisionError::Chain(ChainError::Empty),
            ProvisionError::Interrupted,
        ];
        for e in &remote {
            assert!(!e.is_local(), "{e}");
        }
    }

    #[test]
    fn a_new_process_retries_a_local_failure_at_once_and_waits_after_a_server() {
        let failed = |local| LifecycleState {
            phase: Phase::Failed,
            failures: 3,
            last_error: Some("bootstrap key: missing".into()),
            next_attempt_ms: Some(2_000_000),
            failure_local: local,
            ..Default::default()
        };
        let mut r = failed(true);
        retry_a_local_failure_now(&mut r, 1_000);
        assert_eq!(r.next_attempt_ms, Some(1_000));
        assert_eq!(r.failures, 3, "the count stays for the backoff");
        let mut r = failed(false);
        retry_a_local_failure_now(&mut r, 1_000);
        assert_eq!(r.next_attempt_ms, Some(2_000_000));
        // A time already past is left as it is.
        let mut r = failed(true);
        retry_a_local_failure_now(&mut r, 3_000_000);
        assert_eq!(r.next_attempt_ms, Some(2_000_000));
    }
}
