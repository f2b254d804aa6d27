//! TLS for the simulator: the server identity, a client-certificate verifier that requires a
//! certificate and checks the handshake signature but accepts any chain, and the real chain
//! validation done after the handshake, so an untrusted device gets an MQTT CONNACK 5 (as
//! from DPS) instead of a TLS alert.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::prelude::parse_x509_certificate;

use crate::pki::{self, PkiError};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{path}: not a usable trust anchor: {reason}")]
    TrustAnchor { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Requires a client certificate and verifies the handshake signature with it, but accepts
/// every chain: the chain is judged later by [`ClientChainValidator`].
#[derive(Debug)]
struct AcceptAnyClientCert {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AcceptAnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server config: `server.pem/.key` from the PKI directory, TLS 1.2 and 1.3, client
/// certificate required (chain not judged here).
pub fn server_config(pki_dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cert = pki::load_certs(&pki::cert_file(pki_dir, pki::SERVER))?;
    let key = pki::load_private_key(&pki::key_file(pki_dir, pki::SERVER))?;
    let provider = provider();
    let config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AcceptAnyClientCert { provider }))
        .with_single_cert(cert, key)
        .map_err(|e| TlsError::Config(format!("server certificate and key: {e}")))?;
    Ok(Arc::new(config))
}

/// Validates a device's TLS chain against the enrollment's trusted CAs (`--trust-ca`).
#[derive(Debug, Clone)]
pub struct ClientChainValidator {
    verifier: Arc<dyn ClientCertVerifier>,
}

impl ClientChainValidator {
    /// Trust every certificate in the given PEM files.
    pub fn from_files<P: AsRef<Path>>(files: &[P]) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for file in files {
            let file = file.as_ref();
            for cert in pki::load_certs(file)? {
                roots.add(cert).map_err(|e| TlsError::TrustAnchor {
                    path: file.display().to_string(),
                    reason: e.to_string(),
                })?;
            }
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Config(format!("client certificate verifier: {e}")))?;
        Ok(ClientChainValidator { verifier })
    }

    /// Checks the peer chain (leaf first, as sent in the handshake). The error text is the
    /// refusal reason written to the events file.
    pub fn validate(&self, chain: &[CertificateDer<'static>]) -> Result<(), String> {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err("no client certificate".into());
        };
        self.verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| format!("client certificate chain not trusted: {e}"))
    }
}

/// The subject CN of a DER certificate, if it has exactly one readable CN.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let (_, parsed) = parse_x509_certificate(cert).ok()?;
    let mut cns = parsed.subject().iter_common_name();
    let cn = cns.next()?.as_str().ok()?.to_string();
    if cns.next().is_some() {
        return None;
    }
    Some(cn)
}
