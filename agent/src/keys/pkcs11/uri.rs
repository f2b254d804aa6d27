//! RFC 7512 `pkcs11:` URIs: a strict parser and a printer. Owns the grammar
//! (path attributes separated by `;`, query attributes by `&`, percent-encoding,
//! the value rules of `type`, `slot-id` and `library-version`); it never looks
//! at a token. Attributes it does not know (vendor attributes such as
//! `vendor-aaa=…`) are kept in order and printed back; the key lookup decides
//! what they mean. A `pin-value` is held zeroized and never printed: the
//! `Display` and `Debug` forms show `pin-value=REDACTED`.

use std::fmt;

use zeroize::Zeroizing;

const SCHEME: &str = "pkcs11:";

/// A path attribute (the part before `?`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathAttr {
    Token,
    Manufacturer,
    Serial,
    Model,
    LibraryManufacturer,
    LibraryDescription,
    LibraryVersion,
    Object,
    Type,
    Id,
    SlotManufacturer,
    SlotDescription,
    SlotId,
    /// An attribute RFC 7512 does not define (vendor-specific).
    Other(String),
}

impl PathAttr {
    const KNOWN: [PathAttr; 13] = [
        PathAttr::Token,
        PathAttr::Manufacturer,
        PathAttr::Serial,
        PathAttr::Model,
        PathAttr::LibraryManufacturer,
        PathAttr::LibraryDescription,
        PathAttr::LibraryVersion,
        PathAttr::Object,
        PathAttr::Type,
        PathAttr::Id,
        PathAttr::SlotManufacturer,
        PathAttr::SlotDescription,
        PathAttr::SlotId,
    ];

    pub fn name(&self) -> &str {
        match self {
            PathAttr::Token => "token",
            PathAttr::Manufacturer => "manufacturer",
            PathAttr::Serial => "serial",
            PathAttr::Model => "model",
            PathAttr::LibraryManufacturer => "library-manufacturer",
            PathAttr::LibraryDescription => "library-description",
            PathAttr::LibraryVersion => "library-version",
            PathAttr::Object => "object",
            PathAttr::Type => "type",
            PathAttr::Id => "id",
            PathAttr::SlotManufacturer => "slot-manufacturer",
            PathAttr::SlotDescription => "slot-description",
            PathAttr::SlotId => "slot-id",
            PathAttr::Other(n) => n,
        }
    }

    fn from_name(name: &str) -> PathAttr {
        Self::KNOWN
            .into_iter()
            .find(|a| a.name() == name)
            .unwrap_or_else(|| PathAttr::Other(name.to_string()))
    }
}

/// A query attribute (the part after `?`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryAttr {
    PinSource,
    PinValue,
    ModuleName,
    ModulePath,
    /// An attribute RFC 7512 does not define (vendor-specific).
    Other(String),
}

impl QueryAttr {
    const KNOWN: [QueryAttr; 4] = [
        QueryAttr::PinSource,
        QueryAttr::PinValue,
        QueryAttr::ModuleName,
        QueryAttr::ModulePath,
    ];

    pub fn name(&self) -> &str {
        match self {
            QueryAttr::PinSource => "pin-source",
            QueryAttr::PinValue => "pin-value",
            QueryAttr::ModuleName => "module-name",
            QueryAttr::ModulePath => "module-path",
            QueryAttr::Other(n) => n,
        }
    }

    fn from_name(name: &str) -> QueryAttr {
        Self::KNOWN
            .into_iter()
            .find(|a| a.name() == name)
            .unwrap_or_else(|| QueryAttr::Other(name.to_string()))
    }
}

/// The object classes a URI's `type=` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectType {
    Public,
    Private,
    Cert,
    SecretKey,
    Data,
}

impl ObjectType {
    pub fn name(self) -> &'static str {
        match self {
            ObjectType::Public => "public",
            ObjectType::Private => "private",
            ObjectType::Cert => "cert",
            ObjectType::SecretKey => "secret-key",
            ObjectType::Data => "data",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        [
            ObjectType::Public,
            ObjectType::Private,
            ObjectType::Cert,
            ObjectType::SecretKey,
            ObjectType::Data,
        ]
        .into_iter()
        .find(|t| t.name() == s)
    }
}

