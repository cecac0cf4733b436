//! One HTTP/1.1 connection serving signed URLs (dosp/HTTP.md), sans IO.
//!
//! Like the DOSP [`Session`](super::session::Session), an [`HttpSession`] knows no
//! socket and no store. Its inputs are bytes received ([`HttpSession::on_recv`]), the
//! time, and answers from the store to the questions it asks ([`HttpSession::need`]):
//! where an object is and how long ([`HttpSession::on_located`]), then the object's
//! bytes a piece at a time ([`HttpSession::on_piece`]). Its output is bytes to send
//! ([`HttpSession::pending_slices`], acknowledged with [`HttpSession::output_sent`]):
//! the response head from its own small buffer, then the pieces the store lent, sent
//! from the store's buffers as they are (the same zero-copy path as RETRIEVE), given
//! back once sent ([`HttpSession::take_spent`]).
//!
//! The request head is parsed with `httparse`; it may be at most [`HEAD_BYTES_MAX`]
//! bytes (431 otherwise) and is refused with 400 when malformed. Only GET and HEAD are
//! served (405 with `Allow: GET, HEAD` otherwise). A request with a body is refused
//! (400), since nothing here reads one. Requests are answered one at a time, in order:
//! the next head is parsed only when the previous response is all sent, so at most
//! one response is ever queued and pipelined requests wait in the port's buffer.
//!
//! A piece that fails to read in the middle of a body cannot be reported in HTTP (the
//! length is promised and the status is gone): the connection is closed after the
//! bytes already queued, and the client sees a short body. A failure of the first
//! piece still gets a proper 500/503 (the head waits for the first piece).
//!
//! Deadlines: the same [`Deadlines`] as DOSP sessions — a head must arrive within
//! `header` of its first byte, a body being sent must move `rate_min_bytes_per_sec`
//! over windows of `request`, and a connection between requests may stay silent at
//! most `idle`.

use std::collections::VecDeque;
use std::io::{self, Write as _};
use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use dosp::auth::{KeyRing, TokenError};
use dosp::signed::Refusal;
use dosp::Fingerprint;

use super::session::{Deadlines, PeerClock, Timeout};

/// Largest request head (request line and header fields) accepted; a longer one gets
/// 431 and the connection is closed.
pub const HEAD_BYTES_MAX: usize = 8 * 1024;
/// Most header fields in a request head.
pub const HEADERS_MAX: usize = 48;
/// Object bytes asked of the store at a time.
pub const PIECE_BYTES: usize = 256 * 1024;
/// Body bytes queued (lent by the store, unsent) above which no further piece is read.
const QUEUED_HIGH: usize = 2 * PIECE_BYTES;
/// Longest file name put in a `Content-Disposition` header.
pub const FILENAME_MAX: usize = 128;

/// A piece of an object's bytes lent by the store: the session only measures it and
/// sends from it.
pub trait BodyPiece {
    /// Bytes in the piece.
    fn len(&self) -> usize;
    /// Whether the piece holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The bytes from `at` to the end of the contiguous part holding `at` (empty at or
    /// past the end).
    fn slice_at(&self, at: usize) -> &[u8];
}

impl BodyPiece for crate::store::Piece {
    fn len(&self) -> usize {
        crate::store::Piece::len(self)
    }
    fn slice_at(&self, at: usize) -> &[u8] {
        crate::store::Piece::slice_at(self, at)
    }
}

impl BodyPiece for Vec<u8> {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn slice_at(&self, at: usize) -> &[u8] {
        self.get(at..).unwrap_or(&[])
    }
}

/// What the session waits for from the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Where the object is and how long: answer with [`HttpSession::on_located`].
    Lookup(Fingerprint),
    /// `len` bytes of the object from `offset`: answer with [`HttpSession::on_piece`].
    Read {
        /// The object.
        fp: Fingerprint,
        /// First byte wanted.
        offset: u64,
        /// How many bytes (at most [`PIECE_BYTES`]).
        len: usize,
    },
}

/// A byte range asked for in a `Range` header (one range only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=a-b` (b inclusive) or `bytes=a-` (`None`: to the end).
    From(u64, Option<u64>),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// How a [`RangeSpec`] applies to an object of a given length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOutcome {
    /// Bytes `start..end` (end exclusive) exist: 206.
    Part(u64, u64),
    /// No byte of the range exists: 416.
    Unsatisfiable,
}

