//! The store's asynchronous side: reads in flight, commits and deletes waiting for the
//! flush that makes them durable (group commit), and the poll that moves them along.
//!
//! A dataplane loop calls [`Store::poll`] once per turn. It collects every disk's
//! completions (bounded per disk), settles record writes and flushes (in `volume`),
//! answers waiters whose records a completed flush covered, starts the next flush on
//! each disk where a commit is waiting for one, and reports what finished as
//! [`StoreEvent`]s tagged with the caller's `user` value (a session's token).
//!
//! # Group commit
//! A commit (or delete, or dedup reference) appends its record and waits. A record is
//! durable once a flush, submitted after every record up to and including it had
//! completed its write, has completed: the log must be durable as a prefix, since
//! recovery stops at the first torn record. Each disk has at most one flush in
//! flight; while it runs, the next commits gather, and when it completes the next
//! flush goes out at once for all of them — no timer, no artificial delay.
//!
//! Visibility: a new object enters the index when its record is appended (so that
//! dedup, compaction and checkpoints account for it) but stays hidden from readers
//! (`unacked`) until its commit is durable and acknowledged.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use md5::{Digest, Md5};
use nvme::{AlignedBuf, Completion};

use dosp::Fingerprint;

use super::format::{kind, PackedHeader, RecordHeader, BLOCK, BLOCK_U64, PACKED_HDR};
use super::volume::{TAG_CKPT, TAG_CLASS, TAG_COMPACT, TAG_PROBE, TAG_READ};
use super::{Committed, DiskId, Store, StoreError, PREFETCH_SKIP_BLOCKS_MAX};
use crate::copies::Site;

/// A read in flight, named by [`Store::read_start`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReadId(pub(crate) u32);

/// What [`Store::read_start`] did.
#[derive(Debug)]
pub enum ReadStart {
    /// Served from the hot-object cache: the bytes, lent without a copy.
    Ready(Piece),
    /// Reads are in flight; [`StoreEvent::Read`] says when to call
    /// [`Store::read_take`].
    Pending(ReadId),
}

/// A buffer holding object bytes that the store lends out.
pub enum Lent {
    /// The buffer a device read into (its CRCs verified in place); it goes back to
    /// the read pool with [`Store::read_give`].
    Device(AlignedBuf),
    /// A hot-object cache entry, shared: the cache may evict it meanwhile, the bytes
    /// live as long as someone holds them.
    Cached(Arc<[u8]>),
}

impl Lent {
    fn bytes(&self) -> &[u8] {
        match self {
            Lent::Device(b) => b,
            Lent::Cached(a) => a,
        }
    }
}

/// One part of a [`Piece`]: a lent buffer and the range of it that holds object bytes.
pub type Part = (Lent, Range<usize>);

/// The bytes of a finished read, in object order, where they already are: the
/// buffers the device read into (a read may span several extents and may carry a
/// record header block in front, so a piece is a list of ranges) or a cache entry.
/// Nothing is copied to make one. Give it back with [`Store::read_give`] (through the
/// loop that lent it, when it crossed loops) once its bytes are sent; a piece merely
/// dropped frees its buffers instead of pooling them.
pub struct Piece {
    parts: Vec<Part>,
    len: usize,
    /// The loop whose store lent the device buffers, when it is not the loop that
    /// holds the piece now (set by the shards; `None` from a store).
    pub(crate) lender: Option<u16>,
}

impl std::fmt::Debug for Piece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Piece")
            .field("len", &self.len)
            .field("parts", &self.parts.len())
            .field("lender", &self.lender)
            .finish()
    }
}

impl Piece {
    fn new(parts: Vec<Part>) -> Piece {
        let len = parts.iter().map(|(_, r)| r.len()).sum();
        Piece {
            parts,
            len,
            lender: None,
        }
    }

    /// Object bytes in the piece.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The object bytes, part by part, in order.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        self.parts
            .iter()
            .map(|(b, r)| b.bytes().get(r.clone()).unwrap_or(&[]))
    }

    /// The bytes from `at` (a byte of the piece) to the end of the part it falls in:
    /// what to send next once `at` bytes are sent. Empty at or past the end.
    pub fn slice_at(&self, mut at: usize) -> &[u8] {
        for s in self.slices() {
            if at < s.len() {
                return &s[at..];
            }
            at -= s.len();
        }
        &[]
    }

    /// Copies the bytes into the front of `out` (as many as fit); returns how many.
    pub fn copy_to(&self, out: &mut [u8]) -> usize {
        let mut at = 0;
        for s in self.slices() {
            let n = s.len().min(out.len() - at);
            out[at..at + n].copy_from_slice(&s[..n]);
            at += n;
        }
        at
    }
}

