//! The `file` key backend: software keys in PEM files. For development, tests and
//! bootstrap keys that arrive as files; production operational keys belong in a
//! TPM or PKCS#11 token.
//!
//! Generated keys are EC, PKCS#8 PEM, mode 0600, written atomically. Opened keys
//! may be in any form openssl writes: PKCS#8 (`BEGIN PRIVATE KEY`), PKCS#1
//! (`BEGIN RSA PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`, with or without the
//! `BEGIN EC PARAMETERS` block openssl may put first), holding an RSA key of
//! 2048–4096 bits or an EC P-256/P-384 key. Encrypted keys are refused, never
//! decrypted: a daemon has nobody to type a passphrase. Every refusal names the
//! file and the fix. Secret material is zeroized when dropped (the curve and RSA
//! crates do that; decoded PEM bodies are held in `Zeroizing` buffers).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use der::Decode as _;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use p384::elliptic_curve::Generate;
use rsa::pkcs1::DecodeRsaPrivateKey as _;
use rsa::traits::PublicKeyParts as _;
use signature::hazmat::PrehashSigner;
use spki::ObjectIdentifier;
use zeroize::Zeroizing;

use super::{
    check_key_name, rsa_algorithm, Backend, HashAlg, Key, KeyAlgorithm, KeyError, KeyStore, KeyUri,
    SignScheme,
};
use crate::fsutil;

/// Key files made by [`FileKeyStore::generate`] end with this.
const KEY_SUFFIX: &str = ".key";

/// What an encrypted key file is told (the whole message is the fix).
const ENCRYPTED: &str = "encrypted keys are not supported; decrypt it or move it into the TPM/HSM (to decrypt: openssl pkey -in KEY -out KEY.plain, then chmod 0600 KEY.plain)";

/// What a key of a kind we do not use is told to use instead.
const USE_INSTEAD: &str = "use an RSA key of 2048 to 4096 bits or an EC P-256/P-384 key";

const OID_RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_RSASSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

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

/// Reads a private key file, or gives its mode if group or others may read or
/// write it (checked on the open file, so a swap of the path cannot slip by).
fn read_private(path: &Path) -> std::io::Result<Result<Zeroizing<Vec<u8>>, u32>> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let mut file = fs::File::open(path)?;
    let mode = file.metadata()?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Ok(Err(mode));
    }
    let mut bytes = Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes)?;
    Ok(Ok(bytes))
}

impl KeyStore for FileKeyStore {
    fn backend(&self) -> Backend {
        Backend::File
    }

