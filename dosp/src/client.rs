//! A blocking DOSP client: one connection, one request in flight at a time.
//!
//! Used by the `dosp` CLI, the integration tests and the benchmarks. It speaks through
//! the same sans-IO codec as the node, verifies every fetched object against its
//! fingerprint, and never holds a whole object in memory (data moves through a fixed
//! buffer to the caller's `Write`).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::auth::Token;
use crate::codec::{
    encode_chunk_header, encode_request, udp_request_len_for, ResponseDecoder, ResponseEvent,
};
use crate::signed::{present_in_place, Signer};
use crate::wire::*;
use crate::Fingerprint;

/// Size of the client's receive buffer and of the chunks it sends.
const IO_BUF: usize = 1 << 20;

/// Everything that can go wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {node}: {source}")]
    Connect { node: String, source: io::Error },
    #[error("I/O error talking to {node}: {source}")]
    Io { node: String, source: io::Error },
    #[error("{node} closed the connection")]
    Closed { node: String },
    #[error("protocol error from {node}: {source}")]
    Wire { node: String, source: WireError },
    #[error("object {fp} not found on {node}")]
    NotFound { fp: Fingerprint, node: String },
    #[error("{op} failed on {node}: {status}{}", detail_text(*.detail))]
    Status {
        op: &'static str,
        node: String,
        status: Status,
        detail: u32,
    },
    #[error("object {fp} from {node} does not match its fingerprint (got {got}); data discarded")]
    Mismatch {
        fp: Fingerprint,
        got: Fingerprint,
        node: String,
    },
    #[error("range {offset}+{len} is past the end of object {fp} ({object_len} bytes) on {node}")]
    OutOfRange {
        fp: Fingerprint,
        offset: u64,
        len: u64,
        object_len: u64,
        node: String,
    },
    #[error("{node} stored nothing: the {sent} bytes sent do not match the announced {what}")]
    NotAsAnnounced {
        node: String,
        /// `length` or `MD5`.
        what: &'static str,
        sent: u64,
    },
    #[error("cannot read input: {0}")]
    Input(io::Error),
    #[error("cannot write output: {0}")]
    Output(io::Error),
}

fn detail_text(detail: u32) -> String {
    if detail == 0 {
        String::new()
    } else {
        format!(" (detail {detail})")
    }
}

/// What a node said about a stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub fingerprint: Fingerprint,
    pub len: u64,
    pub disk: u16,
    pub deduplicated: bool,
    pub refcount: u32,
}

/// What a STORE promises the node about the object it sends (dosp/PROTOCOL.md, STORE).
/// The node refuses an object that breaks a promise and stores nothing of it
/// ([`ClientError::NotAsAnnounced`]), like S3 with Content-Length and Content-MD5.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expect {
    /// The object's exact length. Without it, an object that fits in the first chunk
    /// is still sent with its length: by then the client knows it.
    pub len: Option<u64>,
    /// The object's MD5, its fingerprint.
    pub md5: Option<Fingerprint>,
}

/// A node's answer to NULL: how quickly it came, and the limits the node has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pong {
    pub rtt: Duration,
    /// Largest In/Out body it accepts.
    pub body_max: u32,
    /// Largest STORE chunk it accepts.
    pub chunk_max: u32,
    /// Largest object it stores.
    pub object_max: u64,
}

/// One holder's answer to LOCATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub node_id: u64,
    /// The holder's name, if it has one.
    pub name: Option<NodeName>,
    pub addr: SocketAddrV4,
    pub disk: u16,
    pub object_len: u64,
}

impl Located {
    fn from_out(out: &LocateOut) -> Located {
        Located {
            node_id: out.node_id.get(),
            name: NodeName::from_field(&out.name),
            addr: SocketAddrV4::new(Ipv4Addr::from(out.addr), out.port.get()),
            disk: out.disk.get(),
            object_len: out.object_len.get(),
        }
    }
}

/// One disk's state and statistics, merged from GET_DISK_STATE and GET_DISK_STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    pub disk: u16,
    pub state: Option<WireDiskState>,
    pub identity: [u8; 16],
    pub bytes_total: u64,
    pub bytes_free: u64,
    pub bytes_available: u64,
    pub objects_used: u64,
    pub objects_available: u64,
    pub outstanding_ops: u32,
}

/// A connection to one node.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    node: String,
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    wbuf: Vec<u8>,
    /// STORE chunk buffer, allocated once per connection.
    chunk: Vec<u8>,
    next_id: u64,
    decoder: ResponseDecoder,
    /// Signs every request when set (dosp/PROTOCOL.md §7).
    signer: Option<Signer>,
    /// Presented with every request when set, instead of signing (§7, mode 3).
    token: Option<Token>,
}

