//! IoT Hub MQTT names (protocol.md §6): the CONNECT username, the topics a device publishes to
//! (twin GET / reported PATCH, telemetry, certificate requests), the subscriptions the hub
//! grants, and the response topics. Pure string handling, no I/O.

use std::fmt::Write as _;

use crate::topics::{parse_query, url_encode};

const TWIN_GET: &str = "$iothub/twin/GET/";
const TWIN_PATCH: &str = "$iothub/twin/PATCH/properties/reported/";
const ISSUE_CERT: &str = "$iothub/credentials/POST/issueCertificate/";

/// A parsed hub username `{hub}/{deviceId}/?api-version={v}[&k=v...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUsername {
    pub hub: String,
    pub device_id: String,
    pub api_version: String,
    /// The other `&k=v` pairs (URL-decoded), e.g. `DeviceClientType`, `model-id`.
    pub extra: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubUsernameError {
    #[error("username is missing; expected {{hub}}/{{deviceId}}/?api-version={{v}}")]
    Missing,
    #[error("username {0:?} does not have the form {{hub}}/{{deviceId}}/?api-version={{v}}")]
    Shape(String),
    #[error("username {0:?} has no api-version (or an empty one)")]
    NoApiVersion(String),
    #[error("username {0:?} is not URL-encoded correctly")]
    Encoding(String),
}

/// Parses a hub username. `api-version` may be anywhere in the query; other pairs are kept.
pub fn parse_username(username: Option<&str>) -> Result<HubUsername, HubUsernameError> {
    let raw = username.ok_or(HubUsernameError::Missing)?;
    if raw.is_empty() {
        return Err(HubUsernameError::Missing);
    }
    let shape = || HubUsernameError::Shape(raw.to_string());
    let (path, query) = raw.split_once("/?").ok_or_else(shape)?;
    let (hub, device_id) = path.split_once('/').ok_or_else(shape)?;
    if hub.is_empty() || device_id.is_empty() || device_id.contains('/') {
        return Err(shape());
    }
    let pairs = parse_query(query).map_err(|_| HubUsernameError::Encoding(raw.to_string()))?;
    let mut api_version = None;
    let mut extra = Vec::new();
    for (k, v) in pairs {
        if k == "api-version" && api_version.is_none() {
            api_version = Some(v);
        } else {
            extra.push((k, v));
        }
    }
    let api_version = api_version
        .filter(|v| !v.is_empty())
        .ok_or_else(|| HubUsernameError::NoApiVersion(raw.to_string()))?;
    Ok(HubUsername {
        hub: hub.to_string(),
        device_id: device_id.to_string(),
        api_version,
        extra,
    })
}

/// A publish from a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubRequest {
    /// `$iothub/twin/GET/?$rid={rid}`
    TwinGet { rid: String },
    /// `$iothub/twin/PATCH/properties/reported/?$rid={rid}`
    TwinPatch { rid: String },
    /// `devices/{id}/messages/events/[{property bag}]`
    Telemetry {
        device_id: String,
        properties: Vec<(String, String)>,
    },
    /// `$iothub/credentials/POST/issueCertificate/?$rid={rid}`; without `$rid` nothing is
    /// answered (protocol.md §6.2).
    IssueCertificate { rid: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubTopicError {
    #[error("topic {0:?} is not an IoT Hub device topic this simulator knows")]
    Unknown(String),
    #[error("topic {0:?} has no $rid property")]
    MissingRid(String),
    #[error("topic {0:?} is not URL-encoded correctly")]
    Encoding(String),
}

/// Parses a publish topic. Properties may come in any order and are URL-decoded.
pub fn parse_request_topic(topic: &str) -> Result<HubRequest, HubTopicError> {
    let rid_of = |query: &str| -> Result<Option<String>, HubTopicError> {
        let pairs = parse_query(query).map_err(|_| HubTopicError::Encoding(topic.to_string()))?;
        Ok(pairs
            .into_iter()
            .find(|(k, _)| k == "$rid")
            .map(|(_, v)| v)
            .filter(|v| !v.is_empty()))
    };
    let required =
        |query: &str| rid_of(query)?.ok_or_else(|| HubTopicError::MissingRid(topic.to_string()));
    // `{base}?{properties}`, or `{base}` alone (no properties at all).
    let query = |base: &str| {
        topic.strip_prefix(base).and_then(|rest| match rest {
            "" => Some(""),
            r => r.strip_prefix('?'),
        })
    };
    if let Some(q) = query(TWIN_GET) {
        return Ok(HubRequest::TwinGet { rid: required(q)? });
    }
    if let Some(q) = query(TWIN_PATCH) {
        return Ok(HubRequest::TwinPatch { rid: required(q)? });
    }
    if let Some(q) = query(ISSUE_CERT) {
        return Ok(HubRequest::IssueCertificate { rid: rid_of(q)? });
    }
    if let Some(rest) = topic.strip_prefix("devices/") {
        if let Some((device_id, tail)) = rest.split_once("/messages/events") {
            let bag = match tail {
                "" => Some(""),
                t => t.strip_prefix('/'),
            };
            if let Some(bag) = bag {
                if !device_id.is_empty() && !device_id.contains('/') {
                    let properties =
                        parse_query(bag).map_err(|_| HubTopicError::Encoding(topic.to_string()))?;
                    return Ok(HubRequest::Telemetry {
                        device_id: device_id.to_string(),
                        properties,
                    });
                }
            }
        }
    }
    Err(HubTopicError::Unknown(topic.to_string()))
}

/// What a subscription filter is for; only these are granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription {
    /// `$iothub/twin/res/#`
    TwinResponses,
    /// `$iothub/twin/PATCH/properties/desired/#`
    DesiredUpdates,
    /// `devices/{id}/messages/devicebound/#`
    CloudToDevice,
    /// `$iothub/methods/POST/#`
    Methods,
    /// `$iothub/credentials/res/#`
    CredentialResponses,
}

