//! The dataplane loop on the kernel backend: TCP sessions and UDP cluster services,
//! polled with epoll (mio), run to completion on one core.
//!
//! Sharding: this backend runs one dataplane loop that owns every disk and the whole
//! index, so no request crosses cores. When more loops run (DPDK backend), objects are
//! sharded by the first byte of the fingerprint (`fp.0[0] % loops`) and a request that
//! lands on the wrong loop is forwarded over a bounded single-producer queue.
//!
//! Each turn, in bounded batches: accept new connections, drive ready sessions, serve
//! datagrams, fire timers (idle compaction, checkpoint, timeouts). The loop sleeps in
//! epoll when idle, so an idle node does not burn its core; the poll timeout is bounded
//! so shutdown and timers are noticed promptly.

pub mod cluster;
pub mod ops;
pub mod session;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};

use self::cluster::Cluster;
use self::ops::{Ctx, NodeIdentity};
use self::session::{Drive, Session};
use crate::handle::{Command, CommandError, DataplaneEnd, COMMANDS_PER_TURN};
use crate::stats::NodeStats;
use crate::store::Store;

const LISTENER: Token = Token(0);
const UDP_UNICAST: Token = Token(1);
const UDP_MULTICAST: Token = Token(2);
const FIRST_SESSION: usize = 16;
/// Connections accepted per turn.
const ACCEPT_BURST: usize = 64;
/// Events handled per epoll wait.
const EVENTS_MAX: usize = 256;
/// How often every online disk is probed with a one-block read. With the publish
/// interval and the announcer's tick this bounds how late a dead disk is announced
/// (dosp/PROTOCOL.md, "ANNOUNCE").
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How often the disk reports are republished for the management core.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);
/// How often sessions are checked for timeouts.
const TIMEOUT_SCAN: Duration = Duration::from_millis(100);

/// What the dataplane needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub multicast_group: SocketAddrV4,
    pub multicast_if: Ipv4Addr,
    pub node_id: u64,
    /// The operator's name for the node, carried in LOCATE and HEARTBEAT answers.
    pub node_name: Option<dosp::wire::NodeName>,
    pub epoch: u64,
    pub chunk_max: u32,
    pub connections_max: usize,
    /// Longest the loop sleeps in epoll when idle.
    pub idle_sleep: Duration,
    /// How often the store checkpoints when it has new commits.
    pub checkpoint_interval: Duration,
    /// A connection silent this long in the middle of a request is closed (its STORE
    /// aborted).
    pub request_timeout: Duration,
    /// A connection silent this long between requests is closed.
    pub idle_timeout: Duration,
    /// Test-only: `None` in production. See [`TestStall`].
    pub test_stall: Option<TestStall>,
}

/// A test-only hook that blocks the dataplane loop, so the integration tests can prove
/// that the management core notices a stalled core (`/v1/health` `failing`, a
/// node-failing announcement) and that the node recovers when the loop resumes.
///
/// Whoever holds `trigger` sets it; the loop clears it at the top of its next turn and
/// then sleeps `duration` once, serving nothing meanwhile, exactly as a core stuck in
/// a bad device or a livelock would look from outside.
#[derive(Debug, Clone)]
pub struct TestStall {
    pub trigger: Arc<AtomicBool>,
    pub duration: Duration,
}

/// A bound, ready-to-run dataplane.
#[derive(Debug)]
pub struct Server {
    poll: Poll,
    listener: TcpListener,
    cluster: Cluster,
    sessions: HashMap<Token, Session>,
    next_token: usize,
    store: Store,
    stats: Arc<NodeStats>,
    end: DataplaneEnd,
    id: NodeIdentity,
    cfg: ServerConfig,
}

