//! DPS TPM attestation in the TPM (tpm-notes.md §1): the endorsement key
//! (0x81010001, TCG template L-1) and the storage root key (0x81000001, the
//! aziot RSA SRK template), each created and persisted when absent; the
//! import of the HMAC key DPS sends in its `authenticationKey` blob
//! (ActivateCredential under a PolicySecret(endorsement) session, Import
//! under the SRK, Load, persist at 0x81000100); and HMAC-SHA256 with that key
//! for SAS tokens.
//!
//! Runs on the worker thread like the rest of the backend. Every transient
//! object and session made here is flushed before the call returns, on error
//! paths too; persistent objects are only closed (ESYS memory). The handle
//! 0x81000100 is only ever replaced when it holds an HMAC key.

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, PersistentTpmHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, EncryptedSecret, IdObject, MaxBuffer, Nonce, Private, Public, PublicBuffer,
    PublicBuilder, PublicKeyRsa, PublicRsaParametersBuilder, RsaExponent, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};

use super::errors::{command_error, RcCode, TpmError};
use super::ops::{Tpm, SRK_HANDLE};
use super::TpmKeyStore;
use crate::keys::KeyError;

/// Where the endorsement key lives (TCG EK Credential Profile).
pub const EK_HANDLE: u32 = 0x8101_0001;
/// Where the HMAC key DPS sends is kept (aziot: 0x81000000 + auth_key_index 0x100).
pub const AUTH_KEY_HANDLE: u32 = 0x8100_0100;

/// The EK policy: PolicySecret(TPM_RH_ENDORSEMENT), TCG template L-1.
const EK_AUTH_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
    0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];

/// The `authenticationKey` blob DPS sends (tpm-notes.md §1.4): five TPM2B
/// structures one after the other. Anything after the fifth is ignored (the
/// Java reference appends an encrypted URI, aziot ignores it too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthKeyBlob {
    /// 1: TPM2B_ID_OBJECT contents (MakeCredential credentialBlob).
    pub credential: Vec<u8>,
    /// 2: TPM2B_ENCRYPTED_SECRET contents (the seed, encrypted to the EK).
    pub secret: Vec<u8>,
    /// 3: TPM2B_PRIVATE contents (the duplicated HMAC key).
    pub duplicate: Vec<u8>,
    /// 4: TPM2B_ENCRYPTED_SECRET contents (the import seed, encrypted to the SRK).
    pub seed: Vec<u8>,
    /// 5: TPM2B_PUBLIC contents, i.e. the TPMT_PUBLIC of the HMAC key.
    pub public: Vec<u8>,
}

impl AuthKeyBlob {
    /// Splits a decoded blob; the error says which item is broken.
    pub fn parse(blob: &[u8]) -> Result<AuthKeyBlob, String> {
        let mut rest = blob;
        let mut items = Vec::with_capacity(5);
        for (i, name) in [
            "credential blob",
            "encrypted secret",
            "duplicate",
            "import seed",
            "public area",
        ]
        .iter()
        .enumerate()
        {
            let (size, tail) = match rest {
                [a, b, tail @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), tail),
                _ => {
                    return Err(format!(
                        "it ends before item {} ({name}); {} bytes in all",
                        i + 1,
                        blob.len()
                    ))
                }
            };
            if size == 0 {
                return Err(format!("item {} ({name}) is empty", i + 1));
            }
            if tail.len() < size {
                return Err(format!(
                    "item {} ({name}) says {size} bytes but only {} follow",
                    i + 1,
                    tail.len()
                ));
            }
            items.push(tail[..size].to_vec());
            rest = &tail[size..];
        }
        let mut items = items.into_iter();
        let mut next = || items.next().unwrap_or_default();
        Ok(AuthKeyBlob {
            credential: next(),
            secret: next(),
            duplicate: next(),
            seed: next(),
            public: next(),
        })
    }
}

/// The TCG EK template L-1: RSA-2048, SHA-256, fixedTPM, fixedParent,
/// sensitiveDataOrigin, adminWithPolicy, restricted, decrypt (0x000300B2),
/// PolicySecret(endorsement) policy, AES-128-CFB, 256 zero bytes of unique.
pub fn ek_template() -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_admin_with_policy(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    rsa_storage_template(attributes, Digest::try_from(EK_AUTH_POLICY.to_vec())?)
}

