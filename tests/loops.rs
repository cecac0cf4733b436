//! Several dataplane loops in one real `dosd` process (`--dataplane-cores N`): every
//! operation whichever loop a connection lands on, exact dedup across loops, the
//! index walked across shards, and kill -9 under a multi-loop workload.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use dosp::client::ClientError;
use dosp::Fingerprint;

/// The node's threads named `dataplane-K`, from /proc, once there are `want` of
/// them (they start right after the node says it is ready).
fn dataplane_threads(node: &Node, want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let names = thread_names(node);
        if names.len() >= want || Instant::now() > deadline {
            return names;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn thread_names(node: &Node) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", node.child.id()))
        .expect("read /proc/PID/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| n.starts_with("dataplane-"))
        .collect();
    names.sort();
    names
}

#[test]
fn every_operation_works_with_1_2_and_4_loops_from_concurrent_clients() {
    for loops in [1u16, 2, 4] {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(
            &dir.path().join("data"),
            &unique_group(),
            &["--dataplane-cores", &loops.to_string()],
        );
        let want: Vec<String> = (0..loops).map(|k| format!("dataplane-{k}")).collect();
        assert_eq!(dataplane_threads(&node, want.len()), want, "{}", node.log());

        // 8 clients at once, each on its own connection (the kernel spreads them over
        // the loops): 12 objects of their own each, and one object all of them store.
        let shared = data(7777, 9000);
        let fp_shared = Fingerprint::of(&shared);
        let writers: Vec<_> = (0..8u64)
            .map(|w| {
                let addr = node.node_arg();
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let mut c = dosp::client::Client::connect(&addr, Duration::from_secs(10))
                        .expect("connect");
                    let mut mine = Vec::new();
                    for i in 0..12u64 {
                        let d = data(w * 100 + i, 500 + (i as usize) * 301);
                        let s = c.store_bytes(&d).expect("store");
                        assert_eq!(s.fingerprint, Fingerprint::of(&d));
                        mine.push((s.fingerprint, d));
                    }
                    let s = c.store_bytes(&shared).expect("store the shared object");
                    (mine, s.refcount)
                })
            })
            .collect();
        let mut objects = Vec::new();
        let mut refs = Vec::new();
        for w in writers {
            let (mine, r) = w.join().expect("writer");
            objects.extend(mine);
            refs.push(r);
        }
        refs.sort();
        assert_eq!(refs, (1..=8).collect::<Vec<u32>>(), "loops={loops}");

        // Each object fetched, range-fetched and located from a fresh connection.
        for (fp, d) in &objects {
            let mut c = node.client();
            let mut got = Vec::new();
            c.retrieve(fp, &mut got, &mut |_, _| {}).expect("retrieve");
            assert!(&got == d, "loops={loops}");
            let mut part = Vec::new();
            c.retrieve_range(fp, 17, 100, &mut part).expect("range");
            assert_eq!(part, d[17..117]);
            assert_eq!(c.locate(fp).expect("locate").object_len, d.len() as u64);
        }
        // The index walk: every object once, in fingerprint order, across shards.
        let mut listed = Vec::new();
        node.client()
            .contents(&mut |fp, _| listed.push(fp))
            .expect("contents");
        let mut all: Vec<Fingerprint> = objects.iter().map(|(fp, _)| *fp).collect();
        all.push(fp_shared);
        all.sort();
        assert_eq!(listed, all, "loops={loops}");
        // GET_LOAD sums every loop's counters.
        let load = node.client().load().expect("load");
        assert!(load.ops_total.get() >= 8 * 13 + objects.len() as u64 * 3);
        // Deletes from fresh connections: the shared object's references one by one.
        for left in (0..8).rev() {
            assert_eq!(node.client().delete(&fp_shared).expect("delete"), left);
        }
        for (fp, _) in &objects {
            assert_eq!(node.client().delete(fp).expect("delete"), 0);
        }
        match node.client().locate(&fp_shared) {
            Err(ClientError::NotFound { .. }) => {}
            other => panic!("a deleted object is located: {other:?}"),
        }
        let mut n = 0;
        node.client()
            .contents(&mut |_, _| n += 1)
            .expect("contents");
        assert_eq!(n, 0, "loops={loops}");
    }
}

#[test]
fn kill_9_under_a_multi_loop_workload_loses_no_acknowledged_object() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let group = unique_group();
    let mut node = Node::start(&data_dir, &group, &["--dataplane-cores", "2"]);
    let acked: Arc<Mutex<HashMap<Fingerprint, (u64, usize)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let addr = node.node_arg();
            let acked = Arc::clone(&acked);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let Ok(mut c) = dosp::client::Client::connect(&addr, Duration::from_secs(10))
                else {
                    return;
                };
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && i < 5000 {
                    let seed = w * 1_000_000 + i;
                    // Every fourth a duplicate of the writer's first: refcounts too.
                    let (seed, len) = if i % 4 == 3 {
                        (w * 1_000_000, 3000)
                    } else {
                        (seed, 1000 + (i as usize % 7) * 1500)
                    };
                    let d = data(seed, len);
                    match c.store_bytes(&d) {
                        Ok(s) => {
                            acked.lock().unwrap().insert(s.fingerprint, (seed, len));
                        }
                        Err(_) => return,
                    }
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    node.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "only {} objects acknowledged",
        acked.len()
    );

    // Asking for another number of loops than the disks are carved for is refused,
    // naming both numbers.
    let refused = Node::try_start_under(
        &[],
        &data_dir,
        &group,
        &[
            "--disks",
            "2",
            "--disk-size",
            "64M",
            "--dataplane-cores",
            "3",
        ],
    );
    let log = refused
        .err()
        .expect("a node with 3 loops on disks carved for 2 started");
    assert!(
        log.contains("carved for 2 dataplane loops") && log.contains("3 were asked"),
        "{log}"
    );
    // Without the flag the node takes the disks' number.
    let node = Node::start(&data_dir, &group, &[]);
    assert_eq!(dataplane_threads(&node, 2).len(), 2, "{}", node.log());
    for (fp, (seed, len)) in &acked {
        let mut got = Vec::new();
        node.client()
            .retrieve(fp, &mut got, &mut |_, _| {})
            .unwrap_or_else(|e| panic!("acknowledged {fp} lost: {e}\n{}", node.log()));
        assert!(got == data(*seed, *len), "{fp} corrupt");
    }
}
