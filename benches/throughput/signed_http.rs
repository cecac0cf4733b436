//! The `http` part: HTTP GETs of 4 KiB and 4 MiB objects through signed URLs, dosd
//! against nginx with `secure_link` (the closest peer that also checks a signature per
//! request), both driven by the same `wrk` at the same threads and connections
//! (issue 12).
//!
//! - **dosd**: a release node with `--cluster-key-file` (a key generated for the run),
//!   `--http-listen 127.0.0.1:0`, `--dataplane-cores N` and two file-backed disks. The
//!   objects are stored with the DOSP client (signed with the same key); each gets a
//!   URL from [`dosp::auth::srl_path`] (`/<request>/<HMAC-SHA256>/<md5hex>`).
//! - **nginx**: Debian's, `worker_processes N` (the same N as dosd's dataplane loops),
//!   `sendfile on`, keep-alive, the same bytes as files named by their MD5 under a
//!   docroot, reachable only through
//!   `location /s/ { secure_link $arg_md5,$arg_expires; secure_link_md5
//!   "$secure_link_expires$uri SECRET"; … }`, so each URL is
//!   `/s/<md5hex>?md5=<base64url(md5(expires ‖ uri ‖ " SECRET"))>&expires=<t>`;
//!   everything else is 404.
//! - **Before measuring** both sides are checked: one 4 KiB and one 4 MiB URL each give
//!   200 with a body of the right MD5; the same URL with its signature altered, and an
//!   object's URL carrying another object's signature, give 403. Then every URL is
//!   fetched once (warming both, every body's MD5 checked).
//! - **Measuring**: `wrk -tT -cC -dS --timeout 10s` with a generated Lua script that
//!   rotates over the URL list (each thread from its own offset) and prints a
//!   machine-readable summary in `done()`: requests, bytes, errors by kind (connect,
//!   read, write, timeout, non-2xx/3xx status), p50 and p99 latency. A run with any
//!   error is reported as an error with its counts, never as a rate. dosd and nginx
//!   take turns on each (size, connections) cell, the first alternating.
//! - **CPU-s/GB**: user + system seconds of the server's processes (all threads; for
//!   nginx its master and workers) from `/proc/PID/stat` just before and after each
//!   wrk run, per 10^9 bytes of object payload served.
//!
//! Knobs: DOSD_BENCH_HTTP_SECS (5, seconds of each wrk run), DOSD_BENCH_HTTP_CONNS
//! (`1,8,64`), DOSD_BENCH_HTTP_THREADS (2; wrk gets min(this, connections)),
//! DOSD_BENCH_HTTP_LOOPS (1: dosd's dataplane loops and nginx's workers),
//! DOSD_BENCH_HTTP_SMALL (1024 objects of 4 KiB), DOSD_BENCH_HTTP_LARGE (32 of 4 MiB),
//! DOSD_BENCH_HTTP_NGINX_DIRECTIO (0; 1 makes nginx read files of 512 KiB and more
//! with O_DIRECT, `directio 512k`, as dosd reads its disks, instead of sendfile from
//! the page cache), DOSD_BENCH_SEED.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use md5::{Digest, Md5};
use rand::RngCore;

use dosp::auth::{srl_path, CertMode, KeyRing};
use dosp::signed::Signer;
use dosp::Fingerprint;

use super::child::run_bounded;
use super::common::data;
use super::http::HttpClient;
use super::load::{self, Budget};
use super::nginx::{find_or_install, find_or_install_package, Nginx};
use super::side_by_side::{env_counts, env_or, markdown_table, object, sig3, Dosd};

const SMALL: usize = 4 << 10;
const LARGE: usize = 4 << 20;
const TAG_SMALL: u64 = 0x200;
const TAG_LARGE: u64 = 0x201;
/// How long the URLs of a run stay valid.
const URL_TTL_S: u64 = 3600;

/// The knobs, from the environment (see the module comment and benches/README.md).
#[derive(Debug, Clone)]
pub struct Config {
    secs: u64,
    conns: Vec<usize>,
    threads: usize,
    loops: usize,
    small: usize,
    large: usize,
    seed: u64,
    /// nginx reads files of 512 KiB and more with O_DIRECT (`directio`, which turns
    /// sendfile off for them), as dosd reads its disks, instead of from the page cache.
    nginx_directio: bool,
}

