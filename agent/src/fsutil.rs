//! Crash-safe file writes, and the one door every file-system effect of the
//! agent goes through. Owns the way this crate writes state: a temporary file
//! in the same directory, fsync, rename over the target, fsync the directory.
//! A power cut at any instant leaves either the old file or the new one, whole.
//!
//! Every effect (create, chmod, write, fsync, rename, directory fsync, remove,
//! mkdir) is one numbered [`fault::Op`]; a test can make the Nth fail, or stop
//! everything after the Nth as a power cut would (see [`fault`]). Reads are
//! not effects and are never counted.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Writes `data` to `path` atomically with permission bits `mode` (e.g. 0o600).
pub fn atomic_write(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u32>()
    ));
    let mut created = false;
    let result = (|| {
        fault::effect(fault::Op::Create, &tmp)?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        created = true;
        // The umask may have narrowed the mode; never widen beyond what was asked.
        fault::effect(fault::Op::Chmod, &tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        fault::effect(fault::Op::Write, &tmp)?;
        f.write_all(data)?;
        fault::effect(fault::Op::SyncFile, &tmp)?;
        f.sync_all()?;
        drop(f);
        fault::effect(fault::Op::Rename, path)?;
        fs::rename(&tmp, path)?;
        note_rename(path);
        created = false;
        sync_dir(&dir)
    })();
    if result.is_err() && created {
        // Best effort; a leftover is removed by `clean_temp_files` at the next open.
        if fault::effect(fault::Op::Remove, &tmp).is_ok() {
            let _ = fs::remove_file(&tmp);
        }
    }
    result
}

/// The outcome of [`atomic_write`] for a caller that must know whether the
/// new file became visible (the commit point of a store).
#[derive(Debug)]
pub enum WriteOutcome {
    /// The new file replaced the old one and the directory entry is durable.
    Durable,
    /// The new file replaced the old one, but the directory fsync failed: a
    /// power cut may still bring the old file back.
    Visible(io::Error),
}

/// [`atomic_write`] that tells an error before the rename (nothing changed:
/// `Err`) from one after it (the new file is visible: `Ok(Visible)`).
pub fn atomic_replace(path: &Path, data: &[u8], mode: u32) -> io::Result<WriteOutcome> {
    let before = rename_count();
    match atomic_write(path, data, mode) {
        Ok(()) => Ok(WriteOutcome::Durable),
        Err(e) if rename_count() > before && renamed_to(path) => Ok(WriteOutcome::Visible(e)),
        Err(e) => Err(e),
    }
}

thread_local! {
    /// Renames done by this thread (and the last target), so `atomic_replace`
    /// can tell where an `atomic_write` stopped.
    static RENAMES: std::cell::RefCell<(u64, Option<PathBuf>)> = const { std::cell::RefCell::new((0, None)) };
}

fn rename_count() -> u64 {
    RENAMES.with(|r| r.borrow().0)
}

fn renamed_to(path: &Path) -> bool {
    RENAMES.with(|r| r.borrow().1.as_deref() == Some(path))
}

fn note_rename(path: &Path) {
    RENAMES.with(|r| {
        let mut r = r.borrow_mut();
        r.0 += 1;
        r.1 = Some(path.to_path_buf());
    });
}

