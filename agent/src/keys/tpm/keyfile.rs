//! The `TSS2 PRIVATE KEY` file (draft-bottomley-tpm2-keys, the form tpm2-openssl,
//! tpm2-tss-engine and the Linux kernel read): a TPM-wrapped key blob and its
//! parent handle, DER inside PEM. Pure encoding and decoding: it never talks to a
//! TPM and never sees key material in the clear (the private part is encrypted
//! to the parent key inside the TPM).
//!
//! Written with the five fields tpm2-openssl understands (type, emptyAuth, parent,
//! pubkey, privkey). Read leniently: `emptyAuth` as any non-zero byte (tpm2-openssl
//! writes 0x01), the parent as a positive or a legacy negative INTEGER.

use base64::Engine as _;

/// The PEM label.
pub const PEM_LABEL: &str = "TSS2 PRIVATE KEY";

/// `TPM_RH_OWNER`: the parent is the owner-hierarchy primary made from the standard
/// ECC P-256 template (re-created on demand, never stored).
pub const PARENT_OWNER: u32 = 0x4000_0001;

/// id-loadablekey 2.23.133.10.1.3 (DER content octets).
const OID_LOADABLE: &[u8] = &[0x67, 0x81, 0x05, 0x0A, 0x01, 0x03];
/// id-importablekey 2.23.133.10.1.4.
const OID_IMPORTABLE: &[u8] = &[0x67, 0x81, 0x05, 0x0A, 0x01, 0x04];
/// id-sealedkey 2.23.133.10.1.5.
const OID_SEALED: &[u8] = &[0x67, 0x81, 0x05, 0x0A, 0x01, 0x05];

const TAG_BOOLEAN: u8 = 0x01;
const TAG_INTEGER: u8 = 0x02;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;
/// `[n] EXPLICIT`: context-specific, constructed.
const fn ctx(n: u8) -> u8 {
    0xA0 | n
}

/// A loadable TPM key: what the file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmKeyFile {
    /// The key needs no password (emptyAuth TRUE). Keys with a password are
    /// refused when opened.
    pub empty_auth: bool,
    /// The parent handle: [`PARENT_OWNER`] (or 0, the same) for the re-created
    /// owner primary, or a persistent handle such as 0x81000001.
    pub parent: u32,
    /// Marshalled TPM2B_PUBLIC, with its u16 size.
    pub public: Vec<u8>,
    /// Marshalled TPM2B_PRIVATE, with its u16 size.
    pub private: Vec<u8>,
}

/// Why a key file cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyFileError(String);

fn bad<T>(reason: impl Into<String>) -> Result<T, KeyFileError> {
    Err(KeyFileError(reason.into()))
}

impl TpmKeyFile {
    /// Whether the parent is the owner primary re-created from the template
    /// (tpm2-openssl treats 0 like TPM_RH_OWNER).
    pub fn parent_is_owner_primary(&self) -> bool {
        self.parent == PARENT_OWNER || self.parent == 0
    }

    /// The TPM2B_PUBLIC contents (without the size).
    pub fn public_area(&self) -> &[u8] {
        &self.public[2..]
    }

    /// The TPM2B_PRIVATE contents (without the size).
    pub fn private_area(&self) -> &[u8] {
        &self.private[2..]
    }

    /// Makes a file from the TPM2B contents TPM2_Create returned.
    pub fn new(parent: u32, public_area: &[u8], private_area: &[u8]) -> Result<Self, KeyFileError> {
        Ok(TpmKeyFile {
            empty_auth: true,
            parent,
            public: tpm2b(public_area, "public area")?,
            private: tpm2b(private_area, "private area")?,
        })
    }

