//! Test fixture: imports a DPS symmetric key into a PKCS#11 token the way a
//! factory provisioning step would, as a secret key that may only sign
//! (HMAC) and never leave the token. OpenSC's pkcs11-tool cannot write a
//! CKK_GENERIC_SECRET and p11tool writes one that may not sign, hence this.
//!
//! Usage: p11-import-secret MODULE TOKEN_LABEL PIN_FILE OBJECT_LABEL ID_HEX KEY_FILE
//! (KEY_FILE holds the key in base64, as the Azure portal shows it; the token
//! is found through $SOFTHSM2_CONF like any SoftHSM2 client.)

use std::process::ExitCode;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [module, token_label, pin_file, label, id_hex, key_file] = args.as_slice() else {
        eprintln!(
            "usage: p11-import-secret MODULE TOKEN_LABEL PIN_FILE OBJECT_LABEL ID_HEX KEY_FILE"
        );
        return ExitCode::from(2);
    };
    match import(module, token_label, pin_file, label, id_hex, key_file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p11-import-secret: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn import(
    module: &str,
    token_label: &str,
    pin_file: &str,
    label: &str,
    id_hex: &str,
    key_file: &str,
) -> anyhow::Result<()> {
    let key = STANDARD.decode(std::fs::read_to_string(key_file)?.trim())?;
    let id = (0..id_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&id_hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()?;
    let pin = std::fs::read_to_string(pin_file)?.trim().to_string();
    let p11 = Pkcs11::new(module)?;
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let slot = p11
        .get_slots_with_token()?
        .into_iter()
        .find(|s| {
            p11.get_token_info(*s)
                .map(|t| t.label().trim() == token_label)
                .unwrap_or(false)
        })
        .ok_or_else(|| anyhow::anyhow!("no token labelled {token_label:?}"))?;
    let session = p11.open_rw_session(slot)?;
    session.login(UserType::User, Some(&AuthPin::new(pin.into())))?;
    session.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Verify(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id),
        Attribute::Value(key),
    ])?;
    Ok(())
}
