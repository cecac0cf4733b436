//! The object store: content-addressed immutable objects, one circular log per disk
//! (in the manner of Haystack and Bitcask volumes), several disks per node, dedup by
//! fingerprint with reference counts.
//!
//! This module owns the public API a dataplane loop calls (from its own thread; with
//! several loops each owns one `Store` over its own region of every disk, and
//! `server::shards` keeps the index exact across them), that shard's in-memory index
//! (fingerprint → disk, length, refcount, extents) and the in-flight writes. [`format`] owns the bytes on disk,
//! `volume` one disk's log and its recovery, `compact` the reclaiming of space.
//!
//! # Reads
//! A read is never copied by the store: [`Store::read_take`] checks each block the
//! device read against its CRC in place and lends the device's buffers as a
//! [`Piece`] (ranges of them, in object order); a cache hit lends the cache entry
//! (shared). The caller sends from the piece and gives it back with
//! [`Store::read_give`]. Filling the hot-object cache copies a small object once.
//!
//! # Writes
//! A STORE arrives as chunks of unknown total length, several interleaved. Each
//! in-flight write has a staging buffer of `segment_bytes` (plus one header block in
//! front, so a segment goes to disk in one write); [`Store::append`] copies a chunk
//! into it 4 KiB at most at a time and feeds that slice to MD5 and to the running
//! CRC32C of its block while it is still in cache: the one copy of a STORE's bytes
//! (the receive buffer's to the device's; counted in `crate::copies`). A full buffer is written as a
//! SEGMENT record (not flushed). [`Store::commit`] finishes the MD5: if the fingerprint
//! is known, the staged tail is dropped and a REF +1 record is written instead;
//! otherwise the staged tail goes out as a SEGMENT|COMMIT record — or, for an object of
//! at most 16 KiB that never filled a segment, as one packed record copied into its
//! disk's tail block image (a second copy; see format.rs, "Packed records"). REFs are
//! packed records too. Either way the commit
//! is acknowledged ([`StoreEvent::Committed`]) only once a flush that covers its record
//! has completed (group commit, see `aio`; the blocking [`Store::commit`] waits for
//! it) — from then on the object survives power loss.
//! A write with no room on any disk (or that runs out of it) goes on hashing without
//! writing, so that a duplicate still gets its reference at commit (see `room`).
//!
//! # Recovery
//! At open each disk's index is loaded from its newest usable checkpoint (a snapshot of
//! its part of the index covering every record before some seq S, written by
//! [`Store::checkpoint`]; see `checkpoint` and format.rs), and its log is scanned from
//! the checkpoint's position — or from the head recorded in its superblock if no
//! checkpoint is usable — record by record (a packed record where the last ended, or any
//! record at the next block boundary), up to the first that is not the next record of
//! the log (magic, nonce, crc, seq, epoch). Segments are
//! collected per write; a COMMIT makes an object of them; REFs apply deltas. Segments
//! written after the last completed flush (seq at or past the highest `durable_seq`
//! any header or the superblock vouches for) have their data read back: the first torn
//! one cuts the log, since nothing from it on was acknowledged. See [`format`] for the
//! layout. Replay
//! from a checkpoint yields exactly the index a full scan would (the checkpoint also
//! carries the segments of writes still open when it was taken), and anything amiss
//! with a checkpoint sends recovery back to the full scan.
//!
//! # Crash consistency in one paragraph
//! An acknowledged operation's records were flushed before it returned, and every
//! record before them too; recovery only ever drops records after the last completed
//! flush. Reads check every 4 KiB block against the CRC its header recorded, so a
//! block that rotted or tore is reported ([`StoreError::Corrupt`]), never returned.

mod aio;
mod checkpoint;
mod compact;
pub mod conformance;
mod counted;
mod format;
mod index;
pub mod label;
mod room;
mod volume;

#[cfg(test)]
mod checkpoint_tests;
#[cfg(test)]
mod compact_tests;
#[cfg(test)]
mod copy_tests;
#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use md5::{Digest, Md5};
use nvme::{AlignedBuf, BlockDevice};
use rand::SeedableRng;
use tracing::{error, info, warn};
use zerocopy::little_endian::{U32, U64};
use zerocopy::IntoBytes;

use dosp::Fingerprint;

use format::{kind, PackedHeader, RecordHeader, BLOCK, MAX_SEGMENT_BYTES, PACKED_MAX_DATA};
use volume::{Reserve, Volume};

pub use aio::{CacheStats, Lent, Piece, ReadId, ReadStart, StoreEvent};
pub use counted::{DiskIo, LastError};
pub use room::Room;

/// Tunables of the store.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreConfig {
    /// Staging buffer per open write, a multiple of 4096 (at most 3.75 MiB, what one
    /// record header can describe). Default 1 MiB.
    pub segment_bytes: usize,
    /// In-flight writes at once; `begin` says Busy beyond. Default 64.
    pub max_open_writes: usize,
    /// Largest object accepted. Default 64 GiB.
    pub max_object_bytes: u64,
    /// Idle compaction (`compact_start`, `maybe_compact`) works on a disk whose dead/used
    /// ratio exceeds this. Default 0.5.
    pub compact_dead_ratio: f64,
    /// Bytes of the hot-object cache (verified whole small objects); 0 disables it.
    /// Default 64 MiB.
    pub cache_bytes: usize,
    /// Largest object the cache holds. Default 64 KiB.
    pub cache_object_bytes_max: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            segment_bytes: 1 << 20,
            max_open_writes: 64,
            max_object_bytes: 64 << 30,
            compact_dead_ratio: 0.5,
            cache_bytes: 64 << 20,
            cache_object_bytes_max: 64 << 10,
        }
    }
}

/// (bytes free, dead bytes) of a volume; a disk that never opened has neither.
fn room_of(v: &Volume) -> (u64, u64) {
    if v.log_len > 0 {
        (v.bytes_free(), v.bytes_dead())
    } else {
        (0, 0)
    }
}

/// A disk: its slot index in the `Vec` given to [`Store::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskId(pub u16);

/// An in-flight write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WriteId(u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskState {
    Online,
    /// Taken out of service by an operator: no writes, its objects unavailable.
    Offline,
    /// Failed (device error, unusable superblock) or set down by an operator.
    Down,
}

/// What the index knows of an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub len: u64,
    pub disk: DiskId,
    pub refcount: u32,
}

/// The outcome of a successful [`Store::commit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    pub fingerprint: Fingerprint,
    pub len: u64,
    pub disk: DiskId,
    /// The object was already stored: this copy was discarded and a reference added.
    pub deduplicated: bool,
    pub refcount: u32,
}

