//! One disk of the store: its device, its superblock and the state of its circular log
//! (head, tail, next seq, epoch), its space accounting, and the two things only a disk
//! can do on its own: append a record at the tail and rebuild its part of the index
//! from its checkpoint and log at open (format or recovery). It knows nothing of other
//! disks or of in-flight writes beyond the byte counts the store keeps here for
//! reporting. Writing checkpoints is `checkpoint`'s business; this module only keeps
//! the record of which one is in use ([`CkptState`]).
//!
//! Positions in the log are kept as *logical* offsets (`lp`) that only grow: the byte
//! at `lp` lives at `log_start + lp % log_len`. The bytes a WRAP skips count as used,
//! so `tail_lp - head_lp` is exactly the space between head and tail and a full log
//! is never confused with an empty one. Only physical offsets go to disk.

use std::collections::{BTreeSet, HashMap, VecDeque};

use nvme::{AlignedBuf, BlockDevice, Completion, DevError, DeviceInfo, IoOp, IoTag};
use rand::Rng;
use tracing::{debug, error, info, warn};
use zerocopy::little_endian::U64;
use zerocopy::IntoBytes;

use dosp::Fingerprint;

use super::checkpoint::{self, Loaded};
use super::counted::{Corruption, Counted, LastError};
use super::format::{
    kind, packed_size, packed_start, record_size, Geometry, PackedHeader, RecordHeader, SbSlot,
    Superblock, BLOCK, BLOCK_U64, FIXED_BLOCKS, MAX_SEGMENT_BLOCKS, PACKED_HDR, PACKED_MAX_DATA,
    PACK_ALIGN, SEQ_SANE_MAX,
};
use super::{DiskId, DiskState, Entry, Extent, StoreConfig, StoreError};

/// Which headroom an append may eat into. Ordinary data keeps clear of both
/// reserves; a reference-count record (delete, dedup) may use the small metadata
/// reserve so that a full disk can still be emptied; compaction may use everything,
/// since it is what turns dead space back into free space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reserve {
    Data,
    Meta,
    Compaction,
}

/// What a disk knows of its index checkpoints (see format.rs, "Index checkpoint").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CkptState {
    /// Seq S covered by the checkpoint in use: loaded at open or last written. It stays
    /// usable for the next open as long as compaction keeps the head at or before S.
    pub seq: Option<u64>,
    /// The slot holding it: the next checkpoint goes to the other one, so that a crash
    /// while writing never touches the one in use.
    pub slot: Option<u8>,
    /// Highest generation of any header of this disk seen or written: the next
    /// checkpoint gets a higher one, so it wins over both slots at the next open.
    pub generation: u64,
    /// Body bytes a snapshot may take (the slot size, unless a test lowers it).
    pub capacity: u64,
    /// This disk's part of the in-memory index no longer equals what its log replays to
    /// (a duplicate could not be retired at open): a snapshot of it would be wrong, so
    /// none is written until the next open rebuilds the index from the log.
    pub diverged: bool,
    /// S of the checkpoint the last open started from (`None`: full scan).
    pub loaded: Option<u64>,
}

/// Where an appended record landed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Appended {
    pub phys: u64,
    pub lp: u64,
    pub seq: u64,
    pub size: u64,
}

pub(crate) struct Volume {
    pub id: DiskId,
    /// Every device call goes through here, so the I/O counters miss none.
    dev: Counted,
    pub info: DeviceInfo,
    pub state: DiskState,
    /// Down because the device failed or the disk could not be opened, as opposed to
    /// set Down by an operator: only the latter may be brought back without a restart,
    /// since after a failed write the in-memory tail may not match the disk.
    pub failed: bool,
    pub sb: Superblock,
    /// Where the checkpoint slots and the log are.
    pub geo: Geometry,
    /// First byte of the log (after the superblocks and the checkpoint area).
    pub log_start: u64,
    pub log_len: u64,
    pub head_lp: u64,
    pub head_seq: u64,
    pub tail_lp: u64,
    pub next_seq: u64,
    /// Every record with a smaller seq is durable (as of the last completed flush).
    pub durable_seq: u64,
    /// Footprint of the records of live objects.
    pub live_bytes: u64,
    /// Footprint of the records of in-flight writes.
    pub open_bytes: u64,
    pub objects: u64,
    pub open_writes: u32,
    /// Errors seen since open (device errors, checksum failures, an unusable disk);
    /// raised only through [`Volume::note_error`], which also records the last one.
    pub errors: u64,
    pub last_error: Option<LastError>,
    /// Objects of this disk found failing their checksums, raised only through
    /// [`Volume::note_corrupt`].
    pub corruption: Corruption,
    /// The device's own health log as last read (NVMe SMART); `None` for backends
    /// without one.
    pub health: Option<nvme::driver::SmartLog>,
    /// WRAP records written since open (the log went round the disk).
    pub wraps: u64,
    pub ckpt: CkptState,
    /// Records replayed from the log at open (after the checkpoint, if one was used).
    pub replayed: u64,
    /// Space compaction may need to move a segment, plus a WRAP's waste.
    res_compact: u64,
    /// Room for reference-count records on a disk otherwise full.
    res_meta: u64,
    /// Footprint of one full staged segment.
    pub seg_record: u64,
    /// One block for WRAP records and superblocks.
    scratch: AlignedBuf,
    /// Seqs of appended records whose write has not completed. Everything below the
    /// smallest is on the device (not necessarily durable).
    pub inflight: BTreeSet<u64>,
    /// The flush in flight, with the seq below which it makes every record durable.
    pub flushing: Option<u64>,
    /// Flushes submitted and completed without error since open, blocking ones
    /// included. Flushes run one at a time, so once `flushes_done` reaches `n`, the
    /// `n`-th flush submitted has completed: how a background task knows that a flush
    /// submitted after its write completed has made that write durable.
    pub flushes_submitted: u64,
    pub flushes_done: u64,
    /// A superblock write submitted by [`Volume::submit_sb`] has not completed: a
    /// blocking superblock write waits for it, so two copies are never written at once.
    pub sb_writing: bool,
    /// Record buffers given back by completed writes, for the store to reuse.
    pub done_bufs: Vec<AlignedBuf>,
    /// Read completions that arrived during a blocking wait, for the next `poll`.
    parked: Vec<Completion>,
    /// Completions of one poll, reused.
    got: Vec<Completion>,
    /// Packed records on their way to the device (see [`Pack`]).
    pack: Pack,
}

/// Bytes of an image of packed records: room for many small records per write, and
/// always for one of the largest behind a partial block.
const IMAGE_BYTES: usize = 256 << 10;
const _: () = assert!(IMAGE_BYTES >= 2 * BLOCK + PACKED_HDR + PACKED_MAX_DATA);

/// A run of whole blocks of the log as it will be written: packed records from a
/// block boundary on (the first block may start with records written before, copied
/// here unchanged), zero after the last one.
struct Image {
    /// Logical offset of its first byte (a block boundary).
    lp: u64,
    buf: AlignedBuf,
    /// Bytes filled.
    len: usize,
    /// Seqs of its records not yet written.
    seqs: Vec<u64>,
}

/// Packed records share blocks, so the block at the tail is written again each time a
/// record joins it. Two writes of one block must never be in flight together (a device
/// may complete them in either order), so a write of the tail block waits for the one
/// before it; records appended meanwhile gather in the image and go out together with
/// it. Every rewrite carries the earlier records' bytes unchanged, so a torn rewrite
/// cannot damage them (whatever part of the block lands, their bytes are the same).
#[derive(Default)]
struct Pack {
    /// The image the tail is in. Whenever the tail is not on a block boundary there is
    /// one, ending at the tail.
    open: Option<Image>,
    /// Images the tail has left (a segment record or a WRAP followed) with records
    /// still to write, each waiting for the write in flight on its first block.
    closed: VecDeque<Image>,
    /// Image writes in flight, by slot: the seqs each carries and the logical offset
    /// of its last block if that block is partial (the tail may write it again).
    writes: Vec<Option<(Vec<u64>, Option<u64>)>>,
    spare: Vec<AlignedBuf>,
}

