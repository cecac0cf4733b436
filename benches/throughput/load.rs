//! The load generator behind every side-by-side row, and the CPU accounting.
//!
//! One generator drives both sides of a row, so a ratio compares servers, not clients:
//! `clients` threads, each with its own connection (DOSP, the durable peer's framing or
//! HTTP/1.1 keep-alive), take operation numbers from one shared counter until the
//! phase's time or operation budget is spent, one request in flight per connection.
//! Connecting happens before the clock starts. The server's CPU time (user + system,
//! from `/proc/<pid>/stat`) is read when the clock starts and when it stops.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The bounds of one timed phase: whichever is reached first ends it.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub secs: f64,
    pub ops_max: u64,
}

/// What one phase measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rate {
    pub ops: u64,
    pub bytes: u64,
    pub secs: f64,
    /// CPU seconds (user + system) the server spent during the phase.
    pub server_cpu_s: f64,
}

impl Rate {
    pub fn ops_s(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / self.secs / (1 << 20) as f64
    }

    /// Server CPU seconds per 10^9 bytes of payload moved.
    pub fn cpu_s_per_gb(&self) -> f64 {
        self.server_cpu_s / (self.bytes as f64 / 1e9)
    }
}

/// Runs one phase: `connect(k)` opens client `k` (untimed), then every client calls
/// `op(&mut client, i)` for fresh operation numbers `i = 0, 1, 2, …` (each number is
/// used once across all clients) until `budget` is spent. `op` returns the payload
/// bytes it moved. `server_cpu` reads the server's CPU seconds so far.
///
/// Any client's error stops the phase and is returned; no thread is left waiting.
pub fn run<C, F, O>(
    clients: usize,
    budget: Budget,
    server_cpu: &dyn Fn() -> f64,
    connect: F,
    op: O,
) -> Result<Rate, String>
where
    F: Fn(usize) -> Result<C, String> + Sync,
    O: Fn(&mut C, u64) -> Result<u64, String> + Sync,
{
    assert!(clients > 0, "a phase needs at least one client");
    let next = AtomicU64::new(0);
    let ops = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let error: Mutex<Option<String>> = Mutex::new(None);
    let fail = |e: String| {
        stop.store(true, Ordering::Relaxed);
        error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    };
    // Everyone (the clients and this thread) meets here once all are connected, so
    // the clock covers only requests.
    let ready = Barrier::new(clients + 1);
    let budget_time = Duration::from_secs_f64(budget.secs);
    let mut start = Instant::now();
    let mut cpu_start = 0.0;
    std::thread::scope(|s| {
        for k in 0..clients {
            let (next, ops, bytes, stop, ready, connect, op, fail) =
                (&next, &ops, &bytes, &stop, &ready, &connect, &op, &fail);
            s.spawn(move || {
                let client = connect(k);
                ready.wait();
                let mut client = match client {
                    Ok(c) => c,
                    Err(e) => return fail(e),
                };
                let deadline = Instant::now() + budget_time;
                let (mut my_ops, mut my_bytes) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= budget.ops_max {
                        break;
                    }
                    match op(&mut client, i) {
                        Ok(n) => {
                            my_ops += 1;
                            my_bytes += n;
                        }
                        Err(e) => return fail(e),
                    }
                }
                ops.fetch_add(my_ops, Ordering::Relaxed);
                bytes.fetch_add(my_bytes, Ordering::Relaxed);
            });
        }
        ready.wait();
        cpu_start = server_cpu();
        start = Instant::now();
    });
    let secs = start.elapsed().as_secs_f64();
    let server_cpu_s = server_cpu() - cpu_start;
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(Rate {
        ops: ops.into_inner(),
        bytes: bytes.into_inner(),
        secs,
        server_cpu_s,
    })
}

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ).
pub fn ticks_per_s() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            // USER_HZ is 100 on every Linux ABI this runs on.
            .unwrap_or(100.0)
    })
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces),
/// so that field 3 of proc(5) (state) is index 0.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// CPU seconds (user + system, all threads) process `pid` has used; 0 once it is gone.
pub fn process_cpu_s(pid: u32) -> f64 {
    let Some(f) = stat_fields(pid) else {
        return 0.0;
    };
    // proc(5): utime is field 14, stime field 15; index = field - 3.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / ticks_per_s()
}

/// The processes whose parent is `pid` (nginx's workers under its master).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            stat_fields(p)
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                .is_some_and(|ppid| ppid == pid)
        })
        .collect()
}
