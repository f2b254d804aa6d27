//! TPM object templates and public-area checks: the storage primary template
//! tpm2-openssl re-creates for `TPM_RH_OWNER` parents, the template of the
//! signing keys dps-agent makes, and turning a key's TPMT_PUBLIC into what the
//! rest of the agent needs (algorithm, SubjectPublicKeyInfo, signing hash).
//! Pure data: no TPM commands here.

use p256::pkcs8::EncodePublicKey;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::{
    EccPoint, EccScheme, HashScheme, Public, PublicBuilder, PublicEccParametersBuilder,
    SymmetricDefinitionObject,
};

use crate::keys::{HashAlg, KeyAlgorithm};

/// The standard storage primary (TCG "ECC NIST P-256" SRK template, as
/// tpm2-openssl and tpm2-tss-engine build it for parent `TPM_RH_OWNER`):
/// nameAlg SHA-256; fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth,
/// noDA, restricted, decrypt (0x00030472); empty policy; AES-128-CFB; scheme and
/// KDF NULL; NIST P-256; empty unique. It is derived from the owner seed, so the
/// same key comes back every time it is created (until the TPM is cleared).
pub fn storage_primary() -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    let parameters = PublicEccParametersBuilder::new_restricted_decryption_key(
        SymmetricDefinitionObject::AES_128_CFB,
        EccCurve::NistP256,
    )
    .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(parameters)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// A signing key made by dps-agent: ECDSA on the algorithm's curve with its
/// hash fixed in the key (P-256/SHA-256, P-384/SHA-384); fixedTPM, fixedParent,
/// sensitiveDataOrigin, userWithAuth, noDA, sign (0x00040472); empty auth and
/// policy. noDA because an empty password has nothing to guess, and a lockout
/// caused by some other program must not take the device's identity offline.
pub fn signing_key(algorithm: KeyAlgorithm) -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_sign_encrypt(true)
        .build()?;
    let (curve, hash) = match algorithm {
        KeyAlgorithm::EcdsaP256 => (EccCurve::NistP256, HashingAlgorithm::Sha256),
        KeyAlgorithm::EcdsaP384 => (EccCurve::NistP384, HashingAlgorithm::Sha384),
        KeyAlgorithm::Rsa { .. } => {
            return Err(tss_esapi::Error::WrapperError(
                tss_esapi::WrapperErrorKind::UnsupportedParam,
            ))
        }
    };
    let parameters = PublicEccParametersBuilder::new_unrestricted_signing_key(
        EccScheme::EcDsa(HashScheme::new(hash)),
        curve,
    )
    .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(parameters)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// The TPM curve of an algorithm (none for RSA).
pub fn curve_of(algorithm: KeyAlgorithm) -> Option<EccCurve> {
    match algorithm {
        KeyAlgorithm::EcdsaP256 => Some(EccCurve::NistP256),
        KeyAlgorithm::EcdsaP384 => Some(EccCurve::NistP384),
        KeyAlgorithm::Rsa { .. } => None,
    }
}

/// What the agent knows about a usable TPM signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub algorithm: KeyAlgorithm,
    /// DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// The hash fixed in the key's scheme; `None` for a NULL scheme (any hash).
    pub scheme_hash: Option<HashAlg>,
}

/// Checks that a public area is an unrestricted ECDSA signing key on P-256 or
/// P-384 usable with an empty password, and describes it. The error says what
/// is wrong with it.
pub fn key_info(public: &Public) -> Result<KeyInfo, String> {
    let Public::Ecc {
        object_attributes,
        parameters,
        unique,
        ..
    } = public
    else {
        return Err(
            "it is not an elliptic-curve key (only ECDSA P-256 and P-384 are supported)".into(),
        );
    };
    if !object_attributes.sign_encrypt() {
        return Err("it is not a signing key (the sign attribute is clear)".into());
    }
    if object_attributes.restricted() {
        return Err(
            "it is a restricted key (an attestation key); it cannot sign CSRs or TLS handshakes"
                .into(),
        );
    }
    if !object_attributes.user_with_auth() {
        return Err("it can only be used with a policy session (userWithAuth is clear), which dps-agent does not support".into());
    }
    let (algorithm, field) = match parameters.ecc_curve() {
        EccCurve::NistP256 => (KeyAlgorithm::EcdsaP256, 32),
        EccCurve::NistP384 => (KeyAlgorithm::EcdsaP384, 48),
        other => {
            return Err(format!(
                "its curve {other:?} is not supported (use NIST P-256 or P-384)"
            ))
        }
    };
    let scheme_hash = match parameters.ecc_scheme() {
        EccScheme::Null => None,
        EccScheme::EcDsa(h) => Some(hash_alg(h.hashing_algorithm()).ok_or_else(|| {
            format!(
                "its ECDSA scheme uses {:?}, which is not supported",
                h.hashing_algorithm()
            )
        })?),
        other => {
            return Err(format!(
                "its signing scheme {:?} is not ECDSA",
                other.algorithm()
            ))
        }
    };
    let mut sec1 = Vec::with_capacity(1 + 2 * field);
    sec1.push(0x04);
    sec1.extend_from_slice(&left_pad(unique.x().value(), field)?);
    sec1.extend_from_slice(&left_pad(unique.y().value(), field)?);
    let spki = match algorithm {
        KeyAlgorithm::EcdsaP256 => p256::PublicKey::from_sec1_bytes(&sec1)
            .map_err(|_| "its public point is not on P-256".to_string())?
            .to_public_key_der(),
        KeyAlgorithm::EcdsaP384 => p384::PublicKey::from_sec1_bytes(&sec1)
            .map_err(|_| "its public point is not on P-384".to_string())?
            .to_public_key_der(),
        KeyAlgorithm::Rsa { .. } => return Err("it is not an elliptic-curve key".into()),
    }
    .map_err(|e| format!("cannot encode its public key: {e}"))?
    .as_bytes()
    .to_vec();
    Ok(KeyInfo {
        algorithm,
        spki,
        scheme_hash,
    })
}

