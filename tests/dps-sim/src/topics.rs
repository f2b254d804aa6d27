//! DPS MQTT names: the CONNECT username, the request topics a device publishes to and the
//! response topics the simulator publishes. Pure string handling, no I/O.

use std::fmt::Write as _;

/// The only subscription DPS accepts.
pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";
const REGISTER_PREFIX: &str = "$dps/registrations/PUT/iotdps-register/?";
const POLL_PREFIX: &str = "$dps/registrations/GET/iotdps-get-operationstatus/?";

/// A parsed CONNECT username `{idScope}/registrations/{registrationId}/api-version={v}[&k=v...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username {
    pub id_scope: String,
    pub registration_id: String,
    pub api_version: String,
    /// The other `&k=v` pairs (URL-decoded), e.g. `ClientVersion`.
    pub extra: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    #[error("username is missing; expected {{idScope}}/registrations/{{registrationId}}/api-version={{v}}")]
    Missing,
    #[error("username {0:?} does not have the form {{idScope}}/registrations/{{registrationId}}/api-version={{v}}")]
    Shape(String),
    #[error("username {0:?} has an empty api-version")]
    EmptyApiVersion(String),
    #[error("username {0:?} is not URL-encoded correctly")]
    Encoding(String),
}

/// Parses a DPS username.
pub fn parse_username(username: Option<&str>) -> Result<Username, UsernameError> {
    let raw = username.ok_or(UsernameError::Missing)?;
    if raw.is_empty() {
        return Err(UsernameError::Missing);
    }
    let shape = || UsernameError::Shape(raw.to_string());
    let mut parts = raw.splitn(4, '/');
    let id_scope = parts.next().ok_or_else(shape)?;
    let literal = parts.next().ok_or_else(shape)?;
    let registration_id = parts.next().ok_or_else(shape)?;
    let query = parts.next().ok_or_else(shape)?;
    if id_scope.is_empty() || literal != "registrations" || registration_id.is_empty() {
        return Err(shape());
    }
    // `api-version=...` must come first (no `?`, unlike IoT Hub).
    if !query.starts_with("api-version=") {
        return Err(shape());
    }
    let pairs = parse_query(query).map_err(|_| UsernameError::Encoding(raw.to_string()))?;
    let mut api_version = None;
    let mut extra = Vec::new();
    for (k, v) in pairs {
        if k == "api-version" && api_version.is_none() {
            api_version = Some(v);
        } else {
            extra.push((k, v));
        }
    }
    let api_version = api_version.unwrap_or_default();
    if api_version.is_empty() {
        return Err(UsernameError::EmptyApiVersion(raw.to_string()));
    }
    Ok(Username {
        id_scope: id_scope.to_string(),
        registration_id: registration_id.to_string(),
        api_version,
        extra,
    })
}

/// A request a device published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestTopic {
    Register {
        rid: String,
    },
    Poll {
        rid: String,
        /// `None` when the topic has no `operationId` property.
        operation_id: Option<String>,
    },
}

impl RequestTopic {
    pub fn rid(&self) -> &str {
        match self {
            RequestTopic::Register { rid } | RequestTopic::Poll { rid, .. } => rid,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic {0:?} is not a DPS request topic")]
    Unknown(String),
    #[error("topic {0:?} has no $rid property")]
    MissingRid(String),
    #[error("topic {0:?} is not URL-encoded correctly")]
    Encoding(String),
}

/// Parses a publish topic. Properties may come in any order and are URL-decoded.
pub fn parse_request_topic(topic: &str) -> Result<RequestTopic, TopicError> {
    let (is_register, query) = if let Some(q) = topic.strip_prefix(REGISTER_PREFIX) {
        (true, q)
    } else if let Some(q) = topic.strip_prefix(POLL_PREFIX) {
        (false, q)
    } else {
        return Err(TopicError::Unknown(topic.to_string()));
    };
    let pairs = parse_query(query).map_err(|_| TopicError::Encoding(topic.to_string()))?;
    let find = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let rid = find("$rid").ok_or_else(|| TopicError::MissingRid(topic.to_string()))?;
    if is_register {
        Ok(RequestTopic::Register { rid })
    } else {
        Ok(RequestTopic::Poll {
            rid,
            operation_id: find("operationId").filter(|s| !s.is_empty()),
        })
    }
}

/// The response topic `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={secs}]`.
pub fn response_topic(status: u16, rid: &str, retry_after: Option<u64>) -> String {
    let mut topic = format!("$dps/registrations/res/{status}/?$rid={}", url_encode(rid));
    if let Some(secs) = retry_after {
        let _ = write!(topic, "&retry-after={secs}");
    }
    topic
}

/// Whether a SUBSCRIBE filter is the one DPS accepts.
pub fn is_response_filter(filter: &str) -> bool {
    filter == RESPONSE_FILTER
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError;

/// Splits `k=v&k2=v2` into URL-decoded pairs. Empty segments are skipped; a segment without
/// `=` is a key with an empty value.
pub fn parse_query(query: &str) -> Result<Vec<(String, String)>, DecodeError> {
    query
        .split('&')
        .filter(|seg| !seg.is_empty())
        .map(|seg| {
            let (k, v) = seg.split_once('=').unwrap_or((seg, ""));
            Ok((url_decode(k)?, url_decode(v)?))
        })
        .collect()
}

/// Percent-decoding (`+` is a space, as in form encoding). Fails on a bad escape or if the
/// result is not UTF-8.
pub fn url_decode(s: &str) -> Result<String, DecodeError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(DecodeError)?;
                let hi = hex_value(hex[0]).ok_or(DecodeError)?;
                let lo = hex_value(hex[1]).ok_or(DecodeError)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| DecodeError)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-encodes everything except RFC 3986 unreserved characters.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_topic() {
        assert_eq!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid=1"),
            Ok(RequestTopic::Register { rid: "1".into() })
        );
    }

