//! The on-disk format of a dosd disk. This module owns every byte layout the store
//! writes; nothing else in the store touches raw bytes of a superblock or a record
//! header. All integers are little-endian; every fixed structure (superblock, record
//! header, checkpoint header) is a `zerocopy` type with compile-time size checks; the
//! one variable structure, a checkpoint body, is a packed stream described below.
//!
//! # Layout
//!
//! ```text
//! block 0          superblock copy A   (written for even generations)
//! block 1          superblock copy B   (written for odd generations)
//! block 2          checkpoint header, slot 0
//! block 3          checkpoint header, slot 1
//! block 4 ..       checkpoint body, slot 0   (ckpt_blocks blocks)
//! .. 4 + 2n        checkpoint body, slot 1   (ckpt_blocks blocks)
//! 4 + 2n ..        the log: a circular region up to the end of the disk
//! ```
//!
//! The four fixed blocks come first so that open reads both superblock copies and both
//! checkpoint headers in one I/O. `ckpt_blocks` (n above) is chosen at format from the
//! disk size ([`ckpt_body_blocks`]) and recorded in the superblock, so the layout of a
//! formatted disk never depends on this code's arithmetic again.
//!
//! ## Superblock (128 bytes at the start of its block, rest of the block zero)
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `b"DOSDDISK"` |
//! | 8 | 4 | format_version = 4 |
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
//! | 96 | 8 | ckpt_blocks: body blocks of each checkpoint slot |
//! | 104 | 20 | reserved, zero |
//! | 124 | 4 | crc32c of bytes 0..124 |
//!
//! The two copies are updated alternately (generation `g` goes to block `g % 2`) with a
//! flush after each, so a torn superblock write always leaves the other copy intact.
//! A disk whose block 0 is all zero and which holds no valid copy is blank and gets
//! formatted. Format writes copy B (generation 1), flushes, then copy A (generation 2),
//! so a crash during format leaves either a blank disk or a valid copy.
//!
//! This layout is that of one *region* (from version 3 a disk is carved into one
//! region per shard by a label in its block 0; see `label`), with offsets relative to
//! the region's start. Versions 1 (no checkpoint area), 2 (one log over the whole
//! disk) and 3 (no packed records) are refused like any unknown version, naming both
//! versions: none was ever deployed.
//!
//! ## Log records
//!
//! The log holds two kinds of record. A *segment record* starts on a block boundary:
//! one 4096-byte header block followed by `ceil(payload_len / 4096)` payload blocks
//! (the last one zero-padded); a large object's data goes in these, and WRAPs. A
//! *packed record* (see "Packed records" below) is an 80-byte header with up to 16 KiB
//! of data right behind it, at any multiple of 16 bytes: small objects and reference
//! records share blocks this way. A record that does not fit before the end of the
//! disk is preceded by a WRAP record ("continue at the start of the log"); the space
//! after the WRAP is skipped.
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
//! ## Packed records
//!
//! An object of at most 16 KiB (that fits one staging segment) is committed as one
//! packed record, and every REF is one: 80 bytes of header, then the data (none for
//! a REF), the whole padded with zeros to a multiple of 16 bytes. So a 1 KiB object
//! takes 1104 bytes of log, a 4 KiB one 4176.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `b"DOSDPACK"` |
//! | 8 | 8 | nonce = the superblock's log_nonce |
//! | 16 | 8 | seq (shared with segment records: +1 per record) |
//! | 24 | 8 | epoch |
//! | 32 | 8 | durable_seq |
//! | 40 | 1 | kind: COMMIT = 2 (an object, its data follows) or REF = 4 |
//! | 41 | 3 | zero |
//! | 44 | 4 | data_len: the object's length (COMMIT, at most 16384), 0 (REF) |
//! | 48 | 16 | fingerprint |
//! | 64 | 4 | COMMIT: absolute reference count (≥ 1); REF: signed delta |
//! | 68 | 4 | crc32c of the data_len bytes of data |
//! | 72 | 4 | reserved, zero |
//! | 76 | 4 | crc32c of bytes 0..76 |
//!
//! Its write id is its own seq. A packed record's header never straddles two blocks:
//! when fewer than 80 bytes are left in the tail's block the record starts at the next
//! one. Where the log continues after a record ending at `p`: a packed record at `p`,
//! or any record at the next block boundary (a segment record or WRAP always starts
//! on one; the rest of the block before it is skipped). Recovery tries both, in that
//! order, and takes a record only if it carries the next seq (and an epoch no older
//! than the previous record's): a torn or stale record at `p` cannot be skipped over
//! into one written later, since that one's seq would not be the next. Bytes at `p`
//! that look like a header of this log (magic and nonce) but fail its crc end the log
//! there, as a damaged segment header does.
//!
//! *Writing shared blocks.* The tail's block is written again each time records join
//! it, always with the bytes of the records already in it unchanged and zeros after
//! the last. A write of that block waits for the one before it to complete (devices
//! may complete overlapping writes in any order), and records appended meanwhile go out
//! together with it: the group commit of packed records. A rewrite torn by a power cut
//! (in any mix of old and new 512-byte sectors, or within one) leaves the earlier
//! records' bytes as they were, so it can only damage records not yet flushed, which
//! were never acknowledged. At open, the rest of the tail's block after the last record
//! is zeroed on disk, so that nothing past the recovered tail can come back.
//!
//! Why `epoch` and `durable_seq` (beyond the basic design): after a crash the records
//! just past the recovered tail may be stale survivors of unflushed writes. Every open
//! bumps the epoch durably before writing, so such a survivor can never be chained
//! after a record of the new epoch. `durable_seq` lets recovery tell a torn tail (data
//! written after the last completed flush: truncate) from media rot in old data (keep
//! the log; reads report the corruption), and keeps the data verification at start-up
//! down to the last few records even without a checkpoint.
//!
//! ## Index checkpoint
//!
//! Rebuilding the index from the log alone costs one header read per record, minutes
//! on a large disk of small objects. So `Store::checkpoint` saves each disk's part of
//! the index in one of two slots, alternating, and open loads the newest usable slot
//! and replays only the records written after it. A checkpoint is only ever a shortcut:
//! the log from `log_head` still holds everything, so a slot that is torn, rotten,
//! stale or inconsistent is ignored (with a warning) and the full scan used instead.
//!
//! Header (128 bytes at the start of its block, rest of the block zero):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `b"DOSDCKPT"` |
//! | 8 | 4 | slot (0 or 1): where this header is, so where its body is |
//! | 12 | 1 | W: bytes of a block-sized field of the body (see below) |
//! | 13 | 3 | zero |
//! | 16 | 16 | disk identity (= the superblock's) |
//! | 32 | 8 | log_nonce (= the superblock's) |
//! | 40 | 8 | generation: +1 per checkpoint written; the newest usable one wins |
//! | 48 | 8 | seq S: every record with seq < S is reflected in the body, none after |
//! | 56 | 8 | position: byte offset where record S starts (or will start) |
//! | 64 | 8 | epoch of the log when written: records from S on carry no smaller one |
//! | 72 | 8 | objects in the body |
//! | 80 | 8 | pending writes in the body |
//! | 88 | 8 | extents in the body (objects' and pending writes') |
//! | 96 | 8 | body_len: exactly (20 + 2W) × (objects + pending) + (3 + W) × extents |
//! | 104 | 4 | crc32c of the body's body_len bytes |
//! | 108 | 16 | reserved, zero |
//! | 124 | 4 | crc32c of bytes 0..124 |
//!
//! Body: a byte stream (entries may straddle blocks), zero-padded to a whole block. The
//! objects first, then the pending writes, each an entry followed by its extents. All
//! integers little-endian; fields of W bytes hold values that are at most the disk's
//! size in 8-byte units, and W is the fewest bytes that can ([`ckpt_width`]: 3 for
//! disks from 512 KiB to 128 MiB, 4 below 32 GiB, 5 below 8 TiB, 6 beyond), which keeps
//! a small object's entry at 23 + 3W bytes rather than the 44 of plain 64-bit fields:
//!
//! | entry (20 + 2W bytes) | | |
//! | --- | --- | --- |
//! | 0 | 16 | fingerprint (zero for a pending write) |
//! | 16 | W | age: S − write_id, where write_id is the seq of the write's first record |
//! | 16 + W | 4 | refcount (≥ 1 for an object, 0 for a pending write) |
//! | 20 + W | W | number of extents that follow (≥ 1) |
//!
//! | extent (3 + W bytes) | | |
//! | --- | --- | --- |
//! | 0 | W | where its record starts, counted from the start of the log in 16-byte units, times two, plus one for a packed record |
//! | W | 3 | payload bytes of the segment (at most 3.75 MiB < 2^24) or data bytes of the packed record |
//!
//! A packed object's age is written as 1 whatever it is: its record names its
//! fingerprint, which is what reads and compaction check it by, so no write id is kept
//! for it (see `index`). The age fits W bytes because the write's first record is
//! live, so between the head and S, and every record takes at least 80 bytes. A snapshot with a value that does
//! not fit its field anyway (a log written by other software) is not written.
//!
//! An object's length is the sum of its extents, its log footprint the sum of their
//! record sizes, so neither is stored. *Pending writes* are writes still open when the
//! checkpoint was taken: their first segments lie before S and their COMMIT (if it
//! comes) after it, so replay from S must start with those segments already collected,
//! exactly as a full scan would have them at S.
//!
//! Writing (see `checkpoint.rs`): flush the log (records below S are durable); write the
//! body into the slot that does *not* hold the checkpoint in use, then its header; flush.
//! A crash anywhere leaves the other slot intact, and the new one either whole or failing
//! its crcs. Loading: both headers are checked (magic, crc, identity, nonce, counts
//! against the slot size), newest generation first; a slot is usable only while
//! `head_seq ≤ S` (compaction has not moved the head past it) and its epoch is no newer
//! than the superblock's; its body must pass its crc and every entry its bounds. The
//! scan then starts at `position` expecting seq S; if anything from there on disagrees
//! with the superblock (the log ends before `verified_seq`, a durable record is
//! unreadable) the whole open is redone from `log_head`, so a checkpoint can never make
//! recovery trust less of the log than the full scan would.
//!
//! ### Sizing the checkpoint area
//!
//! Packed records leave no useful worst case: a disk full of distinct 1-byte objects
//! (96 bytes of log each) would need a third of the disk per slot. So each slot is sized
//! for one extent per 4 KiB of disk, `(size / 4096 + 1) × (23 + 3W)` bytes of body
//! ([`ckpt_body_blocks`]): enough for a disk full of 4 KiB objects (4176 bytes of log
//! each). For both slots that is 1.6% of a 64 MiB disk (W = 3), 1.9% of a 32 GiB or a
//! 4 TB one (W = 5), 2.0% beyond 8 TiB (W = 6). A snapshot that does not fit (objects
//! smaller than that on average) is skipped with a warning, and the next open uses the
//! previous checkpoint or scans the log: it reads the log block by block, and loses
//! nothing but time.

