//! Compaction: turning the dead space of a disk's circular log (deleted objects,
//! aborted and deduplicated writes, REF records, WRAP waste) back into free space.
//!
//! Space is only ever reclaimed at the head. A step takes a window of records from
//! the head; every live object with any record inside the window is re-appended at
//! the tail (its segments copied verbatim, block CRCs included, the last one carrying
//! a COMMIT with the object's current *absolute* refcount); then a flush; then the new
//! head goes into the superblock (other copy, generation + 1); only then is the window
//! free. A crash before the superblock update replays the old head: the moved COMMIT
//! comes after every REF of the old copy and sets the refcount outright, so replay
//! order does not matter. A crash after it replays from the new head, where the old
//! copy's COMMIT (if beyond the window) is recognised as partial and skipped.
//!
//! Segments are copied with their original CRCs rather than re-checksummed, so a block
//! that had rotted stays detectable after the move instead of being laundered.
//! The window never passes the first record of an open write: its segments are not in
//! the index yet and must stay where the write's extent list says.

use std::collections::HashMap;

use nvme::AlignedBuf;
use tracing::{debug, error, warn};
use zerocopy::little_endian::U32;

use dosp::Fingerprint;

use super::format::{kind, PackedHeader, RecordHeader, BLOCK, BLOCK_U64, PACKED_HDR};
use super::volume::Reserve;
use super::{CompactReport, DiskId, DiskState, Extent, Store, StoreError};

/// A live object considered for moving: first record position, fingerprint, bytes
/// to move, largest record.
struct Candidate {
    first_lp: u64,
    fp: Fingerprint,
    footprint: u64,
    max_record: u64,
}

/// Log bytes one idle-time compaction step may cover.
pub const COMPACT_STEP_BYTES: u64 = 8 << 20;

impl Store {
    /// A full pass over one disk: every record present when called is either reclaimed
    /// or moved (up to the first record of any write still open). Live objects move
    /// and stay readable throughout; a crash at any point loses nothing acknowledged.
    pub fn compact(&mut self, disk: DiskId) -> Result<CompactReport, StoreError> {
        let vol = self.vol(disk)?;
        vol.check_online()?;
        let stop = vol.tail_lp;
        let mut total = CompactReport {
            disk: Some(disk),
            ..CompactReport::default()
        };
        loop {
            let step = self.compact_step(disk, stop, u64::MAX)?;
            total.bytes_scanned += step.bytes_scanned;
            total.objects_moved += step.objects_moved;
            total.bytes_moved += step.bytes_moved;
            total.bytes_reclaimed += step.bytes_reclaimed;
            if step.bytes_scanned == 0 || self.vols[usize::from(disk.0)].head_lp >= stop {
                return Ok(total);
            }
        }
    }

