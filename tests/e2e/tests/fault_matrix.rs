//! The fault matrix: one renewal per DPS misbehaviour, each against its own simulator,
//! private D-Bus and state directory (the cases run in parallel). Every case checks what an
//! operator would look at:
//!
//! - a clear log line in the daemon's log,
//! - D-Bus `LastError` (read with busctl from a private permissive bus),
//! - the previous identity kept: identity.json byte for byte, one key file,
//! - a sane retry schedule from the simulator's events file: DPS's retry-after honoured, waits
//!   within the backoff rules, and the attempt rate extrapolated to an hour.
//!
//! Transient faults (throttle, server error, a dropped connection, slow assignment) end in a
//! renewal within the same attempt; their cases check the waits inside it. The others fail
//! the attempt; with `retry_max = "3s"` the daemon then retries every 1.5–3 s (a failure that
//! needs a human waits between half the cap and the cap), which at the default cap of 1 h is
//! at most 2 attempts an hour.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dps_agent_e2e::daemon::Daemon;
use dps_agent_e2e::dbus::{busctl, PrivateBus};
use dps_agent_e2e::*;
use serde_json::Value;

/// `retry-after` of the simulator's 202 and 429 answers.
const RETRY_AFTER: f64 = 2.0;
/// `[operational] retry_max`.
const CAP: f64 = 3.0;
/// Slack for process start-up, key generation, TLS handshakes and a busy 2-core machine.
const SLACK: f64 = 1.0;

struct Rig {
    _d: TestDir,
    sim: Sim,
    bus: PrivateBus,
    daemon: Daemon,
    state: PathBuf,
}

impl Rig {
    /// A provisioned daemon on its own bus, simulator and state directory.
    fn new(name: &str) -> Rig {
        let d = TestDir::new(&format!("matrix-{name}"));
        let pki = Pki::generate(&d.join("pki"));
        let sim = Sim::start(
            &d.join("sim"),
            &pki,
            &SimOptions {
                retry_after: Some(RETRY_AFTER as u32),
                polls_before_assign: Some(0),
                ..Default::default()
            },
        );
        let bus = PrivateBus::permissive(&d.join("bus"));
        let mut setup = AgentSetup::for_sim(&d.path, &sim);
        setup.extra = format!("[dbus]\nbus = \"{}\"\n", bus.address);
        let text = setup
            .toml()
            .replace("[operational]\n", "[operational]\nretry_max = \"3s\"\n");
        let cfg = d.join("config.toml");
        fs::write(&cfg, text).unwrap();
        let mut daemon = Daemon::start(&cfg, &setup.state_dir, &d.join("agent.log"));
        daemon.wait_for("provisioning", Duration::from_secs(60), |d| {
            d.status()["state"] == "provisioned"
        });
        Rig {
            state: setup.state_dir.clone(),
            _d: d,
            sim,
            bus,
            daemon,
        }
    }

    /// Switches `faults` on and asks for a renewal; returns what must be kept, and the number
    /// of events before (the case looks at the ones after).
    fn inject(&mut self, faults: &[&str]) -> (Vec<u8>, usize, u64) {
        let before = fs::read(self.state.join("identity.json")).unwrap();
        let renewals = self.daemon.status()["renewals"].as_u64().unwrap();
        let mark = self.sim.events().len();
        self.sim.set_faults(faults);
        self.daemon.hup();
        (before, mark, renewals)
    }

    fn events_since(&self, mark: usize) -> Vec<Value> {
        self.sim.events().split_off(mark)
    }

