//! `dosd --net dpdk` under bad input: raw frames written at the kernel's end of the
//! `net_tap` vdev (an AF_PACKET socket, through a small python3 script) while a DOSP
//! connection is open. Truncated frames, unknown ethertypes, malformed IPv4 headers,
//! bad IPv4 and TCP/UDP checksums, IP fragments, TCP segments far outside the open
//! connection's window, then a SYN flood from a spoofed address beyond the listener
//! bound. Afterwards: dosd is alive, `dosd_net_rx_dropped_total{reason}` went up by
//! exactly the frames of each reason, the open connection still retrieves its object,
//! and a new connection works once the flood's half-open handshakes have timed out.
//!
//! Needs root (the tap device, `ip`, `sysctl`, a packet socket); without it the test
//! says so and passes without running. Only built with the `dpdk` feature.

#![cfg(feature = "dpdk")]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dataplane::server::dpdk_port::LISTENERS;
use dataplane::server::frame_check::{check, RxDrop, TCP_ACK, TCP_SYN};
use dosp::client::Client;
use dosp::Fingerprint;
use rand::{Rng, RngCore, SeedableRng};

/// How long dosd may take to print its line (EAL start-up, disks).
const READY_WAIT: Duration = Duration::from_secs(60);
/// The client's connect and read timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the counters may take to show every injected frame.
const SETTLE: Duration = Duration::from_secs(20);
const DOSP_PORT: u16 = 7371;
/// SYNs of the flood, from as many source ports of a spoofed address.
const FLOOD: usize = 40;

/// Writes each hex line of stdin as one frame on the interface named by argv[1].
const INJECT_PY: &str = "\
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
n = 0
for line in sys.stdin:
    line = line.strip()
    if line:
        s.send(bytes.fromhex(line))
        n += 1
print(n)
";

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn output(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kills the node when dropped, so a failing check never leaves it running.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One GET on the management address; the body.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to mgmt");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("GET {path}: {e}"),
        }
    }
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    body.to_string()
}

/// `dosd_net_rx_dropped_total` by reason, from /metrics.
fn drops(mgmt: SocketAddr) -> BTreeMap<String, u64> {
    let text = http_get(mgmt, "/metrics");
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("dosd_net_rx_dropped_total{reason=\"") {
            let (reason, n) = rest.split_once("\"} ").expect("a sample");
            out.insert(reason.to_string(), n.parse().expect("a count"));
        }
    }
    assert_eq!(out.len(), RxDrop::ALL.len(), "every reason in /metrics");
    out
}

fn seeded(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

fn mac(text: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    let parts: Vec<&str> = text.trim().split(':').collect();
    assert_eq!(parts.len(), 6, "a MAC address: {text:?}");
    for (b, p) in m.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).expect("hex");
    }
    m
}

fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let bytes: Vec<u8> = parts.concat();
    for pair in bytes.chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        sum += hi | pair.get(1).map_or(0, |&lo| u32::from(lo));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Frames from the kernel's side to the node.
struct Frames {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
}

/// One TCP or UDP packet's fields.
struct L4 {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: Vec<u8>,
}

