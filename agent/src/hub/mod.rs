//! The IoT Hub side: one short MQTT 3.1.1 session to the assigned hub, made
//! with an operational identity (leaf + issuing CA, key in its backend) to
//! prove the hub accepts it, and optionally to report the certificate's dates
//! in the device twin's reported properties. dps-agent does not carry the
//! device's telemetry: it connects, checks, reports, disconnects.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use serde_json::json;

pub mod credentials;

use crate::dps::wire::{clip, url_decode};
use crate::tls::{ClientIdentity, HandshakeFailure};

/// Twin replies come on this filter.
const TWIN_RESPONSES: &str = "$iothub/twin/res/#";
/// Largest message accepted from the hub.
const MAX_INCOMING: usize = 256 * 1024;
/// Bound on the whole session (connect, subscribe, patch).
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);

/// Where to connect and how.
#[derive(Debug, Clone)]
pub struct HubTarget {
    /// The assigned hub's host name.
    pub host: String,
    pub port: u16,
    pub device_id: String,
    /// IoT Hub api-version for the username.
    pub api_version: String,
}

impl HubTarget {
    /// `{hub}/{deviceId}/?api-version={v}&DeviceClientType=…`
    pub fn username(&self) -> String {
        format!(
            "{}/{}/?api-version={}&DeviceClientType={}",
            self.host,
            self.device_id,
            self.api_version,
            crate::dps::wire::url_encode(&format!("dps-agent/{}", env!("CARGO_PKG_VERSION")))
        )
    }
}

/// Certificate facts reported in the twin, RFC 3339 times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateReport {
    pub valid_from: String,
    pub valid_until: String,
    pub issued_at: String,
    pub thumbprint: String,
    pub renew_at: String,
}

impl CertificateReport {
    /// The reported-properties patch: `{"certificate": {…}}`.
    pub fn patch(&self) -> serde_json::Value {
        json!({
            "certificate": {
                "validFrom": self.valid_from,
                "validUntil": self.valid_until,
                "issuedAt": self.issued_at,
                "thumbprint": self.thumbprint,
                "renewAt": self.renew_at,
            }
        })
    }
}

/// Why the hub check failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("IoT Hub {endpoint} refused the certificate ({detail}): its issuing CA may not be synced to the hub yet (az iot adr ns credential sync), the device id may differ, or the clock may be off")]
    Refused { endpoint: String, detail: String },
    #[error("IoT Hub {endpoint} is not trusted: {reason}; check [dps] trust_bundle")]
    ServerNotTrusted { endpoint: String, reason: String },
    #[error("cannot reach IoT Hub {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("IoT Hub {endpoint}: {reason}")]
    Protocol { endpoint: String, reason: String },
    #[error("IoT Hub {endpoint} answered the twin update with status {status}")]
    TwinRejected { endpoint: String, status: u16 },
    #[error("IoT Hub {endpoint} answered the certificate request with status {status}{detail}")]
    CertificateRequest {
        endpoint: String,
        status: u16,
        /// `: errorCode …, message …, trackingId …` from the error body, or empty.
        detail: String,
    },
}

impl HubError {
    /// The hub said no to this identity (as opposed to not answering).
    pub fn is_refusal(&self) -> bool {
        matches!(self, HubError::Refused { .. })
    }
}

/// What a session achieved once the hub accepted the certificate.
#[derive(Debug)]
pub struct HubOutcome {
    /// The twin's reported-properties version after our patch, if reported.
    pub twin_version: Option<u64>,
    /// Why the twin report failed, if it did (the certificate was accepted).
    pub twin_error: Option<HubError>,
}

/// Connects with `identity` (CONNACK 0 proves the hub accepts it), reports
/// `report` in the twin if given (waiting for the 204), and disconnects.
pub async fn check(
    target: &HubTarget,
    tls: Arc<rustls::ClientConfig>,
    report: Option<&CertificateReport>,
) -> Result<HubOutcome, HubError> {
    let mut s = Session::open(target, tls);
    let endpoint = s.endpoint.clone();
    let result = within(&endpoint, SESSION_TIMEOUT, session(&mut s, report)).await;
    s.close().await;
    result
}

