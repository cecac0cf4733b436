//! The server in-process on a memory disk, driven over real loopback sockets: what a
//! peer sees on the wire, and what the node counts for it (its [`NodeStats`], read
//! directly rather than through the management core).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dosp::client::{Client, ClientError, Expect};
use dosp::codec::{encode_chunk_header, encode_request};
use dosp::wire::*;
use dosp::Fingerprint;
use nvme::mem::MemDisk;
use zerocopy::{FromBytes, IntoBytes};

use rand::SeedableRng;

use super::mesh::{mesh, MeshEnd};
use super::shards::{build_directories, Shards};
use super::{Server, ServerConfig};
use crate::copies::{Copies, Site, SITES};
use crate::node::{Addresses, NodeState};
use crate::stats::NodeStats;
use crate::store::{Store, StoreConfig};

const MIB: u64 = 1 << 20;
/// A small chunk maximum, so that an oversized chunk is cheap to send.
const CHUNK_MAX: u32 = 64 * 1024;
const OBJECT_MAX: u64 = 8 * MIB;

/// Port 0: a group port of this test's own, so no other node is heard.
fn cfg_group() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(239, 255, 73, 251), 0)
}

/// A running node on one 64 MiB memory disk, with one dataplane loop or several
/// (each loop its own region of the disk, as `dosd --dataplane-cores N` carves it).
struct TestNode {
    addr: SocketAddr,
    stats: Arc<NodeStats>,
    /// Where the test, as the management core, publishes the node's state.
    board: Arc<crate::node::NodeBoard>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<std::io::Result<Shards>>>,
    /// Object bytes the CPU copied, summed over every loop's store.
    copies: Copies,
}

impl TestNode {
    fn start() -> TestNode {
        TestNode::start_loops(1)
    }

    fn start_loops(loops: u16) -> TestNode {
        let disk = MemDisk::new(64 * MIB * u64::from(loops) + MIB, 1);
        TestNode::start_on(&disk, loops)
    }

    /// A node on `disk` (labelled for `loops` if blank, as dosd does at start-up).
    fn start_on(disk: &MemDisk, loops: u16) -> TestNode {
        TestNode::start_with(disk, loops, Duration::from_secs(3600))
    }

    /// [`TestNode::start_on`] with idle checkpoints every `checkpoint_interval`.
    fn start_with(disk: &MemDisk, loops: u16, checkpoint_interval: Duration) -> TestNode {
        let store_cfg = StoreConfig {
            max_object_bytes: OBJECT_MAX,
            ..StoreConfig::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let l = crate::store::label::open_or_label(&mut disk.device(), Some(loops), &mut rng)
            .expect("label");
        let mut meshes: Vec<Option<MeshEnd>> = if loops > 1 {
            mesh(loops).expect("mesh").into_iter().map(Some).collect()
        } else {
            vec![None]
        };
        let mut shards: Vec<Shards> = (0..loops)
            .map(|k| {
                let (base, len) = l.region(k);
                let region = nvme::Region::new(disk.device(), base, len).expect("region");
                let store =
                    Store::open(vec![Box::new(region)], store_cfg.clone(), 7).expect("store");
                Shards::new(store, meshes[usize::from(k)].take())
            })
            .collect();
        build_directories(&mut shards);
        let copies = Copies::default();
        for s in shards.iter_mut() {
            s.store.set_copies(copies.clone());
        }
        let (handle, ends) = crate::handle::handle_for(loops);
        let listeners =
            super::accept::bind_group("127.0.0.1:0".parse().expect("address"), 16, loops.into())
                .expect("bind");
        let stop = Arc::new(AtomicBool::new(false));
        let mut addr = None;
        let mut threads = Vec::new();
        for (k, ((shard, end), listener)) in shards.into_iter().zip(ends).zip(listeners).enumerate()
        {
            let cfg = ServerConfig {
                listen: "127.0.0.1:0".parse().expect("address"),
                multicast_group: cfg_group(),
                multicast_if: Ipv4Addr::LOCALHOST,
                chunk_max: CHUNK_MAX,
                connections_max: 16,
                idle_sleep: Duration::from_millis(10),
                checkpoint_interval,
                request_timeout: Duration::from_secs(30),
                idle_timeout: Duration::from_secs(60),
                header_timeout: Duration::from_secs(10),
                transfer_rate_min: 0,
                test_stall: None,
                auth: None,
            };
            let server = Server::bind_loop(cfg, listener, k == 0, shard, end).expect("bind");
            let local = server.local_addr().expect("local address");
            if addr.is_none() {
                // The management core's part: publish who the node is before the loops run.
                let SocketAddr::V4(dosp) = local else {
                    panic!("an IPv4 listener")
                };
                handle.node.publish(NodeState::new(
                    0x0123_4567_89ab_cdef,
                    Some(NodeName::new("test-node").expect("a valid name")),
                    1,
                    Addresses {
                        dosp,
                        multicast_group: cfg_group(),
                        multicast_if: Ipv4Addr::LOCALHOST,
                        mgmt: None,
                    },
                ));
                addr = Some(local);
            }
            threads.push(std::thread::spawn({
                let stop = Arc::clone(&stop);
                move || server.run(&stop)
            }));
        }
        TestNode {
            addr: addr.expect("a loop"),
            stats: Arc::clone(handle.stats.of_loop(0).expect("loop 0")),
            board: Arc::clone(&handle.node),
            stop,
            threads,
            copies,
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.addr.to_string(), Duration::from_secs(10)).expect("connect")
    }

    fn tcp(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s
    }

    /// A UDP socket connected to the node's unicast address.
    fn udp(&self) -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.connect(self.addr).expect("connect");
        s
    }

