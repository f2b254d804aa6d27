//! Turns the raw config into typed values, one small check per key. Each check
//! returns a [`ConfigError`] naming the key, the value and the fix.

use std::path::PathBuf;
use std::time::Duration;

use super::raw::*;
use super::*;

/// Makes errors for one key, knowing where it was set.
struct Ctx<'a> {
    origin: &'a Origins,
}

impl Ctx<'_> {
    fn err(
        &self,
        key: &str,
        value: Option<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> ConfigError {
        let (file, line) = self.origin.of(key);
        ConfigError {
            file,
            line,
            key: key.to_string(),
            value,
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    fn bad(
        &self,
        key: &str,
        value: &str,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> ConfigError {
        self.err(key, Some(format!("{value:?}")), problem, fix)
    }

    fn missing(&self, key: &str, fix: impl Into<String>) -> ConfigError {
        let (section, name) = key.rsplit_once('.').unwrap_or(("", key));
        let mut e = self.err(key, None, "is missing", fix);
        e.problem = format!("is missing (add `{name} = …` under [{section}])");
        e.file = self.origin.main.clone();
        e.line = None;
        e
    }

    fn duration(
        &self,
        key: &str,
        v: Option<String>,
        default: &str,
    ) -> Result<HumanDuration, ConfigError> {
        let s = v.unwrap_or_else(|| default.to_string());
        HumanDuration::parse(&s).map_err(|e| self.bad(key, &s, "is not a duration", e))
    }

    fn path(&self, key: &str, v: String) -> Result<PathBuf, ConfigError> {
        if v.trim().is_empty() {
            return Err(self.bad(key, &v, "is empty", "give an absolute path"));
        }
        let p = PathBuf::from(&v);
        if !p.is_absolute() {
            return Err(self.bad(
                key,
                &v,
                "is not an absolute path",
                format!("write it from the root, e.g. \"/etc/dps-agent/{v}\""),
            ));
        }
        Ok(p)
    }
}

pub(super) fn build(
    raw: RawConfig,
    files: Vec<PathBuf>,
    origin: &Origins,
) -> Result<Config, ConfigError> {
    let cx = Ctx { origin };
    let dps = dps(&cx, raw.dps.unwrap_or_default())?;
    let operational = operational(&cx, raw.operational.unwrap_or_default())?;
    let hub = hub(&cx, raw.hub.unwrap_or_default())?;
    let tpm = TpmConfig {
        tcti: raw
            .tpm
            .and_then(|t| t.tcti)
            .unwrap_or_else(|| "device:/dev/tpmrm0".to_string()),
    };
    let pkcs11 = pkcs11(&cx, raw.pkcs11.unwrap_or_default())?;
    let state = StateConfig {
        dir: cx.path(
            "state.dir",
            raw.state
                .and_then(|s| s.dir)
                .unwrap_or_else(|| "/var/lib/dps-agent".to_string()),
        )?,
    };
    let dbus = dbus(&cx, raw.dbus.unwrap_or_default())?;
    let log = log_config(&cx, raw.log.unwrap_or_default())?;
    let config = Config {
        files,
        dps,
        operational,
        hub,
        tpm,
        pkcs11,
        state,
        dbus,
        log,
    };
    cross_checks(&cx, &config)?;
    Ok(config)
}

fn dps(cx: &Ctx, d: RawDps) -> Result<DpsConfig, ConfigError> {
    let transport = match d.transport.as_deref().unwrap_or("mqtt") {
        "mqtt" => Transport::Mqtt,
        "https" => Transport::Https,
        other => {
            return Err(cx.bad(
                "dps.transport",
                other,
                "is not a transport",
                "use \"mqtt\" or \"https\"",
            ))
        }
    };
    let default_port = match transport {
        Transport::Mqtt => 8883,
        Transport::Https => 443,
    };
    let endpoint_text = d
        .global_endpoint
        .unwrap_or_else(|| "global.azure-devices-provisioning.net".to_string());
    let endpoint = endpoint(cx, "dps.global_endpoint", &endpoint_text, default_port)?;
    let id_scope = d.id_scope.ok_or_else(|| {
        cx.missing(
            "dps.id_scope",
            "copy the ID Scope from the DPS overview page in the Azure portal",
        )
    })?;
    if id_scope.is_empty() || !id_scope.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(cx.bad(
            "dps.id_scope",
            &id_scope,
            "is not a DPS ID scope",
            "copy it from the DPS overview page; it looks like \"0ne00A1B2C3\"",
        ));
    }
    let registration_id = d.registration_id.ok_or_else(|| {
        cx.missing(
            "dps.registration_id",
            "use the device's registration id (the CN of its bootstrap certificate)",
        )
    })?;
    if let Err(why) = check_registration_id(&registration_id) {
        return Err(cx.bad(
            "dps.registration_id",
            &registration_id,
            why,
            "use at most 128 characters of a-z 0-9 - . _ :, lowercase, starting and ending with a letter or digit",
        ));
    }
    let api_version = d
        .api_version
        .unwrap_or_else(|| DEFAULT_DPS_API_VERSION.to_string());
    if !api_supports_csr(&api_version) {
        return Err(cx.bad(
            "dps.api_version",
            &api_version,
            "does not support certificate issuance (the csr field)",
            format!("use \"{DEFAULT_DPS_API_VERSION}\" or later"),
        ));
    }
    let trust_bundle = cx.path(
        "dps.trust_bundle",
        d.trust_bundle
            .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".to_string()),
    )?;
    let payload = match d.payload {
        None => None,
        Some(t) => Some(serde_json::to_value(t).map_err(|e| {
            cx.err(
                "dps.payload",
                None,
                format!("cannot be turned into JSON: {e}"),
                "use plain strings, numbers, booleans, arrays and tables",
            )
        })?),
    };
    let attempt_timeout = cx.duration("dps.attempt_timeout", d.attempt_timeout, "5m")?;
    if attempt_timeout.as_secs() < 5 {
        return Err(cx.bad(
            "dps.attempt_timeout",
            &attempt_timeout.to_string(),
            "is too short for a registration",
            "use at least \"30s\"; the default is \"5m\"",
        ));
    }
    let attestation = attestation(cx, d.attestation.unwrap_or_default(), transport)?;
    Ok(DpsConfig {
        endpoint,
        id_scope,
        registration_id,
        transport,
        api_version,
        trust_bundle,
        payload,
        attempt_timeout: Duration::from_secs(attempt_timeout.as_secs()),
        attestation,
    })
}

/// DPS registration ids: ≤ 128 characters of `a-z 0-9 - . _ :`, lowercase, and
/// no special character at either end.
pub fn check_registration_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("is empty".into());
    }
    if id.len() > 128 {
        return Err(format!("is {} characters long (at most 128)", id.len()));
    }
    if let Some(c) = id.chars().find(|c| c.is_ascii_uppercase()) {
        return Err(format!(
            "contains the uppercase letter {c:?} (DPS ids are lowercase)"
        ));
    }
    if let Some(c) = id.chars().find(|c| {
        !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_' | ':'))
    }) {
        return Err(format!("contains {c:?}, which DPS does not allow"));
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !edge_ok(id.chars().next()) || !edge_ok(id.chars().last()) {
        return Err("starts or ends with a special character".into());
    }
    Ok(())
}

fn api_supports_csr(v: &str) -> bool {
    let date = v.get(..10).unwrap_or("");
    let well_formed = date.len() == 10
        && date.chars().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }
        });
    well_formed && date >= "2025-07-01"
}