/// One MQTT connection to the hub as `target.device_id`, not yet connected:
/// the first poll of `eventloop` sends the CONNECT.
pub(crate) struct Session {
    pub(crate) client: AsyncClient,
    pub(crate) eventloop: EventLoop,
    /// `host:port`, for messages.
    pub(crate) endpoint: String,
}

impl Session {
    pub(crate) fn open(target: &HubTarget, tls: Arc<rustls::ClientConfig>) -> Session {
        let endpoint = format!("{}:{}", target.host, target.port);
        let mut o = MqttOptions::new(target.device_id.clone(), target.host.clone(), target.port);
        o.set_credentials(target.username(), "");
        o.set_keep_alive(Duration::from_secs(60));
        o.set_clean_session(true);
        o.set_max_packet_size(MAX_INCOMING, 64 * 1024);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (client, mut eventloop) = AsyncClient::new(o, 8);
        eventloop.network_options.set_connection_timeout(15);
        // Small request/response exchanges: no Nagle delay (see dps/mqtt.rs).
        eventloop.network_options.set_tcp_nodelay(true);
        Session {
            client,
            eventloop,
            endpoint,
        }
    }

    /// Reads packets until the CONNACK: the hub accepted the certificate.
    pub(crate) async fn connack(&mut self) -> Result<(), HubError> {
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(classify(e, &self.endpoint)),
            }
        }
    }

    /// Subscribes to `filter` and waits for the SUBACK (the hub drops answers
    /// to requests published before it).
    pub(crate) async fn subscribe(&mut self, filter: &str) -> Result<(), HubError> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .map_err(|e| self.protocol(e.to_string()))?;
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        return Err(
                            self.protocol(format!("the subscription to {filter} was refused"))
                        );
                    }
                    return Ok(());
                }
                Ok(_) => continue,
                Err(e) => return Err(classify(e, &self.endpoint)),
            }
        }
    }

    /// Publishes `body` to `topic` (QoS 1).
    pub(crate) async fn publish(&mut self, topic: String, body: Vec<u8>) -> Result<(), HubError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .map_err(|e| self.protocol(e.to_string()))
    }

    /// The next PUBLISH from the hub.
    pub(crate) async fn next_publish(&mut self) -> Result<rumqttc::Publish, HubError> {
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => return Ok(p),
                Ok(_) => continue,
                Err(e) => return Err(classify(e, &self.endpoint)),
            }
        }
    }

    pub(crate) fn protocol(&self, reason: String) -> HubError {
        HubError::Protocol {
            endpoint: self.endpoint.clone(),
            reason,
        }
    }

    /// DISCONNECT, then drains the connection for up to 500 ms.
    pub(crate) async fn close(mut self) {
        if self.client.disconnect().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while self.eventloop.poll().await.is_ok() {}
            })
            .await;
        }
    }
}

/// `work`, or Unreachable when it takes longer than `timeout`.
pub(crate) async fn within<T>(
    endpoint: &str,
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, HubError>>,
) -> Result<T, HubError> {
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(HubError::Unreachable {
            endpoint: endpoint.to_string(),
            reason: format!("no answer within {}s", timeout.as_secs()),
        }),
    }
}

async fn session(
    s: &mut Session,
    report: Option<&CertificateReport>,
) -> Result<HubOutcome, HubError> {
    // CONNECT → CONNACK: the proof.
    s.connack().await?;
    log::debug!("IoT Hub {} accepted the certificate", s.endpoint);
    let Some(report) = report else {
        return Ok(HubOutcome {
            twin_version: None,
            twin_error: None,
        });
    };
    Ok(match report_twin(s, report).await {
        Ok(version) => HubOutcome {
            twin_version: version,
            twin_error: None,
        },
        Err(e) => HubOutcome {
            twin_version: None,
            twin_error: Some(e),
        },
    })
}

