//! One device connection speaking DPS over HTTPS (protocol.md §2): HTTP/1.1 (hyper) with
//! keep-alive on the TLS stream the accept path made. Routes `PUT
//! /{idScope}/registrations/{regId}/register` and `GET …/operations/{operationId}` (both with
//! `?api-version=`), authenticates every request — a SAS token in `Authorization`
//! (symmetric key, or the key of a TPM challenge), else the client certificate of the
//! handshake (X.509), else the TPM challenge for a registration that carries `tpm` keys — and
//! hands the request to `dps.rs`, the same service logic MQTT uses. Answers carry
//! `Retry-After` and `x-ms-error-code` headers and the same JSON bodies.

use std::error::Error as _;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::auth::{Challenge, Proof};
use crate::dps::{self, Outcome, RequestContext};
use crate::events::Service;
use crate::faults;
use crate::mqtt::{issued_fields, MAX_INCOMING};
use crate::server::{Peer, Simulator};
use crate::tls;
use crate::topics::{parse_query, url_decode};

/// errorCode of an authentication failure (as DPS: "401002").
pub const ERR_UNAUTHORIZED: u32 = 401_002;
/// errorCode for a path that is not a DPS device API route.
pub const ERR_NOT_FOUND: u32 = 404_000;
/// errorCode for an id scope that is not this DPS.
pub const ERR_SCOPE_NOT_FOUND: u32 = 404_002;
/// errorCode for a wrong HTTP method on a known route.
pub const ERR_METHOD: u32 = 405_000;
/// errorCode for a body larger than 96 KiB.
pub const ERR_TOO_LARGE: u32 = 413_000;

/// Serves one HTTPS connection until the client closes it (or the server stops) and records
/// `connect` and `disconnect` events.
pub async fn serve_connection<S>(
    stream: S,
    peer: Peer,
    sim: Arc<Simulator>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cert_cn = peer.chain.first().and_then(|c| tls::common_name(c));
    sim.events.emit(
        Service::Dps,
        peer.conn,
        "connect",
        json!({
            "transport": "https",
            "cert_cn": cert_cn,
            "result": "accepted",
            "fault": peer.tls_fault.map(|f| f.name()),
        }),
    );
    let conn_no = peer.conn;
    let (handler_sim, handler_peer) = (sim.clone(), Arc::new(peer));
    let service = hyper::service::service_fn(move |req| {
        let (sim, peer) = (handler_sim.clone(), handler_peer.clone());
        async move { handle(req, &sim, &peer).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .max_buf_size(MAX_INCOMING + 16 * 1024)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let reason = tokio::select! {
        r = conn.as_mut() => match r {
            Ok(()) => "connection closed by the client".to_string(),
            Err(e) if e.source().is_some_and(|s| s.is::<Dropped>()) => {
                "connection dropped without an answer (drop-after-register fault)".to_string()
            }
            Err(e) => format!("HTTP error: {e}"),
        },
        () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn.as_mut()).await;
            "server shutdown".to_string()
        }
    };
    sim.events.emit(
        Service::Dps,
        conn_no,
        "disconnect",
        json!({ "reason": reason }),
    );
}

/// Makes hyper close the connection without an answer (`drop-after-register`).
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dropped by fault")
    }
}

impl std::error::Error for Dropped {}

/// A parsed route.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Register {
        registration_id: String,
    },
    Poll {
        registration_id: String,
        operation_id: String,
    },
}

impl Route {
    fn registration_id(&self) -> &str {
        match self {
            Route::Register { registration_id }
            | Route::Poll {
                registration_id, ..
            } => registration_id,
        }
    }
}

/// `/{idScope}/registrations/{regId}/register` or `…/operations/{opId}`; percent-decoded.
fn parse_path(path: &str) -> Result<(String, Route), String> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let decode = |s: &str| url_decode(s).map_err(|_| format!("bad percent-encoding in {path:?}"));
    match segments.as_slice() {
        [scope, "registrations", reg, "register"] if !reg.is_empty() => Ok((
            decode(scope)?,
            Route::Register {
                registration_id: decode(reg)?,
            },
        )),
        [scope, "registrations", reg, "operations", op] if !reg.is_empty() && !op.is_empty() => {
            Ok((
                decode(scope)?,
                Route::Poll {
                    registration_id: decode(reg)?,
                    operation_id: decode(op)?,
                },
            ))
        }
        _ => Err(format!("{path:?} is not a DPS device API path")),
    }
}

/// What one request produced, for the response and its event.
struct Answer {
    outcome: Outcome,
    /// Set instead of an error body for the TPM challenge.
    challenge: bool,
    /// Why authentication failed, for the event.
    auth_error: Option<String>,
}

impl Answer {
    fn of(outcome: Outcome) -> Self {
        Answer {
            outcome,
            challenge: false,
            auth_error: None,
        }
    }
}

/// How a request authenticated, for events and `registrationState`.
struct Authenticated {
    auth: &'static str,
    enrollment: Option<String>,
    extra: Option<Map<String, Value>>,
}

