//! Model-based tests of the real loop and sessions on a real store (memory disks with
//! late, reordered completions), over the seeded simulated network of `simnet.rs`.
//!
//! Simulated clients speak DOSP with the dosp crate's codec: every operation, pipelined,
//! with partial writes and reads, delays, reordering between connections and resets,
//! and LOCATE over UDP (unicast and multicast). Each client checks every reply against
//! a model of its own objects (fingerprint → bytes and the reference counts possible
//! so far). The objects of different clients never share a fingerprint, so each model
//! is exact for its client; a reset makes the effect of a request sent whole but not
//! answered uncertain (it may or may not have happened: the set of possible counts
//! grows), while a STORE cut short by the reset must have left nothing.
//!
//! A failing seed is printed; `DOSD_SIM_SEED=<seed> cargo test -p dataplane sim_`
//! replays it alone, exactly.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use dosp::codec::{encode_chunk_header, encode_request, ResponseDecoder, ResponseEvent};
use dosp::wire::*;
use dosp::Fingerprint;
use nvme::mem::{Latency, MemDisk};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use zerocopy::{FromBytes, IntoBytes};

use super::port::{ConnId, Dgram};
use super::simnet::{seeds, SimConfig, SimPort};
use super::{Server, ServerConfig};
use crate::store::{Store, StoreConfig};

const MIB: u64 = 1 << 20;
const CHUNK_MAX: u32 = 64 * 1024;
const OBJECT_MAX: u64 = 8 * MIB;
const GROUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 73, 250), 7373);
/// Turns a seed may take before it is declared stuck.
const TURNS_MAX: u64 = 40_000;
/// Turns a client waits after a reset, once the node closed the connection, for a
/// commit or delete it started to become durable before the client looks again.
const SETTLE_TURNS: u64 = 200;

/// A request in flight on a client's connection, in the order of the replies.
#[derive(Debug, Clone)]
enum Op {
    Store {
        fp: Fingerprint,
        /// A broken promise (a wrong expected length): CHECKSUM_MISMATCH, no effect.
        broken: bool,
    },
    Retrieve {
        fp: Fingerprint,
        range: Option<(u64, u64)>,
    },
    Delete {
        fp: Fingerprint,
    },
    Contents,
    /// NULL, GET_LOAD, HEARTBEAT, GET_DISK_STATE, GET_DISK_STATUS: SUCCESS.
    Small(Opcode),
    Unknown(u16),
}

#[derive(Debug)]
struct InFlight {
    id: u64,
    op: Op,
    /// Offset in the connection's byte stream just past the request's last byte.
    end: u64,
}

/// What a client knows of one of its objects.
#[derive(Debug)]
struct Obj {
    data: Vec<u8>,
    /// The reference counts possible now (one unless a reset left doubt).
    refs: BTreeSet<u32>,
}

/// A UDP LOCATE waiting for its answer (or, on the group, for its silence).
#[derive(Debug)]
struct UdpWait {
    id: u64,
    fp: Fingerprint,
    multicast: bool,
    deadline: u64,
}

struct Client {
    idx: u8,
    addr: SocketAddr,
    conn: Option<ConnId>,
    /// After a reset: the old connection, until the node has closed it, then the turn
    /// from which the client may connect again.
    settling: Option<(ConnId, Option<u64>)>,
    out: Vec<u8>,
    /// Bytes of `out` the network took; `out_base` is the stream offset of `out[0]`.
    out_pos: usize,
    out_base: u64,
    inflight: VecDeque<InFlight>,
    depth: usize,
    rx: Vec<u8>,
    dec: ResponseDecoder,
    stream: Option<Vec<u8>>,
    next_id: u64,
    ops_left: u32,
    verifying: bool,
    finished: bool,
    fin_sent: bool,
    model: BTreeMap<Fingerprint, Obj>,
    udp: Option<UdpWait>,
    /// Requests answered, resets, and STOREs a reset cut short, for the report.
    answered: u64,
    resets: u64,
    stores_cut: u64,
}

fn fail(seed: u64, msg: String) -> ! {
    panic!("simulation seed {seed} failed (replay: DOSD_SIM_SEED={seed}): {msg}");
}

