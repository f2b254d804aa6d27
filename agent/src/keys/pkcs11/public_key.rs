//! Turns a token's public-key attributes (`CKA_EC_PARAMS`, `CKA_EC_POINT`) into
//! a SubjectPublicKeyInfo. Owns the quirk that `CKA_EC_POINT` is a DER OCTET
//! STRING around the SEC1 point (PKCS#11 §2.3.3; SoftHSM2 does this), while some
//! tokens return the bare point. The point is checked to lie on the curve.

use p256::pkcs8::EncodePublicKey as _;

use super::template::algorithm_of;
use crate::keys::KeyAlgorithm;

/// Length of an uncompressed SEC1 point on the curve (0: RSA has none).
fn point_len(algorithm: KeyAlgorithm) -> usize {
    match algorithm {
        KeyAlgorithm::EcdsaP256 => 65,
        KeyAlgorithm::EcdsaP384 => 97,
        KeyAlgorithm::Rsa { .. } => 0,
    }
}

/// The SEC1 point inside a `CKA_EC_POINT` value: unwraps the DER OCTET STRING,
/// or takes a bare uncompressed point as is.
pub fn unwrap_ec_point(algorithm: KeyAlgorithm, value: &[u8]) -> Result<Vec<u8>, String> {
    let n = point_len(algorithm);
    if value.len() == n && value.first() == Some(&0x04) {
        return Ok(value.to_vec());
    }
    use der::Decode as _;
    let octets = der::asn1::OctetString::from_der(value).map_err(|e| {
        format!(
            "CKA_EC_POINT is neither a DER OCTET STRING nor a {n}-byte point ({} bytes: {e})",
            value.len()
        )
    })?;
    Ok(octets.as_bytes().to_vec())
}

/// The algorithm and SubjectPublicKeyInfo DER of an EC public key object.
pub fn spki_from_attributes(
    ec_params: &[u8],
    ec_point: &[u8],
) -> Result<(KeyAlgorithm, Vec<u8>), String> {
    let algorithm = algorithm_of(ec_params).ok_or_else(|| {
        "the key is on a curve dps-agent does not use (CKA_EC_PARAMS is not P-256 or P-384)"
            .to_string()
    })?;
    let point = unwrap_ec_point(algorithm, ec_point)?;
    let bad = |e: String| format!("CKA_EC_POINT is not a point on {algorithm}: {e}");
    let doc = match algorithm {
        KeyAlgorithm::EcdsaP256 => p256::PublicKey::from_sec1_bytes(&point)
            .map_err(|e| bad(e.to_string()))?
            .to_public_key_der(),
        KeyAlgorithm::EcdsaP384 => p384::PublicKey::from_sec1_bytes(&point)
            .map_err(|e| bad(e.to_string()))?
            .to_public_key_der(),
        KeyAlgorithm::Rsa { .. } => return Err("an RSA key has no CKA_EC_POINT".into()),
    }
    .map_err(|e| format!("cannot encode the public key: {e}"))?;
    Ok((algorithm, doc.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::pkcs11::template::{EC_PARAMS_P256, EC_PARAMS_P384};
    use p384::elliptic_curve::sec1::ToSec1Point as _;
    use p384::elliptic_curve::Generate as _;

    #[test]
    fn wrapped_and_bare_points_give_the_same_spki() {
        let secret = p384::SecretKey::try_generate().unwrap();
        let bare = secret.public_key().to_sec1_point(false).as_bytes().to_vec();
        assert_eq!(bare.len(), 97);
        let mut wrapped = vec![0x04, 0x61];
        wrapped.extend_from_slice(&bare);
        let want = secret.public_key().to_public_key_der().unwrap();

        for value in [&wrapped, &bare] {
            let (alg, spki) = spki_from_attributes(EC_PARAMS_P384, value).unwrap();
            assert_eq!(alg, KeyAlgorithm::EcdsaP384);
            assert_eq!(spki, want.as_bytes());
        }
    }

    #[test]
    fn refuses_wrong_curve_and_garbage() {
        let secret = p256::SecretKey::try_generate().unwrap();
        let bare = secret.public_key().to_sec1_point(false).as_bytes().to_vec();
        let (alg, _) = spki_from_attributes(EC_PARAMS_P256, &bare).unwrap();
        assert_eq!(alg, KeyAlgorithm::EcdsaP256);
        // A P-256 point is not a P-384 point.
        let e = spki_from_attributes(EC_PARAMS_P384, &bare).unwrap_err();
        assert!(e.contains("CKA_EC_POINT"), "{e}");
        let e = spki_from_attributes(&[0x06, 0x03, 0x2b, 0x65, 0x70], &bare).unwrap_err();
        assert!(e.contains("not P-256 or P-384"), "{e}");
        let e = spki_from_attributes(EC_PARAMS_P256, &[0x04, 0x03, 1, 2, 3]).unwrap_err();
        assert!(e.contains("not a point"), "{e}");
    }
}
