//! SoftHSM2 tokens for the PKCS#11 suites: each test gets its own SOFTHSM2_CONF
//! and token directory; no global state is touched (never /etc/softhsm or
//! /var/lib/softhsm). Every process that must see the token (dps-agent,
//! pkcs11-tool, p11tool, softhsm2-util) is started through this harness with
//! the token's environment.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{bin, run, text};

/// The environment variable SoftHSM2 reads its configuration from.
pub const CONF_ENV: &str = "SOFTHSM2_CONF";

/// Where Debian and Ubuntu install SoftHSM2's PKCS#11 module
/// (`SOFTHSM2_MODULE` overrides).
pub fn module_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SOFTHSM2_MODULE") {
        return PathBuf::from(p);
    }
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/arm-linux-gnueabihf/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("SoftHSM2 is not installed: run `make deps` (Debian package softhsm2)")
}

/// OpenSC's PKCS#11 spy: a module that logs every call and forwards it to the
/// module named in `$PKCS11SPY` (Debian package opensc-pkcs11, pulled in by
/// opensc).
pub fn spy_module_path() -> PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so",
        "/usr/lib/aarch64-linux-gnu/pkcs11-spy.so",
        "/usr/lib/arm-linux-gnueabihf/pkcs11-spy.so",
        "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("OpenSC's pkcs11-spy.so is missing: run `make deps` (Debian package opensc)")
}

/// One initialised SoftHSM2 token in a private directory.
pub struct SoftHsm {
    pub dir: PathBuf,
    /// The private softhsm2.conf (pass it as `SOFTHSM2_CONF`).
    pub conf: PathBuf,
    pub module: PathBuf,
    pub label: String,
    pub pin: String,
    pub so_pin: String,
    /// The user PIN in a file, mode 0600.
    pub pin_file: PathBuf,
}

impl SoftHsm {
    /// Writes `dir/softhsm2.conf` and `dir/tokens/`, initialises a token
    /// labelled `label` in the first free slot and writes the PIN file.
    pub fn new(dir: &Path, label: &str) -> SoftHsm {
        let tokens = dir.join("tokens");
        fs::create_dir_all(&tokens).expect("token dir");
        let conf = dir.join("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .expect("write softhsm2.conf");
        let hsm = SoftHsm {
            dir: dir.to_path_buf(),
            conf,
            module: module_path(),
            label: label.to_string(),
            pin: "271828".into(),
            so_pin: "314159".into(),
            pin_file: dir.join("user-pin"),
        };
        let o = hsm.tool(
            "softhsm2-util",
            &[
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                &hsm.so_pin,
                "--pin",
                &hsm.pin,
            ],
        );
        assert!(
            o.status.success(),
            "softhsm2-util --init-token: {}",
            text(&o)
        );
        hsm.write_pin_file(&hsm.pin_file, &hsm.pin);
        hsm
    }

    /// Writes `pin` to `path`, mode 0600.
    pub fn write_pin_file(&self, path: &Path, pin: &str) {
        fs::write(path, format!("{pin}\n")).expect("write PIN file");
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod PIN file");
    }

    /// The environment to give every process that must see the token.
    pub fn env(&self) -> (&'static str, &Path) {
        (CONF_ENV, &self.conf)
    }

    /// A `[pkcs11]` config section for this token.
    pub fn config_toml(&self) -> String {
        self.config_toml_with(&self.module, &self.pin_file)
    }

    /// A `[pkcs11]` section with another module path or PIN file.
    pub fn config_toml_with(&self, module: &Path, pin_file: &Path) -> String {
        format!(
            "[pkcs11]\nmodule = \"{}\"\ntoken_label = \"{}\"\npin_file = \"{}\"\n",
            module.display(),
            self.label,
            pin_file.display()
        )
    }

    /// Runs a program with the token's environment.
    pub fn tool(&self, program: &str, args: &[&str]) -> Output {
        run(Command::new(program).args(args).env(CONF_ENV, &self.conf))
    }

    /// `pkcs11-tool --module MODULE --token-label LABEL args…`
    pub fn pkcs11_tool(&self, args: &[&str]) -> Output {
        let module = self.module.display().to_string();
        let mut all = vec!["--module", &module, "--token-label", &self.label];
        all.extend_from_slice(args);
        self.tool("pkcs11-tool", &all)
    }

    /// `pkcs11-tool … --login --pin PIN args…`, which must succeed; stdout.
    pub fn pkcs11_tool_login(&self, args: &[&str]) -> String {
        let mut all = vec!["--login", "--pin", &self.pin];
        all.extend_from_slice(args);
        let o = self.pkcs11_tool(&all);
        assert!(o.status.success(), "pkcs11-tool {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `p11tool --provider MODULE args…` (GnuTLS), which must succeed; stdout.
    pub fn p11tool(&self, args: &[&str]) -> String {
        let module = self.module.display().to_string();
        let mut all = vec!["--provider", &module];
        all.extend_from_slice(args);
        let o = self.tool("p11tool", &all);
        assert!(o.status.success(), "p11tool {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The token's flags as `pkcs11-tool --list-token-slots` prints them,
    /// e.g. "login required, rng, token initialized, PIN initialized".
    pub fn token_flags(&self) -> String {
        let o = self.pkcs11_tool(&["--list-token-slots"]);
        assert!(o.status.success(), "pkcs11-tool -L: {}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let mut in_token = false;
        for line in out.lines() {
            if let Some(l) = line.trim().strip_prefix("token label") {
                in_token = l.trim_start_matches([' ', ':']).trim() == self.label;
            }
            if in_token {
                if let Some(f) = line.trim().strip_prefix("token flags") {
                    return f.trim_start_matches([' ', ':']).trim().to_string();
                }
            }
        }
        panic!("token {} not in pkcs11-tool -L output:\n{out}", self.label)
    }

    /// `dps-agent --config CONFIG args…` with the token's environment and
    /// `extra_env`.
    pub fn agent(&self, config: &Path, args: &[&str], extra_env: &[(&str, &Path)]) -> Output {
        let mut cmd = Command::new(bin("dps-agent"));
        cmd.arg("--config")
            .arg(config)
            .args(args)
            .env(CONF_ENV, &self.conf)
            .env("RUST_BACKTRACE", "1")
            .env_remove("CREDENTIALS_DIRECTORY");
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        run(&mut cmd)
    }
}

/// The bytes of an RFC 7512 `id=` value (`%01%ab…`).
pub fn uri_id(uri: &str) -> Vec<u8> {
    let value = uri
        .split(['?', ';'])
        .find_map(|a| a.strip_prefix("id="))
        .unwrap_or_else(|| panic!("no id= in {uri}"));
    value
        .split('%')
        .skip(1)
        .map(|h| u8::from_str_radix(h, 16).unwrap_or_else(|_| panic!("bad id in {uri}")))
        .collect()
}

/// A path attribute's text (percent-decoded; labels here are ASCII).
pub fn uri_attr(uri: &str, name: &str) -> Option<String> {
    let path = uri.strip_prefix("pkcs11:")?.split('?').next()?;
    path.split(';')
        .find_map(|a| a.strip_prefix(&format!("{name}=")))
        .map(|v| v.replace("%20", " "))
}

/// Hex of bytes, as pkcs11-tool's `--id` wants it.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
