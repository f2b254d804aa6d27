//! The events file (`--events PATH`): one JSON object per line, flushed after every line, so
//! tests can follow what the simulator saw and answered. Every line has `t` (seconds since
//! start, monotonic, microsecond precision), `conn` (connection number, shared by both
//! services), `event` and `service` (`dps` or `hub`); the other fields belong to the event
//! kind (see README.md). Writing never fails a request: an I/O error
//! is reported once on stderr and the file is dropped.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::Value;

/// Which simulated service an event belongs to (the `service` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Dps,
    Hub,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Dps => "dps",
            Service::Hub => "hub",
        }
    }
}

/// Sink for events; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Events {
    start: Instant,
    out: Mutex<Option<BufWriter<File>>>,
}

impl Events {
    /// Events go nowhere (no `--events`).
    pub fn disabled() -> Self {
        Events {
            start: Instant::now(),
            out: Mutex::new(None),
        }
    }

    /// Creates (truncates) the events file.
    pub fn to_file(path: &Path) -> std::io::Result<Self> {
        let file = File::create(path)?;
        Ok(Events {
            start: Instant::now(),
            out: Mutex::new(Some(BufWriter::new(file))),
        })
    }

    /// Seconds since start, rounded to microseconds.
    pub fn elapsed(&self) -> f64 {
        let micros = self.start.elapsed().as_micros();
        // u128 -> f64 is exact for any realistic uptime.
        micros as f64 / 1_000_000.0
    }

    /// Writes one event. `fields` must be a JSON object; its keys follow `t`, `conn`, `event`
    /// and `service`.
    pub fn emit(&self, service: Service, conn: u64, event: &str, fields: Value) {
        // Take the lock before reading the clock so lines are in time order.
        let Ok(mut guard) = self.out.lock() else {
            return;
        };
        let Some(out) = guard.as_mut() else {
            return;
        };
        // Built by hand so that `t`, `conn`, `event` and `service` come first whatever the map
        // order.
        let mut line = format!(
            "{{\"t\":{},\"conn\":{conn},\"event\":{},\"service\":\"{}\"",
            Value::from(self.elapsed()),
            Value::from(event),
            service.name()
        );
        if let Value::Object(map) = fields {
            for (key, value) in map {
                line.push(',');
                line.push_str(&Value::from(key).to_string());
                line.push(':');
                line.push_str(&value.to_string());
            }
        }
        line.push_str("}\n");
        let result = out.write_all(line.as_bytes()).and_then(|()| out.flush());
        if let Err(e) = result {
            eprintln!("dps-sim: cannot write the events file: {e}; no more events will be written");
            *guard = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_have_common_fields_and_are_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let events = Events::to_file(&path).unwrap();
        events.emit(
            Service::Dps,
            3,
            "subscribe",
            json!({"filter": "$dps/registrations/res/#", "granted": 1}),
        );
        events.emit(
            Service::Hub,
            3,
            "disconnect",
            json!({"reason": "client DISCONNECT"}),
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["conn"], 3);
        assert_eq!(lines[0]["event"], "subscribe");
        assert_eq!(lines[0]["granted"], 1);
        assert_eq!(lines[0]["service"], "dps");
        assert_eq!(lines[1]["service"], "hub");
        assert!(text.starts_with("{\"t\":"), "{text}");
        assert!(
            text.contains(",\"event\":\"subscribe\",\"service\":\"dps\","),
            "{text}"
        );
        assert!(lines[0]["t"].as_f64().unwrap() >= 0.0);
        assert!(lines[1]["t"].as_f64() >= lines[0]["t"].as_f64());
        assert_eq!(lines[1]["reason"], "client DISCONNECT");
    }
}
