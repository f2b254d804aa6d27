//! One device connection to the simulated IoT Hub over MQTT 3.1.1: CONNECT checks (`reject-cert`
//! fault, TLS chain against the issuing CA only, certificate CN = client id, username
//! `{hub}/{deviceId}/?api-version=`), the subscriptions the hub grants, twin GET / reported
//! PATCH, telemetry, and the hub-side certificate API (`$iothub/credentials/...`). Twin logic
//! is in `hub.rs`, framing in `wire.rs`, issuance in `dps.rs` / `issue.rs`.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
    UnsubAck,
};
use rumqttc::mqttbytes::{Protocol, QoS};
use serde_json::{json, Map, Value};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::dps::{self, uuid_like};
use crate::events::Service;
use crate::faults::{self, Fault, FaultSet};
use crate::hub::{self, ERR_BAD_REQUEST};
use crate::hub_topics::{self, HubRequest, Subscription};
use crate::issue;
use crate::mqtt::issued_fields;
use crate::server::{HubSide, Peer, Simulator};
use crate::tls::{self, CertFacts};
use crate::wire::{self, ConnectError, Wire};

/// Largest packet accepted from a device (IoT Hub: 256 KB device-to-cloud messages).
pub const MAX_INCOMING: usize = 256 * 1024;
/// errorCode of a certificate issuance that failed inside the simulator.
pub const ERR_SERVER: u32 = 500_001;
/// errorCode of the `hub-csr-unavailable` fault (IoT Hub's transient "service unavailable").
pub const ERR_UNAVAILABLE: u32 = 503_001;
/// How long a certificate operation is said to stay open (`operationExpires`).
const OPERATION_LIFETIME: time::Duration = time::Duration::hours(12);

/// Serves one hub connection until it ends and records why in a `disconnect` event.
pub async fn serve_connection<S>(
    stream: S,
    peer: Peer,
    sim: &Simulator,
    hub: &HubSide,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut session = Session {
        wire: Wire::new(stream, MAX_INCOMING),
        peer,
        sim,
        hub,
        keep_alive: None,
        device_id: String::new(),
        twin_qos: None,
        credential_qos: None,
    };
    let reason = tokio::select! {
        reason = session.run() => reason,
        _ = shutdown.wait_for(|stop| *stop) => "server shutdown".to_string(),
    };
    let _ = session.wire.stream.shutdown().await;
    sim.events.emit(
        Service::Hub,
        session.peer.conn,
        "disconnect",
        json!({ "reason": reason }),
    );
}

struct Session<'a, S> {
    wire: Wire<S>,
    peer: Peer,
    sim: &'a Simulator,
    hub: &'a HubSide,
    keep_alive: Option<Duration>,
    device_id: String,
    /// QoS granted to `$iothub/twin/res/#`, if subscribed.
    twin_qos: Option<QoS>,
    /// QoS granted to `$iothub/credentials/res/#`, if subscribed.
    credential_qos: Option<QoS>,
}

/// Result of the CONNECT checks.
struct Verdict {
    code: ConnectReturnCode,
    result: String,
    fault: Option<Fault>,
}

impl Verdict {
    fn refuse(code: ConnectReturnCode, result: impl Into<String>) -> Self {
        Verdict {
            code,
            result: result.into(),
            fault: None,
        }
    }

    fn not_authorized(result: impl Into<String>) -> Self {
        Verdict::refuse(ConnectReturnCode::NotAuthorized, result)
    }

