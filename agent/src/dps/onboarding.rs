//! The onboarding credential, ready for a registration: the TLS configuration
//! (with the bootstrap certificate for X.509, server authentication only
//! otherwise) and what authorizes each request: nothing (X.509), a SAS token
//! signed in memory with the individual or group-derived device key
//! (symmetric key), or a SAS token signed by the TPM with the key DPS sent in
//! its challenge (TPM).
//!
//! The symmetric key is read from `key_file` (mode 0600 or stricter) and never
//! shown, or stays in a PKCS#11 token that computes the HMACs (an individual
//! key signs each token there; a group key derives the device key there). The
//! TPM and token work runs off the async runtime, through `spawn_blocking`.

use std::fmt;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use zeroize::Zeroizing;

use super::sas::{SasToken, SymmetricKey, TokenScope};
use super::wire::{self, TpmKeys};
use super::{DpsError, Method};
use crate::config::{Attestation, DpsConfig, Enrollment, SymmetricKeySource};
use crate::keys::pkcs11::Pkcs11Secret;
use crate::keys::tpm::{TpmError, TpmKeyStore, AUTH_KEY_HANDLE};
use crate::keys::{KeyError, Keys};
use crate::tls::{self, TlsError};

/// Why the onboarding credential cannot be used. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("[dps.attestation] key_file {}: {problem}; {fix}", path.display())]
    KeyFile {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    #[error("TPM attestation failed: {0}")]
    Tpm(#[source] KeyError),
    #[error("the symmetric key in the PKCS#11 token cannot be used: {0}")]
    Token(#[source] KeyError),
    #[error("the TLS configuration for DPS cannot be built: {0}")]
    Tls(#[from] TlsError),
    #[error(
        "[dps.attestation] method = \"x509\" is prepared from the bootstrap certificate, not here"
    )]
    NotForX509,
}

/// What authorizes the requests of a registration.
enum Credential {
    X509,
    Sas {
        key: SymmetricKey,
        group: bool,
    },
    /// An individual enrollment's key in a PKCS#11 token: it signs each token.
    SasInToken(Arc<Pkcs11Secret>),
    Tpm {
        store: Arc<TpmKeyStore>,
        ek: Vec<u8>,
        srk: Vec<u8>,
    },
}

/// A prepared onboarding credential (see the module documentation).
pub struct Onboarding {
    tls: Arc<rustls::ClientConfig>,
    credential: Credential,
}

impl fmt::Debug for Onboarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Onboarding")
            .field("method", &self.method())
            .finish_non_exhaustive()
    }
}

impl Onboarding {
    /// X.509: `tls` presents the bootstrap certificate.
    pub fn x509(tls: Arc<rustls::ClientConfig>) -> Onboarding {
        Onboarding {
            tls,
            credential: Credential::X509,
        }
    }

    /// Symmetric key or TPM, from the config: reads and checks the key file
    /// (deriving the device key for a group enrollment), or opens the TPM and
    /// reads (making them if absent) its endorsement and storage root keys.
    /// X.509 is built by the caller with [`Onboarding::x509`].
    pub fn prepare(cfg: &DpsConfig, keys: &Keys) -> Result<Onboarding, DpsError> {
        let tls = tls::client_config(&cfg.trust_bundle, None).map_err(CredentialError::from)?;
        let credential = match &cfg.attestation {
            Attestation::X509 { .. } => return Err(CredentialError::NotForX509.into()),
            Attestation::SymmetricKey { key, enrollment } => {
                let group = *enrollment == Enrollment::Group;
                match key {
                    SymmetricKeySource::File(path) => {
                        let key = read_key_file(path)?;
                        let key = if group {
                            key.derive_device_key(&cfg.registration_id)
                        } else {
                            key
                        };
                        Credential::Sas { key, group }
                    }
                    SymmetricKeySource::Token(uri) => {
                        let secret = keys
                            .pkcs11()
                            .open_secret(uri)
                            .map_err(CredentialError::Token)?;
                        if group {
                            // The device key is HMAC(group key, registration id):
                            // made by the token; only the derived key is in memory.
                            let derived = secret
                                .hmac_sha256(cfg.registration_id.as_bytes())
                                .map_err(CredentialError::Token)?;
                            Credential::Sas {
                                key: SymmetricKey::from_bytes(derived),
                                group,
                            }
                        } else {
                            Credential::SasInToken(Arc::new(secret))
                        }
                    }
                }
            }
            Attestation::Tpm => {
                let tpm = |e| CredentialError::Tpm(e);
                let store = keys.tpm().map_err(tpm)?;
                let ek = store.ek_public().map_err(tpm)?;
                let srk = store.srk_public().map_err(tpm)?;
                Credential::Tpm { store, ek, srk }
            }
        };
        Ok(Onboarding { tls, credential })
    }

