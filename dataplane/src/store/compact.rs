//! Compaction: turning the dead space of a disk's circular log (deleted objects,
//! aborted and deduplicated writes, REF records, WRAP waste) back into free space.
//!
//! Space is only ever reclaimed at the head. A step takes a window of records from
//! the head; every live object with any record inside the window is re-appended at
//! the tail (its segments copied verbatim, block CRCs included, the last one carrying
//! a COMMIT with the object's current *absolute* refcount); then a flush; then the new
//! head goes into the superblock (other copy, generation + 1); only once that write
//! is flushed is the window free. A crash before then replays the old head: the moved
//! COMMIT comes after every REF of the old copy and sets the refcount outright, so
//! replay order does not matter. A crash after it replays from the new head, where the
//! old copy's COMMIT (if beyond the window) is recognised as partial and skipped.
//!
//! A step is a background task ([`CompactTask`]), moved along by every
//! [`Store::poll`] as the device completes its operations, never waiting on the
//! device: it waits for the writes of every record before it to complete, reads the
//! window (at most [`COMPACT_STEP_BYTES`] of log, in 1 MiB reads) and parses its
//! record headers from memory (`Volume::record_in`, the rules of recovery), reads
//! the live objects' records (a bounded number of bytes at a time) and re-appends
//! them with the asynchronous appends, waits for them to be durable (the group
//! commit's flush, or one of its own when none is in flight), updates the index, and
//! writes the superblock and a flush. The loop starts a step when idle
//! ([`Store::compact_start`]) or for a STORE waiting for room
//! ([`Store::compact_soon`]); [`Store::compact_tick`] reports each step's end.
//! [`Store::compact`] and [`Store::maybe_compact`] drive the same task to its end,
//! blocking (tests and tools).
//!
//! Stores, deletes and dedups go on while a step runs. Each moved COMMIT takes the
//! refcount the index has *when it is appended*, which already counts every REF
//! appended before it (the index changes together with each append), so replay sets
//! exactly that and applies the REFs after it. An object deleted (or deleted and
//! stored again elsewhere) before its move ends is not moved further: its extents are
//! compared with the ones chosen before every record is re-appended and again before
//! the index is updated, so a deleted object is never resurrected and a newer copy
//! never replaced; its records already moved are dead space.
//!
//! Segments are copied with their original CRCs rather than re-checksummed, so a block
//! that had rotted stays detectable after the move instead of being laundered.
//! The window never passes the first record of an open write: its segments are not in
//! the index yet and must stay where the write's extent list says. If the tail runs
//! out of room in the middle of a step, the window shrinks to the objects moved so far.

use std::collections::HashMap;

use nvme::AlignedBuf;
use tracing::{debug, error, warn};
use zerocopy::little_endian::U32;

use dosp::Fingerprint;

use super::format::{kind, PackedHeader, RecordHeader, BLOCK, BLOCK_U64, PACKED_HDR};
use super::volume::{Reserve, TAG_CLASS};
use super::{CompactReport, DiskId, DiskState, Extent, Store, StoreError, StoreEvent};

/// Log bytes one compaction step covers at most (a step ends at a record boundary,
/// so its last record may reach past this).
pub const COMPACT_STEP_BYTES: u64 = 8 << 20;

/// Bytes of live records a step has read and not yet re-appended, at most (at least
/// one record).
const MOVE_INFLIGHT_BYTES: usize = 1 << 20;

/// Bytes per read of the window.
const WINDOW_READ_BYTES: u64 = 1 << 20;

/// Tag bit of a window read; without it the tag numbers a live record's read.
const WINDOW_TAG: u32 = 1 << 31;

/// A live object considered for moving: first record position, fingerprint, bytes
/// to move, largest record.
struct Candidate {
    first_lp: u64,
    fp: Fingerprint,
    footprint: u64,
    max_record: u64,
}

/// Where a compaction step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Waiting for the writes of the records appended before the step began (seq
    /// below `settle_seq`) to complete: the window is read from the device.
    Settle,
    /// The window's reads are in flight.
    Window,
    /// Live records are read and re-appended at the tail.
    Move,
    /// Waiting for the moved records to be durable.
    Durable,
    /// The new head goes into the superblock once no other superblock write is in
    /// flight.
    Head,
    HeadWrite,
    /// Waiting for flush number `n`, submitted after the superblock write completed.
    HeadFlush(u64),
    Done,
}

