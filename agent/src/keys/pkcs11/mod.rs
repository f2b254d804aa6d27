//! The `pkcs11` key backend (cryptoki): keys made and used inside a PKCS#11
//! token such as an HSM, a smart card or SoftHSM2, named by RFC 7512 URIs
//! (`pkcs11:token=…;object=…;id=%…;type=private`).
//!
//! Key pairs are generated in the token (EC P-256/P-384, the private half
//! sensitive and never extractable, see `template`), each with CKA_LABEL = its
//! name and a CKA_ID of the mark `dps-agent:` and 16 random bytes. Operational
//! keys carry the label `NAME.pending` until [`KeyStore::commit`] renames them
//! to `NAME`. Only keys with both the `op-` label and the mark are listed as
//! ours (and so may be swept): a shared token's other keys are never touched. Signing is
//! CKM_ECDSA over the caller's digest; the public key is read from the token's
//! public-key object. RSA keys already in a token (secure elements often hold
//! RSA-2048 onboarding keys) are opened too, never made: their public key comes
//! from CKA_MODULUS and CKA_PUBLIC_EXPONENT, and they sign with CKM_RSA_PKCS_PSS
//! (when the token has it) or CKM_RSA_PKCS over a DigestInfo. The private key never leaves the token, and the PIN never
//! appears in a log line, an error or a `Debug` string.
//!
//! [`Pkcs11Stores`] is what `keys::Keys` holds: it opens one store per token on
//! first use and shares it. Modules are initialised once per process (`token`).

mod error;
mod pin;
mod public_key;
mod template;
mod token;
pub mod uri;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cryptoki::error::RvError;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

pub use error::{Pkcs11Error, TokenList, TokenSummary};
pub use pin::{check_pin_file, Pin, PinSource, CREDENTIAL_NAME};
pub use token::TokenFilter;
pub use uri::{ObjectType, PathAttr, Pkcs11Uri, QueryAttr, UriError};

use super::{
    check_key_name, ecdsa_raw_to_der, Backend, HashAlg, Key, KeyAlgorithm, KeyError, KeyStore,
    KeyUri, SignScheme,
};
use crate::config::Pkcs11Config;
use token::{Module, Token, TokenError};

/// Label suffix of a key made by [`KeyStore::generate`] and not yet committed.
pub const PENDING_SUFFIX: &str = ".pending";
/// Labels of operational keys start with this (see `lifecycle`).
const OPERATIONAL_PREFIX: &str = "op-";
/// The CKA_ID of every key dps-agent makes starts with this mark.
const ID_MARK: &[u8] = b"dps-agent:";
/// Number of random bytes after [`ID_MARK`] in a new key's CKA_ID.
const ID_RANDOM_LEN: usize = 16;

impl From<Pkcs11Error> for KeyError {
    fn from(e: Pkcs11Error) -> KeyError {
        KeyError::Pkcs11(Box::new(e))
    }
}

/// The PKCS#11 stores of a process: one per token, opened on first use and
/// shared (a module has one initialisation per process, a token one session).
pub struct Pkcs11Stores {
    config: Pkcs11Config,
    stores: Mutex<Vec<Arc<Pkcs11KeyStore>>>,
}

impl Pkcs11Stores {
    pub fn new(config: Pkcs11Config) -> Self {
        Pkcs11Stores {
            config,
            stores: Mutex::new(Vec::new()),
        }
    }

    fn config_filter(&self) -> TokenFilter {
        TokenFilter {
            label: self.config.token_label.clone(),
            serial: self.config.token_serial.clone(),
            ..Default::default()
        }
    }

    /// The store of the token in `[pkcs11]`, where operational keys are made.
    pub fn default_store(&self) -> Result<Arc<Pkcs11KeyStore>, KeyError> {
        let module = self.config.module.clone().ok_or(Pkcs11Error::NoModule)?;
        self.store_for(&module, self.config_filter(), None)
    }

    /// Opens a key by URI. The module is the URI's `module-path` or
    /// `[pkcs11] module`; the token is the one the URI names (token, serial,
    /// …) or, if it names none, the one in `[pkcs11]`.
    pub fn open(&self, uri: &KeyUri) -> Result<Arc<dyn Key>, KeyError> {
        let (store, parsed) = self.store_of(uri)?;
        store.open_parsed(uri, &parsed)
    }