    /// The method, for messages.
    pub fn method(&self) -> Method {
        match &self.credential {
            Credential::X509 => Method::X509,
            Credential::Sas { group, .. } => Method::SymmetricKey { group: *group },
            Credential::SasInToken(_) => Method::SymmetricKey { group: false },
            Credential::Tpm { .. } => Method::Tpm,
        }
    }

    pub(super) fn tls(&self) -> Arc<rustls::ClientConfig> {
        self.tls.clone()
    }

    /// The `tpm` member of the register body.
    pub(super) fn tpm_keys(&self) -> Option<TpmKeys<'_>> {
        match &self.credential {
            Credential::Tpm { ek, srk, .. } => Some(TpmKeys {
                endorsement_key: ek,
                storage_root_key: srk,
            }),
            _ => None,
        }
    }

    /// The request authorizer of one registration attempt.
    pub(super) fn authorizer(&self, cfg: &DpsConfig) -> Authorizer<'_> {
        Authorizer {
            credential: &self.credential,
            id_scope: cfg.id_scope.clone(),
            registration_id: cfg.registration_id.clone(),
            activated: false,
        }
    }
}

/// Makes the SAS token for each request and answers the TPM challenge.
pub(super) struct Authorizer<'a> {
    credential: &'a Credential,
    id_scope: String,
    registration_id: String,
    /// TPM: whether the key of this attempt's challenge is in the TPM.
    activated: bool,
}

impl Authorizer<'_> {
    /// A fresh token for the next request, or None when the request goes
    /// without one (X.509; a TPM registration before its challenge).
    pub(super) async fn token(&self) -> Result<Option<SasToken>, DpsError> {
        let scope = TokenScope::new(&self.id_scope, &self.registration_id, SystemTime::now());
        match self.credential {
            Credential::X509 => Ok(None),
            Credential::Sas { key, .. } => Ok(Some(scope.sign_with(key))),
            Credential::SasInToken(secret) => {
                let secret = secret.clone();
                let data = scope.string_to_sign().into_bytes();
                let signature = tokio::task::spawn_blocking(move || secret.hmac_sha256(&data))
                    .await
                    .map_err(|e| KeyError::Sign {
                        uri: "the symmetric key".into(),
                        reason: format!("the token did not answer: {e}"),
                    })
                    .and_then(|r| r)
                    .map_err(CredentialError::Token)?;
                Ok(Some(scope.token(&signature)))
            }
            Credential::Tpm { .. } if !self.activated => Ok(None),
            Credential::Tpm { store, .. } => {
                let store = store.clone();
                let data = scope.string_to_sign().into_bytes();
                let signature = blocking(move || store.auth_key_hmac(&data)).await?;
                Ok(Some(scope.token(&signature)))
            }
        }
    }

    /// A 401 to a registration: for a TPM registration not yet activated, a
    /// body with an `authenticationKey` is the challenge; the key is imported
    /// into the TPM and true says "send the registration again". Anything
    /// else is a refusal (false).
    pub(super) async fn accept_challenge(&mut self, body: &[u8]) -> Result<bool, DpsError> {
        let Credential::Tpm { store, .. } = self.credential else {
            return Ok(false);
        };
        if self.activated {
            return Ok(false);
        }
        let Some(blob) = wire::parse_tpm_challenge(body) else {
            return Ok(false);
        };
        let store = store.clone();
        blocking(move || store.import_auth_key(&blob)).await?;
        self.activated = true;
        log::info!(
            "DPS: the TPM activated the key of the attestation challenge (kept at 0x{AUTH_KEY_HANDLE:08x}); registering again with it"
        );
        Ok(true)
    }

    /// The `tpm.authenticationKey` of an assignment (the key for IoT Hub
    /// SAS tokens): imported like the challenge's, as aziot does. The agent
    /// connects to IoT Hub with its certificate, so a failure only warns.
    pub(super) async fn accept_assigned_key(&mut self, blob: &[u8]) {
        let Credential::Tpm { store, .. } = self.credential else {
            return;
        };
        let store = store.clone();
        let blob = blob.to_vec();
        match blocking(move || store.import_auth_key(&blob)).await {
            Ok(()) => log::info!(
                "DPS: imported the device's IoT Hub key from the assignment into the TPM (0x{AUTH_KEY_HANDLE:08x})"
            ),
            Err(e) => log::warn!("DPS: could not import the key of the assignment into the TPM: {e}"),
        }
    }
}

