//! TPM command sequences on one `tss_esapi::Context`: connect, ask for the ECC
//! curves, find or re-create the storage parent, make keys, load and sign, list
//! handles. Runs only on the worker thread (the Context is `!Send`).
//!
//! Rules kept here: a session only for commands that need authorization (the
//! password session; never for `tr_from_tpm_public`/`read_public`, which crash
//! libtss2-esys 3.2 under a password session); every transient object made is
//! flushed before the function returns, on success and on error; no saved
//! contexts: the primary is re-created from its template whenever it is needed.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::{CapabilityType, EccCurveIdentifier};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    CapabilityData, Digest, HashScheme, HashcheckTicket, Private, Public, PublicBuffer, Signature,
    SignatureScheme,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, TctiNameConf};

use super::errors::{command_error, is_foreign_blob, raw_rc, tcti_init_error, RcCode, TpmError};
use super::keyfile::{TpmKeyFile, PARENT_OWNER};
use super::templates;
use crate::keys::{HashAlg, KeyAlgorithm};

/// The persistent storage root key, when the platform provisioned one.
pub const SRK_HANDLE: u32 = 0x8100_0001;
const PERSISTENT_FIRST: u32 = 0x8100_0000;
const TRANSIENT_FIRST: u32 = 0x8000_0000;

/// A key the worker can sign with.
#[derive(Debug, Clone)]
pub enum KeyRef {
    /// A wrapped blob from a key file (the path is for messages).
    Blob { file: TpmKeyFile, path: PathBuf },
    /// A persistent key made elsewhere.
    Persistent(u32),
}

/// The parent of a key while it is being made or loaded.
enum Parent {
    /// The owner primary, created for this operation; flushed afterwards.
    Created(KeyHandle),
    /// A persistent key (its ESYS resource is closed afterwards).
    Persistent(ObjectHandle),
}

/// An open connection to the TPM.
pub struct Tpm {
    pub(super) ctx: Context,
    curves: Option<Vec<EccCurveIdentifier>>,
    /// Set by a job that left ESYS with stale resource records (a persistent
    /// object evicted and replaced at the same handle): the worker then opens
    /// a fresh connection for the next job.
    pub(super) reconnect: bool,
}