impl Pack {
    /// Whether a write of the block at `lp` is in flight.
    fn busy(&self, lp: u64) -> bool {
        self.writes
            .iter()
            .flatten()
            .any(|(_, partial)| *partial == Some(lp))
    }

    fn buffer(&mut self) -> AlignedBuf {
        self.spare
            .pop()
            .unwrap_or_else(|| AlignedBuf::new(IMAGE_BYTES))
    }
}

/// What `Volume::record_at` found.
enum Found {
    Record(Scanned),
    /// Nothing of this log (zeros, old data, a record with another seq).
    Nothing,
    /// A header of this log (magic and nonce) that fails its crc or checks.
    Damaged,
}

/// Tags of a volume's asynchronous operations: the class in the top byte.
pub(crate) const TAG_RECORD: u64 = 1 << 56;
pub(crate) const TAG_FLUSH: u64 = 2 << 56;
pub(crate) const TAG_READ: u64 = 3 << 56;
/// The disk probe's one-block read (see `Store::probe_start`).
pub(crate) const TAG_PROBE: u64 = 4 << 56;
/// A write of a checkpoint being written in the background (body chunk or header).
pub(crate) const TAG_CKPT: u64 = 5 << 56;
/// A superblock write submitted by [`Volume::submit_sb`]; settled here.
pub(crate) const TAG_SB: u64 = 6 << 56;
/// A write of an image of packed records (see [`Pack`]).
pub(crate) const TAG_PACK: u64 = 7 << 56;
/// A read of a compaction task (see `compact`): the window's bytes or a live record.
pub(crate) const TAG_COMPACT: u64 = 8 << 56;
pub(crate) const TAG_CLASS: u64 = 0xff << 56;
/// Completions taken from a device per poll.
pub(crate) const POLL_MAX: usize = 256;

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("head_lp", &self.head_lp)
            .field("tail_lp", &self.tail_lp)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

/// A record header as seen by the recovery scan: what replay needs, without the CRCs.
#[derive(Clone, Debug)]
pub(crate) struct Scanned {
    pub seq: u64,
    pub lp: u64,
    phys: u64,
    /// Bytes of log it takes (a WRAP: to the end of the lap).
    pub size: u64,
    /// A packed record (its data inline after its header).
    packed: bool,
    pub kind: u8,
    epoch: u64,
    payload_len: u32,
    write_id: u64,
    durable_seq: u64,
    fp: Fingerprint,
    object_len: u64,
    refcount: u32,
    delta: i32,
}

/// What a disk holds after open: its objects, keyed by fingerprint.
pub(crate) type LocalIndex = HashMap<Fingerprint, Entry>;

/// Segments of writes not (yet) committed, by write id, in log order.
pub(crate) type Pending = HashMap<u64, Vec<Extent>>;

/// Where replay starts: the head with nothing known, or a checkpoint's position with
/// its index and pending writes.
struct Start {
    lp: u64,
    seq: u64,
    /// No record from here on may carry a smaller epoch.
    epoch: u64,
    index: LocalIndex,
    pending: Pending,
}

/// What a rebuild found, before anything is written back.
struct Rebuilt {
    index: LocalIndex,
    start_seq: u64,
    /// Seq where the durable log ends (the next record to write).
    cut: u64,
    /// Seq where the scan stopped (past `cut` if a torn tail is dropped).
    end_seq: u64,
    tail_lp: u64,
    /// The first dropped record's offset, if the tail is torn.
    torn_phys: Option<u64>,
    durable: u64,
}

impl Volume {
    /// Opens a disk: formats it if blank, recovers it if it has a valid superblock,
    /// and otherwise returns it Down (with the reason logged). Never fails: one bad
    /// disk must not keep the node from using the others. `ckpt_buf` is the transfer
    /// buffer for reading a checkpoint body.
    pub fn open(
        id: DiskId,
        dev: Box<dyn BlockDevice>,
        cfg: &StoreConfig,
        node_id: u64,
        rng: &mut impl Rng,
        ckpt_buf: &mut AlignedBuf,
    ) -> (Volume, LocalIndex) {
        let info = dev.info().clone();
        let seg_record = record_size(cfg.segment_bytes as u64);
        let mut vol = Volume {
            id,
            dev: Counted::new(dev),
            info,
            state: DiskState::Down,
            failed: true,
            sb: Superblock {
                identity: [0; 16],
                node_id: 0,
                size_bytes: 0,
                log_nonce: 0,
                log_head: 0,
                head_seq: 1,
                verified_seq: 1,
                epoch: 1,
                generation: 0,
                ckpt_blocks: 0,
            },
            geo: Geometry {
                size_bytes: 0,
                ckpt_blocks: 0,
            },
            log_start: 0,
            log_len: 0,
            head_lp: 0,
            head_seq: 1,
            tail_lp: 0,
            next_seq: 1,
            durable_seq: 1,
            live_bytes: 0,
            open_bytes: 0,
            objects: 0,
            open_writes: 0,
            errors: 0,
            last_error: None,
            corruption: Corruption::default(),
            health: None,
            wraps: 0,
            ckpt: CkptState::default(),
            replayed: 0,
            res_compact: 2 * seg_record + 4 * BLOCK_U64,
            res_meta: 32 * BLOCK_U64,
            seg_record,
            scratch: AlignedBuf::new(BLOCK),
            inflight: BTreeSet::new(),
            flushing: None,
            flushes_submitted: 0,
            flushes_done: 0,
            sb_writing: false,
            done_bufs: Vec::new(),
            parked: Vec::new(),
            got: Vec::with_capacity(POLL_MAX),
            pack: Pack::default(),
        };
        match vol.open_inner(node_id, rng, ckpt_buf) {
            Ok(index) => {
                vol.state = DiskState::Online;
                vol.failed = false;
                (vol, index)
            }
            Err(why) => {
                error!(disk = id.0, location = %vol.info.location, "disk unusable, marked down: {why}");
                vol.note_error(format!("disk unusable: {why}"));
                vol.state = DiskState::Down;
                vol.failed = true;
                (vol, LocalIndex::new())
            }
        }
    }

    fn open_inner(
        &mut self,
        node_id: u64,
        rng: &mut impl Rng,
        ckpt_buf: &mut AlignedBuf,
    ) -> Result<LocalIndex, String> {
        // Both superblock copies and both checkpoint headers in one read (a device too
        // small for four blocks is refused below anyway; read what it has).
        let fixed = if self.info.size_bytes >= FIXED_BLOCKS * BLOCK_U64 {
            FIXED_BLOCKS as usize
        } else {
            2
        };
        let mut blocks = AlignedBuf::new(fixed * BLOCK);
        self.dev
            .read_at(0, &mut blocks)
            .map_err(|e| format!("cannot read the superblock: {e}"))?;
        let slots = [
            Superblock::decode(&blocks[..BLOCK]),
            Superblock::decode(&blocks[BLOCK..]),
        ];
        if let Some(v) = slots.iter().find_map(|s| match s {
            SbSlot::UnknownVersion(v) => Some(*v),
            _ => None,
        }) {
            return Err(format!(
                "unknown format version {v} (this build reads version {})",
                super::format::FORMAT_VERSION
            ));
        }
        let best = slots
            .iter()
            .filter_map(|s| match s {
                SbSlot::Valid(sb) => Some(*sb),
                _ => None,
            })
            .max_by_key(|sb| sb.generation);
        match best {
            Some(sb) => self.recover(sb, node_id, &blocks[2 * BLOCK..], ckpt_buf),
            None if blocks[..BLOCK].iter().all(|&b| b == 0) => {
                self.format(node_id, rng)?;
                Ok(LocalIndex::new())
            }
            None => Err("corrupt superblock (neither copy is valid)".to_string()),
        }
    }

