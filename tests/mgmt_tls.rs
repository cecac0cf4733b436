//! The management REST API over HTTPS (`--mgmt-tls-cert`/`--mgmt-tls-key`) of a real
//! `dosd` process: GETs and `/metrics` over TLS 1.3 and 1.2, the bearer token on a POST
//! as before, plain HTTP and silent clients turned away without holding anyone up,
//! `curl --cacert` where curl is installed, and bad certificate files stopping the
//! node with an error naming the file.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;

const TOKEN: &str = "tls-test-token-0123456789";

/// A self-signed certificate for `localhost` and 127.0.0.1, made fresh, and its key
/// (PKCS#8), written with `key_mode`.
struct Pki {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

fn make_pki(dir: &Path, key_mode: u32) -> Pki {
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("make a certificate");
    std::fs::create_dir_all(dir).unwrap();
    let cert = dir.join("mgmt-cert.pem");
    let key = dir.join("mgmt-key.pem");
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(key_mode)
        .open(&key)
        .and_then(|mut f| f.write_all(made.key_pair.serialize_pem().as_bytes()))
        .unwrap();
    Pki {
        cert,
        key,
        der: made.cert.der().clone(),
    }
}

/// A client that trusts only `pki`'s certificate, speaking only `versions`.
fn client(
    pki: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

#[derive(Debug)]
struct Resp {
    status: u16,
    body: String,
    /// The TLS version the exchange used.
    version: Option<rustls::ProtocolVersion>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// One HTTPS exchange, one request per connection (Connection: close).
fn https(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<Resp, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::clone(config), name)
        .map_err(|e| format!("client: {e}"))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    tls.write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        // A peer that closes without close_notify: the response is whole all the same
        // (Connection: close, and its length is checked below by parsing).
        Err(e) if e.kind() == ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(format!("read: {e}")),
    }
    let version = tls.conn.protocol_version();
    let text = String::from_utf8(raw).map_err(|e| format!("not UTF-8: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no response head in {text:?}"))?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    Ok(Resp {
        status,
        body: body.to_string(),
        version,
    })
}

/// `dosd_mgmt_tls_handshake_failures_total` from `/metrics`.
fn handshake_failures(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> u64 {
    let r = https(addr, config, "GET", "/metrics", None).unwrap();
    assert_eq!(r.status, 200);
    r.body
        .lines()
        .find_map(|l| l.strip_prefix("dosd_mgmt_tls_handshake_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no handshake failure counter in {}", r.body))
}

#[test]
fn rest_over_https_with_the_token_as_before() {
    let dir = tempfile::tempdir().unwrap();
    // Readable by the group: the node starts and warns.
    let pki = make_pki(dir.path(), 0o640);
    let node = Node::start(
        &dir.path().join("data"),
        &unique_group(),
        &[
            "--mgmt-token",
            TOKEN,
            "--mgmt-tls-cert",
            pki.cert.to_str().unwrap(),
            "--mgmt-tls-key",
            pki.key.to_str().unwrap(),
        ],
    );
    let log = node.log();
    assert!(
        log.contains(&format!("https://{}", node.mgmt)),
        "the ready line says HTTPS: {log}"
    );
    assert!(
        log.contains("the management TLS key file is readable by group or others"),
        "{log}"
    );
    let tls13 = client(&pki, &[&rustls::version::TLS13]);
    let tls12 = client(&pki, &[&rustls::version::TLS12]);

    for (config, version) in [
        (&tls13, rustls::ProtocolVersion::TLSv1_3),
        (&tls12, rustls::ProtocolVersion::TLSv1_2),
    ] {
        let r = https(node.mgmt, config, "GET", "/v1/disks", None).unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.version, Some(version));
        assert!(
            r.json().to_string().contains("\"state\":\"online\""),
            "{r:?}"
        );
    }
    let m = https(node.mgmt, &tls13, "GET", "/metrics", None).unwrap();
    assert_eq!(m.status, 200);
    assert!(m
        .body
        .contains("# TYPE dosd_mgmt_tls_handshake_failures_total counter\n"));
    assert_eq!(handshake_failures(node.mgmt, &tls13), 0);

    // The bearer token works over TLS as over plain HTTP.
    let r = https(node.mgmt, &tls13, "POST", "/v1/disks/0/offline", None).unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    let r = https(
        node.mgmt,
        &tls13,
        "POST",
        "/v1/disks/0/offline",
        Some("wrong"),
    )
    .unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    let r = https(
        node.mgmt,
        &tls13,
        "POST",
        "/v1/disks/0/offline",
        Some(TOKEN),
    )
    .unwrap();
    assert_eq!(
        (r.status, &r.json()["state"]),
        (200, &Value::from("offline"))
    );
    let r = https(node.mgmt, &tls12, "POST", "/v1/disks/0/online", Some(TOKEN)).unwrap();
    assert_eq!(
        (r.status, &r.json()["state"]),
        (200, &Value::from("online"))
    );

    // Clients that connect and say nothing hold up nobody.
    let silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(node.mgmt).unwrap())
        .collect();
    let r = https(node.mgmt, &tls13, "GET", "/v1/health", None).unwrap();
    assert_eq!(r.status, 200, "{r:?}");

