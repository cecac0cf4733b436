//! Faults against real nodes, through the test-only hooks of `dosd` (hidden flags, see
//! `src/config.rs`): a disk that fails under load, and a dataplane loop that stalls.
//! Each test checks what an operator and a manager see — REST health and disk state,
//! announcements on the multicast group heard by a real `dosp watch` — and that the
//! node keeps serving what it still can, never wrong bytes.
//!
//! Every wait is bounded by a deadline and polls; no assertion depends on a sleep.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use dosp::client::ClientError;
use dosp::wire::Status;
use dosp::Fingerprint;
use serde_json::Value;

/// Generous: these tests must pass on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// GET `path` from the management endpoint as JSON; `None` if the endpoint did not
/// answer (the caller polls again).
fn get_json(node: &Node, path: &str) -> Option<Value> {
    let mut s = TcpStream::connect(node.mgmt).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {text}");
    Some(serde_json::from_str(body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}")))
}

/// Polls `path` until `pred` holds of its JSON, or panics at the deadline with the last
/// answer. Returns the answer that satisfied it.
fn poll_json(node: &Node, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Some(v) = get_json(node, path) {
            if pred(&v) {
                return v;
            }
            last = v;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!(
        "{what}: not seen within {DEADLINE:?}; last {path}: {last}\nnode log:\n{}",
        node.log()
    );
}

fn signal(node: &Node, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &node.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} failed");
}

/// `dosp watch` on the node's group; its lines arrive on a channel so every wait on
/// it is bounded.
struct Watcher {
    child: Child,
    lines: Receiver<String>,
    /// Every line read so far, for failure messages.
    seen: Vec<String>,
}

impl Watcher {
    /// Starts the watcher and waits until it hears `node`'s heartbeat (it has joined).
    fn start(node: &Node) -> Watcher {
        let mut child = Command::new(dosp_bin())
            .args([
                "watch",
                "--multicast",
                &node.group,
                "--multicast-if",
                "127.0.0.1",
                "--seconds",
                "120",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn dosp watch");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut w = Watcher {
            child,
            lines,
            seen: Vec::new(),
        };
        let id = node.node_id.clone();
        w.wait_for("a first heartbeat", |l| {
            l.starts_with("heartbeat") && l.contains(&id)
        });
        w
    }

    /// The first line from now on that satisfies `pred`; panics at the deadline.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "the watcher did not print {what} within {DEADLINE:?}; it printed:\n{}",
            self.seen.join("\n")
        );
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the load thread saw.
#[derive(Default)]
struct Load {
    /// Objects it stored, with the disk each went to.
    stored: Vec<(Fingerprint, Vec<u8>, u16)>,
    stores_failed: u64,
    fetches_ok: u64,
    fetches_failed: u64,
    /// Anything that must never happen: wrong bytes, a failure on a healthy disk, a
    /// status other than DISK_FAILED, a lost connection.
    violations: Vec<String>,
}

fn is_disk_failed(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Status {
            status: Status::DiskFailed,
            ..
        }
    )
}

/// Stores new objects and fetches known ones until `stop`, on one connection, counting
/// finished operations in `ops`. `known` holds the objects stored before the fault,
/// with their disks; `faulty` is the disk that may fail (only its operations may
/// answer DISK_FAILED).
fn load(
    node: &Node,
    known: Vec<(Fingerprint, Vec<u8>, u16)>,
    faulty: u16,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Load> {
    let addr = node.node_arg();
    std::thread::spawn(move || {
        let mut out = Load::default();
        let mut client = match dosp::client::Client::connect(&addr, Duration::from_secs(20)) {
            Ok(c) => c,
            Err(e) => {
                out.violations.push(format!("cannot connect: {e}"));
                return out;
            }
        };
        let mut seed = 10_000u64;
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            seed += 1;
            let bytes = data(seed, 2000 + (seed as usize * 4099) % 60_000);
            match client.store_bytes(&bytes) {
                Ok(s) => out.stored.push((s.fingerprint, bytes, s.disk)),
                // A store on the failing disk may fail; the next one goes elsewhere.
                Err(e) if is_disk_failed(&e) => out.stores_failed += 1,
                Err(e) => {
                    out.violations.push(format!("store: {e}"));
                    return out;
                }
            }
            ops.fetch_add(1, Ordering::Relaxed);
            let (fp, bytes, disk) = &known[i % known.len()];
            i += 1;
            let mut got = Vec::new();
            match client.retrieve(fp, &mut got, &mut |_, _| {}) {
                Ok(_) if got == *bytes => out.fetches_ok += 1,
                Ok(_) => out
                    .violations
                    .push(format!("{fp} on disk {disk}: wrong bytes")),
                Err(e) if is_disk_failed(&e) && *disk == faulty => out.fetches_failed += 1,
                Err(e) => {
                    out.violations
                        .push(format!("fetch {fp} on disk {disk}: {e}"));
                    return out;
                }
            }
            ops.fetch_add(1, Ordering::Relaxed);
        }
        out
    })
}

/// Waits (bounded) until the load thread has finished `n` operations in all. It
/// stops early only on a violation, which the caller reports after joining it.
fn wait_ops(ops: &AtomicU64, n: u64) {
    let deadline = Instant::now() + DEADLINE;
    while ops.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_disk_failing_under_load_goes_down_is_announced_and_the_rest_still_serves() {
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    let mut node = Node::start(
        &dir.path().join("data"),
        &group,
        &["--fault-inject-disk", "0"],
    );
    assert!(
        node.log().contains("TEST HOOK ARMED"),
        "the fault hook is announced loudly:\n{}",
        node.log()
    );

    // Fill both disks a little (new objects go to the disk with the most free space,
    // so they alternate), remembering where each went.
    let mut client = node.client();
    let mut known: Vec<(Fingerprint, Vec<u8>, u16)> = Vec::new();
    for seed in 0..200u64 {
        let bytes = data(seed, 1000 + (seed as usize * 7919) % 50_000);
        let s = client.store_bytes(&bytes).unwrap();
        known.push((s.fingerprint, bytes, s.disk));
        let on = |d: u16| known.iter().filter(|k| k.2 == d).count();
        if on(0) >= 4 && on(1) >= 4 {
            break;
        }
    }
    let on_disk = |d: u16| known.iter().filter(|k| k.2 == d).count();
    assert!(
        on_disk(0) >= 4 && on_disk(1) >= 4,
        "both disks hold objects"
    );
    let health = poll_json(&node, "/v1/health", "health ok", |h| h["status"] == "ok");
    assert_eq!(health["reasons"], serde_json::json!([]));

    let mut watcher = Watcher::start(&node);
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let loader = load(&node, known.clone(), 0, Arc::clone(&stop), Arc::clone(&ops));
    // Under load: the load thread is storing and fetching when the disk fails.
    wait_ops(&ops, 10);
    let failed_at = Instant::now();
    signal(&node, "USR1");

    let d = poll_json(&node, "/v1/disks/0", "disk 0 down", |d| {
        d["state"] == "down"
    });
    assert_eq!(d["id"], 0);
    let line = watcher.wait_for("a disk-down announcement for disk 0", |l| {
        l.starts_with("announce") && l.contains(&node.node_id) && l.contains("disk-down disk 0")
    });
    // The bound the issue asks for: how long a manager on the group waited to hear of
    // the failure, from the fault (the deadline above is the asserted bound).
    eprintln!(
        "disk-down heard {:?} after the fault: {line}",
        failed_at.elapsed()
    );
    let h = poll_json(&node, "/v1/health", "health degraded", |h| {
        h["status"] == "degraded"
    });
    let reasons = h["reasons"].as_array().unwrap();
    assert!(
        reasons
            .iter()
            .any(|r| r["kind"] == "disk_down" && r["disk"] == 0 && r["status"] == "degraded"),
        "a reason names disk 0: {h}"
    );
    assert!(
        !reasons.iter().any(|r| r["disk"] == 1),
        "disk 1 is healthy: {h}"
    );
    assert_eq!(h["disks_down"], 1, "{h}");
    assert_eq!(get_json(&node, "/v1/disks/1").unwrap()["state"], "online");

    // Let the load run on the degraded node a little longer: progress, not time, is
    // what is waited for.
    wait_ops(&ops, ops.load(Ordering::Relaxed) + 20);
    stop.store(true, Ordering::Relaxed);
    let seen = loader.join().expect("load thread");
    assert!(
        seen.violations.is_empty(),
        "under load: {:?}\nnode log:\n{}",
        seen.violations,
        node.log()
    );
    assert!(
        seen.fetches_ok > 0 && !seen.stored.is_empty(),
        "the load ran: {} fetches, {} stores",
        seen.fetches_ok,
        seen.stored.len()
    );
    eprintln!(
        "load: {} stored, {} stores failed, {} fetched, {} fetches failed",
        seen.stored.len(),
        seen.stores_failed,
        seen.fetches_ok,
        seen.fetches_failed
    );

    // Afterwards, with a fresh connection: every object on disk 1 fetches intact,
    // every object on disk 0 answers DISK_FAILED, never bytes.
    let mut client = node.client();
    let all: Vec<(Fingerprint, Vec<u8>, u16)> = known.into_iter().chain(seen.stored).collect();
    let mut counts: HashMap<u16, usize> = HashMap::new();
    for (fp, bytes, disk) in &all {
        let mut got = Vec::new();
        let r = client.retrieve(fp, &mut got, &mut |_, _| {});
        match (*disk, r) {
            (1, Ok(_)) => assert!(got == *bytes, "{fp} on disk 1: wrong bytes"),
            (1, Err(e)) => panic!("{fp} on disk 1 does not fetch: {e}"),
            (_, Err(e)) => assert!(is_disk_failed(&e), "{fp} on disk 0: {e}"),
            (_, Ok(_)) => panic!("{fp} on the down disk 0 was served"),
        }
        *counts.entry(*disk).or_default() += 1;
    }
    assert!(counts[&0] >= 4 && counts[&1] >= 4, "{counts:?}");

    // New objects land on the healthy disk.
    for seed in 50_000..50_005u64 {
        let bytes = data(seed, 3000 + seed as usize % 1000);
        let s = client.store_bytes(&bytes).unwrap();
        assert_eq!(s.disk, 1, "a new store went to the down disk");
        let mut got = Vec::new();
        client
            .retrieve(&s.fingerprint, &mut got, &mut |_, _| {})
            .unwrap();
        assert!(got == bytes);
    }

    // The node never crashed: it still runs, and stops cleanly.
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "dosd exited:\n{}",
        node.log()
    );
    drop(client);
    assert_eq!(node.terminate(), Some(0), "{}", node.log());
}

#[test]
fn a_stalled_dataplane_makes_the_node_failing_until_it_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    let mut node = Node::start(
        &dir.path().join("data"),
        &group,
        &[
            "--test-hooks",
            "--dataplane-stall-ms",
            "500",
            "--test-stall-ms",
            "3000",
        ],
    );
    assert!(node.log().contains("TEST HOOKS ARMED"), "{}", node.log());
    let before = data(1, 5000);
    let fp = node.client().store_bytes(&before).unwrap().fingerprint;
    poll_json(&node, "/v1/health", "health ok", |h| h["status"] == "ok");
    let mut watcher = Watcher::start(&node);

    signal(&node, "USR2");
    // The management core keeps answering while the dataplane loop is blocked: that
    // is what lets it report the stall.
    let h = poll_json(&node, "/v1/health", "health failing", |h| {
        h["status"] == "failing"
    });
    let reasons = h["reasons"].as_array().unwrap();
    assert!(
        reasons.iter().any(|r| r["kind"] == "dataplane_stalled"
            && r["status"] == "failing"
            && r["core"] == 1
            && r["loop"] == 0
            && r["message"].as_str().unwrap().contains("dataplane-0 ")),
        "a reason names the stalled dataplane loop: {h}"
    );
    assert!(h["dataplane_quiet_ms"].as_u64().unwrap() > 500, "{h}");
    let line = watcher.wait_for("a node-failing announcement", |l| {
        l.starts_with("announce") && l.contains(&node.node_id) && l.contains("node-failing")
    });
    assert!(line.contains("dataplane-0"), "the reason is given: {line}");

    // The loop resumes by itself; the node is ok again and serves.
    let h = poll_json(&node, "/v1/health", "health ok again", |h| {
        h["status"] == "ok"
    });
    assert_eq!(h["reasons"], serde_json::json!([]));
    watcher.wait_for("a heartbeat saying ok again", |l| {
        l.starts_with("heartbeat") && l.contains(&node.node_id) && l.contains("health ok")
    });
    let mut client = node.client();
    let mut got = Vec::new();
    client.retrieve(&fp, &mut got, &mut |_, _| {}).unwrap();
    assert!(got == before, "the object stored before the stall");
    let after = data(2, 7000);
    let s = client.store_bytes(&after).unwrap();
    let mut got = Vec::new();
    client
        .retrieve(&s.fingerprint, &mut got, &mut |_, _| {})
        .unwrap();
    assert!(got == after);
    drop(client);
    assert_eq!(node.terminate(), Some(0), "{}", node.log());
}

