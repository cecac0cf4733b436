//! A minimal HTTP/1.1 keep-alive client for the nginx rows: one connection, one GET in
//! flight, the body streamed through a fixed buffer to the caller (never held whole),
//! as the DOSP client does for dosd.
//!
//! It understands exactly what nginx sends for a static file: a status line, headers
//! with a Content-Length, and that many body bytes. Anything else is an error, so a
//! misconfigured server cannot pass for a fast one.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Receive buffer, the same size as the DOSP client's.
const BUF: usize = 1 << 20;
/// Longest response head accepted.
const HEAD_MAX: usize = 16 << 10;

pub struct HttpClient {
    addr: String,
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    request: Vec<u8>,
    /// The server said `Connection: close`: reconnect before the next request.
    closed: bool,
}

fn connect_stream(addr: &str) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_nodelay(true)
        .and_then(|_| stream.set_read_timeout(Some(Duration::from_secs(30))))
        .map_err(|e| format!("socket options for {addr}: {e}"))?;
    Ok(stream)
}

impl HttpClient {
    pub fn connect(addr: &str) -> Result<HttpClient, String> {
        Ok(HttpClient {
            addr: addr.to_string(),
            stream: connect_stream(addr)?,
            buf: vec![0; BUF],
            start: 0,
            end: 0,
            request: Vec::with_capacity(256),
            closed: false,
        })
    }

    /// GET `path`, the whole file or (`range`) `len` bytes at `offset`; each piece of
    /// the body goes to `each`. Returns the body length.
    pub fn get(
        &mut self,
        path: &str,
        range: Option<(u64, u64)>,
        each: &mut dyn FnMut(&[u8]),
    ) -> Result<u64, String> {
        if self.closed {
            self.stream = connect_stream(&self.addr)?;
            (self.start, self.end, self.closed) = (0, 0, false);
        }
        self.request.clear();
        let _ = write!(self.request, "GET {path} HTTP/1.1\r\nHost: bench\r\n");
        if let Some((offset, len)) = range {
            let last = offset + len - 1;
            let _ = write!(self.request, "Range: bytes={offset}-{last}\r\n");
        }
        self.request.extend_from_slice(b"\r\n");
        self.stream
            .write_all(&self.request)
            .map_err(|e| format!("send to {}: {e}", self.addr))?;

        let head_len = self.read_head()?;
        let head = std::str::from_utf8(&self.buf[self.start..self.start + head_len])
            .map_err(|_| "response head is not UTF-8".to_string())?;
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or_default();
        let want = if range.is_some() { "206" } else { "200" };
        if status.split_whitespace().nth(1) != Some(want) {
            return Err(format!("{path}: expected {want}, got {status:?}"));
        }
        let mut content_len = None;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_len = value.parse::<u64>().ok();
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close")
            {
                self.closed = true;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(format!("{path}: unexpected Transfer-Encoding {value}"));
            }
        }
        let len = content_len.ok_or_else(|| format!("{path}: no Content-Length"))?;
        if let Some((_, want_len)) = range {
            if len != want_len {
                return Err(format!(
                    "{path}: range of {want_len} bytes answered with {len}"
                ));
            }
        }
        self.start += head_len;

        // The body: first what came with the head, then straight from the socket,
        // never reading past this response.
        let mut left = len;
        let buffered = ((self.end - self.start) as u64).min(left) as usize;
        each(&self.buf[self.start..self.start + buffered]);
        self.start += buffered;
        left -= buffered as u64;
        while left > 0 {
            let want = (left as usize).min(self.buf.len());
            let n = self
                .stream
                .read(&mut self.buf[..want])
                .map_err(|e| format!("read from {}: {e}", self.addr))?;
            if n == 0 {
                return Err(format!("{} closed mid-body", self.addr));
            }
            each(&self.buf[..n]);
            left -= n as u64;
        }
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        Ok(len)
    }

    /// Reads until the buffer holds a whole response head; returns its length
    /// (including the blank line) from `start`.
    fn read_head(&mut self) -> Result<usize, String> {
        loop {
            let have = &self.buf[self.start..self.end];
            if let Some(at) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(at + 4);
            }
            if have.len() >= HEAD_MAX {
                return Err(format!("response head from {} too long", self.addr));
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = self
                .stream
                .read(&mut self.buf[self.end..])
                .map_err(|e| format!("read from {}: {e}", self.addr))?;
            if n == 0 {
                return Err(format!("{} closed the connection", self.addr));
            }
            self.end += n;
        }
    }
}