/// The SRK aziot (and this agent) persists: RSA-2048, SHA-256, fixedTPM,
/// fixedParent, sensitiveDataOrigin, userWithAuth, noDA, restricted, decrypt
/// (0x00030472), no policy, AES-128-CFB, 256 zero bytes of unique.
pub fn srk_template() -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    rsa_storage_template(attributes, Digest::default())
}

fn rsa_storage_template(
    attributes: tss_esapi::attributes::ObjectAttributes,
    policy: Digest,
) -> Result<Public, tss_esapi::Error> {
    let parameters = PublicRsaParametersBuilder::new_restricted_decryption_key(
        SymmetricDefinitionObject::AES_128_CFB,
        RsaKeyBits::Rsa2048,
        RsaExponent::ZERO_EXPONENT,
    )
    .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_auth_policy(policy)
        .with_rsa_parameters(parameters)
        .with_rsa_unique_identifier(PublicKeyRsa::new_empty_with_size(RsaKeyBits::Rsa2048))
        .build()
}

/// The marshalled TPM2B_PUBLIC of a public area (what DPS wants, base64).
fn tpm2b_public(public: Public, action: &str) -> Result<Vec<u8>, TpmError> {
    PublicBuffer::try_from(public)
        .and_then(|b| b.marshall())
        .map_err(|e| command_error(action, e))
}

/// Which primary key.
#[derive(Clone, Copy)]
enum Primary {
    Endorsement,
    StorageRoot,
}

impl Primary {
    fn handle(self) -> u32 {
        match self {
            Primary::Endorsement => EK_HANDLE,
            Primary::StorageRoot => SRK_HANDLE,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Primary::Endorsement => "endorsement key",
            Primary::StorageRoot => "storage root key",
        }
    }
}

fn unexpected(action: &str) -> TpmError {
    TpmError::Command {
        action: action.to_string(),
        detail: "the TPM answered with unexpected data".into(),
        code: RcCode(0),
    }
}

