//! nginx as the fetch peer: found on the machine or installed from Debian's packages
//! (the same helper installs the other tools a part needs, e.g. `openssl`),
//! configured by the bench in a temporary directory and serving the same object bytes
//! as dosd, as files named by their fingerprint.
//!
//! Configuration: sendfile on, access log off, keep-alive without a request limit, no
//! open-file cache (nginx's default), `worker_processes` from DOSD_BENCH_NGINX_WORKERS
//! (default 1, the same one core as dosd's single dataplane loop; the generator needs
//! the machine's other core). Everything it writes stays in the temporary directory.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::load::{children_of, process_cpu_s};

/// A running nginx (master and workers), stopped on drop.
pub struct Nginx {
    master: Child,
    workers: Vec<u32>,
    pub addr: String,
}

pub(super) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// Runs `apt-get` with `args`, bounded in time; returns its output's tail on failure.
fn apt_get(args: &[&str]) -> Result<(), String> {
    let out = Command::new("timeout")
        .arg("600")
        .arg("apt-get")
        // Wait for another apt (a neighbour installing) rather than fail at once.
        .args(["-o", "DPkg::Lock::Timeout=120"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = text.lines().rev().take(3).collect();
    Err(format!(
        "apt-get {} failed ({}): {}",
        args.join(" "),
        out.status,
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    ))
}

/// The nginx binary: found, or installed with apt-get (as root, unless
/// DOSD_BENCH_INSTALL=0). The error says why the nginx rows cannot run.
pub fn find_or_install() -> Result<PathBuf, String> {
    find_or_install_package("nginx", "nginx")
}

/// The binary `name`: found on PATH (or in the sbin directories), or installed with
/// `apt-get install -y PACKAGE` (as root, unless DOSD_BENCH_INSTALL=0; after
/// `apt-get update` if the first try fails). The error says why it is not there.
pub fn find_or_install_package(name: &str, package: &str) -> Result<PathBuf, String> {
    if let Some(p) = find_binary(name) {
        return Ok(p);
    }
    if std::env::var("DOSD_BENCH_INSTALL").is_ok_and(|v| v == "0") {
        return Err(format!("{name} is not installed and DOSD_BENCH_INSTALL=0"));
    }
    if !is_root() {
        return Err(format!(
            "{name} is not installed and this is not root: `apt-get install {package}`"
        ));
    }
    eprintln!("{name} is not installed: apt-get install -y {package}");
    let install = ["install", "-y", "-q", "--no-install-recommends", package];
    if apt_get(&install).is_err() {
        // A machine fresh from its image has no package lists yet.
        apt_get(&["update", "-q"])?;
        apt_get(&install)?;
    }
    find_binary(name)
        .ok_or_else(|| format!("apt-get installed {package} but no {name} binary was found"))
}

impl Nginx {
    /// Starts nginx serving `docroot` on a free loopback port, with its configuration,
    /// logs and temporary files in `dir`.
    pub fn start(bin: &Path, dir: &Path, docroot: &Path, workers: usize) -> Result<Nginx, String> {
        Nginx::start_with(bin, dir, docroot, workers, "location / { }")
    }

    /// Like [`Nginx::start`], with `locations` (nginx configuration text) as the
    /// server's `location` blocks; `root` is `docroot`.
    pub fn start_with(
        bin: &Path,
        dir: &Path,
        docroot: &Path,
        workers: usize,
        locations: &str,
    ) -> Result<Nginx, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("nginx dir: {e}"))?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("free port: {e}"))?
            .port();
        let d = dir.display();
        // As root nginx would switch its workers to `nobody`, who cannot read the
        // bench's private temporary directory.
        let user = if is_root() { "user root;" } else { "" };
        let conf = format!(
            "daemon off;
master_process on;
worker_processes {workers};
{user}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    default_type application/octet-stream;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        root {root};
        {locations}
    }}
}}
",
            root = docroot.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).map_err(|e| format!("nginx.conf: {e}"))?;
        let mut master = Command::new(bin)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let addr = format!("127.0.0.1:{port}");
        let log = || std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = master.try_wait() {
                return Err(format!("nginx exited at start ({status}): {}", log()));
            }
            let workers_now = children_of(master.id());
            if workers_now.len() >= workers && TcpStream::connect(&addr).is_ok() {
                return Ok(Nginx {
                    workers: workers_now,
                    master,
                    addr,
                });
            }
            if Instant::now() > deadline {
                let _ = master.kill();
                let _ = master.wait();
                return Err(format!("nginx did not start within 10 s: {}", log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// CPU seconds of the master and all workers.
    pub fn cpu_s(&self) -> f64 {
        process_cpu_s(self.master.id())
            + self.workers.iter().map(|&p| process_cpu_s(p)).sum::<f64>()
    }

    pub fn version(bin: &Path) -> String {
        // `nginx -v` answers on stderr: "nginx version: nginx/1.22.1".
        Command::new(bin)
            .arg("-v")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
            .ok()
            .and_then(|s| s.rsplit(' ').next().map(str::to_string))
            .unwrap_or_else(|| "nginx".into())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master stops its workers too; SIGKILL would orphan them.
        let pid = self.master.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.master.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in &self.workers {
            let _ = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .status();
        }
        let _ = self.master.kill();
        let _ = self.master.wait();
    }
}
