//! The operator's status page (`GET /` on the management endpoint) rendered by a real
//! browser: Debian's `chromium`, headless, against a real `dosd` with two file disks
//! and objects being stored while the page polls. Asserts on the DOM the page's script
//! built (node id, both disks online, the health status, plots with data points; then
//! a disk taken offline and the node degraded with the reason), on the "connection
//! lost" state when the API does not answer, on a console free of Content-Security-
//! Policy violations and script errors, and leaves screenshots in
//! `target/status-page.png` (1280×900) and `target/status-page-narrow.png` (390×844).
//!
//! Skipped, saying SKIPPED, when there is no `chromium` (scripts/test.sh installs it);
//! `$DOSD_CHROMIUM` names another binary.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "status-page-test-token";

/// Longest a chromium run may take: its start-up alone can take 10 s and more on a
/// loaded 2-core machine.
const CHROMIUM_LIMIT: Duration = Duration::from_secs(120);
/// Virtual time the page gets before the DOM is dumped or the screenshot taken: about
/// five polls at 1 s (network waits pause virtual time, so every poll completes).
const VIRTUAL_TIME_MS: u32 = 5500;

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DOSD_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|p| p.is_file())
}

/// Where screenshots go: `target/` (the parent of cargo's scratch directory for tests).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .to_path_buf()
}

/// Says something in the test's output even when it passes (libtest captures only
/// the print macros).
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Runs headless chromium on `url` with `mode` (`--dump-dom` or `--screenshot=…`),
/// killing it if it outlives [`CHROMIUM_LIMIT`].
fn run_chromium(chrome: &Path, profile: &Path, url: &str, mode: &[&str]) -> Output {
    let started = Instant::now();
    let mut child = Command::new(chrome)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            // The page's console on stderr: CSP violations and script errors show.
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={VIRTUAL_TIME_MS}"))
        .args(mode)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", chrome.display()));
    // Drain both pipes on threads so a chatty browser never blocks on them.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > CHROMIUM_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&err.join().unwrap()).into_owned();
            panic!("chromium {mode:?} did not finish in {CHROMIUM_LIMIT:?}:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    say(&format!(
        "chromium {} took {:.1} s",
        mode.join(" "),
        started.elapsed().as_secs_f64()
    ));
    assert!(
        output.status.success(),
        "chromium {mode:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Console lines of a chromium run that mean the page broke: a Content-Security-Policy
/// violation (something the policy blocked) or an uncaught script error.
fn page_faults(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains("Content Security Policy") || l.contains("Uncaught"))
        .map(str::to_string)
        .collect()
}

/// The start tag of the element with `id="id"` and its text (up to the next tag).
fn element<'a>(dom: &'a str, id: &str) -> (&'a str, &'a str) {
    let at = dom
        .find(&format!(" id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the DOM:\n{dom}"));
    let start = dom[..at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap() + 1;
    let text_end = end + dom[end..].find('<').unwrap_or(0);
    (&dom[start..end], &dom[end..text_end])
}

/// The value of attribute `name` in start tag `tag`.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let at = tag.find(&key)? + key.len();
    Some(&tag[at..at + tag[at..].find('"')?])
}

/// Every start tag of `dom` that begins with `prefix` (e.g. `<polyline`).
fn tags<'a>(dom: &'a str, prefix: &str) -> Vec<&'a str> {
    dom.match_indices(prefix)
        .map(|(i, _)| &dom[i..i + dom[i..].find('>').unwrap() + 1])
        .collect()
}

/// A plot's figure: its `data-points`, and its polylines' (series, data-points, points).
fn plot(dom: &str, id: &str) -> (usize, Vec<(String, usize, usize)>) {
    let (fig, _) = element(dom, id);
    let n = attr(fig, "data-points").unwrap().parse().unwrap();
    let start = dom.find(fig).unwrap();
    let body = &dom[start..start + dom[start..].find("</figure>").unwrap()];
    let lines = tags(body, "<polyline")
        .into_iter()
        .map(|t| {
            let series = attr(t, "data-series").unwrap().to_string();
            let claimed = attr(t, "data-points").unwrap().parse().unwrap();
            let points = attr(t, "points").unwrap().split_whitespace().count();
            (series, claimed, points)
        })
        .collect();
    (n, lines)
}

