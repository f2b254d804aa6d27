//! The `tpm` key backend: ECDSA P-256/P-384 keys inside a TPM 2.0 (tss-esapi).
//!
//! A key made here is wrapped by the TPM under the storage parent (the persistent
//! SRK at 0x81000001 when the platform has one, otherwise the owner primary
//! re-created from the standard template whenever it is needed) and stored as a
//! `TSS2 PRIVATE KEY` PEM file (mode 0600, written atomically), which tpm2-openssl
//! can use as well: `tpm:/var/lib/dps-agent/keys/op-….tss2.pem`. Persistent keys
//! made elsewhere are used by handle (`tpm:handle=0x81000101`) but never deleted.
//!
//! The TPM connection lives on one worker thread ([`worker`]); the store and its
//! keys are `Send + Sync` handles that send it jobs. No private key ever leaves
//! the TPM in the clear, and no transient object stays loaded after a call.

mod attest;
mod errors;
mod keyfile;
mod ops;
mod templates;
#[cfg(test)]
mod testutil;
mod worker;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use attest::{ek_public_pem, registration_id_for_ek, AuthKeyBlob, AUTH_KEY_HANDLE, EK_HANDLE};
pub use errors::TpmError;
pub use keyfile::{TpmKeyFile, PARENT_OWNER};
pub use ops::SRK_HANDLE;

use super::{
    check_key_name, ecdsa_raw_to_der, Backend, Key, KeyAlgorithm, KeyError, KeyStore, KeyUri,
    SignScheme,
};
use crate::fsutil;
use ops::KeyRef;
use templates::KeyInfo;
use worker::Worker;

/// Key files made by [`TpmKeyStore`] end with this.
pub const KEY_SUFFIX: &str = ".tss2.pem";

/// Keys in one TPM, reached through one worker thread.
pub struct TpmKeyStore {
    worker: Worker,
    key_dir: PathBuf,
}

/// A `tpm:` URI, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    File(PathBuf),
    Handle(u32),
}

fn target(uri: &KeyUri) -> Result<Target, KeyError> {
    let bad = |reason: &str| KeyError::BadUri {
        uri: uri.redacted(),
        reason: reason.to_string(),
    };
    let rest = match uri.as_str().split_once(':') {
        Some(("tpm", rest)) => rest,
        _ => return Err(bad("the TPM backend only opens tpm:… URIs")),
    };
    if let Some(h) = rest.strip_prefix("handle=") {
        let value = match h.strip_prefix("0x").or_else(|| h.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => h.parse(),
        }
        .map_err(|_| bad("the handle is not a number; write e.g. tpm:handle=0x81000101"))?;
        if value >> 24 != 0x81 {
            return Err(bad(
                "only persistent handles (0x81000000 to 0x81ffffff) can name a key",
            ));
        }
        return Ok(Target::Handle(value));
    }
    match uri.path() {
        Some(p) => Ok(Target::File(p)),
        None => Err(bad(
            "write tpm:/absolute/path/key.tss2.pem or tpm:handle=0x81000101",
        )),
    }
}

impl TpmKeyStore {
    /// Connects to the TPM named by a TCTI string (`[tpm] tcti`); generated
    /// operational keys go to `key_dir`.
    pub fn open(tcti: &str, key_dir: &Path) -> Result<TpmKeyStore, TpmError> {
        Ok(TpmKeyStore {
            worker: Worker::start(tcti)?,
            key_dir: key_dir.to_path_buf(),
        })
    }

