//! Signed URLs over HTTP against a real keyed node (issue 12 part 3, dosp/HTTP.md):
//! `curl` fetches whole objects, ranges and heads of URLs made by `dosp url`, several
//! requests on one connection, a browser-style request with a file name, refusals
//! (expired, tampered, wrong object, 416), each body checked with `md5sum`, and the
//! responses counted in /metrics.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{data, dosp_bin, md5sum, stdout, unique_group, Node};
use dosp::auth::{srl_path, KeyRing};
use dosp::signed::now_ms;
use dosp::Fingerprint;

const KEY: &str = "k1 0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

fn key_file(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("keys");
    std::fs::write(&path, format!("{KEY}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Stores `bytes` with the keyed CLI; returns the fingerprint (by `md5sum`).
fn store(node: &Node, keys: &Path, dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let out = node.dosp(&[
        "--key-file",
        keys.to_str().unwrap(),
        "store",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    md5sum(&path)
}

fn url(node: &Node, keys: &Path, md5: &str, extra: &[&str]) -> String {
    let base = format!("http://{}", node.http.expect("node serves HTTP"));
    let mut args = vec![
        "--key-file",
        keys.to_str().unwrap(),
        "url",
        md5,
        "--ttl",
        "60",
        "--base",
        &base,
    ];
    args.extend_from_slice(extra);
    let out = Command::new(dosp_bin()).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    stdout(&out)
}

/// Runs curl; returns (status code, body file's md5, response headers).
fn curl(dir: &Path, args: &[&str]) -> (u16, String, String) {
    let body = dir.join("body");
    let heads = dir.join("heads");
    let _ = std::fs::remove_file(&body);
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&heads)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let code = stdout(&out).parse().unwrap_or(0);
    if !body.exists() {
        std::fs::write(&body, b"").unwrap();
    }
    let md5 = md5sum(&body);
    (
        code,
        md5,
        std::fs::read_to_string(&heads).unwrap_or_default(),
    )
}

fn header(heads: &str, name: &str) -> Option<String> {
    heads.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

fn md5_of(dir: &Path, bytes: &[u8]) -> String {
    let p = dir.join("expected");
    std::fs::write(&p, bytes).unwrap();
    md5sum(&p)
}

fn http_count(node: &Node, status: u16) -> u64 {
    metric(
        node,
        &format!("dosd_http_requests_total{{status=\"{status}\"}} "),
    )
}

/// The value of the /metrics line starting with `key` (name, labels and a space).
fn metric(node: &Node, key: &str) -> u64 {
    node.get_text("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn signed_urls_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let node = Node::start(
        &dir.path().join("node"),
        &unique_group(),
        &[
            "--cluster-key-file",
            keys.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
        ],
    );
    let big = data(1, 3 * 1024 * 1024 + 17);
    let small = data(2, 4096);
    let big_md5 = store(&node, &keys, dir.path(), "big", &big);
    let small_md5 = store(&node, &keys, dir.path(), "small", &small);
    let big_url = url(&node, &keys, &big_md5, &["--name", "holiday photo.jpg"]);
    let small_url = url(&node, &keys, &small_md5, &[]);

    // Whole objects, checked by an independent MD5, with their headers.
    let (code, got, heads) = curl(dir.path(), &[&big_url]);
    assert_eq!((code, got.as_str()), (200, big_md5.as_str()), "{heads}");
    assert_eq!(header(&heads, "etag").unwrap(), format!("\"{big_md5}\""));
    assert_eq!(
        header(&heads, "content-length").unwrap(),
        big.len().to_string()
    );
    assert!(header(&heads, "content-md5").is_some());
    assert_eq!(header(&heads, "accept-ranges").unwrap(), "bytes");
    assert_eq!(
        header(&heads, "content-disposition").unwrap(),
        "inline; filename=\"holiday photo.jpg\""
    );
    // A browser shows it as the image its name says, and sniffs nothing.
    assert_eq!(header(&heads, "content-type").unwrap(), "image/jpeg");
    assert_eq!(header(&heads, "x-content-type-options").unwrap(), "nosniff");

    // Ranges: a-b, a-, -n; unsatisfiable.
    for (range, part) in [
        ("1000-1999999", &big[1000..2_000_000]),
        ("3145000-", &big[3_145_000..]),
        ("-100", &big[big.len() - 100..]),
    ] {
        let (code, got, heads) = curl(dir.path(), &["-r", range, &big_url]);
        assert_eq!(code, 206, "{range}: {heads}");
        assert_eq!(got, md5_of(dir.path(), part), "{range}");
        assert!(header(&heads, "content-range").is_some());
    }
    let (code, _, heads) = curl(dir.path(), &["-r", "99999999-", &big_url]);
    assert_eq!(code, 416);
    assert_eq!(
        header(&heads, "content-range").unwrap(),
        format!("bytes */{}", big.len())
    );

    // HEAD: the headers, no body.
    // (`curl -I` writes the head where the body would go: no object bytes follow it.)
    let (code, _, heads) = curl(dir.path(), &["-I", &small_url]);
    assert_eq!(code, 200);
    let written = std::fs::read(dir.path().join("body")).unwrap();
    assert!(written.ends_with(b"\r\n\r\n"), "{heads}");
    assert_eq!(header(&heads, "content-length").unwrap(), "4096");

    // A cache revalidating: the ETag still matches, 304 without a body.
    let inm = format!("If-None-Match: \"{small_md5}\"");
    let (code, _, heads) = curl(dir.path(), &["-H", &inm, &small_url]);
    assert_eq!(code, 304, "{heads}");
    assert_eq!(http_count(&node, 304), 1);

    // Keep-alive: three requests on one connection (curl reuses it and says so).
    let out = Command::new("curl")
        .args([
            "-s",
            "-v",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
        ])
        .args(["-o", "/dev/null", &small_url, &big_url, &small_url])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(log.matches("< HTTP/1.1 200").count(), 3, "{log}");
    assert!(log.contains("Re-using existing connection"), "{log}");

    // Raw: two pipelined requests, then one with Connection: close.
    let path = small_url
        .split_once(&node.http.unwrap().to_string())
        .unwrap()
        .1;
    let mut s = TcpStream::connect(node.http.unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n\
         HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n\
         GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 3, "{text}");
    assert!(
        raw.ends_with(&small),
        "the last response carries the object"
    );

    // A browser-style request.
    let (code, got, _) = curl(
        dir.path(),
        &[
            "-H",
            "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0",
            "-H",
            "Accept: text/html,application/xhtml+xml,*/*;q=0.8",
            "-H",
            "Accept-Encoding: gzip, deflate, br",
            "-H",
            "Accept-Language: en-GB,en;q=0.5",
            &big_url,
        ],
    );
    assert_eq!((code, got), (200, big_md5.clone()));

    // Refusals: 403 expired, tampered, wrong object; 404 a missing object.
    let ring = KeyRing::parse(KEY).unwrap();
    let fp: Fingerprint = small_md5.parse().unwrap();
    let base = format!("http://{}", node.http.unwrap());
    let expired = format!("{base}{}", srl_path(&ring, &fp, now_ms() / 1000 - 1, None));
    let (prefix, rest) = big_url.rsplit_once('/').unwrap();
    let (head, sig) = prefix.rsplit_once('/').unwrap();
    let mut bad_sig = sig.as_bytes().to_vec();
    bad_sig[5] = if bad_sig[5] == b'A' { b'B' } else { b'A' };
    let tampered = format!("{head}/{}/{rest}", String::from_utf8(bad_sig).unwrap());
    let (_, small_req) = small_url
        .rsplit_once('/')
        .unwrap()
        .0
        .rsplit_once('/')
        .unwrap()
        .0
        .rsplit_once('/')
        .unwrap();
    let wrong_object = format!("{base}/{small_req}/{sig}/{rest}");
    let before = http_count(&node, 403);
    let auth_failed = |reason: &str| {
        metric(
            &node,
            &format!("dosd_auth_failed_total{{reason=\"{reason}\"}} "),
        )
    };
    let (cert_before, expired_before) =
        (auth_failed("bad_certificate"), auth_failed("token_expired"));
    for (what, u, reason) in [
        ("expired", &expired, "expired"),
        ("tampered", &tampered, "bad signature"),
        ("wrong object", &wrong_object, "bad signature"),
    ] {
        let body = dir.path().join("body");
        let (code, _, _) = curl(dir.path(), &[u]);
        assert_eq!(code, 403, "{what}");
        assert_eq!(
            std::fs::read_to_string(body).unwrap().trim(),
            reason,
            "{what}"
        );
    }
    assert_eq!(http_count(&node, 403), before + 3);
    // Counted by reason as refused DOSP requests are.
    assert_eq!(auth_failed("bad_certificate"), cert_before + 2);
    assert_eq!(auth_failed("token_expired"), expired_before + 1);
    let missing: Fingerprint = md5_of(dir.path(), b"never stored").parse().unwrap();
    let missing = format!(
        "{base}{}",
        srl_path(&ring, &missing, now_ms() / 1000 + 60, None)
    );
    assert_eq!(curl(dir.path(), &[&missing]).0, 404);
    assert_eq!(curl(dir.path(), &["-X", "POST", &small_url]).0, 405);

    // HTTP responses are load like DOSP replies.
    let ops = metric(&node, "dosd_ops_total ");
    assert_eq!(curl(dir.path(), &[&small_url]).0, 200);
    assert!(metric(&node, "dosd_ops_total ") > ops);

    // Every response so far counted.
    assert!(http_count(&node, 200) >= 9);
    assert_eq!(http_count(&node, 206), 4);
    assert_eq!(http_count(&node, 416), 1);
    assert_eq!(http_count(&node, 404), 1);
    assert_eq!(http_count(&node, 405), 1);
}

#[test]
fn http_needs_a_cluster_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::dosd_bin())
        .arg("--data-dir")
        .arg(dir.path().join("node"))
        .args(["--listen", "127.0.0.1:0", "--mgmt-listen", "127.0.0.1:0"])
        .args(["--http-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster_key_file"), "{err}");
}

#[test]
fn a_slow_client_times_out_without_holding_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let node = Node::start(
        &dir.path().join("node"),
        &unique_group(),
        &[
            "--cluster-key-file",
            keys.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
            "--header-timeout-ms",
            "300",
        ],
    );
    let md5 = store(&node, &keys, dir.path(), "obj", &data(3, 1000));
    let u = url(&node, &keys, &md5, &[]);
    // A head that never ends.
    let mut slow = TcpStream::connect(node.http.unwrap()).unwrap();
    slow.write_all(b"GET /abc HTTP/1.1\r\nHost: x\r\n").unwrap();
    // Others are served meanwhile.
    let (code, got, _) = curl(dir.path(), &[&u]);
    assert_eq!((code, got), (200, md5));
    // The slow one is closed once its head is late.
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = slow.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without a response");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn signed_urls_across_two_loops() {
    // Two dataplane loops: connections land on either, objects live in either shard,
    // so lookups and reads cross loops (and pieces are lent across them).
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let node = Node::start(
        &dir.path().join("node"),
        &unique_group(),
        &[
            "--cluster-key-file",
            keys.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
            "--dataplane-cores",
            "2",
        ],
    );
    let objects: Vec<(String, Vec<u8>)> = (0..8u64)
        .map(|i| {
            let bytes = data(10 + i, (i as usize) * 150_000 + 5);
            let md5 = store(&node, &keys, dir.path(), &format!("o{i}"), &bytes);
            (md5, bytes)
        })
        .collect();
    for _ in 0..3 {
        for (md5, bytes) in &objects {
            let u = url(&node, &keys, md5, &[]);
            let (code, got, _) = curl(dir.path(), &[&u]);
            assert_eq!((code, got.as_str()), (200, md5.as_str()));
            if bytes.len() > 300_000 {
                let (code, got, _) = curl(dir.path(), &["-r", "262100-300000", &u]);
                assert_eq!(code, 206);
                assert_eq!(got, md5_of(dir.path(), &bytes[262_100..300_001]));
            }
        }
    }
}

#[test]
fn a_reader_too_slow_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let node = Node::start(
        &dir.path().join("node"),
        &unique_group(),
        &[
            "--cluster-key-file",
            keys.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
            "--transfer-rate-min",
            "1M",
            "--request-timeout-ms",
            "500",
        ],
    );
    // Larger than what loopback's socket buffers absorb.
    let md5 = store(&node, &keys, dir.path(), "big", &data(4, 40 << 20));
    let u = url(&node, &keys, &md5, &[]);
    let path = u.split_once(&node.http.unwrap().to_string()).unwrap().1;
    let mut s = TcpStream::connect(node.http.unwrap()).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // Read nothing for a while: the node must give up on us.
    std::thread::sleep(Duration::from_secs(4));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(got < 40 << 20, "the whole object arrived: not closed");
    // Others are still served.
    let small = store(&node, &keys, dir.path(), "small", &data(5, 1000));
    let (code, got, _) = curl(dir.path(), &[&url(&node, &keys, &small, &[])]);
    assert_eq!((code, got), (200, small));
}

#[test]
fn a_disk_failing_mid_body_closes_the_connection_short() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let node = Node::start_bare(
        &dir.path().join("node"),
        &unique_group(),
        &[
            "--disks",
            "1",
            "--disk-size",
            "128M",
            "--cache-bytes",
            "0",
            "--fault-inject-disk",
            "0",
            "--cluster-key-file",
            keys.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
        ],
    );
    let len = 48usize << 20;
    let md5 = store(&node, &keys, dir.path(), "big", &data(6, len));
    let u = url(&node, &keys, &md5, &[]);
    let path = u.split_once(&node.http.unwrap().to_string()).unwrap().1;
    let mut s = TcpStream::connect(node.http.unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut got = s.read(&mut buf).unwrap();
    assert!(buf.starts_with(b"HTTP/1.1 200"));
    // The disk fails while the body streams.
    let status = Command::new("kill")
        .args(["-USR1", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(500));
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("the node must close, not hang: {e}"),
        }
    }
    assert!(got < len, "a short body: {got} bytes");
    // A new request for it: the first piece fails, a proper status.
    let (code, _, _) = curl(dir.path(), &[&u]);
    assert_eq!(code, 503);
    assert!(http_count(&node, 503) >= 1);
}

