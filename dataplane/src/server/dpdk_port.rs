//! [`DpdkPort`]: a [`NetPort`] over smoltcp sockets on a DPDK [`MbufDevice`] (the
//! `dpdk` feature). One dataplane loop owns it, as it owns the device's queues.
//!
//! What it holds: a smoltcp [`Interface`] with one static IPv4 address (and optionally a
//! default gateway) on the port's MAC; a fixed pool of TCP sockets, a few of them kept
//! listening on the DOSP port (and, when the node serves signed URLs, a few on the HTTP
//! port: [`DpdkPortOptions::http_port`]); one UDP socket bound to the DOSP address
//! (unicast); and optionally one UDP socket for the cluster's multicast group, joined
//! through smoltcp's IGMP support.
//!
//! The pool is bounded: `connections_max + LISTENERS` sockets (plus [`HTTP_LISTENERS`]
//! with HTTP: DOSP and HTTP connections share `connections_max`, as on the kernel
//! port), each with its own receive and send rings ([`TCP_RX_BYTES`],
//! [`TCP_TX_BYTES`]), all made at start. The
//! bound matters beyond memory: smoltcp walks every socket of its set for each packet.
//! So free sockets are parked outside the set, and the walk covers only the sockets in
//! use (listening, connected, closing) and the UDP ones: its cost grows with the live
//! connections, up to the bound. Sockets the loop has closed go back to the pool once
//! smoltcp has finished their close (FIN exchange, or after [`CLOSE_LINGER`] by a
//! reset). While every socket is taken (or in a handshake) no socket listens, and new
//! SYNs are dropped and counted (`syn_refused`), for either port. A listening socket's
//! handshake that does not complete within [`HANDSHAKE_TIMEOUT`] (a spoofed SYN) is
//! given up and the socket listens again. A listening socket remembers which service
//! it listens for: [`NetPort::accept`] hands out DOSP connections only,
//! [`NetPort::accept_http`] HTTP ones only.
//!
//! Every received frame is checked before smoltcp sees it ([`RxGuard`], `rx_guard.rs`):
//! malformed frames, bad checksums and IP fragments are dropped and counted by reason.
//!
//! Mapping of the trait:
//! - [`NetPort::wait`] busy-polls: each pass runs `Interface::poll` (receive burst →
//!   sockets → transmit) and flushes the device's transmit burst, then reports the
//!   listener if a listening socket became established ([`Ready::Listener`] for DOSP,
//!   [`Ready::HttpListener`] for HTTP), datagrams if a UDP socket holds
//!   one, and each connection whose receive queue grew, whose send queue shrank (room
//!   appeared) or whose TCP state changed since the wait began. It returns as soon as
//!   something is ready, or when the timeout is over. After [`SPINS_BEFORE_NAP`] passes
//!   in a row that moved nothing, it naps up to [`NAP`] (less if the timeout is
//!   sooner) in epoll on the wakeup descriptors, so a disk completion still wakes it at
//!   once; an idle port so adds up to [`NAP`] to the first packet after a quiet spell.
//!   It never blocks on the NIC. Timeout zero: one pass.
//! - [`NetPort::recv`] lends smoltcp's receive ring in place (`tcp::Socket::recv`): no
//!   copy. When the bytes buffered wrap around the ring's end and the contiguous part
//!   is shorter than what the trait promises ([`LEND_MIN`]), they are moved into a
//!   per-connection staging buffer, which is lent instead until it is drained: the only
//!   copy, at ring wraps.
//! - [`NetPort::send`] / [`NetPort::send_vectored`] copy into the socket's send ring
//!   (`send_slice`); it goes out on the next [`NetPort::wait`].
//! - [`NetPort::close`] closes with a FIN, or with a reset when input is unread (as the
//!   kernel does); [`NetPort::refuse`] queues the reply, discards the input, and closes.
//!
//! Limits: UDP datagrams are at most one frame (no IP fragmentation: 1472 bytes of
//! payload at the device's MTU); receiving the multicast group also needs the NIC to
//! pass multicast frames (allmulticast or promiscuous, the caller's to set).

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use dpdk::{MacAddr, MbufDevice, PhyStats};
use mio::{Events, Interest, Poll, Token};
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, RxToken, TxToken};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint, Ipv4Cidr};

use super::accept::ACCEPT_BURST;
use super::port::{AddressChange, ConnId, ConnState, Dgram, NetPort, Ready, Received, RBUF_BYTES};
use super::rx_guard::{PeekDevice, RxGuard};
use crate::copies::{Copies, Site};
use crate::stats::NodeStats;

/// The contiguous bytes [`NetPort::recv`] must lend when that many are buffered: a
/// header and the largest body.
pub const LEND_MIN: usize = dosp::wire::Header::SIZE + dosp::wire::BODY_MAX as usize;
/// Each TCP socket's receive ring (also its advertised window, scaled).
pub const TCP_RX_BYTES: usize = RBUF_BYTES;
/// Each TCP socket's send ring.
pub const TCP_TX_BYTES: usize = 256 * 1024;
/// Sockets kept listening on the DOSP port while the pool has them (the backlog).
pub const LISTENERS: usize = 16;
/// Sockets kept listening on the HTTP port, when the port serves signed URLs.
pub const HTTP_LISTENERS: usize = 16;
/// A closed socket that has not finished its close after this is reset and reused.
pub const CLOSE_LINGER: Duration = Duration::from_secs(30);
/// smoltcp aborts a connection whose peer acknowledges nothing for this long while
/// data is in flight.
const TCP_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(60);
/// A listening socket whose handshake (SYN received, SYN-ACK sent) sees nothing from
/// the peer for this long gives it up and listens again.
pub const HANDSHAKE_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(5);
/// Datagrams each UDP socket buffers per direction, and their payload bytes.
const UDP_PACKETS: usize = 64;
const UDP_BYTES: usize = 64 * 1024;
/// Passes of [`NetPort::wait`] that moved nothing before it naps.
pub const SPINS_BEFORE_NAP: u32 = 1000;
/// The longest nap of an idle [`NetPort::wait`].
pub const NAP: Duration = Duration::from_millis(1);

const _: () = assert!(TCP_RX_BYTES >= LEND_MIN);

