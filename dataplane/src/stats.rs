//! Counters the dataplane shares with the management core.
//!
//! Plain relaxed atomics: the dataplane increments them on its own core and the
//! management core reads them whenever it likes. Nothing here is ever locked, and
//! nothing allocates after start-up: the histograms are fixed arrays of counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dosp::signed::Refusal;
use dosp::wire::Status;

use crate::server::frame_check::RxDrop;

/// Buckets of a latency [`Histogram`]: bucket `k` below the last counts latencies of
/// at most 2^k µs (1 µs up to 2^24 µs ≈ 16.8 s, past any request timeout); the last
/// counts everything slower (Prometheus' `+Inf`). Powers of two make the bucket a
/// leading-zero count, and 26 of them span every latency a request can have.
pub const LATENCY_BUCKETS: usize = 26;

/// A fixed-bucket latency histogram of atomics (see [`LATENCY_BUCKETS`]).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_us: AtomicU64,
}

/// A copy of a [`Histogram`] at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Observations per bucket (not cumulative).
    pub buckets: [u64; LATENCY_BUCKETS],
    pub sum_us: u64,
}

impl HistogramSnapshot {
    /// Observations in all buckets. Derived from the buckets rather than counted
    /// apart, so that `+Inf` and `_count` always agree in an exposition.
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0u64, |a, &b| a.wrapping_add(b))
    }
}

impl Histogram {
    /// Upper bound of bucket `k` in microseconds; `None` for the last (`+Inf`).
    pub const fn upper_bound_us(k: usize) -> Option<u64> {
        if k + 1 < LATENCY_BUCKETS {
            Some(1 << k)
        } else {
            None
        }
    }

    /// The bucket of a latency of `us` microseconds: the smallest `k` with
    /// `us <= 2^k`, capped at the last.
    fn bucket_of(us: u64) -> usize {
        let k = if us <= 1 {
            0
        } else {
            (u64::BITS - (us - 1).leading_zeros()) as usize
        };
        k.min(LATENCY_BUCKETS - 1)
    }

    pub fn record(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.buckets[Self::bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Reads every bucket. Not one atomic snapshot: a request recorded meanwhile may
    /// be in the buckets and not yet in the sum, which Prometheus tolerates.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|k| self.buckets[k].load(Ordering::Relaxed)),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// What a latency is recorded under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpClass {
    /// STORE, from its request to its reply (after the last chunk).
    Store,
    /// RETRIEVE and RETRIEVE_RANGE, from the request to the final Out structure.
    Retrieve,
    Delete,
    /// Everything else answered over TCP (LOCATE, HEARTBEAT, disk queries, GET_CONTENTS,
    /// NULL, unknown opcodes).
    Other,
}

impl OpClass {
    pub const ALL: [OpClass; 4] = [
        OpClass::Store,
        OpClass::Retrieve,
        OpClass::Delete,
        OpClass::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpClass::Store => "store",
            OpClass::Retrieve => "retrieve",
            OpClass::Delete => "delete",
            OpClass::Other => "other",
        }
    }
}

/// Whether the DOSP listener can take new connections, as the dataplane last saw it.
/// The management core's health rule (mgmt/src/health.rs) turns it into a reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum ListenerState {
    /// Connections are accepted (the normal state).
    Accepting = 0,
    /// The process is out of file descriptors: each new connection is accepted on the
    /// reserve descriptor, answered BUSY and closed. Existing connections are served.
    Shedding = 1,
    /// The listener cannot accept at all (not even to shed): new connections wait in
    /// the kernel's backlog until descriptors come back.
    Stuck = 2,
}

impl ListenerState {
    /// The state a gauge value stands for; unknown values read as `Stuck`, the worst.
    pub fn from_gauge(v: u64) -> ListenerState {
        match v {
            0 => ListenerState::Accepting,
            1 => ListenerState::Shedding,
            _ => ListenerState::Stuck,
        }
    }
}