impl Tpm {
    /// Opens the TCTI named in `[tpm] tcti`. Without a resource manager it
    /// then flushes what a killed client left loaded ([`Tpm::flush_leftovers`]);
    /// otherwise it sends no TPM command.
    pub fn connect(tcti: &str) -> Result<Tpm, TpmError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|_| TpmError::BadTcti {
            tcti: tcti.to_string(),
        })?;
        match Context::new(conf) {
            Ok(ctx) => {
                let mut tpm = Tpm {
                    ctx,
                    curves: None,
                    reconnect: false,
                };
                if !has_resource_manager(tcti) {
                    match tpm.flush_leftovers() {
                        Ok(0) => {}
                        Ok(n) => log::warn!(
                            "flushed {n} transient object(s) left loaded in the TPM ({tcti} has no resource manager; a process was stopped in the middle of a TPM command)"
                        ),
                        Err(e) => log::warn!("could not flush objects left loaded in the TPM: {e}"),
                    }
                }
                Ok(tpm)
            }
            Err(e) => {
                let device = device_path(tcti);
                let check = device.as_ref().map(|p| {
                    let r = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(p)
                        .map(drop);
                    (p.as_path(), r)
                });
                Err(tcti_init_error(tcti, &e, check))
            }
        }
    }

    /// The ECC curves the TPM implements (TPM2_GetCapability, asked once).
    pub fn ecc_curves(&mut self) -> Result<Vec<EccCurveIdentifier>, TpmError> {
        if let Some(c) = &self.curves {
            return Ok(c.clone());
        }
        let action = "asking the TPM which ECC curves it has";
        let curves = match self
            .ctx
            .execute_without_session(|c| c.get_capability(CapabilityType::EccCurves, 0, 64))
        {
            Ok((CapabilityData::EccCurves(list), _)) => list.into_inner(),
            Ok(_) => return Err(unexpected(action)),
            // A curve id tss-esapi does not know: ask for ours one at a time.
            Err(tss_esapi::Error::WrapperError(_)) => {
                let mut found = Vec::new();
                for curve in [EccCurveIdentifier::NistP256, EccCurveIdentifier::NistP384] {
                    let first = u32::from(curve_id(curve));
                    match self.ctx.execute_without_session(|c| {
                        c.get_capability(CapabilityType::EccCurves, first, 1)
                    }) {
                        Ok((CapabilityData::EccCurves(list), _)) => {
                            if list.into_inner().first() == Some(&curve) {
                                found.push(curve)
                            }
                        }
                        Ok(_) | Err(tss_esapi::Error::WrapperError(_)) => {}
                        Err(e) => return Err(command_error(action, e)),
                    }
                }
                found
            }
            Err(e) => return Err(command_error(action, e)),
        };
        self.curves = Some(curves.clone());
        Ok(curves)
    }

    /// Makes a signing key under the storage parent; returns its key file.
    pub fn generate(&mut self, algorithm: KeyAlgorithm) -> Result<TpmKeyFile, TpmError> {
        check_curve(algorithm, &self.ecc_curves()?)?;
        let action = format!("making an {algorithm} key");
        let template = templates::signing_key(algorithm).map_err(|e| command_error(&action, e))?;
        let (parent, parent_value) = self.storage_parent()?;
        let parent_key = parent.key();
        let created = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create(parent_key, template, None, None, None, None)
            });
        let released = self.release(parent);
        let created = created.map_err(|e| command_error(&action, e))?;
        released?;
        let public = created
            .out_public
            .marshall()
            .map_err(|e| command_error(&action, e))?;
        TpmKeyFile::new(parent_value, &public, created.out_private.value()).map_err(|e| {
            TpmError::Command {
                action,
                detail: e.to_string(),
                code: RcCode(0),
            }
        })
    }

    /// Loads a key file's blob and flushes it again: proves that this TPM can
    /// still use it.
    pub fn check_loads(&mut self, file: &TpmKeyFile, path: &Path) -> Result<(), TpmError> {
        let key = self.load(file, path)?;
        self.flush(key.into(), "checking the key")
    }

    /// Signs `digest` with ECDSA and `hash`; returns (r, s) as the TPM gave them.
    pub fn sign(
        &mut self,
        key: &KeyRef,
        hash: HashAlg,
        digest: Vec<u8>,
        action: &str,
    ) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
        let digest = Digest::try_from(digest).map_err(|e| command_error(action, e))?;
        let scheme = SignatureScheme::EcDsa {
            hash_scheme: HashScheme::new(templates::tpm_hash(hash)),
        };
        let validation = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .map_err(|e| command_error(action, e))?;
        let signature = match key {
            KeyRef::Blob { file, path } => {
                let handle = self.load(file, path)?;
                let signed = self
                    .ctx
                    .execute_with_session(Some(AuthSession::Password), |c| {
                        c.sign(handle, digest, scheme, validation)
                    });
                let flushed = self.flush(handle.into(), action);
                if signed.is_ok() {
                    flushed?;
                }
                signed
            }
            KeyRef::Persistent(h) => {
                let mut object = self.persistent_object(*h)?;
                let signed = self
                    .ctx
                    .execute_with_session(Some(AuthSession::Password), |c| {
                        c.sign(object.into(), digest, scheme, validation)
                    });
                let _ = self.ctx.tr_close(&mut object);
                signed
            }
        }
        .map_err(|e| command_error(action, e))?;
        match signature {
            Signature::EcDsa(s) => Ok((
                s.signature_r().value().to_vec(),
                s.signature_s().value().to_vec(),
            )),
            other => Err(TpmError::Command {
                action: action.to_string(),
                detail: format!("the TPM returned a {:?} signature", other.algorithm()),
                code: RcCode(0),
            }),
        }
    }

    /// The public area of a persistent key (made elsewhere).
    pub fn read_persistent(&mut self, handle: u32) -> Result<Option<Public>, TpmError> {
        if !self.handles(handle, 1)?.contains(&handle) {
            return Ok(None);
        }
        let mut object = self.persistent_object(handle)?;
        let public = self
            .ctx
            .execute_without_session(|c| c.read_public(object.into()));
        let _ = self.ctx.tr_close(&mut object);
        public
            .map(|(p, _, _)| Some(p))
            .map_err(|e| command_error(&format!("reading key 0x{handle:08x}"), e))
    }

    /// Handles present in the TPM from `first` on (same handle type), up to `max`.
    pub fn handles(&mut self, first: u32, max: u32) -> Result<Vec<u32>, TpmError> {
        match self
            .ctx
            .execute_without_session(|c| c.get_capability(CapabilityType::Handles, first, max))
        {
            Ok((CapabilityData::Handles(list), _)) => Ok(list
                .into_inner()
                .into_iter()
                .map(u32::from)
                .filter(|h| h >> 24 == first >> 24)
                .collect()),
            Ok(_) => Err(unexpected("listing TPM handles")),
            Err(e) => Err(command_error("listing TPM handles", e)),
        }
    }

    /// Flushes every transient object loaded in the TPM; returns how many.
    /// Only for a TPM without resource manager, right after connecting: then
    /// no other client can be connected (swtpm and `/dev/tpm0` take one at a
    /// time) and this agent flushes what it makes before each job returns, so
    /// anything loaded was left by a client that died mid-command. Left there,
    /// such objects fill the TPM's few object slots and every later
    /// CreatePrimary or Load fails with TPM_RC_OBJECT_MEMORY.
    pub fn flush_leftovers(&mut self) -> Result<usize, TpmError> {
        let handles = self.transient_handles()?;
        for &h in &handles {
            let tpm_handle = TpmHandle::try_from(h)
                .map_err(|e| command_error("naming a leftover transient object", e))?;
            let object = self
                .ctx
                .execute_without_session(|c| c.tr_from_tpm_public(tpm_handle))
                .map_err(|e| command_error("opening a leftover transient object", e))?;
            self.flush(object, "flushing a leftover transient object")?;
        }
        Ok(handles.len())
    }

    /// Transient objects currently loaded (a resource manager shows only ours).
    pub fn transient_handles(&mut self) -> Result<Vec<u32>, TpmError> {
        self.handles(TRANSIENT_FIRST, 64)
    }

    /// Persistent objects in the TPM.
    pub fn persistent_handles(&mut self) -> Result<Vec<u32>, TpmError> {
        self.handles(PERSISTENT_FIRST, 64)
    }

    /// The parent for a new key: the persistent SRK when the platform made one
    /// (and it is a storage key), otherwise the owner primary re-created from
    /// the standard template. Returns the value for the key file's parent field.
    fn storage_parent(&mut self) -> Result<(Parent, u32), TpmError> {
        if self.handles(SRK_HANDLE, 1)?.contains(&SRK_HANDLE) {
            let mut object = self.persistent_object(SRK_HANDLE)?;
            let public = self
                .ctx
                .execute_without_session(|c| c.read_public(object.into()));
            match public {
                Ok((p, _, _)) if is_storage_key(&p) => {
                    return Ok((Parent::Persistent(object), SRK_HANDLE))
                }
                Ok(_) => log::warn!(
                    "the persistent key at 0x{SRK_HANDLE:08x} is not a storage key; using the owner primary instead"
                ),
                Err(e) => log::warn!("cannot read the SRK at 0x{SRK_HANDLE:08x} ({e}); using the owner primary instead"),
            }
            let _ = self.ctx.tr_close(&mut object);
        }
        Ok((Parent::Created(self.create_owner_primary()?), PARENT_OWNER))
    }

    fn create_owner_primary(&mut self) -> Result<KeyHandle, TpmError> {
        let action = "creating the storage primary key";
        let template = templates::storage_primary().map_err(|e| command_error(action, e))?;
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map(|r| r.key_handle)
            .map_err(|e| command_error(action, e))
    }

    /// An ESYS resource for a persistent handle (reads its public area; no session).
    pub(super) fn persistent_object(&mut self, handle: u32) -> Result<ObjectHandle, TpmError> {
        let action = format!("opening persistent key 0x{handle:08x}");
        let tpm_handle = PersistentTpmHandle::new(handle)
            .map(TpmHandle::Persistent)
            .map_err(|e| command_error(&action, e))?;
        self.ctx
            .execute_without_session(|c| c.tr_from_tpm_public(tpm_handle))
            .map_err(|e| command_error(&action, e))
    }

    /// Loads a key file under its parent; the parent is released at once (a
    /// loaded key does not need it), so at most one transient object stays.
    fn load(&mut self, file: &TpmKeyFile, path: &Path) -> Result<KeyHandle, TpmError> {
        let lost = |reason: String| TpmError::KeyLost {
            path: path.to_path_buf(),
            reason,
        };
        let action = format!("loading {}", path.display());
        let public = PublicBuffer::unmarshall(&file.public)
            .and_then(Public::try_from)
            .map_err(|e| command_error(&action, e))?;
        let private = Private::try_from(file.private_area().to_vec())
            .map_err(|e| command_error(&action, e))?;
        let parent = if file.parent_is_owner_primary() {
            Parent::Created(self.create_owner_primary()?)
        } else if file.parent >> 24 == 0x81 {
            if !self.handles(file.parent, 1)?.contains(&file.parent) {
                return Err(lost(format!(
                    "its parent key 0x{:08x} is not in this TPM",
                    file.parent
                )));
            }
            Parent::Persistent(self.persistent_object(file.parent)?)
        } else {
            return Err(TpmError::Unsuitable {
                key: path.display().to_string(),
                reason: format!(
                    "its parent 0x{:08x} is neither the owner hierarchy (0x40000001) nor a persistent key",
                    file.parent
                ),
            });
        };
        let parent_key = parent.key();
        let loaded = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.load(parent_key, private, public)
            });
        let released = self.release(parent);
        let handle = loaded.map_err(|e| {
            if is_foreign_blob(&e) {
                lost(format!(
                    "the TPM refuses to load it ({})",
                    RcCode(raw_rc(&e).unwrap_or(0))
                ))
            } else {
                command_error(&action, e)
            }
        })?;
        if let Err(e) = released {
            // Do not leave the key loaded when its parent could not be flushed.
            let _ = self.ctx.flush_context(handle.into());
            return Err(e);
        }
        Ok(handle)
    }

    fn release(&mut self, parent: Parent) -> Result<(), TpmError> {
        match parent {
            Parent::Created(h) => self.flush(h.into(), "flushing the storage primary key"),
            Parent::Persistent(mut o) => {
                // Closing only frees ESYS memory; it is not a TPM command.
                let _ = self.ctx.tr_close(&mut o);
                Ok(())
            }
        }
    }

    pub(super) fn flush(&mut self, handle: ObjectHandle, action: &str) -> Result<(), TpmError> {
        self.ctx
            .flush_context(handle)
            .map_err(|e| command_error(action, e))
    }
}

