//! The TPM backend against a real TPM 2.0 implementation (swtpm, one private
//! instance per test) and the error messages of the ways it fails.

use std::time::Instant;

use super::testutil::{mode, verify, TestTpm};
use super::*;
use crate::keys::{HashAlg, SignScheme};

fn store(tpm: &TestTpm) -> TpmKeyStore {
    TpmKeyStore::open(&tpm.tcti(), &tpm.path("keys")).expect("connect to swtpm")
}

#[test]
fn generates_signs_lists_and_deletes_keys() {
    let tpm = TestTpm::start();
    let store = store(&tpm);
    for alg in KeyAlgorithm::ALL {
        let uri = store.generate(&format!("op-{}", alg.name()), alg).unwrap();
        let path = uri.path().unwrap();
        assert!(uri.as_str().starts_with("tpm:/"), "{uri}");
        assert!(path.to_string_lossy().ends_with(".tss2.pem"));
        assert_eq!(mode(&path), 0o600);
        let file = TpmKeyFile::from_pem(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(file.parent, PARENT_OWNER, "no SRK in a fresh swtpm");
        assert!(file.empty_auth);

        let key = store.open(&uri).unwrap();
        assert_eq!(key.algorithm(), alg);
        let p384 = alg == KeyAlgorithm::EcdsaP384;
        let sig = key.sign_message(alg.default_scheme(), b"hello").unwrap();
        assert!(verify(key.public_key_der(), p384, b"hello", &sig));
        assert!(!verify(key.public_key_der(), p384, b"hellO", &sig));

        // The hash is fixed in the key; the digest must have its length.
        let other = if p384 {
            HashAlg::Sha256
        } else {
            HashAlg::Sha384
        };
        let err = key
            .sign_message(SignScheme::Ecdsa(other), b"x")
            .unwrap_err();
        assert!(err.to_string().contains("signs only ECDSA with"), "{err}");
        let hash = alg.default_scheme().hash();
        let err = key
            .sign_digest(SignScheme::Ecdsa(hash), &[0u8; 20])
            .unwrap_err();
        assert!(err.to_string().contains("digest is 20 bytes"), "{err}");
    }
    assert_eq!(store.transient_handles().unwrap(), Vec::<u32>::new());
    assert!(store.persistent_handles().unwrap().is_empty());
    assert!(store.curves().unwrap().contains(&"NIST P-384"));

    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for uri in listed {
        store.delete(&uri).unwrap();
        store.delete(&uri).unwrap();
        assert!(matches!(store.open(&uri), Err(KeyError::NotFound { .. })));
    }
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn onboarding_key_file_rules() {
    let tpm = TestTpm::start();
    let store = store(&tpm);
    let err = store
        .generate_file(&tpm.path("device.key"), KeyAlgorithm::EcdsaP256)
        .unwrap_err();
    assert!(err.to_string().contains("must end in .tss2.pem"), "{err}");
    let path = tpm.path("boot/device.tss2.pem");
    let uri = store.generate_file(&path, KeyAlgorithm::EcdsaP256).unwrap();
    assert_eq!(uri.as_str(), format!("tpm:{}", path.display()));
    let err = store
        .generate_file(&path, KeyAlgorithm::EcdsaP256)
        .unwrap_err();
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    // Not in the key directory: not listed as an operational key.
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn uses_the_persistent_srk_when_present() {
    let tpm = TestTpm::start();
    tpm.make_primary("srk.ctx");
    tpm.tpm2(
        "tpm2_evictcontrol",
        &["-C", "o", "-c", "srk.ctx", "0x81000001"],
    );
    let store = store(&tpm);
    let uri = store.generate("op-a", KeyAlgorithm::EcdsaP384).unwrap();
    let file = TpmKeyFile::from_pem(&fs::read_to_string(uri.path().unwrap()).unwrap()).unwrap();
    assert_eq!(file.parent, SRK_HANDLE);
    let key = store.open(&uri).unwrap();
    let sig = key
        .sign_message(SignScheme::Ecdsa(HashAlg::Sha384), b"m")
        .unwrap();
    assert!(verify(key.public_key_der(), true, b"m", &sig));
    assert!(store.transient_handles().unwrap().is_empty());
}

#[test]
fn persistent_keys_made_elsewhere_sign_but_are_never_deleted() {
    let tpm = TestTpm::start();
    tpm.persist_key(
        "ecc256:ecdsa-sha256",
        "0x81000101",
        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
    );
    let store = store(&tpm);
    let uri = KeyUri::parse("tpm:handle=0x81000101").unwrap();
    let key = store.open(&uri).unwrap();
    assert_eq!(key.algorithm(), KeyAlgorithm::EcdsaP256);
    let sig = key
        .sign_message(SignScheme::Ecdsa(HashAlg::Sha256), b"m")
        .unwrap();
    assert!(verify(key.public_key_der(), false, b"m", &sig));

    let err = store.delete(&uri).unwrap_err().to_string();
    assert!(err.contains("did not make this persistent key"), "{err}");
    assert!(
        err.contains("tpm2_evictcontrol -C o -c 0x81000101"),
        "{err}"
    );
    assert_eq!(store.persistent_handles().unwrap(), vec![0x8100_0101]);

    let missing = KeyUri::parse("tpm:handle=0x81000102").unwrap();
    let err = store.open(&missing).err().unwrap();
    assert!(matches!(err, KeyError::NotFound { .. }), "{err}");
    let bad = KeyUri::parse("tpm:handle=0x80000001").unwrap();
    assert!(matches!(store.open(&bad), Err(KeyError::BadUri { .. })));
    assert!(store.transient_handles().unwrap().is_empty());
}

/// After a TPM clear the owner seed is new: the primary re-created from the
/// template is a different key, and old blobs no longer load.
#[test]
fn a_cleared_tpm_reports_the_key_as_lost() {
    let tpm = TestTpm::start();
    let uri = {
        let store = store(&tpm);
        store.generate("op-lost", KeyAlgorithm::EcdsaP256).unwrap()
    }; // dropping the store disconnects (swtpm serves one client)
    tpm.tpm2("tpm2_clear", &["-c", "p"]);
    let store = store(&tpm);
    let err = store.open(&uri).err().unwrap();
    let text = err.to_string();
    assert!(
        matches!(err, KeyError::Tpm(TpmError::KeyLost { .. })),
        "{text}"
    );
    assert!(
        text.contains("can no longer be used with this TPM"),
        "{text}"
    );
    assert!(
        text.contains("Delete the file and make a new key"),
        "{text}"
    );
    assert!(store.transient_handles().unwrap().is_empty());
}

/// A key without noDA is refused while the TPM is in dictionary-attack lockout.
#[test]
fn lockout_is_explained() {
    let tpm = TestTpm::start();
    tpm.persist_key(
        "ecc256:ecdsa-sha256",
        "0x81000102",
        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
    );
    tpm.tpm2(
        "tpm2_dictionarylockout",
        &["-s", "-n", "1", "-t", "3600", "-l", "3600"],
    );
    // One wrong password on the DA-protected key: the TPM locks out.
    fs::write(tpm.path("msg"), b"m").unwrap();
    let o = std::process::Command::new("tpm2_sign")
        .args([
            "-c",
            "0x81000102",
            "-p",
            "wrong",
            "-g",
            "sha256",
            "-o",
            "sig",
            "msg",
        ])
        .current_dir(&tpm.dir)
        .env("TPM2TOOLS_TCTI", tpm.tcti())
        .env("TSS2_LOG", "all+NONE")
        .output()
        .unwrap();
    assert!(!o.status.success(), "a wrong password must fail");
    let store = store(&tpm);
    let key = store
        .open(&KeyUri::parse("tpm:handle=0x81000102").unwrap())
        .unwrap();
    let err = key
        .sign_message(SignScheme::Ecdsa(HashAlg::Sha256), b"m")
        .unwrap_err();
    assert!(
        matches!(err, KeyError::Tpm(TpmError::Lockout { .. })),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("tpm2_dictionarylockout --clear-lockout"),
        "{err}"
    );
    // Our own keys have noDA: they keep working during a lockout.
    let uri = store.generate("op-noda", KeyAlgorithm::EcdsaP256).unwrap();
    let key = store.open(&uri).unwrap();
    assert!(key
        .sign_message(SignScheme::Ecdsa(HashAlg::Sha256), b"m")
        .is_ok());
}

/// An idle store lets go of the TPM (swtpm serves one client; /dev/tpm0 is
/// exclusive) and connects again for the next job, also after a TPM reset.
#[test]
fn idle_connection_is_released_and_reopened_after_a_tpm_reset() {
    let mut tpm = TestTpm::start();
    let store = store(&tpm);
    let uri = store.generate("op-idle", KeyAlgorithm::EcdsaP256).unwrap();
    let key = store.open(&uri).unwrap();
    std::thread::sleep(worker::IDLE_CLOSE + std::time::Duration::from_millis(500));
    // Another client gets the TPM while the store is still alive.
    let out = tpm.tpm2("tpm2_getcap", &["handles-transient"]);
    assert_eq!(out.trim(), "");
    tpm.restart();
    let sig = key
        .sign_message(SignScheme::Ecdsa(HashAlg::Sha256), b"after reset")
        .unwrap();
    assert!(verify(key.public_key_der(), false, b"after reset", &sig));
}

#[test]
fn missing_device_is_named() {
    let err = TpmKeyStore::open("device:/dev/nonexistent-tpm", Path::new("/nonexistent"))
        .err()
        .unwrap();
    assert!(matches!(err, TpmError::NoDevice { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("no TPM at /dev/nonexistent-tpm: the device does not exist"),
        "{err}"
    );
}

#[test]
fn unreachable_simulator_and_bad_tcti() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = TpmKeyStore::open(
        &format!("swtpm:host=127.0.0.1,port={port}"),
        Path::new("/x"),
    )
    .err()
    .unwrap();
    assert!(matches!(err, TpmError::Connect { .. }), "{err:?}");
    assert!(
        err.to_string().contains("is the simulator running"),
        "{err}"
    );

    let err = TpmKeyStore::open("floppy:", Path::new("/x")).err().unwrap();
    assert!(matches!(err, TpmError::BadTcti { .. }), "{err:?}");
}

/// Debian's libtss2-dev does not pull in the tpm2-abrmd TCTI: without it the
/// message names the package to install.
#[test]
fn missing_tcti_library_names_the_package() {
    let installed = ["/usr/lib", "/usr/lib64", "/lib", "/usr/local/lib"]
        .iter()
        .flat_map(|d| {
            [
                Path::new(d).join("libtss2-tcti-tabrmd.so.0"),
                Path::new(d)
                    .join(format!("{}-linux-gnu", std::env::consts::ARCH))
                    .join("libtss2-tcti-tabrmd.so.0"),
            ]
        })
        .any(|p| p.exists());
    let err = TpmKeyStore::open("tabrmd:", Path::new("/x")).err().unwrap();
    if installed {
        // Library present, no daemon on this machine's D-Bus.
        assert!(err.to_string().contains("tpm2-abrmd"), "{err}");
    } else {
        assert!(matches!(err, TpmError::TctiMissing { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("apt-get install libtss2-tcti-tabrmd0"),
            "{err}"
        );
    }
}

#[test]
fn uri_forms() {
    let t = |s: &str| target(&KeyUri::parse(s).unwrap());
    assert_eq!(
        t("tpm:/var/lib/dps-agent/keys/op-1.tss2.pem").unwrap(),
        Target::File(PathBuf::from("/var/lib/dps-agent/keys/op-1.tss2.pem"))
    );
    assert_eq!(
        t("tpm:handle=0x81000101").unwrap(),
        Target::Handle(0x8100_0101)
    );
    assert_eq!(
        t("tpm:handle=2164261121").unwrap(),
        Target::Handle(0x8100_0101)
    );
    assert!(t("tpm:handle=zz").is_err());
    assert!(t("tpm:handle=0x40000001").is_err());
    assert!(target(&KeyUri::parse("file:/a.key").unwrap()).is_err());
}

/// Figures for the design notes (printed; run with --nocapture): TPM commands
/// per operation, counted in swtpm's log, and sign latency through the whole
/// path (job → CreatePrimary → Load → Flush → Sign → Flush → DER), median of 50.
/// Timings are never asserted; the signatures are.
#[test]
fn sign_cost_on_swtpm() {
    let tpm = TestTpm::start();
    let attrs = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|sign";
    tpm.persist_key("ecc384:ecdsa-sha384", "0x81000103", attrs);
    tpm.persist_key("ecc256:ecdsa-sha256", "0x81000104", attrs);
    let store = store(&tpm);
    for alg in KeyAlgorithm::ALL {
        let before = tpm.commands();
        let uri = store.generate(&format!("op-{}", alg.name()), alg).unwrap();
        let after_generate = tpm.commands();
        let key = store.open(&uri).unwrap();
        let after_open = tpm.commands();
        let scheme = alg.default_scheme();
        key.sign_message(scheme, b"warm-up").unwrap();
        let after_sign = tpm.commands();
        println!(
            "tpm {alg}: TPM commands: generate {}, open {}, sign {}",
            after_generate - before,
            after_open - after_generate,
            after_sign - after_open
        );
        let mut times = Vec::new();
        for i in 0..50u32 {
            let msg = i.to_be_bytes();
            let t = Instant::now();
            let sig = key.sign_message(scheme, &msg).unwrap();
            times.push(t.elapsed());
            assert!(verify(
                key.public_key_der(),
                alg == KeyAlgorithm::EcdsaP384,
                &msg,
                &sig
            ));
        }
        times.sort();
        println!(
            "tpm {alg}: sign latency (key file, primary re-created per sign): median {:?}, min {:?}, max {:?}",
            times[25], times[0], times[49]
        );
    }
    for (handle, alg) in [
        ("0x81000103", KeyAlgorithm::EcdsaP384),
        ("0x81000104", KeyAlgorithm::EcdsaP256),
    ] {
        let key = store
            .open(&KeyUri::parse(&format!("tpm:handle={handle}")).unwrap())
            .unwrap();
        let before = tpm.commands();
        let mut times = Vec::new();
        for i in 0..50u32 {
            let t = Instant::now();
            let sig = key
                .sign_message(alg.default_scheme(), &i.to_be_bytes())
                .unwrap();
            times.push(t.elapsed());
            assert!(verify(
                key.public_key_der(),
                alg == KeyAlgorithm::EcdsaP384,
                &i.to_be_bytes(),
                &sig
            ));
        }
        times.sort();
        println!(
            "tpm {alg}: sign latency (persistent key: ReadPublic + Sign, {} commands per sign): median {:?}",
            (tpm.commands() - before) / 50,
            times[25]
        );
    }
    assert!(store.transient_handles().unwrap().is_empty());
}

/// swtpm, like a raw /dev/tpm0, has no resource manager: a client killed in
/// the middle of a TPM command leaves its objects loaded, and a TPM holds only
/// a few. The next connection flushes them, or nothing could be made or loaded.
#[test]
fn a_connection_flushes_objects_a_dead_client_left_loaded() {
    let tpm = TestTpm::start();
    tpm.leak_primaries(3);
    let store = store(&tpm);
    assert!(store.transient_handles().unwrap().is_empty());
    let uri = store
        .generate("op-after-leak", KeyAlgorithm::EcdsaP256)
        .expect("the TPM has room again");
    let key = store.open(&uri).unwrap();
    let sig = key
        .sign_message(KeyAlgorithm::EcdsaP256.default_scheme(), b"hello")
        .unwrap();
    assert!(verify(key.public_key_der(), false, b"hello", &sig));
    assert!(ops::has_resource_manager("device:/dev/tpmrm0"));
    assert!(ops::has_resource_manager("tabrmd:bus_type=system"));
    assert!(!ops::has_resource_manager("device:/dev/tpm0"));
    assert!(!ops::has_resource_manager(&tpm.tcti()));
}
