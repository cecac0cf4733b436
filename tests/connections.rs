//! Connection limits of a real `dosd` process, probed from outside as a client would:
//! the file-descriptor budget, bursts of connections, a full session table, slow
//! clients, and the UDP amplification rule.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use dosp::codec::encode_request;
use dosp::wire::*;
use dosp::Fingerprint;
use zerocopy::{FromBytes, IntoBytes};

/// How long any single wait on the node may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);

fn raw(node: &Node) -> TcpStream {
    let s = TcpStream::connect_timeout(&node.addr, WAIT).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn send_null(s: &mut TcpStream, id: u64) {
    let mut msg = Vec::new();
    encode_request(&mut msg, Opcode::Null, id, 0, &[]);
    s.write_all(&msg).unwrap();
}

/// Reads one response header + body.
fn read_response(s: &mut TcpStream) -> std::io::Result<(Header, Vec<u8>)> {
    let mut h = [0u8; Header::SIZE];
    s.read_exact(&mut h)?;
    let header = Header::read_from_bytes(&h).unwrap();
    header.check(Kind::Response).unwrap();
    let mut body = vec![0u8; header.body_len.get() as usize];
    s.read_exact(&mut body)?;
    Ok((header, body))
}

/// The status of the next response on `s`.
fn status(s: &mut TcpStream) -> Status {
    let (_, body) = read_response(s).expect("a response");
    out_status(&body).unwrap().0
}

/// True once the node has closed `s` (EOF or reset), within the read timeout.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

fn signal(node: &Node, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &node.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} failed");
}

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

#[test]
fn a_burst_of_connections_is_served_without_waiting_for_another_client() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        &unique_group(),
        &["--test-hooks", "--test-stall-ms", "1500"],
    );
    // 120: more than one readiness event used to take (64), within the kernel's
    // queue even at std's fixed backlog of 128, so nothing would ever wake the loop
    // for the rest. 300: more than one accept pass takes (256), so the loop must come
    // back by itself, and more than a backlog of 128 holds.
    for (round, n) in [120u64, 300].into_iter().enumerate() {
        // Stall the loop so that the whole burst queues up before it looks: one
        // readiness event for all of it. (If the stall comes late, the burst is spread
        // over several events and the test only gets easier.)
        signal(&node, "USR2");
        std::thread::sleep(Duration::from_millis(300));
        let mut conns: Vec<TcpStream> = (0..n).map(|_| raw(&node)).collect();
        for (id, s) in conns.iter_mut().enumerate() {
            send_null(s, id as u64);
        }
        // No other client connects from here on: every one is answered all the same.
        for (id, s) in conns.iter_mut().enumerate() {
            let (h, body) = read_response(s).unwrap_or_else(|e| {
                panic!(
                    "round {round}: connection {id} of {n} stranded: {e}\n{}",
                    node.log()
                )
            });
            assert_eq!(h.request_id.get(), id as u64);
            assert_eq!(out_status(&body).unwrap().0, Status::Success);
        }
        // Let the stall's end pass before the next round's stall.
        std::thread::sleep(Duration::from_millis(1500));
    }
}

/// A kept-alive HTTP/1.1 connection to the management endpoint: opened while the
/// node has descriptors, it still answers when the node has none to spare.
struct Rest {
    s: TcpStream,
}

impl Rest {
    fn connect(node: &Node) -> Rest {
        let s = TcpStream::connect(node.mgmt).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        Rest { s }
    }

