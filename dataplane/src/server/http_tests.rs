//! The HTTP session, sans IO: bytes in, a made-up store answering its needs, bytes out.

use std::time::Duration;

use dosp::auth::{srl_path, KeyRing};
use md5::{Digest, Md5};

use super::*;

const NOW: u64 = 1_000_000;

fn ring() -> KeyRing {
    KeyRing::parse("k1 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n").unwrap()
}

/// URLs checked with `ring`, HMAC-SHA256 only.
fn keys(ring: &KeyRing) -> UrlKeys<'_> {
    UrlKeys {
        ring,
        allow_md5: false,
    }
}

fn object(len: usize) -> (Fingerprint, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    (Fingerprint(Md5::digest(&data).into()), data)
}

/// Feeds `input` to a session over a store holding `objects`, answering every need at
/// once, and returns everything it sent, split into responses by the caller.
fn exchange(objects: &[(Fingerprint, Vec<u8>)], input: &[u8]) -> (Vec<u8>, Vec<u16>, bool) {
    let ring = ring();
    let now = Instant::now();
    let mut s: HttpSession<Vec<u8>> = HttpSession::new(now);
    let mut pending = input.to_vec();
    let mut sent = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..10_000 {
        let n = s.on_recv(now, NOW, keys(&ring), &pending);
        pending.drain(..n);
        if pending.is_empty() {
            s.on_peer_closed();
            s.on_recv(now, NOW, keys(&ring), &[]);
        }
        while let Some(need) = s.need() {
            match need {
                Need::Lookup(fp) => {
                    let found = objects.iter().find(|(f, _)| *f == fp);
                    s.on_located(found.map(|(_, d)| d.len() as u64));
                }
                Need::Read { fp, offset, len } => {
                    let (_, data) = objects.iter().find(|(f, _)| *f == fp).unwrap();
                    let offset = offset as usize;
                    s.on_piece(Ok(data[offset..offset + len].to_vec()));
                }
            }
        }
        let mut iov = [io::IoSlice::new(&[]); 8];
        let k = s.pending_slices(&mut iov);
        // Send a little at a time, to cross piece and head boundaries.
        let mut n = 0;
        for slice in &iov[..k] {
            let take = slice.len().min(100_000 - n);
            sent.extend_from_slice(&slice[..take]);
            n += take;
        }
        s.output_sent(now, n);
        s.take_spent().for_each(drop);
        statuses.extend(s.take_statuses());
        if s.finished() {
            return (sent, statuses, true);
        }
        if k == 0 && pending.is_empty() && s.need().is_none() && s.wants_input() {
            break;
        }
    }
    (sent, statuses, s.finished())
}

/// Splits raw output into (status, headers text, body), using Content-Length.
fn responses(mut raw: &[u8], heads_only: bool) -> Vec<(u16, String, Vec<u8>)> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8(raw[..end].to_vec()).unwrap();
        let status: u16 = head[9..12].parse().unwrap();
        let len: usize = header(&head, "content-length").unwrap().parse().unwrap();
        let len = if heads_only { 0 } else { len };
        out.push((status, head, raw[end..end + len].to_vec()));
        raw = &raw[end + len..];
    }
    out
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: node\r\n{extra}\r\n").into_bytes()
}

#[test]
fn whole_object_with_its_headers() {
    let (fp, data) = object(600_000);
    let path = srl_path(&ring(), &fp, NOW + 60, Some("photo 1.jpg"));
    let (raw, statuses, _) = exchange(&[(fp, data.clone())], &get(&path, ""));
    let r = responses(&raw, false);
    assert_eq!(r.len(), 1);
    let (status, head, body) = &r[0];
    assert_eq!(*status, 200);
    assert_eq!(body, &data);
    assert_eq!(header(head, "etag").unwrap(), format!("\"{fp}\""));
    assert_eq!(header(head, "content-md5").unwrap(), STANDARD.encode(fp.0));
    assert_eq!(header(head, "accept-ranges").unwrap(), "bytes");
    assert_eq!(
        header(head, "content-disposition").unwrap(),
        "inline; filename=\"photo 1.jpg\""
    );
    assert_eq!(header(head, "content-type").unwrap(), "image/jpeg");
    assert_eq!(header(head, "x-content-type-options").unwrap(), "nosniff");
    assert_eq!(statuses, [200]);
}

