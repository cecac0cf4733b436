//! smoltcp over DPDK mbufs ([`MbufDevice`]) against the kernel's own TCP/IP stack,
//! through a `net_tap` vdev: the kernel side of the tap gets an address, a kernel
//! thread connects to a smoltcp listener with `std::net`, sends 1 MiB of seeded bytes
//! that smoltcp echoes back (and hashes on the way), and does a UDP round trip.
//!
//! Needs root (the tap device and `ip`/`sysctl` on it); without it the test says so
//! and passes without running. CI runs as root. EAL is once per process, so this file
//! is its own test binary with one test.

#![cfg(feature = "dpdk")]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant as StdInstant};

use dpdk::{Eal, MbufDevice, Mempool, PortConfig, QueueId};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, IpEndpoint};

const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
/// Bytes the kernel client sends over TCP (and gets back).
const TCP_BYTES: usize = 1 << 20;
/// The whole exchange must finish within this (it takes well under a second here).
const DEADLINE: Duration = Duration::from_secs(20);
/// Every blocking socket call of the client gives up after this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

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

/// `n` bytes from a xorshift generator seeded with `seed`.
fn seeded(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// 64-bit FNV-1a, fed in pieces.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the kernel client saw.
#[derive(Debug)]
struct ClientReport {
    udp_echo_ok: bool,
    tcp_echoed: Vec<u8>,
}

/// The kernel side: waits for the address to talk to, then a UDP round trip and the
/// TCP echo of `data`. Every call is bounded by `IO_TIMEOUT`.
fn client(go: mpsc::Receiver<Ipv4Addr>, data: Vec<u8>) -> std::io::Result<ClientReport> {
    let peer = go
        .recv_timeout(Duration::from_secs(60))
        .map_err(|e| std::io::Error::other(format!("never told to start: {e}")))?;

    let udp = UdpSocket::bind("0.0.0.0:0")?;
    udp.set_read_timeout(Some(Duration::from_millis(500)))?;
    let datagram = seeded(7, 1200);
    let mut udp_echo_ok = false;
    // The first datagram may wait on ARP; resend after each read timeout. net_tap
    // raises SIGIO when the kernel writes to the tap, which interrupts blocking calls
    // of any thread of the process: read again then (std's read_to_end and write_all
    // retry by themselves).
    let mut buf = [0u8; 2048];
    'attempts: for _ in 0..20 {
        udp.send_to(&datagram, (peer, UDP_PORT))?;
        for _ in 0..100 {
            match udp.recv_from(&mut buf) {
                Ok((n, from)) => {
                    udp_echo_ok =
                        buf[..n] == datagram[..] && from == SocketAddr::from((peer, UDP_PORT));
                    break 'attempts;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    continue 'attempts
                }
                Err(e) => return Err(e),
            }
        }
    }

    let stream = TcpStream::connect_timeout(&SocketAddr::from((peer, TCP_PORT)), IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // Write and read at once, or the echo fills both windows and stalls.
    let mut writer = stream.try_clone()?;
    let sender = thread::spawn(move || -> std::io::Result<()> {
        for chunk in data.chunks(64 * 1024) {
            writer.write_all(chunk)?;
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut tcp_echoed = Vec::with_capacity(TCP_BYTES);
    let mut reader = stream;
    let read = reader.read_to_end(&mut tcp_echoed);
    sender
        .join()
        .map_err(|_| std::io::Error::other("sender panicked"))??;
    read?;
    Ok(ClientReport {
        udp_echo_ok,
        tcp_echoed,
    })
}

#[test]
fn smoltcp_over_mbufs_talks_to_the_kernel_through_a_tap() {
    if !is_root() {
        eprintln!(
            "SKIPPED: tap_tcp needs root (a tap device, ip and sysctl on it); CI runs as root"
        );
        return;
    }
    // Unique per process, so concurrent runs (other worktrees, CI) do not collide: an
    // interface name of at most 15 bytes and a /24 of its own.
    let pid = std::process::id();
    let iface_name = format!("dosdphy{}", pid % 100_000);
    let net = (pid % 200 + 20) as u8;
    let kernel_ip = Ipv4Addr::new(10, 99, net, 1);
    let dpdk_ip = Ipv4Addr::new(10, 99, net, 2);

    let data = seeded(0x5eed_d05d, TCP_BYTES);
    let mut want = Fnv::new();
    want.update(&data);
    // Spawned before EAL pins this thread to lcore 0, so the client keeps every CPU.
    let (go_tx, go_rx) = mpsc::channel();
    let client_data = data.clone();
    let client = thread::spawn(move || client(go_rx, client_data));

    let vdev = format!("--vdev=net_tap0,iface={iface_name}");
    let eal = Eal::init([
        "-l",
        "0",
        "--no-huge",
        "-m",
        "512",
        "--no-pci",
        "--no-shconf",
        "--no-telemetry",
        "--log-level=warning",
        vdev.as_str(),
    ])
    .expect("EAL init");
    let pool = Mempool::new(&eal, "phy_pool", 4095, 32, Mempool::DEFAULT_DATA_ROOM).expect("pool");
    let port_id = eal.port_by_name("net_tap0").expect("net_tap0");
    let mut port = eal.port(port_id).expect("port");
    port.configure(&PortConfig::default(), &pool)
        .expect("configure");
    port.start().expect("start");
    // After start: the driver's receive ring holds its mbufs from here on.
    let free_at_start = pool.available();
    let mac = port.mac().expect("mac");

    // The kernel side: no IPv6 (no ND noise), an address, up.
    run(
        "sysctl",
        &["-qw", &format!("net.ipv6.conf.{iface_name}.disable_ipv6=1")],
    );
    run(
        "ip",
        &[
            "addr",
            "add",
            &format!("{kernel_ip}/24"),
            "dev",
            &iface_name,
        ],
    );
    run("ip", &["link", "set", &iface_name, "up"]);
    let offload = Command::new("ethtool")
        .args(["-k", &iface_name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let tx_csum = offload
        .lines()
        .find(|l| l.starts_with("tx-checksumming:"))
        .unwrap_or("tx-checksumming: (ethtool missing)")
        .to_owned();
    // The kernel completes every checksum before a frame reaches the tap (DPDK's
    // net_tap never enables the tun device's checksum offload), which is why the
    // device verifies all received checksums; a partial one would be dropped.
    assert!(
        !tx_csum.contains(": on"),
        "the kernel would hand the tap partial checksums ({tx_csum}); smoltcp would drop them"
    );

    let rx = port.rx_queue(QueueId(0)).expect("rx queue");
    let tx = port.tx_queue(QueueId(0)).expect("tx queue");
    let mut device = MbufDevice::new(rx, tx, &pool);
    let config = Config::new(EthernetAddress(mac.0).into());
    let mut iface = Interface::new(config, &mut device, Instant::now());
    iface.update_ip_addrs(|addrs| {
        addrs
            .push(IpCidr::new(IpAddress::Ipv4(dpdk_ip), 24))
            .expect("one address");
    });

    let mut sockets = SocketSet::new(Vec::new());
    let tcp_socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
    );
    let tcp_handle = sockets.add(tcp_socket);
    sockets
        .get_mut::<tcp::Socket>(tcp_handle)
        .listen(TCP_PORT)
        .expect("listen");
    let udp_socket = udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 16 * 2048]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 16 * 2048]),
    );
    let udp_handle = sockets.add(udp_socket);
    sockets
        .get_mut::<udp::Socket>(udp_handle)
        .bind(IpEndpoint::new(IpAddress::Ipv4(dpdk_ip), UDP_PORT))
        .expect("bind");

    go_tx.send(dpdk_ip).expect("client waiting");

    // The poll loop, bounded in time and turns.
    let start = StdInstant::now();
    let mut got = Fnv::new();
    let mut tcp_received = 0usize;
    let mut udp_echoed = 0usize;
    let mut connected = false;
    let mut buf = vec![0u8; 64 * 1024];
    let mut turns = 0u64;
    while !client.is_finished() {
        turns += 1;
        assert!(
            start.elapsed() < DEADLINE && turns < 200_000_000,
            "no finish in {DEADLINE:?} ({turns} turns): {tcp_received} TCP bytes in, \
             {udp_echoed} datagrams echoed, {:?}",
            device.stats()
        );
        let busy = iface.poll(Instant::now(), &mut device, &mut sockets);

        let udp = sockets.get_mut::<udp::Socket>(udp_handle);
        while let Ok((n, meta)) = udp.recv_slice(&mut buf) {
            udp.send_slice(&buf[..n], meta.endpoint).expect("udp echo");
            udp_echoed += 1;
        }

        let tcp = sockets.get_mut::<tcp::Socket>(tcp_handle);
        connected |= tcp.is_active();
        while tcp.can_recv() && tcp.can_send() {
            let room = (tcp.send_capacity() - tcp.send_queue()).min(buf.len());
            let n = tcp.recv_slice(&mut buf[..room]).expect("tcp recv");
            if n == 0 {
                break;
            }
            got.update(&buf[..n]);
            tcp_received += n;
            let sent = tcp.send_slice(&buf[..n]).expect("tcp send");
            assert_eq!(sent, n, "the send buffer had the room");
        }
        if connected
            && !tcp.may_recv()
            && tcp.send_queue() == 0
            && tcp.state() == tcp::State::CloseWait
        {
            tcp.close();
        }
        // Send what this turn produced now, and once more after the sockets queued
        // their replies.
        iface.poll(Instant::now(), &mut device, &mut sockets);
        device.flush();
        if busy == smoltcp::iface::PollResult::None && device.tx_pending() == 0 {
            thread::yield_now();
        }
    }
    let report = client
        .join()
        .expect("client thread")
        .unwrap_or_else(|e| {
            panic!(
                "client I/O: {e}; smoltcp echoed {udp_echoed} datagrams, took {tcp_received} TCP bytes \
                 (tcp {}), device {:?}, port {:?}",
                sockets.get::<tcp::Socket>(tcp_handle).state(),
                device.stats(),
                port.stats()
            )
        });
    // Let the last ACKs and FINs out.
    for _ in 0..1000 {
        iface.poll(Instant::now(), &mut device, &mut sockets);
        device.flush();
    }
    let stats = device.stats();
    let elapsed = start.elapsed();

    assert!(report.udp_echo_ok, "UDP datagram came back intact");
    assert!(udp_echoed >= 1, "smoltcp echoed the datagram");
    assert_eq!(tcp_received, TCP_BYTES, "smoltcp received every byte");
    assert_eq!(got.0, want.0, "smoltcp received the bytes sent, in order");
    assert_eq!(
        report.tcp_echoed.len(),
        TCP_BYTES,
        "the kernel got every byte back"
    );
    assert!(
        report.tcp_echoed == data,
        "the kernel got the same bytes back"
    );
    assert_eq!(stats.rx_dropped, 0);
    assert_eq!(stats.tx_no_mbuf, 0);
    assert_eq!(stats.tx_dropped, 0);

    drop(device);
    let port_stats = port.stats().expect("stats");
    // Every mbuf came back: received ones freed after smoltcp read them, sent ones
    // freed by the driver (allow for the per-lcore cache, up to 1.5 times its size).
    let free_at_end = pool.available();
    assert!(
        free_at_end + 48 >= free_at_start,
        "mbufs leaked: {free_at_start} free at start, {free_at_end} at end"
    );
    eprintln!(
        "tap_tcp: {iface_name} ({tx_csum}), mac {mac}: UDP echo ok, {TCP_BYTES} TCP bytes echoed \
         and hashed (FNV {:016x}) in {elapsed:.2?}, {turns} turns; device {stats:?}; port {port_stats:?}",
        got.0
    );
}