#[test]
fn a_disk_dying_while_idle_is_found_by_the_probe_and_announced() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        &unique_group(),
        &["--fault-inject-disk", "1"],
    );
    let mut watcher = Watcher::start(&node);
    // Nobody sends a request from here on: only the dataplane's probe can notice.
    let t0 = Instant::now();
    signal(&node, "USR1");
    let line = watcher.wait_for("a disk-down announcement for disk 1", |l| {
        l.starts_with("announce") && l.contains("disk-down disk 1")
    });
    let elapsed = t0.elapsed();
    // The stated bound (PROTOCOL.md, ANNOUNCE) is 1.3 s from failure to first copy;
    // report the measurement rather than assert a wall-clock time on a shared machine.
    println!("idle disk failure announced after {elapsed:?} (bound 1.3 s): {line}");
    let disk = poll_json(&node, "/v1/disks/1", "disk 1 down", |v| {
        v["state"] == "down"
    });
    assert_eq!(disk["state"], "down");
    let health = poll_json(&node, "/v1/health", "degraded", |v| {
        v["status"] == "degraded"
    });
    assert_eq!(health["disks_down"], 1);
}

/// Flips one byte inside every copy of `pattern` in the disk image at `path`, `skip`
/// bytes into it. Returns how many copies were found.
fn flip_byte_in(path: &std::path::Path, pattern: &[u8], skip: usize) -> usize {
    use std::os::unix::fs::FileExt;
    let image = std::fs::read(path).expect("read the disk image");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the disk image");
    let mut found = 0;
    let mut at = 0;
    while let Some(i) = image[at..]
        .windows(pattern.len())
        .position(|w| w == pattern)
        .map(|i| at + i)
    {
        let pos = i + skip;
        f.write_at(&[image[pos] ^ 0x5a], pos as u64).expect("flip");
        found += 1;
        at = i + pattern.len().max(skip + 1);
    }
    f.sync_all().unwrap();
    found
}

