//! The polled user-space NVMe driver (issue 4), in the making.
//!
//! When complete, the driver will unbind a controller from the kernel, drive it through
//! VFIO with DMA memory from hugepages, give each dataplane core its own I/O queue pair
//! per disk and poll completions instead of taking interrupts, in the manner of SPDK.
//! All of its `unsafe` (MMIO, DMA, VFIO ioctls) will live in this module's VFIO and
//! register files, each block with a `SAFETY` comment.
//!
//! This first part is the host-testable core and contains no `unsafe`:
//! - [`spec`]: the NVMe 2.0 queue entries, opcodes and status decode;
//! - [`queue`]: the queue-pair state machine (tails, heads, phase, command ids), which
//!   works on ring memory it is handed and returns doorbell values instead of writing
//!   them, so it runs against a software controller in tests;
//! - [`prp`]: PRP1/PRP2/PRP-list construction for a transfer.
//!
//! What this part must never do: touch hardware, allocate after a queue is created, or
//! panic on a value that came from the controller.

pub mod prp;
pub mod queue;
pub mod spec;
