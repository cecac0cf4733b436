//! One DOSP connection: its output buffer and its request state machine, sans IO.
//!
//! A session knows no socket. Its inputs are bytes received (lent by the port, see
//! [`Session::on_recv`]), the time (an `Instant` passed in by the loop) and the store's
//! completions ([`Session::on_store_event`]); its output is bytes to send
//! ([`Session::pending_output`], acknowledged with [`Session::output_sent`]).
//! [`Session::drive`] is the glue that moves bytes between a session and a
//! [`NetPort`] until the port would block or a bound is hit: the session decodes
//! pipelined requests in order, feeds STORE chunks straight from the port's receive
//! buffer into the store (the one copy, with MD5 in the same pass), and streams
//! RETRIEVE data from the store in pieces as the port drains, so no object is ever held
//! whole in memory and object bytes go from the buffer the store read into straight to
//! the port: the store lends its verified device buffers (or a cache entry) as a
//! [`Piece`], the session queues it after the bytes already in its output buffer,
//! sends from it, and gives it back once sent. The CPU never copies a RETRIEVE byte.
//!
//! Backpressure: while a response is streaming, the output buffer is above its high
//! mark, or a request waits for the store (a read, or a commit or delete waiting for
//! its flush), the session stops decoding (and so stops reading), and TCP flow control
//! pushes back on the client. Replies therefore stay in request order.
//!
//! The store is asynchronous: a session starts a read, a commit or a delete with its
//! own `user` value (its token) and goes on with other work; the loop hands it the
//! store's [`StoreEvent`] when the operation finished, and the session answers then.
//! A piece of a stream being read takes no room in the output buffer: once its bytes
//! are in and verified it is queued (`lent`) at the output's end, or, when the read
//! failed mid-stream, the output gets the zeros the promised length needs.
//!
//! Latency: each request's arrival time travels with its state (store, stream) and is
//! recorded in the node's histograms when its reply is queued — a STORE after its last
//! chunk, a stream with its final Out structure. A request abandoned by its client
//! (connection closed mid-STORE) has no reply and so no latency: it counts as
//! `stores_aborted` instead (see `NodeStats` for how everything is counted).
//!
//! Deadlines ([`Deadlines`], checked by the loop every 100 ms): a connection may not
//! hold its slot by trickling. A request's header and In structure must arrive within
//! `header` of their first byte; while the node waits on the peer mid-request (STORE
//! chunks to come in, a reply to be read) the connection must move
//! `rate_min_bytes_per_sec` bytes a second, measured over windows of `request`; and
//! silence is bounded by `request` mid-request and `idle` between requests.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dosp::codec::{encode_response, RequestDecoder, RequestEvent};
use dosp::wire::*;
use dosp::Fingerprint;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::auth::{gate, Gate};
use super::ops::{detail_of, locate_answer, small_op, status_of, Ctx};
use super::port::{ConnId, NetPort, RBUF_BYTES};
use super::shards::{Event, Locate, PageStart};
use crate::stats::{NodeStats, OpClass};
use crate::store::{Expect, ObjectMeta, Piece, ReadId, ReadStart, StoreError, StoreEvent, WriteId};

/// Stream data is produced in pieces of this size.
const PIECE_BYTES: usize = 256 * 1024;
/// Stop decoding new requests while this much output is waiting.
const OUT_HIGH: usize = 512 * 1024;
/// Slices handed to the port in one send: a reply of a small object is three (the
/// stream header, the object's bytes, the final Out); a large piece a few more (one
/// per extent it spans).
const IOV_MAX: usize = 8;
/// Steps of work per `drive` call, so one busy connection cannot starve the others.
/// A step is a pass that sends and produces output, a read that brought bytes, or a
/// decoded event (a request, a piece of STORE data).
const STEPS_MAX: usize = 64;

/// The time limits a session is held to (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Longest silence in the middle of a request; also the window over which
    /// `rate_min_bytes_per_sec` is measured.
    pub request: Duration,
    /// Longest silence between requests.
    pub idle: Duration,
    /// From the first byte of a request's header to the last byte of its In structure.
    pub header: Duration,
    /// Bytes per second a connection must move while the node waits on it in the
    /// middle of a request; 0 sets no minimum.
    pub rate_min_bytes_per_sec: u64,
}

/// Why a session was closed by a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// A request's header and In structure took longer than `header` to arrive.
    Header,
    /// Mid-request, the peer moved less than the minimum rate over a window.
    TooSlow,
    /// Silent longer than `request` in the middle of a request.
    Silent,
    /// Silent longer than `idle` between requests.
    Idle,
}

/// One connection's clock for the [`Deadlines`]: when bytes last moved and how many,
/// since when a request head has been arriving, and the rate window. DOSP sessions
/// and HTTP connections (`server/http.rs`) judge their peers with it alike.
#[derive(Debug, Clone, Copy)]
pub struct PeerClock {
    /// When bytes last moved in either direction.
    pub last_io: Instant,
    /// When the first byte of a request head still incomplete arrived.
    pub head_since: Option<Instant>,
    /// Bytes moved in either direction since the connection opened.
    moved: u64,
    /// Start of the current rate window, and `moved` then.
    window: (Instant, u64),
}

impl PeerClock {
    /// A connection opened at `now`.
    pub fn new(now: Instant) -> PeerClock {
        PeerClock {
            last_io: now,
            head_since: None,
            moved: 0,
            window: (now, 0),
        }
    }

    /// `n` bytes moved (either way) at `now`.
    pub fn moved(&mut self, now: Instant, n: usize) {
        if n > 0 {
            self.last_io = now;
            self.moved += n as u64;
        }
    }

    /// Whether the peer broke a deadline at `now`, and which. `on_store`: the node
    /// itself waits (a device read, a commit's flush, a staging buffer), so neither
    /// the rate nor the silence counts against the peer; `waiting_on_peer`: the node
    /// waits for the peer to send or to read, so the rate is measured;
    /// `mid_request`: silence counts against `d.request`, else against `d.idle`.
    /// Called every scan, which also moves the rate window along.
    pub fn check(
        &mut self,
        now: Instant,
        d: &Deadlines,
        on_store: bool,
        waiting_on_peer: bool,
        mid_request: bool,
    ) -> Option<Timeout> {
        if self
            .head_since
            .is_some_and(|t| now.saturating_duration_since(t) > d.header)
        {
            return Some(Timeout::Header);
        }
        if on_store {
            self.last_io = now;
            self.window = (now, self.moved);
            return None;
        }
        if !waiting_on_peer || d.rate_min_bytes_per_sec == 0 {
            self.window = (now, self.moved);
        } else {
            let elapsed = now.saturating_duration_since(self.window.0);
            if elapsed >= d.request {
                let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
                let need = d.rate_min_bytes_per_sec.saturating_mul(ms) / 1000;
                if self.moved - self.window.1 < need {
                    return Some(Timeout::TooSlow);
                }
                self.window = (now, self.moved);
            }
        }
        let quiet = now.saturating_duration_since(self.last_io);
        match mid_request {
            true if quiet > d.request => Some(Timeout::Silent),
            false if quiet > d.idle => Some(Timeout::Idle),
            _ => None,
        }
    }
}

impl Timeout {
    pub fn reason(self) -> &'static str {
        match self {
            Timeout::Header => "its request header took too long to arrive",
            Timeout::TooSlow => "it moved data slower than the minimum rate mid-request",
            Timeout::Silent => "it went quiet in the middle of a request",
            Timeout::Idle => "it was idle too long",
        }
    }
}

