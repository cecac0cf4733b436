//! Signed DOSP requests against real nodes (issue 12, dosp/PROTOCOL.md §7): every
//! operation with the right key in both modes, a wrong key, no certificate, a key
//! rotated out, replays and stale timestamps; the store unchanged after each refusal and
//! the refusals counted exactly in /metrics; a node without a key; signed heartbeats.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{dosp_bin, unique_group, Node};
use dosp::auth::{CapOp, Capability, CertMode, KeyRing, Token};
use dosp::client::{udp_request_signed, Client, ClientError};
use dosp::codec::{encode_chunk_header, encode_request};
use dosp::signed::{now_ms, sign_in_place, Refusal, Signer};
use dosp::wire::{
    DeleteIn, DiskQueryIn, Header, LocateIn, Opcode, OutHead, Status, StoreIn, ALL_DISKS,
};
use dosp::Fingerprint;
use zerocopy::{FromBytes, IntoBytes};

const NEW: &str = "new 0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
const OLD: &str = "old f0e1d2c3b4a5968778695a4b3c2d1e0ff0e1d2c3b4a5968778695a4b3c2d1e0f";
/// The id `new` with another secret: a wrong certificate.
const FORGED: &str = "new 1111111111111111111111111111111111111111111111111111111111111111";
/// A key the node never had.
const STRANGER: &str = "zz 2222222222222222222222222222222222222222222222222222222222222222";

