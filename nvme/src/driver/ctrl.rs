//! The controller: bring-up, the admin queue, Identify, features, log pages, I/O queue
//! creation and deletion, liveness and shutdown (NVMe Base 2.0 §3.5 "Controller
//! Initialization" and §3.6 "Shutdown Processing"; registers in §3.1).
//!
//! One `Controller` per device, shared (`Arc`) by the I/O queues of every core that
//! uses the device; the admin queue is behind a mutex and only used at set-up, for
//! health log reads and for queue teardown, never on the I/O path.
//!
//! What it must never do: trust the device. Every wait is bounded, a register that
//! reads all ones means the device is gone, CSTS.CFS means it failed, and both turn
//! into a typed error and a controller state every queue sees.

use std::fs::File;
use std::sync::atomic::{fence, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dma::{CqRing, DmaArena, DmaRegion, DmaSlice, SqRing};
use super::ident::{self, ControllerInfo, NamespaceInfo, SmartLog};
use super::queue::{Completion, QueuePair};
use super::spec::{admin, Status, SubmissionEntry};
use super::vfio::{self, Bar, Container, Group, VfioError};

/// Controller registers (NVMe Base 2.0 §3.1.3, "Controller Registers"), byte offsets
/// in BAR0.
pub mod reg {
    pub const CAP: usize = 0x00;
    pub const VS: usize = 0x08;
    pub const CC: usize = 0x14;
    pub const CSTS: usize = 0x1c;
    pub const AQA: usize = 0x24;
    pub const ASQ: usize = 0x28;
    pub const ACQ: usize = 0x30;
    /// Doorbells start here; queue `y`'s SQ tail is at `0x1000 + 2y·stride`, its CQ head
    /// at `0x1000 + (2y+1)·stride`, stride = `4 << CAP.DSTRD`.
    pub const DOORBELLS: usize = 0x1000;

    pub const CC_EN: u32 = 1 << 0;
    /// I/O SQ entry size 2^6 = 64 and CQ entry size 2^4 = 16 (CC.IOSQES, CC.IOCQES).
    pub const CC_IOSQES_64: u32 = 6 << 16;
    pub const CC_IOCQES_16: u32 = 4 << 20;
    /// CC.SHN (bits 15:14) = 01b: normal shutdown notification.
    pub const CC_SHN_NORMAL: u32 = 0b01 << 14;
    pub const CC_SHN_MASK: u32 = 0b11 << 14;

    pub const CSTS_RDY: u32 = 1 << 0;
    pub const CSTS_CFS: u32 = 1 << 1;
    /// CSTS.SHST (bits 3:2) = 10b: shutdown processing complete.
    pub const CSTS_SHST_MASK: u32 = 0b11 << 2;
    pub const CSTS_SHST_COMPLETE: u32 = 0b10 << 2;
}

/// Errors of the driver, each a sentence an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error(transparent)]
    Vfio(#[from] VfioError),
    #[error("{op} failed: {status}")]
    Status { op: &'static str, status: Status },
    #[error("{op} timed out after {ms} ms")]
    Timeout { op: &'static str, ms: u64 },
    #[error("device removed")]
    Removed,
    #[error("controller fatal status (CSTS.CFS)")]
    Fatal,
    #[error("controller is shut down")]
    ShutDown,
    #[error("{0}")]
    Unsupported(String),
    #[error("out of DMA memory: {0}")]
    NoDmaMemory(&'static str),
    #[error("controller answered with an invalid completion on {0}")]
    Invalid(&'static str),
    #[error("submission queue full")]
    QueueFull,
    #[error(transparent)]
    Prp(#[from] super::prp::PrpError),
}

impl NvmeError {
    /// True when the device can serve nothing more: removed, failed or shut down.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            NvmeError::Removed | NvmeError::Fatal | NvmeError::ShutDown | NvmeError::Timeout { .. }
        )
    }
}

/// Where the controller stands. Every queue reads it before submitting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CtrlState {
    Live = 0,
    Removed = 1,
    Fatal = 2,
    ShutDown = 3,
}

impl CtrlState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => CtrlState::Live,
            1 => CtrlState::Removed,
            2 => CtrlState::Fatal,
            _ => CtrlState::ShutDown,
        }
    }

    pub fn error(self) -> Option<NvmeError> {
        match self {
            CtrlState::Live => None,
            CtrlState::Removed => Some(NvmeError::Removed),
            CtrlState::Fatal => Some(NvmeError::Fatal),
            CtrlState::ShutDown => Some(NvmeError::ShutDown),
        }
    }
}

