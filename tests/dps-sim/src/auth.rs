//! Enrollments other than X.509 and their checks: symmetric keys (`--symmetric-key` individual
//! enrollments, `--group-key` enrollment groups whose device keys are derived as
//! HMAC-SHA256(group key, registration id)), TPM enrollments (`--tpm-enrollment`, an EK
//! public area) with the attestation challenge, and the verification of the SAS tokens
//! devices present (protocol.md §4): resource, expiry, `skn` and the HMAC, for real. The
//! simulator's clock for expiry can be moved (`--clock-offset`) to play a device whose clock
//! is wrong. Secrets are never written to events or messages.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::hmac;

use crate::topics::url_decode;
use crate::tpm::{activation_blob, RsaPublicArea};

/// A base64 key on the command line, `NAME=BASE64`.
#[derive(Clone)]
pub struct NamedKey {
    pub name: String,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for NamedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NamedKey({}, REDACTED)", self.name)
    }
}

impl std::str::FromStr for NamedKey {
    type Err = String;

    /// `NAME=BASE64KEY`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, key) = s
            .split_once('=')
            .ok_or_else(|| "expected NAME=BASE64KEY".to_string())?;
        if name.is_empty() {
            return Err("the name before '=' is empty".into());
        }
        let key = STANDARD
            .decode(key.trim())
            .map_err(|_| format!("the key of {name:?} is not base64"))?;
        if key.is_empty() {
            return Err(format!("the key of {name:?} is empty"));
        }
        Ok(NamedKey {
            name: name.to_string(),
            key,
        })
    }
}

/// `REGID=EKPUB` where EKPUB is the base64 TPM2B_PUBLIC of the endorsement key, or
/// `REGID=@FILE` with that base64 text (or the raw TPM2B_PUBLIC) in a file.
#[derive(Debug, Clone)]
pub struct TpmEnrollment {
    pub registration_id: String,
    pub endorsement_key: Vec<u8>,
}

impl std::str::FromStr for TpmEnrollment {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (id, value) = s
            .split_once('=')
            .ok_or_else(|| "expected REGID=BASE64_EK_TPM2B_PUBLIC or REGID=@FILE".to_string())?;
        if id.is_empty() {
            return Err("the registration id before '=' is empty".into());
        }
        let bytes = match value.strip_prefix('@') {
            Some(path) => {
                let raw = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
                let text: String = String::from_utf8_lossy(&raw)
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .collect();
                STANDARD.decode(text.as_bytes()).unwrap_or(raw)
            }
            None => STANDARD
                .decode(value.trim())
                .map_err(|_| format!("the EK of {id:?} is not base64"))?,
        };
        RsaPublicArea::parse_tpm2b(&bytes).map_err(|e| {
            format!("the EK of {id:?} is not a TPM2B_PUBLIC the simulator can use: {e}")
        })?;
        Ok(TpmEnrollment {
            registration_id: id.to_string(),
            endorsement_key: bytes,
        })
    }
}

/// How a device proved itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// A SAS token with the key of its individual enrollment.
    IndividualKey,
    /// A SAS token with the device key derived from this enrollment group's key.
    GroupKey(String),
    /// A SAS token with the key the TPM activated.
    Tpm,
}

impl Proof {
    /// For the events file.
    pub fn enrollment(&self) -> String {
        match self {
            Proof::IndividualKey => "individual".into(),
            Proof::GroupKey(name) => format!("group:{name}"),
            Proof::Tpm => "tpm".into(),
        }
    }
}

/// The TPM state of one registration id: K from the last challenge, and the keys it was
/// built for.
struct TpmState {
    key: Vec<u8>,
    ek: RsaPublicArea,
    srk: RsaPublicArea,
}

/// The symmetric-key and TPM enrollments.
pub struct Enrollments {
    id_scope: String,
    individual: HashMap<String, Vec<u8>>,
    groups: Vec<NamedKey>,
    tpm: HashMap<String, Vec<u8>>,
    clock_offset: i64,
    tpm_state: Mutex<HashMap<String, TpmState>>,
}

impl std::fmt::Debug for Enrollments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollments")
            .field("individual", &self.individual.keys().collect::<Vec<_>>())
            .field(
                "groups",
                &self.groups.iter().map(|g| &g.name).collect::<Vec<_>>(),
            )
            .field("tpm", &self.tpm.keys().collect::<Vec<_>>())
            .field("clock_offset", &self.clock_offset)
            .finish()
    }
}

