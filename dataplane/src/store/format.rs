//! The on-disk format of a dosd disk. This module owns every byte layout the store
//! writes; nothing else in the store touches raw bytes of a superblock or a record
//! header. All integers are little-endian; all structures are fixed-size
//! (`zerocopy`), with compile-time size checks.
//!
//! # Layout
//!
//! ```text
//! block 0   superblock copy A   (written for even generations)
//! block 1   superblock copy B   (written for odd generations)
//! block 2.. the log: a circular region up to the end of the disk
//! ```
//!
//! ## Superblock (128 bytes at the start of its block, rest of the block zero)
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `b"DOSDDISK"` |
//! | 8 | 4 | format_version = 1 |
//! | 12 | 4 | block_size = 4096 |
//! | 16 | 16 | disk identity (random at format; the disk's serial number) |
//! | 32 | 8 | node_id of the node that formatted the disk |
//! | 40 | 8 | size_bytes the log was laid out for |
//! | 48 | 8 | log_nonce (random at format, carried by every record) |
//! | 56 | 8 | log_head: byte offset of the oldest record still needed |
//! | 64 | 8 | head_seq: seq of the record at log_head |
//! | 72 | 8 | verified_seq: every record with a smaller seq is known durable |
//! | 80 | 8 | epoch: records written from now on carry this epoch (see below) |
//! | 88 | 8 | generation: +1 per update; the valid copy with the highest wins |
//! | 96 | 28 | reserved, zero |
//! | 124 | 4 | crc32c of bytes 0..124 |
//!
//! The two copies are updated alternately (generation `g` goes to block `g % 2`) with a
//! flush after each, so a torn superblock write always leaves the other copy intact.
//! A disk whose block 0 is all zero and which holds no valid copy is blank and gets
//! formatted. Format writes copy B (generation 1), flushes, then copy A (generation 2),
//! so a crash during format leaves either a blank disk or a valid copy.
//!
//! ## Log records
//!
//! Records are appended at the tail, each starting on a block boundary: one 4096-byte
//! header block followed by `ceil(payload_len / 4096)` payload blocks (the last one
//! zero-padded). A record that does not fit before the end of the disk is preceded by a
//! WRAP record ("continue at block 2"); the space after the WRAP is skipped.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `b"DOSDLOG1"` |
//! | 8 | 8 | nonce = the superblock's log_nonce |
//! | 16 | 8 | seq: +1 per record, never reused |
//! | 24 | 8 | epoch: the superblock's epoch when the record was written |
//! | 32 | 8 | durable_seq: every record with a smaller seq was durable when this one was written |
//! | 40 | 8 | write_id: the store this record belongs to (= seq of its first record) |
//! | 48 | 1 | kind: bit set of SEGMENT=1, COMMIT=2, REF=4, WRAP=8 (valid: 1, 2, 3, 4, 8) |
//! | 49 | 3 | zero |
//! | 52 | 4 | payload_len: bytes of payload actually used (0 unless SEGMENT) |
//! | 56 | 16 | COMMIT, REF: fingerprint |
//! | 72 | 8 | COMMIT: total object length |
//! | 80 | 4 | COMMIT: absolute reference count |
//! | 84 | 4 | REF: signed reference count delta |
//! | 88 | 40 | reserved, zero |
//! | 128 | 3840 | SEGMENT: crc32c of each 4 KiB payload block (up to 960 blocks, 3.75 MiB) |
//! | 3968 | 124 | reserved, zero |
//! | 4092 | 4 | crc32c of bytes 0..4092 |
//!
//! A header is valid only if magic, nonce and crc match, the kind is known, the seq is
//! the one expected after the previous record and the epoch does not go backwards
//! (nor past the superblock's). Payload bytes are never parsed: client data can
//! contain anything, but it cannot contain a valid header without the nonce, which
//! never leaves the disk.
//!
//! An object is its write's SEGMENT records in order, the last one carrying COMMIT
//! (`SEGMENT|COMMIT`, so a small object is one write: header + data). A COMMIT of a
//! fingerprint already known *sets* the refcount (compaction re-appends live objects
//! this way), a REF applies a delta (dedup +1, delete −1; at zero the object is gone).
//!
//! Why `epoch` and `durable_seq` (beyond the basic design): after a crash the records
//! just past the recovered tail may be stale survivors of unflushed writes. Every open
//! bumps the epoch durably before writing, so such a survivor can never be chained
//! after a record of the new epoch. `durable_seq` lets recovery tell a torn tail (data
//! written after the last completed flush: truncate) from media rot in old data (keep
//! the log; reads report the corruption), and keeps the data verification at start-up
//! down to the last few records even without a checkpoint.

