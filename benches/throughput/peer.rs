//! The durable peer: the thinnest durable TCP server, run as a child process (this same
//! bench binary, re-executed with `--durable-peer DIR`) so its CPU time can be read
//! from `/proc` apart from the load generator's.
//!
//! Per object it receives the bytes into a file on the same filesystem as dosd's disks
//! and fdatasyncs it before acknowledging (durable, like a dosd STORE); for a fetch it
//! reads the file back and sends it. No protocol, no hashing, no index: the ceiling the
//! hardware gives. One thread per connection, so concurrent clients fdatasync
//! concurrently and the filesystem's journal batches what it can.
//!
//! Framing: u64 op (0 store, 1 fetch, 2 store and compute the MD5 of what arrives, as
//! dosd must), u64 id, u64 len (all little-endian), then the data for a store. A store
//! is answered with one byte, a fetch with the file's bytes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The argument that makes the bench binary run as the peer.
pub const PEER_ARG: &str = "--durable-peer";

pub const OP_STORE: u64 = 0;
pub const OP_FETCH: u64 = 1;
pub const OP_STORE_MD5: u64 = 2;

/// The peer process, killed on drop.
pub struct Peer {
    child: Child,
    pub addr: String,
}

impl Peer {
    /// Starts the peer on `dir` and waits for its address.
    pub fn start(dir: &Path) -> Peer {
        let exe = std::env::current_exe().expect("bench executable path");
        let mut child = Command::new(exe)
            .arg(PEER_ARG)
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the durable peer");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("peer stdout piped"))
            .read_line(&mut line)
            .expect("read the peer's address");
        assert!(!line.trim().is_empty(), "the durable peer exited at start");
        Peer {
            child,
            addr: line.trim().to_string(),
        }
    }

    pub fn cpu_s(&self) -> f64 {
        super::load::process_cpu_s(self.child.id())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One client connection to the peer.
pub struct PeerConn(TcpStream);

impl PeerConn {
    pub fn connect(addr: &str) -> Result<PeerConn, String> {
        let s = TcpStream::connect(addr).map_err(|e| format!("connect peer {addr}: {e}"))?;
        s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        Ok(PeerConn(s))
    }

    fn head(&mut self, op: u64, id: u64, len: u64) -> Result<(), String> {
        let mut head = [0u8; 24];
        for (k, w) in [op, id, len].into_iter().enumerate() {
            head[k * 8..k * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        self.0
            .write_all(&head)
            .map_err(|e| format!("peer send: {e}"))
    }

    /// Stores `data` as object `id` (durably, before the answer comes back).
    pub fn store(&mut self, op: u64, id: u64, data: &[u8]) -> Result<(), String> {
        self.head(op, id, data.len() as u64)?;
        self.0
            .write_all(data)
            .map_err(|e| format!("peer send: {e}"))?;
        let mut ack = [0u8; 1];
        self.0
            .read_exact(&mut ack)
            .map_err(|e| format!("peer ack: {e}"))
    }

    /// Fetches object `id` of `buf.len()` bytes into `buf`.
    pub fn fetch(&mut self, id: u64, buf: &mut [u8]) -> Result<(), String> {
        self.head(OP_FETCH, id, buf.len() as u64)?;
        self.0
            .read_exact(buf)
            .map_err(|e| format!("peer fetch: {e}"))
    }
}

/// The peer process's main: serves until its standard input closes (the bench ended).
pub fn serve(dir: PathBuf) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind peer");
    println!("{}", listener.local_addr().expect("peer address"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(s) = stream else { continue };
            let dir = dir.clone();
            std::thread::spawn(move || serve_connection(s, &dir));
        }
    });
    // The parent holds our stdin; when it goes away, so do we.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

fn serve_connection(mut s: TcpStream, dir: &Path) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let mut head = [0u8; 24];
        if s.read_exact(&mut head).is_err() {
            return;
        }
        let word =
            |i: usize| u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let (op, id, len) = (word(0), word(1), word(2));
        let path = dir.join(format!("obj{id}"));
        if op == OP_STORE || op == OP_STORE_MD5 {
            let mut f = std::fs::File::create(&path).expect("peer file");
            let mut md5 = (op == OP_STORE_MD5).then(<md5::Md5 as md5::Digest>::new);
            let mut left = len as usize;
            while left > 0 {
                let n = left.min(buf.len());
                if s.read_exact(&mut buf[..n]).is_err() {
                    return;
                }
                if let Some(m) = md5.as_mut() {
                    md5::Digest::update(m, &buf[..n]);
                }
                f.write_all(&buf[..n]).expect("peer write");
                left -= n;
            }
            if let Some(m) = md5 {
                std::hint::black_box(md5::Digest::finalize(m));
            }
            f.sync_data().expect("peer fdatasync");
            if s.write_all(&[1]).is_err() {
                return;
            }
        } else {
            let mut f = std::fs::File::open(&path).expect("peer open");
            loop {
                let n = f.read(&mut buf).expect("peer read");
                if n == 0 {
                    break;
                }
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
