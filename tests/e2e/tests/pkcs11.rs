//! The PKCS#11 backend on SoftHSM2, end to end: an onboarding key made in the
//! token with `dps-agent keygen`, its CSR signed by the simulator's bootstrap
//! CA, provisioning with both the bootstrap and the operational key in the
//! token, interoperability of the key URIs and keys with OpenSC's pkcs11-tool
//! and GnuTLS's p11tool, the keys' attributes, and a wrong PIN that costs
//! exactly one login attempt.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dps_agent_e2e::daemon::Daemon;
use dps_agent_e2e::softhsm::{hex, spy_module_path, uri_attr, uri_id, SoftHsm};
use dps_agent_e2e::*;
use serde_json::Value;

const TOKEN: &str = "dps-agent";

/// A gateway whose bootstrap key lives in a SoftHSM2 token, with its
/// certificate signed by the simulator's bootstrap intermediate CA.
struct Gateway {
    d: TestDir,
    sim: Sim,
    hsm: SoftHsm,
    setup: AgentSetup,
    cfg: PathBuf,
    bootstrap_uri: String,
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Onboarding as an installer does it: keygen in the token, CSR, the CA signs
/// it (clientAuth), the chain file is device + intermediate + root.
fn onboard(name: &str) -> Gateway {
    let d = TestDir::new(name);
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            ..Default::default()
        },
    );
    let hsm = SoftHsm::new(&d.join("softhsm"), TOKEN);
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    setup.key_backend = "pkcs11".into();
    setup.identity_cert = d.join("device-full-chain.pem");
    // The key does not exist yet; the config must still load for keygen.
    setup.identity_key = "pkcs11:object=device-key".into();
    setup.extra = hsm.config_toml();
    let cfg = setup.write(&d.join("config.toml"));

    let o = hsm.agent(
        &cfg,
        &["keygen", "--backend", "pkcs11", "--out", "device-key"],
        &[],
    );
    assert!(o.status.success(), "keygen: {}", text(&o));
    let uri = stdout(&o).trim().to_string();
    assert!(
        uri.starts_with(&format!("pkcs11:token={TOKEN};object=device-key;id=%"))
            && uri.ends_with(";type=private"),
        "{uri}"
    );
    let id = uri_id(&uri);
    assert!(
        id.len() == 26 && id.starts_with(b"dps-agent:"),
        "a CKA_ID of the mark and 16 random bytes: {uri}"
    );

    let csr = d.join("device.csr");
    let o = hsm.agent(
        &cfg,
        &["csr", "--key", &uri, "--cn", REG_ID, "--out", &p(&csr)],
        &[],
    );
    assert!(o.status.success(), "csr: {}", text(&o));
    let subject = openssl(&["req", "-in", &p(&csr), "-noout", "-verify", "-subject"]);
    assert!(subject.contains(&format!("CN = {REG_ID}")), "{subject}");

    let ext = d.join("client.ext");
    fs::write(
        &ext,
        format!("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=DNS:{REG_ID}\n"),
    )
    .unwrap();
    let cert = d.join("device.pem");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&pki.file("bootstrap-intermediate.pem")),
        "-CAkey",
        &p(&pki.file("bootstrap-intermediate.key")),
        "-set_serial",
        "0x5eed01",
        "-days",
        "30",
        "-sha384",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ]);
    let chain = [
        cert.clone(),
        pki.file("bootstrap-intermediate.pem"),
        pki.file("bootstrap-root.pem"),
    ]
    .iter()
    .map(|f| fs::read_to_string(f).unwrap())
    .collect::<String>();
    fs::write(&setup.identity_cert, chain).unwrap();

    setup.identity_key = uri.clone();
    let cfg = setup.write(&d.join("config.toml"));
    Gateway {
        d,
        sim,
        hsm,
        setup,
        cfg,
        bootstrap_uri: uri,
    }
}

fn identity(state: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(state.join("identity.json")).unwrap()).unwrap()
}

/// pkcs11-tool's description of the private key with this id:
/// (usage line, access line).
fn private_key_flags(hsm: &SoftHsm, id: &[u8]) -> (String, String) {
    let out = hsm.pkcs11_tool_login(&["--list-objects", "--type", "privkey", "--id", &hex(id)]);
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim_start_matches([' ', ':']).trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in:\n{out}"))
    };
    (field("Usage"), field("Access"))
}

fn assert_never_leaves_the_token(hsm: &SoftHsm, uri: &str) {
    let (usage, access) = private_key_flags(hsm, &uri_id(uri));
    assert_eq!(usage, "sign", "{uri}: the key may only sign");
    let access: Vec<&str> = access.split(", ").collect();
    assert!(access.contains(&"sensitive"), "CKA_SENSITIVE: {access:?}");
    assert!(access.contains(&"never extractable"), "{access:?}");
    assert!(
        !access.contains(&"extractable"),
        "CKA_EXTRACTABLE must be false: {access:?}"
    );
}

