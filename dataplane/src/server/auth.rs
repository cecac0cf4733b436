//! The signature gate every request passes before it is served (dosp/PROTOCOL.md §7).
//!
//! A node with a cluster key holds one [`NodeAuth`], shared by every dataplane loop
//! (requests for any object arrive on any loop, so the replay memory must be one): the
//! key ring, whether double MD5 is accepted, the clock window, and the
//! [`ReplayGuard`] behind a mutex. The lock is taken only for a STORE or DELETE whose
//! certificate verified, for the few hundred nanoseconds of one guard check.
//!
//! A request may present a capability token instead (trailer mode 3): the gate checks
//! it against the same key ring, and never enters it in the replay memory.
//!
//! [`gate`] is pure apart from that guard and the clock: it takes a decoded request and
//! returns its In structure, or why it must be refused. The session (TCP) and the
//! cluster service (UDP) answer the refusal each in their transport's way.
//!
//! What it must never do: let a request through that a keyed node must refuse, enter
//! a request in the replay memory before its certificate verified (anyone could fill
//! it), or panic (a poisoned lock is taken over: the guard has no invariant a panic
//! elsewhere could break mid-way that would make it lax).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use dosp::auth::{CertMode, KeyRing, ReplayError, ReplayGuard};
use dosp::signed::{self, Refusal};
use dosp::wire::{AuthTrailer, Header, Opcode};

/// Default clock window: a signed request's timestamp may be this far from the node's
/// clock, either way.
pub const WINDOW_DEFAULT: Duration = Duration::from_secs(300);
/// Default size of the replay memory, in requests. Each costs about 64 bytes (a slot
/// of the guard's wheel and an entry of its hash set), so 16 MiB, allocated at
/// start-up: 400 STOREs and DELETEs a second over the default window (2 × 300 s, plus
/// a granule) fit.
pub const REPLAY_MAX_DEFAULT: usize = 262_144;

/// A keyed node's authentication state.
#[derive(Debug)]
pub struct NodeAuth {
    ring: KeyRing,
    allow_md5: bool,
    window_ms: u64,
    guard: Mutex<ReplayGuard>,
    /// Unix time in ms: the wall clock, or a fixed one in tests.
    clock: fn() -> u64,
}

/// Why [`gate`] refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// `SIGNED` with a body shorter than a trailer: BAD_REQUEST with the body's size.
    Malformed(u32),
    /// AUTH_FAILED with the reason's code.
    Refused(Refusal),
}

impl NodeAuth {
    /// `replay_max` requests are remembered at most; their memory is allocated now.
    pub fn new(ring: KeyRing, allow_md5: bool, window: Duration, replay_max: usize) -> NodeAuth {
        NodeAuth {
            ring,
            allow_md5,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            guard: Mutex::new(ReplayGuard::new(window, replay_max)),
            clock: signed::now_ms,
        }
    }

    /// The same node with another clock (tests: a fixed time).
    pub fn with_clock(mut self, clock: fn() -> u64) -> NodeAuth {
        self.clock = clock;
        self
    }

    /// The node's clock, in seconds since the Unix epoch (signed URLs' expiry).
    pub fn now_unix_s(&self) -> u64 {
        (self.clock)() / 1000
    }

    pub fn ring(&self) -> &KeyRing {
        &self.ring
    }

    pub fn allow_md5(&self) -> bool {
        self.allow_md5
    }

    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// Signs the message at `out[at..]` as the node signs what it originates:
    /// HMAC-SHA256 with the first key, now, a fresh nonce.
    pub fn sign(&self, out: &mut Vec<u8>, at: usize) {
        signed::sign_in_place(
            out,
            at,
            self.ring.signer(),
            CertMode::HmacSha256,
            (self.clock)(),
            signed::fresh_nonce(),
        );
    }

