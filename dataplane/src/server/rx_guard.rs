//! [`RxGuard`]: what a DPDK port's received frames go through before smoltcp sees them
//! (the `dpdk` feature).
//!
//! [`RxGuard::poll`] stands in for smoltcp's `Interface::poll`: maintenance, then for
//! each received frame (at most [`INGRESS_PER_POLL`] a call) the pure
//! [`frame_check::check`] and the SYN rule below, and only a frame that passes goes to
//! `Interface::poll_ingress_single`; then egress, as `Interface::poll` does. A dropped
//! frame is freed at once and counted by reason in the loop's
//! [`NodeStats::net_rx_dropped`]. The check verifies the IPv4 header checksum and the
//! TCP and UDP checksums, so the device tells smoltcp to compute those checksums on
//! transmit only ([`RxGuard::checksums`]): each received byte is summed once.
//!
//! The SYN rule: a TCP connection request (SYN without ACK) for the DOSP address and
//! port (or the HTTP port, when the port serves signed URLs), when no TCP socket of the
//! set is in LISTEN on that port number and none belongs to that peer's endpoint (a
//! retransmitted SYN of a handshake under way), is dropped and counted as
//! [`RxDrop::SynRefused`]: the pool is at its bound (every socket taken or in a
//! handshake). smoltcp would answer it with a reset; dropping it costs nothing to send
//! under a flood, and the client retries as it does against a full kernel backlog.
//!
//! Not counted: TCP segments outside a connection's window. smoltcp drops them (and
//! answers with a challenge ACK) inside the socket, and its sockets do not expose their
//! receive window, so this module cannot tell them from segments it accepts.
//!
//! The NIC's checksum offload flags are not used: the port is configured without
//! receive offloads, so DPDK reports no verdict, and software verification is the one
//! path.

use std::net::Ipv4Addr;
use std::sync::Arc;

use dpdk::MbufDevice;
use smoltcp::iface::{Interface, PollIngressSingleResult, PollResult, SocketSet};
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device};
use smoltcp::socket::{tcp, Socket};
use smoltcp::time::Instant;
use smoltcp::wire::{IpAddress, IpEndpoint};

use super::frame_check::{self, Passed, RxDrop, TcpSeen};
use crate::stats::NodeStats;

/// Received frames one [`RxGuard::poll`] handles at most (passed or dropped), so that a
/// flood cannot keep the loop in one poll: what is left waits in the NIC's ring for
/// the next pass.
pub const INGRESS_PER_POLL: usize = 256;

/// A smoltcp device whose next received frame can be looked at, and dropped, before
/// `Device::receive` hands it out.
pub trait PeekDevice: Device {
    /// The bytes of the frame the next `receive` hands out; `None` when none waits.
    fn peek_rx(&mut self) -> Option<&[u8]>;
    /// Frees that frame without handing it out.
    fn discard_rx(&mut self);
}

impl PeekDevice for MbufDevice<'_, '_> {
    fn peek_rx(&mut self) -> Option<&[u8]> {
        MbufDevice::peek_rx(self)
    }

    fn discard_rx(&mut self) {
        MbufDevice::discard_rx(self)
    }
}

/// The receive-side check of one port: its DOSP endpoint (and HTTP port) and the
/// counters it raises.
#[derive(Debug)]
pub struct RxGuard {
    addr: Ipv4Addr,
    port: u16,
    http_port: Option<u16>,
    stats: Arc<NodeStats>,
}

impl RxGuard {
    /// A guard for the DOSP endpoint `addr:port`, counting into counters of its own
    /// until [`RxGuard::count_into`] gives it the loop's.
    pub fn new(addr: Ipv4Addr, port: u16) -> RxGuard {
        RxGuard {
            addr,
            port,
            http_port: None,
            stats: Arc::default(),
        }
    }

    /// Refuses connection requests to `addr:http_port` too, as for DOSP (the port's
    /// HTTP listeners).
    pub fn guard_http(&mut self, http_port: u16) {
        self.http_port = Some(http_port);
    }

    /// Counts into `stats` (the loop's own [`NodeStats`]) from now on.
    pub fn count_into(&mut self, stats: Arc<NodeStats>) {
        self.stats = stats;
    }

    /// The counters it raises.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// The checksum capabilities for the device under a guard: IPv4, TCP and UDP
    /// computed on transmit, not verified on receive (the guard did); ICMP as smoltcp
    /// does by default.
    pub fn checksums() -> ChecksumCapabilities {
        let mut c = ChecksumCapabilities::default();
        c.ipv4 = Checksum::Tx;
        c.tcp = Checksum::Tx;
        c.udp = Checksum::Tx;
        c
    }

