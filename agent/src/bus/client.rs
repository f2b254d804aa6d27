//! The CLI's side of the bus: `status` reads the daemon's properties, `renew`
//! calls its method. Also a template for local apps written in Rust.

use std::collections::HashMap;

use zbus::fdo::{DBusProxy, PropertiesProxy};
use zbus::names::{BusName, InterfaceName};
use zbus::OwnedVariant as OwnedValue;

use super::{connect, BusError, BUS_NAME, INTERFACE, OBJECT_PATH};
use crate::config::BusChoice;
use crate::status::Status;

#[zbus::proxy(
    interface = "org.dpsagent.Agent1",
    default_service = "org.dpsagent.Agent",
    default_path = "/org/dpsagent/Agent"
)]
pub trait Agent1 {
    fn get_certificate_chain(&self) -> zbus::Result<String>;
    fn renew(&self) -> zbus::Result<()>;
    fn reprovision(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn certificate_renewed(&self, chain_path: &str, not_after: u64) -> zbus::Result<()>;
}

/// Whether a daemon owns the name on `conn`'s bus.
async fn daemon_present(conn: &zbus::Connection) -> Result<bool, BusError> {
    let dbus = DBusProxy::new(conn).await?;
    Ok(dbus
        .name_has_owner(BusName::from_static_str(BUS_NAME)?)
        .await?)
}

/// The daemon's status, or None when no daemon is on the bus.
pub async fn fetch_status(bus: &BusChoice) -> Result<Option<Status>, BusError> {
    let conn = connect(bus).await?;
    if !daemon_present(&conn).await? {
        return Ok(None);
    }
    let props = PropertiesProxy::builder(&conn)
        .destination(BUS_NAME)
        .path(OBJECT_PATH)
        .build()
        .await?;
    let all = props
        .get_all(InterfaceName::from_static_str(INTERFACE)?)
        .await?;
    Ok(Some(status_from_properties(&all)))
}

/// Asks the daemon to renew now. Returns false when no daemon is on the bus.
pub async fn request_renewal(bus: &BusChoice) -> Result<bool, BusError> {
    let conn = connect(bus).await?;
    if !daemon_present(&conn).await? {
        return Ok(false);
    }
    Agent1Proxy::new(&conn).await?.renew().await?;
    Ok(true)
}

fn string(all: &HashMap<String, OwnedValue>, k: &str) -> Option<String> {
    all.get(k)
        .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
        .filter(|s| !s.is_empty())
}

fn time(all: &HashMap<String, OwnedValue>, k: &str) -> Option<i64> {
    all.get(k)
        .and_then(|v| u64::try_from(v).ok())
        .filter(|&t| t > 0)
        .map(|t| t as i64)
}

/// Builds a [`Status`] from the interface's properties.
pub fn status_from_properties(all: &HashMap<String, OwnedValue>) -> Status {
    Status {
        state: string(all, "State").unwrap_or_else(|| "unknown".into()),
        source: "daemon".into(),
        registration_id: string(all, "RegistrationId").unwrap_or_default(),
        device_id: string(all, "DeviceId"),
        assigned_hub: string(all, "AssignedHub"),
        certificate_chain_path: string(all, "CertificateChainPath"),
        key_uri: string(all, "KeyUri"),
        not_before: time(all, "NotBefore"),
        not_after: time(all, "NotAfter"),
        renew_at: time(all, "RenewAt"),
        next_attempt: time(all, "NextAttempt"),
        thumbprint: string(all, "Thumbprint"),
        subject: string(all, "Subject"),
        issuer: string(all, "Issuer"),
        last_error: string(all, "LastError"),
        last_renewal: time(all, "LastRenewal"),
        failures: all
            .get("Failures")
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0),
        renewals: all
            .get("Renewals")
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0),
    }
}