use zerocopy::little_endian::{I32, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use dosp::Fingerprint;

/// Size of every transfer, record header and superblock slot.
pub const BLOCK: usize = nvme::BLOCK_SIZE;
/// [`BLOCK`] as a byte offset.
pub const BLOCK_U64: u64 = BLOCK as u64;
/// Current (and only) format version.
pub const FORMAT_VERSION: u32 = 1;
/// Superblock magic.
pub const SB_MAGIC: [u8; 8] = *b"DOSDDISK";
/// Record header magic.
pub const REC_MAGIC: [u8; 8] = *b"DOSDLOG1";
/// First byte of the log (after the two superblock copies).
pub const LOG_START: u64 = 2 * BLOCK_U64;
/// Most payload blocks one record can describe (its block CRCs fill the header).
pub const MAX_SEGMENT_BLOCKS: usize = 960;
/// Most payload bytes of one record.
pub const MAX_SEGMENT_BYTES: usize = MAX_SEGMENT_BLOCKS * BLOCK;

/// Record kinds (bits of the `kind` byte).
pub mod kind {
    pub const SEGMENT: u8 = 1;
    pub const COMMIT: u8 = 2;
    pub const REF: u8 = 4;
    pub const WRAP: u8 = 8;

    /// The combinations a writer produces.
    pub fn is_known(kind: u8) -> bool {
        matches!(kind, 1..=4 | 8)
    }
}

/// Bytes of a record holding `payload_len` bytes of payload: header + padded payload.
pub fn record_size(payload_len: u64) -> u64 {
    BLOCK_U64 + payload_len.div_ceil(BLOCK_U64) * BLOCK_U64
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct SuperblockRaw {
    magic: [u8; 8],
    format_version: U32,
    block_size: U32,
    identity: [u8; 16],
    node_id: U64,
    size_bytes: U64,
    log_nonce: U64,
    log_head: U64,
    head_seq: U64,
    verified_seq: U64,
    epoch: U64,
    generation: U64,
    reserved: [u8; 28],
    crc: U32,
}

const SB_SIZE: usize = 128;
const SB_CRC_AT: usize = SB_SIZE - 4;
const _: () = assert!(size_of::<SuperblockRaw>() == SB_SIZE);

/// The superblock, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub identity: [u8; 16],
    pub node_id: u64,
    pub size_bytes: u64,
    pub log_nonce: u64,
    pub log_head: u64,
    pub head_seq: u64,
    pub verified_seq: u64,
    pub epoch: u64,
    pub generation: u64,
}

/// What one superblock slot holds.
#[derive(Debug, PartialEq, Eq)]
pub enum SbSlot {
    Valid(Superblock),
    /// Our magic, another format version: written by software we do not understand.
    UnknownVersion(u32),
    /// Anything else: zeros, torn or rotten bytes.
    Invalid,
}

impl Superblock {
    /// Block index of the copy a superblock of this generation lives in.
    pub fn slot(&self) -> u64 {
        self.generation % 2
    }

    /// Encodes into a whole block (the rest of the block is zeroed).
    pub fn encode(&self, block: &mut [u8]) {
        block.fill(0);
        let mut raw = SuperblockRaw {
            magic: SB_MAGIC,
            format_version: U32::new(FORMAT_VERSION),
            block_size: U32::new(BLOCK as u32),
            identity: self.identity,
            node_id: U64::new(self.node_id),
            size_bytes: U64::new(self.size_bytes),
            log_nonce: U64::new(self.log_nonce),
            log_head: U64::new(self.log_head),
            head_seq: U64::new(self.head_seq),
            verified_seq: U64::new(self.verified_seq),
            epoch: U64::new(self.epoch),
            generation: U64::new(self.generation),
            reserved: [0; 28],
            crc: U32::new(0),
        };
        raw.crc = U32::new(crc32c::crc32c(&raw.as_bytes()[..SB_CRC_AT]));
        block[..SB_SIZE].copy_from_slice(raw.as_bytes());
    }

    /// Decodes one slot. Never panics, whatever the bytes.
    pub fn decode(block: &[u8]) -> SbSlot {
        let Ok((raw, _)) = SuperblockRaw::ref_from_prefix(block) else {
            return SbSlot::Invalid;
        };
        if raw.magic != SB_MAGIC {
            return SbSlot::Invalid;
        }
        // Checked before the crc: a later version may place its crc elsewhere, and
        // "unknown version" is the more useful diagnosis either way.
        let version = raw.format_version.get();
        if version != FORMAT_VERSION {
            return SbSlot::UnknownVersion(version);
        }
        if crc32c::crc32c(&raw.as_bytes()[..SB_CRC_AT]) != raw.crc.get()
            || raw.block_size.get() as usize != BLOCK
        {
            return SbSlot::Invalid;
        }
        SbSlot::Valid(Superblock {
            identity: raw.identity,
            node_id: raw.node_id.get(),
            size_bytes: raw.size_bytes.get(),
            log_nonce: raw.log_nonce.get(),
            log_head: raw.log_head.get(),
            head_seq: raw.head_seq.get(),
            verified_seq: raw.verified_seq.get(),
            epoch: raw.epoch.get(),
            generation: raw.generation.get(),
        })
    }
}

/// A record header block, exactly as on disk.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RecordHeader {
    pub magic: [u8; 8],
    pub nonce: U64,
    pub seq: U64,
    pub epoch: U64,
    pub durable_seq: U64,
    pub write_id: U64,
    pub kind: u8,
    pub pad: [u8; 3],
    pub payload_len: U32,
    pub fingerprint: [u8; 16],
    pub object_len: U64,
    pub refcount: U32,
    pub delta: I32,
    pub reserved: [u8; 40],
    pub block_crcs: [U32; MAX_SEGMENT_BLOCKS],
    pub reserved2: [u8; 124],
    pub crc: U32,
}

