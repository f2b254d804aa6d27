//! The device API's message schema (api-version 2025-07-01-preview, transcribed in
//! tests/e2e/schema/device-2025-07-01-preview.json): every register body dps-agent sends and
//! every answer dps-sim gives in a provisioning run, over MQTT and HTTPS, with errors and
//! retries in it, validates (python-jsonschema in the venv); the validator does refuse what
//! the schema forbids; and dps-agent provisions while every answer carries fields it does not
//! know (the simulator's `extra-fields` fault).

use std::path::{Path, PathBuf};

use dps_agent_e2e::*;
use serde_json::{json, Value};

fn schema() -> PathBuf {
    workspace_root().join("tests/e2e/schema/device-2025-07-01-preview.json")
}

/// Runs validate_bodies.py over events files: (exit success, its report).
fn validate(events: &[&Path]) -> (bool, Value) {
    let python = venv::python(&["jsonschema"]);
    let o = run(std::process::Command::new(python)
        .arg(venv::script("validate_bodies.py"))
        .arg("--schema")
        .arg(schema())
        .args(events));
    let report: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("validate_bodies.py printed no report ({e}): {}", text(&o)));
    (o.status.success(), report)
}

fn count(report: &Value, definition: &str) -> u64 {
    report["checked"][definition].as_u64().unwrap_or(0)
}

/// A simulator and an X.509 agent config for `transport` ("mqtt" or "https").
fn provision(name: &str, transport: &str, faults: &[&str]) -> (TestDir, Sim) {
    let d = TestDir::new(name);
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            polls_before_assign: Some(2),
            faults: faults.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        },
    );
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    if transport == "https" {
        setup.endpoint = format!("localhost:{}", sim.https_port);
    }
    let x509 = format!(
        "method = \"x509\"\nidentity_cert = \"{}\"\nidentity_key = \"{}\"",
        setup.identity_cert.display(),
        setup.identity_key
    );
    let cfg = setup.write_with(&d.join("config.toml"), transport, &x509);
    let o = agent(&cfg, &["run", "--once"]);
    assert!(o.status.success(), "{transport}: {}", text(&o));
    assert!(
        setup.state_dir.join("identity.json").exists(),
        "{transport}: {}",
        text(&o)
    );
    (d, sim)
}

/// The keys dps-agent puts in a register body are all defined by `DeviceRegistration`.
fn only_defined_fields(events: &[Value]) {
    let defined = ["registrationId", "tpm", "csr", "payload"];
    for r in of_kind(events, "request") {
        if r["kind"] != "register" {
            continue;
        }
        let body = r["body"].as_object().expect("a JSON object body");
        assert!(body.contains_key("csr"), "{r}");
        for k in body.keys() {
            assert!(defined.contains(&k.as_str()), "undefined field {k}: {r}");
        }
    }
}

#[test]
fn agent_requests_and_simulator_answers_follow_the_device_api_schema() {
    // throttle and server-error put 429 and 500 error bodies into the run; the agent retries.
    let runs: Vec<(TestDir, Sim)> = ["mqtt", "https"]
        .iter()
        .map(|t| provision(&format!("schema-{t}"), t, &["throttle", "server-error"]))
        .collect();
    for (_, sim) in &runs {
        let events = sim.events();
        only_defined_fields(&events);
        let statuses: Vec<i64> = of_kind(&events, "response")
            .iter()
            .filter_map(|r| r["status"].as_i64())
            .collect();
        for s in [429, 500, 202, 200] {
            assert!(statuses.contains(&s), "a {s} answer: {statuses:?}");
        }
    }
    let files: Vec<&Path> = runs.iter().map(|(_, s)| s.events.as_path()).collect();
    let (ok, report) = validate(&files);
    assert!(ok, "bodies that do not follow the schema: {report:#}");
    assert!(count(&report, "DeviceRegistration") >= 4, "{report}");
    assert!(
        count(&report, "RegistrationOperationStatus") >= 6,
        "{report}"
    );
    assert!(
        count(&report, "ProvisioningServiceErrorDetails") >= 4,
        "{report}"
    );
    eprintln!("schema: {report}");
}

