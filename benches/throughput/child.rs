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

/// Runs `cmd` with stdout captured (stderr passes through, for progress). After
/// `interrupt_after` (if given) it gets SIGINT, the way one stops `dpdk-testpmd`;
/// whatever still runs at `limit` is killed (SIGKILL) and waited for.
pub fn run_bounded(
    cmd: &mut Command,
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
