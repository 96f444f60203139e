//! Zoom's request signature, the replay window, and the URL-validation answer.
//!
//! Zoom signs `v0:{x-zm-request-timestamp}:{raw body}` with HMAC-SHA256 under the app's secret
//! token and sends `v0=` + lower-case hex in `x-zm-signature`. Everything here works on the raw
//! body bytes: re-serialized JSON would not hash the same (non-ASCII text, key order, spacing).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::secret::Secret;

type HmacSha256 = Hmac<Sha256>;

/// The longest `plainToken` answered; Zoom's are 22 characters.
pub const MAX_PLAIN_TOKEN: usize = 64;

/// A secret token ready to verify signatures: the HMAC key schedule is computed once.
#[derive(Clone)]
pub struct Verifier {
    keyed: HmacSha256,
}

impl Verifier {
    /// A verifier for `secret`.
    pub fn new(secret: &Secret) -> Self {
        Self {
            keyed: HmacSha256::new_from_slice(secret.expose().as_bytes())
                .expect("HMAC takes keys of any length"),
        }
    }

    /// True when `signature` (the `x-zm-signature` header) is this secret's signature of
    /// `timestamp` and `body`. The comparison takes the same time wherever the bytes differ.
    pub fn verifies(&self, signature: &[u8], timestamp: &[u8], body: &[u8]) -> bool {
        let Some(tag) = decode_signature(signature) else {
            return false;
        };
        let mut mac = self.keyed.clone();
        mac.update(b"v0:");
        mac.update(timestamp);
        mac.update(b":");
        mac.update(body);
        mac.verify_slice(&tag).is_ok()
    }

    /// A tag that stands for this secret without revealing it: the HMAC of a fixed label.
    /// Webhooks verified by different secrets are deduplicated apart by it.
    pub fn scope_tag(&self) -> [u8; 32] {
        let mut mac = self.keyed.clone();
        mac.update(b"zoom-integration: deduplication scope");
        mac.finalize().into_bytes().into()
    }

    /// `v0=` + hex HMAC of `timestamp` and `body`: what Zoom would send (for tests and tools).
    pub fn sign(&self, timestamp: &str, body: &[u8]) -> String {
        let mut mac = self.keyed.clone();
        mac.update(b"v0:");
        mac.update(timestamp.as_bytes());
        mac.update(b":");
        mac.update(body);
        format!("v0={}", hex::encode(mac.finalize().into_bytes()))
    }

