//! The config file as written: every key optional, unknown keys refused. One of
//! these is read from each file (main file, then drop-ins) so errors name the
//! file they are in; the merged table is read once more and then validated.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub dps: Option<RawDps>,
    pub operational: Option<RawOperational>,
    pub hub: Option<RawHub>,
    pub tpm: Option<RawTpm>,
    pub pkcs11: Option<RawPkcs11>,
    pub state: Option<RawState>,
    pub dbus: Option<RawDbus>,
    pub log: Option<RawLog>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDps {
    pub global_endpoint: Option<String>,
    pub id_scope: Option<String>,
    pub registration_id: Option<String>,
    pub transport: Option<String>,
    pub api_version: Option<String>,
    pub trust_bundle: Option<String>,
    pub payload: Option<toml::Table>,
    pub attempt_timeout: Option<String>,
    pub attestation: Option<RawAttestation>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAttestation {
    pub method: Option<String>,
    pub identity_cert: Option<String>,
    pub identity_key: Option<String>,
    pub key_file: Option<String>,
    pub enrollment: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOperational {
    pub key_backend: Option<String>,
    pub key_algorithm: Option<String>,
    pub renew_before: Option<String>,
    pub renew_jitter: Option<String>,
    pub rotate_key: Option<bool>,
    pub renewal_path: Option<String>,
    pub retry_max: Option<String>,
    pub max_clock_skew: Option<String>,
    pub issuer_trust: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHub {
    pub port: Option<i64>,
    pub api_version: Option<String>,
    pub verify_new_certificate: Option<bool>,
    pub report_twin: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTpm {
    pub tcti: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPkcs11 {
    pub module: Option<String>,
    pub token_label: Option<String>,
    pub token_serial: Option<String>,
    pub pin_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDbus {
    pub bus: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
}
