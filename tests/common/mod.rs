//! Shared harness for the integration tests: starts real `dosd` processes on free
//! ports with their own data directory and multicast group, and runs the real `dosp`
//! binary against them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `dosd` binary under test.
pub fn dosd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dosd"))
}

/// The `dosp` binary, built once per test process next to `dosd` (it lives in the
/// `dosp` crate, so cargo does not build it for this package's tests by itself).
pub fn dosp_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = dosd_bin()
                .parent()
                .expect("binary has a directory")
                .to_path_buf();
            let release = dir.ends_with("release");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "-p", "dosp", "--bin", "dosp"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build for dosp");
            assert!(status.success(), "building dosp failed");
            dir.join("dosp")
        })
        .clone()
}

/// A multicast group port unique to this test process and call, so tests running in
/// parallel never hear each other's nodes.
pub fn unique_group() -> String {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let port = 20000 + (std::process::id() as u16 % 2000) * 16 + n % 16;
    format!("239.255.73.{}:{port}", 100 + (n % 100))
}

/// A running node. Killed (SIGKILL) on drop if still running.
pub struct Node {
    pub child: Child,
    pub addr: SocketAddr,
    pub mgmt: SocketAddr,
    /// Where signed URLs are served, when the node was started with --http-listen.
    pub http: Option<SocketAddr>,
    pub node_id: String,
    pub data_dir: PathBuf,
    pub group: String,
    pub stderr_log: PathBuf,
}

impl Node {
    /// GET `path` from the management endpoint; its body as text (asserts 200).
    pub fn get_text(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.mgmt).expect("connect to mgmt");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
        assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {text}");
        body.to_string()
    }

    /// Starts `dosd` on `data_dir` with two small disks and waits until it is serving.
    pub fn start(data_dir: &Path, group: &str, extra: &[&str]) -> Node {
        let mut args = vec![
            "--disks",
            "2",
            "--disk-size",
            "64M",
            "--heartbeat-ms",
            "200",
        ];
        args.extend_from_slice(extra);
        Node::start_bare(data_dir, group, &args)
    }

    /// Starts `dosd` with only the addresses set (free ports, the test's group) and
    /// `args`; everything else comes from `args`, a config file or the defaults.
    pub fn start_bare(data_dir: &Path, group: &str, args: &[&str]) -> Node {
        Node::try_start_under(&[], data_dir, group, args).unwrap_or_else(|log| {
            panic!("dosd exited before it was ready:\n{log}");
        })
    }

    /// Like [`Node::start_bare`], with `dosd` run by a wrapper command (`prefix`, e.g.
    /// `prlimit --nofile=…`, which execs it: the child's pid is dosd's). Returns
    /// dosd's stderr if it exits instead of becoming ready.
    pub fn try_start_under(
        prefix: &[&str],
        data_dir: &Path,
        group: &str,
        args: &[&str],
    ) -> Result<Node, String> {
        let stderr_log = data_dir.with_extension("stderr.log");
        let stderr = std::fs::File::create(&stderr_log).expect("create stderr log");
        let mut cmd = match prefix.split_first() {
            None => Command::new(dosd_bin()),
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(dosd_bin());
                c
            }
        };
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--mgmt-listen", "127.0.0.1:0"])
            .args(["--multicast", group, "--multicast-if", "127.0.0.1"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .env("DOSD_LOG", "info");
        let mut child = cmd.spawn().expect("spawn dosd");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        // The first stdout line says where it listens; it comes after the disks are open.
        reader.read_line(&mut line).expect("read dosd stdout");
        if line.is_empty() {
            let _ = child.wait();
            return Err(std::fs::read_to_string(&stderr_log).unwrap_or_default());
        }
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
                .to_string()
        };
        let addr: SocketAddr = field("dosp=").parse().expect("dosp address");
        let mgmt: SocketAddr = field("mgmt=").parse().expect("mgmt address");
        let node_id = field("node=");
        let http = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http="))
            .map(|a| a.parse().expect("http address"));
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        Ok(Node {
            child,
            addr,
            mgmt,
            http,
            node_id,
            data_dir: data_dir.to_path_buf(),
            group: group.to_string(),
            stderr_log,
        })
    }

    pub fn node_arg(&self) -> String {
        self.addr.to_string()
    }

    /// Runs `dosp --node <this node> args…`.
    pub fn dosp(&self, args: &[&str]) -> Output {
        Command::new(dosp_bin())
            .arg("--node")
            .arg(self.node_arg())
            .args(args)
            .output()
            .expect("run dosp")
    }

    pub fn client(&self) -> dosp::client::Client {
        dosp::client::Client::connect(&self.node_arg(), Duration::from_secs(10)).expect("connect")
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// The (soft, hard) `Max open files` of the running node, from /proc.
    pub fn nofile_limits(&self) -> (u64, u64) {
        let text = std::fs::read_to_string(format!("/proc/{}/limits", self.child.id()))
            .expect("read /proc/PID/limits");
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("a Max open files line");
        let mut nums = line
            .split_whitespace()
            .skip(3)
            .map(|v| v.parse::<u64>().unwrap_or(u64::MAX));
        (nums.next().unwrap(), nums.next().unwrap())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Deterministic test data: `len` bytes from a seeded xorshift generator.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// MD5 by the system's `md5sum` — an implementation independent of the node's.
pub fn md5sum(path: &Path) -> String {
    let out = Command::new("md5sum")
        .arg(path)
        .output()
        .expect("run md5sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("md5sum output")
        .to_string()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}