    /// Makes a key and writes its key file at `path` (for `dps-agent keygen`):
    /// an absolute path ending in `.tss2.pem` that does not exist yet.
    pub fn generate_file(&self, path: &Path, algorithm: KeyAlgorithm) -> Result<KeyUri, KeyError> {
        let bad = |reason: &str| KeyError::BadUri {
            uri: path.display().to_string(),
            reason: reason.to_string(),
        };
        if !path.is_absolute() {
            return Err(bad("give an absolute path"));
        }
        if !path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(KEY_SUFFIX) && n.len() > KEY_SUFFIX.len())
        {
            return Err(bad(
                "the file name must end in .tss2.pem, e.g. /etc/dps-agent/bootstrap/device.tss2.pem",
            ));
        }
        if path.exists() {
            return Err(bad("the file exists; refusing to overwrite a key"));
        }
        self.write_new_key(path, algorithm)
    }

    fn write_new_key(&self, path: &Path, algorithm: KeyAlgorithm) -> Result<KeyUri, KeyError> {
        if algorithm.is_rsa() {
            return Err(KeyError::Unsupported {
                backend: Backend::Tpm,
                what: "making RSA keys".into(),
                hint: "; dps-agent makes ECDSA keys in the TPM (ecdsa-p384 or ecdsa-p256)".into(),
            });
        }
        let uri = KeyUri::parse(&format!("tpm:{}", path.display()))?;
        if let Some(dir) = path.parent() {
            fsutil::ensure_dir(dir, 0o700).map_err(io_error(dir, "create directory"))?;
        }
        let file = self.worker.call(move |tpm| tpm.generate(algorithm))?;
        fsutil::atomic_write(path, file.to_pem().as_bytes(), 0o600)
            .map_err(io_error(path, "write key file"))?;
        Ok(uri)
    }

    /// The ECC curves the TPM offers, by name.
    pub fn curves(&self) -> Result<Vec<&'static str>, KeyError> {
        let curves = self.worker.call(|tpm| tpm.ecc_curves())?;
        Ok(curves.into_iter().map(ops::curve_name).collect())
    }

    /// Transient objects loaded in the TPM right now (without a resource
    /// manager: by anyone). Empty between calls of this store.
    pub fn transient_handles(&self) -> Result<Vec<u32>, KeyError> {
        Ok(self.worker.call(|tpm| tpm.transient_handles())?)
    }

    /// Persistent objects in the TPM.
    pub fn persistent_handles(&self) -> Result<Vec<u32>, KeyError> {
        Ok(self.worker.call(|tpm| tpm.persistent_handles())?)
    }

    fn open_file(&self, uri: &KeyUri, path: PathBuf) -> Result<Arc<dyn Key>, KeyError> {
        let pem = match fs::read_to_string(&path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyError::NotFound {
                    uri: uri.redacted(),
                    hint: String::new(),
                })
            }
            Err(e) => return Err(io_error(&path, "read key file")(e)),
        };
        let format = |reason: String| KeyError::Format {
            path: path.clone(),
            reason,
        };
        let file = TpmKeyFile::from_pem(&pem).map_err(|e| format(e.to_string()))?;
        let unsuitable = |reason: String| TpmError::Unsuitable {
            key: uri.redacted(),
            reason,
        };
        if !file.empty_auth {
            return Err(unsuitable(
                "it needs a password (emptyAuth is not set); dps-agent uses keys without one"
                    .into(),
            )
            .into());
        }
        let public = parse_public(&file.public).map_err(|e| format(format!("pubkey: {e}")))?;
        let info = templates::key_info(&public).map_err(unsuitable)?;
        let check = file.clone();
        let check_path = path.clone();
        self.worker
            .call(move |tpm| tpm.check_loads(&check, &check_path))?;
        Ok(Arc::new(TpmKey {
            uri: uri.clone(),
            info,
            key: KeyRef::Blob { file, path },
            worker: self.worker.clone(),
        }))
    }

    fn open_handle(&self, uri: &KeyUri, handle: u32) -> Result<Arc<dyn Key>, KeyError> {
        let public = self
            .worker
            .call(move |tpm| tpm.read_persistent(handle))?
            .ok_or_else(|| KeyError::NotFound {
                uri: uri.redacted(),
                hint: " in this TPM (tpm2_getcap handles-persistent lists the persistent keys)"
                    .into(),
            })?;
        let info = templates::key_info(&public).map_err(|reason| TpmError::Unsuitable {
            key: uri.redacted(),
            reason,
        })?;
        Ok(Arc::new(TpmKey {
            uri: uri.clone(),
            info,
            key: KeyRef::Persistent(handle),
            worker: self.worker.clone(),
        }))
    }
}

fn parse_public(tpm2b: &[u8]) -> Result<tss_esapi::structures::Public, String> {
    use tss_esapi::traits::UnMarshall;
    tss_esapi::structures::PublicBuffer::unmarshall(tpm2b)
        .and_then(tss_esapi::structures::Public::try_from)
        .map_err(|e| format!("not a TPM2B_PUBLIC ({e})"))
}

