//! The lifecycle's persisted record, `lifecycle.json` in the state directory:
//! the phase, the renewal schedule of the current certificate (computed once,
//! so a restart does not re-roll the jitter), a renewal in flight, and the
//! failure record that spaces out retries across restarts. Written atomically.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;
use crate::fsutil;
use crate::keys::KeyUri;

pub const STATE_FILE: &str = "lifecycle.json";

/// Where the agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No identity yet.
    #[default]
    Unprovisioned,
    /// Registering without a usable identity.
    Provisioning,
    /// A usable identity; waiting for its renewal time.
    Provisioned,
    /// Renewing while the current identity stays in use.
    Renewing,
    /// The last attempt failed; `next_attempt_ms` says when the next one is.
    Failed,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Unprovisioned => "unprovisioned",
            Phase::Provisioning => "provisioning",
            Phase::Provisioned => "provisioned",
            Phase::Renewing => "renewing",
            Phase::Failed => "failed",
        }
    }
}

/// When the current certificate is renewed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// The certificate this schedule belongs to (leaf thumbprint).
    pub thumbprint: String,
    /// Renewal time, Unix milliseconds.
    pub renew_at_ms: i64,
    /// The jitter drawn for it, milliseconds (for the record).
    pub jitter_ms: i64,
}

/// A renewal in flight: the key it made, so a crash can be resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The key name passed to `KeyStore::generate`.
    pub name: String,
    /// The key's URI, once generated.
    pub uri: Option<KeyUri>,
    pub started_at: UnixTime,
}

/// The whole persisted record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LifecycleState {
    pub phase: Phase,
    pub schedule: Option<Schedule>,
    pub pending: Option<Pending>,
    /// Consecutive failed attempts.
    pub failures: u32,
    pub last_error: Option<String>,
    /// Earliest time of the next attempt after a failure, Unix milliseconds.
    pub next_attempt_ms: Option<i64>,
    /// The last failure was on this machine (configuration, a missing file,
    /// key or device), not an answer from a server: a new process (a restart
    /// after the fix) retries at once instead of waiting for `next_attempt_ms`.
    #[serde(default)]
    pub failure_local: bool,
    /// When the current identity was committed.
    pub last_renewal: Option<UnixTime>,
    /// Number of identities committed since the state directory was made.
    pub renewals: u64,
}

/// Errors reading or writing `lifecycle.json`.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl LifecycleState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Reads the state; a missing file is a fresh state. A damaged file is
    /// logged and replaced by a fresh state: it holds no identity, only
    /// bookkeeping that the next attempt rebuilds.
    pub fn load(dir: &Path) -> Result<LifecycleState, StateError> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(s) => Ok(s),
                Err(e) => {
                    log::warn!(
                        "{} is damaged ({e}); starting with a fresh schedule",
                        path.display()
                    );
                    Ok(LifecycleState::default())
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LifecycleState::default()),
            Err(source) => Err(StateError::Io {
                path,
                action: "read",
                source,
            }),
        }
    }

    /// Writes the state atomically.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = Self::path(dir);
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        fsutil::atomic_write(&path, &json, 0o644).map_err(|source| StateError::Io {
            path,
            action: "write",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = std::env::temp_dir().join(format!("lcstate-{}", rand::random::<u64>()));
        fsutil::ensure_dir(&dir, 0o700).unwrap();
        assert_eq!(
            LifecycleState::load(&dir).unwrap(),
            LifecycleState::default()
        );
        let s = LifecycleState {
            phase: Phase::Renewing,
            schedule: Some(Schedule {
                thumbprint: "AB".into(),
                renew_at_ms: 5,
                jitter_ms: 1,
            }),
            pending: Some(Pending {
                name: "op-x".into(),
                uri: Some(KeyUri::parse("file:/x.key").unwrap()),
                started_at: 3,
            }),
            failures: 2,
            last_error: Some("e".into()),
            next_attempt_ms: Some(9),
            failure_local: true,
            last_renewal: Some(1),
            renewals: 4,
        };
        s.save(&dir).unwrap();
        assert_eq!(LifecycleState::load(&dir).unwrap(), s);
        std::fs::write(LifecycleState::path(&dir), b"{").unwrap();
        assert_eq!(
            LifecycleState::load(&dir).unwrap(),
            LifecycleState::default()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