/// Node-wide counters. Every field is incremented somewhere in the dataplane.
///
/// How requests are counted, so that each reply and each abort counts exactly once:
/// every reply sent, over TCP or UDP, raises `ops_total` once, and a reply whose status
/// is not SUCCESS also raises `errors_total` and its `errors_by_status` slot once
/// ([`NodeStats::error`]). A reply refusing malformed input also raises `bad_requests`
/// once, as does a malformed datagram dropped without a reply. A STORE ends either with its last chunk (and its reply) or with its connection
/// (`stores_aborted`). The one answer not counted as an operation is the BUSY sent to a
/// connection refused at accept (`connections_refused`).
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Connections open now.
    pub connections: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Connections answered BUSY and closed: the session table was full of connections
    /// in the middle of a request, or the process was out of file descriptors.
    pub connections_refused: AtomicU64,
    /// Idle connections (between requests) closed to admit a new one into a full table.
    pub connections_evicted: AtomicU64,
    /// `accept` calls that failed for want of a resource (file descriptors, memory).
    pub accept_failures: AtomicU64,
    /// The DOSP listener's [`ListenerState`], as a gauge (its `u64` value).
    pub listener_state: AtomicU64,
    /// Replies sent, over TCP and UDP (any status).
    pub ops_total: AtomicU64,
    /// Requests in progress now (streams, stores).
    pub ops_outstanding: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Replies with a status other than SUCCESS (NOT_FOUND included): the sum of
    /// `errors_by_status`. Both are raised only by [`NodeStats::error`].
    pub errors_total: AtomicU64,
    /// Replies with a status other than SUCCESS, indexed by the status' code (the
    /// SUCCESS slot stays 0).
    pub errors_by_status: [AtomicU64; Status::ALL.len()],
    /// Request latency by [`OpClass`] (indexed by it), from the request's arrival to
    /// its reply; see [`NodeStats::latency`].
    pub latency: [Histogram; OpClass::ALL.len()],
    /// Malformed input: every reply with BAD_REQUEST or BAD_VERSION (raised by
    /// [`NodeStats::error`]: a body of the wrong size, bad StoreIn flags, a header or
    /// chunk header that fails its checks, …), every TOO_LARGE for a header's
    /// `body_len`, and every malformed datagram dropped without a reply.
    pub bad_requests: AtomicU64,
    pub unknown_opcodes: AtomicU64,
    /// STOREs ended by their connection (closed, timed out, or broken framing) before
    /// their last chunk, with or without an error reply; also a STORE whose connection
    /// ended before its StoreIn had all arrived (then counted in `stores` too).
    pub stores_aborted: AtomicU64,
    /// Connections closed because the peer went quiet past a timeout.
    pub sessions_timed_out: AtomicU64,
    /// Object data that failed its checksum on the way out (never sent).
    pub checksum_mismatches: AtomicU64,
    pub stores: AtomicU64,
    pub retrieves: AtomicU64,
    pub deletes: AtomicU64,
    /// Datagrams whose header passed its checks.
    pub udp_requests: AtomicU64,
    /// Malformed datagrams, answered (a header error that can be attributed) or
    /// dropped; each is also a bad request.
    pub udp_bad: AtomicU64,
    pub locate_answers: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    /// Loop turns (the management core judges liveness per loop from
    /// [`LoopBeats`], which each loop beats alongside).
    pub loop_turns: AtomicU64,
    /// Requests completed in the last whole second (a gauge, set once a second).
    pub ops_per_sec: AtomicU64,
    /// The node's health as the management core last assessed it: 0 ok, 1 degraded,
    /// 2 failing (a gauge for `/metrics`, set on [`StatsSet::mgmt`]; HEARTBEAT answers
    /// read the verdict from the node's state, [`crate::node::NodeState`]).
    pub health: AtomicU64,
    /// Hot-object cache: reads served from memory, reads that went to a disk, objects
    /// and bytes held, and its capacity (set by the loop when it publishes reports).
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_objects: AtomicU64,
    pub cache_bytes: AtomicU64,
    pub cache_capacity_bytes: AtomicU64,
    /// Objects in the index and the bytes the index takes (estimated from its table
    /// and its extents), set with the cache figures.
    pub index_objects: AtomicU64,
    pub index_bytes: AtomicU64,
    /// Frames a DPDK port received and dropped (or refused) before its TCP/IP stack saw
    /// them, by [`RxDrop`] reason (indexed by it); see [`NodeStats::rx_dropped`]. The
    /// kernel backend never raises them (the kernel counts its own drops).
    pub net_rx_dropped: [AtomicU64; RxDrop::ALL.len()],
    /// Requests refused with AUTH_FAILED (or, sent to the multicast group, dropped)
    /// by a node with a cluster key, by [`Refusal`] reason (indexed by its code - 1);
    /// see [`NodeStats::auth_failed`].
    pub auth_failed: [AtomicU64; Refusal::ALL.len()],
    /// HTTP responses (signed URLs, `server/http.rs`) by status, indexed like
    /// [`HTTP_STATUSES`]; see [`NodeStats::http_response`].
    pub http_responses: [AtomicU64; HTTP_STATUSES.len()],
}

