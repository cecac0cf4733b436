//! Counters the dataplane shares with the management core.
//!
//! Plain relaxed atomics: the dataplane increments them on its own core and the
//! management core reads them whenever it likes. Nothing here is ever locked.

use std::sync::atomic::{AtomicU64, Ordering};

/// Node-wide counters. Every field is incremented somewhere in the dataplane.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Connections open now.
    pub connections: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Connections refused because the session table was full.
    pub connections_refused: AtomicU64,
    /// Requests completed (any status).
    pub ops_total: AtomicU64,
    /// Requests in progress now (streams, stores).
    pub ops_outstanding: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Replies with a status other than SUCCESS (NOT_FOUND included).
    pub errors_total: AtomicU64,
    /// Malformed input: bad magic, checksum, version, sizes; the connection is closed.
    pub bad_requests: AtomicU64,
    pub unknown_opcodes: AtomicU64,
    /// STOREs abandoned by their client mid-stream (connection closed or timed out).
    pub stores_aborted: AtomicU64,
    /// Connections closed because the peer went quiet past a timeout.
    pub sessions_timed_out: AtomicU64,
    /// Object data that failed its checksum on the way out (never sent).
    pub checksum_mismatches: AtomicU64,
    pub stores: AtomicU64,
    pub retrieves: AtomicU64,
    pub deletes: AtomicU64,
    pub udp_requests: AtomicU64,
    pub udp_bad: AtomicU64,
    pub locate_answers: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    /// Loop turns of the dataplane core (liveness).
    pub loop_turns: AtomicU64,
}

impl NodeStats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
