//! IoT Hub: each new certificate is proven against the assigned hub before it
//! is committed, and reported in the device twin; a hub that refuses it
//! leaves the current identity in place. Also checked once against real
//! mosquitto, an independent TLS stack, with keys in a file and in swtpm.

use std::fs;
use std::path::Path;
use std::time::Duration;

use dps_agent_e2e::daemon::Daemon;
use dps_agent_e2e::mosquitto::Mosquitto;
use dps_agent_e2e::swtpm::Swtpm;
use dps_agent_e2e::*;
use serde_json::Value;

fn identity(state: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(state.join("identity.json")).unwrap()).unwrap()
}

fn rfc3339(t: i64) -> String {
    let o = run(std::process::Command::new("date").args([
        "-u",
        "-d",
        &format!("@{t}"),
        "+%Y-%m-%dT%H:%M:%SZ",
    ]));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn reported_certificate(sim: &Sim) -> Value {
    sim.twins()[REG_ID]["reported"]["certificate"].clone()
}

fn key_count(state: &Path) -> usize {
    fs::read_dir(state.join("keys"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn hub_sim(d: &TestDir) -> (Pki, Sim) {
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            hub: true,
            ..Default::default()
        },
    );
    (pki, sim)
}

#[test]
fn the_twin_reports_the_certificate_and_follows_renewals() {
    let d = TestDir::new("hub-twin");
    let (_pki, sim) = hub_sim(&d);
    let setup = AgentSetup::for_sim(&d.path, &sim);
    let cfg = setup.write(&d.join("config.toml"));
    let state = setup.state_dir.clone();
    let mut daemon = Daemon::start(&cfg, &state, &d.join("agent.log"));
    daemon.wait_for("provisioning", Duration::from_secs(30), |d| {
        d.status()["state"] == "provisioned"
    });
    let first = identity(&state);
    let cert = reported_certificate(&sim);
    assert_eq!(
        cert["validFrom"],
        rfc3339(first["not_before"].as_i64().unwrap())
    );
    assert_eq!(
        cert["validUntil"],
        rfc3339(first["not_after"].as_i64().unwrap())
    );
    assert_eq!(cert["thumbprint"], first["thumbprint"]);
    let status = daemon.status();
    assert_eq!(
        cert["renewAt"],
        rfc3339(status["renew_at"].as_i64().unwrap())
    );
    assert!(cert["issuedAt"].as_str().unwrap().ends_with('Z'));
    let version = sim.twins()[REG_ID]["version"].as_u64().unwrap();

    // The hub saw the device connect with exactly that certificate.
    let events = sim.events();
    let connects: Vec<&Value> = of_kind(&events, "connect")
        .into_iter()
        .filter(|e| e["service"] == "hub")
        .collect();
    assert_eq!(connects.len(), 1, "{connects:?}");
    assert_eq!(connects[0]["result"], "accepted");
    assert_eq!(connects[0]["client_id"], REG_ID);
    assert_eq!(
        connects[0]["cert_sha256"].as_str().unwrap().to_uppercase(),
        first["thumbprint"].as_str().unwrap()
    );
    assert!(connects[0]["username"]
        .as_str()
        .unwrap()
        .starts_with("localhost/gw-0001/?api-version=2021-04-12"));

    // A renewal updates it.
    daemon.hup();
    daemon.wait_for("the renewal", Duration::from_secs(30), |d| {
        d.status()["renewals"].as_u64().unwrap_or(0) >= 2
    });
    let second = identity(&state);
    assert_ne!(second["thumbprint"], first["thumbprint"]);
    let cert = reported_certificate(&sim);
    assert_eq!(cert["thumbprint"], second["thumbprint"]);
    assert_eq!(
        cert["validUntil"],
        rfc3339(second["not_after"].as_i64().unwrap())
    );
    assert!(sim.twins()[REG_ID]["version"].as_u64().unwrap() > version);
    daemon.stop();
}

#[test]
fn a_refused_certificate_is_rolled_back_and_retried() {
    let d = TestDir::new("hub-reject");
    let (_pki, sim) = hub_sim(&d);
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    setup.extra = "[log]\nlevel = \"debug\"\n".into();
    let cfg = setup.write(&d.join("config.toml"));
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .replace("[operational]\n", "[operational]\nretry_max = \"3s\"\n");
    fs::write(&cfg, text).unwrap();
    let state = setup.state_dir.clone();
    let mut daemon = Daemon::start(&cfg, &state, &d.join("agent.log"));
    daemon.wait_for("provisioning", Duration::from_secs(30), |d| {
        d.status()["state"] == "provisioned"
    });
    let before = fs::read(state.join("identity.json")).unwrap();
    let twin_before = reported_certificate(&sim);

    sim.set_faults(&["reject-cert"]);
    daemon.hup();
    daemon.wait_for("a refused renewal", Duration::from_secs(30), |d| {
        d.status()["failures"].as_u64().unwrap_or(0) >= 1
    });
    let s = daemon.status();
    assert_eq!(s["state"], "failed", "{s}");
    assert!(
        s["last_error"]
            .as_str()
            .unwrap()
            .contains("refused the certificate"),
        "{s}"
    );
    assert_eq!(
        fs::read(state.join("identity.json")).unwrap(),
        before,
        "old chain kept"
    );
    assert_eq!(key_count(&state), 1, "the pending key is discarded");
    assert_eq!(reported_certificate(&sim), twin_before);
    let log = daemon.log_text();
    assert!(
        log.contains("refuses the current certificate as well"),
        "the current identity is tested too:\n{log}"
    );

    // Fault off: a later attempt succeeds and is reported.
    sim.set_faults(&[]);
    daemon.wait_for("recovery", Duration::from_secs(30), |d| {
        let s = d.status();
        s["state"] == "provisioned" && s["renewals"].as_u64().unwrap_or(0) >= 2
    });
    assert_ne!(fs::read(state.join("identity.json")).unwrap(), before);
    assert_eq!(key_count(&state), 1);
    assert_eq!(
        reported_certificate(&sim)["thumbprint"],
        identity(&state)["thumbprint"]
    );
    daemon.stop();
}

/// mosquitto trusting only the simulator's issuing CA (and its root) checks
/// the agent's client authentication, with the key in `backend`.
fn mosquitto_accepts(backend: &str) {
    let d = TestDir::new(&format!("hub-mosquitto-{backend}"));
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            ..Default::default()
        },
    );
    let cafile = d.join("issuing-chain.pem");
    fs::write(
        &cafile,
        fs::read_to_string(pki.file("issuing-ca.pem")).unwrap()
            + &fs::read_to_string(pki.file("issuing-root.pem")).unwrap(),
    )
    .unwrap();
    let broker = Mosquitto::start(
        &d.join("mosquitto"),
        &cafile,
        &pki.file("server.pem"),
        &pki.file("server.key"),
    );
    let tpm = (backend == "tpm").then(|| Swtpm::start(&d.join("swtpm")));
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    setup.key_backend = backend.into();
    setup.hub = format!("port = {}\nreport_twin = false\n", broker.port);
    if let Some(t) = &tpm {
        setup.extra = format!("[tpm]\ntcti = \"{}\"\n", t.tcti());
    }
    let cfg = setup.write(&d.join("config.toml"));
    let o = agent(&cfg, &["run", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("IoT Hub localhost accepted the certificate"),
        "{backend}: {err}"
    );
    let log = broker.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("New client connected") && l.contains("gw-0001")),
        "{backend}: mosquitto saw the client:\n{log}"
    );
    let key_uri = identity(&setup.state_dir)["key_uri"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(key_uri.starts_with(&format!("{backend}:")), "{key_uri}");
}

