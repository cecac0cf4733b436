//! The side-by-side table: dosd against its peer at several client counts, in the same
//! run, driven by the same load generator ([`super::load`]).
//!
//! - `store 4 KiB`: durable stores, dosd against the durable peer ([`super::peer`]).
//! - `fetch 4 KiB`, `fetch 4 MiB`, `range 64 KiB`: dosd against nginx serving the same
//!   bytes as files ([`super::nginx`]); ranges are HTTP Range requests at 64 KiB-aligned
//!   offsets of the 4 MiB objects. Neither client hashes what it receives: dosd's
//!   whole objects come as a RETRIEVE_RANGE over the whole object, which the node
//!   serves by the same path as a RETRIEVE (`dataplane/src/server/session.rs`), and
//!   every reply is checked for its length. On a 2-core machine a client computing
//!   MD5 (~600 MiB/s per core) would cap both servers alike and hide the difference.
//!   DOSD_BENCH_VERIFY=1 turns verification on for both: RETRIEVE with the DOSP
//!   client's own MD5 check for dosd, the same MD5 check on the HTTP body for nginx.
//!
//! Each fetch row is measured twice. *Warm*: every object was fetched once before the
//! clock starts, and the phase cycles over them. *Cold*: dosd freshly restarted, the
//! page cache dropped (`echo 1 > /proc/sys/vm/drop_caches`, after `sync`) before each
//! side's phase, and no object (or range) fetched twice within the phase.
//!
//! Every phase is bounded by DOSD_BENCH_SECS and DOSD_BENCH_OPS_MAX; all object bytes
//! and orders come from DOSD_BENCH_SEED.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use dosp::client::Client;
use dosp::Fingerprint;

use super::common::{data, unique_group, Node};
use super::http::HttpClient;
use super::load::{self, process_cpu_s, Budget, Rate};
use super::nginx::{self, Nginx};
use super::peer::{Peer, PeerConn, OP_STORE};

/// The promises this table checks, as dosd ÷ peer ops/s for durable 4 KiB stores, by
/// client count (set by the group-commit issue). Printed in the `goal` column.
const STORE_GOALS: &[(usize, f64)] = &[(1, 0.9), (64, 4.0)];

const SMALL: usize = 4 << 10;
const LARGE: usize = 4 << 20;
const RANGE: u64 = 64 << 10;

/// A list of positive counts from `$name` (`1,8,64`), or `default` when it is unset
/// or holds none.
pub(super) fn env_counts(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|c| c.trim().parse().ok())
                .filter(|&c| c > 0)
                .collect::<Vec<usize>>()
        })
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

pub(super) fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The knobs, all from the environment (see benches/README.md).
#[derive(Debug, Clone)]
pub struct Config {
    pub budget: Budget,
    pub clients: Vec<usize>,
    pub seed: u64,
    pub small_objects: usize,
    pub large_objects: usize,
    pub nginx: bool,
    pub nginx_workers: usize,
    pub cold: bool,
    /// Whole-object fetches check the MD5 on both sides (the DOSP client's RETRIEVE).
    /// Off by default: on two cores the generator's MD5 would cap both servers alike.
    pub verify: bool,
}

impl Config {
    pub fn from_env(secs: f64) -> Config {
        let clients = env_counts("DOSD_BENCH_CLIENTS", &[1, 8, 64]);
        Config {
            budget: Budget {
                secs,
                ops_max: env_or("DOSD_BENCH_OPS_MAX", 200_000),
            },
            clients,
            seed: env_or("DOSD_BENCH_SEED", 1),
            small_objects: env_or("DOSD_BENCH_SMALL_OBJECTS", 16_384).max(1),
            large_objects: env_or("DOSD_BENCH_LARGE_OBJECTS", 128).max(1),
            nginx: env_or("DOSD_BENCH_NGINX", 1) != 0,
            nginx_workers: env_or("DOSD_BENCH_NGINX_WORKERS", 1).max(1),
            cold: env_or("DOSD_BENCH_COLD", 1) != 0,
            verify: env_or("DOSD_BENCH_VERIFY", 0) != 0,
        }
    }
}