#[test]
fn a_corrupt_object_is_counted_on_its_disk_named_and_degrades_health() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let group = unique_group();
    let args = [
        "--disks",
        "1",
        "--disk-size",
        "16M",
        "--heartbeat-ms",
        "200",
    ];
    // A payload the test can find in the disk image: a marker at the start of a
    // 20 KB object, which the node stores contiguously after a header block.
    let marker = b"<<dosd corruption probe: find me in the disk image>>";
    let mut victim = data(77, 20_000);
    victim[..marker.len()].copy_from_slice(marker);
    let bystander = data(78, 30_000);
    let mut node = Node::start_bare(&data_dir, &group, &args);
    let mut client = node.client();
    let fp = client.store_bytes(&victim).unwrap().fingerprint;
    // Stored after it, so the victim's record is vouched durable by a later one and
    // recovery does not mistake the damage for a torn tail.
    let fp_ok = client.store_bytes(&bystander).unwrap().fingerprint;
    drop(client);
    assert_eq!(node.terminate(), Some(0), "{}", node.log());

    // Rot one byte of the victim's data (its second block) while the node is down.
    let image = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "img"))
        .expect("a disk image");
    assert!(flip_byte_in(&image, marker, 5000) >= 1, "marker not found");

    let node = Node::start_bare(&data_dir, &group, &args);
    let mut client = node.client();
    for _ in 0..2 {
        let mut got = Vec::new();
        match client.retrieve(&fp, &mut got, &mut |_, _| {}) {
            Err(ClientError::Status {
                status: Status::ChecksumMismatch,
                ..
            }) => {}
            other => panic!("fetch of the damaged object: {other:?}"),
        }
    }
    let mut got = Vec::new();
    client.retrieve(&fp_ok, &mut got, &mut |_, _| {}).unwrap();
    assert!(got == bystander, "the other object is intact");

    // The operator sees it on the disk: counted once as an object (read twice), as
    // errors, and named in the last error.
    let d = poll_json(&node, "/v1/disks/0", "the damage on disk 0", |d| {
        d["corrupt_objects"] == 1 && d["errors"].as_u64().unwrap_or(0) >= 2
    });
    assert!(d["corrupt_blocks"].as_u64().unwrap() >= 2, "{d}");
    let last = d["last_error"]["message"].as_str().unwrap_or_default();
    assert!(last.contains(&fp.to_hex()), "the object is named: {d}");
    assert_eq!(d["state"], "online", "rot is not a disk failure: {d}");
    let h = poll_json(&node, "/v1/health", "health degraded", |h| {
        h["status"] == "degraded"
    });
    let reasons = h["reasons"].as_array().unwrap();
    assert!(
        reasons.iter().any(|r| r["kind"] == "disk_corrupt_objects"
            && r["disk"] == 0
            && r["status"] == "degraded"
            && r["message"]
                .as_str()
                .unwrap()
                .contains("disk 0 holds 1 object")),
        "a reason names the disk and the count: {h}"
    );
    let metrics = node.get_text("/metrics");
    assert!(
        metrics.contains("\ndosd_disk_corrupt_objects{disk=\"0\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("\ndosd_disk_errors_total{disk=\"0\"} "));

    // Deleting the damaged object and storing a good copy again heals the node.
    assert_eq!(client.delete(&fp).unwrap(), 0);
    poll_json(&node, "/v1/health", "health ok again", |h| {
        h["status"] == "ok"
    });
    assert_eq!(
        get_json(&node, "/v1/disks/0").unwrap()["corrupt_objects"],
        0
    );
    assert_eq!(client.store_bytes(&victim).unwrap().fingerprint, fp);
    let mut got = Vec::new();
    client.retrieve(&fp, &mut got, &mut |_, _| {}).unwrap();
    assert!(got == victim, "the good copy reads back");
}