#[test]
fn provisions_with_bootstrap_and_operational_keys_in_softhsm() {
    let g = onboard("pkcs11-provision");
    let o = g.hsm.agent(&g.cfg, &["run", "--once"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        stdout(&o).contains("provisioned as device gw-0001"),
        "{}",
        text(&o)
    );
    assert!(
        !stderr(&o).contains(&g.hsm.pin),
        "the PIN must never be logged"
    );

    // The operational key is in the token, committed (no ".pending" label).
    let state = &g.setup.state_dir;
    let id = identity(state);
    let key_uri = id["key_uri"].as_str().unwrap().to_string();
    let object = uri_attr(&key_uri, "object").unwrap();
    assert!(
        object.starts_with("op-") && !object.ends_with(".pending"),
        "{key_uri}"
    );
    assert_eq!(uri_attr(&key_uri, "token").as_deref(), Some(TOKEN));
    let status = g.hsm.agent(&g.cfg, &["status", "--json"], &[]);
    assert!(status.status.success(), "{}", text(&status));
    let s: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["key_uri"].as_str(), Some(key_uri.as_str()));

    // DPS saw the bootstrap certificate, whose key is in the token.
    let connect = of_kind(&g.sim.events(), "connect")[0].clone();
    assert_eq!(connect["result"], "accepted", "{connect}");
    assert_eq!(connect["cert_cn"], REG_ID);

    // Interop: p11tool finds exactly this key by the agent's URI …
    let pin_arg = format!("--set-pin={}", g.hsm.pin);
    let listed = g
        .hsm
        .p11tool(&["--login", &pin_arg, "--list-privkeys", &key_uri]);
    let urls: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.trim().strip_prefix("URL: "))
        .collect();
    assert_eq!(urls.len(), 1, "{listed}");
    assert!(
        urls[0].contains(&format!("object={object}"))
            && urls[0].contains(&format!("token={TOKEN}")),
        "{listed}"
    );
    assert!(
        listed.contains("CKA_NEVER_EXTRACTABLE") && listed.contains("CKA_SENSITIVE"),
        "{listed}"
    );

    // … its public key is the issued certificate's …
    let chain = fs::read_to_string(state.join("operational-chain.pem")).unwrap();
    let leaf = g.d.join("leaf.pem");
    fs::write(&leaf, &split_pem(&chain)[0]).unwrap();
    let token_pub = g.d.join("token-pub.pem");
    g.hsm.p11tool(&[
        "--login",
        &pin_arg,
        "--export-pubkey",
        "--outfile",
        &p(&token_pub),
        &key_uri,
    ]);
    let token_pub = openssl(&["pkey", "-pubin", "-in", &p(&token_pub)]);
    assert_eq!(token_pub, cert_pubkey(&leaf));
    let key_id = hex(&uri_id(&key_uri));

    // … and a signature pkcs11-tool makes with it (CKM_ECDSA over a SHA-384
    // digest) verifies with openssl against the certificate's key.
    let msg = g.d.join("msg.txt");
    fs::write(&msg, "signed inside the token by pkcs11-tool\n").unwrap();
    let digest = g.d.join("msg.sha384");
    openssl(&["dgst", "-sha384", "-binary", "-out", &p(&digest), &p(&msg)]);
    assert_eq!(fs::metadata(&digest).unwrap().len(), 48);
    let sig = g.d.join("msg.sig");
    g.hsm.pkcs11_tool_login(&[
        "--sign",
        "-m",
        "ECDSA",
        "--id",
        &key_id,
        "--signature-format",
        "openssl",
        "-i",
        &p(&digest),
        "-o",
        &p(&sig),
    ]);
    let leaf_pub = g.d.join("leaf-pub.pem");
    fs::write(&leaf_pub, cert_pubkey(&leaf)).unwrap();
    let verdict = openssl(&[
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        &p(&leaf_pub),
        "-in",
        &p(&digest),
        "-sigfile",
        &p(&sig),
    ]);
    assert!(
        verdict.contains("Signature Verified Successfully"),
        "{verdict}"
    );

    // Both keys were made inside the token and can never leave it.
    assert_never_leaves_the_token(&g.hsm, &key_uri);
    assert_never_leaves_the_token(&g.hsm, &g.bootstrap_uri);

    // The token holds the bootstrap key and one operational key, nothing else
    // (no pending leftovers).
    let all = g
        .hsm
        .pkcs11_tool_login(&["--list-objects", "--type", "privkey"]);
    let labels: Vec<&str> = all
        .lines()
        .filter_map(|l| l.trim().strip_prefix("label:"))
        .map(str::trim)
        .collect();
    let mut want = vec!["device-key", object.as_str()];
    want.sort();
    let mut labels = labels;
    labels.sort();
    assert_eq!(labels, want, "{all}");

    // A second run uses the stored identity and key without contacting DPS.
    let connections = g.sim.connections();
    let o = g.hsm.agent(&g.cfg, &["run", "--once"], &[]);
    assert!(
        o.status.success() && stdout(&o).contains("already provisioned"),
        "{}",
        text(&o)
    );
    assert_eq!(g.sim.connections(), connections);
}