async fn handle(
    req: Request<Incoming>,
    sim: &Simulator,
    peer: &Peer,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let authorization = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match Limited::new(req.into_body(), MAX_INCOMING).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(respond(&Answer::of(error(
                413,
                ERR_TOO_LARGE,
                format!(
                    "the request body is larger than {} KiB",
                    MAX_INCOMING / 1024
                ),
            ))))
        }
    };
    let route = parse_path(&path);
    let (kind, operation_id, registration_id) = match &route {
        Ok((_, Route::Register { registration_id })) => {
            ("register", None, Some(registration_id.clone()))
        }
        Ok((
            _,
            Route::Poll {
                registration_id,
                operation_id,
            },
        )) => (
            "poll",
            Some(operation_id.clone()),
            Some(registration_id.clone()),
        ),
        Err(_) => ("unknown", None, None),
    };
    let faults_now = sim.faults.current().await;
    let mut event_auth: (Option<&str>, Option<String>) = (None, None);
    let answer = 'answer: {
        let (scope, route) = match route {
            Ok(r) => r,
            Err(why) => break 'answer Answer::of(error(404, ERR_NOT_FOUND, why)),
        };
        let want = match route {
            Route::Register { .. } => http::Method::PUT,
            Route::Poll { .. } => http::Method::GET,
        };
        if method != want {
            break 'answer Answer::of(error(
                405,
                ERR_METHOD,
                format!("{kind} is {want} {path}, not {method}"),
            ));
        }
        if scope != sim.id_scope {
            break 'answer Answer::of(error(
                404,
                ERR_SCOPE_NOT_FOUND,
                format!("id scope {scope:?} is not this DPS ({:?})", sim.id_scope),
            ));
        }
        let api_version = match parse_query(&query) {
            Ok(pairs) => pairs
                .into_iter()
                .find(|(k, _)| k == "api-version")
                .map(|(_, v)| v)
                .filter(|v| !v.is_empty()),
            Err(_) => None,
        };
        let Some(api_version) = api_version else {
            break 'answer Answer::of(error(
                400,
                dps::ERR_BAD_REQUEST,
                "the api-version query parameter is missing",
            ));
        };
        let reg = route.registration_id().to_string();
        let who = match authenticate(sim, peer, &route, authorization.as_deref(), &body) {
            Ok(who) => who,
            Err(answer) => break 'answer *answer,
        };
        event_auth = (Some(who.auth), who.enrollment.clone());
        let ctx = RequestContext {
            registration_id: &reg,
            api_version: &api_version,
            extra: who.extra.as_ref(),
        };
        Answer::of(match &route {
            Route::Register { .. } => sim.dps.register(ctx, &body, &faults_now),
            Route::Poll { operation_id, .. } => sim.dps.poll(ctx, Some(operation_id), &faults_now),
        })
    };
    sim.events.emit(
        Service::Dps,
        peer.conn,
        "request",
        json!({
            "transport": "https",
            "kind": kind,
            "rid": null,
            "operation_id": operation_id,
            "registration_id": registration_id,
            "body": if body.is_empty() { Value::Null } else { dps::body_for_event(&body) },
            "method": method.as_str(),
            "path": path,
            "auth": event_auth.0,
            "enrollment": event_auth.1,
        }),
    );
    let outcome = &answer.outcome;
    let response_event = |delivered: bool| {
        json!({
            "transport": "https",
            "rid": null,
            "status": (!outcome.drop_connection).then_some(outcome.status),
            "retry_after": outcome.retry_after,
            "operation_id": outcome.operation_id,
            "registration_status": outcome.registration_status,
            "error_code": outcome.error_code,
            "fault": faults::event_field(&outcome.faults),
            "delivered": delivered,
            "tpm_challenge": answer.challenge,
            "auth_error": answer.auth_error,
            "body": (!outcome.drop_connection).then(|| dps::body_for_event(&outcome.body)),
        })
    };
    if outcome.drop_connection {
        sim.events
            .emit(Service::Dps, peer.conn, "response", response_event(false));
        return Err(Dropped);
    }
    if let Some(issued) = &outcome.issued {
        sim.events.emit(
            Service::Dps,
            peer.conn,
            "issued",
            issued_fields(
                registration_id.as_deref().unwrap_or(""),
                issued,
                &outcome.faults,
            ),
        );
    }
    sim.events
        .emit(Service::Dps, peer.conn, "response", response_event(true));
    Ok(respond(&answer))
}