/// Why a string is not a PKCS#11 URI. The message never contains a PIN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UriError(String);

impl UriError {
    fn new(reason: impl Into<String>) -> Self {
        UriError(reason.into())
    }

    /// The reason, for callers that wrap it.
    pub fn reason(&self) -> &str {
        &self.0
    }
}

/// A parsed `pkcs11:` URI. Values are stored percent-decoded, in the order
/// written; text attributes are valid UTF-8 (PKCS#11 labels are UTF-8).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    path: Vec<(PathAttr, Vec<u8>)>,
    query: Vec<(QueryAttr, Zeroizing<Vec<u8>>)>,
}

impl Pkcs11Uri {
    /// Parses a URI (RFC 7512 §2.3). Refuses characters that must be
    /// percent-encoded, malformed `%xx`, empty or repeated attributes, and bad
    /// values of `type`, `slot-id` and `library-version`.
    pub fn parse(s: &str) -> Result<Pkcs11Uri, UriError> {
        let rest = match s.get(..SCHEME.len()) {
            Some(p) if p.eq_ignore_ascii_case(SCHEME) => &s[SCHEME.len()..],
            _ => return Err(UriError::new("it does not start with pkcs11:")),
        };
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut uri = Pkcs11Uri::default();
        if !path.is_empty() {
            for part in path.split(';') {
                let (name, raw) = split_attr(part, "path", ';')?;
                if name == QueryAttr::PinValue.name() {
                    // It would be printed as a vendor path attribute: refused,
                    // so that a PIN written before the '?' never shows.
                    return Err(UriError::new(
                        "pin-value is a query attribute: write it after '?' (pkcs11:…?pin-value=…)",
                    ));
                }
                let attr = PathAttr::from_name(name);
                if uri.path.iter().any(|(a, _)| *a == attr) {
                    return Err(UriError::new(format!(
                        "the path attribute {name} appears twice (RFC 7512 allows it once)"
                    )));
                }
                let value = decode(raw, name, is_pchar)?;
                check_path_value(&attr, &value)?;
                uri.path.push((attr, value));
            }
        }
        if let Some(query) = query {
            if !query.is_empty() {
                for part in query.split('&') {
                    let (name, raw) = split_attr(part, "query", '&')?;
                    let attr = QueryAttr::from_name(name);
                    if !matches!(attr, QueryAttr::Other(_))
                        && uri.query.iter().any(|(a, _)| *a == attr)
                    {
                        return Err(UriError::new(format!(
                            "the query attribute {name} appears twice"
                        )));
                    }
                    let value = Zeroizing::new(decode(raw, name, is_qchar)?);
                    if !matches!(attr, QueryAttr::PinValue | QueryAttr::Other(_)) {
                        std::str::from_utf8(&value).map_err(|_| {
                            UriError::new(format!("{name} is not UTF-8 after percent-decoding"))
                        })?;
                    }
                    uri.query.push((attr, value));
                }
            }
        }
        if uri.query_value(&QueryAttr::PinValue).is_some()
            && uri.query_value(&QueryAttr::PinSource).is_some()
        {
            return Err(UriError::new(
                "it has both pin-value and pin-source; keep one of them",
            ));
        }
        Ok(uri)
    }

    /// A URI naming a private key: `pkcs11:token=…;[serial=…;]object=…;id=…;type=private`.
    pub fn for_private_key(token: &str, serial: Option<&str>, label: &str, id: &[u8]) -> Self {
        let mut path = vec![(PathAttr::Token, token.as_bytes().to_vec())];
        if let Some(serial) = serial {
            path.push((PathAttr::Serial, serial.as_bytes().to_vec()));
        }
        path.push((PathAttr::Object, label.as_bytes().to_vec()));
        path.push((PathAttr::Id, id.to_vec()));
        path.push((
            PathAttr::Type,
            ObjectType::Private.name().as_bytes().to_vec(),
        ));
        Pkcs11Uri {
            path,
            query: Vec::new(),
        }
    }

    fn path_value(&self, attr: &PathAttr) -> Option<&[u8]> {
        self.path
            .iter()
            .find(|(a, _)| a == attr)
            .map(|(_, v)| v.as_slice())
    }