/// Writes a key file of `lines`, private (0600) unless `mode` says otherwise.
fn key_file(dir: &Path, name: &str, lines: &[&str], mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("# test keys\n{}\n", lines.join("\n"))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn signer(lines: &[&str], mode: CertMode) -> Signer {
    Signer::new(KeyRing::parse(&lines.join("\n")).unwrap(), mode)
}

fn client(node: &Node, s: Option<&Signer>) -> Client {
    let mut c = node.client();
    c.set_signer(s.cloned());
    c
}

fn start_keyed(dir: &Path, name: &str, keys: &Path, extra: &[&str]) -> Node {
    let key = keys.to_str().unwrap();
    let mut args = vec!["--cluster-key-file", key];
    args.extend_from_slice(extra);
    Node::start(&dir.join(name), &unique_group(), &args)
}

/// `dosd_auth_failed_total` by reason, every reason.
fn refusals(node: &Node) -> Vec<(Refusal, u64)> {
    let text = node.get_text("/metrics");
    Refusal::ALL
        .iter()
        .map(|&r| {
            let key = format!("dosd_auth_failed_total{{reason=\"{}\"}} ", r.name());
            let line = text
                .lines()
                .find(|l| l.starts_with(&key))
                .unwrap_or_else(|| panic!("no {key} in /metrics"));
            (r, line[key.len()..].trim().parse().unwrap())
        })
        .collect()
}

fn counted(pairs: &[(Refusal, u64)]) -> Vec<(Refusal, u64)> {
    Refusal::ALL
        .iter()
        .map(|&r| {
            let n = pairs.iter().filter(|(p, _)| *p == r).map(|(_, n)| n).sum();
            (r, n)
        })
        .collect()
}

/// The status and detail of a client error; panics on anything but a status.
fn status(e: ClientError) -> (Status, u32) {
    match e {
        ClientError::Status { status, detail, .. } => (status, detail),
        other => panic!("expected a status, got {other}"),
    }
}

/// What an operation came to: done, or refused with this status and detail.
type Outcome = Result<(), (Status, u32)>;

/// Every operation over TCP (and the UDP unicast ones) through `c`; returns the
/// outcome of each, `Ok` or the refusal's status and detail. `fp` is an object the node
/// holds; the STORE stores `fresh`. DELETE is left out (it is checked apart: it changes
/// the store).
fn every_operation(
    c: &mut Client,
    udp: SocketAddr,
    s: Option<&Signer>,
    fp: &Fingerprint,
    fresh: &[u8],
) -> Vec<(&'static str, Outcome)> {
    let mut sink = Vec::new();
    let wait = Duration::from_secs(5);
    let udp_op = |op: Opcode, body: &[u8]| {
        udp_request_signed(udp, op, body, wait, s)
            .map(|_| ())
            .map_err(status)
    };
    vec![
        ("NULL", c.ping().map(|_| ()).map_err(status)),
        ("STORE", c.store_bytes(fresh).map(|_| ()).map_err(status)),
        (
            "RETRIEVE",
            c.retrieve(fp, &mut sink, &mut |_, _| {})
                .map(|_| ())
                .map_err(status),
        ),
        (
            "RANGE",
            c.retrieve_range(fp, 1, 2, &mut sink)
                .map(|_| ())
                .map_err(status),
        ),
        (
            "CONTENTS",
            c.contents(&mut |_, _| {}).map(|_| ()).map_err(status),
        ),
        ("LOCATE", c.locate(fp).map(|_| ()).map_err(status)),
        ("HEARTBEAT", c.heartbeat().map(|_| ()).map_err(status)),
        ("GET_LOAD", c.load().map(|_| ()).map_err(status)),
        ("DISKS", c.disks(ALL_DISKS).map(|_| ()).map_err(status)),
        ("UDP NULL", udp_op(Opcode::Null, &[])),
        (
            "UDP LOCATE",
            udp_op(Opcode::Locate, LocateIn { fingerprint: *fp }.as_bytes()),
        ),
        (
            "UDP GET_DISK_STATE",
            udp_op(
                Opcode::GetDiskState,
                DiskQueryIn {
                    disk: ALL_DISKS.into(),
                    reserved: 0.into(),
                    reserved1: 0.into(),
                }
                .as_bytes(),
            ),
        ),
    ]
}

/// What the node holds, asked with a good key.
fn contents(node: &Node, s: &Signer) -> Vec<Fingerprint> {
    let mut all = Vec::new();
    client(node, Some(s))
        .contents(&mut |fp, _| all.push(fp))
        .expect("signed CONTENTS");
    all.sort_by_key(|fp| fp.0);
    all
}

#[test]
fn every_operation_needs_a_right_signature_and_refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "node.keys", &[NEW, OLD], 0o600);
    let node = start_keyed(dir.path(), "n", &keys, &["--auth-allow-md5"]);
    let log = node.log();
    assert!(
        log.contains("DOSP requests must be signed") && log.contains("new,old"),
        "{log}"
    );
    assert!(!log.contains("readable by group or others"), "{log}");
    let udp = node.addr;

    let hmac = signer(&[NEW], CertMode::HmacSha256);
    let first = client(&node, Some(&hmac))
        .store_bytes(b"the first object")
        .unwrap();
    let fp = first.fingerprint;

    // Right keys: the new one in both modes, the old one (rotation: still listed).
    let md5 = signer(&[NEW], CertMode::DoubleMd5);
    let old = signer(&[OLD, NEW], CertMode::HmacSha256);
    let mut stored = vec![fp];
    for (i, s) in [&hmac, &md5, &old].into_iter().enumerate() {
        let fresh = format!("stored with good key {i}");
        let mut c = client(&node, Some(s));
        for (op, r) in every_operation(&mut c, udp, Some(s), &fp, fresh.as_bytes()) {
            assert_eq!(r, Ok(()), "{op} with good key {i}");
        }
        stored.push(Fingerprint::of(fresh.as_bytes()));
    }
    stored.sort_by_key(|fp| fp.0);
    assert_eq!(contents(&node, &hmac), stored);
    assert_eq!(refusals(&node), counted(&[]));

    // Wrong key, no certificate, a key the node never had: every operation refused on
    // one connection each (AUTH_FAILED keeps it open), nothing stored.
    let forged = signer(&[FORGED], CertMode::HmacSha256);
    let stranger = signer(&[STRANGER], CertMode::HmacSha256);
    let cases: [(Option<&Signer>, Refusal); 3] = [
        (Some(&forged), Refusal::BadCertificate),
        (None, Refusal::Unsigned),
        (Some(&stranger), Refusal::UnknownKey),
    ];
    let mut expected = Vec::new();
    for (s, reason) in cases {
        let mut c = client(&node, s);
        let results = every_operation(&mut c, udp, s, &fp, b"never stored");
        for (op, r) in &results {
            assert_eq!(
                *r,
                Err((Status::AuthFailed, reason.code())),
                "{op}, {reason}"
            );
        }
        // DELETE too, and the object is still there.
        assert_eq!(
            c.delete(&fp).map_err(status),
            Err((Status::AuthFailed, reason.code())),
            "DELETE, {reason}"
        );
        expected.push((reason, results.len() as u64 + 1));
    }
    assert_eq!(
        contents(&node, &hmac),
        stored,
        "refused requests changed the store"
    );
    assert_eq!(refusals(&node), counted(&expected));
    // The object is whole and has one reference: a signed DELETE drops the last.
    let mut back = Vec::new();
    client(&node, Some(&hmac))
        .retrieve(&fp, &mut back, &mut |_, _| {})
        .unwrap();
    assert_eq!(back, b"the first object");
    assert_eq!(client(&node, Some(&md5)).delete(&fp).unwrap(), 0);
}

