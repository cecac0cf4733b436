//! Signed DOSP messages (protocol version 2, dosp/PROTOCOL.md §7): appending an
//! [`AuthTrailer`] to a message and checking one.
//!
//! The cryptography is [`crate::auth`]'s; this module only says which bytes a
//! certificate covers — header bytes 0..28 (everything but the header's checksum), the
//! In/Out structure, trailer bytes 0..24 (everything but the certificate) — and why a
//! node refuses a request ([`Refusal`], the `detail` of its AUTH_FAILED).
//!
//! What it must never do: panic on a received message, or treat a message as signed
//! when its trailer does not fit in its body.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use zerocopy::{FromBytes, IntoBytes};

use crate::auth::{AuthError, CapOp, Capability, CertMode, Key, KeyRing, Token, TokenError};
use crate::wire::{
    AuthTrailer, Header, Opcode, RangeIn, RetrieveIn, StoreIn, FLAG_SIGNED, VERSION,
};
use crate::Fingerprint;

/// The trailer `mode` of a request that presents a capability token instead of a
/// certificate (dosp/PROTOCOL.md §7). Modes 1 and 2 are [`CertMode`]s.
pub const MODE_CAPABILITY: u8 = 3;

/// Why a node refused a request with AUTH_FAILED: the reply's `detail`, and the
/// `reason` label of `dosd_auth_failed_total`. Codes are wire values: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Refusal {
    /// The request carries no trailer (no `SIGNED` flag, or a version-1 header).
    Unsigned = 1,
    /// The trailer names a key id the node does not hold (never configured, or
    /// rotated out).
    UnknownKey = 2,
    /// The certificate does not match the message and the key.
    BadCertificate = 3,
    /// A certificate mode the node does not accept (unknown, or double MD5 on a node
    /// that does not allow it).
    Mode = 4,
    /// The timestamp is outside the node's clock window.
    Timestamp = 5,
    /// STORE or DELETE: the same key, timestamp and nonce were already accepted.
    Replayed = 6,
    /// STORE or DELETE: the node's replay memory is full of requests still inside
    /// the window.
    ReplayFull = 7,
    /// A capability (trailer mode 3) that verified but has expired.
    TokenExpired = 8,
    /// A capability (trailer mode 3) for an opcode no token covers, on a request whose
    /// In structure is too short, or a STORE without `EXPECT_LEN` or longer than the
    /// token's `max_bytes`.
    TokenScope = 9,
}

impl Refusal {
    /// The reason a refused capability token or signed URL is counted under: a
    /// malformed or altered one is a bad certificate, a double-MD5 URL where that
    /// mode is not accepted is [`Refusal::Mode`].
    pub fn of_token(e: &TokenError) -> Refusal {
        match e {
            TokenError::UnknownKey(_) => Refusal::UnknownKey,
            TokenError::Expired { .. } => Refusal::TokenExpired,
            TokenError::BadSignature | TokenError::Malformed(_) => Refusal::BadCertificate,
            TokenError::Md5Refused => Refusal::Mode,
        }
    }

    /// Every reason, in code order.
    pub const ALL: [Refusal; 9] = [
        Refusal::Unsigned,
        Refusal::UnknownKey,
        Refusal::BadCertificate,
        Refusal::Mode,
        Refusal::Timestamp,
        Refusal::Replayed,
        Refusal::ReplayFull,
        Refusal::TokenExpired,
        Refusal::TokenScope,
    ];