/// Median of some latencies.
fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn a_slow_disk_slows_only_the_requests_that_touch_it() {
    const SLOW_MS: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let latency = SLOW_MS.to_string();
    let node = Node::start(
        &dir.path().join("n"),
        &unique_group(),
        &[
            "--fault-inject-disk",
            "1",
            "--test-disk-latency-ms",
            &latency,
            // Every fetch must reach its disk.
            "--cache-bytes",
            "0",
        ],
    );
    let mut c = node.client();
    let mut on: [Vec<Fingerprint>; 2] = [Vec::new(), Vec::new()];
    for i in 0..40u64 {
        if on.iter().all(|v| v.len() >= 3) {
            break;
        }
        let s = c.store_bytes(&data(500 + i, 4096)).unwrap();
        on[usize::from(s.disk)].push(s.fingerprint);
    }
    assert!(on.iter().all(|v| v.len() >= 3), "objects per disk: {on:?}");

    // One client keeps fetching from the slow disk while another fetches from the
    // fast one: with a loop that waited on each device call, every fast fetch would
    // queue behind a slow one.
    let stop = Arc::new(AtomicBool::new(false));
    let slow_fps = on[1].clone();
    let mut slow_client = node.client();
    let stop2 = Arc::clone(&stop);
    let slow = std::thread::spawn(move || {
        let mut lat = Vec::new();
        let deadline = Instant::now() + DEADLINE;
        while !stop2.load(Ordering::Relaxed) && lat.len() < 100 && Instant::now() < deadline {
            let t = Instant::now();
            let mut back = Vec::new();
            slow_client
                .retrieve(
                    &slow_fps[lat.len() % slow_fps.len()],
                    &mut back,
                    &mut |_, _| {},
                )
                .unwrap();
            lat.push(t.elapsed());
        }
        lat
    });
    // Let the slow client get going first.
    std::thread::sleep(Duration::from_millis(SLOW_MS / 2));
    let mut fast = Vec::new();
    for k in 0..40 {
        let t = Instant::now();
        let mut back = Vec::new();
        c.retrieve(&on[0][k % on[0].len()], &mut back, &mut |_, _| {})
            .unwrap();
        fast.push(t.elapsed());
        assert_eq!(back.len(), 4096);
    }
    // Keep the slow one busy until it has a few samples.
    std::thread::sleep(Duration::from_millis(2 * SLOW_MS));
    stop.store(true, Ordering::Relaxed);
    let mut slow = slow.join().unwrap();
    assert!(slow.len() >= 2, "slow-disk fetches: {}", slow.len());
    let (f, s) = (median(&mut fast), median(&mut slow));
    eprintln!(
        "per-disk fetch latency, median: fast disk {f:?} ({} fetches), slow disk {s:?} ({} fetches)",
        fast.len(),
        slow.len()
    );
    // The slow disk really is slow (a lower bound the hook guarantees)...
    assert!(s >= Duration::from_millis(SLOW_MS), "{s:?}");
    // ...and the other disk's requests did not wait for it: a ratio, not a time.
    assert!(
        f * 4 < s,
        "fetches from the fast disk waited for the slow one: median {f:?} against {s:?}"
    );
}