impl Config {
    pub fn from_env() -> Config {
        let conns = env_counts("DOSD_BENCH_HTTP_CONNS", &[1, 8, 64]);
        Config {
            secs: env_or("DOSD_BENCH_HTTP_SECS", 5u64).clamp(1, 60),
            conns,
            threads: env_or("DOSD_BENCH_HTTP_THREADS", 2usize).max(1),
            loops: env_or("DOSD_BENCH_HTTP_LOOPS", 1usize).clamp(1, 16),
            small: env_or("DOSD_BENCH_HTTP_SMALL", 1024usize).max(2),
            large: env_or("DOSD_BENCH_HTTP_LARGE", 32usize).max(2),
            seed: env_or("DOSD_BENCH_SEED", 1),
            nginx_directio: env_or("DOSD_BENCH_HTTP_NGINX_DIRECTIO", 0) != 0,
        }
    }
}

/// base64url without padding (RFC 4648 §5), as nginx's `secure_link` reads `md5=`.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |k: usize| u32::from(chunk.get(k).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for k in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize]));
        }
    }
    out
}

/// One object in both servers, with its URL on each.
struct Item {
    fp: Fingerprint,
    dosd: String,
    nginx: String,
}

/// The nginx URL of `fp`: `/s/<md5hex>?md5=<base64url(md5(expires uri " SECRET"))>&expires=<t>`.
fn nginx_url(fp: &Fingerprint, expires: u64, secret: &str) -> String {
    let uri = format!("/s/{}", fp.to_hex());
    let mac = Md5::digest(format!("{expires}{uri} {secret}").as_bytes());
    nginx_url_with(&uri, &base64url(&mac), expires)
}

fn nginx_url_with(uri: &str, mac: &str, expires: u64) -> String {
    format!("{uri}?md5={mac}&expires={expires}")
}

/// A different base64url character in place of the one at `at`.
fn alter_char(s: &str, at: usize) -> String {
    let mut b = s.as_bytes().to_vec();
    if let Some(c) = b.get_mut(at) {
        *c = if *c == b'A' { b'B' } else { b'A' };
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// The dosd URL with the first character of its signature (second segment) changed.
fn tamper_dosd(url: &str) -> String {
    // "/<request>/<signature>/<name>": the signature starts after the second '/'.
    match url.match_indices('/').nth(1) {
        Some((at, _)) => alter_char(url, at + 1),
        None => url.to_string(),
    }
}

/// The dosd URL of `a` with the signature of `b`'s URL.
fn swap_dosd(a: &str, b: &str) -> String {
    let seg = |u: &str| u.split('/').map(str::to_string).collect::<Vec<_>>();
    let (mut sa, sb) = (seg(a), seg(b));
    if let (Some(x), Some(y)) = (sa.get_mut(2), sb.get(2)) {
        x.clone_from(y);
    }
    sa.join("/")
}

/// The nginx URL with the first character of its `md5=` changed.
fn tamper_nginx(url: &str) -> String {
    match url.find("md5=") {
        Some(at) => alter_char(url, at + 4),
        None => url.to_string(),
    }
}

/// The nginx URL of `a` (its path) with `b`'s `md5=` and `expires=`.
fn swap_nginx(a: &str, b: &str) -> String {
    let path = a.split('?').next().unwrap_or(a);
    let query = b.split_once('?').map_or("", |(_, q)| q);
    format!("{path}?{query}")
}

fn dosd_url(i: &Item) -> &str {
    &i.dosd
}

fn nginx_url_of(i: &Item) -> &str {
    &i.nginx
}

/// One GET on a fresh connection (`Connection: close`): status and body.
fn get_once(addr: &str, path: &str) -> Result<(u16, Vec<u8>), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| format!("socket options: {e}"))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{addr}{path}: no response head"))?;
    let status = std::str::from_utf8(&response[..head_end])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}{path}: no status"))?;
    Ok((status, response.split_off(head_end + 4)))
}

