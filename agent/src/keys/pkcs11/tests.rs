//! Tests of the PKCS#11 backend against a real SoftHSM2 token. Each test runs
//! in a child process of the test binary with its own SOFTHSM2_CONF and token
//! directory (a PKCS#11 module is initialised once per process, and SoftHSM2
//! reads its configuration at that moment); no global state is touched.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use cryptoki::object::{Attribute, AttributeType, ObjectClass};

use super::*;
use crate::keys::HashAlg;

/// Set in the child process: the fixture directory.
const CHILD_ENV: &str = "DPS_AGENT_TEST_SOFTHSM_DIR";
const LABEL: &str = "dps-unit";
const PIN: &str = "246810";
const SO_PIN: &str = "13579";

/// Where SoftHSM2's module is on Debian and Ubuntu (amd64, arm64, armhf).
fn softhsm_module() -> PathBuf {
    if let Some(p) = std::env::var_os("SOFTHSM2_MODULE") {
        return PathBuf::from(p);
    }
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/arm-linux-gnueabihf/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("SoftHSM2 is not installed: run `make deps` (Debian package softhsm2)")
}

struct Fixture {
    dir: PathBuf,
    module: PathBuf,
    pin_file: PathBuf,
}

impl Fixture {
    fn at(dir: PathBuf) -> Fixture {
        Fixture {
            pin_file: dir.join("pin"),
            module: softhsm_module(),
            dir,
        }
    }

    fn config(&self, label: &str, pin_file: Option<&Path>) -> Pkcs11Config {
        Pkcs11Config {
            module: Some(self.module.clone()),
            token_label: Some(label.to_string()),
            token_serial: None,
            pin_file: pin_file.map(Path::to_path_buf),
        }
    }

    fn stores(&self) -> Pkcs11Stores {
        Pkcs11Stores::new(self.config(LABEL, Some(&self.pin_file)))
    }

    fn write_pin(&self, path: &Path, pin: &str) {
        fs::write(path, format!("{pin}\n")).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// Runs `body` in a child process with a fresh SoftHSM2 token `LABEL`
/// (user PIN in `fx.pin_file`). `test` is the test's own name.
fn in_softhsm(test: &str, body: impl FnOnce(&Fixture)) {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        body(&Fixture::at(PathBuf::from(dir)));
        return;
    }
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "dps-agent-softhsm-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        rand::random::<u32>()
    ));
    fs::create_dir_all(dir.join("tokens")).unwrap();
    let conf = dir.join("softhsm2.conf");
    fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            dir.join("tokens").display()
        ),
    )
    .unwrap();
    let init = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            LABEL,
            "--so-pin",
            SO_PIN,
            "--pin",
            PIN,
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util is not installed: run `make deps` (Debian package softhsm2)");
    assert!(init.status.success(), "softhsm2-util: {init:?}");
    let fx = Fixture::at(dir.clone());
    fx.write_pin(&fx.pin_file, PIN);

    let name = test.strip_prefix("dps_agent::").unwrap_or(test);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(CHILD_ENV, &dir)
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child test {name} failed:\n{stdout}\n{stderr}"
    );
    fs::remove_dir_all(&dir).unwrap();
}

macro_rules! test_name {
    ($f:ident) => {
        concat!(module_path!(), "::", stringify!($f))
    };
}

fn verify(spki: &[u8], alg: KeyAlgorithm, msg: &[u8], sig: &[u8]) -> bool {
    let spki = spki::SubjectPublicKeyInfoRef::try_from(spki).unwrap();
    let point = spki.subject_public_key.raw_bytes();
    let ring_alg: &dyn ring::signature::VerificationAlgorithm = match alg {
        KeyAlgorithm::EcdsaP256 => &ring::signature::ECDSA_P256_SHA256_ASN1,
        KeyAlgorithm::EcdsaP384 => &ring::signature::ECDSA_P384_SHA384_ASN1,
        KeyAlgorithm::Rsa { .. } => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
    };
    ring::signature::UnparsedPublicKey::new(ring_alg, point)
        .verify(msg, sig)
        .is_ok()
}

fn uri(s: &str) -> KeyUri {
    KeyUri::parse(s).unwrap()
}