use zerocopy::little_endian::{I32, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use dosp::Fingerprint;

/// Size of every transfer, record header and superblock slot.
pub const BLOCK: usize = nvme::BLOCK_SIZE;
/// [`BLOCK`] as a byte offset.
pub const BLOCK_U64: u64 = BLOCK as u64;
/// Current format version (4: small objects and reference records packed into shared
/// blocks; 3 gave every record a header block of its own, 2 had one log over the whole
/// disk, 1 no checkpoint area).
pub const FORMAT_VERSION: u32 = 4;
/// Superblock magic.
pub const SB_MAGIC: [u8; 8] = *b"DOSDDISK";
/// Record header magic.
pub const REC_MAGIC: [u8; 8] = *b"DOSDLOG1";
/// Packed record header magic.
pub const PACK_MAGIC: [u8; 8] = *b"DOSDPACK";
/// Bytes of a packed record header.
pub const PACKED_HDR: usize = 80;
/// Packed records start at multiples of this many bytes of the log.
pub const PACK_ALIGN: u64 = 16;
/// Largest object stored as one packed record (larger ones are SEGMENT records).
pub const PACKED_MAX_DATA: usize = 16 << 10;
/// Checkpoint magic.
pub const CKPT_MAGIC: [u8; 8] = *b"DOSDCKPT";
/// Blocks at the start of every disk before the checkpoint bodies: two superblock
/// copies and two checkpoint headers.
pub const FIXED_BLOCKS: u64 = 4;
/// Sequence numbers, epochs and generations grow by one per event: a value above this
/// read from disk is damage (however unlikely past a crc), and would overflow
/// arithmetic.
pub const SEQ_SANE_MAX: u64 = u64::MAX / 4;
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

/// Bytes of log a packed record with `data_len` bytes of data takes: header and data,
/// padded to [`PACK_ALIGN`].
pub fn packed_size(data_len: u64) -> u64 {
    (PACKED_HDR as u64 + data_len).next_multiple_of(PACK_ALIGN)
}

/// Where a packed record of `size` bytes goes when the tail is at `lp`: at `lp`, or
/// at the next block boundary when its header would not fit in the rest of the block
/// (a header never straddles two blocks).
pub fn packed_start(lp: u64) -> u64 {
    let into = lp % BLOCK_U64;
    if into != 0 && into + PACKED_HDR as u64 > BLOCK_U64 {
        lp.next_multiple_of(BLOCK_U64)
    } else {
        lp
    }
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
    ckpt_blocks: U64,
    reserved: [u8; 20],
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
    /// Body blocks of each checkpoint slot (fixed at format).
    pub ckpt_blocks: u64,
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
            ckpt_blocks: U64::new(self.ckpt_blocks),
            reserved: [0; 20],
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
            ckpt_blocks: raw.ckpt_blocks.get(),
        })
    }

    /// The disk's layout, if the recorded sizes are consistent (a checkpoint area that
    /// leaves no log, or arithmetic that would overflow, is not).
    pub fn geometry(&self) -> Option<Geometry> {
        let size_blocks = self.size_bytes / BLOCK_U64;
        let log_start_blocks = self.ckpt_blocks.checked_mul(2)?.checked_add(FIXED_BLOCKS)?;
        (log_start_blocks < size_blocks).then_some(Geometry {
            size_bytes: size_blocks * BLOCK_U64,
            ckpt_blocks: self.ckpt_blocks,
        })
    }
}

