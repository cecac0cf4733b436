//! Connection limits of a real `dosd` process, probed from outside as a client would:
//! the file-descriptor budget, bursts of connections, a full session table, slow
//! clients, and the UDP amplification rule.

mod common;

use common::*;

#[test]
fn the_descriptor_limit_is_raised_for_connections_max_or_start_up_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    // 1024 connections, 2 disks: 1024 + 2 × 8 + 128 descriptors.
    let needed = 1024 + 2 * 8 + 128;
    let args = ["--disks", "2", "--disk-size", "32M"];

    // A soft limit below the budget under a hard limit above it: raised.
    let node = Node::try_start_under(
        &["prlimit", "--nofile=256:4096", "--"],
        &dir.path().join("a"),
        &group,
        &args,
    )
    .unwrap_or_else(|log| panic!("dosd did not start under a raisable limit:\n{log}"));
    let (soft, hard) = node.nofile_limits();
    assert!(soft >= needed, "soft limit {soft}, needs {needed}");
    assert_eq!(hard, 4096);
    assert!(node.log().contains("raised the file descriptor limit"));
    node.client().ping().unwrap();
    drop(node);

    // Both limits below it: raised only by a process allowed to raise its hard limit
    // (CAP_SYS_RESOURCE); any other refuses to start and says what to change.
    match Node::try_start_under(
        &["prlimit", "--nofile=256:256", "--"],
        &dir.path().join("b"),
        &group,
        &args,
    ) {
        Ok(node) => {
            let (soft, hard) = node.nofile_limits();
            assert!(soft >= needed && hard >= needed, "{soft}/{hard}");
        }
        Err(log) => {
            let line = log
                .lines()
                .find(|l| l.starts_with("error:"))
                .unwrap_or_else(|| panic!("no error line:\n{log}"));
            for want in [
                "connections_max = 1024",
                &format!("needs {needed} file descriptors"),
                "RLIMIT_NOFILE is 256",
                "lower connections_max to at most 112",
            ] {
                assert!(line.contains(want), "{want:?} not in {line:?}");
            }
        }
    }
    // A connections_max that fits under the same limits starts.
    let node = Node::try_start_under(
        &["prlimit", "--nofile=256:256", "--"],
        &dir.path().join("c"),
        &group,
        &[&args[..], &["--connections-max", "112"]].concat(),
    )
    .unwrap_or_else(|log| panic!("dosd did not start with a fitting connections_max:\n{log}"));
    assert_eq!(node.nofile_limits(), (256, 256));
    node.client().ping().unwrap();
}
