//! Benchmarks that print figures (never pass/fail on timing):
//!   dps-bench provision [N]     time to an assignment, dps-agent (`run --once`) versus
//!                               Microsoft's Python SDK (azure-iot-device 2.14.0), N runs each
//!                               against one dps-sim (retry-after 0) in a private network
//!                               namespace (the SDK's port 8883 is fixed); and dps-agent's own
//!                               overhead (its run minus the simulator's time in the events file)
//!   dps-bench size              size of the dps-agent binary, as built and stripped
//!   dps-bench dbus [N]          D-Bus property reads per second and latency percentiles
//!   dps-bench idle [SECS] [BACKEND...]
//!                               idle daemon RSS and CPU time over SECS per key backend
//!   dps-bench all               all of them (provision 20, size, idle 60 for each backend, dbus 5000)
//! Each run sets up its own simulator, private bus, swtpm or SoftHSM2 under
//! target/e2e/ (see e2e_root), as the test suites do. `make bench` runs `all` with release binaries
//! (DPS_AGENT_BIN, DPS_SIM_BIN).

use std::fs;
use std::time::{Duration, Instant};

use dps_agent_e2e::daemon::Daemon;
use dps_agent_e2e::dbus::PrivateBus;
use dps_agent_e2e::softhsm::SoftHsm;
use dps_agent_e2e::swtpm::Swtpm;
use dps_agent_e2e::*;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("dbus") => dbus(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(5000)),
        Some("provision") => provision(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(20)),
        Some("size") => size(),
        Some("all") => {
            provision(20);
            println!();
            size();
            println!();
            idle(60, &["file".into(), "tpm".into(), "pkcs11".into()]);
            println!();
            dbus(5000);
        }
        Some("idle") => {
            let secs = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(60);
            let backends: Vec<String> = if args.len() > 2 {
                args[2..].to_vec()
            } else {
                vec!["file".into(), "tpm".into(), "pkcs11".into()]
            };
            idle(secs, &backends)
        }
        _ => {
            eprintln!("usage: dps-bench provision [N] | size | dbus [N] | idle [SECS] [file|tpm|pkcs11...] | all");
            std::process::exit(2);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A provisioned daemon on a private bus.
struct Setup {
    _d: TestDir,
    _sim: Sim,
    _tpm: Option<Swtpm>,
    _hsm: Option<SoftHsm>,
    bus: PrivateBus,
    daemon: Daemon,
}

fn setup(name: &str, backend: &str) -> Setup {
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
    let bus = PrivateBus::permissive(&d.join("bus"));
    let mut s = AgentSetup::for_sim(&d.path, &sim);
    s.key_backend = backend.into();
    let mut extra = format!("[dbus]\nbus = \"{}\"\n", bus.address);
    let mut env: Vec<(String, String)> = Vec::new();
    let tpm = (backend == "tpm").then(|| Swtpm::start(&d.join("swtpm")));
    if let Some(t) = &tpm {
        extra.push_str(&format!("[tpm]\ntcti = \"{}\"\n", t.tcti()));
    }
    let hsm = (backend == "pkcs11").then(|| SoftHsm::new(&d.join("softhsm"), "dps-agent"));
    if let Some(h) = &hsm {
        extra.push_str(&h.config_toml());
        let (k, v) = h.env();
        env.push((k.into(), v.display().to_string()));
    }
    s.extra = extra;
    let cfg = s.write(&d.join("config.toml"));
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut daemon = Daemon::start_with_env(&cfg, &s.state_dir, &d.join("agent.log"), &env_ref);
    daemon.wait_for("provisioning", Duration::from_secs(60), |d| {
        d.status()["state"] == "provisioned"
    });
    Setup {
        _d: d,
        _sim: sim,
        _tpm: tpm,
        _hsm: hsm,
        bus,
        daemon,
    }
}

fn dbus(n: usize) {
    let s = setup("bench-dbus", "file");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (lat, total) = rt.block_on(async {
        let conn = zbus::connection::Builder::address(s.bus.address.as_str())
            .build()
            .await
            .expect("connect");
        let props = zbus::fdo::PropertiesProxy::builder(&conn)
            .destination("org.dpsagent.Agent")
            .path("/org/dpsagent/Agent")
            .build()
            .await
            .expect("proxy");
        let iface =
            zbus::names::InterfaceName::from_static_str("org.dpsagent.Agent1").expect("name");
        // Warm up.
        for _ in 0..100 {
            props.get(iface.clone(), "State").await.expect("Get");
        }
        let mut lat = Vec::with_capacity(n);
        let t0 = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            props.get(iface.clone(), "NotAfter").await.expect("Get");
            lat.push(t.elapsed());
        }
        (lat, t0.elapsed())
    });
    let mut sorted = lat.clone();
    sorted.sort();
    println!("D-Bus property reads (org.freedesktop.DBus.Properties.Get NotAfter, one zbus client, sequential, private dbus-daemon):");
    println!("| reads | reads/s | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    println!(
        "| {n} | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs |",
        n as f64 / total.as_secs_f64(),
        percentile(&sorted, 0.50).as_secs_f64() * 1e6,
        percentile(&sorted, 0.99).as_secs_f64() * 1e6,
        sorted[sorted.len() - 1].as_secs_f64() * 1e6
    );
    drop(s.daemon);
}

