//! End-to-end: runs the `dps-sim` binary on an OS-chosen port with a freshly generated PKI
//! and provisions through it with a small rumqttc client, as a device would.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use common::*;
use dps_sim::pki;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, PKCS_ECDSA_P384_SHA384,
};
use rumqttc::{ConnectReturnCode, ConnectionError, Event, Packet, QoS};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use serde_json::{json, Value};
use x509_parser::prelude::parse_x509_certificate;

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

#[tokio::test]
async fn drop_after_register_once_then_the_reconnect_provisions() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let sim = Sim::start(
        dir.path(),
        &["--retry-after", "0", "--fault", "drop-after-register"],
    );
    assert_eq!(sim.hub_port, None);

    // First attempt: the register gets neither PUBACK nor answer; the connection just ends.
    let (client1, mut ev1) = client(sim.port, REG, &username(REG), device_tls(dir.path()));
    client1
        .subscribe("$dps/registrations/res/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match ev1.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    client1
                        .publish(
                            "$dps/registrations/PUT/iotdps-register/?$rid=1",
                            QoS::AtLeastOnce,
                            false,
                            "{}",
                        )
                        .await
                        .unwrap();
                }
                Ok(Event::Incoming(Packet::PubAck(_) | Packet::Publish(_))) => {
                    panic!("the dropped register was answered")
                }
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("connection lost within 20 s");
    assert!(
        !matches!(err, ConnectionError::ConnectionRefused(_)),
        "{err}"
    );

    // The reconnect provisions normally.
    let (client2, mut ev2) = client(sim.port, REG, &username(REG), device_tls(dir.path()));
    let seen = tokio::time::timeout(
        Duration::from_secs(30),
        provision(&client2, &mut ev2, json!({})),
    )
    .await
    .expect("provisioned within 30 s");
    assert_eq!(seen.last().unwrap().0, 200);

    let responses: Vec<Value> = sim
        .events()
        .into_iter()
        .filter(|e| e["event"] == "response")
        .collect();
    assert_eq!(responses[0]["status"], Value::Null);
    assert_eq!(responses[0]["fault"], "drop-after-register");
    assert_eq!(responses[1]["status"], 202);
    sim.stop();
}

#[tokio::test]
async fn oversize_response_exceeds_a_96k_client_limit() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let sim = Sim::start(
        dir.path(),
        &[
            "--retry-after",
            "0",
            "--polls-before-assign",
            "0",
            "--fault",
            "oversize-response",
        ],
    );
    let (c, mut ev) = client(sim.port, REG, &username(REG), device_tls(dir.path()));
    c.subscribe("$dps/registrations/res/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut sent_poll = false;
    let err = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    c.publish(
                        "$dps/registrations/PUT/iotdps-register/?$rid=1",
                        QoS::AtLeastOnce,
                        false,
                        "{}",
                    )
                    .await
                    .unwrap();
                }
                Ok(Event::Incoming(Packet::Publish(p))) if !sent_poll => {
                    let op: Value = serde_json::from_slice(&p.payload).unwrap();
                    c.publish(
                        format!(
                            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId={}",
                            op["operationId"].as_str().unwrap()
                        ),
                        QoS::AtLeastOnce,
                        false,
                        "",
                    )
                    .await
                    .unwrap();
                    sent_poll = true;
                }
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("outcome within 20 s");
    assert!(
        err.to_string().to_lowercase().contains("size")
            || matches!(err, ConnectionError::MqttState(_)),
        "{err}"
    );
    sim.wait_for("response", 2);
    let responses: Vec<Value> = sim
        .events()
        .into_iter()
        .filter(|e| e["event"] == "response")
        .collect();
    assert_eq!(responses[1]["status"], 200);
    assert_eq!(responses[1]["fault"], "oversize-response");
    sim.stop();
}