impl Client {
    fn new(idx: u8, ops: u32, depth: usize) -> Client {
        Client {
            idx,
            addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, idx + 1), 40000)),
            conn: None,
            settling: None,
            out: Vec::new(),
            out_pos: 0,
            out_base: 0,
            inflight: VecDeque::new(),
            depth,
            rx: Vec::new(),
            dec: ResponseDecoder::new(OBJECT_MAX * 2),
            stream: None,
            next_id: (u64::from(idx) << 48) + 1,
            ops_left: ops,
            verifying: false,
            finished: false,
            fin_sent: false,
            model: BTreeMap::new(),
            udp: None,
            answered: 0,
            resets: 0,
            stores_cut: 0,
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A fresh object of this client (its index in the first byte keeps fingerprints
    /// apart from other clients'; only client 0 stores the empty object).
    fn new_object(&self, rng: &mut StdRng) -> Vec<u8> {
        let len = match rng.gen_range(0..100) {
            0..=4 if self.idx == 0 => 0,
            0..=69 => rng.gen_range(1..4096),
            70..=94 => rng.gen_range(4096..100_000),
            _ => rng.gen_range(200_000..600_000),
        };
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        if let Some(b) = data.first_mut() {
            *b = self.idx;
        }
        data
    }

    fn push(&mut self, id: u64, op: Op) {
        let end = self.out_base + self.out.len() as u64;
        self.inflight.push_back(InFlight { id, op, end });
    }

    /// Queues the next request of the client's script.
    fn issue(&mut self, rng: &mut StdRng) {
        let known: Vec<Fingerprint> = self.model.keys().copied().collect();
        let pick = |rng: &mut StdRng| known[rng.gen_range(0..known.len())];
        let id = self.id();
        let roll = if known.is_empty() {
            0
        } else {
            rng.gen_range(0..100)
        };
        match roll {
            0..=34 => {
                // STORE: a new object, or one already known (a duplicate).
                let data = if !known.is_empty() && rng.gen_bool(0.3) {
                    self.model[&pick(rng)].data.clone()
                } else {
                    self.new_object(rng)
                };
                let fp = Fingerprint::of(&data);
                let broken = rng.gen_ratio(1, 20);
                let store_in = match rng.gen_range(0..4) {
                    _ if broken => StoreIn::new(0, Some(data.len() as u64 + 1), None),
                    0 => StoreIn::new(0, Some(data.len() as u64), Some(fp)),
                    1 => StoreIn::new(0, Some(data.len() as u64), None),
                    2 => StoreIn::new(data.len() as u64, None, None),
                    _ => StoreIn::new(0, None, None),
                };
                encode_request(&mut self.out, Opcode::Store, id, 0, store_in.as_bytes());
                let mut at = 0;
                loop {
                    let left = data.len() - at;
                    let n = rng.gen_range(0..=left.min(CHUNK_MAX as usize));
                    let n = if n == 0 && left > 0 { left.min(1) } else { n };
                    let last = at + n == data.len() && (left == 0 || rng.gen_bool(0.8));
                    encode_chunk_header(&mut self.out, n as u32, last);
                    self.out.extend_from_slice(&data[at..at + n]);
                    at += n;
                    if last {
                        break;
                    }
                }
                self.model.entry(fp).or_insert_with(|| Obj {
                    data,
                    refs: BTreeSet::from([0]),
                });
                self.push(id, Op::Store { fp, broken });
            }
            35..=54 => {
                let fp = pick(rng);
                let len = self.model[&fp].data.len() as u64;
                if rng.gen_bool(0.5) {
                    let body = RetrieveIn { fingerprint: fp };
                    encode_request(&mut self.out, Opcode::Retrieve, id, 0, body.as_bytes());
                    self.push(id, Op::Retrieve { fp, range: None });
                } else {
                    let offset = rng.gen_range(0..=len + 2);
                    let n = rng.gen_range(0..=len.saturating_sub(offset) + 1);
                    let body = RangeIn {
                        fingerprint: fp,
                        offset: offset.into(),
                        len: n.into(),
                    };
                    encode_request(&mut self.out, Opcode::RetrieveRange, id, 0, body.as_bytes());
                    self.push(
                        id,
                        Op::Retrieve {
                            fp,
                            range: Some((offset, n)),
                        },
                    );
                }
            }
            55..=74 => {
                let fp = pick(rng);
                let body = DeleteIn { fingerprint: fp };
                encode_request(&mut self.out, Opcode::Delete, id, 0, body.as_bytes());
                self.push(id, Op::Delete { fp });
            }
            75..=79 => {
                let body = ContentsIn {
                    flags: 0.into(),
                    reserved: 0.into(),
                };
                encode_request(&mut self.out, Opcode::GetContents, id, 0, body.as_bytes());
                self.push(id, Op::Contents);
            }
            80..=89 => {
                let ops = [
                    Opcode::Null,
                    Opcode::GetLoad,
                    Opcode::Heartbeat,
                    Opcode::GetDiskState,
                    Opcode::GetDiskStatus,
                ];
                let op = ops[rng.gen_range(0..ops.len())];
                let query = DiskQueryIn {
                    disk: ALL_DISKS.into(),
                    reserved: 0.into(),
                    reserved1: 0.into(),
                };
                let body: &[u8] = match op {
                    Opcode::GetDiskState | Opcode::GetDiskStatus => query.as_bytes(),
                    _ => &[],
                };
                encode_request(&mut self.out, op, id, 0, body);
                self.push(id, Op::Small(op));
            }
            90..=92 => {
                let raw = 0x7777;
                let h = Header::new_raw(Kind::Request, raw, id, 0, 0);
                self.out.extend_from_slice(h.as_bytes());
                self.push(id, Op::Unknown(raw));
            }
            _ => {
                let fp = pick(rng);
                self.issue_udp(rng, id, fp)
            }
        }
    }

    fn issue_verify(&mut self) {
        let fps: Vec<Fingerprint> = self.model.keys().copied().collect();
        for fp in fps {
            let id = self.id();
            let body = RetrieveIn { fingerprint: fp };
            encode_request(&mut self.out, Opcode::Retrieve, id, 0, body.as_bytes());
            self.push(id, Op::Retrieve { fp, range: None });
        }
    }

    /// A LOCATE over UDP; only sent when nothing is in flight on the connection, and
    /// nothing is sent until it is answered (so the model is exact meanwhile).
    fn issue_udp(&mut self, rng: &mut StdRng, id: u64, fp: Fingerprint) {
        if !self.inflight.is_empty() || self.out_pos < self.out.len() {
            return;
        }
        self.udp = Some(UdpWait {
            id,
            fp,
            multicast: rng.gen_bool(0.3),
            deadline: 0,
        });
    }

    /// Checks one reply (`data`: the streamed bytes, if any) against the model.
    fn check(&mut self, seed: u64, header: &Header, body: &[u8], data: Option<Vec<u8>>) {
        let Some(f) = self.inflight.pop_front() else {
            fail(
                seed,
                format!("client {}: a reply with nothing asked", self.idx),
            );
        };
        let who = format!("client {} request {:#x} {:?}", self.idx, f.id, f.op);
        if header.request_id.get() != f.id {
            fail(
                seed,
                format!("{who}: reply for {:#x}", header.request_id.get()),
            );
        }
        let Ok((status, detail)) = out_status(body) else {
            fail(seed, format!("{who}: reply without a status"));
        };
        self.answered += 1;
        match f.op {
            Op::Store { fp, broken } => {
                let obj = self.model.get_mut(&fp).expect("modelled");
                if broken {
                    if status != Status::ChecksumMismatch || detail != MISMATCH_LEN {
                        fail(seed, format!("{who}: a broken promise got {status:?}"));
                    }
                    return;
                }
                match status {
                    Status::Success => {
                        let out = StoreOut::read_from_bytes(body)
                            .unwrap_or_else(|_| fail(seed, format!("{who}: StoreOut size")));
                        let k = out.refcount.get();
                        if out.fingerprint != fp || out.len.get() != obj.data.len() as u64 {
                            fail(seed, format!("{who}: wrong StoreOut {out:?}"));
                        }
                        if k == 0 || !obj.refs.contains(&(k - 1)) {
                            fail(
                                seed,
                                format!("{who}: refcount {k}, possible {:?}", obj.refs),
                            );
                        }
                        obj.refs = BTreeSet::from([k]);
                    }
                    Status::Busy | Status::NoSpace => {}
                    s => fail(seed, format!("{who}: {s:?} ({detail})")),
                }
            }
            Op::Retrieve { fp, range } => {
                let obj = self.model.get_mut(&fp).expect("modelled");
                let len = obj.data.len() as u64;
                match status {
                    Status::Success => {
                        let (off, n) = range.unwrap_or((0, len));
                        let Some(data) = data else {
                            fail(seed, format!("{who}: SUCCESS without a stream"));
                        };
                        if off + n > len || data[..] != obj.data[off as usize..(off + n) as usize] {
                            fail(seed, format!("{who}: wrong bytes ({} of them)", data.len()));
                        }
                        obj.refs.remove(&0);
                        if obj.refs.is_empty() {
                            fail(seed, format!("{who}: found, but the model says it is gone"));
                        }
                    }
                    Status::NotFound => {
                        if !obj.refs.contains(&0) {
                            fail(seed, format!("{who}: NOT_FOUND, possible {:?}", obj.refs));
                        }
                        obj.refs = BTreeSet::from([0]);
                    }
                    Status::OutOfRange => {
                        let Some((off, n)) = range else {
                            fail(seed, format!("{who}: OUT_OF_RANGE on a whole RETRIEVE"));
                        };
                        if off + n <= len {
                            fail(seed, format!("{who}: OUT_OF_RANGE for {off}+{n} of {len}"));
                        }
                        obj.refs.remove(&0);
                        if obj.refs.is_empty() {
                            fail(seed, format!("{who}: found, but the model says it is gone"));
                        }
                    }
                    s => fail(seed, format!("{who}: {s:?} ({detail})")),
                }
            }
            Op::Delete { fp } => {
                let obj = self.model.get_mut(&fp).expect("modelled");
                match status {
                    Status::Success => {
                        let out = DeleteOut::read_from_bytes(body)
                            .unwrap_or_else(|_| fail(seed, format!("{who}: DeleteOut size")));
                        let k = out.refcount.get();
                        if !obj.refs.contains(&(k + 1)) {
                            fail(seed, format!("{who}: {k} left, possible {:?}", obj.refs));
                        }
                        obj.refs = BTreeSet::from([k]);
                    }
                    Status::NotFound => {
                        if !obj.refs.contains(&0) {
                            fail(seed, format!("{who}: NOT_FOUND, possible {:?}", obj.refs));
                        }
                        obj.refs = BTreeSet::from([0]);
                    }
                    s => fail(seed, format!("{who}: {s:?} ({detail})")),
                }
            }
            Op::Contents => {
                if status != Status::Success {
                    fail(seed, format!("{who}: {status:?}"));
                }
                let data = data.unwrap_or_default();
                let listed: BTreeSet<Fingerprint> = data
                    .chunks_exact(size_of::<ContentsEntry>())
                    .filter_map(|e| ContentsEntry::read_from_bytes(e).ok())
                    .filter(|e| e.disk.get() != CONTENTS_PADDING_DISK)
                    .map(|e| e.fingerprint)
                    .collect();
                for (fp, obj) in &self.model {
                    let held = listed.contains(fp);
                    if (held && !obj.refs.iter().any(|r| *r > 0))
                        || (!held && !obj.refs.contains(&0))
                    {
                        fail(
                            seed,
                            format!("{who}: {fp} listed {held}, possible {:?}", obj.refs),
                        );
                    }
                }
            }
            Op::Small(op) => {
                if status != Status::Success || header.opcode.get() != op as u16 {
                    fail(seed, format!("{who}: {status:?}"));
                }
            }
            Op::Unknown(raw) => {
                if status != Status::UnknownOpcode || header.opcode.get() != raw {
                    fail(seed, format!("{who}: {status:?}"));
                }
            }
        }
    }

    /// Decodes what arrived; checks each complete reply.
    fn take_replies(&mut self, seed: u64) {
        let mut at = 0;
        loop {
            match self.dec.decode(&self.rx[at..]) {
                Ok(Some((ev, n))) => {
                    match ev {
                        ResponseEvent::StreamStart { .. } => self.stream = Some(Vec::new()),
                        ResponseEvent::StreamData(d) => {
                            let d = d.to_vec();
                            self.stream
                                .get_or_insert_with(Vec::new)
                                .extend_from_slice(&d)
                        }
                        ResponseEvent::Response { header, body } => {
                            let body = body.to_vec();
                            let data = self.stream.take();
                            self.check(seed, &header, &body, data);
                        }
                    }
                    at += n;
                }
                Ok(None) => break,
                Err(e) => fail(seed, format!("client {}: undecodable reply: {e}", self.idx)),
            }
        }
        self.rx.drain(..at);
    }

    /// The connection was reset: what was sent whole may or may not have taken
    /// effect; a STORE cut short must have none.
    fn on_reset(&mut self) {
        self.resets += 1;
        let sent = self.out_base + self.out_pos as u64;
        for f in self.inflight.drain(..) {
            if f.end > sent {
                // Cut short: it must have had no effect, and the model keeps it so.
                if matches!(f.op, Op::Store { .. }) {
                    self.stores_cut += 1;
                }
                continue;
            }
            match f.op {
                Op::Store { fp, broken: false } => {
                    let obj = self.model.get_mut(&fp).expect("modelled");
                    let more: Vec<u32> = obj.refs.iter().map(|r| r + 1).collect();
                    obj.refs.extend(more);
                }
                Op::Delete { fp } => {
                    let obj = self.model.get_mut(&fp).expect("modelled");
                    let less: Vec<u32> =
                        obj.refs.iter().filter(|r| **r > 0).map(|r| r - 1).collect();
                    obj.refs.extend(less);
                }
                _ => {}
            }
        }
        self.out.clear();
        self.out_pos = 0;
        self.out_base = 0;
        self.rx.clear();
        self.dec = ResponseDecoder::new(OBJECT_MAX * 2);
        self.stream = None;
    }

    /// One turn of the client: connect, maybe queue requests, send, read, maybe reset.
    fn step(&mut self, seed: u64, net: &mut SimPort) {
        let mut rng = StdRng::seed_from_u64(net.rng().gen());
        let rng = &mut rng;
        if self.finished {
            return;
        }
        if let Some((old, after)) = self.settling {
            match after {
                None if net.client_sees_close(old) => {
                    net.client_forget(old);
                    self.settling = Some((old, Some(net.turn() + SETTLE_TURNS)));
                }
                Some(t) if net.turn() >= t => self.settling = None,
                _ => {}
            }
            return;
        }
        let Some(conn) = self.conn else {
            self.conn = Some(net.connect(self.addr));
            return;
        };
        // UDP: send the LOCATE once, then wait for its answer (or silence).
        if let Some(w) = &mut self.udp {
            if w.deadline == 0 {
                w.deadline = net.turn() + 50;
                let mut msg = Vec::new();
                let body = LocateIn { fingerprint: w.fp };
                encode_request(&mut msg, Opcode::Locate, w.id, 0, body.as_bytes());
                let via = if w.multicast {
                    Dgram::Multicast
                } else {
                    Dgram::Unicast
                };
                net.client_datagram(self.addr, via, &msg);
            }
            return;
        }
        if !self.fin_sent && self.inflight.len() < self.depth && rng.gen_bool(0.5) {
            if self.ops_left > 0 {
                self.ops_left -= 1;
                self.issue(rng);
            } else if !self.verifying {
                self.verifying = true;
                self.issue_verify();
            } else if self.inflight.is_empty() && self.out_pos == self.out.len() {
                net.client_fin(conn);
                self.fin_sent = true;
            }
        }
        if self.out_pos < self.out.len() {
            let want = rng.gen_range(1..=self.out.len() - self.out_pos);
            self.out_pos += net.client_send(conn, &self.out[self.out_pos..self.out_pos + want]);
            if self.out_pos == self.out.len() {
                self.out_base += self.out.len() as u64;
                self.out.clear();
                self.out_pos = 0;
            }
        }
        if rng.gen_bool(0.8) {
            let max = rng.gen_range(1..=512 * 1024);
            net.client_recv(conn, &mut self.rx, max);
            self.take_replies(seed);
        }
        if self.fin_sent && net.client_sees_close(conn) {
            if !self.inflight.is_empty() {
                fail(
                    seed,
                    format!("client {}: closed with replies missing", self.idx),
                );
            }
            self.finished = true;
            return;
        }
        if !self.inflight.is_empty() && !self.fin_sent && rng.gen_ratio(1, 250) {
            net.client_reset(conn);
            self.on_reset();
            self.conn = None;
            self.settling = Some((conn, None));
        }
    }

    /// A datagram from the node to this client (or to the group, for its LOCATE).
    fn on_datagram(&mut self, seed: u64, body_msg: &[u8]) -> bool {
        let Some(w) = &self.udp else {
            return false;
        };
        let Ok((header, body)) = Header::read_from_prefix(body_msg) else {
            fail(seed, "an undecodable datagram".into());
        };
        if header.request_id.get() != w.id {
            return false;
        }
        let obj = &self.model[&w.fp];
        let held = !obj.refs.contains(&0);
        let gone = obj.refs == BTreeSet::from([0]);
        let Ok((status, _)) = out_status(body) else {
            fail(seed, "a datagram without a status".into());
        };
        match status {
            Status::Success => {
                let Ok(out) =
                    LocateOut::read_from_bytes(&body[..size_of::<LocateOut>().min(body.len())])
                else {
                    fail(seed, "LocateOut size".into());
                };
                if gone || out.fingerprint != w.fp || out.object_len.get() != obj.data.len() as u64
                {
                    fail(
                        seed,
                        format!("client {}: LOCATE {} found wrongly", self.idx, w.fp),
                    );
                }
            }
            Status::NotFound if !w.multicast && !held => {}
            s => fail(
                seed,
                format!("client {}: LOCATE {} got {s:?}", self.idx, w.fp),
            ),
        }
        self.udp = None;
        self.answered += 1;
        true
    }

    /// A LOCATE to the group for an object not held gets no answer at all.
    fn udp_deadline(&mut self, seed: u64, turn: u64) {
        if let Some(w) = &self.udp {
            if w.deadline != 0 && turn > w.deadline {
                let held = !self.model[&w.fp].refs.contains(&0);
                if !w.multicast || held {
                    fail(
                        seed,
                        format!("client {}: LOCATE {} never answered", self.idx, w.fp),
                    );
                }
                self.udp = None;
            }
        }
    }
}

