//! The long-running loop of `dps-agent run`: sleeps until the next deadline on a
//! timer (no polling; the wall clock is re-read at least hourly so a suspend or a
//! clock jump is noticed), runs attempts, and obeys commands (renew now, stop).
//! A stop interrupts an attempt at once; the next start rolls it back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Agent, NextStep, Reason};
use crate::backoff::Backoff;
use crate::clock::rfc3339;
use crate::fsutil;

/// Longest single sleep: the wall clock is checked again after this.
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// File in the state directory holding the daemon's process id.
pub const PID_FILE: &str = "dps-agent.pid";

/// What the daemon can be asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Renew now, whatever the schedule or backoff says.
    Renew,
    /// Stop as soon as possible.
    Stop,
}

/// Runs until a [`Command::Stop`] arrives (or every sender is gone).
pub async fn run(agent: Arc<Agent>, mut commands: mpsc::Receiver<Command>) {
    let mut announced: Option<i64> = None;
    let mut trouble = Backoff::new(Duration::from_secs(5), MAX_SLEEP);
    let mut expiry_reported: Option<String> = None;
    loop {
        let until_expiry = check_expiry(&agent, &mut expiry_reported);
        let step = match agent.next_step() {
            Ok(s) => {
                trouble.reset();
                s
            }
            Err(e) => {
                let wait = trouble.next_delay();
                log::error!(
                    "cannot decide what to do: {e}; trying again in {}s",
                    wait.as_secs()
                );
                if !sleep_or_command(&agent, wait, &mut commands).await {
                    return;
                }
                continue;
            }
        };
        match step {
            NextStep::Attempt(reason) => {
                announced = None;
                if !attempt_or_stop(&agent, reason, &mut commands).await {
                    return;
                }
            }
            NextStep::WaitUntil(at_ms) => {
                if announced != Some(at_ms) {
                    announce(&agent, at_ms);
                    announced = Some(at_ms);
                }
                let now = agent.clock.now_ms();
                let wait = Duration::from_millis((at_ms - now).max(0) as u64)
                    .min(MAX_SLEEP)
                    .min(until_expiry.unwrap_or(MAX_SLEEP));
                if !sleep_or_command(&agent, wait, &mut commands).await {
                    return;
                }
            }
        }
    }
}

/// The identity-expired hook: once per certificate, when its notAfter has
/// passed without a successful renewal, logs the `IdentityExpired` event and
/// republishes the status (its state becomes `expired` on D-Bus and in
/// sd_notify). Returns the time left before the current certificate expires,
/// so the loop wakes up then.
fn check_expiry(agent: &Agent, reported: &mut Option<String>) -> Option<Duration> {
    let status = agent.status.borrow().clone();
    let (Some(not_after), Some(thumbprint)) = (status.not_after, status.thumbprint.as_deref())
    else {
        return None;
    };
    let now_ms = agent.clock.now_ms();
    let left_ms = not_after.saturating_mul(1000) - now_ms;
    if left_ms > 0 {
        return Some(Duration::from_millis(left_ms as u64));
    }
    if reported.as_deref() != Some(thumbprint) {
        *reported = Some(thumbprint.to_string());
        let record = agent.record().clone();
        agent.publish(&record);
        // The time the loop will act on: a retry, or the schedule's floor.
        let next = match agent.next_step() {
            Ok(NextStep::WaitUntil(at_ms)) => at_ms.max(now_ms),
            _ => now_ms,
        };
        crate::logging::event(
            crate::logging::Event::IdentityExpired,
            &crate::logging::Fields {
                registration_id: Some(&status.registration_id),
                device_id: status.device_id.as_deref(),
                assigned_hub: status.assigned_hub.as_deref(),
                not_after: Some(not_after),
                thumbprint: Some(thumbprint),
                next_renewal: Some(next.div_euclid(1000)),
            },
            format_args!(
                "the identity expired: certificate {thumbprint} of device {} was valid until {} and no renewal succeeded; IoT Hub refuses the device until one does (next attempt at {})",
                status.device_id.as_deref().unwrap_or("-"),
                rfc3339(not_after),
                rfc3339(next.div_euclid(1000))
            ),
        );
    }
    None
}

fn announce(agent: &Agent, at_ms: i64) {
    let at = rfc3339(at_ms.div_euclid(1000));
    let status = agent.status.borrow().clone();
    match (status.not_after, status.failures) {
        (Some(na), 0) => log::info!(
            "next renewal at {at} (certificate valid until {})",
            rfc3339(na)
        ),
        (Some(na), n) => log::info!(
            "next attempt at {at} after {n} failure(s) (certificate valid until {})",
            rfc3339(na)
        ),
        (None, _) => log::info!("next provisioning attempt at {at}"),
    }
}

/// Sleeps for `wait` unless a command comes first. Returns false to stop.
async fn sleep_or_command(
    agent: &Arc<Agent>,
    wait: Duration,
    commands: &mut mpsc::Receiver<Command>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        cmd = commands.recv() => match cmd {
            Some(Command::Renew) => {
                agent.clear_backoff();
                attempt_or_stop(agent, Reason::Requested, commands).await
            }
            Some(Command::Stop) | None => false,
        }
    }
}

/// Runs one attempt, abandoning it if a stop arrives. Returns false to stop.
async fn attempt_or_stop(
    agent: &Arc<Agent>,
    reason: Reason,
    commands: &mut mpsc::Receiver<Command>,
) -> bool {
    let attempt = agent.attempt(reason);
    tokio::pin!(attempt);
    loop {
        tokio::select! {
            _ = &mut attempt => return true, // the outcome is logged and recorded
            cmd = commands.recv() => match cmd {
                Some(Command::Renew) => log::info!("a renewal is already in progress"),
                Some(Command::Stop) | None => {
                    log::warn!("stopping during an attempt; it is rolled back at the next start");
                    return false;
                }
            }
        }
    }
}

/// Writes the daemon's pid file (so `dps-agent renew` can find it).
pub fn write_pid_file(state_dir: &Path) -> std::io::Result<PathBuf> {
    let path = state_dir.join(PID_FILE);
    fsutil::atomic_write(&path, format!("{}\n", std::process::id()).as_bytes(), 0o644)?;
    Ok(path)
}

/// The pid of a running daemon for this state directory, if any.
pub fn running_daemon(state_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(state_dir.join(PID_FILE)).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmdline.split(|&b| b == 0).next()?;
    String::from_utf8_lossy(argv0)
        .ends_with("dps-agent")
        .then_some(pid)
}
