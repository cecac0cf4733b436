//! A whole dataplane loop (`Server::with_port`) over [`DpdkPort`]: smoltcp on DPDK mbufs
//! through a `net_tap` vdev, served to the kernel's TCP/IP stack on the tap's other
//! side. The ordinary DOSP client pings, stores (one object over 1 MiB), retrieves
//! whole and by range, deletes; a raw datagram asks LOCATE over UDP. The loop has a
//! cluster key (every request is signed) and serves signed URLs over HTTP on a second
//! port: a raw HTTP/1.1 client GETs an object whole, a range and HEAD over one kept-alive
//! connection, and a tampered URL on another is refused; the port hands out DOSP and
//! HTTP connections each from its own listeners.
//!
//! Needs root (the tap device, `ip` and `sysctl` on it); without it the test says so
//! and passes without running. CI runs it as root. EAL is once per process and
//! net_tap raises SIGIO in it, so this file is its own test binary with one test.

#![cfg(feature = "dpdk")]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use dataplane::node::{Addresses, NodeState};
use dataplane::server::auth::NodeAuth;
use dataplane::server::dpdk_port::{DpdkPort, DpdkPortOptions};
use dataplane::server::shards::{build_directories, Shards};
use dataplane::server::{Server, ServerConfig};
use dataplane::store::{Store, StoreConfig};
use dosp::auth::{srl_path, CertMode, KeyRing};
use dosp::client::{Client, ClientError};
use dosp::codec::encode_request;
use dosp::signed::Signer;
use dosp::wire::{Header, LocateIn, LocateOut, Opcode, Status};
use dosp::Fingerprint;
use dpdk::{Eal, MbufDevice, Mempool, PortConfig, QueueId};
use nvme::mem::MemDisk;
use rand::{RngCore, SeedableRng};
use zerocopy::{FromBytes, IntoBytes};

const MIB: u64 = 1 << 20;
const DOSP_PORT: u16 = 9111;
const HTTP_PORT: u16 = 9180;
/// The cluster's key (the loop, the DOSP client, the signed URLs).
const KEY: &str = "dpdk-port 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
/// The server loop runs at most this long, whatever happens.
const DEADLINE: Duration = Duration::from_secs(120);
/// The client's connect and read timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

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

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Sets the stop flag when dropped, so a failing client still ends the server.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What the server thread reports when its loop ended.
#[derive(Debug)]
struct ServerReport {
    turns: u64,
    phy: dpdk::PhyStats,
    sockets_in_use: usize,
    staged_bytes: u64,
    /// Connections the port handed out: DOSP, HTTP.
    accepted: (u64, u64),
}

