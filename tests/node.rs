//! End-to-end tests of a real `dosd` process driven by the real `dosp` binary and the
//! client library.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use dosp::codec::{encode_chunk_header, encode_request};
use dosp::wire::*;
use dosp::Fingerprint;
use zerocopy::{FromBytes, IntoBytes};

fn node() -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), &unique_group(), &[]);
    (dir, node)
}

#[test]
fn store_fetch_round_trip_matches_independent_md5() {
    let (dir, node) = node();
    for (i, len) in [0usize, 1, 4095, 4096, 4097, 3 << 20, (5 << 20) + 123]
        .into_iter()
        .enumerate()
    {
        let input = dir.path().join(format!("in{i}"));
        std::fs::write(&input, data(i as u64, len)).unwrap();
        let out = node.dosp(&["store", input.to_str().unwrap()]);
        assert!(out.status.success(), "store {len}: {}", stderr(&out));
        let fp = stdout(&out);
        assert_eq!(fp, md5sum(&input), "fingerprint of {len} bytes");
        assert_eq!(fp.len(), 32);

        let fetched = dir.path().join(format!("out{i}"));
        let out = node.dosp(&["fetch", &fp, "-o", fetched.to_str().unwrap()]);
        assert!(out.status.success(), "fetch {len}: {}", stderr(&out));
        assert_eq!(
            std::fs::read(&fetched).unwrap(),
            std::fs::read(&input).unwrap()
        );

        // To stdout as well.
        let out = node.dosp(&["fetch", &fp]);
        assert!(out.status.success());
        assert_eq!(out.stdout, std::fs::read(&input).unwrap());
    }
}

