//! A frame as anyone on the wire may send it to a DPDK port: the check that runs before
//! smoltcp never panics, and a frame it passes really holds the headers it claims
//! (so smoltcp, told not to verify checksums again, reads only sound packets).
#![no_main]

use dataplane::server::frame_check::{check, fold, sum16, Passed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    let Ok(passed) = check(frame) else { return };
    match passed {
        Passed::Arp => assert!(frame.len() >= 14 + 28),
        Passed::Tcp(_) | Passed::Udp { .. } | Passed::OtherIp { .. } => {
            let ip = &frame[14..];
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            assert_eq!(ip[0] >> 4, 4);
            assert!(ihl >= 20 && ihl <= total && total <= ip.len());
            assert_eq!(fold(sum16(0, &ip[..ihl])), 0xffff, "header checksum");
            assert_eq!(u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff, 0, "a fragment");
            let l4 = &ip[ihl..total];
            match passed {
                Passed::Tcp(_) => assert!(l4.len() >= usize::from(l4[12] >> 4) * 4),
                Passed::Udp { .. } => {
                    let len = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
                    assert!((8..=l4.len()).contains(&len));
                }
                _ => {}
            }
        }
    }
});