    /// The AUTH_FAILED `detail`.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The reason with this code, if any.
    pub fn from_code(code: u32) -> Option<Refusal> {
        Refusal::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The metric label and log name.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::UnknownKey => "unknown_key",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::Mode => "mode",
            Refusal::Timestamp => "timestamp",
            Refusal::Replayed => "replayed",
            Refusal::ReplayFull => "replay_full",
            Refusal::TokenExpired => "token_expired",
            Refusal::TokenScope => "token_scope",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A message's body split at its trailer: the In/Out structure and, for a signed
/// message, the trailer. `None` when the header says signed but the body is shorter
/// than a trailer.
pub fn split<'a>(header: &Header, body: &'a [u8]) -> Option<(&'a [u8], Option<AuthTrailer>)> {
    if !header.signed() {
        return Some((body, None));
    }
    let at = body.len().checked_sub(AuthTrailer::SIZE)?;
    let trailer = AuthTrailer::read_from_bytes(&body[at..]).ok()?;
    Some((&body[..at], Some(trailer)))
}

/// The certificate of a message whose header (with `SIGNED` set and `body_len`
/// counting the trailer), In/Out structure and trailer are given; the trailer's own
/// certificate bytes are not covered.
pub fn certify(
    key: &Key,
    mode: CertMode,
    header: &Header,
    inner: &[u8],
    t: &AuthTrailer,
) -> [u8; 32] {
    key.certify(
        mode,
        &[
            &header.as_bytes()[..28],
            inner,
            &t.as_bytes()[..AuthTrailer::SIGNED_PREFIX],
        ],
    )
}

/// Checks a trailer's certificate against `ring`. Double MD5 is refused unless
/// `allow_md5`. Time and replay are the caller's (they depend on the opcode).
pub fn verify(
    ring: &KeyRing,
    allow_md5: bool,
    header: &Header,
    inner: &[u8],
    t: &AuthTrailer,
) -> Result<(), Refusal> {
    let mode = match CertMode::from_u8(t.mode) {
        Some(CertMode::DoubleMd5) if !allow_md5 => return Err(Refusal::Mode),
        Some(mode) => mode,
        None => return Err(Refusal::Mode),
    };
    ring.verify(
        t.key_id.get(),
        mode,
        &[
            &header.as_bytes()[..28],
            inner,
            &t.as_bytes()[..AuthTrailer::SIGNED_PREFIX],
        ],
        &t.certificate,
    )
    .map_err(|e| match e {
        AuthError::UnknownKey(_) => Refusal::UnknownKey,
        AuthError::BadCertificate => Refusal::BadCertificate,
        AuthError::BadMode(_) => Refusal::Mode,
    })
}

/// Signs the message that starts at `out[at..]` (a header and its whole In/Out
/// structure, unsigned, version 2): sets `SIGNED`, grows `body_len` by the trailer,
/// re-checksums the header and appends the trailer. Does nothing to a message that is
/// not there whole.
pub fn sign_in_place(
    out: &mut Vec<u8>,
    at: usize,
    key: &Key,
    mode: CertMode,
    timestamp_ms: u64,
    nonce: u64,
) {
    let Some((header, inner_at)) = signed_header(out, at) else {
        return;
    };
    let mut t = AuthTrailer {
        key_id: key.wire_id().into(),
        mode: mode as u8,
        reserved: [0; 3],
        timestamp_ms: timestamp_ms.into(),
        nonce: nonce.into(),
        certificate: [0; 32],
    };
    t.certificate = certify(key, mode, &header, &out[inner_at..], &t);
    out[at..inner_at].copy_from_slice(header.as_bytes());
    out.extend_from_slice(t.as_bytes());
}

/// The header of the unsigned message that is whole at `out[at..]` (a header and its
/// In structure), made into a signed one: version 2, `SIGNED` set, `body_len` grown by
/// the trailer, checksummed again; with where its In structure starts. `None` when the
/// message is not there whole, or is signed already.
fn signed_header(out: &[u8], at: usize) -> Option<(Header, usize)> {
    let Some(Ok((mut header, _))) = out.get(at..).map(Header::read_from_prefix) else {
        return None;
    };
    let inner_at = at + Header::SIZE;
    if out.len() != inner_at + header.body_len.get() as usize || header.signed() {
        return None;
    }
    header.version = VERSION;
    header.flags = (header.flags.get() | FLAG_SIGNED).into();
    header.body_len = (header.body_len.get() + AuthTrailer::SIZE as u32).into();
    header.checksum = header.compute_checksum().into();
    Some((header, inner_at))
}

/// The mode-3 trailer that presents `token`: its key id, its expiry (seconds) in
/// `timestamp_ms`, its `max_bytes` (store) or 0 (retrieve) in `nonce`, its MAC as the
/// certificate.
pub fn token_trailer(token: &Token) -> AuthTrailer {
    let max_bytes = match token.cap.op {
        CapOp::Retrieve(_) => 0,
        CapOp::Store { max_bytes } => max_bytes,
    };
    AuthTrailer {
        key_id: token.key_id.into(),
        mode: MODE_CAPABILITY,
        reserved: [0; 3],
        timestamp_ms: token.cap.expires_unix_s.into(),
        nonce: max_bytes.into(),
        certificate: token.mac,
    }
}

/// Presents `token` on the message that starts at `out[at..]` (a header and its whole
/// In structure, unsigned, version 2): sets `SIGNED`, grows `body_len` by the trailer,
/// re-checksums the header and appends the mode-3 trailer ([`token_trailer`]). Does
/// nothing to a message that is not there whole.
pub fn present_in_place(out: &mut Vec<u8>, at: usize, token: &Token) {
    let Some((header, inner_at)) = signed_header(out, at) else {
        return;
    };
    out[at..inner_at].copy_from_slice(header.as_bytes());
    out.extend_from_slice(token_trailer(token).as_bytes());
}

/// What a mode-3 trailer claims, rebuilt from the request it ends: the capability
/// (RETRIEVE and RETRIEVE_RANGE: a retrieve token of the In structure's fingerprint;
/// STORE: a store token of `max_bytes` = the trailer's `nonce`; expiry = the trailer's
/// `timestamp_ms` field, in seconds), and what the request asks for — the object, and
/// for a STORE its `EXPECT_LEN` — for [`Capability::permits`]. Any other opcode, or an
/// In structure too short to read, is [`Refusal::TokenScope`].
pub fn claimed_capability(
    opcode: Result<Opcode, u16>,
    inner: &[u8],
    t: &AuthTrailer,
) -> Result<(Capability, Option<Fingerprint>, Option<u64>), Refusal> {
    let expires_unix_s = t.timestamp_ms.get();
    let (op, object, len) = match opcode {
        Ok(Opcode::Retrieve) => {
            let (r, _) = RetrieveIn::read_from_prefix(inner).map_err(|_| Refusal::TokenScope)?;
            (CapOp::Retrieve(r.fingerprint), Some(r.fingerprint), None)
        }
        Ok(Opcode::RetrieveRange) => {
            let (r, _) = RangeIn::read_from_prefix(inner).map_err(|_| Refusal::TokenScope)?;
            (CapOp::Retrieve(r.fingerprint), Some(r.fingerprint), None)
        }
        Ok(Opcode::Store) => {
            let (s, _) = StoreIn::read_from_prefix(inner).map_err(|_| Refusal::TokenScope)?;
            let op = CapOp::Store {
                max_bytes: t.nonce.get(),
            };
            (op, None, s.expect_len())
        }
        _ => return Err(Refusal::TokenScope),
    };
    Ok((Capability { op, expires_unix_s }, object, len))
}

/// Checks a mode-3 trailer against `ring` at `now_unix_s`: the capability rebuilt from
/// the request ([`claimed_capability`]) must carry the trailer's MAC under the named
/// key (constant time: [`KeyRing::verify_capability`]), be unexpired, and permit the
/// request ([`Capability::permits`]: the object; a STORE's `EXPECT_LEN` within
/// `max_bytes`). A token for another object or another operation rebuilds into a
/// capability nobody signed, so it fails as [`Refusal::BadCertificate`].
pub fn verify_capability(
    ring: &KeyRing,
    opcode: Result<Opcode, u16>,
    inner: &[u8],
    t: &AuthTrailer,
    now_unix_s: u64,
) -> Result<(), Refusal> {
    let (cap, object, len) = claimed_capability(opcode, inner, t)?;
    ring.verify_capability(&cap, t.key_id.get(), &t.certificate, now_unix_s)
        .map_err(|e| Refusal::of_token(&e))?;
    let Ok(opcode) = opcode else {
        return Err(Refusal::TokenScope);
    };
    if cap.permits(opcode, object.as_ref(), len) {
        Ok(())
    } else {
        Err(Refusal::TokenScope)
    }
}

/// The first key of a ring and the mode to sign with: what a client or a node signs
/// its messages with.
#[derive(Debug, Clone)]
pub struct Signer {
    ring: KeyRing,
    mode: CertMode,
}

impl Signer {
    pub fn new(ring: KeyRing, mode: CertMode) -> Signer {
        Signer { ring, mode }
    }