/// The longest ARP frame one loop passes to its siblings (an Ethernet ARP for IPv4 is
/// 42 bytes, 60 when padded to the Ethernet minimum).
const ARP_FRAME_MAX: usize = 64;
/// ARP frames waiting for one sibling, at most; more are dropped and counted.
const ARP_QUEUE: usize = 64;
/// Service addresses a port can hold besides its own (smoltcp's address table has
/// room for 8: the `iface-max-addr-count-8` feature).
pub const SERVICE_ADDRESSES_MAX: usize = 7;

/// An ARP frame passed between loops, without allocating.
#[derive(Clone, Copy)]
struct ArpFrame {
    len: u8,
    bytes: [u8; ARP_FRAME_MAX],
}

/// One loop's link to the other loops' ports on the same NIC: the ARP frames it
/// receives are passed on to them.
///
/// Why: with several receive queues, the NIC (RSS, or the kernel behind a tap) spreads
/// frames by flow, and an ARP frame lands on one queue only. smoltcp fills its neighbour
/// cache from ARP frames aimed at it; a loop that never saw the peer's ARP would have
/// to ask itself, and drop the packet it wanted to send meanwhile (a SYN-ACK, so the
/// peer's connect waits a retransmission). So each loop hands a copy of every ARP frame
/// it receives to the others, as a reply (a request copy would make every loop answer
/// it): each fills its cache, and only the loop that received the request answers.
#[derive(Debug)]
pub struct ArpShare {
    peers: Vec<Sender<ArpFrame>>,
    inbox: Receiver<ArpFrame>,
    passed: std::cell::Cell<u64>,
    dropped: std::cell::Cell<u64>,
}

impl std::fmt::Debug for ArpFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ArpFrame({} bytes)", self.len)
    }
}

/// The shares of `loops` ports on one NIC, one per loop, each linked to all others.
pub fn arp_shares(loops: usize) -> Vec<ArpShare> {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..loops)
        .map(|_| crossbeam_channel::bounded(ARP_QUEUE))
        .unzip();
    rxs.into_iter()
        .enumerate()
        .map(|(k, inbox)| ArpShare {
            peers: txs
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != k)
                .map(|(_, t)| t.clone())
                .collect(),
            inbox,
            passed: std::cell::Cell::new(0),
            dropped: std::cell::Cell::new(0),
        })
        .collect()
}

impl ArpShare {
    /// Passes `frame` on if it is an ARP frame (a request turned into a reply).
    fn offer(&self, frame: &[u8]) {
        if frame.len() < 42 || frame.len() > ARP_FRAME_MAX || frame[12..14] != [0x08, 0x06] {
            return;
        }
        let mut copy = ArpFrame {
            len: frame.len() as u8,
            bytes: [0; ARP_FRAME_MAX],
        };
        copy.bytes[..frame.len()].copy_from_slice(frame);
        // ARP operation (bytes 20..22 of the frame): 1 request → 2 reply.
        if copy.bytes[20..22] == [0, 1] {
            copy.bytes[21] = 2;
        }
        for peer in &self.peers {
            match peer.try_send(copy) {
                Ok(()) => self.passed.set(self.passed.get() + 1),
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    self.dropped.set(self.dropped.get() + 1)
                }
            }
        }
    }
}

/// The port's device as smoltcp sees it: the NIC queues' frames, with the ARP frames
/// from sibling loops first, and each ARP frame received offered to them.
struct Linked<'a, 'p, 'e> {
    dev: &'a mut MbufDevice<'p, 'e>,
    share: Option<&'a ArpShare>,
    /// A sibling's frame taken from the inbox: peeked by the frame check, then received
    /// (or discarded) before any frame of the NIC.
    pending: &'a mut Option<ArpFrame>,
}

impl Linked<'_, '_, '_> {
    /// Takes the next sibling frame into `pending`, if none is there; whether one is.
    fn fill(&mut self) -> bool {
        if self.pending.is_none() {
            *self.pending = self.share.and_then(|s| s.inbox.try_recv().ok());
        }
        self.pending.is_some()
    }
}

impl PeekDevice for Linked<'_, '_, '_> {
    fn peek_rx(&mut self) -> Option<&[u8]> {
        if self.fill() {
            return self
                .pending
                .as_ref()
                .map(|f| &f.bytes[..usize::from(f.len)]);
        }
        self.dev.peek_rx()
    }

    fn discard_rx(&mut self) {
        if self.pending.take().is_none() {
            self.dev.discard_rx();
        }
    }
}

enum LinkedRx<'a, 'e> {
    Sibling(ArpFrame),
    Nic(dpdk::phy::MbufRxToken<'e>, Option<&'a ArpShare>),
}

impl RxToken for LinkedRx<'_, '_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        match self {
            LinkedRx::Sibling(frame) => f(&frame.bytes[..usize::from(frame.len)]),
            LinkedRx::Nic(token, share) => token.consume(|bytes| {
                if let Some(share) = share {
                    share.offer(bytes);
                }
                f(bytes)
            }),
        }
    }
}

impl<'p, 'e> Device for Linked<'_, 'p, 'e> {
    type RxToken<'t>
        = LinkedRx<'t, 'e>
    where
        Self: 't;
    type TxToken<'t>
        = dpdk::phy::MbufTxToken<'t, 'p, 'e>
    where
        Self: 't;

    fn receive(
        &mut self,
        timestamp: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if self.fill() {
            // Handed over only with the right to answer, as smoltcp wants.
            return match self.dev.transmit(timestamp) {
                Some(tx) => self.pending.take().map(|f| (LinkedRx::Sibling(f), tx)),
                None => None,
            };
        }
        let share = self.share;
        let (rx, tx) = self.dev.receive(timestamp)?;
        Some((LinkedRx::Nic(rx, share), tx))
    }

    fn transmit(&mut self, timestamp: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        self.dev.transmit(timestamp)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.dev.capabilities()
    }
}

