//! PKCS#10 certificate signing requests, signed by a [`Key`] in any backend.
//! The subject is `CN = <registration id>` and nothing else, as DPS requires; the
//! signature is ecdsa-with-SHA384 for P-384 keys and ecdsa-with-SHA256 for P-256
//! (sha256WithRSAEncryption for an RSA bootstrap key, via `dps-agent csr`).

use std::str::FromStr;

use base64::Engine as _;
use der::asn1::BitString;
use der::{Decode, Encode};
use x509_cert::name::Name;
use x509_cert::request::{CertReq, CertReqInfo, Version};
use x509_cert::spki::{AlgorithmIdentifierOwned, ObjectIdentifier, SubjectPublicKeyInfoOwned};

use crate::keys::{HashAlg, Key, KeyError, SignScheme};

/// ecdsa-with-SHA256 (RFC 5758).
pub const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
/// ecdsa-with-SHA384 (RFC 5758).
pub const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
/// sha256WithRSAEncryption (RFC 4055), for CSRs of RSA bootstrap keys.
pub const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");

/// Errors while building a CSR.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("cannot put {cn:?} in a certificate subject: {reason}")]
    Subject { cn: String, reason: String },
    #[error("the key's public key is not a valid SubjectPublicKeyInfo: {0}")]
    PublicKey(String),
    #[error("cannot encode the CSR: {0}")]
    Encode(String),
    #[error("cannot sign the CSR: {0}")]
    Sign(#[from] KeyError),
    #[error("CSRs are not signed with {0}")]
    Scheme(SignScheme),
}

/// A signed certificate signing request.
#[derive(Debug, Clone)]
pub struct Csr {
    der: Vec<u8>,
}

impl Csr {
    /// Builds and signs a CSR with subject `CN = common_name` for `key`.
    pub fn build(key: &dyn Key, common_name: &str) -> Result<Csr, CsrError> {
        let subject =
            Name::from_str(&format!("CN={}", escape_rdn_value(common_name))).map_err(|e| {
                CsrError::Subject {
                    cn: common_name.to_string(),
                    reason: e.to_string(),
                }
            })?;
        let public_key = SubjectPublicKeyInfoOwned::from_der(key.public_key_der())
            .map_err(|e| CsrError::PublicKey(e.to_string()))?;
        let info = CertReqInfo {
            version: Version::V1,
            subject,
            public_key,
            attributes: Default::default(),
        };
        let tbs = info.to_der().map_err(|e| CsrError::Encode(e.to_string()))?;
        let scheme = key.algorithm().default_scheme();
        let (oid, parameters) = match scheme {
            SignScheme::Ecdsa(HashAlg::Sha384) => (ECDSA_WITH_SHA384, None),
            SignScheme::Ecdsa(_) => (ECDSA_WITH_SHA256, None),
            // An RSA bootstrap key (`dps-agent csr`): NULL parameters (RFC 4055 §5).
            SignScheme::RsaPkcs1(HashAlg::Sha256) => (SHA256_WITH_RSA, Some(der::Any::null())),
            other => return Err(CsrError::Scheme(other)),
        };
        let signature = key.sign_message(scheme, &tbs)?;
        let req = CertReq {
            info,
            algorithm: AlgorithmIdentifierOwned { oid, parameters },
            signature: BitString::from_bytes(&signature)
                .map_err(|e| CsrError::Encode(e.to_string()))?,
        };
        let der = req.to_der().map_err(|e| CsrError::Encode(e.to_string()))?;
        Ok(Csr { der })
    }

    /// The DER encoding.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// Standard base64 (with padding) of the DER, on one line: the form DPS wants
    /// in the `csr` field of a registration.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.der)
    }

    /// PEM (`CERTIFICATE REQUEST`), for a CA to sign by hand.
    pub fn to_pem(&self) -> String {
        let b64 = self.to_base64();
        let mut out = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE REQUEST-----\n");
        out
    }
}

/// Escapes an attribute value for an RFC 4514 string.
fn escape_rdn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let edge = i == 0 || i + 1 == v.chars().count();
        if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && c == '#')
            || (edge && c == ' ')
        {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::file::FileKeyStore;
    use crate::keys::{KeyAlgorithm, KeyStore};

    fn key(alg: KeyAlgorithm) -> (std::path::PathBuf, std::sync::Arc<dyn Key>) {
        let dir = std::env::temp_dir().join(format!("csr-{}", rand::random::<u64>()));
        let store = FileKeyStore::new(&dir);
        let key = store.open(&store.generate("k", alg).unwrap()).unwrap();
        (dir, key)
    }

    #[test]
    fn csr_has_only_cn_and_verifies() {
        for alg in KeyAlgorithm::ALL {
            let (dir, key) = key(alg);
            let csr = Csr::build(key.as_ref(), "gw-0001").unwrap();
            let b64 = csr.to_base64();
            assert!(!b64.contains('\n') && !b64.contains("BEGIN"));
            // rcgen (x509-parser) parses it and checks the self-signature.
            let der = rustls_pki_types::CertificateSigningRequestDer::from(csr.der().to_vec());
            let params = rcgen::CertificateSigningRequestParams::from_der(&der).unwrap();
            let dn: Vec<_> = params.params.distinguished_name.iter().collect();
            assert_eq!(dn.len(), 1, "subject must hold the CN only");
            assert_eq!(
                params
                    .params
                    .distinguished_name
                    .get(&rcgen::DnType::CommonName),
                Some(&rcgen::DnValue::Utf8String("gw-0001".into()))
            );
            let parsed = CertReq::from_der(csr.der()).unwrap();
            let want = if alg == KeyAlgorithm::EcdsaP384 {
                ECDSA_WITH_SHA384
            } else {
                ECDSA_WITH_SHA256
            };
            assert_eq!(parsed.algorithm.oid, want);
            assert_eq!(
                parsed.info.public_key.to_der().unwrap(),
                key.public_key_der()
            );
            assert!(csr
                .to_pem()
                .starts_with("-----BEGIN CERTIFICATE REQUEST-----\n"));
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn escaping() {
        assert_eq!(escape_rdn_value("gw-1.a:b_c"), "gw-1.a:b_c");
        assert_eq!(escape_rdn_value("a,b"), "a\\,b");
        assert_eq!(escape_rdn_value("#x"), "\\#x");
    }
}