#[test]
fn mosquitto_checks_the_client_certificate_with_a_file_key() {
    mosquitto_accepts("file");
}

#[test]
fn mosquitto_checks_the_client_certificate_with_a_tpm_key() {
    mosquitto_accepts("tpm");
}

/// DPS registrations the simulator received.
fn dps_registrations(sim: &Sim) -> usize {
    of_kind(&sim.events(), "request")
        .into_iter()
        .filter(|e| e["service"] == "dps" && e["kind"] == "register")
        .count()
}

/// `renewal_path = "hub"`: a renewal asks the assigned hub's certificate API,
/// connected with the current certificate, and makes no DPS registration; when
/// the API fails, the same attempt registers with DPS instead.
#[test]
fn renewal_through_the_hub_certificate_api_falls_back_to_dps() {
    let d = TestDir::new("hub-renewal-path");
    let (_pki, sim) = hub_sim(&d);
    let setup = AgentSetup::for_sim(&d.path, &sim);
    let cfg = setup.write(&d.join("config.toml"));
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .replace("[operational]\n", "[operational]\nrenewal_path = \"hub\"\n");
    fs::write(&cfg, text).unwrap();
    let state = setup.state_dir.clone();
    let mut daemon = Daemon::start(&cfg, &state, &d.join("agent.log"));
    // The first identity can only come from DPS.
    daemon.wait_for("provisioning", Duration::from_secs(30), |d| {
        d.status()["state"] == "provisioned"
    });
    assert_eq!(dps_registrations(&sim), 1);
    let first = identity(&state);

    daemon.hup();
    daemon.wait_for("a renewal through the hub", Duration::from_secs(30), |d| {
        d.status()["renewals"].as_u64().unwrap_or(0) >= 2
    });
    let second = identity(&state);
    assert_ne!(second["thumbprint"], first["thumbprint"]);
    assert_ne!(second["key_uri"], first["key_uri"], "a fresh key");
    assert_eq!(second["device_id"], first["device_id"]);
    assert_eq!(second["assigned_hub"], first["assigned_hub"]);
    assert_eq!(dps_registrations(&sim), 1, "no DPS registration");
    let events = sim.events();
    // The request came over a connection made with the first certificate.
    let requests = of_kind(&events, "credential_request");
    assert_eq!(requests.len(), 1, "{requests:?}");
    let conn = requests[0]["conn"].clone();
    let connect = of_kind(&events, "connect")
        .into_iter()
        .find(|e| e["conn"] == conn)
        .expect("the request's connection");
    assert_eq!(
        connect["cert_sha256"].as_str().unwrap().to_uppercase(),
        first["thumbprint"].as_str().unwrap()
    );
    assert!(connect["username"]
        .as_str()
        .unwrap()
        .contains("api-version=2025-08-01-preview"));
    assert_eq!(requests[0]["body"]["id"], REG_ID);
    assert_eq!(requests[0]["body"]["replace"], "*");
    let statuses: Vec<Value> = of_kind(&events, "credential_response")
        .into_iter()
        .map(|e| e["status"].clone())
        .collect();
    assert_eq!(statuses, [202, 200]);
    // The issued chain holds the new key, and the hub proved and reported it.
    leaf_matches_file_key(&second);
    assert_eq!(
        reported_certificate(&sim)["thumbprint"],
        second["thumbprint"]
    );
    assert_eq!(key_count(&state), 1);

    // The certificate API fails: the same attempt goes to DPS.
    sim.set_faults(&["hub-csr-unavailable"]);
    daemon.hup();
    daemon.wait_for("a renewal through DPS", Duration::from_secs(30), |d| {
        d.status()["renewals"].as_u64().unwrap_or(0) >= 3
    });
    let third = identity(&state);
    assert_ne!(third["thumbprint"], second["thumbprint"]);
    assert_eq!(dps_registrations(&sim), 2);
    let events = sim.events();
    let responses = of_kind(&events, "credential_response");
    assert_eq!(responses.last().unwrap()["status"], 503);
    let log = daemon.log_text();
    assert!(
        log.contains("answered the certificate request with status 503: errorCode 503001")
            && log.contains("registering with DPS instead"),
        "{log}"
    );
    assert_eq!(daemon.status()["failures"], 0);
    assert_eq!(key_count(&state), 1);
    leaf_matches_file_key(&third);
    daemon.stop();
}

/// The identity's leaf holds the public key of its key file.
fn leaf_matches_file_key(id: &Value) {
    let key = Path::new(
        id["key_uri"]
            .as_str()
            .unwrap()
            .strip_prefix("file:")
            .unwrap(),
    );
    let leaf = split_pem(id["chain_pem"].as_str().unwrap()).remove(0);
    let leaf_file = key.parent().unwrap().join("../leaf-check.pem");
    fs::write(&leaf_file, leaf).unwrap();
    assert_eq!(cert_pubkey(&leaf_file), key_pubkey(key));
}