    /// Opens a secret key by URI (`type=secret-key`, found as for
    /// [`Pkcs11Stores::open`]): a DPS symmetric key kept in the token, which
    /// computes the HMACs itself.
    pub fn open_secret(&self, uri: &KeyUri) -> Result<Pkcs11Secret, KeyError> {
        let (store, parsed) = self.store_of(uri)?;
        store.check_token(uri, &parsed)?;
        let secret = Pkcs11Secret {
            locator: Locator::of_kind(uri, &parsed, Want::Secret)?,
            store,
            uri: uri.clone(),
        };
        secret
            .store
            .token
            .with_session::<_, KeyError>("find a secret key", |s, _| secret.find(s).map(drop))?;
        Ok(secret)
    }

    /// The store of the token a URI names, and the parsed URI. The module is
    /// the URI's `module-path` or `[pkcs11] module`; the token is the one the
    /// URI names or, if it names none, the one in `[pkcs11]`.
    fn store_of(&self, uri: &KeyUri) -> Result<(Arc<Pkcs11KeyStore>, Pkcs11Uri), KeyError> {
        let parsed = parse_key_uri(uri)?;
        let module = parsed
            .query_text(&QueryAttr::ModulePath)
            .map(PathBuf::from)
            .or_else(|| self.config.module.clone())
            .ok_or(Pkcs11Error::NoModule)?;
        let filter = if parsed.selects_token() {
            filter_of(&parsed)
        } else {
            self.config_filter()
        };
        let store = self.store_for(&module, filter, Some(&parsed))?;
        Ok((store, parsed))
    }

    /// Makes an onboarding key labelled `label` in the `[pkcs11]` token
    /// (`dps-agent keygen --backend pkcs11 --out LABEL`). Refuses a label
    /// that a private key in the token already has.
    pub fn generate_at(&self, label: &str, algorithm: KeyAlgorithm) -> Result<KeyUri, KeyError> {
        check_key_name(label)?;
        self.default_store()?.generate_labeled(label, algorithm)
    }

    fn store_for(
        &self,
        module_path: &Path,
        filter: TokenFilter,
        uri: Option<&Pkcs11Uri>,
    ) -> Result<Arc<Pkcs11KeyStore>, KeyError> {
        let module = Module::load(module_path)?;
        if let Some(uri) = uri {
            check_library(&module, uri)?;
        }
        let selected = filter.select(module.path(), &module.tokens()?)?;
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = stores
            .iter()
            .find(|s| Arc::ptr_eq(s.token.module(), &module) && *s.token.summary() == selected.1)
        {
            return Ok(s.clone());
        }
        let pin = PinSource::from_env(
            uri.and_then(Pkcs11Uri::pin_value),
            uri.and_then(|u| u.query_text(&QueryAttr::PinSource)),
            self.config.pin_file.as_deref(),
        )?;
        let serial_in_uris = filter.serial.is_some();
        let store = Arc::new(Pkcs11KeyStore {
            token: Arc::new(Token::new(module, filter, selected, pin)),
            serial_in_uris,
        });
        stores.push(store.clone());
        Ok(store)
    }
}

/// The token attributes of a URI.
fn filter_of(uri: &Pkcs11Uri) -> TokenFilter {
    let text = |a: PathAttr| uri.text(&a).map(str::to_string);
    TokenFilter {
        label: text(PathAttr::Token),
        serial: text(PathAttr::Serial),
        manufacturer: text(PathAttr::Manufacturer),
        model: text(PathAttr::Model),
        slot_id: uri.slot_id(),
        slot_description: text(PathAttr::SlotDescription),
        slot_manufacturer: text(PathAttr::SlotManufacturer),
    }
}

/// A URI's `library-*` attributes must describe the module.
fn check_library(module: &Module, uri: &Pkcs11Uri) -> Result<(), KeyError> {
    let wanted = [
        PathAttr::LibraryManufacturer,
        PathAttr::LibraryDescription,
        PathAttr::LibraryVersion,
    ];
    if wanted.iter().all(|a| uri.text(a).is_none()) {
        return Ok(());
    }
    let info = module
        .ctx()
        .get_library_info()
        .map_err(|e| Pkcs11Error::from_call("(any)", "read the module information", e))?;
    let version = info.library_version();
    let have = [
        info.manufacturer_id().trim_end().to_string(),
        info.library_description().trim_end().to_string(),
        format!("{}.{}", version.major(), version.minor()),
    ];
    for (attr, have) in wanted.iter().zip(have) {
        let Some(want) = uri.text(attr) else { continue };
        let same = if *attr == PathAttr::LibraryVersion && !want.contains('.') {
            have.split('.').next() == Some(want)
        } else {
            want == have
        };
        if !same {
            return Err(KeyError::NotFound {
                uri: uri.to_redacted_string(),
                hint: format!(
                    ": the URI asks for {}={want:?} but the module {} has {have:?}",
                    attr.name(),
                    module.path().display()
                ),
            });
        }
    }
    Ok(())
}