impl Frames {
    fn ethernet(&self, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = self.dst_mac.to_vec();
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A well-formed Ethernet/IPv4/TCP-or-UDP frame; `frag` is the IPv4 flags and
    /// offset field.
    fn ip(&self, p: &L4, frag: u16) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&p.src_port.to_be_bytes());
        l4.extend_from_slice(&p.dst_port.to_be_bytes());
        if p.protocol == 6 {
            l4.extend_from_slice(&p.seq.to_be_bytes());
            l4.extend_from_slice(&p.ack.to_be_bytes());
            l4.extend_from_slice(&[5 << 4, p.flags, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            l4.extend_from_slice(&((8 + p.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(&p.payload);
        let pseudo = [
            &p.src.octets()[..],
            &p.dst.octets()[..],
            &[0, p.protocol],
            &(l4.len() as u16).to_be_bytes()[..],
        ]
        .concat();
        let c = checksum(&[&pseudo, &l4]).to_be_bytes();
        let at = if p.protocol == 6 { 16 } else { 6 };
        l4[at..at + 2].copy_from_slice(&c);
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 1]);
        ip.extend_from_slice(&frag.to_be_bytes());
        ip.extend_from_slice(&[64, p.protocol, 0, 0]);
        ip.extend_from_slice(&p.src.octets());
        ip.extend_from_slice(&p.dst.octets());
        let c = checksum(&[&ip]).to_be_bytes();
        ip[10..12].copy_from_slice(&c);
        ip.extend_from_slice(&l4);
        self.ethernet(0x0800, &ip)
    }
}

fn inject(iface: &str, frames: &[Vec<u8>]) {
    let mut child = Command::new("python3")
        .args(["-c", INJECT_PY, iface])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 for the packet socket");
    {
        let mut stdin = child.stdin.take().unwrap();
        for f in frames {
            let line: String = f.iter().map(|b| format!("{b:02x}")).collect();
            writeln!(stdin, "{line}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "inject: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        frames.len().to_string(),
        "every frame written"
    );
}

/// The kernel's local port of its one established connection to `node`.
fn local_port_to(node: &str) -> u16 {
    let text = output("ss", &["-Htn", "state", "established"]);
    let peer = format!("{node}:{DOSP_PORT}");
    let ports: Vec<u16> = text
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == peer))
        .filter_map(|l| {
            let local = l
                .split_whitespace()
                .find(|w| w.contains(':') && *w != peer)?;
            local.rsplit_once(':')?.1.parse().ok()
        })
        .collect();
    assert_eq!(ports.len(), 1, "one connection to {peer}: {text}");
    ports[0]
}

#[test]
fn dosd_drops_and_counts_bad_frames_on_a_dpdk_port() {
    if !is_root() {
        println!(
            "SKIPPED: dosd --net dpdk on net_tap needs root (a tap device, ip, sysctl, AF_PACKET)"
        );
        return;
    }
    let pid = std::process::id();
    let x = 10 + pid % 240;
    let iface = format!("dnb{}", pid % 100_000);
    let node_ip = format!("10.98.{x}.2");
    let kernel_ip = format!("10.98.{x}.1");
    // In the subnet, owned by no one: the node's SYN-ACKs to it are never answered.
    let spoofed = Ipv4Addr::new(10, 98, x as u8, 77);
    let listen = format!("{node_ip}:{DOSP_PORT}");
    let dir = tempfile::tempdir().unwrap();
    let stderr_log = dir.path().join("dosd.stderr.log");
    let group = common::unique_group();
    let eal = format!(
        "-l 0 --no-huge -m 512 --no-pci --no-shconf --no-telemetry --vdev=net_tap0,iface={iface}"
    );
    let child = Command::new(common::dosd_bin())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--disks", "1", "--disk-size", "64M"])
        .args(["--connections-max", "4"])
        .args(["--net", "dpdk", "--dpdk-args", &eal])
        .args(["--dpdk-ip", &format!("{node_ip}/24")])
        .args(["--listen", &listen, "--mgmt-listen", "127.0.0.1:0"])
        .args(["--multicast", &group])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_log).unwrap())
        .env("DOSD_LOG", "info")
        .spawn()
        .expect("spawn dosd");
    let mut node = Killed(child);
    let log = || std::fs::read_to_string(&stderr_log).unwrap_or_default();
    let stdout = node.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        let mut sink = String::new();
        while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    let line = rx
        .recv_timeout(READY_WAIT)
        .unwrap_or_else(|_| panic!("dosd printed no line in {READY_WAIT:?}:\n{}", log()));
    assert!(
        !line.is_empty(),
        "dosd exited before it was ready:\n{}",
        log()
    );
    let mgmt: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mgmt="))
        .unwrap_or_else(|| panic!("no mgmt= in {line:?}"))
        .parse()
        .unwrap();

    output(
        "sysctl",
        &["-qw", &format!("net.ipv6.conf.{iface}.disable_ipv6=1")],
    );
    output(
        "ip",
        &["addr", "add", &format!("{kernel_ip}/24"), "dev", &iface],
    );
    output("ip", &["link", "set", &iface, "up"]);

    // The connection that must survive, with an object stored.
    let object = seeded(7, 200_000);
    let mut c = Client::connect(&listen, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {listen}: {e}\n{}", log()));
    let fp = c.store_bytes(&object).expect("STORE").fingerprint;
    assert_eq!(fp, Fingerprint::of(&object));
    let client_port = local_port_to(&node_ip);

    let neigh = output("ip", &["neigh", "show", &node_ip, "dev", &iface]);
    let node_mac = neigh
        .split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .unwrap_or_else(|| panic!("no lladdr for {node_ip}: {neigh:?}"));
    let f = Frames {
        src_mac: mac(&std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).unwrap()),
        dst_mac: mac(node_mac),
    };
    let (kernel, node_addr): (Ipv4Addr, Ipv4Addr) =
        (kernel_ip.parse().unwrap(), node_ip.parse().unwrap());
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(pid));
    let on_conn = |flags: u8, seq: u32, ack: u32, payload: &[u8]| L4 {
        src: kernel,
        dst: node_addr,
        protocol: 6,
        src_port: client_port,
        dst_port: DOSP_PORT,
        seq,
        ack,
        flags,
        payload: payload.to_vec(),
    };
    let udp = |payload: &[u8]| L4 {
        src: kernel,
        dst: node_addr,
        protocol: 17,
        src_port: 40000,
        dst_port: DOSP_PORT,
        seq: 0,
        ack: 0,
        flags: 0,
        payload: payload.to_vec(),
    };

