//! The `loops` part: the same node with one dataplane loop and with two, next to the
//! single-core MD5 ceiling.
//!
//! For each loop count (1, then 2) a fresh dosd is started on a fresh data directory
//! (disks are carved for the loop count when first used, so each count needs its own)
//! with `--dataplane-cores N` and two file-backed disks, and measured with the shared
//! load generator ([`super::load`]) at 8 clients:
//!
//! - `store 4 MiB`: durable STOREs of distinct seeded 4 MiB objects (MB/s, ops/s, and
//!   dosd's CPU seconds per GB, all its threads, and the load generator's, which
//!   shares the same cores);
//! - `fetch 4 KiB warm`: a corpus of distinct 4 KiB objects stored, each fetched once
//!   untimed, then the phase cycles over them (ops/s, CPU-s/GB), fetched as the side
//!   part fetches them ([`super::side_by_side`]).
//!
//! The MD5 ceiling is `openssl speed -evp md5 -bytes 16384`: one core hashing 16 KiB
//! blocks, measured before either node starts. openssl prints 1000s of bytes per
//! second; this part converts it to MB/s (10^6 bytes per second) and prints every
//! rate in MB/s so the two compare directly. The issue's goal: with 2 loops, 4 MiB
//! STOREs at ≥ 1.2× the ceiling.
//!
//! Every phase is bounded by DOSD_BENCH_SECS and an operation count; nothing asserts
//! a time.

use std::path::Path;
use std::process::{Command, Stdio};

use dosp::Fingerprint;

use super::common::data;
use super::load::{self, Budget, Rate};
use super::nginx::find_or_install_package;
use super::side_by_side::{
    dosd_fetch, markdown_table, object, progress, sig3, stamp, Config, Dosd,
};

const SMALL: usize = 4 << 10;
const LARGE: usize = 4 << 20;
/// Concurrent clients in every timed phase.
const CLIENTS: usize = 8;
/// The loop counts compared, in order.
const LOOP_COUNTS: [u16; 2] = [1, 2];
/// Each of the two file-backed disks; with 2 loops each loop owns half of each.
const DISK_SIZE: &str = "4G";
/// At most this many 4 MiB STOREs per phase (2.5 GiB): room in one loop's share of
/// the disks (2 × 2 GiB) even if every connection lands on the same loop.
const STORE_OPS_MAX: u64 = 640;
/// At most this many 4 KiB objects in the fetch corpus (fewer if
/// DOSD_BENCH_SMALL_OBJECTS says so): 16 MiB, within each loop's share of the
/// default 64 MiB object cache.
const SMALL_OBJECTS_MAX: usize = 4096;
/// The goal the issue sets: STORE MB/s with 2 loops ÷ the single-core MD5 ceiling.
const GOAL_VS_MD5: f64 = 1.2;

const TAG_LARGE: u64 = 0x100;
const TAG_SMALL: u64 = 0x101;

/// What one loop count measured.
struct LoopRun {
    loops: u16,
    store: Result<Rate, String>,
    fetch: Result<Rate, String>,
    /// The same phases with the load generator's CPU (this process) in place of
    /// dosd's: what the client side costs on the same cores.
    store_client: Result<Rate, String>,
    fetch_client: Result<Rate, String>,
}

/// Runs `phase` and returns its rate and the same rate with this process's CPU
/// seconds over the phase (the generator's threads; connecting included) in place
/// of the server's.
fn with_client_cpu(
    phase: impl FnOnce() -> Result<Rate, String>,
) -> (Result<Rate, String>, Result<Rate, String>) {
    let own = || load::process_cpu_s(std::process::id());
    let before = own();
    let rate = phase();
    let client_cpu_s = own() - before;
    let client = rate.clone().map(|r| Rate {
        server_cpu_s: client_cpu_s,
        ..r
    });
    (rate, client)
}

/// 10^6 bytes per second.
fn mb_s(r: &Rate) -> f64 {
    r.bytes as f64 / r.secs / 1e6
}

