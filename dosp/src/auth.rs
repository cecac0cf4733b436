//! Cluster authentication: the key ring, request certificates, the replay guard and
//! capability tokens.
//!
//! This module owns the cryptography every signed path of DOSP shares (issue 12):
//!
//! * [`KeyRing`]: the cluster keys read from a key file (`ID HEXSECRET` a line). The first
//!   key signs; every listed key verifies, so keys rotate without downtime.
//! * [`Key::certify`] / [`KeyRing::verify`]: a 32-byte certificate over a request
//!   (its header and In structure), HMAC-SHA256 by default or the specification's
//!   double MD5 `md5(secret ‖ md5(secret ‖ request))` for compatibility ([`CertMode`]).
//! * [`ReplayGuard`]: refuses a STORE/DELETE whose (key, timestamp, nonce) was already
//!   seen or whose timestamp is outside the clock window, in bounded memory.
//! * [`Capability`] tokens: one operation on one object until a time, minted by a
//!   manager ([`KeyRing::mint`]) and checked by a node ([`KeyRing::check_token`]).
//!
//! It is pure: no I/O except [`KeyRing::load`], no clock (callers pass the time), and no
//! allocation on the verification paths.
//!
//! What it must never do: panic on anything that comes from outside (key files,
//! certificates, tokens), put secret bytes in an error or a `Debug` string, or compare a
//! MAC with an early exit.
#![deny(missing_docs)]

use std::collections::HashSet;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use zeroize::Zeroizing;

use crate::wire::Opcode;
use crate::Fingerprint;

type HmacSha256 = Hmac<Sha256>;

/// A request certificate: 32 bytes on the wire whatever the [`CertMode`].
pub type Cert = [u8; 32];

/// Fewest secret bytes a key may have (256 bits).
pub const SECRET_BYTES_MIN: usize = 32;
/// Most secret bytes a key may have.
pub const SECRET_BYTES_MAX: usize = 128;
/// Longest key id, in characters.
pub const KEY_ID_LEN_MAX: usize = 16;
/// Most keys a key ring holds: rotation needs two or three, the bound keeps lookups and
/// start-up cheap.
pub const KEYS_MAX: usize = 64;
/// Largest key file [`KeyRing::load`] reads: 64 keys of the longest form with comments
/// fit many times over.
pub const KEY_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// SHA-256's block size: HMAC keys are padded (or hashed, then padded) to this length.
const HMAC_BLOCK_BYTES: usize = 64;

// ---------------------------------------------------------------------------------------
// Keys and the key ring
// ---------------------------------------------------------------------------------------

/// One cluster key: its id, the id's 32-bit wire form, and the secret.
///
/// `Debug` prints the id and the wire id, never the secret. The secret (and the HMAC key
/// derived from it) is zeroed when the key is dropped.
#[derive(Clone)]
pub struct Key {
    id: String,
    wire_id: u32,
    secret: Zeroizing<Vec<u8>>,
    /// The secret as HMAC-SHA256 uses it (RFC 2104 `K0`): zero-padded to the block size,
    /// or hashed first when longer. Kept so that building the MAC needs no fallible step;
    /// boxed so that moving a `Key` (or growing a `Vec` of them) leaves no copy behind.
    hmac_key: Box<Zeroizing<[u8; HMAC_BLOCK_BYTES]>>,
}

impl Key {
    fn new(id: String, secret: Zeroizing<Vec<u8>>) -> Key {
        let wire_id = wire_id_of(&id);
        let hmac_key = hmac_block_key(&secret);
        Key {
            id,
            wire_id,
            secret,
            hmac_key,
        }
    }

    /// The key's name as written in the key file (1 to 16 of `[A-Za-z0-9._-]`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key's id on the wire: the first four bytes, little-endian, of SHA-256 of
    /// [`Key::id`].
    pub fn wire_id(&self) -> u32 {
        self.wire_id
    }

    /// The certificate of the message made of `parts` concatenated (for a request: its
    /// header, then its In structure), computed streaming, without allocating.
    ///
    /// [`CertMode::HmacSha256`] fills all 32 bytes; [`CertMode::DoubleMd5`] puts
    /// `md5(secret ‖ md5(secret ‖ message))` in the first 16 and zeros in the rest.
    pub fn certify(&self, mode: CertMode, parts: &[&[u8]]) -> Cert {
        match mode {
            CertMode::HmacSha256 => hmac_sha256(&self.hmac_key, parts),
            CertMode::DoubleMd5 => double_md5(&self.secret, parts),
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("wire_id", &format_args!("{:#010x}", self.wire_id))
            .field(
                "secret",
                &format_args!("<{} bytes, redacted>", self.secret.len()),
            )
            .finish()
    }
}

/// The wire id of a key id: the first four bytes of SHA-256 of the id, little-endian.
pub fn wire_id_of(id: &str) -> u32 {
    let digest = Sha256::digest(id.as_bytes());
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// RFC 2104 `K0`: the key zero-padded to the block size, or its SHA-256 zero-padded when
/// it is longer than a block. HMAC with `K0` equals HMAC with the key.
fn hmac_block_key(secret: &[u8]) -> Box<Zeroizing<[u8; HMAC_BLOCK_BYTES]>> {
    let mut k0 = Box::new(Zeroizing::new([0u8; HMAC_BLOCK_BYTES]));
    if secret.len() > HMAC_BLOCK_BYTES {
        let digest = Sha256::digest(secret);
        k0[..digest.len()].copy_from_slice(&digest);
    } else {
        k0[..secret.len()].copy_from_slice(secret);
    }
    k0
}

fn hmac_sha256(k0: &[u8; HMAC_BLOCK_BYTES], parts: &[&[u8]]) -> [u8; 32] {
    // A key of exactly one block is infallible: `new` takes a fixed-size array.
    let mut mac = <HmacSha256 as hmac::digest::KeyInit>::new(k0.into());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn double_md5(secret: &[u8], parts: &[&[u8]]) -> Cert {
    let mut inner = Md5::new();
    inner.update(secret);
    for part in parts {
        inner.update(part);
    }
    let inner = inner.finalize();
    let mut outer = Md5::new();
    outer.update(secret);
    outer.update(inner);
    let mut cert = [0u8; 32];
    cert[..16].copy_from_slice(&outer.finalize());
    cert
}

/// The cluster's keys. The first key signs ([`KeyRing::signer`]); every key verifies.
///
/// `Debug` lists ids and wire ids only.
#[derive(Clone)]
pub struct KeyRing {
    keys: Vec<Key>,
    /// Stands in for an unknown key id, so that a request naming one costs the same MAC
    /// as a request naming a real key (same secret length as the signing key).
    dummy: Key,
    /// Permission bits of the file the ring was loaded from, if it was.
    file_mode: Option<u32>,
}

/// Why a key file was refused. Errors name the line (counting from 1) and the problem,
/// never secret bytes: a malformed line may hold a secret in any field, so only key ids
/// that passed their checks are ever quoted.
///
/// Errors from [`KeyRing::parse`] do not name the file; callers of [`KeyRing::load`]
/// should add the path when they report one.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be opened or read.
    #[error("cannot read key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is larger than [`KEY_FILE_BYTES_MAX`].
    #[error("key file {path} is larger than {max} bytes: not a key file")]
    TooLarge {
        /// The key file.
        path: PathBuf,
        /// The limit, in bytes.
        max: u64,
    },
    /// The file is not UTF-8 text.
    #[error("line {line}: not UTF-8 text")]
    NotUtf8 {
        /// The first line with an invalid byte.
        line: usize,
    },
    /// The file holds no key.
    #[error("no keys: a key file needs at least one `ID HEXSECRET` line")]
    Empty,
    /// A line is not two fields.
    #[error("line {line}: expected `ID HEXSECRET` (two fields), found {fields} field(s)")]
    Fields {
        /// The line.
        line: usize,
        /// How many whitespace-separated fields it has.
        fields: usize,
    },
    /// A key id is empty or too long.
    #[error("line {line}: a key id is 1 to {KEY_ID_LEN_MAX} characters, this one has {chars}")]
    IdLength {
        /// The line.
        line: usize,
        /// The id's length in characters.
        chars: usize,
    },
    /// A key id has a character outside `[A-Za-z0-9._-]`.
    #[error(
        "line {line}: a key id is made of A-Z a-z 0-9 . _ -, but its character {position} is not"
    )]
    IdChar {
        /// The line.
        line: usize,
        /// The offending character's position in the id, from 1.
        position: usize,
    },
    /// A secret has a character that is not a hex digit.
    #[error("line {line}: the secret is hex, but its character {position} is not a hex digit")]
    SecretNotHex {
        /// The line.
        line: usize,
        /// The offending character's position in the secret, from 1.
        position: usize,
    },
    /// A secret has an odd number of hex digits.
    #[error("line {line}: the secret has an odd number of hex digits ({digits})")]
    SecretOddLength {
        /// The line.
        line: usize,
        /// How many hex digits it has.
        digits: usize,
    },
    /// A secret is shorter than [`SECRET_BYTES_MIN`] bytes.
    #[error("line {line}: the secret is {bytes} bytes; at least {SECRET_BYTES_MIN} bytes ({} hex digits) are needed", SECRET_BYTES_MIN * 2)]
    SecretTooShort {
        /// The line.
        line: usize,
        /// The secret's length in bytes.
        bytes: usize,
    },
    /// A secret is longer than [`SECRET_BYTES_MAX`] bytes.
    #[error(
        "line {line}: the secret is {bytes} bytes; at most {SECRET_BYTES_MAX} bytes are allowed"
    )]
    SecretTooLong {
        /// The line.
        line: usize,
        /// The secret's length in bytes.
        bytes: usize,
    },
    /// A key id is listed twice.
    #[error("line {line}: key id {id:?} is already defined on line {first_line}")]
    DuplicateId {
        /// The line of the second definition.
        line: usize,
        /// The key id.
        id: String,
        /// The line of the first definition.
        first_line: usize,
    },
    /// Two different key ids have the same wire id.
    #[error("line {line}: key id {id:?} has the same wire id ({wire_id:#010x}) as {other:?} on line {other_line}; rename one")]
    WireIdCollision {
        /// The line of the later key.
        line: usize,
        /// The later key id.
        id: String,
        /// The earlier key id.
        other: String,
        /// The line of the earlier key.
        other_line: usize,
        /// The shared wire id.
        wire_id: u32,
    },
    /// More than [`KEYS_MAX`] keys.
    #[error("line {line}: more than {KEYS_MAX} keys")]
    TooManyKeys {
        /// The line of the first key too many.
        line: usize,
    },
}