/// Every status an HTTP session answers with, in the order of
/// [`NodeStats::http_responses`] (the `status` label of `dosd_http_requests_total`).
pub const HTTP_STATUSES: [u16; 11] = [200, 206, 304, 400, 403, 404, 405, 416, 431, 500, 503];

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

    /// Sets a gauge.
    pub fn set(gauge: &AtomicU64, v: u64) {
        gauge.store(v, Ordering::Relaxed);
    }

    /// Counts a reply with a non-success status, in total and by status, and as a bad
    /// request when the status says the request was malformed.
    pub fn error(stats: &NodeStats, status: Status) {
        debug_assert_ne!(status, Status::Success, "a success is not an error");
        NodeStats::inc(&stats.errors_total);
        if let Some(by_status) = stats.errors_by_status.get(status as usize) {
            NodeStats::inc(by_status);
        }
        if matches!(status, Status::BadRequest | Status::BadVersion) {
            NodeStats::inc(&stats.bad_requests);
        }
    }

    /// Counts a received frame dropped for `reason`.
    /// Counts a request refused for `reason`.
    pub fn auth_failed(&self, reason: Refusal) {
        if let Some(c) = self.auth_failed.get(reason.code() as usize - 1) {
            NodeStats::inc(c);
        }
    }

    /// Counts an HTTP response with `status` (one outside [`HTTP_STATUSES`] is
    /// counted as 500).
    pub fn http_response(&self, status: u16) {
        let i = HTTP_STATUSES
            .iter()
            .position(|&s| s == status)
            .or_else(|| HTTP_STATUSES.iter().position(|&s| s == 500));
        if let Some(c) = i.and_then(|i| self.http_responses.get(i)) {
            NodeStats::inc(c);
        }
    }

    /// HTTP responses with `status` so far.
    pub fn http_response_count(&self, status: u16) -> u64 {
        HTTP_STATUSES
            .iter()
            .position(|&s| s == status)
            .and_then(|i| self.http_responses.get(i))
            .map_or(0, NodeStats::get)
    }

    /// Requests refused for `reason` so far.
    pub fn auth_failed_count(&self, reason: Refusal) -> u64 {
        self.auth_failed
            .get(reason.code() as usize - 1)
            .map_or(0, NodeStats::get)
    }

    pub fn rx_dropped(&self, reason: RxDrop) {
        NodeStats::inc(&self.net_rx_dropped[reason as usize]);
    }

    /// Frames dropped so far for `reason`.
    pub fn rx_dropped_count(&self, reason: RxDrop) -> u64 {
        NodeStats::get(&self.net_rx_dropped[reason as usize])
    }

    /// The latency histogram of one class of operation.
    pub fn latency(&self, op: OpClass) -> &Histogram {
        &self.latency[op as usize]
    }
}

/// The load figures that GET_LOAD and HEARTBEAT report, summed over every loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    pub connections: u64,
    pub ops_outstanding: u64,
    pub ops_total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors_total: u64,
    pub ops_per_sec: u64,
}

/// The counters of every dataplane loop (index = loop number), and one more set for
/// the counters the management core raises itself (heartbeats sent, the health gauge).
///
/// Each loop increments only its own [`NodeStats`], so no cache line is shared between
/// loops on the data path; readers sum them ([`StatsSet::sum`], [`StatsSet::load`]).
#[derive(Debug)]
pub struct StatsSet {
    loops: Box<[Arc<NodeStats>]>,
    mgmt: Arc<NodeStats>,
}