/// Events the client consumes while waiting for a response.
enum Step {
    Response(Header, Vec<u8>),
    StreamStart(u64),
    Data(usize, usize),
}

impl Client {
    /// Connects to `node` (HOST:PORT), with `timeout` for connecting and for every read.
    pub fn connect(node: &str, timeout: Duration) -> Result<Client, ClientError> {
        let connect_err = |source| ClientError::Connect {
            node: node.to_string(),
            source,
        };
        let addrs: Vec<SocketAddr> = node.to_socket_addrs().map_err(connect_err)?.collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(stream) => {
                    stream.set_nodelay(true).map_err(connect_err)?;
                    stream
                        .set_read_timeout(Some(timeout))
                        .map_err(connect_err)?;
                    return Ok(Client {
                        stream,
                        node: node.to_string(),
                        rbuf: vec![0; IO_BUF],
                        start: 0,
                        end: 0,
                        wbuf: Vec::with_capacity(IO_BUF + 64),
                        chunk: vec![0u8; IO_BUF],
                        next_id: 1,
                        decoder: ResponseDecoder::new(u64::MAX),
                        signer: None,
                        token: None,
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(connect_err(last))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Signs every request from now on with `signer` (the first key of its ring, now,
    /// a fresh nonce), or stops signing with `None`.
    pub fn set_signer(&mut self, signer: Option<Signer>) {
        self.signer = signer;
    }

    /// Presents `token` with every request from now on (a mode-3 trailer,
    /// dosp/PROTOCOL.md §7) instead of signing, or stops with `None`. A token needs no
    /// key: a node with the key checks it. Requests it does not cover are refused by
    /// the node with AUTH_FAILED.
    pub fn set_token(&mut self, token: Option<Token>) {
        self.token = token;
    }

    /// Signs the request at `wbuf[at..]`, or presents the token: whichever is set, the
    /// token first.
    fn authenticate(&mut self, at: usize) {
        if let Some(token) = &self.token {
            present_in_place(&mut self.wbuf, at, token);
        } else if let Some(signer) = &self.signer {
            signer.sign(&mut self.wbuf, at);
        }
    }

    fn io_err(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            node: self.node.clone(),
            source,
        }
    }

    fn send_request(&mut self, op: Opcode, body: &[u8]) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.wbuf.clear();
        encode_request(&mut self.wbuf, op, id, 0, body);
        self.authenticate(0);
        self.stream
            .write_all(&self.wbuf)
            .map_err(|e| self.io_err(e))?;
        Ok(id)
    }

    /// Reads until the decoder yields an event; data events are left in `rbuf`.
    fn next_step(&mut self) -> Result<Step, ClientError> {
        loop {
            match self.decoder.decode(&self.rbuf[self.start..self.end]) {
                Err(source) => {
                    return Err(ClientError::Wire {
                        node: self.node.clone(),
                        source,
                    })
                }
                Ok(Some((ev, n))) => {
                    let at = self.start;
                    self.start += n;
                    return Ok(match ev {
                        ResponseEvent::Response { header, body } => {
                            Step::Response(header, body.to_vec())
                        }
                        ResponseEvent::StreamStart { len, .. } => Step::StreamStart(len),
                        ResponseEvent::StreamData(d) => Step::Data(at, d.len()),
                    });
                }
                Ok(None) => {
                    if self.start == self.end {
                        self.start = 0;
                        self.end = 0;
                    } else if self.end == self.rbuf.len() {
                        self.rbuf.copy_within(self.start..self.end, 0);
                        self.end -= self.start;
                        self.start = 0;
                    }
                    // A signal (DPDK's net_tap raises SIGIO) interrupts the read: read
                    // again.
                    let n = loop {
                        match self.stream.read(&mut self.rbuf[self.end..]) {
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            r => break r.map_err(|e| self.io_err(e))?,
                        }
                    };
                    if n == 0 {
                        return Err(ClientError::Closed {
                            node: self.node.clone(),
                        });
                    }
                    self.end += n;
                }
            }
        }
    }

    /// Waits for the response to `id`, with no stream expected.
    fn response(&mut self, op: Opcode, id: u64) -> Result<Vec<u8>, ClientError> {
        match self.next_step()? {
            Step::Response(header, body) => self.check_response(op, id, &header, body),
            _ => Err(ClientError::Wire {
                node: self.node.clone(),
                source: WireError::OpcodeMismatch {
                    got: u16::MAX,
                    want: op.name(),
                },
            }),
        }
    }

    fn check_response(
        &self,
        op: Opcode,
        id: u64,
        header: &Header,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, ClientError> {
        let wire = |source| ClientError::Wire {
            node: self.node.clone(),
            source,
        };
        // A node that refuses the connection answers whatever came first with one BUSY
        // under opcode NULL and request id 0 (PROTOCOL.md §6); our ids start at 1.
        if header.request_id.get() == 0 && header.opcode.get() == Opcode::Null as u16 {
            if let Ok((Status::Busy, detail)) = out_status(&body) {
                return Err(ClientError::Status {
                    op: op.name(),
                    node: self.node.clone(),
                    status: Status::Busy,
                    detail,
                });
            }
        }
        if header.request_id.get() != id {
            return Err(wire(WireError::RequestIdMismatch {
                got: header.request_id.get(),
                want: id,
            }));
        }
        if header.opcode.get() != op as u16 {
            return Err(wire(WireError::OpcodeMismatch {
                got: header.opcode.get(),
                want: op.name(),
            }));
        }
        let (status, detail) = out_status(&body).map_err(wire)?;
        if status != Status::Success {
            return Err(ClientError::Status {
                op: op.name(),
                node: self.node.clone(),
                status,
                detail,
            });
        }
        Ok(body)
    }

    fn parse<T: FromBytes + zerocopy::KnownLayout + zerocopy::Immutable + Copy>(
        &self,
        op: Opcode,
        body: &[u8],
    ) -> Result<T, ClientError> {
        parse_prefix::<T>(op, body)
            .map(|(t, _)| *t)
            .map_err(|source| ClientError::Wire {
                node: self.node.clone(),
                source,
            })
    }

    /// NULL: checks the node is alive and speaks our version, and learns its limits.
    pub fn ping(&mut self) -> Result<Pong, ClientError> {
        let t = Instant::now();
        let id = self.send_request(Opcode::Null, &[])?;
        let body = self.response(Opcode::Null, id)?;
        let rtt = t.elapsed();
        let out: NullOut = self.parse(Opcode::Null, &body)?;
        Ok(Pong {
            rtt,
            body_max: out.body_max.get(),
            chunk_max: out.chunk_max.get(),
            object_max: out.object_max.get(),
        })
    }

    /// STOREs everything `input` yields, in chunks of up to 1 MiB, promising the node
    /// what `expect` says (and the length of an object that fits in one chunk).
    /// `progress` is told the bytes sent so far.
    pub fn store(
        &mut self,
        input: &mut dyn Read,
        expect: Expect,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Stored, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut chunk = std::mem::take(&mut self.chunk);
        let sent = self.send_store(id, input, expect, &mut chunk, progress);
        self.chunk = chunk;
        let sent = sent?;
        let body = self.response(Opcode::Store, id).map_err(|e| match e {
            ClientError::Status {
                status: Status::ChecksumMismatch,
                detail: detail @ (MISMATCH_LEN | MISMATCH_MD5),
                node,
                ..
            } => ClientError::NotAsAnnounced {
                node,
                what: if detail == MISMATCH_LEN {
                    "length"
                } else {
                    "MD5"
                },
                sent,
            },
            e => e,
        })?;
        let out: StoreOut = self.parse(Opcode::Store, &body)?;
        Ok(Stored {
            fingerprint: out.fingerprint,
            len: out.len.get(),
            disk: out.disk.get(),
            deduplicated: out.deduplicated != 0,
            refcount: out.refcount.get(),
        })
    }

    /// Sends the STORE request and `input` as its chunks; returns the bytes sent.
    fn send_store(
        &mut self,
        id: u64,
        input: &mut dyn Read,
        expect: Expect,
        chunk: &mut [u8],
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, ClientError> {
        let mut sent = 0u64;
        self.wbuf.clear();
        let mut first = true;
        loop {
            // A full chunk (or the rest, to EOF), so the last-chunk flag is known when
            // the header is sent.
            let (filled, eof) = fill(input, chunk)?;
            if std::mem::take(&mut first) {
                // The request goes out with the first chunk, and each chunk header
                // with its data, in one vectored write: a small object is one segment
                // on the wire. By now the length of a small object is known too.
                let len = expect.len.or(eof.then_some(filled as u64));
                let body = StoreIn::new(0, len, expect.md5);
                let at = self.wbuf.len();
                encode_request(&mut self.wbuf, Opcode::Store, id, 0, body.as_bytes());
                self.authenticate(at);
            }
            encode_chunk_header(&mut self.wbuf, filled as u32, eof);
            write_both(&mut self.stream, &self.wbuf, &chunk[..filled])
                .map_err(|e| self.io_err(e))?;
            self.wbuf.clear();
            sent += filled as u64;
            progress(sent);
            if eof {
                return Ok(sent);
            }
        }
    }

    /// STOREs a byte slice, promising its length.
    pub fn store_bytes(&mut self, data: &[u8]) -> Result<Stored, ClientError> {
        let mut input = data;
        let expect = Expect {
            len: Some(data.len() as u64),
            md5: None,
        };
        self.store(&mut input, expect, &mut |_| {})
    }

    /// RETRIEVEs a whole object into `output`, verifying it against its fingerprint.
    /// `progress` gets (received, total). Returns the object length.
    pub fn retrieve(
        &mut self,
        fp: &Fingerprint,
        output: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, ClientError> {
        let id = self.send_request(Opcode::Retrieve, RetrieveIn { fingerprint: *fp }.as_bytes())?;
        let mut md5 = Md5::new();
        let (len, out) = self.receive_stream(
            Opcode::Retrieve,
            id,
            fp,
            0,
            0,
            output,
            Some(&mut md5),
            progress,
        )?;
        let got = Fingerprint(md5.finalize().into());
        if got != *fp || out.fingerprint != *fp {
            return Err(ClientError::Mismatch {
                fp: *fp,
                got,
                node: self.node.clone(),
            });
        }
        Ok(len)
    }

    /// RETRIEVE_RANGE: `len` bytes at `offset` into `output`.
    pub fn retrieve_range(
        &mut self,
        fp: &Fingerprint,
        offset: u64,
        len: u64,
        output: &mut dyn Write,
    ) -> Result<u64, ClientError> {
        let body = RangeIn {
            fingerprint: *fp,
            offset: offset.into(),
            len: len.into(),
        };
        let id = self.send_request(Opcode::RetrieveRange, body.as_bytes())?;
        let (got, _) = self.receive_stream(
            Opcode::RetrieveRange,
            id,
            fp,
            offset,
            len,
            output,
            None,
            &mut |_, _| {},
        )?;
        Ok(got)
    }

    #[allow(clippy::too_many_arguments)]
    fn receive_stream(
        &mut self,
        op: Opcode,
        id: u64,
        fp: &Fingerprint,
        offset: u64,
        want: u64,
        output: &mut dyn Write,
        mut md5: Option<&mut Md5>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(u64, RetrieveOut), ClientError> {
        let mut total = None;
        let mut received = 0u64;
        loop {
            match self.next_step()? {
                Step::StreamStart(len) => total = Some(len),
                Step::Data(at, n) => {
                    let data = &self.rbuf[at..at + n];
                    if let Some(m) = md5.as_deref_mut() {
                        m.update(data);
                    }
                    output.write_all(data).map_err(ClientError::Output)?;
                    received += n as u64;
                    progress(received, total.unwrap_or(0));
                }
                Step::Response(header, body) => {
                    // Out comes last; map the statuses a caller wants to tell apart.
                    let wire = |source| ClientError::Wire {
                        node: self.node.clone(),
                        source,
                    };
                    let (status, _) = out_status(&body).map_err(wire)?;
                    let out: Option<RetrieveOut> =
                        RetrieveOut::read_from_prefix(&body).ok().map(|(o, _)| o);
                    match status {
                        Status::NotFound => {
                            return Err(ClientError::NotFound {
                                fp: *fp,
                                node: self.node.clone(),
                            })
                        }
                        Status::OutOfRange => {
                            return Err(ClientError::OutOfRange {
                                fp: *fp,
                                offset,
                                len: want,
                                object_len: out.map(|o| o.object_len.get()).unwrap_or(0),
                                node: self.node.clone(),
                            })
                        }
                        _ => {}
                    }
                    let body = self.check_response(op, id, &header, body)?;
                    let out: RetrieveOut = self.parse(op, &body)?;
                    if Some(received) != total {
                        return Err(wire(WireError::Truncated));
                    }
                    output.flush().map_err(ClientError::Output)?;
                    return Ok((received, out));
                }
            }
        }
    }

    /// Sends a request about object `fp` and waits for its Out body; NOT_FOUND
    /// becomes `ClientError::NotFound` naming the object.
    fn object_request(
        &mut self,
        op: Opcode,
        fp: &Fingerprint,
        body: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let id = self.send_request(op, body)?;
        self.response(op, id).map_err(|e| match e {
            ClientError::Status {
                status: Status::NotFound,
                ..
            } => ClientError::NotFound {
                fp: *fp,
                node: self.node.clone(),
            },
            e => e,
        })
    }

    /// DELETE: returns the references left (0 = gone).
    pub fn delete(&mut self, fp: &Fingerprint) -> Result<u32, ClientError> {
        let body =
            self.object_request(Opcode::Delete, fp, DeleteIn { fingerprint: *fp }.as_bytes())?;
        Ok(self
            .parse::<DeleteOut>(Opcode::Delete, &body)?
            .refcount
            .get())
    }

    /// GET_CONTENTS: calls `each` for every (fingerprint, disk) the node holds, as they
    /// stream in (padding entries skipped). Returns how many it was called for.
    pub fn contents(&mut self, each: &mut dyn FnMut(Fingerprint, u16)) -> Result<u64, ClientError> {
        let id = self.send_request(Opcode::GetContents, ContentsIn::new_zeroed().as_bytes())?;
        let mut pending: Vec<u8> = Vec::with_capacity(size_of::<ContentsEntry>());
        let mut seen = 0u64;
        let mut padded = 0u64;
        loop {
            match self.next_step()? {
                Step::StreamStart(len) => {
                    if len % size_of::<ContentsEntry>() as u64 != 0 {
                        return Err(ClientError::Wire {
                            node: self.node.clone(),
                            source: WireError::BodySize {
                                op: "GET_CONTENTS",
                                got: len as usize,
                                want: 20,
                            },
                        });
                    }
                }
                Step::Data(at, n) => {
                    // Entries may straddle reads; reassemble them through `pending`.
                    let mut data = &self.rbuf[at..at + n];
                    while !data.is_empty() {
                        let need = size_of::<ContentsEntry>() - pending.len();
                        let take = need.min(data.len());
                        pending.extend_from_slice(&data[..take]);
                        data = &data[take..];
                        if pending.len() == size_of::<ContentsEntry>() {
                            if let Ok(e) = ContentsEntry::read_from_bytes(&pending) {
                                // Padding (objects deleted while the node walked its
                                // index) counts in the total but names nothing.
                                let padding = e.fingerprint == Fingerprint::ZERO
                                    && e.disk.get() == CONTENTS_PADDING_DISK;
                                if padding {
                                    padded += 1;
                                } else {
                                    each(e.fingerprint, e.disk.get());
                                }
                                seen += 1;
                            }
                            pending.clear();
                        }
                    }
                }
                Step::Response(header, body) => {
                    let body = self.check_response(Opcode::GetContents, id, &header, body)?;
                    let out: ContentsOut = self.parse(Opcode::GetContents, &body)?;
                    if out.count.get() != seen {
                        return Err(ClientError::Wire {
                            node: self.node.clone(),
                            source: WireError::Truncated,
                        });
                    }
                    return Ok(seen - padded);
                }
            }
        }
    }

    /// LOCATE asked of this node alone (over its TCP connection).
    pub fn locate(&mut self, fp: &Fingerprint) -> Result<Located, ClientError> {
        let body =
            self.object_request(Opcode::Locate, fp, LocateIn { fingerprint: *fp }.as_bytes())?;
        Ok(Located::from_out(
            &self.parse::<LocateOut>(Opcode::Locate, &body)?,
        ))
    }

    pub fn heartbeat(&mut self) -> Result<HeartbeatOut, ClientError> {
        let id = self.send_request(Opcode::Heartbeat, &[])?;
        let body = self.response(Opcode::Heartbeat, id)?;
        self.parse(Opcode::Heartbeat, &body)
    }

    pub fn load(&mut self) -> Result<LoadOut, ClientError> {
        let id = self.send_request(Opcode::GetLoad, &[])?;
        let body = self.response(Opcode::GetLoad, id)?;
        self.parse(Opcode::GetLoad, &body)
    }

    /// GET_DISK_STATE then GET_DISK_STATUS for `disk` (or ALL_DISKS), merged per disk.
    pub fn disks(&mut self, disk: u16) -> Result<Vec<DiskInfo>, ClientError> {
        let q = DiskQueryIn {
            disk: disk.into(),
            reserved: 0.into(),
            reserved1: 0.into(),
        };
        let id = self.send_request(Opcode::GetDiskState, q.as_bytes())?;
        let body = self.response(Opcode::GetDiskState, id)?;
        let wire = |node: &str, source| ClientError::Wire {
            node: node.to_string(),
            source,
        };
        let (out, rest) = parse_prefix::<DiskListOut>(Opcode::GetDiskState, &body)
            .map_err(|e| wire(&self.node, e))?;
        let states =
            <[DiskStateEntry]>::ref_from_prefix_with_elems(rest, usize::from(out.count.get()))
                .map_err(|_| wire(&self.node, WireError::Truncated))?
                .0;
        let states: Vec<(u16, Option<WireDiskState>)> = states
            .iter()
            .map(|s| (s.disk.get(), WireDiskState::from_u8(s.state)))
            .collect();

        let id = self.send_request(Opcode::GetDiskStatus, q.as_bytes())?;
        let body = self.response(Opcode::GetDiskStatus, id)?;
        let (out, rest) = parse_prefix::<DiskListOut>(Opcode::GetDiskStatus, &body)
            .map_err(|e| wire(&self.node, e))?;
        let stats =
            <[DiskStatusEntry]>::ref_from_prefix_with_elems(rest, usize::from(out.count.get()))
                .map_err(|_| wire(&self.node, WireError::Truncated))?
                .0;
        Ok(stats
            .iter()
            .map(|s| DiskInfo {
                disk: s.disk.get(),
                state: states
                    .iter()
                    .find(|(d, _)| *d == s.disk.get())
                    .and_then(|(_, st)| *st)
                    .or(WireDiskState::from_u8(s.state)),
                identity: s.identity,
                bytes_total: s.bytes_total.get(),
                bytes_free: s.bytes_free.get(),
                bytes_available: s.bytes_available.get(),
                objects_used: s.objects_used.get(),
                objects_available: s.objects_available.get(),
                outstanding_ops: s.outstanding_ops.get(),
            })
            .collect())
    }
}

/// Multicast LOCATE: asks every node on `group` who holds `fp`, and collects the
/// answers (multicast by the holders to the group) until `wait` has passed.
pub fn locate_multicast(
    group: SocketAddrV4,
    iface: Ipv4Addr,
    fp: &Fingerprint,
    wait: Duration,
) -> Result<Vec<Located>, ClientError> {
    locate_multicast_signed(group, iface, fp, wait, None).map(|(found, _)| found)
}

/// [`locate_multicast`] with a key: the query is signed, and answers that are unsigned
/// or badly signed are dropped. Returns the answers and how many were dropped.
pub fn locate_multicast_signed(
    group: SocketAddrV4,
    iface: Ipv4Addr,
    fp: &Fingerprint,
    wait: Duration,
    signer: Option<&Signer>,
) -> Result<(Vec<Located>, u64), ClientError> {
    let node = group.to_string();
    let io_err = |source| ClientError::Io {
        node: node.clone(),
        source,
    };
    let sock = join_group(group, iface).map_err(io_err)?;
    let request_id: u64 = rand_id();
    let mut msg = Vec::new();
    encode_request(
        &mut msg,
        Opcode::Locate,
        request_id,
        FLAG_MULTICAST,
        LocateIn { fingerprint: *fp }.as_bytes(),
    );
    if let Some(signer) = signer {
        signer.sign(&mut msg, 0);
    }
    sock.send_to(&msg, group).map_err(io_err)?;
    let mut found: Vec<Located> = Vec::new();
    let mut dropped = 0u64;
    // The group carries heartbeats, other managers' queries and answers: keep only
    // well-formed LOCATE answers to this query.
    recv_responses(&sock, Instant::now() + wait, &mut |header, body, _| {
        if header.opcode.get() != Opcode::Locate as u16 || header.request_id.get() != request_id {
            return true;
        }
        if !signed_by(signer, header, body) {
            dropped += 1;
            return true;
        }
        let Ok((out, _)) = LocateOut::read_from_prefix(body) else {
            return true;
        };
        if out.head.status.get() == Status::Success as u16 && out.fingerprint == *fp {
            let l = Located::from_out(&out);
            if !found
                .iter()
                .any(|f| f.node_id == l.node_id && f.disk == l.disk)
            {
                found.push(l);
            }
        }
        true
    })
    .map_err(io_err)?;
    Ok((found, dropped))
}

/// Whether a datagram heard on the group passes `signer`'s check: signed by one of its
/// keys; anything goes without a signer.
fn signed_by(signer: Option<&Signer>, header: &Header, body: &[u8]) -> bool {
    signer.is_none_or(|s| s.check(header, body) == Ok(true))
}

/// The reply a UDP request is padded for at first: the header and the opcode's whole
/// Out structure, with one entry for the disk lists (a node with more disks answers
/// TOO_LARGE with the size it needs, and the request is sent again padded for that).
fn udp_reply_len_expected(op: Opcode) -> usize {
    Header::SIZE
        + match op {
            Opcode::Null => size_of::<NullOut>(),
            Opcode::Locate => size_of::<LocateOut>(),
            Opcode::Heartbeat => size_of::<HeartbeatOut>(),
            Opcode::GetLoad => size_of::<LoadOut>(),
            Opcode::GetDiskState => size_of::<DiskListOut>() + size_of::<DiskStateEntry>(),
            Opcode::GetDiskStatus => size_of::<DiskListOut>() + size_of::<DiskStatusEntry>(),
            // Not carried over UDP: the node says BAD_REQUEST, which fits anything.
            _ => size_of::<OutHead>(),
        }
}

/// One request to `node` over UDP unicast and its reply's Out body, waiting at most
/// `wait` for it. The datagram is padded so the node may answer it (a reply is at most
/// three times its request, dosp/PROTOCOL.md "UDP replies"); if the node answers
/// TOO_LARGE with a size the padding did not cover (a disk list longer than one), the
/// request is sent once more, padded for that size. A reply that does not come is
/// `Io` with `TimedOut`: UDP may lose either datagram, and the caller may try again.
pub fn udp_request(
    node: SocketAddr,
    op: Opcode,
    body: &[u8],
    wait: Duration,
) -> Result<Vec<u8>, ClientError> {
    udp_request_signed(node, op, body, wait, None)
}

/// [`udp_request`], signed with `signer` when given.
pub fn udp_request_signed(
    node: SocketAddr,
    op: Opcode,
    body: &[u8],
    wait: Duration,
    signer: Option<&Signer>,
) -> Result<Vec<u8>, ClientError> {
    let name = node.to_string();
    let io_err = |source| ClientError::Io {
        node: name.clone(),
        source,
    };
    let local: SocketAddr = if node.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).map_err(io_err)?;
    let deadline = Instant::now() + wait;
    let mut pad = udp_request_len_for(udp_reply_len_expected(op));
    let mut retried = false;
    loop {
        let request_id = rand_id();
        let mut msg = Vec::with_capacity(pad.max(Header::SIZE + body.len()));
        encode_request(&mut msg, op, request_id, 0, body);
        if let Some(signer) = signer {
            signer.sign(&mut msg, 0);
        }
        if msg.len() < pad {
            msg.resize(pad, 0);
        }
        sock.send_to(&msg, node).map_err(io_err)?;
        let mut reply = None;
        recv_responses(&sock, deadline, &mut |header, out, from| {
            if from != node || header.request_id.get() != request_id {
                return true;
            }
            reply = Some((*header, out.to_vec()));
            false
        })
        .map_err(io_err)?;
        let Some((header, out)) = reply else {
            return Err(io_err(io::ErrorKind::TimedOut.into()));
        };
        let wire = |source| ClientError::Wire {
            node: name.clone(),
            source,
        };
        if header.opcode.get() != op as u16 {
            return Err(wire(WireError::OpcodeMismatch {
                got: header.opcode.get(),
                want: op.name(),
            }));
        }
        let (status, detail) = out_status(&out).map_err(wire)?;
        let needed = udp_request_len_for(detail as usize);
        match status {
            Status::Success => return Ok(out),
            Status::TooLarge if !retried && needed > msg.len() => {
                pad = needed;
                retried = true;
            }
            status => {
                return Err(ClientError::Status {
                    op: op.name(),
                    node: name,
                    status,
                    detail,
                })
            }
        }
    }
}

/// Receives datagrams on `sock` until `deadline` or until `each` returns false, passing
/// on every well-formed response (header checked, body bounded by its length) with its
/// sender. Anything else on the group is skipped: nothing there is trusted.
fn recv_responses(
    sock: &UdpSocket,
    deadline: Instant,
    each: &mut dyn FnMut(&Header, &[u8], SocketAddr) -> bool,
) -> io::Result<()> {
    // Room for the largest datagram a node sends (a disk list of DISKS_MAX disks).
    let mut buf = vec![0u8; 1 << 16];
    while let Some(left) = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
    {
        sock.set_read_timeout(Some(left))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => return Err(e),
        };
        let Ok((header, body)) = Header::read_from_prefix(&buf[..n]) else {
            continue;
        };
        if header.check(Kind::Response).is_err() {
            continue;
        }
        let Some(body) = body.get(..header.body_len.get() as usize) else {
            continue;
        };
        if !each(&header, body, from) {
            break;
        }
    }
    Ok(())
}

/// Something heard on the cluster group.
#[derive(Debug, Clone, Copy)]
pub enum ClusterEvent {
    Heartbeat(HeartbeatOut),
    Announce(AnnounceOut),
    /// A node's answer to somebody's multicast LOCATE (managers snoop these).
    Located(LocateOut),
}

/// Listens on `group` until `wait` has passed or `each` returns false, calling `each`
/// for every well-formed heartbeat, announcement and LOCATE answer. Repetitions of an
/// announcement (same node, epoch and seq) are passed on once. Malformed datagrams are
/// skipped: the group is shared and nothing on it is trusted.
pub fn watch(
    group: SocketAddrV4,
    iface: Ipv4Addr,
    wait: Duration,
    each: &mut dyn FnMut(ClusterEvent, SocketAddr) -> bool,
) -> Result<(), ClientError> {
    watch_signed(group, iface, wait, None, each).map(|_| ())
}

/// [`watch`] with a key: heartbeats, announcements and LOCATE answers that are unsigned
/// or badly signed are dropped. Returns how many were dropped.
pub fn watch_signed(
    group: SocketAddrV4,
    iface: Ipv4Addr,
    wait: Duration,
    signer: Option<&Signer>,
    each: &mut dyn FnMut(ClusterEvent, SocketAddr) -> bool,
) -> Result<u64, ClientError> {
    let node = group.to_string();
    let io_err = |source| ClientError::Io {
        node: node.clone(),
        source,
    };
    let sock = join_group(group, iface).map_err(io_err)?;
    // Announcements already passed on, bounded: the oldest are forgotten first.
    let mut seen: std::collections::VecDeque<(u64, u64, u32)> = std::collections::VecDeque::new();
    let mut dropped = 0u64;
    recv_responses(&sock, Instant::now() + wait, &mut |header, body, from| {
        let shown = matches!(
            header.opcode(),
            Some(Opcode::Heartbeat | Opcode::Locate | Opcode::Announce)
        );
        if shown && !signed_by(signer, header, body) {
            dropped += 1;
            return true;
        }
        let event = match header.opcode() {
            Some(Opcode::Heartbeat) => HeartbeatOut::read_from_prefix(body)
                .ok()
                .map(|(h, _)| ClusterEvent::Heartbeat(h)),
            Some(Opcode::Locate) => LocateOut::read_from_prefix(body)
                .ok()
                .filter(|(l, _)| l.head.status.get() == Status::Success as u16)
                .map(|(l, _)| ClusterEvent::Located(l)),
            Some(Opcode::Announce) => match AnnounceOut::read_from_prefix(body) {
                Ok((a, _)) => {
                    let key = (a.node_id.get(), a.epoch.get(), a.seq.get());
                    if seen.contains(&key) {
                        None
                    } else {
                        if seen.len() == 256 {
                            seen.pop_front();
                        }
                        seen.push_back(key);
                        Some(ClusterEvent::Announce(a))
                    }
                }
                Err(_) => None,
            },
            _ => None,
        };
        match event {
            Some(event) => each(event, from),
            None => true,
        }
    })
    .map_err(io_err)?;
    Ok(dropped)
}

/// Reads from `input` until `buf` is full or the input ends; returns the bytes read and
/// whether the input ended.
fn fill(input: &mut dyn Read, buf: &mut [u8]) -> Result<(usize, bool), ClientError> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => return Ok((filled, true)),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The node is waiting for chunks; closing the connection makes it abort
            // the store, so nothing half-written becomes visible.
            Err(e) => return Err(ClientError::Input(e)),
        }
    }
    Ok((filled, false))
}

/// Writes `a` then `b` with as few system calls as the socket allows.
fn write_both(stream: &mut TcpStream, a: &[u8], b: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() || !b.is_empty() {
        let n = match stream.write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// Joins `group` on interface `iface` with a socket bound to the group's port, shared
/// with other listeners on the same machine (several nodes, several managers).
pub fn join_group(group: SocketAddrV4, iface: Ipv4Addr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    // Binding to the group address (not 0.0.0.0) keeps unicast traffic and other groups
    // on the same port out of this socket.
    sock.bind(&SocketAddr::V4(group).into())?;
    sock.join_multicast_v4(group.ip(), &iface)?;
    sock.set_multicast_if_v4(&iface)?;
    sock.set_multicast_loop_v4(true)?;
    // One hop: answers never leave the local network segment.
    sock.set_multicast_ttl_v4(1)?;
    Ok(sock.into())
}

/// A request id unlikely to collide with another manager's on the same group.
fn rand_id() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}