impl Tpm {
    /// The public area of the EK or SRK, creating and persisting the key
    /// from its template when its handle is empty. Refuses a non-RSA key
    /// (DPS encrypts to it with RSA-OAEP).
    fn ensure_primary(&mut self, which: Primary) -> Result<Public, TpmError> {
        let handle = which.handle();
        if let Some(public) = self.read_persistent(handle)? {
            if !matches!(public, Public::Rsa { .. }) {
                return Err(TpmError::Unsuitable {
                    key: format!("0x{handle:08x}"),
                    reason: format!(
                        "the {} there is not an RSA key; DPS TPM attestation needs RSA-2048 (tpm2_readpublic -c 0x{handle:08x} shows it)",
                        which.name()
                    ),
                });
            }
            return Ok(public);
        }
        let action = format!("creating the {} at 0x{handle:08x}", which.name());
        log::info!(
            "the TPM has no {} at 0x{handle:08x}; creating it",
            which.name()
        );
        let (hierarchy, template) = match which {
            Primary::Endorsement => (Hierarchy::Endorsement, ek_template()),
            Primary::StorageRoot => (Hierarchy::Owner, srk_template()),
        };
        let template = template.map_err(|e| command_error(&action, e))?;
        let created = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(hierarchy, template, None, None, None, None)
            })
            .map_err(|e| command_error(&action, e))?;
        let key = created.key_handle;
        let persisted = persist(self, key, handle, &action);
        let flushed = self.flush(key.into(), &action);
        persisted?;
        flushed?;
        Ok(created.out_public)
    }

    /// TPM2B_PUBLIC of the EK (made if absent).
    pub(super) fn ek_public(&mut self) -> Result<Vec<u8>, TpmError> {
        let p = self.ensure_primary(Primary::Endorsement)?;
        tpm2b_public(p, "encoding the endorsement key")
    }

    /// TPM2B_PUBLIC of the SRK (made if absent).
    pub(super) fn srk_public(&mut self) -> Result<Vec<u8>, TpmError> {
        let p = self.ensure_primary(Primary::StorageRoot)?;
        tpm2b_public(p, "encoding the storage root key")
    }

    /// Imports the HMAC key of an `authenticationKey` blob and persists it at
    /// [`AUTH_KEY_HANDLE`], replacing the one there.
    pub(super) fn import_auth_key(&mut self, blob: &AuthKeyBlob) -> Result<(), TpmError> {
        let action = "importing the key DPS sent";
        let public = Public::unmarshall(&blob.public).map_err(|e| TpmError::Command {
            action: action.into(),
            detail: format!("its public area (item 5) is not a TPMT_PUBLIC: {e}"),
            code: RcCode(0),
        })?;
        if !matches!(public, Public::KeyedHash { .. }) {
            return Err(TpmError::Command {
                action: action.into(),
                detail: "the key DPS sent is not an HMAC key".into(),
                code: RcCode(0),
            });
        }
        // Refuse before changing anything if the handle holds something else.
        let replace = match self.read_persistent(AUTH_KEY_HANDLE)? {
            None => false,
            Some(Public::KeyedHash { .. }) => true,
            Some(_) => {
                return Err(TpmError::Unsuitable {
                    key: format!("0x{AUTH_KEY_HANDLE:08x}"),
                    reason: format!(
                        "dps-agent keeps the DPS HMAC key at that handle (as aziot does), but it holds another kind of key; move that key or, if it is unused, remove it with tpm2_evictcontrol -C o -c 0x{AUTH_KEY_HANDLE:08x}"
                    ),
                })
            }
        };
        for which in [Primary::Endorsement, Primary::StorageRoot] {
            if self.read_persistent(which.handle())?.is_none() {
                return Err(TpmError::Unsuitable {
                    key: format!("0x{:08x}", which.handle()),
                    reason: format!(
                        "the {} is missing (it was evicted meanwhile?)",
                        which.name()
                    ),
                });
            }
        }
        let mut ek = self.persistent_object(EK_HANDLE)?;
        let mut srk = match self.persistent_object(SRK_HANDLE) {
            Ok(o) => o,
            Err(e) => {
                let _ = self.ctx.tr_close(&mut ek);
                return Err(e);
            }
        };
        let result = self.activate_and_import(ek, srk, public, blob, replace);
        let _ = self.ctx.tr_close(&mut ek);
        let _ = self.ctx.tr_close(&mut srk);
        result
    }

    fn activate_and_import(
        &mut self,
        ek: ObjectHandle,
        srk: ObjectHandle,
        public: Public,
        blob: &AuthKeyBlob,
        replace: bool,
    ) -> Result<(), TpmError> {
        let inner = self.activate_credential(ek, srk, blob)?;
        let action = "importing the key DPS sent under the storage root key";
        let fail = |e| command_error(action, e);
        let encryption_key = Data::try_from(inner.value().to_vec()).map_err(fail)?;
        let duplicate = Private::try_from(blob.duplicate.clone()).map_err(fail)?;
        let seed = EncryptedSecret::try_from(blob.seed.clone()).map_err(fail)?;
        let import_public = public.clone();
        let private = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.import(
                    srk,
                    Some(encryption_key),
                    import_public,
                    duplicate,
                    seed,
                    SymmetricDefinitionObject::AES_128_CFB,
                )
            })
            .map_err(fail)?;
        let action = "loading the key DPS sent";
        let key = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.load(KeyHandle::from(srk), private, public)
            })
            .map_err(|e| command_error(action, e))?;
        let stored = self.replace_auth_key(key, replace);
        let flushed = self.flush(key.into(), "flushing the imported key");
        stored?;
        flushed
    }

    /// ActivateCredential(SRK, EK): the inner wrapper key of the duplicate.
    fn activate_credential(
        &mut self,
        ek: ObjectHandle,
        srk: ObjectHandle,
        blob: &AuthKeyBlob,
    ) -> Result<Digest, TpmError> {
        let action =
            "activating the credential DPS sent (TPM2_ActivateCredential with the endorsement key)";
        let fail = |e| command_error(action, e);
        let credential = IdObject::try_from(blob.credential.clone()).map_err(fail)?;
        let secret = EncryptedSecret::try_from(blob.secret.clone()).map_err(fail)?;
        let session = self
            .ctx
            .execute_without_session(|c| {
                c.start_auth_session(
                    None,
                    None,
                    None,
                    SessionType::Policy,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
            })
            .map_err(fail)?
            .ok_or_else(|| unexpected(action))?;
        let activated = (|| {
            let policy = PolicySession::try_from(session).map_err(fail)?;
            self.ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Nonce::default(),
                        Digest::default(),
                        Nonce::default(),
                        None,
                    )
                })
                .map_err(fail)?;
            self.ctx
                .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |c| {
                    c.activate_credential(
                        KeyHandle::from(srk),
                        KeyHandle::from(ek),
                        credential,
                        secret,
                    )
                })
                .map_err(fail)
        })();
        // The policy session is done either way. The TPM may already have
        // closed it (continueSession clear), which makes this flush fail
        // harmlessly.
        let handle = ObjectHandle::from(SessionHandle::from(session));
        if let Err(e) = self.ctx.flush_context(handle) {
            log::debug!("flushing the policy session: {e}");
        }
        activated
    }

    /// Persists `key` at [`AUTH_KEY_HANDLE`], evicting the previous HMAC key.
    fn replace_auth_key(&mut self, key: KeyHandle, replace: bool) -> Result<(), TpmError> {
        if replace {
            let action = format!("removing the previous DPS key at 0x{AUTH_KEY_HANDLE:08x}");
            let old = self.persistent_object(AUTH_KEY_HANDLE)?;
            let evicted = self
                .ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.evict_control(Provision::Owner, old, persistent(AUTH_KEY_HANDLE)?)
                });
            if let Err(e) = evicted {
                let mut old = old;
                let _ = self.ctx.tr_close(&mut old);
                return Err(command_error(&action, e));
            }
            // ESYS keeps its record of the evicted object (tss-esapi has
            // already forgotten it, so it cannot be closed): a later
            // TR_FromTPMPublic of this handle would fail with "name mismatch".
            // The next job gets a fresh connection instead.
            self.reconnect = true;
        }
        persist(
            self,
            key,
            AUTH_KEY_HANDLE,
            &format!("storing the DPS key at 0x{AUTH_KEY_HANDLE:08x}"),
        )
    }

    /// HMAC-SHA256 of `data` with the key at [`AUTH_KEY_HANDLE`].
    pub(super) fn auth_key_hmac(&mut self, data: Vec<u8>) -> Result<Vec<u8>, TpmError> {
        let action = format!("signing with the DPS key at 0x{AUTH_KEY_HANDLE:08x}");
        if !self.handles(AUTH_KEY_HANDLE, 1)?.contains(&AUTH_KEY_HANDLE) {
            return Err(TpmError::Unsuitable {
                key: format!("0x{AUTH_KEY_HANDLE:08x}"),
                reason: "there is no DPS key there yet (it comes with the TPM attestation)".into(),
            });
        }
        let buffer = MaxBuffer::try_from(data).map_err(|e| command_error(&action, e))?;
        let mut object = self.persistent_object(AUTH_KEY_HANDLE)?;
        let mac = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.hmac(object, buffer, HashingAlgorithm::Sha256)
            });
        let _ = self.ctx.tr_close(&mut object);
        Ok(mac.map_err(|e| command_error(&action, e))?.value().to_vec())
    }
}