    /// Stops the node and hands back loop 0's store.
    fn stop(self) -> Store {
        self.stop_all().swap_remove(0).store
    }

    /// Stops the node and hands back every loop's shard.
    fn stop_all(mut self) -> Vec<Shards> {
        self.stop.store(true, Ordering::Relaxed);
        std::mem::take(&mut self.threads)
            .into_iter()
            .map(|t| t.join().expect("no panic").expect("clean stop"))
            .collect()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads one response (header + body) from a raw connection.
fn read_response(s: &mut TcpStream) -> (Header, Vec<u8>) {
    let mut h = [0u8; Header::SIZE];
    s.read_exact(&mut h).expect("response header");
    let header = Header::read_from_bytes(&h).expect("32 bytes");
    header.check(Kind::Response).expect("valid header");
    let mut body = vec![0u8; header.body_len.get() as usize];
    s.read_exact(&mut body).expect("response body");
    (header, body)
}

/// (request id, status, detail) of the next response.
fn next_status(s: &mut TcpStream) -> (u64, Status, u32) {
    let (h, body) = read_response(s);
    let (status, detail) = out_status(&body).expect("status");
    (h.request_id.get(), status, detail)
}

/// A STORE request with `store_in`, then `chunks` (the last one flagged LAST).
fn store_message(id: u64, store_in: &StoreIn, chunks: &[&[u8]]) -> Vec<u8> {
    let mut msg = Vec::new();
    encode_request(&mut msg, Opcode::Store, id, 0, store_in.as_bytes());
    for (i, c) in chunks.iter().enumerate() {
        encode_chunk_header(&mut msg, c.len() as u32, i + 1 == chunks.len());
        msg.extend_from_slice(c);
    }
    msg
}

fn objects(node: &TestNode) -> usize {
    let mut n = 0;
    node.client()
        .contents(&mut |_, _| n += 1)
        .expect("contents");
    n
}

#[test]
fn a_store_that_breaks_its_promises_is_refused_and_nothing_is_stored() {
    let node = TestNode::start();
    let object = vec![7u8; 10_000];
    let fp = Fingerprint::of(&object);
    let mut s = node.tcp();
    // The defect this guards against: LAST set early commits the first part with
    // SUCCESS. With the length promised, the truncated object is refused.
    let short = StoreIn::new(0, Some(10_000), None);
    s.write_all(&store_message(1, &short, &[&object[..4000]]))
        .expect("send");
    assert_eq!(
        next_status(&mut s),
        (1, Status::ChecksumMismatch, MISMATCH_LEN)
    );
    let long = StoreIn::new(0, Some(10_000), None);
    s.write_all(&store_message(2, &long, &[&object, b"x"]))
        .expect("send");
    assert_eq!(
        next_status(&mut s),
        (2, Status::ChecksumMismatch, MISMATCH_LEN)
    );
    let wrong_md5 = StoreIn::new(0, Some(10_000), Some(Fingerprint::of(b"other")));
    s.write_all(&store_message(3, &wrong_md5, &[&object]))
        .expect("send");
    assert_eq!(
        next_status(&mut s),
        (3, Status::ChecksumMismatch, MISMATCH_MD5)
    );
    // Unknown flags: BAD_REQUEST, detail the flags, and the connection stays in step.
    let mut odd = StoreIn::new(0, None, None);
    odd.flags = 0x84.into();
    s.write_all(&store_message(4, &odd, &[&object]))
        .expect("send");
    assert_eq!(next_status(&mut s), (4, Status::BadRequest, 0x84));
    assert_eq!(objects(&node), 0);

    // Promises kept: stored; the same connection carried on throughout.
    let right = StoreIn::new(0, Some(10_000), Some(fp));
    s.write_all(&store_message(
        5,
        &right,
        &[&object[..5000], &object[5000..]],
    ))
    .expect("send");
    let (h, body) = read_response(&mut s);
    assert_eq!(h.request_id.get(), 5);
    let out = StoreOut::read_from_bytes(&body).expect("StoreOut");
    assert_eq!((out.fingerprint, out.len.get()), (fp, 10_000));
    // A refused copy of a stored object adds no reference.
    s.write_all(&store_message(6, &wrong_md5, &[&object]))
        .expect("send");
    assert_eq!(next_status(&mut s).1, Status::ChecksumMismatch);
    let mut c = node.client();
    assert_eq!(c.locate(&fp).expect("stored").object_len, 10_000);
    assert_eq!(c.delete(&fp).expect("delete"), 0, "one reference only");

    // The client library: a known length is always promised, an MD5 when given.
    let mut input = &object[..];
    let err = c
        .store(
            &mut input,
            Expect {
                len: Some(20_000),
                md5: None,
            },
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::NotAsAnnounced {
                what: "length",
                sent: 10_000,
                ..
            }
        ),
        "{err}"
    );
    let mut input = &object[..];
    let err = c
        .store(
            &mut input,
            Expect {
                len: None,
                md5: Some(Fingerprint::ZERO),
            },
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        matches!(err, ClientError::NotAsAnnounced { what: "MD5", .. }),
        "{err}"
    );
    assert_eq!(objects(&node), 0);
    let aborts = node.stop().counters().aborts;
    assert_eq!(aborts, 6, "every refused write was aborted");
}

/// The idle checkpoint is started by the loop's timers and written through its poll
/// while the node goes on serving: its header is on the disk before the node stops.
#[test]
fn the_idle_checkpoint_is_written_while_the_node_runs() {
    let disk = MemDisk::new(64 * MIB + MIB, 1);
    let node = TestNode::start_with(&disk, 1, Duration::from_millis(20));
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let label =
        crate::store::label::open_or_label(&mut disk.device(), Some(1), &mut rng).expect("label");
    let (base, _) = label.region(0);
    let mut c = node.client();
    let mut fps = Vec::new();
    for i in 0..20u8 {
        let object = vec![i; 5000];
        let mut input = &object[..];
        let expect = Expect {
            len: Some(5000),
            md5: None,
        };
        fps.push(
            c.store(&mut input, expect, &mut |_| {})
                .expect("store")
                .fingerprint,
        );
    }
    let headers = |disk: &MemDisk| {
        let mut blocks = nvme::AlignedBuf::new(2 * 4096);
        nvme::BlockDevice::read_at(&mut disk.device(), base + 2 * 4096, &mut blocks)
            .expect("read the checkpoint headers");
        [&blocks[..8], &blocks[4096..4104]]
            .iter()
            .any(|m| *m == b"DOSDCKPT")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !headers(&disk) {
        assert!(Instant::now() < deadline, "no checkpoint while running");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still serving.
    for fp in &fps {
        assert_eq!(c.locate(fp).expect("stored").object_len, 5000);
    }
    let store = node.stop();
    assert_eq!(store.objects(), 20);
}

/// Idle compaction is started by the loop's timers and runs through its poll while
/// the node goes on serving: the head recorded in a superblock moves past the deleted
/// objects, and the live ones still read back.
#[test]
fn idle_compaction_runs_in_the_background_while_the_node_serves() {
    let disk = MemDisk::new(64 * MIB + MIB, 3);
    let node = TestNode::start_on(&disk, 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let label =
        crate::store::label::open_or_label(&mut disk.device(), Some(1), &mut rng).expect("label");
    let (base, _) = label.region(0);
    // The highest head seq of the two superblock copies (format.rs: offset 64).
    let head_seq = |disk: &MemDisk| {
        let mut blocks = nvme::AlignedBuf::new(2 * 4096);
        nvme::BlockDevice::read_at(&mut disk.device(), base, &mut blocks)
            .expect("read the superblocks");
        [0usize, 4096]
            .iter()
            .map(|&at| u64::from_le_bytes(blocks[at + 64..at + 72].try_into().expect("8 bytes")))
            .max()
            .unwrap_or(0)
    };
    let mut c = node.client();
    let mut kept = Vec::new();
    for i in 0..40u8 {
        let object = vec![i; 40_000];
        let mut input = &object[..];
        let fp = c
            .store(&mut input, Expect::default(), &mut |_| {})
            .expect("store")
            .fingerprint;
        if i % 4 == 0 {
            kept.push(fp);
        } else {
            c.delete(&fp).expect("delete");
        }
    }
    let before = head_seq(&disk);
    let deadline = Instant::now() + Duration::from_secs(20);
    while head_seq(&disk) <= before {
        assert!(Instant::now() < deadline, "no compaction while idle");
        std::thread::sleep(Duration::from_millis(20));
    }
    for fp in &kept {
        assert_eq!(c.locate(fp).expect("stored").object_len, 40_000);
    }
    let mut store = node.stop();
    assert!(store.counters().compactions > 0);
    for fp in &kept {
        let mut out = vec![0u8; 40_000];
        assert_eq!(store.read(fp, 0, &mut out).expect("read"), 40_000);
    }
}

#[test]
fn an_oversized_chunk_fails_its_store_and_the_connection_stays_in_step() {
    let node = TestNode::start();
    let mut s = node.tcp();
    let big = vec![9u8; CHUNK_MAX as usize + 1];
    let mut msg = store_message(1, &StoreIn::new(0, None, None), &[b"first", &big, b"last"]);
    encode_request(&mut msg, Opcode::Null, 2, 0, &[]);
    s.write_all(&msg).expect("send");
    assert_eq!(next_status(&mut s), (1, Status::TooLarge, CHUNK_MAX + 1));
    assert_eq!(
        next_status(&mut s),
        (2, Status::Success, 0),
        "still in step"
    );
    // Already failing (unknown flags): the first error is the answer.
    let mut odd = StoreIn::new(0, None, None);
    odd.flags = 0x100.into();
    s.write_all(&store_message(3, &odd, &[&big])).expect("send");
    assert_eq!(next_status(&mut s), (3, Status::BadRequest, 0x100));

    // An announced length over the object maximum: refused before any data, with the
    // length in MiB (rounded up) as the detail, after the chunks were read.
    for (announced, mib) in [
        (StoreIn::new(OBJECT_MAX + 1, None, None), 9),
        (StoreIn::new(0, Some(u64::MAX), None), u32::MAX),
        (StoreIn::new(1, Some(OBJECT_MAX * 3), None), 24),
    ] {
        s.write_all(&store_message(4, &announced, &[b"abc"]))
            .expect("send");
        assert_eq!(next_status(&mut s), (4, Status::TooLarge, mib));
    }
    assert_eq!(objects(&node), 0);
    let store = node.stop();
    assert_eq!(store.counters().aborts, 1, "the oversized chunk's write");
    assert_eq!(store.counters().stores, 0);
}

/// Sends one datagram and returns the (opcode, request id, status, detail) of the next
/// datagram that comes back.
fn ask_udp(udp: &UdpSocket, datagram: &[u8]) -> (u16, u64, Status, u32) {
    udp.send(datagram).expect("send");
    let mut buf = [0u8; 2048];
    let n = udp.recv(&mut buf).expect("an answer");
    let (h, body) = Header::read_from_prefix(&buf[..n]).expect("a header");
    h.check(Kind::Response).expect("a valid response");
    let (status, detail) = out_status(body).expect("status");
    (h.opcode.get(), h.request_id.get(), status, detail)
}

#[test]
fn udp_header_errors_are_answered_when_they_can_be_attributed() {
    let node = TestNode::start();
    let udp = node.udp();
    let hb = Opcode::Heartbeat as u16;
    let resign = |mut h: Header| {
        h.checksum = h.compute_checksum().into();
        h
    };

    let mut h = Header::new(Kind::Request, Opcode::Heartbeat, 41, 0, 0);
    h.version = 9;
    assert_eq!(
        ask_udp(&udp, resign(h).as_bytes()),
        (hb, 41, Status::BadVersion, 9)
    );
    // A checksum that does not match: nothing in the header is believed.
    let mut h = Header::new(Kind::Request, Opcode::Heartbeat, 42, 0, 0);
    h.request_id = 43.into();
    assert_eq!(ask_udp(&udp, h.as_bytes()), (0, 0, Status::BadRequest, 0));
    let h = Header::new(Kind::Request, Opcode::Heartbeat, 44, BODY_MAX + 1, 0);
    assert_eq!(
        ask_udp(&udp, h.as_bytes()),
        (hb, 44, Status::TooLarge, BODY_MAX + 1)
    );
    // Fewer body bytes than body_len: BAD_REQUEST with the bytes present.
    let locate = Opcode::Locate as u16;
    let mut msg = Header::new(Kind::Request, Opcode::Locate, 45, 16, 0)
        .as_bytes()
        .to_vec();
    msg.extend_from_slice(b"short");
    assert_eq!(ask_udp(&udp, &msg), (locate, 45, Status::BadRequest, 5));
    // A whole body of the wrong size for the opcode, as over TCP.
    let mut msg = Vec::new();
    encode_request(&mut msg, Opcode::Locate, 46, 0, b"short");
    assert_eq!(ask_udp(&udp, &msg), (locate, 46, Status::BadRequest, 5));

    // No answer: too short, not DOSP, an answer, an answer in another version. The
    // node handles datagrams in order, so the NULL sent after them is answered first.
    let mut answer = Header::new(Kind::Response, Opcode::Heartbeat, 50, 0, 0);
    let mut other_version = answer;
    other_version.version = 2;
    answer.checksum = answer.compute_checksum().into();
    let mut garbage = [0x41u8; 40];
    garbage[5] = 1;
    for silent in [
        &b"DOSP"[..],
        &garbage[..],
        answer.as_bytes(),
        resign(other_version).as_bytes(),
    ] {
        udp.send(silent).expect("send");
    }
    let mut null = Vec::new();
    encode_request(&mut null, Opcode::Null, 51, 0, &[]);
    assert_eq!(ask_udp(&udp, &null), (0, 51, Status::Success, 0));

    // Over TCP the same version error closes the connection, with the same detail.
    let mut h = Header::new(Kind::Request, Opcode::Heartbeat, 52, 0, 0);
    h.version = 9;
    let mut s = node.tcp();
    s.write_all(resign(h).as_bytes()).expect("send");
    assert_eq!(next_status(&mut s), (0, Status::BadVersion, 9));
    assert_eq!(s.read(&mut [0u8; 1]).expect("closed"), 0);
}

#[test]
fn null_reports_the_node_limits_over_tcp_and_udp() {
    let node = TestNode::start();
    let pong = node.client().ping().expect("ping");
    assert_eq!(
        (pong.body_max, pong.chunk_max, pong.object_max),
        (BODY_MAX, CHUNK_MAX, OBJECT_MAX)
    );
    let udp = node.udp();
    let mut msg = Vec::new();
    encode_request(&mut msg, Opcode::Null, 3, 0, &[]);
    udp.send(&msg).expect("send");
    let mut buf = [0u8; 256];
    let n = udp.recv(&mut buf).expect("answer");
    let (h, body) = Header::read_from_prefix(&buf[..n]).expect("header");
    assert_eq!(h.body_len.get(), 24);
    let out = NullOut::read_from_bytes(body).expect("NullOut");
    assert_eq!(
        (
            out.body_max.get(),
            out.chunk_max.get(),
            out.object_max.get()
        ),
        (BODY_MAX, CHUNK_MAX, OBJECT_MAX)
    );
}

/// The counters a request can move, at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    ops: u64,
    errors: u64,
    bad: u64,
    udp_bad: u64,
    stores: u64,
    aborted: u64,
}

impl Counts {
    fn of(s: &NodeStats) -> Counts {
        let by_status: u64 = s.errors_by_status.iter().map(NodeStats::get).sum();
        let errors = NodeStats::get(&s.errors_total);
        assert_eq!(by_status, errors, "errors by status sum to the total");
        Counts {
            ops: NodeStats::get(&s.ops_total),
            errors,
            bad: NodeStats::get(&s.bad_requests),
            udp_bad: NodeStats::get(&s.udp_bad),
            stores: NodeStats::get(&s.stores),
            aborted: NodeStats::get(&s.stores_aborted),
        }
    }

    fn minus(self, o: Counts) -> Counts {
        Counts {
            ops: self.ops - o.ops,
            errors: self.errors - o.errors,
            bad: self.bad - o.bad,
            udp_bad: self.udp_bad - o.udp_bad,
            stores: self.stores - o.stores,
            aborted: self.aborted - o.aborted,
        }
    }
}

/// Runs `act` and checks what it added to the counters: at once when `act` waits for
/// its replies, else (a connection closed, whose end the node sees later) within a few
/// seconds — and then that nothing more comes.
fn counts(node: &TestNode, what: &str, want: Counts, act: impl FnOnce()) {
    let before = Counts::of(&node.stats);
    act();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Counts::of(&node.stats).minus(before);
    while got != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        got = Counts::of(&node.stats).minus(before);
    }
    std::thread::sleep(Duration::from_millis(50));
    let late = Counts::of(&node.stats).minus(before);
    assert_eq!(got, want, "{what}");
    assert_eq!(late, want, "{what}: counted again later");
}

#[test]
fn every_reply_and_every_abort_is_counted_exactly_once() {
    let node = TestNode::start();
    let udp = node.udp();
    let reply = Counts {
        ops: 1,
        ..Counts::default()
    };
    let error = Counts { errors: 1, ..reply };
    let bad = Counts { bad: 1, ..error };
    let store = Counts {
        stores: 1,
        ..Counts::default()
    };
    let store_in = StoreIn::new(0, None, None);
    let object = vec![3u8; 3000];

    // Bodies of the wrong size, over TCP (each kind of handler) and UDP.
    let mut s = node.tcp();
    for op in [Opcode::Retrieve, Opcode::Locate, Opcode::GetContents] {
        counts(&node, op.name(), bad, || {
            let mut msg = Vec::new();
            encode_request(&mut msg, op, 1, 0, b"short");
            s.write_all(&msg).expect("send");
            assert_eq!(next_status(&mut s).1, Status::BadRequest);
        });
    }
    counts(
        &node,
        "STORE with a short StoreIn",
        Counts { stores: 1, ..bad },
        || {
            let mut msg = Vec::new();
            encode_request(&mut msg, Opcode::Store, 2, 0, b"short");
            encode_chunk_header(&mut msg, 3, true);
            msg.extend_from_slice(b"abc");
            s.write_all(&msg).expect("send");
            assert_eq!(next_status(&mut s), (2, Status::BadRequest, 5));
        },
    );
    counts(&node, "UDP body size", bad, || {
        let mut msg = Vec::new();
        encode_request(&mut msg, Opcode::Locate, 3, 0, b"short");
        assert_eq!(ask_udp(&udp, &msg).2, Status::BadRequest);
    });
    // Header errors over UDP: answered, or dropped (then the NULL after is the reply).
    let udp_bad = Counts { udp_bad: 1, ..bad };
    counts(&node, "UDP checksum", udp_bad, || {
        let mut h = Header::new(Kind::Request, Opcode::Null, 4, 0, 0);
        h.request_id = 5.into();
        assert_eq!(ask_udp(&udp, h.as_bytes()).2, Status::BadRequest);
    });
    counts(&node, "UDP body_len", udp_bad, || {
        let h = Header::new(Kind::Request, Opcode::Null, 4, BODY_MAX + 1, 0);
        assert_eq!(ask_udp(&udp, h.as_bytes()).2, Status::TooLarge);
    });
    counts(
        &node,
        "UDP garbage, then NULL",
        Counts {
            bad: 1,
            udp_bad: 1,
            ..reply
        },
        || {
            udp.send(b"garbage").expect("send");
            let mut null = Vec::new();
            encode_request(&mut null, Opcode::Null, 6, 0, &[]);
            assert_eq!(ask_udp(&udp, &null).2, Status::Success);
        },
    );
    counts(&node, "UDP unknown opcode", error, || {
        let h = Header::new_raw(Kind::Request, 999, 7, 0, 0);
        assert_eq!(ask_udp(&udp, h.as_bytes()).2, Status::UnknownOpcode);
    });
    counts(&node, "UDP LOCATE not found", error, || {
        let mut msg = Vec::new();
        let q = LocateIn {
            fingerprint: Fingerprint::ZERO,
        };
        encode_request(&mut msg, Opcode::Locate, 8, 0, q.as_bytes());
        assert_eq!(ask_udp(&udp, &msg).2, Status::NotFound);
    });

    // STOREs: answered after the last chunk, or ended by their connection.
    counts(&node, "a STORE", Counts { ops: 1, ..store }, || {
        s.write_all(&store_message(9, &store_in, &[&object]))
            .expect("send");
        assert_eq!(next_status(&mut s).1, Status::Success);
    });
    counts(
        &node,
        "oversized chunk",
        Counts { stores: 1, ..error },
        || {
            let big = vec![0u8; CHUNK_MAX as usize + 1];
            s.write_all(&store_message(10, &store_in, &[&big]))
                .expect("send");
            assert_eq!(next_status(&mut s).1, Status::TooLarge);
        },
    );
    counts(
        &node,
        "closed before its StoreIn",
        Counts {
            aborted: 1,
            ..store
        },
        || {
            let mut t = node.tcp();
            let mut msg = Vec::new();
            encode_request(&mut msg, Opcode::Store, 11, 0, store_in.as_bytes());
            t.write_all(&msg[..Header::SIZE + 10]).expect("send");
        },
    );
    counts(
        &node,
        "closed mid-chunk",
        Counts {
            aborted: 1,
            ..store
        },
        || {
            let mut t = node.tcp();
            let msg = store_message(12, &store_in, &[&object]);
            t.write_all(&msg[..msg.len() - 100]).expect("send");
            // Wait until the node has begun the store, so the close finds it writing.
            let deadline = Instant::now() + Duration::from_secs(5);
            while NodeStats::get(&node.stats.ops_outstanding) == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        },
    );
    counts(
        &node,
        "refused STORE closed early",
        Counts {
            aborted: 1,
            ..store
        },
        || {
            let mut t = node.tcp();
            let mut odd = store_in;
            odd.flags = 0x40.into();
            let msg = store_message(13, &odd, &[&object, &object]);
            t.write_all(&msg[..msg.len() - 100]).expect("send");
        },
    );
    counts(
        &node,
        "broken framing mid-STORE",
        Counts {
            stores: 1,
            aborted: 1,
            ..bad
        },
        || {
            let mut t = node.tcp();
            let mut msg = store_message(14, &store_in, &[&object, &object]);
            let second = msg.len() - object.len() - ChunkHeader::SIZE;
            msg[second] ^= 0xFF;
            t.write_all(&msg).expect("send");
            assert_eq!(
                next_status(&mut t),
                (14, Status::BadRequest, 0),
                "answered as the STORE"
            );
        },
    );
    counts(&node, "header TOO_LARGE over TCP", bad, || {
        let mut t = node.tcp();
        let h = Header::new(Kind::Request, Opcode::Null, 15, BODY_MAX + 1, 0);
        t.write_all(h.as_bytes()).expect("send");
        assert_eq!(next_status(&mut t).1, Status::TooLarge);
    });
    let store = node.stop();
    assert_eq!(store.counters().stores, 1);
}

#[test]
fn locate_and_heartbeat_answers_carry_the_node_name() {
    let node = TestNode::start();
    let mut c = node.client();
    let fp = c.store_bytes(b"named").expect("store").fingerprint;
    let located = c.locate(&fp).expect("locate");
    assert_eq!(located.node_id, 0x0123_4567_89ab_cdef);
    assert_eq!(
        located.name.as_ref().map(NodeName::as_str),
        Some("test-node")
    );
    let hb = c.heartbeat().expect("heartbeat");
    assert_eq!(
        NodeName::from_field(&hb.name).expect("named").as_str(),
        "test-node"
    );
    // Over UDP too: the same structures.
    let udp = node.udp();
    let mut msg = Vec::new();
    encode_request(&mut msg, Opcode::Heartbeat, 1, 0, &[]);
    // Padded to a third of the 144-byte reply (the UDP reply-size rule, §5).
    msg.resize(48, 0);
    udp.send(&msg).expect("send");
    let mut buf = [0u8; 256];
    let n = udp.recv(&mut buf).expect("answer");
    let (_, body) = Header::read_from_prefix(&buf[..n]).expect("header");
    let hb = HeartbeatOut::read_from_bytes(body).expect("HeartbeatOut");
    assert_eq!(&hb.name[..10], b"test-node\0");
}

/// Distinct objects whose fingerprints land on every shard of a few loops.
fn distinct(n: usize, seed: u8) -> Vec<(Fingerprint, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let data: Vec<u8> = (0..(1000 + i * 37))
                .map(|j| (j as u8) ^ (i as u8) ^ seed)
                .collect();
            (Fingerprint::of(&data), data)
        })
        .collect()
}