#[test]
fn idle_http_connections_make_room_for_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let node = Node::start(
        &dir.path().join("node"),
        &unique_group(),
        &[
            "--cluster-key-file",
            keys.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
            "--connections-max",
            "2",
        ],
    );
    let small = data(7, 500);
    let md5 = store(&node, &keys, dir.path(), "small", &small);
    let u = url(&node, &keys, &md5, &[]);
    let path = u.split_once(&node.http.unwrap().to_string()).unwrap().1;
    // Two keep-alive connections, each idle after one request: the table is full.
    let mut idle: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(node.http.unwrap()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            while got < small.len() {
                got += s.read(&mut buf).unwrap();
            }
            s
        })
        .collect();
    // A DOSP client and a new HTTP client still get in: idle ones are closed.
    let out = node.dosp(&["--key-file", keys.to_str().unwrap(), "ping"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let (code, got, _) = curl(dir.path(), &[&u]);
    assert_eq!((code, got), (200, md5));
    // At least one idle connection was closed to make room (the DOSP client's
    // connection was gone by the time curl came).
    let closed = idle
        .iter_mut()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 16];
            matches!((&**s).read(&mut buf), Ok(0))
        })
        .count();
    assert!(closed >= 1, "no idle connection was closed");
    assert!(http_count(&node, 200) >= 3);
}

