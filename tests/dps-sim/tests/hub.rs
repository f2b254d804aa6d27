//! End-to-end: runs `dps-sim serve --hub-port 0`, provisions through DPS with rumqttc, then
//! connects to the simulated IoT Hub with the issued leaf + ICA and the CSR key, as the agent
//! does after provisioning.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use dps_sim::pki;
use rcgen::KeyPair;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, Packet, QoS,
    SubscribeReasonCode,
};
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};

const HUB_API: &str = "2021-04-12";

fn hub_username(hub: &str, device: &str) -> String {
    format!("{hub}/{device}/?api-version={HUB_API}&DeviceClientType=dps-sim-test%2F1")
}

fn start_with_hub(dir: &Path, extra: &[&str]) -> Sim {
    make_pki(dir);
    let twins = dir.join("twins.json");
    let mut args = vec![
        "--retry-after",
        "0",
        "--hub-port",
        "0",
        "--twin-file",
        twins.to_str().unwrap(),
        "--control",
    ];
    let control = dir.join("faults");
    args.push(control.to_str().unwrap());
    args.extend_from_slice(extra);
    let sim = Sim::start(dir, &args);
    assert!(sim.hub_port.is_some_and(|p| p != 0 && p != sim.port));
    sim
}

/// A hub client presenting leaf + ICA with the CSR key.
fn hub_client(
    sim: &Sim,
    key: &KeyPair,
    chain: &[CertificateDer<'static>],
    user: &str,
) -> (AsyncClient, EventLoop) {
    let tls = tls_config(&sim.dir, chain[..2].to_vec(), key_der(&key.serialize_pem()));
    client(sim.hub_port.unwrap(), REG, user, tls)
}

/// Polls until an incoming publish arrives (acks are handled by rumqttc).
async fn next_publish(eventloop: &mut EventLoop) -> rumqttc::Publish {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) =
                eventloop.poll().await.expect("hub connection")
            {
                return p;
            }
        }
    })
    .await
    .expect("a publish within 10 s")
}

async fn wait_suback(eventloop: &mut EventLoop) -> Vec<SubscribeReasonCode> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::SubAck(ack)) =
                eventloop.poll().await.expect("hub connection")
            {
                return ack.return_codes;
            }
        }
    })
    .await
    .expect("a SUBACK within 10 s")
}

async fn wait_puback(eventloop: &mut EventLoop) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) =
                eventloop.poll().await.expect("hub connection")
            {
                return;
            }
        }
    })
    .await
    .expect("a PUBACK within 10 s")
}

async fn close(client: AsyncClient, mut eventloop: EventLoop) {
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

fn of_service<'a>(events: &'a [Value], service: &str, kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["service"] == service && e["event"] == kind)
        .collect()
}