    fn generate(&self, name: &str, algorithm: KeyAlgorithm) -> Result<KeyUri, KeyError> {
        check_key_name(name)?;
        let path = self.dir.join(format!("{name}{KEY_SUFFIX}"));
        let pem = match algorithm {
            KeyAlgorithm::EcdsaP256 => p256::SecretKey::try_generate()
                .map_err(|e| rng_error(&path, e))?
                .to_pkcs8_pem(LineEnding::LF),
            KeyAlgorithm::EcdsaP384 => p384::SecretKey::try_generate()
                .map_err(|e| rng_error(&path, e))?
                .to_pkcs8_pem(LineEnding::LF),
            KeyAlgorithm::Rsa { .. } => {
                return Err(KeyError::Unsupported {
                    backend: Backend::File,
                    what: "making RSA keys".into(),
                    hint: "; dps-agent makes ECDSA keys (ecdsa-p384 or ecdsa-p256); an RSA bootstrap key made elsewhere can be used as it is".into(),
                })
            }
        }
        .map_err(|e| KeyError::Format {
            path: path.clone(),
            reason: format!("cannot encode the new key: {e}"),
        })?;
        fsutil::ensure_dir(&self.dir, 0o700).map_err(Self::io(&self.dir, "create directory"))?;
        if path.exists() {
            // Never replace a key (it may be the committed one).
            return Err(Self::io(&path, "make a new key file")(
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
        fsutil::atomic_write(&path, pem.as_bytes(), 0o600)
            .map_err(Self::io(&path, "write key file"))?;
        Ok(KeyUri::file(&path))
    }

    fn open(&self, uri: &KeyUri) -> Result<Arc<dyn Key>, KeyError> {
        let path = file_path(uri)?;
        let bytes = match read_private(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyError::NotFound {
                    uri: uri.redacted(),
                    hint: String::new(),
                })
            }
            Err(e) => return Err(Self::io(&path, "read key file")(e)),
        }
        .map_err(|mode| KeyError::Exposed {
            path: path.clone(),
            mode,
        })?;
        let (_format, secret) = parse_private_key(&path, &bytes)?;
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

/// The PEM forms of private keys the file backend reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// `BEGIN PRIVATE KEY`: PKCS#8, what OpenSSL 3 writes and `keygen` makes.
    Pkcs8,
    /// `BEGIN RSA PRIVATE KEY`: PKCS#1, from older tools or `openssl rsa -traditional`.
    Pkcs1,
    /// `BEGIN EC PRIVATE KEY`: SEC1, from `openssl ecparam -genkey` or `openssl ec`.
    Sec1,
}

impl KeyFormat {
    /// The PEM label of the format.
    pub fn label(self) -> &'static str {
        match self {
            KeyFormat::Pkcs8 => "PRIVATE KEY",
            KeyFormat::Pkcs1 => "RSA PRIVATE KEY",
            KeyFormat::Sec1 => "EC PRIVATE KEY",
        }
    }

    fn of_label(label: &str) -> Option<KeyFormat> {
        [KeyFormat::Pkcs8, KeyFormat::Pkcs1, KeyFormat::Sec1]
            .into_iter()
            .find(|f| f.label() == label)
    }
}

/// One `-----BEGIN label-----` … `-----END label-----` block of a PEM file.
struct PemBlock {
    label: String,
    /// An RFC 1421 `Proc-Type: 4,ENCRYPTED` header (PKCS#1/SEC1 with a passphrase).
    encrypted: bool,
    der: Zeroizing<Vec<u8>>,
}

/// Splits a PEM text into its blocks. Text outside blocks is ignored (openssl
/// writes "Bag Attributes" and the like there); RFC 1421 headers are read for
/// `Proc-Type` and otherwise skipped.
fn pem_blocks(text: &str) -> Result<Vec<PemBlock>, String> {
    struct Open {
        label: String,
        encrypted: bool,
        body: Zeroizing<String>,
    }
    let mut out = Vec::new();
    let mut open: Option<Open> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let n = n + 1;
        if let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|r| r.strip_suffix("-----"))
        {
            if let Some(o) = &open {
                return Err(format!(
                    "line {n}: BEGIN {label} inside the {} block (an END line is missing)",
                    o.label
                ));
            }
            open = Some(Open {
                label: label.to_string(),
                encrypted: false,
                body: Zeroizing::new(String::new()),
            });
        } else if let Some(label) = line
            .strip_prefix("-----END ")
            .and_then(|r| r.strip_suffix("-----"))
        {
            let o = open
                .take()
                .ok_or_else(|| format!("line {n}: END {label} without a BEGIN line"))?;
            if o.label != label {
                return Err(format!(
                    "line {n}: the {} block ends with END {label}",
                    o.label
                ));
            }
            let der = base64::engine::general_purpose::STANDARD
                .decode(o.body.as_bytes())
                .map_err(|e| format!("the {} block is not valid base64 ({e})", o.label))?;
            out.push(PemBlock {
                label: o.label,
                encrypted: o.encrypted,
                der: Zeroizing::new(der),
            });
        } else if let Some(o) = open.as_mut() {
            if o.body.is_empty() && line.contains(':') {
                // An RFC 1421 header such as "Proc-Type: 4,ENCRYPTED" or "DEK-Info: …".
                let (name, value) = line.split_once(':').unwrap_or((line, ""));
                if name.trim().eq_ignore_ascii_case("Proc-Type")
                    && value.to_ascii_uppercase().contains("ENCRYPTED")
                {
                    o.encrypted = true;
                }
            } else {
                o.body.push_str(line);
            }
        }
    }
    match open {
        Some(o) => Err(format!(
            "the {} block has no END line (the file is cut short)",
            o.label
        )),
        None => Ok(out),
    }
}

