//! The `dps-agent` command line: parses arguments, loads the config, runs one
//! command and maps the outcome to an exit code. All work happens in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand};
use tokio::sync::mpsc;

use dps_agent::bootstrap;
use dps_agent::bus;
use dps_agent::clock::{self, rfc3339};
use dps_agent::config::{self, Config};
use dps_agent::csr::Csr;
use dps_agent::keys::{Backend, KeyAlgorithm, KeySettings, KeyUri, Keys};
use dps_agent::lifecycle::daemon::{self, Command};
use dps_agent::lifecycle::{Agent, Reason};
use dps_agent::status::Status;
use dps_agent::store::Store;

/// Exit code for "failed, but trying again later may work" (EX_TEMPFAIL).
const EXIT_TEMPFAIL: u8 = 75;

#[derive(Parser)]
#[command(
    name = "dps-agent",
    version,
    about = "Gives this gateway its Azure IoT identity through DPS and keeps it renewed.",
    long_about = "dps-agent provisions the device through Azure IoT Hub Device Provisioning Service (DPS) \
with its bootstrap credential, sends a certificate signing request for a fresh key kept in the TPM, a \
PKCS#11 token or (for development) a file, and stores the short-lived operational certificate chain DPS \
returns. It then renews that certificate before it expires.\n\n\
First steps:\n  \
1. edit /etc/dps-agent/config.toml (every key is explained in the file)\n  \
2. dps-agent check-config\n  \
3. dps-agent run --once      # provision now and print the result\n  \
4. systemctl enable --now dps-agent",
    after_help = "Exit codes: 0 success; 1 failure (the message says why); 2 bad command line; \
75 temporary failure (DPS unreachable or throttling: try again later).\n\
Files: /etc/dps-agent/config.toml (+ config.d/*.toml), /var/lib/dps-agent/ (identity.json, operational-chain.pem)."
)]
struct Cli {
    /// Config file; drop-ins are read from config.d/ beside it.
    #[arg(long, short = 'c', global = true, env = "DPS_AGENT_CONFIG", default_value = config::DEFAULT_PATH, value_name = "PATH")]
    config: PathBuf,

