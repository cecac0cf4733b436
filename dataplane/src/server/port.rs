//! The network port a dataplane loop drives: the one seam between the sans-IO DOSP
//! sessions (and cluster services) and whatever moves packets.
//!
//! A loop owns exactly one port. Implementations:
//! - [`KernelPort`]: kernel TCP and UDP sockets polled with epoll (mio), the default
//!   backend. Several loops may each own one on the same address: the listener is
//!   bound with `SO_REUSEPORT` and the kernel spreads connections over them; only the
//!   loop whose options say so serves UDP unicast and joins the multicast group.
//! - `SimPort` (tests, `simnet.rs`): an in-memory, seeded network with partial reads
//!   and writes, delays, reordering between connections and resets.
//! - `DpdkPort` (`dpdk_port.rs`, feature `dpdk`): smoltcp sockets on a DPDK mbuf
//!   device, each method mapped onto them; the notes marked "DPDK" say what it must do
//!   (its module docs say how it does it).
//!
//! Who calls what. Each loop turn: [`NetPort::wait`] (readiness, sleeping at most the
//! timeout), [`NetPort::now`] once for the turn's clock, then for each ready item:
//! [`NetPort::accept`] for the listener, [`NetPort::recv`]/[`NetPort::send`] for a
//! connection (through [`Session::drive`](super::session::Session::drive)),
//! [`NetPort::recv_datagram`]/[`NetPort::send_datagram`] for UDP. The loop decides
//! policy (which connection to admit, evict or refuse, when to close); the port only
//! moves bytes and reports what it saw.
//!
//! Buffers. Receive buffers belong to the port: [`NetPort::recv`] lends the bytes
//! received and not yet consumed to a closure, which returns how many it consumed; the
//! rest stay in the port and are lent again, followed by newer bytes, on the next call
//! (smoltcp's `TcpSocket::recv`). The session decodes requests and copies STORE data
//! into the store straight from that slice, so object bytes are copied once on the way
//! in. Send buffers belong to the session: [`NetPort::send`] borrows them and takes
//! what it can (the kernel copies into the socket buffer; smoltcp into its tx ring), so
//! RETRIEVE data goes from the buffer the store read into to the port with no copy in
//! between.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};

use super::accept::{self, Pass, Reserve, Shed, Step, ACCEPT_BURST, ACCEPT_RETRY};
use crate::stats::{ListenerState, NodeStats};

/// A connection's name within its port; never reused by that port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// The two datagram endpoints of a port that serves UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dgram {
    /// The node's own address (the DOSP port number).
    Unicast,
    /// The cluster's multicast group, joined on the configured interface.
    Multicast,
}

/// Something [`NetPort::wait`] found ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// New connections may be waiting: call [`NetPort::accept`].
    Listener,
    /// A connection may be readable or writable, or was closed by its peer: drive its
    /// session.
    Conn(ConnId),
    /// Datagrams may be waiting on one of the UDP endpoints.
    Datagrams,
    /// A descriptor registered with [`NetPort::register_wakeup`] under this key fired.
    Wakeup(usize),
    /// New HTTP connections may be waiting: call [`NetPort::accept_http`].
    HttpListener,
}

/// What a call to [`NetPort::recv`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Received {
    /// Bytes that arrived from the network during this call (counted once each).
    pub arrived: usize,
    /// The peer sent its FIN: no bytes will come after those lent (reported on every
    /// call from then on).
    pub peer_closed: bool,
}

/// What a port knows about a connection without moving bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnState {
    /// The peer sent bytes that no one has consumed yet (closing now would reset).
    pub unread_input: bool,
    /// The peer closed its sending side.
    pub peer_closed: bool,
}

/// A network port driven by one dataplane loop. See the module docs for the calling
/// protocol and for who owns which buffer.
///
/// No method blocks except [`NetPort::wait`], and none may panic on anything a peer
/// sends. Errors on one connection are that connection's: the loop closes it.
pub trait NetPort {
    /// The clock of this port; the loop reads it once per turn and passes it to the
    /// sessions. The kernel port reads the monotonic clock; the simulated one returns
    /// its virtual time.
    fn now(&mut self) -> Instant;