/// Where everything lives on one disk (see the layout in the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// A multiple of [`BLOCK`].
    pub size_bytes: u64,
    /// Body blocks of each checkpoint slot.
    pub ckpt_blocks: u64,
}

impl Geometry {
    /// The layout a disk of `size_bytes` gets at format.
    pub fn for_size(size_bytes: u64) -> Geometry {
        Geometry {
            size_bytes: size_bytes - size_bytes % BLOCK_U64,
            ckpt_blocks: ckpt_body_blocks(size_bytes),
        }
    }

    /// Byte offset of checkpoint slot `slot`'s header block.
    pub fn ckpt_header(&self, slot: u8) -> u64 {
        (2 + u64::from(slot & 1)) * BLOCK_U64
    }

    /// Byte offset of checkpoint slot `slot`'s body.
    pub fn ckpt_body(&self, slot: u8) -> u64 {
        (FIXED_BLOCKS + u64::from(slot & 1) * self.ckpt_blocks) * BLOCK_U64
    }

    /// Bytes one checkpoint body may take.
    pub fn ckpt_body_bytes(&self) -> u64 {
        self.ckpt_blocks * BLOCK_U64
    }

    /// First byte of the log.
    pub fn log_start(&self) -> u64 {
        (FIXED_BLOCKS + 2 * self.ckpt_blocks) * BLOCK_U64
    }

