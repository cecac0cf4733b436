//! The object store's view of an NVMe namespace: a [`BlockDevice`] over one I/O queue
//! pair of the user-space driver.
//!
//! Asynchronous like every [`BlockDevice`]: `submit` queues an operation, `poll`
//! splits queued operations into commands of the queue's buffer size (≤ MDTS), submits
//! as many as the ring and the DMA buffer pool take — one doorbell for the batch —
//! and reaps completions with one CQ doorbell, so a 1 MiB segment write keeps eight
//! commands in flight and many operations overlap. Nothing spins: an operation that
//! does not fit waits in the device's backlog for the next poll. Data is copied
//! between the caller's buffer and the queue's DMA buffers (the store's buffers are
//! not DMA memory); at memory bandwidth this is a small fraction of the device time.
//!
//! When the device is removed or fails, every outstanding and later call fails with
//! the reason, and the queue and the controller reference are dropped at once, so the
//! kernel gets the device back without waiting for the process to exit.

use std::sync::Arc;

use super::ctrl::{Controller, NvmeError};
use super::ident::SmartLog;
use super::io::{IoCmd, IoDone, IoQueue, QueueOptions};
use std::collections::VecDeque;

use crate::{
    check_transfer, AlignedBuf, BlockDevice, Completion, DevError, DeviceInfo, IoKind, IoOp, IoTag,
};

pub struct NvmeDevice {
    info: DeviceInfo,
    queue: Option<IoQueue>,
    done: Vec<IoDone>,
    /// Why the queue was released, for every call after.
    gone: Option<String>,
    /// Operations owned by the device, indexed by the high half of a command's tag.
    ops: Vec<Option<Op>>,
    free_ops: Vec<u32>,
    /// Operations with commands still to submit, oldest first.
    backlog: VecDeque<u32>,
    /// Finished operations not yet handed out by `poll`.
    ready: VecDeque<Completion>,
    /// Operations a poll's completions touched, reused every poll.
    touched: Vec<u32>,
}

/// One submitted operation, split into commands.
struct Op {
    tag: IoTag,
    kind: IoKind,
    offset: u64,
    buf: AlignedBuf,
    /// Bytes covered by commands submitted so far.
    next: usize,
    /// Commands submitted and not completed.
    inflight: usize,
    /// The first failure; no more commands are submitted once set.
    err: Option<DevError>,
}

impl std::fmt::Debug for NvmeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeDevice")
            .field("location", &self.info.location)
            .field("gone", &self.gone)
            .finish()
    }
}

impl NvmeDevice {
    /// A block device on a new I/O queue pair of `ctrl`. Its size is the namespace's,
    /// rounded down to whole 4 KiB blocks.
    pub fn new(ctrl: &Arc<Controller>, opts: QueueOptions) -> Result<Self, NvmeError> {
        let queue = IoQueue::new(ctrl, opts)?;
        tracing::info!(
            pci = %ctrl.pci(),
            serial = %ctrl.info.serial,
            qid = queue.qid(),
            "NVMe I/O queue pair ready"
        );
        let size = ctrl.ns.size_bytes() / crate::BLOCK_SIZE as u64 * crate::BLOCK_SIZE as u64;
        Ok(Self {
            info: DeviceInfo {
                size_bytes: size,
                backend: "nvme",
                location: format!("{} serial {}", ctrl.pci(), ctrl.info.serial),
            },
            done: Vec::with_capacity(usize::from(opts.entries)),
            queue: Some(queue),
            gone: None,
            ops: Vec::new(),
            free_ops: Vec::new(),
            backlog: VecDeque::new(),
            ready: VecDeque::new(),
            touched: Vec::with_capacity(usize::from(opts.entries)),
        })
    }

    /// The controller, while the device is usable.
    pub fn controller(&self) -> Option<&Arc<Controller>> {
        self.queue.as_ref().map(|q| q.controller())
    }

