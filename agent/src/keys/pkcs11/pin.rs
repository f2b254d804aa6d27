//! Where the token's user PIN comes from, and the [`Pin`] that holds it. Owns
//! the checks on PIN files (a regular file, no group or other permission bits,
//! owned by the user the daemon runs as) and the order of sources: the key
//! URI's `pin-value` or `pin-source`, then `[pkcs11] pin_file`, then the
//! systemd credential `pkcs11-pin`. A PIN is zeroized when dropped and is never
//! printed: its `Debug` is `Pin(REDACTED)` and no error message contains it.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::error::Pkcs11Error;

/// The name of the systemd credential that carries the PIN
/// (`LoadCredential=pkcs11-pin:/etc/dps-agent/pkcs11-pin`).
pub const CREDENTIAL_NAME: &str = "pkcs11-pin";

/// Longest PIN file read (PKCS#11 PINs are short; this bounds a wrong path).
const MAX_PIN_FILE: u64 = 4096;

/// A user PIN. Zeroized on drop (cryptoki's `AuthPin` is a `SecretString`).
pub struct Pin(AuthPin);

impl Pin {
    /// Makes a PIN from bytes: the first line, without its line ending.
    pub fn from_bytes(bytes: &[u8]) -> Result<Pin, &'static str> {
        let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Err("is empty");
        }
        let text = std::str::from_utf8(line).map_err(|_| "is not UTF-8 text")?;
        // A boxed str of exactly the PIN's length: nothing is left behind in
        // spare capacity when the secret is moved.
        let boxed: Box<str> = text.into();
        Ok(Pin(AuthPin::from(boxed)))
    }

    /// The secret, for `C_Login` only.
    pub(crate) fn auth(&self) -> &AuthPin {
        &self.0
    }

    /// A salted SHA-256 of the PIN, so a rejected PIN can be recognised
    /// without keeping it.
    pub(crate) fn fingerprint(&self, salt: &[u8], token: &str) -> [u8; 32] {
        use secrecy::ExposeSecret as _;
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(salt);
        h.update((token.len() as u64).to_be_bytes());
        h.update(token.as_bytes());
        h.update(self.0.expose_secret().as_bytes());
        h.finalize().into()
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(REDACTED)")
    }
}

/// Where a store reads the PIN from.
#[derive(Debug)]
pub enum PinSource {
    /// `[pkcs11] pin_file`.
    ConfigFile(PathBuf),
    /// `$CREDENTIALS_DIRECTORY/pkcs11-pin` (systemd `LoadCredential=`).
    Credential(PathBuf),
    /// The key URI's `pin-value`.
    UriValue(Pin),
    /// The key URI's `pin-source=file:…`.
    UriFile(PathBuf),
}

impl PinSource {
    /// Picks the PIN source: the URI's own attributes first, then the config's
    /// `pin_file`, then the systemd credential. `None` when there is none
    /// (fine for tokens that need no login or have a PIN pad).
    pub fn choose(
        uri_pin_value: Option<&[u8]>,
        uri_pin_source: Option<&str>,
        pin_file: Option<&Path>,
        credentials_dir: Option<&Path>,
    ) -> Result<Option<PinSource>, Pkcs11Error> {
        if let Some(v) = uri_pin_value {
            let pin = Pin::from_bytes(v).map_err(|problem| Pkcs11Error::PinValue { problem })?;
            return Ok(Some(PinSource::UriValue(pin)));
        }
        if let Some(src) = uri_pin_source {
            let path = src.strip_prefix("file:").unwrap_or(src);
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err(Pkcs11Error::PinSourceUnsupported {
                    value: src.to_string(),
                });
            }
            return Ok(Some(PinSource::UriFile(PathBuf::from(path))));
        }
        if let Some(p) = pin_file {
            return Ok(Some(PinSource::ConfigFile(p.to_path_buf())));
        }
        if let Some(dir) = credentials_dir {
            let p = dir.join(CREDENTIAL_NAME);
            if p.exists() {
                return Ok(Some(PinSource::Credential(p)));
            }
        }
        Ok(None)
    }

    /// The same choice with this process's `$CREDENTIALS_DIRECTORY`.
    pub fn from_env(
        uri_pin_value: Option<&[u8]>,
        uri_pin_source: Option<&str>,
        pin_file: Option<&Path>,
    ) -> Result<Option<PinSource>, Pkcs11Error> {
        let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        Self::choose(uri_pin_value, uri_pin_source, pin_file, creds.as_deref())
    }

    /// Reads the PIN. Files are checked first (see [`check_pin_file`]); a
    /// systemd credential is trusted as systemd made it.
    pub fn read(&self) -> Result<Pin, Pkcs11Error> {
        match self {
            PinSource::UriValue(pin) => {
                use secrecy::ExposeSecret as _;
                let boxed: Box<str> = pin.0.expose_secret().into();
                Ok(Pin(AuthPin::from(boxed)))
            }
            PinSource::ConfigFile(p) | PinSource::UriFile(p) => {
                check_pin_file(p, current_euid())?;
                read_pin_file(p)
            }
            PinSource::Credential(p) => read_pin_file(p),
        }
    }

    /// Names the source in messages (never the PIN).
    pub fn describe(&self) -> String {
        match self {
            PinSource::ConfigFile(p) => format!("[pkcs11] pin_file {}", p.display()),
            PinSource::Credential(p) => {
                format!("the systemd credential {CREDENTIAL_NAME} ({})", p.display())
            }
            PinSource::UriValue(_) => "the key URI's pin-value".to_string(),
            PinSource::UriFile(p) => format!("the key URI's pin-source {}", p.display()),
        }
    }
}