/// Private and public objects with this CKA_ID.
fn objects_with_id(store: &Pkcs11KeyStore, id: &[u8]) -> (usize, usize) {
    store
        .token
        .with_session::<_, KeyError>("test", |s, _| {
            let count = |class| {
                s.find_objects(&template::find(class, None, Some(id)))
                    .map(|v| v.len())
                    .map_err(|e| KeyError::from(store.token.call("find")(e)))
            };
            Ok((
                count(ObjectClass::PRIVATE_KEY)?,
                count(ObjectClass::PUBLIC_KEY)?,
            ))
        })
        .unwrap()
}

fn attributes(
    store: &Pkcs11KeyStore,
    class: ObjectClass,
    id: &[u8],
    types: &[AttributeType],
) -> Vec<Attribute> {
    store
        .token
        .with_session::<_, KeyError>("test", |s, _| {
            let h = s
                .find_objects(&template::find(class, None, Some(id)))
                .map_err(store.token.call("find"))?;
            assert_eq!(h.len(), 1);
            Ok(s.get_attributes(h[0], types)
                .map_err(store.token.call("read"))?)
        })
        .unwrap()
}

#[test]
fn generates_signs_commits_lists_and_deletes_keys() {
    in_softhsm(
        test_name!(generates_signs_commits_lists_and_deletes_keys),
        |fx| {
            let stores = fx.stores();
            let store = stores.default_store().unwrap();
            assert_eq!(store.token().label, LABEL);
            assert!(store.list().unwrap().is_empty());
            for alg in KeyAlgorithm::ALL {
                let name = format!("op-test-{alg}");
                let pending = store.generate(&name, alg).unwrap();
                let parsed = Pkcs11Uri::parse(pending.as_str()).unwrap();
                assert_eq!(parsed.text(&PathAttr::Token), Some(LABEL));
                assert_eq!(
                    parsed.text(&PathAttr::Object),
                    Some(format!("{name}{PENDING_SUFFIX}").as_str())
                );
                assert_eq!(parsed.object_type(), Some(ObjectType::Private));
                let id = parsed.id().unwrap().to_vec();
                assert_eq!(id.len(), ID_MARK.len() + ID_RANDOM_LEN);
                assert!(id.starts_with(ID_MARK), "{id:?}");

                // The key's policy, as the token reports it.
                let private = attributes(
                    &store,
                    ObjectClass::PRIVATE_KEY,
                    &id,
                    &[
                        AttributeType::Token,
                        AttributeType::Private,
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                        AttributeType::AlwaysSensitive,
                        AttributeType::NeverExtractable,
                        AttributeType::Local,
                        AttributeType::Sign,
                        AttributeType::Decrypt,
                        AttributeType::Unwrap,
                        AttributeType::Derive,
                    ],
                );
                for want in [
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::AlwaysSensitive(true),
                    Attribute::NeverExtractable(true),
                    Attribute::Local(true),
                    Attribute::Sign(true),
                    Attribute::Decrypt(false),
                    Attribute::Unwrap(false),
                    Attribute::Derive(false),
                ] {
                    assert!(
                        private.contains(&want),
                        "{alg}: private key lacks {want:?}: {private:?}"
                    );
                }
                let public = attributes(
                    &store,
                    ObjectClass::PUBLIC_KEY,
                    &id,
                    &[
                        AttributeType::Verify,
                        AttributeType::Encrypt,
                        AttributeType::Wrap,
                    ],
                );
                for want in [
                    Attribute::Verify(true),
                    Attribute::Encrypt(false),
                    Attribute::Wrap(false),
                ] {
                    assert!(
                        public.contains(&want),
                        "{alg}: public key lacks {want:?}: {public:?}"
                    );
                }

                let key = store.open(&pending).unwrap();
                assert_eq!(key.algorithm(), alg);
                let sig = key.sign_message(alg.default_scheme(), b"hello").unwrap();
                assert!(verify(key.public_key_der(), alg, b"hello", &sig));
                assert!(!verify(key.public_key_der(), alg, b"hellO", &sig));
                let e = key
                    .sign_digest(SignScheme::Ecdsa(HashAlg::Sha256), &[0u8; 20])
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("expected 32"), "{e}");

                // Commit drops ".pending" from both halves; the URI keeps the id.
                let committed = store.commit(&pending).unwrap();
                let c = Pkcs11Uri::parse(committed.as_str()).unwrap();
                assert_eq!(c.text(&PathAttr::Object), Some(name.as_str()));
                assert_eq!(c.id(), Some(&id[..]));
                assert_eq!(store.commit(&committed).unwrap(), committed, "idempotent");
                let labels = attributes(
                    &store,
                    ObjectClass::PUBLIC_KEY,
                    &id,
                    &[AttributeType::Label],
                );
                assert_eq!(labels, vec![Attribute::Label(name.as_bytes().to_vec())]);
                let again = store.open(&committed).unwrap();
                assert_eq!(again.public_key_der(), key.public_key_der());
                // The handle opened before the rename still signs.
                let sig = key.sign_message(alg.default_scheme(), b"after").unwrap();
                assert!(verify(again.public_key_der(), alg, b"after", &sig));
                assert!(store.list().unwrap().contains(&committed));
            }
            let listed = store.list().unwrap();
            assert_eq!(listed.len(), 2, "{listed:?}");
            for u in &listed {
                let id = Pkcs11Uri::parse(u.as_str()).unwrap().id().unwrap().to_vec();
                assert_eq!(objects_with_id(&store, &id), (1, 1));
                store.delete(u).unwrap();
                assert_eq!(objects_with_id(&store, &id), (0, 0), "both halves are gone");
                store.delete(u).unwrap();
                let e = store.open(u).err().unwrap();
                assert!(matches!(e, KeyError::NotFound { .. }), "{e}");
                assert!(e.to_string().contains("pkcs11-tool --module"), "{e}");
            }
            assert!(store.list().unwrap().is_empty());
        },
    );
}

