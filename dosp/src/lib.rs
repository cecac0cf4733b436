//! DOSP — the Distributed Object Storage Protocol.
//!
//! This crate owns the wire: fixed little-endian structures read in place with
//! `zerocopy`, opcodes and status codes, a sans-IO codec shared by server and client,
//! and the blocking client library behind the `dosp` CLI. The full contract is in
//! `PROTOCOL.md` beside this crate.
//!
//! What it must never do: perform I/O inside the codec, or panic on any byte sequence.
#![deny(unsafe_code)]

pub mod auth;
pub mod fingerprint;

pub use fingerprint::{Fingerprint, FingerprintError};
pub mod client;
pub mod codec;
pub mod signed;
pub mod wire;