/// A gratuitous ARP for `addr` from `mac`: a broadcast request whose sender and target
/// are both `addr`, so that neighbours (and switches) learn where it lives now.
fn gratuitous_arp(mac: EthernetAddress, addr: Ipv4Addr, buf: &mut [u8]) {
    buf.fill(0);
    buf[0..6].copy_from_slice(&[0xff; 6]);
    buf[6..12].copy_from_slice(&mac.0);
    buf[12..14].copy_from_slice(&[0x08, 0x06]);
    // Ethernet, IPv4, address lengths 6 and 4, operation request.
    buf[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    buf[22..28].copy_from_slice(&mac.0);
    buf[28..32].copy_from_slice(&addr.octets());
    buf[38..42].copy_from_slice(&addr.octets());
}

/// The Ethernet minimum frame (without FCS) a gratuitous ARP is padded to.
const GARP_FRAME: usize = 60;

/// How a [`DpdkPort`] is set up.
#[derive(Debug, Clone)]
pub struct DpdkPortOptions {
    /// The node's address on this port, with its prefix length.
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    /// The default route's next hop, if the node talks beyond its subnet.
    pub gateway: Option<Ipv4Addr>,
    /// The DOSP port number (TCP listener and UDP unicast).
    pub port: u16,
    /// Also serve HTTP (signed URLs, `server/http.rs`) on this TCP port number, on the
    /// same addresses; not the DOSP port's. The loop needs a cluster key then.
    pub http_port: Option<u16>,
    /// The session table's size (DOSP and HTTP connections together); the TCP pool is
    /// this plus [`LISTENERS`] (and [`HTTP_LISTENERS`] with `http_port`).
    pub connections_max: usize,
    /// Serve UDP unicast on the DOSP address.
    pub udp_unicast: bool,
    /// Join this multicast group and serve datagrams sent to it.
    pub multicast: Option<SocketAddrV4>,
}

/// What a listening socket listens for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Dosp,
    Http,
}

/// What a TCP socket of the pool is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Closed, waiting to be armed.
    Free,
    /// In listen state (or in its handshake) for this service, not yet handed out.
    Listening(Service),
    /// Handed out by [`NetPort::accept`] or [`NetPort::accept_http`].
    Conn(ConnId),
    /// Closed by the loop at this time; smoltcp is finishing the close.
    Closing(Instant),
}

/// What [`NetPort::wait`] compares to see that a connection changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    recv_queue: usize,
    send_queue: usize,
    state: tcp::State,
}

#[derive(Debug)]
struct Slot {
    /// The socket's handle in the set while it is not [`Use::Free`] (stale otherwise).
    handle: SocketHandle,
    /// The socket while it is [`Use::Free`]: out of the set, so that smoltcp's walk
    /// over the set for every packet skips it.
    parked: Option<tcp::Socket<'static>>,
    use_: Use,
    /// Bytes moved out of a wrapped ring, lent before the ring's: `stage[stage_at..]`.
    stage: Vec<u8>,
    stage_at: usize,
    /// Bytes taken out of smoltcp's ring (consumed, or moved to the stage).
    drained: u64,
    /// Bytes already reported as arrived.
    reported: u64,
    /// The state at the start of the current wait.
    seen: Seen,
}

impl Slot {
    fn staged(&self) -> usize {
        self.stage.len() - self.stage_at
    }
}

/// smoltcp's TCP and UDP sockets over one DPDK device. See the module docs.
pub struct DpdkPort<'p, 'e> {
    device: MbufDevice<'p, 'e>,
    iface: Interface,
    sockets: SocketSet<'static>,
    slots: Vec<Slot>,
    /// Slots in use (listening, connected or closing), in no order; the others are free.
    busy: Vec<usize>,
    /// Free slots (their sockets parked), taken from the end.
    free: Vec<usize>,
    conns: HashMap<ConnId, usize>,
    next_conn: u64,
    listen: IpListenEndpoint,
    /// Where HTTP is served, when it is (same addresses as `listen`).
    listen_http: Option<IpListenEndpoint>,
    local: SocketAddr,
    udp_unicast: Option<SocketHandle>,
    udp_multicast: Option<(SocketHandle, SocketAddrV4)>,
    /// Where smoltcp's clock starts.
    epoch: Instant,
    /// The last accept pass stopped at its bound.
    accept_more: bool,
    /// Epoll on the wakeup descriptors (disk completions), if any were registered.
    wakeups: Option<(Poll, Events)>,
    /// Received bytes copied into staging buffers (at ring wraps).
    staged_bytes: u64,
    /// The link to sibling loops' ports, when several loops share the NIC.
    arp: Option<ArpShare>,
    /// The port's own address (the service addresses are the others).
    primary: Ipv4Cidr,
    mac: EthernetAddress,
    /// Connections handed out by [`NetPort::accept`].
    accepted: u64,
    /// Connections handed out by [`NetPort::accept_http`].
    accepted_http: u64,
    /// The bytes this port copies ([`Site::PortRecv`], [`Site::PortSend`]).
    copies: Copies,
    /// The check of every received frame.
    guard: RxGuard,
    /// A sibling's ARP frame taken from the share's inbox and not yet handed to smoltcp.
    arp_pending: Option<ArpFrame>,
}

impl Drop for DpdkPort<'_, '_> {
    fn drop(&mut self) {
        let phy = self.device.stats();
        let (arp_passed, arp_dropped) = self.arp_shared();
        tracing::info!(
            thread = std::thread::current().name().unwrap_or("-"),
            accepted = self.accepted,
            accepted_http = self.accepted_http,
            rx_frames = phy.rx_frames,
            tx_frames = phy.tx_frames,
            tx_dropped = phy.tx_dropped + phy.tx_no_mbuf,
            arp_passed,
            arp_dropped,
            staged_bytes = self.staged_bytes,
            "DPDK port queue closed"
        );
    }
}

impl std::fmt::Debug for DpdkPort<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpdkPort")
            .field("local", &self.local)
            .field("sockets", &self.slots.len())
            .field("conns", &self.conns.len())
            .field("device", &self.device.stats())
            .finish_non_exhaustive()
    }
}

fn tcp_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_RX_BYTES]),
        tcp::SocketBuffer::new(vec![0; TCP_TX_BYTES]),
    );
    s.set_nagle_enabled(false);
    s.set_timeout(Some(TCP_TIMEOUT));
    s
}

fn udp_socket() -> udp::Socket<'static> {
    udp::Socket::new(
        udp::PacketBuffer::new(
            vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
            vec![0; UDP_BYTES],
        ),
        udp::PacketBuffer::new(
            vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
            vec![0; UDP_BYTES],
        ),
    )
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

/// The peer's FIN has been received (states reached only through it).
fn fin_received(state: tcp::State) -> bool {
    matches!(
        state,
        tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait
    )
}