/// State and capacity of one disk, for GET_DISK_STATE / GET_DISK_STATUS and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskReport {
    pub id: DiskId,
    pub identity: [u8; 16],
    pub state: DiskState,
    pub backend: &'static str,
    pub location: String,
    pub bytes_total: u64,
    /// Not used by live or dead records (less the store's own reserve).
    pub bytes_free: u64,
    /// Free plus reclaimable dead bytes: what new objects could use after compaction.
    pub bytes_available: u64,
    pub objects_used: u64,
    /// Bytes of log between its head and its tail: live, dead and open records, and
    /// what packing skipped. `bytes_used / objects_used` is what an object costs.
    pub bytes_used: u64,
    /// How many more of the smallest objects (1 byte: 96 bytes of log) the disk admits one
    /// after the other, by the same rule as a STORE's admission (see `room`): within
    /// its free space, or within `bytes_available` less one segment that compacting
    /// may leave behind as a WRAP's waste.
    pub objects_available: u64,
    /// Open writes on the disk.
    pub outstanding_ops: u32,
    pub bytes_dead: u64,
    /// Errors since open: device errors, blocks failing their checksum, a disk that
    /// could not be opened.
    pub errors: u64,
    /// I/O that completed on the device since open.
    pub io: DiskIo,
    /// The most recent of `errors`, if any.
    pub last_error: Option<LastError>,
    /// Objects of the disk found failing their checksum since open (by a read or by
    /// compaction) and still stored: each counts once however often it fails.
    pub corrupt_objects: u64,
    /// Blocks found failing their checksum since open, per detection.
    pub corrupt_blocks: u64,
    /// The device's own health log (NVMe SMART), refreshed by [`Store::refresh_health`];
    /// `None` for files and memory.
    pub health: Option<nvme::driver::SmartLog>,
}

/// What one compaction call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactReport {
    pub disk: Option<DiskId>,
    /// Log bytes the head advanced over (the window compacted).
    pub bytes_scanned: u64,
    /// Live objects re-appended at the tail.
    pub objects_moved: u64,
    pub bytes_moved: u64,
    /// Window minus what was moved: space turned from dead into free.
    pub bytes_reclaimed: u64,
}

/// Running totals since open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Successful commits, deduplicated or not.
    pub stores: u64,
    pub dedup_hits: u64,
    pub aborts: u64,
    pub deletes: u64,
    pub reads: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    /// Blocks that failed their checksum (reads, compaction).
    pub corrupt_blocks: u64,
    pub compactions: u64,
    pub bytes_reclaimed: u64,
}

/// What a STORE's client promised about the object before sending it (DOSP STORE's
/// expected length and MD5, like S3's Content-Length and Content-MD5). Checked by
/// [`Store::commit_expect`] once the MD5 is final and before anything is committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expect {
    pub md5: Option<Fingerprint>,
    pub len: Option<u64>,
}

impl Expect {
    /// Nothing promised: every object is accepted.
    pub const NONE: Expect = Expect {
        md5: None,
        len: None,
    };

    /// The first promise `fingerprint` and `len` break, length first (a short or long
    /// object also has another MD5, and the length is the more telling of the two).
    pub fn check(&self, fingerprint: Fingerprint, len: u64) -> Result<(), StoreError> {
        let what = if self.len.is_some_and(|want| want != len) {
            Mismatched::Len
        } else if self.md5.is_some_and(|want| want != fingerprint) {
            Mismatched::Md5
        } else {
            return Ok(());
        };
        Err(StoreError::Mismatch {
            what,
            len,
            fingerprint,
            expect: *self,
        })
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.len, self.md5) {
            (None, None) => f.write_str("nothing"),
            (Some(len), None) => write!(f, "{len} bytes"),
            (None, Some(md5)) => write!(f, "MD5 {md5}"),
            (Some(len), Some(md5)) => write!(f, "{len} bytes, MD5 {md5}"),
        }
    }
}

/// Which promise of an [`Expect`] the object broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatched {
    Len,
    Md5,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {0} not found")]
    NotFound(Fingerprint),
    #[error("too many writes in flight")]
    Busy,
    #[error("no space left on the disk")]
    NoSpace,
    #[error("object larger than the maximum of {max} bytes")]
    TooLarge { max: u64 },
    #[error("disk {} failed: {source}", disk.0)]
    DiskFailed {
        disk: DiskId,
        #[source]
        source: nvme::DevError,
    },
    #[error("disk {} is offline", .0 .0)]
    DiskOffline(DiskId),
    #[error("object {fp} on disk {} failed its checksum", disk.0)]
    Corrupt { fp: Fingerprint, disk: DiskId },
    #[error("offset {offset} is past the end of the object ({len} bytes)")]
    OutOfRange { offset: u64, len: u64 },
    #[error("unknown write (never begun, committed or aborted)")]
    UnknownWrite,
    #[error("no usable disk")]
    NoUsableDisk,
    #[error("{0}")]
    Format(String),
    #[error("object received ({len} bytes, MD5 {fingerprint}) is not the one announced ({expect}); nothing stored")]
    Mismatch {
        what: Mismatched,
        len: u64,
        fingerprint: Fingerprint,
        expect: Expect,
    },
}

/// Where one segment's payload lives: the physical offset of its record header and
/// the payload bytes (the payload follows the header block, or, in a packed record,
/// the header itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub hdr: u64,
    pub len: u32,
    /// A packed record (format.rs, "Packed records").
    pub packed: bool,
}

impl Extent {
    /// Bytes of log its record takes.
    pub fn size(&self) -> u64 {
        if self.packed {
            format::packed_size(u64::from(self.len))
        } else {
            format::record_size(u64::from(self.len))
        }
    }
}

/// An object in the index.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub disk: DiskId,
    pub len: u64,
    pub refcount: u32,
    /// The write its records carry (checked on every header read).
    pub write_id: u64,
    /// Its segments in object order; the last is the COMMIT record.
    pub extents: Vec<Extent>,
    /// Bytes of log its records occupy.
    pub footprint: u64,
}

/// A staging buffer and its bookkeeping vectors, pooled so that a warm store does not
/// allocate per write.
struct Staging {
    /// One header block, then `segment_bytes` of data.
    buf: AlignedBuf,
    /// CRC32C of each full staged block.
    crcs: Vec<u32>,
    extents: Vec<Extent>,
}

struct OpenWrite {
    disk: DiskId,
    st: Staging,
    /// Data bytes staged.
    fill: usize,
    /// Running CRC32C of the partial block being staged.
    crc: u32,
    md5: Md5,
    total: u64,
    /// Seq of its first record; 0 before the first segment is written.
    write_id: u64,
    /// Log position of its first record: compaction must not pass it.
    first_lp: Option<u64>,
    /// Footprint of its records written so far.
    bytes: u64,
    /// No room for it: its bytes are only hashed, and commit adds a reference to the
    /// object if it is stored already or fails with NoSpace (see `room`).
    unstored: bool,
    /// Its fingerprint, once [`Store::commit_prepare`] has finished the MD5.
    fp: Option<Fingerprint>,
}

/// Disk, header offset and write id of a cached header.
type HeaderKey = (DiskId, u64, u64);

