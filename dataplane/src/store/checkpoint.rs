//! Index checkpoints: saving each disk's part of the index into the checkpoint area of
//! that disk, and loading it back at open so that only the log records written after it
//! need to be read. The bytes are format.rs's ("Index checkpoint"); this module owns
//! when a checkpoint is written, into which slot, and what makes one usable.
//!
//! What it must never do: make a checkpoint the only record of anything. The log from
//! the head still holds everything, a slot is overwritten only when it is not the one
//! in use, and any doubt about a slot (damage, a stale position, a count that does not
//! add up, a device error) is settled by ignoring it and scanning the log.

use std::collections::hash_map::Entry as MapEntry;

use nvme::AlignedBuf;
use tracing::{debug, info, warn};

use dosp::Fingerprint;

use super::format::{
    ckpt_entry_bytes, ckpt_extent_bytes, ckpt_field_max, ckpt_width, get_uint, packed_size,
    put_uint, CkptHeader, Geometry, Superblock, BLOCK, BLOCK_U64, CKPT_LEN_BYTES, CKPT_MAGIC,
    MAX_SEGMENT_BYTES, PACKED_MAX_DATA, PACK_ALIGN, SEQ_SANE_MAX,
};
use super::volume::{LocalIndex, Pending, Volume, TAG_CLASS};
use super::{DiskId, DiskState, Entry, Extent, Store, StoreError};

/// Bytes of checkpoint body moved per device transfer, and the size of each disk's
/// checkpoint buffer (allocated at open, one per disk): 64 blocks stream a body at
/// device speed and cost little to keep per disk.
pub(crate) const CKPT_IO_BYTES: usize = 256 * 1024;

/// Snapshots up to this size are always written when anything changed (4 MiB, some
/// 130,000 small objects: tens of milliseconds). Larger ones only when worth it, see
/// [`snapshot_worth`].
pub(crate) const SNAPSHOT_ALWAYS_BYTES: u64 = 4 << 20;

/// Whether writing a new snapshot of `objects` objects (on a disk whose body fields are
/// `width` bytes) pays for itself, when without it the next open would read
/// `scan_records` record headers (from the checkpoint in use, or from the head if none
/// is usable). A large snapshot is written only once the log it saves reading is at
/// least as many bytes as the snapshot itself: so the checkpoint writes at most about a
/// block per record appended (however often the server asks), and a clean start reads
/// at most about `objects / 128` headers past the checkpoint (35 bytes of snapshot per
/// small object on a 4 TB disk against 4096 per header).
pub(crate) fn snapshot_worth(objects: u64, width: u8, scan_records: u64) -> bool {
    let per_object = ckpt_entry_bytes(width) + ckpt_extent_bytes(width);
    let snapshot = objects.saturating_mul(per_object);
    snapshot <= SNAPSHOT_ALWAYS_BYTES || scan_records.saturating_mul(BLOCK_U64) >= snapshot
}

/// Whether a disk is due a new snapshot: something changed since the one in use, and
/// writing one is worth it.
pub(crate) fn snapshot_due(v: &Volume) -> bool {
    if v.state != DiskState::Online || v.ckpt.seq == Some(v.next_seq) {
        return false;
    }
    // A checkpoint the head has moved past is of no use to the next open.
    let from = v
        .ckpt
        .seq
        .filter(|&s| s >= v.head_seq)
        .unwrap_or(v.head_seq);
    snapshot_worth(
        v.objects,
        ckpt_width(v.geo.size_bytes),
        v.next_seq.saturating_sub(from),
    )
}

/// Records replayed at open past which the store writes a fresh checkpoint right away,
/// so that a node that crashed once does not pay for the same long scan at every start
/// until its first idle checkpoint. (A thousand header reads take a few milliseconds.)
pub(crate) const REPLAY_CHECKPOINT_RECORDS: u64 = 1024;

/// A checkpoint loaded at open: where replay resumes and what it resumes with.
pub(crate) struct Loaded {
    pub slot: u8,
    /// Every record with a smaller seq is reflected in `index` and `pending`.
    pub seq: u64,
    /// Bytes from the log head to where record `seq` starts (or will start).
    pub dist: u64,
    /// Records from `seq` on carry no smaller epoch.
    pub epoch: u64,
    pub index: LocalIndex,
    pub pending: Pending,
}

/// Why a slot is not used.
enum Unusable {
    /// A sound checkpoint the log has moved past (compaction passed it): normal.
    Stale(String),
    /// Damaged or inconsistent: an operating error, worth a warning.
    Malformed(String),
}

