//! Cluster services over UDP: unicast queries, multicast LOCATE and heartbeats.
//!
//! Two endpoints of the loop's [`NetPort`] (only one loop per node serves them). The
//! unicast one is bound to the node's DOSP address (same port number
//! as TCP), so a manager can ask one node with the same In/Out structures it would use
//! over TCP. The multicast one is joined to the cluster group: a LOCATE sent to the
//! group is answered — by multicast, so every manager snooping the group learns the
//! location — only by nodes that hold the object; the rest stay silent. (Periodic
//! heartbeats and announcements come from the management core, mgmt/src/cluster.rs.)
//!
//! Unicast answers are bounded by the request that asked: at most three times its
//! datagram's size (dosp/PROTOCOL.md, "UDP replies"). A source address is not
//! checked by anyone, and a node that answered 16 KiB of disk status to a 40-byte
//! datagram would be an amplifier pointed at whoever the datagram claimed to be. A
//! reply that would be larger is replaced by TOO_LARGE carrying the size needed, so
//! the requester can pad its request or ask over TCP. Multicast answers go to the
//! group, never to the claimed source, and are left alone.

use std::net::{SocketAddr, SocketAddrV4};

use dosp::codec::{encode_response, udp_reply_allowed};
use dosp::wire::*;
use dosp::Fingerprint;
use zerocopy::{FromBytes, IntoBytes};

use super::auth::{gate, Gate};
use super::ops::{heartbeat, locate_answer, small_op, Ctx};
use super::port::{Dgram, NetPort};
use super::shards::{Event, Locate};
use crate::stats::NodeStats;

/// Store users naming a LOCATE datagram waiting for another loop's answer:
/// `CLUSTER_USER | slot`, far from any session's connection id.
pub const CLUSTER_USER: u64 = 1 << 61;
/// LOCATE datagrams waiting for another loop at most; more are dropped (counted),
/// as a full socket buffer would drop them.
const LOCATES_WAITING_MAX: usize = 1024;

/// A LOCATE datagram waiting for the answer of the loop that knows the object.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    fp: Fingerprint,
    from: SocketAddr,
    id: u64,
    multicast: bool,
    /// Size of the request datagram (bounds a unicast answer).
    n: usize,
}

/// Largest datagram we accept or send. Replies are small fixed structures; the largest
/// (GET_DISK_STATUS for every disk) is bounded by DISKS_MAX.
const DGRAM_MAX: usize = 32 + 16 + DISKS_MAX * 64;
/// Datagrams handled per socket per loop turn.
pub const DGRAM_BURST: usize = 32;

#[derive(Debug)]
pub struct Cluster {
    group: SocketAddrV4,
    buf: Box<[u8]>,
    out: Vec<u8>,
    /// Out body being built, before its header is known.
    body: Vec<u8>,
    /// LOCATEs waiting for another loop, by slot.
    waiting: Vec<Option<Waiting>>,
    free: Vec<usize>,
}

