//! Per-disk I/O accounting: a [`BlockDevice`] wrapper that counts every read, write
//! and flush that reaches the device, the record of a disk's last error, and what of
//! its data was found failing its checksums.
//!
//! Every device call of a volume goes through its [`Counted`] device (the recovery
//! scan, checkpoint reads, appends, superblock writes alike), so the counters cannot
//! miss a call site. They are plain integers: the store lives on one thread, and the
//! management core only ever sees copies in published [`super::DiskReport`]s.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use dosp::Fingerprint;
use nvme::{
    check_transfer, AlignedBuf, BlockDevice, Completion, DevError, DeviceInfo, IoKind, IoOp, IoTag,
};

/// I/O that completed on one disk since the node opened it. Failed commands are not
/// counted here: they count as the disk's errors (and set its last error) instead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskIo {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub flushes: u64,
}

/// The most recent error of a disk: a device error, data that failed its checksum, or
/// why the disk could not be opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastError {
    pub message: String,
    /// When, in milliseconds since the Unix epoch (wall clock: operators correlate it
    /// with logs and other machines, which a monotonic clock would not allow).
    pub at_unix_ms: u64,
}

impl LastError {
    /// An error that happened now. Errors are rare, so reading the wall clock and
    /// allocating the message here costs nothing on the hot path.
    pub fn now(message: String) -> LastError {
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        LastError {
            message,
            at_unix_ms,
        }
    }
}

/// The objects of one disk found failing their checksums since open (by a read or by
/// compaction moving them), and how many bad blocks were met.
///
/// An operator needs both numbers apart from the disk's error count: errors grow with
/// every failed read of the same object, while "how many objects are damaged" is what
/// decides whether to restore them from a replica. An object stays counted until its
/// last reference is deleted; nothing is remembered across restarts (the next read of
/// a damaged object finds it again).
#[derive(Debug, Default)]
pub(crate) struct Corruption {
    /// Objects still in the index known to be damaged: at most one entry per object
    /// of the disk, so bounded by the index itself.
    objects: HashSet<Fingerprint>,
    /// Bad blocks met, per detection: a block read twice counts twice.
    pub blocks: u64,
}

impl Corruption {
    /// Records `blocks` bad blocks found in object `fp`. Returns whether the object was
    /// not known to be damaged before.
    pub fn note(&mut self, fp: Fingerprint, blocks: u64) -> bool {
        self.blocks = self.blocks.saturating_add(blocks);
        self.objects.insert(fp)
    }

    /// The object is gone (its last reference was deleted): it no longer counts.
    pub fn forget(&mut self, fp: &Fingerprint) {
        self.objects.remove(fp);
    }

    /// Damaged objects still stored.
    pub fn objects(&self) -> u64 {
        self.objects.len() as u64
    }
}

/// A device with its I/O counters, and the blocking calls the store's start-up,
/// checkpoint and compaction paths still use beside the asynchronous ones.
pub(crate) struct Counted {
    dev: Box<dyn BlockDevice>,
    pub io: DiskIo,
    /// Completions of asynchronous operations that arrived while a blocking call
    /// waited for its own; handed out first by the next `poll`.
    stash: Vec<Completion>,
    /// Transfer buffer of the blocking calls, kept between calls.
    scratch: AlignedBuf,
}

impl Counted {
    pub fn new(dev: Box<dyn BlockDevice>) -> Counted {
        Counted {
            dev,
            io: DiskIo::default(),
            stash: Vec::new(),
            scratch: AlignedBuf::new(0),
        }
    }

    pub fn info(&self) -> &DeviceInfo {
        self.dev.info()
    }

    pub fn health(&mut self) -> Option<Result<nvme::driver::SmartLog, DevError>> {
        self.dev.health()
    }

    fn count(&mut self, c: &Completion) {
        if c.result.is_err() {
            return;
        }
        match c.kind {
            IoKind::Read => {
                self.io.read_ops += 1;
                self.io.read_bytes += c.buf.len() as u64;
            }
            IoKind::Write => {
                self.io.write_ops += 1;
                self.io.write_bytes += c.buf.len() as u64;
            }
            IoKind::Flush => self.io.flushes += 1,
        }
    }

    /// Queues an asynchronous operation.
    pub fn submit(&mut self, tag: IoTag, op: IoOp) {
        self.dev.submit(tag, op);
    }