    /// Checks the layout (it must leave room for a log of at least a few segments) and
    /// sets `log_start`, `log_len` and the checkpoint capacity.
    fn set_geometry(&mut self, geo: Geometry) -> Result<(), String> {
        let log_len = geo.log_len();
        let min = self.res_compact + self.res_meta + 2 * self.seg_record;
        if log_len < min {
            return Err(format!(
                "disk of {} bytes is too small for segments of {} bytes (needs at least {} bytes)",
                geo.size_bytes,
                self.seg_record - BLOCK_U64,
                min + geo.log_start()
            ));
        }
        self.geo = geo;
        self.log_start = geo.log_start();
        self.log_len = log_len;
        self.ckpt.capacity = geo.ckpt_body_bytes();
        Ok(())
    }

    fn format(&mut self, node_id: u64, rng: &mut impl Rng) -> Result<(), String> {
        let geo = Geometry::for_size(self.info.size_bytes);
        let size = geo.size_bytes;
        self.set_geometry(geo)?;
        self.sb = Superblock {
            identity: rng.gen(),
            node_id,
            size_bytes: size,
            log_nonce: rng.gen(),
            log_head: geo.log_start(),
            head_seq: 1,
            verified_seq: 1,
            epoch: 1,
            generation: 0,
            ckpt_blocks: geo.ckpt_blocks,
        };
        // Copy B first, then copy A, each flushed: a crash in between leaves a valid
        // copy B, a crash before leaves block 0 blank (see format.rs).
        for _ in 0..2 {
            self.write_sb().map_err(|e| format!("cannot format: {e}"))?;
        }
        self.head_lp = 0;
        self.tail_lp = 0;
        self.head_seq = 1;
        self.next_seq = 1;
        self.durable_seq = 1;
        info!(
            disk = self.id.0,
            identity = %hex::encode(self.sb.identity),
            location = %self.info.location,
            size,
            "formatted blank disk"
        );
        Ok(())
    }

    /// Rebuilds this disk's index from its newest usable checkpoint and the log after
    /// it, or from the whole log (see the module doc of `store` for the rules), then
    /// durably starts a new epoch so that nothing past the recovered tail can ever be
    /// taken for part of the log. `ckpt_headers` holds the two checkpoint header blocks
    /// as read with the superblocks (empty on a device too small to have them).
    fn recover(
        &mut self,
        sb: Superblock,
        node_id: u64,
        ckpt_headers: &[u8],
        ckpt_buf: &mut AlignedBuf,
    ) -> Result<LocalIndex, String> {
        if sb.size_bytes > self.info.size_bytes {
            return Err(format!(
                "formatted for {} bytes but the device has only {}",
                sb.size_bytes, self.info.size_bytes
            ));
        }
        let geo = sb.geometry().ok_or_else(|| {
            format!(
                "checkpoint area of 2 x {} blocks leaves no log on {} bytes",
                sb.ckpt_blocks, sb.size_bytes
            )
        })?;
        self.set_geometry(geo)?;
        if sb.log_head < self.log_start
            || sb.log_head >= geo.size_bytes
            || !sb.log_head.is_multiple_of(PACK_ALIGN)
        {
            return Err(format!(
                "superblock log head {} is out of range",
                sb.log_head
            ));
        }
        // Sequence numbers grow by one per record: anything near the top of the range
        // is damage (however unlikely past the crc), and would overflow below.
        if sb.head_seq == 0
            || sb.head_seq > SEQ_SANE_MAX
            || sb.verified_seq > SEQ_SANE_MAX
            || sb.epoch > SEQ_SANE_MAX
        {
            return Err(format!(
                "superblock sequence numbers out of range (head {}, verified {}, epoch {})",
                sb.head_seq, sb.verified_seq, sb.epoch
            ));
        }
        if sb.node_id != node_id {
            warn!(
                disk = self.id.0,
                formatted_by = sb.node_id,
                node_id,
                "disk was formatted by another node; using it"
            );
        }
        self.sb = sb;
        self.head_lp = sb.log_head - self.log_start;
        self.head_seq = sb.head_seq;

        let (loaded, generation) =
            checkpoint::load(&mut self.dev, self.id, &geo, &sb, ckpt_headers, ckpt_buf);
        self.ckpt.generation = generation;
        let rebuilt = match loaded {
            Some(c) => {
                let (seq, slot) = (c.seq, c.slot);
                match self.rebuild(self.start_at(c)) {
                    Ok(r) => {
                        self.ckpt.seq = Some(seq);
                        self.ckpt.slot = Some(slot);
                        self.ckpt.loaded = Some(seq);
                        r
                    }
                    Err(why) => {
                        // The full scan is the authority: it may still succeed (the
                        // checkpoint was inconsistent) or give the verdict it always
                        // gave.
                        warn!(
                            disk = self.id.0,
                            seq,
                            "replay from the checkpoint failed ({why}); scanning the whole log"
                        );
                        self.rebuild(self.start_at_head())?
                    }
                }
            }
            None => self.rebuild(self.start_at_head())?,
        };
        let Rebuilt {
            index,
            start_seq,
            cut,
            end_seq,
            tail_lp,
            torn_phys,
            durable,
        } = rebuilt;

        self.tail_lp = tail_lp;
        self.next_seq = cut;
        if let Some(phys) = torn_phys {
            // The record at the cut has a valid header but data that never became
            // durable. Erase the header so that a crash before it is overwritten
            // cannot bring it (and what follows it) back.
            warn!(
                disk = self.id.0,
                seq = cut,
                "torn tail: dropping {} unacknowledged record(s)",
                end_seq - cut
            );
            if phys.is_multiple_of(BLOCK_U64) {
                self.scratch.fill(0);
                self.dev
                    .write_at(phys, &self.scratch)
                    .map_err(|e| format!("cannot erase torn record: {e}"))?;
            }
        }
        // The tail's block, if partly used, becomes the open image, and everything past
        // the tail in it is erased now (a torn packed record, old data), so that no
        // crash can bring it back.
        self.open_tail_image()
            .map_err(|e| format!("cannot erase the rest of the tail block: {e}"))?;
        self.sb.epoch += 1;
        self.sb.verified_seq = cut;
        self.write_sb()
            .map_err(|e| format!("cannot update superblock: {e}"))?;
        self.durable_seq = cut;
        self.live_bytes = index.values().map(|e| e.footprint).sum();
        self.objects = index.len() as u64;
        self.replayed = cut - start_seq;
        info!(
            disk = self.id.0,
            identity = %hex::encode(self.sb.identity),
            objects = self.objects,
            checkpoint = ?self.ckpt.loaded,
            records = self.replayed,
            verified_from = durable,
            "recovered disk"
        );
        Ok(index)
    }

    /// Replay from the log head, knowing nothing.
    fn start_at_head(&self) -> Start {
        Start {
            lp: self.head_lp,
            seq: self.head_seq,
            epoch: 0,
            index: LocalIndex::new(),
            pending: Pending::new(),
        }
    }

    /// Replay from a loaded checkpoint.
    fn start_at(&self, c: Loaded) -> Start {
        Start {
            lp: self.head_lp + c.dist,
            seq: c.seq,
            epoch: c.epoch,
            index: c.index,
            pending: c.pending,
        }
    }

