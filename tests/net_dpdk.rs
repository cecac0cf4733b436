//! `dosd --net dpdk`: a whole node whose dataplane loop serves DOSP through smoltcp on
//! a DPDK `net_tap` vdev, reached from the kernel's side of the tap with the ordinary
//! `dosp` client; the management API stays on the kernel (loopback) and says "dpdk".
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

use dosp::client::{Client, ClientError};
use dosp::Fingerprint;
use rand::{RngCore, SeedableRng};

/// How long dosd may take to print its line (EAL start-up, disks).
const READY_WAIT: Duration = Duration::from_secs(60);
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

/// One GET on the management address; the body. Reads retried when interrupted.
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

fn seeded(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

#[test]
fn dosd_serves_dosp_on_a_dpdk_port() {
    if !is_root() {
        println!("SKIPPED: dosd --net dpdk on net_tap needs root (a tap device, ip, sysctl)");
        return;
    }
    let pid = std::process::id();
    // A subnet and a tap name of this process's own.
    let x = 10 + pid % 240;
    let iface = format!("dnd{}", pid % 100_000);
    let node_ip = format!("10.97.{x}.2");
    let kernel_ip = format!("10.97.{x}.1");
    let listen = format!("{node_ip}:7370");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let stderr_log = dir.path().join("dosd.stderr.log");
    let group = common::unique_group();
    let eal = format!(
        "-l 0 --no-huge -m 512 --no-pci --no-shconf --no-telemetry --vdev=net_tap0,iface={iface}"
    );
    let child = Command::new(common::dosd_bin())
        .arg("--data-dir")
        .arg(&data_dir)
        .args([
            "--disks",
            "2",
            "--disk-size",
            "64M",
            "--heartbeat-ms",
            "200",
        ])
        .args(["--net", "dpdk", "--dpdk-args", &eal])
        .args(["--dpdk-ip", &format!("{node_ip}/24")])
        .args(["--listen", &listen, "--mgmt-listen", "127.0.0.1:0"])
        .args(["--multicast", &group, "--multicast-if", "127.0.0.1"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_log).unwrap())
        .env("DOSD_LOG", "info")
        .spawn()
        .expect("spawn dosd");
    let mut node = Killed(child);
    let log = || std::fs::read_to_string(&stderr_log).unwrap_or_default();
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
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .to_string()
    };
    let dosp_addr: SocketAddr = field("dosp=").parse().unwrap();
    let mgmt: SocketAddr = field("mgmt=").parse().unwrap();
    assert_eq!(
        dosp_addr.to_string(),
        listen,
        "the line gives the DPDK address"
    );

    // The kernel's side of the tap, now that DPDK made it.
    run(
        "sysctl",
        &["-qw", &format!("net.ipv6.conf.{iface}.disable_ipv6=1")],
    );
    run(
        "ip",
        &["addr", "add", &format!("{kernel_ip}/24"), "dev", &iface],
    );
    run("ip", &["link", "set", &iface, "up"]);

    let objects = [seeded(1, 1000), seeded(2, 300_000), seeded(3, 5 << 20)];
    let mut c = Client::connect(&listen, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {listen}: {e}\n{}", log()));
    c.ping().expect("NULL");
    let mut fps = Vec::new();
    for data in &objects {
        let stored = c
            .store_bytes(data)
            .unwrap_or_else(|e| panic!("STORE of {} bytes: {e}", data.len()));
        assert_eq!(stored.fingerprint, Fingerprint::of(data));
        assert_eq!(stored.refcount, 1);
        fps.push(stored.fingerprint);
    }
    for (fp, data) in fps.iter().zip(&objects) {
        let mut got = Vec::new();
        let len = c
            .retrieve(fp, &mut got, &mut |_, _| {})
            .unwrap_or_else(|e| panic!("RETRIEVE of {} bytes: {e}", data.len()));
        assert_eq!(len, data.len() as u64);
        assert!(got == *data, "RETRIEVE gave other bytes than stored");
    }

    // The management core, on the kernel: the node's DOSP address is the DPDK one, and
    // its network backend says so.
    let n: serde_json::Value = serde_json::from_str(&http_get(mgmt, "/v1/node")).unwrap();
    assert_eq!(n["backends"]["network"], "dpdk", "{n}");
    assert_eq!(n["addresses"]["dosp"], listen.as_str(), "{n}");

    for fp in &fps {
        assert_eq!(c.delete(fp).expect("DELETE"), 0);
    }
    match c.retrieve(&fps[0], &mut Vec::new(), &mut |_, _| {}) {
        Err(ClientError::NotFound { .. }) => {}
        other => panic!("a deleted object is still served: {other:?}"),
    }
    drop(c);
    println!(
        "dosd --net dpdk on {iface}: {} objects stored, retrieved byte-exact, deleted; \
         /v1/node says dpdk at {listen}",
        objects.len()
    );
    // SIGTERM, then a clean exit within the bound (else the drop kills it).
    run("kill", &["-TERM", &node.0.id().to_string()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Some(status) = node.0.try_wait().unwrap() {
            assert!(status.success(), "dosd exited with {status}:\n{}", log());
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("dosd did not stop within 20 s of SIGTERM:\n{}", log());
}
