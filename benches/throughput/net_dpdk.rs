//! The `dpdk-dosp` part: DOSP through `dosd --net dpdk` next to `dosd` on the kernel
//! backend, the same client against both, in the same run.
//!
//! Topology (every name this bench makes starts with `dosdb-` and carries its pid;
//! nothing touches the machine's real interfaces):
//!
//! - **dpdk**: `dosd --net dpdk` started inside a network namespace of its own
//!   (`dosdb-PID-dc`), on a `net_tap` vdev (`-l 1 --no-huge -m 512 --no-pci
//!   --no-shconf`), so its tap appears in that namespace; the bench gives the tap's
//!   kernel end an address there. The client runs in the same namespace: kernel TCP →
//!   tap → the PMD's read()/write() on the tap → smoltcp in dosd.
//! - **kernel**: `dosd` (`--net kernel`) inside its own namespace (`dosdb-PID-kn`), the
//!   client in another (`dosdb-PID-kc`), joined by a veth pair: kernel TCP → veth →
//!   kernel TCP → dosd's sockets.
//!
//! Both nodes: one dataplane loop (`--dataplane-cores 1`; the kernel node pins it to
//! core 1, the DPDK node's EAL lcore is 1), two file-backed 2 GiB disks in the
//! bench's temporary directory, default cache. The client is this bench's binary
//! re-run inside the client namespace (`ip netns exec`), driving the shared load
//! generator ([`super::load`]) with the DOSP client: durable 4 KiB STOREs of distinct
//! objects, and 4 MiB fetches (RETRIEVE_RANGE over the whole object, as the side part
//! fetches; verified with DOSD_BENCH_VERIFY=1) cycling over 32 stored objects, at each
//! client count of DOSD_BENCH_DPDK_CLIENTS (`1,8`). dosd's CPU seconds (all its
//! threads, `/proc/PID/stat`) are read at the start and end of each phase, per 10^9
//! payload bytes. `--net dpdk` busy-polls its core, so its CPU is about one core for
//! the whole phase whatever it moves.
//!
//! Needs root (namespaces, veth, a tap) and a bench built with `--features dpdk` (the
//! dosd binary must have the DPDK backend); otherwise it says so and measures nothing.
//! The namespaces are deleted on the way out (and a leftover one of a dead bench
//! process at the next start); the nodes are killed if they do not stop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dosp::client::ClientError;
use dosp::Fingerprint;

use super::child::run_bounded;
use super::common::{data, dosd_bin, unique_group};
use super::load::{self, process_cpu_s, Budget, Rate};
use super::nginx::is_root;
use super::side_by_side::{dosd_fetch, env_counts, markdown_table, object, sig3, stamp, Config};

/// The argument that makes the bench binary the client of one node (a child, run in
/// the client's namespace).
pub const CLIENT_ARG: &str = "--dpdk-dosp-client";

const SMALL: usize = 4 << 10;
const LARGE: usize = 4 << 20;
/// 4 MiB objects stored for the fetch phases (128 MiB).
const LARGE_OBJECTS: u64 = 32;
const DISK_SIZE: &str = "2G";
/// The DOSP port of both nodes (each in its own namespace).
const DOSP_PORT: u16 = 7370;
/// How long a node may take to print its ready line.
const READY_WAIT: Duration = Duration::from_secs(60);

const TAG_STORE: u64 = 0x200;
const TAG_LARGE: u64 = 0x2ff;

/// A node's measurements, by (operation, clients).
type Results = Vec<(String, usize, Result<Rate, String>)>;

/// Runs both nodes and prints the table.
pub fn run(cfg: &Config, tmp: &Path) {
    let clients = dpdk_clients();
    println!();
    if !cfg!(feature = "dpdk") {
        println!(
            "dpdk-dosp: not measured: this bench was built without the dpdk feature \
             (`cargo bench --bench throughput --features dpdk`)"
        );
        return;
    }
    if !is_root() {
        println!(
            "dpdk-dosp: not measured: needs root (network namespaces, a veth pair, a tap \
             device); run the bench as root"
        );
        return;
    }
    remove_stale_namespaces();
    let pid = std::process::id();
    let x = 10 + pid % 240;
    let dpdk = measure_side(cfg, tmp, &clients, &Side::Dpdk { pid, x });
    let kernel = measure_side(cfg, tmp, &clients, &Side::Kernel { pid, x });
    println!(
        "dpdk-dosp: dosd --net dpdk (net_tap, in a namespace) against dosd --net kernel \
         (veth between namespaces), 1 dataplane loop each, same client in a namespace, \
         {} s or {} ops per phase; verify={}",
        cfg.budget.secs,
        cfg.budget.ops_max,
        if cfg.verify { "yes" } else { "no" }
    );
    print_table(&clients, &dpdk, &kernel);
}