impl KeyRing {
    /// Parses a key file's text: one key a line as `ID HEXSECRET`, `#` to the end of a
    /// line is a comment, blank lines are ignored, CRLF line ends are fine.
    ///
    /// An ID is 1 to [`KEY_ID_LEN_MAX`] characters of `[A-Za-z0-9._-]`; a secret is
    /// [`SECRET_BYTES_MIN`] to [`SECRET_BYTES_MAX`] bytes in hex. Duplicate ids, two ids
    /// with the same [`Key::wire_id`], more than [`KEYS_MAX`] keys, and a file without
    /// keys are errors. Never panics.
    pub fn parse(text: &str) -> Result<KeyRing, KeyFileError> {
        let mut keys: Vec<Key> = Vec::new();
        let mut lines_of: Vec<usize> = Vec::new();
        for (index, raw_line) in text.lines().enumerate() {
            let line = index + 1;
            let content = match raw_line.find('#') {
                Some(hash) => &raw_line[..hash],
                None => raw_line,
            };
            let mut fields = content.split_ascii_whitespace();
            let (Some(id), Some(secret_hex), None) = (fields.next(), fields.next(), fields.next())
            else {
                let count = content.split_ascii_whitespace().count();
                if count == 0 {
                    continue;
                }
                return Err(KeyFileError::Fields {
                    line,
                    fields: count,
                });
            };
            check_id(id, line)?;
            let secret = parse_secret(secret_hex, line)?;
            if keys.len() == KEYS_MAX {
                return Err(KeyFileError::TooManyKeys { line });
            }
            let key = Key::new(id.to_owned(), secret);
            for (other, &other_line) in keys.iter().zip(&lines_of) {
                if other.id == key.id {
                    return Err(KeyFileError::DuplicateId {
                        line,
                        id: key.id,
                        first_line: other_line,
                    });
                }
                if other.wire_id == key.wire_id {
                    return Err(KeyFileError::WireIdCollision {
                        line,
                        wire_id: key.wire_id,
                        id: key.id,
                        other: other.id.clone(),
                        other_line,
                    });
                }
            }
            keys.push(key);
            lines_of.push(line);
        }
        let Some(signer) = keys.first() else {
            return Err(KeyFileError::Empty);
        };
        let dummy = Key::new(
            String::new(),
            Zeroizing::new(vec![0u8; signer.secret.len()]),
        );
        Ok(KeyRing {
            keys,
            dummy,
            file_mode: None,
        })
    }

    /// Reads and parses a key file (see [`KeyRing::parse`]), at most
    /// [`KEY_FILE_BYTES_MAX`] bytes. The bytes read are zeroed afterwards.
    ///
    /// The ring remembers the file's permission bits: check
    /// [`KeyRing::readable_by_others`] and warn when it is true.
    pub fn load(path: impl AsRef<Path>) -> Result<KeyRing, KeyFileError> {
        let path = path.as_ref();
        let io_error = |source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io_error)?;
        // The mode of the file opened, not of whatever the path names a moment later.
        let metadata = file.metadata().map_err(io_error)?;
        // Sized up front: a buffer that grew would free copies of the secrets unzeroed.
        let expected_len = metadata.len().min(KEY_FILE_BYTES_MAX) as usize + 1;
        let mut bytes = Zeroizing::new(Vec::with_capacity(expected_len));
        file.take(KEY_FILE_BYTES_MAX + 1)
            .read_to_end(&mut bytes)
            .map_err(io_error)?;
        if bytes.len() as u64 > KEY_FILE_BYTES_MAX {
            return Err(KeyFileError::TooLarge {
                path: path.to_owned(),
                max: KEY_FILE_BYTES_MAX,
            });
        }
        let text = std::str::from_utf8(&bytes).map_err(|e| KeyFileError::NotUtf8 {
            line: 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count(),
        })?;
        let mut ring = KeyRing::parse(text)?;
        ring.file_mode = Some(file_mode(&metadata));
        Ok(ring)
    }

    /// Permission bits (`0o777` and the like) of the file the ring was loaded from;
    /// `None` for a ring parsed from text.
    pub fn file_mode(&self) -> Option<u32> {
        self.file_mode
    }

    /// True when the ring was loaded from a file that group or others may read: the
    /// node should warn, as ssh does for a private key.
    pub fn readable_by_others(&self) -> bool {
        self.file_mode.is_some_and(|mode| mode & 0o044 != 0)
    }

    /// The key that signs: the first in the file.
    pub fn signer(&self) -> &Key {
        // `parse` refuses an empty ring, so there is always a first key.
        &self.keys[0]
    }

    /// Every key, in file order.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The key with this wire id, if the ring has one.
    pub fn key(&self, wire_id: u32) -> Option<&Key> {
        // Looks at every key (no early exit); the ring is small.
        let mut found = None;
        for key in &self.keys {
            if key.wire_id == wire_id && found.is_none() {
                found = Some(key);
            }
        }
        found
    }

    /// Checks the certificate of the message made of `parts`, signed with the key whose
    /// wire id is `key_id`.
    ///
    /// All 32 bytes are compared in constant time. An unknown key id still costs a MAC
    /// (with a dummy key of the signing key's length) before it is refused, so the time
    /// taken does not tell which ids exist.
    pub fn verify(
        &self,
        key_id: u32,
        mode: CertMode,
        parts: &[&[u8]],
        cert: &Cert,
    ) -> Result<(), AuthError> {
        let known = self.key(key_id);
        let key = known.unwrap_or(&self.dummy);
        let expected = key.certify(mode, parts);
        let matches = expected[..].ct_eq(&cert[..]) & Choice::from(u8::from(known.is_some()));
        if bool::from(matches) {
            Ok(())
        } else if known.is_none() {
            Err(AuthError::UnknownKey(key_id))
        } else {
            Err(AuthError::BadCertificate)
        }
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("keys", &self.keys)
            .field("file_mode", &self.file_mode.map(|m| format!("{m:#o}")))
            .finish()
    }
}

#[cfg(unix)]
fn file_mode(metadata: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    metadata.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn file_mode(_metadata: &std::fs::Metadata) -> u32 {
    0
}

fn check_id(id: &str, line: usize) -> Result<(), KeyFileError> {
    let chars = id.chars().count();
    if chars == 0 || chars > KEY_ID_LEN_MAX {
        return Err(KeyFileError::IdLength { line, chars });
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if let Some(position) = id.chars().position(|c| !allowed(c)) {
        return Err(KeyFileError::IdChar {
            line,
            position: position + 1,
        });
    }
    Ok(())
}

fn parse_secret(hex_text: &str, line: usize) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    if let Some(position) = hex_text.chars().position(|c| !c.is_ascii_hexdigit()) {
        return Err(KeyFileError::SecretNotHex {
            line,
            position: position + 1,
        });
    }
    // All ASCII from here: bytes are characters.
    let digits = hex_text.len();
    if !digits.is_multiple_of(2) {
        return Err(KeyFileError::SecretOddLength { line, digits });
    }
    let bytes = digits / 2;
    if bytes < SECRET_BYTES_MIN {
        return Err(KeyFileError::SecretTooShort { line, bytes });
    }
    if bytes > SECRET_BYTES_MAX {
        return Err(KeyFileError::SecretTooLong { line, bytes });
    }
    let mut secret = Zeroizing::new(vec![0u8; bytes]);
    // Cannot fail: alphabet and length were checked above; mapped rather than unwrapped.
    hex::decode_to_slice(hex_text, &mut secret)
        .map_err(|_| KeyFileError::SecretOddLength { line, digits })?;
    Ok(secret)
}

// ---------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------

/// How a request certificate is computed. The values are wire codes: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CertMode {
    /// HMAC-SHA256 of the message with the key's secret: the default.
    HmacSha256 = 1,
    /// The specification's certificate, `md5(secret ‖ md5(secret ‖ message))`, for
    /// compatibility: 16 bytes, sent as 32 with 16 zero bytes after them.
    DoubleMd5 = 2,
}

impl CertMode {
    /// The mode with this wire code, if any.
    pub fn from_u8(code: u8) -> Option<CertMode> {
        match code {
            1 => Some(CertMode::HmacSha256),
            2 => Some(CertMode::DoubleMd5),
            _ => None,
        }
    }

    /// The mode's name, as configuration and logs spell it.
    pub fn name(self) -> &'static str {
        match self {
            CertMode::HmacSha256 => "hmac-sha256",
            CertMode::DoubleMd5 => "double-md5",
        }
    }
}

impl TryFrom<u8> for CertMode {
    type Error = AuthError;
    fn try_from(code: u8) -> Result<CertMode, AuthError> {
        CertMode::from_u8(code).ok_or(AuthError::BadMode(code))
    }
}

/// Why a request's certificate was refused. The node answers every one with
/// AUTH_FAILED; the variants are for its counters and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The request names a key id the ring does not hold (never configured, or rotated
    /// out).
    #[error("unknown key id {0:#010x}")]
    UnknownKey(u32),
    /// The certificate does not match the request and the key.
    #[error("the certificate does not match the request")]
    BadCertificate,
    /// The request names a certificate mode this build does not know.
    #[error("unknown certificate mode {0}")]
    BadMode(u8),
}

// ---------------------------------------------------------------------------------------
// Replay guard
// ---------------------------------------------------------------------------------------

/// Why the replay guard refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The timestamp is older than now minus the window.
    #[error("timestamp older than the clock window")]
    Stale,
    /// The timestamp is newer than now plus the window.
    #[error("timestamp newer than the clock window")]
    Future,
    /// The same key id, timestamp and nonce were already accepted.
    #[error("replayed request (same key, timestamp and nonce)")]
    Replayed,
    /// The guard holds `capacity` requests, none old enough to forget: it refuses rather
    /// than forget one that could then be replayed.
    #[error("replay guard full")]
    Full,
}

/// One accepted request: key id, timestamp in ms, nonce.
type Seen = (u32, u64, u64);

/// "No slot": ends a bucket's list and the free list.
const NO_SLOT: usize = usize::MAX;

/// How finely the replay guard's window is divided into granules.
const GRANULES_PER_WINDOW: u64 = 64;

#[derive(Clone, Copy)]
struct Slot {
    seen: Seen,
    next: usize,
}

/// Remembers the (key id, timestamp, nonce) of accepted mutating requests, and refuses a
/// request seen before or dated outside `now ± window`.
///
/// Memory is allocated once, in [`ReplayGuard::new`], for `capacity` entries, and each
/// check costs amortised O(1): entries sit in a ring of time granules (a timing wheel,
/// one granule = window / 64, at least 1 ms), and a granule is forgotten as a whole once
/// every timestamp it can hold is older than the window. So an entry may be held up to
/// one granule past the window; size `capacity` for the requests of `2 × window` plus a
/// granule.
///
/// Call it only after the request's certificate was verified: otherwise anyone could
/// fill it. The clock the guard uses never runs backwards: a `now_ms` older than one
/// seen before counts as the newer one, which makes a stepped-back clock strict, never
/// lax.
pub struct ReplayGuard {
    window_ms: u64,
    granule_ms: u64,
    capacity: usize,
    /// Latest `now_ms` seen.
    now_ms: u64,
    /// Lowest granule number that may hold entries; granule `g` lives in bucket
    /// `g % buckets.len()`.
    oldest_granule: u64,
    /// Head slot of each granule's list.
    buckets: Vec<usize>,
    slots: Vec<Slot>,
    free: usize,
    seen: HashSet<Seen>,
}