/// Fetches `objects` (over the cache's 64 KiB, so the disks read them) and stores
/// small new ones until told to stop (or a bound that keeps the disks far from full),
/// so the counters the plots are drawn from move while the browser polls.
fn load(
    node: &Node,
    objects: Vec<(dosp::Fingerprint, Vec<u8>)>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<u64, String>> {
    // Errors are returned, not panicked on: if the test fails first and kills the
    // node, this thread's failure would only be noise after the real one.
    let mut client = node.client();
    std::thread::spawn(move || {
        let mut ops = 0u64;
        for i in 0..3000u64 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let (fp, bytes) = &objects[i as usize % objects.len()];
            let mut out = Vec::new();
            client
                .retrieve(fp, &mut out, &mut |_, _| {})
                .map_err(|e| format!("retrieve under load: {e}"))?;
            if &out != bytes {
                return Err(format!("object {fp} came back different"));
            }
            client
                .store_bytes(&data(1000 + i, 8192))
                .map_err(|e| format!("store under load: {e}"))?;
            ops += 2;
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(ops)
    })
}

#[test]
fn status_page_renders_in_headless_chromium() {
    let Some(chrome) = chromium() else {
        say("SKIPPED: status_page: no chromium on PATH (apt-get install chromium, or set DOSD_CHROMIUM)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        &unique_group(),
        &["--mgmt-token", TOKEN],
    );
    let mut client = node.client();
    let objects: Vec<_> = (0..8)
        .map(|seed| {
            let bytes = data(seed, 100_000);
            (client.store_bytes(&bytes).unwrap().fingerprint, bytes)
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(&node, objects, Arc::clone(&stop));
    let url = format!("http://{}/", node.mgmt);
    let profile = dir.path().join("chromium-profile");

    let out = run_chromium(&chrome, &profile, &url, &["--dump-dom"]);
    assert_eq!(page_faults(&out), Vec::<String>::new());
    let dom = String::from_utf8(out.stdout).expect("UTF-8 DOM");

    // The script ran and its polls succeeded.
    let (conn, conn_text) = element(&dom, "conn");
    assert_eq!(attr(conn, "data-state"), Some("ok"), "{conn} {conn_text}");
    assert_eq!(conn_text, "Live");
    assert!(dom.contains("<body data-conn=\"ok\">"), "{dom}");
    // Node, from /v1/node.
    let (_, id) = element(&dom, "node-id");
    assert_eq!(id, node.node_id);
    assert!(
        dom.contains("<dt>Backends</dt><dd>network kernel, disks file</dd>"),
        "{dom}"
    );
    // Health, from /v1/health: a fresh node with both disks in service.
    let (status, status_text) = element(&dom, "health-status");
    assert_eq!(status_text, "ok", "{status}");
    assert_eq!(attr(status, "data-value"), Some("ok"));
    let (_, summary) = element(&dom, "health-summary");
    assert!(
        summary.starts_with("disks: 2 online, 0 offline, 0 down"),
        "{summary}"
    );
    // Both disks, each online, with its space bar and I/O counters.
    let disks = tags(&dom, "<article class=\"disk\"");
    assert_eq!(disks.len(), 2, "{dom}");
    for (i, disk) in disks.iter().enumerate() {
        assert_eq!(attr(disk, "data-disk-id"), Some(i.to_string().as_str()));
        assert_eq!(attr(disk, "data-state"), Some("online"), "{disk}");
        let (_, h3) = element(&dom, &format!("disk-{i}-h"));
        assert_eq!(h3, format!("Disk {i}"));
        assert!(
            dom.contains(&format!("aria-label=\"Disk {i} space used: ")),
            "no space bar for disk {i}"
        );
    }
    assert_eq!(
        dom.matches("<span class=\"badge state\" data-value=\"online\">online</span>")
            .count(),
        2
    );
    assert!(dom.contains("<dt>Device health</dt><dd>none reported by this backend</dd>"));
    // Plots: each has rates from consecutive /metrics samples, every series drawn
    // with as many points as the figure claims.
    for id in ["plot-ops", "plot-net", "plot-disk"] {
        let (n, lines) = plot(&dom, id);
        assert!(n >= 2, "{id}: {n} data points");
        assert_eq!(lines.len(), 2, "{id}: {lines:?}");
        for (series, claimed, points) in lines {
            assert_eq!(claimed, n, "{id} {series}");
            assert_eq!(points, n, "{id} {series}");
        }
    }

    // Screenshots, with the load still running so the plots have something to show.
    let shots = [
        ("status-page.png", "1280,900"),
        ("status-page-narrow.png", "390,844"),
    ];
    for (name, size) in shots {
        let path = target_dir().join(name);
        let _ = std::fs::remove_file(&path);
        let out = run_chromium(
            &chrome,
            &profile,
            &url,
            &[
                &format!("--screenshot={}", path.display()),
                &format!("--window-size={size}"),
                "--hide-scrollbars",
            ],
        );
        assert_eq!(page_faults(&out), Vec::<String>::new());
        let png = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        say(&format!(
            "status page screenshot ({size}): {}",
            path.display()
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let ops = loader.join().expect("load thread").unwrap();
    say(&format!(
        "{ops} DOSP operations ran while the page was polled"
    ));

    // An operator takes disk 1 out of service: the page shows it offline and the
    // node degraded, with the reason.
    let auth = format!("Bearer {TOKEN}");
    let (head, body) = http(
        node.mgmt,
        "POST",
        "/v1/disks/1/offline",
        &[("Authorization", &auth)],
    );
    assert!(
        head.starts_with("HTTP/1.1 200 "),
        "{head}\n{}",
        String::from_utf8_lossy(&body)
    );
    let out = run_chromium(&chrome, &profile, &url, &["--dump-dom"]);
    assert_eq!(page_faults(&out), Vec::<String>::new());
    let dom = String::from_utf8(out.stdout).expect("UTF-8 DOM");
    let disks = tags(&dom, "<article class=\"disk\"");
    assert_eq!(attr(disks[0], "data-state"), Some("online"), "{dom}");
    assert_eq!(attr(disks[1], "data-state"), Some("offline"), "{dom}");
    assert!(dom.contains("<span class=\"badge state\" data-value=\"offline\">offline</span>"));
    let (_, status) = element(&dom, "health-status");
    assert_eq!(status, "degraded");
    assert!(
        dom.contains("<li data-kind=\"disk_offline\"><span class=\"badge\" data-value=\"degraded\">degraded</span> <span class=\"mono\">disk_offline</span> (disk 1): "),
        "{dom}"
    );
}

/// Serves the node's page at `/` and nothing else: every API request's connection is
/// closed unanswered, as if the node had gone away after the page loaded.
fn page_without_api(page: Vec<u8>, csp: String, stop: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && matches!(s.read(&mut byte), Ok(1)) {
                head.push(byte[0]);
            }
            if head.starts_with(b"GET / ") {
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Security-Policy: {csp}\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n",
                    page.len()
                );
                let _ = s.write_all(&page);
            }
            // Anything else: dropped without an answer.
        }
    });
    addr
}

/// One HTTP/1.1 exchange without a request body: (head, body).
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> (String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    (
        String::from_utf8_lossy(&raw[..split]).into_owned(),
        raw[split + 4..].to_vec(),
    )
}

#[test]
fn status_page_shows_connection_lost_when_the_api_does_not_answer() {
    let Some(chrome) = chromium() else {
        say("SKIPPED: status_page: no chromium on PATH (apt-get install chromium, or set DOSD_CHROMIUM)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), &unique_group(), &[]);
    let (head, page) = http(node.mgmt, "GET", "/", &[]);
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let csp = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("content-security-policy:")
                .then(|| l.split_once(':').unwrap().1.trim().to_string())
        })
        .expect("a Content-Security-Policy header");
    drop(node);
    let stop = Arc::new(AtomicBool::new(false));
    let addr = page_without_api(page, csp, Arc::clone(&stop));
    let out = run_chromium(
        &chrome,
        &dir.path().join("chromium-profile"),
        &format!("http://{addr}/"),
        &["--dump-dom"],
    );
    stop.store(true, Ordering::Relaxed);
    assert_eq!(page_faults(&out), Vec::<String>::new());
    let dom = String::from_utf8(out.stdout).expect("UTF-8 DOM");
    // Visible, not a blank page: the banner says so and the skeleton is still there.
    let (conn, text) = element(&dom, "conn");
    assert_eq!(attr(conn, "data-state"), Some("lost"), "{conn} {text}");
    assert!(text.starts_with("Connection lost: /"), "{text}");
    assert!(dom.contains("<body data-conn=\"lost\">"), "{dom}");
    assert!(dom.contains("<h2 id=\"disks-h\">Disks</h2>"));
    let (_, title) = element(&dom, "health-status");
    assert_eq!(title, "unknown");
}