impl RangeSpec {
    /// Reads a `Range` field value. `None` for anything but one well-formed byte
    /// range: several ranges, another unit or bad syntax are ignored and the whole
    /// object is sent (RFC 9110 §14.2 lets a server ignore Range).
    pub fn parse(value: &[u8]) -> Option<RangeSpec> {
        let value = std::str::from_utf8(value).ok()?.trim();
        let (unit, set) = value.split_once('=')?;
        if !unit.trim().eq_ignore_ascii_case("bytes") {
            return None;
        }
        let set = set.trim();
        if set.contains(',') {
            return None;
        }
        let (first, last) = set.split_once('-')?;
        let (first, last) = (first.trim(), last.trim());
        let number = |s: &str| -> Option<u64> {
            if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        if first.is_empty() {
            return Some(RangeSpec::Suffix(number(last)?));
        }
        let first = number(first)?;
        if last.is_empty() {
            return Some(RangeSpec::From(first, None));
        }
        let last = number(last)?;
        (last >= first).then_some(RangeSpec::From(first, Some(last)))
    }

    /// The bytes of an object of `len` bytes this range selects.
    pub fn resolve(self, len: u64) -> RangeOutcome {
        match self {
            RangeSpec::From(first, _) if first >= len => RangeOutcome::Unsatisfiable,
            RangeSpec::From(first, last) => {
                let end = last.map_or(len, |l| l.saturating_add(1).min(len));
                RangeOutcome::Part(first, end)
            }
            RangeSpec::Suffix(0) => RangeOutcome::Unsatisfiable,
            RangeSpec::Suffix(_) if len == 0 => RangeOutcome::Unsatisfiable,
            RangeSpec::Suffix(n) => RangeOutcome::Part(len.saturating_sub(n), len),
        }
    }
}

/// A signed URL's path split: encoded request, signature, customer URI (the rest,
/// after the third `/`, without a query). `None` when the path has fewer segments.
/// An absolute-form target (`http://host:port/…`) is read for its path.
pub fn split_srl(path: &str) -> Option<(&str, &str, &str)> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    // Absolute form (RFC 9112 §3.2.2, as a proxy sends it): the path after the
    // authority.
    let path = match path
        .strip_prefix("http://")
        .or_else(|| path.strip_prefix("https://"))
    {
        Some(rest) => rest.find('/').map_or("", |i| &rest[i..]),
        None => path,
    };
    let rest = path.strip_prefix('/')?;
    let (request, rest) = rest.split_once('/')?;
    let (signature, customer) = match rest.split_once('/') {
        Some((signature, customer)) => (signature, customer),
        None => (rest, ""),
    };
    Some((request, signature, customer))
}

/// A file name for `Content-Disposition`, held without allocating.
#[derive(Clone, Copy)]
pub struct Name {
    bytes: [u8; FILENAME_MAX],
    len: usize,
}

/// Media types by file-name extension (lower case), for `Content-Type`. Passive
/// formats only: HTML, SVG, JavaScript and the like would run in the browser as
/// pages of the node's origin, so they are served as `application/octet-stream`.
pub const MEDIA_TYPES: &[(&str, &str)] = &[
    ("avif", "image/avif"),
    ("bmp", "image/bmp"),
    ("csv", "text/csv; charset=utf-8"),
    ("flac", "audio/flac"),
    ("gif", "image/gif"),
    ("gz", "application/gzip"),
    ("ico", "image/vnd.microsoft.icon"),
    ("jpeg", "image/jpeg"),
    ("jpg", "image/jpeg"),
    ("json", "application/json"),
    ("m4a", "audio/mp4"),
    ("mkv", "video/x-matroska"),
    ("mov", "video/quicktime"),
    ("mp3", "audio/mpeg"),
    ("mp4", "video/mp4"),
    ("ogg", "audio/ogg"),
    ("pdf", "application/pdf"),
    ("png", "image/png"),
    ("tar", "application/x-tar"),
    ("tif", "image/tiff"),
    ("tiff", "image/tiff"),
    ("txt", "text/plain; charset=utf-8"),
    ("wav", "audio/wav"),
    ("webm", "video/webm"),
    ("webp", "image/webp"),
    ("zip", "application/zip"),
];

/// The `Content-Type` of an object served under `name`: by its extension in
/// [`MEDIA_TYPES`], else `application/octet-stream`.
pub fn content_type(name: Option<&Name>) -> &'static str {
    const DEFAULT: &str = "application/octet-stream";
    let Some(name) = name else {
        return DEFAULT;
    };
    let bytes = name.as_bytes();
    let Some(dot) = bytes.iter().rposition(|&b| b == b'.') else {
        return DEFAULT;
    };
    let ext = &bytes[dot + 1..];
    MEDIA_TYPES
        .iter()
        .find(|(e, _)| e.as_bytes().eq_ignore_ascii_case(ext))
        .map_or(DEFAULT, |(_, t)| t)
}