#[tokio::test]
async fn provisions_then_reads_and_patches_the_twin_on_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start_with_hub(dir.path(), &[]);
    let (key, chain) = provision_with_csr(&sim).await;
    assert_eq!(chain.len(), 3);

    let (client, mut eventloop) = hub_client(&sim, &key, &chain, &hub_username("localhost", REG));
    client
        .subscribe("$iothub/twin/res/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        wait_suback(&mut eventloop).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );

    client
        .publish("$iothub/twin/GET/?$rid=1", QoS::AtMostOnce, false, "")
        .await
        .unwrap();
    let got = next_publish(&mut eventloop).await;
    assert_eq!(got.topic, "$iothub/twin/res/200/?$rid=1");
    let twin: Value = serde_json::from_slice(&got.payload).unwrap();
    assert_eq!(twin["desired"]["$version"], 1);
    assert_eq!(twin["reported"], json!({"$version": 1}));

    let patch = json!({"certificate": {"validFrom": "2026-01-01T00:00:00Z", "validUntil": "2026-01-31T00:00:00Z"}});
    client
        .publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=2",
            QoS::AtLeastOnce,
            false,
            patch.to_string(),
        )
        .await
        .unwrap();
    let got = next_publish(&mut eventloop).await;
    let (status, props) = got
        .topic
        .strip_prefix("$iothub/twin/res/")
        .and_then(|r| r.split_once("/?"))
        .expect("twin response topic");
    assert_eq!(status, "204");
    let props = dps_sim::topics::parse_query(props).unwrap();
    assert!(
        props.contains(&("$rid".to_string(), "2".to_string())),
        "{props:?}"
    );
    assert!(
        props.contains(&("$version".to_string(), "2".to_string())),
        "{props:?}"
    );

    // The twin file holds the merged reported properties and the version.
    let twins: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("twins.json")).unwrap())
            .unwrap();
    assert_eq!(twins, json!({REG: {"reported": patch, "version": 2}}));

    // A GET now shows the patch.
    client
        .publish("$iothub/twin/GET/?$rid=3", QoS::AtMostOnce, false, "")
        .await
        .unwrap();
    let got = next_publish(&mut eventloop).await;
    let twin: Value = serde_json::from_slice(&got.payload).unwrap();
    assert_eq!(twin["reported"]["$version"], 2);
    assert_eq!(twin["reported"]["certificate"], patch["certificate"]);

    client
        .publish(
            format!("devices/{REG}/messages/events/$.ct=application%2Fjson"),
            QoS::AtLeastOnce,
            false,
            r#"{"temp":21}"#,
        )
        .await
        .unwrap();
    wait_puback(&mut eventloop).await;
    close(client, eventloop).await;
    sim.wait_for("disconnect", 2);

    let events = sim.events();
    let issued = of_service(&events, "dps", "issued");
    let connects = of_service(&events, "hub", "connect");
    assert_eq!(connects.len(), 1, "{events:#?}");
    let c = connects[0];
    assert_eq!(c["result"], "accepted");
    assert_eq!(c["connack"], 0);
    assert_eq!(c["client_id"], REG);
    assert_eq!(c["cert_cn"], REG);
    assert_eq!(c["cert_serial"], issued[0]["serial"]);
    assert_eq!(c["cert_not_after"], issued[0]["not_after"]);
    assert_eq!(c["cert_sha256"], dps_sim::issue::sha256_hex(&chain[0]));
    assert!(c["conn"].as_u64() > of_service(&events, "dps", "connect")[0]["conn"].as_u64());
    let patches = of_service(&events, "hub", "twin_patch");
    assert_eq!(patches[0]["rid"], "2");
    assert_eq!(patches[0]["status"], 204);
    assert_eq!(patches[0]["version"], 2);
    assert_eq!(patches[0]["body"], patch);
    assert_eq!(of_service(&events, "hub", "twin_get").len(), 2);
    let telemetry = of_service(&events, "hub", "telemetry");
    assert_eq!(telemetry[0]["body"], json!({"temp": 21}));
    assert_eq!(telemetry[0]["properties"]["$.ct"], "application/json");
    // Every event says which service it belongs to.
    assert!(events
        .iter()
        .all(|e| e["service"] == "dps" || e["service"] == "hub"));
    sim.stop();
}