/// Something that finished, for the caller that started it (`user`).
#[derive(Debug)]
pub enum StoreEvent {
    /// The device reads of a [`ReadId`] completed: call [`Store::read_take`].
    Read { user: u64, id: ReadId },
    /// A commit is durable (or failed).
    Committed {
        user: u64,
        result: Result<Committed, StoreError>,
    },
    /// A delete is durable (or failed): the references left.
    Deleted {
        user: u64,
        result: Result<u32, StoreError>,
    },
}

impl StoreEvent {
    pub fn user(&self) -> u64 {
        match self {
            StoreEvent::Read { user, .. }
            | StoreEvent::Committed { user, .. }
            | StoreEvent::Deleted { user, .. } => *user,
        }
    }
}

/// One device read of a [`ReadOp`]: data blocks of one extent, with or without the
/// extent's header block in front.
pub(crate) struct Sub {
    pub hdr_phys: u64,
    pub ext_len: u32,
    /// Payload byte range of the extent that is wanted.
    pub lo: u64,
    pub hi: u64,
    /// First payload block in `buf` (after the header block when `with_hdr`).
    pub b0: u64,
    /// The buffer starts with the extent's header block.
    pub with_hdr: bool,
    /// A header-only read (the data is in the next sub).
    pub hdr_only: bool,
    /// A packed record: the buffer holds the blocks it lies in, header and data.
    pub packed: bool,
    /// CRCs of the wanted blocks, when the header came from the header cache.
    pub crcs: Vec<u32>,
    pub buf: Option<AlignedBuf>,
    pub done: bool,
}

impl Sub {
    /// Where its device read starts.
    fn device_offset(&self) -> u64 {
        if self.packed {
            self.hdr_phys - self.hdr_phys % BLOCK_U64
        } else if self.with_hdr || self.hdr_only {
            self.hdr_phys
        } else {
            self.hdr_phys + BLOCK_U64 * (1 + self.b0)
        }
    }
}

pub(crate) struct ReadOp {
    pub user: u64,
    pub fp: Fingerprint,
    pub disk: DiskId,
    pub write_id: u64,
    pub offset: u64,
    pub n: usize,
    pub obj_len: u64,
    pub subs: Vec<Sub>,
    pub pending: usize,
    pub err: Option<StoreError>,
}

/// What a waiter does once its record is durable.
#[derive(Debug)]
pub(crate) enum WaitKind {
    /// A new object: acknowledge it and let readers see it.
    New { c: Committed },
    /// A dedup reference (+1), already applied to the index.
    Dedup { c: Committed },
    /// A delete (−1), already applied; `left` references remain. `removed` is the
    /// entry it took out of the index at zero, put back if the delete fails.
    Delete {
        fp: Fingerprint,
        left: u32,
        removed: Option<Box<super::Entry>>,
    },
}

#[derive(Debug)]
pub(crate) struct Waiter {
    /// Seq of its record: durable once the disk's durable_seq passes it.
    pub seq: u64,
    pub user: u64,
    pub kind: WaitKind,
}

/// Read buffers by size class (powers of two blocks), reused so that a warm store
/// does not allocate per read.
#[derive(Default)]
pub(crate) struct BufPool {
    free: Vec<Vec<AlignedBuf>>,
}

impl BufPool {
    fn class(blocks: usize) -> usize {
        blocks.max(1).next_power_of_two().trailing_zeros() as usize
    }

    pub fn take(&mut self, len: usize) -> AlignedBuf {
        let blocks = len.div_ceil(BLOCK);
        let c = Self::class(blocks);
        let mut b = self
            .free
            .get_mut(c)
            .and_then(|v| v.pop())
            .unwrap_or_else(|| AlignedBuf::new(BLOCK << c));
        b.set_len(blocks * BLOCK);
        b
    }

    pub fn give(&mut self, mut b: AlignedBuf) {
        let cap = b.capacity();
        b.set_len(cap);
        let c = Self::class(cap / BLOCK);
        if self.free.len() <= c {
            self.free.resize_with(c + 1, Vec::new);
        }
        // Keep a bounded number per class; the rest go back to the allocator.
        if self.free[c].len() < 256 {
            self.free[c].push(b);
        }
    }
}

