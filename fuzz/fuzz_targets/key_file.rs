//! Key files as an operator may write them: parsing never panics, a ring that parses
//! has sane keys, and an error stays a short one-line message.
#![no_main]

use std::collections::HashSet;

use dosp::auth::{KeyRing, KEYS_MAX, KEY_ID_LEN_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    match KeyRing::parse(text) {
        Ok(ring) => {
            let keys = ring.keys();
            assert!(!keys.is_empty() && keys.len() <= KEYS_MAX);
            assert_eq!(ring.signer().id(), keys[0].id());
            let mut ids = HashSet::new();
            let mut wire_ids = HashSet::new();
            for key in keys {
                assert!((1..=KEY_ID_LEN_MAX).contains(&key.id().len()));
                assert!(ids.insert(key.id()), "duplicate id accepted");
                assert!(wire_ids.insert(key.wire_id()), "wire id collision accepted");
                assert_eq!(ring.key(key.wire_id()).map(|k| k.id()), Some(key.id()));
            }
            // Debug lists ids, never secrets: it stays short whatever the secrets' size.
            assert!(format!("{ring:?}").len() < 100 * (keys.len() + 1));
        }
        Err(err) => {
            // Errors quote at most two key ids (16 characters each), never a line.
            let shown = err.to_string();
            assert!(shown.len() < 200, "{shown}");
            assert!(!shown.contains('\n'));
        }
    }
});
