//! The renewal daemon: repeated renewals with fresh keys, SIGKILL at random
//! moments, bad issuances that must not replace a good certificate, and
//! DPS's retry-after.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dps_agent_e2e::daemon::Daemon;
use dps_agent_e2e::*;
use serde_json::Value;

/// The TCTI of the swtpm holding the keys, when the crash test runs on a TPM.
static TPM_TCTI: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn identity(state: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(state.join("identity.json")).expect("identity.json"))
        .expect("identity.json is JSON")
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

/// The committed chain's leaf (in identity.json) holds the stored key, checked
/// with openssl; with `exported`, operational-chain.pem is that chain too (the
/// export trails the commit by a moment, so a power cut may catch it old; the
/// next start rewrites it).
fn leaf_matches_key(state: &Path, scratch: &Path) -> Result<(), String> {
    committed_leaf_matches_key(state, scratch, true)
}

fn committed_leaf_matches_key(state: &Path, scratch: &Path, exported: bool) -> Result<(), String> {
    let id = identity(state);
    let uri = id["key_uri"].as_str().unwrap_or_default();
    let key = PathBuf::from(
        uri.strip_prefix("file:")
            .or_else(|| uri.strip_prefix("tpm:"))
            .ok_or("key_uri is not a file: or tpm: URI")?,
    );
    if !key.exists() {
        return Err(format!(
            "the identity's key {} does not exist",
            key.display()
        ));
    }
    let chain = id["chain_pem"].as_str().unwrap_or_default().to_string();
    if exported {
        let file =
            fs::read_to_string(state.join("operational-chain.pem")).map_err(|e| e.to_string())?;
        if file != chain {
            return Err("operational-chain.pem differs from identity.json".into());
        }
    }
    let leaf = split_pem(&chain).into_iter().next().ok_or("empty chain")?;
    let leaf_file = scratch.join("leaf-check.pem");
    fs::write(&leaf_file, leaf).map_err(|e| e.to_string())?;
    let tcti = TPM_TCTI.lock().unwrap().clone();
    let public = match (uri.starts_with("tpm:"), tcti) {
        (true, Some(tcti)) => {
            let o = run(std::process::Command::new("openssl")
                .args([
                    "pkey",
                    "-provider",
                    "tpm2",
                    "-provider",
                    "default",
                    "-pubout",
                    "-in",
                ])
                .arg(&key)
                .env("TPM2OPENSSL_TCTI", tcti)
                .env("TSS2_LOG", "all+NONE"));
            if !o.status.success() {
                return Err(format!(
                    "tpm2-openssl cannot read {}: {}",
                    key.display(),
                    text(&o)
                ));
            }
            String::from_utf8_lossy(&o.stdout).into_owned()
        }
        (true, None) => return Err("a tpm: key but no TPM in this test".into()),
        (false, _) => key_pubkey(&key),
    };
    if cert_pubkey(&leaf_file) != public {
        return Err("the leaf's public key is not the stored key's".into());
    }
    Ok(())
}

/// How many registrations dps-sim has received.
fn registers(sim: &Sim) -> usize {
    of_kind(&sim.events(), "request")
        .iter()
        .filter(|e| e["kind"] == "register")
        .count()
}

fn file_setup(d: &TestDir, sim: &Sim, extra: &str) -> (PathBuf, PathBuf) {
    let mut setup = AgentSetup::for_sim(&d.path, sim);
    setup.extra = extra.to_string();
    let cfg = setup.write(&d.join("config.toml"));
    (cfg, setup.state_dir)
}