/// (RSS in KiB, CPU time in clock ticks) of a process.
fn sample(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
    (rss, ticks(11) + ticks(12))
}

fn idle(secs: u64, backends: &[String]) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc_sysconf_clk_tck() } as f64;
    println!("Idle daemon after provisioning, over {secs} s (no renewal due):");
    println!("| key backend | VmRSS | CPU time over {secs} s |");
    println!("|---|---|---|");
    for b in backends {
        let s = setup(&format!("bench-idle-{b}"), b);
        std::thread::sleep(Duration::from_secs(2));
        let pid = s.daemon.pid();
        let (_, cpu0) = sample(pid);
        std::thread::sleep(Duration::from_secs(secs));
        let (rss, cpu1) = sample(pid);
        println!(
            "| {b} | {:.1} MiB | {:.0} ms |",
            rss as f64 / 1024.0,
            (cpu1 - cpu0) as f64 * 1000.0 / hz
        );
    }
}

extern "C" {
    fn sysconf(name: i32) -> i64;
}

/// Clock ticks per second (`_SC_CLK_TCK` is 2 on Linux).
unsafe fn libc_sysconf_clk_tck() -> i64 {
    sysconf(2)
}

/// Median of a sample (sorted copy).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// Seconds, printed with a unit that suits them.
fn secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1000.0)
    }
}

fn cell(v: &[f64]) -> String {
    let (lo, hi) = spread(v);
    format!("{} ({}–{})", secs(median(v)), secs(lo), secs(hi))
}

/// What the simulator saw of one client run (its events after `mark`).
struct SimView {
    /// register request → the final 200 `assigned` response.
    register_to_assigned: f64,
    /// Sum of (response − request) over the run's exchanges: the simulator's own time.
    in_simulator: f64,
    /// The simulator's time for the final answer (with a CSR: the issuance).
    final_answer: f64,
    /// From the answer to the register to the first poll: the client's own choice (the SDK
    /// waits 2 s whatever retry-after says).
    first_poll_wait: f64,
    requests: usize,
}

fn sim_view(events: &[serde_json::Value]) -> SimView {
    let t = |e: &serde_json::Value| e["t"].as_f64().unwrap_or(f64::NAN);
    let mut in_simulator = 0.0;
    let mut final_answer = 0.0;
    let mut requests = 0;
    let mut register = f64::NAN;
    let mut assigned = f64::NAN;
    let mut register_answered = f64::NAN;
    let mut first_poll = f64::NAN;
    for (i, e) in events.iter().enumerate() {
        if e["event"] != "request" {
            continue;
        }
        requests += 1;
        if e["kind"] == "register" && register.is_nan() {
            register = t(e);
        }
        if e["kind"] == "poll" && first_poll.is_nan() {
            first_poll = t(e);
        }
        if let Some(r) = events[i + 1..]
            .iter()
            .find(|r| r["event"] == "response" && r["conn"] == e["conn"])
        {
            in_simulator += t(r) - t(e);
            if e["kind"] == "register" && register_answered.is_nan() {
                register_answered = t(r);
            }
            if r["registration_status"] == "assigned" {
                assigned = t(r);
                final_answer = t(r) - t(e);
            }
        }
    }
    SimView {
        register_to_assigned: assigned - register,
        in_simulator,
        final_answer,
        first_poll_wait: first_poll - register_answered,
        requests,
    }
}