    /// Checks a signed request's trailer: certificate, then time, then (STORE and
    /// DELETE) replay. A capability (mode 3) instead: its MAC over the capability
    /// rebuilt from the request, its expiry, its scope; never the replay memory (a
    /// token is a bearer capability until it expires).
    fn check(
        &self,
        header: &Header,
        opcode: Result<Opcode, u16>,
        inner: &[u8],
        t: &AuthTrailer,
    ) -> Result<(), Refusal> {
        if t.mode == signed::MODE_CAPABILITY {
            let now_unix_s = (self.clock)() / 1000;
            return signed::verify_capability(&self.ring, opcode, inner, t, now_unix_s);
        }
        signed::verify(&self.ring, self.allow_md5, header, inner, t)?;
        let now_ms = (self.clock)();
        let ts = t.timestamp_ms.get();
        if matches!(opcode, Ok(Opcode::Store | Opcode::Delete)) {
            let mut guard = self.guard.lock().unwrap_or_else(PoisonError::into_inner);
            return guard
                .check(t.key_id.get(), ts, t.nonce.get(), now_ms)
                .map_err(|e| match e {
                    ReplayError::Stale | ReplayError::Future => Refusal::Timestamp,
                    ReplayError::Replayed => Refusal::Replayed,
                    ReplayError::Full => Refusal::ReplayFull,
                });
        }
        // Idempotent: a zero timestamp is allowed, any other must be in the window.
        if ts != 0 && now_ms.abs_diff(ts) > self.window_ms {
            return Err(Refusal::Timestamp);
        }
        Ok(())
    }
}