impl Name {
    /// The name: printable ASCII only, by construction.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The file name from a customer URI: its last segment, percent-decoded, with
    /// every byte outside printable ASCII and `"` `\` `/` `;` replaced by `_`, spaces
    /// trimmed, at most [`FILENAME_MAX`] bytes. `None` when nothing is left, or for
    /// `.` and `..`.
    pub fn from_uri(customer_uri: &str) -> Option<Name> {
        let last = customer_uri.rsplit('/').next().unwrap_or("");
        let bytes = last.as_bytes();
        let mut name = Name {
            bytes: [0; FILENAME_MAX],
            len: 0,
        };
        let mut i = 0;
        while i < bytes.len() && name.len < FILENAME_MAX {
            let mut b = bytes[i];
            if b == b'%' {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(v) = hex {
                    b = v;
                    i += 2;
                }
            }
            i += 1;
            let ok = (0x20..0x7f).contains(&b) && !matches!(b, b'"' | b'\\' | b'/' | b';');
            name.bytes[name.len] = if ok { b } else { b'_' };
            name.len += 1;
        }
        let all = name.as_bytes();
        let start = all.iter().position(|&b| b != b' ').unwrap_or(all.len());
        let end = all
            .iter()
            .rposition(|&b| b != b' ')
            .map_or(start, |e| e + 1);
        let trimmed = &all[start..end];
        if trimmed.is_empty() || trimmed == b"." || trimmed == b".." {
            return None;
        }
        name.bytes.copy_within(start..end, 0);
        name.len = end - start;
        Some(name)
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// [`Name::from_uri`] as a string (tests and tools).
pub fn filename_of(customer_uri: &str) -> Option<String> {
    Name::from_uri(customer_uri).map(|n| String::from_utf8_lossy(n.as_bytes()).into_owned())
}

/// What signed URLs are checked with: the cluster's keys, and whether the
/// specification's double-MD5 certificate is accepted (`--auth-allow-md5`).
#[derive(Clone, Copy, Debug)]
pub struct UrlKeys<'a> {
    /// The cluster's keys.
    pub ring: &'a KeyRing,
    /// Whether a double-MD5 signature is accepted.
    pub allow_md5: bool,
}

/// The body of the 403 a refused signed URL gets: a short reason and a newline.
pub fn refusal_text(e: &TokenError) -> &'static str {
    match e {
        TokenError::Expired { .. } => "expired\n",
        TokenError::BadSignature => "bad signature\n",
        TokenError::UnknownKey(_) => "unknown key\n",
        TokenError::Malformed(_) => "malformed signed URL\n",
        TokenError::Md5Refused => "double MD5 not accepted\n",
    }
}

/// Whether an `If-None-Match` value (`*`, or a list of entity tags, weak ones
/// compared weakly as RFC 9110 §13.1.2 says) names the object's ETag, `"<md5 hex>"`.
pub fn etag_matches(value: &[u8], fp: &Fingerprint) -> bool {
    let mut hex = [0u8; 32];
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in fp.0.iter().enumerate() {
        hex[2 * i] = DIGITS[usize::from(b >> 4)];
        hex[2 * i + 1] = DIGITS[usize::from(b & 15)];
    }
    value.split(|&b| b == b',').any(|tag| {
        let tag = tag.trim_ascii();
        let tag = tag.strip_prefix(b"W/").unwrap_or(tag);
        tag == b"*"
            || tag
                .strip_prefix(b"\"")
                .and_then(|t| t.strip_suffix(b"\""))
                .is_some_and(|t| t.eq_ignore_ascii_case(&hex))
    })
}

/// A header field some plain responses carry.
#[derive(Debug, Clone, Copy)]
enum Extra {
    None,
    /// `Allow: GET, HEAD` (405).
    Allow,
    /// `Content-Range: bytes */LEN` (416).
    RangeOf(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
}

/// A response being sent.
#[derive(Debug)]
struct Body {
    fp: Fingerprint,
    /// Next byte of the object to ask for, and the end (exclusive).
    next: u64,
    end: u64,
    /// A read is in flight.
    reading: bool,
}

/// Where the current request is.
#[derive(Debug)]
enum Phase {
    /// Between requests, or reading a head.
    Idle,
    /// Waiting for the object's length.
    Lookup {
        fp: Fingerprint,
        method: Method,
        range: Option<RangeSpec>,
        filename: Option<Name>,
        /// `If-None-Match` names this object's ETag (or `*`): 304 if it is here.
        not_modified: bool,
    },
    /// The object's head waits for its first piece (a 200/206 with a body): it is
    /// written in the output buffer from `head_at`, and held back (not sent) until
    /// then.
    First {
        head_at: usize,
        status: u16,
        body: Body,
    },
    /// Sending the body.
    Streaming(Body),
}

/// One HTTP connection (see the module docs).
#[derive(Debug)]
pub struct HttpSession<P> {
    out: Vec<u8>,
    out_pos: usize,
    /// Pieces lent by the store, after `out`, with bytes of each sent.
    lent: VecDeque<(P, usize)>,
    /// Pieces sent, to give back to the store.
    spent: Vec<P>,
    phase: Phase,
    /// Close once the current response is sent (Connection: close, HTTP/1.0, error).
    close_after: bool,
    /// Close now, dropping what is queued (a body read failed mid-way).
    broken: bool,
    read_closed: bool,
    /// Bytes lent at the last `on_recv` and not consumed (a head in part, or
    /// pipelined requests waiting their turn).
    unconsumed: usize,
    /// Statuses of responses started since the last `take_statuses`, for counters.
    statuses: Vec<u16>,
    /// URLs refused since the last `take_refusals`, by reason (indexed by code - 1).
    refused: [u32; Refusal::ALL.len()],
    /// The deadlines' clock, as a DOSP session's.
    clock: PeerClock,
}

impl<P: BodyPiece> HttpSession<P> {
    /// A new connection at `now`, with its own output buffer.
    pub fn new(now: Instant) -> HttpSession<P> {
        HttpSession::with_buffer(now, Vec::with_capacity(1024))
    }