#[test]
fn two_loops_serve_every_operation_whichever_loop_a_connection_lands_on() {
    let node = TestNode::start_loops(2);
    let objs = distinct(40, 1);
    assert!(objs.iter().any(|(fp, _)| fp.0[0] < 128) && objs.iter().any(|(fp, _)| fp.0[0] >= 128));
    // One connection per object: the kernel spreads them over both loops, so both
    // loops store objects of both shards.
    for (fp, data) in &objs {
        let stored = node.client().store_bytes(data).expect("store");
        assert_eq!((stored.fingerprint, stored.refcount), (*fp, 1));
    }
    for (fp, data) in &objs {
        let mut c = node.client();
        let mut got = Vec::new();
        c.retrieve(fp, &mut got, &mut |_, _| {}).expect("retrieve");
        assert_eq!(&got, data);
        let mut part = Vec::new();
        c.retrieve_range(fp, 100, 200, &mut part).expect("range");
        assert_eq!(part, data[100..300]);
        let located = c.locate(fp).expect("locate");
        assert_eq!(located.object_len, data.len() as u64);
    }
    // UDP LOCATE goes to loop 0, which asks the authority for objects it lacks.
    let udp = node.udp();
    for (i, (fp, data)) in objs.iter().enumerate() {
        let mut msg = Vec::new();
        encode_request(
            &mut msg,
            Opcode::Locate,
            900 + i as u64,
            0,
            LocateIn { fingerprint: *fp }.as_bytes(),
        );
        udp.send(&msg).expect("send");
        let mut buf = [0u8; 2048];
        let n = udp.recv(&mut buf).expect("an answer");
        let (h, body) = Header::read_from_prefix(&buf[..n]).expect("a header");
        assert_eq!(h.request_id.get(), 900 + i as u64);
        let out = LocateOut::read_from_prefix(body).expect("a LocateOut").0;
        assert_eq!(out.head.status.get(), Status::Success as u16);
        assert_eq!(out.object_len.get(), data.len() as u64);
    }
    // The index walk crosses both shards, in fingerprint order, each object once.
    let mut listed = Vec::new();
    node.client()
        .contents(&mut |fp, _| listed.push(fp))
        .expect("contents");
    let mut want: Vec<Fingerprint> = objs.iter().map(|(fp, _)| *fp).collect();
    want.sort();
    assert_eq!(listed, want);
    // Deletes from fresh connections find every object wherever it is held.
    for (fp, _) in &objs {
        assert_eq!(node.client().delete(fp).expect("delete"), 0);
        match node.client().retrieve(fp, &mut Vec::new(), &mut |_, _| {}) {
            Err(ClientError::NotFound { .. }) => {}
            other => panic!("deleted object still served: {other:?}"),
        }
    }
    let mut n = 0;
    node.client()
        .contents(&mut |_, _| n += 1)
        .expect("contents");
    assert_eq!(n, 0);
    let shards = node.stop_all();
    assert!(shards.iter().all(|s| s.directory_len() == 0));
    assert!(shards.iter().map(|s| s.counters().remote_ops).sum::<u64>() > 0);
}