/// One line of the table.
struct Row {
    op: &'static str,
    clients: usize,
    cache: &'static str,
    peer: String,
    dosd: Result<Rate, String>,
    other: Result<Rate, String>,
}

/// dosd, restartable on the same data directory (a restart is its cold cache).
pub(super) struct Dosd {
    dir: PathBuf,
    group: String,
    args: Vec<String>,
    node: Node,
}

/// The size of each of dosd's two file-backed disks in this table.
const DISK_SIZE: &str = "3G";

impl Dosd {
    /// dosd on `dir` with 2 file-backed disks of `disk_size` and the `extra` flags.
    pub(super) fn start_with(dir: PathBuf, disk_size: &str, extra: &[&str]) -> Dosd {
        let group = unique_group();
        let args: Vec<String> = ["--disks", "2", "--disk-size", disk_size]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect();
        let node = Node::start_bare(&dir, &group, &Self::argv(&args));
        Dosd {
            dir,
            group,
            args,
            node,
        }
    }

    fn start(dir: PathBuf) -> Dosd {
        Dosd::start_with(dir, DISK_SIZE, &[])
    }

    fn argv(args: &[String]) -> Vec<&str> {
        args.iter().map(String::as_str).collect()
    }

    /// SIGTERM, and wait for a clean exit.
    pub(super) fn stop(&mut self) {
        assert_eq!(self.node.terminate(), Some(0), "dosd did not stop cleanly");
    }

    fn restart(&mut self) {
        self.stop();
        self.node = Node::start_bare(&self.dir, &self.group, &Self::argv(&self.args));
    }

    fn addr(&self) -> String {
        self.node.node_arg()
    }

    pub(super) fn cpu_s(&self) -> f64 {
        process_cpu_s(self.node.child.id())
    }

    /// Where it serves signed URLs, if started with `--http-listen`.
    pub(super) fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.node.http
    }

    pub(super) fn connect(&self) -> Result<Client, String> {
        Client::connect(&self.addr(), Duration::from_secs(30)).map_err(|e| e.to_string())
    }
}

/// Object `i` of a family: the family's seeded base bytes with (`tag`, `i`) stamped
/// into the first 16 bytes, so every object is distinct (no deduplication) and can be
/// made again from its number alone.
pub(super) fn object(base: &[u8], tag: u64, i: u64) -> Vec<u8> {
    let mut o = base.to_vec();
    stamp(&mut o, tag, i);
    o
}

/// Turns a family's base bytes (or any object of the family) into object `i` in place.
pub(super) fn stamp(o: &mut [u8], tag: u64, i: u64) {
    o[..8].copy_from_slice(&tag.to_le_bytes());
    o[8..16].copy_from_slice(&i.to_le_bytes());
}

/// The objects both fetch peers serve.
struct Corpus {
    small: Vec<Fingerprint>,
    large: Vec<Fingerprint>,
    /// (index into `large`, offset) of every 64 KiB range, in a seeded order.
    ranges: Vec<(usize, u64)>,
    /// Seeded fetch orders of `small` and `large`.
    small_order: Vec<usize>,
    large_order: Vec<usize>,
}

const TAG_CORPUS_SMALL: u64 = 1;
const TAG_CORPUS_LARGE: u64 = 2;
/// Store phases use tags from here up, one per phase.
const TAG_STORES: u64 = 16;

