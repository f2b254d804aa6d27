//! `config::Config::from_str`: the TOML config as an administrator writes it.
//! Properties: never panics; loading is deterministic (the same text gives the
//! same config or the same error); a config lists its file; every error names
//! the file, first thing in its message, with a line number inside the text.
#![no_main]

use std::path::Path;

use dps_agent::config::Config;
use libfuzzer_sys::fuzz_target;

const FILE: &str = "/etc/dps-agent/config.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new(FILE);
    match Config::from_str(path, text) {
        Ok(config) => {
            assert_eq!(config.files, vec![path.to_path_buf()]);
            let again = Config::from_str(path, text).expect("a config that loads once loads again");
            assert_eq!(
                format!("{config:?}"),
                format!("{again:?}"),
                "not deterministic"
            );
        }
        Err(e) => {
            assert_eq!(e.file, path, "the error names another file: {e}");
            let shown = e.to_string();
            assert!(
                shown.starts_with(FILE),
                "the message does not start with the file: {shown}"
            );
            if let Some(line) = e.line {
                assert!(
                    line >= 1 && line <= text.lines().count().max(1) + 1,
                    "line {line}: {shown}"
                );
            }
            assert_eq!(
                Config::from_str(path, text).err(),
                Some(e),
                "not deterministic"
            );
        }
    }
});