#[test]
fn md5_needs_allow_md5_and_a_rotated_out_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Readable by others: the node warns.
    let keys = key_file(dir.path(), "node.keys", &[NEW], 0o644);
    let node = start_keyed(dir.path(), "n", &keys, &[]);
    assert!(
        node.log().contains("readable by group or others"),
        "{}",
        node.log()
    );
    let md5 = signer(&[NEW], CertMode::DoubleMd5);
    let old = signer(&[OLD], CertMode::HmacSha256);
    let hmac = signer(&[NEW], CertMode::HmacSha256);
    assert_eq!(
        client(&node, Some(&md5))
            .store_bytes(b"md5")
            .map_err(status)
            .err(),
        Some((Status::AuthFailed, Refusal::Mode.code()))
    );
    assert_eq!(
        client(&node, Some(&old))
            .store_bytes(b"old")
            .map_err(status)
            .err(),
        Some((Status::AuthFailed, Refusal::UnknownKey.code()))
    );
    assert_eq!(
        client(&node, Some(&old)).ping().map_err(status).err(),
        Some((Status::AuthFailed, Refusal::UnknownKey.code()))
    );
    assert_eq!(contents(&node, &hmac), vec![]);
    assert_eq!(
        refusals(&node),
        counted(&[(Refusal::Mode, 1), (Refusal::UnknownKey, 2)])
    );
    // The CLI signs with --key-file and --auth-mode.
    let key_path = keys.to_str().unwrap();
    let file = dir.path().join("object");
    std::fs::write(&file, b"from the cli").unwrap();
    let out = node.dosp(&["--key-file", key_path, "store", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(
        common::stdout(&out),
        Fingerprint::of(b"from the cli").to_string()
    );
    let out = node.dosp(&["--key-file", key_path, "--auth-mode", "md5", "ping"]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("AUTH_FAILED"),
        "{}",
        common::stderr(&out)
    );
    let out = Command::new(dosp_bin())
        .args(["--node", &node.node_arg(), "ping"])
        .env("DOSP_KEY_FILE", key_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
}

/// A signed request frame, as the client library would send it, with a chosen time and
/// nonce.
fn frame(op: Opcode, body: &[u8], key_line: &str, ts: u64, nonce: u64) -> Vec<u8> {
    let ring = KeyRing::parse(key_line).unwrap();
    let mut msg = Vec::new();
    encode_request(&mut msg, op, nonce, 0, body);
    sign_in_place(&mut msg, 0, ring.signer(), CertMode::HmacSha256, ts, nonce);
    msg
}

fn store_frame(data: &[u8], ts: u64, nonce: u64) -> Vec<u8> {
    let body = StoreIn::new(0, Some(data.len() as u64), None);
    let mut msg = frame(Opcode::Store, body.as_bytes(), NEW, ts, nonce);
    encode_chunk_header(&mut msg, data.len() as u32, true);
    msg.extend_from_slice(data);
    msg
}

/// Reads one response (no stream): its status, detail and whole Out body.
fn read_reply(s: &mut TcpStream) -> (Status, u32, Vec<u8>) {
    let mut head = [0u8; Header::SIZE];
    s.read_exact(&mut head).expect("a reply header");
    let h = Header::read_from_bytes(&head).unwrap();
    let mut body = vec![0u8; h.body_len.get() as usize];
    s.read_exact(&mut body).expect("a reply body");
    let (out, _) = OutHead::read_from_prefix(&body).unwrap();
    (
        Status::from_u16(out.status.get()).unwrap(),
        out.detail.get(),
        body,
    )
}

#[test]
fn replayed_and_stale_mutations_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "node.keys", &[NEW], 0o600);
    let node = start_keyed(dir.path(), "n", &keys, &["--auth-window-secs", "60"]);
    let hmac = signer(&[NEW], CertMode::HmacSha256);
    let data = b"stored once, replayed once";
    let fp = Fingerprint::of(data);
    let mut raw = TcpStream::connect(node.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    // The same STORE frame twice: the second is a replay.
    let store = store_frame(data, now_ms(), 1);
    raw.write_all(&store).unwrap();
    let (st, _, body) = read_reply(&mut raw);
    assert_eq!(st, Status::Success);
    let refcount = u32::from_le_bytes(body[36..40].try_into().unwrap());
    assert_eq!(refcount, 1);
    raw.write_all(&store).unwrap();
    let (st, detail, _) = read_reply(&mut raw);
    assert_eq!((st, detail), (Status::AuthFailed, Refusal::Replayed.code()));
    // Stored by the replay? A signed STORE of the same data makes it 2, not 3.
    let again = client(&node, Some(&hmac)).store_bytes(data).unwrap();
    assert_eq!(again.refcount, 2);

    // The same DELETE frame twice: one reference dropped, not two.
    let del = frame(
        Opcode::Delete,
        DeleteIn { fingerprint: fp }.as_bytes(),
        NEW,
        now_ms(),
        2,
    );
    raw.write_all(&del).unwrap();
    let (st, _, body) = read_reply(&mut raw);
    assert_eq!(st, Status::Success);
    assert_eq!(u32::from_le_bytes(body[24..28].try_into().unwrap()), 1);
    raw.write_all(&del).unwrap();
    let (st, detail, _) = read_reply(&mut raw);
    assert_eq!((st, detail), (Status::AuthFailed, Refusal::Replayed.code()));

    // Timestamps an hour off, either way: STORE and DELETE refused, on the same
    // connection, which stays open.
    let hour_ms = 3_600_000;
    for ts in [now_ms() - hour_ms, now_ms() + hour_ms] {
        raw.write_all(&store_frame(b"from another time", ts, 3))
            .unwrap();
        let (st, detail, _) = read_reply(&mut raw);
        assert_eq!(
            (st, detail),
            (Status::AuthFailed, Refusal::Timestamp.code())
        );
        raw.write_all(&frame(
            Opcode::Delete,
            DeleteIn { fingerprint: fp }.as_bytes(),
            NEW,
            ts,
            4,
        ))
        .unwrap();
        let (st, detail, _) = read_reply(&mut raw);
        assert_eq!(
            (st, detail),
            (Status::AuthFailed, Refusal::Timestamp.code())
        );
        // An idempotent request with that time is refused too; with 0 it is served.
        let locate = LocateIn { fingerprint: fp };
        raw.write_all(&frame(Opcode::Locate, locate.as_bytes(), NEW, ts, 5))
            .unwrap();
        let (st, detail, _) = read_reply(&mut raw);
        assert_eq!(
            (st, detail),
            (Status::AuthFailed, Refusal::Timestamp.code())
        );
    }
    let locate = LocateIn { fingerprint: fp };
    raw.write_all(&frame(Opcode::Locate, locate.as_bytes(), NEW, 0, 6))
        .unwrap();
    assert_eq!(read_reply(&mut raw).0, Status::Success);
    // A replayed LOCATE is served: it changes nothing.
    raw.write_all(&frame(Opcode::Locate, locate.as_bytes(), NEW, 0, 6))
        .unwrap();
    assert_eq!(read_reply(&mut raw).0, Status::Success);

    // Nothing changed: the object is there with one reference, nothing else stored.
    assert_eq!(contents(&node, &hmac), vec![fp]);
    let mut back = Vec::new();
    client(&node, Some(&hmac))
        .retrieve(&fp, &mut back, &mut |_, _| {})
        .unwrap();
    assert_eq!(back, data);
    assert_eq!(client(&node, Some(&hmac)).delete(&fp).unwrap(), 0);
    assert_eq!(
        refusals(&node),
        counted(&[(Refusal::Replayed, 2), (Refusal::Timestamp, 6)])
    );
}

#[test]
fn a_node_without_a_key_serves_signed_and_unsigned_clients_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), &unique_group(), &[]);
    assert!(node.log().contains("NO CLUSTER KEY"), "{}", node.log());
    let hmac = signer(&[NEW], CertMode::HmacSha256);
    let md5 = signer(&[STRANGER], CertMode::DoubleMd5);
    let fp = node.client().store_bytes(b"unsigned").unwrap().fingerprint;
    for s in [None, Some(&hmac), Some(&md5)] {
        let mut c = client(&node, s);
        for (op, r) in every_operation(&mut c, node.addr, s, &fp, b"keyless") {
            assert_eq!(r, Ok(()), "{op} signed {}", s.is_some());
        }
        assert_eq!(c.store_bytes(b"deleted").unwrap().refcount, 1);
        assert_eq!(c.delete(&Fingerprint::of(b"deleted")).unwrap(), 0);
    }
    assert_eq!(refusals(&node), counted(&[]));
}

