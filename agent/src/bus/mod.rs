//! The D-Bus service for local apps: `org.dpsagent.Agent` on the system bus,
//! object `/org/dpsagent/Agent`, interface `org.dpsagent.Agent1`. A thin view
//! of [`Status`]: properties mirror it and change with it (PropertiesChanged),
//! a renewal emits `CertificateRenewed`, and `Renew`/`Reprovision` become
//! daemon commands once the caller is authorised (see `auth`).
//! Anyone may read; only root and group `dps-agent-admin` may change anything.

mod auth;
pub mod client;

use tokio::sync::{mpsc, watch};
use zbus::connection::Builder;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection};

use crate::config::BusChoice;
use crate::lifecycle::daemon::Command;
use crate::status::Status;

pub const BUS_NAME: &str = "org.dpsagent.Agent";
pub const OBJECT_PATH: &str = "/org/dpsagent/Agent";
pub const INTERFACE: &str = "org.dpsagent.Agent1";
/// Members of this group may call the methods that change state.
pub const ADMIN_GROUP: &str = "dps-agent-admin";

/// Errors setting up the bus service.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to the {bus} bus: {source}")]
    Connect {
        bus: String,
        #[source]
        source: zbus::Error,
    },
    #[error("cannot own the name {BUS_NAME} on the {bus} bus: {reason} (the D-Bus policy /usr/share/dbus-1/system.d/org.dpsagent.Agent.conf lets only user dps-agent own it)")]
    Name { bus: String, reason: String },
    #[error("D-Bus: {0}")]
    Other(#[from] zbus::Error),
    #[error("D-Bus: {0}")]
    Call(#[from] zbus::fdo::Error),
}

/// Human name of a bus choice, for messages.
pub fn describe(bus: &BusChoice) -> String {
    match bus {
        BusChoice::System => "system".into(),
        BusChoice::Session => "session".into(),
        BusChoice::Address(a) => a.clone(),
    }
}

/// Connects to the configured bus (no name requested).
pub async fn connect(bus: &BusChoice) -> Result<Connection, BusError> {
    let builder = match bus {
        BusChoice::System => Builder::system(),
        BusChoice::Session => Builder::session(),
        BusChoice::Address(a) => Builder::address(a.as_str()),
    };
    builder.build().await.map_err(|source| BusError::Connect {
        bus: describe(bus),
        source,
    })
}

/// The exported object.
pub struct AgentObject {
    status: watch::Receiver<Status>,
    commands: mpsc::Sender<Command>,
}

impl AgentObject {
    fn now(&self) -> Status {
        self.status.borrow().clone()
    }

    async fn send(&self, cmd: Command) -> zbus::fdo::Result<()> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| zbus::fdo::Error::Failed("the daemon is stopping".into()))
    }
}

fn text(v: &Option<String>) -> String {
    v.clone().unwrap_or_default()
}

fn time(v: Option<i64>) -> u64 {
    v.map(|t| t.max(0) as u64).unwrap_or(0)
}

/// The device identity as local apps see it. Times are Unix seconds (0 when
/// unknown); strings are empty when unknown.
#[interface(name = "org.dpsagent.Agent1")]
impl AgentObject {
    /// unprovisioned, provisioning, provisioned, renewing, failed or expired.
    #[zbus(property)]
    fn state(&self) -> String {
        self.now().state
    }

    /// The DPS registration id.
    #[zbus(property)]
    fn registration_id(&self) -> String {
        self.now().registration_id
    }

    /// The IoT Hub device id DPS assigned.
    #[zbus(property)]
    fn device_id(&self) -> String {
        text(&self.now().device_id)
    }

    /// The IoT Hub host name DPS assigned.
    #[zbus(property)]
    fn assigned_hub(&self) -> String {
        text(&self.now().assigned_hub)
    }

    /// The PEM certificate chain (leaf first) of the operational identity.
    #[zbus(property)]
    fn certificate_chain_path(&self) -> String {
        text(&self.now().certificate_chain_path)
    }

    /// The operational key's URI (tpm:, pkcs11: or file:): a reference, never key material.
    #[zbus(property)]
    fn key_uri(&self) -> String {
        text(&self.now().key_uri)
    }

    /// Start of the certificate's validity.
    #[zbus(property)]
    fn not_before(&self) -> u64 {
        time(self.now().not_before)
    }

    /// End of the certificate's validity.
    #[zbus(property)]
    fn not_after(&self) -> u64 {
        time(self.now().not_after)
    }

    /// When the certificate will be renewed.
    #[zbus(property)]
    fn renew_at(&self) -> u64 {
        time(self.now().renew_at)
    }

    /// The last problem, empty when the last attempt succeeded.
    #[zbus(property)]
    fn last_error(&self) -> String {
        text(&self.now().last_error)
    }

    /// When the current identity was received.
    #[zbus(property)]
    fn last_renewal(&self) -> u64 {
        time(self.now().last_renewal)
    }

