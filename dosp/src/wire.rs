//! DOSP wire structures: fixed-size little-endian records read in place.
//!
//! Every structure here is `#[repr(C)]` over byte-aligned little-endian integers, so it
//! can be viewed directly inside a receive buffer (`zerocopy`), and its size is asserted
//! at compile time. `PROTOCOL.md` is the written contract for every field below; keep
//! the two in step.
//!
//! What this module must never do: trust a length before it is bounded, or panic on
//! any byte sequence.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::Fingerprint;

/// `DOSP` in memory order: the first four bytes of every message header.
pub const MAGIC: u32 = u32::from_le_bytes(*b"DOSP");
/// `DOSC`: the first four bytes of a STORE chunk header.
pub const CHUNK_MAGIC: u32 = u32::from_le_bytes(*b"DOSC");
/// `DOSS`: the first four bytes of a stream header (length of the data that follows).
pub const STREAM_MAGIC: u32 = u32::from_le_bytes(*b"DOSS");
/// The protocol version this crate speaks and sends.
pub const VERSION: u8 = 2;
/// The oldest version a receiver accepts. Version 1 is version 2 without signed
/// messages (a version-1 message is never signed).
pub const VERSION_MIN: u8 = 1;

/// Largest In/Out body a peer accepts. Bodies are small fixed structures (the largest is
/// GET_DISK_STATUS with 256 disks: 8 + 256 * 72 bytes), so 64 KiB bounds every one.
pub const BODY_MAX: u32 = 64 * 1024;
/// Largest STORE chunk a node accepts by default (configurable on the node).
pub const CHUNK_MAX_DEFAULT: u32 = 4 * 1024 * 1024;
/// Disk selector meaning "every disk" in GET_DISK_STATE / GET_DISK_STATUS.
pub const ALL_DISKS: u16 = 0xFFFF;
/// The `disk` of a GET_CONTENTS padding entry (with an all-zero fingerprint): the
/// stream keeps the length promised at its start although objects were deleted while
/// it was walked. Receivers skip such entries.
pub const CONTENTS_PADDING_DISK: u16 = 0xFFFF;
/// Most disks a node reports in one reply.
pub const DISKS_MAX: usize = 256;

/// Longest node name, in bytes: the size of the name field in LOCATE, HEARTBEAT and
/// ANNOUNCE answers.
pub const NODE_NAME_MAX: usize = 32;

/// A node's name, given by its operator: 1 to [`NODE_NAME_MAX`] bytes of printable
/// ASCII other than space (`!` to `~`), so it prints on one line as one word.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeName(String);

/// Why a string is not a [`NodeName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeNameError {
    #[error("a node name may not be empty")]
    Empty,
    #[error("a node name is at most {NODE_NAME_MAX} bytes, not {0}")]
    TooLong(usize),
    #[error("a node name is printable ASCII without spaces ('!' to '~'), not {0:?}")]
    BadChar(char),
}

impl NodeName {
    pub fn new(name: &str) -> Result<NodeName, NodeNameError> {
        if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(NodeNameError::BadChar(c));
        }
        match name.len() {
            0 => Err(NodeNameError::Empty),
            n if n > NODE_NAME_MAX => Err(NodeNameError::TooLong(n)),
            _ => Ok(NodeName(name.to_string())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64-bit node id the name stands for on the wire: the first 8 bytes of the
    /// MD5 of the name, read as a little-endian u64. Stable: the same name is the same
    /// node id on every node, version and machine.
    pub fn node_id(&self) -> u64 {
        let md5 = Fingerprint::of(self.0.as_bytes()).0;
        u64::from_le_bytes([
            md5[0], md5[1], md5[2], md5[3], md5[4], md5[5], md5[6], md5[7],
        ])
    }

    /// The name field of a node that has `name` (NUL-padded), or of one that has none
    /// (all zero).
    pub fn field(name: Option<&NodeName>) -> [u8; NODE_NAME_MAX] {
        let mut field = [0u8; NODE_NAME_MAX];
        if let Some(name) = name {
            field[..name.0.len()].copy_from_slice(name.0.as_bytes());
        }
        field
    }

    /// Reads a name field. `None` for a node without a name (all zero) and for
    /// anything that is not a valid name followed by NULs: a peer's bytes are never
    /// trusted to print.
    pub fn from_field(field: &[u8; NODE_NAME_MAX]) -> Option<NodeName> {
        let end = field.iter().position(|&b| b == 0).unwrap_or(NODE_NAME_MAX);
        if field[end..].iter().any(|&b| b != 0) {
            return None;
        }
        std::str::from_utf8(&field[..end])
            .ok()
            .and_then(|s| NodeName::new(s).ok())
    }
}

impl std::fmt::Display for NodeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// CRC-32C (Castagnoli), the checksum of every header.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Kinds of message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Request = 1,
    Response = 2,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Request),
            2 => Some(Kind::Response),
            _ => None,
        }
    }
}

