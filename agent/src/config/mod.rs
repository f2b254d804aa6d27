//! The configuration: `/etc/dps-agent/config.toml` plus drop-ins from
//! `config.d/*.toml` beside it, read into typed, validated values. Every error
//! names the file, the key, the value and the fix. Parsing is declarative (serde,
//! see `raw`); the checks are small functions in `validate`.

mod raw;
mod validate;

pub use validate::check_registration_id;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::clock::HumanDuration;
use crate::keys::{Backend, KeyAlgorithm, KeyUri};

/// Where the daemon looks when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/dps-agent/config.toml";
/// The DPS api-version that carries `csr` / `issuedCertificateChain`.
pub const DEFAULT_DPS_API_VERSION: &str = "2025-07-01-preview";
/// The IoT Hub api-version used in the MQTT username.
pub const DEFAULT_HUB_API_VERSION: &str = "2021-04-12";

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The files read, main file first.
    pub files: Vec<PathBuf>,
    pub dps: DpsConfig,
    pub operational: OperationalConfig,
    pub hub: HubConfig,
    pub tpm: TpmConfig,
    pub pkcs11: Pkcs11Config,
    pub state: StateConfig,
    pub dbus: DbusConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone)]
pub struct DpsConfig {
    pub endpoint: Endpoint,
    pub id_scope: String,
    pub registration_id: String,
    pub transport: Transport,
    pub api_version: String,
    /// CA certificates for the DPS and hub server certificates.
    pub trust_bundle: PathBuf,
    /// Optional custom allocation payload (a JSON object).
    pub payload: Option<serde_json::Value>,
    /// Upper bound on one registration attempt, retries inside it included.
    pub attempt_timeout: Duration,
    pub attestation: Attestation,
}

/// `host` and `port` of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Mqtt,
    Https,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::Https => "https",
        }
    }
}

/// How the device proves itself to DPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attestation {
    /// A bootstrap certificate (chain) and its key.
    X509 {
        identity_cert: PathBuf,
        identity_key: KeyUri,
    },
    /// A symmetric key (SAS tokens): the enrollment's key, or the enrollment
    /// group's key from which the device key is derived.
    SymmetricKey {
        key: SymmetricKeySource,
        enrollment: Enrollment,
    },
    /// The TPM's endorsement key (DPS over HTTPS only).
    Tpm,
}

/// Where the DPS symmetric key is (`[dps.attestation] key_file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SymmetricKeySource {
    /// A file (mode 0600) holding the key in base64.
    File(PathBuf),
    /// A secret key in a PKCS#11 token (`pkcs11:…;type=secret-key`), which
    /// computes the HMACs; the key never leaves it.
    Token(KeyUri),
}

impl fmt::Display for SymmetricKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SymmetricKeySource::File(p) => write!(f, "{}", p.display()),
            SymmetricKeySource::Token(uri) => f.write_str(&uri.redacted()),
        }
    }
}

/// The kind of DPS enrollment a symmetric key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrollment {
    Individual,
    Group,
}

impl Attestation {
    pub fn method(&self) -> &'static str {
        match self {
            Attestation::X509 { .. } => "x509",
            Attestation::SymmetricKey { .. } => "symmetric_key",
            Attestation::Tpm => "tpm",
        }
    }
}

