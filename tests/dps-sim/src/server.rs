//! `dps-sim serve`: loads the PKI, listens (DPS over MQTT and over HTTPS, and the IoT Hub when
//! asked), announces the ports in the ready file, accepts connections (one task each), applies
//! the connection-level faults (`hub-unreachable`, `mitm`) and stops cleanly when told to. The
//! per-connection protocols live in `mqtt.rs` and `https.rs` (DPS) and `hub_mqtt.rs`, the
//! service logic in `dps.rs` and `hub.rs`, the non-X.509 enrollments in `auth.rs`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::CertificateDer;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::auth::{Enrollments, NamedKey, TpmEnrollment};
use crate::dps::{Dps, DpsConfig};
use crate::duration::HumanDuration;
use crate::events::{Events, Service};
use crate::faults::{Fault, FaultSet, FaultSource};
use crate::hub::{Hub, HubConfig};
use crate::issue::CertIssuer;
use crate::tls::{ClientAuth, ClientChainValidator, ServerTls};
use crate::{https, hub_mqtt, mqtt, pki};

/// Time allowed for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time open connections get to finish after a shutdown request.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything `serve` needs (the CLI flags).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub pki: PathBuf,
    pub ready_file: PathBuf,
    pub events: Option<PathBuf>,
    pub listen: IpAddr,
    pub mqtt_port: u16,
    /// Port of the DPS HTTPS listener (0 = OS-chosen).
    pub https_port: u16,
    pub id_scope: String,
    /// Enrollment trust anchors; empty = `{pki}/bootstrap-root.pem`.
    pub trust_ca: Vec<PathBuf>,
    pub assigned_hub: String,
    pub retry_after: u64,
    pub polls_before_assign: u32,
    pub cert_validity: HumanDuration,
    pub faults: Vec<Fault>,
    pub control: Option<PathBuf>,
    /// Port of the IoT Hub listener (0 = OS-chosen); `None` = no hub.
    pub hub_port: Option<u16>,
    /// Where the hub writes the device twins after every change.
    pub twin_file: Option<PathBuf>,
    /// Individual symmetric-key enrollments (`REGID=KEY`).
    pub symmetric_keys: Vec<NamedKey>,
    /// Symmetric-key enrollment groups (`NAME=KEY`).
    pub group_keys: Vec<NamedKey>,
    /// TPM enrollments (`REGID=EK`).
    pub tpm_enrollments: Vec<TpmEnrollment>,
    /// Seconds added to the real time when checking SAS expiry.
    pub clock_offset: i64,
}

/// The IoT Hub half of the simulator.
#[derive(Debug)]
pub struct HubSide {
    pub hub: Hub,
    /// Trusts only the issuing CA (`issuing-ca.pem`), as ADR syncs it to the hub.
    pub validator: ClientChainValidator,
}

/// State shared by all connections.
#[derive(Debug)]
pub struct Simulator {
    pub dps: Dps,
    pub events: Events,
    pub faults: FaultSource,
    /// The enrollment's onboarding trust (`--trust-ca`).
    pub validator: ClientChainValidator,
    /// Symmetric-key and TPM enrollments.
    pub enrollments: Enrollments,
    pub id_scope: String,
    pub hub: Option<HubSide>,
}

/// What the accept path knows about a connection when MQTT starts.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Connection number (from 1, in accept order, shared by DPS and hub).
    pub conn: u64,
    /// The client's certificate chain as sent in the TLS handshake (leaf first).
    pub chain: Vec<CertificateDer<'static>>,
    /// The fault that chose the TLS server certificate (`mitm`), if any.
    pub tls_fault: Option<Fault>,
}