#[test]
fn renews_five_times_with_a_new_key_each_time() {
    let d = TestDir::new("renew-five");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            cert_validity: Some("20s".into()),
            ..Default::default()
        },
    );
    let (cfg, state) = file_setup(&d, &sim, "");
    let mut daemon = Daemon::start(&cfg, &state, &d.join("agent.log"));
    daemon.wait_for(
        "6 identities (provisioning + 5 renewals)",
        Duration::from_secs(150),
        |d| d.status()["renewals"].as_u64().unwrap_or(0) >= 6,
    );
    let took = daemon.stop();
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    leaf_matches_key(&state, &d.path).unwrap();
    assert_eq!(
        key_files(&state).len(),
        1,
        "old keys are deleted: {:?}",
        key_files(&state)
    );

    let events = sim.events();
    let issued = of_kind(&events, "issued");
    assert!(issued.len() >= 6, "{}", issued.len());
    let keys: HashSet<&str> = issued
        .iter()
        .map(|e| e["leaf_spki_sha256"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys.len(),
        issued.len(),
        "every certificate is for a new key"
    );

    // Every renewal drew its own jitter (up to lifetime/20 = 1 s here) ...
    let log = daemon.log_text();
    let jitters: Vec<i64> = log
        .lines()
        .filter_map(|l| l.split("(jitter ").nth(1))
        .filter_map(|rest| rest.split(" ms").next()?.parse().ok())
        .collect();
    assert!(jitters.len() >= 6, "{log}");
    assert!(
        jitters.iter().all(|j| (0..=1000).contains(j)),
        "{jitters:?}"
    );
    assert!(
        jitters.iter().collect::<HashSet<_>>().len() >= 3,
        "{jitters:?}"
    );
    // ... and the registrations in the events file are spaced accordingly.
    let registers: Vec<f64> = of_kind(&events, "request")
        .iter()
        .filter(|e| e["kind"] == "register")
        .map(|e| e["t"].as_f64().unwrap())
        .collect();
    let gaps: Vec<f64> = registers.windows(2).map(|w| w[1] - w[0]).collect();
    let spread = gaps.iter().cloned().fold(f64::MIN, f64::max)
        - gaps.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        gaps.iter().all(|g| (10.0..15.0).contains(g)),
        "renewal every ~13 s: {gaps:?}"
    );
    assert!(spread > 0.05, "the jitter spreads renewals: {gaps:?}");
    assert!(!log.contains("<3>"), "no errors were logged:\n{log}");
}

#[test]
fn survives_sigkill_at_random_moments_during_renewals() {
    let iterations: usize = std::env::var("DPS_AGENT_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let d = TestDir::new("crash");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            ..Default::default()
        },
    );
    // `make soak` runs this with the keys in swtpm.
    let mut tpm = (std::env::var("DPS_AGENT_CRASH_BACKEND").as_deref() == Ok("tpm"))
        .then(|| dps_agent_e2e::swtpm::Swtpm::start(&d.join("swtpm")));
    let (cfg, state) = match &tpm {
        Some(t) => {
            *TPM_TCTI.lock().unwrap() = Some(t.tcti());
            let mut setup = AgentSetup::for_sim(&d.path, &sim);
            setup.key_backend = "tpm".into();
            setup.extra = format!("[tpm]\ntcti = \"{}\"\n", t.tcti());
            (setup.write(&d.join("config.toml")), setup.state_dir)
        }
        None => file_setup(&d, &sim, ""),
    };
    let mut daemon = Daemon::start(&cfg, &state, &d.join("agent.log"));
    daemon.wait_for("provisioning", Duration::from_secs(30), |d| {
        d.status()["state"] == "provisioned"
    });
    let mut committed_during_test = 0;
    let mut max_keys = 0;
    let mut last = identity(&state)["thumbprint"].clone();
    for i in 0..iterations {
        daemon.hup();
        // Anywhere from "before the renewal starts" to "after it finished";
        // every other kill within 2 ms of the request, so that some kills
        // interrupt a renewal however fast this machine renews.
        let window_us = if i % 2 == 1 { 2_000 } else { 400_000 };
        let delay = Duration::from_micros(rand_u64() % window_us);
        std::thread::sleep(delay);
        daemon.kill9();
        if let Some(t) = tpm.as_mut() {
            // A power cut resets the TPM too: the objects the killed daemon had
            // loaded are gone (swtpm has no resource manager to flush them, and
            // they would fill its object slots; the daemon flushes such leftovers
            // itself when it connects, see the TPM unit tests).
            let before = t.tcti();
            t.restart();
            if t.tcti() != before {
                let text = fs::read_to_string(&cfg)
                    .unwrap()
                    .replace(&before, &t.tcti());
                fs::write(&cfg, text).unwrap();
                *TPM_TCTI.lock().unwrap() = Some(t.tcti());
            }
        }
        // The power is back: what is on disk must be a working identity.
        committed_leaf_matches_key(&state, &d.path, false)
            .unwrap_or_else(|e| panic!("after kill {i} ({delay:?}): {e}"));
        max_keys = max_keys.max(key_files(&state).len());
        assert!(
            key_files(&state).len() <= 2,
            "after kill {i}: {:?}",
            key_files(&state)
        );
        let now = identity(&state)["thumbprint"].clone();
        if now != last {
            committed_during_test += 1;
            last = now;
        }
        daemon.restart();
        // Within one attempt the restarted agent has cleaned up.
        daemon.wait_for("recovery", Duration::from_secs(20), |d| {
            key_files(&d.state_dir).len() == 1 && d.status()["state"] == "provisioned"
        });
        leaf_matches_key(&state, &d.path).unwrap();
    }
    daemon.stop();
    eprintln!(
        "crash test: {iterations} kills, {committed_during_test} renewals committed between kills, at most {max_keys} key files at a kill"
    );
    assert!(
        committed_during_test > 0,
        "some renewals completed between kills"
    );
    assert!(
        committed_during_test < iterations,
        "some kills interrupted renewals"
    );
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos() ^ std::process::id() as u128);
    h.finish()
}

