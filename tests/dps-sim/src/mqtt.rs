//! One device connection speaking DPS over MQTT 3.1.1: CONNECT checks (protocol level,
//! client id, TLS chain, certificate CN, username), the response subscription, and the
//! register / poll publishes handed to `dps.rs`. Packets are framed and encoded by rumqttc's
//! `mqttbytes::v4`. No session state survives a connection.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
    UnsubAck,
};
use rumqttc::mqttbytes::{check, Error as MqttError, Protocol, QoS};
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::dps::{self, Outcome, RequestContext};
use crate::issue::Issued;
use crate::server::Simulator;
use crate::tls;
use crate::topics::{self, RequestTopic};

/// Largest packet accepted from a device (DPS: 96 KB per message); larger closes the connection.
pub const MAX_INCOMING: usize = 96 * 1024;
/// Largest packet the simulator sends (the MQTT maximum).
const MAX_OUTGOING: usize = 268_435_455;
/// Time allowed between the TLS handshake and a complete CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one connection until it ends and records why in a `disconnect` event.
pub async fn serve_connection<S>(
    stream: S,
    conn: u64,
    peer_chain: Vec<CertificateDer<'static>>,
    sim: &Simulator,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut session = Session {
        stream,
        conn,
        sim,
        buf: BytesMut::with_capacity(4096),
        out: BytesMut::with_capacity(4096),
        keep_alive: None,
        registration_id: String::new(),
        api_version: String::new(),
        granted: None,
        next_pkid: 0,
    };
    let reason = tokio::select! {
        reason = session.run(&peer_chain) => reason,
        _ = shutdown.wait_for(|stop| *stop) => "server shutdown".to_string(),
    };
    let _ = session.stream.shutdown().await;
    sim.events
        .emit(conn, "disconnect", json!({ "reason": reason }));
}

struct Session<'a, S> {
    stream: S,
    conn: u64,
    sim: &'a Simulator,
    buf: BytesMut,
    out: BytesMut,
    /// 1.5 × the client's keep-alive, if it asked for one.
    keep_alive: Option<Duration>,
    registration_id: String,
    api_version: String,
    /// QoS granted to `$dps/registrations/res/#`, if subscribed.
    granted: Option<QoS>,
    next_pkid: u16,
}