/// The agent's hash for a TPM hashing algorithm.
pub fn hash_alg(h: HashingAlgorithm) -> Option<HashAlg> {
    match h {
        HashingAlgorithm::Sha256 => Some(HashAlg::Sha256),
        HashingAlgorithm::Sha384 => Some(HashAlg::Sha384),
        HashingAlgorithm::Sha512 => Some(HashAlg::Sha512),
        _ => None,
    }
}

/// The TPM hashing algorithm for the agent's hash.
pub fn tpm_hash(h: HashAlg) -> HashingAlgorithm {
    match h {
        HashAlg::Sha256 => HashingAlgorithm::Sha256,
        HashAlg::Sha384 => HashingAlgorithm::Sha384,
        HashAlg::Sha512 => HashingAlgorithm::Sha512,
    }
}

/// Left-pads a big-endian integer to `len` bytes (TPMs may drop leading zeros).
pub fn left_pad(v: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let v = &v[v.iter().position(|b| *b != 0).unwrap_or(v.len())..];
    if v.len() > len {
        return Err(format!("a {}-byte value does not fit {len} bytes", v.len()));
    }
    let mut out = vec![0u8; len - v.len()];
    out.extend_from_slice(v);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tss_esapi::traits::Marshall;

    #[test]
    fn primary_template_is_the_tcg_ecc_srk() {
        let p = storage_primary().unwrap();
        assert_eq!(u32::from(p.object_attributes()), 0x0003_0472);
        // TPMT_PUBLIC: type ECC, nameAlg SHA-256, attrs, empty policy,
        // AES-128-CFB, scheme NULL, P-256, KDF NULL, unique x and y empty.
        let expected: &[u8] = &[
            0x00, 0x23, 0x00, 0x0B, 0x00, 0x03, 0x04, 0x72, 0x00, 0x00, 0x00, 0x06, 0x00, 0x80,
            0x00, 0x43, 0x00, 0x10, 0x00, 0x03, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(p.marshall().unwrap(), expected);
    }

    #[test]
    fn signing_key_templates() {
        let p = signing_key(KeyAlgorithm::EcdsaP384).unwrap();
        assert_eq!(u32::from(p.object_attributes()), 0x0004_0472);
        let bytes = p.marshall().unwrap();
        // ... symmetric NULL, scheme ECDSA/SHA-384, curve P-384, KDF NULL.
        assert_eq!(
            &bytes[10..],
            &[0x00, 0x10, 0x00, 0x18, 0x00, 0x0C, 0x00, 0x04, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00]
        );
        let p = signing_key(KeyAlgorithm::EcdsaP256).unwrap();
        let bytes = p.marshall().unwrap();
        assert_eq!(
            &bytes[12..20],
            &[0x00, 0x18, 0x00, 0x0B, 0x00, 0x03, 0x00, 0x10]
        );
    }

    #[test]
    fn templates_without_a_point_are_refused_as_keys() {
        // The template has an empty unique: not a usable public key.
        let err = key_info(&signing_key(KeyAlgorithm::EcdsaP256).unwrap()).unwrap_err();
        assert!(err.contains("not on P-256"), "{err}");
        let err = key_info(&storage_primary().unwrap()).unwrap_err();
        assert!(err.contains("not a signing key"), "{err}");
    }

    #[test]
    fn padding() {
        assert_eq!(left_pad(&[1, 2], 4).unwrap(), vec![0, 0, 1, 2]);
        assert_eq!(left_pad(&[0, 0, 0, 0, 7], 4).unwrap(), vec![0, 0, 0, 7]);
        assert!(left_pad(&[1, 2, 3], 2).is_err());
    }
}