    /// A new connection at `now` writing its heads in `out` (from the loop's pool;
    /// emptied first), to be given back with [`HttpSession::into_buffer`].
    pub fn with_buffer(now: Instant, mut out: Vec<u8>) -> HttpSession<P> {
        out.clear();
        HttpSession {
            out,
            out_pos: 0,
            lent: VecDeque::new(),
            spent: Vec::new(),
            phase: Phase::Idle,
            close_after: false,
            broken: false,
            read_closed: false,
            unconsumed: 0,
            statuses: Vec::new(),
            refused: [0; Refusal::ALL.len()],
            clock: PeerClock::new(now),
        }
    }

    /// Bytes queued and not sent (a held head is not queued yet).
    pub fn unsent(&self) -> usize {
        let lent: usize = self.lent.iter().map(|(p, s)| p.len() - s).sum();
        self.out_end() - self.out_pos + lent
    }

    /// End of the sendable part of the output buffer: a head waiting for its first
    /// piece is held back.
    fn out_end(&self) -> usize {
        match self.phase {
            Phase::First { head_at, .. } => head_at,
            _ => self.out.len(),
        }
    }

    /// Whether the session parses input now: no response in progress or queued.
    pub fn wants_input(&self) -> bool {
        matches!(self.phase, Phase::Idle) && !self.close_after && !self.broken && self.unsent() == 0
    }

    /// Whether the connection is done: closing and everything sent (or broken).
    pub fn finished(&self) -> bool {
        self.broken
            || (matches!(self.phase, Phase::Idle)
                && self.unsent() == 0
                && (self.close_after || (self.read_closed && self.unconsumed == 0)))
    }

    /// When the connection last moved a byte, if it is between requests: nothing
    /// queued or in flight, no partial head. Such a connection may be closed to make
    /// room for a new one without losing anything of a request.
    pub fn idle_since(&self) -> Option<Instant> {
        let between = matches!(self.phase, Phase::Idle)
            && self.unsent() == 0
            && self.clock.head_since.is_none()
            && self.unconsumed == 0;
        between.then_some(self.clock.last_io)
    }

    /// Statuses of the responses started since the last call (for the counters).
    pub fn take_statuses(&mut self) -> std::vec::Drain<'_, u16> {
        self.statuses.drain(..)
    }

