//! `hub::parse_twin_response`: the topic of an IoT Hub twin reply.
//! Properties: never panics; a parsed topic, rendered again the way the hub
//! writes it, parses to the same value, with the properties in either order.
#![no_main]

use dps_agent::dps::wire::url_encode;
use dps_agent::hub::{parse_twin_response, TwinResponse};
use libfuzzer_sys::fuzz_target;

fn render(t: &TwinResponse, reverse: bool) -> String {
    let mut props = Vec::new();
    if let Some(rid) = &t.rid {
        props.push(format!("$rid={}", url_encode(rid)));
    }
    if let Some(v) = t.version {
        props.push(format!("$version={v}"));
    }
    if reverse {
        props.reverse();
    }
    format!("$iothub/twin/res/{}/?{}", t.status, props.join("&"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(topic) = std::str::from_utf8(data) else {
        return;
    };
    let Some(parsed) = parse_twin_response(topic) else {
        return;
    };
    assert!(topic.starts_with("$iothub/twin/res/"), "{topic:?}");
    for reverse in [false, true] {
        let rendered = render(&parsed, reverse);
        assert_eq!(
            parse_twin_response(&rendered).as_ref(),
            Some(&parsed),
            "{topic:?} re-rendered as {rendered:?}"
        );
    }
});