#[test]
fn the_same_bytes_stored_through_several_loops_at_once_are_one_object() {
    let node = TestNode::start_loops(2);
    for (round, (fp, data)) in distinct(6, 9).into_iter().enumerate() {
        let writers: Vec<_> = (0..8)
            .map(|_| {
                let mut c = node.client();
                let data = data.clone();
                std::thread::spawn(move || c.store_bytes(&data).expect("store"))
            })
            .collect();
        let mut refs: Vec<u32> = writers
            .into_iter()
            .map(|w| w.join().expect("writer"))
            .map(|s| {
                assert_eq!(s.fingerprint, fp);
                s.refcount
            })
            .collect();
        refs.sort();
        assert_eq!(
            refs,
            (1..=8).collect::<Vec<_>>(),
            "round {round}: each STORE one reference"
        );
        let mut listed = 0;
        node.client()
            .contents(&mut |got, _| listed += u32::from(got == fp))
            .expect("contents");
        assert_eq!(listed, 1, "one object");
        for left in (0..8).rev() {
            assert_eq!(node.client().delete(&fp).expect("delete"), left);
        }
    }
}

#[test]
fn a_restarted_multi_loop_node_finds_every_object_wherever_it_landed() {
    let disk = MemDisk::new(64 * MIB * 2 + MIB, 1);
    let objs = distinct(30, 4);
    let node = TestNode::start_on(&disk, 2);
    for (_, data) in &objs {
        node.client().store_bytes(data).expect("store");
    }
    // Twice more for one of them: a refcount that lives in some loop's log.
    node.client().store_bytes(&objs[0].1).expect("store");
    node.stop_all();
    let node = TestNode::start_on(&disk, 2);
    for (fp, data) in &objs {
        let mut got = Vec::new();
        node.client()
            .retrieve(fp, &mut got, &mut |_, _| {})
            .expect("retrieve after restart");
        assert_eq!(&got, data);
    }
    assert_eq!(node.client().delete(&objs[0].0).expect("delete"), 1);
    let mut n = 0;
    node.client()
        .contents(&mut |_, _| n += 1)
        .expect("contents");
    assert_eq!(n, objs.len());
}

