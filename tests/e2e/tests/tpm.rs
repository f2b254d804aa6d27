//! The TPM key backend end to end, on swtpm: onboarding with a bootstrap key
//! made in the TPM (keygen → CSR → your CA → full chain, the README flow),
//! provisioning with the operational key in the TPM too, the key surviving a
//! TPM reset, tpm2-openssl using the key files dps-agent writes, and what the
//! user is told when the TPM was cleared or the device is not accessible.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dps_agent_e2e::swtpm::{command_histogram, Swtpm, TSS2_LOG};
use dps_agent_e2e::*;
use serde_json::Value;

/// `dps-agent --config CONFIG args…` with libtss2's expected-error noise off.
fn agent_tpm(config: &Path, args: &[&str]) -> Output {
    run(Command::new(bin("dps-agent"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env(TSS2_LOG.0, TSS2_LOG.1))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A gateway provisioned against dps-sim with both keys in swtpm.
struct Provisioned {
    d: TestDir,
    tpm: Swtpm,
    _sim: Sim,
    setup: AgentSetup,
    cfg: PathBuf,
    /// TPM commands `run --once` sent, in order.
    commands: Vec<u32>,
}

impl Provisioned {
    fn op_key_uri(&self) -> String {
        let id: Value = serde_json::from_str(
            &fs::read_to_string(self.setup.state_dir.join("identity.json")).unwrap(),
        )
        .unwrap();
        id["key_uri"].as_str().unwrap().to_string()
    }

    fn op_key_path(&self) -> PathBuf {
        PathBuf::from(self.op_key_uri().strip_prefix("tpm:").unwrap())
    }

    /// The issued leaf certificate, written to a file.
    fn leaf(&self) -> PathBuf {
        let chain = fs::read_to_string(self.setup.state_dir.join("operational-chain.pem")).unwrap();
        let certs = split_pem(&chain);
        assert_eq!(certs.len(), 3, "{chain}");
        let leaf = self.d.join("leaf.pem");
        fs::write(&leaf, &certs[0]).unwrap();
        leaf
    }

    /// Rewrites the config (the TCTI changes if swtpm had to move ports).
    fn rewrite_config(&mut self) {
        self.setup.extra = format!("\n[tpm]\ntcti = \"{}\"\n", self.tpm.tcti());
        self.setup.write(&self.cfg);
    }
}

/// The README's onboarding flow with the TPM, then `run --once`.
fn provision(name: &str) -> Provisioned {
    let d = TestDir::new(name);
    let pki = Pki::generate(&d.join("pki"));
    let tpm = Swtpm::start(&d.join("swtpm"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            ..Default::default()
        },
    );
    let boot = d.join("bootstrap");
    fs::create_dir_all(&boot).unwrap();
    let boot_key = boot.join("device.tss2.pem");
    let chain = boot.join("device-full-chain.pem");
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    setup.identity_cert = chain.clone();
    setup.identity_key = format!("tpm:{}", s(&boot_key));
    setup.key_backend = "tpm".into();
    setup.extra = format!("\n[tpm]\ntcti = \"{}\"\n", tpm.tcti());
    let cfg = setup.write(&d.join("config.toml"));

    // 1. The bootstrap key, made in the TPM.
    let o = agent_tpm(
        &cfg,
        &[
            "keygen",
            "--backend",
            "tpm",
            "--algorithm",
            "ecdsa-p256",
            "--out",
            &s(&boot_key),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("tpm:{}", s(&boot_key))
    );
    assert_eq!(
        fs::metadata(&boot_key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // 2. Its CSR.
    let csr = boot.join("device.csr");
    let o = agent_tpm(
        &cfg,
        &[
            "csr",
            "--key",
            &format!("tpm:{}", s(&boot_key)),
            "--cn",
            REG_ID,
            "--out",
            &s(&csr),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));

    // 3. "Your CA" (the simulator's bootstrap intermediate) signs it.
    let ext = boot.join("client.ext");
    fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    let cert = boot.join("device.pem");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&pki.file("bootstrap-intermediate.pem")),
        "-CAkey",
        &s(&pki.file("bootstrap-intermediate.key")),
        "-set_serial",
        "0x5eed",
        "-days",
        "30",
        "-sha384",
        "-extfile",
        &s(&ext),
        "-out",
        &s(&cert),
    ]);
    let mut full = fs::read_to_string(&cert).unwrap();
    full.push_str(&fs::read_to_string(pki.file("bootstrap-intermediate.pem")).unwrap());
    full.push_str(&fs::read_to_string(pki.file("bootstrap-root.pem")).unwrap());
    fs::write(&chain, full).unwrap();

    // 4. Provision: the TLS handshake signs with the bootstrap key, the CSR with
    // a fresh operational key, both in the TPM.
    let before = tpm.commands().len();
    let o = agent_tpm(&cfg, &["run", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("provisioned as device gw-0001"),
        "{}",
        text(&o)
    );
    let commands = tpm.commands()[before..].to_vec();
    Provisioned {
        d,
        tpm,
        _sim: sim,
        setup,
        cfg,
        commands,
    }
}

#[test]
fn provisions_with_bootstrap_and_operational_keys_in_the_tpm() {
    let p = provision("tpm-provision");

    // The operational key is a TPM key file in the state directory, 0600.
    let uri = p.op_key_uri();
    assert!(uri.starts_with("tpm:"), "{uri}");
    let key = p.op_key_path();
    assert!(key.starts_with(p.setup.state_dir.join("keys")), "{key:?}");
    assert!(key.to_string_lossy().ends_with(".tss2.pem"), "{key:?}");
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pem = fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN TSS2 PRIVATE KEY-----"), "{pem}");

    // The issued leaf holds that key: tpm2-openssl derives the same public key
    // from the key file.
    let leaf = p.leaf();
    let from_tpm = openssl_tpm(
        &p.tpm,
        &[
            "pkey",
            "-provider",
            "tpm2",
            "-provider",
            "default",
            "-in",
            &s(&key),
            "-pubout",
        ],
    );
    assert_eq!(cert_pubkey(&leaf), from_tpm);

    // No transient object is left in the TPM.
    assert_eq!(p.tpm.handles("handles-transient"), Vec::<String>::new());

    let histogram = command_histogram(&p.commands);
    println!(
        "TPM commands for one provisioning (run --once, bootstrap and operational keys in the TPM): {} {histogram:?}",
        p.commands.len()
    );
    let n = |name: &str| histogram.get(name).copied().unwrap_or(0);
    // The TLS handshake and the CSR signed in the TPM.
    assert!(n("Sign") >= 2, "{histogram:?}");
    // Every object loaded (primaries and keys) was flushed again.
    assert_eq!(
        n("FlushContext"),
        n("CreatePrimary") + n("Load"),
        "{histogram:?}"
    );
}

#[test]
fn operational_key_survives_a_tpm_reset() {
    let mut p = provision("tpm-reset");
    let key = p.op_key_path();
    let uri = p.op_key_uri();
    let leaf = p.leaf();

    // Power cycle: swtpm stops and starts on the same state (Startup CLEAR).
    p.tpm.restart();
    p.rewrite_config();

    // The primary is not stored anywhere: no persistent handle exists, and the
    // key file's parent is TPM_RH_OWNER, so the primary is re-created from the
    // template when the key is loaded.
    assert_eq!(p.tpm.handles("handles-persistent"), Vec::<String>::new());
    let asn1 = openssl(&["asn1parse", "-in", &s(&key)]);
    assert!(asn1.contains(":40000001"), "{asn1}");
    assert!(asn1.contains("2.23.133.10.1.3"), "{asn1}");

    // The stored key still signs: a CSR made with it verifies, for the same key.
    let csr = p.d.join("after-reset.csr");
    let o = agent_tpm(
        &p.cfg,
        &["csr", "--key", &uri, "--cn", REG_ID, "--out", &s(&csr)],
    );
    assert!(o.status.success(), "{}", text(&o));
    let verified = run(Command::new("openssl").args(["req", "-verify", "-noout", "-in", &s(&csr)]));
    assert!(verified.status.success(), "{}", text(&verified));
    assert!(
        String::from_utf8_lossy(&verified.stderr).contains("verify OK")
            || String::from_utf8_lossy(&verified.stdout).contains("verify OK"),
        "{}",
        text(&verified)
    );
    let csr_pub = openssl(&["req", "-in", &s(&csr), "-noout", "-pubkey"]);
    assert_eq!(csr_pub, cert_pubkey(&leaf));

    // And the agent starts offline with it (its key check loads the key).
    let o = agent_tpm(&p.cfg, &["run", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("already provisioned"),
        "{}",
        text(&o)
    );
    assert_eq!(p.tpm.handles("handles-transient"), Vec::<String>::new());
}

#[test]
fn tpm2_openssl_signs_with_the_key_files_dps_agent_writes() {
    let p = provision("tpm-interop");
    let leaf = p.leaf();
    let leaf_pub = p.d.join("leaf-pub.pem");
    fs::write(&leaf_pub, cert_pubkey(&leaf)).unwrap();
    let msg = p.d.join("msg.txt");
    fs::write(&msg, b"signed by tpm2-openssl with dps-agent's key file\n").unwrap();
    let sig = p.d.join("msg.sig");

    // P-384 operational key, scheme ECDSA/SHA-384.
    openssl_tpm(
        &p.tpm,
        &[
            "dgst",
            "-sha384",
            "-provider",
            "tpm2",
            "-provider",
            "default",
            "-propquery",
            "?provider=tpm2",
            "-sign",
            &s(&p.op_key_path()),
            "-out",
            &s(&sig),
            &s(&msg),
        ],
    );
    let out = openssl(&[
        "dgst",
        "-sha384",
        "-verify",
        &s(&leaf_pub),
        "-signature",
        &s(&sig),
        &s(&msg),
    ]);
    assert_eq!(out.trim(), "Verified OK");

    // The tampered message does not verify (the check above can fail).
    let other = p.d.join("msg2.txt");
    fs::write(&other, b"something else\n").unwrap();
    let o = run(Command::new("openssl").args([
        "dgst",
        "-sha384",
        "-verify",
        &s(&leaf_pub),
        "-signature",
        &s(&sig),
        &s(&other),
    ]));
    assert!(!o.status.success(), "{}", text(&o));
}

/// openssl with TPM2OPENSSL_TCTI pointing at this swtpm; fails the test on error.
fn openssl_tpm(tpm: &Swtpm, args: &[&str]) -> String {
    let o = run(Command::new("openssl")
        .args(args)
        .env("TPM2OPENSSL_TCTI", tpm.tcti())
        .env(TSS2_LOG.0, TSS2_LOG.1));
    assert!(o.status.success(), "openssl {args:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// After a TPM clear every key of the old owner seed is gone; the agent says so,
/// names the key file and does not pretend to be provisioned.
#[test]
fn a_cleared_tpm_is_reported_not_papered_over() {
    let p = provision("tpm-clear");
    let o = p.tpm.tpm2("tpm2_clear", &["-c", "p"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = agent_tpm(&p.cfg, &["run", "--once"]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("can no longer be used with this TPM"),
        "{}",
        text(&o)
    );
    assert!(err.contains("device.tss2.pem"), "{}", text(&o));
    assert!(err.contains("needs a new certificate"), "{}", text(&o));
    assert_eq!(p.tpm.handles("handles-transient"), Vec::<String>::new());
}

/// A user without access to the TPM device is told to join group `tss`.
#[test]
fn permission_denied_on_the_device_names_group_tss() {
    // Everything the unprivileged user needs lives in a world-readable
    // directory under /tmp (the work tree may sit in a 0700 home directory).
    let d = std::env::temp_dir().join(format!("dps-agent-tpm-perm-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
    let agent = d.join("dps-agent");
    if fs::hard_link(bin("dps-agent"), &agent).is_err() {
        fs::copy(bin("dps-agent"), &agent).unwrap();
    }
    // A stand-in device node only root may open (mode 0600).
    let device = d.join("tpmrm0");
    fs::write(&device, b"").unwrap();
    fs::set_permissions(&device, fs::Permissions::from_mode(0o600)).unwrap();
    let setup = AgentSetup {
        endpoint: "localhost:1".into(),
        trust_bundle: d.join("ca.pem"),
        identity_cert: d.join("device-full-chain.pem"),
        identity_key: format!("tpm:{}", s(&d.join("device.tss2.pem"))),
        state_dir: d.join("state"),
        key_backend: "tpm".into(),
        key_algorithm: "ecdsa-p384".into(),
        hub: String::new(),
        extra: format!("\n[tpm]\ntcti = \"device:{}\"\n", s(&device)),
    };
    let cfg = setup.write(&d.join("config.toml"));
    fs::set_permissions(&cfg, fs::Permissions::from_mode(0o644)).unwrap();

    // As root, drop to nobody (root may open any file); otherwise run as is.
    let root = run(Command::new("id").arg("-u")).stdout == b"0\n";
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&agent);
        c
    } else {
        Command::new(&agent)
    };
    let o = run(cmd
        .arg("--config")
        .arg(&cfg)
        .args(["csr", "--key", "tpm:handle=0x81000101", "--cn", REG_ID])
        .env(TSS2_LOG.0, TSS2_LOG.1));
    let _ = fs::remove_dir_all(&d);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("permission denied opening {}", s(&device))),
        "{}",
        text(&o)
    );
    assert!(err.contains("group `tss`"), "{}", text(&o));
}
