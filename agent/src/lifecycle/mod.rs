//! The agent's lifecycle: getting an operational identity and keeping it. Owns
//! the provisioning flow (fresh key → CSR → DPS → chain checks → atomic commit →
//! old key deleted) and decides what to do with every error the layers below
//! return; nothing below calls back up here.

use std::sync::Arc;

use crate::bootstrap::{self, BootstrapError};
use crate::chain::{self, ChainError, Expectations};
use crate::clock::{rfc3339, Clock, SystemClock};
use crate::config::{Attestation, Config};
use crate::csr::{Csr, CsrError};
use crate::dps::{self, DpsError, RegistrationRequest};
use crate::keys::{KeyError, KeySettings, KeyStore, KeyUri, Keys};
use crate::store::{Identity, Store, StoreError};
use crate::tls::{self, TlsError};

/// Names of operational keys start with this; nothing else is ever deleted.
const OPERATIONAL_KEY_PREFIX: &str = "op-";

/// Whether a key URI names an operational key this agent made.
fn is_operational_key(uri: &KeyUri) -> bool {
    let s = uri.as_str();
    let last = s.rsplit(['/', ';', ':', '=']).next().unwrap_or(s);
    last.starts_with(OPERATIONAL_KEY_PREFIX)
        || s.contains(&format!("object={OPERATIONAL_KEY_PREFIX}"))
}

/// Why provisioning failed. The previous identity (if any) is untouched in
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
}

impl ProvisionError {
    /// Whether retrying later, unchanged, may work.
    pub fn is_transient(&self) -> bool {
        matches!(self, ProvisionError::Dps(e) if e.is_transient())
    }
}

/// The agent: configuration, state directory, key store and clock.
pub struct Agent {
    config: Config,
    store: Store,
    backends: Keys,
    keys: Arc<dyn KeyStore>,
    clock: Arc<dyn Clock>,
}

impl Agent {
    /// Opens the state directory and the operational key store.
    pub fn open(config: Config) -> Result<Agent, ProvisionError> {
        let store = Store::open(&config.state.dir)?;
        let backends = Keys::new(KeySettings::from_config(&config));
        let keys = backends.store(config.operational.key_backend)?;
        Ok(Agent {
            config,
            store,
            backends,
            keys,
            clock: Arc::new(SystemClock),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The stored identity if it can be used now: it exists, belongs to the
    /// configured registration id, is within its validity and its key opens.
    pub fn usable_identity(&self) -> Result<Option<Identity>, ProvisionError> {
        let Some(id) = self.store.load_identity()? else {
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
        self.store.export_chain(&id)?;
        Ok(Some(id))
    }

    /// Provisions through DPS with a fresh operational key and commits the new
    /// identity. On any failure the new key is deleted and the stored identity
    /// stays as it was.
    pub async fn provision(&self) -> Result<Identity, ProvisionError> {
        let cfg = &self.config;
        let now = self.clock.now();
        let skew = cfg.operational.max_clock_skew.as_secs();
        let tls_config = match &cfg.dps.attestation {
            Attestation::X509 {
                identity_cert,
                identity_key,
            } => {
                let key = self
                    .backends
                    .open(identity_key)
                    .map_err(BootstrapError::Key)?;
                let boot =
                    bootstrap::load(identity_cert, key, &cfg.dps.registration_id, now, skew)?;
                tls::client_config(&cfg.dps.trust_bundle, Some(boot.identity))?
            }
        };

        let name = format!(
            "{OPERATIONAL_KEY_PREFIX}{}-{:04x}",
            rfc3339(now).replace([':', '-'], ""),
            rand::random::<u16>()
        );
        let key_uri = self.keys.generate(&name, cfg.operational.key_algorithm)?;
        log::info!(
            "made operational key {key_uri} ({})",
            cfg.operational.key_algorithm
        );
        match self.provision_with_key(&key_uri, tls_config).await {
            Ok(identity) => {
                self.delete_unused_keys(&identity.key_uri);
                Ok(identity)
            }
            Err(e) => {
                if let Err(de) = self.keys.delete(&key_uri) {
                    log::warn!("could not delete the unused key {key_uri}: {de}");
                }
                Err(e)
            }
        }
    }

    async fn provision_with_key(
        &self,
        key_uri: &KeyUri,
        tls_config: Arc<rustls::ClientConfig>,
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
            tls_config,
            &RegistrationRequest {
                csr_base64: csr.to_base64(),
            },
        )
        .await?;
        let now = self.clock.now();
        let verified = chain::verify(
            &assignment.issued_chain,
            &Expectations {
                leaf_spki: key.public_key_der(),
                common_name: Some(&cfg.dps.registration_id),
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
        let identity = Identity {
            version: Identity::VERSION,
            registration_id: cfg.dps.registration_id.clone(),
            device_id: assignment.device_id,
            assigned_hub: assignment.assigned_hub,
            key_uri: key_uri.clone(),
            not_before: verified.not_before,
            not_after: verified.not_after,
            issued_at: now,
            thumbprint: verified.thumbprint.clone(),
            subject: verified.subject.clone(),
            issuer: verified.issuer.clone(),
            chain_pem: verified.to_pem(),
        };
        self.store.commit_identity(&identity)?;
        log::info!(
            "provisioned: device {} on hub {}, certificate {} valid until {}",
            identity.device_id,
            identity.assigned_hub,
            identity.thumbprint,
            rfc3339(identity.not_after)
        );
        Ok(identity)
    }

    /// Deletes operational keys this agent made that the identity does not use
    /// (left over from earlier identities or interrupted attempts).
    fn delete_unused_keys(&self, keep: &KeyUri) {
        match self.keys.list() {
            Ok(all) => {
                for uri in all
                    .into_iter()
                    .filter(|u| u != keep && is_operational_key(u))
                {
                    match self.keys.delete(&uri) {
                        Ok(()) => log::info!("deleted old key {uri}"),
                        Err(e) => log::warn!("could not delete old key {uri}: {e}"),
                    }
                }
            }
            Err(e) => log::warn!("could not list operational keys: {e}"),
        }
    }
}