    /// GET `path`: (status code, body).
    fn get(&mut self, path: &str) -> (u16, String) {
        write!(self.s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            self.s.read_exact(&mut b).expect("an HTTP response head");
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .expect("a content-length");
        let mut body = vec![0u8; len];
        self.s.read_exact(&mut body).unwrap();
        (code, String::from_utf8(body).unwrap())
    }

    fn health(&mut self) -> serde_json::Value {
        let (code, body) = self.get("/v1/health");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn metric(&mut self, name: &str) -> u64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in metrics"))
            .parse()
            .unwrap()
    }

    /// Polls `/v1/health` until `pred` holds, for at most [`WAIT`].
    fn wait_health(&mut self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let h = self.health();
            if pred(&h) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: last /v1/health {h}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn reason_kinds(h: &serde_json::Value) -> Vec<String> {
    h["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap().to_string())
        .collect()
}

/// Sets the running node's descriptor limit (soft, keeping `hard`).
fn set_nofile(node: &Node, soft: u64, hard: u64) {
    use rustix::process::{prlimit, Pid, Resource, Rlimit};
    let pid = Pid::from_raw(node.child.id() as i32).unwrap();
    let limit = Rlimit {
        current: Some(soft),
        maximum: (hard != u64::MAX).then_some(hard),
    };
    prlimit(Some(pid), Resource::Nofile, limit).unwrap();
}

/// The descriptors the node has open, by number.
fn open_fds(node: &Node) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{}/fd", node.child.id()))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

#[test]
fn out_of_descriptors_the_node_refuses_with_busy_says_so_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), &unique_group(), &[]);
    let mut rest = Rest::connect(&node);
    rest.wait_health("a node that has started is ok", |h| h["status"] == "ok");
    let (soft, hard) = node.nofile_limits();

    // 1. Room for two more descriptors (and whatever holes there are below the
    // highest): the first connections get sessions, the rest are refused with BUSY at
    // once instead of waiting in the queue.
    let fds = open_fds(&node);
    let highest = *fds.iter().max().unwrap();
    let free = highest + 3 - fds.len() as u64;
    set_nofile(&node, highest + 3, hard);
    let mut served = Vec::new();
    let mut busy = 0;
    for id in 0..free + 6 {
        let mut s = raw(&node);
        send_null(&mut s, id);
        let (h, body) = read_response(&mut s)
            .unwrap_or_else(|e| panic!("connection {id} got no answer: {e}\n{}", node.log()));
        match out_status(&body).unwrap() {
            (Status::Success, _) => served.push(s),
            (Status::Busy, detail) => {
                assert_eq!((h.request_id.get(), h.opcode.get(), detail), (0, 0, 0));
                assert!(closed(&mut s), "a refused connection is closed");
                busy += 1;
            }
            other => panic!("connection {id}: {other:?}"),
        }
    }
    assert!(busy >= 6, "{busy} refused of {}, {free} free", free + 6);
    rest.wait_health("out of descriptors is a reason", |h| {
        h["status"] == "degraded" && reason_kinds(h) == ["listener_shedding"]
    });
    assert!(rest.metric("dosd_accept_failures_total") >= 6);
    assert!(rest.metric("dosd_connections_refused_total") >= 6);
    assert_eq!(rest.metric("dosd_listener_state"), 1);

    // 2. No descriptor at all, not even the reserve's slot: the node cannot accept,
    // and says it is failing. Clients wait in the queue.
    set_nofile(&node, 3, hard);
    let mut queued: Vec<TcpStream> = (0..20).map(|_| raw(&node)).collect();
    for (id, s) in queued.iter_mut().enumerate() {
        send_null(s, 100 + id as u64);
    }
    rest.wait_health("a listener that cannot accept fails the node", |h| {
        h["status"] == "failing" && reason_kinds(h).contains(&"listener_stuck".to_string())
    });

    // 3. Descriptors come back: every queued client is answered though no other
    // client connects to wake the listener, and the node is ok again.
    set_nofile(&node, soft, hard);
    for (id, s) in queued.iter_mut().enumerate() {
        let (h, body) = read_response(s)
            .unwrap_or_else(|e| panic!("queued connection {id} stranded: {e}\n{}", node.log()));
        assert_eq!(h.request_id.get(), 100 + id as u64);
        assert_eq!(out_status(&body).unwrap().0, Status::Success);
    }
    rest.wait_health("descriptors back", |h| h["status"] == "ok");
    assert_eq!(rest.metric("dosd_listener_state"), 0);
    node.client().ping().unwrap();
    for s in &mut served {
        send_null(s, 7);
        assert_eq!(status(s), Status::Success, "sessions kept through it all");
    }
    let log = node.log();
    assert!(log.contains("refusing new connections with BUSY"), "{log}");
    assert!(log.contains("accepting again"), "{log}");
}

/// Writes `bytes` one at a time, `every` apart, until the node closes the connection.
/// Returns how many were written before it did, or `None` if it never did.
fn trickle(s: &mut TcpStream, bytes: &[u8], every: Duration) -> Option<usize> {
    s.set_nonblocking(true).unwrap();
    let mut probe = [0u8; 64];
    for (i, b) in bytes.iter().enumerate() {
        if s.write_all(std::slice::from_ref(b)).is_err() {
            return Some(i);
        }
        std::thread::sleep(every);
        match s.read(&mut probe) {
            Ok(0) => return Some(i + 1),
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return Some(i + 1),
            _ => {}
        }
    }
    s.set_nonblocking(false).unwrap();
    // The last byte may have gone just before the deadline: give the node its scan.
    closed(s).then_some(bytes.len())
}

#[test]
fn a_request_header_trickled_a_byte_at_a_time_is_cut_off_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    // Silence and idle limits far away: only the header deadline can end this.
    let node = Node::start(
        &dir.path().join("data"),
        &unique_group(),
        &["--header-timeout-ms", "500"],
    );
    let mut msg = Vec::new();
    encode_request(&mut msg, Opcode::Null, 1, 0, &[]);
    let mut s = raw(&node);
    // A byte every 100 ms, never quiet for long; the header would take 3.2 s. Its last
    // byte is held back, so the request never completes either way.
    // Closed by the node; the silence timers (30 s, 10 min) are out of reach of the
    // test's bounded wait, and the log says which deadline it was.
    let sent = trickle(&mut s, &msg[..msg.len() - 1], Duration::from_millis(100));
    assert!(
        sent.is_some(),
        "a trickled header held its connection\n{}",
        node.log()
    );
    let mut rest = Rest::connect(&node);
    assert_eq!(rest.metric("dosd_sessions_timed_out_total"), 1);
    assert!(node.log().contains("request header took too long"));
    // A client that sends its request whole is not affected.
    node.client().ping().unwrap();
}