    fn last_error(&self) -> String {
        let o = busctl(
            &self.bus.address,
            &[],
            &[
                "--json=short",
                "get-property",
                "org.dpsagent.Agent",
                "/org/dpsagent/Agent",
                "org.dpsagent.Agent1",
                "LastError",
            ],
        );
        assert!(o.status.success(), "busctl: {}", text(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["data"].as_str().unwrap_or_default().to_string()
    }

    fn key_files(&self) -> Vec<String> {
        key_files(&self.state)
    }

    fn wait_failures(&mut self, n: u64, what: &str) {
        self.daemon.wait_for(what, Duration::from_secs(60), |d| {
            d.status()["failures"].as_u64().unwrap_or(0) >= n
        });
    }

    /// Until a renewal is committed and the old key deleted (which follows the commit by a
    /// moment).
    fn wait_renewed(&mut self, renewals: u64, what: &str) {
        self.daemon.wait_for(what, Duration::from_secs(60), |d| {
            let s = d.status();
            s["state"] == "provisioned"
                && s["renewals"].as_u64().unwrap_or(0) > renewals
                && key_files(&d.state_dir).len() == 1
        });
    }
}

fn key_files(state: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(state.join("keys"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn t(e: &Value) -> f64 {
    e["t"].as_f64().unwrap()
}

fn registers(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["event"] == "request" && e["kind"] == "register")
        .collect()
}

/// Each request with the response that answered it (the next response on its connection).
fn exchanges(events: &[Value]) -> Vec<(&Value, Option<&Value>)> {
    events
        .iter()
        .enumerate()
        .filter(|(_, e)| e["event"] == "request")
        .map(|(i, req)| {
            let resp = events[i + 1..]
                .iter()
                .find(|e| e["event"] == "response" && e["conn"] == req["conn"]);
            (req, resp)
        })
        .collect()
}

/// The waits of the device between an answer and its next request, with the answer.
fn waits(events: &[Value]) -> Vec<(f64, &Value)> {
    let ex = exchanges(events);
    ex.windows(2)
        .filter_map(|w| w[0].1.map(|resp| (t(w[1].0) - t(resp), resp)))
        .collect()
}

/// Attempts per hour, extrapolated from the start times of attempts.
fn per_hour(starts: &[f64]) -> f64 {
    let span = starts.last().unwrap() - starts.first().unwrap();
    (starts.len() - 1) as f64 * 3600.0 / span
}

/// The checks of a failure that keeps the identity: every part of `message` in the log line, in
/// `LastError` and in the status; identity.json unchanged, one key; at least three attempts,
/// each starting (`start` of the attempt's first event) 1.5–3 s (+ slack) after the previous
/// attempt's last event; the rate within the cap's rule. Returns the summary line.
fn failure_case(
    name: &str,
    faults: &[&str],
    message: &[&str],
    attempt_starts: fn(&[Value]) -> Vec<(f64, f64)>,
) -> String {
    let mut rig = Rig::new(name);
    let (before, mark, _) = rig.inject(faults);
    rig.wait_failures(3, &format!("{name}: three failed attempts"));
    let log = rig.daemon.log_text();
    let line = log
        .lines()
        .find(|l| {
            l.starts_with("<3>")
                && l.contains("renewal failed")
                && message.iter().all(|m| l.contains(m))
                && l.contains("the current identity stays in use")
                && l.contains("next attempt at")
        })
        .unwrap_or_else(|| panic!("{name}: no clear error line with {message:?}:\n{log}"))
        .to_string();
    let last_error = rig.last_error();
    assert!(
        message.iter().all(|m| last_error.contains(m)),
        "{name}: D-Bus LastError {last_error:?} lacks {message:?}"
    );
    let s = rig.daemon.status();
    assert_eq!(s["state"], "failed", "{name}: {s}");
    assert_eq!(s["last_error"].as_str(), Some(last_error.as_str()), "{s}");
    assert_eq!(
        fs::read(rig.state.join("identity.json")).unwrap(),
        before,
        "{name}: the identity is kept byte for byte"
    );
    assert_eq!(rig.key_files().len(), 1, "{name}: {:?}", rig.key_files());

    let events = rig.events_since(mark);
    let attempts = attempt_starts(&events);
    assert!(attempts.len() >= 3, "{name}: {attempts:?}\n{events:#?}");
    let gaps: Vec<f64> = attempts.windows(2).map(|w| w[1].0 - w[0].1).collect();
    for g in &gaps {
        assert!(
            (CAP / 2.0 - 0.05..=CAP + SLACK).contains(g),
            "{name}: retry after {g:.2}s, outside [cap/2, cap] = [1.5, 3] s: {gaps:?}"
        );
    }
    let starts: Vec<f64> = attempts.iter().map(|a| a.0).collect();
    let rate = per_hour(&starts);
    assert!(
        rate <= 3600.0 / (CAP / 2.0) * 1.05,
        "{name}: {rate:.0} attempts/h, more than the cap allows"
    );
    rig.daemon.stop();
    let summary = format!(
        "{name}: LastError {last_error:?}; {} attempts, gaps {:?} s, {rate:.0}/h at retry_max 3s (≤ 2/h at 1h)",
        attempts.len(),
        gaps.iter()
            .map(|g| (g * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
    eprintln!("{summary}\n  log: {line}");
    summary
}

/// An attempt is a register request and the answers that follow it (until the next register).
fn register_attempts(events: &[Value]) -> Vec<(f64, f64)> {
    let regs: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e["event"] == "request" && e["kind"] == "register")
        .map(|(i, _)| i)
        .collect();
    regs.iter()
        .enumerate()
        .map(|(k, &i)| {
            let end = regs.get(k + 1).copied().unwrap_or(events.len());
            let last = events[i..end]
                .iter()
                .rfind(|e| e["event"] == "response")
                .map(t)
                .unwrap_or(t(&events[i]));
            (t(&events[i]), last)
        })
        .collect()
}

/// An attempt is a TLS connection the client gave up on (no request ever arrives).
fn tls_attempts(events: &[Value]) -> Vec<(f64, f64)> {
    events
        .iter()
        .filter(|e| e["event"] == "tls_error")
        .map(|e| (t(e), t(e)))
        .collect()
}

// --- Transient: the renewal succeeds within the attempt ----------------------------------

/// The common end of a transient case: renewed, no error left, one key.
fn renewed(rig: &mut Rig, renewals: u64, name: &str) {
    rig.wait_renewed(renewals, &format!("{name}: the renewal"));
    assert_eq!(
        rig.last_error(),
        "",
        "{name}: LastError is empty after a success"
    );
    assert_eq!(rig.daemon.status()["failures"], 0);
    assert_eq!(rig.key_files().len(), 1, "{name}: {:?}", rig.key_files());
}

#[test]
fn throttle_honours_retry_after_and_renews() {
    let mut rig = Rig::new("throttle");
    let (_, mark, renewals) = rig.inject(&["throttle"]);
    renewed(&mut rig, renewals, "throttle");
    let events = rig.events_since(mark);
    let w = waits(&events);
    let throttled: Vec<&(f64, &Value)> = w.iter().filter(|(_, r)| r["status"] == 429).collect();
    // The register and the first poll are throttled; each retry waits retry-after exactly.
    assert_eq!(throttled.len(), 2, "{w:?}");
    for (gap, r) in w.iter().filter(|(_, r)| r["retry_after"].is_number()) {
        let ra = r["retry_after"].as_f64().unwrap();
        assert!(
            (ra - 0.05..ra + SLACK).contains(gap),
            "waited {gap:.2}s after retry-after={ra}: {r}"
        );
    }
    assert_eq!(registers(&events).len(), 2, "one retry of the register");
    let log = rig.daemon.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("status 429, error 429001") && l.contains("retrying in 2s")),
        "{log}"
    );
}

#[test]
fn server_error_is_retried_with_backoff_and_renews() {
    let mut rig = Rig::new("server-error");
    let (_, mark, renewals) = rig.inject(&["server-error"]);
    renewed(&mut rig, renewals, "server-error");
    let events = rig.events_since(mark);
    let w = waits(&events);
    let after_500: Vec<f64> = w
        .iter()
        .filter(|(_, r)| r["status"] == 500)
        .map(|(g, _)| *g)
        .collect();
    // No retry-after: the first backoff step, 0.1–1 s (full jitter, floor of a tenth).
    assert_eq!(after_500.len(), 1, "{w:?}");
    assert!(
        (0.1 - 0.05..1.0 + SLACK).contains(&after_500[0]),
        "{after_500:?}"
    );
    assert_eq!(registers(&events).len(), 2);
    let log = rig.daemon.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("status 500, error 500001") && l.contains("retrying in")),
        "{log}"
    );
}

#[test]
fn connection_dropped_after_register_reconnects_and_renews() {
    let mut rig = Rig::new("drop");
    let (_, mark, renewals) = rig.inject(&["drop-after-register"]);
    renewed(&mut rig, renewals, "drop-after-register");
    let events = rig.events_since(mark);
    let regs = registers(&events);
    assert_eq!(regs.len(), 2, "{events:#?}");
    assert_ne!(regs[0]["conn"], regs[1]["conn"], "a new connection");
    let dropped = events
        .iter()
        .find(|e| e["event"] == "response" && e["status"].is_null())
        .expect("the dropped answer");
    // Reconnect after the first backoff step (0.1–1 s) plus a TLS handshake.
    let gap = t(regs[1]) - t(dropped);
    assert!((0.1 - 0.05..1.0 + SLACK).contains(&gap), "{gap}");
    let log = rig.daemon.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("the connection to DPS broke") && l.contains("retrying in")),
        "{log}"
    );
}

