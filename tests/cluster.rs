//! The cluster group as an operator sees it: `dosp watch` against real nodes.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn watch_prints_heartbeats_and_snooped_locate_answers() {
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    let a = Node::start(&dir.path().join("a"), &group, &[]);
    let b = Node::start(&dir.path().join("b"), &group, &[]);
    let fp = a.client().store_bytes(b"watched").unwrap().fingerprint;

    let mut watcher = Command::new(dosp_bin())
        .args([
            "watch",
            "--multicast",
            &group,
            "--multicast-if",
            "127.0.0.1",
            "--seconds",
            "10",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    // Let the watcher join before asking.
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new(dosp_bin())
        .args([
            "locate",
            &fp.to_hex(),
            "--multicast",
            &group,
            "--wait-ms",
            "300",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let (mut hb_a, mut hb_b, mut located) = (false, false, false);
    for line in lines.by_ref().take(200) {
        let line = line.unwrap();
        if line.starts_with("heartbeat") {
            hb_a |= line.contains(&a.node_id);
            hb_b |= line.contains(&b.node_id);
            assert!(
                line.contains("health ok") && line.contains("disks 2/2"),
                "{line}"
            );
        }
        if line.starts_with("located") {
            assert!(
                line.contains(&fp.to_hex()) && line.contains(&a.node_id),
                "{line}"
            );
            assert!(!line.contains(&b.node_id), "{line}");
            located = true;
        }
        if hb_a && hb_b && located {
            break;
        }
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert!(hb_a && hb_b, "heartbeats from both nodes");
    assert!(located, "the holder's LOCATE answer was snooped");
}

#[test]
fn watch_stops_after_count_and_rejects_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    let _a = Node::start(&dir.path().join("a"), &group, &[]);
    let out = Command::new(dosp_bin())
        .args([
            "watch",
            "--multicast",
            &group,
            "--count",
            "2",
            "--seconds",
            "10",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2);
    let out = Command::new(dosp_bin())
        .args(["watch", "--multicast", "not-a-group"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