/// Header flag: the request was sent to the multicast group (so a node that cannot
/// answer stays silent instead of replying NOT_FOUND).
pub const FLAG_MULTICAST: u16 = 1 << 0;
/// Header flag (version 2): an [`AuthTrailer`] follows the In/Out structure, counted in
/// `body_len`. Meaningless in a version-1 header.
pub const FLAG_SIGNED: u16 = 1 << 1;

/// The 32-byte header in front of every request and response.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct Header {
    pub magic: U32,
    pub version: u8,
    pub kind: u8,
    pub opcode: U16,
    pub request_id: U64,
    /// Bytes of the In/Out structure that follows the header.
    pub body_len: U32,
    pub flags: U16,
    pub reserved0: U16,
    pub reserved1: U32,
    /// CRC-32C of bytes 0..28 of this header.
    pub checksum: U32,
}

const _: () = assert!(size_of::<Header>() == 32);

impl Header {
    pub const SIZE: usize = 32;

    pub fn new(kind: Kind, opcode: Opcode, request_id: u64, body_len: u32, flags: u16) -> Header {
        Header::new_raw(kind, opcode as u16, request_id, body_len, flags)
    }

    /// A header with a raw opcode, used to echo an opcode the receiver does not know.
    pub fn new_raw(kind: Kind, opcode: u16, request_id: u64, body_len: u32, flags: u16) -> Header {
        let mut h = Header {
            magic: MAGIC.into(),
            version: VERSION,
            kind: kind as u8,
            opcode: opcode.into(),
            request_id: request_id.into(),
            body_len: body_len.into(),
            flags: flags.into(),
            reserved0: 0.into(),
            reserved1: 0.into(),
            checksum: 0.into(),
        };
        h.checksum = h.compute_checksum().into();
        h
    }

    pub fn compute_checksum(&self) -> u32 {
        crc32c(&self.as_bytes()[..28])
    }

    /// Validates magic, checksum, version, kind and body bound, in that order, so the
    /// error names the first thing that is wrong.
    pub fn check(&self, expect: Kind) -> Result<(), WireError> {
        if self.magic.get() != MAGIC {
            return Err(WireError::BadMagic(self.magic.get()));
        }
        if self.checksum.get() != self.compute_checksum() {
            return Err(WireError::HeaderChecksum);
        }
        if !(VERSION_MIN..=VERSION).contains(&self.version) {
            return Err(WireError::BadVersion(self.version));
        }
        if self.kind != expect as u8 {
            return Err(WireError::BadKind(self.kind));
        }
        if self.body_len.get() > BODY_MAX {
            return Err(WireError::BodyTooLarge {
                len: self.body_len.get(),
                max: BODY_MAX,
            });
        }
        Ok(())
    }

    pub fn opcode(&self) -> Option<Opcode> {
        Opcode::from_u16(self.opcode.get())
    }

    /// Whether an [`AuthTrailer`] ends the body: a version-2 header with
    /// [`FLAG_SIGNED`].
    pub fn signed(&self) -> bool {
        self.version >= 2 && self.flags.get() & FLAG_SIGNED != 0
    }
}

/// Ends the body of a signed message (header flag [`FLAG_SIGNED`]): who signed it, when,
/// and the certificate. `body_len` counts it. dosp/PROTOCOL.md §7.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct AuthTrailer {
    /// The key's wire id (`dosp::auth::wire_id_of`).
    pub key_id: U32,
    /// `dosp::auth::CertMode` code: 1 HMAC-SHA256, 2 double MD5.
    pub mode: u8,
    pub reserved: [u8; 3],
    /// Unix time in ms when the message was signed; 0 allowed on idempotent requests.
    pub timestamp_ms: U64,
    /// Chosen at random by the signer: (key, timestamp, nonce) is unique.
    pub nonce: U64,
    /// Over header bytes 0..28, the In/Out structure, then trailer bytes 0..24.
    pub certificate: [u8; 32],
}

const _: () = assert!(size_of::<AuthTrailer>() == 56);

impl AuthTrailer {
    pub const SIZE: usize = 56;
    /// Bytes of the trailer the certificate covers: all but the certificate.
    pub const SIGNED_PREFIX: usize = 24;
}

/// Precedes every STORE chunk: the length of the bytes that follow and whether this is
/// the last chunk of the object.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct ChunkHeader {
    pub magic: U32,
    pub len: U32,
    pub flags: U32,
    /// CRC-32C of bytes 0..12.
    pub checksum: U32,
}

const _: () = assert!(size_of::<ChunkHeader>() == 16);

/// Chunk flag: this is the last chunk of the object.
pub const CHUNK_LAST: u32 = 1 << 0;

impl ChunkHeader {
    pub const SIZE: usize = 16;

