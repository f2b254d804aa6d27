//! The one read-only view of the agent's state. The CLI (`status`), the log
//! lines and, later, D-Bus and sd_notify all render a [`Status`]; none keeps
//! its own copy of the state.

use serde::Serialize;

use crate::clock::{rfc3339, UnixTime};
use crate::store::lifecycle::{LifecycleState, Phase};
use crate::store::{Identity, Store};

/// The agent's state as shown to people and programs. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// `unprovisioned`, `provisioning`, `provisioned`, `renewing`, `failed`,
    /// `expired` (the stored certificate has expired and no renewal succeeded
    /// yet), or `unknown` when the state directory cannot be read.
    pub state: String,
    /// Where this view came from: `daemon` (asked over D-Bus) or `state-dir`
    /// (read from disk because no daemon answered).
    pub source: String,
    pub registration_id: String,
    pub device_id: Option<String>,
    pub assigned_hub: Option<String>,
    pub certificate_chain_path: Option<String>,
    pub key_uri: Option<String>,
    pub not_before: Option<UnixTime>,
    pub not_after: Option<UnixTime>,
    /// When the current certificate will be renewed.
    pub renew_at: Option<UnixTime>,
    /// After a failure: when the next attempt is due.
    pub next_attempt: Option<UnixTime>,
    pub thumbprint: Option<String>,
    pub subject: Option<String>,
    pub issuer: Option<String>,
    pub last_error: Option<String>,
    pub last_renewal: Option<UnixTime>,
    /// Consecutive failed attempts.
    pub failures: u32,
    /// Identities committed since the state directory was made.
    pub renewals: u64,
}

impl Status {
    /// Builds the view from the stored identity and lifecycle record.
    pub fn build(
        registration_id: &str,
        identity: Option<&Identity>,
        record: &LifecycleState,
        chain_path: &std::path::Path,
        now: UnixTime,
    ) -> Status {
        let mut s = Status {
            state: record.phase.name().to_string(),
            source: "state-dir".into(),
            registration_id: registration_id.to_string(),
            device_id: None,
            assigned_hub: None,
            certificate_chain_path: None,
            key_uri: None,
            not_before: None,
            not_after: None,
            renew_at: None,
            next_attempt: record.next_attempt_ms.map(|ms| ms.div_euclid(1000)),
            thumbprint: None,
            subject: None,
            issuer: None,
            last_error: record.last_error.clone(),
            last_renewal: record.last_renewal,
            failures: record.failures,
            renewals: record.renewals,
        };
        if let Some(id) = identity {
            if now >= id.not_after
                && record.phase != Phase::Provisioning
                && record.phase != Phase::Renewing
            {
                s.state = "expired".into();
            } else if record.phase == Phase::Unprovisioned {
                s.state = Phase::Provisioned.name().into();
            }
            s.registration_id = id.registration_id.clone();
            s.device_id = Some(id.device_id.clone());
            s.assigned_hub = Some(id.assigned_hub.clone());
            s.certificate_chain_path = Some(chain_path.display().to_string());
            s.key_uri = Some(id.key_uri.redacted());
            s.not_before = Some(id.not_before);
            s.not_after = Some(id.not_after);
            s.thumbprint = Some(id.thumbprint.clone());
            s.subject = Some(id.subject.clone());
            s.issuer = Some(id.issuer.clone());
            s.last_renewal = record.last_renewal.or(Some(id.issued_at));
            s.renew_at = record
                .schedule
                .as_ref()
                .filter(|sch| sch.thumbprint == id.thumbprint)
                .map(|sch| sch.renew_at_ms.div_euclid(1000));
        }
        s
    }

    /// Reads the state directory (never writes it).
    pub fn from_store(registration_id: &str, store: &Store, now: UnixTime) -> Status {
        let record = LifecycleState::load(store.dir()).unwrap_or_default();
        match store.load_identity() {
            Ok(id) => Status::build(
                registration_id,
                id.as_ref(),
                &record,
                &store.chain_path(),
                now,
            ),
            Err(e) => {
                let mut s = Status::build(registration_id, None, &record, &store.chain_path(), now);
                s.state = "unknown".into();
                s.last_error = Some(e.to_string());
                s
            }
        }
    }

    /// A few aligned lines for people.
    pub fn to_text(&self, now: UnixTime) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k:<18}{v}\n"));
        line("state:", format!("{} (from {})", self.state, self.source));
        line("registration id:", self.registration_id.clone());
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        line("device id:", opt(&self.device_id));
        line("assigned hub:", opt(&self.assigned_hub));
        line("key:", opt(&self.key_uri));
        line("chain:", opt(&self.certificate_chain_path));
        if let Some(s) = &self.subject {
            line("subject:", s.clone());
        }
        if let Some(s) = &self.issuer {
            line("issuer:", s.clone());
        }
        if let (Some(nb), Some(na)) = (self.not_before, self.not_after) {
            line("valid:", format!("{} .. {}", rfc3339(nb), rfc3339(na)));
            line("expires in:", human_delta(na - now));
        }
        if let Some(r) = self.renew_at {
            line(
                "renewal at:",
                format!("{} (in {})", rfc3339(r), human_delta(r - now)),
            );
        }
        if let Some(e) = &self.last_error {
            line("last error:", e.clone());
        }
        out
    }
}

/// `3d 4h`, `12m`, or `expired 2h ago`.
pub fn human_delta(secs: i64) -> String {
    if secs < 0 {
        return format!("{} ago", human_delta(-secs));
    }
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas() {
        assert_eq!(human_delta(5), "5s");
        assert_eq!(human_delta(125), "2m 5s");
        assert_eq!(human_delta(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
        assert_eq!(human_delta(-7200), "2h 0m ago");
    }

    #[test]
    fn empty_state_dir_is_unprovisioned() {
        let dir = std::env::temp_dir().join(format!("status-{}", rand::random::<u64>()));
        let s = Status::from_store("gw-1", &Store::open_read_only(&dir), 0);
        assert_eq!(s.state, "unprovisioned");
        assert!(s.to_text(0).contains("registration id:  gw-1\n"));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["state"], "unprovisioned");
        assert!(json["device_id"].is_null());
    }
}
