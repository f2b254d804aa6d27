use super::*;

const GOOD: &str = r#"
[dps]
global_endpoint = "127.0.0.1:18883"
id_scope = "0ne00000000"
registration_id = "gw-0001"
trust_bundle = "/etc/dps-agent/server-ca.pem"

[dps.attestation]
method = "x509"
identity_cert = "/etc/dps-agent/bootstrap/device-full-chain.pem"
identity_key = "file:/etc/dps-agent/bootstrap/device.key"

[operational]
key_backend = "file"
key_algorithm = "ecdsa-p256"
renew_before = "2d"

[state]
dir = "/tmp/state"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_str(Path::new("/etc/dps-agent/config.toml"), text)
}

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn good_config_and_defaults() {
    let c = parse(GOOD).unwrap();
    assert_eq!(
        c.dps.endpoint,
        Endpoint {
            host: "127.0.0.1".into(),
            port: 18883
        }
    );
    assert_eq!(c.dps.api_version, "2025-07-01-preview");
    assert_eq!(c.dps.transport, Transport::Mqtt);
    assert_eq!(c.operational.key_algorithm, KeyAlgorithm::EcdsaP256);
    assert_eq!(c.operational.renew_before.to_string(), "2d");
    assert_eq!(c.operational.renew_jitter.to_string(), "6h");
    assert!(c.operational.rotate_key);
    assert_eq!(c.hub.port, 8883);
    assert_eq!(c.state.key_dir(), PathBuf::from("/tmp/state/keys"));
    assert_eq!(c.dbus.bus, BusChoice::System);
    assert!(matches!(c.dps.attestation, Attestation::X509 { .. }));
}

#[test]
fn endpoint_default_port() {
    let c = parse(&GOOD.replace("127.0.0.1:18883", "dps.example.net")).unwrap();
    assert_eq!(c.dps.endpoint.port, 8883);
    let e = err(&GOOD.replace("127.0.0.1:18883", "https://dps.example.net/"));
    assert!(e.contains("write the host only"), "{e}");
    let e = err(&GOOD.replace("127.0.0.1:18883", "h:99999"));
    assert!(e.contains("invalid port"), "{e}");
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let e = err(&GOOD.replace("renew_before = \"2d\"", "renew_befor = \"2d\""));
    assert!(
        e.starts_with("/etc/dps-agent/config.toml:16: [operational] renew_befor"),
        "{e}"
    );
    assert!(e.contains("unknown field"), "{e}");
    assert!(e.contains("remove or rename it"), "{e}");
}

#[test]
fn unknown_section() {
    let e = err(&format!("{GOOD}\n[bogus]\nx = 1\n"));
    assert!(e.contains("unknown field `bogus`"), "{e}");
}

#[test]
fn wrong_type_names_key_and_value() {
    let e = err(&format!("{GOOD}\n[hub]\nport = \"8883\"\n"));
    assert!(e.contains("[hub] port = \"8883\""), "{e}");
    assert!(e.contains("invalid type"), "{e}");
}

#[test]
fn missing_key() {
    let e = err(&GOOD.replace("id_scope = \"0ne00000000\"\n", ""));
    assert_eq!(
        e,
        "/etc/dps-agent/config.toml: [dps] id_scope is missing (add `id_scope = …` under [dps]); copy the ID Scope from the DPS overview page in the Azure portal"
    );
}

#[test]
fn bad_values_name_key_value_and_fix() {
    let e = err(&GOOD.replace("ecdsa-p256", "ecdsa-p521"));
    assert_eq!(
        e,
        "/etc/dps-agent/config.toml:15: [operational] key_algorithm = \"ecdsa-p521\" is not supported; use \"ecdsa-p384\" or \"ecdsa-p256\""
    );
    let e = err(&GOOD.replace("\"2d\"", "\"2 weeks\""));
    assert!(
        e.contains("[operational] renew_before = \"2 weeks\" is not a duration; unknown unit"),
        "{e}"
    );
    let e = err(&GOOD.replace("\"file\"", "\"floppy\""));
    assert!(
        e.contains(
            "key_backend = \"floppy\" is not a key backend; use \"tpm\", \"pkcs11\" or \"file\""
        ),
        "{e}"
    );
    let e = err(&GOOD.replace("/tmp/state", "state"));
    assert!(
        e.contains("[state] dir = \"state\" is not an absolute path"),
        "{e}"
    );
    let e = err(&GOOD.replace("file:/etc", "/etc"));
    assert!(e.contains("[dps.attestation] identity_key"), "{e}");
    assert!(e.contains("no scheme"), "{e}");
}