/// C_Login calls and their results in a pkcs11-spy log.
fn logins(spy_log: &Path) -> Vec<String> {
    let log = fs::read_to_string(spy_log).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if l.ends_with(": C_Login") {
            let result = lines[i..]
                .iter()
                .find_map(|r| r.strip_prefix("Returned:"))
                .map(|r| r.trim().to_string())
                .unwrap_or_default();
            out.push(result);
        }
    }
    out
}

/// How a wrong PIN is counted: SoftHSM2 keeps no retry counter of its own
/// (it never locks a user PIN; it only raises CKF_USER_PIN_COUNT_LOW after a
/// failed C_Login and clears it after a good one). So the agent talks to the
/// token through OpenSC's pkcs11-spy, which logs every PKCS#11 call, and the
/// test counts the C_Login calls: the token must see exactly one, and the flag
/// shows that it registered the failure.
#[test]
fn a_wrong_pin_is_explained_and_tried_exactly_once() {
    let g = onboard("pkcs11-wrong-pin");
    let wrong = g.d.join("wrong-pin");
    g.hsm.write_pin_file(&wrong, "999999");
    let spy_log = g.d.join("pkcs11-spy.log");
    let mut setup = g.setup.clone();
    setup.extra = g.hsm.config_toml_with(&spy_module_path(), &wrong);
    let cfg = setup.write(&g.d.join("config-wrong-pin.toml"));
    let spy_env = [
        ("PKCS11SPY", g.hsm.module.as_path()),
        ("PKCS11SPY_OUTPUT", spy_log.as_path()),
    ];

    assert!(
        !g.hsm.token_flags().contains("user PIN count low"),
        "{}",
        g.hsm.token_flags()
    );
    let o = g.hsm.agent(&cfg, &["run", "--once"], &spy_env);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a wrong PIN is not a temporary failure: {}",
        text(&o)
    );
    let err = stderr(&o);
    assert!(err.contains("CKR_PIN_INCORRECT"), "{err}");
    assert!(
        err.contains(&format!(
            "rejected the PIN from [pkcs11] pin_file {}",
            wrong.display()
        )),
        "{err}"
    );
    assert!(err.contains("never presents a rejected PIN again"), "{err}");
    assert!(
        !err.contains("999999") && !stdout(&o).contains("999999"),
        "the PIN leaked: {err}"
    );
    assert_eq!(
        logins(&spy_log),
        vec!["160 CKR_PIN_INCORRECT"],
        "exactly one C_Login"
    );
    assert!(
        g.hsm.token_flags().contains("user PIN count low"),
        "{}",
        g.hsm.token_flags()
    );
    assert!(!g.setup.state_dir.join("identity.json").exists());

    // The daemon retries failed attempts (every 1-2 s here, and at once on
    // SIGHUP), but never with the PIN the token rejected.
    let daemon_log = g.d.join("pkcs11-spy-daemon.log");
    let text_cfg = fs::read_to_string(&cfg)
        .unwrap()
        .replace("[operational]\n", "[operational]\nretry_max = \"2s\"\n");
    fs::write(&cfg, text_cfg).unwrap();
    let env = [
        ("SOFTHSM2_CONF", p(&g.hsm.conf)),
        ("PKCS11SPY", p(&g.hsm.module)),
        ("PKCS11SPY_OUTPUT", p(&daemon_log)),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut daemon = Daemon::start_with_env(&cfg, &g.setup.state_dir, &g.d.join("agent.log"), &env);
    let mut polls = 0;
    daemon.wait_for(
        "a second attempt refused without a login",
        Duration::from_secs(30),
        |d| {
            polls += 1;
            if polls % 20 == 0 {
                d.hup();
            }
            d.log_text().matches("already rejected the PIN").count() >= 2
        },
    );
    daemon.stop();
    assert_eq!(
        logins(&daemon_log),
        vec!["160 CKR_PIN_INCORRECT"],
        "one C_Login for the daemon's whole life"
    );
    assert!(!daemon.log_text().contains("999999"));

    // With the right PIN the same configuration provisions.
    g.hsm.write_pin_file(&wrong, &g.hsm.pin);
    let o = g.hsm.agent(&cfg, &["run", "--once"], &spy_env);
    assert!(o.status.success(), "{}", text(&o));
}