    #[test]
    fn poll_topic_properties_in_any_order() {
        let want = RequestTopic::Poll {
            rid: "7".into(),
            operation_id: Some("4.abc.def-1".into()),
        };
        assert_eq!(
            parse_request_topic(
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=7&operationId=4.abc.def-1"
            ),
            Ok(want.clone())
        );
        assert_eq!(
            parse_request_topic(
                "$dps/registrations/GET/iotdps-get-operationstatus/?operationId=4.abc.def-1&$rid=7"
            ),
            Ok(want)
        );
    }

    #[test]
    fn topic_properties_are_url_decoded() {
        assert_eq!(
            parse_request_topic(
                "$dps/registrations/GET/iotdps-get-operationstatus/?%24rid=a%20b&operationId=4.x%2Ey"
            ),
            Ok(RequestTopic::Poll {
                rid: "a b".into(),
                operation_id: Some("4.x.y".into())
            })
        );
    }

    #[test]
    fn poll_without_operation_id() {
        assert_eq!(
            parse_request_topic("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=3"),
            Ok(RequestTopic::Poll {
                rid: "3".into(),
                operation_id: None
            })
        );
    }

    #[test]
    fn bad_topics() {
        assert!(matches!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/?foo=1"),
            Err(TopicError::MissingRid(_))
        ));
        assert!(matches!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid=%zz"),
            Err(TopicError::Encoding(_))
        ));
        assert!(matches!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid=%e"),
            Err(TopicError::Encoding(_))
        ));
        assert!(matches!(
            parse_request_topic("devices/x/messages/events/"),
            Err(TopicError::Unknown(_))
        ));
        assert!(matches!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register?$rid=1"),
            Err(TopicError::Unknown(_))
        ));
    }

    #[test]
    fn response_topics() {
        assert_eq!(
            response_topic(202, "1", Some(3)),
            "$dps/registrations/res/202/?$rid=1&retry-after=3"
        );
        assert_eq!(
            response_topic(429, "1", Some(0)),
            "$dps/registrations/res/429/?$rid=1&retry-after=0"
        );
        assert_eq!(
            response_topic(200, "a b&c", None),
            "$dps/registrations/res/200/?$rid=a%20b%26c"
        );
    }

    #[test]
    fn username_plain_and_with_client_version() {
        let u = parse_username(Some(
            "0ne00000000/registrations/gw-0001/api-version=2025-07-01-preview",
        ))
        .unwrap();
        assert_eq!(u.id_scope, "0ne00000000");
        assert_eq!(u.registration_id, "gw-0001");
        assert_eq!(u.api_version, "2025-07-01-preview");
        assert!(u.extra.is_empty());

        let u = parse_username(Some(
            "0ne00000000/registrations/gw-0001/api-version=2019-03-31&ClientVersion=azure-iot-device%2F2.14.0&x=1",
        ))
        .unwrap();
        assert_eq!(u.api_version, "2019-03-31");
        assert_eq!(
            u.extra,
            vec![
                (
                    "ClientVersion".to_string(),
                    "azure-iot-device/2.14.0".to_string()
                ),
                ("x".to_string(), "1".to_string())
            ]
        );
    }

    #[test]
    fn username_errors() {
        assert_eq!(parse_username(None), Err(UsernameError::Missing));
        assert_eq!(parse_username(Some("")), Err(UsernameError::Missing));
        for bad in [
            "0ne00000000",
            "0ne00000000/registrations/gw-0001",
            "0ne00000000/registrations/gw-0001/?api-version=2019-03-31",
            "0ne00000000/devices/gw-0001/api-version=2019-03-31",
            "/registrations/gw-0001/api-version=2019-03-31",
            "0ne00000000/registrations//api-version=2019-03-31",
            "0ne00000000/registrations/gw-0001/ClientVersion=1&api-version=2019-03-31",
        ] {
            assert!(
                matches!(parse_username(Some(bad)), Err(UsernameError::Shape(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_username(Some("s/registrations/r/api-version=")),
            Err(UsernameError::EmptyApiVersion(_))
        ));
        assert!(matches!(
            parse_username(Some("s/registrations/r/api-version=1&x=%g1")),
            Err(UsernameError::Encoding(_))
        ));
    }

    #[test]
    fn url_round_trip() {
        let s = "4.0a1b/ü &=?";
        assert_eq!(url_decode(&url_encode(s)), Ok(s.to_string()));
    }
}
