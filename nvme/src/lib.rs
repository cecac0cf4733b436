//! Block devices for dosd.
//!
//! This crate owns everything below the object store: the [`BlockDevice`] trait that the
//! store is written against, the aligned buffers that every transfer uses, and the
//! backends — files or block devices through io_uring ([`file::FileDevice`]) and an
//! in-memory disk with deterministic fault injection ([`mem::MemDevice`]) for tests,
//! and a wrapper that fails any backend on command ([`faulty::FaultyDevice`]) for tests
//! of whole nodes.
//! The polled user-space NVMe driver over VFIO ([`driver`]) is the backend for real
//! NVMe devices ([`driver::NvmeDevice`]).
//!
//! What it must never do: interpret the bytes it moves. Layout belongs to the store.

pub mod buf;
pub mod driver;
pub mod faulty;
pub mod file;
pub mod mem;
pub mod region;

pub use buf::AlignedBuf;
pub use region::Region;

/// Every transfer is a whole number of blocks of this size, at an offset that is a
/// multiple of it, from a buffer aligned to it. 4 KiB satisfies O_DIRECT on every
/// Linux filesystem and the LBA format of every NVMe namespace we format.
pub const BLOCK_SIZE: usize = 4096;

/// What a device says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Usable size in bytes, a multiple of [`BLOCK_SIZE`].
    pub size_bytes: u64,
    /// Backend name for reports: `file`, `file-buffered`, `file-pread`,
    /// `file-pread-buffered` (see [`file::FileDevice::backend_kind`]), `memory`, `nvme`.
    pub backend: &'static str,
    /// Where the device lives: a path, a PCI address, or `memory`.
    pub location: String,
}

/// Errors from a block device. Every variant is an operating error: the store maps it
/// to a disk fault and a wire status, it never panics on one.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("I/O error at offset {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("transfer at offset {offset} of {len} bytes is not block aligned")]
    Misaligned { offset: u64, len: usize },
    #[error(
        "transfer at offset {offset} of {len} bytes runs past the end of the device ({size} bytes)"
    )]
    OutOfRange { offset: u64, len: usize, size: u64 },
    #[error("short transfer at offset {offset}: {done} of {len} bytes")]
    Short {
        offset: u64,
        done: usize,
        len: usize,
    },
    #[error("injected fault at offset {offset}")]
    Injected { offset: u64 },
    #[error("NVMe error at offset {offset}: {source}")]
    Nvme {
        offset: u64,
        #[source]
        source: driver::NvmeError,
    },
    #[error("cannot open device {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The caller's name for one submitted operation; it comes back in the completion.
/// Devices never interpret it. [`BLOCKING_TAG`] is reserved for [`run_blocking`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IoTag(pub u64);

/// The tag [`run_blocking`] gives its own operation; callers must not use it.
pub const BLOCKING_TAG: IoTag = IoTag(u64::MAX);

/// An operation for [`BlockDevice::submit`]. A read or write lends its buffer to the
/// device until the operation's [`Completion`] hands it back.
#[derive(Debug)]
pub enum IoOp {
    /// Reads `buf.len()` bytes at `offset` into `buf`.
    Read { offset: u64, buf: AlignedBuf },
    /// Writes `buf` at `offset`.
    Write { offset: u64, buf: AlignedBuf },
    /// Makes durable every write whose completion [`BlockDevice::poll`] returned
    /// before this flush was submitted. Writes still in flight are not covered.
    Flush,
}

/// What kind of operation a [`Completion`] finishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
}

/// A finished operation, as [`BlockDevice::poll`] returns it.
#[derive(Debug)]
pub struct Completion {
    pub tag: IoTag,
    pub kind: IoKind,
    /// Where it was aimed (0 for a flush).
    pub offset: u64,
    /// The buffer lent at submission (a read's now holds the data); empty for a flush.
    pub buf: AlignedBuf,
    pub result: Result<(), DevError>,
}

impl IoOp {
    /// What, where, and the buffer (empty for a flush): how a backend takes an
    /// operation apart to carry it out.
    pub fn into_parts(self) -> (IoKind, u64, AlignedBuf) {
        match self {
            IoOp::Read { offset, buf } => (IoKind::Read, offset, buf),
            IoOp::Write { offset, buf } => (IoKind::Write, offset, buf),
            IoOp::Flush => (IoKind::Flush, 0, AlignedBuf::new(0)),
        }
    }

    /// The completion of this operation with `result`, for backends that finish an
    /// operation without handing it to the device (a contract error, a dead device).
    pub fn complete(self, tag: IoTag, result: Result<(), DevError>) -> Completion {
        let (kind, offset, buf) = self.into_parts();
        Completion {
            tag,
            kind,
            offset,
            buf,
            result,
        }
    }
}