    pub fn new(len: u32, last: bool) -> ChunkHeader {
        let mut h = ChunkHeader {
            magic: CHUNK_MAGIC.into(),
            len: len.into(),
            flags: (if last { CHUNK_LAST } else { 0 }).into(),
            checksum: 0.into(),
        };
        h.checksum = crc32c(&h.as_bytes()[..12]).into();
        h
    }

    pub fn check(&self, max: u32) -> Result<(), WireError> {
        if self.magic.get() != CHUNK_MAGIC {
            return Err(WireError::BadChunkMagic(self.magic.get()));
        }
        if self.checksum.get() != crc32c(&self.as_bytes()[..12]) {
            return Err(WireError::HeaderChecksum);
        }
        if self.flags.get() & !CHUNK_LAST != 0 {
            return Err(WireError::BadFlags(self.flags.get()));
        }
        if self.len.get() > max {
            return Err(WireError::ChunkTooLarge {
                len: self.len.get(),
                max,
            });
        }
        Ok(())
    }

    pub fn last(&self) -> bool {
        self.flags.get() & CHUNK_LAST != 0
    }
}

/// Precedes streamed response data (RETRIEVE, RETRIEVE_RANGE, GET_CONTENTS): the number
/// of bytes that follow before the Out structure.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct StreamHeader {
    pub magic: U32,
    pub reserved: U32,
    pub request_id: U64,
    pub len: U64,
    pub reserved1: U32,
    /// CRC-32C of bytes 0..28.
    pub checksum: U32,
}

const _: () = assert!(size_of::<StreamHeader>() == 32);

impl StreamHeader {
    pub const SIZE: usize = 32;

    pub fn new(request_id: u64, len: u64) -> StreamHeader {
        let mut h = StreamHeader {
            magic: STREAM_MAGIC.into(),
            reserved: 0.into(),
            request_id: request_id.into(),
            len: len.into(),
            reserved1: 0.into(),
            checksum: 0.into(),
        };
        h.checksum = crc32c(&h.as_bytes()[..28]).into();
        h
    }

    pub fn check(&self) -> Result<(), WireError> {
        if self.magic.get() != STREAM_MAGIC {
            return Err(WireError::BadMagic(self.magic.get()));
        }
        if self.checksum.get() != crc32c(&self.as_bytes()[..28]) {
            return Err(WireError::HeaderChecksum);
        }
        Ok(())
    }
}

/// Operation codes. Values are part of the wire contract: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Opcode {
    Null = 0,
    Store = 1,
    Retrieve = 2,
    RetrieveRange = 3,
    Delete = 4,
    GetContents = 5,
    Locate = 6,
    Heartbeat = 7,
    GetDiskState = 8,
    GetDiskStatus = 9,
    GetLoad = 10,
    /// Unsolicited, multicast by a node: something happened (disk down, node leaving…).
    /// Never a request: a node answers an ANNOUNCE request with BAD_REQUEST.
    Announce = 11,
}

impl Opcode {
    pub const ALL: [Opcode; 12] = [
        Opcode::Null,
        Opcode::Store,
        Opcode::Retrieve,
        Opcode::RetrieveRange,
        Opcode::Delete,
        Opcode::GetContents,
        Opcode::Locate,
        Opcode::Heartbeat,
        Opcode::GetDiskState,
        Opcode::GetDiskStatus,
        Opcode::GetLoad,
        Opcode::Announce,
    ];

    pub fn from_u16(v: u16) -> Option<Opcode> {
        Opcode::ALL.get(usize::from(v)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Opcode::Null => "NULL",
            Opcode::Store => "STORE",
            Opcode::Retrieve => "RETRIEVE",
            Opcode::RetrieveRange => "RETRIEVE_RANGE",
            Opcode::Delete => "DELETE",
            Opcode::GetContents => "GET_CONTENTS",
            Opcode::Locate => "LOCATE",
            Opcode::Heartbeat => "HEARTBEAT",
            Opcode::GetDiskState => "GET_DISK_STATE",
            Opcode::GetDiskStatus => "GET_DISK_STATUS",
            Opcode::GetLoad => "GET_LOAD",
            Opcode::Announce => "ANNOUNCE",
        }
    }

    /// Size of the fixed In structure this opcode's request carries.
    pub fn in_size(self) -> usize {
        match self {
            Opcode::Null => size_of::<NullIn>(),
            Opcode::Store => size_of::<StoreIn>(),
            Opcode::Retrieve => size_of::<RetrieveIn>(),
            Opcode::RetrieveRange => size_of::<RangeIn>(),
            Opcode::Delete => size_of::<DeleteIn>(),
            Opcode::GetContents => size_of::<ContentsIn>(),
            Opcode::Locate => size_of::<LocateIn>(),
            Opcode::Heartbeat => size_of::<HeartbeatIn>(),
            Opcode::GetDiskState | Opcode::GetDiskStatus => size_of::<DiskQueryIn>(),
            Opcode::GetLoad => size_of::<LoadIn>(),
            Opcode::Announce => 0,
        }
    }
}