/// Checks that `server` serves `item` (200, right MD5) and refuses its URL with the
/// signature altered and with `other`'s signature (403 each). Returns what was seen.
fn check_signatures(
    server: &str,
    addr: &str,
    urls: [(&Item, &Item); 2],
    url_of: fn(&Item) -> &str,
    tamper: fn(&str) -> String,
    swap: fn(&str, &str) -> String,
) -> Result<String, String> {
    let mut seen = Vec::new();
    for (item, other) in urls {
        let url = url_of(item);
        let (status, body) = get_once(addr, url)?;
        let md5 = Fingerprint::of(&body);
        if status != 200 || md5 != item.fp {
            return Err(format!(
                "{server}: {url} gave {status} with {} bytes of MD5 {md5}, expected 200 and {}",
                body.len(),
                item.fp
            ));
        }
        seen.push(format!("200 ({} B, MD5 right)", body.len()));
        for (what, bad) in [
            ("altered signature", tamper(url)),
            ("another object's signature", swap(url, url_of(other))),
        ] {
            let (status, _) = get_once(addr, &bad)?;
            if status != 403 {
                return Err(format!(
                    "{server}: {bad} ({what}) gave {status}, expected 403"
                ));
            }
        }
        seen.push("403, 403".into());
    }
    Ok(format!("{server}: {}", seen.join("; ")))
}

/// Fetches every URL once over keep-alive connections, checking each body's MD5.
fn fetch_all(addr: &str, items: &[Item], url_of: fn(&Item) -> &str) -> Result<(), String> {
    load::run(
        4,
        Budget {
            secs: 600.0,
            ops_max: items.len() as u64,
        },
        &|| 0.0,
        |_| HttpClient::connect(addr),
        |c, i| {
            let item = &items[i as usize];
            let mut md5 = Md5::new();
            let n = c.get(url_of(item), None, &mut |piece| md5.update(piece))?;
            let got = Fingerprint(md5.finalize().into());
            if got != item.fp {
                return Err(format!("{addr}{}: body MD5 {got}", url_of(item)));
            }
            Ok(n)
        },
    )
    .map(|_| ())
}

/// The Lua script given to wrk: rotate over the paths in the file named by the first
/// script argument, each thread from its own offset; print a summary line in `done`.
const WRK_SCRIPT: &str = r#"-- Generated by dosd's throughput bench (benches/throughput/signed_http.rs).
local paths = {}
local at = 1
local threads = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then paths[#paths + 1] = line end
  end
  if #paths == 0 then error("no paths in " .. tostring(args[1])) end
  at = math.floor((tid or 0) * 0.618 * #paths) % #paths + 1
end

function request()
  local path = paths[at]
  at = at % #paths + 1
  return wrk.format("GET", path)
end

-- %.0f rather than %d: every value is a Lua number, and Lua 5.3's %d refuses a
-- float (LuaJIT, Debian's, takes either).
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "wrk-summary requests=%.0f bytes=%.0f duration_us=%.0f connect=%.0f read=%.0f write=%.0f status=%.0f timeout=%.0f p50_us=%.0f p99_us=%.0f\n",
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"#;

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
struct WrkRun {
    requests: u64,
    /// Object bytes served (requests × object size).
    payload: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    server_cpu_s: f64,
}

impl WrkRun {
    fn req_s(&self) -> f64 {
        self.requests as f64 / self.secs
    }

    fn mib_s(&self) -> f64 {
        self.payload as f64 / self.secs / (1 << 20) as f64
    }

    fn cpu_s_per_gb(&self) -> f64 {
        self.server_cpu_s / (self.payload as f64 / 1e9)
    }
}

/// Reads the `wrk-summary` line; an error names every kind of failure counted.
fn parse_summary(out: &str, object_len: u64) -> Result<WrkRun, String> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("wrk-summary "))
        .ok_or_else(|| format!("no summary from wrk: {}", out.trim()))?;
    let field = |name: &str| -> Result<f64, String> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("wrk summary without {name}: {line}"))
    };
    let requests = field("requests")? as u64;
    let secs = field("duration_us")? / 1e6;
    let errors: Vec<String> = ["status", "connect", "read", "write", "timeout"]
        .iter()
        .map(|&k| field(k).map(|n| (k, n as u64)))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .map(|(k, n)| {
            if k == "status" {
                format!("{n} non-2xx/3xx")
            } else {
                format!("{n} socket {k} errors")
            }
        })
        .collect();
    if !errors.is_empty() {
        return Err(format!(
            "{requests} requests in {secs:.1} s with {}",
            errors.join(", ")
        ));
    }
    if requests == 0 || secs <= 0.0 {
        return Err(format!("wrk completed no request: {line}"));
    }
    Ok(WrkRun {
        requests,
        payload: requests * object_len,
        secs,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
        server_cpu_s: 0.0,
    })
}

