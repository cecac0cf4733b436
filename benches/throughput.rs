//! Store and fetch throughput of a real `dosd` over loopback, side by side with a peer
//! measured in the same run, and the cost of inline MD5 next to a plain MD5 loop.
//!
//! Run: `cargo bench --bench throughput` (DOSD_BENCH_SECS bounds each measurement,
//! default 3 s). Prints one table; ratios are dosd ÷ peer, so 1.00 means "as fast as
//! the thinnest possible server on the same disk and network".
//!
//! The peer: a minimal TCP server in this process that, per object, receives the bytes
//! into a file on the same filesystem as dosd's disks and fdatasyncs it before
//! acknowledging (durable, like a dosd STORE), and for fetch reads the file back and
//! sends it. No protocol, no hashing, no index: the ceiling the hardware gives.
//! `peer+md5` is the same peer computing the MD5 of what it receives, as dosd must:
//! the ratio against it is the cost of dosd's data path beyond hashing.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{data, Node};

use dosp::client::Client;
use dosp::Fingerprint;

fn bench_secs() -> f64 {
    std::env::var("DOSD_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0)
}

/// The peer: u64 op (0 store, 1 fetch), u64 id, u64 len, then data for a store; replies
/// one byte (store) or the data (fetch).
fn start_peer(dir: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind peer");
    let addr = listener.local_addr().expect("peer addr").to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let dir = dir.clone();
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let mut head = [0u8; 24];
                    if s.read_exact(&mut head).is_err() {
                        return;
                    }
                    let word = |i: usize| {
                        u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
                    };
                    let (op, id, len) = (word(0), word(1), word(2));
                    let path = dir.join(format!("obj{id}"));
                    if op == 0 || op == 2 {
                        let mut f = std::fs::File::create(&path).expect("peer file");
                        let mut md5 = (op == 2).then(<md5::Md5 as md5::Digest>::new);
                        let mut left = len as usize;
                        while left > 0 {
                            let n = left.min(buf.len());
                            if s.read_exact(&mut buf[..n]).is_err() {
                                return;
                            }
                            if let Some(m) = md5.as_mut() {
                                md5::Digest::update(m, &buf[..n]);
                            }
                            f.write_all(&buf[..n]).expect("peer write");
                            left -= n;
                        }
                        if let Some(m) = md5 {
                            std::hint::black_box(md5::Digest::finalize(m));
                        }
                        f.sync_data().expect("peer fdatasync");
                        if s.write_all(&[1]).is_err() {
                            return;
                        }
                    } else {
                        let mut f = std::fs::File::open(&path).expect("peer open");
                        loop {
                            let n = f.read(&mut buf).expect("peer read");
                            if n == 0 {
                                break;
                            }
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

struct Rate {
    ops: u64,
    bytes: u64,
    secs: f64,
}

impl Rate {
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / self.secs / (1 << 20) as f64
    }
    fn ops_s(&self) -> f64 {
        self.ops as f64 / self.secs
    }
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
    }
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: keep that quick.
    if !std::env::args().any(|a| a == "--bench") {
        println!("throughput: run with `cargo bench --bench throughput`");
        return;
    }
    let tmp = tempfile::tempdir_in(std::env::var("DOSD_BENCH_DIR").unwrap_or_else(|_| ".".into()))
        .expect("tempdir");
    let dosd = Node::start_bare(
        &tmp.path().join("dosd"),
        "239.255.73.99:27371",
        &["--disks", "2", "--disk-size", "2G"],
    );
    let peer_dir = tmp.path().join("peer");
    std::fs::create_dir_all(&peer_dir).expect("peer dir");
    let peer_addr = start_peer(peer_dir);
    let mut client =
        Client::connect(&dosd.node_arg(), Duration::from_secs(30)).expect("connect dosd");
    let mut peer = TcpStream::connect(&peer_addr).expect("connect peer");
    peer.set_nodelay(true).expect("nodelay");

    println!(
        "dosd throughput over loopback, {} s per measurement, {}",
        bench_secs(),
        chrono_free_date()
    );
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
                let mut head = Vec::with_capacity(24);
                for w in [op, i, size as u64] {
                    head.extend_from_slice(&w.to_le_bytes());
                }
                peer.write_all(&head).expect("peer head");
                peer.write_all(o).expect("peer data");
                let mut ack = [0u8; 1];
                peer.read_exact(&mut ack).expect("peer ack");
            })
        };
        let peer_store_md5 = peer_store_op(2);
        let peer_store = peer_store_op(0);
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
            let mut head = Vec::with_capacity(24);
            for w in [1u64, i % peer_stored, size as u64] {
                head.extend_from_slice(&w.to_le_bytes());
            }
            peer.write_all(&head).expect("peer head");
            peer.read_exact(&mut buf).expect("peer data");
        });
        for (op, d, p) in [
            ("store", &store, &peer_store),
            ("store", &store, &peer_store_md5),
            ("fetch", &fetch, &peer_fetch),
        ] {
            let peer_name = if std::ptr::eq(p, &peer_store_md5) {
                "peer+md5"
            } else {
                "peer"
            };
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
    md5_inline_vs_plain();
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
