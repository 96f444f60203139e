//! Webhook verification and normalization on arbitrary requests: nothing panics, a forged
//! signature never verifies, and every body serde_json accepts as an object is normalized.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zoom_integration::secret::Secret;
use zoom_integration::webhook::{normalize, verify};

fuzz_target!(|data: &[u8]| {
    // signature \0 timestamp \0 body
    let mut parts = data.splitn(3, |b| *b == 0);
    let (signature, timestamp, body) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let verifier = verify::Verifier::new(&Secret::new("fuzz-secret-token"));
    let genuine = std::str::from_utf8(timestamp)
        .map(|ts| verifier.sign(ts, body))
        .ok();
    if verifier.verifies(signature, timestamp, body) {
        assert_eq!(genuine.as_deref().map(str::as_bytes), Some(signature));
    }
    if let Some(genuine) = &genuine {
        assert!(verifier.verifies(genuine.as_bytes(), timestamp, body));
    }
    let _ = verify::check_timestamp(
        timestamp,
        std::time::SystemTime::now(),
        std::time::Duration::from_secs(5400),
    );
    if let Ok(token) = std::str::from_utf8(body) {
        if verify::is_sane_plain_token(token) {
            let _ = verifier.encrypt_token(token);
        }
    }

    let parsed = serde_json::from_slice::<serde_json::Value>(body);
    let fields = normalize::top_level_fields(body);
    if let Ok(serde_json::Value::Object(object)) = &parsed {
        let fields = fields.expect("serde_json accepts it, so must normalization");
        assert_eq!(fields.len(), object.len());
    }
    // The one thing normalization accepts beyond serde_json: an integer too long for an f64,
    // which it keeps as a big integer. The request path refuses such bodies first (400).
    if let Err(e) = &parsed {
        if !e.to_string().starts_with("number out of range") {
            assert!(
                normalize::value(body).is_err(),
                "accepted what serde_json refuses: {e}"
            );
        }
    }
});
