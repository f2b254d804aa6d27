//! The lifecycle's events as structured log records: one call logs the human
//! message plus a fixed `MESSAGE_ID` per kind of event and the identity's
//! fields, so `journalctl MESSAGE_ID=…` or `journalctl DPS_DEVICE_ID=…` finds
//! them. On stderr only the message is shown.
//!
//! The ids are fixed forever (a monitoring rule or the message catalog
//! `dps-agent.catalog` may name them); add a new id for a new kind of event,
//! never reuse one. Fields carry identifiers and dates only: no key material,
//! no PIN, no SAS token, no key URI.

use std::fmt;

use log::kv::{self, Key, Source, Value, VisitSource};
use log::{Level, Record};

use crate::clock::{rfc3339, UnixTime};

/// The log target of events (passes the agent's filter).
pub const TARGET: &str = "dps_agent::event";

/// `MESSAGE_ID` of [`Event::Provisioned`].
pub const MESSAGE_ID_PROVISIONED: &str = "271c25c84ac2426fa7d313b7b844e0cc";
/// `MESSAGE_ID` of [`Event::Renewed`].
pub const MESSAGE_ID_RENEWED: &str = "05253eb5a2f24815a750f6a9283d9064";
/// `MESSAGE_ID` of [`Event::RenewalFailed`].
pub const MESSAGE_ID_RENEWAL_FAILED: &str = "142f9a6812c54f1687bcff4992a4d5c9";
/// `MESSAGE_ID` of [`Event::IdentityExpired`].
pub const MESSAGE_ID_IDENTITY_EXPIRED: &str = "0dc982d802b34a858dced621b934891e";
/// `MESSAGE_ID` of [`Event::ProvisioningFailed`].
pub const MESSAGE_ID_PROVISIONING_FAILED: &str = "7c6f1e1283d145a6b32043eb603a9628";

/// A kind of lifecycle event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A first identity (or a new one after the old one became unusable) was committed.
    Provisioned,
    /// A renewal committed a new identity while the old one was still valid.
    Renewed,
    /// A provisioning attempt failed; the device has no identity yet.
    ProvisioningFailed,
    /// A renewal attempt failed; the current identity stays in use.
    RenewalFailed,
    /// The stored certificate expired without a successful renewal.
    IdentityExpired,
}

impl Event {
    /// Every kind, for the catalog and tests.
    pub const ALL: [Event; 5] = [
        Event::Provisioned,
        Event::Renewed,
        Event::ProvisioningFailed,
        Event::RenewalFailed,
        Event::IdentityExpired,
    ];

    /// The journal `MESSAGE_ID` (128 bits, lowercase hex, no dashes).
    pub const fn message_id(self) -> &'static str {
        match self {
            Event::Provisioned => MESSAGE_ID_PROVISIONED,
            Event::Renewed => MESSAGE_ID_RENEWED,
            Event::ProvisioningFailed => MESSAGE_ID_PROVISIONING_FAILED,
            Event::RenewalFailed => MESSAGE_ID_RENEWAL_FAILED,
            Event::IdentityExpired => MESSAGE_ID_IDENTITY_EXPIRED,
        }
    }

    /// The value of the `DPS_AGENT_EVENT` field.
    pub const fn name(self) -> &'static str {
        match self {
            Event::Provisioned => "provisioned",
            Event::Renewed => "renewed",
            Event::ProvisioningFailed => "provisioning-failed",
            Event::RenewalFailed => "renewal-failed",
            Event::IdentityExpired => "identity-expired",
        }
    }

    /// The level the event is logged at.
    pub const fn level(self) -> Level {
        match self {
            Event::Provisioned | Event::Renewed => Level::Info,
            Event::ProvisioningFailed | Event::RenewalFailed | Event::IdentityExpired => {
                Level::Error
            }
        }
    }
}

/// What an event says about the identity. Unknown values are left out of the
/// entry. Times are Unix seconds and are written as RFC 3339 (UTC).
#[derive(Debug, Clone, Copy, Default)]
pub struct Fields<'a> {
    /// `DPS_REGISTRATION_ID`
    pub registration_id: Option<&'a str>,
    /// `DPS_DEVICE_ID`
    pub device_id: Option<&'a str>,
    /// `DPS_ASSIGNED_HUB`
    pub assigned_hub: Option<&'a str>,
    /// `CERT_NOT_AFTER`
    pub not_after: Option<UnixTime>,
    /// `CERT_THUMBPRINT` (uppercase hex SHA-256 of the leaf)
    pub thumbprint: Option<&'a str>,
    /// `NEXT_RENEWAL`: when the next renewal (or, after a failure, the next
    /// attempt) is due.
    pub next_renewal: Option<UnixTime>,
}

impl Fields<'_> {
    /// The journal fields of `event` with these values, `MESSAGE_ID` first.
    pub fn pairs(&self, event: Event) -> Vec<(&'static str, String)> {
        let mut out = vec![
            ("MESSAGE_ID", event.message_id().to_string()),
            ("DPS_AGENT_EVENT", event.name().to_string()),
        ];
        let mut text = |k: &'static str, v: Option<&str>| {
            if let Some(v) = v {
                out.push((k, v.to_string()));
            }
        };
        text("DPS_REGISTRATION_ID", self.registration_id);
        text("DPS_DEVICE_ID", self.device_id);
        text("DPS_ASSIGNED_HUB", self.assigned_hub);
        text("CERT_THUMBPRINT", self.thumbprint);
        if let Some(t) = self.not_after {
            out.push(("CERT_NOT_AFTER", rfc3339(t)));
        }
        if let Some(t) = self.next_renewal {
            out.push(("NEXT_RENEWAL", rfc3339(t)));
        }
        out
    }
}