#[tokio::test]
async fn hub_refuses_reject_cert_bootstrap_certificates_and_wrong_usernames() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start_with_hub(dir.path(), &[]);
    let (key, chain) = provision_with_csr(&sim).await;
    let control = dir.path().join("faults");

    // 1. reject-cert, switched on at run time.
    std::fs::write(&control, "reject-cert\n").unwrap();
    let (_c, mut ev) = hub_client(&sim, &key, &chain, &hub_username("localhost", REG));
    expect_refused(&mut ev, ConnectReturnCode::NotAuthorized).await;
    std::fs::remove_file(&control).unwrap();

    // 2. The bootstrap (onboarding) certificate is not an operational one.
    let (_c, mut ev) = client(
        sim.hub_port.unwrap(),
        REG,
        &hub_username("localhost", REG),
        device_tls(&sim.dir),
    );
    expect_refused(&mut ev, ConnectReturnCode::NotAuthorized).await;

    // 3. Another hub name in the username.
    let (_c, mut ev) = hub_client(
        &sim,
        &key,
        &chain,
        &hub_username("other-hub.example.net", REG),
    );
    expect_refused(&mut ev, ConnectReturnCode::NotAuthorized).await;

    // 4. A DPS-style username.
    let (_c, mut ev) = hub_client(&sim, &key, &chain, &username(REG));
    expect_refused(&mut ev, ConnectReturnCode::NotAuthorized).await;

    // And with nothing wrong it connects.
    let (c, mut ev) = hub_client(&sim, &key, &chain, &hub_username("localhost", REG));
    c.subscribe("$iothub/twin/res/#", QoS::AtMostOnce)
        .await
        .unwrap();
    wait_suback(&mut ev).await;
    close(c, ev).await;

    sim.wait_for("disconnect", 6);
    let events = sim.events();
    let connects = of_service(&events, "hub", "connect");
    assert_eq!(connects.len(), 5, "{connects:#?}");
    let results: Vec<&str> = connects
        .iter()
        .map(|e| e["result"].as_str().unwrap())
        .collect();
    assert!(
        connects[..4].iter().all(|e| e["connack"] == 5),
        "{connects:#?}"
    );
    assert_eq!(connects[0]["fault"], "reject-cert");
    assert!(results[1].contains("not trusted"), "{results:?}");
    assert_eq!(connects[1]["cert_cn"], REG);
    assert!(results[2].contains("not this hub"), "{results:?}");
    assert!(results[3].contains("does not have the form"), "{results:?}");
    assert_eq!(connects[4]["connack"], 0);
    sim.stop();
}

#[tokio::test]
async fn hub_unreachable_and_mitm_fail_below_mqtt() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start_with_hub(dir.path(), &[]);
    let (key, chain) = provision_with_csr(&sim).await;
    let control = dir.path().join("faults");

    // hub-unreachable: the TCP connection is closed before TLS; DPS is not affected.
    std::fs::write(&control, "hub-unreachable\n").unwrap();
    let (_c, mut ev) = hub_client(&sim, &key, &chain, &hub_username("localhost", REG));
    let err = connection_error(&mut ev).await;
    assert!(
        !matches!(err, ConnectionError::ConnectionRefused(_)),
        "expected a transport error, got {err}"
    );
    let (c, mut ev) = client(sim.port, REG, &username(REG), device_tls(&sim.dir));
    c.subscribe("$dps/registrations/res/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_suback(&mut ev).await;
    close(c, ev).await;

    // mitm: a client that checks the host name refuses the server, on both services.
    std::fs::write(&control, "mitm\n").unwrap();
    let (_c, mut ev) = hub_client(&sim, &key, &chain, &hub_username("localhost", REG));
    let err = connection_error(&mut ev).await;
    assert!(
        matches!(err, ConnectionError::Tls(_)),
        "expected a TLS error, got {err}"
    );
    let (_c, mut ev) = client(sim.port, REG, &username(REG), device_tls(&sim.dir));
    let err = connection_error(&mut ev).await;
    assert!(
        matches!(err, ConnectionError::Tls(_)),
        "expected a TLS error, got {err}"
    );
    std::fs::remove_file(&control).unwrap();

    sim.wait_for("tls_error", 2);
    let events = sim.events();
    let unreachable: Vec<&Value> = of_service(&events, "hub", "disconnect")
        .into_iter()
        .filter(|e| e["fault"] == "hub-unreachable")
        .collect();
    assert_eq!(unreachable.len(), 1, "{events:#?}");
    let tls_errors: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "tls_error")
        .collect();
    assert_eq!(tls_errors.len(), 2, "{tls_errors:#?}");
    assert!(tls_errors.iter().all(|e| e["fault"] == "mitm"));
    assert_eq!(tls_errors[0]["service"], "hub");
    assert_eq!(tls_errors[1]["service"], "dps");
    // The presented certificate is the generated wrong-host one from the PKI directory.
    assert!(pki::cert_file(dir.path(), pki::SERVER_WRONGHOST).exists());
    sim.stop();
}

#[tokio::test]
async fn no_hub_listener_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let sim = Sim::start(dir.path(), &[]);
    assert_eq!(sim.hub_port, None);
    sim.stop();
}
