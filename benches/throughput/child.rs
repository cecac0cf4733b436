//! Child processes of the DPDK parts, each bounded in time: the bench's own binary
//! re-run in a child mode (EAL is once per process and pins the thread that starts
//! it; a client must run inside a network namespace), `dpdk-testpmd`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a bounded child printed on stdout, and how it ended.
pub struct Finished {
    pub stdout: String,
    /// `None` when it had to be killed.
    pub code: Option<i32>,
}

/// Runs `cmd` with stdout captured (stderr passes through, for progress). While it
/// runs, `probe(pid, elapsed)` is called every 20 ms or so; after `interrupt_after`
/// (if given) it gets SIGINT, the way one stops `dpdk-testpmd`; whatever still runs
/// at `limit` is killed (SIGKILL) and waited for.
pub fn run_bounded(
    cmd: &mut Command,
    probe: &dyn Fn(u32, Duration),
    interrupt_after: Option<Duration>,
    limit: Duration,
) -> Result<Finished, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let mut out = child.stdout.take().expect("stdout piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        text
    });
    let start = Instant::now();
    let mut interrupted = interrupt_after.is_none();
    let code = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status.code().unwrap_or(-1));
        }
        let elapsed = start.elapsed();
        probe(child.id(), elapsed);
        if elapsed >= limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        if !interrupted && interrupt_after.is_some_and(|after| elapsed >= after) {
            interrupted = true;
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = reader.join().unwrap_or_default();
    Ok(Finished { stdout, code })
}

/// CPU seconds (user + system) of the thread `/proc/.../stat` file at `stat_path`
/// (e.g. `/proc/thread-self/stat`, `/proc/PID/task/TID/stat`); `None` if unreadable.
pub fn thread_cpu_s(stat_path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // proc(5): utime is field 14, stime field 15; field 3 (state) is index 0.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((ticks(11)? + ticks(12)?) as f64 / super::load::ticks_per_s())
}

/// The name (`comm`) of thread `tid` of process `pid`.
pub fn thread_name(pid: u32, tid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}