fn parse_key_uri(uri: &KeyUri) -> Result<Pkcs11Uri, KeyError> {
    Pkcs11Uri::parse(uri.as_str()).map_err(|e| KeyError::BadUri {
        uri: uri.redacted(),
        reason: e.reason().to_string(),
    })
}

/// Keys in one token.
pub struct Pkcs11KeyStore {
    token: Arc<Token>,
    /// Whether the URIs this store prints name the token's serial too (when
    /// `[pkcs11] token_serial` chose the token).
    serial_in_uris: bool,
}

/// The kind of object a URI must name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Private,
    /// A private key, or what is left of one (its public half).
    PrivateOrPublic,
    /// A secret key (`type=secret-key`).
    Secret,
}

/// How a URI names a private key: its label, its id, or both.
struct Locator {
    label: Option<String>,
    id: Option<Vec<u8>>,
}

impl Locator {
    /// The object a URI names; refuses URIs that name none, name another
    /// kind of object, or carry path attributes we do not understand.
    fn of(uri: &KeyUri, p: &Pkcs11Uri, allow_public: bool) -> Result<Locator, KeyError> {
        Locator::of_kind(
            uri,
            p,
            if allow_public {
                Want::PrivateOrPublic
            } else {
                Want::Private
            },
        )
    }

    /// The object a URI names, which must be of the kind `want` says.
    fn of_kind(uri: &KeyUri, p: &Pkcs11Uri, want: Want) -> Result<Locator, KeyError> {
        let bad = |reason: String| -> KeyError {
            Pkcs11Error::BadKey {
                uri: uri.redacted(),
                reason,
            }
            .into()
        };
        let unknown = p.unknown_path_attributes();
        if !unknown.is_empty() {
            return Err(bad(format!(
                "it has the attribute(s) {} that dps-agent does not understand; RFC 7512 makes such a URI match no object: remove them",
                unknown.join(", ")
            )));
        }
        match (want, p.object_type()) {
            (Want::Private | Want::PrivateOrPublic, None | Some(ObjectType::Private)) => {}
            (Want::PrivateOrPublic, Some(ObjectType::Public)) => {}
            (Want::Secret, Some(ObjectType::SecretKey)) => {}
            (Want::Secret, other) => {
                return Err(bad(format!(
                    "{} names no secret key; a symmetric key's URI has type=secret-key",
                    other.map_or("a URI without type=".to_string(), |t| format!(
                        "type={}",
                        t.name()
                    ))
                )))
            }
            (_, Some(other)) => {
                return Err(bad(format!(
                    "type={} names no private key; a key URI has type=private (or no type)",
                    other.name()
                )))
            }
        }
        let label = p.text(&PathAttr::Object).map(str::to_string);
        let id = p.id().map(<[u8]>::to_vec);
        if label.is_none() && id.is_none() {
            return Err(bad(
                "it names no object; add object=LABEL and/or id=%… (p11tool --list-privkeys prints them)"
                    .into(),
            ));
        }
        Ok(Locator { label, id })
    }
}

impl Pkcs11KeyStore {
    /// The token this store works in.
    pub fn token(&self) -> &TokenSummary {
        self.token.summary()
    }

    fn key_uri(&self, label: &str, id: &[u8]) -> Result<KeyUri, KeyError> {
        let t = self.token.summary();
        let serial = self.serial_in_uris.then_some(t.serial.as_str());
        KeyUri::parse(&Pkcs11Uri::for_private_key(&t.label, serial, label, id).to_string())
    }

    fn not_found(&self, uri: &KeyUri) -> KeyError {
        KeyError::NotFound {
            uri: uri.redacted(),
            hint: format!(
                " in token {} (module {}); list its keys with: pkcs11-tool --module {} --token-label {:?} --login --list-objects --type privkey",
                self.token.name(),
                self.token.module().path().display(),
                self.token.module().path().display(),
                self.token.summary().label
            ),
        }
    }