impl ReplayGuard {
    /// A guard accepting timestamps within `window` of now, remembering at most
    /// `capacity` requests. Allocates for `capacity` entries up front.
    pub fn new(window: Duration, capacity: usize) -> ReplayGuard {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        let granule_ms = (window_ms / GRANULES_PER_WINDOW).max(1);
        // Accepted timestamps span [now - window, now + window]: at most
        // 2 * (window / granule) + 2 granules, plus the one being entered. At most 131.
        let bucket_count = 2 * (window_ms / granule_ms) + 3;
        ReplayGuard {
            window_ms,
            granule_ms,
            capacity,
            now_ms: 0,
            oldest_granule: 0,
            buckets: vec![NO_SLOT; bucket_count as usize],
            slots: Vec::with_capacity(capacity),
            free: NO_SLOT,
            seen: HashSet::with_capacity(capacity),
        }
    }

    /// The clock window.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// How coarsely entries are forgotten: an entry is dropped once every timestamp of
    /// its granule (`timestamp_ms / granule`) is older than `now - window`.
    pub fn granule(&self) -> Duration {
        Duration::from_millis(self.granule_ms)
    }

    /// Most entries held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Accepts the request (and remembers it) or says why not. `timestamp_ms` and
    /// `nonce` come from the request, `now_ms` from the node's clock (ms since the Unix
    /// epoch, like the timestamp).
    pub fn check(
        &mut self,
        key_id: u32,
        timestamp_ms: u64,
        nonce: u64,
        now_ms: u64,
    ) -> Result<(), ReplayError> {
        self.now_ms = self.now_ms.max(now_ms);
        let cutoff_ms = self.now_ms.saturating_sub(self.window_ms);
        if timestamp_ms < cutoff_ms {
            return Err(ReplayError::Stale);
        }
        if timestamp_ms > self.now_ms.saturating_add(self.window_ms) {
            return Err(ReplayError::Future);
        }
        self.forget_before(cutoff_ms / self.granule_ms);
        let entry = (key_id, timestamp_ms, nonce);
        if self.seen.contains(&entry) {
            return Err(ReplayError::Replayed);
        }
        if self.seen.len() >= self.capacity {
            return Err(ReplayError::Full);
        }
        let slot = if self.free != NO_SLOT {
            let slot = self.free;
            self.free = self.slots[slot].next;
            slot
        } else {
            self.slots.push(Slot {
                seen: entry,
                next: NO_SLOT,
            });
            self.slots.len() - 1
        };
        let bucket = self.bucket_of(timestamp_ms / self.granule_ms);
        self.slots[slot] = Slot {
            seen: entry,
            next: self.buckets[bucket],
        };
        self.buckets[bucket] = slot;
        self.seen.insert(entry);
        Ok(())
    }

    fn bucket_of(&self, granule: u64) -> usize {
        // The remainder is below `buckets.len()`, a usize.
        (granule % self.buckets.len() as u64) as usize
    }

    /// Forgets every granule numbered below `first_live`.
    fn forget_before(&mut self, first_live: u64) {
        if first_live <= self.oldest_granule {
            return;
        }
        if !self.seen.is_empty() {
            // After a jump of more than a turn of the wheel, one turn empties it.
            let turns = (first_live - self.oldest_granule).min(self.buckets.len() as u64);
            for granule in self.oldest_granule..self.oldest_granule + turns {
                let bucket = self.bucket_of(granule);
                let mut slot = std::mem::replace(&mut self.buckets[bucket], NO_SLOT);
                while slot != NO_SLOT {
                    let next = self.slots[slot].next;
                    self.seen.remove(&self.slots[slot].seen);
                    self.slots[slot].next = self.free;
                    self.free = slot;
                    slot = next;
                }
            }
        }
        self.oldest_granule = first_live;
    }
}

impl fmt::Debug for ReplayGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayGuard")
            .field("window_ms", &self.window_ms)
            .field("granule_ms", &self.granule_ms)
            .field("capacity", &self.capacity)
            .field("len", &self.seen.len())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------
// Capability tokens
// ---------------------------------------------------------------------------------------

/// The version byte that starts every capability token.
pub const TOKEN_VERSION: u8 = 1;
const OP_RETRIEVE: u8 = 1;
const OP_STORE: u8 = 2;
/// Version, op, key id, expiry.
const TOKEN_HEAD_BYTES: usize = 1 + 1 + 4 + 8;
/// Length of a token's MAC.
pub const TOKEN_MAC_BYTES: usize = 32;
/// Binary length of a RETRIEVE token: head, fingerprint, MAC.
const TOKEN_RETRIEVE_BYTES: usize = TOKEN_HEAD_BYTES + 16 + TOKEN_MAC_BYTES;
/// Binary length of a STORE token: head, byte limit, MAC.
const TOKEN_STORE_BYTES: usize = TOKEN_HEAD_BYTES + 8 + TOKEN_MAC_BYTES;
/// Longest binary token.
const TOKEN_BYTES_MAX: usize = TOKEN_RETRIEVE_BYTES;

/// Length of unpadded base64 text for `bytes` bytes.
const fn base64_len(bytes: usize) -> usize {
    (bytes * 4).div_ceil(3)
}
/// Longest token text, in characters.
pub const TOKEN_TEXT_MAX: usize = base64_len(TOKEN_BYTES_MAX);

// The two token texts (83 and 72 characters), and room in `check_token`'s buffer for
// the decoder's estimate of 3 bytes per 4 characters, rounded up.
const _: () = assert!(TOKEN_TEXT_MAX == 83 && base64_len(TOKEN_STORE_BYTES) == 72);
const _: () = assert!(TOKEN_TEXT_MAX.div_ceil(4) * 3 <= TOKEN_BYTES_MAX + 3);
const _: () = assert!(SECRET_BYTES_MIN <= SECRET_BYTES_MAX && SECRET_BYTES_MIN >= 32);

/// What a capability token permits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CapOp {
    /// RETRIEVE and RETRIEVE_RANGE of this object.
    Retrieve(Fingerprint),
    /// STORE of one object of at most `max_bytes` bytes.
    Store {
        /// Largest object the token lets its holder store.
        max_bytes: u64,
    },
}

/// A capability: one operation on one object until a time. A manager mints it as a
/// token ([`KeyRing::mint`]); a client presents the token to a node without knowing the
/// cluster key; the node checks it ([`KeyRing::check_token`]) and asks
/// [`Capability::permits`] about the request.
///
/// A token is a bearer token: whoever holds it may use it, as often as they like, until
/// it expires. Keep lifetimes short.
///
/// Binary form (little-endian), then base64url without padding:
///
/// | bytes | field |
/// |-------|-------|
/// | 1 | version, 1 |
/// | 1 | op: 1 retrieve, 2 store |
/// | 4 | wire id of the signing key |
/// | 8 | `expires_unix_s` |
/// | 16 or 8 | the fingerprint (retrieve) or `max_bytes` (store) |
/// | 32 | HMAC-SHA256 over all of the above |
///
/// The first byte (1) can never start a DOSP request header (`DOSP`), so a token's MAC
/// cannot be passed off as a request certificate or the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capability {
    /// The operation permitted.
    pub op: CapOp,
    /// The token is valid while the time (seconds since the Unix epoch) is before this.
    pub expires_unix_s: u64,
}

impl Capability {
    /// Whether this capability allows a request with this opcode, for this object (if
    /// the request names one) and this many bytes (for a STORE: the object's length).
    ///
    /// A retrieve capability allows RETRIEVE and RETRIEVE_RANGE of its object only; a
    /// store capability allows a STORE whose length is known and within the limit (as
    /// many such STOREs as are presented before it expires).
    /// Expiry is not checked here but in [`KeyRing::check_token`].
    pub fn permits(
        &self,
        opcode: Opcode,
        fingerprint: Option<&Fingerprint>,
        length_bytes: Option<u64>,
    ) -> bool {
        match self.op {
            CapOp::Retrieve(object) => {
                matches!(opcode, Opcode::Retrieve | Opcode::RetrieveRange)
                    && fingerprint == Some(&object)
            }
            CapOp::Store { max_bytes } => {
                opcode == Opcode::Store && length_bytes.is_some_and(|n| n <= max_bytes)
            }
        }
    }
}

/// Why a capability token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token: bad base64, wrong length, unknown version or op.
    #[error("malformed capability token: {0}")]
    Malformed(&'static str),
    /// Signed with a key the ring does not hold (or no longer holds).
    #[error("capability token signed with unknown key id {0:#010x}")]
    UnknownKey(u32),
    /// The signature does not match: the token was altered or forged.
    #[error("capability token signature does not match")]
    BadSignature,
    /// The token has expired.
    #[error("capability token expired at {expires_unix_s} (Unix time)")]
    Expired {
        /// When it expired, in seconds since the Unix epoch.
        expires_unix_s: u64,
    },
    /// A signed URL in the specification's double-MD5 mode, which the node does not
    /// accept (`--auth-allow-md5`).
    #[error("signed with the specification's double MD5, which this node does not accept")]
    Md5Refused,
}

/// Writes the signed part of a token (everything but the MAC); returns its length.
fn token_body(cap: &Capability, key_id: u32, out: &mut [u8; TOKEN_BYTES_MAX]) -> usize {
    let op = match cap.op {
        CapOp::Retrieve(_) => OP_RETRIEVE,
        CapOp::Store { .. } => OP_STORE,
    };
    out[0] = TOKEN_VERSION;
    out[1] = op;
    out[2..6].copy_from_slice(&key_id.to_le_bytes());
    out[6..14].copy_from_slice(&cap.expires_unix_s.to_le_bytes());
    match cap.op {
        CapOp::Retrieve(fingerprint) => {
            out[14..30].copy_from_slice(&fingerprint.0);
            30
        }
        CapOp::Store { max_bytes } => {
            out[14..22].copy_from_slice(&max_bytes.to_le_bytes());
            22
        }
    }
}