    fn accepted() -> Self {
        Verdict {
            code: ConnectReturnCode::Success,
            result: "accepted".into(),
            fault: None,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    async fn run(&mut self) -> String {
        if let Err(reason) = self.handshake().await {
            return reason;
        }
        loop {
            let packet = match self.wire.next_packet(self.keep_alive).await {
                Ok(p) => p,
                Err(reason) => return reason,
            };
            if let Err(reason) = self.handle(packet).await {
                return reason;
            }
        }
    }

    fn emit(&self, event: &str, fields: Value) {
        self.sim
            .events
            .emit(Service::Hub, self.peer.conn, event, fields);
    }

    async fn handshake(&mut self) -> Result<(), String> {
        let leaf = self.peer.chain.first().cloned();
        let cert_cn = leaf.as_ref().and_then(|c| tls::common_name(c));
        let facts = leaf.as_ref().map(|c| tls::cert_facts(c));
        let connect = match self.wire.read_connect().await {
            Ok(c) => c,
            Err(ConnectError::Closed(reason)) => return Err(reason),
            Err(ConnectError::Protocol { name, level }) => {
                let verdict = Verdict::refuse(
                    ConnectReturnCode::RefusedProtocolVersion,
                    format!(
                        "unsupported protocol {name:?} level {level}; the hub speaks MQTT 3.1.1 (level 4) only"
                    ),
                );
                self.connect_event(None, &cert_cn, facts.as_ref(), &verdict);
                self.wire
                    .send(Packet::ConnAck(ConnAck::new(verdict.code, false)))
                    .await?;
                return Err(format!("CONNECT refused: {}", verdict.result));
            }
        };
        let faults = self.sim.faults.current().await;
        let verdict = self.judge(&connect, &cert_cn, &faults);
        self.connect_event(Some(&connect), &cert_cn, facts.as_ref(), &verdict);
        self.wire
            .send(Packet::ConnAck(ConnAck::new(verdict.code, false)))
            .await?;
        if verdict.code != ConnectReturnCode::Success {
            return Err(format!(
                "CONNECT refused (CONNACK {}): {}",
                verdict.code as u8, verdict.result
            ));
        }
        self.device_id = connect.client_id;
        self.keep_alive = wire::keep_alive_limit(connect.keep_alive);
        Ok(())
    }

    /// The CONNECT checks, in order; every identity problem is CONNACK 5, as from IoT Hub.
    fn judge(&self, connect: &Connect, cert_cn: &Option<String>, faults: &FaultSet) -> Verdict {
        if connect.protocol != Protocol::V4 {
            return Verdict::refuse(
                ConnectReturnCode::RefusedProtocolVersion,
                "the hub speaks MQTT 3.1.1 (level 4) only",
            );
        }
        if connect.client_id.is_empty() {
            return Verdict::refuse(
                ConnectReturnCode::BadClientId,
                "empty client id; it must be the device id",
            );
        }
        if faults.contains(Fault::RejectCert) {
            return Verdict {
                fault: Some(Fault::RejectCert),
                ..Verdict::not_authorized("device certificate rejected (reject-cert fault)")
            };
        }
        if let Err(reason) = self.hub.validator.validate(&self.peer.chain) {
            return Verdict::not_authorized(format!(
                "{reason} (the hub trusts the issuing CA only)"
            ));
        }
        match cert_cn {
            None => return Verdict::not_authorized("client certificate has no single subject CN"),
            Some(cn) if *cn != connect.client_id => {
                return Verdict::not_authorized(format!(
                    "client certificate CN {cn:?} does not match client id {:?}",
                    connect.client_id
                ))
            }
            Some(_) => {}
        }
        let username =
            match hub_topics::parse_username(connect.login.as_ref().map(|l| l.username.as_str())) {
                Ok(u) => u,
                Err(e) => return Verdict::not_authorized(e.to_string()),
            };
        if username.hub != self.hub.hub.name() {
            return Verdict::not_authorized(format!(
                "hub {:?} in the username is not this hub ({:?})",
                username.hub,
                self.hub.hub.name()
            ));
        }
        if username.device_id != connect.client_id {
            return Verdict::not_authorized(format!(
                "device id {:?} in the username does not match client id {:?}",
                username.device_id, connect.client_id
            ));
        }
        Verdict::accepted()
    }

    fn connect_event(
        &self,
        connect: Option<&Connect>,
        cert_cn: &Option<String>,
        facts: Option<&CertFacts>,
        verdict: &Verdict,
    ) {
        let mut applied: Vec<Fault> = self.peer.tls_fault.into_iter().collect();
        applied.extend(verdict.fault);
        self.emit(
            "connect",
            json!({
                "client_id": connect.map(|c| c.client_id.clone()),
                "username": connect.and_then(|c| c.login.as_ref().map(|l| l.username.clone())),
                "clean_session": connect.map(|c| c.clean_session),
                "cert_cn": cert_cn,
                "result": verdict.result,
                "connack": verdict.code as u8,
                "cert_not_after": facts.and_then(|f| f.not_after.clone()),
                "cert_serial": facts.and_then(|f| f.serial_hex.clone()),
                "cert_sha256": facts.map(|f| f.sha256.clone()),
                "fault": faults::event_field(&applied),
            }),
        );
    }

    async fn handle(&mut self, packet: Packet) -> Result<(), String> {
        match packet {
            Packet::Subscribe(sub) => {
                let mut codes = Vec::with_capacity(sub.filters.len());
                for filter in &sub.filters {
                    let code = match hub_topics::subscription(&filter.path, &self.device_id) {
                        Some(kind) => {
                            let qos = if filter.qos == QoS::AtMostOnce {
                                QoS::AtMostOnce
                            } else {
                                QoS::AtLeastOnce
                            };
                            match kind {
                                Subscription::TwinResponses => self.twin_qos = Some(qos),
                                Subscription::CredentialResponses => {
                                    self.credential_qos = Some(qos)
                                }
                                // Granted, but the simulator never sends desired-property
                                // updates, cloud-to-device messages or method calls.
                                Subscription::DesiredUpdates
                                | Subscription::CloudToDevice
                                | Subscription::Methods => {}
                            }
                            SubscribeReasonCode::Success(qos)
                        }
                        None => SubscribeReasonCode::Failure,
                    };
                    let granted = match code {
                        SubscribeReasonCode::Success(q) => q as u8,
                        SubscribeReasonCode::Failure => 0x80,
                    };
                    self.emit(
                        "subscribe",
                        json!({"filter": filter.path, "granted": granted}),
                    );
                    codes.push(code);
                }
                self.wire
                    .send(Packet::SubAck(SubAck::new(sub.pkid, codes)))
                    .await
            }
            Packet::Unsubscribe(unsub) => {
                for topic in &unsub.topics {
                    match hub_topics::subscription(topic, &self.device_id) {
                        Some(Subscription::TwinResponses) => self.twin_qos = None,
                        Some(Subscription::CredentialResponses) => self.credential_qos = None,
                        _ => {}
                    }
                }
                self.wire
                    .send(Packet::UnsubAck(UnsubAck::new(unsub.pkid)))
                    .await
            }
            Packet::Publish(publish) => self.on_publish(publish).await,
            Packet::PubAck(_) => Ok(()),
            Packet::PingReq => self.wire.send(Packet::PingResp).await,
            Packet::Disconnect => Err("client DISCONNECT".into()),
            Packet::Connect(_) => Err("protocol violation: second CONNECT".into()),
            other => Err(format!(
                "protocol violation: unexpected {} packet from a client",
                wire::packet_name(&other)
            )),
        }
    }

    async fn on_publish(&mut self, publish: Publish) -> Result<(), String> {
        if publish.qos == QoS::ExactlyOnce {
            return Err("QoS 2 publish is not supported by IoT Hub".into());
        }
        let request = hub_topics::parse_request_topic(&publish.topic).map_err(|e| e.to_string())?;
        if let HubRequest::Telemetry { device_id, .. } = &request {
            if *device_id != self.device_id {
                return Err(format!(
                    "publish to another device's telemetry topic {:?}",
                    publish.topic
                ));
            }
        }
        if publish.qos == QoS::AtLeastOnce {
            self.wire
                .send(Packet::PubAck(PubAck::new(publish.pkid)))
                .await?;
        }
        match request {
            HubRequest::TwinGet { rid } => {
                let answer = self.hub.hub.twin_get(&self.device_id);
                let topic = hub_topics::twin_response_topic(answer.status, &rid, None);
                let sent = self.deliver(self.twin_qos, topic, answer.body).await;
                self.emit(
                    "twin_get",
                    json!({
                        "rid": rid,
                        "status": answer.status,
                        "version": answer.version,
                        "delivered": delivered(&sent),
                    }),
                );
                sent?;
            }
            HubRequest::TwinPatch { rid } => {
                let answer = self.hub.hub.twin_patch(&self.device_id, &publish.payload);
                let topic = hub_topics::twin_response_topic(answer.status, &rid, answer.version);
                let sent = self.deliver(self.twin_qos, topic, answer.body).await;
                self.emit(
                    "twin_patch",
                    json!({
                        "rid": rid,
                        "body": dps::body_for_event(&publish.payload),
                        "version": answer.version,
                        "status": answer.status,
                        "error": answer.error,
                        "delivered": delivered(&sent),
                    }),
                );
                sent?;
            }
            HubRequest::Telemetry { properties, .. } => {
                let properties: Map<String, Value> = properties
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                self.emit(
                    "telemetry",
                    json!({
                        "topic": publish.topic,
                        "properties": properties,
                        "qos": publish.qos as u8,
                        "body": dps::body_for_event(&publish.payload),
                    }),
                );
            }
            HubRequest::IssueCertificate { rid } => {
                self.certificate_request(rid, &publish.payload).await?;
            }
        }
        Ok(())
    }

    /// The hub's certificate API (protocol.md §6.2): 202 `{correlationId, operationExpires}`,
    /// then at once 200 `{correlationId, certificates: [leaf, ICA, root]}` (base64 DER), issued
    /// by the same CA and with the same issuance faults as DPS. Errors are 400 (400004 for the
    /// body or `$rid`, the CSR codes of `issue.rs`), 500 (500001), or 503 (503001) under the
    /// `hub-csr-unavailable` fault.
    async fn certificate_request(
        &mut self,
        rid: Option<String>,
        body: &[u8],
    ) -> Result<(), String> {
        self.emit(
            "credential_request",
            json!({"rid": rid, "body": dps::body_for_event(body)}),
        );
        // Without $rid the hub does not answer.
        let Some(rid) = rid else {
            return Ok(());
        };
        if !valid_rid(&rid) {
            return self
                .credential_error(
                    &rid,
                    400,
                    ERR_BAD_REQUEST,
                    "$rid must be 4-36 characters from A-Z a-z 0-9 and '-', not starting or ending with '-'",
                )
                .await;
        }
        let request = match hub::parse_certificate_request(body, &self.device_id) {
            Ok(r) => r,
            Err(message) => {
                return self
                    .credential_error(&rid, 400, ERR_BAD_REQUEST, &message)
                    .await
            }
        };
        let csr = match issue::check_csr(&request.csr, &self.device_id) {
            Ok(csr) => csr,
            Err(e) => {
                return self
                    .credential_error(&rid, 400, e.error_code(), &e.to_string())
                    .await
            }
        };
        let faults = self.sim.faults.current().await;
        if faults.contains(Fault::HubCsrUnavailable) {
            return self
                .credential_error(
                    &rid,
                    503,
                    ERR_UNAVAILABLE,
                    "Service unavailable (hub-csr-unavailable fault)",
                )
                .await;
        }
        let correlation_id = uuid_like();
        let expires = hub::rfc3339(OffsetDateTime::now_utc() + OPERATION_LIFETIME);
        let accepted = json!({"correlationId": correlation_id, "operationExpires": expires});
        self.credential_response(&rid, 202, accepted, None, Some(&correlation_id), &[])
            .await?;

        match self.sim.dps.issue_leaf(&self.device_id, &csr, &faults) {
            Ok((issued, applied)) => {
                self.emit("issued", issued_fields(&self.device_id, &issued, &applied));
                let certificates: Vec<String> =
                    issued.chain.iter().map(|c| STANDARD.encode(c)).collect();
                let body = json!({"correlationId": correlation_id, "certificates": certificates});
                self.credential_response(&rid, 200, body, None, Some(&correlation_id), &applied)
                    .await
            }
            Err(e) => {
                self.credential_error(
                    &rid,
                    500,
                    ERR_SERVER,
                    &format!("certificate issuance failed: {e}"),
                )
                .await
            }
        }
    }

    async fn credential_error(
        &mut self,
        rid: &str,
        status: u16,
        code: u32,
        message: &str,
    ) -> Result<(), String> {
        let body: Value =
            serde_json::from_str(&hub::error_body(code, message)).unwrap_or(Value::Null);
        self.credential_response(rid, status, body, Some(code), None, &[])
            .await
    }

    async fn credential_response(
        &mut self,
        rid: &str,
        status: u16,
        body: Value,
        error_code: Option<u32>,
        correlation_id: Option<&str>,
        applied: &[Fault],
    ) -> Result<(), String> {
        let topic = hub_topics::credential_response_topic(status, rid);
        let sent = self
            .deliver(self.credential_qos, topic, body.to_string().into_bytes())
            .await;
        self.emit(
            "credential_response",
            json!({
                "rid": rid,
                "status": status,
                "error_code": error_code,
                "correlation_id": correlation_id,
                "fault": faults::event_field(applied),
                "delivered": delivered(&sent),
            }),
        );
        sent.map(|_| ())
    }

    /// Publishes a response if the device subscribed to its topic; `Ok(false)` when it did not
    /// subscribe. Callers record the answer (see [`delivered`]) before passing on an error.
    async fn deliver(
        &mut self,
        qos: Option<QoS>,
        topic: String,
        body: Vec<u8>,
    ) -> Result<bool, String> {
        let Some(qos) = qos else {
            return Ok(false);
        };
        let mut publish = Publish::new(topic, qos, body);
        if qos == QoS::AtLeastOnce {
            publish.pkid = self.wire.pkid();
        }
        self.wire.send(Packet::Publish(publish)).await?;
        Ok(true)
    }
}

/// The `delivered` field of a response event.
fn delivered(sent: &Result<bool, String>) -> bool {
    matches!(sent, Ok(true))
}

/// `$rid` of a certificate request: 4–36 ASCII alphanumerics and `-`, not starting or ending
/// with `-` (protocol.md §6.2).
pub fn valid_rid(rid: &str) -> bool {
    (4..=36).contains(&rid.len())
        && rid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !rid.starts_with('-')
        && !rid.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dps::{Dps, DpsConfig};
    use crate::events::Events;
    use crate::faults::FaultSource;
    use crate::hub::{Hub, HubConfig};
    use crate::issue::{CertIssuer, ValidCsr};
    use crate::pki;
    use crate::tls::ClientChainValidator;
    use crate::wire::testing::Client;
    use rcgen::{KeyPair, PublicKeyData, PKCS_ECDSA_P384_SHA384};
    use rumqttc::mqttbytes::v4::{Subscribe, SubscribeFilter};
    use rustls::pki_types::CertificateDer;
    use std::sync::Arc;

    const DEV: &str = "gw-0001";
    const USER: &str = "localhost/gw-0001/?api-version=2021-04-12&DeviceClientType=test";

    struct Setup {
        dir: tempfile::TempDir,
        sim: Arc<Simulator>,
        control: std::path::PathBuf,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        pki::generate(dir.path(), &[DEV.to_string()], false).unwrap();
        let control = dir.path().join("faults");
        let sim = Simulator {
            dps: Dps::new(
                DpsConfig {
                    assigned_hub: "localhost".into(),
                    retry_after: 1,
                    polls_before_assign: 1,
                    cert_validity: Duration::from_secs(3600),
                },
                CertIssuer::load(dir.path()).unwrap(),
            ),
            events: Events::to_file(&dir.path().join("events.jsonl")).unwrap(),
            faults: FaultSource::new(FaultSet::default(), Some(control.clone())),
            validator: ClientChainValidator::from_files(&[pki::cert_file(
                dir.path(),
                pki::BOOTSTRAP_ROOT,
            )])
            .unwrap(),
            enrollments: crate::auth::Enrollments::new("0ne00000000", &[], &[], &[], 0),
            id_scope: "0ne00000000".into(),
            hub: Some(HubSide {
                hub: Hub::new(HubConfig {
                    hub_name: "localhost".into(),
                    twin_file: Some(dir.path().join("twins.json")),
                }),
                validator: ClientChainValidator::from_files(&[pki::cert_file(
                    dir.path(),
                    pki::ISSUING_CA,
                )])
                .unwrap(),
            }),
        };
        Setup {
            dir,
            sim: Arc::new(sim),
            control,
        }
    }

    /// An operational chain (leaf + ICA) issued by the simulator, with `faults` applied.
    fn issued_chain(sim: &Simulator, cn: &str, faults: &[Fault]) -> Vec<CertificateDer<'static>> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let csr = ValidCsr {
            spki_der: key.subject_public_key_info(),
        };
        let (issued, _) = sim
            .dps
            .issue_leaf(cn, &csr, &FaultSet::new(faults.iter().copied()))
            .unwrap();
        issued.chain[..2.min(issued.chain.len())].to_vec()
    }