    /// The URI must be for this store's token.
    fn check_token(&self, uri: &KeyUri, p: &Pkcs11Uri) -> Result<(), KeyError> {
        if p.selects_token() && !filter_of(p).matches(self.token.summary()) {
            return Err(Pkcs11Error::BadKey {
                uri: uri.redacted(),
                reason: format!(
                    "it names another token than this store's ({})",
                    self.token.name()
                ),
            }
            .into());
        }
        Ok(())
    }

    /// Makes a key pair labelled `label` (checked by the caller).
    fn generate_labeled(&self, label: &str, algorithm: KeyAlgorithm) -> Result<KeyUri, KeyError> {
        if algorithm.is_rsa() {
            return Err(KeyError::Unsupported {
                backend: Backend::Pkcs11,
                what: "making RSA keys".into(),
                hint: "; dps-agent makes ECDSA keys (an RSA key already in the token can be used for onboarding by its URI)".into(),
            });
        }
        let random: [u8; ID_RANDOM_LEN] = rand::random();
        let id = [ID_MARK, &random].concat();
        let token = &self.token;
        token.with_session("make a key pair", |s, _| {
            let taken = s
                .find_objects(&template::find(ObjectClass::PRIVATE_KEY, Some(label), None))
                .map_err(token.call("search the token"))?;
            if !taken.is_empty() {
                return Err(Pkcs11Error::LabelTaken {
                    token: token.name(),
                    label: label.to_string(),
                    module: token.module().path().to_path_buf(),
                });
            }
            s.generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &template::public_key(algorithm, label, &id),
                &template::private_key(label, &id),
            )
            .map_err(token.call("make a key pair"))?;
            Ok(())
        })?;
        log::debug!(
            "made a {algorithm} key pair labelled {label:?} in token {}",
            token.name()
        );
        self.key_uri(label, &id)
    }

    /// The one private key `loc` names.
    fn find_private(
        &self,
        uri: &KeyUri,
        s: &Session,
        loc: &Locator,
    ) -> Result<Option<ObjectHandle>, KeyError> {
        let found = s
            .find_objects(&template::find(
                ObjectClass::PRIVATE_KEY,
                loc.label.as_deref(),
                loc.id.as_deref(),
            ))
            .map_err(self.token.call("search the token"))?;
        match found.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(*one)),
            many => Err(Pkcs11Error::AmbiguousKey {
                uri: uri.redacted(),
                count: many.len(),
            }
            .into()),
        }
    }

    /// Label and id of an object.
    fn label_and_id(&self, s: &Session, h: ObjectHandle) -> Result<(String, Vec<u8>), KeyError> {
        let attrs = s
            .get_attributes(h, &[AttributeType::Label, AttributeType::Id])
            .map_err(self.token.call("read a key's attributes"))?;
        let mut label = String::new();
        let mut id = Vec::new();
        for a in attrs {
            match a {
                Attribute::Label(l) => label = String::from_utf8_lossy(&l).into_owned(),
                Attribute::Id(i) => id = i,
                _ => {}
            }
        }
        Ok((label, id))
    }

    /// The public-key objects that belong to a private key: same CKA_ID, or
    /// (when the id is empty) same label.
    fn public_halves(
        &self,
        s: &Session,
        label: &str,
        id: &[u8],
    ) -> Result<Vec<ObjectHandle>, KeyError> {
        let t = if id.is_empty() {
            template::find(ObjectClass::PUBLIC_KEY, Some(label), None)
        } else {
            template::find(ObjectClass::PUBLIC_KEY, None, Some(id))
        };
        Ok(s.find_objects(&t)
            .map_err(self.token.call("search the token"))?)
    }

    /// The algorithm and SubjectPublicKeyInfo of a private key, read from
    /// its public-key object.
    fn public_key_of(
        &self,
        uri: &KeyUri,
        s: &Session,
        label: &str,
        id: &[u8],
    ) -> Result<(KeyAlgorithm, Vec<u8>), KeyError> {
        let bad = |reason: String| -> KeyError {
            Pkcs11Error::BadKey {
                uri: uri.redacted(),
                reason,
            }
            .into()
        };
        let public = self.public_halves(s, label, id)?;
        let Some(&handle) = public.first() else {
            return Err(bad("the token holds no public-key object with the same CKA_ID; dps-agent reads the public key from it".into()));
        };
        let attrs = s
            .get_attributes(handle, &[AttributeType::EcParams, AttributeType::EcPoint])
            .map_err(self.token.call("read the public key"))?;
        let (mut params, mut point) = (None, None);
        for a in attrs {
            match a {
                Attribute::EcParams(v) => params = Some(v),
                Attribute::EcPoint(v) => point = Some(v),
                _ => {}
            }
        }
        let (Some(params), Some(point)) = (params, point) else {
            return Err(bad(
                "its public-key object has no CKA_EC_PARAMS or CKA_EC_POINT".into(),
            ));
        };
        public_key::spki_from_attributes(&params, &point).map_err(bad)
    }

    /// The algorithm and SubjectPublicKeyInfo of an RSA private key, from
    /// CKA_MODULUS and CKA_PUBLIC_EXPONENT of the private-key object (which
    /// carries both on most tokens), else of its public-key object.
    fn rsa_public_key_of(
        &self,
        uri: &KeyUri,
        s: &Session,
        private: ObjectHandle,
        label: &str,
        id: &[u8],
    ) -> Result<(KeyAlgorithm, Vec<u8>), KeyError> {
        let bad = |reason: String| -> KeyError {
            Pkcs11Error::BadKey {
                uri: uri.redacted(),
                reason,
            }
            .into()
        };
        /// CKA_MODULUS and CKA_PUBLIC_EXPONENT, when the object shows them.
        type Parts = (Option<Vec<u8>>, Option<Vec<u8>>);
        let read = |h: ObjectHandle| -> Result<Parts, KeyError> {
            let attrs = s
                .get_attributes(h, &[AttributeType::Modulus, AttributeType::PublicExponent])
                .map_err(self.token.call("read the public key"))?;
            let (mut n, mut e) = (None, None);
            for a in attrs {
                match a {
                    Attribute::Modulus(v) if !v.is_empty() => n = Some(v),
                    Attribute::PublicExponent(v) if !v.is_empty() => e = Some(v),
                    _ => {}
                }
            }
            Ok((n, e))
        };
        let mut found = read(private)?;
        if found.0.is_none() || found.1.is_none() {
            if let Some(&public) = self.public_halves(s, label, id)?.first() {
                found = read(public)?;
            }
        }
        let (Some(n), Some(e)) = found else {
            return Err(bad("neither the RSA private key nor a public-key object with its CKA_ID shows CKA_MODULUS and CKA_PUBLIC_EXPONENT".into()));
        };
        super::rsa_spki(&n, &e).map_err(bad)
    }

    /// The RSA schemes the token can sign with: PSS needs CKM_RSA_PKCS_PSS,
    /// PKCS#1 v1.5 needs CKM_RSA_PKCS (given the DigestInfo).
    fn rsa_schemes(
        &self,
        uri: &KeyUri,
        s: &Session,
        algorithm: KeyAlgorithm,
    ) -> Result<Vec<SignScheme>, KeyError> {
        let slot = s
            .get_session_info()
            .map_err(self.token.call("read the session information"))?
            .slot_id();
        let offered = self
            .token
            .module()
            .ctx()
            .get_mechanism_list(slot)
            .map_err(self.token.call("list the token's mechanisms"))?;
        let pss = offered.contains(&MechanismType::RSA_PKCS_PSS);
        let v15 = offered.contains(&MechanismType::RSA_PKCS);
        let schemes: Vec<SignScheme> = algorithm
            .schemes()
            .into_iter()
            .filter(|s| match s {
                SignScheme::RsaPss(_) => pss,
                SignScheme::RsaPkcs1(_) => v15,
                SignScheme::Ecdsa(_) => false,
            })
            .collect();
        if schemes.is_empty() {
            return Err(Pkcs11Error::BadKey {
                uri: uri.redacted(),
                reason: format!(
                    "token {} offers neither CKM_RSA_PKCS_PSS nor CKM_RSA_PKCS, so it cannot sign with this RSA key",
                    self.token.name()
                ),
            }
            .into());
        }
        if !pss {
            log::warn!(
                "token {} has no CKM_RSA_PKCS_PSS: {} can sign only PKCS#1 v1.5, which TLS 1.2 accepts and TLS 1.3 does not",
                self.token.name(),
                uri.redacted()
            );
        }
        Ok(schemes)
    }

    fn open_parsed(&self, uri: &KeyUri, p: &Pkcs11Uri) -> Result<Arc<dyn Key>, KeyError> {
        self.check_token(uri, p)?;
        let loc = Locator::of(uri, p, false)?;
        let (handle, generation, label, id, algorithm, spki, schemes) = self
            .token
            .with_session::<_, KeyError>("open a key", |s, generation| {
                let Some(h) = self.find_private(uri, s, &loc)? else {
                    return Ok(None);
                };
                let key_type = s
                    .get_attributes(h, &[AttributeType::KeyType])
                    .map_err(self.token.call("read a key's attributes"))?;
                let is_rsa = key_type.contains(&Attribute::KeyType(KeyType::RSA));
                if !is_rsa && !key_type.contains(&Attribute::KeyType(KeyType::EC)) {
                    return Err(KeyError::from(Pkcs11Error::BadKey {
                        uri: uri.redacted(),
                        reason: "it is neither an EC nor an RSA key; dps-agent uses EC P-256 and P-384 keys, and RSA keys of 2048 to 4096 bits for onboarding"
                            .into(),
                    }));
                }
                let (label, id) = self.label_and_id(s, h)?;
                let (algorithm, spki) = if is_rsa {
                    self.rsa_public_key_of(uri, s, h, &label, &id)?
                } else {
                    self.public_key_of(uri, s, &label, &id)?
                };
                let schemes = if is_rsa {
                    self.rsa_schemes(uri, s, algorithm)?
                } else {
                    algorithm.schemes()
                };
                Ok(Some((h, generation, label, id, algorithm, spki, schemes)))
            })
            .and_then(|found| found.ok_or_else(|| self.not_found(uri)))?;
        Ok(Arc::new(Pkcs11Key {
            uri: uri.clone(),
            token: self.token.clone(),
            locator: loc,
            resolved: (label, id),
            algorithm,
            schemes,
            spki,
            handle: Mutex::new(Some((generation, handle))),
        }))
    }
}

