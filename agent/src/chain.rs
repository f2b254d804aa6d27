//! Checks a certificate chain before it is trusted. Pure functions over DER bytes:
//! no I/O, no clock of its own (the caller passes `now`), no panics on hostile
//! input. Used for the operational chain DPS issues and for the bootstrap chain
//! the installer supplies.
//!
//! Positions in the received list are not trusted: the leaf is the certificate
//! holding the expected key, and each issuer is found by name and proven by its
//! signature.

use der::{Decode, Encode};
use sha2::Digest as _;
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage};
use x509_cert::spki::ObjectIdentifier;
use x509_cert::Certificate;

use crate::clock::{rfc3339, UnixTime};

const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const OID_ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const OID_ECDSA_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.4");
const OID_RSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const OID_RSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12");
const OID_RSA_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.13");
const OID_EKU: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");
const OID_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");
const OID_BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const OID_CLIENT_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2");
const OID_ANY_EKU: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37.0");

/// Why a chain was refused. Each message says which certificate and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the chain is empty")]
    Empty,
    #[error("certificate {index} of the chain is not valid DER X.509: {reason}")]
    Parse { index: usize, reason: String },
    #[error("no certificate in the chain holds the expected key (the leaf {leaf} has another public key): it was issued for a different key")]
    KeyMismatch { leaf: String },
    #[error("the chain is truncated: the issuer of {subject} ({issuer}) is missing")]
    MissingIssuer { subject: String, issuer: String },
    #[error("{subject} is not signed by the next certificate {issuer}: {reason}")]
    BadSignature {
        subject: String,
        issuer: String,
        reason: String,
    },
    #[error(
        "{issuer} issues {subject} but is not a CA certificate (basicConstraints CA is not set)"
    )]
    NotCa { subject: String, issuer: String },
    #[error("the leaf's common name is {found:?}, expected {expected:?}")]
    WrongCommonName { expected: String, found: String },
    #[error("{subject} expired at {}", rfc3339(*not_after))]
    Expired {
        subject: String,
        not_after: UnixTime,
    },
    #[error("{subject} is not valid before {} (now {}, allowed clock skew {skew}s): check the clock", rfc3339(*not_before), rfc3339(*now))]
    NotYetValid {
        subject: String,
        not_before: UnixTime,
        now: UnixTime,
        skew: u64,
    },
    #[error("{subject} may not be used for TLS client authentication ({reason})")]
    NotForClientAuth { subject: String, reason: String },
    #[error("{subject}: unsupported signature algorithm {oid}")]
    UnsupportedAlgorithm { subject: String, oid: String },
    #[error("the chain leads to {top}, not to the expected issuer ({expected}): a foreign CA issued it; if your ADR credential (root CA) really changed, list the new root in [operational] issuer_trust")]
    UntrustedIssuer { top: String, expected: String },
    #[error("[operational] issuer_trust {path}: {reason}")]
    IssuerTrust { path: String, reason: String },
}

/// What the chain must satisfy.
#[derive(Debug, Clone)]
pub struct Expectations<'a> {
    /// The leaf's SubjectPublicKeyInfo DER (the key the CSR was made with).
    pub leaf_spki: &'a [u8],
    /// The leaf's subject common name (the registration id).
    pub common_name: Option<&'a str>,
    /// Current time.
    pub now: UnixTime,
    /// How far in the future a notBefore may be.
    pub max_skew_secs: u64,
    /// Whether the leaf's issuer must be in the chain (true for issued chains;
    /// a bootstrap certificate may come alone).
    pub require_issuer: bool,
}

/// A checked chain, leaf first, each certificate issued by the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChain {
    /// DER of each certificate, leaf first.
    pub certs: Vec<Vec<u8>>,
    /// Whether the last certificate is a self-signed root.
    pub ends_in_root: bool,
    /// Certificates received that are not part of the leaf's path.
    pub ignored: usize,
    /// The leaf's validity.
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    /// The leaf's subject and issuer as one-line text.
    pub subject: String,
    pub issuer: String,
    /// Uppercase hex SHA-256 of the leaf DER.
    pub thumbprint: String,
}