    /// Signed URLs refused since the last call, as (reason, count) for each reason
    /// seen: the same reasons, and counters, as refused DOSP requests.
    pub fn take_refusals(&mut self) -> impl Iterator<Item = (Refusal, u32)> + '_ {
        Refusal::ALL
            .iter()
            .zip(self.refused.iter_mut())
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| (*r, std::mem::take(n)))
    }

    /// Pieces sent (or dropped), to give back to the store.
    pub fn take_spent(&mut self) -> std::vec::Drain<'_, P> {
        self.spent.drain(..)
    }

    /// The peer closed its side: finish the response in progress, then close.
    pub fn on_peer_closed(&mut self) {
        self.read_closed = true;
    }

    /// What the session waits for from the store, if anything (asked once per answer:
    /// a read is marked in flight when this returns it).
    pub fn need(&mut self) -> Option<Need> {
        if self.broken {
            return None;
        }
        let queued = self.unsent();
        match &mut self.phase {
            Phase::Lookup { fp, .. } => Some(Need::Lookup(*fp)),
            Phase::First { body, .. } | Phase::Streaming(body) => {
                if body.reading || body.next >= body.end || queued >= QUEUED_HIGH {
                    return None;
                }
                body.reading = true;
                let len = PIECE_BYTES.min((body.end - body.next) as usize);
                Some(Need::Read {
                    fp: body.fp,
                    offset: body.next,
                    len,
                })
            }
            Phase::Idle => None,
        }
    }

    /// Parses the next request head from the front of `data` (the bytes received and
    /// not consumed yet) when [`HttpSession::wants_input`], checking its signed URL
    /// with `keys` at `now_unix_s`. Returns how many bytes it consumed.
    pub fn on_recv(
        &mut self,
        now: Instant,
        now_unix_s: u64,
        keys: UrlKeys<'_>,
        data: &[u8],
    ) -> usize {
        let n = self.parse_one(now, now_unix_s, keys, data);
        self.unconsumed = data.len() - n.min(data.len());
        n
    }

    fn parse_one(
        &mut self,
        now: Instant,
        now_unix_s: u64,
        keys: UrlKeys<'_>,
        data: &[u8],
    ) -> usize {
        if !self.wants_input() || data.is_empty() {
            if data.is_empty() && self.read_closed && matches!(self.phase, Phase::Idle) {
                self.close_after = true;
            }
            return 0;
        }
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let mut req = httparse::Request::new(&mut headers);
        let parsed = req.parse(data);
        let n = match parsed {
            Ok(httparse::Status::Complete(n)) if n <= HEAD_BYTES_MAX => n,
            Ok(httparse::Status::Complete(_)) => {
                self.error_close(431, "request head too large\n");
                return data.len();
            }
            Ok(httparse::Status::Partial) => {
                if data.len() > HEAD_BYTES_MAX {
                    self.error_close(431, "request head too large\n");
                    return data.len();
                }
                if self.clock.head_since.is_none() {
                    self.clock.head_since = Some(now);
                }
                if self.read_closed {
                    self.close_after = true;
                }
                return 0;
            }
            Err(httparse::Error::TooManyHeaders) => {
                self.error_close(431, "too many header fields\n");
                return data.len();
            }
            Err(_) => {
                self.error_close(400, "malformed request\n");
                return data.len();
            }
        };
        self.clock.head_since = None;
        let version = req.version.unwrap_or(0);
        let mut keep_alive = version == 1;
        let mut range = None;
        let mut has_body = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    // HTTP/1.0 `keep-alive` is not offered: 1.0 always closes.
                    if token.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    }
                }
            } else if h.name.eq_ignore_ascii_case("range") {
                range = RangeSpec::parse(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding")
                || (h.name.eq_ignore_ascii_case("content-length") && h.value.trim_ascii() != b"0")
            {
                has_body = true;
            }
        }
        if !keep_alive {
            self.close_after = true;
        }
        let method = match req.method {
            Some("GET") => Method::Get,
            Some("HEAD") => Method::Head,
            _ if has_body => {
                // Its body is not read: what follows cannot be trusted to be a request.
                self.close_after = true;
                self.plain(405, "method not allowed\n", Extra::Allow);
                return data.len();
            }
            _ => {
                self.plain(405, "method not allowed\n", Extra::Allow);
                return n;
            }
        };
        if has_body {
            self.error_close(400, "a request body is not accepted\n");
            return data.len();
        }
        let path = req.path.unwrap_or("");
        let Some((request, signature, customer)) = split_srl(path) else {
            self.plain(404, "not found\n", Extra::None);
            return n;
        };
        match keys.ring.check_srl(
            request.as_bytes(),
            signature.as_bytes(),
            now_unix_s,
            keys.allow_md5,
        ) {
            Ok(fp) => {
                let not_modified = req
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("if-none-match"))
                    .any(|h| etag_matches(h.value, &fp));
                self.phase = Phase::Lookup {
                    fp,
                    method,
                    range,
                    filename: Name::from_uri(customer),
                    not_modified,
                };
            }
            Err(e) => {
                if let Some(c) = self
                    .refused
                    .get_mut(Refusal::of_token(&e).code() as usize - 1)
                {
                    *c += 1;
                }
                self.plain_method(403, refusal_text(&e), Extra::None, method);
            }
        }
        n
    }

    /// The object looked up is `len` bytes long, or absent (`None`).
    pub fn on_located(&mut self, found: Option<u64>) {
        let Phase::Lookup {
            fp,
            method,
            range,
            filename,
            not_modified,
        } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return;
        };
        let Some(len) = found else {
            return self.plain_method(404, "not found\n", Extra::None, method);
        };
        if not_modified {
            // RFC 9110 §13.2.2: If-None-Match is evaluated before Range.
            self.statuses.push(304);
            let out = &mut self.out;
            out.extend_from_slice(b"HTTP/1.1 304 Not Modified\r\n");
            let _ = write!(out, "ETag: \"{fp}\"\r\n");
            out.extend_from_slice(b"Accept-Ranges: bytes\r\n");
            if self.close_after {
                out.extend_from_slice(b"Connection: close\r\n");
            }
            out.extend_from_slice(b"\r\n");
            return;
        }
        let (status, start, end) = match range.map(|r| r.resolve(len)) {
            None => (200, 0, len),
            Some(RangeOutcome::Part(start, end)) => (206, start, end),
            Some(RangeOutcome::Unsatisfiable) => {
                return self.plain_method(
                    416,
                    "range not satisfiable\n",
                    Extra::RangeOf(len),
                    method,
                );
            }
        };
        // Written in place (no allocation): `io::Write` on a Vec cannot fail.
        let head_at = self.out.len();
        let out = &mut self.out;
        let reason = if status == 200 {
            "OK"
        } else {
            "Partial Content"
        };
        let _ = write!(out, "HTTP/1.1 {status} {reason}\r\n");
        let _ = write!(out, "Content-Length: {}\r\n", end - start);
        out.extend_from_slice(b"Content-Type: ");
        out.extend_from_slice(content_type(filename.as_ref()).as_bytes());
        // The type is ours, not the browser's guess: no sniffing an object into HTML.
        out.extend_from_slice(b"\r\nX-Content-Type-Options: nosniff\r\n");
        let _ = write!(out, "ETag: \"{fp}\"\r\n");
        if status == 200 {
            let mut b64 = [0u8; 24];
            let n = STANDARD.encode_slice(fp.0, &mut b64).unwrap_or(0);
            out.extend_from_slice(b"Content-MD5: ");
            out.extend_from_slice(&b64[..n]);
            out.extend_from_slice(b"\r\n");
        } else {
            let last = end - 1;
            let _ = write!(out, "Content-Range: bytes {start}-{last}/{len}\r\n");
        }
        out.extend_from_slice(b"Accept-Ranges: bytes\r\n");
        if let Some(name) = filename {
            out.extend_from_slice(b"Content-Disposition: inline; filename=\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\"\r\n");
        }
        if self.close_after {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if method == Method::Head || start == end {
            self.statuses.push(status);
            return;
        }
        self.phase = Phase::First {
            head_at,
            status,
            body: Body {
                fp,
                next: start,
                end,
                reading: false,
            },
        };
    }

    /// The read asked for by the last [`Need::Read`] is in: `Ok` with the piece lent
    /// by the store (its length must be the one asked), or `Err` with the HTTP status
    /// a failure maps to.
    pub fn on_piece(&mut self, result: Result<P, u16>) {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        let (mut body, first) = match phase {
            Phase::First {
                head_at,
                status,
                body,
            } => (body, Some((head_at, status))),
            Phase::Streaming(body) => (body, None),
            other => {
                self.phase = other;
                if let Ok(p) = result {
                    self.spent.push(p);
                }
                return;
            }
        };
        body.reading = false;
        let want = PIECE_BYTES.min((body.end - body.next) as usize);
        let piece = match result {
            Ok(p) if p.len() == want => p,
            Ok(p) => {
                self.spent.push(p);
                return self.body_failed(first, 500);
            }
            Err(status) => return self.body_failed(first, status),
        };
        if let Some((_, status)) = first {
            // The held head goes out now, the piece after it.
            self.statuses.push(status);
        }
        body.next += want as u64;
        self.lent.push_back((piece, 0));
        if body.next < body.end {
            self.phase = Phase::Streaming(body);
        }
    }

    fn body_failed(&mut self, first: Option<(usize, u16)>, status: u16) {
        if let Some((head_at, _)) = first {
            // The held head is never sent: an error takes its place.
            self.out.truncate(head_at);
            let text = if status == 503 {
                "object unavailable\n"
            } else {
                "object could not be read\n"
            };
            self.plain(status, text, Extra::None);
        } else {
            self.broken = true;
        }
    }

    /// A plain-text response; for HEAD, without its body.
    fn plain_method(&mut self, status: u16, text: &str, extra: Extra, method: Method) {
        self.respond(status, text, extra, method == Method::Get);
    }

    fn plain(&mut self, status: u16, text: &str, extra: Extra) {
        self.respond(status, text, extra, true);
    }

    /// A plain-text error, then close (the input cannot be trusted to be in step).
    fn error_close(&mut self, status: u16, text: &str) {
        self.close_after = true;
        self.respond(status, text, Extra::None, true);
    }

    fn respond(&mut self, status: u16, text: &str, extra: Extra, with_body: bool) {
        let reason = match status {
            400 => "Bad Request",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            416 => "Range Not Satisfiable",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Internal Server Error",
        };
        self.statuses.push(status);
        let out = &mut self.out;
        let _ = write!(out, "HTTP/1.1 {status} {reason}\r\n");
        out.extend_from_slice(b"Content-Type: text/plain; charset=utf-8\r\n");
        let _ = write!(out, "Content-Length: {}\r\n", text.len());
        match extra {
            Extra::None => {}
            Extra::Allow => out.extend_from_slice(b"Allow: GET, HEAD\r\n"),
            Extra::RangeOf(len) => {
                let _ = write!(out, "Content-Range: bytes */{len}\r\n");
            }
        }
        if self.close_after {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if with_body {
            out.extend_from_slice(text.as_bytes());
        }
    }

    /// Up to `iov.len()` non-empty slices to send, in order: the head buffer, then the
    /// lent pieces. Returns how many it filled.
    pub fn pending_slices<'a>(&'a self, iov: &mut [io::IoSlice<'a>]) -> usize {
        if self.broken {
            return 0;
        }
        let mut k = 0;
        let mut push = |s: &'a [u8]| {
            if !s.is_empty() && k < iov.len() {
                iov[k] = io::IoSlice::new(s);
                k += 1;
            }
            k < iov.len()
        };
        if !push(&self.out[self.out_pos..self.out_end()]) {
            return k;
        }
        for (piece, sent) in &self.lent {
            let mut at = *sent;
            while at < piece.len() {
                let s = piece.slice_at(at);
                if s.is_empty() {
                    break;
                }
                at += s.len();
                if !push(s) {
                    return k;
                }
            }
        }
        k
    }

    /// The port took the first `n` bytes of [`HttpSession::pending_slices`].
    pub fn output_sent(&mut self, now: Instant, n: usize) {
        let mut left = n;
        let head = (self.out_end() - self.out_pos).min(left);
        self.out_pos += head;
        left -= head;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        while left > 0 {
            let Some((piece, sent)) = self.lent.front_mut() else {
                break;
            };
            let take = (piece.len() - *sent).min(left);
            *sent += take;
            left -= take;
            if *sent >= piece.len() {
                if let Some((piece, _)) = self.lent.pop_front() {
                    self.spent.push(piece);
                }
            }
        }
        self.clock.moved(now, n);
    }

    /// `n` bytes arrived from the peer.
    pub fn on_arrived(&mut self, now: Instant, n: usize) {
        self.clock.moved(now, n);
    }

    /// The output buffer, for the pool (after [`HttpSession::close`]).
    pub fn into_buffer(self) -> Vec<u8> {
        self.out
    }

    /// Gives back every piece held (the connection is closing).
    pub fn close(&mut self) {
        while let Some((piece, _)) = self.lent.pop_front() {
            self.spent.push(piece);
        }
        self.phase = Phase::Idle;
    }

    /// Whether the peer broke a deadline (see the module docs). Called by the loop's
    /// timer scan, which also moves the rate window along.
    pub fn timed_out(&mut self, now: Instant, d: &Deadlines) -> Option<Timeout> {
        let on_store = matches!(self.phase, Phase::Lookup { .. } | Phase::First { .. })
            || matches!(&self.phase, Phase::Streaming(b) if b.reading && self.lent.is_empty());
        let waiting_on_peer = self.unsent() > 0;
        let mid_request = waiting_on_peer || self.clock.head_since.is_some();
        self.clock
            .check(now, d, on_store, waiting_on_peer, mid_request)
    }
}

