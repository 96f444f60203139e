//! Identifiers in AutoKitteh's format: `prefix_` + 26 characters of lower-case Crockford base32
//! (a TypeID), and the integration's own id, which AutoKitteh derives from its unique name.

use std::fmt;
use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// The alphabet of TypeIDs and of AutoKitteh ids.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// The integration's unique name.
pub const INTEGRATION_NAME: &str = "zoom";

/// The integration id AutoKitteh gives the `zoom` integration: `int_3kth` + a six-character hint
/// of the name + the FNV-1 64-bit hash of `int,zoom` in hex. Hosts send it in every request.
pub static INTEGRATION_ID: LazyLock<String> = LazyLock::new(|| named_id("int", INTEGRATION_NAME));

fn named_id(kind: &str, name: &str) -> String {
    let hint: String = name
        .chars()
        .map(|c| match c {
            c if c.is_ascii() && ALPHABET.contains(&(c as u8)) => c,
            'i' | 'l' | '!' => '1',
            'u' => 'v',
            '$' => 's',
            _ => '0',
        })
        .take(6)
        .collect();
    format!(
        "{kind}_3kth{hint:0>6}{:016x}",
        fnv1_64(format!("{kind},{name}").as_bytes())
    )
}

/// FNV-1 (not 1a), 64 bits: what AutoKitteh hashes names with.
fn fnv1_64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        hash ^= u64::from(*b);
    }
    hash
}

/// A malformed id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdError(String);

/// A connection id: `con_` and 26 lower-case base32 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(String);

impl ConnectionId {
    /// Parses and checks a connection id.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError("connection_id is required".into()));
        }
        if !is_typeid(s, "con") {
            return Err(IdError(format!(
                "connection_id {:?} is malformed: expected con_ and 26 lower-case base32 characters",
                truncate(s, 64)
            )));
        }
        Ok(Self(s.to_string()))
    }

    /// A fresh, random connection id (for tests and tools; hosts normally create them).
    pub fn generate() -> Self {
        Self(new_typeid("con"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `s` can be an event's destination: a connection id or, as AutoKitteh also has
/// them, a trigger id (`trg_` and 26 lower-case base32 characters).
pub fn is_destination_id(s: &str) -> bool {
    is_typeid(s, "con") || is_typeid(s, "trg")
}

/// Whether `s` is a well-formed integration id (`int_` and 26 lower-case base32 characters).
pub fn is_integration_id(s: &str) -> bool {
    is_typeid(s, "int")
}

/// Whether `s` is a well-formed event id (`evt_` and 26 lower-case base32 characters).
pub fn is_event_id(s: &str) -> bool {
    is_typeid(s, "evt")
}

/// Whether `s` is a symbol as AutoKitteh names things (`^[a-zA-Z_]\w*$`).
pub fn is_symbol(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn is_typeid(s: &str, prefix: &str) -> bool {
    let Some(suffix) = s
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
    else {
        return false;
    };
    // 26 characters carry 130 bits; the first may use only the low 3 so the id fits 128 bits.
    suffix.len() == 26
        && suffix.bytes().all(|b| ALPHABET.contains(&b))
        && suffix.as_bytes()[0] <= b'7'
}

/// A new time-ordered id (`prefix_` + a UUIDv7 in base32), e.g. `evt_01jf3x…`.
pub fn new_typeid(prefix: &str) -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let mut random = [0u8; 10];
    getrandom::fill(&mut random).expect("the operating system's random source failed");
    let mut rand_bits: u128 = 0;
    for b in random {
        rand_bits = (rand_bits << 8) | u128::from(b);
    }
    let rand_a = (rand_bits >> 62) & 0xfff;
    let rand_b = rand_bits & ((1u128 << 62) - 1);
    let uuid =
        ((millis & 0xffff_ffff_ffff) << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b;
    let mut out = String::with_capacity(prefix.len() + 27);
    out.push_str(prefix);
    out.push('_');
    for i in (0..26).rev() {
        out.push(ALPHABET[((uuid >> (5 * i)) & 31) as usize] as char);
    }
    out
}

/// The first `max` characters of untrusted text, for error messages.
pub fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integration_ids_match_autokitteh() {
        // Vectors from AutoKitteh's own tests of NewIntegrationIDFromName.
        assert_eq!(named_id("int", "test"), "int_3kth00testaf9d33c5697341f0");
        assert_eq!(named_id("int", "testing"), "int_3kthtest1n7bf767860ab68268");
        assert_eq!(named_id("int", "123abc"), "int_3kth123abc819fc78d4caa616c");
        assert_eq!(named_id("int", "iou"), "int_3kth00010v08d1729ff0ad290d");
        assert_eq!(named_id("int", "foo-bar"), "int_3kthf000ba732f13282aa60744");
        assert!(INTEGRATION_ID.starts_with("int_3kth00z00m"));
    }

    #[test]
    fn generated_ids_parse_and_sort_by_time() {
        let a = ConnectionId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = ConnectionId::generate();
        assert_eq!(ConnectionId::parse(a.as_str()).unwrap(), a);
        assert!(a < b);
        assert!(new_typeid("evt").starts_with("evt_0"));
    }

    #[test]
    fn malformed_connection_ids_are_refused() {
        for bad in [
            "",
            "con_",
            "con_01jf3x",
            "conn_01jf3xabcdefghjkmnpqrstvwx",
            "con_01JF3XABCDEFGHJKMNPQRSTVWX",
            "con_01jf3xabcdefghjkmnpqrstvwu",
            "con_91jf3xabcdefghjkmnpqrstvwx",
            "prj_01jf3xabcdefghjkmnpqrstvwx",
        ] {
            assert!(ConnectionId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(ConnectionId::parse("con_01jf3xabcdefghjkmnpqrstvwx").is_ok());
    }
}