/// `dosp [--key-file KEYS] watch` on the node's group for `seconds` or `count` lines:
/// the lines printed and stderr.
fn watch(node: &Node, keys: Option<&Path>, args: &[&str]) -> (Vec<String>, String) {
    let mut cmd = Command::new(dosp_bin());
    if let Some(k) = keys {
        cmd.arg("--key-file").arg(k);
    }
    let mut child = cmd
        .args(["watch", "--multicast", &node.group])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Vec<String> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .collect();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let _ = child.wait();
    (lines, err)
}

#[test]
fn heartbeats_are_signed_and_watchers_with_another_key_drop_them() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "node.keys", &[NEW, OLD], 0o600);
    let old_only = key_file(dir.path(), "old.keys", &[OLD], 0o600);
    let other = key_file(dir.path(), "other.keys", &[FORGED], 0o600);
    let node = start_keyed(dir.path(), "n", &keys, &[]);
    // A watcher holding the node's signing key (its first) prints its heartbeats.
    let (lines, err) = watch(&node, Some(&keys), &["--count", "2", "--seconds", "30"]);
    assert_eq!(lines.len(), 2, "{lines:?} {err}");
    assert!(lines.iter().all(|l| l.contains(&node.node_id)), "{lines:?}");
    // One with another secret under the same id, or with only the node's second key
    // (the node signs with its first), drops them all:
    // heartbeats come every 200 ms, so four seconds hear many even on a loaded machine.
    for k in [&other, &old_only] {
        let (lines, err) = watch(&node, Some(k), &["--seconds", "4"]);
        assert!(lines.is_empty(), "{lines:?}");
        let dropped: u64 = err
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in {err:?}"));
        assert!(dropped >= 1, "{err}");
    }
    // Without a key, a watcher shows them (signed or not).
    let (lines, _) = watch(&node, None, &["--count", "1", "--seconds", "30"]);
    assert_eq!(lines.len(), 1);
    // A keyless node's heartbeats are unsigned: a watcher with a key drops them.
    let keyless = Node::start(&dir.path().join("keyless"), &unique_group(), &[]);
    let (lines, err) = watch(&keyless, Some(&keys), &["--seconds", "4"]);
    assert!(lines.is_empty(), "{lines:?}");
    assert!(!err.contains("dropped 0 "), "{err}");
    let (lines, _) = watch(&keyless, None, &["--count", "1", "--seconds", "30"]);
    assert_eq!(lines.len(), 1);
}

