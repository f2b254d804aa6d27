//! Helpers shared by the integration tests: run the `dps-sim` binary on OS-chosen ports with a
//! freshly generated PKI, and talk to it with rumqttc as a device would.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use dps_sim::pki;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P384_SHA384};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;

pub const REG: &str = "gw-0001";
pub const SCOPE: &str = "0ne00000000";
pub const API: &str = "2025-07-01-preview";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dps-sim")
}

/// A running simulator; killed (by its own pid) when dropped.
pub struct Sim {
    child: Child,
    pub dir: PathBuf,
    pub port: u16,
    /// The hub port from the ready file (`None` when no hub runs).
    pub hub_port: Option<u16>,
}

impl Sim {
    pub fn start(dir: &Path, extra: &[&str]) -> Sim {
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let child = Command::new(bin())
            .arg("serve")
            .arg("--pki")
            .arg(dir)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--events")
            .arg(dir.join("events.jsonl"))
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("start dps-sim");
        let deadline = Instant::now() + Duration::from_secs(30);
        let (port, hub_port) = loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let v: Value = serde_json::from_str(&text).expect("ready file is JSON");
                assert_eq!(v["pid"], child.id());
                let hub_port = match &v["hub_port"] {
                    Value::Null => None,
                    p => Some(u16::try_from(p.as_u64().expect("hub_port")).unwrap()),
                };
                assert!(v.as_object().unwrap().contains_key("hub_port"), "{v}");
                break (
                    u16::try_from(v["mqtt_port"].as_u64().unwrap()).unwrap(),
                    hub_port,
                );
            }
            assert!(Instant::now() < deadline, "dps-sim did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_ne!(port, 0);
        Sim {
            child,
            dir: dir.to_path_buf(),
            port,
            hub_port,
        }
    }