/// The server's side, on its own thread (EAL pins it to lcore 0): EAL, the tap, the
/// kernel side's address, the port, and the loop until `stop` (or `DEADLINE`).
#[allow(clippy::too_many_arguments)]
fn serve(
    iface_name: String,
    (kernel_ip, node_ip): (Ipv4Addr, Ipv4Addr),
    shards: Shards,
    end: dataplane::handle::DataplaneEnd,
    cfg: ServerConfig,
    copies: dataplane::copies::Copies,
    up: mpsc::Sender<Result<(), String>>,
    stop: Arc<AtomicBool>,
) -> Result<ServerReport, String> {
    let fail = |up: &mpsc::Sender<Result<(), String>>, e: String| {
        let _ = up.send(Err(e.clone()));
        e
    };
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
    .map_err(|e| fail(&up, format!("EAL init: {e}")))?;
    let pool = Mempool::new(&eal, "dport_pool", 8191, 64, Mempool::DEFAULT_DATA_ROOM)
        .map_err(|e| fail(&up, format!("pool: {e}")))?;
    let port_id = eal
        .port_by_name("net_tap0")
        .map_err(|e| fail(&up, format!("net_tap0: {e}")))?;
    let mut port = eal
        .port(port_id)
        .map_err(|e| fail(&up, format!("port: {e}")))?;
    port.configure(&PortConfig::default(), &pool)
        .map_err(|e| fail(&up, format!("configure: {e}")))?;
    port.start().map_err(|e| fail(&up, format!("start: {e}")))?;
    let mac = port.mac().map_err(|e| fail(&up, format!("mac: {e}")))?;
    // The kernel side: no IPv6 (no ND noise), an address, up.
    let kernel = [
        (
            "sysctl",
            vec![
                "-qw".to_owned(),
                format!("net.ipv6.conf.{iface_name}.disable_ipv6=1"),
            ],
        ),
        (
            "ip",
            vec![
                "addr".to_owned(),
                "add".to_owned(),
                format!("{kernel_ip}/24"),
                "dev".to_owned(),
                iface_name.clone(),
            ],
        ),
        (
            "ip",
            vec![
                "link".to_owned(),
                "set".to_owned(),
                iface_name.clone(),
                "up".to_owned(),
            ],
        ),
    ];
    for (cmd, args) in &kernel {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(cmd, &args).map_err(|e| fail(&up, e))?;
    }
    let rx = port
        .rx_queue(QueueId(0))
        .map_err(|e| fail(&up, format!("rx queue: {e}")))?;
    let tx = port
        .tx_queue(QueueId(0))
        .map_err(|e| fail(&up, format!("tx queue: {e}")))?;
    let device = MbufDevice::new(rx, tx, &pool);
    let opts = DpdkPortOptions {
        addr: node_ip,
        prefix_len: 24,
        gateway: None,
        port: DOSP_PORT,
        http_port: Some(HTTP_PORT),
        connections_max: cfg.connections_max,
        udp_unicast: true,
        multicast: Some(cfg.multicast_group),
    };
    let mut dport =
        DpdkPort::new(device, mac, &opts).map_err(|e| fail(&up, format!("port: {e}")))?;
    dport.set_copies(copies);
    let mut server = Server::with_port(dport, cfg, shards, end)
        .map_err(|e| fail(&up, format!("server: {e}")))?;
    let _ = up.send(Ok(()));

    let start = Instant::now();
    let mut turns = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if start.elapsed() > DEADLINE {
            return Err(format!("the client did not finish in {DEADLINE:?}"));
        }
        server.turn().map_err(|e| format!("turn: {e}"))?;
        turns += 1;
    }
    // Let the last replies and FINs out: until every socket is back in the pool, for
    // at most 300 turns (an idle turn waits up to idle_sleep).
    for _ in 0..300 {
        if server.port().sockets_in_use() == 0 {
            break;
        }
        server.turn().map_err(|e| format!("turn: {e}"))?;
    }
    let report = ServerReport {
        turns,
        phy: server.port().phy_stats(),
        sockets_in_use: server.port().sockets_in_use(),
        staged_bytes: server.port().staged_bytes(),
        accepted: server.port().accepted(),
    };
    server.shut_down();
    Ok(report)
}