fn dpdk_clients() -> Vec<usize> {
    env_counts("DOSD_BENCH_DPDK_CLIENTS", &[1, 8])
}

/// Which node, and the numbers its names and subnet come from.
enum Side {
    Dpdk { pid: u32, x: u32 },
    Kernel { pid: u32, x: u32 },
}

impl Side {
    fn label(&self) -> &'static str {
        match self {
            Side::Dpdk { .. } => "dpdk",
            Side::Kernel { .. } => "kernel",
        }
    }
}

/// Network namespaces this bench made; deleted (with what is in them) on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: &str) -> Result<(), String> {
        ip(&["netns", "add", name])?;
        self.0.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.0.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("timeout")
        .arg("30")
        .arg("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes `dosdb-PID-…` namespaces whose bench process `PID` is gone (a bench
/// interrupted before its own clean-up).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let owner = name
            .strip_prefix("dosdb-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(owner) = owner {
            if !Path::new(&format!("/proc/{owner}")).exists() {
                eprintln!("dpdk-dosp: removing the stale namespace {name}");
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
}

/// A dosd started inside a namespace (`ip netns exec` execs it, so the child's pid is
/// dosd's). Killed on drop if still running.
struct NsNode {
    child: Child,
    addr: SocketAddr,
    stderr_log: PathBuf,
}

impl NsNode {
    fn start(ns: &str, data_dir: &Path, args: &[String]) -> Result<NsNode, String> {
        let stderr_log = data_dir.with_extension("stderr.log");
        let stderr = std::fs::File::create(&stderr_log).map_err(|e| format!("log: {e}"))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(dosd_bin())
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .env("DOSD_LOG", "info")
            .spawn()
            .map_err(|e| format!("spawn dosd: {e}"))?;
        let stdout = child.stdout.take().expect("stdout piped");
        // The ready line, read on a thread so the wait is bounded; the rest drained.
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
        let mut node = NsNode {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            stderr_log,
        };
        let line = rx.recv_timeout(READY_WAIT).unwrap_or_default();
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("dosp="))
            .and_then(|a| a.parse().ok());
        match addr {
            Some(a) => node.addr = a,
            None => {
                node.kill();
                return Err(format!(
                    "dosd was not ready within {READY_WAIT:?}: {}",
                    node.log_tail()
                ));
            }
        }
        Ok(node)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(3).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
    }

    /// SIGTERM, a bounded wait for the exit, SIGKILL if it does not come.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NsNode {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// Sets up one side's namespaces, starts its node, runs the client in the client's
/// namespace and tears everything down. Every failure becomes the rows' reason.
fn measure_side(cfg: &Config, tmp: &Path, clients: &[usize], side: &Side) -> Results {
    let label = side.label();
    eprintln!("dpdk-dosp: {label} node");
    let all_failed = |e: String| -> Results {
        let mut rows = Vec::new();
        for &c in clients {
            for op in ["store 4 KiB", "fetch 4 MiB"] {
                rows.push((op.to_string(), c, Err(e.clone())));
            }
        }
        rows
    };
    // Declared first, so dropped last: the node goes before its namespace.
    let mut namespaces = Namespaces(Vec::new());
    let dir = tmp.join(format!("net-{label}"));
    let group = unique_group();
    // The multicast interface: the kernel node's loopback in its namespace; the DPDK
    // node's is its DPDK address (the default, and the only one it takes).
    let common_args = |listen: &str, multicast_if: Option<&str>| -> Vec<String> {
        let mut args: Vec<String> = [
            "--disks",
            "2",
            "--disk-size",
            DISK_SIZE,
            "--dataplane-cores",
            "1",
            "--listen",
            listen,
            "--mgmt-listen",
            "127.0.0.1:0",
            "--multicast",
            &group,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(m) = multicast_if {
            args.extend(["--multicast-if".to_string(), m.to_string()]);
        }
        args
    };
    let started = (|| -> Result<(String, NsNode), String> {
        match *side {
            Side::Dpdk { pid, x } => {
                let ns = format!("dosdb-{pid}-dc");
                let tap = format!("dosdb-{pid}t");
                let (node_ip, client_ip) = (format!("10.98.{x}.2"), format!("10.98.{x}.1"));
                namespaces.add(&ns)?;
                let eal = format!(
                    "-l 1 --no-huge -m 512 --no-pci --no-shconf --no-telemetry \
                     --log-level=warning --vdev=net_tap0,iface={tap}"
                );
                let mut args = common_args(&format!("{node_ip}:{DOSP_PORT}"), None);
                args.extend(
                    [
                        "--net",
                        "dpdk",
                        "--dpdk-args",
                        &eal,
                        "--dpdk-ip",
                        &format!("{node_ip}/24"),
                    ]
                    .map(String::from),
                );
                let node = NsNode::start(&ns, &dir, &args)?;
                // The tap exists once EAL made it: its kernel end, in the namespace.
                let sysctl = format!("net.ipv6.conf.{tap}.disable_ipv6=1");
                ip(&["netns", "exec", &ns, "sysctl", "-qw", &sysctl])?;
                ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{client_ip}/24"),
                    "dev",
                    &tap,
                ])?;
                ip(&["-n", &ns, "link", "set", &tap, "up"])?;
                Ok((ns, node))
            }
            Side::Kernel { pid, x } => {
                let (ns_c, ns_n) = (format!("dosdb-{pid}-kc"), format!("dosdb-{pid}-kn"));
                let (veth_c, veth_n) = (format!("dosdb-{pid}c"), format!("dosdb-{pid}n"));
                let (node_ip, client_ip) = (format!("10.99.{x}.2"), format!("10.99.{x}.1"));
                namespaces.add(&ns_c)?;
                namespaces.add(&ns_n)?;
                ip(&[
                    "link", "add", &veth_c, "netns", &ns_c, "type", "veth", "peer", "name",
                    &veth_n, "netns", &ns_n,
                ])?;
                for (ns, veth, addr) in [(&ns_c, &veth_c, &client_ip), (&ns_n, &veth_n, &node_ip)] {
                    let sysctl = format!("net.ipv6.conf.{veth}.disable_ipv6=1");
                    ip(&["netns", "exec", ns, "sysctl", "-qw", &sysctl])?;
                    ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", veth])?;
                    ip(&["-n", ns, "link", "set", veth, "up"])?;
                }
                let node = NsNode::start(
                    &ns_n,
                    &dir,
                    &common_args(&format!("{node_ip}:{DOSP_PORT}"), Some("127.0.0.1")),
                )?;
                Ok((ns_c, node))
            }
        }
    })();
    let (client_ns, mut node) = match started {
        Ok(s) => s,
        Err(e) => return all_failed(format!("{label} set-up: {e}")),
    };
    let results = run_client(cfg, clients, &client_ns, &node);
    node.stop();
    drop(node);
    drop(namespaces);
    let _ = std::fs::remove_dir_all(&dir);
    match results {
        Ok(r) => r,
        Err(e) => all_failed(format!("{label}: {e}")),
    }
}

/// Runs this binary as the client inside `ns` against `node`, bounded, and reads
/// its result lines.
fn run_client(cfg: &Config, clients: &[usize], ns: &str, node: &NsNode) -> Result<Results, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own binary: {e}"))?;
    let list: Vec<String> = clients.iter().map(usize::to_string).collect();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(exe)
        .arg(CLIENT_ARG)
        .arg(node.addr.to_string())
        .arg(node.pid().to_string())
        .arg(list.join(","))
        .arg(cfg.budget.secs.to_string())
        .arg(cfg.budget.ops_max.to_string())
        .arg(cfg.seed.to_string())
        .arg(if cfg.verify { "1" } else { "0" });
    // Two timed phases per client count, the corpus, connecting: generous bounds.
    let phases = 2.0 * clients.len() as f64;
    let limit = Duration::from_secs_f64(120.0 + phases * (cfg.budget.secs + 60.0));
    let done = run_bounded(&mut cmd, &|_, _| {}, None, limit)?;
    let mut rows = Results::new();
    for line in done.stdout.lines() {
        let w: Vec<&str> = line.split('\t').collect();
        match w.as_slice() {
            ["rate", op, c, ops, bytes, secs, cpu] => {
                let num = |s: &str| s.parse::<f64>().unwrap_or(f64::NAN);
                rows.push((
                    op.to_string(),
                    c.parse().unwrap_or(0),
                    Ok(Rate {
                        ops: ops.parse().unwrap_or(0),
                        bytes: bytes.parse().unwrap_or(0),
                        secs: num(secs),
                        server_cpu_s: num(cpu),
                    }),
                ));
            }
            ["fail", op, c, why] => {
                rows.push((op.to_string(), c.parse().unwrap_or(0), Err(why.to_string())))
            }
            _ => {}
        }
    }
    if rows.is_empty() {
        return Err(match done.code {
            None => format!("the client did not finish within {limit:?}"),
            Some(c) => format!(
                "the client exited with {c} and no result: {} (node: {})",
                done.stdout.trim(),
                node.log_tail()
            ),
        });
    }
    Ok(rows)
}

