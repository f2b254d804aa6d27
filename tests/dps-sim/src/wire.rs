//! MQTT 3.1.1 framing shared by the DPS and IoT Hub connections: whole frames read from a byte
//! stream under a size limit, packets decoded and encoded with rumqttc's `mqttbytes::v4`, and
//! the first-packet CONNECT rules. Knows nothing about topics, services or events.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet};
use rumqttc::mqttbytes::{check, Error as MqttError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest packet the simulator sends (the MQTT maximum).
pub const MAX_OUTGOING: usize = 268_435_455;
/// Time allowed between the TLS handshake and a complete CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no usable CONNECT arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// Not MQTT 3.1.1: answer CONNACK 1, then close.
    Protocol { name: String, level: u8 },
    /// Anything else: close with this reason, no CONNACK.
    Closed(String),
}

/// One MQTT connection's byte stream with its read and write buffers.
pub struct Wire<S> {
    pub stream: S,
    buf: BytesMut,
    out: BytesMut,
    max_incoming: usize,
    next_pkid: u16,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    /// `max_incoming`: a larger packet from the client closes the connection.
    pub fn new(stream: S, max_incoming: usize) -> Self {
        Wire {
            stream,
            buf: BytesMut::with_capacity(4096),
            out: BytesMut::with_capacity(4096),
            max_incoming,
            next_pkid: 0,
        }
    }

    /// Reads the first packet, which must be an MQTT 3.1.1 CONNECT, within [`CONNECT_TIMEOUT`].
    /// The protocol level is read before decoding, so any level other than 4 is reported as
    /// [`ConnectError::Protocol`] (the v4 decoder refuses unknown levels outright).
    pub async fn read_connect(&mut self) -> Result<Connect, ConnectError> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.fill_frame())
            .await
            .map_err(|_| ConnectError::Closed("no CONNECT within 10 s".into()))?
            .map_err(ConnectError::Closed)?;
        if self.buf.first().map(|b| b >> 4) != Some(1) {
            return Err(ConnectError::Closed(
                "the first packet was not CONNECT".into(),
            ));
        }
        if let Some((name, level)) = connect_protocol(&self.buf) {
            if name != "MQTT" || level != 4 {
                return Err(ConnectError::Protocol { name, level });
            }
        }
        match Packet::read(&mut self.buf, self.max_incoming) {
            Ok(Packet::Connect(c)) => Ok(c),
            Ok(_) => Err(ConnectError::Closed(
                "the first packet was not CONNECT".into(),
            )),
            Err(e) => Err(ConnectError::Closed(format!("malformed CONNECT: {e}"))),
        }
    }

    /// The next packet, waiting at most `idle` for it.
    pub async fn next_packet(&mut self, idle: Option<Duration>) -> Result<Packet, String> {
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
        Packet::read(&mut self.buf, self.max_incoming).map_err(|e| format!("malformed packet: {e}"))
    }

    /// Reads until the buffer holds one complete frame.
    async fn fill_frame(&mut self) -> Result<(), String> {
        loop {
            match check(self.buf.iter(), self.max_incoming) {
                Ok(_) => return Ok(()),
                Err(MqttError::InsufficientBytes(_)) => {}
                Err(MqttError::PayloadSizeLimitExceeded(n)) => {
                    return Err(format!(
                        "packet of {n} bytes exceeds the {}-byte limit",
                        self.max_incoming
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

    /// Encodes and writes one packet, flushed.
    pub async fn send(&mut self, packet: Packet) -> Result<(), String> {
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

    /// The next packet id for a QoS 1 publish (1..=65535, wrapping).
    pub fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }
}

/// 1.5 × the client's keep-alive (MQTT 3.1.1 §3.1.2.10); `None` when it asked for none.
pub fn keep_alive_limit(keep_alive_secs: u16) -> Option<Duration> {
    (keep_alive_secs > 0).then(|| Duration::from_millis(u64::from(keep_alive_secs) * 1500))
}

/// Protocol name and level of a complete CONNECT frame.
pub fn connect_protocol(frame: &[u8]) -> Option<(String, u8)> {
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

/// The packet type's name, for refusal reasons.
pub fn packet_name(p: &Packet) -> &'static str {
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

/// An in-memory MQTT client for the connection tests of `mqtt.rs` and `hub_mqtt.rs`.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use rumqttc::mqttbytes::v4::ConnAck;
    use tokio::io::DuplexStream;
    use tokio::sync::watch;

    pub struct Client {
        pub io: DuplexStream,
        buf: BytesMut,
        server: tokio::task::JoinHandle<()>,
        _stop: watch::Sender<bool>,
    }

    impl Client {
        /// Starts `serve` on the server end of a duplex pipe; it gets a shutdown receiver.
        pub fn start<F, Fut>(serve: F) -> Client
        where
            F: FnOnce(DuplexStream, watch::Receiver<bool>) -> Fut,
            Fut: std::future::Future<Output = ()> + Send + 'static,
        {
            let (io, server_io) = tokio::io::duplex(1 << 20);
            let (stop, stop_rx) = watch::channel(false);
            let server = tokio::spawn(serve(server_io, stop_rx));
            Client {
                io,
                buf: BytesMut::new(),
                server,
                _stop: stop,
            }
        }

        pub async fn send(&mut self, p: Packet) {
            let mut out = BytesMut::new();
            p.write(&mut out, MAX_OUTGOING).unwrap();
            self.io.write_all(&out).await.unwrap();
        }

        /// The next packet, or `None` once the server closed the connection.
        pub async fn recv(&mut self) -> Option<Packet> {
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

        pub async fn connect(&mut self, client_id: &str, username: &str, clean: bool) -> ConnAck {
            let mut c = Connect::new(client_id);
            c.clean_session = clean;
            c.set_login(username, "");
            self.send(Packet::Connect(c)).await;
            match self.recv().await {
                Some(Packet::ConnAck(ack)) => ack,
                other => panic!("expected CONNACK, got {other:?}"),
            }
        }

        /// Expects the server to close the connection, and its task to end.
        pub async fn closed(mut self) {
            assert_eq!(self.recv().await, None);
            self.server.await.unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn keep_alive_limits() {
        assert_eq!(keep_alive_limit(0), None);
        assert_eq!(keep_alive_limit(30), Some(Duration::from_secs(45)));
    }

    #[tokio::test]
    async fn read_connect_outcomes() {
        // A CONNECT, a non-CONNECT first packet, an MQTT 5 CONNECT, a closed stream.
        let mut ok = BytesMut::new();
        Packet::Connect(Connect::new("gw-0001"))
            .write(&mut ok, 1024)
            .unwrap();
        let cases: Vec<(Vec<u8>, bool)> = vec![
            (ok.to_vec(), true),
            (vec![0xc0, 0x00], false),
            (
                vec![
                    0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 1, b'x',
                ],
                false,
            ),
            (Vec::new(), false),
        ];
        for (i, (bytes, good)) in cases.into_iter().enumerate() {
            let (mut client, server) = tokio::io::duplex(4096);
            client.write_all(&bytes).await.unwrap();
            drop(client);
            let mut wire = Wire::new(server, 1024);
            let result = wire.read_connect().await;
            assert_eq!(result.is_ok(), good, "case {i}: {result:?}");
            if i == 2 {
                assert_eq!(
                    result.unwrap_err(),
                    ConnectError::Protocol {
                        name: "MQTT".into(),
                        level: 5
                    }
                );
            }
        }
    }
}
