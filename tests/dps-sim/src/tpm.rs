//! The service side of DPS TPM attestation (tpm-notes.md §1.6, verified bit-exact against
//! swtpm): from a device's EK and SRK public areas and an HMAC key K, the `authenticationKey`
//! blob — MakeCredential to the EK bound to the SRK's Name, wrapping the inner key of a
//! duplicate of K made toward the SRK. Only the TPM with that EK can activate it, and only
//! under that SRK can the duplicate be imported; the simulator keeps K to check the SAS tokens
//! the device then signs with it. Pure software (rsa, aes, cfb-mode, ring), no TPM here.

use aes::Aes128;
use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
use rand::RngCore;
use ring::{digest, hmac};
use rsa::sha2::Sha256;
use rsa::{BigUint, Oaep, RsaPublicKey};

/// TPM_ALG_* values used here.
const ALG_RSA: u16 = 0x0001;
const ALG_KEYEDHASH: u16 = 0x0008;
const ALG_SHA256: u16 = 0x000B;
const ALG_NULL: u16 = 0x0010;
const ALG_HMAC: u16 = 0x0005;
const ALG_AES: u16 = 0x0006;
const ALG_CFB: u16 = 0x0043;

/// Attributes of the imported HMAC key: sign, userWithAuth, noDA (no fixedTPM / fixedParent,
/// which Import refuses).
const IDKEY_ATTRIBUTES: u32 = 0x0004_0440;

/// The parts of an RSA storage key's public area the recipe needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaPublicArea {
    /// TPMT_PUBLIC bytes (no size prefix): hashed for the Name.
    pub tpmt: Vec<u8>,
    pub modulus: Vec<u8>,
    pub exponent: u32,
    /// keyBits of the symmetric definition (128 for AES-128-CFB).
    pub sym_bits: u16,
}

impl RsaPublicArea {
    /// Parses a marshalled TPM2B_PUBLIC of an RSA restricted decryption key (EK or SRK) with
    /// nameAlg SHA-256 and an AES-CFB symmetric definition. Trailing bytes are refused.
    pub fn parse_tpm2b(tpm2b: &[u8]) -> Result<RsaPublicArea, String> {
        let mut r = Reader(tpm2b);
        let tpmt = r.sized("the TPM2B_PUBLIC")?;
        if !r.0.is_empty() {
            return Err(format!("{} bytes follow the TPM2B_PUBLIC", r.0.len()));
        }
        let mut p = Reader(tpmt);
        if p.u16()? != ALG_RSA {
            return Err("the key is not RSA (DPS TPM attestation uses RSA-2048 EK and SRK)".into());
        }
        if p.u16()? != ALG_SHA256 {
            return Err("the key's name algorithm is not SHA-256".into());
        }
        let _attributes = p.u32()?;
        let _policy = p.sized("authPolicy")?;
        let sym = p.u16()?;
        let sym_bits = match sym {
            ALG_AES => {
                let bits = p.u16()?;
                if p.u16()? != ALG_CFB {
                    return Err("the key's symmetric mode is not CFB".into());
                }
                bits
            }
            _ => return Err("the key has no AES symmetric definition (not a storage key)".into()),
        };
        let scheme = p.u16()?;
        if scheme != ALG_NULL {
            let _details = p.u16()?;
        }
        let _key_bits = p.u16()?;
        let exponent = match p.u32()? {
            0 => 65537,
            e => e,
        };
        let modulus = p.sized("unique")?.to_vec();
        if modulus.is_empty() {
            return Err("the key has no modulus".into());
        }
        Ok(RsaPublicArea {
            tpmt: tpmt.to_vec(),
            modulus,
            exponent,
            sym_bits,
        })
    }

    /// Name = nameAlg || SHA-256(TPMT_PUBLIC).
    pub fn name(&self) -> Vec<u8> {
        name(&self.tpmt)
    }

