//! Private keys by reference. Owns the [`KeyStore`] trait, the [`Key`] handle and
//! key URIs; the backends (`file` here, TPM and PKCS#11 beside it) implement them.
//!
//! Callers never see key material: they name a key by URI, ask for its public key
//! (SubjectPublicKeyInfo DER) and ask it to sign a digest. A backend that cannot do
//! something returns [`KeyError::Unsupported`]; nothing here panics on bad input.

pub mod file;
pub mod pkcs11;
pub mod tpm;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::Digest as _;

/// What a key is. The agent generates and uses ECDSA keys ([`KeyAlgorithm::ALL`]);
/// RSA keys are only ever opened, as bootstrap keys that came from elsewhere
/// (an openssl-made `device.key`, an RSA key in a secure element).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum KeyAlgorithm {
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    #[serde(rename = "ecdsa-p384")]
    EcdsaP384,
    /// An RSA key of `bits` modulus bits (bootstrap keys only).
    #[serde(rename = "rsa")]
    Rsa { bits: u16 },
}

impl KeyAlgorithm {
    /// Every algorithm the agent can generate (and operational keys may use),
    /// in the order shown to users.
    pub const ALL: [KeyAlgorithm; 2] = [KeyAlgorithm::EcdsaP384, KeyAlgorithm::EcdsaP256];

    /// RSA modulus sizes accepted for bootstrap keys.
    pub const RSA_BITS: std::ops::RangeInclusive<u16> = 2048..=4096;

    /// The name used in the config file (`operational.key_algorithm`); RSA keys
    /// are named `rsa-BITS` for the usual sizes.
    pub fn name(self) -> &'static str {
        match self {
            KeyAlgorithm::EcdsaP256 => "ecdsa-p256",
            KeyAlgorithm::EcdsaP384 => "ecdsa-p384",
            KeyAlgorithm::Rsa { bits: 2048 } => "rsa-2048",
            KeyAlgorithm::Rsa { bits: 3072 } => "rsa-3072",
            KeyAlgorithm::Rsa { bits: 4096 } => "rsa-4096",
            KeyAlgorithm::Rsa { .. } => "rsa",
        }
    }

    /// Whether this is an RSA key.
    pub fn is_rsa(self) -> bool {
        matches!(self, KeyAlgorithm::Rsa { .. })
    }

    /// The schemes a key of this algorithm can sign with, preferred first. An
    /// ECDSA curve fixes its hash; RSA keys sign RSA-PSS (preferred; the only
    /// RSA form TLS 1.3 allows) and PKCS#1 v1.5 with SHA-256/384/512.
    pub fn schemes(self) -> Vec<SignScheme> {
        match self {
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => vec![self.default_scheme()],
            KeyAlgorithm::Rsa { .. } => {
                let hashes = [HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512];
                let pss = hashes.into_iter().map(SignScheme::RsaPss);
                pss.chain(hashes.into_iter().map(SignScheme::RsaPkcs1))
                    .collect()
            }
        }
    }

    /// Parses a config name such as `ecdsa-p384`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The signature scheme used with this key for CSRs
    /// (the curve fixes the hash: P-256 with SHA-256, P-384 with SHA-384;
    /// RSA: sha256WithRSAEncryption, which every CA accepts).
    pub fn default_scheme(self) -> SignScheme {
        match self {
            KeyAlgorithm::EcdsaP256 => SignScheme::Ecdsa(HashAlg::Sha256),
            KeyAlgorithm::EcdsaP384 => SignScheme::Ecdsa(HashAlg::Sha384),
            KeyAlgorithm::Rsa { .. } => SignScheme::RsaPkcs1(HashAlg::Sha256),
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyAlgorithm::Rsa { bits } => write!(f, "rsa-{bits}"),
            _ => f.write_str(self.name()),
        }
    }
}

