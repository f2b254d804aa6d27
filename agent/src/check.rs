//! `dps-agent check`: diagnostics for an admin. Each check prints OK, WARN or
//! FAIL with what it saw and, when something is wrong, the fix in one line.
//! Read-only: it never changes the state directory, keys or tokens.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::bootstrap;
use crate::chain::{self, Expectations};
use crate::clock::{rfc3339, Clock};
use crate::config::{Attestation, Config, Enrollment, SymmetricKeySource};
use crate::dps::{read_key_file, CredentialError};
use crate::keys::{Backend, KeySettings, Keys};
use crate::lifecycle::schedule::{self, Policy};
use crate::status::human_delta;
use crate::store::lifecycle::LifecycleState;
use crate::store::Store;
use crate::tls;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Verdict::Ok => "OK",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub verdict: Verdict,
    /// Short name of what was checked.
    pub what: &'static str,
    /// What was seen.
    pub detail: String,
    /// What to do (empty when nothing needs doing).
    pub fix: String,
}

impl Finding {
    fn ok(what: &'static str, detail: impl Into<String>) -> Finding {
        Finding {
            verdict: Verdict::Ok,
            what,
            detail: detail.into(),
            fix: String::new(),
        }
    }

    fn warn(what: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            verdict: Verdict::Warn,
            what,
            detail: detail.into(),
            fix: fix.into(),
        }
    }

    fn fail(what: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            verdict: Verdict::Fail,
            what,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<5} {:<12} {}", self.verdict, self.what, self.detail)?;
        if !self.fix.is_empty() {
            write!(f, "\n{:<18} fix: {}", "", self.fix)?;
        }
        Ok(())
    }
}

/// Runs every check against `config`.
pub async fn run(config: &Config, clock: Arc<dyn Clock>) -> Vec<Finding> {
    let mut out = vec![Finding::ok(
        "config",
        format!(
            "{} is valid",
            config
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(" + ")
        ),
    )];
    let now = clock.now();
    let keys = Keys::new(KeySettings::from_config(config));
    out.push(key_backend(config, &keys));
    let bootstrap_tls = bootstrap_credential(config, &keys, now, &mut out);
    identity(config, &keys, clock.as_ref(), &mut out);
    out.push(dps_endpoint(config, bootstrap_tls).await);
    out
}

fn key_backend(config: &Config, keys: &Keys) -> Finding {
    let backend = config.operational.key_backend;
    match keys.store(backend) {
        Ok(_) => Finding::ok(
            "key backend",
            match backend {
                Backend::Tpm => format!("TPM reachable ({})", config.tpm.tcti),
                Backend::Pkcs11 => "PKCS#11 token reachable".to_string(),
                Backend::File => "file (for development and tests only)".to_string(),
            },
        ),
        Err(e) => Finding::fail(
            "key backend",
            e.to_string(),
            "fix the backend settings ([operational] key_backend, [tpm] or [pkcs11]) or the device",
        ),
    }
}

/// Checks the bootstrap credential; returns the TLS config it gives, if usable.
fn bootstrap_credential(
    config: &Config,
    keys: &Keys,
    now: i64,
    out: &mut Vec<Finding>,
) -> Option<Arc<rustls::ClientConfig>> {
    match &config.dps.attestation {
        Attestation::X509 {
            identity_cert,
            identity_key,
        } => {
            let problems = bootstrap::check_config(config, keys, now);
            if !problems.is_empty() {
                for p in problems {
                    out.push(Finding::fail("bootstrap", p.problem, p.fix));
                }
                return None;
            }
            let key = match keys.open(identity_key) {
                Ok(k) => k,
                Err(e) => {
                    out.push(Finding::fail(
                        "bootstrap",
                        format!("key {identity_key}: {e}"),
                        "point [dps.attestation] identity_key at the bootstrap certificate's key",
                    ));
                    return None;
                }
            };
            match bootstrap::load(
                identity_cert,
                key,
                &config.dps.registration_id,
                now,
                config.operational.max_clock_skew.as_secs(),
            ) {
                Ok(b) => {
                    let left = b.not_after - now;
                    let finding = format!("{} (valid until {})", b.subject, rfc3339(b.not_after));
                    out.push(if left < 30 * 86_400 {
                        Finding::warn(
                            "bootstrap",
                            finding,
                            format!(
                                "the bootstrap certificate expires in {}: renewals need it; ask your CA for a new one",
                                human_delta(left)
                            ),
                        )
                    } else {
                        Finding::ok("bootstrap", finding)
                    });
                    match tls::client_config(&config.dps.trust_bundle, Some(b.identity)) {
                        Ok(t) => Some(t),
                        Err(e) => {
                            out.push(Finding::fail(
                                "trust",
                                e.to_string(),
                                "set [dps] trust_bundle to a PEM file with the CAs of the DPS server",
                            ));
                            None
                        }
                    }
                }
                Err(e) => {
                    out.push(Finding::fail("bootstrap", e.to_string(), "see the message"));
                    None
                }
            }
        }
        other => {
            // Symmetric key or TPM attestation: no client certificate in TLS.
            out.push(match other {
                Attestation::SymmetricKey { key, enrollment } => {
                    symmetric_key(keys, key, *enrollment)
                }
                other => Finding::ok(
                    "bootstrap",
                    format!("attestation method {}", other.method()),
                ),
            });
            match tls::client_config(&config.dps.trust_bundle, None) {
                Ok(t) => Some(t),
                Err(e) => {
                    out.push(Finding::fail(
                        "trust",
                        e.to_string(),
                        "set [dps] trust_bundle to a PEM file with the CAs of the DPS server",
                    ));
                    None
                }
            }
        }
    }
}