#[test]
fn content_types_by_extension_passive_formats_only() {
    let name = |n: &str| Name::from_uri(n);
    for (uri, want) in [
        ("a.JPG", "image/jpeg"),
        ("dir/clip.mp4", "video/mp4"),
        ("notes.txt", "text/plain; charset=utf-8"),
        ("report.pdf", "application/pdf"),
        // Active content would run as a page of the node's origin.
        ("page.html", "application/octet-stream"),
        ("icon.svg", "application/octet-stream"),
        ("app.js", "application/octet-stream"),
        ("noext", "application/octet-stream"),
        ("trailing.", "application/octet-stream"),
        ("archive.tar.gz", "application/gzip"),
    ] {
        assert_eq!(content_type(name(uri).as_ref()), want, "{uri}");
    }
    assert_eq!(content_type(None), "application/octet-stream");
    // No name: the path ends with the fingerprint, and the type is the default.
    let (fp, data) = object(10);
    let path = srl_path(&ring(), &fp, NOW + 60, None);
    let (raw, _, _) = exchange(&[(fp, data)], &get(&path, ""));
    let r = responses(&raw, false);
    assert_eq!(
        header(&r[0].1, "content-type").unwrap(),
        "application/octet-stream"
    );
}

#[test]
fn ranges_head_and_keep_alive_on_one_connection() {
    let (fp, data) = object(300_000);
    let path = srl_path(&ring(), &fp, NOW + 60, None);
    let mut input = get(&path, "Range: bytes=10-19\r\n");
    input.extend(get(&path, "Range: bytes=-5\r\n"));
    input.extend(get(&path, "Range: bytes=299990-\r\n"));
    input.extend(get(&path, "Range: bytes=300000-\r\n"));
    input.extend(get(&path, "Range: bytes=0-1,5-6\r\n"));
    input.extend(format!("HEAD {path} HTTP/1.1\r\n\r\n").into_bytes());
    input.extend(get(&path, "Connection: close\r\n"));
    input.extend(get(&path, ""));
    let (raw, statuses, finished) = exchange(&[(fp, data.clone())], &input);
    assert!(finished);
    assert_eq!(statuses, [206, 206, 206, 416, 200, 200, 200]);
    // HEAD has no body: split by hand around it.
    let heads_at = raw
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == b"HTTP")
        .map(|(i, _)| i)
        .collect::<Vec<_>>();
    assert_eq!(heads_at.len(), 7);
    let before_head = responses(&raw[..heads_at[5]], false);
    assert_eq!(before_head[0].2, &data[10..20]);
    assert_eq!(
        header(&before_head[0].1, "content-range").unwrap(),
        "bytes 10-19/300000"
    );
    assert!(header(&before_head[0].1, "content-md5").is_none());
    assert_eq!(before_head[1].2, &data[299_995..]);
    assert_eq!(before_head[2].2, &data[299_990..]);
    assert_eq!(
        header(&before_head[3].1, "content-range").unwrap(),
        "bytes */300000"
    );
    assert_eq!(before_head[4].2, data);
    let head = responses(&raw[heads_at[5]..heads_at[6]], true);
    assert_eq!(head[0].0, 200);
    assert_eq!(header(&head[0].1, "content-length").unwrap(), "300000");
    let last = responses(&raw[heads_at[6]..], false);
    assert_eq!(last[0].2, data);
    assert_eq!(header(&last[0].1, "connection").unwrap(), "close");
}