/// Hash functions used before signing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlg {
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    /// Hashes `data`.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            HashAlg::Sha256 => sha2::Sha256::digest(data).to_vec(),
            HashAlg::Sha384 => sha2::Sha384::digest(data).to_vec(),
            HashAlg::Sha512 => sha2::Sha512::digest(data).to_vec(),
        }
    }

    /// Length of the digest in bytes.
    pub fn output_len(self) -> usize {
        match self {
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The DER `DigestInfo` of a digest (RFC 8017 §9.2): what an RSA PKCS#1
    /// v1.5 signature covers, and what a raw CKM_RSA_PKCS signer is given.
    pub fn digest_info(self, digest: &[u8]) -> Vec<u8> {
        // SEQUENCE { SEQUENCE { OID, NULL }, OCTET STRING } up to the digest.
        let prefix: &[u8] = match self {
            HashAlg::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
            HashAlg::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x02, 0x05, 0x00, 0x04, 0x30,
            ],
            HashAlg::Sha512 => &[
                0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x03, 0x05, 0x00, 0x04, 0x40,
            ],
        };
        [prefix, digest].concat()
    }
}

/// How a digest is turned into a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignScheme {
    /// ECDSA; the signature is returned DER-encoded (`Ecdsa-Sig-Value`).
    Ecdsa(HashAlg),
    /// RSASSA-PKCS1-v1_5 (RFC 8017 §8.2) over a DigestInfo of the digest; the
    /// signature is the modulus-sized big-endian integer.
    RsaPkcs1(HashAlg),
    /// RSASSA-PSS (RFC 8017 §8.1) with MGF1 over the same hash and a salt as
    /// long as the digest (what TLS requires).
    RsaPss(HashAlg),
}

impl SignScheme {
    pub fn hash(self) -> HashAlg {
        match self {
            SignScheme::Ecdsa(h) | SignScheme::RsaPkcs1(h) | SignScheme::RsaPss(h) => h,
        }
    }

    /// Whether this scheme needs an RSA key.
    pub fn is_rsa(self) -> bool {
        matches!(self, SignScheme::RsaPkcs1(_) | SignScheme::RsaPss(_))
    }
}

impl fmt::Display for SignScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, hash) = match self {
            SignScheme::Ecdsa(h) => ("ECDSA", h),
            SignScheme::RsaPkcs1(h) => ("RSA PKCS#1 v1.5", h),
            SignScheme::RsaPss(h) => ("RSA-PSS", h),
        };
        let bits = hash.output_len() * 8;
        write!(f, "{name} with SHA-{bits}")
    }
}

/// The backends a key can live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Tpm,
    Pkcs11,
    File,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Tpm, Backend::Pkcs11, Backend::File];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Tpm => "tpm",
            Backend::Pkcs11 => "pkcs11",
            Backend::File => "file",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A key's name: `file:/path`, `tpm:/path/key.tss2.pem`, `tpm:handle=0x81000101` or an
/// RFC 7512 `pkcs11:` URI. Kept as the string the user or the store wrote, so it
/// round-trips exactly. It never contains secrets: PIN attributes are stripped
/// before a URI is shown (see [`KeyUri::redacted`]).
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyUri(String);

impl KeyUri {
    /// Checks the scheme and makes a URI. File paths must be absolute.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let bad = |reason: &str| KeyError::BadUri {
            uri: redact(s),
            reason: reason.to_string(),
        };
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| bad("it has no scheme; write file:/path, tpm:… or pkcs11:…"))?;
        match scheme {
            "file" => {
                if !rest.starts_with('/') {
                    return Err(bad("file: URIs need an absolute path, e.g. file:/etc/dps-agent/bootstrap/device.key"));
                }
            }
            "tpm" => {
                if !(rest.starts_with('/') || rest.starts_with("handle=")) {
                    return Err(bad(
                        "tpm: URIs are tpm:/absolute/path/key.tss2.pem or tpm:handle=0x81000101",
                    ));
                }
            }
            "pkcs11" => {}
            _ => return Err(bad("unknown scheme; use file:, tpm: or pkcs11:")),
        }
        Ok(KeyUri(s.to_string()))
    }

    /// A `file:` URI for a path.
    pub fn file(path: &Path) -> Self {
        KeyUri(format!("file:{}", path.display()))
    }

    /// The backend this URI belongs to.
    pub fn backend(&self) -> Backend {
        match self.0.split_once(':').map(|(s, _)| s) {
            Some("tpm") => Backend::Tpm,
            Some("pkcs11") => Backend::Pkcs11,
            _ => Backend::File,
        }
    }

    /// The path of a `file:` (or `tpm:/…`) URI.
    pub fn path(&self) -> Option<PathBuf> {
        let rest = self.0.split_once(':')?.1;
        rest.starts_with('/').then(|| PathBuf::from(rest))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URI with any PIN attribute removed, safe to log or show.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

/// Replaces the value of every `pin-value=` attribute (RFC 7512) in a URI-ish
/// string, wherever it appears. A value runs to the next `&` in the query, and
/// to the next `;` or the `?` in the path, as RFC 7512 splits them; never less:
/// a query value may hold `?` and `/`, and a URI the parser refuses (shown
/// redacted in its error) anything.
fn redact(s: &str) -> String {
    const ATTR: &str = "pin-value=";
    let query = s.find('?').unwrap_or(s.len());
    let mut out = String::with_capacity(s.len());
    let mut pos = 0;
    while let Some(i) = s[pos..].find(ATTR) {
        let value = pos + i + ATTR.len();
        out.push_str(&s[pos..value]);
        out.push_str("REDACTED");
        pos = if value > query {
            s[value..].find('&').map_or(s.len(), |end| value + end)
        } else {
            s[value..query].find(';').map_or(query, |end| value + end)
        };
    }
    out.push_str(&s[pos..]);
    out
}

impl TryFrom<String> for KeyUri {
    type Error = KeyError;
    fn try_from(s: String) -> Result<Self, KeyError> {
        KeyUri::parse(&s)
    }
}

impl From<KeyUri> for String {
    fn from(u: KeyUri) -> String {
        u.0
    }
}

impl fmt::Display for KeyUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for KeyUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyUri({})", self.redacted())
    }
}