impl Store {
    /// Starts reading `min(len, object length - offset)` bytes of `fp` at `offset`.
    /// A small object in the hot-object cache is lent at once ([`ReadStart::Ready`]:
    /// the cache entry itself, nothing copied); otherwise the device reads are
    /// submitted, and [`StoreEvent::Read`] with `user` says when [`Store::read_take`]
    /// can lend the verified buffers.
    pub fn read_start(
        &mut self,
        fp: &Fingerprint,
        offset: u64,
        len: usize,
        user: u64,
    ) -> Result<ReadStart, StoreError> {
        if self.unacked.contains(fp) {
            return Err(StoreError::NotFound(*fp));
        }
        let Some(entry) = self.index.get(fp) else {
            return Err(StoreError::NotFound(*fp));
        };
        let (disk, obj_len, write_id) = (entry.disk, entry.len, entry.write_id);
        if offset > obj_len {
            return Err(StoreError::OutOfRange {
                offset,
                len: obj_len,
            });
        }
        self.vols[usize::from(disk.0)].check_online()?;
        let n = (len as u64).min(obj_len - offset) as usize;
        if n == 0 {
            self.counters.reads += 1;
            let parts = self.spare_parts.pop().unwrap_or_default();
            return Ok(ReadStart::Ready(Piece::new(parts)));
        }
        // Only objects the cache would hold count as its hits or misses.
        if let Some(data) = self
            .cache
            .wants(obj_len)
            .then(|| self.cache.get(fp))
            .flatten()
        {
            let at = offset as usize;
            self.counters.reads += 1;
            self.counters.bytes_read += n as u64;
            let mut parts = self.spare_parts.pop().unwrap_or_default();
            parts.push((Lent::Cached(data), at..at + n));
            return Ok(ReadStart::Ready(Piece::new(parts)));
        }
        let id = match self.free_reads.pop() {
            Some(i) => i,
            None => {
                self.reads.push(None);
                (self.reads.len() - 1) as u32
            }
        };
        let mut op = ReadOp {
            user,
            fp: *fp,
            disk,
            write_id,
            offset,
            n,
            obj_len,
            subs: self.spare_subs.pop().unwrap_or_default(),
            pending: 0,
            err: None,
        };
        self.plan_read(&mut op, &entry);
        let vol = &mut self.vols[usize::from(disk.0)];
        for s in op.subs.iter_mut() {
            let phys = s.device_offset();
            if let Some(buf) = s.buf.take() {
                vol.submit_read(id, phys, buf);
                op.pending += 1;
            }
        }
        self.counters.reads += 1;
        self.reads[id as usize] = Some(op);
        Ok(ReadStart::Pending(ReadId(id)))
    }

    /// Splits a read into device reads: per extent, one read of the wanted blocks
    /// (with the header in front when it is not cached and not far away), or a
    /// header read and a data read side by side.
    fn plan_read(&mut self, op: &mut ReadOp, e: &super::Entry) {
        let end = op.offset + op.n as u64;
        let mut ext_start = 0u64;
        for ext in &e.extents {
            let ext_end = ext_start + u64::from(ext.len);
            if ext_start >= end {
                break;
            }
            if ext_end <= op.offset {
                ext_start = ext_end;
                continue;
            }
            let lo = op.offset.max(ext_start) - ext_start;
            let hi = end.min(ext_end) - ext_start;
            if ext.packed {
                // Header and data in one read of the blocks the record lies in; the
                // whole record is checked, whatever part of it is wanted.
                let off = ext.hdr % BLOCK_U64;
                let span =
                    (off + PACKED_HDR as u64 + u64::from(ext.len)).next_multiple_of(BLOCK_U64);
                op.subs.push(Sub {
                    hdr_phys: ext.hdr,
                    ext_len: ext.len,
                    lo,
                    hi,
                    b0: 0,
                    with_hdr: false,
                    hdr_only: false,
                    packed: true,
                    crcs: Vec::new(),
                    buf: Some(self.read_bufs.take(span as usize)),
                    done: false,
                });
                ext_start = ext_end;
                continue;
            }
            let b0 = lo / BLOCK_U64;
            let b1 = hi.div_ceil(BLOCK_U64);
            let key = (op.disk, ext.hdr, op.write_id);
            let mut sub = Sub {
                hdr_phys: ext.hdr,
                ext_len: ext.len,
                lo,
                hi,
                b0,
                with_hdr: false,
                hdr_only: false,
                packed: false,
                crcs: Vec::new(),
                buf: None,
                done: false,
            };
            if let Some(slot) = self.hdr_cache.find(key) {
                let h = &self.hdr_cache.slots[slot].1;
                sub.crcs = (b0..b1)
                    .map(|b| h.block_crc(b as usize).unwrap_or(0))
                    .collect();
                sub.buf = Some(self.read_bufs.take(((b1 - b0) * BLOCK_U64) as usize));
                op.subs.push(sub);
            } else if b0 <= PREFETCH_SKIP_BLOCKS_MAX {
                sub.with_hdr = true;
                sub.b0 = 0;
                sub.buf = Some(self.read_bufs.take(((1 + b1) * BLOCK_U64) as usize));
                op.subs.push(sub);
            } else {
                let hdr = Sub {
                    hdr_only: true,
                    buf: Some(self.read_bufs.take(BLOCK)),
                    crcs: Vec::new(),
                    ..sub
                };
                op.subs.push(hdr);
                sub.buf = Some(self.read_bufs.take(((b1 - b0) * BLOCK_U64) as usize));
                op.subs.push(sub);
            }
            ext_start = ext_end;
        }
    }

