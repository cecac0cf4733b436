//! VFIO: the kernel interface that hands a PCI device to user space behind an IOMMU.
//!
//! The model (Linux `Documentation/driver-api/vfio.rst`): a *container*
//! (`/dev/vfio/vfio`) holds an IOMMU context; a *group* (`/dev/vfio/N`, the devices the
//! IOMMU cannot isolate from each other) is attached to the container; the IOMMU type is
//! then set (TYPE1v2) and a *device* fd is obtained from the group by PCI address. The
//! device fd exposes regions (BARs, config space) at offsets given by
//! `VFIO_DEVICE_GET_REGION_INFO`, and interrupts — of which this driver only uses the
//! device *request* notification, the kernel asking for the device back (hot removal).
//!
//! What this module owns: the ioctls, the BAR mapping and volatile register access.
//! Every `unsafe` block in it is an ioctl with a `#[repr(C)]` argument whose layout
//! matches `<linux/vfio.h>`, an `mmap`/`munmap` of a region the kernel sized, or a
//! volatile access within that mapping; each carries its SAFETY argument.
//!
//! What it must never do: panic on a value read from the device or the kernel, or
//! access a register outside the mapped BAR.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// `VFIO_TYPE` and `VFIO_BASE` from `<linux/vfio.h>`: every VFIO ioctl is
/// `_IO(';', 100 + n)` — no size is encoded, the structs carry `argsz`.
const fn vfio_io(n: u32) -> u32 {
    ((b';' as u32) << 8) | (100 + n)
}
const VFIO_GET_API_VERSION: u32 = vfio_io(0);
const VFIO_CHECK_EXTENSION: u32 = vfio_io(1);
const VFIO_SET_IOMMU: u32 = vfio_io(2);
const VFIO_GROUP_GET_STATUS: u32 = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: u32 = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: u32 = vfio_io(6);
const VFIO_DEVICE_GET_REGION_INFO: u32 = vfio_io(8);
const VFIO_DEVICE_SET_IRQS: u32 = vfio_io(10);
const VFIO_DEVICE_RESET: u32 = vfio_io(11);
const VFIO_IOMMU_MAP_DMA: u32 = vfio_io(13);
const VFIO_IOMMU_UNMAP_DMA: u32 = vfio_io(14);

const VFIO_API_VERSION: i32 = 0;
const VFIO_TYPE1V2_IOMMU: u64 = 3;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;

/// Region and interrupt indexes of a vfio-pci device (`<linux/vfio.h>`).
pub const BAR0_REGION_INDEX: u32 = 0;
pub const CONFIG_REGION_INDEX: u32 = 7;
const REQ_IRQ_INDEX: u32 = 4;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

/// `struct vfio_irq_set` followed by one eventfd (its flexible `data[]`).
#[repr(C)]
struct IrqSetOneFd {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    fd: i32,
}