#[test]
fn a_stall_hook_for_a_loop_the_node_does_not_run_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--disks",
        "1",
        "--disk-size",
        "32M",
        "--test-hooks",
        "--test-stall-loop",
        "4096",
    ];
    let log = match Node::try_start_under(&[], &dir.path().join("data"), &unique_group(), &args) {
        Ok(mut node) => {
            node.terminate();
            panic!(
                "dosd started with a stall hook for loop 4096:\n{}",
                node.log()
            );
        }
        Err(log) => log,
    };
    let line = log
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(line.contains("--test-stall-loop 4096"), "{line}");
}

#[test]
fn one_stalled_loop_of_two_makes_the_node_failing_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    let mut node = Node::start(
        &dir.path().join("data"),
        &group,
        &[
            "--dataplane-cores",
            "2",
            "--test-hooks",
            "--test-stall-loop",
            "1",
            "--dataplane-stall-ms",
            "500",
            "--test-stall-ms",
            "3000",
        ],
    );
    poll_json(&node, "/v1/health", "health ok", |h| h["status"] == "ok");
    signal(&node, "USR2");
    let h = poll_json(&node, "/v1/health", "health failing", |h| {
        h["status"] == "failing"
    });
    let reasons = h["reasons"].as_array().unwrap();
    assert!(
        reasons.iter().any(|r| r["kind"] == "dataplane_stalled"
            && r["loop"] == 1
            && r["message"].as_str().unwrap().contains("dataplane-1 ")),
        "a reason names loop 1: {h}"
    );
    assert!(
        !reasons.iter().any(|r| r["loop"] == 0),
        "loop 0 kept turning: {h}"
    );
    // Loop 1 resumes by itself; the node is ok again.
    poll_json(&node, "/v1/health", "health ok again", |h| {
        h["status"] == "ok"
    });
    let d = data(3, 5000);
    let fp = node.client().store_bytes(&d).unwrap().fingerprint;
    let mut got = Vec::new();
    node.client()
        .retrieve(&fp, &mut got, &mut |_, _| {})
        .unwrap();
    assert!(got == d);
    assert_eq!(node.terminate(), Some(0), "{}", node.log());
}
