//! Provisioning over MQTT with an X.509 bootstrap certificate and a CSR, against
//! dps-sim: the happy path, DPS's timing rules, terminal answers and refusals.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use dps_agent_e2e::*;
use serde_json::Value;

fn provisioned_key_path(state: &Path) -> PathBuf {
    let id: Value =
        serde_json::from_str(&fs::read_to_string(state.join("identity.json")).unwrap()).unwrap();
    PathBuf::from(
        id["key_uri"]
            .as_str()
            .unwrap()
            .strip_prefix("file:")
            .unwrap(),
    )
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn provisions_with_x509_and_csr_then_starts_offline() {
    let d = TestDir::new("provision");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            ..Default::default()
        },
    );
    let setup = AgentSetup::for_sim(&d.path, &sim);
    let cfg = setup.write(&d.join("config.toml"));

    let o = agent(&cfg, &["run", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("provisioned as device gw-0001"), "{out}");

    // The stored chain: leaf, issuing CA, root; it verifies with openssl
    // against the simulator's ADR root.
    let state = &setup.state_dir;
    let chain = fs::read_to_string(state.join("operational-chain.pem")).unwrap();
    let certs = split_pem(&chain);
    assert_eq!(certs.len(), 3, "{chain}");
    fs::write(d.join("leaf.pem"), &certs[0]).unwrap();
    fs::write(d.join("ica.pem"), &certs[1]).unwrap();
    let verdict = openssl(&[
        "verify",
        "-CAfile",
        &pki.file("issuing-root.pem").display().to_string(),
        "-untrusted",
        &d.join("ica.pem").display().to_string(),
        &d.join("leaf.pem").display().to_string(),
    ]);
    assert!(verdict.trim().ends_with(": OK"), "{verdict}");
    let subject = openssl(&[
        "x509",
        "-in",
        &d.join("leaf.pem").display().to_string(),
        "-noout",
        "-subject",
    ]);
    assert_eq!(subject.trim(), "subject=CN = gw-0001");

    // The leaf's key is the agent's operational key, kept in a 0600 file.
    let key = provisioned_key_path(state);
    assert_eq!(cert_pubkey(&d.join("leaf.pem")), key_pubkey(&key));
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // What went over the wire: a registration carrying a CSR for CN=gw-0001.
    let events = sim.events();
    let register = of_kind(&events, "request")
        .into_iter()
        .find(|e| e["kind"] == "register")
        .expect("a register request");
    assert_eq!(register["body"]["registrationId"], REG_ID);
    let csr_b64 = register["body"]["csr"].as_str().expect("csr in body");
    assert!(!csr_b64.contains('\n'));
    let csr_der =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, csr_b64).unwrap();
    fs::write(d.join("req.der"), csr_der).unwrap();
    let req = openssl(&[
        "req",
        "-inform",
        "DER",
        "-in",
        &d.join("req.der").display().to_string(),
        "-noout",
        "-subject",
        "-verify",
    ]);
    assert!(req.contains("subject=CN = gw-0001"), "{req}");
    let connect = &of_kind(&events, "connect")[0];
    assert_eq!(connect["client_id"], REG_ID);
    assert!(
        connect["username"]
            .as_str()
            .unwrap()
            .starts_with("0ne00000000/registrations/gw-0001/api-version=2025-07-01-preview&ClientVersion=dps-agent%2F"),
        "{connect}"
    );

    // A second run uses the stored identity without contacting DPS.
    let connections = sim.connections();
    let o = agent(&cfg, &["run", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("already provisioned"),
        "{}",
        text(&o)
    );
    assert_eq!(
        sim.connections(),
        connections,
        "the second run must not connect to DPS"
    );

    // status --json reads the state directory.
    let o = agent(&cfg, &["status", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["state"], "provisioned");
    assert_eq!(s["device_id"], REG_ID);
    assert_eq!(s["assigned_hub"], "localhost");
    assert_eq!(s["source"], "state-dir");
    assert!(s["not_after"].as_i64().unwrap() > s["not_before"].as_i64().unwrap());
}

/// The gap between each response that carries a retry-after and the next request.
fn waits_after_retry_after(events: &[Value]) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for (i, e) in events.iter().enumerate() {
        if e["event"] != "response" {
            continue;
        }
        let Some(ra) = e["retry_after"].as_f64() else {
            continue;
        };
        if let Some(next) = events[i + 1..].iter().find(|n| n["event"] == "request") {
            out.push((ra, next["t"].as_f64().unwrap() - e["t"].as_f64().unwrap()));
        }
    }
    out
}

