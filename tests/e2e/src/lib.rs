//! Test harness for the end-to-end suites: runs the real `dps-agent` binary
//! against the real `dps-sim` (and, in later suites, swtpm, SoftHSM2,
//! dbus-daemon, mosquitto), each started on loopback with ports chosen at run
//! time, and stopped when the test ends. Nothing here fakes a component.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod daemon;
pub mod dbus;
pub mod mosquitto;
pub mod netns;
pub mod softhsm;
pub mod swtpm;
pub mod venv;

/// The registration id the test PKI is made for.
pub const REG_ID: &str = "gw-0001";
pub const ID_SCOPE: &str = "0ne00000000";

/// Path of a workspace binary (built by `make test` before the suites run).
pub fn bin(name: &str) -> PathBuf {
    let env_name = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Ok(p) = std::env::var(&env_name) {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    let p = target.join("debug").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (make test does)",
        p.display()
    );
    p
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("workspace root")
}

/// Where test directories go. Some suites run processes as other users
/// (dps-agent, nobody) that must read their files and reach their sockets, so
/// the directory must be reachable by others: `target/e2e/` when every
/// directory above it lets others through, else `$TMPDIR/dps-agent-e2e/`
/// (a checkout under `/root`, mode 0700 on Debian, or in a `mktemp -d`
/// directory). `DPS_AGENT_E2E_DIR` overrides both.
pub fn e2e_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let target = workspace_root().join("target");
        let root = match std::env::var_os("DPS_AGENT_E2E_DIR") {
            Some(dir) => PathBuf::from(dir),
            None if reachable_by_others(&target) => target.join("e2e"),
            None => std::env::temp_dir().join("dps-agent-e2e"),
        };
        fs::create_dir_all(&root).expect("create the e2e directory");
        open_to_others(&root);
        root
    })
    .clone()
}

