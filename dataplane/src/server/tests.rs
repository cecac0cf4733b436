//! The server in-process on a memory disk, driven over real loopback sockets: what a
//! peer sees on the wire.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use dosp::client::{Client, ClientError, Expect};
use dosp::codec::{encode_chunk_header, encode_request};
use dosp::wire::*;
use dosp::Fingerprint;
use nvme::mem::MemDisk;
use zerocopy::{FromBytes, IntoBytes};

use super::{Server, ServerConfig};
use crate::store::{Store, StoreConfig};

const MIB: u64 = 1 << 20;
/// A small chunk maximum, so that an oversized chunk is cheap to send.
const CHUNK_MAX: u32 = 64 * 1024;
const OBJECT_MAX: u64 = 8 * MIB;

/// A running node on one 64 MiB memory disk.
struct TestNode {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<Store>>>,
}

impl TestNode {
    fn start() -> TestNode {
        let disk = MemDisk::new(64 * MIB, 1);
        let store_cfg = StoreConfig {
            max_object_bytes: OBJECT_MAX,
            ..StoreConfig::default()
        };
        let store = Store::open(vec![Box::new(disk.device())], store_cfg, 7).expect("store");
        let (_handle, end) = crate::handle::handle_pair();
        let cfg = ServerConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            // Port 0: a group port of this test's own, so no other node is heard.
            multicast_group: SocketAddrV4::new(Ipv4Addr::new(239, 255, 73, 251), 0),
            multicast_if: Ipv4Addr::LOCALHOST,
            node_id: 0x0123_4567_89ab_cdef,
            epoch: 1,
            chunk_max: CHUNK_MAX,
            connections_max: 16,
            idle_sleep: Duration::from_millis(10),
            checkpoint_interval: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            test_stall: None,
        };
        let server = Server::bind(cfg, store, end).expect("bind");
        let addr = server.local_addr().expect("local address");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || server.run(&stop)
        });
        TestNode {
            addr,
            stop,
            thread: Some(thread),
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

    /// Stops the node and hands back its store.
    fn stop(mut self) -> Store {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("running");
        thread.join().expect("no panic").expect("clean stop")
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