impl StatsSet {
    /// Counters for `loops` loops (at least one).
    pub fn new(loops: usize) -> StatsSet {
        StatsSet {
            loops: (0..loops.max(1)).map(|_| Arc::default()).collect(),
            mgmt: Arc::default(),
        }
    }

    /// Loop `index`'s own counters; `None` past the last loop.
    pub fn of_loop(&self, index: usize) -> Option<&Arc<NodeStats>> {
        self.loops.get(index)
    }

    /// The management core's own counters.
    pub fn mgmt(&self) -> &NodeStats {
        &self.mgmt
    }

    pub fn loops(&self) -> usize {
        self.loops.len()
    }

    fn all(&self) -> impl Iterator<Item = &NodeStats> {
        self.loops
            .iter()
            .map(|s| &**s)
            .chain(std::iter::once(&*self.mgmt))
    }

    /// Every counter summed into one [`NodeStats`] (for `/metrics`): counters and
    /// gauges add up, except the listener's state, which is the worst any loop saw.
    pub fn sum(&self) -> NodeStats {
        let total = NodeStats::default();
        for s in self.all() {
            total.absorb(s);
        }
        total
    }

    /// The worst state any loop saw of its DOSP listener.
    pub fn listener_state(&self) -> ListenerState {
        let worst = self
            .all()
            .map(|s| NodeStats::get(&s.listener_state))
            .max()
            .unwrap_or(0);
        ListenerState::from_gauge(worst)
    }

    /// What GET_LOAD and HEARTBEAT report, summed without building a whole
    /// [`NodeStats`] (this runs on a dataplane loop, per request).
    pub fn load(&self) -> Load {
        let mut l = Load::default();
        for s in self.all() {
            l.connections += NodeStats::get(&s.connections);
            l.ops_outstanding += NodeStats::get(&s.ops_outstanding);
            l.ops_total += NodeStats::get(&s.ops_total);
            l.bytes_in += NodeStats::get(&s.bytes_in);
            l.bytes_out += NodeStats::get(&s.bytes_out);
            l.errors_total += NodeStats::get(&s.errors_total);
            l.ops_per_sec += NodeStats::get(&s.ops_per_sec);
        }
        l
    }
}

impl NodeStats {
    /// Adds `other`'s values into these (see [`StatsSet::sum`]). The destructuring
    /// names every field, so a new counter cannot be left out of the sums.
    fn absorb(&self, other: &NodeStats) {
        let NodeStats {
            connections,
            connections_total,
            connections_refused,
            connections_evicted,
            accept_failures,
            listener_state,
            ops_total,
            ops_outstanding,
            bytes_in,
            bytes_out,
            errors_total,
            errors_by_status,
            latency,
            bad_requests,
            unknown_opcodes,
            stores_aborted,
            sessions_timed_out,
            checksum_mismatches,
            stores,
            retrieves,
            deletes,
            udp_requests,
            udp_bad,
            locate_answers,
            heartbeats_sent,
            loop_turns,
            ops_per_sec,
            health,
            cache_hits,
            cache_misses,
            cache_objects,
            cache_bytes,
            cache_capacity_bytes,
            index_objects,
            index_bytes,
            net_rx_dropped,
            auth_failed,
            http_responses,
        } = other;
        let add = |into: &AtomicU64, from: &AtomicU64| {
            into.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        };
        for (into, from) in [
            (&self.connections, connections),
            (&self.connections_total, connections_total),
            (&self.connections_refused, connections_refused),
            (&self.connections_evicted, connections_evicted),
            (&self.accept_failures, accept_failures),
            (&self.ops_total, ops_total),
            (&self.ops_outstanding, ops_outstanding),
            (&self.bytes_in, bytes_in),
            (&self.bytes_out, bytes_out),
            (&self.errors_total, errors_total),
            (&self.bad_requests, bad_requests),
            (&self.unknown_opcodes, unknown_opcodes),
            (&self.stores_aborted, stores_aborted),
            (&self.sessions_timed_out, sessions_timed_out),
            (&self.checksum_mismatches, checksum_mismatches),
            (&self.stores, stores),
            (&self.retrieves, retrieves),
            (&self.deletes, deletes),
            (&self.udp_requests, udp_requests),
            (&self.udp_bad, udp_bad),
            (&self.locate_answers, locate_answers),
            (&self.heartbeats_sent, heartbeats_sent),
            (&self.loop_turns, loop_turns),
            (&self.ops_per_sec, ops_per_sec),
            (&self.health, health),
            (&self.cache_hits, cache_hits),
            (&self.cache_misses, cache_misses),
            (&self.cache_objects, cache_objects),
            (&self.cache_bytes, cache_bytes),
            (&self.cache_capacity_bytes, cache_capacity_bytes),
            (&self.index_objects, index_objects),
            (&self.index_bytes, index_bytes),
        ] {
            add(into, from);
        }
        self.listener_state
            .fetch_max(listener_state.load(Ordering::Relaxed), Ordering::Relaxed);
        for (into, from) in self.errors_by_status.iter().zip(errors_by_status) {
            add(into, from);
        }
        for (into, from) in self.auth_failed.iter().zip(auth_failed) {
            add(into, from);
        }
        for (into, from) in self.http_responses.iter().zip(http_responses) {
            add(into, from);
        }
        for (into, from) in self.net_rx_dropped.iter().zip(net_rx_dropped) {
            add(into, from);
        }
        for (into, from) in self.latency.iter().zip(latency) {
            for (b, f) in into.buckets.iter().zip(&from.buckets) {
                add(b, f);
            }
            add(&into.sum_us, &from.sum_us);
        }
    }
}