fn io_error(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> KeyError {
    let path = path.to_path_buf();
    move |source| KeyError::Io {
        path,
        action,
        source,
    }
}

impl KeyStore for TpmKeyStore {
    fn backend(&self) -> Backend {
        Backend::Tpm
    }

    fn generate(&self, name: &str, algorithm: KeyAlgorithm) -> Result<KeyUri, KeyError> {
        check_key_name(name)?;
        fsutil::ensure_dir(&self.key_dir, 0o700)
            .map_err(io_error(&self.key_dir, "create directory"))?;
        let path = self.key_dir.join(format!("{name}{KEY_SUFFIX}"));
        self.write_new_key(&path, algorithm)
    }

    fn open(&self, uri: &KeyUri) -> Result<Arc<dyn Key>, KeyError> {
        match target(uri)? {
            Target::File(path) => self.open_file(uri, path),
            Target::Handle(h) => self.open_handle(uri, h),
        }
    }

    fn delete(&self, uri: &KeyUri) -> Result<(), KeyError> {
        match target(uri)? {
            Target::File(path) => {
                fsutil::remove_durably(&path).map_err(io_error(&path, "delete key file"))
            }
            Target::Handle(h) => Err(KeyError::Unsupported {
                backend: Backend::Tpm,
                what: format!("deleting {uri}"),
                hint: format!(
                    ": dps-agent did not make this persistent key and leaves it alone; if it is really unused, remove it with tpm2_evictcontrol -C o -c 0x{h:08x}"
                ),
            }),
        }
    }

    fn list(&self) -> Result<Vec<KeyUri>, KeyError> {
        let entries = match fs::read_dir(&self.key_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(&self.key_dir, "list directory")(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error(&self.key_dir, "list directory"))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(KEY_SUFFIX) && !name.starts_with('.') {
                out.push(KeyUri::parse(&format!("tpm:{}", entry.path().display()))?);
            }
        }
        out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(out)
    }
}

/// A key in the TPM: its public half and how to reach it.
struct TpmKey {
    uri: KeyUri,
    info: KeyInfo,
    key: KeyRef,
    worker: Worker,
}

impl Key for TpmKey {
    fn uri(&self) -> &KeyUri {
        &self.uri
    }

    fn algorithm(&self) -> KeyAlgorithm {
        self.info.algorithm
    }

    fn public_key_der(&self) -> &[u8] {
        &self.info.spki
    }

    fn sign_digest(&self, scheme: SignScheme, digest: &[u8]) -> Result<Vec<u8>, KeyError> {
        let fail = |reason: String| KeyError::Sign {
            uri: self.uri.redacted(),
            reason,
        };
        let SignScheme::Ecdsa(hash) = scheme else {
            return Err(fail(format!(
                "a TPM ECDSA key cannot make a {scheme} signature"
            )));
        };
        if let Some(fixed) = self.info.scheme_hash {
            if fixed != hash {
                return Err(fail(format!(
                    "the key signs only ECDSA with {fixed:?}, not with {hash:?}"
                )));
            }
        }
        if digest.len() != hash.output_len() {
            return Err(fail(format!(
                "digest is {} bytes, expected {} for {hash:?}",
                digest.len(),
                hash.output_len()
            )));
        }
        let key = self.key.clone();
        let digest = digest.to_vec();
        let action = format!("signing with {}", self.uri);
        let (r, s) = self
            .worker
            .call(move |tpm| tpm.sign(&key, hash, digest, &action))?;
        let field = match self.info.algorithm {
            KeyAlgorithm::EcdsaP256 => 32,
            KeyAlgorithm::EcdsaP384 => 48,
            KeyAlgorithm::Rsa { .. } => return Err(fail("not an ECDSA key".into())),
        };
        let mut raw = templates::left_pad(&r, field).map_err(&fail)?;
        raw.extend(templates::left_pad(&s, field).map_err(&fail)?);
        ecdsa_raw_to_der(self.info.algorithm, &raw)
            .ok_or_else(|| fail("the TPM returned an invalid signature".into()))
    }
}

/// The process's TPM store, connected on first use and shared by everyone
/// afterwards (one worker thread, one TPM connection). A failed connection is
/// not remembered: the next use tries again.
pub struct SharedTpm {
    tcti: String,
    key_dir: PathBuf,
    store: Mutex<Option<Arc<TpmKeyStore>>>,
}

impl SharedTpm {
    pub fn new(tcti: &str, key_dir: &Path) -> SharedTpm {
        SharedTpm {
            tcti: tcti.to_string(),
            key_dir: key_dir.to_path_buf(),
            store: Mutex::new(None),
        }
    }

    /// The store, connecting to the TPM if this is the first use.
    pub fn get(&self) -> Result<Arc<TpmKeyStore>, KeyError> {
        let mut slot = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let store = Arc::new(TpmKeyStore::open(&self.tcti, &self.key_dir)?);
        *slot = Some(store.clone());
        Ok(store)
    }
}

#[cfg(test)]
mod tests;
