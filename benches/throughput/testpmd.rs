//! The `dpdk-port` part: the project's DPDK port layer (the `dpdk` crate: `Eal`,
//! `Mempool`, `Port`, `RxQueue`/`TxQueue`, `Burst`) forwarding packets, next to
//! `dpdk-testpmd --forward-mode=io` forwarding the same way, in the same run.
//!
//! Both sides get the same EAL arguments ([`EAL_ARGS`]: two `net_ring` vdevs, no
//! hugepages, no PCI, no shared config, lcores 0 and 1) and do the same work on one
//! lcore: testpmd's io forwarding in its default `paired` topology, i.e. two streams,
//! `rx_burst(port 0)` → `tx_burst(port 1)` and `rx_burst(port 1)` → `tx_burst(port 0)`,
//! bursts of 32, whatever a transmit does not take is freed, no packet byte read or
//! written. A `net_ring` port loops what it transmits back to its own receive side,
//! so the packets circulate between the two ports. Both start by transmitting one
//! burst of 32 64-byte frames on each port (testpmd's `--tx-first`), then forward
//! those 64 mbufs round and round: no mbuf is allocated or freed while measuring.
//!
//! The rate on both sides is the ports' received packets (`rte_eth_stats_get`,
//! summed over both ports) per second, i.e. packets forwarded per second. testpmd
//! prints it as `Rx-pps` every second (`--stats-period 1`); its first display (no
//! interval yet) is dropped and the rest averaged. The port layer runs in a child
//! process of this bench (EAL is once per process and pins the thread that starts
//! it), warms up for a second and then counts the same statistics over
//! DOSD_BENCH_SECS. Rounds alternate between the two (DOSD_BENCH_DPDK_ROUNDS, 3);
//! the table gives every round and the medians.
//!
//! testpmd forwards on lcore 1 (its main lcore 0 only prints); the port layer's loop
//! runs on EAL's main lcore, 0. Neither needs root (no hugepages, no devices).

use std::cell::Cell;
use std::process::Command;
use std::time::Duration;

use super::child::{run_bounded, thread_cpu_s, thread_name};
use super::nginx::find_or_install_package;
use super::side_by_side::{env_or, markdown_table, sig3};

/// The argument that makes the bench binary the port layer's forwarder (a child).
pub const FWD_ARG: &str = "--dpdk-port-forward";

/// The EAL arguments of both forwarders.
const EAL_ARGS: &[&str] = &[
    "-l",
    "0,1",
    "--no-huge",
    "-m",
    "512",
    "--no-pci",
    "--no-shconf",
    "--no-telemetry",
    "--log-level=warning",
    "--vdev=net_ring0",
    "--vdev=net_ring1",
];
/// The ports, in the order EAL makes them (port 0, port 1).
#[cfg_attr(not(feature = "dpdk"), allow(dead_code))]
const PORTS: [&str; 2] = ["net_ring0", "net_ring1"];
/// The frame length of the packets sent first (testpmd's default `--txpkts`).
#[cfg_attr(not(feature = "dpdk"), allow(dead_code))]
const FRAME: usize = 64;
/// Packets per burst (the port layer's `BURST_MAX`; testpmd's `--burst`).
const BURST: usize = 32;
/// The port layer's untimed warm-up, in seconds.
#[cfg_attr(not(feature = "dpdk"), allow(dead_code))]
const WARMUP_S: f64 = 1.0;
/// The goal: the port layer at ≥ this × testpmd.
const GOAL: f64 = 0.9;

/// One round of one forwarder.
#[derive(Debug, Clone, Copy)]
struct Round {
    /// Packets per second of wall-clock time.
    pps: f64,
    /// Packets per CPU second of the forwarding thread: the wall-clock rate divided
    /// by the share of the interval the thread was on a CPU, so that time the
    /// scheduler gave to other processes on this shared machine does not count.
    cpu_pps: Option<f64>,
}

