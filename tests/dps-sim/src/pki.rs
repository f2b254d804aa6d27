//! The test PKI (`dps-sim pki`): generates every certificate and key the simulator and the
//! agent's tests need, writes them atomically (keys mode 0600), and loads them back for
//! `serve`. Never overwrites an existing file unless asked to (`--force`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    SignatureAlgorithm, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

/// Onboarding (bootstrap) root CA, the "verified CA" uploaded to DPS.
pub const BOOTSTRAP_ROOT: &str = "bootstrap-root";
/// Onboarding intermediate CA (signed by the root, pathlen 0); signs device certificates.
pub const BOOTSTRAP_INTERMEDIATE: &str = "bootstrap-intermediate";
/// CA of the simulator's TLS server certificate; the agent trusts this.
pub const SERVER_CA: &str = "server-ca";
/// The simulator's TLS server certificate (CN localhost).
pub const SERVER: &str = "server";
/// A server certificate for another host ([`WRONG_HOST`]) from the same server CA, presented
/// while the `mitm` fault is on.
pub const SERVER_WRONGHOST: &str = "server-wronghost";
/// The only name in [`SERVER_WRONGHOST`]'s certificate.
pub const WRONG_HOST: &str = "wrong-host.example.net";
/// Root of the PKI that issues operational certificates (ADR credential).
pub const ISSUING_ROOT: &str = "issuing-root";
/// Issuing CA for operational certificates (ADR policy CA).
pub const ISSUING_CA: &str = "issuing-ca";

/// Default registration id for `dps-sim pki`.
pub const DEFAULT_REGISTRATION_ID: &str = "gw-0001";

const CA_VALIDITY_DAYS: i64 = 3650;
const LEAF_VALIDITY_DAYS: i64 = 365;

/// `{stem}.pem`
pub fn cert_file(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.pem"))
}

/// `{stem}.key`
pub fn key_file(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.key"))
}

/// `device-{id}` — the stem of a device's bootstrap certificate and key.
pub fn device_stem(registration_id: &str) -> String {
    format!("device-{registration_id}")
}

/// `device-{id}-full-chain.pem`
pub fn device_full_chain_file(dir: &Path, registration_id: &str) -> PathBuf {
    dir.join(format!("device-{registration_id}-full-chain.pem"))
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("registration id {0:?} is not valid: use 1-128 characters from A-Z a-z 0-9 - . _ :")]
    BadRegistrationId(String),
    #[error("{} already exists; pass --force to overwrite the PKI in {}", .file.display(), .dir.display())]
    Exists { file: PathBuf, dir: PathBuf },
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", .path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// Registration ids as DPS allows them: up to 128 characters from `[A-Za-z0-9-._:]`.
pub fn valid_registration_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
}

/// Current time truncated to whole seconds (X.509 times have no fractions).
pub fn now_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// A random positive 16-byte serial number and its lowercase hex form.
pub fn random_serial() -> (SerialNumber, String) {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, and no leading zero byte, so the DER encoding is exactly these 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    (SerialNumber::from_slice(&bytes), hex)
}

