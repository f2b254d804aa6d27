//! The on-disk identity in the state directory. `identity.json` is the single
//! commit point: it holds the ids, the key URI, the dates and the whole chain, and
//! is replaced atomically. `operational-chain.pem` is an export of the same chain
//! for local apps, rewritten from `identity.json` whenever the two differ.
//! The previous identity is kept as `identity.prev.json` until a new one replaces it.
//! `lifecycle.json` (see [`lifecycle`]) holds the renewal schedule and failure record.
//!
//! One process at a time writes the directory: [`Store::open`] takes an
//! exclusive `flock` on its `lock` file and a second writer is refused at once,
//! with the holder's pid.

pub mod lifecycle;

use std::fs;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;
use crate::fsutil;
use crate::keys::KeyUri;

pub const IDENTITY_FILE: &str = "identity.json";
pub const PREVIOUS_IDENTITY_FILE: &str = "identity.prev.json";
pub const CHAIN_FILE: &str = "operational-chain.pem";
/// Locked by the one process that writes the state directory; holds its pid.
pub const LOCK_FILE: &str = "lock";
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
    #[error("state directory {} is in use by {}; only one dps-agent process may change it: `dps-agent renew` asks the running daemon to renew, `dps-agent status` shows its state", dir.display(), holder.map_or("another process".to_string(), |p| format!("process {p}")))]
    Busy { dir: PathBuf, holder: Option<u32> },
}

/// What [`Store::commit_identity`] achieved. Past the rename of
/// `identity.json` nothing is undone: the new identity is the current one.
#[derive(Debug)]
pub struct Commit {
    /// False when the directory could not be synced after the rename: a power
    /// cut may still bring the previous identity back, so neither identity's
    /// key may be deleted until the next start settles it.
    pub durable: bool,
    /// Failures after the rename (the directory sync, the chain export); the
    /// caller logs them; the next open or commit repairs them.
    pub problems: Vec<StoreError>,
}

/// The exclusive lock on a state directory, released when the last clone of
/// the [`Store`] holding it is dropped (or the process dies).
#[derive(Debug)]
struct DirLock {
    _file: fs::File,
}

impl DirLock {
    fn take(dir: &Path) -> Result<DirLock, StoreError> {
        let path = dir.join(LOCK_FILE);
        let mut file = fsutil::open_lock_file(&path, 0o644).map_err(io_err(&path, "open"))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(StoreError::Busy {
                    dir: dir.to_path_buf(),
                    holder: text.trim().parse().ok(),
                });
            }
            return Err(io_err(&path, "lock")(e));
        }
        // The pid is for the message of a refused second writer only.
        let _ = file
            .set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| writeln!(file, "{}", std::process::id()));
        Ok(DirLock { _file: file })
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    /// Held by a writer ([`Store::open`]); None for a reader.
    _lock: Option<Arc<DirLock>>,
}

impl Store {
    /// Opens (and creates, mode 0700) the state directory for writing: takes
    /// its lock (refusing at once with [`StoreError::Busy`] while another
    /// process holds it), then removes temporary files an interrupted write
    /// left behind.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        fsutil::ensure_dir(dir, 0o700).map_err(io_err(dir, "create it"))?;
        let lock = DirLock::take(dir)?;
        fsutil::clean_temp_files(dir).map_err(io_err(dir, "clean temporary files"))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: Some(Arc::new(lock)),
        })
    }

    /// Opens the directory read-only: for `status` and `check`, which must not
    /// create or change anything (and so take no lock).
    pub fn open_read_only(dir: &Path) -> Store {
        Store {
            dir: dir.to_path_buf(),
            _lock: None,
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
    /// previous identity, then exports the chain. The rename of
    /// `identity.json` is the commit point: `Err` means it did not happen (the
    /// old identity is still the current one, whole); `Ok` means it did,
    /// whatever failed after it (see [`Commit`]).
    pub fn commit_identity(&self, identity: &Identity) -> Result<Commit, StoreError> {
        let path = self.identity_path();
        if let Ok(old) = fs::read(&path) {
            let prev = self.dir.join(PREVIOUS_IDENTITY_FILE);
            fsutil::atomic_write(&prev, &old, 0o644).map_err(io_err(&prev, "write"))?;
        }
        let json = serde_json::to_vec_pretty(identity).map_err(|e| StoreError::Damaged {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut commit = Commit {
            durable: true,
            problems: Vec::new(),
        };
        match fsutil::atomic_replace(&path, &json, 0o644).map_err(io_err(&path, "write"))? {
            fsutil::WriteOutcome::Durable => {}
            fsutil::WriteOutcome::Visible(e) => {
                commit.durable = false;
                commit.problems.push(io_err(&self.dir, "sync")(e));
            }
        }
        if let Err(e) = self.export_chain(identity) {
            commit.problems.push(e);
        }
        Ok(commit)
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
        assert!(s.commit_identity(&identity(1)).unwrap().durable);
        let c = s.commit_identity(&identity(2)).unwrap();
        assert!(c.durable && c.problems.is_empty(), "{c:?}");
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

    #[test]
    fn a_second_writer_is_refused_at_once_with_the_holders_pid() {
        let dir = std::env::temp_dir().join(format!("store-lock-{}", rand::random::<u64>()));
        let first = Store::open(&dir).unwrap();
        let e = Store::open(&dir).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, StoreError::Busy { holder: Some(p), .. } if p == std::process::id()),
            "{text}"
        );
        assert!(text.contains("dps-agent renew"), "{text}");
        // Readers take no lock.
        let reader = Store::open_read_only(&dir);
        assert!(reader.load_identity().unwrap().is_none());
        // A clone shares the lock; the last one dropped releases it.
        let clone = first.clone();
        drop(first);
        assert!(Store::open(&dir).is_err());
        drop(clone);
        let again = Store::open(&dir).unwrap();
        drop(again);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The export failing after the rename (here: a directory where the chain
    /// file should be) does not undo the commit.
    #[test]
    fn a_failed_export_after_the_rename_still_commits() {
        let dir = std::env::temp_dir().join(format!("store-export-{}", rand::random::<u64>()));
        let s = Store::open(&dir).unwrap();
        s.commit_identity(&identity(1)).unwrap();
        fs::remove_file(s.chain_path()).unwrap();
        fs::create_dir(s.chain_path()).unwrap();
        let c = s.commit_identity(&identity(2)).unwrap();
        assert!(c.durable, "{c:?}");
        assert_eq!(c.problems.len(), 1, "{c:?}");
        assert!(c.problems[0].to_string().contains(CHAIN_FILE), "{c:?}");
        assert_eq!(s.load_identity().unwrap(), Some(identity(2)));
        fs::remove_dir(s.chain_path()).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
