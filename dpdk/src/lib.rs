//! dosd's own DPDK bindings, against DPDK 22.11 (Debian's `libdpdk-dev`).
//!
//! What it owns: the environment abstraction layer ([`Eal`], once per process),
//! packet-mbuf pools ([`Mempool`]), mbufs ([`Mbuf`], [`Burst`], external buffers), and
//! ethernet ports ([`Port`], its [`RxQueue`]s and [`TxQueue`]s, stats, link, MAC).
//! What it must never do: allocate on the fast path (a [`Burst`] is a fixed array),
//! block, or let safe code reach memory DPDK has freed — every handle borrows the
//! [`Eal`] it came from, so `rte_eal_cleanup` cannot run while one is alive.
//!
//! All `unsafe` code of the project's network data path lives in this crate: the
//! declarations in `sys` (hand-written, only what is used; `shim/shim.c` covers the
//! static-inline fast path), and one `unsafe` block per C call in the wrappers, each
//! with a `SAFETY:` comment.
//!
//! With the `dpdk` feature, DPDK is linked statically (glibc stays dynamic) by
//! `build.rs`; without it the crate builds anywhere and [`Eal::init`] answers
//! [`Error::Unavailable`].

#![deny(unsafe_code)]

mod eal;
mod error;
mod mbuf;
#[cfg(feature = "dpdk")]
pub mod phy;
mod port;
mod sys;

pub use eal::{Eal, Lcore};
pub use error::{Error, Result};
pub use mbuf::{Burst, Drain, Mbuf, Mempool, BURST_MAX};
#[cfg(feature = "dpdk")]
pub use phy::{MbufDevice, PhyStats};
pub use port::{Link, MacAddr, Port, PortConfig, PortId, PortStats, QueueId, RxQueue, TxQueue};

/// Whether this build has DPDK linked in (the `dpdk` feature).
pub const BUILT_WITH_DPDK: bool = cfg!(feature = "dpdk");
