//! The connection form on arbitrary bodies: nothing panics, and an accepted form's fields
//! are within the documented limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zoom_integration::setup::form::{Choice, MAX_ID_LEN, MAX_SECRET_LEN, RawForm};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = serde_urlencoded::from_bytes::<RawForm>(data) else {
        return;
    };
    let Ok(form) = raw.check() else { return };
    assert!(form.target.origin.len() <= 32);
    let app = match &form.choice {
        Choice::Default => return,
        Choice::Private(app) => app,
        Choice::ServerToServer { app, account_id } => {
            assert!(!account_id.is_empty() && account_id.len() <= MAX_ID_LEN);
            app
        }
    };
    assert!(!app.app.client_id.is_empty() && app.app.client_id.len() <= MAX_ID_LEN);
    let secret = app.app.client_secret.expose();
    assert!(!secret.is_empty() && secret.len() <= MAX_SECRET_LEN);
    assert!(!secret.chars().any(char::is_control));
});