    /// Scans the log from `start`, finds where its durable part ends and replays it onto
    /// `start`'s index. Writes nothing: the caller may still throw the result away.
    fn rebuild(&mut self, start: Start) -> Result<Rebuilt, String> {
        let (recs, end_lp, damaged) = self
            .scan(start.lp, start.seq, start.epoch)
            .map_err(|e| format!("log scan failed: {e}"))?;
        let end_seq = start.seq + recs.len() as u64;
        // Where the scan stopped must be a torn or never-written tail. If the record
        // there is known durable, its header rotted: refuse to truncate the log (that
        // would silently drop acknowledged records) and leave the disk alone.
        if end_seq < self.sb.verified_seq {
            return Err(format!(
                "log damaged: it ends at seq {end_seq} but records up to {} were verified durable",
                self.sb.verified_seq
            ));
        }
        if damaged
            && self
                .durable_successor(end_lp, end_seq)
                .map_err(|e| format!("log scan failed: {e}"))?
        {
            return Err(format!(
                "log damaged: record {end_seq} at offset {} is unreadable but a later record shows it was durable",
                self.phys(end_lp)
            ));
        }
        // Every record before a checkpoint was flushed before the checkpoint was written.
        let durable = recs
            .iter()
            .map(|r| r.durable_seq)
            .max()
            .unwrap_or(0)
            .max(self.sb.verified_seq)
            .max(start.seq);
        let carried: HashMap<u64, u64> = start
            .pending
            .iter()
            .map(|(w, xs)| (*w, xs.iter().map(|x| u64::from(x.len)).sum()))
            .collect();
        let cut = self
            .find_torn_tail(&recs, durable, end_seq, &carried)
            .map_err(|e| format!("log verification failed: {e}"))?;
        let index = self.replay(&recs, cut, start.index, start.pending);
        let torn = recs.get((cut - start.seq) as usize);
        Ok(Rebuilt {
            index,
            start_seq: start.seq,
            cut,
            end_seq,
            tail_lp: torn.map_or(end_lp, |r| r.lp),
            torn_phys: torn.map(|r| r.phys),
            durable,
        })
    }

    /// Reads record headers from `lp` (where record `seq` is expected, with an epoch of
    /// at least `min_epoch`) until the first one that is not the next record of this
    /// log. Returns them, the logical offset where the scan stopped, and whether the
    /// bytes there look like a damaged header of this log (magic and nonce, but no
    /// valid crc): a clean tail (stale record, old data, zeros) does not.
    fn scan(
        &mut self,
        lp: u64,
        seq: u64,
        min_epoch: u64,
    ) -> Result<(Vec<Scanned>, u64, bool), DevError> {
        let mut buf = AlignedBuf::new(BLOCK);
        let mut held = None;
        let mut recs = Vec::new();
        let (mut lp, mut seq, mut prev_epoch) = (lp, seq, min_epoch);
        while lp - self.head_lp < self.log_len {
            let r = match self.record_at(lp, seq, &mut buf, &mut held)? {
                Found::Record(r) => r,
                Found::Nothing => break,
                Found::Damaged => return Ok((recs, lp, true)),
            };
            if r.epoch < prev_epoch || r.epoch > self.sb.epoch {
                break;
            }
            prev_epoch = r.epoch;
            lp = r.lp + r.size;
            seq += 1;
            recs.push(r);
        }
        Ok((recs, lp, false))
    }

    /// The record `seq` where the log continues after a record ending at `lp`: a
    /// packed record at `lp` (or at the next block boundary, if its header would not
    /// fit in the rest of the block), or any record at the next block boundary (a
    /// segment record or WRAP follows packed ones there, the rest of the block
    /// skipped). `buf` is one block; `held` says which block it holds. Checks the
    /// record's place (seq, bounds), not its epoch.
    fn record_at(
        &mut self,
        lp: u64,
        seq: u64,
        buf: &mut AlignedBuf,
        held: &mut Option<u64>,
    ) -> Result<Found, DevError> {
        let boundary = lp.next_multiple_of(BLOCK_U64);
        let mut candidates = [Some(lp), None];
        if boundary != lp {
            candidates[1] = Some(boundary);
        }
        for at in candidates.into_iter().flatten() {
            if at - self.head_lp >= self.log_len {
                break;
            }
            let phys = self.phys(at);
            let block_phys = phys - phys % BLOCK_U64;
            if *held != Some(block_phys) {
                *held = None;
                self.dev.read_at(block_phys, buf)?;
                *held = Some(block_phys);
            }
            if let Some(f) = self.examine(at, lp, seq, buf) {
                return Ok(f);
            }
        }
        Ok(Found::Nothing)
    }

    /// One candidate place `at` of `record_at` (`lp` where the previous record
    /// ended), with `block` the log block `at` falls in: the record found there, the
    /// end of the log, or `None` to try the next candidate.
    fn examine(&self, at: u64, lp: u64, seq: u64, block: &[u8]) -> Option<Found> {
        let phys = self.phys(at);
        let buf = block.get(..BLOCK)?;
        let off = (phys % BLOCK_U64) as usize;
        let nonce = self.sb.log_nonce;
        let mut found = None;
        if off == 0 {
            if let Some(h) = RecordHeader::check(buf, nonce) {
                let size = if h.kind == kind::WRAP {
                    self.log_len - at % self.log_len
                } else {
                    record_size(u64::from(h.payload_len.get()))
                };
                found = (h.seq.get() == seq).then(|| Scanned {
                    seq,
                    lp: at,
                    phys,
                    size,
                    packed: false,
                    kind: h.kind,
                    epoch: h.epoch.get(),
                    payload_len: h.payload_len.get(),
                    write_id: h.write_id.get(),
                    durable_seq: h.durable_seq.get(),
                    fp: h.fingerprint(),
                    object_len: h.object_len.get(),
                    refcount: h.refcount.get(),
                    delta: h.delta.get(),
                });
            }
        }
        if found.is_none() && off + PACKED_HDR <= BLOCK {
            if let Some(h) = PackedHeader::check(&buf[off..], nonce) {
                let commit = h.kind == kind::COMMIT;
                found = (h.seq.get() == seq).then(|| Scanned {
                    seq,
                    lp: at,
                    phys,
                    size: h.size(),
                    packed: true,
                    // A packed COMMIT is its own write's one segment.
                    kind: if commit {
                        kind::SEGMENT | kind::COMMIT
                    } else {
                        h.kind
                    },
                    epoch: h.epoch.get(),
                    payload_len: h.data_len.get(),
                    write_id: seq,
                    durable_seq: h.durable_seq.get(),
                    fp: h.fingerprint(),
                    object_len: u64::from(h.data_len.get()),
                    refcount: if commit { h.count.get() } else { 0 },
                    delta: if commit { 0 } else { h.delta() },
                });
            }
        }
        if let Some(r) = found {
            // A record never straddles the end of the disk, nor runs into the head.
            if r.phys + r.size > self.sb.size_bytes || at + r.size - self.head_lp > self.log_len {
                return Some(Found::Nothing);
            }
            return Some(Found::Record(r));
        }
        // Damage where the record was due ends the log here; only zeros, old data
        // or a record of another seq let the boundary be tried.
        if at == lp
            && ((off == 0 && buf[..16] == self.big_prefix())
                || PackedHeader::looks_like(&buf[off..], nonce))
        {
            let valid = (off == 0 && RecordHeader::check(buf, nonce).is_some())
                || (off + PACKED_HDR <= BLOCK && PackedHeader::check(&buf[off..], nonce).is_some());
            if !valid {
                return Some(Found::Damaged);
            }
        }
        None
    }

