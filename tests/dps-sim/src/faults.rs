//! Fault injection: the names a test can switch on (`--fault NAME`, or one name per line in the
//! `--control` file) and the set that is active for one request or connection. This module only
//! says *which* faults are on; `dps.rs` decides what each one does to a DPS answer or an issued
//! chain, `server.rs` / `tls.rs` apply the connection-level ones (`mitm`, `hub-unreachable`) and
//! `hub_mqtt.rs` applies `reject-cert` and `hub-csr-unavailable`.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// One misbehaviour of the simulated DPS or IoT Hub. Add a variant here, to [`Fault::ALL`] and
/// to [`Fault::name`], then give it an effect (`dps.rs` for DPS answers and issuance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// First register of each registration id and first poll of each operation get 429.
    Throttle,
    /// First register of each registration id gets 500.
    ServerError,
    /// At least 3 polls are answered `assigning` before the final answer.
    SlowAssign,
    /// The final answer has `"status":"failed"` (errorCode 400207) and no chain.
    StatusFailed,
    /// The final answer has `"status":"disabled"` and no chain.
    StatusDisabled,
    /// The final 200 body is cut in the middle of `registrationState`.
    MalformedJson,
    /// The issued leaf carries a freshly generated public key, not the CSR's.
    WrongKeyCert,
    /// The leaf is signed by the real issuing CA, but the chain after it is an unrelated CA pair.
    BadChain,
    /// The whole chain (leaf included) comes from an unrelated, internally consistent CA pair.
    ForeignChain,
    /// The leaf expired a day ago (notBefore now - 2 d, notAfter now - 1 d).
    ExpiredCert,
    /// The leaf becomes valid tomorrow (notBefore now + 1 d, notAfter now + 30 d).
    NotYetValidCert,
    /// `issuedCertificateChain` holds only the leaf.
    TruncatedChain,
    /// The leaf is valid for 30 s (overrides `--cert-validity`).
    ShortLived,
    /// Every register is answered 429 with `retry-after=7200`.
    RetryAfterLarge,
    /// The first register of each registration id: the connection is closed, no answer.
    DropAfterRegister,
    /// The final 200 body is padded beyond DPS's 96 KB message limit.
    OversizeResponse,
    /// A register carrying a CSR gets 400, errorCode 400040.
    CsrReject,
    /// Every DPS answer body gets fields the device API does not define (yet): `futureField`
    /// and `connectionProfile` at the top level and in `registrationState`.
    ExtraFields,
    /// The TLS server presents a certificate for another host name (wrong-host.example.net).
    Mitm,
    /// IoT Hub: every device connection gets CONNACK 5.
    RejectCert,
    /// IoT Hub: TCP connections are accepted and closed at once, before TLS.
    HubUnreachable,
    /// IoT Hub: every certificate request (`issueCertificate`) is answered 503, errorCode 503001.
    HubCsrUnavailable,
}

impl Fault {
    /// Every fault, in the order they are listed in help and error messages.
    pub const ALL: &'static [Fault] = &[
        Fault::Throttle,
        Fault::ServerError,
        Fault::SlowAssign,
        Fault::StatusFailed,
        Fault::StatusDisabled,
        Fault::MalformedJson,
        Fault::WrongKeyCert,
        Fault::BadChain,
        Fault::ForeignChain,
        Fault::ExpiredCert,
        Fault::NotYetValidCert,
        Fault::TruncatedChain,
        Fault::ShortLived,
        Fault::RetryAfterLarge,
        Fault::DropAfterRegister,
        Fault::OversizeResponse,
        Fault::CsrReject,
        Fault::ExtraFields,
        Fault::Mitm,
        Fault::RejectCert,
        Fault::HubUnreachable,
        Fault::HubCsrUnavailable,
    ];

    /// The name used on the command line, in the control file and in events.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Throttle => "throttle",
            Fault::ServerError => "server-error",
            Fault::SlowAssign => "slow-assign",
            Fault::StatusFailed => "status-failed",
            Fault::StatusDisabled => "status-disabled",
            Fault::MalformedJson => "malformed-json",
            Fault::WrongKeyCert => "wrong-key-cert",
            Fault::BadChain => "bad-chain",
            Fault::ForeignChain => "foreign-chain",
            Fault::ExpiredCert => "expired-cert",
            Fault::NotYetValidCert => "not-yet-valid-cert",
            Fault::TruncatedChain => "truncated-chain",
            Fault::ShortLived => "short-lived",
            Fault::RetryAfterLarge => "retry-after-large",
            Fault::DropAfterRegister => "drop-after-register",
            Fault::OversizeResponse => "oversize-response",
            Fault::CsrReject => "csr-reject",
            Fault::ExtraFields => "extra-fields",
            Fault::Mitm => "mitm",
            Fault::RejectCert => "reject-cert",
            Fault::HubUnreachable => "hub-unreachable",
            Fault::HubCsrUnavailable => "hub-csr-unavailable",
        }
    }

    /// All valid names, comma separated (for help texts and errors).
    pub fn valid_names() -> String {
        Fault::ALL
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The faults that change an issued certificate or its chain (reported in `issued` events).
pub const ISSUANCE: &[Fault] = &[
    Fault::WrongKeyCert,
    Fault::BadChain,
    Fault::ForeignChain,
    Fault::ExpiredCert,
    Fault::NotYetValidCert,
    Fault::TruncatedChain,
    Fault::ShortLived,
];

/// A fault name that is not in [`Fault::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown fault {name:?}; valid faults are: {valid}")]
pub struct UnknownFault {
    pub name: String,
    pub valid: String,
}

impl FromStr for Fault {
    type Err = UnknownFault;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim();
        Fault::ALL
            .iter()
            .copied()
            .find(|f| f.name() == wanted)
            .ok_or_else(|| UnknownFault {
                name: wanted.to_string(),
                valid: Fault::valid_names(),
            })
    }
}