impl Cluster {
    /// Buffers for answering on `group` (the multicast group the port joined).
    pub fn new(group: SocketAddrV4) -> Cluster {
        Cluster {
            group,
            buf: vec![0u8; DGRAM_MAX].into_boxed_slice(),
            out: Vec::with_capacity(DGRAM_MAX),
            body: Vec::with_capacity(DGRAM_MAX),
            waiting: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Looks the object up for a LOCATE datagram; the answer goes out now, or when
    /// the loop that knows the object has answered ([`Cluster::on_event`]).
    fn locate<P: NetPort>(&mut self, port: &mut P, ctx: &mut Ctx<'_>, w: Waiting) {
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.waiting.len() < LOCATES_WAITING_MAX => {
                self.waiting.push(None);
                self.waiting.len() - 1
            }
            None => {
                dropped(ctx);
                return;
            }
        };
        match ctx.store.locate(&w.fp, CLUSTER_USER | slot as u64) {
            Locate::Now(found) => {
                self.free.push(slot);
                self.answer_locate(port, ctx, found.map(|(_, m)| m), w);
            }
            Locate::Later => self.waiting[slot] = Some(w),
        }
    }

    /// A lookup for a waiting LOCATE came back.
    pub fn on_event<P: NetPort>(&mut self, port: &mut P, ctx: &mut Ctx<'_>, ev: Event) {
        let Event::Located { user, found } = ev else {
            return;
        };
        let slot = (user & !CLUSTER_USER) as usize;
        let Some(w) = self.waiting.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        self.answer_locate(port, ctx, found.map(|(_, m)| m), w);
    }

    fn answer_locate<P: NetPort>(
        &mut self,
        port: &mut P,
        ctx: &mut Ctx<'_>,
        meta: Option<crate::store::ObjectMeta>,
        w: Waiting,
    ) {
        self.out.clear();
        match meta {
            Some(m) => {
                let answer = locate_answer(ctx, &w.fp, &m);
                encode_response(
                    &mut self.out,
                    Opcode::Locate as u16,
                    w.id,
                    &[answer.as_bytes()],
                );
                NodeStats::inc(&ctx.stats.locate_answers);
                answered(ctx, Status::Success);
            }
            // To the group, a node speaks only when it has something to say.
            None if w.multicast => return,
            None => {
                let head = OutHead::new(Status::NotFound, 0);
                encode_response(
                    &mut self.out,
                    Opcode::Locate as u16,
                    w.id,
                    &[head.as_bytes()],
                );
                answered(ctx, Status::NotFound);
            }
        }
        let (via, to) = if w.multicast {
            // What a node says to the group is signed when it has a key (§7).
            if let Some(auth) = &ctx.id.auth {
                auth.sign(&mut self.out, 0);
            }
            (Dgram::Multicast, SocketAddr::V4(self.group))
        } else {
            if !udp_reply_allowed(w.n, self.out.len()) {
                return;
            }
            (Dgram::Unicast, w.from)
        };
        if let Err(e) = port.send_datagram(via, &self.out, to) {
            tracing::debug!(%to, error = %e, "LOCATE answer failed");
        }
    }

    /// Handles up to DGRAM_BURST datagrams from each endpoint. Returns whether any came.
    pub fn poll<P: NetPort>(&mut self, port: &mut P, ctx: &mut Ctx<'_>) -> bool {
        let mut any = false;
        for multicast in [false, true] {
            let via = if multicast {
                Dgram::Multicast
            } else {
                Dgram::Unicast
            };
            for _ in 0..DGRAM_BURST {
                let (n, from) = match port.recv_datagram(via, &mut self.buf) {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "udp receive failed");
                        break;
                    }
                };
                any = true;
                self.handle(port, ctx, n, from, multicast);
            }
        }
        any
    }

    fn handle<P: NetPort>(
        &mut self,
        port: &mut P,
        ctx: &mut Ctx<'_>,
        n: usize,
        from: SocketAddr,
        multicast: bool,
    ) {
        let Ok((header, body)) = Header::read_from_prefix(&self.buf[..n]) else {
            dropped(ctx);
            return;
        };
        // Answers and heartbeats from other nodes share the group: only requests are ours.
        if multicast && header.kind == Kind::Response as u8 && header.magic.get() == MAGIC {
            return;
        }
        let error = match header.check(Kind::Request) {
            Err(e) => Some((e.status(), e.detail(), e.to_string())),
            Ok(()) => {
                let want = header.body_len.get() as usize;
                (body.len() < want).then(|| {
                    let text = format!("body of {} bytes, header says {want}", body.len());
                    (Status::BadRequest, body.len() as u32, text)
                })
            }
        };
        if let Some((status, detail, why)) = error {
            // Answered only when the datagram is surely a DOSP request (the magic and
            // the request kind) and was sent to this node alone: a node that answered
            // any datagram would reflect traffic at whoever a sender claims to be, one
            // that answered answers could bounce errors with another node forever, and
            // on the group every node would answer.
            let answer =
                !multicast && header.magic.get() == MAGIC && header.kind == Kind::Request as u8;
            tracing::debug!(%from, error = %why, answer, "malformed datagram");
            if !answer {
                dropped(ctx);
            } else {
                // Opcode and request id mean something only under a matching checksum.
                let (opcode, id) = if header.checksum.get() == header.compute_checksum() {
                    (header.opcode.get(), header.request_id.get())
                } else {
                    (Opcode::Null as u16, 0)
                };
                self.out.clear();
                encode_response(
                    &mut self.out,
                    opcode,
                    id,
                    &[OutHead::new(status, detail).as_bytes()],
                );
                NodeStats::inc(&ctx.stats.udp_bad);
                if status == Status::TooLarge {
                    // A header error like BAD_REQUEST and BAD_VERSION, which
                    // `NodeStats::error` counts as bad requests by their status.
                    NodeStats::inc(&ctx.stats.bad_requests);
                }
                answered(ctx, status);
                if let Err(e) = port.send_datagram(Dgram::Unicast, &self.out, from) {
                    tracing::debug!(%from, error = %e, "unicast answer failed");
                }
            }
            return;
        }
        let body = &body[..header.body_len.get() as usize];
        NodeStats::inc(&ctx.stats.udp_requests);
        let id = header.request_id.get();
        let opcode = header.opcode().ok_or(header.opcode.get());
        let body = match gate(ctx.id.auth.as_deref(), &header, opcode, body) {
            Ok(inner) => inner,
            Err(refusal) => {
                let (status, detail) = match refusal {
                    Gate::Malformed(len) => (Status::BadRequest, len),
                    Gate::Refused(reason) => {
                        ctx.stats.auth_failed(reason);
                        tracing::debug!(%from, %reason, multicast, "datagram refused: AUTH_FAILED");
                        (Status::AuthFailed, reason.code())
                    }
                };
                // To the group a node never answers what it will not serve.
                if multicast {
                    if status == Status::BadRequest {
                        dropped(ctx);
                    }
                    return;
                }
                self.out.clear();
                encode_response(
                    &mut self.out,
                    header.opcode.get(),
                    id,
                    &[OutHead::new(status, detail).as_bytes()],
                );
                answered(ctx, status);
                if let Err(e) = port.send_datagram(Dgram::Unicast, &self.out, from) {
                    tracing::debug!(%from, error = %e, "unicast answer failed");
                }
                return;
            }
        };
        let Some(op) = header.opcode() else {
            if !multicast {
                self.out.clear();
                let raw = header.opcode.get();
                encode_response(
                    &mut self.out,
                    raw,
                    id,
                    &[OutHead::new(Status::UnknownOpcode, raw.into()).as_bytes()],
                );
                let _ = port.send_datagram(Dgram::Unicast, &self.out, from);
                answered(ctx, Status::UnknownOpcode);
            }
            NodeStats::inc(&ctx.stats.unknown_opcodes);
            return;
        };
        self.out.clear();
        if multicast {
            // To the group, a node speaks only when it has something to say.
            match op {
                Opcode::Locate => {
                    let Ok(q) = parse_exact::<LocateIn>(op, body) else {
                        dropped(ctx);
                        return;
                    };
                    let w = Waiting {
                        fp: q.fingerprint,
                        from,
                        id,
                        multicast: true,
                        n,
                    };
                    return self.locate(port, ctx, w);
                }
                Opcode::Heartbeat => {
                    if parse_exact::<HeartbeatIn>(op, body).is_err() {
                        dropped(ctx);
                        return;
                    }
                    encode_response(&mut self.out, op as u16, id, &[heartbeat(ctx).as_bytes()]);
                    if let Some(auth) = &ctx.id.auth {
                        auth.sign(&mut self.out, 0);
                    }
                }
                _ => return,
            }
            answered(ctx, Status::Success);
            if let Err(e) =
                port.send_datagram(Dgram::Multicast, &self.out, SocketAddr::V4(self.group))
            {
                tracing::debug!(error = %e, "multicast answer failed");
            }
            return;
        }
        if op == Opcode::Locate {
            if let Ok(q) = parse_exact::<LocateIn>(op, body) {
                let w = Waiting {
                    fp: q.fingerprint,
                    from,
                    id,
                    multicast: false,
                    n,
                };
                return self.locate(port, ctx, w);
            }
        }
        self.body.clear();
        // small_op counts the error of a non-SUCCESS answer itself.
        let status = small_op(ctx, op, body, &mut self.body);
        NodeStats::inc(&ctx.stats.ops_total);
        encode_response(&mut self.out, op as u16, id, &[&self.body]);
        // `n` is the whole datagram as received, padding included. The replacement
        // (header + OutHead, 40 bytes) always fits: a request is at least 32.
        if !udp_reply_allowed(n, self.out.len()) {
            let needed = u32::try_from(self.out.len()).unwrap_or(u32::MAX);
            self.out.clear();
            let head = OutHead::new(Status::TooLarge, needed);
            encode_response(&mut self.out, op as u16, id, &[head.as_bytes()]);
            NodeStats::error(ctx.stats, Status::TooLarge);
            tracing::debug!(%from, request = n, reply = needed, "UDP reply too large for its request");
        } else if op == Opcode::Locate && status == Status::Success {
            NodeStats::inc(&ctx.stats.locate_answers);
        }
        if let Err(e) = port.send_datagram(Dgram::Unicast, &self.out, from) {
            tracing::debug!(%from, error = %e, "unicast answer failed");
        }
    }
}

/// Counts a malformed datagram that gets no answer.
fn dropped(ctx: &Ctx<'_>) {
    NodeStats::inc(&ctx.stats.udp_bad);
    NodeStats::inc(&ctx.stats.bad_requests);
}

/// Counts an answer sent: once as an operation, and once as an error unless SUCCESS.
fn answered(ctx: &Ctx<'_>, status: Status) {
    NodeStats::inc(&ctx.stats.ops_total);
    if status != Status::Success {
        NodeStats::error(ctx.stats, status);
    }
}
