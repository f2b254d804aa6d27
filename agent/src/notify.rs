//! sd_notify(3) for `Type=notify` services, implemented over the datagram
//! socket in `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket):
//! `READY=1` once the daemon is up, `STATUS=` following the agent's
//! [`Status`], `WATCHDOG=1` every `$WATCHDOG_USEC / 2` from the async runtime
//! (so a wedged runtime stops the pings and systemd restarts the service), and
//! `STOPPING=1` on shutdown.
//!
//! Not started by systemd (no `$NOTIFY_SOCKET`), everything here is a no-op.
//! Sends never block: a datagram the manager cannot take now is dropped with a
//! warning. Never sends anything but state words and the status line.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::{self, rfc3339, UnixTime};
use crate::status::Status;

/// Longest error text shown in `STATUS=` (the whole error is in the log).
const STATUS_ERROR_MAX: usize = 160;

/// Problems talking to the service manager.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("$NOTIFY_SOCKET={0:?} is neither an absolute path nor an abstract socket (@name)")]
    BadAddress(String),
    #[error("$NOTIFY_SOCKET={addr:?}: {source}")]
    Socket {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot notify the service manager at {addr:?}: {source}")]
    Send {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("$WATCHDOG_USEC={0:?} is not a positive number of microseconds")]
    BadWatchdog(String),
}

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    name: String,
    /// A failure was logged as a warning; more are debug lines until a send works.
    failing: AtomicBool,
}

impl Notifier {
    /// The notifier of `$NOTIFY_SOCKET`, or `None` when it is not set.
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(a) if !a.is_empty() => Notifier::connect(&a).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for the socket `addr` (`/path` or `@abstract-name`).
    pub fn connect(addr: &str) -> Result<Notifier, NotifyError> {
        let socket_err = |source| NotifyError::Socket {
            addr: addr.to_string(),
            source,
        };
        let sock_addr = if let Some(name) = addr.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(socket_err)?
        } else if addr.starts_with('/') {
            SocketAddr::from_pathname(addr).map_err(socket_err)?
        } else {
            return Err(NotifyError::BadAddress(addr.to_string()));
        };
        let socket = UnixDatagram::unbound().map_err(socket_err)?;
        socket.set_nonblocking(true).map_err(socket_err)?;
        Ok(Notifier {
            socket,
            addr: sock_addr,
            name: addr.to_string(),
            failing: AtomicBool::new(false),
        })
    }

    /// Sends one notification: newline-separated `KEY=value` assignments.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(|_| ())
            .map_err(|source| NotifyError::Send {
                addr: self.name.clone(),
                source,
            })
    }

    /// Sends, logging a failure instead of returning it (one warning per run
    /// of failures, so a missing manager does not flood the log with pings).
    fn send_or_warn(&self, state: &str) {
        match self.notify(state) {
            Ok(()) => self.failing.store(false, Ordering::Relaxed),
            Err(e) if self.failing.swap(true, Ordering::Relaxed) => log::debug!("{e}"),
            Err(e) => log::warn!("{e}"),
        }
    }
}