fn malformed<T>(why: impl Into<String>) -> Result<T, Unusable> {
    Err(Unusable::Malformed(why.into()))
}

/// Finds the newest usable checkpoint of a disk and loads it. `headers` holds the two
/// header blocks (as read together with the superblocks); `sb` is the superblock in
/// force, already checked (geometry, head). Returns the checkpoint, if any is usable,
/// and the highest generation among this disk's valid headers, usable or not, so that
/// the next checkpoint written outranks both. Never fails: a disk without a usable
/// checkpoint is opened by the full scan.
pub(crate) fn load(
    dev: &mut super::counted::Counted,
    disk: DiskId,
    geo: &Geometry,
    sb: &Superblock,
    headers: &[u8],
    buf: &mut AlignedBuf,
) -> (Option<Loaded>, u64) {
    let mut found: Vec<(u8, CkptHeader)> = Vec::with_capacity(2);
    for slot in 0..2u8 {
        let at = usize::from(slot) * BLOCK;
        let Some(block) = headers.get(at..at + BLOCK) else {
            continue;
        };
        match CkptHeader::decode(block) {
            Some(h) if h.identity == sb.identity && h.log_nonce == sb.log_nonce => {
                found.push((slot, h));
            }
            // Left by an earlier format of this disk (identity and nonce are new at
            // every format): as good as blank.
            Some(_) => debug!(
                disk = disk.0,
                slot, "checkpoint slot of another log; ignored"
            ),
            None if block.get(..8) == Some(&CKPT_MAGIC[..]) => {
                warn!(
                    disk = disk.0,
                    slot, "checkpoint header damaged (torn or rotten); ignored"
                );
            }
            None => {}
        }
    }
    let generation = found
        .iter()
        .map(|(_, h)| h.generation)
        .filter(|&g| g <= SEQ_SANE_MAX)
        .max()
        .unwrap_or(0);
    found.sort_by_key(|(_, h)| std::cmp::Reverse(h.generation));
    for (slot, h) in &found {
        let r = usable(h, *slot, geo, sb).and_then(|dist| read_body(dev, disk, geo, h, dist, buf));
        match r {
            Ok(loaded) => {
                info!(
                    disk = disk.0,
                    slot,
                    generation = h.generation,
                    seq = h.seq,
                    objects = h.objects,
                    "loaded index checkpoint"
                );
                return (Some(loaded), generation);
            }
            Err(Unusable::Stale(why)) => {
                info!(
                    disk = disk.0,
                    slot,
                    seq = h.seq,
                    "checkpoint not used: {why}"
                );
            }
            Err(Unusable::Malformed(why)) => {
                warn!(
                    disk = disk.0,
                    slot,
                    seq = h.seq,
                    "checkpoint unusable: {why}"
                );
            }
        }
    }
    (None, generation)
}

/// Checks a header against the disk and the log. Returns the distance in bytes from
/// the log head to the checkpoint's position.
fn usable(h: &CkptHeader, slot: u8, geo: &Geometry, sb: &Superblock) -> Result<u64, Unusable> {
    if h.slot != slot {
        return malformed(format!("header of slot {} found in slot {slot}", h.slot));
    }
    if h.width != ckpt_width(geo.size_bytes) {
        return malformed(format!(
            "field width {} is not this disk's {}",
            h.width,
            ckpt_width(geo.size_bytes)
        ));
    }
    if h.generation == 0 || h.generation > SEQ_SANE_MAX || h.seq > SEQ_SANE_MAX {
        return malformed(format!(
            "generation {} or seq {} out of range",
            h.generation, h.seq
        ));
    }
    // Records written after the checkpoint carry at least its epoch; an epoch the
    // superblock never reached cannot belong to this log.
    if h.epoch == 0 || h.epoch > sb.epoch {
        return malformed(format!(
            "epoch {} beyond the superblock's {}",
            h.epoch, sb.epoch
        ));
    }
    if h.seq < sb.head_seq {
        return Err(Unusable::Stale(format!(
            "compaction moved the log head (seq {}) past it",
            sb.head_seq
        )));
    }
    let (log_start, log_len) = (geo.log_start(), geo.log_len());
    if h.position < log_start
        || h.position >= geo.size_bytes
        || !h.position.is_multiple_of(PACK_ALIGN)
    {
        return malformed(format!("position {} outside the log", h.position));
    }
    // Both offsets are inside the log: the distance is their difference round the
    // circle, except that a checkpoint past the head by a whole lap (a full log) sits
    // where the head is.
    let mut dist = (h.position + log_len - sb.log_head) % log_len;
    if h.seq > sb.head_seq && dist == 0 {
        dist = log_len;
    }
    // Every record takes at least a packed header's bytes.
    let records = h.seq - sb.head_seq;
    if (h.seq == sb.head_seq && dist != 0)
        || records
            .checked_mul(packed_size(0))
            .is_none_or(|min| min > dist)
    {
        return malformed(format!(
            "position {} cannot follow {records} record(s) from the head at {}",
            h.position, sb.log_head
        ));
    }
    if h.implied_body_len() != Some(h.body_len) {
        return malformed(format!(
            "body of {} bytes does not hold {} objects, {} pending writes and {} extents",
            h.body_len, h.objects, h.pending, h.extents
        ));
    }
    if h.body_len > geo.ckpt_body_bytes() {
        return malformed(format!(
            "body of {} bytes is larger than its slot ({} bytes)",
            h.body_len,
            geo.ckpt_body_bytes()
        ));
    }
    // implied_body_len succeeded, so this sum does not overflow.
    if h.extents < h.objects + h.pending {
        return malformed("fewer extents than entries");
    }
    Ok(dist)
}

