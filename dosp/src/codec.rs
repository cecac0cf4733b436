//! The sans-IO DOSP codec: bytes in, events out, for both ends of a connection.
//!
//! [`RequestDecoder`] is the node's side: it turns a receive buffer into requests and
//! STORE chunk data. [`ResponseDecoder`] is the client's side: responses and streamed
//! data. Neither owns a socket or a buffer: the caller passes the bytes it has, the
//! decoder says how many it consumed and what they were, borrowing data in place (the
//! node copies STORE data exactly once, from its receive buffer into the disk buffer).
//!
//! A decoder that has returned an error stays failed: after garbage the stream cannot be
//! re-framed, so the node answers once and closes. A STORE chunk longer than the chunk
//! maximum is not such an error: its header's checksum vouches for its length, so the
//! decoder reports it ([`RequestEvent::OversizedChunk`]) and skips its bytes, and the
//! stream stays in step.

use zerocopy::{FromBytes, IntoBytes};

use crate::wire::{
    ChunkHeader, Header, Kind, Opcode, StreamHeader, WireError, MAGIC, STREAM_MAGIC,
};

/// What the node's decoder found at the front of its buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestEvent<'a> {
    /// A complete request. `opcode` is `Err(raw)` for an opcode this node does not
    /// know; its body has been consumed so the connection stays in step.
    Request {
        header: Header,
        opcode: Result<Opcode, u16>,
        body: &'a [u8],
    },
    /// A piece of STORE chunk data, borrowed from the input. `chunk_end` is set on the
    /// piece that completes a chunk; `last` on the piece that completes the last chunk
    /// (then the next bytes are a new request). An empty last chunk yields one empty piece.
    /// The bytes of an oversized chunk are skipped, never handed out: they come as
    /// empty pieces (each consuming what it skipped).
    Chunk {
        data: &'a [u8],
        chunk_end: bool,
        last: bool,
    },
    /// A STORE chunk header (valid in every other respect) announced `len` bytes, more
    /// than the chunk maximum: the STORE must fail. The decoder skips the chunk's bytes
    /// and goes on with the next chunk header, or the next request after a last chunk.
    OversizedChunk { len: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestState {
    Header,
    ChunkHeader,
    /// `skip`: the chunk is oversized and its bytes are dropped, not handed out.
    ChunkData {
        remaining: u32,
        last: bool,
        skip: bool,
    },
    Failed,
}

/// The node's side of the codec.
#[derive(Debug)]
pub struct RequestDecoder {
    state: RequestState,
    chunk_max: u32,
}

impl RequestDecoder {
    pub fn new(chunk_max: u32) -> RequestDecoder {
        RequestDecoder {
            state: RequestState::Header,
            chunk_max,
        }
    }

    /// True between a STORE request and its last chunk.
    pub fn in_store(&self) -> bool {
        matches!(
            self.state,
            RequestState::ChunkHeader | RequestState::ChunkData { .. }
        )
    }

    /// Bytes the decoder needs at minimum before it can make progress (a header, or a
    /// header plus its body). Lets the caller size reads; never more than
    /// `Header::SIZE + BODY_MAX`.
    pub fn failed(&self) -> bool {
        self.state == RequestState::Failed
    }

    /// Decodes at most one event from the front of `input`. `Ok(None)` means more bytes
    /// are needed. On `Ok(Some((event, n)))` the caller drops `n` bytes from its buffer.
    pub fn decode<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<Option<(RequestEvent<'a>, usize)>, WireError> {
        let result = self.decode_inner(input);
        if result.is_err() {
            self.state = RequestState::Failed;
        }
        result
    }

    fn decode_inner<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<Option<(RequestEvent<'a>, usize)>, WireError> {
        match self.state {
            RequestState::Failed => Err(WireError::Truncated),
            RequestState::Header => {
                let Some(head) = input.get(..Header::SIZE) else {
                    // Reject garbage as soon as the magic can be seen, so a peer that
                    // sends a few wrong bytes hears about it instead of waiting.
                    check_magic_prefix(input, MAGIC)?;
                    return Ok(None);
                };
                let header = Header::read_from_bytes(head).map_err(|_| WireError::Truncated)?;
                header.check(Kind::Request)?;
                let total = Header::SIZE + header.body_len.get() as usize;
                let Some(body) = input.get(Header::SIZE..total) else {
                    return Ok(None);
                };
                let opcode = header.opcode().ok_or(header.opcode.get());
                if opcode == Ok(Opcode::Store) {
                    self.state = RequestState::ChunkHeader;
                }
                Ok(Some((
                    RequestEvent::Request {
                        header,
                        opcode,
                        body,
                    },
                    total,
                )))
            }
            RequestState::ChunkHeader => {
                let Some(head) = input.get(..ChunkHeader::SIZE) else {
                    check_magic_prefix(input, crate::wire::CHUNK_MAGIC)
                        .map_err(|_| WireError::BadChunkMagic(partial_magic(input)))?;
                    return Ok(None);
                };
                let chunk = ChunkHeader::read_from_bytes(head).map_err(|_| WireError::Truncated)?;
                // Magic, checksum and flags; the length is judged below, once the
                // checksum has made it trustworthy.
                chunk.check(u32::MAX)?;
                let last = chunk.last();
                let len = chunk.len.get();
                if len > self.chunk_max {
                    self.state = RequestState::ChunkData {
                        remaining: len,
                        last,
                        skip: true,
                    };
                    return Ok(Some((
                        RequestEvent::OversizedChunk { len },
                        ChunkHeader::SIZE,
                    )));
                }
                if len == 0 {
                    self.state = if last {
                        RequestState::Header
                    } else {
                        RequestState::ChunkHeader
                    };
                    return Ok(Some((
                        RequestEvent::Chunk {
                            data: &[],
                            chunk_end: true,
                            last,
                        },
                        ChunkHeader::SIZE,
                    )));
                }
                self.state = RequestState::ChunkData {
                    remaining: len,
                    last,
                    skip: false,
                };
                Ok(Some((
                    RequestEvent::Chunk {
                        data: &[],
                        chunk_end: false,
                        last: false,
                    },
                    ChunkHeader::SIZE,
                )))
            }
            RequestState::ChunkData {
                remaining,
                last,
                skip,
            } => {
                if input.is_empty() {
                    return Ok(None);
                }
                let n = input.len().min(remaining as usize);
                let rest = remaining - n as u32;
                let chunk_end = rest == 0;
                self.state = match (chunk_end, last) {
                    (false, _) => RequestState::ChunkData {
                        remaining: rest,
                        last,
                        skip,
                    },
                    (true, true) => RequestState::Header,
                    (true, false) => RequestState::ChunkHeader,
                };
                Ok(Some((
                    RequestEvent::Chunk {
                        data: if skip { &[] } else { &input[..n] },
                        chunk_end,
                        last: chunk_end && last,
                    },
                    n,
                )))
            }
        }
    }
}

/// Fails early when the bytes seen so far cannot be the start of `magic`.
fn check_magic_prefix(input: &[u8], magic: u32) -> Result<(), WireError> {
    let want = magic.to_le_bytes();
    let n = input.len().min(4);
    if input[..n] != want[..n] {
        return Err(WireError::BadMagic(partial_magic(input)));
    }
    Ok(())
}

fn partial_magic(input: &[u8]) -> u32 {
    let mut m = [0u8; 4];
    let n = input.len().min(4);
    m[..n].copy_from_slice(&input[..n]);
    u32::from_le_bytes(m)
}

/// What the client's decoder found at the front of its buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum ResponseEvent<'a> {
    /// A complete response: header and Out body.
    Response { header: Header, body: &'a [u8] },
    /// Streamed data of `len` bytes follows, then the response.
    StreamStart { request_id: u64, len: u64 },
    /// A piece of the stream, borrowed from the input.
    StreamData(&'a [u8]),
}

/// The client's side of the codec.
#[derive(Debug)]
pub struct ResponseDecoder {
    remaining: u64,
    failed: bool,
    stream_max: u64,
}

impl ResponseDecoder {
    /// `stream_max` bounds the length a node may announce for streamed data.
    pub fn new(stream_max: u64) -> ResponseDecoder {
        ResponseDecoder {
            remaining: 0,
            failed: false,
            stream_max,
        }
    }

    pub fn decode<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<Option<(ResponseEvent<'a>, usize)>, WireError> {
        if self.failed {
            return Err(WireError::Truncated);
        }
        let result = self.decode_inner(input);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn decode_inner<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<Option<(ResponseEvent<'a>, usize)>, WireError> {
        if self.remaining > 0 {
            if input.is_empty() {
                return Ok(None);
            }
            let n = (input.len() as u64).min(self.remaining) as usize;
            self.remaining -= n as u64;
            return Ok(Some((ResponseEvent::StreamData(&input[..n]), n)));
        }
        if input.len() < 4 {
            return Ok(None);
        }
        let magic = u32::from_le_bytes([input[0], input[1], input[2], input[3]]);
        if magic == STREAM_MAGIC {
            let Some(head) = input.get(..StreamHeader::SIZE) else {
                return Ok(None);
            };
            let stream = StreamHeader::read_from_bytes(head).map_err(|_| WireError::Truncated)?;
            stream.check()?;
            let len = stream.len.get();
            if len > self.stream_max {
                return Err(WireError::StreamTooLarge {
                    len,
                    max: self.stream_max,
                });
            }
            self.remaining = len;
            return Ok(Some((
                ResponseEvent::StreamStart {
                    request_id: stream.request_id.get(),
                    len,
                },
                StreamHeader::SIZE,
            )));
        }
        let Some(head) = input.get(..Header::SIZE) else {
            check_magic_prefix(input, MAGIC)?;
            return Ok(None);
        };
        let header = Header::read_from_bytes(head).map_err(|_| WireError::Truncated)?;
        header.check(Kind::Response)?;
        let total = Header::SIZE + header.body_len.get() as usize;
        let Some(body) = input.get(Header::SIZE..total) else {
            return Ok(None);
        };
        Ok(Some((ResponseEvent::Response { header, body }, total)))
    }
}

/// Appends a request (header + In structure) to `out`.
pub fn encode_request(out: &mut Vec<u8>, opcode: Opcode, request_id: u64, flags: u16, body: &[u8]) {
    let header = Header::new(Kind::Request, opcode, request_id, body.len() as u32, flags);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
}

/// Appends a response (header + Out structure made of `parts`) to `out`. `opcode` is
/// raw so a node can echo an opcode it does not know.
pub fn encode_response(out: &mut Vec<u8>, opcode: u16, request_id: u64, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let header = Header::new_raw(Kind::Response, opcode, request_id, len as u32, 0);
    out.extend_from_slice(header.as_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Over UDP unicast a reply datagram is at most this many times the size of the
/// request datagram it answers (dosp/PROTOCOL.md, "UDP replies"), so a datagram with
/// a forged source address cannot be turned into a larger one at somebody else.
pub const UDP_REPLY_FACTOR_MAX: usize = 3;

/// Whether a node may answer a `request_len`-byte datagram with a `reply_len`-byte one.
pub fn udp_reply_allowed(request_len: usize, reply_len: usize) -> bool {
    reply_len <= request_len.saturating_mul(UDP_REPLY_FACTOR_MAX)
}

/// The smallest request datagram a reply of `reply_len` bytes may answer: what a
/// requester pads its datagram to (with zeros after the body).
pub fn udp_request_len_for(reply_len: usize) -> usize {
    reply_len.div_ceil(UDP_REPLY_FACTOR_MAX)
}

/// Appends a STORE chunk header to `out`; the caller sends `len` data bytes after it.
pub fn encode_chunk_header(out: &mut Vec<u8>, len: u32, last: bool) {
    out.extend_from_slice(ChunkHeader::new(len, last).as_bytes());
}

/// Appends a stream header to `out`; the caller sends `len` data bytes after it.
pub fn encode_stream_header(out: &mut Vec<u8>, request_id: u64, len: u64) {
    out.extend_from_slice(StreamHeader::new(request_id, len).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::*;
    use crate::Fingerprint;
    use proptest::prelude::*;
    use zerocopy::FromZeros;

    #[test]
    fn the_udp_reply_rule_and_the_padding_it_asks_for_agree() {
        assert!(udp_reply_allowed(32, 96));
        assert!(!udp_reply_allowed(32, 97));
        // Every error reply (header + OutHead) answers the smallest request.
        assert!(udp_reply_allowed(Header::SIZE, Header::SIZE + 8));
        for reply in [40usize, 112, 176, 16_432] {
            let pad = udp_request_len_for(reply);
            assert!(udp_reply_allowed(pad, reply), "{reply}");
            assert!(
                !udp_reply_allowed(pad - 1, reply),
                "{reply}: {pad} is the least"
            );
        }
    }

    fn store_message(id: u64, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        let body = StoreIn::new(0, None, None);
        encode_request(&mut out, Opcode::Store, id, 0, body.as_bytes());
        for (i, c) in chunks.iter().enumerate() {
            encode_chunk_header(&mut out, c.len() as u32, i + 1 == chunks.len());
            out.extend_from_slice(c);
        }
        out
    }

    /// Requests (opcode, body), reassembled STORE payloads, bytes left undecoded.
    type Driven = (Vec<(u16, Vec<u8>)>, Vec<Vec<u8>>, usize);

    /// Runs the request decoder over `input` fed in pieces of `step` bytes, as a socket
    /// would deliver them, and returns requests and the reassembled store payloads.
    fn drive(input: &[u8], step: usize) -> Result<Driven, WireError> {
        let mut dec = RequestDecoder::new(1 << 20);
        let mut buf: Vec<u8> = Vec::new();
        let mut fed = 0;
        let mut reqs = Vec::new();
        let mut stores = Vec::new();
        let mut cur: Vec<u8> = Vec::new();
        loop {
            match dec.decode(&buf)? {
                Some((ev, n)) => {
                    match ev {
                        RequestEvent::Request { header, body, .. } => {
                            reqs.push((header.opcode.get(), body.to_vec()))
                        }
                        RequestEvent::Chunk { data, last, .. } => {
                            cur.extend_from_slice(data);
                            if last {
                                stores.push(std::mem::take(&mut cur));
                            }
                        }
                        RequestEvent::OversizedChunk { .. } => {}
                    }
                    buf.drain(..n);
                }
                None => {
                    if fed == input.len() {
                        return Ok((reqs, stores, buf.len()));
                    }
                    let end = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn store_then_pipelined_retrieve() {
        let mut msg = store_message(1, &[b"hello ", b"", b"world"]);
        let fp = Fingerprint::of(b"hello world");
        encode_request(
            &mut msg,
            Opcode::Retrieve,
            2,
            0,
            RetrieveIn { fingerprint: fp }.as_bytes(),
        );
        for step in [1, 3, 7, 16, 1000] {
            let (reqs, stores, left) = drive(&msg, step).unwrap();
            assert_eq!(reqs.len(), 2);
            assert_eq!(reqs[0].0, Opcode::Store as u16);
            assert_eq!(reqs[1].0, Opcode::Retrieve as u16);
            assert_eq!(stores, vec![b"hello world".to_vec()]);
            assert_eq!(left, 0);
        }
    }

    #[test]
    fn unknown_opcode_is_consumed_with_its_body() {
        let mut msg = Vec::new();
        let h = Header::new_raw(Kind::Request, 999, 5, 3, 0);
        msg.extend_from_slice(h.as_bytes());
        msg.extend_from_slice(b"abc");
        encode_request(&mut msg, Opcode::Null, 6, 0, &[]);
        let mut dec = RequestDecoder::new(16);
        let (ev, n) = dec.decode(&msg).unwrap().unwrap();
        assert!(matches!(
            ev,
            RequestEvent::Request {
                opcode: Err(999),
                body: b"abc",
                ..
            }
        ));
        let (ev, _) = dec.decode(&msg[n..]).unwrap().unwrap();
        assert!(matches!(
            ev,
            RequestEvent::Request {
                opcode: Ok(Opcode::Null),
                ..
            }
        ));
    }

    #[test]
    fn garbage_is_rejected_at_once() {
        let mut dec = RequestDecoder::new(16);
        assert_eq!(
            dec.decode(b"GET / HTTP/1.1\r\n"),
            Err(WireError::BadMagic(u32::from_le_bytes(*b"GET ")))
        );
        assert!(dec.failed());
        let mut dec = RequestDecoder::new(16);
        assert!(dec.decode(b"X").is_err());
    }

    #[test]
    fn chunk_longer_than_announced_is_caught() {
        // The chunk header says 4 bytes, the client sends 6: the extra bytes land where
        // the next chunk header should be.
        let mut msg = Vec::new();
        encode_request(
            &mut msg,
            Opcode::Store,
            1,
            0,
            StoreIn::new_zeroed().as_bytes(),
        );
        encode_chunk_header(&mut msg, 4, false);
        msg.extend_from_slice(b"abcdef");
        msg.extend_from_slice(&[0; 32]);
        let err = drive(&msg, 64).unwrap_err();
        assert!(matches!(err, WireError::BadChunkMagic(_)), "{err:?}");
    }

    #[test]
    fn oversized_chunk_is_reported_and_skipped_in_step() {
        let mut msg = Vec::new();
        encode_request(
            &mut msg,
            Opcode::Store,
            1,
            0,
            StoreIn::new_zeroed().as_bytes(),
        );
        encode_chunk_header(&mut msg, 5, false);
        msg.extend_from_slice(b"hello");
        encode_chunk_header(&mut msg, 40, false);
        msg.extend_from_slice(&[0xEE; 40]);
        encode_chunk_header(&mut msg, 3, true);
        msg.extend_from_slice(b"end");
        encode_request(&mut msg, Opcode::Null, 2, 0, &[]);
        for step in [1, 7, 16, 1000] {
            let mut dec = RequestDecoder::new(32);
            let mut buf: Vec<u8> = Vec::new();
            let (mut fed, mut data, mut oversized, mut reqs) = (0, Vec::new(), Vec::new(), 0);
            loop {
                match dec.decode(&buf).unwrap() {
                    Some((ev, n)) => {
                        assert!(n > 0);
                        match ev {
                            RequestEvent::Request { .. } => reqs += 1,
                            RequestEvent::Chunk { data: d, .. } => data.extend_from_slice(d),
                            RequestEvent::OversizedChunk { len } => oversized.push(len),
                        }
                        buf.drain(..n);
                    }
                    None if fed == msg.len() => break,
                    None => {
                        let end = (fed + step).min(msg.len());
                        buf.extend_from_slice(&msg[fed..end]);
                        fed = end;
                    }
                }
            }
            assert_eq!(oversized, vec![40], "step {step}");
            assert_eq!(
                data, b"helloend",
                "the oversized bytes are never handed out"
            );
            assert_eq!(reqs, 2, "the NULL after the STORE is still found");
            assert!(buf.is_empty() && !dec.failed());
        }
        // Its length is trusted only through the checksum: a corrupt header still fails.
        let mut bad = ChunkHeader::new(1 << 30, true);
        bad.len = (1 << 31).into();
        let mut dec = RequestDecoder::new(32);
        let mut msg = Vec::new();
        encode_request(
            &mut msg,
            Opcode::Store,
            1,
            0,
            StoreIn::new_zeroed().as_bytes(),
        );
        let n = msg.len();
        msg.extend_from_slice(bad.as_bytes());
        dec.decode(&msg).unwrap().unwrap();
        assert_eq!(dec.decode(&msg[n..]), Err(WireError::HeaderChecksum));
    }

    #[test]
    fn response_decoder_streams_then_out() {
        let mut msg = Vec::new();
        encode_stream_header(&mut msg, 9, 5);
        msg.extend_from_slice(b"abcde");
        let out = RetrieveOut {
            head: OutHead::new(Status::Success, 0),
            fingerprint: Fingerprint::of(b"abcde"),
            object_len: 5.into(),
        };
        encode_response(&mut msg, Opcode::Retrieve as u16, 9, &[out.as_bytes()]);
        let mut dec = ResponseDecoder::new(10);
        let mut data = Vec::new();
        let mut rest = &msg[..];
        let mut got_out = false;
        while let Some((ev, n)) = dec.decode(rest).unwrap() {
            match ev {
                ResponseEvent::StreamStart { len, request_id } => {
                    assert_eq!((len, request_id), (5, 9))
                }
                ResponseEvent::StreamData(d) => data.extend_from_slice(d),
                ResponseEvent::Response { body, .. } => {
                    assert_eq!(out_status(body).unwrap().0, Status::Success);
                    got_out = true;
                }
            }
            rest = &rest[n..];
        }
        assert!(got_out);
        assert_eq!(data, b"abcde");
        let mut small = ResponseDecoder::new(4);
        assert_eq!(
            small.decode(&msg),
            Err(WireError::StreamTooLarge { len: 5, max: 4 })
        );
    }

    fn arb_request() -> impl Strategy<Value = Vec<u8>> {
        let fp = proptest::array::uniform16(any::<u8>()).prop_map(Fingerprint);
        prop_oneof![
            Just(Opcode::Null).prop_map(|op| (op, vec![])),
            fp.clone().prop_map(|f| (
                Opcode::Retrieve,
                RetrieveIn { fingerprint: f }.as_bytes().to_vec()
            )),
            (fp.clone(), any::<u64>(), any::<u64>()).prop_map(|(f, o, l)| (
                Opcode::RetrieveRange,
                RangeIn {
                    fingerprint: f,
                    offset: o.into(),
                    len: l.into()
                }
                .as_bytes()
                .to_vec()
            )),
            fp.clone().prop_map(|f| (
                Opcode::Delete,
                DeleteIn { fingerprint: f }.as_bytes().to_vec()
            )),
            fp.prop_map(|f| (
                Opcode::Locate,
                LocateIn { fingerprint: f }.as_bytes().to_vec()
            )),
            any::<u16>().prop_map(|d| (
                Opcode::GetDiskStatus,
                DiskQueryIn {
                    disk: d.into(),
                    reserved: 0.into(),
                    reserved1: 0.into()
                }
                .as_bytes()
                .to_vec()
            )),
        ]
        .prop_flat_map(|(op, body)| {
            any::<u64>().prop_map(move |id| {
                let mut v = Vec::new();
                encode_request(&mut v, op, id, 0, &body);
                v
            })
        })
    }

    proptest! {
        #[test]
        fn round_trip_any_pipeline(reqs in proptest::collection::vec(arb_request(), 1..8),
                                   chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..5),
                                   step in 1usize..200) {
            let chunk_refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
            let mut msg = store_message(42, &chunk_refs);
            for r in &reqs { msg.extend_from_slice(r); }
            let (got, stores, left) = drive(&msg, step).unwrap();
            prop_assert_eq!(left, 0);
            prop_assert_eq!(got.len(), reqs.len() + 1);
            prop_assert_eq!(stores, vec![chunks.concat()]);
            for (r, (op, body)) in reqs.iter().zip(&got[1..]) {
                let h = Header::read_from_prefix(r).unwrap().0;
                prop_assert_eq!(h.opcode.get(), *op);
                prop_assert_eq!(&r[Header::SIZE..], body.as_slice());
            }
        }

        #[test]
        fn every_truncation_is_incomplete_not_an_error(req in arb_request()) {
            for cut in 0..req.len() {
                let mut dec = RequestDecoder::new(1 << 20);
                prop_assert_eq!(dec.decode(&req[..cut]), Ok(None));
            }
        }

        #[test]
        fn every_truncated_response_is_incomplete(len in 0u64..64, id in any::<u64>()) {
            let mut msg = Vec::new();
            encode_stream_header(&mut msg, id, len);
            let out = OutHead::new(Status::NotFound, 3);
            let mut resp = Vec::new();
            encode_response(&mut resp, Opcode::Retrieve as u16, id, &[out.as_bytes()]);
            for cut in 0..msg.len() {
                prop_assert_eq!(ResponseDecoder::new(64).decode(&msg[..cut]), Ok(None));
            }
            for cut in 0..resp.len() {
                prop_assert_eq!(ResponseDecoder::new(64).decode(&resp[..cut]), Ok(None));
            }
        }

        #[test]
        fn response_round_trip(id in any::<u64>(), fp in proptest::array::uniform16(any::<u8>()),
                               data in proptest::collection::vec(any::<u8>(), 0..2000),
                               status in 0u16..14, step in 1usize..100) {
            // A streamed reply (stream header, data, Out) followed by a plain one.
            let status = Status::from_u16(status).unwrap();
            let out = RetrieveOut { head: OutHead::new(status, 7), fingerprint: Fingerprint(fp), object_len: (data.len() as u64).into() };
            let mut msg = Vec::new();
            encode_stream_header(&mut msg, id, data.len() as u64);
            msg.extend_from_slice(&data);
            encode_response(&mut msg, Opcode::Retrieve as u16, id, &[out.as_bytes()]);
            let del = DeleteOut { head: OutHead::new(Status::Success, 0), fingerprint: Fingerprint(fp), refcount: 3.into(), reserved: 0.into() };
            encode_response(&mut msg, Opcode::Delete as u16, id.wrapping_add(1), &[del.as_bytes()]);

            let mut dec = ResponseDecoder::new(u64::MAX);
            let mut buf: Vec<u8> = Vec::new();
            let (mut fed, mut got_data, mut bodies) = (0, Vec::new(), Vec::new());
            loop {
                match dec.decode(&buf).unwrap() {
                    Some((ev, n)) => {
                        match ev {
                            ResponseEvent::StreamStart { request_id, len } => {
                                prop_assert_eq!((request_id, len), (id, data.len() as u64));
                            }
                            ResponseEvent::StreamData(d) => got_data.extend_from_slice(d),
                            ResponseEvent::Response { header, body } => bodies.push((header.request_id.get(), body.to_vec())),
                        }
                        buf.drain(..n);
                    }
                    None if fed == msg.len() => break,
                    None => {
                        let end = (fed + step).min(msg.len());
                        buf.extend_from_slice(&msg[fed..end]);
                        fed = end;
                    }
                }
            }
            prop_assert_eq!(got_data, data);
            prop_assert_eq!(bodies.len(), 2);
            prop_assert_eq!(&bodies[0], &(id, out.as_bytes().to_vec()));
            prop_assert_eq!(out_status(&bodies[0].1).unwrap(), (status, 7));
            prop_assert_eq!(&bodies[1], &(id.wrapping_add(1), del.as_bytes().to_vec()));
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut dec = RequestDecoder::new(1024);
            let mut rest = &bytes[..];
            // Bounded: each step consumes at least one byte or stops.
            for _ in 0..bytes.len() + 2 {
                match dec.decode(rest) {
                    Ok(Some((_, n))) if n > 0 => rest = &rest[n..],
                    _ => break,
                }
            }
            let mut rdec = ResponseDecoder::new(1024);
            let _ = rdec.decode(&bytes);
        }
    }
}