/// A block device as the object store sees it: asynchronous, submit and poll.
///
/// The owner of a device (one dataplane loop) submits reads, writes and flushes tagged
/// with its own ids and collects completions with a bounded [`BlockDevice::poll`] each
/// turn, so many operations are in flight at once and nothing on the loop waits for
/// the device. [`BlockDevice::submit`] never fails: an operation the device cannot
/// take (misaligned, out of range, a dead device) completes with its error through
/// `poll` like any other, so the buffer comes back by one road only.
///
/// Ordering: operations in flight together may complete in any order. A write is
/// durable only after a flush *submitted after the write's completion was returned*
/// has completed `Ok`; until then a crash may lose it or tear it at any 512-byte
/// sector boundary. A read submitted after a write's completion sees that write.
pub trait BlockDevice: Send {
    fn info(&self) -> &DeviceInfo;
    /// Queues `op` under `tag`. Alignment rules for reads and writes: `offset` and
    /// `buf.len()` are multiples of [`BLOCK_SIZE`] (an [`AlignedBuf`] always is
    /// aligned). The operation may not start until the next `poll`.
    fn submit(&mut self, tag: IoTag, op: IoOp);
    /// Starts whatever was queued (one `io_uring_enter`, one doorbell) and moves up to
    /// `max` finished operations into `out`. Never waits. Returns how many it moved.
    fn poll(&mut self, max: usize, out: &mut Vec<Completion>) -> usize;
    /// Operations submitted whose completion `poll` has not returned yet.
    fn in_flight(&self) -> usize;
    /// Blocks until an operation has finished or `timeout` has passed. Only for
    /// start-up, shutdown and [`run_blocking`]: never on a serving loop.
    fn wait(&mut self, timeout: std::time::Duration);
    /// The device's own health log (NVMe SMART / Health Information), for backends
    /// that talk to the device itself; `None` for files and memory.
    fn health(&mut self) -> Option<Result<driver::SmartLog, DevError>> {
        None
    }
    /// A descriptor that becomes readable when an operation completes, so that a loop
    /// with nothing else to do may sleep in epoll instead of polling; `None` for a
    /// device that must be polled (NVMe, memory).
    fn notify_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Whether every operation in flight will signal [`BlockDevice::notify_fd`] when it
    /// completes: none waits in the device for a poll to start it, and no finished one
    /// waits to be handed out. Only then may its owner sleep.
    fn quiescent(&self) -> bool {
        false
    }
    /// Empties [`BlockDevice::notify_fd`] after a wake-up.
    fn drain_notify(&mut self) {}

    /// Reads into `buf`, blocking ([`run_blocking`] with a copy): for tools and tests.
    /// The same contract as a submitted read: `buf` aligned, whole blocks, in range.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DevError>
    where
        Self: Sized,
    {
        check_transfer(offset, buf, self.info().size_bytes)?;
        let mut own = AlignedBuf::new(buf.len());
        let mut early = Vec::new();
        let (back, r) = run_blocking(self, IoOp::Read { offset, buf: own }, &mut early);
        own = back;
        r?;
        buf.copy_from_slice(&own);
        Ok(())
    }

    /// Writes `buf`, blocking ([`run_blocking`] with a copy): for tools and tests.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError>
    where
        Self: Sized,
    {
        check_transfer(offset, buf, self.info().size_bytes)?;
        let mut own = AlignedBuf::new(buf.len());
        own.copy_from_slice(buf);
        let mut early = Vec::new();
        run_blocking(self, IoOp::Write { offset, buf: own }, &mut early).1
    }

    /// Flushes, blocking: for tools and tests.
    fn flush(&mut self) -> Result<(), DevError>
    where
        Self: Sized,
    {
        let mut early = Vec::new();
        run_blocking(self, IoOp::Flush, &mut early).1
    }
}

impl<D: BlockDevice + ?Sized> BlockDevice for Box<D> {
    fn info(&self) -> &DeviceInfo {
        (**self).info()
    }
    fn submit(&mut self, tag: IoTag, op: IoOp) {
        (**self).submit(tag, op)
    }
    fn poll(&mut self, max: usize, out: &mut Vec<Completion>) -> usize {
        (**self).poll(max, out)
    }
    fn in_flight(&self) -> usize {
        (**self).in_flight()
    }
    fn wait(&mut self, timeout: std::time::Duration) {
        (**self).wait(timeout)
    }
    fn health(&mut self) -> Option<Result<driver::SmartLog, DevError>> {
        (**self).health()
    }
    fn notify_fd(&self) -> Option<std::os::fd::RawFd> {
        (**self).notify_fd()
    }
    fn quiescent(&self) -> bool {
        (**self).quiescent()
    }
    fn drain_notify(&mut self) {
        (**self).drain_notify()
    }
}

/// Runs one operation to completion, blocking: for start-up, shutdown, tools and
/// tests, never for a serving loop. Completions of other operations that arrive
/// meanwhile are appended to `early` for the caller to handle. Returns the buffer and
/// the result.
pub fn run_blocking(
    dev: &mut (impl BlockDevice + ?Sized),
    op: IoOp,
    early: &mut Vec<Completion>,
) -> (AlignedBuf, Result<(), DevError>) {
    dev.submit(BLOCKING_TAG, op);
    let mut got = Vec::with_capacity(8);
    loop {
        got.clear();
        dev.poll(64, &mut got);
        let mut mine = None;
        for c in got.drain(..) {
            if c.tag == BLOCKING_TAG && mine.is_none() {
                mine = Some(c);
            } else {
                early.push(c);
            }
        }
        if let Some(c) = mine {
            return (c.buf, c.result);
        }
        dev.wait(std::time::Duration::from_millis(10));
    }
}

/// Checks the alignment contract shared by all backends.
pub fn check_transfer(offset: u64, buf: &[u8], size: u64) -> Result<(), DevError> {
    let len = buf.len();
    if !offset.is_multiple_of(BLOCK_SIZE as u64)
        || !len.is_multiple_of(BLOCK_SIZE)
        || !(buf.as_ptr() as usize).is_multiple_of(BLOCK_SIZE)
    {
        return Err(DevError::Misaligned { offset, len });
    }
    if offset.checked_add(len as u64).is_none_or(|end| end > size) {
        return Err(DevError::OutOfRange { offset, len, size });
    }
    Ok(())
}
