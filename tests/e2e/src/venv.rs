//! The Python virtual environment `make venv` makes under `.venv/` in the workspace:
//! Microsoft's device SDK (`azure-iot-device==2.14.0`) for the conformance suite and the
//! benchmarks, and `jsonschema` for the schema suite. A missing or incomplete venv fails the
//! test with the command that makes it; it is never skipped.

use std::path::PathBuf;
use std::process::Command;

use crate::workspace_root;

/// The venv's python, after checking it can import `modules`.
pub fn python(modules: &[&str]) -> PathBuf {
    let py = std::env::var_os("DPS_AGENT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv"))
        .join("bin")
        .join("python");
    assert!(
        py.exists(),
        "{} is missing: run `make venv` (it installs azure-iot-device==2.14.0 and jsonschema from \
         PyPI into .venv/; make test does this first). If that failed, PyPI could not be reached.",
        py.display()
    );
    let code = modules
        .iter()
        .map(|m| format!("import {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    let o = Command::new(&py)
        .args(["-c", &code])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", py.display()));
    assert!(
        o.status.success(),
        "{} cannot import {modules:?}: {}\nrun `make venv` again (it needs PyPI)",
        py.display(),
        String::from_utf8_lossy(&o.stderr).trim()
    );
    py
}

/// A script of `tests/e2e/python/`.
pub fn script(name: &str) -> PathBuf {
    workspace_root()
        .join("tests")
        .join("e2e")
        .join("python")
        .join(name)
}
