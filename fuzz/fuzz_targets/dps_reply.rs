//! A whole DPS reply: the topic (`dps::wire::parse_response_topic`) and the
//! body (`dps::wire::parse_reply`, which also runs `parse_error_body` and
//! `parse_tpm_challenge`). Input: the topic, a newline, the body.
//! Properties: never panics; the result is deterministic; an error status
//! always gives `Reply::Error` with that status; what is accepted satisfies the
//! checks the caller relies on (a non-empty operation id to poll, a host name,
//! a valid device id, non-empty certificates); text taken from the network is
//! clipped and free of control characters, in results and in error messages.
#![no_main]

use dps_agent::dps::wire::{parse_reply, parse_response_topic, Reply};
use libfuzzer_sys::fuzz_target;

fn clean(what: &str, s: &str, max_chars: usize) {
    assert!(
        !s.chars().any(char::is_control),
        "{what} has a control character: {s:?}"
    );
    assert!(
        s.chars().count() <= max_chars,
        "{what} is not clipped ({} chars)",
        s.chars().count()
    );
}

fuzz_target!(|data: &[u8]| {
    let (topic, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Some(topic) = std::str::from_utf8(topic)
        .ok()
        .and_then(parse_response_topic)
    else {
        return;
    };
    let (status, retry_after) = (topic.status, topic.retry_after);
    let reply = parse_reply(status, retry_after, body);
    assert_eq!(
        reply,
        parse_reply(status, retry_after, body),
        "not deterministic"
    );
    if !(200..300).contains(&status) {
        assert!(matches!(reply, Ok(Reply::Error(_))), "{status}: {reply:?}");
    }
    match reply {
        Ok(Reply::Error(e)) => {
            assert_eq!(e.status, status);
            if retry_after.is_some() {
                assert_eq!(e.retry_after, retry_after);
            }
            if let Some(m) = &e.message {
                clean("error message", m, 301);
            }
            if let Some(t) = &e.tracking_id {
                clean("tracking id", t, 81);
            }
            clean("error display", &e.to_string(), 500);
        }
        Ok(Reply::Assigning {
            operation_id,
            retry_after: ra,
        }) => {
            assert!(!operation_id.is_empty(), "nothing to poll: {body:?}");
            assert_eq!(ra, retry_after);
        }
        Ok(Reply::Assigned(state)) => {
            let hub = &state.assigned_hub;
            assert!(!hub.is_empty() && hub.len() <= 253, "{hub:?}");
            assert!(
                hub.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c)),
                "{hub:?}"
            );
            let id = &state.device_id;
            assert!(!id.is_empty() && id.len() <= 128, "{id:?}");
            assert!(!id.chars().any(|c| c.is_control() || c == '/'), "{id:?}");
            for cert in state.issued_chain.iter().flatten() {
                assert!(!cert.is_empty());
            }
            if let Some(k) = &state.tpm_authentication_key {
                assert!(!k.is_empty());
            }
        }
        Ok(Reply::Failed { message, .. }) => clean("failure message", &message, 301),
        Ok(Reply::Disabled) => {}
        Err(e) => clean("parse error", &e, 1000),
    }
});