/// Result of an operation, first field of every Out structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    Success = 0,
    NotFound = 1,
    BadRequest = 2,
    AuthFailed = 3,
    NoSpace = 4,
    DiskFailed = 5,
    Busy = 6,
    ChecksumMismatch = 7,
    UnknownOpcode = 8,
    TooLarge = 9,
    OutOfRange = 10,
    BadVersion = 11,
    DiskOffline = 12,
    Internal = 13,
}

impl Status {
    pub const ALL: [Status; 14] = [
        Status::Success,
        Status::NotFound,
        Status::BadRequest,
        Status::AuthFailed,
        Status::NoSpace,
        Status::DiskFailed,
        Status::Busy,
        Status::ChecksumMismatch,
        Status::UnknownOpcode,
        Status::TooLarge,
        Status::OutOfRange,
        Status::BadVersion,
        Status::DiskOffline,
        Status::Internal,
    ];

    pub fn from_u16(v: u16) -> Option<Status> {
        Status::ALL.get(usize::from(v)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Success => "SUCCESS",
            Status::NotFound => "NOT_FOUND",
            Status::BadRequest => "BAD_REQUEST",
            Status::AuthFailed => "AUTH_FAILED",
            Status::NoSpace => "NO_SPACE",
            Status::DiskFailed => "DISK_FAILED",
            Status::Busy => "BUSY",
            Status::ChecksumMismatch => "CHECKSUM_MISMATCH",
            Status::UnknownOpcode => "UNKNOWN_OPCODE",
            Status::TooLarge => "TOO_LARGE",
            Status::OutOfRange => "OUT_OF_RANGE",
            Status::BadVersion => "BAD_VERSION",
            Status::DiskOffline => "DISK_OFFLINE",
            Status::Internal => "INTERNAL",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The common prefix of every Out structure. An error reply may carry only this prefix
/// (`body_len == 8`), whatever the opcode: a receiver reads the status first and parses
/// the rest only on SUCCESS.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct OutHead {
    pub status: U16,
    pub reserved: U16,
    /// Operation-specific detail for errors (e.g. the offending length); 0 otherwise.
    pub detail: U32,
}

impl OutHead {
    pub fn new(status: Status, detail: u32) -> OutHead {
        OutHead {
            status: (status as u16).into(),
            reserved: 0.into(),
            detail: detail.into(),
        }
    }
}

const _: () = assert!(size_of::<OutHead>() == 8);

macro_rules! wire_struct {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? } = $size:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
        #[repr(C)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
        const _: () = assert!(size_of::<$name>() == $size);
    };
}

wire_struct!(/// NULL request: nothing.
    NullIn {} = 0);
wire_struct!(/// NULL reply: the node is alive, speaks this version, and has these limits.
    NullOut {
        head: OutHead,
        /// Largest In/Out body the node accepts ([`BODY_MAX`]).
        body_max: U32,
        /// Largest STORE chunk the node accepts.
        chunk_max: U32,
        /// Largest object the node stores.
        object_max: U64,
    } = 24);
/// StoreIn flag: `expect_md5` is the object's MD5; the node refuses any other object.
pub const STORE_EXPECT_MD5: u32 = 1 << 0;
/// StoreIn flag: `expect_len` is the object's exact length; the node refuses any other.
pub const STORE_EXPECT_LEN: u32 = 1 << 1;
/// Every StoreIn flag this version defines; a request with any other bit set is refused.
pub const STORE_FLAGS_KNOWN: u32 = STORE_EXPECT_MD5 | STORE_EXPECT_LEN;

/// CHECKSUM_MISMATCH detail of a STORE whose data is not as long as `expect_len` said.
pub const MISMATCH_LEN: u32 = 1;
/// CHECKSUM_MISMATCH detail of a STORE whose data does not hash to `expect_md5`.
pub const MISMATCH_MD5: u32 = 2;

wire_struct!(/// STORE request; chunks follow.
    StoreIn {
        /// Total object size if the client knows it (0 = unknown), for the node's early
        /// refusal (TOO_LARGE, NO_SPACE) before any data. Not checked against the data.
        size_hint: U64,
        /// STORE_EXPECT_MD5 | STORE_EXPECT_LEN; other bits zero.
        flags: U32,
        reserved: U32,
        /// With STORE_EXPECT_MD5: the object's MD5 (zero otherwise).
        expect_md5: Fingerprint,
        /// With STORE_EXPECT_LEN: the object's exact length (zero otherwise).
        expect_len: U64,
    } = 40);

impl StoreIn {
    /// A request announcing `size_hint` and promising whatever of the length and MD5 is
    /// given. A known length is also sent as the hint.
    pub fn new(
        size_hint: u64,
        expect_len: Option<u64>,
        expect_md5: Option<Fingerprint>,
    ) -> StoreIn {
        let mut flags = 0;
        if expect_len.is_some() {
            flags |= STORE_EXPECT_LEN;
        }
        if expect_md5.is_some() {
            flags |= STORE_EXPECT_MD5;
        }
        StoreIn {
            size_hint: expect_len.unwrap_or(size_hint).into(),
            flags: flags.into(),
            reserved: 0.into(),
            expect_md5: expect_md5.unwrap_or(Fingerprint::ZERO),
            expect_len: expect_len.unwrap_or(0).into(),
        }
    }