/// Key-value pairs as a `log` source.
struct Pairs<'a>(&'a [(&'static str, String)]);

impl Source for Pairs<'_> {
    fn visit<'kvs>(&'kvs self, visitor: &mut dyn VisitSource<'kvs>) -> Result<(), kv::Error> {
        for (k, v) in self.0 {
            visitor.visit_pair(Key::from_str(k), Value::from(v.as_str()))?;
        }
        Ok(())
    }
}

/// Builds the record of an event and hands it to `f`.
fn with_record(
    event: Event,
    fields: &Fields<'_>,
    message: fmt::Arguments<'_>,
    file: &'static str,
    line: u32,
    f: impl FnOnce(&Record<'_>),
) {
    let pairs = fields.pairs(event);
    let source = Pairs(&pairs);
    let record = Record::builder()
        .level(event.level())
        .target(TARGET)
        .file_static(Some(file))
        .line(Some(line))
        .args(message)
        .key_values(&source)
        .build();
    f(&record)
}

/// Logs `event` with its fields and a human `message`, in one entry. The
/// caller's file and line become `CODE_FILE` and `CODE_LINE`.
///
/// ```no_run
/// use dps_agent::logging::{event, Event, Fields};
/// event(
///     Event::Renewed,
///     &Fields { registration_id: Some("gw-0001"), ..Fields::default() },
///     format_args!("renewed: certificate valid until {}", "2026-01-01T00:00:00Z"),
/// );
/// ```
#[track_caller]
pub fn event(event: Event, fields: &Fields<'_>, message: fmt::Arguments<'_>) {
    let level = event.level();
    if level > log::max_level() {
        return;
    }
    let at = std::panic::Location::caller();
    with_record(event, fields, message, at.file(), at.line(), |record| {
        let logger = log::logger();
        if logger.enabled(record.metadata()) {
            logger.log(record);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Collects a record's key-value pairs.
    struct Collect(BTreeMap<String, String>);

    impl<'kvs> VisitSource<'kvs> for Collect {
        fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
            self.0.insert(key.as_str().to_string(), value.to_string());
            Ok(())
        }
    }

    fn is_journal_field_name(k: &str) -> bool {
        // systemd: uppercase letters, digits and underscores, not starting
        // with an underscore or a digit, at most 64 characters.
        !k.is_empty()
            && k.len() <= 64
            && k.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            && !k.starts_with(|c: char| c == '_' || c.is_ascii_digit())
    }

    #[test]
    fn message_ids_are_distinct_128_bit_ids() {
        let mut seen = std::collections::HashSet::new();
        for e in Event::ALL {
            let id = e.message_id();
            assert_eq!(id.len(), 32, "{e:?}");
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
                "{e:?}: {id}"
            );
            assert!(seen.insert(id), "{e:?} reuses {id}");
        }
    }

    #[test]
    fn the_catalog_explains_every_message_id() {
        let catalog = include_str!("../../../systemd/dps-agent.catalog");
        for e in Event::ALL {
            let id = e.message_id();
            let header = format!("-- {id}\n");
            assert!(
                catalog.contains(&header),
                "{e:?} ({id}) is not in the catalog"
            );
        }
    }

    #[test]
    fn a_renewal_carries_every_identity_field() {
        let fields = Fields {
            registration_id: Some("gw-0001"),
            device_id: Some("gw-0001-dev"),
            assigned_hub: Some("hub.example.net"),
            not_after: Some(1_800_000_000),
            thumbprint: Some("AB12"),
            next_renewal: Some(1_799_000_000),
        };
        let mut got = None;
        with_record(
            Event::Renewed,
            &fields,
            format_args!("renewed: device {}", "gw-0001-dev"),
            "agent/src/lifecycle/mod.rs",
            42,
            |r| {
                let mut c = Collect(BTreeMap::new());
                r.key_values().visit(&mut c).unwrap();
                got = Some((
                    r.level(),
                    r.target().to_string(),
                    r.args().to_string(),
                    c.0,
                    r.line(),
                ));
            },
        );
        let (level, target, message, kv, line) = got.unwrap();
        assert_eq!(level, Level::Info);
        assert_eq!(target, TARGET);
        assert_eq!(message, "renewed: device gw-0001-dev");
        assert_eq!(line, Some(42));
        let want: BTreeMap<String, String> = [
            ("MESSAGE_ID", MESSAGE_ID_RENEWED),
            ("DPS_AGENT_EVENT", "renewed"),
            ("DPS_REGISTRATION_ID", "gw-0001"),
            ("DPS_DEVICE_ID", "gw-0001-dev"),
            ("DPS_ASSIGNED_HUB", "hub.example.net"),
            ("CERT_THUMBPRINT", "AB12"),
            ("CERT_NOT_AFTER", "2027-01-15T08:00:00Z"),
            ("NEXT_RENEWAL", "2027-01-03T18:13:20Z"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(kv, want);
        assert!(kv.keys().all(|k| is_journal_field_name(k)), "{kv:?}");
    }

    #[test]
    fn unknown_values_are_left_out_and_failures_are_errors() {
        let fields = Fields {
            registration_id: Some("gw-0001"),
            next_renewal: Some(0),
            ..Fields::default()
        };
        let pairs = fields.pairs(Event::ProvisioningFailed);
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "MESSAGE_ID",
                "DPS_AGENT_EVENT",
                "DPS_REGISTRATION_ID",
                "NEXT_RENEWAL"
            ]
        );
        assert_eq!(pairs[3].1, "1970-01-01T00:00:00Z");
        assert_eq!(Event::RenewalFailed.level(), Level::Error);
        assert_eq!(Event::IdentityExpired.level(), Level::Error);
        assert_eq!(Event::Provisioned.level(), Level::Info);
    }
}
