//! DMA memory: regions of this process's memory mapped into the device's address space
//! (an IOVA range behind the IOMMU), carved into rings, PRP list pages and data
//! buffers at set-up, so nothing is allocated on the I/O path.
//!
//! Regions come from 2 MiB hugepages where the system has them reserved
//! (`/proc/sys/vm/nr_hugepages`): one IOMMU entry per 2 MiB instead of 512, and memory
//! the kernel never moves. Without hugepages the driver falls back to ordinary pages,
//! with a warning: VFIO pins them and the IOMMU makes the range contiguous for the
//! device, so it is correct, only heavier on the IOTLB.
//!
//! The device reads and writes this memory behind the compiler's back, so it is never
//! exposed as a Rust reference while the device may touch it: access goes through
//! raw-pointer copies and volatile ring accesses, with fences around doorbells.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use super::queue::{CompletionRing, SubmissionRing};
use super::spec::{CompletionEntry, SubmissionEntry};
use super::vfio::{Container, VfioError};

pub const HUGEPAGE: usize = 2 << 20;

/// One mapping, pinned and visible to the device at `iova` until dropped.
#[derive(Debug)]
pub struct DmaRegion {
    /// Owns the memory `ptr` points into; held, never read, and released only after
    /// `Drop` has removed the IOMMU mapping.
    _map: memmap2::MmapMut,
    ptr: *mut u8,
    len: usize,
    iova: u64,
    hugepages: bool,
    container: Arc<Container>,
}

// SAFETY: the region is plain memory owned by this value; all access goes through
// `DmaSlice`, whose users own disjoint slices (handed out once by `DmaArena`).
unsafe impl Send for DmaRegion {}
// SAFETY: as above; `&DmaRegion` exposes no references into the memory.
unsafe impl Sync for DmaRegion {}

impl DmaRegion {
    /// Maps `len` bytes (rounded up to 2 MiB) at device address `iova`.
    pub fn new(container: Arc<Container>, len: usize, iova: u64) -> Result<Arc<Self>, VfioError> {
        let len = len.div_ceil(HUGEPAGE) * HUGEPAGE;
        let (mut map, hugepages) = match memmap2::MmapOptions::new()
            .len(len)
            .huge(Some(21))
            .map_anon()
        {
            Ok(m) => (m, true),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    bytes = len,
                    "no 2 MiB hugepages for NVMe DMA memory (reserve some in \
                     /proc/sys/vm/nr_hugepages); using ordinary pinned pages"
                );
                let m = memmap2::MmapOptions::new()
                    .len(len)
                    .map_anon()
                    .map_err(|source| VfioError::Os {
                        what: format!("mmap {len} bytes of DMA memory"),
                        source,
                    })?;
                (m, false)
            }
        };
        // Touch every page so the mapping is populated before the kernel pins it.
        map.fill(0);
        let ptr = map.as_mut_ptr();
        // SAFETY: the mapping lives in `map`, owned by the returned region, whose Drop
        // unmaps the IOVA range before the memory is released.
        unsafe { container.map_dma(ptr, iova, len as u64)? };
        Ok(Arc::new(Self {
            _map: map,
            ptr,
            len,
            iova,
            hugepages,
            container,
        }))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iova(&self) -> u64 {
        self.iova
    }

    pub fn hugepages(&self) -> bool {
        self.hugepages
    }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        // `_map` is released after this body, once the device can no longer reach it.
        if let Err(e) = self.container.unmap_dma(self.iova, self.len as u64) {
            tracing::warn!(error = %e, "DMA unmap failed");
        }
    }
}

/// A piece of a region: one ring, one PRP list page, one data buffer.
#[derive(Debug)]
pub struct DmaSlice {
    region: Arc<DmaRegion>,
    offset: usize,
    len: usize,
}

impl DmaSlice {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the device sees byte 0 of this slice.
    pub fn iova(&self) -> u64 {
        self.region.iova + self.offset as u64
    }

    fn ptr(&self) -> *mut u8 {
        // In bounds: `offset + len <= region.len` was checked when the slice was carved.
        self.region.ptr.wrapping_add(self.offset)
    }

    /// Copies `src` to the start of the slice (at most the slice's length).
    pub fn write_from(&self, at: usize, src: &[u8]) {
        let n = src.len().min(self.len.saturating_sub(at));
        // SAFETY: `at + n <= len`; the slice is owned by one user and the device does
        // not access it between commands; `src` cannot overlap DMA memory handed out
        // only as slices.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr().wrapping_add(at), n) };
    }

    /// Copies from the slice into `dst` (at most the slice's length).
    pub fn read_into(&self, at: usize, dst: &mut [u8]) {
        let n = dst.len().min(self.len.saturating_sub(at));
        // Completion seen before this call; do not let the copy float above it.
        fence(Ordering::Acquire);
        // SAFETY: as in `write_from`, in the other direction.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr().wrapping_add(at), dst.as_mut_ptr(), n) };
    }