    fn query_value(&self, attr: &QueryAttr) -> Option<&[u8]> {
        self.query
            .iter()
            .find(|(a, _)| a == attr)
            .map(|(_, v)| v.as_slice())
    }

    /// A text path attribute (token, serial, object, …). Binary `id` values
    /// are read with [`Pkcs11Uri::id`].
    pub fn text(&self, attr: &PathAttr) -> Option<&str> {
        self.path_value(attr)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The CKA_ID bytes.
    pub fn id(&self) -> Option<&[u8]> {
        self.path_value(&PathAttr::Id)
    }

    /// The object class named by `type=`.
    pub fn object_type(&self) -> Option<ObjectType> {
        self.text(&PathAttr::Type).and_then(ObjectType::from_name)
    }

    /// `slot-id=` as a number.
    pub fn slot_id(&self) -> Option<u64> {
        self.text(&PathAttr::SlotId).and_then(|s| s.parse().ok())
    }

    /// A text query attribute (pin-source, module-name, module-path; never pin-value).
    pub fn query_text(&self, attr: &QueryAttr) -> Option<&str> {
        if *attr == QueryAttr::PinValue {
            return None;
        }
        self.query_value(attr)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The `pin-value` bytes (secret; the caller wraps them in a `Pin`).
    pub fn pin_value(&self) -> Option<&[u8]> {
        self.query_value(&QueryAttr::PinValue)
    }

    /// Path attributes RFC 7512 does not define, by name.
    pub fn unknown_path_attributes(&self) -> Vec<&str> {
        self.path
            .iter()
            .filter_map(|(a, _)| match a {
                PathAttr::Other(n) => Some(n.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Whether the URI names anything about the token, slot or library.
    pub fn selects_token(&self) -> bool {
        self.path.iter().any(|(a, _)| {
            !matches!(
                a,
                PathAttr::Object | PathAttr::Id | PathAttr::Type | PathAttr::Other(_)
            )
        })
    }

    /// Prints the URI; `pin-value` is printed only when `secrets` is true
    /// (never outside tests).
    fn write(&self, f: &mut impl fmt::Write, secrets: bool) -> fmt::Result {
        f.write_str(SCHEME)?;
        for (i, (attr, value)) in self.path.iter().enumerate() {
            if i > 0 {
                f.write_char(';')?;
            }
            write!(f, "{}=", attr.name())?;
            encode(f, value, *attr == PathAttr::Id, is_path_safe)?;
        }
        for (i, (attr, value)) in self.query.iter().enumerate() {
            f.write_char(if i == 0 { '?' } else { '&' })?;
            write!(f, "{}=", attr.name())?;
            if *attr == QueryAttr::PinValue && !secrets {
                f.write_str("REDACTED")?;
            } else {
                encode(f, value, false, is_query_safe)?;
            }
        }
        Ok(())
    }

    /// The URI as text, without any `pin-value` (the redacted form).
    pub fn to_redacted_string(&self) -> String {
        let mut s = String::new();
        let _ = self.write(&mut s, false);
        s
    }

    #[cfg(test)]
    fn to_string_with_secrets(&self) -> String {
        let mut s = String::new();
        let _ = self.write(&mut s, true);
        s
    }
}

impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, false)
    }
}

impl fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkcs11Uri({self})")
    }
}

/// Splits `name=value` and checks the name.
fn split_attr<'a>(
    part: &'a str,
    component: &str,
    sep: char,
) -> Result<(&'a str, &'a str), UriError> {
    if part.is_empty() {
        return Err(UriError::new(format!(
            "it has an empty {component} attribute (a doubled or trailing '{sep}')"
        )));
    }
    let (name, value) = part.split_once('=').ok_or_else(|| {
        UriError::new(format!(
            "{component} attribute {:?} has no '=' (attributes are name=value)",
            part.chars().take(32).collect::<String>()
        ))
    })?;
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !name_ok {
        return Err(UriError::new(format!(
            "{:?} is not an attribute name (letters, digits, '-' and '_')",
            name.chars().take(32).collect::<String>()
        )));
    }
    Ok((name, value))
}

