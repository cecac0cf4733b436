//! Store and fetch throughput of a real `dosd` over loopback, side by side with its
//! peers measured in the same run, and the cost of inline MD5 next to a plain MD5 loop.
//!
//! Run: `cargo bench --bench throughput` (see benches/README.md). Several parts, each
//! printing its own table; DOSD_BENCH_PARTS (default `single,side,md5,loops,http`)
//! picks some.
//! Ratios are dosd ÷ peer, so 1.00 means "as fast as the peer on the same disk and
//! network".
//!
//! - `single`: one client, one request at a time, against the durable peer
//!   ([`peer`]): the thinnest durable TCP server, which writes each object to a file on
//!   the same filesystem as dosd's disks and fdatasyncs it before acknowledging, and
//!   for fetch reads the file back and sends it. `peer+md5` is the same peer computing
//!   the MD5 of what it receives, as dosd must: the ratio against it is the cost of
//!   dosd's data path beyond hashing.
//! - `side`: 1, 8 and 64 concurrent clients ([`side_by_side`]): durable 4 KiB stores
//!   against the durable peer, and 4 KiB, 4 MiB and 64 KiB-range fetches against nginx,
//!   warm and cold, with both servers' CPU seconds per GB.
//! - `md5`: the store's inline MD5 path against a plain MD5 loop.
//! - `loops`: 4 MiB STOREs and warm 4 KiB fetches at 8 clients with one dataplane
//!   loop and with two ([`loops`]), beside the single-core MD5 ceiling of
//!   `openssl speed`.
//! - `http`: GETs of 4 KiB and 4 MiB objects through signed URLs, dosd against nginx
//!   with `secure_link`, both driven by `wrk` at 1, 8 and 64 connections, with both
//!   servers' CPU seconds per GB ([`signed_http`]).
//! - `dpdk-port` (with `--features dpdk`): the project's DPDK port layer forwarding
//!   between two `net_ring` ports next to `dpdk-testpmd --forward-mode=io` with the
//!   same EAL arguments ([`testpmd`]).
//! - `dpdk-dosp` (with `--features dpdk`, as root): 4 KiB STOREs and 4 MiB fetches
//!   through `dosd --net dpdk` on a `net_tap` next to `dosd` on the kernel backend
//!   over a veth pair, client and node ends in network namespaces ([`net_dpdk`]).
//!
//! `dpdk` names both DPDK parts; built with the `dpdk` feature they are in the default
//! set.
//!
//! Every measurement is bounded by DOSD_BENCH_SECS (default 3 s) and an operation
//! count; nothing here asserts a time.

mod child;
#[path = "../../tests/common/mod.rs"]
mod common;
mod http;
mod load;
mod loops;
mod net_dpdk;
mod nginx;
mod peer;
mod side_by_side;
mod signed_http;
mod testpmd;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{data, unique_group, Node};

use dosp::client::Client;
use dosp::Fingerprint;
use load::Rate;
use peer::{Peer, PeerConn, OP_STORE, OP_STORE_MD5};

