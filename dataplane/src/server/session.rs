//! One DOSP connection: its buffers and its request state machine.
//!
//! A session owns a fixed receive buffer and an output buffer. `drive` moves bytes in
//! both directions until the socket would block or a bound is hit: it decodes pipelined
//! requests in order, feeds STORE chunks straight from the receive buffer into the
//! store (the one copy, with MD5 in the same pass), and streams RETRIEVE data from the
//! store in pieces as the socket drains, so no object is ever held whole in memory.
//!
//! Backpressure: while a response is streaming or the output buffer is above its high
//! mark, the session stops decoding (and so stops reading), and TCP flow control pushes
//! back on the client.
//!
//! Latency: each request's arrival time travels with its state (store, stream) and is
//! recorded in the node's histograms when its reply is queued — a STORE after its last
//! chunk, a stream with its final Out structure. A request abandoned by its client
//! (connection closed mid-STORE) has no reply and so no latency: it counts as
//! `stores_aborted` instead (see `NodeStats` for how everything is counted).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dosp::codec::{encode_response, RequestDecoder, RequestEvent};
use dosp::wire::*;
use dosp::Fingerprint;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::ops::{detail_of, small_op, status_of, Ctx};
use crate::stats::{NodeStats, OpClass};
use crate::store::{DiskId, Expect, WriteId};

/// Receive buffer: a header plus the largest body, with room for STORE data to flow.
const RBUF_BYTES: usize = 256 * 1024;
const _: () = assert!(RBUF_BYTES >= Header::SIZE + BODY_MAX as usize);
/// Stream data is produced in pieces of this size.
const PIECE_BYTES: usize = 256 * 1024;
/// Stop decoding new requests while this much output is waiting.
const OUT_HIGH: usize = 512 * 1024;
/// Steps of work per `drive` call, so one busy connection cannot starve the others.
const STEPS_MAX: usize = 64;

/// What the loop should do with the session after `drive`.
#[derive(Debug, PartialEq, Eq)]
pub enum Drive {
    /// Waiting for the socket.
    Idle,
    /// Hit its step bound with work left: drive again next turn.
    More,
    /// Done: deregister and drop.
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
        failed: Option<Status>,
        started: Instant,
    },
    Contents {
        request_id: u64,
        entries: Vec<(Fingerprint, DiskId)>,
        next: usize,
        started: Instant,
    },
}

/// One client connection.
pub struct Session {
    stream: mio::net::TcpStream,
    pub peer: SocketAddr,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    decoder: RequestDecoder,
    st: State,
    /// When bytes last moved in either direction, for the timeouts.
    last_io: Instant,
}

struct State {
    out: Vec<u8>,
    out_pos: usize,
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
    pub fn new(stream: mio::net::TcpStream, peer: SocketAddr, chunk_max: u32) -> Session {
        Session {
            stream,
            peer,
            rbuf: vec![0u8; RBUF_BYTES].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            decoder: RequestDecoder::new(chunk_max),
            st: State {
                out: Vec::with_capacity(OUT_HIGH + PIECE_BYTES + 1024),
                out_pos: 0,
                store: StoreState::None,
                outgoing: None,
                closing: false,
                read_closed: false,
                busy: false,
            },
            last_io: Instant::now(),
        }
    }

    /// Whether the peer has gone quiet for too long: `request` while a request is in
    /// flight (a STORE waiting for chunks, a response waiting to be read, a partial
    /// request), `idle` between requests. A stalled STORE otherwise holds a write slot
    /// and its staging buffer forever.
    pub fn timed_out(&self, now: Instant, request: Duration, idle: Duration) -> bool {
        let mid_request = self.st.busy
            || self.decoder.in_store()
            || self.rstart < self.rend
            || self.st.out_pos < self.st.out.len();
        now.saturating_duration_since(self.last_io) > if mid_request { request } else { idle }
    }

    pub fn stream_mut(&mut self) -> &mut mio::net::TcpStream {
        &mut self.stream
    }

