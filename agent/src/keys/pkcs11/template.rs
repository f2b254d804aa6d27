//! The attribute templates for key pairs made inside a token, and the search
//! templates used to find them again. Owns the policy of a generated key: the
//! private half is a token object, private, sensitive, never extractable and
//! may only sign (no decrypt, unwrap or derive, which SoftHSM2 would otherwise
//! allow); the public half may only verify. Nothing here talks to a token.

use cryptoki::object::{Attribute, KeyType, ObjectClass};

use crate::keys::KeyAlgorithm;

/// DER of the named-curve OID (`CKA_EC_PARAMS`) of P-256: 1.2.840.10045.3.1.7.
pub const EC_PARAMS_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the named-curve OID (`CKA_EC_PARAMS`) of P-384: 1.3.132.0.34.
pub const EC_PARAMS_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// `CKA_EC_PARAMS` for an algorithm (empty for RSA, which is never generated).
pub fn ec_params(algorithm: KeyAlgorithm) -> &'static [u8] {
    match algorithm {
        KeyAlgorithm::EcdsaP256 => EC_PARAMS_P256,
        KeyAlgorithm::EcdsaP384 => EC_PARAMS_P384,
        KeyAlgorithm::Rsa { .. } => &[],
    }
}

/// The algorithm of a `CKA_EC_PARAMS` value, if it is one we use.
pub fn algorithm_of(ec_params: &[u8]) -> Option<KeyAlgorithm> {
    KeyAlgorithm::ALL
        .into_iter()
        .find(|a| self::ec_params(*a) == ec_params)
}

/// The public-key template of a new pair: a public token object that may only
/// verify.
pub fn public_key(algorithm: KeyAlgorithm, label: &str, id: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
        Attribute::EcParams(ec_params(algorithm).to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ]
}

/// The private-key template of a new pair: a private, sensitive,
/// non-extractable token object that may only sign.
pub fn private_key(label: &str, id: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ]
}

/// A search template for objects of `class` with the given label and id
/// (either may be left out).
pub fn find(class: ObjectClass, label: Option<&str>, id: Option<&[u8]>) -> Vec<Attribute> {
    let mut t = vec![Attribute::Class(class)];
    if let Some(label) = label {
        t.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = id {
        t.push(Attribute::Id(id.to_vec()));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(t: &[Attribute], want: &Attribute) -> bool {
        t.iter().any(|a| a == want)
    }

    #[test]
    fn private_key_may_only_sign_and_never_leave() {
        let t = private_key("op-1.pending", &[1, 2, 3]);
        for want in [
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Label(b"op-1.pending".to_vec()),
            Attribute::Id(vec![1, 2, 3]),
        ] {
            assert!(has(&t, &want), "missing {want:?}");
        }
        assert_eq!(t.len(), 12, "nothing else: {t:?}");
    }

    #[test]
    fn public_key_may_only_verify() {
        for alg in KeyAlgorithm::ALL {
            let t = public_key(alg, "k", &[9]);
            for want in [
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Verify(true),
                Attribute::Encrypt(false),
                Attribute::Wrap(false),
                Attribute::Derive(false),
                Attribute::EcParams(ec_params(alg).to_vec()),
                Attribute::Label(b"k".to_vec()),
                Attribute::Id(vec![9]),
            ] {
                assert!(has(&t, &want), "{alg}: missing {want:?}");
            }
            assert_eq!(t.len(), 11, "nothing else: {t:?}");
            assert!(!t.iter().any(|a| matches!(a, Attribute::Sign(_))));
        }
    }

    #[test]
    fn curve_oids() {
        // The OIDs as der encodes them.
        use der::Encode as _;
        let p256 = der::asn1::ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
        let p384 = der::asn1::ObjectIdentifier::new_unwrap("1.3.132.0.34");
        assert_eq!(p256.to_der().unwrap(), EC_PARAMS_P256);
        assert_eq!(p384.to_der().unwrap(), EC_PARAMS_P384);
        assert_eq!(algorithm_of(EC_PARAMS_P384), Some(KeyAlgorithm::EcdsaP384));
        assert_eq!(algorithm_of(EC_PARAMS_P256), Some(KeyAlgorithm::EcdsaP256));
        assert_eq!(
            algorithm_of(&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23]),
            None
        );
    }

    #[test]
    fn search_templates() {
        assert_eq!(
            find(ObjectClass::PRIVATE_KEY, Some("a"), Some(&[1])),
            vec![
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(b"a".to_vec()),
                Attribute::Id(vec![1])
            ]
        );
        assert_eq!(find(ObjectClass::PUBLIC_KEY, None, None).len(), 1);
    }
}