#[test]
fn double_md5_urls_are_served_only_where_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let k = keys.to_str().unwrap();
    let strict = Node::start(
        &dir.path().join("strict"),
        &unique_group(),
        &["--cluster-key-file", k, "--http-listen", "127.0.0.1:0"],
    );
    let compat = Node::start(
        &dir.path().join("compat"),
        &unique_group(),
        &[
            "--cluster-key-file",
            k,
            "--http-listen",
            "127.0.0.1:0",
            "--auth-allow-md5",
        ],
    );
    let bytes = data(9, 200_000);
    for node in [&strict, &compat] {
        store(node, &keys, dir.path(), "obj", &bytes);
    }
    let md5 = md5sum(&dir.path().join("obj"));
    let md5_url = |node: &Node| url(node, &keys, &md5, &["--auth-mode", "md5"]);
    // The specification's certificate: 32 hex digits where HMAC's 43 base64url are.
    let u = md5_url(&compat);
    let signature = u.rsplit('/').nth(1).unwrap();
    assert_eq!(signature.len(), 32, "{u}");
    assert!(signature.bytes().all(|b| b.is_ascii_hexdigit()), "{u}");
    let (code, got, _) = curl(dir.path(), &[&u]);
    assert_eq!((code, got.as_str()), (200, md5.as_str()));
    let (code, _, _) = curl(dir.path(), &["-r", "100-199", &u]);
    assert_eq!(code, 206);
    assert_eq!(
        std::fs::read(dir.path().join("body")).unwrap(),
        bytes[100..200]
    );
    // A node that does not allow double MD5 refuses it, and counts it as a mode
    // refusal; HMAC URLs still work there.
    let mode = "dosd_auth_failed_total{reason=\"mode\"} ";
    let before = metric(&strict, mode);
    let (code, _, _) = curl(dir.path(), &[&md5_url(&strict)]);
    assert_eq!(code, 403);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("body")).unwrap(),
        "double MD5 not accepted\n"
    );
    assert_eq!(metric(&strict, mode), before + 1);
    let (code, got, _) = curl(dir.path(), &[&url(&strict, &keys, &md5, &[])]);
    assert_eq!((code, got.as_str()), (200, md5.as_str()));
}