    /// DER encoding: SEQUENCE { OID, [0] BOOLEAN TRUE, INTEGER parent,
    /// OCTET STRING pub, OCTET STRING priv }.
    pub fn to_der(&self) -> Vec<u8> {
        let mut body = Vec::new();
        push_tlv(&mut body, TAG_OID, OID_LOADABLE);
        if self.empty_auth {
            let mut boolean = Vec::new();
            push_tlv(&mut boolean, TAG_BOOLEAN, &[0xFF]);
            push_tlv(&mut body, ctx(0), &boolean);
        }
        push_tlv(&mut body, TAG_INTEGER, &der_positive_integer(self.parent));
        push_tlv(&mut body, TAG_OCTET_STRING, &self.public);
        push_tlv(&mut body, TAG_OCTET_STRING, &self.private);
        let mut out = Vec::with_capacity(body.len() + 4);
        push_tlv(&mut out, TAG_SEQUENCE, &body);
        out
    }

    /// PEM text with 64-character base64 lines.
    pub fn to_pem(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.to_der());
        let mut pem = format!("-----BEGIN {PEM_LABEL}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            // base64 output is ASCII, so every chunk is valid UTF-8.
            pem.push_str(&String::from_utf8_lossy(chunk));
            pem.push('\n');
        }
        pem.push_str(&format!("-----END {PEM_LABEL}-----\n"));
        pem
    }

    /// Reads PEM text.
    pub fn from_pem(text: &str) -> Result<Self, KeyFileError> {
        let begin = format!("-----BEGIN {PEM_LABEL}-----");
        let end = format!("-----END {PEM_LABEL}-----");
        let mut lines = text.lines().map(str::trim);
        let mut found = false;
        for line in lines.by_ref() {
            if line == begin {
                found = true;
                break;
            }
            if let Some(label) = line
                .strip_prefix("-----BEGIN ")
                .and_then(|l| l.strip_suffix("-----"))
            {
                return bad(format!(
                    "PEM block \"{label}\" is not a TPM key (expected \"{PEM_LABEL}\"); software keys are named file:/…"
                ));
            }
        }
        if !found {
            return bad(format!(
                "not a PEM file (no -----BEGIN {PEM_LABEL}----- line)"
            ));
        }
        let mut b64 = String::new();
        let mut ended = false;
        for line in lines {
            if line == end {
                ended = true;
                break;
            }
            b64.push_str(line);
        }
        if !ended {
            return bad(format!(
                "the PEM block has no -----END {PEM_LABEL}----- line"
            ));
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .or_else(|e| bad(format!("the PEM block is not valid base64: {e}")))?;
        Self::from_der(&der)
    }

    /// Reads DER (leniently, see the module comment).
    pub fn from_der(der: &[u8]) -> Result<Self, KeyFileError> {
        let (tag, body, rest) = read_tlv(der)?;
        if tag != TAG_SEQUENCE || !rest.is_empty() {
            return bad("not a TPMKey structure (expected one DER SEQUENCE)");
        }
        let (tag, oid, mut rest) = read_tlv(body)?;
        if tag != TAG_OID {
            return bad("TPMKey does not start with an OBJECT IDENTIFIER");
        }
        match oid {
            OID_LOADABLE => {}
            OID_IMPORTABLE => {
                return bad("the file holds an importable key (2.23.133.10.1.4); import it first: only loadable keys (2.23.133.10.1.3) are supported")
            }
            OID_SEALED => {
                return bad("the file holds sealed data (2.23.133.10.1.5), not a signing key")
            }
            _ => return bad("unknown TPMKey type OID; only loadable keys (2.23.133.10.1.3) are supported"),
        }
        let mut empty_auth = false;
        let parent = loop {
            let (tag, content, next) = read_tlv(rest)?;
            rest = next;
            match tag {
                t if t == ctx(0) => {
                    let (t, b, after) = read_tlv(content)?;
                    if t != TAG_BOOLEAN || b.len() != 1 || !after.is_empty() {
                        return bad("emptyAuth [0] is not a BOOLEAN");
                    }
                    // Any non-zero byte is TRUE (tpm2-openssl writes 0x01).
                    empty_auth = b[0] != 0;
                }
                t if t == ctx(1) || t == ctx(3) => {
                    return bad(
                        "the key is bound to a TPM policy; keys with policies are not supported",
                    )
                }
                t if t == ctx(2) => {
                    return bad(
                        "the key carries an import secret [2]; only loadable keys are supported",
                    )
                }
                t if t == ctx(4) => {} // description: informational
                t if t == ctx(5) => {
                    let (t, b, _) = read_tlv(content)?;
                    if t == TAG_BOOLEAN && b.first().is_some_and(|v| *v != 0) {
                        return bad("the key's parent is an RSA primary (rsaParent); only the ECC P-256 primary or a persistent parent is supported");
                    }
                }
                TAG_INTEGER => break parse_parent(content)?,
                _ => {
                    return bad(format!(
                        "unexpected field (tag 0x{tag:02x}) before the parent INTEGER"
                    ))
                }
            }
        };
        let (tag, public, rest) = read_tlv(rest)?;
        if tag != TAG_OCTET_STRING {
            return bad("pubkey is not an OCTET STRING");
        }
        let (tag, private, rest) = read_tlv(rest)?;
        if tag != TAG_OCTET_STRING {
            return bad("privkey is not an OCTET STRING");
        }
        if !rest.is_empty() {
            return bad("unexpected data after privkey");
        }
        check_tpm2b(public, "pubkey (TPM2B_PUBLIC)")?;
        check_tpm2b(private, "privkey (TPM2B_PRIVATE)")?;
        Ok(TpmKeyFile {
            empty_auth,
            parent,
            public: public.to_vec(),
            private: private.to_vec(),
        })
    }
}