    /// Releases what the session holds in the store (an unfinished STORE is aborted:
    /// nothing half-written ever becomes visible) and counts a STORE it ends.
    pub fn close(&mut self, ctx: &mut Ctx<'_>) {
        match std::mem::replace(&mut self.st.store, StoreState::None) {
            StoreState::Writing { write, .. } => {
                ctx.store.abort(write);
                NodeStats::inc(&ctx.stats.stores_aborted);
            }
            StoreState::Discarding { .. } => NodeStats::inc(&ctx.stats.stores_aborted),
            StoreState::None => {
                if self.store_unstarted() {
                    NodeStats::inc(&ctx.stats.stores);
                    NodeStats::inc(&ctx.stats.stores_aborted);
                }
            }
        }
        self.st.set_busy(ctx, false);
    }

    /// Whether the input not yet decoded starts with a STORE request whose StoreIn has
    /// not all arrived: a STORE its client gave up before it could begin.
    fn store_unstarted(&self) -> bool {
        if self.decoder.failed() || self.decoder.in_store() {
            return false;
        }
        Header::read_from_prefix(&self.rbuf[self.rstart..self.rend])
            .is_ok_and(|(h, _)| h.check(Kind::Request).is_ok() && h.opcode() == Some(Opcode::Store))
    }