/// Errors setting up or using VFIO, each naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error("{what}: {source}")]
    Os {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

fn os(what: impl Into<String>) -> impl FnOnce(io::Error) -> VfioError {
    let what = what.into();
    move |source| VfioError::Os { what, source }
}

/// `ioctl(fd, request, arg)` returning the non-negative result or the OS error.
///
/// # Safety
/// `arg` must be what `request` expects: a pointer to a live, correctly laid out and
/// sized argument (or an integer for requests that take one).
unsafe fn ioctl(fd: &File, request: u32, arg: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: forwarded to the caller's contract; the fd is open for the call's duration.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An IOMMU context with the TYPE1v2 model. DMA mappings are made through it.
#[derive(Debug)]
pub struct Container {
    fd: File,
}

impl Container {
    pub fn open() -> Result<Self, VfioError> {
        let fd = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/vfio/vfio")
            .map_err(os(
                "cannot open /dev/vfio/vfio (is the vfio module loaded?)",
            ))?;
        // SAFETY: GET_API_VERSION takes no argument.
        let version =
            unsafe { ioctl(&fd, VFIO_GET_API_VERSION, 0) }.map_err(os("VFIO_GET_API_VERSION"))?;
        if version != VFIO_API_VERSION {
            return Err(VfioError::Unsupported(format!(
                "VFIO API version {version}, this driver speaks {VFIO_API_VERSION}"
            )));
        }
        // SAFETY: CHECK_EXTENSION takes the extension number by value.
        let has = unsafe { ioctl(&fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU as _) }
            .map_err(os("VFIO_CHECK_EXTENSION"))?;
        if has != 1 {
            return Err(VfioError::Unsupported(
                "the kernel's VFIO lacks the TYPE1v2 IOMMU (load vfio_iommu_type1; an IOMMU \
                 must be present and enabled, e.g. intel_iommu=on)"
                    .into(),
            ));
        }
        Ok(Self { fd })
    }

    /// Selects the TYPE1v2 IOMMU; valid once a group is attached.
    fn set_iommu(&self) -> Result<(), VfioError> {
        // SAFETY: SET_IOMMU takes the IOMMU type by value.
        unsafe { ioctl(&self.fd, VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU as _) }
            .map_err(os("VFIO_SET_IOMMU TYPE1v2"))?;
        Ok(())
    }

    /// Maps `size` bytes of this process's memory at `vaddr` to device address `iova`,
    /// readable and writable by the device. The kernel pins the pages.
    ///
    /// # Safety
    /// The memory must stay mapped (and not be reused for anything the device must not
    /// write) until [`Container::unmap_dma`] for the same range returns.
    pub unsafe fn map_dma(&self, vaddr: *mut u8, iova: u64, size: u64) -> Result<(), VfioError> {
        let arg = DmaMap {
            argsz: size_of::<DmaMap>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size,
        };
        // SAFETY: `arg` is a live vfio_iommu_type1_dma_map; the memory contract is the
        // caller's.
        unsafe { ioctl(&self.fd, VFIO_IOMMU_MAP_DMA, &arg as *const DmaMap as _) }.map_err(os(
            format!("VFIO_IOMMU_MAP_DMA of {size} bytes at iova {iova:#x}"),
        ))?;
        Ok(())
    }

    pub fn unmap_dma(&self, iova: u64, size: u64) -> Result<(), VfioError> {
        let arg = DmaUnmap {
            argsz: size_of::<DmaUnmap>() as u32,
            flags: 0,
            iova,
            size,
        };
        // SAFETY: `arg` is a live vfio_iommu_type1_dma_unmap; unmapping only revokes the
        // device's access.
        unsafe { ioctl(&self.fd, VFIO_IOMMU_UNMAP_DMA, &arg as *const DmaUnmap as _) }
            .map_err(os(format!("VFIO_IOMMU_UNMAP_DMA at iova {iova:#x}")))?;
        Ok(())
    }
}

/// The IOMMU group number of a PCI device, from `/sys/bus/pci/devices/ADDR/iommu_group`.
pub fn iommu_group_of(pci: &str) -> Result<u32, VfioError> {
    let link = PathBuf::from(format!("/sys/bus/pci/devices/{pci}/iommu_group"));
    let target = std::fs::read_link(&link).map_err(os(format!(
        "{pci} has no IOMMU group ({}); is an IOMMU enabled?",
        link.display()
    )))?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            VfioError::Unsupported(format!("unreadable IOMMU group link {}", target.display()))
        })
}

/// An opened VFIO group attached to a container with the IOMMU set.
#[derive(Debug)]
pub struct Group {
    fd: File,
    pub id: u32,
}

impl Group {
    /// Opens group `id`, checks that it is viable (every device in it bound to vfio or
    /// no driver), attaches it to `container` and selects the IOMMU.
    pub fn open(id: u32, container: &Container) -> Result<Self, VfioError> {
        let path = format!("/dev/vfio/{id}");
        let fd = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(os(format!(
                "cannot open {path} (is the device bound to vfio-pci?)"
            )))?;
        let mut status = GroupStatus {
            argsz: size_of::<GroupStatus>() as u32,
            ..Default::default()
        };
        // SAFETY: `status` is a live vfio_group_status the kernel fills.
        unsafe {
            ioctl(
                &fd,
                VFIO_GROUP_GET_STATUS,
                &mut status as *mut GroupStatus as _,
            )
        }
        .map_err(os("VFIO_GROUP_GET_STATUS"))?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::Unsupported(format!(
                "IOMMU group {id} is not viable: bind every device in \
                 /sys/kernel/iommu_groups/{id}/devices to vfio-pci"
            )));
        }
        let container_fd: i32 = container.fd.as_raw_fd();
        // SAFETY: SET_CONTAINER takes a pointer to the container's fd (an int).
        unsafe {
            ioctl(
                &fd,
                VFIO_GROUP_SET_CONTAINER,
                &container_fd as *const i32 as _,
            )
        }
        .map_err(os("VFIO_GROUP_SET_CONTAINER"))?;
        container.set_iommu()?;
        Ok(Self { fd, id })
    }

    /// The device fd of PCI device `pci` (e.g. `0000:01:00.0`) in this group.
    pub fn device(&self, pci: &str) -> Result<Device, VfioError> {
        let name = std::ffi::CString::new(pci)
            .map_err(|_| VfioError::Unsupported(format!("bad PCI address {pci:?}")))?;
        // SAFETY: GET_DEVICE_FD takes a NUL-terminated device name, live for the call.
        let raw = unsafe { ioctl(&self.fd, VFIO_GROUP_GET_DEVICE_FD, name.as_ptr() as _) }
            .map_err(os(format!("VFIO_GROUP_GET_DEVICE_FD {pci}")))?;
        // SAFETY: the kernel returned a new fd that nothing else owns.
        let fd = unsafe { File::from_raw_fd(raw) };
        Ok(Device {
            fd,
            pci: pci.to_string(),
        })
    }
}