#[test]
fn onboarding_keys_open_by_any_uri_form() {
    in_softhsm(test_name!(onboarding_keys_open_by_any_uri_form), |fx| {
        let stores = fx.stores();
        let made = stores
            .generate_at("device-key", KeyAlgorithm::EcdsaP384)
            .unwrap();
        assert!(made
            .as_str()
            .starts_with(&format!("pkcs11:token={LABEL};object=device-key;id=%")));
        assert!(made.as_str().ends_with(";type=private"));
        let e = stores
            .generate_at("device-key", KeyAlgorithm::EcdsaP256)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("already holds a private key labelled \"device-key\""),
            "{e}"
        );
        assert!(stores.generate_at("../x", KeyAlgorithm::EcdsaP256).is_err());

        let spki = stores.open(&made).unwrap().public_key_der().to_vec();
        let id = Pkcs11Uri::parse(made.as_str())
            .unwrap()
            .id()
            .unwrap()
            .to_vec();
        let id_hex: String = id.iter().map(|b| format!("%{b:02x}")).collect();
        for form in [
            "pkcs11:object=device-key".to_string(),
            format!("pkcs11:token={LABEL};object=device-key;type=private"),
            format!("pkcs11:id={id_hex}"),
            format!("pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;token={LABEL};object=device-key"),
            format!("pkcs11:object=device-key?module-path={}", fx.module.display()),
            format!("pkcs11:object=device-key?pin-value={PIN}"),
        ] {
            let key = stores.open(&uri(&form)).unwrap_or_else(|e| panic!("{form}: {e}"));
            assert_eq!(key.public_key_der(), spki, "{form}");
        }
        // Onboarding keys are not operational keys.
        assert!(stores.default_store().unwrap().list().unwrap().is_empty());

        let cases = [
            (
                "pkcs11:token=other;object=device-key",
                "no token with label \"other\"",
            ),
            (
                "pkcs11:object=device-key;type=cert",
                "type=cert names no private key",
            ),
            (
                "pkcs11:object=device-key;vendor-x=1",
                "vendor-x that dps-agent does not understand",
            ),
            ("pkcs11:type=private", "names no object"),
            ("pkcs11:object=nothing-here", "does not exist"),
            (
                "pkcs11:object=device-key;library-manufacturer=Acme",
                "library-manufacturer=\"Acme\"",
            ),
            ("pkcs11:object=a b", "must be percent-encoded"),
        ];
        for (form, want) in cases {
            let e = stores.open(&uri(form)).err().unwrap().to_string();
            assert!(e.contains(want), "{form}: {e}");
        }
        let e = stores
            .open(&uri("pkcs11:token=other;object=device-key"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("tokens present: label \"{LABEL}\" (serial")),
            "{e}"
        );
    });
}

