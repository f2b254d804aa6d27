//! Operational certificates: checks a device's CSR (base64 DER PKCS#10) the way the simulated
//! DPS does, and issues a leaf from the issuing CA (like Azure Device Registry), or a
//! deliberately wrong one when a request says so (another key, an unrelated or foreign chain,
//! leaf only). Knows nothing about MQTT, faults or the DPS state machine.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_X509_COMMON_NAME,
};
use x509_parser::prelude::{FromDer, X509CertificationRequest, X509Name};
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::pki::{self, PkiError};

/// errorCode for a CSR that is not base64 or not DER PKCS#10.
pub const ERR_CSR_ENCODING: u32 = 400_040;
/// errorCode for a CSR whose self-signature does not verify.
pub const ERR_CSR_SIGNATURE: u32 = 400_041;
/// errorCode for a CSR whose subject is not exactly `CN={registrationId}`.
pub const ERR_CSR_SUBJECT: u32 = 400_042;
/// errorCode for a CSR key that is not EC P-256 / P-384.
pub const ERR_CSR_KEY: u32 = 400_043;

/// Names of the unrelated CA pair put after the real leaf by `bad-chain`.
pub const UNRELATED_ROOT_CN: &str = "dps-sim Unrelated Root CA";
pub const UNRELATED_CA_CN: &str = "dps-sim Unrelated Intermediate CA";
/// Names of the CA pair that issues the whole chain under `foreign-chain`.
pub const FOREIGN_ROOT_CN: &str = "dps-sim Foreign Root";
pub const FOREIGN_CA_CN: &str = "dps-sim Foreign Policy CA";

/// Why a CSR was refused; the message goes into the 400 error body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("csr is not valid base64 (standard alphabet, padded, one line): {0}")]
    Base64(String),
    #[error("csr is not a DER PKCS#10 certificate request: {0}")]
    Der(String),
    #[error("csr signature does not verify with the public key in the request{0}")]
    Signature(String),
    #[error("csr subject has no CN; it must be exactly CN={expected}")]
    NoCommonName { expected: String },
    #[error("csr subject CN {found:?} does not match the registration id {expected:?}")]
    CommonNameMismatch { found: String, expected: String },
    #[error("csr subject {subject:?} must contain only CN={expected}, nothing else")]
    ExtraSubject { subject: String, expected: String },
    #[error("only EC keys are supported (P-256 or P-384); the csr has an RSA key")]
    RsaKey,
    #[error("only EC keys are supported (P-256 or P-384); the csr key algorithm is {0}")]
    KeyAlgorithm(String),
    #[error("EC curve {0} is not supported; use P-384 or P-256")]
    Curve(String),
}

impl CsrError {
    /// The 6-digit DPS errorCode for this refusal (simulator-defined, 400xxx).
    pub fn error_code(&self) -> u32 {
        match self {
            CsrError::Base64(_) | CsrError::Der(_) => ERR_CSR_ENCODING,
            CsrError::Signature(_) => ERR_CSR_SIGNATURE,
            CsrError::NoCommonName { .. }
            | CsrError::CommonNameMismatch { .. }
            | CsrError::ExtraSubject { .. } => ERR_CSR_SUBJECT,
            CsrError::RsaKey | CsrError::KeyAlgorithm(_) | CsrError::Curve(_) => ERR_CSR_KEY,
        }
    }
}

/// A CSR that passed every check; only its public key is used for the certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidCsr {
    /// DER SubjectPublicKeyInfo of the requested key.
    pub spki_der: Vec<u8>,
}

