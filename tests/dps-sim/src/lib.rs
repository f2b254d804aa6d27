//! dps-sim: a simulator of the Azure IoT Hub Device Provisioning Service device protocol
//! (MQTT 3.1.1 over TLS, X.509 onboarding, CSR -> issued certificate chain) for end-to-end
//! tests and demos. The binary (`main.rs`) is a thin CLI over these modules.

pub mod dps;
pub mod duration;
pub mod events;
pub mod faults;
pub mod issue;
pub mod mqtt;
pub mod pki;
pub mod server;
pub mod tls;
pub mod topics;