    // Each bad frame with the reason it must be counted under.
    let mut bad: Vec<(RxDrop, Vec<u8>)> = Vec::new();
    let good = f.ip(&on_conn(TCP_ACK, rng.gen(), rng.gen(), b"0123456789"), 0);
    // Truncated: an Ethernet header and half an IPv4 header; an ARP cut short; an IPv4
    // packet whose total length runs past the frame; a TCP header cut short.
    bad.push((RxDrop::Truncated, good[..24].to_vec()));
    bad.push((
        RxDrop::Truncated,
        f.ethernet(0x0806, &[0, 1, 8, 0, 6, 4, 0, 1]),
    ));
    bad.push((RxDrop::Truncated, good[..good.len() - 4].to_vec()));
    {
        let mut g = good.clone();
        g[14 + 20 + 12] = 15 << 4; // a 60-byte TCP header in a 30-byte segment
        bad.push((RxDrop::Truncated, g));
    }
    // Unknown ethertypes: IPv6 and LLDP.
    bad.push((RxDrop::UnknownEthertype, f.ethernet(0x86dd, &[0x60; 40])));
    bad.push((RxDrop::UnknownEthertype, f.ethernet(0x88cc, &[0; 46])));
    // Malformed IPv4 headers: version 6, IHL 3 (checksums made right for them).
    for first in [0x65u8, 0x43] {
        let mut g = good.clone();
        g[14] = first;
        g[24..26].fill(0);
        let c = checksum(&[&g[14..34]]).to_be_bytes();
        g[24..26].copy_from_slice(&c);
        bad.push((RxDrop::BadIpHeader, g));
    }
    // Bad IPv4 header checksums.
    for bit in [0u8, 3, 7] {
        let mut g = good.clone();
        g[24] ^= 1 << bit;
        bad.push((RxDrop::BadIpChecksum, g));
    }
    // Bad TCP checksums on the open connection's 4-tuple, and a bad UDP checksum.
    for _ in 0..3 {
        let mut g = good.clone();
        let last = g.len() - 1;
        g[last] ^= 0x5a;
        bad.push((RxDrop::BadChecksum, g));
    }
    {
        let mut g = f.ip(&udp(b"not a request"), 0);
        let last = g.len() - 1;
        g[last] ^= 0x01;
        bad.push((RxDrop::BadChecksum, g));
    }
    // A TCP data offset below 5 words, and a UDP length field below 8.
    {
        let mut g = good.clone();
        g[14 + 20 + 12] = 4 << 4;
        bad.push((RxDrop::BadTransportHeader, g));
        let mut g = f.ip(&udp(b"short"), 0);
        g[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&7u16.to_be_bytes());
        bad.push((RxDrop::BadTransportHeader, g));
    }
    // IP fragments: a first one (MF) and a later one (offset 185 × 8).
    bad.push((RxDrop::IpFragment, f.ip(&udp(&[1; 64]), 0x2000)));
    bad.push((RxDrop::IpFragment, f.ip(&udp(&[2; 64]), 185)));
    for (reason, frame) in &bad {
        assert_eq!(check(frame).err(), Some(*reason), "the test's own frame");
    }
    // Outside the open connection's window (random sequence and acknowledgement
    // numbers: almost surely far outside), correct checksums. Passed to smoltcp, which
    // drops them (not counted: see rx_guard.rs). Without payload, so that the unlikely
    // one that lands inside the window cannot put bytes into the DOSP stream.
    let mut outside = Vec::new();
    for _ in 0..5 {
        let frame = f.ip(&on_conn(TCP_ACK, rng.gen(), rng.gen(), b""), 0);
        assert!(check(&frame).is_ok());
        outside.push(frame);
    }
    // The flood: SYNs from a spoofed address, each from its own port. LISTENERS of them
    // take the listening sockets into handshakes that never complete; the rest find no
    // listener.
    let mut flood = Vec::new();
    for k in 0..FLOOD {
        let syn = L4 {
            src: spoofed,
            src_port: 20000 + k as u16,
            seq: rng.gen(),
            ack: 0,
            flags: TCP_SYN,
            ..on_conn(0, 0, 0, b"")
        };
        let frame = f.ip(&syn, 0x4000);
        assert!(check(&frame).is_ok());
        flood.push(frame);
    }

