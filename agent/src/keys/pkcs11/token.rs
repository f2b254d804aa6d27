//! PKCS#11 modules, tokens and sessions. Owns three rules: a module is loaded
//! and `C_Initialize`d once per process (a second initialisation fails with
//! CKR_CRYPTOKI_ALREADY_INITIALIZED); a token is found by label or serial and
//! never by slot number (SoftHSM2 renumbers slots); and a PIN the token
//! rejected is never presented again by this process, so retries cannot lock
//! the token. A lost session (handle invalid or closed, device removed, login
//! gone) is re-opened and logged in once, then the operation is tried once
//! more. Sessions live behind a mutex: a cryptoki `Session` is not `Sync`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, SessionState as CkSessionState, UserType};
use cryptoki::slot::Slot;

use super::error::{describe, rv_of, Pkcs11Error, TokenList, TokenSummary};
use super::pin::PinSource;

/// A loaded, initialised module.
pub struct Module {
    /// The path as configured when the module was first loaded (for messages).
    path: PathBuf,
    /// The path with symlinks resolved: the module's identity.
    canonical: PathBuf,
    ctx: Pkcs11,
    /// Salt of the rejected-PIN fingerprints (random per process).
    salt: [u8; 16],
    /// Fingerprints of PINs a token of this module rejected.
    rejected: Mutex<Vec<[u8; 32]>>,
}

/// Every module this process loaded, by canonical path.
static MODULES: Mutex<Vec<Arc<Module>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; the
    // data stays consistent, so carry on with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Module {
    /// Loads and initialises the module at `path`, or returns the one this
    /// process already loaded.
    pub fn load(path: &Path) -> Result<Arc<Module>, Pkcs11Error> {
        let canonical = std::fs::canonicalize(path).map_err(|e| Pkcs11Error::ModuleLoad {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut modules = lock(&MODULES);
        if let Some(m) = modules.iter().find(|m| m.canonical == canonical) {
            return Ok(m.clone());
        }
        let ctx = Pkcs11::new(&canonical).map_err(|e| Pkcs11Error::ModuleLoad {
            path: path.to_path_buf(),
            reason: match e {
                CkError::LibraryLoading(l) => l.to_string(),
                other => other.to_string(),
            },
        })?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) => {}
            // Someone else in this process (a library we link) got there first.
            Err(e) if rv_of(&e) == Some(RvError::CryptokiAlreadyInitialized) => {}
            Err(e) => {
                return Err(Pkcs11Error::ModuleInit {
                    path: path.to_path_buf(),
                    code: describe(&e),
                    source: e,
                })
            }
        }
        let module = Arc::new(Module {
            path: path.to_path_buf(),
            canonical,
            ctx,
            salt: rand::random(),
            rejected: Mutex::new(Vec::new()),
        });
        modules.push(module.clone());
        Ok(module)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn ctx(&self) -> &Pkcs11 {
        &self.ctx
    }

    /// Every slot with a token, with what the token says about itself.
    pub fn tokens(&self) -> Result<Vec<(Slot, TokenSummary)>, Pkcs11Error> {
        let call = |action, e| Pkcs11Error::Token {
            token: "(any)".into(),
            action,
            code: describe(&e),
            source: e,
        };
        let slots = self
            .ctx
            .get_slots_with_token()
            .map_err(|e| call("list the slots", e))?;
        let mut out = Vec::new();
        for slot in slots {
            let info = match self.ctx.get_token_info(slot) {
                Ok(i) => i,
                // The token went away between the two calls.
                Err(e) if rv_of(&e) == Some(RvError::TokenNotPresent) => continue,
                Err(e) => return Err(call("read the token information", e)),
            };
            let slot_info = self
                .ctx
                .get_slot_info(slot)
                .map_err(|e| call("read the slot information", e))?;
            out.push((
                slot,
                TokenSummary {
                    label: info.label().trim_end().to_string(),
                    serial: info.serial_number().trim_end().to_string(),
                    manufacturer: info.manufacturer_id().trim_end().to_string(),
                    model: info.model().trim_end().to_string(),
                    slot_id: slot.id(),
                    slot_description: slot_info.slot_description().trim_end().to_string(),
                    slot_manufacturer: slot_info.manufacturer_id().trim_end().to_string(),
                    initialized: info.token_initialized(),
                },
            ));
        }
        Ok(out)
    }
}

