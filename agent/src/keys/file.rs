//! The `file` key backend: software keys in PEM files. For development, tests and
//! bootstrap keys that arrive as files; production operational keys belong in a
//! TPM or PKCS#11 token. Generated keys are PKCS#8 PEM, mode 0600, written
//! atomically; secret scalars are zeroized when dropped (the curve crates do that).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use p384::elliptic_curve::Generate;
use signature::hazmat::PrehashSigner;

use super::{check_key_name, Backend, Key, KeyAlgorithm, KeyError, KeyStore, KeyUri, SignScheme};
use crate::fsutil;

/// Key files made by [`FileKeyStore::generate`] end with this.
const KEY_SUFFIX: &str = ".key";

/// Software keys in a directory.
pub struct FileKeyStore {
    dir: PathBuf,
}

impl FileKeyStore {
    /// A store that writes generated keys into `dir` (created 0700 when needed).
    pub fn new(dir: &Path) -> Self {
        FileKeyStore {
            dir: dir.to_path_buf(),
        }
    }

    fn io(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> KeyError {
        let path = path.to_path_buf();
        move |source| KeyError::Io {
            path,
            action,
            source,
        }
    }
}

impl KeyStore for FileKeyStore {
    fn backend(&self) -> Backend {
        Backend::File
    }

    fn generate(&self, name: &str, algorithm: KeyAlgorithm) -> Result<KeyUri, KeyError> {
        check_key_name(name)?;
        fsutil::ensure_dir(&self.dir, 0o700).map_err(Self::io(&self.dir, "create directory"))?;
        let path = self.dir.join(format!("{name}{KEY_SUFFIX}"));
        let pem = match algorithm {
            KeyAlgorithm::EcdsaP256 => p256::SecretKey::try_generate()
                .map_err(|e| rng_error(&path, e))?
                .to_pkcs8_pem(LineEnding::LF),
            KeyAlgorithm::EcdsaP384 => p384::SecretKey::try_generate()
                .map_err(|e| rng_error(&path, e))?
                .to_pkcs8_pem(LineEnding::LF),
        }
        .map_err(|e| KeyError::Format {
            path: path.clone(),
            reason: format!("cannot encode the new key: {e}"),
        })?;
        fsutil::atomic_write(&path, pem.as_bytes(), 0o600)
            .map_err(Self::io(&path, "write key file"))?;
        Ok(KeyUri::file(&path))
    }

    fn open(&self, uri: &KeyUri) -> Result<Arc<dyn Key>, KeyError> {
        let path = file_path(uri)?;
        let pem = match fs::read_to_string(&path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyError::NotFound {
                    uri: uri.redacted(),
                    hint: String::new(),
                })
            }
            Err(e) => return Err(Self::io(&path, "read key file")(e)),
        };
        let secret = parse_private_key_pem(&path, &pem)?;
        let public_der = secret.public_key_der(&path)?;
        Ok(Arc::new(FileKey {
            uri: uri.clone(),
            secret,
            public_der,
        }))
    }

    fn delete(&self, uri: &KeyUri) -> Result<(), KeyError> {
        let path = file_path(uri)?;
        fsutil::remove_durably(&path).map_err(Self::io(&path, "delete key file"))
    }

    fn list(&self) -> Result<Vec<KeyUri>, KeyError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io(&self.dir, "list directory")(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(Self::io(&self.dir, "list directory"))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(KEY_SUFFIX) && !name.starts_with('.') {
                out.push(KeyUri::file(&entry.path()));
            }
        }
        out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(out)
    }
}

fn rng_error(path: &Path, e: impl std::fmt::Display) -> KeyError {
    KeyError::Format {
        path: path.to_path_buf(),
        reason: format!("the system random number generator failed: {e}"),
    }
}

fn file_path(uri: &KeyUri) -> Result<PathBuf, KeyError> {
    match (uri.backend(), uri.path()) {
        (Backend::File, Some(p)) => Ok(p),
        _ => Err(KeyError::BadUri {
            uri: uri.redacted(),
            reason: "the file backend only opens file:/… URIs".into(),
        }),
    }
}

/// A software private key.
enum SecretKey {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
}

impl SecretKey {
    fn algorithm(&self) -> KeyAlgorithm {
        match self {
            SecretKey::P256(_) => KeyAlgorithm::EcdsaP256,
            SecretKey::P384(_) => KeyAlgorithm::EcdsaP384,
        }
    }

    fn public_key_der(&self, path: &Path) -> Result<Vec<u8>, KeyError> {
        let doc = match self {
            SecretKey::P256(k) => k.verifying_key().to_public_key_der(),
            SecretKey::P384(k) => k.verifying_key().to_public_key_der(),
        };
        doc.map(|d| d.as_bytes().to_vec())
            .map_err(|e| KeyError::Format {
                path: path.to_path_buf(),
                reason: format!("cannot encode the public key: {e}"),
            })
    }
}

