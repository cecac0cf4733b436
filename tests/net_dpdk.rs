//! `dosd --net dpdk`: a whole node whose dataplane loop serves DOSP through smoltcp on
//! a DPDK `net_tap` vdev, reached from the kernel's side of the tap with the ordinary
//! `dosp` client; the management API stays on the kernel (loopback) and says "dpdk".
//! Both nodes have the cluster's key: every request, answer and heartbeat is signed,
//! and an unsigned request through the DPDK port is refused. The DPDK node also serves
//! signed URLs over HTTP on its DPDK address (`--http-listen`), fetched with `curl`
//! from the namespace: whole, by range, HEAD, several over one connection, tampered.
//!
//! Needs root (the tap device, `ip` and `sysctl` on it); without it the test says so
//! and passes without running. Only built with the `dpdk` feature.

#![cfg(feature = "dpdk")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use dosp::auth::{srl_path, CertMode, KeyRing};
use dosp::client::{Client, ClientError};
use dosp::signed::Signer;
use dosp::wire::Status;
use dosp::Fingerprint;
use rand::{RngCore, SeedableRng};

/// How long dosd may take to print its line (EAL start-up, disks).
const READY_WAIT: Duration = Duration::from_secs(60);
/// DOSP connections the test opens at once: the kernel's side of the tap picks a queue
/// (a loop) per flow by hash, so all of them on one loop has odds 2^-15.
const CONNECTIONS: usize = 16;
/// The client's connect and read timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// The cluster's key (both nodes and the clients).
const KEY: &str = "net-dpdk 5be1c0a7f00d5be1c0a7f00d5be1c0a7f00d5be1c0a7f00d5be1c0a7f00d5be1c0a7";

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

/// Kills the node when dropped, so a failing check never leaves it running.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP request to the management address; the status code and the body. Reads
/// retried when interrupted (net_tap raises SIGIO in dosd, not here, but a test binary
/// may share signals with its children's setup).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to mgmt");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status in {head:?}"));
    (status, body.to_string())
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let (status, body) = http(addr, "GET", path, None, "");
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// Output of a command (it must succeed).
fn output(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts dosd with `args` and waits for its ready line; the node and the line.
fn spawn_node(args: &[&str], stderr_log: &std::path::Path) -> (Killed, String) {
    let bin = common::dosd_bin();
    spawn_node_with(bin.to_str().unwrap(), args, stderr_log)
}

/// [`spawn_node`] through `program` (e.g. `ip netns exec NS dosd …`, which execs dosd:
/// the child is dosd itself).
fn spawn_node_with(program: &str, args: &[&str], stderr_log: &std::path::Path) -> (Killed, String) {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(stderr_log).unwrap())
        .env("DOSD_LOG", "info")
        .env("NO_COLOR", "1")
        .spawn()
        .expect("spawn dosd");
    let mut node = Killed(child);
    let log = || std::fs::read_to_string(stderr_log).unwrap_or_default();
    // The ready line, read on a thread so the wait is bounded.
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
    (node, line)
}

fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .to_string()
}