fn endpoint(cx: &Ctx, key: &str, text: &str, default_port: u16) -> Result<Endpoint, ConfigError> {
    let t = text.trim();
    if t.contains("://") || t.contains('/') {
        return Err(cx.bad(key, text, "is not a host name", "write the host only, e.g. \"global.azure-devices-provisioning.net\" (optionally \":port\")"));
    }
    let (host, port) = match t.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let port: u16 = p.parse().ok().filter(|&p| p > 0).ok_or_else(|| {
                cx.bad(
                    key,
                    text,
                    "has an invalid port",
                    "write host:port with a port from 1 to 65535",
                )
            })?;
            (h.to_string(), port)
        }
        _ => (t.to_string(), default_port),
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace()) {
        return Err(cx.bad(
            key,
            text,
            "is not a host name",
            "write a DNS name or an IP address",
        ));
    }
    Ok(Endpoint { host, port })
}

fn attestation(
    cx: &Ctx,
    a: RawAttestation,
    transport: Transport,
) -> Result<Attestation, ConfigError> {
    let method = a.method.unwrap_or_else(|| "x509".to_string());
    match method.as_str() {
        "x509" => {
            for (k, v) in [("key_file", &a.key_file), ("enrollment", &a.enrollment)] {
                if v.is_some() {
                    return Err(cx.bad(
                        &format!("dps.attestation.{k}"),
                        v.as_deref().unwrap_or_default(),
                        "only applies to method = \"symmetric_key\"",
                        "remove it",
                    ));
                }
            }
            let cert = a.identity_cert.ok_or_else(|| {
                cx.missing(
                    "dps.attestation.identity_cert",
                    "point it at the bootstrap certificate (PEM, leaf first, intermediates may follow)",
                )
            })?;
            let identity_cert = cx.path("dps.attestation.identity_cert", cert)?;
            let key = a.identity_key.ok_or_else(|| {
                cx.missing(
                    "dps.attestation.identity_key",
                    "name the bootstrap key, e.g. \"file:/etc/dps-agent/bootstrap/device.key\" or \"tpm:…\"",
                )
            })?;
            let identity_key = KeyUri::parse(&key).map_err(|e| {
                let reason = match e {
                    crate::keys::KeyError::BadUri { reason, .. } => reason,
                    other => other.to_string(),
                };
                cx.err(
                    "dps.attestation.identity_key",
                    Some(format!("{:?}", redacted(&key))),
                    "is not a key URI",
                    reason,
                )
            })?;
            Ok(Attestation::X509 {
                identity_cert,
                identity_key,
            })
        }
        "symmetric_key" | "tpm" => {
            if method == "tpm" && transport == Transport::Mqtt {
                return Err(cx.bad(
                    "dps.attestation.method",
                    &method,
                    "needs HTTPS: DPS offers TPM attestation only over HTTPS",
                    "set [dps] transport = \"https\"",
                ));
            }
            for (k, v) in [
                ("identity_cert", &a.identity_cert),
                ("identity_key", &a.identity_key),
            ] {
                if v.is_some() {
                    return Err(cx.err(
                        &format!("dps.attestation.{k}"),
                        None,
                        "only applies to method = \"x509\"",
                        "remove it",
                    ));
                }
            }
            if method == "tpm" {
                for (k, v) in [("key_file", &a.key_file), ("enrollment", &a.enrollment)] {
                    if let Some(v) = v {
                        return Err(cx.bad(
                            &format!("dps.attestation.{k}"),
                            v,
                            "only applies to method = \"symmetric_key\"",
                            "remove it (the TPM's endorsement key is the credential)",
                        ));
                    }
                }
                return Ok(Attestation::Tpm);
            }
            let enrollment = match a.enrollment.as_deref().unwrap_or("individual") {
                "individual" => Enrollment::Individual,
                "group" => Enrollment::Group,
                other => {
                    return Err(cx.bad(
                        "dps.attestation.enrollment",
                        other,
                        "is not an enrollment kind",
                        "use \"individual\" (the key of this device's enrollment) or \"group\" (the enrollment group's key; the device key is derived from it)",
                    ))
                }
            };
            let key_file = a.key_file.ok_or_else(|| {
                cx.missing(
                    "dps.attestation.key_file",
                    "point it at a file (mode 0600) holding the enrollment's primary key in base64, e.g. \"/etc/dps-agent/bootstrap/dps.key\", or name a secret key in a PKCS#11 token, \"pkcs11:token=…;object=…;type=secret-key\"",
                )
            })?;
            let key = if key_file.starts_with("pkcs11:") {
                SymmetricKeySource::Token(KeyUri::parse(&key_file).map_err(|e| {
                    let reason = match e {
                        crate::keys::KeyError::BadUri { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    cx.err(
                        "dps.attestation.key_file",
                        Some(format!("{:?}", redacted(&key_file))),
                        "is not a key URI",
                        reason,
                    )
                })?)
            } else {
                SymmetricKeySource::File(cx.path("dps.attestation.key_file", key_file)?)
            };
            if let SymmetricKeySource::Token(uri) = &key {
                use crate::keys::pkcs11::{ObjectType, Pkcs11Uri};
                let kind = Pkcs11Uri::parse(uri.as_str())
                    .ok()
                    .and_then(|u| u.object_type());
                if kind != Some(ObjectType::SecretKey) {
                    return Err(cx.err(
                        "dps.attestation.key_file",
                        Some(format!("{:?}", uri.redacted())),
                        "does not name a secret key",
                        "add ;type=secret-key (the enrollment's key, imported into the token as a CKK_GENERIC_SECRET that may sign)",
                    ));
                }
            };
            Ok(Attestation::SymmetricKey { key, enrollment })
        }
        other => Err(cx.bad(
            "dps.attestation.method",
            other,
            "is not an attestation method",
            "use \"x509\", \"symmetric_key\" or \"tpm\"",
        )),
    }
}

fn redacted(uri: &str) -> String {
    KeyUri::parse(uri)
        .map(|u| u.redacted())
        .unwrap_or_else(|_| {
            uri.split("pin-value")
                .next()
                .unwrap_or_default()
                .to_string()
        })
}

fn operational(cx: &Ctx, o: RawOperational) -> Result<OperationalConfig, ConfigError> {
    let backend_name = o.key_backend.unwrap_or_else(|| "tpm".to_string());
    let key_backend = Backend::from_name(&backend_name).ok_or_else(|| {
        cx.bad(
            "operational.key_backend",
            &backend_name,
            "is not a key backend",
            "use \"tpm\", \"pkcs11\" or \"file\"",
        )
    })?;
    let alg_name = o.key_algorithm.unwrap_or_else(|| "ecdsa-p384".to_string());
    let key_algorithm = KeyAlgorithm::from_name(&alg_name).ok_or_else(|| {
        if alg_name.to_ascii_lowercase().starts_with("rsa") {
            cx.bad(
                "operational.key_algorithm",
                &alg_name,
                "is not supported: operational keys are ECDSA (DPS issues certificates for EC keys)",
                "use \"ecdsa-p384\" or \"ecdsa-p256\"; an RSA key is fine as the bootstrap key ([dps.attestation] identity_key)",
            )
        } else {
            cx.bad(
                "operational.key_algorithm",
                &alg_name,
                "is not supported",
                "use \"ecdsa-p384\" or \"ecdsa-p256\"",
            )
        }
    })?;
    let renew_before = cx.duration("operational.renew_before", o.renew_before, "7d")?;
    if renew_before.as_secs() == 0 {
        return Err(cx.bad(
            "operational.renew_before",
            "0s",
            "would renew only after expiry",
            "use e.g. \"7d\"",
        ));
    }
    let renew_jitter = cx.duration("operational.renew_jitter", o.renew_jitter, "6h")?;
    let renewal_path = match o.renewal_path.as_deref().unwrap_or("dps") {
        "dps" => RenewalPath::Dps,
        "hub" => RenewalPath::Hub,
        other => {
            return Err(cx.bad(
                "operational.renewal_path",
                other,
                "is not a renewal path",
                "use \"dps\" or \"hub\"",
            ))
        }
    };
    let retry_max = cx.duration("operational.retry_max", o.retry_max, "1h")?;
    if retry_max.as_secs() < 1 {
        return Err(cx.bad(
            "operational.retry_max",
            "0s",
            "would retry in a tight loop",
            "use e.g. \"1h\"",
        ));
    }
    let max_clock_skew = cx.duration("operational.max_clock_skew", o.max_clock_skew, "5m")?;
    let issuer_trust = match o.issuer_trust {
        Some(p) => Some(cx.path("operational.issuer_trust", p)?),
        None => None,
    };
    Ok(OperationalConfig {
        key_backend,
        key_algorithm,
        renew_before,
        renew_jitter,
        rotate_key: o.rotate_key.unwrap_or(true),
        renewal_path,
        retry_max,
        max_clock_skew,
        issuer_trust,
    })
}

fn hub(cx: &Ctx, h: RawHub) -> Result<HubConfig, ConfigError> {
    let port = match h.port {
        None => 8883,
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => {
            return Err(cx.err(
                "hub.port",
                Some(p.to_string()),
                "is not a TCP port",
                "use a number from 1 to 65535 (IoT Hub listens on 8883)",
            ))
        }
    };
    Ok(HubConfig {
        port,
        api_version: h
            .api_version
            .unwrap_or_else(|| DEFAULT_HUB_API_VERSION.to_string()),
        verify_new_certificate: h.verify_new_certificate.unwrap_or(true),
        report_twin: h.report_twin.unwrap_or(true),
    })
}

fn pkcs11(cx: &Ctx, p: RawPkcs11) -> Result<Pkcs11Config, ConfigError> {
    Ok(Pkcs11Config {
        module: p.module.map(|m| cx.path("pkcs11.module", m)).transpose()?,
        token_label: p.token_label,
        token_serial: p.token_serial,
        pin_file: p
            .pin_file
            .map(|m| cx.path("pkcs11.pin_file", m))
            .transpose()?,
    })
}

fn dbus(cx: &Ctx, d: RawDbus) -> Result<DbusConfig, ConfigError> {
    let bus = match d.bus.as_deref().unwrap_or("system") {
        "system" => BusChoice::System,
        "session" => BusChoice::Session,
        a if a.contains('=') && a.contains(':') => BusChoice::Address(a.to_string()),
        other => {
            return Err(cx.bad(
                "dbus.bus",
                other,
                "is not a bus",
                "use \"system\", \"session\" or an address such as \"unix:path=/run/dbus/system_bus_socket\"",
            ))
        }
    };
    Ok(DbusConfig { bus })
}

fn log_config(cx: &Ctx, l: RawLog) -> Result<LogConfig, ConfigError> {
    let s = l.level.unwrap_or_else(|| "info".to_string());
    let level = match s.as_str() {
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        other => {
            return Err(cx.bad(
                "log.level",
                other,
                "is not a log level",
                "use \"error\", \"warn\", \"info\", \"debug\" or \"trace\"",
            ))
        }
    };
    Ok(LogConfig { level })
}

/// Checks that involve several keys.
fn cross_checks(cx: &Ctx, c: &Config) -> Result<(), ConfigError> {
    if c.operational.key_backend == Backend::Pkcs11 && c.pkcs11.module.is_none() {
        return Err(cx.missing(
            "pkcs11.module",
            "operational.key_backend = \"pkcs11\" needs the PKCS#11 module path",
        ));
    }
    if c.operational.key_backend == Backend::Pkcs11
        && c.pkcs11.token_label.is_none()
        && c.pkcs11.token_serial.is_none()
    {
        return Err(cx.missing(
            "pkcs11.token_label",
            "operational.key_backend = \"pkcs11\" needs the token: set token_label (or token_serial); `pkcs11-tool --module MODULE --list-token-slots` lists them",
        ));
    }
    let identity_key = match &c.dps.attestation {
        Attestation::X509 { identity_key, .. } => Some(identity_key),
        Attestation::SymmetricKey { .. } | Attestation::Tpm => None,
    };
    if identity_key.is_some_and(|k| {
        k.backend() == Backend::Pkcs11
            && c.pkcs11.module.is_none()
            && !k.as_str().contains("module-path=")
    }) {
        return Err(cx.missing(
            "pkcs11.module",
            "dps.attestation.identity_key is a pkcs11: URI; name the PKCS#11 module here (or add ?module-path=… to the URI)",
        ));
    }
    Ok(())
}