/// Options for bring-up.
#[derive(Debug, Clone)]
pub struct CtrlOptions {
    /// Namespace to use (1 unless the device is partitioned into several).
    pub nsid: u32,
    /// How long an admin or I/O command may take before the controller is declared
    /// failed. Generous: emulated controllers under TCG are slow.
    pub command_timeout: Duration,
    /// I/O queue pairs to ask for (one per core that will use the device).
    pub io_queues: u16,
}

impl Default for CtrlOptions {
    fn default() -> Self {
        Self {
            nsid: 1,
            command_timeout: Duration::from_secs(10),
            io_queues: 4,
        }
    }
}

const ADMIN_ENTRIES: u16 = 32;
/// Device addresses for DMA start at 4 GiB: above the x86 MSI window, well inside
/// the 39-bit address width of the smallest IOMMU.
const IOVA_BASE: u64 = 1 << 32;

struct AdminQueue {
    qp: QueuePair,
    sq: SqRing,
    cq: CqRing,
    /// One page for Identify and log page data.
    data: DmaSlice,
    scratch: [Completion; 4],
}

/// An NVMe controller driven from user space.
pub struct Controller {
    // Field order is drop order: DMA memory and the register mapping go before the
    // device, group and container they depend on.
    admin: Mutex<AdminQueue>,
    pub(crate) bar: Bar,
    req: Option<File>,
    device: vfio::Device,
    _group: Group,
    pub(crate) container: Arc<Container>,
    state: AtomicU8,
    iova_next: AtomicU64,
    qids: Mutex<Vec<u16>>,
    stride: usize,
    /// Minimum memory page size, bytes (CAP.MPSMIN); this driver requires 4 KiB.
    page: u64,
    max_queue_entries: u32,
    pub info: ControllerInfo,
    pub ns: NamespaceInfo,
    pub nsid: u32,
    pub version: u32,
    pub timeout: Duration,
    hugepages: bool,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("pci", &self.device.pci)
            .field("serial", &self.info.serial)
            .field("state", &self.state())
            .finish()
    }
}