/// One wrk run against `base` over the paths in `list`, with the server's CPU seconds
/// read before and after by `server_cpu`.
#[allow(clippy::too_many_arguments)]
fn wrk_run(
    wrk: &Path,
    script: &Path,
    list: &Path,
    base: &str,
    threads: usize,
    conns: usize,
    secs: u64,
    object_len: u64,
    server_cpu: &dyn Fn() -> f64,
) -> Result<WrkRun, String> {
    let mut cmd = Command::new(wrk);
    cmd.arg(format!("-t{}", threads.min(conns)))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .args(["--timeout", "10s", "-s"])
        .arg(script)
        .arg(base)
        .arg("--")
        .arg(list);
    let before = server_cpu();
    let finished = run_bounded(&mut cmd, &|_, _| {}, None, Duration::from_secs(secs + 30))?;
    let cpu = server_cpu() - before;
    match finished.code {
        Some(0) => {}
        Some(code) => {
            return Err(format!(
                "wrk exited with {code}: {}",
                finished.stdout.trim()
            ))
        }
        None => {
            return Err(format!(
                "wrk still ran after {} s and was killed",
                secs + 30
            ))
        }
    }
    let mut run = parse_summary(&finished.stdout, object_len)?;
    run.server_cpu_s = cpu;
    Ok(run)
}

/// One line of the table.
struct Row {
    size: &'static str,
    conns: usize,
    threads: usize,
    dosd: Result<WrkRun, String>,
    nginx: Result<WrkRun, String>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh random cluster key in `dir` (mode 0600) and its ring.
fn make_key(dir: &Path) -> Result<(PathBuf, KeyRing), String> {
    use std::os::unix::fs::PermissionsExt;
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let text = format!("bench {}\n", hex::encode(secret));
    let path = dir.join("cluster.keys");
    std::fs::write(&path, &text).map_err(|e| format!("key file: {e}"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("key file mode: {e}"))?;
    let ring = KeyRing::parse(&text).map_err(|e| format!("key file: {e}"))?;
    Ok((path, ring))
}

/// Runs the part and prints its table (or why it could not run).
pub fn run(cfg: &Config, tmp: &Path) {
    eprintln!("signed URLs over HTTP: {cfg:?}");
    if let Err(e) = run_checked(cfg, tmp) {
        println!();
        println!("signed URLs over HTTP against nginx secure_link: not measured: {e}");
    }
}

fn run_checked(cfg: &Config, tmp: &Path) -> Result<(), String> {
    let wrk = find_or_install_package("wrk", "wrk")?;
    let nginx_bin = find_or_install()?;
    let dir = tmp.join("http");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).map_err(|e| format!("docroot: {e}"))?;
    let (key_path, ring) = make_key(&dir)?;
    let signer = Signer::new(ring.clone(), CertMode::HmacSha256);

    // Both disks together hold every object twice over, and at least 1 GiB each.
    let total = (cfg.small * SMALL + cfg.large * LARGE) as u64;
    let disk_mib = (total >> 20).max(1024) + 256;
    let loops = cfg.loops.to_string();
    let key_arg = key_path.display().to_string();
    let mut dosd = Dosd::start_with(
        dir.join("dosd"),
        &format!("{disk_mib}M"),
        &[
            "--dataplane-cores",
            &loops,
            "--cluster-key-file",
            &key_arg,
            "--http-listen",
            "127.0.0.1:0",
        ],
    );
    let dosd_addr = dosd
        .http_addr()
        .ok_or("dosd's ready line has no http= address")?
        .to_string();

    // The objects: files for nginx, stored objects for dosd, with a URL on each side.
    let expires = unix_now() + URL_TTL_S;
    let mut secret = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut secret);
    let secret = hex::encode(secret);
    let mut families: Vec<Vec<Item>> = Vec::new();
    for (tag, len, count) in [(TAG_SMALL, SMALL, cfg.small), (TAG_LARGE, LARGE, cfg.large)] {
        let base = data(cfg.seed ^ tag, len);
        let mut items = Vec::with_capacity(count);
        for i in 0..count as u64 {
            let o = object(&base, tag, i);
            let fp = Fingerprint::of(&o);
            std::fs::write(www.join(fp.to_hex()), &o).map_err(|e| format!("docroot: {e}"))?;
            items.push(Item {
                fp,
                dosd: srl_path(&ring, &fp, expires, None),
                nginx: nginx_url(&fp, expires, &secret),
            });
        }
        load::run(
            4,
            Budget {
                secs: 600.0,
                ops_max: count as u64,
            },
            &|| 0.0,
            |_| {
                let mut c = dosd.connect()?;
                c.set_signer(Some(signer.clone()));
                Ok(c)
            },
            |c, i| {
                let o = object(&base, tag, i);
                let got = c.store_bytes(&o).map_err(|e| e.to_string())?;
                if got.fingerprint != items[i as usize].fp {
                    return Err(format!("dosd named object {i} {}", got.fingerprint));
                }
                Ok(o.len() as u64)
            },
        )
        .map_err(|e| format!("storing the objects in dosd: {e}"))?;
        families.push(items);
    }
    let _ = Command::new("sync").status();