    /// One bounded compaction step on the disk that most needs it: a dead/used ratio
    /// above `compact_dead_ratio`, or under 10% free with a worthwhile amount dead.
    /// `Ok(None)` when no disk qualifies or none can make progress. Meant for the
    /// server's idle time: each call does a bounded amount of work.
    pub fn maybe_compact(&mut self) -> Result<Option<CompactReport>, StoreError> {
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
        for (_, disk) in candidates {
            let vol = &self.vols[usize::from(disk.0)];
            // A bounded step (a few device round trips of work) so that the loop
            // that calls this between turns is never held for long.
            let window = (vol.log_len / 8)
                .min(COMPACT_STEP_BYTES)
                .max(2 * vol.seg_record);
            let stop = vol.tail_lp;
            match self.compact_step(disk, stop, window) {
                Ok(r) if r.bytes_scanned > 0 => return Ok(Some(r)),
                Ok(_) | Err(StoreError::NoSpace) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Asks for `disk` to be compacted, up to its current tail, in bounded steps by
    /// [`Store::compact_tick`]: what a STORE that fits only after compaction waits
    /// for, instead of a whole pass inside one request.
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

    /// One bounded step (`COMPACT_STEP_BYTES`, 8 MiB of log) of the compaction asked for, if any;
    /// the loop calls it every turn while one is under way.
    pub fn compact_tick(&mut self) -> Option<Result<CompactReport, StoreError>> {
        let (disk, stop) = self.urgent?;
        let r = self.compact_step(disk, stop, COMPACT_STEP_BYTES);
        let done = match &r {
            Ok(step) => step.bytes_scanned == 0 || self.vols[usize::from(disk.0)].head_lp >= stop,
            Err(_) => true,
        };
        if done {
            self.urgent = None;
        }
        Some(r)
    }

    fn vol(&self, disk: DiskId) -> Result<&super::Volume, StoreError> {
        self.vols
            .get(usize::from(disk.0))
            .ok_or_else(|| StoreError::Format(format!("no disk {}", disk.0)))
    }

    /// Compacts one window starting at the head, ending at or before `stop` and at most
    /// `max_window` bytes long (at least one record if any can be afforded).
    fn compact_step(
        &mut self,
        disk: DiskId,
        stop: u64,
        max_window: u64,
    ) -> Result<CompactReport, StoreError> {
        // Compaction reads and rewrites the log with blocking calls: it must see every
        // record's write completed and every pending commit settled.
        self.settle();
        let d = usize::from(disk.0);
        let pin = self
            .writes
            .values()
            .filter(|w| w.disk == disk)
            .filter_map(|w| w.first_lp)
            .min();
        let mut report = CompactReport {
            disk: Some(disk),
            ..CompactReport::default()
        };
        let vol = &mut self.vols[d];
        vol.check_online()?;
        let limit = stop.min(vol.tail_lp).min(pin.unwrap_or(u64::MAX));
        let (head_lp, head_seq) = (vol.head_lp, vol.head_seq);
        if head_lp >= limit {
            return Ok(report);
        }

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
            .collect();
        live.sort_unstable_by_key(|c| (c.first_lp, c.fp));
        // Record sizes of live extents, to step over one whose header rotted (the
        // object is still moved, with its data marked corrupt; see move_object).
        let known: HashMap<u64, u64> = self
            .index
            .values()
            .filter(|e| e.disk == disk)
            .flat_map(|e| e.extents.into_iter())
            .map(|x| (x.hdr, x.size()))
            .collect();

        // Choose the window: whole records from the head, as long as moving the live
        // objects they contain (plus one WRAP's waste) fits in the free space.
        let budget = vol.log_len - vol.used();
        let (mut pos, mut seq) = (head_lp, head_seq);
        let (mut taken, mut cost, mut slack) = (0usize, 0u64, 0u64);
        let mut starved = false;
        let mut walk = vol.walker();
        while pos < limit && pos - head_lp < max_window {
            let phys = vol.phys(pos);
            let found = vol.record_after(pos, seq, &mut walk)?;
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
            let (mut t, mut c, mut s) = (taken, cost, slack);
            while t < live.len() && live[t].first_lp < end {
                c += live[t].footprint;
                s = s.max(live[t].max_record);
                t += 1;
            }
            if c + s > budget {
                starved = true;
                break;
            }
            (pos, seq, taken, cost, slack) = (end, seq + 1, t, c, s);
        }
        if pos == head_lp {
            if starved {
                warn!(
                    disk = disk.0,
                    "compaction cannot move the live data at the head: no space"
                );
                return Err(StoreError::NoSpace);
            }
            return Ok(report);
        }

        // Move.
        let largest = live[..taken]
            .iter()
            .map(|c| c.max_record)
            .max()
            .unwrap_or(BLOCK_U64);
        let mut buf = AlignedBuf::new(largest as usize);
        let mut moved = Vec::with_capacity(taken);
        for c in &live[..taken] {
            let (write_id, extents, bytes) = self.move_object(disk, &c.fp, &mut buf)?;
            report.objects_moved += 1;
            report.bytes_moved += bytes;
            moved.push((c.fp, write_id, extents));
        }
        let vol = &mut self.vols[d];
        vol.flush()?;
        for (fp, write_id, extents) in moved {
            if let Some(mut e) = self.index.get_mut(&fp) {
                e.write_id = write_id;
                e.extents = extents;
            }
        }
        vol.head_lp = pos;
        vol.head_seq = seq;
        let verified = vol.next_seq;
        vol.persist_head(verified)?;
        self.hdr_cache.forget_disk(disk);

        report.bytes_scanned = pos - head_lp;
        report.bytes_reclaimed = report.bytes_scanned.saturating_sub(report.bytes_moved);
        self.counters.compactions += 1;
        self.counters.bytes_reclaimed += report.bytes_reclaimed;
        debug!(disk = disk.0, ?report, "compaction step");
        Ok(report)
    }

    /// Re-appends one object's records at the tail (not flushed). Returns its new
    /// write id, extents and footprint; the index is updated by the caller after the
    /// flush.
    fn move_object(
        &mut self,
        disk: DiskId,
        fp: &Fingerprint,
        buf: &mut AlignedBuf,
    ) -> Result<(u64, Vec<Extent>, u64), StoreError> {
        let e = self.index.get(fp).ok_or(StoreError::NotFound(*fp))?;
        let (len, refcount, old_write_id) = (e.len, e.refcount, e.write_id);
        let old = e.extents.clone();
        let vol = &mut self.vols[usize::from(disk.0)];
        let mut extents = Vec::with_capacity(old.len());
        let (mut write_id, mut bytes, mut bad_blocks) = (0u64, 0u64, 0u64);
        for (i, ext) in old.iter().enumerate() {
            if ext.packed {
                // A packed object is one record: copied with its original data CRC
                // (or one that can never match, if its header is lost).
                let off = (ext.hdr % BLOCK_U64) as usize;
                let end = (off + PACKED_HDR + ext.len as usize).next_multiple_of(BLOCK);
                let mut rec = AlignedBuf::new(end);
                vol.read(ext.hdr - off as u64, &mut rec)?;
                let data = &rec[off + PACKED_HDR..off + PACKED_HDR + ext.len as usize];
                let actual = crc32c::crc32c(data);
                let old_hdr = PackedHeader::check(&rec[off..], vol.log_nonce())
                    .filter(|o| o.fingerprint == fp.0 && o.data_len.get() == ext.len);
                let mut h = PackedHeader::commit(fp, data, refcount);
                match old_hdr {
                    Some(o) => {
                        h.data_crc = o.data_crc;
                        if o.data_crc.get() != actual {
                            bad_blocks += 1;
                        }
                    }
                    None => {
                        h.data_crc = U32::new(!actual);
                        bad_blocks += 1;
                    }
                }
                let a = vol.append_packed_wait(&mut h, data, Reserve::Compaction)?;
                write_id = a.seq;
                extents.push(Extent {
                    hdr: a.phys,
                    len: ext.len,
                    packed: true,
                });
                bytes += a.size;
                continue;
            }
            let last = i + 1 == old.len();
            let blocks = (ext.len as usize).div_ceil(BLOCK);
            let mut h = RecordHeader::new(if last {
                kind::SEGMENT | kind::COMMIT
            } else {
                kind::SEGMENT
            });
            vol.read(ext.hdr, &mut buf[..BLOCK])?;
            let old_hdr = RecordHeader::check(&buf[..BLOCK], vol.log_nonce())
                .filter(|o| o.write_id.get() == old_write_id && o.payload_len.get() == ext.len);
            let header_ok = match old_hdr {
                Some(o) => {
                    h.block_crcs = o.block_crcs;
                    true
                }
                None => false,
            };
            let rec = &mut buf[..BLOCK * (1 + blocks)];
            if blocks > 0 {
                vol.read(ext.hdr + BLOCK_U64, &mut rec[BLOCK..])?;
            }
            for (k, block) in rec[BLOCK..].chunks_exact(BLOCK).enumerate() {
                let actual = crc32c::crc32c(block);
                if !header_ok {
                    // The CRCs are lost with the header: record ones that can never
                    // match, so the object reads as corrupt instead of unverified.
                    h.block_crcs[k] = U32::new(!actual);
                    bad_blocks += 1;
                } else if h.block_crc(k) != Some(actual) {
                    bad_blocks += 1;
                }
            }
            h.write_id = zerocopy::little_endian::U64::new(write_id);
            h.payload_len = U32::new(ext.len);
            if last {
                h.set_commit(fp, len, refcount);
            }
            let a = vol.append(&mut h, rec, Reserve::Compaction)?;
            if write_id == 0 {
                write_id = a.seq;
            }
            extents.push(Extent {
                hdr: a.phys,
                len: ext.len,
                packed: false,
            });
            bytes += a.size;
        }
        if bad_blocks > 0 {
            // Counted on the disk too, not only node-wide: this may be the only time
            // anything looks at the object's data before someone asks for it.
            vol.note_corrupt(
                fp,
                bad_blocks,
                &format!("when compaction moved it ({bad_blocks} bad blocks)"),
            );
            self.counters.corrupt_blocks += bad_blocks;
            error!(
                fingerprint = %fp,
                disk = disk.0,
                bad_blocks,
                "compaction moved an object with corrupt blocks; reads will report it"
            );
        }
        Ok((write_id, extents, bytes))
    }
}