    fn oaep(&self, label: &str, secret: &[u8]) -> Result<Vec<u8>, String> {
        let key = RsaPublicKey::new(
            BigUint::from_bytes_be(&self.modulus),
            BigUint::from(self.exponent),
        )
        .map_err(|e| format!("not a usable RSA public key: {e}"))?;
        key.encrypt(
            &mut rsa::rand_core::OsRng,
            Oaep::new_with_label::<Sha256, _>(label),
            secret,
        )
        .map_err(|e| format!("RSA-OAEP failed: {e}"))
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("the public area ends inside {what}"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2, "a field")?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4, "a field")?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn sized(&mut self, what: &str) -> Result<&'a [u8], String> {
        let n = usize::from(self.u16()?);
        self.take(n, what)
    }
}

fn name(tpmt: &[u8]) -> Vec<u8> {
    let mut n = ALG_SHA256.to_be_bytes().to_vec();
    n.extend_from_slice(digest::digest(&digest::SHA256, tpmt).as_ref());
    n
}

/// `2B(x)`: big-endian u16 length, then x.
fn tpm2b(x: &[u8]) -> Vec<u8> {
    let len = u16::try_from(x.len()).unwrap_or(u16::MAX);
    let mut v = len.to_be_bytes().to_vec();
    v.extend_from_slice(&x[..usize::from(len)]);
    v
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    ctx.sign().as_ref().to_vec()
}

