//! The .deb packages, as a gateway gets them: lintian, the installed unit
//! (`systemd-analyze verify` and `security`), `dpkg -i`, `check-config` on the
//! shipped config, `dpkg -r` (state kept), `dpkg -P` (state and users gone);
//! and the arm64 binary under qemu-user, provisioning against dps-sim.
//!
//! These install packages and create users on the machine, so they are
//! `#[ignore]`d in a plain `cargo test` and run by `make package-test` (which
//! `make test` calls after the other suites, as root, one test at a time):
//! `cargo test -p dps-agent-e2e --test package -- --ignored --test-threads=1`.
//! The machine is left as it was found: users that existed before (the D-Bus
//! suite makes `dps-agent` and `dps-agent-admin`) are put back with the same
//! ids.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dps_agent_e2e::{run, text, workspace_root, AgentSetup, Pki, Sim, SimOptions, TestDir};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const ARM64_TARGET: &str = "aarch64-unknown-linux-gnu";
/// The exposure `systemd-analyze security` may give the unit, at most.
const MAX_EXPOSURE: f64 = 2.0;

fn deb(arch: &str) -> PathBuf {
    let p = workspace_root()
        .join("target/debian")
        .join(format!("dps-agent_{VERSION}-1_{arch}.deb"));
    assert!(
        p.exists(),
        "{} is missing: run `make deb` (amd64) / `make deb-arm64` first (make package-test does)",
        p.display()
    );
    p
}

fn sh(cmd: &str) -> Output {
    run(Command::new("sh").arg("-c").arg(cmd))
}

