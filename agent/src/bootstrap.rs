//! The bootstrap (onboarding) credential: the X.509 certificate the customer's
//! CA issued and its key. Loads and checks it before any network traffic, so an
//! installer hears "the key does not match the certificate" rather than a TLS
//! error, and builds the TLS identity presented to DPS (leaf + intermediates,
//! never the self-signed root).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chain::{self, ChainError, Expectations};
use crate::clock::UnixTime;
use crate::keys::{Key, KeyError};
use crate::tls::ClientIdentity;

/// Problems with the bootstrap credential, each with its fix.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("bootstrap certificate {}: cannot read: {source}; check [dps.attestation] identity_cert", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bootstrap certificate {}: {reason}; it must be PEM (BEGIN CERTIFICATE), leaf first", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("bootstrap key: {0}; check [dps.attestation] identity_key")]
    Key(#[from] KeyError),
    #[error("bootstrap certificate {}: {problem}; {fix}", path.display())]
    Check {
        path: PathBuf,
        problem: ChainError,
        fix: &'static str,
    },
}

/// A checked bootstrap credential.
pub struct Bootstrap {
    pub identity: ClientIdentity,
    pub not_after: UnixTime,
    pub subject: String,
}

/// Loads `cert_path` and checks it against `key` and the registration id.
pub fn load(
    cert_path: &Path,
    key: Arc<dyn Key>,
    registration_id: &str,
    now: UnixTime,
    max_skew_secs: u64,
) -> Result<Bootstrap, BootstrapError> {
    let text = std::fs::read_to_string(cert_path).map_err(|source| BootstrapError::Read {
        path: cert_path.to_path_buf(),
        source,
    })?;
    let certs = chain::certs_from_pem(&text).map_err(|reason| BootstrapError::Format {
        path: cert_path.to_path_buf(),
        reason,
    })?;
    if certs.is_empty() {
        return Err(BootstrapError::Format {
            path: cert_path.to_path_buf(),
            reason: "holds no certificate".into(),
        });
    }
    let spki = key.public_key_der().to_vec();
    let want = Expectations {
        leaf_spki: &spki,
        common_name: Some(registration_id),
        now,
        max_skew_secs,
        require_issuer: false,
    };
    let verified = chain::verify(&certs, &want).map_err(|problem| {
        let fix = match &problem {
            ChainError::KeyMismatch { .. } => "the key in identity_key is not this certificate's key (a file from another device?); point identity_key at the key the certificate was made for",
            ChainError::WrongCommonName { .. } => "DPS requires the certificate's CN to equal [dps] registration_id; fix registration_id or use the device's own certificate",
            ChainError::Expired { .. } => "ask your CA for a new bootstrap certificate",
            ChainError::NotYetValid { .. } => "set the clock (timedatectl / NTP) or wait until the certificate is valid",
            ChainError::NotForClientAuth { .. } => "issue the bootstrap certificate with extendedKeyUsage clientAuth",
            ChainError::BadSignature { .. } | ChainError::MissingIssuer { .. } | ChainError::NotCa { .. } => "the file must hold the device certificate followed by the CAs that issued it, in order",
            _ => "check the file",
        };
        BootstrapError::Check {
            path: cert_path.to_path_buf(),
            problem,
            fix,
        }
    })?;
    Ok(Bootstrap {
        identity: ClientIdentity {
            chain: verified.presented().to_vec(),
            key,
        },
        not_after: verified.not_after,
        subject: verified.subject,
    })
}