#[test]
fn a_wrong_pin_is_presented_once_per_process() {
    in_softhsm(
        test_name!(a_wrong_pin_is_presented_once_per_process),
        |fx| {
            let wrong = fx.dir.join("wrong-pin");
            fx.write_pin(&wrong, "000000");
            let stores = Pkcs11Stores::new(fx.config(LABEL, Some(&wrong)));
            let store = stores.default_store().unwrap();
            let module = store.token.module().clone();
            let flags = || module.ctx().get_token_info(store.token.slot()).unwrap();
            assert!(!flags().user_pin_count_low());

            let e = store.list().unwrap_err();
            assert!(
                matches!(&e, KeyError::Pkcs11(p) if matches!(**p, Pkcs11Error::PinIncorrect { .. })),
                "{e}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains("CKR_PIN_INCORRECT") && msg.contains(&wrong.display().to_string()),
                "{msg}"
            );
            assert!(!msg.contains("000000"), "{msg}");
            assert!(
                flags().user_pin_count_low(),
                "SoftHSM2 flags a failed login"
            );

            // Neither this store, nor a new one in this process, presents it again.
            for e in [
                store.list().unwrap_err(),
                Pkcs11Stores::new(fx.config(LABEL, Some(&wrong)))
                    .open(&uri("pkcs11:object=x"))
                    .err()
                    .unwrap(),
            ] {
                assert!(
                    matches!(&e, KeyError::Pkcs11(p) if matches!(**p, Pkcs11Error::PinRejectedBefore { .. })),
                    "{e}"
                );
            }
            // A corrected PIN is used.
            fx.write_pin(&wrong, PIN);
            assert!(store.list().unwrap().is_empty());
            assert!(
                !flags().user_pin_count_low(),
                "a good login clears the flag"
            );
        },
    );
}

#[test]
fn lost_sessions_are_reopened_once() {
    in_softhsm(test_name!(lost_sessions_are_reopened_once), |fx| {
        let stores = fx.stores();
        let store = stores.default_store().unwrap();
        let key = store
            .open(&store.generate("op-s", KeyAlgorithm::EcdsaP256).unwrap())
            .unwrap();
        let before = store
            .token
            .with_session::<_, Pkcs11Error>("t", |_, g| Ok(g))
            .unwrap();

        // The login is gone (CKR_USER_NOT_LOGGED_IN): a new session logs in.
        store.token.log_out_behind_our_back();
        let sig = key
            .sign_message(KeyAlgorithm::EcdsaP256.default_scheme(), b"m")
            .unwrap();
        assert!(verify(
            key.public_key_der(),
            KeyAlgorithm::EcdsaP256,
            b"m",
            &sig
        ));
        let after = store
            .token
            .with_session::<_, Pkcs11Error>("t", |_, g| Ok(g))
            .unwrap();
        assert_eq!(after, before + 1, "exactly one new session");

        // A loss on the first try is retried once on a new session.
        let lost = |rv| {
            Pkcs11Error::from_call(
                "t",
                "test",
                cryptoki::error::Error::Pkcs11(rv, cryptoki::context::Function::Sign),
            )
        };
        let mut calls = 0;
        let g = store
            .token
            .with_session("test", |_, g| {
                calls += 1;
                if calls == 1 {
                    Err(lost(RvError::SessionHandleInvalid))
                } else {
                    Ok(g)
                }
            })
            .unwrap();
        assert_eq!((calls, g), (2, after + 1));
        // A second loss is reported, with no third try.
        let mut calls = 0;
        let e = store
            .token
            .with_session::<(), _>("sign", |_, _| {
                calls += 1;
                Err(lost(RvError::DeviceRemoved))
            })
            .unwrap_err();
        assert_eq!(calls, 2);
        assert!(matches!(e, Pkcs11Error::SessionLost { .. }), "{e}");
        assert!(
            e.to_string().contains("CKR_DEVICE_REMOVED") && e.to_string().contains("--list-slots"),
            "{e}"
        );
        // Other errors are not retried.
        let mut calls = 0;
        let _ = store.token.with_session::<(), _>("sign", |_, _| {
            calls += 1;
            Err(lost(RvError::GeneralError))
        });
        assert_eq!(calls, 1);
        // And the store still works.
        assert_eq!(store.list().unwrap().len(), 1);
    });
}

