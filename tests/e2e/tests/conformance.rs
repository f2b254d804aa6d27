//! Conformance with Microsoft's own client: the Python device SDK (`azure-iot-device==2.14.0`
//! from PyPI, unmodified, in the venv `make venv` makes) provisions against dps-sim over MQTT,
//! with X.509 and with a symmetric key (individual enrollment), and gets `assigned` with the
//! simulator's hub and device id. The SDK always connects to port 8883, so the simulator and
//! the SDK run in a private network namespace where 8883 is surely free. The events file
//! shows what the SDK sent: its own api-version (2019-03-31, no CSR), clean_session = 0, the
//! `" "` poll body; the simulator assigns without issuing a chain.

use base64::Engine as _;
use dps_agent_e2e::*;
use serde_json::Value;

/// The simulator on port 8883 in a network namespace of its own.
fn sim_in_namespace(d: &TestDir, pki: &Pki, extra: &[&str]) -> Sim {
    netns::require();
    let mut args = vec!["--mqtt-port".to_string(), "8883".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    Sim::start(
        &d.join("sim"),
        pki,
        &SimOptions {
            retry_after: Some(0),
            wrapper: netns::private(),
            extra: args,
            ..Default::default()
        },
    )
}

/// Runs tests/e2e/python/sdk_provision.py in the simulator's namespace; its JSON line.
fn sdk_provision(sim: &Sim, registration_id: &str, credential: &[String]) -> Value {
    let python = venv::python(&["azure.iot.device"]);
    let o = run(netns::command(sim.pid(), &python)
        .arg(venv::script("sdk_provision.py"))
        .args(["--host", "localhost", "--id-scope", ID_SCOPE])
        .args(["--registration-id", registration_id])
        .arg("--server-ca")
        .arg(sim.pki.file("server-ca.pem"))
        .args(credential));
    assert!(
        o.status.success(),
        "the SDK did not get an assignment: {}\n--- simulator log\n{}",
        text(&o),
        std::fs::read_to_string(&sim.log).unwrap_or_default()
    );
    let line = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// What both onboarding methods must show, in the SDK's result and in the events.
fn check_assigned(sim: &Sim, result: &Value, registration_id: &str, auth: &str) {
    assert_eq!(result["status"], "assigned", "{result}");
    assert_eq!(result["assigned_hub"], "localhost", "{result}");
    assert_eq!(result["device_id"], registration_id, "{result}");
    assert_eq!(result["substatus"], "initialAssignment", "{result}");

    let events = sim.events();
    let connects = of_kind(&events, "connect");
    assert_eq!(connects.len(), 1, "one connection: {connects:?}");
    let c = connects[0];
    assert_eq!(c["result"], "accepted", "{c}");
    assert_eq!(c["connack"], 0, "{c}");
    assert_eq!(c["auth"], auth, "{c}");
    assert_eq!(c["client_id"], registration_id, "{c}");
    assert_eq!(c["clean_session"], false, "the SDK keeps a session: {c}");
    let username = c["username"].as_str().unwrap_or_default();
    assert!(
        username.starts_with(&format!(
            "{ID_SCOPE}/registrations/{registration_id}/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0"
        )),
        "{username}"
    );
    let subs = of_kind(&events, "subscribe");
    assert_eq!(subs.len(), 1, "{subs:?}");
    assert_eq!(subs[0]["filter"], "$dps/registrations/res/#");
    assert_eq!(subs[0]["granted"], 1);

    let requests = of_kind(&events, "request");
    let registers: Vec<_> = requests
        .iter()
        .filter(|r| r["kind"] == "register")
        .collect();
    assert_eq!(registers.len(), 1, "{requests:?}");
    let body = &registers[0]["body"];
    assert_eq!(body["registrationId"], registration_id, "{body}");
    assert!(body.get("csr").is_none(), "the SDK sends no CSR: {body}");
    let polls: Vec<_> = requests.iter().filter(|r| r["kind"] == "poll").collect();
    assert!(!polls.is_empty(), "{requests:?}");
    for p in &polls {
        assert_eq!(p["body"], " ", "the SDK's poll body: {p}");
        assert_eq!(p["operation_id"], result["operation_id"], "{p}");
    }

    let responses = of_kind(&events, "response");
    assert!(
        responses.iter().all(|r| r["delivered"] == true),
        "{responses:?}"
    );
    let last = responses.last().expect("a response");
    assert_eq!(last["status"], 200, "{last}");
    assert_eq!(last["registration_status"], "assigned", "{last}");
    let state = &last["body"]["registrationState"];
    assert_eq!(state["deviceId"], registration_id, "{last}");
    assert_eq!(state["assignedHub"], "localhost", "{last}");
    assert!(
        state.get("issuedCertificateChain").is_none(),
        "no CSR, no chain: {state}"
    );
    assert!(of_kind(&events, "issued").is_empty(), "nothing was issued");
    let disconnects = of_kind(&events, "disconnect");
    assert_eq!(disconnects.len(), 1, "{disconnects:?}");
    assert_eq!(disconnects[0]["reason"], "client DISCONNECT");
}

#[test]
fn microsofts_python_sdk_provisions_with_x509() {
    let d = TestDir::new("conformance-x509");
    let pki = Pki::generate(&d.join("pki"));
    let sim = sim_in_namespace(&d, &pki, &[]);
    let result = sdk_provision(
        &sim,
        REG_ID,
        &[
            "--cert".into(),
            pki.device_cert().display().to_string(),
            "--key".into(),
            pki.device_key().display().to_string(),
        ],
    );
    check_assigned(&sim, &result, REG_ID, "x509");
    let c = &of_kind(&sim.events(), "connect")[0].clone();
    assert_eq!(c["cert_cn"], REG_ID, "{c}");
    assert_eq!(c["enrollment"], Value::Null, "{c}");
}

#[test]
fn microsofts_python_sdk_provisions_with_a_symmetric_key() {
    let d = TestDir::new("conformance-sas");
    let pki = Pki::generate(&d.join("pki"));
    let key: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let reg = "sdk-sas-0001";
    let sim = sim_in_namespace(&d, &pki, &["--symmetric-key", &format!("{reg}={key}")]);
    let result = sdk_provision(&sim, reg, &["--symmetric-key".into(), key.clone()]);
    check_assigned(&sim, &result, reg, "sas");
    let c = &of_kind(&sim.events(), "connect")[0].clone();
    assert_eq!(c["enrollment"], "individual", "{c}");
    assert_eq!(c["cert_cn"], Value::Null, "{c}");

    // The same SDK with the wrong key is refused (CONNACK 5), as by DPS.
    let wrong = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let python = venv::python(&["azure.iot.device"]);
    let o = run(netns::command(sim.pid(), &python)
        .arg(venv::script("sdk_provision.py"))
        .args(["--id-scope", ID_SCOPE, "--registration-id", reg])
        .arg("--server-ca")
        .arg(sim.pki.file("server-ca.pem"))
        .args(["--symmetric-key", &wrong]));
    assert!(!o.status.success(), "{}", text(&o));
    let refused = of_kind(&sim.events(), "connect")
        .into_iter()
        .filter(|c| c["connack"] == 5)
        .count();
    assert!(refused >= 1, "{:?}", of_kind(&sim.events(), "connect"));
}