fn seeded(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// One LOCATE over UDP unicast, resent until answered (bounded); retried reads when a
/// signal (net_tap's SIGIO) interrupts them.
/// A LOCATE request is already a third of its answer's size (the UDP reply-size rule).
fn udp_locate(node: SocketAddr, fp: &Fingerprint, signer: &Signer) -> Result<(u16, u64), String> {
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| format!("timeout: {e}"))?;
    let mut buf = [0u8; 2048];
    for attempt in 0..20u64 {
        let id = 700 + attempt;
        let mut msg = Vec::new();
        encode_request(
            &mut msg,
            Opcode::Locate,
            id,
            0,
            LocateIn { fingerprint: *fp }.as_bytes(),
        );
        signer.sign(&mut msg, 0);
        sock.send_to(&msg, node).map_err(|e| format!("send: {e}"))?;
        for _ in 0..100 {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let Ok((h, body)) = Header::read_from_prefix(&buf[..n]) else {
                        continue;
                    };
                    if from != node || h.request_id.get() != id {
                        continue;
                    }
                    let Ok((out, _)) = LocateOut::read_from_prefix(body) else {
                        // An error answer is an OutHead alone.
                        let status = dosp::wire::OutHead::read_from_prefix(body)
                            .map(|(h, _)| h.status.get())
                            .map_err(|_| format!("short LOCATE answer ({n} bytes)"))?;
                        return Ok((status, 0));
                    };
                    return Ok((out.head.status.get(), out.object_len.get()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(format!("recv: {e}")),
            }
        }
    }
    Err("no LOCATE answer over UDP".into())
}

/// The kernel side's DOSP session; every check returns an error rather than panic, so
/// the server is stopped and its report shown.
fn client_session(
    node: SocketAddr,
    group: SocketAddrV4,
    kernel_ip: Ipv4Addr,
) -> Result<(String, Moved), String> {
    let objects = [
        seeded(1, 1000),
        seeded(2, 100_000),
        seeded(3, (MIB + MIB / 2 + 12_345) as usize),
        seeded(4, 3 * MIB as usize),
    ];
    let signer = Signer::new(KeyRing::parse(KEY).unwrap(), CertMode::HmacSha256);
    let mut c = Client::connect(&node.to_string(), IO_TIMEOUT).map_err(|e| e.to_string())?;
    c.set_signer(Some(signer.clone()));
    let pong = c.ping().map_err(|e| format!("NULL: {e}"))?;
    let mut fps = Vec::new();
    for data in &objects {
        let stored = c
            .store_bytes(data)
            .map_err(|e| format!("STORE of {} bytes: {e}", data.len()))?;
        if stored.fingerprint != Fingerprint::of(data) || stored.refcount != 1 {
            return Err(format!("STORE answered {stored:?}"));
        }
        fps.push(stored.fingerprint);
    }
    for (fp, data) in fps.iter().zip(&objects) {
        let mut got = Vec::new();
        let len = c
            .retrieve(fp, &mut got, &mut |_, _| {})
            .map_err(|e| format!("RETRIEVE of {} bytes: {e}", data.len()))?;
        if len != data.len() as u64 || got != *data {
            return Err(format!(
                "RETRIEVE gave {} bytes, not the {} stored",
                got.len(),
                data.len()
            ));
        }
    }
    let mut moved = Moved {
        stored: objects.iter().map(|o| o.len() as u64).sum(),
        sent: objects.iter().map(|o| o.len() as u64).sum(),
        replies: 1 + 2 * objects.len() as u64,
        http_heads: 0,
    };
    // Ranges of the large object: inside, across chunk boundaries, to its end.
    let big = &objects[2];
    for (offset, len) in [
        (0u64, 1u64),
        (12_345, 700_000),
        (MIB - 10, 20),
        (big.len() as u64 - 5000, 5000),
    ] {
        let mut part = Vec::new();
        c.retrieve_range(&fps[2], offset, len, &mut part)
            .map_err(|e| format!("RETRIEVE_RANGE {offset}+{len}: {e}"))?;
        if part[..] != big[offset as usize..(offset + len) as usize] {
            return Err(format!("RETRIEVE_RANGE {offset}+{len}: wrong bytes"));
        }
        moved.sent += len;
        moved.replies += 1;
    }
    // Signed URLs over HTTP, on the port's HTTP listeners.
    http_session(node, &fps[2], big, &mut moved)?;
    // LOCATE over UDP unicast: found, with its length.
    let (status, len) = udp_locate(node, &fps[2], &signer)?;
    if status != Status::Success as u16 || len != big.len() as u64 {
        return Err(format!("UDP LOCATE: status {status}, length {len}"));
    }
    // LOCATE to the multicast group (from the tap's kernel address): the node, which
    // joined the group through smoltcp, answers to the group. Asked again (bounded)
    // should a datagram be lost.
    let mut located = Vec::new();
    for _ in 0..5 {
        located = dosp::client::locate_multicast_signed(
            group,
            kernel_ip,
            &fps[2],
            Duration::from_secs(1),
            Some(&signer),
        )
        .map(|(found, _)| found)
        .map_err(|e| format!("multicast LOCATE: {e}"))?;
        if !located.is_empty() {
            break;
        }
    }
    match located.first() {
        Some(l) if SocketAddr::V4(l.addr) == node && l.object_len == big.len() as u64 => {}
        other => return Err(format!("multicast LOCATE answered {other:?}")),
    }
    for fp in &fps {
        let refs = c.delete(fp).map_err(|e| format!("DELETE: {e}"))?;
        if refs != 0 {
            return Err(format!("DELETE left {refs} references"));
        }
    }
    match c.retrieve(&fps[0], &mut Vec::new(), &mut |_, _| {}) {
        Err(ClientError::NotFound { .. }) => {}
        other => return Err(format!("a deleted object is still served: {other:?}")),
    }
    let (status, _) = udp_locate(node, &fps[2], &signer)?;
    if status != Status::NotFound as u16 {
        return Err(format!("UDP LOCATE of a deleted object: status {status}"));
    }
    // A second connection, after the first closed: a fresh socket from the pool.
    drop(c);
    let mut c = Client::connect(&node.to_string(), IO_TIMEOUT).map_err(|e| e.to_string())?;
    c.set_signer(Some(signer));
    c.ping()
        .map_err(|e| format!("NULL on a second connection: {e}"))?;
    moved.replies += 2 + objects.len() as u64;
    Ok((
        format!(
            "NULL (chunk_max {}), {} objects stored, retrieved whole and by range, served \
             over HTTP by signed URL, located over UDP unicast and multicast, deleted",
            pong.chunk_max,
            objects.len()
        ),
        moved,
    ))
}

/// Object bytes the client stored and was sent, and the TCP replies it got (read only
/// with the copy-count feature).
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "copy-count"), allow(dead_code))]
struct Moved {
    stored: u64,
    sent: u64,
    replies: u64,
    /// Bytes of HTTP response heads received.
    http_heads: u64,
}