/// Reads the body of a checked header, validating every entry, and its crc last (the
/// body is parsed as it streams in; a body that fails its crc is thrown away whole).
fn read_body(
    dev: &mut super::counted::Counted,
    disk: DiskId,
    geo: &Geometry,
    h: &CkptHeader,
    dist: u64,
    buf: &mut AlignedBuf,
) -> Result<Loaded, Unusable> {
    let mut r = BodyReader {
        dev,
        buf,
        next: geo.ckpt_body(h.slot),
        left: h.body_len,
        pos: 0,
        len: 0,
        crc: 0,
    };
    // Capacities from disk are only hints, and bounded: the counts were checked against
    // the slot size, not against memory.
    let mut index = LocalIndex::with_capacity(h.objects.min(1 << 16) as usize);
    let mut pending = Pending::new();
    let mut extents_left = h.extents;
    let log_start = geo.log_start();
    let w = usize::from(h.width);
    // Bounded by the header's counts, which fit the slot.
    for i in 0..h.objects + h.pending {
        let mut fp = [0u8; 16];
        r.take(&mut fp)?;
        let age = r.uint(w)?;
        let refcount = r.uint(4)? as u32;
        let n = r.uint(w)?;
        let object = i < h.objects;
        if age == 0 || age >= h.seq {
            return malformed(format!(
                "entry {i}: write {age} records before seq {}",
                h.seq
            ));
        }
        let write_id = h.seq - age;
        if object != (refcount > 0) || (!object && fp != [0; 16]) {
            return malformed(format!("entry {i}: not an object nor a pending write"));
        }
        if n == 0 || n > extents_left {
            return malformed(format!("entry {i}: {n} extents, {extents_left} left"));
        }
        extents_left -= n;
        let mut extents = Vec::with_capacity(n.min(64) as usize);
        let (mut len, mut footprint) = (0u64, 0u64);
        for _ in 0..n {
            let at = r.uint(w)?;
            let xlen = r.uint(CKPT_LEN_BYTES)? as u32;
            let (unit, packed) = (at >> 1, at & 1 == 1);
            let x = Extent {
                hdr: 0,
                len: xlen,
                packed,
            };
            let size = x.size();
            let max_len = if packed {
                PACKED_MAX_DATA
            } else {
                MAX_SEGMENT_BYTES
            };
            let hdr = unit
                .checked_mul(PACK_ALIGN)
                .and_then(|b| b.checked_add(log_start))
                .filter(|h| packed || h.is_multiple_of(BLOCK_U64))
                .filter(|h| h.checked_add(size).is_some_and(|end| end <= geo.size_bytes));
            let Some(hdr) = hdr.filter(|_| xlen as usize <= max_len) else {
                return malformed(format!(
                    "entry {i}: extent at {} of {xlen} bytes outside the log",
                    unit.saturating_mul(PACK_ALIGN)
                ));
            };
            len += u64::from(xlen);
            footprint += size;
            extents.push(Extent { hdr, ..x });
        }
        if object {
            match index.entry(Fingerprint(fp)) {
                MapEntry::Occupied(o) => {
                    return malformed(format!("object {} listed twice", o.key()));
                }
                MapEntry::Vacant(v) => {
                    v.insert(Entry {
                        disk,
                        len,
                        refcount,
                        write_id,
                        extents,
                        footprint,
                    });
                }
            }
        } else {
            match pending.entry(write_id) {
                MapEntry::Occupied(_) => {
                    return malformed(format!("pending write {write_id} listed twice"));
                }
                MapEntry::Vacant(v) => {
                    v.insert(extents);
                }
            }
        }
    }
    if extents_left != 0 || r.left != 0 || r.pos != r.len {
        return malformed("body longer than its entries");
    }
    if r.crc != h.body_crc {
        return malformed("body fails its crc (torn or rotten)");
    }
    Ok(Loaded {
        slot: h.slot,
        seq: h.seq,
        dist,
        epoch: h.epoch,
        index,
        pending,
    })
}