/// Prefixes `area` with its u16 big-endian size.
fn tpm2b(area: &[u8], what: &str) -> Result<Vec<u8>, KeyFileError> {
    let len =
        u16::try_from(area.len()).or_else(|_| bad(format!("{what} is too large for a TPM2B")))?;
    let mut out = Vec::with_capacity(area.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(area);
    Ok(out)
}

/// A TPM2B must be its u16 size followed by exactly that many bytes.
fn check_tpm2b(b: &[u8], what: &str) -> Result<(), KeyFileError> {
    match b {
        [hi, lo, rest @ ..]
            if usize::from(u16::from_be_bytes([*hi, *lo])) == rest.len() && !rest.is_empty() =>
        {
            Ok(())
        }
        _ => bad(format!(
            "{what} is not a well-formed TPM2B (size prefix and contents disagree)"
        )),
    }
}

/// The parent INTEGER: up to 5 content octets, two's complement. Both the
/// positive form (`00 81 00 00 01`) and the legacy negative one (`81 00 00 01`)
/// name handle 0x81000001.
fn parse_parent(content: &[u8]) -> Result<u32, KeyFileError> {
    match content {
        [] => bad("the parent INTEGER is empty"),
        [0, rest @ ..] if rest.len() == 4 => {
            Ok(u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]))
        }
        c if c.len() <= 4 => {
            // Sign-extend nothing: a negative 4-byte value is the legacy form of a
            // handle with the top bit set; shorter values are small positives.
            let mut v: u32 = 0;
            for b in c {
                v = (v << 8) | u32::from(*b);
            }
            if c.len() < 4 && c[0] & 0x80 != 0 {
                return bad("the parent INTEGER is negative");
            }
            Ok(v)
        }
        _ => bad("the parent INTEGER is larger than a TPM handle"),
    }
}

/// Minimal DER content of a non-negative INTEGER.
fn der_positive_integer(v: u32) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(3);
    let mut out = Vec::with_capacity(5);
    if bytes[first] & 0x80 != 0 {
        out.push(0);
    }
    out.extend_from_slice(&bytes[first..]);
    out
}

