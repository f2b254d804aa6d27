//! The daemon's journal entries, read back from a real `systemd-journald`.
//!
//! journald's socket path is fixed (`/run/systemd/journal/socket`), so the
//! test gives journald and the daemon their own mount namespace: `unshare -m`
//! with a tmpfs on /run and a scratch directory on /var/log, journald started
//! inside it, the daemon and `journalctl` entered into it with `nsenter`. The
//! host's journal is never touched. Needs root (CAP_SYS_ADMIN), as `make test`
//! runs; set DPS_AGENT_SKIP_NAMESPACE_TESTS=1 where namespaces are not allowed
//! (the field encoding is then covered only by the unit tests of
//! `logging::event`).
//!
//! The daemon finds the journal the way it does under systemd: its stderr is
//! the stream named by $JOURNAL_STREAM.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dps_agent::logging::Event;
use dps_agent_e2e::daemon::Daemon;
use dps_agent_e2e::{AgentSetup, Pki, Sim, SimOptions, TestDir, REG_ID};
use serde_json::Value;

/// journald in a private mount namespace; stopped (and the namespace gone) on drop.
struct PrivateJournal {
    child: Child,
    pid: u32,
}

impl PrivateJournal {
    fn start(dir: &Path) -> PrivateJournal {
        let var_log = dir.join("var-log");
        fs::create_dir_all(&var_log).expect("scratch /var/log");
        let script = format!(
            "mount -t tmpfs -o mode=0755 tmpfs /run && mkdir -p /run/systemd/journal && \
             mount --bind {} /var/log && exec {}",
            var_log.display(),
            journald_binary().display()
        );
        let log = fs::File::create(dir.join("journald.log")).expect("journald log");
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdout(Stdio::from(log.try_clone().expect("log fd")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("run unshare (util-linux)");
        let mut j = PrivateJournal {
            pid: child.id(),
            child,
        };
        let t0 = Instant::now();
        loop {
            if j.run(&["test", "-S", "/run/systemd/journal/socket"])
                .status
                .success()
            {
                return j;
            }
            if let Ok(Some(status)) = j.child.try_wait() {
                panic!(
                    "unshare + systemd-journald exited ({status}): {}\n\
                     This test needs root with CAP_SYS_ADMIN (make test runs as root); \
                     set DPS_AGENT_SKIP_NAMESPACE_TESTS=1 to skip it where namespaces are not allowed.",
                    fs::read_to_string(dir.join("journald.log")).unwrap_or_default()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "journald did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `nsenter` arguments that enter the namespace.
    fn prefix(&self) -> Vec<String> {
        ["nsenter", "-t", &self.pid.to_string(), "-m", "--"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-m", "--"])
            .args(args)
            .output()
            .expect("run nsenter")
    }

    /// Every entry the agent logged, as `journalctl -o json` objects.
    fn agent_entries(&self) -> Vec<Value> {
        let o = self.run(&[
            "journalctl",
            "-D",
            "/run/log/journal",
            "--no-pager",
            "-o",
            "json",
            "SYSLOG_IDENTIFIER=dps-agent",
        ]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn events(&self, event: Event) -> Vec<Value> {
        self.agent_entries()
            .into_iter()
            .filter(|e| e["MESSAGE_ID"] == event.message_id())
            .collect()
    }

    /// Waits until there are at least `n` entries of `event`.
    fn wait_for(&self, event: Event, n: usize, timeout: Duration, daemon: &Daemon) -> Vec<Value> {
        let t0 = Instant::now();
        loop {
            let found = self.events(event);
            if found.len() >= n {
                return found;
            }
            assert!(
                t0.elapsed() < timeout,
                "timed out waiting for {n} {event:?} entries; the agent's entries:\n{}\nstderr:\n{}",
                self.agent_entries()
                    .iter()
                    .map(|e| format!("{} {}", e["PRIORITY"], e["MESSAGE"]))
                    .collect::<Vec<_>>()
                    .join("\n"),
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for PrivateJournal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn journald_binary() -> PathBuf {
    [
        "/lib/systemd/systemd-journald",
        "/usr/lib/systemd/systemd-journald",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("systemd-journald (Debian package systemd; make deps installs it)")
}

fn skipped() -> bool {
    if std::env::var_os("DPS_AGENT_SKIP_NAMESPACE_TESTS").is_some() {
        eprintln!("skipped: DPS_AGENT_SKIP_NAMESPACE_TESTS is set");
        return true;
    }
    false
}

fn identity(state: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(state.join("identity.json")).expect("identity.json"))
        .expect("identity.json is JSON")
}

fn rfc3339(t: i64) -> String {
    dps_agent::clock::rfc3339(t)
}

/// The entry's identity fields match `identity.json`.
fn assert_fields_match(entry: &Value, id: &Value) {
    assert_eq!(entry["DPS_REGISTRATION_ID"], REG_ID, "{entry}");
    assert_eq!(entry["DPS_DEVICE_ID"], id["device_id"], "{entry}");
    assert_eq!(entry["DPS_ASSIGNED_HUB"], id["assigned_hub"], "{entry}");
    assert_eq!(entry["CERT_THUMBPRINT"], id["thumbprint"], "{entry}");
    assert_eq!(
        entry["CERT_NOT_AFTER"].as_str(),
        Some(rfc3339(id["not_after"].as_i64().unwrap()).as_str()),
        "{entry}"
    );
}

fn no_secrets(entries: &[Value], key_file: &Path) {
    let key_pem = fs::read_to_string(key_file).unwrap_or_default();
    let key_body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for e in entries {
        let text = e.to_string();
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        assert!(
            key_body.len() < 20 || !text.contains(&key_body[..20]),
            "{text}"
        );
    }
}

#[test]
fn lifecycle_events_are_structured_journal_entries() {
    if skipped() {
        return;
    }
    let d = TestDir::new("journald");
    let journal = PrivateJournal::start(&d.path);
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            ..Default::default()
        },
    );
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    setup.extra = "[dbus]\nbus = \"unix:path=/nonexistent/dps-agent-test-bus\"\n".into();
    let cfg = setup.write(&d.join("config.toml"));
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .replace("[operational]\n", "[operational]\nretry_max = \"2s\"\n");
    fs::write(&cfg, text).unwrap();
    let state = setup.state_dir.clone();

    // As under systemd: stderr is the journal stream named by $JOURNAL_STREAM.
    let log = d.join("agent.log");
    fs::write(&log, "").unwrap();
    let meta = fs::metadata(&log).unwrap();
    let mut prefix = journal.prefix();
    prefix.extend([
        "env".to_string(),
        format!("JOURNAL_STREAM={}:{}", meta.dev(), meta.ino()),
    ]);
    let mut daemon = Daemon::start_as(&cfg, &state, &log, prefix);

    // Provisioned.
    let provisioned = journal.wait_for(Event::Provisioned, 1, Duration::from_secs(30), &daemon);
    let e = &provisioned[0];
    let id = identity(&state);
    assert_fields_match(e, &id);
    assert_eq!(e["PRIORITY"], "5", "info is notice in the journal: {e}");
    assert_eq!(e["DPS_AGENT_EVENT"], "provisioned");
    assert_eq!(e["SYSLOG_IDENTIFIER"], "dps-agent");
    assert!(
        e["CODE_FILE"]
            .as_str()
            .unwrap_or_default()
            .ends_with("lifecycle/mod.rs"),
        "{e}"
    );
    assert!(e["CODE_LINE"].as_str().is_some(), "{e}");
    let next = e["NEXT_RENEWAL"].as_str().expect("NEXT_RENEWAL");
    assert!(
        next < e["CERT_NOT_AFTER"].as_str().unwrap(),
        "renewal before expiry: {e}"
    );
    assert!(
        e["MESSAGE"]
            .as_str()
            .unwrap()
            .starts_with("provisioned: device "),
        "{e}"
    );
    // Plain log lines are journal entries too (no MESSAGE_ID).
    assert!(journal
        .agent_entries()
        .iter()
        .any(|x| x["MESSAGE_ID"].is_null()
            && x["MESSAGE"].as_str().unwrap_or("").contains("started")));
    // Nothing went to stderr.
    assert_eq!(daemon.log_text(), "", "stderr stays empty with the journal");

    // Renewed (asked for with SIGHUP).
    daemon.hup();
    let renewed = journal.wait_for(Event::Renewed, 1, Duration::from_secs(30), &daemon);
    let e = &renewed[0];
    let id2 = identity(&state);
    assert_fields_match(e, &id2);
    assert_ne!(e["CERT_THUMBPRINT"], provisioned[0]["CERT_THUMBPRINT"]);
    assert_eq!(e["PRIORITY"], "5");

    // Renewal failed: the current identity's fields, and when the next attempt is.
    sim.set_faults(&["wrong-key-cert"]);
    daemon.hup();
    let failed = journal.wait_for(Event::RenewalFailed, 1, Duration::from_secs(30), &daemon);
    let e = &failed[0];
    assert_fields_match(e, &id2);
    assert_eq!(e["PRIORITY"], "3", "{e}");
    assert_eq!(e["DPS_AGENT_EVENT"], "renewal-failed");
    assert!(e["NEXT_RENEWAL"].as_str().is_some(), "{e}");
    assert!(
        e["MESSAGE"]
            .as_str()
            .unwrap()
            .contains("the current identity stays in use"),
        "{e}"
    );

    // Identity expired: a 30 s certificate, then every renewal fails.
    sim.set_faults(&["short-lived"]);
    daemon.hup();
    let renewed = journal.wait_for(Event::Renewed, 2, Duration::from_secs(30), &daemon);
    let short = identity(&state);
    assert_fields_match(renewed.last().unwrap(), &short);
    sim.set_faults(&["wrong-key-cert"]);
    let not_after = short["not_after"].as_i64().unwrap();
    let expired = journal.wait_for(Event::IdentityExpired, 1, Duration::from_secs(60), &daemon);
    let e = &expired[0];
    assert_fields_match(e, &short);
    assert_eq!(e["PRIORITY"], "3", "{e}");
    assert_eq!(e["DPS_AGENT_EVENT"], "identity-expired");
    let logged_at: i64 = e["__REALTIME_TIMESTAMP"]
        .as_str()
        .and_then(|t| t.parse::<i64>().ok())
        .map(|us| us / 1_000_000)
        .expect("__REALTIME_TIMESTAMP");
    assert!(
        (not_after..not_after + 5).contains(&logged_at),
        "noticed within seconds of notAfter {not_after}: logged at {logged_at}"
    );
    // The status says so too (between attempts; during one it says "provisioning").
    daemon.wait_for("state expired", Duration::from_secs(10), |d| {
        d.status()["state"] == "expired"
    });

    // Logged once, however many attempts fail afterwards (failures retry at
    // the 2 s cap; the schedule's floor may delay the first attempt after
    // expiry, so the wait allows for it).
    let failures_before = journal.events(Event::RenewalFailed).len()
        + journal.events(Event::ProvisioningFailed).len();
    let t0 = Instant::now();
    while journal.events(Event::RenewalFailed).len()
        + journal.events(Event::ProvisioningFailed).len()
        < failures_before + 2
    {
        assert!(
            t0.elapsed() < Duration::from_secs(75),
            "no further attempts; journal:\n{}",
            journal
                .agent_entries()
                .iter()
                .map(|e| format!("{} {}", e["__REALTIME_TIMESTAMP"], e["MESSAGE"]))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(journal.events(Event::IdentityExpired).len(), 1);

    // Faults off: the device gets a new identity (provisioned again, as the
    // old one is no longer usable).
    sim.set_faults(&[]);
    let again = journal.wait_for(Event::Provisioned, 2, Duration::from_secs(30), &daemon);
    assert_fields_match(again.last().unwrap(), &identity(&state));

    daemon.stop();
    let all = journal.agent_entries();
    no_secrets(&all, &pki.device_key());
    for e in &all {
        if let Some(id) = e["MESSAGE_ID"].as_str() {
            assert!(
                Event::ALL.iter().any(|ev| ev.message_id() == id),
                "unknown MESSAGE_ID {id}"
            );
        }
    }
}