#[test]
fn registration_ids() {
    for good in ["gw-0001", "a", "dev.1:x_y", &"a".repeat(128)] {
        assert!(validate::check_registration_id(good).is_ok(), "{good}");
    }
    for bad in ["", "GW-1", "-gw", "gw-", "gw 1", "gw/1", &"a".repeat(129)] {
        assert!(validate::check_registration_id(bad).is_err(), "{bad}");
    }
    let e = err(&GOOD.replace("gw-0001", "GW-0001"));
    assert!(e.contains("uppercase"), "{e}");
}

#[test]
fn api_version_must_support_csr() {
    let e = err(&GOOD.replace("[dps]\n", "[dps]\napi_version = \"2021-06-01\"\n"));
    assert!(e.contains("does not support certificate issuance"), "{e}");
    assert!(parse(&GOOD.replace("[dps]\n", "[dps]\napi_version = \"2026-04-01\"\n")).is_ok());
}

#[test]
fn tpm_over_mqtt_points_to_https() {
    let e = err(&GOOD.replace("method = \"x509\"", "method = \"tpm\""));
    assert!(e.contains("transport = \"https\""), "{e}");
}

/// GOOD with another `[dps.attestation]` table and transport.
fn with_attestation(transport: &str, attestation: &str) -> String {
    let start = GOOD.find("method = \"x509\"").unwrap();
    let end = GOOD.find("[operational]").unwrap();
    format!("{}{attestation}\n\n{}", &GOOD[..start], &GOOD[end..])
        .replace("[dps]\n", &format!("[dps]\ntransport = \"{transport}\"\n"))
}

#[test]
fn https_symmetric_key_and_tpm() {
    let c = parse(&with_attestation(
        "https",
        "method = \"symmetric_key\"\nkey_file = \"/etc/dps-agent/dps.key\"",
    ))
    .unwrap();
    assert_eq!(c.dps.transport, Transport::Https);
    assert_eq!(c.dps.endpoint.port, 18883);
    assert_eq!(
        c.dps.attestation,
        Attestation::SymmetricKey {
            key: SymmetricKeySource::File(PathBuf::from("/etc/dps-agent/dps.key")),
            enrollment: Enrollment::Individual
        }
    );
    // A secret key in a PKCS#11 token, by URI; other object types are refused.
    let token = "pkcs11:token=hsm;object=dps;type=secret-key";
    let c = parse(&with_attestation(
        "mqtt",
        &format!("method = \"symmetric_key\"\nkey_file = \"{token}\""),
    ))
    .unwrap();
    assert_eq!(
        c.dps.attestation,
        Attestation::SymmetricKey {
            key: SymmetricKeySource::Token(KeyUri::parse(token).unwrap()),
            enrollment: Enrollment::Individual
        }
    );
    for uri in [
        "pkcs11:token=hsm;object=dps",
        "pkcs11:object=dps;type=private",
    ] {
        let e = err(&with_attestation(
            "mqtt",
            &format!("method = \"symmetric_key\"\nkey_file = \"{uri}\""),
        ));
        assert!(
            e.contains("key_file")
                && e.contains("does not name a secret key; add ;type=secret-key"),
            "{e}"
        );
    }
    let e = err(&with_attestation(
        "mqtt",
        "method = \"symmetric_key\"\nkey_file = \"pkcs11:object=dps;type=secret-key;pin-value=1234\"",
    ));
    assert!(!e.contains("1234"), "{e}");
    let c = parse(&with_attestation(
        "mqtt",
        "method = \"symmetric_key\"\nkey_file = \"/k\"\nenrollment = \"group\"",
    ))
    .unwrap();
    assert!(matches!(
        c.dps.attestation,
        Attestation::SymmetricKey {
            enrollment: Enrollment::Group,
            ..
        }
    ));
    let c = parse(
        &with_attestation("https", "method = \"tpm\"")
            .replace("127.0.0.1:18883", "dps.example.net"),
    )
    .unwrap();
    assert_eq!(c.dps.attestation, Attestation::Tpm);
    assert_eq!(c.dps.endpoint.port, 443);

    let e = err(&with_attestation("https", "method = \"symmetric_key\""));
    assert!(e.contains("[dps.attestation] key_file is missing"), "{e}");
    let e = err(&with_attestation(
        "https",
        "method = \"symmetric_key\"\nkey_file = \"/k\"\nenrollment = \"fleet\"",
    ));
    assert!(
        e.contains("enrollment = \"fleet\" is not an enrollment kind"),
        "{e}"
    );
    let e = err(&with_attestation(
        "https",
        "method = \"symmetric_key\"\nkey_file = \"k\"",
    ));
    assert!(e.contains("is not an absolute path"), "{e}");
    let e = err(&with_attestation(
        "https",
        "method = \"tpm\"\nkey_file = \"/k\"",
    ));
    assert!(
        e.contains("only applies to method = \"symmetric_key\""),
        "{e}"
    );
    let e = err(&with_attestation(
        "https",
        "method = \"symmetric_key\"\nkey_file = \"/k\"\nidentity_cert = \"/c.pem\"",
    ));
    assert!(
        e.contains("identity_cert only applies to method = \"x509\""),
        "{e}"
    );
}