#[test]
fn refusals() {
    let ring = ring();
    let (fp, data) = object(10);
    let (other, _) = object(11);
    let good = srl_path(&ring, &fp, NOW + 60, None);
    let expired = srl_path(&ring, &fp, NOW, None);
    let (req, sig, _) = split_srl(&good).unwrap();
    let other_path = srl_path(&ring, &other, NOW + 60, None);
    let (other_req, _, _) = split_srl(&other_path).unwrap();
    let mut bad_sig = sig.to_owned().into_bytes();
    bad_sig[0] = if bad_sig[0] == b'A' { b'B' } else { b'A' };
    let tampered = format!("/{req}/{}/x", String::from_utf8(bad_sig).unwrap());
    let wrong_object = format!("/{other_req}/{sig}/x");
    let stranger =
        KeyRing::parse("k9 a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5\n")
            .unwrap();
    let unknown_key = srl_path(&stranger, &fp, NOW + 60, None);
    let missing = srl_path(&ring, &other, NOW + 60, None);
    use dosp::signed::Refusal;
    for (path, status, text, refusal) in [
        (
            expired.as_str(),
            403,
            "expired\n",
            Some(Refusal::TokenExpired),
        ),
        (
            tampered.as_str(),
            403,
            "bad signature\n",
            Some(Refusal::BadCertificate),
        ),
        (
            wrong_object.as_str(),
            403,
            "bad signature\n",
            Some(Refusal::BadCertificate),
        ),
        (
            unknown_key.as_str(),
            403,
            "unknown key\n",
            Some(Refusal::UnknownKey),
        ),
        (
            "/abc/def/x",
            403,
            "malformed signed URL\n",
            Some(Refusal::BadCertificate),
        ),
        ("/favicon.ico", 404, "not found\n", None),
        (missing.as_str(), 404, "not found\n", None),
    ] {
        // The refusal is counted by reason, as a refused DOSP request is.
        let mut s = HttpSession::<Vec<u8>>::new(Instant::now());
        let n = s.on_recv(Instant::now(), NOW, keys(&ring), &get(path, ""));
        assert!(n > 0, "{path}");
        let refusals: Vec<_> = s.take_refusals().collect();
        assert_eq!(
            refusals,
            refusal.map(|r| (r, 1)).into_iter().collect::<Vec<_>>(),
            "{path}"
        );
        assert_eq!(s.take_refusals().count(), 0, "taken once");
        let (raw, statuses, _) = exchange(&[(fp, data.clone())], &get(path, ""));
        let r = responses(&raw, false);
        assert_eq!(
            (r[0].0, r[0].2.as_slice()),
            (status, text.as_bytes()),
            "{path}"
        );
        assert_eq!(statuses, [status]);
    }
    let (raw, _, finished) = exchange(&[], format!("POST {good} HTTP/1.1\r\n\r\n").as_bytes());
    let r = responses(&raw, false);
    assert_eq!(r[0].0, 405);
    assert_eq!(header(&r[0].1, "allow").unwrap(), "GET, HEAD");
    assert!(finished);
    // A POST with a body, then a GET: the body is not read, so the connection closes
    // after the 405 (the body is never taken for a request).
    let mut input = format!("POST {good} HTTP/1.1\r\nContent-Length: 20\r\n\r\n").into_bytes();
    input.extend(get(&format!("{good} HTTP/1.1\r\nX"), ""));
    input.extend(get(&good, ""));
    let (raw, statuses, finished) = exchange(&[(fp, data.clone())], &input);
    assert_eq!(statuses, [405]);
    assert_eq!(
        header(&responses(&raw, false)[0].1, "connection").unwrap(),
        "close"
    );
    assert!(finished);
    // Without a body the connection stays open for the next request.
    let mut input = format!("OPTIONS {good} HTTP/1.1\r\n\r\n").into_bytes();
    input.extend(get(&good, ""));
    let (_, statuses, _) = exchange(&[(fp, data.clone())], &input);
    assert_eq!(statuses, [405, 200]);
}

#[test]
fn malformed_and_oversized_heads_close() {
    for (input, status) in [
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n".to_vec(), 400),
        (b"\x00\x01\x02\r\n\r\n".to_vec(), 400),
        (
            format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(HEAD_BYTES_MAX)).into_bytes(),
            431,
        ),
        (
            format!(
                "GET / HTTP/1.1\r\n{}\r\n",
                "X-A: b\r\n".repeat(HEADERS_MAX + 1)
            )
            .into_bytes(),
            431,
        ),
        (
            b"GET /a/b/c HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            400,
        ),
    ] {
        let (raw, statuses, finished) = exchange(&[], &input);
        let r = responses(&raw, false);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, status);
        assert_eq!(header(&r[0].1, "connection").unwrap(), "close");
        assert_eq!(statuses, [status]);
        assert!(finished);
    }
}

