//! One I/O queue pair, owned by one core: submission of read, write (optionally FUA),
//! flush, write zeroes and deallocate; one SQ doorbell per batch ([`IoQueue::ring`]),
//! one CQ doorbell per poll, bounded completions per poll, command ids and data
//! buffers recycled from fixed pools — nothing allocates after [`IoQueue::new`].
//!
//! Data buffers are DMA memory owned by the queue (`bufs`, fixed size each); callers
//! take one, fill it (writes), submit with its id and get it back with the completion.
//! Each command id has its own PRP list page, so a transfer never waits for a list.
//!
//! What it must never do: let a caller wait forever. Every few hundred polls with
//! commands outstanding it checks that the controller is alive (not removed, not
//! failed, not asked back by the kernel) and that no command has outlived the timeout;
//! either failure fails every outstanding command with the reason and marks the
//! controller, so every other queue stops too.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::ctrl::{Controller, CtrlState, NvmeError};
use super::dma::{CqRing, DmaArena, DmaSlice, SqRing};
use super::prp;
use super::queue::{Completion, QueuePair};
use super::spec::{nvm, CommandId, StatusField, SubmissionEntry};

/// A command on an I/O queue. Offsets and lengths are bytes, multiples of the
/// namespace's logical block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoCmd {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    WriteZeroes {
        offset: u64,
        len: u32,
    },
    /// Dataset Management with the Deallocate attribute, one range.
    Deallocate {
        offset: u64,
        len: u32,
    },
}

impl IoCmd {
    fn name(&self) -> &'static str {
        match self {
            IoCmd::Read { .. } => "read",
            IoCmd::Write { .. } => "write",
            IoCmd::Flush => "flush",
            IoCmd::WriteZeroes { .. } => "write zeroes",
            IoCmd::Deallocate { .. } => "deallocate",
        }
    }

    fn needs_buf(&self) -> bool {
        matches!(self, IoCmd::Read { .. } | IoCmd::Write { .. })
    }
}

/// A data buffer of the queue's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufId(pub u16);

/// A finished command.
#[derive(Debug)]
pub struct IoDone {
    pub tag: u64,
    pub buf: Option<BufId>,
    pub result: Result<(), NvmeError>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    tag: u64,
    buf: Option<BufId>,
    op: &'static str,
    submitted: Instant,
}

/// Polls (with commands outstanding) between liveness and timeout checks: one
/// register read and one non-blocking eventfd read per this many polls.
const CHECK_EVERY: u32 = 256;

/// Shape of a queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueOptions {
    /// Ring entries (capped by CAP.MQES); `entries − 1` commands can be outstanding.
    pub entries: u16,
    /// Data buffers in the pool.
    pub buffers: u16,
    /// Bytes per data buffer (capped by MDTS), a multiple of 4 KiB.
    pub buffer_bytes: usize,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            entries: 64,
            buffers: 32,
            buffer_bytes: 128 * 1024,
        }
    }
}

pub struct IoQueue {
    qid: u16,
    qp: QueuePair,
    sq: SqRing,
    cq: CqRing,
    sq_db: usize,
    cq_db: usize,
    /// Tail written to the ring but not yet to the doorbell.
    unrung: Option<u16>,
    prp_pages: Vec<DmaSlice>,
    prp_scratch: Vec<u64>,
    pending: Vec<Option<Pending>>,
    bufs: Vec<DmaSlice>,
    free_bufs: Vec<u16>,
    buffer_bytes: usize,
    scratch: Vec<Completion>,
    polls_since_check: u32,
    run_scratch: Vec<IoDone>,
    block_shift: u32,
    nsid: u32,
    created: bool,
    /// Last field, so it is dropped last: the rings and buffers above are DMA memory
    /// whose IOMMU mappings must be removed while the controller's VFIO group is
    /// still attached, which dropping the last controller reference ends.
    ctrl: Arc<Controller>,
}

impl std::fmt::Debug for IoQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoQueue").field("qid", &self.qid).finish()
    }
}

