//! A seeded, in-memory network: [`SimPort`] implements [`NetPort`] for the loop, and
//! offers the other end of every connection (and of the datagram endpoints) to
//! simulated clients in the same thread.
//!
//! Everything random comes from one seeded [`StdRng`], the clock is virtual (one
//! millisecond per [`NetPort::wait`]), and every collection is ordered, so a seed
//! replays exactly. What it does to the traffic:
//! - partial writes: the client's bytes travel as segments of random sizes, each
//!   delivered after a random number of turns (never overtaking an earlier segment of
//!   the same connection, as TCP guarantees); the loop's `send` takes a random prefix;
//! - partial reads: one `recv` moves a random part of what has arrived;
//! - reordering between connections: what is ready is reported in a random order, and
//!   each connection's segments have their own delays;
//! - resets: a client may reset its connection at any time; bytes still in flight
//!   are lost, and the loop's next `recv`/`send` on it fails with `ConnectionReset`.
//!
//! Flow control is modelled by bounded buffers both ways: the node's receive buffer
//! (the kernel port's size) and the client's (unread replies).

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::port::{ConnId, ConnState, Dgram, NetPort, Ready, Received, RBUF_BYTES};

/// Unread reply bytes a simulated client lets the node queue before `send` blocks.
const CLIENT_RX_BYTES: usize = 256 * 1024;
/// Bytes a client may have in flight or unread by the node before its writes block.
const CLIENT_TX_BYTES: usize = 512 * 1024;
/// Connections the loop takes per `accept` call.
const ACCEPT_BURST: usize = 16;

/// How rough the simulated network is.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    /// Segments and datagrams are delivered 0..=this many turns after they were sent.
    pub delay_turns_max: u64,
    /// Largest segment a client write is cut into.
    pub segment_bytes_max: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            delay_turns_max: 4,
            segment_bytes_max: 64 * 1024,
        }
    }
}

#[derive(Debug, Default)]
struct SimConn {
    peer: Option<SocketAddr>,
    /// Client → node segments with the turn each is due.
    in_flight: VecDeque<(u64, Vec<u8>)>,
    /// The due turn of the last segment sent, so none overtakes it.
    last_due: u64,
    /// Arrived at the node and not consumed yet (its receive buffer).
    rx: Vec<u8>,
    /// The client's FIN, due at this turn (after every segment before it).
    fin_due: Option<u64>,
    /// The node has seen the FIN.
    eof: bool,
    /// Node → client bytes the client has not read.
    to_client: VecDeque<u8>,
    /// The client reset the connection.
    reset: bool,
    /// The node closed (or refused) the connection.
    node_closed: bool,
    /// Accepted by the node.
    accepted: bool,
    /// The client read replies since the last wait: room to send again.
    drained: bool,
}

/// The simulated network, node side and client side. See the module docs.
#[derive(Debug)]
pub struct SimPort {
    rng: StdRng,
    cfg: SimConfig,
    base: Instant,
    /// Virtual milliseconds since `base`; one per `wait`.
    turn: u64,
    local: SocketAddr,
    conns: BTreeMap<ConnId, SimConn>,
    next_conn: u64,
    /// Connections waiting to be accepted, with the turn each is due.
    backlog: VecDeque<(u64, ConnId)>,
    /// Datagrams to the node: due turn, endpoint, sender, bytes.
    dgrams_in: Vec<(u64, Dgram, SocketAddr, Vec<u8>)>,
    /// Datagrams from the node: endpoint, destination, bytes.
    dgrams_out: Vec<(Dgram, SocketAddr, Vec<u8>)>,
}

impl SimPort {
    pub fn new(seed: u64, cfg: SimConfig, local: SocketAddr) -> SimPort {
        SimPort {
            rng: StdRng::seed_from_u64(seed),
            cfg,
            base: Instant::now(),
            turn: 0,
            local,
            conns: BTreeMap::new(),
            next_conn: 1,
            backlog: VecDeque::new(),
            dgrams_in: Vec::new(),
            dgrams_out: Vec::new(),
        }
    }

    /// The network's random source, for the simulated clients too (one seed for all).
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    pub fn turn(&self) -> u64 {
        self.turn
    }

    fn due(&mut self) -> u64 {
        self.turn + self.rng.gen_range(0..=self.cfg.delay_turns_max)
    }

    // --- The clients' side -------------------------------------------------------

    /// A client at `peer` connects; the node accepts it after a random delay.
    pub fn connect(&mut self, peer: SocketAddr) -> ConnId {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        self.conns.insert(
            id,
            SimConn {
                peer: Some(peer),
                ..SimConn::default()
            },
        );
        let due = self.due();
        self.backlog.push_back((due, id));
        id
    }

