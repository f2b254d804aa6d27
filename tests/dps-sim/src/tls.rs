//! TLS for the simulator: the server identities (the real one, and the wrong-host one the
//! `mitm` fault presents, each served by a `ResolvesServerCert`), a client-certificate verifier
//! that asks for a certificate (required by the hub; optional for DPS, where symmetric-key and
//! TPM devices present none) and checks the handshake signature but accepts any chain, and
//! the real chain validation done after the handshake, so an untrusted device gets an MQTT
//! CONNACK 5 or an HTTP 401 (as from DPS or IoT Hub) instead of a TLS alert.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::prelude::parse_x509_certificate;

use crate::faults::{Fault, FaultSet};
use crate::issue::sha256_hex;
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

/// Asks for a client certificate (requires one when `mandatory`) and verifies the handshake
/// signature with it, but accepts every chain: the chain is judged later by
/// [`ClientChainValidator`].
#[derive(Debug)]
struct AcceptAnyClientCert {
    provider: Arc<CryptoProvider>,
    mandatory: bool,
}

impl ClientCertVerifier for AcceptAnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
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

/// Presents one fixed identity to every client.
#[derive(Debug)]
struct Identity(Arc<CertifiedKey>);

impl ResolvesServerCert for Identity {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Whether a listener requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// IoT Hub: devices always connect with their certificate.
    Required,
    /// DPS: X.509 devices present one, symmetric-key and TPM devices do not.
    Optional,
}

/// The TLS server configurations: TLS 1.2 and 1.3, a client certificate asked for (chain not
/// judged here), presenting either `server.pem` or, under `mitm`, `server-wronghost.pem`.
/// The identity is chosen per connection, from the faults active when it was accepted.
#[derive(Debug, Clone)]
pub struct ServerTls {
    normal: Arc<ServerConfig>,
    wrong_host: Arc<ServerConfig>,
    normal_optional: Arc<ServerConfig>,
    wrong_host_optional: Arc<ServerConfig>,
}

impl ServerTls {
    /// Loads both identities from a PKI directory (the wrong-host one is generated in memory
    /// if the directory predates it).
    pub fn load(pki_dir: &Path) -> Result<Self, TlsError> {
        let provider = provider();
        let cert = pki::load_certs(&pki::cert_file(pki_dir, pki::SERVER))?;
        let key = pki::load_private_key(&pki::key_file(pki_dir, pki::SERVER))?;
        let normal = CertifiedKey::from_der(cert, key, &provider)
            .map_err(|e| TlsError::Config(format!("server certificate and key: {e}")))?;
        let (cert, key) = pki::wrong_host_identity(pki_dir)?;
        let wrong_host = CertifiedKey::from_der(cert, key, &provider)
            .map_err(|e| TlsError::Config(format!("wrong-host certificate and key: {e}")))?;
        let (normal, wrong_host) = (Arc::new(normal), Arc::new(wrong_host));
        Ok(ServerTls {
            normal: config(provider.clone(), normal.clone(), true)?,
            wrong_host: config(provider.clone(), wrong_host.clone(), true)?,
            normal_optional: config(provider.clone(), normal, false)?,
            wrong_host_optional: config(provider, wrong_host, false)?,
        })
    }

    /// The configuration for a connection accepted while `faults` are active, and the fault
    /// that chose it (`mitm`), if any.
    pub fn for_faults(
        &self,
        faults: &FaultSet,
        client_auth: ClientAuth,
    ) -> (Arc<ServerConfig>, Option<Fault>) {
        let mitm = faults.contains(Fault::Mitm);
        let config = match (mitm, client_auth) {
            (false, ClientAuth::Required) => &self.normal,
            (true, ClientAuth::Required) => &self.wrong_host,
            (false, ClientAuth::Optional) => &self.normal_optional,
            (true, ClientAuth::Optional) => &self.wrong_host_optional,
        };
        (config.clone(), mitm.then_some(Fault::Mitm))
    }
}