/// A usable private key, living in some backend. Cheap to clone through `Arc`.
pub trait Key: Send + Sync {
    /// Where the key lives.
    fn uri(&self) -> &KeyUri;
    /// Its algorithm.
    fn algorithm(&self) -> KeyAlgorithm;
    /// Its public key as DER SubjectPublicKeyInfo.
    fn public_key_der(&self) -> &[u8];
    /// Signs a digest that the caller computed with `scheme.hash()`.
    fn sign_digest(&self, scheme: SignScheme, digest: &[u8]) -> Result<Vec<u8>, KeyError>;

    /// The schemes this key can sign with, preferred first. By default every
    /// scheme of its algorithm; a backend that lacks one (a token without
    /// CKM_RSA_PKCS_PSS) leaves it out.
    fn supported_schemes(&self) -> Vec<SignScheme> {
        self.algorithm().schemes()
    }

    /// Hashes `message` and signs it.
    fn sign_message(&self, scheme: SignScheme, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.sign_digest(scheme, &scheme.hash().digest(message))
    }
}

impl fmt::Debug for dyn Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}, {})", self.uri(), self.algorithm())
    }
}

/// A place that makes, opens and deletes keys. Backends: file (development and
/// tests), TPM, PKCS#11. Implementations are `Send + Sync`; a backend whose device
/// handle is not (the TPM context) keeps it on its own thread.
pub trait KeyStore: Send + Sync {
    /// The backend this store is.
    fn backend(&self) -> Backend;

    /// Makes a new key pair inside the backend. `name` is a short label chosen by
    /// the caller (letters, digits, `-`, `_`, `.`); the returned URI names the key
    /// from now on. The private key never leaves the backend.
    fn generate(&self, name: &str, algorithm: KeyAlgorithm) -> Result<KeyUri, KeyError>;

    /// Opens a key by URI (one this store made, or one made elsewhere).
    fn open(&self, uri: &KeyUri) -> Result<Arc<dyn Key>, KeyError>;

    /// Marks a key made by [`KeyStore::generate`] as in use, just before the
    /// identity that uses it is committed. Returns the key's URI from then on
    /// (a backend may rename it, e.g. drop a "pending" label). The default keeps
    /// the key as it is.
    fn commit(&self, uri: &KeyUri) -> Result<KeyUri, KeyError> {
        Ok(uri.clone())
    }

    /// Deletes a key this store made. Deleting a key that is already gone is not
    /// an error.
    fn delete(&self, uri: &KeyUri) -> Result<(), KeyError>;

    /// The keys this store made with [`KeyStore::generate`] (so that leftovers of
    /// an interrupted renewal can be found and removed).
    fn list(&self) -> Result<Vec<KeyUri>, KeyError>;
}