#[test]
fn heartbeat_answers_follow_the_published_health_verdict() {
    use crate::node::{NodeHealth, Verdict};
    let node = TestNode::start();
    let mut c = node.client();
    let hb = c.heartbeat().expect("heartbeat");
    assert_eq!(
        (hb.health, hb.role),
        (0, 0),
        "not assessed, every disk online"
    );
    assert_eq!(hb.epoch, 1);
    node.board.update(|s| {
        s.health = Some(NodeHealth {
            verdict: Verdict::Failing,
            reasons: vec!["dataplane-0 has not turned".into()],
        })
    });
    // The loop re-reads the board at the top of its next turn, which the next request
    // nearly always starts (it may be read in the turn that answered the last one).
    let mut health_becomes = |want: u8| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = c.heartbeat().expect("heartbeat").health;
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "health {got}, want {want}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    health_becomes(2);
    node.board.update(|s| {
        s.health = Some(NodeHealth {
            verdict: Verdict::Ok,
            reasons: Vec::new(),
        })
    });
    health_becomes(0);
    drop(c);
    node.stop();
}

/// Stores `data` over a raw connection in chunks of the node's maximum (the client
/// sends bigger ones); returns its fingerprint.
fn store_chunked(node: &TestNode, data: &[u8]) -> Fingerprint {
    let mut s = node.tcp();
    let chunks: Vec<&[u8]> = data.chunks(CHUNK_MAX as usize).collect();
    let store_in = StoreIn::new(0, Some(data.len() as u64), None);
    s.write_all(&store_message(1, &store_in, &chunks))
        .expect("send");
    assert_eq!(next_status(&mut s), (1, Status::Success, 0));
    Fingerprint::of(data)
}