impl<'p, 'e> DpdkPort<'p, 'e> {
    /// A port on `device` (whose queues belong to a started DPDK port with MAC `mac`).
    /// Errors are configuration errors (a bad address or group).
    pub fn new(
        mut device: MbufDevice<'p, 'e>,
        mac: MacAddr,
        opts: &DpdkPortOptions,
    ) -> io::Result<DpdkPort<'p, 'e>> {
        if opts.port == 0 {
            return Err(invalid("the DOSP port number must not be 0"));
        }
        match opts.http_port {
            Some(0) => return Err(invalid("the HTTP port number must not be 0")),
            Some(p) if p == opts.port => {
                return Err(invalid(format!(
                    "the HTTP port must differ from the DOSP port ({p})"
                )))
            }
            _ => {}
        }
        let epoch = Instant::now();
        // The guard verifies received checksums; smoltcp only computes them.
        device.set_checksums(RxGuard::checksums());
        let config = Config::new(EthernetAddress(mac.0).into());
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::ZERO);
        let cidr = IpCidr::new(IpAddress::Ipv4(opts.addr), opts.prefix_len);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(cidr);
        });
        if let Some(gw) = opts.gateway {
            iface
                .routes_mut()
                .add_default_ipv4_route(gw)
                .map_err(|e| invalid(format!("default route via {gw}: {e:?}")))?;
        }
        let mut sockets = SocketSet::new(Vec::new());
        // The multicast socket comes first: smoltcp gives a datagram to the first socket
        // that accepts it, and the unicast one would accept the group's datagrams too
        // when both use the same port number.
        let udp_multicast = match opts.multicast {
            Some(group) => {
                iface
                    .join_multicast_group(IpAddress::Ipv4(*group.ip()))
                    .map_err(|e| invalid(format!("multicast group {group}: {e}")))?;
                let mut s = udp_socket();
                s.bind(IpEndpoint::new(IpAddress::Ipv4(*group.ip()), group.port()))
                    .map_err(|e| invalid(format!("multicast socket {group}: {e}")))?;
                Some((sockets.add(s), group))
            }
            None => None,
        };
        let udp_unicast = if opts.udp_unicast {
            let mut s = udp_socket();
            // Any of the port's addresses: its own and the service addresses.
            s.bind(IpListenEndpoint {
                addr: None,
                port: opts.port,
            })
            .map_err(|e| invalid(format!("UDP socket: {e}")))?;
            Some(sockets.add(s))
        } else {
            None
        };
        // Any of the port's addresses: its own and the service addresses.
        let listen = IpListenEndpoint {
            addr: None,
            port: opts.port,
        };
        let listen_http = opts
            .http_port
            .map(|port| IpListenEndpoint { addr: None, port });
        let pool = opts.connections_max
            + LISTENERS
            + if listen_http.is_some() {
                HTTP_LISTENERS
            } else {
                0
            };
        let slots = (0..pool)
            .map(|_| Slot {
                handle: SocketHandle::default(),
                parked: Some(tcp_socket()),
                use_: Use::Free,
                stage: Vec::new(),
                stage_at: 0,
                drained: 0,
                reported: 0,
                seen: Seen {
                    recv_queue: 0,
                    send_queue: 0,
                    state: tcp::State::Closed,
                },
            })
            .collect();
        let local = SocketAddr::from((opts.addr, opts.port));
        tracing::info!(
            %local,
            mac = %mac,
            tcp_sockets = pool,
            udp_unicast = opts.udp_unicast,
            multicast = ?opts.multicast,
            http_port = ?opts.http_port,
            "DOSP listening on the DPDK port (smoltcp)"
        );
        let mut guard = RxGuard::new(opts.addr, opts.port);
        if let Some(port) = opts.http_port {
            guard.guard_http(port);
        }
        let free = (0..pool).rev().collect();
        let mut port = DpdkPort {
            device,
            iface,
            sockets,
            slots,
            busy: Vec::with_capacity(pool),
            free,
            conns: HashMap::new(),
            next_conn: 1,
            listen,
            listen_http,
            local,
            udp_unicast,
            udp_multicast,
            epoch,
            accept_more: false,
            wakeups: None,
            staged_bytes: 0,
            arp: None,
            primary: Ipv4Cidr::new(opts.addr, opts.prefix_len),
            mac: EthernetAddress(mac.0),
            accepted: 0,
            accepted_http: 0,
            copies: Copies::new(),
            guard,
            arp_pending: None,
        };
        port.arm_listeners();
        Ok(port)
    }

    /// Counts this port's copies in `ledger` (tests; see [`crate::copies`]).
    pub fn set_copies(&mut self, ledger: Copies) {
        self.copies = ledger;
    }

    /// Links this port to the other loops' ports on the same NIC (see [`ArpShare`]).
    pub fn share_arp(&mut self, share: ArpShare) {
        self.arp = Some(share);
    }

    /// ARP frames passed to sibling loops, and those dropped because a sibling's queue
    /// was full.
    pub fn arp_shared(&self) -> (u64, u64) {
        self.arp
            .as_ref()
            .map_or((0, 0), |a| (a.passed.get(), a.dropped.get()))
    }

    /// The port's addresses: its own first, then the service addresses.
    pub fn addresses(&self) -> Vec<(Ipv4Addr, u8)> {
        let mut out = vec![(self.primary.address(), self.primary.prefix_len())];
        for c in self.iface.ip_addrs() {
            let IpCidr::Ipv4(c) = *c;
            if c != self.primary {
                out.push((c.address(), c.prefix_len()));
            }
        }
        out
    }

    /// Sends a gratuitous ARP for `addr` now (queued in the transmit burst and flushed).
    pub fn announce_address(&mut self, addr: Ipv4Addr) -> io::Result<()> {
        let now = self.stamp();
        let mac = self.mac;
        let tx = self
            .device
            .transmit(now)
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        tx.consume(GARP_FRAME, |buf| gratuitous_arp(mac, addr, buf));
        self.device.flush();
        Ok(())
    }

    /// Counts received frames dropped by the check into `stats` (the loop's own), from
    /// now on.
    pub fn count_into(&mut self, stats: Arc<NodeStats>) {
        self.guard.count_into(stats);
    }

    /// The counters of dropped received frames (the loop's, once given).
    pub fn rx_drops(&self) -> &NodeStats {
        self.guard.stats()
    }

    /// The device's counters.
    pub fn phy_stats(&self) -> PhyStats {
        self.device.stats()
    }

    /// Received bytes copied into a staging buffer because smoltcp's ring wrapped
    /// (every other received byte is lent in place).
    pub fn staged_bytes(&self) -> u64 {
        self.staged_bytes
    }

    /// Connections handed out so far: by [`NetPort::accept`] (DOSP) and by
    /// [`NetPort::accept_http`].
    pub fn accepted(&self) -> (u64, u64) {
        (self.accepted, self.accepted_http)
    }

    /// TCP sockets of the pool neither free nor listening: connections handed out, and
    /// closed ones smoltcp is still closing.
    pub fn sockets_in_use(&self) -> usize {
        self.busy
            .iter()
            .filter(|&&ix| matches!(self.slots[ix].use_, Use::Conn(_) | Use::Closing(_)))
            .count()
    }

    fn stamp(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Puts free sockets in listen state (into the set) until [`LISTENERS`] listen on
    /// the DOSP port and, with HTTP, [`HTTP_LISTENERS`] on the HTTP port. Taken in
    /// turn, so that a pool nearly exhausted still gives each service a listener.
    fn arm_listeners(&mut self) {
        let (mut dosp, mut http) = (0, 0);
        for &ix in &self.busy {
            match self.slots[ix].use_ {
                Use::Listening(Service::Dosp) => dosp += 1,
                Use::Listening(Service::Http) => http += 1,
                _ => {}
            }
        }
        let http_want = if self.listen_http.is_some() {
            HTTP_LISTENERS
        } else {
            0
        };
        let mut wants = [
            (Service::Dosp, LISTENERS.saturating_sub(dosp)),
            (Service::Http, http_want.saturating_sub(http)),
        ];
        while wants.iter().any(|&(_, n)| n > 0) {
            for (service, left) in wants.iter_mut() {
                if *left == 0 {
                    continue;
                }
                if !self.arm(*service) {
                    return;
                }
                *left -= 1;
            }
        }
    }

    /// Puts one free socket in listen state for `service`; false when none is free
    /// (or smoltcp refused, which is logged).
    fn arm(&mut self, service: Service) -> bool {
        let endpoint = match service {
            Service::Dosp => self.listen,
            Service::Http => match self.listen_http {
                Some(e) => e,
                None => return false,
            },
        };
        let Some(ix) = self.free.pop() else {
            return false;
        };
        let slot = &mut self.slots[ix];
        let mut sock = slot.parked.take().unwrap_or_else(tcp_socket);
        match sock.listen(endpoint) {
            Ok(()) => {
                sock.set_timeout(Some(HANDSHAKE_TIMEOUT));
                slot.handle = self.sockets.add(sock);
                slot.use_ = Use::Listening(service);
                self.busy.push(ix);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, ?service, "cannot listen on a pool socket");
                slot.parked = Some(sock);
                self.free.push(ix);
                false
            }
        }
    }

    /// Whether a socket listening for `service` has completed its handshake.
    fn established(&self, service: Service) -> bool {
        self.busy.iter().any(|&ix| {
            let s = &self.slots[ix];
            s.use_ == Use::Listening(service)
                && matches!(
                    self.sockets.get::<tcp::Socket>(s.handle).state(),
                    tcp::State::Established | tcp::State::CloseWait
                )
        })
    }

    /// Hands out up to [`ACCEPT_BURST`] connections established on sockets listening
    /// for `service`; whether it stopped at that bound with more waiting.
    fn take(&mut self, service: Service, new: &mut Vec<(ConnId, SocketAddr)>) -> bool {
        let mut taken = 0;
        let mut more = false;
        for i in 0..self.busy.len() {
            let ix = self.busy[i];
            if self.slots[ix].use_ != Use::Listening(service) {
                continue;
            }
            let sock = self.sockets.get::<tcp::Socket>(self.slots[ix].handle);
            if !matches!(
                sock.state(),
                tcp::State::Established | tcp::State::CloseWait
            ) {
                continue;
            }
            let Some(peer) = sock.remote_endpoint() else {
                continue;
            };
            if taken == ACCEPT_BURST {
                more = true;
                break;
            }
            taken += 1;
            let id = ConnId(self.next_conn);
            self.next_conn += 1;
            let slot = &mut self.slots[ix];
            self.sockets
                .get_mut::<tcp::Socket>(slot.handle)
                .set_timeout(Some(TCP_TIMEOUT));
            slot.use_ = Use::Conn(id);
            slot.stage.clear();
            slot.stage_at = 0;
            slot.drained = 0;
            slot.reported = 0;
            self.conns.insert(id, ix);
            match service {
                Service::Dosp => self.accepted += 1,
                Service::Http => self.accepted_http += 1,
            }
            new.push((id, SocketAddr::from(peer)));
        }
        // A replacement listens for each socket taken, while the pool has one.
        self.arm_listeners();
        more
    }

    /// Frees the sockets whose close finished (or lingered too long: those are reset
    /// now and freed on a later pass, once the reset went out): out of the set, parked.
    fn reclaim(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.busy.len() {
            let ix = self.busy[i];
            let slot = &mut self.slots[ix];
            let sock = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            // A handshake that timed out (HANDSHAKE_TIMEOUT) leaves its listener
            // closed: it goes back to the pool and a fresh listener is armed.
            let since = match slot.use_ {
                Use::Closing(since) => Some(since),
                Use::Listening(_) if sock.state() == tcp::State::Closed => None,
                _ => {
                    i += 1;
                    continue;
                }
            };
            let done = match (since, sock.state()) {
                (None, _) => true,
                (Some(since), state) => match state {
                    // Closed, and its reset (if it was aborted) sent: smoltcp forgot the
                    // peer. A TIME-WAIT socket is dropped (a stray FIN gets a reset).
                    tcp::State::Closed if sock.remote_endpoint().is_none() => true,
                    tcp::State::TimeWait => true,
                    tcp::State::Closed => false,
                    _ if now.saturating_duration_since(since) > CLOSE_LINGER => {
                        sock.abort();
                        false
                    }
                    _ => false,
                },
            };
            if !done {
                i += 1;
                continue;
            }
            slot.parked = match self.sockets.remove(slot.handle) {
                smoltcp::socket::Socket::Tcp(s) => Some(s),
                // Only TCP sockets are in the pool; a fresh one otherwise.
                _ => None,
            };
            slot.use_ = Use::Free;
            self.busy.swap_remove(i);
            self.free.push(ix);
        }
    }

    fn seen(&self, slot: &Slot) -> Seen {
        let sock = self.sockets.get::<tcp::Socket>(slot.handle);
        Seen {
            recv_queue: sock.recv_queue(),
            send_queue: sock.send_queue(),
            state: sock.state(),
        }
    }

    /// One pass over the NIC: receive burst, sockets, transmit burst. Whether anything
    /// moved.
    fn pass(&mut self) -> bool {
        let now = self.stamp();
        let mut dev = Linked {
            dev: &mut self.device,
            share: self.arp.as_ref(),
            pending: &mut self.arp_pending,
        };
        let r = self
            .guard
            .poll(&mut self.iface, now, &mut dev, &mut self.sockets);
        let sent = self.device.flush();
        self.reclaim(Instant::now());
        self.arm_listeners();
        r == PollResult::SocketStateChanged || sent > 0 || self.device.tx_pending() > 0
    }

    /// Appends what is ready now (see the module docs).
    fn collect(&mut self, ready: &mut Vec<Ready>) {
        if self.accept_more || self.established(Service::Dosp) {
            ready.push(Ready::Listener);
        }
        if self.listen_http.is_some() && self.established(Service::Http) {
            ready.push(Ready::HttpListener);
        }
        let datagrams = self
            .udp_unicast
            .into_iter()
            .chain(self.udp_multicast.map(|(h, _)| h))
            .any(|h| self.sockets.get::<udp::Socket>(h).can_recv());
        if datagrams {
            ready.push(Ready::Datagrams);
        }
        for &ix in &self.busy {
            let slot = &self.slots[ix];
            if let Use::Conn(id) = slot.use_ {
                if self.seen(slot) != slot.seen {
                    ready.push(Ready::Conn(id));
                }
            }
        }
    }

    /// Reports fired wakeup descriptors, waiting at most `timeout` for one; sleeps
    /// `timeout` when none is registered.
    fn wakeups(&mut self, timeout: Duration, ready: &mut Vec<Ready>) -> io::Result<()> {
        let Some((poll, events)) = self.wakeups.as_mut() else {
            if !timeout.is_zero() {
                std::thread::sleep(timeout);
            }
            return Ok(());
        };
        match poll.poll(events, Some(timeout)) {
            Ok(()) => {}
            // net_tap raises SIGIO when the kernel writes to the tap.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            ready.push(Ready::Wakeup(ev.token().0));
        }
        Ok(())
    }

    fn slot_of(&self, conn: ConnId) -> io::Result<usize> {
        self.conns
            .get(&conn)
            .copied()
            .ok_or_else(|| io::ErrorKind::NotConnected.into())
    }

    /// Moves up to `room` bytes from the slot's ring to its stage (both halves of a
    /// wrapped ring).
    fn stage_in(&mut self, ix: usize, room: usize) {
        let slot = &mut self.slots[ix];
        if slot.stage_at > 0 {
            slot.stage.drain(..slot.stage_at);
            slot.stage_at = 0;
        }
        let sock = self.sockets.get_mut::<tcp::Socket>(slot.handle);
        let mut left = room;
        for _ in 0..2 {
            if left == 0 || sock.recv_queue() == 0 {
                break;
            }
            let stage = &mut slot.stage;
            let n = sock
                .recv(|buf| {
                    let n = buf.len().min(left);
                    stage.extend_from_slice(&buf[..n]);
                    (n, n)
                })
                .unwrap_or(0);
            slot.drained += n as u64;
            self.staged_bytes += n as u64;
            self.copies.add(Site::PortRecv, n);
            left -= n;
        }
    }
}