/// Writes the corpus as files named by fingerprint into `www` (then `sync`s, so a
/// dropped page cache really is cold) and stores the same bytes into dosd, checking
/// that dosd names each object as the local MD5 does.
fn build_corpus(cfg: &Config, dosd: &Dosd, www: &Path) -> Corpus {
    std::fs::create_dir_all(www).expect("docroot");
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let base_small = data(cfg.seed ^ 0x5, SMALL);
    let base_large = data(cfg.seed ^ 0x4_0000, LARGE);
    let mut families = Vec::new();
    for (tag, base, count) in [
        (TAG_CORPUS_SMALL, &base_small, cfg.small_objects),
        (TAG_CORPUS_LARGE, &base_large, cfg.large_objects),
    ] {
        let fps: Vec<Fingerprint> = (0..count as u64)
            .map(|i| {
                let o = object(base, tag, i);
                let fp = Fingerprint::of(&o);
                std::fs::write(www.join(fp.to_hex()), &o).expect("write docroot file");
                fp
            })
            .collect();
        let clients = if base.len() == SMALL { 8 } else { 4 };
        let budget = Budget {
            secs: 600.0,
            ops_max: count as u64,
        };
        load::run(
            clients,
            budget,
            &|| 0.0,
            |_| dosd.connect(),
            |c, i| {
                let o = object(base, tag, i);
                let got = c.store_bytes(&o).map_err(|e| e.to_string())?;
                if got.fingerprint != fps[i as usize] {
                    return Err(format!("dosd named object {i} {}", got.fingerprint));
                }
                Ok(o.len() as u64)
            },
        )
        .expect("load the corpus into dosd");
        families.push(fps);
    }
    let large = families.pop().unwrap_or_default();
    let small = families.pop().unwrap_or_default();
    let mut small_order: Vec<usize> = (0..small.len()).collect();
    small_order.shuffle(&mut rng);
    let mut large_order: Vec<usize> = (0..large.len()).collect();
    large_order.shuffle(&mut rng);
    let mut ranges: Vec<(usize, u64)> = (0..large.len())
        .flat_map(|k| (0..LARGE as u64 / RANGE).map(move |r| (k, r * RANGE)))
        .collect();
    ranges.shuffle(&mut rng);
    sync();
    Corpus {
        small,
        large,
        ranges,
        small_order,
        large_order,
    }
}

fn sync() {
    let _ = std::process::Command::new("sync").status();
}

/// Writes back dirty pages and drops the clean ones, so the next reads go to the disk.
fn drop_caches() -> Result<(), String> {
    sync();
    std::fs::write("/proc/sys/vm/drop_caches", "1")
        .map_err(|e| format!("cannot drop the page cache ({e}); cold nginx rows skipped"))
}

/// What a fetch phase asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetch {
    Small,
    Large,
    Range,
}

impl Fetch {
    fn label(self) -> &'static str {
        match self {
            Fetch::Small => "fetch 4 KiB",
            Fetch::Large => "fetch 4 MiB",
            Fetch::Range => "range 64 KiB",
        }
    }

    fn object_len(self) -> u64 {
        match self {
            Fetch::Small => SMALL as u64,
            Fetch::Large | Fetch::Range => LARGE as u64,
        }
    }

    fn items(self, c: &Corpus) -> usize {
        match self {
            Fetch::Small => c.small_order.len(),
            Fetch::Large => c.large_order.len(),
            Fetch::Range => c.ranges.len(),
        }
    }

    /// Item `k` of this phase's order: (fingerprint, range if any).
    fn item(self, c: &Corpus, k: usize) -> (Fingerprint, Option<(u64, u64)>) {
        match self {
            Fetch::Small => (c.small[c.small_order[k]], None),
            Fetch::Large => (c.large[c.large_order[k]], None),
            Fetch::Range => {
                let (obj, offset) = c.ranges[k];
                (c.large[obj], Some((offset, RANGE)))
            }
        }
    }
}

/// A fetch from dosd with the DOSP client. Verified, a whole object is a RETRIEVE,
/// which the client checks against the fingerprint; unverified (the default) it is a
/// RETRIEVE_RANGE over the whole object, which the node serves by the same path.
pub(super) fn dosd_fetch(
    c: &mut Client,
    fp: &Fingerprint,
    range: Option<(u64, u64)>,
    object_len: u64,
    verify: bool,
) -> Result<u64, String> {
    let mut sink = std::io::sink();
    let got = match range {
        None if verify => c.retrieve(fp, &mut sink, &mut |_, _| {}),
        None => c.retrieve_range(fp, 0, object_len, &mut sink),
        Some((offset, len)) => c.retrieve_range(fp, offset, len, &mut sink),
    }
    .map_err(|e| e.to_string())?;
    expect_len(got, range.map_or(object_len, |(_, len)| len))
}

fn expect_len(got: u64, want: u64) -> Result<u64, String> {
    if got == want {
        Ok(got)
    } else {
        Err(format!("expected {want} bytes, got {got}"))
    }
}

