//! End-to-end: runs the `dps-sim` binary on an OS-chosen port with a freshly generated PKI
//! and provisions through it with a small rumqttc client, as a device would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use dps_sim::pki;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, PKCS_ECDSA_P384_SHA384,
};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore};
use serde_json::{json, Value};
use x509_parser::prelude::parse_x509_certificate;

const REG: &str = "gw-0001";
const SCOPE: &str = "0ne00000000";
const API: &str = "2025-07-01-preview";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dps-sim")
}

/// A running simulator; killed (by its own pid) when dropped.
struct Sim {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Sim {
    fn start(dir: &Path, extra: &[&str]) -> Sim {
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
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let v: Value = serde_json::from_str(&text).expect("ready file is JSON");
                assert_eq!(v["pid"], child.id());
                break u16::try_from(v["mqtt_port"].as_u64().unwrap()).unwrap();
            }
            assert!(Instant::now() < deadline, "dps-sim did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_ne!(port, 0);
        Sim {
            child,
            dir: dir.to_path_buf(),
            port,
        }
    }

    /// Waits (up to 10 s) until `count` events of kind `event` have been written.
    fn wait_for(&self, event: &str, count: usize) {
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

    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("events.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("event line is JSON"))
            .collect()
    }

    /// SIGTERM, then expect a clean exit.
    fn stop(mut self) {
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

fn make_pki(dir: &Path) {
    let status = Command::new(bin())
        .args(["pki", "--out"])
        .arg(dir)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

fn key_der(pem: &str) -> PrivateKeyDer<'static> {
    let key = KeyPair::from_pem(pem).unwrap();
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

fn tls_config(
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

fn device_tls(dir: &Path) -> Arc<ClientConfig> {
    let chain = pki::load_certs(&pki::device_full_chain_file(dir, REG)).unwrap();
    let key = std::fs::read_to_string(pki::key_file(dir, &pki::device_stem(REG))).unwrap();
    tls_config(dir, chain, key_der(&key))
}

fn client(
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

fn username(reg: &str) -> String {
    format!("{SCOPE}/registrations/{reg}/api-version={API}&ClientVersion=dps-sim-test%2F1")
}

/// The status and properties of a response topic.
fn parse_response(topic: &str) -> (u16, Vec<(String, String)>) {
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
async fn provision(
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
async fn expect_refused(eventloop: &mut EventLoop, code: ConnectReturnCode) {
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

fn csr_for(cn: &str) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).unwrap();
    (key, STANDARD.encode(csr.der()))
}

#[tokio::test]
async fn provisions_with_csr_and_returns_a_chain_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let sim = Sim::start(
        dir.path(),
        &["--retry-after", "0", "--cert-validity", "12h"],
    );

    let (key, csr) = csr_for(REG);
    let (client, mut eventloop) = client(sim.port, REG, &username(REG), device_tls(dir.path()));
    let body = json!({"registrationId": REG, "csr": csr, "payload": {"modelId": "dtmi:x;1"}});
    let seen = tokio::time::timeout(
        Duration::from_secs(30),
        provision(&client, &mut eventloop, body),
    )
    .await
    .expect("provisioned within 30 s");
    client.disconnect().await.unwrap();
    // Drive the event loop until DISCONNECT has gone out and the server closed the socket.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    sim.wait_for("disconnect", 1);

    let statuses: Vec<u16> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, vec![202, 202, 200]);
    let op = seen[0].1["operationId"].as_str().unwrap().to_string();
    assert_eq!(seen[1].1["operationId"], op.as_str());
    let result = &seen[2].1;
    assert_eq!(result["status"], "assigned");
    let state = &result["registrationState"];
    assert_eq!(state["registrationId"], REG);
    assert_eq!(state["deviceId"], REG);
    assert_eq!(state["assignedHub"], "localhost");
    assert_eq!(state["payload"], json!({"modelId": "dtmi:x;1"}));

    // The chain: leaf, issuing CA, issuing root; it verifies for client auth up to the root.
    let chain: Vec<CertificateDer<'static>> = state["issuedCertificateChain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| CertificateDer::from(STANDARD.decode(c.as_str().unwrap()).unwrap()))
        .collect();
    assert_eq!(chain.len(), 3);
    let issuing_ca = pki::load_cert(&pki::cert_file(dir.path(), pki::ISSUING_CA)).unwrap();
    let issuing_root = pki::load_cert(&pki::cert_file(dir.path(), pki::ISSUING_ROOT)).unwrap();
    assert_eq!(chain[1], issuing_ca);
    assert_eq!(chain[2], issuing_root);
    let mut roots = RootCertStore::empty();
    roots.add(issuing_root).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&chain[0], &chain[1..2], UnixTime::now())
        .expect("issued leaf chains to the issuing root");
    let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
    let (_, ca) = parse_x509_certificate(&chain[1]).unwrap();
    assert!(leaf.verify_signature(Some(ca.public_key())).is_ok());
    assert_eq!(
        leaf.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    assert_eq!(leaf.subject().to_string(), format!("CN={REG}"));
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(lifetime, 12 * 3600);

    // The events tell the same story, with exact fields.
    let events = sim.events();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        vec![
            "connect",
            "subscribe",
            "request",
            "response",
            "request",
            "response",
            "request",
            "issued",
            "response",
            "disconnect"
        ],
        "{events:#?}"
    );
    assert!(events.iter().all(|e| e["conn"] == 1));
    assert!(events
        .windows(2)
        .all(|w| w[0]["t"].as_f64() <= w[1]["t"].as_f64()));
    let connect = &events[0];
    assert_eq!(connect["client_id"], REG);
    assert_eq!(connect["username"], username(REG));
    assert_eq!(connect["cert_cn"], REG);
    assert_eq!(connect["result"], "accepted");
    assert_eq!(connect["connack"], 0);
    assert_eq!(events[1]["filter"], "$dps/registrations/res/#");
    assert_eq!(events[1]["granted"], 1);
    assert_eq!(events[2]["kind"], "register");
    assert_eq!(events[2]["body"]["csr"], csr.as_str());
    assert_eq!(events[3]["status"], 202);
    assert_eq!(events[3]["retry_after"], 0);
    assert_eq!(events[3]["operation_id"], op.as_str());
    assert_eq!(events[3]["registration_status"], "assigning");
    assert_eq!(events[3]["delivered"], true);
    assert_eq!(events[4]["kind"], "poll");
    assert_eq!(events[4]["operation_id"], op.as_str());
    assert_eq!(events[4]["body"], " ");
    assert_eq!(
        events[7]["serial"],
        leaf.raw_serial_as_string().replace(':', "")
    );
    assert_eq!(
        events[7]["leaf_spki_sha256"],
        dps_sim::issue::sha256_hex(&key.subject_public_key_info())
    );
    assert_eq!(events[8]["status"], 200);
    assert_eq!(events[8]["retry_after"], Value::Null);
    assert_eq!(events[8]["registration_status"], "assigned");
    assert_eq!(events[9]["reason"], "client DISCONNECT");

    sim.stop();
}

#[tokio::test]
async fn refuses_untrusted_or_mismatched_devices_with_connack_5() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let sim = Sim::start(dir.path(), &[]);

    // 1. A device certificate from a CA the enrollment does not trust.
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let mut root_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Foreign Root");
    root_params.distinguished_name = dn;
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = CertifiedIssuer::self_signed(root_params, root_key).unwrap();
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let mut leaf_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, REG);
    leaf_params.distinguished_name = dn;
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &root).unwrap();
    let tls = tls_config(
        dir.path(),
        vec![leaf.der().clone(), root.der().clone()],
        key_der(&leaf_key.serialize_pem()),
    );
    let (_c1, mut ev1) = client(sim.port, REG, &username(REG), tls);
    expect_refused(&mut ev1, ConnectReturnCode::NotAuthorized).await;

    // 2. A trusted certificate whose CN is not the client id.
    let (_c2, mut ev2) = client(
        sim.port,
        "gw-0002",
        &username("gw-0002"),
        device_tls(dir.path()),
    );
    expect_refused(&mut ev2, ConnectReturnCode::NotAuthorized).await;

    // 3. The wrong id scope.
    let (_c3, mut ev3) = client(
        sim.port,
        REG,
        &format!("0ne99999999/registrations/{REG}/api-version={API}"),
        device_tls(dir.path()),
    );
    expect_refused(&mut ev3, ConnectReturnCode::NotAuthorized).await;

    sim.wait_for("connect", 3);
    let connects: Vec<Value> = sim
        .events()
        .into_iter()
        .filter(|e| e["event"] == "connect")
        .collect();
    assert_eq!(connects.len(), 3, "{connects:#?}");
    assert!(connects.iter().all(|e| e["connack"] == 5));
    let results: Vec<&str> = connects
        .iter()
        .map(|e| e["result"].as_str().unwrap())
        .collect();
    assert!(results[0].contains("not trusted"), "{results:?}");
    assert!(
        results[1].contains("does not match client id"),
        "{results:?}"
    );
    assert!(results[2].contains("id scope"), "{results:?}");
    sim.stop();
}

#[tokio::test]
async fn throttle_fault_from_control_file_then_recovery() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let control = dir.path().join("faults");
    std::fs::write(&control, "# switched on for this test\nthrottle\n").unwrap();
    let sim = Sim::start(
        dir.path(),
        &[
            "--retry-after",
            "0",
            "--polls-before-assign",
            "0",
            "--control",
            control.to_str().unwrap(),
        ],
    );
    let (client, mut eventloop) = client(sim.port, REG, &username(REG), device_tls(dir.path()));
    let seen = tokio::time::timeout(
        Duration::from_secs(30),
        provision(&client, &mut eventloop, json!({"registrationId": REG})),
    )
    .await
    .expect("provisioned within 30 s");
    let statuses: Vec<u16> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, vec![429, 202, 429, 200]);
    assert_eq!(seen[0].1["errorCode"], 429_001);
    assert!(seen[3].1["registrationState"]
        .get("issuedCertificateChain")
        .is_none());

    // Fault switched off at run time: a new registration goes straight through.
    std::fs::remove_file(&control).unwrap();
    let seen = tokio::time::timeout(
        Duration::from_secs(30),
        provision(&client, &mut eventloop, json!({})),
    )
    .await
    .expect("provisioned within 30 s");
    let statuses: Vec<u16> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, vec![202, 200]);

    let responses: Vec<Value> = sim
        .events()
        .into_iter()
        .filter(|e| e["event"] == "response")
        .collect();
    assert_eq!(responses[0]["status"], 429);
    assert_eq!(responses[0]["retry_after"], 0);
    assert_eq!(responses[0]["fault"], "throttle");
    sim.stop();
}