/// Reads a private key file's bytes: finds the one private-key block, refuses
/// encrypted keys and keys of a kind we do not use, and says which form it was.
fn parse_private_key(path: &Path, bytes: &[u8]) -> Result<(KeyFormat, SecretKey), KeyError> {
    let fail = |reason: String| KeyError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err(fail(
            "is a binary file, not PEM (a DER key?); convert it: openssl pkey -inform DER -in KEY -out KEY.pem".into(),
        ));
    };
    let blocks = pem_blocks(text).map_err(|e| {
        fail(format!(
            "is a damaged PEM file: {e}; copy the key file again"
        ))
    })?;
    if blocks.is_empty() {
        return Err(fail(
            "not a PEM file (no -----BEGIN … ----- line); point the key setting at a PEM private key (BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)".into(),
        ));
    }
    if blocks
        .iter()
        .any(|b| b.encrypted || b.label == "ENCRYPTED PRIVATE KEY")
    {
        return Err(fail(ENCRYPTED.into()));
    }
    let keys: Vec<(KeyFormat, &PemBlock)> = blocks
        .iter()
        .filter_map(|b| KeyFormat::of_label(&b.label).map(|f| (f, b)))
        .collect();
    let (format, block) = match keys.as_slice() {
        [one] => *one,
        [] => return Err(fail(no_key_reason(path, &blocks[0].label))),
        many => {
            return Err(fail(format!(
                "holds {} private keys; keep only this device's key in the file",
                many.len()
            )))
        }
    };
    let secret = match format {
        KeyFormat::Pkcs8 => parse_pkcs8(&block.der),
        KeyFormat::Pkcs1 => rsa::RsaPrivateKey::from_pkcs1_der(&block.der)
            .map_err(|e| format!("the RSA PRIVATE KEY block does not parse as a PKCS#1 RSA key ({e}); the file is damaged, copy it again"))
            .and_then(SecretKey::rsa),
        KeyFormat::Sec1 => parse_sec1(&block.der),
    }
    .map_err(fail)?;
    Ok((format, secret))
}

/// Why a PEM file with no private-key block is refused, by its first block.
fn no_key_reason(path: &Path, first_label: &str) -> String {
    match first_label {
        "TSS2 PRIVATE KEY" => format!(
            "is a TPM key file; name it tpm:{} instead of file:{}",
            path.display(),
            path.display()
        ),
        "CERTIFICATE" | "TRUSTED CERTIFICATE" => "holds a certificate, not a private key; point the key setting (identity_key) at the private key file, e.g. device.key, and identity_cert at this one".into(),
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => "holds a certificate request, not a private key; point the key setting at the private key the request was made with".into(),
        "PUBLIC KEY" | "RSA PUBLIC KEY" => "holds only a public key; point the key setting at the private key file".into(),
        "OPENSSH PRIVATE KEY" => "is an OpenSSH key; rewrite it as PKCS#8 PEM (ssh-keygen -p -m PKCS8 -f KEY) or use the key openssl made".into(),
        "DSA PRIVATE KEY" => format!("holds a DSA key, which is not supported; {USE_INSTEAD}"),
        other => format!(
            "PEM block \"{other}\" is not a supported private key; expected \"PRIVATE KEY\" (PKCS#8), \"RSA PRIVATE KEY\" (PKCS#1) or \"EC PRIVATE KEY\" (SEC1)"
        ),
    }
}

/// A curve's usual name, for messages.
fn curve_name(oid: ObjectIdentifier) -> String {
    match oid.to_string().as_str() {
        "1.2.840.10045.3.1.7" => "P-256".into(),
        "1.3.132.0.34" => "P-384".into(),
        "1.3.132.0.35" => "P-521 (secp521r1)".into(),
        "1.3.132.0.10" => "secp256k1".into(),
        "1.2.840.10045.3.1.1" => "P-192 (prime192v1)".into(),
        "1.3.132.0.33" => "P-224 (secp224r1)".into(),
        s if s.starts_with("1.3.36.3.3.2.8.1.1.") => format!("brainpool ({s})"),
        s => format!("the curve with OID {s}"),
    }
}

fn unsupported_curve(oid: Option<ObjectIdentifier>) -> String {
    match oid {
        Some(oid) => format!(
            "the EC key is on {}, which is not supported; {USE_INSTEAD}",
            curve_name(oid)
        ),
        None => format!("the EC key does not name its curve; {USE_INSTEAD}"),
    }
}