/// The same fetch from nginx; verified, a whole object is checked against its MD5 as
/// the DOSP client checks dosd's, so the generator does the same work for both.
fn http_fetch(
    c: &mut HttpClient,
    fp: &Fingerprint,
    range: Option<(u64, u64)>,
    object_len: u64,
    verify: bool,
) -> Result<u64, String> {
    use md5::{Digest, Md5};
    let path = format!("/{}", fp.to_hex());
    if range.is_some() || !verify {
        let got = c.get(&path, range, &mut |_| {})?;
        return expect_len(got, range.map_or(object_len, |(_, len)| len));
    }
    let mut md5 = Md5::new();
    let n = c.get(&path, None, &mut |piece| md5.update(piece))?;
    let got = Fingerprint(md5.finalize().into());
    if got != *fp {
        return Err(format!("nginx sent {path} with MD5 {got}"));
    }
    Ok(n)
}

/// One timed (or warming) pass of fetches.
#[derive(Debug, Clone, Copy)]
struct Phase {
    kind: Fetch,
    clients: usize,
    budget: Budget,
    /// Each item once, in order (cold); otherwise cycling over all items (warm).
    once: bool,
    verify: bool,
}

/// Runs `phase` against dosd (`nginx` None) or nginx.
fn fetch_phase(
    phase: Phase,
    corpus: &Corpus,
    dosd: &Dosd,
    nginx: Option<&Nginx>,
) -> Result<Rate, String> {
    let Phase {
        kind,
        clients,
        budget,
        once,
        verify,
    } = phase;
    let items = kind.items(corpus);
    let budget = Budget {
        ops_max: if once {
            budget.ops_max.min(items as u64)
        } else {
            budget.ops_max
        },
        ..budget
    };
    let pick = |i: u64| kind.item(corpus, (i % items as u64) as usize);
    let object_len = kind.object_len();
    match nginx {
        None => load::run(
            clients,
            budget,
            &|| dosd.cpu_s(),
            |_| dosd.connect(),
            |c, i| {
                let (fp, range) = pick(i);
                dosd_fetch(c, &fp, range, object_len, verify)
            },
        ),
        Some(n) => load::run(
            clients,
            budget,
            &|| n.cpu_s(),
            |_| HttpClient::connect(&n.addr),
            |c, i| {
                let (fp, range) = pick(i);
                http_fetch(c, &fp, range, object_len, verify)
            },
        ),
    }
}

pub(super) fn progress(what: &str, clients: usize, side: &str, r: &Result<Rate, String>) {
    match r {
        Ok(r) => eprintln!(
            "  {what:<13} c={clients:<3} {side:<7} {:>9.0} ops/s {:>8.1} MiB/s ({} ops, {:.1} s)",
            r.ops_s(),
            r.mib_s(),
            r.ops,
            r.secs
        ),
        Err(e) => eprintln!("  {what:<13} c={clients:<3} {side:<7} not measured: {e}"),
    }
}