    /// After a failure: when the next attempt is due (0 otherwise).
    #[zbus(property)]
    fn next_attempt(&self) -> u64 {
        time(self.now().next_attempt)
    }

    /// Uppercase hex SHA-256 of the leaf certificate.
    #[zbus(property)]
    fn thumbprint(&self) -> String {
        text(&self.now().thumbprint)
    }

    /// The leaf certificate's subject.
    #[zbus(property)]
    fn subject(&self) -> String {
        text(&self.now().subject)
    }

    /// The leaf certificate's issuer.
    #[zbus(property)]
    fn issuer(&self) -> String {
        text(&self.now().issuer)
    }

    /// Consecutive failed attempts.
    #[zbus(property)]
    fn failures(&self) -> u32 {
        self.now().failures
    }

    /// Identities committed since the state directory was made.
    #[zbus(property)]
    fn renewals(&self) -> u64 {
        self.now().renewals
    }

    /// The operational certificate chain, PEM, leaf first.
    async fn get_certificate_chain(&self) -> zbus::fdo::Result<String> {
        let path = self
            .now()
            .certificate_chain_path
            .ok_or_else(|| zbus::fdo::Error::Failed("the device is not provisioned yet".into()))?;
        tokio::fs::read_to_string(&path)
            .await
            .map_err(|e| zbus::fdo::Error::Failed(format!("cannot read {path}: {e}")))
    }

    /// Renew the certificate now (root or group dps-agent-admin).
    async fn renew(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<()> {
        let who = auth::authorize(conn, &header, "Renew").await?;
        log::info!("renewal requested over D-Bus by {who}");
        self.send(Command::Renew).await
    }

    /// Provision again through DPS now, whatever the current identity (root or
    /// group dps-agent-admin). Every renewal is a new DPS registration, so this
    /// differs from Renew only in intent (and in the log).
    async fn reprovision(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<()> {
        let who = auth::authorize(conn, &header, "Reprovision").await?;
        log::info!("reprovisioning requested over D-Bus by {who}");
        self.send(Command::Renew).await
    }

    /// A new certificate was committed.
    #[zbus(signal)]
    async fn certificate_renewed(
        emitter: &SignalEmitter<'_>,
        chain_path: &str,
        not_after: u64,
    ) -> zbus::Result<()>;
}

/// Serves the interface until the process ends: owns the name (taking it
/// over from a stale owner), then mirrors every status change as
/// PropertiesChanged, and emits CertificateRenewed when a new identity is
/// committed.
pub async fn serve(
    bus: &BusChoice,
    status: watch::Receiver<Status>,
    commands: mpsc::Sender<Command>,
) -> Result<Connection, BusError> {
    let conn = connect(bus).await?;
    let object = AgentObject {
        status: status.clone(),
        commands,
    };
    conn.object_server().at(OBJECT_PATH, object).await?;
    // The default flags take the name over from a stale owner and let a newer
    // instance take it from us (a restart overlapping the old process).
    conn.request_name(BUS_NAME)
        .await
        .map_err(|e| BusError::Name {
            bus: describe(bus),
            reason: e.to_string(),
        })?;
    let iface = conn
        .object_server()
        .interface::<_, AgentObject>(OBJECT_PATH)
        .await?;
    let mut status = status;
    tokio::spawn(async move {
        let mut prev = status.borrow_and_update().clone();
        while status.changed().await.is_ok() {
            let cur = status.borrow_and_update().clone();
            if let Err(e) = emit_changes(&iface, &prev, &cur).await {
                log::warn!("D-Bus: cannot emit a change signal: {e}");
            }
            prev = cur;
        }
    });
    Ok(conn)
}

async fn emit_changes(
    iface: &zbus::object_server::InterfaceRef<AgentObject>,
    a: &Status,
    b: &Status,
) -> zbus::Result<()> {
    let e = iface.signal_emitter();
    let obj = iface.get().await;
    macro_rules! changed {
        ($($field:ident => $emit:ident),* $(,)?) => {
            $( if a.$field != b.$field { obj.$emit(e).await?; } )*
        };
    }
    changed!(
        state => state_changed,
        registration_id => registration_id_changed,
        device_id => device_id_changed,
        assigned_hub => assigned_hub_changed,
        certificate_chain_path => certificate_chain_path_changed,
        key_uri => key_uri_changed,
        not_before => not_before_changed,
        not_after => not_after_changed,
        renew_at => renew_at_changed,
        last_error => last_error_changed,
        last_renewal => last_renewal_changed,
        next_attempt => next_attempt_changed,
        thumbprint => thumbprint_changed,
        subject => subject_changed,
        issuer => issuer_changed,
        failures => failures_changed,
        renewals => renewals_changed,
    );
    if b.renewals > a.renewals && b.thumbprint.is_some() && b.thumbprint != a.thumbprint {
        AgentObject::certificate_renewed(
            e,
            b.certificate_chain_path.as_deref().unwrap_or_default(),
            time(b.not_after),
        )
        .await?;
    }
    Ok(())
}
