//! A private dbus-daemon per test: either system-bus-like (the real system
//! bus rules plus only the policy files given, e.g. the shipped one) or
//! permissive (everything allowed, to reach the daemon's own access check).
//! Also the users and groups those tests act as.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct PrivateBus {
    child: Child,
    pub address: String,
    pub socket: PathBuf,
}

/// Rules of the system bus (Debian's system.conf, minus its includes).
const SYSTEM_LIKE: &str = r#"<policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>"#;

const PERMISSIVE: &str = r#"<policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>"#;

impl PrivateBus {
    /// A bus with the system bus's rules and only `policies` included.
    pub fn system_like(dir: &Path, policies: &[&Path]) -> PrivateBus {
        let inc = dir.join("system.d");
        fs::create_dir_all(&inc).expect("policy dir");
        for p in policies {
            fs::copy(p, inc.join(p.file_name().expect("policy file name"))).expect("copy policy");
        }
        PrivateBus::start(dir, SYSTEM_LIKE, Some(&inc))
    }

    /// A bus that allows everything.
    pub fn permissive(dir: &Path) -> PrivateBus {
        PrivateBus::start(dir, PERMISSIVE, None)
    }

    fn start(dir: &Path, rules: &str, includedir: Option<&Path>) -> PrivateBus {
        fs::create_dir_all(dir).expect("bus dir");
        let socket = dir.join("bus.sock");
        let _ = fs::remove_file(&socket);
        let include = includedir
            .map(|d| format!("<includedir>{}</includedir>", d.display()))
            .unwrap_or_default();
        let conf = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  {rules}
  {include}
</busconfig>
"#,
            socket = socket.display()
        );
        let conf_path = dir.join("bus.conf");
        fs::write(&conf_path, conf).expect("bus config");
        let log = fs::File::create(dir.join("dbus-daemon.log")).expect("bus log");
        let child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf_path.display()))
            .arg("--nofork")
            .arg("--nopidfile")
            .stdout(Stdio::from(log.try_clone().expect("fd")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start dbus-daemon (package dbus-daemon)");
        let t0 = Instant::now();
        while !socket.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "dbus-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The socket must be reachable by unprivileged test users.
        let _ = Command::new("chmod").arg("0755").arg(dir).status();
        PrivateBus {
            child,
            address: format!("unix:path={}", socket.display()),
            socket,
        }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes sure a system user (and its group) exists. The suites run as root,
/// as `make test` does.
pub fn ensure_user(name: &str) {
    if Command::new("id")
        .arg(name)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        return;
    }
    let ok = Command::new("useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "cannot create user {name}: the D-Bus suites run as root (make test does)"
    );
}

/// Makes sure a group exists and returns its id.
pub fn ensure_group(name: &str) -> u32 {
    let gid = || {
        Command::new("getent")
            .args(["group", name])
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|l| l.split(':').nth(2).and_then(|g| g.trim().parse().ok()))
    };
    if let Some(g) = gid() {
        return g;
    }
    let ok = Command::new("groupadd")
        .args(["--system", name])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "cannot create group {name}: the D-Bus suites run as root (make test does)"
    );
    gid().expect("group id")
}

/// `setpriv` arguments that run a command as `user` with exactly `groups`.
pub fn as_user(user: &str, group: &str, groups: &[u32]) -> Vec<String> {
    let mut v = vec![
        "setpriv".to_string(),
        format!("--reuid={user}"),
        format!("--regid={group}"),
    ];
    if groups.is_empty() {
        v.push("--clear-groups".into());
    } else {
        v.push(format!(
            "--groups={}",
            groups
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    v.push("--".into());
    v
}

/// Runs `busctl --address=ADDR args…`, optionally as another user.
pub fn busctl(address: &str, prefix: &[String], args: &[&str]) -> std::process::Output {
    let mut cmd = if prefix.is_empty() {
        Command::new("busctl")
    } else {
        let mut c = Command::new(&prefix[0]);
        c.args(&prefix[1..]).arg("busctl");
        c
    };
    cmd.arg(format!("--address={address}"))
        .args(args)
        .output()
        .expect("run busctl")
}

/// Calls `method` of the agent with `gdbus call` (which prints the error's
/// message; busctl prints only its name), optionally as another user.
pub fn call_method(address: &str, prefix: &[String], method: &str) -> std::process::Output {
    let mut cmd = if prefix.is_empty() {
        Command::new("gdbus")
    } else {
        let mut c = Command::new(&prefix[0]);
        c.args(&prefix[1..]).arg("gdbus");
        c
    };
    cmd.args(["call", "--address", address, "--dest", "org.dpsagent.Agent"])
        .args(["--object-path", "/org/dpsagent/Agent", "--method"])
        .arg(format!("org.dpsagent.Agent1.{method}"))
        .output()
        .expect("run gdbus (package libglib2.0-bin)")
}