/// Runs a TPM call off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KeyError> + Send + 'static,
) -> Result<T, DpsError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|_| Err(KeyError::Tpm(TpmError::WorkerGone)))
        .map_err(|e| CredentialError::Tpm(e).into())
}

/// Reads a symmetric key file: a regular file, not readable or writable by
/// group or others, holding the key in base64 (whitespace around it ignored).
pub fn read_key_file(path: &Path) -> Result<SymmetricKey, CredentialError> {
    let err = |problem: String, fix: &str| CredentialError::KeyFile {
        path: path.to_path_buf(),
        problem,
        fix: fix.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        err(
            format!("cannot be read ({e})"),
            "put the enrollment's key there (base64, as the Azure portal shows it), owned by the dps-agent user, mode 0600",
        )
    })?;
    if !meta.is_file() {
        return Err(err(
            "is not a regular file".into(),
            "point key_file at the file that holds the key",
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredentialError::KeyFile {
            path: path.to_path_buf(),
            problem: format!(
                "is accessible to other users (mode {mode:04o}); the key is a secret and is refused"
            ),
            fix: format!("run chmod 600 {}", path.display()),
        });
    }
    let mut text = Zeroizing::new(String::new());
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|e| {
            err(
                format!("cannot be read ({e})"),
                "check that the dps-agent user owns it",
            )
        })?;
    SymmetricKey::from_base64(&text).map_err(|e| {
        err(
            format!("does not hold a key: it {e}"),
            "copy the primary key of the enrollment (or of the enrollment group) from the Azure portal into it",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "dps-agent-onboarding-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn key_files_need_mode_0600_and_base64() {
        let d = temp_dir("keys");
        let good = write(&d, "good.key", &format!("\n  {KEY}\n"), 0o600);
        assert!(read_key_file(&good).is_ok());
        let ro = write(&d, "ro.key", KEY, 0o400);
        assert!(read_key_file(&ro).is_ok());

        let open = write(&d, "open.key", KEY, 0o644);
        let e = read_key_file(&open).unwrap_err().to_string();
        assert!(e.contains("mode 0644"), "{e}");
        assert!(e.contains(&format!("chmod 600 {}", open.display())), "{e}");
        assert!(!e.contains(KEY), "{e}");

        let junk = write(&d, "junk.key", "hunter2 is my password", 0o600);
        let e = read_key_file(&junk).unwrap_err().to_string();
        assert!(e.contains("is not base64"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");

        let e = read_key_file(&d.join("missing.key"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be read"), "{e}");
        let e = read_key_file(&d).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
