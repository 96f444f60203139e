//! The OAuth state decoder on arbitrary `state` and `Cookie` values: nothing panics, and
//! nothing made up is ever accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zoom_integration::setup::state::Flows;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (state, cookie) = text.split_once('\n').unwrap_or((&text, ""));
    let flows = Flows::new([9; 32], std::time::Duration::from_secs(600));
    assert!(flows.finish(state, Some(cookie)).is_err());
    assert!(flows.peek(state).is_none());
});