fn print_table(clients: &[usize], dpdk: &Results, kernel: &Results) {
    let header = [
        "operation",
        "clients",
        "dpdk ops/s",
        "dpdk MiB/s",
        "kernel ops/s",
        "kernel MiB/s",
        "dpdk ÷ kernel",
        "dpdk CPU-s/GB",
        "kernel CPU-s/GB",
    ];
    let right = [false, true, true, true, true, true, true, true, true];
    let find = |rows: &Results, op: &str, c: usize| -> Result<Rate, String> {
        rows.iter()
            .find(|(o, k, _)| o == op && *k == c)
            .map(|(_, _, r)| r.clone())
            .unwrap_or_else(|| Err("not measured".into()))
    };
    let mut cells = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    for op in ["store 4 KiB", "fetch 4 MiB"] {
        for &c in clients {
            let (d, k) = (find(dpdk, op, c), find(kernel, op, c));
            let three = |r: &Result<Rate, String>| match r {
                Ok(r) => [
                    format!("{:.0}", r.ops_s()),
                    sig3(r.mib_s()),
                    sig3(r.cpu_s_per_gb()),
                ],
                Err(_) => ["n/a".into(), "n/a".into(), "n/a".into()],
            };
            let (dd, kk) = (three(&d), three(&k));
            let ratio = match (&d, &k) {
                (Ok(d), Ok(k)) => format!("{:.2}×", d.ops_s() / k.ops_s()),
                _ => "—".into(),
            };
            for (side, r) in [("dpdk", &d), ("kernel", &k)] {
                if let Err(e) = r {
                    let e = format!("{side}: {}", e.lines().next().unwrap_or_default());
                    if !reasons.contains(&e) {
                        reasons.push(e);
                    }
                }
            }
            cells.push(vec![
                op.to_string(),
                c.to_string(),
                dd[0].clone(),
                dd[1].clone(),
                kk[0].clone(),
                kk[1].clone(),
                ratio,
                dd[2].clone(),
                kk[2].clone(),
            ]);
        }
    }
    markdown_table(&header, &right, &cells);
    for e in reasons {
        println!("  n/a: {e}");
    }
}