#[test]
fn a_store_trickled_below_the_minimum_rate_is_aborted() {
    let dir = tempfile::tempdir().unwrap();
    // The rate is measured over request-timeout windows; the trickle below is never
    // silent for that long.
    let node = Node::start(
        &dir.path().join("data"),
        &unique_group(),
        &["--request-timeout-ms", "1000", "--transfer-rate-min", "64K"],
    );
    let mut s = raw(&node);
    let mut msg = Vec::new();
    encode_request(
        &mut msg,
        Opcode::Store,
        1,
        0,
        StoreIn {
            size_hint: 0.into(),
            flags: 0.into(),
            reserved: 0.into(),
            expect_md5: Fingerprint::ZERO,
            expect_len: 0.into(),
        }
        .as_bytes(),
    );
    dosp::codec::encode_chunk_header(&mut msg, 100, true);
    s.write_all(&msg).unwrap();
    // 100 bytes at 10 a second: the chunk would take 10 s.
    // Closed by the node; the log tells the rate rule from the silence timer.
    let sent = trickle(&mut s, &[7u8; 99], Duration::from_millis(100));
    assert!(
        sent.is_some(),
        "a trickled STORE held its connection\n{}",
        node.log()
    );
    let mut rest = Rest::connect(&node);
    assert_eq!(rest.metric("dosd_sessions_timed_out_total"), 1);
    assert_eq!(rest.metric("dosd_stores_aborted_total"), 1);
    assert!(node.log().contains("slower than the minimum rate"));
    // Nothing of it is visible; a STORE at a real client's pace goes through.
    let mut c = node.client();
    let mut count = 0;
    c.contents(&mut |_, _| count += 1).unwrap();
    assert_eq!(count, 0);
    c.store_bytes(&data(1, 3 << 20)).unwrap();
}

