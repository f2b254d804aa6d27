//! The on-disk identity in the state directory. `identity.json` is the single
//! commit point: it holds the ids, the key URI, the dates and the whole chain, and
//! is replaced atomically. `operational-chain.pem` is an export of the same chain
//! for local apps, rewritten from `identity.json` whenever the two differ.
//! The previous identity is kept as `identity.prev.json` until a new one replaces it.
//! `lifecycle.json` (see [`lifecycle`]) holds the renewal schedule and failure record.

pub mod lifecycle;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;
use crate::fsutil;
use crate::keys::KeyUri;

pub const IDENTITY_FILE: &str = "identity.json";
pub const PREVIOUS_IDENTITY_FILE: &str = "identity.prev.json";
pub const CHAIN_FILE: &str = "operational-chain.pem";
const FORMAT_VERSION: u32 = 1;

/// A provisioned identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub version: u32,
    pub registration_id: String,
    pub device_id: String,
    pub assigned_hub: String,
    /// The operational key (never the key itself).
    pub key_uri: KeyUri,
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    /// When the agent received the chain.
    pub issued_at: UnixTime,
    /// Uppercase hex SHA-256 of the leaf.
    pub thumbprint: String,
    /// The leaf's subject and issuer, for humans.
    pub subject: String,
    pub issuer: String,
    /// The checked chain, leaf first, PEM.
    pub chain_pem: String,
}

impl Identity {
    pub const VERSION: u32 = FORMAT_VERSION;

    /// Whether the certificate is inside its validity period at `now`.
    pub fn is_valid_at(&self, now: UnixTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{}: is damaged ({reason}); move it away to provision again", path.display())]
    Damaged { path: PathBuf, reason: String },
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (and creates, mode 0700) the state directory and removes temporary
    /// files an interrupted write left behind.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        fsutil::ensure_dir(dir, 0o700).map_err(io_err(dir, "create it"))?;
        fsutil::clean_temp_files(dir).map_err(io_err(dir, "clean temporary files"))?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens the directory read-only: for `status` and `check`, which must not
    /// create or change anything.
    pub fn open_read_only(dir: &Path) -> Store {
        Store {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn identity_path(&self) -> PathBuf {
        self.dir.join(IDENTITY_FILE)
    }

    pub fn chain_path(&self) -> PathBuf {
        self.dir.join(CHAIN_FILE)
    }

    /// The stored identity, if any.
    pub fn load_identity(&self) -> Result<Option<Identity>, StoreError> {
        read_json(&self.identity_path())
    }

    /// The identity before the current one, if kept.
    pub fn load_previous_identity(&self) -> Result<Option<Identity>, StoreError> {
        read_json(&self.dir.join(PREVIOUS_IDENTITY_FILE))
    }

    /// Makes `identity` the current one, atomically, keeping the old one as the
    /// previous identity, then exports the chain.
    pub fn commit_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        let path = self.identity_path();
        if let Ok(old) = fs::read(&path) {
            let prev = self.dir.join(PREVIOUS_IDENTITY_FILE);
            fsutil::atomic_write(&prev, &old, 0o644).map_err(io_err(&prev, "write"))?;
        }
        let json = serde_json::to_vec_pretty(identity).map_err(|e| StoreError::Damaged {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        fsutil::atomic_write(&path, &json, 0o644).map_err(io_err(&path, "write"))?;
        self.export_chain(identity)
    }

    /// Rewrites `operational-chain.pem` if it differs from the identity's chain.
    pub fn export_chain(&self, identity: &Identity) -> Result<(), StoreError> {
        let path = self.chain_path();
        if fs::read_to_string(&path).ok().as_deref() != Some(identity.chain_pem.as_str()) {
            fsutil::atomic_write(&path, identity.chain_pem.as_bytes(), 0o644)
                .map_err(io_err(&path, "write"))?;
        }
        Ok(())
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "read")(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StoreError::Damaged {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        path,
        action,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(n: i64) -> Identity {
        Identity {
            version: Identity::VERSION,
            registration_id: "gw-1".into(),
            device_id: "gw-1".into(),
            assigned_hub: "hub".into(),
            key_uri: KeyUri::parse("file:/k.key").unwrap(),
            not_before: n,
            not_after: n + 100,
            issued_at: n,
            thumbprint: "AB".into(),
            subject: "CN=gw-1".into(),
            issuer: "CN=ca".into(),
            chain_pem: format!("chain {n}\n"),
        }
    }

    #[test]
    fn commit_keeps_previous_and_exports_chain() {
        let dir = std::env::temp_dir().join(format!("store-{}", rand::random::<u64>()));
        let s = Store::open(&dir).unwrap();
        assert!(s.load_identity().unwrap().is_none());
        s.commit_identity(&identity(1)).unwrap();
        s.commit_identity(&identity(2)).unwrap();
        assert_eq!(s.load_identity().unwrap(), Some(identity(2)));
        assert_eq!(s.load_previous_identity().unwrap(), Some(identity(1)));
        assert_eq!(fs::read_to_string(s.chain_path()).unwrap(), "chain 2\n");
        assert!(identity(2).is_valid_at(50) && !identity(2).is_valid_at(102));
        fs::write(s.identity_path(), b"{ not json").unwrap();
        let e = s.load_identity().unwrap_err().to_string();
        assert!(
            e.contains("is damaged") && e.contains("move it away"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
