//! `dps::wire::parse_response_topic`: the topic of every DPS reply.
//! Properties: never panics; a parsed topic, rendered again the way DPS writes
//! it, parses to the same value; the status is the 4th `/`-segment.
#![no_main]

use dps_agent::dps::wire::{parse_response_topic, url_encode, ResponseTopic};
use libfuzzer_sys::fuzz_target;

fn render(t: &ResponseTopic) -> String {
    let mut s = format!("$dps/registrations/res/{}/", t.status);
    let mut props = Vec::new();
    if let Some(rid) = &t.rid {
        props.push(format!("$rid={}", url_encode(rid)));
    }
    if let Some(secs) = t.retry_after {
        props.push(format!("retry-after={secs}"));
    }
    if !props.is_empty() {
        s.push('?');
        s.push_str(&props.join("&"));
    }
    s
}

fuzz_target!(|data: &[u8]| {
    let Ok(topic) = std::str::from_utf8(data) else {
        return;
    };
    let Some(parsed) = parse_response_topic(topic) else {
        assert!(
            !topic.starts_with("$dps/registrations/res/")
                || topic["$dps/registrations/res/".len()..]
                    .split('/')
                    .next()
                    .is_some_and(|s| s.parse::<u16>().is_err()),
            "a DPS reply topic with a numeric status was refused: {topic:?}"
        );
        return;
    };
    let status_segment = topic.split('/').nth(3).unwrap_or_default();
    assert_eq!(status_segment.parse::<u16>().ok(), Some(parsed.status));
    let rendered = render(&parsed);
    assert_eq!(
        parse_response_topic(&rendered).as_ref(),
        Some(&parsed),
        "{topic:?} re-rendered as {rendered:?}"
    );
    // The properties may come in any order.
    let (head, query) = rendered.split_once('?').unwrap_or((&rendered, ""));
    let reversed: Vec<&str> = query.split('&').rev().collect();
    let swapped = format!("{head}?{}", reversed.join("&"));
    assert_eq!(parse_response_topic(&swapped).as_ref(), Some(&parsed));
});
