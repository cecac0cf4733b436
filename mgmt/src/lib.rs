//! The management core: the node's window for operators, never on the data path.
//!
//! In this first cut it serves a minimal HTTP/1.1 endpoint on its own thread (core 0):
//! `GET /v1/node` (identity, epoch, uptime, version) and `GET /metrics` (every dataplane
//! counter in the Prometheus text format), read from the dataplane's shared atomic
//! counters. Disk status over REST, health, announcements and failover build on this
//! (issue 3). What it must never do: touch a disk or a data-path socket.
#![deny(unsafe_code)]

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dataplane::handle::DataplaneHandle;
use dataplane::stats::NodeStats;

/// A running management core.
#[derive(Debug)]
pub struct Mgmt {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    stats: Arc<NodeStats>,
    node_id: u64,
    epoch: u64,
    started: Instant,
}

/// Longest request head we read; anything bigger is refused.
const REQUEST_HEAD_MAX: usize = 8 * 1024;

impl Mgmt {
    pub fn start(
        addr: SocketAddr,
        handle: DataplaneHandle,
        node_id: u64,
        epoch: u64,
    ) -> io::Result<Mgmt> {
        let stats = Arc::clone(&handle.stats);
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Shared {
            stats,
            node_id,
            epoch,
            started: Instant::now(),
        };
        let thread = std::thread::Builder::new().name("mgmt".into()).spawn({
            let stop = Arc::clone(&stop);
            move || serve(listener, &shared, &stop)
        })?;
        Ok(Mgmt {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, shared: &Shared, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = handle(stream, shared) {
                    tracing::debug!(error = %e, "management request failed");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                tracing::warn!(error = %e, "management accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn handle(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?.take(REQUEST_HEAD_MAX as u64));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Drain the header lines (bounded by the take() above).
    let mut h = String::new();
    while reader.read_line(&mut h)? > 2 {
        h.clear();
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, ctype, body) = match (method, path) {
        ("GET", "/v1/node") => (200, "application/json", node_json(shared)),
        ("GET", "/metrics") => (200, "text/plain; version=0.0.4", metrics(&shared.stats)),
        ("GET", _) => (
            404,
            "application/json",
            format!("{{\"error\":\"no such resource: {}\"}}", json_escape(path)),
        ),
        _ => (
            405,
            "application/json",
            "{\"error\":\"only GET is served here\"}".to_string(),
        ),
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

use std::io::Read;

fn json_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| match c {
            '"' => "\\\"".chars().collect::<Vec<_>>(),
            '\\' => "\\\\".chars().collect(),
            c if c.is_control() => format!("\\u{:04x}", c as u32).chars().collect(),
            c => vec![c],
        })
        .collect()
}

fn node_json(shared: &Shared) -> String {
    format!(
        "{{\"node_id\":\"{:016x}\",\"epoch\":{},\"uptime_ms\":{},\"version\":\"{}\",\"role\":\"standalone\"}}",
        shared.node_id,
        shared.epoch,
        shared.started.elapsed().as_millis(),
        env!("CARGO_PKG_VERSION")
    )
}

/// Every dataplane counter in the Prometheus text format.
pub fn metrics(s: &NodeStats) -> String {
    let counters: [(&str, &str, &std::sync::atomic::AtomicU64, bool); 21] = [
        (
            "dosd_connections",
            "Connections open now",
            &s.connections,
            false,
        ),
        (
            "dosd_connections_total",
            "Connections accepted",
            &s.connections_total,
            true,
        ),
        (
            "dosd_connections_refused_total",
            "Connections refused (table full)",
            &s.connections_refused,
            true,
        ),
        ("dosd_ops_total", "Requests completed", &s.ops_total, true),
        (
            "dosd_ops_outstanding",
            "Requests in progress",
            &s.ops_outstanding,
            false,
        ),
        ("dosd_bytes_in_total", "Bytes received", &s.bytes_in, true),
        ("dosd_bytes_out_total", "Bytes sent", &s.bytes_out, true),
        (
            "dosd_errors_total",
            "Replies with a non-success status",
            &s.errors_total,
            true,
        ),
        (
            "dosd_bad_requests_total",
            "Malformed input (connection closed)",
            &s.bad_requests,
            true,
        ),
        (
            "dosd_unknown_opcodes_total",
            "Requests with an unknown opcode",
            &s.unknown_opcodes,
            true,
        ),
        (
            "dosd_stores_aborted_total",
            "STOREs abandoned mid-stream",
            &s.stores_aborted,
            true,
        ),
        (
            "dosd_sessions_timed_out_total",
            "Connections closed after going quiet",
            &s.sessions_timed_out,
            true,
        ),
        (
            "dosd_checksum_mismatches_total",
            "Object data failing its checksum",
            &s.checksum_mismatches,
            true,
        ),
        ("dosd_stores_total", "STORE requests", &s.stores, true),
        (
            "dosd_retrieves_total",
            "RETRIEVE and RETRIEVE_RANGE requests",
            &s.retrieves,
            true,
        ),
        ("dosd_deletes_total", "DELETE requests", &s.deletes, true),
        (
            "dosd_udp_requests_total",
            "Datagram requests",
            &s.udp_requests,
            true,
        ),
        (
            "dosd_udp_bad_total",
            "Malformed datagrams dropped",
            &s.udp_bad,
            true,
        ),
        (
            "dosd_locate_answers_total",
            "LOCATE answers sent",
            &s.locate_answers,
            true,
        ),
        (
            "dosd_heartbeats_sent_total",
            "Heartbeats multicast",
            &s.heartbeats_sent,
            true,
        ),
        (
            "dosd_loop_turns_total",
            "Dataplane loop turns",
            &s.loop_turns,
            true,
        ),
    ];
    let mut out = String::new();
    for (name, help, v, counter) in counters {
        let kind = if counter { "counter" } else { "gauge" };
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n",
            NodeStats::get(v)
        ));
    }
    out
}