/// A PKCS#8 `PrivateKeyInfo`: RSA or EC P-256/P-384.
fn parse_pkcs8(der: &[u8]) -> Result<SecretKey, String> {
    let info = p256::pkcs8::PrivateKeyInfoRef::from_der(der).map_err(|e| {
        format!(
            "the PRIVATE KEY block is not valid PKCS#8 ({e}); the file is damaged, copy it again"
        )
    })?;
    let alg = info.algorithm.oid;
    let damaged = |e: String| {
        format!("the PKCS#8 key does not parse ({e}); the file is damaged, copy it again")
    };
    match alg {
        OID_RSA_ENCRYPTION => rsa::RsaPrivateKey::from_pkcs8_der(der)
            .map_err(|e| damaged(e.to_string()))
            .and_then(SecretKey::rsa),
        OID_EC_PUBLIC_KEY => {
            let curve = info
                .algorithm
                .parameters
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
            match curve {
                Some(OID_P256) => p256::SecretKey::from_pkcs8_der(der)
                    .map(|k| SecretKey::P256(k.into()))
                    .map_err(|e| damaged(e.to_string())),
                Some(OID_P384) => p384::SecretKey::from_pkcs8_der(der)
                    .map(|k| SecretKey::P384(k.into()))
                    .map_err(|e| damaged(e.to_string())),
                other => Err(unsupported_curve(other)),
            }
        }
        OID_RSASSA_PSS => Err("the key is an RSA-PSS-only key (openssl genpkey -algorithm RSA-PSS); make the device key with openssl genrsa (or genpkey -algorithm RSA) instead".into()),
        other => {
            let name = match other.to_string().as_str() {
                "1.3.101.112" => "an Ed25519 key".to_string(),
                "1.3.101.113" => "an Ed448 key".to_string(),
                "1.2.840.10040.4.1" => "a DSA key".to_string(),
                s => format!("a key of algorithm {s}"),
            };
            Err(format!("the PKCS#8 file holds {name}, which is not supported; {USE_INSTEAD}"))
        }
    }
}

/// A SEC1 `ECPrivateKey`: P-256 or P-384, named by its parameters.
fn parse_sec1(der: &[u8]) -> Result<SecretKey, String> {
    let key = sec1::EcPrivateKey::from_der(der).map_err(|e| {
        format!("the EC PRIVATE KEY block is not a valid SEC1 key ({e}); the file is damaged, copy it again")
    })?;
    let damaged = |e: String| {
        format!("the SEC1 key does not parse ({e}); the file is damaged, copy it again")
    };
    match key.parameters.and_then(|p| p.named_curve()) {
        Some(OID_P256) => p256::SecretKey::from_sec1_der(der)
            .map(|k| SecretKey::P256(k.into()))
            .map_err(|e| damaged(e.to_string())),
        Some(OID_P384) => p384::SecretKey::from_sec1_der(der)
            .map(|k| SecretKey::P384(k.into()))
            .map_err(|e| damaged(e.to_string())),
        other => Err(unsupported_curve(other)),
    }
}

/// A software private key.
enum SecretKey {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    Rsa(Box<rsa::RsaPrivateKey>),
}

/// Names the kind of key only: key material is never printed.
impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.algorithm())
    }
}

impl SecretKey {
    /// An RSA key, if its size is one we accept.
    fn rsa(key: rsa::RsaPrivateKey) -> Result<SecretKey, String> {
        rsa_algorithm(key.n().bits())?;
        Ok(SecretKey::Rsa(Box::new(key)))
    }

    fn algorithm(&self) -> KeyAlgorithm {
        match self {
            SecretKey::P256(_) => KeyAlgorithm::EcdsaP256,
            SecretKey::P384(_) => KeyAlgorithm::EcdsaP384,
            SecretKey::Rsa(k) => KeyAlgorithm::Rsa {
                bits: u16::try_from(k.n().bits()).unwrap_or(u16::MAX),
            },
        }
    }

    fn public_key_der(&self, path: &Path) -> Result<Vec<u8>, KeyError> {
        let doc = match self {
            SecretKey::P256(k) => k.verifying_key().to_public_key_der(),
            SecretKey::P384(k) => k.verifying_key().to_public_key_der(),
            SecretKey::Rsa(k) => k.to_public_key().to_public_key_der(),
        };
        doc.map(|d| d.as_bytes().to_vec())
            .map_err(|e| KeyError::Format {
                path: path.to_path_buf(),
                reason: format!("cannot encode the public key: {e}"),
            })
    }
}