/// The faults active for one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultSet(BTreeSet<Fault>);

impl FaultSet {
    pub fn new(faults: impl IntoIterator<Item = Fault>) -> Self {
        FaultSet(faults.into_iter().collect())
    }

    pub fn contains(&self, fault: Fault) -> bool {
        self.0.contains(&fault)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = Fault> + '_ {
        self.0.iter().copied()
    }
}

/// The `fault` field of an event: `null`, one name, or several names joined by `,` (in
/// [`Fault::ALL`] order) when more than one fault shaped the answer.
pub fn event_field(faults: &[Fault]) -> Option<String> {
    if faults.is_empty() {
        return None;
    }
    let mut sorted = faults.to_vec();
    sorted.sort();
    sorted.dedup();
    Some(
        sorted
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// A bad line in the control file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {source}")]
pub struct ControlLineError {
    pub line: usize,
    #[source]
    pub source: UnknownFault,
}

/// Parses control-file text: one fault name per line; blank lines and everything after `#`
/// are ignored. Returns the valid faults and the errors for the other lines.
pub fn parse_control(text: &str) -> (FaultSet, Vec<ControlLineError>) {
    let mut set = BTreeSet::new();
    let mut errors = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match line.parse::<Fault>() {
            Ok(f) => {
                set.insert(f);
            }
            Err(source) => errors.push(ControlLineError {
                line: index + 1,
                source,
            }),
        }
    }
    (FaultSet(set), errors)
}

/// Where the active fault set comes from: the command line, replaced by the control file
/// while that file exists.
#[derive(Debug, Clone, Default)]
pub struct FaultSource {
    cli: FaultSet,
    control: Option<PathBuf>,
}

impl FaultSource {
    pub fn new(cli: FaultSet, control: Option<PathBuf>) -> Self {
        FaultSource { cli, control }
    }

    /// The faults for the next request. Re-reads the control file every time, so tests can
    /// switch faults at run time (write it with temp + rename to avoid torn reads). Bad lines
    /// are reported on stderr and skipped.
    pub async fn current(&self) -> FaultSet {
        let Some(path) = &self.control else {
            return self.cli.clone();
        };
        match tokio::fs::read_to_string(path).await {
            Ok(text) => {
                let (set, errors) = parse_control(&text);
                for e in errors {
                    eprintln!(
                        "dps-sim: control file {}: {e} (line ignored)",
                        path.display()
                    );
                }
                set
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.cli.clone(),
            Err(e) => {
                eprintln!(
                    "dps-sim: cannot read control file {}: {e}; using the --fault set",
                    path.display()
                );
                self.cli.clone()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips() {
        for f in Fault::ALL {
            assert_eq!(f.name().parse::<Fault>(), Ok(*f));
            assert_eq!(f.to_string(), f.name());
        }
    }

    #[test]
    fn unknown_fault_lists_valid_names() {
        let err = "trottle".parse::<Fault>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"trottle\""), "{msg}");
        for f in Fault::ALL {
            assert!(msg.contains(f.name()), "{msg} lacks {f}");
        }
    }

    #[test]
    fn names_are_unique_and_all_listed() {
        let mut names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Fault::ALL.len());
        assert_eq!(Fault::ALL.len(), 22);
    }

    #[test]
    fn event_field_joins_in_declaration_order() {
        assert_eq!(event_field(&[]), None);
        assert_eq!(event_field(&[Fault::Mitm]).as_deref(), Some("mitm"));
        assert_eq!(
            event_field(&[
                Fault::TruncatedChain,
                Fault::ExpiredCert,
                Fault::ExpiredCert
            ])
            .as_deref(),
            Some("expired-cert,truncated-chain")
        );
    }

    #[test]
    fn names_are_case_sensitive_but_trimmed() {
        assert_eq!(" throttle ".parse::<Fault>(), Ok(Fault::Throttle));
        assert!("Throttle".parse::<Fault>().is_err());
    }

    #[test]
    fn control_file_comments_blank_lines_and_errors() {
        let text =
            "# faults for test 3\nthrottle\n\n  slow-assign   # slower\nbogus\n#server-error\n";
        let (set, errors) = parse_control(text);
        assert_eq!(set, FaultSet::new([Fault::Throttle, Fault::SlowAssign]));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, 5);
        assert_eq!(errors[0].source.name, "bogus");
    }

    #[tokio::test]
    async fn control_file_replaces_cli_set_while_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faults");
        let source = FaultSource::new(FaultSet::new([Fault::Throttle]), Some(path.clone()));
        assert!(source.current().await.contains(Fault::Throttle));
        std::fs::write(&path, "status-failed\n").unwrap();
        let set = source.current().await;
        assert!(set.contains(Fault::StatusFailed));
        assert!(!set.contains(Fault::Throttle));
        std::fs::write(&path, "").unwrap();
        assert!(source.current().await.is_empty());
        std::fs::remove_file(&path).unwrap();
        assert!(source.current().await.contains(Fault::Throttle));
    }
}
