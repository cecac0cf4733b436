//! The queue-pair state machine: one submission ring and one completion ring, with
//! command-id allocation, independent of where the rings live and of how doorbells are
//! written.
//!
//! The caller owns the ring memory (DMA memory for a real controller, plain `Vec`s in
//! tests) and hands it in through [`SubmissionRing`] and [`CompletionRing`]; this
//! module returns the new tail or head and the caller writes it to the doorbell. That
//! keeps one doorbell write per poll a decision of the caller's loop, and lets the
//! whole state machine run against a software controller on the host.
//!
//! What it owns: the submission tail, the last submission head the controller
//! reported, the completion head and expected phase, and the set of outstanding
//! command ids (a fixed free list sized at creation; nothing allocates after `new`).
//!
//! What it must never do: trust a completion. A completion with an unknown or idle
//! command id, a foreign SQ id or an impossible SQ head is counted and skipped, never a
//! panic, so a broken controller becomes a disk fault upstream.
#![deny(unsafe_code)]

use super::spec::{CommandId, CompletionEntry, Status, StatusField, SubmissionEntry};

/// The smallest queue the specification allows is 2 entries (NVMe Base 2.0, queue
/// model, "Full Queue": a full queue holds size − 1 entries, so a ring of 2 holds 1).
pub const QUEUE_ENTRIES_MIN: u16 = 2;

/// Where submission entries are written. For DMA memory the implementation must use a
/// volatile write; for tests a slice suffices.
pub trait SubmissionRing {
    fn entries(&self) -> usize;
    fn store(&mut self, index: u16, entry: SubmissionEntry);
}

/// Where completion entries are read from. For DMA memory the implementation must use
/// a volatile read (the controller writes behind the compiler's back).
pub trait CompletionRing {
    fn entries(&self) -> usize;
    fn load(&self, index: u16) -> CompletionEntry;
}

impl SubmissionRing for [SubmissionEntry] {
    fn entries(&self) -> usize {
        self.len()
    }
    fn store(&mut self, index: u16, entry: SubmissionEntry) {
        self[usize::from(index)] = entry;
    }
}

impl CompletionRing for [CompletionEntry] {
    fn entries(&self) -> usize {
        self.len()
    }
    fn load(&self, index: u16) -> CompletionEntry {
        self[usize::from(index)]
    }
}

/// Configuration errors: programmer-facing, returned at queue creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueConfigError {
    #[error("queue of {entries} entries is smaller than the minimum of {QUEUE_ENTRIES_MIN}")]
    TooSmall { entries: u16 },
}

/// The submission ring or the command-id pool is full; poll completions and retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("submission queue full")]
pub struct QueueFull;

/// One completed command as the caller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub command_id: CommandId,
    pub status: StatusField,
    /// Command-specific DW0 (e.g. the number of queues granted by Set Features).
    pub dw0: u32,
}

impl Completion {
    pub fn status(&self) -> Status {
        self.status.decode()
    }
}

/// What one poll did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Poll {
    /// Completions written to the front of the caller's buffer, in ring order.
    pub completed: usize,
    /// The new completion-queue head to write to the CQ head doorbell, if any entry was
    /// consumed (including skipped bad ones: they still occupy ring slots).
    pub cq_head: Option<u16>,
    /// Entries that were consumed but did not match an outstanding command, or that
    /// carried an impossible SQ id or SQ head. Any non-zero count means the controller
    /// is not behaving; the caller should treat the disk as failing.
    pub invalid: usize,
}

/// A submission/completion queue pair. Sizes are fixed at creation; the command-id
/// pool holds `sq_entries − 1` ids, the most commands a ring of that size can hold.
#[derive(Debug)]
pub struct QueuePair {
    sq_id: u16,
    sq_entries: u16,
    sq_tail: u16,
    /// The controller's submission head as last reported in a completion.
    sq_head: u16,
    cq_entries: u16,
    cq_head: u16,
    /// The phase tag a new completion carries; starts at 1 and flips each time the
    /// head wraps (NVMe Base 2.0 §4.6: the controller inverts it on each pass).
    phase: bool,
    /// Stack of idle command ids; its capacity never grows.
    free: Vec<u16>,
    /// `outstanding[cid]` is true between submit and completion.
    outstanding: Vec<bool>,
}