fn ok(cmd: &str) -> String {
    let o = sh(cmd);
    assert!(o.status.success(), "`{cmd}` failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn require_root() {
    let uid = ok("id -u");
    assert_eq!(
        uid.trim(),
        "0",
        "the package tests install a .deb: run them as root (make test does)"
    );
}

fn installed() -> bool {
    sh("dpkg-query -W -f='${Status}' dps-agent 2>/dev/null")
        .stdout
        .starts_with(b"install ok")
}

fn getent(db: &str, name: &str) -> Option<String> {
    let o = run(Command::new("getent").args([db, name]));
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Users and groups the package manages, as they were before the test; put
/// back (same ids, same members) when the test ends, whatever happened, after
/// purging the package and removing /etc/dps-agent and /var/lib/dps-agent
/// (which did not exist before: the test checks that first).
struct Accounts {
    user: Option<String>,
    groups: Vec<(&'static str, Option<String>)>,
}

const GROUPS: [&str; 3] = ["dps-agent-admin", "dps-agent", "tss"];

impl Accounts {
    /// Records the accounts and removes the package's own, so the install is
    /// tested from a clean machine.
    fn take() -> Accounts {
        let a = Accounts {
            user: getent("passwd", "dps-agent"),
            groups: GROUPS.iter().map(|g| (*g, getent("group", g))).collect(),
        };
        remove_package_accounts();
        a
    }
}

fn remove_package_accounts() {
    let _ = sh("userdel dps-agent 2>/dev/null; groupdel dps-agent 2>/dev/null; groupdel dps-agent-admin 2>/dev/null");
}

impl Drop for Accounts {
    fn drop(&mut self) {
        if installed() {
            let _ = sh("dpkg -P dps-agent >/dev/null 2>&1");
        }
        // Neither existed before the test (checked first).
        let _ = sh("rm -rf /etc/dps-agent /var/lib/dps-agent");
        remove_package_accounts();
        // Groups first (with their ids), then the user, then memberships.
        for (name, line) in &self.groups {
            let Some(line) = line else {
                if *name == "tss" {
                    // Made by the package's sysusers file; it was not here.
                    let _ = sh("groupdel tss 2>/dev/null");
                }
                continue;
            };
            let gid = line.split(':').nth(2).unwrap_or_default();
            if getent("group", name).is_none() {
                let _ = sh(&format!("groupadd --system -g {gid} {name}"));
            }
        }
        if let Some(line) = &self.user {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 7 {
                let _ = sh(&format!(
                    "useradd --system -u {} -g {} -d '{}' -s '{}' -c '{}' -M {}",
                    f[2], f[3], f[5], f[6], f[4], f[0]
                ));
            }
        }
        for (name, line) in &self.groups {
            let members = line
                .as_deref()
                .and_then(|l| l.split(':').nth(3))
                .unwrap_or_default();
            for m in members.split(',').filter(|m| !m.is_empty()) {
                let _ = sh(&format!("gpasswd -a {m} {name} >/dev/null 2>&1"));
            }
        }
    }
}

#[test]
#[ignore = "installs the .deb: run by `make package-test`"]
fn lintian_passes_both_packages() {
    for arch in ["amd64", "arm64"] {
        let deb = deb(arch);
        let o = run(Command::new("lintian")
            .args(["--fail-on", "error,warning", "--display-info"])
            .arg(&deb));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        eprintln!(
            "lintian {}:\n{out}{}",
            deb.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success(),
            "lintian failed on {}: {}",
            deb.display(),
            text(&o)
        );
        assert!(
            !out.lines()
                .any(|l| l.starts_with("E:") || l.starts_with("W:")),
            "{out}"
        );
        println!(
            "{}: {} bytes",
            deb.file_name().unwrap().to_string_lossy(),
            fs::metadata(&deb).unwrap().len()
        );
    }
    let info = ok(&format!(
        "dpkg-deb -f {} Architecture Depends Recommends",
        deb("arm64").display()
    ));
    assert!(info.contains("Architecture: arm64"), "{info}");
    assert!(
        info.contains("libtss2-esys"),
        "$auto found the arm64 libraries: {info}"
    );
}

/// Checks the machine can take the package, and returns the guard that puts
/// it back as it was.
fn clean_machine() -> Accounts {
    require_root();
    assert!(
        !installed(),
        "dps-agent is installed on this machine; the test installs and purges it: remove it first (dpkg -P dps-agent)"
    );
    assert!(
        !Path::new("/var/lib/dps-agent").exists() && !Path::new("/etc/dps-agent").exists(),
        "/var/lib/dps-agent or /etc/dps-agent exists: the test would destroy them on purge"
    );
    Accounts::take()
}

/// The users, groups and directories the postinst makes.
fn assert_users_and_dirs() {
    let groups = ok("id -nG dps-agent");
    assert!(
        groups.split_whitespace().any(|g| g == "tss"),
        "dps-agent is in group tss: {groups}"
    );
    assert!(getent("group", "dps-agent-admin").is_some());
    let user = getent("passwd", "dps-agent").expect("user dps-agent");
    assert!(user.ends_with(":/usr/sbin/nologin"), "{user}");
    let uid = user.split(':').nth(2).unwrap_or_default().to_string();
    let state = fs::metadata("/var/lib/dps-agent").expect("state dir made by the postinst");
    assert_eq!(state.permissions().mode() & 0o7777, 0o755);
    assert_eq!(state.uid().to_string(), uid);
    let boot = fs::metadata("/etc/dps-agent/bootstrap").expect("bootstrap dir");
    assert_eq!(boot.permissions().mode() & 0o7777, 0o750);
    let dps_gid = getent("group", "dps-agent")
        .and_then(|g| g.split(':').nth(2).map(str::to_string))
        .expect("group dps-agent");
    assert_eq!(boot.gid().to_string(), dps_gid);
    assert!(Path::new("/etc/dps-agent/config.d").is_dir());
}

/// Purges the package and checks the users went with it.
fn purge_and_check_users_gone() {
    ok("dpkg -P dps-agent");
    assert!(!installed());
    assert!(
        !Path::new("/var/lib/dps-agent").exists(),
        "state removed on purge"
    );
    assert!(
        getent("passwd", "dps-agent").is_none(),
        "user removed on purge"
    );
    assert!(
        getent("group", "dps-agent").is_none(),
        "group removed on purge"
    );
    assert!(
        getent("group", "dps-agent-admin").is_none(),
        "admin group removed on purge"
    );
}

#[test]
#[ignore = "installs the .deb: run by `make package-test`"]
fn installs_with_adduser_where_systemd_sysusers_is_missing() {
    let _restore = clean_machine();
    let deb = deb("amd64");
    // Hide systemd-sysusers and systemd-tmpfiles (overlay whiteouts on
    // /usr/bin, in a private mount namespace) while dpkg runs the postinst.
    let d = TestDir::new("package-no-sysusers");
    let script = format!(
        "set -e; d={dir}; mkdir -p $d/upper $d/work; \
         mknod $d/upper/systemd-sysusers c 0 0; mknod $d/upper/systemd-tmpfiles c 0 0; \
         mount -t overlay overlay -o lowerdir=/usr/bin,upperdir=$d/upper,workdir=$d/work /usr/bin; \
         if command -v systemd-sysusers || command -v systemd-tmpfiles; then exit 3; fi; \
         dpkg -i {deb}",
        dir = d.path.display(),
        deb = deb.display()
    );
    let o = run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(&script));
    assert!(
        o.status.success(),
        "dpkg -i without systemd-sysusers: {}",
        text(&o)
    );
    assert!(installed());
    assert_users_and_dirs();
    purge_and_check_users_gone();
    let _ = fs::remove_dir_all("/etc/dps-agent");
}

#[test]
#[ignore = "installs the .deb: run by `make package-test`"]
fn installs_runs_hardened_removes_and_purges() {
    let _restore = clean_machine();
    let deb = deb("amd64");

    // Install.
    ok(&format!("dpkg -i {}", deb.display()));
    assert!(installed());
    assert_users_and_dirs();
    for f in [
        "/usr/bin/dps-agent",
        "/etc/dps-agent/config.toml",
        "/usr/share/doc/dps-agent/config.toml",
        "/usr/share/doc/dps-agent/changelog.Debian.gz",
        "/usr/share/doc/dps-agent/copyright",
        "/usr/lib/systemd/system/dps-agent.service",
        "/usr/lib/sysusers.d/dps-agent.conf",
        "/usr/lib/tmpfiles.d/dps-agent.conf",
        "/usr/lib/systemd/catalog/dps-agent.catalog",
        "/usr/share/dbus-1/system.d/org.dpsagent.Agent.conf",
        "/usr/share/dbus-1/interfaces/org.dpsagent.Agent1.xml",
        "/usr/share/man/man8/dps-agent.8.gz",
        "/usr/share/man/man8/dps-agent-run.8.gz",
        "/usr/share/bash-completion/completions/dps-agent",
        "/usr/share/zsh/vendor-completions/_dps-agent",
        "/usr/share/fish/vendor_completions.d/dps-agent.fish",
    ] {
        assert!(Path::new(f).exists(), "{f} is installed");
    }
    let conffiles = ok("dpkg-query -W -f='${Conffiles}' dps-agent");
    assert!(
        conffiles.contains("/etc/dps-agent/config.toml"),
        "{conffiles}"
    );
    assert!(
        fs::read("/etc/dps-agent/config.toml").unwrap()
            == fs::read("/usr/share/doc/dps-agent/config.toml").unwrap(),
        "the conffile is the documented config"
    );
    let man = ok("zcat /usr/share/man/man8/dps-agent.8.gz");
    assert!(man.contains(".TH DPS-AGENT 8"), "{man}");
    assert!(
        man.contains("check\\-config"),
        "the page lists the commands: {man}"
    );

    // The message catalog parses (systemd's dpkg trigger compiled it).
    ok("journalctl --update-catalog");
    let catalog = ok("journalctl --list-catalog");
    for e in dps_agent::logging::Event::ALL {
        assert!(
            catalog.contains(&format!("{} dps-agent: ", e.message_id())),
            "{e:?} is in the journal's catalog"
        );
    }

    // The unit as installed.
    let o = run(Command::new("systemd-analyze")
        .args(["verify", "/usr/lib/systemd/system/dps-agent.service"]));
    let verify = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("systemd-analyze verify:\n{verify}");
    assert!(
        o.status.success(),
        "systemd-analyze verify failed:\n{verify}"
    );
    assert!(
        !verify.lines().any(|l| l.contains("dps-agent.service:")),
        "the unit has problems:\n{verify}"
    );
    let security = ok(
        "systemd-analyze security --offline=yes --no-pager /usr/lib/systemd/system/dps-agent.service",
    );
    let line = security
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure in:\n{security}"));
    let figure: f64 = line
        .split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the figure in {line:?}"));
    println!("systemd-analyze security: {}", line.trim());
    assert!(
        figure <= MAX_EXPOSURE,
        "exposure {figure} > {MAX_EXPOSURE}:\n{security}"
    );

    // The shipped config is valid as shipped.
    let o = run(Command::new("/usr/bin/dps-agent").args(["check-config", "--config-only"]));
    assert!(
        o.status.success(),
        "check-config --config-only: {}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("/etc/dps-agent/config.toml: OK"),
        "{}",
        text(&o)
    );
    // What it needs besides: the bootstrap credential where the shipped config
    // points, readable by the daemon's user (the README's install steps).
    let d = TestDir::new("package");
    let pki = Pki::generate(&d.join("pki"));
    ok(&format!(
        "install -m 0644 {} /etc/dps-agent/bootstrap/device-full-chain.pem && \
         install -o dps-agent -g dps-agent -m 0600 {} /etc/dps-agent/bootstrap/device.key",
        pki.device_cert().display(),
        pki.device_key().display()
    ));
    let as_daemon_user = [
        "--reuid=dps-agent",
        "--regid=dps-agent",
        "--init-groups",
        "--",
    ];
    for o in [
        run(Command::new("/usr/bin/dps-agent").arg("check-config")),
        run(Command::new("setpriv")
            .args(as_daemon_user)
            .args(["/usr/bin/dps-agent", "check-config"])),
    ] {
        assert!(o.status.success(), "check-config: {}", text(&o));
    }
    let o = run(Command::new("/usr/bin/dps-agent").arg("--version"));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("dps-agent {VERSION}")
    );

    // Some state, as the daemon leaves it; then remove: state and config kept.
    fs::write("/var/lib/dps-agent/identity.json", "{}\n").unwrap();
    ok("dpkg -r dps-agent");
    assert!(!Path::new("/usr/bin/dps-agent").exists());
    assert!(
        Path::new("/var/lib/dps-agent/identity.json").exists(),
        "state kept on remove"
    );
    assert!(
        Path::new("/etc/dps-agent/config.toml").exists(),
        "conffile kept on remove"
    );
    assert!(
        getent("passwd", "dps-agent").is_some(),
        "user kept on remove"
    );

    // Purge: state, config, users gone; the admin's bootstrap credential kept.
    purge_and_check_users_gone();
    assert!(
        !Path::new("/etc/dps-agent/config.toml").exists(),
        "config removed on purge"
    );
    assert!(
        !Path::new("/etc/dps-agent/config.d").exists(),
        "config.d removed on purge"
    );
    assert!(
        Path::new("/etc/dps-agent/bootstrap/device.key").exists(),
        "the bootstrap credential is the admin's: kept on purge"
    );
    ok("rm -r /etc/dps-agent");
}

#[test]
#[ignore = "needs the arm64 cross build: run by `make package-test`"]
fn arm64_binary_provisions_under_qemu() {
    let bin = workspace_root()
        .join("target")
        .join(ARM64_TARGET)
        .join("release/dps-agent");
    assert!(
        bin.exists(),
        "{} is missing: run `make deb-arm64`",
        bin.display()
    );
    let file = ok(&format!("file -b {} || true", bin.display()));
    eprintln!("{}: {file}", bin.display());

    // Debian's qemu-user, no -L: libc and libtss2 come from multiarch.
    let qemu = |args: &[&str]| {
        run(Command::new("qemu-aarch64")
            .arg(&bin)
            .args(args)
            .env("TSS2_LOG", "all+NONE"))
    };
    let o = qemu(&["--version"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("dps-agent {VERSION}")
    );

    let d = TestDir::new("arm64");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(&d.join("sim"), &pki, &SimOptions::default());
    let setup = AgentSetup::for_sim(&d.path, &sim);
    let cfg = setup.write(&d.join("config.toml"));
    let cfg = cfg.to_str().unwrap();
    let o = qemu(&["--config", cfg, "check-config"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = qemu(&["--config", cfg, "run", "--once"]);
    assert!(o.status.success(), "arm64 run --once: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("provisioned as device"), "{out}");
    let id: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(setup.state_dir.join("identity.json")).unwrap())
            .unwrap();
    assert_eq!(id["registration_id"], dps_agent_e2e::REG_ID);
    let issued = dps_agent_e2e::of_kind(&sim.events(), "issued").len();
    assert_eq!(issued, 1, "the simulator issued one certificate");
    // The status as the arm64 binary reads it back.
    let o = qemu(&["--config", cfg, "status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(s["state"], "provisioned", "{}", text(&o));
}
