//! The node's request decoder on arbitrary bytes, delivered in arbitrary pieces.
#![no_main]

use dosp::codec::{RequestDecoder, RequestEvent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&step, data)) = input.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut dec = RequestDecoder::new(1 << 16);
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    // Bounded: every iteration consumes input or feeds more, or stops.
    for _ in 0..(data.len() * 2 + 4) {
        match dec.decode(&buf) {
            Ok(Some((ev, n))) => {
                assert!(n <= buf.len(), "consumed more than given");
                if let RequestEvent::Request { header, body, .. } = &ev {
                    assert_eq!(body.len(), header.body_len.get() as usize);
                }
                if n == 0 {
                    // Only a zero-length chunk header transition may consume nothing;
                    // the decoder never does that, so treat it as a bug.
                    panic!("no progress on {ev:?}");
                }
                buf.drain(..n);
            }
            Ok(None) => {
                if fed == data.len() {
                    return;
                }
                let end = (fed + step).min(data.len());
                buf.extend_from_slice(&data[fed..end]);
                fed = end;
            }
            Err(_) => {
                assert!(dec.failed());
                return;
            }
        }
    }
});