    /// Lends the bytes of a finished read: the buffers the device read into, each
    /// block checked against its CRC in place first. A read that failed any check
    /// lends nothing (bytes that fail it are never handed out). A whole small object
    /// whose MD5 matches its fingerprint enters the hot-object cache (its one copy).
    /// Give the piece back with [`Store::read_give`].
    pub fn read_take(&mut self, id: ReadId) -> Result<Piece, StoreError> {
        let Some(mut op) = self.reads.get_mut(id.0 as usize).and_then(|o| o.take()) else {
            return Err(StoreError::UnknownWrite);
        };
        self.free_reads.push(id.0);
        let result = match op.err.take() {
            Some(e) => Err(e),
            None if op.pending > 0 => Err(StoreError::Format("read finished early".into())),
            None => self.verify(&op).map(|()| self.lend(&mut op)),
        };
        // A read planned short (its object left the index meanwhile) lends nothing.
        let result = match result {
            Ok(p) if p.len() != op.n => {
                self.read_give(p);
                Err(StoreError::Format("read came up short".into()))
            }
            other => other,
        };
        self.recycle_subs(&mut op.subs);
        if let Ok(piece) = &result {
            let n = piece.len();
            self.counters.bytes_read += n as u64;
            if op.offset == 0 && n as u64 == op.obj_len && self.cache.wants(op.obj_len) {
                // Verified block by block already; the MD5 proves the whole object
                // is the fingerprinted one before anyone is served from memory.
                let mut md5 = Md5::new();
                for s in piece.slices() {
                    md5.update(s);
                }
                let got: [u8; 16] = md5.finalize().into();
                if got == op.fp.0 {
                    if let Some(copied) = self.cache.insert_from(op.fp, piece) {
                        self.copies.add(Site::CacheFill, copied);
                    }
                }
            }
        }
        result
    }

    /// Gives the buffers of a piece back to the read pool (a cache entry's share is
    /// just dropped).
    pub fn read_give(&mut self, mut piece: Piece) {
        for (b, _) in piece.parts.drain(..) {
            if let Lent::Device(b) = b {
                self.read_bufs.give(b);
            }
        }
        if self.spare_parts.len() < 1024 {
            self.spare_parts.push(piece.parts);
        }
    }

    /// Moves the verified buffers of a read into a piece, each with the range that
    /// holds the wanted object bytes (past the header block, when one was read).
    fn lend(&mut self, op: &mut ReadOp) -> Piece {
        let mut parts = self.spare_parts.pop().unwrap_or_default();
        for s in op.subs.iter_mut().filter(|s| !s.hdr_only) {
            let Some(buf) = s.buf.take() else { continue };
            if s.packed {
                let at = (s.hdr_phys % BLOCK_U64) as usize + PACKED_HDR;
                parts.push((Lent::Device(buf), at + s.lo as usize..at + s.hi as usize));
                continue;
            }
            let skip = if s.with_hdr { BLOCK } else { 0 };
            let from = skip + (s.lo - s.b0 * BLOCK_U64) as usize;
            let to = skip + (s.hi - s.b0 * BLOCK_U64) as usize;
            parts.push((Lent::Device(buf), from..to));
        }
        Piece::new(parts)
    }

    /// Drops a finished read nobody wants any more (its session closed).
    pub fn read_release(&mut self, id: ReadId) {
        if let Some(mut op) = self.reads.get_mut(id.0 as usize).and_then(|o| o.take()) {
            self.free_reads.push(id.0);
            self.recycle_subs(&mut op.subs);
        }
    }

    /// A finished read's buffers and its list of device reads go back to their pools.
    fn recycle_subs(&mut self, subs: &mut Vec<Sub>) {
        for s in subs.drain(..) {
            if let Some(b) = s.buf {
                self.read_bufs.give(b);
            }
        }
        if self.spare_subs.len() < 1024 {
            self.spare_subs.push(std::mem::take(subs));
        }
    }