    /// Bytes of the log.
    pub fn log_len(&self) -> u64 {
        self.size_bytes.saturating_sub(self.log_start())
    }
}

/// W: bytes of the position-sized fields of a checkpoint body on a disk of
/// `size_bytes`, the fewest that hold any offset of the disk in units of 8 bytes (a
/// record position in [`PACK_ALIGN`] units with one bit more; see the module doc).
pub fn ckpt_width(size_bytes: u64) -> u8 {
    let units = size_bytes / (PACK_ALIGN / 2);
    let bits = u64::BITS - units.leading_zeros();
    // At most 8 (a u64 has 64 bits), at least 1.
    bits.div_ceil(8).max(1) as u8
}

/// Bytes of a checkpoint entry (object or pending write) without its extents.
pub fn ckpt_entry_bytes(width: u8) -> u64 {
    16 + 4 + 2 * u64::from(width)
}

/// Bytes of one extent in a checkpoint body.
pub fn ckpt_extent_bytes(width: u8) -> u64 {
    CKPT_LEN_BYTES as u64 + u64::from(width)
}

/// Bytes of an extent's payload length in a checkpoint body.
pub const CKPT_LEN_BYTES: usize = 3;
const _: () = assert!(MAX_SEGMENT_BYTES < 1 << (8 * CKPT_LEN_BYTES));