fn persistent(handle: u32) -> Result<Persistent, tss_esapi::Error> {
    PersistentTpmHandle::new(handle).map(Persistent::Persistent)
}

/// EvictControl of a transient key to `handle`; closes the ESYS resource of
/// the new persistent object (the transient one stays for the caller to flush).
fn persist(tpm: &mut Tpm, key: KeyHandle, handle: u32, action: &str) -> Result<(), TpmError> {
    let stored = tpm
        .ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.evict_control(Provision::Owner, key.into(), persistent(handle)?)
        })
        .map_err(|e| command_error(action, e))?;
    let mut stored = stored;
    let _ = tpm.ctx.tr_close(&mut stored);
    Ok(())
}

/// The TPM attestation API of the backend, for the DPS client.
impl TpmKeyStore {
    /// The endorsement key's TPM2B_PUBLIC (created and persisted at
    /// 0x81010001 if absent).
    pub fn ek_public(&self) -> Result<Vec<u8>, KeyError> {
        Ok(self.worker.call(|tpm| tpm.ek_public())?)
    }

    /// The storage root key's TPM2B_PUBLIC (created and persisted at
    /// 0x81000001 if absent).
    pub fn srk_public(&self) -> Result<Vec<u8>, KeyError> {
        Ok(self.worker.call(|tpm| tpm.srk_public())?)
    }

