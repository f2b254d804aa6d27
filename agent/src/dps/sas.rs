//! Shared access signatures for DPS (protocol.md §4): the symmetric key as a
//! secret type, group-key derivation, and the token
//! `SharedAccessSignature sr=…&sig=…&se=…&skn=registration`. Owns no I/O: the
//! key file is read by the onboarding code, and a TPM signs through the same
//! string-to-sign.
//!
//! Secrets never leave this module in printable form: [`SymmetricKey`] and
//! [`SasToken`] have redacting `Debug`, no `Display`, and are zeroized on drop.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use zeroize::Zeroizing;

use super::wire::url_encode;

/// How long a token is valid. Short, and a fresh one is made for every
/// connection (MQTT) or request (HTTPS).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(5 * 60);

/// A DPS symmetric key (the decoded bytes). Never shown, zeroized on drop.
#[derive(Clone)]
pub struct SymmetricKey(Zeroizing<Vec<u8>>);

impl fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SymmetricKey(REDACTED)")
    }
}

/// Why a key text is unusable. The messages never contain the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyTextError {
    #[error("is empty")]
    Empty,
    #[error("is not base64 (the key as the Azure portal shows it, on one line)")]
    NotBase64,
    #[error("decodes to {0} bytes; a DPS key is at least 16 bytes (usually 64)")]
    TooShort(usize),
}

impl SymmetricKey {
    /// Reads a key as the portal shows it: standard base64, surrounding
    /// whitespace ignored.
    pub fn from_base64(text: &str) -> Result<SymmetricKey, KeyTextError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(KeyTextError::Empty);
        }
        let bytes = Zeroizing::new(
            STANDARD
                .decode(t.as_bytes())
                .map_err(|_| KeyTextError::NotBase64)?,
        );
        if bytes.len() < 16 {
            return Err(KeyTextError::TooShort(bytes.len()));
        }
        Ok(SymmetricKey(bytes))
    }

    /// A key from its bytes (a device key a PKCS#11 token derived).
    pub fn from_bytes(bytes: Vec<u8>) -> SymmetricKey {
        SymmetricKey(Zeroizing::new(bytes))
    }

    /// The device key of `registration_id` in the enrollment group whose key
    /// this is: HMAC-SHA256(group key, UTF-8 registration id). (Its base64 form
    /// is what the portal's "derive a device key" gives.)
    pub fn derive_device_key(&self, registration_id: &str) -> SymmetricKey {
        SymmetricKey(Zeroizing::new(self.sign(registration_id.as_bytes())))
    }

    /// HMAC-SHA256 of `data` with this key.
    pub fn sign(&self, data: &[u8]) -> Vec<u8> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        ring::hmac::sign(&key, data).as_ref().to_vec()
    }

    /// The key in base64, e.g. a derived device key for a message to a human
    /// who set it up. Only for tests and tooling; the agent never prints it.
    #[cfg(test)]
    pub fn to_base64(&self) -> String {
        STANDARD.encode(&*self.0)
    }
}

/// A SAS token: a bearer credential for a few minutes. Never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken(Zeroizing<String>);

impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SasToken(REDACTED)")
    }
}

impl SasToken {
    /// The token text, for the `Authorization` header or the MQTT password.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// What a DPS token is made for: `{idScope}/registrations/{registrationId}`,
/// and the expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenScope {
    resource: String,
    expiry: u64,
}

impl TokenScope {
    /// A token for `registration_id` valid [`TOKEN_LIFETIME`] from `now`.
    pub fn new(id_scope: &str, registration_id: &str, now: SystemTime) -> TokenScope {
        let now = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        TokenScope::with_expiry(id_scope, registration_id, now + TOKEN_LIFETIME.as_secs())
    }

    /// A token that expires at `expiry` (Unix seconds).
    pub fn with_expiry(id_scope: &str, registration_id: &str, expiry: u64) -> TokenScope {
        TokenScope {
            resource: format!("{id_scope}/registrations/{registration_id}"),
            expiry,
        }
    }

    /// The string the signature covers: `urlencode(resource) + "\n" + expiry`.
    pub fn string_to_sign(&self) -> String {
        format!("{}\n{}", url_encode(&self.resource), self.expiry)
    }

    /// The token around a signature (HMAC-SHA256 of [`Self::string_to_sign`]).
    pub fn token(&self, signature: &[u8]) -> SasToken {
        SasToken(Zeroizing::new(format!(
            "SharedAccessSignature sr={}&sig={}&se={}&skn=registration",
            url_encode(&self.resource),
            url_encode(&STANDARD.encode(signature)),
            self.expiry
        )))
    }

    /// Signs with a key in memory.
    pub fn sign_with(&self, key: &SymmetricKey) -> SasToken {
        self.token(&key.sign(self.string_to_sign().as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Computed independently with Python 3:
    //   key = base64.b64decode("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")  # bytes 0..31
    //   sr  = urllib.parse.quote("0ne00000000/registrations/gw-0001", safe="")
    //   sig = base64.b64encode(hmac.new(key, (sr + "\n1700000000").encode(), hashlib.sha256).digest())
    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const TOKEN: &str = "SharedAccessSignature sr=0ne00000000%2Fregistrations%2Fgw-0001&sig=YPHafNXAiCE5scjXsL2KYBOF6mNoWtE4plpEaodQTDM%3D&se=1700000000&skn=registration";

    #[test]
    fn token_matches_an_independent_computation() {
        let key = SymmetricKey::from_base64(&format!("  {KEY}\n")).unwrap();
        let scope = TokenScope::with_expiry("0ne00000000", "gw-0001", 1_700_000_000);
        assert_eq!(
            scope.string_to_sign(),
            "0ne00000000%2Fregistrations%2Fgw-0001\n1700000000"
        );
        assert_eq!(scope.sign_with(&key).expose(), TOKEN);
    }

    #[test]
    fn group_key_derivation_matches_an_independent_computation() {
        // base64(hmac.new(b64decode(group), b"gw-0001", sha256).digest()) in Python 3.
        let group =
            SymmetricKey::from_base64("Z3JvdXAta2V5LWZvci10ZXN0cy0wMTIzNDU2Nzg5YWI=").unwrap();
        assert_eq!(
            group.derive_device_key("gw-0001").to_base64(),
            "eAdjEnByaH7W+nRdII+itC3aNTm03BGAVn0m1navvYQ="
        );
    }

    #[test]
    fn expiry_is_five_minutes_ahead() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let scope = TokenScope::new("s", "r", now);
        assert!(scope.string_to_sign().ends_with("\n1300"));
    }

    #[test]
    fn bad_key_texts_are_refused_without_echoing_them() {
        assert!(matches!(
            SymmetricKey::from_base64(" \n"),
            Err(KeyTextError::Empty)
        ));
        assert!(matches!(
            SymmetricKey::from_base64("not base64!"),
            Err(KeyTextError::NotBase64)
        ));
        assert!(matches!(
            SymmetricKey::from_base64("AAAA"),
            Err(KeyTextError::TooShort(3))
        ));
    }

    #[test]
    fn secrets_are_never_printed() {
        let key = SymmetricKey::from_base64(KEY).unwrap();
        let token = TokenScope::with_expiry("s", "r", 1).sign_with(&key);
        assert_eq!(format!("{key:?}"), "SymmetricKey(REDACTED)");
        assert_eq!(format!("{token:?}"), "SasToken(REDACTED)");
        assert!(!format!("{:?}", Some(&token)).contains("sig="));
    }
}
