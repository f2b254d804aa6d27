//! Errors of the TPM backend, each with the fix in its message, and the mapping
//! from TSS2 response codes (tss-esapi errors) to them. Never retries or decides:
//! it only names what went wrong.

use std::fmt;
use std::path::{Path, PathBuf};

use tss_esapi::constants::response_code::{Tss2ResponseCode, Tss2ResponseCodeKind};

/// What went wrong in the TPM backend.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("[tpm] tcti = {tcti:?} is not valid: use \"device:/dev/tpmrm0\", \"tabrmd:\" or \"swtpm:host=127.0.0.1,port=2321\"")]
    BadTcti { tcti: String },

    #[error("no TPM at {}: the device does not exist; check that the machine has a TPM 2.0 that is enabled in the firmware and that its driver is loaded (ls /dev/tpm*), or point [tpm] tcti at the TPM it has (\"device:/dev/tpm0\", \"tabrmd:\", or a simulator: \"swtpm:host=127.0.0.1,port=2321\")", path.display())]
    NoDevice { path: PathBuf },

    #[error("permission denied opening {}: add the user that runs dps-agent to group `tss` (usermod -aG tss USER, then log in again; the dps-agent service user is in that group)", path.display())]
    PermissionDenied { path: PathBuf },

    #[error("{} is in use by another program (the raw TPM device allows one user): set [tpm] tcti = \"device:/dev/tpmrm0\" (kernel resource manager) or \"tabrmd:\"", path.display())]
    DeviceBusy { path: PathBuf },

    #[error("cannot open {}: {source}", path.display())]
    DeviceIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the TPM access library {library} for [tpm] tcti = {tcti:?} is not installed: apt-get install {package}")]
    TctiMissing {
        tcti: String,
        library: String,
        package: String,
    },

    #[error("cannot reach the TPM through [tpm] tcti = {tcti:?} ({code}): {hint}")]
    Connect {
        tcti: String,
        code: RcCode,
        hint: String,
    },

    #[error("the TPM is in dictionary-attack lockout (TPM_RC_LOCKOUT) while {action}: wait until the lockout time has passed (tpm2_getcap properties-variable shows TPM2_PT_LOCKOUT_*), or clear it with the lockout authorization: tpm2_dictionarylockout --clear-lockout")]
    Lockout { action: String },

    #[error("the TPM is in failure mode ({code}) while {action}: restart the machine (a TPM reset); if that does not help, tpm2_gettestresult shows why, and the TPM needs a firmware update or replacement")]
    FailureMode { action: String, code: RcCode },

    #[error("{} can no longer be used with this TPM: {reason}; it was made by another TPM, or this TPM was cleared since, so the key is lost. Delete the file and make a new key (operational keys: dps-agent makes one when it provisions again; a bootstrap key also needs a new certificate from your CA)", path.display())]
    KeyLost { path: PathBuf, reason: String },

    #[error("this TPM does not support {wanted} (it offers {offered}): {fix}")]
    CurveMissing {
        wanted: &'static str,
        offered: String,
        fix: String,
    },

    #[error("the TPM key {key} cannot be used: {reason}")]
    Unsuitable { key: String, reason: String },

    #[error("TPM error while {action}: {detail} ({code})")]
    Command {
        action: String,
        detail: String,
        code: RcCode,
    },

    #[error(
        "the TPM worker thread has stopped (an earlier TPM call failed badly); restart dps-agent"
    )]
    WorkerGone,

    #[error("cannot start the TPM worker thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// A TSS2 return code, shown as hex with its layer (TPM, TCTI, ESYS, …) so a
/// user can look it up (`tpm2_rc_decode 0x…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RcCode(pub u32);

impl fmt::Display for RcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layer = match self.0 >> 16 {
            0 => "TPM",
            5 => "MU",
            6 => "SYS",
            7 => "ESYS",
            10 => "TCTI",
            11 => "TCTI",
            _ => "TSS",
        };
        write!(f, "{layer} rc 0x{:x}", self.0)
    }
}

/// Base code of TSS2_TCTI_RC_NOT_SUPPORTED: the TCTI loader found no library.
const TSS2_BASE_RC_NOT_SUPPORTED: u32 = 21;
/// Layer of the TCTI loader / TCTIs.
const TCTI_LAYER: u32 = 10;

/// The raw TSS2_RC of a tss-esapi error. tss-esapi 7.7 keeps it private; its
/// `Display` of the format-zero/one wrappers prints it as "Response code value: 0x…".
pub fn raw_rc(e: &tss_esapi::Error) -> Option<u32> {
    let text = match e {
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::FormatZero(rc)) => rc.to_string(),
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::FormatOne(rc)) => rc.to_string(),
        _ => return None,
    };
    let hex = text.rsplit("0x").next()?;
    u32::from_str_radix(hex.trim(), 16).ok()
}

/// The TPM-layer kind of an error, if it came from the TPM itself.
pub fn tpm_kind(e: &tss_esapi::Error) -> Option<Tss2ResponseCodeKind> {
    match e {
        tss_esapi::Error::Tss2Error(rc) if raw_rc(e).is_some_and(|r| r >> 16 == 0) => rc.kind(),
        _ => None,
    }
}

/// Maps a failed TPM command to an error; `action` says what was being done
/// ("signing with tpm:/…").
pub fn command_error(action: &str, e: tss_esapi::Error) -> TpmError {
    let code = RcCode(raw_rc(&e).unwrap_or(0));
    match tpm_kind(&e) {
        Some(Tss2ResponseCodeKind::Lockout) => TpmError::Lockout {
            action: action.to_string(),
        },
        Some(Tss2ResponseCodeKind::Failure) => TpmError::FailureMode {
            action: action.to_string(),
            code,
        },
        _ => TpmError::Command {
            action: action.to_string(),
            detail: e.to_string(),
            code,
        },
    }
}