/// Errors from key backends. Messages name the key and, where one exists, the fix.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key URI {uri:?} is not valid: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("key {uri} does not exist{hint}")]
    NotFound { uri: String, hint: String },
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("{p}: other users may read or change this private key (mode {mode:04o}), so it is refused: run chmod 600 {p} and make the dps-agent user its owner", p = path.display())]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{what} is not supported by the {backend} key backend{hint}")]
    Unsupported {
        backend: Backend,
        what: String,
        hint: String,
    },
    #[error("key name {0:?} is not valid: use letters, digits, '-', '_' and '.'")]
    BadName(String),
    #[error("signing with {uri} failed: {reason}")]
    Sign { uri: String, reason: String },
    #[error(transparent)]
    Pkcs11(Box<pkcs11::Pkcs11Error>),
    #[error(transparent)]
    Tpm(#[from] tpm::TpmError),
}

/// Checks a key name given to [`KeyStore::generate`].
pub fn check_key_name(name: &str) -> Result<(), KeyError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadName(name.to_string()))
    }
}

/// Converts a raw `r || s` ECDSA signature (as TPMs and PKCS#11 tokens return it)
/// into DER.
pub fn ecdsa_raw_to_der(algorithm: KeyAlgorithm, raw: &[u8]) -> Option<Vec<u8>> {
    match algorithm {
        KeyAlgorithm::EcdsaP256 => p256::ecdsa::Signature::from_slice(raw)
            .ok()
            .map(|s| s.to_der().as_bytes().to_vec()),
        KeyAlgorithm::EcdsaP384 => p384::ecdsa::Signature::from_slice(raw)
            .ok()
            .map(|s| s.to_der().as_bytes().to_vec()),
        KeyAlgorithm::Rsa { .. } => None,
    }
}

/// The DER SubjectPublicKeyInfo (rsaEncryption) of an RSA public key given as
/// big-endian modulus and public exponent (as PKCS#11 and TPMs return them),
/// and its size in bits. Refuses sizes outside [`KeyAlgorithm::RSA_BITS`].
pub fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Result<(KeyAlgorithm, Vec<u8>), String> {
    use rsa::pkcs8::EncodePublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    let n = rsa::BoxedUint::from_be_slice_vartime(modulus);
    let e = rsa::BoxedUint::from_be_slice_vartime(exponent);
    let key = rsa::RsaPublicKey::new(n, e).map_err(|e| format!("not a usable RSA key: {e}"))?;
    let bits = key.n().bits();
    let algorithm = rsa_algorithm(bits)?;
    let der = key
        .to_public_key_der()
        .map_err(|e| format!("cannot encode the RSA public key: {e}"))?;
    Ok((algorithm, der.as_bytes().to_vec()))
}

/// The algorithm of an RSA key of `bits` modulus bits, if the size is accepted.
pub fn rsa_algorithm(bits: u32) -> Result<KeyAlgorithm, String> {
    match u16::try_from(bits) {
        Ok(b) if KeyAlgorithm::RSA_BITS.contains(&b) => Ok(KeyAlgorithm::Rsa { bits: b }),
        _ if bits < u32::from(*KeyAlgorithm::RSA_BITS.start()) => Err(format!(
            "an RSA-{bits} key is too weak; use an RSA key of 2048 to 4096 bits or an EC P-256/P-384 key"
        )),
        _ => Err(format!(
            "an RSA-{bits} key is larger than dps-agent accepts; use an RSA key of 2048 to 4096 bits or an EC P-256/P-384 key"
        )),
    }
}

/// What the backends need from the configuration.
#[derive(Debug, Clone)]
pub struct KeySettings {
    /// Where the file backend writes generated keys.
    pub key_dir: PathBuf,
    /// TPM access (TCTI string), e.g. `device:/dev/tpmrm0`.
    pub tcti: String,
    /// PKCS#11 module, token and PIN.
    pub pkcs11: crate::config::Pkcs11Config,
}

impl KeySettings {
    pub fn from_config(c: &crate::config::Config) -> Self {
        KeySettings {
            key_dir: c.state.key_dir(),
            tcti: c.tpm.tcti.clone(),
            pkcs11: c.pkcs11.clone(),
        }
    }
}

/// The key backends of this process. Each hardware backend is opened once, on
/// first use, and shared: the TPM has one owner thread, a PKCS#11 module one
/// initialisation per process.
pub struct Keys {
    settings: KeySettings,
    file: Arc<file::FileKeyStore>,
    /// PKCS#11 tokens, each opened on first use (see [`pkcs11::Pkcs11Stores`]).
    pkcs11: pkcs11::Pkcs11Stores,
    /// Connected on first use (see [`tpm::SharedTpm`]).
    tpm: tpm::SharedTpm,
}

