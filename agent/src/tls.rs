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

/// The TLS name of one of our signature schemes, if TLS has one. An ECDSA curve
/// fixes its hash (TLS 1.3 binds them), so only the curve's own hash is listed.
fn tls_scheme(algorithm: KeyAlgorithm, scheme: SignScheme) -> Option<SignatureScheme> {
    Some(match (algorithm, scheme) {
        (KeyAlgorithm::EcdsaP256, SignScheme::Ecdsa(HashAlg::Sha256)) => {
            SignatureScheme::ECDSA_NISTP256_SHA256
        }
        (KeyAlgorithm::EcdsaP384, SignScheme::Ecdsa(HashAlg::Sha384)) => {
            SignatureScheme::ECDSA_NISTP384_SHA384
        }
        (KeyAlgorithm::Rsa { .. }, SignScheme::RsaPss(HashAlg::Sha256)) => {
            SignatureScheme::RSA_PSS_SHA256
        }
        (KeyAlgorithm::Rsa { .. }, SignScheme::RsaPss(HashAlg::Sha384)) => {
            SignatureScheme::RSA_PSS_SHA384
        }
        (KeyAlgorithm::Rsa { .. }, SignScheme::RsaPss(HashAlg::Sha512)) => {
            SignatureScheme::RSA_PSS_SHA512
        }
        (KeyAlgorithm::Rsa { .. }, SignScheme::RsaPkcs1(HashAlg::Sha256)) => {
            SignatureScheme::RSA_PKCS1_SHA256
        }
        (KeyAlgorithm::Rsa { .. }, SignScheme::RsaPkcs1(HashAlg::Sha384)) => {
            SignatureScheme::RSA_PKCS1_SHA384
        }
        (KeyAlgorithm::Rsa { .. }, SignScheme::RsaPkcs1(HashAlg::Sha512)) => {
            SignatureScheme::RSA_PKCS1_SHA512
        }
        _ => return None,
    })
}

impl KeySigner {
    /// The first scheme of ours (in the key's order of preference: RSA-PSS
    /// before PKCS#1 v1.5) that the peer offers. rustls offers only what the
    /// protocol version allows: in TLS 1.3 no PKCS#1 v1.5, so an RSA key signs
    /// RSA-PSS there, and PKCS#1 v1.5 only with a TLS 1.2 server that has no PSS.
    fn choose(&self, offered: &[SignatureScheme]) -> Option<(SignatureScheme, SignScheme)> {
        let algorithm = self.key.algorithm();
        self.key
            .supported_schemes()
            .into_iter()
            .filter_map(|ours| tls_scheme(algorithm, ours).map(|tls| (tls, ours)))
            .find(|(tls, _)| offered.contains(tls))
    }
}

impl SigningKey for KeySigner {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let chosen = self.choose(offered);
        if chosen.is_none() {
            log::warn!(
                "the server accepts none of the signature schemes key {} can make ({:?} offered); no client certificate is sent",
                self.key.uri(),
                offered
            );
        }
        chosen.map(|(tls, ours)| {
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
        if self.key.algorithm().is_rsa() {
            SignatureAlgorithm::RSA
        } else {
            SignatureAlgorithm::ECDSA
        }
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

/// What a failed TLS handshake means for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// We refused the server's certificate (untrusted, expired, wrong name).
    ServerNotTrusted(String),
    /// The server refused our client certificate (a certificate-related alert).
    ClientRefused(String),
    /// Anything else: no usable handshake.
    Other(String),
}

/// Sorts a rustls error into [`HandshakeFailure`].
pub fn handshake_failure(e: &rustls::Error) -> HandshakeFailure {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(c) => {
            HandshakeFailure::ServerNotTrusted(format!("its certificate is invalid ({c:?})"))
        }
        rustls::Error::AlertReceived(
            a @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateRequired
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::UnsupportedCertificate
            | A::AccessDenied),
        ) => HandshakeFailure::ClientRefused(format!("TLS alert {a:?}")),
        other => HandshakeFailure::Other(format!("TLS handshake failed: {other}")),
    }
}