    /// Imports the HMAC key of a DPS `authenticationKey` blob (decoded) and
    /// keeps it at 0x81000100.
    pub fn import_auth_key(&self, blob: &[u8]) -> Result<(), KeyError> {
        let parsed = AuthKeyBlob::parse(blob).map_err(|reason| TpmError::Command {
            action: "reading the authenticationKey DPS sent".into(),
            detail: reason,
            code: RcCode(0),
        })?;
        Ok(self.worker.call(move |tpm| tpm.import_auth_key(&parsed))?)
    }

    /// HMAC-SHA256 of `data` (at most 1024 bytes) with the key DPS sent.
    pub fn auth_key_hmac(&self, data: &[u8]) -> Result<Vec<u8>, KeyError> {
        let data = data.to_vec();
        Ok(self.worker.call(move |tpm| tpm.auth_key_hmac(data))?)
    }
}

/// The registration id DPS derives for a TPM (tpm-notes.md §1.2): lowercase
/// RFC 4648 base32 without padding of SHA-256 over the EK's TPM2B_PUBLIC.
pub fn registration_id_for_ek(ek_tpm2b_public: &[u8]) -> String {
    use sha2::Digest as _;
    base32_lower(&sha2::Sha256::digest(ek_tpm2b_public))
}

fn base32_lower(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in data {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

/// The EK as a PEM SubjectPublicKeyInfo (rsaEncryption), from its TPM2B_PUBLIC.
pub fn ek_public_pem(ek_tpm2b_public: &[u8]) -> Result<String, String> {
    let public = PublicBuffer::unmarshall(ek_tpm2b_public)
        .and_then(Public::try_from)
        .map_err(|e| format!("not a TPM2B_PUBLIC ({e})"))?;
    let Public::Rsa {
        parameters, unique, ..
    } = public
    else {
        return Err("not an RSA key".into());
    };
    let exponent = match parameters.exponent().value() {
        0 => 65537,
        e => e,
    };
    let der = rsa_spki_der(unique.value(), exponent);
    Ok(pem("PUBLIC KEY", &der))
}

/// DER SubjectPublicKeyInfo of an RSA key.
fn rsa_spki_der(modulus: &[u8], exponent: u32) -> Vec<u8> {
    fn len(n: usize) -> Vec<u8> {
        match n {
            0..=0x7f => vec![n as u8],
            0x80..=0xff => vec![0x81, n as u8],
            _ => vec![0x82, (n >> 8) as u8, n as u8],
        }
    }
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend(len(body.len()));
        v.extend_from_slice(body);
        v
    }
    fn uint(bytes: &[u8]) -> Vec<u8> {
        let trimmed = &bytes[bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len())..];
        let mut body = Vec::with_capacity(trimmed.len() + 1);
        if trimmed.first().is_none_or(|b| b & 0x80 != 0) {
            body.push(0);
        }
        body.extend_from_slice(trimmed);
        tlv(0x02, &body)
    }
    let rsa_key = tlv(
        0x30,
        &[uint(modulus), uint(&exponent.to_be_bytes())].concat(),
    );
    // rsaEncryption (1.2.840.113549.1.1.1), NULL parameters.
    let algorithm: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let bit_string = tlv(0x03, &[&[0u8][..], &rsa_key].concat());
    tlv(0x30, &[algorithm, &bit_string].concat())
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(bytes: &[u8]) -> Vec<u8> {
        let mut v = (bytes.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn blob_items_in_order_and_trailing_bytes_ignored() {
        let mut blob = Vec::new();
        for (i, n) in [54usize, 258, 144, 258, 48].iter().enumerate() {
            blob.extend(item(&vec![i as u8 + 1; *n]));
        }
        let exact = AuthKeyBlob::parse(&blob).unwrap();
        assert_eq!(exact.credential, vec![1; 54]);
        assert_eq!(exact.secret, vec![2; 258]);
        assert_eq!(exact.duplicate, vec![3; 144]);
        assert_eq!(exact.seed, vec![4; 258]);
        assert_eq!(exact.public, vec![5; 48]);
        // Item 6 of the Java reference (u16 + encrypted data), and a bare 00 00.
        let mut longer = blob.clone();
        longer.extend(item(b"encrypted-uri"));
        assert_eq!(AuthKeyBlob::parse(&longer).unwrap(), exact);
        let mut zero = blob.clone();
        zero.extend([0, 0]);
        assert_eq!(AuthKeyBlob::parse(&zero).unwrap(), exact);
    }

    #[test]
    fn broken_blobs_say_which_item() {
        let mut blob = item(&[1; 54]);
        blob.extend(item(&[2; 258]));
        let e = AuthKeyBlob::parse(&blob).unwrap_err();
        assert!(e.contains("before item 3 (duplicate)"), "{e}");
        let mut cut = blob.clone();
        cut.extend([0x00, 0x90, 1, 2, 3]);
        let e = AuthKeyBlob::parse(&cut).unwrap_err();
        assert!(
            e.contains("item 3 (duplicate) says 144 bytes but only 3 follow"),
            "{e}"
        );
        let e = AuthKeyBlob::parse(&[0, 0]).unwrap_err();
        assert!(e.contains("item 1 (credential blob) is empty"), "{e}");
        assert!(AuthKeyBlob::parse(&[]).is_err());
        assert!(AuthKeyBlob::parse(&[7]).is_err());
    }

    #[test]
    fn templates_are_the_documented_ones() {
        let ek = ek_template().unwrap();
        assert_eq!(u32::from(ek.object_attributes()), 0x0003_00B2);
        let srk = srk_template().unwrap();
        assert_eq!(u32::from(srk.object_attributes()), 0x0003_0472);
        // TPMT_PUBLIC: RSA, SHA-256, attributes, policy, AES-128-CFB, NULL
        // scheme, 2048 bits, exponent 0, 256 zero bytes of unique.
        let bytes = srk.marshall().unwrap();
        assert_eq!(
            &bytes[..24],
            &[
                0x00, 0x01, 0x00, 0x0B, 0x00, 0x03, 0x04, 0x72, 0x00, 0x00, 0x00, 0x06, 0x00, 0x80,
                0x00, 0x43, 0x00, 0x10, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00
            ]
        );
        assert_eq!(&bytes[24..26], &[1, 0]);
        assert!(bytes[26..].iter().all(|b| *b == 0));
        assert_eq!(bytes.len(), 26 + 256);
        let ek_bytes = ek.marshall().unwrap();
        assert_eq!(
            &ek_bytes[8..42],
            &[&[0x00, 0x20][..], &EK_AUTH_POLICY].concat()[..]
        );
        // TPM2B_PUBLIC of the EK: 2 + 314 = 316 bytes, as tpm-notes.md says.
        assert_eq!(tpm2b_public(ek, "t").unwrap().len(), 316);
        assert_eq!(tpm2b_public(srk, "t").unwrap().len(), 284);
    }

    #[test]
    fn base32_is_rfc4648_lowercase_unpadded() {
        // RFC 4648 §10 vectors, lowercased and without padding.
        for (input, want) in [
            ("", ""),
            ("f", "my"),
            ("fo", "mzxq"),
            ("foo", "mzxw6"),
            ("foob", "mzxw6yq"),
            ("fooba", "mzxw6ytb"),
            ("foobar", "mzxw6ytboi"),
        ] {
            assert_eq!(base32_lower(input.as_bytes()), want, "{input}");
        }
        // A SHA-256 is always 52 characters.
        assert_eq!(registration_id_for_ek(b"anything").len(), 52);
    }

    #[test]
    fn ek_pem_is_an_rsa_spki() {
        let mut ek = ek_template().unwrap();
        if let Public::Rsa { unique, .. } = &mut ek {
            let mut n = vec![0xC5u8; 256];
            n[255] = 0x01;
            *unique = PublicKeyRsa::try_from(n).unwrap();
        }
        let tpm2b = tpm2b_public(ek, "t").unwrap();
        let pem = ek_public_pem(&tpm2b).unwrap();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
        let der = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .unwrap();
        // SEQUENCE(290) { alg, BIT STRING(271) { SEQUENCE(266) { INTEGER(257) n, INTEGER(3) e } } }
        assert_eq!(&der[..4], &[0x30, 0x82, 0x01, 0x22]);
        assert_eq!(der.len(), 294);
        assert_eq!(&der[der.len() - 5..], &[0x02, 0x03, 0x01, 0x00, 0x01]);
    }
}
