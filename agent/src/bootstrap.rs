//! The bootstrap (onboarding) credential: the X.509 certificate the customer's
//! CA issued and its key, as the Azure setup guides make them (a leaf alone,
//! leaf + intermediates, or a full chain up to the root; RSA or EC keys).
//!
//! [`check`] looks at everything an installer can get wrong and returns every
//! problem found, each with a one-line fix: the certificate matches its key, the
//! leaf's CN is the registration id, the registration id is one DPS accepts,
//! clientAuth is allowed, the dates, and that the chain links up. It reads files
//! and keys but never touches the network; `check-config`, `check` and start-up
//! all run it. [`load`] runs it and builds the TLS identity presented to DPS:
//! leaf + intermediates, never the self-signed root.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use der::{Decode as _, Encode as _};
use x509_cert::Certificate;

use crate::chain::{self, ChainError, Expectations};
use crate::clock::UnixTime;
use crate::config::{self, Attestation, Config};
use crate::keys::{Key, KeyError, KeyUri, Keys};
use crate::tls::ClientIdentity;

/// What is checked about the bootstrap credential, in the order reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Check {
    /// The registration id is one DPS accepts.
    RegistrationId,
    /// The certificate file can be read and holds X.509 certificates in PEM.
    Certificate,
    /// The key can be opened: it exists, is readable, unencrypted, of a kind we use.
    Key,
    /// The certificate is the key's: the leaf holds the key's public key.
    KeyMatch,
    /// The leaf's CN equals the registration id (DPS requires it).
    CommonName,
    /// The leaf may authenticate a TLS client (extendedKeyUsage clientAuth).
    ClientAuth,
    /// The leaf and its CAs are within their dates.
    Validity,
    /// The chain links up: each certificate is signed by the next, which is a CA.
    Chain,
}

impl Check {
    /// Every check, in the order reported.
    pub const ALL: [Check; 8] = [
        Check::RegistrationId,
        Check::Certificate,
        Check::Key,
        Check::KeyMatch,
        Check::CommonName,
        Check::ClientAuth,
        Check::Validity,
        Check::Chain,
    ];

    /// What the check makes sure of, as a short phrase.
    pub fn describe(self) -> &'static str {
        match self {
            Check::RegistrationId => "the registration id is valid for DPS",
            Check::Certificate => "the certificate file is readable PEM",
            Check::Key => "the key can be used",
            Check::KeyMatch => "the certificate matches its key",
            Check::CommonName => "the certificate's CN is the registration id",
            Check::ClientAuth => "the certificate allows TLS client authentication",
            Check::Validity => "the certificates are within their dates",
            Check::Chain => "the chain links up",
        }
    }
}

/// One problem with the bootstrap credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub check: Check,
    /// What is wrong, naming the file or the setting.
    pub problem: String,
    /// What to do, in one line.
    pub fix: String,
}

impl Finding {
    fn new(check: Check, problem: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            check,
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; {}", self.problem, self.fix)
    }
}

/// Problems with the bootstrap credential, each with its fix.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("bootstrap certificate {}: cannot read: {source}; check [dps.attestation] identity_cert", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bootstrap certificate {}: {reason}; it must be PEM (BEGIN CERTIFICATE), leaf first", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("bootstrap key: {0}; check [dps.attestation] identity_key")]
    Key(#[from] KeyError),
    #[error("bootstrap credential: {}", join(findings))]
    Problems {
        path: PathBuf,
        findings: Vec<Finding>,
    },
    #[error("bootstrap certificate {}: {problem}", path.display())]
    Check { path: PathBuf, problem: ChainError },
}