/// Runs every phase and prints the table.
pub fn run(cfg: &Config, tmp: &Path) {
    eprintln!("side by side: {cfg:?}");
    let mut dosd = Dosd::start(tmp.join("dosd2"));
    let peer_dir = tmp.join("peer2");
    std::fs::create_dir_all(&peer_dir).expect("peer dir");
    let peer = Peer::start(&peer_dir);
    let mut rows: Vec<Row> = Vec::new();

    // Durable 4 KiB stores: fresh, distinct objects on both sides.
    let base = data(cfg.seed ^ 0x57, SMALL);
    for (n, &clients) in cfg.clients.iter().enumerate() {
        let tag = TAG_STORES + n as u64;
        let d = load::run(
            clients,
            cfg.budget,
            &|| dosd.cpu_s(),
            |_| dosd.connect(),
            |c, i| {
                let o = object(&base, tag, i);
                let s = c.store_bytes(&o).map_err(|e| e.to_string())?;
                if s.deduplicated {
                    return Err(format!("store {i} was deduplicated"));
                }
                Ok(o.len() as u64)
            },
        );
        progress("store 4 KiB", clients, "dosd", &d);
        let p = load::run(
            clients,
            cfg.budget,
            &|| peer.cpu_s(),
            |_| PeerConn::connect(&peer.addr),
            |c, i| {
                let o = object(&base, tag, i);
                c.store(OP_STORE, (tag << 40) | i, &o)?;
                Ok(o.len() as u64)
            },
        );
        progress("store 4 KiB", clients, "peer", &p);
        rows.push(Row {
            op: "store 4 KiB",
            clients,
            cache: "—",
            peer: "durable peer".into(),
            dosd: d,
            other: p,
        });
    }
    drop(peer);

    eprintln!(
        "  writing the fetch corpus: {} × 4 KiB and {} × 4 MiB objects",
        cfg.small_objects, cfg.large_objects
    );
    let corpus = build_corpus(cfg, &dosd, &tmp.join("www"));

    let nginx_bin = if cfg.nginx {
        nginx::find_or_install()
    } else {
        Err("DOSD_BENCH_NGINX=0".into())
    };
    let nginx = nginx_bin.clone().and_then(|bin| {
        Nginx::start(
            &bin,
            &tmp.join("nginx"),
            &tmp.join("www"),
            cfg.nginx_workers,
        )
    });
    let peer_name = match &nginx_bin {
        Ok(bin) => Nginx::version(bin),
        Err(_) => "nginx".into(),
    };
    // A missing nginx is never silent: every nginx cell says n/a with this reason.
    let nginx = nginx.map_err(|e| format!("nginx rows skipped: {e}"));
    if let Err(e) = &nginx {
        eprintln!("{e}");
    }
    let can_drop = if cfg.cold { drop_caches() } else { Ok(()) };
    if let Err(e) = &can_drop {
        eprintln!("{e}");
    }

    for kind in [Fetch::Small, Fetch::Large, Fetch::Range] {
        let label = kind.label();
        let phase = |clients: usize, once: bool| Phase {
            kind,
            clients,
            budget: cfg.budget,
            once,
            verify: cfg.verify,
        };
        let mut cold: Vec<(Result<Rate, String>, Result<Rate, String>)> = Vec::new();
        if cfg.cold {
            for &clients in &cfg.clients {
                dosd.restart();
                // dosd reads its disks with O_DIRECT; the drop is for fairness only.
                let _ = drop_caches();
                let d = fetch_phase(phase(clients, true), &corpus, &dosd, None);
                progress(label, clients, "dosd c", &d);
                let n = match (&nginx, &can_drop) {
                    (Err(e), _) | (Ok(_), Err(e)) => Err(e.clone()),
                    (Ok(n), Ok(())) => drop_caches()
                        .and_then(|()| fetch_phase(phase(clients, true), &corpus, &dosd, Some(n))),
                };
                progress(label, clients, "nginx c", &n);
                cold.push((d, n));
            }
        }
        // Warm: every item fetched once, untimed, on both sides.
        let everything = Phase {
            budget: Budget {
                secs: 600.0,
                ops_max: kind.items(&corpus) as u64,
            },
            ..phase(8, true)
        };
        fetch_phase(everything, &corpus, &dosd, None).expect("warm dosd");
        if let Ok(n) = &nginx {
            fetch_phase(everything, &corpus, &dosd, Some(n)).expect("warm nginx");
        }
        for (k, &clients) in cfg.clients.iter().enumerate() {
            let d = fetch_phase(phase(clients, false), &corpus, &dosd, None);
            progress(label, clients, "dosd w", &d);
            let n = match &nginx {
                Ok(n) => fetch_phase(phase(clients, false), &corpus, &dosd, Some(n)),
                Err(e) => Err(e.clone()),
            };
            progress(label, clients, "nginx w", &n);
            rows.push(Row {
                op: label,
                clients,
                cache: "warm",
                peer: peer_name.clone(),
                dosd: d,
                other: n,
            });
            if let Some((d, n)) = cold.get(k) {
                rows.push(Row {
                    op: label,
                    clients,
                    cache: "cold",
                    peer: peer_name.clone(),
                    dosd: d.clone(),
                    other: n.clone(),
                });
            }
        }
    }
    drop(nginx);
    println!();
    println!(
        "side by side: {} s or {} ops per phase; nginx worker_processes {}; \
         whole-object fetches MD5-verified by the client on both sides: {}",
        cfg.budget.secs,
        cfg.budget.ops_max,
        cfg.nginx_workers,
        if cfg.verify { "yes" } else { "no" }
    );
    print_table(&rows);
}

