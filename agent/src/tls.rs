//! TLS client configurations (rustls, ring provider) for DPS and IoT Hub. The
//! client key is a [`Key`] in any backend, reached through a custom
//! `rustls::sign::SigningKey`: the private key is never loaded into rustls.
//! Servers are always verified against the configured trust bundle; there is no
//! way to turn verification off.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::crypto::ring as provider;
use rustls::sign::{CertifiedKey, Signer, SigningKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, SignatureAlgorithm, SignatureScheme};
use rustls_pki_types::{CertificateDer, SubjectPublicKeyInfoDer};

use crate::chain::certs_from_pem;
use crate::keys::{HashAlg, Key, KeyAlgorithm, SignScheme};

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("trust bundle {}: cannot read: {source}", path.display())]
    ReadTrust {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trust bundle {}: {reason}", path.display())]
    BadTrust { path: PathBuf, reason: String },
    #[error("the client certificate does not belong to key {key}: {reason}")]
    KeyMismatch { key: String, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A client identity: the certificates to present (leaf first, no root) and the
/// key of the leaf.
#[derive(Clone)]
pub struct ClientIdentity {
    pub chain: Vec<Vec<u8>>,
    pub key: Arc<dyn Key>,
}

/// Builds a client config that trusts the CAs in `trust_bundle` and, if given,
/// authenticates with `identity`.
pub fn client_config(
    trust_bundle: &Path,
    identity: Option<ClientIdentity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(trust_bundle)?;
    let builder = ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder.with_client_cert_resolver(resolver(id)?),
    };
    Ok(Arc::new(config))
}

fn resolver(id: ClientIdentity) -> Result<Arc<dyn ResolvesClientCert>, TlsError> {
    let key_name = id.key.uri().to_string();
    let certs: Vec<CertificateDer<'static>> =
        id.chain.into_iter().map(CertificateDer::from).collect();
    let certified = CertifiedKey::new(certs, Arc::new(KeySigner { key: id.key }));
    certified.keys_match().map_err(|e| TlsError::KeyMismatch {
        key: key_name,
        reason: e.to_string(),
    })?;
    Ok(Arc::new(SingleCertAndKey::from(certified)))
}

/// Reads every certificate of a PEM bundle into a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let text = std::fs::read_to_string(path).map_err(|source| TlsError::ReadTrust {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = certs_from_pem(&text).map_err(|reason| TlsError::BadTrust {
        path: path.to_path_buf(),
        reason,
    })?;
    if certs.is_empty() {
        return Err(TlsError::BadTrust {
            path: path.to_path_buf(),
            reason: "holds no CERTIFICATE blocks".into(),
        });
    }
    let mut roots = RootCertStore::empty();
    let (added, _ignored) =
        roots.add_parsable_certificates(certs.into_iter().map(CertificateDer::from));
    if added == 0 {
        return Err(TlsError::BadTrust {
            path: path.to_path_buf(),
            reason: "none of its certificates can be used as a trust anchor".into(),
        });
    }
    Ok(roots)
}

/// A rustls signing key backed by a [`Key`].
#[derive(Debug)]
struct KeySigner {
    key: Arc<dyn Key>,
}

impl KeySigner {
    /// The TLS scheme for this key and our matching digest scheme. One scheme per
    /// curve: TLS 1.3 binds the curve to the hash.
    fn scheme(&self) -> (SignatureScheme, SignScheme) {
        match self.key.algorithm() {
            KeyAlgorithm::EcdsaP256 => (
                SignatureScheme::ECDSA_NISTP256_SHA256,
                SignScheme::Ecdsa(HashAlg::Sha256),
            ),
            KeyAlgorithm::EcdsaP384 => (
                SignatureScheme::ECDSA_NISTP384_SHA384,
                SignScheme::Ecdsa(HashAlg::Sha384),
            ),
        }
    }
}

impl SigningKey for KeySigner {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let (tls, ours) = self.scheme();
        offered.contains(&tls).then(|| {
            Box::new(KeyOperation {
                key: self.key.clone(),
                tls,
                ours,
            }) as Box<dyn Signer>
        })
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.key.public_key_der()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

#[derive(Debug)]
struct KeyOperation {
    key: Arc<dyn Key>,
    tls: SignatureScheme,
    ours: SignScheme,
}

impl Signer for KeyOperation {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.key
            .sign_message(self.ours, message)
            .map_err(|e| rustls::Error::General(e.to_string()))
    }

    fn scheme(&self) -> SignatureScheme {
        self.tls
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::file::FileKeyStore;
    use crate::keys::KeyStore;

    #[test]
    fn refuses_cert_of_another_key() {
        let dir = std::env::temp_dir().join(format!("tls-{}", rand::random::<u64>()));
        let store = FileKeyStore::new(&dir);
        let key = store
            .open(&store.generate("k", KeyAlgorithm::EcdsaP256).unwrap())
            .unwrap();
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&other)
            .unwrap();
        let bundle = dir.join("ca.pem");
        std::fs::write(&bundle, cert.pem()).unwrap();
        let err = client_config(
            &bundle,
            Some(ClientIdentity {
                chain: vec![cert.der().to_vec()],
                key: key.clone(),
            }),
        )
        .err()
        .unwrap();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        // and a matching one is accepted
        assert!(client_config(&bundle, None).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_trust_bundle_is_refused() {
        let p = std::env::temp_dir().join(format!("empty-{}.pem", rand::random::<u64>()));
        std::fs::write(&p, "nothing here\n").unwrap();
        let err = client_config(&p, None).err().unwrap();
        assert!(
            err.to_string().contains("holds no CERTIFICATE blocks"),
            "{err}"
        );
        std::fs::remove_file(&p).unwrap();
        let err = client_config(&p, None).err().unwrap();
        assert!(err.to_string().contains("cannot read"), "{err}");
    }
}
