//! Capability tokens as anyone may present them to a node or put in a URL: checking
//! never panics, and the only tokens that pass are the ones the ring itself mints.
#![no_main]

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use dosp::auth::KeyRing;
use libfuzzer_sys::fuzz_target;

fn ring() -> &'static KeyRing {
    static RING: OnceLock<KeyRing> = OnceLock::new();
    RING.get_or_init(|| {
        KeyRing::parse("k1 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n")
            .expect("the fuzz key file parses")
    })
}

fn check(text: &str, now_unix_s: u64) {
    if let Ok(cap) = ring().check_token(text, now_unix_s) {
        // Accepted: it must be exactly the text the ring mints for that capability
        // (one spelling per token), and not yet expired.
        assert_eq!(ring().mint(&cap), text);
        assert!(now_unix_s < cap.expires_unix_s);
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let now = u64::from(mode) << 24;
    if mode & 1 == 0 {
        // Any text at all.
        if let Ok(text) = std::str::from_utf8(rest) {
            check(text, now);
        }
    } else {
        // Well-formed base64url of arbitrary bytes, to reach the binary parser.
        check(&URL_SAFE_NO_PAD.encode(rest), now);
    }
});