fn join(findings: &[Finding]) -> String {
    match findings {
        [one] => one.to_string(),
        many => many
            .iter()
            .enumerate()
            .map(|(i, f)| format!("({}) {f}", i + 1))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// A checked bootstrap credential.
pub struct Bootstrap {
    pub identity: ClientIdentity,
    pub not_after: UnixTime,
    /// The leaf's subject and issuer, one line each.
    pub subject: String,
    pub issuer: String,
    /// Certificates on the leaf's path in the file (leaf first), and how many
    /// of them are presented in the TLS handshake (all but a self-signed root).
    pub chain_len: usize,
    pub presented: usize,
    /// Certificates in the file that are not on the leaf's path.
    pub ignored: usize,
}

/// Checks `cert_path` against `key` and the registration id, then builds the
/// TLS identity. Every problem found is in the error.
pub fn load(
    cert_path: &Path,
    key: Arc<dyn Key>,
    registration_id: &str,
    now: UnixTime,
    max_skew_secs: u64,
) -> Result<Bootstrap, BootstrapError> {
    let findings = check(
        cert_path,
        Some(key.as_ref()),
        registration_id,
        now,
        max_skew_secs,
    );
    if !findings.is_empty() {
        return Err(BootstrapError::Problems {
            path: cert_path.to_path_buf(),
            findings,
        });
    }
    // The checks passed, so this reads and verifies (the file is read again:
    // it may have changed in between, and then the error says so).
    let text = std::fs::read_to_string(cert_path).map_err(|source| BootstrapError::Read {
        path: cert_path.to_path_buf(),
        source,
    })?;
    let certs = chain::certs_from_pem(&text).map_err(|reason| BootstrapError::Format {
        path: cert_path.to_path_buf(),
        reason,
    })?;
    let spki = key.public_key_der().to_vec();
    let want = Expectations {
        leaf_spki: &spki,
        common_name: Some(registration_id),
        now,
        max_skew_secs,
        require_issuer: false,
    };
    let verified = chain::verify(&certs, &want).map_err(|problem| BootstrapError::Check {
        path: cert_path.to_path_buf(),
        problem,
    })?;
    Ok(Bootstrap {
        presented: verified.presented().len(),
        chain_len: verified.certs.len(),
        ignored: verified.ignored,
        identity: ClientIdentity {
            chain: verified.presented().to_vec(),
            key,
        },
        not_after: verified.not_after,
        subject: verified.subject,
        issuer: verified.issuer,
    })
}

/// Runs [`check`] on the credential `config` names, opening its key with `keys`.
/// Attestation methods other than X.509 have no bootstrap certificate: no findings.
pub fn check_config(config: &Config, keys: &Keys, now: UnixTime) -> Vec<Finding> {
    let Attestation::X509 {
        identity_cert,
        identity_key,
    } = &config.dps.attestation
    else {
        return Vec::new();
    };
    let key = keys.open(identity_key);
    let mut findings = check(
        identity_cert,
        key.as_ref().ok().map(|k| k.as_ref()),
        &config.dps.registration_id,
        now,
        config.operational.max_clock_skew.as_secs(),
    );
    if let Err(e) = &key {
        findings.push(key_finding(identity_key, e));
        findings.sort_by_key(|f| Check::ALL.iter().position(|c| *c == f.check));
    }
    findings
}

/// Every problem of the certificate at `cert_path` for `key` (when it could be
/// opened) and `registration_id` at `now`. Empty when the credential is usable.
pub fn check(
    cert_path: &Path,
    key: Option<&dyn Key>,
    registration_id: &str,
    now: UnixTime,
    max_skew_secs: u64,
) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Err(why) = config::check_registration_id(registration_id) {
        out.push(Finding::new(
            Check::RegistrationId,
            format!("[dps] registration_id {registration_id:?} {why}"),
            "use at most 128 characters of a-z 0-9 - . _ :, lowercase, starting and ending with a letter or digit (and the certificate's CN must be the same)",
        ));
    }
    let certs = match read_certs(cert_path) {
        Ok(c) => c,
        Err(f) => {
            out.push(f);
            return out;
        }
    };
    let parsed: Vec<Certificate> = certs
        .iter()
        .filter_map(|der| Certificate::from_der(der).ok())
        .collect();

    // The leaf: the certificate holding the key; without a key, the first.
    let leaf_index = match key {
        Some(key) => {
            let found = parsed
                .iter()
                .position(|c| spki_der(c).as_deref() == Some(key.public_key_der()));
            if found.is_none() {
                let cn = chain::common_name(&parsed[0])
                    .map_or_else(|| "no CN".to_string(), |cn| format!("CN={cn}"));
                out.push(Finding::new(
                    Check::KeyMatch,
                    format!(
                        "{}: the certificate ({cn}, {}) was made for another key than {} ({}): is the key from another device?",
                        cert_path.display(),
                        spki_summary(spki_der(&parsed[0]).as_deref().unwrap_or_default()),
                        key.uri(),
                        spki_summary(key.public_key_der()),
                    ),
                    "point [dps.attestation] identity_key at the key this certificate was made for (or identity_cert at this key's certificate)",
                ));
            }
            found.unwrap_or(0)
        }
        None => 0,
    };
    let leaf = &parsed[leaf_index];

    let cn = chain::common_name(leaf);
    if cn.as_deref() != Some(registration_id) {
        let problem = match &cn {
            Some(cn) => format!(
                "{}: the certificate's CN is {cn:?} but [dps] registration_id is {registration_id:?}",
                cert_path.display()
            ),
            None => format!("{}: the certificate has no CN", cert_path.display()),
        };
        let fix = match &cn {
            Some(cn) if config::check_registration_id(cn).is_ok() => format!(
                "DPS requires them to be equal: set registration_id = {cn:?}, or use this device's own certificate"
            ),
            Some(_) => "DPS requires the CN to be the registration id, and this CN is not a valid one (lowercase a-z 0-9 - . _ :): have the CA issue a certificate with subject CN=<registration id>".into(),
            None => "have the CA issue the certificate with subject CN=<registration id>".into(),
        };
        out.push(Finding::new(Check::CommonName, problem, fix));
    }

    if let Err(e) = chain::check_client_auth(leaf) {
        out.push(Finding::new(
            Check::ClientAuth,
            format!("{}: {e}", cert_path.display()),
            "have the CA issue it with extendedKeyUsage = clientAuth and keyUsage digitalSignature (the guide's usr_cert extensions)",
        ));
    }

    let path = match chain::issuer_path(&parsed, leaf_index, false) {
        Ok((path, _root)) => path,
        Err(e) => {
            let fix = match &e {
                ChainError::NotCa { .. } => "the certificates after the device's must be the CAs that issued it (basicConstraints CA:TRUE); use the chain file your CA gave you",
                ChainError::UnsupportedAlgorithm { .. } => "have the CA sign with RSA (SHA-256/384/512) or ECDSA P-256/P-384",
                _ => "the file must hold the device certificate, then the CAs that issued it, in order (the guide's device-full-chain.pem), or the device certificate alone",
            };
            out.push(Finding::new(
                Check::Chain,
                format!("{}: {e}", cert_path.display()),
                fix,
            ));
            vec![leaf_index]
        }
    };
    for &i in &path {
        if let Err(e) = chain::check_dates(&parsed[i], now, max_skew_secs) {
            let fix = match (&e, i == leaf_index) {
                (ChainError::Expired { .. }, true) => {
                    "ask your CA for a new bootstrap certificate for this key"
                }
                (ChainError::Expired { .. }, false) => {
                    "ask your CA for the current CA certificates and a device certificate issued under them"
                }
                _ => "set the clock (timedatectl, NTP), or wait until the certificate is valid",
            };
            out.push(Finding::new(
                Check::Validity,
                format!("{}: {e}", cert_path.display()),
                fix,
            ));
        }
    }
    out
}

/// The certificates of the file, or the finding that says why there are none.
fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, Finding> {
    let fix = "point [dps.attestation] identity_cert at the device certificate in PEM (the guide's device-full-chain.pem or device.pem)";
    let bad = |problem: String| Finding::new(Check::Certificate, problem, fix);
    let text = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            bad(format!("{}: the file does not exist", path.display()))
        } else {
            Finding::new(
                Check::Certificate,
                format!("{}: cannot read: {e}", path.display()),
                "make it readable by the user dps-agent runs as",
            )
        }
    })?;
    let Ok(text) = String::from_utf8(text) else {
        return Err(Finding::new(
            Check::Certificate,
            format!("{}: is binary (DER?), not PEM", path.display()),
            "convert it: openssl x509 -inform DER -in CERT -out CERT.pem",
        ));
    };
    let certs = chain::certs_from_pem(&text)
        .map_err(|reason| bad(format!("{}: {reason}", path.display())))?;
    if certs.is_empty() {
        return Err(if text.contains("PRIVATE KEY-----") {
            Finding::new(
                Check::Certificate,
                format!("{}: holds a private key, not a certificate", path.display()),
                "identity_cert and identity_key are swapped: identity_cert is the certificate (device-full-chain.pem), identity_key the key (device.key)",
            )
        } else {
            bad(format!("{}: holds no CERTIFICATE block", path.display()))
        });
    }
    for (i, der) in certs.iter().enumerate() {
        if let Err(e) = Certificate::from_der(der) {
            return Err(bad(format!(
                "{}: certificate {} is not valid X.509 ({e}); the file is damaged",
                path.display(),
                i + 1
            )));
        }
    }
    Ok(certs)
}