impl Keys {
    pub fn new(settings: KeySettings) -> Keys {
        Keys {
            file: Arc::new(file::FileKeyStore::new(&settings.key_dir)),
            pkcs11: pkcs11::Pkcs11Stores::new(settings.pkcs11.clone()),
            tpm: tpm::SharedTpm::new(&settings.tcti, &settings.key_dir),
            settings,
        }
    }

    pub fn settings(&self) -> &KeySettings {
        &self.settings
    }

    /// The PKCS#11 tokens (for a DPS symmetric key kept in one).
    pub fn pkcs11(&self) -> &pkcs11::Pkcs11Stores {
        &self.pkcs11
    }

    /// The TPM store itself (for DPS TPM attestation), connecting on first use.
    pub fn tpm(&self) -> Result<Arc<tpm::TpmKeyStore>, KeyError> {
        self.tpm.get()
    }

    /// The store that makes operational keys in `backend`.
    pub fn store(&self, backend: Backend) -> Result<Arc<dyn KeyStore>, KeyError> {
        match backend {
            Backend::File => Ok(self.file.clone()),
            Backend::Pkcs11 => Ok(self.pkcs11.default_store()?),
            Backend::Tpm => Ok(self.tpm.get()?),
        }
    }

    /// Opens any key by URI, whatever its backend (a bootstrap key may live in
    /// a different backend than the operational keys).
    pub fn open(&self, uri: &KeyUri) -> Result<Arc<dyn Key>, KeyError> {
        match uri.backend() {
            Backend::File => self.file.open(uri),
            Backend::Pkcs11 => self.pkcs11.open(uri),
            Backend::Tpm => self.tpm.get()?.open(uri),
        }
    }

    /// Makes a key for onboarding (`dps-agent keygen`): `location` is the file
    /// to write for the file and TPM backends, the object label for PKCS#11.
    pub fn generate_at(
        &self,
        backend: Backend,
        location: &str,
        algorithm: KeyAlgorithm,
    ) -> Result<KeyUri, KeyError> {
        match backend {
            Backend::File => {
                let path = Path::new(location);
                let bad = |reason: &str| KeyError::BadUri {
                    uri: location.to_string(),
                    reason: reason.to_string(),
                };
                if !path.is_absolute() {
                    return Err(bad("give an absolute path"));
                }
                if path.exists() {
                    return Err(bad("the file exists; refusing to overwrite a key"));
                }
                let dir = path
                    .parent()
                    .ok_or_else(|| bad("the path has no directory"))?;
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".key"))
                    .ok_or_else(|| bad("the file name must end in .key"))?;
                file::FileKeyStore::new(dir).generate(name, algorithm)
            }
            Backend::Tpm => self
                .tpm
                .get()?
                .generate_file(Path::new(location), algorithm),
            Backend::Pkcs11 => self.pkcs11.generate_at(location, algorithm),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_schemes() {
        assert_eq!(
            KeyUri::parse("file:/a/b.key").unwrap().backend(),
            Backend::File
        );
        assert_eq!(
            KeyUri::parse("tpm:handle=0x81000101").unwrap().backend(),
            Backend::Tpm
        );
        assert_eq!(
            KeyUri::parse("pkcs11:token=t;object=o").unwrap().backend(),
            Backend::Pkcs11
        );
        assert!(KeyUri::parse("file:relative.key").is_err());
        assert!(KeyUri::parse("/no/scheme").is_err());
        assert!(KeyUri::parse("tpm:0x81").is_err());
        assert!(KeyUri::parse("gopher:x").is_err());
    }

