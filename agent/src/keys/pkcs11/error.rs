//! The errors of the PKCS#11 backend. Each names the cause (module path, token,
//! key URI with any PIN removed, the `CKR_…` code) and what to do about it.
//! Nothing here ever holds or prints a PIN.

use std::fmt;
use std::path::PathBuf;

use cryptoki::error::{Error as CkError, RvError};

/// A token as seen in a slot, for messages and lookups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSummary {
    pub label: String,
    pub serial: String,
    pub manufacturer: String,
    pub model: String,
    pub slot_id: u64,
    pub slot_description: String,
    pub slot_manufacturer: String,
    pub initialized: bool,
}

impl fmt::Display for TokenSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.initialized {
            write!(
                f,
                "label {:?} (serial {:?}, model {:?})",
                self.label, self.serial, self.model
            )
        } else {
            write!(
                f,
                "an uninitialised token in slot {:?}",
                self.slot_description
            )
        }
    }
}

/// The tokens a module shows, rendered as "tokens present: …".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenList(pub Vec<TokenSummary>);

impl fmt::Display for TokenList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(
                "the module shows no tokens at all (for SoftHSM2: softhsm2-util --init-token --free --label LABEL)",
            );
        }
        f.write_str("tokens present: ")?;
        for (i, t) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

/// `CKR_PIN_INCORRECT` for `RvError::PinIncorrect`, and so on.
pub fn ckr_name(rv: RvError) -> String {
    let debug = format!("{rv:?}");
    let mut out = String::from("CKR");
    for c in debug.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_uppercase());
        }
    }
    out
}

/// The `CKR_…` code of a cryptoki error, or its text.
pub fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("{function:?}: {}", ckr_name(*rv)),
        other => other.to_string(),
    }
}

/// The return value of a failed PKCS#11 call.
pub fn rv_of(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Whether an error means the session (or its login) is gone, so a fresh
/// session and a new login may work: the session handle is invalid or
/// closed, the token was removed and put back, or the login was lost.
pub fn is_session_lost(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceRemoved
            | RvError::UserNotLoggedIn
    )
}

