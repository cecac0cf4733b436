//! Tests of [`super::check`]: each reason, frames that must pass, boundaries, and
//! property tests against smoltcp's own parsers (a dev-dependency here).

use std::net::Ipv4Addr;

use proptest::prelude::*;
use smoltcp::wire::{
    ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, IpAddress, Ipv4Packet, TcpPacket,
    UdpPacket,
};

use super::*;

const SRC: [u8; 4] = [10, 0, 0, 1];
const DST: [u8; 4] = [10, 0, 0, 2];

/// What [`build`] makes: one Ethernet/IPv4 frame.
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    pub(crate) protocol: u8,
    pub(crate) src: [u8; 4],
    pub(crate) dst: [u8; 4],
    pub(crate) src_port: u16,
    pub(crate) dst_port: u16,
    pub(crate) flags: u8,
    /// IPv4 option words (0..=10) and TCP option words (0..=10).
    pub(crate) ip_opts: usize,
    pub(crate) tcp_opts: usize,
    pub(crate) payload: Vec<u8>,
    /// Bytes after the IP packet (Ethernet padding).
    pub(crate) pad: usize,
    /// UDP only: send no checksum (zero).
    pub(crate) udp_no_checksum: bool,
}

impl Spec {
    pub(crate) fn tcp(flags: u8, payload: &[u8]) -> Spec {
        Spec {
            protocol: 6,
            src: SRC,
            dst: DST,
            src_port: 40000,
            dst_port: 7370,
            flags,
            ip_opts: 0,
            tcp_opts: 0,
            payload: payload.to_vec(),
            pad: 0,
            udp_no_checksum: false,
        }
    }

    fn udp(payload: &[u8]) -> Spec {
        Spec {
            protocol: 17,
            ..Spec::tcp(0, payload)
        }
    }
}