impl QueuePair {
    /// A queue pair with submission queue `sq_id` of `sq_entries` slots and a completion
    /// queue of `cq_entries` slots. The only allocations this type ever makes are here.
    pub fn new(sq_id: u16, sq_entries: u16, cq_entries: u16) -> Result<Self, QueueConfigError> {
        for entries in [sq_entries, cq_entries] {
            if entries < QUEUE_ENTRIES_MIN {
                return Err(QueueConfigError::TooSmall { entries });
            }
        }
        let ids = sq_entries - 1;
        // Lowest ids on top of the stack, so a fresh queue hands out 0, 1, 2, ...
        let free: Vec<u16> = (0..ids).rev().collect();
        Ok(Self {
            sq_id,
            sq_entries,
            sq_tail: 0,
            sq_head: 0,
            cq_entries,
            cq_head: 0,
            phase: true,
            free,
            outstanding: vec![false; usize::from(ids)],
        })
    }

    pub fn sq_id(&self) -> u16 {
        self.sq_id
    }

    pub fn sq_tail(&self) -> u16 {
        self.sq_tail
    }

    pub fn cq_head(&self) -> u16 {
        self.cq_head
    }

    /// The phase tag the next new completion will carry.
    pub fn expected_phase(&self) -> bool {
        self.phase
    }

