//! A private swtpm for the TPM unit tests: free loopback ports, its own state
//! directory, a command log, killed when dropped. (The end-to-end suites have
//! their own harness in tests/e2e/src/swtpm.rs.)

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestTpm {
    child: Child,
    port: u16,
    pub dir: PathBuf,
}

impl TestTpm {
    pub fn start() -> TestTpm {
        let dir = std::env::temp_dir().join(format!("tpm-unit-{}", rand::random::<u64>()));
        fs::create_dir_all(dir.join("state")).expect("swtpm state dir");
        for _ in 0..20 {
            let Some(port) = free_port_pair() else {
                continue;
            };
            if let Some(child) = launch(&dir, port) {
                return TestTpm { child, port, dir };
            }
        }
        panic!("could not start swtpm on a free port");
    }

    /// Power-cycles the TPM on the same state and ports (a TPM reset).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for _ in 0..50 {
            if let Some(child) = launch(&self.dir, self.port) {
                self.child = child;
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("could not restart swtpm on port {}", self.port);
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// TPM commands received so far (from swtpm's log).
    pub fn commands(&self) -> usize {
        fs::read_to_string(self.dir.join("swtpm.log"))
            .unwrap_or_default()
            .matches("SWTPM_IO_Read:")
            .count()
    }

    /// Runs a tpm2-tools command against this TPM (nobody else may be
    /// connected: swtpm serves one client at a time), then flushes the
    /// transient objects the tool left loaded (there is no resource manager).
    pub fn tpm2(&self, tool: &str, args: &[&str]) -> String {
        let out = self.tpm2_raw(tool, args);
        self.tpm2_raw("tpm2_flushcontext", &["-t"]);
        out
    }

    fn tpm2_raw(&self, tool: &str, args: &[&str]) -> String {
        // `timeout`: a TPM connection someone forgot to close must fail the
        // test, not hang it (swtpm serves one client at a time).
        let o = Command::new("timeout")
            .arg("20")
            .arg(tool)
            .args(args)
            .current_dir(&self.dir)
            .env("TPM2TOOLS_TCTI", self.tcti())
            .env("TSS2_LOG", "all+NONE")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool} (apt-get install tpm2-tools): {e}"));
        assert!(
            o.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// What clients killed in the middle of a TPM command leave behind when
    /// there is no resource manager: `n` primaries still loaded. Checks that
    /// they are.
    pub fn leak_primaries(&self, n: usize) {
        for i in 0..n {
            let ctx = format!("leak{i}.ctx");
            self.tpm2_raw(
                "tpm2_createprimary",
                &["-C", "o", "-G", "ecc256", "-c", &ctx],
            );
        }
        let listed = self.tpm2_raw("tpm2_getcap", &["handles-transient"]);
        assert_eq!(
            listed.lines().filter(|l| l.contains("0x80")).count(),
            n,
            "{listed}"
        );
    }

    /// Persists an ECDSA key (tpm2-tools, under the standard primary) at `handle`.
    /// `attrs` are tpm2_create's object attributes.
    pub fn persist_key(&self, curve: &str, handle: &str, attrs: &str) {
        self.make_primary("prim.ctx");
        self.tpm2(
            "tpm2_create",
            &[
                "-C", "prim.ctx", "-G", curve, "-a", attrs, "-u", "k.pub", "-r", "k.priv",
            ],
        );
        self.tpm2(
            "tpm2_load",
            &[
                "-C", "prim.ctx", "-u", "k.pub", "-r", "k.priv", "-c", "k.ctx",
            ],
        );
        self.tpm2("tpm2_evictcontrol", &["-C", "o", "-c", "k.ctx", handle]);
    }

    /// The standard ECC storage primary (tpm-notes 2.3), saved as a context file.
    pub fn make_primary(&self, ctx: &str) {
        self.tpm2(
            "tpm2_createprimary",
            &[
                "-C",
                "o",
                "-g",
                "sha256",
                "-G",
                "ecc256:aes128cfb",
                "-a",
                "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
                "-c",
                ctx,
            ],
        );
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for TestTpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Starts swtpm on `port` (and `port + 1`); `None` if it does not come up.
fn launch(dir: &Path, port: u16) -> Option<Child> {
    let mut child = Command::new("swtpm")
        .arg("socket")
        .arg("--tpm2")
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .arg("--tpmstate")
        .arg(format!("dir={}", dir.join("state").display()))
        .arg("--flags")
        .arg("not-need-init,startup-clear")
        .arg("--log")
        .arg(format!("file={},level=20", dir.join("swtpm.log").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("swtpm must be installed (apt-get install swtpm swtpm-tools)");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(child);
        }
        if child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None; // most likely the ports were taken meanwhile
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port P with P+1 free too (swtpm's TCTI finds the control port at P+1).
fn free_port_pair() -> Option<u16> {
    let a = TcpListener::bind("127.0.0.1:0").ok()?;
    let port = a.local_addr().ok()?.port();
    let next = port.checked_add(1)?;
    let _b = TcpListener::bind(("127.0.0.1", next)).ok()?;
    Some(port)
}

/// Verifies a DER ECDSA signature over `msg` against a SubjectPublicKeyInfo.
pub fn verify(spki: &[u8], p384: bool, msg: &[u8], sig: &[u8]) -> bool {
    let spki = spki::SubjectPublicKeyInfoRef::try_from(spki).expect("spki");
    let point = spki.subject_public_key.raw_bytes();
    let alg = if p384 {
        &ring::signature::ECDSA_P384_SHA384_ASN1
    } else {
        &ring::signature::ECDSA_P256_SHA256_ASN1
    };
    ring::signature::UnparsedPublicKey::new(alg, point)
        .verify(msg, sig)
        .is_ok()
}

pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}