/// A few recently read record headers, so that a RETRIEVE streamed in small chunks
/// reads each segment's header once rather than once per chunk.
/// A header-cache miss reads header and data together when at most this many unwanted
/// blocks sit between them (64 KiB: cheaper than a second device round trip).
const PREFETCH_SKIP_BLOCKS_MAX: u64 = 16;

struct HeaderCache {
    slots: Vec<(Option<HeaderKey>, Box<RecordHeader>)>,
    next: usize,
}

impl HeaderCache {
    fn new(n: usize) -> HeaderCache {
        HeaderCache {
            slots: (0..n)
                .map(|_| (None, Box::new(RecordHeader::new(0))))
                .collect(),
            next: 0,
        }
    }

    fn find(&self, key: HeaderKey) -> Option<usize> {
        self.slots.iter().position(|(k, _)| *k == Some(key))
    }

    fn insert(&mut self, key: HeaderKey, hdr: &RecordHeader) -> usize {
        let i = self.next;
        self.next = (self.next + 1) % self.slots.len();
        self.slots[i].0 = Some(key);
        self.slots[i]
            .1
            .as_mut_bytes()
            .copy_from_slice(hdr.as_bytes());
        i
    }

    fn forget_disk(&mut self, disk: DiskId) {
        for (k, _) in &mut self.slots {
            if k.is_some_and(|(d, _, _)| d == disk) {
                *k = None;
            }
        }
    }
}

const ZEROS: [u8; BLOCK] = [0; BLOCK];

/// The `user` of the blocking wrappers' own operations.
const SYNC_USER: u64 = u64::MAX;