    /// Commands submitted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len() - self.free.len()
    }

    /// The command id the next successful [`QueuePair::submit`] will use, so the
    /// caller can prepare per-id resources (a PRP list page) before submitting.
    pub fn peek_free_id(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// Submission slots free according to the last SQ head the controller reported.
    pub fn sq_free_slots(&self) -> u16 {
        let used = (self.sq_tail + self.sq_entries - self.sq_head) % self.sq_entries;
        self.sq_entries - 1 - used
    }

    /// Write `entry` (with a fresh command id) at the tail and advance it. Returns the
    /// id and the new tail; the caller writes the tail to the SQ doorbell, once for a
    /// batch. Fails without side effects when the ring or the id pool is full.
    pub fn submit<R: SubmissionRing + ?Sized>(
        &mut self,
        ring: &mut R,
        mut entry: SubmissionEntry,
    ) -> Result<(CommandId, u16), QueueFull> {
        debug_assert_eq!(ring.entries(), usize::from(self.sq_entries));
        if self.sq_free_slots() == 0 {
            return Err(QueueFull);
        }
        let cid = self.free.pop().ok_or(QueueFull)?;
        self.outstanding[usize::from(cid)] = true;
        entry.set_command_id(CommandId(cid));
        ring.store(self.sq_tail, entry);
        self.sq_tail = (self.sq_tail + 1) % self.sq_entries;
        Ok((CommandId(cid), self.sq_tail))
    }

    /// Consume at most `min(max, out.len())` new completions, in ring order, into the
    /// front of `out`. Returns how many, the new CQ head for a single doorbell write,
    /// and how many consumed entries were invalid.
    pub fn poll_completions<R: CompletionRing + ?Sized>(
        &mut self,
        ring: &R,
        max: usize,
        out: &mut [Completion],
    ) -> Poll {
        debug_assert_eq!(ring.entries(), usize::from(self.cq_entries));
        let bound = max.min(out.len());
        let mut poll = Poll::default();
        let mut consumed = 0usize;
        // Bad entries also count against the bound, so a babbling controller cannot
        // keep the loop spinning.
        while poll.completed + poll.invalid < bound {
            let cqe = ring.load(self.cq_head);
            if cqe.phase() != self.phase {
                break;
            }
            consumed += 1;
            self.cq_head += 1;
            if self.cq_head == self.cq_entries {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            match self.accept(&cqe) {
                Some(c) => {
                    out[poll.completed] = c;
                    poll.completed += 1;
                }
                None => poll.invalid += 1,
            }
        }
        if consumed > 0 {
            poll.cq_head = Some(self.cq_head);
        }
        poll
    }

    /// Validate one completion and retire its command id.
    fn accept(&mut self, cqe: &CompletionEntry) -> Option<Completion> {
        if cqe.sq_id != self.sq_id || cqe.sq_head >= self.sq_entries {
            return None;
        }
        let cid = cqe.command_id;
        match self.outstanding.get_mut(usize::from(cid)) {
            Some(busy) if *busy => *busy = false,
            _ => return None,
        }
        // Capacity is fixed at creation and each id is pushed only after being popped,
        // so this never reallocates.
        debug_assert!(self.free.len() < self.free.capacity());
        self.free.push(cid);
        self.sq_head = cqe.sq_head;
        Some(Completion {
            command_id: CommandId(cid),
            status: cqe.status_field(),
            dw0: cqe.dw0,
        })
    }
}

#[cfg(test)]
pub(crate) mod model {
    //! A software controller for one queue pair: it fetches entries between its head
    //! and the doorbell tail from the submission ring memory, and posts completions
    //! with the right phase tag to the completion ring memory, in any order the test
    //! chooses, without ever overrunning the host's completion head.

    use super::super::spec::{CompletionEntry, StatusField, SubmissionEntry};

    pub struct Controller {
        pub sq: Vec<SubmissionEntry>,
        pub cq: Vec<CompletionEntry>,
        pub sq_id: u16,
        sq_head: u16,
        sq_doorbell: u16,
        cq_tail: u16,
        cq_doorbell: u16,
        phase: bool,
        /// Fetched and not yet completed.
        pub fetched: Vec<SubmissionEntry>,
    }

    impl Controller {
        pub fn new(sq_id: u16, sq_entries: u16, cq_entries: u16) -> Self {
            Self {
                sq: vec![SubmissionEntry::default(); usize::from(sq_entries)],
                cq: vec![CompletionEntry::default(); usize::from(cq_entries)],
                sq_id,
                sq_head: 0,
                sq_doorbell: 0,
                cq_tail: 0,
                cq_doorbell: 0,
                phase: true,
                fetched: Vec::new(),
            }
        }

        pub fn ring_sq_doorbell(&mut self, tail: u16) {
            self.sq_doorbell = tail;
        }

        pub fn ring_cq_doorbell(&mut self, head: u16) {
            self.cq_doorbell = head;
        }

        /// Fetch every submitted entry.
        pub fn fetch(&mut self) {
            while self.sq_head != self.sq_doorbell {
                self.fetched.push(self.sq[usize::from(self.sq_head)]);
                self.sq_head = (self.sq_head + 1) % self.sq.len() as u16;
            }
        }

        fn cq_full(&self) -> bool {
            (self.cq_tail + 1) % self.cq.len() as u16 == self.cq_doorbell
        }

        /// Post a raw completion; false if the completion ring is full.
        pub fn post(&mut self, mut cqe: CompletionEntry) -> bool {
            if self.cq_full() {
                return false;
            }
            cqe.status = (cqe.status & !1) | u16::from(self.phase);
            self.cq[usize::from(self.cq_tail)] = cqe;
            self.cq_tail += 1;
            if usize::from(self.cq_tail) == self.cq.len() {
                self.cq_tail = 0;
                self.phase = !self.phase;
            }
            true
        }

        /// Complete the `i`th fetched command with `status`; false if the CQ is full.
        pub fn complete(&mut self, i: usize, status: StatusField) -> bool {
            let sqe = self.fetched[i];
            let cqe = CompletionEntry {
                dw0: sqe.cdw10,
                dw1: 0,
                sq_head: self.sq_head,
                sq_id: self.sq_id,
                command_id: sqe.command_id().0,
                status: status.0 << 1,
            };
            if !self.post(cqe) {
                return false;
            }
            self.fetched.remove(i);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::model::Controller;
    use super::*;
    use crate::driver::spec::{nvm, GenericStatus};
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn ok() -> StatusField {
        StatusField::new(0, 0, false)
    }

    fn empty() -> [Completion; 64] {
        [Completion {
            command_id: CommandId(0),
            status: ok(),
            dw0: 0,
        }; 64]
    }

    fn cmd(tag: u32) -> SubmissionEntry {
        let mut e = SubmissionEntry::new(nvm::READ, 1);
        e.cdw10 = tag;
        e
    }

    #[test]
    fn rejects_queues_below_the_minimum() {
        assert_eq!(
            QueuePair::new(1, 1, 4).unwrap_err(),
            QueueConfigError::TooSmall { entries: 1 }
        );
        assert!(QueuePair::new(1, 4, 1).is_err());
        assert!(QueuePair::new(1, 2, 2).is_ok());
    }

    #[test]
    fn phase_tracks_across_many_wraps() {
        let (sqn, cqn) = (4u16, 3u16);
        let mut qp = QueuePair::new(1, sqn, cqn).unwrap();
        let mut dev = Controller::new(1, sqn, cqn);
        let mut out = empty();
        for i in 0..1000u32 {
            let (cid, tail) = qp.submit(&mut dev.sq[..], cmd(i)).unwrap();
            dev.ring_sq_doorbell(tail);
            dev.fetch();
            assert!(dev.complete(0, ok()));
            let p = qp.poll_completions(&dev.cq[..], 8, &mut out);
            assert_eq!((p.completed, p.invalid), (1, 0));
            assert_eq!(out[0].command_id, cid);
            assert_eq!(out[0].dw0, i);
            dev.ring_cq_doorbell(p.cq_head.unwrap());
            // Nothing new: the stale entry from the last pass must not be taken again.
            assert_eq!(
                qp.poll_completions(&dev.cq[..], 8, &mut out),
                Poll::default()
            );
            assert_eq!(qp.expected_phase(), ((i + 1) / u32::from(cqn)) % 2 == 0);
        }
        assert_eq!(qp.outstanding(), 0);
    }

    #[test]
    fn queue_full_then_recovery() {
        let mut qp = QueuePair::new(1, 8, 16).unwrap();
        let mut dev = Controller::new(1, 8, 16);
        let mut tail = 0;
        for i in 0..7 {
            tail = qp.submit(&mut dev.sq[..], cmd(i)).unwrap().1;
        }
        assert_eq!(qp.sq_free_slots(), 0);
        assert_eq!(qp.submit(&mut dev.sq[..], cmd(99)), Err(QueueFull));
        assert_eq!(qp.sq_tail(), tail, "a failed submit changes nothing");
        dev.ring_sq_doorbell(tail);
        dev.fetch();
        assert!(dev.complete(3, ok()));
        let mut out = empty();
        let p = qp.poll_completions(&dev.cq[..], 64, &mut out);
        assert_eq!(p.completed, 1);
        dev.ring_cq_doorbell(p.cq_head.unwrap());
        let (cid, _) = qp.submit(&mut dev.sq[..], cmd(100)).unwrap();
        assert_eq!(
            cid, out[0].command_id,
            "the only free id is the recycled one"
        );
        assert_eq!(qp.submit(&mut dev.sq[..], cmd(101)), Err(QueueFull));
    }

    #[test]
    fn completions_are_bounded_per_poll_and_in_ring_order() {
        let mut qp = QueuePair::new(1, 32, 32).unwrap();
        let mut dev = Controller::new(1, 32, 32);
        let mut tail = 0;
        for i in 0..20 {
            tail = qp.submit(&mut dev.sq[..], cmd(i)).unwrap().1;
        }
        dev.ring_sq_doorbell(tail);
        dev.fetch();
        // Complete in reverse order: the host must report them in ring order.
        for i in (0..20).rev() {
            assert!(dev.complete(i, ok()));
        }
        let mut out = empty();
        let mut seen = Vec::new();
        let mut polls = 0;
        loop {
            let p = qp.poll_completions(&dev.cq[..], 6, &mut out);
            if p.completed == 0 {
                assert_eq!(p.cq_head, None, "no doorbell when nothing was consumed");
                break;
            }
            assert!(p.completed <= 6);
            seen.extend(out[..p.completed].iter().map(|c| c.dw0));
            polls += 1;
        }
        assert_eq!(polls, 4);
        assert_eq!(seen, (0..20).rev().collect::<Vec<_>>());
        // The output buffer also bounds a poll.
        let p = qp.poll_completions(&dev.cq[..], 100, &mut out[..0]);
        assert_eq!(p, Poll::default());
    }

    #[test]
    fn invalid_completions_are_counted_not_trusted() {
        let mut qp = QueuePair::new(1, 4, 8).unwrap();
        let mut dev = Controller::new(1, 4, 8);
        let (cid, tail) = qp.submit(&mut dev.sq[..], cmd(1)).unwrap();
        dev.ring_sq_doorbell(tail);
        let bogus = |command_id, sq_id, sq_head| CompletionEntry {
            command_id,
            sq_id,
            sq_head,
            ..CompletionEntry::default()
        };
        assert!(dev.post(bogus(2, 1, 0))); // id never submitted
        assert!(dev.post(bogus(0xffff, 1, 0))); // id out of range
        assert!(dev.post(bogus(cid.0, 2, 0))); // wrong queue
        assert!(dev.post(bogus(cid.0, 1, 4))); // SQ head past the ring
        dev.fetch();
        assert!(dev.complete(0, StatusField::new(0, 0x80, true)));
        assert!(dev.post(bogus(cid.0, 1, 1))); // duplicate completion
        let mut out = empty();
        let p = qp.poll_completions(&dev.cq[..], 64, &mut out);
        assert_eq!((p.completed, p.invalid, p.cq_head), (1, 5, Some(6)));
        assert_eq!(out[0].command_id, cid);
        assert_eq!(
            out[0].status(),
            Status::Generic(GenericStatus::LbaOutOfRange)
        );
        assert!(out[0].status.dnr());
        assert_eq!(qp.outstanding(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Submit(u8),
        Fetch,
        Complete(usize),
        Poll(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u8..8).prop_map(Op::Submit),
            Just(Op::Fetch),
            any::<usize>().prop_map(Op::Complete),
            (0usize..10).prop_map(Op::Poll),
        ]
    }

    proptest! {
        /// Random interleavings of submit, fetch, complete (in any order) and bounded
        /// polls: no id is ever outstanding twice, every completion names a command
        /// that was outstanding, each command completes exactly once, and the queue
        /// accepts work exactly when the model says it has room.
        #[test]
        fn random_interleavings_match_the_model(
            sqn in 2u16..12,
            cqn in 2u16..12,
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let mut qp = QueuePair::new(3, sqn, cqn).unwrap();
            let mut dev = Controller::new(3, sqn, cqn);
            let mut out = empty();
            let mut outstanding: HashSet<u16> = HashSet::new();
            let mut tag = 0u32;
            let mut by_tag = std::collections::HashMap::new();
            for op in ops {
                match op {
                    Op::Submit(n) => {
                        let mut tail = None;
                        for _ in 0..n {
                            // The host's view of free SQ slots lags the device, so
                            // the only promise is: never more than sqn - 1 outstanding.
                            match qp.submit(&mut dev.sq[..], cmd(tag)) {
                                Ok((cid, t)) => {
                                    prop_assert!(outstanding.insert(cid.0), "id reused");
                                    by_tag.insert(tag, cid);
                                    tag += 1;
                                    tail = Some(t);
                                }
                                Err(QueueFull) => {
                                    prop_assert!(qp.sq_free_slots() == 0
                                        || outstanding.len() == usize::from(sqn - 1));
                                }
                            }
                            prop_assert!(outstanding.len() < usize::from(sqn));
                        }
                        if let Some(t) = tail {
                            dev.ring_sq_doorbell(t);
                        }
                    }
                    Op::Fetch => dev.fetch(),
                    Op::Complete(i) => {
                        if !dev.fetched.is_empty() {
                            let i = i % dev.fetched.len();
                            dev.complete(i, ok());
                        }
                    }
                    Op::Poll(max) => {
                        let p = qp.poll_completions(&dev.cq[..], max, &mut out);
                        prop_assert_eq!(p.invalid, 0);
                        prop_assert!(p.completed <= max);
                        prop_assert_eq!(p.cq_head.is_some(), p.completed > 0);
                        for c in &out[..p.completed] {
                            prop_assert!(outstanding.remove(&c.command_id.0));
                            prop_assert_eq!(by_tag.remove(&c.dw0), Some(c.command_id));
                        }
                        if let Some(h) = p.cq_head {
                            dev.ring_cq_doorbell(h);
                        }
                    }
                }
                prop_assert_eq!(qp.outstanding(), outstanding.len());
            }
            // Drain: everything submitted completes exactly once.
            for _ in 0..64 {
                dev.fetch();
                while !dev.fetched.is_empty() && dev.complete(0, ok()) {}
                let p = qp.poll_completions(&dev.cq[..], 64, &mut out);
                for c in &out[..p.completed] {
                    prop_assert!(outstanding.remove(&c.command_id.0));
                }
                if let Some(h) = p.cq_head {
                    dev.ring_cq_doorbell(h);
                }
            }
            prop_assert!(outstanding.is_empty());
            prop_assert_eq!(qp.outstanding(), 0);
        }
    }
}