/// The symmetric key, read or found as provisioning would (a file: mode and
/// base64; a token: the secret key exists and can make an HMAC).
fn symmetric_key(keys: &Keys, key: &SymmetricKeySource, enrollment: Enrollment) -> Finding {
    let kind = match enrollment {
        Enrollment::Individual => "individual",
        Enrollment::Group => "group",
    };
    match key {
        SymmetricKeySource::File(path) => match read_key_file(path) {
            Ok(_) => Finding::ok(
                "bootstrap",
                format!(
                    "symmetric key of the {kind} enrollment in {} (base64, mode 0600)",
                    path.display()
                ),
            ),
            Err(CredentialError::KeyFile { path, problem, fix }) => Finding::fail(
                "bootstrap",
                format!("[dps.attestation] key_file {}: {problem}", path.display()),
                fix,
            ),
            Err(e) => Finding::fail("bootstrap", e.to_string(), "see the message"),
        },
        SymmetricKeySource::Token(uri) => match keys
            .pkcs11()
            .open_secret(uri)
            .and_then(|s| s.hmac_sha256(b"dps-agent check"))
        {
            Ok(_) => Finding::ok(
                "bootstrap",
                format!(
                    "symmetric key of the {kind} enrollment in the PKCS#11 token ({}), HMAC-SHA256 works",
                    uri.redacted()
                ),
            ),
            Err(e) => Finding::fail(
                "bootstrap",
                format!("[dps.attestation] key_file {}: {e}", uri.redacted()),
                "import the enrollment's key into the token as a secret key that may sign (CKK_GENERIC_SECRET, CKA_SIGN), or fix the URI",
            ),
        },
    }
}