fn only(site: Site, n: u64) -> [u64; SITES] {
    let mut v = [0; SITES];
    v[site as usize] = n;
    v
}

/// Over the wire: a STORE of N bytes copies exactly N (into the staging buffer), and
/// RETRIEVE and RANGE of an object not in the cache copy none, in the store or the
/// session: the device writes the bytes, the socket reads them from the same buffer.
/// A small object is copied once more, into the cache, and its hits not at all.
#[test]
fn a_store_copies_each_byte_once_and_a_retrieve_none() {
    let node = TestNode::start();
    let big: Vec<u8> = (0..3 * MIB as usize + 77)
        .map(|i| (i * 31 + i / 7) as u8)
        .collect();
    let n = big.len() as u64;
    let fp = store_chunked(&node, &big);
    let mut c = node.client();
    assert_eq!(
        node.copies.all(),
        only(Site::Append, n),
        "STORE copies once"
    );
    for _ in 0..2 {
        let mut got = Vec::new();
        c.retrieve(&fp, &mut got, &mut |_, _| {}).expect("retrieve");
        assert!(got == big, "retrieved bytes differ");
        let mut part = Vec::new();
        c.retrieve_range(&fp, 300_001, 700_000, &mut part)
            .expect("range");
        assert!(part == big[300_001..1_000_001], "range bytes differ");
    }
    assert_eq!(
        node.copies.all(),
        only(Site::Append, n),
        "RETRIEVE copies nothing"
    );

    // Small enough for the cache: filled once (n bytes), then served from it.
    let small: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let sfp = c.store_bytes(&small).expect("store").fingerprint;
    let stored = node.copies.at(Site::Append);
    assert_eq!(stored, n + small.len() as u64);
    for _ in 0..3 {
        let mut got = Vec::new();
        c.retrieve(&sfp, &mut got, &mut |_, _| {})
            .expect("retrieve");
        assert_eq!(got, small);
    }
    let mut want = only(Site::Append, stored);
    want[Site::CacheFill as usize] = small.len() as u64;
    // A small object is packed: copied once more, into its disk's tail block image.
    want[Site::Pack as usize] = small.len() as u64;
    assert_eq!(node.copies.all(), want, "one cache fill, hits copy nothing");
}

