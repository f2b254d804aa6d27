//! DPS over HTTPS (protocol.md §2): `PUT /{idScope}/registrations/{regId}/register`
//! and `GET …/operations/{operationId}`, `?api-version=…`, JSON bodies, the
//! SAS token in `Authorization`, `Retry-After` and `x-ms-error-code` headers.
//! Owns one HTTP/1.1 connection (hyper) over our own TLS stream (tokio-rustls
//! with the same rustls config as MQTT, so an X.509 client certificate is in
//! the handshake and TLS failures are classified the same way). The
//! connection is kept alive between requests and reopened when it is gone.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::wire::{self, url_encode};
use super::{classify_tls, find_rustls_error, DpsError, Method, Op, RawReply, Request};
use crate::config::DpsConfig;

/// Largest reply body accepted. DPS messages are at most 96 KB.
const MAX_BODY: usize = 128 * 1024;
/// Time to open TCP and finish the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one request may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) struct HttpsTransport {
    host: String,
    port: u16,
    endpoint: String,
    /// `/{idScope}/registrations/{registrationId}`, each part percent-encoded.
    base_path: String,
    api_version: String,
    tls: TlsConnector,
    method: Method,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpsTransport {
    pub(super) fn new(cfg: &DpsConfig, tls: Arc<rustls::ClientConfig>, method: Method) -> Self {
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        HttpsTransport {
            host: cfg.endpoint.host.clone(),
            port: cfg.endpoint.port,
            endpoint: cfg.endpoint.to_string(),
            base_path: format!(
                "/{}/registrations/{}",
                url_encode(&cfg.id_scope),
                url_encode(&cfg.registration_id)
            ),
            api_version: cfg.api_version.clone(),
            tls: TlsConnector::from(Arc::new(tls)),
            method,
            sender: None,
        }
    }

    /// Sends one request and reads its reply, connecting first if needed.
    pub(super) async fn request(&mut self, request: Request<'_>) -> Result<RawReply, DpsError> {
        let reply = match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(request)).await {
            Ok(r) => r,
            Err(_) => Err(DpsError::ConnectionLost {
                reason: format!("no reply within {}s", REQUEST_TIMEOUT.as_secs()),
            }),
        };
        if reply.is_err() {
            // Start the next request on a fresh connection.
            self.sender = None;
        }
        reply
    }

    async fn exchange(&mut self, request: Request<'_>) -> Result<RawReply, DpsError> {
        let http_request = self.build(request)?;
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = Some(self.connect().await?);
        }
        let (endpoint, method) = (self.endpoint.clone(), self.method);
        let sender = self
            .sender
            .as_mut()
            .ok_or_else(|| DpsError::ConnectionLost {
                reason: "not connected".into(),
            })?;
        sender
            .ready()
            .await
            .map_err(|e| lost(&endpoint, method, "the connection closed", &e))?;
        let response = sender
            .send_request(http_request)
            .await
            .map_err(|e| lost(&endpoint, method, "the request failed", &e))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    DpsError::Malformed {
                        reason: format!("a reply is larger than {} KiB", MAX_BODY / 1024),
                    }
                } else {
                    DpsError::ConnectionLost {
                        reason: format!("reading the reply failed: {e}"),
                    }
                }
            })?
            .to_bytes();
        Ok(raw_reply(
            parts.status.as_u16(),
            &parts.headers,
            body.to_vec(),
        ))
    }

    /// The HTTP request for an operation.
    fn build(&self, request: Request<'_>) -> Result<http::Request<Full<Bytes>>, DpsError> {
        let query = format!("api-version={}", url_encode(&self.api_version));
        let (method, path, body) = match request.op {
            Op::Register { body } => (
                http::Method::PUT,
                format!("{}/register?{query}", self.base_path),
                Bytes::copy_from_slice(body),
            ),
            Op::Poll { operation_id } => (
                http::Method::GET,
                format!(
                    "{}/operations/{}?{query}",
                    self.base_path,
                    url_encode(operation_id)
                ),
                Bytes::new(),
            ),
        };
        let host = if self.port == 443 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut builder = http::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, host)
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("dps-agent/", env!("CARGO_PKG_VERSION")),
            );
        if method == http::Method::PUT {
            builder = builder.header(
                http::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            );
        }
        if let Some(token) = request.auth {
            let mut value =
                HeaderValue::from_str(token.expose()).map_err(|_| DpsError::Malformed {
                    reason: "the SAS token is not a valid header value".into(),
                })?;
            value.set_sensitive(true);
            builder = builder.header(http::header::AUTHORIZATION, value);
        }
        builder
            .body(Full::new(body))
            .map_err(|e| DpsError::Malformed {
                reason: format!("cannot build the HTTP request: {e}"),
            })
    }

    /// TCP, TLS, then the HTTP/1.1 handshake; the connection task runs until
    /// the sender is dropped or the server closes.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, DpsError> {
        let unreachable = |reason: String| DpsError::Unreachable {
            endpoint: self.endpoint.clone(),
            reason,
        };
        let server_name = ServerName::try_from(self.host.clone())
            .map_err(|_| unreachable(format!("{:?} is not a valid host name", self.host)))?;
        let handshake = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            self.tls
                .connect(server_name, tcp)
                .await
                .map_err(|e| match find_rustls_error(&e) {
                    Some(tls) => classify_tls(tls, &self.endpoint, self.method),
                    None => unreachable(format!("TLS handshake failed: {e}")),
                })
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| {
                unreachable(format!(
                    "no TLS connection within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })??;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_BODY + 16 * 1024)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| lost(&self.endpoint, self.method, "the HTTP handshake failed", &e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::debug!("DPS: HTTPS connection ended: {e}");
            }
        });
        log::debug!("DPS: connected to {} over HTTPS", self.endpoint);
        Ok(sender)
    }

    /// Drops the connection (HTTP has nothing to say goodbye with).
    pub(super) async fn close(&mut self) {
        self.sender = None;
    }
}

