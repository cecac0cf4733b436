//! What authentication costs per request (issue 12's benchmark): certificate
//! verification in both modes over a typical request (32-byte header + 40-byte In
//! structure), capability-token checking, and the replay guard.
//!
//! Run with `cargo bench -p dosp --bench auth`. Prints nanoseconds per operation (the
//! median of 7 rounds of at least 200 ms each, after a warm-up); asserts nothing about
//! time, so a loaded machine gives slower numbers, never a failure.

use std::hint::black_box;
use std::time::{Duration, Instant};

use dosp::auth::{CapOp, Capability, CertMode, KeyRing, ReplayGuard};
use dosp::Fingerprint;

const ROUNDS: usize = 7;
const ROUND_TIME: Duration = Duration::from_millis(200);

/// Median ns per call of `op` over `ROUNDS` rounds, each long enough to time well.
fn ns_per_op(mut op: impl FnMut(u64)) -> f64 {
    // Warm-up, and an iteration count that makes a round last about ROUND_TIME.
    let mut iterations = 1_000u64;
    loop {
        let start = Instant::now();
        for i in 0..iterations {
            op(i);
        }
        if start.elapsed() >= ROUND_TIME / 4 {
            break;
        }
        iterations *= 2;
    }
    iterations *= 4;
    let mut rounds: Vec<f64> = (0..ROUNDS)
        .map(|round| {
            let base = iterations * (round as u64 + 1);
            let start = Instant::now();
            for i in 0..iterations {
                op(base + i);
            }
            start.elapsed().as_nanos() as f64 / iterations as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

fn report(what: &str, ns: f64) {
    println!("  {what:<36} {ns:8.1} ns");
}

fn main() {
    let ring = KeyRing::parse(concat!(
        "new 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n",
        "old a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5\n",
    ))
    .expect("bench key file parses");
    let mut header = [0u8; 32];
    header[..4].copy_from_slice(b"DOSP");
    let body = [0x5au8; 40];
    let key_id = ring.signer().wire_id();

    println!("dosp auth bench: ns per operation, median of {ROUNDS} rounds");
    for mode in [CertMode::HmacSha256, CertMode::DoubleMd5] {
        let cert = ring.signer().certify(mode, &[&header, &body]);
        let ns = ns_per_op(|i| {
            let mut h = header;
            h[8..16].copy_from_slice(&i.to_le_bytes());
            // The certificate matches only the first request; cost is the same either way.
            let _ = black_box(ring.verify(
                black_box(key_id),
                mode,
                &[black_box(&h), black_box(&body)],
                black_box(&cert),
            ));
        });
        report(&format!("verify {} (32+40 bytes)", mode.name()), ns);
        let ns = ns_per_op(|i| {
            let _ = black_box(ring.verify(
                black_box(i as u32 | 1),
                mode,
                &[black_box(&header), black_box(&body)],
                black_box(&cert),
            ));
        });
        report(&format!("verify {} (unknown key id)", mode.name()), ns);
    }

    let cap = Capability {
        op: CapOp::Retrieve(Fingerprint::of(b"object")),
        expires_unix_s: u64::MAX,
    };
    let token = ring.mint(&cap);
    let ns = ns_per_op(|i| {
        let _ = black_box(ring.check_token(black_box(&token), black_box(i)));
    });
    report("check_token (retrieve token)", ns);
    let ns = ns_per_op(|_| {
        black_box(ring.mint(black_box(&cap)));
    });
    report("mint (retrieve token)", ns);

    // A signed URL's two segments, as the HTTP session checks them (dosp/HTTP.md), in
    // both certificate modes.
    for (mode, what) in [
        (CertMode::HmacSha256, "check_srl (signed URL, HMAC-SHA256)"),
        (CertMode::DoubleMd5, "check_srl (signed URL, double MD5)"),
    ] {
        let fp = Fingerprint::of(b"object");
        let path = dosp::auth::srl_path_with(&ring, mode, &fp, u64::MAX, None);
        let mut segments = path.split('/').skip(1);
        let (request, signature) = (
            segments.next().unwrap_or_default().to_owned(),
            segments.next().unwrap_or_default().to_owned(),
        );
        assert_eq!(
            ring.check_srl(request.as_bytes(), signature.as_bytes(), 0, true),
            Ok(fp),
            "{what}: the URL verifies"
        );
        let ns = ns_per_op(|i| {
            let _ = black_box(ring.check_srl(
                black_box(request.as_bytes()),
                black_box(signature.as_bytes()),
                black_box(i),
                true,
            ));
        });
        report(what, ns);
    }

    // A steady stream of fresh requests, one per microsecond of simulated time, through
    // a guard big enough for them: every check evicts as well as inserts.
    let mut guard = ReplayGuard::new(Duration::from_secs(1), 4_000_000);
    let ns = ns_per_op(|i| {
        let now_ms = 1_000_000 + i / 1_000;
        let _ = black_box(guard.check(key_id, now_ms, black_box(i), now_ms));
    });
    report("replay guard check (1000 per ms)", ns);
}