/// The client child: `CLIENT_ARG ADDR DOSD_PID CLIENTS SECS OPS_MAX SEED VERIFY`, run
/// inside the client's namespace. For each client count a STORE phase, then the fetch
/// corpus (untimed), then for each client count a fetch phase. Prints one
/// tab-separated line per phase: `rate OP CLIENTS OPS BYTES SECS CPU` or
/// `fail OP CLIENTS WHY`.
pub fn client_main(args: &[String]) {
    let arg = |k: usize| args.get(k).map(String::as_str).unwrap_or_default();
    let addr = arg(0).to_string();
    let pid: u32 = arg(1).parse().unwrap_or(0);
    let clients: Vec<usize> = arg(2).split(',').filter_map(|c| c.parse().ok()).collect();
    let budget = Budget {
        secs: arg(3).parse().unwrap_or(3.0),
        ops_max: arg(4).parse().unwrap_or(200_000),
    };
    let seed: u64 = arg(5).parse().unwrap_or(1);
    let verify = arg(6) == "1";
    let cpu = || process_cpu_s(pid);
    // `--net dpdk` keeps a backlog of 4 listening sockets (`LISTENERS` in
    // dataplane/src/server/dpdk_port.rs) and answers SYNs beyond them with a reset
    // until it re-arms: a refused connect is retried, for up to 10 s. Connecting is
    // not timed.
    let connect = |_| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match dosp::client::Client::connect(&addr, Duration::from_secs(30)) {
                Ok(c) => return Ok(c),
                Err(ClientError::Connect { source, .. })
                    if source.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    let emit = |op: &str, c: usize, r: &Result<Rate, String>| match r {
        Ok(r) => {
            eprintln!(
                "  {op:<13} c={c:<3} {:>9.0} ops/s {:>8.1} MiB/s ({} ops, {:.1} s)",
                r.ops_s(),
                r.mib_s(),
                r.ops,
                r.secs
            );
            println!(
                "rate\t{op}\t{c}\t{}\t{}\t{}\t{}",
                r.ops, r.bytes, r.secs, r.server_cpu_s
            );
        }
        Err(e) => {
            let e = e.replace(['\t', '\n'], " ");
            eprintln!("  {op:<13} c={c:<3} not measured: {e}");
            println!("fail\t{op}\t{c}\t{e}");
        }
    };

    let base_small = data(seed ^ 0x44_0004, SMALL);
    for (k, &c) in clients.iter().enumerate() {
        let tag = TAG_STORE + k as u64;
        let tcp = TcpCounters::read();
        let r = load::run(
            c,
            budget,
            &cpu,
            |k| Ok((connect(k)?, base_small.clone())),
            |(client, o), i| {
                stamp(o, tag, i);
                let s = client.store_bytes(o).map_err(|e| e.to_string())?;
                if s.deduplicated {
                    return Err(format!("store {i} was deduplicated"));
                }
                Ok(o.len() as u64)
            },
        );
        emit("store 4 KiB", c, &r);
        tcp.report_since();
    }

    let base_large = data(seed ^ 0x44_0400, LARGE);
    let fps: Vec<Fingerprint> = (0..LARGE_OBJECTS)
        .map(|i| Fingerprint::of(&object(&base_large, TAG_LARGE, i)))
        .collect();
    let loaders = clients.iter().copied().max().unwrap_or(1).min(8);
    let untimed = Budget {
        secs: 600.0,
        ops_max: LARGE_OBJECTS,
    };
    let corpus = load::run(loaders, untimed, &|| 0.0, connect, |client, i| {
        let o = object(&base_large, TAG_LARGE, i);
        let s = client.store_bytes(&o).map_err(|e| e.to_string())?;
        if s.fingerprint != fps[i as usize] {
            return Err(format!("dosd named object {i} {}", s.fingerprint));
        }
        Ok(o.len() as u64)
    })
    .and_then(|stored| {
        if stored.ops == LARGE_OBJECTS {
            Ok(())
        } else {
            Err(format!("stored {} of {LARGE_OBJECTS} objects", stored.ops))
        }
    })
    .map_err(|e| format!("storing the fetch corpus: {e}"));
    let fetch_one = |client: &mut dosp::client::Client, i: u64| {
        let fp = fps[(i % LARGE_OBJECTS) as usize];
        dosd_fetch(client, &fp, None, LARGE as u64, verify)
    };
    for &c in &clients {
        let tcp = TcpCounters::read();
        let r = corpus
            .clone()
            .and_then(|()| load::run(c, budget, &cpu, connect, fetch_one));
        emit("fetch 4 MiB", c, &r);
        tcp.report_since();
    }
}

/// The client namespace's TCP counters (`/proc/net/snmp`, which shows the namespace
/// of the reading process): segments in, out, retransmitted. Printed with each
/// phase's progress line, to tell a lossy link from a slow server.
struct TcpCounters(Option<[u64; 3]>);

impl TcpCounters {
    fn read() -> TcpCounters {
        TcpCounters(Self::now())
    }

    fn now() -> Option<[u64; 3]> {
        let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next()?, tcp.next()?);
        let get = |key: &str| {
            let k = names.split_whitespace().position(|n| n == key)?;
            values.split_whitespace().nth(k)?.parse::<u64>().ok()
        };
        Some([get("InSegs")?, get("OutSegs")?, get("RetransSegs")?])
    }

    fn report_since(&self) {
        if let (Some(a), Some(b)) = (self.0, Self::now()) {
            eprintln!(
                "                client TCP: {} segments in, {} out, {} retransmitted",
                b[0] - a[0],
                b[1] - a[1],
                b[2] - a[2]
            );
        }
    }
}
