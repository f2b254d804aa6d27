//! swtpm instances for the TPM suites: each on free loopback ports with its own
//! state directory, stopped (or power-cycled) by the test.
//!
//! swtpm serves one client at a time, and libtss2's swtpm TCTI finds the control
//! port at data port + 1, so a pair of adjacent free ports is picked. The TPM
//! logs every command (`--log level=20`), which [`Swtpm::commands`] counts.

use std::collections::BTreeMap;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Environment for child processes that use the TPM: silences libtss2's
/// messages about expected failures (e.g. probing handles).
pub const TSS2_LOG: (&str, &str) = ("TSS2_LOG", "all+NONE");

/// A running swtpm. Killed on drop.
pub struct Swtpm {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Swtpm {
    /// Starts a fresh TPM with its state in `dir/state` (created).
    pub fn start(dir: &Path) -> Swtpm {
        fs::create_dir_all(dir.join("state")).expect("swtpm state dir");
        let mut tpm = Swtpm {
            child: None,
            port: 0,
            dir: dir.to_path_buf(),
        };
        tpm.launch(None);
        tpm
    }

    /// The TCTI string for `[tpm] tcti`, TPM2TOOLS_TCTI and TPM2OPENSSL_TCTI.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The state directory (keeps NV: persistent objects, seeds).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Stops the TPM and starts it again on the same state: a TPM
    /// reset (Startup CLEAR): transient objects and sessions are gone, seeds and
    /// persistent objects stay. Tries to keep the ports; if they are taken
    /// meanwhile it picks new ones, so read [`Swtpm::tcti`] again.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.launch(Some(port));
    }

    /// Stops the TPM, letting swtpm shut down cleanly (CMD_SHUTDOWN on the
    /// control channel, as a power-off).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("swtpm_ioctl")
                .arg("--tcp")
                .arg(format!("127.0.0.1:{}", self.port + 1))
                .arg("-s")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn launch(&mut self, prefer: Option<u16>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut attempt = 0;
        while Instant::now() < deadline {
            attempt += 1;
            // The preferred port gets a few tries (it may sit in TIME_WAIT briefly).
            let port = match prefer.filter(|_| attempt <= 10) {
                Some(p) => p,
                None => match free_port_pair() {
                    Some(p) => p,
                    None => continue,
                },
            };
            let log = self.dir.join("swtpm.log");
            let mut child = Command::new("swtpm")
                .arg("socket")
                .arg("--tpm2")
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--tpmstate")
                .arg(format!("dir={}", self.state_dir().display()))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .arg("--log")
                .arg(format!("file={},level=20", log.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start swtpm (apt-get install swtpm swtpm-tools)");
            let ready_by = Instant::now() + Duration::from_secs(10);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    self.child = Some(child);
                    self.port = port;
                    return;
                }
                if child.try_wait().ok().flatten().is_some() || Instant::now() > ready_by {
                    // Most likely a port was taken between the check and the bind.
                    let _ = child.kill();
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!(
            "swtpm did not start (see {})",
            self.dir.join("swtpm.log").display()
        );
    }

    /// Runs a tpm2-tools command against this TPM and returns its output
    /// (nothing else may be connected at the time).
    pub fn tpm2(&self, tool: &str, args: &[&str]) -> Output {
        Command::new(tool)
            .args(args)
            .env("TPM2TOOLS_TCTI", self.tcti())
            .env(TSS2_LOG.0, TSS2_LOG.1)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool} (apt-get install tpm2-tools): {e}"))
    }

    /// The handles `tpm2_getcap <what>` lists (handles-transient,
    /// handles-persistent).
    pub fn handles(&self, what: &str) -> Vec<String> {
        let o = self.tpm2("tpm2_getcap", &[what]);
        assert!(
            o.status.success(),
            "tpm2_getcap {what}: {}",
            crate::text(&o)
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.trim().trim_start_matches("- ").to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Commands the TPM has received since it was first started, in order
    /// (command codes, from swtpm's log).
    pub fn commands(&self) -> Vec<u32> {
        let log = fs::read_to_string(self.dir.join("swtpm.log")).unwrap_or_default();
        let mut out = Vec::new();
        let mut lines = log.lines();
        while let Some(line) = lines.next() {
            if !line.contains("SWTPM_IO_Read:") {
                continue;
            }
            let bytes: Vec<u8> = lines
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|h| u8::from_str_radix(h, 16).ok())
                .collect();
            if bytes.len() >= 10 {
                out.push(u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]));
            }
        }
        out
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Counts commands by name, e.g. {"Sign": 2, "Load": 3}.
pub fn command_histogram(codes: &[u32]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for c in codes {
        *out.entry(command_name(*c)).or_insert(0) += 1;
    }
    out
}

/// The TPM2_CC name of a command code (the ones dps-agent and the tools use).
pub fn command_name(code: u32) -> String {
    match code {
        0x131 => "CreatePrimary",
        0x153 => "Create",
        0x157 => "Load",
        0x15D => "Sign",
        0x165 => "FlushContext",
        0x173 => "ReadPublic",
        0x176 => "StartAuthSession",
        0x17A => "GetCapability",
        0x17B => "GetRandom",
        0x120 => "EvictControl",
        0x144 => "Startup",
        0x161 => "ContextLoad",
        0x162 => "ContextSave",
        _ => return format!("0x{code:x}"),
    }
    .to_string()
}

/// A port P with P+1 free too.
fn free_port_pair() -> Option<u16> {
    let a = TcpListener::bind("127.0.0.1:0").ok()?;
    let port = a.local_addr().ok()?.port();
    let next = port.checked_add(1)?;
    let _b = TcpListener::bind(("127.0.0.1", next)).ok()?;
    Some(port)
}