    /// Waits until something is ready or `timeout` passes (zero: just poll), and
    /// appends what is ready to `ready`. Readiness may be spurious, and (epoll being
    /// edge-triggered) a connection is reported again only after new bytes arrived or
    /// room appeared: the session reads and writes until it would block or hits its
    /// bound, and the loop drives it again itself in the latter case.
    ///
    /// DPDK: poll the receive queue(s) once, feed smoltcp's `Interface::poll`, and
    /// report every socket whose state changed; never sleep longer than `timeout`.
    fn wait(&mut self, timeout: Duration, ready: &mut Vec<Ready>) -> io::Result<()>;

    /// Asks [`NetPort::wait`] to report [`Ready::Wakeup`]`(key)` when `fd` becomes
    /// readable (the store's disk completion eventfds). Ports that never sleep (DPDK)
    /// may ignore it; so does the default.
    fn register_wakeup(&mut self, fd: RawFd, key: usize) -> io::Result<()> {
        let _ = (fd, key);
        Ok(())
    }

    /// Takes up to a bounded burst of new connections, appending each with its peer's
    /// address to `new`. Connections the port cannot take for want of a resource (file
    /// descriptors) it refuses itself and counts; the port also publishes the
    /// listener's state. Called on [`Ready::Listener`] and when [`NetPort::accept_due`]
    /// says so.
    fn accept(&mut self, new: &mut Vec<(ConnId, SocketAddr)>);

    /// When [`NetPort::accept`] must be called again without waiting for
    /// [`Ready::Listener`] (the last pass stopped before the queue was empty).
    fn accept_due(&self) -> Option<Instant>;

    /// Takes up to a bounded burst of new connections from the HTTP listener (signed
    /// URLs, `server/http.rs`), as [`NetPort::accept`] does for DOSP; returns whether
    /// it stopped before the queue was empty (call again next turn). A port without
    /// an HTTP listener (the default; the simulated port) takes none.
    fn accept_http(&mut self, new: &mut Vec<(ConnId, SocketAddr)>) -> bool {
        let _ = new;
        false
    }

    /// The address the port serves HTTP on (signed URLs), if it does; by default none.
    fn http_addr(&self) -> Option<SocketAddr> {
        None
    }

    /// Lends the bytes received on `conn` and not yet consumed to `f`, which returns
    /// how many it consumed from the front (at most the slice's length). The rest stay
    /// in the port and are lent again, followed by newer bytes, next call. `f` is
    /// called exactly once per call, with an empty slice when nothing is buffered.
    ///
    /// The slice is contiguous and starts at the first unconsumed byte; a port must lend
    /// at least `Header::SIZE + BODY_MAX` bytes in one slice whenever that many are
    /// buffered (a DPDK port whose ring wrapped must linearize when `f` consumed
    /// nothing of a wrapped slice), or a large request could never be decoded.
    fn recv<F: FnOnce(&[u8]) -> usize>(&mut self, conn: ConnId, f: F) -> io::Result<Received>;

    /// Queues up to `data.len()` bytes for sending on `conn`; returns how many were
    /// taken (possibly fewer; `WouldBlock` when none). The port copies them out before
    /// returning: `data` stays the caller's.
    fn send(&mut self, conn: ConnId, data: &[u8]) -> io::Result<usize>;

    /// [`NetPort::send`] of several slices in order, as one (the kernel port: one
    /// `writev`), so that a reply whose header, object bytes and trailer sit in
    /// different buffers still leaves in one call without being copied together.
    /// Returns how many bytes were taken from the front. Every slice is non-empty.
    /// By default the first slice alone is sent.
    fn send_vectored(&mut self, conn: ConnId, data: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match data.first() {
            Some(first) => self.send(conn, first),
            None => Ok(0),
        }
    }

    /// Whether `conn` has unread input, and whether its peer closed.
    fn conn_state(&mut self, conn: ConnId) -> ConnState;

