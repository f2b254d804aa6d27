//! DPS over MQTT 3.1.1 on TLS (rumqttc). Owns the connection: CONNECT with the
//! registration id and the DPS username, SUBSCRIBE to the reply topic before any
//! publish (again after every reconnect: DPS keeps no session), PUBLISH a request
//! and wait for the reply carrying its `$rid`. With symmetric-key attestation
//! the SAS token of the request that opens a connection is its password (TLS
//! then only authenticates the server).

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};

use super::sas::SasToken;
use super::wire;
use super::{classify_tls, find_rustls_error, DpsError, Method, Op, RawReply, Request};
use crate::config::DpsConfig;

/// Largest reply accepted. DPS messages are at most 96 KB.
const MAX_INCOMING: usize = 128 * 1024;
/// How long one request may wait for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) struct MqttTransport {
    options: MqttOptions,
    endpoint: String,
    username: String,
    conn: Option<(AsyncClient, EventLoop)>,
    next_rid: u64,
    method: Method,
}

/// `{idScope}/registrations/{registrationId}/api-version={v}&ClientVersion=…`.
pub(super) fn username(cfg: &DpsConfig) -> String {
    format!(
        "{}/registrations/{}/api-version={}&ClientVersion={}",
        cfg.id_scope,
        cfg.registration_id,
        cfg.api_version,
        wire::url_encode(&format!("dps-agent/{}", env!("CARGO_PKG_VERSION")))
    )
}

impl MqttTransport {
    pub(super) fn new(cfg: &DpsConfig, tls: Arc<rustls::ClientConfig>, method: Method) -> Self {
        let mut o = MqttOptions::new(
            cfg.registration_id.clone(),
            cfg.endpoint.host.clone(),
            cfg.endpoint.port,
        );
        let username = username(cfg);
        o.set_credentials(username.clone(), "");
        o.set_keep_alive(Duration::from_secs(60));
        o.set_clean_session(true);
        o.set_max_packet_size(MAX_INCOMING, 64 * 1024);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        MqttTransport {
            options: o,
            endpoint: cfg.endpoint.to_string(),
            username,
            conn: None,
            next_rid: 1,
            method,
        }
    }

    /// Sends one request and waits for its reply, connecting first if needed.
    pub(super) async fn request(&mut self, request: Request<'_>) -> Result<RawReply, DpsError> {
        if self.conn.is_none() {
            self.connect(request.auth).await?;
        }
        let rid = self.next_rid;
        self.next_rid += 1;
        let (topic, body) = match request.op {
            Op::Register { body } => (wire::register_topic(rid), body.to_vec()),
            Op::Poll { operation_id } => (wire::poll_topic(rid, operation_id), Vec::new()),
        };
        let result = tokio::time::timeout(REPLY_TIMEOUT, self.exchange(&topic, body, rid)).await;
        let reply = match result {
            Ok(r) => r,
            Err(_) => Err(DpsError::ConnectionLost {
                reason: format!("no reply within {}s", REPLY_TIMEOUT.as_secs()),
            }),
        };
        if reply.is_err() {
            // Whatever happened, start the next request on a fresh connection.
            self.conn = None;
        }
        reply
    }

