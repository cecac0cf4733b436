//! The dosd dataplane: the per-core poll loop, DOSP server sessions, the cluster
//! services, and the object store with MD5 inline.
//!
//! What it owns: every socket of the data path and every disk. What it must never do:
//! block on anything but its own I/O, allocate per request on the hot path of a
//! poll-mode backend, or panic on input from the network or a disk.
#![deny(unsafe_code)]

pub mod copies;
pub mod handle;
pub mod node;
pub mod server;
pub mod stats;
pub mod store;