/// Which token a store uses: what the key URI or `[pkcs11]` says about it.
/// Every attribute given must match; a label or a serial is required.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenFilter {
    pub label: Option<String>,
    pub serial: Option<String>,
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    pub slot_id: Option<u64>,
    pub slot_description: Option<String>,
    pub slot_manufacturer: Option<String>,
}

impl TokenFilter {
    /// Whether the filter names one token (by label or serial).
    pub fn names_token(&self) -> bool {
        self.label.is_some() || self.serial.is_some()
    }

    pub fn matches(&self, t: &TokenSummary) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        t.initialized
            && eq(&self.label, &t.label)
            && eq(&self.serial, &t.serial)
            && eq(&self.manufacturer, &t.manufacturer)
            && eq(&self.model, &t.model)
            && eq(&self.slot_description, &t.slot_description)
            && eq(&self.slot_manufacturer, &t.slot_manufacturer)
            && self.slot_id.is_none_or(|id| id == t.slot_id)
    }

    /// "label \"x\", serial \"y\"" for messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut add = |name: &str, v: &Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{name} {v:?}"));
            }
        };
        add("label", &self.label);
        add("serial", &self.serial);
        add("manufacturer", &self.manufacturer);
        add("model", &self.model);
        add("slot description", &self.slot_description);
        add("slot manufacturer", &self.slot_manufacturer);
        if let Some(id) = self.slot_id {
            parts.push(format!("slot id {id}"));
        }
        parts.join(", ")
    }

    /// The one token this filter selects among `tokens`.
    pub fn select(
        &self,
        module: &Path,
        tokens: &[(Slot, TokenSummary)],
    ) -> Result<(Slot, TokenSummary), Pkcs11Error> {
        let list = || TokenList(tokens.iter().map(|(_, t)| t.clone()).collect());
        if !self.names_token() {
            return Err(Pkcs11Error::NoTokenNamed { tokens: list() });
        }
        let found: Vec<&(Slot, TokenSummary)> =
            tokens.iter().filter(|(_, t)| self.matches(t)).collect();
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(Pkcs11Error::TokenNotFound {
                wanted: self.describe(),
                module: module.to_path_buf(),
                tokens: list(),
            }),
            many => Err(Pkcs11Error::TokenAmbiguous {
                wanted: self.describe(),
                count: many.len(),
                module: module.to_path_buf(),
                tokens: list(),
            }),
        }
    }
}

/// One token, with its logged-in session.
pub struct Token {
    module: Arc<Module>,
    filter: TokenFilter,
    summary: TokenSummary,
    pin: Option<PinSource>,
    /// Whether the token wants a login (learnt at the first login).
    needs_login: AtomicBool,
    state: Mutex<SessionState>,
}

struct SessionState {
    slot: Slot,
    session: Option<Session>,
    /// Counts the sessions opened, so cached object handles can be dropped
    /// when the session changes.
    generation: u64,
}

impl Token {
    /// The token `filter` selected (see [`TokenFilter::select`]). Does not
    /// log in yet.
    pub fn new(
        module: Arc<Module>,
        filter: TokenFilter,
        (slot, summary): (Slot, TokenSummary),
        pin: Option<PinSource>,
    ) -> Token {
        Token {
            module,
            filter,
            summary,
            pin,
            needs_login: AtomicBool::new(false),
            state: Mutex::new(SessionState {
                slot,
                session: None,
                generation: 0,
            }),
        }
    }

    pub fn summary(&self) -> &TokenSummary {
        &self.summary
    }

    pub fn module(&self) -> &Arc<Module> {
        &self.module
    }

    /// The token's name in messages: its label, quoted.
    pub fn name(&self) -> String {
        format!("{:?}", self.summary.label)
    }

    /// Runs `op` on the logged-in session, opening and logging in first when
    /// needed. If the session turns out to be lost, a new one is opened and
    /// logged in, and `op` runs once more; a second loss is reported as
    /// [`Pkcs11Error::SessionLost`]. `op` gets the session and its generation.
    pub fn with_session<T, E: TokenError>(
        &self,
        action: &'static str,
        mut op: impl FnMut(&Session, u64) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut st = lock(&self.state);
        match self.run(&mut st, &mut op) {
            Err(e) => match e.lost_session() {
                Some(code) => {
                    log::warn!(
                        "the PKCS#11 session with token {} was lost ({code}); opening a new session and logging in again",
                        self.name(),
                    );
                    st.session = None;
                    self.run(&mut st, &mut op)
                        .map_err(|e| match e.lost_session() {
                            Some(code) => E::from(Pkcs11Error::SessionLost {
                                token: self.name(),
                                action,
                                code,
                                module: self.module.path().to_path_buf(),
                            }),
                            None => e,
                        })
                }
                None => Err(e),
            },
            ok => ok,
        }
    }