/// Parses a private key PEM file's text.
fn parse_private_key_pem(path: &Path, pem: &str) -> Result<SecretKey, KeyError> {
    let format_err = |reason: String| KeyError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let label = pem
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("-----BEGIN ")
                .and_then(|r| r.strip_suffix("-----"))
        })
        .ok_or_else(|| format_err("not a PEM file (no -----BEGIN … ----- line)".into()))?;
    if label == "ENCRYPTED PRIVATE KEY" || pem.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(format_err(
            "encrypted keys are not supported; decrypt it (openssl pkey -in KEY -out KEY.plain) or move it into the TPM/HSM".into(),
        ));
    }
    match label {
        "PRIVATE KEY" => {
            if let Ok(k) = p384::SecretKey::from_pkcs8_pem(pem) {
                return Ok(SecretKey::P384(k.into()));
            }
            if let Ok(k) = p256::SecretKey::from_pkcs8_pem(pem) {
                return Ok(SecretKey::P256(k.into()));
            }
            Err(format_err(
                "PKCS#8 key is not an EC P-256 or P-384 key (or the file is damaged)".into(),
            ))
        }
        other => Err(format_err(format!(
            "PEM block \"{other}\" is not a supported private key; expected \"PRIVATE KEY\" (PKCS#8)"
        ))),
    }
}

struct FileKey {
    uri: KeyUri,
    secret: SecretKey,
    public_der: Vec<u8>,
}

impl Key for FileKey {
    fn uri(&self) -> &KeyUri {
        &self.uri
    }

    fn algorithm(&self) -> KeyAlgorithm {
        self.secret.algorithm()
    }

    fn public_key_der(&self) -> &[u8] {
        &self.public_der
    }

    fn sign_digest(&self, scheme: SignScheme, digest: &[u8]) -> Result<Vec<u8>, KeyError> {
        let SignScheme::Ecdsa(hash) = scheme;
        let fail = |reason: String| KeyError::Sign {
            uri: self.uri.redacted(),
            reason,
        };
        if digest.len() != hash.output_len() {
            return Err(fail(format!(
                "digest is {} bytes, expected {} for {hash:?}",
                digest.len(),
                hash.output_len()
            )));
        }
        let der = match &self.secret {
            SecretKey::P256(k) => {
                let sig: p256::ecdsa::DerSignature =
                    k.sign_prehash(digest).map_err(|e| fail(e.to_string()))?;
                sig.as_bytes().to_vec()
            }
            SecretKey::P384(k) => {
                let sig: p384::ecdsa::DerSignature =
                    k.sign_prehash(digest).map_err(|e| fail(e.to_string()))?;
                sig.as_bytes().to_vec()
            }
        };
        Ok(der)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::HashAlg;
    use std::os::unix::fs::PermissionsExt;

    fn tmpdir() -> PathBuf {
        std::env::temp_dir().join(format!("filekeys-{}", rand::random::<u64>()))
    }

    fn verify(spki: &[u8], alg: KeyAlgorithm, msg: &[u8], sig: &[u8]) -> bool {
        let spki = spki::SubjectPublicKeyInfoRef::try_from(spki).unwrap();
        let point = spki.subject_public_key.raw_bytes();
        let ring_alg = match alg {
            KeyAlgorithm::EcdsaP256 => &ring::signature::ECDSA_P256_SHA256_ASN1,
            KeyAlgorithm::EcdsaP384 => &ring::signature::ECDSA_P384_SHA384_ASN1,
        };
        ring::signature::UnparsedPublicKey::new(ring_alg, point)
            .verify(msg, sig)
            .is_ok()
    }

    #[test]
    fn generate_sign_verify_delete() {
        let dir = tmpdir();
        let store = FileKeyStore::new(&dir);
        for alg in KeyAlgorithm::ALL {
            let uri = store.generate(&format!("t-{}", alg.name()), alg).unwrap();
            let path = uri.path().unwrap();
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            let key = store.open(&uri).unwrap();
            assert_eq!(key.algorithm(), alg);
            let sig = key.sign_message(alg.default_scheme(), b"hello").unwrap();
            assert!(verify(key.public_key_der(), alg, b"hello", &sig));
            assert!(!verify(key.public_key_der(), alg, b"hellO", &sig));
        }
        assert_eq!(store.list().unwrap().len(), 2);
        for uri in store.list().unwrap() {
            store.delete(&uri).unwrap();
            store.delete(&uri).unwrap();
        }
        assert!(store.list().unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wrong_digest_length_is_refused() {
        let dir = tmpdir();
        let store = FileKeyStore::new(&dir);
        let key = store
            .open(&store.generate("k", KeyAlgorithm::EcdsaP384).unwrap())
            .unwrap();
        let err = key
            .sign_digest(SignScheme::Ecdsa(HashAlg::Sha384), &[0u8; 32])
            .unwrap_err();
        assert!(err.to_string().contains("expected 48"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn clear_errors_for_bad_files() {
        let dir = tmpdir();
        fsutil::ensure_dir(&dir, 0o700).unwrap();
        let store = FileKeyStore::new(&dir);
        let p = dir.join("enc.key");
        fs::write(
            &p,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = store.open(&KeyUri::file(&p)).err().unwrap().to_string();
        assert!(err.contains("encrypted keys are not supported"), "{err}");
        fs::write(&p, "hello").unwrap();
        let err = store.open(&KeyUri::file(&p)).err().unwrap().to_string();
        assert!(err.contains("not a PEM file"), "{err}");
        let err = store
            .open(&KeyUri::file(&dir.join("missing.key")))
            .err()
            .unwrap();
        assert!(matches!(err, KeyError::NotFound { .. }));
        fs::remove_dir_all(&dir).unwrap();
    }
}
