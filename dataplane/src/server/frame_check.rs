//! The check every frame received on a DPDK port passes before smoltcp sees it
//! ([`check`]): a pure function of the frame's bytes, which never allocates and never
//! panics, whatever the bytes.
//!
//! It drops (and names the reason of, [`RxDrop`]):
//! - frames too short for the headers they claim, at any layer ([`RxDrop::Truncated`]);
//! - Ethernet frames that are neither IPv4 nor ARP ([`RxDrop::UnknownEthertype`]);
//! - IPv4 headers that are malformed: version not 4, IHL below 5, total length below
//!   the header ([`RxDrop::BadIpHeader`]), or whose header checksum is wrong
//!   ([`RxDrop::BadIpChecksum`]);
//! - IP fragments, first or later (MF set, or a fragment offset): dosd does not
//!   reassemble ([`RxDrop::IpFragment`]);
//! - TCP segments with a data offset below 5 and UDP datagrams whose length field is
//!   below 8 ([`RxDrop::BadTransportHeader`]);
//! - TCP segments and UDP datagrams whose checksum is wrong ([`RxDrop::BadChecksum`]).
//!   A UDP checksum of zero means "none" (RFC 768) and passes, as smoltcp has it.
//!
//! What passes is described by [`Passed`], enough for the caller's own decision on TCP
//! SYNs ([`RxDrop::SynRefused`], made by the port, which knows whether a socket
//! listens). Ethernet padding after the IP packet's total length is allowed; IPv4
//! options are allowed (and skipped); protocols other than TCP and UDP pass untouched
//! (smoltcp checks ICMP and IGMP itself). What passes is exactly what smoltcp's own
//! parsers accept at these layers with every checksum verified, so the port tells
//! smoltcp not to verify IPv4, TCP and UDP checksums again: each byte is summed once.
//! The property tests below hold the check to that.

use std::net::Ipv4Addr;

/// Why a received frame was dropped (or, for [`RxDrop::SynRefused`], refused). Each
/// reason has its own counter per loop (`NodeStats::net_rx_dropped`, exported as
/// `dosd_net_rx_dropped_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RxDrop {
    /// Shorter than the headers it claims (Ethernet, ARP, IPv4, TCP, UDP).
    Truncated = 0,
    /// Neither IPv4 nor ARP (IPv6, VLAN tags, LLDP, …).
    UnknownEthertype = 1,
    /// IPv4 version not 4, IHL below 5, or a total length below the header.
    BadIpHeader = 2,
    /// IPv4 header checksum wrong.
    BadIpChecksum = 3,
    /// An IP fragment: dosd does not reassemble.
    IpFragment = 4,
    /// TCP data offset below 5 words, or a UDP length field below 8.
    BadTransportHeader = 5,
    /// TCP or UDP checksum wrong.
    BadChecksum = 6,
    /// A TCP SYN for the DOSP port while no socket of the pool listens (every socket is
    /// taken or in a handshake): dropped, so the client retries later, as with a full
    /// kernel backlog.
    SynRefused = 7,
}

impl RxDrop {
    pub const ALL: [RxDrop; 8] = [
        RxDrop::Truncated,
        RxDrop::UnknownEthertype,
        RxDrop::BadIpHeader,
        RxDrop::BadIpChecksum,
        RxDrop::IpFragment,
        RxDrop::BadTransportHeader,
        RxDrop::BadChecksum,
        RxDrop::SynRefused,
    ];

    /// The `reason` label in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            RxDrop::Truncated => "truncated",
            RxDrop::UnknownEthertype => "unknown_ethertype",
            RxDrop::BadIpHeader => "bad_ip_header",
            RxDrop::BadIpChecksum => "bad_ip_checksum",
            RxDrop::IpFragment => "ip_fragment",
            RxDrop::BadTransportHeader => "bad_transport_header",
            RxDrop::BadChecksum => "bad_checksum",
            RxDrop::SynRefused => "syn_refused",
        }
    }
}

/// TCP flag bits (the low byte of the flags field).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment that passed, as far as the port needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSeen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    /// The low byte of the flags field ([`TCP_SYN`], …).
    pub flags: u8,
}

impl TcpSeen {
    /// A connection request: SYN without ACK or RST.
    pub fn is_connect(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
    }
}

/// What a frame that passed carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Passed {
    Arp,
    Tcp(TcpSeen),
    Udp {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        src_port: u16,
        dst_port: u16,
    },
    /// Another IP protocol (ICMP, IGMP, …), left to smoltcp.
    OtherIp {
        protocol: u8,
    },
}

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
/// An Ethernet/IPv4 ARP packet.
const ARP_LEN: usize = 28;
const IPV4_HEADER_MIN: usize = 20;
const TCP_HEADER_MIN: usize = 20;
const UDP_HEADER: usize = 8;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