    pub fn zero(&self) {
        // SAFETY: the whole slice, owned by one user.
        unsafe { std::ptr::write_bytes(self.ptr(), 0, self.len) };
    }

    /// Writes little-endian u64 entries (a PRP list) at the start of the slice.
    pub fn write_u64s(&self, values: &[u64]) {
        let n = values.len().min(self.len / 8);
        for (i, v) in values.iter().take(n).enumerate() {
            // SAFETY: `8 * i + 8 <= len`, 8-byte aligned (slices are page aligned).
            unsafe {
                std::ptr::write_volatile(self.ptr().wrapping_add(8 * i).cast::<u64>(), v.to_le())
            };
        }
    }
}

/// A submission ring in DMA memory.
#[derive(Debug)]
pub struct SqRing {
    pub mem: DmaSlice,
    entries: usize,
}

impl SqRing {
    pub fn new(mem: DmaSlice, entries: u16) -> Self {
        let entries = usize::from(entries).min(mem.len / size_of::<SubmissionEntry>());
        Self { mem, entries }
    }
}

impl SubmissionRing for SqRing {
    fn entries(&self) -> usize {
        self.entries
    }
    fn store(&mut self, index: u16, entry: SubmissionEntry) {
        let i = usize::from(index);
        if i >= self.entries {
            return;
        }
        // SAFETY: in bounds of the ring (checked above), 64-byte aligned; the controller
        // only reads slots between its head and the doorbell tail, and this slot is past
        // the last tail written.
        unsafe {
            std::ptr::write_volatile(
                self.mem.ptr().cast::<SubmissionEntry>().wrapping_add(i),
                entry,
            )
        };
    }
}

/// A completion ring in DMA memory.
#[derive(Debug)]
pub struct CqRing {
    pub mem: DmaSlice,
    entries: usize,
}

impl CqRing {
    pub fn new(mem: DmaSlice, entries: u16) -> Self {
        let entries = usize::from(entries).min(mem.len / size_of::<CompletionEntry>());
        Self { mem, entries }
    }
}

impl CompletionRing for CqRing {
    fn entries(&self) -> usize {
        self.entries
    }
    fn load(&self, index: u16) -> CompletionEntry {
        let i = usize::from(index);
        if i >= self.entries {
            return CompletionEntry::default();
        }
        // Dword 3 (command id, status and the phase tag) first, as one 32-bit read,
        // then the rest after a fence. Reading the entry as one struct lets the
        // compiler load field by field in any order, so a command id from the ring's
        // previous pass could pair with the new phase tag when the controller writes
        // the entry between the two loads: an "unknown command" that is not one.
        let base = self
            .mem
            .ptr()
            .wrapping_add(i * size_of::<CompletionEntry>());
        // SAFETY: `i < entries` so the entry's 16 bytes lie in the ring; 4-byte aligned
        // (the ring is page aligned); a plain-data volatile read of memory the
        // controller writes.
        let dw3 = unsafe { std::ptr::read_volatile(base.wrapping_add(12).cast::<u32>()) };
        fence(Ordering::Acquire);
        // SAFETY: as above, dword 2.
        let dw2 = unsafe { std::ptr::read_volatile(base.wrapping_add(8).cast::<u32>()) };
        // SAFETY: as above, dword 1.
        let dw1 = unsafe { std::ptr::read_volatile(base.wrapping_add(4).cast::<u32>()) };
        // SAFETY: as above, dword 0.
        let dw0 = unsafe { std::ptr::read_volatile(base.cast::<u32>()) };
        fence(Ordering::Acquire);
        CompletionEntry {
            dw0: u32::from_le(dw0),
            dw1: u32::from_le(dw1),
            sq_head: u32::from_le(dw2) as u16,
            sq_id: (u32::from_le(dw2) >> 16) as u16,
            command_id: u32::from_le(dw3) as u16,
            status: (u32::from_le(dw3) >> 16) as u16,
        }
    }
}

/// Hands out page-aligned slices of one region, once each, at set-up.
#[derive(Debug)]
pub struct DmaArena {
    region: Arc<DmaRegion>,
    next: usize,
}

impl DmaArena {
    pub fn new(region: Arc<DmaRegion>) -> Self {
        Self { region, next: 0 }
    }

    /// `len` bytes rounded up to whole 4 KiB pages; `None` when the region is used up.
    pub fn take(&mut self, len: usize) -> Option<DmaSlice> {
        let len = len.max(1).div_ceil(4096) * 4096;
        let end = self.next.checked_add(len)?;
        if end > self.region.len {
            return None;
        }
        let s = DmaSlice {
            region: self.region.clone(),
            offset: self.next,
            len,
        };
        self.next = end;
        Some(s)
    }
}