fn check_path_value(attr: &PathAttr, value: &[u8]) -> Result<(), UriError> {
    if *attr == PathAttr::Id || matches!(attr, PathAttr::Other(_)) {
        return Ok(());
    }
    let text = std::str::from_utf8(value).map_err(|_| {
        UriError::new(format!(
            "{} is not UTF-8 after percent-decoding",
            attr.name()
        ))
    })?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match attr {
        PathAttr::Type if ObjectType::from_name(text).is_none() => Err(UriError::new(format!(
            "type={text} is not an object type; use public, private, cert, secret-key or data"
        ))),
        PathAttr::SlotId if !(digits(text) && text.parse::<u64>().is_ok()) => Err(UriError::new(
            format!("slot-id={text} is not a decimal number"),
        )),
        PathAttr::LibraryVersion => {
            let ok = match text.split_once('.') {
                Some((major, minor)) => digits(major) && digits(minor),
                None => digits(text),
            };
            if ok {
                Ok(())
            } else {
                Err(UriError::new(format!(
                    "library-version={text} is not a version (major or major.minor)"
                )))
            }
        }
        _ => Ok(()),
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// `pk11-res-avail`: reserved characters that need no encoding in values.
fn is_res_avail(b: u8) -> bool {
    matches!(
        b,
        b':' | b'[' | b']' | b'@' | b'!' | b'$' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'='
    )
}

/// `pk11-pchar` without `%`: what may appear unencoded in a path value.
fn is_pchar(b: u8) -> bool {
    is_unreserved(b) || is_res_avail(b) || b == b'&'
}

/// `pk11-qchar` without `%`: what may appear unencoded in a query value.
fn is_qchar(b: u8) -> bool {
    is_unreserved(b) || is_res_avail(b) || matches!(b, b'/' | b'?' | b'|')
}

fn is_path_safe(b: u8) -> bool {
    is_pchar(b)
}

fn is_query_safe(b: u8) -> bool {
    is_qchar(b)
}

/// Percent-decodes one value, refusing characters that must be encoded.
fn decode(raw: &str, name: &str, allowed: fn(u8) -> bool) -> Result<Vec<u8>, UriError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(|| {
                UriError::new(format!("{name}: '%' must be followed by two hex digits"))
            })?;
            let v = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .filter(|_| hex.iter().all(u8::is_ascii_hexdigit))
                .ok_or_else(|| {
                    UriError::new(format!("{name}: '%' must be followed by two hex digits"))
                })?;
            out.push(v);
            i += 3;
        } else if allowed(b) {
            out.push(b);
            i += 1;
        } else {
            // Never echo pin-value characters.
            let shown = if name == "pin-value" {
                "a character".to_string()
            } else {
                let c = raw[i..].chars().next().unwrap_or('?');
                format!("{c:?}")
            };
            return Err(UriError::new(format!(
                "{name}: {shown} must be percent-encoded"
            )));
        }
    }
    Ok(out)
}