impl IoQueue {
    /// Creates an I/O queue pair on `ctrl` with its own DMA memory.
    pub fn new(ctrl: &Arc<Controller>, opts: QueueOptions) -> Result<Self, NvmeError> {
        let entries = opts
            .entries
            .clamp(2, ctrl.max_queue_entries().min(4096) as u16);
        let mdts = match ctrl.mdts_bytes() {
            0 => 1 << 20,
            m => m as usize,
        };
        let buffer_bytes = (opts.buffer_bytes.min(mdts) / 4096).max(1) * 4096;
        let buffers = opts.buffers.max(1);
        let ids = usize::from(entries) - 1;
        let qid = ctrl
            .take_qid()
            .ok_or_else(|| NvmeError::Unsupported("no I/O queue left on this controller".into()))?;
        let bytes = usize::from(entries) * 64
            + usize::from(entries) * 16
            + 8192
            + ids * 4096
            + usize::from(buffers) * buffer_bytes;
        let region = match ctrl.dma_region(bytes) {
            Ok(r) => r,
            Err(e) => {
                ctrl.give_qid(qid);
                return Err(e);
            }
        };
        let mut arena = DmaArena::new(region);
        let mut take = |n| arena.take(n).ok_or(NvmeError::NoDmaMemory("I/O queue"));
        let sq = SqRing::new(take(usize::from(entries) * 64)?, entries);
        let cq = CqRing::new(take(usize::from(entries) * 16)?, entries);
        let mut prp_pages = Vec::with_capacity(ids);
        for _ in 0..ids {
            prp_pages.push(take(4096)?);
        }
        let mut bufs = Vec::with_capacity(usize::from(buffers));
        for _ in 0..buffers {
            bufs.push(take(buffer_bytes)?);
        }
        let qp = QueuePair::new(qid, entries, entries)
            .map_err(|e| NvmeError::Unsupported(e.to_string()))?;
        let mut q = IoQueue {
            ctrl: ctrl.clone(),
            qid,
            qp,
            sq_db: ctrl.sq_doorbell(qid),
            cq_db: ctrl.cq_doorbell(qid),
            sq,
            cq,
            unrung: None,
            prp_pages,
            prp_scratch: vec![0; prp::LIST_ENTRIES_PER_PAGE],
            pending: vec![None; ids],
            bufs,
            free_bufs: (0..buffers).rev().collect(),
            buffer_bytes,
            scratch: vec![
                Completion {
                    command_id: CommandId(0),
                    status: StatusField(0),
                    dw0: 0,
                };
                ids
            ],
            polls_since_check: 0,
            run_scratch: Vec::with_capacity(ids),
            block_shift: ctrl.ns.block_size.trailing_zeros(),
            nsid: ctrl.nsid,
            created: false,
        };
        if q.sq_db + 4 > ctrl.bar.len() || q.cq_db + 4 > ctrl.bar.len() {
            return Err(NvmeError::Unsupported(format!(
                "doorbells of queue {qid} lie outside BAR0"
            )));
        }
        ctrl.create_io_queue(qid, entries, q.sq.mem.iova(), q.cq.mem.iova())?;
        q.created = true;
        Ok(q)
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    pub fn controller(&self) -> &Arc<Controller> {
        &self.ctrl
    }

    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    pub fn buffers(&self) -> usize {
        self.bufs.len()
    }

    /// Commands submitted and not completed.
    pub fn outstanding(&self) -> usize {
        self.qp.outstanding()
    }

    /// Takes a free data buffer.
    pub fn take_buf(&mut self) -> Option<BufId> {
        self.free_bufs.pop().map(BufId)
    }

    /// Returns a buffer to the pool.
    pub fn give_buf(&mut self, id: BufId) {
        if usize::from(id.0) < self.bufs.len() && !self.free_bufs.contains(&id.0) {
            self.free_bufs.push(id.0);
        }
    }

    pub fn buf(&self, id: BufId) -> &DmaSlice {
        &self.bufs[usize::from(id.0)]
    }

    fn lbas(&self, offset: u64, len: u32, op: &'static str) -> Result<(u64, u32), NvmeError> {
        let mask = (1u64 << self.block_shift) - 1;
        if offset & mask != 0 || u64::from(len) & mask != 0 || len == 0 {
            return Err(NvmeError::Unsupported(format!(
                "{op} of {len} bytes at {offset} is not in whole logical blocks"
            )));
        }
        let nlb = len >> self.block_shift;
        if nlb > 0x1_0000 {
            return Err(NvmeError::Unsupported(format!(
                "{op} of {len} bytes exceeds 65536 blocks"
            )));
        }
        Ok((offset >> self.block_shift, nlb))
    }

    /// Places a command in the submission ring; it reaches the controller at the next
    /// [`IoQueue::ring`]. `buf` is required for reads and writes and is held by the
    /// queue until the command completes. `tag` comes back in the [`IoDone`].
    pub fn submit(&mut self, cmd: IoCmd, buf: Option<BufId>, tag: u64) -> Result<(), NvmeError> {
        if let Some(e) = self.ctrl.state().error() {
            return Err(e);
        }
        let op = cmd.name();
        let mut e = SubmissionEntry::new(0, self.nsid);
        let mut dsm_range: Option<(u64, u32)> = None;
        match cmd {
            IoCmd::Flush => e.cdw0 = u32::from(nvm::FLUSH),
            IoCmd::Read { offset, len } | IoCmd::Write { offset, len, .. } => {
                let (slba, nlb) = self.lbas(offset, len, op)?;
                e.cdw0 = u32::from(if matches!(cmd, IoCmd::Read { .. }) {
                    nvm::READ
                } else {
                    nvm::WRITE
                });
                e.cdw10 = slba as u32;
                e.cdw11 = (slba >> 32) as u32;
                e.cdw12 = nlb - 1;
                if let IoCmd::Write { fua: true, .. } = cmd {
                    e.cdw12 |= 1 << 30;
                }
            }
            IoCmd::WriteZeroes { offset, len } => {
                let (slba, nlb) = self.lbas(offset, len, op)?;
                e.cdw0 = u32::from(nvm::WRITE_ZEROES);
                e.cdw10 = slba as u32;
                e.cdw11 = (slba >> 32) as u32;
                e.cdw12 = nlb - 1;
            }
            IoCmd::Deallocate { offset, len } => {
                let (slba, nlb) = self.lbas(offset, len, op)?;
                e.cdw0 = u32::from(nvm::DATASET_MANAGEMENT);
                e.cdw10 = 0; // one range (zero-based)
                e.cdw11 = 1 << 2; // AD: deallocate
                dsm_range = Some((slba, nlb));
            }
        }
        let len = match cmd {
            IoCmd::Read { len, .. } | IoCmd::Write { len, .. } => len as usize,
            _ => 0,
        };
        if cmd.needs_buf() {
            let Some(_) = buf.filter(|b| usize::from(b.0) < self.bufs.len()) else {
                return Err(NvmeError::Unsupported(format!("{op} needs a data buffer")));
            };
            if len > self.buffer_bytes {
                return Err(NvmeError::Unsupported(format!(
                    "{op} of {len} bytes exceeds the {} byte buffer",
                    self.buffer_bytes
                )));
            }
        }
        if self.qp.sq_free_slots() == 0 || self.qp.outstanding() == self.pending.len() {
            return Err(NvmeError::QueueFull);
        }
        // The command id the queue will hand out is not known before `submit`, so the
        // PRP list (or DSM range) goes into the page of the id about to be used: the
        // top of the free list, which `QueuePair::submit` pops next.
        let cid = self.qp.peek_free_id().ok_or(NvmeError::QueueFull)?;
        let page = &self.prp_pages[usize::from(cid)];
        if let Some((slba, nlb)) = dsm_range {
            let mut range = [0u8; 16];
            range[4..8].copy_from_slice(&nlb.to_le_bytes());
            range[8..16].copy_from_slice(&slba.to_le_bytes());
            page.zero();
            page.write_from(0, &range);
            e.prp1 = page.iova();
        } else if let Some(id) = buf.filter(|_| cmd.needs_buf()) {
            let data = &self.bufs[usize::from(id.0)];
            let p = prp::build(
                data.iova(),
                len as u64,
                self.ctrl.mdts_bytes(),
                prp::ListPage {
                    entries: &mut self.prp_scratch,
                    iova: page.iova(),
                },
            )?;
            if p.list_entries > 0 {
                page.write_u64s(&self.prp_scratch[..p.list_entries]);
            }
            e.prp1 = p.prp1;
            e.prp2 = p.prp2;
        }
        let (got, tail) = self
            .qp
            .submit(&mut self.sq, e)
            .map_err(|_| NvmeError::QueueFull)?;
        debug_assert_eq!(got.0, cid);
        self.pending[usize::from(got.0)] = Some(Pending {
            tag,
            buf: buf.filter(|_| cmd.needs_buf()),
            op,
            submitted: Instant::now(),
        });
        self.unrung = Some(tail);
        Ok(())
    }

    /// Writes the SQ doorbell once for everything submitted since the last ring.
    pub fn ring(&mut self) {
        if let Some(tail) = self.unrung.take() {
            fence(Ordering::SeqCst);
            self.ctrl.bar.write32(self.sq_db, u32::from(tail));
        }
    }

    /// Reaps up to `max` completions into `out` (which the caller sized; nothing is
    /// pushed beyond its capacity). Writes the CQ doorbell at most once. Returns how many
    /// commands finished, including ones failed because the controller died.
    pub fn poll(&mut self, max: usize, out: &mut Vec<IoDone>) -> usize {
        let room = out.capacity().saturating_sub(out.len()).min(max);
        if room == 0 {
            return 0;
        }
        let n = room.min(self.scratch.len());
        let p = self.qp.poll_completions(&self.cq, n, &mut self.scratch);
        if let Some(head) = p.cq_head {
            self.ctrl.bar.write32(self.cq_db, u32::from(head));
        }
        if p.invalid > 0 {
            tracing::error!(
                qid = self.qid,
                invalid = p.invalid,
                "controller posted invalid completions"
            );
            self.ctrl.set_state(CtrlState::Fatal);
        }
        for c in &self.scratch[..p.completed] {
            let Some(pend) = self.pending[usize::from(c.command_id.0)].take() else {
                continue;
            };
            let result = if c.status.is_success() {
                Ok(())
            } else {
                Err(NvmeError::Status {
                    op: pend.op,
                    status: c.status(),
                })
            };
            out.push(IoDone {
                tag: pend.tag,
                buf: pend.buf,
                result,
            });
        }
        let mut done = p.completed;
        // Liveness is checked every CHECK_EVERY polls whether or not commands are
        // completing: a device the kernel wants back (hot removal) keeps answering
        // until it is released, so a busy queue must look too, not only a stalled one.
        if self.qp.outstanding() > 0 {
            self.polls_since_check += 1;
            if self.polls_since_check >= CHECK_EVERY {
                self.polls_since_check = 0;
                self.check_stuck();
            }
        }
        if self.ctrl.state() != CtrlState::Live {
            done += self.fail_outstanding(out);
        }
        done
    }

    /// Liveness and timeout check: marks the controller failed if either tripped, and
    /// `poll` then fails everything outstanding.
    fn check_stuck(&mut self) {
        if self.ctrl.check() != CtrlState::Live {
            return;
        }
        let timeout = self.ctrl.timeout;
        let oldest = self.pending.iter().flatten().map(|p| p.submitted).min();
        if oldest.is_some_and(|t| t.elapsed() > timeout) {
            tracing::error!(
                qid = self.qid,
                ms = timeout.as_millis() as u64,
                "NVMe command timed out: controller declared failed"
            );
            self.ctrl.set_state(CtrlState::Fatal);
        }
    }

    /// Completes every outstanding command with the controller's failure. Their
    /// buffers are *not* returned to the pool (the device may still write them); the
    /// queue is dead from here on anyway.
    fn fail_outstanding(&mut self, out: &mut Vec<IoDone>) -> usize {
        let state = self.ctrl.state();
        let mut n = 0;
        for slot in self.pending.iter_mut() {
            if out.len() == out.capacity() {
                break;
            }
            // `error()` is `None` only for a live controller, which fails nothing.
            let Some(err) = state.error() else { break };
            if let Some(p) = slot.take() {
                out.push(IoDone {
                    tag: p.tag,
                    buf: None,
                    result: Err(err),
                });
                n += 1;
            }
        }
        n
    }

    /// Runs one command to completion (set-up, tests, flush).
    pub fn run(&mut self, cmd: IoCmd, buf: Option<BufId>) -> Result<(), NvmeError> {
        const TAG: u64 = u64::MAX;
        self.submit(cmd, buf, TAG)?;
        self.ring();
        let mut out = std::mem::take(&mut self.run_scratch);
        let result = loop {
            out.clear();
            self.poll(usize::MAX, &mut out);
            if let Some(d) = out.iter_mut().find(|d| d.tag == TAG) {
                break std::mem::replace(&mut d.result, Ok(()));
            }
            if let Some(e) = self.ctrl.state().error() {
                break Err(e);
            }
            std::hint::spin_loop();
        };
        out.clear();
        self.run_scratch = out;
        result
    }
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        if self.created && self.ctrl.state() == CtrlState::Live && self.qp.outstanding() == 0 {
            if let Err(e) = self.ctrl.delete_io_queue(self.qid) {
                tracing::warn!(qid = self.qid, error = %e, "deleting an NVMe I/O queue failed");
                return; // the qid is not reused: the controller may still hold it
            }
            self.ctrl.give_qid(self.qid);
        }
    }
}