/// Whether a TCTI goes through a resource manager, which flushes what a client
/// leaves loaded when it disconnects: the kernel's (`device:/dev/tpmrm0`) or
/// tpm2-abrmd (`tabrmd`). A raw device, swtpm and mssim have none.
pub fn has_resource_manager(tcti: &str) -> bool {
    let (name, conf) = tcti.split_once(':').unwrap_or((tcti, ""));
    match name {
        "device" => conf.contains("tpmrm"),
        "tabrmd" => true,
        _ => false,
    }
}

impl Parent {
    fn key(&self) -> KeyHandle {
        match self {
            Parent::Created(h) => *h,
            Parent::Persistent(o) => KeyHandle::from(*o),
        }
    }
}

fn is_storage_key(p: &Public) -> bool {
    let a = p.object_attributes();
    a.restricted() && a.decrypt() && !a.sign_encrypt()
}

fn unexpected(action: &str) -> TpmError {
    TpmError::Command {
        action: action.to_string(),
        detail: "the TPM answered with unexpected data".into(),
        code: RcCode(0),
    }
}

/// The device node of a `device:` TCTI (libtss2's default is /dev/tpm0).
fn device_path(tcti: &str) -> Option<PathBuf> {
    let rest = tcti.strip_prefix("device")?;
    let path = match rest.strip_prefix(':') {
        Some(p) => p,
        None if rest.is_empty() => "",
        None => return None,
    };
    Some(PathBuf::from(if path.is_empty() {
        "/dev/tpm0"
    } else {
        path
    }))
}

