//! Onboarding with the files Microsoft's X.509 setup guides make with openssl
//! (an RSA-4096 root and intermediate, a device key from `openssl genrsa`,
//! device.pem and device-full-chain.pem), used as they are, against dps-sim; the
//! older key formats people also arrive with (PKCS#1, SEC1); an RSA key inside a
//! PKCS#11 token; and, for the usual mistakes, a clear error before any network
//! traffic.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dps_agent_e2e::softhsm::SoftHsm;
use dps_agent_e2e::*;
use serde_json::Value;

/// The guide's files, made by `tests/e2e/scripts/azure-guide-certs.sh`.
struct Guide {
    dir: PathBuf,
}

impl Guide {
    /// The root and intermediate CAs (RSA-4096), as the guide makes them.
    fn new(dir: &Path) -> Guide {
        script(
            &["create_root_and_intermediate", &dir.display().to_string()],
            &[],
        );
        Guide {
            dir: dir.to_path_buf(),
        }
    }

    /// A device certificate for `cn` and its key, named `name` (env: see the script).
    fn device(&self, cn: &str, name: &str, env: &[(&str, &str)]) {
        script(
            &[
                "create_device_certificate",
                &self.dir.display().to_string(),
                cn,
                name,
            ],
            env,
        );
    }

    fn root(&self) -> PathBuf {
        self.dir.join("certs/azure-iot-test-only.root.ca.cert.pem")
    }

    fn intermediate(&self) -> PathBuf {
        self.dir
            .join("certs/azure-iot-test-only.intermediate.cert.pem")
    }

    fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("private/{name}.key"))
    }

    fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("certs/{name}.pem"))
    }

    fn full_chain(&self, name: &str) -> PathBuf {
        self.dir.join(format!("certs/{name}-full-chain.pem"))
    }
}