/// With two loops, objects are read from whichever loop holds them: the holder lends
/// its own device buffers to the loop that serves the connection, which sends from
/// them and hands them back. Still no copy.
#[test]
fn a_retrieve_from_another_loop_copies_nothing() {
    let node = TestNode::start_loops(2);
    let objs: Vec<Vec<u8>> = (0..4u8)
        .map(|k| {
            (0..300_000 + usize::from(k) * 4099)
                .map(|i| (i as u8) ^ k.wrapping_mul(37))
                .collect()
        })
        .collect();
    let mut stored = 0;
    let mut fps = Vec::new();
    for data in &objs {
        fps.push(store_chunked(&node, data));
        stored += data.len() as u64;
    }
    assert_eq!(node.copies.all(), only(Site::Append, stored));
    // Fresh connections land on either loop: some reads are served across loops.
    for _ in 0..6 {
        for (fp, data) in fps.iter().zip(&objs) {
            let mut c = node.client();
            let mut got = Vec::new();
            c.retrieve(fp, &mut got, &mut |_, _| {}).expect("retrieve");
            assert!(&got == data, "retrieved bytes differ");
            let mut part = Vec::new();
            c.retrieve_range(fp, 4095, 270_000, &mut part)
                .expect("range");
            assert!(part == data[4095..274_095], "range bytes differ");
        }
    }
    assert_eq!(
        node.copies.all(),
        only(Site::Append, stored),
        "no copy across loops"
    );
    // A small object is cached by its holder once; its hits, from either loop,
    // lend the cache entry.
    let small: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
    let sfp = store_chunked(&node, &small);
    stored += small.len() as u64;
    for _ in 0..8 {
        let mut got = Vec::new();
        node.client()
            .retrieve(&sfp, &mut got, &mut |_, _| {})
            .expect("retrieve");
        assert_eq!(got, small);
    }
    let mut want = only(Site::Append, stored);
    want[Site::CacheFill as usize] = small.len() as u64;
    want[Site::Pack as usize] = small.len() as u64;
    assert_eq!(node.copies.all(), want, "one cache fill, at the holder");
    let shards = node.stop_all();
    assert!(
        shards
            .iter()
            .map(|s| s.counters().remote_reads)
            .sum::<u64>()
            > 0,
        "some reads crossed loops"
    );
}