    /// Moves bytes until the socket blocks, the work runs out or the step bound is hit.
    pub fn drive(&mut self, ctx: &mut Ctx<'_>) -> Drive {
        for _ in 0..STEPS_MAX {
            let mut progress = false;

            // 1. Send what is queued.
            if self.st.out_pos < self.st.out.len() {
                match self.stream.write(&self.st.out[self.st.out_pos..]) {
                    Ok(0) => return Drive::Close,
                    Ok(n) => {
                        self.st.out_pos += n;
                        NodeStats::add(&ctx.stats.bytes_out, n as u64);
                        self.last_io = Instant::now();
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(_) => return Drive::Close,
                }
                if self.st.out_pos == self.st.out.len() {
                    self.st.out.clear();
                    self.st.out_pos = 0;
                }
            }
            let pending = self.st.out.len() - self.st.out_pos;

            // 2. Produce more of a streaming response when the output has room.
            if self.st.outgoing.is_some() && pending < OUT_HIGH {
                self.st.produce(ctx);
                progress = true;
            }

            // 3. Decode requests, unless backpressured or closing.
            if !self.st.closing
                && self.st.outgoing.is_none()
                && self.st.out.len() - self.st.out_pos < OUT_HIGH
            {
                match self.decoder.decode(&self.rbuf[self.rstart..self.rend]) {
                    Ok(Some((event, n))) => {
                        self.rstart += n;
                        self.st.handle(ctx, event);
                        progress = true;
                    }
                    Ok(None) => {
                        // 4. Read more input.
                        if !self.st.read_closed {
                            if self.rstart == self.rend {
                                self.rstart = 0;
                                self.rend = 0;
                            } else if self.rstart > 0 && self.rend == self.rbuf.len() {
                                self.rbuf.copy_within(self.rstart..self.rend, 0);
                                self.rend -= self.rstart;
                                self.rstart = 0;
                            }
                            match self.stream.read(&mut self.rbuf[self.rend..]) {
                                Ok(0) => {
                                    self.st.read_closed = true;
                                    self.st.closing = true;
                                    progress = true;
                                }
                                Ok(n) => {
                                    self.rend += n;
                                    NodeStats::add(&ctx.stats.bytes_in, n as u64);
                                    self.last_io = Instant::now();
                                    progress = true;
                                }
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                                Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                                Err(_) => return Drive::Close,
                            }
                        }
                    }
                    Err(e) => {
                        self.st.framing_error(ctx, e, self.peer);
                        progress = true;
                    }
                }
            }

            if self.st.closing && self.st.outgoing.is_none() && self.st.out_pos == self.st.out.len()
            {
                return Drive::Close;
            }
            if !progress {
                return Drive::Idle;
            }
        }
        Drive::More
    }
}

/// Refuses a STORE up front when its announced size cannot fit: over the object size
/// limit (TOO_LARGE, detail = the announced size in MiB, rounded up, saturated at
/// u32::MAX: a byte count need not fit in the detail) or over what the roomiest online
/// disk has available (NO_SPACE). The chunks are still read, and the reply follows the
/// last.
fn early_refusal(ctx: &Ctx<'_>, size_hint: u64) -> Option<(Status, u32)> {
    if size_hint == 0 {
        return None;
    }
    let max = ctx.store.config().max_object_bytes;
    if size_hint > max {
        return Some((
            Status::TooLarge,
            u32::try_from(size_hint.div_ceil(1 << 20)).unwrap_or(u32::MAX),
        ));
    }
    let room = ctx
        .store
        .online_room()
        .map(|(_, _, available)| available)
        .max()
        .unwrap_or(0);
    (size_hint > room).then_some((Status::NoSpace, 0))
}

/// When no online disk has `size_hint` bytes free but one would after compaction,
/// compacts that disk now, so the STORE lands instead of failing part way. Idle-time
/// compaction reclaims space gradually; this is the on-demand path. It runs on the
/// dataplane thread and costs at most one pass over that disk's log.
fn make_room(ctx: &mut Ctx<'_>, size_hint: u64) -> Result<(), crate::store::StoreError> {
    if size_hint == 0 {
        return Ok(());
    }
    // Segment headers: one 4 KiB block per segment, plus a little slack.
    let need = size_hint + size_hint / 128 + (1 << 20);
    if ctx.store.online_room().any(|(_, free, _)| free >= need) {
        return Ok(());
    }
    let Some((disk, _, _)) = ctx
        .store
        .online_room()
        .filter(|&(_, _, available)| available >= need)
        .max_by_key(|&(_, _, available)| available)
    else {
        return Ok(());
    };
    let report = ctx.store.compact(disk)?;
    tracing::info!(
        disk = disk.0,
        ?report,
        "compacted on demand to make room for a store"
    );
    Ok(())
}

impl State {
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
    fn done(ctx: &Ctx<'_>, op: OpClass, started: Instant) {
        ctx.stats.latency(op).record(started.elapsed());
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
                StoreState::None => (Opcode::Null as u16, 0, None),
            };
        self.reply_error(ctx, opcode, request_id, e.status(), e.detail());
        // An unfinished STORE got its (error) reply: it ends here.
        if let Some(started) = store_started {
            State::done(ctx, OpClass::Store, started);
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
                let started = Instant::now();
                match opcode {
                    Err(raw) => {
                        NodeStats::inc(&ctx.stats.unknown_opcodes);
                        self.reply_error(ctx, raw, id, Status::UnknownOpcode, u32::from(raw));
                        State::done(ctx, OpClass::Other, started);
                    }
                    Ok(Opcode::Store) => self.start_store(ctx, id, body, started),
                    Ok(op @ (Opcode::Retrieve | Opcode::RetrieveRange)) => {
                        self.start_retrieve(ctx, op, id, body, started)
                    }
                    Ok(Opcode::GetContents) => self.start_contents(ctx, id, body, started),
                    Ok(op) => {
                        let at = self.out.len();
                        self.out.extend_from_slice(Header::new_zeroed().as_bytes());
                        small_op(ctx, op, body, &mut self.out);
                        let len = (self.out.len() - at - Header::SIZE) as u32;
                        let h = Header::new(Kind::Response, op, id, len, 0);
                        self.out[at..at + Header::SIZE].copy_from_slice(h.as_bytes());
                        NodeStats::inc(&ctx.stats.ops_total);
                        let class = if op == Opcode::Delete {
                            OpClass::Delete
                        } else {
                            OpClass::Other
                        };
                        State::done(ctx, class, started);
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
                    match make_room(ctx, req.announced_len()).and_then(|()| ctx.store.begin()) {
                        Ok(write) => StoreState::Writing {
                            request_id,
                            write,
                            started,
                            expect: Expect {
                                md5: req.expect_md5(),
                                len: req.expect_len(),
                            },
                        },
                        Err(e) => StoreState::Discarding {
                            request_id,
                            status: status_of(&e),
                            detail: 0,
                            started,
                        },
                    }
                }
            },
        };
    }

