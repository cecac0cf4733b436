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

pub use buf::AlignedBuf;

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

/// A block device as the object store sees it.
///
/// Calls complete before they return (the io_uring backend submits and reaps in the
/// call). A write is durable only after a later [`BlockDevice::flush`] returns `Ok`;
/// until then a crash may lose it or tear it at any 512-byte sector boundary.
pub trait BlockDevice: Send {
    fn info(&self) -> &DeviceInfo;
    /// Reads `buf.len()` bytes at `offset`. Both must be multiples of [`BLOCK_SIZE`],
    /// `buf` must be aligned to it (an [`AlignedBuf`] always is).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DevError>;
    /// Writes `buf` at `offset`, same alignment rules as `read_at`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), DevError>;
    /// The device's own health log (NVMe SMART / Health Information), for backends
    /// that talk to the device itself; `None` for files and memory.
    fn health(&mut self) -> Option<Result<driver::SmartLog, DevError>> {
        None
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