/// The largest value a field of `width` bytes holds.
pub fn ckpt_field_max(width: u8) -> u64 {
    match width {
        0 => 0,
        1..=7 => (1u64 << (8 * u32::from(width))) - 1,
        _ => u64::MAX,
    }
}

/// Extents a checkpoint slot of a disk of `size_bytes` is sized for: one per 4 KiB of
/// disk (see "Sizing the checkpoint area"; a disk of smaller objects than that on
/// average outgrows it, and its snapshots are skipped).
pub fn ckpt_extents_max(size_bytes: u64) -> u64 {
    size_bytes / BLOCK_U64 + 1
}

/// Body blocks per checkpoint slot for a disk of `size_bytes`: the worst case of one
/// entry per extent.
pub fn ckpt_body_blocks(size_bytes: u64) -> u64 {
    let w = ckpt_width(size_bytes);
    let per_extent = ckpt_entry_bytes(w) + ckpt_extent_bytes(w);
    (ckpt_extents_max(size_bytes) * per_extent).div_ceil(BLOCK_U64)
}

/// Appends `value` as `width` little-endian bytes. The caller has checked that it fits
/// ([`ckpt_field_max`]).
pub fn put_uint(out: &mut Vec<u8>, value: u64, width: u8) {
    out.extend_from_slice(&value.to_le_bytes()[..usize::from(width.min(8))]);
}