/// The output buffer of a session, pooled by the loop: [`BufPool`] holds at most one
/// per allowed connection, a new session takes one and a closed one gives it back, so
/// a warm node accepts and closes connections without allocating. (The receive buffer
/// is the port's: see `port.rs`.)
///
/// Memory: `connections_max` × ([`OUT_BYTES`] here + the kernel port's `RBUF_BYTES`)
/// = 1 MiB per connection at most (1 GiB at the default 1024). The pages of a buffer
/// are touched only as far as its connections have used them: a node whose
/// connections send small requests and fetch small objects keeps a few KiB resident.
#[derive(Debug)]
pub struct SessionBufs {
    out: Vec<u8>,
}

impl SessionBufs {
    /// The buffer, for an HTTP connection (`http.rs`), which shares the pool.
    pub(crate) fn into_out(self) -> Vec<u8> {
        self.out
    }

    /// A buffer an HTTP connection gives back.
    pub(crate) fn from_out(out: Vec<u8>) -> SessionBufs {
        SessionBufs { out }
    }
}

/// Output buffer capacity: the high mark, a stream piece and a reply.
pub const OUT_BYTES: usize = OUT_HIGH + PIECE_BYTES + 1024;

/// Session buffers for every allowed connection: at most `connections_max`,
/// each made the first time it is needed (so a node configured for 65536 connections
/// does not map 64 GiB at start-up) and reused from then on.
#[derive(Debug)]
pub struct BufPool {
    free: Vec<SessionBufs>,
    /// Pairs that may still be made.
    unmade: usize,
}

impl BufPool {
    pub fn new(connections_max: usize) -> BufPool {
        BufPool {
            free: Vec::with_capacity(connections_max),
            unmade: connections_max,
        }
    }

    /// A pair for a new session; `None` when every allowed connection has one.
    pub fn take(&mut self) -> Option<SessionBufs> {
        if let Some(b) = self.free.pop() {
            return Some(b);
        }
        if self.unmade == 0 {
            return None;
        }
        self.unmade -= 1;
        Some(SessionBufs {
            out: Vec::with_capacity(OUT_BYTES),
        })
    }

    pub fn give(&mut self, mut bufs: SessionBufs) {
        bufs.out.clear();
        self.free.push(bufs);
    }
}

/// What the loop should do with the session after `drive`.
#[derive(Debug, PartialEq, Eq)]
pub enum Drive {
    /// Waiting for the port (or the store).
    Idle,
    /// Hit its step bound with work left: drive again next turn.
    More,
    /// Done: close the connection and drop the session.
    Close,
}

#[derive(Debug)]
enum StoreState {
    None,
    Writing {
        request_id: u64,
        write: WriteId,
        started: Instant,
        /// What the client promised about the object, checked at commit.
        expect: Expect,
    },
    /// The STORE failed (or was refused) but its chunks must still be read to keep the
    /// connection in step; the reply goes out after the last chunk.
    Discarding {
        request_id: u64,
        status: Status,
        detail: u32,
        started: Instant,
    },
    /// Its announced size fits only after compaction: its chunks wait unread while the
    /// loop compacts that disk in bounded steps, then the write begins.
    AwaitingRoom {
        request_id: u64,
        size_hint: u64,
        started: Instant,
        expect: Expect,
    },
}

/// A request answered when the store says its record is durable.
#[derive(Debug)]
enum Waiting {
    None,
    Commit {
        request_id: u64,
        started: Instant,
    },
    Delete {
        request_id: u64,
        fp: Fingerprint,
        started: Instant,
    },
    /// A RETRIEVE or RANGE asked another loop where its object is.
    Lookup {
        request_id: u64,
        opcode: Opcode,
        fp: Fingerprint,
        range: Option<(u64, u64)>,
        started: Instant,
    },
    /// A LOCATE asked another loop.
    Locate {
        request_id: u64,
        fp: Fingerprint,
        started: Instant,
    },
}

#[derive(Debug)]
enum Outgoing {
    Object {
        request_id: u64,
        opcode: Opcode,
        fp: Fingerprint,
        next: u64,
        end: u64,
        object_len: u64,
        /// The loop whose shard holds the object.
        holder: u16,
        failed: Option<Status>,
        started: Instant,
        /// The stream header is not sent yet: the first piece decides between a
        /// stream and a plain error status.
        first: bool,
        /// The piece being read: its id and its length.
        inflight: Option<(ReadId, usize)>,
    },
    /// A walk over the index by cursor, a piece per turn: `promised` entries were
    /// announced in the stream header (the objects at the start), `sent` so far,
    /// `cursor` the last fingerprint sent in shard `shard` (the shards' ranges in
    /// turn, which is fingerprint order), `done` once the walk found no more.
    Contents {
        request_id: u64,
        promised: u64,
        sent: u64,
        shard: u16,
        cursor: Option<Fingerprint>,
        /// A page was asked of another loop and has not come.
        asked: bool,
        done: bool,
        started: Instant,
    },
}

/// One client connection.
pub struct Session {
    pub peer: SocketAddr,
    /// Bytes the port lent at the last `on_recv` that the session did not consume
    /// (part of a request): the port keeps them.
    unconsumed: usize,
    /// Those bytes start with a STORE request header whose StoreIn is not all here.
    unconsumed_store: bool,
    /// The last `on_recv` stopped because it needed more bytes (not at a bound, not
    /// backpressured): a FIN now ends the connection.
    needs_bytes: bool,
    /// Steps left in this `drive`: each decoded event after the first of an
    /// `on_recv` takes one.
    steps_left: usize,
    decoder: RequestDecoder,
    st: State,
    /// The deadlines' clock.
    clock: PeerClock,
}

struct State {
    /// This session's name in the store's events.
    user: u64,
    /// The loop's clock, as passed in at the latest entry point.
    now: Instant,
    out: Vec<u8>,
    out_pos: usize,
    /// Pieces lent by the store, in the order they go out, each after the output
    /// bytes before its `at`: sent straight from the store's buffers.
    lent: std::collections::VecDeque<Lent>,
    /// Pieces sent, to give back to the store at the next chance.
    spent: Vec<Piece>,
    /// A commit or delete waiting for its flush.
    waiting: Waiting,
    /// The last drive found the STORE waiting for a staging buffer.
    store_blocked: bool,
    store: StoreState,
    outgoing: Option<Outgoing>,
    /// Flush what is queued, then close (after a framing error or EOF).
    closing: bool,
    read_closed: bool,
    /// Requests in progress (a store, a stream), for the outstanding-ops gauge.
    busy: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(
        peer: SocketAddr,
        chunk_max: u32,
        user: u64,
        bufs: SessionBufs,
        now: Instant,
    ) -> Session {
        Session {
            peer,
            unconsumed: 0,
            unconsumed_store: false,
            needs_bytes: true,
            steps_left: 0,
            decoder: RequestDecoder::new(chunk_max),
            st: State {
                user,
                now,
                out: bufs.out,
                out_pos: 0,
                lent: std::collections::VecDeque::new(),
                spent: Vec::new(),
                waiting: Waiting::None,
                store_blocked: false,
                store: StoreState::None,
                outgoing: None,
                closing: false,
                read_closed: false,
                busy: false,
            },
            clock: PeerClock::new(now),
        }
    }

