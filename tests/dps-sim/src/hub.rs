//! The simulated IoT Hub service: device twins (reported properties per device id, kept in
//! memory for the run, updated with JSON merge-patch and a version) and the body checks of the
//! hub's certificate API (protocol.md §6.2). Transport independent; the only file it touches
//! is `--twin-file`, rewritten (temp + rename) after every twin change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::dps::uuid_like;
use crate::pki;

/// errorCode for an unusable twin patch or certificate request.
pub const ERR_BAD_REQUEST: u32 = 400_004;
/// The `$version` of the desired properties (the simulator never changes them).
pub const DESIRED_VERSION: u64 = 1;

/// Hub settings from the command line.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The hub's host name (`--assigned-hub`); usernames must start with it.
    pub hub_name: String,
    /// Where to write the twins after every change (`--twin-file`).
    pub twin_file: Option<PathBuf>,
}

/// One twin answer: status for the response topic, body, and the reported `$version`.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinAnswer {
    pub status: u16,
    pub body: Vec<u8>,
    /// Reported-properties version after the request (`None` for errors).
    pub version: Option<u64>,
    /// Why the request was refused (for events).
    pub error: Option<String>,
}

impl TwinAnswer {
    fn bad_request(message: String) -> Self {
        TwinAnswer {
            status: 400,
            body: error_body(ERR_BAD_REQUEST, &message).into_bytes(),
            version: None,
            error: Some(message),
        }
    }
}

/// A device's reported properties. A twin nobody patched yet has version 1, as in IoT Hub.
#[derive(Debug, Clone)]
struct Twin {
    reported: Map<String, Value>,
    version: u64,
}

impl Default for Twin {
    fn default() -> Self {
        Twin {
            reported: Map::new(),
            version: 1,
        }
    }
}

/// The simulated hub's state.
#[derive(Debug)]
pub struct Hub {
    config: HubConfig,
    twins: Mutex<BTreeMap<String, Twin>>,
}

impl Hub {
    pub fn new(config: HubConfig) -> Self {
        Hub {
            config,
            twins: Mutex::new(BTreeMap::new()),
        }
    }

    /// The hub host name devices must put in their username.
    pub fn name(&self) -> &str {
        &self.config.hub_name
    }

    fn twins(&self) -> MutexGuard<'_, BTreeMap<String, Twin>> {
        self.twins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Twin GET: 200 `{"desired":{"$version":1},"reported":{...,"$version":n}}`.
    pub fn twin_get(&self, device_id: &str) -> TwinAnswer {
        let twins = self.twins();
        let twin = twins.get(device_id).cloned().unwrap_or_default();
        let mut reported = twin.reported;
        reported.insert("$version".into(), json!(twin.version));
        let body = json!({
            "desired": {"$version": DESIRED_VERSION},
            "reported": Value::Object(reported),
        });
        TwinAnswer {
            status: 200,
            body: body.to_string().into_bytes(),
            version: Some(twin.version),
            error: None,
        }
    }

    /// Reported-properties PATCH: merges a JSON object (RFC 7396: `null` deletes, objects
    /// merge recursively, anything else replaces), increments the version, rewrites the twin
    /// file, answers 204 with an empty body. A body that is not a JSON object, or a key IoT Hub
    /// does not allow (empty, or containing `.`, `$`, a space or a control character), is a
    /// 400 and changes nothing.
    pub fn twin_patch(&self, device_id: &str, body: &[u8]) -> TwinAnswer {
        let patch = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                return TwinAnswer::bad_request(
                    "a reported-properties patch must be a JSON object".into(),
                )
            }
            Err(e) => {
                return TwinAnswer::bad_request(format!(
                    "a reported-properties patch must be a JSON object: {e}"
                ))
            }
        };
        if let Err(key) = check_keys(&patch) {
            return TwinAnswer::bad_request(format!(
                "property name {key:?} is not allowed (no '.', '$', spaces or control characters)"
            ));
        }
        let mut twins = self.twins();
        let twin = twins.entry(device_id.to_string()).or_default();
        merge_patch(&mut twin.reported, &patch);
        twin.version += 1;
        let version = twin.version;
        self.write_twin_file(&twins);
        TwinAnswer {
            status: 204,
            body: Vec::new(),
            version: Some(version),
            error: None,
        }
    }

    /// The twin file's contents: `{"<deviceId>": {"reported": {...}, "version": n}}`.
    pub fn snapshot(&self) -> Value {
        snapshot(&self.twins())
    }

    fn write_twin_file(&self, twins: &BTreeMap<String, Twin>) {
        let Some(path) = &self.config.twin_file else {
            return;
        };
        let mut text = snapshot(twins).to_string();
        text.push('\n');
        if let Err(e) = pki::write_atomic(path, text.as_bytes(), 0o644) {
            eprintln!("dps-sim: cannot write the twin file: {e}");
        }
    }
}

fn snapshot(twins: &BTreeMap<String, Twin>) -> Value {
    Value::Object(
        twins
            .iter()
            .map(|(id, twin)| {
                (
                    id.clone(),
                    json!({"reported": Value::Object(twin.reported.clone()), "version": twin.version}),
                )
            })
            .collect(),
    )
}