    /// The promised length, if the flag says there is one.
    pub fn expect_len(&self) -> Option<u64> {
        (self.flags.get() & STORE_EXPECT_LEN != 0).then(|| self.expect_len.get())
    }

    /// The promised MD5, if the flag says there is one.
    pub fn expect_md5(&self) -> Option<Fingerprint> {
        (self.flags.get() & STORE_EXPECT_MD5 != 0).then_some(self.expect_md5)
    }

    /// Flag bits this version does not define (0 for a valid request).
    pub fn unknown_flags(&self) -> u32 {
        self.flags.get() & !STORE_FLAGS_KNOWN
    }

    /// The size the node plans for: the promised length, else the hint (0: unknown).
    pub fn announced_len(&self) -> u64 {
        self.expect_len().unwrap_or(self.size_hint.get())
    }
}
wire_struct!(/// STORE reply.
    StoreOut {
        head: OutHead,
        fingerprint: Fingerprint,
        len: U64,
        disk: U16,
        /// 1 when the object was already stored and only its reference count grew.
        deduplicated: u8,
        reserved: u8,
        refcount: U32,
    } = 40);
wire_struct!(/// RETRIEVE request.
    RetrieveIn { fingerprint: Fingerprint } = 16);
wire_struct!(/// RETRIEVE / RETRIEVE_RANGE reply, sent after the streamed data.
    RetrieveOut {
        head: OutHead,
        fingerprint: Fingerprint,
        /// Length of the whole object (also on OUT_OF_RANGE, so the client can say why).
        object_len: U64,
    } = 32);
wire_struct!(/// RETRIEVE_RANGE request: `len` bytes at `offset`.
    RangeIn { fingerprint: Fingerprint, offset: U64, len: U64 } = 32);
wire_struct!(/// DELETE request.
    DeleteIn { fingerprint: Fingerprint } = 16);
wire_struct!(/// DELETE reply: references left (0 = the object is gone).
    DeleteOut { head: OutHead, fingerprint: Fingerprint, refcount: U32, reserved: U32 } = 32);
wire_struct!(/// GET_CONTENTS request.
    ContentsIn { flags: U32, reserved: U32 } = 8);
wire_struct!(/// One entry of the GET_CONTENTS stream.
    ContentsEntry { fingerprint: Fingerprint, disk: U16, reserved: U16 } = 20);
wire_struct!(/// GET_CONTENTS reply, after the stream: how many entries were sent.
    ContentsOut { head: OutHead, count: U64 } = 16);
wire_struct!(/// LOCATE request: who holds this object?
    LocateIn { fingerprint: Fingerprint } = 16);
wire_struct!(/// LOCATE reply: this node holds it, on this disk, reachable at this address.
    LocateOut {
        head: OutHead,
        fingerprint: Fingerprint,
        node_id: U64,
        object_len: U64,
        disk: U16,
        /// DOSP (TCP) port of the holder.
        port: U16,
        /// IPv4 address of the holder's DOSP endpoint, in network order.
        addr: [u8; 4],
        /// The holder's name, NUL-padded; all zero if it has none ([`NodeName`]).
        name: [u8; NODE_NAME_MAX],
    } = 80);
wire_struct!(/// HEARTBEAT request.
    HeartbeatIn {} = 0);
wire_struct!(/// HEARTBEAT reply, also multicast periodically by every node.
    HeartbeatOut {
        head: OutHead,
        node_id: U64,
        /// Increments on every start of the node.
        epoch: U64,
        uptime_ms: U64,
        /// 0 standalone, 1 active, 2 passive.
        role: u8,
        /// 0 ok, 1 degraded, 2 failing.
        health: u8,
        disks_online: U16,
        disks_total: U16,
        port: U16,
        addr: [u8; 4],
        ops_outstanding: U32,
        bytes_free: U64,
        bytes_total: U64,
        objects: U64,
        /// Replies sent per second, over the last second.
        ops_per_sec: U32,
        reserved1: U32,
        /// The node's name, NUL-padded; all zero if it has none ([`NodeName`]).
        name: [u8; NODE_NAME_MAX],
    } = 112);
wire_struct!(/// GET_DISK_STATE / GET_DISK_STATUS request: one disk or ALL_DISKS.
    DiskQueryIn { disk: U16, reserved: U16, reserved1: U32 } = 8);
wire_struct!(/// GET_DISK_STATE / GET_DISK_STATUS reply head: `count` DiskStateEntry or
    /// DiskStatusEntry records follow in the body.
    DiskListOut { head: OutHead, count: U16, reserved: U16, reserved1: U32 } = 16);