/// Finds a rustls error anywhere in an error's chain (tokio-rustls wraps it in
/// an `io::Error`, which hides it from `source()`), to tell "the server is not
/// trusted" from "the server refused our certificate".
pub fn find_rustls_error(e: &(dyn std::error::Error + 'static)) -> Option<rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r.clone());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(r.clone());
            }
        }
        cur = err.source();
    }
    None
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

    /// An RSA-2048 bootstrap-style key in a PKCS#8 file (one per test process).
    fn rsa_key(dir: &std::path::Path) -> Arc<dyn Key> {
        use rsa::pkcs8::EncodePrivateKey as _;
        static PEM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let pem = PEM.get_or_init(|| {
            let mut rng =
                rsa::rand_core::UnwrapErr(p256::elliptic_curve::common::getrandom::SysRng);
            let k = rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap();
            k.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                .unwrap()
                .to_string()
        });
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("device.key");
        crate::fsutil::atomic_write(&path, pem.as_bytes(), 0o600).unwrap();
        FileKeyStore::new(dir)
            .open(&crate::keys::KeyUri::file(&path))
            .unwrap()
    }

    #[test]
    fn rsa_keys_prefer_pss_and_use_pkcs1_only_when_offered_alone() {
        use SignatureScheme as S;
        let dir = std::env::temp_dir().join(format!("tls-rsa-{}", rand::random::<u64>()));
        let signer = KeySigner { key: rsa_key(&dir) };
        assert_eq!(signer.algorithm(), SignatureAlgorithm::RSA);
        // What rustls passes on from a TLS 1.3 CertificateRequest (PKCS#1 v1.5
        // filtered out), and from TLS 1.2 servers with and without PSS.
        let tls13 = [
            S::ECDSA_NISTP256_SHA256,
            S::RSA_PSS_SHA384,
            S::RSA_PSS_SHA256,
        ];
        let tls12 = [S::RSA_PKCS1_SHA512, S::RSA_PKCS1_SHA256, S::RSA_PSS_SHA512];
        let tls12_no_pss = [S::ECDSA_NISTP384_SHA384, S::RSA_PKCS1_SHA384];
        let pick = |offered: &[S]| signer.choose(offered);
        assert_eq!(
            pick(&tls13),
            Some((S::RSA_PSS_SHA256, SignScheme::RsaPss(HashAlg::Sha256)))
        );
        assert_eq!(
            pick(&tls12),
            Some((S::RSA_PSS_SHA512, SignScheme::RsaPss(HashAlg::Sha512)))
        );
        assert_eq!(
            pick(&tls12_no_pss),
            Some((S::RSA_PKCS1_SHA384, SignScheme::RsaPkcs1(HashAlg::Sha384)))
        );
        assert_eq!(pick(&[S::ECDSA_NISTP256_SHA256, S::ED25519]), None);
        assert!(signer.choose_scheme(&[S::ED25519]).is_none());
        // An EC key signs only with its curve's scheme.
        let store = FileKeyStore::new(&dir);
        let ec = KeySigner {
            key: store
                .open(&store.generate("ec", KeyAlgorithm::EcdsaP384).unwrap())
                .unwrap(),
        };
        assert_eq!(ec.algorithm(), SignatureAlgorithm::ECDSA);
        assert_eq!(ec.choose(&tls13), None);
        assert_eq!(
            ec.choose(&tls12_no_pss).map(|c| c.0),
            Some(S::ECDSA_NISTP384_SHA384)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A server-side client-certificate verifier that checks the handshake
    /// signature (with the client certificate's key) and records its scheme.
    #[derive(Debug)]
    struct Recorder {
        accept: Vec<SignatureScheme>,
        seen: Arc<std::sync::Mutex<Vec<SignatureScheme>>>,
    }

    impl rustls::server::danger::ClientCertVerifier for Recorder {
        fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
            &[]
        }
        fn verify_client_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
            Ok(rustls::server::danger::ClientCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.seen.lock().unwrap().push(dss.scheme);
            let algs = provider::default_provider().signature_verification_algorithms;
            rustls::crypto::verify_tls12_signature(message, cert, dss, &algs)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.seen.lock().unwrap().push(dss.scheme);
            let algs = provider::default_provider().signature_verification_algorithms;
            rustls::crypto::verify_tls13_signature(message, cert, dss, &algs)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.accept.clone()
        }
    }

    /// Runs a whole handshake in memory; returns the scheme of the client's
    /// CertificateVerify as the server checked it.
    fn handshake(
        version: &'static rustls::SupportedProtocolVersion,
        accept: &[SignatureScheme],
        key: Arc<dyn Key>,
        dir: &std::path::Path,
    ) -> Result<SignatureScheme, String> {
        use rcgen::{CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.clone().self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let server_cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let client_spki = rcgen::SubjectPublicKeyInfo::from_der(key.public_key_der()).unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gw-0001");
        let client_cert = client_params.signed_by(&client_spki, &issuer).unwrap();

        let bundle = dir.join("ca.pem");
        std::fs::write(&bundle, ca_cert.pem()).unwrap();
        let client = client_config(
            &bundle,
            Some(ClientIdentity {
                chain: vec![client_cert.der().to_vec()],
                key,
            }),
        )
        .unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let server =
            rustls::ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_client_cert_verifier(Arc::new(Recorder {
                    accept: accept.to_vec(),
                    seen: seen.clone(),
                }))
                .with_single_cert(
                    vec![server_cert.der().clone()],
                    rustls_pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
                )
                .unwrap();
        let mut c = rustls::ClientConnection::new(client, "localhost".try_into().unwrap()).unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets()
                    .map_err(|e| format!("server: {e}"))?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets()
                    .map_err(|e| format!("client: {e}"))?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                assert_eq!(s.protocol_version(), Some(version.version));
                let seen = seen.lock().unwrap();
                return seen.first().copied().ok_or("no CertificateVerify".into());
            }
        }
        Err("the handshake did not finish".into())
    }

    #[test]
    fn rsa_client_auth_in_real_tls12_and_tls13_handshakes() {
        use rustls::version::{TLS12, TLS13};
        use SignatureScheme as S;
        let dir = std::env::temp_dir().join(format!("tls-hs-{}", rand::random::<u64>()));
        let key = rsa_key(&dir);
        let all = provider::default_provider()
            .signature_verification_algorithms
            .supported_schemes();
        // TLS 1.3: RSA-PSS (PKCS#1 v1.5 is not allowed there).
        assert_eq!(
            handshake(&TLS13, &all, key.clone(), &dir),
            Ok(S::RSA_PSS_SHA256)
        );
        // TLS 1.2 with PSS on offer: PSS too.
        assert_eq!(
            handshake(&TLS12, &all, key.clone(), &dir),
            Ok(S::RSA_PSS_SHA256)
        );
        // TLS 1.2 server that only takes PKCS#1 v1.5: PKCS#1 v1.5.
        assert_eq!(
            handshake(&TLS12, &[S::RSA_PKCS1_SHA512], key.clone(), &dir),
            Ok(S::RSA_PKCS1_SHA512)
        );
        // TLS 1.3 server that only lists PKCS#1 v1.5: rustls drops it (not
        // allowed in TLS 1.3) and the handshake stops rather than sign with it.
        let err = handshake(&TLS13, &[S::RSA_PKCS1_SHA256], key.clone(), &dir).unwrap_err();
        assert!(
            err.contains("NoCertificateRequestSignatureSchemesInCommon"),
            "{err}"
        );
        // An EC key in TLS 1.3 still signs with its curve.
        let store = FileKeyStore::new(&dir);
        let ec = store
            .open(&store.generate("ec", KeyAlgorithm::EcdsaP256).unwrap())
            .unwrap();
        assert_eq!(
            handshake(&TLS13, &all, ec, &dir),
            Ok(S::ECDSA_NISTP256_SHA256)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