    fn client(sim: &Arc<Simulator>, chain: Vec<CertificateDer<'static>>) -> Client {
        let sim = sim.clone();
        Client::start(move |io, stop| async move {
            let peer = Peer {
                conn: 7,
                chain,
                tls_fault: None,
            };
            let hub = sim.hub.as_ref().unwrap();
            serve_connection(io, peer, &sim, hub, stop).await;
        })
    }

    fn events(dir: &tempfile::TempDir) -> Vec<Value> {
        std::fs::read_to_string(dir.path().join("events.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn of_kind(events: &[Value], kind: &str) -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["event"] == kind)
            .cloned()
            .collect()
    }

    fn publish(topic: &str, qos: QoS, pkid: u16, body: &[u8]) -> Packet {
        let mut p = Publish::new(topic, qos, body.to_vec());
        p.pkid = pkid;
        Packet::Publish(p)
    }

    async fn subscribe(
        c: &mut Client,
        pkid: u16,
        filters: &[(&str, QoS)],
    ) -> Vec<SubscribeReasonCode> {
        let mut sub = Subscribe::new(filters[0].0, filters[0].1);
        sub.pkid = pkid;
        for (f, q) in &filters[1..] {
            sub.filters.push(SubscribeFilter::new((*f).to_string(), *q));
        }
        c.send(Packet::Subscribe(sub)).await;
        match c.recv().await {
            Some(Packet::SubAck(ack)) => {
                assert_eq!(ack.pkid, pkid);
                ack.return_codes
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// The next publish from the server (acknowledged when QoS 1).
    async fn response(c: &mut Client) -> Publish {
        match c.recv().await {
            Some(Packet::Publish(p)) => {
                if p.qos == QoS::AtLeastOnce {
                    c.send(Packet::PubAck(PubAck::new(p.pkid))).await;
                }
                p
            }
            other => panic!("expected a PUBLISH, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn twin_get_patch_and_telemetry() {
        let s = setup();
        let chain = issued_chain(&s.sim, DEV, &[]);
        let mut c = client(&s.sim, chain.clone());
        let ack = c.connect(DEV, USER, true).await;
        assert_eq!(ack, ConnAck::new(ConnectReturnCode::Success, false));
        let codes = subscribe(
            &mut c,
            1,
            &[
                ("$iothub/twin/res/#", QoS::ExactlyOnce),
                ("$iothub/twin/PATCH/properties/desired/#", QoS::AtMostOnce),
                ("devices/gw-0001/messages/devicebound/#", QoS::AtLeastOnce),
                ("$iothub/methods/POST/#", QoS::AtMostOnce),
                ("devices/gw-0002/messages/devicebound/#", QoS::AtLeastOnce),
            ],
        )
        .await;
        assert_eq!(
            codes,
            vec![
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Success(QoS::AtMostOnce),
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Success(QoS::AtMostOnce),
                SubscribeReasonCode::Failure,
            ]
        );

        c.send(publish("$iothub/twin/GET/?$rid=1", QoS::AtMostOnce, 0, b""))
            .await;
        let p = response(&mut c).await;
        assert_eq!(p.topic, "$iothub/twin/res/200/?$rid=1");
        let twin: Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(
            twin,
            json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
        );

        let patch = br#"{"certificate":{"validFrom":"x","validUntil":"y"}}"#;
        c.send(publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=2",
            QoS::AtLeastOnce,
            5,
            patch,
        ))
        .await;
        assert_eq!(c.recv().await, Some(Packet::PubAck(PubAck::new(5))));
        let p = response(&mut c).await;
        assert_eq!(p.topic, "$iothub/twin/res/204/?$rid=2&$version=2");
        assert!(p.payload.is_empty());

        c.send(publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=3",
            QoS::AtMostOnce,
            0,
            b"[1]",
        ))
        .await;
        let p = response(&mut c).await;
        assert_eq!(p.topic, "$iothub/twin/res/400/?$rid=3");

        c.send(publish(
            "devices/gw-0001/messages/events/$.ct=application%2Fjson&$.ce=utf-8",
            QoS::AtLeastOnce,
            6,
            br#"{"t":1}"#,
        ))
        .await;
        assert_eq!(c.recv().await, Some(Packet::PubAck(PubAck::new(6))));
        c.send(Packet::PingReq).await;
        assert_eq!(c.recv().await, Some(Packet::PingResp));
        c.send(Packet::Disconnect).await;
        c.closed().await;

        let twins: Value = serde_json::from_str(
            &std::fs::read_to_string(s.dir.path().join("twins.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            twins,
            json!({"gw-0001": {"reported": {"certificate": {"validFrom": "x", "validUntil": "y"}}, "version": 2}})
        );

        let ev = events(&s.dir);
        assert!(ev.iter().all(|e| e["service"] == "hub" && e["conn"] == 7));
        let connect = &of_kind(&ev, "connect")[0];
        let facts = tls::cert_facts(&chain[0]);
        assert_eq!(connect["result"], "accepted");
        assert_eq!(connect["connack"], 0);
        assert_eq!(connect["client_id"], DEV);
        assert_eq!(connect["username"], USER);
        assert_eq!(connect["cert_cn"], DEV);
        assert_eq!(connect["cert_serial"], facts.serial_hex.unwrap());
        assert_eq!(connect["cert_not_after"], facts.not_after.unwrap());
        assert_eq!(connect["cert_sha256"], issue::sha256_hex(&chain[0]));
        assert_eq!(connect["fault"], Value::Null);
        assert_eq!(of_kind(&ev, "subscribe").len(), 5);
        let get = &of_kind(&ev, "twin_get")[0];
        assert_eq!(
            (
                get["rid"].clone(),
                get["status"].clone(),
                get["version"].clone()
            ),
            (json!("1"), json!(200), json!(1))
        );
        assert_eq!(get["delivered"], true);
        let patches = of_kind(&ev, "twin_patch");
        assert_eq!(patches[0]["status"], 204);
        assert_eq!(patches[0]["version"], 2);
        assert_eq!(patches[0]["body"]["certificate"]["validUntil"], "y");
        assert_eq!(patches[1]["status"], 400);
        assert_eq!(patches[1]["version"], Value::Null);
        let telemetry = &of_kind(&ev, "telemetry")[0];
        assert_eq!(telemetry["properties"]["$.ct"], "application/json");
        assert_eq!(telemetry["body"], json!({"t": 1}));
        assert_eq!(telemetry["qos"], 1);
        assert_eq!(of_kind(&ev, "disconnect")[0]["reason"], "client DISCONNECT");
    }

    #[tokio::test]
    async fn twin_answers_without_subscription_are_not_delivered() {
        let s = setup();
        let mut c = client(&s.sim, issued_chain(&s.sim, DEV, &[]));
        c.connect(DEV, USER, true).await;
        c.send(publish(
            "$iothub/twin/GET/?$rid=9",
            QoS::AtLeastOnce,
            1,
            b"",
        ))
        .await;
        assert_eq!(c.recv().await, Some(Packet::PubAck(PubAck::new(1))));
        c.send(Packet::PingReq).await;
        assert_eq!(c.recv().await, Some(Packet::PingResp));
        c.send(Packet::Disconnect).await;
        c.closed().await;
        assert_eq!(of_kind(&events(&s.dir), "twin_get")[0]["delivered"], false);
    }

    #[tokio::test]
    async fn refusals_get_connack_5() {
        let s = setup();
        let good = issued_chain(&s.sim, DEV, &[]);
        let bootstrap = pki::load_certs(&pki::device_full_chain_file(s.dir.path(), DEV)).unwrap();
        let cases: Vec<(Vec<CertificateDer<'static>>, &str, &str, &str)> = vec![
            (bootstrap, DEV, USER, "not trusted"),
            (
                good.clone(),
                DEV,
                "otherhub/gw-0001/?api-version=2021-04-12",
                "not this hub",
            ),
            (
                good.clone(),
                DEV,
                "localhost/gw-0002/?api-version=2021-04-12",
                "does not match",
            ),
            (
                good.clone(),
                DEV,
                "0ne00000000/registrations/gw-0001/api-version=2025-07-01-preview",
                "form",
            ),
            (
                good.clone(),
                DEV,
                "localhost/gw-0001/?DeviceClientType=x",
                "api-version",
            ),
            (
                good.clone(),
                "gw-0002",
                "localhost/gw-0002/?api-version=2021-04-12",
                "CN",
            ),
            (
                issued_chain(&s.sim, DEV, &[Fault::ExpiredCert]),
                DEV,
                USER,
                "expired",
            ),
            (
                issued_chain(&s.sim, DEV, &[Fault::ForeignChain]),
                DEV,
                USER,
                "not trusted",
            ),
            (Vec::new(), DEV, USER, "no client certificate"),
        ];
        let n = cases.len();
        for (chain, id, user, _) in &cases {
            let mut c = client(&s.sim, chain.clone());
            let ack = c.connect(id, user, true).await;
            assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "{user}");
            c.closed().await;
        }
        // reject-cert refuses even the good certificate; switched off, it connects.
        std::fs::write(&s.control, "reject-cert\n").unwrap();
        let mut c = client(&s.sim, good.clone());
        assert_eq!(
            c.connect(DEV, USER, true).await.code,
            ConnectReturnCode::NotAuthorized
        );
        c.closed().await;
        std::fs::remove_file(&s.control).unwrap();
        let mut c = client(&s.sim, good.clone());
        assert_eq!(
            c.connect(DEV, USER, true).await.code,
            ConnectReturnCode::Success
        );
        c.send(Packet::Disconnect).await;
        c.closed().await;
        // Empty client id: CONNACK 2.
        let mut c = client(&s.sim, good);
        assert_eq!(
            c.connect("", USER, true).await.code,
            ConnectReturnCode::BadClientId
        );
        c.closed().await;

        let connects = of_kind(&events(&s.dir), "connect");
        assert_eq!(connects.len(), n + 3);
        for (event, (_, _, _, reason)) in connects.iter().zip(&cases) {
            assert_eq!(event["connack"], 5);
            let result = event["result"].as_str().unwrap();
            assert!(result.contains(reason), "{result} lacks {reason}");
        }
        assert_eq!(connects[n]["fault"], "reject-cert");
        assert!(connects[n]["result"]
            .as_str()
            .unwrap()
            .contains("reject-cert"));
        assert_eq!(connects[n + 1]["connack"], 0);
    }

    #[tokio::test]
    async fn mqtt5_qos2_and_foreign_topics_close() {
        let s = setup();
        let chain = issued_chain(&s.sim, DEV, &[]);
        let mut c = client(&s.sim, chain.clone());
        c.io.write_all(&[
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 1, b'x',
        ])
        .await
        .unwrap();
        match c.recv().await {
            Some(Packet::ConnAck(ack)) => {
                assert_eq!(ack.code, ConnectReturnCode::RefusedProtocolVersion)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
        c.closed().await;

        for (topic, qos) in [
            ("devices/gw-0001/messages/events/", QoS::ExactlyOnce),
            ("devices/gw-0002/messages/events/", QoS::AtLeastOnce),
            ("$iothub/twin/GET/", QoS::AtMostOnce),
            ("$iothub/methods/res/200/?$rid=1", QoS::AtMostOnce),
        ] {
            let mut c = client(&s.sim, chain.clone());
            c.connect(DEV, USER, true).await;
            c.send(publish(topic, qos, 1, b"{}")).await;
            c.closed().await;
        }
        let reasons: Vec<String> = of_kind(&events(&s.dir), "disconnect")
            .iter()
            .map(|e| e["reason"].as_str().unwrap().to_string())
            .collect();
        assert!(reasons[1].contains("QoS 2"), "{reasons:?}");
        assert!(reasons[2].contains("another device"), "{reasons:?}");
        assert!(reasons[3].contains("$rid"), "{reasons:?}");
        assert!(
            reasons[4].contains("not an IoT Hub device topic"),
            "{reasons:?}"
        );
    }

    fn csr_for(cn: &str) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, cn);
        params.distinguished_name = dn;
        let der = params.serialize_request(&key).unwrap();
        (key, STANDARD.encode(der.der()))
    }

    #[tokio::test]
    async fn certificate_api_202_then_200_with_a_chain() {
        let s = setup();
        let mut c = client(&s.sim, issued_chain(&s.sim, DEV, &[]));
        c.connect(DEV, USER, true).await;
        let codes = subscribe(
            &mut c,
            1,
            &[("$iothub/credentials/res/#", QoS::AtLeastOnce)],
        )
        .await;
        assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
        let (key, csr) = csr_for(DEV);
        let body = json!({"id": DEV, "csr": csr, "replace": "*"}).to_string();
        c.send(publish(
            "$iothub/credentials/POST/issueCertificate/?$rid=req-0001",
            QoS::AtLeastOnce,
            2,
            body.as_bytes(),
        ))
        .await;
        assert_eq!(c.recv().await, Some(Packet::PubAck(PubAck::new(2))));
        let accepted = response(&mut c).await;
        assert_eq!(accepted.topic, "$iothub/credentials/res/202/?$rid=req-0001");
        let accepted: Value = serde_json::from_slice(&accepted.payload).unwrap();
        let done = response(&mut c).await;
        assert_eq!(done.topic, "$iothub/credentials/res/200/?$rid=req-0001");
        let done: Value = serde_json::from_slice(&done.payload).unwrap();
        assert_eq!(done["correlationId"], accepted["correlationId"]);
        assert!(accepted["operationExpires"]
            .as_str()
            .unwrap()
            .ends_with('Z'));
        let certs: Vec<Vec<u8>> = done["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| STANDARD.decode(c.as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(certs.len(), 3);
        let (_, leaf) = x509_parser::parse_x509_certificate(&certs[0]).unwrap();
        assert_eq!(
            leaf.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        assert_eq!(leaf.subject().to_string(), format!("CN={DEV}"));
        assert_eq!(
            certs[1],
            pki::load_cert(&pki::cert_file(s.dir.path(), pki::ISSUING_CA))
                .unwrap()
                .to_vec()
        );

        // Errors: a bad $rid, a CSR for another name, an unknown field.
        for (rid, body, code) in [
            ("-x-", json!({"id": DEV, "csr": csr}), 400_004),
            (
                "req-0002",
                json!({"id": DEV, "csr": csr_for("other").1}),
                400_042,
            ),
            ("req-0003", json!({"id": DEV, "csr": csr, "x": 1}), 400_004),
        ] {
            c.send(publish(
                &format!("$iothub/credentials/POST/issueCertificate/?$rid={rid}"),
                QoS::AtMostOnce,
                0,
                body.to_string().as_bytes(),
            ))
            .await;
            let p = response(&mut c).await;
            assert_eq!(p.topic, format!("$iothub/credentials/res/400/?$rid={rid}"));
            let b: Value = serde_json::from_slice(&p.payload).unwrap();
            assert_eq!(b["errorCode"], code, "{b}");
        }
        c.send(Packet::Disconnect).await;
        c.closed().await;

        let ev = events(&s.dir);
        let issued = of_kind(&ev, "issued");
        assert_eq!(issued.len(), 1);
        assert_eq!(issued[0]["service"], "hub");
        assert_eq!(issued[0]["chain_len"], 3);
        assert_eq!(
            issued[0]["leaf_spki_sha256"],
            issue::sha256_hex(&key.subject_public_key_info())
        );
        let responses = of_kind(&ev, "credential_response");
        let statuses: Vec<u64> = responses
            .iter()
            .map(|r| r["status"].as_u64().unwrap())
            .collect();
        assert_eq!(statuses, vec![202, 200, 400, 400, 400]);
        assert_eq!(of_kind(&ev, "credential_request").len(), 4);
    }

    #[test]
    fn rids() {
        assert!(valid_rid("req-0001"));
        assert!(valid_rid("abcd"));
        assert!(!valid_rid("abc"));
        assert!(!valid_rid("-abc"));
        assert!(!valid_rid("abcd-"));
        assert!(!valid_rid("ab_cd"));
        assert!(!valid_rid(&"a".repeat(37)));
    }
}
