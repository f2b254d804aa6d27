//! dps-sim: a simulator of the Azure IoT Hub Device Provisioning Service device protocol
//! (MQTT 3.1.1 over TLS and HTTPS; X.509, symmetric-key and TPM onboarding; CSR -> issued
//! certificate chain) and, optionally,
//! of the IoT Hub a device is assigned to (X.509 connect, twin, telemetry, certificate
//! renewal), for end-to-end tests and demos. The binary (`main.rs`) is a thin CLI over these
//! modules.

pub mod auth;
pub mod dps;
pub mod duration;
pub mod events;
pub mod faults;
pub mod https;
pub mod hub;
pub mod hub_mqtt;
pub mod hub_topics;
pub mod issue;
pub mod mqtt;
pub mod pki;
pub mod server;
pub mod tls;
pub mod topics;
pub mod tpm;
pub mod wire;