#[test]
fn token_and_pin_problems_are_explained() {
    in_softhsm(test_name!(token_and_pin_problems_are_explained), |fx| {
        let e = Pkcs11Stores::new(fx.config("no-such-token", Some(&fx.pin_file)))
            .default_store()
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no token with label \"no-such-token\""), "{e}");
        assert!(
            e.contains(&format!("tokens present: label \"{LABEL}\" (serial \"")),
            "{e}"
        );
        assert!(e.contains(&fx.module.display().to_string()), "{e}");

        let mut c = fx.config(LABEL, None);
        c.token_label = None;
        let e = Pkcs11Stores::new(c)
            .default_store()
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no token is named") && e.contains(LABEL), "{e}");

        let e = Pkcs11Stores::new(fx.config(LABEL, None))
            .default_store()
            .unwrap()
            .list()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs a PIN and none is configured") && e.contains("pin_file"),
            "{e}"
        );

        fs::set_permissions(&fx.pin_file, fs::Permissions::from_mode(0o644)).unwrap();
        let e = fx
            .stores()
            .default_store()
            .unwrap()
            .list()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has mode 0644") && e.contains("chmod 0600"),
            "{e}"
        );
        fs::set_permissions(&fx.pin_file, fs::Permissions::from_mode(0o600)).unwrap();
        fx.stores().default_store().unwrap().list().unwrap();

        let mut c = fx.config(LABEL, None);
        c.module = Some(fx.dir.join("missing.so"));
        let e = Pkcs11Stores::new(c)
            .default_store()
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!(
                "cannot load the PKCS#11 module {}",
                fx.dir.join("missing.so").display()
            )),
            "{e}"
        );
        let mut c = fx.config(LABEL, None);
        c.module = None;
        let e = Pkcs11Stores::new(c)
            .default_store()
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no PKCS#11 module is configured"), "{e}");
    });
}