impl VerifiedChain {
    /// The certificates to present in a TLS handshake: leaf and intermediates,
    /// without a self-signed root.
    pub fn presented(&self) -> &[Vec<u8>] {
        if self.ends_in_root && self.certs.len() > 1 {
            &self.certs[..self.certs.len() - 1]
        } else {
            &self.certs
        }
    }

    /// The whole chain as PEM, leaf first.
    pub fn to_pem(&self) -> String {
        certs_to_pem(&self.certs)
    }
}

/// Checks a chain against `want` and returns it ordered leaf first.
pub fn verify(chain: &[Vec<u8>], want: &Expectations<'_>) -> Result<VerifiedChain, ChainError> {
    if chain.is_empty() {
        return Err(ChainError::Empty);
    }
    let certs = chain
        .iter()
        .enumerate()
        .map(|(index, der)| {
            Certificate::from_der(der).map_err(|e| ChainError::Parse {
                index,
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let leaf_index = certs
        .iter()
        .position(|c| spki_der(c).as_deref() == Some(want.leaf_spki))
        .ok_or_else(|| ChainError::KeyMismatch {
            leaf: describe(&certs[0]),
        })?;

    let (path, ends_in_root) = issuer_path(&certs, leaf_index, want.require_issuer)?;

    let leaf = &certs[leaf_index];
    if let Some(expected) = want.common_name {
        let found = common_name(leaf).unwrap_or_default();
        if found != expected {
            return Err(ChainError::WrongCommonName {
                expected: expected.to_string(),
                found,
            });
        }
    }
    for &i in &path {
        check_dates(&certs[i], want.now, want.max_skew_secs)?;
    }
    check_client_auth(leaf)?;

    let (not_before, not_after) = validity(leaf);
    Ok(VerifiedChain {
        ignored: certs.len() - path.len(),
        certs: path.iter().map(|&i| chain[i].clone()).collect(),
        ends_in_root,
        not_before,
        not_after,
        subject: leaf.tbs_certificate().subject().to_string(),
        issuer: leaf.tbs_certificate().issuer().to_string(),
        thumbprint: thumbprint(&chain[leaf_index]),
    })
}

/// Whether a checked chain comes from an expected issuer: one of its certificates is one of
/// `anchors` (DER), or its topmost certificate is signed by one of them. [`verify`] proves a
/// chain is consistent; only this proves whose it is, since a foreign CA can issue a perfectly
/// consistent chain for our key and CN. No anchors: nothing to compare with, accepted.
pub fn check_anchored(chain: &VerifiedChain, anchors: &[Vec<u8>]) -> Result<(), ChainError> {
    if anchors.is_empty() || chain.certs.iter().any(|c| anchors.contains(c)) {
        return Ok(());
    }
    let Some(top) = chain.certs.last() else {
        return Err(ChainError::Empty);
    };
    let top = Certificate::from_der(top).map_err(|e| ChainError::Parse {
        index: chain.certs.len() - 1,
        reason: e.to_string(),
    })?;
    let anchors: Vec<Certificate> = anchors
        .iter()
        .filter_map(|a| Certificate::from_der(a).ok())
        .collect();
    let issued_by_anchor = anchors.iter().any(|a| {
        a.tbs_certificate().subject() == top.tbs_certificate().issuer()
            && verify_signature(&top, a).is_ok()
    });
    if issued_by_anchor {
        return Ok(());
    }
    Err(ChainError::UntrustedIssuer {
        top: describe(&top),
        expected: anchors.iter().map(describe).collect::<Vec<_>>().join(", "),
    })
}

/// The issuer path of `certs[leaf_index]`: indices from the leaf up, each issuer
/// found by name, proven by its signature and required to be a CA; and whether
/// the path ends in a self-signed root. Certificates off the path are left out;
/// one that follows but issued nothing on the path is an error. Dates and usages
/// are not looked at (see [`verify`]).
pub fn issuer_path(
    certs: &[Certificate],
    leaf_index: usize,
    require_issuer: bool,
) -> Result<(Vec<usize>, bool), ChainError> {
    let mut path = vec![leaf_index];
    let mut ends_in_root = false;
    loop {
        let current = &certs[*path.last().unwrap_or(&leaf_index)];
        if is_self_issued(current) {
            verify_signature(current, current)?;
            ends_in_root = true;
            break;
        }
        let candidates: Vec<usize> = (0..certs.len())
            .filter(|i| !path.contains(i))
            .filter(|&i| certs[i].tbs_certificate().subject() == current.tbs_certificate().issuer())
            .collect();
        if candidates.is_empty() {
            if let Some(next) = (0..certs.len()).find(|i| !path.contains(i)) {
                // Something else follows but it is not this certificate's issuer.
                return Err(ChainError::BadSignature {
                    subject: describe(current),
                    issuer: describe(&certs[next]),
                    reason: "the issuer name does not match".into(),
                });
            }
            if path.len() == 1 && require_issuer {
                // A leaf with nothing above it cannot be checked at all.
                return Err(ChainError::MissingIssuer {
                    subject: describe(current),
                    issuer: current.tbs_certificate().issuer().to_string(),
                });
            }
            break; // ends below the root; the root is optional
        }
        let mut last_err = None;
        let mut found = None;
        for &i in &candidates {
            match verify_signature(current, &certs[i]) {
                Ok(()) => {
                    found = Some(i);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        match (found, last_err) {
            (Some(i), _) => {
                check_is_ca(current, &certs[i])?;
                path.push(i);
            }
            (None, Some(e)) => return Err(e),
            (None, None) => break,
        }
    }
    Ok((path, ends_in_root))
}

/// Uppercase hex SHA-256 of a certificate's DER.
pub fn thumbprint(der: &[u8]) -> String {
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// PEM-encodes certificates (`CERTIFICATE` blocks).
pub fn certs_to_pem(certs: &[Vec<u8>]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for der in certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// Reads every `CERTIFICATE` block of a PEM text, in order.
pub fn certs_from_pem(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    use base64::Engine as _;
    let mut out = Vec::new();
    let mut body: Option<String> = None;
    for line in pem.lines() {
        let line = line.trim();
        if line == "-----BEGIN CERTIFICATE-----" {
            body = Some(String::new());
        } else if line == "-----END CERTIFICATE-----" {
            let b = body.take().ok_or("END CERTIFICATE without BEGIN")?;
            let der = base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map_err(|e| format!("certificate {} is not valid base64: {e}", out.len() + 1))?;
            out.push(der);
        } else if let Some(b) = body.as_mut() {
            b.push_str(line);
        }
    }
    if body.is_some() {
        return Err("a CERTIFICATE block is not terminated".into());
    }
    Ok(out)
}

/// Validity of a certificate as Unix seconds (notBefore, notAfter).
pub fn validity(cert: &Certificate) -> (UnixTime, UnixTime) {
    let v = cert.tbs_certificate().validity();
    (
        v.not_before.to_unix_duration().as_secs() as i64,
        v.not_after.to_unix_duration().as_secs() as i64,
    )
}

/// The subject common name, if any.
pub fn common_name(cert: &Certificate) -> Option<String> {
    cert.tbs_certificate()
        .subject()
        .common_name()
        .ok()
        .flatten()
        .map(String::from)
}

/// A short human description of a certificate: its subject, or CN if present.
pub fn describe(cert: &Certificate) -> String {
    match common_name(cert) {
        Some(cn) => format!("certificate CN={cn}"),
        None => format!("certificate \"{}\"", cert.tbs_certificate().subject()),
    }
}

/// The SubjectPublicKeyInfo DER of a certificate given as DER.
pub fn spki_of(cert_der: &[u8]) -> Option<Vec<u8>> {
    spki_der(&Certificate::from_der(cert_der).ok()?)
}

fn spki_der(cert: &Certificate) -> Option<Vec<u8>> {
    cert.tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .ok()
}

/// A stored chain (leaf first) split into what a TLS handshake presents and
/// its self-signed root, if it ends in one. A chain stored without its root
/// keeps every certificate: the issuing CA is presented, never dropped.
pub fn split_root(chain: &[Vec<u8>]) -> (&[Vec<u8>], Option<&Vec<u8>>) {
    match chain.split_last() {
        Some((last, rest))
            if !rest.is_empty()
                && Certificate::from_der(last)
                    .is_ok_and(|c| is_self_issued(&c) && verify_signature(&c, &c).is_ok()) =>
        {
            (rest, Some(last))
        }
        _ => (chain, None),
    }
}

fn is_self_issued(cert: &Certificate) -> bool {
    cert.tbs_certificate().subject() == cert.tbs_certificate().issuer()
}

/// The certificate is within its dates at `now` (a notBefore up to `skew`
/// seconds ahead is allowed).
pub fn check_dates(cert: &Certificate, now: UnixTime, skew: u64) -> Result<(), ChainError> {
    let (not_before, not_after) = validity(cert);
    if now >= not_after {
        return Err(ChainError::Expired {
            subject: describe(cert),
            not_after,
        });
    }
    if not_before > now.saturating_add(skew as i64) {
        return Err(ChainError::NotYetValid {
            subject: describe(cert),
            not_before,
            now,
            skew,
        });
    }
    Ok(())
}

fn find_ext(cert: &Certificate, oid: ObjectIdentifier) -> Option<&[u8]> {
    cert.tbs_certificate()
        .extensions()?
        .iter()
        .find(|e| e.extn_id == oid)
        .map(|e| e.extn_value.as_bytes())
}

/// The certificate may authenticate a TLS client: extendedKeyUsage (if present)
/// allows clientAuth, keyUsage (if present) allows digitalSignature.
pub fn check_client_auth(cert: &Certificate) -> Result<(), ChainError> {
    let refuse = |reason: &str| ChainError::NotForClientAuth {
        subject: describe(cert),
        reason: reason.to_string(),
    };
    if let Some(bytes) = find_ext(cert, OID_EKU) {
        let eku = ExtendedKeyUsage::from_der(bytes)
            .map_err(|_| refuse("its extendedKeyUsage extension does not parse"))?;
        if !eku
            .0
            .iter()
            .any(|o| *o == OID_CLIENT_AUTH || *o == OID_ANY_EKU)
        {
            return Err(refuse("extendedKeyUsage lacks clientAuth"));
        }
    }
    if let Some(bytes) = find_ext(cert, OID_KEY_USAGE) {
        let ku = KeyUsage::from_der(bytes)
            .map_err(|_| refuse("its keyUsage extension does not parse"))?;
        if !ku.digital_signature() {
            return Err(refuse("keyUsage lacks digitalSignature"));
        }
    }
    Ok(())
}

fn check_is_ca(subject: &Certificate, issuer: &Certificate) -> Result<(), ChainError> {
    let is_ca = find_ext(issuer, OID_BASIC_CONSTRAINTS)
        .and_then(|b| BasicConstraints::from_der(b).ok())
        .map(|bc| bc.ca)
        .unwrap_or(false);
    if is_ca {
        Ok(())
    } else {
        Err(ChainError::NotCa {
            subject: describe(subject),
            issuer: describe(issuer),
        })
    }
}

/// Verifies that `issuer`'s key signed `subject`.
pub fn verify_signature(subject: &Certificate, issuer: &Certificate) -> Result<(), ChainError> {
    let bad = |reason: &str| ChainError::BadSignature {
        subject: describe(subject),
        issuer: describe(issuer),
        reason: reason.to_string(),
    };
    let sig_oid = subject.signature_algorithm().oid;
    let spki = issuer.tbs_certificate().subject_public_key_info();
    let key_oid = spki.algorithm.oid;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    use ring::signature as rs;
    let alg: &dyn rs::VerificationAlgorithm = match (sig_oid, key_oid, curve) {
        (OID_ECDSA_SHA256, OID_EC_PUBLIC_KEY, Some(OID_P256)) => &rs::ECDSA_P256_SHA256_ASN1,
        (OID_ECDSA_SHA384, OID_EC_PUBLIC_KEY, Some(OID_P256)) => &rs::ECDSA_P256_SHA384_ASN1,
        (OID_ECDSA_SHA256, OID_EC_PUBLIC_KEY, Some(OID_P384)) => &rs::ECDSA_P384_SHA256_ASN1,
        (OID_ECDSA_SHA384, OID_EC_PUBLIC_KEY, Some(OID_P384)) => &rs::ECDSA_P384_SHA384_ASN1,
        (OID_RSA_SHA256, OID_RSA_ENCRYPTION, _) => &rs::RSA_PKCS1_2048_8192_SHA256,
        (OID_RSA_SHA384, OID_RSA_ENCRYPTION, _) => &rs::RSA_PKCS1_2048_8192_SHA384,
        (OID_RSA_SHA512, OID_RSA_ENCRYPTION, _) => &rs::RSA_PKCS1_2048_8192_SHA512,
        (OID_ECDSA_SHA512, _, _) | (_, _, _) => {
            return Err(ChainError::UnsupportedAlgorithm {
                subject: describe(subject),
                oid: format!("{sig_oid} with key {key_oid}"),
            })
        }
    };
    let tbs = subject
        .tbs_certificate()
        .to_der()
        .map_err(|_| bad("cannot re-encode the certificate body"))?;
    let sig = subject
        .signature()
        .as_bytes()
        .ok_or_else(|| bad("the signature is not a whole number of bytes"))?;
    rs::UnparsedPublicKey::new(alg, spki.subject_public_key.raw_bytes())
        .verify(&tbs, sig)
        .map_err(|_| bad("the signature does not verify"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints as Bc, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        PublicKeyData, PKCS_ECDSA_P384_SHA384,
    };

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
        issuer: rcgen::Issuer<'static, KeyPair>,
    }

    fn ca(name: &str, parent: Option<&Ca>) -> Ca {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(Bc::Unconstrained);
        let cert = match parent {
            Some(pa) => p.clone().signed_by(&key, &pa.issuer).unwrap(),
            None => p.clone().self_signed(&key).unwrap(),
        };
        let issuer_key = KeyPair::from_pem(&key.serialize_pem()).unwrap();
        Ca {
            cert,
            key,
            issuer: rcgen::Issuer::new(p, issuer_key),
        }
    }

    fn leaf(ca: &Ca, cn: &str, key: &KeyPair, f: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        f(&mut p);
        p.signed_by(key, &ca.issuer).unwrap().der().to_vec()
    }

    struct Fixture {
        root: Ca,
        ica: Ca,
        key: KeyPair,
    }

    fn fixture() -> Fixture {
        let root = ca("Root", None);
        let ica = ca("Issuing CA", Some(&root));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        Fixture { root, ica, key }
    }

    fn want<'a>(spki: &'a [u8]) -> Expectations<'a> {
        Expectations {
            leaf_spki: spki,
            common_name: Some("gw-0001"),
            now: now(),
            max_skew_secs: 300,
            require_issuer: true,
        }
    }

    fn now() -> UnixTime {
        crate::clock::now()
    }

    fn der(c: &rcgen::Certificate) -> Vec<u8> {
        c.der().to_vec()
    }

    #[test]
    fn good_chain_in_any_order() {
        let f = fixture();
        let spki = f.key.subject_public_key_info();
        let l = leaf(&f.ica, "gw-0001", &f.key, |_| {});
        let chain = vec![l.clone(), der(&f.ica.cert), der(&f.root.cert)];
        let v = verify(&chain, &want(&spki)).unwrap();
        assert_eq!(v.certs, chain);
        assert!(v.ends_in_root);
        assert_eq!(v.presented().len(), 2);
        assert_eq!(v.thumbprint.len(), 64);
        // shuffled, with the root first
        let shuffled = vec![der(&f.root.cert), l.clone(), der(&f.ica.cert)];
        assert_eq!(verify(&shuffled, &want(&spki)).unwrap().certs, chain);
        // without the root
        let v = verify(&chain[..2], &want(&spki)).unwrap();
        assert!(!v.ends_in_root);
        assert_eq!(v.presented().len(), 2);
        // PEM round trip
        assert_eq!(certs_from_pem(&v.to_pem()).unwrap(), chain[..2].to_vec());
        let _ = &f.root.key;
    }

    #[test]
    fn only_a_self_signed_last_certificate_is_split_off_as_the_root() {
        let f = fixture();
        let l = leaf(&f.ica, "gw-0001", &f.key, |_| {});
        let full = vec![l.clone(), der(&f.ica.cert), der(&f.root.cert)];
        assert_eq!(split_root(&full), (&full[..2], Some(&full[2])));
        // Stored without its root: the issuing CA stays in what is presented.
        assert_eq!(split_root(&full[..2]), (&full[..2], None));
        // A lone certificate is presented even when self-signed; nothing at all stays nothing.
        assert_eq!(split_root(&full[2..]), (&full[2..], None));
        assert_eq!(split_root(&[]), (&[][..], None));
        // Garbage last: kept, not taken for a root.
        let junk = vec![l.clone(), vec![0x30, 0x00]];
        assert_eq!(split_root(&junk), (&junk[..], None));
    }

    #[test]
    fn anchored_to_the_expected_root_only() {
        let f = fixture();
        let spki = f.key.subject_public_key_info();
        let l = leaf(&f.ica, "gw-0001", &f.key, |_| {});
        let full = verify(
            &[l.clone(), der(&f.ica.cert), der(&f.root.cert)],
            &want(&spki),
        )
        .unwrap();
        let no_root = verify(&[l.clone(), der(&f.ica.cert)], &want(&spki)).unwrap();
        let root = [der(&f.root.cert)];
        // The root in the chain, or the top of the chain signed by it.
        assert_eq!(check_anchored(&full, &root), Ok(()));
        assert_eq!(check_anchored(&no_root, &root), Ok(()));
        // A new issuing CA under the same root is fine; no anchors, anything is.
        let ica2 = ca("Issuing CA 2", Some(&f.root));
        let l2 = leaf(&ica2, "gw-0001", &f.key, |_| {});
        let rotated = verify(&[l2, der(&ica2.cert)], &want(&spki)).unwrap();
        assert_eq!(check_anchored(&rotated, &root), Ok(()));
        assert_eq!(check_anchored(&rotated, &[]), Ok(()));
        // A foreign, internally consistent chain, even with the same names, is refused.
        let foreign_root = ca("Root", None);
        let foreign_ica = ca("Issuing CA", Some(&foreign_root));
        let fl = leaf(&foreign_ica, "gw-0001", &f.key, |_| {});
        for chain in [
            vec![fl.clone(), der(&foreign_ica.cert), der(&foreign_root.cert)],
            vec![fl, der(&foreign_ica.cert)],
        ] {
            let v = verify(&chain, &want(&spki)).unwrap();
            let err = check_anchored(&v, &root).unwrap_err();
            assert!(matches!(err, ChainError::UntrustedIssuer { .. }), "{err}");
            assert!(err.to_string().contains("a foreign CA issued it"), "{err}");
            assert!(
                err.to_string()
                    .contains("expected issuer (certificate CN=Root)"),
                "{err}"
            );
        }
        // Either of two anchors will do (a root being rotated).
        assert_eq!(
            check_anchored(&full, &[der(&foreign_root.cert), der(&f.root.cert)]),
            Ok(())
        );
    }

    #[test]
    fn wrong_key() {
        let f = fixture();
        let other = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let l = leaf(&f.ica, "gw-0001", &other, |_| {});
        let chain = vec![l, der(&f.ica.cert), der(&f.root.cert)];
        let err = verify(&chain, &want(&f.key.subject_public_key_info())).unwrap_err();
        assert!(matches!(err, ChainError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("different key"));
    }

    #[test]
    fn broken_and_truncated_chains() {
        let f = fixture();
        let spki = f.key.subject_public_key_info();
        let l = leaf(&f.ica, "gw-0001", &f.key, |_| {});
        // only the leaf
        let err = verify(std::slice::from_ref(&l), &want(&spki)).unwrap_err();
        assert!(matches!(err, ChainError::MissingIssuer { .. }), "{err}");
        // ... which is fine where no issuer is required (a bootstrap leaf alone)
        let mut w = want(&spki);
        w.require_issuer = false;
        assert!(verify(std::slice::from_ref(&l), &w).is_ok());
        // a foreign CA with the same name as the issuer: signature fails
        let foreign_root = ca("Root", None);
        let foreign_ica = ca("Issuing CA", Some(&foreign_root));
        let chain = vec![l.clone(), der(&foreign_ica.cert), der(&foreign_root.cert)];
        let err = verify(&chain, &want(&spki)).unwrap_err();
        assert!(matches!(err, ChainError::BadSignature { .. }), "{err}");
        assert!(err.to_string().contains("does not verify"));
        // a foreign CA with another name
        let other_root = ca("Other Root", None);
        let chain = vec![l.clone(), der(&other_root.cert)];
        let err = verify(&chain, &want(&spki)).unwrap_err();
        assert!(
            err.to_string().contains("issuer name does not match"),
            "{err}"
        );
        // a damaged certificate
        let mut bad = l.clone();
        bad.truncate(bad.len() / 2);
        let err = verify(&[bad, der(&f.ica.cert)], &want(&spki)).unwrap_err();
        assert!(matches!(err, ChainError::Parse { index: 0, .. }), "{err}");
        assert_eq!(verify(&[], &want(&spki)).unwrap_err(), ChainError::Empty);
    }

    #[test]
    fn wrong_common_name() {
        let f = fixture();
        let spki = f.key.subject_public_key_info();
        let l = leaf(&f.ica, "gw-9999", &f.key, |_| {});
        let err = verify(&[l, der(&f.ica.cert)], &want(&spki)).unwrap_err();
        assert_eq!(
            err,
            ChainError::WrongCommonName {
                expected: "gw-0001".into(),
                found: "gw-9999".into()
            }
        );
    }

    #[test]
    fn dates() {
        let f = fixture();
        let spki = f.key.subject_public_key_info();
        let t = |secs: i64| time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
        let n = now();
        let expired = leaf(&f.ica, "gw-0001", &f.key, |p| {
            p.not_before = t(n - 7200);
            p.not_after = t(n - 3600);
        });
        let err = verify(&[expired, der(&f.ica.cert)], &want(&spki)).unwrap_err();
        assert!(matches!(err, ChainError::Expired { .. }), "{err}");
        let future = leaf(&f.ica, "gw-0001", &f.key, |p| {
            p.not_before = t(n + 3600);
            p.not_after = t(n + 7200);
        });
        let err = verify(&[future.clone(), der(&f.ica.cert)], &want(&spki)).unwrap_err();
        assert!(matches!(err, ChainError::NotYetValid { .. }), "{err}");
        assert!(err.to_string().contains("check the clock"));
        // within the allowed skew
        let mut w = want(&spki);
        w.max_skew_secs = 4000;
        assert!(verify(&[future, der(&f.ica.cert)], &w).is_ok());
    }

    #[test]
    fn client_auth_required() {
        let f = fixture();
        let spki = f.key.subject_public_key_info();
        let l = leaf(&f.ica, "gw-0001", &f.key, |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        });
        let err = verify(&[l, der(&f.ica.cert)], &want(&spki)).unwrap_err();
        assert!(matches!(err, ChainError::NotForClientAuth { .. }), "{err}");
    }

    #[test]
    fn issuer_must_be_ca() {
        let f = fixture();
        let spki = f.key.subject_public_key_info();
        // a non-CA "issuer"
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "Not A CA");
        let cert = p.clone().self_signed(&key).unwrap();
        let fake = Ca {
            cert,
            issuer: rcgen::Issuer::new(p, KeyPair::from_pem(&key.serialize_pem()).unwrap()),
            key,
        };
        let l = leaf(&fake, "gw-0001", &f.key, |_| {});
        let err = verify(&[l, der(&fake.cert)], &want(&spki)).unwrap_err();
        assert!(matches!(err, ChainError::NotCa { .. }), "{err}");
        let _ = &fake.key;
    }
}