/// Liveness of the dataplane loops: one turn counter per loop, index = loop number,
/// sized at start-up from the number of loops. Each loop calls [`LoopBeats::beat`]
/// once per turn with its own index; the management core samples
/// [`LoopBeats::turns`] and calls a loop stalled when its counter stops moving.
#[derive(Debug)]
pub struct LoopBeats {
    turns: Box<[AtomicU64]>,
}

impl LoopBeats {
    /// Counters for `loops` loops (at least one).
    pub fn new(loops: usize) -> LoopBeats {
        LoopBeats {
            turns: (0..loops.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// One turn of loop `index` (an index past the last loop is a programmer error,
    /// caught at start-up by [`LoopBeats::loops`]; here it is ignored).
    pub fn beat(&self, index: usize) {
        if let Some(t) = self.turns.get(index) {
            t.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn loops(&self) -> usize {
        self.turns.len()
    }

    /// Turns of every loop so far, by loop number, into `out` (cleared first).
    pub fn turns(&self, out: &mut Vec<u64>) {
        out.clear();
        out.extend(self.turns.iter().map(|t| t.load(Ordering::Relaxed)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_microseconds() {
        let us = |n| Histogram::bucket_of(n);
        assert_eq!(us(0), 0);
        assert_eq!(us(1), 0);
        assert_eq!(us(2), 1);
        assert_eq!(us(3), 2);
        assert_eq!(us(4), 2);
        assert_eq!(us(5), 3);
        assert_eq!(us(1 << 20), 20);
        assert_eq!(us((1 << 20) + 1), 21);
        assert_eq!(us(1 << 24), 24);
        assert_eq!(us((1 << 24) + 1), LATENCY_BUCKETS - 1);
        assert_eq!(us(u64::MAX), LATENCY_BUCKETS - 1);
        // Every latency lands in the bucket whose bound is the first at or above it.
        for n in [0u64, 1, 7, 1000, 123_456, 9_999_999, 1 << 30] {
            let k = us(n);
            if let Some(hi) = Histogram::upper_bound_us(k) {
                assert!(n <= hi, "{n} above bucket {k}");
            }
            if k > 0 {
                let lo = Histogram::upper_bound_us(k - 1).unwrap();
                assert!(n > lo, "{n} belongs below bucket {k}");
            }
        }
        assert_eq!(Histogram::upper_bound_us(LATENCY_BUCKETS - 1), None);
    }

    #[test]
    fn a_histogram_counts_and_sums() {
        let h = Histogram::default();
        h.record(Duration::from_micros(3));
        h.record(Duration::from_micros(3));
        h.record(Duration::from_millis(2));
        h.record(Duration::from_secs(100));
        let s = h.snapshot();
        assert_eq!(s.count(), 4);
        assert_eq!(s.sum_us, 6 + 2000 + 100_000_000);
        assert_eq!(s.buckets[2], 2);
        assert_eq!(s.buckets[11], 1); // 2000 µs <= 2048 µs
        assert_eq!(s.buckets[LATENCY_BUCKETS - 1], 1);
    }

    #[test]
    fn errors_count_in_total_and_by_status() {
        let s = NodeStats::default();
        NodeStats::error(&s, Status::NotFound);
        NodeStats::error(&s, Status::NotFound);
        NodeStats::error(&s, Status::Busy);
        assert_eq!(NodeStats::get(&s.errors_total), 3);
        assert_eq!(
            NodeStats::get(&s.errors_by_status[Status::NotFound as usize]),
            2
        );
        assert_eq!(
            NodeStats::get(&s.errors_by_status[Status::Busy as usize]),
            1
        );
        let sum: u64 = s.errors_by_status.iter().map(NodeStats::get).sum();
        assert_eq!(sum, NodeStats::get(&s.errors_total));
        assert_eq!(NodeStats::get(&s.bad_requests), 0);
        NodeStats::error(&s, Status::BadRequest);
        NodeStats::error(&s, Status::BadVersion);
        assert_eq!(NodeStats::get(&s.bad_requests), 2);
        assert_eq!(
            NodeStats::get(&s.errors_by_status[Status::Success as usize]),
            0
        );
    }
    #[test]
    fn a_set_sums_every_loop_and_the_mgmt_counters() {
        let set = StatsSet::new(2);
        assert_eq!(set.loops(), 2);
        assert!(set.of_loop(2).is_none());
        let (a, b) = (set.of_loop(0).unwrap(), set.of_loop(1).unwrap());
        NodeStats::add(&a.ops_total, 3);
        NodeStats::add(&b.ops_total, 4);
        NodeStats::inc(&b.connections);
        NodeStats::error(a, Status::NotFound);
        NodeStats::error(b, Status::NotFound);
        a.latency(OpClass::Store).record(Duration::from_micros(3));
        b.latency(OpClass::Store).record(Duration::from_micros(3));
        NodeStats::set(&a.listener_state, ListenerState::Shedding as u64);
        NodeStats::set(&b.listener_state, ListenerState::Accepting as u64);
        NodeStats::inc(&set.mgmt().heartbeats_sent);
        a.rx_dropped(RxDrop::BadChecksum);
        b.rx_dropped(RxDrop::BadChecksum);
        b.rx_dropped(RxDrop::SynRefused);
        let s = set.sum();
        assert_eq!(NodeStats::get(&s.ops_total), 7);
        assert_eq!(NodeStats::get(&s.connections), 1);
        assert_eq!(NodeStats::get(&s.heartbeats_sent), 1);
        assert_eq!(NodeStats::get(&s.errors_total), 2);
        assert_eq!(
            NodeStats::get(&s.errors_by_status[Status::NotFound as usize]),
            2
        );
        let h = s.latency(OpClass::Store).snapshot();
        assert_eq!((h.count(), h.sum_us), (2, 6));
        assert_eq!(
            ListenerState::from_gauge(NodeStats::get(&s.listener_state)),
            ListenerState::Shedding,
            "the worst listener, not a sum"
        );
        assert_eq!(set.listener_state(), ListenerState::Shedding);
        assert_eq!(s.rx_dropped_count(RxDrop::BadChecksum), 2);
        assert_eq!(s.rx_dropped_count(RxDrop::SynRefused), 1);
        assert_eq!(s.rx_dropped_count(RxDrop::Truncated), 0);
        let l = set.load();
        assert_eq!((l.ops_total, l.connections, l.errors_total), (7, 1, 2));
    }

    #[test]
    fn beats_count_per_loop() {
        let beats = LoopBeats::new(3);
        beats.beat(1);
        beats.beat(1);
        beats.beat(2);
        beats.beat(7); // past the last loop: ignored
        let mut t = vec![99];
        beats.turns(&mut t);
        assert_eq!(t, [0, 2, 1]);
        assert_eq!(LoopBeats::new(0).loops(), 1);
    }
}