fn config(listen: SocketAddr) -> ServerConfig {
    ServerConfig {
        listen,
        multicast_group: GROUP,
        multicast_if: Ipv4Addr::LOCALHOST,
        chunk_max: CHUNK_MAX,
        connections_max: 16,
        idle_sleep: Duration::from_millis(10),
        checkpoint_interval: Duration::from_secs(3600),
        request_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(60),
        header_timeout: Duration::from_secs(10),
        transfer_rate_min: 0,
        test_stall: None,
        auth: None,
    }
}

/// One seed: a node on two memory disks, `clients` clients of `ops` requests each.
/// Returns (turns, requests answered, resets, STOREs cut short by a reset).
fn run_seed(seed: u64, clients: u8, ops: u32) -> (u64, u64, u64, u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let disks: Vec<MemDisk> = (0..2)
        .map(|i| MemDisk::new(32 * MIB, seed * 2 + i))
        .collect();
    for d in &disks {
        d.set_latency(Latency {
            max_polls: rng.gen_range(0..6),
            reorder: true,
        });
    }
    let store_cfg = StoreConfig {
        max_object_bytes: OBJECT_MAX,
        ..StoreConfig::default()
    };
    let devices = disks.iter().map(|d| Box::new(d.device()) as _).collect();
    let store = Store::open(devices, store_cfg, seed).expect("store");
    let (_handle, end) = crate::handle::handle_pair();
    let listen: SocketAddr = "10.0.0.100:7070".parse().expect("address");
    let net_cfg = SimConfig {
        delay_turns_max: rng.gen_range(0..8),
        segment_bytes_max: [64, 1500, 64 * 1024][rng.gen_range(0..3)],
    };
    let port = SimPort::new(seed, net_cfg, listen);
    let mut server = Server::with_port(
        port,
        config(listen),
        super::shards::Shards::new(store, None),
        end,
    )
    .expect("server");
    let mut cs: Vec<Client> = (0..clients)
        .map(|i| Client::new(i, ops, rng.gen_range(1..=4)))
        .collect();
    loop {
        let turn = server.port.turn();
        if turn > TURNS_MAX {
            let stuck: Vec<_> = cs
                .iter()
                .filter(|c| !c.finished)
                .map(|c| (c.idx, c.inflight.len(), c.ops_left))
                .collect();
            fail(seed, format!("stuck after {turn} turns: {stuck:?}"));
        }
        for c in cs.iter_mut() {
            c.step(seed, &mut server.port);
            c.udp_deadline(seed, turn);
        }
        for (via, to, msg) in server.port.take_datagrams() {
            let to_group = to == SocketAddr::V4(GROUP);
            if via == Dgram::Multicast && !to_group {
                fail(seed, format!("a multicast answer sent to {to}"));
            }
            let taken = cs
                .iter_mut()
                .filter(|c| to_group || c.addr == to)
                .any(|c| c.on_datagram(seed, &msg));
            if !taken {
                fail(seed, format!("a datagram to {to} nobody asked for"));
            }
        }
        if cs.iter().all(|c| c.finished) && server.port.quiet() {
            break;
        }
        if let Err(e) = server.turn() {
            fail(seed, format!("the loop failed: {e}"));
        }
    }
    let turns = server.port.turn();
    let answered = cs.iter().map(|c| c.answered).sum();
    let resets = cs.iter().map(|c| c.resets).sum();
    let cut = cs.iter().map(|c| c.stores_cut).sum();
    // The store agrees with every model where the model is sure, and holds nothing
    // else: no STORE cut short left an object behind (under any fingerprint).
    let store = server.shut_down();
    for (fp, _) in store.contents() {
        let maybe = cs.iter().any(|c| {
            c.model
                .get(&fp)
                .is_some_and(|o| o.refs.iter().any(|r| *r > 0))
        });
        if !maybe {
            fail(
                seed,
                format!("the store holds {fp}, which no client may have stored"),
            );
        }
    }
    for c in &cs {
        for (fp, obj) in &c.model {
            let held = store.get(fp).is_some();
            if (held && obj.refs.contains(&0) && obj.refs.len() == 1)
                || (!held && !obj.refs.contains(&0))
            {
                fail(
                    seed,
                    format!("client {}: {fp} held {held}, model {:?}", c.idx, obj.refs),
                );
            }
        }
    }
    (turns, answered, resets, cut)
}