    /// The client writes `data`; returns how much the network took (flow control),
    /// cut into segments of random sizes and delays.
    pub fn client_send(&mut self, conn: ConnId, data: &[u8]) -> usize {
        let seg_max = self.cfg.segment_bytes_max.max(1);
        let Some(c) = self.conns.get(&conn) else {
            return 0;
        };
        if c.reset || c.node_closed || c.fin_due.is_some() {
            return 0;
        }
        let queued: usize = c.in_flight.iter().map(|(_, s)| s.len()).sum::<usize>() + c.rx.len();
        let n = data.len().min(CLIENT_TX_BYTES.saturating_sub(queued));
        let mut at = 0;
        while at < n {
            let len = self.rng.gen_range(1..=seg_max.min(n - at));
            let due = self.due();
            let Some(c) = self.conns.get_mut(&conn) else {
                return 0;
            };
            let due = due.max(c.last_due);
            c.last_due = due;
            c.in_flight.push_back((due, data[at..at + len].to_vec()));
            at += len;
        }
        n
    }

    /// The client reads up to `max` bytes of replies (a random amount of what is
    /// there), appending them to `out`.
    pub fn client_recv(&mut self, conn: ConnId, out: &mut Vec<u8>, max: usize) -> usize {
        let Some(avail) = self.conns.get(&conn).map(|c| c.to_client.len()) else {
            return 0;
        };
        if avail == 0 || max == 0 {
            return 0;
        }
        let n = self.rng.gen_range(1..=avail.min(max));
        let Some(c) = self.conns.get_mut(&conn) else {
            return 0;
        };
        out.extend(c.to_client.drain(..n));
        c.drained = true;
        n
    }

    /// The client closes its sending side (FIN after its last segment).
    pub fn client_fin(&mut self, conn: ConnId) {
        let due = self.due();
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.fin_due.is_none() {
                c.fin_due = Some(due.max(c.last_due));
            }
        }
    }

    /// The client resets the connection: what is in flight is lost.
    pub fn client_reset(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.reset = true;
            c.in_flight.clear();
            c.to_client.clear();
        }
    }

    /// Whether the node closed the connection and the client has read everything.
    pub fn client_sees_close(&self, conn: ConnId) -> bool {
        self.conns
            .get(&conn)
            .is_none_or(|c| c.node_closed && c.to_client.is_empty())
    }

    /// The client forgets a connection it is done with.
    pub fn client_forget(&mut self, conn: ConnId) {
        if self.conns.get(&conn).is_some_and(|c| c.node_closed) {
            self.conns.remove(&conn);
        }
    }

    /// A client at `from` sends a datagram to the node's `via` endpoint.
    pub fn client_datagram(&mut self, from: SocketAddr, via: Dgram, data: &[u8]) {
        let due = self.due();
        self.dgrams_in.push((due, via, from, data.to_vec()));
    }

    /// The datagrams the node sent since the last call.
    pub fn take_datagrams(&mut self) -> Vec<(Dgram, SocketAddr, Vec<u8>)> {
        std::mem::take(&mut self.dgrams_out)
    }

    /// Nothing left in flight to the node (connections, accepts, datagrams).
    pub fn quiet(&self) -> bool {
        self.backlog.is_empty()
            && self.dgrams_in.is_empty()
            && self
                .conns
                .values()
                .all(|c| c.in_flight.is_empty() && (c.fin_due.is_none() || c.eof))
    }
}

impl NetPort for SimPort {
    fn now(&mut self) -> Instant {
        self.base + Duration::from_millis(self.turn)
    }

    fn wait(&mut self, _timeout: Duration, ready: &mut Vec<Ready>) -> io::Result<()> {
        // Virtual time: every turn is a millisecond, however long the loop would sleep.
        self.turn += 1;
        let start = ready.len();
        let turn = self.turn;
        if self.backlog.front().is_some_and(|(due, _)| *due <= turn) {
            ready.push(Ready::Listener);
        }
        if self.dgrams_in.iter().any(|(due, ..)| *due <= turn) {
            ready.push(Ready::Datagrams);
        }
        for (id, c) in self.conns.iter_mut() {
            if !c.accepted || c.node_closed {
                continue;
            }
            let arrived = c.in_flight.front().is_some_and(|(due, _)| *due <= turn);
            let fin = c.fin_due.is_some_and(|due| due <= turn) && !c.eof;
            if arrived || fin || c.reset || std::mem::take(&mut c.drained) {
                ready.push(Ready::Conn(*id));
            }
        }
        ready[start..].shuffle(&mut self.rng);
        Ok(())
    }