    #[test]
    fn pins_never_shown() {
        let u = KeyUri::parse("pkcs11:token=t;object=o;pin-value=1234").unwrap();
        assert!(!u.to_string().contains("1234"));
        assert!(!format!("{u:?}").contains("1234"));
        let u = KeyUri::parse("pkcs11:token=t?pin-value=9876&module-name=x").unwrap();
        assert!(!u.redacted().contains("9876"));
        assert!(u.redacted().contains("module-name=x"));
        let e = KeyUri::parse("nope:pin-value=5555").unwrap_err();
        assert!(!e.to_string().contains("5555"));
        // Found by fuzzing (fuzz/fuzz_targets/pkcs11_uri.rs): the value ended at
        // the first ';', '&' or '?', so the rest of such a PIN was shown.
        for (uri, tail) in [
            ("pkcs11:token=t?pin-value=t1:tok;he-pin", "he-pin"),
            ("pkcs11:token=t?pin-value=12?34&module-name=x", "34"),
            ("pkcs11:token=t;pin-value=ab&cd?module-name=x", "cd"),
            ("pkcs11:x-pin-value=a?pin-value=12;34", "34"),
        ] {
            let u = KeyUri::parse(uri).unwrap();
            assert!(!u.redacted().contains(tail), "{}", u.redacted());
            assert!(!format!("{u:?}").contains(tail), "{u:?}");
        }
        let u = KeyUri::parse("pkcs11:token=t?pin-value=12?34&module-name=x").unwrap();
        assert_eq!(
            u.redacted(),
            "pkcs11:token=t?pin-value=REDACTED&module-name=x"
        );
    }

    #[test]
    fn key_names() {
        assert!(check_key_name("op-20261123-ab12").is_ok());
        assert!(check_key_name("../etc").is_err());
        assert!(check_key_name("").is_err());
        assert!(check_key_name("a/b").is_err());
    }

    #[test]
    fn raw_signature_conversion() {
        let mut raw = vec![0u8; 96];
        raw[47] = 1;
        raw[95] = 2;
        let der = ecdsa_raw_to_der(KeyAlgorithm::EcdsaP384, &raw).unwrap();
        assert_eq!(der, vec![0x30, 6, 2, 1, 1, 2, 1, 2]);
        assert!(ecdsa_raw_to_der(KeyAlgorithm::EcdsaP256, &raw).is_none());
        assert!(ecdsa_raw_to_der(KeyAlgorithm::Rsa { bits: 2048 }, &raw).is_none());
    }

    #[test]
    fn digest_info_is_the_der_of_rfc_8017() {
        use der::Encode as _;
        for (hash, oid) in [
            (HashAlg::Sha256, "2.16.840.1.101.3.4.2.1"),
            (HashAlg::Sha384, "2.16.840.1.101.3.4.2.2"),
            (HashAlg::Sha512, "2.16.840.1.101.3.4.2.3"),
        ] {
            let digest = hash.digest(b"m");
            #[derive(der::Sequence)]
            struct DigestInfo {
                algorithm: spki::AlgorithmIdentifierOwned,
                digest: der::asn1::OctetString,
            }
            let want = DigestInfo {
                algorithm: spki::AlgorithmIdentifierOwned {
                    oid: spki::ObjectIdentifier::new(oid).unwrap(),
                    parameters: Some(der::Any::null()),
                },
                digest: der::asn1::OctetString::new(digest.clone()).unwrap(),
            }
            .to_der()
            .unwrap();
            assert_eq!(hash.digest_info(&digest), want, "{hash:?}");
        }
    }

    #[test]
    fn rsa_public_keys_from_modulus_and_exponent() {
        use rsa::pkcs8::EncodePublicKey as _;
        use rsa::traits::PublicKeyParts as _;
        let mut rng = rsa::rand_core::UnwrapErr(p256::elliptic_curve::common::getrandom::SysRng);
        let k = rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap();
        let public = k.to_public_key();
        let (alg, spki) = rsa_spki(&public.n().to_be_bytes(), &public.e().to_be_bytes()).unwrap();
        assert_eq!(alg, KeyAlgorithm::Rsa { bits: 2048 });
        assert_eq!(spki, public.to_public_key_der().unwrap().as_bytes());
        // Leading zero bytes (as some tokens return them) change nothing.
        let mut n = vec![0u8];
        n.extend_from_slice(&public.n().to_be_bytes());
        assert_eq!(rsa_spki(&n, &[1, 0, 1]).unwrap().1, spki);
        assert!(rsa_algorithm(1024).unwrap_err().contains("too weak"));
        assert!(rsa_algorithm(8192).unwrap_err().contains("larger than"));
        assert_eq!(rsa_algorithm(3072), Ok(KeyAlgorithm::Rsa { bits: 3072 }));
        assert_eq!(KeyAlgorithm::Rsa { bits: 3072 }.name(), "rsa-3072");
        assert_eq!(
            KeyAlgorithm::from_name("rsa-2048"),
            None,
            "never configurable"
        );
    }
}