fn assert_polls_follow_register(events: &[Value]) {
    let accepted: Vec<&Value> = of_kind(events, "response")
        .into_iter()
        .filter(|r| r["status"] == 202)
        .collect();
    let op = accepted[0]["operation_id"].as_str().expect("operation id");
    let polls: Vec<&Value> = of_kind(events, "request")
        .into_iter()
        .filter(|r| r["kind"] == "poll")
        .collect();
    assert!(!polls.is_empty());
    for p in polls {
        assert_eq!(
            p["operation_id"], op,
            "every poll asks for the operation DPS returned"
        );
    }
}

#[test]
fn throttle_is_honoured_exactly() {
    let d = TestDir::new("throttle");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(2),
            faults: vec!["throttle".into()],
            ..Default::default()
        },
    );
    let cfg = AgentSetup::for_sim(&d.path, &sim).write(&d.join("config.toml"));
    let o = agent(&cfg, &["run", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    let events = sim.events();
    let throttled = of_kind(&events, "response")
        .into_iter()
        .filter(|r| r["status"] == 429)
        .count();
    assert!(
        throttled >= 2,
        "register and poll were throttled: {events:?}"
    );
    let waits = waits_after_retry_after(&events);
    assert!(waits.len() >= 3, "{waits:?}");
    for (asked, waited) in waits {
        assert!(
            (waited - asked).abs() <= 0.5,
            "asked to wait {asked}s, waited {waited:.3}s"
        );
    }
    assert_polls_follow_register(&events);
}

#[test]
fn slow_assign_polls_the_same_operation_at_retry_after() {
    let d = TestDir::new("slow-assign");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(1),
            faults: vec!["slow-assign".into()],
            ..Default::default()
        },
    );
    let cfg = AgentSetup::for_sim(&d.path, &sim).write(&d.join("config.toml"));
    let o = agent(&cfg, &["run", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    let events = sim.events();
    let polls = of_kind(&events, "request")
        .into_iter()
        .filter(|r| r["kind"] == "poll")
        .count();
    // slow-assign answers three polls "assigning"; the fourth gets the assignment.
    assert_eq!(polls, 4, "{events:?}");
    for (asked, waited) in waits_after_retry_after(&events) {
        assert!(
            (waited - asked).abs() <= 0.5,
            "asked to wait {asked}s, waited {waited:.3}s"
        );
    }
    assert_polls_follow_register(&events);
}

#[test]
fn terminal_answers_keep_the_previous_identity() {
    let d = TestDir::new("terminal");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            cert_validity: Some("3s".into()),
            ..Default::default()
        },
    );
    let setup = AgentSetup::for_sim(&d.path, &sim);
    let cfg = setup.write(&d.join("config.toml"));
    let o = agent(&cfg, &["run", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    let state = &setup.state_dir;
    let identity = fs::read(state.join("identity.json")).unwrap();
    let chain = fs::read(state.join("operational-chain.pem")).unwrap();
    let keys = || {
        let mut k: Vec<_> = fs::read_dir(state.join("keys"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        k.sort();
        k
    };
    let keys_before = keys();
    assert_eq!(keys_before.len(), 1);
    // Let the short-lived certificate expire so the next run must go to DPS.
    std::thread::sleep(std::time::Duration::from_secs(4));

    for (fault, message) in [
        (
            "status-failed",
            "DPS refused the registration (status \"failed\", error 400207)",
        ),
        ("status-disabled", "the enrollment is disabled"),
        ("malformed-json", "DPS sent a reply the agent cannot use"),
    ] {
        sim.set_faults(&[fault]);
        let connections = sim.connections();
        let o = agent(&cfg, &["run", "--once"]);
        assert_eq!(o.status.code(), Some(1), "{fault}: {}", text(&o));
        assert!(stderr(&o).contains(message), "{fault}: {}", text(&o));
        assert!(
            sim.connections() > connections,
            "{fault}: DPS was contacted"
        );
        assert_eq!(
            fs::read(state.join("identity.json")).unwrap(),
            identity,
            "{fault}"
        );
        assert_eq!(
            fs::read(state.join("operational-chain.pem")).unwrap(),
            chain,
            "{fault}"
        );
        assert_eq!(keys(), keys_before, "{fault}: the new key is discarded");
    }
}

#[test]
fn bootstrap_certificate_from_a_foreign_ca_is_refused() {
    let d = TestDir::new("foreign-bootstrap");
    let pki = Pki::generate(&d.join("pki"));
    let foreign = Pki::generate(&d.join("foreign"));
    let sim = Sim::start(&d.join("sim"), &pki, &SimOptions::default());
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    setup.identity_cert = foreign.device_cert();
    setup.identity_key = format!("file:{}", foreign.device_key().display());
    let cfg = setup.write(&d.join("config.toml"));
    let o = agent(&cfg, &["run", "--once"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        stderr(&o).contains("refused the bootstrap credential"),
        "{}",
        text(&o)
    );
    assert!(!setup.state_dir.join("identity.json").exists());
    let connects = of_kind(&sim.events(), "connect").len();
    assert!(connects >= 1);
    assert!(
        of_kind(&sim.events(), "connect")
            .iter()
            .all(|c| c["result"] != "accepted"),
        "the simulator refused every connection"
    );
}

#[test]
fn untrusted_dps_server_is_refused() {
    let d = TestDir::new("untrusted-server");
    let pki = Pki::generate(&d.join("pki"));
    let foreign = Pki::generate(&d.join("foreign"));
    let sim = Sim::start(&d.join("sim"), &pki, &SimOptions::default());
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    setup.trust_bundle = foreign.file("server-ca.pem");
    let cfg = setup.write(&d.join("config.toml"));
    let o = agent(&cfg, &["run", "--once"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(stderr(&o).contains("is not trusted"), "{}", text(&o));
    assert!(stderr(&o).contains("trust_bundle"), "{}", text(&o));
    assert!(!setup.state_dir.join("identity.json").exists());
}

#[test]
fn check_config_names_the_problem() {
    let d = TestDir::new("check-config");
    let pki = Pki::generate(&d.join("pki"));
    let setup = AgentSetup {
        endpoint: "localhost:1".into(),
        trust_bundle: pki.file("server-ca.pem"),
        identity_cert: pki.device_cert(),
        identity_key: format!("file:{}", pki.device_key().display()),
        state_dir: d.join("state"),
        key_backend: "file".into(),
        key_algorithm: "ecdsa-p384".into(),
        hub: String::new(),
        extra: String::new(),
    };
    let cfg = setup.write(&d.join("config.toml"));
    let o = agent(&cfg, &["check-config"]);
    assert!(o.status.success(), "{}", text(&o));
    let mut bad = setup.clone();
    bad.key_algorithm = "ecdsa-p521".into();
    let cfg = bad.write(&d.join("bad.toml"));
    let o = agent(&cfg, &["check-config"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = stderr(&o);
    assert!(e.contains("bad.toml:"), "{e}");
    assert!(e.contains("[operational] key_algorithm = \"ecdsa-p521\" is not supported; use \"ecdsa-p384\" or \"ecdsa-p256\""), "{e}");
}