    /// Checks every wanted block of a finished read against its CRC (and each
    /// header read against the extent it should describe), in place.
    fn verify(&mut self, op: &ReadOp) -> Result<(), StoreError> {
        let nonce = self.vols[usize::from(op.disk.0)].log_nonce();
        let mut hdr_of_next: Option<&[u8]> = None;
        for s in &op.subs {
            let Some(buf) = s.buf.as_deref() else {
                return Err(self.corrupt(op, "read buffer missing"));
            };
            if s.hdr_only {
                hdr_of_next = Some(&buf[..BLOCK]);
                continue;
            }
            if s.packed {
                let off = (s.hdr_phys % BLOCK_U64) as usize;
                let at = off + PACKED_HDR;
                let h = buf.get(off..).and_then(|b| PackedHeader::check(b, nonce));
                let ok = h.is_some_and(|h| {
                    // Its own fingerprint names it (the index keeps no write id
                    // for a packed object).
                    h.kind == kind::COMMIT
                        && h.data_len.get() == s.ext_len
                        && h.fingerprint == op.fp.0
                        && buf
                            .get(at..at + s.ext_len as usize)
                            .is_some_and(|d| crc32c::crc32c(d) == h.data_crc.get())
                });
                if !ok {
                    return Err(self.corrupt(op, "bad packed record"));
                }
                continue;
            }
            let (hdr, data) = if s.with_hdr {
                (Some(&buf[..BLOCK]), &buf[BLOCK..])
            } else {
                (hdr_of_next.take(), buf)
            };
            let header: Option<&RecordHeader> = match hdr {
                Some(raw) => {
                    let h = RecordHeader::check(raw, nonce).filter(|h| {
                        h.kind & kind::SEGMENT != 0
                            && h.write_id.get() == op.write_id
                            && h.payload_len.get() == s.ext_len
                    });
                    match h {
                        Some(h) => {
                            let key = (op.disk, s.hdr_phys, op.write_id);
                            if self.hdr_cache.find(key).is_none() {
                                self.hdr_cache.insert(key, h);
                            }
                            Some(h)
                        }
                        None => return Err(self.corrupt(op, "bad segment header")),
                    }
                }
                None => None,
            };
            let b1 = s.hi.div_ceil(BLOCK_U64);
            let first = s.lo / BLOCK_U64;
            for b in first..b1 {
                let at = ((b - s.b0) * BLOCK_U64) as usize;
                let Some(block) = data.get(at..at + BLOCK) else {
                    return Err(self.corrupt(op, "short read"));
                };
                let want = match header {
                    Some(h) => h.block_crc(b as usize),
                    None => s.crcs.get((b - first) as usize).copied(),
                };
                if want != Some(crc32c::crc32c(block)) {
                    return Err(self.corrupt(op, "bad block"));
                }
            }
            // The lent range must lie in what was read (it does for a complete read;
            // the check keeps a short one from ever being sliced past its end).
            let to = (s.hi - s.b0 * BLOCK_U64) as usize;
            if to > data.len() {
                return Err(self.corrupt(op, "short read"));
            }
        }
        Ok(())
    }

    fn corrupt(&mut self, op: &ReadOp, what: &str) -> StoreError {
        let fp = op.fp;
        self.counters.corrupt_blocks += 1;
        self.vols[usize::from(op.disk.0)].note_corrupt(&fp, 1, &format!("on read: {what}"));
        tracing::error!(fingerprint = %fp, disk = op.disk.0, "object data failed its checksum: {what}");
        StoreError::Corrupt { fp, disk: op.disk }
    }