fn identity(config: &Config, keys: &Keys, clock: &dyn Clock, out: &mut Vec<Finding>) {
    let store = Store::open_read_only(&config.state.dir);
    let id = match store.load_identity() {
        Ok(Some(id)) => id,
        Ok(None) => {
            out.push(Finding::warn(
                "identity",
                format!("none in {}", config.state.dir.display()),
                "start the daemon (systemctl start dps-agent) or run `dps-agent run --once`",
            ));
            return;
        }
        Err(e) => {
            out.push(Finding::fail(
                "identity",
                e.to_string(),
                "move the damaged file away; the agent provisions again",
            ));
            return;
        }
    };
    let now = clock.now();
    out.push(Finding::ok(
        "identity",
        format!("device {} on {}", id.device_id, id.assigned_hub),
    ));

    // The key is there and is the leaf's key.
    let key = match keys.open(&id.key_uri) {
        Ok(k) => k,
        Err(e) => {
            out.push(Finding::fail(
                "key",
                format!("{}: {e}", id.key_uri),
                "the key is gone or unreadable: `dps-agent renew` provisions a new one (or move identity.json away)",
            ));
            return;
        }
    };
    let certs = chain::certs_from_pem(&id.chain_pem).unwrap_or_default();
    // The stored chain is ordered: its first certificate is the leaf.
    let leaf_spki = certs
        .first()
        .and_then(|c| chain::spki_of(c))
        .unwrap_or_default();
    if leaf_spki != key.public_key_der() {
        out.push(Finding::fail(
            "key",
            format!("{} does not match the stored certificate", id.key_uri),
            "renew to get a certificate for a fresh key: `dps-agent renew` (or move identity.json away and restart)",
        ));
    }
    let verdict = chain::verify(
        &certs,
        &Expectations {
            leaf_spki: &leaf_spki,
            common_name: Some(&id.registration_id),
            now,
            max_skew_secs: config.operational.max_clock_skew.as_secs(),
            require_issuer: true,
        },
    );
    match verdict {
        Ok(v) => {
            if leaf_spki == key.public_key_der() {
                out.push(Finding::ok("key", format!("{} matches the certificate", id.key_uri)));
            }
            out.push(Finding::ok(
                "chain",
                format!("{} certificate(s), each signed by the next; issued by {}", v.certs.len(), v.issuer),
            ));
        }
        Err(e @ chain::ChainError::Expired { .. }) => out.push(Finding::fail(
            "chain",
            e.to_string(),
            "start the daemon: an expired identity is provisioned again with the bootstrap credential",
        )),
        Err(e) => out.push(Finding::fail("chain", e.to_string(), "renew: `dps-agent renew`")),
    }

    // Expiry and renewal time.
    let policy = Policy::from_config(&config.operational);
    let record = LifecycleState::load(store.dir()).unwrap_or_default();
    let renew_at = record
        .schedule
        .filter(|s| s.thumbprint == id.thumbprint)
        .map(|s| s.renew_at_ms.div_euclid(1000))
        .unwrap_or_else(|| {
            schedule::schedule(
                &id.thumbprint,
                id.not_before,
                id.not_after,
                id.issued_at,
                &policy,
                |_| 0,
            )
            .renew_at_ms
            .div_euclid(1000)
        });
    let left = id.not_after - now;
    let detail = format!(
        "valid until {} (in {}), renewal at {} (in {})",
        rfc3339(id.not_after),
        human_delta(left),
        rfc3339(renew_at),
        human_delta(renew_at - now)
    );
    out.push(if left <= 0 {
        Finding::fail("expiry", detail, "start the daemon so it provisions again")
    } else if now > renew_at + 3600 {
        Finding::warn(
            "expiry",
            detail,
            "the renewal is overdue: see `dps-agent status` (last_error) and the journal",
        )
    } else {
        Finding::ok("expiry", detail)
    });

    // The clock: not before the certificate, not before the last issuance.
    let skew = config.operational.max_clock_skew.as_secs() as i64;
    if now + skew < id.not_before || now + skew < id.issued_at {
        out.push(Finding::fail(
            "clock",
            format!(
                "the clock says {} but the certificate was issued at {}",
                rfc3339(now),
                rfc3339(id.issued_at.max(id.not_before))
            ),
            "set the clock (timedatectl set-ntp true) before anything else",
        ));
    } else {
        out.push(Finding::ok(
            "clock",
            format!("{} is after the certificate's issuance", rfc3339(now)),
        ));
    }
}

async fn dps_endpoint(config: &Config, tls: Option<Arc<rustls::ClientConfig>>) -> Finding {
    let ep = &config.dps.endpoint;
    let connect = tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect((ep.host.as_str(), ep.port)),
    )
    .await;
    let tcp = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Finding::fail(
                "dps",
                format!("cannot connect to {ep}: {e}"),
                "check the network, DNS and firewall (outbound TCP to the DPS port), and [dps] global_endpoint",
            )
        }
        Err(_) => {
            return Finding::fail(
                "dps",
                format!("no TCP answer from {ep} within 5 s"),
                "check the network and firewall (outbound TCP to the DPS port)",
            )
        }
    };
    let Some(tls) = tls else {
        return Finding::warn(
            "dps",
            format!("{ep} reachable over TCP"),
            "fix the bootstrap credential to test TLS too",
        );
    };
    let name = match rustls_pki_types::ServerName::try_from(ep.host.clone()) {
        Ok(n) => n,
        Err(e) => {
            return Finding::fail(
                "dps",
                format!("{}: {e}", ep.host),
                "fix [dps] global_endpoint",
            )
        }
    };
    let connector = tokio_rustls::TlsConnector::from(tls);
    match tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp)).await {
        Ok(Ok(_)) => Finding::ok("dps", format!("{ep}: TCP and TLS handshake OK")),
        Ok(Err(e)) => {
            let fix = match tls::find_rustls_error(&e) {
                Some(rustls::Error::InvalidCertificate(_)) => {
                    "the server's certificate is not trusted: check [dps] trust_bundle and the clock"
                }
                _ => "check [dps] global_endpoint and the network (a TLS-intercepting proxy?)",
            };
            Finding::fail("dps", format!("{ep}: TLS handshake failed: {e}"), fix)
        }
        Err(_) => Finding::fail(
            "dps",
            format!("{ep}: no TLS handshake within 10 s"),
            "check the network",
        ),
    }
}