#[test]
fn bad_issuances_keep_the_current_identity_and_are_retried() {
    let d = TestDir::new("bad-issuance");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            ..Default::default()
        },
    );
    // Small retry cap so the test sees retries within seconds.
    let (cfg, state) = file_setup(&d, &sim, "");
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .replace("[operational]\n", "[operational]\nretry_max = \"3s\"\n");
    fs::write(&cfg, text).unwrap();
    let mut daemon = Daemon::start(&cfg, &state, &d.join("agent.log"));
    daemon.wait_for("provisioning", Duration::from_secs(30), |d| {
        d.status()["state"] == "provisioned"
    });
    for (fault, message) in [
        ("wrong-key-cert", "it was issued for a different key"),
        ("bad-chain", "is not signed by the next certificate"),
        ("expired-cert", "expired at"),
        ("not-yet-valid-cert", "is not valid before"),
    ] {
        let before = fs::read(state.join("identity.json")).unwrap();
        let renewals = daemon.status()["renewals"].as_u64().unwrap();
        sim.set_faults(&[fault]);
        daemon.hup();
        daemon.wait_for(
            &format!("{fault}: two failed attempts"),
            Duration::from_secs(30),
            |d| d.status()["failures"].as_u64().unwrap_or(0) >= 2,
        );
        let s = daemon.status();
        assert_eq!(s["state"], "failed", "{fault}: {s}");
        assert!(
            s["last_error"]
                .as_str()
                .unwrap_or_default()
                .contains(message),
            "{fault}: {s}"
        );
        assert!(s["next_attempt"].as_i64().is_some(), "{fault}: {s}");
        assert_eq!(
            fs::read(state.join("identity.json")).unwrap(),
            before,
            "{fault}: identity kept"
        );
        assert_eq!(
            key_files(&state).len(),
            1,
            "{fault}: pending keys discarded"
        );
        leaf_matches_key(&state, &d.path).unwrap();
        let log = daemon.log_text();
        assert!(
            log.lines().any(|l| l.starts_with("<3>")
                && l.contains(message)
                && l.contains("the current identity stays in use")),
            "{fault}: a clear error line:\n{log}"
        );
        // Fault off: the next retry succeeds.
        sim.set_faults(&[]);
        daemon.wait_for(
            &format!("{fault}: recovery"),
            Duration::from_secs(30),
            |d| {
                let s = d.status();
                s["state"] == "provisioned" && s["renewals"].as_u64().unwrap_or(0) > renewals
            },
        );
        assert_eq!(daemon.status()["failures"], 0);
    }
    daemon.stop();
}

