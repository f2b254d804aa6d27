//! The D-Bus interface as local apps meet it: on a private bus that applies
//! the system bus rules and the shipped policy file, with the daemon running
//! as user dps-agent; readers, admins and strangers calling it.

use std::fs;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dps_agent::bus::client::Agent1Proxy;
use dps_agent_e2e::daemon::Daemon;
use dps_agent_e2e::dbus::*;
use dps_agent_e2e::*;
use futures_util::StreamExt;
use serde_json::Value;

const NAME: &str = "org.dpsagent.Agent";
const PATH: &str = "/org/dpsagent/Agent";
const IFACE: &str = "org.dpsagent.Agent1";

fn require_root() {
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the D-Bus suites create users and switch to them: run them as root (make test does)"
    );
}

fn chown(path: &std::path::Path, user: &str) {
    let ok = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:{user}"))
        .arg(path)
        .status()
        .unwrap();
    assert!(ok.success());
}

fn out(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Signals seen by a zbus client: (member, body as text).
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// Follows the daemon's signals the way a local app would (see the README).
fn listen(address: String) -> Seen {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let conn = zbus::connection::Builder::address(address.as_str()).build().await.unwrap();
            let agent = Agent1Proxy::new(&conn).await.unwrap();
            let props = zbus::fdo::PropertiesProxy::builder(&conn)
                .destination(NAME)
                .path(PATH)
                .build()
                .await
                .unwrap();
            let mut renewed = agent.receive_certificate_renewed().await.unwrap();
            let mut changed = props.receive_properties_changed().await.unwrap();
            loop {
                tokio::select! {
                    Some(sig) = renewed.next() => {
                        let a = sig.args().unwrap();
                        s.lock().unwrap().push(("CertificateRenewed".into(), format!("{} {}", a.chain_path(), a.not_after())));
                    }
                    Some(sig) = changed.next() => {
                        let a = sig.args().unwrap();
                        let keys: Vec<String> = a.changed_properties().keys().map(|k| k.to_string()).collect();
                        s.lock().unwrap().push(("PropertiesChanged".into(), keys.join(",")));
                    }
                    // Both streams ended: the bus closed.
                    else => break,
                }
            }
        });
    });
    seen
}