wire_struct!(/// One disk's state: 0 online, 1 offline, 2 down.
    DiskStateEntry { disk: U16, state: u8, reserved: u8 } = 4);
wire_struct!(/// One disk's statistics.
    DiskStatusEntry {
        disk: U16,
        state: u8,
        reserved: u8,
        outstanding_ops: U32,
        identity: [u8; 16],
        bytes_total: U64,
        bytes_free: U64,
        bytes_available: U64,
        objects_used: U64,
        objects_available: U64,
    } = 64);
wire_struct!(/// GET_LOAD request.
    LoadIn {} = 0);
wire_struct!(/// GET_LOAD reply: the node's load, for the managers' balancing.
    LoadOut {
        head: OutHead,
        connections: U32,
        ops_outstanding: U32,
        ops_total: U64,
        bytes_in: U64,
        bytes_out: U64,
        uptime_ms: U64,
        errors_total: U64,
    } = 56);

wire_struct!(/// ANNOUNCE: an event, multicast by the node it happened on. Sent once when it
    /// happens and repeated a few times with the same `seq` (receivers keep the first).
    AnnounceOut {
        head: OutHead,
        node_id: U64,
        epoch: U64,
        /// Per node and epoch, +1 per announcement (not per repetition).
        seq: U32,
        /// See [`AnnounceKind`].
        kind: u8,
        reserved: u8,
        /// The disk concerned, or ALL_DISKS.
        disk: U16,
        /// Why, in UTF-8, NUL-padded.
        reason: [u8; 64],
        /// The node's name, NUL-padded; all zero if it has none ([`NodeName`]).
        name: [u8; NODE_NAME_MAX],
    } = 128);

impl AnnounceOut {
    pub fn new(
        node_id: u64,
        name: Option<&NodeName>,
        epoch: u64,
        seq: u32,
        kind: AnnounceKind,
        disk: u16,
        reason: &str,
    ) -> AnnounceOut {
        let mut text = [0u8; 64];
        // Cut at a character boundary so the text stays valid UTF-8.
        let mut end = reason.len().min(text.len());
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].copy_from_slice(&reason.as_bytes()[..end]);
        AnnounceOut {
            head: OutHead::new(Status::Success, 0),
            node_id: node_id.into(),
            epoch: epoch.into(),
            seq: seq.into(),
            kind: kind as u8,
            reserved: 0,
            disk: disk.into(),
            reason: text,
            name: NodeName::field(name),
        }
    }

    /// The reason text, up to the first NUL; invalid UTF-8 is replaced, never trusted.
    pub fn reason(&self) -> String {
        let end = self
            .reason
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.reason.len());
        String::from_utf8_lossy(&self.reason[..end]).into_owned()
    }
}

/// What an ANNOUNCE says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AnnounceKind {
    /// A disk went down (I/O errors or an operator): its objects are unavailable here.
    DiskDown = 1,
    /// A disk is back in service.
    DiskUp = 2,
    /// The node crossed a health threshold; managers should look elsewhere.
    NodeFailing = 3,
    /// The node is shutting down cleanly.
    NodeLeaving = 4,
}

impl AnnounceKind {
    pub fn from_u8(v: u8) -> Option<AnnounceKind> {
        match v {
            1 => Some(AnnounceKind::DiskDown),
            2 => Some(AnnounceKind::DiskUp),
            3 => Some(AnnounceKind::NodeFailing),
            4 => Some(AnnounceKind::NodeLeaving),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AnnounceKind::DiskDown => "disk-down",
            AnnounceKind::DiskUp => "disk-up",
            AnnounceKind::NodeFailing => "node-failing",
            AnnounceKind::NodeLeaving => "node-leaving",
        }
    }
}

/// Disk states as carried in DiskStateEntry / DiskStatusEntry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WireDiskState {
    Online = 0,
    Offline = 1,
    Down = 2,
}

impl WireDiskState {
    pub fn from_u8(v: u8) -> Option<WireDiskState> {
        match v {
            0 => Some(WireDiskState::Online),
            1 => Some(WireDiskState::Offline),
            2 => Some(WireDiskState::Down),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WireDiskState::Online => "online",
            WireDiskState::Offline => "offline",
            WireDiskState::Down => "down",
        }
    }
}

/// Everything that can be wrong with bytes on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic 0x{0:08x}: not a DOSP message")]
    BadMagic(u32),
    #[error("bad chunk magic 0x{0:08x}: a STORE chunk was longer or shorter than its header said")]
    BadChunkMagic(u32),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    BadVersion(u8),
    #[error("unexpected message kind {0}")]
    BadKind(u8),
    #[error("unknown flags 0x{0:x}")]
    BadFlags(u32),
    #[error("body of {len} bytes exceeds the maximum of {max}")]
    BodyTooLarge { len: u32, max: u32 },
    #[error("chunk of {len} bytes exceeds the maximum of {max}")]
    ChunkTooLarge { len: u32, max: u32 },
    #[error("{op} body is {got} bytes, expected {want}")]
    BodySize {
        op: &'static str,
        got: usize,
        want: usize,
    },
    #[error("unknown status code {0}")]
    UnknownStatus(u16),
    #[error("response to request {got} while waiting for {want}")]
    RequestIdMismatch { got: u64, want: u64 },
    #[error("response opcode {got} to a {want} request")]
    OpcodeMismatch { got: u16, want: &'static str },
    #[error("stream of {len} bytes exceeds the limit of {max}")]
    StreamTooLarge { len: u64, max: u64 },
    #[error("message truncated")]
    Truncated,
}