    fn accept(&mut self, new: &mut Vec<(ConnId, SocketAddr)>) {
        for _ in 0..ACCEPT_BURST {
            match self.backlog.front() {
                Some((due, id)) if *due <= self.turn => {
                    let id = *id;
                    self.backlog.pop_front();
                    if let Some(c) = self.conns.get_mut(&id) {
                        // A connection reset before it was accepted is never seen.
                        if c.reset {
                            c.node_closed = true;
                            continue;
                        }
                        c.accepted = true;
                        if let Some(peer) = c.peer {
                            new.push((id, peer));
                        }
                    }
                }
                _ => break,
            }
        }
    }

    fn accept_due(&self) -> Option<Instant> {
        None
    }

    fn recv<F: FnOnce(&[u8]) -> usize>(&mut self, conn: ConnId, f: F) -> io::Result<Received> {
        let turn = self.turn;
        let take = self.rng.gen_range(1..=self.cfg.segment_bytes_max.max(1));
        let Some(c) = self.conns.get_mut(&conn) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        if c.reset {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        // A short read: part of what has arrived, as far as the buffer has room.
        let mut got = Received::default();
        let mut budget = take.min(RBUF_BYTES - c.rx.len());
        while budget > 0 {
            let Some((due, seg)) = c.in_flight.front_mut() else {
                break;
            };
            if *due > turn {
                break;
            }
            let n = budget.min(seg.len());
            c.rx.extend_from_slice(&seg[..n]);
            seg.drain(..n);
            if seg.is_empty() {
                c.in_flight.pop_front();
            }
            budget -= n;
            got.arrived += n;
        }
        if c.in_flight.is_empty() && c.fin_due.is_some_and(|due| due <= turn) {
            c.eof = true;
        }
        let n = f(&c.rx);
        c.rx.drain(..n.min(c.rx.len()));
        got.peer_closed = c.eof;
        Ok(got)
    }

    fn send(&mut self, conn: ConnId, data: &[u8]) -> io::Result<usize> {
        let all = self.rng.gen_bool(0.5);
        let Some(c) = self.conns.get(&conn) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        if c.reset {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        let room = CLIENT_RX_BYTES.saturating_sub(c.to_client.len());
        let most = room.min(data.len());
        if most == 0 {
            return if data.is_empty() {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = if all {
            most
        } else {
            self.rng.gen_range(1..=most)
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        c.to_client.extend(&data[..n]);
        Ok(n)
    }

    fn conn_state(&mut self, conn: ConnId) -> ConnState {
        let turn = self.turn;
        self.conns
            .get(&conn)
            .map(|c| ConnState {
                unread_input: !c.rx.is_empty()
                    || c.in_flight.front().is_some_and(|(due, _)| *due <= turn),
                peer_closed: c.eof,
            })
            .unwrap_or_default()
    }

    fn refuse(&mut self, conn: ConnId, reply: &[u8]) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if !c.reset {
                c.to_client.extend(reply);
            }
            c.in_flight.clear();
            c.rx.clear();
            c.node_closed = true;
        }
    }

    fn close(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.node_closed = true;
            c.in_flight.clear();
            c.rx.clear();
        }
    }

    fn recv_datagram(
        &mut self,
        via: Dgram,
        buf: &mut [u8],
    ) -> io::Result<Option<(usize, SocketAddr)>> {
        let turn = self.turn;
        let Some(i) = self
            .dgrams_in
            .iter()
            .position(|(due, v, ..)| *v == via && *due <= turn)
        else {
            return Ok(None);
        };
        let (_, _, from, data) = self.dgrams_in.remove(i);
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        Ok(Some((n, from)))
    }

    fn send_datagram(&mut self, via: Dgram, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.dgrams_out.push((via, to, data.to_vec()));
        Ok(data.len())
    }

    fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// Seeds for a simulation test: the one in `DOSD_SIM_SEED` alone (to replay a
/// failure), else `count` seeds from `first` on (`DOSD_SIM_SEEDS` overrides the count,
/// for a longer soak).
pub fn seeds(first: u64, count: u64) -> Vec<u64> {
    let var = |name: &str| {
        std::env::var(name).ok().map(|s| {
            s.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{name} must be a number, not {s:?}"))
        })
    };
    match var("DOSD_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (first..first + var("DOSD_SIM_SEEDS").unwrap_or(count)).collect(),
    }
}