#[test]
fn store_from_stdin() {
    let (_dir, node) = node();
    let payload = data(99, 100_000);
    let mut child = std::process::Command::new(dosp_bin())
        .args(["--node", &node.node_arg(), "store", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&payload).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(stdout(&out), Fingerprint::of(&payload).to_hex());
}

#[test]
fn store_with_md5_is_checked_by_the_node() {
    let (dir, node) = node();
    let input = dir.path().join("obj");
    std::fs::write(&input, data(17, 3 << 20)).unwrap();
    let md5 = md5sum(&input);
    let wrong = Fingerprint::of(b"something else").to_hex();
    let out = node.dosp(&["store", input.to_str().unwrap(), "--md5", &wrong]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("stored nothing") && stderr(&out).contains("MD5"),
        "{}",
        stderr(&out)
    );
    let mut count = 0;
    node.client().contents(&mut |_, _| count += 1).unwrap();
    assert_eq!(count, 0, "nothing of the refused object is stored");
    let out = node.dosp(&["store", input.to_str().unwrap(), "--md5", &md5]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), md5);
    let out = node.dosp(&["store", input.to_str().unwrap(), "--md5", "xyz"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed --md5 is a usage error"
    );
}

#[test]
fn range_reads_and_past_the_end() {
    let (dir, node) = node();
    let payload = data(7, 2_000_000);
    let input = dir.path().join("obj");
    std::fs::write(&input, &payload).unwrap();
    let fp = stdout(&node.dosp(&["store", input.to_str().unwrap()]));
    for (off, len) in [
        (0u64, 1u64),
        (0, 2_000_000),
        (4095, 2),
        (1_048_575, 300_000),
        (1_999_999, 1),
        (2_000_000, 0),
    ] {
        let out = node.dosp(&["range", &fp, &off.to_string(), &len.to_string()]);
        assert!(out.status.success(), "range {off}+{len}: {}", stderr(&out));
        assert_eq!(
            out.stdout,
            payload[off as usize..(off + len) as usize],
            "range {off}+{len}"
        );
    }
    let out = node.dosp(&["range", &fp, "1999999", "2"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("past the end"), "{}", stderr(&out));
    let out = node.dosp(&["range", &fp, "18446744073709551615", "2"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("past the end"), "{}", stderr(&out));
}

#[test]
fn dedup_refcounts_and_delete() {
    let (dir, node) = node();
    let input = dir.path().join("obj");
    std::fs::write(&input, data(3, 10_000)).unwrap();
    let fp1 = stdout(&node.dosp(&["store", input.to_str().unwrap()]));
    let fp2 = stdout(&node.dosp(&["store", input.to_str().unwrap()]));
    assert_eq!(fp1, fp2);
    let mut c = node.client();
    let fp: Fingerprint = fp1.parse().unwrap();
    let again = c.store_bytes(&data(3, 10_000)).unwrap();
    assert!(again.deduplicated);
    assert_eq!(again.refcount, 3);

    for left in ["2", "1"] {
        let out = node.dosp(&["delete", &fp1]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), left);
        assert!(
            node.dosp(&["fetch", &fp1]).status.success(),
            "still there with {left} refs"
        );
    }
    let out = node.dosp(&["delete", &fp1]);
    assert_eq!(stdout(&out), "0");
    let out = node.dosp(&["fetch", &fp1]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    let out = node.dosp(&["delete", &fp1]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(matches!(
        c.delete(&fp),
        Err(dosp::client::ClientError::NotFound { .. })
    ));
}

#[test]
fn delete_over_udp_is_refused_and_changes_nothing() {
    let (_dir, node) = node();
    let mut c = node.client();
    let stored = c.store_bytes(&data(4, 5_000)).unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut msg = Vec::new();
    encode_request(
        &mut msg,
        Opcode::Delete,
        91,
        0,
        DeleteIn {
            fingerprint: stored.fingerprint,
        }
        .as_bytes(),
    );
    udp.send_to(&msg, node.addr).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    let (h, body) = Header::read_from_prefix(&buf[..n]).unwrap();
    assert_eq!(h.request_id.get(), 91);
    let (status, detail) = out_status(body).unwrap();
    assert_eq!(status, Status::BadRequest);
    assert_eq!(detail, Opcode::Delete as u32);
    // Still there, with its one reference: the next (TCP) delete leaves zero.
    let mut back = Vec::new();
    c.retrieve(&stored.fingerprint, &mut back, &mut |_, _| {})
        .unwrap();
    assert_eq!(back.len(), 5_000);
    assert_eq!(c.delete(&stored.fingerprint).unwrap(), 0);
}

#[test]
fn contents_lists_every_object() {
    let (_dir, node) = node();
    let mut c = node.client();
    let mut want: Vec<String> = (0..20)
        .map(|i| {
            c.store_bytes(&data(1000 + i, 5000 + i as usize))
                .unwrap()
                .fingerprint
                .to_hex()
        })
        .collect();
    want.sort();
    let out = node.dosp(&["contents"]);
    assert!(out.status.success());
    let text = stdout(&out);
    let mut got: Vec<String> = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, want);
    for l in text.lines() {
        let disk: u16 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(disk < 2);
    }
}

#[test]
fn disks_ping_and_load() {
    let (_dir, node) = node();
    let out = node.dosp(&["disks"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(
        text.lines().filter(|l| l.contains("online")).count(),
        2,
        "{text}"
    );
    let out = node.dosp(&["ping"]);
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("answered")
            && stdout(&out).contains("limits: body 65536 chunk 4194304 object 68719476736 bytes"),
        "{}",
        stdout(&out)
    );
    let mut c = node.client();
    c.store_bytes(b"x").unwrap();
    let load = c.load().unwrap();
    assert!(load.ops_total.get() >= 1);
    let hb = c.heartbeat().unwrap();
    assert_eq!(format!("{:016x}", hb.node_id.get()), node.node_id);
    assert_eq!(hb.disks_total.get(), 2);
    assert_eq!(hb.epoch.get(), 1);
}

#[test]
fn multicast_locate_only_the_holder_answers() {
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    let a = Node::start(&dir.path().join("a"), &group, &[]);
    let b = Node::start(&dir.path().join("b"), &group, &[]);
    let payload = data(42, 50_000);
    let fp = a
        .client()
        .store_bytes(&payload)
        .unwrap()
        .fingerprint
        .to_hex();
    let other = b
        .client()
        .store_bytes(b"only on b")
        .unwrap()
        .fingerprint
        .to_hex();

    let locate = |fp: &str| {
        std::process::Command::new(dosp_bin())
            .args([
                "locate",
                fp,
                "--multicast",
                &group,
                "--multicast-if",
                "127.0.0.1",
                "--wait-ms",
                "700",
            ])
            .output()
            .unwrap()
    };
    let out = locate(&fp);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(
        text.lines().count(),
        1,
        "exactly one holder answers: {text}"
    );
    assert!(text.contains(&a.node_id), "{text}");
    assert!(text.contains(&a.addr.to_string()), "{text}");
    assert!(!text.contains(&b.node_id), "{text}");

    let out = locate(&other);
    assert!(stdout(&out).contains(&b.node_id) && !stdout(&out).contains(&a.node_id));

    let nobody = Fingerprint::of(b"nobody has this").to_hex();
    let out = locate(&nobody);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("no node"), "{}", stderr(&out));

    // Unicast LOCATE over TCP asks one node: a says where, b says NOT_FOUND.
    let f: Fingerprint = fp.parse().unwrap();
    assert_eq!(a.client().locate(&f).unwrap().object_len, 50_000);
    assert!(matches!(
        b.client().locate(&f),
        Err(dosp::client::ClientError::NotFound { .. })
    ));
}

#[test]
fn heartbeats_arrive_on_the_group_and_unicast_queries_answer() {
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    let node = Node::start(&dir.path().join("a"), &group, &[]);
    let sock =
        dosp::client::join_group(group.parse().unwrap(), "127.0.0.1".parse().unwrap()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 2048];
    let mut seen = false;
    for _ in 0..50 {
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            break;
        };
        let (h, body) = Header::read_from_prefix(&buf[..n]).unwrap();
        if h.check(Kind::Response).is_ok() && h.opcode.get() == Opcode::Heartbeat as u16 {
            let hb = HeartbeatOut::read_from_prefix(body).unwrap().0;
            if format!("{:016x}", hb.node_id.get()) == node.node_id {
                assert_eq!(hb.port.get(), node.addr.port());
                seen = true;
                break;
            }
        }
    }
    assert!(seen, "no heartbeat from the node on {group}");

    // Unicast HEARTBEAT over UDP to the node's DOSP address (the client pads the
    // request: the reply is more than three times an empty request).
    let body = dosp::client::udp_request(node.addr, Opcode::Heartbeat, &[], Duration::from_secs(3))
        .unwrap();
    let hb = HeartbeatOut::read_from_prefix(&body).unwrap().0;
    assert_eq!(format!("{:016x}", hb.node_id.get()), node.node_id);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();

    // Unicast LOCATE of an absent object answers NOT_FOUND (unicast is never silent).
    let mut msg = Vec::new();
    encode_request(
        &mut msg,
        Opcode::Locate,
        78,
        0,
        LocateIn {
            fingerprint: Fingerprint::ZERO,
        }
        .as_bytes(),
    );
    udp.send_to(&msg, node.addr).unwrap();
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    let (_, body) = Header::read_from_prefix(&buf[..n]).unwrap();
    assert_eq!(out_status(body).unwrap().0, Status::NotFound);
}

/// Reads one response header + body from a raw connection.
fn read_response(s: &mut TcpStream) -> (Header, Vec<u8>) {
    let mut h = [0u8; Header::SIZE];
    s.read_exact(&mut h).unwrap();
    let header = Header::read_from_bytes(&h).unwrap();
    header.check(Kind::Response).unwrap();
    let mut body = vec![0u8; header.body_len.get() as usize];
    s.read_exact(&mut body).unwrap();
    (header, body)
}

fn raw(node: &Node) -> TcpStream {
    let s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn bad_input_gets_a_status_and_loses_nothing() {
    let (_dir, node) = node();
    let keep = data(5, 300_000);
    let keep_fp = node.client().store_bytes(&keep).unwrap().fingerprint;

    // Garbage: BAD_REQUEST, then the connection closes.
    let mut s = raw(&node);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (_, body) = read_response(&mut s);
    assert_eq!(out_status(&body).unwrap().0, Status::BadRequest);
    assert!(closed(&mut s));

    // Wrong version: BAD_VERSION.
    let mut s = raw(&node);
    let mut h = Header::new(Kind::Request, Opcode::Null, 1, 0, 0);
    h.version = 9;
    h.checksum = h.compute_checksum().into();
    s.write_all(h.as_bytes()).unwrap();
    let (_, body) = read_response(&mut s);
    assert_eq!(out_status(&body).unwrap().0, Status::BadVersion);

    // Unknown opcode: UNKNOWN_OPCODE and the connection stays usable (pipelined NULL).
    let mut s = raw(&node);
    let mut msg = Header::new_raw(Kind::Request, 0x4242, 9, 4, 0)
        .as_bytes()
        .to_vec();
    msg.extend_from_slice(b"junk");
    encode_request(&mut msg, Opcode::Null, 10, 0, &[]);
    s.write_all(&msg).unwrap();
    let (h1, b1) = read_response(&mut s);
    assert_eq!(
        (h1.request_id.get(), out_status(&b1).unwrap().0),
        (9, Status::UnknownOpcode)
    );
    assert_eq!(h1.opcode.get(), 0x4242);
    let (h2, b2) = read_response(&mut s);
    assert_eq!(
        (h2.request_id.get(), out_status(&b2).unwrap().0),
        (10, Status::Success)
    );

    // Wrong body size for the opcode: BAD_REQUEST, connection stays in step.
    let mut msg = Vec::new();
    encode_request(&mut msg, Opcode::Retrieve, 11, 0, b"short");
    encode_request(&mut msg, Opcode::Null, 12, 0, &[]);
    s.write_all(&msg).unwrap();
    assert_eq!(
        out_status(&read_response(&mut s).1).unwrap().0,
        Status::BadRequest
    );
    assert_eq!(
        out_status(&read_response(&mut s).1).unwrap().0,
        Status::Success
    );

    // Body length beyond the maximum: TOO_LARGE, closed.
    let mut s = raw(&node);
    s.write_all(Header::new(Kind::Request, Opcode::Null, 1, BODY_MAX + 1, 0).as_bytes())
        .unwrap();
    assert_eq!(
        out_status(&read_response(&mut s).1).unwrap().0,
        Status::TooLarge
    );
    assert!(closed(&mut s));

    // A chunk longer than announced: the STORE is refused, nothing stored.
    let mut s = raw(&node);
    let mut msg = Vec::new();
    encode_request(
        &mut msg,
        Opcode::Store,
        20,
        0,
        StoreIn::new(0, None, None).as_bytes(),
    );
    encode_chunk_header(&mut msg, 10, false);
    msg.extend_from_slice(b"0123456789EXTRA-BYTES-HERE");
    s.write_all(&msg).unwrap();
    let (h, body) = read_response(&mut s);
    assert_eq!(
        (h.request_id.get(), out_status(&body).unwrap().0),
        (20, Status::BadRequest)
    );
    assert!(closed(&mut s));
    assert!(node
        .client()
        .retrieve(
            &Fingerprint::of(b"0123456789"),
            &mut std::io::sink(),
            &mut |_, _| {}
        )
        .is_err());

    // A chunk over the node's maximum: TOO_LARGE with its length, the chunk skipped
    // and the connection still in step.
    let mut s = raw(&node);
    let mut msg = Vec::new();
    encode_request(
        &mut msg,
        Opcode::Store,
        21,
        0,
        StoreIn::new(0, None, None).as_bytes(),
    );
    encode_chunk_header(&mut msg, CHUNK_MAX_DEFAULT + 1, true);
    msg.resize(msg.len() + CHUNK_MAX_DEFAULT as usize + 1, 0x5A);
    encode_request(&mut msg, Opcode::Null, 23, 0, &[]);
    s.write_all(&msg).unwrap();
    let (h, body) = read_response(&mut s);
    assert_eq!(
        (h.request_id.get(), out_status(&body).unwrap()),
        (21, (Status::TooLarge, CHUNK_MAX_DEFAULT + 1))
    );
    let (h, body) = read_response(&mut s);
    assert_eq!(
        (h.request_id.get(), out_status(&body).unwrap().0),
        (23, Status::Success)
    );

    // A connection that stops mid-store: the half object never appears.
    let half = data(6, 1 << 20);
    let mut s = raw(&node);
    let mut msg = Vec::new();
    encode_request(
        &mut msg,
        Opcode::Store,
        22,
        0,
        StoreIn::new(0, None, None).as_bytes(),
    );
    encode_chunk_header(&mut msg, half.len() as u32, false);
    msg.extend_from_slice(&half);
    s.write_all(&msg).unwrap();
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    let mut c = node.client();
    let mut count = 0;
    c.contents(&mut |_, _| count += 1).unwrap();
    assert_eq!(count, 1, "only the object stored before remains");

    // Everything stored before is intact; the node still serves.
    let mut back = Vec::new();
    c.retrieve(&keep_fp, &mut back, &mut |_, _| {}).unwrap();
    assert_eq!(back, keep);
    let load = c.load().unwrap();
    assert!(load.errors_total.get() >= 6);

    // CLI: a fingerprint that is not 32 hex characters.
    let out = node.dosp(&["fetch", "not-a-fingerprint"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("error: invalid fingerprint"),
        "{}",
        stderr(&out)
    );
    let out = node.dosp(&["delete", "0123456789abcdef0123456789abcdeg"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        node.log().contains("malformed input"),
        "bad input is logged"
    );
}

#[test]
fn pipelined_requests_answer_in_order() {
    let (_dir, node) = node();
    let fp = node.client().store_bytes(b"pipelined").unwrap().fingerprint;
    let mut s = raw(&node);
    let mut msg = Vec::new();
    for id in 0..50u64 {
        encode_request(
            &mut msg,
            Opcode::Locate,
            id,
            0,
            LocateIn { fingerprint: fp }.as_bytes(),
        );
    }
    s.write_all(&msg).unwrap();
    for id in 0..50u64 {
        let (h, body) = read_response(&mut s);
        assert_eq!(h.request_id.get(), id);
        assert_eq!(out_status(&body).unwrap().0, Status::Success);
    }
}

#[test]
fn clean_shutdown_on_sigterm_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    let data_dir = dir.path().join("data");
    let mut node = Node::start(&data_dir, &group, &[]);
    let objs: Vec<Vec<u8>> = (0..10).map(|i| data(500 + i, 70_000)).collect();
    let fps: Vec<Fingerprint> = objs
        .iter()
        .map(|o| node.client().store_bytes(o).unwrap().fingerprint)
        .collect();
    assert_eq!(node.terminate(), Some(0), "clean exit:\n{}", node.log());
    assert!(node.log().contains("stopped cleanly"));
    let node = Node::start(&data_dir, &group, &[]);
    let mut c = node.client();
    for (fp, o) in fps.iter().zip(&objs) {
        let mut back = Vec::new();
        c.retrieve(fp, &mut back, &mut |_, _| {}).unwrap();
        assert_eq!(&back, o);
    }
    assert_eq!(
        c.heartbeat().unwrap().epoch.get(),
        2,
        "epoch advances per start"
    );
}

#[test]
fn kill_9_mid_workload_keeps_every_acknowledged_object() {
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    let data_dir = dir.path().join("data");
    for round in 0..3u64 {
        let mut node = Node::start(&data_dir, &group, &[]);
        let addr = node.node_arg();
        let (tx, rx) = std::sync::mpsc::channel::<(Fingerprint, u64, usize)>();
        // Four writers store objects as fast as they can; each acknowledgement is
        // recorded the moment the node gives it.
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let tx = tx.clone();
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let Ok(mut c) = dosp::client::Client::connect(&addr, Duration::from_secs(5))
                    else {
                        return;
                    };
                    for i in 0..10_000u64 {
                        let seed = round * 1_000_000 + w * 100_000 + i;
                        let len = [100usize, 4096, 70_000, 1_200_000][(i % 4) as usize];
                        match c.store_bytes(&data(seed, len)) {
                            Ok(s) => {
                                if tx.send((s.fingerprint, seed, len)).is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        // Let some stores complete, then pull the plug mid-stream.
        let mut acked = Vec::new();
        while acked.len() < 40 {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(a) => acked.push(a),
                Err(_) => break,
            }
        }
        node.kill9();
        acked.extend(rx.try_iter());
        for w in writers {
            let _ = w.join();
        }
        acked.extend(rx.try_iter());
        assert!(
            acked.len() >= 40,
            "round {round}: only {} stores acknowledged",
            acked.len()
        );

        let node = Node::start(&data_dir, &group, &[]);
        let mut c = node.client();
        for (fp, seed, len) in &acked {
            let mut back = Vec::new();
            c.retrieve(fp, &mut back, &mut |_, _| {})
                .unwrap_or_else(|e| {
                    panic!("round {round}: acknowledged {fp} lost: {e}\n{}", node.log())
                });
            assert_eq!(back, data(*seed, *len));
        }
        // Every object the node lists is whole and matches its fingerprint.
        let mut all = Vec::new();
        c.contents(&mut |fp, _| all.push(fp)).unwrap();
        for fp in all {
            c.retrieve(&fp, &mut std::io::sink(), &mut |_, _| {})
                .unwrap();
        }
        drop(node);
    }
}

/// GET `path` from the management endpoint; returns (status code, body).
fn http_get(node: &Node, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(node.mgmt).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Connection: close, so that reading to the end ends (the server keeps connections alive otherwise).
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn metric(node: &Node, name: &str) -> u64 {
    let (_, body) = http_get(node, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in metrics:\n{body}"))
        .parse()
        .unwrap()
}

#[test]
fn a_stalled_store_times_out_and_is_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        &unique_group(),
        &["--request-timeout-ms", "300"],
    );
    let mut s = raw(&node);
    let mut msg = Vec::new();
    encode_request(
        &mut msg,
        Opcode::Store,
        1,
        0,
        StoreIn::new(0, None, None).as_bytes(),
    );
    encode_chunk_header(&mut msg, 1000, true);
    msg.extend_from_slice(&[1u8; 400]);
    s.write_all(&msg).unwrap();
    // An idle connection with nothing in flight is left alone meanwhile.
    let mut idle = raw(&node);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(closed(&mut s), "the stalled connection was closed");
    assert_eq!(metric(&node, "dosd_sessions_timed_out_total"), 1);
    assert_eq!(metric(&node, "dosd_stores_aborted_total"), 1);
    let mut ping = Vec::new();
    encode_request(&mut ping, Opcode::Null, 5, 0, &[]);
    idle.write_all(&ping).unwrap();
    assert_eq!(
        out_status(&read_response(&mut idle).1).unwrap().0,
        Status::Success
    );
    let mut count = 0;
    node.client().contents(&mut |_, _| count += 1).unwrap();
    assert_eq!(count, 0);
}

#[test]
fn a_node_named_by_its_operator_shows_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    let data_dir = dir.path().join("data");
    let node = Node::start(&data_dir, &group, &["--node-id", "node-a"]);
    // The documented mapping: the first 8 bytes of MD5("node-a"), little-endian.
    let md5 = Fingerprint::of(b"node-a").0;
    let want = u64::from_le_bytes(md5[..8].try_into().unwrap());
    assert_eq!(node.node_id, format!("{want:016x}"));
    assert_eq!(node.node_id, "5ce83ab35b8aec6c");

    let (code, body) = http_get(&node, "/v1/node");
    assert_eq!(code, 200);
    assert!(body.contains("\"node_name\":\"node-a\""), "{body}");
    let mut c = node.client();
    let hb = c.heartbeat().unwrap();
    assert_eq!(hb.node_id.get(), want);
    assert_eq!(NodeName::from_field(&hb.name).unwrap().as_str(), "node-a");
    let fp = c
        .store_bytes(b"held by node-a")
        .unwrap()
        .fingerprint
        .to_hex();
    let out = std::process::Command::new(dosp_bin())
        .args(["locate", &fp, "--multicast", &group, "--wait-ms", "700"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(&format!("node {want:016x} name node-a addr ")),
        "{}",
        stdout(&out)
    );
    drop(node);

    // A number is a number, shown without a name; a bad name is refused at start-up.
    let node = Node::start(&data_dir, &group, &["--node-id", "42"]);
    assert_eq!(node.node_id, format!("{:016x}", 42));
    let (_, body) = http_get(&node, "/v1/node");
    assert!(body.contains("\"node_name\":null"), "{body}");
    drop(node);
    let out = std::process::Command::new(dosd_bin())
        .args([
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--node-id",
            "node a",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid node id") && stderr(&out).contains("without spaces"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn management_node_and_metrics() {
    let (_dir, node) = node();
    node.client().store_bytes(b"counted").unwrap();
    let (code, body) = http_get(&node, "/v1/node");
    assert_eq!(code, 200);
    assert!(
        body.contains(&format!("\"node_id\":\"{}\"", node.node_id)),
        "{body}"
    );
    assert!(body.contains("\"epoch\":1"), "{body}");
    assert!(metric(&node, "dosd_stores_total") >= 1);
    assert!(metric(&node, "dosd_heartbeats_sent_total") >= 1);
    let (code, body) = http_get(&node, "/nope");
    assert_eq!(code, 404);
    assert!(body.contains("error"));
}

#[test]
fn config_file_flags_and_clear_start_up_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let conf = dir.path().join("dosd.toml");
    std::fs::write(
        &conf,
        "disks = 3\ndisk_size = \"32M\"\nnode_id = \"0x00000000000000ab\"\n",
    )
    .unwrap();
    let group = unique_group();
    let node = Node::start_bare(&data_dir, &group, &["--config", conf.to_str().unwrap()]);
    assert_eq!(node.node_id, "00000000000000ab");
    let disks = node.client().disks(ALL_DISKS).unwrap();
    assert_eq!(disks.len(), 3);
    // The log space: the image less the label's first MiB.
    assert!(disks.iter().all(|d| d.bytes_total == 31 << 20), "{disks:?}");

    // A second node on the same data directory is refused, clearly.
    let out = std::process::Command::new(dosd_bin())
        .arg("--data-dir")
        .arg(&data_dir)
        .args([
            "--config",
            conf.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--mgmt-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("error: cannot open disk 0") && err.contains("already in use"),
        "{err}"
    );
    assert_eq!(
        err.matches("already in use").count(),
        1,
        "no repeated causes: {err}"
    );
    drop(node);

    // Bad values name the key and the reason, and exit non-zero.
    for (args, want) in [
        (&["--disk-size", "1Q"][..], "invalid disk size"),
        (&["--disk-size", "1M"][..], "at least"),
        (&["--disks", "0"][..], "invalid disks"),
        (&["--node-id", "no spaces"][..], "invalid node id"),
        (&["--connections-max", "0"][..], "invalid connections_max"),
        (&["--connections-max", "70000"][..], "must be 1 to 65536"),
        (&["--disk", "floppy:a"][..], "expected nvme:SERIAL"),
        (
            &["--disk", "nvme:NO-SUCH-SERIAL"][..],
            "no NVMe controller matches",
        ),
        (
            &["--disk", "nvme:ffff:ff:1f.7"][..],
            "no NVMe controller matches",
        ),
    ] {
        let out = std::process::Command::new(dosd_bin())
            .arg("--data-dir")
            .arg(&data_dir)
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    std::fs::write(&conf, "disks = 2\ncolour = \"blue\"\n").unwrap();
    let out = std::process::Command::new(dosd_bin())
        .args(["--config", conf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(stderr(&out).contains("colour"), "{}", stderr(&out));
}

#[test]
fn full_disks_say_no_space_and_compaction_gives_the_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), &unique_group(), &[]);
    let mut c = node.client();
    // Two 64 MiB disks hold two 28 MiB objects each, with room to spare for the
    // store's own metadata (superblocks, checkpoint slots, reserves) but not a third.
    let objs: Vec<Vec<u8>> = (0..4).map(|i| data(7000 + i, 28 << 20)).collect();
    let fps: Vec<Fingerprint> = objs
        .iter()
        .map(|o| c.store_bytes(o).unwrap().fingerprint)
        .collect();

    // Announced too big: refused up front (the CLI passes the file size as the hint).
    let big = dir.path().join("big");
    std::fs::write(&big, data(1, 70 << 20)).unwrap();
    let out = node.dosp(&["store", big.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("NO_SPACE"), "{}", stderr(&out));
    // Unannounced: fails part way, and nothing of it is visible.
    let fifth = data(7100, 28 << 20);
    let mut input = &fifth[..];
    let err = c
        .store(&mut input, Default::default(), &mut |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("NO_SPACE"), "{err}");

    // Deleting makes the space reclaimable; the idle node compacts it.
    assert_eq!(c.delete(&fps[0]).unwrap(), 0);
    let mut stored = None;
    let expect = dosp::client::Expect {
        len: Some(fifth.len() as u64),
        md5: None,
    };
    for _ in 0..100 {
        let mut input = &fifth[..];
        match c.store(&mut input, expect, &mut |_| {}) {
            Ok(s) => {
                stored = Some(s);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let stored = stored.expect("space was reclaimed within 20 s");
    assert_eq!(stored.fingerprint, Fingerprint::of(&fifth));
    for (fp, o) in fps.iter().zip(&objs).skip(1) {
        let mut back = Vec::new();
        c.retrieve(fp, &mut back, &mut |_, _| {}).unwrap();
        assert!(back == *o, "object {fp} intact after compaction");
    }
    assert!(metric(&node, "dosd_errors_total") >= 2);
}

fn is_no_space(e: &dosp::client::ClientError) -> bool {
    matches!(
        e,
        dosp::client::ClientError::Status {
            status: Status::NoSpace,
            ..
        }
    )
}

/// A small disk filled to the brim: while it reports room for more of the smallest
/// objects a new one is stored, and when it reports none a new one of any size gets
/// NO_SPACE and changes nothing; but storing again an object it already holds adds a
/// reference, whether the size is announced or not, from the library or the CLI.
#[test]
fn a_full_disk_admits_what_it_reports_and_still_takes_duplicates() {
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
    let mut node = Node::start_bare(&data_dir, &group, &args);
    let mut c = node.client();
    let status = |c: &mut dosp::client::Client| c.disks(ALL_DISKS).unwrap()[0];
    // Bigger than a segment (1 MiB), so it is written as several records.
    let big = data(8000, (3 << 20) + 777);
    let big_fp = c.store_bytes(&big).unwrap().fingerprint;
    let mut mid = Vec::new();
    for seed in 8001.. {
        let bytes = data(seed, 200_000);
        match c.store_bytes(&bytes) {
            Ok(s) => mid.push((s.fingerprint, bytes)),
            Err(e) if is_no_space(&e) => break,
            Err(e) => panic!("store: {e}"),
        }
    }
    assert!(mid.len() >= 40, "{} objects of 200 KB fit", mid.len());
    // To the brim with objects that cost what the smallest does (16 bytes: one packed
    // record of 96 bytes on disk).
    let mut small = 0;
    for seed in 9000..100_000 {
        let before = status(&mut c);
        if before.objects_available == 0 {
            break;
        }
        let s = c
            .store_bytes(&data(seed, 16))
            .unwrap_or_else(|e| panic!("objects_available {} but: {e}", before.objects_available));
        assert!(!s.deduplicated);
        small += 1;
        assert!(status(&mut c).objects_available < before.objects_available);
    }
    let full = status(&mut c);
    assert_eq!(full.objects_available, 0, "{full:?}");
    assert!(small >= 1, "the 200 KB objects left room for small ones");

    // Nothing new gets in, of any size, announced or not; nothing of it is kept.
    let objects = |c: &mut dosp::client::Client| c.contents(&mut |_, _| {}).unwrap();
    let count = objects(&mut c);
    for (seed, len) in [(12_000, 1), (12_001, 4096), (12_002, 200_000)] {
        let bytes = data(seed, len);
        let e = c.store_bytes(&bytes).unwrap_err();
        assert!(is_no_space(&e), "{len} bytes: {e}");
        let mut input = &bytes[..];
        let e = c
            .store(&mut input, dosp::client::Expect::default(), &mut |_| {})
            .unwrap_err();
        assert!(is_no_space(&e), "{len} bytes, size unknown: {e}");
    }
    assert_eq!(objects(&mut c), count);
    let after = status(&mut c);
    assert_eq!(
        (after.objects_used, after.objects_available),
        (full.objects_used, 0)
    );

    // Duplicates are referenced: announced (too big to fit), unannounced, a small
    // one, and through the CLI (which announces the file size).
    let (fp, bytes) = &mid[3];
    let s = c.store_bytes(bytes).unwrap();
    assert!(
        s.deduplicated && s.fingerprint == *fp && s.refcount == 2,
        "{s:?}"
    );
    let mut input = &big[..];
    let s = c
        .store(&mut input, dosp::client::Expect::default(), &mut |_| {})
        .unwrap();
    assert!(
        s.deduplicated && s.fingerprint == big_fp && s.refcount == 2,
        "{s:?}"
    );
    let s = c.store_bytes(&data(9000, 16)).unwrap();
    assert!(s.deduplicated && s.refcount == 2, "{s:?}");
    let file = dir.path().join("big");
    std::fs::write(&file, &big).unwrap();
    let out = node.dosp(&["store", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), big_fp.to_hex());
    assert_eq!(objects(&mut c), count);

    // The references are durable: after a restart, deleting counts them down.
    drop(c);
    assert_eq!(node.terminate(), Some(0), "{}", node.log());
    let node = Node::start_bare(&data_dir, &group, &args);
    let mut c = node.client();
    assert_eq!(objects(&mut c), count);
    assert_eq!(c.delete(&big_fp).unwrap(), 2);
    assert_eq!(c.delete(fp).unwrap(), 1);
    let mut got = Vec::new();
    c.retrieve(&big_fp, &mut got, &mut |_, _| {}).unwrap();
    assert!(got == big);
}

/// Peak resident memory of a process, from /proc (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc status");
    kb * 1024
}

#[test]
fn a_large_object_streams_through_without_being_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_bare(
        &dir.path().join("data"),
        &unique_group(),
        &["--disks", "1", "--disk-size", "400M"],
    );
    let input = dir.path().join("large");
    {
        // 256 MiB, written in pieces so the test itself stays small too.
        let mut f = std::fs::File::create(&input).unwrap();
        for i in 0..64 {
            f.write_all(&data(9000 + i, 4 << 20)).unwrap();
        }
    }
    let out = node.dosp(&["store", input.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let fp = stdout(&out);
    assert_eq!(fp, md5sum(&input));
    let back = dir.path().join("back");
    let out = node.dosp(&["fetch", &fp, "-o", back.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(md5sum(&back), fp);
    let out = node.dosp(&["range", &fp, "200000000", "5"]);
    assert_eq!(
        out.stdout,
        std::fs::read(&input).unwrap()[200_000_000..200_000_005]
    );
    // The node moved 512 MiB through fixed buffers: its peak memory stays a small
    // fraction of the object (staging, bounce and socket buffers are about 1 MiB each).
    let peak = peak_rss(node.child.id());
    assert!(
        peak < 64 << 20,
        "dosd peaked at {} MiB for a 256 MiB object",
        peak >> 20
    );
}

#[test]
fn many_concurrent_connections() {
    let (_dir, node) = node();
    let addr = node.node_arg();
    let workers: Vec<_> = (0..48u64)
        .map(|w| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = dosp::client::Client::connect(&addr, Duration::from_secs(30)).unwrap();
                let mut mine = Vec::new();
                for i in 0..10u64 {
                    let len = [0usize, 1, 4096, 65_537, 300_000][((w + i) % 5) as usize];
                    let d = data(w * 100 + i, len);
                    let s = c.store_bytes(&d).unwrap();
                    assert_eq!(s.fingerprint, Fingerprint::of(&d));
                    mine.push((s.fingerprint, d));
                }
                for (fp, d) in &mine {
                    let mut back = Vec::new();
                    c.retrieve(fp, &mut back, &mut |_, _| {}).unwrap();
                    assert!(back == *d);
                }
                mine.len()
            })
        })
        .collect();
    // Every connection is open at once: the node serves them interleaved.
    let total: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(total, 480);
    assert!(metric(&node, "dosd_connections_total") >= 48);
}

#[test]
fn explicit_file_disks_from_flags_and_config_serve_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let disk_a = format!("file:{}", a.display());
    let disk_b = format!("file:{}", b.display());
    let data_dir = dir.path().join("data");
    let group = unique_group();
    let objects: Vec<Vec<u8>> = (0..6)
        .map(|i| data(i, 1000 + 70_000 * i as usize))
        .collect();
    let fps: Vec<Fingerprint> = {
        let node = Node::start_bare(
            &data_dir,
            &group,
            &["--disk", &disk_a, "--disk", &disk_b, "--disk-size", "32M"],
        );
        let disks = node.client().disks(ALL_DISKS).unwrap();
        assert_eq!(disks.len(), 2, "{disks:?}");
        // The log space: the image less the label's first MiB.
        assert!(disks.iter().all(|d| d.bytes_total == 31 << 20), "{disks:?}");
        let fps = objects
            .iter()
            .map(|o| node.client().store_bytes(o).unwrap().fingerprint)
            .collect();
        drop(node);
        fps
    };
    // The files are the disks: sized as asked, and nothing in the data directory.
    assert_eq!(std::fs::metadata(&a).unwrap().len(), 32 << 20);
    assert_eq!(std::fs::metadata(&b).unwrap().len(), 32 << 20);
    assert!(!data_dir.join("disk0.img").exists());

    // The same disks named in the config file (`disk = [...]`), in the other order:
    // the store finds every object by the disks' own identities.
    let conf = dir.path().join("dosd.toml");
    std::fs::write(
        &conf,
        format!("disk = [{disk_b:?}, {disk_a:?}]\ndisk_size = \"32M\"\n"),
    )
    .unwrap();
    let node = Node::start_bare(&data_dir, &group, &["--config", conf.to_str().unwrap()]);
    for (o, fp) in objects.iter().zip(&fps) {
        let mut back = Vec::new();
        node.client()
            .retrieve(fp, &mut back, &mut |_, _| {})
            .unwrap();
        assert_eq!(&back, o);
    }
}