impl TokenError for KeyError {
    fn lost_session(&self) -> Option<String> {
        match self {
            KeyError::Pkcs11(e) => TokenError::lost_session(e.as_ref()),
            _ => None,
        }
    }
}

impl KeyStore for Pkcs11KeyStore {
    fn backend(&self) -> Backend {
        Backend::Pkcs11
    }

    fn generate(&self, name: &str, algorithm: KeyAlgorithm) -> Result<KeyUri, KeyError> {
        check_key_name(name)?;
        self.generate_labeled(&format!("{name}{PENDING_SUFFIX}"), algorithm)
    }

    fn open(&self, uri: &KeyUri) -> Result<Arc<dyn Key>, KeyError> {
        let p = parse_key_uri(uri)?;
        self.open_parsed(uri, &p)
    }

    fn commit(&self, uri: &KeyUri) -> Result<KeyUri, KeyError> {
        let p = parse_key_uri(uri)?;
        self.check_token(uri, &p)?;
        let loc = Locator::of(uri, &p, false)?;
        let renamed = self
            .token
            .with_session::<_, KeyError>("rename a key", |s, _| {
                let Some(h) = self.find_private(uri, s, &loc)? else {
                    return Ok(None);
                };
                let (label, id) = self.label_and_id(s, h)?;
                let Some(committed) = label.strip_suffix(PENDING_SUFFIX) else {
                    return Ok(Some((label, id)));
                };
                let new_label = Attribute::Label(committed.as_bytes().to_vec());
                for public in self.public_halves(s, &label, &id)? {
                    s.update_attributes(public, std::slice::from_ref(&new_label))
                        .map_err(self.token.call("rename a public key"))?;
                }
                s.update_attributes(h, &[new_label])
                    .map_err(self.token.call("rename a private key"))?;
                Ok(Some((committed.to_string(), id)))
            })?;
        let (label, id) = renamed.ok_or_else(|| self.not_found(uri))?;
        self.key_uri(&label, &id)
    }