/// Errors of the PKCS#11 backend.
#[derive(Debug, thiserror::Error)]
pub enum Pkcs11Error {
    #[error("no PKCS#11 module is configured; set [pkcs11] module (e.g. \"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so\") or add module-path=… to the key URI")]
    NoModule,
    #[error("cannot load the PKCS#11 module {}: {reason}; check [pkcs11] module: is the path right and the token's package installed (SoftHSM2: apt install softhsm2)?", path.display())]
    ModuleLoad { path: PathBuf, reason: String },
    #[error("the PKCS#11 module {} failed to start ({code}); check its own configuration (SoftHSM2: SOFTHSM2_CONF and its tokendir)", path.display())]
    ModuleInit {
        path: PathBuf,
        code: String,
        #[source]
        source: CkError,
    },
    #[error("no token is named in [pkcs11] or in the key URI; set [pkcs11] token_label (or token_serial) or add token=… to the URI; {tokens}")]
    NoTokenNamed { tokens: TokenList },
    #[error("no token with {wanted} in the PKCS#11 module {}; {tokens}; fix [pkcs11] token_label/token_serial or the key URI", module.display())]
    TokenNotFound {
        wanted: String,
        module: PathBuf,
        tokens: TokenList,
    },
    #[error("{count} tokens match {wanted} in the PKCS#11 module {}; name one by serial ([pkcs11] token_serial, or serial=… in the key URI); {tokens}", module.display())]
    TokenAmbiguous {
        wanted: String,
        count: usize,
        module: PathBuf,
        tokens: TokenList,
    },
    #[error("token {token} needs a PIN and none is configured; set [pkcs11] pin_file (mode 0600, owned by the daemon's user) or pass the systemd credential pkcs11-pin (LoadCredential=pkcs11-pin:/etc/dps-agent/pkcs11-pin)")]
    NoPin { token: String },
    #[error("PIN file {}: {problem}; {fix}", path.display())]
    PinFile {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    #[error("the key URI's pin-value {problem}")]
    PinValue { problem: &'static str },
    #[error("the key URI's pin-source {value:?} is not supported; use pin-source=file:/absolute/path (or [pkcs11] pin_file)")]
    PinSourceUnsupported { value: String },
    #[error("token {token} rejected the PIN from {pin_source} (CKR_PIN_INCORRECT){hint}; dps-agent never presents a rejected PIN again, so its retries cannot lock the token; put the token's user PIN into {pin_source}: the next attempt reads it again (or restart dps-agent)")]
    PinIncorrect {
        token: String,
        pin_source: String,
        hint: &'static str,
    },
    #[error("token {token} already rejected the PIN from {pin_source}; it is not presented again so the token does not lock; put the right PIN into {pin_source}: the next attempt reads it again")]
    PinRejectedBefore { token: String, pin_source: String },
    #[error("the user PIN of token {token} is locked (CKR_PIN_LOCKED) after too many wrong PINs; unlock it with the SO PIN (e.g. pkcs11-tool --module {} --token-label {token:?} --login --login-type so --init-pin), then check {pin_source}", module.display())]
    PinLocked {
        token: String,
        module: PathBuf,
        pin_source: String,
    },
    #[error("token {token} does not support {what} ({code}); {fix}")]
    Unsupported {
        token: String,
        what: String,
        code: String,
        fix: &'static str,
    },
    #[error("the session with token {token} was lost ({code}), and {action} failed again on a new session; check that the token is present: pkcs11-tool --module {} --list-slots", module.display())]
    SessionLost {
        token: String,
        action: &'static str,
        code: String,
        module: PathBuf,
    },
    #[error("token {token}: {action} failed ({code})")]
    Token {
        token: String,
        action: &'static str,
        code: String,
        #[source]
        source: CkError,
    },
    #[error("key {uri}: {count} private keys match; add id=… to the URI to pick one")]
    AmbiguousKey { uri: String, count: usize },
    #[error("key {uri}: {reason}")]
    BadKey { uri: String, reason: String },
    #[error("token {token} already holds a private key labelled {label:?}; choose another label, or delete that key first (pkcs11-tool --module {} --token-label {token:?} --login --delete-object --type privkey --label {label:?})", module.display())]
    LabelTaken {
        token: String,
        label: String,
        module: PathBuf,
    },
}

impl Pkcs11Error {
    /// A failed call on a token, with the common cases turned into the
    /// errors that explain them.
    pub fn from_call(token: &str, action: &'static str, e: CkError) -> Pkcs11Error {
        let code = describe(&e);
        match rv_of(&e) {
            Some(RvError::MechanismInvalid) | Some(RvError::MechanismParamInvalid) => {
                Pkcs11Error::Unsupported {
                    token: token.to_string(),
                    what: format!("the mechanism needed to {action}"),
                    code,
                    fix: "use a token that offers CKM_EC_KEY_PAIR_GEN and CKM_ECDSA (pkcs11-tool --list-mechanisms shows them)",
                }
            }
            Some(RvError::CurveNotSupported) | Some(RvError::DomainParamsInvalid) => {
                Pkcs11Error::Unsupported {
                    token: token.to_string(),
                    what: "this elliptic curve".to_string(),
                    code,
                    fix: "set [operational] key_algorithm to the other curve (\"ecdsa-p256\" or \"ecdsa-p384\")",
                }
            }
            _ => Pkcs11Error::Token {
                token: token.to_string(),
                action,
                code,
                source: e,
            },
        }
    }

    /// Whether a new session and login may cure this error.
    pub fn is_session_lost(&self) -> bool {
        matches!(self, Pkcs11Error::Token { source, .. } if rv_of(source).is_some_and(is_session_lost))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    fn token(label: &str, serial: &str) -> TokenSummary {
        TokenSummary {
            label: label.into(),
            serial: serial.into(),
            manufacturer: "SoftHSM project".into(),
            model: "SoftHSM v2".into(),
            slot_id: 7,
            slot_description: "SoftHSM slot ID 0x7".into(),
            slot_manufacturer: "SoftHSM project".into(),
            initialized: true,
        }
    }

    #[test]
    fn ckr_names() {
        assert_eq!(ckr_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(
            ckr_name(RvError::SessionHandleInvalid),
            "CKR_SESSION_HANDLE_INVALID"
        );
        assert_eq!(ckr_name(RvError::DeviceRemoved), "CKR_DEVICE_REMOVED");
        let e = CkError::Pkcs11(RvError::PinLocked, Function::Login);
        assert_eq!(describe(&e), "Login: CKR_PIN_LOCKED");
    }

    #[test]
    fn token_not_found_lists_the_tokens_that_exist() {
        let e = Pkcs11Error::TokenNotFound {
            wanted: "label \"dps\"".into(),
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            tokens: TokenList(vec![token("a", "0011"), token("b", "0022")]),
        }
        .to_string();
        assert!(
            e.contains(
                "no token with label \"dps\" in the PKCS#11 module /usr/lib/softhsm/libsofthsm2.so"
            ),
            "{e}"
        );
        assert!(e.contains("tokens present: label \"a\" (serial \"0011\", model \"SoftHSM v2\"); label \"b\" (serial \"0022\""), "{e}");
        assert!(e.contains("token_label"), "{e}");
        let none = TokenList::default().to_string();
        assert!(
            none.contains("no tokens at all") && none.contains("--init-token"),
            "{none}"
        );
    }

    #[test]
    fn session_loss_is_recognised() {
        for rv in [
            RvError::SessionHandleInvalid,
            RvError::SessionClosed,
            RvError::DeviceRemoved,
            RvError::UserNotLoggedIn,
        ] {
            let e = Pkcs11Error::from_call("t", "sign", CkError::Pkcs11(rv, Function::Sign));
            assert!(e.is_session_lost(), "{rv:?}");
        }
        for rv in [
            RvError::PinIncorrect,
            RvError::KeyHandleInvalid,
            RvError::GeneralError,
        ] {
            let e = Pkcs11Error::from_call("t", "sign", CkError::Pkcs11(rv, Function::Sign));
            assert!(!e.is_session_lost(), "{rv:?}");
        }
    }

    #[test]
    fn unsupported_mechanisms_and_curves_say_so() {
        let e = Pkcs11Error::from_call(
            "t",
            "make a key pair",
            CkError::Pkcs11(RvError::MechanismInvalid, Function::GenerateKeyPair),
        )
        .to_string();
        assert!(
            e.contains("does not support the mechanism needed to make a key pair"),
            "{e}"
        );
        assert!(
            e.contains("CKR_MECHANISM_INVALID") && e.contains("CKM_EC_KEY_PAIR_GEN"),
            "{e}"
        );
        let e = Pkcs11Error::from_call(
            "t",
            "make a key pair",
            CkError::Pkcs11(RvError::CurveNotSupported, Function::GenerateKeyPair),
        )
        .to_string();
        assert!(e.contains("key_algorithm"), "{e}");
    }

    #[test]
    fn pin_errors_explain_the_fix() {
        let e = Pkcs11Error::PinIncorrect {
            token: "\"dps\"".into(),
            pin_source: "[pkcs11] pin_file /etc/dps-agent/pkcs11-pin".into(),
            hint: "",
        }
        .to_string();
        assert!(
            e.contains("CKR_PIN_INCORRECT") && e.contains("never presents a rejected PIN again"),
            "{e}"
        );
        let e = Pkcs11Error::PinLocked {
            token: "dps".into(),
            module: "/m.so".into(),
            pin_source: "x".into(),
        }
        .to_string();
        assert!(
            e.contains("CKR_PIN_LOCKED") && e.contains("--login-type so --init-pin"),
            "{e}"
        );
        let e = Pkcs11Error::ModuleLoad {
            path: "/nope/libx.so".into(),
            reason: "cannot open shared object file".into(),
        }
        .to_string();
        assert!(
            e.contains("/nope/libx.so") && e.contains("[pkcs11] module"),
            "{e}"
        );
    }
}