#[test]
fn slow_assignment_is_polled_at_retry_after_and_renews() {
    let mut rig = Rig::new("slow-assign");
    let (_, mark, renewals) = rig.inject(&["slow-assign"]);
    renewed(&mut rig, renewals, "slow-assign");
    let events = rig.events_since(mark);
    let polls: Vec<f64> = events
        .iter()
        .filter(|e| e["event"] == "request" && e["kind"] == "poll")
        .map(t)
        .collect();
    assert_eq!(polls.len(), 4, "3 × assigning, then assigned");
    for (gap, r) in waits(&events) {
        assert_eq!(r["status"], 202, "{r}");
        assert!(
            (RETRY_AFTER - 0.05..RETRY_AFTER + SLACK).contains(&gap),
            "{gap}"
        );
    }
    // DPS allows 5 polls in 10 s.
    for w in polls.windows(2) {
        assert!(w[1] - w[0] >= 10.0 / 5.0 - 0.05, "{polls:?}");
    }
}

// --- Failures that keep the identity ----------------------------------------------------

#[test]
fn status_failed_keeps_the_identity() {
    failure_case(
        "status-failed",
        &["status-failed"],
        &["DPS refused the registration (status \"failed\", error 400207)"],
        register_attempts,
    );
}

#[test]
fn disabled_enrollment_keeps_the_identity() {
    failure_case(
        "status-disabled",
        &["status-disabled"],
        &["the enrollment is disabled"],
        register_attempts,
    );
}

