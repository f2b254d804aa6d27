//! Log output. On a terminal: `dps-agent: level: message`. Otherwise (a service,
//! a pipe, a test) each line starts with its syslog priority, `<6>message`,
//! which journald and most log collectors understand.

use std::io::{IsTerminal, Write};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    level: LevelFilter,
    terminal: bool,
}

/// The syslog priority of a log level (info is 6, warn 4, error 3, debug 7).
pub fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level && metadata.target().starts_with("dps_agent")
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = if self.terminal {
            format!(
                "dps-agent: {}: {}\n",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        } else {
            format!("<{}>{}\n", syslog_priority(record.level()), record.args())
        };
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Installs the logger. Only the agent's own messages are shown; libraries log
/// through it only at `trace`.
pub fn init(level: LevelFilter) {
    let logger = StderrLogger {
        level,
        terminal: std::io::stderr().is_terminal(),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