    /// Whether the peer broke a deadline, and which (see [`Deadlines`]). Called every
    /// scan (100 ms), which also moves the rate window along.
    ///
    /// The rate is measured only while the node waits on the peer: STORE chunks to
    /// come in (the loop reads them as fast as they arrive) or a reply to be read. A
    /// STORE path that ever pauses reading to wait for the store must say so
    /// (`waiting_on_store`), which restarts the window, so the peer is not blamed.
    pub fn timed_out(&mut self, now: Instant, d: &Deadlines) -> Option<Timeout> {
        let on_store = self.st.waiting_on_store();
        let waiting_on_peer = self.decoder.in_store() || self.st.unsent() > 0;
        // Silence: a stalled STORE otherwise holds a write slot and its staging buffer
        // forever.
        let mid_request =
            self.st.busy || self.decoder.in_store() || self.unconsumed > 0 || self.st.unsent() > 0;
        self.clock
            .check(now, d, on_store, waiting_on_peer, mid_request)
    }

    /// When the session last moved a byte, if it is between requests: nothing in
    /// flight either way, no partial request buffered. Such a session may be closed
    /// to make room for a new one without losing anything of a request.
    pub fn idle_since(&self) -> Option<Instant> {
        let between = !self.st.busy
            && !self.decoder.in_store()
            && self.clock.head_since.is_none()
            && self.unconsumed == 0
            && self.st.unsent() == 0;
        between.then_some(self.clock.last_io)
    }

    /// The session's buffers, for the pool, once it is closed.
    pub fn into_bufs(self) -> SessionBufs {
        SessionBufs { out: self.st.out }
    }

    /// Releases what the session holds in the store (an unfinished STORE is aborted:
    /// nothing half-written ever becomes visible) and counts a STORE it ends.
    pub fn close(&mut self, ctx: &mut Ctx<'_>) {
        match std::mem::replace(&mut self.st.store, StoreState::None) {
            StoreState::Writing { write, .. } => {
                ctx.store.abort(write);
                NodeStats::inc(&ctx.stats.stores_aborted);
            }
            StoreState::Discarding { .. } | StoreState::AwaitingRoom { .. } => {
                NodeStats::inc(&ctx.stats.stores_aborted)
            }
            StoreState::None => {
                if self.store_unstarted() {
                    NodeStats::inc(&ctx.stats.stores);
                    NodeStats::inc(&ctx.stats.stores_aborted);
                }
            }
        }
        // A read in flight finishes on the device anyway; the loop releases it when
        // its event finds no session. A commit or delete in flight completes durably
        // without anyone to tell. Lent pieces go back whether sent or not.
        let lent = self.st.lent.drain(..).map(|l| l.piece);
        for piece in self.st.spent.drain(..).chain(lent) {
            ctx.store.read_give(piece);
        }
        self.st.set_busy(ctx, false);
    }

    /// Whether the input not yet decoded starts with a STORE request whose StoreIn has
    /// not all arrived: a STORE its client gave up before it could begin.
    fn store_unstarted(&self) -> bool {
        !self.decoder.failed() && !self.decoder.in_store() && self.unconsumed_store
    }

    /// The next bytes to send, in order: queued replies and stream headers from the
    /// session's buffer up to the next lent piece, then that piece's bytes straight
    /// from the store's buffer, a part at a time. Empty when nothing is queued.
    pub fn pending_output(&self) -> &[u8] {
        let st = &self.st;
        match st.lent.front() {
            Some(l) if st.out_pos >= l.at => l.piece.slice_at(l.sent),
            Some(l) => &st.out[st.out_pos..l.at],
            None => &st.out[st.out_pos..],
        }
    }