impl WireError {
    /// The `detail` a node answers this error with: the offending length for
    /// TOO_LARGE, the version received for BAD_VERSION, else 0.
    pub fn detail(&self) -> u32 {
        match self {
            WireError::BodyTooLarge { len, .. } | WireError::ChunkTooLarge { len, .. } => *len,
            WireError::BadVersion(v) => u32::from(*v),
            _ => 0,
        }
    }

    /// The status a node answers this error with.
    pub fn status(&self) -> Status {
        match self {
            WireError::BadVersion(_) => Status::BadVersion,
            WireError::BodyTooLarge { .. }
            | WireError::ChunkTooLarge { .. }
            | WireError::StreamTooLarge { .. } => Status::TooLarge,
            _ => Status::BadRequest,
        }
    }
}

/// Reads a fixed structure from the front of `body`, requiring the body to be exactly
/// that size (or, with `prefix`, at least that size).
pub fn parse_exact<T: FromBytes + KnownLayout + Immutable>(
    op: Opcode,
    body: &[u8],
) -> Result<&T, WireError> {
    if body.len() != size_of::<T>() {
        return Err(WireError::BodySize {
            op: op.name(),
            got: body.len(),
            want: size_of::<T>(),
        });
    }
    T::ref_from_bytes(body).map_err(|_| WireError::Truncated)
}

/// Reads a fixed structure from the front of `body`, returning it and the rest.
pub fn parse_prefix<T: FromBytes + KnownLayout + Immutable>(
    op: Opcode,
    body: &[u8],
) -> Result<(&T, &[u8]), WireError> {
    T::ref_from_prefix(body).map_err(|_| WireError::BodySize {
        op: op.name(),
        got: body.len(),
        want: size_of::<T>(),
    })
}