#[test]
fn multicast_locate_is_answered_only_to_the_key_and_the_answers_are_signed() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "node.keys", &[NEW], 0o600);
    let other = key_file(dir.path(), "other.keys", &[FORGED], 0o600);
    let node = start_keyed(dir.path(), "n", &keys, &[]);
    let hmac = signer(&[NEW], CertMode::HmacSha256);
    let fp = client(&node, Some(&hmac))
        .store_bytes(b"located")
        .unwrap()
        .fingerprint
        .to_string();
    let locate = |keys: Option<&Path>| {
        let mut cmd = Command::new(dosp_bin());
        if let Some(k) = keys {
            cmd.arg("--key-file").arg(k);
        }
        cmd.args([
            "locate",
            &fp,
            "--multicast",
            &node.group,
            "--wait-ms",
            "1500",
        ])
        .output()
        .unwrap()
    };
    // With the key: found, nothing dropped.
    let out = locate(Some(&keys));
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(
        common::stdout(&out).contains(&node.node_id),
        "{}",
        common::stdout(&out)
    );
    assert!(
        common::stderr(&out).contains("dropped 0 "),
        "{}",
        common::stderr(&out)
    );
    // Unsigned: the node does not answer the group (exit 3: nobody holds it), and
    // counts the refusal.
    let out = locate(None);
    assert_eq!(out.status.code(), Some(3), "{}", common::stdout(&out));
    // Another secret under the same id: the node refuses the query, and would the
    // answer come, the client would drop it.
    let out = locate(Some(&other));
    assert_eq!(out.status.code(), Some(3), "{}", common::stdout(&out));
    assert_eq!(
        refusals(&node),
        counted(&[(Refusal::Unsigned, 1), (Refusal::BadCertificate, 1)])
    );
}