    /// Moves every asynchronous operation along; see the module documentation.
    /// Bounded: at most a poll's worth of completions per disk.
    pub fn poll(&mut self, events: &mut Vec<StoreEvent>) {
        events.append(&mut self.parked_events);
        let mut reads = std::mem::take(&mut self.read_scratch);
        for d in 0..self.vols.len() {
            reads.clear();
            self.vols[d].poll(&mut reads);
            for c in reads.drain(..) {
                match c.tag.0 & TAG_CLASS {
                    TAG_PROBE => self.probe_done(d, c),
                    TAG_CKPT => self.ckpt_done(d, c),
                    TAG_COMPACT => self.compact_done(d, c),
                    _ => self.read_done(c, events),
                }
            }
            self.recycle(d);
            self.settle_waiters(d, events);
        }
        self.read_scratch = reads;
        // After the waiters: a group commit's flush goes first, the checkpoint and the
        // compaction step only start one of their own when none is in flight.
        self.ckpt_advance();
        self.compact_advance();
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// The completion descriptors of the disks that have one (io_uring's eventfd),
    /// by disk, for the loop to sleep on.
    pub fn notify_fds(&self) -> Vec<(DiskId, std::os::fd::RawFd)> {
        self.vols
            .iter()
            .filter_map(|v| v.notify_fd().map(|fd| (v.id, fd)))
            .collect()
    }

    /// Empties a disk's completion descriptor after it woke the loop.
    pub fn drain_notify(&mut self, disk: DiskId) {
        if let Some(v) = self.vols.get_mut(usize::from(disk.0)) {
            v.drain_notify();
        }
    }

    /// Whether the loop may sleep in epoll now: nothing waits for a poll to start or
    /// to be handed out, and every device operation in flight will signal its disk's
    /// completion descriptor. Otherwise the loop polls without sleeping.
    pub fn can_sleep(&self) -> bool {
        self.urgent.is_none()
            && self.compact_task.is_none()
            && self.parked_events.is_empty()
            && self.vols.iter().all(|v| v.quiescent())
    }

    fn read_done(&mut self, c: Completion, events: &mut Vec<StoreEvent>) {
        let id = (c.tag.0 & !TAG_READ) as u32;
        let Some(op) = self.reads.get_mut(id as usize).and_then(|o| o.as_mut()) else {
            return;
        };
        op.pending = op.pending.saturating_sub(1);
        let slot = op
            .subs
            .iter_mut()
            .find(|s| !s.done && s.buf.is_none() && s.device_offset() == c.offset);
        match slot {
            Some(s) => {
                s.done = true;
                s.buf = Some(c.buf);
            }
            None => self.read_bufs.give(c.buf),
        }
        if let Err(e) = c.result {
            let disk = op.disk;
            let err = self.vols[usize::from(disk.0)].fail(e);
            if let Some(op) = self.reads[id as usize].as_mut() {
                op.err.get_or_insert(err);
            }
        }
        if let Some(op) = self.reads[id as usize].as_ref() {
            if op.pending == 0 {
                events.push(StoreEvent::Read {
                    user: op.user,
                    id: ReadId(id),
                });
            }
        }
    }

    /// Buffers of completed record writes go back to their pools.
    fn recycle(&mut self, d: usize) {
        let staging = BLOCK + self.cfg.segment_bytes;
        for b in self.vols[d].done_bufs.drain(..) {
            if b.capacity() == staging {
                if self.spare_staging.len() < self.cfg.max_open_writes * 2 {
                    self.spare_staging.push(b);
                }
                self.staging_out = self.staging_out.saturating_sub(1);
            } else if b.capacity() == BLOCK && self.meta_bufs.len() < 64 {
                self.meta_bufs.push(b);
            }
        }
    }

    /// Acknowledges the waiters of disk `d` that a completed flush covered, fails
    /// them all if the disk went down, and starts the next flush if one is wanted.
    fn settle_waiters(&mut self, d: usize, events: &mut Vec<StoreEvent>) {
        if self.waiters[d].is_empty() {
            return;
        }
        if self.vols[d].failed {
            let err = self.vols[d].unavailable();
            let waiting: Vec<Waiter> = self.waiters[d].drain(..).collect();
            for w in waiting {
                self.fail_waiter(w, &err, events);
            }
            return;
        }
        let durable = self.vols[d].durable_seq;
        while self.waiters[d].front().is_some_and(|w| w.seq < durable) {
            if let Some(w) = self.waiters[d].pop_front() {
                self.ack_waiter(w, events);
            }
        }
        let vol = &mut self.vols[d];
        if vol.flushing.is_none()
            && self.waiters[d]
                .front()
                .is_some_and(|w| w.seq < vol.completed_upto())
        {
            vol.submit_flush();
        }
    }

    fn ack_waiter(&mut self, w: Waiter, events: &mut Vec<StoreEvent>) {
        match w.kind {
            WaitKind::New { c } => {
                self.unacked.remove(&c.fingerprint);
                self.counters.stores += 1;
                events.push(StoreEvent::Committed {
                    user: w.user,
                    result: Ok(c),
                });
            }
            WaitKind::Dedup { c } => {
                self.counters.stores += 1;
                self.counters.dedup_hits += 1;
                events.push(StoreEvent::Committed {
                    user: w.user,
                    result: Ok(c),
                });
            }
            WaitKind::Delete { left, .. } => {
                self.counters.deletes += 1;
                events.push(StoreEvent::Deleted {
                    user: w.user,
                    result: Ok(left),
                });
            }
        }
    }

    /// The disk failed before the waiter's record was durable: undo what it did to
    /// the index (the disk is down, so none of it is served anyway) and say why.
    fn fail_waiter(&mut self, w: Waiter, err: &StoreError, events: &mut Vec<StoreEvent>) {
        let again = || match err {
            StoreError::DiskFailed { disk, .. } => StoreError::DiskFailed {
                disk: *disk,
                source: nvme::DevError::Io {
                    offset: 0,
                    source: std::io::Error::other("disk failed before the commit was durable"),
                },
            },
            StoreError::DiskOffline(d) => StoreError::DiskOffline(*d),
            _ => StoreError::NoUsableDisk,
        };
        match w.kind {
            WaitKind::New { c } => {
                self.unacked.remove(&c.fingerprint);
                if let Some(e) = self.index.remove(&c.fingerprint) {
                    let vol = &mut self.vols[usize::from(e.disk.0)];
                    vol.live_bytes = vol.live_bytes.saturating_sub(e.footprint);
                    vol.objects = vol.objects.saturating_sub(1);
                }
                self.counters.aborts += 1;
                events.push(StoreEvent::Committed {
                    user: w.user,
                    result: Err(again()),
                });
            }
            WaitKind::Dedup { c } => {
                if let Some(mut e) = self.index.get_mut(&c.fingerprint) {
                    e.refcount = e.refcount.saturating_sub(1);
                }
                self.counters.aborts += 1;
                events.push(StoreEvent::Committed {
                    user: w.user,
                    result: Err(again()),
                });
            }
            WaitKind::Delete { fp, removed, .. } => {
                // The reference was not dropped durably: the index keeps it, as it
                // would have had the delete never been asked (the disk is down, so it
                // is not served, but a later open may bring the disk back).
                match removed {
                    Some(e) => {
                        let vol = &mut self.vols[usize::from(e.disk.0)];
                        vol.live_bytes += e.footprint;
                        vol.objects += 1;
                        self.index.insert(fp, *e);
                    }
                    None => {
                        if let Some(mut e) = self.index.get_mut(&fp) {
                            e.refcount = e.refcount.saturating_add(1);
                        }
                    }
                }
                events.push(StoreEvent::Deleted {
                    user: w.user,
                    result: Err(again()),
                });
            }
        }
    }

    /// Polls until an event for `user` arrives, blocking (tests, tools, start-up);
    /// other events are kept for the next [`Store::poll`].
    pub(crate) fn wait_for(&mut self, user: u64) -> StoreEvent {
        let mut events = Vec::new();
        loop {
            self.poll(&mut events);
            if let Some(i) = events.iter().position(|e| e.user() == user) {
                let ev = events.remove(i);
                self.parked_events.append(&mut events);
                return ev;
            }
            self.parked_events.append(&mut events);
            if !self.busy_devices() {
                // Nothing can complete: the event was lost (a bug); say so rather
                // than hang.
                return StoreEvent::Committed {
                    user,
                    result: Err(StoreError::Format("no operation in flight".into())),
                };
            }
            for v in self.vols.iter_mut() {
                v.wait_device();
            }
        }
    }

    pub(super) fn busy_devices(&self) -> bool {
        self.reads.len() > self.free_reads.len()
            || self.waiters.iter().any(|w| !w.is_empty())
            || self
                .vols
                .iter()
                .any(|v| !v.inflight.is_empty() || v.flushing.is_some() || v.has_parked())
    }

    /// Blocks until every commit and delete in flight is durable and answered (the
    /// answers wait in `parked_events`): before a blocking checkpoint, which must see
    /// a settled log.
    pub fn settle(&mut self) {
        let mut events = Vec::new();
        while self.waiters.iter().any(|w| !w.is_empty())
            || self
                .vols
                .iter()
                .any(|v| !v.inflight.is_empty() || v.flushing.is_some())
        {
            self.poll(&mut events);
            self.parked_events.append(&mut events);
            for v in self.vols.iter_mut() {
                v.wait_device();
            }
        }
    }
}

/// The hot-object cache: whole small objects whose MD5 was checked against their
/// fingerprint when they entered, evicted by CLOCK (a referenced bit per entry,
/// cleared by the hand as it passes: one pass of a scan does not flush the entries
/// that are read again and again). Bounded by `cache_bytes`; 0 disables it.
pub(crate) struct ObjCache {
    budget: usize,
    /// Largest object cached (a fetch of a bigger one gains little over the device).
    obj_max: u64,
    used: usize,
    map: std::collections::HashMap<Fingerprint, usize>,
    entries: Vec<CacheEntry>,
    hand: usize,
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    pub evictions: u64,
}

struct CacheEntry {
    fp: Option<Fingerprint>,
    /// Shared with the pieces that serve it, so that a hit is sent without a copy.
    data: Arc<[u8]>,
    referenced: bool,
}

impl ObjCache {
    pub fn new(budget: usize, obj_max: u64) -> ObjCache {
        ObjCache {
            budget,
            obj_max,
            used: 0,
            map: std::collections::HashMap::new(),
            entries: Vec::new(),
            hand: 0,
            hits: 0,
            misses: 0,
            inserts: 0,
            evictions: 0,
        }
    }

