//! The `dps-sim` command line: `pki` writes a test PKI, `serve` runs the simulator until
//! SIGTERM/SIGINT. Parsing and wiring only; the work is in the library modules.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use dps_sim::auth::{NamedKey, TpmEnrollment};
use dps_sim::duration::HumanDuration;
use dps_sim::faults::Fault;
use dps_sim::pki;
use dps_sim::server::{self, ServeOptions};
use tokio::signal::unix::{signal, SignalKind};

/// Azure DPS device-protocol simulator (MQTT 3.1.1 over TLS, and HTTPS) for tests and demos.
#[derive(Debug, Parser)]
#[command(name = "dps-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a complete test PKI (bootstrap CAs and device certificates, TLS server identity,
    /// issuing CAs) into a directory.
    Pki(PkiArgs),
    /// Run the simulator until SIGTERM or SIGINT.
    Serve(Box<ServeArgs>),
}

#[derive(Debug, clap::Args)]
struct PkiArgs {
    /// Directory to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Registration id to make a bootstrap device certificate for (repeatable; default gw-0001).
    #[arg(long = "registration-id", value_name = "ID")]
    registration_ids: Vec<String>,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// PKI directory written by `dps-sim pki`.
    #[arg(long, value_name = "DIR")]
    pki: PathBuf,
    /// Written atomically once listening: {"mqtt_port": <u16>, "https_port": <u16>,
    /// "hub_port": <u16>|null, "pid": <u32>}.
    #[arg(long, value_name = "PATH")]
    ready_file: PathBuf,
    /// JSON Lines events file (truncated at start).
    #[arg(long, value_name = "PATH")]
    events: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    listen: IpAddr,
    /// Port for MQTT over TLS; 0 lets the OS choose (see the ready file).
    #[arg(long, default_value_t = 0)]
    mqtt_port: u16,
    /// Port for DPS over HTTPS; 0 lets the OS choose (see the ready file).
    #[arg(long, default_value_t = 0)]
    https_port: u16,
    /// ID scope devices must put in their username.
    #[arg(long, default_value = "0ne00000000")]
    id_scope: String,
    /// CA certificate (PEM) the enrollment trusts for X.509 onboarding; repeatable.
    /// Default: DIR/bootstrap-root.pem.
    #[arg(long = "trust-ca", value_name = "PEM")]
    trust_ca: Vec<PathBuf>,
    /// assignedHub in the registration result; also the host name the simulated hub expects
    /// in usernames.
    #[arg(long, default_value = "localhost")]
    assigned_hub: String,
    /// Seconds in the retry-after topic property of 202 and 429 answers (0 allowed).
    #[arg(long, default_value_t = 1, value_name = "SECS")]
    retry_after: u64,
    /// Polls answered 202 "assigning" before the final 200.
    #[arg(long, default_value_t = 1, value_name = "N")]
    polls_before_assign: u32,
    /// Lifetime of issued certificates: 30s, 15m, 12h, 30d ...
    #[arg(long, default_value = "30d", value_name = "DUR")]
    cert_validity: HumanDuration,
    /// Fault to inject (repeatable).
    #[arg(long = "fault", value_name = "NAME", help = fault_help())]
    faults: Vec<Fault>,
    /// File re-read on every request: one fault name per line, `#` comments. While it exists
    /// it replaces the --fault set.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Also run the IoT Hub simulator (MQTT over TLS) on this port; 0 lets the OS choose (see
    /// the ready file). Without this flag no hub listens.
    #[arg(long, value_name = "PORT")]
    hub_port: Option<u16>,
    /// Where the hub writes the device twins (JSON, atomically) after every change.
    #[arg(long, value_name = "PATH", requires = "hub_port")]
    twin_file: Option<PathBuf>,
    /// Individual symmetric-key enrollment: the registration id and its key (base64);
    /// repeatable.
    #[arg(long = "symmetric-key", value_name = "REGID=BASE64KEY")]
    symmetric_keys: Vec<NamedKey>,
    /// Symmetric-key enrollment group: a name and the group key (base64); any registration id
    /// whose SAS token is signed with HMAC-SHA256(group key, registration id) is accepted.
    /// Repeatable.
    #[arg(long = "group-key", value_name = "NAME=BASE64KEY")]
    group_keys: Vec<NamedKey>,
    /// TPM enrollment: the registration id and the endorsement key as base64 TPM2B_PUBLIC
    /// (what `dps-agent tpm ek` prints), or @FILE holding it; repeatable.
    #[arg(long = "tpm-enrollment", value_name = "REGID=EK")]
    tpm_enrollments: Vec<TpmEnrollment>,
    /// Moves the simulator's clock for SAS expiry checks (e.g. 10m: tokens expire 10 minutes
    /// early, as for a device whose clock is 10 minutes behind; -10m the other way).
    #[arg(long, value_name = "[-]DUR", allow_hyphen_values = true)]
    clock_offset: Option<String>,
}

/// `[-]DUR` in seconds, e.g. `10m`, `-90s`.
fn parse_offset(text: &str) -> anyhow::Result<i64> {
    let (sign, rest) = match text.strip_prefix('-') {
        Some(r) => (-1, r),
        None => (1, text.strip_prefix('+').unwrap_or(text)),
    };
    let d: HumanDuration = rest
        .parse()
        .map_err(|e| anyhow::anyhow!("--clock-offset {text:?}: {e}"))?;
    Ok(sign * i64::try_from(d.as_duration().as_secs()).unwrap_or(i64::MAX))
}

fn fault_help() -> String {
    format!("Fault to inject (repeatable): {}", Fault::valid_names())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pki(args) => run_pki(args),
        Command::Serve(args) => run_serve(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dps-sim: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_pki(args: PkiArgs) -> anyhow::Result<()> {
    let ids = if args.registration_ids.is_empty() {
        vec![pki::DEFAULT_REGISTRATION_ID.to_string()]
    } else {
        args.registration_ids
    };
    let written = pki::generate(&args.out, &ids, args.force)?;
    for file in written {
        println!("{}", file.display());
    }
    Ok(())
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let opts = ServeOptions {
        pki: args.pki,
        ready_file: args.ready_file,
        events: args.events,
        listen: args.listen,
        mqtt_port: args.mqtt_port,
        https_port: args.https_port,
        id_scope: args.id_scope,
        trust_ca: args.trust_ca,
        assigned_hub: args.assigned_hub,
        retry_after: args.retry_after,
        polls_before_assign: args.polls_before_assign,
        cert_validity: args.cert_validity,
        faults: args.faults,
        control: args.control,
        hub_port: args.hub_port,
        twin_file: args.twin_file,
        symmetric_keys: args.symmetric_keys,
        group_keys: args.group_keys,
        tpm_enrollments: args.tpm_enrollments,
        clock_offset: match args.clock_offset.as_deref() {
            None => 0,
            Some(text) => parse_offset(text)?,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        server::serve(opts, stop).await
    })
}