/// `dosp --node NODE --token TOKEN args…` with no key in the environment: a client that
/// only holds the token.
fn dosp_with_token(node: &Node, token: &str, args: &[&str]) -> std::process::Output {
    Command::new(dosp_bin())
        .env_remove("DOSP_KEY_FILE")
        .env_remove("DOSP_TOKEN")
        .args(["--node", &node.node_arg(), "--token", token])
        .args(args)
        .output()
        .unwrap()
}

/// Mints a token with `dosp --key-file KEYS token …`; returns its text.
fn mint(node: &Node, keys: &Path, args: &[&str]) -> String {
    let mut all = vec!["--key-file", keys.to_str().unwrap(), "token"];
    all.extend_from_slice(args);
    let out = node.dosp(&all);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.lines().count(),
        1,
        "the token alone on its line: {text:?}"
    );
    text.trim_end().to_string()
}

/// Asserts `out` failed with AUTH_FAILED for `reason`.
fn refused(out: &std::process::Output, reason: Refusal, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: {}",
        common::stderr(out)
    );
    let err = common::stderr(out);
    assert!(err.contains("AUTH_FAILED"), "{what}: {err}");
    assert!(
        err.contains(&format!("(detail {})", reason.code())),
        "{what}: expected {reason}: {err}"
    );
}