    pub fn wants(&self, len: u64) -> bool {
        self.budget > 0 && len <= self.obj_max && (len as usize) <= self.budget
    }

    pub fn get(&mut self, fp: &Fingerprint) -> Option<Arc<[u8]>> {
        if self.budget == 0 {
            return None;
        }
        match self.map.get(fp) {
            Some(&i) => {
                self.hits += 1;
                let e = &mut self.entries[i];
                e.referenced = true;
                Some(Arc::clone(&e.data))
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Copies a verified whole object into the cache, if it wants it. Returns the
    /// bytes copied.
    pub fn insert_from(&mut self, fp: Fingerprint, piece: &Piece) -> Option<usize> {
        if !self.wants(piece.len() as u64) || self.map.contains_key(&fp) {
            return None;
        }
        let mut data: Arc<[u8]> = Arc::from(vec![0u8; piece.len()]);
        let copied = Arc::get_mut(&mut data).map(|d| piece.copy_to(d))?;
        self.insert(fp, data);
        Some(copied)
    }

    pub fn insert(&mut self, fp: Fingerprint, data: Arc<[u8]>) {
        if !self.wants(data.len() as u64) || self.map.contains_key(&fp) {
            return;
        }
        while self.used + data.len() > self.budget {
            if !self.evict_one() {
                return;
            }
        }
        let len = data.len();
        let entry = CacheEntry {
            fp: Some(fp),
            data,
            referenced: false,
        };
        self.used += len;
        self.inserts += 1;
        let i = match self.entries.iter().position(|e| e.fp.is_none()) {
            Some(i) => {
                self.entries[i] = entry;
                i
            }
            None => {
                self.entries.push(entry);
                self.entries.len() - 1
            }
        };
        self.map.insert(fp, i);
    }

    /// Advances the hand to an unreferenced entry and drops it.
    fn evict_one(&mut self) -> bool {
        if self.map.is_empty() {
            return false;
        }
        // Two sweeps at most: the first clears referenced bits.
        for _ in 0..2 * self.entries.len() {
            let i = self.hand % self.entries.len();
            self.hand = (i + 1) % self.entries.len();
            let e = &mut self.entries[i];
            let Some(fp) = e.fp else { continue };
            if e.referenced {
                e.referenced = false;
                continue;
            }
            self.remove_at(i, fp);
            self.evictions += 1;
            return true;
        }
        false
    }

    fn remove_at(&mut self, i: usize, fp: Fingerprint) {
        self.map.remove(&fp);
        let e = &mut self.entries[i];
        self.used -= e.data.len();
        e.fp = None;
        e.data = Arc::from(Vec::new());
    }

    /// Forgets `fp` (deleted, or its disk went away).
    pub fn remove(&mut self, fp: &Fingerprint) {
        if let Some(&i) = self.map.get(fp) {
            self.remove_at(i, *fp);
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits,
            misses: self.misses,
            inserts: self.inserts,
            evictions: self.evictions,
            bytes: self.used as u64,
            objects: self.map.len() as u64,
            capacity_bytes: self.budget as u64,
        }
    }
}

/// What the hot-object cache has done since open, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    pub evictions: u64,
    pub bytes: u64,
    pub objects: u64,
    pub capacity_bytes: u64,
}

/// Waiters of one disk, in seq order.
pub(crate) type Waiters = VecDeque<Waiter>;

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(i: u8) -> Fingerprint {
        Fingerprint([i; 16])
    }

    #[test]
    fn cache_evicts_unreferenced_first_and_stays_in_budget() {
        let mut c = ObjCache::new(3 * 4096, 4096);
        for i in 0..3 {
            c.insert(fp(i), Arc::from(vec![i; 4096]));
        }
        // 0 is read again: referenced; inserting 3 evicts 1 (the first unreferenced).
        assert!(c.get(&fp(0)).is_some());
        c.insert(fp(3), Arc::from(vec![3u8; 4096]));
        assert!(c.get(&fp(0)).is_some());
        assert!(c.get(&fp(1)).is_none());
        assert!(c.get(&fp(3)).is_some());
        assert!(c.stats().bytes <= 3 * 4096);
        c.remove(&fp(3));
        assert!(c.get(&fp(3)).is_none());
    }

    #[test]
    fn a_disabled_cache_holds_nothing() {
        let mut c = ObjCache::new(0, 4096);
        c.insert(fp(1), Arc::from(vec![1u8; 10]));
        assert!(c.get(&fp(1)).is_none());
        // Too big for the per-object limit.
        let mut c = ObjCache::new(1 << 20, 4096);
        c.insert(fp(2), Arc::from(vec![2u8; 8192]));
        assert!(c.get(&fp(2)).is_none());
    }
}