#[test]
fn sim_every_operation_pipelined_over_a_rough_network_matches_the_model() {
    let mut total = (0, 0, 0, 0);
    for seed in seeds(1, 32) {
        let (turns, answered, resets, cut) = run_seed(seed, 4, 30);
        total.0 += turns;
        total.1 += answered;
        total.2 += resets;
        total.3 += cut;
    }
    eprintln!(
        "simulated {} turns: {} requests answered, {} resets, {} STOREs cut short",
        total.0, total.1, total.2, total.3
    );
}

#[test]
fn sim_a_seed_replays_exactly() {
    let a = run_seed(7, 3, 15);
    let b = run_seed(7, 3, 15);
    assert_eq!(a, b, "the same seed took a different course");
}

/// Deadlines run on the port's clock: a STORE whose client goes quiet halfway is
/// closed after `request_timeout` of virtual time and leaves nothing, while an idle
/// connection next to it lives until `idle_timeout`.
#[test]
fn sim_a_store_left_halfway_times_out_on_the_virtual_clock() {
    for seed in seeds(100, 4) {
        let disk = MemDisk::new(32 * MIB, seed);
        let store = Store::open(vec![Box::new(disk.device())], StoreConfig::default(), seed)
            .expect("store");
        let (handle, end) = crate::handle::handle_pair();
        let listen: SocketAddr = "10.0.0.100:7070".parse().expect("address");
        let cfg = ServerConfig {
            request_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            ..config(listen)
        };
        let port = SimPort::new(seed, SimConfig::default(), listen);
        let mut server = Server::with_port(port, cfg, super::shards::Shards::new(store, None), end)
            .expect("server");
        let peer = |i| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, i), 1));
        let halfway = server.port.connect(peer(1));
        let idle = server.port.connect(peer(2));
        let mut msg = Vec::new();
        let store_in = StoreIn::new(0, Some(1000), None);
        encode_request(&mut msg, Opcode::Store, 1, 0, store_in.as_bytes());
        encode_chunk_header(&mut msg, 1000, true);
        msg.extend_from_slice(&[7u8; 400]);
        assert_eq!(server.port.client_send(halfway, &msg), msg.len());
        let mut closed_at = None;
        while server.port.turn() < 10_000 {
            server.turn().expect("turn");
            let t = server.port.turn();
            if closed_at.is_none() && server.port.client_sees_close(halfway) {
                closed_at = Some(t);
                assert!(
                    !server.port.client_sees_close(idle),
                    "seed {seed}: idle closed early"
                );
            }
            if server.port.client_sees_close(idle) {
                break;
            }
        }
        let closed_at = closed_at.unwrap_or_else(|| fail(seed, "the STORE never timed out".into()));
        // Virtual milliseconds: past the deadline, within a scan and the delivery delay.
        assert!(
            (2000..2300).contains(&closed_at),
            "seed {seed}: closed at {closed_at}"
        );
        let idle_closed = server.port.turn();
        assert!(
            (5000..5300).contains(&idle_closed),
            "seed {seed}: idle closed at {idle_closed}"
        );
        assert_eq!(
            crate::stats::NodeStats::get(&handle.stats.of_loop(0).expect("loop 0").stores_aborted),
            1
        );
        let store = server.shut_down();
        assert!(
            store.contents().is_empty(),
            "seed {seed}: a timed-out STORE left an object"
        );
    }
}