    // The 4 MiB files from the disk on every request, as dosd reads them; nginx reads
    // them into its output buffers then (sendfile is off for directio files).
    let directio = if cfg.nginx_directio {
        "directio 512k; directio_alignment 4k; output_buffers 2 256k;"
    } else {
        ""
    };
    let locations = format!(
        "location /s/ {{
            {directio}
            secure_link $arg_md5,$arg_expires;
            secure_link_md5 \"$secure_link_expires$uri {secret}\";
            if ($secure_link = \"\") {{ return 403; }}
            if ($secure_link = \"0\") {{ return 410; }}
            alias {}/;
        }}
        location / {{ return 404; }}",
        www.display()
    );
    let nginx = Nginx::start_with(&nginx_bin, &dir.join("nginx"), &www, cfg.loops, &locations)?;
    let nginx_name = Nginx::version(&nginx_bin);

    // Both sides must verify signatures before anything is measured.
    let (small, large) = (&families[0], &families[1]);
    let pairs = [(&small[0], &small[1]), (&large[0], &large[1])];
    let checked = [
        check_signatures("dosd", &dosd_addr, pairs, dosd_url, tamper_dosd, swap_dosd)?,
        check_signatures(
            &nginx_name,
            &nginx.addr,
            pairs,
            nginx_url_of,
            tamper_nginx,
            swap_nginx,
        )?,
    ];
    let (status, _) = get_once(&nginx.addr, &format!("/{}", small[0].fp.to_hex()))?;
    if status != 404 {
        return Err(format!("nginx served an unsigned path with {status}"));
    }
    let (status, _) = get_once(&nginx.addr, &format!("/s/{}", small[0].fp.to_hex()))?;
    if status != 403 {
        return Err(format!(
            "nginx answered a URL without signature with {status}"
        ));
    }
    for c in &checked {
        eprintln!("  checked {c}");
    }
    for items in &families {
        fetch_all(&dosd_addr, items, dosd_url).map_err(|e| format!("dosd warm pass: {e}"))?;
        fetch_all(&nginx.addr, items, nginx_url_of).map_err(|e| format!("nginx warm pass: {e}"))?;
    }

