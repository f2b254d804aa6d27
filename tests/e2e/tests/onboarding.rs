//! Every onboarding path against dps-sim, each with a CSR and the stored chain
//! checked: {MQTT, HTTPS} × {X.509, symmetric key (individual enrollment),
//! symmetric key (enrollment group)}, and TPM attestation over HTTPS on swtpm
//! (EK/SRK, the 401 challenge, ActivateCredential + Import, TPM-signed SAS),
//! with no transient object or session left in the TPM. Then the refusals: a
//! wrong key, an expired token (the simulator's clock runs ahead, as for a
//! device whose clock is behind), a key file others can read, a TPM whose EK is
//! not enrolled, and TPM over MQTT at config check. Also the symmetric key kept
//! in a PKCS#11 token (SoftHSM2), which computes the HMACs.

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use dps_agent_e2e::softhsm::SoftHsm;
use dps_agent_e2e::swtpm::{Swtpm, TSS2_LOG};
use dps_agent_e2e::*;
use serde_json::Value;

/// A random key as the Azure portal shows one (64 bytes, base64).
fn random_key() -> String {
    let mut b = [0u8; 64];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    STANDARD.encode(b)
}

/// Writes a key file with `mode`.
fn key_file(dir: &Path, key: &str, mode: u32) -> PathBuf {
    let p = dir.join("dps.key");
    fs::write(&p, format!("{key}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `dps-agent` with libtss2's expected-error noise off.
fn agent_tpm(config: &Path, args: &[&str]) -> Output {
    run(Command::new(bin("dps-agent"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env(TSS2_LOG.0, TSS2_LOG.1))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    Mqtt,
    Https,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::Https => "https",
        }
    }

    fn port(self, sim: &Sim) -> u16 {
        match self {
            Transport::Mqtt => sim.port,
            Transport::Https => sim.https_port,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    X509,
    Individual,
    Group,
}

/// A simulator with the enrollments `method` needs, and the agent config for it.
struct Case {
    d: TestDir,
    sim: Sim,
    setup: AgentSetup,
    cfg: PathBuf,
}

fn case(name: &str, transport: Transport, method: Method, sim_extra: &[&str]) -> Case {
    let d = TestDir::new(name);
    let pki = Pki::generate(&d.join("pki"));
    let key = random_key();
    let mut extra: Vec<String> = sim_extra.iter().map(|s| s.to_string()).collect();
    match method {
        Method::X509 => {}
        Method::Individual => extra.extend(["--symmetric-key".into(), format!("{REG_ID}={key}")]),
        Method::Group => extra.extend(["--group-key".into(), format!("fleet-a={key}")]),
    }
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            extra,
            ..Default::default()
        },
    );
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    setup.endpoint = format!("localhost:{}", transport.port(&sim));
    let cfg = d.join("config.toml");
    match method {
        Method::X509 => {
            let x509 = format!(
                "method = \"x509\"\nidentity_cert = \"{}\"\nidentity_key = \"{}\"",
                setup.identity_cert.display(),
                setup.identity_key
            );
            setup.write_with(&cfg, transport.name(), &x509);
        }
        Method::Individual | Method::Group => {
            let file = key_file(&d.path, &key, 0o600);
            let enrollment = if method == Method::Group {
                "group"
            } else {
                "individual"
            };
            setup.write_with(
                &cfg,
                transport.name(),
                &format!(
                    "method = \"symmetric_key\"\nkey_file = \"{}\"\nenrollment = \"{enrollment}\"",
                    file.display()
                ),
            );
        }
    }
    Case { d, sim, setup, cfg }
}

/// The stored chain is leaf, issuing CA, root; it verifies against the ADR root;
/// the leaf is CN=gw-0001 with the operational key.
fn check_stored_chain(d: &TestDir, pki_root: &Path, state: &Path, key_in_file: bool) {
    let chain = fs::read_to_string(state.join("operational-chain.pem")).unwrap();
    let certs = split_pem(&chain);
    assert_eq!(certs.len(), 3, "{chain}");
    let (leaf, ica) = (d.join("leaf.pem"), d.join("ica.pem"));
    fs::write(&leaf, &certs[0]).unwrap();
    fs::write(&ica, &certs[1]).unwrap();
    let verdict = openssl(&[
        "verify",
        "-CAfile",
        &pki_root.display().to_string(),
        "-untrusted",
        &ica.display().to_string(),
        &leaf.display().to_string(),
    ]);
    assert!(verdict.trim().ends_with(": OK"), "{verdict}");
    let subject = openssl(&[
        "x509",
        "-in",
        &leaf.display().to_string(),
        "-noout",
        "-subject",
    ]);
    assert_eq!(subject.trim(), "subject=CN = gw-0001");
    let id: Value =
        serde_json::from_str(&fs::read_to_string(state.join("identity.json")).unwrap()).unwrap();
    let uri = id["key_uri"].as_str().unwrap();
    if key_in_file {
        let key = PathBuf::from(uri.strip_prefix("file:").unwrap());
        assert_eq!(cert_pubkey(&leaf), key_pubkey(&key));
    } else {
        assert!(uri.starts_with("tpm:"), "{uri}");
    }
}

/// Provisions and checks everything the matrix promises.
fn provisions(transport: Transport, method: Method) {
    let name = format!("onboard-{}-{method:?}", transport.name()).to_lowercase();
    let c = case(&name, transport, method, &[]);
    let o = agent(&c.cfg, &["run", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("provisioned as device gw-0001"),
        "{}",
        text(&o)
    );
    check_stored_chain(
        &c.d,
        &c.sim.pki.file("issuing-root.pem"),
        &c.setup.state_dir,
        true,
    );

    // What the simulator saw: this transport, this credential, a CSR.
    let events = c.sim.events();
    let (auth, enrollment) = match method {
        Method::X509 => ("x509", Value::Null),
        Method::Individual => ("sas", Value::from("individual")),
        Method::Group => ("sas", Value::from("group:fleet-a")),
    };
    let requests = of_kind(&events, "request");
    assert!(!requests.is_empty());
    assert!(requests.iter().all(|r| r["transport"] == transport.name()));
    let register = requests.iter().find(|r| r["kind"] == "register").unwrap();
    assert!(register["body"]["csr"].is_string(), "{register}");
    match transport {
        Transport::Mqtt => {
            let connect = of_kind(&events, "connect")[0];
            assert_eq!(connect["transport"], "mqtt");
            assert_eq!(connect["result"], "accepted", "{connect}");
            assert_eq!(connect["auth"], auth, "{connect}");
            assert_eq!(connect["enrollment"], enrollment, "{connect}");
            let with_cert = !connect["cert_cn"].is_null();
            assert_eq!(with_cert, method == Method::X509, "{connect}");
        }
        Transport::Https => {
            // Every request authenticated on its own; a SAS on each one.
            for r in &requests {
                assert_eq!(r["auth"], auth, "{r}");
                assert_eq!(r["enrollment"], enrollment, "{r}");
            }
            assert!(requests
                .iter()
                .any(|r| r["kind"] == "poll" && r["method"] == "GET"));
            assert_eq!(register["method"], "PUT");
            assert_eq!(
                register["path"],
                format!("/{ID_SCOPE}/registrations/{REG_ID}/register")
            );
            let connects = of_kind(&events, "connect");
            assert!(connects.iter().all(|c| c["transport"] == "https"));
            let with_cert = !connects[0]["cert_cn"].is_null();
            assert_eq!(with_cert, method == Method::X509);
        }
    }
    let last = of_kind(&events, "response").into_iter().last().unwrap();
    assert_eq!(last["status"], 200, "{last}");
    assert_eq!(last["registration_status"], "assigned", "{last}");
    // The key never reaches the wire in the clear or the logs.
    if method != Method::X509 {
        let key = fs::read_to_string(c.d.join("dps.key")).unwrap();
        let all = fs::read_to_string(&c.sim.events).unwrap();
        assert!(!all.contains(key.trim()));
        assert!(!text(&o).contains(key.trim()));
    }
}

#[test]
fn mqtt_x509() {
    provisions(Transport::Mqtt, Method::X509);
}

#[test]
fn mqtt_symmetric_key_individual() {
    provisions(Transport::Mqtt, Method::Individual);
}

#[test]
fn mqtt_symmetric_key_group() {
    provisions(Transport::Mqtt, Method::Group);
}

#[test]
fn https_x509() {
    provisions(Transport::Https, Method::X509);
}

#[test]
fn https_symmetric_key_individual() {
    provisions(Transport::Https, Method::Individual);
}

#[test]
fn https_symmetric_key_group() {
    provisions(Transport::Https, Method::Group);
}

/// The enrollment's key imported into a PKCS#11 token (SoftHSM2) as a secret
/// key that may only sign, and `key_file` naming it by URI: the token makes
/// the HMACs (individual: every SAS token; group: the device key), DPS accepts
/// the tokens, and `check` finds the key and has it sign.
#[test]
fn a_symmetric_key_in_a_pkcs11_token_signs_the_sas_tokens() {
    for (transport, method, enrollment) in [
        (Transport::Https, Method::Individual, "individual"),
        (Transport::Mqtt, Method::Group, "group:fleet-a"),
    ] {
        let name = format!("sas-in-token-{}-{method:?}", transport.name()).to_lowercase();
        let c = case(&name, transport, method, &[]);
        let hsm = SoftHsm::new(&c.d.join("hsm"), "dps-sas");
        let key_path = c.d.join("dps.key");
        let key = fs::read_to_string(&key_path).unwrap();
        let o = run(Command::new(bin("p11-import-secret"))
            .arg(&hsm.module)
            .arg(&hsm.label)
            .arg(&hsm.pin_file)
            .arg("dps-enrollment")
            .arg("0a01")
            .arg(&key_path)
            .env(hsm.env().0, hsm.env().1));
        assert!(o.status.success(), "{}", text(&o));
        // The token holds the only copy.
        fs::remove_file(&key_path).unwrap();
        let uri = "pkcs11:token=dps-sas;object=dps-enrollment;type=secret-key";
        let config = fs::read_to_string(&c.cfg).unwrap().replace(
            &format!("key_file = \"{}\"", key_path.display()),
            &format!("key_file = \"{uri}\""),
        );
        assert!(config.contains(uri), "{config}");
        fs::write(&c.cfg, format!("{config}\n{}", hsm.config_toml())).unwrap();

        let o = hsm.agent(&c.cfg, &["run", "--once"], &[]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("provisioned as device gw-0001"),
            "{}",
            text(&o)
        );
        check_stored_chain(
            &c.d,
            &c.sim.pki.file("issuing-root.pem"),
            &c.setup.state_dir,
            true,
        );
        let events = c.sim.events();
        let requests = of_kind(&events, "request");
        assert!(!requests.is_empty());
        let authenticated: Vec<&Value> = match transport {
            Transport::Https => requests,
            Transport::Mqtt => of_kind(&events, "connect"),
        };
        for e in authenticated {
            assert_eq!(e["auth"], "sas", "{e}");
            assert_eq!(e["enrollment"], enrollment, "{e}");
        }
        let all = fs::read_to_string(&c.sim.events).unwrap();
        assert!(!all.contains(key.trim()) && !text(&o).contains(key.trim()));

        let o = hsm.agent(&c.cfg, &["check"], &[]);
        let ok = String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.starts_with("OK") && l.contains("bootstrap"))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("{}", text(&o)));
        assert!(ok.contains("in the PKCS#11 token"), "{ok}");

        // A URI that names no secret key is refused at config check.
        let wrong = fs::read_to_string(&c.cfg)
            .unwrap()
            .replace(";type=secret-key", ";type=private");
        fs::write(&c.cfg, wrong).unwrap();
        let o = hsm.agent(&c.cfg, &["check-config"], &[]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            text(&o).contains("does not name a secret key"),
            "{}",
            text(&o)
        );
        assert!(text(&o).contains("type=secret-key"), "{}", text(&o));
    }
}

/// Points the agent's key file at another key than the enrollment's.
fn with_wrong_key(c: &Case) {
    key_file(&c.d.path, &random_key(), 0o600);
}

#[test]
fn a_wrong_symmetric_key_is_refused_over_both_transports() {
    for transport in [Transport::Mqtt, Transport::Https] {
        let name = format!("wrong-key-{}", transport.name());
        let c = case(&name, transport, Method::Individual, &[]);
        with_wrong_key(&c);
        let o = agent(&c.cfg, &["run", "--once"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let e = stderr(&o);
        assert!(e.contains("refused the symmetric key (SAS token)"), "{e}");
        assert!(e.contains("key_file"), "{e}");
        assert!(!c.setup.state_dir.join("identity.json").exists());
        let events = c.sim.events();
        match transport {
            Transport::Mqtt => {
                let connect = of_kind(&events, "connect")[0];
                assert_eq!(connect["connack"], 5, "{connect}");
                assert!(
                    connect["result"]
                        .as_str()
                        .unwrap()
                        .contains("does not match the individual enrollment's key"),
                    "{connect}"
                );
            }
            Transport::Https => {
                assert!(e.contains("401002"), "{e}");
                let r = of_kind(&events, "response")[0];
                assert_eq!(r["status"], 401, "{r}");
                assert!(r["auth_error"].as_str().unwrap().contains("does not match"));
            }
        }
    }
}

#[test]
fn a_group_device_with_the_wrong_group_key_is_refused() {
    let c = case("wrong-group", Transport::Https, Method::Group, &[]);
    with_wrong_key(&c);
    let o = agent(&c.cfg, &["run", "--once"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = stderr(&o);
    assert!(
        e.contains("enrollment group's primary or secondary key"),
        "{e}"
    );
    assert!(e.contains("matches no enrollment"), "{e}");
}

/// The simulator's clock is 10 minutes ahead: the agent's 5-minute tokens have
/// expired when they arrive, exactly as for a device whose clock is 10 minutes
/// behind. (The agent has no clock knob: the skew is played by the simulator.)
#[test]
fn an_expired_sas_token_is_refused_and_the_clock_is_named() {
    for transport in [Transport::Mqtt, Transport::Https] {
        let name = format!("expired-sas-{}", transport.name());
        let c = case(
            &name,
            transport,
            Method::Individual,
            &["--clock-offset", "10m"],
        );
        let o = agent(&c.cfg, &["run", "--once"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let e = stderr(&o);
        assert!(e.contains("device clock"), "{e}");
        let events = c.sim.events();
        let reason = match transport {
            Transport::Mqtt => of_kind(&events, "connect")[0]["result"].clone(),
            Transport::Https => {
                assert!(e.contains("expired"), "{e}");
                of_kind(&events, "response")[0]["auth_error"].clone()
            }
        };
        assert!(reason.as_str().unwrap().contains("expired"), "{reason}");
    }
}

#[test]
fn a_key_file_others_can_read_is_refused_before_dps_is_contacted() {
    let c = case("key-mode", Transport::Https, Method::Individual, &[]);
    let path = c.d.join("dps.key");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let o = agent(&c.cfg, &["run", "--once"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = stderr(&o);
    assert!(e.contains("mode 0644"), "{e}");
    assert!(e.contains(&format!("chmod 600 {}", path.display())), "{e}");
    assert_eq!(c.sim.connections(), 0);
}

#[test]
fn tpm_over_mqtt_is_rejected_at_config_check() {
    let c = case("tpm-mqtt", Transport::Mqtt, Method::X509, &[]);
    let cfg = c
        .setup
        .write_with(&c.d.join("tpm.toml"), "mqtt", "method = \"tpm\"");
    let o = agent(&cfg, &["check-config"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = stderr(&o);
    assert!(e.contains("[dps.attestation] method = \"tpm\""), "{e}");
    assert!(e.contains("transport = \"https\""), "{e}");
}

/// swtpm, the simulator (TPM enrollment made from `dps-agent tpm ek`, unless
/// `enroll` is false), and a config with both TPM attestation and the
/// operational key in the TPM.
struct TpmCase {
    d: TestDir,
    tpm: Swtpm,
    sim: Sim,
    setup: AgentSetup,
    cfg: PathBuf,
    ek: String,
}

fn tpm_case(name: &str, enroll_as: &str) -> TpmCase {
    let d = TestDir::new(name);
    let pki = Pki::generate(&d.join("pki"));
    let tpm = Swtpm::start(&d.join("swtpm"));
    let tpm_section = format!("\n[tpm]\ntcti = \"{}\"\n", tpm.tcti());

    // The EK, as a customer gets it for the enrollment (the config is only
    // needed for [tpm] tcti here).
    let pre = d.join("pre.toml");
    fs::write(&pre, tpm_only_config(&tpm)).unwrap();
    let o = agent_tpm(&pre, &["tpm", "ek", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let out: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ek = out["endorsement_key"].as_str().unwrap().to_string();

    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            extra: vec!["--tpm-enrollment".into(), format!("{enroll_as}={ek}")],
            ..Default::default()
        },
    );
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    setup.endpoint = format!("localhost:{}", sim.https_port);
    setup.key_backend = "tpm".into();
    setup.extra = tpm_section;
    let cfg = setup.write_with(&d.join("config.toml"), "https", "method = \"tpm\"");
    TpmCase {
        d,
        tpm,
        sim,
        setup,
        cfg,
        ek,
    }
}

/// The smallest valid config that names the TPM (what `tpm ek` needs).
fn tpm_only_config(tpm: &Swtpm) -> String {
    format!(
        "[dps]\nid_scope = \"{ID_SCOPE}\"\nregistration_id = \"{REG_ID}\"\ntransport = \"https\"\n\n\
         [dps.attestation]\nmethod = \"tpm\"\n\n[tpm]\ntcti = \"{}\"\n",
        tpm.tcti()
    )
}

/// Nothing transient may stay in the TPM, whatever happened.
fn assert_tpm_clean(tpm: &Swtpm) {
    assert_eq!(
        tpm.handles("handles-transient"),
        Vec::<String>::new(),
        "transient objects left"
    );
    assert_eq!(
        tpm.handles("handles-loaded-session"),
        Vec::<String>::new(),
        "sessions left"
    );
}

#[test]
fn tpm_ek_prints_what_an_enrollment_needs() {
    let d = TestDir::new("tpm-ek");
    let tpm = Swtpm::start(&d.join("swtpm"));
    let cfg = d.join("c.toml");
    fs::write(&cfg, tpm_only_config(&tpm)).unwrap();
    let o = agent_tpm(&cfg, &["tpm", "ek"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let o = agent_tpm(&cfg, &["tpm", "ek", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    let (ek, regid, pem) = (
        j["endorsement_key"].as_str().unwrap(),
        j["registration_id"].as_str().unwrap(),
        j["pem"].as_str().unwrap(),
    );
    assert!(
        out.contains(ek) && out.contains(regid) && out.contains(pem.trim()),
        "{out}"
    );

    // The same bytes tpm2-tools reads from 0x81010001 (TPM2B_PUBLIC) and the
    // same public key in PEM.
    let pub_file = d.join("ek.pub");
    let r = tpm.tpm2(
        "tpm2_readpublic",
        &["-c", "0x81010001", "-o", &pub_file.display().to_string()],
    );
    assert!(r.status.success(), "{}", text(&r));
    let tpm2b = fs::read(&pub_file).unwrap();
    assert_eq!(STANDARD.encode(&tpm2b), ek);
    assert_eq!(tpm2b.len(), 316);
    let pem_file = d.join("ek.pem");
    let r = tpm.tpm2(
        "tpm2_readpublic",
        &[
            "-c",
            "0x81010001",
            "-f",
            "pem",
            "-o",
            &pem_file.display().to_string(),
        ],
    );
    assert!(r.status.success(), "{}", text(&r));
    assert_eq!(fs::read_to_string(&pem_file).unwrap(), pem);
    // Registration id = lowercase unpadded base32 of SHA-256(TPM2B_PUBLIC).
    let digest = openssl_stdin(&["dgst", "-sha256", "-binary"], &tpm2b);
    assert_eq!(regid, base32_lower(&digest));
    assert_eq!(regid.len(), 52);
    // Asking again gives the same key (it is persisted, not made again).
    let o = agent_tpm(&cfg, &["tpm", "ek", "--json"]);
    let again: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again["endorsement_key"], ek);
    assert_tpm_clean(&tpm);
}

fn openssl_stdin(args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    o.stdout
}

fn base32_lower(data: &[u8]) -> String {
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut bits = String::new();
    for b in data {
        bits.push_str(&format!("{b:08b}"));
    }
    let pad = (5 - bits.len() % 5) % 5;
    bits.push_str(&"0".repeat(pad));
    bits.as_bytes()
        .chunks(5)
        .map(|c| A[usize::from_str_radix(std::str::from_utf8(c).unwrap(), 2).unwrap()] as char)
        .collect()
}

#[test]
fn https_tpm_attestation_on_swtpm() {
    let c = tpm_case("onboard-https-tpm", REG_ID);
    let o = agent_tpm(&c.cfg, &["run", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    check_stored_chain(
        &c.d,
        &c.sim.pki.file("issuing-root.pem"),
        &c.setup.state_dir,
        false,
    );
    assert_tpm_clean(&c.tpm);
    let persistent = c.tpm.handles("handles-persistent");
    for h in ["0x81000001", "0x81000100", "0x81010001"] {
        assert!(persistent.contains(&h.to_string()), "{persistent:?}");
    }

    // The wire: PUT with tpm keys and no Authorization → 401 challenge; PUT
    // again with a TPM-signed SAS → 202; polls with SAS → 200 assigned.
    let events = c.sim.events();
    let requests = of_kind(&events, "request");
    let responses = of_kind(&events, "response");
    assert_eq!(requests[0]["kind"], "register");
    assert_eq!(requests[0]["auth"], Value::Null);
    assert_eq!(requests[0]["body"]["tpm"]["endorsementKey"], c.ek.as_str());
    assert!(requests[0]["body"]["tpm"]["storageRootKey"].is_string());
    assert_eq!(responses[0]["status"], 401);
    assert_eq!(responses[0]["tpm_challenge"], true);
    assert_eq!(requests[1]["kind"], "register");
    assert_eq!(requests[1]["auth"], "sas");
    assert_eq!(requests[1]["enrollment"], "tpm");
    assert_eq!(responses[1]["status"], 202);
    assert!(requests[2..].iter().all(|r| r["auth"] == "sas"));
    let last = responses.last().unwrap();
    assert_eq!(last["registration_status"], "assigned", "{last}");
    let log = stderr(&o);
    assert!(
        log.contains("activated the key of the attestation challenge"),
        "{log}"
    );
    assert!(log.contains("imported the device's IoT Hub key"), "{log}");

    // Provisioning again (a lost identity, or a renewal) answers a new
    // challenge: the key at 0x81000100 is replaced, nothing leaks.
    fs::remove_file(c.setup.state_dir.join("identity.json")).unwrap();
    let o = agent_tpm(&c.cfg, &["run", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_tpm_clean(&c.tpm);
    let challenges = of_kind(&c.sim.events(), "response")
        .into_iter()
        .filter(|r| r["tpm_challenge"] == true)
        .count();
    assert_eq!(challenges, 2);
}

#[test]
fn a_tpm_whose_ek_is_not_enrolled_is_refused() {
    let c = tpm_case("tpm-not-enrolled", "some-other-device");
    let o = agent_tpm(&c.cfg, &["run", "--once"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = stderr(&o);
    assert!(e.contains("refused the TPM attestation"), "{e}");
    assert!(e.contains("no TPM enrollment for registration id"), "{e}");
    assert!(e.contains("dps-agent tpm ek"), "{e}");
    assert!(!c.setup.state_dir.join("identity.json").exists());
    assert_tpm_clean(&c.tpm);
    let r = of_kind(&c.sim.events(), "response")[0].clone();
    assert_eq!(
        (r["status"].clone(), r["tpm_challenge"].clone()),
        (Value::from(401), Value::from(false))
    );
}

/// Over HTTPS the attempt loop is the one MQTT uses: `Retry-After` honoured
/// exactly on 202 and 429, backoff after a 500 and after a connection dropped
/// without an answer, polls of the operation DPS returned; and the chain
/// checks refuse a certificate for another key.
#[test]
fn https_follows_the_mqtt_retry_rules_and_chain_checks() {
    let c = case("https-retry", Transport::Https, Method::Individual, &[]);
    // The case's simulator answers retry-after 0: this one makes the waits visible.
    let sim = Sim::start(
        &c.d.join("sim2"),
        &c.sim.pki,
        &SimOptions {
            retry_after: Some(1),
            faults: vec![
                "drop-after-register".into(),
                "throttle".into(),
                "server-error".into(),
            ],
            extra: vec![
                "--symmetric-key".into(),
                format!(
                    "{REG_ID}={}",
                    fs::read_to_string(c.d.join("dps.key")).unwrap().trim()
                ),
            ],
            ..Default::default()
        },
    );
    let mut setup = c.setup.clone();
    setup.endpoint = format!("localhost:{}", sim.https_port);
    let key = c.d.join("dps.key");
    let cfg = setup.write_with(
        &c.d.join("retry.toml"),
        "https",
        &format!(
            "method = \"symmetric_key\"\nkey_file = \"{}\"",
            key.display()
        ),
    );
    let o = agent(&cfg, &["run", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    let events = sim.events();
    let statuses: Vec<Value> = of_kind(&events, "response")
        .iter()
        .map(|r| r["status"].clone())
        .collect();
    // Dropped (no status), 429, 500, then 202 and a throttled poll, then the rest.
    assert_eq!(
        &statuses[..5],
        &[
            Value::Null,
            Value::from(429),
            Value::from(500),
            Value::from(202),
            Value::from(429)
        ],
        "{statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&Value::from(200)));
    // The dropped connection was replaced by a new one.
    assert!(of_kind(&events, "connect").len() >= 2);
    // Retry-after is never cut short. A poll waits exactly what DPS asked; a
    // registration waits at least that and at most the backoff's ceiling at
    // that point (2 s: the drop was the first failure, the 429 the second).
    for (i, e) in events.iter().enumerate() {
        let Some(asked) = e["retry_after"].as_f64() else {
            continue;
        };
        if e["event"] != "response" {
            continue;
        }
        let answered = events[..i]
            .iter()
            .rev()
            .find(|n| n["event"] == "request")
            .unwrap();
        let next = events[i + 1..]
            .iter()
            .find(|n| n["event"] == "request")
            .unwrap();
        let waited = next["t"].as_f64().unwrap() - e["t"].as_f64().unwrap();
        let most = if answered["kind"] == "poll" {
            asked
        } else {
            asked.max(2.0)
        };
        assert!(
            waited >= asked - 0.1 && waited <= most + 0.5,
            "asked to wait {asked}s after a {}, waited {waited:.3}s",
            answered["kind"]
        );
    }
    let op = of_kind(&events, "response")
        .into_iter()
        .find(|r| r["status"] == 202)
        .unwrap()["operation_id"]
        .clone();
    assert!(of_kind(&events, "request")
        .iter()
        .filter(|r| r["kind"] == "poll")
        .all(|p| p["operation_id"] == op));

    // A leaf for another key is refused; nothing is stored.
    fs::remove_dir_all(&setup.state_dir).unwrap();
    sim.set_faults(&["wrong-key-cert"]);
    let o = agent(&cfg, &["run", "--once"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        stderr(&o).contains("the issued certificate chain was refused"),
        "{}",
        text(&o)
    );
    assert!(!setup.state_dir.join("identity.json").exists());
}