/// The session's and the cluster service's refusal path on a keyed node, on the
/// virtual network with a fixed clock: pipelined refusals keep the connection in step
/// and open, a refused STORE's chunks are skipped, and nothing is stored or deleted.
#[test]
fn sim_a_keyed_node_refuses_unsigned_forged_replayed_and_stale_requests() {
    use dosp::auth::{CertMode, KeyRing};
    use dosp::signed::{sign_in_place, Refusal};

    const NOW_MS: u64 = 1_800_000_000_000;
    const KEY: &str = "k1 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const FORGED: &str = "k1 ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";
    for seed in seeds(300, 4) {
        let disk = MemDisk::new(32 * MIB, seed);
        let store = Store::open(vec![Box::new(disk.device())], StoreConfig::default(), seed)
            .expect("store");
        let (handle, end) = crate::handle::handle_pair();
        let listen: SocketAddr = "10.0.0.100:7070".parse().expect("address");
        let auth = super::auth::NodeAuth::new(
            KeyRing::parse(KEY).expect("key"),
            false,
            Duration::from_secs(60),
            16,
        )
        .with_clock(|| NOW_MS);
        let cfg = ServerConfig {
            auth: Some(std::sync::Arc::new(auth)),
            ..config(listen)
        };
        let port = SimPort::new(seed, SimConfig::default(), listen);
        let mut server = Server::with_port(port, cfg, super::shards::Shards::new(store, None), end)
            .expect("server");
        let peer = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 1), 1));
        let conn = server.port.connect(peer);

        let sign = |msg: &mut Vec<u8>, at: usize, key: &str, ts: u64, nonce: u64| {
            let ring = KeyRing::parse(key).expect("key");
            sign_in_place(msg, at, ring.signer(), CertMode::HmacSha256, ts, nonce);
        };
        let data = [9u8; 3000];
        let fp = Fingerprint::of(&data);
        let store_frame = |key: &str, ts: u64, nonce: u64| {
            let mut m = Vec::new();
            encode_request(
                &mut m,
                Opcode::Store,
                nonce,
                0,
                StoreIn::new(0, Some(3000), None).as_bytes(),
            );
            sign(&mut m, 0, key, ts, nonce);
            encode_chunk_header(&mut m, 1000, false);
            m.extend_from_slice(&data[..1000]);
            encode_chunk_header(&mut m, 2000, true);
            m.extend_from_slice(&data[1000..]);
            m
        };
        let mut msg = Vec::new();
        // 1: unsigned NULL.
        encode_request(&mut msg, Opcode::Null, 1, 0, &[]);
        // 2: a STORE with a forged certificate, its chunks after it.
        msg.extend_from_slice(&store_frame(FORGED, NOW_MS, 2));
        // 3, 4: a good STORE, then the same frame again.
        let good = store_frame(KEY, NOW_MS, 3);
        msg.extend_from_slice(&good);
        msg.extend_from_slice(&good);
        // 5: a DELETE from two minutes ago (the window is one).
        let at = msg.len();
        encode_request(&mut msg, Opcode::Delete, 5, 0, fp.0.as_bytes());
        sign(&mut msg, at, KEY, NOW_MS - 120_000, 5);
        // 6: a signed NULL without a time.
        let at = msg.len();
        encode_request(&mut msg, Opcode::Null, 6, 0, &[]);
        sign(&mut msg, at, KEY, 0, 6);
        let mut sent = 0;
        let mut got = Vec::new();
        let mut replies: Vec<(u16, u32)> = Vec::new();
        let mut decoder = ResponseDecoder::new(u64::MAX);
        while replies.len() < 6 && server.port.turn() < TURNS_MAX {
            if sent < msg.len() {
                sent += server.port.client_send(conn, &msg[sent..]);
            }
            server.turn().expect("turn");
            server.port.client_recv(conn, &mut got, usize::MAX);
            let mut at = 0;
            while let Some((ev, n)) = decoder.decode(&got[at..]).expect("a well-formed reply") {
                at += n;
                if let dosp::codec::ResponseEvent::Response { body, .. } = ev {
                    let (head, _) = OutHead::read_from_prefix(body).expect("an OutHead");
                    replies.push((head.status.get(), head.detail.get()));
                }
            }
            got.drain(..at);
        }
        let auth_failed = |r: Refusal| (Status::AuthFailed as u16, r.code());
        assert_eq!(
            replies,
            vec![
                auth_failed(Refusal::Unsigned),
                auth_failed(Refusal::BadCertificate),
                (Status::Success as u16, 0),
                auth_failed(Refusal::Replayed),
                auth_failed(Refusal::Timestamp),
                (Status::Success as u16, 0),
            ],
            "seed {seed}"
        );
        assert!(!server.port.client_sees_close(conn), "seed {seed}: closed");

        // Datagrams: an unsigned NULL to the unicast address gets AUTH_FAILED; an
        // unsigned LOCATE to the group gets nothing; a signed one is answered, signed.
        let mut null = Vec::new();
        encode_request(&mut null, Opcode::Null, 7, 0, &[]);
        server.port.client_datagram(peer, Dgram::Unicast, &null);
        let mut locate = Vec::new();
        encode_request(
            &mut locate,
            Opcode::Locate,
            8,
            FLAG_MULTICAST,
            fp.0.as_bytes(),
        );
        server.port.client_datagram(peer, Dgram::Multicast, &locate);
        sign(&mut locate, 0, KEY, 0, 9);
        server.port.client_datagram(peer, Dgram::Multicast, &locate);
        let mut heard = Vec::new();
        for _ in 0..200 {
            server.turn().expect("turn");
            heard.extend(server.port.take_datagrams());
        }
        let ring = KeyRing::parse(KEY).expect("key");
        let signer = dosp::signed::Signer::new(ring, CertMode::HmacSha256);
        let mut summary: Vec<(Dgram, u64, u16, bool)> = heard
            .iter()
            .map(|(via, _, d)| {
                let (h, body) = Header::read_from_prefix(d).expect("a header");
                let body = &body[..h.body_len.get() as usize];
                let (head, _) = OutHead::read_from_prefix(body).expect("an OutHead");
                (
                    *via,
                    h.request_id.get(),
                    head.status.get(),
                    signer.check(&h, body) == Ok(true),
                )
            })
            .collect();
        // The network may reorder datagrams.
        summary.sort_by_key(|s| s.1);
        assert_eq!(
            summary,
            vec![
                (Dgram::Unicast, 7, Status::AuthFailed as u16, false),
                (Dgram::Multicast, 8, Status::Success as u16, true),
            ],
            "seed {seed}"
        );

        let stats = handle.stats.of_loop(0).expect("loop 0");
        let counts: Vec<u64> = Refusal::ALL
            .iter()
            .map(|&r| stats.auth_failed_count(r))
            .collect();
        // unsigned: NULL over TCP, NULL over UDP, LOCATE to the group.
        assert_eq!(counts, vec![3, 0, 1, 0, 1, 1, 0, 0, 0], "seed {seed}");
        let store = server.shut_down();
        assert_eq!(store.contents().len(), 1, "seed {seed}");
    }
}