    let script = dir.join("rotate.lua");
    std::fs::write(&script, WRK_SCRIPT).map_err(|e| format!("wrk script: {e}"))?;
    let mut rows = Vec::new();
    let mut turn = 0;
    for (items, size, len) in [(small, "4 KiB", SMALL), (large, "4 MiB", LARGE)] {
        let list = |name: &str, url_of: fn(&Item) -> &str| -> Result<PathBuf, String> {
            let path = dir.join(name);
            let text: String = items.iter().map(|i| format!("{}\n", url_of(i))).collect();
            std::fs::write(&path, text).map_err(|e| format!("{name}: {e}"))?;
            Ok(path)
        };
        let dosd_list = list(&format!("dosd-{len}.txt"), dosd_url)?;
        let nginx_list = list(&format!("nginx-{len}.txt"), nginx_url_of)?;
        for &conns in &cfg.conns {
            let run_dosd = || {
                wrk_run(
                    &wrk,
                    &script,
                    &dosd_list,
                    &format!("http://{dosd_addr}"),
                    cfg.threads,
                    conns,
                    cfg.secs,
                    len as u64,
                    &|| dosd.cpu_s(),
                )
            };
            let run_nginx = || {
                wrk_run(
                    &wrk,
                    &script,
                    &nginx_list,
                    &format!("http://{}", nginx.addr),
                    cfg.threads,
                    conns,
                    cfg.secs,
                    len as u64,
                    &|| nginx.cpu_s(),
                )
            };
            // Take turns at going first, so a change in the machine's load during
            // the run does not always fall on the same side.
            let (d, n) = if turn % 2 == 0 {
                let d = run_dosd();
                (d, run_nginx())
            } else {
                let n = run_nginx();
                (run_dosd(), n)
            };
            turn += 1;
            for (side, r) in [("dosd", &d), ("nginx", &n)] {
                match r {
                    Ok(r) => eprintln!(
                        "  GET {size} c={conns:<3} {side:<6} {:>9.0} req/s {:>8.1} MiB/s",
                        r.req_s(),
                        r.mib_s()
                    ),
                    Err(e) => eprintln!("  GET {size} c={conns:<3} {side:<6} failed: {e}"),
                }
            }
            rows.push(Row {
                size,
                conns,
                threads: cfg.threads.min(conns),
                dosd: d,
                nginx: n,
            });
        }
    }
    drop(nginx);
    println!();
    println!(
        "signed URLs over HTTP: dosd --dataplane-cores {loops} against {nginx_name} \
         secure_link with worker_processes {loops} (one worker per dataplane loop), \
         both keep-alive, nginx {}; wrk {} s per run, {} × 4 KiB and {} × 4 MiB \
         objects, every URL fetched once (MD5 checked) before; signatures checked first:",
        if cfg.nginx_directio {
            "reading files ≥ 512 KiB with O_DIRECT (directio, no sendfile for them)"
        } else {
            "sendfile from the page cache"
        },
        cfg.secs,
        cfg.small,
        cfg.large
    );
    for c in &checked {
        println!("  {c} (each: valid URL; altered, swapped signature)");
    }
    print_table(&rows);
    dosd.stop();
    Ok(())
}

fn print_table(rows: &[Row]) {
    let header = [
        "GET",
        "wrk -t/-c",
        "dosd req/s",
        "nginx req/s",
        "dosd ÷ nginx",
        "dosd MiB/s",
        "nginx MiB/s",
        "dosd CPU-s/GB",
        "nginx CPU-s/GB",
        "CPU/GB dosd ÷ nginx",
        "dosd p50/p99 ms",
        "nginx p50/p99 ms",
    ];
    let right = [
        false, true, true, true, true, true, true, true, true, true, true, true,
    ];
    let ms = |r: &WrkRun| format!("{}/{}", sig3(r.p50_us / 1e3), sig3(r.p99_us / 1e3));
    let mut cells = Vec::new();
    let mut errors = Vec::new();
    for r in rows {
        let side = |x: &Result<WrkRun, String>, name: &str, errors: &mut Vec<String>| match x {
            Ok(w) => [
                format!("{:.0}", w.req_s()),
                sig3(w.mib_s()),
                sig3(w.cpu_s_per_gb()),
                ms(w),
            ],
            Err(e) => {
                errors.push(format!("{} -c{} {name}: {e}", r.size, r.conns));
                ["error".to_string(), "—".into(), "—".into(), "—".into()]
            }
        };
        let [d_req, d_mib, d_cpu, d_ms] = side(&r.dosd, "dosd", &mut errors);
        let [n_req, n_mib, n_cpu, n_ms] = side(&r.nginx, "nginx", &mut errors);
        let (ratio, cpu_ratio) = match (&r.dosd, &r.nginx) {
            (Ok(d), Ok(n)) => (
                format!("{:.2}×", d.req_s() / n.req_s()),
                format!("{:.2}×", d.cpu_s_per_gb() / n.cpu_s_per_gb()),
            ),
            _ => ("—".into(), "—".into()),
        };
        cells.push(vec![
            r.size.to_string(),
            format!("{}/{}", r.threads, r.conns),
            d_req,
            n_req,
            ratio,
            d_mib,
            n_mib,
            d_cpu,
            n_cpu,
            cpu_ratio,
            d_ms,
            n_ms,
        ]);
    }
    markdown_table(&header, &right, &cells);
    for e in errors {
        println!("  error: {e}");
    }
}