    fn run<T, E: TokenError>(
        &self,
        st: &mut SessionState,
        op: &mut impl FnMut(&Session, u64) -> Result<T, E>,
    ) -> Result<T, E> {
        if st.session.as_ref().is_some_and(|s| self.login_lost(s)) {
            // Someone logged the token out (all sessions share one login),
            // and SoftHSM2, for one, then drops the private objects' handles.
            log::warn!(
                "the PKCS#11 login to token {} was lost; opening a new session and logging in again",
                self.name()
            );
            st.session = None;
        }
        if st.session.is_none() {
            self.open_session(st)?;
        }
        match st.session.as_ref() {
            Some(session) => op(session, st.generation),
            None => Err(E::from(self.call("open a session")(CkError::Pkcs11(
                RvError::SessionHandleInvalid,
                cryptoki::context::Function::OpenSession,
            )))),
        }
    }

    fn open_session(&self, st: &mut SessionState) -> Result<(), Pkcs11Error> {
        if st.generation > 0 {
            // A token that was removed and put back may sit in another slot.
            let (slot, _) = self
                .filter
                .select(self.module.path(), &self.module.tokens()?)?;
            st.slot = slot;
        }
        let session = self
            .module
            .ctx()
            .open_rw_session(st.slot)
            .map_err(self.call("open a session"))?;
        self.login(st.slot, &session)?;
        st.session = Some(session);
        st.generation += 1;
        Ok(())
    }

    /// Logs the session in, unless the token needs no login. A PIN this
    /// process saw rejected is not presented again.
    fn login(&self, slot: Slot, session: &Session) -> Result<(), Pkcs11Error> {
        let info = self
            .module
            .ctx()
            .get_token_info(slot)
            .map_err(self.call("read the token information"))?;
        self.needs_login
            .store(info.login_required(), std::sync::atomic::Ordering::Relaxed);
        if !info.login_required() {
            return Ok(());
        }
        let describe_source = || {
            self.pin
                .as_ref()
                .map(|p| p.describe())
                .unwrap_or_else(|| "the PIN source".into())
        };
        if info.user_pin_locked() {
            return Err(Pkcs11Error::PinLocked {
                token: self.name(),
                module: self.module.path().to_path_buf(),
                pin_source: describe_source(),
            });
        }
        let Some(source) = &self.pin else {
            if info.protected_authentication_path() {
                // A PIN pad: the token asks for the PIN itself.
                return match session.login(UserType::User, None) {
                    Ok(()) => Ok(()),
                    Err(e) if rv_of(&e) == Some(RvError::UserAlreadyLoggedIn) => Ok(()),
                    Err(e) => Err(self.call("log in")(e)),
                };
            }
            return Err(Pkcs11Error::NoPin { token: self.name() });
        };
        let pin = source.read()?;
        let fingerprint = pin.fingerprint(&self.module.salt, &self.summary.serial);
        if lock(&self.module.rejected).contains(&fingerprint) {
            return Err(Pkcs11Error::PinRejectedBefore {
                token: self.name(),
                pin_source: source.describe(),
            });
        }
        match session.login(UserType::User, Some(pin.auth())) {
            Ok(()) => Ok(()),
            Err(e) => match rv_of(&e) {
                Some(RvError::UserAlreadyLoggedIn) => Ok(()),
                Some(RvError::PinIncorrect) => {
                    lock(&self.module.rejected).push(fingerprint);
                    let hint = match self.module.ctx().get_token_info(slot) {
                        Ok(i) if i.user_pin_final_try() => {
                            "; the token says the next wrong PIN locks it"
                        }
                        Ok(i) if i.user_pin_count_low() => "; the token says few tries are left",
                        _ => "",
                    };
                    Err(Pkcs11Error::PinIncorrect {
                        token: self.name(),
                        pin_source: source.describe(),
                        hint,
                    })
                }
                Some(RvError::PinLocked) => Err(Pkcs11Error::PinLocked {
                    token: self.name(),
                    module: self.module.path().to_path_buf(),
                    pin_source: source.describe(),
                }),
                _ => Err(self.call("log in")(e)),
            },
        }
    }