fn push_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let first = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len() - 1);
        out.push(0x80 | (bytes.len() - first) as u8);
        out.extend_from_slice(&bytes[first..]);
    }
    out.extend_from_slice(content);
}

/// Reads one tag-length-value; returns (tag, content, rest). Definite lengths
/// only, up to 4 length octets.
fn read_tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), KeyFileError> {
    let truncated = || KeyFileError("the DER data is truncated".into());
    let (&tag, rest) = input.split_first().ok_or_else(truncated)?;
    let (&first, mut rest) = rest.split_first().ok_or_else(truncated)?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 {
            return bad("unsupported DER length encoding");
        }
        if rest.len() < n {
            return Err(truncated());
        }
        let (len_bytes, after) = rest.split_at(n);
        rest = after;
        len_bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return Err(truncated());
    }
    let (content, rest) = rest.split_at(len);
    Ok((tag, content, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(parent: u32) -> TpmKeyFile {
        TpmKeyFile::new(parent, &[0x00, 0x23, 0x00, 0x0B, 1, 2, 3], &[9u8; 200]).unwrap()
    }

    #[test]
    fn round_trip_der_and_pem() {
        for parent in [PARENT_OWNER, 0x8100_0001, 0] {
            let k = sample(parent);
            assert_eq!(TpmKeyFile::from_der(&k.to_der()).unwrap(), k);
            let pem = k.to_pem();
            assert!(pem.starts_with("-----BEGIN TSS2 PRIVATE KEY-----\n"));
            assert!(pem.lines().all(|l| l.len() <= 64));
            assert_eq!(TpmKeyFile::from_pem(&pem).unwrap(), k);
        }
    }

    #[test]
    fn writes_the_five_field_layout() {
        let der = sample(PARENT_OWNER).to_der();
        // SEQUENCE with a long length (the private part alone is 202 bytes).
        assert_eq!(&der[..2], &[0x30, 0x81]);
        let body = &der[3..];
        assert_eq!(
            &body[..8],
            &[0x06, 0x06, 0x67, 0x81, 0x05, 0x0A, 0x01, 0x03],
            "loadable-key OID"
        );
        assert_eq!(
            &body[8..13],
            &[0xA0, 0x03, 0x01, 0x01, 0xFF],
            "emptyAuth TRUE"
        );
        assert_eq!(
            &body[13..19],
            &[0x02, 0x04, 0x40, 0x00, 0x00, 0x01],
            "parent"
        );
        assert_eq!(&body[19..21], &[0x04, 0x09], "pubkey OCTET STRING");
        assert_eq!(&body[21..23], &[0x00, 0x07], "TPM2B_PUBLIC size");

        let der = sample(0x8100_0001).to_der();
        let body = &der[3..];
        assert_eq!(&body[13..20], &[0x02, 0x05, 0x00, 0x81, 0x00, 0x00, 0x01]);
    }

    /// What tpm2-openssl writes: BOOLEAN 0x01; and the old negative parent form.
    #[test]
    fn reads_tpm2_openssl_variants() {
        let k = sample(0x8100_0001);
        let mut der = k.to_der();
        let pos = der
            .windows(5)
            .position(|w| w == [0xA0, 0x03, 0x01, 0x01, 0xFF])
            .unwrap();
        der[pos + 4] = 0x01;
        let read = TpmKeyFile::from_der(&der).unwrap();
        assert!(read.empty_auth);

        // Rebuild with the 4-byte negative INTEGER 81 00 00 01.
        let mut body = Vec::new();
        push_tlv(&mut body, TAG_OID, OID_LOADABLE);
        push_tlv(&mut body, ctx(0), &[0x01, 0x01, 0x01]);
        push_tlv(&mut body, TAG_INTEGER, &[0x81, 0x00, 0x00, 0x01]);
        push_tlv(&mut body, TAG_OCTET_STRING, &k.public);
        push_tlv(&mut body, TAG_OCTET_STRING, &k.private);
        let mut der = Vec::new();
        push_tlv(&mut der, TAG_SEQUENCE, &body);
        let read = TpmKeyFile::from_der(&der).unwrap();
        assert_eq!(read.parent, 0x8100_0001);
        assert!(!read.parent_is_owner_primary());
        assert_eq!(read.public, k.public);

        // emptyAuth absent: a password would be needed.
        let mut body = Vec::new();
        push_tlv(&mut body, TAG_OID, OID_LOADABLE);
        push_tlv(&mut body, TAG_INTEGER, &[0x40, 0x00, 0x00, 0x01]);
        push_tlv(&mut body, TAG_OCTET_STRING, &k.public);
        push_tlv(&mut body, TAG_OCTET_STRING, &k.private);
        let mut der = Vec::new();
        push_tlv(&mut der, TAG_SEQUENCE, &body);
        let read = TpmKeyFile::from_der(&der).unwrap();
        assert!(!read.empty_auth);
        assert!(read.parent_is_owner_primary());
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        let k = sample(PARENT_OWNER);
        let build = |oid: &[u8], extra: Option<(u8, Vec<u8>)>| {
            let mut body = Vec::new();
            push_tlv(&mut body, TAG_OID, oid);
            if let Some((tag, content)) = extra {
                push_tlv(&mut body, tag, &content);
            }
            push_tlv(&mut body, TAG_INTEGER, &[0x40, 0x00, 0x00, 0x01]);
            push_tlv(&mut body, TAG_OCTET_STRING, &k.public);
            push_tlv(&mut body, TAG_OCTET_STRING, &k.private);
            let mut der = Vec::new();
            push_tlv(&mut der, TAG_SEQUENCE, &body);
            TpmKeyFile::from_der(&der).map_err(|e| e.to_string())
        };
        assert!(build(OID_IMPORTABLE, None)
            .unwrap_err()
            .contains("importable"));
        assert!(build(OID_SEALED, None).unwrap_err().contains("sealed"));
        let policy = build(OID_LOADABLE, Some((ctx(1), vec![0x30, 0x00])));
        assert!(policy.unwrap_err().contains("policy"));
        let rsa = build(OID_LOADABLE, Some((ctx(5), vec![0x01, 0x01, 0xFF])));
        assert!(rsa.unwrap_err().contains("RSA"));
        // A description [4] is fine.
        let described = build(OID_LOADABLE, Some((ctx(4), vec![0x0C, 0x01, b'x'])));
        assert!(described.is_ok());

        let mut der = k.to_der();
        der.truncate(der.len() - 1);
        assert!(TpmKeyFile::from_der(&der)
            .unwrap_err()
            .to_string()
            .contains("truncated"));

        let err =
            TpmKeyFile::from_pem("-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("file:/"), "{err}");
        assert!(TpmKeyFile::from_pem("hello")
            .unwrap_err()
            .to_string()
            .contains("not a PEM file"));
    }

    #[test]
    fn parent_integer_forms() {
        assert_eq!(parse_parent(&[0x40, 0, 0, 1]).unwrap(), PARENT_OWNER);
        assert_eq!(parse_parent(&[0x00, 0x81, 0, 0, 1]).unwrap(), 0x8100_0001);
        assert_eq!(parse_parent(&[0x81, 0, 0, 1]).unwrap(), 0x8100_0001);
        assert_eq!(parse_parent(&[0]).unwrap(), 0);
        assert!(parse_parent(&[0xFF]).is_err());
        assert!(parse_parent(&[1, 0, 0, 0, 0]).is_err());
        assert_eq!(der_positive_integer(0), vec![0]);
        assert_eq!(der_positive_integer(PARENT_OWNER), vec![0x40, 0, 0, 1]);
        assert_eq!(der_positive_integer(0x8100_0001), vec![0, 0x81, 0, 0, 1]);
    }
}