/// The Internet checksum the slow way: byte pairs, folded at every step (independent of
/// the module's word-at-a-time sum).
fn naive_checksum(parts: &[&[u8]]) -> u16 {
    let mut bytes: Vec<u8> = parts.concat();
    if bytes.len() % 2 == 1 {
        bytes.push(0);
    }
    let mut s: u32 = 0;
    for pair in bytes.chunks(2) {
        s += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

pub(crate) fn build(s: &Spec) -> Vec<u8> {
    let mut l4 = Vec::new();
    match s.protocol {
        6 => {
            let offset = 5 + s.tcp_opts;
            l4.extend_from_slice(&s.src_port.to_be_bytes());
            l4.extend_from_slice(&s.dst_port.to_be_bytes());
            l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.push((offset as u8) << 4);
            l4.push(s.flags);
            l4.extend_from_slice(&8192u16.to_be_bytes()); // window
            l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            l4.extend(std::iter::repeat_n(1u8, s.tcp_opts * 4)); // NOPs
            l4.extend_from_slice(&s.payload);
        }
        17 => {
            l4.extend_from_slice(&s.src_port.to_be_bytes());
            l4.extend_from_slice(&s.dst_port.to_be_bytes());
            l4.extend_from_slice(&((8 + s.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            l4.extend_from_slice(&s.payload);
        }
        _ => l4.extend_from_slice(&s.payload),
    }
    let len = l4.len() as u16;
    let pseudo = [
        &s.src[..],
        &s.dst[..],
        &[0, s.protocol],
        &len.to_be_bytes()[..],
    ]
    .concat();
    match s.protocol {
        6 => {
            let c = naive_checksum(&[&pseudo, &l4]);
            l4[16..18].copy_from_slice(&c.to_be_bytes());
        }
        17 if !s.udp_no_checksum => {
            let mut c = naive_checksum(&[&pseudo, &l4]);
            if c == 0 {
                c = 0xffff;
            }
            l4[6..8].copy_from_slice(&c.to_be_bytes());
        }
        _ => {}
    }
    let ihl = 5 + s.ip_opts;
    let mut ip = vec![(4 << 4) | ihl as u8, 0];
    ip.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0]); // id, DF
    ip.extend_from_slice(&[64, s.protocol, 0, 0]);
    ip.extend_from_slice(&s.src);
    ip.extend_from_slice(&s.dst);
    ip.extend(std::iter::repeat_n(1u8, s.ip_opts * 4)); // NOP options
    let c = naive_checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    frame.extend(std::iter::repeat_n(0u8, s.pad));
    frame
}

/// Fixes the IPv4 header checksum after a test changed the header.
fn reseal_ip(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[24..26].fill(0);
    let c = naive_checksum(&[&frame[14..14 + ihl]]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 10, 0, 0, 1]);
    f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
    f
}

#[test]
fn valid_frames_pass_with_what_they_carry() {
    let syn = build(&Spec::tcp(TCP_SYN, b""));
    let seen = TcpSeen {
        src: Ipv4Addr::from(SRC),
        dst: Ipv4Addr::from(DST),
        src_port: 40000,
        dst_port: 7370,
        flags: TCP_SYN,
    };
    assert_eq!(check(&syn), Ok(Passed::Tcp(seen)));
    assert!(seen.is_connect());
    assert!(!TcpSeen {
        flags: TCP_SYN | TCP_ACK,
        ..seen
    }
    .is_connect());
    assert!(!TcpSeen {
        flags: TCP_SYN | TCP_RST,
        ..seen
    }
    .is_connect());
    // Data, odd length, options in both headers, Ethernet padding.
    let mut s = Spec::tcp(TCP_ACK, b"hello, odd");
    s.ip_opts = 2;
    s.tcp_opts = 3;
    s.pad = 7;
    assert!(matches!(check(&build(&s)), Ok(Passed::Tcp(_))));
    assert_eq!(
        check(&build(&Spec::udp(b"dgram"))),
        Ok(Passed::Udp {
            src: Ipv4Addr::from(SRC),
            dst: Ipv4Addr::from(DST),
            src_port: 40000,
            dst_port: 7370
        })
    );
    let mut none = Spec::udp(b"no checksum");
    none.udp_no_checksum = true;
    assert!(matches!(check(&build(&none)), Ok(Passed::Udp { .. })));
    let icmp = Spec {
        protocol: 1,
        ..Spec::tcp(0, &[8, 0, 0, 0])
    };
    assert_eq!(check(&build(&icmp)), Ok(Passed::OtherIp { protocol: 1 }));
    assert_eq!(check(&arp()), Ok(Passed::Arp));
    // A minimal TCP segment in a 60-byte frame (the Ethernet minimum, padded).
    let mut min = Spec::tcp(TCP_ACK, b"");
    min.pad = 6;
    assert_eq!(build(&min).len(), 60);
    assert!(check(&build(&min)).is_ok());
}

#[test]
fn truncated_at_every_layer() {
    for n in 0..14 {
        assert_eq!(check(&vec![0u8; n]), Err(RxDrop::Truncated), "{n} bytes");
    }
    let a = arp();
    assert_eq!(check(&a[..a.len() - 1]), Err(RxDrop::Truncated));
    let f = build(&Spec::tcp(TCP_ACK, b"payload"));
    // Every cut inside the IP packet: too short for the IPv4 header or its total length.
    for cut in 14..f.len() {
        assert_eq!(check(&f[..cut]), Err(RxDrop::Truncated), "cut at {cut}");
    }
    // The IP packet whole but too short for a TCP header (total length says so).
    let mut f = build(&Spec::tcp(TCP_ACK, b""));
    f.truncate(14 + 20 + 19);
    f[16..18].copy_from_slice(&(20u16 + 19).to_be_bytes());
    reseal_ip(&mut f);
    assert_eq!(check(&f), Err(RxDrop::Truncated));
    // A TCP data offset past the segment.
    let mut f = build(&Spec::tcp(TCP_ACK, b""));
    f[14 + 20 + 12] = 6 << 4;
    assert_eq!(check(&f), Err(RxDrop::Truncated));
    // A UDP length field past the IP payload, and a UDP header cut short.
    let mut f = build(&Spec::udp(b"abc"));
    f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&12u16.to_be_bytes());
    assert_eq!(check(&f), Err(RxDrop::Truncated));
    let mut f = build(&Spec::udp(b""));
    f.truncate(14 + 20 + 7);
    f[16..18].copy_from_slice(&27u16.to_be_bytes());
    reseal_ip(&mut f);
    assert_eq!(check(&f), Err(RxDrop::Truncated));
}

#[test]
fn unknown_ethertypes() {
    for ethertype in [0x86ddu16, 0x8100, 0x88cc, 0x0000, 0xffff] {
        let mut f = build(&Spec::tcp(TCP_ACK, b""));
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        assert_eq!(check(&f), Err(RxDrop::UnknownEthertype), "{ethertype:#x}");
    }
    // Just the Ethernet header of an unknown type.
    assert_eq!(
        check(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x86, 0xdd]),
        Err(RxDrop::UnknownEthertype)
    );
}

