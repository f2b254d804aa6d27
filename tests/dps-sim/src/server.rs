//! `dps-sim serve`: loads the PKI, listens, announces the port in the ready file, accepts TLS
//! connections (one task each) and stops cleanly when told to. The per-connection protocol
//! lives in `mqtt.rs`, the service logic in `dps.rs`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::dps::{Dps, DpsConfig};
use crate::duration::HumanDuration;
use crate::events::Events;
use crate::faults::{Fault, FaultSet, FaultSource};
use crate::issue::CertIssuer;
use crate::tls::{self, ClientChainValidator};
use crate::{mqtt, pki};

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
    pub id_scope: String,
    /// Enrollment trust anchors; empty = `{pki}/bootstrap-root.pem`.
    pub trust_ca: Vec<PathBuf>,
    pub assigned_hub: String,
    pub retry_after: u64,
    pub polls_before_assign: u32,
    pub cert_validity: HumanDuration,
    pub faults: Vec<Fault>,
    pub control: Option<PathBuf>,
}

/// State shared by all connections.
#[derive(Debug)]
pub struct Simulator {
    pub dps: Dps,
    pub events: Events,
    pub faults: FaultSource,
    pub validator: ClientChainValidator,
    pub id_scope: String,
}

/// Runs the simulator until `shutdown` completes.
pub async fn serve(opts: ServeOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let tls_config = tls::server_config(&opts.pki).context("loading the TLS server identity")?;
    let trust = if opts.trust_ca.is_empty() {
        vec![pki::cert_file(&opts.pki, pki::BOOTSTRAP_ROOT)]
    } else {
        opts.trust_ca.clone()
    };
    let validator = ClientChainValidator::from_files(&trust)
        .context("loading the enrollment trust anchors (--trust-ca)")?;
    let issuer = CertIssuer::load(&opts.pki).context("loading the issuing CA")?;
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
        id_scope: opts.id_scope.clone(),
    });

    let listener = TcpListener::bind((opts.listen, opts.mqtt_port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", opts.listen, opts.mqtt_port))?;
    let local = listener
        .local_addr()
        .context("reading the listening address")?;
    write_ready_file(&opts.ready_file, local.port())?;
    eprintln!(
        "dps-sim: listening on {local} (MQTT 3.1.1 over TLS), id scope {}, ready file {}",
        opts.id_scope,
        opts.ready_file.display()
    );

    let acceptor = TlsAcceptor::from(tls_config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut next_conn: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    next_conn += 1;
                    tasks.spawn(connection(
                        tcp,
                        peer,
                        next_conn,
                        acceptor.clone(),
                        sim.clone(),
                        stop_rx.clone(),
                    ));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    eprintln!("dps-sim: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    eprintln!("dps-sim: shutting down");
    drop(listener);
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

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    conn: u64,
    acceptor: TlsAcceptor,
    sim: Arc<Simulator>,
    stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            sim.events.emit(
                conn,
                "tls_error",
                json!({"message": e.to_string(), "peer": peer.to_string()}),
            );
            return;
        }
        Err(_) => {
            sim.events.emit(
                conn,
                "tls_error",
                json!({"message": "TLS handshake timed out after 10 s", "peer": peer.to_string()}),
            );
            return;
        }
    };
    let chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    mqtt::serve_connection(stream, conn, chain, &sim, stop).await;
}

/// Writes `{"mqtt_port": .., "pid": ..}` atomically (temp file + rename).
pub fn write_ready_file(path: &Path, port: u16) -> anyhow::Result<()> {
    let body = json!({"mqtt_port": port, "pid": std::process::id()}).to_string();
    pki::write_atomic(path, body.as_bytes(), 0o644)
        .with_context(|| format!("cannot write the ready file {}", path.display()))
}