/// Checks a `csr` field: base64 decodes, DER parses, EC P-256/P-384 key, signature verifies,
/// subject is exactly `CN={registration_id}`.
pub fn check_csr(csr_b64: &str, registration_id: &str) -> Result<ValidCsr, CsrError> {
    let der = STANDARD
        .decode(csr_b64)
        .map_err(|e| CsrError::Base64(e.to_string()))?;
    let (rest, req) =
        X509CertificationRequest::from_der(&der).map_err(|e| CsrError::Der(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Der(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    let info = &req.certification_request_info;
    check_key(&info.subject_pki)?;
    verify_signature(&der, &req)?;
    check_subject(&info.subject, registration_id)?;
    Ok(ValidCsr {
        spki_der: info.subject_pki.raw.to_vec(),
    })
}

fn check_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<(), CsrError> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_PKCS1_RSAENCRYPTION {
        return Err(CsrError::RsaKey);
    }
    if *alg != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(CsrError::KeyAlgorithm(alg.to_id_string()));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| Oid::try_from(p).ok());
    match curve {
        Some(c) if c == OID_EC_P256 || c == OID_NIST_EC_P384 => Ok(()),
        Some(c) => Err(CsrError::Curve(c.to_id_string())),
        None => Err(CsrError::Curve("(not a named curve)".into())),
    }
}

fn verify_signature(der: &[u8], req: &X509CertificationRequest<'_>) -> Result<(), CsrError> {
    let csr_der = CertificateSigningRequestDer::from(der);
    match CertificateSigningRequestParams::from_der(&csr_der) {
        Ok(_) => Ok(()),
        Err(rcgen::Error::InvalidCertificationRequestSignature) => {
            Err(CsrError::Signature(String::new()))
        }
        Err(rcgen::Error::CouldNotParseCertificationRequest) => {
            Err(CsrError::Der("rcgen could not parse it".into()))
        }
        // rcgen refuses requests it cannot turn into certificate parameters (e.g. extensions
        // it does not model). We copy nothing from the request but its key, so check the
        // signature directly (the same ring code rcgen uses).
        Err(_) => req
            .verify_signature()
            .map_err(|e| CsrError::Signature(format!(" ({e})"))),
    }
}

fn check_subject(subject: &X509Name<'_>, expected: &str) -> Result<(), CsrError> {
    let attrs: Vec<_> = subject.iter().flat_map(|rdn| rdn.iter()).collect();
    let cn = attrs
        .iter()
        .find(|a| *a.attr_type() == OID_X509_COMMON_NAME)
        .ok_or_else(|| CsrError::NoCommonName {
            expected: expected.to_string(),
        })?;
    if attrs.len() != 1 || subject.iter().count() != 1 {
        return Err(CsrError::ExtraSubject {
            subject: subject.to_string(),
            expected: expected.to_string(),
        });
    }
    let found = cn.as_str().map_err(|_| CsrError::CommonNameMismatch {
        found: "(not a string)".into(),
        expected: expected.to_string(),
    })?;
    if found != expected {
        return Err(CsrError::CommonNameMismatch {
            found: found.to_string(),
            expected: expected.to_string(),
        });
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the CSR public key cannot be used: {0}")]
    PublicKey(rcgen::Error),
    #[error("signing the certificate failed: {0}")]
    Sign(rcgen::Error),
    #[error("generating a key or CA for a simulated bad chain failed: {0}")]
    Generate(#[source] PkiError),
    #[error(
        "the validity period is empty (not_after {not_after} is not after not_before {not_before})"
    )]
    Validity {
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    },
}

/// Who signs the leaf and what follows it in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChainKind {
    /// Leaf from the issuing CA, then the issuing CA and the issuing root.
    #[default]
    Real,
    /// Leaf from the issuing CA, then a freshly generated, unrelated intermediate and root
    /// ([`UNRELATED_CA_CN`], [`UNRELATED_ROOT_CN`]): the leaf's issuer is not in the chain.
    Unrelated,
    /// Everything from a freshly generated CA pair ([`FOREIGN_CA_CN`], [`FOREIGN_ROOT_CN`]):
    /// consistent, but it does not lead to the issuing root.
    Foreign,
}

/// What to put in an issued leaf. Times are explicit so faults (expired, not yet valid,
/// short-lived) can choose them.
#[derive(Debug, Clone)]
pub struct LeafRequest<'a> {
    pub registration_id: &'a str,
    /// DER SubjectPublicKeyInfo from the CSR.
    pub spki_der: &'a [u8],
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Put a freshly generated key (same curve) in the leaf instead of `spki_der`.
    pub wrong_key: bool,
    pub chain: ChainKind,
    /// Return the leaf alone.
    pub leaf_only: bool,
}

