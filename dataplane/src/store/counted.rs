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
use nvme::{BlockDevice, DevError, DeviceInfo};

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

/// A device with its I/O counters.
pub(crate) struct Counted {
    dev: Box<dyn BlockDevice>,
    pub io: DiskIo,
}

impl Counted {
    pub fn new(dev: Box<dyn BlockDevice>) -> Counted {
        Counted {
            dev,
            io: DiskIo::default(),
        }
    }
}

impl BlockDevice for Counted {
    fn info(&self) -> &DeviceInfo {
        self.dev.info()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.dev.read_at(offset, buf)?;
        self.io.read_ops += 1;
        self.io.read_bytes += buf.len() as u64;
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        self.dev.write_at(offset, buf)?;
        self.io.write_ops += 1;
        self.io.write_bytes += buf.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DevError> {
        self.dev.flush()?;
        self.io.flushes += 1;
        Ok(())
    }

    fn health(&mut self) -> Option<Result<nvme::driver::SmartLog, DevError>> {
        self.dev.health()
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
