//! The crate's one error type: every DPDK failure is a value.

use thiserror::Error;

/// What can go wrong talking to DPDK.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// This build has no DPDK in it (the `dpdk` feature was off).
    #[error("built without DPDK (enable the dpdk crate's `dpdk` feature)")]
    Unavailable,
    /// EAL can be initialised once per process, and this process already tried.
    #[error("the DPDK EAL was already initialised in this process")]
    AlreadyInitialised,
    /// An EAL argument holds a NUL byte.
    #[error("EAL argument {0:?} contains a NUL byte")]
    BadArgument(String),
    /// A DPDK call failed; `errno` is the (positive) error number it reported.
    #[error("{call} failed: {message} (errno {errno})")]
    Dpdk {
        /// The DPDK function.
        call: &'static str,
        /// The positive error number.
        errno: i32,
        /// `rte_strerror(errno)`.
        message: String,
    },
    /// No port with this id, or no port with this name.
    #[error("no DPDK port {0}")]
    NoSuchPort(String),
    /// The port, or this queue of it, already has an owner in this process.
    #[error("{0} is already in use")]
    Busy(String),
    /// A queue id outside the port's configuration, or a port not yet configured.
    #[error("queue {queue} out of range: the port has {configured} configured")]
    NoSuchQueue {
        /// The queue asked for.
        queue: u16,
        /// How many the port has.
        configured: u16,
    },
    /// The operation needs the port started (or stopped) and it is not.
    #[error("port {0} is in the wrong state for this: {1}")]
    PortState(u16, &'static str),
    /// The mempool had no free mbuf.
    #[error("mempool {0} is empty")]
    PoolEmpty(String),
    /// An mbuf has too little room (or data) for the operation, or a length does not
    /// fit the 16-bit fields of an mbuf.
    #[error("mbuf: {0}")]
    NoRoom(&'static str),
    /// The mbuf's bytes are shared (an external or attached buffer) and cannot be
    /// written through this handle.
    #[error("mbuf data is shared and read-only")]
    Shared,
    /// A parameter that DPDK would reject or misread (zero sizes, a long name).
    #[error("invalid parameter: {0}")]
    Invalid(&'static str),
}

/// The crate's result.
pub type Result<T> = std::result::Result<T, Error>;