/// Result of the CONNECT checks.
struct Verdict {
    code: ConnectReturnCode,
    result: String,
    username: Option<topics::Username>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    /// Runs the connection; returns the reason it ended.
    async fn run(&mut self, chain: &[CertificateDer<'static>]) -> String {
        match self.handshake(chain).await {
            Ok(()) => {}
            Err(reason) => return reason,
        }
        loop {
            let packet = match self.next_packet(self.keep_alive).await {
                Ok(p) => p,
                Err(reason) => return reason,
            };
            if let Err(reason) = self.handle(packet).await {
                return reason;
            }
        }
    }

    /// Reads the CONNECT, checks it, answers CONNACK. `Err` = connection is over.
    async fn handshake(&mut self, chain: &[CertificateDer<'static>]) -> Result<(), String> {
        let cert_cn = chain.first().and_then(|c| tls::common_name(c));
        tokio::time::timeout(CONNECT_TIMEOUT, self.fill_frame())
            .await
            .map_err(|_| "no CONNECT within 10 s".to_string())??;
        if self.buf.first().map(|b| b >> 4) != Some(1) {
            return Err("the first packet was not CONNECT".into());
        }
        if let Some((name, level)) = connect_protocol(&self.buf) {
            if name != "MQTT" || level != 4 {
                let result = format!(
                    "unsupported protocol {name:?} level {level}; DPS speaks MQTT 3.1.1 (level 4) only"
                );
                self.connect_event(
                    None,
                    &cert_cn,
                    &result,
                    ConnectReturnCode::RefusedProtocolVersion,
                );
                self.send(Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::RefusedProtocolVersion,
                    false,
                )))
                .await?;
                return Err(format!("CONNECT refused: {result}"));
            }
        }
        let connect = match Packet::read(&mut self.buf, MAX_INCOMING) {
            Ok(Packet::Connect(c)) => c,
            Ok(_) => return Err("the first packet was not CONNECT".into()),
            Err(e) => return Err(format!("malformed CONNECT: {e}")),
        };
        let verdict = self.judge(&connect, chain, &cert_cn);
        self.connect_event(Some(&connect), &cert_cn, &verdict.result, verdict.code);
        // Sessions are never kept: session_present is always false.
        self.send(Packet::ConnAck(ConnAck::new(verdict.code, false)))
            .await?;
        match verdict.username {
            Some(u) if verdict.code == ConnectReturnCode::Success => {
                self.registration_id = connect.client_id;
                self.api_version = u.api_version;
                if connect.keep_alive > 0 {
                    self.keep_alive =
                        Some(Duration::from_millis(u64::from(connect.keep_alive) * 1500));
                }
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
    fn judge(
        &self,
        connect: &Connect,
        chain: &[CertificateDer<'static>],
        cert_cn: &Option<String>,
    ) -> Verdict {
        let refuse = |code, result: String| Verdict {
            code,
            result,
            username: None,
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
        if let Err(reason) = self.sim.validator.validate(chain) {
            return not_authorized(reason);
        }
        match cert_cn {
            None => {
                return not_authorized("client certificate has no single subject CN".into());
            }
            Some(cn) if *cn != connect.client_id => {
                return not_authorized(format!(
                    "client certificate CN {cn:?} does not match client id {:?}",
                    connect.client_id
                ));
            }
            Some(_) => {}
        }
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
        }
    }

    fn connect_event(
        &self,
        connect: Option<&Connect>,
        cert_cn: &Option<String>,
        result: &str,
        code: ConnectReturnCode,
    ) {
        self.sim.events.emit(
            self.conn,
            "connect",
            json!({
                "client_id": connect.map(|c| c.client_id.clone()),
                "username": connect.and_then(|c| c.login.as_ref().map(|l| l.username.clone())),
                "clean_session": connect.map(|c| c.clean_session),
                "cert_cn": cert_cn,
                "result": result,
                "connack": code as u8,
            }),
        );
    }

    /// Handles one packet after CONNECT. `Err` = close with this reason.
    async fn handle(&mut self, packet: Packet) -> Result<(), String> {
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
                    self.sim.events.emit(
                        self.conn,
                        "subscribe",
                        json!({"filter": filter.path, "granted": granted}),
                    );
                    codes.push(code);
                }
                self.send(Packet::SubAck(SubAck::new(sub.pkid, codes)))
                    .await
            }
            Packet::Unsubscribe(unsub) => {
                if unsub.topics.iter().any(|t| topics::is_response_filter(t)) {
                    self.granted = None;
                }
                self.send(Packet::UnsubAck(UnsubAck::new(unsub.pkid))).await
            }
            Packet::Publish(publish) => self.on_publish(publish).await,
            // Acknowledgement of a QoS 1 response; nothing is kept for redelivery.
            Packet::PubAck(_) => Ok(()),
            Packet::PingReq => self.send(Packet::PingResp).await,
            Packet::Disconnect => Err("client DISCONNECT".into()),
            Packet::Connect(_) => Err("protocol violation: second CONNECT".into()),
            other => Err(format!(
                "protocol violation: unexpected {} packet from a client",
                packet_name(&other)
            )),
        }
    }

    async fn on_publish(&mut self, publish: Publish) -> Result<(), String> {
        match publish.qos {
            QoS::ExactlyOnce => return Err("QoS 2 publish is not supported by DPS".into()),
            QoS::AtLeastOnce => {
                self.send(Packet::PubAck(PubAck::new(publish.pkid))).await?;
            }
            QoS::AtMostOnce => {}
        }
        let topic = topics::parse_request_topic(&publish.topic).map_err(|e| e.to_string())?;
        let faults = self.sim.faults.current().await;
        let ctx = RequestContext {
            registration_id: &self.registration_id,
            api_version: &self.api_version,
        };
        let (kind, operation_id) = match &topic {
            RequestTopic::Register { .. } => ("register", None),
            RequestTopic::Poll { operation_id, .. } => ("poll", operation_id.clone()),
        };
        self.sim.events.emit(
            self.conn,
            "request",
            json!({
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
        if let Some(issued) = &outcome.issued {
            self.issued_event(issued);
        }
        self.respond(topic.rid(), &outcome).await
    }

    async fn respond(&mut self, rid: &str, outcome: &Outcome) -> Result<(), String> {
        let delivered = match self.granted {
            Some(qos) => {
                let topic = topics::response_topic(outcome.status, rid, outcome.retry_after);
                let mut publish = Publish::new(topic, qos, outcome.body.clone());
                if qos == QoS::AtLeastOnce {
                    publish.pkid = self.pkid();
                }
                self.send(Packet::Publish(publish)).await?;
                true
            }
            None => false,
        };
        self.sim.events.emit(
            self.conn,
            "response",
            json!({
                "rid": rid,
                "status": outcome.status,
                "retry_after": outcome.retry_after,
                "operation_id": outcome.operation_id,
                "registration_status": outcome.registration_status,
                "error_code": outcome.error_code,
                "fault": outcome.fault.map(|f| f.name()),
                "delivered": delivered,
            }),
        );
        Ok(())
    }

    fn issued_event(&self, issued: &Issued) {
        let fmt = |t: time::OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .map(Value::from)
                .unwrap_or(Value::Null)
        };
        self.sim.events.emit(
            self.conn,
            "issued",
            json!({
                "registration_id": self.registration_id,
                "serial": issued.serial_hex,
                "not_before": fmt(issued.not_before),
                "not_after": fmt(issued.not_after),
                "leaf_spki_sha256": issued.leaf_spki_sha256,
            }),
        );
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }

    /// The next packet, waiting at most `idle` for it.
    async fn next_packet(&mut self, idle: Option<Duration>) -> Result<Packet, String> {
        match idle {
            Some(limit) => tokio::time::timeout(limit, self.fill_frame())
                .await
                .map_err(|_| {
                    format!(
                        "keep-alive timeout ({} s without a packet)",
                        limit.as_secs_f64()
                    )
                })??,
            None => self.fill_frame().await?,
        }
        Packet::read(&mut self.buf, MAX_INCOMING).map_err(|e| format!("malformed packet: {e}"))
    }

    /// Reads until `buf` holds one complete frame.
    async fn fill_frame(&mut self) -> Result<(), String> {
        loop {
            match check(self.buf.iter(), MAX_INCOMING) {
                Ok(_) => return Ok(()),
                Err(MqttError::InsufficientBytes(_)) => {}
                Err(MqttError::PayloadSizeLimitExceeded(n)) => {
                    return Err(format!(
                        "packet of {n} bytes exceeds the {MAX_INCOMING}-byte limit"
                    ))
                }
                Err(e) => return Err(format!("malformed packet: {e}")),
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) if self.buf.is_empty() => {
                    return Err("connection closed by the client".into())
                }
                Ok(0) => {
                    return Err("connection closed by the client in the middle of a packet".into())
                }
                Ok(_) => {}
                Err(e) => return Err(format!("read error: {e}")),
            }
        }
    }

    async fn send(&mut self, packet: Packet) -> Result<(), String> {
        self.out.clear();
        packet
            .write(&mut self.out, MAX_OUTGOING)
            .map_err(|e| format!("cannot encode a packet: {e}"))?;
        self.stream
            .write_all(&self.out)
            .await
            .map_err(|e| format!("write error: {e}"))?;
        self.stream
            .flush()
            .await
            .map_err(|e| format!("write error: {e}"))
    }
}

/// Protocol name and level of a complete CONNECT frame, read before decoding so that any
/// level other than 4 gets CONNACK 1 (the v4 decoder refuses unknown levels outright).
fn connect_protocol(frame: &[u8]) -> Option<(String, u8)> {
    // Skip the fixed header: type byte + 1..4 remaining-length bytes.
    let mut i = 1;
    loop {
        let b = *frame.get(i)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    let len = usize::from(u16::from_be_bytes([*frame.get(i)?, *frame.get(i + 1)?]));
    i += 2;
    let name = frame.get(i..i + len)?;
    let level = *frame.get(i + len)?;
    Some((String::from_utf8_lossy(name).into_owned(), level))
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dps::{Dps, DpsConfig};
    use crate::events::Events;
    use crate::faults::FaultSource;
    use crate::issue::CertIssuer;
    use crate::pki;
    use crate::tls::ClientChainValidator;
    use rumqttc::mqttbytes::v4::{Subscribe, SubscribeFilter};
    use std::sync::Arc;
    use tokio::io::DuplexStream;

    const USER: &str = "0ne00000000/registrations/gw-0001/api-version=2025-07-01-preview";

    /// A simulator over a generated PKI, and the trusted device chain a TLS layer would
    /// have handed over.
    fn simulator() -> (
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
            faults: FaultSource::default(),
            validator: ClientChainValidator::from_files(&[pki::cert_file(
                dir.path(),
                pki::BOOTSTRAP_ROOT,
            )])
            .unwrap(),
            id_scope: "0ne00000000".into(),
        };
        let chain = pki::load_certs(&pki::device_full_chain_file(dir.path(), "gw-0001")).unwrap();
        (dir, Arc::new(sim), chain)
    }

    struct Client {
        io: DuplexStream,
        buf: BytesMut,
        server: tokio::task::JoinHandle<()>,
        _stop: watch::Sender<bool>,
    }

    impl Client {
        fn start(sim: &Arc<Simulator>, chain: Vec<CertificateDer<'static>>) -> Client {
            let (io, server_io) = tokio::io::duplex(1 << 20);
            let (stop, stop_rx) = watch::channel(false);
            let sim = sim.clone();
            let server = tokio::spawn(async move {
                serve_connection(server_io, 1, chain, &sim, stop_rx).await;
            });
            Client {
                io,
                buf: BytesMut::new(),
                server,
                _stop: stop,
            }
        }

        async fn send(&mut self, p: Packet) {
            let mut out = BytesMut::new();
            p.write(&mut out, MAX_OUTGOING).unwrap();
            self.io.write_all(&out).await.unwrap();
        }

        /// The next packet, or `None` once the server closed the connection.
        async fn recv(&mut self) -> Option<Packet> {
            loop {
                match Packet::read(&mut self.buf, MAX_OUTGOING) {
                    Ok(p) => return Some(p),
                    Err(MqttError::InsufficientBytes(_)) => {}
                    Err(e) => panic!("bad packet from server: {e}"),
                }
                let n =
                    tokio::time::timeout(Duration::from_secs(5), self.io.read_buf(&mut self.buf))
                        .await
                        .expect("server answered within 5 s")
                        .unwrap();
                if n == 0 {
                    return None;
                }
            }
        }

        async fn connect(&mut self, client_id: &str, username: &str, clean: bool) -> ConnAck {
            let mut c = Connect::new(client_id);
            c.clean_session = clean;
            c.set_login(username, "");
            self.send(Packet::Connect(c)).await;
            match self.recv().await {
                Some(Packet::ConnAck(ack)) => ack,
                other => panic!("expected CONNACK, got {other:?}"),
            }
        }

        async fn closed(mut self) {
            assert_eq!(self.recv().await, None);
            self.server.await.unwrap();
        }
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
        let mut c = Client::start(&sim, chain);
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
        let mut c = Client::start(&sim, chain);
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
        let mut c = Client::start(&sim, chain);
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
            let mut c = Client::start(&sim, chain.clone());
            let ack = c.connect(client_id, username, true).await;
            assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "{username}");
            c.closed().await;
        }
        let mut c = Client::start(&sim, Vec::new());
        assert_eq!(
            c.connect("gw-0001", USER, true).await.code,
            ConnectReturnCode::NotAuthorized
        );
        c.closed().await;
        let mut c = Client::start(&sim, chain);
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

    #[test]
    fn protocol_of_connect_frames() {
        let mut buf = BytesMut::new();
        Packet::Connect(Connect::new("gw-0001"))
            .write(&mut buf, 1024)
            .unwrap();
        assert_eq!(connect_protocol(&buf), Some(("MQTT".into(), 4)));
        // MQTT 5 CONNECT header, MQTT 3.1 (MQIsdp level 3).
        assert_eq!(
            connect_protocol(&[0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60]),
            Some(("MQTT".into(), 5))
        );
        assert_eq!(
            connect_protocol(&[0x10, 12, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60]),
            Some(("MQIsdp".into(), 3))
        );
        // Truncated or hostile input never panics.
        assert_eq!(connect_protocol(&[0x10]), None);
        assert_eq!(
            connect_protocol(&[0x10, 0xff, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        assert_eq!(connect_protocol(&[0x10, 2, 0xff, 0xff]), None);
    }
}
