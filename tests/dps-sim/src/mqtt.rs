//! One device connection speaking DPS over MQTT 3.1.1: CONNECT checks (protocol level,
//! client id, the credential — TLS chain and certificate CN, or without a certificate a SAS
//! token as the password — and username), the response subscription, and the register / poll
//! publishes handed to `dps.rs`. Framing is `wire.rs`. No session state survives a connection.

use std::time::Duration;

use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
    UnsubAck,
};
use rumqttc::mqttbytes::{Protocol, QoS};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::dps::{self, Outcome, RequestContext};
use crate::events::Service;
use crate::faults;
use crate::issue::Issued;
use crate::server::{Peer, Simulator};
use crate::tls;
use crate::topics::{self, RequestTopic};
use crate::wire::{self, ConnectError, Wire};

/// Largest packet accepted from a device (DPS: 96 KB per message); larger closes the connection.
pub const MAX_INCOMING: usize = 96 * 1024;

/// Serves one connection until it ends and records why in a `disconnect` event.
pub async fn serve_connection<S>(
    stream: S,
    peer: Peer,
    sim: &Simulator,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut session = Session {
        wire: Wire::new(stream, MAX_INCOMING),
        peer,
        sim,
        keep_alive: None,
        registration_id: String::new(),
        api_version: String::new(),
        extra: None,
        granted: None,
    };
    let end = tokio::select! {
        end = session.run() => end,
        _ = shutdown.wait_for(|stop| *stop) => End::Close("server shutdown".to_string()),
    };
    let reason = match end {
        End::Close(reason) => {
            let _ = session.wire.stream.shutdown().await;
            reason
        }
        // Dropped without a TLS close_notify: the device just sees the TCP connection go.
        End::Drop(reason) => reason,
    };
    sim.events.emit(
        Service::Dps,
        session.peer.conn,
        "disconnect",
        json!({ "reason": reason }),
    );
}

/// How a connection ends.
enum End {
    /// Orderly: TLS close_notify, then the socket is closed.
    Close(String),
    /// Abrupt: the socket is dropped (`drop-after-register`).
    Drop(String),
}

impl From<String> for End {
    fn from(reason: String) -> Self {
        End::Close(reason)
    }
}

struct Session<'a, S> {
    wire: Wire<S>,
    peer: Peer,
    sim: &'a Simulator,
    /// 1.5 × the client's keep-alive, if it asked for one.
    keep_alive: Option<Duration>,
    registration_id: String,
    api_version: String,
    /// `registrationState` fields from the authentication (the enrollment group).
    extra: Option<serde_json::Map<String, Value>>,
    /// QoS granted to `$dps/registrations/res/#`, if subscribed.
    granted: Option<QoS>,
}