/// Whether every directory from `/` down to `dir` lets other users through.
fn reachable_by_others(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    dir.ancestors().all(|a| {
        fs::metadata(a)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

/// Mode 0755 whatever the umask (others must read what the tests leave there).
fn open_to_others(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod 755 {}: {e}", dir.display()));
}

/// A scratch directory for one test, under [`e2e_root`] (normally
/// `target/e2e/`). Left in place after the run (for post-mortems); `make
/// clean` removes it.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let path = e2e_root().join(format!("{name}-{}-{:08x}", std::process::id(), rand_u32()));
        fs::create_dir_all(&path).expect("create test dir");
        open_to_others(&path);
        TestDir { path }
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

/// Runs a command and returns its output, failing the test if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Text of stdout and stderr together, for messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A test PKI made by `dps-sim pki`.
#[derive(Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        let o = run(Command::new(bin("dps-sim"))
            .arg("pki")
            .arg("--out")
            .arg(dir));
        assert!(o.status.success(), "dps-sim pki failed: {}", text(&o));
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn device_cert(&self) -> PathBuf {
        self.file(&format!("device-{REG_ID}-full-chain.pem"))
    }

    pub fn device_key(&self) -> PathBuf {
        self.file(&format!("device-{REG_ID}.key"))
    }
}

/// Options for a simulator run.
#[derive(Clone, Default)]
pub struct SimOptions {
    pub retry_after: Option<u32>,
    pub polls_before_assign: Option<u32>,
    pub cert_validity: Option<String>,
    pub faults: Vec<String>,
    pub extra: Vec<String>,
    /// Also run the IoT Hub simulator (`--hub-port 0`, twins in `twins.json`).
    pub hub: bool,
    /// A command prefix to run the simulator behind, e.g. [`netns::private`] for a network
    /// namespace of its own; empty: run it directly.
    pub wrapper: Vec<String>,
}

/// A running `dps-sim serve`. Killed on drop.
pub struct Sim {
    child: Child,
    pub port: u16,
    pub events: PathBuf,
    pub pki: Pki,
    pub control: PathBuf,
    pub log: PathBuf,
    /// The hub simulator's port, when it runs.
    pub hub_port: Option<u16>,
    pub twin_file: PathBuf,
    /// DPS over HTTPS (`https_port` of the ready file).
    pub https_port: u16,
}

impl Sim {
    pub fn start(dir: &Path, pki: &Pki, opts: &SimOptions) -> Sim {
        fs::create_dir_all(dir).expect("sim dir");
        let ready = dir.join("ready.json");
        let events = dir.join("events.jsonl");
        let control = dir.join("faults");
        let log = dir.join("sim.log");
        let _ = fs::remove_file(&ready);
        let mut cmd = match opts.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("dps-sim"));
                c
            }
            None => Command::new(bin("dps-sim")),
        };
        cmd.arg("serve")
            .arg("--pki")
            .arg(&pki.dir)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--events")
            .arg(&events)
            .arg("--control")
            .arg(&control)
            .arg("--id-scope")
            .arg(ID_SCOPE);
        if let Some(r) = opts.retry_after {
            cmd.arg("--retry-after").arg(r.to_string());
        }
        if let Some(p) = opts.polls_before_assign {
            cmd.arg("--polls-before-assign").arg(p.to_string());
        }
        if let Some(v) = &opts.cert_validity {
            cmd.arg("--cert-validity").arg(v);
        }
        for f in &opts.faults {
            cmd.arg("--fault").arg(f);
        }
        let twin_file = dir.join("twins.json");
        if opts.hub {
            cmd.arg("--hub-port")
                .arg("0")
                .arg("--twin-file")
                .arg(&twin_file);
        }
        cmd.args(&opts.extra);
        let logfile = fs::File::create(&log).expect("sim log");
        cmd.stdout(Stdio::from(logfile.try_clone().expect("log fd")))
            .stderr(Stdio::from(logfile));
        let mut child = cmd.spawn().expect("start dps-sim");
        let deadline = Instant::now() + Duration::from_secs(30);
        let (port, hub_port) = loop {
            if let Ok(t) = fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str::<Value>(&t) {
                    if let Some(p) = v["mqtt_port"].as_u64() {
                        break (p as u16, v["hub_port"].as_u64().map(|h| h as u16));
                    }
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "dps-sim exited early ({status}): {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "dps-sim did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        };
        // The ready file is written once, atomically: read the HTTPS port too.
        let https_port = fs::read_to_string(&ready)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["https_port"].as_u64())
            .map_or(0, |p| p as u16);
        Sim {
            child,
            port,
            events,
            pki: pki.clone(),
            control,
            log,
            hub_port,
            twin_file,
            https_port,
        }
    }

    /// The simulator's process id (with a [`SimOptions::wrapper`] that execs it, such as
    /// [`netns::private`], the simulator itself: [`netns::enter`] joins its namespace).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The hub simulator's device twins (`{deviceId: {reported, version}}`).
    pub fn twins(&self) -> Value {
        fs::read_to_string(&self.twin_file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    }

    /// Every event recorded so far.
    pub fn events(&self) -> Vec<Value> {
        read_events(&self.events)
    }

    /// Replaces the active faults (the simulator re-reads them per request).
    pub fn set_faults(&self, faults: &[&str]) {
        fs::write(&self.control, faults.join("\n") + "\n").expect("write faults");
    }

    /// Number of connections to the simulated DPS (hub connections not counted).
    pub fn connections(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| e["event"] == "connect" && e["service"] != "hub")
            .count()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a JSON-lines events file (a missing file is empty).
pub fn read_events(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l:?}: {e}")))
        .collect()
}

/// Settings for an agent config file.
#[derive(Clone)]
pub struct AgentSetup {
    pub endpoint: String,
    pub trust_bundle: PathBuf,
    pub identity_cert: PathBuf,
    pub identity_key: String,
    pub state_dir: PathBuf,
    pub key_backend: String,
    pub key_algorithm: String,
    /// The body of the `[hub]` table.
    pub hub: String,
    /// Extra TOML appended verbatim.
    pub extra: String,
}