/// One live object being moved.
struct Move {
    fp: Fingerprint,
    /// Its extents and write id when the window was chosen.
    old: Vec<Extent>,
    old_write_id: u64,
    len: u64,
    first_lp: u64,
    /// The moved copy so far.
    write_id: u64,
    extents: Vec<Extent>,
    bad_blocks: u64,
    /// All its records were re-appended.
    moved: bool,
    /// Given up: deleted or changed meanwhile, or no room (what it moved is dead).
    dropped: bool,
}

/// Where the read of one live record is.
enum ItemState {
    Queued,
    Reading,
    Read(AlignedBuf),
    /// Its object was given up: not read, or its buffer dropped.
    Skipped,
}

/// One record of a live object to read and re-append.
struct Item {
    obj: usize,
    ext: usize,
    /// Bytes read: the header block and data blocks, or the blocks of a packed record.
    bytes: usize,
    /// Where the read starts.
    at: u64,
    state: ItemState,
}

/// One compaction step of one disk, in the background. See the module documentation.
pub(crate) struct CompactTask {
    d: usize,
    /// The window ends at or before this (stop, tail and open writes at the start).
    limit: u64,
    max_window: u64,
    /// Records with a smaller seq were appended before the step began.
    settle_seq: u64,
    step: Step,
    head_lp: u64,
    head_seq: u64,
    /// The window's reads: logical offset and buffer (`None` while in flight).
    chunks: Vec<(u64, Option<AlignedBuf>)>,
    chunks_pending: usize,
    /// Ends of the window's records, in order: logical offset and the next seq.
    ends: Vec<(u64, u64)>,
    /// Where the window ends (the new head): logical offset and seq.
    end: (u64, u64),
    moves: Vec<Move>,
    items: Vec<Item>,
    next_read: usize,
    next_append: usize,
    reads_in_flight: usize,
    held_bytes: usize,
    /// The last record re-appended.
    last_seq: Option<u64>,
    /// The tail ran out of room while moving.
    starved: bool,
    aborted: bool,
    report: CompactReport,
    err: Option<StoreError>,
    /// A step for [`Store::compact_soon`] (its pass goes on with another step).
    urgent: bool,
    /// Disks to try next when this step can do nothing (an idle step).
    fallback: Vec<DiskId>,
}

impl CompactTask {
    pub(crate) fn done(&self) -> bool {
        self.step == Step::Done
    }

    fn finish(&mut self) {
        self.step = Step::Done;
    }
}

impl Store {
    /// A full pass over one disk: every record present when called is either reclaimed
    /// or moved (up to the first record of any write still open). Live objects move
    /// and stay readable throughout; a crash at any point loses nothing acknowledged.
    /// Blocking (tests and tools): steps of the background task, driven to their end.
    pub fn compact(&mut self, disk: DiskId) -> Result<CompactReport, StoreError> {
        self.compact_quiesce();
        let vol = self.vol(disk)?;
        vol.check_online()?;
        let stop = vol.tail_lp;
        let mut total = CompactReport {
            disk: Some(disk),
            ..CompactReport::default()
        };
        loop {
            let step = self.compact_blocking(disk, stop, COMPACT_STEP_BYTES)?;
            total.bytes_scanned += step.bytes_scanned;
            total.objects_moved += step.objects_moved;
            total.bytes_moved += step.bytes_moved;
            total.bytes_reclaimed += step.bytes_reclaimed;
            if step.bytes_scanned == 0 || self.vols[usize::from(disk.0)].head_lp >= stop {
                return Ok(total);
            }
        }
    }

