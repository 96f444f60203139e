//! Webhook verification and normalization on arbitrary requests: nothing panics, a signature
//! verifies only if it is the genuine one (hex digits in either case), and every body
//! serde_json accepts as an object is normalized unless it passes normalization's limits.
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
    // A signature "*", i, x stands for the genuine one with byte i xor-ed with x, so the
    // fuzzer can try near misses of a signature it could never compute.
    let mut signature = signature.to_vec();
    if let (Some(genuine), [b'*', i, x, ..]) = (&genuine, signature.as_slice()) {
        let (i, x) = (usize::from(*i) % genuine.len(), *x);
        let mut near = genuine.clone().into_bytes();
        near[i] ^= x;
        signature = near;
    }
    if verifier.verifies(&signature, timestamp, body) {
        let genuine = genuine.as_deref().map_or(&[][..], str::as_bytes);
        assert!(
            signature.len() == genuine.len()
                && signature[..3] == genuine[..3]
                && signature.eq_ignore_ascii_case(genuine),
            "a signature other than the genuine one verified"
        );
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
        match fields {
            Ok(fields) => assert_eq!(fields.len(), object.len()),
            // Normalization refuses a value more than 32 levels below the body's object, or more
            // values than its limit; serde_json accepts up to 128 levels.
            Err(e) => {
                // As written: a key given twice may hide a deeper value serde_json dropped.
                let (e, depth) = (e.to_string(), depth_as_written(body));
                assert!(
                    (e.contains("nested too deeply") && depth > 32)
                        || e.contains("values and keys"),
                    "serde_json accepts it (depth {depth}), normalization refused it: {e}"
                );
            }
        }
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

/// How deeply the JSON text nests, counting every `[` and `{` outside strings: 1 for the body's
/// object, one more per array or object inside. Normalization refuses a value inside more than
/// 32 of them.
fn depth_as_written(text: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in text {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}