#[derive(Debug, Clone)]
pub struct OperationalConfig {
    pub key_backend: Backend,
    pub key_algorithm: KeyAlgorithm,
    pub renew_before: HumanDuration,
    pub renew_jitter: HumanDuration,
    pub rotate_key: bool,
    pub renewal_path: RenewalPath,
    /// Cap of the retry backoff.
    pub retry_max: HumanDuration,
    /// How far in the future a certificate's notBefore may lie.
    pub max_clock_skew: HumanDuration,
    /// PEM bundle of the CAs an issued chain must lead to; None: the root of the stored
    /// identity's chain (nothing at the first provisioning).
    pub issuer_trust: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalPath {
    Dps,
    Hub,
}

#[derive(Debug, Clone)]
pub struct HubConfig {
    pub port: u16,
    pub api_version: String,
    pub verify_new_certificate: bool,
    pub report_twin: bool,
}

#[derive(Debug, Clone)]
pub struct TpmConfig {
    pub tcti: String,
}

#[derive(Debug, Clone, Default)]
pub struct Pkcs11Config {
    pub module: Option<PathBuf>,
    pub token_label: Option<String>,
    pub token_serial: Option<String>,
    pub pin_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub dir: PathBuf,
}

impl StateConfig {
    /// Where the file backend writes operational keys.
    pub fn key_dir(&self) -> PathBuf {
        self.dir.join("keys")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusChoice {
    System,
    Session,
    Address(String),
}

#[derive(Debug, Clone)]
pub struct DbusConfig {
    pub bus: BusChoice,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: log::LevelFilter,
}

/// A config problem, pointing at the file, line, key and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// Dotted key path, e.g. `operational.key_algorithm`; empty for whole-file problems.
    pub key: String,
    /// The offending value as written (None when the key is missing).
    pub value: Option<String>,
    /// What is wrong, e.g. `is not supported`.
    pub problem: String,
    /// What to do, e.g. `use "ecdsa-p384" or "ecdsa-p256"`.
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if !self.key.is_empty() {
            let (section, name) = match self.key.rsplit_once('.') {
                Some((s, n)) => (s, n),
                None => ("", self.key.as_str()),
            };
            if !section.is_empty() {
                write!(f, "[{section}] ")?;
            }
            f.write_str(name)?;
            if let Some(v) = &self.value {
                write!(f, " = {v}")?;
            }
            f.write_str(" ")?;
        }
        f.write_str(&self.problem)?;
        if !self.fix.is_empty() {
            write!(f, "; {}", self.fix)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads `path` and the drop-ins in `config.d/` beside it (in name order;
    /// later files override earlier ones key by key), and validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut files = vec![path.to_path_buf()];
        files.extend(drop_ins(path)?);
        let mut sources = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
                file: file.clone(),
                line: None,
                key: String::new(),
                value: None,
                problem: format!("cannot be read: {e}"),
                fix: if file == path {
                    "create it (a commented example is in /usr/share/doc/dps-agent/config.toml) or pass --config PATH".into()
                } else {
                    "fix its permissions or remove it".into()
                },
            })?;
            sources.push(Source {
                file: file.clone(),
                text,
            });
        }
        Config::from_sources(&sources)
    }

    /// Parses config text (the main file only), for tests and `check-config`.
    pub fn from_str(file: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::from_sources(&[Source {
            file: file.to_path_buf(),
            text: text.to_string(),
        }])
    }

    fn from_sources(sources: &[Source]) -> Result<Config, ConfigError> {
        let mut merged = toml::Table::new();
        let mut origin = Origins::default();
        for src in sources {
            // Type and unknown-key errors, attributed to this file.
            toml::from_str::<raw::RawConfig>(&src.text).map_err(|e| toml_error(src, &e))?;
            let table: toml::Table = toml::from_str(&src.text).map_err(|e| toml_error(src, &e))?;
            merge(&mut merged, table, "", src, &mut origin);
        }
        let raw: raw::RawConfig =
            toml::Value::Table(merged)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError {
                    file: sources[0].file.clone(),
                    line: None,
                    key: String::new(),
                    value: None,
                    problem: format!("cannot be read after merging drop-ins: {}", e.message()),
                    fix: "check the drop-in files in config.d/".into(),
                })?;
        let files = sources.iter().map(|s| s.file.clone()).collect();
        validate::build(raw, files, &origin)
    }
}

struct Source {
    file: PathBuf,
    text: String,
}

/// Which file (and line) each dotted key came from.
#[derive(Default)]
pub(crate) struct Origins {
    pub main: PathBuf,
    map: BTreeMap<String, (PathBuf, Option<usize>)>,
}

