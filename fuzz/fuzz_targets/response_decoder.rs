//! The client's response decoder on arbitrary bytes.
#![no_main]

use dosp::codec::{ResponseDecoder, ResponseEvent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut dec = ResponseDecoder::new(1 << 20);
    let mut rest = data;
    for _ in 0..(data.len() + 2) {
        match dec.decode(rest) {
            Ok(Some((ev, n))) => {
                assert!(n <= rest.len());
                if let ResponseEvent::StreamData(d) = ev {
                    assert!(!d.is_empty());
                }
                rest = &rest[n..];
            }
            Ok(None) | Err(_) => return,
        }
    }
});