/// Subscribes to twin replies, PATCHes the reported properties, waits for 204.
async fn report_twin(s: &mut Session, report: &CertificateReport) -> Result<Option<u64>, HubError> {
    s.subscribe(TWIN_RESPONSES).await?;
    let rid = format!("{:08x}", rand::random::<u32>());
    let topic = format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}");
    s.publish(topic, report.patch().to_string().into_bytes())
        .await?;
    loop {
        let p = s.next_publish().await?;
        let Some(reply) = parse_twin_response(&p.topic) else {
            continue;
        };
        if reply.rid.as_deref() != Some(rid.as_str()) {
            continue;
        }
        return match reply.status {
            200..=299 => Ok(reply.version),
            status => Err(HubError::TwinRejected {
                endpoint: s.endpoint.clone(),
                status,
            }),
        };
    }
}

/// A twin reply topic: `$iothub/twin/res/{status}/?$rid=…&$version=…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinResponse {
    pub status: u16,
    pub rid: Option<String>,
    pub version: Option<u64>,
}

/// Parses a twin reply topic; properties in any order. None for other topics.
pub fn parse_twin_response(topic: &str) -> Option<TwinResponse> {
    let rest = topic.strip_prefix("$iothub/twin/res/")?;
    let (status, query) = rest.split_once('/').unwrap_or((rest, ""));
    let status: u16 = status.parse().ok()?;
    let query = query.strip_prefix('?').unwrap_or(query);
    let mut out = TwinResponse {
        status,
        rid: None,
        version: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match url_decode(k).as_str() {
            "$rid" => out.rid = Some(url_decode(v)),
            "$version" => out.version = url_decode(v).parse().ok(),
            _ => {}
        }
    }
    Some(out)
}

fn classify(e: ConnectionError, endpoint: &str) -> HubError {
    let endpoint = endpoint.to_string();
    if let ConnectionError::ConnectionRefused(code) = &e {
        return match code {
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword => {
                HubError::Refused {
                    endpoint,
                    detail: format!("MQTT CONNACK {code:?}"),
                }
            }
            other => HubError::Protocol {
                endpoint,
                reason: format!("MQTT CONNACK {other:?}"),
            },
        };
    }
    if let Some(tls) = crate::tls::find_rustls_error(&e) {
        return match crate::tls::handshake_failure(&tls) {
            HandshakeFailure::ServerNotTrusted(reason) => {
                HubError::ServerNotTrusted { endpoint, reason }
            }
            HandshakeFailure::ClientRefused(detail) => HubError::Refused { endpoint, detail },
            HandshakeFailure::Other(reason) => HubError::Unreachable { endpoint, reason },
        };
    }
    HubError::Unreachable {
        endpoint,
        reason: clip(&e.to_string(), 200),
    }
}

/// The identity presented to the hub: the chain without the root, and the key.
pub fn identity(chain_presented: Vec<Vec<u8>>, key: Arc<dyn crate::keys::Key>) -> ClientIdentity {
    ClientIdentity {
        chain: chain_presented,
        key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twin_topics() {
        assert_eq!(
            parse_twin_response("$iothub/twin/res/204/?$rid=ab12&$version=7"),
            Some(TwinResponse {
                status: 204,
                rid: Some("ab12".into()),
                version: Some(7)
            })
        );
        assert_eq!(
            parse_twin_response("$iothub/twin/res/429/?$version=3&$rid=x")
                .unwrap()
                .status,
            429
        );
        assert!(parse_twin_response("$iothub/twin/PATCH/properties/desired/?$version=2").is_none());
        assert!(parse_twin_response("$iothub/twin/res/abc/?$rid=1").is_none());
    }

    #[test]
    fn username_and_patch() {
        let t = HubTarget {
            host: "hub.azure-devices.net".into(),
            port: 8883,
            device_id: "gw-0001".into(),
            api_version: "2021-04-12".into(),
        };
        assert!(t.username().starts_with(
            "hub.azure-devices.net/gw-0001/?api-version=2021-04-12&DeviceClientType=dps-agent%2F"
        ));
        let r = CertificateReport {
            valid_from: "a".into(),
            valid_until: "b".into(),
            issued_at: "c".into(),
            thumbprint: "D".into(),
            renew_at: "e".into(),
        };
        assert_eq!(
            r.patch(),
            json!({"certificate": {"validFrom": "a", "validUntil": "b", "issuedAt": "c", "thumbprint": "D", "renewAt": "e"}})
        );
    }
}