/// Where on `disk` the 4 KiB block holding `block` sits (a payload block is aligned).
fn find_block(disk: &MemDisk, block: &[u8]) -> u64 {
    let mut dev = disk.device();
    let mut buf = nvme::AlignedBuf::new(MIB as usize);
    for at in (0..disk.size_bytes()).step_by(MIB as usize) {
        nvme::BlockDevice::read_at(&mut dev, at, &mut buf).expect("read");
        if let Some(i) = buf.chunks(4096).position(|b| b == block) {
            return at + i as u64 * 4096;
        }
    }
    panic!("block not on the disk");
}

/// Lent buffers keep the old promise: bytes that fail their CRC are never sent. A
/// first piece that fails gets a plain error; a later one is sent as zeros (the
/// stream's length is promised), and so is the rest, and the final status says why.
#[test]
fn bytes_that_fail_their_checksum_are_never_sent() {
    let disk = MemDisk::new(64 * MIB + MIB, 1);
    let node = TestNode::start_on(&disk, 1);
    let obj = |seed: u64, len: usize| -> Vec<u8> {
        (0..len as u64)
            .map(|i| ((i ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 29) as u8)
            .collect()
    };
    let len = 1_000_000;
    let (a, b) = (obj(1, len), obj(2, len));
    let (fa, fb) = (store_chunked(&node, &a), store_chunked(&node, &b));
    // a: a block of its second 256 KiB piece; b: a block of its first.
    let piece = 256 * 1024;
    disk.corrupt(find_block(&disk, &a[70 * 4096..71 * 4096]) + 10, 1);
    disk.corrupt(find_block(&disk, &b[3 * 4096..4 * 4096]) + 10, 1);
    let mut c = node.client();
    let mut got = Vec::new();
    match c.retrieve_range(&fa, 0, len as u64, &mut got) {
        Err(ClientError::Status {
            status: Status::ChecksumMismatch,
            ..
        }) => {}
        other => panic!("a stream with a bad block must end in CHECKSUM_MISMATCH: {other:?}"),
    }
    assert_eq!(got.len(), len, "the promised length");
    assert!(got[..piece] == a[..piece], "the good first piece");
    assert!(
        got[piece..].iter().all(|&x| x == 0),
        "zeros from the bad piece on"
    );
    let mut c = node.client();
    let mut got = Vec::new();
    match c.retrieve(&fb, &mut got, &mut |_, _| {}) {
        Err(ClientError::Status {
            status: Status::ChecksumMismatch,
            ..
        }) => {}
        other => panic!("a bad first piece is a plain error: {other:?}"),
    }
    assert!(got.is_empty(), "no byte of it sent");
    assert!(node.stats.checksum_mismatches.load(Ordering::Relaxed) >= 2);
}