/// Percent-encodes a value; `all` encodes every byte (used for binary ids).
fn encode(f: &mut impl fmt::Write, value: &[u8], all: bool, safe: fn(u8) -> bool) -> fmt::Result {
    for &b in value {
        if !all && safe(b) {
            f.write_char(b as char)?;
        } else {
            write!(f, "%{b:02X}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every example of RFC 7512 §3.3, in order.
    const RFC_EXAMPLES: [&str; 13] = [
        "pkcs11:",
        "pkcs11:object=my-pubkey;type=public",
        "pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial=?pin-source=file:/etc/token_pin",
        "pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
        "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
        "pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.?pin-value=the-pin",
        "pkcs11:slot-description=Sun%20Metaslot",
        "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;library-description=Soft%20Token%20Library;library-version=1.23",
        "pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;id=%01%02%03%Ba%dd%Ca%fe%04%05%06",
        "pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
        "pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;object=my-certificate;type=cert",
        "pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a?pin-source=file:/etc/token_pin&vendor-bbb=value-b",
    ];

    fn p(s: &str) -> Pkcs11Uri {
        Pkcs11Uri::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn every_rfc_example_parses_and_prints_back() {
        for ex in RFC_EXAMPLES {
            let uri = p(ex);
            let printed = uri.to_string_with_secrets();
            // The printer writes hex digits in upper case (RFC 3986 §2.1);
            // otherwise the text is the same, attribute order included.
            assert_eq!(
                printed.to_ascii_lowercase(),
                ex.to_ascii_lowercase(),
                "{ex}"
            );
            assert_eq!(p(&printed), uri, "{ex}");
        }
    }

    #[test]
    fn rfc_examples_have_the_documented_values() {
        let u = p(RFC_EXAMPLES[1]);
        assert_eq!(u.text(&PathAttr::Object), Some("my-pubkey"));
        assert_eq!(u.object_type(), Some(ObjectType::Public));

        let u = p(RFC_EXAMPLES[2]);
        assert_eq!(u.object_type(), Some(ObjectType::Private));
        assert_eq!(u.query_text(&QueryAttr::PinSource), Some("file:/etc/token"));

        let u = p(RFC_EXAMPLES[3]);
        assert_eq!(
            u.text(&PathAttr::Token),
            Some("The Software PKCS#11 Softtoken")
        );
        assert_eq!(u.text(&PathAttr::Manufacturer), Some("Snake Oil, Inc."));
        assert_eq!(u.text(&PathAttr::Model), Some("1.0"));
        assert_eq!(u.object_type(), Some(ObjectType::Cert));
        assert_eq!(
            u.id(),
            Some(&[0x69, 0x95, 0x3e, 0x5c, 0xf4, 0xbd, 0xec, 0x91][..])
        );
        assert_eq!(
            u.text(&PathAttr::Serial),
            Some(""),
            "an empty value is a value"
        );
        assert_eq!(
            u.query_text(&QueryAttr::PinSource),
            Some("file:/etc/token_pin")
        );
        assert!(u.selects_token());

        let u = p(RFC_EXAMPLES[4]);
        assert_eq!(u.query_text(&QueryAttr::ModuleName), Some("mypkcs11"));
        assert!(!u.selects_token());

        let u = p(RFC_EXAMPLES[5]);
        assert_eq!(
            u.query_text(&QueryAttr::ModulePath),
            Some("/mnt/libmypkcs11.so.1")
        );

        let u = p(RFC_EXAMPLES[6]);
        assert_eq!(u.text(&PathAttr::Token), Some("Software PKCS#11 softtoken"));
        assert_eq!(u.pin_value(), Some(&b"the-pin"[..]));
        assert_eq!(u.query_text(&QueryAttr::PinValue), None);

        let u = p(RFC_EXAMPLES[7]);
        assert_eq!(u.text(&PathAttr::SlotDescription), Some("Sun Metaslot"));

        let u = p(RFC_EXAMPLES[8]);
        assert_eq!(
            u.text(&PathAttr::LibraryManufacturer),
            Some("Snake Oil, Inc.")
        );
        assert_eq!(
            u.text(&PathAttr::LibraryDescription),
            Some("Soft Token Library")
        );
        assert_eq!(u.text(&PathAttr::LibraryVersion), Some("1.23"));

        let u = p(RFC_EXAMPLES[9]);
        assert_eq!(u.text(&PathAttr::Token), Some("My token% created by Joe"));
        assert_eq!(u.text(&PathAttr::LibraryVersion), Some("3"));
        assert_eq!(
            u.id(),
            Some(&[1, 2, 3, 0xba, 0xdd, 0xca, 0xfe, 4, 5, 6][..]),
            "hex digits in either case"
        );

        let u = p(RFC_EXAMPLES[10]);
        assert_eq!(u.text(&PathAttr::Token), Some("A name with a substring %;"));

        let u = p(RFC_EXAMPLES[11]);
        assert_eq!(
            u.text(&PathAttr::Token),
            Some("Name with a small A with acute: á")
        );

        let u = p(RFC_EXAMPLES[12]);
        assert_eq!(u.unknown_path_attributes(), vec!["vendor-aaa"]);
        assert_eq!(
            u.query_text(&QueryAttr::Other("vendor-bbb".into())),
            Some("value-b")
        );
    }

    #[test]
    fn percent_encoding_round_trips_any_label_and_id() {
        let label = "a;b?c&d%e/f g#h=i,j:k\u{e1}\u{1F511}";
        let id: Vec<u8> = (0..=255u8).collect();
        let uri = Pkcs11Uri::for_private_key("tok;en", Some("0123"), label, &id);
        let s = uri.to_string();
        assert!(s.starts_with("pkcs11:token=tok%3Ben;serial=0123;object=a%3Bb%3Fc&d%25e%2Ff%20g%23h=i,j:k%C3%A1%F0%9F%94%91;id=%00%01"), "{s}");
        assert!(s.ends_with("%FE%FF;type=private"), "{s}");
        let back = p(&s);
        assert_eq!(back.text(&PathAttr::Object), Some(label));
        assert_eq!(back.text(&PathAttr::Token), Some("tok;en"));
        assert_eq!(back.id(), Some(&id[..]));
        assert_eq!(back.object_type(), Some(ObjectType::Private));
        assert_eq!(back, uri);
        // '/' and '?' and '|' may stay unencoded in the query, '&' may in the path.
        let u = p("pkcs11:object=a&b?pin-source=|/usr/bin/pin?x");
        assert_eq!(u.text(&PathAttr::Object), Some("a&b"));
        assert_eq!(u.query_text(&QueryAttr::PinSource), Some("|/usr/bin/pin?x"));
        // The scheme is case-insensitive (RFC 3986 §3.1).
        assert_eq!(p("PKCS11:object=x").text(&PathAttr::Object), Some("x"));
    }

    #[test]
    fn invalid_uris_are_refused_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("file:/x", "does not start with pkcs11:"),
            ("pkcs11", "does not start with pkcs11:"),
            ("pkcs11:object=a b", "' ' must be percent-encoded"),
            ("pkcs11:object=a/b", "'/' must be percent-encoded"),
            ("pkcs11:object=a#b", "'#' must be percent-encoded"),
            ("pkcs11:object=%4", "two hex digits"),
            ("pkcs11:object=%zz", "two hex digits"),
            ("pkcs11:object=%+1", "two hex digits"),
            ("pkcs11:object=a;object=b", "appears twice"),
            ("pkcs11:object=a;;type=private", "empty path attribute"),
            ("pkcs11:object=a;", "empty path attribute"),
            ("pkcs11:object", "has no '='"),
            ("pkcs11:=x", "not an attribute name"),
            ("pkcs11:ob ject=x", "not an attribute name"),
            ("pkcs11:type=key", "not an object type"),
            ("pkcs11:slot-id=0x1", "not a decimal number"),
            ("pkcs11:library-version=1.", "not a version"),
            ("pkcs11:library-version=a", "not a version"),
            ("pkcs11:object=%FF", "not UTF-8"),
            ("pkcs11:?pin-source=a&pin-source=b", "appears twice"),
            (
                "pkcs11:?pin-value=1&pin-source=file:/p",
                "both pin-value and pin-source",
            ),
            ("pkcs11:?module-path=/a&", "empty query attribute"),
            ("pkcs11:?module-path=/a&b", "has no '='"),
            ("pkcs11:?pin-source=a&b", "has no '='"),
        ];
        for (s, want) in cases {
            let err = Pkcs11Uri::parse(s).expect_err(s).to_string();
            assert!(err.contains(want), "{s}: {err}");
        }
        // Repeated vendor query attributes are allowed; an empty query is too.
        p("pkcs11:?x-a=1&x-a=2");
        p("pkcs11:object=a?");
    }

    #[test]
    fn the_pin_never_shows() {
        let u = p("pkcs11:token=t;object=k?pin-value=s3cr%65t&module-name=m");
        assert_eq!(u.pin_value(), Some(&b"s3cret"[..]));
        for shown in [u.to_string(), format!("{u:?}"), u.to_redacted_string()] {
            assert!(!shown.contains("s3cr"), "{shown}");
            assert!(
                shown.contains("pin-value=REDACTED&module-name=m"),
                "{shown}"
            );
        }
        let err = Pkcs11Uri::parse("pkcs11:?pin-value=ab cd")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("ab") && !err.contains("cd"), "{err}");
        // Found by fuzzing (fuzz/fuzz_targets/pkcs11_uri.rs): a pin-value in the
        // path was taken for a vendor attribute and printed as written.
        let err = Pkcs11Uri::parse("pkcs11:token=t;pin-value=s3cret?module-name=m")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cr"), "{err}");
        assert!(err.contains("pin-value is a query attribute"), "{err}");
    }
}