/// Reads the signed part of a token: the capability and the key id, or why not.
fn parse_token_body(body: &[u8]) -> Result<(Capability, u32), TokenError> {
    let Some((head, rest)) = body.split_first_chunk::<TOKEN_HEAD_BYTES>() else {
        return Err(TokenError::Malformed("too short"));
    };
    if head[0] != TOKEN_VERSION {
        return Err(TokenError::Malformed("unknown version"));
    }
    let key_id = u32::from_le_bytes([head[2], head[3], head[4], head[5]]);
    let mut expires = [0u8; 8];
    expires.copy_from_slice(&head[6..14]);
    let expires_unix_s = u64::from_le_bytes(expires);
    let op = match (head[1], rest.len()) {
        (OP_RETRIEVE, 16) => {
            let mut fingerprint = [0u8; 16];
            fingerprint.copy_from_slice(rest);
            CapOp::Retrieve(Fingerprint(fingerprint))
        }
        (OP_STORE, 8) => {
            let mut max_bytes = [0u8; 8];
            max_bytes.copy_from_slice(rest);
            CapOp::Store {
                max_bytes: u64::from_le_bytes(max_bytes),
            }
        }
        (OP_RETRIEVE | OP_STORE, _) => {
            return Err(TokenError::Malformed("wrong length for its operation"))
        }
        _ => return Err(TokenError::Malformed("unknown operation")),
    };
    Ok((Capability { op, expires_unix_s }, key_id))
}

impl KeyRing {
    /// The token for `cap`, signed (HMAC-SHA256) with the signing key: base64url
    /// without padding, at most [`TOKEN_TEXT_MAX`] characters, safe in a URL path.
    pub fn mint(&self, cap: &Capability) -> String {
        let signer = self.signer();
        let mut raw = [0u8; TOKEN_BYTES_MAX];
        let body_len = token_body(cap, signer.wire_id, &mut raw);
        let mut token = [0u8; TOKEN_BYTES_MAX + TOKEN_MAC_BYTES];
        token[..body_len].copy_from_slice(&raw[..body_len]);
        let mac = hmac_sha256(&signer.hmac_key, &[&raw[..body_len]]);
        token[body_len..body_len + TOKEN_MAC_BYTES].copy_from_slice(&mac);
        URL_SAFE_NO_PAD.encode(&token[..body_len + TOKEN_MAC_BYTES])
    }

    /// Checks a token's form, signature (constant-time) and expiry at `now_unix_s`,
    /// and returns the capability it grants. Never panics, whatever the text; does not
    /// allocate.
    ///
    /// The signature is checked before the expiry, so an expired token is reported as
    /// such only when it is genuine.
    pub fn check_token(&self, text: &str, now_unix_s: u64) -> Result<Capability, TokenError> {
        let token = Token::parse(text)?;
        self.verify_capability(&token.cap, token.key_id, &token.mac, now_unix_s)?;
        Ok(token.cap)
    }

    /// Checks a capability presented in pieces — what it grants, the wire id of the key
    /// said to have signed it, and the token's MAC — as a node does with a capability
    /// carried in a request's trailer (dosp/PROTOCOL.md §7, mode 3): the token's binary
    /// form is rebuilt from `cap` and `key_id`, its MAC compared in constant time (an
    /// unknown key id still costs a MAC), then the expiry at `now_unix_s`. Does not
    /// allocate; never panics.
    pub fn verify_capability(
        &self,
        cap: &Capability,
        key_id: u32,
        mac: &[u8; TOKEN_MAC_BYTES],
        now_unix_s: u64,
    ) -> Result<(), TokenError> {
        let mut raw = [0u8; TOKEN_BYTES_MAX];
        let body_len = token_body(cap, key_id, &mut raw);
        let known = self.key(key_id);
        let key = known.unwrap_or(&self.dummy);
        let expected = hmac_sha256(&key.hmac_key, &[&raw[..body_len]]);
        verdict(
            expected[..].ct_eq(&mac[..]),
            known.is_some(),
            key_id,
            cap,
            now_unix_s,
        )
    }
}

/// The outcome of checking a capability's MAC: `same` (computed in constant time)
/// counts only with a `known` key; then the expiry at `now_unix_s`. An unknown key and
/// a wrong MAC are told apart only after the MAC was computed either way.
fn verdict(
    same: Choice,
    known: bool,
    key_id: u32,
    cap: &Capability,
    now_unix_s: u64,
) -> Result<(), TokenError> {
    if !bool::from(same & Choice::from(u8::from(known))) {
        return Err(if known {
            TokenError::BadSignature
        } else {
            TokenError::UnknownKey(key_id)
        });
    }
    if now_unix_s >= cap.expires_unix_s {
        return Err(TokenError::Expired {
            expires_unix_s: cap.expires_unix_s,
        });
    }
    Ok(())
}

/// A capability token as its holder has it: what it grants, the wire id of the key that
/// signed it, and its MAC. A client needs no key to read one ([`Token::parse`]) and
/// present it in a request's trailer; only a node with the key can check it
/// ([`KeyRing::verify_capability`]).
///
/// `Debug` does not show the MAC: whoever holds it may use the token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token {
    /// What the token grants.
    pub cap: Capability,
    /// The wire id of the key that signed it.
    pub key_id: u32,
    /// HMAC-SHA256 of the token's binary form without the MAC.
    pub mac: [u8; TOKEN_MAC_BYTES],
}

impl Token {
    /// Reads a token's text (as [`KeyRing::mint`] writes it): its form only, not its
    /// signature nor its expiry. Never panics; does not allocate.
    pub fn parse(text: &str) -> Result<Token, TokenError> {
        // Only two lengths exist; anything else is refused before decoding.
        if text.len() != base64_len(TOKEN_RETRIEVE_BYTES)
            && text.len() != base64_len(TOKEN_STORE_BYTES)
        {
            return Err(TokenError::Malformed("wrong length"));
        }
        // Room for the decoder's conservative estimate (3 bytes per 4 characters).
        let mut raw = [0u8; TOKEN_BYTES_MAX + 3];
        let len = URL_SAFE_NO_PAD
            .decode_slice(text.as_bytes(), &mut raw)
            .map_err(|_| TokenError::Malformed("not base64url without padding"))?;
        let Some(raw) = raw.get(..len) else {
            return Err(TokenError::Malformed("wrong length"));
        };
        let Some((body, mac)) = raw.split_last_chunk::<TOKEN_MAC_BYTES>() else {
            return Err(TokenError::Malformed("too short"));
        };
        let (cap, key_id) = parse_token_body(body)?;
        Ok(Token {
            cap,
            key_id,
            mac: *mac,
        })
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("cap", &self.cap)
            .field("key_id", &format_args!("{:#010x}", self.key_id))
            .field("mac", &format_args!("<redacted>"))
            .finish()
    }
}

// ---------------------------------------------------------------------------------------
// Signed URLs (the specification's SRL, served over HTTP: dosp/HTTP.md)
// ---------------------------------------------------------------------------------------

/// Length of a signed URL's encoded request: base64url of a retrieve token's binary form
/// without its MAC (30 bytes).
pub const SRL_REQUEST_TEXT_LEN: usize = base64_len(TOKEN_RETRIEVE_BYTES - TOKEN_MAC_BYTES);
/// Length of a signed URL's signature: base64url of the token's 32-byte MAC.
pub const SRL_SIGNATURE_TEXT_LEN: usize = base64_len(TOKEN_MAC_BYTES);
/// Length of a signed URL's signature in the specification's double-MD5 mode: the
/// 16-byte certificate in lower-case hex.
pub const SRL_MD5_SIGNATURE_TEXT_LEN: usize = 32;
const _: () = assert!(SRL_REQUEST_TEXT_LEN == 40 && SRL_SIGNATURE_TEXT_LEN == 43);

/// Bytes of a URL path segment that [`srl_path`] writes as they are (RFC 3986
/// "unreserved"); every other byte of the customer URI is percent-encoded.
fn url_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The path of a signed URL (an SRL) for fetching `fingerprint` until `expires_unix_s`,
/// signed by the ring's signing key: `/<encoded-request>/<signature>/<customer-uri>`.
///
/// `/<encoded-request>/<signature>` is a retrieve capability token split in two: the
/// base64url of its binary form without the MAC ([`SRL_REQUEST_TEXT_LEN`] characters),
/// then the base64url of the MAC ([`SRL_SIGNATURE_TEXT_LEN`]). The customer URI (a file
/// name, say) is not signed; it is percent-encoded here, and a node uses it only to name
/// the download. Without a name the path ends with the fingerprint in hex.
pub fn srl_path(
    ring: &KeyRing,
    fingerprint: &Fingerprint,
    expires_unix_s: u64,
    name: Option<&str>,
) -> String {
    srl_path_with(
        ring,
        CertMode::HmacSha256,
        fingerprint,
        expires_unix_s,
        name,
    )
}

/// [`srl_path`] with the certificate of `mode`. [`CertMode::DoubleMd5`] is the
/// specification's SRL certificate, for compatibility: the signature segment is
/// `md5(secret ‖ md5(secret ‖ encoded-request))` over the encoded request's text, in
/// lower-case hex ([`SRL_MD5_SIGNATURE_TEXT_LEN`] characters), accepted only by nodes
/// that allow double MD5.
pub fn srl_path_with(
    ring: &KeyRing,
    mode: CertMode,
    fingerprint: &Fingerprint,
    expires_unix_s: u64,
    name: Option<&str>,
) -> String {
    let cap = Capability {
        op: CapOp::Retrieve(*fingerprint),
        expires_unix_s,
    };
    let signer = ring.signer();
    let mut raw = [0u8; TOKEN_BYTES_MAX];
    let body_len = token_body(&cap, signer.wire_id, &mut raw);
    let request = URL_SAFE_NO_PAD.encode(&raw[..body_len]);
    let signature = match mode {
        CertMode::HmacSha256 => {
            URL_SAFE_NO_PAD.encode(hmac_sha256(&signer.hmac_key, &[&raw[..body_len]]))
        }
        CertMode::DoubleMd5 => {
            hex::encode(&double_md5(&signer.secret, &[request.as_bytes()])[..SRL_MD5_BYTES])
        }
    };
    let mut path = String::with_capacity(2 + SRL_REQUEST_TEXT_LEN + SRL_SIGNATURE_TEXT_LEN + 40);
    path.push('/');
    path.push_str(&request);
    path.push('/');
    path.push_str(&signature);
    path.push('/');
    match name {
        Some(name) => {
            for &b in name.as_bytes() {
                if url_unreserved(b) {
                    path.push(b as char);
                } else {
                    path.push_str(&format!("%{b:02X}"));
                }
            }
        }
        None => path.push_str(&fingerprint.to_string()),
    }
    path
}

/// Bytes of a double-MD5 certificate (an MD5 digest).
const SRL_MD5_BYTES: usize = 16;

/// Reads a signed URL's encoded request: the retrieve capability it grants and the
/// wire id of the key said to sign it. Never panics; does not allocate.
fn parse_srl_request(request: &[u8]) -> Result<(Capability, u32), TokenError> {
    if request.len() != SRL_REQUEST_TEXT_LEN {
        return Err(TokenError::Malformed("wrong length"));
    }
    let mut body = [0u8; TOKEN_RETRIEVE_BYTES - TOKEN_MAC_BYTES + 3];
    let body_len = URL_SAFE_NO_PAD
        .decode_slice(request, &mut body)
        .map_err(|_| TokenError::Malformed("not base64url without padding"))?;
    let Some(body) = body.get(..body_len) else {
        return Err(TokenError::Malformed("wrong length"));
    };
    let (cap, key_id) = parse_token_body(body)?;
    if !matches!(cap.op, CapOp::Retrieve(_)) {
        return Err(TokenError::Malformed("a signed URL grants a retrieve only"));
    }
    Ok((cap, key_id))
}

