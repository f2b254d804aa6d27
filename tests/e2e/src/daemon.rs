//! A `dps-agent run` daemon under test: started with its log captured to a
//! file, signalled (SIGHUP, SIGTERM, SIGKILL) like systemd or a power cut
//! would, and killed when the test ends.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bin;

pub struct Daemon {
    child: Option<Child>,
    config: PathBuf,
    pub log: PathBuf,
    pub state_dir: PathBuf,
    env: Vec<(String, String)>,
    /// A command prefix such as `setpriv --reuid=…` to run as another user.
    prefix: Vec<String>,
}

impl Daemon {
    /// Starts `dps-agent --config CONFIG run`, appending its output to `log`,
    /// and waits until it is ready (its pid file exists).
    pub fn start(config: &Path, state_dir: &Path, log: &Path) -> Daemon {
        Daemon::start_with_env(config, state_dir, log, &[])
    }

    pub fn start_with_env(
        config: &Path,
        state_dir: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut d = Daemon {
            child: None,
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            prefix: Vec::new(),
        };
        d.spawn();
        d
    }

    /// Starts the daemon behind a command prefix (e.g. from `dbus::as_user`).
    pub fn start_as(config: &Path, state_dir: &Path, log: &Path, prefix: Vec<String>) -> Daemon {
        let mut d = Daemon {
            child: None,
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            env: Vec::new(),
            prefix,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let _ = fs::remove_file(self.pid_file());
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("dps-agent"));
                c
            }
            None => Command::new(bin("dps-agent")),
        };
        cmd.arg("--config")
            .arg(&self.config)
            .arg("run")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(out.try_clone().expect("log fd")))
            .stderr(Stdio::from(out));
        self.child = Some(cmd.spawn().expect("start dps-agent run"));
        let pid = self.pid();
        self.wait_for("the pid file", Duration::from_secs(20), |d| {
            fs::read_to_string(d.pid_file())
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
                == Some(pid)
        });
    }

    fn pid_file(&self) -> PathBuf {
        self.state_dir.join("dps-agent.pid")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("daemon running")
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} failed");
    }

    /// Asks for a renewal now.
    pub fn hup(&self) {
        self.signal("HUP");
    }

    /// A power cut: SIGKILL, then reap.
    pub fn kill9(&mut self) {
        self.signal("KILL");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns how long the daemon took to exit.
    pub fn stop(&mut self) -> Duration {
        let t0 = Instant::now();
        self.signal("TERM");
        let mut c = self.child.take().expect("daemon running");
        loop {
            if c.try_wait().ok().flatten().is_some() {
                return t0.elapsed();
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
                let _ = c.wait();
                panic!("the daemon did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the daemon again (after kill9 or stop).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.spawn();
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `dps-agent status --json` (read from the state directory).
    pub fn status(&self) -> Value {
        let o = Command::new(bin("dps-agent"))
            .arg("--config")
            .arg(&self.config)
            .args(["status", "--json"])
            .output()
            .expect("run status");
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
    }

    /// Waits until `cond` holds, failing the test (with the log) after `timeout`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&mut Daemon) -> bool,
    ) {
        let t0 = Instant::now();
        loop {
            if cond(self) {
                return;
            }
            if !self.running() {
                panic!(
                    "the daemon exited while waiting for {what}:\n{}",
                    self.log_text()
                );
            }
            if t0.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