const HDR_CRC_AT: usize = BLOCK - 4;
const _: () = assert!(size_of::<RecordHeader>() == BLOCK);

impl std::fmt::Debug for RecordHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordHeader")
            .field("seq", &self.seq.get())
            .field("epoch", &self.epoch.get())
            .field("kind", &self.kind)
            .field("write_id", &self.write_id.get())
            .field("payload_len", &self.payload_len.get())
            .finish_non_exhaustive()
    }
}

impl RecordHeader {
    /// A zeroed header of the given kind, to be filled by the caller and sealed by the
    /// volume when it knows the seq.
    pub fn new(kind: u8) -> RecordHeader {
        let mut h = RecordHeader::new_zeroed();
        h.kind = kind;
        h
    }

    /// A COMMIT header's payload fields.
    pub fn set_commit(&mut self, fp: &Fingerprint, object_len: u64, refcount: u32) {
        self.fingerprint = fp.0;
        self.object_len = U64::new(object_len);
        self.refcount = U32::new(refcount);
    }

    /// Fills magic and the header crc; everything else must be set.
    pub fn seal(&mut self) {
        self.magic = REC_MAGIC;
        self.crc = U32::new(crc32c::crc32c(&self.as_bytes()[..HDR_CRC_AT]));
    }

    /// Validates a header block on its own (not its place in the log): magic, nonce,
    /// crc, kind and lengths. `None` for anything that is not a record of this log.
    pub fn check(block: &[u8], nonce: u64) -> Option<&RecordHeader> {
        let bytes = block.get(..BLOCK)?;
        let h = RecordHeader::ref_from_bytes(bytes).ok()?;
        if h.magic != REC_MAGIC
            || h.nonce.get() != nonce
            || crc32c::crc32c(&bytes[..HDR_CRC_AT]) != h.crc.get()
            || !kind::is_known(h.kind)
        {
            return None;
        }
        let len = h.payload_len.get() as usize;
        if len > MAX_SEGMENT_BYTES || (h.kind & kind::SEGMENT == 0 && len != 0) {
            return None;
        }
        if h.kind & kind::COMMIT != 0 && h.refcount.get() == 0 {
            return None;
        }
        Some(h)
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint(self.fingerprint)
    }

    /// CRC of payload block `i`.
    pub fn block_crc(&self, i: usize) -> Option<u32> {
        self.block_crcs.get(i).map(|c| c.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        Superblock {
            identity: [7; 16],
            node_id: 42,
            size_bytes: 1 << 20,
            log_nonce: 0xdead_beef,
            log_head: LOG_START,
            head_seq: 1,
            verified_seq: 1,
            epoch: 1,
            generation: 3,
        }
    }

    #[test]
    fn superblock_round_trips() {
        let mut block = vec![0xffu8; BLOCK];
        sb().encode(&mut block);
        assert_eq!(Superblock::decode(&block), SbSlot::Valid(sb()));
        assert!(block[SB_SIZE..].iter().all(|&b| b == 0));
    }

    #[test]
    fn superblock_rejects_damage() {
        let mut block = vec![0u8; BLOCK];
        assert_eq!(Superblock::decode(&block), SbSlot::Invalid);
        sb().encode(&mut block);
        block[40] ^= 1;
        assert_eq!(Superblock::decode(&block), SbSlot::Invalid);
        sb().encode(&mut block);
        block[8] = 2;
        assert_eq!(Superblock::decode(&block), SbSlot::UnknownVersion(2));
        assert_eq!(Superblock::decode(&block[..10]), SbSlot::Invalid);
    }

    #[test]
    fn header_seal_and_check() {
        let mut h = RecordHeader::new(kind::SEGMENT | kind::COMMIT);
        h.nonce = U64::new(9);
        h.payload_len = U32::new(5000);
        h.set_commit(&Fingerprint([1; 16]), 5000, 1);
        h.seal();
        let mut block = h.as_bytes().to_vec();
        assert!(RecordHeader::check(&block, 9).is_some());
        assert!(RecordHeader::check(&block, 8).is_none(), "wrong nonce");
        block[100] ^= 0x10;
        assert!(RecordHeader::check(&block, 9).is_none(), "bad crc");
        let mut h = RecordHeader::new(kind::REF);
        h.payload_len = U32::new(1);
        h.seal();
        assert!(
            RecordHeader::check(h.as_bytes(), 0).is_none(),
            "payload on a REF"
        );
        let mut h = RecordHeader::new(5);
        h.seal();
        assert!(
            RecordHeader::check(h.as_bytes(), 0).is_none(),
            "unknown kind"
        );
    }

    #[test]
    fn record_sizes() {
        assert_eq!(record_size(0), 4096);
        assert_eq!(record_size(1), 8192);
        assert_eq!(record_size(4096), 8192);
        assert_eq!(record_size(4097), 12288);
    }
}