/// The subscription a filter stands for, if the hub grants it to `device_id`.
pub fn subscription(filter: &str, device_id: &str) -> Option<Subscription> {
    match filter {
        "$iothub/twin/res/#" => Some(Subscription::TwinResponses),
        "$iothub/twin/PATCH/properties/desired/#" => Some(Subscription::DesiredUpdates),
        "$iothub/methods/POST/#" => Some(Subscription::Methods),
        "$iothub/credentials/res/#" => Some(Subscription::CredentialResponses),
        f if f == format!("devices/{device_id}/messages/devicebound/#") => {
            Some(Subscription::CloudToDevice)
        }
        _ => None,
    }
}

/// `$iothub/twin/res/{status}/?$rid={rid}[&$version={n}]`
pub fn twin_response_topic(status: u16, rid: &str, version: Option<u64>) -> String {
    let mut topic = format!("$iothub/twin/res/{status}/?$rid={}", url_encode(rid));
    if let Some(v) = version {
        let _ = write!(topic, "&$version={v}");
    }
    topic
}

/// `$iothub/credentials/res/{status}/?$rid={rid}`
pub fn credential_response_topic(status: u16, rid: &str) -> String {
    format!("$iothub/credentials/res/{status}/?$rid={}", url_encode(rid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        let u = parse_username(Some("localhost/gw-0001/?api-version=2021-04-12")).unwrap();
        assert_eq!(
            u,
            HubUsername {
                hub: "localhost".into(),
                device_id: "gw-0001".into(),
                api_version: "2021-04-12".into(),
                extra: vec![],
            }
        );
        let u = parse_username(Some(
            "hub.azure-devices.net/gw-0001/?api-version=2025-08-01-preview&DeviceClientType=dps-agent%2F0.1&model-id=dtmi%3Ax%3B1",
        ))
        .unwrap();
        assert_eq!(u.hub, "hub.azure-devices.net");
        assert_eq!(u.api_version, "2025-08-01-preview");
        assert_eq!(
            u.extra,
            vec![
                ("DeviceClientType".to_string(), "dps-agent/0.1".to_string()),
                ("model-id".to_string(), "dtmi:x;1".to_string()),
            ]
        );
        // api-version need not come first.
        let u = parse_username(Some("h/d/?x=1&api-version=2021-04-12")).unwrap();
        assert_eq!(u.api_version, "2021-04-12");
    }

    #[test]
    fn username_errors() {
        assert_eq!(parse_username(None), Err(HubUsernameError::Missing));
        assert_eq!(parse_username(Some("")), Err(HubUsernameError::Missing));
        for bad in [
            "localhost/gw-0001/api-version=2021-04-12",
            "localhost/?api-version=2021-04-12",
            "/gw-0001/?api-version=2021-04-12",
            "localhost/gw-0001/module/?api-version=2021-04-12",
            "0ne00000000/registrations/gw-0001/api-version=2025-07-01-preview",
        ] {
            assert!(
                matches!(parse_username(Some(bad)), Err(HubUsernameError::Shape(_))),
                "{bad}"
            );
        }
        for bad in ["h/d/?", "h/d/?api-version=", "h/d/?DeviceClientType=x"] {
            assert!(
                matches!(
                    parse_username(Some(bad)),
                    Err(HubUsernameError::NoApiVersion(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_username(Some("h/d/?api-version=1&x=%zz")),
            Err(HubUsernameError::Encoding(_))
        ));
    }

    #[test]
    fn request_topics() {
        assert_eq!(
            parse_request_topic("$iothub/twin/GET/?$rid=1"),
            Ok(HubRequest::TwinGet { rid: "1".into() })
        );
        assert_eq!(
            parse_request_topic("$iothub/twin/PATCH/properties/reported/?x=y&%24rid=a%20b"),
            Ok(HubRequest::TwinPatch { rid: "a b".into() })
        );
        assert_eq!(
            parse_request_topic("$iothub/credentials/POST/issueCertificate/?$rid=req-1"),
            Ok(HubRequest::IssueCertificate {
                rid: Some("req-1".into())
            })
        );
        assert_eq!(
            parse_request_topic("$iothub/credentials/POST/issueCertificate/?"),
            Ok(HubRequest::IssueCertificate { rid: None })
        );
        assert_eq!(
            parse_request_topic("devices/gw-0001/messages/events/"),
            Ok(HubRequest::Telemetry {
                device_id: "gw-0001".into(),
                properties: vec![]
            })
        );
        assert_eq!(
            parse_request_topic(
                "devices/gw-0001/messages/events/$.ct=application%2Fjson&$.ce=utf-8&k=v"
            ),
            Ok(HubRequest::Telemetry {
                device_id: "gw-0001".into(),
                properties: vec![
                    ("$.ct".into(), "application/json".into()),
                    ("$.ce".into(), "utf-8".into()),
                    ("k".into(), "v".into()),
                ]
            })
        );
        assert!(matches!(
            parse_request_topic("devices/gw-0001/messages/events"),
            Ok(HubRequest::Telemetry { .. })
        ));
    }

    #[test]
    fn bad_request_topics() {
        for (topic, missing) in [
            ("$iothub/twin/GET/?", true),
            ("$iothub/twin/GET/", true),
            ("$iothub/twin/GET/x?$rid=1", false),
            ("$iothub/twin/GET/?$rid=", true),
            ("$iothub/twin/PATCH/properties/reported/?foo=1", true),
            ("$iothub/twin/GET?$rid=1", false),
            ("$iothub/twin/PATCH/properties/desired/?$rid=1", false),
            ("devices//messages/events/", false),
            ("devices/gw-0001/messages/eventsX", false),
            ("devices/gw-0001/messages/devicebound/", false),
            ("$dps/registrations/PUT/iotdps-register/?$rid=1", false),
        ] {
            let err = parse_request_topic(topic).unwrap_err();
            assert_eq!(
                matches!(err, HubTopicError::MissingRid(_)),
                missing,
                "{topic}: {err}"
            );
        }
        assert!(matches!(
            parse_request_topic("$iothub/twin/GET/?$rid=%g"),
            Err(HubTopicError::Encoding(_))
        ));
    }

    #[test]
    fn subscriptions_and_response_topics() {
        assert_eq!(
            subscription("$iothub/twin/res/#", "d"),
            Some(Subscription::TwinResponses)
        );
        assert_eq!(
            subscription("devices/d/messages/devicebound/#", "d"),
            Some(Subscription::CloudToDevice)
        );
        assert_eq!(subscription("devices/e/messages/devicebound/#", "d"), None);
        assert_eq!(subscription("$iothub/twin/#", "d"), None);
        assert_eq!(subscription("#", "d"), None);
        assert_eq!(
            twin_response_topic(204, "7", Some(3)),
            "$iothub/twin/res/204/?$rid=7&$version=3"
        );
        assert_eq!(
            twin_response_topic(200, "a&b", None),
            "$iothub/twin/res/200/?$rid=a%26b"
        );
        assert_eq!(
            credential_response_topic(202, "r-1"),
            "$iothub/credentials/res/202/?$rid=r-1"
        );
    }
}