    /// The `encryptedToken` of Zoom's URL validation: hex HMAC-SHA256(secret, plainToken).
    pub fn encrypt_token(&self, plain_token: &str) -> String {
        let mut mac = self.keyed.clone();
        mac.update(plain_token.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// `v0=` and 64 hex digits, as 32 bytes.
fn decode_signature(signature: &[u8]) -> Option<[u8; 32]> {
    let hex_digits = signature.strip_prefix(b"v0=")?;
    let mut tag = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut tag).ok()?;
    Some(tag)
}

/// Why a request timestamp is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    /// Not a whole number of seconds.
    #[error("x-zm-request-timestamp is not a whole number of seconds")]
    Malformed,
    /// Further from now than the replay window, in either direction.
    #[error("x-zm-request-timestamp is outside the replay window")]
    OutsideWindow,
}

/// Checks that `timestamp` (Unix seconds, as Zoom sends it) is within `window` of `now`, and
/// answers it.
pub fn check_timestamp(
    timestamp: &[u8],
    now: SystemTime,
    window: Duration,
) -> Result<u64, TimestampError> {
    // 12 digits reach the year 33658: anything longer is not a timestamp.
    if timestamp.is_empty() || timestamp.len() > 12 || !timestamp.iter().all(u8::is_ascii_digit) {
        return Err(TimestampError::Malformed);
    }
    let seconds: u64 = std::str::from_utf8(timestamp)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(TimestampError::Malformed)?;
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    if now.abs_diff(seconds) > window.as_secs() {
        return Err(TimestampError::OutsideWindow);
    }
    Ok(seconds)
}

/// A `plainToken` worth answering: 1 to [`MAX_PLAIN_TOKEN`] URL-safe characters.
pub fn is_sane_plain_token(token: &str) -> bool {
    (1..=MAX_PLAIN_TOKEN).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(secret: &str) -> Verifier {
        Verifier::new(&Secret::new(secret))
    }

    #[test]
    fn signature_matches_an_independent_hmac_computation() {
        // HMAC-SHA256("key", "v0:1:body"), computed with `openssl dgst -sha256 -hmac key`.
        let expected = "v0=1ed60689c833c6e0155375486100f66305fb8a6e78a6fd3e3b748a3261fd1eef";
        let v = verifier("key");
        assert_eq!(v.sign("1", b"body"), expected);
        assert!(v.verifies(expected.as_bytes(), b"1", b"body"));
    }

    #[test]
    fn non_ascii_bodies_are_signed_as_raw_bytes() {
        let body = "{\"topic\":\"Zdeněk Ødegård\"}".as_bytes();
        let v = verifier("tok");
        let sig = v.sign("1700000000", body);
        assert!(v.verifies(sig.as_bytes(), b"1700000000", body));
        let reescaped = b"{\"topic\":\"Zden\\u011bk \\u00d8deg\\u00e5rd\"}";
        assert!(!v.verifies(sig.as_bytes(), b"1700000000", reescaped));
    }

    #[test]
    fn wrong_secret_timestamp_body_or_format_do_not_verify() {
        let v = verifier("right");
        let sig = v.sign("100", b"{}");
        assert!(!verifier("wrong").verifies(sig.as_bytes(), b"100", b"{}"));
        assert!(!v.verifies(sig.as_bytes(), b"101", b"{}"));
        assert!(!v.verifies(sig.as_bytes(), b"100", b"{ }"));
        assert!(v.verifies(
            sig.to_uppercase().replace("V0", "v0").as_bytes(),
            b"100",
            b"{}"
        ));
        for bad in [
            "",
            "v0=",
            "v1=00",
            &sig[3..],
            &sig[..sig.len() - 2],
            &format!("{sig}00"),
            &sig.replace("v0=", "v0:"),
        ] {
            assert!(!v.verifies(bad.as_bytes(), b"100", b"{}"), "{bad:?}");
        }
    }

    #[test]
    fn url_validation_answer_is_the_hmac_of_the_plain_token() {
        let mut mac = HmacSha256::new_from_slice(b"secret").unwrap();
        mac.update(b"qgg8vlvZRS6UYooatFL8Aw");
        assert_eq!(
            verifier("secret").encrypt_token("qgg8vlvZRS6UYooatFL8Aw"),
            hex::encode(mac.finalize().into_bytes())
        );
    }

    #[test]
    fn timestamps_are_accepted_only_inside_the_window() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let window = Duration::from_secs(90 * 60);
        assert_eq!(
            check_timestamp(b"1700000000", now, window),
            Ok(1_700_000_000)
        );
        assert_eq!(
            check_timestamp(b"1699994600", now, window),
            Ok(1_699_994_600)
        );
        assert_eq!(
            check_timestamp(b"1700005400", now, window),
            Ok(1_700_005_400)
        );
        assert_eq!(
            check_timestamp(b"1699994599", now, window),
            Err(TimestampError::OutsideWindow)
        );
        assert_eq!(
            check_timestamp(b"1700005401", now, window),
            Err(TimestampError::OutsideWindow)
        );
        for bad in [
            &b""[..],
            b"-5",
            b"17e8",
            b" 1700000000",
            b"1700000000000000",
        ] {
            assert_eq!(
                check_timestamp(bad, now, window),
                Err(TimestampError::Malformed)
            );
        }
    }

    #[test]
    fn only_short_url_safe_plain_tokens_are_sane() {
        assert!(is_sane_plain_token("qgg8vlvZRS6UYooatFL8Aw"));
        assert!(is_sane_plain_token("a-b_c"));
        assert!(is_sane_plain_token(&"a".repeat(MAX_PLAIN_TOKEN)));
        assert!(!is_sane_plain_token(""));
        assert!(!is_sane_plain_token(&"a".repeat(MAX_PLAIN_TOKEN + 1)));
        for bad in ["a b", "a/b", "a+b", "a=", "ä", "a\n", "<script>"] {
            assert!(!is_sane_plain_token(bad), "{bad:?}");
        }
    }
}