#[test]
fn large_retry_after_is_honoured_and_sigterm_is_prompt() {
    let d = TestDir::new("retry-after-large");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            ..Default::default()
        },
    );
    let (cfg, state) = file_setup(&d, &sim, "");
    let mut daemon = Daemon::start(&cfg, &state, &d.join("agent.log"));
    daemon.wait_for("provisioning", Duration::from_secs(30), |d| {
        d.status()["state"] == "provisioned"
    });
    sim.set_faults(&["retry-after-large"]);
    let t0 = dps_now();
    daemon.hup();
    daemon.wait_for("the throttled attempt", Duration::from_secs(30), |d| {
        d.status()["failures"].as_u64().unwrap_or(0) >= 1
    });
    let s = daemon.status();
    let next = s["next_attempt"].as_i64().unwrap();
    assert!(
        (next - t0 - 7200).abs() <= 30,
        "next attempt in 7200 s as DPS asked: {s}"
    );
    assert_eq!(s["state"], "failed");
    let n = registers(&sim);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(registers(&sim), n, "no retry before retry-after");

    // A renewal stuck in DPS's slow assignment (retry-after 60 s) is abandoned
    // at once on SIGTERM.
    let slow = Sim::start(
        &d.join("sim2"),
        &pki,
        &SimOptions {
            retry_after: Some(60),
            faults: vec!["slow-assign".into()],
            ..Default::default()
        },
    );
    let text = fs::read_to_string(&cfg).unwrap().replace(
        &format!("localhost:{}", sim.port),
        &format!("localhost:{}", slow.port),
    );
    fs::write(&cfg, text).unwrap();
    daemon.stop();
    daemon.restart();
    daemon.hup();
    wait_until(Duration::from_secs(20), || {
        of_kind(&slow.events(), "response")
            .iter()
            .any(|r| r["status"] == 202)
    });
    let took = daemon.stop();
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM during an attempt took {took:?}"
    );
    leaf_matches_key(&state, &d.path).unwrap();
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn dps_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Issue 15's second process: while the daemon is in the middle of a renewal
/// (dps-sim keeps the operation `assigning` for a few seconds), `run --once`
/// is refused at once with the daemon's pid and what to do instead, and
/// `status`, `check` and `renew` leave the daemon's work alone. The renewal
/// then commits an identity whose key exists and matches, and one key is left.
#[test]
fn a_second_process_during_a_renewal_is_refused_or_harmless() {
    let d = TestDir::new("second-process");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(2),
            polls_before_assign: Some(0),
            ..Default::default()
        },
    );
    let (cfg, state) = file_setup(&d, &sim, "");
    let mut daemon = Daemon::start(&cfg, &state, &d.join("agent.log"));
    daemon.wait_for("provisioned", Duration::from_secs(30), |d| {
        d.status()["renewals"].as_u64().unwrap_or(0) >= 1
    });
    let first = identity(&state)["thumbprint"].clone();
    let before = registers(&sim);

    // Mid-renewal: the register has been sent, the operation is still assigning.
    sim.set_faults(&["slow-assign"]);
    daemon.hup();
    let t0 = Instant::now();
    while registers(&sim) == before {
        assert!(t0.elapsed() < Duration::from_secs(20), "no renewal began");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pending = key_files(&state);
    assert_eq!(pending.len(), 2, "current and pending key: {pending:?}");

    let once = agent(&cfg, &["run", "--once"]);
    let said = text(&once);
    assert!(!once.status.success(), "{said}");
    assert!(
        said.contains(&format!("in use by process {}", daemon.pid())),
        "names the holder: {said}"
    );
    assert!(said.contains("dps-agent renew"), "says what to do: {said}");
    assert_eq!(key_files(&state), pending, "run --once touched the keys");

    let status = agent(&cfg, &["status", "--json"]);
    assert!(status.status.success(), "{}", text(&status));
    let check = agent(&cfg, &["check"]);
    assert!(
        !text(&check).contains("panicked"),
        "check during a renewal: {}",
        text(&check)
    );
    assert_eq!(key_files(&state), pending, "status/check touched the keys");
    let renew = agent(&cfg, &["renew"]);
    assert!(renew.status.success(), "{}", text(&renew));

    daemon.wait_for("the renewal committed", Duration::from_secs(60), |d| {
        d.status()["renewals"].as_u64().unwrap_or(0) >= 2
    });
    sim.set_faults(&[]);
    // The `renew` reached the daemon either during the attempt (coalesced,
    // and logged) or after it (one more renewal): wait for whichever it was.
    daemon.wait_for("the renew request handled", Duration::from_secs(60), |d| {
        d.log_text().contains("a renewal is already in progress")
            || d.status()["renewals"].as_u64().unwrap_or(0) >= 3
    });
    daemon.stop();
    assert_ne!(identity(&state)["thumbprint"], first, "a new identity");
    leaf_matches_key(&state, &d.path).unwrap();
    assert_eq!(key_files(&state).len(), 1, "{:?}", key_files(&state));
}