/// One HTTP response read from `s`: status, head (lower-cased) and body (none for a
/// HEAD). Reads retried when net_tap's SIGIO interrupts them.
fn read_response(s: &mut TcpStream, head_only: bool) -> Result<(u16, String, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 {
            return Err("an HTTP head over 16 KiB".into());
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err(format!("closed after {} bytes of head", buf.len())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("HTTP read: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
    let mut body = buf.split_off(head_end);
    if head_only {
        return Ok((status, head, body));
    }
    while body.len() < len {
        match s.read(&mut chunk) {
            Ok(0) => return Err(format!("closed after {} of {len} body bytes", body.len())),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("HTTP read: {e}")),
        }
    }
    if body.len() != len {
        return Err(format!("{} body bytes, Content-Length {len}", body.len()));
    }
    Ok((status, head, body))
}

/// Signed URLs for `fp` (whose bytes are `data`) over HTTP: GET whole, a range and
/// HEAD over one kept-alive connection, then a tampered URL on a second (403).
fn http_session(
    node: SocketAddr,
    fp: &Fingerprint,
    data: &[u8],
    moved: &mut Moved,
) -> Result<(), String> {
    let http = SocketAddr::new(node.ip(), HTTP_PORT);
    let ring = KeyRing::parse(KEY).unwrap();
    let expires = dosp::signed::now_ms() / 1000 + 600;
    let path = srl_path(&ring, fp, expires, Some("big.bin"));
    let mut s =
        TcpStream::connect_timeout(&http, IO_TIMEOUT).map_err(|e| format!("{http}: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (a, b) = (12_345usize, 712_344usize);
    let asks: [(&str, &str, u16, &[u8]); 3] = [
        ("GET", "", 200, data),
        (
            "GET",
            &format!("Range: bytes={a}-{b}\r\n"),
            206,
            &data[a..=b],
        ),
        ("HEAD", "", 200, b""),
    ];
    for (method, extra, want, bytes) in asks {
        write!(s, "{method} {path} HTTP/1.1\r\nHost: node\r\n{extra}\r\n")
            .map_err(|e| format!("HTTP write: {e}"))?;
        let (status, head, body) = read_response(&mut s, method == "HEAD")?;
        if status != want || body != bytes {
            return Err(format!(
                "{method} {extra:?}: {status} with {} bytes, not {want} with {}:\n{head}",
                body.len(),
                bytes.len()
            ));
        }
        if method == "HEAD" && !head.contains(&format!("content-length: {}\r\n", data.len())) {
            return Err(format!("HEAD: {head}"));
        }
        moved.sent += body.len() as u64;
        moved.http_heads += head.len() as u64;
    }
    drop(s);
    // The signature's first character changed: refused, nothing served.
    let (enc, rest) = path[1..].split_once('/').unwrap();
    let flipped = if rest.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("/{enc}/{flipped}{}", &rest[1..]);
    let mut s =
        TcpStream::connect_timeout(&http, IO_TIMEOUT).map_err(|e| format!("{http}: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(s, "GET {tampered} HTTP/1.1\r\nHost: node\r\n\r\n")
        .map_err(|e| format!("HTTP write: {e}"))?;
    let (status, head, body) = read_response(&mut s, false)?;
    if status != 403 {
        return Err(format!("a tampered URL: {status}\n{head}"));
    }
    moved.http_heads += (head.len() + body.len()) as u64;
    Ok(())
}

#[test]
fn dpdk_port_serves_dosp_to_the_kernel_through_a_tap() {
    if !is_root() {
        eprintln!(
            "SKIPPED: dpdk_port needs root (a tap device, ip and sysctl on it); CI runs as root"
        );
        return;
    }
    // Unique per process, so concurrent runs (other worktrees, CI) do not collide: an
    // interface name of at most 15 bytes and a /24 of its own (not tap_tcp's).
    let pid = std::process::id();
    let iface_name = format!("dosdport{}", pid % 100_000);
    let net = (pid % 200 + 20) as u8;
    let kernel_ip = Ipv4Addr::new(10, 98, net, 1);
    let node_ip = Ipv4Addr::new(10, 98, net, 2);
    let node = SocketAddr::from((node_ip, DOSP_PORT));
    let group = SocketAddrV4::new(Ipv4Addr::new(239, 255, 98, net), DOSP_PORT + 1);

    // The store, as tests.rs builds it: one region of a memory disk, one loop.
    let disk = MemDisk::new(64 * MIB + MIB, 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let label = dataplane::store::label::open_or_label(&mut disk.device(), Some(1), &mut rng)
        .expect("label");
    let (base, len) = label.region(0);
    let region = nvme::Region::new(disk.device(), base, len).expect("region");
    let store_cfg = StoreConfig {
        max_object_bytes: 8 * MIB,
        ..StoreConfig::default()
    };
    #[allow(unused_mut)] // set_copies needs the copy-count feature
    let mut store = Store::open(vec![Box::new(region)], store_cfg, 7).expect("store");
    let copies = dataplane::copies::Copies::new();
    #[cfg(feature = "copy-count")]
    store.set_copies(copies.clone());
    let mut shards = vec![Shards::new(store, None)];
    build_directories(&mut shards);
    let shard = shards.pop().expect("one shard");
    let (handle, mut ends) = dataplane::handle::handle_for(1);
    let end = ends.remove(0);
    handle.node.publish(NodeState::new(
        0x0123_4567_89ab_cdef,
        None,
        1,
        Addresses {
            dosp: SocketAddrV4::new(node_ip, DOSP_PORT),
            multicast_group: group,
            multicast_if: node_ip,
            mgmt: None,
        },
    ));
    let cfg = ServerConfig {
        listen: node,
        multicast_group: group,
        multicast_if: node_ip,
        chunk_max: 1 << 20,
        connections_max: 8,
        idle_sleep: Duration::from_millis(10),
        checkpoint_interval: Duration::from_secs(3600),
        request_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(60),
        header_timeout: Duration::from_secs(10),
        transfer_rate_min: 0,
        test_stall: None,
        auth: Some(Arc::new(NodeAuth::new(
            KeyRing::parse(KEY).unwrap(),
            false,
            dataplane::server::auth::WINDOW_DEFAULT,
            1024,
        ))),
    };

    let stop = Arc::new(AtomicBool::new(false));
    let (up_tx, up_rx) = mpsc::channel();
    let server = thread::spawn({
        let stop = Arc::clone(&stop);
        let iface_name = iface_name.clone();
        // A shared ledger with copy-count, a unit (Copy) without.
        #[allow(clippy::clone_on_copy)]
        let copies = copies.clone();
        move || {
            serve(
                iface_name,
                (kernel_ip, node_ip),
                shard,
                end,
                cfg,
                copies,
                up_tx,
                stop,
            )
        }
    });
    let stopper = StopOnDrop(Arc::clone(&stop));
    let started = Instant::now();
    let mut init = Duration::ZERO;
    let result = match up_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(())) => {
            init = started.elapsed();
            client_session(node, group, kernel_ip)
        }
        Ok(Err(e)) => Err(format!("server did not start: {e}")),
        Err(e) => Err(format!("server did not start: {e}")),
    };
    drop(stopper);
    let report = server.join().expect("server thread");
    let elapsed = started.elapsed() - init;
    let (summary, moved) = result.unwrap_or_else(|e| panic!("client: {e}; server: {report:?}"));
    let report = report.unwrap_or_else(|e| panic!("server: {e}"));
    // The copies on this backend (test.sh runs it with the copy-count feature): a STORE
    // copies each byte once in the dataplane (the receive ring → the device buffer, MD5
    // in that pass), plus what the port staged at ring wraps; a RETRIEVE copies each
    // object byte once, into smoltcp's send ring (smoltcp has no external-buffer send),
    // and nothing else. smoltcp's own copies (frame → receive ring, send ring → frame)
    // are inside smoltcp and not counted here.
    #[cfg(feature = "copy-count")]
    {
        use dataplane::copies::Site;
        let at = |s| copies.at(s);
        assert_eq!(at(Site::Append), moved.stored, "STORE: each byte once");
        assert_eq!(at(Site::PortRecv), report.staged_bytes);
        assert!(at(Site::PortRecv) <= moved.stored);
        assert_eq!(
            at(Site::ReadOut) + at(Site::Session) + at(Site::CrossLoop),
            0
        );
        // Every byte sent on TCP went through the send ring: object bytes, the HTTP
        // heads and, per DOSP reply, a header, its Out structure and its signature
        // (well under 256 bytes each). HTTP bodies take the same path as RETRIEVE's.
        let send = at(Site::PortSend) - moved.http_heads;
        assert!(
            send >= moved.sent && send - moved.sent <= 256 * moved.replies,
            "send-ring copies {send} for {} object bytes in {} replies",
            moved.sent,
            moved.replies
        );
        eprintln!(
            "dpdk_port copies: STORE {} of {} bytes (+{} staged at ring wraps), RETRIEVE \
             {} into the send ring for {} object bytes",
            at(Site::Append),
            moved.stored,
            at(Site::PortRecv),
            send,
            moved.sent
        );
    }
    #[cfg(not(feature = "copy-count"))]
    let _ = (moved, copies);
    // Two DOSP connections and two HTTP ones, each from its own listeners.
    assert_eq!(report.accepted, (2, 2), "{report:?}");
    assert_eq!(report.phy.rx_dropped, 0, "{report:?}");
    assert_eq!(report.phy.tx_no_mbuf, 0, "{report:?}");
    assert_eq!(report.phy.tx_dropped, 0, "{report:?}");
    eprintln!(
        "dpdk_port: {iface_name}, node {node}: EAL and port up in {init:.2?}; {summary} \
         in {elapsed:.2?}; {} loop turns, \
         {} TCP sockets still in use at the end, {} received bytes staged at ring wraps; \
         device {:?}",
        report.turns, report.sockets_in_use, report.staged_bytes, report.phy
    );
}