fn bench_secs() -> f64 {
    std::env::var("DOSD_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0)
}

/// Runs `op(i)` repeatedly for about `secs` (at least `min_ops` times, at most `max_ops`).
fn measure(size: usize, min_ops: u64, max_ops: u64, mut op: impl FnMut(u64)) -> Rate {
    let t = Instant::now();
    let mut ops = 0;
    while ops < max_ops && (ops < min_ops || t.elapsed().as_secs_f64() < bench_secs()) {
        op(ops);
        ops += 1;
    }
    Rate {
        ops,
        bytes: ops * size as u64,
        secs: t.elapsed().as_secs_f64(),
        server_cpu_s: 0.0,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(peer::PEER_ARG) {
        let dir = args.get(2).expect("--durable-peer DIR");
        peer::serve(dir.into());
        return;
    }
    // The DPDK parts' children: this binary re-run as the port layer's forwarder, or
    // as a client inside a network namespace.
    if args.get(1).map(String::as_str) == Some(testpmd::FWD_ARG) {
        testpmd::forward_main(&args[2..]);
        return;
    }
    if args.get(1).map(String::as_str) == Some(net_dpdk::CLIENT_ARG) {
        net_dpdk::client_main(&args[2..]);
        return;
    }
    // `cargo test --benches` runs this with --bench absent: keep that quick.
    if !args.iter().any(|a| a == "--bench") {
        println!("throughput: run with `cargo bench --bench throughput`");
        return;
    }
    let default_parts = if cfg!(feature = "dpdk") {
        "single,side,md5,loops,http,dpdk"
    } else {
        "single,side,md5,loops,http"
    };
    let parts = std::env::var("DOSD_BENCH_PARTS").unwrap_or_else(|_| default_parts.into());
    let part = |name: &str| parts.split(',').any(|p| p.trim() == name);
    // `dpdk` names both DPDK parts.
    let dpdk_part = |name: &str| part(name) || part("dpdk");
    let tmp = tempfile::tempdir_in(std::env::var("DOSD_BENCH_DIR").unwrap_or_else(|_| ".".into()))
        .expect("tempdir");
    println!(
        "dosd throughput over loopback, {} s per measurement, {} ({}), {} cores",
        bench_secs(),
        chrono_free_date(),
        git_head(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    if part("single") {
        single_client(tmp.path());
    }
    if part("side") {
        side_by_side::run(&side_by_side::Config::from_env(bench_secs()), tmp.path());
    }
    if part("md5") {
        md5_inline_vs_plain();
    }
    if part("loops") {
        loops::run(&side_by_side::Config::from_env(bench_secs()), tmp.path());
    }
    if part("http") {
        signed_http::run(&signed_http::Config::from_env(), tmp.path());
    }
    if dpdk_part("dpdk-port") {
        testpmd::run(bench_secs());
    }
    if dpdk_part("dpdk-dosp") {
        net_dpdk::run(&side_by_side::Config::from_env(bench_secs()), tmp.path());
    }
}

/// The single-client table: dosd against the durable peer, one request at a time.
fn single_client(tmp: &Path) {
    let dosd = Node::start_bare(
        &tmp.join("dosd"),
        &unique_group(),
        &["--disks", "2", "--disk-size", "2G"],
    );
    let peer_dir = tmp.join("peer");
    std::fs::create_dir_all(&peer_dir).expect("peer dir");
    let peer_server = Peer::start(&peer_dir);
    let mut client =
        Client::connect(&dosd.node_arg(), Duration::from_secs(30)).expect("connect dosd");
    let mut peer = PeerConn::connect(&peer_server.addr).expect("connect peer");

    println!();
    println!(
        "{:<16} {:<9} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "operation", "against", "dosd MiB/s", "dosd ops/s", "peer MiB/s", "peer ops/s", "ratio"
    );
    for (label, size, max_ops) in [("4 KiB", 4096usize, 20_000u64), ("4 MiB", 4 << 20, 300)] {
        // Distinct objects (no dedup): each op stores fresh bytes.
        let base = data(size as u64, size);
        let object = |i: u64| {
            let mut o = base.clone();
            o[..8].copy_from_slice(&i.to_le_bytes());
            o
        };
        let objects: Vec<Vec<u8>> = (0..max_ops.min(64)).map(object).collect();
        let mut fps: Vec<Fingerprint> = Vec::new();
        let store = measure(size, 5, max_ops, |i| {
            let mut o = objects[(i % objects.len() as u64) as usize].clone();
            o[8..16].copy_from_slice(&i.to_le_bytes());
            fps.push(client.store_bytes(&o).expect("dosd store").fingerprint);
        });
        let mut peer_store_op = |op: u64| {
            measure(size, 5, max_ops, |i| {
                let o = &objects[(i % objects.len() as u64) as usize];
                peer.store(op, i, o).expect("peer store");
            })
        };
        let peer_store_md5 = peer_store_op(OP_STORE_MD5);
        let peer_store = peer_store_op(OP_STORE);
        let stored = fps.len() as u64;
        let peer_stored = peer_store.ops;
        let fetch = measure(size, 5, max_ops, |i| {
            let fp = fps[(i % stored) as usize];
            client
                .retrieve(&fp, &mut std::io::sink(), &mut |_, _| {})
                .expect("dosd fetch");
        });
        let mut buf = vec![0u8; size];
        let peer_fetch = measure(size, 5, max_ops, |i| {
            peer.fetch(i % peer_stored, &mut buf).expect("peer fetch");
        });
        for (op, d, p, peer_name) in [
            ("store", &store, &peer_store, "peer"),
            ("store", &store, &peer_store_md5, "peer+md5"),
            ("fetch", &fetch, &peer_fetch, "peer"),
        ] {
            println!(
                "{:<16} {:<9} {:>12.1} {:>12.0} {:>12.1} {:>12.0} {:>8.2}",
                format!("{op} {label}"),
                peer_name,
                d.mib_s(),
                d.ops_s(),
                p.mib_s(),
                p.ops_s(),
                d.mib_s() / p.mib_s()
            );
        }
    }
}

/// The commit measured, as `git describe` would name it (empty outside a checkout).
fn git_head() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn chrono_free_date() -> String {
    Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// MD5 of the inline path next to a plain `md-5` loop over the same bytes.
///
/// "inline" is the store's real write path: `Store::append` copies each 4 KiB slice
/// into the aligned segment buffer and hashes (MD5) and checksums (CRC-32C) it while it
/// is in cache, then writes full segments through io_uring to a file-backed disk on
/// tmpfs (so the device costs nothing and what is left is the data path itself), and
/// `commit` flushes. The gap between the two rows is the cost of the data path beyond
/// hashing.
fn md5_inline_vs_plain() {
    use md5::{Digest, Md5};
    let size = 64 << 20;
    let src = data(1, size);
    let rounds = 4;

    let t = Instant::now();
    let mut plain = Fingerprint::ZERO;
    for _ in 0..rounds {
        plain = Fingerprint(Md5::digest(&src).into());
    }
    let plain_s = t.elapsed().as_secs_f64();

    let mut dst = nvme::AlignedBuf::new(1 << 20);
    let t = Instant::now();
    for _ in 0..rounds {
        for piece in src.chunks(dst.len()) {
            dst[..piece.len()].copy_from_slice(piece);
        }
    }
    let copy_s = t.elapsed().as_secs_f64();
    std::hint::black_box(&dst[..]);

    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("tempdir");
    let dev =
        nvme::file::FileDevice::open(&dir.path().join("disk.img"), 512 << 20).expect("tmpfs disk");
    let mut store = dataplane::store::Store::open(
        vec![Box::new(dev)],
        dataplane::store::StoreConfig::default(),
        1,
    )
    .expect("open store");
    let t = Instant::now();
    let mut inline = Fingerprint::ZERO;
    for _ in 0..rounds {
        let w = store.begin().expect("begin");
        for piece in src.chunks(1 << 20) {
            store.append(w, piece).expect("append");
        }
        inline = store.commit(w).expect("commit").fingerprint;
        // Drop it again so every round stores (not deduplicates) the object; the
        // 512 MiB disk holds all rounds without compaction.
        store.delete(&inline).expect("delete");
    }
    let inline_s = t.elapsed().as_secs_f64();
    assert_eq!(plain, inline, "the store's inline MD5 must equal plain MD5");

    let mib = (size * rounds) as f64 / (1 << 20) as f64;
    println!();
    println!("{:<36} {:>10}", "MD5 path (64 MiB object x 4)", "MiB/s");
    println!("{:<36} {:>10.0}", "plain md-5 loop", mib / plain_s);
    println!("{:<36} {:>10.0}", "copy only", mib / copy_s);
    println!(
        "{:<36} {:>10.0}",
        "store append+commit (inline md5)",
        mib / inline_s
    );
    println!("{:<36} {:>10.2}", "inline / plain", plain_s / inline_s);
}