    /// Refuses a connection just returned by [`NetPort::accept`]: sends `reply` (a new
    /// connection always has room for it), discards what the peer already sent
    /// (bounded) so the close is a FIN rather than a reset, and closes it.
    fn refuse(&mut self, conn: ConnId, reply: &[u8]);

    /// Closes `conn` and forgets it. Bytes already taken by `send` still go out; unread
    /// input makes the close a reset (see [`ConnState::unread_input`]).
    fn close(&mut self, conn: ConnId);

    /// Receives one datagram from `via` into `buf`: its length and sender, or `None`
    /// when none is waiting (or the port does not serve that endpoint).
    fn recv_datagram(
        &mut self,
        via: Dgram,
        buf: &mut [u8],
    ) -> io::Result<Option<(usize, SocketAddr)>>;

    /// Sends one datagram from `via` to `to`.
    fn send_datagram(&mut self, via: Dgram, data: &[u8], to: SocketAddr) -> io::Result<usize>;

    /// The DOSP address the port listens on.
    fn local_addr(&self) -> SocketAddr;

    /// Adds or removes a service address (one the node answers on besides its own,
    /// moved between the nodes of a failover pair), or with `None` changes nothing;
    /// returns the port's addresses after the change, its own first. With
    /// [`AddressChange::Add`]'s `announce`, the port also sends a gratuitous ARP for it.
    ///
    /// Only a port that owns its link layer can: the kernel's addresses are the
    /// kernel's (`ip addr`), and the default says so.
    fn change_address(
        &mut self,
        change: Option<AddressChange>,
    ) -> Result<Vec<(Ipv4Addr, u8)>, String> {
        let _ = change;
        Err(
            "the kernel network backend has no service addresses of its own: \
             add them to the host with `ip addr` (and `arping -U`)"
                .to_string(),
        )
    }
}

/// A change of a port's service addresses ([`NetPort::change_address`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressChange {
    /// Answer on `addr` too (in subnet `/prefix_len`); with `announce`, send a
    /// gratuitous ARP for it.
    Add {
        addr: Ipv4Addr,
        prefix_len: u8,
        announce: bool,
    },
    /// Stop answering on `addr`.
    Remove { addr: Ipv4Addr },
}

/// How a [`KernelPort`] is set up.
#[derive(Debug, Clone)]
pub struct KernelPortOptions {
    pub listen: SocketAddr,
    /// The session table's size: sizes the listen backlog and the receive buffers.
    pub connections_max: usize,
    /// Serve UDP unicast on the listen address (one loop per node does).
    pub udp_unicast: bool,
    /// Join this multicast group on this interface (one loop per node does).
    pub multicast: Option<(SocketAddrV4, Ipv4Addr)>,
}

/// Receive buffer per connection: a header plus the largest body, with room for STORE
/// data to flow.
pub const RBUF_BYTES: usize = 256 * 1024;
const _: () = assert!(RBUF_BYTES >= dosp::wire::Header::SIZE + dosp::wire::BODY_MAX as usize);

const LISTENER: Token = Token(0);
const UDP_UNICAST: Token = Token(1);
const UDP_MULTICAST: Token = Token(2);
const HTTP_LISTENER: Token = Token(3);
/// Connection tokens count up from here (and are their [`ConnId`]s).
const FIRST_CONN: u64 = 16;
/// Tokens of wakeup descriptors: `WAKEUP_BASE + key`, far above any connection's.
const WAKEUP_BASE: usize = usize::MAX / 2;
/// Events handled per epoll wait.
const EVENTS_MAX: usize = 256;

#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    /// Taken from the pool at the first receive, given back at close.
    rbuf: Option<Box<[u8]>>,
    rstart: usize,
    rend: usize,
    eof: bool,
}

#[derive(Debug)]
struct Udp {
    unicast: Option<UdpSocket>,
    multicast: Option<UdpSocket>,
}