    pub fn smart_log(&self) -> Result<SmartLog, NvmeError> {
        match self.controller() {
            Some(c) => c.smart_log(),
            None => Err(NvmeError::Removed),
        }
    }

    fn err(offset: u64, e: NvmeError) -> DevError {
        DevError::Nvme { offset, source: e }
    }

    /// Drops the queue (and with it this device's hold on the controller) after a
    /// fatal error.
    fn release(&mut self, e: &NvmeError) {
        if e.is_fatal() && self.queue.is_some() {
            tracing::error!(location = %self.info.location, error = %e, "NVMe device lost; releasing it");
            self.gone = Some(e.to_string());
            self.queue = None;
        }
    }

    fn gone_error(&self, offset: u64) -> DevError {
        DevError::Io {
            offset,
            source: std::io::Error::other(format!(
                "NVMe device {} is gone: {}",
                self.info.location,
                self.gone.as_deref().unwrap_or("released")
            )),
        }
    }

    /// A command's tag: the operation's slot and the command's offset in blocks.
    fn cmd_tag(op: u32, at: usize) -> u64 {
        (u64::from(op) << 32) | (at / crate::BLOCK_SIZE) as u64
    }

    /// Completes operation `i` if nothing of it is in flight and nothing more will be
    /// submitted.
    fn settle(&mut self, i: u32) {
        let Some(op) = self.ops[i as usize].as_ref() else {
            return;
        };
        let all_sent = op.err.is_some() || op.next >= op.buf.len().max(1);
        if op.inflight > 0 || !all_sent {
            return;
        }
        if let Some(op) = self.ops[i as usize].take() {
            self.free_ops.push(i);
            self.ready.push_back(Completion {
                tag: op.tag,
                kind: op.kind,
                offset: op.offset,
                buf: op.buf,
                result: op.err.map_or(Ok(()), Err),
            });
        }
    }

    /// Submits commands for the backlog while the ring and the buffer pool have room.
    fn submit_backlog(&mut self) {
        while let Some(&i) = self.backlog.front() {
            let Some(q) = self.queue.as_mut() else { return };
            let Some(op) = self.ops[i as usize].as_mut() else {
                self.backlog.pop_front();
                continue;
            };
            let mut blocked = false;
            if op.kind == IoKind::Flush {
                if op.next == 0 {
                    match q.submit(IoCmd::Flush, None, Self::cmd_tag(i, 0)) {
                        Ok(()) => {
                            op.next = 1;
                            op.inflight += 1;
                        }
                        Err(NvmeError::QueueFull) => blocked = true,
                        Err(e) => {
                            op.err = Some(Self::err(0, e));
                        }
                    }
                }
            } else {
                let piece = q.buffer_bytes();
                let len = op.buf.len();
                while op.next < len && op.err.is_none() {
                    let Some(b) = q.take_buf() else {
                        blocked = true;
                        break;
                    };
                    let n = piece.min(len - op.next);
                    let at = op.offset + op.next as u64;
                    let cmd = if op.kind == IoKind::Write {
                        q.buf(b).write_from(0, &op.buf[op.next..op.next + n]);
                        IoCmd::Write {
                            offset: at,
                            len: n as u32,
                            fua: false,
                        }
                    } else {
                        IoCmd::Read {
                            offset: at,
                            len: n as u32,
                        }
                    };
                    match q.submit(cmd, Some(b), Self::cmd_tag(i, op.next)) {
                        Ok(()) => {
                            op.next += n;
                            op.inflight += 1;
                        }
                        Err(NvmeError::QueueFull) => {
                            q.give_buf(b);
                            blocked = true;
                            break;
                        }
                        Err(e) => {
                            q.give_buf(b);
                            op.err = Some(Self::err(at, e));
                        }
                    }
                }
            }
            if blocked {
                break;
            }
            self.backlog.pop_front();
            self.settle(i);
        }
    }