    pub fn ring(&self) -> &KeyRing {
        &self.ring
    }

    pub fn mode(&self) -> CertMode {
        self.mode
    }

    /// Signs the message at `out[at..]` with the ring's first key, now and a fresh
    /// nonce ([`sign_in_place`]).
    pub fn sign(&self, out: &mut Vec<u8>, at: usize) {
        sign_in_place(
            out,
            at,
            self.ring.signer(),
            self.mode,
            now_ms(),
            fresh_nonce(),
        );
    }

    /// Checks a received message's trailer: `Ok(true)` signed by a key of the ring
    /// (any mode), `Ok(false)` unsigned.
    pub fn check(&self, header: &Header, body: &[u8]) -> Result<bool, Refusal> {
        match split(header, body) {
            None => Err(Refusal::Unsigned),
            Some((_, None)) => Ok(false),
            Some((inner, Some(t))) => verify(&self.ring, true, header, inner, &t).map(|()| true),
        }
    }
}

/// Unix time in ms (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A nonce for a trailer: unique per process and call (a counter), mixed with the
/// process's random hash keys so two processes signing in the same millisecond differ.
/// It needs to be unique, not secret: the certificate covers it.
pub fn fresh_nonce() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static KEYS: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    let mut h = KEYS.get_or_init(RandomState::new).build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode_request;
    use crate::wire::{Kind, Opcode, RetrieveIn, VERSION};

    const KEYS: &str = "k1 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n\
                        k0 ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n";