    /// One bounded compaction step on the disk that most needs it (see
    /// [`Store::compact_start`]), blocking until it is over (tests and tools).
    /// `Ok(None)` when no disk qualifies or none can make progress.
    pub fn maybe_compact(&mut self) -> Result<Option<CompactReport>, StoreError> {
        self.compact_quiesce();
        for disk in self.compact_candidates() {
            let (window, stop) = self.idle_window(disk);
            match self.compact_blocking(disk, stop, window) {
                Ok(r) if r.bytes_scanned > 0 => return Ok(Some(r)),
                Ok(_) | Err(StoreError::NoSpace) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Starts one bounded compaction step in the background on the disk that most
    /// needs it: a dead/used ratio above `compact_dead_ratio`, or under 10% free with
    /// a worthwhile amount dead. Meant for the server's idle time; its end is reported
    /// by [`Store::compact_tick`] (if it can do nothing on that disk, the next
    /// qualifying one is tried). Returns whether one started: not while a step or a
    /// checkpoint is under way, nor when no disk qualifies.
    pub fn compact_start(&mut self) -> bool {
        if self.compact_task.is_some() || self.ckpt_task.is_some() {
            return false;
        }
        let mut candidates = self.compact_candidates();
        candidates.reverse();
        while let Some(disk) = candidates.pop() {
            let (window, stop) = self.idle_window(disk);
            if self.compact_begin(disk, stop, window, false) {
                if let Some(t) = self.compact_task.as_mut() {
                    t.fallback = candidates;
                }
                return true;
            }
        }
        false
    }

    /// Whether a compaction step exists (under way, or over and not yet reported by
    /// [`Store::compact_tick`]).
    pub fn compact_busy(&self) -> bool {
        self.compact_task.is_some()
    }

    /// Where the step under way is (tests: which points of a step were reached).
    #[cfg(test)]
    pub(crate) fn compact_phase(&self) -> Option<&'static str> {
        self.compact_task.as_ref().map(|t| match t.step {
            Step::Settle => "settle",
            Step::Window => "window",
            Step::Move => "move",
            Step::Durable => "durable",
            Step::Head => "head",
            Step::HeadWrite => "head write",
            Step::HeadFlush(_) => "head flush",
            Step::Done => "done",
        })
    }

    /// Disks worth an idle step, the most worthwhile first.
    fn compact_candidates(&self) -> Vec<DiskId> {
        let mut candidates: Vec<(f64, DiskId)> = self
            .vols
            .iter()
            .filter(|v| v.state == DiskState::Online)
            .filter_map(|v| {
                let used = v.used();
                let dead = v.bytes_dead();
                if used == 0 {
                    return None;
                }
                let ratio = dead as f64 / used as f64;
                // Free space as new data sees it (after the reserves), against what
                // new data could ever use.
                let low_free = v.bytes_free() < v.capacity() / 10;
                // Demand a real amount of dead space, or a nearly full disk of live
                // data would be churned around its log forever for nothing.
                let by_ratio = ratio > self.cfg.compact_dead_ratio && dead >= v.seg_record;
                let by_space = low_free && dead >= (2 * v.seg_record).max(v.log_len / 100);
                (by_ratio || by_space).then_some((ratio, v.id))
            })
            .collect();
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        candidates.into_iter().map(|(_, d)| d).collect()
    }

    /// The window and stop of an idle step on `disk`: a bounded step, up to its tail.
    fn idle_window(&self, disk: DiskId) -> (u64, u64) {
        let vol = &self.vols[usize::from(disk.0)];
        let window = (vol.log_len / 8)
            .min(COMPACT_STEP_BYTES)
            .max(2 * vol.seg_record);
        (window, vol.tail_lp)
    }

    /// Asks for `disk` to be compacted, up to its current tail, in bounded steps in
    /// the background ([`Store::compact_tick`] starts each): what a STORE that fits
    /// only after compaction waits for, and what a delete or dedup that found the
    /// disk full to the brim asks for.
    pub fn compact_soon(&mut self, disk: DiskId) {
        if self.urgent.is_none() {
            if let Some(v) = self.vols.get(usize::from(disk.0)) {
                self.urgent = Some((disk, v.tail_lp));
            }
        }
    }

    /// Whether a compaction asked for by [`Store::compact_soon`] is under way.
    pub fn compacting(&self) -> bool {
        self.urgent.is_some()
    }

    /// Moves the compaction along without waiting (the loop calls it every turn):
    /// starts the next step of a compaction asked for by [`Store::compact_soon`] when
    /// none is running (and no checkpoint is being written), and returns the outcome
    /// of a step once it is over — once.
    pub fn compact_tick(&mut self) -> Option<Result<CompactReport, StoreError>> {
        self.compact_advance();
        if let Some(r) = self.compact_take() {
            return Some(r);
        }
        if self.compact_task.is_none() && self.ckpt_task.is_none() {
            if let Some((disk, stop)) = self.urgent {
                if !self.compact_begin(disk, stop, COMPACT_STEP_BYTES, true) {
                    // Cannot start (the disk left service): nothing to wait for.
                    self.urgent = None;
                }
                self.compact_advance();
                return self.compact_take();
            }
        }
        None
    }

    /// Takes a finished step and returns its outcome, keeping the pass of
    /// [`Store::compact_soon`] and the fallback disks of an idle step going.
    fn compact_take(&mut self) -> Option<Result<CompactReport, StoreError>> {
        if !self.compact_task.as_ref().is_some_and(CompactTask::done) {
            return None;
        }
        let mut t = self.compact_task.take()?;
        let result = t.err.take().map_or(Ok(t.report), Err);
        if t.urgent {
            let over = match (&result, self.urgent) {
                (Ok(step), Some((disk, stop))) => {
                    step.bytes_scanned == 0 || self.vols[usize::from(disk.0)].head_lp >= stop
                }
                _ => true,
            };
            if over {
                self.urgent = None;
            }
        } else if matches!(&result, Ok(r) if r.bytes_scanned == 0)
            || matches!(result, Err(StoreError::NoSpace))
        {
            // Nothing to do on that disk: the next one, if any.
            let mut rest = std::mem::take(&mut t.fallback);
            rest.reverse();
            while let Some(disk) = rest.pop() {
                let (window, stop) = self.idle_window(disk);
                if self.compact_begin(disk, stop, window, false) {
                    rest.reverse();
                    if let Some(n) = self.compact_task.as_mut() {
                        n.fallback = rest;
                    }
                    return None;
                }
            }
        }
        Some(result)
    }

    /// Drives a step already under way to its end and drops its outcome (the blocking
    /// callers start their own), and waits for a checkpoint being written: a step and
    /// a checkpoint never run together.
    pub(super) fn compact_quiesce(&mut self) {
        if self.ckpt_task.is_some() {
            // Its error, if any, took its disk down: the disk reports say so.
            let _ = self.checkpoint_wait();
        }
        if self.compact_task.is_some() {
            self.compact_drive();
            let _ = self.compact_take();
            // An idle step's fallback may have started another.
            if self.compact_task.is_some() {
                self.compact_drive();
                self.compact_task = None;
            }
        }
    }

    /// One step on `disk`, blocking until it is over.
    fn compact_blocking(
        &mut self,
        disk: DiskId,
        stop: u64,
        max_window: u64,
    ) -> Result<CompactReport, StoreError> {
        self.vol(disk)?.check_online()?;
        if !self.compact_begin(disk, stop, max_window, false) {
            return Err(self.vol(disk)?.unavailable());
        }
        self.compact_drive();
        let mut t = self
            .compact_task
            .take()
            .ok_or_else(|| StoreError::Format("compaction task lost".into()))?;
        t.err.take().map_or(Ok(t.report), Err)
    }

    /// Polls until the step under way is over, blocking.
    pub(super) fn compact_drive(&mut self) {
        let mut events: Vec<StoreEvent> = Vec::new();
        loop {
            self.compact_advance();
            match self.compact_task.as_ref() {
                None => return,
                Some(t) if t.done() => return,
                Some(_) => {}
            }
            self.poll(&mut events);
            self.parked_events.append(&mut events);
            if self.compact_task.as_ref().is_none_or(CompactTask::done) {
                return;
            }
            if !self.busy_devices() {
                // Nothing in flight can move it on: a bug; give up rather than hang.
                if let Some(t) = self.compact_task.as_mut() {
                    t.err
                        .get_or_insert(StoreError::Format("compaction stalled".into()));
                    t.finish();
                }
                return;
            }
            for v in self.vols.iter_mut() {
                v.wait_device();
            }
        }
    }

    fn vol(&self, disk: DiskId) -> Result<&super::Volume, StoreError> {
        self.vols
            .get(usize::from(disk.0))
            .ok_or_else(|| StoreError::Format(format!("no disk {}", disk.0)))
    }

    /// Creates the task of one step on `disk` (a window from the head ending at or
    /// before `stop` and about `max_window` bytes long), unless one exists or the
    /// disk is not Online. A step with nothing to do is over at once.
    fn compact_begin(&mut self, disk: DiskId, stop: u64, max_window: u64, urgent: bool) -> bool {
        let d = usize::from(disk.0);
        if self.compact_task.is_some() || self.ckpt_task.is_some() {
            return false;
        }
        let pin = self
            .writes
            .values()
            .filter(|w| w.disk == disk)
            .filter_map(|w| w.first_lp)
            .min();
        let Some(vol) = self.vols.get(d) else {
            return false;
        };
        if vol.state != DiskState::Online {
            return false;
        }
        let limit = stop.min(vol.tail_lp).min(pin.unwrap_or(u64::MAX));
        let mut t = CompactTask {
            d,
            limit,
            max_window: max_window.clamp(1, COMPACT_STEP_BYTES),
            settle_seq: vol.next_seq,
            step: Step::Settle,
            head_lp: vol.head_lp,
            head_seq: vol.head_seq,
            chunks: Vec::new(),
            chunks_pending: 0,
            ends: Vec::new(),
            end: (vol.head_lp, vol.head_seq),
            moves: Vec::new(),
            items: Vec::new(),
            next_read: 0,
            next_append: 0,
            reads_in_flight: 0,
            held_bytes: 0,
            last_seq: None,
            starved: false,
            aborted: false,
            report: CompactReport {
                disk: Some(disk),
                ..CompactReport::default()
            },
            err: None,
            urgent,
            fallback: Vec::new(),
        };
        if vol.head_lp >= limit {
            t.finish();
        }
        self.compact_task = Some(t);
        self.compact_advance();
        true
    }

    /// A read of the compaction step completed on disk `d`.
    pub(super) fn compact_done(&mut self, d: usize, c: nvme::Completion) {
        let n = (c.tag.0 & !TAG_CLASS) as u32;
        let Some(t) = self.compact_task.as_mut().filter(|t| t.d == d) else {
            return;
        };
        if let Err(e) = c.result {
            if let Some(vol) = self.vols.get_mut(d) {
                let err = vol.fail(e);
                t.err.get_or_insert(err);
            }
        }
        if n & WINDOW_TAG != 0 {
            if let Some(chunk) = t.chunks.get_mut((n & !WINDOW_TAG) as usize) {
                chunk.1 = Some(c.buf);
                t.chunks_pending = t.chunks_pending.saturating_sub(1);
            }
        } else if let Some(item) = t.items.get_mut(n as usize) {
            if matches!(item.state, ItemState::Reading) {
                item.state = ItemState::Read(c.buf);
                t.reads_in_flight = t.reads_in_flight.saturating_sub(1);
            }
        }
    }

    /// Moves the compaction step along as far as it goes without waiting.
    pub(super) fn compact_advance(&mut self) {
        let Some(mut t) = self.compact_task.take() else {
            return;
        };
        self.compact_run(&mut t);
        self.compact_task = Some(t);
    }

    fn compact_run(&mut self, t: &mut CompactTask) {
        loop {
            if t.step == Step::Done {
                return;
            }
            let vol = &mut self.vols[t.d];
            if !t.aborted && (vol.state != DiskState::Online || t.err.is_some()) {
                t.aborted = true;
                if t.err.is_none() {
                    t.err = Some(vol.unavailable());
                }
                debug!(disk = t.d, "compaction step abandoned");
            }
            if t.aborted {
                // Over once nothing of it is in flight; the head stays where it was.
                if t.chunks_pending == 0 && t.reads_in_flight == 0 && !vol.sb_writing {
                    t.finish();
                }
                return;
            }
            match t.step {
                Step::Settle => {
                    if vol.completed_upto() < t.settle_seq {
                        return;
                    }
                    // The window's bytes, in reads that never cross the end of the
                    // disk; with a block more, for the header of a record starting
                    // right at its end.
                    let start = t.head_lp - t.head_lp % BLOCK_U64;
                    let end = (t.limit.min(t.head_lp + t.max_window) + BLOCK_U64)
                        .next_multiple_of(BLOCK_U64)
                        .min(start + vol.log_len);
                    let mut lp = start;
                    while lp < end {
                        let lap_end = lp - lp % vol.log_len + vol.log_len;
                        let n = (end - lp).min(WINDOW_READ_BYTES).min(lap_end - lp);
                        let k = t.chunks.len() as u32;
                        vol.submit_compact_read(
                            WINDOW_TAG | k,
                            vol.phys(lp),
                            AlignedBuf::new(n as usize),
                        );
                        t.chunks.push((lp, None));
                        t.chunks_pending += 1;
                        lp += n;
                    }
                    t.step = Step::Window;
                }
                Step::Window => {
                    if t.chunks_pending > 0 {
                        return;
                    }
                    if let Err(e) = self.compact_choose(t) {
                        t.err = Some(e);
                        t.finish();
                        return;
                    }
                    t.chunks = Vec::new();
                    if t.end.0 == t.head_lp {
                        if t.starved {
                            warn!(
                                disk = t.d,
                                "compaction cannot move the live data at the head: no space"
                            );
                            t.err = Some(StoreError::NoSpace);
                        }
                        t.finish();
                        return;
                    }
                    t.step = Step::Move;
                }
                Step::Move => {
                    if let Err(e) = self.compact_move(t) {
                        t.err = Some(e);
                        continue;
                    }
                    if t.next_append < t.items.len() || t.reads_in_flight > 0 {
                        return;
                    }
                    t.step = Step::Durable;
                }
                Step::Durable => {
                    if let Some(s) = t.last_seq {
                        if !vol.durable_below(s + 1) {
                            return;
                        }
                    }
                    // Every moved record is durable: the index may name them.
                    let disk = vol.id;
                    for m in t.moves.iter_mut().filter(|m| m.moved && !m.dropped) {
                        if let Some(mut e) = self.index.get_mut(&m.fp) {
                            if e.disk == disk && e.extents == m.old {
                                e.write_id = m.write_id;
                                e.extents = std::mem::take(&mut m.extents);
                            }
                        }
                    }
                    self.hdr_cache.forget_disk(disk);
                    if t.end.0 == t.head_lp {
                        if t.starved && t.report.objects_moved == 0 {
                            t.err = Some(StoreError::NoSpace);
                        }
                        t.finish();
                        return;
                    }
                    t.step = Step::Head;
                }
                Step::Head => {
                    if vol.sb_writing {
                        return;
                    }
                    vol.sb.log_head = vol.phys(t.end.0);
                    vol.sb.head_seq = t.end.1;
                    vol.sb.verified_seq = vol.sb.verified_seq.max(vol.durable_seq);
                    vol.submit_sb();
                    t.step = Step::HeadWrite;
                }
                Step::HeadWrite => {
                    if vol.sb_writing {
                        return;
                    }
                    t.step = Step::HeadFlush(vol.flushes_submitted + 1);
                }
                Step::HeadFlush(n) => {
                    if !vol.flushed(n) {
                        return;
                    }
                    // The new head is durable: only now may the window be written over.
                    (vol.head_lp, vol.head_seq) = t.end;
                    let disk = vol.id;
                    self.hdr_cache.forget_disk(disk);
                    let r = &mut t.report;
                    r.bytes_scanned = t.end.0 - t.head_lp;
                    r.bytes_reclaimed = r.bytes_scanned.saturating_sub(r.bytes_moved);
                    self.counters.compactions += 1;
                    self.counters.bytes_reclaimed += r.bytes_reclaimed;
                    debug!(disk = disk.0, report = ?t.report, "compaction step");
                    t.finish();
                }
                Step::Done => return,
            }
        }
    }

    /// Chooses the window from the bytes read: whole records from the head, as long as
    /// moving the live objects they contain (plus one WRAP's waste) fits in the free
    /// space; and lists the records to move.
    fn compact_choose(&mut self, t: &mut CompactTask) -> Result<(), StoreError> {
        let vol = &mut self.vols[t.d];
        let disk = vol.id;
        let mut live: Vec<Candidate> = self
            .index
            .iter()
            .filter(|(_, e)| e.disk == disk)
            .map(|(fp, e)| Candidate {
                first_lp: e
                    .extents
                    .iter()
                    .map(|x| vol.lp_of(x.hdr))
                    .min()
                    .unwrap_or(u64::MAX),
                fp,
                footprint: e.footprint,
                max_record: e
                    .extents
                    .iter()
                    .map(Extent::size)
                    .max()
                    .unwrap_or(BLOCK_U64),
            })
            .filter(|c| c.first_lp < t.limit)
            .collect();
        live.sort_unstable_by_key(|c| (c.first_lp, c.fp));
        // Record sizes of live extents, to step over one whose header rotted (the
        // object is still moved, with its data marked corrupt).
        let known: HashMap<u64, u64> = self
            .index
            .values()
            .filter(|e| e.disk == disk)
            .flat_map(|e| e.extents.into_iter())
            .map(|x| (x.hdr, x.size()))
            .collect();

        let budget = vol.log_len - vol.used();
        let (head_lp, limit) = (t.head_lp, t.limit);
        let (mut pos, mut seq) = (head_lp, t.head_seq);
        let (mut taken, mut cost, mut slack) = (0usize, 0u64, 0u64);
        let chunks = &t.chunks;
        let block_of = |b: u64| {
            chunks.iter().find_map(|(lp, buf)| {
                let buf = buf.as_ref()?;
                let off = b.checked_sub(*lp)? as usize;
                buf.get(off..off + BLOCK)
            })
        };
        while pos < limit && pos - head_lp < t.max_window {
            let phys = vol.phys(pos);
            // A block the window did not read: the step ends before it.
            let Some(found) = vol.record_in(pos, seq, block_of) else {
                break;
            };
            // The next record may start at the next block boundary: past the limit, it
            // is not this window's (an open write's first record, say).
            if found.as_ref().is_some_and(|r| r.lp >= limit) {
                break;
            }
            let end = match (found, known.get(&phys)) {
                (Some(r), _) => r.lp + r.size,
                (None, Some(size)) => pos + size,
                (None, None) => {
                    vol.note_error(format!(
                        "log record {seq} at offset {phys} is damaged (compaction stopped)"
                    ));
                    error!(
                        disk = disk.0,
                        offset = phys,
                        seq,
                        "log record damaged; compaction stopped"
                    );
                    return Err(StoreError::Format(format!(
                        "disk {}: log record {seq} at offset {phys} is damaged",
                        disk.0
                    )));
                }
            };
            let (mut k, mut c, mut s) = (taken, cost, slack);
            while k < live.len() && live[k].first_lp < end {
                c += live[k].footprint;
                s = s.max(live[k].max_record);
                k += 1;
            }
            if c + s > budget {
                t.starved = true;
                break;
            }
            (pos, seq, taken, cost, slack) = (end, seq + 1, k, c, s);
            t.ends.push((pos, seq));
        }
        t.end = (pos, seq);
        for c in &live[..taken] {
            let Some(e) = self.index.get(&c.fp) else {
                continue;
            };
            let obj = t.moves.len();
            for (i, x) in e.extents.iter().enumerate() {
                let (at, bytes) = if x.packed {
                    let off = x.hdr % BLOCK_U64;
                    let end = (off as usize + PACKED_HDR + x.len as usize).next_multiple_of(BLOCK);
                    (x.hdr - off, end)
                } else {
                    (x.hdr, BLOCK * (1 + (x.len as usize).div_ceil(BLOCK)))
                };
                t.items.push(Item {
                    obj,
                    ext: i,
                    bytes,
                    at,
                    state: ItemState::Queued,
                });
            }
            t.moves.push(Move {
                fp: c.fp,
                old: e.extents.clone(),
                old_write_id: e.write_id,
                len: e.len,
                first_lp: c.first_lp,
                write_id: 0,
                extents: Vec::with_capacity(e.extents.len()),
                bad_blocks: 0,
                moved: false,
                dropped: false,
            });
        }
        Ok(())
    }

    /// Submits the reads of live records (a bounded number of bytes ahead) and
    /// re-appends the records read, in order.
    fn compact_move(&mut self, t: &mut CompactTask) -> Result<(), StoreError> {
        loop {
            while let Some(item) = t.items.get_mut(t.next_read) {
                if t.moves[item.obj].dropped {
                    item.state = ItemState::Skipped;
                } else {
                    if t.held_bytes > 0 && t.held_bytes + item.bytes > MOVE_INFLIGHT_BYTES {
                        break;
                    }
                    t.held_bytes += item.bytes;
                    t.reads_in_flight += 1;
                    item.state = ItemState::Reading;
                    self.vols[t.d].submit_compact_read(
                        t.next_read as u32,
                        item.at,
                        AlignedBuf::new(item.bytes),
                    );
                }
                t.next_read += 1;
            }
            let Some(item) = t.items.get_mut(t.next_append) else {
                return Ok(());
            };
            let buf = match std::mem::replace(&mut item.state, ItemState::Skipped) {
                ItemState::Read(buf) => buf,
                ItemState::Skipped => {
                    t.next_append += 1;
                    continue;
                }
                other => {
                    item.state = other;
                    return Ok(());
                }
            };
            let (obj, ext, bytes) = (item.obj, item.ext, item.bytes);
            t.held_bytes = t.held_bytes.saturating_sub(bytes);
            t.next_append += 1;
            self.move_record(t, obj, ext, buf)?;
        }
    }

    /// Re-appends one record of a live object (not flushed), if the object is still
    /// what the step chose: the refcount of a moved COMMIT is the index's now.
    fn move_record(
        &mut self,
        t: &mut CompactTask,
        obj: usize,
        ext: usize,
        buf: AlignedBuf,
    ) -> Result<(), StoreError> {
        let vol = &mut self.vols[t.d];
        let disk = vol.id;
        let m = &mut t.moves[obj];
        if m.dropped {
            return Ok(());
        }
        let refcount = match self.index.get(&m.fp) {
            Some(e) if e.disk == disk && e.extents == m.old => e.refcount,
            _ => {
                // Deleted (or deleted and stored again) since the step chose it.
                m.dropped = true;
                return Ok(());
            }
        };
        let x = m.old[ext];
        let last = ext + 1 == m.old.len();
        let appended = if x.packed {
            // A packed object is one record: copied with its original data CRC (or
            // one that can never match, if its header is lost).
            let off = (x.hdr % BLOCK_U64) as usize;
            let data = &buf[off + PACKED_HDR..off + PACKED_HDR + x.len as usize];
            let actual = crc32c::crc32c(data);
            let old_hdr = PackedHeader::check(&buf[off..], vol.log_nonce())
                .filter(|o| o.fingerprint == m.fp.0 && o.data_len.get() == x.len);
            let mut h = PackedHeader::commit(&m.fp, data, refcount);
            match old_hdr {
                Some(o) => {
                    h.data_crc = o.data_crc;
                    if o.data_crc.get() != actual {
                        m.bad_blocks += 1;
                    }
                }
                None => {
                    h.data_crc = U32::new(!actual);
                    m.bad_blocks += 1;
                }
            }
            vol.append_packed(&mut h, data, Reserve::Compaction)
        } else {
            let mut h = RecordHeader::new(if last {
                kind::SEGMENT | kind::COMMIT
            } else {
                kind::SEGMENT
            });
            let old_hdr = RecordHeader::check(&buf[..BLOCK], vol.log_nonce())
                .filter(|o| o.write_id.get() == m.old_write_id && o.payload_len.get() == x.len);
            let header_ok = match old_hdr {
                Some(o) => {
                    h.block_crcs = o.block_crcs;
                    true
                }
                None => false,
            };
            for (k, block) in buf[BLOCK..].chunks_exact(BLOCK).enumerate() {
                let actual = crc32c::crc32c(block);
                if !header_ok {
                    // The CRCs are lost with the header: record ones that can never
                    // match, so the object reads as corrupt instead of unverified.
                    h.block_crcs[k] = U32::new(!actual);
                    m.bad_blocks += 1;
                } else if h.block_crc(k) != Some(actual) {
                    m.bad_blocks += 1;
                }
            }
            h.write_id = zerocopy::little_endian::U64::new(m.write_id);
            h.payload_len = U32::new(x.len);
            if last {
                h.set_commit(&m.fp, m.len, refcount);
            }
            // The header block is written over by the new header.
            vol.append_async(&mut h, buf, Reserve::Compaction)
                .map_err(|(e, _)| e)
        };
        let a = match appended {
            Ok(a) => a,
            Err(StoreError::NoSpace) => {
                // The tail ran out of room: the window shrinks to end before this
                // object, and nothing more moves.
                t.starved = true;
                let first = m.first_lp;
                for later in t.moves[obj..].iter_mut() {
                    later.dropped = true;
                }
                t.end = t
                    .ends
                    .iter()
                    .rev()
                    .find(|(lp, _)| *lp <= first)
                    .copied()
                    .unwrap_or((t.head_lp, t.head_seq));
                warn!(
                    disk = disk.0,
                    "compaction ran out of room at the tail; step shortened"
                );
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if m.write_id == 0 || x.packed {
            m.write_id = a.seq;
        }
        m.extents.push(Extent {
            hdr: a.phys,
            len: x.len,
            packed: x.packed,
        });
        t.last_seq = Some(a.seq);
        t.report.bytes_moved += a.size;
        if last {
            m.moved = true;
            t.report.objects_moved += 1;
            let bad_blocks = m.bad_blocks;
            if bad_blocks > 0 {
                // Counted on the disk too, not only node-wide: this may be the only
                // time anything looks at the object's data before someone asks for it.
                vol.note_corrupt(
                    &m.fp,
                    bad_blocks,
                    &format!("when compaction moved it ({bad_blocks} bad blocks)"),
                );
                self.counters.corrupt_blocks += bad_blocks;
                error!(
                    fingerprint = %m.fp,
                    disk = disk.0,
                    bad_blocks,
                    "compaction moved an object with corrupt blocks; reads will report it"
                );
            }
        }
        Ok(())
    }
}