fn be16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(&[hi, lo]) => u16::from_be_bytes([hi, lo]),
        _ => 0,
    }
}

fn addr(b: &[u8], at: usize) -> Ipv4Addr {
    match b.get(at..at + 4) {
        Some(&[a, b2, c, d]) => Ipv4Addr::new(a, b2, c, d),
        _ => Ipv4Addr::UNSPECIFIED,
    }
}

/// The ones'-complement sum of `data` as big-endian 16-bit words (an odd last byte is
/// padded with zero), added to `sum` and not yet folded. A frame is at most 64 KiB, so
/// a `u64` cannot overflow.
pub fn sum16(mut sum: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_be_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        sum += (v >> 48) + ((v >> 32) & 0xffff) + ((v >> 16) & 0xffff) + (v & 0xffff);
    }
    let mut rest = words.remainder().chunks_exact(2);
    for w in &mut rest {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = rest.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a sum to 16 bits (end-around carry).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Whether data whose checksum field is included sums to all ones (RFC 1071).
fn verifies(sum: u64) -> bool {
    fold(sum) == 0xffff
}

/// The IPv4 pseudo-header's sum for a transport payload of `len` bytes.
fn pseudo(ip: &[u8], protocol: u8, len: usize) -> u64 {
    sum16(0, ip.get(12..20).unwrap_or(&[])) + u64::from(protocol) + len as u64
}

/// Checks one received Ethernet frame (without FCS). See the module docs.
pub fn check(frame: &[u8]) -> Result<Passed, RxDrop> {
    if frame.len() < ETH_HEADER {
        return Err(RxDrop::Truncated);
    }
    let payload = &frame[ETH_HEADER..];
    match be16(frame, 12) {
        ETHERTYPE_IPV4 => check_ipv4(payload),
        ETHERTYPE_ARP if payload.len() < ARP_LEN => Err(RxDrop::Truncated),
        ETHERTYPE_ARP => Ok(Passed::Arp),
        _ => Err(RxDrop::UnknownEthertype),
    }
}

fn check_ipv4(p: &[u8]) -> Result<Passed, RxDrop> {
    if p.len() < IPV4_HEADER_MIN {
        return Err(RxDrop::Truncated);
    }
    let (version, ihl) = (p[0] >> 4, usize::from(p[0] & 0x0f) * 4);
    let total = usize::from(be16(p, 2));
    if version != 4 || ihl < IPV4_HEADER_MIN || total < ihl {
        return Err(RxDrop::BadIpHeader);
    }
    if p.len() < total {
        return Err(RxDrop::Truncated);
    }
    let header = &p[..ihl];
    if !verifies(sum16(0, header)) {
        return Err(RxDrop::BadIpChecksum);
    }
    let frag = be16(p, 6);
    // MF (0x2000) or a non-zero offset (low 13 bits); DF (0x4000) is fine.
    if frag & 0x3fff != 0 {
        return Err(RxDrop::IpFragment);
    }
    let protocol = p[9];
    let (src, dst) = (addr(p, 12), addr(p, 16));
    let l4 = &p[ihl..total];
    match protocol {
        PROTO_TCP => {
            if l4.len() < TCP_HEADER_MIN {
                return Err(RxDrop::Truncated);
            }
            let offset = usize::from(l4[12] >> 4) * 4;
            if offset < TCP_HEADER_MIN {
                return Err(RxDrop::BadTransportHeader);
            }
            if l4.len() < offset {
                return Err(RxDrop::Truncated);
            }
            if !verifies(sum16(pseudo(header, PROTO_TCP, l4.len()), l4)) {
                return Err(RxDrop::BadChecksum);
            }
            Ok(Passed::Tcp(TcpSeen {
                src,
                dst,
                src_port: be16(l4, 0),
                dst_port: be16(l4, 2),
                flags: l4[13],
            }))
        }
        PROTO_UDP => {
            if l4.len() < UDP_HEADER {
                return Err(RxDrop::Truncated);
            }
            let len = usize::from(be16(l4, 4));
            if len < UDP_HEADER {
                return Err(RxDrop::BadTransportHeader);
            }
            if l4.len() < len {
                return Err(RxDrop::Truncated);
            }
            let udp = &l4[..len];
            if be16(udp, 6) != 0 && !verifies(sum16(pseudo(header, PROTO_UDP, len), udp)) {
                return Err(RxDrop::BadChecksum);
            }
            Ok(Passed::Udp {
                src,
                dst,
                src_port: be16(l4, 0),
                dst_port: be16(l4, 2),
            })
        }
        protocol => Ok(Passed::OtherIp { protocol }),
    }
}

#[cfg(test)]
#[path = "frame_check_tests.rs"]
pub(crate) mod tests;