#[test]
fn the_validator_refuses_what_the_schema_forbids() {
    let d = TestDir::new("schema-negative");
    let ev = |event: &str, status: Value, body: Value| {
        json!({"t": 0.0, "conn": 1, "event": event, "service": "dps", "kind": "register",
               "status": status, "body": body})
    };
    let bad = [
        ev("request", Value::Null, json!({"registrationId": 7})),
        ev("request", Value::Null, json!({"csr": "not base64!"})),
        ev("request", Value::Null, json!({"payload": "a string"})),
        ev(
            "request",
            Value::Null,
            json!({"tpm": {"storageRootKey": "AAAA"}}),
        ),
        ev("response", json!(202), json!({"status": "assigning"})),
        ev(
            "response",
            json!(202),
            json!({"operationId": "", "status": "assigning"}),
        ),
        ev(
            "response",
            json!(200),
            json!({"operationId": "x", "status": "done"}),
        ),
        ev(
            "response",
            json!(200),
            json!({"operationId": "x", "status": "assigned",
                   "registrationState": {"issuedCertificateChain": ["-----BEGIN CERTIFICATE-----"]}}),
        ),
        ev(
            "response",
            json!(200),
            json!({"operationId": "x", "registrationState": {"substatus": "moved"}}),
        ),
        ev(
            "response",
            json!(200),
            json!({"operationId": "x", "registrationState": {"createdDateTimeUtc": "yesterday"}}),
        ),
        ev("response", json!(429), json!({"errorCode": "429001"})),
        ev(
            "response",
            json!(500),
            json!({"errorCode": 5_000_000_000_i64}),
        ),
        ev("response", json!(400), json!({"info": {"a": 1}})),
        ev("response", json!(200), json!("{\"operationId\":")),
    ];
    let good = [
        ev(
            "request",
            Value::Null,
            json!({"registrationId": "gw-0001", "csr": "MIIB", "payload": {"a": [1]}}),
        ),
        ev(
            "response",
            json!(202),
            json!({"operationId": "4.a.b", "status": "assigning", "unknown": {}}),
        ),
        ev(
            "response",
            json!(401),
            json!({"errorCode": 401002, "trackingId": "t", "message": "m",
                                           "timestampUtc": "2026-11-23T01:41:16Z", "info": {"k": "v"}}),
        ),
    ];
    let file = d.join("events.jsonl");
    let lines: Vec<String> = bad.iter().chain(&good).map(Value::to_string).collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let (ok, report) = validate(&[&file]);
    assert!(!ok, "{report}");
    let mut bad_lines: Vec<u64> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    bad_lines.dedup();
    assert_eq!(
        bad_lines,
        (1..=bad.len() as u64).collect::<Vec<_>>(),
        "every bad body and nothing else is refused: {report:#}"
    );
}

#[test]
fn the_agent_ignores_unknown_fields_in_every_answer() {
    for transport in ["mqtt", "https"] {
        let (d, sim) = provision(
            &format!("schema-extra-{transport}"),
            transport,
            &["extra-fields", "throttle"],
        );
        let events = sim.events();
        let responses = of_kind(&events, "response");
        assert!(responses.len() >= 4, "{responses:?}");
        for r in &responses {
            assert!(
                r["body"]["futureField"].is_object() && r["body"]["connectionProfile"].is_object(),
                "{transport}: every answer has the unknown fields: {r}"
            );
            assert!(
                r["fault"].as_str().unwrap_or("").contains("extra-fields"),
                "{r}"
            );
        }
        let last = responses.last().unwrap();
        assert_eq!(last["registration_status"], "assigned", "{last}");
        assert!(
            last["body"]["registrationState"]["futureField"].is_object(),
            "{last}"
        );
        let id: Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("state/identity.json")).unwrap())
                .unwrap();
        assert_eq!(id["device_id"], REG_ID);
        assert_eq!(id["assigned_hub"], "localhost");
        let (ok, report) = validate(&[&sim.events]);
        assert!(ok, "extra fields are allowed by the schema: {report:#}");
    }
}