    fn finish_store(&mut self, ctx: &mut Ctx<'_>) {
        let (request_id, result, started) =
            match std::mem::replace(&mut self.store, StoreState::None) {
                StoreState::Writing {
                    request_id,
                    write,
                    started,
                    expect,
                } => (
                    request_id,
                    ctx.store
                        .commit_expect(write, &expect)
                        .map_err(|e| (status_of(&e), detail_of(&e))),
                    started,
                ),
                StoreState::Discarding {
                    request_id,
                    status,
                    detail,
                    started,
                } => (request_id, Err((status, detail)), started),
                StoreState::None => return,
            };
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
        State::done(ctx, OpClass::Store, started);
        self.set_busy(ctx, false);
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
            State::done(ctx, OpClass::Retrieve, started);
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
        let Some(meta) = ctx.store.get(&fp) else {
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
        // Read the first piece before announcing the stream, so an object on a failed
        // or offline disk gets a plain error status instead of a stream of nothing.
        let at = self.out.len();
        let first = PIECE_BYTES.min((end - next) as usize);
        self.out.resize(at + StreamHeader::SIZE + first, 0);
        if let Err(e) = ctx
            .store
            .read(&fp, next, &mut self.out[at + StreamHeader::SIZE..])
        {
            self.out.truncate(at);
            if matches!(e, crate::store::StoreError::Corrupt { .. }) {
                NodeStats::inc(&ctx.stats.checksum_mismatches);
            }
            let status = status_of(&e);
            return early(self, ctx, status, OutHead::new(status, 0).as_bytes());
        }
        self.out[at..at + StreamHeader::SIZE]
            .copy_from_slice(StreamHeader::new(request_id, end - next).as_bytes());
        self.set_busy(ctx, true);
        self.outgoing = Some(Outgoing::Object {
            request_id,
            opcode: op,
            fp,
            next: next + first as u64,
            end,
            object_len: meta.len,
            failed: None,
            started,
        });
        // A small object fits in the first piece: append its Out now so the whole
        // reply leaves in one send and the client wakes once.
        if next + first as u64 == end {
            self.produce(ctx);
        }
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
            return State::done(ctx, OpClass::Other, started);
        }
        let entries = ctx.store.contents();
        let len = (entries.len() * size_of::<ContentsEntry>()) as u64;
        dosp::codec::encode_stream_header(&mut self.out, request_id, len);
        self.set_busy(ctx, true);
        self.outgoing = Some(Outgoing::Contents {
            request_id,
            entries,
            next: 0,
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
            } => {
                if *next < *end {
                    let n = PIECE_BYTES.min((*end - *next) as usize);
                    let at = self.out.len();
                    self.out.resize(at + n, 0);
                    if failed.is_none() {
                        // Every block is checked against its CRC-32C on the way
                        // out; those CRCs were computed from the same buffer the
                        // fingerprint was, so verified blocks are the fingerprinted
                        // bytes. (The client re-checks the MD5 of whole objects.)
                        match ctx.store.read(fp, *next, &mut self.out[at..]) {
                            Ok(_) => {}
                            Err(e) => {
                                // The length is already promised: send zeros in place of
                                // the bad bytes and say so in the final status.
                                tracing::error!(fp = %fp, error = %e, "read failed mid-stream");
                                if matches!(e, crate::store::StoreError::Corrupt { .. }) {
                                    NodeStats::inc(&ctx.stats.checksum_mismatches);
                                }
                                *failed = Some(status_of(&e));
                                self.out[at..].fill(0);
                            }
                        }
                    }
                    *next += n as u64;
                    return;
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
                State::done(ctx, OpClass::Retrieve, started);
                self.set_busy(ctx, false);
            }
            Outgoing::Contents {
                request_id,
                entries,
                next,
                started,
            } => {
                let take = (PIECE_BYTES / size_of::<ContentsEntry>()).min(entries.len() - *next);
                for (fp, disk) in &entries[*next..*next + take] {
                    let e = ContentsEntry {
                        fingerprint: *fp,
                        disk: disk.0.into(),
                        reserved: 0.into(),
                    };
                    self.out.extend_from_slice(e.as_bytes());
                }
                *next += take;
                if *next == entries.len() {
                    let out = ContentsOut {
                        head: OutHead::new(Status::Success, 0),
                        count: (entries.len() as u64).into(),
                    };
                    let (id, started) = (*request_id, *started);
                    self.outgoing = None;
                    self.reply(ctx, Opcode::GetContents as u16, id, out.as_bytes());
                    State::done(ctx, OpClass::Other, started);
                    self.set_busy(ctx, false);
                }
            }
        }
    }
}
