//! Log output. Owns where log lines go and how the lifecycle's events are
//! written; never decides anything and never logs secrets (event fields are
//! identifiers and dates, see [`Fields`]).
//!
//! - As a systemd service (stderr is the service's journal stream,
//!   `$JOURNAL_STREAM`) and the journal socket answers: native journal entries
//!   with `PRIORITY`, `CODE_FILE`/`CODE_LINE`, and for [`event`]s a
//!   `MESSAGE_ID` plus the fields of [`Fields`].
//! - Otherwise stderr. On a terminal: `dps-agent: level: message`. Elsewhere
//!   (a pipe, a file, a test) each line starts with its syslog priority,
//!   `<6>message`, which journald and most log collectors understand.
//!
//! `$DPS_AGENT_LOG` overrides the choice: `journal` (use the journal socket
//! whenever it answers), `stderr`, or `auto` (the default, above). A terminal
//! never loses its lines to the journal unless asked.

mod event;

use std::fmt;
use std::io::{IsTerminal, Write};

use log::{Level, LevelFilter, Log, Metadata, Record};
use systemd_journal_logger::JournalLog;

pub use event::{event, Event, Fields};

/// Environment variable that chooses the log sink.
pub const LOG_ENV: &str = "DPS_AGENT_LOG";

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// Native journal entries over `/run/systemd/journal/socket`.
    Journal,
    /// Lines on stderr.
    Stderr,
}

/// The `$DPS_AGENT_LOG` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The journal when stderr is the service's journal stream, else stderr.
    Auto,
    /// The journal whenever its socket answers.
    Journal,
    /// Always stderr.
    Stderr,
}

impl Choice {
    /// Parses `$DPS_AGENT_LOG` (unset or empty is `auto`).
    pub fn parse(value: Option<&str>) -> Result<Choice, String> {
        match value.map(str::trim) {
            None | Some("") | Some("auto") => Ok(Choice::Auto),
            Some("journal") => Ok(Choice::Journal),
            Some("stderr") => Ok(Choice::Stderr),
            Some(other) => Err(format!(
                "{LOG_ENV}={other:?} is not known; use \"auto\", \"journal\" or \"stderr\" (logging to stderr)"
            )),
        }
    }

    /// Whether this choice wants the journal, given whether stderr is the
    /// service's journal stream.
    pub fn wants_journal(self, stderr_is_journal_stream: bool) -> bool {
        match self {
            Choice::Auto => stderr_is_journal_stream,
            Choice::Journal => true,
            Choice::Stderr => false,
        }
    }
}