#[test]
fn http_1_0_closes_after_its_response() {
    let (fp, data) = object(100);
    let path = srl_path(&ring(), &fp, NOW + 60, None);
    let mut input = format!("GET {path} HTTP/1.0\r\n\r\n").into_bytes();
    input.extend(get(&path, ""));
    let (raw, statuses, finished) = exchange(&[(fp, data.clone())], &input);
    assert!(finished);
    assert_eq!(statuses, [200]);
    assert_eq!(responses(&raw, false)[0].2, data);
}

#[test]
fn a_failed_first_piece_is_a_500_and_a_later_one_breaks_the_connection() {
    let ring = ring();
    let now = Instant::now();
    let (fp, _) = object(10);
    let path = srl_path(&ring, &fp, NOW + 60, None);
    let mut s: HttpSession<Vec<u8>> = HttpSession::new(now);
    let req = get(&path, "");
    assert_eq!(s.on_recv(now, NOW, keys(&ring), &req), req.len());
    assert_eq!(s.need(), Some(Need::Lookup(fp)));
    s.on_located(Some(PIECE_BYTES as u64 + 1));
    assert!(matches!(s.need(), Some(Need::Read { offset: 0, .. })));
    assert_eq!(s.need(), None, "one read at a time");
    s.on_piece(Err(503));
    assert_eq!(s.take_statuses().collect::<Vec<_>>(), [503]);
    assert!(!s.finished());

    let mut s: HttpSession<Vec<u8>> = HttpSession::new(now);
    s.on_recv(now, NOW, keys(&ring), &req);
    s.need();
    s.on_located(Some(PIECE_BYTES as u64 + 1));
    s.need();
    s.on_piece(Ok(vec![0; PIECE_BYTES]));
    assert!(matches!(
        s.need(),
        Some(Need::Read {
            offset,
            len: 1,
            ..
        }) if offset == PIECE_BYTES as u64
    ));
    s.on_piece(Err(500));
    assert!(s.finished());
    let mut iov = [io::IoSlice::new(&[]); 8];
    assert_eq!(s.pending_slices(&mut iov), 0);
    s.close();
    assert_eq!(s.take_spent().count(), 1);
}

#[test]
fn deadlines() {
    let d = Deadlines {
        request: Duration::from_secs(1),
        idle: Duration::from_secs(60),
        header: Duration::from_millis(500),
        rate_min_bytes_per_sec: 1000,
    };
    let ring = ring();
    let t0 = Instant::now();
    // A head trickled in never completes within its deadline.
    let mut s: HttpSession<Vec<u8>> = HttpSession::new(t0);
    assert_eq!(s.on_recv(t0, NOW, keys(&ring), b"GET /"), 0);
    s.on_arrived(t0 + Duration::from_millis(400), 1);
    assert_eq!(s.timed_out(t0 + Duration::from_millis(400), &d), None);
    assert_eq!(
        s.timed_out(t0 + Duration::from_millis(600), &d),
        Some(Timeout::Header)
    );
    // Idle between requests.
    let mut s: HttpSession<Vec<u8>> = HttpSession::new(t0);
    assert_eq!(s.timed_out(t0 + Duration::from_secs(59), &d), None);
    assert_eq!(
        s.timed_out(t0 + Duration::from_secs(61), &d),
        Some(Timeout::Idle)
    );
    // A body the client does not read is held to the minimum rate.
    let (fp, _) = object(10);
    let path = srl_path(&ring, &fp, NOW + 60, None);
    let mut s: HttpSession<Vec<u8>> = HttpSession::new(t0);
    s.on_recv(t0, NOW, keys(&ring), &get(&path, ""));
    s.need();
    s.on_located(Some(10_000));
    s.need();
    s.on_piece(Ok(vec![0; 10_000]));
    assert_eq!(s.timed_out(t0, &d), None);
    s.output_sent(t0 + Duration::from_millis(500), 10);
    assert_eq!(
        s.timed_out(t0 + Duration::from_millis(1000), &d),
        Some(Timeout::TooSlow)
    );
}