impl NetPort for DpdkPort<'_, '_> {
    fn now(&mut self) -> Instant {
        Instant::now()
    }

    fn wait(&mut self, timeout: Duration, ready: &mut Vec<Ready>) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        for i in 0..self.busy.len() {
            let ix = self.busy[i];
            if matches!(self.slots[ix].use_, Use::Conn(_)) {
                self.slots[ix].seen = self.seen(&self.slots[ix]);
            }
        }
        let before = ready.len();
        let mut idle = 0u32;
        loop {
            let moved = self.pass();
            self.collect(ready);
            if self.wakeups.is_some() {
                self.wakeups(Duration::ZERO, ready)?;
            }
            let now = Instant::now();
            if ready.len() > before || now >= deadline {
                return Ok(());
            }
            if moved {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < SPINS_BEFORE_NAP {
                std::hint::spin_loop();
                continue;
            }
            // Nothing moved for a while: nap, unless smoltcp has a timer due sooner.
            let mut nap = NAP.min(deadline - now);
            if let Some(d) = self.iface.poll_delay(self.stamp(), &self.sockets) {
                nap = nap.min(Duration::from_micros(d.total_micros()));
            }
            self.wakeups(nap, ready)?;
            if ready.len() > before {
                return Ok(());
            }
        }
    }