    /// Up to `iov.len()` slices to send, in order, each non-empty: what
    /// [`Session::pending_output`] returns first, then what follows it (the rest of
    /// a lent piece, the output after it, the next piece). Returns how many it filled.
    pub fn pending_slices<'a>(&'a self, iov: &mut [io::IoSlice<'a>]) -> usize {
        let st = &self.st;
        let mut k = 0;
        let mut push = |s: &'a [u8]| {
            if !s.is_empty() && k < iov.len() {
                iov[k] = io::IoSlice::new(s);
                k += 1;
            }
            k < iov.len()
        };
        let mut pos = st.out_pos;
        for l in &st.lent {
            if !push(&st.out[pos.min(l.at)..l.at]) {
                return k;
            }
            pos = pos.max(l.at);
            let mut skip = l.sent;
            for s in l.piece.slices() {
                let rest = &s[skip.min(s.len())..];
                skip -= skip.min(s.len());
                if !push(rest) {
                    return k;
                }
            }
        }
        push(&st.out[pos..]);
        k
    }

    /// The port took the first `n` bytes of [`Session::pending_slices`] (and so of
    /// [`Session::pending_output`]).
    pub fn output_sent(&mut self, ctx: &Ctx<'_>, now: Instant, n: usize) {
        self.st.now = now;
        let mut left = n;
        let mut sent = 0;
        while left > 0 {
            let take = left.min(self.pending_output().len());
            if take == 0 {
                break;
            }
            self.st.consume(take);
            left -= take;
            sent += take;
        }
        NodeStats::add(&ctx.stats.bytes_out, sent as u64);
        self.clock.moved(now, sent);
    }

    /// `n` bytes arrived from the peer (they are lent through `on_recv`).
    pub fn on_arrived(&mut self, ctx: &Ctx<'_>, now: Instant, n: usize) {
        NodeStats::add(&ctx.stats.bytes_in, n as u64);
        self.clock.moved(now, n);
    }

    /// The peer closed its side: no more bytes will come. Requests already received
    /// are still handled; once the session needs bytes it finishes what is queued,
    /// then closes.
    pub fn on_peer_closed(&mut self) {
        self.st.read_closed = true;
        if self.needs_bytes {
            self.st.closing = true;
        }
    }

    /// Produces more of a streaming response when the output has room and no piece is
    /// being read, and lets a STORE waiting for room begin. Returns (progress, blocked
    /// on the store: drive again next turn even without an event).
    pub fn advance(&mut self, ctx: &mut Ctx<'_>, now: Instant) -> (bool, bool) {
        self.st.now = now;
        let mut progress = false;
        for piece in self.st.spent.drain(..) {
            ctx.store.read_give(piece);
        }
        let pending = self.st.unsent();
        if self.st.outgoing.is_some() && pending < OUT_HIGH && !self.st.reading() {
            self.st.produce(ctx);
            progress = true;
        }
        (progress, self.gate(ctx))
    }

    /// Whether a STORE waits for room or a staging buffer the store cannot spare (then
    /// nothing is decoded; the loop drives the session again). Records it for the
    /// timeouts.
    fn gate(&mut self, ctx: &mut Ctx<'_>) -> bool {
        if let StoreState::AwaitingRoom { .. } = self.st.store {
            self.st.begin_when_room(ctx);
        }
        let store_full = match self.st.store {
            StoreState::Writing { write, .. } => !ctx.store.can_append(write, RBUF_BYTES),
            StoreState::AwaitingRoom { .. } => true,
            _ => false,
        };
        self.st.store_blocked = store_full;
        store_full
    }

    /// Whether the session decodes input now: not backpressured (a response
    /// streaming, the output above its high mark), not waiting for the store, not
    /// closing. (Reads stop with decoding, and TCP flow control pushes back.)
    pub fn wants_input(&self) -> bool {
        !self.st.closing
            && self.st.outgoing.is_none()
            && matches!(self.st.waiting, Waiting::None)
            && !self.st.store_blocked
            && self.st.unsent() < OUT_HIGH
    }

    /// Decodes and handles requests (and STORE data) from the front of `data`, the
    /// bytes received and not consumed yet, for as long as [`Session::wants_input`]
    /// and the step bound allow (one event, and one more per step left in the
    /// current [`Session::drive`]). Returns how many bytes it consumed; the port keeps
    /// the rest and lends them again.
    pub fn on_recv(&mut self, ctx: &mut Ctx<'_>, now: Instant, data: &[u8]) -> usize {
        self.st.now = now;
        self.needs_bytes = false;
        let mut at = 0;
        for event in 0.. {
            if event > 0 {
                if self.steps_left == 0 {
                    break;
                }
                self.steps_left -= 1;
            }
            if !self.wants_input() || self.gate(ctx) {
                break;
            }
            match self.decoder.decode(&data[at..]) {
                Ok(Some((event, n))) => {
                    if matches!(event, RequestEvent::Request { .. }) {
                        self.clock.head_since = None;
                    }
                    at += n;
                    self.st.handle(ctx, event);
                }
                Ok(None) => {
                    // Part of a request header is here: its deadline runs.
                    if self.clock.head_since.is_none()
                        && at < data.len()
                        && !self.decoder.in_store()
                    {
                        self.clock.head_since = Some(now);
                    }
                    self.needs_bytes = true;
                    if self.st.read_closed {
                        self.st.closing = true;
                    }
                    break;
                }
                Err(e) => {
                    self.st.framing_error(ctx, e, self.peer);
                    break;
                }
            }
        }
        let rest = &data[at..];
        self.unconsumed = rest.len();
        self.unconsumed_store = !self.decoder.in_store()
            && Header::read_from_prefix(rest).is_ok_and(|(h, _)| {
                h.check(Kind::Request).is_ok() && h.opcode() == Some(Opcode::Store)
            });
        at
    }

    /// Whether the session is done: closing, nothing in flight, everything sent.
    pub fn finished(&self) -> bool {
        self.st.closing
            && self.st.outgoing.is_none()
            && matches!(self.st.waiting, Waiting::None)
            && self.st.unsent() == 0
    }

    /// Moves bytes between the session and `port` until the port would block, the
    /// work runs out or the step bound is hit.
    pub fn drive<P: NetPort>(
        &mut self,
        port: &mut P,
        conn: ConnId,
        ctx: &mut Ctx<'_>,
        now: Instant,
    ) -> Drive {
        let mut blocked = false;
        self.steps_left = STEPS_MAX;
        while self.steps_left > 0 {
            self.steps_left -= 1;
            let mut progress = false;

            // 1. Send what is queued: replies from the output buffer and object bytes
            // from the store's lent buffers, in order, in one call.
            let mut iov = [io::IoSlice::new(&[]); IOV_MAX];
            let k = self.pending_slices(&mut iov);
            if k > 0 {
                match port.send_vectored(conn, &iov[..k]) {
                    Ok(0) => return Drive::Close,
                    Ok(n) => {
                        self.output_sent(ctx, now, n);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Drive::Close,
                }
            }

            // 2. Produce more of a streaming response; let a waiting STORE begin.
            let (p, b) = self.advance(ctx, now);
            progress |= p;
            blocked |= b;

            // 3. Decode requests from what the port received, reading more.
            if self.wants_input() {
                let mut consumed = 0;
                match port.recv(conn, |buf| {
                    consumed = self.on_recv(ctx, now, buf);
                    consumed
                }) {
                    Ok(got) => {
                        self.on_arrived(ctx, now, got.arrived);
                        if got.arrived > 0 {
                            self.steps_left = self.steps_left.saturating_sub(1);
                        }
                        progress |= got.arrived > 0 || consumed > 0;
                        if got.peer_closed && !self.st.read_closed {
                            self.on_peer_closed();
                            progress = true;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Drive::Close,
                }
                // A framing error closes; its answer still goes out.
                progress |= self.st.closing;
            }

            if self.finished() {
                return Drive::Close;
            }
            if !progress {
                return if blocked { Drive::More } else { Drive::Idle };
            }
        }
        Drive::More
    }

    /// Hands the session what the store finished for it; the loop drives it next.
    pub fn on_store_event(&mut self, ctx: &mut Ctx<'_>, now: Instant, ev: Event) {
        self.st.now = now;
        match ev {
            Event::Store(ev) => self.st.on_store_event(ctx, ev),
            Event::Located { found, .. } => self.st.on_located(ctx, found),
            Event::Page { page, end, .. } => self.st.on_page(ctx, &page, end),
        }
    }
}

/// Refuses a STORE up front when its announced size is over the object size limit
/// (TOO_LARGE, detail = the announced size in MiB, rounded up, saturated at u32::MAX:
/// a byte count need not fit in the detail). The chunks are still read, and the reply
/// follows the last. Room is not judged here: a STORE no disk has room for is still
/// read and hashed (`Store::begin_for`), so that an object the node holds already gets
/// a reference; any other gets NO_SPACE after its last chunk.
fn early_refusal(ctx: &Ctx<'_>, size_hint: u64) -> Option<(Status, u32)> {
    let max = ctx.store.config().max_object_bytes;
    (size_hint > max).then(|| {
        (
            Status::TooLarge,
            u32::try_from(size_hint.div_ceil(1 << 20)).unwrap_or(u32::MAX),
        )
    })
}

/// A piece lent by the store, queued for the socket after the output bytes before
/// `at`; `sent` of its bytes are gone.
struct Lent {
    at: usize,
    piece: Piece,
    sent: usize,
}

impl State {
    /// Bytes queued and not sent yet: in the output buffer and in lent pieces.
    fn unsent(&self) -> usize {
        let lent: usize = self.lent.iter().map(|l| l.piece.len() - l.sent).sum();
        self.out.len() - self.out_pos + lent
    }

    /// `n` bytes of the slice [`Session::pending_output`] returns were sent.
    fn consume(&mut self, n: usize) {
        match self.lent.front_mut() {
            Some(l) if self.out_pos >= l.at => {
                l.sent += n;
                if l.sent >= l.piece.len() {
                    if let Some(l) = self.lent.pop_front() {
                        self.spent.push(l.piece);
                    }
                }
            }
            _ => self.out_pos += n,
        }
        if self.out_pos == self.out.len() && !self.out.is_empty() {
            // Pieces still queued all sit at the end of what was sent.
            for l in self.lent.iter_mut() {
                l.at -= self.out_pos.min(l.at);
            }
            self.out.clear();
            self.out_pos = 0;
        }
    }

    /// Queues a piece of object bytes after everything in the output buffer.
    fn send_piece(&mut self, ctx: &mut Ctx<'_>, piece: Piece) {
        if piece.is_empty() {
            return ctx.store.read_give(piece);
        }
        self.lent.push_back(Lent {
            at: self.out.len(),
            piece,
            sent: 0,
        });
    }

    fn set_busy(&mut self, ctx: &Ctx<'_>, busy: bool) {
        if busy != self.busy {
            self.busy = busy;
            if busy {
                NodeStats::inc(&ctx.stats.ops_outstanding);
            } else {
                NodeStats::dec(&ctx.stats.ops_outstanding);
            }
        }
    }

    /// Records a request's latency, from its arrival to now (its reply is queued).
    fn done(ctx: &Ctx<'_>, op: OpClass, started: Instant, now: Instant) {
        ctx.stats
            .latency(op)
            .record(now.saturating_duration_since(started));
    }

    fn reply(&mut self, ctx: &Ctx<'_>, opcode: u16, request_id: u64, body: &[u8]) {
        encode_response(&mut self.out, opcode, request_id, &[body]);
        NodeStats::inc(&ctx.stats.ops_total);
    }

    fn reply_error(
        &mut self,
        ctx: &Ctx<'_>,
        opcode: u16,
        request_id: u64,
        status: Status,
        detail: u32,
    ) {
        NodeStats::error(ctx.stats, status);
        self.reply(
            ctx,
            opcode,
            request_id,
            OutHead::new(status, detail).as_bytes(),
        );
    }

    /// Bytes that cannot be framed: say why once, then close. An unfinished STORE is
    /// answered (and aborted) first so the client learns what happened to it.
    fn framing_error(&mut self, ctx: &mut Ctx<'_>, e: WireError, peer: SocketAddr) {
        // BAD_REQUEST and BAD_VERSION count as bad requests with their reply.
        if e.status() == Status::TooLarge {
            NodeStats::inc(&ctx.stats.bad_requests);
        }
        tracing::warn!(%peer, error = %e, "closing connection after malformed input");
        let (opcode, request_id, store_started) =
            match std::mem::replace(&mut self.store, StoreState::None) {
                StoreState::Writing {
                    request_id,
                    write,
                    started,
                    ..
                } => {
                    ctx.store.abort(write);
                    NodeStats::inc(&ctx.stats.stores_aborted);
                    (Opcode::Store as u16, request_id, Some(started))
                }
                StoreState::Discarding {
                    request_id,
                    started,
                    ..
                } => {
                    NodeStats::inc(&ctx.stats.stores_aborted);
                    (Opcode::Store as u16, request_id, Some(started))
                }
                StoreState::AwaitingRoom {
                    request_id,
                    started,
                    ..
                } => {
                    NodeStats::inc(&ctx.stats.stores_aborted);
                    (Opcode::Store as u16, request_id, Some(started))
                }
                StoreState::None => (Opcode::Null as u16, 0, None),
            };
        self.reply_error(ctx, opcode, request_id, e.status(), e.detail());
        // An unfinished STORE got its (error) reply: it ends here.
        if let Some(started) = store_started {
            State::done(ctx, OpClass::Store, started, self.now);
        }
        self.set_busy(ctx, false);
        self.closing = true;
    }

    fn handle(&mut self, ctx: &mut Ctx<'_>, event: RequestEvent<'_>) {
        match event {
            RequestEvent::Request {
                header,
                opcode,
                body,
            } => {
                let id = header.request_id.get();
                // The request has just been decoded: its latency counts from here.
                let started = self.now;
                let body = match gate(ctx.id.auth.as_deref(), &header, opcode, body) {
                    Ok(inner) => inner,
                    Err(refusal) => return self.refuse(ctx, &header, opcode, refusal, started),
                };
                match opcode {
                    Err(raw) => {
                        NodeStats::inc(&ctx.stats.unknown_opcodes);
                        self.reply_error(ctx, raw, id, Status::UnknownOpcode, u32::from(raw));
                        State::done(ctx, OpClass::Other, started, self.now);
                    }
                    Ok(Opcode::Store) => self.start_store(ctx, id, body, started),
                    Ok(op @ (Opcode::Retrieve | Opcode::RetrieveRange)) => {
                        self.start_retrieve(ctx, op, id, body, started)
                    }
                    Ok(Opcode::GetContents) => self.start_contents(ctx, id, body, started),
                    Ok(Opcode::Delete) => self.start_delete(ctx, id, body, started),
                    Ok(Opcode::Locate) => self.start_locate(ctx, id, body, started),
                    Ok(op) => {
                        let at = self.out.len();
                        self.out.extend_from_slice(Header::new_zeroed().as_bytes());
                        small_op(ctx, op, body, &mut self.out);
                        let len = (self.out.len() - at - Header::SIZE) as u32;
                        let h = Header::new(Kind::Response, op, id, len, 0);
                        self.out[at..at + Header::SIZE].copy_from_slice(h.as_bytes());
                        NodeStats::inc(&ctx.stats.ops_total);
                        State::done(ctx, OpClass::Other, started, self.now);
                    }
                }
            }
            RequestEvent::Chunk { data, last, .. } => {
                if let StoreState::Writing {
                    request_id,
                    write,
                    started,
                    ..
                } = self.store
                {
                    if let Err(e) = ctx.store.append(write, data) {
                        // The store aborts the write on error; keep draining chunks.
                        let status = status_of(&e);
                        tracing::debug!(error = %e, "store failed mid-stream");
                        self.store = StoreState::Discarding {
                            request_id,
                            status,
                            detail: 0,
                            started,
                        };
                    }
                }
                if last {
                    self.finish_store(ctx);
                }
            }
            RequestEvent::OversizedChunk { len } => {
                // The decoder skips the chunk's bytes (its header's checksum vouches
                // for the length), so the connection stays in step; the STORE fails
                // and is answered after its last chunk. A STORE already failing keeps
                // its first error.
                if let StoreState::Writing {
                    request_id,
                    write,
                    started,
                    ..
                } = self.store
                {
                    ctx.store.abort(write);
                    self.store = StoreState::Discarding {
                        request_id,
                        status: Status::TooLarge,
                        detail: len,
                        started,
                    };
                }
            }
        }
    }

    /// Answers a request the signature gate refused (dosp/PROTOCOL.md §7); nothing of
    /// it is carried out. A STORE's chunks follow it on the connection: they are read
    /// and dropped, and the refusal is answered after the last, like any failed STORE.
    fn refuse(
        &mut self,
        ctx: &mut Ctx<'_>,
        header: &Header,
        opcode: Result<Opcode, u16>,
        refusal: Gate,
        started: Instant,
    ) {
        let (status, detail) = match refusal {
            Gate::Malformed(len) => (Status::BadRequest, len),
            Gate::Refused(reason) => {
                ctx.stats.auth_failed(reason);
                tracing::debug!(%reason, "request refused: AUTH_FAILED");
                (Status::AuthFailed, reason.code())
            }
        };
        let request_id = header.request_id.get();
        if opcode == Ok(Opcode::Store) {
            self.set_busy(ctx, true);
            NodeStats::inc(&ctx.stats.stores);
            self.store = StoreState::Discarding {
                request_id,
                status,
                detail,
                started,
            };
            return;
        }
        self.reply_error(ctx, header.opcode.get(), request_id, status, detail);
        State::done(ctx, OpClass::Other, started, self.now);
    }

    fn start_store(&mut self, ctx: &mut Ctx<'_>, request_id: u64, body: &[u8], started: Instant) {
        self.set_busy(ctx, true);
        NodeStats::inc(&ctx.stats.stores);
        self.store = match parse_exact::<StoreIn>(Opcode::Store, body) {
            Err(_) => StoreState::Discarding {
                request_id,
                status: Status::BadRequest,
                detail: body.len() as u32,
                started,
            },
            Ok(req) if req.unknown_flags() != 0 => StoreState::Discarding {
                request_id,
                status: Status::BadRequest,
                detail: req.flags.get(),
                started,
            },
            Ok(req) => match early_refusal(ctx, req.announced_len()) {
                Some((status, detail)) => StoreState::Discarding {
                    request_id,
                    status,
                    detail,
                    started,
                },
                None => {
                    let hint = req.announced_len();
                    let expect = Expect {
                        md5: req.expect_md5(),
                        len: req.expect_len(),
                    };
                    if let crate::store::Room::AfterCompacting(disk) = ctx.store.room_for(hint) {
                        ctx.store.compact_soon(disk);
                        self.store = StoreState::AwaitingRoom {
                            request_id,
                            size_hint: hint,
                            started,
                            expect,
                        };
                        return;
                    }
                    self.begin(ctx, request_id, hint, expect, started)
                }
            },
        };
    }

    fn begin(
        &mut self,
        ctx: &mut Ctx<'_>,
        request_id: u64,
        hint: u64,
        expect: Expect,
        started: Instant,
    ) -> StoreState {
        match ctx.store.begin_for(hint) {
            Ok(write) => StoreState::Writing {
                request_id,
                write,
                started,
                expect,
            },
            Err(e) => StoreState::Discarding {
                request_id,
                status: status_of(&e),
                detail: 0,
                started,
            },
        }
    }

    /// A STORE waiting for room begins once compaction made it (or can do no more:
    /// then the write begins anyway, and only hashes if it finds no room, in case it
    /// is a duplicate).
    fn begin_when_room(&mut self, ctx: &mut Ctx<'_>) {
        let StoreState::AwaitingRoom {
            request_id,
            size_hint,
            started,
            expect,
        } = self.store
        else {
            return;
        };
        let waiting = matches!(
            ctx.store.room_for(size_hint),
            crate::store::Room::AfterCompacting(_)
        ) && ctx.store.compacting();
        if !waiting {
            self.store = self.begin(ctx, request_id, size_hint, expect, started);
        }
    }

    fn finish_store(&mut self, ctx: &mut Ctx<'_>) {
        let (request_id, result, started) =
            match std::mem::replace(&mut self.store, StoreState::None) {
                StoreState::Writing {
                    request_id,
                    write,
                    started,
                    expect,
                } => match ctx.store.commit_start(write, &expect, self.user) {
                    // The answer comes with the store's event, once durable.
                    Ok(()) => {
                        self.waiting = Waiting::Commit {
                            request_id,
                            started,
                        };
                        return;
                    }
                    Err(e) => (request_id, Err((status_of(&e), detail_of(&e))), started),
                },
                StoreState::Discarding {
                    request_id,
                    status,
                    detail,
                    started,
                } => (request_id, Err((status, detail)), started),
                // Its chunks are never decoded while it waits; should it end anyway,
                // it ends with nothing committed.
                StoreState::AwaitingRoom {
                    request_id,
                    started,
                    ..
                } => (request_id, Err((Status::NoSpace, 0)), started),
                StoreState::None => return,
            };
        self.answer_store(ctx, request_id, result, started);
    }

    fn answer_store(
        &mut self,
        ctx: &mut Ctx<'_>,
        request_id: u64,
        result: Result<crate::store::Committed, (Status, u32)>,
        started: Instant,
    ) {
        match result {
            Ok(c) => {
                let out = StoreOut {
                    head: OutHead::new(Status::Success, 0),
                    fingerprint: c.fingerprint,
                    len: c.len.into(),
                    disk: c.disk.0.into(),
                    deduplicated: u8::from(c.deduplicated),
                    reserved: 0,
                    refcount: c.refcount.into(),
                };
                self.reply(ctx, Opcode::Store as u16, request_id, out.as_bytes());
            }
            Err((status, detail)) => {
                self.reply_error(ctx, Opcode::Store as u16, request_id, status, detail)
            }
        }
        State::done(ctx, OpClass::Store, started, self.now);
        self.set_busy(ctx, false);
    }

    /// DELETE: the reference record is appended now and the answer follows when it
    /// is durable (group commit, like a STORE's).
    fn start_delete(&mut self, ctx: &mut Ctx<'_>, request_id: u64, body: &[u8], started: Instant) {
        NodeStats::inc(&ctx.stats.deletes);
        let fp = match parse_exact::<DeleteIn>(Opcode::Delete, body) {
            Ok(req) => req.fingerprint,
            Err(_) => {
                self.reply_error(
                    ctx,
                    Opcode::Delete as u16,
                    request_id,
                    Status::BadRequest,
                    body.len() as u32,
                );
                return State::done(ctx, OpClass::Delete, started, self.now);
            }
        };
        match ctx.store.delete_start(&fp, self.user) {
            Ok(()) => {
                self.set_busy(ctx, true);
                self.waiting = Waiting::Delete {
                    request_id,
                    fp,
                    started,
                };
            }
            Err(e) => {
                self.reply_error(ctx, Opcode::Delete as u16, request_id, status_of(&e), 0);
                State::done(ctx, OpClass::Delete, started, self.now);
            }
        }
    }

    fn answer_delete(
        &mut self,
        ctx: &mut Ctx<'_>,
        request_id: u64,
        fp: Fingerprint,
        result: Result<u32, StoreError>,
        started: Instant,
    ) {
        match result {
            Ok(left) => {
                let reply = DeleteOut {
                    head: OutHead::new(Status::Success, 0),
                    fingerprint: fp,
                    refcount: left.into(),
                    reserved: 0.into(),
                };
                self.reply(ctx, Opcode::Delete as u16, request_id, reply.as_bytes());
            }
            Err(e) => self.reply_error(ctx, Opcode::Delete as u16, request_id, status_of(&e), 0),
        }
        State::done(ctx, OpClass::Delete, started, self.now);
        self.set_busy(ctx, false);
    }

    /// Whether the session waits for the store rather than for its peer.
    fn waiting_on_store(&self) -> bool {
        self.reading()
            || !matches!(self.waiting, Waiting::None)
            || self.store_blocked
            || matches!(self.store, StoreState::AwaitingRoom { .. })
    }

    /// Whether the streaming response waits for a piece being read (or a page of
    /// the index asked of another loop).
    fn reading(&self) -> bool {
        matches!(
            self.outgoing,
            Some(Outgoing::Object {
                inflight: Some(_),
                ..
            }) | Some(Outgoing::Contents { asked: true, .. })
        )
    }

    fn on_store_event(&mut self, ctx: &mut Ctx<'_>, ev: StoreEvent) {
        match ev {
            StoreEvent::Committed { result, .. } => {
                if let Waiting::Commit {
                    request_id,
                    started,
                } = std::mem::replace(&mut self.waiting, Waiting::None)
                {
                    let result = result.map_err(|e| (status_of(&e), 0));
                    self.answer_store(ctx, request_id, result, started);
                }
            }
            StoreEvent::Deleted { result, .. } => {
                if let Waiting::Delete {
                    request_id,
                    fp,
                    started,
                } = std::mem::replace(&mut self.waiting, Waiting::None)
                {
                    self.answer_delete(ctx, request_id, fp, result, started);
                }
            }
            StoreEvent::Read { id, .. } => {
                let Some(Outgoing::Object {
                    inflight: Some((want, n)),
                    ..
                }) = &mut self.outgoing
                else {
                    ctx.store.read_release(id);
                    return;
                };
                if *want != id {
                    ctx.store.read_release(id);
                    return;
                }
                let n = *n;
                let result = ctx.store.read_take(id);
                if let Some(Outgoing::Object { inflight, .. }) = &mut self.outgoing {
                    *inflight = None;
                }
                self.piece_done(ctx, n, result.map(Some));
            }
        }
    }

    /// LOCATE over TCP: answered at once when this loop knows, else when the loop
    /// that does has answered.
    fn start_locate(&mut self, ctx: &mut Ctx<'_>, request_id: u64, body: &[u8], started: Instant) {
        let Ok(q) = parse_exact::<LocateIn>(Opcode::Locate, body) else {
            self.reply_error(
                ctx,
                Opcode::Locate as u16,
                request_id,
                Status::BadRequest,
                body.len() as u32,
            );
            return State::done(ctx, OpClass::Other, started, self.now);
        };
        let fp = q.fingerprint;
        match ctx.store.locate(&fp, self.user) {
            Locate::Now(found) => self.answer_locate(ctx, request_id, fp, found, started),
            Locate::Later => {
                self.set_busy(ctx, true);
                self.waiting = Waiting::Locate {
                    request_id,
                    fp,
                    started,
                };
            }
        }
    }

    fn answer_locate(
        &mut self,
        ctx: &mut Ctx<'_>,
        request_id: u64,
        fp: Fingerprint,
        found: Option<(u16, ObjectMeta)>,
        started: Instant,
    ) {
        match found {
            Some((_, meta)) => {
                let answer = locate_answer(ctx, &fp, &meta);
                self.reply(ctx, Opcode::Locate as u16, request_id, answer.as_bytes());
            }
            None => self.reply_error(ctx, Opcode::Locate as u16, request_id, Status::NotFound, 0),
        }
        State::done(ctx, OpClass::Other, started, self.now);
        self.set_busy(ctx, false);
    }

    /// Another loop answered a lookup.
    fn on_located(&mut self, ctx: &mut Ctx<'_>, found: Option<(u16, ObjectMeta)>) {
        match std::mem::replace(&mut self.waiting, Waiting::None) {
            Waiting::Lookup {
                request_id,
                opcode,
                fp,
                range,
                started,
            } => self.retrieve_located(ctx, opcode, request_id, fp, range, started, found),
            Waiting::Locate {
                request_id,
                fp,
                started,
            } => self.answer_locate(ctx, request_id, fp, found, started),
            other => self.waiting = other,
        }
    }

    fn start_retrieve(
        &mut self,
        ctx: &mut Ctx<'_>,
        op: Opcode,
        request_id: u64,
        body: &[u8],
        started: Instant,
    ) {
        NodeStats::inc(&ctx.stats.retrieves);
        // Every early answer below ends the request; the streamed one ends in `produce`.
        let early = |st: &mut State, ctx: &Ctx<'_>, status: Status, body: &[u8]| {
            NodeStats::error(ctx.stats, status);
            st.reply(ctx, op as u16, request_id, body);
            State::done(ctx, OpClass::Retrieve, started, st.now);
        };
        let parsed = if op == Opcode::Retrieve {
            parse_exact::<RetrieveIn>(op, body).map(|r| (r.fingerprint, None))
        } else {
            parse_exact::<RangeIn>(op, body)
                .map(|r| (r.fingerprint, Some((r.offset.get(), r.len.get()))))
        };
        let Ok((fp, range)) = parsed else {
            let head = OutHead::new(Status::BadRequest, body.len() as u32);
            return early(self, ctx, Status::BadRequest, head.as_bytes());
        };
        let found = match ctx.store.locate(&fp, self.user) {
            Locate::Now(found) => found,
            Locate::Later => {
                self.set_busy(ctx, true);
                self.waiting = Waiting::Lookup {
                    request_id,
                    opcode: op,
                    fp,
                    range,
                    started,
                };
                return;
            }
        };
        self.retrieve_located(ctx, op, request_id, fp, range, started, found);
    }

    /// A RETRIEVE or RANGE whose object was looked up: stream it from its holder, or
    /// answer why not.
    #[allow(clippy::too_many_arguments)]
    fn retrieve_located(
        &mut self,
        ctx: &mut Ctx<'_>,
        op: Opcode,
        request_id: u64,
        fp: Fingerprint,
        range: Option<(u64, u64)>,
        started: Instant,
        found: Option<(u16, ObjectMeta)>,
    ) {
        let early = |st: &mut State, ctx: &Ctx<'_>, status: Status, body: &[u8]| {
            NodeStats::error(ctx.stats, status);
            st.reply(ctx, op as u16, request_id, body);
            State::done(ctx, OpClass::Retrieve, started, st.now);
            st.set_busy(ctx, false);
        };
        let Some((holder, meta)) = found else {
            let out = RetrieveOut {
                head: OutHead::new(Status::NotFound, 0),
                fingerprint: fp,
                object_len: 0.into(),
            };
            return early(self, ctx, Status::NotFound, out.as_bytes());
        };
        let (next, end) = match range {
            None => (0, meta.len),
            Some((offset, len)) => match offset.checked_add(len) {
                Some(end) if end <= meta.len => (offset, end),
                _ => {
                    let out = RetrieveOut {
                        head: OutHead::new(Status::OutOfRange, 0),
                        fingerprint: fp,
                        object_len: meta.len.into(),
                    };
                    return early(self, ctx, Status::OutOfRange, out.as_bytes());
                }
            },
        };
        // The first piece is read before the stream is announced, so an object on a
        // failed or offline disk gets a plain error status instead of a stream of
        // nothing.
        self.set_busy(ctx, true);
        self.outgoing = Some(Outgoing::Object {
            request_id,
            opcode: op,
            fp,
            next,
            end,
            object_len: meta.len,
            holder,
            failed: None,
            started,
            first: true,
            inflight: None,
        });
        self.request_piece(ctx);
    }

    /// Starts reading the next piece of the object being streamed; the store lends
    /// its bytes when they are in ([`State::piece_done`]). A cache hit completes it at
    /// once.
    fn request_piece(&mut self, ctx: &mut Ctx<'_>) {
        let Some(Outgoing::Object {
            fp,
            next,
            end,
            failed,
            holder,
            ..
        }) = &self.outgoing
        else {
            return;
        };
        let (fp, next, end, failed, holder) = (*fp, *next, *end, failed.is_some(), *holder);
        let n = PIECE_BYTES.min((end - next) as usize);
        if n == 0 || failed {
            // Nothing to read (an empty object), or the stream already failed: the
            // promised length is filled with zeros.
            return self.piece_done(ctx, n, Ok(None));
        }
        let user = self.user;
        match ctx.store.read_start(holder, &fp, next, n, user) {
            Ok(ReadStart::Ready(piece)) => self.piece_done(ctx, n, Ok(Some(piece))),
            Ok(ReadStart::Pending(id)) => {
                if let Some(Outgoing::Object { inflight, .. }) = &mut self.outgoing {
                    *inflight = Some((id, n));
                }
            }
            Err(e) => self.piece_done(ctx, n, Err(e)),
        }
    }

    /// A piece is in (or failed): announce the stream after a good first piece, or
    /// answer with a plain error after a failed first piece; a later piece that fails
    /// is sent as zeros (the length is promised) and the final status says why. A
    /// good piece (`Some`, lent by the store) is queued to be sent as it is; `None` is
    /// a piece of zeros (an empty object, or a stream that failed before).
    fn piece_done(
        &mut self,
        ctx: &mut Ctx<'_>,
        n: usize,
        result: Result<Option<Piece>, StoreError>,
    ) {
        // A store never lends a piece of another length; should one, it is not sent.
        let result = match result {
            Ok(Some(p)) if p.len() != n => {
                ctx.store.read_give(p);
                Err(StoreError::Format("read lent the wrong length".into()))
            }
            other => other,
        };
        let Some(Outgoing::Object {
            request_id,
            opcode,
            fp,
            next,
            end,
            failed,
            first,
            started,
            ..
        }) = &mut self.outgoing
        else {
            if let Ok(Some(p)) = result {
                ctx.store.read_give(p);
            }
            return;
        };
        let piece = match result {
            Ok(piece) => piece,
            Err(e) => {
                if matches!(e, StoreError::Corrupt { .. }) {
                    NodeStats::inc(&ctx.stats.checksum_mismatches);
                }
                let status = status_of(&e);
                if *first {
                    let (op, id, started) = (*opcode, *request_id, *started);
                    self.outgoing = None;
                    NodeStats::error(ctx.stats, status);
                    let body = OutHead::new(status, 0);
                    self.reply(ctx, op as u16, id, body.as_bytes());
                    State::done(ctx, OpClass::Retrieve, started, self.now);
                    self.set_busy(ctx, false);
                    return;
                }
                tracing::error!(fp = %fp, error = %e, "read failed mid-stream");
                *failed = Some(status);
                None
            }
        };
        if *first {
            let h = StreamHeader::new(*request_id, *end - *next);
            self.out.extend_from_slice(h.as_bytes());
            *first = false;
        }
        *next += n as u64;
        let last = *next == *end;
        match piece {
            Some(p) => self.send_piece(ctx, p),
            None => self.out.resize(self.out.len() + n, 0),
        }
        // A small object fits in the first piece: append its Out now so the whole
        // reply is queued at once (header, lent bytes, Out) and the client wakes once.
        if last {
            self.produce(ctx);
        }
    }

    /// A page of the index walk came from another loop.
    fn on_page(
        &mut self,
        ctx: &mut Ctx<'_>,
        page: &[(Fingerprint, crate::store::DiskId)],
        end: bool,
    ) {
        let Some(Outgoing::Contents {
            promised,
            sent,
            shard,
            cursor,
            asked,
            done,
            ..
        }) = &mut self.outgoing
        else {
            return;
        };
        if !*asked {
            return;
        }
        *asked = false;
        let room = (*promised - *sent) as usize;
        for (fp, disk) in page.iter().take(room) {
            let e = ContentsEntry {
                fingerprint: *fp,
                disk: disk.0.into(),
                reserved: 0.into(),
            };
            self.out.extend_from_slice(e.as_bytes());
            *cursor = Some(*fp);
        }
        *sent += page.len().min(room) as u64;
        if end {
            *shard += 1;
            *cursor = None;
            *done = *shard >= ctx.store.loops();
        }
        self.produce(ctx);
    }

    fn start_contents(
        &mut self,
        ctx: &mut Ctx<'_>,
        request_id: u64,
        body: &[u8],
        started: Instant,
    ) {
        if parse_exact::<ContentsIn>(Opcode::GetContents, body).is_err() {
            self.reply_error(
                ctx,
                Opcode::GetContents as u16,
                request_id,
                Status::BadRequest,
                body.len() as u32,
            );
            return State::done(ctx, OpClass::Other, started, self.now);
        }
        // Nothing is copied: the count is promised now, and the index walked a piece
        // at a time as the socket drains (dosp/PROTOCOL.md, GET_CONTENTS).
        let promised = ctx.store.objects();
        let len = promised * size_of::<ContentsEntry>() as u64;
        dosp::codec::encode_stream_header(&mut self.out, request_id, len);
        self.set_busy(ctx, true);
        self.outgoing = Some(Outgoing::Contents {
            request_id,
            promised,
            sent: 0,
            shard: 0,
            cursor: None,
            asked: false,
            done: false,
            started,
        });
    }

    /// Appends the next piece of the streaming response, or its final Out structure.
    fn produce(&mut self, ctx: &mut Ctx<'_>) {
        let Some(outgoing) = self.outgoing.as_mut() else {
            return;
        };
        match outgoing {
            Outgoing::Object {
                request_id,
                opcode,
                fp,
                next,
                end,
                object_len,
                failed,
                started,
                inflight,
                ..
            } => {
                if inflight.is_some() {
                    return;
                }
                if *next < *end {
                    return self.request_piece(ctx);
                }
                let status = failed.unwrap_or(Status::Success);
                let out = RetrieveOut {
                    head: OutHead::new(status, 0),
                    fingerprint: *fp,
                    object_len: (*object_len).into(),
                };
                let (op, id, started) = (*opcode as u16, *request_id, *started);
                if status != Status::Success {
                    NodeStats::error(ctx.stats, status);
                }
                self.outgoing = None;
                self.reply(ctx, op, id, out.as_bytes());
                State::done(ctx, OpClass::Retrieve, started, self.now);
                self.set_busy(ctx, false);
            }
            Outgoing::Contents {
                request_id,
                promised,
                sent,
                shard,
                cursor,
                asked,
                done,
                started,
            } => {
                if *asked {
                    return;
                }
                let room = *promised - *sent;
                let take = ((PIECE_BYTES / size_of::<ContentsEntry>()) as u64).min(room);
                let mut n = 0u64;
                if !*done && take > 0 {
                    let out = &mut self.out;
                    let mut last = None;
                    let page = ctx.store.contents_page(
                        *shard,
                        *cursor,
                        take as usize,
                        self.user,
                        |fp, disk| {
                            let e = ContentsEntry {
                                fingerprint: fp,
                                disk: disk.0.into(),
                                reserved: 0.into(),
                            };
                            out.extend_from_slice(e.as_bytes());
                            last = Some(fp);
                            n += 1;
                        },
                    );
                    match page {
                        PageStart::Later => {
                            *asked = true;
                            return;
                        }
                        PageStart::Now { end } => {
                            if last.is_some() {
                                *cursor = last;
                            }
                            if end {
                                *shard += 1;
                                *cursor = None;
                                *done = *shard >= ctx.store.loops();
                            }
                        }
                    }
                }
                *sent += n;
                if *done && *sent < *promised {
                    // Objects deleted while the walk went on: the promised length is
                    // made up with padding entries (all-zero fingerprint, disk 0xFFFF),
                    // which receivers skip.
                    let pad =
                        ((PIECE_BYTES / size_of::<ContentsEntry>()) as u64).min(*promised - *sent);
                    let e = ContentsEntry {
                        fingerprint: Fingerprint::ZERO,
                        disk: CONTENTS_PADDING_DISK.into(),
                        reserved: 0.into(),
                    };
                    for _ in 0..pad {
                        self.out.extend_from_slice(e.as_bytes());
                    }
                    *sent += pad;
                }
                if *sent == *promised {
                    let out = ContentsOut {
                        head: OutHead::new(Status::Success, 0),
                        count: (*promised).into(),
                    };
                    let (id, started) = (*request_id, *started);
                    self.outgoing = None;
                    self.reply(ctx, Opcode::GetContents as u16, id, out.as_bytes());
                    State::done(ctx, OpClass::Other, started, self.now);
                    self.set_busy(ctx, false);
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