#[test]
fn malformed_ipv4_headers() {
    let f = build(&Spec::tcp(TCP_ACK, b""));
    let mut v6 = f.clone();
    v6[14] = 0x65;
    reseal_ip(&mut v6);
    assert_eq!(check(&v6), Err(RxDrop::BadIpHeader));
    for ihl in 0..5u8 {
        let mut g = f.clone();
        g[14] = 0x40 | ihl;
        assert_eq!(check(&g), Err(RxDrop::BadIpHeader), "IHL {ihl}");
    }
    // Total length below the header (19), and exactly the header (20: no payload; a
    // TCP segment of zero bytes is truncated).
    let mut g = f.clone();
    g[16..18].copy_from_slice(&19u16.to_be_bytes());
    reseal_ip(&mut g);
    assert_eq!(check(&g), Err(RxDrop::BadIpHeader));
    g[16..18].copy_from_slice(&20u16.to_be_bytes());
    reseal_ip(&mut g);
    assert_eq!(check(&g), Err(RxDrop::Truncated));
    // IHL past the total length (a malformed header), and a total length past the frame.
    let mut g = f.clone();
    g[14] = 0x4f;
    assert_eq!(check(&g), Err(RxDrop::BadIpHeader));
    let mut g = f.clone();
    g[16..18].copy_from_slice(&1500u16.to_be_bytes());
    reseal_ip(&mut g);
    assert_eq!(check(&g), Err(RxDrop::Truncated));
}

#[test]
fn wrong_ip_header_checksums() {
    let f = build(&Spec::tcp(TCP_ACK, b"x"));
    for bit in 0..16 {
        let mut g = f.clone();
        let c = u16::from_be_bytes([g[24], g[25]]) ^ (1 << bit);
        g[24..26].copy_from_slice(&c.to_be_bytes());
        assert_eq!(check(&g), Err(RxDrop::BadIpChecksum), "bit {bit}");
    }
    // A changed TTL without a new checksum.
    let mut g = f.clone();
    g[22] = 1;
    assert_eq!(check(&g), Err(RxDrop::BadIpChecksum));
}

#[test]
fn fragments_first_and_later() {
    for (flags_offset, what) in [
        (0x2000u16, "first fragment (MF)"),
        (0x0001, "last fragment (offset 8)"),
        (0x2010, "middle fragment"),
        (0x1fff, "largest offset"),
    ] {
        let mut f = build(&Spec::udp(b"part"));
        f[20..22].copy_from_slice(&flags_offset.to_be_bytes());
        reseal_ip(&mut f);
        assert_eq!(check(&f), Err(RxDrop::IpFragment), "{what}");
    }
    // DF alone, and no flags: whole datagrams.
    for flags_offset in [0x4000u16, 0] {
        let mut f = build(&Spec::udp(b"whole"));
        f[20..22].copy_from_slice(&flags_offset.to_be_bytes());
        reseal_ip(&mut f);
        assert!(check(&f).is_ok());
    }
}

#[test]
fn bad_transport_headers_and_checksums() {
    for offset in 0..5u8 {
        let mut f = build(&Spec::tcp(TCP_ACK, b"0123456789012345678901"));
        f[14 + 20 + 12] = offset << 4;
        assert_eq!(
            check(&f),
            Err(RxDrop::BadTransportHeader),
            "offset {offset}"
        );
    }
    for len in 0..8u16 {
        let mut f = build(&Spec::udp(b"abc"));
        f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            check(&f),
            Err(RxDrop::BadTransportHeader),
            "UDP length {len}"
        );
    }
    // Any changed byte of a TCP segment or UDP datagram (header, payload, or the
    // addresses of the pseudo-header) fails the checksum.
    let tcp = build(&Spec::tcp(TCP_ACK, b"some data"));
    for at in 14 + 20..tcp.len() {
        if at == 14 + 20 + 12 {
            continue; // the data offset: a header error first
        }
        let mut g = tcp.clone();
        g[at] ^= 0x01;
        assert_eq!(check(&g), Err(RxDrop::BadChecksum), "TCP byte {at}");
    }
    let mut g = tcp.clone();
    g[14 + 12] ^= 1; // the source address
    reseal_ip(&mut g);
    assert_eq!(check(&g), Err(RxDrop::BadChecksum));
    let udp = build(&Spec::udp(b"datagram"));
    for at in 14 + 20 + 6..udp.len() {
        let mut g = udp.clone();
        g[at] ^= 0x01;
        assert_eq!(check(&g), Err(RxDrop::BadChecksum), "UDP byte {at}");
    }
}

#[test]
fn reasons_are_distinct_and_named() {
    for (i, r) in RxDrop::ALL.iter().enumerate() {
        assert_eq!(*r as usize, i, "ALL is in discriminant order");
        assert!(r.name().chars().all(|c| c.is_ascii_lowercase() || c == '_'));
    }
    let mut names: Vec<_> = RxDrop::ALL.iter().map(|r| r.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), RxDrop::ALL.len());
}