    fn register_wakeup(&mut self, fd: RawFd, key: usize) -> io::Result<()> {
        if self.wakeups.is_none() {
            self.wakeups = Some((Poll::new()?, Events::with_capacity(64)));
        }
        let (poll, _) = self.wakeups.as_ref().expect("made above");
        poll.registry().register(
            &mut mio::unix::SourceFd(&fd),
            Token(key),
            Interest::READABLE,
        )
    }

    fn accept(&mut self, new: &mut Vec<(ConnId, SocketAddr)>) {
        self.accept_more = self.take(Service::Dosp, new);
    }

    fn accept_http(&mut self, new: &mut Vec<(ConnId, SocketAddr)>) -> bool {
        self.listen_http.is_some() && self.take(Service::Http, new)
    }

    fn http_addr(&self) -> Option<SocketAddr> {
        self.listen_http
            .map(|e| SocketAddr::new(self.local.ip(), e.port))
    }

    fn accept_due(&self) -> Option<Instant> {
        self.accept_more.then(Instant::now)
    }

    fn recv<F: FnOnce(&[u8]) -> usize>(&mut self, conn: ConnId, f: F) -> io::Result<Received> {
        let ix = self.slot_of(conn)?;
        let handle = self.slots[ix].handle;
        let (state, queued, contiguous) = {
            let sock = self.sockets.get_mut::<tcp::Socket>(handle);
            let queued = sock.recv_queue();
            let contiguous = if queued > 0 {
                sock.peek(queued).map(|b| b.len()).unwrap_or(0)
            } else {
                0
            };
            (sock.state(), queued, contiguous)
        };
        let staged = self.slots[ix].staged();
        if state == tcp::State::Closed && queued == 0 && staged == 0 {
            // Reset by the peer, or timed out: nothing more will come.
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        let slot = &mut self.slots[ix];
        let total = slot.drained + queued as u64;
        let arrived = (total - slot.reported) as usize;
        slot.reported = total;
        let lent_all;
        if staged > 0 || contiguous < queued.min(LEND_MIN) {
            // A wrapped ring (or a stage being drained): lend the stage, topped up to
            // LEND_MIN bytes.
            if staged < LEND_MIN && queued > 0 {
                self.stage_in(ix, LEND_MIN - staged);
            }
            let slot = &mut self.slots[ix];
            let lent = &slot.stage[slot.stage_at..];
            let n = f(lent).min(lent.len());
            lent_all = self.sockets.get::<tcp::Socket>(handle).recv_queue() == 0;
            slot.stage_at += n;
            if slot.stage_at == slot.stage.len() {
                slot.stage.clear();
                slot.stage_at = 0;
            }
        } else {
            let sock = self.sockets.get_mut::<tcp::Socket>(handle);
            let mut f = Some(f);
            let mut lent_len = 0;
            let n = if queued > 0 {
                sock.recv(|buf| {
                    lent_len = buf.len();
                    let n = f.take().map_or(0, |f| f(buf)).min(buf.len());
                    (n, n)
                })
                .unwrap_or(0)
            } else {
                0
            };
            if let Some(f) = f {
                f(&[]);
            }
            lent_all = lent_len == queued;
            self.slots[ix].drained += n as u64;
        }
        Ok(Received {
            arrived,
            peer_closed: fin_received(state) && lent_all,
        })
    }

    fn send(&mut self, conn: ConnId, data: &[u8]) -> io::Result<usize> {
        self.send_vectored(conn, &[io::IoSlice::new(data)])
    }

    fn send_vectored(&mut self, conn: ConnId, data: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let ix = self.slot_of(conn)?;
        let sock = self.sockets.get_mut::<tcp::Socket>(self.slots[ix].handle);
        let mut taken = 0;
        for d in data {
            match sock.send_slice(d) {
                Ok(n) => {
                    self.copies.add(Site::PortSend, n);
                    taken += n;
                    if n < d.len() {
                        break;
                    }
                }
                Err(_) if taken > 0 => break,
                Err(_) if sock.state() == tcp::State::Closed => {
                    return Err(io::ErrorKind::ConnectionReset.into())
                }
                Err(_) => return Err(io::ErrorKind::BrokenPipe.into()),
            }
        }
        if taken == 0 && data.iter().any(|d| !d.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(taken)
    }

    fn conn_state(&mut self, conn: ConnId) -> ConnState {
        let Ok(ix) = self.slot_of(conn) else {
            return ConnState::default();
        };
        let slot = &self.slots[ix];
        let sock = self.sockets.get::<tcp::Socket>(slot.handle);
        ConnState {
            unread_input: slot.staged() > 0 || sock.recv_queue() > 0,
            peer_closed: fin_received(sock.state()),
        }
    }

    fn refuse(&mut self, conn: ConnId, reply: &[u8]) {
        let Some(ix) = self.conns.remove(&conn) else {
            return;
        };
        let slot = &mut self.slots[ix];
        let sock = self.sockets.get_mut::<tcp::Socket>(slot.handle);
        let _ = sock.send_slice(reply);
        // Discard what the peer sent (at most the ring: both halves), so the close is
        // a FIN; what comes later is dropped by the closing socket's window.
        for _ in 0..2 {
            let _ = sock.recv(|buf| (buf.len(), ()));
        }
        sock.close();
        slot.stage.clear();
        slot.stage_at = 0;
        slot.use_ = Use::Closing(Instant::now());
    }

    fn close(&mut self, conn: ConnId) {
        let Some(ix) = self.conns.remove(&conn) else {
            return;
        };
        let slot = &mut self.slots[ix];
        let sock = self.sockets.get_mut::<tcp::Socket>(slot.handle);
        if slot.staged() > 0 || sock.recv_queue() > 0 {
            // Unread input: a reset, as the kernel sends.
            sock.abort();
        } else {
            sock.close();
        }
        slot.stage.clear();
        slot.stage_at = 0;
        slot.use_ = Use::Closing(Instant::now());
    }

    fn recv_datagram(
        &mut self,
        via: Dgram,
        buf: &mut [u8],
    ) -> io::Result<Option<(usize, SocketAddr)>> {
        let handle = match via {
            Dgram::Unicast => self.udp_unicast,
            Dgram::Multicast => self.udp_multicast.map(|(h, _)| h),
        };
        let Some(handle) = handle else {
            return Ok(None);
        };
        let sock = self.sockets.get_mut::<udp::Socket>(handle);
        for _ in 0..UDP_PACKETS {
            match sock.recv_slice(buf) {
                Ok((n, meta)) => return Ok(Some((n, SocketAddr::from(meta.endpoint)))),
                // Longer than the caller's buffer: dropped, as nothing sent to a node
                // is that long; look at the next.
                Err(udp::RecvError::Truncated) => continue,
                Err(udp::RecvError::Exhausted) => return Ok(None),
            }
        }
        Ok(None)
    }

    fn send_datagram(&mut self, via: Dgram, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        let handle = match via {
            Dgram::Unicast => self.udp_unicast,
            Dgram::Multicast => self.udp_multicast.map(|(h, _)| h),
        };
        let Some(handle) = handle else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let SocketAddr::V4(to4) = to else {
            return Err(invalid(format!("cannot send to {to}: IPv4 only")));
        };
        let mut meta = udp::UdpMetadata::from(IpEndpoint::from(to4));
        // The multicast socket is bound to the group: send from the node's address.
        meta.local_address = self.local_addr_ip();
        let sock = self.sockets.get_mut::<udp::Socket>(handle);
        match sock.send_slice(data, meta) {
            Ok(()) => Ok(data.len()),
            Err(udp::SendError::BufferFull) => Err(io::ErrorKind::WouldBlock.into()),
            Err(udp::SendError::Unaddressable) => Err(invalid(format!("cannot send to {to}"))),
        }
    }

    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn change_address(
        &mut self,
        change: Option<AddressChange>,
    ) -> Result<Vec<(Ipv4Addr, u8)>, String> {
        match change {
            None => {}
            Some(AddressChange::Add {
                addr,
                prefix_len,
                announce,
            }) => {
                if prefix_len > 32
                    || addr.is_unspecified()
                    || addr.is_multicast()
                    || addr.is_broadcast()
                {
                    return Err(format!(
                        "{addr}/{prefix_len} is not a unicast address with a prefix of at most 32"
                    ));
                }
                let cidr = Ipv4Cidr::new(addr, prefix_len);
                if addr == self.primary.address() {
                    return Err(format!("{addr} is the port's own address"));
                }
                let mut full = false;
                let mut had = false;
                self.iface.update_ip_addrs(|addrs| {
                    if let Some(c) = addrs
                        .iter_mut()
                        .find(|c| c.address() == IpAddress::Ipv4(addr))
                    {
                        // Already there: the prefix may change.
                        *c = IpCidr::Ipv4(cidr);
                        had = true;
                    } else if addrs.push(IpCidr::Ipv4(cidr)).is_err() {
                        full = true;
                    }
                });
                if full {
                    return Err(format!(
                        "the port holds at most {SERVICE_ADDRESSES_MAX} service addresses: remove one first"
                    ));
                }
                if !had {
                    tracing::info!(%addr, prefix_len, "service address added");
                }
                if announce {
                    // Once now; a lost one is repeated by the caller asking again.
                    self.announce_address(addr).map_err(|e| {
                        format!("{addr} added, but its gratuitous ARP was not sent: {e}")
                    })?;
                }
            }
            Some(AddressChange::Remove { addr }) => {
                if addr == self.primary.address() {
                    return Err(format!(
                        "{addr} is the port's own address: it cannot be removed"
                    ));
                }
                let mut found = false;
                self.iface.update_ip_addrs(|addrs| {
                    if let Some(i) = addrs
                        .iter()
                        .position(|c| c.address() == IpAddress::Ipv4(addr))
                    {
                        addrs.remove(i);
                        found = true;
                    }
                });
                if !found {
                    return Err(format!("{addr} is not a service address of this port"));
                }
                tracing::info!(%addr, "service address removed");
            }
        }
        Ok(self.addresses())
    }
}

impl DpdkPort<'_, '_> {
    fn local_addr_ip(&self) -> Option<IpAddress> {
        match self.local {
            SocketAddr::V4(a) => Some(IpAddress::Ipv4(*a.ip())),
            SocketAddr::V6(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol};

    fn arp_frame(op: ArpOperation, from: Ipv4Addr, to: Ipv4Addr) -> Vec<u8> {
        let repr = ArpRepr::EthernetIpv4 {
            operation: op,
            source_hardware_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
            source_protocol_addr: from,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: to,
        };
        let mut buf = vec![0u8; 14 + repr.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.set_dst_addr(EthernetAddress::BROADCAST);
        eth.set_src_addr(EthernetAddress([2, 0, 0, 0, 0, 1]));
        eth.set_ethertype(EthernetProtocol::Arp);
        repr.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
        buf
    }

    fn parse(frame: &[u8]) -> ArpRepr {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        assert_eq!(eth.ethertype(), EthernetProtocol::Arp);
        ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap()
    }

    #[test]
    fn arp_frames_reach_every_sibling_as_replies_and_nothing_else_does() {
        let shares = arp_shares(3);
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let b = Ipv4Addr::new(10, 0, 0, 2);
        shares[0].offer(&arp_frame(ArpOperation::Request, a, b));
        // Not ARP, too short, too long: not passed.
        let mut ip = arp_frame(ArpOperation::Request, a, b);
        ip[12..14].copy_from_slice(&[0x08, 0x00]);
        shares[0].offer(&ip);
        shares[0].offer(&[0u8; 20]);
        shares[0].offer(&[0u8; 200]);
        assert_eq!((shares[0].passed.get(), shares[0].dropped.get()), (2, 0));
        assert!(shares[0].inbox.is_empty(), "a share never sends to itself");
        for s in &shares[1..] {
            let f = s.inbox.try_recv().unwrap();
            let ArpRepr::EthernetIpv4 {
                operation,
                source_protocol_addr,
                target_protocol_addr,
                ..
            } = parse(&f.bytes[..usize::from(f.len)])
            else {
                unreachable!()
            };
            // A reply: fills the sibling's cache without making it answer.
            assert_eq!(operation, ArpOperation::Reply);
            assert_eq!((source_protocol_addr, target_protocol_addr), (a, b));
            assert!(s.inbox.is_empty());
        }
        // A sibling that does not drain: its queue fills, the rest is counted.
        for _ in 0..ARP_QUEUE + 5 {
            shares[1].offer(&arp_frame(ArpOperation::Reply, a, b));
        }
        assert_eq!(shares[1].dropped.get(), 2 * 5);
    }

    #[test]
    fn a_gratuitous_arp_names_the_address_as_sender_and_target() {
        let mac = EthernetAddress([2, 9, 8, 7, 6, 5]);
        let addr = Ipv4Addr::new(192, 168, 7, 9);
        let mut buf = [0xaau8; GARP_FRAME];
        gratuitous_arp(mac, addr, &mut buf);
        let eth = EthernetFrame::new_checked(&buf[..]).unwrap();
        assert_eq!(eth.dst_addr(), EthernetAddress::BROADCAST);
        assert_eq!(eth.src_addr(), mac);
        let ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_hardware_addr,
            target_protocol_addr,
        } = parse(&buf)
        else {
            unreachable!()
        };
        assert_eq!(operation, ArpOperation::Request);
        assert_eq!(source_hardware_addr, mac);
        assert_eq!(source_protocol_addr, addr);
        assert_eq!(target_protocol_addr, addr);
        assert_eq!(target_hardware_addr, EthernetAddress([0; 6]));
        assert!(buf[42..].iter().all(|&b| b == 0), "padding is zero");
    }
}