impl<'a> LeafRequest<'a> {
    /// A correct leaf for this key and validity period.
    pub fn new(
        registration_id: &'a str,
        spki_der: &'a [u8],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Self {
        LeafRequest {
            registration_id,
            spki_der,
            not_before,
            not_after,
            wrong_key: false,
            chain: ChainKind::Real,
            leaf_only: false,
        }
    }
}

/// An issued chain and the facts the events file reports about it.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf, issuing CA, issuing root.
    pub chain: Vec<CertificateDer<'static>>,
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Lowercase hex SHA-256 of the leaf's DER SubjectPublicKeyInfo.
    pub leaf_spki_sha256: String,
    /// The same for the CSR's key (differs from `leaf_spki_sha256` only with `wrong_key`).
    pub csr_spki_sha256: String,
}

/// The issuing CA (ADR policy CA) with its certificate chain.
pub struct CertIssuer {
    issuer: Issuer<'static, KeyPair>,
    ca: CertificateDer<'static>,
    root: CertificateDer<'static>,
}

impl std::fmt::Debug for CertIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertIssuer").finish_non_exhaustive()
    }
}

impl CertIssuer {
    /// Loads `issuing-ca.pem/.key` and `issuing-root.pem` from a PKI directory.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let issuer = pki::load_issuer(
            &pki::cert_file(dir, pki::ISSUING_CA),
            &pki::key_file(dir, pki::ISSUING_CA),
        )?;
        Ok(CertIssuer {
            issuer,
            ca: pki::load_cert(&pki::cert_file(dir, pki::ISSUING_CA))?,
            root: pki::load_cert(&pki::cert_file(dir, pki::ISSUING_ROOT))?,
        })
    }

    /// The issuing CA certificate (what the simulated hub trusts).
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// Issues a leaf: subject CN = registration id only, the requested key, random serial,
    /// EKU clientAuth, KU digitalSignature, SKI/AKI, CA:false; signed by the issuing CA, unless
    /// the request asks for a wrong key or another chain.
    pub fn issue(&self, req: &LeafRequest<'_>) -> Result<Issued, IssueError> {
        if req.not_after <= req.not_before {
            return Err(IssueError::Validity {
                not_before: req.not_before,
                not_after: req.not_after,
            });
        }
        let leaf_spki = if req.wrong_key {
            unrelated_key_like(req.spki_der)?
        } else {
            req.spki_der.to_vec()
        };
        let public_key =
            rcgen::SubjectPublicKeyInfo::from_der(&leaf_spki).map_err(IssueError::PublicKey)?;
        let (serial, serial_hex) = pki::random_serial();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, req.registration_id);
        params.distinguished_name = dn;
        params.serial_number = Some(serial);
        params.not_before = req.not_before;
        params.not_after = req.not_after;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let mut chain = match req.chain {
            ChainKind::Real | ChainKind::Unrelated => {
                let leaf = params
                    .signed_by(&public_key, &self.issuer)
                    .map_err(IssueError::Sign)?;
                vec![leaf.der().clone()]
            }
            ChainKind::Foreign => {
                let (root, ca) =
                    pki::ca_pair(FOREIGN_ROOT_CN, FOREIGN_CA_CN).map_err(IssueError::Generate)?;
                let leaf = params
                    .signed_by(&public_key, &ca)
                    .map_err(IssueError::Sign)?;
                vec![leaf.der().clone(), ca.der().clone(), root.der().clone()]
            }
        };
        match req.chain {
            ChainKind::Real => chain.extend([self.ca.clone(), self.root.clone()]),
            ChainKind::Unrelated => {
                let (root, ca) = pki::ca_pair(UNRELATED_ROOT_CN, UNRELATED_CA_CN)
                    .map_err(IssueError::Generate)?;
                chain.extend([ca.der().clone(), root.der().clone()]);
            }
            ChainKind::Foreign => {}
        }
        if req.leaf_only {
            chain.truncate(1);
        }
        Ok(Issued {
            chain,
            serial_hex,
            not_before: req.not_before,
            not_after: req.not_after,
            leaf_spki_sha256: sha256_hex(&leaf_spki),
            csr_spki_sha256: sha256_hex(req.spki_der),
        })
    }
}