/// Sends `msg` on `conn` and turns the server until `want` replies arrived: their
/// status and detail, in order.
fn exchange(
    server: &mut Server<SimPort>,
    conn: ConnId,
    msg: &[u8],
    want: usize,
) -> Vec<(u16, u32)> {
    let mut sent = 0;
    let mut got = Vec::new();
    let mut replies = Vec::new();
    let mut decoder = ResponseDecoder::new(u64::MAX);
    while replies.len() < want && server.port.turn() < TURNS_MAX {
        if sent < msg.len() {
            sent += server.port.client_send(conn, &msg[sent..]);
        }
        server.turn().expect("turn");
        server.port.client_recv(conn, &mut got, usize::MAX);
        let mut at = 0;
        while let Some((ev, n)) = decoder.decode(&got[at..]).expect("a well-formed reply") {
            at += n;
            if let ResponseEvent::Response { body, .. } = ev {
                let (head, _) = OutHead::read_from_prefix(body).expect("an OutHead");
                replies.push((head.status.get(), head.detail.get()));
            }
        }
        got.drain(..at);
    }
    replies
}

/// Capability tokens (trailer mode 3, dosp/PROTOCOL.md §7) through a keyed node on the
/// virtual network: a store token stores twice (no replay memory), a STORE over its
/// limit is refused with its chunks skipped, a retrieve token reads a range and is
/// refused for DELETE, an expired one is refused; the connection stays open.
#[test]
fn sim_capability_tokens_are_checked_on_the_node() {
    use dosp::auth::{CapOp, Capability, KeyRing, Token};
    use dosp::signed::{present_in_place, Refusal};

    const NOW_MS: u64 = 1_800_000_000_000;
    const NOW_S: u64 = NOW_MS / 1000;
    const KEY: &str = "k1 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    let ring = KeyRing::parse(KEY).expect("key");
    let token = |op, expires_unix_s| {
        Token::parse(&ring.mint(&Capability { op, expires_unix_s })).expect("token")
    };
    for seed in seeds(301, 4) {
        let disk = MemDisk::new(32 * MIB, seed);
        let store = Store::open(vec![Box::new(disk.device())], StoreConfig::default(), seed)
            .expect("store");
        let (handle, end) = crate::handle::handle_pair();
        let listen: SocketAddr = "10.0.0.100:7070".parse().expect("address");
        // A replay memory of one request: tokens never touch it.
        let auth = super::auth::NodeAuth::new(ring.clone(), false, Duration::from_secs(60), 1)
            .with_clock(|| NOW_MS);
        let cfg = ServerConfig {
            auth: Some(std::sync::Arc::new(auth)),
            ..config(listen)
        };
        let port = SimPort::new(seed, SimConfig::default(), listen);
        let mut server = Server::with_port(port, cfg, super::shards::Shards::new(store, None), end)
            .expect("server");
        let peer = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 1), 1));
        let conn = server.port.connect(peer);

        let data = [5u8; 3000];
        let fp = Fingerprint::of(&data);
        let store_frame = |t: &Token, id: u64| {
            let mut m = Vec::new();
            encode_request(
                &mut m,
                Opcode::Store,
                id,
                0,
                StoreIn::new(0, Some(3000), None).as_bytes(),
            );
            present_in_place(&mut m, 0, t);
            encode_chunk_header(&mut m, 1000, false);
            m.extend_from_slice(&data[..1000]);
            encode_chunk_header(&mut m, 2000, true);
            m.extend_from_slice(&data[1000..]);
            m
        };
        let fits = token(CapOp::Store { max_bytes: 3000 }, NOW_S + 60);
        let short = token(CapOp::Store { max_bytes: 2999 }, NOW_S + 60);
        let mut msg = store_frame(&fits, 1);
        msg.extend_from_slice(&store_frame(&fits, 2));
        msg.extend_from_slice(&store_frame(&short, 3));
        let auth_failed = |r: Refusal| (Status::AuthFailed as u16, r.code());
        let ok = (Status::Success as u16, 0);
        assert_eq!(
            exchange(&mut server, conn, &msg, 3),
            vec![ok, ok, auth_failed(Refusal::TokenScope)],
            "seed {seed}"
        );

        let read = token(CapOp::Retrieve(fp), NOW_S + 60);
        let expired = token(CapOp::Retrieve(fp), NOW_S);
        let mut msg = Vec::new();
        let range = RangeIn {
            fingerprint: fp,
            offset: 10.into(),
            len: 20.into(),
        };
        encode_request(&mut msg, Opcode::RetrieveRange, 4, 0, range.as_bytes());
        present_in_place(&mut msg, 0, &read);
        for (id, op, t) in [(5, Opcode::Delete, &read), (6, Opcode::Retrieve, &expired)] {
            let at = msg.len();
            encode_request(&mut msg, op, id, 0, fp.0.as_bytes());
            present_in_place(&mut msg, at, t);
        }
        assert_eq!(
            exchange(&mut server, conn, &msg, 3),
            vec![
                ok,
                auth_failed(Refusal::TokenScope),
                auth_failed(Refusal::TokenExpired),
            ],
            "seed {seed}"
        );
        assert!(!server.port.client_sees_close(conn), "seed {seed}: closed");

        let stats = handle.stats.of_loop(0).expect("loop 0");
        let counts: Vec<u64> = Refusal::ALL
            .iter()
            .map(|&r| stats.auth_failed_count(r))
            .collect();
        assert_eq!(counts, vec![0, 0, 0, 0, 0, 0, 0, 1, 2], "seed {seed}");
        let store = server.shut_down();
        assert_eq!(store.contents().len(), 1, "seed {seed}");
        assert_eq!(store.get(&fp).map(|m| m.refcount), Some(2), "seed {seed}");
    }
}