    fn signed(mode: CertMode) -> (KeyRing, Vec<u8>) {
        let ring = KeyRing::parse(KEYS).expect("keys");
        let mut msg = Vec::new();
        let body = RetrieveIn {
            fingerprint: crate::Fingerprint([7; 16]),
        };
        encode_request(&mut msg, Opcode::Retrieve, 9, 0, body.as_bytes());
        sign_in_place(&mut msg, 0, ring.signer(), mode, 1_000, 42);
        (ring, msg)
    }

    fn parts(msg: &[u8]) -> (Header, &[u8]) {
        let (h, body) = Header::read_from_prefix(msg).expect("header");
        h.check(Kind::Request).expect("valid header");
        (h, body)
    }

    #[test]
    fn a_signed_request_has_the_trailer_and_verifies_in_both_modes() {
        for mode in [CertMode::HmacSha256, CertMode::DoubleMd5] {
            let (ring, msg) = signed(mode);
            assert_eq!(msg.len(), 32 + 16 + 56);
            let (h, body) = parts(&msg);
            assert_eq!(h.version, VERSION);
            assert!(h.signed());
            assert_eq!(h.body_len.get(), 16 + 56);
            let (inner, t) = split(&h, body).expect("fits");
            let t = t.expect("signed");
            assert_eq!(inner.len(), 16);
            assert_eq!(t.key_id.get(), crate::auth::wire_id_of("k1"));
            assert_eq!(t.mode, mode as u8);
            assert_eq!((t.timestamp_ms.get(), t.nonce.get()), (1_000, 42));
            if mode == CertMode::DoubleMd5 {
                assert_eq!(t.certificate[16..], [0u8; 16]);
            }
            assert_eq!(verify(&ring, true, &h, inner, &t), Ok(()));
            let refused_md5 = verify(&ring, false, &h, inner, &t);
            match mode {
                CertMode::DoubleMd5 => assert_eq!(refused_md5, Err(Refusal::Mode)),
                CertMode::HmacSha256 => assert_eq!(refused_md5, Ok(())),
            }
        }
    }

    #[test]
    fn any_changed_covered_byte_fails_and_the_checksum_is_not_covered() {
        let (ring, msg) = signed(CertMode::HmacSha256);
        for i in 0..msg.len() {
            let mut bad = msg.clone();
            bad[i] ^= 0x01;
            let (h, body) = Header::read_from_prefix(&bad).expect("header");
            let Some((inner, Some(t))) = split(&h, body) else {
                continue;
            };
            let r = verify(&ring, true, &h, inner, &t);
            match i {
                // The checksum is not covered (the header check catches it).
                28..=31 => assert_eq!(r, Ok(()), "byte {i}"),
                // The key id: no such key.
                48..=51 => assert_eq!(r, Err(Refusal::UnknownKey), "byte {i}"),
                // The mode: 1 becomes 0, unknown.
                52 => assert_eq!(r, Err(Refusal::Mode), "byte {i}"),
                _ => assert_eq!(r, Err(Refusal::BadCertificate), "byte {i}"),
            }
        }
    }

    #[test]
    fn other_keys_unknown_keys_and_short_trailers() {
        let (_, msg) = signed(CertMode::HmacSha256);
        let (h, body) = parts(&msg);
        let (inner, t) = split(&h, body).expect("fits");
        let t = t.expect("signed");
        // A ring with another secret under the same id: a wrong certificate.
        let other =
            KeyRing::parse("k1 1111111111111111111111111111111111111111111111111111111111111111\n")
                .expect("keys");
        assert_eq!(
            verify(&other, true, &h, inner, &t),
            Err(Refusal::BadCertificate)
        );
        // The old key rotated out: unknown.
        let new_only =
            KeyRing::parse("k2 2222222222222222222222222222222222222222222222222222222222222222\n")
                .expect("keys");
        assert_eq!(
            verify(&new_only, true, &h, inner, &t),
            Err(Refusal::UnknownKey)
        );
        // SIGNED with a body shorter than a trailer does not split.
        let mut short = h;
        short.body_len = 40.into();
        assert!(split(&short, &body[..40]).is_none());
        // A version-1 header is never signed, whatever its flags.
        let mut v1 = h;
        v1.version = 1;
        assert_eq!(
            split(&v1, body).map(|(i, t)| (i.len(), t)),
            Some((body.len(), None))
        );
    }

    #[test]
    fn refusal_codes_round_trip() {
        for r in Refusal::ALL {
            assert_eq!(Refusal::from_code(r.code()), Some(r));
        }
        assert_eq!(Refusal::from_code(0), None);
        assert_ne!(fresh_nonce(), fresh_nonce());
    }
}