/// One forwarder's rounds.
struct Side {
    name: String,
    rounds: Vec<Result<Round, String>>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl Side {
    fn values(&self, pick: fn(&Round) -> Option<f64>) -> Vec<Option<f64>> {
        self.rounds
            .iter()
            .map(|r| r.as_ref().ok().and_then(pick))
            .collect()
    }

    fn median(&self, pick: fn(&Round) -> Option<f64>) -> Option<f64> {
        median(self.values(pick).into_iter().flatten().collect())
    }
}

fn wall(r: &Round) -> Option<f64> {
    Some(r.pps)
}

fn per_cpu(r: &Round) -> Option<f64> {
    r.cpu_pps
}

/// Runs the rounds and prints the table.
pub fn run(secs: f64) {
    let rounds: usize = env_or("DOSD_BENCH_DPDK_ROUNDS", 3).max(1);
    let testpmd = find_or_install_package("dpdk-testpmd", "dpdk");
    let mut ours = Side {
        name: "dosd port layer (`dpdk` crate)".into(),
        rounds: Vec::new(),
    };
    let mut peer = Side {
        name: "dpdk-testpmd --forward-mode=io".into(),
        rounds: Vec::new(),
    };
    for round in 1..=rounds {
        let r = port_layer(secs);
        report(round, "port layer", &r);
        ours.rounds.push(r);
        let r = match &testpmd {
            Ok(bin) => run_testpmd(bin.as_os_str(), secs),
            Err(e) => Err(e.clone()),
        };
        report(round, "testpmd", &r);
        peer.rounds.push(r);
    }
    if let Some(v) = testpmd_version() {
        peer.name = format!("{} (DPDK {v})", peer.name);
    }
    println!();
    println!(
        "dpdk-port: io forwarding between 2 net_ring ports, {FRAME}-byte frames, bursts of \
         {BURST}, one forwarding lcore, {secs} s per round; Mpps = 10^6 packets received \
         per second, both ports; EAL: {}",
        EAL_ARGS.join(" ")
    );
    print_table(&ours, &peer);
}

fn report(round: usize, what: &str, r: &Result<Round, String>) {
    match r {
        Ok(r) => eprintln!(
            "  dpdk-port round {round} {what:<10} {:>8.2} Mpps, {} Mpps per CPU-s",
            r.pps / 1e6,
            r.cpu_pps
                .map_or_else(|| "n/a".into(), |p| format!("{:.2}", p / 1e6))
        ),
        Err(e) => eprintln!("  dpdk-port round {round} {what:<10} not measured: {e}"),
    }
}

fn print_table(ours: &Side, peer: &Side) {
    let header = [
        "forwarder",
        "Mpps, each round",
        "median Mpps",
        "÷ testpmd",
        "Mpps per CPU-s, each round",
        "median",
        "÷ testpmd",
        "goal",
    ];
    let right = [false, false, true, true, false, true, true, true];
    let rounds = |side: &Side, pick: fn(&Round) -> Option<f64>| {
        side.values(pick)
            .iter()
            .map(|v| v.map_or_else(|| "n/a".into(), |v| sig3(v / 1e6)))
            .collect::<Vec<String>>()
            .join(" / ")
    };
    let cell = |v: Option<f64>| v.map_or_else(|| "n/a".into(), |v| sig3(v / 1e6));
    let ratio =
        |side: &Side, pick: fn(&Round) -> Option<f64>| match (side.median(pick), peer.median(pick))
        {
            (Some(m), Some(p)) => format!("{:.2}×", m / p),
            _ => "—".into(),
        };
    let line = |side: &Side, goal: String| {
        vec![
            side.name.clone(),
            rounds(side, wall),
            cell(side.median(wall)),
            ratio(side, wall),
            rounds(side, per_cpu),
            cell(side.median(per_cpu)),
            ratio(side, per_cpu),
            goal,
        ]
    };
    let cells = vec![line(ours, format!("≥ {GOAL}×")), line(peer, "—".into())];
    markdown_table(&header, &right, &cells);
    let mut reasons: Vec<String> = Vec::new();
    for side in [ours, peer] {
        for e in side.rounds.iter().filter_map(|r| r.as_ref().err()) {
            let e = format!("{}: {}", side.name, e.lines().next().unwrap_or_default());
            if !reasons.contains(&e) {
                reasons.push(e);
            }
        }
    }
    for e in reasons {
        println!("  n/a: {e}");
    }
}

/// One round of the port layer: this binary in its forwarding mode, bounded.
fn port_layer(secs: f64) -> Result<Round, String> {
    if !cfg!(feature = "dpdk") {
        return Err("this bench was built without the dpdk feature (--features dpdk)".into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("own binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg(FWD_ARG).arg(secs.to_string()).args(EAL_ARGS);
    let limit = Duration::from_secs_f64(secs + WARMUP_S + 60.0);
    let done = run_bounded(&mut cmd, &|_, _| {}, None, limit)?;
    let line = done
        .stdout
        .lines()
        .find(|l| l.starts_with("forwarded "))
        .ok_or_else(|| match done.code {
            None => format!("the forwarder did not finish within {limit:?}"),
            Some(c) => format!("the forwarder exited with {c}: {}", done.stdout.trim()),
        })?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Ok(Round {
        pps: field("pps=").ok_or_else(|| format!("cannot read {line:?}"))?,
        cpu_pps: field("cpu_pps="),
    })
}

/// One round of testpmd: io forwarding, stats every second, SIGINT after the
/// measurement; the mean of its `Rx-pps` displays after the first, both ports. Its
/// forwarding thread's CPU time is sampled from `PROBE_FROM` after the start to just
/// before the SIGINT, for the per-CPU-second rate.
fn run_testpmd(bin: &std::ffi::OsStr, secs: f64) -> Result<Round, String> {
    let mut cmd = Command::new(bin);
    cmd.args(EAL_ARGS).args([
        "--",
        "--forward-mode=io",
        &format!("--burst={BURST}"),
        &format!("--txpkts={FRAME}"),
        "--tx-first",
        "--stats-period=1",
        "--nb-cores=1",
        "--total-num-mbufs=8192",
    ]);
    // EAL start-up, one display with no interval, then about `secs` of intervals
    // (and a second's margin: start-up is slower without root).
    let run_for = Duration::from_secs_f64(secs + 3.5);
    // (elapsed, CPU seconds of the forwarding thread): the first probe from
    // PROBE_FROM on and the last one before the SIGINT.
    let first: Cell<Option<(Duration, f64)>> = Cell::new(None);
    let last: Cell<Option<(Duration, f64)>> = Cell::new(None);
    let probe = |pid: u32, elapsed: Duration| {
        if elapsed < PROBE_FROM || elapsed >= run_for {
            return;
        }
        if let Some(cpu) = forwarding_thread_cpu_s(pid) {
            if first.get().is_none() {
                first.set(Some((elapsed, cpu)));
            }
            last.set(Some((elapsed, cpu)));
        }
    };
    let done = run_bounded(
        &mut cmd,
        &probe,
        Some(run_for),
        run_for + Duration::from_secs(60),
    )?;
    let rates = rx_pps_displays(&done.stdout, PORTS_COUNT);
    let measured = measured_displays(&rates);
    if measured.is_empty() {
        let tail: Vec<&str> = done.stdout.lines().rev().take(5).collect();
        return Err(format!(
            "testpmd (exit {:?}) printed no rate after its first display: {}",
            done.code,
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    let pps = measured.iter().sum::<f64>() / measured.len() as f64;
    let on_cpu = match (first.get(), last.get()) {
        (Some((t0, c0)), Some((t1, c1))) if t1 > t0 => Some((c1 - c0) / (t1 - t0).as_secs_f64()),
        _ => None,
    };
    Ok(Round {
        pps,
        cpu_pps: on_cpu.filter(|&u| u > 0.0).map(|u| pps / u),
    })
}

/// When testpmd's forwarding thread is surely forwarding (EAL start-up is over).
const PROBE_FROM: Duration = Duration::from_millis(2000);

/// The displays that cover a whole interval of forwarding: not the first (it has no
/// interval), and, if forwarding had not started by the second, none up to and
/// including the first non-zero one (it covers part of an interval).
fn measured_displays(rates: &[f64]) -> &[f64] {
    let rest = rates.get(1..).unwrap_or_default();
    if rest.first().is_some_and(|&r| r > 0.0) {
        return rest;
    }
    match rest.iter().position(|&r| r > 0.0) {
        Some(k) => &rest[k + 1..],
        None => &[],
    }
}

/// CPU seconds of testpmd's forwarding thread (EAL's `rte-worker-1`, lcore 1).
fn forwarding_thread_cpu_s(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks
        .filter_map(|t| t.ok()?.file_name().into_string().ok())
        .find(|tid| thread_name(pid, tid) == "rte-worker-1")
        .and_then(|tid| thread_cpu_s(&format!("/proc/{pid}/task/{tid}/stat")))
}

const PORTS_COUNT: usize = 2;

/// testpmd's periodic displays, each the sum of its `Rx-pps` over `ports` ports:
///
/// ```text
///   Throughput (since last show)
///   Rx-pps:    390364001          Rx-bps:            0
/// ```
fn rx_pps_displays(text: &str, ports: usize) -> Vec<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Rx-pps:"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    values
        .chunks(ports)
        .filter(|c| c.len() == ports)
        .map(|c| c.iter().sum())
        .collect()
}

/// The version of Debian's `dpdk` package (which ships `dpdk-testpmd`), if installed.
fn testpmd_version() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "dpdk"])
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !v.is_empty()).then_some(v)
}

/// The forwarding child: `FWD_ARG SECS EAL_ARGS…`. Prints one line,
/// `forwarded pps=… loop_pps=… cpu_pps=… secs=…`, or `error …` (and exits with 1).
pub fn forward_main(args: &[String]) {
    let secs: f64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    match forward(secs, args.get(1..).unwrap_or_default()) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            println!("error {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(not(feature = "dpdk"))]
fn forward(_secs: f64, _eal_args: &[String]) -> Result<String, String> {
    Err("built without the dpdk feature".into())
}

#[cfg(feature = "dpdk")]
fn forward(secs: f64, eal_args: &[String]) -> Result<String, String> {
    use dpdk::{Burst, Eal, Mempool, PortConfig, QueueId, BURST_MAX};
    use std::time::Instant;

    const { assert!(BURST == BURST_MAX) };
    fn e(what: &'static str) -> impl Fn(dpdk::Error) -> String {
        move |err| format!("{what}: {err}")
    }
    let eal = Eal::init(eal_args).map_err(e("EAL init"))?;
    let pool = Mempool::new(&eal, "fwd_pool", 8191, 256, Mempool::DEFAULT_DATA_ROOM)
        .map_err(e("mempool"))?;
    let mut ports = Vec::new();
    for name in PORTS {
        let id = eal.port_by_name(name).map_err(e(name))?;
        let mut port = eal.port(id).map_err(e(name))?;
        port.configure(&PortConfig::default(), &pool)
            .map_err(e("configure"))?;
        port.start().map_err(e("start"))?;
        ports.push(port);
    }
    let (p0, p1) = (&ports[0], &ports[1]);
    let mut rx0 = p0.rx_queue(QueueId(0)).map_err(e("rx queue"))?;
    let mut tx0 = p0.tx_queue(QueueId(0)).map_err(e("tx queue"))?;
    let mut rx1 = p1.rx_queue(QueueId(0)).map_err(e("rx queue"))?;
    let mut tx1 = p1.tx_queue(QueueId(0)).map_err(e("tx queue"))?;

    // Transmit first: one burst of 64-byte frames on each port (an Ethernet header
    // to the broadcast address, IPv4 ethertype, zeroes; neither side reads them).
    let mut frame = [0u8; FRAME];
    frame[..6].fill(0xff);
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    for tx in [&mut tx0, &mut tx1] {
        let mut b = Burst::new();
        for _ in 0..BURST_MAX {
            let mut m = pool.alloc().map_err(e("alloc"))?;
            m.append(FRAME)
                .map_err(e("append"))?
                .copy_from_slice(&frame);
            let _ = b.push(m);
        }
        if tx.tx_burst(&mut b) != BURST_MAX {
            return Err("net_ring did not take the first burst".into());
        }
    }

    // Both streams, as testpmd's io forwarding runs them on one lcore, until
    // `until`; the clock is read every 1024 rounds. Returns the packets received.
    let mut forward_until = |until: Instant| -> u64 {
        let (mut a, mut b) = (Burst::new(), Burst::new());
        let mut received = 0u64;
        loop {
            for _ in 0..1024 {
                received += rx0.rx_burst(&mut a) as u64;
                tx1.tx_burst(&mut a);
                if !a.is_empty() {
                    a.clear();
                }
                received += rx1.rx_burst(&mut b) as u64;
                tx0.tx_burst(&mut b);
                if !b.is_empty() {
                    b.clear();
                }
            }
            if Instant::now() >= until {
                return received;
            }
        }
    };
    forward_until(Instant::now() + Duration::from_secs_f64(WARMUP_S));
    let rx_packets = || -> Result<u64, String> {
        let mut sum = 0;
        for p in [p0, p1] {
            sum += p.stats().map_err(e("stats"))?.rx_packets;
        }
        Ok(sum)
    };
    // This thread's CPU time over the same interval.
    let cpu = || thread_cpu_s("/proc/thread-self/stat");
    let before = rx_packets()?;
    let cpu_before = cpu();
    let start = Instant::now();
    let counted = forward_until(start + Duration::from_secs_f64(secs));
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_after = cpu();
    let after = rx_packets()?;
    let packets = (after - before) as f64;
    let cpu_pps = match (cpu_before, cpu_after) {
        (Some(a), Some(b)) if b > a => format!(" cpu_pps={}", packets / (b - a)),
        _ => String::new(),
    };
    Ok(format!(
        "forwarded pps={} loop_pps={}{cpu_pps} secs={elapsed}",
        packets / elapsed,
        counted as f64 / elapsed
    ))
}