#[test]
fn local_apps_read_the_identity_and_only_admins_renew() {
    require_root();
    ensure_user("dps-agent");
    let admin_gid = ensure_group("dps-agent-admin");
    let d = TestDir::new("dbus");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            ..Default::default()
        },
    );
    let policy = workspace_root().join("systemd/org.dpsagent.Agent.conf");
    let bus = PrivateBus::system_like(&d.join("bus"), &[&policy]);
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    setup.extra = format!("[dbus]\nbus = \"{}\"\n", bus.address);
    let cfg = setup.write(&d.join("config.toml"));
    fs::create_dir_all(&setup.state_dir).unwrap();
    chown(&setup.state_dir, "dps-agent");
    chown(&pki.dir, "dps-agent");

    let mut daemon = Daemon::start_as(
        &cfg,
        &setup.state_dir,
        &d.join("agent.log"),
        as_user("dps-agent", "dps-agent", &[]),
    );
    daemon.wait_for("provisioning", Duration::from_secs(30), |d| {
        let s = d.status();
        s["state"] == "provisioned" && s["source"] == "daemon"
    });

    // Anyone reads every property.
    let nobody = as_user("nobody", "nogroup", &[]);
    let mut values = std::collections::HashMap::new();
    for (prop, ty) in [
        ("State", "s"),
        ("RegistrationId", "s"),
        ("DeviceId", "s"),
        ("AssignedHub", "s"),
        ("CertificateChainPath", "s"),
        ("KeyUri", "s"),
        ("NotBefore", "t"),
        ("NotAfter", "t"),
        ("RenewAt", "t"),
        ("LastError", "s"),
        ("LastRenewal", "t"),
        ("NextAttempt", "t"),
        ("Thumbprint", "s"),
        ("Subject", "s"),
        ("Issuer", "s"),
        ("Failures", "u"),
        ("Renewals", "t"),
    ] {
        let o = busctl(
            &bus.address,
            &nobody,
            &["get-property", NAME, PATH, IFACE, prop],
        );
        assert!(o.status.success(), "{prop}: {}", text(&o));
        let v = out(&o);
        assert!(v.starts_with(&format!("{ty} ")), "{prop}: {v}");
        values.insert(prop, v);
    }
    assert_eq!(values["State"], "s \"provisioned\"");
    assert_eq!(values["DeviceId"], "s \"gw-0001\"");
    assert_eq!(values["AssignedHub"], "s \"localhost\"");
    assert_eq!(values["LastError"], "s \"\"");
    let status: Value =
        serde_json::from_str(&fs::read_to_string(setup.state_dir.join("identity.json")).unwrap())
            .unwrap();
    assert_eq!(values["NotAfter"], format!("t {}", status["not_after"]));
    assert!(values["KeyUri"].contains("file:"), "{}", values["KeyUri"]);

    // Anyone gets the chain; it is the stored one.
    let o = busctl(
        &bus.address,
        &nobody,
        &[
            "call",
            "--json=short",
            NAME,
            PATH,
            IFACE,
            "GetCertificateChain",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let chain = fs::read_to_string(setup.state_dir.join("operational-chain.pem")).unwrap();
    assert_eq!(v["data"][0].as_str().unwrap(), chain);

    // The introspection data matches the XML we ship.
    let o = busctl(
        &bus.address,
        &nobody,
        &[
            "call",
            "--json=short",
            NAME,
            PATH,
            "org.freedesktop.DBus.Introspectable",
            "Introspect",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let live: Value = serde_json::from_slice(&o.stdout).unwrap();
    let live = live["data"][0].as_str().unwrap().to_string();
    let shipped =
        fs::read_to_string(workspace_root().join("systemd/org.dpsagent.Agent1.xml")).unwrap();
    let iface_of = |xml: &str| {
        let start = xml
            .find("<interface name=\"org.dpsagent.Agent1\">")
            .expect("interface in XML");
        let end = xml[start..].find("</interface>").unwrap() + start;
        xml[start..end]
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("<!--"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        iface_of(&live),
        iface_of(&shipped),
        "systemd/org.dpsagent.Agent1.xml is out of date"
    );

    // A stranger may not renew: the bus policy refuses.
    for method in ["Renew", "Reprovision"] {
        let o = call_method(&bus.address, &nobody, method);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("org.freedesktop.DBus.Error.AccessDenied"), "{e}");
        assert!(
            e.contains("Rejected send message"),
            "the bus policy refuses: {e}"
        );
    }

    // An admin renews; a local app sees the change signals.
    let seen = listen(bus.address.clone());
    std::thread::sleep(Duration::from_millis(500));
    let before = daemon.status();
    let renewals = before["renewals"].as_u64().unwrap();
    let admin = as_user("nobody", "nogroup", &[admin_gid]);
    let o = busctl(&bus.address, &admin, &["call", NAME, PATH, IFACE, "Renew"]);
    assert!(o.status.success(), "{}", text(&o));
    daemon.wait_for("the renewal", Duration::from_secs(30), |d| {
        d.status()["renewals"].as_u64().unwrap_or(0) > renewals
    });
    // The daemon owes a PropertiesChanged for each property whose value
    // changed: the thumbprint always does; NotAfter only when the two
    // certificates were not issued in the same second. State goes through
    // "renewing". Signals arrive in any order: wait for all (or 10 s).
    let after = daemon.status();
    let mut owed = vec!["State", "Thumbprint"];
    if after["not_after"] != before["not_after"] {
        owed.push("NotAfter");
    }
    assert_ne!(after["thumbprint"], before["thumbprint"]);
    let t0 = std::time::Instant::now();
    let all_seen = |seen: &[(String, String)]| {
        seen.iter().any(|(m, _)| m == "CertificateRenewed")
            && owed.iter().all(|p| {
                seen.iter()
                    .any(|(m, k)| m == "PropertiesChanged" && k.contains(p))
            })
    };
    while !all_seen(&seen.lock().unwrap()) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|(m, _)| m == "CertificateRenewed"),
        "no CertificateRenewed: {:?}",
        seen.lock().unwrap()
    );
    let seen = seen.lock().unwrap().clone();
    let s = daemon.status();
    let renewed = seen
        .iter()
        .find(|(m, _)| m == "CertificateRenewed")
        .unwrap();
    assert_eq!(
        renewed.1,
        format!(
            "{} {}",
            s["certificate_chain_path"].as_str().unwrap(),
            s["not_after"]
        )
    );
    let changed: Vec<&String> = seen
        .iter()
        .filter(|(m, _)| m == "PropertiesChanged")
        .map(|(_, k)| k)
        .collect();
    for p in &owed {
        assert!(
            changed.iter().any(|k| k.contains(p)),
            "no change of {p}: {seen:?}"
        );
    }

    // dps-agent status: from the daemon, then from the state directory.
    let from_daemon = daemon.status();
    assert_eq!(from_daemon["source"], "daemon");
    daemon.stop();
    let offline = daemon.status();
    assert_eq!(offline["source"], "state-dir");
    for k in [
        "state",
        "registration_id",
        "device_id",
        "assigned_hub",
        "certificate_chain_path",
        "key_uri",
        "not_before",
        "not_after",
        "renew_at",
        "thumbprint",
        "subject",
        "issuer",
        "renewals",
        "failures",
    ] {
        assert_eq!(from_daemon[k], offline[k], "{k}");
    }

    // A restarted daemon takes its name again; readers carry on.
    daemon.restart();
    daemon.wait_for("the name", Duration::from_secs(20), |d| {
        d.status()["source"] == "daemon"
    });
    let o = busctl(
        &bus.address,
        &nobody,
        &["get-property", NAME, PATH, IFACE, "DeviceId"],
    );
    assert_eq!(out(&o), "s \"gw-0001\"");
}

#[test]
fn the_daemon_checks_callers_itself() {
    require_root();
    let admin_gid = ensure_group("dps-agent-admin");
    let d = TestDir::new("dbus-own-check");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            ..Default::default()
        },
    );
    // A bus that lets everybody call everything: only the daemon's check stands.
    let bus = PrivateBus::permissive(&d.join("bus"));
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    setup.extra = format!("[dbus]\nbus = \"{}\"\n", bus.address);
    let cfg = setup.write(&d.join("config.toml"));
    let mut daemon = Daemon::start(&cfg, &setup.state_dir, &d.join("agent.log"));
    daemon.wait_for("provisioning", Duration::from_secs(30), |d| {
        d.status()["state"] == "provisioned"
    });
    let nobody = as_user("nobody", "nogroup", &[]);
    for method in ["Renew", "Reprovision"] {
        let o = call_method(&bus.address, &nobody, method);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("org.freedesktop.DBus.Error.AccessDenied"), "{e}");
        assert!(
            e.contains(&format!(
                "{method} is allowed to root and members of group dps-agent-admin; uid 65534"
            )),
            "{e}"
        );
    }
    assert!(
        daemon
            .log_text()
            .lines()
            .all(|l| !l.contains("requested over D-Bus")),
        "nothing was requested"
    );
    let admin = as_user("nobody", "nogroup", &[admin_gid]);
    let o = busctl(&bus.address, &admin, &["call", NAME, PATH, IFACE, "Renew"]);
    assert!(o.status.success(), "{}", text(&o));
    daemon.wait_for("the admin's renewal", Duration::from_secs(30), |d| {
        d.log_text()
            .contains("renewal requested over D-Bus by uid 65534")
    });
    daemon.stop();
}