    /// Whether a session that was logged in has lost its login.
    fn login_lost(&self, s: &Session) -> bool {
        self.needs_login.load(std::sync::atomic::Ordering::Relaxed)
            && matches!(
                s.get_session_info().map(|i| i.session_state()),
                Ok(CkSessionState::RoPublic | CkSessionState::RwPublic)
            )
    }

    /// Maps a failed call to an error naming this token.
    pub fn call(&self, action: &'static str) -> impl Fn(CkError) -> Pkcs11Error + '_ {
        move |e| Pkcs11Error::from_call(&self.name(), action, e)
    }

    /// Test hook: the session currently held, if any, is logged out through
    /// another session (login state is shared by all sessions of a token).
    #[cfg(test)]
    pub fn slot(&self) -> Slot {
        lock(&self.state).slot
    }

    #[cfg(test)]
    pub fn log_out_behind_our_back(&self) {
        let st = lock(&self.state);
        if let Ok(other) = self.module.ctx().open_ro_session(st.slot) {
            let _ = other.logout();
        }
    }
}

/// Errors that `with_session` can tell a lost session from.
pub trait TokenError: From<Pkcs11Error> {
    /// The `CKR_…` code, if this error means the session or its login is gone.
    fn lost_session(&self) -> Option<String>;
}

impl TokenError for Pkcs11Error {
    fn lost_session(&self) -> Option<String> {
        match self {
            Pkcs11Error::Token { code, .. } if self.is_session_lost() => Some(code.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(label: &str, serial: &str, initialized: bool) -> TokenSummary {
        TokenSummary {
            label: label.into(),
            serial: serial.into(),
            manufacturer: "M".into(),
            model: "X".into(),
            slot_id: serial.len() as u64,
            slot_description: "S".into(),
            slot_manufacturer: "SM".into(),
            initialized,
        }
    }

    #[test]
    fn filters_select_by_label_or_serial_only() {
        let tokens = vec![
            (Slot::try_from(1u64).unwrap(), t("a", "1", true)),
            (Slot::try_from(2u64).unwrap(), t("b", "22", true)),
            (Slot::try_from(3u64).unwrap(), t("b", "333", true)),
            (Slot::try_from(4u64).unwrap(), t("", "", false)),
        ];
        let m = Path::new("/m.so");
        let f = |label: Option<&str>, serial: Option<&str>| TokenFilter {
            label: label.map(str::to_string),
            serial: serial.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(f(Some("a"), None).select(m, &tokens).unwrap().1.serial, "1");
        assert_eq!(
            f(None, Some("333")).select(m, &tokens).unwrap().1.serial,
            "333"
        );
        assert_eq!(
            f(Some("b"), Some("22"))
                .select(m, &tokens)
                .unwrap()
                .1
                .serial,
            "22"
        );

        let e = f(Some("b"), None)
            .select(m, &tokens)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("2 tokens match label \"b\"") && e.contains("token_serial"),
            "{e}"
        );
        let e = f(Some("zz"), None)
            .select(m, &tokens)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no token with label \"zz\" in the PKCS#11 module /m.so"),
            "{e}"
        );
        assert!(
            e.contains("label \"a\" (serial \"1\"") && e.contains("uninitialised token"),
            "{e}"
        );
        let e = f(None, None).select(m, &tokens).unwrap_err().to_string();
        assert!(
            e.contains("no token is named") && e.contains("label \"b\""),
            "{e}"
        );
        let e = f(Some("a"), Some("22"))
            .select(m, &tokens)
            .unwrap_err()
            .to_string();
        assert!(e.contains("label \"a\", serial \"22\""), "{e}");
        // Extra attributes must match too.
        let mut g = f(Some("a"), None);
        g.model = Some("Y".into());
        assert!(g.select(m, &tokens).is_err());
        g.model = Some("X".into());
        g.slot_id = Some(1);
        assert!(g.select(m, &tokens).is_ok());
    }

    #[test]
    fn a_missing_module_is_named() {
        let e = Module::load(Path::new("/nonexistent/libnothing.so"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("cannot load the PKCS#11 module /nonexistent/libnothing.so"),
            "{e}"
        );
        assert!(e.contains("[pkcs11] module"), "{e}");
        // A file that is not a shared library: dlopen's own message is shown.
        let p = std::env::temp_dir().join(format!("notalib-{}.so", rand::random::<u64>()));
        std::fs::write(&p, "not an ELF file").unwrap();
        let e = Module::load(&p).err().unwrap().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(
            e.contains("file too short") || e.contains("invalid ELF header"),
            "{e}"
        );
        std::fs::remove_file(&p).unwrap();
    }
}
