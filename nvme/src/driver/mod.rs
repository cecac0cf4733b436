//! The polled user-space NVMe driver: the SPDK model, without SPDK.
//!
//! A controller is taken from the kernel ([`bind`]: vfio-pci, the original driver
//! given back on exit) and driven from user space through VFIO ([`vfio`]): BAR0
//! mapped for registers and doorbells, DMA memory from hugepages mapped into the IOMMU
//! ([`dma`]). [`ctrl`] brings the controller up per the specification and owns the
//! admin queue (Identify, features, log pages, queue creation, shutdown); each core
//! that uses the device owns an [`io::IoQueue`] — its own submission/completion pair,
//! polled, never interrupted — and [`device::NvmeDevice`] is the object store's
//! [`crate::BlockDevice`] over one such queue.
//!
//! Underneath, host-testable and free of `unsafe`:
//! - [`spec`]: the NVMe 2.0 queue entries, opcodes and status decode;
//! - [`queue`]: the queue-pair state machine (tails, heads, phase, command ids), which
//!   works on ring memory it is handed and returns doorbell values instead of writing
//!   them, so it runs against a software controller in tests;
//! - [`prp`]: PRP1/PRP2/PRP-list construction for a transfer;
//! - [`ident`]: Identify, SMART and error-log decoding.
//!
//! All `unsafe` (MMIO, DMA, VFIO ioctls) lives in [`vfio`] and [`dma`], each block
//! with a `SAFETY` comment. What the driver must never do: allocate on the I/O path,
//! wait without a bound, or panic on a value that came from the controller — a
//! misbehaving, failed or removed device becomes a typed error and a disk `down`.

pub mod bind;
pub mod ctrl;
pub mod device;
pub mod dma;
pub mod ident;
pub mod io;
pub mod prp;
pub mod queue;
pub mod spec;
pub mod vfio;

pub use ctrl::{Controller, CtrlOptions, CtrlState, NvmeError};
pub use device::NvmeDevice;
pub use ident::SmartLog;
pub use io::{BufId, IoCmd, IoDone, IoQueue, QueueOptions};

/// A controller opened by name, with the binding that gives it back to its original
/// driver when dropped. Drop every queue and device on the controller before the
/// binding (field order does it for this struct).
pub struct Opened {
    pub ctrl: std::sync::Arc<Controller>,
    pub binding: Option<bind::Binding>,
}

/// Opens the NVMe controller that `spec` names — a PCI address, or a serial number —
/// binding it to vfio-pci first when the kernel drives it (needs root).
pub fn open(spec: &str, opts: &CtrlOptions) -> Result<Opened, String> {
    match bind::resolve(spec).map_err(|e| e.to_string())? {
        bind::Target::Pci(pci) => {
            let binding = bind::bind_vfio(&pci).map_err(|e| e.to_string())?;
            let ctrl = Controller::open(&pci, opts).map_err(|e| format!("{pci}: {e}"))?;
            if bind::parse_pci_address(spec).is_none() && ctrl.info.serial != spec {
                return Err(format!(
                    "{pci} reports serial {:?}, not {spec:?}",
                    ctrl.info.serial
                ));
            }
            Ok(Opened {
                ctrl,
                binding: binding.original.is_some().then_some(binding),
            })
        }
        bind::Target::SerialOnVfio { serial, candidates } => {
            // Already on vfio-pci (e.g. left there by a killed process): the serial is
            // only known after Identify.
            let mut seen = Vec::new();
            for pci in candidates {
                match Controller::open(&pci, opts) {
                    Ok(c) if c.info.serial == serial => {
                        return Ok(Opened {
                            ctrl: c,
                            binding: None,
                        })
                    }
                    Ok(c) => seen.push(format!("{pci} ({})", c.info.serial)),
                    Err(e) => seen.push(format!("{pci} ({e})")),
                }
            }
            Err(format!(
                "no NVMe controller has serial {serial:?}; on vfio-pci: {}",
                seen.join(", ")
            ))
        }
    }
}