/// The effective user id of this process.
pub fn current_euid() -> u32 {
    // SAFETY: geteuid has no preconditions, touches no memory of ours and
    // cannot fail (POSIX).
    unsafe { libc::geteuid() }
}

/// Refuses a PIN file that others could read or change: it must be a regular
/// file with no group or other permission bits, owned by `euid`.
pub fn check_pin_file(path: &Path, euid: u32) -> Result<(), Pkcs11Error> {
    let err = |problem: String, fix: String| Pkcs11Error::PinFile {
        path: path.to_path_buf(),
        problem,
        fix,
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        let fix = if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "write the token's user PIN into it: install -m 0600 /dev/null {p} && edit {p}",
                p = path.display()
            )
        } else {
            "check the path and the permissions of its directories".to_string()
        };
        err(format!("cannot be read: {e}"), fix)
    })?;
    check_pin_file_metadata(
        path,
        meta.is_file(),
        meta.permissions().mode(),
        meta.uid(),
        euid,
    )
}

/// The checks of [`check_pin_file`] on metadata already read.
pub fn check_pin_file_metadata(
    path: &Path,
    is_file: bool,
    mode: u32,
    owner: u32,
    euid: u32,
) -> Result<(), Pkcs11Error> {
    let err = |problem: String, fix: String| Pkcs11Error::PinFile {
        path: path.to_path_buf(),
        problem,
        fix,
    };
    if !is_file {
        return Err(err(
            "is not a regular file".into(),
            "point [pkcs11] pin_file at a file holding the PIN".into(),
        ));
    }
    if mode & 0o077 != 0 {
        return Err(err(
            format!(
                "has mode {:04o}: group or others may read or change the PIN",
                mode & 0o7777
            ),
            format!("run: chmod 0600 {}", path.display()),
        ));
    }
    if owner != euid {
        return Err(err(
            format!("is owned by uid {owner}, but dps-agent runs as uid {euid}"),
            format!(
                "give it to the daemon's user: chown {euid} {} (for the service: chown dps-agent …)",
                path.display()
            ),
        ));
    }
    Ok(())
}