/// What smoltcp's own parsers (checksums verified) say of a frame, at the layers the
/// check covers: accepted or not.
fn smoltcp_accepts(frame: &[u8]) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    match eth.ethertype() {
        // The check only bounds an ARP packet's length (an Ethernet/IPv4 one is 28
        // bytes); whether its types and lengths are the ones smoltcp answers is left to
        // smoltcp's `ArpRepr::parse` (see `arp_smoltcp_parses_passes`).
        EthernetProtocol::Arp => eth.payload().len() >= 28,
        EthernetProtocol::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                return false;
            };
            if ip.version() != 4 || !ip.verify_checksum() || ip.more_frags() {
                return false;
            }
            if ip.frag_offset() != 0 {
                return false;
            }
            let (src, dst) = (
                IpAddress::Ipv4(ip.src_addr()),
                IpAddress::Ipv4(ip.dst_addr()),
            );
            match u8::from(ip.next_header()) {
                6 => TcpPacket::new_checked(ip.payload())
                    .is_ok_and(|t| t.verify_checksum(&src, &dst)),
                17 => UdpPacket::new_checked(ip.payload())
                    .is_ok_and(|u| u.verify_checksum(&src, &dst)),
                _ => true,
            }
        }
        _ => false,
    }
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop_oneof![Just(6u8), Just(17u8), Just(1u8)],
        any::<[u8; 4]>(),
        any::<[u8; 4]>(),
        any::<u16>(),
        any::<u16>(),
        any::<u8>(),
        0usize..=10,
        0usize..=10,
        proptest::collection::vec(any::<u8>(), 0..300),
        0usize..=20,
        any::<bool>(),
    )
        .prop_map(
            |(
                protocol,
                src,
                dst,
                src_port,
                dst_port,
                flags,
                ip_opts,
                tcp_opts,
                payload,
                pad,
                z,
            )| {
                Spec {
                    protocol,
                    src,
                    dst,
                    src_port,
                    dst_port,
                    flags,
                    ip_opts,
                    tcp_opts,
                    payload,
                    pad,
                    udp_no_checksum: z,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Valid frames pass, with the addresses, ports and flags smoltcp reads from them.
    #[test]
    fn valid_frames_pass_and_agree_with_smoltcp(s in spec()) {
        let f = build(&s);
        let got = check(&f);
        prop_assert!(smoltcp_accepts(&f));
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        match s.protocol {
            6 => {
                let t = TcpPacket::new_checked(ip.payload()).unwrap();
                prop_assert_eq!(got, Ok(Passed::Tcp(TcpSeen {
                    src, dst,
                    src_port: t.src_port(),
                    dst_port: t.dst_port(),
                    flags: s.flags,
                })));
                prop_assert_eq!(t.syn(), s.flags & TCP_SYN != 0);
                prop_assert_eq!(t.ack(), s.flags & TCP_ACK != 0);
            }
            17 => {
                let u = UdpPacket::new_checked(ip.payload()).unwrap();
                prop_assert_eq!(got, Ok(Passed::Udp {
                    src, dst, src_port: u.src_port(), dst_port: u.dst_port(),
                }));
            }
            p => prop_assert_eq!(got, Ok(Passed::OtherIp { protocol: p })),
        }
    }

    /// Valid frames with bytes changed or cut: the check never panics, and passes a
    /// frame exactly when smoltcp's parsers (checksums verified) accept it.
    #[test]
    fn damaged_frames_agree_with_smoltcp(
        s in spec(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let mut f = build(&s);
        for (at, x) in flips {
            let at = at % f.len();
            f[at] ^= x;
        }
        if let Some(cut) = cut {
            f.truncate(cut % (f.len() + 1));
        }
        let ours = check(&f);
        prop_assert_eq!(ours.is_ok(), smoltcp_accepts(&f), "{:?}", ours);
    }

    /// Arbitrary bytes, biased towards IPv4 and ARP: never a panic, and the same verdict.
    #[test]
    fn arbitrary_bytes_never_panic(
        ethertype in prop_oneof![Just(0x0800u16), Just(0x0806u16), any::<u16>()],
        body in proptest::collection::vec(any::<u8>(), 0..120),
    ) {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(&body);
        let ours = check(&f);
        prop_assert_eq!(ours.is_ok(), smoltcp_accepts(&f), "{:?}", ours);
        prop_assert!(check(&body).is_ok() || check(&body).is_err());
    }

    /// An ARP packet smoltcp parses fully also passes.
    #[test]
    fn arp_smoltcp_parses_passes(body in proptest::collection::vec(any::<u8>(), 28..40)) {
        let mut f = arp();
        f.truncate(14);
        f.extend_from_slice(&body);
        f[14..20].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
        if ArpRepr::parse(&ArpPacket::new_unchecked(&f[14..])).is_ok() {
            prop_assert_eq!(check(&f), Ok(Passed::Arp));
        }
    }

    /// The word-at-a-time sum equals the naive one.
    #[test]
    fn sums_agree(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        prop_assert_eq!(!fold(sum16(0, &data)), naive_checksum(&[&data]));
    }
}
