//! The deadlines of [`Session::timed_out`], driven with a made-up clock.

use std::time::Duration;

use dosp::codec::encode_request;
use dosp::wire::{Opcode, StoreIn};
use zerocopy::IntoBytes;

use super::*;

const D: Deadlines = Deadlines {
    request: Duration::from_secs(1),
    idle: Duration::from_secs(60),
    header: Duration::from_millis(500),
    rate_min_bytes_per_sec: 1000,
};

/// A session (sans IO: no connection needed).
fn session() -> Session {
    let bufs = super::BufPool::new(1).take().unwrap();
    let peer = "127.0.0.1:9".parse().unwrap();
    Session::new(peer, 1 << 20, 16, bufs, Instant::now())
}

/// Puts the session's decoder in the middle of a STORE, as after its request.
fn enter_store(s: &mut Session) {
    let mut msg = Vec::new();
    let body = StoreIn {
        size_hint: 0.into(),
        flags: 0.into(),
        reserved: 0.into(),
        expect_md5: dosp::Fingerprint([0; 16]),
        expect_len: 0.into(),
    };
    encode_request(&mut msg, Opcode::Store, 1, 0, body.as_bytes());
    assert!(s.decoder.decode(&msg).unwrap().is_some());
    assert!(s.decoder.in_store());
}

#[test]
fn a_header_has_a_deadline_from_its_first_byte_however_lively_the_peer() {
    let mut s = session();
    let t0 = s.clock.last_io;
    s.clock.head_since = Some(t0);
    s.unconsumed = 10;
    for ms in (100..=500).step_by(100) {
        // Bytes keep coming (the silence timer is satisfied)...
        s.clock.last_io = t0 + Duration::from_millis(ms);
        assert_eq!(s.timed_out(t0 + Duration::from_millis(ms), &D), None);
    }
    // ...but the header is not all here within its deadline.
    s.clock.last_io = t0 + Duration::from_millis(600);
    let late = t0 + Duration::from_millis(601);
    assert_eq!(s.timed_out(late, &D), Some(Timeout::Header));
    s.clock.head_since = None;
    assert_eq!(s.timed_out(late, &D), None);
}

#[test]
fn mid_store_a_peer_below_the_minimum_rate_is_too_slow() {
    let mut s = session();
    enter_store(&mut s);
    let t0 = s.clock.last_io;
    assert_eq!(s.timed_out(t0, &D), None);
    // Within the first window: 999 bytes is enough for a second at 1000 B/s only at
    // the window's end, so nothing is decided before.
    s.clock.moved = 999;
    s.clock.last_io = t0 + Duration::from_millis(900);
    assert_eq!(s.timed_out(t0 + Duration::from_millis(900), &D), None);
    let t1 = t0 + Duration::from_millis(1000);
    s.clock.last_io = t1;
    assert_eq!(s.timed_out(t1, &D), Some(Timeout::TooSlow));
    // Enough: the window moves on, and the next one is judged on its own.
    s.clock.moved = 1000;
    assert_eq!(s.timed_out(t1, &D), None);
    assert_eq!(s.clock.window, (t1, 1000));
    s.clock.moved = 1500;
    let t2 = t1 + Duration::from_millis(1000);
    s.clock.last_io = t2;
    assert_eq!(s.timed_out(t2, &D), Some(Timeout::TooSlow));
    // No minimum set: never too slow.
    let none = Deadlines {
        rate_min_bytes_per_sec: 0,
        ..D
    };
    assert_eq!(s.timed_out(t2, &none), None);
}

#[test]
fn a_reply_left_unread_is_held_to_the_same_rate() {
    let mut s = session();
    let t0 = s.clock.last_io;
    s.st.out.extend_from_slice(&[0u8; 100]);
    assert_eq!(s.timed_out(t0, &D), None);
    s.clock.moved = 10;
    s.clock.last_io = t0 + Duration::from_millis(1000);
    assert_eq!(
        s.timed_out(t0 + Duration::from_millis(1000), &D),
        Some(Timeout::TooSlow)
    );
}

#[test]
fn the_rate_is_not_measured_while_the_node_waits_on_nothing() {
    let mut s = session();
    let t0 = s.clock.last_io;
    // Between requests nothing moves, and that is not slowness: the window follows.
    let t = t0 + Duration::from_secs(5);
    assert_eq!(s.timed_out(t, &D), None);
    assert_eq!(s.clock.window, (t, 0));
    // A STORE starting now gets a whole window.
    enter_store(&mut s);
    s.clock.last_io = t + Duration::from_millis(900);
    assert_eq!(s.timed_out(t + Duration::from_millis(900), &D), None);
}

#[test]
fn silence_is_bounded_mid_request_and_between_requests() {
    let mut s = session();
    let t0 = s.clock.last_io;
    assert_eq!(s.timed_out(t0 + Duration::from_secs(59), &D), None);
    assert_eq!(
        s.timed_out(t0 + Duration::from_secs(61), &D),
        Some(Timeout::Idle)
    );
    let mut s = session();
    enter_store(&mut s);
    let t0 = s.clock.last_io;
    let none = Deadlines {
        rate_min_bytes_per_sec: 0,
        ..D
    };
    assert_eq!(
        s.timed_out(t0 + Duration::from_millis(1100), &none),
        Some(Timeout::Silent)
    );
}