/// The TPM2_ECC_CURVE value of a curve.
fn curve_id(c: EccCurveIdentifier) -> u16 {
    tss_esapi::tss2_esys::TPM2_ECC_CURVE::from(c)
}

/// The display name of a TPM curve.
pub fn curve_name(c: EccCurveIdentifier) -> &'static str {
    match c {
        EccCurveIdentifier::NistP192 => "NIST P-192",
        EccCurveIdentifier::NistP224 => "NIST P-224",
        EccCurveIdentifier::NistP256 => "NIST P-256",
        EccCurveIdentifier::NistP384 => "NIST P-384",
        EccCurveIdentifier::NistP521 => "NIST P-521",
        EccCurveIdentifier::BnP256 => "BN P-256",
        EccCurveIdentifier::BnP638 => "BN P-638",
        EccCurveIdentifier::Sm2P256 => "SM2 P-256",
    }
}

/// Fails with the fix when the TPM lacks the algorithm's curve.
pub fn check_curve(
    algorithm: KeyAlgorithm,
    offered: &[EccCurveIdentifier],
) -> Result<(), TpmError> {
    let Some(curve) = templates::curve_of(algorithm) else {
        return Err(TpmError::Unsuitable {
            key: algorithm.to_string(),
            reason: "dps-agent makes only ECDSA keys in the TPM".into(),
        });
    };
    let wanted = EccCurveIdentifier::from(curve);
    if offered.contains(&wanted) {
        return Ok(());
    }
    let usable: Vec<KeyAlgorithm> = KeyAlgorithm::ALL
        .into_iter()
        .filter(|a| {
            templates::curve_of(*a).is_some_and(|c| offered.contains(&EccCurveIdentifier::from(c)))
        })
        .collect();
    let fix = match usable.first() {
        Some(a) => format!(
            "set [operational] key_algorithm = \"{}\" in the config (or make the onboarding key with --algorithm {})",
            a.name(),
            a.name()
        ),
        None => "this TPM cannot hold dps-agent keys; set [operational] key_backend = \"pkcs11\" or \"file\"".to_string(),
    };
    let offered = if offered.is_empty() {
        "no ECC curves".to_string()
    } else {
        offered
            .iter()
            .map(|c| curve_name(*c))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(TpmError::CurveMissing {
        wanted: curve_name(wanted),
        offered,
        fix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_curve_names_offer_and_fix() {
        let offered = [EccCurveIdentifier::NistP256, EccCurveIdentifier::BnP256];
        assert!(check_curve(KeyAlgorithm::EcdsaP256, &offered).is_ok());
        let err = check_curve(KeyAlgorithm::EcdsaP384, &offered)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "this TPM does not support NIST P-384 (it offers NIST P-256, BN P-256): set \
             [operational] key_algorithm = \"ecdsa-p256\" in the config (or make the onboarding \
             key with --algorithm ecdsa-p256)"
        );
        let err = check_curve(KeyAlgorithm::EcdsaP256, &[EccCurveIdentifier::BnP256])
            .unwrap_err()
            .to_string();
        assert!(err.contains("key_backend = \"pkcs11\""), "{err}");
    }

    #[test]
    fn device_paths() {
        assert_eq!(
            device_path("device:/dev/tpmrm0"),
            Some(PathBuf::from("/dev/tpmrm0"))
        );
        assert_eq!(device_path("device"), Some(PathBuf::from("/dev/tpm0")));
        assert_eq!(device_path("swtpm:port=1"), None);
    }

    #[test]
    fn curve_ids_are_the_tpm_values() {
        assert_eq!(u32::from(curve_id(EccCurveIdentifier::NistP384)), 0x0004);
        assert_eq!(u32::from(curve_id(EccCurveIdentifier::NistP256)), 0x0003);
    }
}