// ---------------------------------------------------------------------------------------
// The loop's side: one HTTP connection over a NetPort and the store
// ---------------------------------------------------------------------------------------

/// Object-sending work per [`HttpConn::drive`] call, so one fast client cannot starve
/// the loop's other connections.
const STEPS_MAX: usize = 64;
/// Slices per send.
const IOV_MAX: usize = 8;

/// An [`HttpSession`] with what the loop keeps for it: the peer, the loop whose shard
/// holds the object being sent, and the read in flight.
#[derive(Debug)]
pub struct HttpConn {
    pub peer: std::net::SocketAddr,
    session: HttpSession<crate::store::Piece>,
    holder: u16,
    inflight: Option<crate::store::ReadId>,
    /// The lookup is asked and its answer not in.
    looking_up: bool,
}

/// The HTTP status a store error maps to.
fn http_status_of(e: &crate::store::StoreError) -> u16 {
    use crate::store::StoreError;
    match e {
        StoreError::NotFound(_) => 404,
        StoreError::Busy | StoreError::DiskOffline(_) => 503,
        StoreError::DiskFailed { .. } | StoreError::NoUsableDisk => 503,
        _ => 500,
    }
}

impl HttpConn {
    /// A connection writing its heads in a buffer from the loop's pool.
    pub fn new(
        peer: std::net::SocketAddr,
        now: Instant,
        bufs: super::session::SessionBufs,
    ) -> HttpConn {
        HttpConn {
            peer,
            session: HttpSession::with_buffer(now, bufs.into_out()),
            holder: 0,
            inflight: None,
            looking_up: false,
        }
    }