#[test]
fn the_config_names_the_module_and_the_token() {
    let config = |backend: &str, key: &str, pkcs11: &str| {
        let text = format!(
            "[dps]\nid_scope = \"0ne00000000\"\nregistration_id = \"gw-0001\"\n\
             [dps.attestation]\nmethod = \"x509\"\nidentity_cert = \"/etc/dps-agent/bootstrap/chain.pem\"\n\
             identity_key = \"{key}\"\n[operational]\nkey_backend = \"{backend}\"\n{pkcs11}"
        );
        crate::config::Config::from_str(Path::new("/etc/dps-agent/config.toml"), &text)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let module = "[pkcs11]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\n";
    let e = config("pkcs11", "file:/k.key", module).unwrap_err();
    assert!(
        e.contains("[pkcs11] token_label is missing") && e.contains("--list-token-slots"),
        "{e}"
    );
    config(
        "pkcs11",
        "file:/k.key",
        &format!("{module}token_label = \"dps\"\n"),
    )
    .unwrap();
    config(
        "pkcs11",
        "file:/k.key",
        &format!("{module}token_serial = \"0a1b\"\n"),
    )
    .unwrap();

    let e = config("file", "pkcs11:object=device-key", "").unwrap_err();
    assert!(
        e.contains("[pkcs11] module is missing") && e.contains("identity_key is a pkcs11: URI"),
        "{e}"
    );
    config(
        "file",
        "pkcs11:object=device-key?module-path=/usr/lib/softhsm/libsofthsm2.so",
        "",
    )
    .unwrap();
    config("file", "pkcs11:object=device-key", module).unwrap();
}

/// Runs pkcs11-tool (OpenSC) on the test token, logged in.
fn pkcs11_tool(fx: &Fixture, args: &[&str]) {
    let out = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(&fx.module)
        .args(["--token-label", LABEL, "--login", "--pin", PIN])
        .args(args)
        .output()
        .expect("pkcs11-tool is not installed: run `make deps` (Debian package opensc)");
    assert!(out.status.success(), "pkcs11-tool {args:?}: {out:?}");
}

/// Verifies an RSA signature with ring for `scheme`.
fn verify_rsa(spki: &[u8], scheme: SignScheme, msg: &[u8], sig: &[u8]) -> bool {
    use ring::signature as rs;
    let spki = spki::SubjectPublicKeyInfoRef::try_from(spki).unwrap();
    let alg: &dyn rs::VerificationAlgorithm = match scheme {
        SignScheme::RsaPkcs1(HashAlg::Sha256) => &rs::RSA_PKCS1_2048_8192_SHA256,
        SignScheme::RsaPkcs1(HashAlg::Sha384) => &rs::RSA_PKCS1_2048_8192_SHA384,
        SignScheme::RsaPkcs1(HashAlg::Sha512) => &rs::RSA_PKCS1_2048_8192_SHA512,
        SignScheme::RsaPss(HashAlg::Sha256) => &rs::RSA_PSS_2048_8192_SHA256,
        SignScheme::RsaPss(HashAlg::Sha384) => &rs::RSA_PSS_2048_8192_SHA384,
        SignScheme::RsaPss(HashAlg::Sha512) => &rs::RSA_PSS_2048_8192_SHA512,
        SignScheme::Ecdsa(_) => panic!("not an RSA scheme"),
    };
    rs::UnparsedPublicKey::new(alg, spki.subject_public_key.raw_bytes())
        .verify(msg, sig)
        .is_ok()
}

#[test]
fn rsa_keys_made_by_pkcs11_tool_sign_pss_and_pkcs1() {
    in_softhsm(
        test_name!(rsa_keys_made_by_pkcs11_tool_sign_pss_and_pkcs1),
        |fx| {
            // What an installer does for a secure element holding RSA-2048.
            pkcs11_tool(
                fx,
                &[
                    "--keypairgen",
                    "--key-type",
                    "rsa:2048",
                    "--label",
                    "device-rsa",
                    "--id",
                    "0a0b",
                ],
            );
            let stores = fx.stores();
            let u = uri(&format!(
                "pkcs11:token={LABEL};object=device-rsa;type=private"
            ));
            let key = stores.open(&u).unwrap();
            assert_eq!(key.algorithm(), KeyAlgorithm::Rsa { bits: 2048 });
            // SoftHSM2 has CKM_RSA_PKCS_PSS and CKM_RSA_PKCS: all six, PSS first.
            let schemes = key.supported_schemes();
            assert_eq!(schemes, KeyAlgorithm::Rsa { bits: 2048 }.schemes());
            assert_eq!(schemes[0], SignScheme::RsaPss(HashAlg::Sha256));
            for scheme in schemes {
                let sig = key.sign_message(scheme, b"certificate verify").unwrap();
                assert_eq!(sig.len(), 256, "{scheme}");
                assert!(
                    verify_rsa(key.public_key_der(), scheme, b"certificate verify", &sig),
                    "{scheme} does not verify"
                );
                assert!(!verify_rsa(
                    key.public_key_der(),
                    scheme,
                    b"certificate verifY",
                    &sig
                ));
            }
            // The CSR default (sha256WithRSAEncryption) verifies too.
            let sig = key
                .sign_message(key.algorithm().default_scheme(), b"x")
                .unwrap();
            assert!(verify(key.public_key_der(), key.algorithm(), b"x", &sig));
            let e = key
                .sign_digest(SignScheme::Ecdsa(HashAlg::Sha256), &[0u8; 32])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("cannot make a ECDSA with SHA-256 signature"),
                "{e}"
            );
            let e = key
                .sign_digest(SignScheme::RsaPss(HashAlg::Sha384), &[0u8; 32])
                .unwrap_err()
                .to_string();
            assert!(e.contains("expected 48"), "{e}");
            let spki = key.public_key_der().to_vec();

            // A key imported without its public half: the modulus and exponent
            // come from the private-key object.
            pkcs11_tool(fx, &["--delete-object", "--type", "pubkey", "--id", "0a0b"]);
            let again = fx.stores().open(&u).unwrap();
            assert_eq!(again.public_key_der(), &spki[..]);
            let sig = again
                .sign_message(SignScheme::RsaPss(HashAlg::Sha512), b"m")
                .unwrap();
            assert!(verify_rsa(
                &spki,
                SignScheme::RsaPss(HashAlg::Sha512),
                b"m",
                &sig
            ));

            // dps-agent never makes RSA keys in a token.
            let e = stores
                .generate_at("rsa-new", KeyAlgorithm::Rsa { bits: 2048 })
                .unwrap_err();
            assert!(matches!(e, KeyError::Unsupported { .. }), "{e}");
        },
    );
}

/// In a shared token, another application's key labelled like ours but
/// without dps-agent's CKA_ID mark is never listed, so never swept.
#[test]
fn a_foreign_key_with_an_operational_label_is_not_ours() {
    in_softhsm(
        test_name!(a_foreign_key_with_an_operational_label_is_not_ours),
        |fx| {
            pkcs11_tool(
                fx,
                &[
                    "--keypairgen",
                    "--key-type",
                    "EC:prime256v1",
                    "--label",
                    "op-20260101T000000Z",
                    "--id",
                    "0102030405",
                ],
            );
            let store = fx.stores().default_store().unwrap();
            assert!(store.list().unwrap().is_empty(), "a foreign key was listed");
            let ours = store
                .commit(&store.generate("op-ours", KeyAlgorithm::EcdsaP256).unwrap())
                .unwrap();
            assert_eq!(store.list().unwrap(), vec![ours]);
            assert_eq!(objects_with_id(&store, &[1, 2, 3, 4, 5]), (1, 1));
        },
    );
}