/// Result of the CONNECT checks.
struct Verdict {
    code: ConnectReturnCode,
    result: String,
    username: Option<topics::Username>,
    /// How the device authenticated: `x509`, or `sas` with its enrollment.
    auth: Option<(&'static str, Option<String>)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    /// Runs the connection; returns how it ended.
    async fn run(&mut self) -> End {
        if let Err(reason) = self.handshake().await {
            return End::Close(reason);
        }
        loop {
            let packet = match self.wire.next_packet(self.keep_alive).await {
                Ok(p) => p,
                Err(reason) => return End::Close(reason),
            };
            if let Err(end) = self.handle(packet).await {
                return end;
            }
        }
    }

    /// Reads the CONNECT, checks it, answers CONNACK. `Err` = connection is over.
    async fn handshake(&mut self) -> Result<(), String> {
        let cert_cn = self.peer.chain.first().and_then(|c| tls::common_name(c));
        let connect = match self.wire.read_connect().await {
            Ok(c) => c,
            Err(ConnectError::Closed(reason)) => return Err(reason),
            Err(ConnectError::Protocol { name, level }) => {
                let result = format!(
                    "unsupported protocol {name:?} level {level}; DPS speaks MQTT 3.1.1 (level 4) only"
                );
                self.connect_event(
                    None,
                    &cert_cn,
                    &result,
                    ConnectReturnCode::RefusedProtocolVersion,
                    None,
                );
                self.wire
                    .send(Packet::ConnAck(ConnAck::new(
                        ConnectReturnCode::RefusedProtocolVersion,
                        false,
                    )))
                    .await?;
                return Err(format!("CONNECT refused: {result}"));
            }
        };
        let verdict = self.judge(&connect, &cert_cn);
        self.connect_event(
            Some(&connect),
            &cert_cn,
            &verdict.result,
            verdict.code,
            verdict.auth.clone(),
        );
        // Sessions are never kept: session_present is always false.
        self.wire
            .send(Packet::ConnAck(ConnAck::new(verdict.code, false)))
            .await?;
        match verdict.username {
            Some(u) if verdict.code == ConnectReturnCode::Success => {
                self.registration_id = connect.client_id;
                self.api_version = u.api_version;
                if let Some(group) = verdict
                    .auth
                    .and_then(|(_, e)| e)
                    .and_then(|e| e.strip_prefix("group:").map(str::to_string))
                {
                    let mut m = serde_json::Map::new();
                    m.insert("symmetricKey".into(), json!({ "enrollmentGroupId": group }));
                    self.extra = Some(m);
                }
                self.keep_alive = wire::keep_alive_limit(connect.keep_alive);
                Ok(())
            }
            _ => Err(format!(
                "CONNECT refused (CONNACK {}): {}",
                verdict.code as u8, verdict.result
            )),
        }
    }

    /// The CONNECT checks, in order. All identity problems are CONNACK 5 ("not authorized"),
    /// like DPS refusing a device; an empty client id is CONNACK 2.
    fn judge(&self, connect: &Connect, cert_cn: &Option<String>) -> Verdict {
        let refuse = |code, result: String| Verdict {
            code,
            result,
            username: None,
            auth: None,
        };
        let not_authorized = |result: String| refuse(ConnectReturnCode::NotAuthorized, result);
        if connect.protocol != Protocol::V4 {
            return refuse(
                ConnectReturnCode::RefusedProtocolVersion,
                "DPS speaks MQTT 3.1.1 (level 4) only".into(),
            );
        }
        if connect.client_id.is_empty() {
            return refuse(
                ConnectReturnCode::BadClientId,
                "empty client id; it must be the registration id".into(),
            );
        }
        let password = connect
            .login
            .as_ref()
            .map(|l| l.password.as_str())
            .filter(|p| !p.is_empty());
        let auth = match (self.peer.chain.is_empty(), password) {
            // Symmetric key: no certificate, the SAS token is the password.
            (true, Some(token)) => match self.sim.enrollments.verify_sas(token, &connect.client_id)
            {
                Ok(proof) => ("sas", Some(proof.enrollment())),
                Err(reason) => return not_authorized(format!("SAS token refused: {reason}")),
            },
            (true, None) => {
                return not_authorized(
                    "no client certificate, and no SAS token as the password".into(),
                )
            }
            (false, _) => {
                if let Err(reason) = self.sim.validator.validate(&self.peer.chain) {
                    return not_authorized(reason);
                }
                match cert_cn {
                    None => {
                        return not_authorized(
                            "client certificate has no single subject CN".into(),
                        );
                    }
                    Some(cn) if *cn != connect.client_id => {
                        return not_authorized(format!(
                            "client certificate CN {cn:?} does not match client id {:?}",
                            connect.client_id
                        ));
                    }
                    Some(_) => ("x509", None),
                }
            }
        };
        let username =
            match topics::parse_username(connect.login.as_ref().map(|l| l.username.as_str())) {
                Ok(u) => u,
                Err(e) => return not_authorized(e.to_string()),
            };
        if username.id_scope != self.sim.id_scope {
            return not_authorized(format!(
                "id scope {:?} in the username is not this DPS ({:?})",
                username.id_scope, self.sim.id_scope
            ));
        }
        if username.registration_id != connect.client_id {
            return not_authorized(format!(
                "registration id {:?} in the username does not match client id {:?}",
                username.registration_id, connect.client_id
            ));
        }
        Verdict {
            code: ConnectReturnCode::Success,
            result: "accepted".into(),
            username: Some(username),
            auth: Some(auth),
        }
    }

    fn emit(&self, event: &str, fields: Value) {
        self.sim
            .events
            .emit(Service::Dps, self.peer.conn, event, fields);
    }

    fn connect_event(
        &self,
        connect: Option<&Connect>,
        cert_cn: &Option<String>,
        result: &str,
        code: ConnectReturnCode,
        auth: Option<(&'static str, Option<String>)>,
    ) {
        let (auth, enrollment) = match auth {
            Some((a, e)) => (Some(a), e),
            None => (None, None),
        };
        self.emit(
            "connect",
            json!({
                "transport": "mqtt",
                "auth": auth,
                "enrollment": enrollment,
                "client_id": connect.map(|c| c.client_id.clone()),
                "username": connect.and_then(|c| c.login.as_ref().map(|l| l.username.clone())),
                "clean_session": connect.map(|c| c.clean_session),
                "cert_cn": cert_cn,
                "cert_chain_len": self.peer.chain.len(),
                "result": result,
                "connack": code as u8,
                "fault": self.peer.tls_fault.map(|f| f.name()),
            }),
        );
    }

    /// Handles one packet after CONNECT. `Err` = the connection ends this way.
    async fn handle(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::Subscribe(sub) => {
                let mut codes = Vec::with_capacity(sub.filters.len());
                for filter in &sub.filters {
                    let code = if topics::is_response_filter(&filter.path) {
                        let qos = if filter.qos == QoS::AtMostOnce {
                            QoS::AtMostOnce
                        } else {
                            QoS::AtLeastOnce
                        };
                        self.granted = Some(qos);
                        SubscribeReasonCode::Success(qos)
                    } else {
                        SubscribeReasonCode::Failure
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
                Ok(self
                    .wire
                    .send(Packet::SubAck(SubAck::new(sub.pkid, codes)))
                    .await?)
            }
            Packet::Unsubscribe(unsub) => {
                if unsub.topics.iter().any(|t| topics::is_response_filter(t)) {
                    self.granted = None;
                }
                Ok(self
                    .wire
                    .send(Packet::UnsubAck(UnsubAck::new(unsub.pkid)))
                    .await?)
            }
            Packet::Publish(publish) => self.on_publish(publish).await,
            // Acknowledgement of a QoS 1 response; nothing is kept for redelivery.
            Packet::PubAck(_) => Ok(()),
            Packet::PingReq => Ok(self.wire.send(Packet::PingResp).await?),
            Packet::Disconnect => Err(End::Close("client DISCONNECT".into())),
            Packet::Connect(_) => Err(End::Close("protocol violation: second CONNECT".into())),
            other => Err(End::Close(format!(
                "protocol violation: unexpected {} packet from a client",
                wire::packet_name(&other)
            ))),
        }
    }

    async fn on_publish(&mut self, publish: Publish) -> Result<(), End> {
        if publish.qos == QoS::ExactlyOnce {
            return Err(End::Close("QoS 2 publish is not supported by DPS".into()));
        }
        let topic = match topics::parse_request_topic(&publish.topic) {
            Ok(t) => t,
            Err(e) => {
                self.puback(&publish).await?;
                return Err(End::Close(e.to_string()));
            }
        };
        let faults = self.sim.faults.current().await;
        let ctx = RequestContext {
            registration_id: &self.registration_id,
            api_version: &self.api_version,
            extra: self.extra.as_ref(),
        };
        let (kind, operation_id) = match &topic {
            RequestTopic::Register { .. } => ("register", None),
            RequestTopic::Poll { operation_id, .. } => ("poll", operation_id.clone()),
        };
        self.emit(
            "request",
            json!({
                "transport": "mqtt",
                "kind": kind,
                "rid": topic.rid(),
                "operation_id": operation_id,
                "registration_id": self.registration_id,
                "body": dps::body_for_event(&publish.payload),
            }),
        );
        let outcome = match &topic {
            RequestTopic::Register { .. } => self.sim.dps.register(ctx, &publish.payload, &faults),
            RequestTopic::Poll { operation_id, .. } => {
                self.sim.dps.poll(ctx, operation_id.as_deref(), &faults)
            }
        };
        if outcome.drop_connection {
            // Not even a PUBACK: the request is lost with the connection.
            self.response_event(topic.rid(), &outcome, false);
            return Err(End::Drop(format!(
                "connection dropped without an answer ({} fault)",
                faults::event_field(&outcome.faults).unwrap_or_default()
            )));
        }
        self.puback(&publish).await?;
        if let Some(issued) = &outcome.issued {
            self.issued_event(issued, &outcome);
        }
        Ok(self.respond(topic.rid(), &outcome).await?)
    }

    async fn puback(&mut self, publish: &Publish) -> Result<(), String> {
        if publish.qos == QoS::AtLeastOnce {
            self.wire
                .send(Packet::PubAck(PubAck::new(publish.pkid)))
                .await?;
        }
        Ok(())
    }

    /// Publishes the answer if the device subscribed, and records it; a failed write is
    /// recorded (`delivered: false`) before it ends the connection.
    async fn respond(&mut self, rid: &str, outcome: &Outcome) -> Result<(), String> {
        let sent = match self.granted {
            Some(qos) => {
                let topic = topics::response_topic(outcome.status, rid, outcome.retry_after);
                let mut publish = Publish::new(topic, qos, outcome.body.clone());
                if qos == QoS::AtLeastOnce {
                    publish.pkid = self.wire.pkid();
                }
                self.wire
                    .send(Packet::Publish(publish))
                    .await
                    .map(|()| true)
            }
            None => Ok(false),
        };
        self.response_event(rid, outcome, sent.as_ref().is_ok_and(|d| *d));
        sent.map(|_| ())
    }

    fn response_event(&self, rid: &str, outcome: &Outcome, delivered: bool) {
        self.emit(
            "response",
            json!({
                "transport": "mqtt",
                "rid": rid,
                "status": (!outcome.drop_connection).then_some(outcome.status),
                "retry_after": outcome.retry_after,
                "operation_id": outcome.operation_id,
                "registration_status": outcome.registration_status,
                "error_code": outcome.error_code,
                "fault": faults::event_field(&outcome.faults),
                "delivered": delivered,
                "body": (!outcome.drop_connection).then(|| dps::body_for_event(&outcome.body)),
            }),
        );
    }

    fn issued_event(&self, issued: &Issued, outcome: &Outcome) {
        self.emit(
            "issued",
            issued_fields(&self.registration_id, issued, &outcome.faults),
        );
    }
}

/// The fields of an `issued` event (shared with the hub's certificate API).
pub fn issued_fields(registration_id: &str, issued: &Issued, applied: &[faults::Fault]) -> Value {
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .map(Value::from)
            .unwrap_or(Value::Null)
    };
    // Only the faults that concern the certificate (not e.g. oversize-response).
    let cert_faults: Vec<faults::Fault> = applied
        .iter()
        .copied()
        .filter(|f| faults::ISSUANCE.contains(f))
        .collect();
    json!({
        "registration_id": registration_id,
        "serial": issued.serial_hex,
        "not_before": fmt(issued.not_before),
        "not_after": fmt(issued.not_after),
        "leaf_spki_sha256": issued.leaf_spki_sha256,
        "csr_spki_sha256": issued.csr_spki_sha256,
        "chain_len": issued.chain.len(),
        "fault": faults::event_field(&cert_faults),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dps::{Dps, DpsConfig};
    use crate::events::Events;
    use crate::faults::{Fault, FaultSet, FaultSource};
    use crate::issue::CertIssuer;
    use crate::pki;
    use crate::tls::ClientChainValidator;
    use crate::wire::testing::Client;
    use rumqttc::mqttbytes::v4::{Subscribe, SubscribeFilter};
    use rustls::pki_types::CertificateDer;
    use std::sync::Arc;

    const USER: &str = "0ne00000000/registrations/gw-0001/api-version=2025-07-01-preview";

    /// A simulator over a generated PKI, and the trusted device chain a TLS layer would
    /// have handed over.
    fn simulator() -> (
        tempfile::TempDir,
        Arc<Simulator>,
        Vec<CertificateDer<'static>>,
    ) {
        simulator_with(FaultSet::default())
    }

    fn simulator_with(
        faults: FaultSet,
    ) -> (
        tempfile::TempDir,
        Arc<Simulator>,
        Vec<CertificateDer<'static>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        pki::generate(dir.path(), &["gw-0001".to_string()], false).unwrap();
        let sim = Simulator {
            dps: Dps::new(
                DpsConfig {
                    assigned_hub: "localhost".into(),
                    retry_after: 1,
                    polls_before_assign: 1,
                    cert_validity: Duration::from_secs(60),
                },
                CertIssuer::load(dir.path()).unwrap(),
            ),
            events: Events::to_file(&dir.path().join("events.jsonl")).unwrap(),
            faults: FaultSource::new(faults, None),
            validator: ClientChainValidator::from_files(&[pki::cert_file(
                dir.path(),
                pki::BOOTSTRAP_ROOT,
            )])
            .unwrap(),
            enrollments: crate::auth::Enrollments::new("0ne00000000", &[], &[], &[], 0),
            id_scope: "0ne00000000".into(),
            hub: None,
        };
        let chain = pki::load_certs(&pki::device_full_chain_file(dir.path(), "gw-0001")).unwrap();
        (dir, Arc::new(sim), chain)
    }

    fn client(sim: &Arc<Simulator>, chain: Vec<CertificateDer<'static>>) -> Client {
        let sim = sim.clone();
        Client::start(move |io, stop| async move {
            let peer = Peer {
                conn: 1,
                chain,
                tls_fault: None,
            };
            serve_connection(io, peer, &sim, stop).await;
        })
    }

    fn events(dir: &tempfile::TempDir) -> Vec<Value> {
        std::fs::read_to_string(dir.path().join("events.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn register(pkid: u16, qos: QoS) -> Packet {
        let mut p = Publish::new(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            qos,
            br#"{"registrationId":"gw-0001"}"#.to_vec(),
        );
        p.pkid = pkid;
        Packet::Publish(p)
    }

    #[tokio::test]
    async fn mqtt5_connect_gets_connack_1() {
        let (dir, sim, chain) = simulator();
        let mut c = client(&sim, chain);
        // MQTT 5 CONNECT: level 5, clean start, keep-alive 60, no properties, client id "x".
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
        let ev = events(&dir);
        assert_eq!(ev[0]["event"], "connect");
        assert_eq!(ev[0]["connack"], 1);
        assert_eq!(ev[1]["event"], "disconnect");
    }

    #[tokio::test]
    async fn session_subscribe_ping_and_responses() {
        let (dir, sim, chain) = simulator();
        let mut c = client(&sim, chain);
        // clean_session = 0 is accepted but no session is ever present.
        let ack = c.connect("gw-0001", USER, false).await;
        assert_eq!(ack, ConnAck::new(ConnectReturnCode::Success, false));

        // Not subscribed yet: the request is acknowledged, the answer is not delivered.
        c.send(register(1, QoS::AtLeastOnce)).await;
        assert_eq!(c.recv().await, Some(Packet::PubAck(PubAck::new(1))));

        let mut sub = Subscribe::new("$dps/registrations/res/#", QoS::ExactlyOnce);
        sub.pkid = 2;
        sub.filters.push(SubscribeFilter::new(
            "devices/gw-0001/#".into(),
            QoS::AtLeastOnce,
        ));
        c.send(Packet::Subscribe(sub)).await;
        assert_eq!(
            c.recv().await,
            Some(Packet::SubAck(SubAck::new(
                2,
                vec![
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::Failure
                ]
            )))
        );
        c.send(Packet::PingReq).await;
        assert_eq!(c.recv().await, Some(Packet::PingResp));

        c.send(register(0, QoS::AtMostOnce)).await;
        match c.recv().await {
            Some(Packet::Publish(p)) => {
                assert_eq!(p.topic, "$dps/registrations/res/202/?$rid=1&retry-after=1");
                assert_eq!(p.qos, QoS::AtLeastOnce);
                assert_ne!(p.pkid, 0);
                c.send(Packet::PubAck(PubAck::new(p.pkid))).await;
            }
            other => panic!("expected a response, got {other:?}"),
        }
        c.send(Packet::Disconnect).await;
        c.closed().await;

        let ev = events(&dir);
        let responses: Vec<&Value> = ev.iter().filter(|e| e["event"] == "response").collect();
        assert_eq!(responses[0]["delivered"], false);
        assert_eq!(responses[1]["delivered"], true);
        let subs: Vec<&Value> = ev.iter().filter(|e| e["event"] == "subscribe").collect();
        assert_eq!(subs[0]["granted"], 1);
        assert_eq!(subs[1]["granted"], 0x80);
        assert_eq!(ev[0]["clean_session"], false);
        assert_eq!(ev.last().unwrap()["reason"], "client DISCONNECT");
    }

    #[tokio::test]
    async fn oversize_packet_closes_the_connection() {
        let (dir, sim, chain) = simulator();
        let mut c = client(&sim, chain);
        c.connect("gw-0001", USER, true).await;
        let mut p = Publish::new(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            QoS::AtMostOnce,
            vec![b' '; MAX_INCOMING + 1],
        );
        p.pkid = 0;
        c.send(Packet::Publish(p)).await;
        c.closed().await;
        let reason = events(&dir).last().unwrap()["reason"].clone();
        assert!(reason.as_str().unwrap().contains("exceeds"), "{reason}");
    }

    #[tokio::test]
    async fn bad_usernames_and_missing_certificate_get_connack_5() {
        let (dir, sim, chain) = simulator();
        for (client_id, username) in [
            ("gw-0001", "garbage"),
            (
                "gw-0001",
                "0ne00000000/registrations/gw-0002/api-version=2025-07-01-preview",
            ),
            ("gw-0001", ""),
        ] {
            let mut c = client(&sim, chain.clone());
            let ack = c.connect(client_id, username, true).await;
            assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "{username}");
            c.closed().await;
        }
        let mut c = client(&sim, Vec::new());
        assert_eq!(
            c.connect("gw-0001", USER, true).await.code,
            ConnectReturnCode::NotAuthorized
        );
        c.closed().await;
        let mut c = client(&sim, chain);
        assert_eq!(
            c.connect("", USER, true).await.code,
            ConnectReturnCode::BadClientId
        );
        c.closed().await;
        let connects: Vec<Value> = events(&dir)
            .into_iter()
            .filter(|e| e["event"] == "connect")
            .collect();
        assert_eq!(connects.len(), 5);
        assert!(connects[3]["result"]
            .as_str()
            .unwrap()
            .contains("no client certificate"));
    }

    #[tokio::test]
    async fn drop_after_register_closes_without_puback_once() {
        let (dir, sim, chain) = simulator_with(FaultSet::new([Fault::DropAfterRegister]));
        let mut c = client(&sim, chain.clone());
        c.connect("gw-0001", USER, true).await;
        c.send(register(1, QoS::AtLeastOnce)).await;
        // No PUBACK, no response: the connection just goes.
        c.closed().await;

        // The reconnect is answered normally.
        let mut c = client(&sim, chain);
        c.connect("gw-0001", USER, true).await;
        c.send(register(1, QoS::AtLeastOnce)).await;
        assert_eq!(c.recv().await, Some(Packet::PubAck(PubAck::new(1))));
        c.send(Packet::Disconnect).await;
        c.closed().await;

        let ev = events(&dir);
        let responses: Vec<&Value> = ev.iter().filter(|e| e["event"] == "response").collect();
        assert_eq!(responses[0]["status"], Value::Null);
        assert_eq!(responses[0]["fault"], "drop-after-register");
        assert_eq!(responses[0]["delivered"], false);
        assert_eq!(responses[1]["status"], 202);
        assert_eq!(responses[1]["fault"], Value::Null);
        let disconnects: Vec<&Value> = ev.iter().filter(|e| e["event"] == "disconnect").collect();
        assert!(disconnects[0]["reason"]
            .as_str()
            .unwrap()
            .contains("drop-after-register"));
        assert!(ev.iter().all(|e| e["service"] == "dps"));
    }
}