impl Origins {
    /// The file and line where `key` was set, or the main file.
    pub fn of(&self, key: &str) -> (PathBuf, Option<usize>) {
        self.map
            .get(key)
            .cloned()
            .unwrap_or_else(|| (self.main.clone(), None))
    }
}

fn merge(
    into: &mut toml::Table,
    from: toml::Table,
    prefix: &str,
    src: &Source,
    origin: &mut Origins,
) {
    if origin.main.as_os_str().is_empty() {
        origin.main = src.file.clone();
    }
    for (k, v) in from {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(new)) if k != "payload" => {
                merge(existing, new, &path, src, origin);
            }
            (_, v) => {
                if !matches!(v, toml::Value::Table(_)) || k == "payload" {
                    origin.map.insert(
                        path.clone(),
                        (src.file.clone(), find_line(&src.text, &path)),
                    );
                } else if let toml::Value::Table(t) = &v {
                    record_all(t, &path, src, origin);
                }
                into.insert(k, v);
            }
        }
    }
}

fn record_all(t: &toml::Table, prefix: &str, src: &Source, origin: &mut Origins) {
    for (k, v) in t {
        let path = format!("{prefix}.{k}");
        match v {
            toml::Value::Table(inner) if k != "payload" => record_all(inner, &path, src, origin),
            _ => {
                origin.map.insert(
                    path.clone(),
                    (src.file.clone(), find_line(&src.text, &path)),
                );
            }
        }
    }
}

/// Finds the line of `section.key` in a TOML text (1-based), by scanning table
/// headers and `key =` lines. Good enough to point a human at the right place.
fn find_line(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = dotted.rsplit_once('.').unwrap_or(("", dotted));
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            current = h.trim().to_string();
            continue;
        }
        if current == section {
            if let Some((k, _)) = t.split_once('=') {
                if k.trim() == key {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

/// Turns a toml error into a ConfigError pointing at the file and line.
fn toml_error(src: &Source, e: &toml::de::Error) -> ConfigError {
    let (line, section, line_text) = match e.span() {
        Some(span) => locate(&src.text, span.start),
        None => (None, String::new(), String::new()),
    };
    let msg = e.message().trim().to_string();
    let (key, value) = match line_text.split_once('=') {
        Some((k, v)) if !line_text.trim_start().starts_with('[') => {
            let k = k.trim();
            let key = if section.is_empty() {
                k.to_string()
            } else {
                format!("{section}.{k}")
            };
            (key, Some(v.trim().to_string()))
        }
        _ => (String::new(), None),
    };
    let fix = if msg.starts_with("unknown field") {
        "remove or rename it (every key is described in /usr/share/doc/dps-agent/config.toml)"
            .to_string()
    } else if msg.starts_with("invalid type") {
        "write the value with the type shown (strings in double quotes)".to_string()
    } else {
        String::new()
    };
    let problem = if key.is_empty() && !line_text.is_empty() {
        format!("{msg} (at: {})", line_text.trim())
    } else {
        msg
    };
    ConfigError {
        file: src.file.clone(),
        line,
        key,
        value,
        problem,
        fix,
    }
}

/// The 1-based line, the enclosing table header, and the line's text for a byte offset.
fn locate(text: &str, offset: usize) -> (Option<usize>, String, String) {
    let mut section = String::new();
    let mut start = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let end = start + line.len();
        let t = line.trim();
        if offset < end || end == text.len() {
            return (Some(i + 1), section, line.trim_end().to_string());
        }
        if let Some(h) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            section = h.trim().to_string();
        }
        start = end;
    }
    (None, section, String::new())
}

/// The `config.d/*.toml` files beside the main config, sorted by name.
fn drop_ins(main: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = main
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("config.d");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ConfigError {
                file: dir,
                line: None,
                key: String::new(),
                value: None,
                problem: format!("cannot be listed: {e}"),
                fix: "fix its permissions or remove it".into(),
            })
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests;
