//! The mesh: bounded single-producer queues between every pair of dataplane loops.
//!
//! Loop `a` sends to loop `b` on its own queue `a → b` (one producer by construction;
//! `crossbeam_channel`'s bounded array queue: lock-free, preallocated, no allocation
//! per message). A loop drains its incoming queues a bounded batch per turn. When a
//! queue is full the message waits in the sender's per-destination backlog (order
//! per destination is kept: nothing overtakes what is queued before it), which the
//! sender retries each turn: no message is ever dropped, and the backlog is bounded
//! in practice by the operations in flight (each has at most a few messages).
//!
//! Waking: a loop about to sleep in epoll announces it (`sleeping`, SeqCst), then
//! checks its queues once more; a sender that finds the flag set after queueing pokes
//! the loop's eventfd, which the loop's port waits on with its other descriptors. Either the sleeper sees the
//! message or the sender sees the flag — never neither — so a message never waits for
//! the sleeper's timeout, and a busy loop is never poked (no syscall per message).

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

use super::shards::Msg;

/// Messages each queue holds before the sender's backlog takes over.
pub const QUEUE_DEPTH: usize = 4096;
/// Messages taken from each incoming queue per turn.
pub const RECV_BURST: usize = 256;

/// How a loop is woken.
#[derive(Debug)]
struct Wake {
    sleeping: AtomicBool,
    /// Non-blocking eventfd: written by senders, drained by the loop.
    fd: OwnedFd,
}

/// One loop's ends of the mesh.
#[derive(Debug)]
pub struct MeshEnd {
    me: u16,
    tx: Vec<Option<Sender<Msg>>>,
    rx: Vec<Option<Receiver<Msg>>>,
    backlog: Vec<VecDeque<Msg>>,
    wakes: Arc<[Wake]>,
    /// Objects each loop's store holds, as each last published it.
    held: Arc<[AtomicU64]>,
}

/// The mesh of `n` loops: one end per loop, index = loop number.
pub fn mesh(n: u16) -> std::io::Result<Vec<MeshEnd>> {
    let n = usize::from(n);
    let flags = rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC;
    let wakes: Arc<[Wake]> = (0..n)
        .map(|_| {
            Ok(Wake {
                sleeping: AtomicBool::new(false),
                fd: rustix::event::eventfd(0, flags)?,
            })
        })
        .collect::<std::io::Result<Vec<Wake>>>()?
        .into();
    let held: Arc<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(0)).collect();
    let mut tx: Vec<Vec<Option<Sender<Msg>>>> = (0..n).map(|_| vec![None; n]).collect();
    let mut rx: Vec<Vec<Option<Receiver<Msg>>>> =
        (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    for (a, row) in tx.iter_mut().enumerate() {
        for (b, slot) in row.iter_mut().enumerate() {
            if a != b {
                let (s, r) = bounded(QUEUE_DEPTH);
                *slot = Some(s);
                rx[b][a] = Some(r);
            }
        }
    }
    Ok(tx
        .into_iter()
        .zip(rx)
        .enumerate()
        .map(|(me, (tx, rx))| MeshEnd {
            me: me as u16,
            tx,
            rx,
            backlog: (0..n).map(|_| VecDeque::new()).collect(),
            wakes: Arc::clone(&wakes),
            held: Arc::clone(&held),
        })
        .collect())
}

impl MeshEnd {
    pub fn me(&self) -> u16 {
        self.me
    }

    pub fn loops(&self) -> u16 {
        self.tx.len() as u16
    }

    /// Publishes how many objects this loop's store holds.
    pub fn publish_held(&self, n: u64) {
        self.held[usize::from(self.me)].store(n, Ordering::Relaxed);
    }

    /// Objects held by every loop, as last published: each object is held by
    /// exactly one loop, so this is the node's count.
    pub fn held_total(&self) -> u64 {
        self.held.iter().map(|h| h.load(Ordering::Relaxed)).sum()
    }

    /// The descriptor that becomes readable when another loop pokes this one: the
    /// loop's port waits on it.
    pub fn wake_fd(&self) -> RawFd {
        self.wakes[usize::from(self.me)].fd.as_raw_fd()
    }

    /// Consumes the pokes (the loop drains its queues next).
    pub fn drain_wake(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(self.wakes[usize::from(self.me)].fd.as_fd(), &mut buf);
    }

    /// Queues `msg` for loop `to` (never for itself).
    pub fn send(&mut self, to: u16, msg: Msg) {
        let to_i = usize::from(to);
        let Some(tx) = self.tx.get(to_i).and_then(Option::as_ref) else {
            tracing::error!(to, "message for no loop dropped");
            return;
        };
        if !self.backlog[to_i].is_empty() {
            self.backlog[to_i].push_back(msg);
            return;
        }
        match tx.try_send(msg) {
            Ok(()) => self.poke(to_i),
            Err(TrySendError::Full(m)) => self.backlog[to_i].push_back(m),
            // The other loop has stopped (shutdown): nothing to deliver to.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    fn poke(&self, to: usize) {
        let w = &self.wakes[to];
        if w.sleeping.load(Ordering::SeqCst) {
            // A full counter (never, at one poke per sleep) would refuse the write,
            // and the loop would still be readable: nothing is lost either way.
            let _ = rustix::io::write(w.fd.as_fd(), &1u64.to_ne_bytes());
        }
    }

    /// Retries the backlogs; true if anything is still waiting.
    pub fn flush(&mut self) -> bool {
        let mut left = false;
        for to in 0..self.tx.len() {
            let Some(tx) = self.tx[to].as_ref() else {
                continue;
            };
            let mut sent = false;
            while let Some(m) = self.backlog[to].pop_front() {
                match tx.try_send(m) {
                    Ok(()) => sent = true,
                    Err(TrySendError::Full(m)) => {
                        self.backlog[to].push_front(m);
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        self.backlog[to].clear();
                        break;
                    }
                }
            }
            if sent {
                self.poke(to);
            }
            left |= !self.backlog[to].is_empty();
        }
        left
    }

    /// Takes up to [`RECV_BURST`] messages from each incoming queue.
    pub fn recv(&mut self, mut each: impl FnMut(u16, Msg)) -> usize {
        let mut n = 0;
        for (from, rx) in self.rx.iter().enumerate() {
            let Some(rx) = rx else { continue };
            for _ in 0..RECV_BURST {
                match rx.try_recv() {
                    Ok(m) => {
                        each(from as u16, m);
                        n += 1;
                    }
                    Err(_) => break,
                }
            }
        }
        n
    }

    fn pending(&self) -> bool {
        self.rx.iter().flatten().any(|r| !r.is_empty())
            || self.backlog.iter().any(|b| !b.is_empty())
    }

    /// Announces that the loop is about to sleep; false (and no announcement) if a
    /// message is already waiting, in which case the loop must not sleep.
    pub fn may_sleep(&self) -> bool {
        let w = &self.wakes[usize::from(self.me)];
        w.sleeping.store(true, Ordering::SeqCst);
        if self.pending() {
            w.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// The loop is awake again.
    pub fn awake(&self) {
        self.wakes[usize::from(self.me)]
            .sleeping
            .store(false, Ordering::SeqCst);
    }
}