/// Three significant digits, the precision these machines deserve.
pub(super) fn sig3(x: f64) -> String {
    if !x.is_finite() {
        return "—".into();
    }
    let digits = if x >= 100.0 {
        0
    } else if x >= 10.0 {
        1
    } else if x >= 1.0 {
        2
    } else {
        3
    };
    format!("{x:.digits$}")
}

fn print_table(rows: &[Row]) {
    let header = [
        "operation",
        "clients",
        "cache",
        "dosd ops/s",
        "dosd MiB/s",
        "peer",
        "peer ops/s",
        "peer MiB/s",
        "dosd ÷ peer",
        "goal",
        "dosd CPU-s/GB",
        "peer CPU-s/GB",
    ];
    let right = [
        false, true, false, true, true, false, true, true, true, true, true, true,
    ];
    let dash = || "—".to_string();
    let mut cells: Vec<Vec<String>> = Vec::new();
    for r in rows {
        let (d_ops, d_mib, d_cpu) = match &r.dosd {
            Ok(d) => (
                format!("{:.0}", d.ops_s()),
                sig3(d.mib_s()),
                sig3(d.cpu_s_per_gb()),
            ),
            Err(_) => ("n/a".into(), "n/a".into(), "n/a".into()),
        };
        let (p_ops, p_mib, p_cpu) = match &r.other {
            Ok(p) => (
                format!("{:.0}", p.ops_s()),
                sig3(p.mib_s()),
                sig3(p.cpu_s_per_gb()),
            ),
            Err(_) => ("n/a".into(), "n/a".into(), "n/a".into()),
        };
        let ratio = match (&r.dosd, &r.other) {
            (Ok(d), Ok(p)) => format!("{:.2}×", d.ops_s() / p.ops_s()),
            _ => dash(),
        };
        let goal = if r.op.starts_with("store") {
            STORE_GOALS
                .iter()
                .find(|(c, _)| *c == r.clients)
                .map(|(_, g)| format!("≥ {g}×"))
                .unwrap_or_else(dash)
        } else {
            dash()
        };
        cells.push(vec![
            r.op.to_string(),
            r.clients.to_string(),
            r.cache.to_string(),
            d_ops,
            d_mib,
            r.peer.clone(),
            p_ops,
            p_mib,
            ratio,
            goal,
            d_cpu,
            p_cpu,
        ]);
    }
    markdown_table(&header, &right, &cells);
    // Why cells say n/a: each reason once, with how many cells it covers.
    let mut missing: Vec<(String, usize)> = Vec::new();
    for res in rows.iter().flat_map(|r| [&r.dosd, &r.other]) {
        if let Err(e) = res {
            let e = e.lines().next().unwrap_or_default().to_string();
            match missing.iter_mut().find(|(m, _)| *m == e) {
                Some((_, n)) => *n += 1,
                None => missing.push((e, 1)),
            }
        }
    }
    for (e, n) in missing {
        println!("  n/a ({n} cells): {e}");
    }
}

/// Prints `cells` under `header` as a Markdown table, padded to line up; columns
/// with `right[k]` set are right-aligned (numbers).
pub(super) fn markdown_table(header: &[&str], right: &[bool], cells: &[Vec<String>]) {
    let width = |k: usize| {
        cells
            .iter()
            .map(|row| row[k].chars().count())
            .chain([header[k].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |row: &[String]| {
        let parts: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let pad = widths[k] - c.chars().count();
                if right[k] {
                    format!("{}{c}", " ".repeat(pad))
                } else {
                    format!("{c}{}", " ".repeat(pad))
                }
            })
            .collect();
        format!("| {} |", parts.join(" | "))
    };
    println!(
        "{}",
        line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>())
    );
    let rule: Vec<String> = widths
        .iter()
        .zip(right.iter().copied())
        .map(|(&w, r)| {
            if r {
                format!("{}:", "-".repeat(w + 1))
            } else {
                "-".repeat(w + 2)
            }
        })
        .collect();
    println!("|{}|", rule.join("|"));
    for row in cells {
        println!("{}", line(row));
    }
}