#[test]
fn capability_tokens_open_one_object_or_bounded_stores_to_clients_without_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "node.keys", &[NEW], 0o600);
    let node = start_keyed(dir.path(), "n", &keys, &[]);
    let hmac = signer(&[NEW], CertMode::HmacSha256);
    let data = b"an object handed out by token";
    let fp = client(&node, Some(&hmac))
        .store_bytes(data)
        .unwrap()
        .fingerprint;
    let other = client(&node, Some(&hmac))
        .store_bytes(b"an object nobody got a token for")
        .unwrap()
        .fingerprint;
    let fp_text = fp.to_string();

    // A manager mints a retrieve token; a client without the key fetches and reads a
    // range with it, as often as it likes.
    let token = mint(&node, &keys, &["fetch", &fp_text, "--ttl", "10m"]);
    for _ in 0..2 {
        let out = dosp_with_token(&node, &token, &["fetch", &fp_text]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        assert_eq!(out.stdout, data);
    }
    let out = dosp_with_token(&node, &token, &["range", &fp_text, "3", "6"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(out.stdout, &data[3..9]);
    // From $DOSP_TOKEN too.
    let out = Command::new(dosp_bin())
        .env_remove("DOSP_KEY_FILE")
        .env("DOSP_TOKEN", &token)
        .args(["--node", &node.node_arg(), "fetch", &fp_text])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(out.stdout, data);
    // The client library: a token instead of a signer.
    let mut c = node.client();
    c.set_token(Some(Token::parse(&token).unwrap()));
    let mut back = Vec::new();
    c.retrieve_range(&fp, 0, 2, &mut back).unwrap();
    assert_eq!(back, &data[..2]);

    // The same token for another object: the capability rebuilt from the request is
    // not the one signed.
    let other_text = other.to_string();
    refused(
        &dosp_with_token(&node, &token, &["fetch", &other_text]),
        Refusal::BadCertificate,
        "another object",
    );
    // For DELETE: no token covers it. For STORE: rebuilt as a store token nobody
    // signed.
    refused(
        &dosp_with_token(&node, &token, &["delete", &fp_text]),
        Refusal::TokenScope,
        "DELETE with a retrieve token",
    );
    let small = dir.path().join("small");
    std::fs::write(&small, vec![7u8; 100]).unwrap();
    let small_path = small.to_str().unwrap();
    refused(
        &dosp_with_token(&node, &token, &["store", small_path]),
        Refusal::BadCertificate,
        "STORE with a retrieve token",
    );
    // Tampered: one character of its MAC changed.
    let mut tampered = token.clone().into_bytes();
    tampered[60] = if tampered[60] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    refused(
        &dosp_with_token(&node, &tampered, &["fetch", &fp_text]),
        Refusal::BadCertificate,
        "tampered",
    );
    // Expired: minted (through the library) to expire a minute ago.
    let ring = KeyRing::parse(NEW).unwrap();
    let expired = ring.mint(&Capability {
        op: CapOp::Retrieve(fp),
        expires_unix_s: now_ms() / 1000 - 60,
    });
    refused(
        &dosp_with_token(&node, &expired, &["fetch", &fp_text]),
        Refusal::TokenExpired,
        "expired",
    );
    // A key file and a token at once: a usage error, nothing sent.
    let out = node.dosp(&[
        "--key-file",
        keys.to_str().unwrap(),
        "--token",
        &token,
        "fetch",
        &fp_text,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", common::stderr(&out));

    // A store token of 100 bytes: several stores of at most 100 bytes each; a larger
    // one refused and nothing of it stored.
    let store_token = mint(
        &node,
        &keys,
        &["store", "--max-bytes", "100", "--ttl", "1h"],
    );
    let smaller = dir.path().join("smaller");
    std::fs::write(&smaller, b"a few bytes").unwrap();
    let mut stored = vec![fp, other];
    for (path, bytes) in [
        (&small, vec![7u8; 100]),
        (&smaller, b"a few bytes".to_vec()),
    ] {
        let out = dosp_with_token(&node, &store_token, &["store", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        assert_eq!(common::stdout(&out), Fingerprint::of(&bytes).to_string());
        stored.push(Fingerprint::of(&bytes));
    }
    let big = dir.path().join("big");
    std::fs::write(&big, vec![8u8; 101]).unwrap();
    refused(
        &dosp_with_token(&node, &store_token, &["store", big.to_str().unwrap()]),
        Refusal::TokenScope,
        "STORE over max_bytes",
    );
    // A store token opens no object.
    refused(
        &dosp_with_token(&node, &store_token, &["fetch", &fp_text]),
        Refusal::BadCertificate,
        "RETRIEVE with a store token",
    );

    stored.sort_by_key(|fp| fp.0);
    assert_eq!(contents(&node, &hmac), stored, "refusals changed the store");
    assert_eq!(
        refusals(&node),
        counted(&[
            (Refusal::BadCertificate, 4),
            (Refusal::TokenScope, 2),
            (Refusal::TokenExpired, 1),
        ])
    );
}