fn wait_for(
    what: &'static str,
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool, NvmeError>,
) -> Result<(), NvmeError> {
    let start = Instant::now();
    loop {
        if done()? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(NvmeError::Timeout {
                op: what,
                ms: timeout.as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Controller {
    /// Opens the device at PCI address `pci` (already bound to vfio-pci) and brings
    /// the controller up: reset, admin queue, enable, Identify, number of queues.
    pub fn open(pci: &str, opts: &CtrlOptions) -> Result<Arc<Self>, NvmeError> {
        let container = Arc::new(Container::open()?);
        let group = Group::open(vfio::iommu_group_of(pci)?, &container)?;
        let device = group.device(pci)?;
        device.enable_bus_master()?;
        let bar = device.map_bar0()?;
        let req = match device.request_notifier() {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(pci, error = %e, "no removal notifier; removal is found by register reads only");
                None
            }
        };

        let cap = bar.read64(reg::CAP);
        if cap == u64::MAX {
            return Err(NvmeError::Removed);
        }
        let mqes = (cap & 0xffff) as u32 + 1;
        let to = Duration::from_millis(((cap >> 24) & 0xff).max(1) * 500);
        let dstrd = ((cap >> 32) & 0xf) as u32;
        let css = (cap >> 37) & 0xff;
        let mpsmin = (cap >> 48) & 0xf;
        if css & 1 == 0 {
            return Err(NvmeError::Unsupported(format!(
                "{pci}: controller does not support the NVM command set (CAP.CSS {css:#x})"
            )));
        }
        if mpsmin != 0 {
            return Err(NvmeError::Unsupported(format!(
                "{pci}: minimum memory page size is {} bytes; this driver uses 4096",
                4096u64 << mpsmin
            )));
        }
        let stride = 4usize << dstrd;
        let version = bar.read32(reg::VS);

        // Disable (resets the controller's queues) and wait for CSTS.RDY = 0.
        let cc = bar.read32(reg::CC);
        if cc & reg::CC_EN != 0 {
            bar.write32(reg::CC, cc & !reg::CC_EN);
        }
        wait_for("controller disable", to, || ready_is(&bar, false))?;

        // The admin queue and the controller's first DMA region.
        let region = DmaRegion::new(container.clone(), 3 * 4096, IOVA_BASE)?;
        let hugepages = region.hugepages();
        let iova_next = IOVA_BASE + region.len() as u64;
        let mut arena = DmaArena::new(region);
        let take = |arena: &mut DmaArena, n| arena.take(n).ok_or(NvmeError::NoDmaMemory("admin"));
        let sq = SqRing::new(
            take(&mut arena, usize::from(ADMIN_ENTRIES) * 64)?,
            ADMIN_ENTRIES,
        );
        let cq = CqRing::new(
            take(&mut arena, usize::from(ADMIN_ENTRIES) * 16)?,
            ADMIN_ENTRIES,
        );
        let data = take(&mut arena, 4096)?;
        let qp = QueuePair::new(0, ADMIN_ENTRIES, ADMIN_ENTRIES)
            .map_err(|e| NvmeError::Unsupported(e.to_string()))?;
        let aqa = (u32::from(ADMIN_ENTRIES) - 1) << 16 | (u32::from(ADMIN_ENTRIES) - 1);
        bar.write32(reg::AQA, aqa);
        bar.write64(reg::ASQ, sq.mem.iova());
        bar.write64(reg::ACQ, cq.mem.iova());
        fence(Ordering::SeqCst);
        bar.write32(
            reg::CC,
            reg::CC_EN | reg::CC_IOSQES_64 | reg::CC_IOCQES_16, // CSS 0 (NVM), MPS 0, AMS 0
        );
        wait_for("controller enable", to, || ready_is(&bar, true))?;

        let mut ctrl = Controller {
            admin: Mutex::new(AdminQueue {
                qp,
                sq,
                cq,
                data,
                scratch: [Completion {
                    command_id: super::spec::CommandId(0),
                    status: super::spec::StatusField(0),
                    dw0: 0,
                }; 4],
            }),
            bar,
            req,
            device,
            _group: group,
            container,
            state: AtomicU8::new(CtrlState::Live as u8),
            iova_next: AtomicU64::new(iova_next),
            qids: Mutex::new(Vec::new()),
            stride,
            page: 4096,
            max_queue_entries: mqes,
            info: ident::parse_identify_controller(&[]),
            ns: NamespaceInfo {
                size_blocks: 0,
                block_size: 512,
                metadata_size: 0,
                dlfeat: 0,
            },
            nsid: opts.nsid,
            version,
            timeout: opts.command_timeout,
            hugepages,
        };

        let mut page = vec![0u8; 4096];
        ctrl.identify(1, 0, &mut page)?;
        ctrl.info = ident::parse_identify_controller(&page);
        ctrl.identify(0, opts.nsid, &mut page)?;
        ctrl.ns = ident::parse_identify_namespace(&page).ok_or_else(|| {
            NvmeError::Unsupported(format!(
                "{pci}: namespace {} has no usable LBA format",
                opts.nsid
            ))
        })?;
        if ctrl.ns.metadata_size != 0 {
            return Err(NvmeError::Unsupported(format!(
                "{pci}: namespace {} is formatted with {} bytes of metadata per block",
                opts.nsid, ctrl.ns.metadata_size
            )));
        }
        if ctrl.ns.block_size > 4096 {
            return Err(NvmeError::Unsupported(format!(
                "{pci}: logical blocks of {} bytes; dosd needs them no larger than 4096",
                ctrl.ns.block_size
            )));
        }
        // Number of Queues (Feature 07h): zero-based counts in both halves.
        let want = u32::from(opts.io_queues.max(1)) - 1;
        let granted = ctrl.admin_command(
            "Set Features (Number of Queues)",
            {
                let mut c = SubmissionEntry::new(admin::SET_FEATURES, 0);
                c.cdw10 = 0x07;
                c.cdw11 = (want << 16) | want;
                c
            },
            None,
        )?;
        let nsq = (granted & 0xffff) + 1;
        let ncq = (granted >> 16) + 1;
        let n = nsq.min(ncq).min(u32::from(u16::MAX - 1)) as u16;
        *ctrl.qids.lock().unwrap_or_else(|p| p.into_inner()) = (1..=n).rev().collect();
        tracing::info!(
            pci,
            serial = %ctrl.info.serial,
            model = %ctrl.info.model,
            firmware = %ctrl.info.firmware,
            version = format!("{}.{}", version >> 16, (version >> 8) & 0xff),
            bytes = ctrl.ns.size_bytes(),
            block = ctrl.ns.block_size,
            mdts = ctrl.mdts_bytes(),
            io_queues = n,
            hugepages,
            "NVMe controller ready"
        );
        Ok(Arc::new(ctrl))
    }

    pub fn pci(&self) -> &str {
        &self.device.pci
    }

    pub fn state(&self) -> CtrlState {
        CtrlState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn hugepages(&self) -> bool {
        self.hugepages
    }

    /// Largest transfer in bytes (MDTS; 0 = unlimited is capped by the caller).
    pub fn mdts_bytes(&self) -> u64 {
        self.info.mdts_bytes(self.page)
    }

    pub fn max_queue_entries(&self) -> u32 {
        self.max_queue_entries
    }

    pub(crate) fn sq_doorbell(&self, qid: u16) -> usize {
        reg::DOORBELLS + 2 * usize::from(qid) * self.stride
    }

    pub(crate) fn cq_doorbell(&self, qid: u16) -> usize {
        reg::DOORBELLS + (2 * usize::from(qid) + 1) * self.stride
    }

    /// A fresh IOVA range of `len` bytes (2 MiB granular) for a new DMA region.
    pub(crate) fn dma_region(&self, len: usize) -> Result<Arc<DmaRegion>, NvmeError> {
        let len = len.div_ceil(super::dma::HUGEPAGE) * super::dma::HUGEPAGE;
        let iova = self.iova_next.fetch_add(len as u64, Ordering::Relaxed);
        Ok(DmaRegion::new(self.container.clone(), len, iova)?)
    }

    pub(crate) fn take_qid(&self) -> Option<u16> {
        self.qids.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    pub(crate) fn give_qid(&self, qid: u16) {
        self.qids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(qid);
    }

    /// Marks the controller unusable (first reason wins).
    pub(crate) fn set_state(&self, s: CtrlState) {
        let _ = self.state.compare_exchange(
            CtrlState::Live as u8,
            s as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Checks whether the device is still there and working: the kernel asking for it
    /// back (hot removal), registers reading all ones (surprise removal), or the
    /// controller fatal status. Cheap enough to call from an idle poll loop now and
    /// then: one register read and one non-blocking eventfd read.
    pub fn check(&self) -> CtrlState {
        if self.state() != CtrlState::Live {
            return self.state();
        }
        if self.req.as_ref().is_some_and(vfio::eventfd_signalled) {
            tracing::error!(pci = %self.device.pci, serial = %self.info.serial,
                "kernel asked for the device back (hot removal): failing it");
            self.set_state(CtrlState::Removed);
            return self.state();
        }
        let csts = self.bar.read32(reg::CSTS);
        if csts == u32::MAX {
            tracing::error!(pci = %self.device.pci, "registers read all ones: device removed");
            self.set_state(CtrlState::Removed);
        } else if csts & reg::CSTS_CFS != 0 {
            tracing::error!(pci = %self.device.pci, "controller fatal status");
            self.set_state(CtrlState::Fatal);
        }
        self.state()
    }

    /// Runs one admin command to completion, optionally with a 4 KiB data page
    /// (read into `data` after completion). Returns completion DW0.
    fn admin_command(
        &self,
        op: &'static str,
        mut cmd: SubmissionEntry,
        data: Option<&mut [u8]>,
    ) -> Result<u32, NvmeError> {
        if let Some(e) = self.state().error() {
            return Err(e);
        }
        let mut guard = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let q = &mut *guard;
        if data.is_some() {
            q.data.zero();
            cmd.prp1 = q.data.iova();
        }
        let (cid, tail) =
            q.qp.submit(&mut q.sq, cmd)
                .map_err(|_| NvmeError::QueueFull)?;
        fence(Ordering::SeqCst);
        self.bar.write32(self.sq_doorbell(0), u32::from(tail));
        let start = Instant::now();
        loop {
            let poll = q.qp.poll_completions(&q.cq, 4, &mut q.scratch);
            if let Some(head) = poll.cq_head {
                self.bar.write32(self.cq_doorbell(0), u32::from(head));
            }
            if poll.invalid > 0 {
                self.set_state(CtrlState::Fatal);
                return Err(NvmeError::Invalid(op));
            }
            if let Some(c) = q.scratch[..poll.completed]
                .iter()
                .find(|c| c.command_id == cid)
            {
                if !c.status.is_success() {
                    return Err(NvmeError::Status {
                        op,
                        status: c.status(),
                    });
                }
                if let Some(d) = data {
                    q.data.read_into(0, d);
                }
                return Ok(c.dw0);
            }
            if start.elapsed() > self.timeout {
                // The command id stays outstanding: the controller may still answer
                // it, and its slot must not be reused for another command.
                let st = self.check();
                if let Some(e) = st.error() {
                    return Err(e);
                }
                self.set_state(CtrlState::Fatal);
                return Err(NvmeError::Timeout {
                    op,
                    ms: self.timeout.as_millis() as u64,
                });
            }
            if poll.completed == 0 {
                if let Some(e) = self.check().error() {
                    return Err(e);
                }
                std::thread::yield_now();
            }
        }
    }

    fn identify(&self, cns: u32, nsid: u32, out: &mut [u8]) -> Result<(), NvmeError> {
        let mut c = SubmissionEntry::new(admin::IDENTIFY, nsid);
        c.cdw10 = cns;
        self.admin_command("Identify", c, Some(out)).map(|_| ())
    }

    /// Get Log Page for the whole controller (NSID FFFFFFFFh), `out.len()` ≤ 4096 bytes,
    /// a multiple of 4.
    pub fn get_log_page(&self, lid: u8, out: &mut [u8]) -> Result<(), NvmeError> {
        let dwords = (out.len().min(4096) / 4).max(1) as u32 - 1;
        let mut c = SubmissionEntry::new(admin::GET_LOG_PAGE, 0xffff_ffff);
        c.cdw10 = ((dwords & 0xffff) << 16) | u32::from(lid);
        c.cdw11 = dwords >> 16;
        let mut page = [0u8; 4096];
        self.admin_command("Get Log Page", c, Some(&mut page))?;
        let n = out.len().min(4096);
        out[..n].copy_from_slice(&page[..n]);
        Ok(())
    }

    /// The SMART / Health Information log.
    pub fn smart_log(&self) -> Result<SmartLog, NvmeError> {
        let mut b = [0u8; ident::SMART_LOG_BYTES];
        self.get_log_page(ident::SMART_LOG_ID, &mut b)?;
        Ok(ident::parse_smart_log(&b))
    }

    /// The newest `n` (≤ 64) Error Information log entries.
    pub fn error_log(&self, n: usize) -> Result<Vec<ident::ErrorLogEntry>, NvmeError> {
        let n = n.clamp(1, 64);
        let mut b = vec![0u8; n * ident::ERROR_LOG_ENTRY_BYTES];
        self.get_log_page(ident::ERROR_LOG_ID, &mut b)?;
        Ok(b.chunks_exact(ident::ERROR_LOG_ENTRY_BYTES)
            .map(ident::parse_error_log_entry)
            .filter(|e| e.error_count != 0)
            .collect())
    }

    pub(crate) fn create_io_queue(
        &self,
        qid: u16,
        entries: u16,
        sq_iova: u64,
        cq_iova: u64,
    ) -> Result<(), NvmeError> {
        let size = u32::from(entries) - 1;
        let mut c = SubmissionEntry::new(admin::CREATE_IO_CQ, 0);
        c.prp1 = cq_iova;
        c.cdw10 = (size << 16) | u32::from(qid);
        c.cdw11 = 1; // physically contiguous, interrupts disabled (polled)
        self.admin_command("Create I/O Completion Queue", c, None)?;
        let mut c = SubmissionEntry::new(admin::CREATE_IO_SQ, 0);
        c.prp1 = sq_iova;
        c.cdw10 = (size << 16) | u32::from(qid);
        c.cdw11 = (u32::from(qid) << 16) | 1; // its CQ, priority 0, contiguous
        self.admin_command("Create I/O Submission Queue", c, None)?;
        Ok(())
    }

    pub(crate) fn delete_io_queue(&self, qid: u16) -> Result<(), NvmeError> {
        let mut c = SubmissionEntry::new(admin::DELETE_IO_SQ, 0);
        c.cdw10 = u32::from(qid);
        self.admin_command("Delete I/O Submission Queue", c, None)?;
        let mut c = SubmissionEntry::new(admin::DELETE_IO_CQ, 0);
        c.cdw10 = u32::from(qid);
        self.admin_command("Delete I/O Completion Queue", c, None)?;
        Ok(())
    }

    /// Normal shutdown (CC.SHN = 01b), waiting for CSTS.SHST = complete: the device
    /// then records a safe shutdown. Called on drop; explicit calls make the result
    /// visible.
    pub fn shutdown(&self) -> Result<(), NvmeError> {
        if let Some(e) = self.state().error() {
            return Err(e);
        }
        let cc = self.bar.read32(reg::CC);
        self.bar
            .write32(reg::CC, (cc & !reg::CC_SHN_MASK) | reg::CC_SHN_NORMAL);
        let r = wait_for("shutdown", Duration::from_secs(10), || {
            let csts = self.bar.read32(reg::CSTS);
            if csts == u32::MAX {
                return Err(NvmeError::Removed);
            }
            Ok(csts & reg::CSTS_SHST_MASK == reg::CSTS_SHST_COMPLETE)
        });
        self.set_state(CtrlState::ShutDown);
        r
    }
}

fn ready_is(bar: &Bar, want: bool) -> Result<bool, NvmeError> {
    let csts = bar.read32(reg::CSTS);
    if csts == u32::MAX {
        return Err(NvmeError::Removed);
    }
    if want && csts & reg::CSTS_CFS != 0 {
        return Err(NvmeError::Fatal);
    }
    Ok((csts & reg::CSTS_RDY != 0) == want)
}

impl Drop for Controller {
    fn drop(&mut self) {
        if self.state() == CtrlState::Live {
            match self.shutdown() {
                Ok(()) => {
                    tracing::info!(pci = %self.device.pci, "NVMe controller shut down cleanly")
                }
                Err(e) => {
                    tracing::warn!(pci = %self.device.pci, error = %e, "NVMe shutdown failed")
                }
            }
        }
    }
}