/// Reads a little-endian unsigned integer of up to 8 bytes (extra bytes are ignored).
pub fn get_uint(bytes: &[u8]) -> u64 {
    let mut le = [0u8; 8];
    let n = bytes.len().min(8);
    le[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(le)
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct CkptHeaderRaw {
    magic: [u8; 8],
    slot: U32,
    width: u8,
    zero: [u8; 3],
    identity: [u8; 16],
    log_nonce: U64,
    generation: U64,
    seq: U64,
    position: U64,
    epoch: U64,
    objects: U64,
    pending: U64,
    extents: U64,
    body_len: U64,
    body_crc: U32,
    reserved: [u8; 16],
    crc: U32,
}

const CKPT_HDR_SIZE: usize = 128;
const CKPT_HDR_CRC_AT: usize = CKPT_HDR_SIZE - 4;
const _: () = assert!(size_of::<CkptHeaderRaw>() == CKPT_HDR_SIZE);
const _: () = assert!(CKPT_HDR_SIZE <= BLOCK);

/// A checkpoint header, decoded. Only its own integrity is checked by
/// [`CkptHeader::decode`]; whether it fits the disk and the log is the loader's call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CkptHeader {
    pub slot: u8,
    /// W, the width of the body's block-sized fields.
    pub width: u8,
    pub identity: [u8; 16],
    pub log_nonce: u64,
    pub generation: u64,
    pub seq: u64,
    pub position: u64,
    pub epoch: u64,
    pub objects: u64,
    pub pending: u64,
    pub extents: u64,
    pub body_len: u64,
    pub body_crc: u32,
}

impl CkptHeader {
    /// Encodes into a whole block (the rest of the block is zeroed).
    pub fn encode(&self, block: &mut [u8]) {
        block.fill(0);
        let mut raw = CkptHeaderRaw {
            magic: CKPT_MAGIC,
            slot: U32::new(u32::from(self.slot)),
            width: self.width,
            zero: [0; 3],
            identity: self.identity,
            log_nonce: U64::new(self.log_nonce),
            generation: U64::new(self.generation),
            seq: U64::new(self.seq),
            position: U64::new(self.position),
            epoch: U64::new(self.epoch),
            objects: U64::new(self.objects),
            pending: U64::new(self.pending),
            extents: U64::new(self.extents),
            body_len: U64::new(self.body_len),
            body_crc: U32::new(self.body_crc),
            reserved: [0; 16],
            crc: U32::new(0),
        };
        raw.crc = U32::new(crc32c::crc32c(&raw.as_bytes()[..CKPT_HDR_CRC_AT]));
        block[..CKPT_HDR_SIZE].copy_from_slice(raw.as_bytes());
    }

    /// Decodes a header block: `None` unless magic and crc match and the slot number is
    /// one of the two. Never panics, whatever the bytes.
    pub fn decode(block: &[u8]) -> Option<CkptHeader> {
        let (raw, _) = CkptHeaderRaw::ref_from_prefix(block).ok()?;
        if raw.magic != CKPT_MAGIC
            || crc32c::crc32c(&raw.as_bytes()[..CKPT_HDR_CRC_AT]) != raw.crc.get()
        {
            return None;
        }
        let slot = u8::try_from(raw.slot.get()).ok().filter(|&s| s < 2)?;
        Some(CkptHeader {
            slot,
            width: raw.width,
            identity: raw.identity,
            log_nonce: raw.log_nonce.get(),
            generation: raw.generation.get(),
            seq: raw.seq.get(),
            position: raw.position.get(),
            epoch: raw.epoch.get(),
            objects: raw.objects.get(),
            pending: raw.pending.get(),
            extents: raw.extents.get(),
            body_len: raw.body_len.get(),
            body_crc: raw.body_crc.get(),
        })
    }

    /// The body length the counts imply (`None` on overflow): a header whose
    /// `body_len` differs is malformed.
    pub fn implied_body_len(&self) -> Option<u64> {
        let entries = self.objects.checked_add(self.pending)?;
        entries
            .checked_mul(ckpt_entry_bytes(self.width))?
            .checked_add(self.extents.checked_mul(ckpt_extent_bytes(self.width))?)
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

/// A packed record header, exactly as on disk (see the module doc, "Packed records").
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PackedHeader {
    pub magic: [u8; 8],
    pub nonce: U64,
    pub seq: U64,
    pub epoch: U64,
    pub durable_seq: U64,
    pub kind: u8,
    pub pad: [u8; 3],
    pub data_len: U32,
    pub fingerprint: [u8; 16],
    /// COMMIT: the absolute refcount; REF: the signed delta (two's complement).
    pub count: U32,
    pub data_crc: U32,
    pub reserved: [u8; 4],
    pub crc: U32,
}

const PACKED_CRC_AT: usize = PACKED_HDR - 4;
const _: () = assert!(size_of::<PackedHeader>() == PACKED_HDR);
const _: () = assert!((PACKED_HDR as u64).is_multiple_of(PACK_ALIGN));
const _: () = assert!(BLOCK_U64.is_multiple_of(PACK_ALIGN));

impl std::fmt::Debug for PackedHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedHeader")
            .field("seq", &self.seq.get())
            .field("epoch", &self.epoch.get())
            .field("kind", &self.kind)
            .field("data_len", &self.data_len.get())
            .finish_non_exhaustive()
    }
}

impl PackedHeader {
    /// A COMMIT of a whole object whose `data` follows the header.
    pub fn commit(fp: &Fingerprint, data: &[u8], refcount: u32) -> PackedHeader {
        let mut h = PackedHeader::new_zeroed();
        h.kind = kind::COMMIT;
        h.fingerprint = fp.0;
        h.data_len = U32::new(data.len() as u32);
        h.count = U32::new(refcount);
        h.data_crc = U32::new(crc32c::crc32c(data));
        h
    }

    /// A REF applying `delta` to the refcount of `fp`.
    pub fn reference(fp: &Fingerprint, delta: i32) -> PackedHeader {
        let mut h = PackedHeader::new_zeroed();
        h.kind = kind::REF;
        h.fingerprint = fp.0;
        h.count = U32::new(delta as u32);
        h.data_crc = U32::new(crc32c::crc32c(&[]));
        h
    }

    /// Fills magic and the header crc; everything else must be set.
    pub fn seal(&mut self) {
        self.magic = PACK_MAGIC;
        self.crc = U32::new(crc32c::crc32c(&self.as_bytes()[..PACKED_CRC_AT]));
    }

    /// Validates a packed header on its own (not its place in the log): magic, nonce,
    /// crc, kind and lengths. `None` for anything that is not one of this log.
    pub fn check(bytes: &[u8], nonce: u64) -> Option<&PackedHeader> {
        let bytes = bytes.get(..PACKED_HDR)?;
        let h = PackedHeader::ref_from_bytes(bytes).ok()?;
        if h.magic != PACK_MAGIC
            || h.nonce.get() != nonce
            || crc32c::crc32c(&bytes[..PACKED_CRC_AT]) != h.crc.get()
        {
            return None;
        }
        let len = h.data_len.get() as usize;
        let ok = match h.kind {
            kind::COMMIT => len <= PACKED_MAX_DATA && h.count.get() != 0,
            kind::REF => len == 0,
            _ => false,
        };
        ok.then_some(h)
    }

    /// Whether `bytes` start like a packed header of this log (magic and nonce), valid
    /// or not: what a damaged one looks like, as opposed to zeros or old data.
    pub fn looks_like(bytes: &[u8], nonce: u64) -> bool {
        bytes.len() >= 16 && bytes[..8] == PACK_MAGIC && bytes[8..16] == nonce.to_le_bytes()
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint(self.fingerprint)
    }

    /// The REF delta.
    pub fn delta(&self) -> i32 {
        self.count.get() as i32
    }

    /// Bytes of log this record takes.
    pub fn size(&self) -> u64 {
        packed_size(u64::from(self.data_len.get()))
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
            log_head: 2 * BLOCK_U64,
            head_seq: 1,
            verified_seq: 1,
            epoch: 1,
            generation: 3,
            ckpt_blocks: 9,
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
        block[8] = 1;
        assert_eq!(Superblock::decode(&block), SbSlot::UnknownVersion(1));
        block[8] = 2;
        assert_eq!(Superblock::decode(&block), SbSlot::UnknownVersion(2));
        block[8] = 3;
        assert_eq!(Superblock::decode(&block), SbSlot::UnknownVersion(3));
        block[8] = 5;
        assert_eq!(Superblock::decode(&block), SbSlot::UnknownVersion(5));
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

    #[test]
    fn geometry_and_sizing() {
        // A 512 KiB disk: sized for 129 extents of 32 bytes: two blocks per slot.
        let g = Geometry::for_size(512 * 1024);
        assert_eq!(ckpt_extents_max(512 * 1024), 129);
        assert_eq!(ckpt_width(512 * 1024), 3);
        assert_eq!(g.ckpt_blocks, 2);
        assert_eq!(g.ckpt_header(0), 2 * BLOCK_U64);
        assert_eq!(g.ckpt_header(1), 3 * BLOCK_U64);
        assert_eq!(g.ckpt_body(0), 4 * BLOCK_U64);
        assert_eq!(g.ckpt_body(1), 6 * BLOCK_U64);
        assert_eq!(g.log_start(), 8 * BLOCK_U64);
        assert_eq!(g.log_len(), 512 * 1024 - 8 * BLOCK_U64);
        // The widths and shares the module doc promises.
        for (size, width, share) in [
            (64u64 << 20, 3, 0.0157),
            (32 << 30, 5, 0.0185),
            (4_000_000_000_000, 5, 0.0185),
            (20 << 40, 6, 0.0200),
        ] {
            assert_eq!(ckpt_width(size), width, "{size}");
            let got = 2.0 * Geometry::for_size(size).ckpt_body_bytes() as f64 / size as f64;
            // (Whole blocks per slot: a little more on a small disk.)
            assert!(
                (share - 0.0001..share + 0.0002).contains(&got),
                "{size}: {got}"
            );
        }
        assert_eq!(ckpt_width((128 << 20) - 4096), 3);
        assert_eq!(ckpt_width(128 << 20), 4);
        // Every record position (in 16-byte units, one bit more) fits W bytes.
        for size in [4096u64, 1 << 20, 127 << 20, 128 << 20, 1 << 40, u64::MAX] {
            assert!(
                (size / PACK_ALIGN) << 1 <= ckpt_field_max(ckpt_width(size)),
                "{size}"
            );
        }
        // The superblock's record of it is checked before use.
        let mut s = sb();
        assert_eq!(
            s.geometry(),
            Some(Geometry {
                size_bytes: 1 << 20,
                ckpt_blocks: 9
            })
        );
        s.ckpt_blocks = 126; // 4 + 252 = all 256 blocks: no log left
        assert_eq!(s.geometry(), None);
        s.ckpt_blocks = u64::MAX / 2 + 1;
        assert_eq!(s.geometry(), None);
    }

    fn ckpt() -> CkptHeader {
        CkptHeader {
            slot: 1,
            width: 2,
            identity: [3; 16],
            log_nonce: 77,
            generation: 5,
            seq: 100,
            position: 8 * BLOCK_U64,
            epoch: 4,
            objects: 2,
            pending: 1,
            extents: 4,
            body_len: 3 * 24 + 4 * 5,
            body_crc: 0x1234_5678,
        }
    }

    #[test]
    fn checkpoint_header_round_trips() {
        let mut block = vec![0xffu8; BLOCK];
        ckpt().encode(&mut block);
        assert_eq!(CkptHeader::decode(&block), Some(ckpt()));
        assert_eq!(ckpt().implied_body_len(), Some(ckpt().body_len));
        assert!(block[CKPT_HDR_SIZE..].iter().all(|&b| b == 0));
    }

    #[test]
    fn checkpoint_header_rejects_damage() {
        let mut block = vec![0u8; BLOCK];
        assert_eq!(CkptHeader::decode(&block), None);
        assert_eq!(CkptHeader::decode(&block[..3]), None);
        for at in [0, 20, 50, 100, 126] {
            ckpt().encode(&mut block);
            block[at] ^= 4;
            assert_eq!(CkptHeader::decode(&block), None, "byte {at}");
        }
        // A well-sealed header naming a third slot is refused too.
        let mut h = ckpt();
        h.slot = 2;
        h.encode(&mut block);
        assert_eq!(CkptHeader::decode(&block), None);
        let mut h = ckpt();
        h.objects = u64::MAX;
        assert_eq!(h.implied_body_len(), None);
    }

    #[test]
    fn body_integers_round_trip() {
        for width in 1..=8u8 {
            for v in [0, 1, 255, 256, 65_535, 1 << 30, u64::MAX]
                .into_iter()
                .filter(|&v| v <= ckpt_field_max(width))
            {
                let mut out = Vec::new();
                put_uint(&mut out, v, width);
                assert_eq!(out.len(), usize::from(width));
                assert_eq!(get_uint(&out), v);
            }
        }
        assert_eq!(ckpt_field_max(2), 65_535);
        assert_eq!(ckpt_field_max(8), u64::MAX);
        assert_eq!(
            get_uint(&[1, 2, 3, 4, 5, 6, 7, 8, 9]),
            0x0807_0605_0403_0201
        );
    }
}