    /// Log level for this run (error, warn, info, debug, trace); overrides [log] level.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<log::LevelFilter>,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Provision if needed, then keep the identity renewed (the daemon).
    ///
    /// Renews at notAfter - min(renew_before, lifetime/3) minus a random jitter,
    /// retries failures with backoff, and keeps the current identity until a new one
    /// is verified and committed. SIGHUP (or `dps-agent renew`) renews now;
    /// SIGTERM stops.
    ///
    /// With --once: provision if there is no valid stored identity, print a one-line
    /// summary and exit; a valid stored identity is used as is, without contacting DPS.
    Run {
        /// Provision if needed, print the result, exit.
        #[arg(long)]
        once: bool,
    },
    /// Ask the running daemon to renew the certificate now.
    ///
    /// The daemon renews with a fresh key whatever the schedule or a retry
    /// backoff says; the current identity stays in use until the new one is
    /// committed. (Equivalent: send SIGHUP to the daemon.)
    Renew,
    /// Show the device identity: ids, hub, key, certificate dates.
    Status {
        /// Print JSON (fields documented in the README) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Diagnose this gateway: config, key backend, bootstrap credential, stored
    /// identity (key matches certificate, chain, expiry, renewal time), clock, and
    /// DPS reachability (TCP and TLS). Prints OK/WARN/FAIL with a one-line fix each;
    /// exits 1 if anything FAILs. Changes nothing.
    Check,
    /// Check the config file and drop-ins, and the bootstrap credential they name
    /// (certificate matches key, CN = registration id, clientAuth, dates, chain);
    /// exit 0 if all is well, 1 with each problem and its fix otherwise. No network.
    CheckConfig {
        /// Check the config files only, not the bootstrap credential (for images
        /// built before the device's certificate and key are installed).
        #[arg(long)]
        config_only: bool,
    },
    /// Make a new key pair for onboarding and print its URI.
    ///
    /// The private key is made inside the backend and never leaves it; send the
    /// CSR (`dps-agent csr`) to your CA. Backend settings ([tpm], [pkcs11]) come from
    /// the config file when it can be read.
    ///
    /// Example: dps-agent keygen --backend file --out /etc/dps-agent/bootstrap/device.key
    Keygen {
        /// Where the key is made: file (a PEM file, mode 0600), tpm, pkcs11.
        #[arg(long, default_value = "file", value_parser = parse_backend)]
        backend: Backend,
        /// The key file to write (file, tpm), or the object label (pkcs11).
        #[arg(long, value_name = "PATH|LABEL")]
        out: String,
        /// Key algorithm.
        #[arg(long, default_value = "ecdsa-p384", value_parser = parse_algorithm)]
        algorithm: KeyAlgorithm,
    },
    /// Print a PKCS#10 certificate signing request for a key (for your CA to sign).
    ///
    /// Example: dps-agent csr --key file:/etc/dps-agent/bootstrap/device.key --cn gw-0001 --out device.csr
    Csr {
        /// The key's URI (file:…, tpm:…, pkcs11:…).
        #[arg(long, value_name = "URI")]
        key: String,
        /// The subject common name: the DPS registration id.
        #[arg(long, value_name = "REGID")]
        cn: String,
        /// Write the PEM here instead of standard output.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
    /// TPM facts for DPS TPM attestation ([tpm] tcti from the config file).
    #[command(subcommand)]
    Tpm(TpmCmd),
}

#[derive(Subcommand)]
enum TpmCmd {
    /// Print the endorsement key and the registration id an individual TPM
    /// enrollment needs.
    ///
    /// Prints the EK as base64 of its TPM2B_PUBLIC (what the Azure portal calls
    /// the endorsement key) and as PEM, and the registration id derived from it
    /// (lowercase base32 of its SHA-256, as the Azure IoT C SDK derives it). Put
    /// that id (or the one you give the enrollment) into [dps] registration_id.
    /// Creates and persists the EK at 0x81010001 from the TCG template if the TPM
    /// has none.
    Ek {
        /// Print JSON: {"endorsement_key", "registration_id", "pem"}.
        #[arg(long)]
        json: bool,
    },
}

fn parse_backend(s: &str) -> Result<Backend, String> {
    Backend::from_name(s).ok_or_else(|| "use file, tpm or pkcs11".to_string())
}

fn parse_algorithm(s: &str) -> Result<KeyAlgorithm, String> {
    KeyAlgorithm::from_name(s).ok_or_else(|| "use ecdsa-p384 or ecdsa-p256".to_string())
}

fn main() -> ExitCode {
    // Packaging only: `dps-agent generate-docs --out DIR` writes the man pages
    // and completions. Kept out of the clap definitions so that neither lists it.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 4 && args[1] == "generate-docs" && args[2] == "--out" {
        return match dps_agent::docs::generate(Cli::command(), Path::new(&args[3])) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                dps_agent::logging::print_fatal(&causes(&e));
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // The whole chain of causes, on one line.
            dps_agent::logging::print_fatal(&causes(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Check => {
            let c = match Config::load(&cli.config) {
                Ok(c) => c,
                Err(e) => {
                    println!("{:<5} {:<12} {e}", "FAIL", "config");
                    return Ok(ExitCode::FAILURE);
                }
            };
            init_logging(cli.log_level.unwrap_or(log::LevelFilter::Error));
            let rt = runtime()?;
            let findings = rt.block_on(dps_agent::check::run(&c, Arc::new(clock::SystemClock)));
            for f in &findings {
                println!("{f}");
            }
            match rt.block_on(bus::client::fetch_status(&c.dbus.bus)) {
                Ok(Some(s)) => println!("{:<5} {:<12} running, state {}", "OK", "daemon", s.state),
                _ => println!(
                    "{:<5} {:<12} not answering on the {} bus\n{:<18} fix: systemctl start dps-agent (journalctl -u dps-agent says why it stopped)",
                    "WARN",
                    "daemon",
                    bus::describe(&c.dbus.bus),
                    ""
                ),
            }
            let failed = findings
                .iter()
                .any(|f| f.verdict == dps_agent::check::Verdict::Fail);
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::CheckConfig { config_only } => {
            let c = Config::load(&cli.config)?;
            init_logging(cli.log_level.unwrap_or(log::LevelFilter::Warn));
            check_config(&c, config_only)
        }
        Cmd::Status { json } => {
            let c = Config::load(&cli.config)?;
            let from_daemon = runtime()?
                .block_on(bus::client::fetch_status(&c.dbus.bus))
                .unwrap_or_else(|e| {
                    log::debug!("no bus: {e}");
                    None
                });
            let status = match from_daemon {
                Some(s) => s,
                None => {
                    if !json {
                        eprintln!(
                            "(no dps-agent daemon answered on the {} bus; read from {})",
                            bus::describe(&c.dbus.bus),
                            c.state.dir.display()
                        );
                    }
                    let store = Store::open_read_only(&c.state.dir);
                    Status::from_store(&c.dps.registration_id, &store, clock::now())
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.to_text(clock::now()));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keygen {
            backend,
            out,
            algorithm,
        } => {
            init_logging(cli.log_level.unwrap_or(log::LevelFilter::Warn));
            let location = if backend == Backend::Pkcs11 {
                out
            } else {
                absolute(Path::new(&out))?.display().to_string()
            };
            let uri = key_backends(&cli.config).generate_at(backend, &location, algorithm)?;
            println!("{uri}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Csr { key, cn, out } => {
            init_logging(cli.log_level.unwrap_or(log::LevelFilter::Warn));
            let uri = KeyUri::parse(&key)?;
            let key = key_backends(&cli.config).open(&uri)?;
            let pem = Csr::build(key.as_ref(), &cn)?.to_pem();
            match out {
                Some(path) => {
                    std::fs::write(&path, pem)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
                None => print!("{pem}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Tpm(TpmCmd::Ek { json }) => {
            use base64::Engine as _;
            use dps_agent::keys::tpm;
            init_logging(cli.log_level.unwrap_or(log::LevelFilter::Warn));
            let ek = key_backends(&cli.config)
                .tpm()?
                .ek_public()
                .context("reading the endorsement key")?;
            let b64 = base64::engine::general_purpose::STANDARD.encode(&ek);
            let regid = tpm::registration_id_for_ek(&ek);
            let pem = tpm::ek_public_pem(&ek).map_err(|e| anyhow::anyhow!("the EK: {e}"))?;
            if json {
                let v = serde_json::json!({
                    "endorsement_key": b64,
                    "registration_id": regid,
                    "pem": pem,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "Endorsement key (TPM2B_PUBLIC, base64; the enrollment's \"Endorsement key\"):\n{b64}\n\n\
                     Registration id derived from it:\n{regid}\n\n\
                     Endorsement key (PEM):\n{pem}"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run { once } => {
            let c = Config::load(&cli.config)?;
            init_logging(cli.log_level.unwrap_or(c.log.level));
            if once {
                run_once(c)
            } else {
                // Say at start-up what is wrong with the bootstrap credential,
                // not only when a renewal needs it (no network involved).
                for f in bootstrap::check_config(&c, &key_backends(&cli.config), clock::now()) {
                    log::warn!("bootstrap credential: {f}");
                }
                run_daemon(c)
            }
        }
        Cmd::Renew => {
            let c = Config::load(&cli.config)?;
            match runtime()?.block_on(bus::client::request_renewal(&c.dbus.bus)) {
                Ok(true) => {
                    println!("the daemon is renewing now; follow it with `dps-agent status`");
                    return Ok(ExitCode::SUCCESS);
                }
                Ok(false) => {}
                Err(e @ (bus::BusError::Other(_) | bus::BusError::Call(_))) => return Err(e.into()),
                Err(e) => log::debug!("no bus: {e}"),
            }
            // No daemon on the bus: signal the one of this state directory.
            let pid = daemon::running_daemon(&c.state.dir).with_context(|| {
                format!(
                    "no dps-agent daemon is running for {} (start it with `systemctl start dps-agent`)",
                    c.state.dir.display()
                )
            })?;
            signal_hup(pid)?;
            println!(
                "asked the daemon (pid {pid}) to renew now; follow it with `dps-agent status`"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `check-config`: the config, then the bootstrap credential it names (the
/// certificate file and the key are read; nothing goes over the network).
fn check_config(c: &Config, config_only: bool) -> anyhow::Result<ExitCode> {
    let files: Vec<String> = c.files.iter().map(|f| f.display().to_string()).collect();
    println!("{}: OK", files.join(", "));
    if config_only {
        return Ok(ExitCode::SUCCESS);
    }
    let config::Attestation::X509 {
        identity_cert,
        identity_key,
    } = &c.dps.attestation
    else {
        return Ok(ExitCode::SUCCESS);
    };
    let keys = Keys::new(KeySettings::from_config(c));
    let now = clock::now();
    let findings = bootstrap::check_config(c, &keys, now);
    if findings.is_empty() {
        let key = keys.open(identity_key)?;
        let algorithm = key.algorithm();
        let b = bootstrap::load(
            identity_cert,
            key,
            &c.dps.registration_id,
            now,
            c.operational.max_clock_skew.as_secs(),
        )?;
        println!(
            "bootstrap credential: OK: {} ({algorithm} key {identity_key}), valid until {}; presents {} of the {} certificate(s) in {}{}",
            b.subject,
            rfc3339(b.not_after),
            b.presented,
            b.chain_len,
            identity_cert.display(),
            if b.presented < b.chain_len { " (not the root)" } else { "" }
        );
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "dps-agent: error: the bootstrap credential has {} problem{}:",
        findings.len(),
        if findings.len() == 1 { "" } else { "s" }
    );
    for f in &findings {
        eprintln!("  - {}\n    fix: {}", f.problem, f.fix);
    }
    Ok(ExitCode::FAILURE)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run_daemon(config: Config) -> anyhow::Result<ExitCode> {
    let runtime = runtime()?;
    let result = runtime.block_on(async {
        let agent = Arc::new(Agent::open(config)?);
        // Signal handlers first: a SIGHUP must never find the default action.
        let (tx, rx) = mpsc::channel(8);
        forward_signals(tx.clone())?;
        let bus_name = bus::describe(&agent.config().dbus.bus);
        let _bus = match bus::serve(&agent.config().dbus.bus, agent.status(), tx).await {
            Ok(conn) => {
                log::info!("serving {} on the {bus_name} bus", bus::BUS_NAME);
                Some(conn)
            }
            Err(e) => {
                log::warn!("{e}; local apps cannot query the agent over D-Bus, provisioning and renewal go on");
                None
            }
        };
        let pid_file = daemon::write_pid_file(agent.store().dir())
            .context("writing the pid file in the state directory")?;
        log::info!(
            "dps-agent {} started (pid {})",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        );
        // READY=1 now (also without the bus: provisioning and renewal go on).
        let service = dps_agent::notify::Service::start(agent.status(), _bus.is_some());
        daemon::run(agent, rx).await;
        service.stopping();
        let _ = std::fs::remove_file(pid_file);
        log::info!("dps-agent stopped");
        anyhow::Ok(())
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result.map(|()| ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT stop the daemon; SIGHUP renews now.
fn forward_signals(tx: mpsc::Sender<Command>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            let cmd = tokio::select! {
                _ = term.recv() => Command::Stop,
                _ = int.recv() => Command::Stop,
                _ = hup.recv() => { log::info!("SIGHUP: renewing now"); Command::Renew }
            };
            if tx.send(cmd).await.is_err() || cmd == Command::Stop {
                break;
            }
        }
    });
    Ok(())
}

fn signal_hup(pid: u32) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    anyhow::ensure!(
        status.success(),
        "could not signal pid {pid} (are you root?)"
    );
    Ok(())
}

fn run_once(config: Config) -> anyhow::Result<ExitCode> {
    let runtime = runtime()?;
    let agent = Agent::open(config)?;
    if let Some(id) = agent.usable_identity()? {
        println!(
            "{}: already provisioned as device {} on {}; certificate valid until {} (no DPS contact)",
            id.registration_id,
            id.device_id,
            id.assigned_hub,
            rfc3339(id.not_after)
        );
        return Ok(ExitCode::SUCCESS);
    }
    match runtime.block_on(agent.attempt(Reason::NoIdentity)) {
        Ok(id) => {
            println!(
                "{}: provisioned as device {} on {}; certificate valid until {}; chain in {}",
                id.registration_id,
                id.device_id,
                id.assigned_hub,
                rfc3339(id.not_after),
                agent.store().chain_path().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            dps_agent::logging::print_fatal(&format!("provisioning failed: {}", causes(&e)));
            log::debug!("details: {e:?}");
            Ok(if e.is_transient() {
                ExitCode::from(EXIT_TEMPFAIL)
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// The key backends, with [tpm]/[pkcs11] settings from the config when it can be
/// read (keygen and csr also work before the config is filled in).
fn key_backends(config: &Path) -> Keys {
    let settings = match Config::load(config) {
        Ok(c) => KeySettings::from_config(&c),
        Err(e) => {
            log::warn!("using default key backend settings: {e}");
            KeySettings {
                key_dir: PathBuf::from("/var/lib/dps-agent/keys"),
                tcti: "device:/dev/tpmrm0".into(),
                pkcs11: Default::default(),
            }
        }
    };
    Keys::new(settings)
}

/// An error and its causes on one line, each cause shown once (a message that
/// already quotes its cause is not followed by it again).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = c.source();
    }
    out
}

fn init_logging(level: log::LevelFilter) {
    dps_agent::logging::init(level);
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}