fn cn_only(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn ca_params(cn: &str, constraint: BasicConstraints, days: i64) -> CertificateParams {
    let now = now_seconds();
    let mut p = CertificateParams::default();
    p.distinguished_name = cn_only(cn);
    p.serial_number = Some(random_serial().0);
    p.not_before = now;
    p.not_after = now + Duration::days(days);
    p.is_ca = IsCa::Ca(constraint);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    p.use_authority_key_identifier_extension = true;
    p
}

/// A fresh two-tier CA (self-signed root, pathlen-0 intermediate signed by it) that exists only
/// in memory, for the chain faults (`bad-chain`, `foreign-chain`).
pub fn ca_pair(
    root_cn: &str,
    intermediate_cn: &str,
) -> Result<
    (
        CertifiedIssuer<'static, KeyPair>,
        CertifiedIssuer<'static, KeyPair>,
    ),
    PkiError,
> {
    let root = CertifiedIssuer::self_signed(
        ca_params(root_cn, BasicConstraints::Unconstrained, CA_VALIDITY_DAYS),
        new_key(&PKCS_ECDSA_P384_SHA384)?,
    )?;
    let intermediate = CertifiedIssuer::signed_by(
        ca_params(
            intermediate_cn,
            BasicConstraints::Constrained(0),
            CA_VALIDITY_DAYS,
        ),
        new_key(&PKCS_ECDSA_P384_SHA384)?,
        &root,
    )?;
    Ok((root, intermediate))
}

/// The `mitm` server certificate: CN and SAN DNS [`WRONG_HOST`] only, EKU serverAuth.
fn wrong_host_cert(
    server_ca: &Issuer<'_, KeyPair>,
) -> Result<(rcgen::Certificate, KeyPair), PkiError> {
    let key = new_key(&PKCS_ECDSA_P256_SHA256)?;
    let cert = leaf_params(
        WRONG_HOST,
        vec![SanType::DnsName(WRONG_HOST.to_string().try_into()?)],
        ExtendedKeyUsagePurpose::ServerAuth,
    )
    .signed_by(&key, server_ca)?;
    Ok((cert, key))
}

/// The `mitm` identity from `server-wronghost.pem/.key`; a PKI directory made before that file
/// existed gets one generated in memory from `server-ca.pem/.key` (nothing is written).
pub fn wrong_host_identity(
    dir: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
    let cert = cert_file(dir, SERVER_WRONGHOST);
    let key = key_file(dir, SERVER_WRONGHOST);
    if cert.exists() && key.exists() {
        return Ok((load_certs(&cert)?, load_private_key(&key)?));
    }
    let ca = load_issuer(&cert_file(dir, SERVER_CA), &key_file(dir, SERVER_CA))?;
    let (cert, key) = wrong_host_cert(&ca)?;
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok((vec![cert.der().clone()], key_der))
}

fn leaf_params(cn: &str, sans: Vec<SanType>, eku: ExtendedKeyUsagePurpose) -> CertificateParams {
    let now = now_seconds();
    let mut p = CertificateParams::default();
    p.distinguished_name = cn_only(cn);
    p.serial_number = Some(random_serial().0);
    p.not_before = now;
    p.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![eku];
    p.subject_alt_names = sans;
    p.use_authority_key_identifier_extension = true;
    p
}

fn new_key(alg: &'static SignatureAlgorithm) -> Result<KeyPair, PkiError> {
    Ok(KeyPair::generate_for(alg)?)
}

/// A file to be written: path, contents, mode.
struct Output {
    path: PathBuf,
    contents: String,
    mode: u32,
}

impl Output {
    fn cert(path: PathBuf, pem: String) -> Self {
        Output {
            path,
            contents: pem,
            mode: 0o644,
        }
    }

    fn key(path: PathBuf, key: &KeyPair) -> Self {
        Output {
            path,
            contents: key.serialize_pem(),
            mode: 0o600,
        }
    }
}

/// Every file name `generate` writes, for the overwrite check.
pub fn planned_files(dir: &Path, registration_ids: &[String]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for stem in [
        BOOTSTRAP_ROOT,
        BOOTSTRAP_INTERMEDIATE,
        SERVER_CA,
        SERVER,
        SERVER_WRONGHOST,
        ISSUING_ROOT,
        ISSUING_CA,
    ] {
        files.push(cert_file(dir, stem));
        files.push(key_file(dir, stem));
    }
    for id in registration_ids {
        let stem = device_stem(id);
        files.push(cert_file(dir, &stem));
        files.push(key_file(dir, &stem));
        files.push(device_full_chain_file(dir, id));
    }
    files
}

/// Writes the complete test PKI into `dir` (created if missing) and returns the files written.
pub fn generate(
    dir: &Path,
    registration_ids: &[String],
    force: bool,
) -> Result<Vec<PathBuf>, PkiError> {
    for id in registration_ids {
        if !valid_registration_id(id) {
            return Err(PkiError::BadRegistrationId(id.clone()));
        }
    }
    if !force {
        if let Some(file) = planned_files(dir, registration_ids)
            .into_iter()
            .find(|f| f.exists())
        {
            return Err(PkiError::Exists {
                file,
                dir: dir.to_path_buf(),
            });
        }
    }

    let mut outputs = Vec::new();

    // Onboarding PKI: root -> intermediate -> device leaves.
    let root_key = new_key(&PKCS_ECDSA_P384_SHA384)?;
    outputs.push(Output::key(key_file(dir, BOOTSTRAP_ROOT), &root_key));
    let root = CertifiedIssuer::self_signed(
        ca_params(
            "dps-sim Bootstrap Root CA",
            BasicConstraints::Unconstrained,
            CA_VALIDITY_DAYS,
        ),
        root_key,
    )?;
    let inter_key = new_key(&PKCS_ECDSA_P384_SHA384)?;
    outputs.push(Output::key(
        key_file(dir, BOOTSTRAP_INTERMEDIATE),
        &inter_key,
    ));
    let inter = CertifiedIssuer::signed_by(
        ca_params(
            "dps-sim Bootstrap Intermediate CA",
            BasicConstraints::Constrained(0),
            CA_VALIDITY_DAYS,
        ),
        inter_key,
        &root,
    )?;
    outputs.push(Output::cert(cert_file(dir, BOOTSTRAP_ROOT), root.pem()));
    outputs.push(Output::cert(
        cert_file(dir, BOOTSTRAP_INTERMEDIATE),
        inter.pem(),
    ));
    for id in registration_ids {
        let key = new_key(&PKCS_ECDSA_P256_SHA256)?;
        let dns = SanType::DnsName(id.clone().try_into()?);
        let cert = leaf_params(id, vec![dns], ExtendedKeyUsagePurpose::ClientAuth)
            .signed_by(&key, &inter)?;
        let stem = device_stem(id);
        outputs.push(Output::cert(cert_file(dir, &stem), cert.pem()));
        outputs.push(Output::key(key_file(dir, &stem), &key));
        outputs.push(Output::cert(
            device_full_chain_file(dir, id),
            format!("{}{}{}", cert.pem(), inter.pem(), root.pem()),
        ));
    }

    // TLS server identity.
    let server_ca_key = new_key(&PKCS_ECDSA_P384_SHA384)?;
    outputs.push(Output::key(key_file(dir, SERVER_CA), &server_ca_key));
    let server_ca = CertifiedIssuer::self_signed(
        ca_params(
            "dps-sim Server CA",
            BasicConstraints::Unconstrained,
            CA_VALIDITY_DAYS,
        ),
        server_ca_key,
    )?;
    let server_key = new_key(&PKCS_ECDSA_P256_SHA256)?;
    let server = leaf_params(
        "localhost",
        vec![
            SanType::DnsName("localhost".to_string().try_into()?),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ],
        ExtendedKeyUsagePurpose::ServerAuth,
    )
    .signed_by(&server_key, &server_ca)?;
    outputs.push(Output::cert(cert_file(dir, SERVER_CA), server_ca.pem()));
    outputs.push(Output::cert(cert_file(dir, SERVER), server.pem()));
    outputs.push(Output::key(key_file(dir, SERVER), &server_key));
    let (wrong_host, wrong_host_key) = wrong_host_cert(&server_ca)?;
    outputs.push(Output::cert(
        cert_file(dir, SERVER_WRONGHOST),
        wrong_host.pem(),
    ));
    outputs.push(Output::key(
        key_file(dir, SERVER_WRONGHOST),
        &wrong_host_key,
    ));

    // Operational-certificate PKI (like ADR): credential root -> policy CA.
    let issuing_root_key = new_key(&PKCS_ECDSA_P384_SHA384)?;
    outputs.push(Output::key(key_file(dir, ISSUING_ROOT), &issuing_root_key));
    let issuing_root = CertifiedIssuer::self_signed(
        ca_params(
            "dps-sim ADR Credential Root",
            BasicConstraints::Unconstrained,
            CA_VALIDITY_DAYS,
        ),
        issuing_root_key,
    )?;
    let issuing_ca_key = new_key(&PKCS_ECDSA_P384_SHA384)?;
    outputs.push(Output::key(key_file(dir, ISSUING_CA), &issuing_ca_key));
    let issuing_ca = CertifiedIssuer::signed_by(
        ca_params(
            "dps-sim ADR Policy CA",
            BasicConstraints::Constrained(0),
            CA_VALIDITY_DAYS,
        ),
        issuing_ca_key,
        &issuing_root,
    )?;
    outputs.push(Output::cert(
        cert_file(dir, ISSUING_ROOT),
        issuing_root.pem(),
    ));
    outputs.push(Output::cert(cert_file(dir, ISSUING_CA), issuing_ca.pem()));

    fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::with_capacity(outputs.len());
    for out in outputs {
        write_atomic(&out.path, out.contents.as_bytes(), out.mode)?;
        written.push(out.path);
    }
    Ok(written)
}

/// Writes `path` through a temporary file in the same directory and a rename, with `mode`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode given to open() is filtered by the umask; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// All certificates in a PEM file, in file order.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = fs::read(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Parse {
            path: path.to_path_buf(),
            reason: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Parse {
            path: path.to_path_buf(),
            reason: "contains no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// The first certificate of a PEM file.
pub fn load_cert(path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    let mut certs = load_certs(path)?;
    Ok(certs.swap_remove(0))
}

/// A PKCS#8 / SEC1 private key from a PEM file, for rustls.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let bytes = fs::read(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| PkiError::Parse {
        path: path.to_path_buf(),
        reason: format!("not a PEM private key: {e}"),
    })
}