/// Removes a file and makes the removal durable. A missing file is not an error.
pub fn remove_durably(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    fault::effect(fault::Op::Remove, path)?;
    match fs::remove_file(path) {
        Ok(()) => sync_dir(&parent_dir(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates a directory (and its parents) with `mode` if it does not exist.
pub fn ensure_dir(path: &Path, mode: u32) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    fault::effect(fault::Op::MkDir, path)?;
    fs::create_dir_all(path)?;
    fault::effect(fault::Op::Chmod, path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Removes stale temporary files left by an interrupted [`atomic_write`] in `dir`.
pub fn clean_temp_files(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.contains(".tmp-") {
            fault::effect(fault::Op::Remove, &entry.path())?;
            fs::remove_file(entry.path())?;
            n += 1;
        }
    }
    if n > 0 {
        sync_dir(dir)?;
    }
    Ok(n)
}

/// Opens (creating it, mode `mode`) a file that is only ever locked, never
/// written through this module: the state directory's lock file.
pub fn open_lock_file(path: &Path, mode: u32) -> io::Result<File> {
    if fs::symlink_metadata(path).is_err() {
        fault::effect(fault::Op::Create, path)?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .open(path)
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fault::effect(fault::Op::SyncDir, dir)?;
    File::open(dir)?.sync_all()
}

/// Fault injection for tests: number every file-system effect and make one
/// fail, or make everything after one of them never happen (a power cut).
/// Inert unless a test installs a [`fault::Plan`] for a directory: then only
/// effects on paths under that directory are numbered, so tests writing
/// elsewhere run beside it undisturbed ([`fault::install`] serialises the
/// tests that install plans).
pub mod fault {
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, MutexGuard};

    /// One file-system effect.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Op {
        Create,
        Chmod,
        Write,
        SyncFile,
        Rename,
        SyncDir,
        Remove,
        MkDir,
    }

    /// What the injector does.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Plan {
        /// Only count and record the effects.
        Count,
        /// Effect number N (from 1) fails with `ENOSPC`; the others happen.
        FailAt(u64),
        /// Effects up to and including number N happen; every later one fails
        /// with `EIO` without happening, as if the power had been cut.
        CutAfter(u64),
    }

    struct State {
        root: PathBuf,
        plan: Plan,
        seen: Vec<(Op, PathBuf)>,
    }

    static ACTIVE: AtomicBool = AtomicBool::new(false);
    static STATE: Mutex<Option<State>> = Mutex::new(None);
    static EXCLUSIVE: Mutex<()> = Mutex::new(());

    fn state() -> MutexGuard<'static, Option<State>> {
        STATE.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An installed plan; dropping it removes the plan.
    pub struct Installed {
        root: PathBuf,
        _exclusive: MutexGuard<'static, ()>,
    }

    impl Installed {
        /// The effects seen so far, in order.
        pub fn effects(&self) -> Vec<(Op, PathBuf)> {
            state().as_ref().map(|s| s.seen.clone()).unwrap_or_default()
        }

        /// Replaces the plan and forgets the effects seen so far.
        pub fn set(&self, plan: Plan) {
            *state() = Some(State {
                root: self.root.clone(),
                plan,
                seen: Vec::new(),
            });
        }
    }

    impl Drop for Installed {
        fn drop(&mut self) {
            ACTIVE.store(false, Ordering::SeqCst);
            *state() = None;
        }
    }

    /// Installs `plan` for the effects on paths under `root` (waiting for
    /// any other installed plan to be dropped).
    pub fn install(root: &Path, plan: Plan) -> Installed {
        let exclusive = EXCLUSIVE.lock().unwrap_or_else(|p| p.into_inner());
        let installed = Installed {
            root: root.to_path_buf(),
            _exclusive: exclusive,
        };
        installed.set(plan);
        ACTIVE.store(true, Ordering::SeqCst);
        installed
    }

    /// Called before each effect: `Err` means "do not do it".
    pub(super) fn effect(op: Op, path: &Path) -> io::Result<()> {
        if !ACTIVE.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut guard = state();
        let Some(s) = guard.as_mut() else {
            return Ok(());
        };
        if !path.starts_with(&s.root) {
            return Ok(());
        }
        s.seen.push((op, path.to_path_buf()));
        let n = s.seen.len() as u64;
        match s.plan {
            Plan::FailAt(k) if n == k => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            Plan::CutAfter(k) if n > k => Err(io::Error::other("power cut (injected by a test)")),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fsutil-{tag}-{}", rand::random::<u64>()));
        ensure_dir(&dir, 0o700).unwrap();
        dir
    }

    #[test]
    fn writes_replace_whole_file_with_mode() {
        let dir = temp_dir("w");
        let p = dir.join("x.json");
        atomic_write(&p, b"first", 0o600).unwrap();
        atomic_write(&p, b"second", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // a stale temp file is cleaned
        fs::write(dir.join(".x.json.tmp-1-2"), b"junk").unwrap();
        assert_eq!(clean_temp_files(&dir).unwrap(), 1);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        remove_durably(&p).unwrap();
        remove_durably(&p).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Every effect of an atomic write, failed in turn and cut after in turn,
    /// leaves the old file or the new one, whole, and tells the caller which.
    #[test]
    fn each_effect_of_an_atomic_write_fails_or_is_cut_cleanly() {
        let dir = temp_dir("f");
        let p = dir.join("x.json");
        atomic_write(&p, b"old", 0o644).unwrap();
        let installed = fault::install(&dir, fault::Plan::Count);
        atomic_write(&p, b"new", 0o644).unwrap();
        let ops: Vec<fault::Op> = installed.effects().into_iter().map(|(o, _)| o).collect();
        use fault::Op::*;
        assert_eq!(ops, [Create, Chmod, Write, SyncFile, Rename, SyncDir]);
        let rename_at = 5;
        for n in 1..=ops.len() as u64 {
            for plan in [fault::Plan::FailAt(n), fault::Plan::CutAfter(n)] {
                // Reset as a fresh open would: the old file, no leftovers.
                clean_temp_files(&dir).unwrap();
                atomic_write(&p, b"old", 0o644).unwrap_or_else(|e| panic!("reset: {e}"));
                installed.set(plan);
                let outcome = atomic_replace(&p, b"new", 0o644);
                installed.set(fault::Plan::Count);
                let now = fs::read(&p).unwrap();
                let expect_new = match plan {
                    fault::Plan::FailAt(k) => k > rename_at,
                    fault::Plan::CutAfter(k) => k >= rename_at,
                    fault::Plan::Count => true,
                };
                assert_eq!(now, if expect_new { b"new" } else { b"old" }, "{plan:?}");
                match outcome {
                    Ok(WriteOutcome::Durable) => {
                        assert!(
                            expect_new
                                && n == ops.len() as u64
                                && matches!(plan, fault::Plan::CutAfter(_)),
                            "{plan:?}"
                        )
                    }
                    Ok(WriteOutcome::Visible(_)) => assert!(expect_new, "{plan:?}"),
                    Err(_) => assert!(!expect_new, "{plan:?}"),
                }
                if matches!(plan, fault::Plan::FailAt(_)) {
                    // A failed write removes its temporary file.
                    let left = fs::read_dir(&dir).unwrap().count();
                    assert_eq!(left, 1, "{plan:?}");
                }
            }
        }
        drop(installed);
        clean_temp_files(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
