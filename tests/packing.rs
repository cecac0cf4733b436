//! Small objects share blocks: what they cost on disk, as an operator reads it from a
//! running node's `GET /v1/disks` (`bytes_used` over `objects_used`), after thousands
//! of distinct objects stored by several clients at once through the real client:
//! the issue's own measurement, 100,000 objects of 1 KiB and then 100,000 of 4 KiB.
//! The figure is a property of the format, not of timing: every run gives the same
//! bound.

mod common;

use std::time::{Duration, Instant};

use common::{data, unique_group, Node};

/// Distinct objects stored per size.
const OBJECTS: u64 = 100_000;
/// Clients storing at once, each over its own connection.
const CLIENTS: u64 = 8;

/// (log bytes in use, objects) summed over the node's disks.
fn used_and_objects(node: &Node) -> (u64, u64) {
    let v: serde_json::Value = serde_json::from_str(&node.get_text("/v1/disks")).expect("json");
    let disks = v["disks"].as_array().expect("disks");
    let sum = |k: &str| disks.iter().map(|d| d[k].as_u64().expect(k)).sum::<u64>();
    (sum("bytes_used"), sum("objects_used"))
}

#[test]
fn small_objects_cost_little_more_disk_than_their_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Two disks of 512 MiB (sparse files): room for both rounds, 528 MB.
    let node = Node::start_bare(
        &dir.path().join("node"),
        &unique_group(),
        &["--disks", "2", "--disk-size", "512M"],
    );
    // (object size, most bytes of disk each may take: the goals)
    for (round, (len, goal)) in [(1024usize, 1.25 * 1024.0), (4096, 4.5 * 1024.0)]
        .into_iter()
        .enumerate()
    {
        let (used0, objects0) = used_and_objects(&node);
        std::thread::scope(|s| {
            for c in 0..CLIENTS {
                let node = &node;
                s.spawn(move || {
                    let mut client = node.client();
                    for i in (c..OBJECTS).step_by(CLIENTS as usize) {
                        let seed = (round as u64) << 32 | i;
                        client.store_bytes(&data(seed, len)).expect("store");
                    }
                });
            }
        });
        // Disk reports are republished every 250 ms: wait (bounded) for the last.
        let deadline = Instant::now() + Duration::from_secs(20);
        let (used1, objects1) = loop {
            let (used, objects) = used_and_objects(&node);
            if objects - objects0 == OBJECTS || Instant::now() > deadline {
                break (used, objects);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(objects1 - objects0, OBJECTS, "every object stored once");
        let each = (used1 - used0) as f64 / OBJECTS as f64;
        eprintln!("{OBJECTS} objects of {len} bytes: {each:.1} bytes of disk each (goal ≤ {goal})");
        assert!(each <= goal, "{len}-byte objects take {each:.1} bytes each");
        assert!(each >= len as f64, "{each:.1} bytes cannot hold {len}");
    }
}
