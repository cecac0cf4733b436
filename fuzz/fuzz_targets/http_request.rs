//! The HTTP request path of signed URLs (dataplane `server/http.rs`) as any client may
//! drive it: arbitrary bytes, cut into arbitrary pieces, into a session over a made-up
//! store holding one object. The session never panics, never consumes more than it was
//! lent, answers every response with a status line, and never sends object bytes
//! without a valid signature (the only URL it can accept is one the ring signed, and
//! the fuzzer cannot forge a MAC).
#![no_main]

use std::io::IoSlice;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dataplane::server::http::{HttpSession, Need, UrlKeys};
use dosp::auth::{srl_path, KeyRing};
use dosp::Fingerprint;
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_000_000;

fn ring() -> &'static KeyRing {
    static RING: OnceLock<KeyRing> = OnceLock::new();
    RING.get_or_init(|| {
        KeyRing::parse("k1 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n")
            .expect("the fuzz key file parses")
    })
}

/// The one object, and a valid URL path for it (so inputs starting with `@` reach the
/// ranges, methods and headers of an accepted request).
fn object() -> &'static (Fingerprint, Vec<u8>, String) {
    static OBJECT: OnceLock<(Fingerprint, Vec<u8>, String)> = OnceLock::new();
    OBJECT.get_or_init(|| {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let fp = Fingerprint::of(&data);
        let path = srl_path(ring(), &fp, NOW + 60, Some("f.bin"));
        (fp, data, path)
    })
}

fuzz_target!(|input: &[u8]| {
    let (fp, data, path) = object();
    // `@` stands for the valid path, so the fuzzer gets past the signature.
    let mut bytes = Vec::with_capacity(input.len());
    for &b in input {
        if b == b'@' {
            bytes.extend_from_slice(path.as_bytes());
        } else {
            bytes.push(b);
        }
    }
    let t0 = Instant::now();
    let mut s: HttpSession<Vec<u8>> = HttpSession::new(t0);
    let mut pending: Vec<u8> = Vec::new();
    let mut sent = Vec::new();
    let mut chunks = bytes.chunks(7).enumerate();
    for round in 0..10_000u32 {
        if let Some((i, chunk)) = chunks.next() {
            pending.extend_from_slice(chunk);
            s.on_arrived(t0 + Duration::from_millis(i as u64), chunk.len());
        } else if pending.is_empty() || round > 5_000 {
            s.on_peer_closed();
        }
        let keys = UrlKeys {
            ring: ring(),
            allow_md5: true,
        };
        let n = s.on_recv(t0, NOW, keys, &pending);
        assert!(n <= pending.len());
        pending.drain(..n);
        while let Some(need) = s.need() {
            match need {
                Need::Lookup(got) => {
                    assert_eq!(got, *fp, "only the signed object is ever looked up");
                    s.on_located(Some(data.len() as u64));
                }
                Need::Read { offset, len, .. } => {
                    let start = offset as usize;
                    s.on_piece(Ok(data[start..start + len].to_vec()));
                }
            }
        }
        let mut iov = [IoSlice::new(&[]); 8];
        let k = s.pending_slices(&mut iov);
        let n: usize = iov[..k].iter().map(|s| s.len()).sum();
        for slice in &iov[..k] {
            sent.extend_from_slice(slice);
        }
        s.output_sent(t0, n);
        s.take_spent().for_each(drop);
        s.take_statuses().for_each(drop);
        if s.finished() {
            break;
        }
    }
    if !sent.is_empty() {
        assert!(
            sent.starts_with(b"HTTP/1.1 "),
            "a response starts with a status line"
        );
    }
});
