//! dps-agent: gives a Linux IoT gateway its Azure IoT identity and keeps it alive.
//!
//! Layers, top to bottom (no module imports one above it):
//! - `lifecycle`: provisioning and renewal, the only place that decides;
//! - `dps`, `bootstrap`: the DPS device API and the onboarding credential;
//! - `tls`, `csr`: rustls configs and PKCS#10 requests over any key backend;
//! - `keys`, `config`, `chain`, `store`, `status`, `logging`, `clock`, `backoff`,
//!   `fsutil`: the ground floor.

pub mod backoff;
pub mod bootstrap;
pub mod bus;
pub mod chain;
pub mod check;
pub mod clock;
pub mod config;
pub mod csr;
pub mod docs;
pub mod dps;
pub mod fsutil;
pub mod hub;
pub mod keys;
pub mod lifecycle;
pub mod logging;
pub mod notify;
pub mod status;
pub mod store;
pub mod tls;