/// KDFa with SHA-256 (SP 800-108 counter mode, TPM 2.0 Part 1 §11.4.10.2).
pub fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let bytes = (bits as usize).div_ceil(8);
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        out.extend(hmac_sha256(
            key,
            &[
                &counter.to_be_bytes(),
                label.as_bytes(),
                &[0],
                context_u,
                context_v,
                &bits.to_be_bytes(),
            ],
        ));
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// AES-128 in full-block CFB mode with a zero IV (TPM_ALG_CFB), in place.
fn aes_cfb_encrypt(key: &[u8], data: &mut [u8]) -> Result<(), String> {
    let enc = cfb_mode::Encryptor::<Aes128>::new_from_slices(key, &[0u8; 16])
        .map_err(|_| format!("AES-128 needs a 16-byte key, not {}", key.len()))?;
    enc.encrypt(data);
    Ok(())
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

/// The TPMT_PUBLIC of the HMAC key DPS hands out: KEYEDHASH, SHA-256, sign | userWithAuth |
/// noDA, empty policy, HMAC-SHA256 scheme, `unique` = SHA-256(seedValue || K).
fn idkey_public(seed_value: &[u8], key: &[u8]) -> Vec<u8> {
    let mut unique_input = seed_value.to_vec();
    unique_input.extend_from_slice(key);
    let unique = digest::digest(&digest::SHA256, &unique_input);
    let mut p = Vec::with_capacity(48);
    p.extend(ALG_KEYEDHASH.to_be_bytes());
    p.extend(ALG_SHA256.to_be_bytes());
    p.extend(IDKEY_ATTRIBUTES.to_be_bytes());
    p.extend(tpm2b(&[]));
    p.extend(ALG_HMAC.to_be_bytes());
    p.extend(ALG_SHA256.to_be_bytes());
    p.extend(tpm2b(unique.as_ref()));
    p
}

/// Builds the `authenticationKey` blob (before base64) that gives the HMAC key `k` to the TPM
/// with endorsement key `ek` and storage root key `srk`: items 1–5 of tpm-notes.md §1.4.
pub fn activation_blob(
    ek: &RsaPublicArea,
    srk: &RsaPublicArea,
    k: &[u8],
) -> Result<Vec<u8>, String> {
    if ek.sym_bits != 128 || srk.sym_bits != 128 {
        return Err("only AES-128 storage keys are supported".into());
    }
    // A. The identity key's public area, and its Name.
    let seed_value: [u8; 32] = random();
    let public = idkey_public(&seed_value, k);
    let id_name = name(&public);

    // B. TPMT_SENSITIVE: type, authValue (empty), seedValue, the key.
    let mut sensitive = ALG_KEYEDHASH.to_be_bytes().to_vec();
    sensitive.extend(tpm2b(&[]));
    sensitive.extend(tpm2b(&seed_value));
    sensitive.extend(tpm2b(k));
    let s2b = tpm2b(&sensitive);

    // C. Inner wrapper, with a fresh 16-byte key.
    let inner_key: [u8; 16] = random();
    let inner_integrity = digest::digest(&digest::SHA256, &[&s2b[..], &id_name].concat());
    let mut enc_sens = tpm2b(inner_integrity.as_ref());
    enc_sens.extend_from_slice(&s2b);
    aes_cfb_encrypt(&inner_key, &mut enc_sens)?;

    // D. Outer wrapper toward the SRK.
    let seed: [u8; 32] = random();
    let item4 = srk.oaep("DUPLICATE\0", &seed)?;
    let sym_key = kdfa(&seed, "STORAGE", &id_name, &[], 128);
    let mut dup_sensitive = enc_sens;
    aes_cfb_encrypt(&sym_key, &mut dup_sensitive)?;
    let hmac_key = kdfa(&seed, "INTEGRITY", &[], &[], 256);
    let outer_hmac = hmac_sha256(&hmac_key, &[&dup_sensitive, &id_name]);
    let mut duplicate = tpm2b(&outer_hmac);
    duplicate.extend_from_slice(&dup_sensitive);

    // E. MakeCredential to the EK, bound to the SRK's Name, carrying the inner key.
    let seed2: [u8; 32] = random();
    let item2 = ek.oaep("IDENTITY\0", &seed2)?;
    let srk_name = srk.name();
    let sym_key2 = kdfa(&seed2, "STORAGE", &srk_name, &[], 128);
    let mut enc_identity = tpm2b(&inner_key);
    aes_cfb_encrypt(&sym_key2, &mut enc_identity)?;
    let hmac_key2 = kdfa(&seed2, "INTEGRITY", &[], &[], 256);
    let integrity = hmac_sha256(&hmac_key2, &[&enc_identity, &srk_name]);
    let mut credential = tpm2b(&integrity);
    credential.extend_from_slice(&enc_identity);

    // F. Items 1-5, each a TPM2B.
    let mut blob = Vec::with_capacity(800);
    blob.extend(tpm2b(&credential));
    blob.extend(tpm2b(&item2));
    blob.extend(tpm2b(&duplicate));
    blob.extend(tpm2b(&item4));
    blob.extend(tpm2b(&public));
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::traits::PublicKeyParts;
    use rsa::RsaPrivateKey;

    /// A TPM2B_PUBLIC for an RSA-2048 storage key (the SRK template) with this modulus.
    fn storage_public(key: &RsaPrivateKey, attributes: u32) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend(ALG_RSA.to_be_bytes());
        t.extend(ALG_SHA256.to_be_bytes());
        t.extend(attributes.to_be_bytes());
        t.extend(tpm2b(&[]));
        t.extend(ALG_AES.to_be_bytes());
        t.extend(128u16.to_be_bytes());
        t.extend(ALG_CFB.to_be_bytes());
        t.extend(ALG_NULL.to_be_bytes());
        t.extend(2048u16.to_be_bytes());
        t.extend(0u32.to_be_bytes());
        t.extend(tpm2b(&key.n().to_bytes_be()));
        tpm2b(&t)
    }

    fn cfb_decrypt(key: &[u8], data: &mut [u8]) {
        cfb_mode::Decryptor::<Aes128>::new_from_slices(key, &[0u8; 16])
            .unwrap()
            .decrypt(data);
    }

    fn split(mut b: &[u8]) -> (Vec<u8>, &[u8]) {
        let n = usize::from(u16::from_be_bytes([b[0], b[1]]));
        b = &b[2..];
        (b[..n].to_vec(), &b[n..])
    }

    /// Plays the TPM in software (ActivateCredential, then Import) and checks that it recovers
    /// K exactly, with every integrity value right.
    #[test]
    fn a_software_tpm_recovers_the_key() {
        let mut rng = rsa::rand_core::OsRng;
        let ek_key = RsaPrivateKey::new(&mut rng, 2048).unwrap();
        let srk_key = RsaPrivateKey::new(&mut rng, 2048).unwrap();
        let ek = RsaPublicArea::parse_tpm2b(&storage_public(&ek_key, 0x0003_00B2)).unwrap();
        let srk = RsaPublicArea::parse_tpm2b(&storage_public(&srk_key, 0x0003_0472)).unwrap();
        assert_eq!(ek.exponent, 65537);
        let k: [u8; 32] = random();
        let mut blob = activation_blob(&ek, &srk, &k).unwrap();
        assert_eq!(blob.len(), 764);
        blob.extend([0, 0]);

        let (credential, rest) = split(&blob);
        let (secret, rest) = split(rest);
        let (duplicate, rest) = split(rest);
        let (seed_enc, rest) = split(rest);
        let (public, rest) = split(rest);
        assert_eq!(rest, &[0, 0]);
        assert_eq!(
            (
                credential.len(),
                secret.len(),
                duplicate.len(),
                seed_enc.len(),
                public.len()
            ),
            (52, 256, 142, 256, 48)
        );

        // ActivateCredential with the EK, bound to the SRK's Name.
        let seed2 = ek_key
            .decrypt(Oaep::new_with_label::<Sha256, _>("IDENTITY\0"), &secret)
            .unwrap();
        let (integrity, enc_identity) = split(&credential);
        let srk_name = srk.name();
        let hmac_key2 = kdfa(&seed2, "INTEGRITY", &[], &[], 256);
        assert_eq!(
            integrity,
            hmac_sha256(&hmac_key2, &[enc_identity, &srk_name])
        );
        let mut identity = enc_identity.to_vec();
        cfb_decrypt(&kdfa(&seed2, "STORAGE", &srk_name, &[], 128), &mut identity);
        let (inner_key, _) = split(&identity);
        assert_eq!(inner_key.len(), 16);

        // Import under the SRK.
        let id_name = name(&public);
        let seed = srk_key
            .decrypt(Oaep::new_with_label::<Sha256, _>("DUPLICATE\0"), &seed_enc)
            .unwrap();
        let (outer_hmac, dup_sensitive) = split(&duplicate);
        let hmac_key = kdfa(&seed, "INTEGRITY", &[], &[], 256);
        assert_eq!(
            outer_hmac,
            hmac_sha256(&hmac_key, &[dup_sensitive, &id_name])
        );
        let mut enc_sens = dup_sensitive.to_vec();
        cfb_decrypt(&kdfa(&seed, "STORAGE", &id_name, &[], 128), &mut enc_sens);
        cfb_decrypt(&inner_key, &mut enc_sens);
        let (inner_integrity, s2b) = split(&enc_sens);
        assert_eq!(
            inner_integrity,
            digest::digest(&digest::SHA256, &[s2b, &id_name].concat()).as_ref()
        );
        let (sensitive, _) = split(s2b);
        assert_eq!(&sensitive[..2], &ALG_KEYEDHASH.to_be_bytes());
        let (auth, rest) = split(&sensitive[2..]);
        let (seed_value, rest) = split(rest);
        let (key, rest) = split(rest);
        assert!(auth.is_empty() && rest.is_empty());
        assert_eq!(key, k);
        // Load's binding check: unique = SHA-256(seedValue || K).
        assert_eq!(&public[..8], &[0, 8, 0, 0x0B, 0, 4, 4, 0x40]);
        assert_eq!(
            &public[16..],
            digest::digest(&digest::SHA256, &[&seed_value[..], &k].concat()).as_ref()
        );
    }

    #[test]
    fn kdfa_counts_and_truncates() {
        let a = kdfa(b"key", "STORAGE", b"u", b"", 128);
        let b = kdfa(b"key", "STORAGE", b"u", b"", 256);
        assert_eq!(a.len(), 16);
        assert_eq!(b.len(), 32);
        // 128 and 256 bits differ in the encoded length, not only in the cut.
        assert_ne!(a[..], b[..16]);
        assert_eq!(
            kdfa(b"key", "INTEGRITY", b"", b"", 512)[..32],
            hmac_sha256(
                b"key",
                &[
                    &1u32.to_be_bytes(),
                    b"INTEGRITY",
                    &[0],
                    &512u32.to_be_bytes()
                ]
            )[..]
        );
    }

    #[test]
    fn public_areas_that_are_not_rsa_storage_keys_are_refused() {
        assert!(RsaPublicArea::parse_tpm2b(&[0, 2, 0, 0x23])
            .unwrap_err()
            .contains("not RSA"));
        assert!(RsaPublicArea::parse_tpm2b(&[0, 9, 0, 1]).is_err());
        assert!(RsaPublicArea::parse_tpm2b(&[]).is_err());
    }
}