/// A PCI device opened through VFIO.
#[derive(Debug)]
pub struct Device {
    fd: File,
    pub pci: String,
}

/// Where a region lives in the device fd.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub size: u64,
    pub offset: u64,
    pub mmap: bool,
}

impl Device {
    pub fn region(&self, index: u32) -> Result<Region, VfioError> {
        let mut info = RegionInfo {
            argsz: size_of::<RegionInfo>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: `info` is a live vfio_region_info the kernel fills (argsz bounds it).
        unsafe {
            ioctl(
                &self.fd,
                VFIO_DEVICE_GET_REGION_INFO,
                &mut info as *mut RegionInfo as _,
            )
        }
        .map_err(os(format!("VFIO_DEVICE_GET_REGION_INFO {index}")))?;
        Ok(Region {
            size: info.size,
            offset: info.offset,
            mmap: info.flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
        })
    }

    pub fn config_read_u16(&self, offset: u64) -> Result<u16, VfioError> {
        let cfg = self.region(CONFIG_REGION_INDEX)?;
        let mut b = [0u8; 2];
        self.fd
            .read_exact_at(&mut b, cfg.offset + offset)
            .map_err(os(format!("read PCI config {offset:#x}")))?;
        Ok(u16::from_le_bytes(b))
    }

    pub fn config_write_u16(&self, offset: u64, value: u16) -> Result<(), VfioError> {
        let cfg = self.region(CONFIG_REGION_INDEX)?;
        self.fd
            .write_all_at(&value.to_le_bytes(), cfg.offset + offset)
            .map_err(os(format!("write PCI config {offset:#x}")))?;
        Ok(())
    }

    /// Enables memory decoding and bus mastering (the device may now DMA) and disables
    /// legacy INTx: this driver polls.
    pub fn enable_bus_master(&self) -> Result<(), VfioError> {
        const COMMAND: u64 = 0x04;
        const MEMORY_SPACE: u16 = 1 << 1;
        const BUS_MASTER: u16 = 1 << 2;
        const INTX_DISABLE: u16 = 1 << 10;
        let cmd = self.config_read_u16(COMMAND)?;
        self.config_write_u16(COMMAND, cmd | MEMORY_SPACE | BUS_MASTER | INTX_DISABLE)
    }

    /// A function-level (or bus) reset, where the device supports one.
    pub fn reset(&self) -> Result<(), VfioError> {
        // SAFETY: DEVICE_RESET takes no argument.
        unsafe { ioctl(&self.fd, VFIO_DEVICE_RESET, 0) }.map_err(os("VFIO_DEVICE_RESET"))?;
        Ok(())
    }

    /// Maps BAR0 (the NVMe register file) into this process.
    pub fn map_bar0(&self) -> Result<Bar, VfioError> {
        let r = self.region(BAR0_REGION_INDEX)?;
        if !r.mmap || r.size < 0x1000 + 8 {
            return Err(VfioError::Unsupported(format!(
                "{}: BAR0 of {} bytes cannot be mapped (mmap {})",
                self.pci, r.size, r.mmap
            )));
        }
        let len = usize::try_from(r.size)
            .map_err(|_| VfioError::Unsupported(format!("BAR0 of {} bytes", r.size)))?;
        // SAFETY: a fresh shared mapping of the region the kernel described; nothing else
        // aliases the returned address range.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                r.offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VfioError::Os {
                what: format!("mmap BAR0 of {}", self.pci),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Bar {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Asks the kernel to signal an eventfd when it wants the device back (hot
    /// removal, unbind). Returns the non-blocking eventfd; a readable value means
    /// "release the device now".
    pub fn request_notifier(&self) -> Result<File, VfioError> {
        // SAFETY: eventfd creates a new fd; no pointers involved.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(VfioError::Os {
                what: "eventfd".into(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a new fd nothing else owns.
        let efd = unsafe { File::from_raw_fd(raw) };
        let set = IrqSetOneFd {
            argsz: size_of::<IrqSetOneFd>() as u32,
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index: REQ_IRQ_INDEX,
            start: 0,
            count: 1,
            fd: efd.as_raw_fd(),
        };
        // SAFETY: `set` is a live vfio_irq_set with exactly one eventfd of data.
        unsafe {
            ioctl(
                &self.fd,
                VFIO_DEVICE_SET_IRQS,
                &set as *const IrqSetOneFd as _,
            )
        }
        .map_err(os("VFIO_DEVICE_SET_IRQS (request notifier)"))?;
        Ok(efd)
    }
}

/// Reads an eventfd without blocking: true if it was signalled since the last read.
pub fn eventfd_signalled(mut efd: &File) -> bool {
    use std::io::Read;
    // read(2), not pread: an eventfd cannot seek (pread fails with ESPIPE).
    let mut b = [0u8; 8];
    matches!(efd.read(&mut b), Ok(8))
}

/// A mapped BAR: volatile 32- and 64-bit register access, bounds-checked.
#[derive(Debug)]
pub struct Bar {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain device memory owned by this value; registers are
// accessed only through volatile reads and writes, which the device is built to take
// from any CPU. Which thread writes which doorbell is the queue owner's business.
unsafe impl Send for Bar {}
// SAFETY: as above; `&Bar` only offers volatile register access.
unsafe impl Sync for Bar {}

impl Bar {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn in_range(&self, offset: usize, width: usize) -> bool {
        offset.is_multiple_of(width) && offset.checked_add(width).is_some_and(|e| e <= self.len)
    }

    /// A 32-bit register; all ones (what a removed device reads as) when out of range.
    pub fn read32(&self, offset: usize) -> u32 {
        if !self.in_range(offset, 4) {
            debug_assert!(false, "BAR read at {offset:#x} outside {:#x}", self.len);
            return u32::MAX;
        }
        // SAFETY: in range and 4-byte aligned within the live mapping.
        unsafe { std::ptr::read_volatile(self.ptr.wrapping_add(offset).cast::<u32>()) }
    }

    /// A 64-bit register, read as two 32-bit halves (low first), which every NVMe
    /// controller accepts and some PCIe paths require.
    pub fn read64(&self, offset: usize) -> u64 {
        u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32)
    }

    pub fn write32(&self, offset: usize, value: u32) {
        if !self.in_range(offset, 4) {
            debug_assert!(false, "BAR write at {offset:#x} outside {:#x}", self.len);
            return;
        }
        // SAFETY: in range and 4-byte aligned within the live mapping.
        unsafe { std::ptr::write_volatile(self.ptr.wrapping_add(offset).cast::<u32>(), value) }
    }

    pub fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map_bar0`; no reference into it
        // outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::FromRawFd;

    #[test]
    fn eventfd_reads_once_per_signal() {
        // SAFETY: eventfd creates a new fd; no pointers involved.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: `raw` is a new fd nothing else owns.
        let efd = unsafe { File::from_raw_fd(raw) };
        assert!(!eventfd_signalled(&efd), "fresh eventfd reads as signalled");
        (&efd).write_all(&1u64.to_ne_bytes()).unwrap();
        assert!(eventfd_signalled(&efd));
        assert!(!eventfd_signalled(&efd), "one signal read twice");
    }

    #[test]
    fn ioctl_numbers_match_linux_vfio_h() {
        // _IO(';', 100 + n) from <linux/vfio.h>.
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(size_of::<RegionInfo>(), 32);
        assert_eq!(size_of::<DmaMap>(), 32);
        assert_eq!(size_of::<IrqSetOneFd>(), 24);
    }
}