/// Streams a checkpoint body off the device a buffer at a time, computing its crc.
struct BodyReader<'a> {
    dev: &'a mut super::counted::Counted,
    buf: &'a mut AlignedBuf,
    /// Where the next transfer starts.
    next: u64,
    /// Body bytes not read yet.
    left: u64,
    /// Bytes of `buf` consumed, and valid.
    pos: usize,
    len: usize,
    crc: u32,
}

impl BodyReader<'_> {
    /// A little-endian integer of `width` (at most 8) bytes.
    fn uint(&mut self, width: usize) -> Result<u64, Unusable> {
        let mut le = [0u8; 8];
        let Some(bytes) = le.get_mut(..width) else {
            return malformed(format!("field of {width} bytes"));
        };
        self.take(bytes)?;
        Ok(get_uint(bytes))
    }

    /// Fills `out` from the body. Each turn copies at least one byte or reads a new
    /// buffer, and the reads stop at the body's length, so this ends.
    fn take(&mut self, out: &mut [u8]) -> Result<(), Unusable> {
        let mut got = 0;
        while got < out.len() {
            if self.pos == self.len {
                self.refill()?;
            }
            let n = (out.len() - got).min(self.len - self.pos);
            out[got..got + n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            got += n;
            self.pos += n;
        }
        Ok(())
    }

    fn refill(&mut self) -> Result<(), Unusable> {
        if self.left == 0 {
            return malformed("body shorter than its entries");
        }
        if self.buf.len() < BLOCK {
            return malformed("no buffer to read the body with");
        }
        let n = self.left.min(self.buf.len() as u64) as usize;
        let span = n.next_multiple_of(BLOCK);
        if let Err(e) = self.dev.read_at(self.next, &mut self.buf[..span]) {
            return malformed(format!("cannot read the body: {e}"));
        }
        self.crc = crc32c::crc32c_append(self.crc, &self.buf[..n]);
        self.next += span as u64;
        self.left -= n as u64;
        self.pos = 0;
        self.len = n;
        Ok(())
    }
}

/// Outcome of encoding a snapshot so far.
enum SnapState {
    Writing,
    /// Larger than the slot, or a value its field cannot hold: skipped, the previous
    /// checkpoint (if any) stays in use.
    Unfit(&'static str),
}

/// One disk's snapshot of its inactive slot, encoded in memory when the checkpoint
/// starts (the index goes on changing while it is written): entries are appended to
/// `buf` and each full buffer becomes one chunk, one write; the header goes last.
struct Snapshot {
    buf: AlignedBuf,
    fill: usize,
    /// Where `buf` goes when it is full.
    at: u64,
    /// Full buffers of the body with where each goes, in order, not yet submitted.
    chunks: std::collections::VecDeque<(u64, AlignedBuf)>,
    /// The header block, once the body is sealed.
    header_block: Option<AlignedBuf>,
    /// One entry or extent being encoded.
    scratch: Vec<u8>,
    log_start: u64,
    /// Counts and length accumulate here as entries are added, the crc as each buffer
    /// goes out.
    header: CkptHeader,
    header_at: u64,
    capacity: u64,
    state: SnapState,
}

impl Snapshot {
    fn begin(vol: &Volume, buf: AlignedBuf) -> Snapshot {
        let slot = vol.ckpt.slot.map_or(0, |s| 1 - (s & 1));
        Snapshot {
            buf,
            fill: 0,
            at: vol.geo.ckpt_body(slot),
            chunks: std::collections::VecDeque::new(),
            header_block: None,
            scratch: Vec::with_capacity(64),
            log_start: vol.log_start,
            header: CkptHeader {
                slot,
                width: ckpt_width(vol.geo.size_bytes),
                identity: vol.sb.identity,
                log_nonce: vol.sb.log_nonce,
                generation: vol.ckpt.generation + 1,
                seq: vol.next_seq,
                position: vol.phys(vol.tail_lp),
                epoch: vol.sb.epoch,
                objects: 0,
                pending: 0,
                extents: 0,
                body_len: 0,
                body_crc: 0,
            },
            header_at: vol.geo.ckpt_header(slot),
            capacity: vol.ckpt.capacity,
            state: SnapState::Writing,
        }
    }