/// Reads a signed URL's first two path segments (their form only: no key needed): the
/// retrieve token they make together (HMAC-SHA256 signatures only). Never panics; does
/// not allocate.
pub fn parse_srl(request: &[u8], signature: &[u8]) -> Result<Token, TokenError> {
    if signature.len() != SRL_SIGNATURE_TEXT_LEN {
        return Err(TokenError::Malformed("wrong length"));
    }
    let (cap, key_id) = parse_srl_request(request)?;
    let mut mac = [0u8; TOKEN_MAC_BYTES + 3];
    let mac_len = URL_SAFE_NO_PAD
        .decode_slice(signature, &mut mac)
        .map_err(|_| TokenError::Malformed("not base64url without padding"))?;
    let Some(mac) = mac.first_chunk::<TOKEN_MAC_BYTES>() else {
        return Err(TokenError::Malformed("wrong length"));
    };
    if mac_len != TOKEN_MAC_BYTES {
        return Err(TokenError::Malformed("wrong length"));
    }
    Ok(Token {
        cap,
        key_id,
        mac: *mac,
    })
}

impl KeyRing {
    /// Checks a signed URL's encoded request and signature (see [`srl_path`] and
    /// [`srl_path_with`]): form, signature in constant time, then expiry at
    /// `now_unix_s`. Returns the object it lets its holder fetch. A double-MD5
    /// signature (told by its length) is refused unless `allow_md5`. Never panics;
    /// does not allocate.
    pub fn check_srl(
        &self,
        request: &[u8],
        signature: &[u8],
        now_unix_s: u64,
        allow_md5: bool,
    ) -> Result<Fingerprint, TokenError> {
        if signature.len() == SRL_MD5_SIGNATURE_TEXT_LEN {
            return self.check_srl_md5(request, signature, now_unix_s, allow_md5);
        }
        let token = parse_srl(request, signature)?;
        self.verify_capability(&token.cap, token.key_id, &token.mac, now_unix_s)?;
        match token.cap.op {
            CapOp::Retrieve(fingerprint) => Ok(fingerprint),
            CapOp::Store { .. } => {
                Err(TokenError::Malformed("a signed URL grants a retrieve only"))
            }
        }
    }

