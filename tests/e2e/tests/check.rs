//! `dps-agent check`: a healthy gateway passes; a deliberately broken one
//! gets FAIL lines that say what to do.

use std::fs;
use std::process::Output;

use dps_agent_e2e::*;
use serde_json::Value;

fn lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn line<'a>(all: &'a [String], verdict: &str, what: &str) -> Option<&'a String> {
    all.iter().find(|l| {
        let mut w = l.split_whitespace();
        w.next() == Some(verdict) && w.next() == Some(what)
    })
}

#[test]
fn check_passes_a_healthy_gateway_and_fails_broken_ones() {
    let d = TestDir::new("check");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            cert_validity: Some("12s".into()),
            ..Default::default()
        },
    );
    let setup = AgentSetup::for_sim(&d.path, &sim);
    let cfg = setup.write(&d.join("config.toml"));
    let o = agent(&cfg, &["run", "--once"]);
    assert!(o.status.success(), "{}", text(&o));

    // Healthy: every check OK (the daemon is not running: a WARN, not a FAIL).
    let o = agent(&cfg, &["check"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let l = lines(&o);
    for what in [
        "config",
        "key",
        "bootstrap",
        "identity",
        "chain",
        "expiry",
        "clock",
        "dps",
    ] {
        assert!(line(&l, "OK", what).is_some(), "{what}: {}", text(&o));
    }
    assert!(line(&l, "WARN", "daemon").is_some(), "{}", text(&o));
    assert!(!l.iter().any(|x| x.starts_with("FAIL")), "{}", text(&o));

    // The operational key replaced by another one: key and certificate disagree.
    let id: Value =
        serde_json::from_str(&fs::read_to_string(setup.state_dir.join("identity.json")).unwrap())
            .unwrap();
    let key = id["key_uri"]
        .as_str()
        .unwrap()
        .strip_prefix("file:")
        .unwrap()
        .to_string();
    let saved = fs::read(&key).unwrap();
    fs::copy(pki.file("issuing-ca.key"), &key).unwrap();
    let o = agent(&cfg, &["check"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let l = lines(&o);
    let fail = line(&l, "FAIL", "key").unwrap_or_else(|| panic!("{}", text(&o)));
    assert!(
        fail.contains("does not match the stored certificate"),
        "{fail}"
    );
    assert!(text(&o).contains("fix: renew"), "{}", text(&o));
    fs::write(&key, saved).unwrap();

    // DPS unreachable.
    let text_cfg = fs::read_to_string(&cfg).unwrap();
    let unreachable = d.join("unreachable.toml");
    fs::write(
        &unreachable,
        text_cfg.replace(&format!("localhost:{}", sim.port), "localhost:1"),
    )
    .unwrap();
    let o = agent(&unreachable, &["check"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let fail = line(&lines(&o), "FAIL", "dps")
        .cloned()
        .unwrap_or_else(|| panic!("{}", text(&o)));
    assert!(fail.contains("cannot connect to localhost:1"), "{fail}");

    // An untrusted DPS server certificate.
    let foreign = Pki::generate(&d.join("foreign"));
    let untrusted = d.join("untrusted.toml");
    fs::write(
        &untrusted,
        text_cfg.replace(
            &pki.file("server-ca.pem").display().to_string(),
            &foreign.file("server-ca.pem").display().to_string(),
        ),
    )
    .unwrap();
    let o = agent(&untrusted, &["check"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        line(&lines(&o), "FAIL", "dps").is_some_and(|l| l.contains("TLS handshake failed")),
        "{}",
        text(&o)
    );

    // The 12-second certificate expires: the chain and expiry checks fail.
    std::thread::sleep(std::time::Duration::from_secs(13));
    let o = agent(&cfg, &["check"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let l = lines(&o);
    let fail = line(&l, "FAIL", "chain").unwrap_or_else(|| panic!("{}", text(&o)));
    assert!(fail.contains("expired at"), "{fail}");
    assert!(line(&l, "FAIL", "expiry").is_some(), "{}", text(&o));

    // A broken config is one FAIL line.
    let broken = d.join("broken.toml");
    fs::write(&broken, text_cfg.replace("ecdsa-p384", "ecdsa-p521")).unwrap();
    let o = agent(&broken, &["check"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(line(&lines(&o), "FAIL", "config").is_some(), "{}", text(&o));
}

/// With symmetric-key attestation `check` reads the key file as provisioning
/// would: a 0600 file holding a base64 key is OK; one other users can read, or
/// one that holds no key, is a FAIL line with the fix, and the key never shows.
#[test]
fn check_reads_the_symmetric_key_file() {
    use std::os::unix::fs::PermissionsExt;
    let d = TestDir::new("check-sas");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            retry_after: Some(0),
            ..Default::default()
        },
    );
    let setup = AgentSetup::for_sim(&d.path, &sim);
    let key_file = d.join("dps.key");
    let key = "c2VjcmV0LWdyb3VwLWtleS1mb3ItdGhlLWNoZWNrLXRlc3Q=";
    let write_key = |text: &str, mode: u32| {
        fs::write(&key_file, text).unwrap();
        fs::set_permissions(&key_file, fs::Permissions::from_mode(mode)).unwrap();
    };
    let cfg = setup.write_with(
        &d.join("config.toml"),
        "mqtt",
        &format!(
            "method = \"symmetric_key\"\nkey_file = \"{}\"\nenrollment = \"group\"",
            key_file.display()
        ),
    );

    write_key(&format!("{key}\n"), 0o600);
    let o = agent(&cfg, &["check"]);
    let l = lines(&o);
    let ok = line(&l, "OK", "bootstrap").unwrap_or_else(|| panic!("{}", text(&o)));
    assert!(ok.contains("symmetric key of the group enrollment"), "{ok}");

    write_key(&format!("{key}\n"), 0o644);
    let o = agent(&cfg, &["check"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let l = lines(&o);
    let fail = line(&l, "FAIL", "bootstrap").unwrap_or_else(|| panic!("{}", text(&o)));
    assert!(fail.contains("mode 0644"), "{fail}");
    assert!(text(&o).contains("chmod 600"), "{}", text(&o));
    assert!(!text(&o).contains(key), "the key shows:\n{}", text(&o));

    write_key("not a key at all!\n", 0o600);
    let o = agent(&cfg, &["check"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let l = lines(&o);
    let fail = line(&l, "FAIL", "bootstrap").unwrap_or_else(|| panic!("{}", text(&o)));
    assert!(fail.contains("does not hold a key"), "{fail}");
    assert!(!text(&o).contains("not a key at all"), "{}", text(&o));
}