    /// Appends body bytes (`_vol` is the disk the snapshot is of: nothing is written
    /// to it here).
    fn put(&mut self, _vol: &mut Volume, bytes: &[u8]) {
        if !matches!(self.state, SnapState::Writing) {
            return;
        }
        if self.header.body_len + bytes.len() as u64 > self.capacity || self.buf.len() < BLOCK {
            self.state = SnapState::Unfit("larger than its slot");
            return;
        }
        self.header.body_len += bytes.len() as u64;
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = rest.len().min(self.buf.len() - self.fill);
            self.buf[self.fill..self.fill + n].copy_from_slice(&rest[..n]);
            self.fill += n;
            rest = &rest[n..];
            if self.fill == self.buf.len() {
                self.header.body_crc = crc32c::crc32c_append(self.header.body_crc, &self.buf);
                let len = self.buf.len();
                let full = std::mem::replace(&mut self.buf, AlignedBuf::new(len));
                self.chunks.push_back((self.at, full));
                self.at += len as u64;
                self.fill = 0;
            }
        }
    }

    /// Adds one entry (an object when `fp` is given, else a pending write).
    fn entry(
        &mut self,
        vol: &mut Volume,
        fp: Option<&Fingerprint>,
        write_id: u64,
        refcount: u32,
        extents: &[Extent],
    ) {
        let w = self.header.width;
        let max = ckpt_field_max(w);
        // A packed object's record names its fingerprint; the index keeps no write id
        // for it, and its age is written as 1 (format.rs, "Index checkpoint").
        let age = match extents {
            [x] if x.packed => 1,
            _ => self.header.seq.saturating_sub(write_id),
        };
        let n = extents.len() as u64;
        if age == 0 || age > max || n > max {
            self.state = SnapState::Unfit("a write id or extent count its field cannot hold");
            return;
        }
        let mut e = std::mem::take(&mut self.scratch);
        e.clear();
        e.extend_from_slice(&fp.map_or([0; 16], |f| f.0));
        put_uint(&mut e, age, w);
        e.extend_from_slice(&refcount.to_le_bytes());
        put_uint(&mut e, n, w);
        self.put(vol, &e);
        for x in extents {
            let rel = x.hdr.saturating_sub(self.log_start);
            let at = (rel / PACK_ALIGN) << 1 | u64::from(x.packed);
            if x.hdr < self.log_start || !rel.is_multiple_of(PACK_ALIGN) || at > max {
                self.state = SnapState::Unfit("an extent outside the log");
                break;
            }
            e.clear();
            put_uint(&mut e, at, w);
            put_uint(&mut e, u64::from(x.len), CKPT_LEN_BYTES as u8);
            self.put(vol, &e);
        }
        self.scratch = e;
        if fp.is_some() {
            self.header.objects += 1;
        } else {
            self.header.pending += 1;
        }
        self.header.extents += n;
    }

    /// Ends the body (the last, partial buffer is zero-padded to whole blocks and
    /// becomes the last chunk) and encodes the header. `false`: the snapshot did not
    /// fit and nothing is to be written.
    fn seal(&mut self, vol: &Volume) -> bool {
        if let SnapState::Unfit(why) = self.state {
            warn!(
                disk = vol.id.0,
                capacity = self.capacity,
                "index snapshot does not fit its checkpoint slot ({why}); checkpoint skipped, the next open scans the log from the last usable one"
            );
            return false;
        }
        if self.fill > 0 {
            let tail = &self.buf[..self.fill];
            self.header.body_crc = crc32c::crc32c_append(self.header.body_crc, tail);
            let span = self.fill.next_multiple_of(BLOCK);
            self.buf[self.fill..span].fill(0);
            let mut last = std::mem::replace(&mut self.buf, AlignedBuf::new(0));
            last.set_len(span);
            self.chunks.push_back((self.at, last));
            self.fill = 0;
        }
        let mut block = AlignedBuf::new(BLOCK);
        self.header.encode(&mut block[..BLOCK]);
        self.header_block = Some(block);
        true
    }
}

/// Checkpoint body bytes in flight per disk at once: enough to stream at device speed,
/// little enough not to crowd out the requests the loop is serving meanwhile.
const CKPT_INFLIGHT_BYTES: usize = 4 * CKPT_IO_BYTES;

/// Tag of a checkpoint's header write (body chunks are numbered from 0).
const HEADER_TAG: u32 = u32::MAX;