/// A broken exchange; a TLS alert in it (e.g. a client certificate refused
/// after a TLS 1.3 handshake) is reported as such.
fn lost(endpoint: &str, method: Method, what: &str, e: &hyper::Error) -> DpsError {
    match find_rustls_error(e) {
        Some(tls) => classify_tls(tls, endpoint, method),
        None => DpsError::ConnectionLost {
            reason: format!("{what}: {e}"),
        },
    }
}

/// A reply from its status, headers and body: `Retry-After` in seconds (the
/// HTTP-date form is ignored: the caller then uses its own delay) and
/// `x-ms-error-code`.
fn raw_reply(status: u16, headers: &HeaderMap, body: Vec<u8>) -> RawReply {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    RawReply {
        status,
        retry_after: text("retry-after").and_then(wire::retry_after_secs),
        error_code: text("x-ms-error-code").map(|v| wire::clip(v, 100)),
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Attestation, Endpoint, Transport};
    use crate::dps::sas::{SymmetricKey, TokenScope};
    use crate::dps::wire::Reply;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn status_and_headers() {
        let r = raw_reply(
            202,
            &headers(&[("retry-after", " 3 "), ("location", "/x")]),
            br#"{"operationId":"4.a.b","status":"assigning"}"#.to_vec(),
        );
        assert_eq!(
            (r.status, r.retry_after, r.error_code.as_deref()),
            (202, Some(3), None)
        );
        assert_eq!(
            r.interpret().unwrap(),
            Reply::Assigning {
                operation_id: "4.a.b".into(),
                retry_after: Some(3)
            }
        );
        // The HTTP-date form, negative and junk values are not seconds.
        for v in ["Wed, 21 Oct 2015 07:28:00 GMT", "-1", "soon", ""] {
            let r = raw_reply(429, &headers(&[("Retry-After", v)]), Vec::new());
            assert_eq!(r.retry_after, None, "{v}");
        }
        let r = raw_reply(
            429,
            &headers(&[("retry-after", "120"), ("x-ms-error-code", "429001")]),
            b"".to_vec(),
        );
        let Ok(Reply::Error(e)) = r.interpret() else {
            panic!()
        };
        assert_eq!(
            (e.status, e.retry_after, e.error_code),
            (429, Some(120), Some(429001))
        );
        let r = raw_reply(
            401,
            &headers(&[("x-ms-error-code", "401002")]),
            br#"{"errorCode":401002,"message":"signature mismatch","trackingId":"t"}"#.to_vec(),
        );
        let Ok(Reply::Error(e)) = r.interpret() else {
            panic!()
        };
        assert_eq!(
            e.to_string(),
            "status 401, error 401002: signature mismatch (tracking id t)"
        );
    }

    fn config(port: u16) -> DpsConfig {
        DpsConfig {
            endpoint: Endpoint {
                host: "dps.example.net".into(),
                port,
            },
            id_scope: "0ne00A1B2C3".into(),
            registration_id: "gw-0001".into(),
            transport: Transport::Https,
            api_version: "2025-07-01-preview".into(),
            trust_bundle: "/nonexistent".into(),
            payload: None,
            attempt_timeout: Duration::from_secs(60),
            attestation: Attestation::Tpm,
        }
    }

    fn transport(port: u16) -> HttpsTransport {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        HttpsTransport::new(&config(port), Arc::new(tls), Method::Tpm)
    }

    #[test]
    fn requests_have_the_documented_shape() {
        let t = transport(443);
        let key =
            SymmetricKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        let token = TokenScope::with_expiry("0ne00A1B2C3", "gw-0001", 1).sign_with(&key);
        let r = t
            .build(Request {
                op: Op::Register { body: b"{}" },
                auth: Some(&token),
            })
            .unwrap();
        assert_eq!(r.method(), http::Method::PUT);
        assert_eq!(
            r.uri().to_string(),
            "/0ne00A1B2C3/registrations/gw-0001/register?api-version=2025-07-01-preview"
        );
        let h = r.headers();
        assert_eq!(h["host"], "dps.example.net");
        assert_eq!(h["content-type"], "application/json; charset=utf-8");
        assert_eq!(h["authorization"].to_str().unwrap(), token.expose());
        assert!(h["authorization"].is_sensitive());

        let t = transport(8443);
        let r = t
            .build(Request {
                op: Op::Poll {
                    operation_id: "4.abc.d/e",
                },
                auth: None,
            })
            .unwrap();
        assert_eq!(r.method(), http::Method::GET);
        assert_eq!(
            r.uri().to_string(),
            "/0ne00A1B2C3/registrations/gw-0001/operations/4.abc.d%2Fe?api-version=2025-07-01-preview"
        );
        assert_eq!(r.headers()["host"], "dps.example.net:8443");
        assert!(r.headers().get("authorization").is_none());
        assert!(r.headers().get("content-type").is_none());
    }
}
