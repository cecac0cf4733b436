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
    let a = Node::start(&dir.path().join("a"), &group, &["--node-id", "watched-a"]);
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
            if line.contains(&a.node_id) {
                assert!(line.contains(" name watched-a "), "{line}");
                hb_a = true;
            }
            if line.contains(&b.node_id) {
                assert!(line.contains(" name - "), "a node without a name: {line}");
                hb_b = true;
            }
            assert!(
                line.contains("health ok") && line.contains("disks 2/2"),
                "{line}"
            );
        }
        if line.starts_with("located") {
            assert!(
                line.contains(&fp.to_hex())
                    && line.contains(&format!("node {} name watched-a ", a.node_id)),
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

/// POSTs to the node's management endpoint with the bearer token; returns the status.
fn post(node: &Node, path: &str, token: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(node.mgmt).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn disk_events_and_leaving_are_announced_to_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    let mut node = Node::start(&dir.path().join("a"), &group, &["--mgmt-token", "s3cret"]);
    let mut watcher = Command::new(dosp_bin())
        .args(["watch", "--multicast", &group, "--seconds", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    // The watcher has joined once it prints the node's first heartbeat.
    for line in lines.by_ref().take(100) {
        if line.unwrap().starts_with("heartbeat") {
            break;
        }
    }
    assert_eq!(post(&node, "/v1/disks/1/offline", "s3cret"), 200);
    assert_eq!(post(&node, "/v1/disks/1/online", "s3cret"), 200);
    assert_eq!(node.terminate(), Some(0));

    let mut events = Vec::new();
    for line in lines.by_ref().take(500) {
        let line = line.unwrap();
        if line.starts_with("announce") {
            assert!(line.contains(&node.node_id), "{line}");
            events.push(line);
        }
        if events.len() == 3 {
            break;
        }
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(
        events[0].contains("disk-down disk 1") && events[0].contains("offline"),
        "{}",
        events[0]
    );
    assert!(events[1].contains("disk-up disk 1"), "{}", events[1]);
    assert!(events[2].contains("node-leaving disk -"), "{}", events[2]);
    // Repetitions carry the same seq and are shown once: seqs are 1, 2, 3.
    for (i, e) in events.iter().enumerate() {
        assert!(e.contains(&format!("seq {} ", i + 1)), "{e}");
    }
}