    /// Up to `max` finished asynchronous operations, stashed ones first.
    pub fn poll(&mut self, max: usize, out: &mut Vec<Completion>) -> usize {
        let from = out.len();
        let n = self.stash.len().min(max);
        out.extend(self.stash.drain(..n));
        let m = self.dev.poll(max - n, out);
        for c in &out[from + n..] {
            self.count(c);
        }
        n + m
    }

    /// Operations submitted and not yet handed out by `poll`.
    pub fn in_flight(&self) -> usize {
        self.dev.in_flight() + self.stash.len()
    }

    pub fn notify_fd(&self) -> Option<std::os::fd::RawFd> {
        self.dev.notify_fd()
    }

    /// Nothing in flight, or all of it will signal the notify descriptor.
    pub fn quiescent(&self) -> bool {
        self.stash.is_empty() && (self.dev.in_flight() == 0 || self.dev.quiescent())
    }

    pub fn drain_notify(&mut self) {
        self.dev.drain_notify()
    }

    /// Blocks until the device has finished something (start-up and blocking paths).
    pub fn wait(&mut self) {
        if self.stash.is_empty() {
            self.dev.wait(std::time::Duration::from_millis(10));
        }
    }

    /// Runs `op` to completion, blocking; others that finish meanwhile are stashed.
    fn run(&mut self, op: IoOp) -> (AlignedBuf, Result<(), DevError>) {
        let mut early = Vec::new();
        let (buf, r) = nvme::run_blocking(&mut self.dev, op, &mut early);
        for c in &early {
            self.count(c);
        }
        self.stash.append(&mut early);
        (buf, r)
    }

    fn scratch(&mut self, len: usize) -> AlignedBuf {
        let mut b = std::mem::replace(&mut self.scratch, AlignedBuf::new(0));
        if b.capacity() < len {
            b = AlignedBuf::new(len);
        }
        b.set_len(len);
        b
    }

    /// Reads into `buf`, blocking.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        check_transfer(offset, buf, self.info().size_bytes)?;
        let own = self.scratch(buf.len());
        let (own, r) = self.run(IoOp::Read { offset, buf: own });
        if r.is_ok() {
            buf.copy_from_slice(&own);
            self.io.read_ops += 1;
            self.io.read_bytes += buf.len() as u64;
        }
        self.scratch = own;
        r
    }

    /// Writes `buf`, blocking.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        check_transfer(offset, buf, self.info().size_bytes)?;
        let mut own = self.scratch(buf.len());
        own.copy_from_slice(buf);
        let (own, r) = self.run(IoOp::Write { offset, buf: own });
        if r.is_ok() {
            self.io.write_ops += 1;
            self.io.write_bytes += buf.len() as u64;
        }
        self.scratch = own;
        r
    }

    /// Flushes, blocking. Covers the writes completed before it.
    pub fn flush(&mut self) -> Result<(), DevError> {
        let (_, r) = self.run(IoOp::Flush);
        if r.is_ok() {
            self.io.flushes += 1;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvme::mem::MemDisk;
    use nvme::AlignedBuf;

    #[test]
    fn counts_completed_calls_and_bytes_only() {
        let mut d = Counted::new(Box::new(MemDisk::new(1 << 20, 1).device()));
        let mut buf = AlignedBuf::new(8192);
        d.write_at(0, &buf).unwrap();
        d.read_at(4096, &mut buf[..4096]).unwrap();
        d.read_at(0, &mut buf).unwrap();
        d.flush().unwrap();
        // Past the end: fails, and is not counted.
        assert!(d.read_at(1 << 20, &mut buf).is_err());
        assert_eq!(
            d.io,
            DiskIo {
                read_ops: 2,
                read_bytes: 4096 + 8192,
                write_ops: 1,
                write_bytes: 8192,
                flushes: 1,
            }
        );
    }

    #[test]
    fn corrupt_objects_count_once_however_often_they_fail() {
        let (a, b) = (Fingerprint::of(b"a"), Fingerprint::of(b"b"));
        let mut c = Corruption::default();
        assert!(c.note(a, 1));
        assert!(!c.note(a, 1), "the same object again");
        assert!(c.note(b, 3));
        assert_eq!((c.objects(), c.blocks), (2, 5));
        c.forget(&a);
        c.forget(&a);
        assert_eq!((c.objects(), c.blocks), (1, 5), "blocks stay counted");
    }

    #[test]
    fn last_error_is_stamped_with_the_wall_clock() {
        let e = LastError::now("boom".into());
        assert_eq!(e.message, "boom");
        // After 2020-01-01: a real timestamp, not zero.
        assert!(e.at_unix_ms > 1_577_836_800_000, "{e:?}");
    }
}