/// Reads the status of an Out body (first two bytes of its OutHead).
pub fn out_status(body: &[u8]) -> Result<(Status, u32), WireError> {
    let head = OutHead::ref_from_prefix(body)
        .map_err(|_| WireError::Truncated)?
        .0;
    let status =
        Status::from_u16(head.status.get()).ok_or(WireError::UnknownStatus(head.status.get()))?;
    Ok((status, head.detail.get()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    #[test]
    fn header_round_trip_and_checks() {
        let h = Header::new(Kind::Request, Opcode::Store, 7, 16, 0);
        let bytes = h.as_bytes().to_vec();
        let back = Header::read_from_bytes(&bytes).unwrap();
        assert_eq!(back, h);
        back.check(Kind::Request).unwrap();
        assert_eq!(back.opcode(), Some(Opcode::Store));
        assert_eq!(&bytes[..4], b"DOSP");
        assert_eq!(back.check(Kind::Response), Err(WireError::BadKind(1)));
    }

    #[test]
    fn every_single_bit_flip_in_a_header_is_caught() {
        let h = Header::new(
            Kind::Request,
            Opcode::Retrieve,
            0x0102_0304_0506_0708,
            16,
            0,
        );
        for bit in 0..(Header::SIZE * 8) {
            let mut bytes = h.as_bytes().to_vec();
            bytes[bit / 8] ^= 1 << (bit % 8);
            let flipped = Header::read_from_bytes(&bytes).unwrap();
            assert!(
                flipped.check(Kind::Request).is_err(),
                "bit {bit} flip went unnoticed"
            );
        }
    }

    #[test]
    fn version_is_checked_after_checksum() {
        let mut h = Header::new(Kind::Request, Opcode::Null, 1, 0, 0);
        h.version = 9;
        h.checksum = h.compute_checksum().into();
        assert_eq!(h.check(Kind::Request), Err(WireError::BadVersion(9)));
        assert_eq!(WireError::BadVersion(9).status(), Status::BadVersion);
        assert_eq!(WireError::BadVersion(9).detail(), 9);
        assert_eq!(WireError::HeaderChecksum.detail(), 0);
    }

    #[test]
    fn body_length_is_bounded() {
        let h = Header::new(Kind::Request, Opcode::Null, 1, BODY_MAX + 1, 0);
        assert_eq!(
            h.check(Kind::Request),
            Err(WireError::BodyTooLarge {
                len: BODY_MAX + 1,
                max: BODY_MAX
            })
        );
    }

    #[test]
    fn chunk_header_bounds_and_flags() {
        let c = ChunkHeader::new(100, true);
        c.check(1000).unwrap();
        assert!(c.last());
        assert_eq!(
            c.check(50),
            Err(WireError::ChunkTooLarge { len: 100, max: 50 })
        );
        let mut bad = ChunkHeader::new(1, false);
        bad.flags = 4.into();
        bad.checksum = crc32c(&bad.as_bytes()[..12]).into();
        assert_eq!(bad.check(10), Err(WireError::BadFlags(4)));
    }

    #[test]
    fn store_in_layout_is_the_documented_one() {
        let fp = Fingerprint([0xAB; 16]);
        let req = StoreIn::new(5, Some(0x0102_0304_0506_0708), Some(fp));
        let b = req.as_bytes();
        assert_eq!(b.len(), 40);
        assert_eq!(
            &b[0..8],
            &0x0102_0304_0506_0708u64.to_le_bytes(),
            "known length is the hint"
        );
        assert_eq!(&b[8..12], &3u32.to_le_bytes(), "EXPECT_MD5 | EXPECT_LEN");
        assert_eq!(&b[12..16], &[0; 4]);
        assert_eq!(&b[16..32], &[0xAB; 16]);
        assert_eq!(&b[32..40], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(req.announced_len(), 0x0102_0304_0506_0708);
        assert_eq!((req.expect_md5(), req.unknown_flags()), (Some(fp), 0));

        let hint_only = StoreIn::new(77, None, None);
        assert_eq!(hint_only.as_bytes()[8..], [0; 32]);
        assert_eq!(
            (hint_only.expect_len(), hint_only.expect_md5()),
            (None, None)
        );
        assert_eq!(hint_only.announced_len(), 77);

        // A field whose flag is clear is ignored, whatever it holds.
        let mut odd = StoreIn::read_from_bytes(b).unwrap();
        odd.flags = (STORE_EXPECT_LEN | 0x10).into();
        assert_eq!(odd.expect_md5(), None);
        assert_eq!(odd.expect_len(), Some(0x0102_0304_0506_0708));
        assert_eq!(odd.unknown_flags(), 0x10);
    }

    #[test]
    fn node_names_are_checked_mapped_and_carried() {
        let name = NodeName::new("node-a").unwrap();
        // The documented mapping, pinned: MD5("node-a") = 6cec8a5bb33ae85c…, its first
        // 8 bytes read little-endian.
        assert_eq!(name.node_id(), 0x5ce8_3ab3_5b8a_ec6c);
        let field = NodeName::field(Some(&name));
        assert_eq!(&field[..6], b"node-a");
        assert_eq!(field[6..], [0; 26]);
        assert_eq!(NodeName::from_field(&field), Some(name));
        assert_eq!(NodeName::field(None), [0; 32]);
        assert_eq!(NodeName::from_field(&[0; 32]), None);
        let longest = "x".repeat(32);
        let field = NodeName::field(Some(&NodeName::new(&longest).unwrap()));
        assert_eq!(NodeName::from_field(&field).unwrap().as_str(), longest);

        assert_eq!(NodeName::new(""), Err(NodeNameError::Empty));
        assert_eq!(
            NodeName::new(&"x".repeat(33)),
            Err(NodeNameError::TooLong(33))
        );
        for bad in ["node a", "tab\t", "é", "nul\0", "\x1b[2J"] {
            assert!(NodeName::new(bad).is_err(), "{bad:?}");
        }
        // What a peer sends is never trusted: bytes after the NULs, or unprintable ones.
        let mut field = [0u8; 32];
        field[..2].copy_from_slice(b"ab");
        field[5] = b'c';
        assert_eq!(NodeName::from_field(&field), None);
        field[5] = 0;
        field[1] = 0x1b;
        assert_eq!(NodeName::from_field(&field), None);
    }

    #[test]
    fn name_fields_sit_where_the_document_says() {
        let name = NodeName::new("n").unwrap();
        let mut l = LocateOut::new_zeroed();
        l.name = NodeName::field(Some(&name));
        assert_eq!(l.as_bytes()[48], b'n');
        let mut h = HeartbeatOut::new_zeroed();
        h.name = NodeName::field(Some(&name));
        assert_eq!(h.as_bytes()[80], b'n');
        let a = AnnounceOut::new(1, Some(&name), 2, 3, AnnounceKind::DiskUp, 4, "why");
        assert_eq!(a.as_bytes()[96], b'n');
        assert_eq!(&a.as_bytes()[32..35], b"why");
    }

    #[test]
    fn opcodes_and_statuses_round_trip() {
        for op in Opcode::ALL {
            assert_eq!(Opcode::from_u16(op as u16), Some(op));
        }
        assert_eq!(Opcode::from_u16(12), None);
        for s in Status::ALL {
            assert_eq!(Status::from_u16(s as u16), Some(s));
        }
        assert_eq!(Status::from_u16(999), None);
    }
}