    /// See [`HttpSession::idle_since`].
    pub fn idle_since(&self) -> Option<Instant> {
        self.session.idle_since()
    }

    /// Deadlines (see [`HttpSession::timed_out`]).
    pub fn timed_out(&mut self, now: Instant, d: &Deadlines) -> Option<Timeout> {
        self.session.timed_out(now, d)
    }

    /// Gives back to the store every piece held; a read in flight is released by the
    /// loop when its event finds no connection.
    pub fn close(&mut self, ctx: &mut super::ops::Ctx<'_>) {
        self.session.close();
        self.give_back(ctx);
    }

    /// The pooled buffer, once closed.
    pub fn into_bufs(self) -> super::session::SessionBufs {
        super::session::SessionBufs::from_out(self.session.into_buffer())
    }

    fn give_back(&mut self, ctx: &mut super::ops::Ctx<'_>) {
        for piece in self.session.take_spent() {
            ctx.store.read_give(piece);
        }
        for (reason, n) in self.session.take_refusals() {
            for _ in 0..n {
                ctx.stats.auth_failed(reason);
            }
        }
        for status in self.session.take_statuses() {
            ctx.stats.http_response(status);
            // An HTTP response is load like a DOSP reply: ops/s, GET_LOAD, heartbeats.
            crate::stats::NodeStats::inc(&ctx.stats.ops_total);
        }
    }

