//! DPS over MQTT 3.1.1 on TLS (rumqttc). Owns the connection: CONNECT with the
//! registration id and the DPS username, SUBSCRIBE to the reply topic before any
//! publish (again after every reconnect: DPS keeps no session), PUBLISH a request
//! and wait for the reply carrying its `$rid`.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};

use super::wire;
use super::{DpsError, RawReply, Request};
use crate::config::DpsConfig;

/// Largest reply accepted. DPS messages are at most 96 KB.
const MAX_INCOMING: usize = 128 * 1024;
/// How long one request may wait for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) struct MqttTransport {
    options: MqttOptions,
    endpoint: String,
    conn: Option<(AsyncClient, EventLoop)>,
    next_rid: u64,
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
    pub(super) fn new(cfg: &DpsConfig, tls: Arc<rustls::ClientConfig>) -> Self {
        let mut o = MqttOptions::new(
            cfg.registration_id.clone(),
            cfg.endpoint.host.clone(),
            cfg.endpoint.port,
        );
        o.set_credentials(username(cfg), "");
        o.set_keep_alive(Duration::from_secs(60));
        o.set_clean_session(true);
        o.set_max_packet_size(MAX_INCOMING, 64 * 1024);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        MqttTransport {
            options: o,
            endpoint: cfg.endpoint.to_string(),
            conn: None,
            next_rid: 1,
        }
    }

    /// Sends one request and waits for its reply, connecting first if needed.
    pub(super) async fn request(&mut self, request: Request<'_>) -> Result<RawReply, DpsError> {
        if self.conn.is_none() {
            self.connect().await?;
        }
        let rid = self.next_rid;
        self.next_rid += 1;
        let (topic, body) = match request {
            Request::Register { body } => (wire::register_topic(rid), body.to_vec()),
            Request::Poll { operation_id } => (wire::poll_topic(rid, operation_id), Vec::new()),
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
        let endpoint = self.endpoint.clone();
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
                    });
                }
                Ok(_) => continue,
                Err(e) => return Err(classify(e, &endpoint)),
            }
        }
    }

    async fn connect(&mut self) -> Result<(), DpsError> {
        let endpoint = self.endpoint.clone();
        let (client, mut eventloop) = AsyncClient::new(self.options.clone(), 16);
        eventloop.network_options.set_connection_timeout(15);
        let handshake = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                    Ok(_) => continue,
                    Err(e) => return Err(classify(e, &endpoint)),
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
                    Err(e) => return Err(classify(e, &endpoint)),
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
fn classify(e: ConnectionError, endpoint: &str) -> DpsError {
    let endpoint = endpoint.to_string();
    if let ConnectionError::ConnectionRefused(code) = &e {
        return match code {
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword => {
                DpsError::AuthRefused {
                    endpoint,
                    detail: format!("MQTT CONNACK {code:?}"),
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
        use rustls::AlertDescription as A;
        return match tls {
            rustls::Error::InvalidCertificate(c) => DpsError::ServerNotTrusted {
                endpoint,
                reason: format!("its certificate is invalid ({c:?})"),
            },
            rustls::Error::AlertReceived(
                a @ (A::BadCertificate
                | A::UnknownCA
                | A::CertificateRequired
                | A::CertificateUnknown
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::UnsupportedCertificate
                | A::AccessDenied),
            ) => DpsError::AuthRefused {
                endpoint,
                detail: format!("TLS alert {a:?}"),
            },
            other => DpsError::Unreachable {
                endpoint,
                reason: format!("TLS handshake failed: {other}"),
            },
        };
    }
    match &e {
        ConnectionError::Io(io) | ConnectionError::Tls(rumqttc::TlsError::Io(io)) => {
            use std::io::ErrorKind as K;
            match io.kind() {
                K::ConnectionRefused | K::NotFound | K::AddrNotAvailable | K::TimedOut => {
                    DpsError::Unreachable {
                        endpoint,
                        reason: io.to_string(),
                    }
                }
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

/// Finds a rustls error anywhere in an error's chain (tokio-rustls wraps it in
/// an `io::Error`).
fn find_rustls_error(e: &ConnectionError) -> Option<rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r.clone());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                    return Some(r.clone());
                }
            }
        }
        cur = err.source();
    }
    None
}