fn seeded(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// A network namespace of the test's own, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        // A leftover of an earlier, killed run of the same pid is removed first.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        Netns(name)
    }

    /// Runs `cmd` in the namespace (it must succeed).
    fn run(&self, cmd: &str, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.0, cmd];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    fn output(&self, cmd: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.0, cmd];
        all.extend_from_slice(args);
        output("ip", &all)
    }

    /// Runs `f` on a thread that lives in the namespace (setns applies to the calling
    /// thread only); a panic in `f` is the caller's.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::scope(|scope| {
            let t = scope.spawn(move || {
                let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&ns),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            });
            t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn dosd_serves_dosp_on_a_dpdk_port() {
    if !is_root() {
        println!("SKIPPED: dosd --net dpdk on net_tap needs root (a tap device, ip netns)");
        return;
    }
    let pid = std::process::id();
    // A subnet, a tap and a namespace of this process's own.
    let x = 10 + pid % 240;
    let iface = format!("dnd{}", pid % 100_000);
    let node_ip = format!("10.97.{x}.2");
    let kernel_ip = format!("10.97.{x}.1");
    let service_ip = format!("10.97.{x}.9");
    let listen = format!("{node_ip}:7370");
    let http_listen = format!("{node_ip}:8080");
    let dir = tempfile::tempdir().unwrap();
    let group = common::unique_group();
    let token = "net-dpdk-test";
    let keys = dir.path().join("cluster.keys");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&keys, format!("{KEY}\n")).unwrap();
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let signer = Signer::new(KeyRing::parse(KEY).unwrap(), CertMode::HmacSha256);
    let signed = |c: Client| {
        let mut c = c;
        c.set_signer(Some(signer.clone()));
        c
    };
    // Two loops: two receive and transmit queues on the tap, flows spread by the
    // kernel's flow hash; heartbeats and the multicast group on the DPDK port.
    let eal = format!(
        "-l 0 --no-huge -m 512 --no-pci --no-shconf --no-telemetry --vdev=net_tap0,iface={iface}"
    );
    let dpdk_log = dir.path().join("dosd-dpdk.log");
    let data = dir.path().join("data");
    let (mut node, line) = spawn_node(
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--disks",
            "2",
            "--disk-size",
            "64M",
            "--dataplane-cores",
            "2",
            "--heartbeat-ms",
            "200",
            "--net",
            "dpdk",
            "--dpdk-args",
            &eal,
            "--dpdk-ip",
            &format!("{node_ip}/24"),
            "--listen",
            &listen,
            "--mgmt-listen",
            "127.0.0.1:0",
            "--mgmt-token",
            token,
            "--multicast",
            &group,
            "--cluster-key-file",
            keys.to_str().unwrap(),
            "--http-listen",
            &http_listen,
        ],
        &dpdk_log,
    );
    let log = || std::fs::read_to_string(&dpdk_log).unwrap_or_default();
    let dosp_addr: SocketAddr = field(&line, "dosp=").parse().unwrap();
    let mgmt: SocketAddr = field(&line, "mgmt=").parse().unwrap();
    let node_id = u64::from_str_radix(&field(&line, "node="), 16).unwrap();
    assert_eq!(
        dosp_addr.to_string(),
        listen,
        "the line gives the DPDK address"
    );
    assert_eq!(
        field(&line, "http="),
        http_listen,
        "the line gives the DPDK address for HTTP too"
    );

    // The tap's kernel end goes into a namespace of the test's own, where the peers
    // live: the clients and a second node. The management API stays on this
    // namespace's loopback. The peer side accepts gratuitous ARP.
    let ns = Netns::new(format!("dosdt{}", pid % 100_000));
    run("ip", &["link", "set", &iface, "netns", &ns.0]);
    ns.run("ip", &["link", "set", "lo", "up"]);
    ns.run(
        "sysctl",
        &["-qw", &format!("net.ipv6.conf.{iface}.disable_ipv6=1")],
    );
    ns.run(
        "sysctl",
        &["-qw", &format!("net.ipv4.conf.{iface}.arp_accept=1")],
    );
    ns.run(
        "ip",
        &["addr", "add", &format!("{kernel_ip}/24"), "dev", &iface],
    );
    ns.run("ip", &["link", "set", &iface, "up"]);

    // A second node in the namespace, on the kernel backend, in the same cluster group
    // (its multicast leaves through the tap).
    let kernel_log = dir.path().join("dosd-kernel.log");
    let kdata = dir.path().join("kdata");
    let bin = common::dosd_bin();
    let (_knode, kline) = spawn_node_with(
        "ip",
        &[
            "netns",
            "exec",
            &ns.0,
            bin.to_str().unwrap(),
            "--data-dir",
            kdata.to_str().unwrap(),
            "--disks",
            "1",
            "--disk-size",
            "64M",
            "--dataplane-cores",
            "1",
            "--heartbeat-ms",
            "200",
            "--listen",
            &format!("{kernel_ip}:0"),
            "--mgmt-listen",
            "127.0.0.1:0",
            "--multicast",
            &group,
            "--multicast-if",
            &kernel_ip,
            "--cluster-key-file",
            keys.to_str().unwrap(),
        ],
        &kernel_log,
    );
    let knode_id = u64::from_str_radix(&field(&kline, "node="), 16).unwrap();
    let kdosp = field(&kline, "dosp=");

    let objects: Vec<Vec<u8>> = (0..8u64)
        .map(|i| {
            seeded(
                i + 1,
                [0, 1000, 4096, 65_536, 300_000, 1 << 20, 5 << 20, 77][i as usize],
            )
        })
        .collect();
    let group_addr: std::net::SocketAddrV4 = group.parse().unwrap();
    let kernel_v4: std::net::Ipv4Addr = kernel_ip.parse().unwrap();

    // From the namespace: several connections at once, so that flows land on both
    // loops; every object is then read back over every connection (a read on the loop
    // that does not hold it crosses the mesh).
    let (fps, clients) = ns.enter(|| {
        let mut clients: Vec<Client> = (0..CONNECTIONS)
            .map(|_| {
                signed(
                    Client::connect(&listen, IO_TIMEOUT)
                        .unwrap_or_else(|e| panic!("connect to {listen}: {e}\n{}", log())),
                )
            })
            .collect();
        // Unsigned, through the DPDK port: refused, nothing stored.
        let mut unsigned = Client::connect(&listen, IO_TIMEOUT).expect("connect, unsigned");
        match unsigned.store_bytes(&objects[2]) {
            Err(ClientError::Status {
                status: Status::AuthFailed,
                ..
            }) => {}
            other => panic!("an unsigned STORE through the DPDK port: {other:?}"),
        }
        drop(unsigned);
        let mut fps = Vec::new();
        for (i, data) in objects.iter().enumerate() {
            let c = &mut clients[i % CONNECTIONS];
            let stored = c
                .store_bytes(data)
                .unwrap_or_else(|e| panic!("STORE of {} bytes: {e}\n{}", data.len(), log()));
            assert_eq!(stored.fingerprint, Fingerprint::of(data));
            assert_eq!(stored.refcount, 1);
            fps.push(stored.fingerprint);
        }
        for (k, c) in clients.iter_mut().enumerate() {
            c.ping().expect("NULL");
            for (fp, data) in fps.iter().zip(&objects) {
                // The largest once (the debug build's smoltcp is slow), the others by all.
                if data.len() > (1 << 20) && k > 0 {
                    continue;
                }
                let mut got = Vec::new();
                let len = c
                    .retrieve(fp, &mut got, &mut |_, _| {})
                    .unwrap_or_else(|e| panic!("RETRIEVE of {} bytes: {e}", data.len()));
                assert_eq!(len, data.len() as u64);
                assert!(got == *data, "RETRIEVE gave other bytes than stored");
            }
            let big = &objects[6];
            let mut part = Vec::new();
            c.retrieve_range(&fps[6], 1_000_003, 70_000, &mut part)
                .expect("RETRIEVE_RANGE");
            assert!(part == big[1_000_003..1_070_003], "RANGE gave other bytes");
        }
        let mut listed = Vec::new();
        let n = clients[0]
            .contents(&mut |fp, _| listed.push(fp))
            .expect("GET_CONTENTS");
        assert_eq!(n as usize, objects.len());
        let mut want = fps.clone();
        want.sort();
        listed.sort();
        assert_eq!(listed, want, "the contents list every object once");

        // Multicast LOCATE: the DPDK node (through smoltcp's group membership) and the
        // kernel node both answer for an object both hold.
        let mut kc =
            signed(Client::connect(&kdosp, IO_TIMEOUT).expect("connect to the kernel node"));
        kc.store_bytes(&objects[1])
            .expect("STORE on the kernel node");
        let mut answered = Vec::new();
        for _ in 0..5 {
            let (found, dropped) = dosp::client::locate_multicast_signed(
                group_addr,
                kernel_v4,
                &fps[1],
                Duration::from_millis(800),
                Some(&signer),
            )
            .expect("multicast LOCATE");
            assert_eq!(dropped, 0, "every answer is signed");
            answered = found.iter().map(|l| l.node_id).collect();
            answered.sort();
            answered.dedup();
            if answered.len() == 2 {
                break;
            }
        }
        let mut want_nodes = vec![node_id, knode_id];
        want_nodes.sort();
        assert_eq!(
            answered,
            want_nodes,
            "both nodes answer the multicast LOCATE\n{}",
            log()
        );

        // Heartbeats of the DPDK node arrive on the segment.
        let mut heard = false;
        dosp::client::watch_signed(
            group_addr,
            kernel_v4,
            Duration::from_secs(5),
            Some(&signer),
            &mut |ev, _| {
                if let dosp::client::ClusterEvent::Heartbeat(h) = ev {
                    heard |= h.node_id.get() == node_id;
                }
                !heard
            },
        )
        .expect("watch the group");
        assert!(heard, "no heartbeat from the DPDK node in 5 s\n{}", log());
        (fps, clients)
    });

    // Signed URLs over HTTP through the DPDK port, fetched with curl from the namespace
    // (each curl a connection of its own, but the keep-alive one).
    let http_conns = http_over_dpdk(&ns, &http_listen, &dir, &fps, &objects, mgmt, &log);

    // A service address: added over REST, announced by gratuitous ARP (the namespace
    // learns it without asking), served, removed.
    let (status, body) = http(mgmt, "POST", "/v1/addresses", None, "{}");
    assert_eq!(status, 401, "a mutation without the token: {body}");
    let (status, body) = http(
        mgmt,
        "POST",
        "/v1/addresses",
        Some(token),
        &format!("{{\"addr\": \"{service_ip}/24\"}}"),
    );
    assert_eq!(status, 200, "POST /v1/addresses: {body}\n{}", log());
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["managed"], true, "{v}");
    assert_eq!(
        v["addresses"],
        serde_json::json!([format!("{node_ip}/24"), format!("{service_ip}/24")]),
        "{v}"
    );
    let mac_of = |ip: &str| {
        ns.output("ip", &["neigh", "show", ip, "dev", &iface])
            .split_whitespace()
            .skip_while(|w| *w != "lladdr")
            .nth(1)
            .map(String::from)
    };
    let mut garp = None;
    for _ in 0..50 {
        garp = mac_of(&service_ip);
        if garp.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let node_mac =
        mac_of(&node_ip).expect("the namespace knows the node's MAC after talking to it");
    assert_eq!(
        garp.as_deref(),
        Some(node_mac.as_str()),
        "the gratuitous ARP put {service_ip} at the node's MAC in `ip neigh`"
    );
    ns.enter(|| {
        let mut sc = signed(
            Client::connect(&format!("{service_ip}:7370"), IO_TIMEOUT)
                .expect("connect to the service address"),
        );
        let mut got = Vec::new();
        sc.retrieve(&fps[5], &mut got, &mut |_, _| {})
            .expect("RETRIEVE on the service address");
        assert!(
            got == objects[5],
            "the service address serves the same objects"
        );
    });
    let (status, body) = http(
        mgmt,
        "DELETE",
        &format!("/v1/addresses/{service_ip}"),
        Some(token),
        "",
    );
    assert_eq!(status, 200, "DELETE /v1/addresses: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["addresses"],
        serde_json::json!([format!("{node_ip}/24")]),
        "{v}"
    );
    let (status, body) = http(
        mgmt,
        "DELETE",
        &format!("/v1/addresses/{node_ip}"),
        Some(token),
        "",
    );
    assert_eq!(status, 409, "the port's own address cannot go: {body}");

    // The management core, on the kernel: the node's DOSP address is the DPDK one, and
    // its network backend says so.
    let n: serde_json::Value = serde_json::from_str(&http_get(mgmt, "/v1/node")).unwrap();
    assert_eq!(n["backends"]["network"], "dpdk", "{n}");
    assert_eq!(n["addresses"]["dosp"], listen.as_str(), "{n}");
    assert_eq!(
        log()
            .matches("dataplane loop serving DOSP on the DPDK port")
            .count(),
        2,
        "two loops, each on its own queue:\n{}",
        log()
    );

    let mut clients = clients;
    ns.enter(|| {
        let c = &mut clients[0];
        for fp in &fps {
            assert_eq!(c.delete(fp).expect("DELETE"), 0);
        }
        match c.retrieve(&fps[0], &mut Vec::new(), &mut |_, _| {}) {
            Err(ClientError::NotFound { .. }) => {}
            other => panic!("a deleted object is still served: {other:?}"),
        }
    });
    drop(clients);
    println!(
        "dosd --net dpdk (2 loops) on {iface}, its peers in namespace {}: {} objects over {CONNECTIONS} connections stored, \
         retrieved and range-read byte-exact, listed, deleted; multicast LOCATE answered by \
         it and a kernel node; its heartbeats heard; service address {service_ip} \
         announced by gratuitous ARP and served; signed URLs over HTTP on {http_listen} \
         ({http_conns} connections: whole, range, HEAD, keep-alive, tampered) byte-exact",
        ns.0,
        objects.len()
    );
    // SIGTERM, then a clean exit within the bound (else the drop kills it).
    run("kill", &["-TERM", &node.0.id().to_string()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "dosd did not stop within 20 s of SIGTERM:\n{}",
            log()
        );
        if let Some(status) = node.0.try_wait().unwrap() {
            assert!(status.success(), "dosd exited with {status}:\n{}", log());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each loop's queue says what it carried when it closes: connections reached both.
    let accepted: Vec<u64> = log()
        .lines()
        .filter(|l| l.contains("DPDK port queue closed"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("accepted="))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    println!("connections accepted per loop: {accepted:?}");
    assert_eq!(accepted.len(), 2, "two queues closed:\n{}", log());
    assert!(
        accepted.iter().all(|&n| n > 0),
        "flows reached both loops: {accepted:?}"
    );
    // The clients, the unsigned one and the one to the service address: DOSP only,
    // as `accepted=` counts DOSP connections; HTTP ones are counted apart
    // (`accepted_http=`), each queue's port having HTTP listeners of its own.
    assert_eq!(accepted.iter().sum::<u64>(), CONNECTIONS as u64 + 2);
    let accepted_http: u64 = log()
        .lines()
        .filter(|l| l.contains("DPDK port queue closed"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("accepted_http="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum();
    assert_eq!(
        accepted_http, http_conns,
        "HTTP connections over the queues"
    );
}

/// One curl in the namespace: its `-w` output (`%{http_code} %{num_connects}` per URL).
fn curl(ns: &Netns, args: &[&str]) -> String {
    let mut all = vec![
        "-sS",
        "--max-time",
        "60",
        "-w",
        "%{http_code} %{num_connects}\n",
    ];
    all.extend_from_slice(args);
    ns.output("curl", &all)
}

/// The value of the /metrics line starting with `key` (name, labels and a space).
fn metric(mgmt: SocketAddr, key: &str) -> u64 {
    http_get(mgmt, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

fn http_count(mgmt: SocketAddr, status: u16) -> u64 {
    metric(
        mgmt,
        &format!("dosd_http_requests_total{{status=\"{status}\"}} "),
    )
}

/// GETs of signed URLs at `http` (the DPDK node's HTTP address), from the namespace:
/// an object whole and a range of it (byte-exact), HEAD, three objects over one
/// keep-alive connection, a tampered URL (403); the responses counted in /metrics.
/// Returns the HTTP connections it made.
fn http_over_dpdk(
    ns: &Netns,
    http: &str,
    dir: &tempfile::TempDir,
    fps: &[Fingerprint],
    objects: &[Vec<u8>],
    mgmt: SocketAddr,
    log: &dyn Fn() -> String,
) -> u64 {
    let ring = KeyRing::parse(KEY).unwrap();
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let url = |i: usize, name: Option<&str>| {
        format!("http://{http}{}", srl_path(&ring, &fps[i], expires, name))
    };
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let before = |s| http_count(mgmt, s);
    let (ok0, partial0, forbidden0) = (before(200), before(206), before(403));
    let mut conns = 0;

    // 1 MiB whole: 200, the bytes stored.
    let big = &objects[5];
    let whole = file("whole");
    let out = curl(ns, &["-o", &whole, &url(5, Some("big.bin"))]);
    conns += 1;
    assert_eq!(out.trim(), "200 1", "GET whole\n{}", log());
    assert!(
        std::fs::read(&whole).unwrap() == *big,
        "GET over HTTP gave other bytes than stored"
    );

    // A range across the first chunk's end: 206 and exactly those bytes.
    let part = file("part");
    let out = curl(ns, &["-r", "1000-70999", "-o", &part, &url(5, None)]);
    conns += 1;
    assert_eq!(out.trim(), "206 1", "GET range");
    assert!(
        std::fs::read(&part).unwrap() == big[1000..71_000],
        "the range gave other bytes"
    );

    // HEAD: the head alone, with the length.
    let head = curl(ns, &["-I", &url(5, Some("big.bin"))]).to_ascii_lowercase();
    conns += 1;
    assert!(head.starts_with("http/1.1 200"), "HEAD: {head}");
    assert!(
        head.contains(&format!("content-length: {}\r\n", big.len())),
        "HEAD: {head}"
    );
    assert!(head.trim_end().ends_with("200 1"), "HEAD: {head}");

    // Keep-alive: three objects in one curl, one connection (curl reuses it: the
    // later transfers made no connect of their own).
    let keep = [1usize, 2, 3];
    let names: Vec<String> = keep.iter().map(|i| file(&format!("keep{i}"))).collect();
    let urls: Vec<String> = keep.iter().map(|&i| url(i, None)).collect();
    let mut args = Vec::new();
    for (n, u) in names.iter().zip(&urls) {
        args.extend(["-o", n.as_str(), u.as_str()]);
    }
    let out = curl(ns, &args);
    conns += 1;
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["200 1", "200 0", "200 0"],
        "three GETs over one connection"
    );
    for (&i, n) in keep.iter().zip(&names) {
        assert!(
            std::fs::read(n).unwrap() == objects[i],
            "keep-alive GET {i} gave other bytes"
        );
    }

    // A tampered signature: 403.
    let good = url(5, None);
    let path = good.trim_start_matches(&format!("http://{http}/"));
    let (enc, rest) = path.split_once('/').unwrap();
    let mut sig: Vec<u8> = rest.bytes().collect();
    sig[0] = if sig[0] == b'A' { b'B' } else { b'A' };
    let tampered = format!("http://{http}/{enc}/{}", String::from_utf8(sig).unwrap());
    let out = curl(ns, &["-o", "/dev/null", &tampered]);
    conns += 1;
    assert_eq!(out.trim(), "403 1", "a tampered URL");

    assert_eq!(
        http_count(mgmt, 200),
        ok0 + 5,
        "whole, HEAD, three kept alive"
    );
    assert_eq!(http_count(mgmt, 206), partial0 + 1);
    assert_eq!(http_count(mgmt, 403), forbidden0 + 1);
    conns
}