/// Sends the start of a STORE (its request and part of a chunk): the connection is
/// then in the middle of a request until the rest comes.
fn start_store(s: &mut TcpStream, id: u64) {
    let mut msg = Vec::new();
    encode_request(
        &mut msg,
        Opcode::Store,
        id,
        0,
        StoreIn {
            size_hint: 0.into(),
            flags: 0.into(),
            reserved: 0.into(),
            expect_md5: Fingerprint::ZERO,
            expect_len: 0.into(),
        }
        .as_bytes(),
    );
    dosp::codec::encode_chunk_header(&mut msg, 1000, true);
    msg.extend_from_slice(&[1u8; 10]);
    s.write_all(&msg).unwrap();
}

#[test]
fn a_full_table_makes_room_by_closing_the_connection_idle_the_longest() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        &unique_group(),
        &["--connections-max", "4"],
    );
    // A full table of idle connections, the first idle the longest.
    let mut idle: Vec<TcpStream> = (0..4).map(|_| raw(&node)).collect();
    for (id, s) in idle.iter_mut().enumerate() {
        send_null(s, id as u64);
        assert_eq!(status(s), Status::Success);
    }
    for s in &mut idle[1..] {
        send_null(s, 9);
        assert_eq!(status(s), Status::Success);
    }
    // A new client is served; the longest idle one is closed for it, the rest kept.
    let mut newcomer = raw(&node);
    send_null(&mut newcomer, 10);
    assert_eq!(status(&mut newcomer), Status::Success);
    assert!(
        closed(&mut idle[0]),
        "the longest idle connection was closed"
    );
    for s in &mut idle[1..] {
        send_null(s, 11);
        assert_eq!(status(s), Status::Success);
    }
    let mut rest = Rest::connect(&node);
    assert_eq!(rest.metric("dosd_connections_evicted_total"), 1);

    // Every session in the middle of a request: nothing can be closed without harm,
    // so the next client is refused, with the node's limit as detail.
    start_store(&mut newcomer, 20);
    for (id, s) in idle[1..].iter_mut().enumerate() {
        start_store(s, 21 + id as u64);
    }
    // The STOREs have begun once the node has read them; a NULL pipelined behind each
    // would wait for its end, so look at the gauge of stores in progress instead.
    let deadline = Instant::now() + WAIT;
    while rest.metric("dosd_ops_outstanding") < 4 {
        assert!(Instant::now() < deadline, "the STOREs did not begin");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut refused = raw(&node);
    let (h, body) = read_response(&mut refused).expect("a BUSY reply");
    assert_eq!(
        (h.request_id.get(), h.opcode.get()),
        (0, Opcode::Null as u16)
    );
    assert_eq!(out_status(&body).unwrap(), (Status::Busy, 4));
    assert!(closed(&mut refused));
    // The client library reports it as BUSY, not as a confused reply.
    let err = dosp::client::Client::connect(&node.node_arg(), WAIT)
        .unwrap()
        .ping()
        .unwrap_err();
    assert!(
        matches!(
            err,
            dosp::client::ClientError::Status {
                status: Status::Busy,
                detail: 4,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(rest.metric("dosd_connections_refused_total"), 2);
    assert_eq!(rest.metric("dosd_connections_evicted_total"), 1);
}

/// Sends `msg` to the node's UDP port and returns the reply datagram.
fn udp_exchange(udp: &std::net::UdpSocket, node: &Node, msg: &[u8]) -> Vec<u8> {
    udp.send_to(msg, node.addr).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let (n, _) = udp.recv_from(&mut buf).expect("a UDP reply");
    buf.truncate(n);
    buf
}

#[test]
fn udp_replies_are_at_most_three_times_their_request() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_bare(
        &dir.path().join("data"),
        &unique_group(),
        &["--disks", "4", "--disk-size", "32M"],
    );
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(WAIT)).unwrap();
    let all = DiskQueryIn {
        disk: ALL_DISKS.into(),
        reserved: 0.into(),
        reserved1: 0.into(),
    };
    let all = all.as_bytes().to_vec();
    let status_len = Header::SIZE + size_of::<DiskListOut>() + 4 * size_of::<DiskStatusEntry>();

    // Every opcode, unpadded: whatever the answer, never more than 3× the request.
    let fp = LocateIn {
        fingerprint: dosp::Fingerprint::ZERO,
    }
    .as_bytes()
    .to_vec();
    for (op, body) in [
        (0u16, &[][..]),
        (Opcode::Locate as u16, &fp[..]),
        (Opcode::Heartbeat as u16, &[][..]),
        (Opcode::GetLoad as u16, &[][..]),
        (Opcode::GetDiskState as u16, &all[..]),
        (Opcode::GetDiskStatus as u16, &all[..]),
        (Opcode::Store as u16, &[0u8; 16][..]),
        (0x4242, &[][..]),
    ] {
        let mut msg = Header::new_raw(Kind::Request, op, 1, body.len() as u32, 0)
            .as_bytes()
            .to_vec();
        msg.extend_from_slice(body);
        let reply = udp_exchange(&udp, &node, &msg);
        assert!(
            reply.len() <= 3 * msg.len(),
            "opcode {op}: {} bytes answered with {}",
            msg.len(),
            reply.len()
        );
    }

    // The 40-byte question whose answer is 304 bytes: TOO_LARGE, with the size needed.
    let mut msg = Vec::new();
    encode_request(&mut msg, Opcode::GetDiskStatus, 2, 0, &all);
    let reply = udp_exchange(&udp, &node, &msg);
    assert_eq!(reply.len(), Header::SIZE + size_of::<OutHead>());
    let (h, body) = Header::read_from_prefix(&reply).unwrap();
    assert_eq!(
        (h.request_id.get(), h.opcode.get()),
        (2, Opcode::GetDiskStatus as u16)
    );
    assert_eq!(
        out_status(body).unwrap(),
        (Status::TooLarge, status_len as u32)
    );
    // Padded to a third of that, the same question is answered in full; a byte less
    // is still too little.
    let need = status_len.div_ceil(3);
    msg.resize(need - 1, 0);
    let reply = udp_exchange(&udp, &node, &msg);
    assert_eq!(
        out_status(&reply[Header::SIZE..]).unwrap().0,
        Status::TooLarge
    );
    msg.resize(need, 0);
    let reply = udp_exchange(&udp, &node, &msg);
    assert_eq!(reply.len(), status_len);
    let (out, _) = DiskListOut::read_from_prefix(&reply[Header::SIZE..]).unwrap();
    assert_eq!((out.head.status.get(), out.count.get()), (0, 4));
    // A single disk's status fits an unpadded request.
    let one = DiskQueryIn {
        disk: 1.into(),
        reserved: 0.into(),
        reserved1: 0.into(),
    };
    let mut msg = Vec::new();
    encode_request(&mut msg, Opcode::GetDiskStatus, 3, 0, one.as_bytes());
    let reply = udp_exchange(&udp, &node, &msg);
    assert_eq!(
        out_status(&reply[Header::SIZE..]).unwrap().0,
        Status::Success
    );

    // The client library pads as it must, and asks again when a list is longer.
    let body = dosp::client::udp_request(node.addr, Opcode::GetDiskStatus, &all, WAIT).unwrap();
    assert_eq!(
        DiskListOut::read_from_prefix(&body).unwrap().0.count.get(),
        4
    );
    let body = dosp::client::udp_request(node.addr, Opcode::Heartbeat, &[], WAIT).unwrap();
    let hb = HeartbeatOut::read_from_prefix(&body).unwrap().0;
    assert_eq!(format!("{:016x}", hb.node_id.get()), node.node_id);
    let err = dosp::client::udp_request(node.addr, Opcode::Locate, &fp, WAIT).unwrap_err();
    assert!(matches!(
        err,
        dosp::client::ClientError::Status {
            status: Status::NotFound,
            ..
        }
    ));
}
