//! Benchmarks that print figures (never pass/fail on timing):
//!   dps-bench dbus [N]          D-Bus property reads per second and latency percentiles
//!   dps-bench idle [SECS] [BACKEND...]
//!                               idle daemon RSS and CPU time over SECS per key backend
//! Each run sets up its own simulator, private bus, swtpm or SoftHSM2 under
//! target/e2e/, as the test suites do.

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
            eprintln!("usage: dps-bench dbus [N] | dps-bench idle [SECS] [file|tpm|pkcs11...]");
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