/// dps-agent `run --once` versus the Python SDK, both provisioning gw-0001 (X.509) against
/// one simulator at retry-after 0, in turns.
fn provision(runs: usize) {
    netns::require();
    let python = venv::python(&["azure.iot.device"]);
    let d = TestDir::new("bench-provision");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            wrapper: netns::private(),
            extra: vec!["--mqtt-port".into(), "8883".into()],
            ..Default::default()
        },
    );
    let mut agent_wall = Vec::new();
    let mut agent_reg = Vec::new();
    let mut agent_busy = Vec::new();
    let mut agent_overhead = Vec::new();
    let mut agent_issue = Vec::new();
    let mut agent_requests = 0;
    let mut sdk_wall = Vec::new();
    let mut sdk_call = Vec::new();
    let mut sdk_reg = Vec::new();
    let mut sdk_busy = Vec::new();
    let mut sdk_requests = 0;
    for i in 0..runs {
        // dps-agent: a fresh state directory each time, so every run provisions.
        let mut setup = AgentSetup::for_sim(&d.path, &sim);
        setup.endpoint = "localhost:8883".into();
        setup.state_dir = d.join(&format!("state-{i}"));
        let cfg = setup.write(&d.join(&format!("config-{i}.toml")));
        let mark = sim.events().len();
        let t0 = Instant::now();
        let o = run(netns::command(sim.pid(), &bin("dps-agent"))
            .arg("--config")
            .arg(&cfg)
            .args(["run", "--once"]));
        let wall = t0.elapsed().as_secs_f64();
        assert!(o.status.success(), "dps-agent run --once: {}", text(&o));
        assert!(setup.state_dir.join("operational-chain.pem").exists());
        let v = sim_view(&sim.events()[mark..]);
        agent_wall.push(wall);
        agent_reg.push(v.register_to_assigned);
        agent_busy.push(v.register_to_assigned - v.first_poll_wait);
        agent_overhead.push(wall - v.in_simulator);
        agent_issue.push(v.final_answer);
        agent_requests = v.requests;

        // The SDK, same enrollment.
        let mark = sim.events().len();
        let t0 = Instant::now();
        let o = run(netns::command(sim.pid(), &python)
            .arg(venv::script("sdk_provision.py"))
            .args([
                "--host",
                "localhost",
                "--id-scope",
                ID_SCOPE,
                "--registration-id",
                REG_ID,
            ])
            .arg("--server-ca")
            .arg(pki.file("server-ca.pem"))
            .arg("--cert")
            .arg(pki.device_cert())
            .arg("--key")
            .arg(pki.device_key()));
        let wall = t0.elapsed().as_secs_f64();
        assert!(o.status.success(), "sdk_provision.py: {}", text(&o));
        let r: serde_json::Value =
            serde_json::from_slice(&o.stdout).expect("sdk_provision.py prints JSON");
        assert_eq!(r["status"], "assigned", "{r}");
        let v = sim_view(&sim.events()[mark..]);
        sdk_wall.push(wall);
        sdk_call.push(r["register_seconds"].as_f64().unwrap_or(f64::NAN));
        sdk_reg.push(v.register_to_assigned);
        sdk_busy.push(v.register_to_assigned - v.first_poll_wait);
        sdk_requests = v.requests;
    }
    let agent_bin = bin("dps-agent");
    println!(
        "Provisioning gw-0001 with X.509 over MQTT, dps-sim at retry-after 0 (polls-before-assign 1) on loopback, \
         {runs} runs each, taking turns; median (min–max). dps-agent: {}",
        agent_bin.display()
    );
    println!("| | dps-agent `run --once` | azure-iot-device 2.14.0 (Python) | SDK / dps-agent (medians) |");
    println!("|---|---|---|---|");
    println!(
        "| what is sent | CSR (P-384), api 2025-07-01-preview; chain checked and stored | no CSR (api 2019-03-31), no chain | |"
    );
    println!("| requests per provisioning | {agent_requests} | {sdk_requests} | |");
    println!(
        "| register → assigned (simulator clock) | {} | {} | {:.0}× |",
        cell(&agent_reg),
        cell(&sdk_reg),
        median(&sdk_reg) / median(&agent_reg)
    );
    println!(
        "| the same, without the wait before the first poll (the SDK waits 2 s whatever retry-after says) | {} | {} | {:.1}× |",
        cell(&agent_busy),
        cell(&sdk_busy),
        median(&sdk_busy) / median(&agent_busy)
    );
    println!(
        "| process start → exit (dps-agent: chain stored) | {} | {} | {:.1}× |",
        cell(&agent_wall),
        cell(&sdk_wall),
        median(&sdk_wall) / median(&agent_wall)
    );
    println!(
        "| SDK `register()` call (connect → assigned → disconnect) | | {} | |",
        cell(&sdk_call)
    );
    println!();
    println!("dps-agent's own time per provisioning (process start to exit, minus the simulator's time between each request and its answer):");
    println!(
        "| overhead | of the run | simulator's issuance of the chain (final answer, with CSR) |"
    );
    println!("|---|---|---|");
    println!(
        "| {} | {:.0} % | {} |",
        cell(&agent_overhead),
        100.0 * median(&agent_overhead) / median(&agent_wall),
        cell(&agent_issue)
    );
}

/// Size of the dps-agent binary as built, and after `strip`.
fn size() {
    let b = bin("dps-agent");
    let built = fs::metadata(&b).map(|m| m.len()).unwrap_or(0);
    let d = TestDir::new("bench-size");
    let stripped_path = d.join("dps-agent.stripped");
    let ok = std::process::Command::new("strip")
        .arg("-o")
        .arg(&stripped_path)
        .arg(&b)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let stripped = fs::metadata(&stripped_path).map(|m| m.len()).unwrap_or(0);
    println!("dps-agent binary ({}):", b.display());
    println!("| as built | stripped |");
    println!("|---|---|");
    println!(
        "| {:.2} MiB | {} |",
        built as f64 / 1048576.0,
        if ok {
            format!("{:.2} MiB", stripped as f64 / 1048576.0)
        } else {
            "strip (binutils) failed".into()
        }
    );
}