#[test]
fn malformed_json_keeps_the_identity() {
    failure_case(
        "malformed-json",
        &["malformed-json"],
        &["DPS sent a reply the agent cannot use: the reply is not JSON"],
        register_attempts,
    );
}

#[test]
fn wrong_key_certificate_keeps_the_identity() {
    failure_case(
        "wrong-key-cert",
        &["wrong-key-cert"],
        &["it was issued for a different key"],
        register_attempts,
    );
}

#[test]
fn foreign_chain_keeps_the_identity() {
    failure_case(
        "foreign-chain",
        &["foreign-chain"],
        &["not to the expected issuer (certificate CN=dps-sim ADR Credential Root): a foreign CA issued it"],
        register_attempts,
    );
}

#[test]
fn expired_certificate_keeps_the_identity() {
    failure_case(
        "expired-cert",
        &["expired-cert"],
        &["certificate CN=gw-0001 expired at"],
        register_attempts,
    );
}

#[test]
fn truncated_chain_keeps_the_identity() {
    failure_case(
        "truncated-chain",
        &["truncated-chain"],
        &["the chain is truncated"],
        register_attempts,
    );
}

#[test]
fn oversize_response_keeps_the_identity() {
    failure_case(
        "oversize-response",
        &["oversize-response"],
        &["larger than 128 KiB"],
        register_attempts,
    );
}

#[test]
fn csr_rejected_keeps_the_identity() {
    failure_case(
        "csr-reject",
        &["csr-reject"],
        &["status 400, error 400040: The certificate signing request is not valid"],
        register_attempts,
    );
}

#[test]
fn server_certificate_for_another_host_keeps_the_identity() {
    failure_case(
        "mitm",
        &["mitm"],
        &["is not trusted", "wrong-host.example.net"],
        tls_attempts,
    );
}

#[test]
fn huge_retry_after_is_honoured_and_keeps_the_identity() {
    let mut rig = Rig::new("retry-after-large");
    let t0 = unix_now();
    let (before, mark, _) = rig.inject(&["retry-after-large"]);
    rig.wait_failures(1, "retry-after-large: the throttled attempt");
    let s = rig.daemon.status();
    let next = s["next_attempt"].as_i64().unwrap();
    assert!(
        (next - t0 - 7200).abs() <= 30,
        "the next attempt in 7200 s, as DPS asked: {s}"
    );
    let last_error = rig.last_error();
    assert!(
        last_error.contains("status 429, error 429001"),
        "{last_error}"
    );
    let log = rig.daemon.log_text();
    assert!(
        log.lines().any(|l| l.starts_with("<3>")
            && l.contains("status 429, error 429001")
            && l.contains("the current identity stays in use")
            && l.contains("(in 7200s)")),
        "{log}"
    );
    // Longer than the cap: nothing more is sent.
    std::thread::sleep(Duration::from_secs_f64(CAP + SLACK));
    let events = rig.events_since(mark);
    let regs = registers(&events);
    assert_eq!(regs.len(), 1, "no retry before retry-after: {regs:?}");
    let answer = events
        .iter()
        .find(|e| e["event"] == "response")
        .expect("the 429");
    assert_eq!(answer["retry_after"], 7200);
    assert_eq!(
        fs::read(rig.state.join("identity.json")).unwrap(),
        before,
        "the identity is kept"
    );
    assert_eq!(rig.key_files().len(), 1, "{:?}", rig.key_files());
    eprintln!("retry-after-large: LastError {last_error:?}; 1 attempt, next in 7200 s (0.5/h)");
    rig.daemon.stop();
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
