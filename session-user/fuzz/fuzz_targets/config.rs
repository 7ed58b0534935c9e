//! Arbitrary text through config parsing, validation and compilation: errors are fine,
//! panics are not, and every error must point inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use session_user::policy::{compile::compile, config};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse(std::path::Path::new("fuzz.toml"), text) {
        Ok(config) => {
            let _ = compile(&config.policy, |_| Some(1));
        }
        Err(error) => {
            let lines = text.lines().count().max(1);
            assert!(error.line >= 1 && error.line <= lines + 1, "{error}");
            assert!(error.column >= 1, "{error}");
        }
    }
});