    // Plain HTTP to the port gets no HTTP answer: the handshake fails and is counted.
    let mut plain = TcpStream::connect(node.mgmt).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(b"GET /v1/disks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // A client that does not trust the certificate gives up on the handshake too.
    let stranger = client(
        &make_pki(&dir.path().join("stranger"), 0o600),
        &[&rustls::version::TLS13],
    );
    assert!(https(node.mgmt, &stranger, "GET", "/v1/disks", None).is_err());
    let deadline = Instant::now() + Duration::from_secs(10);
    while handshake_failures(node.mgmt, &tls13) < 2 {
        assert!(Instant::now() < deadline, "handshake failures not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(silent);

    // An independent client (OpenSSL's, by curl), where there is one.
    if Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok()
    {
        let base = format!("https://{}", node.mgmt);
        let curl = |args: &[&str]| {
            Command::new("curl")
                .args(["-sS", "--max-time", "20"])
                .args(args)
                .output()
                .expect("run curl")
        };
        let cacert = pki.cert.to_str().unwrap();
        let o = curl(&["--fail", "--cacert", cacert, &format!("{base}/v1/disks")]);
        assert!(o.status.success(), "curl: {}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).expect("JSON from curl");
        assert!(v.to_string().contains("\"state\":\"online\""));
        let o = curl(&[
            "--fail",
            "--cacert",
            cacert,
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {TOKEN}"),
            &format!("{base}/v1/disks/1/online"),
        ]);
        assert!(o.status.success(), "curl POST: {}", stderr(&o));
        // Without the certificate curl refuses the node; plain http:// gets nothing.
        assert!(!curl(&[&format!("{base}/v1/disks")]).status.success());
        let o = curl(&[&format!("http://{}/v1/disks", node.mgmt)]);
        assert!(!o.status.success(), "plain HTTP answered: {}", stdout(&o));
    } else {
        eprintln!("curl not installed: its part of the test is skipped");
    }

    // Still serving, and it stops cleanly.
    let r = https(node.mgmt, &tls12, "GET", "/v1/node", None).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let mut node = node;
    assert_eq!(node.terminate(), Some(0), "{}", node.log());
}

/// Runs `dosd` with `args` until it exits (bounded); its exit code and stderr.
fn run_to_exit(data_dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let stderr_log = data_dir.with_extension("stderr.log");
    let mut child = Command::new(dosd_bin())
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--disks", "2", "--disk-size", "64M"])
        .args(["--listen", "127.0.0.1:0", "--mgmt-listen", "127.0.0.1:0"])
        .args([
            "--multicast",
            &unique_group(),
            "--multicast-if",
            "127.0.0.1",
        ])
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_log).unwrap())
        .spawn()
        .expect("spawn dosd");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("dosd {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code(),
        std::fs::read_to_string(&stderr_log).unwrap_or_default(),
    )
}

#[test]
fn bad_certificate_files_stop_the_node_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = make_pki(&d.join("good"), 0o600);
    let other = make_pki(&d.join("other"), 0o600);
    let missing = d.join("missing.pem");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, String, &str)> = vec![
        (
            vec![
                "--mgmt-tls-cert".into(),
                s(&missing),
                "--mgmt-tls-key".into(),
                s(&good.key),
            ],
            s(&missing),
            "cannot read certificate file",
        ),
        (
            // The key given as the certificate.
            vec![
                "--mgmt-tls-cert".into(),
                s(&good.key),
                "--mgmt-tls-key".into(),
                s(&good.key),
            ],
            s(&good.key),
            "no certificate",
        ),
        (
            vec![
                "--mgmt-tls-cert".into(),
                s(&good.cert),
                "--mgmt-tls-key".into(),
                s(&good.cert),
            ],
            s(&good.cert),
            "no private key",
        ),
        (
            vec![
                "--mgmt-tls-cert".into(),
                s(&good.cert),
                "--mgmt-tls-key".into(),
                s(&other.key),
            ],
            s(&other.key),
            "does not hold the private key",
        ),
        (
            vec!["--mgmt-tls-cert".into(), s(&good.cert)],
            s(&good.cert),
            "--mgmt-tls-key",
        ),
    ];
    for (i, (args, names, says)) in cases.into_iter().enumerate() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = run_to_exit(&d.join(format!("data{i}")), &args);
        assert!(code.is_some_and(|c| c != 0), "{args:?}: exit {code:?}");
        let line = err
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("{args:?}: no error line in {err}"));
        assert!(line.contains(&names), "{line}");
        assert!(line.contains(says), "{line}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