fn script(args: &[&str], env: &[(&str, &str)]) {
    let path = workspace_root().join("tests/e2e/scripts/azure-guide-certs.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&path).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = run(&mut cmd);
    assert!(
        o.status.success(),
        "{} {args:?}: {}",
        path.display(),
        text(&o)
    );
}

/// A simulator whose enrollment trusts `trust` (the guide's root, …).
fn sim(d: &TestDir, name: &str, pki: &Pki, trust: &[&Path]) -> Sim {
    let mut extra = Vec::new();
    for t in trust {
        extra.push("--trust-ca".to_string());
        extra.push(t.display().to_string());
    }
    Sim::start(
        &d.join(name),
        pki,
        &SimOptions {
            retry_after: Some(0),
            extra,
            ..Default::default()
        },
    )
}

/// A config for `sim` with this bootstrap certificate and key, state in `dir`.
fn config(dir: &Path, sim: &Sim, cert: &Path, key: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let mut setup = AgentSetup::for_sim(dir, sim);
    setup.identity_cert = cert.to_path_buf();
    setup.identity_key = key.to_string();
    setup.write(&dir.join("config.toml"))
}

fn file_uri(p: &Path) -> String {
    format!("file:{}", p.display())
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The DPS connections the simulator saw since `from` events.
fn dps_connects(sim: &Sim, from: usize) -> Vec<Value> {
    sim.events()
        .into_iter()
        .skip(from)
        .filter(|e| e["event"] == "connect" && e["service"] != "hub")
        .collect()
}

/// `run --once` provisions; the stored operational chain verifies with openssl
/// against the simulator's issuing root, and its leaf holds the agent's EC key.
fn provisions(cfg: &Path, state: &Path, pki: &Pki) {
    let o = agent(cfg, &["run", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        stdout(&o).contains("provisioned as device gw-0001"),
        "{}",
        text(&o)
    );
    let chain = fs::read_to_string(state.join("operational-chain.pem")).unwrap();
    let certs = split_pem(&chain);
    assert_eq!(certs.len(), 3, "{chain}");
    let leaf = state.join("check-leaf.pem");
    let ica = state.join("check-ica.pem");
    fs::write(&leaf, &certs[0]).unwrap();
    fs::write(&ica, &certs[1]).unwrap();
    let verdict = openssl(&[
        "verify",
        "-CAfile",
        &pki.file("issuing-root.pem").display().to_string(),
        "-untrusted",
        &ica.display().to_string(),
        &leaf.display().to_string(),
    ]);
    assert!(verdict.trim().ends_with(": OK"), "{verdict}");
    // The operational key stays EC (P-384 here), whatever the bootstrap key is.
    let leaf_text = openssl(&[
        "x509",
        "-in",
        &leaf.display().to_string(),
        "-noout",
        "-text",
    ]);
    assert!(leaf_text.contains("ASN1 OID: secp384r1"), "{leaf_text}");
    let id: Value =
        serde_json::from_str(&fs::read_to_string(state.join("identity.json")).unwrap()).unwrap();
    let key = PathBuf::from(
        id["key_uri"]
            .as_str()
            .unwrap()
            .strip_prefix("file:")
            .unwrap(),
    );
    assert_eq!(cert_pubkey(&leaf), key_pubkey(&key));
}

#[test]
fn onboards_with_the_guide_files_unchanged() {
    let d = TestDir::new("azure-guide");
    let pki = Pki::generate(&d.join("pki"));
    let guide = Guide::new(&d.join("guide"));
    guide.device(REG_ID, "device", &[]);
    // What the guide's openssl made: an RSA-2048 PKCS#8 key (OpenSSL 3), a
    // device certificate with clientAuth and a DNS name, and the full chain.
    let key_text = fs::read_to_string(guide.key("device")).unwrap();
    assert!(
        key_text.starts_with("-----BEGIN PRIVATE KEY-----"),
        "{key_text}"
    );
    let cert_text = openssl(&[
        "x509",
        "-in",
        &guide.cert("device").display().to_string(),
        "-noout",
        "-text",
    ]);
    for want in [
        "Public-Key: (2048 bit)",
        "TLS Web Client Authentication",
        "DNS:gw-0001",
    ] {
        assert!(cert_text.contains(want), "{want}: {cert_text}");
    }
    let root_text = openssl(&[
        "x509",
        "-in",
        &guide.root().display().to_string(),
        "-noout",
        "-text",
    ]);
    assert!(root_text.contains("Public-Key: (4096 bit)"), "{root_text}");
    assert_eq!(
        split_pem(&fs::read_to_string(guide.full_chain("device")).unwrap()).len(),
        3
    );

    // The enrollment trusts the root only: the intermediate must come from the device.
    let sim = sim(&d, "sim", &pki, &[&guide.root()]);
    let state_dir = d.join("agent");
    let cfg = config(
        &state_dir,
        &sim,
        &guide.full_chain("device"),
        &file_uri(&guide.key("device")),
    );

    let o = agent(&cfg, &["check-config"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = stdout(&o);
    assert!(
        out.contains("bootstrap credential: OK: CN=gw-0001 (rsa-2048 key file:"),
        "{out}"
    );
    assert!(out.contains("presents 2 of the 3 certificate(s)"), "{out}");
    assert!(out.contains("(not the root)"), "{out}");
    assert_eq!(sim.connections(), 0, "check-config stays off the network");

    provisions(&cfg, &state_dir.join("state"), &pki);

    // What the simulator's TLS layer received: the leaf and the intermediate,
    // not the root; and the enrollment accepted the chain.
    let connects = dps_connects(&sim, 0);
    assert_eq!(connects.len(), 1, "{connects:?}");
    assert_eq!(connects[0]["result"], "accepted", "{}", connects[0]);
    assert_eq!(connects[0]["cert_cn"], REG_ID);
    assert_eq!(connects[0]["cert_chain_len"], 2, "{}", connects[0]);
}

#[test]
fn pkcs1_and_sec1_key_files_and_short_chains_onboard() {
    let d = TestDir::new("azure-guide-formats");
    let pki = Pki::generate(&d.join("pki"));
    let guide = Guide::new(&d.join("guide"));
    guide.device(REG_ID, "device", &[]);
    guide.device(REG_ID, "ecdev", &[("DEVICE_KEY_TYPE", "ec")]);
    // Older tools: PKCS#1 ("BEGIN RSA PRIVATE KEY").
    let pkcs1 = guide.dir.join("private/device.pkcs1.key");
    openssl(&[
        "rsa",
        "-in",
        &guide.key("device").display().to_string(),
        "-traditional",
        "-out",
        &pkcs1.display().to_string(),
    ]);
    assert!(fs::read_to_string(&pkcs1)
        .unwrap()
        .starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    // SEC1 as `openssl ecparam -genkey` writes it (EC PARAMETERS block first),
    // and as `openssl ec` rewrites it (the key block alone).
    let ecparam = guide.key("ecdev");
    assert!(fs::read_to_string(&ecparam)
        .unwrap()
        .starts_with("-----BEGIN EC PARAMETERS-----"));
    let sec1 = guide.dir.join("private/ecdev.sec1.key");
    openssl(&[
        "ec",
        "-in",
        &ecparam.display().to_string(),
        "-out",
        &sec1.display().to_string(),
    ]);
    assert!(fs::read_to_string(&sec1)
        .unwrap()
        .starts_with("-----BEGIN EC PRIVATE KEY-----"));
    // Leaf + intermediate (no root), and the leaf alone.
    let partial = guide.dir.join("certs/device-partial-chain.pem");
    fs::write(
        &partial,
        fs::read_to_string(guide.cert("device")).unwrap()
            + &fs::read_to_string(guide.intermediate()).unwrap(),
    )
    .unwrap();

    // The enrollment trusts the root and the intermediate, so a leaf alone works.
    let sim = sim(&d, "sim", &pki, &[&guide.root(), &guide.intermediate()]);
    for (name, cert, key, algorithm, presented) in [
        ("pkcs1", partial.clone(), pkcs1.clone(), "rsa-2048", 2),
        (
            "ecparam",
            guide.full_chain("ecdev"),
            ecparam.clone(),
            "ecdsa-p256",
            2,
        ),
        ("sec1", guide.cert("ecdev"), sec1.clone(), "ecdsa-p256", 1),
    ] {
        let before = sim.events().len();
        let dir = d.join(name);
        let cfg = config(&dir, &sim, &cert, &file_uri(&key));
        let o = agent(&cfg, &["check-config"]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        assert!(
            stdout(&o).contains(&format!("({algorithm} key file:")),
            "{name}: {}",
            text(&o)
        );
        provisions(&cfg, &dir.join("state"), &pki);
        let connects = dps_connects(&sim, before);
        assert_eq!(connects.len(), 1, "{name}: {connects:?}");
        assert_eq!(connects[0]["result"], "accepted", "{name}: {}", connects[0]);
        assert_eq!(
            connects[0]["cert_chain_len"], presented,
            "{name}: {}",
            connects[0]
        );
    }
}

#[test]
fn an_rsa_key_in_a_pkcs11_token_onboards() {
    let d = TestDir::new("azure-guide-pkcs11");
    let pki = Pki::generate(&d.join("pki"));
    let guide = Guide::new(&d.join("guide"));
    // A secure element with an RSA-2048 key made inside it.
    let hsm = SoftHsm::new(&d.join("softhsm"), "bootstrap");
    hsm.pkcs11_tool_login(&[
        "--keypairgen",
        "--key-type",
        "rsa:2048",
        "--label",
        "device-rsa",
        "--id",
        "0a0b",
    ]);
    let uri = "pkcs11:token=bootstrap;object=device-rsa;type=private";
    let sim = sim(&d, "sim", &pki, &[&guide.root()]);
    let dir = d.join("agent");
    fs::create_dir_all(&dir).unwrap();
    let mut setup = AgentSetup::for_sim(&dir, &sim);
    setup.identity_cert = guide.full_chain("device-rsa");
    setup.identity_key = uri.to_string();
    setup.extra = hsm.config_toml();
    let cfg = setup.write(&dir.join("config.toml"));

    // dps-agent makes the CSR with the token's key; the guide's intermediate signs it.
    let csr = d.join("device-rsa.csr");
    let o = hsm.agent(
        &cfg,
        &[
            "csr",
            "--key",
            uri,
            "--cn",
            REG_ID,
            "--out",
            &csr.display().to_string(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let req = openssl(&[
        "req",
        "-in",
        &csr.display().to_string(),
        "-noout",
        "-text",
        "-verify",
    ]);
    assert!(
        req.contains("sha256WithRSAEncryption") && req.contains("Public-Key: (2048 bit)"),
        "{req}"
    );
    script(
        &[
            "sign_device_csr",
            &guide.dir.display().to_string(),
            &csr.display().to_string(),
            "device-rsa",
        ],
        &[],
    );

    let o = hsm.agent(&cfg, &["check-config"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        stdout(&o).contains("(rsa-2048 key pkcs11:token=bootstrap;object=device-rsa"),
        "{}",
        text(&o)
    );
    let o = hsm.agent(&cfg, &["run", "--once"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        stdout(&o).contains("provisioned as device gw-0001"),
        "{}",
        text(&o)
    );
    let connects = dps_connects(&sim, 0);
    assert_eq!(connects.len(), 1, "{connects:?}");
    assert_eq!(connects[0]["result"], "accepted", "{}", connects[0]);
    assert_eq!(connects[0]["cert_chain_len"], 2, "{}", connects[0]);
}

#[test]
fn bad_bootstrap_credentials_are_refused_before_any_network_traffic() {
    let d = TestDir::new("azure-guide-refusals");
    let pki = Pki::generate(&d.join("pki"));
    let guide = Guide::new(&d.join("guide"));
    guide.device(REG_ID, "device", &[]);
    guide.device(REG_ID, "other", &[]);
    guide.device("gw-0002", "wrongcn", &[]);
    guide.device(REG_ID, "expired", &[("DEVICE_EXPIRED", "1")]);
    let device_key = guide.key("device").display().to_string();
    let enc8 = guide.dir.join("private/device.enc8.key");
    openssl(&[
        "pkey",
        "-in",
        &device_key,
        "-aes256",
        "-passout",
        "pass:1234",
        "-out",
        &enc8.display().to_string(),
    ]);
    let enc1 = guide.dir.join("private/device.enc1.key");
    openssl(&[
        "rsa",
        "-in",
        &device_key,
        "-aes256",
        "-traditional",
        "-passout",
        "pass:1234",
        "-out",
        &enc1.display().to_string(),
    ]);
    assert!(fs::read_to_string(&enc1)
        .unwrap()
        .contains("Proc-Type: 4,ENCRYPTED"));

    let sim = sim(&d, "sim", &pki, &[&guide.root()]);
    let encrypted = "encrypted keys are not supported; decrypt it or move it into the TPM/HSM";
    let cases: Vec<(&str, PathBuf, PathBuf, Vec<String>)> = vec![
        (
            "encrypted-pkcs8",
            guide.full_chain("device"),
            enc8.clone(),
            vec![format!("{}: {encrypted}", enc8.display())],
        ),
        (
            "encrypted-pkcs1",
            guide.full_chain("device"),
            enc1.clone(),
            vec![format!("{}: {encrypted}", enc1.display())],
        ),
        (
            "key-of-another-device",
            guide.full_chain("device"),
            guide.key("other"),
            vec![
                "the certificate (CN=gw-0001, an RSA-2048 key) was made for another key than file:"
                    .into(),
                "point [dps.attestation] identity_key at the key this certificate was made for"
                    .into(),
            ],
        ),
        (
            "wrong-cn",
            guide.full_chain("wrongcn"),
            guide.key("wrongcn"),
            vec![
                "the certificate's CN is \"gw-0002\" but [dps] registration_id is \"gw-0001\""
                    .into(),
                "DPS requires them to be equal".into(),
            ],
        ),
        (
            "expired",
            guide.full_chain("expired"),
            guide.key("expired"),
            vec![
                "certificate CN=gw-0001 expired at 2020-02-01T00:00:00Z".into(),
                "ask your CA for a new bootstrap certificate".into(),
            ],
        ),
    ];
    for (name, cert, key, wants) in cases {
        let dir = d.join(name);
        let cfg = config(&dir, &sim, &cert, &file_uri(&key));
        // check-config: exit 1, every problem with its fix.
        let o = agent(&cfg, &["check-config"]);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", text(&o));
        let err = stderr(&o);
        assert!(
            err.contains("dps-agent: error: the bootstrap credential has 1 problem:"),
            "{name}: {err}"
        );
        assert!(err.contains("\n    fix: "), "{name}: {err}");
        let err = err.replace("\n    fix: ", "; ");
        for want in &wants {
            assert!(
                err.contains(want.as_str()),
                "{name}: want {want:?} in:\n{err}"
            );
        }
        // The config itself is fine: --config-only says so.
        let o = agent(&cfg, &["check-config", "--config-only"]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        // run --once: the same refusal, fatal (exit 1, not 75), and nothing
        // reached the simulator.
        let o = agent(&cfg, &["run", "--once"]);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", text(&o));
        let err = stderr(&o).replace("\n    fix: ", "; ");
        for want in &wants {
            assert!(
                err.contains(want.as_str()),
                "{name}: want {want:?} in:\n{err}"
            );
        }
        assert_eq!(
            sim.connections(),
            0,
            "{name}: the simulator saw a connection"
        );
        assert!(
            of_kind(&sim.events(), "tls_error").is_empty(),
            "{name}: the simulator saw a TLS handshake"
        );
    }
}

#[test]
fn rsa_operational_keys_are_refused_by_the_config() {
    let d = TestDir::new("azure-guide-operational");
    let pki = Pki::generate(&d.join("pki"));
    let sim = sim(&d, "sim", &pki, &[&pki.file("bootstrap-root.pem")]);
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    setup.key_algorithm = "rsa-2048".into();
    let cfg = setup.write(&d.join("config.toml"));
    let o = agent(&cfg, &["check-config"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = stderr(&o);
    assert!(
        err.contains("[operational] key_algorithm = \"rsa-2048\" is not supported: operational keys are ECDSA"),
        "{err}"
    );
    assert!(
        err.contains(
            "use \"ecdsa-p384\" or \"ecdsa-p256\"; an RSA key is fine as the bootstrap key"
        ),
        "{err}"
    );
}