/// Who is asking, by the first credential present: `Authorization` (a SAS token), the client
/// certificate, or — for a registration with `tpm` keys and neither — the TPM challenge.
/// `Err` is the 401 to send.
fn authenticate(
    sim: &Simulator,
    peer: &Peer,
    route: &Route,
    authorization: Option<&str>,
    body: &[u8],
) -> Result<Authenticated, Box<Answer>> {
    let reg = route.registration_id();
    let refuse = |reason: String| {
        Box::new(Answer {
            outcome: error(401, ERR_UNAUTHORIZED, reason.clone()),
            challenge: false,
            auth_error: Some(reason),
        })
    };
    if let Some(token) = authorization {
        return match sim.enrollments.verify_sas(token, reg) {
            Ok(proof) => {
                let mut extra = Map::new();
                match &proof {
                    Proof::GroupKey(name) => {
                        extra.insert("symmetricKey".into(), json!({ "enrollmentGroupId": name }));
                    }
                    Proof::Tpm if matches!(route, Route::Register { .. }) => {
                        if let Some(blob) = sim.enrollments.tpm_hub_key_blob(reg) {
                            extra.insert(
                                "tpm".into(),
                                json!({ "authenticationKey": STANDARD.encode(blob) }),
                            );
                        }
                    }
                    _ => {}
                }
                Ok(Authenticated {
                    auth: "sas",
                    enrollment: Some(proof.enrollment()),
                    extra: (!extra.is_empty()).then_some(extra),
                })
            }
            Err(reason) => Err(refuse(format!("SAS token refused: {reason}"))),
        };
    }
    if !peer.chain.is_empty() {
        sim.validator.validate(&peer.chain).map_err(refuse)?;
        return match peer.chain.first().and_then(|c| tls::common_name(c)) {
            Some(cn) if cn == reg => Ok(Authenticated {
                auth: "x509",
                enrollment: None,
                extra: None,
            }),
            Some(cn) => Err(refuse(format!(
                "client certificate CN {cn:?} does not match registration id {reg:?}"
            ))),
            None => Err(refuse("client certificate has no single subject CN".into())),
        };
    }
    if let (Route::Register { .. }, Some((ek, srk))) = (route, tpm_keys(body)) {
        return Err(match sim.enrollments.tpm_challenge(reg, &ek, &srk) {
            Challenge::Blob(blob) => {
                let body = json!({ "authenticationKey": STANDARD.encode(blob) });
                let mut outcome = error(401, ERR_UNAUTHORIZED, "");
                outcome.body = body.to_string().into_bytes();
                outcome.error_code = None;
                Box::new(Answer {
                    outcome,
                    challenge: true,
                    auth_error: None,
                })
            }
            Challenge::Refused(reason) => refuse(format!("TPM attestation refused: {reason}")),
        });
    }
    Err(refuse(
        "no credential: present a client certificate, an Authorization: SharedAccessSignature header, or a registration with tpm keys".into(),
    ))
}

/// `tpm.endorsementKey` and `tpm.storageRootKey` of a register body.
fn tpm_keys(body: &[u8]) -> Option<(String, String)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let tpm = v.get("tpm")?;
    let s = |k: &str| tpm.get(k).and_then(Value::as_str).map(str::to_string);
    Some((
        s("endorsementKey")?,
        s("storageRootKey").unwrap_or_default(),
    ))
}

fn error(status: u16, code: u32, message: impl Into<String>) -> Outcome {
    dps::error_outcome(status, code, message.into(), None)
}

/// The HTTP response of an answer.
fn respond(answer: &Answer) -> Response<Full<Bytes>> {
    let o = &answer.outcome;
    let mut r = Response::builder()
        .status(StatusCode::from_u16(o.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(
            http::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        );
    if let Some(secs) = o.retry_after {
        r = r.header(http::header::RETRY_AFTER, secs.to_string());
    }
    if let Some(code) = o.error_code {
        r = r.header("x-ms-error-code", code.to_string());
    }
    r.body(Full::new(Bytes::from(o.body.clone())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            parse_path("/0ne00000000/registrations/gw-0001/register"),
            Ok((
                "0ne00000000".into(),
                Route::Register {
                    registration_id: "gw-0001".into()
                }
            ))
        );
        assert_eq!(
            parse_path("/s/registrations/gw%3A1/operations/4.a.b%2Fc"),
            Ok((
                "s".into(),
                Route::Poll {
                    registration_id: "gw:1".into(),
                    operation_id: "4.a.b/c".into()
                }
            ))
        );
        for bad in [
            "/",
            "/s/registrations//register",
            "/s/registrations/r",
            "/s/registrations/r/operations/",
            "/s/devices/r/register",
            "/s/registrations/r/register/x",
        ] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tpm_keys_of_a_body() {
        assert_eq!(
            tpm_keys(br#"{"tpm":{"endorsementKey":"RUs=","storageRootKey":"U1JL"}}"#),
            Some(("RUs=".into(), "U1JL".into()))
        );
        assert_eq!(tpm_keys(br#"{"registrationId":"x"}"#), None);
        assert_eq!(tpm_keys(b"junk"), None);
    }

    #[test]
    fn responses_carry_the_headers() {
        let mut o = error(429, 429_001, "slow down");
        o.retry_after = Some(7);
        let r = respond(&Answer::of(o));
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "7");
        assert_eq!(r.headers()["x-ms-error-code"], "429001");
        assert_eq!(
            r.headers()["content-type"],
            "application/json; charset=utf-8"
        );
    }
}