/// Runs both loop counts and the MD5 ceiling, and prints the table.
pub fn run(cfg: &Config, tmp: &Path) {
    let secs = cfg.budget.secs.ceil().max(1.0) as u64;
    let ceiling = md5_ceiling(secs);
    match &ceiling {
        Ok(mb) => eprintln!("loops: openssl md5, 16 KiB blocks, one core: {mb:.0} MB/s"),
        Err(e) => eprintln!("loops: no MD5 ceiling: {e}"),
    }
    let runs: Vec<LoopRun> = LOOP_COUNTS
        .iter()
        .map(|&loops| measure(cfg, tmp, loops))
        .collect();
    println!();
    println!(
        "loops: dosd --dataplane-cores 1 and 2, {CLIENTS} clients, {} s or {} ops per \
         phase (4 MiB STOREs: at most {STORE_OPS_MAX}); MB/s = 10^6 bytes/s; {} cores",
        cfg.budget.secs,
        cfg.budget.ops_max,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    print_table(&runs, &ceiling);
}

/// One fresh node with `loops` dataplane loops: the STORE phase, then the fetch
/// corpus and the warm fetch phase. The node is stopped and its data removed after.
fn measure(cfg: &Config, tmp: &Path, loops: u16) -> LoopRun {
    let dir = tmp.join(format!("loops{loops}"));
    let n = loops.to_string();
    let mut dosd = Dosd::start_with(dir.clone(), DISK_SIZE, &["--dataplane-cores", &n]);
    let label = format!("loops={loops}");

    let base_large = data(cfg.seed ^ 0x40_0057, LARGE);
    let (store, store_client) = with_client_cpu(|| {
        load::run(
            CLIENTS,
            Budget {
                secs: cfg.budget.secs,
                ops_max: cfg.budget.ops_max.min(STORE_OPS_MAX),
            },
            &|| dosd.cpu_s(),
            // Each client stamps operation numbers into its own copy of the base bytes,
            // so the generator does not copy 4 MiB per STORE.
            |_| Ok((dosd.connect()?, base_large.clone())),
            |(c, o), i| {
                stamp(o, TAG_LARGE, i);
                let s = c.store_bytes(o).map_err(|e| e.to_string())?;
                if s.deduplicated {
                    return Err(format!("store {i} was deduplicated"));
                }
                Ok(o.len() as u64)
            },
        )
    });
    progress("store 4 MiB", CLIENTS, &label, &store);

    let (fetch, fetch_client) = match small_corpus(cfg, &dosd).and_then(|fps| {
        let items = fps.len() as u64;
        let fetch_one = |c: &mut dosp::client::Client, i: u64| {
            let fp = fps[(i % items) as usize];
            dosd_fetch(c, &fp, None, SMALL as u64, cfg.verify)
        };
        // Warm: every object once, untimed.
        let everything = Budget {
            secs: 600.0,
            ops_max: items,
        };
        load::run(CLIENTS, everything, &|| 0.0, |_| dosd.connect(), fetch_one)?;
        Ok(with_client_cpu(|| {
            load::run(
                CLIENTS,
                cfg.budget,
                &|| dosd.cpu_s(),
                |_| dosd.connect(),
                fetch_one,
            )
        }))
    }) {
        Ok(measured) => measured,
        Err(e) => (Err(e.clone()), Err(e)),
    };
    progress("fetch 4 KiB w", CLIENTS, &label, &fetch);

    dosd.stop();
    drop(dosd);
    // The next loop count starts on fresh disks; free this one's space now.
    let _ = std::fs::remove_dir_all(&dir);
    LoopRun {
        loops,
        store,
        fetch,
        store_client,
        fetch_client,
    }
}

/// Stores the distinct 4 KiB objects the fetch phase reads (untimed) and returns
/// their fingerprints, checking dosd names each as the local MD5 does.
fn small_corpus(cfg: &Config, dosd: &Dosd) -> Result<Vec<Fingerprint>, String> {
    let count = cfg.small_objects.min(SMALL_OBJECTS_MAX);
    let base = data(cfg.seed ^ 0x40_0005, SMALL);
    let fps: Vec<Fingerprint> = (0..count as u64)
        .map(|i| Fingerprint::of(&object(&base, TAG_SMALL, i)))
        .collect();
    let budget = Budget {
        secs: 600.0,
        ops_max: count as u64,
    };
    load::run(
        CLIENTS,
        budget,
        &|| 0.0,
        |_| dosd.connect(),
        |c, i| {
            let o = object(&base, TAG_SMALL, i);
            let got = c.store_bytes(&o).map_err(|e| e.to_string())?;
            if got.fingerprint != fps[i as usize] {
                return Err(format!("dosd named object {i} {}", got.fingerprint));
            }
            Ok(o.len() as u64)
        },
    )
    .map_err(|e| format!("storing the fetch corpus: {e}"))?;
    Ok(fps)
}

/// One core's MD5 speed by `openssl speed -evp md5` over 16 KiB blocks, in MB/s
/// (10^6 bytes per second). openssl is installed with apt-get if missing (as nginx
/// is); the error says why there is no figure.
fn md5_ceiling(secs: u64) -> Result<f64, String> {
    let bin = find_or_install_package("openssl", "openssl")?;
    let out = Command::new("timeout")
        .arg("120")
        .arg(&bin)
        .args(["speed", "-evp", "md5", "-bytes", "16384", "-seconds"])
        .arg(secs.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "openssl speed failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_openssl_speed(&String::from_utf8_lossy(&out.stdout), "md5", 16384)
}

/// The `algorithm` row's figure for `block`-byte blocks from `openssl speed`'s table:
///
/// ```text
/// The 'numbers' are in 1000s of bytes per second processed.
/// type          16384 bytes
/// md5             652100.63k
/// ```
///
/// The figure is in 1000s of bytes per second; the result is in 10^6 bytes per second.
fn parse_openssl_speed(text: &str, algorithm: &str, block: u64) -> Result<f64, String> {
    let unreadable = || format!("cannot read openssl speed's table: {text:?}");
    let header = text
        .lines()
        .find(|l| l.starts_with("type"))
        .ok_or_else(unreadable)?;
    let column = header
        .split_whitespace()
        .skip(1)
        .filter(|w| *w != "bytes")
        .position(|w| w == block.to_string())
        .ok_or_else(unreadable)?;
    let row = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(algorithm))
        .ok_or_else(unreadable)?;
    let thousands: f64 = row
        .split_whitespace()
        .nth(1 + column)
        .and_then(|v| v.strip_suffix('k'))
        .and_then(|v| v.parse().ok())
        .ok_or_else(unreadable)?;
    Ok(thousands * 1e3 / 1e6)
}

fn print_table(runs: &[LoopRun], ceiling: &Result<f64, String>) {
    let header = [
        "measurement (8 clients)",
        "loops=1",
        "loops=2",
        "loops=2 ÷ loops=1",
        "goal",
    ];
    let right = [false, true, true, true, true];
    let dash = || "—".to_string();
    let by = |loops: u16| runs.iter().find(|r| r.loops == loops);
    type Pick = fn(&LoopRun) -> &Result<Rate, String>;
    let store: Pick = |r| &r.store;
    let fetch: Pick = |r| &r.fetch;
    let store_client: Pick = |r| &r.store_client;
    let fetch_client: Pick = |r| &r.fetch_client;
    let value = |pick: Pick, loops: u16, f: &dyn Fn(&Rate) -> f64| -> Option<f64> {
        by(loops).and_then(|r| pick(r).as_ref().ok()).map(f)
    };
    let cell = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), sig3);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}×", b / a),
        _ => dash(),
    };
    let line = |name: &str, pick: Pick, f: &dyn Fn(&Rate) -> f64| {
        let (a, b) = (value(pick, 1, f), value(pick, 2, f));
        vec![name.to_string(), cell(a), cell(b), ratio(a, b), dash()]
    };
    let ceiling_mb = ceiling.as_ref().ok().copied();
    let vs_ceiling = |loops: u16| match (value(store, loops, &mb_s), ceiling_mb) {
        (Some(s), Some(m)) => format!("{:.2}×", s / m),
        _ => "n/a".to_string(),
    };
    let cells = vec![
        line("store 4 MiB, MB/s", store, &mb_s),
        vec![
            "MD5 ceiling (openssl, 1 core, 16 KiB blocks), MB/s".into(),
            cell(ceiling_mb),
            cell(ceiling_mb),
            dash(),
            dash(),
        ],
        vec![
            "store 4 MiB ÷ MD5 ceiling".into(),
            vs_ceiling(1),
            vs_ceiling(2),
            dash(),
            format!("loops=2 ≥ {GOAL_VS_MD5}×"),
        ],
        line("store 4 MiB, ops/s", store, &Rate::ops_s),
        line("store 4 MiB, dosd CPU-s/GB", store, &Rate::cpu_s_per_gb),
        line(
            "store 4 MiB, load generator CPU-s/GB",
            store_client,
            &Rate::cpu_s_per_gb,
        ),
        line("fetch 4 KiB warm, ops/s", fetch, &Rate::ops_s),
        line(
            "fetch 4 KiB warm, dosd CPU-s/GB",
            fetch,
            &Rate::cpu_s_per_gb,
        ),
        line(
            "fetch 4 KiB warm, load generator CPU-s/GB",
            fetch_client,
            &Rate::cpu_s_per_gb,
        ),
    ];
    markdown_table(&header, &right, &cells);
    let mut reasons: Vec<String> = runs
        .iter()
        .flat_map(|r| {
            [("store", &r.store), ("fetch", &r.fetch)]
                .into_iter()
                .filter_map(move |(what, res)| {
                    res.as_ref()
                        .err()
                        .map(|e| format!("loops={} {what}: {e}", r.loops))
                })
        })
        .collect();
    if let Err(e) = ceiling {
        reasons.push(format!("MD5 ceiling: {e}"));
    }
    for e in reasons {
        println!("  n/a: {}", e.lines().next().unwrap_or_default());
    }
}