/// Whether a Load failure means the blob does not belong to this TPM (any more):
/// the parent's seed changed (TPM clear, other TPM) so the integrity HMAC or the
/// public/private binding fails.
pub fn is_foreign_blob(e: &tss_esapi::Error) -> bool {
    matches!(
        tpm_kind(e),
        Some(
            Tss2ResponseCodeKind::Integrity
                | Tss2ResponseCodeKind::Binding
                | Tss2ResponseCodeKind::Sensitive
                | Tss2ResponseCodeKind::Size
                | Tss2ResponseCodeKind::Key
        )
    )
}

/// The TCTI module name of a config string (`device:/dev/tpmrm0` → `device`).
pub fn tcti_module(tcti: &str) -> &str {
    tcti.split_once(':').map_or(tcti, |(m, _)| m)
}

/// Explains why the TCTI could not be set up. `device_check` is the result of
/// opening the device node ourselves (for `device:` TCTIs).
pub fn tcti_init_error(
    tcti: &str,
    e: &tss_esapi::Error,
    device_check: Option<(&Path, std::io::Result<()>)>,
) -> TpmError {
    let module = tcti_module(tcti);
    if let Some((path, Err(io))) = device_check {
        let path = path.to_path_buf();
        return match io.kind() {
            std::io::ErrorKind::NotFound => TpmError::NoDevice { path },
            std::io::ErrorKind::PermissionDenied => TpmError::PermissionDenied { path },
            _ if io.raw_os_error() == Some(16) => TpmError::DeviceBusy { path }, // EBUSY
            _ => TpmError::DeviceIo { path, source: io },
        };
    }
    let rc = raw_rc(e).unwrap_or(0);
    if rc == (TCTI_LAYER << 16 | TSS2_BASE_RC_NOT_SUPPORTED) {
        let (library, package) = tcti_library(module);
        return TpmError::TctiMissing {
            tcti: tcti.to_string(),
            library,
            package,
        };
    }
    let hint = match module {
        "swtpm" | "mssim" => {
            "nothing answers at that host and port; is the simulator running (swtpm socket --tpm2 --server type=tcp,port=N --ctrl type=tcp,port=N+1 …)?".to_string()
        }
        "tabrmd" => "is tpm2-abrmd running (systemctl status tpm2-abrmd)? Or use \"device:/dev/tpmrm0\"".to_string(),
        "device" => "the device node exists but the TPM does not answer; check dmesg for TPM driver errors".to_string(),
        _ => format!("{e}"),
    };
    TpmError::Connect {
        tcti: tcti.to_string(),
        code: RcCode(rc),
        hint,
    }
}

/// The shared library the TCTI loader looks for, and the Debian package with it.
pub fn tcti_library(module: &str) -> (String, String) {
    (
        format!("libtss2-tcti-{module}.so.0"),
        format!("libtss2-tcti-{module}0"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(code: u32) -> tss_esapi::Error {
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(code))
    }

    #[test]
    fn raw_codes_survive() {
        assert_eq!(raw_rc(&rc(0x921)), Some(0x921));
        assert_eq!(raw_rc(&rc(0x1DF)), Some(0x1DF));
        assert_eq!(raw_rc(&rc(0xA0015)), Some(0xA0015));
        assert_eq!(RcCode(0xA000A).to_string(), "TCTI rc 0xa000a");
        assert_eq!(RcCode(0x921).to_string(), "TPM rc 0x921");
    }

    #[test]
    fn lockout_and_failure_mode_name_the_fix() {
        let e = command_error("signing with tpm:handle=0x81000101", rc(0x921));
        assert!(matches!(e, TpmError::Lockout { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("tpm2_dictionarylockout --clear-lockout"),
            "{e}"
        );
        let e = command_error("making a key", rc(0x101));
        assert!(matches!(e, TpmError::FailureMode { .. }), "{e:?}");
        assert!(e.to_string().contains("restart the machine"), "{e}");
        // A TCTI-layer code with the same low bits is not a TPM failure.
        let e = command_error("making a key", rc(0xA0001));
        assert!(matches!(e, TpmError::Command { .. }), "{e:?}");
    }

    #[test]
    fn foreign_blobs_are_recognised() {
        // TPM_RC_INTEGRITY for parameter 1 (what Load returns after a TPM clear).
        assert!(is_foreign_blob(&rc(0x1DF)));
        assert!(!is_foreign_blob(&rc(0x921)));
        assert!(!is_foreign_blob(&rc(0xA000A)));
    }

    #[test]
    fn tcti_setup_errors() {
        let io = |kind| Err(std::io::Error::from(kind));
        let p = Path::new("/dev/tpmrm0");
        let e = tcti_init_error(
            "device:/dev/tpmrm0",
            &rc(0xA000A),
            Some((p, io(std::io::ErrorKind::PermissionDenied))),
        );
        assert!(e.to_string().contains("group `tss`"), "{e}");
        let e = tcti_init_error(
            "device:/dev/tpmrm0",
            &rc(0xA000A),
            Some((p, io(std::io::ErrorKind::NotFound))),
        );
        assert!(e.to_string().starts_with("no TPM at /dev/tpmrm0"), "{e}");
        let e = tcti_init_error("swtpm:port=1", &rc(0xA0015), None);
        assert!(
            e.to_string()
                .contains("apt-get install libtss2-tcti-swtpm0"),
            "{e}"
        );
        let e = tcti_init_error("swtpm:port=1", &rc(0xA000A), None);
        assert!(e.to_string().contains("is the simulator running"), "{e}");
    }
}