/// The TPM challenge answer, or why there is none.
pub enum Challenge {
    /// `authenticationKey` (the blob, before base64).
    Blob(Vec<u8>),
    Refused(String),
}

impl Enrollments {
    pub fn new(
        id_scope: &str,
        individual: &[NamedKey],
        groups: &[NamedKey],
        tpm: &[TpmEnrollment],
        clock_offset_secs: i64,
    ) -> Enrollments {
        Enrollments {
            id_scope: id_scope.to_string(),
            individual: individual
                .iter()
                .map(|k| (k.name.clone(), k.key.clone()))
                .collect(),
            groups: groups.to_vec(),
            tpm: tpm
                .iter()
                .map(|t| (t.registration_id.clone(), t.endorsement_key.clone()))
                .collect(),
            clock_offset: clock_offset_secs,
            tpm_state: Mutex::new(HashMap::new()),
        }
    }

    /// Now, by the simulator's (possibly offset) clock, in Unix seconds.
    pub fn now(&self) -> i64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs() as i64;
        real + self.clock_offset
    }

    /// Whether `registration_id` has a TPM enrollment.
    pub fn is_tpm(&self, registration_id: &str) -> bool {
        self.tpm.contains_key(registration_id)
    }

    /// Checks a SAS token (`SharedAccessSignature sr=…&sig=…&se=…[&skn=…]`) for
    /// `registration_id`; the error is the refusal reason (events and error bodies).
    pub fn verify_sas(&self, token: &str, registration_id: &str) -> Result<Proof, String> {
        let fields = token
            .trim()
            .strip_prefix("SharedAccessSignature ")
            .ok_or_else(|| "the credential is not a SharedAccessSignature token".to_string())?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for pair in fields.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "sr" => sr = Some(v),
                "sig" => sig = Some(v),
                "se" => se = Some(v),
                "skn" => skn = Some(v),
                _ => {}
            }
        }
        let missing = |f: &str| format!("the SAS token has no {f}");
        let sr = sr.ok_or_else(|| missing("sr"))?;
        let sig = sig.ok_or_else(|| missing("sig"))?;
        let se = se.ok_or_else(|| missing("se"))?;
        let expected = format!("{}/registrations/{registration_id}", self.id_scope);
        let resource = url_decode(sr).map_err(|_| "sr is not URL-encoded correctly".to_string())?;
        // DPS compares the resource without regard to case (aziot lowercases it).
        if !resource.eq_ignore_ascii_case(&expected) {
            return Err(format!(
                "the SAS token is for {resource:?}, not for {expected:?}"
            ));
        }
        let expiry: i64 = se
            .parse()
            .map_err(|_| format!("se={se:?} is not a Unix time"))?;
        let now = self.now();
        if expiry <= now {
            return Err(format!(
                "the SAS token expired {}s ago (se={expiry}, simulator clock {now}); the device clock may be wrong",
                now - expiry
            ));
        }
        if let Some(name) = skn {
            if name != "registration" {
                return Err(format!("skn={name:?} is not \"registration\""));
            }
        }
        let signature = url_decode(sig)
            .ok()
            .and_then(|s| STANDARD.decode(s.as_bytes()).ok())
            .ok_or_else(|| "sig is not base64".to_string())?;
        let signed = format!("{sr}\n{se}");
        let ok = |key: &[u8]| {
            hmac::verify(
                &hmac::Key::new(hmac::HMAC_SHA256, key),
                signed.as_bytes(),
                &signature,
            )
            .is_ok()
        };
        if let Some(key) = self.individual.get(registration_id) {
            return if ok(key) {
                Ok(Proof::IndividualKey)
            } else {
                Err("the signature does not match the individual enrollment's key".into())
            };
        }
        if let Some(state) = self.tpm_state().get(registration_id) {
            return if ok(&state.key) {
                Ok(Proof::Tpm)
            } else {
                Err("the signature does not match the key of the TPM challenge".into())
            };
        }
        if self.is_tpm(registration_id) {
            return Err(
                "a TPM enrollment: register without Authorization first to get the TPM challenge"
                    .into(),
            );
        }
        for group in &self.groups {
            let device_key = hmac::sign(
                &hmac::Key::new(hmac::HMAC_SHA256, &group.key),
                registration_id.as_bytes(),
            );
            if ok(device_key.as_ref()) {
                return Ok(Proof::GroupKey(group.name.clone()));
            }
        }
        if self.groups.is_empty() {
            Err(format!(
                "no symmetric-key enrollment for registration id {registration_id:?}"
            ))
        } else {
            Err("the signature matches no enrollment: neither an individual key nor a key derived from an enrollment group".into())
        }
    }

    fn tpm_state(&self) -> std::sync::MutexGuard<'_, HashMap<String, TpmState>> {
        self.tpm_state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The TPM challenge for a registration without Authorization that carries
    /// `tpm.endorsementKey` / `tpm.storageRootKey` (base64 TPM2B_PUBLIC): checks the EK against
    /// the enrollment, makes a fresh K and wraps it for this TPM. K replaces any earlier one.
    pub fn tpm_challenge(&self, registration_id: &str, ek_b64: &str, srk_b64: &str) -> Challenge {
        let Some(enrolled) = self.tpm.get(registration_id) else {
            return Challenge::Refused(format!(
                "no TPM enrollment for registration id {registration_id:?}"
            ));
        };
        let decode = |what: &str, b64: &str| {
            STANDARD
                .decode(b64.trim())
                .map_err(|_| format!("tpm.{what} is not base64"))
        };
        let (ek, srk) = match (
            decode("endorsementKey", ek_b64),
            decode("storageRootKey", srk_b64),
        ) {
            (Ok(e), Ok(s)) => (e, s),
            (Err(e), _) | (_, Err(e)) => return Challenge::Refused(e),
        };
        if &ek != enrolled {
            return Challenge::Refused(format!(
                "the endorsement key is not the one enrolled for registration id {registration_id:?}"
            ));
        }
        let (ek, srk) = match (
            RsaPublicArea::parse_tpm2b(&ek),
            RsaPublicArea::parse_tpm2b(&srk),
        ) {
            (Ok(e), Ok(s)) => (e, s),
            (Err(e), _) => return Challenge::Refused(format!("tpm.endorsementKey: {e}")),
            (_, Err(e)) => return Challenge::Refused(format!("tpm.storageRootKey: {e}")),
        };
        let key: [u8; 32] = rand::random();
        match activation_blob(&ek, &srk, &key) {
            Ok(blob) => {
                self.tpm_state().insert(
                    registration_id.to_string(),
                    TpmState {
                        key: key.to_vec(),
                        ek,
                        srk,
                    },
                );
                Challenge::Blob(blob)
            }
            Err(e) => Challenge::Refused(format!("cannot build the challenge: {e}")),
        }
    }

    /// For an assigned TPM registration: a second blob carrying the device's IoT Hub key
    /// (registrationState.tpm.authenticationKey), made like the challenge for the same TPM.
    pub fn tpm_hub_key_blob(&self, registration_id: &str) -> Option<Vec<u8>> {
        let state = self.tpm_state();
        let s = state.get(registration_id)?;
        let hub_key: [u8; 32] = rand::random();
        activation_blob(&s.ek, &s.srk, &hub_key).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Same vector as the agent's unit test (computed with Python 3 hmac).
    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const TOKEN: &str = "SharedAccessSignature sr=0ne00000000%2Fregistrations%2Fgw-0001&sig=YPHafNXAiCE5scjXsL2KYBOF6mNoWtE4plpEaodQTDM%3D&se=1700000000&skn=registration";
    const SE: i64 = 1_700_000_000;

    fn key(name: &str, b64: &str) -> NamedKey {
        format!("{name}={b64}").parse().unwrap()
    }

    /// Enrollments whose clock reads `se - 10` (so TOKEN is valid).
    fn enrollments(individual: &[NamedKey], groups: &[NamedKey]) -> Enrollments {
        let real = Enrollments::new("0ne00000000", &[], &[], &[], 0).now();
        Enrollments::new("0ne00000000", individual, groups, &[], SE - 10 - real)
    }

    #[test]
    fn an_individual_token_verifies() {
        let e = enrollments(&[key("gw-0001", KEY)], &[]);
        assert_eq!(e.verify_sas(TOKEN, "gw-0001"), Ok(Proof::IndividualKey));
        // Without skn it is accepted too (the Python SDK sends none).
        let no_skn = TOKEN.replace("&skn=registration", "");
        assert_eq!(e.verify_sas(&no_skn, "gw-0001"), Ok(Proof::IndividualKey));
    }

    #[test]
    fn bad_tokens_say_why() {
        let e = enrollments(&[key("gw-0001", KEY)], &[]);
        let check = |token: &str, reg: &str, want: &str| {
            let err = e.verify_sas(token, reg).unwrap_err();
            assert!(err.contains(want), "{token}: {err}");
            assert!(!err.contains(KEY));
        };
        check(
            &TOKEN.replace("YPHaf", "ZPHaf"),
            "gw-0001",
            "does not match the individual",
        );
        check(
            TOKEN,
            "gw-0002",
            "not for \"0ne00000000/registrations/gw-0002\"",
        );
        let other = enrollments(&[key("gw-0002", KEY)], &[]);
        let err = other.verify_sas(TOKEN, "gw-0001").unwrap_err();
        assert!(
            err.contains("no symmetric-key enrollment for registration id"),
            "{err}"
        );
        check(
            &TOKEN.replace("se=1700000000", "se=1700000001"),
            "gw-0001",
            "does not match",
        );
        check(
            &TOKEN.replace("skn=registration", "skn=owner"),
            "gw-0001",
            "skn",
        );
        check(&TOKEN.replace("gw-0001&", "gw-0002&"), "gw-0001", "not for");
        check(&TOKEN.replace("&sig=", "&xsig="), "gw-0001", "no sig");
        check("Bearer abc", "gw-0001", "not a SharedAccessSignature");
    }

    #[test]
    fn expired_tokens_are_refused() {
        let real = Enrollments::new("0ne00000000", &[], &[], &[], 0).now();
        let late = Enrollments::new(
            "0ne00000000",
            &[key("gw-0001", KEY)],
            &[],
            &[],
            SE + 60 - real,
        );
        let err = late.verify_sas(TOKEN, "gw-0001").unwrap_err();
        assert!(err.contains("expired 60s ago"), "{err}");
        // Exactly at se it is expired too.
        let at = Enrollments::new("0ne00000000", &[key("gw-0001", KEY)], &[], &[], SE - real);
        assert!(at.verify_sas(TOKEN, "gw-0001").is_err());
    }

    #[test]
    fn group_keys_derive_device_keys() {
        // Device key of gw-0001 in this group (Python 3: base64(hmac(group, b"gw-0001"))):
        // eAdjEnByaH7W+nRdII+itC3aNTm03BGAVn0m1navvYQ=
        let group = key("fleet", "Z3JvdXAta2V5LWZvci10ZXN0cy0wMTIzNDU2Nzg5YWI=");
        let device_key = STANDARD
            .decode("eAdjEnByaH7W+nRdII+itC3aNTm03BGAVn0m1navvYQ=")
            .unwrap();
        let sr = "0ne00000000%2Fregistrations%2Fgw-0001";
        let sig = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &device_key),
            format!("{sr}\n{SE}").as_bytes(),
        );
        let token = format!(
            "SharedAccessSignature sr={sr}&sig={}&se={SE}&skn=registration",
            crate::topics::url_encode(&STANDARD.encode(sig.as_ref()))
        );
        let other = key("other", KEY);
        let e = enrollments(&[], &[other.clone(), group.clone()]);
        assert_eq!(
            e.verify_sas(&token, "gw-0001"),
            Ok(Proof::GroupKey("fleet".into()))
        );
        // The group key itself (not derived) does not verify.
        let e = enrollments(&[], &[other]);
        let err = e.verify_sas(&token, "gw-0001").unwrap_err();
        assert!(err.contains("matches no enrollment"), "{err}");
        // An individual enrollment takes precedence over groups.
        let e = enrollments(&[key("gw-0001", KEY)], &[group]);
        assert!(e.verify_sas(&token, "gw-0001").is_err());
    }

    #[test]
    fn key_arguments() {
        assert!("gw-0001".parse::<NamedKey>().is_err());
        assert!("=QUJD".parse::<NamedKey>().is_err());
        assert!("a=!!".parse::<NamedKey>().is_err());
        assert!(!format!("{:?}", key("a", KEY)).contains(KEY));
        assert!("gw=QUJD".parse::<TpmEnrollment>().is_err());
    }

    #[test]
    fn tpm_challenge_refusals() {
        let e = Enrollments::new("0ne00000000", &[], &[], &[], 0);
        let Challenge::Refused(why) = e.tpm_challenge("gw-0001", "QUJD", "QUJD") else {
            panic!()
        };
        assert!(why.contains("no TPM enrollment"), "{why}");
    }
}
