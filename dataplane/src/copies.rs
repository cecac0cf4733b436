//! A ledger of object-payload bytes the CPU copies, by copy site: the proof that a
//! STORE copies each byte once and a RETRIEVE none (the device writes the bytes into
//! the buffer the socket sends from).
//!
//! It exists only in test builds and with the `copy-count` feature: otherwise
//! [`Copies`] is a unit struct whose [`Copies::add`] does nothing and compiles away.
//! A ledger is shared (an `Arc` of counters) so that a test can hand the same one to
//! every loop's store of a node and read the sum, without seeing other tests' copies.

/// Where object bytes are copied by the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// A STORE chunk from the receive buffer into the staging (device) buffer, with
    /// MD5 and CRC32C in the same pass.
    Append = 0,
    /// Bytes of a finished read copied into a caller's buffer: only the blocking
    /// [`crate::store::Store::read`] (tests, tools) does; serving lends the buffer.
    ReadOut = 1,
    /// A verified whole small object copied into the hot-object cache.
    CacheFill = 2,
    /// Bytes copied on their way between loops (none: the buffer itself moves).
    CrossLoop = 3,
    /// Bytes a session copies into its output (none: it sends from lent buffers).
    Session = 4,
    /// Received bytes a network port copies to lend them in one piece: the DPDK port,
    /// when smoltcp's receive ring wraps (the kernel port lends its buffer in place).
    PortRecv = 5,
    /// Bytes a network port copies into its own send buffer: the DPDK port's
    /// `send_slice` into smoltcp's send ring (every byte sent: smoltcp has no
    /// scatter-gather or external-buffer send). The kernel port's `writev` copies in
    /// the kernel, which is not counted here.
    PortSend = 6,
    /// A small object (at most 16 KiB) committed as a packed record: its staged bytes
    /// copied into the image of the disk's tail blocks, where it shares blocks with
    /// other small records.
    Pack = 7,
}

/// How many sites there are.
pub const SITES: usize = 8;

#[cfg(any(test, feature = "copy-count"))]
mod imp {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::{Site, SITES};

    /// A shared ledger of copied bytes per [`Site`].
    #[derive(Clone, Debug, Default)]
    pub struct Copies(Arc<[AtomicU64; SITES]>);

    impl Copies {
        /// A fresh ledger, every site at zero.
        pub fn new() -> Copies {
            Copies::default()
        }

        pub fn add(&self, site: Site, n: usize) {
            self.0[site as usize].fetch_add(n as u64, Ordering::Relaxed);
        }

        /// Bytes copied at `site` so far.
        pub fn at(&self, site: Site) -> u64 {
            self.0[site as usize].load(Ordering::Relaxed)
        }

        /// Bytes copied at every site so far, indexed by `Site as usize`.
        pub fn all(&self) -> [u64; SITES] {
            std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
        }
    }
}

#[cfg(not(any(test, feature = "copy-count")))]
mod imp {
    use super::Site;

    /// Nothing: copies are counted only in test builds.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Copies;

    impl Copies {
        pub fn new() -> Copies {
            Copies
        }

        #[inline(always)]
        pub fn add(&self, _site: Site, _n: usize) {}
    }
}

pub use imp::Copies;