#[test]
fn payload_becomes_json() {
    let c =
        parse(&GOOD.replace("[dps]\n", "[dps]\npayload = { modelId = \"dtmi:x;1\" }\n")).unwrap();
    assert_eq!(c.dps.payload.unwrap()["modelId"], "dtmi:x;1");
}

#[test]
fn drop_ins_override_and_are_named() {
    let dir = std::env::temp_dir().join(format!("cfg-{}", rand::random::<u64>()));
    std::fs::create_dir_all(dir.join("config.d")).unwrap();
    let main = dir.join("config.toml");
    std::fs::write(&main, GOOD).unwrap();
    std::fs::write(
        dir.join("config.d/10-local.toml"),
        "[operational]\nrenew_before = \"3d\"\n",
    )
    .unwrap();
    let c = Config::load(&main).unwrap();
    assert_eq!(c.operational.renew_before.to_string(), "3d");
    assert_eq!(c.operational.key_algorithm, KeyAlgorithm::EcdsaP256);
    assert_eq!(c.files.len(), 2);
    std::fs::write(
        dir.join("config.d/20-bad.toml"),
        "[operational]\n\nrenew_jitter = \"soon\"\n",
    )
    .unwrap();
    let e = Config::load(&main).unwrap_err().to_string();
    assert!(
        e.contains("20-bad.toml:3: [operational] renew_jitter = \"soon\""),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_file_says_how_to_fix() {
    let e = Config::load(Path::new("/nonexistent/config.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot be read"), "{e}");
    assert!(e.contains("--config"), "{e}");
}

#[test]
fn syntax_error_has_line() {
    let e = err("[dps\nid_scope = 1\n");
    assert!(e.starts_with("/etc/dps-agent/config.toml:1:"), "{e}");
}

#[test]
fn shipped_config_is_valid() {
    let text = include_str!("../../../config/config.toml");
    let c = parse(text).unwrap();
    assert_eq!(c.dps.registration_id, "gw-0001");
    assert_eq!(c.operational.renew_before.to_string(), "7d");
}

#[test]
fn issuer_trust_is_an_absolute_path_and_off_by_default() {
    assert_eq!(parse(GOOD).unwrap().operational.issuer_trust, None);
    let with = |v: &str| {
        GOOD.replace(
            "renew_before = \"2d\"\n",
            &format!("renew_before = \"2d\"\nissuer_trust = \"{v}\"\n"),
        )
    };
    let c = parse(&with("/etc/dps-agent/adr-roots.pem")).unwrap();
    assert_eq!(
        c.operational.issuer_trust,
        Some(PathBuf::from("/etc/dps-agent/adr-roots.pem"))
    );
    let e = err(&with("adr-roots.pem"));
    assert!(
        e.contains("[operational] issuer_trust = \"adr-roots.pem\"")
            && e.contains("not an absolute path"),
        "{e}"
    );
}