/// Kernel sockets polled with epoll (mio): one TCP listener (`SO_REUSEPORT`), its
/// connections, and optionally the UDP unicast socket and the multicast socket.
///
/// Memory: one [`RBUF_BYTES`] receive buffer per connection that has received
/// anything, at most `connections_max` of them, made the first time each is needed
/// and reused from then on (the loop never holds more sessions than that).
#[derive(Debug)]
pub struct KernelPort {
    poll: Poll,
    events: Events,
    listener: TcpListener,
    local: SocketAddr,
    /// When the loop must run an accept pass without waiting for a readiness event
    /// (the last pass stopped before the queue was empty; see `accept.rs`).
    accept_at: Option<Instant>,
    /// The spare descriptor that lets the listener refuse connections when the
    /// process is out of descriptors.
    reserve: Reserve,
    /// What the listener last saw, as published in `stats.listener_state`.
    listener_state: ListenerState,
    conns: HashMap<ConnId, Conn>,
    next_conn: u64,
    rbufs: Vec<Box<[u8]>>,
    /// Receive buffers that may still be made.
    rbufs_unmade: usize,
    udp: Udp,
    /// The HTTP listener (signed URLs), when the node serves them.
    http: Option<TcpListener>,
    stats: Arc<NodeStats>,
}

impl KernelPort {
    /// Also accepts HTTP connections on `listener` (one of a group bound with
    /// [`accept::bind_group`]); they share the connection table and receive buffers.
    pub fn serve_http(&mut self, mut listener: TcpListener) -> io::Result<()> {
        self.poll
            .registry()
            .register(&mut listener, HTTP_LISTENER, Interest::READABLE)?;
        tracing::info!(local = %listener.local_addr()?, "HTTP listener bound (signed URLs)");
        self.http = Some(listener);
        Ok(())
    }

    /// Binds the listener (and the UDP sockets the options ask for). Errors here are
    /// start-up errors (address in use, …).
    pub fn bind(opts: &KernelPortOptions, stats: Arc<NodeStats>) -> io::Result<KernelPort> {
        let listener = accept::bind(opts.listen, opts.connections_max)?;
        KernelPort::on(opts, listener, stats)
    }

    /// [`KernelPort::bind`] on a listener bound already: one of a group sharing the
    /// address with SO_REUSEPORT, one per dataplane loop ([`accept::bind_group`]).
    pub fn on(
        opts: &KernelPortOptions,
        listener: (mio::net::TcpListener, u32),
        stats: Arc<NodeStats>,
    ) -> io::Result<KernelPort> {
        let poll = Poll::new()?;
        let (mut listener, backlog) = listener;
        let local = listener.local_addr()?;
        tracing::info!(
            %local,
            backlog,
            connections_max = opts.connections_max,
            "DOSP listener bound"
        );
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut udp = Udp {
            unicast: None,
            multicast: None,
        };
        if opts.udp_unicast {
            // The listener's address, so an ephemeral port is the same number for both.
            let s = std::net::UdpSocket::bind(local)?;
            s.set_nonblocking(true)?;
            let mut s = UdpSocket::from_std(s);
            poll.registry()
                .register(&mut s, UDP_UNICAST, Interest::READABLE)?;
            udp.unicast = Some(s);
        }
        if let Some((group, iface)) = opts.multicast {
            let s = dosp::client::join_group(group, iface)?;
            s.set_nonblocking(true)?;
            let mut s = UdpSocket::from_std(s);
            poll.registry()
                .register(&mut s, UDP_MULTICAST, Interest::READABLE)?;
            udp.multicast = Some(s);
        }
        Ok(KernelPort {
            poll,
            events: Events::with_capacity(EVENTS_MAX),
            listener,
            local,
            accept_at: None,
            reserve: Reserve::new()?,
            listener_state: ListenerState::Accepting,
            conns: HashMap::new(),
            next_conn: FIRST_CONN,
            rbufs: Vec::new(),
            rbufs_unmade: opts.connections_max,
            udp,
            http: None,
            stats,
        })
    }

    fn admit(&mut self, stream: TcpStream, peer: SocketAddr, new: &mut Vec<(ConnId, SocketAddr)>) {
        let _ = stream.set_nodelay(true);
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        let mut conn = Conn {
            stream,
            rbuf: None,
            rstart: 0,
            rend: 0,
            eof: false,
        };
        if let Err(e) = self.poll.registry().register(
            &mut conn.stream,
            Token(id.0 as usize),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(%peer, error = %e, "cannot register connection");
            return;
        }
        self.conns.insert(id, conn);
        new.push((id, peer));
    }