/// `STATUS=` text: one line, no newline (a newline would end the assignment).
fn status_assignment(text: &str) -> String {
    format!("STATUS={}", text.replace(['\n', '\r'], " "))
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// The one-line state shown by `systemctl status dps-agent`, e.g.
/// `provisioned: device gw-0001 on hub.azure-devices.net; certificate valid
/// until 2026-05-01T00:00:00Z; next renewal 2026-04-23T13:02:11Z`.
pub fn status_line(status: &Status, now: UnixTime) -> String {
    let mut parts: Vec<String> = Vec::new();
    let device = match (&status.device_id, &status.assigned_hub) {
        (Some(d), Some(h)) => format!("device {d} on {h}"),
        (Some(d), None) => format!("device {d}"),
        _ => format!("registration id {}", status.registration_id),
    };
    match status.state.as_str() {
        "failed" => parts.push(format!(
            "failed ({} in a row), {device}",
            status.failures.max(1)
        )),
        "expired" => parts.push(format!("EXPIRED, {device}")),
        "unprovisioned" => parts.push(format!("unprovisioned, {device}")),
        other => parts.push(format!("{other}: {device}")),
    }
    if let Some(na) = status.not_after {
        let verb = if na <= now { "expired" } else { "valid until" };
        parts.push(format!("certificate {verb} {}", rfc3339(na)));
    }
    match (status.state.as_str(), status.next_attempt, status.renew_at) {
        ("failed" | "expired" | "unprovisioned", Some(t), _) => {
            parts.push(format!("next attempt {}", rfc3339(t)))
        }
        ("provisioned", _, Some(r)) => parts.push(format!("next renewal {}", rfc3339(r))),
        _ => {}
    }
    if matches!(status.state.as_str(), "failed" | "expired") {
        if let Some(e) = &status.last_error {
            parts.push(format!("last error: {}", shorten(e, STATUS_ERROR_MAX)));
        }
    }
    parts.join("; ")
}

/// The watchdog ping interval: half of `$WATCHDOG_USEC`, when it is set for
/// this process (`$WATCHDOG_PID` absent or ours).
pub fn watchdog_interval() -> Result<Option<Duration>, NotifyError> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_from(
    usec: Option<&str>,
    pid: Option<&str>,
    own_pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec.filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    if let Some(p) = pid.filter(|p| !p.is_empty()) {
        if p.trim().parse::<u32>().ok() != Some(own_pid) {
            return Ok(None); // meant for another process
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(u) if u > 0 => Ok(Some(Duration::from_micros(u) / 2)),
        _ => Err(NotifyError::BadWatchdog(usec.to_string())),
    }
}

/// The daemon's side of the protocol, from `READY=1` to `STOPPING=1`.
pub struct Service {
    notifier: Option<Arc<Notifier>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Service {
    /// Sends `READY=1` with the current status, then keeps `STATUS=` in step
    /// with `status` and pings the watchdog. Call it inside the tokio runtime,
    /// once the state is loaded and the bus name is held (or the bus is known
    /// to be unavailable: the daemon still provisions and renews then, so it
    /// is ready all the same, and says so in the status).
    pub fn start(mut status: watch::Receiver<Status>, bus_held: bool) -> Service {
        let notifier = match Notifier::from_env() {
            Ok(Some(n)) => Arc::new(n),
            Ok(None) => {
                return Service {
                    notifier: None,
                    tasks: Vec::new(),
                }
            }
            Err(e) => {
                log::warn!("{e}; systemd is not told when the daemon is ready");
                return Service {
                    notifier: None,
                    tasks: Vec::new(),
                };
            }
        };
        let note = if bus_held { "" } else { "; D-Bus unavailable" };
        let line =
            move |s: &Status| status_assignment(&format!("{}{note}", status_line(s, clock::now())));
        let first = line(&status.borrow_and_update());
        notifier.send_or_warn(&format!("READY=1\n{first}"));
        let mut tasks = Vec::new();

        let n = notifier.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = first;
            while status.changed().await.is_ok() {
                let next = line(&status.borrow_and_update());
                if next != last {
                    n.send_or_warn(&next);
                    last = next;
                }
            }
        }));

        match watchdog_interval() {
            Ok(Some(every)) => {
                log::debug!(
                    "pinging the systemd watchdog every {} ms",
                    every.as_millis()
                );
                let n = notifier.clone();
                tasks.push(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tick.tick().await;
                        n.send_or_warn("WATCHDOG=1");
                    }
                }));
            }
            Ok(None) => {}
            Err(e) => log::warn!("{e}; the watchdog is not pinged"),
        }
        Service {
            notifier: Some(notifier),
            tasks,
        }
    }

    /// Sends `STOPPING=1` and ends the status and watchdog tasks.
    pub fn stopping(self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(n) = &self.notifier {
            n.send_or_warn("STOPPING=1\nSTATUS=stopping");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: &str) -> Status {
        Status {
            state: state.into(),
            source: "daemon".into(),
            registration_id: "gw-0001".into(),
            device_id: Some("gw-0001".into()),
            assigned_hub: Some("hub.example.net".into()),
            certificate_chain_path: None,
            key_uri: None,
            not_before: Some(1_000),
            not_after: Some(2_000_000_000),
            renew_at: Some(1_999_000_000),
            next_attempt: None,
            thumbprint: Some("AB".into()),
            subject: None,
            issuer: None,
            last_error: None,
            last_renewal: None,
            failures: 0,
            renewals: 1,
        }
    }

    #[test]
    fn status_lines_say_state_validity_and_what_comes_next() {
        assert_eq!(
            status_line(&status("provisioned"), 1_500_000_000),
            "provisioned: device gw-0001 on hub.example.net; certificate valid until \
             2033-05-18T03:33:20Z; next renewal 2033-05-06T13:46:40Z"
        );
        let mut s = status("failed");
        s.failures = 3;
        s.next_attempt = Some(1_500_000_060);
        s.last_error = Some("registration failed:\nDPS said no".into());
        let line = status_line(&s, 1_500_000_000);
        assert_eq!(
            line,
            "failed (3 in a row), device gw-0001 on hub.example.net; certificate valid until \
             2033-05-18T03:33:20Z; next attempt 2017-07-14T02:41:00Z; last error: \
             registration failed:\nDPS said no"
        );
        // The assignment itself never carries a newline.
        assert!(!status_assignment(&line).contains('\n'));

        let mut u = status("unprovisioned");
        u.device_id = None;
        u.assigned_hub = None;
        u.not_after = None;
        assert_eq!(status_line(&u, 0), "unprovisioned, registration id gw-0001");

        let mut e = status("expired");
        e.not_after = Some(100);
        e.last_error = Some("x".repeat(500));
        let line = status_line(&e, 200);
        assert!(line.starts_with("EXPIRED, device gw-0001"), "{line}");
        assert!(
            line.contains("certificate expired 1970-01-01T00:01:40Z"),
            "{line}"
        );
        assert!(line.ends_with('…') && line.len() < 400, "{line}");
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_and_only_for_us() {
        let half = |u, p, own| watchdog_interval_from(u, p, own).unwrap();
        assert_eq!(half(None, None, 1), None);
        assert_eq!(half(Some("4000000"), None, 1), Some(Duration::from_secs(2)));
        assert_eq!(
            half(Some("4000000"), Some("7"), 7),
            Some(Duration::from_secs(2))
        );
        assert_eq!(half(Some("4000000"), Some("8"), 7), None);
        assert!(matches!(
            watchdog_interval_from(Some("soon"), None, 1),
            Err(NotifyError::BadWatchdog(_))
        ));
        assert!(watchdog_interval_from(Some("0"), None, 1).is_err());
    }

    #[test]
    fn notifications_arrive_as_datagrams_on_path_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("notify-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.to_str().unwrap()).unwrap();
        n.notify("READY=1\nSTATUS=hello").unwrap();
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=hello");
        let _ = std::fs::remove_dir_all(&dir);

        use std::os::linux::net::SocketAddrExt;
        let name = format!("dps-agent-test-{}", rand::random::<u64>());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        Notifier::connect(&format!("@{name}"))
            .unwrap()
            .notify("WATCHDOG=1")
            .unwrap();
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");

        assert!(matches!(
            Notifier::connect("relative/sock"),
            Err(NotifyError::BadAddress(_))
        ));
        // Nobody listening: a clear error, no panic, no hang.
        let gone = Notifier::connect("/nonexistent/dps-agent/notify").unwrap();
        let e = gone.notify("READY=1").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/dps-agent/notify"), "{e}");
    }
}