    /// `Interface::poll` with every received frame checked first (see the module
    /// docs). Whether a socket's state may have changed, or a frame was handled.
    pub fn poll<D: PeekDevice>(
        &mut self,
        iface: &mut Interface,
        now: Instant,
        device: &mut D,
        sockets: &mut SocketSet<'_>,
    ) -> PollResult {
        iface.poll_maintenance(now);
        let mut res = PollResult::None;
        for _ in 0..INGRESS_PER_POLL {
            let Some(frame) = device.peek_rx() else {
                break;
            };
            let verdict = match frame_check::check(frame) {
                Ok(Passed::Tcp(seg)) if self.refuses(&seg, sockets) => Err(RxDrop::SynRefused),
                Ok(_) => Ok(()),
                Err(reason) => Err(reason),
            };
            // A frame handled, passed or not: the caller polls again soon.
            res = PollResult::SocketStateChanged;
            if let Err(reason) = verdict {
                self.stats.rx_dropped(reason);
                device.discard_rx();
                continue;
            }
            if iface.poll_ingress_single(now, device, sockets) == PollIngressSingleResult::None {
                break;
            }
        }
        while iface.poll_egress(now, device, sockets) == PollResult::SocketStateChanged {
            res = PollResult::SocketStateChanged;
        }
        res
    }