    /// Asks the store what the session needs, answering at once what it can.
    fn serve_needs(&mut self, ctx: &mut super::ops::Ctx<'_>, user: u64) {
        use super::shards::Locate;
        use crate::store::ReadStart;
        for _ in 0..4 {
            if self.looking_up || self.inflight.is_some() {
                return;
            }
            match self.session.need() {
                None => return,
                Some(Need::Lookup(fp)) => match ctx.store.locate(&fp, user) {
                    Locate::Now(found) => self.located(found),
                    Locate::Later => self.looking_up = true,
                },
                Some(Need::Read { fp, offset, len }) => {
                    match ctx.store.read_start(self.holder, &fp, offset, len, user) {
                        Ok(ReadStart::Ready(piece)) => self.session.on_piece(Ok(piece)),
                        Ok(ReadStart::Pending(id)) => self.inflight = Some(id),
                        Err(e) => self.session.on_piece(Err(http_status_of(&e))),
                    }
                }
            }
        }
    }

    fn located(&mut self, found: Option<(u16, crate::store::ObjectMeta)>) {
        self.looking_up = false;
        if let Some((holder, _)) = &found {
            self.holder = *holder;
        }
        self.session.on_located(found.map(|(_, meta)| meta.len));
    }

    /// What the store finished for this connection.
    pub fn on_store_event(&mut self, ctx: &mut super::ops::Ctx<'_>, ev: super::shards::Event) {
        use super::shards::Event;
        use crate::store::StoreEvent;
        match ev {
            Event::Located { found, .. } if self.looking_up => self.located(found),
            Event::Store(StoreEvent::Read { id, .. }) => {
                if self.inflight != Some(id) {
                    return ctx.store.read_release(id);
                }
                self.inflight = None;
                match ctx.store.read_take(id) {
                    Ok(piece) => self.session.on_piece(Ok(piece)),
                    Err(e) => {
                        if matches!(e, crate::store::StoreError::Corrupt { .. }) {
                            crate::stats::NodeStats::inc(&ctx.stats.checksum_mismatches);
                        }
                        self.session.on_piece(Err(http_status_of(&e)))
                    }
                }
            }
            _ => {}
        }
    }

    /// Moves bytes between the session, the store and `port` until the port would
    /// block, the work runs out or the step bound is hit.
    pub fn drive<P: super::port::NetPort>(
        &mut self,
        port: &mut P,
        conn: super::port::ConnId,
        ctx: &mut super::ops::Ctx<'_>,
        keys: UrlKeys<'_>,
        now_unix_s: u64,
        now: Instant,
    ) -> super::session::Drive {
        use super::session::Drive;
        for _ in 0..STEPS_MAX {
            let mut progress = false;
            let mut iov = [io::IoSlice::new(&[]); IOV_MAX];
            let k = self.session.pending_slices(&mut iov);
            if k > 0 {
                match port.send_vectored(conn, &iov[..k]) {
                    Ok(0) => return Drive::Close,
                    Ok(n) => {
                        crate::stats::NodeStats::add(&ctx.stats.bytes_out, n as u64);
                        self.session.output_sent(now, n);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Drive::Close,
                }
            }
            self.serve_needs(ctx, conn.0);
            if self.session.wants_input() {
                let mut consumed = 0;
                let session = &mut self.session;
                match port.recv(conn, |buf| {
                    consumed = session.on_recv(now, now_unix_s, keys, buf);
                    consumed
                }) {
                    Ok(got) => {
                        crate::stats::NodeStats::add(&ctx.stats.bytes_in, got.arrived as u64);
                        self.session.on_arrived(now, got.arrived);
                        if got.peer_closed {
                            self.session.on_peer_closed();
                            // Let the session see the end with nothing more to parse.
                            let _ = port
                                .recv(conn, |buf| self.session.on_recv(now, now_unix_s, keys, buf));
                        }
                        progress |= got.arrived > 0 || consumed > 0;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Drive::Close,
                }
                self.serve_needs(ctx, conn.0);
            }
            self.give_back(ctx);
            if self.session.finished() {
                return Drive::Close;
            }
            if !progress {
                return Drive::Idle;
            }
        }
        Drive::More
    }
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