    /// Waits (up to 10 s) until `count` events of kind `event` have been written.
    pub fn wait_for(&self, event: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.events().iter().filter(|e| e["event"] == event).count() < count {
            assert!(
                Instant::now() < deadline,
                "no {event} event: {:#?}",
                self.events()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("events.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("event line is JSON"))
            .collect()
    }

    /// SIGTERM, then expect a clean exit.
    pub fn stop(mut self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "dps-sim exit status {status}");
                return;
            }
            assert!(Instant::now() < deadline, "dps-sim ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn make_pki(dir: &Path) {
    let status = Command::new(bin())
        .args(["pki", "--out"])
        .arg(dir)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

pub fn key_der(pem: &str) -> PrivateKeyDer<'static> {
    let key = KeyPair::from_pem(pem).unwrap();
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

pub fn tls_config(
    dir: &Path,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(pki::load_cert(&pki::cert_file(dir, pki::SERVER_CA)).unwrap())
        .unwrap();
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
    Arc::new(config)
}

pub fn device_tls(dir: &Path) -> Arc<ClientConfig> {
    let chain = pki::load_certs(&pki::device_full_chain_file(dir, REG)).unwrap();
    let key = std::fs::read_to_string(pki::key_file(dir, &pki::device_stem(REG))).unwrap();
    tls_config(dir, chain, key_der(&key))
}

pub fn client(
    port: u16,
    client_id: &str,
    username: &str,
    tls: Arc<ClientConfig>,
) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(client_id, "localhost", port);
    opts.set_credentials(username, "");
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(96 * 1024, 96 * 1024);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    AsyncClient::new(opts, 10)
}

pub fn username(reg: &str) -> String {
    format!("{SCOPE}/registrations/{reg}/api-version={API}&ClientVersion=dps-sim-test%2F1")
}

/// The status and properties of a response topic.
pub fn parse_response(topic: &str) -> (u16, Vec<(String, String)>) {
    let rest = topic
        .strip_prefix("$dps/registrations/res/")
        .expect("response topic");
    let (status, query) = rest.split_once("/?").expect("topic properties");
    (
        status.parse().unwrap(),
        dps_sim::topics::parse_query(query).unwrap(),
    )
}

/// Runs register -> polls until a 200, re-sending after 429 like a device would.
/// Returns every (status, body) seen, in order.
pub async fn provision(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    body: Value,
) -> Vec<(u16, Value)> {
    let mut seen = Vec::new();
    let mut rid = 0u32;
    let mut operation: Option<String> = None;
    client
        .subscribe("$dps/registrations/res/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        match eventloop.poll().await.expect("MQTT connection") {
            Event::Incoming(Packet::SubAck(ack)) => {
                assert_eq!(
                    ack.return_codes,
                    vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
                );
                rid += 1;
                client
                    .publish(
                        format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"),
                        QoS::AtLeastOnce,
                        false,
                        body.to_string(),
                    )
                    .await
                    .unwrap();
            }
            Event::Incoming(Packet::Publish(p)) => {
                let (status, props) = parse_response(&p.topic);
                assert!(props
                    .iter()
                    .any(|(k, v)| k == "$rid" && *v == rid.to_string()));
                let payload: Value = serde_json::from_slice(&p.payload).unwrap();
                seen.push((status, payload.clone()));
                rid += 1;
                match status {
                    200 => return seen,
                    202 => {
                        operation = payload["operationId"].as_str().map(str::to_string);
                    }
                    429 if operation.is_none() => {
                        client
                            .publish(
                                format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"),
                                QoS::AtLeastOnce,
                                false,
                                body.to_string(),
                            )
                            .await
                            .unwrap();
                        continue;
                    }
                    429 => {}
                    other => panic!("unexpected status {other}: {payload}"),
                }
                // Properties in the other order than the docs show, to exercise the parser.
                client
                    .publish(
                        format!(
                            "$dps/registrations/GET/iotdps-get-operationstatus/?operationId={}&$rid={rid}",
                            operation.as_deref().unwrap()
                        ),
                        QoS::AtLeastOnce,
                        false,
                        " ",
                    )
                    .await
                    .unwrap();
            }
            _ => {}
        }
    }
}

/// Expects the connection to be refused with the given code.
pub async fn expect_refused(eventloop: &mut EventLoop, code: ConnectReturnCode) {
    let result = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match eventloop.poll().await {
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("connection outcome within 20 s");
    match result {
        ConnectionError::ConnectionRefused(got) => assert_eq!(got, code),
        other => panic!("expected CONNACK {code:?}, got {other}"),
    }
}

pub fn csr_for(cn: &str) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).unwrap();
    (key, STANDARD.encode(csr.der()))
}

/// Runs the event loop until the connection fails; returns the error.
pub async fn connection_error(eventloop: &mut EventLoop) -> ConnectionError {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Err(e) = eventloop.poll().await {
                return e;
            }
        }
    })
    .await
    .expect("connection outcome within 20 s")
}

/// Provisions `REG` through DPS with a fresh P-384 CSR; returns the CSR key and the issued
/// chain (leaf first). The DPS connection is closed afterwards.
pub async fn provision_with_csr(sim: &Sim) -> (KeyPair, Vec<CertificateDer<'static>>) {
    let (key, csr) = csr_for(REG);
    let (client, mut eventloop) = client(sim.port, REG, &username(REG), device_tls(&sim.dir));
    let body = serde_json::json!({"registrationId": REG, "csr": csr});
    let seen = tokio::time::timeout(
        Duration::from_secs(30),
        provision(&client, &mut eventloop, body),
    )
    .await
    .expect("provisioned within 30 s");
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    let (status, result) = seen.last().unwrap();
    assert_eq!(*status, 200);
    let chain = result["registrationState"]["issuedCertificateChain"]
        .as_array()
        .expect("issuedCertificateChain")
        .iter()
        .map(|c| CertificateDer::from(STANDARD.decode(c.as_str().unwrap()).unwrap()))
        .collect();
    (key, chain)
}