    /// Whether `seg` is a connection request for the DOSP (or HTTP) endpoint that no
    /// socket can take: none listens on its port, and none is already talking to its
    /// sender there.
    fn refuses(&self, seg: &TcpSeen, sockets: &SocketSet<'_>) -> bool {
        let port = seg.dst_port;
        if !seg.is_connect()
            || seg.dst != self.addr
            || (port != self.port && Some(port) != self.http_port)
        {
            return false;
        }
        let peer = IpEndpoint::new(IpAddress::Ipv4(seg.src), seg.src_port);
        !sockets.iter().any(|(_, s)| match s {
            Socket::Tcp(t) => {
                (t.state() == tcp::State::Listen && t.listen_endpoint().port == port)
                    || (t.remote_endpoint() == Some(peer)
                        && t.local_endpoint().is_some_and(|l| l.port == port))
            }
            _ => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use smoltcp::iface::Config;
    use smoltcp::phy::{DeviceCapabilities, Medium, RxToken, TxToken};
    use smoltcp::wire::{EthernetAddress, IpCidr, IpListenEndpoint};

    use super::*;
    use crate::server::frame_check::tests::{build, Spec};
    use crate::server::frame_check::{TCP_ACK, TCP_SYN};

    /// Frames in, frames out, in memory.
    #[derive(Default)]
    struct Fake {
        rx: VecDeque<Vec<u8>>,
        tx: Vec<Vec<u8>>,
    }

    struct Rx(Vec<u8>);
    struct Tx<'a>(&'a mut Vec<Vec<u8>>);

    impl RxToken for Rx {
        fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
            f(&self.0)
        }
    }

    impl TxToken for Tx<'_> {
        fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
            let mut b = vec![0; len];
            let r = f(&mut b);
            self.0.push(b);
            r
        }
    }

    impl Device for Fake {
        type RxToken<'a> = Rx;
        type TxToken<'a> = Tx<'a>;

        fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
            let f = self.rx.pop_front()?;
            Some((Rx(f), Tx(&mut self.tx)))
        }

        fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
            Some(Tx(&mut self.tx))
        }

        fn capabilities(&self) -> DeviceCapabilities {
            let mut c = DeviceCapabilities::default();
            c.medium = Medium::Ethernet;
            c.max_transmission_unit = 1514;
            c.checksum = RxGuard::checksums();
            c
        }
    }

    impl PeekDevice for Fake {
        fn peek_rx(&mut self) -> Option<&[u8]> {
            self.rx.front().map(|f| f.as_slice())
        }

        fn discard_rx(&mut self) {
            self.rx.pop_front();
        }
    }

    const NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const PORT: u16 = 7370;

    fn syn(src_port: u16) -> Vec<u8> {
        let mut s = Spec::tcp(TCP_SYN, b"");
        s.src_port = src_port;
        build(&s)
    }

    #[test]
    fn bad_frames_are_counted_and_syns_refused_only_without_a_listener() {
        let mut dev = Fake::default();
        // The frames `build` makes go to 02:00:00:00:00:02.
        let config = Config::new(EthernetAddress([2, 0, 0, 0, 0, 2]).into());
        let mut iface = Interface::new(config, &mut dev, Instant::ZERO);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(NODE), 24));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let mut listener = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 4096]),
            tcp::SocketBuffer::new(vec![0; 4096]),
        );
        listener
            .listen(IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(NODE)),
                port: PORT,
            })
            .unwrap();
        let h = sockets.add(listener);
        let mut guard = RxGuard::new(NODE, PORT);
        let now = Instant::from_secs(1);

        // Damaged frames: none reaches smoltcp (the listener stays in LISTEN).
        let mut bad_sum = syn(40000);
        let last = bad_sum.len() - 1;
        bad_sum[last] ^= 0xff;
        let mut fragment = syn(40000);
        fragment[20] = 0x20; // MF
        fragment[24..26].fill(0);
        let c = !super::frame_check::fold(super::frame_check::sum16(0, &fragment[14..34]));
        fragment[24..26].copy_from_slice(&c.to_be_bytes());
        dev.rx.extend([bad_sum, fragment, vec![0; 10]]);
        guard.poll(&mut iface, now, &mut dev, &mut sockets);
        let s = guard.stats();
        assert_eq!(s.rx_dropped_count(RxDrop::BadChecksum), 1);
        assert_eq!(s.rx_dropped_count(RxDrop::IpFragment), 1);
        assert_eq!(s.rx_dropped_count(RxDrop::Truncated), 1);
        assert_eq!(sockets.get::<tcp::Socket>(h).state(), tcp::State::Listen);

        // A SYN takes the one listener; a SYN from another port finds none and is
        // refused; the first SYN again (a retransmission) still goes to its socket.
        dev.rx.extend([syn(40000), syn(40001), syn(40000)]);
        guard.poll(&mut iface, now, &mut dev, &mut sockets);
        assert_eq!(
            sockets.get::<tcp::Socket>(h).state(),
            tcp::State::SynReceived
        );
        assert_eq!(guard.stats().rx_dropped_count(RxDrop::SynRefused), 1);
        assert!(dev.rx.is_empty());
        assert!(!dev.tx.is_empty(), "smoltcp answered the first SYN");

        // Not a connection request, or not for the DOSP port: never refused here.
        let mut synack = Spec::tcp(TCP_SYN | TCP_ACK, b"");
        synack.src_port = 40002;
        let mut other = Spec::tcp(TCP_SYN, b"");
        other.dst_port = PORT + 1;
        dev.rx.extend([build(&synack), build(&other)]);
        guard.poll(&mut iface, now, &mut dev, &mut sockets);
        assert_eq!(guard.stats().rx_dropped_count(RxDrop::SynRefused), 1);

        // A flood is handled INGRESS_PER_POLL frames a call.
        dev.rx
            .extend((0..INGRESS_PER_POLL + 10).map(|_| vec![0u8; 3]));
        guard.poll(&mut iface, now, &mut dev, &mut sockets);
        assert_eq!(dev.rx.len(), 10);
        guard.poll(&mut iface, now, &mut dev, &mut sockets);
        assert!(dev.rx.is_empty());
        assert_eq!(
            guard.stats().rx_dropped_count(RxDrop::Truncated),
            1 + INGRESS_PER_POLL as u64 + 10
        );
    }

    #[test]
    fn syns_for_the_http_port_are_refused_only_without_an_http_listener() {
        const HTTP: u16 = 8080;
        let mut dev = Fake::default();
        let config = Config::new(EthernetAddress([2, 0, 0, 0, 0, 2]).into());
        let mut iface = Interface::new(config, &mut dev, Instant::ZERO);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(NODE), 24));
        });
        let listening = |port| {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 4096]),
                tcp::SocketBuffer::new(vec![0; 4096]),
            );
            s.listen(IpListenEndpoint { addr: None, port }).unwrap();
            s
        };
        let mut sockets = SocketSet::new(Vec::new());
        let dosp = sockets.add(listening(PORT));
        let mut guard = RxGuard::new(NODE, PORT);
        let now = Instant::from_secs(1);
        let http_syn = |src_port| {
            let mut s = Spec::tcp(TCP_SYN, b"");
            s.src_port = src_port;
            s.dst_port = HTTP;
            build(&s)
        };
        let refused = |g: &RxGuard| g.stats().rx_dropped_count(RxDrop::SynRefused);

        // A guard that serves no HTTP leaves that port to smoltcp (a reset).
        dev.rx.push_back(http_syn(41000));
        guard.poll(&mut iface, now, &mut dev, &mut sockets);
        assert_eq!(refused(&guard), 0);

        // Guarded: the DOSP listener does not count for an HTTP SYN, which is refused.
        guard.guard_http(HTTP);
        dev.rx.push_back(http_syn(41001));
        guard.poll(&mut iface, now, &mut dev, &mut sockets);
        assert_eq!(refused(&guard), 1);
        assert_eq!(sockets.get::<tcp::Socket>(dosp).state(), tcp::State::Listen);

        // An HTTP listener takes one; its retransmission still reaches it; a third SYN
        // finds no listener on the HTTP port and is refused, though DOSP still listens.
        let http = sockets.add(listening(HTTP));
        dev.rx
            .extend([http_syn(41002), http_syn(41002), http_syn(41003)]);
        guard.poll(&mut iface, now, &mut dev, &mut sockets);
        assert_eq!(
            sockets.get::<tcp::Socket>(http).state(),
            tcp::State::SynReceived
        );
        assert_eq!(sockets.get::<tcp::Socket>(dosp).state(), tcp::State::Listen);
        assert_eq!(refused(&guard), 2);
        assert!(dev.rx.is_empty());
    }

    #[test]
    fn the_counters_are_the_loops_once_given() {
        let mut guard = RxGuard::new(NODE, PORT);
        let loop_stats = Arc::new(NodeStats::default());
        guard.count_into(Arc::clone(&loop_stats));
        guard.stats().rx_dropped(RxDrop::IpFragment);
        assert_eq!(loop_stats.rx_dropped_count(RxDrop::IpFragment), 1);
    }
}
