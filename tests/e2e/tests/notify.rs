//! The daemon's side of `Type=notify`: the test plays systemd, binding the
//! datagram socket named by $NOTIFY_SOCKET and setting $WATCHDOG_USEC, and
//! checks READY=1 (only once the daemon is up), STATUS= following the state,
//! WATCHDOG=1 at half the timeout, and STOPPING=1 on SIGTERM.

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use dps_agent_e2e::daemon::Daemon;
use dps_agent_e2e::{AgentSetup, Pki, Sim, SimOptions, TestDir};

/// The fake service manager's socket.
struct Manager {
    socket: UnixDatagram,
    /// Every datagram received so far, with its arrival time.
    got: Vec<(Instant, String)>,
}

impl Manager {
    fn bind(path: &std::path::Path) -> Manager {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Manager {
            socket,
            got: Vec::new(),
        }
    }

    /// Receives until `cond` holds for a datagram; returns it.
    fn wait_for(&mut self, what: &str, timeout: Duration, cond: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        let mut buf = vec![0u8; 4096];
        loop {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.got.push((Instant::now(), text.clone()));
                if cond(&text) {
                    return text;
                }
            }
            assert!(
                t0.elapsed() < timeout,
                "no {what} within {timeout:?}; received: {:?}",
                self.got.iter().map(|(_, t)| t).collect::<Vec<_>>()
            );
        }
    }
}

#[test]
fn tells_systemd_ready_status_watchdog_and_stopping() {
    let d = TestDir::new("notify");
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
    // No bus: the daemon is ready all the same, and says why D-Bus is missing.
    setup.extra = "[dbus]\nbus = \"unix:path=/nonexistent/dps-agent-test-bus\"\n".into();
    let cfg = setup.write(&d.join("config.toml"));
    let state = setup.state_dir.clone();
    let sock = d.join("notify.sock");
    let mut manager = Manager::bind(&sock);

    let mut daemon = Daemon::start_with_env(
        &cfg,
        &state,
        &d.join("agent.log"),
        &[
            ("NOTIFY_SOCKET", sock.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let pid = daemon.pid();

    let ready = manager.wait_for("READY=1", Duration::from_secs(20), |t| {
        t.lines().any(|l| l == "READY=1")
    });
    // By READY the pid file is written (so `dps-agent renew` finds the daemon).
    assert_eq!(
        fs::read_to_string(state.join("dps-agent.pid"))
            .unwrap()
            .trim(),
        pid.to_string()
    );
    let status = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .expect("READY comes with a STATUS");
    assert!(status.ends_with("; D-Bus unavailable"), "{status}");
    assert!(
        manager
            .got
            .iter()
            .all(|(_, t)| !t.contains("READY=1") || *t == ready),
        "READY=1 is the first notification"
    );

    // STATUS follows the state: provisioned, with the certificate's dates.
    let provisioned = manager.wait_for("STATUS=provisioned", Duration::from_secs(30), |t| {
        t.starts_with("STATUS=provisioned: device ")
    });
    let id: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(state.join("identity.json")).unwrap()).unwrap();
    let until = dps_agent::clock::rfc3339(id["not_after"].as_i64().unwrap());
    assert!(
        provisioned.contains(&format!("certificate valid until {until}; next renewal ")),
        "{provisioned}"
    );
    assert!(
        !provisioned.contains('\n'),
        "one assignment: {provisioned:?}"
    );

    // WATCHDOG=1 every WATCHDOG_USEC/2 = 200 ms.
    let start = manager.got.len();
    for _ in 0..5 {
        manager.wait_for("WATCHDOG=1", Duration::from_secs(3), |t| t == "WATCHDOG=1");
    }
    let pings: Vec<Instant> = manager.got[start..]
        .iter()
        .filter(|(_, t)| t == "WATCHDOG=1")
        .map(|(at, _)| *at)
        .collect();
    let span = *pings.last().unwrap() - pings[0];
    let per = span / (pings.len() as u32 - 1);
    assert!(
        (Duration::from_millis(120)..Duration::from_millis(350)).contains(&per),
        "a ping every ~200 ms, got every {per:?}"
    );

    // SIGTERM: STOPPING=1, then the process exits.
    daemon.stop();
    manager.wait_for("STOPPING=1", Duration::from_secs(5), |t| {
        t.lines().any(|l| l == "STOPPING=1")
    });
}

#[test]
fn without_notify_socket_nothing_is_sent_and_the_daemon_runs() {
    // The daemon started by hand (no $NOTIFY_SOCKET, a stale WATCHDOG_USEC
    // for another process): no errors, no pings.
    let d = TestDir::new("notify-none");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(&d.join("sim"), &pki, &SimOptions::default());
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    setup.extra = "[dbus]\nbus = \"unix:path=/nonexistent/dps-agent-test-bus\"\n".into();
    let cfg = setup.write(&d.join("config.toml"));
    let mut daemon = Daemon::start_with_env(
        &cfg,
        &setup.state_dir,
        &d.join("agent.log"),
        &[("WATCHDOG_USEC", "1000"), ("WATCHDOG_PID", "1")],
    );
    daemon.wait_for("provisioning", Duration::from_secs(30), |d| {
        d.status()["state"] == "provisioned"
    });
    daemon.stop();
    let log = daemon.log_text();
    assert!(!log.contains("watchdog"), "{log}");
    assert!(!log.contains("NOTIFY_SOCKET"), "{log}");
}