impl Server {
    /// Binds every socket. Errors here are start-up errors (address in use, …).
    pub fn bind(cfg: ServerConfig, store: Store, end: DataplaneEnd) -> io::Result<Server> {
        let stats = Arc::clone(&end.stats);
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(cfg.listen)?;
        let local = listener.local_addr()?;
        let mut cluster = Cluster::bind(local, cfg.multicast_group, cfg.multicast_if)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        poll.registry()
            .register(&mut cluster.unicast, UDP_UNICAST, Interest::READABLE)?;
        poll.registry()
            .register(&mut cluster.multicast, UDP_MULTICAST, Interest::READABLE)?;
        let ip = match local {
            SocketAddr::V4(a) if !a.ip().is_unspecified() => *a.ip(),
            _ => cfg.multicast_if,
        };
        let id = NodeIdentity {
            node_id: cfg.node_id,
            name: dosp::wire::NodeName::field(cfg.node_name.as_ref()),
            epoch: cfg.epoch,
            addr: SocketAddrV4::new(ip, local.port()),
            started: Instant::now(),
            chunk_max: cfg.chunk_max,
        };
        Ok(Server {
            poll,
            listener,
            cluster,
            sessions: HashMap::new(),
            next_token: FIRST_SESSION,
            store,
            stats,
            end,
            id,
            cfg,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Runs until `stop` is set, then checkpoints the store and returns it.
    pub fn run(mut self, stop: &AtomicBool) -> io::Result<Store> {
        let mut events = Events::with_capacity(EVENTS_MAX);
        let mut more: Vec<Token> = Vec::new();
        let mut last_compact = Instant::now();
        let mut last_checkpoint = Instant::now();
        let mut last_timeout_scan = Instant::now();
        let mut last_publish = Instant::now();
        let mut last_probe = Instant::now();
        let mut last_rate = (Instant::now(), NodeStats::get(&self.stats.ops_total));
        self.end.disks.publish(self.store.disks());
        let mut dirty_since_checkpoint = false;
        let ops_at_checkpoint =
            NodeStats::get(&self.stats.stores) + NodeStats::get(&self.stats.deletes);
        let mut last_ops = ops_at_checkpoint;
        NodeStats::inc(&self.stats.loop_turns);

        while !stop.load(Ordering::Relaxed) {
            if let Some(stall) = &self.cfg.test_stall {
                // A plain load per turn while armed (the swap only once it fires);
                // nothing at all in production, where the hook is `None`.
                if stall.trigger.load(Ordering::Relaxed)
                    && stall.trigger.swap(false, Ordering::Relaxed)
                {
                    tracing::warn!(
                        ms = stall.duration.as_millis() as u64,
                        "test hook: stalling the dataplane loop"
                    );
                    std::thread::sleep(stall.duration);
                    tracing::warn!("test hook: dataplane loop resumes");
                }
            }
            NodeStats::inc(&self.stats.loop_turns);
            let timeout = if more.is_empty() {
                self.cfg.idle_sleep
            } else {
                Duration::ZERO
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let mut ready: Vec<Token> = std::mem::take(&mut more);
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    UDP_UNICAST | UDP_MULTICAST => {
                        let mut ctx = Ctx {
                            store: &mut self.store,
                            stats: &self.stats,
                            id: &self.id,
                        };
                        // A burst left data queued: come back next turn.
                        if self.cluster.poll(&mut ctx) {
                            more.push(ev.token());
                        }
                    }
                    t => ready.push(t),
                }
            }
            for t in ready {
                if t == UDP_UNICAST || t == UDP_MULTICAST {
                    let mut ctx = Ctx {
                        store: &mut self.store,
                        stats: &self.stats,
                        id: &self.id,
                    };
                    if self.cluster.poll(&mut ctx) {
                        more.push(t);
                    }
                    continue;
                }
                self.drive(t, &mut more);
            }
            more.sort_unstable();
            more.dedup();

            let now = Instant::now();
            let ops = NodeStats::get(&self.stats.stores) + NodeStats::get(&self.stats.deletes);
            if ops != last_ops {
                dirty_since_checkpoint = true;
                last_ops = ops;
            }
            if now.duration_since(last_rate.0) >= Duration::from_secs(1) {
                let ops = NodeStats::get(&self.stats.ops_total);
                let secs = now.duration_since(last_rate.0).as_secs_f64();
                let rate = ((ops - last_rate.1) as f64 / secs) as u64;
                NodeStats::set(&self.stats.ops_per_sec, rate);
                last_rate = (now, ops);
            }
            // A disk that dies while nothing touches it is found by the probe; publish
            // at once so the management core announces it without waiting.
            let mut changed = false;
            if now.duration_since(last_probe) >= PROBE_INTERVAL {
                last_probe = now;
                for disk in self.store.probe() {
                    tracing::error!(disk = disk.0, "disk failed its health probe: down");
                    changed = true;
                }
            }
            changed |= self.serve_commands();
            if changed || now.duration_since(last_publish) >= PUBLISH_INTERVAL {
                last_publish = now;
                self.end.disks.publish(self.store.disks());
            }
            if now.duration_since(last_timeout_scan) >= TIMEOUT_SCAN {
                last_timeout_scan = now;
                self.close_timed_out(now);
            }
            // Background work only when the node is otherwise quiet.
            let idle = events.is_empty() && more.is_empty();
            if idle && now.duration_since(last_compact) >= Duration::from_secs(1) {
                last_compact = now;
                match self.store.maybe_compact() {
                    Ok(Some(r)) => {
                        tracing::info!(?r, "compacted");
                        // Compaction moved the log head, possibly past the last
                        // checkpoint: write a new one soon, or a crash before the next
                        // store would cost a full scan at start-up.
                        dirty_since_checkpoint = true;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "compaction failed"),
                }
            }
            if idle
                && dirty_since_checkpoint
                && now.duration_since(last_checkpoint) >= self.cfg.checkpoint_interval
            {
                last_checkpoint = now;
                dirty_since_checkpoint = false;
                if let Err(e) = self.store.checkpoint() {
                    tracing::error!(error = %e, "checkpoint failed");
                }
            }
        }

        tracing::info!(sessions = self.sessions.len(), "dataplane stopping");
        let tokens: Vec<Token> = self.sessions.keys().copied().collect();
        for t in tokens {
            self.close(t);
        }
        if let Err(e) = self.store.checkpoint() {
            tracing::error!(error = %e, "final checkpoint failed");
        }
        Ok(self.store)
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPT_BURST {
            let (mut stream, peer) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and friends: log, and try again next turn.
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            };
            if self.sessions.len() >= self.cfg.connections_max {
                NodeStats::inc(&self.stats.connections_refused);
                tracing::warn!(%peer, max = self.cfg.connections_max, "refusing connection: session table full");
                let mut reply = Vec::new();
                dosp::codec::encode_response(
                    &mut reply,
                    dosp::wire::Opcode::Null as u16,
                    0,
                    &[zerocopy::IntoBytes::as_bytes(&dosp::wire::OutHead::new(
                        dosp::wire::Status::Busy,
                        0,
                    ))],
                );
                let _ = io::Write::write(&mut stream, &reply);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let token = Token(self.next_token);
            self.next_token += 1;
            let mut session = Session::new(stream, peer, self.cfg.chunk_max);
            if let Err(e) = self.poll.registry().register(
                session.stream_mut(),
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!(%peer, error = %e, "cannot register connection");
                continue;
            }
            NodeStats::inc(&self.stats.connections);
            NodeStats::inc(&self.stats.connections_total);
            tracing::debug!(%peer, "connection accepted");
            self.sessions.insert(token, session);
            let mut more = Vec::new();
            self.drive(token, &mut more);
        }
    }

    /// Carries out up to COMMANDS_PER_TURN management commands; true if any came.
    fn serve_commands(&mut self) -> bool {
        let mut any = false;
        for _ in 0..COMMANDS_PER_TURN {
            let Ok(cmd) = self.end.commands.try_recv() else {
                break;
            };
            any = true;
            match cmd {
                Command::SetDiskState { disk, state, reply } => {
                    let result = if usize::from(disk.0) < self.store.disks().len() {
                        self.store.set_disk_state(disk, state);
                        tracing::info!(
                            disk = disk.0,
                            ?state,
                            "disk state set by the management core"
                        );
                        self.store
                            .disks()
                            .into_iter()
                            .find(|d| d.id == disk)
                            .ok_or(CommandError::NoSuchDisk(disk.0))
                    } else {
                        Err(CommandError::NoSuchDisk(disk.0))
                    };
                    // The asker may have given up waiting; that is fine.
                    let _ = reply.try_send(result);
                }
            }
        }
        any
    }

    fn close_timed_out(&mut self, now: Instant) {
        let (request, idle) = (self.cfg.request_timeout, self.cfg.idle_timeout);
        let stale: Vec<Token> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.timed_out(now, request, idle))
            .map(|(t, _)| *t)
            .collect();
        for t in stale {
            if let Some(s) = self.sessions.get(&t) {
                tracing::info!(peer = %s.peer, "closing a connection that went quiet");
            }
            NodeStats::inc(&self.stats.sessions_timed_out);
            self.close(t);
        }
    }

    fn drive(&mut self, token: Token, more: &mut Vec<Token>) {
        let Some(session) = self.sessions.get_mut(&token) else {
            return;
        };
        let mut ctx = Ctx {
            store: &mut self.store,
            stats: &self.stats,
            id: &self.id,
        };
        match session.drive(&mut ctx) {
            Drive::Idle => {}
            Drive::More => more.push(token),
            Drive::Close => self.close(token),
        }
    }

    fn close(&mut self, token: Token) {
        if let Some(mut session) = self.sessions.remove(&token) {
            let mut ctx = Ctx {
                store: &mut self.store,
                stats: &self.stats,
                id: &self.id,
            };
            session.close(&mut ctx);
            let _ = self.poll.registry().deregister(session.stream_mut());
            NodeStats::dec(&self.stats.connections);
            tracing::debug!(peer = %session.peer, "connection closed");
        }
    }
}