    fn delete(&self, uri: &KeyUri) -> Result<(), KeyError> {
        let p = parse_key_uri(uri)?;
        self.check_token(uri, &p)?;
        let loc = Locator::of(uri, &p, true)?;
        self.token
            .with_session::<_, KeyError>("delete a key", |s, _| {
                let mut doomed = Vec::new();
                match self.find_private(uri, s, &loc)? {
                    Some(h) => {
                        let (label, id) = self.label_and_id(s, h)?;
                        doomed.extend(self.public_halves(s, &label, &id)?);
                        doomed.push(h);
                    }
                    None => {
                        // Only a public half may be left (an interrupted delete).
                        doomed.extend(
                            s.find_objects(&template::find(
                                ObjectClass::PUBLIC_KEY,
                                loc.label.as_deref(),
                                loc.id.as_deref(),
                            ))
                            .map_err(self.token.call("search the token"))?,
                        );
                    }
                }
                for h in doomed {
                    match s.destroy_object(h) {
                        Ok(()) => {}
                        Err(e) if error::rv_of(&e) == Some(RvError::ObjectHandleInvalid) => {}
                        Err(e) => return Err(self.token.call("delete a key")(e).into()),
                    }
                }
                Ok(())
            })
    }

    fn list(&self) -> Result<Vec<KeyUri>, KeyError> {
        let keys = self
            .token
            .with_session::<_, KeyError>("list keys", |s, _| {
                let all = s
                    .find_objects(&template::find(ObjectClass::PRIVATE_KEY, None, None))
                    .map_err(self.token.call("search the token"))?;
                let mut out = Vec::new();
                for h in all {
                    let (label, id) = self.label_and_id(s, h)?;
                    if label.starts_with(OPERATIONAL_PREFIX) && id.starts_with(ID_MARK) {
                        out.push((label, id));
                    }
                }
                Ok(out)
            })?;
        let mut uris = keys
            .iter()
            .map(|(label, id)| self.key_uri(label, id))
            .collect::<Result<Vec<_>, _>>()?;
        uris.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(uris)
    }
}