/// After a failure on this machine (here: the bootstrap key is missing) the
/// backoff is long, but a restart after the fix retries at once. After a
/// refusal by DPS (enrollment disabled) a restart keeps the backoff, so a
/// crash loop cannot hammer DPS.
#[test]
fn a_restart_retries_a_local_failure_at_once_but_not_a_refusal() {
    let d = TestDir::new("restart-after-fix");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            ..Default::default()
        },
    );
    let key = d.join("bootstrap.key");
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    setup.identity_key = format!("file:{}", key.display());
    let cfg = setup.write(&d.join("config.toml"));
    let mut daemon = Daemon::start(&cfg, &setup.state_dir, &d.join("daemon.log"));
    let waits_long = |s: &Value| {
        s["failures"].as_u64() >= Some(1)
            && s["next_attempt"]
                .as_i64()
                .is_some_and(|t| t - dps_now() > 600)
    };
    daemon.wait_for(
        "the failure and its backoff",
        Duration::from_secs(30),
        |d| waits_long(&d.status()),
    );
    assert_eq!(registers(&sim), 0);

    // The owner puts the key in place and restarts the service.
    fs::copy(pki.device_key(), &key).unwrap();
    daemon.stop();
    daemon.restart();
    daemon.wait_for("provisioning at once", Duration::from_secs(30), |d| {
        d.status()["state"] == "provisioned"
    });
    assert!(daemon.log_text().contains("failed on this machine"));
    assert_eq!(registers(&sim), 1);

    // DPS refuses a renewal: a restart does not retry before the backoff ends.
    sim.set_faults(&["status-disabled"]);
    daemon.hup();
    daemon.wait_for(
        "the refusal and its backoff",
        Duration::from_secs(30),
        |d| waits_long(&d.status()),
    );
    let before = (registers(&sim), daemon.status()["next_attempt"].clone());
    let waits = |d: &Daemon| d.log_text().matches("next attempt at ").count();
    let announced = waits(&daemon);
    daemon.stop();
    daemon.restart();
    // The restarted daemon announces its wait once it has decided not to try.
    daemon.wait_for(
        "the restarted daemon to announce its wait",
        Duration::from_secs(30),
        |d| waits(d) > announced,
    );
    assert_eq!(
        (registers(&sim), daemon.status()["next_attempt"].clone()),
        before,
        "a restart after a refusal by DPS must keep the backoff"
    );
    daemon.stop();
}

/// A DPS host name that does not resolve: after a few tries the attempt ends
/// and the failure shows in the status (what D-Bus `LastError`/`Failures`
/// publish) instead of being retried silently until the attempt deadline.
#[test]
fn an_unknown_dps_host_shows_as_a_failure_while_the_daemon_retries() {
    let d = TestDir::new("no-such-host");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(&d.join("sim"), &pki, &SimOptions::default());
    let mut setup = AgentSetup::for_sim(&d.path, &sim);
    // RFC 6761: names under .invalid never resolve.
    setup.endpoint = "dps.no-such-host.invalid:8883".into();
    // A deadline far beyond the wait below: only ending the attempt early passes.
    let cfg = d.join("config.toml");
    fs::write(
        &cfg,
        setup
            .toml()
            .replace("attempt_timeout = \"60s\"", "attempt_timeout = \"10m\""),
    )
    .unwrap();
    let mut daemon = Daemon::start(&cfg, &setup.state_dir, &d.join("daemon.log"));
    daemon.wait_for("the failure in the status", Duration::from_secs(120), |d| {
        let s = d.status();
        s["failures"].as_u64() >= Some(1)
            && s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("dps.no-such-host.invalid"))
            && s["next_attempt"].is_number()
    });
    daemon.stop();
}
