//! The DOSP listener: binding it with a backlog sized for the session table, and
//! taking connections off it.
//!
//! mio registers the listener edge-triggered: one readiness event says "connections
//! arrived", not "one connection". A loop that stops accepting before the kernel says
//! `WouldBlock` must come back by itself — no new event arrives for connections
//! already queued, and once the backlog is full none arrive at all (new SYNs are
//! dropped). So the loop drains the queue, at most [`ACCEPT_BURST`] per turn, and when
//! it stops early it asks to be called again ([`Pass::Again`]).

use std::io;
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use socket2::{Domain, Socket, Type};

/// Connections accepted per loop turn at most; more wait for the next turn (which
/// comes at once, see [`Pass::Again`]).
pub const ACCEPT_BURST: usize = 256;
/// The smallest listen backlog asked for, whatever `connections_max` is: a burst of
/// connects between two loop turns must not overflow a tiny queue.
pub const BACKLOG_MIN: u32 = 128;

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
    let backlog = backlog_for(connections_max, somaxconn());
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // As std does: a restarted node can bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok((TcpListener::from_std(socket.into()), backlog))
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
    /// Stopped early (the per-turn bound, or a failure): call again without waiting
    /// for an event.
    Again,
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