/// Where one disk's part of a background checkpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The body chunks go out, a bounded number at a time; the header follows once
    /// they have all completed and every record below S is durable.
    Body,
    /// The header write is in flight.
    Header,
    /// Waiting for flush number `n` of the disk (submitted after the header write
    /// completed); once it completes the checkpoint is the one in use.
    HeaderFlush(u64),
    /// The verified mark: once the records below it are durable, the superblock that
    /// records it is written.
    Mark,
    MarkWrite,
    MarkFlush(u64),
    Done,
}

/// One disk's part of a [`CkptTask`].
struct DiskTask {
    disk: usize,
    /// The sealed snapshot being written (`None`: only the verified mark is due).
    snap: Option<Snapshot>,
    /// Body writes submitted so far (their tags), in flight, and their bytes.
    submitted: u32,
    in_flight: usize,
    bytes_in_flight: usize,
    header_in_flight: bool,
    /// Seq the verified mark must reach: the disk's `next_seq` at the start.
    mark: u64,
    step: Step,
    /// The disk failed or left Online: nothing more is submitted, and the task ends
    /// once its writes in flight came back.
    aborted: bool,
}

/// A checkpoint written in the background: started by [`Store::checkpoint_start`],
/// moved along by every [`Store::poll`] (and [`Store::checkpoint_tick`]) as the
/// device completes its writes, never waiting on the device. The snapshot of each
/// disk is taken (encoded in memory) when the task starts, at seq S = the disk's
/// `next_seq` then; stores and deletes that come after do not change it. Per disk, in
/// order: the body chunks into the slot not in use; once they have completed and the
/// records below S are durable (the group commit's flush, or one started here when
/// none is in flight), the header; then a flush submitted after the header completed;
/// only once that flush completed is the checkpoint made current. Then the verified
/// mark: a superblock write and a flush, the same way. A crash anywhere leaves the
/// slot in use untouched; a device error takes the disk Down and ends its part.
pub(crate) struct CkptTask {
    disks: Vec<DiskTask>,
    err: Option<StoreError>,
}

impl CkptTask {
    fn done(&self) -> bool {
        self.disks.iter().all(|t| t.step == Step::Done)
    }
}

impl DiskTask {
    /// Goes as far as it can without waiting; returns when it must wait for the
    /// device (or is done).
    fn advance(&mut self, vol: &mut Volume, err: &mut Option<StoreError>) {
        loop {
            if self.step == Step::Done {
                return;
            }
            if !self.aborted && vol.state != DiskState::Online {
                self.aborted = true;
                if vol.failed {
                    err.get_or_insert_with(|| vol.unavailable());
                } else {
                    debug!(disk = self.disk, "disk left service; checkpoint abandoned");
                }
            }
            if self.aborted {
                if self.in_flight == 0 && !self.header_in_flight && !vol.sb_writing {
                    self.step = Step::Done;
                }
                return;
            }
            match self.step {
                Step::Body => {
                    let Some(snap) = self.snap.as_mut() else {
                        self.step = Step::Mark;
                        continue;
                    };
                    while let Some((at, buf)) = snap.chunks.pop_front() {
                        if self.bytes_in_flight > 0
                            && self.bytes_in_flight + buf.len() > CKPT_INFLIGHT_BYTES
                        {
                            snap.chunks.push_front((at, buf));
                            break;
                        }
                        self.bytes_in_flight += buf.len();
                        self.in_flight += 1;
                        vol.submit_ckpt_write(self.submitted, at, buf);
                        self.submitted += 1;
                    }
                    // The header only once the body is on the device and everything
                    // it reflects is durable.
                    if !snap.chunks.is_empty()
                        || self.in_flight > 0
                        || !vol.durable_below(snap.header.seq)
                    {
                        return;
                    }
                    let Some(block) = snap.header_block.take() else {
                        // Sealed snapshots have one; never reached.
                        self.snap = None;
                        self.step = Step::Mark;
                        continue;
                    };
                    self.header_in_flight = true;
                    vol.submit_ckpt_write(HEADER_TAG, snap.header_at, block);
                    self.step = Step::Header;
                }
                Step::Header => {
                    if self.header_in_flight {
                        return;
                    }
                    self.step = Step::HeaderFlush(vol.flushes_submitted + 1);
                }
                Step::HeaderFlush(n) => {
                    if !vol.flushed(n) {
                        return;
                    }
                    if let Some(s) = &self.snap {
                        vol.ckpt.seq = Some(s.header.seq);
                        vol.ckpt.slot = Some(s.header.slot);
                        vol.ckpt.generation = s.header.generation;
                        debug!(
                            disk = self.disk,
                            slot = s.header.slot,
                            seq = s.header.seq,
                            objects = s.header.objects,
                            bytes = s.header.body_len,
                            "checkpoint written"
                        );
                    }
                    self.step = Step::Mark;
                }
                Step::Mark => {
                    if vol.sb.verified_seq >= self.mark {
                        self.step = Step::Done;
                        continue;
                    }
                    if !vol.durable_below(self.mark) {
                        return;
                    }
                    // Everything below durable_seq is durable: at least the mark.
                    vol.sb.verified_seq = vol.durable_seq.max(self.mark);
                    vol.submit_sb();
                    self.step = Step::MarkWrite;
                }
                Step::MarkWrite => {
                    if vol.sb_writing {
                        return;
                    }
                    self.step = Step::MarkFlush(vol.flushes_submitted + 1);
                }
                Step::MarkFlush(n) => {
                    if !vol.flushed(n) {
                        return;
                    }
                    self.step = Step::Done;
                }
                Step::Done => return,
            }
        }
    }
}