/// A freshly generated public key (DER SubjectPublicKeyInfo) on the same curve as `spki_der`
/// (P-256 stays P-256, anything else gets P-384); its private key is thrown away.
fn unrelated_key_like(spki_der: &[u8]) -> Result<Vec<u8>, IssueError> {
    let p256 = SubjectPublicKeyInfo::from_der(spki_der)
        .ok()
        .and_then(|(_, spki)| {
            spki.algorithm
                .parameters
                .as_ref()
                .and_then(|p| Oid::try_from(p).ok())
        })
        .is_some_and(|curve| curve == OID_EC_P256);
    let alg = if p256 {
        &PKCS_ECDSA_P256_SHA256
    } else {
        &PKCS_ECDSA_P384_SHA384
    };
    let key = KeyPair::generate_for(alg).map_err(|e| IssueError::Generate(e.into()))?;
    Ok(key.subject_public_key_info())
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PKCS_ED25519;
    use x509_parser::prelude::parse_x509_certificate;

    fn csr_with(dn: DistinguishedName, key: &KeyPair) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        let csr = params.serialize_request(key).unwrap();
        STANDARD.encode(csr.der())
    }

    fn cn(name: &str) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn
    }

    #[test]
    fn good_csr_p384_and_p256() {
        for alg in [&PKCS_ECDSA_P384_SHA384, &PKCS_ECDSA_P256_SHA256] {
            let key = KeyPair::generate_for(alg).unwrap();
            let valid = check_csr(&csr_with(cn("gw-0001"), &key), "gw-0001").unwrap();
            assert_eq!(valid.spki_der, key.subject_public_key_info());
        }
    }

    #[test]
    fn wrong_cn() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let err = check_csr(&csr_with(cn("gw-0002"), &key), "gw-0001").unwrap_err();
        assert!(matches!(err, CsrError::CommonNameMismatch { .. }), "{err}");
        assert_eq!(err.error_code(), ERR_CSR_SUBJECT);
        // Exact match: case matters.
        let err = check_csr(&csr_with(cn("GW-0001"), &key), "gw-0001").unwrap_err();
        assert!(matches!(err, CsrError::CommonNameMismatch { .. }), "{err}");
    }

    #[test]
    fn extra_subject_attributes() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let mut dn = cn("gw-0001");
        dn.push(DnType::OrganizationName, "Contoso");
        let err = check_csr(&csr_with(dn, &key), "gw-0001").unwrap_err();
        assert!(matches!(err, CsrError::ExtraSubject { .. }), "{err}");
        assert!(err.to_string().contains("only CN=gw-0001"), "{err}");

        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Contoso");
        let err = check_csr(&csr_with(dn, &key), "gw-0001").unwrap_err();
        assert!(matches!(err, CsrError::NoCommonName { .. }), "{err}");
    }

    #[test]
    fn corrupted_signature() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = cn("gw-0001");
        let mut der = params.serialize_request(&key).unwrap().der().to_vec();
        // The signature BIT STRING is at the end; flip a bit inside the ECDSA `s` integer.
        let n = der.len();
        der[n - 3] ^= 0x01;
        let err = check_csr(&STANDARD.encode(&der), "gw-0001").unwrap_err();
        assert!(matches!(err, CsrError::Signature(_)), "{err}");
        assert_eq!(err.error_code(), ERR_CSR_SIGNATURE);
    }

    #[test]
    fn encoding_errors() {
        let err = check_csr("not base64!", "gw-0001").unwrap_err();
        assert!(matches!(err, CsrError::Base64(_)), "{err}");
        let err = check_csr(&STANDARD.encode(b"hello"), "gw-0001").unwrap_err();
        assert!(matches!(err, CsrError::Der(_)), "{err}");
        // PEM instead of bare base64 DER.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = cn("gw-0001");
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(check_csr(&pem, "gw-0001").is_err());
        assert_eq!(
            check_csr("", "gw-0001").unwrap_err().error_code(),
            ERR_CSR_ENCODING
        );
    }

    #[test]
    fn non_ec_key() {
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let err = check_csr(&csr_with(cn("gw-0001"), &key), "gw-0001").unwrap_err();
        assert!(matches!(err, CsrError::KeyAlgorithm(_)), "{err}");
        assert!(err.to_string().contains("only EC keys"));
        assert_eq!(err.error_code(), ERR_CSR_KEY);
    }

    /// DER TLV with a short or long-form length.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            out.extend([0x82, (len >> 8) as u8, len as u8]);
        }
        out.extend_from_slice(content);
        out
    }

    #[test]
    fn rsa_key_is_refused() {
        // ring cannot generate RSA keys, so build an RSA-shaped request by hand; the key type
        // is checked before the signature, so the signature can be junk.
        const RSA_ENCRYPTION: &[u8] = &[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
        ];
        const SHA256_WITH_RSA: &[u8] = &[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b,
        ];
        let null = [0x05, 0x00];
        let cn = tlv(
            0x30,
            &[&[0x06, 0x03, 0x55, 0x04, 0x03][..], &tlv(0x0c, b"gw-0001")].concat(),
        );
        let name = tlv(0x30, &tlv(0x31, &cn));
        let mut modulus = vec![0x00, 0xc0];
        modulus.extend([0x11; 255]);
        let rsa_key = tlv(
            0x30,
            &[tlv(0x02, &modulus), tlv(0x02, &[0x01, 0x00, 0x01])].concat(),
        );
        let spki = tlv(
            0x30,
            &[
                tlv(0x30, &[RSA_ENCRYPTION, &null[..]].concat()),
                tlv(0x03, &[&[0x00][..], &rsa_key].concat()),
            ]
            .concat(),
        );
        let info = tlv(
            0x30,
            &[&[0x02, 0x01, 0x00][..], &name, &spki, &[0xa0, 0x00]].concat(),
        );
        let csr = tlv(
            0x30,
            &[
                info,
                tlv(0x30, &[SHA256_WITH_RSA, &null[..]].concat()),
                tlv(0x03, &[0x00, 0x01, 0x02, 0x03]),
            ]
            .concat(),
        );
        let err = check_csr(&STANDARD.encode(&csr), "gw-0001").unwrap_err();
        assert_eq!(err, CsrError::RsaKey);
        assert!(err.to_string().contains("only EC keys"));
        assert_eq!(err.error_code(), ERR_CSR_KEY);
    }

    #[test]
    fn issues_leaf_from_issuing_ca() {
        let dir = tempfile::tempdir().unwrap();
        pki::generate(dir.path(), &[], false).unwrap();
        let issuer = CertIssuer::load(dir.path()).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let valid = check_csr(&csr_with(cn("gw-0001"), &key), "gw-0001").unwrap();
        let now = pki::now_seconds();
        let issued = issuer
            .issue(&LeafRequest::new(
                "gw-0001",
                &valid.spki_der,
                now,
                now + time::Duration::hours(1),
            ))
            .unwrap();
        assert_eq!(issued.chain.len(), 3);
        let (_, leaf) = parse_x509_certificate(&issued.chain[0]).unwrap();
        let (_, ca) = parse_x509_certificate(&issued.chain[1]).unwrap();
        assert_eq!(leaf.subject().to_string(), "CN=gw-0001");
        assert_eq!(ca.subject().to_string(), "CN=dps-sim ADR Policy CA");
        assert_eq!(leaf.issuer(), ca.subject());
        assert!(leaf.verify_signature(Some(ca.public_key())).is_ok());
        assert_eq!(
            leaf.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        assert_eq!(leaf.validity().not_before.timestamp(), now.unix_timestamp());
        assert_eq!(
            leaf.validity().not_after.timestamp(),
            now.unix_timestamp() + 3600
        );
        assert_eq!(
            leaf.raw_serial_as_string().replace(':', ""),
            issued.serial_hex
        );
        assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
        assert!(
            leaf.extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .client_auth
        );
        assert!(leaf.key_usage().unwrap().unwrap().value.digital_signature());
        assert!(has_ext(
            &leaf,
            &x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER
        ));
        assert!(has_ext(
            &leaf,
            &x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER
        ));
        assert_eq!(
            leaf.signature_algorithm.algorithm,
            x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA384
        );
        assert_eq!(
            issued.leaf_spki_sha256,
            sha256_hex(&key.subject_public_key_info())
        );
    }

    fn has_ext(cert: &x509_parser::certificate::X509Certificate<'_>, oid: &Oid<'_>) -> bool {
        cert.extensions().iter().any(|e| e.oid == *oid)
    }

    /// An issuer over a fresh PKI, a P-384 CSR key and a one-hour request for it.
    fn setup() -> (tempfile::TempDir, CertIssuer, KeyPair) {
        let dir = tempfile::tempdir().unwrap();
        pki::generate(dir.path(), &[], false).unwrap();
        let issuer = CertIssuer::load(dir.path()).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        (dir, issuer, key)
    }

    fn issue_with(
        issuer: &CertIssuer,
        spki: &[u8],
        tweak: impl FnOnce(&mut LeafRequest<'_>),
    ) -> Issued {
        let now = pki::now_seconds();
        let mut req = LeafRequest::new("gw-0001", spki, now, now + time::Duration::hours(1));
        tweak(&mut req);
        issuer.issue(&req).unwrap()
    }

    fn subject(der: &[u8]) -> String {
        parse_x509_certificate(der).unwrap().1.subject().to_string()
    }

    #[test]
    fn wrong_key_keeps_everything_but_the_key() {
        let (_d, issuer, key) = setup();
        let spki = key.subject_public_key_info();
        let issued = issue_with(&issuer, &spki, |r| r.wrong_key = true);
        let (_, leaf) = parse_x509_certificate(&issued.chain[0]).unwrap();
        assert_ne!(leaf.public_key().raw, spki.as_slice());
        assert_eq!(issued.leaf_spki_sha256, sha256_hex(leaf.public_key().raw));
        assert_eq!(issued.csr_spki_sha256, sha256_hex(&spki));
        assert_ne!(issued.leaf_spki_sha256, issued.csr_spki_sha256);
        // Same curve, same name, same issuer.
        assert_eq!(
            leaf.public_key().algorithm.parameters,
            parse_x509_certificate(&issue_with(&issuer, &spki, |_| {}).chain[0])
                .unwrap()
                .1
                .public_key()
                .algorithm
                .parameters
        );
        assert_eq!(leaf.subject().to_string(), "CN=gw-0001");
        assert_eq!(issued.chain[1], *issuer.ca_cert());
        // A P-256 CSR key gets a P-256 replacement.
        let p256 = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let issued = issue_with(&issuer, &p256.subject_public_key_info(), |r| {
            r.wrong_key = true
        });
        let (_, leaf) = parse_x509_certificate(&issued.chain[0]).unwrap();
        let curve = leaf.public_key().algorithm.parameters.as_ref().unwrap();
        assert_eq!(Oid::try_from(curve).unwrap(), OID_EC_P256);
        assert_ne!(leaf.public_key().raw, p256.subject_public_key_info());
    }

    #[test]
    fn unrelated_chain_does_not_contain_the_leaf_issuer() {
        let (dir, issuer, key) = setup();
        let issued = issue_with(&issuer, &key.subject_public_key_info(), |r| {
            r.chain = ChainKind::Unrelated
        });
        assert_eq!(issued.chain.len(), 3);
        let (_, leaf) = parse_x509_certificate(&issued.chain[0]).unwrap();
        let (_, real_ca) = parse_x509_certificate(issuer.ca_cert()).unwrap();
        let (_, ca) = parse_x509_certificate(&issued.chain[1]).unwrap();
        let (_, root) = parse_x509_certificate(&issued.chain[2]).unwrap();
        // The leaf really is from the issuing CA ...
        assert_eq!(leaf.issuer(), real_ca.subject());
        assert!(leaf.verify_signature(Some(real_ca.public_key())).is_ok());
        // ... but the rest is a consistent pair with other names.
        assert_eq!(ca.subject().to_string(), format!("CN={UNRELATED_CA_CN}"));
        assert_eq!(
            root.subject().to_string(),
            format!("CN={UNRELATED_ROOT_CN}")
        );
        assert_ne!(leaf.issuer(), ca.subject());
        assert!(leaf.verify_signature(Some(ca.public_key())).is_err());
        assert!(ca.verify_signature(Some(root.public_key())).is_ok());
        assert_ne!(subject(&issued.chain[2]), subject(&pki_root(&dir)));
    }

    fn pki_root(dir: &tempfile::TempDir) -> Vec<u8> {
        pki::load_cert(&pki::cert_file(dir.path(), pki::ISSUING_ROOT))
            .unwrap()
            .to_vec()
    }

    #[test]
    fn foreign_chain_is_consistent_but_foreign() {
        let (d, issuer, key) = setup();
        let spki = key.subject_public_key_info();
        let issued = issue_with(&issuer, &spki, |r| r.chain = ChainKind::Foreign);
        assert_eq!(issued.chain.len(), 3);
        let (_, leaf) = parse_x509_certificate(&issued.chain[0]).unwrap();
        let (_, ca) = parse_x509_certificate(&issued.chain[1]).unwrap();
        let (_, root) = parse_x509_certificate(&issued.chain[2]).unwrap();
        assert_eq!(leaf.subject().to_string(), "CN=gw-0001");
        assert_eq!(leaf.public_key().raw, spki.as_slice());
        assert_eq!(ca.subject().to_string(), format!("CN={FOREIGN_CA_CN}"));
        assert_eq!(root.subject().to_string(), format!("CN={FOREIGN_ROOT_CN}"));
        assert!(leaf.verify_signature(Some(ca.public_key())).is_ok());
        assert!(ca.verify_signature(Some(root.public_key())).is_ok());
        assert!(root.verify_signature(None).is_ok());
        let real_root = pki_root(&d);
        let (_, real_root) = parse_x509_certificate(&real_root).unwrap();
        let (_, real_ca) = parse_x509_certificate(issuer.ca_cert()).unwrap();
        assert!(leaf.verify_signature(Some(real_ca.public_key())).is_err());
        assert!(ca.verify_signature(Some(real_root.public_key())).is_err());
    }

    #[test]
    fn leaf_only_and_validity_are_as_requested() {
        let (_d, issuer, key) = setup();
        let spki = key.subject_public_key_info();
        let issued = issue_with(&issuer, &spki, |r| r.leaf_only = true);
        assert_eq!(issued.chain.len(), 1);
        let (_, leaf) = parse_x509_certificate(&issued.chain[0]).unwrap();
        assert_eq!(leaf.subject().to_string(), "CN=gw-0001");
        let issued = issue_with(&issuer, &spki, |r| {
            r.leaf_only = true;
            r.chain = ChainKind::Foreign;
        });
        assert_eq!(issued.chain.len(), 1);
        let (_, leaf) = parse_x509_certificate(&issued.chain[0]).unwrap();
        assert_eq!(leaf.issuer().to_string(), format!("CN={FOREIGN_CA_CN}"));

        // Any period in the past or future is issued as asked; an empty one is refused.
        let now = pki::now_seconds();
        let past = LeafRequest::new(
            "gw-0001",
            &spki,
            now - time::Duration::days(2),
            now - time::Duration::days(1),
        );
        let issued = issuer.issue(&past).unwrap();
        let (_, leaf) = parse_x509_certificate(&issued.chain[0]).unwrap();
        assert_eq!(
            leaf.validity().not_after.timestamp(),
            now.unix_timestamp() - 86_400
        );
        let empty = LeafRequest::new("gw-0001", &spki, now, now);
        assert!(matches!(
            issuer.issue(&empty),
            Err(IssueError::Validity { .. })
        ));
    }
}