/// RSA signature of a digest with the padding and hash of `scheme`.
fn rsa_sign(key: &rsa::RsaPrivateKey, scheme: SignScheme, digest: &[u8]) -> rsa::Result<Vec<u8>> {
    use rsa::{Pkcs1v15Sign, Pss};
    use sha2::{Sha256, Sha384, Sha512};
    match scheme {
        SignScheme::RsaPkcs1(HashAlg::Sha256) => key.sign(Pkcs1v15Sign::new::<Sha256>(), digest),
        SignScheme::RsaPkcs1(HashAlg::Sha384) => key.sign(Pkcs1v15Sign::new::<Sha384>(), digest),
        SignScheme::RsaPkcs1(HashAlg::Sha512) => key.sign(Pkcs1v15Sign::new::<Sha512>(), digest),
        SignScheme::RsaPss(HashAlg::Sha256) => key.sign(Pss::<Sha256>::new(), digest),
        SignScheme::RsaPss(HashAlg::Sha384) => key.sign(Pss::<Sha384>::new(), digest),
        SignScheme::RsaPss(HashAlg::Sha512) => key.sign(Pss::<Sha512>::new(), digest),
        SignScheme::Ecdsa(_) => Err(rsa::Error::InvalidPaddingScheme),
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
        let fail = |reason: String| KeyError::Sign {
            uri: self.uri.redacted(),
            reason,
        };
        let hash = scheme.hash();
        if digest.len() != hash.output_len() {
            return Err(fail(format!(
                "digest is {} bytes, expected {} for {hash:?}",
                digest.len(),
                hash.output_len()
            )));
        }
        match (&self.secret, scheme) {
            (SecretKey::P256(k), SignScheme::Ecdsa(_)) => {
                let sig: p256::ecdsa::DerSignature =
                    k.sign_prehash(digest).map_err(|e| fail(e.to_string()))?;
                Ok(sig.as_bytes().to_vec())
            }
            (SecretKey::P384(k), SignScheme::Ecdsa(_)) => {
                let sig: p384::ecdsa::DerSignature =
                    k.sign_prehash(digest).map_err(|e| fail(e.to_string()))?;
                Ok(sig.as_bytes().to_vec())
            }
            (SecretKey::Rsa(k), SignScheme::RsaPkcs1(_) | SignScheme::RsaPss(_)) => {
                rsa_sign(k, scheme, digest).map_err(|e| fail(e.to_string()))
            }
            (secret, scheme) => Err(fail(format!(
                "a {} key cannot make a {scheme} signature",
                secret.algorithm()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::OnceLock;

    fn tmpdir() -> PathBuf {
        std::env::temp_dir().join(format!("filekeys-{}", rand::random::<u64>()))
    }

    /// Verifies `sig` over `msg` with ring, from the key's SPKI, for `scheme`.
    fn verify(spki: &[u8], scheme: SignScheme, msg: &[u8], sig: &[u8]) -> bool {
        use ring::signature as rs;
        let spki = spki::SubjectPublicKeyInfoRef::try_from(spki).unwrap();
        let key = spki.subject_public_key.raw_bytes();
        let alg: &dyn rs::VerificationAlgorithm = match (scheme, key.len()) {
            (SignScheme::Ecdsa(HashAlg::Sha256), 65) => &rs::ECDSA_P256_SHA256_ASN1,
            (SignScheme::Ecdsa(HashAlg::Sha384), 97) => &rs::ECDSA_P384_SHA384_ASN1,
            (SignScheme::RsaPkcs1(HashAlg::Sha256), _) => &rs::RSA_PKCS1_2048_8192_SHA256,
            (SignScheme::RsaPkcs1(HashAlg::Sha384), _) => &rs::RSA_PKCS1_2048_8192_SHA384,
            (SignScheme::RsaPkcs1(HashAlg::Sha512), _) => &rs::RSA_PKCS1_2048_8192_SHA512,
            (SignScheme::RsaPss(HashAlg::Sha256), _) => &rs::RSA_PSS_2048_8192_SHA256,
            (SignScheme::RsaPss(HashAlg::Sha384), _) => &rs::RSA_PSS_2048_8192_SHA384,
            (SignScheme::RsaPss(HashAlg::Sha512), _) => &rs::RSA_PSS_2048_8192_SHA512,
            other => panic!("no ring algorithm for {other:?}"),
        };
        rs::UnparsedPublicKey::new(alg, key)
            .verify(msg, sig)
            .is_ok()
    }

    /// One RSA-2048 key per test process (generation is slow), as PKCS#1 DER.
    fn rsa_2048() -> &'static rsa::RsaPrivateKey {
        static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
        KEY.get_or_init(|| {
            let mut rng = rsa::rand_core::UnwrapErr(crypto_rng());
            rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap()
        })
    }

    fn crypto_rng() -> impl rsa::rand_core::TryCryptoRng {
        p256::elliptic_curve::common::getrandom::SysRng
    }

    fn pem(label: &str, der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }

    /// An Ed25519 PKCS#8 key (RFC 8410 §10.3 layout).
    fn ed25519_pkcs8() -> Vec<u8> {
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend([7u8; 32]);
        der
    }

    /// A SEC1 key naming the curve `oid` (the scalar does not matter).
    fn sec1_on(oid: &str) -> Vec<u8> {
        use der::Encode as _;
        sec1::EcPrivateKey {
            private_key: &[1u8; 32],
            parameters: Some(sec1::EcParameters::NamedCurve(
                ObjectIdentifier::new(oid).unwrap(),
            )),
            public_key: None,
        }
        .to_der()
        .unwrap()
    }

    fn parse(text: &str) -> Result<(KeyFormat, SecretKey), String> {
        parse_private_key(
            Path::new("/etc/dps-agent/bootstrap/device.key"),
            text.as_bytes(),
        )
        .map_err(|e| e.to_string())
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
            assert!(fs::read_to_string(&path)
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----"));
            let key = store.open(&uri).unwrap();
            assert_eq!(key.algorithm(), alg);
            let scheme = alg.default_scheme();
            let sig = key.sign_message(scheme, b"hello").unwrap();
            assert!(verify(key.public_key_der(), scheme, b"hello", &sig));
            assert!(!verify(key.public_key_der(), scheme, b"hellO", &sig));
        }
        assert_eq!(store.list().unwrap().len(), 2);
        for uri in store.list().unwrap() {
            store.delete(&uri).unwrap();
            store.delete(&uri).unwrap();
        }
        assert!(store.list().unwrap().is_empty());
        let err = store
            .generate("r", KeyAlgorithm::Rsa { bits: 2048 })
            .unwrap_err();
        assert!(matches!(err, KeyError::Unsupported { .. }), "{err}");
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
        // An EC key makes no RSA signature.
        let err = key
            .sign_digest(SignScheme::RsaPss(HashAlg::Sha256), &[0u8; 32])
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("a ecdsa-p384 key cannot make a RSA-PSS with SHA-256 signature"),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rsa_pkcs1_and_pkcs8_files_sign_every_scheme() {
        use rsa::pkcs1::EncodeRsaPrivateKey as _;
        let key = rsa_2048();
        let pkcs1 = pem("RSA PRIVATE KEY", key.to_pkcs1_der().unwrap().as_bytes());
        let pkcs8 = pem("PRIVATE KEY", key.to_pkcs8_der().unwrap().as_bytes());
        let dir = tmpdir();
        fsutil::ensure_dir(&dir, 0o700).unwrap();
        let store = FileKeyStore::new(&dir);
        for (name, text, format) in [
            ("pkcs1.key", &pkcs1, KeyFormat::Pkcs1),
            ("pkcs8.key", &pkcs8, KeyFormat::Pkcs8),
        ] {
            assert_eq!(parse(text).unwrap().0, format);
            let path = dir.join(name);
            crate::fsutil::atomic_write(&path, text.as_bytes(), 0o600).unwrap();
            let k = store.open(&KeyUri::file(&path)).unwrap();
            assert_eq!(k.algorithm(), KeyAlgorithm::Rsa { bits: 2048 });
            assert_eq!(k.algorithm().to_string(), "rsa-2048");
            assert_eq!(
                k.public_key_der(),
                key.to_public_key().to_public_key_der().unwrap().as_bytes()
            );
            assert_eq!(k.supported_schemes().len(), 6);
            for scheme in k.supported_schemes() {
                let sig = k.sign_message(scheme, b"tls transcript").unwrap();
                assert_eq!(sig.len(), 256, "{scheme}");
                assert!(
                    verify(k.public_key_der(), scheme, b"tls transcript", &sig),
                    "{name}: {scheme} does not verify"
                );
                assert!(!verify(k.public_key_der(), scheme, b"tls transcripT", &sig));
            }
            // PSS is randomised, PKCS#1 v1.5 deterministic.
            let pss = SignScheme::RsaPss(HashAlg::Sha256);
            assert_ne!(
                k.sign_message(pss, b"m").unwrap(),
                k.sign_message(pss, b"m").unwrap()
            );
            let v15 = SignScheme::RsaPkcs1(HashAlg::Sha384);
            assert_eq!(
                k.sign_message(v15, b"m").unwrap(),
                k.sign_message(v15, b"m").unwrap()
            );
            // An RSA key makes no ECDSA signature; the digest length is checked.
            assert!(k
                .sign_digest(SignScheme::Ecdsa(HashAlg::Sha256), &[0; 32])
                .is_err());
            let err = k
                .sign_digest(SignScheme::RsaPss(HashAlg::Sha512), &[0; 32])
                .unwrap_err();
            assert!(err.to_string().contains("expected 64"), "{err}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ec_pkcs8_and_sec1_files_with_and_without_parameters() {
        let k256 = p256::SecretKey::try_generate().unwrap();
        let k384 = p384::SecretKey::try_generate().unwrap();
        let cases = [
            (
                pem("EC PRIVATE KEY", k256.to_sec1_der().unwrap().as_slice()),
                KeyAlgorithm::EcdsaP256,
                k256.public_key().to_public_key_der().unwrap(),
            ),
            (
                pem("EC PRIVATE KEY", k384.to_sec1_der().unwrap().as_slice()),
                KeyAlgorithm::EcdsaP384,
                k384.public_key().to_public_key_der().unwrap(),
            ),
        ];
        for (sec1, alg, spki) in cases {
            let (format, secret) = parse(&sec1).unwrap();
            assert_eq!((format, secret.algorithm()), (KeyFormat::Sec1, alg));
            assert_eq!(
                secret.public_key_der(Path::new("/k")).unwrap(),
                spki.as_bytes()
            );
            // What `openssl ecparam -genkey` writes: the curve block first.
            let oid = if alg == KeyAlgorithm::EcdsaP256 {
                OID_P256
            } else {
                OID_P384
            };
            use der::Encode as _;
            let with_params = pem("EC PARAMETERS", &oid.to_der().unwrap()) + &sec1;
            let (format, secret) = parse(&with_params).unwrap();
            assert_eq!((format, secret.algorithm()), (KeyFormat::Sec1, alg));
        }
        // PKCS#8 EC, as keygen writes it.
        let text = k384.to_pkcs8_pem(LineEnding::LF).unwrap();
        let (format, secret) = parse(&text).unwrap();
        assert_eq!(
            (format, secret.algorithm()),
            (KeyFormat::Pkcs8, KeyAlgorithm::EcdsaP384)
        );
        // CRLF line ends and text around the block (openssl "Bag Attributes").
        let crlf = format!("Bag Attributes\r\n{}", text.replace('\n', "\r\n"));
        assert_eq!(parse(&crlf).unwrap().0, KeyFormat::Pkcs8);
    }

    #[test]
    fn encrypted_keys_are_refused_in_every_form() {
        let body = "MIIBAAAA\n";
        for text in [
            format!("-----BEGIN ENCRYPTED PRIVATE KEY-----\n{body}-----END ENCRYPTED PRIVATE KEY-----\n"),
            format!("-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,0123456789ABCDEF0123456789ABCDEF\n\n{body}-----END RSA PRIVATE KEY-----\n"),
            format!("-----BEGIN EC PARAMETERS-----\nBgUrgQQAIg==\n-----END EC PARAMETERS-----\n-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF\n\n{body}-----END EC PRIVATE KEY-----\n"),
        ] {
            let err = parse(&text).unwrap_err();
            assert!(
                err.starts_with("/etc/dps-agent/bootstrap/device.key: encrypted keys are not supported; decrypt it or move it into the TPM/HSM"),
                "{err}"
            );
        }
    }

    #[test]
    fn clear_errors_for_files_that_are_not_usable_keys() {
        use rsa::pkcs1::EncodeRsaPrivateKey as _;
        let cases: Vec<(String, &str)> = vec![
            ("hello".into(), "not a PEM file"),
            (pem("CERTIFICATE", b"x"), "holds a certificate, not a private key; point the key setting (identity_key) at the private key file"),
            (pem("PUBLIC KEY", b"x"), "holds only a public key"),
            (pem("TSS2 PRIVATE KEY", b"x"), "is a TPM key file; name it tpm:/etc/dps-agent/bootstrap/device.key"),
            (pem("OPENSSH PRIVATE KEY", b"x"), "ssh-keygen -p -m PKCS8"),
            (pem("DSA PRIVATE KEY", b"x"), "DSA key, which is not supported"),
            (pem("PRIVATE KEY", b"junk"), "is not valid PKCS#8"),
            (pem("RSA PRIVATE KEY", b"junk"), "does not parse as a PKCS#1 RSA key"),
            (pem("EC PRIVATE KEY", b"junk"), "is not a valid SEC1 key"),
            ("-----BEGIN PRIVATE KEY-----\nMIIB\n".into(), "has no END line"),
            ("-----BEGIN PRIVATE KEY-----\n%%%%\n-----END PRIVATE KEY-----\n".into(), "not valid base64"),
            ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n".into(), "ends with END RSA PRIVATE KEY"),
            (
                pem("PRIVATE KEY", p256::SecretKey::try_generate().unwrap().to_pkcs8_der().unwrap().as_bytes()).repeat(2),
                "holds 2 private keys",
            ),
            (pem("PRIVATE KEY", &ed25519_pkcs8()), "holds an Ed25519 key, which is not supported; use an RSA key of 2048 to 4096 bits or an EC P-256/P-384 key"),
            (pem("EC PRIVATE KEY", &sec1_on("1.3.132.0.10")), "on secp256k1, which is not supported"),
            (pem("EC PRIVATE KEY", &sec1_on("1.3.132.0.35")), "on P-521 (secp521r1), which is not supported"),
        ];
        for (text, want) in cases {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(want), "want {want:?} in: {err}");
            assert!(
                err.starts_with("/etc/dps-agent/bootstrap/device.key: "),
                "{err}"
            );
        }
        // A binary (DER) file.
        let err = parse_private_key(Path::new("/k.der"), &[0x30, 0x82, 0xff, 0xfe])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("is a binary file, not PEM"), "{err}");
        // RSA keys outside 2048–4096 bits are refused by size.
        let mut rng = rsa::rand_core::UnwrapErr(crypto_rng());
        let small = rsa::RsaPrivateKey::new(&mut rng, 1024).unwrap();
        let err = parse(&pem(
            "RSA PRIVATE KEY",
            small.to_pkcs1_der().unwrap().as_bytes(),
        ))
        .unwrap_err();
        assert!(err.contains("an RSA-1024 key is too weak"), "{err}");
    }

    #[test]
    fn a_key_file_with_its_certificate_is_read() {
        // Some tools write the certificate and the key into one file.
        let k = p256::SecretKey::try_generate().unwrap();
        let text = pem("CERTIFICATE", b"not parsed") + &k.to_pkcs8_pem(LineEnding::LF).unwrap();
        let (format, secret) = parse(&text).unwrap();
        assert_eq!(format, KeyFormat::Pkcs8);
        assert_eq!(secret.algorithm(), KeyAlgorithm::EcdsaP256);
    }

    #[test]
    fn a_key_file_other_users_can_read_or_write_is_refused() {
        let dir = tmpdir();
        let store = FileKeyStore::new(&dir);
        let uri = store.generate("op-mode", KeyAlgorithm::EcdsaP256).unwrap();
        let path = file_path(&uri).unwrap();
        for mode in [0o640, 0o644, 0o604, 0o620, 0o602, 0o666] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = store.open(&uri).err().unwrap();
            assert!(
                matches!(err, KeyError::Exposed { mode: m, .. } if m == mode),
                "{err}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&format!("mode {mode:04o}"))
                    && text.contains(&format!("chmod 600 {}", path.display())),
                "{text}"
            );
        }
        for mode in [0o600, 0o400] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            store.open(&uri).unwrap();
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_new_key_never_replaces_an_existing_one() {
        let dir = tmpdir();
        let store = FileKeyStore::new(&dir);
        let first = store.generate("op-same", KeyAlgorithm::EcdsaP256).unwrap();
        let before = fs::read(file_path(&first).unwrap()).unwrap();
        let err = store
            .generate("op-same", KeyAlgorithm::EcdsaP256)
            .unwrap_err();
        assert!(err.to_string().contains("make a new key file"), "{err}");
        assert_eq!(fs::read(file_path(&first).unwrap()).unwrap(), before);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_is_not_found() {
        let dir = tmpdir();
        let store = FileKeyStore::new(&dir);
        let err = store
            .open(&KeyUri::file(&dir.join("missing.key")))
            .err()
            .unwrap();
        assert!(matches!(err, KeyError::NotFound { .. }));
    }
}