fn config(
    provider: Arc<CryptoProvider>,
    identity: Arc<CertifiedKey>,
    mandatory: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AcceptAnyClientCert {
            provider,
            mandatory,
        }))
        .with_cert_resolver(Arc::new(Identity(identity)));
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

/// Facts about a client's leaf certificate for the events file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertFacts {
    /// notAfter, RFC 3339.
    pub not_after: Option<String>,
    /// Serial number, lowercase hex (as in `issued` events).
    pub serial_hex: Option<String>,
    /// Lowercase hex SHA-256 of the whole DER certificate (the thumbprint).
    pub sha256: String,
}

/// [`CertFacts`] of a DER certificate; the fields that cannot be read are `None`.
pub fn cert_facts(cert: &[u8]) -> CertFacts {
    let parsed = parse_x509_certificate(cert).ok().map(|(_, c)| c);
    CertFacts {
        not_after: parsed.as_ref().and_then(|c| {
            time::OffsetDateTime::from_unix_timestamp(c.validity().not_after.timestamp())
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
        }),
        serial_hex: parsed
            .as_ref()
            .map(|c| c.raw_serial().iter().map(|b| format!("{b:02x}")).collect()),
        sha256: sha256_hex(cert),
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

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
    use rustls::server::ServerConnection;
    use rustls::{ClientConfig, ClientConnection};
    use rustls_pki_types::ServerName;

    /// A client verifier that accepts any server certificate, so the test can look at it.
    #[derive(Debug)]
    struct AcceptAnyServer(Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAnyServer {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
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
                &self.0.signature_verification_algorithms,
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
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// Runs the first TLS round trip against the server config `faults` select and returns
    /// the certificate the server presented.
    fn presented(tls: &ServerTls, faults: &FaultSet) -> (Vec<u8>, Option<Fault>) {
        let (config, fault) = tls.for_faults(faults, ClientAuth::Required);
        let client_config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider())))
            .with_no_client_auth();
        let mut client = ClientConnection::new(
            Arc::new(client_config),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut server = ServerConnection::new(config).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        server.read_tls(&mut hello.as_slice()).unwrap();
        server.process_new_packets().unwrap();
        let mut flight = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut flight).unwrap();
        }
        client.read_tls(&mut flight.as_slice()).unwrap();
        client.process_new_packets().unwrap();
        let cert = client.peer_certificates().expect("server certificate")[0].to_vec();
        (cert, fault)
    }

    #[test]
    fn mitm_presents_the_wrong_host_certificate() {
        let dir = tempfile::tempdir().unwrap();
        pki::generate(dir.path(), &[], false).unwrap();
        let tls = ServerTls::load(dir.path()).unwrap();
        let (cert, fault) = presented(&tls, &FaultSet::default());
        assert_eq!(fault, None);
        assert_eq!(common_name(&cert).as_deref(), Some("localhost"));
        let (cert, fault) = presented(&tls, &FaultSet::new([Fault::Mitm]));
        assert_eq!(fault, Some(Fault::Mitm));
        assert_eq!(common_name(&cert).as_deref(), Some(pki::WRONG_HOST));
        // Per connection: the next one without the fault is normal again.
        let (cert, _) = presented(&tls, &FaultSet::default());
        assert_eq!(common_name(&cert).as_deref(), Some("localhost"));
    }

    #[test]
    fn cert_facts_of_a_certificate_and_of_junk() {
        let dir = tempfile::tempdir().unwrap();
        pki::generate(dir.path(), &[], false).unwrap();
        let der = pki::load_cert(&pki::cert_file(dir.path(), pki::SERVER)).unwrap();
        let facts = cert_facts(&der);
        assert_eq!(facts.serial_hex.as_ref().unwrap().len(), 32);
        assert!(facts.not_after.unwrap().ends_with('Z'));
        assert_eq!(facts.sha256, sha256_hex(&der));
        let junk = cert_facts(b"junk");
        assert_eq!((junk.not_after, junk.serial_hex), (None, None));
    }
}