/// The finding for a key that cannot be opened. File-backend reasons read
/// "problem; fix"; the fix is split off so that it stands on its own line.
/// `uri` is shown through its `Display`, which redacts a `pin-value`.
fn key_finding(uri: &KeyUri, e: &KeyError) -> Finding {
    match e {
        KeyError::Format { path, reason } => {
            let (problem, fix) = reason.split_once("; ").unwrap_or((
                reason.as_str(),
                "point [dps.attestation] identity_key at the device's private key",
            ));
            Finding::new(Check::Key, format!("{}: {problem}", path.display()), fix)
        }
        KeyError::NotFound { .. } => Finding::new(
            Check::Key,
            e.to_string(),
            "point [dps.attestation] identity_key at the device's private key (the guide's device.key)",
        ),
        KeyError::Io { .. } => Finding::new(
            Check::Key,
            e.to_string(),
            "make the key readable by the user dps-agent runs as (owner dps-agent, mode 0600)",
        ),
        other => Finding::new(
            Check::Key,
            format!("bootstrap key {uri}: {other}"),
            "fix [dps.attestation] identity_key or the key it names",
        ),
    }
}

fn spki_der(cert: &Certificate) -> Option<Vec<u8>> {
    cert.tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .ok()
}

/// "an RSA-2048 key", "an EC P-256 key", … for messages.
fn spki_summary(spki: &[u8]) -> String {
    use rsa::pkcs8::DecodePublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    if let Ok(k) = rsa::RsaPublicKey::from_public_key_der(spki) {
        return format!("an RSA-{} key", k.n().bits());
    }
    if p256::PublicKey::from_public_key_der(spki).is_ok() {
        return "an EC P-256 key".into();
    }
    if p384::PublicKey::from_public_key_der(spki).is_ok() {
        return "an EC P-384 key".into();
    }
    "a key of another kind".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::file::FileKeyStore;
    use crate::keys::{KeyAlgorithm, KeyStore};
    use rcgen::{
        BasicConstraints as Bc, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
    };

    struct Ca {
        cert: rcgen::Certificate,
        issuer: rcgen::Issuer<'static, KeyPair>,
    }

    fn ca(name: &str, parent: Option<&Ca>) -> Ca {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(Bc::Unconstrained);
        let cert = match parent {
            Some(pa) => p.clone().signed_by(&key, &pa.issuer).unwrap(),
            None => p.clone().self_signed(&key).unwrap(),
        };
        Ca {
            cert,
            issuer: rcgen::Issuer::new(p, key),
        }
    }

    struct Fx {
        dir: PathBuf,
        root: Ca,
        ica: Ca,
        key: Arc<dyn Key>,
        key_pair: KeyPair,
    }

    /// A root, an intermediate and a device key in a file.
    fn fixture() -> Fx {
        let dir = std::env::temp_dir().join(format!("bootstrap-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let key_path = dir.join("device.key");
        crate::fsutil::atomic_write(&key_path, key_pair.serialize_pem().as_bytes(), 0o600).unwrap();
        let key = FileKeyStore::new(&dir)
            .open(&KeyUri::file(&key_path))
            .unwrap();
        let root = ca("Azure IoT Hub CA Cert Test Only", None);
        let ica = ca("Azure IoT Hub Intermediate Cert Test Only", Some(&root));
        Fx {
            dir,
            root,
            ica,
            key,
            key_pair,
        }
    }

    impl Fx {
        fn leaf(&self, cn: &str, f: impl FnOnce(&mut CertificateParams)) -> rcgen::Certificate {
            let mut p = CertificateParams::new(vec![cn.to_string()]).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            f(&mut p);
            p.signed_by(&self.key_pair, &self.ica.issuer).unwrap()
        }

        /// Writes the certificates as one PEM file.
        fn write(&self, name: &str, certs: &[&rcgen::Certificate]) -> PathBuf {
            let p = self.dir.join(name);
            let pem: String = certs.iter().map(|c| c.pem()).collect();
            std::fs::write(&p, pem).unwrap();
            p
        }

        fn check(&self, path: &Path, reg: &str) -> Vec<Finding> {
            check(path, Some(self.key.as_ref()), reg, crate::clock::now(), 300)
        }
    }

    fn checks(f: &[Finding]) -> Vec<Check> {
        f.iter().map(|f| f.check).collect()
    }

    #[test]
    fn full_chain_leaf_and_intermediates_or_leaf_alone_all_load() {
        let fx = fixture();
        let leaf = fx.leaf("gw-0001", |_| {});
        for (name, certs, chain_len, presented) in [
            ("full.pem", vec![&leaf, &fx.ica.cert, &fx.root.cert], 3, 2),
            ("partial.pem", vec![&leaf, &fx.ica.cert], 2, 2),
            ("alone.pem", vec![&leaf], 1, 1),
        ] {
            let path = fx.write(name, &certs);
            assert_eq!(fx.check(&path, "gw-0001"), vec![], "{name}");
            let b = load(&path, fx.key.clone(), "gw-0001", crate::clock::now(), 300).unwrap();
            assert_eq!((b.chain_len, b.presented), (chain_len, presented), "{name}");
            // The root is never presented; the leaf comes first.
            assert_eq!(b.identity.chain[0], leaf.der().to_vec());
            assert!(!b.identity.chain.contains(&fx.root.cert.der().to_vec()));
            assert_eq!(b.subject, "CN=gw-0001");
        }
        std::fs::remove_dir_all(&fx.dir).unwrap();
    }

    #[test]
    fn a_key_from_another_device_is_named() {
        let fx = fixture();
        let other = fixture();
        let path = fx.write("c.pem", &[&fx.leaf("gw-0001", |_| {}), &fx.ica.cert]);
        let f = check(
            &path,
            Some(other.key.as_ref()),
            "gw-0001",
            crate::clock::now(),
            300,
        );
        assert_eq!(checks(&f), vec![Check::KeyMatch]);
        let text = f[0].to_string();
        assert!(
            text.contains(
                "the certificate (CN=gw-0001, an EC P-256 key) was made for another key than file:"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("point [dps.attestation] identity_key at the key this certificate was made for (or identity_cert at this key's certificate)"),
            "{text}"
        );
        let err = load(
            &path,
            other.key.clone(),
            "gw-0001",
            crate::clock::now(),
            300,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.starts_with("bootstrap credential: "), "{err}");
        assert!(err.contains("was made for another key than file:"), "{err}");
        std::fs::remove_dir_all(&fx.dir).unwrap();
        std::fs::remove_dir_all(&other.dir).unwrap();
    }

    #[test]
    fn every_problem_is_reported_with_its_fix() {
        let fx = fixture();
        let t = |secs: i64| time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
        let now = crate::clock::now();
        let bad = fx.leaf("gw-9999", |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            p.not_before = t(now - 7200);
            p.not_after = t(now - 3600);
        });
        let path = fx.write("bad.pem", &[&bad, &fx.ica.cert, &fx.root.cert]);
        let f = fx.check(&path, "gw-0001");
        assert_eq!(
            checks(&f),
            vec![Check::CommonName, Check::ClientAuth, Check::Validity]
        );
        assert!(
            f[0].problem.contains(
                "the certificate's CN is \"gw-9999\" but [dps] registration_id is \"gw-0001\""
            ),
            "{}",
            f[0]
        );
        assert_eq!(f[0].fix, "DPS requires them to be equal: set registration_id = \"gw-9999\", or use this device's own certificate");
        assert!(
            f[1].problem.contains(
                "may not be used for TLS client authentication (extendedKeyUsage lacks clientAuth)"
            ),
            "{}",
            f[1]
        );
        assert!(f[1].fix.contains("extendedKeyUsage = clientAuth"));
        assert!(
            f[2].problem.contains("certificate CN=gw-9999 expired at"),
            "{}",
            f[2]
        );
        assert_eq!(
            f[2].fix,
            "ask your CA for a new bootstrap certificate for this key"
        );
        // load() carries all three, numbered.
        let err = load(&path, fx.key.clone(), "gw-0001", now, 300)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("(1) ") && err.contains("(2) ") && err.contains("(3) "),
            "{err}"
        );
        std::fs::remove_dir_all(&fx.dir).unwrap();
    }

    #[test]
    fn not_yet_valid_and_bad_registration_ids() {
        let fx = fixture();
        let t = |secs: i64| time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
        let now = crate::clock::now();
        let future = fx.leaf("Gw-0001", |p| {
            p.not_before = t(now + 86_400);
            p.not_after = t(now + 2 * 86_400);
        });
        let path = fx.write("future.pem", &[&future, &fx.ica.cert]);
        let f = fx.check(&path, "Gw-0001");
        assert_eq!(
            checks(&f),
            vec![Check::RegistrationId, Check::Validity],
            "{f:?}"
        );
        assert!(f[0].problem.contains("uppercase letter 'G'"), "{}", f[0]);
        assert!(f[1].problem.contains("check the clock"), "{}", f[1]);
        assert!(f[1].fix.contains("timedatectl"));
        std::fs::remove_dir_all(&fx.dir).unwrap();
    }

    #[test]
    fn chains_that_do_not_link() {
        let fx = fixture();
        let leaf = fx.leaf("gw-0001", |_| {});
        let stranger = ca("Some Other Root", None);
        // The root before the intermediate is fine (order is found, not trusted) …
        let path = fx.write("shuffled.pem", &[&leaf, &fx.root.cert, &fx.ica.cert]);
        assert_eq!(fx.check(&path, "gw-0001"), vec![]);
        // … an unrelated CA after the leaf is not.
        let path = fx.write("stranger.pem", &[&leaf, &stranger.cert]);
        let f = fx.check(&path, "gw-0001");
        assert_eq!(checks(&f), vec![Check::Chain]);
        assert!(
            f[0].problem.contains("the issuer name does not match"),
            "{}",
            f[0]
        );
        assert!(f[0].fix.contains("device-full-chain.pem"), "{}", f[0]);
        // An intermediate of the same name but another key: the signature fails.
        let twin = ca("Azure IoT Hub Intermediate Cert Test Only", Some(&stranger));
        let path = fx.write("twin.pem", &[&leaf, &twin.cert]);
        let f = fx.check(&path, "gw-0001");
        assert_eq!(checks(&f), vec![Check::Chain]);
        assert!(
            f[0].problem.contains("the signature does not verify"),
            "{}",
            f[0]
        );
        std::fs::remove_dir_all(&fx.dir).unwrap();
    }

    #[test]
    fn unreadable_files_and_swapped_settings() {
        let fx = fixture();
        let f = fx.check(&fx.dir.join("missing.pem"), "gw-0001");
        assert_eq!(checks(&f), vec![Check::Certificate]);
        assert!(f[0]
            .problem
            .ends_with("missing.pem: the file does not exist"));
        // The key file given as the certificate.
        let f = fx.check(&fx.dir.join("device.key"), "gw-0001");
        assert_eq!(checks(&f), vec![Check::Certificate]);
        assert!(
            f[0].fix
                .starts_with("identity_cert and identity_key are swapped"),
            "{}",
            f[0]
        );
        let p = fx.dir.join("junk.pem");
        std::fs::write(
            &p,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let f = fx.check(&p, "gw-0001");
        assert!(
            f[0].problem.contains("certificate 1 is not valid X.509"),
            "{}",
            f[0]
        );
        std::fs::remove_dir_all(&fx.dir).unwrap();
    }

    #[test]
    fn key_errors_become_findings_with_the_fix_split_off() {
        let dir = std::env::temp_dir().join(format!("bootstrap-k-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("device.key");
        crate::fsutil::atomic_write(
            &p,
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
            0o600,
        )
        .unwrap();
        let uri = KeyUri::file(&p);
        let e = FileKeyStore::new(&dir).open(&uri).err().unwrap();
        let f = key_finding(&uri, &e);
        assert_eq!(f.check, Check::Key);
        assert_eq!(
            f.problem,
            format!("{}: encrypted keys are not supported", p.display())
        );
        assert!(
            f.fix.starts_with("decrypt it or move it into the TPM/HSM"),
            "{}",
            f.fix
        );
        assert!(f
            .to_string()
            .contains("encrypted keys are not supported; decrypt it or move it into the TPM/HSM"));
        let e = FileKeyStore::new(&dir)
            .open(&KeyUri::file(&dir.join("nope.key")))
            .err()
            .unwrap();
        assert!(key_finding(&KeyUri::parse("file:/x").unwrap(), &e)
            .fix
            .contains("the guide's device.key"));
        // Defect 5 of issue 15: an absent token printed the PIN.
        let uri =
            KeyUri::parse("pkcs11:token=absent;object=device;type=private?pin-value=s3cret-1234")
                .unwrap();
        let e = KeyError::Sign {
            uri: uri.to_string(),
            reason: "no slot holds token absent".into(),
        };
        let shown = key_finding(&uri, &e).to_string();
        assert!(!shown.contains("s3cret-1234"), "{shown}");
        assert!(shown.contains("pin-value=REDACTED"), "{shown}");
        let _ = KeyAlgorithm::ALL;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