/// Runs the simulator until `shutdown` completes.
pub async fn serve(opts: ServeOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let tls = ServerTls::load(&opts.pki).context("loading the TLS server identities")?;
    let trust = if opts.trust_ca.is_empty() {
        vec![pki::cert_file(&opts.pki, pki::BOOTSTRAP_ROOT)]
    } else {
        opts.trust_ca.clone()
    };
    let validator = ClientChainValidator::from_files(&trust)
        .context("loading the enrollment trust anchors (--trust-ca)")?;
    let issuer = CertIssuer::load(&opts.pki).context("loading the issuing CA")?;
    let hub = match opts.hub_port {
        None => None,
        Some(_) => Some(HubSide {
            hub: Hub::new(HubConfig {
                hub_name: opts.assigned_hub.clone(),
                twin_file: opts.twin_file.clone(),
            }),
            validator: ClientChainValidator::from_files(&[pki::cert_file(
                &opts.pki,
                pki::ISSUING_CA,
            )])
            .context("loading the hub's trust anchor (issuing-ca.pem)")?,
        }),
    };
    let events = match &opts.events {
        Some(path) => Events::to_file(path)
            .with_context(|| format!("cannot create the events file {}", path.display()))?,
        None => Events::disabled(),
    };
    let sim = Arc::new(Simulator {
        dps: Dps::new(
            DpsConfig {
                assigned_hub: opts.assigned_hub.clone(),
                retry_after: opts.retry_after,
                polls_before_assign: opts.polls_before_assign,
                cert_validity: opts.cert_validity.as_duration(),
            },
            issuer,
        ),
        events,
        faults: FaultSource::new(FaultSet::new(opts.faults.clone()), opts.control.clone()),
        validator,
        enrollments: Enrollments::new(
            &opts.id_scope,
            &opts.symmetric_keys,
            &opts.group_keys,
            &opts.tpm_enrollments,
            opts.clock_offset,
        ),
        id_scope: opts.id_scope.clone(),
        hub,
    });

    let listener = bind(opts.listen, opts.mqtt_port).await?;
    let https_listener = bind(opts.listen, opts.https_port).await?;
    let hub_listener = match opts.hub_port {
        Some(port) => Some(bind(opts.listen, port).await?),
        None => None,
    };
    let dps_port = local_port(&listener)?;
    let https_port = local_port(&https_listener)?;
    let hub_port = hub_listener.as_ref().map(local_port).transpose()?;
    write_ready_file(&opts.ready_file, dps_port, https_port, hub_port)?;
    eprintln!(
        "dps-sim: DPS listening on {}:{dps_port} (MQTT 3.1.1 over TLS) and {}:{https_port} (HTTPS), id scope {}, ready file {}",
        opts.listen,
        opts.listen,
        opts.id_scope,
        opts.ready_file.display()
    );
    if let Some(port) = hub_port {
        eprintln!(
            "dps-sim: IoT Hub {:?} listening on {}:{port} (MQTT 3.1.1 over TLS)",
            opts.assigned_hub, opts.listen
        );
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut next_conn: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted.map(|a| (Listener::DpsMqtt, a)),
            accepted = https_listener.accept() => accepted.map(|a| (Listener::DpsHttps, a)),
            accepted = accept_opt(hub_listener.as_ref()) => accepted.map(|a| (Listener::Hub, a)),
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        match accepted {
            Ok((listener, (tcp, peer))) => {
                next_conn += 1;
                tasks.spawn(connection(
                    listener,
                    tcp,
                    peer,
                    next_conn,
                    tls.clone(),
                    sim.clone(),
                    stop_rx.clone(),
                ));
            }
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                eprintln!("dps-sim: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    eprintln!("dps-sim: shutting down");
    drop(listener);
    drop(https_listener);
    drop(hub_listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    Ok(())
}

async fn bind(addr: IpAddr, port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((addr, port))
        .await
        .with_context(|| format!("cannot listen on {addr}:{port}"))
}

fn local_port(listener: &TcpListener) -> anyhow::Result<u16> {
    Ok(listener
        .local_addr()
        .context("reading the listening address")?
        .port())
}

/// Accepts on `listener`, or waits forever when there is none.
async fn accept_opt(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Which listener accepted a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    DpsMqtt,
    DpsHttps,
    Hub,
}

async fn connection(
    listener: Listener,
    tcp: TcpStream,
    peer: SocketAddr,
    conn: u64,
    tls: ServerTls,
    sim: Arc<Simulator>,
    stop: watch::Receiver<bool>,
) {
    let service = match listener {
        Listener::Hub => Service::Hub,
        Listener::DpsMqtt | Listener::DpsHttps => Service::Dps,
    };
    let faults = sim.faults.current().await;
    if service == Service::Hub && faults.contains(Fault::HubUnreachable) {
        drop(tcp);
        sim.events.emit(
            service,
            conn,
            "disconnect",
            json!({
                "reason": "closed before the TLS handshake (hub-unreachable fault)",
                "fault": Fault::HubUnreachable.name(),
                "peer": peer.to_string(),
            }),
        );
        return;
    }
    let _ = tcp.set_nodelay(true);
    // DPS asks for a client certificate but symmetric-key and TPM devices have none.
    let client_auth = match service {
        Service::Hub => ClientAuth::Required,
        Service::Dps => ClientAuth::Optional,
    };
    let (config, tls_fault) = tls.for_faults(&faults, client_auth);
    let acceptor = TlsAcceptor::from(config);
    let tls_error = |message: String| {
        sim.events.emit(
            service,
            conn,
            "tls_error",
            json!({
                "message": message,
                "peer": peer.to_string(),
                "fault": tls_fault.map(|f| f.name()),
            }),
        );
    };
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return tls_error(e.to_string()),
        Err(_) => return tls_error("TLS handshake timed out after 10 s".into()),
    };
    let chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    let peer = Peer {
        conn,
        chain,
        tls_fault,
    };
    match (listener, &sim.hub) {
        (Listener::DpsMqtt, _) => mqtt::serve_connection(stream, peer, &sim, stop).await,
        (Listener::DpsHttps, _) => https::serve_connection(stream, peer, sim.clone(), stop).await,
        (Listener::Hub, Some(hub)) => {
            hub_mqtt::serve_connection(stream, peer, &sim, hub, stop).await;
        }
        // No hub listener exists without a hub.
        (Listener::Hub, None) => {}
    }
}

/// Writes `{"mqtt_port": .., "https_port": .., "hub_port": ..|null, "pid": ..}` atomically
/// (temp file + rename).
pub fn write_ready_file(
    path: &Path,
    port: u16,
    https_port: u16,
    hub_port: Option<u16>,
) -> anyhow::Result<()> {
    let body = json!({
        "mqtt_port": port,
        "https_port": https_port,
        "hub_port": hub_port,
        "pid": std::process::id()
    })
    .to_string();
    pki::write_atomic(path, body.as_bytes(), 0o644)
        .with_context(|| format!("cannot write the ready file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_file_with_and_without_hub() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.json");
        write_ready_file(&path, 4000, 4002, None).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            v,
            json!({"mqtt_port": 4000, "https_port": 4002, "hub_port": null, "pid": std::process::id()})
        );
        write_ready_file(&path, 4000, 4002, Some(4001)).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["hub_port"], 4001);
    }
}