/// An rcgen issuer from a CA certificate and its key (PEM files).
pub fn load_issuer(cert: &Path, key: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key_pem = fs::read_to_string(key).map_err(|source| PkiError::Read {
        path: key.to_path_buf(),
        source,
    })?;
    let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Parse {
        path: key.to_path_buf(),
        reason: format!("not a usable EC private key: {e}"),
    })?;
    let der = load_cert(cert)?;
    Issuer::from_ca_cert_der(&der, key_pair).map_err(|e| PkiError::Parse {
        path: cert.to_path_buf(),
        reason: format!("not a usable CA certificate: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    #[test]
    fn writes_all_files_with_modes_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let ids = vec!["gw-0001".to_string(), "gw-0002".to_string()];
        let written = generate(dir.path(), &ids, false).unwrap();
        assert_eq!(written.len(), 14 + 6);
        for f in &written {
            let mode = fs::metadata(f).unwrap().permissions().mode() & 0o777;
            let is_key = f.extension().is_some_and(|e| e == "key");
            assert_eq!(mode, if is_key { 0o600 } else { 0o644 }, "{}", f.display());
        }
        let err = generate(dir.path(), &ids, false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        generate(dir.path(), &ids, true).unwrap();
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[test]
    fn device_cert_and_full_chain() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &["gw-0001".to_string()], false).unwrap();
        let chain = load_certs(&device_full_chain_file(dir.path(), "gw-0001")).unwrap();
        assert_eq!(chain.len(), 3);
        let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
        let (_, inter) = parse_x509_certificate(&chain[1]).unwrap();
        let (_, root) = parse_x509_certificate(&chain[2]).unwrap();
        assert_eq!(leaf.subject().to_string(), "CN=gw-0001");
        assert_eq!(leaf.issuer(), inter.subject());
        assert_eq!(inter.issuer(), root.subject());
        assert_eq!(root.subject().to_string(), "CN=dps-sim Bootstrap Root CA");
        assert!(leaf.verify_signature(Some(inter.public_key())).is_ok());
        assert!(inter.verify_signature(Some(root.public_key())).is_ok());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let bc = inter.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let days = (leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp())
            / 86_400;
        assert_eq!(days, 365);
        assert_eq!(
            load_cert(&cert_file(dir.path(), "device-gw-0001")).unwrap(),
            chain[0]
        );
    }

    fn dns_names(cert: &X509Certificate<'_>) -> Vec<String> {
        cert.subject_alternative_name()
            .unwrap()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .map(|n| match n {
                        GeneralName::DNSName(d) => format!("DNS:{d}"),
                        GeneralName::IPAddress(ip) => format!("IP:{ip:?}"),
                        other => format!("{other:?}"),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn wrong_host_identity_from_file_or_generated() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &[], false).unwrap();
        let server_ca = load_cert(&cert_file(dir.path(), SERVER_CA)).unwrap();
        let (_, ca) = parse_x509_certificate(&server_ca).unwrap();
        let (chain, _key) = wrong_host_identity(dir.path()).unwrap();
        assert_eq!(
            chain[0],
            load_cert(&cert_file(dir.path(), SERVER_WRONGHOST)).unwrap()
        );
        // An older PKI directory without the file: made in memory, nothing written.
        fs::remove_file(cert_file(dir.path(), SERVER_WRONGHOST)).unwrap();
        let (generated, _key) = wrong_host_identity(dir.path()).unwrap();
        assert!(!cert_file(dir.path(), SERVER_WRONGHOST).exists());
        for der in [&chain[0], &generated[0]] {
            let (_, cert) = parse_x509_certificate(der).unwrap();
            assert_eq!(cert.subject().to_string(), format!("CN={WRONG_HOST}"));
            assert_eq!(dns_names(&cert), vec![format!("DNS:{WRONG_HOST}")]);
            assert_eq!(cert.issuer(), ca.subject());
            assert!(cert.verify_signature(Some(ca.public_key())).is_ok());
            assert!(
                cert.extended_key_usage()
                    .unwrap()
                    .unwrap()
                    .value
                    .server_auth
            );
        }
        // The normal server certificate keeps its names.
        let server_der = load_cert(&cert_file(dir.path(), SERVER)).unwrap();
        let (_, server) = parse_x509_certificate(&server_der).unwrap();
        assert!(dns_names(&server).contains(&"DNS:localhost".to_string()));
    }

    #[test]
    fn ca_pairs_are_consistent_and_fresh() {
        let (root, ca) = ca_pair("R", "I").unwrap();
        let (_, r) = parse_x509_certificate(root.der()).unwrap();
        let (_, i) = parse_x509_certificate(ca.der()).unwrap();
        assert_eq!(r.subject().to_string(), "CN=R");
        assert_eq!(i.issuer(), r.subject());
        assert!(i.verify_signature(Some(r.public_key())).is_ok());
        let (other_root, _) = ca_pair("R", "I").unwrap();
        assert_ne!(root.der(), other_root.der());
    }

    #[test]
    fn refuses_bad_registration_ids() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "a/b", "a b", &"x".repeat(129)] {
            assert!(matches!(
                generate(dir.path(), &[bad.to_string()], false),
                Err(PkiError::BadRegistrationId(_))
            ));
        }
    }
}