/// The In structure of a request, or why it is refused. Without a key (`auth` is
/// `None`) every request passes and a signed one's trailer is dropped unread.
pub fn gate<'a>(
    auth: Option<&NodeAuth>,
    header: &Header,
    opcode: Result<Opcode, u16>,
    body: &'a [u8],
) -> Result<&'a [u8], Gate> {
    let Some((inner, trailer)) = signed::split(header, body) else {
        return Err(Gate::Malformed(body.len() as u32));
    };
    let Some(auth) = auth else {
        return Ok(inner);
    };
    let Some(t) = trailer else {
        return Err(Gate::Refused(Refusal::Unsigned));
    };
    auth.check(header, opcode, inner, &t)
        .map(|()| inner)
        .map_err(Gate::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dosp::auth::{CapOp, Capability, Token};
    use dosp::codec::encode_request;
    use dosp::wire::{DeleteIn, Kind, RangeIn, RetrieveIn, StoreIn};
    use dosp::Fingerprint;
    use zerocopy::{FromBytes, IntoBytes};

    const NOW_MS: u64 = 1_800_000_000_000;
    const KEYS: &str = "new 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n\
                        old ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n";

    fn node(allow_md5: bool) -> NodeAuth {
        NodeAuth::new(
            KeyRing::parse(KEYS).expect("keys"),
            allow_md5,
            Duration::from_secs(300),
            2,
        )
        .with_clock(|| NOW_MS)
    }

    fn request(op: Opcode, body: &[u8], key: Option<(&str, CertMode, u64, u64)>) -> Vec<u8> {
        let mut msg = Vec::new();
        encode_request(&mut msg, op, 1, 0, body);
        if let Some((id, mode, ts, nonce)) = key {
            let ring = KeyRing::parse(KEYS).expect("keys");
            let k = ring.keys().iter().find(|k| k.id() == id).expect("key");
            signed::sign_in_place(&mut msg, 0, k, mode, ts, nonce);
        }
        msg
    }

    fn pass(auth: Option<&NodeAuth>, msg: &[u8]) -> Result<usize, Gate> {
        let (h, body) = Header::read_from_prefix(msg).expect("header");
        h.check(Kind::Request).expect("valid");
        gate(auth, &h, h.opcode().ok_or(h.opcode.get()), body).map(<[u8]>::len)
    }

    #[test]
    fn signed_requests_pass_in_both_modes_and_with_an_older_key() {
        let fp = RetrieveIn {
            fingerprint: Fingerprint([1; 16]),
        };
        let auth = node(true);
        for (id, mode) in [
            ("new", CertMode::HmacSha256),
            ("new", CertMode::DoubleMd5),
            ("old", CertMode::HmacSha256),
        ] {
            let msg = request(Opcode::Retrieve, fp.as_bytes(), Some((id, mode, 0, 1)));
            assert_eq!(pass(Some(&auth), &msg), Ok(16));
        }
        // Double MD5 on a node that does not allow it.
        let msg = request(
            Opcode::Retrieve,
            fp.as_bytes(),
            Some(("new", CertMode::DoubleMd5, 0, 1)),
        );
        assert_eq!(
            pass(Some(&node(false)), &msg),
            Err(Gate::Refused(Refusal::Mode))
        );
        // Unsigned.
        let msg = request(Opcode::Retrieve, fp.as_bytes(), None);
        assert_eq!(
            pass(Some(&auth), &msg),
            Err(Gate::Refused(Refusal::Unsigned))
        );
        // Without a key, signed and unsigned pass, the trailer stripped.
        assert_eq!(pass(None, &msg), Ok(16));
        let signed = request(
            Opcode::Retrieve,
            fp.as_bytes(),
            Some(("new", CertMode::HmacSha256, 5, 1)),
        );
        assert_eq!(pass(None, &signed), Ok(16));
        // SIGNED and too short for a trailer: malformed, keyed or not.
        let mut h = Header::new(
            Kind::Request,
            Opcode::Retrieve,
            1,
            16,
            dosp::wire::FLAG_SIGNED,
        );
        h.checksum = h.compute_checksum().into();
        let mut short = h.as_bytes().to_vec();
        short.extend_from_slice(fp.as_bytes());
        assert_eq!(pass(None, &short), Err(Gate::Malformed(16)));
        assert_eq!(pass(Some(&auth), &short), Err(Gate::Malformed(16)));
    }

    #[test]
    fn idempotent_requests_may_have_no_time_but_not_a_wrong_one() {
        let auth = node(false);
        let fp = RetrieveIn {
            fingerprint: Fingerprint([1; 16]),
        };
        let window = 300_000;
        for (ts, ok) in [
            (0, true),
            (NOW_MS, true),
            (NOW_MS - window, true),
            (NOW_MS + window, true),
            (NOW_MS - window - 1, false),
            (NOW_MS + window + 1, false),
        ] {
            let msg = request(
                Opcode::Retrieve,
                fp.as_bytes(),
                Some(("new", CertMode::HmacSha256, ts, 7)),
            );
            let want = if ok {
                Ok(16)
            } else {
                Err(Gate::Refused(Refusal::Timestamp))
            };
            // Replays of idempotent requests pass.
            assert_eq!(pass(Some(&auth), &msg), want, "ts {ts}");
            assert_eq!(pass(Some(&auth), &msg), want, "ts {ts}, again");
        }
    }

    #[test]
    fn deletes_are_refused_when_replayed_stale_or_past_the_memory() {
        let auth = node(false);
        let del = DeleteIn {
            fingerprint: Fingerprint([2; 16]),
        };
        let signed = |ts, nonce| {
            request(
                Opcode::Delete,
                del.as_bytes(),
                Some(("new", CertMode::HmacSha256, ts, nonce)),
            )
        };
        // A DELETE must carry a time.
        assert_eq!(
            pass(Some(&auth), &signed(0, 1)),
            Err(Gate::Refused(Refusal::Timestamp))
        );
        let first = signed(NOW_MS, 1);
        assert_eq!(pass(Some(&auth), &first), Ok(16));
        assert_eq!(
            pass(Some(&auth), &first),
            Err(Gate::Refused(Refusal::Replayed))
        );
        // A wrong certificate is refused before the memory is looked at (so it fills
        // nothing).
        let mut forged = signed(NOW_MS, 2);
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert_eq!(
            pass(Some(&auth), &forged),
            Err(Gate::Refused(Refusal::BadCertificate))
        );
        assert_eq!(pass(Some(&auth), &signed(NOW_MS, 2)), Ok(16));
        // The memory holds 2: a third is refused rather than a remembered one forgotten.
        assert_eq!(
            pass(Some(&auth), &signed(NOW_MS, 3)),
            Err(Gate::Refused(Refusal::ReplayFull))
        );
    }

    // ---- capability tokens (trailer mode 3) -------------------------------------------

    const NOW_S: u64 = NOW_MS / 1000;

    fn token(op: CapOp, expires_unix_s: u64) -> Token {
        let ring = KeyRing::parse(KEYS).expect("keys");
        Token::parse(&ring.mint(&Capability { op, expires_unix_s })).expect("token")
    }

    fn presented(op: Opcode, body: &[u8], t: &Token) -> Vec<u8> {
        let mut msg = Vec::new();
        encode_request(&mut msg, op, 1, 0, body);
        signed::present_in_place(&mut msg, 0, t);
        msg
    }

    fn retrieve_in(fp: Fingerprint) -> Vec<u8> {
        RetrieveIn { fingerprint: fp }.as_bytes().to_vec()
    }

    fn range_in(fp: Fingerprint) -> Vec<u8> {
        RangeIn {
            fingerprint: fp,
            offset: 3.into(),
            len: 4.into(),
        }
        .as_bytes()
        .to_vec()
    }

    fn store_in(len: Option<u64>) -> Vec<u8> {
        StoreIn::new(len.unwrap_or(100), len, None)
            .as_bytes()
            .to_vec()
    }

    const REFUSED_SCOPE: Result<usize, Gate> = Err(Gate::Refused(Refusal::TokenScope));
    const REFUSED_CERT: Result<usize, Gate> = Err(Gate::Refused(Refusal::BadCertificate));

    #[test]
    fn a_retrieve_token_opens_its_object_only() {
        let auth = node(false);
        let mine = Fingerprint([3; 16]);
        let other = Fingerprint([4; 16]);
        let t = token(CapOp::Retrieve(mine), NOW_S + 60);
        // Its object, whole or a range, as often as it is presented.
        for _ in 0..3 {
            let msg = presented(Opcode::Retrieve, &retrieve_in(mine), &t);
            assert_eq!(pass(Some(&auth), &msg), Ok(16));
            let msg = presented(Opcode::RetrieveRange, &range_in(mine), &t);
            assert_eq!(pass(Some(&auth), &msg), Ok(32));
        }
        // Another object: the capability rebuilt from the request is not the one
        // signed.
        let msg = presented(Opcode::Retrieve, &retrieve_in(other), &t);
        assert_eq!(pass(Some(&auth), &msg), REFUSED_CERT);
        let msg = presented(Opcode::RetrieveRange, &range_in(other), &t);
        assert_eq!(pass(Some(&auth), &msg), REFUSED_CERT);
        // Operations no token covers.
        for (op, body) in [
            (Opcode::Delete, retrieve_in(mine)),
            (Opcode::Locate, retrieve_in(mine)),
            (Opcode::Null, Vec::new()),
            (Opcode::GetContents, vec![0; 8]),
        ] {
            assert_eq!(
                pass(Some(&auth), &presented(op, &body, &t)),
                REFUSED_SCOPE,
                "{op:?}"
            );
        }
        // A STORE with a retrieve token: rebuilt as a store token nobody signed.
        let msg = presented(Opcode::Store, &store_in(Some(5)), &t);
        assert_eq!(pass(Some(&auth), &msg), REFUSED_CERT);
        // An In structure too short to name an object.
        let msg = presented(Opcode::Retrieve, &[3; 8], &t);
        assert_eq!(pass(Some(&auth), &msg), REFUSED_SCOPE);
        // A node without a key drops the trailer unread.
        let msg = presented(Opcode::Delete, &retrieve_in(other), &t);
        assert_eq!(pass(None, &msg), Ok(16));
    }

    #[test]
    fn expired_tampered_and_unknown_tokens_are_refused() {
        let auth = node(false);
        let fp = Fingerprint([5; 16]);
        let body = retrieve_in(fp);
        // Valid until the second it expires.
        let last = token(CapOp::Retrieve(fp), NOW_S + 1);
        assert_eq!(
            pass(Some(&auth), &presented(Opcode::Retrieve, &body, &last)),
            Ok(16)
        );
        let expired = token(CapOp::Retrieve(fp), NOW_S);
        assert_eq!(
            pass(Some(&auth), &presented(Opcode::Retrieve, &body, &expired)),
            Err(Gate::Refused(Refusal::TokenExpired))
        );
        // A later expiry than signed: tampered.
        let stretched = Token {
            cap: Capability {
                expires_unix_s: NOW_S + 3_600,
                ..expired.cap
            },
            ..expired
        };
        assert_eq!(
            pass(Some(&auth), &presented(Opcode::Retrieve, &body, &stretched)),
            REFUSED_CERT
        );
        let good = token(CapOp::Retrieve(fp), NOW_S + 60);
        for i in [0, 17, 31] {
            let mut t = good;
            t.mac[i] ^= 1;
            assert_eq!(
                pass(Some(&auth), &presented(Opcode::Retrieve, &body, &t)),
                REFUSED_CERT,
                "byte {i}"
            );
        }
        let stranger = Token {
            key_id: dosp::auth::wire_id_of("zz"),
            ..good
        };
        assert_eq!(
            pass(Some(&auth), &presented(Opcode::Retrieve, &body, &stranger)),
            Err(Gate::Refused(Refusal::UnknownKey))
        );
        // Minted with an older key of the ring: accepted.
        let old_ring = KeyRing::parse(KEYS.lines().nth(1).expect("old")).expect("old key");
        let old = Token::parse(&old_ring.mint(&good.cap)).expect("token");
        assert_eq!(
            pass(Some(&auth), &presented(Opcode::Retrieve, &body, &old)),
            Ok(16)
        );
    }

    #[test]
    fn a_store_token_allows_stores_that_promise_at_most_its_bytes() {
        // A replay memory of 2: tokens never use it.
        let auth = node(false);
        let t = token(CapOp::Store { max_bytes: 1000 }, NOW_S + 600);
        for len in [0, 1, 999, 1000, 1000, 1000] {
            let msg = presented(Opcode::Store, &store_in(Some(len)), &t);
            assert_eq!(pass(Some(&auth), &msg), Ok(40), "len {len}");
        }
        let msg = presented(Opcode::Store, &store_in(Some(1001)), &t);
        assert_eq!(pass(Some(&auth), &msg), REFUSED_SCOPE);
        // Without EXPECT_LEN the node cannot hold the data to the limit.
        let msg = presented(Opcode::Store, &store_in(None), &t);
        assert_eq!(pass(Some(&auth), &msg), REFUSED_SCOPE);
        // The limit is signed: a larger one in the trailer is a forgery.
        let raised = Token {
            cap: Capability {
                op: CapOp::Store { max_bytes: 5000 },
                ..t.cap
            },
            ..t
        };
        let msg = presented(Opcode::Store, &store_in(Some(2000)), &raised);
        assert_eq!(pass(Some(&auth), &msg), REFUSED_CERT);
        // A store token opens no object.
        let msg = presented(Opcode::Retrieve, &retrieve_in(Fingerprint([1; 16])), &t);
        assert_eq!(pass(Some(&auth), &msg), REFUSED_CERT);
        let msg = presented(Opcode::Delete, &retrieve_in(Fingerprint([1; 16])), &t);
        assert_eq!(pass(Some(&auth), &msg), REFUSED_SCOPE);
        // Signed STOREs still use the memory.
        let signed = |nonce| {
            request(
                Opcode::Store,
                &store_in(Some(1)),
                Some(("new", CertMode::HmacSha256, NOW_MS, nonce)),
            )
        };
        assert_eq!(pass(Some(&auth), &signed(1)), Ok(40));
        assert_eq!(pass(Some(&auth), &signed(2)), Ok(40));
        assert_eq!(
            pass(Some(&auth), &signed(3)),
            Err(Gate::Refused(Refusal::ReplayFull))
        );
    }

    #[test]
    fn the_trailer_carries_the_token_as_protocol_md_says() {
        let t = token(CapOp::Store { max_bytes: 77 }, 1_234);
        let tr = signed::token_trailer(&t);
        assert_eq!(tr.mode, 3);
        assert_eq!(tr.key_id.get(), dosp::auth::wire_id_of("new"));
        assert_eq!(tr.timestamp_ms.get(), 1_234, "seconds, not ms");
        assert_eq!(tr.nonce.get(), 77);
        assert_eq!(tr.certificate, t.mac);
        let r = token(CapOp::Retrieve(Fingerprint([9; 16])), 5);
        assert_eq!(signed::token_trailer(&r).nonce.get(), 0);
    }
}