#[test]
fn range_specs() {
    use RangeOutcome::*;
    for (text, len, want) in [
        ("bytes=0-0", 10, Some(Part(0, 1))),
        ("bytes=2-", 10, Some(Part(2, 10))),
        ("bytes=-3", 10, Some(Part(7, 10))),
        ("bytes=-30", 10, Some(Part(0, 10))),
        ("bytes=5-100", 10, Some(Part(5, 10))),
        ("bytes=10-", 10, Some(Unsatisfiable)),
        ("bytes=-0", 10, Some(Unsatisfiable)),
        ("bytes=-1", 0, Some(Unsatisfiable)),
        ("BYTES = 1-2", 10, Some(Part(1, 3))),
        ("bytes=3-2", 10, None),
        ("bytes=1-2,4-5", 10, None),
        ("items=1-2", 10, None),
        ("bytes=a-b", 10, None),
        ("bytes=+1-2", 10, None),
        ("bytes=99999999999999999999-", 10, None),
        (
            "bytes=18446744073709551615-18446744073709551615",
            10,
            Some(Unsatisfiable),
        ),
    ] {
        let got = RangeSpec::parse(text.as_bytes()).map(|r| r.resolve(len));
        assert_eq!(got, want, "{text}");
    }
}

#[test]
fn file_names_are_sanitised() {
    for (uri, want) in [
        ("photo.jpg", Some("photo.jpg")),
        ("a/b/report%202026.pdf", Some("report 2026.pdf")),
        ("%22quoted%22%0d%0a.txt", Some("_quoted___.txt")),
        ("caf%C3%A9", Some("caf__")),
        ("..", None),
        ("", None),
        ("%", Some("%")),
        ("%zz", Some("%zz")),
    ] {
        assert_eq!(filename_of(uri).as_deref(), want, "{uri}");
    }
    assert_eq!(filename_of(&"x".repeat(1000)).unwrap().len(), FILENAME_MAX);
}

#[test]
fn if_none_match_gets_304_before_range() {
    let (fp, data) = object(1000);
    let path = srl_path(&ring(), &fp, NOW + 60, None);
    let tag = format!("\"{fp}\"");
    let mut input = get(
        &path,
        &format!("If-None-Match: {tag}\r\nRange: bytes=0-1\r\n"),
    );
    input.extend(get(&path, "If-None-Match: \"abc\", W/\"x\"\r\n"));
    input.extend(get(&path, "If-None-Match: *\r\n"));
    input.extend(get(
        &path,
        &format!("If-None-Match: \"0\", W/{}\r\n", tag.to_uppercase()),
    ));
    let (raw, statuses, _) = exchange(&[(fp, data.clone())], &input);
    assert_eq!(statuses, [304, 200, 304, 304]);
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with(&format!("HTTP/1.1 304 Not Modified\r\nETag: {tag}\r\n")));
    // A missing object is still 404, whatever the precondition.
    let (other, _) = object(5);
    let missing = srl_path(&ring(), &other, NOW + 60, None);
    let (_, statuses, _) = exchange(&[(fp, data)], &get(&missing, "If-None-Match: *\r\n"));
    assert_eq!(statuses, [404]);
}

#[test]
fn absolute_form_targets_are_read_for_their_path() {
    let (fp, data) = object(100);
    let path = srl_path(&ring(), &fp, NOW + 60, Some("a.txt"));
    let input = format!("GET http://node:8080{path}?x=1 HTTP/1.1\r\n\r\n").into_bytes();
    let (raw, statuses, _) = exchange(&[(fp, data.clone())], &input);
    assert_eq!(statuses, [200]);
    assert_eq!(responses(&raw, false)[0].2, data);
    assert_eq!(split_srl("http://host"), None);
    assert_eq!(split_srl("https://host/a/b"), Some(("a", "b", "")));
}