    /// `record_at` on log bytes already read (a compaction step's window): `block_of(b)` gives the
    /// block at logical offset `b` (a block boundary), if it was read. `None` when a
    /// block it needs was not; `Some(None)` where the log does not go on (its end, or
    /// damage); the same rules as `record_at`, without the device.
    pub fn record_in<'a>(
        &self,
        lp: u64,
        seq: u64,
        mut block_of: impl FnMut(u64) -> Option<&'a [u8]>,
    ) -> Option<Option<Scanned>> {
        let boundary = lp.next_multiple_of(BLOCK_U64);
        let mut candidates = [Some(lp), None];
        if boundary != lp {
            candidates[1] = Some(boundary);
        }
        for at in candidates.into_iter().flatten() {
            if at - self.head_lp >= self.log_len {
                break;
            }
            let block = block_of(at - at % BLOCK_U64)?;
            match self.examine(at, lp, seq, block) {
                Some(Found::Record(r)) => return Some(Some(r)),
                Some(_) => return Some(None),
                None => {}
            }
        }
        Some(None)
    }

    /// Magic and nonce: how a segment record's header of this log starts.
    fn big_prefix(&self) -> [u8; 16] {
        let mut p = [0; 16];
        p[..8].copy_from_slice(&super::format::REC_MAGIC);
        p[8..].copy_from_slice(&self.sb.log_nonce.to_le_bytes());
        p
    }

    /// After the scan stopped at `lp` expecting record `seq`: is there, where record
    /// `seq + 1` could start, a valid record `seq + 1` whose `durable_seq` vouches that
    /// record `seq` had been flushed? A torn tail can never produce one.
    fn durable_successor(&mut self, lp: u64, seq: u64) -> Result<bool, DevError> {
        let mut buf = AlignedBuf::new(BLOCK);
        let lap_end = lp - lp % self.log_len + self.log_len;
        let first = lp - lp % BLOCK_U64;
        // A packed successor starts within a packed record's reach of `lp`; a segment
        // record or WRAP at a block boundary within a segment record's.
        let packed_reach = lp + packed_size(PACKED_MAX_DATA as u64) + BLOCK_U64;
        let reach = (0..=MAX_SEGMENT_BLOCKS as u64 + 1)
            .map(|k| first + k * BLOCK_U64)
            .take_while(|&p| p < lap_end)
            .chain(std::iter::once(lap_end));
        let nonce = self.sb.log_nonce;
        let vouches = |s: u64, durable: u64, epoch: u64, max_epoch: u64| {
            s == seq + 1 && durable > seq && epoch <= max_epoch
        };
        for p in reach {
            if p - self.head_lp >= self.log_len {
                break;
            }
            self.dev.read_at(self.phys(p), &mut buf)?;
            if p > lp {
                if let Some(h) = RecordHeader::check(&buf, nonce) {
                    if vouches(
                        h.seq.get(),
                        h.durable_seq.get(),
                        h.epoch.get(),
                        self.sb.epoch,
                    ) {
                        return Ok(true);
                    }
                }
            }
            if p >= packed_reach || p == lap_end {
                continue;
            }
            for off in (0..=BLOCK - PACKED_HDR).step_by(PACK_ALIGN as usize) {
                if p + off as u64 <= lp {
                    continue;
                }
                if let Some(h) = PackedHeader::check(&buf[off..], nonce) {
                    if vouches(
                        h.seq.get(),
                        h.durable_seq.get(),
                        h.epoch.get(),
                        self.sb.epoch,
                    ) {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Finds where the durable log really ends. Records below `durable` are trusted.
    /// For every committed write, each of its segments at or past `durable` has its
    /// data read back: one that fails its block CRCs was written after the last flush
    /// that completed, so nothing from it on was ever acknowledged and the log is cut
    /// there. (Rot in a segment below `durable` is not a torn write: it is left for
    /// reads to report.) `carried` holds the payload bytes of pending writes' segments
    /// before the first scanned record (from a checkpoint: all durable). Returns the seq
    /// to cut at (`end_seq` if nothing is torn).
    fn find_torn_tail(
        &mut self,
        recs: &[Scanned],
        durable: u64,
        end_seq: u64,
        carried: &HashMap<u64, u64>,
    ) -> Result<u64, DevError> {
        let mut cut = end_seq;
        let mut pending: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut hdr = AlignedBuf::new(BLOCK);
        let mut data = AlignedBuf::new(64 * BLOCK);
        for (i, r) in recs.iter().enumerate() {
            if r.seq >= cut {
                break;
            }
            if r.kind & kind::SEGMENT != 0 {
                pending.entry(r.write_id).or_default().push(i);
            }
            if r.kind & kind::COMMIT == 0 {
                continue;
            }
            let segs = pending.remove(&r.write_id).unwrap_or_default();
            let before = carried.get(&r.write_id).copied().unwrap_or(0);
            let total: u64 = before
                + segs
                    .iter()
                    .map(|&j| u64::from(recs[j].payload_len))
                    .sum::<u64>();
            if total != r.object_len {
                continue; // partly behind the head: replay ignores it too
            }
            for j in segs {
                let s = &recs[j];
                if s.seq >= durable
                    && s.seq < cut
                    && !(if s.packed {
                        self.packed_intact(s.phys, s.payload_len, &mut data)?
                    } else {
                        self.segment_intact(s.phys, s.payload_len, &mut hdr, &mut data)?
                    })
                {
                    debug!(disk = self.id.0, seq = s.seq, "segment data is torn");
                    cut = s.seq;
                }
            }
        }
        Ok(cut)
    }

    /// Reads a packed record back and checks its data against its header's CRC.
    fn packed_intact(
        &mut self,
        phys: u64,
        data_len: u32,
        data: &mut AlignedBuf,
    ) -> Result<bool, DevError> {
        let off = (phys % BLOCK_U64) as usize;
        let end = (off + PACKED_HDR + data_len as usize).next_multiple_of(BLOCK);
        let Some(buf) = data.get_mut(..end) else {
            return Ok(false);
        };
        self.dev.read_at(phys - off as u64, buf)?;
        let Some(h) = PackedHeader::check(&buf[off..], self.sb.log_nonce) else {
            return Ok(false);
        };
        let at = off + PACKED_HDR;
        Ok(h.data_crc.get() == crc32c::crc32c(&buf[at..at + data_len as usize]))
    }

    /// Reads a segment back and checks every payload block against its header's CRC.
    fn segment_intact(
        &mut self,
        phys: u64,
        payload_len: u32,
        hdr: &mut AlignedBuf,
        data: &mut AlignedBuf,
    ) -> Result<bool, DevError> {
        self.dev.read_at(phys, hdr)?;
        let Some(h) = RecordHeader::check(hdr, self.sb.log_nonce) else {
            return Ok(false);
        };
        let blocks = (payload_len as usize).div_ceil(BLOCK);
        let per_read = data.len() / BLOCK;
        let mut b = 0;
        while b < blocks {
            let n = per_read.min(blocks - b);
            let buf = &mut data[..n * BLOCK];
            self.dev.read_at(phys + BLOCK_U64 * (1 + b as u64), buf)?;
            for (k, block) in buf.chunks_exact(BLOCK).enumerate() {
                if h.block_crc(b + k) != Some(crc32c::crc32c(block)) {
                    return Ok(false);
                }
            }
            b += n;
        }
        Ok(true)
    }

    /// Applies the records with seq below `cut` in order to `index` (with `pending`
    /// the segments already collected for uncommitted writes) and returns the objects.
    fn replay(
        &self,
        recs: &[Scanned],
        cut: u64,
        mut index: LocalIndex,
        mut pending: Pending,
    ) -> LocalIndex {
        for r in recs.iter().take_while(|r| r.seq < cut) {
            if r.kind & kind::SEGMENT != 0 {
                pending.entry(r.write_id).or_default().push(Extent {
                    hdr: r.phys,
                    len: r.payload_len,
                    packed: r.packed,
                });
            }
            if r.kind & kind::COMMIT != 0 {
                let mut extents = pending.remove(&r.write_id).unwrap_or_default();
                if r.kind & kind::SEGMENT == 0 {
                    // A bare COMMIT still needs a record to stand for the object, so
                    // that compaction finds and moves it.
                    extents.push(Extent {
                        hdr: r.phys,
                        len: 0,
                        packed: false,
                    });
                }
                let total: u64 = extents.iter().map(|e| u64::from(e.len)).sum();
                if total != r.object_len {
                    // Its first segments are behind the head: this is an old copy that
                    // compaction moved; the moved COMMIT comes later in the log.
                    debug!(disk = self.id.0, seq = r.seq, "skipping partial old copy");
                    continue;
                }
                let footprint = extents.iter().map(Extent::size).sum();
                // Absolute refcount: a later COMMIT of the same fingerprint (a moved
                // copy) replaces the entry whatever REFs came before it.
                index.insert(
                    r.fp,
                    Entry {
                        disk: self.id,
                        len: r.object_len,
                        refcount: r.refcount,
                        write_id: r.write_id,
                        extents,
                        footprint,
                    },
                );
            }
            if r.kind == kind::REF {
                if let Some(e) = index.get_mut(&r.fp) {
                    let rc = i64::from(e.refcount) + i64::from(r.delta);
                    if rc <= 0 {
                        index.remove(&r.fp);
                    } else {
                        e.refcount = u32::try_from(rc).unwrap_or(u32::MAX);
                    }
                }
                // A REF to an unknown fingerprint refers to a copy behind the head
                // that was either deleted or moved (the moved COMMIT is absolute).
            }
        }
        index
    }

    // ----- running -----

    /// Physical offset of logical offset `lp`.
    pub fn phys(&self, lp: u64) -> u64 {
        self.log_start + lp % self.log_len
    }

    /// Logical offset of a physical offset inside the live part of the log.
    pub fn lp_of(&self, phys: u64) -> u64 {
        let rel = phys - self.log_start;
        let head = self.head_lp % self.log_len;
        self.head_lp + (rel + self.log_len - head) % self.log_len
    }

    pub fn used(&self) -> u64 {
        self.tail_lp - self.head_lp
    }

    /// Bytes new data can use now.
    pub fn bytes_free(&self) -> u64 {
        (self.log_len - self.used()).saturating_sub(self.res_compact + self.res_meta)
    }

    /// Bytes new data could use on an empty log.
    pub fn capacity(&self) -> u64 {
        self.log_len
            .saturating_sub(self.res_compact + self.res_meta)
    }

    /// Bytes between head and tail that neither a live object nor an open write needs.
    pub fn bytes_dead(&self) -> u64 {
        self.used()
            .saturating_sub(self.live_bytes)
            .saturating_sub(self.open_bytes)
    }

    pub fn log_nonce(&self) -> u64 {
        self.sb.log_nonce
    }

    fn reserve(&self, class: Reserve) -> u64 {
        match class {
            Reserve::Data => self.res_compact + self.res_meta,
            Reserve::Meta => self.res_compact,
            Reserve::Compaction => 0,
        }
    }

    /// Whether a segment record of `size` bytes could be appended now.
    pub fn fits(&self, size: u64, class: Reserve) -> bool {
        let start = self.tail_lp.next_multiple_of(BLOCK_U64);
        let to_end = self.log_len - start % self.log_len;
        let need = start - self.tail_lp + if size > to_end { size + to_end } else { size };
        self.room_for(need, class)
    }

    /// Whether `need` more bytes of log fit at the tail. Blocks are written whole: the
    /// head's block is in use up to the head, and the block the new tail falls in
    /// is written to its end.
    fn room_for(&self, need: u64, class: Reserve) -> bool {
        let end = (self.tail_lp + need).next_multiple_of(BLOCK_U64);
        let head_block = self.head_lp - self.head_lp % BLOCK_U64;
        end - head_block + self.reserve(class) <= self.log_len
    }

    /// Where a packed record of `size` bytes would go, and the bytes of log that
    /// takes (with what is skipped to get there).
    fn packed_place(&self, size: u64) -> (u64, u64, bool) {
        let at = packed_start(self.tail_lp);
        let lap_end = self.tail_lp - self.tail_lp % self.log_len + self.log_len;
        if at + size > lap_end {
            (lap_end, lap_end - self.tail_lp + size, true)
        } else {
            (at, at - self.tail_lp + size, false)
        }
    }

    /// The error for an operation on a disk that is not Online.
    pub fn unavailable(&self) -> StoreError {
        match self.state {
            DiskState::Offline => StoreError::DiskOffline(self.id),
            _ => StoreError::DiskFailed {
                disk: self.id,
                source: DevError::Io {
                    offset: 0,
                    source: std::io::Error::other("disk is down"),
                },
            },
        }
    }

    pub fn check_online(&self) -> Result<(), StoreError> {
        if self.state == DiskState::Online {
            Ok(())
        } else {
            Err(self.unavailable())
        }
    }

    /// Counts an error of this disk and keeps it as the last one, for the reports.
    pub fn note_error(&mut self, message: String) {
        self.errors += 1;
        self.last_error = Some(LastError::now(message));
    }

    /// Object `fp` of this disk failed its checksum (`blocks` bad blocks, found `how`):
    /// counted as an error of the disk and as a damaged object (once, however often it
    /// fails), and named in the disk's last error so an operator knows which object to
    /// restore.
    pub fn note_corrupt(&mut self, fp: &Fingerprint, blocks: u64, how: &str) {
        self.corruption.note(*fp, blocks);
        self.note_error(format!("object {fp} failed its checksum {how}"));
    }

    /// I/O completed on the device since open.
    pub fn io(&self) -> super::counted::DiskIo {
        self.dev.io
    }

    /// A device error: the disk goes Down and the caller gets the error to return.
    pub fn fail(&mut self, e: DevError) -> StoreError {
        self.note_error(format!("device error: {e}"));
        if self.state != DiskState::Down {
            error!(disk = self.id.0, location = %self.info.location, "device error, disk is now down: {e}");
        }
        self.state = DiskState::Down;
        self.failed = true;
        StoreError::DiskFailed {
            disk: self.id,
            source: e,
        }
    }

    /// Re-reads the device's health log, where the backend has one. A failed read is
    /// logged, not a disk fault: the I/O path decides that.
    pub fn refresh_health(&mut self) {
        match self.dev.health() {
            None => {}
            Some(Ok(h)) => {
                if h.critical_warning != 0
                    && self
                        .health
                        .is_none_or(|old| old.critical_warning != h.critical_warning)
                {
                    tracing::warn!(
                        disk = self.id.0,
                        critical_warning = h.critical_warning,
                        "device reports a critical warning in its health log"
                    );
                }
                self.health = Some(h);
            }
            Some(Err(e)) => {
                tracing::warn!(disk = self.id.0, error = %e, "cannot read the device health log")
            }
        }
    }

    /// Makes every record appended so far durable, blocking (start-up, checkpoint,
    /// duplicate resolution): waits for the writes in flight, then flushes.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.settle_writes()?;
        let covered = self.next_seq;
        self.flushes_submitted += 1;
        self.dev.flush().map_err(|e| self.fail(e))?;
        self.flushes_done += 1;
        self.durable_seq = self.durable_seq.max(covered);
        Ok(())
    }

    /// Seq below which every appended record's write has completed.
    pub fn completed_upto(&self) -> u64 {
        self.inflight.first().copied().unwrap_or(self.next_seq)
    }

    /// Starts a flush covering every record whose write has completed (group commit:
    /// one flush for all the commits that finished writing meanwhile).
    pub fn submit_flush(&mut self) {
        debug_assert!(self.flushing.is_none());
        self.flushing = Some(self.completed_upto());
        self.flushes_submitted += 1;
        self.dev.submit(IoTag(TAG_FLUSH), IoOp::Flush);
    }

    /// Makes records below `seq` durable without waiting: true once they are; until
    /// then starts a flush when none is in flight and every record below `seq` has
    /// completed its write (the group commit's own flush, when one is running, may
    /// do it first). Never issues a second flush beside one in flight.
    pub fn durable_below(&mut self, seq: u64) -> bool {
        if self.durable_seq >= seq {
            return true;
        }
        if self.flushing.is_none() && self.completed_upto() >= seq {
            self.submit_flush();
        }
        false
    }

    /// Waits, without blocking, for the `n`-th flush since open to complete: true once
    /// it has; until then starts the next flush if none is in flight. A write whose
    /// completion came back before `flushes_submitted` was read is durable once the
    /// flush numbered one more has completed.
    pub fn flushed(&mut self, n: u64) -> bool {
        if self.flushes_done >= n {
            return true;
        }
        if self.flushing.is_none() && self.flushes_submitted < n {
            self.submit_flush();
        }
        false
    }

    /// Submits a one-block read at `phys` for the disk probe; its completion comes
    /// back from [`Volume::poll`] like a read's.
    pub fn submit_probe(&mut self, phys: u64, buf: AlignedBuf) {
        self.dev
            .submit(IoTag(TAG_PROBE), IoOp::Read { offset: phys, buf });
    }

    /// Submits a write into the checkpoint area (outside the log), tagged with `n`
    /// (a chunk of the body, or the header); not flushed. Its completion comes back
    /// from [`Volume::poll`].
    pub fn submit_ckpt_write(&mut self, n: u32, phys: u64, buf: AlignedBuf) {
        self.dev.submit(
            IoTag(TAG_CKPT | u64::from(n)),
            IoOp::Write { offset: phys, buf },
        );
    }

    /// [`Volume::write_sb`] without waiting: the superblock (generation + 1) goes to
    /// the other copy; [`Volume::sb_writing`] stays set until the write completed
    /// (a failure takes the disk Down). Not flushed: the caller flushes after.
    pub fn submit_sb(&mut self) {
        debug_assert!(!self.sb_writing);
        self.sb.generation += 1;
        let mut buf = AlignedBuf::new(BLOCK);
        self.sb.encode(&mut buf);
        let at = self.sb.slot() * BLOCK_U64;
        self.sb_writing = true;
        self.dev
            .submit(IoTag(TAG_SB), IoOp::Write { offset: at, buf });
    }

    /// Submits a read of a compaction task, tagged with `n`; its completion comes back
    /// from [`Volume::poll`].
    pub fn submit_compact_read(&mut self, n: u32, phys: u64, buf: AlignedBuf) {
        self.dev.submit(
            IoTag(TAG_COMPACT | u64::from(n)),
            IoOp::Read { offset: phys, buf },
        );
    }

    /// Submits a read of `buf.len()` bytes at `phys`, tagged with the store's read
    /// id; its completion comes back from [`Volume::poll`].
    pub fn submit_read(&mut self, id: u32, phys: u64, buf: AlignedBuf) {
        self.dev.submit(
            IoTag(TAG_READ | u64::from(id)),
            IoOp::Read { offset: phys, buf },
        );
    }

    /// Collects finished operations: record writes and flushes are settled here
    /// (a failure takes the disk down), read completions go to `reads`. Bounded.
    pub fn poll(&mut self, reads: &mut Vec<Completion>) {
        reads.append(&mut self.parked);
        let mut got = std::mem::take(&mut self.got);
        self.dev.poll(POLL_MAX, &mut got);
        for c in got.drain(..) {
            if let Some(r) = self.settle(c) {
                reads.push(r);
            }
        }
        self.got = got;
    }

    /// Settles a record write or flush completion; hands back anything else.
    fn settle(&mut self, c: Completion) -> Option<Completion> {
        match c.tag.0 & TAG_CLASS {
            TAG_RECORD => {
                self.inflight.remove(&(c.tag.0 & !TAG_CLASS));
                let mut buf = c.buf;
                let cap = buf.capacity();
                buf.set_len(cap);
                self.done_bufs.push(buf);
                if let Err(e) = c.result {
                    self.fail(e);
                }
                None
            }
            TAG_PACK => {
                let slot = (c.tag.0 & !TAG_CLASS) as usize;
                if let Some((seqs, _)) = self.pack.writes.get_mut(slot).and_then(Option::take) {
                    for s in seqs {
                        self.inflight.remove(&s);
                    }
                }
                let mut buf = c.buf;
                if buf.capacity() == IMAGE_BYTES && self.pack.spare.len() < 8 {
                    let cap = buf.capacity();
                    buf.set_len(cap);
                    self.pack.spare.push(buf);
                }
                if let Err(e) = c.result {
                    self.fail(e);
                }
                // Its last block is free: the images waiting for it go now.
                self.pump();
                None
            }
            TAG_FLUSH => {
                let covers = self.flushing.take().unwrap_or(self.durable_seq);
                match c.result {
                    Ok(()) => {
                        self.durable_seq = self.durable_seq.max(covers);
                        self.flushes_done += 1;
                    }
                    Err(e) => {
                        self.fail(e);
                    }
                }
                None
            }
            TAG_SB => {
                self.sb_writing = false;
                if let Err(e) = c.result {
                    self.fail(e);
                }
                None
            }
            _ => Some(c),
        }
    }

    /// The device's completion descriptor, if it has one.
    pub fn notify_fd(&self) -> Option<std::os::fd::RawFd> {
        self.dev.notify_fd()
    }

    /// Whether this disk's loop may sleep: nothing held here for the next poll, and
    /// everything in flight will wake it.
    pub fn quiescent(&self) -> bool {
        self.parked.is_empty() && self.done_bufs.is_empty() && self.dev.quiescent()
    }

    pub fn drain_notify(&mut self) {
        self.dev.drain_notify()
    }

    /// Blocks until the device finishes something (blocking paths only).
    pub fn wait_device(&mut self) {
        if self.parked.is_empty() {
            self.dev.wait();
        }
    }

    /// Read completions held back by a blocking wait.
    pub fn has_parked(&self) -> bool {
        !self.parked.is_empty() || self.dev.in_flight() > 0
    }

    /// Blocks until every record write, any flush and any superblock write in flight
    /// have completed.
    pub fn settle_writes(&mut self) -> Result<(), StoreError> {
        let mut got = Vec::new();
        let errors_before = self.errors;
        while !self.inflight.is_empty() || self.flushing.is_some() || self.sb_writing {
            got.clear();
            self.dev.poll(POLL_MAX, &mut got);
            if got.is_empty() {
                self.dev.wait();
                continue;
            }
            for c in got.drain(..) {
                if let Some(r) = self.settle(c) {
                    self.parked.push(r);
                }
            }
        }
        if self.errors != errors_before {
            return Err(self.unavailable());
        }
        Ok(())
    }

    /// Writes the superblock (generation + 1, into the other copy) and flushes. Waits
    /// first for a superblock write in flight ([`Volume::submit_sb`]), which goes to
    /// the copy this one will not: two in flight at once could leave an older copy
    /// with the higher generation.
    pub fn write_sb(&mut self) -> Result<(), StoreError> {
        if self.sb_writing {
            self.settle_writes()?;
        }
        self.sb.generation += 1;
        self.sb.encode(&mut self.scratch);
        let at = self.sb.slot() * BLOCK_U64;
        self.dev
            .write_at(at, &self.scratch)
            .map_err(|e| self.fail(e))?;
        self.flush()
    }

    /// Fills in the log fields of a header (a `write_id` of 0 means "this record
    /// starts a write": it gets the record's own seq) and seals it.
    fn seal(&self, hdr: &mut RecordHeader, seq: u64) {
        hdr.nonce = U64::new(self.sb.log_nonce);
        hdr.seq = U64::new(seq);
        hdr.epoch = U64::new(self.sb.epoch);
        hdr.durable_seq = U64::new(self.durable_seq);
        if hdr.write_id.get() == 0 {
            hdr.write_id = U64::new(seq);
        }
        hdr.seal();
    }

    /// Appends one record asynchronously: `hdr` is sealed and copied into the first
    /// block of `rec` (its length is the record's size), whose following blocks hold
    /// the payload, and `rec` goes to the device in one write. Writes a WRAP first if
    /// the record does not fit before the end of the disk. The buffer comes back in
    /// `done_bufs` when the write completes; on refusal it is handed back at once.
    pub fn append_async(
        &mut self,
        hdr: &mut RecordHeader,
        mut rec: AlignedBuf,
        class: Reserve,
    ) -> Result<Appended, (StoreError, AlignedBuf)> {
        if let Err(e) = self.check_online() {
            return Err((e, rec));
        }
        let size = rec.len() as u64;
        if !self.fits(size, class) {
            return Err((StoreError::NoSpace, rec));
        }
        // A segment record starts on a block boundary: the packed records before it
        // keep the rest of their block.
        self.close_image();
        let to_end = self.sb.size_bytes - self.phys(self.tail_lp);
        if size > to_end {
            self.write_wrap();
        }
        let phys = self.phys(self.tail_lp);
        let seq = self.next_seq;
        self.seal(hdr, seq);
        rec[..BLOCK].copy_from_slice(hdr.as_bytes());
        self.inflight.insert(seq);
        self.dev.submit(
            IoTag(TAG_RECORD | seq),
            IoOp::Write {
                offset: phys,
                buf: rec,
            },
        );
        let lp = self.tail_lp;
        self.next_seq += 1;
        self.tail_lp += size;
        Ok(Appended {
            phys,
            lp,
            seq,
            size,
        })
    }

    /// Appends a WRAP at the tail (a block boundary): the log continues at the start.
    fn write_wrap(&mut self) {
        let phys = self.phys(self.tail_lp);
        let to_end = self.sb.size_bytes - phys;
        let mut wrap = RecordHeader::new(kind::WRAP);
        let seq = self.next_seq;
        self.seal(&mut wrap, seq);
        let mut block = AlignedBuf::new(BLOCK);
        block.copy_from_slice(wrap.as_bytes());
        self.inflight.insert(seq);
        self.dev.submit(
            IoTag(TAG_RECORD | seq),
            IoOp::Write {
                offset: phys,
                buf: block,
            },
        );
        self.next_seq += 1;
        self.tail_lp += to_end;
        self.wraps += 1;
    }

    /// Appends one packed record (`hdr` then `data`) asynchronously: it joins the
    /// image of the tail's blocks and goes to the device with it (see [`Pack`]). A
    /// record whose header would not fit in the rest of the block starts at the next
    /// one; one that does not fit before the end of the disk, after a WRAP. Durable
    /// like any record once a flush submitted after its write completed has completed.
    pub fn append_packed(
        &mut self,
        hdr: &mut PackedHeader,
        data: &[u8],
        class: Reserve,
    ) -> Result<Appended, StoreError> {
        self.check_online()?;
        if data.len() > PACKED_MAX_DATA {
            return Err(StoreError::Format(format!(
                "packed record of {} bytes (at most {PACKED_MAX_DATA})",
                data.len()
            )));
        }
        let size = packed_size(data.len() as u64);
        let (at, need, wrap) = self.packed_place(size);
        if !self.room_for(need, class) {
            return Err(StoreError::NoSpace);
        }
        if wrap || at != self.tail_lp {
            self.close_image();
            if wrap && !self.tail_lp.is_multiple_of(self.log_len) {
                self.write_wrap();
            }
        }
        debug_assert_eq!(self.tail_lp, at);
        let fits_open = self
            .pack
            .open
            .as_ref()
            .is_some_and(|i| i.len + size as usize <= i.buf.len());
        if !fits_open {
            // Full: write it now if its first block is free, else leave it to its
            // turn and go on from the next block.
            if self
                .pack
                .open
                .as_ref()
                .is_some_and(|i| !self.pack.busy(i.lp))
            {
                self.submit_open();
            } else {
                self.close_image();
            }
        }
        if self.pack.open.is_none() {
            let buf = self.pack.buffer();
            self.pack.open = Some(Image {
                lp: self.tail_lp,
                buf,
                len: 0,
                seqs: Vec::new(),
            });
        }
        let seq = self.next_seq;
        hdr.nonce = U64::new(self.sb.log_nonce);
        hdr.seq = U64::new(seq);
        hdr.epoch = U64::new(self.sb.epoch);
        hdr.durable_seq = U64::new(self.durable_seq);
        hdr.seal();
        let lp = self.tail_lp;
        let Some(img) = self.pack.open.as_mut() else {
            return Err(StoreError::Format("no open image".into()));
        };
        debug_assert_eq!(img.lp + img.len as u64, lp);
        let at = img.len;
        img.buf[at..at + PACKED_HDR].copy_from_slice(hdr.as_bytes());
        img.buf[at + PACKED_HDR..at + PACKED_HDR + data.len()].copy_from_slice(data);
        img.buf[at + PACKED_HDR + data.len()..at + size as usize].fill(0);
        img.len += size as usize;
        img.seqs.push(seq);
        self.inflight.insert(seq);
        self.next_seq += 1;
        self.tail_lp += size;
        let phys = self.phys(lp);
        self.pump();
        Ok(Appended {
            phys,
            lp,
            seq,
            size,
        })
    }

    /// Appends a packed record and waits for its write (duplicate
    /// resolution). Not flushed.
    pub fn append_packed_wait(
        &mut self,
        hdr: &mut PackedHeader,
        data: &[u8],
        class: Reserve,
    ) -> Result<Appended, StoreError> {
        let a = self.append_packed(hdr, data, class)?;
        self.settle_writes()?;
        Ok(a)
    }

    /// The tail leaves the open image: it moves on to the next block boundary, and the
    /// image, if it has records to write, waits for its turn.
    fn close_image(&mut self) {
        if let Some(img) = self.pack.open.take() {
            if img.seqs.is_empty() {
                self.pack.spare.push(img.buf);
            } else {
                self.pack.closed.push_back(img);
                self.pump();
            }
        }
        self.tail_lp = self.tail_lp.next_multiple_of(BLOCK_U64);
    }

    /// Writes every image whose first block has no write in flight.
    fn pump(&mut self) {
        let mut i = 0;
        while i < self.pack.closed.len() {
            if self.pack.busy(self.pack.closed[i].lp) {
                i += 1;
            } else if let Some(img) = self.pack.closed.remove(i) {
                self.submit_image(img);
            }
        }
        if self
            .pack
            .open
            .as_ref()
            .is_some_and(|i| !i.seqs.is_empty() && !self.pack.busy(i.lp))
        {
            self.submit_open();
        }
    }

    /// Writes the open image; its partial last block (if any) starts the next one.
    fn submit_open(&mut self) {
        let Some(img) = self.pack.open.take() else {
            return;
        };
        let keep = img.len % BLOCK;
        if keep != 0 {
            let from = img.len - keep;
            let mut buf = self.pack.buffer();
            buf[..keep].copy_from_slice(&img.buf[from..img.len]);
            self.pack.open = Some(Image {
                lp: img.lp + from as u64,
                buf,
                len: keep,
                seqs: Vec::new(),
            });
        }
        self.submit_image(img);
    }

    /// Submits one image's blocks in one write.
    fn submit_image(&mut self, mut img: Image) {
        let end = img.len.next_multiple_of(BLOCK);
        img.buf[img.len..end].fill(0);
        img.buf.set_len(end);
        let partial = (!img.len.is_multiple_of(BLOCK)).then(|| img.lp + (end - BLOCK) as u64);
        let slot = match self.pack.writes.iter().position(Option::is_none) {
            Some(k) => k,
            None => {
                self.pack.writes.push(None);
                self.pack.writes.len() - 1
            }
        };
        self.pack.writes[slot] = Some((img.seqs, partial));
        let offset = self.phys(img.lp);
        self.dev.submit(
            IoTag(TAG_PACK | slot as u64),
            IoOp::Write {
                offset,
                buf: img.buf,
            },
        );
    }

    /// After recovery: a tail inside a block makes that block the open image, its
    /// bytes before the tail as on disk and zero after, written back at once so that
    /// nothing past the tail (a torn record, old data) can come back after a crash.
    fn open_tail_image(&mut self) -> Result<(), DevError> {
        let keep = (self.tail_lp % BLOCK_U64) as usize;
        if keep == 0 {
            return Ok(());
        }
        let lp = self.tail_lp - keep as u64;
        let phys = self.phys(lp);
        let mut buf = self.pack.buffer();
        self.dev.read_at(phys, &mut buf[..BLOCK])?;
        buf[keep..BLOCK].fill(0);
        self.dev.write_at(phys, &buf[..BLOCK])?;
        self.pack.open = Some(Image {
            lp,
            buf,
            len: keep,
            seqs: Vec::new(),
        });
        Ok(())
    }
}