    async fn exchange(
        &mut self,
        topic: &str,
        body: Vec<u8>,
        rid: u64,
    ) -> Result<RawReply, DpsError> {
        let (endpoint, method) = (self.endpoint.clone(), self.method);
        let (client, eventloop) = self.conn.as_mut().ok_or_else(|| DpsError::ConnectionLost {
            reason: "not connected".into(),
        })?;
        client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .map_err(|e| DpsError::ConnectionLost {
                reason: e.to_string(),
            })?;
        let want_rid = rid.to_string();
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Some(t) = wire::parse_response_topic(&p.topic) else {
                        log::debug!("DPS: ignoring a message on {}", wire::clip(&p.topic, 100));
                        continue;
                    };
                    if t.rid.as_deref() != Some(want_rid.as_str()) {
                        log::debug!("DPS: ignoring a reply for another request ({:?})", t.rid);
                        continue;
                    }
                    return Ok(RawReply {
                        status: t.status,
                        retry_after: t.retry_after,
                        body: p.payload.to_vec(),
                        error_code: None,
                    });
                }
                Ok(_) => continue,
                Err(e) => return Err(classify(e, &endpoint, method)),
            }
        }
    }

    async fn connect(&mut self, auth: Option<&SasToken>) -> Result<(), DpsError> {
        let (endpoint, method) = (self.endpoint.clone(), self.method);
        let mut options = self.options.clone();
        if let Some(token) = auth {
            options.set_credentials(self.username.clone(), token.expose());
        }
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        eventloop.network_options.set_connection_timeout(15);
        // Without it the PUBACK of a reply and the next request wait for the peer's delayed
        // ACK (Nagle): 40 ms per poll on Linux.
        eventloop.network_options.set_tcp_nodelay(true);
        let handshake = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                    Ok(_) => continue,
                    Err(e) => return Err(classify(e, &endpoint, method)),
                }
            }
            client
                .subscribe(wire::RESPONSE_FILTER, QoS::AtLeastOnce)
                .await
                .map_err(|e| DpsError::ConnectionLost {
                    reason: e.to_string(),
                })?;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if ack
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, SubscribeReasonCode::Failure))
                        {
                            return Err(DpsError::Malformed {
                                reason: format!(
                                    "DPS refused the subscription to {}",
                                    wire::RESPONSE_FILTER
                                ),
                            });
                        }
                        return Ok(());
                    }
                    Ok(_) => continue,
                    Err(e) => return Err(classify(e, &endpoint, method)),
                }
            }
        };
        match tokio::time::timeout(REPLY_TIMEOUT, handshake).await {
            Ok(Ok(())) => {
                log::debug!("DPS: connected to {endpoint} and subscribed");
                self.conn = Some((client, eventloop));
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DpsError::Unreachable {
                endpoint,
                reason: format!("no CONNACK/SUBACK within {}s", REPLY_TIMEOUT.as_secs()),
            }),
        }
    }

    /// Disconnects politely (best effort).
    pub(super) async fn close(&mut self) {
        if let Some((client, mut eventloop)) = self.conn.take() {
            if client.disconnect().await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    while eventloop.poll().await.is_ok() {}
                })
                .await;
            }
        }
    }
}

/// Turns a rumqttc error into a DPS error that says what to do.
fn classify(e: ConnectionError, endpoint: &str, method: Method) -> DpsError {
    if let ConnectionError::ConnectionRefused(code) = &e {
        let endpoint = endpoint.to_string();
        return match code {
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword => {
                DpsError::AuthRefused {
                    endpoint,
                    detail: format!("MQTT CONNACK {code:?}"),
                    method,
                }
            }
            other => DpsError::Service(wire::ServiceError {
                status: 503,
                message: Some(format!("MQTT CONNACK {other:?}")),
                ..Default::default()
            }),
        };
    }
    if let Some(tls) = find_rustls_error(&e) {
        return classify_tls(tls, endpoint, method);
    }
    let endpoint = endpoint.to_string();
    match &e {
        ConnectionError::Io(io) | ConnectionError::Tls(rumqttc::TlsError::Io(io)) => {
            use std::io::ErrorKind as K;
            match io.kind() {
                K::ConnectionRefused
                | K::NotFound
                | K::AddrNotAvailable
                | K::TimedOut
                | K::HostUnreachable
                | K::NetworkUnreachable => DpsError::Unreachable {
                    endpoint,
                    reason: io.to_string(),
                },
                // getaddrinfo's failures come as plain errors.
                _ if io.to_string().contains("lookup address") => DpsError::Unreachable {
                    endpoint,
                    reason: io.to_string(),
                },
                _ => DpsError::ConnectionLost {
                    reason: io.to_string(),
                },
            }
        }
        ConnectionError::NetworkTimeout => DpsError::Unreachable {
            endpoint,
            reason: "connection timed out".into(),
        },
        ConnectionError::MqttState(s) if s.to_string().to_lowercase().contains("size") => {
            DpsError::Malformed {
                reason: format!("a reply is larger than {} KiB ({s})", MAX_INCOMING / 1024),
            }
        }
        other => DpsError::ConnectionLost {
            reason: other.to_string(),
        },
    }
}