/// A secret key in a token that makes HMAC-SHA256 signatures (a DPS
/// symmetric key). The key never leaves the token.
pub struct Pkcs11Secret {
    store: Arc<Pkcs11KeyStore>,
    uri: KeyUri,
    locator: Locator,
}

impl fmt::Debug for Pkcs11Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkcs11Secret({})", self.uri.redacted())
    }
}

impl Pkcs11Secret {
    pub fn uri(&self) -> &KeyUri {
        &self.uri
    }

    /// HMAC-SHA256 of `data`, computed by the token (CKM_SHA256_HMAC).
    pub fn hmac_sha256(&self, data: &[u8]) -> Result<Vec<u8>, KeyError> {
        let token = &self.store.token;
        token.with_session::<_, KeyError>("compute an HMAC", |s, _| {
            let h = self.find(s)?;
            Ok(s.sign(&Mechanism::Sha256Hmac, h, data)
                .map_err(token.call("compute an HMAC-SHA256 with a secret key"))?)
        })
    }

    /// The one secret key the URI names.
    fn find(&self, s: &Session) -> Result<ObjectHandle, KeyError> {
        let token = &self.store.token;
        let found = s
            .find_objects(&template::find(
                ObjectClass::SECRET_KEY,
                self.locator.label.as_deref(),
                self.locator.id.as_deref(),
            ))
            .map_err(token.call("search the token"))?;
        match found.as_slice() {
            [] => Err(KeyError::NotFound {
                uri: self.uri.redacted(),
                hint: format!(
                    " in token {} (module {}); list its secret keys with: pkcs11-tool --module {} --token-label {:?} --login --list-objects --type secrkey",
                    token.name(),
                    token.module().path().display(),
                    token.module().path().display(),
                    token.summary().label
                ),
            }),
            [one] => Ok(*one),
            many => Err(Pkcs11Error::AmbiguousKey {
                uri: self.uri.redacted(),
                count: many.len(),
            }
            .into()),
        }
    }
}

/// A private key in a token.
struct Pkcs11Key {
    uri: KeyUri,
    token: Arc<Token>,
    /// How the URI named the key.
    locator: Locator,
    /// The key's label and id when it was opened.
    resolved: (String, Vec<u8>),
    algorithm: KeyAlgorithm,
    /// What the key can sign with in this token (RSA: by the token's mechanisms).
    schemes: Vec<SignScheme>,
    spki: Vec<u8>,
    /// The object handle, valid for the session generation it was found in.
    handle: Mutex<Option<(u64, ObjectHandle)>>,
}