/// RFC 7396 JSON merge-patch of an object into an object.
pub fn merge_patch(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner) => {
                let slot = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(slot) = slot {
                    merge_patch(slot, inner);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

/// The first key (at any depth) IoT Hub would refuse.
fn check_keys(map: &Map<String, Value>) -> Result<(), String> {
    for (key, value) in map {
        let bad = key.is_empty()
            || key
                .chars()
                .any(|c| c == '.' || c == '$' || c == ' ' || c.is_control());
        if bad {
            return Err(key.clone());
        }
        if let Value::Object(inner) = value {
            check_keys(inner)?;
        }
    }
    Ok(())
}

/// A hub certificate request body `{"id", "csr", "replace"?}` that passed the shape checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRequest {
    /// Base64 DER PKCS#10, not yet checked.
    pub csr: String,
    pub replace: Option<String>,
}

/// Checks a certificate request body: a JSON object with exactly `id` (= the connected
/// device), `csr` (string) and optionally `replace` (string); anything else is a 400004.
pub fn parse_certificate_request(
    body: &[u8],
    device_id: &str,
) -> Result<CertificateRequest, String> {
    let obj = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => obj,
        _ => return Err("the request body must be a JSON object {\"id\",\"csr\"}".into()),
    };
    if let Some(unknown) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "id" | "csr" | "replace"))
    {
        return Err(format!("unknown field {unknown:?} in the request"));
    }
    match obj.get("id") {
        Some(Value::String(id)) if id == device_id => {}
        Some(Value::String(id)) => {
            return Err(format!(
                "id {id:?} is not the authenticated device {device_id:?}"
            ))
        }
        _ => return Err("id (the device id) is required".into()),
    }
    let csr = match obj.get("csr") {
        Some(Value::String(csr)) => csr.clone(),
        _ => return Err("csr (base64 DER PKCS#10) is required".into()),
    };
    let replace = match obj.get("replace") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) => Some(r.clone()),
        Some(_) => return Err("replace must be a string".into()),
    };
    Ok(CertificateRequest { csr, replace })
}

/// The hub's error body (protocol.md §6.2).
pub fn error_body(code: u32, message: &str) -> String {
    json!({
        "errorCode": code,
        "message": message,
        "trackingId": uuid_like(),
        "timestampUtc": rfc3339(OffsetDateTime::now_utc()),
    })
    .to_string()
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(twin_file: Option<PathBuf>) -> Hub {
        Hub::new(HubConfig {
            hub_name: "localhost".into(),
            twin_file,
        })
    }

    fn body(a: &TwinAnswer) -> Value {
        serde_json::from_slice(&a.body).unwrap()
    }

    #[test]
    fn get_of_a_new_twin() {
        let h = hub(None);
        let a = h.twin_get("gw-0001");
        assert_eq!((a.status, a.version), (200, Some(1)));
        assert_eq!(
            body(&a),
            json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
        );
    }

    #[test]
    fn patches_merge_and_bump_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("twins.json");
        let h = hub(Some(file.clone()));
        let a = h.twin_patch(
            "gw-0001",
            br#"{"certificate":{"validFrom":"a","validUntil":"b"},"fw":"1.0","gone":1}"#,
        );
        assert_eq!((a.status, a.version), (204, Some(2)));
        assert!(a.body.is_empty());
        let a = h.twin_patch(
            "gw-0001",
            br#"{"certificate":{"validUntil":"c"},"gone":null,"fw":{"v":2}}"#,
        );
        assert_eq!((a.status, a.version), (204, Some(3)));
        let g = body(&h.twin_get("gw-0001"));
        assert_eq!(
            g["reported"],
            json!({
                "certificate": {"validFrom": "a", "validUntil": "c"},
                "fw": {"v": 2},
                "$version": 3
            })
        );
        // Twins are per device.
        assert_eq!(h.twin_get("gw-0002").version, Some(1));
        // The file mirrors memory.
        let file: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(
            file,
            json!({"gw-0001": {"reported": {
                "certificate": {"validFrom": "a", "validUntil": "c"},
                "fw": {"v": 2}
            }, "version": 3}})
        );
        assert_eq!(file, h.snapshot());
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn bad_patches_are_400_and_change_nothing() {
        let h = hub(None);
        h.twin_patch("gw-0001", br#"{"a":1}"#);
        for bad in [
            &b"[1]"[..],
            b"\"x\"",
            b"null",
            b"{not json",
            b"",
            br#"{"a.b":1}"#,
            br#"{"$version":5}"#,
            br#"{"x":{"bad key":1}}"#,
        ] {
            let a = h.twin_patch("gw-0001", bad);
            assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(bad));
            assert_eq!(a.version, None);
            assert_eq!(body(&a)["errorCode"], ERR_BAD_REQUEST);
        }
        assert_eq!(h.twin_get("gw-0001").version, Some(2));
    }

    #[test]
    fn merge_patch_rfc7396_examples() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": [1]}),
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "c"}}),
            ),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (target, patch, want) in cases {
            let (Value::Object(mut t), Value::Object(p)) = (target, patch) else {
                unreachable!()
            };
            merge_patch(&mut t, &p);
            assert_eq!(Value::Object(t), want);
        }
    }

    #[test]
    fn certificate_requests() {
        let ok = parse_certificate_request(br#"{"id":"gw-0001","csr":"QUJD"}"#, "gw-0001");
        assert_eq!(
            ok,
            Ok(CertificateRequest {
                csr: "QUJD".into(),
                replace: None
            })
        );
        let ok =
            parse_certificate_request(br#"{"id":"gw-0001","csr":"QUJD","replace":"*"}"#, "gw-0001")
                .unwrap();
        assert_eq!(ok.replace.as_deref(), Some("*"));
        for bad in [
            &br#"{"id":"gw-0002","csr":"QUJD"}"#[..],
            br#"{"csr":"QUJD"}"#,
            br#"{"id":"gw-0001"}"#,
            br#"{"id":"gw-0001","csr":1}"#,
            br#"{"id":"gw-0001","csr":"QUJD","extra":1}"#,
            br#"{"id":"gw-0001","csr":"QUJD","replace":5}"#,
            b"[]",
            b"",
        ] {
            assert!(
                parse_certificate_request(bad, "gw-0001").is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