impl Store {
    /// Makes everything written so far durable and saves each changed Online disk's
    /// part of the index as a checkpoint (see format.rs), so that the next open reads
    /// the checkpoint and only the log records written after it. A large index is saved
    /// only once enough log has been written since its last checkpoint to make that
    /// worth it (`snapshot_worth`), so calling this often is cheap. Also records in the
    /// superblock that everything so far is durable, which spares a full scan (should
    /// one ever be needed) the re-verification of data. Blocking: for shutdown, start-up
    /// and tests (a serving loop uses [`Store::checkpoint_start`]); a checkpoint already
    /// under way in the background is finished first. A snapshot too large for its slot
    /// is skipped with a warning; a device error takes that disk Down and is returned
    /// (the first one).
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        let earlier = self.checkpoint_wait();
        let due: Vec<bool> = self.vols.iter().map(snapshot_due).collect();
        let now = self.checkpoint_disks(&due);
        earlier.and(now)
    }

    /// Snapshots of the disks marked in `due` (one pass over the index feeds them all),
    /// then the superblock's verified mark of every Online disk, blocking.
    pub(super) fn checkpoint_disks(&mut self, due: &[bool]) -> Result<(), StoreError> {
        // A compaction step under way ends first (its outcome is kept for
        // `compact_tick`): the two never run together.
        self.compact_drive();
        // Commits in flight are answered (their answers kept for the next poll), as
        // they would be by a serving loop before it starts a checkpoint.
        self.settle();
        self.checkpoint_start_disks(due);
        self.checkpoint_wait()
    }

    /// Starts a checkpoint in the background (see `CkptTask`) if none is under way
    /// and any disk is due one or its verified mark: the snapshots are encoded now,
    /// the writes go out from here and from [`Store::poll`]. Returns whether one
    /// started. [`Store::checkpoint_tick`] says when it is over.
    pub fn checkpoint_start(&mut self) -> bool {
        if self.ckpt_task.is_some() || self.compact_task.is_some() {
            return false;
        }
        let due: Vec<bool> = self.vols.iter().map(snapshot_due).collect();
        self.checkpoint_start_disks(&due)
    }

    /// Whether a checkpoint task exists (in flight, or finished and not yet reported
    /// by [`Store::checkpoint_tick`]).
    pub fn checkpoint_busy(&self) -> bool {
        self.ckpt_task.is_some()
    }

    /// Moves the background checkpoint along (without waiting) and, once it is over,
    /// returns its outcome (the first error, if any) — once.
    pub fn checkpoint_tick(&mut self) -> Option<Result<(), StoreError>> {
        self.ckpt_advance();
        if self.ckpt_task.as_ref().is_some_and(CkptTask::done) {
            let task = self.ckpt_task.take()?;
            return Some(task.err.map_or(Ok(()), Err));
        }
        None
    }

    /// Drives the background checkpoint to its end, blocking; `Ok` when there is none.
    pub(super) fn checkpoint_wait(&mut self) -> Result<(), StoreError> {
        let mut events = Vec::new();
        loop {
            if let Some(r) = self.checkpoint_tick() {
                return r;
            }
            if self.ckpt_task.is_none() {
                return Ok(());
            }
            self.poll(&mut events);
            self.parked_events.append(&mut events);
            if let Some(r) = self.checkpoint_tick() {
                return r;
            }
            if !self.busy_devices() {
                // Nothing in flight can move it on: a bug; give up rather than hang.
                self.ckpt_task = None;
                return Err(StoreError::Format("checkpoint stalled".into()));
            }
            for v in self.vols.iter_mut() {
                v.wait_device();
            }
        }
    }

    /// Takes the snapshots of the disks marked in `due` and starts the task. Every
    /// Online disk also gets its verified mark brought up to its `next_seq`.
    fn checkpoint_start_disks(&mut self, due: &[bool]) -> bool {
        if self.ckpt_task.is_some() || self.compact_task.as_ref().is_some_and(|t| !t.done()) {
            return false;
        }
        let Store {
            vols,
            index,
            writes,
            ckpt_bufs,
            ..
        } = self;
        let mut snaps: Vec<Option<Snapshot>> = Vec::with_capacity(vols.len());
        for (i, vol) in vols.iter_mut().enumerate() {
            let mut snap = None;
            if due.get(i) == Some(&true) && vol.state == DiskState::Online {
                if vol.ckpt.diverged {
                    debug!(
                        disk = i,
                        "index differs from the log until restart; no checkpoint"
                    );
                } else {
                    let buf = ckpt_bufs
                        .get_mut(i)
                        .map(|b| std::mem::replace(b, AlignedBuf::new(0)))
                        .filter(|b| b.len() >= BLOCK)
                        .unwrap_or_else(|| AlignedBuf::new(CKPT_IO_BYTES));
                    snap = Some(Snapshot::begin(vol, buf));
                }
            }
            snaps.push(snap);
        }
        if snaps.iter().any(Option::is_some) {
            // Objects first, then pending writes: the order the body promises. The
            // index and the open writes reflect every record appended so far, that is
            // every record below each disk's S.
            for (fp, e) in index.iter() {
                let d = usize::from(e.disk.0);
                if let (Some(Some(s)), Some(vol)) = (snaps.get_mut(d), vols.get_mut(d)) {
                    s.entry(vol, Some(&fp), e.write_id, e.refcount, &e.extents);
                }
            }
            for w in writes.values().filter(|w| w.write_id != 0) {
                let d = usize::from(w.disk.0);
                if let (Some(Some(s)), Some(vol)) = (snaps.get_mut(d), vols.get_mut(d)) {
                    s.entry(vol, None, w.write_id, 0, &w.st.extents);
                }
            }
        }
        let mut disks = Vec::new();
        for (i, (vol, snap)) in vols.iter_mut().zip(snaps).enumerate() {
            let snap = snap.and_then(|mut s| {
                if s.seal(vol) {
                    Some(s)
                } else {
                    if let Some(b) = ckpt_bufs.get_mut(i) {
                        *b = std::mem::replace(&mut s.buf, AlignedBuf::new(0));
                    }
                    None
                }
            });
            if vol.state != DiskState::Online
                || (snap.is_none() && vol.sb.verified_seq >= vol.next_seq)
            {
                continue;
            }
            disks.push(DiskTask {
                disk: i,
                step: Step::Body,
                snap,
                submitted: 0,
                in_flight: 0,
                bytes_in_flight: 0,
                header_in_flight: false,
                mark: vol.next_seq,
                aborted: false,
            });
        }
        if disks.is_empty() {
            return false;
        }
        self.ckpt_task = Some(CkptTask { disks, err: None });
        self.ckpt_advance();
        true
    }

    /// Moves the background checkpoint along as far as it goes without waiting.
    pub(super) fn ckpt_advance(&mut self) {
        let Some(task) = self.ckpt_task.as_mut() else {
            return;
        };
        for t in task.disks.iter_mut() {
            if let Some(vol) = self.vols.get_mut(t.disk) {
                t.advance(vol, &mut task.err);
            }
        }
    }

    /// A write of the background checkpoint completed on disk `d`: a failure takes the
    /// disk Down; the buffer is kept for the next checkpoint's transfers.
    pub(super) fn ckpt_done(&mut self, d: usize, c: nvme::Completion) {
        let n = (c.tag.0 & !TAG_CLASS) as u32;
        let mut err = None;
        if let Err(e) = c.result {
            if let Some(vol) = self.vols.get_mut(d) {
                err = Some(vol.fail(e));
            }
        }
        if let Some(task) = self.ckpt_task.as_mut() {
            if let Some(t) = task.disks.iter_mut().find(|t| t.disk == d) {
                if n == HEADER_TAG {
                    t.header_in_flight = false;
                } else {
                    t.in_flight = t.in_flight.saturating_sub(1);
                    t.bytes_in_flight = t.bytes_in_flight.saturating_sub(c.buf.len());
                }
            }
            if let Some(e) = err {
                task.err.get_or_insert(e);
            }
        }
        let mut buf = c.buf;
        if let Some(slot) = self.ckpt_bufs.get_mut(d) {
            if slot.len() < BLOCK && buf.capacity() >= CKPT_IO_BYTES {
                buf.set_len(CKPT_IO_BYTES);
                *slot = buf;
            }
        }
    }
}