/// The syslog priority of a log level on stderr (info is 6, warn 4, error 3,
/// debug 7). The journal sink uses systemd-journal-logger's mapping, where
/// info is 5 (notice).
pub fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// A message as one line: control characters (a newline in a CN or an
/// operation id a server sent) are shown escaped, so no value can forge a
/// second log line or a priority prefix.
fn one_line(message: &fmt::Arguments<'_>) -> String {
    let text = message.to_string();
    if !text.chars().any(char::is_control) {
        return text;
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// One stderr line for a record.
fn stderr_line(record: &Record, terminal: bool) -> String {
    let message = one_line(record.args());
    if terminal {
        format!(
            "dps-agent: {}: {message}\n",
            record.level().as_str().to_lowercase(),
        )
    } else {
        format!("<{}>{message}\n", syslog_priority(record.level()))
    }
}

/// The line that reports a fatal error, the last a failing command writes.
/// On a terminal `dps-agent: error: …`; elsewhere (the service's journal
/// stream, a pipe) with the `<3>` prefix, so that journald files it at
/// priority err and `journalctl -p err` shows the cause, not only systemd's
/// "Failed to start".
pub fn fatal_line(message: &str, terminal: bool) -> String {
    let text = one_line(&format_args!("{message}"));
    if terminal {
        format!("dps-agent: error: {text}\n")
    } else {
        format!("<3>dps-agent: error: {text}\n")
    }
}

/// Writes [`fatal_line`] to stderr.
pub fn print_fatal(message: &str) {
    let stderr = std::io::stderr();
    let line = fatal_line(message, stderr.is_terminal());
    let _ = stderr.lock().write_all(line.as_bytes());
}

struct Logger {
    level: LevelFilter,
    journal: Option<JournalLog>,
    terminal: bool,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level && metadata.target().starts_with("dps_agent")
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if let Some(journal) = &self.journal {
            // A journald restart makes a send fail for a moment: the line
            // goes to stderr then (which systemd also collects).
            let message = one_line(record.args());
            let sent = journal.journal_send(
                &Record::builder()
                    .metadata(record.metadata().clone())
                    .args(format_args!("{message}"))
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .key_values(record.key_values())
                    .build(),
            );
            if sent.is_ok() {
                return;
            }
        }
        let line = stderr_line(record, self.terminal);
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Installs the logger and returns where lines go. Only the agent's own
/// messages are shown; libraries log through it only at `trace`.
pub fn init(level: LevelFilter) -> Sink {
    let terminal = std::io::stderr().is_terminal();
    let (choice, problem) = match Choice::parse(std::env::var(LOG_ENV).ok().as_deref()) {
        Ok(c) => (c, None),
        Err(e) => (Choice::Stderr, Some(e)),
    };
    let mut journal_error = None;
    let journal = if choice.wants_journal(systemd_journal_logger::connected_to_journal()) {
        match JournalLog::new() {
            Ok(j) => Some(j),
            Err(e) => {
                journal_error = Some(e);
                None
            }
        }
    } else {
        None
    };
    let sink = if journal.is_some() {
        Sink::Journal
    } else {
        Sink::Stderr
    };
    let logger = Logger {
        level,
        journal,
        terminal,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
    if let Some(p) = problem {
        log::warn!("{p}");
    }
    if let Some(e) = journal_error {
        // Asked for (or running under systemd) but the socket is not there.
        log::warn!(
            "cannot log to the journal (/run/systemd/journal/socket: {e}); logging to stderr"
        );
    }
    sink
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fatal_error_is_filed_at_priority_err_off_a_terminal() {
        assert_eq!(
            fatal_line("operational key: no TPM at /dev/tpmrm0", false),
            "<3>dps-agent: error: operational key: no TPM at /dev/tpmrm0\n"
        );
        assert_eq!(
            fatal_line("config: bad", true),
            "dps-agent: error: config: bad\n"
        );
        // One line whatever the message holds.
        assert_eq!(
            fatal_line("a\n<6>b", false),
            "<3>dps-agent: error: a\\n<6>b\n"
        );
    }

    #[test]
    fn log_choice_parses_and_decides() {
        assert_eq!(Choice::parse(None), Ok(Choice::Auto));
        assert_eq!(Choice::parse(Some("")), Ok(Choice::Auto));
        assert_eq!(Choice::parse(Some("journal")), Ok(Choice::Journal));
        assert_eq!(Choice::parse(Some(" stderr ")), Ok(Choice::Stderr));
        let e = Choice::parse(Some("syslog")).unwrap_err();
        assert!(e.contains("\"syslog\"") && e.contains("\"journal\""), "{e}");

        // auto follows the journal stream; the others ignore it.
        assert!(Choice::Auto.wants_journal(true));
        assert!(!Choice::Auto.wants_journal(false));
        assert!(Choice::Journal.wants_journal(false));
        assert!(!Choice::Stderr.wants_journal(true));
    }

    #[test]
    fn stderr_lines_carry_the_priority_or_the_level() {
        let args = format_args!("renewed: device d1");
        let record = Record::builder()
            .level(Level::Warn)
            .target("dps_agent::x")
            .args(args)
            .build();
        assert_eq!(stderr_line(&record, false), "<4>renewed: device d1\n");
        assert_eq!(
            stderr_line(&record, true),
            "dps-agent: warn: renewed: device d1\n"
        );
        assert_eq!(syslog_priority(Level::Info), 6);
        assert_eq!(syslog_priority(Level::Error), 3);
        assert_eq!(syslog_priority(Level::Trace), 7);
    }

    #[test]
    fn a_value_with_a_newline_cannot_forge_a_second_line() {
        let cn = "gw-0001\n<3>forged: the key was stolen\r";
        let args = format_args!("renewed: device {cn}");
        let record = Record::builder()
            .level(Level::Info)
            .target("dps_agent::x")
            .args(args)
            .build();
        let line = stderr_line(&record, false);
        assert_eq!(
            line,
            "<6>renewed: device gw-0001\\n<3>forged: the key was stolen\\r\n"
        );
        assert_eq!(line.lines().count(), 1);
        assert_eq!(one_line(&format_args!("plain é ✓")), "plain é ✓");
    }

    #[test]
    fn only_the_agents_own_records_pass_the_filter() {
        let logger = Logger {
            level: LevelFilter::Info,
            journal: None,
            terminal: false,
        };
        let meta = |target, level| Metadata::builder().target(target).level(level).build();
        assert!(logger.enabled(&meta("dps_agent::lifecycle", Level::Info)));
        assert!(logger.enabled(&meta(event::TARGET, Level::Error)));
        assert!(!logger.enabled(&meta("dps_agent::lifecycle", Level::Debug)));
        assert!(!logger.enabled(&meta("rustls::client", Level::Error)));
    }
}