impl AgentSetup {
    /// A setup for the simulator's PKI, file backend, state under `dir`.
    pub fn for_sim(dir: &Path, sim: &Sim) -> AgentSetup {
        AgentSetup {
            endpoint: format!("localhost:{}", sim.port),
            trust_bundle: sim.pki.file("server-ca.pem"),
            identity_cert: sim.pki.device_cert(),
            identity_key: format!("file:{}", sim.pki.device_key().display()),
            state_dir: dir.join("state"),
            key_backend: "file".into(),
            key_algorithm: "ecdsa-p384".into(),
            // With the hub simulator: its port. Without one: no hub step.
            hub: match sim.hub_port {
                Some(p) => format!("port = {p}\n"),
                None => "verify_new_certificate = false\nreport_twin = false\n".into(),
            },
            extra: String::new(),
        }
    }

    pub fn toml(&self) -> String {
        format!(
            r#"[dps]
global_endpoint = "{endpoint}"
id_scope = "{ID_SCOPE}"
registration_id = "{REG_ID}"
trust_bundle = "{trust}"
attempt_timeout = "60s"

[dps.attestation]
method = "x509"
identity_cert = "{cert}"
identity_key = "{key}"

[operational]
key_backend = "{backend}"
key_algorithm = "{alg}"

[state]
dir = "{state}"

[hub]
{hub}
{extra}
"#,
            endpoint = self.endpoint,
            trust = self.trust_bundle.display(),
            cert = self.identity_cert.display(),
            key = self.identity_key,
            backend = self.key_backend,
            alg = self.key_algorithm,
            state = self.state_dir.display(),
            hub = self.hub,
            extra = self.extra,
        )
    }

    /// Writes the config file and returns its path.
    pub fn write(&self, path: &Path) -> PathBuf {
        fs::write(path, self.toml()).expect("write config");
        path.to_path_buf()
    }

    /// The config with `[dps] transport` set and another `[dps.attestation]`
    /// table (`attestation` = its lines, without the header), for the
    /// onboarding methods other than X.509 (identity_cert/identity_key unused).
    pub fn toml_with(&self, transport: &str, attestation: &str) -> String {
        let text = self.toml();
        let start = text
            .find("[dps.attestation]\n")
            .expect("an attestation table");
        let end = start + text[start..].find("\n[").expect("a table after it");
        format!(
            "{}[dps.attestation]\n{attestation}\n{}",
            &text[..start],
            &text[end..]
        )
        .replacen(
            "[dps]\n",
            &format!("[dps]\ntransport = \"{transport}\"\n"),
            1,
        )
    }

    /// Writes [`AgentSetup::toml_with`] and returns the path.
    pub fn write_with(&self, path: &Path, transport: &str, attestation: &str) -> PathBuf {
        fs::write(path, self.toml_with(transport, attestation)).expect("write config");
        path.to_path_buf()
    }
}

/// `dps-agent --config CONFIG args…`
pub fn agent(config: &Path, args: &[&str]) -> Output {
    run(Command::new(bin("dps-agent"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_BACKTRACE", "1"))
}

/// Splits a PEM chain into its certificates (PEM text each).
pub fn split_pem(pem: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in pem.lines() {
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END") {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

/// Runs openssl and returns stdout; fails the test on error.
pub fn openssl(args: &[&str]) -> String {
    let o = run(Command::new("openssl").args(args));
    assert!(o.status.success(), "openssl {args:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The public key (PEM) of a certificate file, as openssl prints it.
pub fn cert_pubkey(cert: &Path) -> String {
    openssl(&[
        "x509",
        "-in",
        &cert.display().to_string(),
        "-noout",
        "-pubkey",
    ])
}

/// The public key (PEM) of a private key file.
pub fn key_pubkey(key: &Path) -> String {
    openssl(&["pkey", "-in", &key.display().to_string(), "-pubout"])
}

/// Events of one kind.
pub fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}