    fn set_listener_state(&mut self, state: ListenerState, error: Option<&io::Error>) {
        if state == self.listener_state {
            return;
        }
        let error = error.map(ToString::to_string).unwrap_or_default();
        match state {
            ListenerState::Accepting => {
                tracing::info!("DOSP listener accepting again: file descriptors are back")
            }
            ListenerState::Shedding => tracing::warn!(
                %error,
                "DOSP listener out of file descriptors: refusing new connections with BUSY"
            ),
            ListenerState::Stuck => tracing::error!(
                %error,
                "DOSP listener cannot accept connections, not even to refuse them"
            ),
        }
        self.listener_state = state;
        NodeStats::set(&self.stats.listener_state, state as u64);
    }

    fn udp_socket(&self, via: Dgram) -> Option<&UdpSocket> {
        match via {
            Dgram::Unicast => self.udp.unicast.as_ref(),
            Dgram::Multicast => self.udp.multicast.as_ref(),
        }
    }
}

impl NetPort for KernelPort {
    fn now(&mut self) -> Instant {
        Instant::now()
    }

    fn wait(&mut self, timeout: Duration, ready: &mut Vec<Ready>) -> io::Result<()> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        for ev in self.events.iter() {
            ready.push(match ev.token() {
                Token(t) if t >= WAKEUP_BASE => Ready::Wakeup(t - WAKEUP_BASE),
                LISTENER => Ready::Listener,
                HTTP_LISTENER => Ready::HttpListener,
                UDP_UNICAST | UDP_MULTICAST => Ready::Datagrams,
                Token(t) => Ready::Conn(ConnId(t as u64)),
            });
        }
        Ok(())
    }

    fn register_wakeup(&mut self, fd: RawFd, key: usize) -> io::Result<()> {
        self.poll.registry().register(
            &mut mio::unix::SourceFd(&fd),
            Token(WAKEUP_BASE + key),
            Interest::READABLE,
        )
    }

    /// One accept pass: takes connections until the queue is empty or the per-turn
    /// bound is hit, sheds them with BUSY while the process is out of descriptors, and
    /// arranges to come back when it stopped before the queue was empty.
    fn accept(&mut self, new: &mut Vec<(ConnId, SocketAddr)>) {
        self.accept_at = None;
        let mut short = false;
        let mut failure = None;
        let mut pass = Pass::Bound;
        for _ in 0..ACCEPT_BURST {
            match accept::next(&self.listener) {
                Step::Connection(stream, peer) => self.admit(stream, peer, new),
                Step::Empty => {
                    pass = Pass::Drained;
                    break;
                }
                Step::Failed(e) if accept::is_shortage(&e) => {
                    NodeStats::inc(&self.stats.accept_failures);
                    if !short {
                        tracing::debug!(error = %e, "accept: out of descriptors, shedding");
                    }
                    short = true;
                    failure = Some(e);
                    match self.reserve.shed_one(&self.listener) {
                        Shed::Refused(peer) => {
                            NodeStats::inc(&self.stats.connections_refused);
                            tracing::debug!(%peer, "refused a connection: out of file descriptors");
                        }
                        Shed::Empty => {
                            pass = Pass::Drained;
                            break;
                        }
                        Shed::Cannot => {
                            pass = Pass::Failed;
                            break;
                        }
                    }
                }
                Step::Failed(e) => {
                    // Not a shortage and not one connection's: the listener itself is
                    // in trouble. Say so, and try again later.
                    NodeStats::inc(&self.stats.accept_failures);
                    tracing::error!(error = %e, "accept failed");
                    failure = Some(e);
                    pass = Pass::Failed;
                    break;
                }
            }
        }
        let state = match pass {
            Pass::Failed => ListenerState::Stuck,
            _ if short => ListenerState::Shedding,
            _ if self.listener_state == ListenerState::Accepting => ListenerState::Accepting,
            // Short before, nothing to accept now: are descriptors back?
            _ if self.reserve.spare_available() => ListenerState::Accepting,
            _ if self.reserve.held() => ListenerState::Shedding,
            _ => ListenerState::Stuck,
        };
        self.set_listener_state(state, failure.as_ref());
        self.accept_at = match (pass, state) {
            (Pass::Bound, _) => Some(Instant::now()),
            (_, ListenerState::Accepting) => None,
            _ => Some(Instant::now() + ACCEPT_RETRY),
        };
    }

    fn accept_due(&self) -> Option<Instant> {
        self.accept_at
    }

    fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// One accept pass on the HTTP listener. Simpler than the DOSP listener's: out of
    /// descriptors, connections stay queued (no BUSY reply exists in HTTP before a
    /// request) and the loop tries again next turn.
    fn accept_http(&mut self, new: &mut Vec<(ConnId, SocketAddr)>) -> bool {
        for _ in 0..ACCEPT_BURST {
            let Some(listener) = self.http.as_ref() else {
                return false;
            };
            match accept::next(listener) {
                Step::Connection(stream, peer) => self.admit(stream, peer, new),
                Step::Empty => return false,
                Step::Failed(e) => {
                    NodeStats::inc(&self.stats.accept_failures);
                    tracing::debug!(error = %e, "HTTP accept failed");
                    return false;
                }
            }
        }
        true
    }

    fn recv<F: FnOnce(&[u8]) -> usize>(&mut self, conn: ConnId, f: F) -> io::Result<Received> {
        let Some(c) = self.conns.get_mut(&conn) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let rbuf = match c.rbuf.as_mut() {
            Some(b) => b,
            None => {
                let b = match self.rbufs.pop() {
                    Some(b) => b,
                    None if self.rbufs_unmade > 0 => {
                        self.rbufs_unmade -= 1;
                        vec![0u8; RBUF_BYTES].into_boxed_slice()
                    }
                    // The loop holds at most `connections_max` sessions: not reached.
                    None => return Err(io::ErrorKind::OutOfMemory.into()),
                };
                c.rbuf.insert(b)
            }
        };
        let mut got = Received::default();
        if !c.eof {
            if c.rstart == c.rend {
                c.rstart = 0;
                c.rend = 0;
            } else if c.rstart > 0 && c.rend == rbuf.len() {
                rbuf.copy_within(c.rstart..c.rend, 0);
                c.rend -= c.rstart;
                c.rstart = 0;
            }
            if c.rend < rbuf.len() {
                loop {
                    match c.stream.read(&mut rbuf[c.rend..]) {
                        Ok(0) => c.eof = true,
                        Ok(n) => {
                            c.rend += n;
                            got.arrived = n;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                    break;
                }
            }
        }
        let n = f(&rbuf[c.rstart..c.rend]);
        c.rstart += n.min(c.rend - c.rstart);
        got.peer_closed = c.eof;
        Ok(got)
    }

    fn send(&mut self, conn: ConnId, data: &[u8]) -> io::Result<usize> {
        let Some(c) = self.conns.get_mut(&conn) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        loop {
            match c.stream.write(data) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(0) if !data.is_empty() => return Err(io::ErrorKind::WriteZero.into()),
                r => return r,
            }
        }
    }

    fn send_vectored(&mut self, conn: ConnId, data: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let Some(c) = self.conns.get_mut(&conn) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let total: usize = data.iter().map(|d| d.len()).sum();
        loop {
            match c.stream.write_vectored(data) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(0) if total > 0 => return Err(io::ErrorKind::WriteZero.into()),
                r => return r,
            }
        }
    }

    /// One `peek` system call when nothing is buffered; called only when the session
    /// table is full.
    fn conn_state(&mut self, conn: ConnId) -> ConnState {
        let Some(c) = self.conns.get(&conn) else {
            return ConnState::default();
        };
        let buffered = c.rstart < c.rend;
        let unread = buffered || matches!(c.stream.peek(&mut [0u8; 1]), Ok(n) if n > 0);
        ConnState {
            unread_input: unread,
            peer_closed: c.eof,
        }
    }

    fn refuse(&mut self, conn: ConnId, reply: &[u8]) {
        if let Some(mut c) = self.conns.remove(&conn) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            accept::refuse_with(c.stream, reply);
        }
    }

    fn close(&mut self, conn: ConnId) {
        if let Some(mut c) = self.conns.remove(&conn) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            if let Some(b) = c.rbuf.take() {
                self.rbufs.push(b);
            }
        }
    }

    fn recv_datagram(
        &mut self,
        via: Dgram,
        buf: &mut [u8],
    ) -> io::Result<Option<(usize, SocketAddr)>> {
        let Some(sock) = self.udp_socket(via) else {
            return Ok(None);
        };
        match sock.recv_from(buf) {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send_datagram(&mut self, via: Dgram, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        match self.udp_socket(via) {
            Some(sock) => sock.send_to(data, to),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(listen: SocketAddr, udp: bool) -> KernelPortOptions {
        KernelPortOptions {
            listen,
            connections_max: 4,
            udp_unicast: udp,
            multicast: None,
        }
    }

    #[test]
    fn several_ports_listen_on_one_address_and_one_serves_udp() {
        let stats = Arc::new(NodeStats::default());
        // SO_REUSEPORT: the loops' listeners share one address (the first picks the
        // port); the second leaves the UDP socket (which has no SO_REUSEPORT) to the
        // first.
        let mut group = accept::bind_group("127.0.0.1:0".parse().unwrap(), 4, 2).expect("group");
        let l2 = group.pop().expect("second listener");
        let l1 = group.pop().expect("first listener");
        let first = KernelPort::on(&opts(l1.0.local_addr().unwrap(), true), l1, stats.clone())
            .expect("first port");
        let addr = first.local_addr();
        let mut second =
            KernelPort::on(&opts(addr, false), l2, stats.clone()).expect("second port");
        assert_eq!(second.local_addr(), addr);
        // Another node on the same address is refused: the group does not take
        // strangers.
        assert!(KernelPort::bind(&opts(addr, false), stats).is_err());
        let mut buf = [0u8; 64];
        assert!(second
            .recv_datagram(Dgram::Unicast, &mut buf)
            .unwrap()
            .is_none());
        assert!(second.send_datagram(Dgram::Unicast, b"x", addr).is_err());
    }

    #[test]
    fn received_bytes_stay_lent_until_consumed() {
        let stats = Arc::new(NodeStats::default());
        let mut port =
            KernelPort::bind(&opts("127.0.0.1:0".parse().unwrap(), false), stats).unwrap();
        let mut client = std::net::TcpStream::connect(port.local_addr()).unwrap();
        client.write_all(b"hello world").unwrap();
        let mut new = Vec::new();
        let mut ready = Vec::new();
        while new.is_empty() {
            port.wait(Duration::from_millis(100), &mut ready).unwrap();
            port.accept(&mut new);
        }
        let conn = new[0].0;
        let mut seen = Vec::new();
        // Consume five bytes at a time; the rest is lent again, newer bytes after it.
        while seen.len() < 11 {
            port.wait(Duration::from_millis(10), &mut ready).unwrap();
            port.recv(conn, |b| {
                let n = b.len().min(5);
                seen.extend_from_slice(&b[..n]);
                n
            })
            .unwrap();
        }
        assert_eq!(seen, b"hello world");
        assert_eq!(port.send(conn, b"bye").unwrap(), 3);
        // Read before closing: a close with unread input would be a reset.
        let mut bye = [0u8; 3];
        client.read_exact(&mut bye).unwrap();
        assert_eq!(&bye, b"bye");
        drop(client);
        let mut closed = false;
        for _ in 0..100 {
            port.wait(Duration::from_millis(10), &mut ready).unwrap();
            if port.recv(conn, |b| b.len()).unwrap().peer_closed {
                closed = true;
                break;
            }
        }
        assert!(closed, "the FIN is reported");
        port.close(conn);
        assert!(port.recv(conn, |b| b.len()).is_err());
    }
}
