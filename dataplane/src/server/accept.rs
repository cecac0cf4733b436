//! The DOSP listener: binding it with a backlog sized for the session table, and
//! taking connections off it.
//!
//! mio registers the listener edge-triggered: one readiness event says "connections
//! arrived", not "one connection". A loop that stops accepting before the kernel says
//! `WouldBlock` must come back by itself — no new event arrives for connections
//! already queued, and once the backlog is full none arrive at all (new SYNs are
//! dropped). So the loop drains the queue, at most [`ACCEPT_BURST`] per turn, and when
//! it stops early it asks to be called again ([`Pass::Bound`]).
//!
//! Out of descriptors, `accept` fails with EMFILE and the connection stays queued; a
//! loop that only logged and returned left the queue to fill, and the node never
//! accepted again. So the listener keeps a [`Reserve`]: one spare descriptor, let go
//! to accept one queued connection, answer it BUSY and close it, then taken back. The
//! queue drains, clients hear BUSY instead of hanging, and the loop comes back every
//! [`ACCEPT_RETRY`] until a descriptor can be had again. What it sees is published as
//! a [`ListenerState`](crate::stats::ListenerState) for the node's health rule.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use socket2::{Domain, Socket, Type};
use zerocopy::IntoBytes;

/// Connections accepted per loop turn at most; more wait for the next turn (which
/// comes at once, see [`Pass::Bound`]).
pub const ACCEPT_BURST: usize = 256;
/// The smallest listen backlog asked for, whatever `connections_max` is: a burst of
/// connects between two loop turns must not overflow a tiny queue.
pub const BACKLOG_MIN: u32 = 128;
/// While the listener is short of descriptors, how often the loop comes back to try
/// again (and to see whether descriptors are back).
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The listen backlog for a session table of `connections_max`: the table's size (a
/// full table's worth of clients may connect at once), at least [`BACKLOG_MIN`], and
/// no more than `somaxconn`, which the kernel would cap it to anyway.
pub fn backlog_for(connections_max: usize, somaxconn: Option<u32>) -> u32 {
    let want = u32::try_from(connections_max)
        .unwrap_or(u32::MAX)
        .max(BACKLOG_MIN);
    somaxconn.map_or(want, |cap| want.min(cap.max(1)))
}

/// The kernel's cap on listen backlogs, if it can be read.
fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Binds a non-blocking listener on `addr` with the backlog for `connections_max`.
/// (std's `TcpListener::bind` always asks for 128.) Returns it with the backlog used.
pub fn bind(addr: SocketAddr, connections_max: usize) -> io::Result<(TcpListener, u32)> {
    let mut group = bind_group(addr, connections_max, 1)?;
    group
        .pop()
        .ok_or_else(|| io::Error::other("no listener bound"))
}

/// `n` listeners on one address, one per dataplane loop, sharing it with SO_REUSEPORT:
/// the kernel spreads new connections over them by flow hash. The address is first
/// bound once *without* SO_REUSEPORT and released, so a second node started on the
/// same address fails with "address in use" instead of silently splitting the
/// connections with the first. A port of 0 is chosen by the first listener and
/// shared by the others.
pub fn bind_group(
    addr: SocketAddr,
    connections_max: usize,
    n: usize,
) -> io::Result<Vec<(TcpListener, u32)>> {
    if addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        probe.set_reuse_address(true)?;
        probe.bind(&addr.into())?;
        drop(probe);
    }
    let backlog = backlog_for(connections_max, somaxconn());
    let mut at = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, None)?;
        // As std does: a restarted node can bind while old connections sit in TIME_WAIT.
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&at.into())?;
        socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
        let l = TcpListener::from_std(socket.into());
        at = l.local_addr()?;
        out.push((l, backlog));
    }
    Ok(out)
}

/// One step of taking connections off the listener.
#[derive(Debug)]
pub enum Step {
    /// A new connection to admit.
    Connection(TcpStream, SocketAddr),
    /// The queue is empty (`WouldBlock`).
    Empty,
    /// Accepting failed; try again on a later turn.
    Failed(io::Error),
}

/// How an accept pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The queue is drained: wait for the next readiness event.
    Drained,
    /// The per-turn bound was hit: run again next turn without waiting for an event.
    Bound,
    /// Accepting failed for want of descriptors (or for a reason that is not one
    /// connection's) and the queue may still hold connections: run again after
    /// [`ACCEPT_RETRY`].
    Failed,
}

/// What became of one attempt to shed a connection on the reserve's slot.
#[derive(Debug)]
pub enum Shed {
    /// A queued connection was accepted, answered BUSY and closed.
    Refused(SocketAddr),
    /// The queue turned out empty.
    Empty,
    /// Not possible: no reserve to release, or `accept` failed even with its slot free.
    Cannot,
}

/// Takes the next connection off `listener`. Errors that belong to one connection
/// only (it was reset before it was accepted, a network error pending on it) are
/// skipped, as accept(2) asks: they say nothing about the next one.
pub fn next(listener: &TcpListener) -> Step {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => return Step::Connection(stream, peer),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Empty,
            Err(e) if per_connection(&e) => continue,
            Err(e) => return Step::Failed(e),
        }
    }
}

/// Errors that say the process (or the system) is short of a resource: descriptors,
/// socket buffers, memory. The connection stays queued.
pub fn is_shortage(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::OutOfMemory
        || matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
}