    let before = drops(mgmt);
    let mut all: Vec<Vec<u8>> = bad.iter().map(|(_, f)| f.clone()).collect();
    all.extend(outside);
    inject(&iface, &all);
    inject(&iface, &flood);

    let mut want = before.clone();
    for (reason, _) in &bad {
        *want.get_mut(reason.name()).unwrap() += 1;
    }
    *want.get_mut(RxDrop::SynRefused.name()).unwrap() += (FLOOD - LISTENERS) as u64;
    // Counters settle as the loop reads the tap: wait (bounded) until they match.
    let deadline = Instant::now() + SETTLE;
    let mut now_drops = drops(mgmt);
    while now_drops != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        now_drops = drops(mgmt);
    }
    assert_eq!(
        now_drops,
        want,
        "dropped frames by reason (before: {before:?})\n{}",
        log()
    );
    assert!(
        node.0.try_wait().unwrap().is_none(),
        "dosd died:\n{}",
        log()
    );

    // The open connection still works, byte-exact.
    let mut got = Vec::new();
    let len = c
        .retrieve(&fp, &mut got, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("RETRIEVE on the open connection: {e}\n{}", log()));
    assert_eq!(len, object.len() as u64);
    assert!(got == object, "RETRIEVE gave other bytes than stored");
    c.ping().expect("NULL on the open connection");

    // A new connection, once the flood's handshakes have been given up (the kernel's
    // SYN retries carry it over that; SYNs refused meanwhile are counted).
    let mut c2 = Client::connect(&listen, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("a new connection after the flood: {e}\n{}", log()));
    let second = seeded(8, 5000);
    let fp2 = c2
        .store_bytes(&second)
        .expect("STORE on a new connection")
        .fingerprint;
    let mut got = Vec::new();
    c2.retrieve(&fp2, &mut got, &mut |_, _| {})
        .expect("RETRIEVE");
    assert!(got == second);
    let mut got = Vec::new();
    c2.retrieve(&fp, &mut got, &mut |_, _| {})
        .expect("RETRIEVE");
    assert!(got == object);
    let after = drops(mgmt);
    println!(
        "dosd --net dpdk on {iface}: {} bad frames and {FLOOD} SYNs dropped and counted \
         ({after:?}); the open connection and a new one work",
        bad.len()
    );
    drop((c, c2));
    output("kill", &["-TERM", &node.0.id().to_string()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(status) = node.0.try_wait().unwrap() {
            assert!(status.success(), "dosd exited with {status}:\n{}", log());
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("dosd did not stop within 20 s of SIGTERM:\n{}", log());
}