    /// Reaps finished commands and folds them into their operations.
    fn reap(&mut self) {
        let Some(q) = self.queue.as_mut() else { return };
        self.done.clear();
        q.poll(usize::MAX, &mut self.done);
        let piece = q.buffer_bytes();
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        for d in self.done.drain(..) {
            let i = (d.tag >> 32) as u32;
            let at = (d.tag & 0xffff_ffff) as usize * crate::BLOCK_SIZE;
            let Some(op) = self.ops.get_mut(i as usize).and_then(|o| o.as_mut()) else {
                if let Some(b) = d.buf {
                    q.give_buf(b);
                }
                continue;
            };
            op.inflight = op.inflight.saturating_sub(1);
            match d.result {
                Ok(()) => {
                    if let (IoKind::Read, Some(b)) = (op.kind, d.buf) {
                        let n = piece.min(op.buf.len() - at);
                        q.buf(b).read_into(0, &mut op.buf[at..at + n]);
                    }
                }
                Err(e) => {
                    if op.err.is_none() {
                        op.err = Some(Self::err(op.offset + at as u64, e));
                    }
                }
            }
            if let Some(b) = d.buf {
                q.give_buf(b);
            }
            touched.push(i);
        }
        for &i in &touched {
            self.settle(i);
        }
        self.touched = touched;
        // A removed or failed controller fails every outstanding command through
        // `poll`; its state says why, and the queue is released at once.
        if let Some(e) = self
            .queue
            .as_ref()
            .and_then(|q| q.controller().state().error())
        {
            self.release(&e);
        }
        if self.queue.is_none() {
            self.fail_all();
        }
    }

    /// After the queue is gone: every operation still owned fails with the reason.
    /// Their buffers are the caller's memory, not DMA memory, so they can go back.
    fn fail_all(&mut self) {
        self.backlog.clear();
        for i in 0..self.ops.len() as u32 {
            let gone = match self.ops[i as usize].as_ref() {
                Some(op) => self.gone_error(op.offset),
                None => continue,
            };
            if let Some(op) = self.ops[i as usize].as_mut() {
                op.inflight = 0;
                op.next = op.buf.len().max(1);
                op.err.get_or_insert(gone);
            }
            self.settle(i);
        }
    }
}

impl BlockDevice for NvmeDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, tag: IoTag, op: IoOp) {
        let checked = match &op {
            IoOp::Read { offset, buf } | IoOp::Write { offset, buf } => {
                check_transfer(*offset, buf, self.info.size_bytes)
            }
            IoOp::Flush => Ok(()),
        };
        let checked = checked.and_then(|()| match self.queue {
            Some(_) => Ok(()),
            None => Err(self.gone_error(0)),
        });
        if let Err(e) = checked {
            self.ready.push_back(op.complete(tag, Err(e)));
            return;
        }
        let (kind, offset, buf) = op.into_parts();
        let op = Op {
            tag,
            kind,
            offset,
            buf,
            next: 0,
            inflight: 0,
            err: None,
        };
        let i = match self.free_ops.pop() {
            Some(i) => {
                self.ops[i as usize] = Some(op);
                i
            }
            None => {
                self.ops.push(Some(op));
                (self.ops.len() - 1) as u32
            }
        };
        self.backlog.push_back(i);
    }

    fn poll(&mut self, max: usize, out: &mut Vec<Completion>) -> usize {
        self.reap();
        self.submit_backlog();
        if let Some(q) = self.queue.as_mut() {
            q.ring();
        }
        let n = self.ready.len().min(max);
        out.extend(self.ready.drain(..n));
        n
    }

    fn in_flight(&self) -> usize {
        self.ops.len() - self.free_ops.len() + self.ready.len()
    }

    fn wait(&mut self, _timeout: std::time::Duration) {
        // A polled queue has nothing to sleep on: the caller polls again at once.
        // Command timeouts are enforced by the queue's own liveness checks.
        std::hint::spin_loop();
    }

    fn health(&mut self) -> Option<Result<SmartLog, DevError>> {
        Some(self.smart_log().map_err(|e| Self::err(0, e)))
    }
}