/// A spare file descriptor (an open `/dev/null`) held for the moment the process runs
/// out: released, it lets one `accept` succeed so that connection can be refused
/// properly instead of left queued.
#[derive(Debug)]
pub struct Reserve {
    file: Option<File>,
}

impl Reserve {
    /// Takes the spare. Failing here is a start-up error.
    pub fn new() -> io::Result<Reserve> {
        Ok(Reserve {
            file: Some(File::open("/dev/null")?),
        })
    }

    pub fn held(&self) -> bool {
        self.file.is_some()
    }

    /// Lets the spare go, so its slot is free for one `accept`.
    pub fn release(&mut self) {
        self.file = None;
    }

    /// Takes the spare back if it is not held; false if no descriptor can be had.
    pub fn retake(&mut self) -> bool {
        if self.file.is_none() {
            self.file = File::open("/dev/null").ok();
        }
        self.file.is_some()
    }

    /// Out of descriptors: frees the spare's slot, accepts one queued connection in it
    /// and refuses it (see [`refuse`]), then takes the spare back.
    pub fn shed_one(&mut self, listener: &TcpListener) -> Shed {
        if !self.retake() {
            return Shed::Cannot;
        }
        self.release();
        let shed = match next(listener) {
            Step::Connection(stream, peer) => {
                // Closed before the spare is taken back: it needs the same slot.
                refuse(stream, 0);
                Shed::Refused(peer)
            }
            Step::Empty => Shed::Empty,
            Step::Failed(_) => Shed::Cannot,
        };
        // Failing to take it back shows as `!held()` at the next shortage.
        self.retake();
        shed
    }

    /// Whether a descriptor can be had now besides the spare: one is opened and closed
    /// again. Called only while short, never on the normal path.
    pub fn spare_available(&mut self) -> bool {
        self.retake() && File::open("/dev/null").is_ok()
    }
}

/// The answer to a refused connection: one response with opcode NULL, request id 0
/// and status BUSY (dosp/PROTOCOL.md, "Connection limits"); `detail` is the
/// connection limit (0 when out of descriptors).
pub fn busy_reply(detail: u32) -> [u8; BUSY_REPLY_BYTES] {
    use dosp::wire::{Header, Kind, Opcode, OutHead, Status};
    let mut reply = [0u8; BUSY_REPLY_BYTES];
    let (head, out) = reply.split_at_mut(Header::SIZE);
    let len = size_of::<OutHead>() as u32;
    head.copy_from_slice(Header::new(Kind::Response, Opcode::Null, 0, len, 0).as_bytes());
    out.copy_from_slice(OutHead::new(Status::Busy, detail).as_bytes());
    reply
}

/// Size of [`busy_reply`]'s answer.
pub const BUSY_REPLY_BYTES: usize = dosp::wire::Header::SIZE + size_of::<dosp::wire::OutHead>();

/// Refuses a connection with [`busy_reply`], then closes it.
pub fn refuse(stream: TcpStream, detail: u32) {
    refuse_with(stream, &busy_reply(detail));
}

/// Sends `reply` on a fresh connection and closes it. Whatever the client already sent
/// is read first (once, bounded), so that the close is a FIN after the reply rather
/// than a reset that could destroy it.
pub fn refuse_with(mut stream: TcpStream, reply: &[u8]) {
    // A fresh socket's send buffer always has room for a short reply.
    let _ = stream.write(reply);
    let mut sink = [0u8; 512];
    let _ = stream.read(&mut sink);
}

/// Errors of one connection (or a signal), after which the next accept may succeed.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::PermissionDenied
    ) || matches!(
        e.raw_os_error(),
        Some(
            libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETDOWN
                | libc::ENETUNREACH
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_follows_the_table_within_the_kernel_cap() {
        assert_eq!(backlog_for(1024, Some(4096)), 1024);
        assert_eq!(backlog_for(10_000, Some(4096)), 4096);
        assert_eq!(backlog_for(16, Some(4096)), BACKLOG_MIN);
        assert_eq!(backlog_for(1024, None), 1024);
        assert_eq!(backlog_for(1024, Some(0)), 1);
    }

    #[test]
    fn shortages_are_told_from_other_errors() {
        assert!(is_shortage(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_shortage(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(is_shortage(&io::Error::from_raw_os_error(libc::ENOBUFS)));
        assert!(!is_shortage(&io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(per_connection(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
        assert!(!per_connection(&io::Error::from_raw_os_error(libc::EMFILE)));
    }

    #[test]
    fn the_reserve_is_released_and_taken_back() {
        let mut r = Reserve::new().unwrap();
        assert!(r.held());
        r.release();
        assert!(!r.held());
        assert!(r.retake() && r.held());
        assert!(r.spare_available());
    }

    #[test]
    fn a_burst_beyond_one_pass_is_all_accepted_without_new_events() {
        let (listener, backlog) = bind("127.0.0.1:0".parse().unwrap(), 1024).unwrap();
        assert!(backlog >= BACKLOG_MIN);
        let addr = listener.local_addr().unwrap();
        let n = ACCEPT_BURST + 40;
        let clients: Vec<_> = (0..n)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        // No epoll here: the queue holds every connection, and `next` takes them all
        // until the kernel says the queue is empty.
        let mut taken = 0;
        while let Step::Connection(..) = next(&listener) {
            taken += 1;
            assert!(taken <= n);
        }
        assert_eq!(taken, n);
        assert!(matches!(next(&listener), Step::Empty));
        drop(clients);
    }
}