fn read_pin_file(path: &Path) -> Result<Pin, Pkcs11Error> {
    let err = |problem: String, fix: &str| Pkcs11Error::PinFile {
        path: path.to_path_buf(),
        problem,
        fix: fix.to_string(),
    };
    let file = std::fs::File::open(path).map_err(|e| {
        err(
            format!("cannot be read: {e}"),
            "check its owner and permissions",
        )
    })?;
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_PIN_FILE as usize));
    file.take(MAX_PIN_FILE)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot be read: {e}"), "check the file"))?;
    Pin::from_bytes(&bytes).map_err(|problem| {
        err(
            problem.to_string(),
            "write the token's user PIN on its first line",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret as _;
    use std::fs;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pin-{}-{name}", rand::random::<u64>()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(path: &Path, text: &str, mode: u32) {
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn pin_text_is_the_first_line() {
        for (raw, want) in [
            (&b"1234\n"[..], "1234"),
            (b"1234\r\n", "1234"),
            (b"12 34", "12 34"),
            (b"1234\nignored\n", "1234"),
        ] {
            assert_eq!(Pin::from_bytes(raw).unwrap().auth().expose_secret(), want);
        }
        assert_eq!(Pin::from_bytes(b"\n").unwrap_err(), "is empty");
        assert_eq!(Pin::from_bytes(b"").unwrap_err(), "is empty");
        assert_eq!(
            Pin::from_bytes(b"\xff\xfe").unwrap_err(),
            "is not UTF-8 text"
        );
    }

    #[test]
    fn pins_are_never_printed() {
        let pin = Pin::from_bytes(b"987654").unwrap();
        assert_eq!(format!("{pin:?}"), "Pin(REDACTED)");
        let src = PinSource::UriValue(pin);
        assert!(!format!("{src:?}").contains("987654"));
        assert!(!src.describe().contains("987654"));
        assert_eq!(src.read().unwrap().auth().expose_secret(), "987654");
    }

    #[test]
    fn pin_file_permissions_are_checked() {
        let d = tmp("perm");
        let p = d.join("pin");
        let me = current_euid();
        write(&p, "1234\n", 0o600);
        check_pin_file(&p, me).unwrap();
        let src = PinSource::ConfigFile(p.clone());
        assert_eq!(src.read().unwrap().auth().expose_secret(), "1234");
        write(&p, "1234\n", 0o400);
        check_pin_file(&p, me).unwrap();

        for mode in [0o640, 0o604, 0o660, 0o644, 0o610, 0o601] {
            write(&p, "1234\n", mode);
            let e = check_pin_file(&p, me).unwrap_err().to_string();
            assert!(e.contains(&format!("has mode {mode:04o}")), "{e}");
            assert!(e.contains(&format!("chmod 0600 {}", p.display())), "{e}");
            assert!(!e.contains("1234"), "{e}");
            assert!(src.read().is_err(), "a readable PIN file must not be used");
        }

        write(&p, "1234\n", 0o600);
        let e = check_pin_file(&p, me.wrapping_add(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("is owned by uid {me}")), "{e}");
        assert!(e.contains("chown"), "{e}");

        let e = check_pin_file(&d, me).unwrap_err().to_string();
        assert!(e.contains("is not a regular file"), "{e}");
        let e = check_pin_file(&d.join("missing"), me)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot be read") && e.contains("install -m 0600"),
            "{e}"
        );

        write(&p, "\n", 0o600);
        let e = src.read().unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn metadata_checks() {
        let p = Path::new("/etc/dps-agent/pkcs11-pin");
        check_pin_file_metadata(p, true, 0o100600, 7, 7).unwrap();
        check_pin_file_metadata(p, true, 0o100400, 7, 7).unwrap();
        assert!(check_pin_file_metadata(p, true, 0o100640, 7, 7).is_err());
        assert!(check_pin_file_metadata(p, true, 0o100600, 0, 7).is_err());
        assert!(check_pin_file_metadata(p, false, 0o040700, 7, 7).is_err());
    }

    #[test]
    fn sources_in_order() {
        let d = tmp("order");
        let cred = d.join(CREDENTIAL_NAME);
        let cfg = Path::new("/etc/dps-agent/pkcs11-pin");
        let pick = |v: Option<&[u8]>, s: Option<&str>, f: Option<&Path>, c: Option<&Path>| {
            PinSource::choose(v, s, f, c).unwrap().map(|s| s.describe())
        };
        assert_eq!(
            pick(None, None, None, Some(&d)),
            None,
            "no credential file yet"
        );
        write(&cred, "1111", 0o400);
        assert!(pick(None, None, None, Some(&d))
            .unwrap()
            .contains("systemd credential"));
        assert!(pick(None, None, Some(cfg), Some(&d))
            .unwrap()
            .contains("[pkcs11] pin_file"));
        assert!(pick(None, Some("file:/run/pin"), Some(cfg), Some(&d))
            .unwrap()
            .contains("pin-source /run/pin"));
        assert!(pick(Some(b"2222"), None, Some(cfg), Some(&d))
            .unwrap()
            .contains("pin-value"));
        assert!(pick(None, Some("/abs/pin"), None, None)
            .unwrap()
            .contains("/abs/pin"));
        let e = PinSource::choose(None, Some("|/usr/bin/ask-pin"), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("file:/absolute/path"), "{e}");
        let cred_src = PinSource::choose(None, None, None, Some(&d))
            .unwrap()
            .unwrap();
        assert_eq!(cred_src.read().unwrap().auth().expose_secret(), "1111");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn fingerprints_depend_on_pin_and_token() {
        let a = Pin::from_bytes(b"1234").unwrap();
        let b = Pin::from_bytes(b"1235").unwrap();
        assert_eq!(a.fingerprint(b"s", "t"), a.fingerprint(b"s", "t"));
        assert_ne!(a.fingerprint(b"s", "t"), b.fingerprint(b"s", "t"));
        assert_ne!(a.fingerprint(b"s", "t"), a.fingerprint(b"s", "u"));
        assert_ne!(a.fingerprint(b"s", "t"), a.fingerprint(b"r", "t"));
    }
}