    /// [`KeyRing::check_srl`] of a double-MD5 signature: the certificate over the
    /// encoded request's text, compared in constant time (an unknown key id still costs
    /// the digests).
    fn check_srl_md5(
        &self,
        request: &[u8],
        signature: &[u8],
        now_unix_s: u64,
        allow_md5: bool,
    ) -> Result<Fingerprint, TokenError> {
        let (cap, key_id) = parse_srl_request(request)?;
        let mut given = [0u8; SRL_MD5_BYTES];
        // Lower-case hex only, as `srl_path_with` writes it: one spelling per URL.
        if signature.iter().any(|b| b.is_ascii_uppercase())
            || hex::decode_to_slice(signature, &mut given).is_err()
        {
            return Err(TokenError::Malformed("not lower-case hex"));
        }
        if !allow_md5 {
            return Err(TokenError::Md5Refused);
        }
        let known = self.key(key_id);
        let key = known.unwrap_or(&self.dummy);
        let expected = double_md5(&key.secret, &[request]);
        let same = expected[..SRL_MD5_BYTES].ct_eq(&given[..]);
        verdict(same, known.is_some(), key_id, &cap, now_unix_s)?;
        match cap.op {
            CapOp::Retrieve(fingerprint) => Ok(fingerprint),
            CapOp::Store { .. } => {
                Err(TokenError::Malformed("a signed URL grants a retrieve only"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The secret 00 01 02 … 1f, the shortest allowed.
    const SECRET_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    /// Another 32-byte secret.
    const OTHER_HEX: &str = "a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5";

    fn parse_ring(text: &str) -> KeyRing {
        KeyRing::parse(text).expect("test key file parses")
    }

    fn k1() -> KeyRing {
        parse_ring(&format!("k1 {SECRET_HEX}\n"))
    }

    /// A 32-byte header starting with `DOSP`, then a 40-byte In structure: bytes 0..72
    /// with the magic in front.
    fn request() -> ([u8; 32], [u8; 40]) {
        let mut header = [0u8; 32];
        let mut body = [0u8; 40];
        for (i, b) in header.iter_mut().enumerate() {
            *b = i as u8;
        }
        header[..4].copy_from_slice(b"DOSP");
        for (i, b) in body.iter_mut().enumerate() {
            *b = 32 + i as u8;
        }
        (header, body)
    }

    // ---- known answers ----------------------------------------------------------------

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231 test case 2, key "Jefe"; the message streamed in two parts.
        let mac = hmac_sha256(
            &hmac_block_key(b"Jefe"),
            &[b"what do ya", b" want for nothing?"],
        );
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a 131-byte key, longer than a block, is hashed first.
        let mac = hmac_sha256(
            &hmac_block_key(&[0xaa; 131]),
            &[b"Test Using Larger Than Block-Size Key - Hash Key First"],
        );
        assert_eq!(
            hex::encode(mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn certificates_match_python() {
        // Expected values from python3:
        //   import hmac, hashlib
        //   secret = bytes(range(32)); msg = b"DOSP" + bytes(range(4, 72))
        //   hmac.new(secret, msg, hashlib.sha256).hexdigest()
        //   m = hashlib.md5; m(secret + m(secret + msg).digest()).hexdigest()
        let ring = k1();
        let (header, body) = request();
        let key = ring.signer();
        assert_eq!(
            hex::encode(key.certify(CertMode::HmacSha256, &[&header, &body])),
            "b4711cc23174c16c93b42130f97cec9e525276965510aaa7c7fa8d21e0efa342"
        );
        let md5 = key.certify(CertMode::DoubleMd5, &[&header, &body]);
        assert_eq!(hex::encode(&md5[..16]), "4321486b9785d958a3d35e6e4c0071fc");
        assert_eq!(md5[16..], [0; 16]);
        // How the message is cut into parts does not matter.
        let whole: Vec<u8> = header.iter().chain(&body).copied().collect();
        for mode in [CertMode::HmacSha256, CertMode::DoubleMd5] {
            assert_eq!(
                key.certify(mode, &[&whole]),
                key.certify(mode, &[&header, &body])
            );
            assert_eq!(
                key.certify(mode, &[&whole[..5], &[], &whole[5..]]),
                key.certify(mode, &[&whole])
            );
        }
    }

    #[test]
    fn wire_id_is_sha256_prefix() {
        // python3: int.from_bytes(hashlib.sha256(b"k1").digest()[:4], "little")
        assert_eq!(wire_id_of("k1"), 3_958_487_402);
        assert_eq!(k1().signer().wire_id(), 3_958_487_402);
        assert_eq!(k1().signer().id(), "k1");
    }

    #[test]
    fn tokens_match_python() {
        // python3:
        //   secret = bytes(range(32)); wid = hashlib.sha256(b"k1").digest()[:4]
        //   body = bytes([1, 1]) + wid + struct.pack("<Q", 1700000000)
        //          + hashlib.md5(b"").digest()      # store: struct.pack("<Q", 1 << 20)
        //   tok = body + hmac.new(secret, body, hashlib.sha256).digest()
        //   base64.urlsafe_b64encode(tok).rstrip(b"=")
        let ring = k1();
        let retrieve = Capability {
            op: CapOp::Retrieve(Fingerprint::of(b"")),
            expires_unix_s: 1_700_000_000,
        };
        let text = ring.mint(&retrieve);
        assert_eq!(
            text,
            "AQFqufHrAPFTZQAAAADUHYzZjwCyBOmACZjs-EJ-lDLnJpsRCw1T-cc2h5fjcJohXoI7FPuoqKLw3VApiXE"
        );
        assert_eq!(text.len(), TOKEN_TEXT_MAX);
        let store = Capability {
            op: CapOp::Store { max_bytes: 1 << 20 },
            expires_unix_s: 1_700_000_000,
        };
        assert_eq!(
            ring.mint(&store),
            "AQJqufHrAPFTZQAAAAAAABAAAAAAAHI3blhfU8fKbC-Lz2qU4Luo9Yd25Me2ePL-QgO-TAde"
        );
        assert_eq!(ring.check_token(&text, 1_699_999_999), Ok(retrieve));
    }

    // ---- certificates -----------------------------------------------------------------

    #[test]
    fn verify_accepts_the_right_key_and_refuses_the_rest() {
        let ring = k1();
        let id = ring.signer().wire_id();
        let (header, body) = request();
        let parts: &[&[u8]] = &[&header, &body];
        for mode in [CertMode::HmacSha256, CertMode::DoubleMd5] {
            let cert = ring.signer().certify(mode, parts);
            assert_eq!(ring.verify(id, mode, parts, &cert), Ok(()));
            // Any flipped bit, in the certificate or the message, is refused.
            for byte in 0..32 {
                let mut bad = cert;
                bad[byte] ^= 0x01;
                assert_eq!(
                    ring.verify(id, mode, parts, &bad),
                    Err(AuthError::BadCertificate)
                );
            }
            let mut other = body;
            other[39] ^= 0x80;
            assert_eq!(
                ring.verify(id, mode, &[&header, &other], &cert),
                Err(AuthError::BadCertificate)
            );
            // A certificate made in the other mode does not pass.
            let other_mode = match mode {
                CertMode::HmacSha256 => CertMode::DoubleMd5,
                CertMode::DoubleMd5 => CertMode::HmacSha256,
            };
            assert_eq!(
                ring.verify(id, other_mode, parts, &cert),
                Err(AuthError::BadCertificate)
            );
            // No certificate at all (zeros) is refused.
            assert_eq!(
                ring.verify(id, mode, parts, &[0; 32]),
                Err(AuthError::BadCertificate)
            );
            assert_eq!(
                ring.verify(id ^ 1, mode, parts, &cert),
                Err(AuthError::UnknownKey(id ^ 1))
            );
        }
    }

    #[test]
    fn unknown_key_never_verifies_even_with_the_dummy_certificate() {
        let ring = k1();
        let (header, body) = request();
        let parts: &[&[u8]] = &[&header, &body];
        for mode in [CertMode::HmacSha256, CertMode::DoubleMd5] {
            let dummy_cert = ring.dummy.certify(mode, parts);
            assert_eq!(
                ring.verify(12345, mode, parts, &dummy_cert),
                Err(AuthError::UnknownKey(12345))
            );
        }
    }

    #[test]
    fn rotation_old_and_new_keys_verify_new_signs() {
        let old = k1();
        let rotated = parse_ring(&format!("k2 {OTHER_HEX}\nk1 {SECRET_HEX}\n"));
        let retired = parse_ring(&format!("k2 {OTHER_HEX}\n"));
        let (header, body) = request();
        let parts: &[&[u8]] = &[&header, &body];
        let old_cert = old.signer().certify(CertMode::HmacSha256, parts);
        let k1_id = old.signer().wire_id();
        assert_eq!(
            rotated.verify(k1_id, CertMode::HmacSha256, parts, &old_cert),
            Ok(())
        );
        assert_eq!(rotated.signer().id(), "k2");
        let new_cert = rotated.signer().certify(CertMode::HmacSha256, parts);
        let k2_id = rotated.signer().wire_id();
        assert_eq!(
            retired.verify(k2_id, CertMode::HmacSha256, parts, &new_cert),
            Ok(())
        );
        assert_eq!(
            retired.verify(k1_id, CertMode::HmacSha256, parts, &old_cert),
            Err(AuthError::UnknownKey(k1_id))
        );
        assert_eq!(rotated.key(k1_id).map(Key::id), Some("k1"));
        assert_eq!(rotated.keys().len(), 2);
    }

    #[test]
    fn cert_mode_codes() {
        assert_eq!(CertMode::from_u8(1), Some(CertMode::HmacSha256));
        assert_eq!(CertMode::from_u8(2), Some(CertMode::DoubleMd5));
        assert_eq!(CertMode::from_u8(0), None);
        assert_eq!(CertMode::try_from(3), Err(AuthError::BadMode(3)));
        assert_eq!(CertMode::HmacSha256 as u8, 1);
        assert_eq!(CertMode::DoubleMd5 as u8, 2);
        assert_eq!(CertMode::DoubleMd5.name(), "double-md5");
    }

    // ---- key files --------------------------------------------------------------------

    #[test]
    fn key_file_with_comments_blank_lines_and_crlf() {
        let text = format!(
            "# cluster keys\r\n\r\n  k-2.new_X\t{OTHER_HEX}  # the new one\r\nk1 {}\r\n#k3 {SECRET_HEX}\n   \n",
            SECRET_HEX.to_uppercase()
        );
        let ring = parse_ring(&text);
        let ids: Vec<&str> = ring.keys().iter().map(Key::id).collect();
        assert_eq!(ids, ["k-2.new_X", "k1"]);
        assert_eq!(ring.signer().id(), "k-2.new_X");
        // Upper-case hex is the same secret.
        let (header, body) = request();
        assert_eq!(
            ring.keys()[1].certify(CertMode::HmacSha256, &[&header, &body]),
            k1().signer()
                .certify(CertMode::HmacSha256, &[&header, &body])
        );
        assert_eq!(ring.file_mode(), None);
        assert!(!ring.readable_by_others());
    }

    #[test]
    fn longest_id_and_secret_are_accepted() {
        let text = format!("abcdefghijklmnop {}\n", "ff".repeat(SECRET_BYTES_MAX));
        assert_eq!(parse_ring(&text).signer().id(), "abcdefghijklmnop");
    }

    /// Every error, with a secret somewhere on the line, and what it must say.
    fn error_cases() -> Vec<(String, &'static str)> {
        let s = SECRET_HEX;
        vec![
            (String::new(), "no keys"),
            ("# only a comment\n\n".into(), "no keys"),
            (format!("{s}\n"), "line 1: expected `ID HEXSECRET` (two fields), found 1"),
            (format!("k1 {s} extra\n"), "found 3 field(s)"),
            (
                // Swapped fields: the id check fires first, without quoting it.
                format!("\n{s} k1\n"),
                "line 2: a key id is 1 to 16 characters, this one has 64",
            ),
            (format!("k1 {}x\n", &s[..10]), "line 1: the secret is hex, but its character 11"),
            (
                format!("abcdefghijklmnopq {s}\n"),
                "line 1: a key id is 1 to 16 characters, this one has 17",
            ),
            (format!("k/1 {s}\n"), "its character 2 is not"),
            (format!("kä {s}\n"), "its character 2 is not"),
            (format!("k1 {s}0\n"), "odd number of hex digits (65)"),
            (format!("k1 {}\n", &s[..62]), "the secret is 31 bytes; at least 32"),
            (
                format!("k1 {}\n", "ab".repeat(129)),
                "the secret is 129 bytes; at most 128",
            ),
            (
                format!("k1 {s}\nk2 {OTHER_HEX}\nk1 {OTHER_HEX}\n"),
                "line 3: key id \"k1\" is already defined on line 1",
            ),
            (
                // python3: the first pair of "c<n>" ids whose SHA-256 share 4 bytes.
                format!("c17439 {s}\nc24164 {OTHER_HEX}\n"),
                "line 2: key id \"c24164\" has the same wire id (0x06eb1dc5) as \"c17439\" on line 1",
            ),
            (
                (0..=KEYS_MAX).map(|i| format!("k{i} {s}\n")).collect(),
                "line 65: more than 64 keys",
            ),
        ]
    }

    #[test]
    fn key_file_errors_name_the_line_and_never_the_secret() {
        for (text, expected) in error_cases() {
            let err = KeyRing::parse(&text).expect_err(&text);
            let shown = err.to_string();
            assert!(shown.contains(expected), "{shown:?} lacks {expected:?}");
            let debug = format!("{err:?}");
            for secret in [SECRET_HEX, OTHER_HEX, "abababab"] {
                for window in secret.as_bytes().windows(8) {
                    let window = std::str::from_utf8(window).unwrap();
                    assert!(!shown.contains(window), "{shown:?} shows secret bytes");
                    assert!(!debug.contains(window), "{debug:?} shows secret bytes");
                }
            }
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let ring = parse_ring(&format!("k2 {OTHER_HEX}\nk1 {SECRET_HEX}\n"));
        let shown = format!("{ring:?} {:?}", ring.signer());
        assert!(
            shown.contains("k1") && shown.contains("redacted"),
            "{shown}"
        );
        assert!(!shown.contains("a5a5a5a5") && !shown.contains("0c0d0e0f"));
        assert!(!shown.contains("165, 165") && !shown.contains("12, 13, 14"));
    }

    #[cfg(unix)]
    #[test]
    fn load_reports_loose_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("k1 {SECRET_HEX}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ring = KeyRing::load(&path).unwrap();
        assert_eq!(ring.file_mode(), Some(0o600));
        assert!(!ring.readable_by_others());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(KeyRing::load(&path).unwrap().readable_by_others());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert!(KeyRing::load(&path).unwrap().readable_by_others());
    }

    #[test]
    fn load_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = KeyRing::load(&missing).unwrap_err();
        assert!(matches!(err, KeyFileError::Io { .. }), "{err}");
        assert!(err.to_string().contains("missing"));

        let path = dir.path().join("latin1");
        let mut bytes = format!("# keys\nk1 {SECRET_HEX}\n# caf").into_bytes();
        bytes.push(0xe9);
        std::fs::write(&path, bytes).unwrap();
        let err = KeyRing::load(&path).unwrap_err();
        assert_eq!(err.to_string(), "line 3: not UTF-8 text");

        let path = dir.path().join("huge");
        std::fs::write(&path, vec![b'#'; KEY_FILE_BYTES_MAX as usize + 1]).unwrap();
        let err = KeyRing::load(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::TooLarge { .. }), "{err}");
    }

    // ---- replay guard -----------------------------------------------------------------

    const NOW: u64 = 1_764_460_800_000; // 2025-11-30, in ms

    #[test]
    fn replay_guard_refuses_stale_future_and_replayed() {
        let mut guard = ReplayGuard::new(Duration::from_secs(30), 16);
        assert_eq!(guard.check(1, NOW, 7, NOW), Ok(()));
        assert_eq!(guard.check(1, NOW, 7, NOW), Err(ReplayError::Replayed));
        // Another key, nonce or timestamp is another request.
        assert_eq!(guard.check(2, NOW, 7, NOW), Ok(()));
        assert_eq!(guard.check(1, NOW, 8, NOW), Ok(()));
        assert_eq!(guard.check(1, NOW + 1, 7, NOW), Ok(()));
        // The window's edges are inside it.
        assert_eq!(guard.check(1, NOW - 30_000, 1, NOW), Ok(()));
        assert_eq!(guard.check(1, NOW + 30_000, 1, NOW), Ok(()));
        assert_eq!(
            guard.check(1, NOW - 30_001, 1, NOW),
            Err(ReplayError::Stale)
        );
        assert_eq!(
            guard.check(1, NOW + 30_001, 1, NOW),
            Err(ReplayError::Future)
        );
        assert_eq!(guard.len(), 6);
        // Once the window has passed, the original is stale, never accepted again.
        assert_eq!(
            guard.check(1, NOW, 7, NOW + 30_001),
            Err(ReplayError::Stale)
        );
        assert_eq!(guard.window(), Duration::from_secs(30));
        assert_eq!(guard.granule(), Duration::from_millis(468));
    }

    #[test]
    fn replay_guard_is_full_until_entries_age_out() {
        let mut guard = ReplayGuard::new(Duration::from_secs(10), 3);
        for nonce in 0..3 {
            assert_eq!(guard.check(9, NOW, nonce, NOW), Ok(()));
        }
        assert_eq!(guard.check(9, NOW, 3, NOW), Err(ReplayError::Full));
        // A replay is still called a replay when full.
        assert_eq!(guard.check(9, NOW, 1, NOW), Err(ReplayError::Replayed));
        // Still within the window: still full.
        assert_eq!(
            guard.check(9, NOW + 10_000, 3, NOW + 10_000),
            Err(ReplayError::Full)
        );
        // The old entries' granule is now wholly outside the window: room again.
        let later = NOW + 10_000 + guard.granule().as_millis() as u64;
        assert_eq!(guard.check(9, later, 3, later), Ok(()));
        assert_eq!(guard.len(), 1);
        assert_eq!(guard.capacity(), 3);
    }

    #[test]
    fn replay_guard_clock_never_runs_back() {
        let mut guard = ReplayGuard::new(Duration::from_secs(1), 8);
        assert_eq!(guard.check(1, NOW, 1, NOW), Ok(()));
        // The clock jumps forward an hour, then back: the guard keeps the later time.
        assert_eq!(guard.check(1, NOW + 3_600_000, 1, NOW + 3_600_000), Ok(()));
        assert!(guard.len() == 1, "the old entry was forgotten");
        assert_eq!(guard.check(1, NOW, 1, NOW), Err(ReplayError::Stale));
    }

    #[test]
    fn replay_guard_edge_sizes() {
        let mut none = ReplayGuard::new(Duration::from_secs(5), 0);
        assert_eq!(none.check(1, NOW, 1, NOW), Err(ReplayError::Full));
        let mut zero = ReplayGuard::new(Duration::ZERO, 4);
        assert_eq!(zero.check(1, NOW, 1, NOW), Ok(()));
        assert_eq!(zero.check(1, NOW - 1, 1, NOW), Err(ReplayError::Stale));
        assert_eq!(zero.check(1, NOW + 1, 1, NOW), Err(ReplayError::Future));
        assert_eq!(zero.check(1, NOW, 1, NOW), Err(ReplayError::Replayed));
        let mut huge = ReplayGuard::new(Duration::MAX, 4);
        assert_eq!(huge.check(1, 0, 1, u64::MAX), Ok(()));
        assert_eq!(huge.check(1, u64::MAX, 1, 0), Ok(()));
        assert_eq!(huge.check(1, u64::MAX, 1, 0), Err(ReplayError::Replayed));
        let mut early = ReplayGuard::new(Duration::from_secs(60), 4);
        assert_eq!(early.check(1, 0, 1, 5), Ok(()));
        assert_eq!(early.check(1, u64::MAX, 1, 5), Err(ReplayError::Future));
    }

    /// The guard's specification, written naively: what it holds is every accepted
    /// triple whose granule is not wholly older than the window.
    struct Model {
        window_ms: u64,
        granule_ms: u64,
        capacity: usize,
        now_ms: u64,
        held: Vec<Seen>,
    }

    impl Model {
        fn check(&mut self, seen: Seen, now_ms: u64) -> Result<(), ReplayError> {
            self.now_ms = self.now_ms.max(now_ms);
            let cutoff = self.now_ms.saturating_sub(self.window_ms);
            if seen.1 < cutoff {
                return Err(ReplayError::Stale);
            }
            if seen.1 > self.now_ms.saturating_add(self.window_ms) {
                return Err(ReplayError::Future);
            }
            let granule = self.granule_ms;
            self.held.retain(|s| s.1 / granule >= cutoff / granule);
            if self.held.contains(&seen) {
                return Err(ReplayError::Replayed);
            }
            if self.held.len() >= self.capacity {
                return Err(ReplayError::Full);
            }
            self.held.push(seen);
            Ok(())
        }
    }

    /// (key, timestamp offset, nonce, clock step) with few distinct values, so that
    /// replays, collisions and a full guard all happen.
    fn replay_ops() -> impl Strategy<Value = Vec<(u32, i64, u64, i64)>> {
        prop::collection::vec((0u32..3, -1_200i64..1_200, 0u64..4, -50i64..300), 1..300)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn replay_guard_matches_its_model(
            window_ms in 0u64..1_000,
            capacity in 0usize..24,
            ops in replay_ops(),
        ) {
            let mut guard = ReplayGuard::new(Duration::from_millis(window_ms), capacity);
            let mut model = Model {
                window_ms,
                granule_ms: guard.granule().as_millis() as u64,
                capacity,
                now_ms: 0,
                held: Vec::new(),
            };
            let mut accepted = HashSet::new();
            let mut now = 10_000i64;
            for (key, offset, nonce, step) in ops {
                now += step;
                let ts = (now + offset) as u64;
                let got = guard.check(key, ts, nonce, now as u64);
                prop_assert_eq!(got, model.check((key, ts, nonce), now as u64));
                prop_assert!(guard.len() <= capacity);
                prop_assert_eq!(guard.len(), model.held.len());
                if got.is_ok() {
                    // Never the same triple twice, at any time.
                    prop_assert!(accepted.insert((key, ts, nonce)));
                }
            }
        }

        #[test]
        fn replay_guard_accepts_fresh_distinct_requests_while_there_is_room(
            count in 0usize..200,
            capacity in 0usize..100,
        ) {
            let mut guard = ReplayGuard::new(Duration::from_secs(30), capacity);
            for nonce in 0..count as u64 {
                let expected = if (nonce as usize) < capacity {
                    Ok(())
                } else {
                    Err(ReplayError::Full)
                };
                prop_assert_eq!(guard.check(1, NOW + nonce, nonce, NOW + nonce), expected);
            }
        }
    }

    // ---- capability tokens ------------------------------------------------------------

    fn fingerprint() -> Fingerprint {
        Fingerprint::of(b"an object")
    }

    #[test]
    fn token_checks() {
        let ring = k1();
        let cap = Capability {
            op: CapOp::Retrieve(fingerprint()),
            expires_unix_s: 1_000,
        };
        let token = ring.mint(&cap);
        assert_eq!(ring.check_token(&token, 999), Ok(cap));
        assert_eq!(
            ring.check_token(&token, 1_000),
            Err(TokenError::Expired {
                expires_unix_s: 1_000
            })
        );
        // Another cluster's key: unknown id. Same id, other secret: bad signature.
        let stranger = parse_ring(&format!("k9 {OTHER_HEX}\n"));
        assert_eq!(
            stranger.check_token(&token, 0),
            Err(TokenError::UnknownKey(wire_id_of("k1")))
        );
        let impostor = parse_ring(&format!("k1 {OTHER_HEX}\n"));
        assert_eq!(
            impostor.check_token(&token, 0),
            Err(TokenError::BadSignature)
        );
        // A rotated ring still accepts it.
        let rotated = parse_ring(&format!("k2 {OTHER_HEX}\nk1 {SECRET_HEX}\n"));
        assert_eq!(rotated.check_token(&token, 0), Ok(cap));
        // Padding, whitespace, standard base64 and truncation are refused.
        for bad in [
            String::new(),
            format!("{token}="),
            format!(" {token}"),
            token.replace('-', "+").replace('_', "/"),
            token[..token.len() - 1].to_owned(),
            "A".repeat(TOKEN_TEXT_MAX),
            "é".repeat(TOKEN_TEXT_MAX / 2),
        ] {
            assert!(
                matches!(
                    ring.check_token(&bad, 0),
                    Err(TokenError::Malformed(_) | TokenError::BadSignature)
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_token_in_pieces_verifies_like_its_text() {
        let ring = k1();
        let cap = Capability {
            op: CapOp::Store { max_bytes: 4096 },
            expires_unix_s: 1_000,
        };
        let token = Token::parse(&ring.mint(&cap)).expect("form");
        assert_eq!(token.cap, cap);
        assert_eq!(token.key_id, wire_id_of("k1"));
        assert!(!format!("{token:?}").contains(&format!("{:?}", token.mac)));
        assert_eq!(
            ring.verify_capability(&cap, token.key_id, &token.mac, 999),
            Ok(())
        );
        assert_eq!(
            ring.verify_capability(&cap, token.key_id, &token.mac, 1_000),
            Err(TokenError::Expired {
                expires_unix_s: 1_000
            })
        );
        // Any other grant, expiry or key with the same MAC: refused.
        let more = Capability {
            op: CapOp::Store { max_bytes: 4097 },
            ..cap
        };
        let later = Capability {
            expires_unix_s: 2_000,
            ..cap
        };
        let retrieve = Capability {
            op: CapOp::Retrieve(fingerprint()),
            ..cap
        };
        for other in [more, later, retrieve] {
            assert_eq!(
                ring.verify_capability(&other, token.key_id, &token.mac, 0),
                Err(TokenError::BadSignature)
            );
        }
        assert_eq!(
            ring.verify_capability(&cap, 7, &token.mac, 0),
            Err(TokenError::UnknownKey(7))
        );
        let mut tampered = token.mac;
        tampered[31] ^= 0x80;
        assert_eq!(
            ring.verify_capability(&cap, token.key_id, &tampered, 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn every_other_last_character_is_refused() {
        // The last character carries padding bits as well as data: a decoder that
        // ignored them would accept several spellings of one token.
        let ring = k1();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for op in [
            CapOp::Retrieve(fingerprint()),
            CapOp::Store { max_bytes: 7 },
        ] {
            let token = ring.mint(&Capability {
                op,
                expires_unix_s: 10,
            });
            let (stem, last) = token.split_at(token.len() - 1);
            for &c in alphabet {
                if c != last.as_bytes()[0] {
                    let other = format!("{stem}{}", c as char);
                    assert!(ring.check_token(&other, 0).is_err(), "{other}");
                }
            }
        }
    }

    #[test]
    fn token_versions_and_ops_are_checked() {
        let ring = k1();
        let sign = |body: &[u8]| {
            let mut raw = body.to_vec();
            raw.extend_from_slice(&hmac_sha256(&ring.signer().hmac_key, &[body]));
            URL_SAFE_NO_PAD.encode(raw)
        };
        let mut body = [0u8; 30];
        let good_len = token_body(
            &Capability {
                op: CapOp::Retrieve(fingerprint()),
                expires_unix_s: 50,
            },
            ring.signer().wire_id(),
            &mut [0; TOKEN_BYTES_MAX],
        );
        assert_eq!(good_len, 30);
        body[2..6].copy_from_slice(&ring.signer().wire_id().to_le_bytes());
        body[6] = 50;
        for (version, op, len, expected) in [
            (1, 1, 30, None),
            (2, 1, 30, Some("unknown version")),
            (1, 3, 30, Some("unknown operation")),
            // A store op with a retrieve's length: refused even when correctly signed.
            (1, 2, 30, Some("wrong length for its operation")),
            (1, 1, 22, Some("wrong length for its operation")),
        ] {
            body[0] = version;
            body[1] = op;
            let got = ring.check_token(&sign(&body[..len]), 0);
            match expected {
                None => assert!(got.is_ok(), "{got:?}"),
                Some(why) => assert_eq!(got, Err(TokenError::Malformed(why))),
            }
        }
    }

    #[test]
    fn permits() {
        let f = fingerprint();
        let g = Fingerprint::of(b"another object");
        let retrieve = Capability {
            op: CapOp::Retrieve(f),
            expires_unix_s: 0,
        };
        assert!(retrieve.permits(Opcode::Retrieve, Some(&f), None));
        assert!(retrieve.permits(Opcode::RetrieveRange, Some(&f), Some(10)));
        assert!(!retrieve.permits(Opcode::Retrieve, Some(&g), None));
        assert!(!retrieve.permits(Opcode::Retrieve, None, None));
        for op in Opcode::ALL {
            if !matches!(op, Opcode::Retrieve | Opcode::RetrieveRange) {
                assert!(!retrieve.permits(op, Some(&f), Some(0)), "{op:?}");
            }
        }
        let store = Capability {
            op: CapOp::Store { max_bytes: 100 },
            expires_unix_s: 0,
        };
        assert!(store.permits(Opcode::Store, Some(&f), Some(100)));
        assert!(store.permits(Opcode::Store, None, Some(0)));
        assert!(!store.permits(Opcode::Store, Some(&f), Some(101)));
        assert!(!store.permits(Opcode::Store, Some(&f), None));
        for op in Opcode::ALL {
            if op != Opcode::Store {
                assert!(!store.permits(op, Some(&f), Some(1)), "{op:?}");
            }
        }
    }

    fn capability() -> impl Strategy<Value = Capability> {
        let op = prop_oneof![
            any::<[u8; 16]>().prop_map(|f| CapOp::Retrieve(Fingerprint(f))),
            any::<u64>().prop_map(|max_bytes| CapOp::Store { max_bytes }),
        ];
        (op, any::<u64>()).prop_map(|(op, expires_unix_s)| Capability { op, expires_unix_s })
    }

    proptest! {
        #[test]
        fn token_round_trips(cap in capability(), now in any::<u64>()) {
            let ring = k1();
            let text = ring.mint(&cap);
            prop_assert!(text.len() <= TOKEN_TEXT_MAX);
            prop_assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            let expected = if now < cap.expires_unix_s {
                Ok(cap)
            } else {
                Err(TokenError::Expired { expires_unix_s: cap.expires_unix_s })
            };
            prop_assert_eq!(ring.check_token(&text, now), expected);
        }

        #[test]
        fn any_change_to_a_tokens_bytes_is_refused(
            cap in capability(),
            index in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let ring = k1();
            let mut raw = URL_SAFE_NO_PAD.decode(ring.mint(&cap)).unwrap();
            let i = index.index(raw.len());
            raw[i] ^= flip;
            let got = ring.check_token(&URL_SAFE_NO_PAD.encode(&raw), 0);
            prop_assert!(got.is_err(), "byte {} ^ {:#x} accepted", i, flip);
        }

        #[test]
        fn any_change_to_a_tokens_text_is_refused(
            cap in capability(),
            index in any::<prop::sample::Index>(),
            replacement in any::<char>(),
        ) {
            let ring = k1();
            let text = ring.mint(&cap);
            let i = index.index(text.len());
            prop_assume!(text.as_bytes()[i] != replacement as u32 as u8 || !replacement.is_ascii());
            let mut changed = text[..i].to_owned();
            changed.push(replacement);
            changed.push_str(&text[i + 1..]);
            prop_assert!(ring.check_token(&changed, 0).is_err());
        }

        #[test]
        fn check_token_never_panics(text in ".{0,100}", now in any::<u64>()) {
            let _ = k1().check_token(&text, now);
        }

        #[test]
        fn check_token_never_panics_on_base64_of_the_right_length(
            raw in prop::collection::vec(any::<u8>(), 54..=62),
        ) {
            let text = URL_SAFE_NO_PAD.encode(&raw);
            prop_assert!(k1().check_token(&text, 0).is_err());
        }

        #[test]
        fn parse_never_panics(text in "\\PC{0,400}") {
            let _ = KeyRing::parse(&text);
        }

        #[test]
        fn parse_never_panics_on_near_key_files(
            lines in prop::collection::vec(
                (
                    "[A-Za-z0-9._#-]{0,20}",
                    "[ \t]{0,2}",
                    "[0-9a-fA-F#g ]{0,270}",
                    "(\r?\n|#.*\n)",
                ),
                0..8,
            ),
        ) {
            let text: String = lines
                .into_iter()
                .map(|(id, space, secret, end)| format!("{id}{space}{secret}{end}"))
                .collect();
            if let Ok(ring) = KeyRing::parse(&text) {
                prop_assert!(!ring.keys().is_empty() && ring.keys().len() <= KEYS_MAX);
            }
        }
    }

    // ---- signed URLs --------------------------------------------------------------------

    fn srl_segments(path: &str) -> (String, String, String) {
        let mut parts = path.splitn(4, '/');
        assert_eq!(parts.next(), Some(""));
        let request = parts.next().unwrap().to_owned();
        let signature = parts.next().unwrap().to_owned();
        let name = parts.next().unwrap().to_owned();
        (request, signature, name)
    }

    #[test]
    fn signed_urls_verify_and_are_a_token_split_in_two() {
        let ring = k1();
        let f = fingerprint();
        let path = srl_path(&ring, &f, 1_000, Some("photo 1.jpg"));
        let (request, signature, name) = srl_segments(&path);
        assert_eq!(request.len(), SRL_REQUEST_TEXT_LEN);
        assert_eq!(signature.len(), SRL_SIGNATURE_TEXT_LEN);
        assert_eq!(name, "photo%201.jpg");
        assert_eq!(
            ring.check_srl(request.as_bytes(), signature.as_bytes(), 999, false),
            Ok(f)
        );
        assert_eq!(
            ring.check_srl(request.as_bytes(), signature.as_bytes(), 1_000, false),
            Err(TokenError::Expired {
                expires_unix_s: 1_000
            })
        );
        // The same bytes as the token `mint` makes for that capability.
        let mut raw = URL_SAFE_NO_PAD.decode(&request).unwrap();
        raw.extend(URL_SAFE_NO_PAD.decode(&signature).unwrap());
        let token = ring.mint(&Capability {
            op: CapOp::Retrieve(f),
            expires_unix_s: 1_000,
        });
        assert_eq!(URL_SAFE_NO_PAD.encode(raw), token);
        // Without a name, the fingerprint names it.
        let (_, _, name) = srl_segments(&srl_path(&ring, &f, 1_000, None));
        assert_eq!(name, f.to_string());
    }

    #[test]
    fn signed_urls_refuse_tampering_other_keys_and_store_tokens() {
        let ring = k1();
        let f = fingerprint();
        let (request, signature, _) = srl_segments(&srl_path(&ring, &f, 1_000, None));
        // Another object under the same signature: the fingerprint is signed.
        let (other_request, _, _) =
            srl_segments(&srl_path(&ring, &Fingerprint::of(b"x"), 1_000, None));
        assert_eq!(
            ring.check_srl(other_request.as_bytes(), signature.as_bytes(), 0, false),
            Err(TokenError::BadSignature)
        );
        let stranger = parse_ring(&format!("k9 {OTHER_HEX}\n"));
        assert_eq!(
            stranger.check_srl(request.as_bytes(), signature.as_bytes(), 0, false),
            Err(TokenError::UnknownKey(wire_id_of("k1")))
        );
        // A store token split the same way is not a signed URL.
        let store = URL_SAFE_NO_PAD
            .decode(ring.mint(&Capability {
                op: CapOp::Store { max_bytes: 1 },
                expires_unix_s: 1_000,
            }))
            .unwrap();
        let (body, mac) = store.split_at(store.len() - TOKEN_MAC_BYTES);
        assert!(ring
            .check_srl(
                URL_SAFE_NO_PAD.encode(body).as_bytes(),
                URL_SAFE_NO_PAD.encode(mac).as_bytes(),
                0,
                false
            )
            .is_err());
        for (r, s) in [
            ("", ""),
            (&request[1..], &signature[..]),
            (&request[..], &signature[1..]),
        ] {
            assert_eq!(
                ring.check_srl(r.as_bytes(), s.as_bytes(), 0, false),
                Err(TokenError::Malformed("wrong length"))
            );
        }
    }

    #[test]
    fn signed_urls_in_the_specifications_double_md5_mode() {
        let ring = k1();
        let f = fingerprint();
        let path = srl_path_with(&ring, CertMode::DoubleMd5, &f, 1_000, Some("a.jpg"));
        let (request, signature, name) = srl_segments(&path);
        assert_eq!(name, "a.jpg");
        assert_eq!(signature.len(), SRL_MD5_SIGNATURE_TEXT_LEN);
        // The same encoded request as the HMAC URL; the certificate is the
        // specification's: md5(secret + md5(secret + encoded-request)), in hex.
        let (hmac_request, _, _) = srl_segments(&srl_path(&ring, &f, 1_000, None));
        assert_eq!(request, hmac_request);
        let secret = hex::decode(SECRET_HEX).unwrap();
        let inner = Md5::new_with_prefix(&secret)
            .chain_update(request.as_bytes())
            .finalize();
        let outer = Md5::new_with_prefix(&secret).chain_update(inner).finalize();
        assert_eq!(signature, hex::encode(outer));
        let (r, s) = (request.as_bytes(), signature.as_bytes());
        assert_eq!(ring.check_srl(r, s, 999, true), Ok(f));
        // Only where double MD5 is allowed; after the form is checked, before the key.
        assert_eq!(
            ring.check_srl(r, s, 999, false),
            Err(TokenError::Md5Refused)
        );
        assert_eq!(
            ring.check_srl(r, s, 1_000, true),
            Err(TokenError::Expired {
                expires_unix_s: 1_000
            })
        );
        let stranger = parse_ring(&format!("k9 {OTHER_HEX}\n"));
        assert_eq!(
            stranger.check_srl(r, s, 0, true),
            Err(TokenError::UnknownKey(wire_id_of("k1")))
        );
        let same_id = parse_ring(&format!("k1 {OTHER_HEX}\n"));
        assert_eq!(
            same_id.check_srl(r, s, 0, true),
            Err(TokenError::BadSignature)
        );
        // One spelling: upper-case hex, or not hex, is malformed.
        let upper = signature.to_ascii_uppercase();
        assert!(matches!(
            ring.check_srl(r, upper.as_bytes(), 0, true),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            ring.check_srl(r, &[b'g'; SRL_MD5_SIGNATURE_TEXT_LEN], 0, true),
            Err(TokenError::Malformed(_))
        ));
        // And an HMAC URL still verifies where double MD5 is allowed.
        let (hr, hs, _) = srl_segments(&srl_path(&ring, &f, 1_000, None));
        assert_eq!(ring.check_srl(hr.as_bytes(), hs.as_bytes(), 0, true), Ok(f));
    }

    proptest! {
        #[test]
        fn any_change_to_a_signed_url_is_refused(
            index in 0usize..(SRL_REQUEST_TEXT_LEN + SRL_SIGNATURE_TEXT_LEN),
            replacement in any::<u8>(),
        ) {
            let ring = k1();
            let (request, signature, _) =
                srl_segments(&srl_path(&ring, &fingerprint(), 1_000, None));
            let mut both = format!("{request}{signature}").into_bytes();
            prop_assume!(both[index] != replacement);
            both[index] = replacement;
            let (r, s) = both.split_at(SRL_REQUEST_TEXT_LEN);
            prop_assert!(ring.check_srl(r, s, 0, true).is_err());
        }

        #[test]
        fn check_srl_never_panics(
            request in prop::collection::vec(any::<u8>(), 0..60),
            signature in prop::collection::vec(any::<u8>(), 0..60),
            now in any::<u64>(),
        ) {
            let _ = k1().check_srl(&request, &signature, now, true);
        }

        #[test]
        fn any_change_to_a_double_md5_signed_url_is_refused(
            index in 0usize..(SRL_REQUEST_TEXT_LEN + SRL_MD5_SIGNATURE_TEXT_LEN),
            replacement in any::<u8>(),
        ) {
            let ring = k1();
            let path = srl_path_with(&ring, CertMode::DoubleMd5, &fingerprint(), 1_000, None);
            let (request, signature, _) = srl_segments(&path);
            let mut both = format!("{request}{signature}").into_bytes();
            prop_assume!(both[index] != replacement);
            both[index] = replacement;
            let (r, s) = both.split_at(SRL_REQUEST_TEXT_LEN);
            prop_assert!(ring.check_srl(r, s, 0, true).is_err());
        }
    }
}