impl Pkcs11Key {
    /// The key's handle in the current session: cached, or found again by
    /// its id (a commit may have renamed it), else as the URI names it.
    fn handle(&self, s: &Session, generation: u64) -> Result<ObjectHandle, KeyError> {
        let mut cache = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, h)) = *cache {
            if g == generation {
                return Ok(h);
            }
        }
        let find = |label: Option<&str>, id: Option<&[u8]>| {
            s.find_objects(&template::find(ObjectClass::PRIVATE_KEY, label, id))
                .map_err(self.token.call("search the token"))
        };
        let (_, id) = &self.resolved;
        let mut found = if id.is_empty() {
            Vec::new()
        } else {
            find(None, Some(id))?
        };
        if found.len() != 1 {
            found = find(self.locator.label.as_deref(), self.locator.id.as_deref())?;
        }
        match found.as_slice() {
            [h] => {
                *cache = Some((generation, *h));
                Ok(*h)
            }
            [] => Err(KeyError::NotFound {
                uri: self.uri.redacted(),
                hint: format!(" in token {} any more", self.token.name()),
            }),
            many => Err(Pkcs11Error::AmbiguousKey {
                uri: self.uri.redacted(),
                count: many.len(),
            }
            .into()),
        }
    }

    fn forget_handle(&self) {
        *self.handle.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Key for Pkcs11Key {
    fn uri(&self) -> &KeyUri {
        &self.uri
    }

    fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    fn supported_schemes(&self) -> Vec<SignScheme> {
        self.schemes.clone()
    }

    fn sign_digest(&self, scheme: SignScheme, digest: &[u8]) -> Result<Vec<u8>, KeyError> {
        let hash = scheme.hash();
        let fail = |reason: String| KeyError::Sign {
            uri: self.uri.redacted(),
            reason,
        };
        if digest.len() != hash.output_len() {
            return Err(fail(format!(
                "digest is {} bytes, expected {} for {hash:?}",
                digest.len(),
                hash.output_len()
            )));
        }
        if !self.schemes.contains(&scheme) {
            return Err(fail(format!(
                "this {} key in token {} cannot make a {scheme} signature",
                self.algorithm,
                self.token.name()
            )));
        }
        // The mechanism and what it is given: ECDSA and PSS take the digest,
        // CKM_RSA_PKCS the DigestInfo (it only pads).
        let (hash_mech, mgf) = match hash {
            HashAlg::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
            HashAlg::Sha384 => (MechanismType::SHA384, PkcsMgfType::MGF1_SHA384),
            HashAlg::Sha512 => (MechanismType::SHA512, PkcsMgfType::MGF1_SHA512),
        };
        let mechanism = || match scheme {
            SignScheme::Ecdsa(_) => Mechanism::Ecdsa,
            SignScheme::RsaPkcs1(_) => Mechanism::RsaPkcs,
            SignScheme::RsaPss(_) => Mechanism::RsaPkcsPss(PkcsPssParams {
                hash_alg: hash_mech,
                mgf,
                s_len: (hash.output_len() as std::ffi::c_ulong).into(),
            }),
        };
        let data = match scheme {
            SignScheme::RsaPkcs1(_) => hash.digest_info(digest),
            _ => digest.to_vec(),
        };
        let digest = data.as_slice();
        let raw = self
            .token
            .with_session::<_, KeyError>("sign", |s, generation| {
                let h = self.handle(s, generation)?;
                match s.sign(&mechanism(), h, digest) {
                    Err(e)
                        if matches!(
                            error::rv_of(&e),
                            Some(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid)
                        ) =>
                    {
                        // The handle went stale: find the key again, once.
                        self.forget_handle();
                        let h = self.handle(s, generation)?;
                        s.sign(&mechanism(), h, digest)
                            .map_err(|e| self.token.call("sign")(e).into())
                    }
                    other => other.map_err(|e| self.token.call("sign")(e).into()),
                }
            })?;
        if let KeyAlgorithm::Rsa { bits } = self.algorithm {
            // RSA signatures are modulus-sized big-endian integers, as is.
            let want = usize::from(bits).div_ceil(8);
            if raw.len() != want {
                return Err(fail(format!(
                    "the token returned {} bytes, not a {want}-byte RSA signature",
                    raw.len()
                )));
            }
            return Ok(raw);
        }
        ecdsa_raw_to_der(self.algorithm, &raw).ok_or_else(|| KeyError::Sign {
            uri: self.uri.redacted(),
            reason: format!(
                "the token returned {} bytes, not an r||s signature for {}",
                raw.len(),
                self.algorithm
            ),
        })
    }
}

#[cfg(test)]
mod tests;
