//! The object store's view of an NVMe namespace: a [`BlockDevice`] over one I/O queue
//! pair of the user-space driver.
//!
//! A transfer is split into pieces of the queue's buffer size (≤ MDTS), all submitted
//! before the first poll — one doorbell for the batch — and reaped as they complete,
//! so a 1 MiB segment write keeps eight commands in flight. Data is copied between the
//! caller's buffer and the queue's DMA buffers (the store's buffers are not DMA
//! memory); at memory bandwidth this is a small fraction of the device time.
//!
//! When the device is removed or fails, every outstanding and later call fails with
//! the reason, and the queue and the controller reference are dropped at once, so the
//! kernel gets the device back without waiting for the process to exit.

use std::sync::Arc;

use super::ctrl::{Controller, NvmeError};
use super::ident::SmartLog;
use super::io::{IoCmd, IoDone, IoQueue, QueueOptions};
use crate::{check_transfer, BlockDevice, DevError, DeviceInfo};

pub struct NvmeDevice {
    info: DeviceInfo,
    queue: Option<IoQueue>,
    done: Vec<IoDone>,
    /// Why the queue was released, for every call after.
    gone: Option<String>,
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

    /// Moves `len` bytes between `offset` and the caller's memory in pieces.
    fn transfer(
        &mut self,
        offset: u64,
        len: usize,
        mut read_into: Option<&mut [u8]>,
        write_from: Option<&[u8]>,
    ) -> Result<(), DevError> {
        let Some(q) = self.queue.as_mut() else {
            return Err(self.gone_error(offset));
        };
        let piece = q.buffer_bytes();
        let mut next = 0usize;
        let mut inflight = 0usize;
        let mut first_err: Option<(u64, NvmeError)> = None;
        while (next < len && first_err.is_none()) || inflight > 0 {
            while next < len && first_err.is_none() {
                let Some(b) = q.take_buf() else { break };
                let n = piece.min(len - next);
                let at = offset + next as u64;
                let cmd = if let Some(src) = write_from {
                    q.buf(b).write_from(0, &src[next..next + n]);
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
                match q.submit(cmd, Some(b), next as u64) {
                    Ok(()) => {
                        next += n;
                        inflight += 1;
                    }
                    Err(NvmeError::QueueFull) => {
                        q.give_buf(b);
                        break;
                    }
                    Err(e) => {
                        q.give_buf(b);
                        first_err = Some((at, e));
                    }
                }
            }
            q.ring();
            if inflight == 0 {
                break;
            }
            self.done.clear();
            q.poll(usize::MAX, &mut self.done);
            for d in self.done.drain(..) {
                inflight = inflight.saturating_sub(1);
                let at = d.tag as usize;
                match d.result {
                    Ok(()) => {
                        if let (Some(dst), Some(b)) = (read_into.as_deref_mut(), d.buf) {
                            let n = piece.min(len - at);
                            q.buf(b).read_into(0, &mut dst[at..at + n]);
                        }
                    }
                    Err(e) => {
                        if first_err.is_none() {
                            first_err = Some((offset + at as u64, e));
                        }
                    }
                }
                if let Some(b) = d.buf {
                    q.give_buf(b);
                }
            }
            if inflight == 0 {
                continue;
            }
            if let Some(e) = q.controller().state().error() {
                // `poll` has failed every outstanding command; anything still counted
                // here can never complete.
                first_err.get_or_insert((offset, e));
                break;
            }
            std::hint::spin_loop();
        }
        match first_err {
            None => Ok(()),
            Some((at, e)) => {
                self.release(&e);
                Err(Self::err(at, e))
            }
        }
    }
}

impl BlockDevice for NvmeDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        check_transfer(offset, buf, self.info.size_bytes)?;
        self.transfer(offset, buf.len(), Some(buf), None)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        check_transfer(offset, buf, self.info.size_bytes)?;
        self.transfer(offset, buf.len(), None, Some(buf))
    }

    fn flush(&mut self) -> Result<(), DevError> {
        let Some(q) = self.queue.as_mut() else {
            return Err(self.gone_error(0));
        };
        if let Err(e) = q.run(IoCmd::Flush, None) {
            self.release(&e);
            return Err(Self::err(0, e));
        }
        Ok(())
    }

    fn health(&mut self) -> Option<Result<SmartLog, DevError>> {
        Some(self.smart_log().map_err(|e| Self::err(0, e)))
    }
}