/// The object store of one node. See the module documentation.
pub struct Store {
    cfg: StoreConfig,
    vols: Vec<Volume>,
    /// Ordered by fingerprint, so that GET_CONTENTS can walk it with a cursor a piece
    /// at a time while stores and deletes go on (a hash map cannot resume a walk);
    /// about 28 bytes per small object (see `index`).
    index: index::Index,
    writes: HashMap<WriteId, OpenWrite>,
    next_write: u64,
    pool: Vec<Staging>,
    /// Per disk, the disk probe's one-block buffer: `None` while its read is in
    /// flight (at most one probe per disk at a time).
    probe_bufs: Vec<Option<AlignedBuf>>,
    /// Disks a failed probe read took Down, not yet handed out by
    /// [`Store::probe_take_down`].
    probe_down: Vec<DiskId>,
    /// The checkpoint being written in the background, if any (see `checkpoint`).
    ckpt_task: Option<checkpoint::CkptTask>,
    /// The compaction step under way in the background, if any (see `compact`);
    /// never together with `ckpt_task` in flight.
    compact_task: Option<compact::CompactTask>,
    hdr_cache: HeaderCache,
    counters: StoreCounters,
    /// One checkpoint transfer buffer per disk ([`checkpoint::CKPT_IO_BYTES`] each),
    /// for reading its checkpoint at open and writing new ones.
    ckpt_bufs: Vec<AlignedBuf>,
    /// Reads in flight, by [`ReadId`].
    reads: Vec<Option<aio::ReadOp>>,
    free_reads: Vec<u32>,
    /// Lists of device reads of finished reads, reused.
    spare_subs: Vec<Vec<aio::Sub>>,
    read_bufs: aio::BufPool,
    /// Lists of the parts of returned [`Piece`]s, reused.
    spare_parts: Vec<Vec<aio::Part>>,
    /// Object bytes the CPU copied, by site (counted in test builds only).
    copies: crate::copies::Copies,
    read_scratch: Vec<nvme::Completion>,
    /// Per disk: commits, deletes and references waiting for a flush, in seq order.
    waiters: Vec<aio::Waiters>,
    /// New objects whose commit is not durable yet: in the index, hidden from readers.
    unacked: std::collections::HashSet<Fingerprint>,
    /// Events for callers that a blocking wait passed over.
    parked_events: Vec<StoreEvent>,
    cache: aio::ObjCache,
    /// Staging buffers back from the device, and how many are out (in open writes
    /// or in flight).
    spare_staging: Vec<AlignedBuf>,
    staging_out: usize,
    /// One-block buffers for reference records.
    meta_bufs: Vec<AlignedBuf>,
    /// A compaction asked for by a STORE waiting for room (or a delete or dedup that
    /// found the disk full): the disk, and the tail it runs to, in background steps.
    urgent: Option<(DiskId, u64)>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("disks", &self.vols)
            .field("objects", &self.index.len())
            .field("open_writes", &self.writes.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens every disk: a blank disk (all-zero first block, no valid superblock) is
    /// formatted with a fresh random identity; a disk with a valid superblock is
    /// recovered (index rebuilt from its log); a disk whose superblock is corrupt or
    /// of an unknown format version is marked Down with the reason logged, and the
    /// node keeps going with the others. `node_id` is recorded at format.
    /// Fails only if no disk is usable (or the configuration is invalid).
    pub fn open(
        disks: Vec<Box<dyn BlockDevice>>,
        cfg: StoreConfig,
        node_id: u64,
    ) -> Result<Store, StoreError> {
        Store::open_seeded(disks, cfg, node_id, rand::random())
    }

    /// [`Store::open`] with the randomness of formatting (identities, nonces) drawn
    /// from `seed`, for reproducible tests.
    pub(crate) fn open_seeded(
        disks: Vec<Box<dyn BlockDevice>>,
        cfg: StoreConfig,
        node_id: u64,
        seed: u64,
    ) -> Result<Store, StoreError> {
        let seg = cfg.segment_bytes;
        if seg == 0 || !seg.is_multiple_of(BLOCK) || seg > MAX_SEGMENT_BYTES {
            return Err(StoreError::Format(format!(
                "segment_bytes must be a positive multiple of {BLOCK} up to {MAX_SEGMENT_BYTES}, got {seg}"
            )));
        }
        if cfg.max_open_writes == 0 {
            return Err(StoreError::Format(
                "max_open_writes must be at least 1".into(),
            ));
        }
        if disks.len() > usize::from(u16::MAX) {
            return Err(StoreError::Format(format!(
                "too many disks: {}",
                disks.len()
            )));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut vols = Vec::with_capacity(disks.len());
        let mut locals = Vec::with_capacity(disks.len());
        let mut ckpt_bufs: Vec<AlignedBuf> = (0..disks.len())
            .map(|_| AlignedBuf::new(checkpoint::CKPT_IO_BYTES))
            .collect();
        for ((i, dev), buf) in disks.into_iter().enumerate().zip(&mut ckpt_bufs) {
            let (vol, local) = Volume::open(DiskId(i as u16), dev, &cfg, node_id, &mut rng, buf);
            vols.push(vol);
            locals.push(local);
        }
        // The same disk given twice would be written by two logs at once.
        for (i, local) in locals.iter_mut().enumerate() {
            let (before, rest) = vols.split_at_mut(i);
            let vol = &mut rest[0];
            if vol.state == DiskState::Online
                && before
                    .iter()
                    .any(|o| o.state == DiskState::Online && o.sb.identity == vol.sb.identity)
            {
                error!(
                    disk = i,
                    identity = %hex::encode(vol.sb.identity),
                    "disk identity already seen on another slot; marked down"
                );
                vol.state = DiskState::Down;
                vol.failed = true;
                local.clear();
            }
        }
        // The device health log, read once now so reports carry it from the start;
        // the periodic probe keeps it fresh.
        for vol in vols.iter_mut().filter(|v| v.state == DiskState::Online) {
            vol.refresh_health();
        }
        let mut seen = std::collections::HashSet::new();
        let mut duplicates = Vec::new();
        let mut first = Vec::new();
        for local in locals {
            for (fp, entry) in local {
                if seen.insert(fp) {
                    first.push((fp, entry));
                } else {
                    duplicates.push((fp, entry));
                }
            }
        }
        drop(seen);
        let index: index::Index = first.into_iter().collect();
        let nvols = vols.len();
        let mut store = Store {
            vols,
            index,
            writes: HashMap::new(),
            next_write: 1,
            pool: Vec::new(),
            probe_bufs: (0..nvols).map(|_| Some(AlignedBuf::new(BLOCK))).collect(),
            probe_down: Vec::new(),
            ckpt_task: None,
            compact_task: None,
            hdr_cache: HeaderCache::new(64),
            counters: StoreCounters::default(),
            ckpt_bufs,
            reads: Vec::new(),
            free_reads: Vec::new(),
            spare_subs: Vec::new(),
            read_bufs: aio::BufPool::default(),
            spare_parts: Vec::new(),
            copies: crate::copies::Copies::new(),
            read_scratch: Vec::new(),
            waiters: (0..nvols).map(|_| aio::Waiters::new()).collect(),
            unacked: std::collections::HashSet::new(),
            parked_events: Vec::new(),
            cache: aio::ObjCache::new(cfg.cache_bytes, cfg.cache_object_bytes_max),
            spare_staging: Vec::new(),
            staging_out: 0,
            meta_bufs: Vec::new(),
            urgent: None,
            cfg,
        };
        for (fp, loser) in duplicates {
            store.resolve_duplicate(fp, loser);
        }
        if !store.vols.iter().any(|v| v.state == DiskState::Online) {
            return Err(StoreError::NoUsableDisk);
        }
        // A long replay (a crash, or no checkpoint yet) is saved at once rather than
        // at the first idle moment, so that it is not paid for again at the next start.
        let due: Vec<bool> = store
            .vols
            .iter()
            .map(|v| {
                v.replayed >= checkpoint::REPLAY_CHECKPOINT_RECORDS && checkpoint::snapshot_due(v)
            })
            .collect();
        if due.contains(&true) {
            if let Err(e) = store.checkpoint_disks(&due) {
                warn!("checkpoint after recovery failed: {e}");
            }
        }
        info!(
            disks = store.vols.len(),
            online = store
                .vols
                .iter()
                .filter(|v| v.state == DiskState::Online)
                .count(),
            objects = store.index.len(),
            "object store open"
        );
        Ok(store)
    }

    /// The same object on two disks: possible only if a disk was missing at an earlier
    /// open and the object was stored again meanwhile. The first copy (lowest slot)
    /// keeps the sum of both refcounts; the other is retired with a REF that brings it
    /// to zero. The winner is credited first, so a crash in between over-counts (the
    /// object lingers) rather than under-counts (the object vanishes early).
    fn resolve_duplicate(&mut self, fp: Fingerprint, loser: Entry) {
        let Some(winner) = self.index.meta(&fp).map(|m| m.disk) else {
            return;
        };
        warn!(
            fingerprint = %fp,
            kept_on = winner.0,
            retired_on = loser.disk.0,
            "object stored on two disks; merging"
        );
        let lv = &mut self.vols[usize::from(loser.disk.0)];
        lv.live_bytes = lv.live_bytes.saturating_sub(loser.footprint);
        lv.objects = lv.objects.saturating_sub(1);
        // Until the loser's REF is durable its log still replays to the loser's copy,
        // which the index no longer holds: a checkpoint of that disk would drop it for
        // good (and with it refcounts the winner may not have been credited). So no
        // checkpoint for it until the next open; nor for either disk if the delta
        // cannot carry the whole refcount (over 2^31: both logs then differ).
        let delta = i32::try_from(loser.refcount).unwrap_or(i32::MAX);
        if delta.unsigned_abs() != loser.refcount {
            self.vols[usize::from(winner.0)].ckpt.diverged = true;
            self.vols[usize::from(loser.disk.0)].ckpt.diverged = true;
        }
        let retired = self.write_ref(winner, &fp, delta).is_ok() && {
            if let Some(mut e) = self.index.get_mut(&fp) {
                e.refcount = e.refcount.saturating_add(loser.refcount);
            }
            self.write_ref(loser.disk, &fp, -delta).is_ok()
        };
        if !retired {
            warn!(
                fingerprint = %fp,
                disk = loser.disk.0,
                "duplicate not retired; no checkpoints of this disk until restart"
            );
            self.vols[usize::from(loser.disk.0)].ckpt.diverged = true;
        }
    }

    /// [`Store::append_ref`] with the metadata reserve, and when even that is used up,
    /// NoSpace and a compaction of the disk in the background ([`Store::compact_soon`]):
    /// REF records turn into dead space as soon as they are written, so compaction can
    /// always win them back, and the delete or dedup succeeds when tried again. Deletes
    /// and dedup hits go through here, so that a full disk can still be emptied and a
    /// duplicate still be referenced. Never waits for the device.
    fn append_ref_making_room(
        &mut self,
        disk: DiskId,
        fp: &Fingerprint,
        delta: i32,
    ) -> Result<u64, StoreError> {
        let r = self.append_ref(disk, fp, delta);
        if matches!(r, Err(StoreError::NoSpace)) {
            // Rare: a disk full to the brim, even its metadata reserve.
            self.compact_soon(disk);
        }
        r
    }

    /// Writes and flushes a REF record on `disk`.
    fn write_ref(&mut self, disk: DiskId, fp: &Fingerprint, delta: i32) -> Result<(), StoreError> {
        let vol = &mut self.vols[usize::from(disk.0)];
        let mut h = PackedHeader::reference(fp, delta);
        vol.append_packed_wait(&mut h, &[], Reserve::Meta)?;
        vol.flush()
    }

    /// Starts a write of unknown size: [`Store::begin_for`] with no hint.
    pub fn begin(&mut self) -> Result<WriteId, StoreError> {
        self.begin_for(0)
    }

    /// Starts a write of about `size_hint` bytes (0: unknown) on the Online disk that
    /// admits it with the most free space (less what the writes already open on it will
    /// take). Room is never a reason to refuse here: a write no disk admits, or one that
    /// runs out of room later, still hashes its bytes, so that a duplicate gets its
    /// reference at commit; anything else fails there with NoSpace, nothing committed.
    pub fn begin_for(&mut self, size_hint: u64) -> Result<WriteId, StoreError> {
        if self.writes.len() >= self.cfg.max_open_writes {
            return Err(StoreError::Busy);
        }
        let (i, stored) = self.choose_disk(size_hint)?;
        let seg = self.cfg.segment_bytes;
        let st = match self.pool.pop() {
            Some(st) => st,
            None => Staging {
                buf: self.spare_staging_buf(),
                crcs: Vec::with_capacity(seg / BLOCK),
                extents: Vec::new(),
            },
        };
        let id = WriteId(self.next_write);
        self.next_write += 1;
        self.vols[i].open_writes += 1;
        self.writes.insert(
            id,
            OpenWrite {
                disk: DiskId(i as u16),
                st,
                fill: 0,
                crc: 0,
                md5: Md5::new(),
                total: 0,
                write_id: 0,
                first_lp: None,
                bytes: 0,
                unstored: !stored,
                fp: None,
            },
        );
        Ok(id)
    }

    /// Adds `data` (any length) to a write. On any error the write is aborted.
    pub fn append(&mut self, id: WriteId, data: &[u8]) -> Result<(), StoreError> {
        let Some(w) = self.writes.get(&id) else {
            return Err(StoreError::UnknownWrite);
        };
        let max = self.cfg.max_object_bytes;
        let result = if w.total.saturating_add(data.len() as u64) > max {
            Err(StoreError::TooLarge { max })
        } else {
            self.append_inner(id, data)
        };
        if result.is_err() {
            self.abort(id);
        }
        result
    }

    fn append_inner(&mut self, id: WriteId, data: &[u8]) -> Result<(), StoreError> {
        let Store {
            writes,
            vols,
            cfg,
            counters,
            spare_staging,
            staging_out,
            copies,
            ..
        } = self;
        let w = writes.get_mut(&id).ok_or(StoreError::UnknownWrite)?;
        if w.unstored {
            w.hash_only(data);
            return Ok(());
        }
        let vol = &mut vols[usize::from(w.disk.0)];
        vol.check_online()?;
        let seg = cfg.segment_bytes;
        let mut rest = data;
        while !rest.is_empty() {
            if w.fill == seg {
                let spare = spare_staging
                    .pop()
                    .unwrap_or_else(|| AlignedBuf::new(BLOCK + seg));
                match write_segment(vol, w, None, counters, spare) {
                    Ok(()) => *staging_out += 1,
                    Err(StoreError::NoSpace) => {
                        // Its staged bytes are hashed already: hash the rest only.
                        w.unstore(vol);
                        w.md5.update(rest);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            // Up to the end of the current block: the slice is copied, hashed and
            // checksummed while it is in cache.
            let n = (BLOCK - w.fill % BLOCK).min(seg - w.fill).min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            let dst = &mut w.st.buf[BLOCK + w.fill..BLOCK + w.fill + n];
            dst.copy_from_slice(chunk);
            copies.add(crate::copies::Site::Append, n);
            w.md5.update(&*dst);
            w.crc = crc32c::crc32c_append(w.crc, dst);
            w.fill += n;
            if w.fill % BLOCK == 0 {
                w.st.crcs.push(w.crc);
                w.crc = 0;
            }
            rest = tail;
        }
        w.total += data.len() as u64;
        Ok(())
    }

    /// Whether [`Store::append`] can take `n` more bytes of write `id` without a
    /// staging buffer beyond the pool's bound: a full segment goes to the device in
    /// its own buffer while the next one fills, and at most `2 × max_open_writes`
    /// such buffers are out at once. A caller that hears `false` stops reading its
    /// connection until [`Store::poll`] has returned some.
    pub fn can_append(&self, id: WriteId, n: usize) -> bool {
        match self.writes.get(&id) {
            Some(w) => {
                w.fill + n <= self.cfg.segment_bytes
                    || !self.spare_staging.is_empty()
                    || self.staging_out < 2 * self.cfg.max_open_writes
            }
            None => true,
        }
    }

    /// Finishes a write, blocking until it is durable: [`Store::commit_start`] and a
    /// wait for its event. For tests, tools and start-up; a loop uses `commit_start`.
    pub fn commit(&mut self, id: WriteId) -> Result<Committed, StoreError> {
        self.commit_expect(id, &Expect::NONE)
    }

    /// [`Store::commit`], unless the object is not what `expect` says: then the write
    /// is aborted (counted as an abort) and [`StoreError::Mismatch`] returned. The
    /// check runs once the MD5 is final and before anything is written, so nothing of
    /// a refused object is committed, deduplicated or referenced.
    pub fn commit_expect(&mut self, id: WriteId, expect: &Expect) -> Result<Committed, StoreError> {
        self.commit_start(id, expect, SYNC_USER)?;
        match self.wait_for(SYNC_USER) {
            StoreEvent::Committed { result, .. } => result,
            other => Err(StoreError::Format(format!("unexpected event {other:?}"))),
        }
    }

    /// Finishes a write: appends its last record (or, for a fingerprint already
    /// stored, a reference +1) and returns. [`StoreEvent::Committed`] with `user`
    /// follows once a flush has made it durable; from then on the object survives
    /// power loss. Errors here mean nothing was committed: among them
    /// [`StoreError::Mismatch`] when the object is not what `expect` says, checked
    /// once the MD5 is final and before anything is written (the write is aborted).
    pub fn commit_start(
        &mut self,
        id: WriteId,
        expect: &Expect,
        user: u64,
    ) -> Result<(), StoreError> {
        self.commit_prepare(id, expect)?;
        self.commit_finish(id, user)
    }

    /// The first half of [`Store::commit_start`]: finishes the MD5 and checks `expect`
    /// (on a mismatch the write is aborted and [`StoreError::Mismatch`] returned), and
    /// returns the fingerprint. The write stays open, nothing is written: a shard that
    /// does not own the fingerprint asks its owner whether to commit it
    /// ([`Store::commit_finish`]) or to add a reference to the copy stored elsewhere
    /// ([`Store::drop_write`]). Preparing twice returns the same fingerprint.
    pub fn commit_prepare(
        &mut self,
        id: WriteId,
        expect: &Expect,
    ) -> Result<Fingerprint, StoreError> {
        let Some(w) = self.writes.get_mut(&id) else {
            return Err(StoreError::UnknownWrite);
        };
        if let Some(fp) = w.fp {
            return Ok(fp);
        }
        let fp = Fingerprint(std::mem::take(&mut w.md5).finalize().into());
        if let Err(e) = expect.check(fp, w.total) {
            self.abort(id);
            return Err(e);
        }
        w.fp = Some(fp);
        Ok(fp)
    }

    /// The second half of [`Store::commit_start`], for a prepared write: appends its
    /// last record (or, for a fingerprint this store holds already, a reference +1);
    /// [`StoreEvent::Committed`] with `user` follows once durable.
    pub fn commit_finish(&mut self, id: WriteId, user: u64) -> Result<(), StoreError> {
        let Some(mut w) = self.writes.remove(&id) else {
            return Err(StoreError::UnknownWrite);
        };
        let Some(fp) = w.fp else {
            self.writes.insert(id, w);
            return Err(StoreError::Format(
                "commit_finish of an unprepared write".into(),
            ));
        };
        let result = self.commit_submit(&mut w, fp, user);
        self.release(w);
        if result.is_err() {
            self.counters.aborts += 1;
        }
        result
    }

    /// Ends a prepared write whose object another shard already holds (it got a
    /// reference there instead): nothing becomes visible, what it wrote is dead space.
    /// Not counted as an abort: the STORE succeeded, as a deduplicated one.
    pub fn drop_write(&mut self, id: WriteId) {
        if let Some(w) = self.writes.remove(&id) {
            self.release(w);
        }
    }

    /// Adds a reference to an object this store holds, as a deduplicated STORE does:
    /// [`StoreEvent::Committed`] (with `deduplicated`) follows once the REF record is
    /// durable. For a STORE that arrived through another shard.
    pub fn ref_start(&mut self, fp: &Fingerprint, user: u64) -> Result<(), StoreError> {
        let disk = self.index.meta(fp).ok_or(StoreError::NotFound(*fp))?.disk;
        let seq = self.append_ref_making_room(disk, fp, 1)?;
        let mut e = self.index.get_mut(fp).ok_or(StoreError::NotFound(*fp))?;
        e.refcount = e.refcount.saturating_add(1);
        let c = Committed {
            fingerprint: *fp,
            len: e.len,
            disk,
            deduplicated: true,
            refcount: e.refcount,
        };
        self.waiters[usize::from(disk.0)].push_back(aio::Waiter {
            seq,
            user,
            kind: aio::WaitKind::Dedup { c },
        });
        Ok(())
    }

    /// Whether this store holds `fp`, acknowledged or still committing.
    pub fn holds(&self, fp: &Fingerprint) -> bool {
        self.index.contains_key(fp)
    }

    fn commit_submit(
        &mut self,
        w: &mut OpenWrite,
        fp: Fingerprint,
        user: u64,
    ) -> Result<(), StoreError> {
        if self.index.contains_key(&fp) {
            return self.ref_start(&fp, user);
        }
        if w.unstored {
            return Err(StoreError::NoSpace);
        }
        if w.write_id == 0 && w.fill <= PACKED_MAX_DATA {
            return self.commit_packed(w, fp, user);
        }
        let spare = self.spare_staging_buf();
        let vol = &mut self.vols[usize::from(w.disk.0)];
        vol.check_online()?;
        write_segment(vol, w, Some(&fp), &mut self.counters, spare)?;
        self.staging_out += 1;
        let seq = vol.next_seq - 1;
        // Exactly as long as needed: the index holds millions of these.
        let mut extents = std::mem::take(&mut w.st.extents);
        extents.shrink_to_fit();
        self.enter_new(w, fp, extents, seq, user);
        Ok(())
    }

    /// Commits a small object (all of it still staged) as one packed record: its
    /// bytes are copied into the tail's image of its disk and the staging buffer stays
    /// with the write, to be pooled.
    fn commit_packed(
        &mut self,
        w: &mut OpenWrite,
        fp: Fingerprint,
        user: u64,
    ) -> Result<(), StoreError> {
        let data = &w.st.buf[BLOCK..BLOCK + w.fill];
        let vol = &mut self.vols[usize::from(w.disk.0)];
        let mut h = PackedHeader::commit(&fp, data, 1);
        let a = vol.append_packed(&mut h, data, Reserve::Data)?;
        self.copies.add(crate::copies::Site::Pack, w.fill);
        self.counters.bytes_written += a.size;
        vol.open_bytes += a.size;
        w.bytes += a.size;
        w.write_id = a.seq;
        w.first_lp = Some(a.lp);
        let extents = vec![Extent {
            hdr: a.phys,
            len: w.fill as u32,
            packed: true,
        }];
        self.enter_new(w, fp, extents, a.seq, user);
        Ok(())
    }

    /// A new object whose last record (`seq`) is appended: it enters the index,
    /// hidden from readers, and waits for the flush that makes it durable.
    fn enter_new(
        &mut self,
        w: &OpenWrite,
        fp: Fingerprint,
        extents: Vec<Extent>,
        seq: u64,
        user: u64,
    ) {
        let vol = &mut self.vols[usize::from(w.disk.0)];
        vol.live_bytes += w.bytes;
        vol.objects += 1;
        self.index.insert(
            fp,
            Entry {
                disk: w.disk,
                len: w.total,
                refcount: 1,
                write_id: w.write_id,
                extents,
                footprint: w.bytes,
            },
        );
        self.unacked.insert(fp);
        let c = Committed {
            fingerprint: fp,
            len: w.total,
            disk: w.disk,
            deduplicated: false,
            refcount: 1,
        };
        self.waiters[usize::from(w.disk.0)].push_back(aio::Waiter {
            seq,
            user,
            kind: aio::WaitKind::New { c },
        });
    }

    /// A staging buffer for the write that will reuse this one's `Staging`.
    fn spare_staging_buf(&mut self) -> AlignedBuf {
        let seg = self.cfg.segment_bytes;
        self.spare_staging
            .pop()
            .unwrap_or_else(|| AlignedBuf::new(BLOCK + seg))
    }

    /// Appends a REF record asynchronously; returns its seq.
    fn append_ref(
        &mut self,
        disk: DiskId,
        fp: &Fingerprint,
        delta: i32,
    ) -> Result<u64, StoreError> {
        let vol = &mut self.vols[usize::from(disk.0)];
        let mut h = PackedHeader::reference(fp, delta);
        vol.append_packed(&mut h, &[], Reserve::Meta).map(|a| a.seq)
    }

    /// Drops a write (the connection went away mid-store): nothing becomes visible;
    /// whatever it already wrote is dead space for compaction. Unknown ids are ignored.
    pub fn abort(&mut self, id: WriteId) {
        if let Some(w) = self.writes.remove(&id) {
            self.counters.aborts += 1;
            self.release(w);
        }
    }

    /// Returns a finished write's staging buffer to the pool; its records stop being
    /// "open" (they are live now if it committed, dead otherwise).
    fn release(&mut self, mut w: OpenWrite) {
        let vol = &mut self.vols[usize::from(w.disk.0)];
        vol.open_bytes = vol.open_bytes.saturating_sub(w.bytes);
        vol.open_writes = vol.open_writes.saturating_sub(1);
        w.st.crcs.clear();
        w.st.extents.clear();
        self.pool.push(w.st);
    }

    pub fn get(&self, fp: &Fingerprint) -> Option<ObjectMeta> {
        if self.unacked.contains(fp) {
            return None;
        }
        self.index.meta(fp)
    }

    /// Reads `min(out.len(), len - offset)` bytes of an object at `offset`, blocking
    /// ([`Store::read_start`] and a wait), and copies them into `out` (for tests and
    /// tools; serving sends from the lent [`Piece`] instead). Every block read is
    /// checked against its CRC first: bytes that fail it are never copied out.
    pub fn read(
        &mut self,
        fp: &Fingerprint,
        offset: u64,
        out: &mut [u8],
    ) -> Result<usize, StoreError> {
        let piece = match self.read_start(fp, offset, out.len(), SYNC_USER)? {
            ReadStart::Ready(p) => p,
            ReadStart::Pending(id) => match self.wait_for(SYNC_USER) {
                StoreEvent::Read { id: got, .. } if got == id => self.read_take(id)?,
                other => return Err(StoreError::Format(format!("unexpected event {other:?}"))),
            },
        };
        let n = piece.copy_to(out);
        self.copies.add(crate::copies::Site::ReadOut, n);
        self.read_give(piece);
        Ok(n)
    }

    /// The ledger of object bytes this store copied (shared with `set_copies`).
    #[cfg(any(test, feature = "copy-count"))]
    pub fn copies(&self) -> &crate::copies::Copies {
        &self.copies
    }

    /// Counts this store's copies in `ledger` (one ledger for every loop of a node).
    #[cfg(any(test, feature = "copy-count"))]
    pub fn set_copies(&mut self, ledger: crate::copies::Copies) {
        self.copies = ledger;
    }

    /// Drops one reference, blocking until durable ([`Store::delete_start`] and a
    /// wait). Returns the references left. On a disk full to the brim (even its
    /// metadata reserve) it compacts the disk, blocking, and tries once more.
    pub fn delete(&mut self, fp: &Fingerprint) -> Result<u32, StoreError> {
        let mut started = self.delete_start(fp, SYNC_USER);
        if matches!(started, Err(StoreError::NoSpace)) {
            if let Some(disk) = self.index.meta(fp).map(|m| m.disk) {
                let _ = self.compact(disk);
                started = self.delete_start(fp, SYNC_USER);
            }
        }
        started?;
        match self.wait_for(SYNC_USER) {
            StoreEvent::Deleted { result, .. } => result,
            other => Err(StoreError::Format(format!("unexpected event {other:?}"))),
        }
    }

    /// Drops one reference: appends a REF −1 record; [`StoreEvent::Deleted`] with the
    /// references left follows once it is durable. At zero the object is gone from
    /// the index (and the cache) at once and its space is reclaimed by compaction.
    pub fn delete_start(&mut self, fp: &Fingerprint, user: u64) -> Result<(), StoreError> {
        if self.unacked.contains(fp) {
            return Err(StoreError::NotFound(*fp));
        }
        let disk = self.index.meta(fp).ok_or(StoreError::NotFound(*fp))?.disk;
        let seq = self.append_ref_making_room(disk, fp, -1)?;
        let mut e = self.index.get_mut(fp).ok_or(StoreError::NotFound(*fp))?;
        e.refcount = e.refcount.saturating_sub(1);
        let left = e.refcount;
        drop(e);
        let mut removed = None;
        if left == 0 {
            if let Some(e) = self.index.remove(fp) {
                let vol = &mut self.vols[usize::from(e.disk.0)];
                vol.live_bytes = vol.live_bytes.saturating_sub(e.footprint);
                vol.objects = vol.objects.saturating_sub(1);
                vol.corruption.forget(fp);
                removed = Some(Box::new(e));
            }
            self.cache.remove(fp);
        }
        self.waiters[usize::from(disk.0)].push_back(aio::Waiter {
            seq,
            user,
            kind: aio::WaitKind::Delete {
                fp: *fp,
                left,
                removed,
            },
        });
        Ok(())
    }

    /// Every object and the disk holding it, sorted by fingerprint. A copy of the
    /// whole index: for tests and tools; the server walks it with
    /// [`Store::contents_after`].
    pub fn contents(&self) -> Vec<(Fingerprint, DiskId)> {
        self.objects_between(std::ops::Bound::Unbounded, std::ops::Bound::Unbounded)
            .collect()
    }

    /// Objects a reader may see now.
    pub fn objects(&self) -> u64 {
        (self.index.len() - self.unacked.len()) as u64
    }

    /// Up to `max` objects after `after` (from the first when `None`), in fingerprint
    /// order, each handed to `each`: one bounded piece of a walk over the index that
    /// stores and deletes may interleave with. Returns the last fingerprint handed out
    /// (the cursor for the next piece), `None` when there was nothing after `after`.
    pub fn contents_after(
        &self,
        after: Option<Fingerprint>,
        max: usize,
        each: impl FnMut(Fingerprint, DiskId),
    ) -> Option<Fingerprint> {
        self.contents_between(after, None, max, each)
    }

    /// [`Store::contents_after`] that stops before `below` (a shard lists only the
    /// fingerprints it owns).
    pub fn contents_between(
        &self,
        after: Option<Fingerprint>,
        below: Option<Fingerprint>,
        max: usize,
        mut each: impl FnMut(Fingerprint, DiskId),
    ) -> Option<Fingerprint> {
        use std::ops::Bound;
        let from = match after {
            Some(fp) => Bound::Excluded(fp),
            None => Bound::Unbounded,
        };
        let to = match below {
            Some(fp) => Bound::Excluded(fp),
            None => Bound::Unbounded,
        };
        if matches!((after, below), (Some(a), Some(b)) if a >= b) {
            return None;
        }
        let mut last = None;
        for (fp, disk) in self.objects_between(from, to).take(max) {
            each(fp, disk);
            last = Some(fp);
        }
        last
    }

    /// Objects a reader may see with fingerprints in `(from, to)`, in order.
    pub fn objects_between(
        &self,
        from: std::ops::Bound<Fingerprint>,
        to: std::ops::Bound<Fingerprint>,
    ) -> impl Iterator<Item = (Fingerprint, DiskId)> + '_ {
        self.index
            .range_meta((from, to))
            .filter(|(fp, _)| !self.unacked.contains(fp))
            .map(|(fp, m)| (fp, m.disk))
    }

    /// Every object this store holds (acknowledged or not) with its metadata, in
    /// fingerprint order: how the shards learn at start-up where each object lives.
    pub fn each_object(&self, mut each: impl FnMut(Fingerprint, ObjectMeta)) {
        let all = (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded);
        for (fp, meta) in self.index.range_meta(all) {
            each(fp, meta);
        }
    }

    pub fn disks(&self) -> Vec<DiskReport> {
        self.vols
            .iter()
            .map(|v| {
                let (free, dead) = room_of(v);
                let available = free + dead;
                DiskReport {
                    id: v.id,
                    identity: v.sb.identity,
                    state: v.state,
                    backend: v.info.backend,
                    location: v.info.location.clone(),
                    bytes_total: v.info.size_bytes,
                    bytes_free: free,
                    bytes_available: available,
                    objects_used: v.objects,
                    bytes_used: if v.log_len > 0 { v.used() } else { 0 },
                    objects_available: if v.log_len > 0 {
                        v.stores_admitted(1)
                    } else {
                        0
                    },
                    outstanding_ops: v.open_writes,
                    bytes_dead: dead,
                    errors: v.errors,
                    io: v.io(),
                    last_error: v.last_error.clone(),
                    corrupt_objects: v.corruption.objects(),
                    corrupt_blocks: v.corruption.blocks,
                    health: v.health,
                }
            })
            .collect()
    }

    /// Online ↔ Offline ↔ Down by an operator. A disk that went Down because it
    /// failed (or could not be opened) stays Down until the node restarts: after a
    /// failed write its in-memory log state may not match the disk.
    pub fn set_disk_state(&mut self, disk: DiskId, state: DiskState) {
        let Some(vol) = self.vols.get_mut(usize::from(disk.0)) else {
            warn!(disk = disk.0, "set_disk_state: no such disk");
            return;
        };
        if vol.failed && state != DiskState::Down {
            warn!(disk = disk.0, "disk failed; it stays down until restart");
            return;
        }
        if vol.state != state {
            info!(disk = disk.0, from = ?vol.state, to = ?state, "disk state changed");
            vol.state = state;
        }
    }

    /// Starts reading one block (superblock A) of every online disk that has no probe
    /// in flight, without waiting. A disk that died while the node was idle is noticed
    /// when its read completes (in [`Store::poll`]): the read fails and the disk goes
    /// Down like on any I/O error — instead of at the next request that touches it, so
    /// the management core can announce it within a bounded time.
    /// [`Store::probe_take_down`] hands out the disks that went down.
    pub fn probe_start(&mut self) {
        for (vol, slot) in self.vols.iter_mut().zip(self.probe_bufs.iter_mut()) {
            if vol.state != DiskState::Online {
                continue;
            }
            if let Some(buf) = slot.take() {
                vol.submit_probe(0, buf);
            }
        }
    }

    /// A probe read completed: a failure takes the disk Down (counted and logged by
    /// `Volume::fail`) and names it for [`Store::probe_take_down`].
    fn probe_done(&mut self, d: usize, c: nvme::Completion) {
        if let Some(slot) = self.probe_bufs.get_mut(d) {
            *slot = Some(c.buf);
        }
        if let (Err(e), Some(vol)) = (c.result, self.vols.get_mut(d)) {
            let was_down = vol.state == DiskState::Down;
            vol.fail(e);
            if !was_down {
                self.probe_down.push(vol.id);
            }
        }
    }

    /// Whether a probe read is in flight on any disk.
    pub fn probing(&self) -> bool {
        self.probe_bufs.iter().any(Option::is_none)
    }

    /// The disks that failed their probe since the last call (each once).
    pub fn probe_take_down(&mut self) -> Vec<DiskId> {
        std::mem::take(&mut self.probe_down)
    }

    /// [`Store::probe_start`] and a blocking wait for the reads (tests and tools):
    /// returns the disks that went down.
    pub fn probe(&mut self) -> Vec<DiskId> {
        self.probe_start();
        let mut events = Vec::new();
        while self.probing() {
            self.poll(&mut events);
            self.parked_events.append(&mut events);
            if self.probing() {
                for v in self.vols.iter_mut() {
                    v.wait_device();
                }
            }
        }
        self.probe_take_down()
    }

    /// Re-reads the device health log (NVMe SMART) of every online disk. Blocking: on
    /// NVMe it is an admin command (Get Log Page) that the driver waits for on the
    /// shared admin queue, and [`nvme::BlockDevice::health`] has no asynchronous form;
    /// so the server calls this rarely (`server::HEALTH_INTERVAL`), not with the
    /// per-second probe. A failed read is logged, not a disk fault.
    pub fn refresh_health(&mut self) {
        for vol in self
            .vols
            .iter_mut()
            .filter(|v| v.state == DiskState::Online)
        {
            vol.refresh_health();
        }
    }

    /// Objects in the index and the memory it takes, counted from its allocations
    /// (see `index`). What `/metrics` reports as `dosd_index_bytes`.
    pub fn index_footprint(&self) -> (u64, u64) {
        (self.index.len() as u64, self.index.memory_bytes())
    }

    pub fn counters(&self) -> &StoreCounters {
        &self.counters
    }

    /// The configuration in force.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }
}

/// Writes a write's staged data as one record (SEGMENT, or SEGMENT|COMMIT with the
/// object's fingerprint when `commit` is given) and empties the staging buffer.
/// The record goes to the device asynchronously in the staging buffer itself, and
/// `spare` takes its place in the write (on refusal `spare` is dropped and nothing
/// changes).
fn write_segment(
    vol: &mut Volume,
    w: &mut OpenWrite,
    commit: Option<&Fingerprint>,
    counters: &mut StoreCounters,
    spare: AlignedBuf,
) -> Result<(), StoreError> {
    let pad = (BLOCK - w.fill % BLOCK) % BLOCK;
    if pad != 0 {
        // The last block goes out zero-padded; its CRC covers the padding.
        w.st.buf[BLOCK + w.fill..BLOCK + w.fill + pad].fill(0);
        w.st.crcs.push(crc32c::crc32c_append(w.crc, &ZEROS[..pad]));
        w.crc = 0;
    }
    let blocks = (w.fill + pad) / BLOCK;
    let mut h = RecordHeader::new(if commit.is_some() {
        kind::SEGMENT | kind::COMMIT
    } else {
        kind::SEGMENT
    });
    h.write_id = U64::new(w.write_id);
    h.payload_len = U32::new(w.fill as u32);
    for (slot, crc) in h.block_crcs.iter_mut().zip(&w.st.crcs) {
        *slot = U32::new(*crc);
    }
    if let Some(fp) = commit {
        h.set_commit(fp, w.total, 1);
    }
    let mut rec = std::mem::replace(&mut w.st.buf, spare);
    rec.set_len(BLOCK * (1 + blocks));
    let a = match vol.append_async(&mut h, rec, Reserve::Data) {
        Ok(a) => a,
        Err((e, mut rec)) => {
            let cap = rec.capacity();
            rec.set_len(cap);
            w.st.buf = rec;
            return Err(e);
        }
    };
    if w.write_id == 0 {
        w.write_id = a.seq;
        w.first_lp = Some(a.lp);
    }
    w.st.extents.push(Extent {
        hdr: a.phys,
        len: w.fill as u32,
        packed: false,
    });
    w.bytes += a.size;
    vol.open_bytes += a.size;
    counters.bytes_written += a.size;
    w.fill = 0;
    w.st.crcs.clear();
    w.crc = 0;
    Ok(())
}
